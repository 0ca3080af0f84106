//! Attaching the programs to the hooks the config names, pinning the links,
//! and reconciling with what an earlier agent left pinned.
//!
//! TC programs attach through TCX links (kernel 6.6+), cgroup programs
//! through cgroup links; both sit beside other programs on the same hook
//! (systemd's IPAddressDeny= and friends) instead of replacing them, and both
//! can be pinned and atomically given a new program.

use std::{collections::BTreeSet, fs::File, os::fd::AsFd as _, path::Path};

use aya::programs::{
    CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, SchedClassifier,
    TcAttachType, links::FdLink,
};
use smtpgate_common::programs;
use tracing::{info, warn};

use super::{Datapath, DatapathError, pins};
use crate::config::AttachPoint;

/// One attached program.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Attachment {
    pub point: AttachPoint,
    pub program: &'static str,
    /// The pinned link's file name.
    pub link: String,
    /// Whether an earlier agent's link was kept (given the new program).
    pub adopted: bool,
}

impl Datapath {
    /// Attaches (or adopts) the programs for one attach point.
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

    /// Loads the programs a point will need, without attaching them: for a
    /// point that waits for its interface, so that attaching takes
    /// milliseconds when it appears instead of a verifier run.
    pub fn preload(&mut self, point: &AttachPoint) -> Result<(), DatapathError> {
        match point {
            AttachPoint::TcIngress { .. } => load::<SchedClassifier>(&mut self.ebpf, programs::TC_INGRESS),
            AttachPoint::TcEgress { .. } => load::<SchedClassifier>(&mut self.ebpf, programs::TC_EGRESS),
            AttachPoint::Cgroup { .. } => Ok(()),
        }
    }

