//! `smtpgate allow add|remove|list`: the allowlist, changed live.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use smtpgate::{
    control::protocol::{AllowAddReply, AllowListReply, AllowRemoveReply, Request},
    policy::{Item, Prefix},
};

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
        /// Remove the entry again after this long: "2h", "30m", "1d 12h".
        #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "until")]
        expires: Option<std::time::Duration>,
        /// Remove the entry again at this time (RFC 3339, UTC:
        /// "2026-12-24T18:00:00Z").
        #[arg(long, value_parser = humantime::parse_rfc3339_weak)]
        until: Option<std::time::SystemTime>,
    },
    /// Remove a prefix added with `allow add`.
    Remove { cidr: String },
    /// List every entry, with where it came from.
    List,
}

pub fn execute(cmd: &Command, client: &ClientArgs) -> anyhow::Result<()> {
    let request = match cmd {
        Command::Add {
            cidr,
            comment,
            expires,
            until,
        } => {
            // Refuse bad input here, with the same parser the agent uses,
            // so the message does not depend on an agent being up.
            cidr.parse::<Prefix>().map_err(|e| {
                let hint = match cidr.parse::<Item>() {
                    Ok(Item::Named(_)) => {
                        " (a name goes in the config's `allowlist` or an allowlist file, where it is kept resolved)"
                    }
                    _ => "",
                };
                anyhow::anyhow!("{cidr:?}: {e}{hint}")
            })?;
            let at = match (expires, until) {
                (Some(d), _) => Some(SystemTime::now() + *d),
                (None, Some(t)) => Some(*t),
                (None, None) => None,
            };
            let expires_unix = match at {
                Some(t) => {
                    let secs = t
                        .duration_since(UNIX_EPOCH)
                        .map_err(|_| anyhow::anyhow!("the expiry time is before 1970"))?;
                    // Rounded up: never earlier than asked.
                    Some(secs.as_secs() + u64::from(secs.subsec_nanos() > 0))
                }
                None => None,
            };
            Request::AllowAdd {
                prefix: cidr.clone(),
                comment: comment.clone(),
                expires_unix,
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
    match cmd {
        Command::Add { .. } => {
            let d: AllowAddReply = client.call(&request)?;
            client.print(&d, |d| {
                print!("added {}", d.added);
                match d.expires_unix {
                    Some(t) => println!(" until {} ({} from now)", rfc3339(t), left(t)),
                    None => println!(),
                }
            });
        }
        Command::Remove { .. } => {
            let d: AllowRemoveReply = client.call(&request)?;
            client.print(&d, |d| {
                println!("removed {}", d.removed);
                if d.still_allowed_by_config {
                    println!("note: the config file allowlists it too, so it stays allowed");
                } else if !d.still_allowed_by.is_empty() {
                    let by: Vec<String> =
                        d.still_allowed_by.iter().map(ToString::to_string).collect();
                    println!("note: still allowed by {}", by.join(", "));
                }
            });
        }
        Command::List => {
            let d: AllowListReply = client.call(&request)?;
            client.print(&d, |d| {
                // The origin column is as wide as its longest value (a
                // file path and line, a name), so the rest stays aligned.
                let width = d
                    .entries
                    .iter()
                    .map(|e| e.origin.to_string().len())
                    .max()
                    .unwrap_or(0)
                    .max("ORIGIN".len());
                println!(
                    "{:<44} {:<width$} {:<12} COMMENT",
                    "PREFIX", "ORIGIN", "EXPIRES IN"
                );
                for e in &d.entries {
                    let mut comment = e.comment.clone().unwrap_or_default();
                    if !e.also.is_empty() {
                        let also: Vec<String> = e.also.iter().map(ToString::to_string).collect();
                        if !comment.is_empty() {
                            comment.push_str("; ");
                        }
                        comment.push_str(&format!("also {}", also.join(", ")));
                    }
                    println!(
                        "{:<44} {:<width$} {:<12} {comment}",
                        e.prefix.to_string(),
                        e.origin.to_string(),
                        e.expires_unix.map_or_else(|| "-".to_owned(), left),
                    );
                }
            });
        }
    }
    Ok(())
}

fn rfc3339(unix: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}

/// Time left until `unix`, to the second: "1h 59m 58s".
fn left(unix: u64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let secs = (unix as f64 - now).max(0.0).floor() as u64;
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}
