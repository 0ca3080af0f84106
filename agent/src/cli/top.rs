//! `smtpgate top`: the sources denied most, from the kernel's bounded LRU
//! table: the first place to look when a host starts trying to spam.

use smtpgate::control::protocol::{Request, TopReply};

use super::client::ClientArgs;

#[derive(clap::Args)]
pub struct Args {
    /// How many sources to show.
    #[arg(long, short = 'n', default_value_t = 20)]
    limit: usize,
}

pub fn execute(args: &Args, client: &ClientArgs) -> anyhow::Result<()> {
    let data: TopReply = client.call(&Request::Top { limit: args.limit })?;
    client.print(&data, |d| {
        let totals = format!(
            "denied in all (smtpgate stats): {} connection attempts, {} packets",
            d.denied_connections, d.denied_packets
        );
        if d.sources.is_empty() {
            if d.denied_packets == 0 && d.denied_connections == 0 {
                println!("(no denied SMTP egress seen)");
            } else {
                // Denials without a connection attempt to show (evasion
                // packets, or attempts the table has forgotten).
                println!("(no denied connection attempts to list)\n{totals}");
            }
            return;
        }
        println!(
            "{:<40} {:>10} {:<11} {:<10} WHO",
            "SOURCE", "ATTEMPTS", "VERDICT", "LAST SEEN"
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        for r in &d.sources {
            let ago = (now - r.last_seen_unix).max(0.0);
            let source = match (r.source, &r.cgroup) {
                (Some(ip), _) => ip.to_string(),
                (None, Some(_)) => "(this host)".to_owned(),
                (None, None) => "?".to_owned(),
            };
            println!(
                "{source:<40} {:>10} {:<11} {:<10} {}",
                r.attempts,
                r.verdict,
                format!("{ago:.0} s ago"),
                who(r)
            );
        }
        println!("{totals}");
    });
    Ok(())
}

/// "unit (pid 123 comm)" for a local process; "-" for forwarded traffic.
fn who(r: &smtpgate::control::protocol::TopRow) -> String {
    let Some(cgroup) = &r.cgroup else {
        return "-".to_owned();
    };
    let mut out = r.unit.clone().unwrap_or_else(|| cgroup.clone());
    match (r.pid, &r.comm) {
        (Some(pid), Some(comm)) => out.push_str(&format!(" (pid {pid} {comm})")),
        (Some(pid), None) => out.push_str(&format!(" (pid {pid})")),
        _ => {}
    }
    out
}
