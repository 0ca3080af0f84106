//! The control socket: a Unix stream socket, root only, through which the CLI
//! asks the running agent for its state and tells it what to change.

pub mod client;
pub mod protocol;

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
};
use tracing::{debug, warn};

use protocol::{Envelope, ErrorCode, Request, Response, VERSION};

use crate::owner::AgentHandle;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("creating {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "another agent is running: it answers on {path} (stop it first, or give this one another [control] socket)"
    )]
    InUse { path: PathBuf },
    #[error("binding the control socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Longest request line accepted; a request is a few hundred bytes.
const MAX_REQUEST: usize = 64 * 1024;

/// Binds the socket, replacing a stale one, readable and writable by root
/// only (the directory is 0700 as well).
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| ControlError::Dir {
            path: dir.to_owned(),
            source,
        })?;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    }
    // A socket that answers belongs to a running agent: taking it over
    // would leave that agent unreachable (its CLI, its `detach`) while it
    // keeps enforcing. Only a stale socket is replaced.
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(ControlError::InUse {
            path: path.to_owned(),
        });
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ControlError::Bind {
                path: path.to_owned(),
                source,
            });
        }
    }
    let listener = UnixListener::bind(path).map_err(|source| ControlError::Bind {
        path: path.to_owned(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        ControlError::Bind {
            path: path.to_owned(),
            source,
        }
    })?;
    Ok(listener)
}

/// Serves requests until the listener fails.
pub async fn serve(listener: UnixListener, agent: AgentHandle) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let agent = agent.clone();
                tokio::spawn(async move {
                    if let Err(e) = session(stream, agent).await {
                        debug!(error = %e, "control session ended");
                    }
                });
            }
            Err(e) => {
                warn!(error = %e, "control socket accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn session(stream: UnixStream, agent: AgentHandle) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read.take(MAX_REQUEST as u64 * 16)).lines();
    while let Some(line) = lines.next_line().await? {
        let response = match decode(&line) {
            // The agent's owner thread does the work (a few syscalls, or
            // a table rebuild), off the runtime's workers.
            Ok(request) => agent.request(request).await,
            Err(response) => response,
        };
        let mut out = serde_json::to_vec(&response).unwrap_or_default();
        out.push(b'\n');
        write.write_all(&out).await?;
    }
    Ok(())
}

/// A request line, or the error to answer it with: a CLI of another
/// version is told so, rather than "bad request".
fn decode(line: &str) -> Result<Request, Response> {
    let value: serde_json::Value = serde_json::from_str(line).map_err(|e| Response::Error {
        code: ErrorCode::BadRequest,
        message: format!("bad request: {e}"),
    })?;
    let version = value.get("version").and_then(serde_json::Value::as_u64);
    if version != Some(u64::from(VERSION)) {
        let theirs = version.map_or_else(|| "1".to_owned(), |v| v.to_string());
        return Err(Response::Error {
            code: ErrorCode::Version,
            message: format!(
                "the CLI speaks control protocol {theirs}, this agent {VERSION}: use the smtpgate binary of the running agent's version"
            ),
        });
    }
    serde_json::from_value::<Envelope>(value)
        .map(|e| e.request)
        .map_err(|e| Response::Error {
            code: ErrorCode::BadRequest,
            message: format!("bad request: {e}"),
        })
}

use tokio::io::AsyncReadExt as _;

#[cfg(test)]
mod tests {
    use super::*;

    fn code(line: &str) -> Option<ErrorCode> {
        match decode(line) {
            Ok(_) => None,
            Err(Response::Error { code, .. }) => Some(code),
            Err(Response::Ok { .. }) => unreachable!(),
        }
    }

    #[test]
    fn requests_carry_the_protocol_version() {
        let line = serde_json::to_string(&Envelope {
            version: VERSION,
            request: Request::Check {
                ip: "192.0.2.1".parse().unwrap(),
                port: 25,
                to: None,
            },
        })
        .unwrap();
        assert!(matches!(decode(&line), Ok(Request::Check { port: 25, .. })));
        // A CLI from before versioning, and one from the future.
        assert_eq!(code(r#"{"cmd":"status"}"#), Some(ErrorCode::Version));
        assert_eq!(
            code(&format!(
                r#"{{"version":{},"request":{{"cmd":"status"}}}}"#,
                VERSION + 1
            )),
            Some(ErrorCode::Version)
        );
        assert_eq!(code("not json"), Some(ErrorCode::BadRequest));
        assert_eq!(
            code(&format!(
                r#"{{"version":{VERSION},"request":{{"cmd":"bogus"}}}}"#
            )),
            Some(ErrorCode::BadRequest)
        );
    }

    #[test]
    fn the_old_unversioned_error_is_told_apart() {
        // What an agent before versioning answers to anything it cannot read.
        let old = r#"{"result":"error","message":"bad request: unknown field `version`"}"#;
        assert!(serde_json::from_str::<Response>(old).is_err());
    }
}
