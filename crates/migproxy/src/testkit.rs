//! Scaffolding for the demo, the integration tests and the benchmark — not product API: hidden
//! from the documentation, and free to change with them.
//!
//! - [`vm`]: paused QEMU guests whose RAM is real data.

pub mod vm;
