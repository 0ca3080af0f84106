//! Enforcement with real packets: the real smtpgate binary on a lab gateway,
//! real TCP connections from lab clients to the lab's internet host.
//!
//! Each test builds its own lab (uniquely named namespaces), so they run in
//! parallel. They need root; in CI they fail rather than skip without it.

use std::time::Duration;

use xtask::{
    agent::{TcMode, privileged},
    lab::{self, Host, Lab, Options},
    tc_modes,
};

const FAST: Duration = Duration::from_millis(1500);

/// Hosts for the main clients; prefixes that cover the VLAN client's
/// allowed address but not its denied one (198.51.100.10 / .20,
/// 2001:db8:100::10 / ::20).
fn allowlist() -> String {
    format!(
        "allowlist = [\"{}\", \"{}\", \"198.51.100.8/29\", \"2001:db8:100::10/124\"]\n",
        lab::CLIENT_ALLOWED_V4,
        lab::CLIENT_ALLOWED_V6,
    )
}

fn tc(hook: &str, interface: &str) -> String {
    format!("[[attach]]\nhook = \"{hook}\"\ninterface = \"{interface}\"\n")
}

/// Asserts an attempt's outcome with a useful message.
fn expect(lab: &Lab, host: Host, src: &str, dst: &str, port: u16, want: &str) -> lab::Attempt {
    let a = lab.connect(host, src, dst, port, FAST).unwrap();
    assert_eq!(a.result, want, "{src} -> {dst}:{port} took {} ms", a.ms);
    a
}

/// Over IPv4 and IPv6: the allowlisted client reaches internet:25, the
/// denied one is refused at once (a RST, not a timeout), and port 80 is
/// none of smtpgate's business for either.
fn assert_rejects(lab: &Lab) {
    for (allowed, denied, inet) in [
        (lab::CLIENT_ALLOWED_V4, lab::CLIENT_DENIED_V4, lab::INET_V4),
        (lab::CLIENT_ALLOWED_V6, lab::CLIENT_DENIED_V6, lab::INET_V6),
    ] {
        expect(lab, Host::Client, allowed, inet, 25, "connected");
        let refused = expect(lab, Host::Client, denied, inet, 25, "refused");
        assert!(
            refused.ms < 500.0,
            "a reject must be immediate, took {} ms",
            refused.ms
        );
        expect(lab, Host::Client, denied, inet, 80, "connected");
        expect(lab, Host::Client, allowed, inet, 80, "connected");
    }
}

fn reject_refuses_denied_clients_at_once_and_passes_the_rest(mode: TcMode) {
    if !privileged() {
        return;
    }
    let mut lab = Lab::up_tc("reject", Options::default(), mode).unwrap();
    lab.start_listeners().unwrap();
    let config = format!(
        "action = \"reject\"\n{}{}",
        allowlist(),
        tc("tc-ingress", "lan0")
    );
    let agent = lab.start_agent("agent", &config).unwrap();

    assert_rejects(&lab);

    let seen = lab.inet_connections();
    let from = |port: u16, peer: &str| seen.iter().filter(|(p, a)| *p == port && a == peer).count();
    assert_eq!(from(25, lab::CLIENT_ALLOWED_V4), 1);
    assert_eq!(from(25, lab::CLIENT_ALLOWED_V6), 1);
    assert_eq!(
        from(25, lab::CLIENT_DENIED_V4),
        0,
        "a denied client reached port 25"
    );
    assert_eq!(
        from(25, lab::CLIENT_DENIED_V6),
        0,
        "a denied client reached port 25"
    );
    assert_eq!(from(80, lab::CLIENT_DENIED_V4), 1);

    let c = lab.stats(&agent).unwrap();
    for family in ["ipv4", "ipv6"] {
        assert_eq!(
            c.connections(family, "allowed", "allowlisted"),
            1,
            "{family}: {c:?}"
        );
        // A RST at the first SYN: exactly one attempt, no retransmits.
        assert_eq!(
            c.connections(family, "rejected", "not_allowlisted"),
            1,
            "{family}: {c:?}"
        );
        assert_eq!(
            c.packets(family, "rejected", "not_allowlisted"),
            1,
            "{family}: {c:?}"
        );
    }
}

