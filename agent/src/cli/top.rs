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
        if d.sources.is_empty() {
            println!("(no denied SMTP egress seen)");
            return;
        }
        println!(
            "{:<40} {:>10} {:<11} LAST SEEN",
            "SOURCE", "ATTEMPTS", "VERDICT"
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        for r in &d.sources {
            let ago = (now - r.last_seen_unix).max(0.0);
            println!(
                "{:<40} {:>10} {:<11} {ago:.0} s ago",
                r.source.to_string(),
                r.attempts,
                r.verdict
            );
        }
    });
    Ok(())
}
