//! smtpgate's authenticated submission relay.
//!
//! Runs without eBPF and without root: the agent hands in listeners (the
//! intercept one comes from the datapath side) or lets the relay bind its
//! own from the config. Start it with [`Relay::start`] inside a tokio
//! runtime; the returned [`RelayHandle`] reloads TLS, flushes the queue,
//! exposes [`RelayStats`] and shuts everything down.
//!
//! What the agent sets beyond the `[relay]` table: [`RelayConfig::delivery_mark`]
//! (not a file key), the SO_MARK its datapath lets out on port 25; every
//! delivery socket carries it. Delivery to MX hosts needs no more than the
//! config: [`RelayConfig::nameservers`] and [`RelayConfig::mx_tls`] ([`MxTls`]).
//! A resolver that cannot be set up fails [`Relay::start`] with
//! [`RelayError::Deliver`] (a [`ResolverError`] inside).
//!
//! Features: `legacy-hashes` (default) verifies bcrypt and SHA-512-crypt
//! hashes from migrated users files; `lab-cert` adds `write_lab_cert`
//! for tests and lab setups.

#![forbid(unsafe_code)]

mod client;
pub mod config;
pub mod dataread;
mod date;
mod deliver;
pub mod dkim;
pub mod dsn;
pub mod headers;
pub mod limits;
mod listener;
mod lookup;
mod mem;
pub mod parse;
pub mod queue;
mod random;
pub mod reply;
mod route;
pub mod safeio;
pub mod session;
pub mod spool;
pub mod stats;
pub mod tls;
pub mod users;
pub mod verifier;

/// Helpers shared with the integration tests (tests/common), one copy.
#[cfg(test)]
#[path = "../tests/common/fast_hash.rs"]
mod test_support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

