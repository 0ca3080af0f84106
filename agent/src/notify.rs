//! systemd's service protocol (sd_notify), through the `sd-notify` crate: a
//! no-op outside systemd.
//!
//! - `READY=1` once the agent enforces, `STOPPING=1` when it stops;
//! - `RELOADING=1` with `MONOTONIC_USEC` before every reload, whichever way
//!   it was asked for (SIGHUP or `smtpgate reload`), then `READY=1`, as
//!   `Type=notify-reload` expects;
//! - `WATCHDOG=1` from the main loop's heartbeat, so that a hung agent is
//!   restarted by systemd (`WatchdogSec=` in the unit).

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(e) => {
            tracing::warn!(error = %e, "reading CLOCK_MONOTONIC for sd_notify");
            send(&[NotifyState::Reloading]);
        }
    }
}

/// Whether systemd asked for watchdog pings (`WatchdogSec=`).
#[must_use]
pub fn watchdog_enabled() -> bool {
    sd_notify::watchdog_enabled().is_some()
}

pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}
