//! `smtpgate detach`: stop enforcing. Removes every program smtpgate
//! attached and everything it pinned. With an agent running, the agent does
//! it and exits; without one, the pins and smtpgate's classic TC filters in
//! this network namespace are removed here.

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
            // Classic TC filters are not pinned: they are found on this
            // network namespace's interfaces, and deleted, pins or not.
            let filters = smtpgate::datapath::remove_classic_filters()?;
            let pins = args.pin_dir.exists();
            if !pins && filters == 0 {
                anyhow::bail!(
                    "nothing to detach: no agent is running, {} does not exist and no smtpgate TC filter is attached",
                    args.pin_dir.display()
                );
            }
            if pins {
                pins::remove_tree(&args.pin_dir)
                    .map_err(|e| anyhow::anyhow!("removing {}: {e}", args.pin_dir.display()))?;
            }
            smtpgate::datapath::redirect::remove_routing();
            let reply = DetachReply {
                detached: args.pin_dir.clone(),
                pins_removed: pins,
                classic_filters_removed: filters,
            };
            client.print(&reply, |_| {
                let mut done = Vec::new();
                if pins {
                    done.push(format!("removed {}", args.pin_dir.display()));
                }
                if filters > 0 {
                    done.push(format!("deleted {filters} classic TC filter(s)"));
                }
                println!("detached: no agent was running; {}", done.join(", "));
            });
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}
