//! The control socket's wire format: one JSON request per line, one JSON
//! response per line. Shared by the agent (server) and the CLI (client).

use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    Status,
    Stats,
    /// The verdict a connection from `ip` to `port` would get.
    Check {
        ip: std::net::IpAddr,
        port: u16,
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

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Response {
    Ok { data: serde_json::Value },
    Error { message: String },
}
