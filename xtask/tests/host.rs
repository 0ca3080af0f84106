//! The gateway host itself (issue 11): the relay's intercept listener is
//! closed to the world, a local process's denial names the process, and
//! `check` says what the kernel does, for every action and mode.

use std::{process::Command, time::Duration};

use xtask::{
    agent::privileged,
    lab::{self, Host, Lab, Options},
    relay::{setup, setup_config},
};

const LAN_INGRESS: &str = "[[attach]]\nhook = \"tc-ingress\"\ninterface = \"lan0\"\n";

fn status(lab: &Lab, agent: &xtask::agent::Agent) -> serde_json::Value {
    let out = lab.cli(agent, &["status", "--output", "json"]).unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The intercept listener accepts what the datapath steered into it, and
/// nothing that comes to it on its own: from a client network, from the
/// WAN, on any of the gateway's addresses.
#[test]
fn the_intercept_listener_is_reachable_only_by_redirected_flows() {
    if !privileged() {
        return;
    }
    let (lab, agent) = setup("icpt", Options::default(), |_| LAN_INGRESS.to_owned());
    let st = status(&lab, &agent);
    let addr: std::net::SocketAddr = st["relay"]["intercept"]
        .as_str()
        .unwrap_or_else(|| panic!("no intercept listener in {st}"))
        .parse()
        .unwrap();
    assert!(addr.ip().is_loopback(), "bound on {addr}");
    let port = addr.port();
    // Direct connections to every address of the gateway, from both sides.
    for (host, src, dst) in [
        (Host::Client, lab::CLIENT_DENIED_V4, lab::GW_LAN_V4),
        (Host::Client, lab::CLIENT_ALLOWED_V4, lab::GW_LAN_V4),
        (Host::Client, lab::CLIENT_DENIED_V6, "2001:db8:1::1"),
        (Host::Client, lab::CLIENT_DENIED_V4, lab::GW_WAN_V4),
        (Host::Inet, lab::INET_V4, lab::GW_WAN_V4),
        (Host::Inet, lab::INET_V6, lab::GW_WAN_V6),
        (Host::Inet, lab::INET_V4, lab::GW_LAN_V4),
    ] {
        let a = lab
            .connect(host, src, dst, port, Duration::from_millis(1500))
            .unwrap();
        assert!(
            !a.connected(),
            "{src} reached the intercept listener directly at {dst}:{port}: {a:?}"
        );
    }
    // The listener is there, on loopback, and steered connections reach it.
    let listening = lab.sh(Host::Gw, "ss -Hltn").unwrap();
    assert!(
        listening.contains(&format!("127.0.0.1:{port}"))
            && listening.contains(&format!("[::1]:{port}")),
        "{listening}"
    );
    for (src, dst) in [
        (lab::CLIENT_DENIED_V4, lab::INET_V4),
        (lab::CLIENT_DENIED_V6, lab::INET_V6),
    ] {
        let out = lab
            .command(Host::Client, "/usr/bin/swaks")
            .args(["--server", dst, "--port", "25", "--timeout", "10"])
            .args(["--local-interface", src, "--quit-after", "EHLO"])
            .args(["--from", "x@client.lab", "--to", "bob@inet.lab"])
            .output()
            .unwrap();
        let t = String::from_utf8_lossy(&out.stdout);
        assert!(
            t.contains("220 relay.lab"),
            "{src} was not redirected:\n{t}"
        );
    }
}

/// What a local process sees, and what `top` and the log say of it.
#[test]
fn a_local_denial_names_its_cgroup_unit_and_process() {
    if !privileged() {
        return;
    }
    let (mut lab, agent) = setup_config(
        "hostdeny",
        Options::default(),
        "action = \"reject\"\n",
        |lab| {
            let cg = lab.cgroup("host.slice").unwrap();
            format!(
                "[[attach]]\nhook = \"cgroup\"\npath = {:?}\n",
                cg.display().to_string()
            )
        },
    );
    let unit = lab.cgroup("host.slice/mailer.service").unwrap();
    // A process of "mailer.service" tries the internet host's port 25.
    let script = format!(
        "echo $$ > '{}/cgroup.procs' && exec nsenter --net=/run/netns/{} /usr/bin/python3 -c '{}'",
        unit.display(),
        lab.ns(Host::Gw),
        "import socket\ns = socket.socket()\ns.settimeout(5)\n\
         try:\n    s.connect((\"203.0.113.25\", 25)); print(\"connected\")\n\
         except OSError as e:\n    print(e.errno)"
    );
    let child = Command::new("sh")
        .args(["-c", &script])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(said.trim(), "1", "not EPERM: {said}");
    // top: the row names the cgroup, its unit and the process.
    let out = lab.cli(&agent, &["top", "--output", "json"]).unwrap();
    let top: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = top["sources"].as_array().unwrap();
    let row = rows
        .iter()
        .find(|r| r["unit"] == "mailer.service")
        .unwrap_or_else(|| panic!("no row for mailer.service in {top}"));
    assert_eq!(row["pid"], pid, "{row}");
    assert_eq!(row["comm"], "python3", "{row}");
    assert_eq!(row["verdict"], "rejected", "{row}");
    assert!(
        row["cgroup"]
            .as_str()
            .is_some_and(|c| c.ends_with("host.slice/mailer.service")),
        "{row}"
    );
    // top and stats agree that something was denied, and how much.
    let c = lab.stats(&agent).unwrap();
    let denied: u64 = ["dropped", "rejected", "redirected", "audited"]
        .iter()
        .map(|v| {
            c.0.iter()
                .filter(|((_, verdict, _), _)| verdict == v)
                .map(|(_, (conns, _))| conns)
                .sum::<u64>()
        })
        .sum();
    assert_eq!(
        c.connections("ipv4", "rejected", "not_allowlisted"),
        1,
        "{c:?}"
    );
    assert_eq!(top["denied_connections"], denied, "{top}");
    // The human view says who, too.
    let out = lab.cli(&agent, &["top"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("smtpgate top:\n{text}");
    assert!(
        text.contains(&format!("mailer.service (pid {pid} python3)")),
        "{text}"
    );
    // And the log.
    lab.wait_for("the denial's log line", Duration::from_secs(5), |lab| {
        lab.read_log(&agent.log)
            .lines()
            .any(|l| l.contains("by a local process") && l.contains("unit=\"mailer.service\""))
    })
    .unwrap();
    let log = lab.read_log(&agent.log);
    let line = log
        .lines()
        .find(|l| l.contains("by a local process"))
        .unwrap();
    eprintln!("log: {line}");
    for want in [
        format!("pid={pid}"),
        "comm=\"python3\"".to_owned(),
        "dst=203.0.113.25".to_owned(),
        "dport=25".to_owned(),
    ] {
        assert!(line.contains(&want), "{want} not in {line}");
    }
}

/// One SYN at a time, crafted so that nothing retransmits, from each kind
/// of source to each kind of port: the counter slot the kernel bumps must
/// be the verdict and reason `check` gives, for drop, reject, redirect and
/// audit.
#[test]
fn check_agrees_with_the_kernel_for_every_action_and_mode() {
    if !privileged() {
        return;
    }
    let cases = [
        ("chkdrop", "action = \"drop\"\n"),
        ("chkrej", "action = \"reject\"\n"),
        ("chkredir", "action = \"redirect\"\n"),
        ("chkaudit", "action = \"reject\"\nmode = \"audit\"\n"),
    ];
    let mut seen = std::collections::BTreeSet::new();
    for (name, head) in cases {
        let head = format!("{head}ports = [25, 587]\n");
        let (lab, agent) =
            setup_config(name, Options::default(), &head, |_| LAN_INGRESS.to_owned());
        for (kind, src, dst, port) in [
            ("syn", lab::CLIENT_ALLOWED_V4, lab::INET_V4, 25),
            ("syn", lab::CLIENT_DENIED_V4, lab::INET_V4, 25),
            ("syn587", lab::CLIENT_DENIED_V4, lab::INET_V4, 587),
            ("syn", lab::CLIENT_DENIED_V6, lab::INET_V6, 25),
            ("syn587", lab::CLIENT_DENIED_V6, lab::INET_V6, 587),
            ("mapped", lab::CLIENT_DENIED_V4, lab::INET_V6, 25),
        ] {
            let asked = if kind == "mapped" {
                format!("::ffff:{src}")
            } else {
                src.to_owned()
            };
            let out = lab
                .cli(
                    &agent,
                    &[
                        "check",
                        &asked,
                        "--port",
                        &port.to_string(),
                        "--output",
                        "json",
                    ],
                )
                .unwrap();
            let check: serde_json::Value = serde_json::from_slice(&out.stdout)
                .unwrap_or_else(|e| panic!("check {asked}: {e}: {out:?}"));
            let before = lab.stats(&agent).unwrap();
            assert_eq!(lab.craft(Host::Client, kind, src, dst, 1, &[]).unwrap(), 1);
            // Let the answers (SYN-ACK, the client's RST) be counted too:
            // they must land in the same slot.
            std::thread::sleep(Duration::from_millis(400));
            let delta = lab.stats(&agent).unwrap().since(&before);
            let moved: Vec<_> = delta.nonzero().into_keys().collect();
            // A mapped source is an IPv6 packet, counted as one.
            let family = if asked.contains(':') { "ipv6" } else { "ipv4" };
            let want = format!(
                "{family}/{}/{}",
                check["verdict"].as_str().unwrap(),
                check["reason"].as_str().unwrap()
            );
            assert_eq!(
                moved,
                vec![want.clone()],
                "{name}: {asked} -> port {port}: check said {check}, the kernel counted {delta:?}"
            );
            seen.insert(format!("{}/{}", check["verdict"], check["reason"]));
            // check's exit status tells a script the same.
            let allowed = check["verdict"] == "allowed";
            assert_eq!(
                out.status.code(),
                Some(if allowed { 0 } else { 5 }),
                "{out:?}"
            );
        }
        drop(lab);
    }
    // Every verdict was exercised, not just the easy ones.
    for v in ["allowed", "dropped", "rejected", "redirected", "audited"] {
        assert!(
            seen.iter().any(|s| s.contains(&format!("\"{v}\""))),
            "{v} never seen: {seen:?}"
        );
    }
}

/// Submits one message as alice on the relay's 587, from the allowed client.
fn submit(lab: &Lab, marker: &str) -> String {
    let out = lab
        .command(Host::Client, "/usr/bin/swaks")
        .args([
            "--server",
            lab::GW_LAN_V4,
            "--port",
            "587",
            "--timeout",
            "10",
        ])
        .args(["--tls", "--auth", "PLAIN", "--auth-user", "alice"])
        .args(["--auth-password", xtask::relay::PASSWORD])
        .args(["--from", "alice@client.lab", "--to", "bob@inet.lab"])
        .args(["--header", &format!("Subject: {marker}")])
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A process in the protected cgroup: its connect() to the internet host's
/// port 25, as the errno it got (0: connected).
fn local_connect(lab: &Lab, cgroup: &std::path::Path) -> String {
    let script = format!(
        "echo $$ > '{}/cgroup.procs' && exec nsenter --net=/run/netns/{} /usr/bin/python3 -c '{}'",
        cgroup.display(),
        lab.ns(Host::Gw),
        "import socket\ns = socket.socket()\ns.settimeout(5)\n\
         try:\n    s.connect((\"203.0.113.25\", 25)); print(0)\n\
         except OSError as e:\n    print(e.errno)"
    );
    let out = Command::new("sh").args(["-c", &script]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The gateway's own port-25 connections the internet host accepted.
fn gateway_deliveries(lab: &Lab) -> usize {
    lab.inet_connections()
        .iter()
        .filter(|(port, peer)| *port == 25 && peer == lab::GW_WAN_V4)
        .count()
}

/// With the cgroup hook over the agent's own cgroup and a shell's, the
/// relay delivers (to a smarthost on port 25, and to an MX found through a
/// real DNS server), while the shell beside it still gets EPERM.
#[test]
fn the_relay_delivers_under_a_host_cgroup_attach_and_nothing_else_does() {
    if !privileged() {
        return;
    }
    for (name, upstream, relay) in [
        (
            "hostrelay",
            "host = \"203.0.113.25\"\nport = 25\ntls = \"none\"",
            String::new(),
        ),
        (
            "hostmx",
            "",
            "nameservers = [\"203.0.113.25:53\"]".to_owned(),
        ),
    ] {
        let custom = xtask::relay::Custom {
            head: "action = \"reject\"\n",
            relay: &relay,
            upstream: Some(upstream),
            agent_cgroup: Some("host.slice/smtpgate.service"),
        };
        let (mut lab, agent) =
            xtask::relay::setup_custom(name, Options::default(), &custom, |lab| {
                let cg = lab.cgroup("host.slice").unwrap();
                format!(
                    "[[attach]]\nhook = \"cgroup\"\npath = {:?}\n",
                    cg.display().to_string()
                )
            });
        if upstream.is_empty() {
            // The internet host is also the lab's DNS: inet.lab's MX is it.
            let mut dns = lab.command(Host::Inet, "/usr/sbin/dnsmasq");
            dns.args([
                "--no-daemon",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--listen-address=203.0.113.25",
                "--port=53",
                "--local=/lab/",
                "--mx-host=inet.lab,mx.inet.lab,10",
                "--host-record=mx.inet.lab,203.0.113.25",
            ]);
            lab.spawn(dns, "dns.log").unwrap();
            std::thread::sleep(Duration::from_millis(300));
        }
        let shell = lab.cgroup("host.slice/shell.scope").unwrap();
        assert_eq!(
            local_connect(&lab, &shell),
            "1",
            "{name}: the shell was not refused"
        );
        let t = submit(&lab, name);
        assert!(
            t.contains("<~  250 2.0.0"),
            "{name}: submission failed:\n{t}"
        );
        lab.wait_for(
            "the relay's delivery to reach the internet host",
            Duration::from_secs(20),
            |lab| gateway_deliveries(lab) >= 1,
        )
        .unwrap_or_else(|e| panic!("{name}: {e}\nagent log:\n{}", lab.read_log(&agent.log)));
        let c = lab.stats(&agent).unwrap();
        assert!(
            c.connections("ipv4", "allowed", "relay_delivery") >= 1,
            "{name}: {c:?}"
        );
        // The shell still cannot, after the relay did.
        assert_eq!(
            local_connect(&lab, &shell),
            "1",
            "{name}: the shell got out"
        );
        assert_eq!(gateway_deliveries(&lab), 1, "{name}: only the relay's one");
        assert!(
            c.connections("ipv4", "rejected", "not_allowlisted") >= 1,
            "{name}: {c:?}"
        );
    }
}

/// 300 idle bots redirected into the intercept listener, from 15
/// addresses: an authenticated user still gets a session on 587.
#[test]
fn idle_redirected_bots_do_not_lock_users_out_of_submission() {
    if !privileged() {
        return;
    }
    let (mut lab, agent) = setup("bots", Options::default(), |_| LAN_INGRESS.to_owned());
    let bots: Vec<String> = (100..115).map(|i| format!("192.0.2.{i}")).collect();
    for b in &bots {
        lab.sh(Host::Client, &format!("ip addr add {b}/24 dev eth0"))
            .unwrap();
    }
    let mut hold = lab.command(Host::Client, "/usr/bin/python3");
    hold.arg(lab::scripts_dir().join("hold.py"))
        .args(["300", lab::INET_V4, "25", &bots.join(",")]);
    lab.spawn(hold, "hold.log").unwrap();
    lab.wait_for("the bots to connect", Duration::from_secs(60), |lab| {
        lab.read_log("hold.log").contains("held")
    })
    .unwrap();
    let held = lab.read_log("hold.log");
    eprintln!("bots: {held}");
    let c = lab.stats(&agent).unwrap();
    assert!(
        c.connections("ipv4", "redirected", "not_allowlisted") >= 300,
        "{c:?}"
    );
    // The user, from the allowed client, on 587.
    let t = submit(&lab, "past the bots");
    assert!(
        t.contains("<~  250 2.0.0"),
        "the user was locked out by idle bots ({held}):\n{t}"
    );
}
