//! `smtpgate run`: the agent.
//!
//! Stopping the agent (SIGTERM, SIGINT, a crash, kill -9) does not stop
//! enforcement: the programs stay attached through their pinned links.
//! Only `smtpgate detach` stops it.

use std::{path::PathBuf, sync::Arc};

use anyhow::Context as _;
use smtpgate::{
    agent::{Agent, load_config},
    config::Action,
    control,
    datapath::redirect,
    metrics, notify,
    owner::AgentHandle,
};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info};

use smtpgate::heartbeat::Heartbeat;

#[derive(clap::Args)]
pub struct Args {
    /// Config file. Without it, the built-in default config is used: it
    /// refuses outbound port 25 from this host's own processes, except over
    /// loopback.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Log format: auto (journald under systemd, text otherwise), text,
    /// json or journald.
    #[arg(long, value_enum, default_value_t, env = "SMTPGATE_LOG_FORMAT")]
    pub log_format: super::LogFormat,
}

pub fn execute(args: Args) -> anyhow::Result<()> {
    let config = load_config(args.config.as_deref()).with_context(|| {
        format!(
            "loading {}",
            args.config
                .as_ref()
                .map_or("the built-in config".into(), |p| p.display().to_string())
        )
    })?;
    let origin = args
        .config
        .as_ref()
        .map_or("built-in default".to_owned(), |p| p.display().to_string());
    info!(config = %serde_json::to_string(&config)?, %origin, "effective config");

    raise_memlock_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // Sockets first: if another agent owns them, fail before touching the
    // datapath.
    let socket = config.control_socket.clone();
    let listener = rt.block_on(async { control::bind(&socket) })?;
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(
            rt.block_on(tokio::net::TcpListener::bind(addr))
                .with_context(|| format!("metrics.listen: cannot listen on {addr}"))?,
        ),
        None => None,
    };
    let relay_config = config.relay.clone();
    let mut agent = Agent::start(config, args.config.clone())?;
    if relay_config.enabled {
        // The intercept listener exists only for redirect: with any other
        // action it would be one more port open to the world for nothing.
        // It is bound here, not by the relay: the datapath needs it too
        // (redirect steers connections into it), and the relay needs
        // nothing of eBPF.
        let mut relay_config = relay_config;
        let intercept = if agent.config().action == Action::Redirect {
            // Loopback only (the config refuses anything else), and by
            // default on a port the kernel picks, which cannot clash with a
            // local service (10025 is Postfix's content-filter port).
            let port = relay_config.intercept_listen.map_or(0, |a| a.port());
            let intercept = redirect::intercept_listeners(port).with_context(|| {
                format!(
                    "binding the relay's intercept listeners on 127.0.0.1:{port} and [::1]:{port}"
                )
            })?;
            agent.set_relay_listeners(&intercept)?;
            info!(
                v4 = %intercept.v4.local_addr()?,
                v6 = ?intercept.v6.as_ref().and_then(|l| l.local_addr().ok()),
                "intercept listeners bound on loopback"
            );
            Some(intercept)
        } else {
            None
        };
        relay_config.intercept_listen = None;
        // The relay's delivery sockets carry the mark the programs let out
        // on port 25 (with the agent's cgroup): see RELAY_MARK.
        relay_config.delivery_mark = Some(smtpgate_common::RELAY_MARK);
        let listeners = smtpgate_relay::Listeners {
            intercept_v6: intercept
                .as_ref()
                .and_then(|i| i.v6.as_ref().map(|l| l.try_clone()))
                .transpose()?,
            intercept: intercept.as_ref().map(|i| i.v4.try_clone()).transpose()?,
            ..Default::default()
        };
        let relay = rt
            .block_on(smtpgate_relay::Relay::start(relay_config, listeners))
            .context("starting the relay")?;
        agent.set_relay(relay);
    }
    let c = agent.config();
    info!(mode = ?c.mode, action = ?c.action, ports = ?c.ports, socket = %socket.display(), "enforcing");
    // The first look before anything reports ready: a point that went down
    // between attach and now is DOWN from the first scrape on.
    agent.check_attachments(None);
    let events = agent.take_events();
    let source_watches = agent.take_source_watches();
    let agent = AgentHandle::spawn(agent).context("starting the agent's thread")?;
    if let Some(w) = source_watches {
        // Names re-resolved at their TTL, allowlist files watched.
        let _guard = rt.enter();
        smtpgate::sources::spawn(w, agent.clone());
    }
    let heartbeat = Heartbeat::new();
    heartbeat.beat();
    if let Some(l) = metrics_listener {
        let agent = agent.clone();
        let source: metrics::SnapshotFn = Arc::new(move || agent.snapshot_blocking());
        let heartbeat = heartbeat.clone();
        rt.spawn(async move {
            if let Err(e) = metrics::serve(l, source, heartbeat).await {
                error!(error = %e, "metrics endpoint failed");
            }
        });
    }
    if let Some((ring, next)) = events {
        rt.spawn(smtpgate::events::log_denials(ring, next));
    }
    notify::ready("enforcing");
    let result = rt.block_on(async {
        tokio::select! {
            () = control::serve(listener, agent.clone()) => Ok(()),
            () = refresh_local_addresses(agent.clone()) => Ok(()),
            r = signals(agent.clone()) => r,
            () = stopped_by_detach(agent.clone()) => Ok(()),
            () = watch_attachments(agent.clone(), heartbeat.clone()) => Ok(()),
        }
    });
    notify::stopping();
    let relay = rt.block_on(agent.stop());
    if let Some(relay) = relay {
        // Sessions get 421 and queued mail stays on disk for the next start.
        rt.block_on(relay.shutdown());
    }
    let _ = std::fs::remove_file(&socket);
    if agent.is_detached() {
        info!("stopped after detach");
    } else {
        info!("stopping; the programs stay attached (pinned): `smtpgate detach` removes them");
    }
    result
}