fn drop_makes_denied_clients_time_out(mode: TcMode) {
    if !privileged() {
        return;
    }
    let mut lab = Lab::up_tc("drop", Options::default(), mode).unwrap();
    lab.start_listeners().unwrap();
    let config = format!(
        "action = \"drop\"\n{}{}",
        allowlist(),
        tc("tc-ingress", "lan0")
    );
    let agent = lab.start_agent("agent", &config).unwrap();

    expect(
        &lab,
        Host::Client,
        lab::CLIENT_ALLOWED_V4,
        lab::INET_V4,
        25,
        "connected",
    );
    let dropped = expect(
        &lab,
        Host::Client,
        lab::CLIENT_DENIED_V4,
        lab::INET_V4,
        25,
        "timeout",
    );
    assert!(
        dropped.ms >= 1400.0,
        "a drop gives no answer: {} ms",
        dropped.ms
    );
    expect(
        &lab,
        Host::Client,
        lab::CLIENT_DENIED_V6,
        lab::INET_V6,
        25,
        "timeout",
    );
    expect(
        &lab,
        Host::Client,
        lab::CLIENT_DENIED_V4,
        lab::INET_V4,
        80,
        "connected",
    );

    let c = lab.stats(&agent).unwrap();
    // The SYN and its retransmit within the 1.5 s wait.
    assert!(
        c.connections("ipv4", "dropped", "not_allowlisted") >= 1,
        "{c:?}"
    );
    assert!(
        c.connections("ipv6", "dropped", "not_allowlisted") >= 1,
        "{c:?}"
    );
    let seen = lab.inet_packets_seen().unwrap();
    assert_eq!(
        seen.get(lab::CLIENT_DENIED_V6),
        Some(&0),
        "denied IPv6 packets reached the internet: {seen:?}"
    );
    // Port 80 from the denied client went through, port 25 did not: the
    // only packets from it that arrived are the port-80 connection's.
    assert!(
        lab.inet_connections()
            .iter()
            .all(|(p, a)| !(*p == 25 && a == lab::CLIENT_DENIED_V4))
    );
}

