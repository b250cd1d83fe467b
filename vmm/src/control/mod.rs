//! The per-VM control socket: one Unix socket per VM (mode 0600, peer uid checked),
//! carrying JSON lines. The engine lives in the VMM process; the CLI is a thin client.

pub mod client;
pub mod rundir;
pub mod server;
