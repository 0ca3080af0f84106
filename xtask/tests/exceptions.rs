//! Destination exceptions (issue 14): destinations any client may reach on
//! the SMTP ports, such as the ISP's smarthost, while every other
//! destination stays closed to sources that are not allowlisted.

use std::time::Duration;

use xtask::{
    agent::privileged,
    lab::{self, Host, Lab, Options},
};

/// A second address of the internet host, not excepted.
const OTHER_V4: &str = "203.0.113.26";
const OTHER_V6: &str = "2001:db8:ff::26";

fn config(exceptions: &str) -> String {
    format!(
        "action = \"reject\"\nports = [25, 587]\nallowlist = [\"{}\", \"{}\"]\n\
         [[attach]]\nhook = \"tc-ingress\"\ninterface = \"lan0\"\n{exceptions}",
        lab::CLIENT_ALLOWED_V4,
        lab::CLIENT_ALLOWED_V6
    )
}

const EXCEPT: &str = "[[exception]]\ndestinations = [\"203.0.113.25\"]\nports = [25]\ncomment = \"smarthost\"\n\
                      [[exception]]\ndestinations = [\"2001:db8:ff::/120\"]\n";

fn smtp_chat(lab: &Lab, src: &str, dst: &str) -> String {
    let out = lab
        .command(Host::Client, "/usr/bin/swaks")
        .args(["--server", dst, "--port", "25", "--timeout", "5"])
        .args(["--local-interface", src, "--quit-after", "EHLO"])
        .args(["--from", "x@client.lab", "--to", "bob@inet.lab"])
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn connects(lab: &Lab, src: &str, dst: &str, port: u16) -> bool {
    lab.connect(Host::Client, src, dst, port, Duration::from_millis(1500))
        .unwrap()
        .connected()
}

#[test]
fn exceptions_open_given_destinations_to_every_source_and_nothing_else() {
    if !privileged() {
        return;
    }
    let mut lab = Lab::up("except", Options::default()).unwrap();
    lab.sh(
        Host::Inet,
        &format!("ip addr add {OTHER_V4}/24 dev eth0; ip addr add {OTHER_V6}/64 dev eth0 nodad"),
    )
    .unwrap();
    lab.start_listeners().unwrap();
    let agent = lab.start_agent("agent", &config(EXCEPT)).unwrap();
    let before = lab.stats(&agent).unwrap();
    // A denied client reaches the excepted destination, and talks SMTP
    // with it (so the flow's later packets pass too, not just the SYN).
    let t = smtp_chat(&lab, lab::CLIENT_DENIED_V4, lab::INET_V4);
    assert!(t.contains("220 inet.lab") && t.contains("<-  250"), "{t}");
    let t = smtp_chat(&lab, lab::CLIENT_DENIED_V6, lab::INET_V6);
    assert!(t.contains("220 inet.lab") && t.contains("<-  250"), "{t}");
    // ... but not another destination, nor another port of the excepted
    // IPv4 one (its exception names port 25 only).
    assert!(!connects(&lab, lab::CLIENT_DENIED_V4, OTHER_V4, 25));
    assert!(!connects(&lab, lab::CLIENT_DENIED_V4, lab::INET_V4, 587));
    // The IPv6 exception covers all of 2001:db8:ff::/120 (and every SMTP
    // port: see check below; the internet host listens on 25 only).
    assert!(connects(&lab, lab::CLIENT_DENIED_V6, OTHER_V6, 25));
    // The allowlisted client is unaffected.
    assert!(connects(&lab, lab::CLIENT_ALLOWED_V4, OTHER_V4, 25));
    let c = lab.stats(&agent).unwrap().since(&before);
    assert_eq!(
        c.connections("ipv4", "allowed", "destination_exception"),
        1,
        "{c:?}"
    );
    assert_eq!(
        c.connections("ipv6", "allowed", "destination_exception"),
        2,
        "{c:?}"
    );
    assert_eq!(
        c.connections("ipv4", "rejected", "not_allowlisted"),
        2,
        "{c:?}"
    );
    // check says the same, given the destination.
    let check = |to: &str, port: &str| {
        let out = lab
            .cli(
                &agent,
                &["check", lab::CLIENT_DENIED_V4, "--to", to, "--port", port],
            )
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        )
    };
    let (code, text) = check(lab::INET_V4, "25");
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("destination_exception"), "{text}");
    let (code, text) = check(OTHER_V4, "25");
    assert_eq!(code, Some(5), "{text}");
    let (code, _) = check(lab::INET_V4, "587");
    assert_eq!(code, Some(5));
    let out = lab
        .cli(
            &agent,
            &[
                "check",
                lab::CLIENT_DENIED_V6,
                "--to",
                OTHER_V6,
                "--port",
                "587",
            ],
        )
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let status = String::from_utf8_lossy(&lab.cli(&agent, &["status"]).unwrap().stdout).to_string();
    assert!(
        status.contains("exceptions: 2 destination prefixes"),
        "{status}"
    );
    // A reload without them closes the destinations again, live.
    std::fs::write(
        &agent.config,
        std::fs::read_to_string(&agent.config)
            .unwrap()
            .replace(EXCEPT, ""),
    )
    .unwrap();
    let out = lab.cli(&agent, &["reload"]).unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(!connects(&lab, lab::CLIENT_DENIED_V4, lab::INET_V4, 25));
    assert!(!connects(&lab, lab::CLIENT_DENIED_V6, lab::INET_V6, 25));
    let (code, _) = check(lab::INET_V4, "25");
    assert_eq!(code, Some(5));
}
