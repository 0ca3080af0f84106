//! Lab/test runner for the relay alone (no agent, no eBPF, no root):
//! `relay-lab CONFIG.toml` starts the relay from a standalone `[relay]`
//! table, prints one `READY submission=... submissions=... intercept=...`
//! line on stdout, and runs until SIGINT/SIGTERM. The crash test kills it
//! with SIGKILL mid-load; the loadgen example targets it.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use smtpgate_relay::{Listeners, Relay, RelayConfig};

fn fmt(a: Option<std::net::SocketAddr>) -> String {
    a.map_or_else(|| "-".into(), |a| a.to_string())
}

#[tokio::main]
async fn main() -> ExitCode {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: relay-lab CONFIG.toml");
        return ExitCode::from(2);
    };
    let cfg = match std::fs::read_to_string(&path)
        .map_err(|e| e.to_string())
        .and_then(|t| RelayConfig::from_toml(&t).map_err(|e| e.to_string()))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("relay-lab: {path}: {e}");
            return ExitCode::from(2);
        }
    };
    let relay = match Relay::start(cfg, Listeners::default()).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("relay-lab: {e}");
            return ExitCode::FAILURE;
        }
    };
    let a = relay.addrs();
    println!(
        "READY submission={} submissions={} intercept={}",
        fmt(a.submission),
        fmt(a.submissions),
        fmt(a.intercept)
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    relay.shutdown().await;
    ExitCode::SUCCESS
}
