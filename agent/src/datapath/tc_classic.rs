//! Classic TC, for kernels without TCX (before Linux 6.6): a `clsact` qdisc
//! and a direct-action `cls_bpf` filter, set up over rtnetlink.
//!
//! A classic filter is not a BPF link and cannot be pinned, but it does not
//! need to be: the qdisc holds the program, and the program holds its maps,
//! until the filter is deleted. So it outlives the agent (kill -9, upgrade)
//! exactly as a pinned TCX link does, and keeps enforcing the policy in the
//! pinned maps, which the next agent adopts and goes on writing.
//!
//! smtpgate's filter is the one at preference [`PRIORITY`], handle
//! [`HANDLE`], protocol `all`, kind `bpf`, whose program name starts with
//! `smtpgate_tc`. `tc filter show dev lan0 ingress` shows it as
//! `filter protocol all pref 25 bpf chain 0 handle 0x5347 smtpgate_tc_ingress
//! direct-action`. A restarted agent finds it there and gives it the new
//! program in one RTM_NEWTFILTER (NLM_F_REPLACE on the same preference and
//! handle): cls_bpf swaps the program under RCU, so no packet goes without
//! one. Nothing is recorded on disk: what is attached is read back from the
//! kernel, which is the truth.
//!
//! One smtpgate per network namespace: the preference and handle say
//! "smtpgate", not which agent.

use std::{
    collections::{BTreeSet, HashMap},
    io,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
};

use rtnetlink::{
    packet_core::{
        DecodeError, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST,
        NetlinkHeader, NetlinkMessage, NetlinkPayload,
    },
    packet_route::{
        RouteNetlinkMessage,
        link::LinkMessage,
        tc::{TcAttribute, TcBpfFlags, TcFilterBpfOption, TcHandle, TcMessage, TcOption},
    },
    sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE},
};
use tracing::info;

use super::{AttachMode, Datapath, DatapathError, attach::ifindex};
use crate::config::AttachPoint;

/// smtpgate's filter preference. Lower runs first: smtpgate looks at every
/// packet before filters at the usual preferences (tc's own choice starts
/// at 49152), and since it passes what it does not deny on to the next
/// filter (TC_ACT_UNSPEC), running first takes nothing from the others.
/// A foreign filter at a lower preference that returns "OK" for a packet
/// ends classification before smtpgate sees it.
pub const PRIORITY: u16 = 25;
/// smtpgate's filter handle at that preference ("SG").
pub const HANDLE: u32 = 0x5347;
/// Program names of smtpgate's classifiers start with this.
const PROGRAM_PREFIX: &str = "smtpgate_tc";

const ETH_P_ALL: u16 = 0x0003;
/// `TC_H_CLSACT`, the clsact (and ingress) qdisc's parent, and its handle.
const CLSACT_PARENT: TcHandle = TcHandle::CLSACT;
const CLSACT_HANDLE: TcHandle = TcHandle {
    major: 0xffff,
    minor: 0,
};
/// `NLMSGERR_ATTR_MSG`: the kernel's extended-ack error text.
const NLMSGERR_ATTR_MSG: u16 = 1;
const NLM_F_CAPPED: u16 = 0x100;
const NLM_F_ACK_TLVS: u16 = 0x200;

/// The two TC hooks of an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Hook {
    Ingress,
    Egress,
}

impl Hook {
    fn parent(self) -> TcHandle {
        TcHandle {
            major: 0xffff,
            minor: match self {
                Hook::Ingress => TcHandle::MIN_INGRESS,
                Hook::Egress => TcHandle::MIN_EGRESS,
            },
        }
    }
}

