//! An L3 device in the lab: a tun in the gateway, held open by lab/tun.py,
//! with the lab's "beyond the tunnel" prefixes ([`lab::TUN_NET_V4`],
//! [`lab::TUN_NET_V6`]) routed into it. What the kernel sends into it is
//! logged by the script; what the script writes comes out of the tunnel
//! into the gateway.

use std::{
    io::{Read as _, Write as _},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::lab::{self, Host, Lab};

pub struct Tun {
    pub name: String,
    pub pid: u32,
    control: PathBuf,
    log: PathBuf,
}

/// One packet the kernel sent out of the tun, as tun.py logged it.
#[derive(Clone, Debug)]
pub struct TunPacket {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    /// Any fragment (then there are no ports).
    pub frag: bool,
    pub dport: Option<u16>,
    pub flags: Option<String>,
}

impl TunPacket {
    /// A pure SYN (a connection attempt) from `src` to port `dport`.
    pub fn is_syn(&self, src: &str, dport: u16) -> bool {
        self.from(src) && self.dport == Some(dport) && self.flags.as_deref() == Some("S")
    }

    pub fn from(&self, src: &str) -> bool {
        src.parse::<IpAddr>().is_ok_and(|a| a == self.src)
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl Lab {
    /// Creates tun device `name` in the gateway and routes the tunnel
    /// prefixes into it. With `answer`, the far end accepts every TCP
    /// connection (SYN-ACK), so a client's connect() through it completes.
    pub fn tun(&mut self, name: &str, answer: bool) -> anyhow::Result<Tun> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let control = self.dir.join(format!("tun-{name}-{n}.sock"));
        let log = self.dir.join(format!("tun-{name}-{n}.jsonl"));
        let out = format!("tun-{name}-{n}.out");
        std::fs::write(&log, "")?;
        let mut cmd = self.command(Host::Gw, "/usr/bin/python3");
        cmd.arg(lab::scripts_dir().join("tun.py"))
            .arg(name)
            .arg(&control)
            .arg(&log);
        if answer {
            cmd.arg("answer");
        }
        let pid = self.spawn(cmd, &out)?;
        self.wait_for("tun.py", Duration::from_secs(15), |lab| {
            lab.read_log(&out).contains("ready")
        })
        .with_context(|| self.read_log(&out))?;
        self.sh(
            Host::Gw,
            &format!(
                "ip link set {name} up
                 ip route replace {} dev {name}; ip -6 route replace {} dev {name}",
                lab::TUN_NET_V4,
                lab::TUN_NET_V6
            ),
        )?;
        Ok(Tun {
            name: name.to_owned(),
            pid,
            control,
            log,
        })
    }

    /// Closes the tun: the device, its routes and its TC links go away.
    pub fn tun_down(&mut self, tun: Tun) -> anyhow::Result<()> {
        self.stop(tun.pid, false)?;
        let gone = format!("ip link show {} 2>/dev/null || true", tun.name);
        self.wait_for("the tun device to go", Duration::from_secs(5), |lab| {
            lab.sh(Host::Gw, &gone).is_ok_and(|o| o.trim().is_empty())
        })
    }
}

impl Tun {
    /// Every IP packet the kernel sent out of the tun so far.
    pub fn seen(&self) -> Vec<TunPacket> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).ok()?;
                Some(TunPacket {
                    src: v["src"].as_str()?.parse().ok()?,
                    dst: v["dst"].as_str()?.parse().ok()?,
                    proto: u8::try_from(v["proto"].as_u64()?).ok()?,
                    frag: v["frag"].as_bool().unwrap_or(false),
                    dport: v["dport"].as_u64().and_then(|p| u16::try_from(p).ok()),
                    flags: v["flags"].as_str().map(str::to_owned),
                })
            })
            .collect()
    }

    fn request(&self, req: &serde_json::Value) -> anyhow::Result<serde_json::Value> {
        let mut s = UnixStream::connect(&self.control)
            .with_context(|| format!("connecting to {}", self.control.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.write_all(format!("{req}\n").as_bytes())?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        let v: serde_json::Value =
            serde_json::from_str(&out).with_context(|| format!("tun.py said {out:?}"))?;
        if let Some(e) = v.get("error") {
            bail!("tun.py: {e}");
        }
        Ok(v)
    }

    /// Writes `count` packets of `kind` (see lab/craft.py) into the tun, as
    /// if they came out of the tunnel; returns how many.
    pub fn send(&self, kind: &str, src: &str, dst: &str, count: u32) -> anyhow::Result<u32> {
        let v = self.request(&serde_json::json!({
            "op": "send", "kind": kind, "src": src, "dst": dst, "count": count,
        }))?;
        let sent = v["sent"].as_u64().context("no count")?;
        Ok(u32::try_from(sent)?)
    }

    /// Writes one packet of `kind` and returns what came back out of the
    /// tun for it within 2 s, as craft.py describes it, or Null.
    pub fn reply(&self, kind: &str, src: &str, dst: &str) -> anyhow::Result<serde_json::Value> {
        self.request(&serde_json::json!({
            "op": "reply", "kind": kind, "src": src, "dst": dst,
        }))
    }
}
