//! The data path a migration takes (relay or kernel), as the two hosts settled it when the
//! control link came up: what the views and the events say, and where the local QEMU's
//! migration goes.

use super::Migration;
use super::view::EventKind;
use crate::daemon::data_path::Choice;

impl Migration {
    /// The data path both hosts settled on, once the control link has attached.
    pub fn data_path(&self) -> Option<&Choice> {
        self.data_path.get()
    }

    /// Where the local QEMU's migration goes (source) or comes from (destination): the
    /// daemon's socket, or on the kernel path the descriptor QEMU was given (`fd:NAME`).
    pub fn local_uri(&self) -> String {
        match self.on_kernel_path() {
            true => format!("fd:{}", crate::daemon::data_path::fd_name(&self.spec.id)),
            false => self.spec.local.to_string(),
        }
    }

    /// Whether the bytes go QEMU to QEMU (settled on the kernel path).
    pub fn on_kernel_path(&self) -> bool {
        self.data_path().is_some_and(Choice::is_kernel)
    }

    /// Records the data path both hosts settled on; the first word stands.
    pub fn settle_data_path(&self, choice: Choice) {
        tracing::info!(migration = %self.spec.id, path = %choice.path, reason = %choice.reason, "data path");
        let event = EventKind::DataPath {
            data_path: choice.path,
            reason: choice.reason.clone(),
        };
        if self.data_path.set(choice).is_ok() {
            self.publish(event);
        }
    }
}
