//! smtpgate's authenticated submission relay.
//!
//! Runs without eBPF and without root: the agent hands in listeners (the
//! intercept one comes from the datapath side) or lets the relay bind its
//! own. See `Relay::start`.

pub mod config;
pub mod dataread;
mod date;
pub mod limits;
pub mod parse;
pub mod reply;
pub mod session;
pub mod spool;
pub mod stats;
pub mod tls;
pub mod users;

pub use config::{RelayConfig, UpstreamConfig, UpstreamTls};
pub use stats::{RelayStats, StatsSnapshot};
