//! Whether each attach point really enforces, asked of the kernel.
//!
//! What the agent did at attach time proves nothing a minute later: an
//! interface deleted and created again (a VPN restart, a hotplug NIC,
//! `ifdown/ifup`) keeps its name and loses its TC programs; a cgroup can be
//! removed; someone can unpin a link or delete a tc filter. So health is an
//! observation, made again and again: the target exists, the kernel lists
//! our program on its hook, and (for links) the pinned link that keeps it
//! there after the agent is still in bpffs (a classic TC filter needs no
//! pin: its qdisc holds it). An attach point that fails any of these is
//! DOWN, and `repair` attaches it again as soon as its target is back.

use std::{fs::File, os::fd::AsFd as _};

use aya::programs::links::FdLink;
use smtpgate_common::programs;

use super::{
    AttachMode, Datapath, DatapathError,
    attach::{BPF_TCX_EGRESS, BPF_TCX_INGRESS, ifindex},
    pins::{self, QueryTarget},
    tc_classic::{self, Hook},
};
use crate::config::AttachPoint;

// enum bpf_attach_type
const BPF_CGROUP_INET_EGRESS: u32 = 1;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
const BPF_CGROUP_INET6_CONNECT: u32 = 11;

/// The ids of the programs the kernel runs at `hook` of `ifindex` the way
/// `mode` attaches them: every TCX program on the hook, or the program of
/// smtpgate's classic filter (none if the filter is gone). "Is this TC
/// point enforcing with program X" is "does this contain X's id".
pub fn tc_programs(ifindex: u32, hook: Hook, mode: AttachMode) -> Result<Vec<u32>, Down> {
    match mode {
        AttachMode::Classic => tc_classic::classic_attached(ifindex, hook)
            .map(|id| id.into_iter().collect())
            .map_err(|e| Down::Query {
                error: format!("{:#}", anyhow::Error::new(e)),
            }),
        AttachMode::Tcx | AttachMode::CgroupLink => {
            let hook = match hook {
                Hook::Ingress => BPF_TCX_INGRESS,
                Hook::Egress => BPF_TCX_EGRESS,
            };
            pins::prog_query(QueryTarget::Ifindex(ifindex), hook).map_err(|e| query_err(&e))
        }
    }
}

/// Why an attach point does not enforce.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Down {
    #[error("interface {name:?} does not exist")]
    NoInterface { name: String },
    #[error("cgroup {path} does not exist")]
    NoCgroup { path: String },
    #[error("{program} is not attached (the kernel lists {found} other program(s) on this hook)")]
    NotAttached { program: &'static str, found: usize },
    #[error("the pinned link {link} is gone: {program} would stop enforcing with the agent")]
    PinMissing { program: &'static str, link: String },
    #[error("asking the kernel what is attached: {error}")]
    Query { error: String },
    #[error("attaching failed: {error}")]
    AttachFailed { error: String },
}

impl Down {
    /// Whether attaching again may help: the target is there, our program
    /// is not (or not held by a pin).
    #[must_use]
    pub fn repairable(&self) -> bool {
        matches!(self, Down::NotAttached { .. } | Down::PinMissing { .. })
    }
}

/// The programs an attach point runs when it is up, for the ones the agent
/// has not been able to attach yet (metrics and status list them DOWN).
#[must_use]
pub fn expected_programs(point: &AttachPoint) -> &'static [&'static str] {
    match point {
        AttachPoint::TcIngress { .. } => &[programs::TC_INGRESS],
        AttachPoint::TcEgress { .. } => &[programs::TC_EGRESS],
        AttachPoint::Cgroup { .. } => &[
            programs::CGROUP_CONNECT4,
            programs::CGROUP_CONNECT6,
            programs::CGROUP_EGRESS,
        ],
    }
}

fn query_err(e: &std::io::Error) -> Down {
    Down::Query {
        error: e.to_string(),
    }
}

impl Datapath {
    /// The kernel id of one of this agent's loaded programs.
    fn loaded_id(&self, name: &str) -> Option<u32> {
        self.ebpf.program(name)?.info().ok().map(|i| i.id())
    }

    /// Whether `point` enforces right now, as the kernel reports it.
    pub fn observe(&self, point: &AttachPoint) -> Result<(), Down> {
        let records: Vec<_> = self.attached.iter().filter(|a| &a.point == point).collect();
        let check = |program: &'static str, attached: &[u32], link: Option<&str>| {
            let ours = self.loaded_id(program);
            if !ours.is_some_and(|id| attached.contains(&id)) {
                return Err(Down::NotAttached {
                    program,
                    found: attached.len(),
                });
            }
            if let Some(link) = link
                && !self.pins.link(link).exists()
            {
                return Err(Down::PinMissing {
                    program,
                    link: link.to_owned(),
                });
            }
            Ok(())
        };
        match point {
            AttachPoint::TcIngress { interface } | AttachPoint::TcEgress { interface } => {
                let index = ifindex(interface).ok_or_else(|| Down::NoInterface {
                    name: interface.clone(),
                })?;
                if records.is_empty() {
                    return Err(Down::NotAttached {
                        program: expected_programs(point)[0],
                        found: 0,
                    });
                }
                let hook = if matches!(point, AttachPoint::TcIngress { .. }) {
                    Hook::Ingress
                } else {
                    Hook::Egress
                };
                for a in records {
                    let attached = tc_programs(index, hook, a.mode)?;
                    check(a.program, &attached, a.link.as_deref())?;
                }
                Ok(())
            }
            AttachPoint::Cgroup { path } => {
                let path = path.clone().unwrap_or_else(crate::config::cgroup2_root);
                let dir = File::open(&path).map_err(|_| Down::NoCgroup {
                    path: path.display().to_string(),
                })?;
                if records.is_empty() {
                    return Err(Down::NotAttached {
                        program: expected_programs(point)[0],
                        found: 0,
                    });
                }
                for a in records {
                    let hook = match a.program {
                        programs::CGROUP_CONNECT4 => BPF_CGROUP_INET4_CONNECT,
                        programs::CGROUP_CONNECT6 => BPF_CGROUP_INET6_CONNECT,
                        _ => BPF_CGROUP_INET_EGRESS,
                    };
                    let attached = pins::prog_query(QueryTarget::Fd(dir.as_fd()), hook)
                        .map_err(|e| query_err(&e))?;
                    check(a.program, &attached, a.link.as_deref())?;
                }
                // Every program the point needs, not just the ones recorded.
                for program in expected_programs(point) {
                    if !self
                        .attached
                        .iter()
                        .any(|a| &a.point == point && a.program == *program)
                    {
                        return Err(Down::NotAttached { program, found: 0 });
                    }
                }
                Ok(())
            }
        }
    }

    /// Makes `point` enforce again. A link that lost only its pin is
    /// pinned again from the fd this agent holds (attaching a second copy
    /// would be refused: the kernel allows a program once per hook).
    /// Anything else is attached from scratch: what the agent remembered of
    /// the point is forgotten, a pinned link that no longer works is
    /// replaced (see `adopt_link`), and a new one is pinned.
    pub fn repair(&mut self, point: &AttachPoint, down: &Down) -> Result<(), DatapathError> {
        if let Down::PinMissing { link, .. } = down
            && let Some(held) = self.links.remove(link)
        {
            let path = self.pins.link(link);
            let pinned = FdLink::from(held)
                .pin(&path)
                .map_err(|e| DatapathError::Pins {
                    path,
                    source: std::io::Error::other(e.to_string()),
                })?;
            self.links.insert(link.clone(), pinned);
            return Ok(());
        }
        self.forget(point);
        self.attach(point)
    }
}
