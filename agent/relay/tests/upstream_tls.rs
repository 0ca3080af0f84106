//! The smarthost client's TLS and AUTH paths, tested against a second relay
//! instance as the smarthost (smtp-sink speaks no TLS): relay A delivers to
//! relay B over implicit TLS or STARTTLS with AUTH, verifying B's lab
//! certificate through `ca_file`; B delivers to smtp-sink.

mod common;

use std::time::Duration;

use common::{Client, Lab, Sink, free_port, stuff};
use smtpgate_relay::{Listeners, Relay, UpstreamConfig, UpstreamTls};

async fn chain(tls: UpstreamTls) {
    let lab_b = Lab::new();
    smtpgate_relay::write_lab_cert(lab_b.dir.path(), &["localhost", "127.0.0.1"]).unwrap();
    let sink = Sink::start(&lab_b.dir.path().join("sink"), free_port());
    let relay_b = Relay::start(lab_b.config(Some(sink.port)), Listeners::default())
        .await
        .unwrap();
    let b = relay_b.addrs();

    let lab_a = Lab::new();
    let pw = lab_a.dir.path().join("upstream.pass");
    std::fs::write(&pw, "alice-pw\n").unwrap();
    let mut cfg_a = lab_a.config(None);
    cfg_a.hostname = "relay-a.test".into();
    cfg_a.upstream = Some(UpstreamConfig {
        host: "127.0.0.1".into(),
        port: if tls == UpstreamTls::Implicit {
            b.submissions.unwrap().port()
        } else {
            b.submission.unwrap().port()
        },
        tls,
        username: Some("alice".into()),
        password_file: Some(pw),
        ca_file: Some(lab_b.cert.clone()),
    });
    let relay_a = Relay::start(cfg_a, Listeners::default()).await.unwrap();

    let mut c = Client::login_587(
        relay_a.addrs().submission.unwrap(),
        &lab_a.cert_pem(),
        "alice",
        "alice-pw",
    )
    .await;
    c.cmd("MAIL FROM:<alice@example.com>", "250").await;
    c.cmd("RCPT TO:<r@example.net>", "250").await;
    c.cmd("DATA", "354").await;
    c.send(&stuff(
        "From: alice@example.com\r\nMessage-ID: <chain@example.com>\r\nSubject: chain\r\n\r\nthrough two relays\r\n",
    ))
    .await;
    c.expect("250 2.0.0").await;
    let got = sink
        .wait_for("chained delivery", Duration::from_secs(30), |m| {
            m.iter().any(|d| d.contains("through two relays\n"))
        })
        .await;
    let (_, msg) = common::sink_split(&got[0]);
    // B's header on top of A's, both saying TLS + AUTH.
    let by_b = msg
        .find("by relay.test (smtpgate) with ESMTPSA")
        .expect("relay B Received");
    let by_a = msg
        .find("by relay-a.test (smtpgate) with ESMTPSA")
        .expect("relay A Received");
    assert!(by_b < by_a, "{msg}");
    assert_eq!(relay_b.stats().snapshot().auth_successes, 1);
    relay_a.shutdown().await;
    relay_b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_implicit_tls_with_auth() {
    chain(UpstreamTls::Implicit).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_starttls_with_auth() {
    chain(UpstreamTls::Starttls).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_with_untrusted_certificate_is_retried_not_sent() {
    let lab_b = Lab::new();
    let relay_b = Relay::start(lab_b.config(None), Listeners::default())
        .await
        .unwrap();
    let lab_a = Lab::new();
    let mut cfg_a = lab_a.config(None);
    cfg_a.upstream = Some(UpstreamConfig {
        host: "127.0.0.1".into(),
        port: relay_b.addrs().submissions.unwrap().port(),
        tls: UpstreamTls::Implicit,
        username: None,
        password_file: None,
        ca_file: None,
    });
    let relay_a = Relay::start(cfg_a, Listeners::default()).await.unwrap();
    let mut c = Client::login_587(
        relay_a.addrs().submission.unwrap(),
        &lab_a.cert_pem(),
        "alice",
        "alice-pw",
    )
    .await;
    c.cmd("MAIL FROM:<alice@example.com>", "250").await;
    c.cmd("RCPT TO:<r@example.net>", "250").await;
    c.cmd("DATA", "354").await;
    c.send(&stuff("From: alice@example.com\r\nSubject: x\r\n\r\nx\r\n"))
        .await;
    c.expect("250 2.0.0").await;
    // Wait for the failed attempt to reach the record on disk.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let q = loop {
        let q = smtpgate_relay::queue::list(&lab_a.spool).unwrap();
        if q.iter().any(|r| r.recipients[0].last_error.is_some()) {
            break q;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no deferred attempt on disk"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(relay_a.stats().snapshot().deliveries_deferred >= 1);
    assert_eq!(q.len(), 1);
    assert!(
        q[0].recipients[0]
            .last_error
            .as_deref()
            .is_some_and(|e| e.starts_with("4.7.5 ")
                && e.contains("failed (certificate)")
                && e.contains("UnknownIssuer")),
        "the typed certificate failure, deferred: {q:?}"
    );
    // And the handle can delete it.
    relay_a.delete(&q[0].id).unwrap();
    assert!(
        smtpgate_relay::queue::list(&lab_a.spool)
            .unwrap()
            .is_empty()
    );
    relay_a.shutdown().await;
    relay_b.shutdown().await;
}
