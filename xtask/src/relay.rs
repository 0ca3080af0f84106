//! A lab gateway whose agent runs the relay: smtp-sink as the relay's
//! upstream (in the gateway, on loopback), a self-signed certificate and
//! one user. Shared by the redirect tests on Ethernet and on L3 devices.

use std::process::Command;

use crate::{
    agent::{Agent, smtpgate_bin},
    lab::{self, Host, Lab, Options, run},
};

/// alice's password.
pub const PASSWORD: &str = "correct horse battery staple";
/// smtp-sink's port on the gateway's loopback.
pub const SINK_PORT: u16 = 2525;

/// A lab with smtp-sink as the relay's upstream (in the gateway, on
/// loopback), a self-signed certificate, a user, and the agent running
/// `action = "redirect"` at the attach points `attach` writes.
pub fn setup(
    name: &str,
    options: Options,
    attach: impl FnOnce(&mut Lab) -> String,
) -> (Lab, Agent) {
    setup_with(name, options, "redirect", attach)
}

/// [`setup`] with another `action` (the relay on all the same).
pub fn setup_with(
    name: &str,
    options: Options,
    action: &str,
    attach: impl FnOnce(&mut Lab) -> String,
) -> (Lab, Agent) {
    setup_config(name, options, &format!("action = \"{action}\"\n"), attach)
}

/// [`setup`] with `head` (top-level TOML: action, mode, ports) at the top
/// of the agent's config.
pub fn setup_config(
    name: &str,
    options: Options,
    head: &str,
    attach: impl FnOnce(&mut Lab) -> String,
) -> (Lab, Agent) {
    setup_custom(
        name,
        options,
        &Custom {
            head,
            ..Custom::default()
        },
        attach,
    )
}

/// What [`setup_custom`] varies.
#[derive(Default)]
pub struct Custom<'a> {
    /// Top-level TOML (action, mode, ports).
    pub head: &'a str,
    /// More `[relay]` keys.
    pub relay: &'a str,
    /// The `[relay.upstream]` table's keys; None: smtp-sink on the
    /// gateway's loopback; Some(""): no smarthost (delivery to MX hosts).
    pub upstream: Option<&'a str>,
    /// A lab cgroup (see [`Lab::cgroup`]) to start the agent in.
    pub agent_cgroup: Option<&'a str>,
}

/// [`setup`], varied as `custom` says.
pub fn setup_custom(
    name: &str,
    options: Options,
    custom: &Custom<'_>,
    attach: impl FnOnce(&mut Lab) -> String,
) -> (Lab, Agent) {
    let head = custom.head;
    let mut lab = Lab::up(name, options).unwrap();
    lab.start_listeners().unwrap();
    let attach = attach(&mut lab);
    let dir = lab.dir.clone();
    run(Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=relay.lab",
        ])
        .arg("-keyout")
        .arg(dir.join("relay.key"))
        .arg("-out")
        .arg(dir.join("relay.crt")))
    .unwrap();
    let sink_dir = dir.join("sink");
    std::fs::create_dir_all(&sink_dir).unwrap();
    let mut sink = lab.command(Host::Gw, "/usr/sbin/smtp-sink");
    sink.args([
        "-u",
        "root",
        "-d",
        &format!("{}/msg.", sink_dir.display()),
        &format!("127.0.0.1:{SINK_PORT}"),
        "100",
    ]);
    lab.spawn(sink, "sink.log").unwrap();
    let upstream = match custom.upstream {
        None => {
            format!("[relay.upstream]\nhost = \"127.0.0.1\"\nport = {SINK_PORT}\ntls = \"none\"\n")
        }
        Some("") => String::new(),
        Some(keys) => format!("[relay.upstream]\n{keys}\n"),
    };
    let config = format!(
        "{head}allowlist = [\"{}\", \"{}\"]\n{attach}\n[relay]\nenabled = true\nhostname = \"relay.lab\"\n\
         tls_cert = {:?}\ntls_key = {:?}\nusers_file = {:?}\nspool_dir = {:?}\ndkim_dir = {:?}\n{}\n\
         {upstream}[relay.retry]\ninitial_backoff_secs = 0.2\n",
        lab::CLIENT_ALLOWED_V4,
        lab::CLIENT_ALLOWED_V6,
        dir.join("relay.crt").display().to_string(),
        dir.join("relay.key").display().to_string(),
        dir.join("users.toml").display().to_string(),
        dir.join("spool").display().to_string(),
        // The lab's own keys (none unless a test adds some), never the host's.
        dir.join("dkim").display().to_string(),
        custom.relay,
    );
    // The user, added with the CLI, as an admin would.
    let cfg = lab.write("users-cli.toml", &config).unwrap();
    let mut add = Command::new(smtpgate_bin());
    add.args([
        "user",
        "add",
        "alice",
        "--sender",
        "alice@client.lab",
        "--config",
    ])
    .arg(&cfg);
    let out = pipe(add, PASSWORD);
    assert!(
        out.status.success(),
        "user add: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cgroup = custom.agent_cgroup.map(|c| lab.cgroup(c).unwrap());
    let agent = lab
        .start_agent_in("agent", &config, cgroup.as_deref())
        .unwrap();
    (lab, agent)
}

/// Runs `cmd` with `input` and a newline on its standard input.
pub fn pipe(mut cmd: Command, input: &str) -> std::process::Output {
    use std::io::Write as _;
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{input}\n").as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}
