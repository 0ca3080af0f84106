//! End-to-end with real peers: swaks submits through the relay (587 with
//! STARTTLS, 465 with implicit TLS; AUTH PLAIN and LOGIN), the relay
//! delivers to a real smtp-sink, and the message must arrive unchanged
//! apart from the Received header the relay adds.

mod common;

use std::time::Duration;

use common::{Lab, SWAKS, Sink, free_port, require_tool};
use smtpgate_relay::{Listeners, Relay};

/// A message with the awkward bits: dot-leading lines, a lone ".." line,
/// 8-bit UTF-8, trailing spaces, empty lines, a 998-octet line.
fn tricky_message(id: &str) -> String {
    format!(
        "From: Alice <alice@example.com>\r\nTo: r@example.net\r\nSubject: e2e {id}\r\nMessage-ID: <{id}@example.com>\r\n\
         Date: Thu, 1 Jan 2026 00:00:00 +0000\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n\
         .starts with a dot\r\n..\r\ncaf\u{e9} \u{2603} trailing   \r\n\r\n\r\n{}\r\nlast line\r\n",
        "x".repeat(998)
    )
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

/// swaks with -ndf sends the file verbatim and adds one CRLF: so the file
/// holds the dot-stuffed message and the final "." without its CRLF.
fn data_file(dir: &std::path::Path, name: &str, msg: &str) -> String {
    let wire = common::stuff(msg);
    let wire = wire.strip_suffix("\r\n").unwrap();
    let p = dir.join(name);
    std::fs::write(&p, wire).unwrap();
    p.display().to_string()
}

fn args(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

#[tokio::test]
async fn swaks_587_and_465_byte_exact_through_smtp_sink() {
    let lab = Lab::new();
    // The certificate must name 127.0.0.1 so swaks can verify it.
    smtpgate_relay::write_lab_cert(lab.dir.path(), &["localhost", "127.0.0.1"]).unwrap();
    let sink = Sink::start(&lab.dir.path().join("sink"), free_port());
    let relay = Relay::start(lab.config(Some(sink.port)), Listeners::default())
        .await
        .unwrap();
    let a = relay.addrs();
    let ca = lab.cert.display().to_string();

    let cases = [
        ("m587plain", a.submission.unwrap(), "-tls", "PLAIN"),
        ("m587login", a.submission.unwrap(), "-tls", "LOGIN"),
        ("m465plain", a.submissions.unwrap(), "-tlsc", "PLAIN"),
        ("m465login", a.submissions.unwrap(), "-tlsc", "LOGIN"),
    ];
    let mut sent = Vec::new();
    for (id, addr, tls, mech) in cases {
        let msg = tricky_message(id);
        let file = data_file(lab.dir.path(), id, &msg);
        let (ok, out) = swaks(&args(&[
            "--server",
            &addr.to_string(),
            "--ehlo",
            "client.test",
            tls,
            "--tls-verify",
            "--tls-ca-path",
            &ca,
            "--auth",
            mech,
            "--auth-user",
            "alice",
            "--auth-password",
            "alice-pw",
            "--from",
            "alice@example.com",
            "--to",
            "r@example.net",
            "-ndf",
            "--data",
            &file,
        ]))
        .await;
        assert!(ok, "swaks {id} failed:\n{out}");
        assert!(out.contains("250 2.0.0 Ok: queued as"), "{out}");
        sent.push((id, msg));
    }
    let dumps = sink
        .wait_for("4 deliveries", Duration::from_secs(30), |m| {
            m.len() == 4 && m.iter().all(|d| d.contains("last line\n"))
        })
        .await;
    for (id, msg) in sent {
        let dump = dumps
            .iter()
            .find(|d| d.contains(&format!("<{id}@example.com>")))
            .unwrap_or_else(|| panic!("{id} not delivered"));
        let (env, got) = common::sink_split(dump);
        // lettre adds BODY=8BITMIME for 8-bit content; the address must match.
        assert!(
            env.iter()
                .any(|l| l.starts_with("X-Mail-Args: <alice@example.com>")),
            "{env:?}"
        );
        assert!(
            env.contains(&"X-Rcpt-Args: <r@example.net>".to_owned()),
            "{env:?}"
        );
        // smtp-sink stores lines with LF; everything else must be identical.
        assert_eq!(
            common::strip_relay_received(&got),
            msg.replace("\r\n", "\n"),
            "{id} altered in transit"
        );
        assert!(
            got.starts_with(
                "Received: from client.test ([127.0.0.1])\n\t(using TLSv1.3 with cipher TLS13_"
            ),
            "{got}"
        );
        assert!(
            got.contains(
                "\n\t(authenticated user alice)\n\tby relay.test (smtpgate) with ESMTPSA id "
            ),
            "{got}"
        );
    }
    relay.shutdown().await;
}

/// Issue 12: a message with only From/To/Subject left the relay without
/// Message-ID or Date. Through swaks and smtp-sink both are added, once,
/// after the client's own fields; the Received header names the user and
/// the TLS session on 465 as on 587, and a hostile EHLO name is defused.
#[tokio::test]
async fn swaks_bare_message_gets_message_id_and_date() {
    let lab = Lab::new();
    smtpgate_relay::write_lab_cert(lab.dir.path(), &["localhost", "127.0.0.1"]).unwrap();
    let sink = Sink::start(&lab.dir.path().join("sink"), free_port());
    let relay = Relay::start(lab.config(Some(sink.port)), Listeners::default())
        .await
        .unwrap();
    let a = relay.addrs();
    let ca = lab.cert.display().to_string();
    for (id, addr, tls) in [
        ("bare587", a.submission.unwrap(), "-tls"),
        ("bare465", a.submissions.unwrap(), "-tlsc"),
    ] {
        let msg = format!(
            "From: alice@example.com\r\nTo: r@example.net\r\nSubject: {id}\r\n\r\nbody\r\n"
        );
        let file = data_file(lab.dir.path(), id, &msg);
        let (ok, out) = swaks(&args(&[
            "--server",
            &addr.to_string(),
            "--ehlo",
            "evil;name",
            tls,
            "--tls-verify",
            "--tls-ca-path",
            &ca,
            "--auth",
            "PLAIN",
            "--auth-user",
            "alice",
            "--auth-password",
            "alice-pw",
            "--from",
            "alice@example.com",
            "--to",
            "r@example.net",
            "-ndf",
            "--data",
            &file,
        ]))
        .await;
        assert!(ok, "swaks {id} failed:\n{out}");
    }
    let dumps = sink
        .wait_for("2 deliveries", Duration::from_secs(30), |m| {
            m.len() == 2 && m.iter().all(|d| d.contains("\nbody\n"))
        })
        .await;
    let mut ids = Vec::new();
    for d in &dumps {
        let (_, got) = common::sink_split(d);
        assert!(
            got.starts_with("Received: from [127.0.0.1] (invalid HELO \"evil?name\")\n\t(using TLSv1.3 with cipher TLS13_"),
            "{got}"
        );
        assert!(got.contains("\n\t(authenticated user alice)\n"), "{got}");
        let rest = common::strip_relay_received(&got);
        let lines: Vec<&str> = rest.lines().collect();
        assert_eq!(
            lines[..2],
            ["From: alice@example.com", "To: r@example.net"],
            "{got}"
        );
        assert!(lines[2].starts_with("Subject: bare"), "{got}");
        assert!(
            lines[3].starts_with("Message-ID: <") && lines[3].ends_with("@relay.test>"),
            "{got}"
        );
        assert!(
            lines[4].starts_with("Date: ") && lines[4].ends_with(" +0000"),
            "{got}"
        );
        assert_eq!(lines[5..], ["", "body"], "{got}");
        ids.push(lines[3].to_owned());
    }
    assert_ne!(ids[0], ids[1], "Message-IDs must be unique");
    relay.shutdown().await;
}

#[tokio::test]
async fn swaks_refusals() {
    let lab = Lab::new();
    let relay = Relay::start(lab.config(None), Listeners::default())
        .await
        .unwrap();
    let s587 = relay.addrs().submission.unwrap().to_string();
    // No AUTH at all: open relay attempt.
    let (ok, out) = swaks(&args(&[
        "--server",
        &s587,
        "--from",
        "alice@example.com",
        "--to",
        "victim@example.net",
    ]))
    .await;
    assert!(!ok && out.contains("530 5.7.0"), "{out}");
    // AUTH without TLS: not even offered.
    let (ok, out) = swaks(&args(&[
        "--server",
        &s587,
        "--auth",
        "PLAIN",
        "--auth-user",
        "alice",
        "--auth-password",
        "alice-pw",
        "--from",
        "alice@example.com",
        "--to",
        "r@example.net",
    ]))
    .await;
    assert!(!ok && !out.contains("235"), "{out}");
    // Wrong password.
    let (ok, out) = swaks(&args(&[
        "--server",
        &s587,
        "-tls",
        "--auth",
        "PLAIN",
        "--auth-user",
        "alice",
        "--auth-password",
        "nope",
        "--from",
        "alice@example.com",
        "--to",
        "r@example.net",
    ]))
    .await;
    assert!(!ok && out.contains("535 5.7.8"), "{out}");
    // Someone else's sender address.
    let (ok, out) = swaks(&args(&[
        "--server",
        &s587,
        "-tls",
        "--auth",
        "LOGIN",
        "--auth-user",
        "alice",
        "--auth-password",
        "alice-pw",
        "--from",
        "ceo@example.org",
        "--to",
        "r@example.net",
    ]))
    .await;
    assert!(!ok && out.contains("553 5.7.1"), "{out}");
    // Right envelope, wrong header From: (issue 12: this was relayed), and
    // two From: headers. swaks's own default message (From: = envelope)
    // goes through, so the refusals are about the header alone.
    let login = |extra: &[&str]| {
        let mut v = args(&[
            "--server",
            &s587,
            "-tls",
            "--auth",
            "PLAIN",
            "--auth-user",
            "alice",
            "--auth-password",
            "alice-pw",
            "--from",
            "alice@example.com",
            "--to",
            "r@example.net",
        ]);
        v.extend(args(extra));
        v
    };
    let (ok, out) = swaks(&login(&[
        "--header",
        "From: Payments <billing@bank.example>",
    ]))
    .await;
    assert!(
        !ok && out.contains(
            "550 5.7.1 From: header address billing@bank.example is not one user alice may send as"
        ),
        "{out}"
    );
    let (ok, out) = swaks(&login(&["--add-header", "From: alice@example.com"])).await;
    assert!(
        !ok && out.contains("550 5.7.1 Message must have exactly one From: header, found 2"),
        "{out}"
    );
    assert!(smtpgate_relay::queue::list(&lab.spool).unwrap().is_empty());
    let (ok, out) = swaks(&login(&[])).await;
    assert!(ok && out.contains("250 2.0.0 Ok: queued"), "{out}");
    relay.shutdown().await;
}
