//! smtpgate's developer tasks, as a library for the integration tests.

pub mod agent;
pub mod evasion;
pub mod lab;
pub mod relay;
pub mod tun;
