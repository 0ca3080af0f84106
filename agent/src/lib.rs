//! smtpgate: a port-25 egress policy agent for gateway hosts.
//!
//! Data flows one way: `config` (and the CLI) -> `policy` -> `datapath` ->
//! kernel verdicts -> counters -> logs and metrics.

pub mod agent;
pub mod config;
pub mod control;
pub mod datapath;
pub mod events;
pub mod heartbeat;
pub mod metrics;
pub mod notify;
pub mod owner;
pub mod paths;
pub mod policy;
pub mod sources;
pub mod state;
