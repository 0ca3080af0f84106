//! `smtpgate dkim generate|list|remove`: the relay's DKIM keys, files under
//! the config's `[relay] dkim_dir`. Works without a running agent (like
//! `user`); a running relay signs with the change after `smtpgate reload`
//! or SIGHUP, which leaves the admin the time to publish the DNS record
//! first.

use std::path::PathBuf;

use smtpgate::{agent::load_config, paths};
use smtpgate_relay::dkim::keys::{self, Algorithm, DkimError, KeyInfo};

use super::client::ClientArgs;

#[derive(clap::Args)]
pub struct Args {
    /// The agent's config file, for `[relay] dkim_dir`.
    #[arg(long, short, global = true, default_value = paths::CONFIG_FILE)]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Alg {
    /// ed25519-sha256 (RFC 8463).
    Ed25519,
    /// rsa-sha256, 2048 bits.
    Rsa,
}

impl From<Alg> for Algorithm {
    fn from(a: Alg) -> Self {
        match a {
            Alg::Ed25519 => Self::Ed25519,
            Alg::Rsa => Self::Rsa,
        }
    }
}

#[derive(clap::Subcommand)]
enum Command {
    /// Make a key for DOMAIN and print the DNS TXT record to publish.
    /// Every key of a domain signs: add an RSA key beside an Ed25519 one
    /// for verifiers that know only RSA, and a new selector for rotation.
    Generate {
        domain: String,
        #[arg(long, value_enum, default_value = "ed25519")]
        algorithm: Alg,
        /// Default: s<YEAR>-<MONTH> of today (UTC), e.g. s2026-12.
        #[arg(long)]
        selector: Option<String>,
    },
    /// Every key, with the DNS record it needs.
    List,
    /// Delete a key: mail is no longer signed with it (after a reload).
    /// A domain with several keys needs --selector.
    Remove {
        domain: String,
        #[arg(long)]
        selector: Option<String>,
    },
}

/// The machine-readable code of a `DkimError`, in the words the control
/// protocol uses for the same kinds of failure.
pub(crate) fn error_code(e: &DkimError) -> &'static str {
    match e {
        DkimError::BadDomain { .. }
        | DkimError::BadSelector { .. }
        | DkimError::BadAlgorithm { .. }
        | DkimError::Ambiguous { .. } => "bad_request",
        DkimError::Exists { .. } => "conflict",
        DkimError::NotFound { .. } => "not_found",
        DkimError::Io { .. }
        | DkimError::BadKey { .. }
        | DkimError::Generate { .. }
        | DkimError::Sign { .. } => "error",
    }
}

pub fn execute(args: &Args, client: &ClientArgs) -> anyhow::Result<()> {
    let config = load_config(Some(&args.config))?;
    let dir = &config.relay.dkim_dir;
    match &args.command {
        Command::Generate {
            domain,
            algorithm,
            selector,
        } => {
            let key = keys::generate(dir, domain, (*algorithm).into(), selector.as_deref())?;
            client.print(&key, |k| {
                // The record alone on stdout, so it can go straight into a
                // zone file; what to do with it on stderr.
                eprintln!(
                    "generated {} key {} for {} ({})",
                    k.algorithm,
                    k.selector,
                    k.domain,
                    k.path.display()
                );
                eprintln!(
                    "publish this TXT record, then run `smtpgate reload` to start signing with it:"
                );
                println!("{}", k.zone_line);
            });
        }
        Command::List => {
            let all = keys::list(dir)?;
            client.print(&all, |all| print_list(all));
        }
        Command::Remove { domain, selector } => {
            let key = keys::remove(dir, domain, selector.as_deref())?;
            client.print(&key, |k| {
                println!(
                    "removed {} key {} for {} ({})",
                    k.algorithm,
                    k.selector,
                    k.domain,
                    k.path.display()
                );
                eprintln!(
                    "`smtpgate reload` stops signing with it; keep {} in DNS for a few days, until mail signed with it has been delivered",
                    k.dns_name
                );
            });
        }
    }
    Ok(())
}

fn print_list(all: &[KeyInfo]) {
    println!(
        "{:<32} {:<16} {:<9} RECORD",
        "DOMAIN", "SELECTOR", "ALGORITHM"
    );
    for k in all {
        println!(
            "{:<32} {:<16} {:<9} {}",
            k.domain, k.selector, k.algorithm, k.zone_line
        );
    }
}
