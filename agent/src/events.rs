//! The log side of denied connection attempts: the kernel emits at most one
//! event per source per second over a ring buffer (the rest are counted in
//! the next event's `suppressed`), and each becomes one structured line.

use std::net::IpAddr;

use aya::maps::{MapData, RingBuf};
use smtpgate_common::{Family, Reason, Verdict, events::Event};
use tokio::io::unix::AsyncFd;

fn addr(family: u32, bytes: [u8; 16]) -> IpAddr {
    if family == Family::Ipv4 as u32 {
        IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]])
    } else {
        IpAddr::from(bytes)
    }
}

/// Logs events until the ring buffer fails. When the datapath is replaced
/// by a bigger one (see `Datapath::successor`), its new ring buffer comes on
/// `next`, and the old one is read to its end first.
pub async fn log_denials(
    ring: RingBuf<MapData>,
    mut next: tokio::sync::mpsc::UnboundedReceiver<RingBuf<MapData>>,
) {
    let mut names = crate::datapath::cgroups::Names::new(crate::config::cgroup2_root());
    let mut ring = ring;
    loop {
        // SAFETY: the ring buffer owns its fd and keeps it open for as long
        // as the AsyncFd that now owns the ring buffer lives.
        let mut fd = match unsafe { AsyncFd::register(ring) } {
            Ok(fd) => fd,
            Err(e) => {
                tracing::error!(error = %e, "cannot watch the events ring buffer; denials will not be logged");
                return;
            }
        };
        tokio::select! {
            () = log_from(&mut fd, &mut names) => return,
            new = next.recv() => match new {
                Some(new) => {
                    log_ready(fd.get_mut(), &mut names);
                    ring = new;
                }
                // The agent is going: keep logging what this ring gets.
                None => {
                    log_from(&mut fd, &mut names).await;
                    return;
                }
            },
        }
    }
}

async fn log_from(fd: &mut AsyncFd<RingBuf<MapData>>, names: &mut crate::datapath::cgroups::Names) {
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        log_ready(guard.get_inner_mut(), names);
        guard.clear_ready();
    }
}

/// Logs every event waiting in the ring.
fn log_ready(ring: &mut RingBuf<MapData>, names: &mut crate::datapath::cgroups::Names) {
    {
        while let Some(item) = ring.next() {
            if item.len() < size_of::<Event>() {
                continue;
            }
            // SAFETY: the kernel wrote an `Event` (checked length), read
            // unaligned from the ring's memory.
            let e: Event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            let verdict = Verdict::ALL
                .get(e.verdict as usize)
                .map_or("?", |v| v.as_str());
            let reason = Reason::ALL
                .get(e.reason as usize)
                .map_or("?", |r| r.as_str());
            if e.cgroup == 0 {
                tracing::warn!(
                    target: "smtpgate::denied",
                    src = %addr(e.family, e.src),
                    sport = e.sport,
                    dst = %addr(e.family, e.dst),
                    dport = e.dport,
                    verdict,
                    reason,
                    suppressed = e.suppressed,
                    "denied SMTP egress attempt"
                );
                continue;
            }
            // A process on this host: say which, as far as the hook knew.
            let named = names.name(e.cgroup);
            let src = (e.src != [0; 16]).then(|| addr(e.family, e.src));
            tracing::warn!(
                target: "smtpgate::denied",
                src = src.map(tracing::field::display),
                dst = %addr(e.family, e.dst),
                dport = e.dport,
                cgroup = named.as_ref().map_or_else(|| format!("(gone, id {})", e.cgroup), |n| n.path.clone()),
                unit = named.as_ref().and_then(|n| n.unit.as_deref()),
                pid = (e.pid != 0).then_some(e.pid),
                comm = crate::datapath::comm(&e.comm),
                verdict,
                reason,
                suppressed = e.suppressed,
                "denied SMTP egress attempt by a local process"
            );
        }
    }
}
