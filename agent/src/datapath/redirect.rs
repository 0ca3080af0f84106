//! What `action = "redirect"` needs outside the eBPF program: the relay's
//! intercept listener, in the SOCKMAP the program reads, and the policy
//! routing that delivers the marked packets locally.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use futures_util::TryStreamExt as _;
use rtnetlink::{
    IpVersion, RouteMessageBuilder,
    packet_route::{
        route::{RouteAttribute, RouteScope, RouteType},
        rule::{RuleAction, RuleAttribute, RuleMessage},
    },
};

use smtpgate_common::{REDIRECT_MARK, REDIRECT_TABLE};

use super::{Datapath, DatapathError, map_err};

/// Binds the intercept listener: dual-stack, with IP_TRANSPARENT and
/// IPV6_TRANSPARENT, without which the stack refuses steered IPv4
/// connections (their destination is not a local address).
pub fn intercept_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket calls on a descriptor we own from here on.
    unsafe {
        let fd = libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let owned = OwnedFd::from_raw_fd(fd);
        let one: libc::c_int = 1;
        let zero: libc::c_int = 0;
        let set = |level, name, v: &libc::c_int| {
            if libc::setsockopt(fd, level, name, (v as *const libc::c_int).cast(), 4) != 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        set(libc::SOL_SOCKET, libc::SO_REUSEADDR, &one)?;
        set(libc::SOL_IP, libc::IP_TRANSPARENT, &one)?;
        if family == libc::AF_INET6 {
            set(libc::SOL_IPV6, libc::IPV6_V6ONLY, &zero)?;
            set(libc::SOL_IPV6, libc::IPV6_TRANSPARENT, &one)?;
        }
        let listener = TcpListener::from(owned);
        let sock = socket2_addr(addr);
        if libc::bind(listener.as_raw_fd(), sock.0.as_ptr().cast(), sock.1) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::listen(listener.as_raw_fd(), 1024) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(listener)
    }
}

/// A sockaddr for `addr`, as bytes and length.
fn socket2_addr(addr: SocketAddr) -> ([u8; 28], libc::socklen_t) {
    let mut buf = [0u8; 28];
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: copying a plain C struct into a large enough buffer.
            unsafe {
                std::ptr::copy_nonoverlapping((&raw const sin).cast::<u8>(), buf.as_mut_ptr(), 16)
            };
            (buf, 16)
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as u16,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above.
            unsafe {
                std::ptr::copy_nonoverlapping((&raw const sin6).cast::<u8>(), buf.as_mut_ptr(), 28)
            };
            (buf, 28)
        }
    }
}

/// Runs one rtnetlink conversation on a thread of its own. Routing changes
/// are rare (start, reload, detach) and come from synchronous code, some of
/// it on a runtime's blocking pool: a private current-thread runtime on a
/// scoped thread works from anywhere, without nesting runtimes.
fn netlink<T, F, Fut>(what: &str, f: F) -> Result<T, DatapathError>
where
    T: Send,
    F: FnOnce(rtnetlink::Handle) -> Fut + Send,
    Fut: std::future::Future<Output = Result<T, rtnetlink::Error>>,
{
    let err = |e: String| DatapathError::Routing {
        what: format!("{what}: {e}"),
    };
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .build()
                    .map_err(|e| err(e.to_string()))?;
                rt.block_on(async {
                    let (conn, handle, _) =
                        rtnetlink::new_connection().map_err(|e| err(e.to_string()))?;
                    tokio::spawn(conn);
                    f(handle).await.map_err(|e| err(e.to_string()))
                })
            })
            .join()
            .unwrap_or_else(|_| Err(err("the netlink thread panicked".into())))
    })
}

fn is_ours(rule: &RuleMessage) -> bool {
    rule.attributes.contains(&RuleAttribute::FwMark(REDIRECT_MARK))
        && rule.attributes.contains(&RuleAttribute::Table(REDIRECT_TABLE))
}

async fn our_rules(handle: &rtnetlink::Handle, v: IpVersion) -> Result<Vec<RuleMessage>, rtnetlink::Error> {
    let rules: Vec<_> = handle.rule().get(v).execute().try_collect().await?;
    Ok(rules.into_iter().filter(is_ours).collect())
}

fn lo_index() -> Result<u32, DatapathError> {
    super::attach::ifindex("lo").ok_or_else(|| DatapathError::Routing {
        what: "this network namespace has no loopback interface".into(),
    })
}

/// Installs the policy routing that makes marked packets local, per
/// family: a rule that sends them to our table (once, however often this
/// runs), and a table that says "everything is local" (`ip rule add fwmark
/// M lookup T`, `ip route replace local 0.0.0.0/0 dev lo table T`).
pub fn install_routing() -> Result<(), DatapathError> {
    let lo = lo_index()?;
    netlink("installing the policy routing for redirect", move |handle| async move {
        for v in [IpVersion::V4, IpVersion::V6] {
            if our_rules(&handle, v.clone()).await?.is_empty() {
                // The action must be set: the kernel treats "unspecified"
                // as a lookup failure, and marked packets would go nowhere.
                let add = handle
                    .rule()
                    .add()
                    .fw_mark(REDIRECT_MARK)
                    .table_id(REDIRECT_TABLE)
                    .action(RuleAction::ToTable);
                match v {
                    IpVersion::V4 => add.v4().execute().await?,
                    IpVersion::V6 => add.v6().execute().await?,
                }
            }
        }
        let v4 = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .table_id(REDIRECT_TABLE)
            .output_interface(lo)
            .build();
        handle.route().add(v4).replace().execute().await?;
        let v6 = RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
            .kind(RouteType::Local)
            .table_id(REDIRECT_TABLE)
            .output_interface(lo)
            .build();
        handle.route().add(v6).replace().execute().await?;
        Ok(())
    })
}

/// Removes the policy routing (detach): every rule of ours (one may have
/// been added again by hand) and every route in our table. Missing pieces
/// are fine; what cannot be removed is logged.
pub fn remove_routing() {
    let removed = netlink("removing the policy routing for redirect", |handle| async move {
        for v in [IpVersion::V4, IpVersion::V6] {
            for rule in our_rules(&handle, v.clone()).await? {
                handle.rule().del(rule).execute().await?;
            }
            let all = match v {
                IpVersion::V4 => RouteMessageBuilder::<Ipv4Addr>::new().build(),
                IpVersion::V6 => RouteMessageBuilder::<Ipv6Addr>::new().build(),
            };
            let routes: Vec<_> = handle.route().get(all).execute().try_collect().await?;
            for route in routes {
                if route.attributes.contains(&RouteAttribute::Table(REDIRECT_TABLE)) {
                    handle.route().del(route).execute().await?;
                }
            }
        }
        Ok(())
    });
    if let Err(e) = removed {
        tracing::warn!(error = %e, "removing the policy routing");
    }
}

impl Datapath {
    /// Puts the relay's intercept listener where the programs find it, and
    /// tells the connect hooks its port.
    pub fn set_relay_listener(&mut self, listener: &TcpListener) -> Result<(), DatapathError> {
        self.relay
            .set(0, listener, 0)
            .map_err(map_err("writing the relay SOCKMAP"))?;
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        self.settings.relay_port = u32::from(port);
        self.write_settings()
    }
}
