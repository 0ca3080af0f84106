//! Whether every attach point still enforces, asked of the kernel each
//! second and on every link event, and what the agent does when one does
//! not; temporary entries that expire; the log's word on events left out.

use super::*;

impl Agent {
    /// Asks the kernel whether every attach point still enforces, and
    /// attaches again what went away and is back: an interface deleted and
    /// created again, a link unpinned by hand, a cgroup recreated. `event`
    /// is when the link event that prompted the check arrived (None for the
    /// periodic check), for the reattach gap.
    pub fn check_attachments(&mut self, event: Option<Instant>) {
        if self.detached {
            return;
        }
        for i in 0..self.points.len() {
            let point = self.points[i].point.clone();
            let mut result = self.datapath.observe(&point);
            let mut repaired = None;
            if let Err(down) = &result {
                self.mark_down(i, down);
                if down.repairable() {
                    result = match self.datapath.repair(&point, down) {
                        Ok(()) => {
                            repaired = Some(event.map_or(Duration::ZERO, |t| t.elapsed()));
                            self.datapath.observe(&point)
                        }
                        Err(e) => Err(Down::AttachFailed {
                            error: format!("{:#}", anyhow::Error::new(e)),
                        }),
                    };
                }
            }
            match result {
                Ok(()) => self.mark_up(i, repaired),
                Err(down) => self.mark_down(i, &down),
            }
        }
    }

    /// Records (and logs, once per reason) that point `i` does not enforce.
    pub(super) fn mark_down(&mut self, i: usize, down: &Down) {
        let status = &mut self.points[i];
        let reason = down.to_string();
        if status.down.as_ref().is_some_and(|d| d.reason == reason) {
            return;
        }
        error!(point = %status.point, %reason, "attach point DOWN: SMTP egress through it is not filtered");
        let since_unix = status.down.as_ref().map_or_else(now_unix, |d| d.since_unix);
        status.down = Some(DownSince { reason, since_unix });
    }

    /// Records that point `i` enforces; `repaired` is the gap from the link
    /// event when this check attached it again.
    pub(super) fn mark_up(&mut self, i: usize, repaired: Option<Duration>) {
        let status = &mut self.points[i];
        let Some(was) = status.down.take() else {
            return;
        };
        status.reattaches += 1;
        status.last_reattach_unix = Some(now_unix());
        status.last_reattach_gap_ms = repaired.map(|g| g.as_secs_f64() * 1e3);
        let gap_ms = status
            .last_reattach_gap_ms
            .map_or_else(|| "?".to_owned(), |g| format!("{g:.1}"));
        warn!(
            point = %status.point,
            down_for_ms = format!("{:.1}", (now_unix() - was.since_unix) * 1e3),
            gap_ms,
            "attach point UP again: attached after it came back"
        );
    }

    /// Removes the CLI entries whose time is up (`allow add --expires`).
    /// Called every second by the main loop, so an entry leaves within a
    /// second of its expiry.
    pub fn expire_entries(&mut self) {
        if self.detached {
            return;
        }
        let now = now_unix() as u64;
        if !self.cli_entries.iter().any(|e| e.expired(now)) {
            return;
        }
        let (gone, kept): (Vec<_>, Vec<_>) = self
            .cli_entries
            .iter()
            .cloned()
            .partition(|e| e.expired(now));
        match self.set_cli_entries(kept) {
            Ok(()) => {
                for e in gone {
                    info!(prefix = %e.prefix, comment = ?e.comment, "allowlist entry expired");
                }
            }
            // Nothing changed: the entry is still allowed, and that must be
            // loud. The next second tries again.
            Err(e) => {
                error!(error = %format!("{e:#}"), "removing expired allowlist entries failed")
            }
        }
    }

    /// Whether every configured attach point enforces, as last observed.
    pub(super) fn all_up(&self) -> bool {
        !self.points.is_empty() && self.points.iter().all(|p| p.down.is_none())
    }

    /// Says in the log how many denial events the kernel left out since it
    /// last said so (a flood past the per-CPU budget). Every attempt is in
    /// the counters and `top` all the same.
    pub fn report_unlogged(&mut self) {
        let total = self.datapath.unlogged_events();
        if total > self.unlogged_reported {
            warn!(
                target: "smtpgate::denied",
                unlogged = total - self.unlogged_reported,
                "denial events left out: more than the per-CPU budget per second (all are counted; see smtpgate stats and top)"
            );
        }
        // Also when it went down: a successor datapath starts from zero.
        self.unlogged_reported = total;
    }
}
