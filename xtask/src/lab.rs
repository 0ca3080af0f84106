//! The network-namespace lab: clients, a gateway, an "internet" host.
//!
//! ```text
//!  client ──eth0─────lan0── gw ──wan0─────eth0── inet
//!  192.0.2.10 (allowlisted)  192.0.2.1      203.0.113.1    203.0.113.25
//!  192.0.2.20 (denied)       2001:db8:1::1  2001:db8:ff::1 2001:db8:ff::25
//!  2001:db8:1::10 / ::20                                   listeners :25 :80
//!
//!  vclient ──eth0──────lanv── gw   (tagged frames crafted with scapy)
//!  198.51.100.10 / .20, 2001:db8:100::10 / ::20
//!
//!  gw ──tun0── lab/tun.py   (on demand, see `tun.rs`: an L3 device)
//!  198.51.100.128/25, 2001:db8:200::/64 routed into it
//! ```
//!
//! Every namespace name carries a unique prefix, so tests run in parallel and
//! a crashed run never collides with the next. Only documentation addresses
//! are used and nothing is connected to the host's own network. Dropping a
//! [`Lab`] kills the processes it started (by PID) and deletes its
//! namespaces.

use std::{
    collections::HashMap,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

pub const CLIENT_ALLOWED_V4: &str = "192.0.2.10";
pub const CLIENT_DENIED_V4: &str = "192.0.2.20";
pub const CLIENT_ALLOWED_V6: &str = "2001:db8:1::10";
pub const CLIENT_DENIED_V6: &str = "2001:db8:1::20";
pub const VLAN_ALLOWED_V4: &str = "198.51.100.10";
pub const VLAN_DENIED_V4: &str = "198.51.100.20";
pub const VLAN_ALLOWED_V6: &str = "2001:db8:100::10";
pub const VLAN_DENIED_V6: &str = "2001:db8:100::20";
pub const GW_LAN_V4: &str = "192.0.2.1";
pub const GW_WAN_V4: &str = "203.0.113.1";
pub const GW_WAN_V6: &str = "2001:db8:ff::1";
pub const INET_V4: &str = "203.0.113.25";
pub const INET_V6: &str = "2001:db8:ff::25";
pub const VLAN_ID: u16 = 100;
/// Routed into the gateway's tun device when a test makes one (`Lab::tun`):
/// hosts "beyond the tunnel", as clients (allowlisted, denied) and as a
/// remote server.
pub const TUN_NET_V4: &str = "198.51.100.128/25";
pub const TUN_NET_V6: &str = "2001:db8:200::/64";
pub const TUN_ALLOWED_V4: &str = "198.51.100.130";
pub const TUN_DENIED_V4: &str = "198.51.100.140";
pub const TUN_REMOTE_V4: &str = "198.51.100.200";
pub const TUN_ALLOWED_V6: &str = "2001:db8:200::10";
pub const TUN_DENIED_V6: &str = "2001:db8:200::20";
pub const TUN_REMOTE_V6: &str = "2001:db8:200::25";

/// The lab's hosts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Host {
    Client,
    VlanClient,
    Gw,
    Inet,
}

impl Host {
    fn suffix(self) -> &'static str {
        match self {
            Host::Client => "client",
            Host::VlanClient => "vclient",
            Host::Gw => "gw",
            Host::Inet => "inet",
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Masquerade on the gateway's WAN side: the internet host has no route
    /// back to the LANs and sees the gateway's address.
    pub nat: bool,
}

pub struct Lab {
    pub prefix: String,
    pub options: Options,
    /// Scratch directory for logs, configs and sockets.
    pub dir: PathBuf,
    children: Vec<Child>,
    cgroups: Vec<PathBuf>,
    /// How agents started in this lab attach TC programs (None: the
    /// agent's own choice, `auto`).
    pub tc_mode: Option<crate::agent::TcMode>,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The directory holding the lab's helper scripts.
pub fn scripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("lab")
}

/// Runs a command, failing with its output if it exits non-zero.
pub fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

fn ip(args: &str) -> anyhow::Result<()> {
    run(Command::new("ip").args(args.split_whitespace()))?;
    Ok(())
}

impl Lab {
    /// Builds the lab. `name` makes the namespaces recognisable in `ip netns`.
    pub fn up(name: &str, options: Options) -> anyhow::Result<Lab> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let short: String = name
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(10)
            .collect();
        let prefix = format!("sg-{short}-{}-{n}", std::process::id());
        let dir = std::env::temp_dir().join(&prefix);
        std::fs::create_dir_all(&dir)?;
        let mut lab = Lab {
            prefix,
            options,
            dir,
            children: Vec::new(),
            cgroups: Vec::new(),
            tc_mode: None,
        };
        lab.build()
            .with_context(|| format!("building lab {}", lab.prefix))?;
        Ok(lab)
    }

