//! The main loop's heartbeat, for `/healthz`.
//!
//! The attachment-check loop beats it after every round it completes. If
//! that loop hangs (a deadlock on the agent's state, a stuck system call),
//! the beats stop, `/healthz` fails, and a liveness probe or systemd's
//! watchdog restarts the agent. It is read without the agent's lock, so a
//! hung agent cannot make it look alive.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// How long without a beat before `/healthz` says the agent is stalled.
/// The loop beats every second; a reload of a very large allowlist holds
/// the agent's state for several seconds, which must not count as a hang.
pub const STALE_AFTER: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
pub struct Heartbeat {
    origin: Instant,
    /// Milliseconds after `origin` of the last beat.
    last_ms: Arc<AtomicU64>,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self::new()
    }
}

impl Heartbeat {
    #[must_use]
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn beat(&self) {
        let ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Time since the last beat (since creation, before the first).
    #[must_use]
    pub fn age(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.origin.elapsed().saturating_sub(last)
    }

    #[must_use]
    pub fn stalled(&self) -> bool {
        self.age() > STALE_AFTER
    }

    /// A heartbeat whose last beat was `ago` before now, for tests.
    #[must_use]
    pub fn beaten_ago(ago: Duration) -> Self {
        Self {
            origin: Instant::now().checked_sub(ago).unwrap_or_else(Instant::now),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }
}
