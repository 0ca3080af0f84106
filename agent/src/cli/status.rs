//! `smtpgate status`: what the running agent enforces, and where.

use smtpgate::control::protocol::Request;

use super::client::ClientArgs;

pub fn execute(client: &ClientArgs) -> anyhow::Result<()> {
    let data = client.call(&Request::Status)?;
    client.print(&data, |d| {
        println!(
            "smtpgate {} (config: {})",
            d["version"].as_str().unwrap_or("?"),
            d["config"].as_str().unwrap_or("?")
        );
        println!("mode:      {}", d["mode"].as_str().unwrap_or("?"));
        println!("action:    {}", d["action"].as_str().unwrap_or("?"));
        println!("ports:     {}", d["ports"]);
        let a = &d["allowlist"];
        println!(
            "allowlist: {} IPv4, {} IPv6 entries ({} of {} table nodes)",
            a["ipv4"], a["ipv6"], a["table_nodes"], a["table_capacity"]
        );
        let attachments = d["attachments"].as_array().cloned().unwrap_or_default();
        for point in d["attach_points"].as_array().into_iter().flatten() {
            let p = &point["point"];
            let hook = p["hook"].as_str().unwrap_or("?");
            let target = p["interface"]
                .as_str()
                .or(p["path"].as_str())
                .unwrap_or("?");
            if let Some(down) = point["down"].as_object() {
                let since = down["since_unix"].as_f64().unwrap_or(0.0);
                let ago = (now_unix() - since).max(0.0);
                println!(
                    "attached:  {hook} {target}: DOWN for {ago:.0} s: {} (SMTP egress through it is NOT filtered)",
                    down["reason"].as_str().unwrap_or("?")
                );
                continue;
            }
            let programs: Vec<&str> = attachments
                .iter()
                .filter(|a| a["point"] == *p)
                .filter_map(|a| a["program"].as_str())
                .collect();
            let reattached = match point["reattaches"].as_u64() {
                Some(0) | None => String::new(),
                Some(n) => format!(
                    ", re-attached {n}x{}",
                    point["last_reattach_gap_ms"]
                        .as_f64()
                        .map_or(String::new(), |g| format!(", last {g:.1} ms after the link event"))
                ),
            };
            println!("attached:  {hook} {target}: UP ({}{reattached})", programs.join(", "));
        }
        if d["enforcing"] == false {
            println!("WARNING:   not every attach point enforces: see above; /readyz says 503");
        }
    });
    Ok(())
}

fn now_unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
