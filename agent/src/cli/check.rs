//! `smtpgate check IP [--port N] [--to DST]`: the verdict a connection would get.
//! Exit status 0 when it would be allowed (or the port is not SMTP), 5 when
//! the policy denies it, so scripts can use it as a test.

use std::net::IpAddr;

use smtpgate::control::protocol::{CheckReply, Request};

use super::client::ClientArgs;

#[derive(clap::Args)]
pub struct Args {
    /// Source address of the connection.
    ip: IpAddr,
    /// Destination port.
    #[arg(long, default_value_t = 25)]
    port: u16,
    /// Destination address, which matters for destination exceptions.
    /// Without it: a destination that is not an exception.
    #[arg(long)]
    to: Option<IpAddr>,
}

/// Returns whether the policy denies the connection (exit status 5).
pub fn execute(args: &Args, client: &ClientArgs) -> anyhow::Result<bool> {
    let data: CheckReply = client.call(&Request::Check {
        ip: args.ip,
        port: args.port,
        to: args.to,
    })?;
    client.print(&data, |d| match (&d.entry, &d.origin) {
        (Some(entry), Some(origin)) => println!(
            "{} -> port {}: {} (matched {entry}, from {})",
            args.ip,
            args.port,
            d.verdict,
            super::as_written(origin)
        ),
        _ => println!(
            "{} -> port {}: {} ({})",
            args.ip, args.port, d.verdict, d.reason
        ),
    });
    Ok(!data.allowed())
}
