//! Attaching the programs to the hooks the config names, pinning the links,
//! and reconciling with what an earlier agent left pinned.
//!
//! TC programs attach through TCX links (kernel 6.6+) or, on older kernels
//! (and with `tc_mode = "classic"`), as classic clsact/cls_bpf filters (see
//! `tc_classic`); cgroup programs through cgroup links. All of them sit
//! beside other programs on the same hook (systemd's IPAddressDeny= and
//! friends) instead of replacing them, outlive the agent (links pinned,
//! filters held by their qdisc) and can be atomically given a new program.

use std::{collections::BTreeSet, fs::File, os::fd::AsFd as _, path::Path};

use aya::programs::{
    CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, LinkOrder, SchedClassifier,
    TcAttachType, links::FdLink, tc::TcAttachOptions,
};
use smtpgate_common::programs;
use tracing::{info, warn};

use super::{
    Datapath, DatapathError,
    pins::{self, QueryTarget},
    tc_classic::{self, Hook},
};
use crate::config::{AttachPoint, TcMode};

/// One attached program.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Attachment {
    pub point: AttachPoint,
    pub program: &'static str,
    /// For TC: what the device puts in front of the IP header, which
    /// chose `program`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub link_layer: Option<LinkLayer>,
    /// The pinned link's file name; `None` for a classic TC filter, which
    /// its qdisc holds, not a pin.
    pub link: Option<String>,
    /// Whether an earlier agent's link or filter was kept (given the new
    /// program).
    pub adopted: bool,
    pub mode: AttachMode,
}

/// How a program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttachMode {
    /// A TCX link (Linux 6.6+).
    Tcx,
    /// A clsact qdisc's direct-action cls_bpf filter.
    Classic,
    /// A cgroup BPF link.
    CgroupLink,
}

impl std::fmt::Display for AttachMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AttachMode::Tcx => "tcx",
            AttachMode::Classic => "classic",
            AttachMode::CgroupLink => "cgroup-link",
        })
    }
}

/// `enum bpf_attach_type` values for the TCX hooks.
pub(super) const BPF_TCX_INGRESS: u32 = 46;
pub(super) const BPF_TCX_EGRESS: u32 = 47;

