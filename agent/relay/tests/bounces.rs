//! Permanent failures at a smarthost bounce in the first attempt instead of
//! being retried for the queue lifetime (issue 12, item 4): a 5xx to RCPT,
//! a message that needs SMTPUTF8 (non-ASCII addresses, or UTF-8 headers
//! submitted with SMTPUTF8) and a message with 8-bit data, each to a
//! smtp-sink that cannot take it (smtp-sink never offers SMTPUTF8; `-8`
//! drops 8BITMIME). The bounce goes back through the same sink, where its
//! status is read.

mod common;

use std::time::Duration;

use common::{Client, Lab, Sink, free_port, stuff};
use smtpgate_relay::{Listeners, Relay, RelayHandle};

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

/// Submits one message as alice with the given MAIL parameters.
async fn submit(relay: &RelayHandle, pem: &str, mail_params: &str, rcpt: &str, msg: &str) {
    let mut c =
        Client::login_587(relay.addrs().submission.unwrap(), pem, "alice", "alice-pw").await;
    c.cmd(
        &format!("MAIL FROM:<alice@example.com>{mail_params}"),
        "250",
    )
    .await;
    c.cmd(&format!("RCPT TO:<{rcpt}>"), "250").await;
    c.cmd("DATA", "354").await;
    c.send(&stuff(msg)).await;
    c.expect("250 2.0.0").await;
    c.cmd("QUIT", "221").await;
}

/// The relay with smtp-sink (started with `sink_args`) as its smarthost;
/// sends one message and returns the bounce the sink got back, once the
/// queue is empty, after checking that it took a single attempt.
async fn bounce_of(sink_args: &[&str], mail_params: &str, rcpt: &str, msg: &str) -> String {
    let lab = Lab::new();
    let sink = Sink::start_with(
        &lab.dir.path().join("sink"),
        std::net::SocketAddr::from(([127, 0, 0, 1], free_port())),
        sink_args,
    );
    let relay = Relay::start(lab.config(Some(sink.port)), Listeners::default())
        .await
        .unwrap();
    submit(&relay, &lab.cert_pem(), mail_params, rcpt, msg).await;
    let got = sink
        .wait_for("the bounce", Duration::from_secs(30), |m| {
            m.iter().any(|d| d.contains("Final-Recipient"))
        })
        .await;
    // The queue empties at the bounce's 250 (its record's unlink); the
    // counters follow a moment later, so wait for them too (a loaded
    // machine saw recipients_delivered still 0 here).
    until("empty queue", 10, || {
        smtpgate_relay::queue::list(&lab.spool).unwrap().is_empty()
            && relay.stats().snapshot().recipients_delivered >= 1
    })
    .await;
    let s = relay.stats().snapshot();
    assert_eq!(
        (
            s.deliveries_deferred,
            s.messages_bounced,
            s.recipients_delivered
        ),
        (0, 1, 1),
        "bounced in the first attempt, and the bounce delivered: {s:?}"
    );
    assert_eq!(got.len(), 1, "only the bounce reached the sink");
    relay.shutdown().await;
    let (env, dsn) = common::sink_split(&got[0]);
    // The null sender (8-bit when it quotes 8-bit headers).
    assert!(
        env.iter()
            .any(|l| l == "X-Mail-Args: <>" || l == "X-Mail-Args: <> BODY=8BITMIME"),
        "{env:?}"
    );
    dsn
}

#[tokio::test]
async fn non_ascii_address_to_a_hop_without_smtputf8_bounces_at_once() {
    let dsn = bounce_of(
        &[],
        " SMTPUTF8",
        "ren\u{e9}@example.net",
        "From: alice@example.com\r\nSubject: caf\u{e9}\r\n\r\nsalut\r\n",
    )
    .await;
    assert!(
        dsn.contains(
            "Final-Recipient: rfc822; ren\u{e9}@example.net\nAction: failed\nStatus: 5.6.7\n"
        ),
        "{dsn}"
    );
    assert!(dsn.contains("does not support SMTPUTF8"), "{dsn}");
}

#[tokio::test]
async fn utf8_headers_with_smtputf8_to_a_hop_without_it_bounce_at_once() {
    let dsn = bounce_of(
        &[],
        " SMTPUTF8",
        "rene@example.net",
        "From: alice@example.com\r\nSubject: caf\u{e9}\r\n\r\nsalut\r\n",
    )
    .await;
    assert!(
        dsn.contains("Final-Recipient: rfc822; rene@example.net\nAction: failed\nStatus: 5.6.9\n"),
        "{dsn}"
    );
}

#[tokio::test]
async fn eight_bit_data_to_a_hop_without_8bitmime_bounces_at_once() {
    let dsn = bounce_of(
        &["-8"],
        " BODY=8BITMIME",
        "rene@example.net",
        "From: alice@example.com\r\nSubject: ascii\r\n\r\ncaf\u{e9}\r\n",
    )
    .await;
    assert!(
        dsn.contains("Final-Recipient: rfc822; rene@example.net\nAction: failed\nStatus: 5.6.3\n"),
        "{dsn}"
    );
    assert!(dsn.contains("does not support 8BITMIME"), "{dsn}");
}

/// The same hop without those needs delivers: the checks are about what the
/// message needs, not about the hop alone.
#[tokio::test]
async fn ascii_message_with_smtputf8_flag_still_goes_to_a_hop_without_it() {
    let lab = Lab::new();
    let sink = Sink::start(&lab.dir.path().join("sink"), free_port());
    let relay = Relay::start(lab.config(Some(sink.port)), Listeners::default())
        .await
        .unwrap();
    submit(
        &relay,
        &lab.cert_pem(),
        " SMTPUTF8",
        "rene@example.net",
        "From: alice@example.com\r\nSubject: plain\r\n\r\nplain ascii\r\n",
    )
    .await;
    let got = sink
        .wait_for("delivery", Duration::from_secs(30), |m| {
            m.iter().any(|d| d.contains("plain ascii"))
        })
        .await;
    let (env, _) = common::sink_split(&got[0]);
    assert!(
        env.iter().any(|l| l == "X-Mail-Args: <alice@example.com>"),
        "no SMTPUTF8 parameter to a hop that does not offer it: {env:?}"
    );
    relay.shutdown().await;
}

/// A 5xx to RCPT from the smarthost bounces in the first attempt. The
/// bounce itself is refused by the same smarthost and dropped (a bounce is
/// never bounced), so what shows is the count and the empty queue.
#[tokio::test]
async fn permanent_5xx_from_the_smarthost_bounces_at_once() {
    let lab = Lab::new();
    let sink = Sink::start_with(
        &lab.dir.path().join("sink"),
        std::net::SocketAddr::from(([127, 0, 0, 1], free_port())),
        &["-f", "RCPT", "-B", "550 5.1.1 No such user"],
    );
    let relay = Relay::start(lab.config(Some(sink.port)), Listeners::default())
        .await
        .unwrap();
    submit(
        &relay,
        &lab.cert_pem(),
        "",
        "nobody@example.net",
        "From: alice@example.com\r\nSubject: x\r\n\r\nx\r\n",
    )
    .await;
    let stats = relay.stats();
    until("bounce and empty queue", 20, || {
        stats.snapshot().messages_bounced == 1
            && smtpgate_relay::queue::list(&lab.spool).unwrap().is_empty()
    })
    .await;
    // Retries would show as deferrals; there were none, and no second
    // bounce.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let s = stats.snapshot();
    assert_eq!((s.deliveries_deferred, s.messages_bounced), (0, 1), "{s:?}");
    assert!(sink.messages().is_empty());
    relay.shutdown().await;
}
