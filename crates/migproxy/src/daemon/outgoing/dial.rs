//! Dialling the destination daemon: TLS unless the daemon is plaintext, and a destination
//! one version behind asked again in its version.

use migproxy_proto::{FLAG_RESUMABLE, FLAG_RESUME, Hello};

use super::super::Daemon;
use super::super::migration::Migration;
use super::super::peer::{self, PeerError};

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
    let dialled = peer::dial(to, hello, &daemon.config.timing).await;
    // A destination of the version before refuses a newer hello (it accepts its own and the
    // one before): ask again in the oldest version both may speak.
    match dialled {
        Err(PeerError::Refused {
            status: migproxy_proto::Status::UnsupportedVersion,
            ..
        }) if hello.version > migproxy_proto::MIN_VERSION && hello.flags & FLAG_RESUME == 0 => {
            // Without what needs the credential (version 2 on): resumable channels.
            let older = Hello {
                version: migproxy_proto::MIN_VERSION,
                flags: hello.flags & !(FLAG_RESUMABLE | FLAG_RESUME),
                ..hello.clone()
            };
            peer::dial(to, &older, &daemon.config.timing).await
        }
        other => other,
    }
}
