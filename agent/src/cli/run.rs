//! `smtpgate run`: the agent.

use std::path::PathBuf;

use anyhow::Context as _;
use smtpgate::{
    config::Config,
    datapath::{Datapath, table_capacity},
    policy::Allowlist,
};
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

    let allowlist = Allowlist::from_config(&config.allowlist);
    let table = allowlist.compile();
    let capacity = table_capacity(table.len(), config.table_nodes);
    let mut dp = Datapath::load(capacity).context("loading the datapath")?;
    // The whole policy is in the maps before the first attach, so there is no
    // moment where a program runs with a half-written policy.
    dp.set_ports(&config.ports)?;
    dp.set_action(config.mode, config.action)?;
    dp.install(&table)?;
    let (v4, v6) = allowlist.count_by_family();
    info!(
        ipv4 = v4,
        ipv6 = v6,
        nodes = table.len(),
        capacity,
        "allowlist installed"
    );
    for point in &config.attach {
        dp.attach(point)
            .with_context(|| format!("attaching to {point}"))?;
        info!(%point, "attached");
    }
    info!(mode = ?config.mode, action = ?config.action, ports = ?config.ports, "enforcing");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(shutdown_signal())?;
    info!("stopping: detaching");
    drop(dp);
    Ok(())
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
