//! Abuse limits shared by all sessions: concurrent sessions (total, per
//! client network, and a capped share for sessions that have not
//! authenticated yet), AUTH failure lockouts (per user and client network,
//! plus a brake per client network) and per-user sending rates. All in
//! memory: a restart forgives, which is fine for limits meant to slow abuse,
//! not to account for it.
//!
//! A "client network" is an IPv4 address or an IPv6 /64: one IPv6 host
//! usually holds a whole /64, so counting single IPv6 addresses would let
//! one client take every slot.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::config::{LimitsConfig, secs};

/// Maps are pruned of stale entries once they grow past this, so a scan from
/// many addresses cannot grow memory without bound.
const PRUNE_AT: usize = 4096;
/// Past this, even entries inside their window are dropped (all but the
/// locked ones): memory stays bounded whatever the attacker spreads over.
const HARD_CAP: usize = 100_000;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The key limits count a client under: the IPv4 address, or the IPv6 /64.
pub fn client_net(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(a) => IpAddr::V4(a),
        IpAddr::V6(a) => {
            let mut o = a.octets();
            o[8..].fill(0);
            IpAddr::V6(o.into())
        }
    }
}

#[derive(Debug)]
struct Slot {
    net: IpAddr,
    /// Not authenticated yet: counts against the pre-AUTH share and may be
    /// evicted.
    preauth: bool,
    evict: Arc<Notify>,
}

#[derive(Debug, Default)]
struct ConnState {
    next_id: u64,
    /// Ids grow with time, so the map's order is the sessions' age.
    slots: std::collections::BTreeMap<u64, Slot>,
    per_net: HashMap<IpAddr, usize>,
    preauth: usize,
}

impl ConnState {
    fn release(&mut self, id: u64) -> Option<Slot> {
        let slot = self.slots.remove(&id)?;
        if let Some(n) = self.per_net.get_mut(&slot.net) {
            *n -= 1;
            if *n == 0 {
                self.per_net.remove(&slot.net);
            }
        }
        if slot.preauth {
            self.preauth -= 1;
        }
        Some(slot)
    }

    /// The pre-AUTH session to give up for a newcomer: one of the network
    /// holding the most pre-AUTH sessions, the oldest of those. A flood
    /// holds many per network, a real client one or two, so the flood pays;
    /// and a real client authenticates within a round trip or two of
    /// arriving, long before it is the oldest.
    fn victim(&self) -> Option<u64> {
        let mut held: HashMap<IpAddr, usize> = HashMap::new();
        for s in self.slots.values().filter(|s| s.preauth) {
            *held.entry(s.net).or_default() += 1;
        }
        let most = held.values().copied().max()?;
        self.slots
            .iter()
            .find(|(_, s)| s.preauth && held[&s.net] == most)
            .map(|(id, _)| *id)
    }
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("client network already has {max} sessions")]
    PerClient { max: usize },
    #[error("all {max} sessions are authenticated")]
    Full { max: usize },
}

/// Session slots. Every connection starts pre-AUTH; at most
/// `max_preauth` may be so at once, so authenticated users always find
/// `max_total - max_preauth` slots a flood cannot take. When the pre-AUTH
/// share (or everything) is full, a newcomer takes the slot of a pre-AUTH
/// session (see `victim`) instead of being refused: an idle or slow
/// flood then only evicts itself, and cannot keep anyone out.
#[derive(Debug)]
pub struct ConnLimiter {
    max_total: usize,
    max_per_net: usize,
    max_preauth: usize,
    state: Mutex<ConnState>,
}

/// Holds a session slot; releases it on drop, however the session ends.
#[derive(Debug)]
pub struct ConnGuard {
    limiter: Arc<ConnLimiter>,
    id: u64,
    evict: Arc<Notify>,
    since: Instant,
}

impl ConnGuard {
    /// Notified when a newcomer took this (pre-AUTH) session's slot; the
    /// session must close.
    pub fn evicted(&self) -> Arc<Notify> {
        self.evict.clone()
    }

    /// When the slot was taken (the connection's start).
    pub fn since(&self) -> Instant {
        self.since
    }

    /// The session authenticated: it leaves the pre-AUTH share and can no
    /// longer be evicted. False if it was evicted already.
    pub fn authenticated(&self) -> bool {
        let mut st = lock(&self.limiter.state);
        let Some(slot) = st.slots.get_mut(&self.id) else {
            return false;
        };
        if slot.preauth {
            slot.preauth = false;
            st.preauth -= 1;
        }
        true
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        lock(&self.limiter.state).release(self.id);
    }
}

