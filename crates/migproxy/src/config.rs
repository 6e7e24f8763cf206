//! The daemon's configuration: a TOML file (`migproxy daemon --config FILE`) under the
//! command-line flags, which override it. Every key is documented in `docs/config.md`.
//!
//! The file's types ([`File`]) are kept apart from the validated result ([`Settings`]):
//! unknown keys are rejected, and every error names the file, and the line and key at fault.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },
    /// The TOML error says the line, the column and the key.
    #[error("config file {}", .path.display())]
    Parse {
        path: PathBuf,
        #[source]
        error: Box<toml::de::Error>,
    },
    #[error("config file {}: {key}: {problem}", .path.display())]
    Value {
        path: PathBuf,
        key: &'static str,
        problem: String,
    },
    #[error("missing {flag} (or `{key}` in the config file)")]
    Missing {
        flag: &'static str,
        key: &'static str,
    },
    /// Every quiet migration would fail: the peer is declared gone between two heartbeats.
    #[error(
        "timeouts.heartbeat ({} s) must be shorter than the peer timeout ({} s, --peer-timeout \
         or timeouts.peer): the peer daemon would be declared gone between two heartbeats",
        .heartbeat.as_secs_f64(), .peer.as_secs_f64()
    )]
    HeartbeatNotBelowPeerTimeout { heartbeat: Duration, peer: Duration },
}

/// The file, as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    pub api: Option<PathBuf>,
    pub api_group: Option<String>,
    pub api_listen: Option<String>,
    pub peer_listen: Option<String>,
    pub advertise: Option<String>,
    pub runtime_dir: Option<PathBuf>,
    pub runtime_dir_group: Option<String>,
    pub target_dirs: Option<Vec<PathBuf>>,
    pub insecure_plaintext: Option<bool>,
    /// Let migrations take the kernel data path (in clear) while TLS guards the control link.
    pub allow_clear_data: Option<bool>,
    /// The data path of migrations that do not ask for one.
    pub data_path: Option<crate::daemon::data_path::DataPath>,
    #[serde(default)]
    pub tls: TlsSection,
    #[serde(default)]
    pub limits: LimitsSection,
    #[serde(default)]
    pub timeouts: TimeoutsSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub dir: Option<PathBuf>,
    pub allow: Option<Vec<String>>,
    /// The record layer of peer connections: `"migproxy"` (default) or `"stock"`.
    pub records: Option<crate::tls::Records>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    pub max_migrations: Option<usize>,
    pub max_channels: Option<u32>,
    pub max_handshakes: Option<usize>,
    pub max_handshakes_per_address: Option<usize>,
    pub reserved_handshakes: Option<usize>,
    pub max_silent_connections: Option<usize>,
    pub max_api_connections: Option<usize>,
}

/// Seconds, fractions allowed.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsSection {
    pub connect: Option<f64>,
    pub handshake: Option<f64>,
    pub heartbeat: Option<f64>,
    pub peer: Option<f64>,
    pub stall: Option<f64>,
    pub token_ttl: Option<f64>,
    pub first_channel: Option<f64>,
    pub recover: Option<f64>,
    pub resume: Option<f64>,
    pub first_byte: Option<f64>,
    pub api_header: Option<f64>,
    pub api_idle: Option<f64>,
}