    /// Gives an earlier agent's pinned link this agent's program, if there
    /// is such a link and it still works. Returns whether it did.
    fn adopt_link(&mut self, id: &str, name: &'static str) -> Result<bool, DatapathError> {
        let path = self.pins.link(id);
        if !path.exists() {
            return Ok(false);
        }
        let prog_fd = self
            .ebpf
            .program(name)
            .ok_or(DatapathError::MissingProgram { name })?
            .fd()
            .map_err(program_err(format!("{name} is not loaded")))?
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| DatapathError::Pins {
                path: path.clone(),
                source,
            })?;
        let updated =
            pins::obj_get(&path).and_then(|link| pins::link_update(link.as_fd(), prog_fd.as_fd()));
        match updated {
            Ok(()) => Ok(true),
            Err(e) => {
                // A link whose interface or cgroup went away cannot be
                // updated: replace it.
                warn!(link = id, error = %e, "pinned link is stale; attaching anew");
                pins::unpin(&path).map_err(|source| DatapathError::Pins { path, source })?;
                Ok(false)
            }
        }
    }

    /// Pins a link this agent just created and records the attachment.
    /// Only BPF links can be pinned: a TC attachment made through netlink
    /// (before TCX, Linux 6.6) is an error here rather than a silent loss of
    /// enforcement when the agent stops.
    fn keep_link<L>(
        &mut self,
        point: &AttachPoint,
        name: &'static str,
        id: String,
        link: L,
    ) -> Result<(), DatapathError>
    where
        FdLink: TryFrom<L>,
        <FdLink as TryFrom<L>>::Error: std::fmt::Display,
    {
        let path = self.pins.link(&id);
        let pin_err = |e: String| DatapathError::Pins {
            path: path.clone(),
            source: std::io::Error::other(e),
        };
        let link = FdLink::try_from(link).map_err(|e| {
            pin_err(format!(
                "not a pinnable BPF link (TC needs TCX, Linux 6.6+): {e}"
            ))
        })?;
        let pinned = link.pin(&path).map_err(|e| pin_err(e.to_string()))?;
        self.links.insert(id.clone(), pinned);
        self.record(point, name, id, false);
        Ok(())
    }

    fn record(&mut self, point: &AttachPoint, program: &'static str, link: String, adopted: bool) {
        info!(%point, program, link, adopted, "attached");
        self.attached.push(Attachment {
            point: point.clone(),
            program,
            link,
            adopted,
        });
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
        let hook = if kind == TcAttachType::Ingress {
            "tc-ingress"
        } else {
            "tc-egress"
        };
        let id = pins::link_id(hook, interface, None);
        load::<SchedClassifier>(&mut self.ebpf, name)?;
        if self.adopt_link(&id, name)? {
            self.record(point, name, id, true);
            return Ok(());
        }
        let prog: &mut SchedClassifier = program(&mut self.ebpf, name)?;
        let link_id = prog
            .attach(interface, kind)
            .map_err(program_err(format!("attaching {name} to {interface}")))?;
        let link = prog
            .take_link(link_id)
            .map_err(program_err(format!("taking the {name} link")))?;
        self.keep_link(point, name, id, link)
    }

    fn attach_cgroup(&mut self, point: &AttachPoint, path: &Path) -> Result<(), DatapathError> {
        let cgroup = File::open(path).map_err(|source| DatapathError::Cgroup {
            path: path.to_owned(),
            source,
        })?;
        let at = path.display().to_string();
        // Cgroup links take no mode flags (the kernel refuses them with
        // EINVAL) and always coexist with other programs: `Single` is aya's
        // name for "no flags". The connect hooks go first, so that when the
        // egress program starts enforcing, they are already in place.
        for name in [programs::CGROUP_CONNECT4, programs::CGROUP_CONNECT6] {
            let id = pins::link_id("cgroup", &at, Some(name));
            load::<CgroupSockAddr>(&mut self.ebpf, name)?;
            if self.adopt_link(&id, name)? {
                self.record(point, name, id, true);
                continue;
            }
            let prog: &mut CgroupSockAddr = program(&mut self.ebpf, name)?;
            let link_id = prog
                .attach(&cgroup, CgroupAttachMode::Single)
                .map_err(program_err(format!("attaching {name} to {at}")))?;
            let link = prog
                .take_link(link_id)
                .map_err(program_err(format!("taking the {name} link")))?;
            self.keep_link(point, name, id, link)?;
        }
        let name = programs::CGROUP_EGRESS;
        let id = pins::link_id("cgroup", &at, Some(name));
        load::<CgroupSkb>(&mut self.ebpf, name)?;
        if self.adopt_link(&id, name)? {
            self.record(point, name, id, true);
            return Ok(());
        }
        let prog: &mut CgroupSkb = program(&mut self.ebpf, name)?;
        let link_id = prog
            .attach(
                &cgroup,
                CgroupSkbAttachType::Egress,
                CgroupAttachMode::Single,
            )
            .map_err(program_err(format!("attaching {name} to {at}")))?;
        let link = prog
            .take_link(link_id)
            .map_err(program_err(format!("taking the {name} link")))?;
        self.keep_link(point, name, id, link)
    }

    /// After every attach point is in place: detaches what an earlier
    /// agent attached that the config no longer names, removes older pin
    /// layouts, and pins this agent's maps and programs. Attaching first and
    /// removing after means there is never a moment without enforcement.
    pub fn reconcile(&mut self) -> Result<(), DatapathError> {
        let pin_err = |path: &Path| {
            let path = path.to_owned();
            move |source| DatapathError::Pins { path, source }
        };
        let wanted: BTreeSet<&str> = self.attached.iter().map(|a| a.link.as_str()).collect();
        for stale in self
            .pins
            .links()
            .into_iter()
            .filter(|l| !wanted.contains(l.as_str()))
        {
            let path = self.pins.link(&stale);
            pins::unpin(&path).map_err(pin_err(&path))?;
            self.links.remove(&stale);
            info!(link = stale, "detached: no longer in the config");
        }
        for old in self.pins.other_layouts() {
            pins::remove_tree(&old).map_err(pin_err(&old))?;
            info!(layout = %old.display(), "removed an older pin layout");
        }
        let program_pins: Vec<_> = self
            .ebpf
            .programs()
            .filter(|(_, p)| p.fd().is_ok())
            .map(|(name, _)| (name.to_owned(), self.pins.program(name)))
            .collect();
        for (name, path) in program_pins {
            let Some(prog) = self.ebpf.program_mut(&name) else {
                continue;
            };
            pins::unpin(&path).map_err(pin_err(&path))?;
            prog.pin(&path).map_err(|e| DatapathError::Pins {
                path: path.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
        }
        Ok(())
    }

    /// Forgets an attach point's programs; `reconcile` then detaches them.
    pub fn forget(&mut self, point: &AttachPoint) {
        self.attached.retain(|a| &a.point != point);
    }

    /// Removes every pin and detaches every program: the end of enforcement.
    pub fn detach_all(&mut self) -> Result<(), DatapathError> {
        let root = self.pins.root().to_owned();
        pins::remove_tree(&root).map_err(|source| DatapathError::Pins { path: root, source })?;
        // Closing our own link fds detaches what the pins no longer hold.
        self.links.clear();
        super::redirect::remove_routing();
        self.attached.clear();
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

/// Loads a program into the kernel, once.
fn load<P: Loadable>(ebpf: &mut aya::Ebpf, name: &'static str) -> Result<(), DatapathError>
where
    for<'a> &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog: &mut P = program(ebpf, name)?;
    if !prog.is_loaded() {
        prog.load_it()
            .map_err(program_err(format!("loading {name}")))?;
    }
    Ok(())
}

/// The program types this module loads, behind one interface.
trait Loadable {
    fn is_loaded(&self) -> bool;
    fn load_it(&mut self) -> Result<(), aya::programs::ProgramError>;
}

macro_rules! loadable {
    ($($t:ty),*) => {$(
        impl Loadable for $t {
            fn is_loaded(&self) -> bool {
                self.fd().is_ok()
            }
            fn load_it(&mut self) -> Result<(), aya::programs::ProgramError> {
                self.load()
            }
        }
    )*};
}

loadable!(SchedClassifier, CgroupSkb, CgroupSockAddr);

/// The interface's index, or `None` if there is no such interface here.
pub(super) fn ifindex(name: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(name).ok()
}
