//! The one place where the policy turns into a verdict.
//!
//! The eBPF programs call [`judge`] for every SMTP connection attempt they
//! see, and `smtpgate check` calls it for the attempt an admin asks about,
//! with the same [`Config`] the agent wrote into the kernel. So `check`
//! cannot say "dropped" where the kernel counts "redirected": there is no
//! second copy of the rules to drift.
//!
//! What is *not* here is what only the packet can tell (its parse, the
//! table lookup): callers turn that into a [`Standing`] first.

use crate::{Action, Config, Mode, Reason, Verdict};

/// The one destination port that `action = "redirect"` steers into the
/// relay's plaintext intercept listener. Other SMTP ports (465 and 587 to
/// somebody else's server) start with TLS or end up in AUTH: intercepting
/// them would put a user's credentials for another provider in our relay's
/// hands, so they get [`Config::other_action`] instead.
pub const REDIRECT_PORT: u16 = 25;

/// What the datapath knows of a connection attempt before the policy speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// A delivery socket of the agent's own relay: it carries
    /// [`crate::RELAY_MARK`] and belongs to the agent's cgroup.
    Relay,
    /// The source is in the allowlist.
    Allowlisted,
    /// The source is not in the allowlist, but the destination is a
    /// destination exception for this port.
    Excepted,
    /// The source is not in the allowlist.
    NotAllowlisted,
    /// Refused whatever the allowlist says (an evasion, a malformed packet),
    /// for this reason.
    Refused(Reason),
}

/// `u32` to [`Action`], as read from the config map. Anything unknown is a
/// drop: the safe reading of a word the program does not understand.
#[inline(always)]
#[must_use]
pub const fn action_from(word: u32) -> Action {
    if word == Action::Reject as u32 {
        Action::Reject
    } else if word == Action::Redirect as u32 {
        Action::Redirect
    } else {
        Action::Drop
    }
}

/// The action for a denied attempt on `dport`.
#[inline(always)]
#[must_use]
pub const fn action_for(cfg: &Config, dport: u16) -> Action {
    if dport == REDIRECT_PORT {
        action_from(cfg.action)
    } else {
        action_from(cfg.other_action)
    }
}

/// The verdict, and the reason it is counted under, for an attempt on
/// `dport`. `cfg` is `None` before the agent has written its config: SMTP
/// then fails closed.
#[inline(always)]
#[must_use]
pub const fn judge(cfg: Option<&Config>, dport: u16, standing: Standing) -> (Verdict, Reason) {
    let Some(cfg) = cfg else {
        return match standing {
            Standing::Refused(reason) => (Verdict::Dropped, reason),
            _ => (Verdict::Dropped, Reason::NotAllowlisted),
        };
    };
    let audit = cfg.mode == Mode::Audit as u32;
    match standing {
        Standing::Relay => (Verdict::Allowed, Reason::RelayDelivery),
        Standing::Allowlisted => (Verdict::Allowed, Reason::Allowlisted),
        Standing::Excepted => (Verdict::Allowed, Reason::DestinationException),
        // Never answered with a RST: it would tell a prober what we saw.
        Standing::Refused(reason) if audit => (Verdict::Audited, reason),
        Standing::Refused(reason) => (Verdict::Dropped, reason),
        Standing::NotAllowlisted if audit => (Verdict::Audited, Reason::NotAllowlisted),
        Standing::NotAllowlisted => match action_for(cfg, dport) {
            Action::Drop => (Verdict::Dropped, Reason::NotAllowlisted),
            Action::Reject => (Verdict::Rejected, Reason::NotAllowlisted),
            Action::Redirect => (Verdict::Redirected, Reason::NotAllowlisted),
        },
    }
}