pub use config::{
    ConfigError, LimitsConfig, MxTls, RelayConfig, RetryConfig, UpstreamConfig, UpstreamTls,
};
pub use lookup::{ResolverError, resolver_builder};
pub use session::ListenerKind;
pub use stats::{LatencySnapshot, RelayStats, StatsSnapshot};
pub use tls::TlsError;
#[cfg(feature = "lab-cert")]
pub use tls::{LabCert, generate_lab_cert, write_lab_cert};

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Dkim(#[from] dkim::DkimError),
    #[error(transparent)]
    Users(#[from] users::UsersError),
    #[error(transparent)]
    Spool(#[from] spool::SpoolError),
    #[error(transparent)]
    Deliver(#[from] deliver::DeliverError),
    #[error(transparent)]
    Verifier(#[from] verifier::VerifyError),
    #[error("{op} {listener:?} listener: {source}")]
    Listen {
        op: &'static str,
        listener: ListenerKind,
        #[source]
        source: std::io::Error,
    },
}

/// Pre-bound sockets from the agent. A `None` falls back to the matching
/// `*_listen` address in the config (and to no listener if that is unset).
#[derive(Debug, Default)]
pub struct Listeners {
    pub submission: Option<std::net::TcpListener>,
    pub submissions: Option<std::net::TcpListener>,
    /// Port-25 connections redirected by the datapath.
    pub intercept: Option<std::net::TcpListener>,
    /// The same for IPv6, when the agent binds one listener per family.
    /// Never bound from the config.
    pub intercept_v6: Option<std::net::TcpListener>,
}

/// Where the listeners ended up (useful with port 0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BoundAddrs {
    pub submission: Option<SocketAddr>,
    pub submissions: Option<SocketAddr>,
    pub intercept: Option<SocketAddr>,
}

pub struct Relay;

pub struct RelayHandle {
    shared: Arc<session::Shared>,
    deliverer: Arc<deliver::Deliverer>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    addrs: BoundAddrs,
}

impl std::fmt::Debug for RelayHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayHandle")
            .field("addrs", &self.addrs)
            .finish_non_exhaustive()
    }
}

fn to_tokio(
    given: Option<std::net::TcpListener>,
    addr: Option<SocketAddr>,
    kind: ListenerKind,
) -> Result<Option<tokio::net::TcpListener>, RelayError> {
    let std_l = match (given, addr) {
        (Some(l), _) => l,
        (None, Some(a)) => std::net::TcpListener::bind(a).map_err(|source| RelayError::Listen {
            op: "binding",
            listener: kind,
            source,
        })?,
        (None, None) => return Ok(None),
    };
    std_l
        .set_nonblocking(true)
        .map_err(|source| RelayError::Listen {
            op: "configuring",
            listener: kind,
            source,
        })?;
    tokio::net::TcpListener::from_std(std_l)
        .map(Some)
        .map_err(|source| RelayError::Listen {
            op: "registering",
            listener: kind,
            source,
        })
}

impl Relay {
    /// Validates the config, loads TLS and users, recovers the spool, starts
    /// delivery and the listeners. Must run inside a tokio runtime.
    pub async fn start(
        config: RelayConfig,
        listeners: Listeners,
    ) -> Result<RelayHandle, RelayError> {
        config.validate()?;
        tracing::info!(config = ?config, "starting relay");
        let config = Arc::new(config);
        let tls = Arc::new(tls::TlsStore::load(&config.tls_cert, &config.tls_key)?);
        let dkim = Arc::new(dkim::DkimStore::load(&config.dkim_dir)?);
        let users = Arc::new(users::UserDb::open(&config.users_file)?);
        let stats = Arc::new(RelayStats::default());
        stats.dkim_keys.store(
            dkim.snapshot().len() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        let spool_dir = config.spool_dir.clone();
        let counters = stats.spool_commits.clone();
        let spool =
            tokio::task::spawn_blocking(move || spool::Spool::open_counted(&spool_dir, counters))
                .await
                .expect("spool open does not panic")?;
        let s2 = spool.clone();
        let recovered = tokio::task::spawn_blocking(move || s2.recover())
            .await
            .expect("recover does not panic")?;
        stats
            .queue_length
            .store(recovered.len() as u64, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(messages = recovered.len(), "queue recovered");

        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let (queued_tx, queued_rx) = mpsc::unbounded_channel();
        let deliverer = deliver::Deliverer::new(
            config.clone(),
            spool.clone(),
            stats.clone(),
            shutdown_rx.clone(),
            queued_tx.clone(),
        )?;
        for rec in recovered {
            let _ = queued_tx.send(rec);
        }
        let mut tasks = vec![tokio::spawn(deliverer.clone().run(queued_rx))];

        let verifier = verifier::Verifier::new(
            config.limits.auth_concurrency,
            config::secs(config.limits.auth_queue_timeout_secs),
        )?;
        let shared = Arc::new(session::Shared {
            limits: limits::Limits::new(&config.limits),
            verifier,
            config: config.clone(),
            tls,
            dkim,
            users,
            stats,
            spool,
            queued: queued_tx,
            shutdown: shutdown_rx,
        });
        let mut addrs = BoundAddrs::default();
        for (given, addr, kind) in [
            (
                listeners.submission,
                config.submission_listen,
                ListenerKind::Submission,
            ),
            (
                listeners.submissions,
                config.submissions_listen,
                ListenerKind::Submissions,
            ),
            (
                listeners.intercept,
                config.intercept_listen,
                ListenerKind::Intercept,
            ),
            (listeners.intercept_v6, None, ListenerKind::Intercept),
        ] {
            let Some(l) = to_tokio(given, addr, kind)? else {
                continue;
            };
            let local = l.local_addr().ok();
            match kind {
                ListenerKind::Submission => addrs.submission = local,
                ListenerKind::Submissions => addrs.submissions = local,
                ListenerKind::Intercept => {
                    addrs.intercept = addrs.intercept.or(local);
                }
            }
            tracing::info!(listener = ?kind, addr = ?local, "listening");
            tasks.push(tokio::spawn(listener::accept_loop(l, kind, shared.clone())));
        }
        Ok(RelayHandle {
            shared,
            deliverer,
            shutdown: shutdown_tx,
            tasks,
            addrs,
        })
    }
}

fn reload_dkim(shared: &session::Shared) -> Result<usize, dkim::DkimError> {
    let n = shared.dkim.reload()?;
    shared
        .stats
        .dkim_keys
        .store(n as u64, std::sync::atomic::Ordering::Relaxed);
    Ok(n)
}

/// Cloneable control surface of a running relay, for the agent's SIGHUP
/// handler, control socket and metrics scrape, which outlive no handle but
/// must not own the one that shuts the relay down.
#[derive(Clone)]
pub struct RelayControl {
    shared: Arc<session::Shared>,
    deliverer: Arc<deliver::Deliverer>,
}

impl std::fmt::Debug for RelayControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayControl").finish_non_exhaustive()
    }
}

impl RelayControl {
    pub fn stats(&self) -> Arc<RelayStats> {
        self.shared.stats.clone()
    }

    pub fn reload_tls(&self) -> Result<(), TlsError> {
        self.shared.tls.reload()
    }

    /// Re-reads the DKIM keys directory; returns how many keys sign now.
    /// On error the old keys stay.
    pub fn reload_dkim(&self) -> Result<usize, dkim::DkimError> {
        reload_dkim(&self.shared)
    }

    pub fn flush(&self) {
        self.deliverer.flush();
    }

    pub fn delete(&self, id: &str) -> Result<(), spool::SpoolError> {
        self.deliverer.delete(id)
    }
}

impl RelayHandle {
    pub fn addrs(&self) -> BoundAddrs {
        self.addrs
    }

    /// A cloneable handle for reload/flush/delete/stats from other tasks.
    pub fn control(&self) -> RelayControl {
        RelayControl {
            shared: self.shared.clone(),
            deliverer: self.deliverer.clone(),
        }
    }

    /// Counters for the agent's metrics module, read at scrape time.
    pub fn stats(&self) -> Arc<RelayStats> {
        self.shared.stats.clone()
    }

    /// Re-reads the certificate and key (SIGHUP). On error the old ones stay.
    pub fn reload_tls(&self) -> Result<(), TlsError> {
        self.shared.tls.reload()
    }

    /// Re-reads the DKIM keys (SIGHUP): new keys sign from the next
    /// message on, removed ones stop. On error the old keys stay.
    pub fn reload_dkim(&self) -> Result<usize, dkim::DkimError> {
        reload_dkim(&self.shared)
    }

    /// Retries every queued message now (`smtpgate queue flush`).
    pub fn flush(&self) {
        self.deliverer.flush();
    }

    /// Deletes a queued message and stops its delivery.
    pub fn delete(&self, id: &str) -> Result<(), spool::SpoolError> {
        self.deliverer.delete(id)
    }

    /// Stops accepting, tells sessions to close (421 at their next command;
    /// a DATA in progress finishes first), stops delivery, and waits up to
    /// `grace` for sessions to end. Queued mail stays on disk.
    pub async fn shutdown_with(self, grace: Duration) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        let deadline = tokio::time::Instant::now() + grace;
        while self
            .shared
            .stats
            .sessions_active
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `shutdown_with` a 10 s grace period.
    pub async fn shutdown(self) {
        self.shutdown_with(Duration::from_secs(10)).await;
    }
}
