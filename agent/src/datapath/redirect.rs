//! What `action = "redirect"` needs outside the eBPF program: the relay's
//! intercept listener, in the SOCKMAP the program reads, and the policy
//! routing that delivers the marked packets locally.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};

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

/// The relay's intercept listeners: one on 127.0.0.1 and one on ::1, on the
/// same port (0: one the kernel picks, which then cannot clash with any
/// local service).
///
/// Loopback, so that nothing from the network reaches them directly: a
/// packet from outside to 127.0.0.1 or ::1 is a martian, and a connection to
/// the gateway's own address on this port finds no listener. Redirected
/// connections get there all the same: TC steering assigns their SYN to the
/// listener itself (bpf_sk_assign), and the cgroup hooks rewrite connect()
/// to the loopback address. With IP_TRANSPARENT (IPV6_TRANSPARENT), without
/// which the stack refuses steered connections (their destination is not a
/// local address).
pub struct InterceptListeners {
    pub v4: TcpListener,
    /// None when this host has no IPv6 loopback (IPv6 disabled): steered
    /// IPv6 connections then fail closed as `relay_unavailable`.
    pub v6: Option<TcpListener>,
}

pub fn intercept_listeners(port: u16) -> std::io::Result<InterceptListeners> {
    let v4 = transparent_listener(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))?;
    let port = v4.local_addr()?.port();
    let v6 = match transparent_listener(SocketAddr::from((Ipv6Addr::LOCALHOST, port))) {
        Ok(l) => Some(l),
        // No ::1 here (IPv6 off): IPv4 works, IPv6 redirects fail closed.
        Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => {
            tracing::warn!(
                "no IPv6 loopback address: redirected IPv6 connections will be dropped (relay_unavailable)"
            );
            None
        }
        Err(e) => return Err(e),
    };
    Ok(InterceptListeners { v4, v6 })
}

fn transparent_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), None)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
        socket.set_ip_transparent_v6(true)?;
    } else {
        socket.set_ip_transparent_v4(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
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
    rule.attributes
        .contains(&RuleAttribute::FwMark(REDIRECT_MARK))
        && rule
            .attributes
            .contains(&RuleAttribute::Table(REDIRECT_TABLE))
}

async fn our_rules(
    handle: &rtnetlink::Handle,
    v: IpVersion,
) -> Result<Vec<RuleMessage>, rtnetlink::Error> {
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
    netlink(
        "installing the policy routing for redirect",
        move |handle| async move {
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
        },
    )
}

/// Removes the policy routing (detach): every rule of ours (one may have
/// been added again by hand) and every route in our table. Missing pieces
/// are fine; what cannot be removed is logged.
pub fn remove_routing() {
    let removed = netlink(
        "removing the policy routing for redirect",
        |handle| async move {
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
                    if route
                        .attributes
                        .contains(&RouteAttribute::Table(REDIRECT_TABLE))
                    {
                        handle.route().del(route).execute().await?;
                    }
                }
            }
            Ok(())
        },
    );
    if let Err(e) = removed {
        tracing::warn!(error = %e, "removing the policy routing");
    }
}

impl Datapath {
    /// Puts the relay's intercept listener where the programs find it, and
    /// tells the connect hooks its port.
    pub fn set_relay_listeners(
        &mut self,
        listeners: &InterceptListeners,
    ) -> Result<(), DatapathError> {
        self.relay
            .set(smtpgate_common::RELAY_V4, &listeners.v4, 0)
            .map_err(map_err("writing the relay SOCKMAP"))?;
        if let Some(v6) = &listeners.v6 {
            self.relay
                .set(smtpgate_common::RELAY_V6, v6, 0)
                .map_err(map_err("writing the relay SOCKMAP"))?;
        }
        let keep = |l: &TcpListener| {
            l.try_clone().map_err(|e| DatapathError::Routing {
                what: format!("keeping the intercept listener: {e}"),
            })
        };
        self.relay_listeners = vec![(smtpgate_common::RELAY_V4, keep(&listeners.v4)?)];
        if let Some(v6) = &listeners.v6 {
            self.relay_listeners
                .push((smtpgate_common::RELAY_V6, keep(v6)?));
        }
        let port = listeners.v4.local_addr().map(|a| a.port()).unwrap_or(0);
        self.settings.relay_port = u32::from(port);
        self.write_settings()
    }
}
