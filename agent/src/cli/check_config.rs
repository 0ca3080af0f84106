//! `smtpgate check-config FILE`

use std::path::PathBuf;

use anyhow::Context as _;
use smtpgate::{config::Config, policy::Allowlist};

#[derive(clap::Args)]
pub struct Args {
    /// The config file to check.
    file: PathBuf,
}

pub fn execute(args: &Args) -> anyhow::Result<()> {
    let config = Config::load(&args.file)
        .with_context(|| format!("{} is not valid", args.file.display()))?;
    let list = Allowlist::from_config(&config.allowlist);
    let (v4, v6) = list.count_by_family();
    let table = list.compile();
    println!("{}: OK", args.file.display());
    println!(
        "  mode {:?}, action {:?}, ports {:?}",
        config.mode, config.action, config.ports
    );
    println!(
        "  allowlist: {v4} IPv4 and {v6} IPv6 entries ({} table nodes)",
        table.len()
    );
    for point in &config.attach {
        println!("  attach: {point}");
    }
    Ok(())
}
