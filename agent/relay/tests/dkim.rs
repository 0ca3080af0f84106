//! DKIM end to end with real peers and an independent verifier: keys made
//! by `dkim::keys::generate` (what `smtpgate dkim generate` runs), their
//! DNS records as it prints them published by a real DNS server (dnsmasq on
//! 127.0.0.1), swaks submitting on 587 with STARTTLS and AUTH, smtp-sink
//! receiving, and dkimpy (Debian's python3-dkim, no Rust and no mail-auth
//! in it) verifying what arrived, Ed25519 and RSA-2048 alike. Tampered
//! copies must fail the same verifier, or the test proves nothing.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Lab, SWAKS, Sink, free_port, require_tool};
use smtpgate_relay::dkim::keys::{Algorithm, KeyInfo, generate};
use smtpgate_relay::{Listeners, Relay};

const DNSMASQ: &str = "/usr/sbin/dnsmasq";
const PYTHON: &str = "/usr/bin/python3";

/// dnsmasq on 127.0.0.1:<free port> answering the keys' TXT records, and
/// nothing else (no upstream, no hosts file).
struct Dns {
    port: u16,
    child: Child,
}

impl Dns {
    fn start(keys: &[&KeyInfo]) -> Self {
        require_tool(DNSMASQ);
        let port = free_port();
        let mut cmd = Command::new(DNSMASQ);
        cmd.args([
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--conf-file=/dev/null",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--user=root",
            "--group=root",
            "--pid-file=",
        ])
        .arg(format!("--port={port}"));
        for k in keys {
            // The record exactly as `generate` split it for a zone file:
            // one dnsmasq text per TXT string.
            let strings: Vec<&str> = k.zone_line.split('"').skip(1).step_by(2).collect();
            assert!(strings.iter().all(|s| s.len() <= 255));
            cmd.arg(format!(
                "--txt-record={},{}",
                k.dns_name.trim_end_matches('.'),
                strings.join(",")
            ));
        }
        let child = cmd.stdin(Stdio::null()).spawn().expect("spawning dnsmasq");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "dnsmasq did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { port, child }
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What dkimpy said about one message.
struct Verdict {
    ok: bool,
    /// One object per signature: d, s, a, h, ok, why.
    sigs: Vec<serde_json::Value>,
}

fn verify(dns: &Dns, msg: &Path) -> Verdict {
    require_tool(PYTHON);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dkim_verify.py");
    let out = Command::new(PYTHON)
        .arg(&script)
        .arg(msg)
        .args(["127.0.0.1", &dns.port.to_string()])
        .output()
        .expect("running dkim_verify.py");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("ModuleNotFoundError"),
        "dkimpy is required (apt-get install python3-dkim python3-nacl python3-dnspython): {stderr}"
    );
    let code = out.status.code();
    assert!(
        matches!(code, Some(0 | 1)),
        "dkim_verify.py broke ({code:?}): {stderr}"
    );
    Verdict {
        ok: code == Some(0),
        sigs: String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
            .collect(),
    }
}

async fn swaks(args: &[String]) -> (bool, String) {
    require_tool(SWAKS);
    let out = tokio::process::Command::new(SWAKS)
        .args(args)
        .output()
        .await
        .expect("running swaks");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Submits `msg` on 587 (STARTTLS, certificate verified, AUTH PLAIN).
async fn submit(lab: &Lab, addr: std::net::SocketAddr, user: &str, from: &str, msg: &str) {
    // swaks -ndf sends the file verbatim and adds one CRLF.
    let wire = common::stuff(msg);
    let file = lab.dir.path().join(format!("data-{}", free_port()));
    std::fs::write(&file, wire.strip_suffix("\r\n").unwrap()).unwrap();
    let args: Vec<String> = [
        "--server",
        &addr.to_string(),
        "--ehlo",
        "client.test",
        "-tls",
        "--tls-verify",
        "--tls-ca-path",
        &lab.cert.display().to_string(),
        "--auth",
        "PLAIN",
        "--auth-user",
        user,
        "--auth-password",
        &format!("{user}-pw"),
        "--from",
        from,
        "--to",
        "r@example.net",
        "-ndf",
        "--data",
        &file.display().to_string(),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let (ok, out) = swaks(&args).await;
    assert!(ok && out.contains("250 2.0.0 Ok: queued as"), "{out}");
}

/// A message without Message-ID and Date (the relay adds both, and must
/// sign them), with dot-leading lines, trailing blanks and empty lines at
/// the end (relaxed body canonicalisation's cases), `filler` lines long.
fn message(from: &str, subject: &str, filler: usize) -> String {
    let mut m = format!(
        "From: Someone <{from}>\r\nTo: r@example.net\r\nSubject: {subject}\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n\
         .dot-leading line\r\ntrailing blanks   \t\r\n\r\ncaf\u{e9}\r\n"
    );
    for i in 0..filler {
        m.push_str(&format!("{i:06} {}\r\n", "y".repeat(90)));
    }
    m.push_str("end\r\n\r\n\r\n");
    m
}

/// The delivered message as the relay sent it: smtp-sink's own header
/// lines dropped and its LF line ends back to CRLF (the relay refuses bare
/// LF, so every LF was a CRLF).
fn delivered(dump: &str, dir: &Path, name: &str) -> (String, PathBuf) {
    let (_, msg) = common::sink_split(dump);
    let msg = msg.replace('\n', "\r\n");
    let p = dir.join(name);
    std::fs::write(&p, &msg).unwrap();
    (msg, p)
}

fn tampered(dir: &Path, name: &str, msg: &str, from: &str, to: &str) -> PathBuf {
    assert!(msg.contains(from), "nothing to tamper with: {from:?}");
    let p = dir.join(name);
    std::fs::write(&p, msg.replacen(from, to, 1)).unwrap();
    p
}

#[tokio::test]
async fn swaks_to_smtp_sink_verified_by_dkimpy_ed25519_and_rsa() {
    let lab = Lab::new();
    smtpgate_relay::write_lab_cert(lab.dir.path(), &["localhost", "127.0.0.1"]).unwrap();
    let cfg = lab.config(None);
    // alice sends as example.com (Ed25519), bob as example.org (RSA).
    let ed = generate(&cfg.dkim_dir, "example.com", Algorithm::Ed25519, None).unwrap();
    let rsa = generate(&cfg.dkim_dir, "example.org", Algorithm::Rsa, Some("rsa1")).unwrap();
    assert!(ed.selector.starts_with("s20"), "{}", ed.selector);
    let dns = Dns::start(&[&ed, &rsa]);
    let sink = Sink::start(&lab.dir.path().join("sink"), free_port());
    let relay = Relay::start(lab.config(Some(sink.port)), Listeners::default())
        .await
        .unwrap();
    let addr = relay.addrs().submission.unwrap();

    // Small (in memory until committed) and 200 KiB (streamed to the spool
    // in chunks, each fed to the signer) for each algorithm.
    let cases = [
        ("alice", "alice@example.com", "ed-small", 0, &ed),
        ("alice", "alice@example.com", "ed-large", 2200, &ed),
        ("bob", "bob@example.org", "rsa-small", 0, &rsa),
        ("bob", "bob@example.org", "rsa-large", 2200, &rsa),
    ];
    for (user, from, subject, filler, _) in &cases {
        submit(&lab, addr, user, from, &message(from, subject, *filler)).await;
    }
    let dumps = sink
        .wait_for("4 deliveries", Duration::from_secs(60), |m| {
            m.len() == 4 && m.iter().all(|d| d.contains("\nend\n"))
        })
        .await;
    let work = lab.dir.path();
    for (_, _, subject, _, key) in &cases {
        let dump = dumps
            .iter()
            .find(|d| d.contains(&format!("Subject: {subject}\n")))
            .unwrap_or_else(|| panic!("{subject} not delivered"));
        let (msg, path) = delivered(dump, work, subject);
        assert!(msg.starts_with("DKIM-Signature: "), "{msg}");
        let v = verify(&dns, &path);
        assert!(v.ok, "{subject}: dkimpy says {:?}\n{msg}", v.sigs);
        assert_eq!(v.sigs.len(), 1, "{:?}", v.sigs);
        let sig = &v.sigs[0];
        let alg = match key.algorithm {
            Algorithm::Ed25519 => "ed25519-sha256",
            Algorithm::Rsa => "rsa-sha256",
        };
        assert_eq!(
            (sig["d"].as_str(), sig["s"].as_str(), sig["a"].as_str()),
            (
                Some(key.domain.as_str()),
                Some(key.selector.as_str()),
                Some(alg)
            ),
            "{sig}"
        );
        // The fields the issue names are covered, the relay's own Date
        // and Message-ID included.
        let h: Vec<String> = sig["h"]
            .as_str()
            .unwrap()
            .split(':')
            .map(str::to_ascii_lowercase)
            .collect();
        for f in ["from", "to", "subject", "date", "message-id"] {
            assert!(h.iter().any(|x| x == f), "{f} not signed: {sig}");
        }

        // The same verifier refuses what was changed on the way: a body
        // byte, a signed header, the relay-added Date and Message-ID.
        let date = msg
            .lines()
            .find(|l| l.starts_with("Date: "))
            .expect("Date added")
            .to_owned();
        let mid = msg
            .lines()
            .find(|l| l.starts_with("Message-ID: <"))
            .expect("Message-ID added")
            .to_owned();
        for (what, from, to) in [
            ("body", "caf\u{e9}", "cafe"),
            (
                "subject",
                &format!("Subject: {subject}") as &str,
                "Subject: changed",
            ),
            ("date", &date, "Date: Thu, 1 Jan 2026 00:00:00 +0000"),
            ("message-id", &mid, "Message-ID: <forged@example.net>"),
            (
                "added-from",
                "\r\nTo: ",
                "\r\nFrom: evil@example.net\r\nTo: ",
            ),
        ] {
            let p = tampered(work, &format!("{subject}-{what}"), &msg, from, to);
            let v = verify(&dns, &p);
            assert!(
                !v.ok,
                "{subject}: tampered {what} still verifies: {:?}",
                v.sigs
            );
        }
    }
    relay.shutdown().await;
}

/// A key added while the relay runs signs after a reload (what SIGHUP and
/// `smtpgate reload` do in the agent), not before; removing it stops it.
#[tokio::test]
async fn reload_picks_up_new_keys() {
    let lab = Lab::new();
    smtpgate_relay::write_lab_cert(lab.dir.path(), &["localhost", "127.0.0.1"]).unwrap();
    let sink = Sink::start(&lab.dir.path().join("sink"), free_port());
    let cfg = lab.config(Some(sink.port));
    let dir = cfg.dkim_dir.clone();
    let relay = Relay::start(cfg, Listeners::default()).await.unwrap();
    let addr = relay.addrs().submission.unwrap();
    let from = "alice@example.com";

    submit(&lab, addr, "alice", from, &message(from, "before", 0)).await;
    let key = generate(&dir, "example.com", Algorithm::Ed25519, Some("new")).unwrap();
    submit(&lab, addr, "alice", from, &message(from, "not-reloaded", 0)).await;
    assert_eq!(relay.reload_dkim().unwrap(), 1);
    submit(&lab, addr, "alice", from, &message(from, "reloaded", 0)).await;
    smtpgate_relay::dkim::keys::remove(&dir, "example.com", None).unwrap();
    assert_eq!(relay.reload_dkim().unwrap(), 0);
    submit(&lab, addr, "alice", from, &message(from, "removed", 0)).await;

    let dumps = sink
        .wait_for("4 deliveries", Duration::from_secs(60), |m| m.len() == 4)
        .await;
    let dns = Dns::start(&[&key]);
    for (subject, signed) in [
        ("before", false),
        ("not-reloaded", false),
        ("reloaded", true),
        ("removed", false),
    ] {
        let dump = dumps
            .iter()
            .find(|d| d.contains(&format!("Subject: {subject}\n")))
            .unwrap_or_else(|| panic!("{subject} not delivered"));
        let (msg, path) = delivered(dump, lab.dir.path(), subject);
        assert_eq!(
            msg.starts_with("DKIM-Signature: "),
            signed,
            "{subject}: {msg}"
        );
        if signed {
            let v = verify(&dns, &path);
            assert!(v.ok, "{subject}: {:?}", v.sigs);
        }
    }
    // A broken key makes the reload fail and keeps what was signing.
    std::fs::create_dir_all(dir.join("example.com")).unwrap();
    std::fs::write(dir.join("example.com/bad.key"), "not a key").unwrap();
    let err = relay.reload_dkim().unwrap_err().to_string();
    assert!(
        err.contains("bad.key") && err.contains("not a PEM private key"),
        "{err}"
    );
    relay.shutdown().await;
}
