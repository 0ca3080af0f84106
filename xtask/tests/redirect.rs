//! Redirect: denied clients' port-25 connections land in the embedded
//! relay, never on the Internet. Real swaks, real smtp-sink upstream.

use std::{process::Command, time::Duration};

use xtask::{
    agent::privileged,
    lab::{self, Host, Lab, Options},
    relay::{PASSWORD, setup, setup_with},
};

const LAN_INGRESS: &str = "[[attach]]\nhook = \"tc-ingress\"\ninterface = \"lan0\"\n";

/// swaks from `src` in `host` to `dst`:25; returns its whole transcript.
fn swaks(lab: &Lab, host: Host, src: &str, dst: &str, auth: bool, body: &str) -> String {
    let mut cmd = lab.command(host, "/usr/bin/swaks");
    cmd.args([
        "--server",
        dst,
        "--port",
        "25",
        "--timeout",
        "10",
        "--to",
        "bob@inet.lab",
    ]);
    if src != "-" {
        cmd.args(["--local-interface", src]);
    }
    if auth {
        cmd.args([
            "--tls",
            "--auth",
            "PLAIN",
            "--auth-user",
            "alice",
            "--auth-password",
            PASSWORD,
            "--from",
            "alice@client.lab",
        ]);
    } else {
        cmd.args(["--from", "spammer@client.lab"]);
    }
    cmd.args(["--header", "Subject: redirect test", "--body", body]);
    let out = cmd.output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn sink_messages(lab: &Lab) -> Vec<String> {
    std::fs::read_dir(lab.dir.join("sink"))
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .collect()
}

fn inet_saw(lab: &Lab, peer: &str) -> usize {
    lab.inet_connections()
        .iter()
        .filter(|(p, a)| *p == 25 && a == peer)
        .count()
}

#[test]
fn denied_clients_land_in_the_relay_and_never_reach_the_internet() {
    if !privileged() {
        return;
    }
    let (lab, agent) = setup("redir", Options::default(), |_| LAN_INGRESS.to_owned());
    for (denied, allowed, inet) in [
        (lab::CLIENT_DENIED_V4, lab::CLIENT_ALLOWED_V4, lab::INET_V4),
        (lab::CLIENT_DENIED_V6, lab::CLIENT_ALLOWED_V6, lab::INET_V6),
    ] {
        // Without credentials: the relay's banner, then a refusal that says
        // what to do.
        let t = swaks(&lab, Host::Client, denied, inet, false, "spam");
        assert!(
            t.contains("220 relay.lab"),
            "no relay banner for {denied}:\n{t}"
        );
        assert!(
            t.contains("530 5.7.0") && t.contains("587"),
            "MAIL without AUTH must get 530:\n{t}"
        );
        // With credentials: relayed to the upstream sink.
        let body = format!("hello from {denied}");
        let t = swaks(&lab, Host::Client, denied, inet, true, &body);
        assert!(
            t.contains("250 2.0.0"),
            "authenticated mail refused for {denied}:\n{t}"
        );
        lab.wait_for(
            "the sink to get the message",
            Duration::from_secs(20),
            |lab| sink_messages(lab).iter().any(|m| m.contains(&body)),
        )
        .unwrap();
        let msg = sink_messages(&lab)
            .into_iter()
            .find(|m| m.contains(&body))
            .unwrap();
        assert!(
            msg.contains(&format!(
                "original destination {}",
                if inet.contains(':') {
                    format!("[{inet}]:25")
                } else {
                    format!("{inet}:25")
                }
            )),
            "{msg}"
        );
        // The internet host's port 25 never saw the denied client.
        assert_eq!(
            inet_saw(&lab, denied),
            0,
            "{denied} reached the internet host"
        );
        // An allowlisted client still goes straight out.
        let t = swaks(&lab, Host::Client, allowed, inet, false, "direct");
        assert!(
            t.contains("220 inet.lab"),
            "allowlisted {allowed} did not reach the internet host:\n{t}"
        );
        assert_eq!(inet_saw(&lab, allowed), 1);
    }
    let c = lab.stats(&agent).unwrap();
    for family in ["ipv4", "ipv6"] {
        assert_eq!(
            c.connections(family, "redirected", "not_allowlisted"),
            2,
            "{family}: {c:?}"
        );
    }
    let status = String::from_utf8_lossy(
        &lab.cli(&agent, &["status", "--output", "json"])
            .unwrap()
            .stdout,
    )
    .into_owned();
    assert!(status.contains("\"intercept\""), "{status}");

    // The policy routing the agent installed over netlink, as `ip` shows
    // it, and gone after detach.
    let routing = |lab: &Lab| {
        lab.sh(
            Host::Gw,
            "ip -4 rule; ip -6 rule; ip -4 route show table 25225; ip -6 route show table 25225 2>/dev/null || true",
        )
        .unwrap()
    };
    let shown = routing(&lab);
    assert_eq!(
        shown.matches("fwmark 0x5347001 lookup 25225").count(),
        2,
        "{shown}"
    );
    assert!(shown.contains("local default dev lo"), "{shown}");
    assert_eq!(shown.matches("local default dev lo").count(), 2, "{shown}");
    let out = lab.cli(&agent, &["detach"]).unwrap();
    assert!(out.status.success(), "{out:?}");
    let shown = routing(&lab);
    assert!(!shown.contains("25225"), "left after detach:\n{shown}");
}

#[test]
fn redirect_fails_closed_when_the_agent_is_gone() {
    if !privileged() {
        return;
    }
    let (mut lab, agent) = setup("redirdown", Options { nat: true }, |_| {
        LAN_INGRESS.to_owned()
    });
    // On the NAT gateway too, first: redirect works, allowlisted go out.
    let t = swaks(
        &lab,
        Host::Client,
        lab::CLIENT_DENIED_V4,
        lab::INET_V4,
        false,
        "x",
    );
    assert!(t.contains("220 relay.lab"), "{t}");
    let t = swaks(
        &lab,
        Host::Client,
        lab::CLIENT_ALLOWED_V4,
        lab::INET_V4,
        false,
        "x",
    );
    assert!(t.contains("220 inet.lab"), "{t}");
    lab.stop(agent.pid, true).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let before = lab.inet_connections().len();
    for (src, dst) in [
        (lab::CLIENT_DENIED_V4, lab::INET_V4),
        (lab::CLIENT_DENIED_V6, lab::INET_V6),
    ] {
        let a = lab
            .connect(Host::Client, src, dst, 25, Duration::from_millis(1500))
            .unwrap();
        assert!(
            !a.connected(),
            "{src} got through with the agent down: {a:?}"
        );
    }
    assert_eq!(
        lab.inet_connections().len(),
        before,
        "the internet host saw a connection"
    );
    // The allowlisted client is unaffected.
    let a = lab
        .connect(
            Host::Client,
            lab::CLIENT_ALLOWED_V4,
            lab::INET_V4,
            25,
            Duration::from_millis(1500),
        )
        .unwrap();
    assert!(a.connected(), "{a:?}");
    // users-cli.toml holds the config as setup() wrote it.
    let config = std::fs::read_to_string(lab.dir.join("users-cli.toml")).unwrap();
    let agent = lab.start_agent("agent", &config).unwrap();
    let c = lab.stats(&agent).unwrap();
    assert!(
        c.connections("ipv4", "dropped", "relay_unavailable") >= 1,
        "{c:?}"
    );
}

#[test]
fn local_processes_are_redirected_through_the_cgroup_hook() {
    if !privileged() {
        return;
    }
    let (lab, agent) = setup("redircg", Options::default(), |lab| {
        // A dot, as in systemd's slices: pin names must cope with it.
        let cg = lab.cgroup("senders.slice").unwrap();
        format!(
            "[[attach]]\nhook = \"cgroup\"\npath = {:?}\n",
            cg.display().to_string()
        )
    });
    let cg = lab::cgroup2_mount()
        .unwrap()
        .join(format!("{}-senders.slice", lab.prefix));
    // swaks on the gateway host itself, in the cgroup, to the internet host.
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec nsenter --net=/run/netns/{} swaks --server {} --port 25 --timeout 10 \
         --from spammer@gw.lab --to bob@inet.lab",
        cg.display(),
        lab.ns(Host::Gw),
        lab::INET_V4
    );
    let out = Command::new("sh").args(["-c", &script]).output().unwrap();
    let t = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        t.contains("220 relay.lab"),
        "the local process did not land in the relay:\n{t}"
    );
    assert!(t.contains("530 5.7.0"), "{t}");
    assert_eq!(
        inet_saw(&lab, lab::GW_WAN_V4),
        0,
        "the internet host saw the gateway's process"
    );
    let c = lab.stats(&agent).unwrap();
    assert_eq!(
        c.connections("ipv4", "redirected", "not_allowlisted"),
        1,
        "{c:?}"
    );
}

