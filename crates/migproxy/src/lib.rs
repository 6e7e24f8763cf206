//! migproxy carries QEMU live-migration streams between hosts.
//!
//! Modules import each other in one direction only (`tests/layering.rs` checks it), from the
//! bottom up:
//!
//! - [`endpoint`]: QEMU's URI syntax (`unix:PATH`, `tcp:HOST:PORT`).
//! - [`human`]: how sizes, durations, OS errors and error chains read in reports.
//! - [`transport`]: one stream type over unix sockets, TCP and TLS, listeners and connects.
//! - [`tls`]: mutual TLS from QEMU's x509 directory layout.
//! - [`relay`]: the zero-copy engine that moves one channel and reports exactly how it ended;
//!   [`relay::resume`] carries a channel across peer connections that break (the daemon's
//!   resumable channels).
//! - [`proxy`]: `migproxy relay`, a relay per accepted connection.
//! - [`qmp`]: a QEMU monitor client.
//! - [`daemon`]: migrations between hosts (the lifecycle in [`daemon::migration`]).
//! - [`api`]: the REST API serving a [`daemon::Daemon`]; [`client`] is its typed client
//!   (requests, and the event stream as typed events).
//! - [`server`]: runs a daemon, its API and its peer port on listeners bound by the caller.
//! - [`config`]: the config file and the daemon's settings.
//! - [`cli`]: the command line.
//!
//! `testkit` (hidden) holds the QEMU guest launcher that the demo, the tests and the benchmark
//! share; it is not product API.

pub mod api;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod endpoint;
pub mod human;
pub mod proxy;
pub mod qmp;
pub mod relay;
pub mod server;
pub mod tls;
pub mod transport;

#[doc(hidden)]
pub mod testkit;
