//! Running the real `smtpgate` binary inside a lab, and asking it things
//! through its CLI, as an admin would.

use std::{
    collections::HashMap,
    path::PathBuf,
    process::{Command, Output},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::lab::{Host, Lab};

/// The smtpgate binary under test: $SMTPGATE_BIN, or the workspace's debug
/// build (`cargo xtask test` builds it first).
pub fn smtpgate_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SMTPGATE_BIN") {
        return PathBuf::from(p);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    root.join("target/debug/smtpgate")
}

/// Privileged tests need root. They never skip silently: in CI (CI=true)
/// or without an explicit SMTPGATE_SKIP_PRIVILEGED=1 they fail instead.
/// Returns false when the caller should skip.
pub fn privileged() -> bool {
    // SAFETY: plain getter.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let in_ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false");
    if !in_ci && std::env::var("SMTPGATE_SKIP_PRIVILEGED").as_deref() == Ok("1") {
        eprintln!("SKIPPED: needs root (SMTPGATE_SKIP_PRIVILEGED=1)");
        return false;
    }
    panic!(
        "this test needs root (network namespaces, eBPF); run `sudo cargo xtask test`, or set SMTPGATE_SKIP_PRIVILEGED=1 outside CI to skip it"
    );
}

/// How an agent attaches its TC programs: tests that must hold in both
/// modes run once with each (see `tc_modes!`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcMode {
    Tcx,
    Classic,
}

impl TcMode {
    /// The value of `SMTPGATE_TC_MODE` and of the attachments' `mode` in
    /// `smtpgate status --output json`.
    pub fn as_str(self) -> &'static str {
        match self {
            TcMode::Tcx => "tcx",
            TcMode::Classic => "classic",
        }
    }
}

/// Turns a test body `fn name(mode: TcMode)` into two tests, `name::tcx`
/// and `name::classic`, so that one body covers both TC attach modes
/// (`cargo test -- classic` runs every classic one).
#[macro_export]
macro_rules! tc_modes {
    ($($body:ident),+ $(,)?) => {$(
        mod $body {
            #[test]
            fn tcx() {
                super::$body($crate::agent::TcMode::Tcx);
            }
            #[test]
            fn classic() {
                super::$body($crate::agent::TcMode::Classic);
            }
        }
    )+};
}

pub struct Agent {
    pub pid: u32,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub log: String,
}

/// Counters from `smtpgate stats`, keyed by (family, verdict, reason).
#[derive(Debug, Default, Clone)]
pub struct Counters(pub HashMap<(String, String, String), (u64, u64)>);

impl Counters {
    /// (connections, packets) for one combination; zero if never seen.
    pub fn get(&self, family: &str, verdict: &str, reason: &str) -> (u64, u64) {
        self.0
            .get(&(family.to_owned(), verdict.to_owned(), reason.to_owned()))
            .copied()
            .unwrap_or_default()
    }

    pub fn packets(&self, family: &str, verdict: &str, reason: &str) -> u64 {
        self.get(family, verdict, reason).1
    }

    pub fn connections(&self, family: &str, verdict: &str, reason: &str) -> u64 {
        self.get(family, verdict, reason).0
    }

    /// The combinations seen at all, as "family/verdict/reason" ->
    /// (connections, packets): what a failure message should show.
    pub fn nonzero(&self) -> std::collections::BTreeMap<String, (u64, u64)> {
        self.0
            .iter()
            .filter(|(_, v)| **v != (0, 0))
            .map(|((f, v, r), n)| (format!("{f}/{v}/{r}"), *n))
            .collect()
    }

    /// The difference from an earlier reading.
    pub fn since(&self, before: &Counters) -> Counters {
        Counters(
            self.0
                .iter()
                .map(|(k, (c, p))| {
                    let (bc, bp) = before.0.get(k).copied().unwrap_or_default();
                    (k.clone(), (c - bc, p - bp))
                })
                .collect(),
        )
    }
}

impl Lab {
    /// Writes an agent's config: `config` plus the lab's state directory,
    /// pin directory and a control socket in the lab directory. Returns the
    /// config's path and the socket's.
    fn agent_config(&self, name: &str, config: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
        let socket = self.dir.join(format!("{name}.sock"));
        // Pins and state belong to the lab, not to one agent: a restarted
        // agent finds what the previous one left, as on a real gateway.
        // A test's own [datapath] section gets the lab's pin_dir added.
        let pin_dir = format!("pin_dir = {:?}\n", self.pin_dir().display().to_string());
        let (config, datapath) = match config.split_once("[datapath]\n") {
            Some((head, tail)) => (format!("{head}[datapath]\n{pin_dir}{tail}"), String::new()),
            None => (config.to_owned(), format!("[datapath]\n{pin_dir}")),
        };
        let text = format!(
            "state_dir = {:?}\n{config}\n[control]\nsocket = {:?}\n{datapath}",
            self.dir.join("state").display().to_string(),
            socket.display().to_string(),
        );
        Ok((self.write(&format!("{name}.toml"), &text)?, socket))
    }

