//! `smtpgate reload`: re-read the config file (as SIGHUP does).

use smtpgate::control::protocol::{Request, StatusReply};

use super::client::ClientArgs;

pub fn execute(client: &ClientArgs) -> anyhow::Result<()> {
    let data: StatusReply = client.call(&Request::Reload)?;
    client.print(&data, |d| {
        println!(
            "reloaded: mode {}, action {}, {} IPv4 and {} IPv6 allowlist entries",
            super::as_written(&d.mode),
            super::as_written(&d.action),
            d.allowlist.ipv4,
            d.allowlist.ipv6
        );
    });
    Ok(())
}
