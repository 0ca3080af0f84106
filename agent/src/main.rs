//! The `smtpgate` binary: the agent and the CLI that manages it.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
