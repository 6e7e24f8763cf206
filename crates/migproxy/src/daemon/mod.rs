//! `migproxy daemon`: one per host, carrying migrations between hosts.
//!
//! ```text
//!  source host                                          destination host
//!  QEMU ─migrate unix:RUNTIME/ID.sock─► daemon ══peer link (TCP)══► daemon ─► QEMU -incoming
//!                                        │  control connection (one per migration)  │
//!                                        │  data connection per channel, in order   │
//! ```
//!
//! The destination daemon creates the migration first (`direction: incoming`) and hands out
//! its id, a one-time token and its peer address; the source daemon is given those
//! (`direction: outgoing`), dials the control link at once, and hands back the unix socket
//! URI for QEMU's `migrate`. Each connection QEMU opens there becomes a channel: a data
//! connection to the destination daemon, which connects the destination QEMU for it — in
//! the source's accept order, each only after the previous one is established.
//!
//! Where migproxy drives both QEMUs over QMP, a migration may instead take the *kernel data
//! path* ([`data_path`]): the daemons hand each QEMU its end of their own data connection and
//! only watch it ([`kernel`]), so the bytes skip both daemons.
//!
//! A recoverable postcopy migration pauses when the link breaks: the source daemon brings
//! the control link back with backoff (`outgoing/redial.rs`), and where it drives QEMU each
//! daemon tells its QEMU to recover ([`qemu`]'s `recover.rs`), on either data path.
//!
//! Modules: [`migration`] (state machine, shared by both roles), [`outgoing`] (source),
//! [`incoming`] (destination), [`control`] (the control link), [`peer`] (hello, socket
//! options, framing), [`channel`] (one relay), [`kernel`] (one kernel-path channel),
//! [`data_path`] (which path, and why), [`attribution`] (who failed, rendered).

pub mod attribution;
mod channel;
mod control;
pub mod data_path;
pub mod gate;
pub mod incoming;
pub mod kernel;
mod last_frames;
pub mod metrics;
pub mod migration;
pub mod names;
pub mod outgoing;
pub mod paths;
pub mod peer;
pub mod qemu;
pub mod rejections;
pub mod returnpath;
pub mod runtime;
pub mod token;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::task::TaskTracker;

use self::migration::Migration;
pub use self::peer::Timing;
pub use self::rejections::Rejections;

/// Everything a daemon needs besides its listeners.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address handed to source daemons (HOST:PORT).
    pub advertise: String,
    /// Where per-migration sockets for the source QEMU are created.
    pub runtime_dir: PathBuf,
    /// `runtime_dir`, opened and checked at start; checked again before each socket is
    /// created or handed out there. `None` leaves the directory unchecked (in-process tests).
    pub runtime: Option<Arc<runtime::RuntimeDir>>,
    pub timing: Timing,
    /// How long an incoming migration waits for its source daemon.
    pub token_ttl: Duration,
    /// How long a migration whose control link is up waits for its first channel.
    pub first_channel_timeout: Duration,
    /// Migrations not yet ended, at most.
    pub max_migrations: usize,
    /// Channels per migration, unless the migration asks for fewer.
    pub max_channels: u32,
    /// Peer connections still in their handshake, at most (and as many on the TLS API port).
    pub max_handshakes: usize,
    /// Of those, from one source address.
    pub max_handshakes_per_address: usize,
    /// Further handshake slots on the peer port, only for addresses from which a migration's
    /// control link is attached (its channels).
    pub reserved_handshakes: usize,
    /// Connections that have not sent their first byte, at most, per listener; when full,
    /// the oldest of the address holding the most is dropped.
    pub max_silent_connections: usize,
    /// How long a new connection may stay silent before it is dropped.
    pub first_byte_timeout: Duration,
    /// Finished migrations kept for the API.
    pub keep_finished: usize,
    /// An active migration with channels fails when no byte moves for this long.
    pub stall_timeout: Duration,
    /// How long a paused postcopy migration driven over QMP may take to recover.
    pub recover_timeout: Duration,
    /// How long a resumable channel may go without a working peer connection, unless the
    /// migration asks otherwise; zero: not resumable.
    pub resume_timeout: Duration,
    /// Mutual TLS on every peer connection; `None` is plaintext (`--insecure-plaintext`).
    pub tls: Option<Arc<crate::tls::TlsHandle>>,
    /// Directories an incoming migration's unix target must be in; empty: anywhere.
    pub target_dirs: Vec<PathBuf>,
    /// Migrations may take the kernel data path (in clear) although the link is TLS.
    pub allow_clear_data: bool,
    /// The data path of migrations that do not ask for one.
    pub data_path: data_path::DataPath,
    /// Where the API is also served over mutual TLS, if it is.
    pub api_tls: Option<String>,
    /// Deadlines and a cap for API connections (unix and TLS).
    pub api_limits: ApiLimits,
}

