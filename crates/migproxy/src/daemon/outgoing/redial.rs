//! The source daemon brings a paused migration's control link back by itself when it
//! drives QEMU (postcopy recovery over QMP): it dials again with backoff until the link is
//! back, the migration ends (cancel, recover timeout), or the destination refuses.
//!
//! ```text
//!  paused ─► wait 0.5 s ─► dial ─✗─► wait 1 s ─► dial ─✗─► 2 s, 4 s, 5 s, 5 s … ─► dial ─✓─► attached
//!     (QEMU's recovery connection arriving ends a wait at once: it waits for the link;
//!      so does the link kept at the pause, which the first try uses instead of dialling)
//!                              └ refused (restarted, ended there) ─► failed / cancelled, for good
//! ```
//!
//! A cancel asked on this host while paused is carried to the destination on a control
//! link of its own once the destination can be reached again (for a minute at most).
//!
//! A dial into a blackholed network takes up to the connect timeout before it fails; the
//! backoff counts from its end.

use std::sync::Arc;
use std::time::Duration;

use migproxy_proto::Attribution;

use crate::daemon::migration::{Migration, State};

/// Why a paused migration's control link did not come back.
pub enum NotResumed {
    /// The dial failed (the destination is still unreachable): try again.
    Failed(Attribution),
    /// The destination daemon refused: it no longer knows the migration (restarted), or the
    /// migration has ended there (cancelled there, it is cancelled here already: `dial_again`).
    Refused { blame: Attribution },
}

/// The wait before the first try: the destination pauses a moment after this host (it
/// waits for this host's explanation), and a try before that is refused. QEMU's recovery
/// connection, when it comes, ends any wait at once: it waits for this link
/// (`migproxy-bench recover`: with the 500 ms wait alone, the daemons added 404 ms to a
/// recovery started right after the pause).
const FIRST: Duration = Duration::from_millis(500);

/// How long after the pause a failed try is not reported (`resume_failed`).
const QUIET: Duration = Duration::from_secs(1);

/// A pause right after a link came back is not spun on: the next round waits this long.
const AGAIN: Duration = Duration::from_millis(500);

/// The longest wait between two tries.
const MOST: Duration = Duration::from_secs(5);

/// How the link is dialled (the source daemon's peer dial, with this migration's hello).
pub trait Dialer {
    /// A control link for the epoch that starts at channel `first`: true once attached.
    fn resume(&self, first: u32) -> impl Future<Output = Result<bool, NotResumed>> + Send;
    /// A control link that only says the migration was cancelled here: true once said.
    fn tell_cancel(&self, first: u32) -> impl Future<Output = bool> + Send;
}

/// How long a cancel asked here while paused keeps trying to reach the destination.
const TELL_CANCEL: Duration = Duration::from_secs(60);

/// Runs for the migration's life: each time it pauses, brings the link back. A cancel
/// asked here while paused is then carried to the destination once the link is back.
pub async fn run(migration: Arc<Migration>, dialer: impl Dialer) {
    let mut state = migration.watch_state();
    loop {
        let paused = tokio::select! {
            () = migration.stopped() => break,
            paused = state.wait_for(|s| *s == State::Paused) => paused.is_ok(),
        };
        if !paused {
            break;
        }
        bring_back(&migration, &dialer).await;
        // Back, or nothing left to resume. Paused again at once (the epoch broke again
        // before this task looked) is simply the next round; a pause nobody can end here
        // is not spun on.
        if migration.state() == State::Paused {
            tokio::select! {
                () = migration.stopped() => break,
                () = tokio::time::sleep(AGAIN) => {}
            }
        }
    }
    if migration.cancelled_while_paused_here() {
        tell_cancel(&migration, &dialer).await;
    }
    // A link kept for an epoch that will not come closes.
    drop(migration.parked.try_take());
}

/// Dials until the link is back or there is nothing left to resume.
async fn bring_back(migration: &Arc<Migration>, dialer: &impl Dialer) {
    let mut wait = FIRST;
    let paused = tokio::time::Instant::now();
    while migration.state() == State::Paused {
        tokio::select! {
            () = migration.stopped() => return,
            () = tokio::time::sleep(wait) => {}
            () = migration.recovery_came.notified() => {}
            // The link kept: the destination has paused too, and waits on it.
            () = migration.parked.waiting() => {}
        }
        if migration.state() != State::Paused {
            return;
        }
        match dialer.resume(migration.channels_seen()).await {
            Ok(_) => return,
            // A try right after the pause may find the destination not paused yet (it waits
            // for the source's explanation first): no news, and not a failed recovery.
            Err(NotResumed::Failed(_)) if paused.elapsed() < QUIET => {}
            Err(NotResumed::Failed(blame)) => migration.resume_failed(blame),
            // A refusal that says it was cancelled there has cancelled it here (`dial_again`).
            Err(NotResumed::Refused { blame }) => {
                if !migration.is_stopped() {
                    migration.resume_refused(blame);
                }
                return;
            }
        }
        wait = (wait * 2).min(MOST);
    }
}

/// The destination, paused too, waits for a link that will not come back: it is told of the
/// cancel as soon as it can be reached, for a while.
async fn tell_cancel(migration: &Migration, dialer: &impl Dialer) {
    let deadline = tokio::time::Instant::now() + TELL_CANCEL;
    let mut wait = AGAIN;
    while tokio::time::Instant::now() < deadline {
        if dialer.tell_cancel(migration.channels_seen()).await {
            return;
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(MOST);
    }
    tracing::warn!(migration = %migration.spec.id, "the destination could not be told of the cancel");
}
