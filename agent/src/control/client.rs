//! The CLI's side of the control socket.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::de::DeserializeOwned;

use super::protocol::{Envelope, ErrorCode, Request, Response, VERSION};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no agent is running: {path} does not exist (start one with `smtpgate run`)")]
    NotRunning { path: PathBuf },
    #[error("no agent answers on {path}: it is stale (start one with `smtpgate run`)")]
    Refused { path: PathBuf },
    #[error("permission denied on {path}: the control socket is root only")]
    Permission { path: PathBuf },
    #[error("talking to the agent on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent sent an unreadable answer: {0}")]
    Protocol(String),
    #[error("{message}")]
    Agent { code: ErrorCode, message: String },
}

/// Sends one request and returns the agent's typed reply.
pub fn call<R: DeserializeOwned>(path: &Path, request: &Request) -> Result<R, ClientError> {
    let io = |source: std::io::Error| ClientError::Io {
        path: path.to_owned(),
        source,
    };
    let stream = UnixStream::connect(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ClientError::NotRunning {
            path: path.to_owned(),
        },
        std::io::ErrorKind::ConnectionRefused => ClientError::Refused {
            path: path.to_owned(),
        },
        std::io::ErrorKind::PermissionDenied => ClientError::Permission {
            path: path.to_owned(),
        },
        _ => io(e),
    })?;
    // Replacing a 1M-entry allowlist takes seconds; nothing takes minutes.
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(io)?;
    let envelope = Envelope {
        version: VERSION,
        request: request.clone(),
    };
    let mut line =
        serde_json::to_vec(&envelope).map_err(|e| ClientError::Protocol(e.to_string()))?;
    line.push(b'\n');
    (&stream).write_all(&line).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer).map_err(io)?;
    match serde_json::from_str::<Response>(&answer) {
        Ok(Response::Ok { data }) => serde_json::from_value(data).map_err(|e| {
            ClientError::Protocol(format!(
                "{e} (is the agent another version than this CLI? `smtpgate --version`)"
            ))
        }),
        Ok(Response::Error { code, message }) => Err(ClientError::Agent { code, message }),
        // An agent older than the versioned protocol answers without a code.
        Err(_) if answer.contains("\"result\":\"error\"") && !answer.contains("\"code\"") => {
            Err(ClientError::Agent {
                code: ErrorCode::Version,
                message: format!(
                    "the agent speaks an older control protocol than this CLI ({VERSION}): use the smtpgate binary of the running agent's version"
                ),
            })
        }
        Err(e) => Err(ClientError::Protocol(format!("{e}: {answer:?}"))),
    }
}