/// Whether this kernel has TCX (Linux 6.6+). Asking which programs are
/// attached at the loopback interface's TCX ingress (ifindex 1 in every
/// network namespace) needs no program and changes nothing; a kernel
/// without TCX does not know the attach type and says EINVAL.
pub fn tcx_supported() -> Result<bool, std::io::Error> {
    match pins::prog_query(QueryTarget::Ifindex(1), BPF_TCX_INGRESS) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The attach mode for TC points: what the config asks, given whether
/// the kernel has TCX.
fn resolve_tc_mode(wanted: TcMode, tcx: bool) -> Result<AttachMode, DatapathError> {
    match (wanted, tcx) {
        (TcMode::Auto | TcMode::Tcx, true) => Ok(AttachMode::Tcx),
        (TcMode::Tcx, false) => Err(DatapathError::NoTcx),
        (TcMode::Auto, false) | (TcMode::Classic, _) => Ok(AttachMode::Classic),
    }
}

impl Datapath {
    /// Chooses how TC points attach (before the first one is): `auto` asks
    /// the kernel whether it has TCX; `tcx` on a kernel without it is an
    /// error, not a quiet fallback.
    pub fn set_tc_mode(&mut self, wanted: TcMode) -> Result<AttachMode, DatapathError> {
        let tcx = tcx_supported().map_err(DatapathError::TcxProbe)?;
        let mode = resolve_tc_mode(wanted, tcx)?;
        info!(configured = %wanted, kernel_has_tcx = tcx, used = %mode, "TC attach mode");
        self.tc_mode = Some(mode);
        Ok(mode)
    }

    fn tc_mode(&mut self) -> Result<AttachMode, DatapathError> {
        match self.tc_mode {
            Some(m) => Ok(m),
            None => self.set_tc_mode(TcMode::Auto),
        }
    }

    /// Attaches (or adopts) the programs for one attach point.
    pub fn attach(&mut self, point: &AttachPoint) -> Result<(), DatapathError> {
        match point {
            AttachPoint::TcIngress { interface } => {
                self.attach_tc(point, interface, TcAttachType::Ingress)
            }
            AttachPoint::TcEgress { interface } => {
                self.attach_tc(point, interface, TcAttachType::Egress)
            }
            AttachPoint::Cgroup { path } => {
                let path = path.clone().unwrap_or_else(crate::config::cgroup2_root);
                self.attach_cgroup(point, &path)
            }
        }
    }

    /// Loads the programs a point will need, without attaching them: for a
    /// point that waits for its interface, so that attaching takes
    /// milliseconds when it appears instead of a verifier run. Which kind of
    /// device it will be is not known yet (the interfaces that come late
    /// are often VPN tunnels), so both variants are loaded.
    pub fn preload(&mut self, point: &AttachPoint) -> Result<(), DatapathError> {
        let kind = match point {
            AttachPoint::TcIngress { .. } => TcAttachType::Ingress,
            AttachPoint::TcEgress { .. } => TcAttachType::Egress,
            AttachPoint::Cgroup { .. } => return Ok(()),
        };
        for layer in [LinkLayer::Ethernet, LinkLayer::None] {
            load::<SchedClassifier>(&mut self.ebpf, tc_program(kind, layer))?;
        }
        Ok(())
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
        let mode = link_mode(point);
        self.record(point, name, Some(id), false, mode);
        Ok(())
    }

    pub(super) fn record(
        &mut self,
        point: &AttachPoint,
        program: &'static str,
        link: Option<String>,
        adopted: bool,
        mode: AttachMode,
    ) {
        let link_layer = match program {
            programs::TC_INGRESS | programs::TC_EGRESS => Some(LinkLayer::Ethernet),
            programs::TC_INGRESS_L3 | programs::TC_EGRESS_L3 => Some(LinkLayer::None),
            _ => None,
        };
        info!(%point, program, ?link_layer, link = link.as_deref().unwrap_or("-"), adopted, %mode, "attached");
        self.attached.push(Attachment {
            point: point.clone(),
            program,
            link_layer,
            link,
            adopted,
            mode,
        });
    }

    /// Attaches the program for the device's link layer, asked anew each
    /// time: an interface deleted and created again may be another kind of
    /// device under the same name. The link's id (and pin) is the hook and
    /// interface only, so an adopted link is given the right program by
    /// BPF_LINK_UPDATE, whichever one it held.
    fn attach_tc(
        &mut self,
        point: &AttachPoint,
        interface: &str,
        kind: TcAttachType,
    ) -> Result<(), DatapathError> {
        if ifindex(interface).is_none() {
            return Err(DatapathError::NoInterface {
                name: interface.to_owned(),
            });
        }
        let name = tc_program(kind, link_layer(interface)?);
        let hook = if kind == TcAttachType::Ingress {
            "tc-ingress"
        } else {
            "tc-egress"
        };
        let id = pins::link_id(hook, interface, None);
        load::<SchedClassifier>(&mut self.ebpf, name)?;
        if self.tc_mode()? == AttachMode::Classic {
            let hook = if kind == TcAttachType::Ingress {
                Hook::Ingress
            } else {
                Hook::Egress
            };
            return self.attach_tc_classic(point, name, interface, hook);
        }
        if self.adopt_link(&id, name)? {
            self.record(point, name, Some(id), true, AttachMode::Tcx);
            return Ok(());
        }
        let prog: &mut SchedClassifier = program(&mut self.ebpf, name)?;
        // TCX explicitly: aya's attach() picks TCX or netlink by kernel
        // version, and a distribution kernel with TCX backported (or a
        // version string that lies) must get what the probe found.
        let link_id = prog
            .attach_with_options(
                interface,
                kind,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
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
                self.record(point, name, Some(id), true, AttachMode::CgroupLink);
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
            self.record(point, name, Some(id), true, AttachMode::CgroupLink);
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
    /// agent attached that the config no longer names (pinned links, and
    /// classic TC filters on hooks this agent does not use in classic mode:
    /// removed points, or points now attached through TCX), removes older
    /// pin layouts, and pins this agent's maps and programs. Attaching first
    /// and removing after means there is never a moment without enforcement.
    pub fn reconcile(&mut self) -> Result<(), DatapathError> {
        let pin_err = |path: &Path| {
            let path = path.to_owned();
            move |source| DatapathError::Pins { path, source }
        };
        tc_classic::remove_ours_except(&self.classic_hooks()).map_err(|source| {
            DatapathError::Classic {
                op: "removing classic TC filters no longer in the config".into(),
                source,
            }
        })?;
        let wanted: BTreeSet<&str> = self
            .attached
            .iter()
            .filter_map(|a| a.link.as_deref())
            .collect();
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
    /// Returns how many classic TC filters it deleted.
    pub fn detach_all(&mut self) -> Result<usize, DatapathError> {
        // Classic filters first: if deleting one fails, the pins are still
        // there for the next try, and nothing claims enforcement stopped.
        let filters = remove_classic_filters()?;
        let root = self.pins.root().to_owned();
        pins::remove_tree(&root).map_err(|source| DatapathError::Pins { path: root, source })?;
        // Closing our own link fds detaches what the pins no longer hold.
        self.links.clear();
        super::redirect::remove_routing();
        self.attached.clear();
        Ok(filters)
    }
}

/// Deletes every smtpgate classic TC filter in this network namespace:
/// for `detach`, with or without an agent. Returns how many.
pub fn remove_classic_filters() -> Result<usize, DatapathError> {
    tc_classic::remove_ours_except(&BTreeSet::new()).map_err(|source| DatapathError::Classic {
        op: "removing smtpgate's classic TC filters".into(),
        source,
    })
}

/// How a link this module pins is attached at `point`.
fn link_mode(point: &AttachPoint) -> AttachMode {
    match point {
        AttachPoint::Cgroup { .. } => AttachMode::CgroupLink,
        _ => AttachMode::Tcx,
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

/// What a device puts in front of the IP header: what the TC programs must
/// skip to find it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkLayer {
    /// An Ethernet header (veth, bridges, macvlan, most NICs).
    Ethernet,
    /// Nothing: the packet starts with the IP header, and skb->protocol
    /// says which (tun, WireGuard, PPP, raw IP, ipip, ip6tnl, sit).
    None,
}

/// The TC program for a direction and a link layer.
fn tc_program(kind: TcAttachType, layer: LinkLayer) -> &'static str {
    match (kind == TcAttachType::Ingress, layer) {
        (true, LinkLayer::Ethernet) => programs::TC_INGRESS,
        (false, LinkLayer::Ethernet) => programs::TC_EGRESS,
        (true, LinkLayer::None) => programs::TC_INGRESS_L3,
        (false, LinkLayer::None) => programs::TC_EGRESS_L3,
    }
}

/// The link layer of `interface`, from its device type (ARPHRD_*).
///
/// Asked with SIOCGIFHWADDR on a socket, which answers for this process's
/// network namespace. /sys/class/net/<if>/type answers for the namespace
/// sysfs was mounted in, which is not this one in an agent started with
/// `nsenter --net` (or `ip netns exec` without its remount).
pub(super) fn link_layer(interface: &str) -> Result<LinkLayer, DatapathError> {
    let arphrd = device_type(interface)?;
    classify_device(interface, arphrd)
}

fn device_type(interface: &str) -> Result<u16, DatapathError> {
    let err = |source| DatapathError::DeviceType {
        interface: interface.to_owned(),
        source,
    };
    // SAFETY: an all-zero ifreq is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let name = interface.as_bytes();
    if name.is_empty() || name.len() >= req.ifr_name.len() || name.contains(&0) {
        return Err(DatapathError::NoInterface {
            name: interface.to_owned(),
        });
    }
    for (d, s) in req.ifr_name.iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket call; the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh fd that nothing else owns.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: SIOCGIFHWADDR reads ifr_name and writes ifr_hwaddr, both
    // inside `req`.
    let ret = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::SIOCGIFHWADDR,
            &raw mut req,
        )
    };
    if ret != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENODEV) {
            return Err(DatapathError::NoInterface {
                name: interface.to_owned(),
            });
        }
        return Err(err(e));
    }
    // SAFETY: the kernel filled in ifr_hwaddr; its family is the ARPHRD type.
    Ok(unsafe { req.ifr_ifru.ifru_hwaddr.sa_family })
}

