//! Scripted dialogues against real listeners on 127.0.0.1 ephemeral ports
//! (chasquid's t-12-minor_dialogs style), including the open-relay and
//! SMTP-smuggling batteries.

mod common;

use std::time::Duration;

use common::{Client, Lab, Sink, free_port, stuff};
use smtpgate_relay::{Listeners, Relay};

#[tokio::test]
async fn submission_587_starttls_auth_and_delivery() {
    let lab = Lab::new();
    let sink = Sink::start(&lab.dir.path().join("sink"), free_port());
    let relay = Relay::start(lab.config(Some(sink.port)), Listeners::default())
        .await
        .unwrap();
    let addr = relay.addrs().submission.unwrap();
    let mut c = Client::login_587(addr, &lab.cert_pem(), "alice", "alice-pw").await;
    c.cmd("MAIL FROM:<alice@example.com>", "250 2.1.0").await;
    c.cmd("RCPT TO:<rcpt@example.net>", "250 2.1.5").await;
    c.cmd("DATA", "354").await;
    c.send(&stuff(
        "From: alice@example.com\r\nDate: Thu, 1 Jan 2026 00:00:00 +0000\r\nMessage-ID: <d1@example.com>\r\nSubject: hi\r\n\r\n.leading dot\r\n",
    ))
    .await;
    c.expect("250 2.0.0 Ok: queued as").await;
    c.cmd("QUIT", "221").await;
    let msgs = sink
        .wait_for("delivery", Duration::from_secs(20), |m| {
            m.len() == 1 && m[0].contains(".leading dot\n")
        })
        .await;
    let (env, msg) = common::sink_split(&msgs[0]);
    assert!(
        env.contains(&"X-Mail-Args: <alice@example.com>".to_owned()),
        "{env:?}"
    );
    assert!(
        env.contains(&"X-Rcpt-Args: <rcpt@example.net>".to_owned()),
        "{env:?}"
    );
    assert_eq!(
        common::strip_relay_received(&msg),
        "From: alice@example.com\nDate: Thu, 1 Jan 2026 00:00:00 +0000\nMessage-ID: <d1@example.com>\nSubject: hi\n\n.leading dot\n"
    );
    // The queue entry is removed just after the sink answers.
    for _ in 0..100 {
        if relay.stats().snapshot().queue_length == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = relay.stats().snapshot();
    assert_eq!(
        stats.spool_batched_messages, 1,
        "group-commit counters wired"
    );
    assert!(stats.spool_batches >= 1);
    assert_eq!(
        (
            stats.messages_accepted,
            stats.messages_delivered,
            stats.queue_length
        ),
        (1, 1, 0)
    );
    assert!(smtpgate_relay::queue::list(&lab.spool).unwrap().is_empty());
    relay.shutdown().await;
}

#[tokio::test]
async fn submissions_465_implicit_tls() {
    let lab = Lab::new();
    let relay = Relay::start(lab.config(None), Listeners::default())
        .await
        .unwrap();
    let mut c = Client::connect_tls(relay.addrs().submissions.unwrap(), &lab.cert_pem()).await;
    c.expect("220 relay.test").await;
    let r = c.cmd("EHLO client.test", "250").await;
    assert!(
        r.contains("AUTH PLAIN LOGIN") && !r.contains("STARTTLS"),
        "{r}"
    );
    c.cmd("STARTTLS", "503 5.5.1").await;
    c.cmd(
        &format!("AUTH PLAIN {}", common::plain("bob", "bob-pw")),
        "235",
    )
    .await;
    c.cmd("MAIL FROM:<anyone@example.org>", "250").await;
    relay.shutdown().await;
}

#[tokio::test]
async fn intercept_listener_refuses_unauthenticated_and_names_original_destination() {
    let lab = Lab::new();
    let mut cfg = lab.config(None);
    cfg.intercept_message = "Submit on port 587 or 465 with your credentials".into();
    // The agent hands in a pre-bound listener (from the datapath side).
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let relay = Relay::start(
        cfg,
        Listeners {
            intercept: Some(l),
            ..Listeners::default()
        },
    )
    .await
    .unwrap();
    let addr = relay.addrs().intercept.unwrap();
    let mut c = Client::connect(addr, &lab.cert_pem()).await;
    c.expect("220").await;
    c.cmd("EHLO client.test", "250").await;
    c.cmd(
        "MAIL FROM:<alice@example.com>",
        "530 5.7.0 Submit on port 587 or 465 with your credentials",
    )
    .await;
    c.cmd(
        "RCPT TO:<victim@example.net>",
        "530 5.7.0 Submit on port 587",
    )
    .await;
    c.cmd("STARTTLS", "220").await;
    c.upgrade().await;
    c.cmd("EHLO client.test", "250").await;
    c.cmd(
        &format!("AUTH PLAIN {}", common::plain("alice", "alice-pw")),
        "235",
    )
    .await;
    c.cmd("MAIL FROM:<alice@example.com>", "250").await;
    c.cmd("RCPT TO:<r@example.net>", "250").await;
    c.cmd("DATA", "354").await;
    c.send(&stuff("From: alice@example.com\r\nSubject: x\r\n\r\nx\r\n"))
        .await;
    let r = c.expect("250 2.0.0 Ok: queued as ").await;
    let id = r.trim_end().rsplit(' ').next().unwrap();
    let (_, body) = smtpgate_relay::queue::show(&lab.spool, id).unwrap();
    let body = String::from_utf8(body).unwrap();
    assert!(
        body.contains(&format!("(intercepted; original destination {addr})")),
        "{body}"
    );
    relay.shutdown().await;
}

#[tokio::test]
async fn open_relay_battery() {
    let lab = Lab::new();
    let relay = Relay::start(lab.config(None), Listeners::default())
        .await
        .unwrap();
    let a = relay.addrs();
    let pem = lab.cert_pem();
    // Unauthenticated, plaintext and TLS, on both listeners.
    let mut c = Client::connect(a.submission.unwrap(), &pem).await;
    c.expect("220").await;
    c.cmd("EHLO client.test", "250").await;
    c.cmd("MAIL FROM:<alice@example.com>", "530 5.7.0").await;
    c.cmd("RCPT TO:<victim@example.net>", "530 5.7.0").await;
    c.cmd("AUTH PLAIN AGFsaWNlAGFsaWNlLXB3", "538 5.7.11").await;
    let mut c = Client::connect_tls(a.submissions.unwrap(), &pem).await;
    c.expect("220").await;
    c.cmd("EHLO client.test", "250").await;
    c.cmd("MAIL FROM:<>", "530 5.7.0").await;
    c.cmd("RCPT TO:<victim@example.net>", "530 5.7.0").await;
    // Authenticated: address tricks.
    let mut c = Client::login_587(a.submission.unwrap(), &pem, "alice", "alice-pw").await;
    c.cmd("MAIL FROM:<bob@example.org>", "553 5.7.1").await;
    c.cmd("MAIL FROM:<alice@example.com>", "250").await;
    for (rcpt, why) in [
        ("<victim%example.net@relay.test>", "percent-hack"),
        ("<example.net!victim@relay.test>", "bang-path"),
        (
            "<@relay.test,@hop.example:victim@example.net>",
            "source routes",
        ),
        ("<\"victim@example.net\"@relay.test>", "quoted local parts"),
        ("<victim@example.net@relay.test>", "exactly one @"),
        ("<victim@[127.0.0.1]>", "address literals"),
    ] {
        let r = c.cmd(&format!("RCPT TO:{rcpt}"), "553 5.1.3").await;
        assert!(r.contains(why), "{rcpt}: {r}");
    }
    c.cmd("DATA", "503 5.5.1").await;
    assert!(smtpgate_relay::queue::list(&lab.spool).unwrap().is_empty());
    relay.shutdown().await;
}

#[tokio::test]
async fn smuggling_battery() {
    let lab = Lab::new();
    let relay = Relay::start(lab.config(None), Listeners::default())
        .await
        .unwrap();
    let addr = relay.addrs().submission.unwrap();
    let smuggled = "MAIL FROM:<alice@example.com>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\nSubject: smuggled\r\n\r\nevil\r\n.\r\n";
    for (name, end) in [
        ("LF.LF", "\n.\n"),
        ("CRLF.LF", "\r\n.\n"),
        ("LF.CRLF", "\n.\r\n"),
        ("CR.CRLF", "\r.\r\n"),
        ("CRLF.CR", "\r\n.\r"),
    ] {
        let mut c = Client::login_587(addr, &lab.cert_pem(), "alice", "alice-pw").await;
        c.cmd("MAIL FROM:<alice@example.com>", "250").await;
        c.cmd("RCPT TO:<r@example.net>", "250").await;
        c.cmd("DATA", "354").await;
        c.send(&format!(
            "From: alice@example.com\r\nSubject: outer\r\n\r\nbody{end}{smuggled}"
        ))
        .await;
        let r = c.try_reply().await.unwrap();
        assert!(r.starts_with("521 5.5.2"), "{name}: {r}");
        c.expect_closed().await;
    }
    assert!(
        smtpgate_relay::queue::list(&lab.spool).unwrap().is_empty(),
        "nothing may be queued"
    );
    // A correct CRLF.CRLF still works afterwards.
    let mut c = Client::login_587(addr, &lab.cert_pem(), "alice", "alice-pw").await;
    c.cmd("MAIL FROM:<alice@example.com>", "250").await;
    c.cmd("RCPT TO:<r@example.net>", "250").await;
    c.cmd("DATA", "354").await;
    c.send("From: alice@example.com\r\nSubject: fine\r\n\r\nbody\r\n.\r\n")
        .await;
    c.expect("250 2.0.0").await;
    relay.shutdown().await;
}

#[tokio::test]
async fn starttls_injection_http_and_session_limits() {
    let lab = Lab::new();
    let mut cfg = lab.config(None);
    cfg.limits.max_sessions_per_client = 2;
    let relay = Relay::start(cfg, Listeners::default()).await.unwrap();
    let addr = relay.addrs().submission.unwrap();
    let pem = lab.cert_pem();
    // CVE-2011-0411: commands in the STARTTLS packet are dropped.
    let mut c = Client::connect(addr, &pem).await;
    c.expect("220").await;
    c.cmd("EHLO client.test", "250").await;
    c.send("STARTTLS\r\nRSET\r\nMAIL FROM:<alice@example.com>\r\n")
        .await;
    c.expect("220 2.0.0").await;
    c.upgrade().await;
    c.cmd("EHLO client.test", "250-relay.test").await;
    drop(c);
    // HTTP.
    let mut c = Client::connect(addr, &pem).await;
    c.expect("220").await;
    c.cmd("POST / HTTP/1.1", "421 4.7.0").await;
    c.expect_closed().await;
    // Per-client session limit: two held open, the third is refused.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut a = Client::connect(addr, &pem).await;
    a.expect("220").await;
    let mut b = Client::connect(addr, &pem).await;
    b.expect("220").await;
    let mut c = Client::connect(addr, &pem).await;
    c.expect("421 4.7.0 Too many connections").await;
    assert_eq!(relay.stats().snapshot().sessions_refused, 1);
    drop((a, b));
    relay.shutdown().await;
}

#[tokio::test]
async fn tls_reload_serves_new_certificate() {
    let lab = Lab::new();
    let relay = Relay::start(lab.config(None), Listeners::default())
        .await
        .unwrap();
    let addr = relay.addrs().submissions.unwrap();
    let old = lab.cert_pem();
    smtpgate_relay::write_lab_cert(lab.dir.path(), &["localhost"]).unwrap();
    let new = lab.cert_pem();
    assert_ne!(old, new);
    // Before reload the old certificate is still served...
    let mut c = Client::connect_tls(addr, &old).await;
    c.expect("220").await;
    // Through the cloneable control handle, as the agent's SIGHUP task would.
    let control = relay.control();
    tokio::spawn(async move { control.reload_tls() })
        .await
        .unwrap()
        .unwrap();
    // ...after it, the new one.
    let mut c = Client::connect_tls(addr, &new).await;
    c.expect("220").await;
    std::fs::write(&lab.cert, "not a cert").unwrap();
    assert!(relay.reload_tls().is_err());
    let mut c = Client::connect_tls(addr, &new).await;
    c.expect("220").await;
    relay.shutdown().await;
}

#[tokio::test]
async fn start_errors_are_clear() {
    let lab = Lab::new();
    let mut cfg = lab.config(None);
    cfg.limits.max_recipients = 0;
    let e = Relay::start(cfg, Listeners::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("limits.max_recipients"), "{e}");
    let mut cfg = lab.config(None);
    cfg.tls_cert = lab.dir.path().join("missing.crt");
    let e = Relay::start(cfg, Listeners::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.crt"), "{e}");
    // A port already in use.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cfg = lab.config(None);
    cfg.submission_listen = Some(busy.local_addr().unwrap());
    let e = Relay::start(cfg, Listeners::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("binding Submission listener"), "{e}");
}

#[tokio::test]
async fn users_file_changes_apply_without_restart() {
    let lab = Lab::new();
    let relay = Relay::start(lab.config(None), Listeners::default())
        .await
        .unwrap();
    let addr = relay.addrs().submissions.unwrap();
    let pem = lab.cert_pem();
    let try_login = |user: &'static str, pw: &'static str, want: &'static str| {
        let pem = pem.clone();
        async move {
            let mut c = Client::connect_tls(addr, &pem).await;
            c.expect("220").await;
            c.cmd("EHLO client.test", "250").await;
            c.cmd(&format!("AUTH PLAIN {}", common::plain(user, pw)), want)
                .await;
        }
    };
    try_login("carol", "carol-pw", "535").await;
    smtpgate_relay::users::user_add_hash(
        &lab.users,
        "carol",
        &common::fast_hash("carol-pw"),
        vec!["carol@example.com".into()],
    )
    .unwrap();
    try_login("carol", "carol-pw", "235").await;
    smtpgate_relay::users::user_remove(&lab.users, "carol").unwrap();
    try_login("carol", "carol-pw", "535").await;
    relay.shutdown().await;
}