/// SIGHUP reloads; SIGTERM and SIGINT stop the agent (not enforcement).
async fn signals(agent: AgentHandle) -> anyhow::Result<()> {
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = hup.recv() => agent.reload().await,
            _ = term.recv() => { info!("SIGTERM"); return Ok(()); }
            _ = int.recv() => { info!("SIGINT"); return Ok(()); }
        }
    }
}

/// Once `detach` has run, there is nothing left to enforce: stop.
async fn stopped_by_detach(agent: AgentHandle) {
    agent.detached().await;
    // Let the control session write its answer first.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
}

/// Keeps the cgroup connect hooks' view of this host's addresses current.
async fn refresh_local_addresses(agent: AgentHandle) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    loop {
        tick.tick().await;
        agent.refresh_addresses().await;
    }
}

/// How often every attach point is checked against the kernel when no link
/// event says anything changed: the bound on how long a silent loss of
/// enforcement (a link removed by hand, a missed event) goes unreported.
const CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The main loop: checks every attach point against the kernel once per
/// [`CHECK_EVERY`] and at once on every link event (an interface created,
/// deleted or changed), re-attaching what came back; then beats the
/// heartbeat that `/healthz` reads.
async fn watch_attachments(agent: AgentHandle, heartbeat: Heartbeat) {
    let mut events = match rtnetlink::new_multicast_connection(&[rtnetlink::MulticastGroup::Link]) {
        Ok((conn, _handle, messages)) => {
            tokio::spawn(conn);
            Some(messages)
        }
        Err(e) => {
            error!(error = %e, "cannot listen for link events; attach points are checked every second only");
            None
        }
    };
    let watchdog = notify::watchdog_enabled();
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let event = tokio::select! {
            _ = tick.tick() => None,
            Some(m) = next_event(&mut events) => Some((std::time::Instant::now(), m)),
        };
        if let Some((_, what)) = &event {
            tracing::debug!(event = %what, "link event");
            // A burst (an interface and its peer, several flags) is one check.
            if let Some(rx) = events.as_mut() {
                while rx.try_recv().is_ok() {}
            }
        }
        agent.tick(event.map(|(t, _)| t)).await;
        heartbeat.beat();
        if watchdog {
            notify::watchdog();
        }
    }
}

type LinkEvents = futures_channel::mpsc::UnboundedReceiver<(
    rtnetlink::packet_core::NetlinkMessage<rtnetlink::packet_route::RouteNetlinkMessage>,
    rtnetlink::sys::SocketAddr,
)>;

/// The next link event, described; never, without a netlink socket or
/// after it closed.
async fn next_event(events: &mut Option<LinkEvents>) -> Option<String> {
    use futures_util::StreamExt as _;
    use rtnetlink::{
        packet_core::NetlinkPayload,
        packet_route::{RouteNetlinkMessage as M, link::LinkAttribute},
    };
    let Some(rx) = events.as_mut() else {
        return std::future::pending().await;
    };
    let Some((message, _)) = rx.next().await else {
        error!("the link event socket closed; attach points are checked every second only");
        *events = None;
        return std::future::pending().await;
    };
    let (kind, link) = match &message.payload {
        NetlinkPayload::InnerMessage(M::NewLink(l)) => ("new", l),
        NetlinkPayload::InnerMessage(M::DelLink(l)) => ("deleted", l),
        _ => return Some("other".into()),
    };
    let name = link
        .attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.as_str()),
            _ => None,
        })
        .unwrap_or("?");
    Some(format!("{kind} link {name} (index {})", link.header.index))
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK, whose default
/// (8 MiB) is far too small for the allowlist tables. Later kernels charge
/// the memory cgroup instead, and this changes nothing. Best effort: under
/// systemd, LimitMEMLOCK= has set it already.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "raising RLIMIT_MEMLOCK");
    }
}
