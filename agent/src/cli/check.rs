//! `smtpgate check IP [--port N]`: the verdict a connection would get.

use std::net::IpAddr;

use smtpgate::control::protocol::Request;

use super::client::ClientArgs;

#[derive(clap::Args)]
pub struct Args {
    /// Source address of the connection.
    ip: IpAddr,
    /// Destination port.
    #[arg(long, default_value_t = 25)]
    port: u16,
}

pub fn execute(args: &Args, client: &ClientArgs) -> anyhow::Result<()> {
    let data = client.call(&Request::Check {
        ip: args.ip,
        port: args.port,
    })?;
    client.print(&data, |d| {
        let verdict = d["verdict"].as_str().unwrap_or("?");
        let reason = d["reason"].as_str().unwrap_or("?");
        match d["entry"].as_str() {
            Some(entry) => println!(
                "{} -> port {}: {verdict} (matched {entry}, from {})",
                args.ip,
                args.port,
                d["origin"].as_str().unwrap_or("?")
            ),
            None => println!("{} -> port {}: {verdict} ({reason})", args.ip, args.port),
        }
    });
    Ok(())
}
