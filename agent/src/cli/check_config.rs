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
        "  allowlist: {v4} IPv4 and {v6} IPv6 prefixes ({} table nodes)",
        table.len()
    );
    if !config.allowlist_names.is_empty() {
        let names: Vec<String> = config
            .allowlist_names
            .iter()
            .map(ToString::to_string)
            .collect();
        println!("  names (resolved by the agent): {}", names.join(", "));
    }
    let mut broken = 0;
    for pattern in &config.allowlist_files {
        // Read as the agent would, so a bad line shows up here first.
        let scan = smtpgate::sources::files::scan(std::slice::from_ref(pattern));
        println!("  allowlist files {pattern}: {} match", scan.files.len());
        for (path, result) in &scan.files {
            match result {
                Ok(items) => println!("    {}: {} entries", path.display(), items.len()),
                Err(e) => {
                    broken += 1;
                    println!("    {}: BROKEN: {e}", path.display());
                }
            }
        }
        for e in scan.dir_errors.values() {
            broken += 1;
            println!("    {e}");
        }
    }
    for point in &config.attach {
        println!("  attach: {point}");
    }
    if broken > 0 {
        anyhow::bail!(
            "{broken} allowlist file(s) or directories cannot be used (a running agent keeps their last good entries)"
        );
    }
    Ok(())
}
