//! `smtpgate stats`: the datapath's counters.

use smtpgate::control::protocol::Request;

use super::client::ClientArgs;

pub fn execute(client: &ClientArgs) -> anyhow::Result<()> {
    let data = client.call(&Request::Stats)?;
    client.print(&data, |d| {
        println!(
            "{:<6} {:<10} {:<22} {:>12} {:>12}",
            "FAMILY", "VERDICT", "REASON", "CONNECTIONS", "PACKETS"
        );
        let rows = d["counters"].as_array().cloned().unwrap_or_default();
        let mut shown = 0;
        for r in rows.iter().filter(|r| {
            r["packets"].as_u64().unwrap_or(0) + r["connections"].as_u64().unwrap_or(0) > 0
        }) {
            println!(
                "{:<6} {:<10} {:<22} {:>12} {:>12}",
                r["family"].as_str().unwrap_or("?"),
                r["verdict"].as_str().unwrap_or("?"),
                r["reason"].as_str().unwrap_or("?"),
                r["connections"].as_u64().unwrap_or(0),
                r["packets"].as_u64().unwrap_or(0)
            );
            shown += 1;
        }
        if shown == 0 {
            println!("(no SMTP egress seen yet)");
        }
    });
    Ok(())
}
