//! Upstream outages: mail stays queued (and survives on disk) while the
//! smarthost is down and goes out once it is back; past the maximum
//! lifetime the sender gets an RFC 3464 bounce, itself delivered to the
//! sink.

mod common;

use std::time::Duration;

use common::{Client, Lab, Sink, free_port, stuff};
use smtpgate_relay::queue::RcptState;
use smtpgate_relay::{Listeners, Relay};

async fn submit(addr: std::net::SocketAddr, pem: &str, id: &str) {
    let mut c = Client::login_587(addr, pem, "alice", "alice-pw").await;
    c.cmd("MAIL FROM:<alice@example.com>", "250").await;
    c.cmd("RCPT TO:<r@example.net>", "250").await;
    c.cmd("DATA", "354").await;
    c.send(&stuff(&format!(
        "From: alice@example.com\r\nMessage-ID: <{id}@example.com>\r\nSubject: {id}\r\n\r\nbody {id}\r\n"
    )))
    .await;
    c.expect("250 2.0.0").await;
    c.cmd("QUIT", "221").await;
}

async fn until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn queued_while_upstream_down_then_delivered() {
    let lab = Lab::new();
    let port = free_port();
    let relay = Relay::start(lab.config(Some(port)), Listeners::default())
        .await
        .unwrap();
    let addr = relay.addrs().submission.unwrap();
    for i in 0..3 {
        submit(addr, &lab.cert_pem(), &format!("down{i}")).await;
    }
    // Every record on disk shows a failed attempt with its error.
    until("failed attempts on disk", 20, || {
        let q = smtpgate_relay::queue::list(&lab.spool).unwrap();
        q.len() == 3 && q.iter().all(|r| r.recipients[0].attempts >= 1)
    })
    .await;
    for rec in smtpgate_relay::queue::list(&lab.spool).unwrap() {
        let r = &rec.recipients[0];
        assert_eq!(r.state, RcptState::Pending);
        assert!(
            r.last_error.as_deref().unwrap_or("").contains("connection"),
            "{rec:?}"
        );
    }
    let stats = relay.stats();
    assert!(stats.snapshot().deliveries_deferred >= 3);
    let sink = Sink::start(&lab.dir.path().join("sink"), port);
    relay.flush();
    // smtp-sink writes its dump while the transaction runs: wait for the
    // last body line, not just for the file.
    sink.wait_for("3 deliveries", Duration::from_secs(30), |m| {
        (0..3).all(|i| m.iter().any(|d| d.contains(&format!("body down{i}\n"))))
    })
    .await;
    // The gauge drops just after the files go.
    until("empty queue", 10, || {
        smtpgate_relay::queue::list(&lab.spool).unwrap().is_empty()
            && stats.snapshot().queue_length == 0
    })
    .await;
    relay.shutdown().await;
}

#[tokio::test]
async fn expired_message_bounces_to_sender_with_multipart_report() {
    let lab = Lab::new();
    let port = free_port();
    let mut cfg = lab.config(Some(port));
    cfg.retry.max_lifetime_secs = 1.0;
    let relay = Relay::start(cfg, Listeners::default()).await.unwrap();
    let addr = relay.addrs().submission.unwrap();
    submit(addr, &lab.cert_pem(), "expire1").await;
    let stats = relay.stats();
    until("bounce", 20, || stats.snapshot().messages_bounced == 1).await;
    let q = smtpgate_relay::queue::list(&lab.spool).unwrap();
    assert_eq!(q.len(), 1, "only the bounce is left: {q:?}");
    assert!(q[0].is_dsn && q[0].from.is_empty());
    let sink = Sink::start(&lab.dir.path().join("sink"), port);
    relay.flush();
    let got = sink
        .wait_for("the bounce", Duration::from_secs(30), |m| {
            m.iter().any(|d| d.contains("/relay.test--"))
        })
        .await;
    let (env, msg) = common::sink_split(&got[0]);
    assert!(
        env.iter().any(|l| l == "X-Mail-Args: <>"),
        "bounce must use the null sender: {env:?}"
    );
    assert!(
        env.iter().any(|l| l == "X-Rcpt-Args: <alice@example.com>"),
        "{env:?}"
    );
    assert!(
        msg.contains("Content-Type: multipart/report; report-type=delivery-status;"),
        "{msg}"
    );
    assert!(
        msg.contains("Content-Type: message/delivery-status"),
        "{msg}"
    );
    assert!(
        msg.contains("Final-Recipient: rfc822; r@example.net\nAction: failed\nStatus: 4.4.7\n"),
        "{msg}"
    );
    assert!(
        msg.contains("Message-ID: <expire1@example.com>"),
        "original headers attached: {msg}"
    );
    assert!(!msg.contains("body expire1"), "bounce carries headers only");
    relay.shutdown().await;
}

