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
        for at in d["attachments"].as_array().into_iter().flatten() {
            let p = &at["point"];
            let target = p["interface"]
                .as_str()
                .or(p["path"].as_str())
                .unwrap_or("?");
            println!(
                "attached:  {} {} ({})",
                p["hook"].as_str().unwrap_or("?"),
                target,
                at["program"].as_str().unwrap_or("?")
            );
        }
    });
    Ok(())
}
