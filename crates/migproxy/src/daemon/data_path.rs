//! Which path a migration's bytes take, and why.
//!
//! - **relay**: QEMU → socket → daemon → peer link → daemon → socket → QEMU. Every byte
//!   passes through both daemons (splice, or TLS).
//! - **kernel**: the source daemon dials a data connection to the destination daemon, is
//!   admitted on it as a relay channel would be, and then each daemon hands its end to its
//!   QEMU over QMP (`getfd`, then `migrate fd:NAME` / `migrate-incoming fd:NAME`). The bytes
//!   go QEMU to QEMU through the kernels; each daemon keeps a duplicate of its end only to
//!   watch it (`TCP_INFO`) and to shut it down (cancel, failure).
//!
//! The kernel path serves only where a daemon can hand QEMU the socket and the bytes may go
//! in clear ([`unfit`]). `auto` takes it where it serves on both hosts: the source offers it
//! in its control hello, and the destination decides (its acceptance says which, and why).
//!
//! ```text
//!  source daemon                                       destination daemon
//!    │ ── Hello{control, flags: KERNEL_PATH} ─────────────────► │ fit here too?
//!    │ ◄──────────────── HelloReply{Ok, "CREDENTIAL kernel"} ── │ (or "… relay: WHY")
//!    │ ── Hello{data, channel 0, credential} (TCP, clear) ───► │ admitted
//!    │ ◄────────────────────────────────────── HelloReply{Ok} ─ │
//!  getfd + migrate fd:NAME                          getfd + migrate-incoming fd:NAME
//!    │ ═══════ QEMU ⇄ QEMU on that connection (daemons keep a dup, never read) ═════ │
//! ```

use serde::{Deserialize, Serialize};

use super::qemu::report::Settings;

/// The name QEMU knows the kernel path's socket by (`getfd`, `fd:NAME`).
pub fn fd_name(id: &str) -> String {
    format!("migproxy-{id}")
}

/// The path a migration asks for (`data_path`), or the one it took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum DataPath {
    /// Through both daemons (splice or TLS).
    #[default]
    Relay,
    /// QEMU to QEMU over the daemons' own TCP connection.
    Kernel,
    /// The kernel path where it serves on both hosts, the relay otherwise.
    Auto,
}

impl DataPath {
    pub fn name(self) -> &'static str {
        match self {
            DataPath::Relay => "relay",
            DataPath::Kernel => "kernel",
            DataPath::Auto => "auto",
        }
    }
}

impl std::fmt::Display for DataPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why the kernel path cannot serve a migration on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unfit {
    #[error(
        "this daemon does not drive the QEMU (no qmp): only a daemon that drives QEMU can hand \
         it the socket"
    )]
    NoQmp,
    #[error("multifd: QEMU cannot run multifd on an fd: URI (it connects each channel by address)")]
    Multifd,
    #[error(
        "the daemons carry migration data over TLS, and the kernel path would send it in \
         clear: allow that with allow_clear_data (see docs/security.md)"
    )]
    Encrypted,
}

/// Why the kernel path cannot serve here, if it cannot: `qemu` the QEMU driven here, `tls`
/// whether the peer link is encrypted, `clear_allowed` the daemon's `allow_clear_data`.
pub fn unfit(qemu: Option<&Settings>, tls: bool, clear_allowed: bool) -> Option<Unfit> {
    match qemu {
        None => Some(Unfit::NoQmp),
        Some(settings) if settings.multifd.is_some() => Some(Unfit::Multifd),
        Some(_) if tls && !clear_allowed => Some(Unfit::Encrypted),
        Some(_) => None,
    }
}

/// What this host can do for a request asking for `asked`: [`unfit`], then
/// [`local_choice`]. `link` is the daemon's: whether it is TLS, and whether it allows clear
/// data.
pub fn for_request(
    asked: DataPath,
    qemu: Option<&Settings>,
    (tls, clear_allowed): (bool, bool),
) -> Result<Choice, Unfit> {
    local_choice(asked, unfit(qemu, tls, clear_allowed))
}

/// What this host can do: the kernel path (asked or automatic), or the relay, and why.
/// `Err` when the kernel path was asked for and cannot serve here.
pub fn local_choice(asked: DataPath, unfit: Option<Unfit>) -> Result<Choice, Unfit> {
    match (asked, unfit) {
        (DataPath::Relay, _) => Ok(Choice::relay("asked for")),
        (DataPath::Kernel, Some(unfit)) => Err(unfit),
        (DataPath::Auto, Some(unfit)) => Ok(Choice::relay(format!("auto: {unfit}"))),
        (asked, None) => Ok(Choice {
            path: DataPath::Kernel,
            reason: match asked {
                DataPath::Kernel => "asked for".to_owned(),
                _ => "auto: both daemons drive QEMU and the data may go in clear".to_owned(),
            },
        }),
    }
}

/// The path a migration takes, and why (for the views and the reports).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Choice {
    /// `relay` or `kernel`.
    pub path: DataPath,
    pub reason: String,
}

impl Choice {
    pub fn relay(reason: impl Into<String>) -> Choice {
        Choice {
            path: DataPath::Relay,
            reason: reason.into(),
        }
    }

    pub fn is_kernel(&self) -> bool {
        self.path == DataPath::Kernel
    }
}