    /// Runs `smtpgate run` in the gateway with `config` and expects it to
    /// exit by itself within `timeout` (a config it must refuse): its exit
    /// status and everything it printed. An agent still running after the
    /// timeout is killed and reported as an error.
    pub fn run_agent_to_exit(
        &mut self,
        name: &str,
        config: &str,
        timeout: Duration,
    ) -> anyhow::Result<(std::process::ExitStatus, String)> {
        let (config, _) = self.agent_config(name, config)?;
        let log = self.dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log)?;
        let mut child = self
            .command(Host::Gw, smtpgate_bin())
            .args(["run", "--config"])
            .arg(&config)
            .env("SMTPGATE_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .context("starting smtpgate")?;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok((status, std::fs::read_to_string(&log)?));
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "smtpgate kept running for {timeout:?}:\n{}",
                    std::fs::read_to_string(&log)?
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts `smtpgate run` in the gateway with `config` (the control
    /// socket is set to one in the lab directory), and waits until it
    /// answers on its control socket.
    pub fn start_agent(&mut self, name: &str, config: &str) -> anyhow::Result<Agent> {
        self.start_agent_in(name, config, None)
    }

    /// [`Lab::start_agent`] with the agent in `cgroup` (as systemd puts it
    /// in smtpgate.service), where a cgroup attach covers it too.
    pub fn start_agent_in(
        &mut self,
        name: &str,
        config: &str,
        cgroup: Option<&std::path::Path>,
    ) -> anyhow::Result<Agent> {
        let (config, socket) = self.agent_config(name, config)?;
        let mut cmd = match cgroup {
            None => self.command(Host::Gw, smtpgate_bin()),
            Some(cg) => {
                // The shell moves itself, then becomes nsenter and the agent.
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!(
                        "echo $$ > '{}/cgroup.procs' && exec nsenter --net=/run/netns/{} -- \"$0\" \"$@\"",
                        cg.display(),
                        self.ns(Host::Gw)
                    ))
                    .arg(smtpgate_bin());
                c
            }
        };
        cmd.args(["run", "--config"])
            .arg(&config)
            .env("SMTPGATE_LOG", "info");
        if let Some(mode) = self.tc_mode {
            cmd.env("SMTPGATE_TC_MODE", mode.as_str());
        }
        let log = format!("{name}.log");
        let pid = self.spawn(cmd, &log)?;
        let agent = Agent {
            pid,
            socket,
            config,
            log,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if self
                .cli(&agent, &["status"])
                .is_ok_and(|o| o.status.success())
            {
                self.check_tc_mode(&agent)?;
                return Ok(agent);
            }
            if !self.alive(pid) || std::time::Instant::now() > deadline {
                bail!("smtpgate did not start:\n{}", self.read_log(&agent.log));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A test meant for one TC mode must not pass in the other: every TC
    /// attachment the agent reports must be in the lab's mode.
    fn check_tc_mode(&self, agent: &Agent) -> anyhow::Result<()> {
        let Some(mode) = self.tc_mode else {
            return Ok(());
        };
        let out = self.cli(agent, &["status", "--output", "json"])?;
        let status: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        for a in status["attachments"].as_array().into_iter().flatten() {
            let tc = a["point"]["hook"]
                .as_str()
                .is_some_and(|h| h.starts_with("tc-"));
            if tc && a["mode"] != mode.as_str() {
                bail!(
                    "the agent attached {a} instead of in {} mode",
                    mode.as_str()
                );
            }
        }
        Ok(())
    }

    /// Runs the smtpgate CLI against `agent`.
    pub fn cli(&self, agent: &Agent, args: &[&str]) -> anyhow::Result<Output> {
        Command::new(smtpgate_bin())
            .arg("--socket")
            .arg(&agent.socket)
            .args(args)
            .output()
            .context("running smtpgate")
    }

    /// Reads the agent's counters through `smtpgate stats --output json`.
    pub fn stats(&self, agent: &Agent) -> anyhow::Result<Counters> {
        let out = self.cli(agent, &["stats", "--output", "json"])?;
        if !out.status.success() {
            bail!(
                "smtpgate stats failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let mut map = HashMap::new();
        for row in v["counters"].as_array().into_iter().flatten() {
            let key = (
                row["family"].as_str().unwrap_or_default().to_owned(),
                row["verdict"].as_str().unwrap_or_default().to_owned(),
                row["reason"].as_str().unwrap_or_default().to_owned(),
            );
            map.insert(
                key,
                (
                    row["connections"].as_u64().unwrap_or(0),
                    row["packets"].as_u64().unwrap_or(0),
                ),
            );
        }
        Ok(Counters(map))
    }
}