/// DKIM through the real agent: a key made with `smtpgate dkim generate`
/// (the CLI on the agent's config) signs only after `smtpgate reload`, the
/// agent's reload path (SIGHUP's too), and then every message of alice's
/// domain carries its signature.
#[test]
fn dkim_key_signs_after_agent_reload() {
    if !privileged() {
        return;
    }
    let (lab, agent) = setup("dkim", Options::default(), |_| LAN_INGRESS.to_owned());
    let send = |body: &str| {
        let t = swaks(
            &lab,
            Host::Client,
            lab::CLIENT_DENIED_V4,
            lab::INET_V4,
            true,
            body,
        );
        assert!(t.contains("250 2.0.0"), "{t}");
        lab.wait_for("the sink to get it", Duration::from_secs(20), |lab| {
            sink_messages(lab).iter().any(|m| m.contains(body))
        })
        .unwrap();
        sink_messages(&lab)
            .into_iter()
            .find(|m| m.contains(body))
            .unwrap()
    };
    let msg = send("before the key");
    assert!(!msg.contains("DKIM-Signature:"), "{msg}");
    let out = Command::new(xtask::agent::smtpgate_bin())
        .args([
            "dkim",
            "generate",
            "client.lab",
            "--selector",
            "lab1",
            "--config",
        ])
        .arg(&agent.config)
        .output()
        .unwrap();
    let record = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && record.starts_with("lab1._domainkey.client.lab. IN TXT \"v=DKIM1; k=ed25519; p="),
        "{record}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let msg = send("key made, no reload yet");
    assert!(!msg.contains("DKIM-Signature:"), "{msg}");
    let out = lab.cli(&agent, &["reload"]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let msg = send("after the reload");
    assert!(
        msg.contains("DKIM-Signature: v=1; a=ed25519-sha256; s=lab1; d=client.lab;"),
        "{msg}"
    );
}

/// The intercept listener exists only with action = "redirect": with the
/// relay on and another action, nothing listens on its port, and switching
/// to redirect at reload is refused (the listener is bound at start).
#[test]
fn without_redirect_there_is_no_intercept_listener() {
    if !privileged() {
        return;
    }
    let (lab, agent) = setup_with("nointercept", Options::default(), "reject", |_| {
        "[[attach]]\nhook = \"tc-ingress\"\ninterface = \"lan0\"\n".to_owned()
    });
    let status = lab.cli(&agent, &["status", "--output", "json"]).unwrap();
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert!(status["relay"]["submission"].is_string(), "{status}");
    assert!(status["relay"]["intercept"].is_null(), "{status}");
    // Nothing transparent on loopback: the only loopback listeners are the
    // upstream sink and the metrics endpoint.
    let listening = lab.sh(Host::Gw, "ss -Hltn").unwrap();
    let loopback: Vec<_> = listening
        .lines()
        .filter(|l| l.contains("127.0.0.1:") || l.contains("[::1]:"))
        .filter(|l| !l.contains(&format!("127.0.0.1:{}", xtask::relay::SINK_PORT)))
        .collect();
    assert!(loopback.len() <= 1, "{listening}");
    let text = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(
        &agent.config,
        text.replace("action = \"reject\"", "action = \"redirect\""),
    )
    .unwrap();
    let out = lab.cli(&agent, &["reload"]).unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("restart"), "{err}");
}