impl File {
    /// Reads and parses `path`, and checks every value it sets.
    pub fn load(path: &Path) -> Result<File, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        let file: File = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            error: Box::new(e),
        })?;
        file.check(path)?;
        Ok(file)
    }

    fn check(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key, problem: &str| ConfigError::Value {
            path: path.to_owned(),
            key,
            problem: problem.to_owned(),
        };
        let t = &self.timeouts;
        for (key, value) in [
            ("timeouts.connect", t.connect),
            ("timeouts.handshake", t.handshake),
            ("timeouts.heartbeat", t.heartbeat),
            ("timeouts.peer", t.peer),
            ("timeouts.stall", t.stall),
            ("timeouts.token_ttl", t.token_ttl),
            ("timeouts.first_channel", t.first_channel),
            ("timeouts.recover", t.recover),
            ("timeouts.resume", t.resume),
            ("timeouts.first_byte", t.first_byte),
            ("timeouts.api_header", t.api_header),
            ("timeouts.api_idle", t.api_idle),
        ] {
            if let Some(seconds) = value
                && !(seconds.is_finite() && seconds > 0.0 && seconds < 1e9)
            {
                return Err(bad(key, "must be a positive number of seconds"));
            }
        }
        let l = &self.limits;
        if l.max_migrations == Some(0) {
            return Err(bad("limits.max_migrations", "must be at least 1"));
        }
        if l.max_channels == Some(0) {
            return Err(bad("limits.max_channels", "must be at least 1"));
        }
        if l.max_handshakes == Some(0) {
            return Err(bad("limits.max_handshakes", "must be at least 1"));
        }
        if l.max_handshakes_per_address == Some(0) {
            return Err(bad(
                "limits.max_handshakes_per_address",
                "must be at least 1",
            ));
        }
        if l.max_silent_connections == Some(0) {
            return Err(bad("limits.max_silent_connections", "must be at least 1"));
        }
        if l.max_api_connections == Some(0) {
            return Err(bad("limits.max_api_connections", "must be at least 1"));
        }
        if self
            .tls
            .allow
            .as_ref()
            .is_some_and(|a| a.iter().any(|p| p.trim().is_empty()))
        {
            return Err(bad("tls.allow", "patterns must not be empty"));
        }
        Ok(())
    }
}

/// The flags of `migproxy daemon`, each overriding the file.
#[derive(Debug, Default)]
pub struct Flags {
    pub api: Option<PathBuf>,
    pub api_group: Option<String>,
    pub api_listen: Option<String>,
    pub peer_listen: Option<String>,
    pub advertise: Option<String>,
    pub runtime_dir: Option<PathBuf>,
    pub runtime_dir_group: Option<String>,
    pub target_dirs: Vec<PathBuf>,
    pub insecure_plaintext: bool,
    pub allow_clear_data: bool,
    pub data_path: Option<crate::daemon::data_path::DataPath>,
    pub tls_dir: Option<PathBuf>,
    pub tls_allow: Vec<String>,
    pub tls_records: Option<crate::tls::Records>,
    pub peer_timeout: Option<Duration>,
    pub stall_timeout: Option<Duration>,
    pub token_ttl: Option<Duration>,
    pub first_channel_timeout: Option<Duration>,
    pub recover_timeout: Option<Duration>,
    pub resume_timeout: Option<Duration>,
}

/// The configuration in force.
#[derive(Debug, Clone)]
pub struct Settings {
    pub api: PathBuf,
    pub api_group: Option<String>,
    /// `HOST:PORT` for the API over TCP behind mutual TLS.
    pub api_listen: Option<String>,
    pub peer_listen: String,
    pub advertise: Option<String>,
    pub runtime_dir: PathBuf,
    /// QEMU's group, which may create sockets in the runtime directory (mode 1770).
    pub runtime_dir_group: Option<String>,
    pub target_dirs: Vec<PathBuf>,
    pub insecure_plaintext: bool,
    /// Migrations may take the kernel data path (in clear) with TLS on the control link.
    pub allow_clear_data: bool,
    /// The data path of migrations that do not ask for one.
    pub data_path: crate::daemon::data_path::DataPath,
    pub tls_dir: Option<PathBuf>,
    pub tls_allow: Vec<String>,
    pub tls_records: crate::tls::Records,
    pub max_migrations: usize,
    pub max_channels: u32,
    pub max_handshakes: usize,
    pub max_handshakes_per_address: usize,
    pub reserved_handshakes: usize,
    pub max_silent_connections: usize,
    pub api_limits: crate::daemon::ApiLimits,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    /// How long a new connection may stay silent.
    pub first_byte_timeout: Duration,
    pub heartbeat_interval: Duration,
    pub peer_timeout: Duration,
    pub stall_timeout: Duration,
    pub token_ttl: Duration,
    /// How long a migration whose control link is up waits for the source QEMU's first
    /// connection.
    pub first_channel_timeout: Duration,
    /// How long a paused postcopy migration driven over QMP may take to recover, unless
    /// it asks otherwise.
    pub recover_timeout: Duration,
    /// How long a resumable channel may go without a working peer connection, unless the
    /// migration asks otherwise; zero: channels are not resumable.
    pub resume_timeout: Duration,
}

