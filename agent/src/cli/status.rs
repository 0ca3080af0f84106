//! `smtpgate status`: what the running agent enforces, and where.

use smtpgate::{
    config::AttachPoint,
    control::protocol::{Request, StatusReply},
    datapath::AttachMode,
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
        if !d.enforcing && !d.detached {
            println!("WARNING:   not every attach point enforces: see above; /readyz says 503");
        }
        if d.detached {
            println!("DETACHED:  the agent has detached and enforces nothing");
        }
    });
    Ok(())
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
