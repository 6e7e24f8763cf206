//! Dialling the destination daemon: TLS unless the daemon is plaintext, and a destination
//! one version behind asked again in its version; a connection that comes back, on which a
//! destination's word that the migration was cancelled there ends it here; the hello every
//! connection starts with.

use migproxy_proto::{
    FLAG_KERNEL_PATH, FLAG_RECOVERABLE, FLAG_RESUMABLE, FLAG_RESUME, Hello, Host, Kind, Status,
    VERSION,
};

use std::sync::Arc;

use super::super::Daemon;
use super::super::migration::Migration;
use super::super::peer::{self, PeerError};
use crate::human::Chain;

/// Dials the peer daemon for `migration`, with TLS unless the daemon is plaintext.
pub async fn dial(
    daemon: &Daemon,
    migration: &Migration,
    hello: &Hello,
) -> Result<peer::Dialled, PeerError> {
    let tls = daemon.config.tls.as_ref().map(|handle| handle.current());
    let to = peer::Dial {
        peer: &migration.spec.peer,
        tls: tls
            .as_deref()
            .map(|tls| (tls, migration.spec.server_name.as_str())),
    };
    let mut timing = daemon.config.timing.clone();
    if hello.kind == Kind::Data && migration.resumable.on() {
        // A resumable channel's connection that goes silent is given up at the dead-peer
        // budget, like the control link, rather than the user timeout: a new one costs a
        // replay, and TCP's retransmission backoff would make it wait seconds after the
        // network is back.
        timing.user_timeout = timing.user_timeout.min(timing.peer_timeout);
    }
    let dialled = peer::dial(to, hello, &timing).await;
    // A destination of the version before refuses a newer hello (it accepts its own and the
    // one before): ask again in the oldest version both may speak.
    match dialled {
        Err(PeerError::Refused {
            status: Status::UnsupportedVersion,
            ..
        }) if hello.version > migproxy_proto::MIN_VERSION && hello.flags & FLAG_RESUME == 0 => {
            // Without what needs the credential (version 2 on): resumable channels.
            let older = Hello {
                version: migproxy_proto::MIN_VERSION,
                flags: hello.flags & !(FLAG_RESUMABLE | FLAG_RESUME),
                ..hello.clone()
            };
            peer::dial(to, &older, &timing).await
        }
        other => other,
    }
}

/// [`dial`]s a connection that comes back after an outage or a pause: a control link that
/// takes over, one that brings a paused migration back, or a channel's. A refusal saying
/// the migration was cancelled there (while the link was down) cancels it here too,
/// whichever of them hears it first.
pub async fn dial_again(
    daemon: &Daemon,
    migration: &Arc<Migration>,
    hello: &Hello,
) -> Result<peer::Dialled, PeerError> {
    heed(migration, dial(daemon, migration, hello).await)
}

/// [`dial`]s a control link after a pause: on the link parked at the pause when there is one
/// (the hello goes on it as on a new connection), else, or if that link fails before its
/// reply (closed meanwhile), on a new one.
pub async fn reach(
    daemon: &Daemon,
    migration: &Migration,
    hello: &Hello,
) -> Result<peer::Dialled, PeerError> {
    if let Some(stream) = migration.parked.try_take() {
        match peer::dial_parked(&migration.spec.peer, stream, hello).await {
            Err(error) if !matches!(error, PeerError::Refused { .. }) => {
                tracing::info!(migration = %migration.spec.id, "the parked control link failed ({}): dialling a new one", Chain(&error));
            }
            kept => return kept,
        }
    }
    dial(daemon, migration, hello).await
}

/// A refusal saying the migration was cancelled there cancels it here.
pub fn heed(
    migration: &Arc<Migration>,
    dialled: Result<peer::Dialled, PeerError>,
) -> Result<peer::Dialled, PeerError> {
    if let Err(PeerError::Refused {
        status: Status::Cancelled,
        message,
        ..
    }) = &dialled
    {
        tracing::info!(migration = %migration.spec.id, "the destination says the migration is cancelled: {message}");
        migration.cancel(Host::Destination);
    }
    dialled
}

pub fn hello(migration: &Migration, kind: Kind, channel: u32) -> Hello {
    // Both daemons must agree whether a failure pauses or fails the migration.
    let recoverable = kind == Kind::Control && migration.spec.recoverable;
    // The first control link offers the kernel path where it serves here.
    // A resumed control link of a kernel-path migration offers it again: the destination
    // holds to the path it settled.
    let offers_kernel = kind == Kind::Control
        && ((channel == 0 && migration.spec.data_path_here.is_kernel())
            || migration.on_kernel_path());
    let asks_resumable = kind == Kind::Control && migration.spec.resume_timeout.is_some();
    Hello {
        version: VERSION,
        kind,
        migration: migration.spec.id.clone(),
        channel,
        // The first control link presents the one-time token, a later one (after a pause)
        // the last credential a control link was handed; a data connection the credential
        // its control link was handed.
        token: match kind {
            Kind::Control => *migration
                .resumable
                .credential()
                .unwrap_or_else(|| migration.spec.token.clone())
                .bytes(),
            Kind::Data => *migration.data_credential().bytes(),
        },
        flags: if recoverable { FLAG_RECOVERABLE } else { 0 }
            | if offers_kernel { FLAG_KERNEL_PATH } else { 0 }
            | if asks_resumable { FLAG_RESUMABLE } else { 0 },
    }
}
