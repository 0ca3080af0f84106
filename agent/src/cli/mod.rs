//! Command-line interface: one module per subcommand, each with `execute()`.

mod allow;
mod check;
mod check_config;
mod client;
mod detach;
mod dkim;
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
    about = "Port-25 egress policy agent for gateway hosts",
    after_help = EXIT_STATUS_HELP
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
    /// Manage the relay's DKIM keys and print their DNS records.
    Dkim(dkim::Args),
    /// Print shell completions.
    #[command(hide = true)]
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff).
    #[command(hide = true)]
    Man,
}

/// Where the agent's log goes, and in what shape.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// journald when systemd connected stderr to the journal
    /// ($JOURNAL_STREAM), text otherwise.
    #[default]
    Auto,
    /// `key=value` lines on stderr.
    Text,
    /// One JSON object per line on stderr, for log pipelines (Kubernetes).
    Json,
    /// Lines for the journal, each with its syslog priority: `journalctl -p
    /// warning` shows denials and errors.
    Journald,
}

/// Whether stderr is the journal stream systemd set up: $JOURNAL_STREAM
/// is "device:inode" of it (systemd.exec(5)). Inherited by a child whose
/// stderr was redirected, it no longer matches, and text is right.
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    stream.to_string_lossy() == format!("{}:{}", meta.dev(), meta.ino())
}

/// Prefixes each line with its syslog priority (`<4>` for a warning), which
/// journald reads off a service's stderr (sd-daemon(3); SyslogLevelPrefix=
/// is on by default) and stores as the record's PRIORITY. Chosen over
/// journald's native protocol (tracing-journald) because that keeps only
/// the message in MESSAGE: `journalctl -u smtpgate` would show "denied SMTP
/// egress attempt" without saying who or where. No timestamp: the journal
/// has its own.
struct SyslogPrefix<F>(F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for SyslogPrefix<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let priority = match *event.metadata().level() {
            tracing::Level::ERROR => 3,
            tracing::Level::WARN => 4,
            tracing::Level::INFO => 6,
            tracing::Level::DEBUG | tracing::Level::TRACE => 7,
        };
        write!(writer, "<{priority}>")?;
        self.0.format_event(ctx, writer, event)
    }
}

/// Whether log lines carry syslog priorities, so that the last error line
/// can too.
static JOURNAL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

fn init_logging(format: LogFormat) {
    use tracing_subscriber::{EnvFilter, fmt, prelude::*};
    let filter = EnvFilter::try_from_env("SMTPGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let format = match format {
        LogFormat::Auto if stderr_is_journal() => LogFormat::Journald,
        LogFormat::Auto => LogFormat::Text,
        f => f,
    };
    let _ = JOURNAL.set(format == LogFormat::Journald);
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Journald => registry
            .with(
                fmt::layer()
                    .event_format(SyslogPrefix(fmt::format().without_time().with_ansi(false)))
                    .with_writer(std::io::stderr),
            )
            .init(),
        LogFormat::Json => registry
            .with(fmt::layer().json().with_writer(std::io::stderr))
            .init(),
        LogFormat::Text | LogFormat::Auto => {
            // Colours only for a person at a terminal.
            let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
            registry
                .with(fmt::layer().with_ansi(ansi).with_writer(std::io::stderr))
                .init();
        }
    }
}

/// A value as the config file and JSON spell it ("reject", "cli").
pub(crate) fn as_written<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Exit statuses, for scripts (also in the man page).
pub mod exit {
    /// Done; for `check`: the connection would be allowed (or the port is
    /// not an SMTP port).
    pub const OK: u8 = 0;
    /// An error: bad input, a refused change, anything else.
    pub const ERROR: u8 = 1;
    /// Bad usage (unknown option, missing argument): clap's own status.
    #[expect(dead_code, reason = "clap exits with it; listed so the table is whole")]
    pub const USAGE: u8 = 2;
    /// No agent is running on the control socket.
    pub const NO_AGENT: u8 = 3;
    /// The control socket is root only.
    pub const PERMISSION: u8 = 4;
    /// `check`: the policy denies the connection (dropped, rejected,
    /// redirected, or audited: would be denied in enforce mode).
    pub const DENIED: u8 = 5;
}

const EXIT_STATUS_HELP: &str = "Exit status: 0 ok (check: allowed), 1 error, 2 usage, \
3 no agent running, 4 permission denied, 5 check: denied.";

/// The exit status and the machine-readable code for an error.
fn classify(e: &anyhow::Error) -> (u8, String) {
    use smtpgate::control::client::ClientError;
    if let Some(d) = e.downcast_ref::<smtpgate_relay::dkim::DkimError>() {
        return (exit::ERROR, dkim::error_code(d).into());
    }
    match e.downcast_ref::<ClientError>() {
        Some(ClientError::NotRunning { .. } | ClientError::Refused { .. }) => {
            (exit::NO_AGENT, "no_agent".into())
        }
        Some(ClientError::Permission { .. }) => (exit::PERMISSION, "permission_denied".into()),
        // The agent's own code: bad_request, not_found, conflict, refused...
        Some(ClientError::Agent { code, .. }) => (exit::ERROR, as_written(code)),
        Some(ClientError::Io { .. } | ClientError::Protocol(_)) => (exit::ERROR, "protocol".into()),
        None => (exit::ERROR, "error".into()),
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.client.output == client::Output::Json;
    let mut status = exit::OK;
    let result = match cli.command {
        Command::Run(args) => {
            init_logging(args.log_format);
            run::execute(args)
        }
        Command::CheckConfig(args) => check_config::execute(&args),
        Command::Status => status::execute(&cli.client),
        Command::Stats => stats::execute(&cli.client),
        Command::Check(args) => check::execute(&args, &cli.client).map(|denied| {
            if denied {
                status = exit::DENIED;
            }
        }),
        Command::Allow(cmd) => allow::execute(&cmd, &cli.client),
        Command::Reload => reload::execute(&cli.client),
        Command::Top(args) => top::execute(&args, &cli.client),
        Command::Detach(args) => detach::execute(&args, &cli.client),
        Command::User(args) => user::execute(&args),
        Command::Queue(args) => queue::execute(&args, &cli.client),
        Command::Dkim(args) => dkim::execute(&args, &cli.client),
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
        Ok(()) => ExitCode::from(status),
        Err(e) => {
            let (status, code) = classify(&e);
            if json {
                // Scripts asked for JSON: the error is JSON too (stdout),
                // besides the line for people on stderr.
                let v =
                    serde_json::json!({ "error": { "code": code, "message": format!("{e:#}") } });
                println!("{v}");
            }
            // A fatal error is an error in the journal too, not "info".
            let prefix = if JOURNAL.get() == Some(&true) {
                "<3>"
            } else {
                ""
            };
            eprintln!("{prefix}smtpgate: error: {e:#}");
            ExitCode::from(status)
        }
    }
}
