//! Command-line interface: one module per subcommand, each with `execute()`.

mod allow;
mod check;
mod check_config;
mod client;
mod detach;
mod notify;
mod queue;
mod reload;
mod run;
mod stats;
mod status;
mod top;
mod user;

use std::process::ExitCode;

use clap::{CommandFactory as _, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "smtpgate",
    version,
    about = "Port-25 egress policy agent for gateway hosts"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    client: client::ClientArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: attach the programs and enforce until SIGINT/SIGTERM.
    Run(run::Args),
    /// Validate a config file without touching a running agent.
    CheckConfig(check_config::Args),
    /// Show what the running agent enforces, and where.
    Status,
    /// Show the datapath's counters.
    Stats,
    /// Show the verdict a connection from IP would get, and why.
    Check(check::Args),
    /// Show the sources denied most, with counts and when last seen.
    Top(top::Args),
    /// Change the allowlist of the running agent.
    #[command(subcommand)]
    Allow(allow::Command),
    /// Re-read the config file (as SIGHUP does); a bad config changes nothing.
    Reload,
    /// Stop enforcing: detach every program and remove every pin.
    Detach(detach::Args),
    /// Manage the relay's users (AUTH credentials and allowed senders).
    User(user::Args),
    /// Look at and act on the relay's queue.
    Queue(queue::Args),
    /// Print shell completions.
    #[command(hide = true)]
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff).
    #[command(hide = true)]
    Man,
}

fn init_logging() {
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_from_env("SMTPGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal; journald and log files get
    // plain `key=value` lines.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .init();
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => {
            init_logging();
            run::execute(args)
        }
        Command::CheckConfig(args) => check_config::execute(&args),
        Command::Status => status::execute(&cli.client),
        Command::Stats => stats::execute(&cli.client),
        Command::Check(args) => check::execute(&args, &cli.client),
        Command::Allow(cmd) => allow::execute(&cmd, &cli.client),
        Command::Reload => reload::execute(&cli.client),
        Command::Top(args) => top::execute(&args, &cli.client),
        Command::Detach(args) => detach::execute(&args, &cli.client),
        Command::User(args) => user::execute(&args),
        Command::Queue(args) => queue::execute(&args, &cli.client),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "smtpgate",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Man => clap_mangen::Man::new(Cli::command())
            .render(&mut std::io::stdout())
            .map_err(Into::into),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("smtpgate: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
