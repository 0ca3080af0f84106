//! The control socket's wire format: one JSON request per line, one JSON
//! response per line. Shared by the agent (server) and the CLI (client), so
//! both ends name every field through the same types: a field renamed on
//! one side is a compile error or a clear "unreadable answer", never a `?`
//! printed where a value was expected.
//!
//! Versioned: a request is `{"version": N, "request": {...}}`. An agent that
//! speaks another version answers with `ErrorCode::Version`, and a CLI that
//! gets an answer it cannot read says which side is older.

use std::{net::IpAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

use crate::{
    agent::PointStatus,
    config::{Action, AttachPoint, Mode},
    policy::{Entry, Origin, Prefix},
};

/// This build's protocol version.
pub const VERSION: u32 = 2;

/// What goes over the wire.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    pub version: u32,
    pub request: Request,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    Status,
    Stats,
    /// The verdict a connection from `ip` to `port` would get.
    Check {
        ip: IpAddr,
        port: u16,
        /// The destination, for the destination exceptions; none: one
        /// that is not an exception.
        #[serde(default)]
        to: Option<IpAddr>,
    },
    /// The prefix travels as text so the agent's own parser judges it.
    AllowAdd {
        prefix: String,
        comment: Option<String>,
        /// Unix time the entry leaves the allowlist; None: permanent.
        #[serde(default)]
        expires_unix: Option<u64>,
    },
    AllowRemove {
        prefix: String,
    },
    AllowList,
    Reload,
    Detach,
    /// The sources denied most.
    Top {
        limit: usize,
    },
    /// Retry every queued message now.
    QueueFlush,
    /// Delete a queued message (and stop its delivery).
    QueueDelete {
        id: String,
    },
}

/// Why a request failed, for scripts (`--output json`) and exit statuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request itself is wrong: a bad prefix, a time in the past.
    BadRequest,
    /// What the request names is not there (an entry, a queued message).
    NotFound,
    /// It is already so (an entry already allowlisted).
    Conflict,
    /// A change the agent refused; the running policy is unchanged.
    Refused,
    /// The agent has detached and is stopping.
    Detached,
    /// The CLI and the agent speak different protocol versions.
    Version,
    /// Anything else that went wrong in the agent.
    Internal,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Response {
    /// `data` is the reply type of the request (see [`Request`]'s replies
    /// below), as JSON.
    Ok {
        data: serde_json::Value,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
}

/// `status` and `reload`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusReply {
    pub version: String,
    pub config: String,
    pub mode: Mode,
    pub action: Action,
    pub ports: Vec<u16>,
    pub attachments: Vec<AttachmentReply>,
    pub attach_points: Vec<PointStatus>,
    /// Every attach point enforces, as the kernel last reported it.
    pub enforcing: bool,
    pub pin_dir: PathBuf,
    pub allowlist: AllowlistSize,
    /// Destination prefixes every source may reach (`[[exception]]`).
    #[serde(default)]
    pub exceptions: usize,
    pub reloads: Reloads,
    pub detached: bool,
    /// Names and allowlist files.
    #[serde(default)]
    pub sources: crate::sources::SourcesStatus,
    pub relay: Option<RelayStatus>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AttachmentReply {
    pub point: AttachPoint,
    pub program: String,
    /// The pinned link; none for a classic TC filter (its qdisc holds it).
    pub link: Option<String>,
    pub adopted: bool,
    pub mode: crate::datapath::AttachMode,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct AllowlistSize {
    pub ipv4: usize,
    pub ipv6: usize,
    pub table_nodes: usize,
    pub table_capacity: usize,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Reloads {
    pub ok: u64,
    pub failed: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RelayStatus {
    pub submission: Option<std::net::SocketAddr>,
    pub submissions: Option<std::net::SocketAddr>,
    pub intercept: Option<std::net::SocketAddr>,
    pub queue_length: u64,
    pub sessions_active: u64,
    pub messages_accepted: u64,
    pub messages_delivered: u64,
}

/// `stats`: every counter, summed over CPUs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatsReply {
    pub counters: Vec<CounterReply>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CounterReply {
    pub family: String,
    pub verdict: String,
    pub reason: String,
    pub packets: u64,
    pub connections: u64,
}

/// `check`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckReply {
    pub ip: IpAddr,
    pub port: u16,
    /// allowed, untouched, dropped, rejected, redirected or audited.
    pub verdict: String,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry: Option<Prefix>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Origin>,
}

impl CheckReply {
    /// Whether the policy lets the connection through untouched.
    #[must_use]
    pub fn allowed(&self) -> bool {
        matches!(self.verdict.as_str(), "allowed" | "untouched")
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AllowAddReply {
    pub added: Prefix,
    pub expires_unix: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AllowRemoveReply {
    pub removed: Prefix,
    pub still_allowed_by_config: bool,
    /// Every source that still lists the prefix.
    #[serde(default)]
    pub still_allowed_by: Vec<Origin>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AllowListReply {
    pub entries: Vec<Entry>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DetachReply {
    /// The pin directory.
    pub detached: PathBuf,
    /// Whether there were pins to remove.
    pub pins_removed: bool,
    /// smtpgate's classic TC filters deleted (they are not pinned).
    pub classic_filters_removed: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TopReply {
    pub sources: Vec<TopRow>,
    /// What the counters say was denied (or audited), in all: the same
    /// numbers as `smtpgate stats`.
    #[serde(default)]
    pub denied_connections: u64,
    #[serde(default)]
    pub denied_packets: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TopRow {
    /// None for a process on this host denied before its socket had a
    /// source address.
    pub source: Option<IpAddr>,
    pub attempts: u64,
    pub last_seen_unix: f64,
    pub verdict: String,
    /// For this host's own processes: the cgroup, relative to the cgroup2
    /// root (None for forwarded traffic, or a cgroup that is gone).
    #[serde(default)]
    pub cgroup: Option<String>,
    /// The systemd unit of that cgroup.
    #[serde(default)]
    pub unit: Option<String>,
    /// The process behind the last attempt, where the hook could see it.
    #[serde(default)]
    pub pid: Option<u32>,
    #[serde(default)]
    pub comm: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QueueFlushReply {
    pub flushed: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QueueDeleteReply {
    pub deleted: String,
}