impl ConnLimiter {
    pub fn new(max_total: usize, max_per_net: usize, max_preauth: usize) -> Arc<Self> {
        Arc::new(Self {
            max_total,
            max_per_net,
            max_preauth: max_preauth.clamp(1, max_total),
            state: Mutex::default(),
        })
    }

    /// Admits a new connection from `ip`, evicting a pre-AUTH session if
    /// that is what it takes.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Result<ConnGuard, Refused> {
        let net = client_net(ip);
        let mut st = lock(&self.state);
        if st.per_net.get(&net).copied().unwrap_or(0) >= self.max_per_net {
            return Err(Refused::PerClient {
                max: self.max_per_net,
            });
        }
        if st.slots.len() >= self.max_total || st.preauth >= self.max_preauth {
            let Some(victim) = st.victim() else {
                return Err(Refused::Full {
                    max: self.max_total,
                });
            };
            if let Some(slot) = st.release(victim) {
                slot.evict.notify_one();
            }
        }
        let id = st.next_id;
        st.next_id += 1;
        let evict = Arc::new(Notify::new());
        st.slots.insert(
            id,
            Slot {
                net,
                preauth: true,
                evict: evict.clone(),
            },
        );
        *st.per_net.entry(net).or_insert(0) += 1;
        st.preauth += 1;
        Ok(ConnGuard {
            limiter: self.clone(),
            id,
            evict,
            since: Instant::now(),
        })
    }

    /// (sessions, pre-AUTH sessions) now.
    pub fn counts(&self) -> (usize, usize) {
        let st = lock(&self.state);
        (st.slots.len(), st.preauth)
    }
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    window_start: Instant,
}

/// Counts AUTH failures in a fixed window, keyed two ways:
/// - per (user, client network): reaching `max_per_user` locks that user
///   from that network only. Guessing alice's password from one place must
///   not lock alice out from everywhere else (issue 12: with a per-user
///   lockout, anyone who knew a user name could keep that user from
///   sending mail).
/// - per client network, any user: reaching `max_per_client` locks the
///   whole network out of AUTH (the brake on one place guessing many users).
///
/// The cost is that a botnet guessing one user from many networks gets
/// `max_per_user` tries per network and window; the argon2id cost, the
/// failure delay and the verification semaphore slow that down, but do not
/// lock the account. That is the trade: availability for the real user
/// over a hard cap on distributed guessing.
#[derive(Debug)]
pub struct AuthLockout {
    max_per_user: u32,
    max_per_client: u32,
    window: Duration,
    by_pair: Mutex<HashMap<(String, IpAddr), Failures>>,
    by_client: Mutex<HashMap<IpAddr, Failures>>,
}

impl AuthLockout {
    pub fn new(max_per_user: u32, max_per_client: u32, window: Duration) -> Self {
        Self {
            max_per_user,
            max_per_client,
            window,
            by_pair: Mutex::default(),
            by_client: Mutex::default(),
        }
    }

    fn locked<K: std::hash::Hash + Eq>(
        &self,
        map: &Mutex<HashMap<K, Failures>>,
        k: &K,
        max: u32,
        now: Instant,
    ) -> bool {
        lock(map)
            .get(k)
            .is_some_and(|f| f.count >= max && now.duration_since(f.window_start) < self.window)
    }

    /// The brake: this client network failed too often, whatever the users.
    pub fn client_locked(&self, ip: IpAddr) -> bool {
        self.locked(
            &self.by_client,
            &client_net(ip),
            self.max_per_client,
            Instant::now(),
        )
    }

    /// `user` failed too often from this client network.
    pub fn user_locked(&self, user: &str, ip: IpAddr) -> bool {
        self.locked(
            &self.by_pair,
            &(user.to_owned(), client_net(ip)),
            self.max_per_user,
            Instant::now(),
        )
    }

