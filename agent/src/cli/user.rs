//! `smtpgate user add|remove|list|passwd`: the relay's users file. Works on
//! the file named by the config's `[relay] users_file`; a running relay
//! notices the change by itself.

use std::{
    io::{BufRead as _, IsTerminal as _},
    path::PathBuf,
};

use anyhow::Context as _;
use smtpgate::{agent::load_config, paths};
use smtpgate_relay::users;

#[derive(clap::Args)]
pub struct Args {
    /// The agent's config file, for `[relay] users_file`.
    #[arg(long, short, global = true, default_value = paths::CONFIG_FILE)]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Add a user. The password is read from standard input (one line).
    Add {
        name: String,
        /// An address or @domain the user may send as (repeatable).
        #[arg(long = "sender", required = true)]
        senders: Vec<String>,
        /// Import an existing hash ($argon2id$, $2b$/$2y$ bcrypt, $6$
        /// SHA-512-crypt) instead of reading a password.
        #[arg(long)]
        hash: Option<String>,
    },
    /// Remove a user.
    Remove { name: String },
    /// List users, their hash scheme and allowed senders.
    List,
    /// Set a user's password, read from standard input (one line).
    Passwd { name: String },
}

/// One line from standard input. At a terminal, rpassword prompts and
/// reads with echo off (and puts the terminal back however the read ends).
/// From a pipe (`echo pw | smtpgate user add ...`) there is no echo to
/// hide: the line is taken byte for byte, where rpassword's line editing
/// would drop control characters such as a tab.
fn read_password() -> anyhow::Result<String> {
    let pw = if std::io::stdin().is_terminal() {
        rpassword::prompt_password("password: ").context("reading the password")?
    } else {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("reading the password")?;
        line.trim_end_matches(['\n', '\r']).to_owned()
    };
    anyhow::ensure!(!pw.is_empty(), "empty password");
    Ok(pw)
}

pub fn execute(args: &Args) -> anyhow::Result<()> {
    let config = load_config(Some(&args.config))?;
    let file = &config.relay.users_file;
    match &args.command {
        Command::Add {
            name,
            senders,
            hash,
        } => {
            match hash {
                Some(h) => users::user_add_hash(file, name, h, senders.clone())?,
                None => users::user_add(file, name, &read_password()?, senders.clone())?,
            }
            println!("added {name} ({})", file.display());
        }
        Command::Remove { name } => {
            users::user_remove(file, name)?;
            println!("removed {name}");
        }
        Command::Passwd { name } => {
            users::user_passwd(file, name, &read_password()?)?;
            println!("password changed for {name}");
        }
        Command::List => {
            println!("{:<24} {:<14} SENDERS", "USER", "SCHEME");
            for u in users::user_list(file)? {
                // The relay refuses the file while such a hash is in it;
                // say so where the admin looks, next to the cure.
                let scheme = if u.built_in {
                    u.scheme.to_owned()
                } else {
                    format!("{} (not built in: user passwd {})", u.scheme, u.name)
                };
                println!("{:<24} {:<14} {}", u.name, scheme, u.senders.join(", "));
            }
        }
    }
    Ok(())
}
