//! Abuse limits shared by all sessions: concurrent sessions (total and per
//! client IP), AUTH failure lockouts (per client IP and per username) and
//! per-user sending rates. All in memory: a restart forgives, which is fine
//! for limits meant to slow abuse, not to account for it.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::config::{LimitsConfig, secs};

/// Maps are pruned of stale entries once they grow past this, so a scan from
/// many addresses cannot grow memory without bound.
const PRUNE_AT: usize = 4096;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[derive(Debug, Default)]
struct ConnCounts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

#[derive(Debug)]
pub struct ConnLimiter {
    max_total: usize,
    max_per_ip: usize,
    counts: Mutex<ConnCounts>,
}

/// Releases the session slot on drop, however the session ends.
#[derive(Debug)]
pub struct ConnGuard {
    limiter: Arc<ConnLimiter>,
    ip: IpAddr,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut c = lock(&self.limiter.counts);
        c.total -= 1;
        if let Some(n) = c.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.per_ip.remove(&self.ip);
            }
        }
    }
}

impl ConnLimiter {
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<Self> {
        Arc::new(Self {
            max_total,
            max_per_ip,
            counts: Mutex::default(),
        })
    }

    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<ConnGuard> {
        let mut c = lock(&self.counts);
        let per = c.per_ip.get(&ip).copied().unwrap_or(0);
        if c.total >= self.max_total || per >= self.max_per_ip {
            return None;
        }
        c.total += 1;
        *c.per_ip.entry(ip).or_insert(0) += 1;
        Some(ConnGuard {
            limiter: self.clone(),
            ip,
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    window_start: Instant,
}

/// Counts AUTH failures per client IP and per username in a fixed window;
/// reaching the maximum locks the key until the window ends. Locking by
/// username too stops a botnet spreading guesses over many IPs, at the cost
/// that an attacker can lock a user out for the window: the usual trade-off
/// (Dovecot's auth_penalty and Postfix's anvil make the same one).
#[derive(Debug)]
pub struct AuthLockout {
    max_failures: u32,
    window: Duration,
    by_ip: Mutex<HashMap<IpAddr, Failures>>,
    by_user: Mutex<HashMap<String, Failures>>,
}

impl AuthLockout {
    pub fn new(max_failures: u32, window: Duration) -> Self {
        Self {
            max_failures,
            window,
            by_ip: Mutex::default(),
            by_user: Mutex::default(),
        }
    }

    fn locked<K: std::hash::Hash + Eq>(
        &self,
        map: &Mutex<HashMap<K, Failures>>,
        k: &K,
        now: Instant,
    ) -> bool {
        lock(map).get(k).is_some_and(|f| {
            f.count >= self.max_failures && now.duration_since(f.window_start) < self.window
        })
    }

    pub fn ip_locked(&self, ip: IpAddr) -> bool {
        self.locked(&self.by_ip, &ip, Instant::now())
    }

    pub fn user_locked(&self, user: &str) -> bool {
        self.locked(&self.by_user, &user.to_owned(), Instant::now())
    }

    fn bump<K: std::hash::Hash + Eq>(&self, map: &Mutex<HashMap<K, Failures>>, k: K, now: Instant) {
        let mut m = lock(map);
        if m.len() > PRUNE_AT {
            m.retain(|_, f| now.duration_since(f.window_start) < self.window);
        }
        let f = m.entry(k).or_insert(Failures {
            count: 0,
            window_start: now,
        });
        if now.duration_since(f.window_start) >= self.window {
            *f = Failures {
                count: 0,
                window_start: now,
            };
        }
        f.count += 1;
    }

    pub fn record_failure(&self, ip: IpAddr, user: &str) {
        let now = Instant::now();
        self.bump(&self.by_ip, ip, now);
        self.bump(&self.by_user, user.to_owned(), now);
    }

    /// A success clears the user's count, not the IP's: one valid account
    /// must not let a client reset its guessing budget for others.
    pub fn record_success(&self, user: &str) {
        lock(&self.by_user).remove(user);
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RateError {
    #[error("user {user} exceeded {limit} messages per hour")]
    Messages { user: String, limit: u32 },
    #[error("user {user} exceeded {limit} recipients per hour")]
    Recipients { user: String, limit: u32 },
}

/// Sliding one-hour window of accepted messages per user.
#[derive(Debug)]
pub struct RateLimiter {
    messages_per_hour: u32,
    recipients_per_hour: u32,
    window: Duration,
    sent: Mutex<HashMap<String, VecDeque<(Instant, u32)>>>,
}

impl RateLimiter {
    pub fn new(messages_per_hour: u32, recipients_per_hour: u32) -> Self {
        Self {
            messages_per_hour,
            recipients_per_hour,
            window: Duration::from_secs(3600),
            sent: Mutex::default(),
        }
    }

    /// Whether `user` may send one more message to `rcpts` recipients now.
    /// Called at MAIL (with 0 recipients) and RCPT, and again before
    /// accepting DATA, since other sessions of the same user may have sent
    /// meanwhile.
    pub fn check(&self, user: &str, rcpts: u32) -> Result<(), RateError> {
        let now = Instant::now();
        let mut m = lock(&self.sent);
        let q = m.entry(user.to_owned()).or_default();
        while q
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) >= self.window)
        {
            q.pop_front();
        }
        let msgs = u32::try_from(q.len()).unwrap_or(u32::MAX);
        if self.messages_per_hour > 0 && msgs >= self.messages_per_hour {
            return Err(RateError::Messages {
                user: user.into(),
                limit: self.messages_per_hour,
            });
        }
        let sent_rcpts: u32 = q.iter().map(|(_, n)| n).sum();
        if self.recipients_per_hour > 0
            && sent_rcpts.saturating_add(rcpts) > self.recipients_per_hour
        {
            return Err(RateError::Recipients {
                user: user.into(),
                limit: self.recipients_per_hour,
            });
        }
        Ok(())
    }

    pub fn record(&self, user: &str, rcpts: u32) {
        let now = Instant::now();
        let mut m = lock(&self.sent);
        if m.len() > PRUNE_AT {
            m.retain(|_, q| {
                q.back()
                    .is_some_and(|(t, _)| now.duration_since(*t) < self.window)
            });
        }
        m.entry(user.into()).or_default().push_back((now, rcpts));
    }
}

/// Everything a session needs to enforce limits.
#[derive(Debug)]
pub struct Limits {
    pub conns: Arc<ConnLimiter>,
    pub auth: AuthLockout,
    pub rate: RateLimiter,
}

impl Limits {
    pub fn new(cfg: &LimitsConfig) -> Self {
        Self {
            conns: ConnLimiter::new(cfg.max_sessions, cfg.max_sessions_per_client),
            auth: AuthLockout::new(cfg.auth_max_failures, secs(cfg.auth_lockout_secs)),
            rate: RateLimiter::new(cfg.messages_per_hour, cfg.recipients_per_hour),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conn_limits() {
        let l = ConnLimiter::new(3, 2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let g1 = l.try_acquire(a).unwrap();
        let _g2 = l.try_acquire(a).unwrap();
        assert!(l.try_acquire(a).is_none(), "per-ip limit");
        let _g3 = l.try_acquire(b).unwrap();
        assert!(l.try_acquire(b).is_none(), "total limit");
        drop(g1);
        assert!(l.try_acquire(a).is_some());
    }

    #[test]
    fn lockout_by_ip_and_user() {
        let l = AuthLockout::new(2, Duration::from_secs(60));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        l.record_failure(a, "u");
        assert!(!l.ip_locked(a) && !l.user_locked("u"));
        l.record_failure(a, "v");
        assert!(l.ip_locked(a));
        assert!(!l.user_locked("u"));
        l.record_failure("192.0.2.9".parse().unwrap(), "u");
        assert!(l.user_locked("u"));
        l.record_success("u");
        assert!(!l.user_locked("u"));
    }

    #[test]
    fn rates() {
        let r = RateLimiter::new(2, 3);
        assert!(r.check("u", 2).is_ok());
        r.record("u", 2);
        assert!(matches!(r.check("u", 2), Err(RateError::Recipients { .. })));
        assert!(r.check("u", 1).is_ok());
        r.record("u", 1);
        assert!(matches!(r.check("u", 0), Err(RateError::Messages { .. })));
        assert!(r.check("other", 3).is_ok());
    }
}