/// The destination's decision on a control link: `offered` whether the source's hello
/// offers the kernel path, `here` what this host can do. `Err`: the link must be refused.
pub fn decide(asked_here: DataPath, here: &Choice, offered: bool) -> Result<Choice, String> {
    match (offered, here.path) {
        (true, DataPath::Kernel) => Ok(here.clone()),
        (true, _) => Ok(Choice::relay(format!("the destination: {}", here.reason))),
        (false, _) if asked_here == DataPath::Kernel => Err(
            "data_path: kernel here, but the source daemon offers only the relay (its \
             data_path is relay, or the kernel path cannot serve there: see the source's \
             data_path_reason)"
                .to_owned(),
        ),
        (false, _) if here.is_kernel() => Ok(Choice::relay(
            "auto: the source daemon does not offer the kernel path",
        )),
        (false, _) => Ok(here.clone()),
    }
}

/// The control link's acceptance message (protocol 2 on): the data credential, then, when
/// the hello offered the kernel path, the destination's decision: ` kernel`, or
/// ` relay: WHY`.
pub fn acceptance(credential_hex: &str, offered: bool, choice: &Choice) -> String {
    match (offered, choice.path) {
        (false, _) => credential_hex.to_owned(),
        (true, DataPath::Kernel) => format!("{credential_hex} kernel"),
        (true, _) => {
            let mut message = format!("{credential_hex} relay: {}", choice.reason);
            // The reply's message holds 255 bytes: a long reason is cut, not the reply.
            while message.len() > MAX_MESSAGE {
                message.pop();
            }
            message
        }
    }
}

/// The longest reply message (its length is one byte).
const MAX_MESSAGE: usize = 255;

/// Reads an acceptance message: the credential's hex and, when the kernel path was offered,
/// the destination's choice. `None` when the message says neither.
pub fn parse_acceptance(message: &str, offered: bool) -> Option<(&str, Option<Choice>)> {
    let (credential, rest) = match message.split_once(' ') {
        Some((credential, rest)) => (credential, Some(rest)),
        None => (message, None),
    };
    let choice = match rest {
        None if !offered => None,
        Some("kernel") if offered => Some(Choice {
            path: DataPath::Kernel,
            reason: String::new(),
        }),
        Some(rest) if offered => Some(Choice::relay(rest.strip_prefix("relay: ")?)),
        _ => return None,
    };
    Some((credential, choice))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qmp(multifd: Option<u32>) -> Settings {
        Settings {
            qmp: "/q".into(),
            multifd,
            postcopy: false,
            postcopy_after_ms: None,
            max_bandwidth: None,
            downtime_limit_ms: None,
        }
    }

    #[test]
    fn the_kernel_path_serves_only_with_qmp_one_stream_and_clear_data() {
        assert_eq!(unfit(None, false, false), Some(Unfit::NoQmp));
        assert_eq!(
            unfit(Some(&qmp(Some(4))), false, false),
            Some(Unfit::Multifd)
        );
        assert_eq!(unfit(Some(&qmp(None)), true, false), Some(Unfit::Encrypted));
        assert_eq!(unfit(Some(&qmp(None)), true, true), None);
        assert_eq!(unfit(Some(&qmp(None)), false, false), None);
    }

    #[test]
    fn kernel_asked_where_it_cannot_serve_is_refused_and_auto_falls_back() {
        assert_eq!(
            local_choice(DataPath::Kernel, Some(Unfit::Multifd)),
            Err(Unfit::Multifd)
        );
        let auto = local_choice(DataPath::Auto, Some(Unfit::Multifd)).unwrap();
        assert_eq!(auto.path, DataPath::Relay);
        assert!(auto.reason.contains("multifd"), "{}", auto.reason);
        assert!(local_choice(DataPath::Auto, None).unwrap().is_kernel());
        assert!(!local_choice(DataPath::Relay, None).unwrap().is_kernel());
    }

    #[test]
    fn the_destination_decides_and_refuses_a_kernel_it_cannot_get() {
        let kernel = local_choice(DataPath::Auto, None).unwrap();
        let relay = local_choice(DataPath::Auto, Some(Unfit::NoQmp)).unwrap();
        assert!(decide(DataPath::Auto, &kernel, true).unwrap().is_kernel());
        let declined = decide(DataPath::Auto, &relay, true).unwrap();
        assert!(
            declined
                .reason
                .starts_with("the destination: auto: this daemon does not")
        );
        assert!(!decide(DataPath::Auto, &kernel, false).unwrap().is_kernel());
        assert!(decide(DataPath::Kernel, &kernel, false).is_err());
    }

    #[test]
    fn acceptances_round_trip_and_garbage_is_refused() {
        let hex = "ab".repeat(32);
        let kernel = local_choice(DataPath::Kernel, None).unwrap();
        let relay = Choice::relay("the destination: no qmp");
        for (offered, choice) in [(true, &kernel), (true, &relay), (false, &relay)] {
            let message = acceptance(&hex, offered, choice);
            let (credential, parsed) = parse_acceptance(&message, offered).unwrap();
            assert_eq!(credential, hex);
            assert_eq!(parsed.map(|c| c.path), offered.then_some(choice.path));
        }
        assert_eq!(parse_acceptance(&format!("{hex} kernel"), false), None);
        assert_eq!(parse_acceptance(&format!("{hex} bogus"), true), None);
        assert_eq!(parse_acceptance(&hex, true), None);
        let long = Choice::relay("é".repeat(300));
        assert!(acceptance(&hex, true, &long).len() <= MAX_MESSAGE);
    }
}