impl Config {
    pub fn new(advertise: String, runtime_dir: PathBuf) -> Config {
        Config {
            advertise,
            runtime_dir,
            runtime: None,
            timing: Timing::default(),
            token_ttl: Duration::from_secs(300),
            first_channel_timeout: Duration::from_secs(300),
            max_migrations: 64,
            max_channels: 64,
            max_handshakes: 64,
            max_handshakes_per_address: 8,
            reserved_handshakes: 16,
            max_silent_connections: 256,
            first_byte_timeout: Duration::from_secs(2),
            keep_finished: 1000,
            stall_timeout: Duration::from_secs(30),
            recover_timeout: Duration::from_secs(600),
            resume_timeout: Duration::ZERO,
            tls: None,
            target_dirs: Vec::new(),
            allow_clear_data: false,
            data_path: data_path::DataPath::Relay,
            api_tls: None,
            api_limits: ApiLimits::default(),
        }
    }

    /// The peer link as the data path sees it: TLS or not, and whether clear data is
    /// allowed anyway (`allow_clear_data`).
    pub fn link(&self) -> (bool, bool) {
        (self.tls.is_some(), self.allow_clear_data)
    }

    /// The admission limits of the peer port; the TLS API port has no reserve.
    pub fn gate_limits(&self) -> gate::Limits {
        gate::Limits {
            max: self.max_handshakes,
            per_address: self.max_handshakes_per_address,
            reserved: self.reserved_handshakes,
            max_silent: self.max_silent_connections,
            first_byte: self.first_byte_timeout,
        }
    }
}

/// Limits on API connections (unix and TLS); documented in `docs/config.md`.
#[derive(Debug, Clone)]
pub struct ApiLimits {
    /// A request's head (request line and headers) must have arrived this long after the
    /// connection became ready for it: opened, or the previous response sent.
    pub header_timeout: Duration,
    /// A connection on which no byte moves either way for this long is closed: a request
    /// body that never comes, a client that stopped reading.
    pub idle_timeout: Duration,
    /// Connections served at once; a connection beyond them is closed at once.
    pub max_connections: usize,
}

impl Default for ApiLimits {
    fn default() -> ApiLimits {
        ApiLimits {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 64,
        }
    }
}

/// The daemon's shared state: its configuration and its migrations.
#[derive(Debug)]
pub struct Daemon {
    pub config: Config,
    migrations: Mutex<HashMap<String, Arc<Migration>>>,
    /// Every task working for a migration (control links, channels, accept loops, timers),
    /// so that shutdown can wait for them and tests can count them.
    pub tasks: TaskTracker,
    pub started: std::time::Instant,
    /// Peer connections turned away, by reason.
    pub rejections: Rejections,
    pub metrics: Arc<metrics::Metrics>,
    /// Migration groups by name (see [`migration::group`]).
    groups: Mutex<HashMap<String, std::sync::Weak<migration::group::Group>>>,
    /// Every migration's events, for `GET /v1/events`.
    pub events: tokio::sync::broadcast::Sender<migration::Event>,
}

/// Why a migration could not be registered.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("a migration with id \"{0}\" already exists")]
    Exists(String),
    #[error("this daemon already runs its maximum of {0} migrations")]
    Full(usize),
    /// Two migrations on one socket would deliver one's stream to the other's QEMU, and the
    /// first to end would remove the other's socket.
    #[error("{} is already the socket of migration \"{other}\"", .path.display())]
    SocketTaken { path: PathBuf, other: String },
    #[error(transparent)]
    RuntimeDir(#[from] runtime::RuntimeDirError),
}

impl Daemon {
    pub fn new(config: Config) -> Arc<Daemon> {
        Arc::new(Daemon {
            config,
            migrations: Mutex::new(HashMap::new()),
            groups: Mutex::new(HashMap::new()),
            tasks: TaskTracker::new(),
            started: std::time::Instant::now(),
            rejections: Rejections::default(),
            metrics: Arc::default(),
            events: tokio::sync::broadcast::channel(1024).0,
        })
    }

