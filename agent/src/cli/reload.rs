//! `smtpgate reload`: re-read the config file (as SIGHUP does).

use smtpgate::control::protocol::Request;

use super::client::ClientArgs;

pub fn execute(client: &ClientArgs) -> anyhow::Result<()> {
    let data = client.call(&Request::Reload)?;
    client.print(&data, |d| {
        let a = &d["allowlist"];
        println!(
            "reloaded: mode {}, action {}, {} IPv4 and {} IPv6 allowlist entries",
            d["mode"].as_str().unwrap_or("?"),
            d["action"].as_str().unwrap_or("?"),
            a["ipv4"],
            a["ipv6"]
        );
    });
    Ok(())
}
