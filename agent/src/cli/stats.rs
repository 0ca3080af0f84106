//! `smtpgate stats`: the datapath's counters.

use smtpgate::control::protocol::{Request, StatsReply};

use super::client::ClientArgs;

pub fn execute(client: &ClientArgs) -> anyhow::Result<()> {
    let data: StatsReply = client.call(&Request::Stats)?;
    client.print(&data, |d| {
        println!(
            "{:<6} {:<10} {:<22} {:>12} {:>12}",
            "FAMILY", "VERDICT", "REASON", "CONNECTIONS", "PACKETS"
        );
        let mut shown = 0;
        for r in d.counters.iter().filter(|r| r.packets + r.connections > 0) {
            println!(
                "{:<6} {:<10} {:<22} {:>12} {:>12}",
                r.family, r.verdict, r.reason, r.connections, r.packets
            );
            shown += 1;
        }
        if shown == 0 {
            println!("(no SMTP egress seen yet)");
        }
    });
    Ok(())
}
