//! `smtpgate detach`: stop enforcing. Removes every program smtpgate
//! attached and everything it pinned. With an agent running, the agent does
//! it and exits; without one, the pins are removed here.

use std::path::PathBuf;

use smtpgate::{
    control::{
        client::ClientError,
        protocol::{DetachReply, Request},
    },
    datapath::pins,
    paths,
};

use super::client::ClientArgs;

#[derive(clap::Args)]
pub struct Args {
    /// Where the pins are, when no agent is running to say.
    #[arg(long, default_value = paths::PIN_DIR)]
    pin_dir: PathBuf,
}

pub fn execute(args: &Args, client: &ClientArgs) -> anyhow::Result<()> {
    match client.try_call::<DetachReply>(&Request::Detach) {
        Ok(data) => {
            client.print(&data, |d| {
                println!(
                    "detached: the agent removed {} and is stopping",
                    d.detached.display()
                );
            });
            Ok(())
        }
        Err(ClientError::NotRunning { .. } | ClientError::Refused { .. }) => {
            if !args.pin_dir.exists() {
                anyhow::bail!(
                    "nothing to detach: no agent is running and {} does not exist",
                    args.pin_dir.display()
                );
            }
            pins::remove_tree(&args.pin_dir)
                .map_err(|e| anyhow::anyhow!("removing {}: {e}", args.pin_dir.display()))?;
            smtpgate::datapath::redirect::remove_routing();
            let reply = DetachReply {
                detached: args.pin_dir.clone(),
            };
            client.print(&reply, |_| {
                println!(
                    "detached: no agent was running; removed {}",
                    args.pin_dir.display()
                );
            });
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}
