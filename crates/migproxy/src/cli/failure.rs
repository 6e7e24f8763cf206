//! What went wrong in a one-command migration (`migproxy migrate`, with QMP or libvirt),
//! and the exit code it means.

use super::migration::EXIT_UNREACHABLE;
use super::process::{EXIT_FAILED, EXIT_USAGE};
use crate::client::ClientError;

/// What went wrong, and the exit code it means.
pub(super) struct Failure {
    pub(super) message: String,
    pub(super) code: u8,
}

impl Failure {
    pub(super) fn usage(message: String) -> Failure {
        Failure {
            message,
            code: EXIT_USAGE,
        }
    }

    pub(super) fn failed(message: String) -> Failure {
        Failure {
            message,
            code: EXIT_FAILED,
        }
    }

    /// Interrupted between two steps: nothing more is started.
    pub(super) fn interrupted() -> Failure {
        Failure::failed("interrupted before the migration started".into())
    }

    /// A daemon's refusal or silence, naming which daemon.
    pub(super) fn from_client(who: &str, error: ClientError) -> Failure {
        let code = match error {
            ClientError::Unreachable { .. } | ClientError::Tls { .. } => EXIT_UNREACHABLE,
            ref error if error.is_usage() => EXIT_USAGE,
            _ => EXIT_FAILED,
        };
        let mut message = format!("{who}: {error}");
        for (n, cause) in error.causes().iter().enumerate() {
            message += &format!("\n  {}: {cause}", n + 1);
        }
        Failure { message, code }
    }
}