    /// `up`, for a test whose agents attach TC programs in `mode`.
    pub fn up_tc(name: &str, options: Options, mode: crate::agent::TcMode) -> anyhow::Result<Lab> {
        // The mode first: `up` keeps only the first 10 characters.
        let tag = match mode {
            crate::agent::TcMode::Tcx => "x",
            crate::agent::TcMode::Classic => "c",
        };
        let mut lab = Lab::up(&format!("{tag}{name}"), options)?;
        lab.tc_mode = Some(mode);
        Ok(lab)
    }

    pub fn ns(&self, host: Host) -> String {
        format!("{}-{}", self.prefix, host.suffix())
    }

    fn build(&mut self) -> anyhow::Result<()> {
        let [client, vclient, gw, inet] =
            [Host::Client, Host::VlanClient, Host::Gw, Host::Inet].map(|h| self.ns(h));
        for ns in [&client, &vclient, &gw, &inet] {
            ip(&format!("netns add {ns}"))?;
            self.sh_in(ns, "ip link set lo up; sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0 net.ipv6.conf.all.accept_ra=0 net.ipv6.conf.default.accept_ra=0")?;
        }
        ip(&format!(
            "link add wan0 netns {gw} type veth peer name eth0 netns {inet}"
        ))?;
        ip(&format!(
            "link add lanv netns {gw} type veth peer name eth0 netns {vclient}"
        ))?;

        self.link_lan()?;
        // No 802.1Q devices, bridge VLAN filtering or tc vlan action on this
        // kernel: the VLAN client is a bare link on which tests craft their
        // own tagged frames (lab/craft.py).
        self.sh_in(&vclient, "ip link set eth0 up")?;
        self.sh_in(
            &gw,
            &format!(
                "sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
             ip link set wan0 up
             ip addr add {GW_WAN_V4}/24 dev wan0; ip addr add {GW_WAN_V6}/64 dev wan0 nodad
             ip link set lanv up"
            ),
        )?;
        self.sh_in(
            &inet,
            &format!(
                "ip link set eth0 up
             ip addr add {INET_V4}/24 dev eth0; ip addr add {INET_V6}/64 dev eth0 nodad"
            ),
        )?;
        if self.options.nat {
            self.sh_in(
                &gw,
                "nft -f - <<'EOF'
table inet lab_nat {
  chain post { type nat hook postrouting priority srcnat; oifname \"wan0\" masquerade; }
}
EOF",
            )?;
        } else {
            self.sh_in(&inet, &format!(
                "ip route add 192.0.2.0/24 via {GW_WAN_V4}; ip route add 198.51.100.0/24 via {GW_WAN_V4}
                 ip -6 route add 2001:db8:1::/64 via {GW_WAN_V6}; ip -6 route add 2001:db8:100::/64 via {GW_WAN_V6}
                 ip -6 route add {TUN_NET_V6} via {GW_WAN_V6}"))?;
        }
        // Count, on the internet host, every packet from each lab client
        // before reassembly (priority -450 runs ahead of defragmentation):
        // the proof of what got through.
        let mut rules = String::from(
            "table inet lab_seen {\n chain pre {\n  type filter hook prerouting priority -450;\n",
        );
        for src in [
            CLIENT_ALLOWED_V4,
            CLIENT_DENIED_V4,
            VLAN_ALLOWED_V4,
            VLAN_DENIED_V4,
            TUN_ALLOWED_V4,
            TUN_DENIED_V4,
            GW_WAN_V4,
        ] {
            rules.push_str(&format!("  ip saddr {src} counter\n"));
        }
        for src in [
            CLIENT_ALLOWED_V6,
            CLIENT_DENIED_V6,
            VLAN_ALLOWED_V6,
            VLAN_DENIED_V6,
            TUN_ALLOWED_V6,
            TUN_DENIED_V6,
            GW_WAN_V6,
        ] {
            rules.push_str(&format!("  ip6 saddr {src} counter\n"));
        }
        for src in [CLIENT_ALLOWED_V4, CLIENT_DENIED_V4, TUN_ALLOWED_V4] {
            rules.push_str(&format!(
                "  ip6 saddr ::ffff:{src} counter\n  ip6 saddr ::{src} counter\n"
            ));
        }
        rules.push_str(" }\n}\n");
        self.sh_in(&inet, &format!("nft -f - <<'EOF'\n{rules}EOF"))?;
        Ok(())
    }

    /// The client's link to the gateway (`lan0` there, `eth0` in the
    /// client), with its addresses and the client's routes.
    fn link_lan(&self) -> anyhow::Result<()> {
        let [client, gw] = [Host::Client, Host::Gw].map(|h| self.ns(h));
        ip(&format!(
            "link add lan0 netns {gw} type veth peer name eth0 netns {client}"
        ))?;
        self.sh_in(&client, &format!(
            "ip link set eth0 up
             ip addr add {CLIENT_ALLOWED_V4}/24 dev eth0; ip addr add {CLIENT_DENIED_V4}/24 dev eth0
             ip addr add {CLIENT_ALLOWED_V6}/64 dev eth0 nodad; ip addr add {CLIENT_DENIED_V6}/64 dev eth0 nodad
             ip route add default via {GW_LAN_V4}; ip -6 route add default via 2001:db8:1::1"))?;
        self.sh_in(
            &gw,
            &format!(
                "ip link set lan0 up
             ip addr add {GW_LAN_V4}/24 dev lan0; ip addr add 2001:db8:1::1/64 dev lan0 nodad"
            ),
        )?;
        Ok(())
    }

    /// Deletes the gateway's `lan0` (and so the client's end of it), as a
    /// VPN restart, a hotplug NIC or ifdown of a veth-backed port does.
    pub fn delete_lan(&self) -> anyhow::Result<()> {
        ip(&format!("-n {} link del lan0", self.ns(Host::Gw)))
    }

    /// Creates `lan0` again, configured as the lab first made it.
    pub fn create_lan(&self) -> anyhow::Result<()> {
        self.link_lan()
    }

    fn sh_in(&self, ns: &str, script: &str) -> anyhow::Result<Output> {
        run(Command::new("ip").args(["netns", "exec", ns, "sh", "-ec", script]))
    }

    /// Runs a shell script in a host's namespace; fails if it fails.
    pub fn sh(&self, host: Host, script: &str) -> anyhow::Result<String> {
        let out = self.sh_in(&self.ns(host), script)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A command that runs in a host's network namespace. nsenter rather
    /// than `ip netns exec`, which remounts /sys and so hides the cgroup
    /// hierarchy the agent attaches to.
    pub fn command(&self, host: Host, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.ns(host)))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Starts a long-running process; the lab kills it when dropped.
    pub fn spawn(&mut self, mut cmd: Command, log_name: &str) -> anyhow::Result<u32> {
        let log = std::fs::File::create(self.dir.join(log_name))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        let pid = child.id();
        self.children.push(child);
        Ok(pid)
    }

    /// Stops a process the lab started: SIGTERM, or SIGKILL with `kill9`.
    pub fn stop(&mut self, pid: u32, kill9: bool) -> anyhow::Result<()> {
        let Some(pos) = self.children.iter().position(|c| c.id() == pid) else {
            bail!("pid {pid} was not started by this lab");
        };
        let mut child = self.children.remove(pos);
        let sig = if kill9 { libc::SIGKILL } else { libc::SIGTERM };
        // SAFETY: signalling a child we spawned and have not reaped.
        unsafe { libc::kill(pid as i32, sig) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("pid {pid} did not exit within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether a process the lab started is still running.
    pub fn alive(&mut self, pid: u32) -> bool {
        self.children
            .iter_mut()
            .find(|c| c.id() == pid)
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn read_log(&self, log_name: &str) -> String {
        std::fs::read_to_string(self.dir.join(log_name)).unwrap_or_default()
    }

    /// Starts the internet host's listeners on 25 and 80; they log every
    /// connection to `inet-connections.log` as "PORT PEER".
    pub fn start_listeners(&mut self) -> anyhow::Result<()> {
        let log = self.dir.join("inet-connections.log");
        std::fs::write(&log, "")?;
        let mut cmd = self.command(Host::Inet, "/usr/bin/python3");
        cmd.arg(scripts_dir().join("listener.py"))
            .arg(&log)
            .args(["25", "80"]);
        self.spawn(cmd, "listener.out")?;
        self.wait_for("listener", Duration::from_secs(10), |lab| {
            lab.read_log("listener.out").contains("listening")
        })
    }

    /// Connections the internet host accepted, as (port, peer) pairs.
    pub fn inet_connections(&self) -> Vec<(u16, String)> {
        self.read_log("inet-connections.log")
            .lines()
            .filter_map(|l| {
                let (port, peer) = l.split_once(' ')?;
                Some((port.parse().ok()?, peer.to_owned()))
            })
            .collect()
    }

    /// Packets from each lab address that reached the internet host.
    pub fn inet_packets_seen(&self) -> anyhow::Result<HashMap<String, u64>> {
        let out = self.sh(Host::Inet, "nft -j list table inet lab_seen")?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        let mut seen = HashMap::new();
        for item in v["nftables"].as_array().into_iter().flatten() {
            let Some(rule) = item.get("rule") else {
                continue;
            };
            let mut addr = None;
            let mut packets = None;
            for e in rule["expr"].as_array().into_iter().flatten() {
                if let Some(m) = e.get("match") {
                    addr = m["right"].as_str().map(str::to_owned);
                }
                if let Some(c) = e.get("counter") {
                    packets = c["packets"].as_u64();
                }
            }
            if let (Some(a), Some(p)) = (addr, packets) {
                seen.insert(a, p);
            }
        }
        Ok(seen)
    }

    /// One connection attempt from `src` (in `host`) to `dst:port`.
    pub fn connect(
        &self,
        host: Host,
        src: &str,
        dst: &str,
        port: u16,
        timeout: Duration,
    ) -> anyhow::Result<Attempt> {
        let out = run(self
            .command(host, "/usr/bin/python3")
            .arg(scripts_dir().join("connect.py"))
            .args([
                src,
                dst,
                &port.to_string(),
                &format!("{:.2}", timeout.as_secs_f64()),
            ]))?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!("connect.py said {:?}", String::from_utf8_lossy(&out.stdout))
        })?;
        Ok(Attempt {
            result: v["result"].as_str().unwrap_or("?").to_owned(),
            ms: v["ms"].as_f64().unwrap_or(f64::NAN),
        })
    }

    fn craft_cmd(
        &self,
        host: Host,
        kind: &str,
        src: &str,
        dst: &str,
        count: u32,
        vlans: &[u16],
    ) -> anyhow::Result<Command> {
        let gw_if = if host == Host::VlanClient {
            "lanv"
        } else {
            "lan0"
        };
        let mac = self.mac(Host::Gw, gw_if)?;
        let vlans: Vec<String> = vlans.iter().map(u16::to_string).collect();
        let mut cmd = self.command(host, "/usr/bin/python3");
        cmd.arg(scripts_dir().join("craft.py")).args([
            kind,
            "eth0",
            &mac,
            src,
            dst,
            &count.to_string(),
            &vlans.join(","),
        ]);
        Ok(cmd)
    }

    /// Sends crafted frames (see lab/craft.py) from a client's eth0 to the
    /// gateway; returns how many were sent.
    pub fn craft(
        &self,
        host: Host,
        kind: &str,
        src: &str,
        dst: &str,
        count: u32,
        vlans: &[u16],
    ) -> anyhow::Result<u32> {
        let out = run(&mut self.craft_cmd(host, kind, src, dst, count, vlans)?)?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
    }

    /// Sends one crafted frame and returns what came back within 2 s, as
    /// craft.py describes it (JSON), or Null for nothing.
    pub fn craft_reply(
        &self,
        host: Host,
        kind: &str,
        src: &str,
        dst: &str,
        vlans: &[u16],
    ) -> anyhow::Result<serde_json::Value> {
        let out = run(self.craft_cmd(host, kind, src, dst, 1, vlans)?.arg("reply"))?;
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    pub fn mac(&self, host: Host, iface: &str) -> anyhow::Result<String> {
        Ok(self
            .sh(host, &format!("cat /sys/class/net/{iface}/address"))?
            .trim()
            .to_owned())
    }

    /// Makes a cgroup v2 for this lab; removed when the lab is dropped.
    pub fn cgroup(&mut self, name: &str) -> anyhow::Result<PathBuf> {
        let root = cgroup2_mount().context("no cgroup v2 hierarchy mounted")?;
        let path = root.join(format!("{}-{name}", self.prefix));
        std::fs::create_dir_all(&path)?;
        self.cgroups.push(path.clone());
        Ok(path)
    }

    /// Polls `ready` until it holds, or fails after `timeout`.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        ready: impl Fn(&Lab) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while !ready(self) {
            if Instant::now() > deadline {
                bail!("{what} not ready after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Where this lab's agents pin their programs, maps and links.
    pub fn pin_dir(&self) -> PathBuf {
        PathBuf::from("/sys/fs/bpf").join(&self.prefix)
    }

    /// Writes a file in the lab directory and returns its path.
    pub fn write(&self, name: &str, text: &str) -> anyhow::Result<PathBuf> {
        let path = self.dir.join(name);
        std::fs::File::create(&path)?.write_all(text.as_bytes())?;
        Ok(path)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        // The agents' pins: removing them detaches what they attached.
        let _ = std::fs::remove_dir_all(self.pin_dir());
        for ns in [Host::Client, Host::VlanClient, Host::Gw, Host::Inet].map(|h| self.ns(h)) {
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
        // Innermost first: a cgroup with children cannot be removed.
        for cg in self.cgroups.iter().rev() {
            let _ = std::fs::remove_dir(cg);
        }
        if std::env::var_os("SMTPGATE_KEEP_LAB").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// How one connection attempt ended.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub result: String,
    pub ms: f64,
}

impl Attempt {
    pub fn connected(&self) -> bool {
        self.result == "connected"
    }
}

/// Where the cgroup v2 hierarchy is mounted.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let mut f = line.split_whitespace();
        let (_dev, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(dir))
    })
}
