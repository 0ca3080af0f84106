//! The one owner of the agent's state.
//!
//! The [`Agent`] lives on a thread of its own, and everything else (the
//! control socket, the metrics endpoint, the main loop's checks, signals)
//! talks to it through messages, as Stalwart's and chasquid's servers hand
//! work to tasks. Nothing shares it behind a lock, and its system calls
//! (map writes, table rebuilds, netlink, BPF_PROG_QUERY) never run on the
//! async runtime's workers. Detach is a message that ends in a notification,
//! not a flag someone polls.

use std::time::Instant;

use tokio::sync::{mpsc, oneshot, watch};

use crate::{
    agent::Agent,
    control::protocol::{ErrorCode, Request, Response},
    metrics::Snapshot,
};

enum Message {
    Request(Request, oneshot::Sender<Response>),
    Snapshot(oneshot::Sender<Snapshot>),
    /// The main loop's round: check every attach point, expire temporary
    /// entries. `event`: when the link event that prompted it arrived.
    Tick {
        event: Option<Instant>,
        done: oneshot::Sender<()>,
    },
    RefreshAddresses,
    /// An answer from the DNS task (see `sources::dns`).
    Dns(crate::sources::DnsAnswer),
    /// The allowlist files, as the watcher read them.
    Files(crate::sources::Scan),
    /// SIGHUP.
    Reload(oneshot::Sender<()>),
    /// Stop: hand back the relay, for a clean shutdown.
    Stop(oneshot::Sender<Option<smtpgate_relay::RelayHandle>>),
}

/// A handle on the agent's owner: cheap to clone, one per task.
#[derive(Clone)]
pub struct AgentHandle {
    tx: mpsc::Sender<Message>,
    detached: watch::Receiver<bool>,
}

fn gone() -> Response {
    Response::Error {
        code: ErrorCode::Internal,
        message: "the agent is stopping".into(),
    }
}

impl AgentHandle {
    /// Moves `agent` onto its own thread and returns the handle to it.
    pub fn spawn(agent: Agent) -> std::io::Result<Self> {
        // A small queue: senders wait (backpressure) rather than pile up
        // work the owner cannot keep up with.
        let (tx, rx) = mpsc::channel(64);
        let (detached_tx, detached) = watch::channel(agent.detached());
        std::thread::Builder::new()
            .name("agent".into())
            .spawn(move || own(agent, rx, &detached_tx))?;
        Ok(Self { tx, detached })
    }

    /// Answers one control-socket request.
    pub async fn request(&self, request: Request) -> Response {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Message::Request(request, tx)).await.is_err() {
            return gone();
        }
        rx.await.unwrap_or_else(|_| gone())
    }

    /// The metrics endpoint's view; blocking, for `spawn_blocking`.
    #[must_use]
    pub fn snapshot_blocking(&self) -> Snapshot {
        let (tx, rx) = oneshot::channel();
        if self.tx.blocking_send(Message::Snapshot(tx)).is_err() {
            return Snapshot::default();
        }
        rx.blocking_recv().unwrap_or_default()
    }

    /// One round of the main loop; returns once the owner has done it, so
    /// a hung owner stops the caller's heartbeat.
    pub async fn tick(&self, event: Option<Instant>) {
        let (done, rx) = oneshot::channel();
        if self.tx.send(Message::Tick { event, done }).await.is_ok() {
            let _ = rx.await;
        }
    }

    pub async fn refresh_addresses(&self) {
        let _ = self.tx.send(Message::RefreshAddresses).await;
    }

    pub async fn dns_answer(&self, answer: crate::sources::DnsAnswer) {
        let _ = self.tx.send(Message::Dns(answer)).await;
    }

    pub async fn files_scanned(&self, scan: crate::sources::Scan) {
        let _ = self.tx.send(Message::Files(scan)).await;
    }

    pub async fn reload(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Message::Reload(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Resolves once `detach` has run.
    pub async fn detached(&self) {
        let mut rx = self.detached.clone();
        let _ = rx.wait_for(|d| *d).await;
    }

    #[must_use]
    pub fn is_detached(&self) -> bool {
        *self.detached.borrow()
    }

    /// Stops the owner; returns the relay for its shutdown.
    pub async fn stop(&self) -> Option<smtpgate_relay::RelayHandle> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Message::Stop(tx)).await.ok()?;
        rx.await.ok().flatten()
    }
}

fn own(mut agent: Agent, mut rx: mpsc::Receiver<Message>, detached: &watch::Sender<bool>) {
    while let Some(message) = rx.blocking_recv() {
        match message {
            Message::Request(request, reply) => {
                let response = agent.handle(request);
                let _ = reply.send(response);
                if agent.detached() {
                    detached.send_replace(true);
                }
            }
            Message::Snapshot(reply) => {
                let _ = reply.send(agent.snapshot());
            }
            Message::Tick { event, done } => {
                agent.check_attachments(event);
                agent.expire_entries();
                agent.report_unlogged();
                let _ = done.send(());
            }
            Message::RefreshAddresses => {
                if !agent.detached()
                    && let Err(e) = agent.refresh_local_addresses()
                {
                    tracing::warn!(error = %e, "refreshing local addresses");
                }
            }
            Message::Dns(answer) => agent.apply_dns(answer),
            Message::Files(scan) => agent.apply_files(scan),
            Message::Reload(done) => {
                // Errors are logged and counted by reload itself.
                if !agent.detached() {
                    let _ = agent.reload();
                }
                let _ = done.send(());
            }
            Message::Stop(reply) => {
                let _ = reply.send(agent.take_relay());
                return;
            }
        }
    }
}
