//! A migration for tests of this crate: the fixed facts of one that nothing will dial, and a
//! context of its own (its timers as given).

use std::sync::Arc;

use tokio::sync::broadcast;
use tokio_util::task::TaskTracker;

use super::{Context, Migration, Role, Spec, Timers};
use crate::daemon::data_path::{Choice, DataPath};
use crate::daemon::qemu::report::Settings;
use crate::daemon::token::Token;

/// Migration "t" in `role`, driving a QEMU (that is not there) when `qemu` is given.
pub fn migration(role: Role, qemu: Option<Settings>, timers: Timers) -> Arc<Migration> {
    Migration::new(spec(role, qemu), context(timers))
}

/// A recoverable destination whose QEMU, at `local`, a person recovers by hand.
pub fn recovered_by_hand(local: &str, timers: Timers) -> Arc<Migration> {
    let mut spec = spec(Role::Incoming, None);
    spec.local = local.parse().expect("an endpoint");
    spec.recoverable = true;
    Migration::new(spec, context(timers))
}

fn spec(role: Role, qemu: Option<Settings>) -> Spec {
    Spec {
        id: "t".into(),
        role,
        token: Token::generate(),
        peer: "127.0.0.1:1".into(),
        local: "unix:/nowhere.sock".parse().expect("an endpoint"),
        max_channels: 4,
        recoverable: false,
        recover_timeout: None,
        resume_timeout: None,
        server_name: String::new(),
        tls: false,
        qemu,
        group: None,
        data_path_asked: DataPath::Relay,
        data_path_here: Choice::relay("asked for"),
    }
}

fn context(timers: Timers) -> Context {
    Context {
        metrics: Arc::default(),
        events: broadcast::channel(64).0,
        tasks: TaskTracker::new(),
        timers,
    }
}
