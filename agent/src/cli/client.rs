//! Options shared by the subcommands that talk to a running agent.

use std::path::PathBuf;

use serde::{Serialize, de::DeserializeOwned};

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
    /// Sends `request`; the reply comes back as its type `R`.
    pub fn call<R: DeserializeOwned>(&self, request: &Request) -> anyhow::Result<R> {
        Ok(client::call(&self.socket, request)?)
    }

    pub fn try_call<R: DeserializeOwned>(
        &self,
        request: &Request,
    ) -> Result<R, client::ClientError> {
        client::call(&self.socket, request)
    }

    /// Prints `data` as JSON, or through `human` for people.
    pub fn print<T: Serialize>(&self, data: &T, human: impl FnOnce(&T)) {
        match self.output {
            Output::Json => println!("{}", serde_json::to_string_pretty(data).unwrap_or_default()),
            Output::Human => human(data),
        }
    }
}