/// Issue 12's delay warnings: a message still queued after
/// `retry.delay_warning_secs` (here 1 s, the smarthost down) gets one RFC
/// 3464 `Action: delayed` warning to its sender, however many attempts
/// follow, a restart included; when the smarthost is back the warning and
/// the message itself both arrive.
#[tokio::test]
async fn one_delay_warning_while_upstream_down() {
    let lab = Lab::new();
    let port = free_port();
    let mut cfg = lab.config(Some(port));
    cfg.retry.delay_warning_secs = 1.0;
    let relay = Relay::start(cfg.clone(), Listeners::default())
        .await
        .unwrap();
    let addr = relay.addrs().submission.unwrap();
    submit(addr, &lab.cert_pem(), "late").await;
    let records = || smtpgate_relay::queue::list(&lab.spool).unwrap();
    let warnings = || {
        records()
            .into_iter()
            .filter(|r| r.is_dsn)
            .collect::<Vec<_>>()
    };
    let original = || records().into_iter().find(|r| !r.is_dsn).unwrap();
    until("the delay warning", 20, || !warnings().is_empty()).await;
    let warned_at = original().attempts;
    assert!(original().delay_warned);
    // Not before its time, and not a whole backoff late either (attempts
    // are 0.2 to 0.5 s apart here; one is scheduled at the warning's time).
    let waited = warnings()[0].created_unix_ms - original().created_unix_ms;
    assert!((1000..2500).contains(&waited), "warned after {waited} ms");
    // More attempts, then a restart on the same spool, more attempts: still one.
    until("three more attempts", 20, || {
        original().attempts >= warned_at + 3
    })
    .await;
    relay.shutdown().await;
    let relay = Relay::start(cfg, Listeners::default()).await.unwrap();
    until("three more after the restart", 20, || {
        original().attempts >= warned_at + 6
    })
    .await;
    let w = warnings();
    assert_eq!(w.len(), 1, "{w:?}");
    assert_eq!(
        relay.stats().snapshot().delay_warnings,
        0,
        "the restart sent none"
    );
    assert_eq!(w[0].recipients[0].address, "alice@example.com");
    assert!(w[0].from.is_empty(), "from <>");
    let (_, text) = smtpgate_relay::queue::show(&lab.spool, &w[0].id).unwrap();
    let text = String::from_utf8(text).unwrap();
    for needle in [
        "Subject: Delayed Mail (still being retried)\r\n",
        "Content-Type: multipart/report; report-type=delivery-status;",
        "Final-Recipient: rfc822; r@example.net\r\nAction: delayed\r\nStatus: 4.",
        "Will-Retry-Until: ",
        "Subject: late\r\n",
    ] {
        assert!(text.contains(needle), "{needle:?} not in\n{text}");
    }

    let sink = Sink::start(&lab.dir.path().join("sink"), port);
    relay.flush();
    let dumps = sink
        .wait_for(
            "the message and its warning",
            Duration::from_secs(30),
            |m| {
                m.iter().any(|d| d.contains("body late\n"))
                    && m.iter()
                        .any(|d| d.contains("Action: delayed\n") && d.contains("--\n"))
            },
        )
        .await;
    let warning = dumps
        .iter()
        .find(|d| d.contains("Action: delayed"))
        .unwrap();
    let (env, _) = common::sink_split(warning);
    assert!(env.iter().any(|l| l == "X-Mail-Args: <>"), "{env:?}");
    assert!(
        env.iter().any(|l| l == "X-Rcpt-Args: <alice@example.com>"),
        "{env:?}"
    );
    until("empty queue", 10, || records().is_empty()).await;
    relay.shutdown().await;
}
