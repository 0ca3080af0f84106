//! Attaching the programs to the hooks the config names.
//!
//! TC programs attach through TCX where the kernel has it (6.6+), netlink
//! clsact otherwise; aya picks. cgroup programs attach through a BPF link in
//! "allow multiple" mode, so they sit beside systemd's own cgroup programs
//! (IPAddressDeny= and friends) instead of replacing them.

use std::fs::File;

use aya::programs::{
    CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, SchedClassifier, TcAttachType,
};
use smtpgate_common::programs;

use super::{Datapath, DatapathError};
use crate::config::AttachPoint;

/// One attached program. Dropping the datapath detaches it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Attachment {
    pub point: AttachPoint,
    pub program: &'static str,
}

impl Datapath {
    fn program_err(op: String) -> impl FnOnce(aya::programs::ProgramError) -> DatapathError {
        move |source| DatapathError::Program { op, source }
    }

    pub fn attach(&mut self, point: &AttachPoint) -> Result<(), DatapathError> {
        let program = match point {
            AttachPoint::TcIngress { interface } => {
                self.attach_tc(programs::TC_INGRESS, interface, TcAttachType::Ingress)?
            }
            AttachPoint::TcEgress { interface } => {
                self.attach_tc(programs::TC_EGRESS, interface, TcAttachType::Egress)?
            }
            AttachPoint::Cgroup { path } => {
                let path = path.clone().unwrap_or_else(crate::config::cgroup2_root);
                let cgroup = File::open(&path).map_err(|source| DatapathError::Cgroup {
                    path: path.clone(),
                    source,
                })?;
                let name = programs::CGROUP_EGRESS;
                let prog: &mut CgroupSkb = self
                    .ebpf
                    .program_mut(name)
                    .ok_or(DatapathError::MissingProgram { name })?
                    .try_into()
                    .map_err(Self::program_err(format!(
                        "{name} is not a cgroup/skb program"
                    )))?;
                if prog.fd().is_err() {
                    prog.load()
                        .map_err(Self::program_err(format!("loading {name}")))?;
                }
                prog.attach(
                    &cgroup,
                    CgroupSkbAttachType::Egress,
                    CgroupAttachMode::AllowMultiple,
                )
                .map_err(Self::program_err(format!(
                    "attaching {name} to {}",
                    path.display()
                )))?;
                name
            }
        };
        self.attached.push(Attachment {
            point: point.clone(),
            program,
        });
        Ok(())
    }

    fn attach_tc(
        &mut self,
        name: &'static str,
        interface: &str,
        kind: TcAttachType,
    ) -> Result<&'static str, DatapathError> {
        if nix_ifindex(interface).is_none() {
            return Err(DatapathError::NoInterface {
                name: interface.to_owned(),
            });
        }
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(name)
            .ok_or(DatapathError::MissingProgram { name })?
            .try_into()
            .map_err(Self::program_err(format!("{name} is not a classifier")))?;
        if prog.fd().is_err() {
            prog.load()
                .map_err(Self::program_err(format!("loading {name}")))?;
        }
        // Before TCX (6.6), TC programs hang off a clsact qdisc, which may
        // not be there yet. It is left in place on detach, as tc does.
        if aya::util::KernelVersion::current()
            .is_ok_and(|v| v < aya::util::KernelVersion::new(6, 6, 0))
        {
            let _ = aya::programs::tc::qdisc_add_clsact(interface);
        }
        prog.attach(interface, kind)
            .map_err(Self::program_err(format!(
                "attaching {name} to {interface}"
            )))?;
        Ok(name)
    }
}

/// The interface's index, or `None` if there is no such interface here.
fn nix_ifindex(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}