/// A repeatable flag given at least once replaces the file's list.
fn flag_or_file<T>(flag: Vec<T>, file: Option<Vec<T>>) -> Vec<T> {
    if flag.is_empty() {
        file.unwrap_or_default()
    } else {
        flag
    }
}

/// Defaults, as documented in `docs/config.md`.
pub const DEFAULT_RUNTIME_DIR: &str = "/run/migproxy";

/// The daemon's resume timeout unless configured (`timeouts.resume`): why a minute is in
/// docs/daemon.md, "Resumable channels".
pub const DEFAULT_RESUME_TIMEOUT: Duration = Duration::from_secs(60);

fn secs(value: Option<f64>, default: u64) -> Duration {
    value.map_or(Duration::from_secs(default), Duration::from_secs_f64)
}

impl Settings {
    /// Flags over the file over the defaults.
    pub fn resolve(flags: Flags, file: File) -> Result<Settings, ConfigError> {
        let t = file.timeouts;

        let settings = Settings {
            api: flags.api.or(file.api).ok_or(ConfigError::Missing {
                flag: "--api",
                key: "api",
            })?,
            api_group: flags.api_group.or(file.api_group),
            api_listen: flags.api_listen.or(file.api_listen),
            peer_listen: flags
                .peer_listen
                .or(file.peer_listen)
                .ok_or(ConfigError::Missing {
                    flag: "--peer-listen",
                    key: "peer_listen",
                })?,
            advertise: flags.advertise.or(file.advertise),
            runtime_dir: flags
                .runtime_dir
                .or(file.runtime_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_RUNTIME_DIR)),
            runtime_dir_group: flags.runtime_dir_group.or(file.runtime_dir_group),
            target_dirs: flag_or_file(flags.target_dirs, file.target_dirs),
            insecure_plaintext: flags.insecure_plaintext
                || file.insecure_plaintext.unwrap_or(false),
            allow_clear_data: flags.allow_clear_data || file.allow_clear_data.unwrap_or(false),
            data_path: flags.data_path.or(file.data_path).unwrap_or_default(),
            tls_dir: flags.tls_dir.or(file.tls.dir),
            tls_allow: flag_or_file(flags.tls_allow, file.tls.allow),
            tls_records: flags.tls_records.or(file.tls.records).unwrap_or_default(),
            max_migrations: file.limits.max_migrations.unwrap_or(64),
            max_channels: file.limits.max_channels.unwrap_or(64),
            max_handshakes: file.limits.max_handshakes.unwrap_or(64),
            max_handshakes_per_address: file.limits.max_handshakes_per_address.unwrap_or(8),
            reserved_handshakes: file.limits.reserved_handshakes.unwrap_or(16),
            max_silent_connections: file.limits.max_silent_connections.unwrap_or(256),
            api_limits: crate::daemon::ApiLimits {
                header_timeout: secs(t.api_header, 10),
                idle_timeout: secs(t.api_idle, 60),
                max_connections: file.limits.max_api_connections.unwrap_or(64),
            },
            connect_timeout: secs(t.connect, 10),
            handshake_timeout: secs(t.handshake, 10),
            first_byte_timeout: secs(t.first_byte, 2),
            heartbeat_interval: secs(t.heartbeat, 1),
            peer_timeout: flags.peer_timeout.unwrap_or(secs(t.peer, 10)),
            stall_timeout: flags.stall_timeout.unwrap_or(secs(t.stall, 30)),
            token_ttl: flags.token_ttl.unwrap_or(secs(t.token_ttl, 300)),
            first_channel_timeout: flags
                .first_channel_timeout
                .unwrap_or(secs(t.first_channel, 300)),
            recover_timeout: flags.recover_timeout.unwrap_or(secs(t.recover, 600)),
            resume_timeout: flags
                .resume_timeout
                .unwrap_or(secs(t.resume, DEFAULT_RESUME_TIMEOUT.as_secs())),
        };
        settings.check()?;
        Ok(settings)
    }

    /// What no single value shows: values that contradict each other.
    fn check(&self) -> Result<(), ConfigError> {
        if self.heartbeat_interval >= self.peer_timeout {
            return Err(ConfigError::HeartbeatNotBelowPeerTimeout {
                heartbeat: self.heartbeat_interval,
                peer: self.peer_timeout,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("migproxy.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let (_dir, path) = write(
            "api = \"/run/a.sock\"\npeer_listen = \"127.0.0.1:4700\"\n\
             [timeouts]\npeer = 3.5\nstall = 12\n[limits]\nmax_channels = 8\n",
        );
        let file = File::load(&path).unwrap();
        let flags = Flags {
            peer_timeout: Some(Duration::from_secs(2)),
            ..Flags::default()
        };
        let settings = Settings::resolve(flags, file).unwrap();
        assert_eq!(settings.api, PathBuf::from("/run/a.sock"));
        assert_eq!(
            settings.peer_timeout,
            Duration::from_secs(2),
            "the flag wins"
        );
        assert_eq!(
            settings.stall_timeout,
            Duration::from_secs(12),
            "the file wins over the default"
        );
        assert_eq!(settings.max_channels, 8);
        assert_eq!(settings.token_ttl, Duration::from_secs(300), "the default");
        assert_eq!(settings.runtime_dir, PathBuf::from(DEFAULT_RUNTIME_DIR));
    }

    #[test]
    fn errors_name_the_file_the_line_and_the_key() {
        let (_dir, path) = write("api = \"/a\"\ncolour = \"blue\"\n");
        let error = crate::human::Chain(&File::load(&path).unwrap_err()).to_string();
        assert!(error.contains(&path.display().to_string()), "{error}");
        assert!(error.contains("line 2"), "{error}");
        assert!(error.contains("colour"), "{error}");

        let (_dir, path) = write("[timeouts]\npeer = -1\n");
        let error = crate::human::Chain(&File::load(&path).unwrap_err()).to_string();
        assert!(
            error.ends_with("timeouts.peer: must be a positive number of seconds"),
            "{error}"
        );

        let (_dir, path) = write("[limits]\nmax_channels = \"many\"\n");
        let error = crate::human::Chain(&File::load(&path).unwrap_err()).to_string();
        assert!(
            error.contains("line 2") && error.contains("max_channels"),
            "{error}"
        );

        let error = Settings::resolve(Flags::default(), File::default())
            .unwrap_err()
            .to_string();
        assert_eq!(error, "missing --api (or `api` in the config file)");
    }

    #[test]
    fn the_tls_record_layer_is_chosen_by_key_or_flag() {
        use crate::tls::Records;
        let base = "api = \"/a\"\npeer_listen = \"127.0.0.1:0\"\n";
        let (_dir, path) = write(&format!("{base}[tls]\nrecords = \"stock\"\n"));
        let resolve = |flags| Settings::resolve(flags, File::load(&path).unwrap()).unwrap();
        assert_eq!(resolve(Flags::default()).tls_records, Records::Stock);
        let flags = Flags {
            tls_records: Some(Records::Migproxy),
            ..Flags::default()
        };
        assert_eq!(
            resolve(flags).tls_records,
            Records::Migproxy,
            "the flag wins"
        );
        let (_dir, path) = write(base);
        let settings = Settings::resolve(Flags::default(), File::load(&path).unwrap()).unwrap();
        assert_eq!(settings.tls_records, Records::Migproxy, "the default");
        let (_dir, path) = write(&format!("{base}[tls]\nrecords = \"fast\"\n"));
        let error = crate::human::Chain(&File::load(&path).unwrap_err()).to_string();
        assert!(
            error.contains("records") && error.contains("line 4"),
            "{error}"
        );
    }

    #[test]
    fn a_heartbeat_not_below_the_peer_timeout_is_refused_naming_both() {
        let (_dir, path) =
            write("api = \"/a\"\npeer_listen = \"127.0.0.1:0\"\n[timeouts]\nheartbeat = 2\n");
        let flags = || Flags {
            peer_timeout: Some(Duration::from_secs(2)),
            ..Flags::default()
        };
        let error = Settings::resolve(flags(), File::load(&path).unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            error
                .starts_with("timeouts.heartbeat (2 s) must be shorter than the peer timeout (2 s"),
            "{error}"
        );
        let below = Flags {
            peer_timeout: Some(Duration::from_millis(2001)),
            ..flags()
        };
        Settings::resolve(below, File::load(&path).unwrap()).unwrap();
    }
}
