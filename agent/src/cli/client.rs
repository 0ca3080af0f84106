//! Options shared by the subcommands that talk to a running agent.

use std::path::PathBuf;

use smtpgate::{
    control::{client, protocol::Request},
    paths,
};

#[derive(clap::Args, Clone)]
pub struct ClientArgs {
    /// The running agent's control socket.
    #[arg(long, global = true, env = "SMTPGATE_SOCKET", default_value = paths::CONTROL_SOCKET)]
    pub socket: PathBuf,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Output::Human)]
    pub output: Output,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Human,
    Json,
}

impl ClientArgs {
    pub fn call(&self, request: &Request) -> anyhow::Result<serde_json::Value> {
        Ok(client::call(&self.socket, request)?)
    }

    pub fn try_call(&self, request: &Request) -> Result<serde_json::Value, client::ClientError> {
        client::call(&self.socket, request)
    }

    /// Prints `data` as JSON, or through `human` for people.
    pub fn print(&self, data: &serde_json::Value, human: impl FnOnce(&serde_json::Value)) {
        match self.output {
            Output::Json => println!("{}", serde_json::to_string_pretty(data).unwrap_or_default()),
            Output::Human => human(data),
        }
    }
}