fn crafted_syns_are_counted_exactly(mode: TcMode) {
    if !privileged() {
        return;
    }
    let mut lab = Lab::up_tc("count", Options::default(), mode).unwrap();
    let config = format!(
        "action = \"drop\"\n{}{}",
        allowlist(),
        tc("tc-ingress", "lan0")
    );
    let agent = lab.start_agent("agent", &config).unwrap();
    let before = lab.stats(&agent).unwrap();
    let d4 = lab
        .craft(
            Host::Client,
            "syn",
            lab::CLIENT_DENIED_V4,
            lab::INET_V4,
            7,
            &[],
        )
        .unwrap();
    let a4 = lab
        .craft(
            Host::Client,
            "syn",
            lab::CLIENT_ALLOWED_V4,
            lab::INET_V4,
            5,
            &[],
        )
        .unwrap();
    let d6 = lab
        .craft(
            Host::Client,
            "syn",
            lab::CLIENT_DENIED_V6,
            lab::INET_V6,
            3,
            &[],
        )
        .unwrap();
    let p80 = lab
        .craft(
            Host::Client,
            "syn80",
            lab::CLIENT_DENIED_V4,
            lab::INET_V4,
            4,
            &[],
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let c = lab.stats(&agent).unwrap().since(&before);
    assert_eq!(
        c.connections("ipv4", "dropped", "not_allowlisted"),
        u64::from(d4),
        "{c:?}"
    );
    assert_eq!(
        c.connections("ipv4", "allowed", "allowlisted"),
        u64::from(a4),
        "{c:?}"
    );
    assert_eq!(
        c.connections("ipv6", "dropped", "not_allowlisted"),
        u64::from(d6),
        "{c:?}"
    );
    // Port 80 is not counted: only SMTP egress is.
    let total: u64 = c.0.values().map(|(_, p)| p).sum();
    assert_eq!(
        total,
        u64::from(d4 + a4 + d6),
        "port-80 SYNs ({p80}) must not be counted: {c:?}"
    );
    let seen = lab.inet_packets_seen().unwrap();
    assert_eq!(seen[lab::CLIENT_ALLOWED_V4], u64::from(a4), "{seen:?}");
    assert_eq!(
        seen[lab::CLIENT_DENIED_V4],
        u64::from(p80),
        "only the port-80 SYNs pass: {seen:?}"
    );
    // Dropped SYNs take the quick path; `top` still ranks their sources.
    let top = lab.cli(&agent, &["top", "--output", "json"]).unwrap();
    let top: serde_json::Value = serde_json::from_slice(&top.stdout).unwrap();
    assert_eq!(top["sources"][0]["source"], lab::CLIENT_DENIED_V4, "{top}");
    assert_eq!(top["sources"][0]["attempts"], d4, "{top}");
    assert_eq!(top["sources"][0]["verdict"], "dropped", "{top}");
    assert_eq!(top["sources"][1]["source"], lab::CLIENT_DENIED_V6, "{top}");
}

fn nat_gateway_enforces_at_lan_ingress_but_not_wan_egress(mode: TcMode) {
    if !privileged() {
        return;
    }
    let mut lab = Lab::up_tc("nat", Options { nat: true }, mode).unwrap();
    lab.start_listeners().unwrap();
    let config = format!(
        "action = \"reject\"\n{}{}",
        allowlist(),
        tc("tc-ingress", "lan0")
    );
    let agent = lab.start_agent("lan", &config).unwrap();
    expect(
        &lab,
        Host::Client,
        lab::CLIENT_ALLOWED_V4,
        lab::INET_V4,
        25,
        "connected",
    );
    expect(
        &lab,
        Host::Client,
        lab::CLIENT_DENIED_V4,
        lab::INET_V4,
        25,
        "refused",
    );
    expect(
        &lab,
        Host::Client,
        lab::CLIENT_ALLOWED_V6,
        lab::INET_V6,
        25,
        "connected",
    );
    expect(
        &lab,
        Host::Client,
        lab::CLIENT_DENIED_V6,
        lab::INET_V6,
        25,
        "refused",
    );
    // Behind the masquerade, the internet host only ever sees the gateway.
    assert!(
        lab.inet_connections()
            .iter()
            .all(|(_, a)| a == lab::GW_WAN_V4 || a == lab::GW_WAN_V6)
    );
    lab.stop(agent.pid, false).unwrap();

    // The same policy on the WAN side's egress sees post-SNAT addresses:
    // the allowlisted client is refused too. This is why NAT gateways
    // attach at the client-facing ingress.
    let config = format!(
        "action = \"reject\"\n{}{}",
        allowlist(),
        tc("tc-egress", "wan0")
    );
    let _agent = lab.start_agent("wan", &config).unwrap();
    expect(
        &lab,
        Host::Client,
        lab::CLIENT_ALLOWED_V4,
        lab::INET_V4,
        25,
        "refused",
    );
}

fn routed_gateway_enforces_at_wan_egress(mode: TcMode) {
    if !privileged() {
        return;
    }
    let mut lab = Lab::up_tc("egress", Options::default(), mode).unwrap();
    lab.start_listeners().unwrap();
    let config = format!(
        "action = \"reject\"\n{}{}",
        allowlist(),
        tc("tc-egress", "wan0")
    );
    let agent = lab.start_agent("agent", &config).unwrap();
    // The RST goes into the WAN interface's ingress and is routed back.
    assert_rejects(&lab);
    let c = lab.stats(&agent).unwrap();
    assert_eq!(
        c.connections("ipv4", "rejected", "not_allowlisted"),
        1,
        "{c:?}"
    );
    assert_eq!(
        c.connections("ipv6", "rejected", "not_allowlisted"),
        1,
        "{c:?}"
    );
}

/// A reject's RST, as the client sees it: RST|ACK for our SYN, on the VLAN
/// the SYN came from, with correct checksums.
fn assert_rst(reply: &serde_json::Value, vlans: &[u16]) {
    assert!(!reply.is_null(), "no RST came back");
    assert_eq!(reply["flags"], "RA", "{reply}");
    assert_eq!(reply["vlans"], serde_json::json!(vlans), "{reply}");
    for check in ["ack_ok", "ports_ok", "csum_ok"] {
        assert_eq!(reply[check], true, "{check}: {reply}");
    }
}

fn reject_answers_with_a_well_formed_rst(mode: TcMode) {
    if !privileged() {
        return;
    }
    let mut lab = Lab::up_tc("rst", Options::default(), mode).unwrap();
    let config = format!(
        "action = \"reject\"\n{}{}",
        allowlist(),
        tc("tc-ingress", "lan0")
    );
    let _agent = lab.start_agent("agent", &config).unwrap();
    let r = lab
        .craft_reply(
            Host::Client,
            "syn",
            lab::CLIENT_DENIED_V4,
            lab::INET_V4,
            &[],
        )
        .unwrap();
    assert_rst(&r, &[]);
    let r = lab
        .craft_reply(
            Host::Client,
            "syn",
            lab::CLIENT_DENIED_V6,
            lab::INET_V6,
            &[],
        )
        .unwrap();
    assert_rst(&r, &[]);
}

/// The kernel has no VLAN devices here, so tagged frames are crafted. A
/// single tag usually reaches TC in skb metadata; further tags stay in the
/// packet data. Both count towards the limit of 4.
fn vlan_tagged_frames_are_enforced(mode: TcMode) {
    if !privileged() {
        return;
    }
    let mut lab = Lab::up_tc("vlan", Options::default(), mode).unwrap();
    let config = format!(
        "action = \"reject\"\n{}{}",
        allowlist(),
        tc("tc-ingress", "lanv")
    );
    let agent = lab.start_agent("agent", &config).unwrap();
    let v = lab::VLAN_ID;

    // The RST goes back on the client's VLAN.
    let r = lab
        .craft_reply(
            Host::VlanClient,
            "syn",
            lab::VLAN_DENIED_V4,
            lab::INET_V4,
            &[v],
        )
        .unwrap();
    assert_rst(&r, &[v]);
    let r = lab
        .craft_reply(
            Host::VlanClient,
            "syn",
            lab::VLAN_DENIED_V6,
            lab::INET_V6,
            &[v, 200],
        )
        .unwrap();
    assert_rst(&r, &[v, 200]);

    let before = lab.stats(&agent).unwrap();
    let one = lab
        .craft(
            Host::VlanClient,
            "syn",
            lab::VLAN_ALLOWED_V4,
            lab::INET_V4,
            6,
            &[v],
        )
        .unwrap();
    let two = lab
        .craft(
            Host::VlanClient,
            "syn",
            lab::VLAN_DENIED_V4,
            lab::INET_V4,
            3,
            &[v, 200],
        )
        .unwrap();
    let three = lab
        .craft(
            Host::VlanClient,
            "syn",
            lab::VLAN_DENIED_V6,
            lab::INET_V6,
            2,
            &[v, 200, 300],
        )
        .unwrap();
    let four = lab
        .craft(
            Host::VlanClient,
            "syn",
            lab::VLAN_ALLOWED_V4,
            lab::INET_V4,
            4,
            &[v, 200, 300, 400],
        )
        .unwrap();
    let five = lab
        .craft(
            Host::VlanClient,
            "syn",
            lab::VLAN_ALLOWED_V4,
            lab::INET_V4,
            5,
            &[v, 200, 300, 400, 500],
        )
        .unwrap();
    let other = lab
        .craft(
            Host::VlanClient,
            "syn80",
            lab::VLAN_DENIED_V4,
            lab::INET_V4,
            3,
            &[v, 200],
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let c = lab.stats(&agent).unwrap().since(&before);
    assert_eq!(
        c.connections("ipv4", "allowed", "allowlisted"),
        u64::from(one + four),
        "{c:?}"
    );
    assert_eq!(
        c.connections("ipv4", "rejected", "not_allowlisted"),
        u64::from(two),
        "{c:?}"
    );
    assert_eq!(
        c.connections("ipv6", "rejected", "not_allowlisted"),
        u64::from(three),
        "{c:?}"
    );
    assert_eq!(
        c.packets("other", "dropped", "vlan_too_deep"),
        u64::from(five),
        "{c:?}"
    );
    let total: u64 = c.0.values().map(|(_, p)| p).sum();
    assert_eq!(
        total,
        u64::from(one + two + three + four + five),
        "port 80 ({other}) is not counted: {c:?}"
    );
}

/// Processes on the gateway host itself never cross a TC hook of a LAN
/// interface; the cgroup attach point covers them.
#[test]
fn cgroup_attach_covers_local_processes() {
    if !privileged() {
        return;
    }
    let mut lab = Lab::up("cgroup", Options::default()).unwrap();
    lab.start_listeners().unwrap();
    let cg = lab.cgroup("senders").unwrap();
    let in_cgroup = |lab: &Lab, action: &str| {
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec ip netns exec {} /usr/bin/python3 {} - {} 25 1.5",
            cg.display(),
            lab.ns(Host::Gw),
            lab::scripts_dir().join("connect.py").display(),
            lab::INET_V4
        );
        let out = std::process::Command::new("sh")
            .args(["-c", &script])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (
            v["result"].as_str().unwrap().to_owned(),
            v["ms"].as_f64().unwrap(),
            action.to_owned(),
        )
    };
    for (action, want) in [("reject", "error:EPERM"), ("drop", "timeout")] {
        let config = format!(
            "action = \"{action}\"\nallowlist = [\"127.0.0.0/8\"]\n[[attach]]\nhook = \"cgroup\"\npath = {:?}\n",
            cg.display().to_string()
        );
        let agent = lab.start_agent(action, &config).unwrap();
        let (result, ms, _) = in_cgroup(&lab, action);
        assert_eq!(result, want, "{action}: in the cgroup, after {ms} ms");
        // Outside the cgroup, the same connection is none of its business.
        let a = lab.connect(Host::Gw, "-", lab::INET_V4, 25, FAST).unwrap();
        assert!(a.connected(), "{action}: outside the cgroup: {a:?}");
        let c = lab.stats(&agent).unwrap();
        let verdict = if action == "reject" {
            "rejected"
        } else {
            "dropped"
        };
        assert!(
            c.connections("ipv4", verdict, "not_allowlisted") >= 1,
            "{c:?}"
        );
        lab.stop(agent.pid, false).unwrap();
    }
    // With the gateway's own address allowlisted, its processes may send.
    let config = format!(
        "allowlist = [\"{}\"]\n[[attach]]\nhook = \"cgroup\"\npath = {:?}\n",
        lab::GW_WAN_V4,
        cg.display().to_string()
    );
    let _agent = lab.start_agent("allowed", &config).unwrap();
    let (result, _, _) = in_cgroup(&lab, "allowed");
    assert_eq!(result, "connected");
}

tc_modes!(
    reject_refuses_denied_clients_at_once_and_passes_the_rest,
    drop_makes_denied_clients_time_out,
    crafted_syns_are_counted_exactly,
    nat_gateway_enforces_at_lan_ingress_but_not_wan_egress,
    routed_gateway_enforces_at_wan_egress,
    reject_answers_with_a_well_formed_rst,
    vlan_tagged_frames_are_enforced,
);
