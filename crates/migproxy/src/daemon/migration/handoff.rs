//! One connection waiting for the task that takes it: on the kernel data path, the data
//! connection — admitted on the peer port (destination), or dialled again after a pause
//! (source) — for the task that hands it to QEMU; a control link parked at a pause (source)
//! for the redial task.

use std::sync::Mutex;

use tokio::sync::Notify;

/// Bytes on a kernel-path connection before QEMU had it: the hello (source → destination)
/// and its reply (destination → source), which `TCP_INFO` counts too.
#[derive(Debug, Clone, Copy, Default)]
pub struct Preamble {
    pub to_destination: u64,
    pub to_source: u64,
}

/// One slot: the kernel path carries one connection per epoch.
#[derive(Debug)]
pub struct Handoff<T> {
    slot: Mutex<Option<T>>,
    notify: Notify,
}

impl<T> Default for Handoff<T> {
    fn default() -> Handoff<T> {
        Handoff {
            slot: Mutex::new(None),
            notify: Notify::new(),
        }
    }
}

impl<T> Handoff<T> {
    /// Leaves the connection for [`take`](Self::take); returns the one it displaces (of an
    /// epoch that broke before its connection was taken), for the caller to end.
    pub fn put(&self, arrived: T) -> Option<T> {
        let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        let displaced = slot.replace(arrived);
        drop(slot);
        self.notify.notify_one();
        displaced
    }

    /// The connection, if one waits.
    pub fn try_take(&self) -> Option<T> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Waits until a connection waits in the slot (left there for [`try_take`](Self::try_take)).
    pub async fn waiting(&self) {
        loop {
            let notified = self.notify.notified();
            if self
                .slot
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some()
            {
                return;
            }
            notified.await;
        }
    }

    /// Waits for the connection.
    pub async fn take(&self) -> T {
        loop {
            let notified = self.notify.notified();
            if let Some(arrived) = self.slot.lock().unwrap_or_else(|p| p.into_inner()).take() {
                return arrived;
            }
            notified.await;
        }
    }
}
