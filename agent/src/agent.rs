//! The running agent's state: the config it runs, the allowlist, the
//! datapath. The control socket's requests are answered here.

use std::net::IpAddr;

use serde_json::{Value, json};

use crate::{
    config::{Action, AttachPoint, Config, Mode},
    control::protocol::{Request, Response},
    datapath::{Datapath, DatapathError, table_capacity},
    metrics::{AttachmentState, Snapshot},
    policy::Allowlist,
};

pub struct Agent {
    config: Config,
    reloads_ok: u64,
    reloads_failed: u64,
    last_reload_unix: f64,
    origin: String,
    allowlist: Allowlist,
    table_nodes: usize,
    datapath: Datapath,
}

impl Agent {
    /// Loads the datapath, writes the whole policy into it, then attaches.
    pub fn start(config: Config, origin: String) -> Result<Self, DatapathError> {
        let allowlist = Allowlist::from_config(&config.allowlist);
        let table = allowlist.compile();
        let capacity = table_capacity(table.len(), config.table_nodes);
        let mut datapath = Datapath::load(capacity)?;
        // The whole policy is in the maps before the first attach, so no
        // program ever runs with a half-written policy.
        datapath.set_ports(&config.ports)?;
        datapath.set_action(config.mode, config.action)?;
        datapath.install(&table)?;
        let (v4, v6) = allowlist.count_by_family();
        tracing::info!(
            ipv4 = v4,
            ipv6 = v6,
            nodes = table.len(),
            capacity,
            "allowlist installed"
        );
        for point in &config.attach {
            datapath.attach(point)?;
            tracing::info!(%point, "attached");
        }
        Ok(Self {
            config,
            reloads_ok: 0,
            reloads_failed: 0,
            last_reload_unix: 0.0,
            origin,
            allowlist,
            table_nodes: table.len(),
            datapath,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Re-reads this host's addresses for the cgroup connect hooks; they
    /// change (DHCP, SLAAC, an admin), the allowlist does not know.
    pub fn refresh_local_addresses(&mut self) -> Result<(), DatapathError> {
        let (v4, v6) = local_verdicts(&self.allowlist);
        self.datapath.set_local_allowed(v4, v6)
    }

    /// The state the metrics endpoint renders.
    pub fn snapshot(&self) -> Snapshot {
        let (v4, v6) = self.allowlist.count_by_family();
        let attachments = self
            .datapath
            .attachments()
            .iter()
            .map(|a| {
                let (hook, target) = match &a.point {
                    AttachPoint::TcIngress { interface } => ("tc-ingress", interface.clone()),
                    AttachPoint::TcEgress { interface } => ("tc-egress", interface.clone()),
                    AttachPoint::Cgroup { path } => (
                        "cgroup",
                        path.as_ref()
                            .map_or_else(String::new, |p| p.display().to_string()),
                    ),
                };
                AttachmentState {
                    hook: hook.to_owned(),
                    target,
                    program: a.program.to_owned(),
                    attached: true,
                }
            })
            .collect();
        Snapshot {
            counters: self.datapath.counters().unwrap_or_default(),
            allowlist_ipv4: v4,
            allowlist_ipv6: v6,
            attachments,
            programs: self.datapath.program_ids(),
            reloads_ok: self.reloads_ok,
            reloads_failed: self.reloads_failed,
            last_reload_unix: self.last_reload_unix,
            ready: !self.datapath.attachments().is_empty(),
            relay: None,
        }
    }

    pub fn handle(&mut self, request: Request) -> Response {
        let result = match request {
            Request::Status => Ok(self.status()),
            Request::Stats => self.stats(),
            Request::Check { ip, port } => Ok(self.check(ip, port)),
        };
        match result {
            Ok(data) => Response::Ok { data },
            Err(e) => Response::Error {
                message: format!("{e:#}"),
            },
        }
    }

    fn status(&self) -> Value {
        let (v4, v6) = self.allowlist.count_by_family();
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "config": self.origin,
            "mode": self.config.mode,
            "action": self.config.action,
            "ports": self.config.ports,
            "attachments": self.datapath.attachments(),
            "allowlist": { "ipv4": v4, "ipv6": v6, "table_nodes": self.table_nodes,
                           "table_capacity": self.datapath.table_capacity() },
        })
    }

    fn stats(&self) -> anyhow::Result<Value> {
        Ok(json!({ "counters": self.datapath.counters()? }))
    }

    /// What a connection from `ip` to `port` would get, and why.
    fn check(&self, ip: IpAddr, port: u16) -> Value {
        let denied = match (self.config.mode, self.config.action) {
            (Mode::Audit, _) => "audited",
            (Mode::Enforce, Action::Drop | Action::Redirect) => "dropped",
            (Mode::Enforce, Action::Reject) => "rejected",
        };
        if !self.config.ports.contains(&port) {
            return json!({ "ip": ip, "port": port, "verdict": "untouched",
                           "reason": format!("port {port} is not an SMTP port here") });
        }
        if let IpAddr::V6(v6) = ip {
            let o = v6.octets();
            if o[..10].iter().all(|b| *b == 0)
                && ((o[10] == 0xff && o[11] == 0xff)
                    || (o[10] == 0
                        && o[11] == 0
                        && v6.segments()[6..] != [0, 0]
                        && v6.segments()[6..] != [0, 1]))
            {
                let verdict = if self.config.mode == Mode::Audit {
                    "audited"
                } else {
                    "dropped"
                };
                return json!({ "ip": ip, "port": port, "verdict": verdict, "reason": "mapped_address" });
            }
        }
        match self.allowlist.matching(ip) {
            Some(entry) => {
                json!({ "ip": ip, "port": port, "verdict": "allowed", "reason": "allowlisted",
                                   "entry": entry.prefix, "origin": entry.origin })
            }
            None => {
                json!({ "ip": ip, "port": port, "verdict": denied, "reason": "not_allowlisted" })
            }
        }
    }
}

/// Whether any of this host's addresses, per family, is allowlisted.
fn local_verdicts(allowlist: &Allowlist) -> (bool, bool) {
    let addrs = local_addresses();
    let any = |v4: bool| {
        addrs
            .iter()
            .any(|a| a.is_ipv4() == v4 && allowlist.matching(*a).is_some())
    };
    (any(true), any(false))
}

/// The addresses an unbound socket may get as its source when it connects
/// to a non-loopback destination: all of this network namespace's, except
/// loopback and IPv6 link-local ones.
fn local_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we walk read-only and then free.
    unsafe {
        if libc::getifaddrs(&mut head) != 0 {
            return out;
        }
        let mut cur = head;
        while !cur.is_null() {
            let sa = (*cur).ifa_addr;
            if !sa.is_null() {
                match i32::from((*sa).sa_family) {
                    libc::AF_INET => {
                        let sin = &*sa.cast::<libc::sockaddr_in>();
                        out.push(IpAddr::from(
                            u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                        ));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*sa.cast::<libc::sockaddr_in6>();
                        out.push(IpAddr::from(sin6.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(head);
    }
    out.retain(|a| match a {
        IpAddr::V4(v4) => !v4.is_loopback(),
        IpAddr::V6(v6) => !v6.is_loopback() && (v6.segments()[0] & 0xffc0) != 0xfe80,
    });
    out
}