/// Which programs can read a device of type `arphrd`. Anything not known to
/// start its packets with Ethernet or with the IP header is refused by name:
/// guessing wrong would let its SMTP traffic pass unseen.
fn classify_device(interface: &str, arphrd: u16) -> Result<LinkLayer, DatapathError> {
    match arphrd {
        ARPHRD_ETHER => Ok(LinkLayer::Ethernet),
        ARPHRD_PPP | ARPHRD_RAWIP | ARPHRD_TUNNEL | ARPHRD_TUNNEL6 | ARPHRD_SIT | ARPHRD_NONE => {
            Ok(LinkLayer::None)
        }
        _ => Err(DatapathError::UnsupportedDevice {
            interface: interface.to_owned(),
            arphrd,
            kind: device_kind(arphrd),
        }),
    }
}

// linux/if_arp.h
const ARPHRD_ETHER: u16 = 1;
const ARPHRD_PPP: u16 = 512;
const ARPHRD_RAWIP: u16 = 519;
const ARPHRD_TUNNEL: u16 = 768;
const ARPHRD_TUNNEL6: u16 = 769;
const ARPHRD_LOOPBACK: u16 = 772;
const ARPHRD_SIT: u16 = 776;
const ARPHRD_IPGRE: u16 = 778;
const ARPHRD_IP6GRE: u16 = 823;
const ARPHRD_NONE: u16 = 0xfffe;

