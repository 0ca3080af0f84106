//! `smtpgate top`: the sources denied most, from the kernel's bounded LRU
//! table: the first place to look when a host starts trying to spam.

use smtpgate::control::protocol::Request;

use super::client::ClientArgs;

#[derive(clap::Args)]
pub struct Args {
    /// How many sources to show.
    #[arg(long, short = 'n', default_value_t = 20)]
    limit: usize,
}

pub fn execute(args: &Args, client: &ClientArgs) -> anyhow::Result<()> {
    let data = client.call(&Request::Top { limit: args.limit })?;
    client.print(&data, |d| {
        let rows = d["sources"].as_array().cloned().unwrap_or_default();
        if rows.is_empty() {
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
        for r in rows {
            let ago = (now - r["last_seen_unix"].as_f64().unwrap_or(now)).max(0.0);
            println!(
                "{:<40} {:>10} {:<11} {:.0} s ago",
                r["source"].as_str().unwrap_or("?"),
                r["attempts"].as_u64().unwrap_or(0),
                r["verdict"].as_str().unwrap_or("?"),
                ago
            );
        }
    });
    Ok(())
}
