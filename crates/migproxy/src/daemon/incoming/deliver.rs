//! The destination QEMU's side of a channel: connected once every earlier channel is (QEMU
//! takes its channels in order), then relayed, or carried resumable.

use std::sync::Arc;

use migproxy_proto::{Attribution, Leg, Op, Totals};

use super::super::attribution::os_message;
use super::super::migration::resumable;
use super::super::migration::{Admitted, Migration};
use super::super::{Daemon, channel, paths};
use crate::human::{Chain, errno_name};
use crate::relay;
use crate::transport::{self, Stream, TransportError};

/// Connects channel `index` to the destination QEMU once every earlier channel is connected,
/// then relays it.
pub async fn deliver(
    daemon: Arc<Daemon>,
    migration: Arc<Migration>,
    index: u32,
    admitted: Admitted,
    link: Stream,
    from: String,
) {
    // Resumable: registered at once, so that a connection that comes again while this one
    // waits for its turn finds the channel.
    let resumable = migration.resumable.on().then(|| {
        let registered = migration.resumable.register(index, true);
        (registered, Registered::new(&migration, index))
    });
    if !my_turn(&migration, index, &admitted).await {
        link.abort();
        migration.channel_abandoned(index);
        return;
    }
    let qemu = match connect_qemu(&daemon, &migration, index, &admitted).await {
        Some(qemu) => qemu,
        None => {
            // Reported by connect_qemu: a failure on this channel, or an abandoned one.
            link.abort();
            return;
        }
    };
    if !migration.channel_connected(admitted.epoch, index) {
        // The epoch ended while connecting: this connection belongs to no one.
        qemu.abort();
        link.abort();
        migration.channel_abandoned(index);
        return;
    }
    let qemu_name = migration.spec.local.to_string();
    if let Some((registration, _registered)) = resumable
        && let Some(again) = registration.again
    {
        let arrivals = resumable::Arrivals {
            first: Some(link),
            again,
            connection: registration.connection,
        };
        let ends = channel::resumable::Ends {
            qemu: (qemu, qemu_name),
            peer: (arrivals, format!("tcp:{from}")),
            sides: registration.sides,
        };
        return channel::resumable::run(migration, index, admitted, ends).await;
    }
    let source = relay::Leg::new(format!("tcp:{from}"), link);
    let destination = relay::Leg::new(qemu_name.clone(), qemu);
    channel::run(migration, index, admitted, source, destination, qemu_name).await;
}

/// Waits until the destination QEMU listens and every earlier channel is connected; false
/// when the epoch ended first.
async fn my_turn(migration: &Migration, index: u32, admitted: &Admitted) -> bool {
    let mut next = migration.next_channel();
    let mut ready = migration.qemu_ready();
    tokio::select! {
        () = admitted.stop.cancelled() => false,
        // A QEMU driven here listens only once the source has come (`migrate-incoming`).
        turn = async {
            ready.wait_for(|ready| *ready).await.is_ok()
                && next.wait_for(|next| *next == index).await.is_ok()
        } => turn,
    }
}

/// Connects to the destination QEMU for channel `index`; `None` once the failure (or the
/// epoch's end) is reported on the channel.
async fn connect_qemu(
    daemon: &Daemon,
    migration: &Arc<Migration>,
    index: u32,
    admitted: &Admitted,
) -> Option<Stream> {
    let target = &migration.spec.local;
    if let Some(Err(error)) = target.unix_path().map(paths::refuse_symlink) {
        let error = TransportError::Connect {
            endpoint: target.clone(),
            error,
        };
        let blame = connect_failure(migration, index, &error);
        migration.channel_failed(admitted.epoch, index, blame);
        return None;
    }
    // A resumed main channel of a migration recovered by hand: QEMU may be connected already.
    let mut claim = match admitted.stop.is_cancelled() {
        true => None,
        false => migration.claim_early(admitted.main).await,
    };
    if let Some(qemu) = claim.as_mut().and_then(|claim| claim.held.take()) {
        tracing::debug!(migration = %migration.spec.id, index, "the resumed main channel takes the connection made when QEMU listened again");
        deepen(&qemu);
        return Some(qemu);
    }
    if claim.is_some() {
        tracing::debug!(migration = %migration.spec.id, index, "the resumed main channel came before QEMU listened again: it connects itself");
    }
    let connected = tokio::select! {
        // An ended epoch first: a failure racing it is only its echo.
        biased;
        () = admitted.stop.cancelled() => None,
        connected = transport::connect(target, daemon.config.timing.connect_timeout) => Some(connected),
    };
    drop(claim);
    match connected {
        Some(Ok(qemu)) => {
            deepen(&qemu);
            Some(qemu)
        }
        Some(Err(error)) => {
            let blame = connect_failure(migration, index, &error);
            migration.channel_failed(admitted.epoch, index, blame);
            None
        }
        None => {
            migration.channel_abandoned(index);
            None
        }
    }
}

fn connect_failure(migration: &Migration, index: u32, error: &TransportError) -> Attribution {
    let (errno, message) = match error.os_error() {
        Some(os) => (errno_name(os), os_message(os)),
        None => (None, Chain(error).to_string()),
    };
    Attribution {
        host: migration.host(),
        leg: Leg::Qemu,
        channel: Some(index),
        direction: None,
        // As on the source's dials: a connect that got no answer in time is a timeout.
        op: match error {
            TransportError::ConnectTimeout { .. } => Op::Timeout,
            _ => Op::Connect,
        },
        errno,
        message: format!("{}: {message}", migration.spec.local),
        bytes: Totals::default(),
        elapsed_ms: migration.elapsed().as_millis() as u64,
    }
}

/// A unix socket's send buffer bounds what this daemon can hand the destination QEMU before
/// it must wait for QEMU to read: the default (~200 KiB) makes a 1 MiB write a dozen
/// wake-ups. Larger where the system allows (`net.core.wmem_max`).
fn deepen(qemu: &Stream) {
    if let Stream::Unix(socket) = qemu {
        let _ = socket2::SockRef::from(socket).set_send_buffer_size(QEMU_SEND_BUFFER);
    }
}

const QEMU_SEND_BUFFER: usize = 2 << 20;

/// A channel registered until this is dropped (it ended, or never ran).
#[derive(Debug)]
struct Registered {
    migration: std::sync::Weak<Migration>,
    index: u32,
}

impl Registered {
    fn new(migration: &Arc<Migration>, index: u32) -> Registered {
        Registered {
            migration: Arc::downgrade(migration),
            index,
        }
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Some(migration) = self.migration.upgrade() {
            let _ = migration.resumable.forget(self.index);
        }
    }
}