/// A device type's name, for messages.
fn device_kind(arphrd: u16) -> &'static str {
    match arphrd {
        ARPHRD_ETHER => "Ethernet",
        ARPHRD_PPP => "PPP",
        ARPHRD_RAWIP => "raw IP",
        ARPHRD_TUNNEL => "ipip",
        ARPHRD_TUNNEL6 => "ip6tnl",
        ARPHRD_LOOPBACK => "loopback",
        ARPHRD_SIT => "sit",
        ARPHRD_IPGRE => "gre",
        ARPHRD_IP6GRE => "ip6gre",
        ARPHRD_NONE => "header-less (tun, WireGuard)",
        24 => "IEEE 1394",
        32 => "InfiniBand",
        256..=259 => "SLIP",
        280 => "CAN",
        513 => "Cisco HDLC",
        518 => "raw HDLC",
        779 => "PIM register",
        801 => "802.11",
        803 => "802.11 radiotap",
        804 => "802.15.4",
        824 => "netlink monitor",
        825 => "6LoWPAN",
        826 => "vsock monitor",
        0xffff => "void",
        _ => "unknown",
    }
}

/// Why a device type is refused, and what to do instead.
pub(super) fn unsupported_hint(arphrd: u16) -> &'static str {
    match arphrd {
        ARPHRD_LOOPBACK => {
            "loopback traffic never leaves this host; for the host's own processes, attach hook = \"cgroup\""
        }
        ARPHRD_IPGRE | ARPHRD_IP6GRE => {
            "a GRE device's link-layer header depends on how the tunnel was made; attach to the client-facing interface instead"
        }
        _ => {
            "smtpgate reads Ethernet devices and devices without a link-layer header (tun, WireGuard, PPP, raw IP, ipip, ip6tnl, sit); attach to one of those on the path instead"
        }
    }
}

/// The interface's index, or `None` if there is no such interface here.
pub(super) fn ifindex(name: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(name).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tc_mode_follows_the_config_and_the_kernel() {
        assert_eq!(
            resolve_tc_mode(TcMode::Auto, true).unwrap(),
            AttachMode::Tcx
        );
        assert_eq!(
            resolve_tc_mode(TcMode::Auto, false).unwrap(),
            AttachMode::Classic
        );
        assert_eq!(resolve_tc_mode(TcMode::Tcx, true).unwrap(), AttachMode::Tcx);
        let e = resolve_tc_mode(TcMode::Tcx, false).unwrap_err().to_string();
        assert!(e.contains("no TCX") && e.contains("classic"), "{e}");
        for tcx in [true, false] {
            assert_eq!(
                resolve_tc_mode(TcMode::Classic, tcx).unwrap(),
                AttachMode::Classic
            );
        }
    }

    #[test]
    fn device_types_choose_a_program_or_are_refused_by_name() {
        assert_eq!(classify_device("eth0", 1).unwrap(), LinkLayer::Ethernet);
        for arphrd in [65534, 512, 519, 768, 769, 776] {
            assert_eq!(
                classify_device("tun0", arphrd).unwrap(),
                LinkLayer::None,
                "ARPHRD {arphrd}"
            );
        }
        for (arphrd, kind) in [
            (772, "loopback"),
            (778, "gre"),
            (823, "ip6gre"),
            (32, "InfiniBand"),
            (4242, "unknown"),
        ] {
            let e = classify_device("x1", arphrd).unwrap_err();
            let text = e.to_string();
            assert!(
                matches!(&e, DatapathError::UnsupportedDevice { arphrd: a, kind: k, .. } if *a == arphrd && *k == kind),
                "{text}"
            );
            assert!(
                text.starts_with(&format!(
                    "interface \"x1\" is a {kind} device (ARPHRD {arphrd}), which smtpgate cannot classify: "
                )),
                "{text}"
            );
        }
        let lo = classify_device("lo", 772).unwrap_err().to_string();
        assert!(lo.contains("hook = \"cgroup\""), "{lo}");
    }

    #[test]
    fn programs_follow_direction_and_link_layer() {
        let p = |kind, layer| tc_program(kind, layer);
        assert_eq!(
            p(TcAttachType::Ingress, LinkLayer::Ethernet),
            programs::TC_INGRESS
        );
        assert_eq!(
            p(TcAttachType::Egress, LinkLayer::Ethernet),
            programs::TC_EGRESS
        );
        assert_eq!(
            p(TcAttachType::Ingress, LinkLayer::None),
            programs::TC_INGRESS_L3
        );
        assert_eq!(
            p(TcAttachType::Egress, LinkLayer::None),
            programs::TC_EGRESS_L3
        );
    }

    /// The real ioctl, on this namespace's loopback device.
    #[test]
    fn loopback_is_refused_from_the_kernel_answer() {
        match link_layer("lo") {
            Err(DatapathError::UnsupportedDevice { arphrd: 772, .. }) => {}
            other => panic!("lo: {other:?}"),
        }
        assert!(matches!(
            link_layer("sg-no-such-if0"),
            Err(DatapathError::NoInterface { .. })
        ));
    }
}