    /// What a new migration shares with the daemon: metrics, events, the task tracker and
    /// its timers.
    pub fn context(&self) -> migration::Context {
        migration::Context {
            metrics: Arc::clone(&self.metrics),
            events: self.events.clone(),
            tasks: self.tasks.clone(),
            timers: migration::Timers {
                token_ttl: self.config.token_ttl,
                first_channel: self.config.first_channel_timeout,
                ..migration::Timers::default()
            },
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Migration>>> {
        self.migrations
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn get(&self, id: &str) -> Option<Arc<Migration>> {
        self.map().get(id).cloned()
    }

    /// Every migration, oldest first.
    pub fn list(&self) -> Vec<Arc<Migration>> {
        let mut all: Vec<_> = self.map().values().cloned().collect();
        all.sort_by_key(|m| std::cmp::Reverse(m.elapsed()));
        all
    }

    /// Reserves the id and the unix socket of a new migration.
    pub fn register(&self, migration: Arc<Migration>) -> Result<(), RegisterError> {
        let socket = migration.spec.local.unix_path();
        if let Some(path) = socket {
            self.check_runtime_dir(path)?;
        }
        let mut map = self.map();
        if map.contains_key(&migration.spec.id) {
            return Err(RegisterError::Exists(migration.spec.id.clone()));
        }
        let running = map.values().filter(|m| !m.state().is_final()).count();
        if running >= self.config.max_migrations {
            return Err(RegisterError::Full(self.config.max_migrations));
        }
        if let Some(path) = socket
            && let Some(other) = socket_owner(&map, path)
        {
            return Err(RegisterError::SocketTaken {
                path: path.to_owned(),
                other,
            });
        }
        self.prune(&mut map);
        if let Some(name) = &migration.spec.group {
            migration.join(self.group(name));
        }
        self.watch(&migration);
        map.insert(migration.spec.id.clone(), migration);
        Ok(())
    }

    /// The group named `name`, made when its first member registers; forgotten with its last.
    fn group(&self, name: &str) -> Arc<migration::group::Group> {
        let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        groups.retain(|_, group| group.strong_count() > 0);
        if let Some(group) = groups.get(name).and_then(std::sync::Weak::upgrade) {
            return group;
        }
        let group = Arc::new(migration::group::Group::default());
        groups.insert(name.to_owned(), Arc::downgrade(&group));
        group
    }

    /// A socket about to be created or handed out in the runtime directory: the directory
    /// must still be the one checked at start.
    fn check_runtime_dir(&self, socket: &std::path::Path) -> Result<(), RegisterError> {
        let Some(runtime) = &self.config.runtime else {
            return Ok(());
        };
        let parent = socket.parent().unwrap_or(std::path::Path::new("/"));
        let same = |a: &std::path::Path, b: &std::path::Path| {
            use std::os::unix::fs::MetadataExt;
            match (std::fs::metadata(a), std::fs::metadata(b)) {
                (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
                _ => false,
            }
        };
        if parent == runtime.path() || same(parent, runtime.path()) {
            runtime.check()?;
        }
        Ok(())
    }

    /// Forgets an ended migration. `Err` carries the state of one still running.
    pub fn forget(&self, id: &str) -> Result<Option<Arc<Migration>>, migration::State> {
        let mut map = self.map();
        match map.get(id).map(|m| m.state()) {
            None => Ok(None),
            Some(state) if !state.is_final() => Err(state),
            Some(_) => Ok(map.remove(id)),
        }
    }

    /// The metrics text, with what only the running migrations know.
    pub fn render_metrics(&self) -> String {
        let mut live = metrics::Live {
            tls: self.config.tls.is_some(),
            ..metrics::Live::default()
        };
        for migration in self.list() {
            if !migration.state().is_final() {
                live.migrations_active += 1;
            }
            let (bytes, channels) = migration.live_bytes();
            live.bytes.to_destination = live
                .bytes
                .to_destination
                .saturating_add(bytes.to_destination);
            live.bytes.to_source = live.bytes.to_source.saturating_add(bytes.to_source);
            live.channels_active += channels;
        }
        let mut rejections: Vec<_> = self.rejections.counts().into_iter().collect();
        rejections.sort();
        live.rejections = rejections;
        self.metrics.render(&live)
    }

    /// Takes back a registration whose setup failed.
    pub fn unregister(&self, id: &str) {
        self.map().remove(id);
    }

    /// Keeps at most `keep_finished` ended migrations, forgetting the longest-ended first.
    fn prune(&self, map: &mut HashMap<String, Arc<Migration>>) {
        let mut ended: Vec<(Duration, String)> = map
            .values()
            .filter_map(|m| m.ended_for().map(|age| (age, m.spec.id.clone())))
            .collect();
        if ended.len() < self.config.keep_finished {
            return;
        }
        ended.sort();
        for (_, id) in ended.drain(self.config.keep_finished.saturating_sub(1)..) {
            map.remove(&id);
        }
    }

    /// Starts the stall watch: on both hosts, each concluding what it can see (see
    /// [`Migration::watch_stall`]); the first to conclude tells the other.
    fn watch(&self, migration: &Arc<Migration>) {
        self.tasks
            .spawn(Arc::clone(migration).watch_stall(self.config.stall_timeout));
    }

    /// Cancels every migration still running (daemon shutdown): the peers are told.
    pub fn cancel_all(&self) {
        for migration in self.list() {
            migration.cancel(migration.host());
        }
    }
}

/// The running migration whose socket (or incoming target) `path` is already.
fn socket_owner(map: &HashMap<String, Arc<Migration>>, path: &std::path::Path) -> Option<String> {
    let wanted = socket_key(path);
    map.values()
        .filter(|m| !m.state().is_final())
        .find(|m| m.spec.local.unix_path().map(socket_key).as_ref() == Some(&wanted))
        .map(|m| m.spec.id.clone())
}

/// A unix socket path as the kernel will find it: its directory with every symbolic link
/// resolved (when it can be), so that two spellings of one path are seen as one.
fn socket_key(path: &std::path::Path) -> PathBuf {
    match (path.parent().map(std::fs::canonicalize), path.file_name()) {
        (Some(Ok(dir)), Some(name)) => dir.join(name),
        _ => path.to_owned(),
    }
}
