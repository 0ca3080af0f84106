//! `smtpgate queue list|show|flush|delete`: the relay's queue. list and
//! show read the spool directly; flush needs the running agent; delete goes
//! through the agent when one runs (to stop a delivery in progress) and
//! works on the spool directly otherwise.

use std::path::PathBuf;

use smtpgate::{
    agent::load_config,
    control::{
        client::ClientError,
        protocol::{QueueDeleteReply, QueueFlushReply, Request},
    },
    paths,
};
use smtpgate_relay::queue;

use super::client::ClientArgs;

#[derive(clap::Args)]
pub struct Args {
    /// The agent's config file, for `[relay] spool_dir`.
    #[arg(long, short, global = true, default_value = paths::CONFIG_FILE)]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Queued messages, oldest first.
    List,
    /// One message: its envelope, each recipient's state, and its text.
    Show { id: String },
    /// Retry every queued message now.
    Flush,
    /// Delete a message; its sender gets no bounce.
    Delete { id: String },
}

pub fn execute(args: &Args, client: &ClientArgs) -> anyhow::Result<()> {
    let config = load_config(Some(&args.config))?;
    let spool = &config.relay.spool_dir;
    match &args.command {
        Command::List => {
            let mut records = queue::list(spool)?;
            records.sort_by_key(|r| r.created_unix_ms);
            client.print(&serde_json::to_value(&records)?, |_| {
                println!(
                    "{:<28} {:>8} {:>4} {:<30} RECIPIENTS",
                    "ID", "SIZE", "TRY", "FROM"
                );
                for r in &records {
                    let pending: Vec<&str> =
                        r.recipients.iter().map(|x| x.address.as_str()).collect();
                    println!(
                        "{:<28} {:>8} {:>4} {:<30} {}",
                        r.id,
                        r.size,
                        r.attempts,
                        if r.from.is_empty() { "<>" } else { &r.from },
                        pending.join(", ")
                    );
                }
                if records.is_empty() {
                    println!("(queue empty)");
                }
            });
        }
        Command::Show { id } => {
            let (record, body) = queue::show(spool, id)?;
            client.print(&serde_json::to_value(&record)?, |_| {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&record).unwrap_or_default()
                );
                println!("--");
                print!("{}", String::from_utf8_lossy(&body));
            });
        }
        Command::Flush => {
            let d: QueueFlushReply = client.call(&Request::QueueFlush)?;
            client.print(&d, |_| {
                println!("flushing: every queued message is being retried");
            });
        }
        Command::Delete { id } => {
            match client.try_call::<QueueDeleteReply>(&Request::QueueDelete { id: id.clone() }) {
                Ok(d) => client.print(&d, |d| println!("deleted {}", d.deleted)),
                Err(ClientError::NotRunning { .. } | ClientError::Refused { .. }) => {
                    queue::delete(spool, id)?;
                    let d = QueueDeleteReply {
                        deleted: id.clone(),
                    };
                    client.print(&d, |d| println!("deleted {} (no agent running)", d.deleted));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}
