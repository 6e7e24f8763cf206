//! The source's side of a resumable channel: the first data connection as dialled with the
//! channel, then, after each break, a new one that re-admits it (`FLAG_RESUME`, with the
//! epoch's credential).

use std::io;
use std::sync::Arc;

use migproxy_proto::{FLAG_RESUME, Hello, Status};

use super::super::Daemon;
use super::super::channel::resumable::{self as channel, Ends, Redial};
use super::super::migration::{Admitted, Migration};
use super::super::peer::PeerError;
use super::dial::dial;
use crate::human::Chain;
use crate::transport::Stream;

/// Carries QEMU's connection `index` as a resumable channel; `hello` is the one its first
/// data connection was dialled with.
pub async fn carry(
    daemon: Arc<Daemon>,
    migration: Arc<Migration>,
    (index, admitted): (u32, Admitted),
    hello: Hello,
    qemu: (Stream, String),
    first: Stream,
) {
    let registration = migration.resumable.register(index, false);
    let connection = registration.connection;
    let again = Hello {
        flags: hello.flags | FLAG_RESUME,
        ..hello
    };
    let dialler = Arc::clone(&migration);
    let dial = move || {
        let (daemon, migration, hello) = (Arc::clone(&daemon), Arc::clone(&dialler), again.clone());
        async move {
            let dialled = dial(&daemon, &migration, &hello).await;
            dialled.map(|dialled| dialled.stream).map_err(as_io)
        }
    };
    let link = Redial {
        first: Some(first),
        dial,
        connection,
    };
    let peer = format!("tcp:{}", migration.spec.peer);
    let ends = Ends {
        qemu,
        peer: (link, peer),
        sides: registration.sides,
    };
    channel::run(migration, index, admitted, ends).await;
}

/// A dial's failure as the engine takes it: the peer's refusal is final (`PermissionDenied`:
/// it holds nothing to resume), except when it is only busy; everything else is tried again.
fn as_io(error: PeerError) -> io::Error {
    let kind = match &error {
        PeerError::Refused {
            status: Status::Busy,
            ..
        } => io::ErrorKind::ConnectionRefused,
        PeerError::Refused { .. } => io::ErrorKind::PermissionDenied,
        other => other
            .os_error()
            .map_or(io::ErrorKind::TimedOut, io::Error::kind),
    };
    io::Error::new(kind, Chain(&error).to_string())
}
