//! `smtpgate status`: what the running agent enforces, and where.

use smtpgate::{
    config::AttachPoint,
    control::protocol::{Request, StatusReply},
    datapath::AttachMode,
    sources::SourcesStatus,
};

use super::client::ClientArgs;

pub fn execute(client: &ClientArgs) -> anyhow::Result<()> {
    let d: StatusReply = client.call(&Request::Status)?;
    client.print(&d, |d| {
        println!("smtpgate {} (config: {})", d.version, d.config);
        println!("mode:      {}", super::as_written(&d.mode));
        println!("action:    {}", super::as_written(&d.action));
        println!("ports:     {:?}", d.ports);
        let a = &d.allowlist;
        println!(
            "allowlist: {} IPv4, {} IPv6 entries ({} of {} table nodes)",
            a.ipv4, a.ipv6, a.table_nodes, a.table_capacity
        );
        if d.exceptions > 0 {
            println!(
                "exceptions: {} destination prefixes any source may reach",
                d.exceptions
            );
        }
        for point in &d.attach_points {
            let (hook, target) = hook_and_target(&point.point);
            if let Some(down) = &point.down {
                let ago = (now_unix() - down.since_unix).max(0.0);
                println!(
                    "attached:  {hook} {target}: DOWN for {ago:.0} s: {} (SMTP egress through it is NOT filtered)",
                    down.reason
                );
                continue;
            }
            // A TC program says how it is attached (tcx or classic): the
            // two behave alike, but an admin debugging with `tc` or
            // `bpftool` needs to know where to look.
            let programs: Vec<String> = d
                .attachments
                .iter()
                .filter(|a| a.point == point.point)
                .map(|a| match a.mode {
                    AttachMode::Tcx | AttachMode::Classic => format!("{}, {}", a.program, a.mode),
                    AttachMode::CgroupLink => a.program.clone(),
                })
                .collect();
            let reattached = match point.reattaches {
                0 => String::new(),
                n => format!(
                    ", re-attached {n}x{}",
                    point
                        .last_reattach_gap_ms
                        .map_or(String::new(), |g| format!(", last {g:.1} ms after the link event"))
                ),
            };
            println!("attached:  {hook} {target}: UP ({}{reattached})", programs.join(", "));
        }
        print_sources(&d.sources);
        if !d.enforcing && !d.detached {
            println!("WARNING:   not every attach point enforces: see above; /readyz says 503");
        }
        if d.detached {
            println!("DETACHED:  the agent has detached and enforces nothing");
        }
    });
    Ok(())
}

/// One line per name and per allowlist file: what it allows now, and
/// what is wrong with it, if anything.
fn print_sources(s: &SourcesStatus) {
    let now = now_unix();
    let ago = |t: f64| humantime::format_duration(secs(now - t)).to_string();
    for n in &s.names {
        let listed: Vec<String> = n.listed_in.iter().map(ToString::to_string).collect();
        let addrs = if n.addresses.is_empty() {
            "no addresses".to_owned()
        } else {
            n.addresses
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let when = match (n.last_success_unix, n.restored) {
            (None, _) => "never resolved, allows nothing".to_owned(),
            (Some(t), false) => format!("resolved {} ago", ago(t)),
            (Some(t), true) => format!(
                "from the state file, resolved {} ago by an earlier agent",
                ago(t)
            ),
        };
        let next = n
            .next_unix
            .map_or(String::new(), |t| format!(", next in {}", left(t - now)));
        println!(
            "name:      {} ({}): {addrs} ({when}{next})",
            n.name,
            listed.join(", ")
        );
        if let Some(e) = &n.error {
            let since = n
                .failing_since_unix
                .map_or(String::new(), |t| format!(" for {}", ago(t)));
            let failures = match n.failures {
                1 => "1 failure".to_owned(),
                k => format!("{k} failures"),
            };
            println!(
                "           FAILING{since} ({failures}): {e}; keeping the last good addresses"
            );
        }
    }
    for f in &s.files {
        let loaded = f.loaded_unix.map_or_else(
            || "never read good".to_owned(),
            |t| format!("read {} ago", ago(t)),
        );
        match &f.error {
            None => println!(
                "file:      {}: {} entries ({loaded})",
                f.path.display(),
                f.entries
            ),
            Some(e) => {
                let since = f
                    .error_since_unix
                    .map_or(String::new(), |t| format!(" for {}", ago(t)));
                println!(
                    "file:      {}: BROKEN{since}: {e}; keeping its last good {} entries ({loaded})",
                    f.path.display(),
                    f.entries
                );
            }
        }
    }
    for e in &s.dir_errors {
        println!("files:     {e}");
    }
    if s.files.is_empty() && s.dir_errors.is_empty() && !s.patterns.is_empty() {
        println!("files:     none match {}", s.patterns.join(", "));
    }
    if let Some(e) = &s.install_error {
        println!("WARNING:   the sources' last change is not installed: {e}");
    }
}

/// Whole seconds: a status line has no use for milliseconds.
fn secs(s: f64) -> std::time::Duration {
    std::time::Duration::from_secs(s.max(0.0).round() as u64)
}

fn left(s: f64) -> String {
    humantime::format_duration(secs(s)).to_string()
}

fn hook_and_target(point: &AttachPoint) -> (&'static str, String) {
    match point {
        AttachPoint::TcIngress { interface } => ("tc-ingress", interface.clone()),
        AttachPoint::TcEgress { interface } => ("tc-egress", interface.clone()),
        AttachPoint::Cgroup { path } => (
            "cgroup",
            path.as_ref()
                .map_or_else(|| "<root>".to_owned(), |p| p.display().to_string()),
        ),
    }
}

fn now_unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
