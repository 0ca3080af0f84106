//! `smtpgate allow add|remove|list`: the allowlist, changed live.

use smtpgate::{control::protocol::Request, policy::Prefix};

use super::client::ClientArgs;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Allow a source prefix (IPv4 or IPv6, a bare address is a host).
    /// Kept across restarts.
    Add {
        cidr: String,
        /// Why this host may send mail directly.
        #[arg(long)]
        comment: Option<String>,
    },
    /// Remove a prefix added with `allow add`.
    Remove { cidr: String },
    /// List every entry, with where it came from.
    List,
}

pub fn execute(cmd: &Command, client: &ClientArgs) -> anyhow::Result<()> {
    let request = match cmd {
        Command::Add { cidr, comment } => {
            // Refuse bad input here, with the same parser the agent uses,
            // so the message does not depend on an agent being up.
            cidr.parse::<Prefix>()
                .map_err(|e| anyhow::anyhow!("{cidr:?}: {e}"))?;
            Request::AllowAdd {
                prefix: cidr.clone(),
                comment: comment.clone(),
            }
        }
        Command::Remove { cidr } => {
            cidr.parse::<Prefix>()
                .map_err(|e| anyhow::anyhow!("{cidr:?}: {e}"))?;
            Request::AllowRemove {
                prefix: cidr.clone(),
            }
        }
        Command::List => Request::AllowList,
    };
    let data = client.call(&request)?;
    client.print(&data, |d| match cmd {
        Command::Add { cidr, .. } => println!("added {}", d["added"].as_str().unwrap_or(cidr)),
        Command::Remove { cidr } => {
            println!("removed {}", d["removed"].as_str().unwrap_or(cidr));
            if d["still_allowed_by_config"] == true {
                println!("note: the config file allowlists it too, so it stays allowed");
            }
        }
        Command::List => {
            println!("{:<44} {:<7} COMMENT", "PREFIX", "ORIGIN");
            for e in d["entries"].as_array().into_iter().flatten() {
                println!(
                    "{:<44} {:<7} {}",
                    e["prefix"].as_str().unwrap_or("?"),
                    e["origin"].as_str().unwrap_or("?"),
                    e["comment"].as_str().unwrap_or("")
                );
            }
        }
    });
    Ok(())
}