impl std::fmt::Display for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Hook::Ingress => "ingress",
            Hook::Egress => "egress",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClassicError {
    #[error("opening a netlink socket")]
    Socket(#[source] io::Error),
    #[error("{op} (interface index {ifindex}){}", message.as_ref().map_or(String::new(), |m| format!(": {m}")))]
    Netlink {
        op: &'static str,
        ifindex: u32,
        /// The kernel's extended-ack text, when it gave one.
        message: Option<String>,
        #[source]
        source: io::Error,
    },
    #[error("decoding the kernel's reply to {op}")]
    Decode {
        op: &'static str,
        #[source]
        source: DecodeError,
    },
    #[error(
        "interface index {ifindex} has an `ingress` qdisc, which has no egress hook: \
         use tc-ingress there, or replace it with clsact (`tc qdisc del dev IF ingress`, \
         which also deletes its filters)"
    )]
    IngressQdisc { ifindex: u32 },
    #[error(
        "interface index {ifindex} has a {kind:?} qdisc where clsact belongs (handle ffff:); \
         smtpgate does not remove other tools' qdiscs"
    )]
    ForeignQdisc { ifindex: u32, kind: String },
    #[error(
        "{hook} of interface index {ifindex}: preference {PRIORITY} handle {HANDLE:#x} is taken \
         by a filter that is not smtpgate's ({found}); smtpgate's classic filter needs that slot"
    )]
    Occupied {
        ifindex: u32,
        hook: Hook,
        found: String,
    },
}

/// One filter on a hook, as the kernel dumps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    pub priority: u16,
    /// 0 for the entry that stands for a preference's filter list itself.
    pub handle: u32,
    /// Host order (`ETH_P_ALL` is 3).
    pub protocol: u16,
    pub chain: u32,
    pub kind: String,
    pub name: Option<String>,
    pub prog_id: Option<u32>,
    pub direct_action: bool,
}

impl Filter {
    /// Whether this is smtpgate's filter.
    #[must_use]
    pub fn is_ours(&self) -> bool {
        self.in_our_slot()
            && self.kind == "bpf"
            && self
                .name
                .as_deref()
                .is_some_and(|n| n.starts_with(PROGRAM_PREFIX))
    }

    fn in_our_slot(&self) -> bool {
        self.chain == 0 && self.priority == PRIORITY && self.handle == HANDLE
    }

    fn describe(&self) -> String {
        format!(
            "kind {} protocol {:#06x} chain {} name {}",
            self.kind,
            self.protocol,
            self.chain,
            self.name.as_deref().unwrap_or("-")
        )
    }
}

/// What [`attach`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// There was no smtpgate filter; one was created.
    Created,
    /// An earlier agent's filter was given this program in place.
    Replaced,
}

/// A synchronous rtnetlink request/reply channel. The agent's attach path
/// is synchronous, and a few requests at start and reload do not need an
/// async connection.
struct Netlink {
    socket: Socket,
    seq: u32,
}

impl Netlink {
    fn open() -> Result<Self, ClassicError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(ClassicError::Socket)?;
        socket.bind_auto().map_err(ClassicError::Socket)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(ClassicError::Socket)?;
        // Error texts from the kernel ("Filter kind and protocol must be
        // specified", ...) make errors say what went wrong; capped acks
        // keep our request out of them. Both are best effort (4.12+).
        let _ = socket.set_ext_ack(true);
        let _ = socket.set_cap_ack(true);
        Ok(Self { socket, seq: 0 })
    }

    /// Sends one request and collects the messages of its reply, up to the
    /// ack (or the end of a dump).
    fn request(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
        op: &'static str,
        ifindex: u32,
    ) -> Result<Vec<RouteNetlinkMessage>, ClassicError> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
        msg.finalize();
        let mut buf = vec![0; msg.buffer_len()];
        msg.serialize(&mut buf);
        let io_err = |source| ClassicError::Netlink {
            op,
            ifindex,
            message: None,
            source,
        };
        self.socket.send(&buf, 0).map_err(io_err)?;
        let mut replies = Vec::new();
        loop {
            let (data, _) = self.socket.recv_from_full().map_err(io_err)?;
            let mut at = 0;
            while at + 16 <= data.len() {
                let len =
                    u32::from_ne_bytes(data[at..at + 4].try_into().unwrap_or_default()) as usize;
                if len < 16 || at + len > data.len() {
                    break;
                }
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[at..at + len])
                    .map_err(|source| ClassicError::Decode { op, source })?;
                at += len.next_multiple_of(4);
                if reply.header.sequence_number != self.seq {
                    continue;
                }
                let reply_flags = reply.header.flags;
                match reply.payload {
                    NetlinkPayload::Done(_) => return Ok(replies),
                    NetlinkPayload::Error(e) if e.code.is_none() => return Ok(replies),
                    NetlinkPayload::Error(e) => {
                        return Err(ClassicError::Netlink {
                            op,
                            ifindex,
                            message: ext_ack_message(&e.header, reply_flags),
                            source: e.to_io(),
                        });
                    }
                    NetlinkPayload::InnerMessage(m) => replies.push(m),
                    _ => {}
                }
            }
        }
    }
}