/// Whether an IPv6 source is IPv4 in disguise: IPv4-mapped (`::ffff:0:0/96`)
/// or IPv4-compatible (`::/96`, except `::` and `::1`). Such sources never
/// appear on the wire from an honest host and would let an IPv4 host dodge
/// its IPv4 verdict, so the parser refuses them ([`Reason::MappedAddress`])
/// and `check` says so.
#[inline(always)]
#[must_use]
pub fn is_disguised_v4(src: &[u8; 16]) -> bool {
    if src[..10].iter().any(|b| *b != 0) {
        return false;
    }
    let mapped = src[10] == 0xff && src[11] == 0xff;
    let compat = src[10] == 0
        && src[11] == 0
        && !(src[12] == 0 && src[13] == 0 && src[14] == 0 && src[15] <= 1);
    mapped || compat
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(mode: Mode, action: Action, other: Action) -> Config {
        Config {
            action: action as u32,
            other_action: other as u32,
            mode: mode as u32,
            ..Config::ZERO
        }
    }

    #[test]
    fn no_config_fails_closed() {
        for s in [
            Standing::Relay,
            Standing::Allowlisted,
            Standing::NotAllowlisted,
        ] {
            assert_eq!(judge(None, 25, s).0, Verdict::Dropped, "{s:?}");
        }
    }

    #[test]
    fn redirect_steers_port_25_only() {
        let c = cfg(Mode::Enforce, Action::Redirect, Action::Reject);
        assert_eq!(
            judge(Some(&c), 25, Standing::NotAllowlisted).0,
            Verdict::Redirected
        );
        assert_eq!(
            judge(Some(&c), 587, Standing::NotAllowlisted).0,
            Verdict::Rejected
        );
        let c = cfg(Mode::Enforce, Action::Redirect, Action::Drop);
        assert_eq!(
            judge(Some(&c), 465, Standing::NotAllowlisted).0,
            Verdict::Dropped
        );
    }

    #[test]
    fn audit_lets_every_denial_through_counted() {
        let c = cfg(Mode::Audit, Action::Reject, Action::Reject);
        assert_eq!(
            judge(Some(&c), 25, Standing::NotAllowlisted),
            (Verdict::Audited, Reason::NotAllowlisted)
        );
        assert_eq!(
            judge(Some(&c), 25, Standing::Refused(Reason::MappedAddress)),
            (Verdict::Audited, Reason::MappedAddress)
        );
        assert_eq!(
            judge(Some(&c), 25, Standing::Allowlisted).0,
            Verdict::Allowed
        );
    }

    #[test]
    fn refusals_are_dropped_never_answered() {
        let c = cfg(Mode::Enforce, Action::Reject, Action::Reject);
        assert_eq!(
            judge(Some(&c), 25, Standing::Refused(Reason::TinyFragment)),
            (Verdict::Dropped, Reason::TinyFragment)
        );
    }

    #[test]
    fn the_relay_passes_in_every_mode() {
        for mode in [Mode::Enforce, Mode::Audit] {
            let c = cfg(mode, Action::Redirect, Action::Reject);
            assert_eq!(
                judge(Some(&c), 25, Standing::Relay),
                (Verdict::Allowed, Reason::RelayDelivery)
            );
        }
    }

    #[test]
    fn unknown_action_words_drop() {
        assert_eq!(action_from(7), Action::Drop);
    }

    #[test]
    fn disguised_v4() {
        let mut a = [0u8; 16];
        assert!(!is_disguised_v4(&a), "::");
        a[15] = 1;
        assert!(!is_disguised_v4(&a), "::1");
        a[15] = 2;
        assert!(is_disguised_v4(&a), "::2 is IPv4-compatible");
        let mut m = [0u8; 16];
        m[10] = 0xff;
        m[11] = 0xff;
        m[12] = 192;
        assert!(is_disguised_v4(&m), "::ffff:192.0.0.0");
        let mut g = [0u8; 16];
        g[0] = 0x20;
        g[1] = 0x01;
        assert!(!is_disguised_v4(&g), "2001::");
    }
}
