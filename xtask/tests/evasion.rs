//! Evasion: packets crafted to slip a port-25 connection past a classifier.
//! Each class is first sent with no smtpgate running, to show what reaches
//! the internet host without it; then with smtpgate, where none of it may
//! get through and each is counted under its own reason.

use std::{collections::HashMap, time::Duration};

use xtask::{
    agent::{TcMode, privileged},
    evasion::{Class, Ends, FORWARDED_BY_LINUX},
    lab::{self, Host, Lab, Options},
    tc_modes,
};

/// From the lab's client, through the gateway's lan0, to the internet host.
fn classes() -> Vec<Class> {
    xtask::evasion::classes(&Ends {
        denied_v4: lab::CLIENT_DENIED_V4,
        denied_v6: lab::CLIENT_DENIED_V6,
        allowed_v4: lab::CLIENT_ALLOWED_V4,
        dst_v4: lab::INET_V4,
        dst_v6: lab::INET_V6,
    })
}

const COUNT: u32 = 5;

fn seen(lab: &Lab) -> HashMap<String, u64> {
    std::thread::sleep(Duration::from_millis(200));
    lab.inet_packets_seen().unwrap()
}

fn evasion_classes_never_get_through_and_are_counted(mode: TcMode) {
    if !privileged() {
        return;
    }
    let mut lab = Lab::up_tc("evasion", Options::default(), mode).unwrap();

    // Without smtpgate: what a plain router forwards.
    let mut forwarded_without = HashMap::new();
    for class in classes() {
        let before = seen(&lab);
        let sent = lab
            .craft(Host::Client, class.kind, &class.src, &class.dst, COUNT, &[])
            .unwrap();
        let after = seen(&lab);
        let got = after[&class.seen_as] - before[&class.seen_as];
        forwarded_without.insert(class.kind, got);
        assert!(got <= u64::from(sent));
    }
    // The fragment classes cross a plain router untouched: this is what the
    // test would see if enforcement failed. (Linux itself drops IPv6 packets
    // from IPv4-mapped sources, so those classes prove themselves through
    // the counters only.)
    for kind in FORWARDED_BY_LINUX {
        assert_eq!(
            forwarded_without[kind],
            u64::from(COUNT),
            "{kind} without smtpgate: {forwarded_without:?}"
        );
    }

    let config = format!(
        "action = \"reject\"\nallowlist = [\"{}\", \"{}\"]\n[[attach]]\nhook = \"tc-ingress\"\ninterface = \"lan0\"\n",
        lab::CLIENT_ALLOWED_V4,
        lab::CLIENT_ALLOWED_V6
    );
    let agent = lab.start_agent("agent", &config).unwrap();
    for class in classes() {
        let before_seen = seen(&lab);
        let before = lab.stats(&agent).unwrap();
        let sent = lab
            .craft(Host::Client, class.kind, &class.src, &class.dst, COUNT, &[])
            .unwrap();
        let after_seen = seen(&lab);
        let c = lab.stats(&agent).unwrap().since(&before);
        assert_eq!(
            after_seen[&class.seen_as] - before_seen[&class.seen_as],
            0,
            "{}: packets reached the internet host",
            class.kind
        );
        assert_eq!(
            c.packets(class.family, "dropped", class.reason),
            u64::from(sent),
            "{}: {c:?}",
            class.kind
        );
        let total: u64 = c.0.values().map(|(_, p)| p).sum();
        assert_eq!(
            total,
            u64::from(sent),
            "{}: counted elsewhere too: {c:?}",
            class.kind
        );
    }
}

fn audit_mode_counts_evasion_and_lets_it_through(mode: TcMode) {
    if !privileged() {
        return;
    }
    let mut lab = Lab::up_tc("evaudit", Options::default(), mode).unwrap();
    let config = format!(
        "mode = \"audit\"\nallowlist = [\"{}\"]\n[[attach]]\nhook = \"tc-ingress\"\ninterface = \"lan0\"\n",
        lab::CLIENT_ALLOWED_V4
    );
    let agent = lab.start_agent("agent", &config).unwrap();
    let before_seen = seen(&lab);
    let before = lab.stats(&agent).unwrap();
    let tiny = lab
        .craft(
            Host::Client,
            "tiny",
            lab::CLIENT_DENIED_V4,
            lab::INET_V4,
            COUNT,
            &[],
        )
        .unwrap();
    let syn = lab
        .craft(
            Host::Client,
            "syn",
            lab::CLIENT_DENIED_V4,
            lab::INET_V4,
            COUNT,
            &[],
        )
        .unwrap();
    let after_seen = seen(&lab);
    let c = lab.stats(&agent).unwrap().since(&before);
    assert_eq!(
        c.packets("ipv4", "audited", "tiny_fragment"),
        u64::from(tiny),
        "{c:?}"
    );
    assert_eq!(
        c.connections("ipv4", "audited", "not_allowlisted"),
        u64::from(syn),
        "{c:?}"
    );
    assert_eq!(
        after_seen[lab::CLIENT_DENIED_V4] - before_seen[lab::CLIENT_DENIED_V4],
        u64::from(tiny + syn),
        "audit mode must let everything through"
    );
}

tc_modes!(
    evasion_classes_never_get_through_and_are_counted,
    audit_mode_counts_evasion_and_lets_it_through,
);
