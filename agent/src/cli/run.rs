//! `smtpgate run`: the agent.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use smtpgate::{agent::Agent, config::Config, control, metrics};
use tracing::info;

#[derive(clap::Args)]
pub struct Args {
    /// Config file. Without it, the built-in default config is used: it
    /// refuses outbound port 25 from this host's own processes, except over
    /// loopback.
    #[arg(long, short)]
    config: Option<PathBuf>,
}

pub fn execute(args: Args) -> anyhow::Result<()> {
    let config = match &args.config {
        Some(path) => Config::load(path).with_context(|| format!("loading {}", path.display()))?,
        None => Config::default_config()?,
    };
    let origin = args
        .config
        .as_ref()
        .map_or("built-in default".to_owned(), |p| p.display().to_string());
    info!(config = %serde_json::to_string(&config)?, %origin, "effective config");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // Bind the control socket first: if another agent owns it, fail before
    // touching the datapath.
    let socket = config.control_socket.clone();
    let listener = rt.block_on(async { control::bind(&socket) })?;
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(
            rt.block_on(tokio::net::TcpListener::bind(addr))
                .with_context(|| format!("metrics.listen: cannot listen on {addr}"))?,
        ),
        None => None,
    };
    let agent = Agent::start(config, origin).context("starting the datapath")?;
    let c = agent.config();
    info!(mode = ?c.mode, action = ?c.action, ports = ?c.ports, socket = %socket.display(), "enforcing");
    let agent = Arc::new(Mutex::new(agent));

    if let Some(l) = metrics_listener {
        let agent = agent.clone();
        let source: metrics::SnapshotFn = Arc::new(move || {
            agent
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .snapshot()
        });
        rt.spawn(async move {
            if let Err(e) = metrics::serve(l, source).await {
                tracing::error!(error = %e, "metrics endpoint failed");
            }
        });
    }
    rt.block_on(async {
        tokio::select! {
            () = control::serve(listener, agent.clone()) => {}
            () = refresh_local_addresses(agent.clone()) => {}
            r = shutdown_signal() => r?,
        }
        anyhow::Ok(())
    })?;
    info!("stopping: detaching");
    let _ = std::fs::remove_file(&socket);
    drop(agent);
    Ok(())
}

/// Keeps the cgroup connect hooks' view of this host's addresses current.
async fn refresh_local_addresses(agent: Arc<Mutex<Agent>>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    loop {
        tick.tick().await;
        let mut agent = agent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(e) = agent.refresh_local_addresses() {
            tracing::warn!(error = %e, "refreshing local addresses");
        }
    }
}

async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM"),
        _ = int.recv() => info!("SIGINT"),
    }
    Ok(())
}
