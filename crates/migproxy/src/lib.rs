//! migproxy carries QEMU live-migration streams between hosts.
//!
//! - [`endpoint`]: QEMU's URI syntax (`unix:PATH`, `tcp:HOST:PORT`).
//! - [`transport`]: one stream type over unix sockets and TCP, listeners and connects.
//! - [`relay`]: the zero-copy engine that moves one channel and reports exactly how it ended.
//! - [`human`]: how sizes, durations and OS errors read in reports.

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