    fn bump<K: std::hash::Hash + Eq>(
        &self,
        map: &Mutex<HashMap<K, Failures>>,
        k: K,
        max: u32,
        now: Instant,
    ) {
        let mut m = lock(map);
        if m.len() > PRUNE_AT {
            m.retain(|_, f| now.duration_since(f.window_start) < self.window);
        }
        if m.len() > HARD_CAP {
            m.retain(|_, f| f.count >= max);
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
        let net = client_net(ip);
        self.bump(&self.by_client, net, self.max_per_client, now);
        self.bump(
            &self.by_pair,
            (user.to_owned(), net),
            self.max_per_user,
            now,
        );
    }

    /// A success clears the user's count from that network, not the
    /// network's brake: one valid account must not let a client reset its
    /// guessing budget for others.
    pub fn record_success(&self, user: &str, ip: IpAddr) {
        lock(&self.by_pair).remove(&(user.to_owned(), client_net(ip)));
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
    /// Session slots of the submission listeners (587 and 465).
    pub conns: Arc<ConnLimiter>,
    /// Session slots of the intercept listener: a pool of its own, so that
    /// redirected port-25 connections (mostly bots that never authenticate)
    /// cannot take, nor count against a client's share of, the slots of
    /// users submitting on 587/465 (issue 11).
    pub intercept_conns: Arc<ConnLimiter>,
    pub auth: AuthLockout,
    pub rate: RateLimiter,
}

impl Limits {
    pub fn new(cfg: &LimitsConfig) -> Self {
        Self {
            conns: ConnLimiter::new(
                cfg.max_sessions,
                cfg.max_sessions_per_client,
                cfg.max_preauth_sessions(),
            ),
            intercept_conns: ConnLimiter::new(
                cfg.intercept_max_sessions,
                cfg.intercept_max_sessions_per_client,
                cfg.intercept_max_preauth_sessions(),
            ),
            auth: AuthLockout::new(
                cfg.auth_max_failures,
                cfg.auth_max_failures_per_client,
                secs(cfg.auth_lockout_secs),
            ),
            rate: RateLimiter::new(cfg.messages_per_hour, cfg.recipients_per_hour),
        }
    }

    /// The session pool a listener's connections take their slots from.
    pub fn pool(&self, kind: crate::session::ListenerKind) -> &Arc<ConnLimiter> {
        match kind {
            crate::session::ListenerKind::Intercept => &self.intercept_conns,
            crate::session::ListenerKind::Submission
            | crate::session::ListenerKind::Submissions => &self.conns,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn conn_limits_per_client_network() {
        let l = ConnLimiter::new(10, 2, 10);
        let g1 = l.try_acquire(ip("192.0.2.1")).unwrap();
        let _g2 = l.try_acquire(ip("192.0.2.1")).unwrap();
        assert_eq!(
            l.try_acquire(ip("192.0.2.1")).unwrap_err(),
            Refused::PerClient { max: 2 }
        );
        // Another IPv4 address is another client.
        let _g3 = l.try_acquire(ip("192.0.2.2")).unwrap();
        drop(g1);
        assert!(l.try_acquire(ip("192.0.2.1")).is_ok());
        // IPv6: one /64 is one client, whatever the interface ids...
        let _a = l.try_acquire(ip("2001:db8:1:2::1")).unwrap();
        let _b = l.try_acquire(ip("2001:db8:1:2:ffff::9")).unwrap();
        assert!(l.try_acquire(ip("2001:db8:1:2::3")).is_err());
        // ...and the next /64 is another.
        assert!(l.try_acquire(ip("2001:db8:1:3::1")).is_ok());
        // IPv4-mapped IPv6 counts as the IPv4 address.
        assert_eq!(client_net(ip("::ffff:192.0.2.1")), ip("192.0.2.1"));
    }

    #[test]
    fn preauth_share_and_eviction() {
        // 4 slots, at most 2 pre-AUTH.
        let l = ConnLimiter::new(4, 4, 2);
        let a1 = l.try_acquire(ip("198.51.100.1")).unwrap();
        let a2 = l.try_acquire(ip("198.51.100.2")).unwrap();
        assert!(a1.authenticated() && a2.authenticated());
        assert_eq!(l.counts(), (2, 0));
        let f1 = l.try_acquire(ip("203.0.113.1")).unwrap();
        let f2 = l.try_acquire(ip("203.0.113.1")).unwrap();
        assert_eq!(l.counts(), (4, 2));
        // Full: a newcomer evicts the oldest pre-AUTH session of the
        // network that holds the most; never an authenticated one.
        let user = l.try_acquire(ip("192.0.2.10")).unwrap();
        assert_eq!(l.counts(), (4, 2));
        let evicted = f1.evicted();
        assert!(
            futures_ready(evicted.notified()),
            "the oldest flood session must be told to go"
        );
        assert!(
            !f1.authenticated(),
            "an evicted session cannot authenticate"
        );
        assert!(!futures_ready(f2.evicted().notified()));
        // The newcomer's own network holds one; the flood's still holds one:
        // the next newcomer takes the flood's (older) slot, not the user's.
        let _n = l.try_acquire(ip("192.0.2.11")).unwrap();
        assert!(futures_ready(f2.evicted().notified()));
        assert!(!futures_ready(user.evicted().notified()));
        assert!(user.authenticated());
        drop((f1, f2));
        assert_eq!(l.counts(), (4, 1));
        // Everyone authenticated: nothing to evict, refused.
        let l = ConnLimiter::new(2, 2, 2);
        let x = l.try_acquire(ip("192.0.2.1")).unwrap();
        let y = l.try_acquire(ip("192.0.2.2")).unwrap();
        assert!(x.authenticated() && y.authenticated());
        assert_eq!(
            l.try_acquire(ip("192.0.2.3")).unwrap_err(),
            Refused::Full { max: 2 }
        );
        // The pre-AUTH share is capped even with free slots.
        let l = ConnLimiter::new(10, 10, 3);
        let g: Vec<_> = (1..=3)
            .map(|i| l.try_acquire(ip(&format!("192.0.2.{i}"))).unwrap())
            .collect();
        let _more = l.try_acquire(ip("192.0.2.9")).unwrap();
        assert_eq!(l.counts(), (3, 3));
        assert!(futures_ready(g[0].evicted().notified()));
    }

    /// Whether a future is ready at its first poll.
    fn futures_ready<F: std::future::Future>(f: F) -> bool {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut f = std::pin::pin!(f);
        f.as_mut().poll(&mut cx).is_ready()
    }

    #[test]
    fn intercept_listener_has_its_own_pool() {
        use crate::session::ListenerKind;
        let cfg = LimitsConfig {
            max_sessions: 4,
            max_sessions_per_client: 2,
            intercept_max_sessions: 3,
            intercept_max_sessions_per_client: 3,
            // No eviction in the way: this is about which pool counts.
            preauth_sessions_percent: 100,
            ..LimitsConfig::default()
        };
        let l = Limits::new(&cfg);
        let me = ip("192.0.2.7");
        // The intercept pool full from one address...
        let held: Vec<_> = (0..3)
            .map(|_| l.pool(ListenerKind::Intercept).try_acquire(me).unwrap())
            .collect();
        assert!(l.pool(ListenerKind::Intercept).try_acquire(me).is_err());
        // ...leaves that same address its whole share on 587/465.
        let a = l.pool(ListenerKind::Submission).try_acquire(me).unwrap();
        let _b = l.pool(ListenerKind::Submissions).try_acquire(me).unwrap();
        assert_eq!(
            l.pool(ListenerKind::Submission)
                .try_acquire(me)
                .unwrap_err(),
            Refused::PerClient { max: 2 }
        );
        assert_eq!(l.conns.counts().0, 2);
        assert_eq!(l.intercept_conns.counts().0, 3);
        drop((held, a));
    }

    #[test]
    fn lockout_per_user_and_network_with_client_brake() {
        let l = AuthLockout::new(2, 3, Duration::from_secs(60));
        let a = ip("192.0.2.1");
        let b = ip("198.51.100.1");
        l.record_failure(a, "alice");
        assert!(!l.user_locked("alice", a));
        l.record_failure(a, "alice");
        // Locked from a, not from b: guessing cannot lock alice out.
        assert!(l.user_locked("alice", a));
        assert!(!l.user_locked("alice", b));
        assert!(!l.user_locked("bob", a));
        assert!(!l.client_locked(a));
        // The brake: a third failure from a, another user: all of a is out.
        l.record_failure(a, "carol");
        assert!(l.client_locked(a) && !l.client_locked(b));
        // A success clears the pair, not the brake.
        l.record_success("alice", a);
        assert!(!l.user_locked("alice", a));
        assert!(l.client_locked(a));
        // The /64 is the network.
        l.record_failure(ip("2001:db8::1"), "dave");
        l.record_failure(ip("2001:db8::2"), "dave");
        assert!(l.user_locked("dave", ip("2001:db8::ffff")));
        assert!(!l.user_locked("dave", ip("2001:db8:0:1::1")));
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