/// The kernel's error text in an extended ack: the TLVs after the echoed
/// request (only its header, with NETLINK_CAP_ACK).
fn ext_ack_message(payload: &[u8], flags: u16) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 || payload.len() < 16 {
        return None;
    }
    let echoed = if flags & NLM_F_CAPPED != 0 {
        16
    } else {
        u32::from_ne_bytes(payload[..4].try_into().ok()?) as usize
    };
    let mut at = echoed.next_multiple_of(4);
    // Bounded: each attribute is at least 4 bytes long.
    while at + 4 <= payload.len() {
        let len = usize::from(u16::from_ne_bytes([payload[at], payload[at + 1]]));
        let kind = u16::from_ne_bytes([payload[at + 2], payload[at + 3]]);
        if len < 4 || at + len > payload.len() {
            return None;
        }
        if kind == NLMSGERR_ATTR_MSG {
            let text = &payload[at + 4..at + len];
            let text = text.split(|b| *b == 0).next().unwrap_or_default();
            return Some(String::from_utf8_lossy(text).into_owned());
        }
        at += len.next_multiple_of(4);
    }
    None
}

fn tc_message(ifindex: u32, parent: TcHandle, handle: TcHandle, info: u32) -> TcMessage {
    let mut m = TcMessage::with_index(ifindex as i32);
    m.header.parent = parent;
    m.header.handle = handle;
    m.header.info = info;
    m
}

/// `tcm_info` of a filter: preference and protocol (network order).
fn filter_info(priority: u16) -> u32 {
    (u32::from(priority) << 16) | u32::from(ETH_P_ALL.to_be())
}

fn errno(e: &ClassicError) -> Option<i32> {
    match e {
        ClassicError::Netlink { source, .. } => source.raw_os_error(),
        _ => None,
    }
}

/// Every filter on `hook` of `ifindex`. An interface without a clsact
/// qdisc has none.
pub fn filters(ifindex: u32, hook: Hook) -> Result<Vec<Filter>, ClassicError> {
    let mut nl = Netlink::open()?;
    filters_on(&mut nl, ifindex, hook)
}

fn filters_on(nl: &mut Netlink, ifindex: u32, hook: Hook) -> Result<Vec<Filter>, ClassicError> {
    // The old `ingress` qdisc takes the same handle as clsact and files
    // every filter request, whatever minor its parent names, under its one
    // (ingress) block: asked about egress, it would answer with the
    // ingress filters. Only a clsact has an egress hook.
    if hook == Hook::Egress
        && clsact_slot(nl)?.get(&(ifindex as i32)).map(String::as_str) != Some("clsact")
    {
        return Ok(Vec::new());
    }
    dump_filters(nl, ifindex, hook)
}

fn dump_filters(nl: &mut Netlink, ifindex: u32, hook: Hook) -> Result<Vec<Filter>, ClassicError> {
    let request = tc_message(ifindex, hook.parent(), TcHandle::UNSPEC, 0);
    let replies = nl.request(
        RouteNetlinkMessage::GetTrafficFilter(request),
        NLM_F_DUMP,
        "listing TC filters",
        ifindex,
    )?;
    Ok(replies
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewTrafficFilter(m) if m.header.index == ifindex as i32 => {
                Some(filter_of(&m))
            }
            _ => None,
        })
        .collect())
}

/// The kind of qdisc (`clsact` or `ingress`) each interface has at
/// handle ffff:, by interface index. One dump covers every interface.
fn clsact_slot(nl: &mut Netlink) -> Result<HashMap<i32, String>, ClassicError> {
    let replies = nl.request(
        RouteNetlinkMessage::GetQueueDiscipline(TcMessage::default()),
        NLM_F_DUMP,
        "listing qdiscs",
        0,
    )?;
    Ok(replies
        .iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewQueueDiscipline(q) if q.header.parent == CLSACT_PARENT => {
                q.attributes.iter().find_map(|a| match a {
                    TcAttribute::Kind(k) => Some((q.header.index, k.clone())),
                    _ => None,
                })
            }
            _ => None,
        })
        .collect())
}

