//! Attaching the programs to the hooks the config names.
//!
//! TC programs attach through TCX where the kernel has it (6.6+), netlink
//! clsact otherwise; aya picks. cgroup programs attach through BPF links,
//! which sit beside other programs on the same cgroup (systemd's
//! IPAddressDeny= and friends) instead of replacing them.

use std::fs::File;

use aya::programs::{
    CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, SchedClassifier, TcAttachType,
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
    pub fn attach(&mut self, point: &AttachPoint) -> Result<(), DatapathError> {
        match point {
            AttachPoint::TcIngress { interface } => self.attach_tc(
                point,
                programs::TC_INGRESS,
                interface,
                TcAttachType::Ingress,
            ),
            AttachPoint::TcEgress { interface } => {
                self.attach_tc(point, programs::TC_EGRESS, interface, TcAttachType::Egress)
            }
            AttachPoint::Cgroup { path } => {
                let path = path.clone().unwrap_or_else(crate::config::cgroup2_root);
                self.attach_cgroup(point, &path)
            }
        }
    }

    fn attach_tc(
        &mut self,
        point: &AttachPoint,
        name: &'static str,
        interface: &str,
        kind: TcAttachType,
    ) -> Result<(), DatapathError> {
        if ifindex(interface).is_none() {
            return Err(DatapathError::NoInterface {
                name: interface.to_owned(),
            });
        }
        let prog: &mut SchedClassifier = program(&mut self.ebpf, name)?;
        if prog.fd().is_err() {
            prog.load()
                .map_err(program_err(format!("loading {name}")))?;
        }
        // Before TCX (6.6), TC programs hang off a clsact qdisc, which may
        // not be there yet. It is left in place on detach, as tc does.
        let before_tcx = aya::util::KernelVersion::current()
            .is_ok_and(|v| v < aya::util::KernelVersion::new(6, 6, 0));
        if before_tcx {
            let _ = aya::programs::tc::qdisc_add_clsact(interface);
        }
        prog.attach(interface, kind)
            .map_err(program_err(format!("attaching {name} to {interface}")))?;
        self.attached.push(Attachment {
            point: point.clone(),
            program: name,
        });
        Ok(())
    }

    fn attach_cgroup(
        &mut self,
        point: &AttachPoint,
        path: &std::path::Path,
    ) -> Result<(), DatapathError> {
        let cgroup = File::open(path).map_err(|source| DatapathError::Cgroup {
            path: path.to_owned(),
            source,
        })?;
        let at = path.display();
        // Link attachments take no mode flags (the kernel refuses them with
        // EINVAL) and always coexist with other programs: `Single` is aya's
        // name for "no flags". The connect hooks go first, so that when the
        // egress program starts enforcing, they are already in place.
        for name in [programs::CGROUP_CONNECT4, programs::CGROUP_CONNECT6] {
            let prog: &mut CgroupSockAddr = program(&mut self.ebpf, name)?;
            if prog.fd().is_err() {
                prog.load()
                    .map_err(program_err(format!("loading {name}")))?;
            }
            prog.attach(&cgroup, CgroupAttachMode::Single)
                .map_err(program_err(format!("attaching {name} to {at}")))?;
            self.attached.push(Attachment {
                point: point.clone(),
                program: name,
            });
        }
        let name = programs::CGROUP_EGRESS;
        let prog: &mut CgroupSkb = program(&mut self.ebpf, name)?;
        if prog.fd().is_err() {
            prog.load()
                .map_err(program_err(format!("loading {name}")))?;
        }
        prog.attach(
            &cgroup,
            CgroupSkbAttachType::Egress,
            CgroupAttachMode::Single,
        )
        .map_err(program_err(format!("attaching {name} to {at}")))?;
        self.attached.push(Attachment {
            point: point.clone(),
            program: name,
        });
        Ok(())
    }
}

fn program_err(op: String) -> impl FnOnce(aya::programs::ProgramError) -> DatapathError {
    move |source| DatapathError::Program { op, source }
}

/// A program of the object, as its concrete type.
fn program<'a, P>(ebpf: &'a mut aya::Ebpf, name: &'static str) -> Result<&'a mut P, DatapathError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(DatapathError::MissingProgram { name })?
        .try_into()
        .map_err(program_err(format!("{name} has the wrong program type")))
}

/// The interface's index, or `None` if there is no such interface here.
fn ifindex(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}
