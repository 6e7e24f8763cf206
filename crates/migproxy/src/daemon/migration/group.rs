//! Migration groups: the migrations that carry one guest together (its RAM, and its disks
//! with `--copy-storage-all`) count their progress together, so that a disk connection idle
//! by design (the disks are in sync) beside a moving RAM stream is not a stall.

use std::sync::{Arc, Mutex, Weak};

/// What a group needs of its members: how much each has moved.
pub trait Member: Send + Sync {
    /// Bytes moved so far, both directions, every channel.
    fn moved(&self) -> u64;
}

/// The members of one group on this daemon.
#[derive(Default)]
pub struct Group {
    members: Mutex<Vec<Weak<dyn Member>>>,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group").finish_non_exhaustive()
    }
}

impl Group {
    fn members(&self) -> std::sync::MutexGuard<'_, Vec<Weak<dyn Member>>> {
        self.members.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn join(&self, member: Weak<dyn Member>) {
        self.members().push(member);
    }

    /// Bytes moved so far by the members other than `me` (ended ones count too: what they
    /// moved is the group's progress).
    pub fn moved_by_others(&self, me: *const ()) -> u64 {
        let others: Vec<Arc<dyn Member>> = {
            let mut members = self.members();
            members.retain(|m| m.strong_count() > 0);
            members
                .iter()
                .filter(|m| m.as_ptr() as *const () != me)
                .filter_map(Weak::upgrade)
                .collect()
        };
        // Outside the group's lock: each member takes its own.
        others
            .iter()
            .map(|m| m.moved())
            .fold(0u64, u64::saturating_add)
    }
}