fn filter_of(m: &TcMessage) -> Filter {
    let mut f = Filter {
        priority: (m.header.info >> 16) as u16,
        handle: m.header.handle.into(),
        protocol: u16::from_be(m.header.info as u16),
        chain: 0,
        kind: String::new(),
        name: None,
        prog_id: None,
        direct_action: false,
    };
    for attr in &m.attributes {
        match attr {
            TcAttribute::Kind(k) => f.kind.clone_from(k),
            TcAttribute::Chain(c) => f.chain = *c,
            TcAttribute::Options(options) => {
                for o in options {
                    match o {
                        TcOption::Bpf(TcFilterBpfOption::ProgName(n)) => f.name = Some(n.clone()),
                        TcOption::Bpf(TcFilterBpfOption::ProgId(id)) => f.prog_id = Some(*id),
                        TcOption::Bpf(TcFilterBpfOption::Flags(flags)) => {
                            f.direct_action = flags.contains(TcBpfFlags::DirectAction);
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    f
}

/// The program smtpgate's filter on `hook` of `ifindex` runs, if the filter
/// is there. This is what health reports for a classic attach point.
pub fn classic_attached(ifindex: u32, hook: Hook) -> Result<Option<u32>, ClassicError> {
    Ok(filters(ifindex, hook)?
        .into_iter()
        .find(Filter::is_ours)
        .and_then(|f| f.prog_id))
}

/// Adds a clsact qdisc to `ifindex` unless one is there. Returns whether it
/// added one. An existing clsact is used as it is, whoever added it.
fn ensure_clsact(nl: &mut Netlink, ifindex: u32, hook: Hook) -> Result<bool, ClassicError> {
    let mut add = tc_message(ifindex, CLSACT_PARENT, CLSACT_HANDLE, 0);
    add.attributes.push(TcAttribute::Kind("clsact".into()));
    match nl.request(
        RouteNetlinkMessage::NewQueueDiscipline(add),
        NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        "adding the clsact qdisc",
        ifindex,
    ) {
        Ok(_) => return Ok(true),
        Err(e) if errno(&e) == Some(libc::EEXIST) => {}
        Err(e) => return Err(e),
    }
    // Something holds the slot: clsact is what we need; the older
    // `ingress` qdisc has the same handle and only an ingress hook, and a
    // filter meant for egress would silently land on its ingress.
    let kind = clsact_slot(nl)?
        .remove(&(ifindex as i32))
        .unwrap_or_default();
    match (kind.as_str(), hook) {
        ("clsact", _) | ("ingress", Hook::Ingress) => Ok(false),
        ("ingress", Hook::Egress) => Err(ClassicError::IngressQdisc { ifindex }),
        _ => Err(ClassicError::ForeignQdisc { ifindex, kind }),
    }
}

/// Attaches `program` (named `name`) at `hook` of `ifindex` as smtpgate's
/// filter: creates it (and the clsact qdisc, if missing), or, if an earlier
/// agent's filter is there, swaps its program atomically.
pub fn attach(
    ifindex: u32,
    hook: Hook,
    program: BorrowedFd<'_>,
    name: &str,
) -> Result<Attached, ClassicError> {
    let mut nl = Netlink::open()?;
    let existing = filters_on(&mut nl, ifindex, hook)?;
    let ours = existing.iter().any(Filter::is_ours);
    if !ours {
        // Our preference with another kind or protocol, or our handle used
        // by someone else's filter, would make the kernel refuse ours (or
        // us replace theirs): say whose it is.
        if let Some(f) = existing.iter().find(|f| {
            f.chain == 0
                && f.priority == PRIORITY
                && (f.handle == HANDLE || f.kind != "bpf" || f.protocol != ETH_P_ALL)
        }) {
            return Err(ClassicError::Occupied {
                ifindex,
                hook,
                found: f.describe(),
            });
        }
        ensure_clsact(&mut nl, ifindex, hook)?;
    }
    let mut m = our_filter(ifindex, hook);
    m.attributes.push(TcAttribute::Options(vec![
        TcOption::Bpf(TcFilterBpfOption::ProgFd(program.as_raw_fd() as u32)),
        TcOption::Bpf(TcFilterBpfOption::ProgName(name.to_owned())),
        TcOption::Bpf(TcFilterBpfOption::Flags(TcBpfFlags::DirectAction)),
    ]));
    // Without NLM_F_EXCL the kernel changes the filter at this preference
    // and handle in place (cls_bpf_change: list_replace_rcu); with it, a
    // filter that appeared since the dump is not overwritten.
    let (flags, op) = if ours {
        (
            NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
            "replacing smtpgate's TC filter",
        )
    } else {
        (
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            "adding smtpgate's TC filter",
        )
    };
    nl.request(RouteNetlinkMessage::NewTrafficFilter(m), flags, op, ifindex)?;
    Ok(if ours {
        Attached::Replaced
    } else {
        Attached::Created
    })
}

/// Deletes smtpgate's filter from `hook` of `ifindex`; returns whether
/// there was one. Other filters and the clsact qdisc stay: an empty clsact
/// costs nothing, and deleting it would delete filters someone added since.
pub fn detach(ifindex: u32, hook: Hook) -> Result<bool, ClassicError> {
    let mut nl = Netlink::open()?;
    detach_on(&mut nl, ifindex, hook)
}

fn detach_on(nl: &mut Netlink, ifindex: u32, hook: Hook) -> Result<bool, ClassicError> {
    if !filters_on(nl, ifindex, hook)?.iter().any(Filter::is_ours) {
        return Ok(false);
    }
    let m = our_filter(ifindex, hook);
    match nl.request(
        RouteNetlinkMessage::DelTrafficFilter(m),
        NLM_F_ACK,
        "deleting smtpgate's TC filter",
        ifindex,
    ) {
        Ok(_) => Ok(true),
        // Gone since the dump (the interface too).
        Err(e) if matches!(errno(&e), Some(libc::ENOENT | libc::ENODEV)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Every smtpgate filter in this network namespace: (ifindex, hook,
/// program id).
pub fn ours_everywhere() -> Result<Vec<(u32, Hook, Option<u32>)>, ClassicError> {
    let mut nl = Netlink::open()?;
    let links = nl.request(
        RouteNetlinkMessage::GetLink(LinkMessage::default()),
        NLM_F_DUMP,
        "listing interfaces",
        0,
    )?;
    let slots = clsact_slot(&mut nl)?;
    let mut found = Vec::new();
    for ifindex in links.iter().filter_map(|m| match m {
        RouteNetlinkMessage::NewLink(l) => Some(l.header.index),
        _ => None,
    }) {
        // No clsact (or ingress) qdisc: no filters to look at.
        let Some(kind) = slots.get(&(ifindex as i32)) else {
            continue;
        };
        for hook in [Hook::Ingress, Hook::Egress] {
            if hook == Hook::Egress && kind != "clsact" {
                continue;
            }
            let filters = match dump_filters(&mut nl, ifindex, hook) {
                Ok(f) => f,
                // Deleted while we were looking.
                Err(e) if matches!(errno(&e), Some(libc::ENODEV | libc::ENOENT)) => continue,
                Err(e) => return Err(e),
            };
            if let Some(f) = filters.iter().find(|f| f.is_ours()) {
                found.push((ifindex, hook, f.prog_id));
            }
        }
    }
    Ok(found)
}

/// Deletes every smtpgate filter in this network namespace except those on
/// `keep`. Returns how many it deleted.
pub fn remove_ours_except(keep: &BTreeSet<(u32, Hook)>) -> Result<usize, ClassicError> {
    let mut removed = 0;
    let mut nl = Netlink::open()?;
    for (ifindex, hook, _) in ours_everywhere()? {
        if keep.contains(&(ifindex, hook)) {
            continue;
        }
        if detach_on(&mut nl, ifindex, hook)? {
            info!(ifindex, %hook, "deleted smtpgate's classic TC filter");
            removed += 1;
        }
    }
    Ok(removed)
}

impl Datapath {
    /// Attaches `name` (loaded) at `hook` of `interface` as a classic
    /// filter, adopting an earlier agent's filter if there is one.
    pub(super) fn attach_tc_classic(
        &mut self,
        point: &AttachPoint,
        name: &'static str,
        interface: &str,
        hook: Hook,
    ) -> Result<(), DatapathError> {
        let index = ifindex(interface).ok_or_else(|| DatapathError::NoInterface {
            name: interface.to_owned(),
        })?;
        let prog = self
            .ebpf
            .program(name)
            .ok_or(DatapathError::MissingProgram { name })?;
        let fd = prog.fd().map_err(|source| DatapathError::Program {
            op: format!("{name} is not loaded"),
            source,
        })?;
        let done =
            attach(index, hook, fd.as_fd(), name).map_err(|source| DatapathError::Classic {
                op: format!("attaching {name} to {hook} of {interface} (classic TC)"),
                source,
            })?;
        self.record(
            point,
            name,
            None,
            done == Attached::Replaced,
            AttachMode::Classic,
        );
        Ok(())
    }

    /// The hooks this agent holds in classic mode: what reconcile keeps.
    pub(super) fn classic_hooks(&self) -> BTreeSet<(u32, Hook)> {
        self.attached
            .iter()
            .filter(|a| a.mode == AttachMode::Classic)
            .filter_map(|a| match &a.point {
                AttachPoint::TcIngress { interface } => Some((ifindex(interface)?, Hook::Ingress)),
                AttachPoint::TcEgress { interface } => Some((ifindex(interface)?, Hook::Egress)),
                AttachPoint::Cgroup { .. } => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_bpf_filter_of_ours_in_our_slot_is_ours() {
        let ours = Filter {
            priority: PRIORITY,
            handle: HANDLE,
            protocol: ETH_P_ALL,
            chain: 0,
            kind: "bpf".into(),
            name: Some("smtpgate_tc_ingress".into()),
            prog_id: Some(7),
            direct_action: true,
        };
        assert!(ours.is_ours());
        let not = |f: Filter| assert!(!f.is_ours(), "{f:?}");
        not(Filter {
            priority: PRIORITY + 1,
            ..ours.clone()
        });
        not(Filter {
            handle: 1,
            ..ours.clone()
        });
        not(Filter {
            chain: 1,
            ..ours.clone()
        });
        not(Filter {
            kind: "u32".into(),
            ..ours.clone()
        });
        not(Filter {
            name: Some("cil_from_netdev".into()),
            ..ours.clone()
        });
        not(Filter { name: None, ..ours });
    }

    #[test]
    fn filter_info_is_preference_and_network_order_protocol() {
        // The kernel reads the protocol as TC_H_MIN(tcm_info) and compares
        // it with htons(ETH_P_ALL).
        let info = filter_info(PRIORITY);
        assert_eq!(info >> 16, u32::from(PRIORITY));
        assert_eq!(u16::from_be(info as u16), ETH_P_ALL);
    }

    #[test]
    fn extended_ack_text_is_found_after_the_capped_header() {
        let mut payload = vec![0u8; 16];
        let text = b"Filter already exists\0";
        let len = (4 + text.len()) as u16;
        payload.extend_from_slice(&len.to_ne_bytes());
        payload.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
        payload.extend_from_slice(text);
        let flags = NLM_F_CAPPED | NLM_F_ACK_TLVS;
        assert_eq!(
            ext_ack_message(&payload, flags).as_deref(),
            Some("Filter already exists")
        );
        assert_eq!(ext_ack_message(&payload, NLM_F_CAPPED), None);
        // A truncated attribute is not read past the buffer.
        payload.truncate(24);
        assert_eq!(ext_ack_message(&payload, flags), None);
    }
}

/// smtpgate's filter on a hook: our handle and priority, kind bpf. The one
/// description that attach, replace and delete all address.
fn our_filter(ifindex: u32, hook: Hook) -> TcMessage {
    let mut m = tc_message(
        ifindex,
        hook.parent(),
        TcHandle::from(HANDLE),
        filter_info(PRIORITY),
    );
    m.attributes.push(TcAttribute::Kind("bpf".into()));
    m
}
