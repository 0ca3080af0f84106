//! In-memory dialogues: a duplex pipe instead of a socket, the real session
//! code on the other end.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::{mpsc, watch};

use super::{ListenerKind, Session, Shared};
use crate::config::RelayConfig;
use crate::limits::Limits;
use crate::spool::{QueueRecord, Spool};
use crate::stats::RelayStats;
use crate::tls::TlsStore;
use crate::users::UserDb;

pub(crate) struct Harness {
    pub shared: Arc<Shared>,
    pub queued: mpsc::UnboundedReceiver<QueueRecord>,
    pub shutdown: watch::Sender<bool>,
    pub cert_pem: String,
    pub _dir: tempfile::TempDir,
}

use crate::test_support::fast_hash;

pub(crate) fn harness(tweak: impl FnOnce(&mut RelayConfig)) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = crate::tls::write_lab_cert(dir.path(), &["localhost"]).unwrap();
    let users = dir.path().join("users.toml");
    std::fs::write(
        &users,
        format!(
            "[users.alice]\nhash = \"{}\"\nsenders = [\"alice@example.com\", \"@example.org\"]\n\
             [users.bob]\nhash = \"{}\"\nsenders = [\"bob@example.com\"]\n\
             [users.list]\nhash = \"{}\"\nsenders = [\"list@example.com\"]\nheader_from = \"any\"\n",
            fast_hash("alice-pw"),
            fast_hash("bob-pw"),
            fast_hash("list-pw")
        ),
    )
    .unwrap();
    let mut cfg = RelayConfig {
        hostname: "relay.test".into(),
        ..RelayConfig::default()
    };
    cfg.limits.auth_failure_delay_secs = 0.0;
    // Never the host's keys.
    cfg.dkim_dir = dir.path().join("dkim");
    tweak(&mut cfg);
    let (tx, queued) = mpsc::unbounded_channel();
    let (shutdown, shutdown_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        tls: Arc::new(TlsStore::load(&cert, &key).unwrap()),
        dkim: Arc::new(crate::dkim::DkimStore::load(&cfg.dkim_dir).unwrap()),
        users: Arc::new(UserDb::open(&users).unwrap()),
        limits: Limits::new(&cfg.limits),
        verifier: crate::verifier::Verifier::new(
            cfg.limits.auth_concurrency,
            crate::config::secs(cfg.limits.auth_queue_timeout_secs),
        )
        .unwrap(),
        stats: Arc::new(RelayStats::default()),
        spool: Spool::open(&dir.path().join("spool")).unwrap(),
        queued: tx,
        shutdown: shutdown_rx,
        config: Arc::new(cfg),
    });
    let cert_pem = std::fs::read_to_string(&cert).unwrap();
    Harness {
        shared,
        queued,
        shutdown,
        cert_pem,
        _dir: dir,
    }
}

pub(crate) fn client_tls(cert_pem: &str) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap())
        .unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

enum CStream {
    Plain(DuplexStream),
    Tls(Box<tokio_rustls::client::TlsStream<DuplexStream>>),
    Gone,
}

pub(crate) struct Client {
    s: CStream,
    buf: Vec<u8>,
    cert_pem: String,
    task: tokio::task::JoinHandle<()>,
}

const PEER: &str = "192.0.2.7:40000";

impl Harness {
    pub(crate) async fn connect(&self, kind: ListenerKind) -> Client {
        self.connect_from(kind, PEER).await
    }

    /// A session whose client is `peer` ("ip:port").
    pub(crate) async fn connect_from(&self, kind: ListenerKind, peer: &str) -> Client {
        let (c, s) = tokio::io::duplex(1 << 16);
        let local: SocketAddr = if kind == ListenerKind::Intercept {
            "198.51.100.25:25"
        } else {
            "127.0.0.1:587"
        }
        .parse()
        .unwrap();
        let sess = Session::new(
            s,
            self.shared.clone(),
            kind,
            peer.parse().unwrap(),
            local,
            false,
        );
        let task = tokio::spawn(async move {
            let _ = sess.run().await;
        });
        let mut cl = Client {
            s: CStream::Plain(c),
            buf: Vec::new(),
            cert_pem: self.cert_pem.clone(),
            task,
        };
        cl.expect("220 relay.test ESMTP").await;
        cl
    }

    /// A session that has done EHLO, STARTTLS, EHLO and AUTH as `user`.
    pub(crate) async fn authed(&self, user: &str, pw: &str) -> Client {
        let mut c = self.connect(ListenerKind::Submission).await;
        c.starttls().await;
        c.cmd(&format!("AUTH PLAIN {}", plain(user, pw)), "235 2.7.0")
            .await;
        c
    }
}

pub(crate) fn plain(user: &str, pw: &str) -> String {
    B64.encode(format!("\0{user}\0{pw}"))
}

impl Client {
    pub(crate) async fn send(&mut self, data: &str) {
        self.send_bytes(data.as_bytes()).await;
    }

    pub(crate) async fn send_bytes(&mut self, data: &[u8]) {
        let r = match &mut self.s {
            CStream::Plain(s) => s.write_all(data).await,
            CStream::Tls(s) => s.write_all(data).await.and(s.flush().await),
            CStream::Gone => unreachable!(),
        };
        r.unwrap();
    }

    pub(crate) async fn try_send_bytes(&mut self, data: &[u8]) -> std::io::Result<()> {
        match &mut self.s {
            CStream::Plain(s) => s.write_all(data).await,
            CStream::Tls(s) => {
                s.write_all(data).await?;
                s.flush().await
            }
            CStream::Gone => unreachable!(),
        }
    }

    /// A complete reply if one arrives within `wait`.
    pub(crate) async fn reply_within(&mut self, wait: Duration) -> Option<String> {
        tokio::time::timeout(wait, self.reply()).await.ok()
    }

    async fn read_more(&mut self) -> usize {
        let mut chunk = [0u8; 4096];
        let fut = async {
            match &mut self.s {
                CStream::Plain(s) => s.read(&mut chunk).await,
                CStream::Tls(s) => s.read(&mut chunk).await,
                CStream::Gone => unreachable!(),
            }
        };
        let n = tokio::time::timeout(Duration::from_secs(10), fut)
            .await
            .expect("server reply timed out")
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }

    /// Reads one complete (possibly multi-line) reply.
    pub(crate) async fn reply(&mut self) -> String {
        loop {
            let mut start = 0;
            while let Some(i) = self.buf[start..].iter().position(|&b| b == b'\n') {
                let line = &self.buf[start..start + i + 1];
                if line.len() >= 4 && line[3] == b' ' {
                    let all: Vec<u8> = self.buf.drain(..start + i + 1).collect();
                    return String::from_utf8(all).unwrap();
                }
                start += i + 1;
            }
            if self.read_more().await == 0 {
                panic!(
                    "connection closed; partial reply {:?}",
                    String::from_utf8_lossy(&self.buf)
                );
            }
        }
    }

    pub(crate) async fn expect(&mut self, prefix: &str) -> String {
        let r = self.reply().await;
        assert!(r.starts_with(prefix), "expected {prefix:?}, got {r:?}");
        r
    }

    pub(crate) async fn cmd(&mut self, line: &str, prefix: &str) -> String {
        self.send(&format!("{line}\r\n")).await;
        self.expect(prefix).await
    }

    /// Asserts the server closed the connection (after any pending reply).
    pub(crate) async fn expect_closed(&mut self) {
        assert!(
            self.buf.is_empty(),
            "unexpected data {:?}",
            String::from_utf8_lossy(&self.buf)
        );
        assert_eq!(
            self.read_more().await,
            0,
            "expected close, got {:?}",
            String::from_utf8_lossy(&self.buf)
        );
        tokio::time::timeout(Duration::from_secs(5), &mut self.task)
            .await
            .expect("session task ended")
            .unwrap();
    }

    pub(crate) async fn starttls(&mut self) {
        self.cmd("EHLO client.test", "250").await;
        self.cmd("STARTTLS", "220 2.0.0").await;
        self.upgrade().await;
        let r = self.cmd("EHLO client.test", "250-relay.test").await;
        assert!(
            r.contains("AUTH PLAIN LOGIN") && !r.contains("STARTTLS"),
            "{r}"
        );
    }

    pub(crate) async fn upgrade(&mut self) {
        let CStream::Plain(raw) = std::mem::replace(&mut self.s, CStream::Gone) else {
            panic!("already TLS")
        };
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let tls = client_tls(&self.cert_pem)
            .connect(name, raw)
            .await
            .expect("TLS handshake");
        self.s = CStream::Tls(Box::new(tls));
    }

    /// MAIL, RCPT..., DATA with `body` (already dot-stuffed, without the
    /// final dot line); returns the final reply.
    pub(crate) async fn send_mail(&mut self, from: &str, rcpts: &[&str], body: &str) -> String {
        self.cmd(&format!("MAIL FROM:<{from}>"), "250 2.1.0").await;
        for r in rcpts {
            self.cmd(&format!("RCPT TO:<{r}>"), "250 2.1.5").await;
        }
        self.cmd("DATA", "354").await;
        self.send(&format!("{body}.\r\n")).await;
        self.reply().await
    }
}

#[tokio::test]
async fn ehlo_before_tls_offers_starttls_not_auth() {
    let h = harness(|_| {});
    let mut c = h.connect(ListenerKind::Submission).await;
    let r = c.cmd("EHLO client.test", "250-relay.test").await;
    for ext in [
        "SIZE 26214400",
        "PIPELINING",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "STARTTLS",
    ] {
        assert!(r.contains(ext), "{ext} missing in {r}");
    }
    assert!(!r.contains("AUTH"), "AUTH offered before TLS: {r}");
    c.cmd("HELO client.test", "250 relay.test").await;
    c.cmd("QUIT", "221 2.0.0").await;
    c.expect_closed().await;
}

#[tokio::test]
async fn auth_before_tls_refused() {
    let h = harness(|_| {});
    let mut c = h.connect(ListenerKind::Submission).await;
    c.cmd("EHLO client.test", "250").await;
    c.cmd(
        &format!("AUTH PLAIN {}", plain("alice", "alice-pw")),
        "538 5.7.11",
    )
    .await;
    c.cmd("AUTH LOGIN", "538 5.7.11").await;
    c.cmd("MAIL FROM:<alice@example.com>", "530 5.7.0").await;
}

#[tokio::test]
async fn no_mail_or_rcpt_without_auth_anywhere() {
    let h = harness(|c| c.intercept_message = "Use port 587 with your credentials".into());
    for kind in [ListenerKind::Submission, ListenerKind::Intercept] {
        let mut c = h.connect(kind).await;
        c.cmd("EHLO client.test", "250").await;
        let r = c.cmd("MAIL FROM:<alice@example.com>", "530 5.7.0").await;
        if kind == ListenerKind::Intercept {
            assert_eq!(r, "530 5.7.0 Use port 587 with your credentials\r\n");
        }
        c.cmd("RCPT TO:<victim@example.net>", "530 5.7.0").await;
        c.cmd("DATA", "530 5.7.0").await;
        // Also after TLS without AUTH.
        c.cmd("STARTTLS", "220").await;
        c.upgrade().await;
        c.cmd("EHLO client.test", "250").await;
        c.cmd("MAIL FROM:<alice@example.com>", "530 5.7.0").await;
        c.cmd("RCPT TO:<victim@example.net>", "530 5.7.0").await;
    }
    assert!(h.shared.spool.scan().unwrap().is_empty());
}

#[tokio::test]
async fn full_submission_is_spooled_with_received_header() {
    let mut h = harness(|_| {});
    let mut c = h.authed("alice", "alice-pw").await;
    let body = "From: alice@example.com\r\nSubject: hi\r\n\r\n..dot line\r\nbody\r\n";
    let r = c
        .send_mail(
            "alice@example.com",
            &["r1@example.net", "r2@example.net"],
            body,
        )
        .await;
    assert!(r.starts_with("250 2.0.0 Ok: queued as "), "{r}");
    let id = r.trim_end().rsplit(' ').next().unwrap().to_owned();
    let rec = h.queued.try_recv().expect("delivery side told");
    assert_eq!(rec.id, id);
    assert_eq!(rec.from, "alice@example.com");
    assert_eq!(rec.recipients.len(), 2);
    assert_eq!(rec.auth_user.as_deref(), Some("alice"));
    let stored = String::from_utf8(h.shared.spool.read_body(&id).unwrap()).unwrap();
    assert!(
        stored.starts_with(
            "Received: from client.test ([192.0.2.7])\r\n\t(using TLSv1.3 with cipher TLS13_"
        ),
        "{stored}"
    );
    assert!(
        stored.contains(
            "\r\n\t(authenticated user alice)\r\n\tby relay.test (smtpgate) with ESMTPSA id "
        ),
        "{stored}"
    );
    // The client's headers stay as they were; Message-ID and Date, which it
    // left out, follow them.
    let tail = stored.split_once("\r\nFrom: ").unwrap().1;
    let (fields, body) = tail.split_once("\r\n\r\n").unwrap();
    assert_eq!(body, ".dot line\r\nbody\r\n");
    let lines: Vec<&str> = fields.split("\r\n").collect();
    assert_eq!(lines[..2], ["alice@example.com", "Subject: hi"], "{stored}");
    assert_eq!(lines.len(), 4, "{stored}");
    assert!(
        lines[2].starts_with(&format!("Message-ID: <{id}.")) && lines[2].ends_with("@relay.test>"),
        "{stored}"
    );
    assert!(
        lines[3].starts_with("Date: ") && lines[3].ends_with(" +0000"),
        "{stored}"
    );
    // The session goes on: a second message in the same session.
    let r = c
        .send_mail(
            "someone@example.org",
            &["r@example.net"],
            "From: someone@example.org\r\n\r\nx\r\n",
        )
        .await;
    assert!(r.starts_with("250 2.0.0"), "{r}");
    assert_eq!(h.shared.stats.snapshot().messages_accepted, 2);
    c.cmd("QUIT", "221").await;
}

#[tokio::test]
async fn intercept_with_auth_relays_and_records_original_destination() {
    let h = harness(|_| {});
    let mut c = h.connect(ListenerKind::Intercept).await;
    c.starttls().await;
    c.cmd(&format!("AUTH PLAIN {}", plain("alice", "alice-pw")), "235")
        .await;
    let r = c
        .send_mail(
            "alice@example.com",
            &["r@example.net"],
            "From: alice@example.com\r\n\r\nhi\r\n",
        )
        .await;
    let id = r.trim_end().rsplit(' ').next().unwrap().to_owned();
    let stored = String::from_utf8(h.shared.spool.read_body(&id).unwrap()).unwrap();
    assert!(
        stored.contains("(intercepted; original destination 198.51.100.25:25)"),
        "{stored}"
    );
    assert!(stored.contains("for <r@example.net>;"), "{stored}");
}

#[tokio::test]
async fn auth_variants() {
    let h = harness(|_| {});
    let mut c = h.connect(ListenerKind::Submission).await;
    c.starttls().await;
    // PLAIN with a challenge, cancelled.
    c.cmd("AUTH PLAIN", "334 ").await;
    c.cmd("*", "501 5.0.0").await;
    // Unknown mechanism.
    c.cmd("AUTH CRAM-MD5", "504 5.5.4").await;
    // Bad base64.
    c.cmd("AUTH PLAIN !!!", "501 5.5.2").await;
    // Wrong password, unknown user, foreign authzid.
    c.cmd(
        &format!("AUTH PLAIN {}", plain("alice", "nope")),
        "535 5.7.8",
    )
    .await;
    c.cmd(
        &format!("AUTH PLAIN {}", plain("mallory", "x")),
        "535 5.7.8",
    )
    .await;
    c.cmd(
        &format!("AUTH PLAIN {}", B64.encode("bob\0alice\0alice-pw")),
        "535 5.7.8",
    )
    .await;
    // LOGIN with challenges.
    c.cmd("AUTH LOGIN", "334 VXNlcm5hbWU6").await;
    c.cmd(&B64.encode("bob"), "334 UGFzc3dvcmQ6").await;
    c.cmd(&B64.encode("bob-pw"), "235 2.7.0").await;
    c.cmd("AUTH LOGIN", "503 5.5.1").await;
    let s = h.shared.stats.snapshot();
    assert_eq!((s.auth_successes, s.auth_failures), (1, 2));
    // PLAIN with challenge, success; LOGIN with initial response.
    let mut c = h.connect(ListenerKind::Submission).await;
    c.starttls().await;
    c.cmd("AUTH PLAIN", "334 ").await;
    c.cmd(&plain("alice", "alice-pw"), "235").await;
    let mut c = h.connect(ListenerKind::Submission).await;
    c.starttls().await;
    c.cmd(
        &format!("AUTH LOGIN {}", B64.encode("alice")),
        "334 UGFzc3dvcmQ6",
    )
    .await;
    c.cmd(&B64.encode("alice-pw"), "235").await;
}

#[tokio::test]
async fn sender_must_belong_to_user() {
    let h = harness(|_| {});
    let mut c = h.authed("bob", "bob-pw").await;
    c.cmd("MAIL FROM:<alice@example.com>", "553 5.7.1").await;
    c.cmd("MAIL FROM:<anyone@example.org>", "553 5.7.1").await;
    c.cmd("MAIL FROM:<>", "550 5.7.1").await;
    c.cmd("MAIL FROM:<bob@example.com>", "250").await;
}

#[tokio::test]
async fn commands_out_of_order_get_503() {
    let h = harness(|_| {});
    let mut c = h.connect(ListenerKind::Submission).await;
    c.cmd("MAIL FROM:<alice@example.com>", "503 5.5.1").await;
    c.cmd("STARTTLS", "503 5.5.1").await;
    c.starttls().await;
    c.cmd("STARTTLS", "503 5.5.1").await;
    c.cmd(&format!("AUTH PLAIN {}", plain("alice", "alice-pw")), "235")
        .await;
    c.cmd("RCPT TO:<r@example.net>", "503 5.5.1").await;
    c.cmd("DATA", "503 5.5.1").await;
    c.cmd("MAIL FROM:<alice@example.com>", "250").await;
    c.cmd("MAIL FROM:<alice@example.com>", "503 5.5.1").await;
    c.cmd("DATA", "503 5.5.1").await;
    c.cmd(
        &format!("AUTH PLAIN {}", plain("alice", "alice-pw")),
        "503 5.5.1",
    )
    .await;
    c.cmd("RSET", "250 2.0.0").await;
    c.cmd("DATA", "503 5.5.1").await;
}

#[tokio::test]
async fn open_relay_address_tricks_refused() {
    let h = harness(|_| {});
    let mut c = h.authed("alice", "alice-pw").await;
    c.cmd("MAIL FROM:<alice@example.com>", "250").await;
    for rcpt in [
        "<victim%example.net@relay.test>",
        "<example.net!victim@relay.test>",
        "<@relay.test,@hop.example:victim@example.net>",
        "<@relay.test:victim@example.net>",
        "<\"victim@example.net\"@relay.test>",
        "<victim@example.net@relay.test>",
        "<victim@[192.0.2.1]>",
        "victim@example.net",
        "<victim>",
    ] {
        c.cmd(&format!("RCPT TO:{rcpt}"), "553 5.1.3").await;
    }
    c.cmd("RSET", "250").await;
    c.cmd("MAIL FROM:<alice%example.com@relay.test>", "553 5.1.7")
        .await;
}

#[tokio::test]
async fn smuggling_is_refused_and_connection_closed() {
    for payload in [
        "Subject: a\r\n\r\nx\n.\nMAIL FROM:<alice@example.com>\r\nRCPT TO:<v@example.net>\r\nDATA\r\nsmuggled\r\n.\r\n",
        "Subject: a\r\n\r\nx\r\n.\nMAIL FROM:<alice@example.com>\r\n.\r\n",
        "Subject: a\r\n\r\nx\n.\r\nMAIL FROM:<alice@example.com>\r\n.\r\n",
        "Subject: a\r\n\r\nx\r.\r\nMAIL FROM:<alice@example.com>\r\n.\r\n",
        "Subject: a\r\n\r\nbare\rcr\r\n.\r\n",
    ] {
        let mut h = harness(|_| {});
        let mut c = h.authed("alice", "alice-pw").await;
        c.cmd("MAIL FROM:<alice@example.com>", "250").await;
        c.cmd("RCPT TO:<r@example.net>", "250").await;
        c.cmd("DATA", "354").await;
        c.send(payload).await;
        c.expect("521 5.5.2").await;
        c.expect_closed().await;
        assert!(
            h.queued.try_recv().is_err(),
            "nothing may be queued for {payload:?}"
        );
        assert!(h.shared.spool.scan().unwrap().is_empty());
    }
}

#[tokio::test]
async fn plaintext_pipelined_after_starttls_is_discarded() {
    let h = harness(|_| {});
    let mut c = h.connect(ListenerKind::Submission).await;
    c.cmd("EHLO client.test", "250").await;
    // The classic injection: the NOOP (or a MAIL) rides in the same packet.
    c.send("STARTTLS\r\nNOOP\r\nMAIL FROM:<alice@example.com>\r\n")
        .await;
    c.expect("220 2.0.0").await;
    c.upgrade().await;
    // Had the injected lines run inside TLS we would see 250/530 replies
    // before the EHLO answer.
    c.cmd("EHLO client.test", "250-relay.test").await;
    c.cmd("NOOP", "250 2.0.0").await;
}

#[tokio::test]
async fn http_verbs_get_421_and_close() {
    let h = harness(|_| {});
    for req in [
        "GET / HTTP/1.1",
        "POST /submit HTTP/1.1",
        "CONNECT example.net:25 HTTP/1.1",
        "HEAD / HTTP/1.0",
    ] {
        let mut c = h.connect(ListenerKind::Submission).await;
        c.cmd(req, "421 4.7.0").await;
        c.expect_closed().await;
    }
}

#[tokio::test]
async fn misc_verbs() {
    let h = harness(|_| {});
    let mut c = h.connect(ListenerKind::Submission).await;
    c.cmd("EHLO client.test", "250").await;
    c.cmd("VRFY alice", "252 2.5.0").await;
    c.cmd("VRFY nosuchuser", "252 2.5.0").await;
    c.cmd("EXPN staff", "502 5.5.1").await;
    c.cmd("HELP", "214 2.0.0").await;
    c.cmd("NOOP", "250 2.0.0").await;
    c.cmd("RSET", "250 2.0.0").await;
    c.cmd("BDAT 10 LAST", "500 5.5.2").await;
    c.cmd("EHLO", "501 5.5.4").await;
    c.cmd("QUIT now", "501").await;
    c.send("NOOP\n").await;
    c.expect("500 5.5.2").await;
    c.cmd("QUIT", "221 2.0.0").await;
    c.expect_closed().await;
}

#[tokio::test]
async fn pipelined_transaction() {
    let h = harness(|_| {});
    let mut c = h.authed("alice", "alice-pw").await;
    c.send("MAIL FROM:<alice@example.com>\r\nRCPT TO:<a@example.net>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n").await;
    c.expect("250 2.1.0").await;
    c.expect("250 2.1.5").await;
    c.expect("250 2.1.5").await;
    c.expect("354").await;
    c.send("From: alice@example.com\r\n\r\nhi\r\n.\r\nNOOP\r\n")
        .await;
    c.expect("250 2.0.0 Ok: queued").await;
    c.expect("250 2.0.0 Ok").await;
}

#[tokio::test]
async fn size_recipient_and_line_limits() {
    let h = harness(|c| {
        c.limits.max_message_bytes = 2000;
        c.limits.max_recipients = 2;
    });
    let mut c = h.authed("alice", "alice-pw").await;
    c.cmd("MAIL FROM:<alice@example.com> SIZE=5000", "552 5.3.4")
        .await;
    c.cmd("MAIL FROM:<alice@example.com> SIZE=500", "250").await;
    c.cmd("RCPT TO:<a@example.net>", "250").await;
    c.cmd("RCPT TO:<b@example.net>", "250").await;
    c.cmd("RCPT TO:<c@example.net>", "452 4.5.3").await;
    c.cmd("DATA", "354").await;
    let big = "x".repeat(900) + "\r\n";
    c.send(&format!("{big}{big}{big}.\r\n")).await;
    c.expect("552 5.3.4").await;
    c.cmd("MAIL FROM:<alice@example.com>", "250").await;
    c.cmd("RCPT TO:<a@example.net>", "250").await;
    c.cmd("DATA", "354").await;
    // A single over-long line, within the size limit.
    c.send(&format!("{}\r\n.\r\n", "y".repeat(999))).await;
    c.expect("550 5.6.0").await;
    // Over-long command line.
    c.send(&format!("NOOP {}\r\n", "z".repeat(600))).await;
    c.expect("500 5.5.2 Line too long").await;
    c.cmd("NOOP", "250").await;
    c.cmd("MAIL FROM:<alice@example.com> NOTIFY=NEVER", "555 5.5.4")
        .await;
}

#[tokio::test]
async fn repeated_errors_close_with_421() {
    let h = harness(|c| c.limits.max_errors = 3);
    let mut c = h.connect(ListenerKind::Submission).await;
    c.cmd("FOO", "500").await;
    c.cmd("BAR", "500").await;
    c.send("BAZ\r\n").await;
    c.expect("500").await;
    c.expect("421 4.7.0").await;
    c.expect_closed().await;
}

#[tokio::test]
async fn guessing_locks_the_user_out_from_that_network_only() {
    // Issue 12: five wrong passwords locked the user out from every
    // address. Defaults: 5 per (user, network).
    let h = harness(|_| {});
    let mut guesser = h
        .connect_from(ListenerKind::Submission, "203.0.113.66:5000")
        .await;
    guesser.starttls().await;
    for _ in 0..5 {
        guesser
            .cmd(
                &format!("AUTH PLAIN {}", plain("alice", "guess")),
                "535 5.7.8",
            )
            .await;
    }
    // The guesser is locked out of alice, even with the right password...
    guesser
        .cmd(
            &format!("AUTH PLAIN {}", plain("alice", "alice-pw")),
            "454 4.7.0",
        )
        .await;
    // ...and so is its /64 or address (same IPv4 address, new session).
    let mut again = h
        .connect_from(ListenerKind::Submission, "203.0.113.66:5001")
        .await;
    again.starttls().await;
    again
        .cmd(
            &format!("AUTH PLAIN {}", plain("alice", "alice-pw")),
            "454 4.7.0",
        )
        .await;
    // Alice herself, from her own address, is not.
    let mut alice = h
        .connect_from(ListenerKind::Submission, "192.0.2.10:6000")
        .await;
    alice.starttls().await;
    alice
        .cmd(
            &format!("AUTH PLAIN {}", plain("alice", "alice-pw")),
            "235 2.7.0",
        )
        .await;
    // And another user from the guesser's address still gets in (below the
    // brake).
    let mut bob = h
        .connect_from(ListenerKind::Submission, "203.0.113.66:5002")
        .await;
    bob.starttls().await;
    bob.cmd(
        &format!("AUTH PLAIN {}", plain("bob", "bob-pw")),
        "235 2.7.0",
    )
    .await;
}

#[tokio::test]
async fn guessing_many_users_trips_the_client_brake() {
    let h = harness(|c| {
        c.limits.auth_max_failures = 5;
        c.limits.auth_max_failures_per_client = 3;
    });
    let mut c = h
        .connect_from(ListenerKind::Submission, "[2001:db8:5:6::1]:5000")
        .await;
    c.starttls().await;
    for user in ["alice", "bob", "nobody"] {
        c.cmd(&format!("AUTH PLAIN {}", plain(user, "guess")), "535 5.7.8")
            .await;
    }
    // The whole /64 is braked: no exchange at all, whatever the user.
    let mut c = h
        .connect_from(ListenerKind::Submission, "[2001:db8:5:6::99]:5001")
        .await;
    c.starttls().await;
    c.cmd(
        &format!("AUTH PLAIN {}", plain("bob", "bob-pw")),
        "454 4.7.0",
    )
    .await;
    c.cmd("AUTH LOGIN", "454 4.7.0").await;
    // The next /64 is another client.
    let mut c = h
        .connect_from(ListenerKind::Submission, "[2001:db8:5:7::1]:5000")
        .await;
    c.starttls().await;
    c.cmd(
        &format!("AUTH PLAIN {}", plain("bob", "bob-pw")),
        "235 2.7.0",
    )
    .await;
    let s = h.shared.stats.snapshot();
    assert_eq!((s.auth_failures, s.auth_successes), (3, 1));
}

#[tokio::test]
async fn auth_failure_is_delayed() {
    let h = harness(|c| c.limits.auth_failure_delay_secs = 0.3);
    let mut c = h.connect(ListenerKind::Submission).await;
    c.starttls().await;
    let t = std::time::Instant::now();
    c.cmd(&format!("AUTH PLAIN {}", plain("alice", "x")), "535")
        .await;
    assert!(t.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn per_user_rate_limits() {
    let h = harness(|c| {
        c.limits.messages_per_hour = 1;
        c.limits.recipients_per_hour = 3;
    });
    let mut c = h.authed("alice", "alice-pw").await;
    assert!(
        c.send_mail(
            "alice@example.com",
            &["a@example.net"],
            "From: alice@example.com\r\n\r\nx\r\n"
        )
        .await
        .starts_with("250")
    );
    c.cmd("MAIL FROM:<alice@example.com>", "450 4.7.1").await;
    let mut c = h.authed("bob", "bob-pw").await;
    c.cmd("MAIL FROM:<bob@example.com>", "250").await;
    for r in ["a", "b", "c"] {
        c.cmd(&format!("RCPT TO:<{r}@example.net>"), "250").await;
    }
    c.cmd("RCPT TO:<d@example.net>", "450 4.7.1").await;
}

#[tokio::test]
async fn utf8_addresses_need_smtputf8() {
    let h = harness(|c| {
        c.limits.messages_per_hour = 0;
    });
    let mut c = h.authed("alice", "alice-pw").await;
    c.cmd("MAIL FROM:<alice@example.com>", "250").await;
    c.cmd("RCPT TO:<jösé@bücher.example>", "553 5.6.7").await;
    c.cmd("RSET", "250").await;
    c.cmd("MAIL FROM:<alice@example.com> SMTPUTF8", "250").await;
    c.cmd("RCPT TO:<jösé@bücher.example>", "250").await;
}

#[tokio::test]
async fn command_timeout_and_shutdown() {
    let h = harness(|c| c.limits.command_timeout_secs = 0.2);
    let mut c = h.connect(ListenerKind::Submission).await;
    c.expect("421 4.4.2").await;
    c.expect_closed().await;

    let h = harness(|_| {});
    let mut c = h.connect(ListenerKind::Submission).await;
    c.cmd("EHLO client.test", "250").await;
    h.shutdown.send(true).unwrap();
    c.expect("421 4.3.2").await;
    c.expect_closed().await;
}

#[tokio::test]
async fn mail_loop_refused() {
    let h = harness(|_| {});
    let mut c = h.authed("alice", "alice-pw").await;
    let body = "Received: from x\r\n".repeat(31) + "\r\nbody\r\n";
    let r = c
        .send_mail("alice@example.com", &["a@example.net"], &body)
        .await;
    assert!(r.starts_with("554 5.4.6"), "{r}");
}

/// The stored message of a `250 ... queued as ID` reply.
fn stored(h: &Harness, reply: &str) -> String {
    assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
    let id = reply.trim_end().rsplit(' ').next().unwrap();
    String::from_utf8(h.shared.spool.read_body(id).unwrap()).unwrap()
}

#[tokio::test]
async fn message_id_and_date_added_only_when_missing() {
    let h = harness(|_| {});
    let mut c = h.authed("alice", "alice-pw").await;
    let mut ids = std::collections::HashSet::new();
    for _ in 0..3 {
        let r = c
            .send_mail(
                "alice@example.com",
                &["r@example.net"],
                "From: alice@example.com\r\nTo: r@example.net\r\nSubject: bare\r\n\r\nhi\r\n",
            )
            .await;
        let m = stored(&h, &r);
        let mid: Vec<&str> = m
            .lines()
            .filter(|l| l.starts_with("Message-ID: "))
            .collect();
        assert_eq!(mid.len(), 1, "{m}");
        assert!(ids.insert(mid[0].to_owned()), "Message-ID repeated: {m}");
        assert_eq!(
            m.lines().filter(|l| l.starts_with("Date: ")).count(),
            1,
            "{m}"
        );
        assert!(m.ends_with("\r\n\r\nhi\r\n"), "{m}");
    }
    // Present (in any case, folded or not): left alone, never doubled.
    let r = c
        .send_mail(
            "alice@example.com",
            &["r@example.net"],
            "From: alice@example.com\r\nmessage-id:\r\n <own@example.com>\r\nDATE: Thu, 1 Jan 2026 00:00:00 +0000\r\n\r\nhi\r\n",
        )
        .await;
    let m = stored(&h, &r);
    let after = m.split_once("\r\nFrom: ").unwrap().1;
    assert_eq!(
        after,
        "alice@example.com\r\nmessage-id:\r\n <own@example.com>\r\nDATE: Thu, 1 Jan 2026 00:00:00 +0000\r\n\r\nhi\r\n"
    );
    // No empty line (all headers): added at the end, nothing invented.
    let r = c
        .send_mail(
            "alice@example.com",
            &["r@example.net"],
            "From: alice@example.com\r\n",
        )
        .await;
    let m = stored(&h, &r);
    let after = m.split_once("\r\nFrom: ").unwrap().1;
    let lines: Vec<&str> = after.split_terminator("\r\n").collect();
    assert_eq!(lines.len(), 3, "{m}");
    assert!(
        lines[1].starts_with("Message-ID: <") && lines[2].starts_with("Date: "),
        "{m}"
    );
}

#[tokio::test]
async fn received_sanitises_ehlo_names() {
    let long = "x".repeat(300);
    for (ehlo, want) in [
        (
            "client.test",
            "Received: from client.test ([192.0.2.7])\r\n",
        ),
        (
            "[192.0.2.7]",
            "Received: from [192.0.2.7] ([192.0.2.7])\r\n",
        ),
        (
            "a;b",
            "Received: from [192.0.2.7] (invalid HELO \"a?b\")\r\n",
        ),
        (
            "(x)\\\"y\"",
            "Received: from [192.0.2.7] (invalid HELO \"?x???y?\")\r\n",
        ),
        (
            "caf\u{e9}.example",
            "Received: from [192.0.2.7] (invalid HELO \"caf?.example\")\r\n",
        ),
        (
            long.as_str(),
            &format!(
                "Received: from [192.0.2.7] (invalid HELO \"{}...\")\r\n",
                &long[..64]
            ),
        ),
    ] {
        let h = harness(|_| {});
        let mut c = h.connect(ListenerKind::Submission).await;
        c.cmd(&format!("EHLO {ehlo}"), "250").await;
        c.cmd("STARTTLS", "220").await;
        c.upgrade().await;
        c.cmd(&format!("EHLO {ehlo}"), "250").await;
        c.cmd(&format!("AUTH PLAIN {}", plain("alice", "alice-pw")), "235")
            .await;
        let r = c
            .send_mail(
                "alice@example.com",
                &["r@example.net"],
                "From: alice@example.com\r\n\r\nhi\r\n",
            )
            .await;
        let m = stored(&h, &r);
        assert!(m.starts_with(want), "EHLO {ehlo:?}: {m}");
        let received = m.split("\r\nFrom: ").next().unwrap();
        assert!(received.is_ascii(), "{received}");
        assert_eq!(
            received.matches(';').count(),
            1,
            "only the date separator: {received}"
        );
    }
    // Raw 8-bit that is not UTF-8 never gets as far as the header.
    let h = harness(|_| {});
    let mut c = h.connect(ListenerKind::Submission).await;
    c.send_bytes(b"EHLO caf\xe9\r\n").await;
    c.expect("501 5.5.4").await;
}

#[tokio::test]
async fn header_from_must_belong_to_user() {
    let mut h = harness(|c| {
        c.limits.messages_per_hour = 0;
        c.limits.max_errors = 100;
    });
    let mut c = h.authed("alice", "alice-pw").await;
    let send =
        |from_lines: &str| format!("{from_lines}To: r@example.net\r\nSubject: s\r\n\r\nbody\r\n");
    for (headers, why) in [
        (
            "From: Payments <billing@bank.example>\r\n",
            "From: header address billing@bank.example is not one user alice may send as",
        ),
        (
            "From: \"alice@example.com\" <billing@bank.example>\r\n",
            "From: header address billing@bank.example",
        ),
        (
            "From: billing@bank.example (alice@example.com)\r\n",
            "From: header address billing@bank.example",
        ),
        (
            "From: alice@example.com, billing@bank.example\r\n",
            "From: header address billing@bank.example",
        ),
        (
            "From: alice@example.com\r\nFrom: alice@example.com\r\n",
            "exactly one From: header, found 2",
        ),
        ("", "exactly one From: header, found 0"),
        (
            "FROM: alice@example.com\r\nfrom: billing@bank.example\r\n",
            "exactly one From: header, found 2",
        ),
        ("From: undisclosed:;\r\n", "From: header cannot be checked"),
        (
            "From: <alice@example.com\r\n",
            "From: header cannot be checked",
        ),
        (
            "From: alice@example.com\r\nSender: billing@bank.example\r\n",
            "Sender: header address billing@bank.example",
        ),
        (
            "From: alice@example.com\r\nSender: a@example.org\r\nSender: b@example.org\r\n",
            "at most one Sender:",
        ),
        // Folded: the fold must not hide the second address.
        (
            "From: alice@example.com,\r\n billing@bank.example\r\n",
            "From: header address billing@bank.example",
        ),
    ] {
        let r = c
            .send_mail("alice@example.com", &["r@example.net"], &send(headers))
            .await;
        assert!(r.starts_with("550 5.7.1 "), "{headers:?}: {r}");
        assert!(r.contains(why), "{headers:?}: {r}");
    }
    assert!(
        h.queued.try_recv().is_err(),
        "nothing refused may be queued"
    );
    assert!(h.shared.spool.scan().unwrap().is_empty());
    assert_eq!(h.shared.stats.snapshot().messages_rejected, 12);
    // What alice may send as: her address (any case, with a display name),
    // her domain, a Sender: of her own; and the session went on.
    for headers in [
        "From: Alice <Alice@Example.COM>\r\n",
        "From: \"Smith, Alice\" <alice@example.com>\r\n",
        "From: anyone@example.org, other@example.org\r\nSender: alice@example.com\r\n",
    ] {
        let r = c
            .send_mail("alice@example.com", &["r@example.net"], &send(headers))
            .await;
        assert!(r.starts_with("250 2.0.0"), "{headers:?}: {r}");
    }
    // A role account with header_from = "any": the header is free, the
    // envelope still bound, and one From: still required.
    let mut c = h.authed("list", "list-pw").await;
    let r = c
        .send_mail(
            "list@example.com",
            &["r@example.net"],
            &send("From: Someone <someone@elsewhere.example>\r\n"),
        )
        .await;
    assert!(r.starts_with("250 2.0.0"), "{r}");
    let r = c
        .send_mail("list@example.com", &["r@example.net"], &send(""))
        .await;
    assert!(
        r.starts_with("550 5.7.1") && r.contains("exactly one From:"),
        "{r}"
    );
    c.cmd("MAIL FROM:<someone@elsewhere.example>", "553 5.7.1")
        .await;
}

/// Sends `bytes` one at a time, `gap` apart, until the server closes or
/// `max` elapses; returns what the server said and when it closed.
async fn drip(c: &mut Client, bytes: &[u8], gap: Duration, max: Duration) -> (String, Duration) {
    let t = std::time::Instant::now();
    for b in bytes.iter().cycle() {
        if t.elapsed() > max {
            panic!("session still open after {max:?}");
        }
        if c.try_send_bytes(std::slice::from_ref(b)).await.is_err() {
            break;
        }
        if let Some(r) = c.reply_within(gap).await {
            return (r, t.elapsed());
        }
    }
    (String::new(), t.elapsed())
}

#[tokio::test]
async fn preauth_idle_drip_and_noop_are_all_cut_at_the_preauth_deadline() {
    let h = harness(|c| c.limits.preauth_timeout_secs = 0.6);
    // Idle after EHLO.
    let mut c = h.connect(ListenerKind::Submission).await;
    let t = std::time::Instant::now();
    c.cmd("EHLO client.test", "250").await;
    c.expect("421 4.7.0 Authentication not completed in time")
        .await;
    c.expect_closed().await;
    assert!(
        t.elapsed() >= Duration::from_millis(550),
        "{:?}",
        t.elapsed()
    );
    // Busy, but never authenticating: NOOPs every 100 ms.
    let mut c = h.connect(ListenerKind::Submission).await;
    let t = std::time::Instant::now();
    loop {
        // The 421 may come while we sleep; the send then fails and the
        // reply is already waiting.
        let _ = c.try_send_bytes(b"NOOP\r\n").await;
        let r = c.reply().await;
        if r.starts_with("421") {
            assert!(
                r.starts_with("421 4.7.0 Authentication not completed"),
                "{r}"
            );
            break;
        }
        assert!(r.starts_with("250"), "{r}");
        assert!(t.elapsed() < Duration::from_secs(3), "still open");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
    // One byte every 100 ms of a command that never ends.
    let mut c = h.connect(ListenerKind::Submission).await;
    let (r, took) = drip(
        &mut c,
        b"EHLO slow.example",
        Duration::from_millis(100),
        Duration::from_secs(3),
    )
    .await;
    assert!(
        r.starts_with("421 4.7.0 Authentication not completed"),
        "{r}"
    );
    assert!(took < Duration::from_millis(1500), "{took:?}");
}

#[tokio::test]
async fn a_command_trickled_byte_by_byte_is_cut_at_the_line_deadline() {
    let h = harness(|c| c.limits.command_timeout_secs = 0.5);
    let mut c = h.authed("alice", "alice-pw").await;
    // Each byte arrives well within the old per-read timeout.
    let (r, took) = drip(
        &mut c,
        b"NOOP",
        Duration::from_millis(100),
        Duration::from_secs(3),
    )
    .await;
    assert!(r.starts_with("421 4.4.2 Timeout"), "{r}");
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_millis(1500),
        "{took:?}"
    );
}

#[tokio::test]
async fn data_trickled_byte_by_byte_is_cut_by_the_minimum_rate() {
    let mut h = harness(|c| {
        c.limits.data_timeout_secs = 0.5;
        c.limits.data_min_bytes_per_sec = 1000;
    });
    let mut c = h.authed("alice", "alice-pw").await;
    c.cmd("MAIL FROM:<alice@example.com>", "250").await;
    c.cmd("RCPT TO:<r@example.net>", "250").await;
    c.cmd("DATA", "354").await;
    // 10 bytes/s, never idle for long: only the rate can stop it.
    let (r, took) = drip(
        &mut c,
        b"From: alice@example.com\r\n\r\nslow body line\r\n",
        Duration::from_millis(100),
        Duration::from_secs(4),
    )
    .await;
    assert!(r.starts_with("421 4.4.2 Message data too slow"), "{r}");
    assert!(took < Duration::from_millis(1500), "{took:?}");
    assert!(h.queued.try_recv().is_err());
    // A client that sends at a decent rate gets far more than the grace
    // period: 60 KB in 3 x 20 KB chunks 300 ms apart takes ~0.6 s of a
    // 0.5 s grace, but 20 KB buys 20 s.
    let mut c = h.authed("alice", "alice-pw").await;
    c.cmd("MAIL FROM:<alice@example.com>", "250").await;
    c.cmd("RCPT TO:<r@example.net>", "250").await;
    c.cmd("DATA", "354").await;
    c.send("From: alice@example.com\r\n\r\n").await;
    let chunk = format!("{}\r\n", "y".repeat(998)).repeat(20);
    for _ in 0..3 {
        c.send(&chunk).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    c.send(".\r\n").await;
    c.expect("250 2.0.0 Ok: queued").await;
}

#[tokio::test]
async fn session_lifetime_ends_even_a_busy_authenticated_session() {
    let h = harness(|c| {
        c.limits.session_lifetime_secs = 0.8;
        c.limits.max_junk_commands = 1000;
    });
    let mut c = h.authed("alice", "alice-pw").await;
    let t = std::time::Instant::now();
    loop {
        // The 421 may come while we sleep; the send then fails and the
        // reply is already waiting.
        let _ = c.try_send_bytes(b"NOOP\r\n").await;
        let r = c.reply().await;
        if r.starts_with("421") {
            assert!(r.starts_with("421 4.4.2 Session time limit reached"), "{r}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(3), "still open");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.expect_closed().await;
}

#[tokio::test]
async fn junk_commands_are_capped_between_messages() {
    let h = harness(|c| c.limits.max_junk_commands = 5);
    let mut c = h.authed("alice", "alice-pw").await;
    // The two EHLOs of authed() count: 3 more are allowed.
    for cmd in ["NOOP", "RSET", "VRFY x"] {
        c.cmd(cmd, "25").await;
    }
    // An accepted message resets the count.
    let r = c
        .send_mail(
            "alice@example.com",
            &["r@example.net"],
            "From: alice@example.com\r\n\r\nx\r\n",
        )
        .await;
    assert!(r.starts_with("250 2.0.0"), "{r}");
    for _ in 0..5 {
        c.cmd("NOOP", "250").await;
    }
    c.cmd("NOOP", "421 4.7.0 Too many commands without mail")
        .await;
    c.expect_closed().await;
}

/// Temp files left in the spool's queue directory.
fn temp_files(h: &Harness) -> Vec<String> {
    std::fs::read_dir(h.shared.spool.queue_dir())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(".tmp-"))
        .collect()
}

#[tokio::test]
async fn large_body_is_streamed_to_the_spool_byte_exact() {
    let h = harness(|_| {});
    let mut c = h.authed("alice", "alice-pw").await;
    c.cmd("MAIL FROM:<alice@example.com>", "250").await;
    c.cmd("RCPT TO:<r@example.net>", "250").await;
    c.cmd("DATA", "354").await;
    let head = "From: alice@example.com\r\nDate: Thu, 1 Jan 2026 00:00:00 +0000\r\nMessage-ID: <big@example.com>\r\n\r\n";
    c.send(head).await;
    // 3 MiB in 64 KiB pieces, with dot-stuffed lines in between.
    let mut expected = head.to_owned();
    let line = format!("{}\r\n", "b".repeat(998));
    for i in 0..48 {
        let piece = line.repeat(64) + &format!("..dot {i}\r\n");
        expected.push_str(&line.repeat(64));
        expected.push_str(&format!(".dot {i}\r\n"));
        c.send(&piece).await;
        if i == 4 {
            // Mid-message the body is on disk, not in memory.
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert_eq!(temp_files(&h).len(), 1, "{:?}", temp_files(&h));
        }
    }
    c.send(".\r\n").await;
    let r = c.expect("250 2.0.0 Ok: queued as ").await;
    let m = stored(&h, &r);
    let after = m.split_once("\r\nFrom: ").unwrap().1;
    assert_eq!(after.len() + "From: ".len(), expected.len());
    assert!(format!("From: {after}") == expected, "body altered");
    let rec = h.shared.spool.scan().unwrap().pop().unwrap();
    assert_eq!(rec.size, m.len() as u64);
    assert!(temp_files(&h).is_empty(), "{:?}", temp_files(&h));
}

#[tokio::test]
async fn refused_or_abandoned_data_leaves_no_file_behind() {
    let h = harness(|c| {
        c.limits.max_message_bytes = 300_000;
        c.limits.max_errors = 100;
        c.limits.data_timeout_secs = 0.3;
    });
    let mut c = h.authed("alice", "alice-pw").await;
    let big = format!("{}\r\n", "z".repeat(900)).repeat(400);
    let huge_header = format!("X-Big: {}\r\n", "h".repeat(900)).repeat(150);
    for (body, want) in [
        (
            format!("From: alice@example.com\r\n\r\n{big}"),
            "552 5.3.4 Message size",
        ),
        (
            format!("From: billing@bank.example\r\n\r\n{}", "x\r\n".repeat(1000)),
            "550 5.7.1",
        ),
        (
            format!("{huge_header}From: alice@example.com\r\n\r\nx\r\n"),
            "552 5.3.4 Message header section too large",
        ),
        (
            format!("From: alice@example.com\r\n\r\n{}\r\n", "l".repeat(2000)),
            "550 5.6.0",
        ),
    ] {
        let r = c
            .send_mail("alice@example.com", &["r@example.net"], &body)
            .await;
        assert!(r.starts_with(want), "{r}");
        assert!(
            temp_files(&h).is_empty(),
            "after {want}: {:?}",
            temp_files(&h)
        );
    }
    // Abandoned mid-body: the timeout, and a client that just goes away.
    c.cmd("MAIL FROM:<alice@example.com>", "250").await;
    c.cmd("RCPT TO:<r@example.net>", "250").await;
    c.cmd("DATA", "354").await;
    c.send("From: alice@example.com\r\n\r\n").await;
    c.send(&format!("{}\r\n", "w".repeat(998)).repeat(80)).await;
    c.expect("421 4.4.2").await;
    c.expect_closed().await;
    assert!(temp_files(&h).is_empty(), "{:?}", temp_files(&h));
    let mut c = h.authed("alice", "alice-pw").await;
    c.cmd("MAIL FROM:<alice@example.com>", "250").await;
    c.cmd("RCPT TO:<r@example.net>", "250").await;
    c.cmd("DATA", "354").await;
    // Past spool::SPILL_AT, so the body is on disk when the client goes.
    c.send("From: alice@example.com\r\n\r\n").await;
    c.send(&format!("{}\r\n", "w".repeat(998)).repeat(80)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(temp_files(&h).len(), 1);
    drop(c);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(temp_files(&h).is_empty(), "{:?}", temp_files(&h));
    assert!(h.shared.spool.scan().unwrap().is_empty());
}

#[tokio::test]
async fn a_client_that_never_reads_cannot_hold_a_session() {
    let h = harness(|c| {
        c.limits.command_timeout_secs = 0.3;
        c.limits.max_junk_commands = 1_000_000;
    });
    let (mut client, server) = tokio::io::duplex(4096);
    let sess = Session::new(
        server,
        h.shared.clone(),
        ListenerKind::Submission,
        PEER.parse().unwrap(),
        "127.0.0.1:587".parse().unwrap(),
        false,
    );
    let task = tokio::spawn(sess.run());
    // Commands forever, replies never read: the replies fill the pipe and
    // the session's write blocks.
    let writer = tokio::spawn(async move {
        let lines = b"NOOP\r\n".repeat(1000);
        while client.write_all(&lines).await.is_ok() {}
    });
    let ended = tokio::time::timeout(Duration::from_secs(5), task).await;
    assert!(ended.is_ok(), "a blocked write held the session");
    writer.abort();
}

/// The record of a `250 ... queued as ID` reply.
fn stored_record(h: &Harness, reply: &str) -> QueueRecord {
    assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
    let id = reply.trim_end().rsplit(' ').next().unwrap();
    h.shared.spool.read_record(id).unwrap()
}

#[tokio::test]
async fn dkim_signs_for_the_from_domain_the_user_owns() {
    use crate::dkim::keys::{Algorithm, generate};
    let h = harness(|c| c.limits.messages_per_hour = 0);
    let dir = h.shared.config.dkim_dir.clone();
    generate(&dir, "example.com", Algorithm::Ed25519, Some("ed")).unwrap();
    assert_eq!(h.shared.dkim.reload().unwrap(), 1);
    let msg = |from: &str, body: &str| {
        format!("From: {from}\r\nTo: r@example.net\r\nSubject: s\r\n\r\n{body}")
    };
    let mut c = h.authed("alice", "alice-pw").await;

    // Her own From: signed for its domain, after Message-ID and Date were
    // added (both in h=).
    let r = c
        .send_mail(
            "alice@example.com",
            &["r@example.net"],
            &msg("alice@example.com", "hi\r\n"),
        )
        .await;
    let rec = stored_record(&h, &r);
    let sig = rec.dkim_signature.clone().expect("signed");
    assert!(
        sig.starts_with(
            "DKIM-Signature: v=1; a=ed25519-sha256; s=ed; d=example.com; c=relaxed/relaxed;"
        ),
        "{sig}"
    );
    let h_tag: String = sig
        .split("h=")
        .nth(1)
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    for f in ["Date", "Message-ID", "Subject", "To", "From"] {
        assert!(h_tag.split(':').any(|x| x == f), "{f} not in h={h_tag}");
    }
    assert_eq!(
        h_tag.split(':').filter(|x| *x == "From").count(),
        2,
        "From oversigned: {h_tag}"
    );
    let body_len = h.shared.spool.read_body(&rec.id).unwrap().len() as u64;
    assert_eq!(rec.size, body_len + sig.len() as u64);
    // `queue show` gives the message as sent: signature first.
    let (_, shown) =
        crate::queue::show(h.shared.spool.queue_dir().parent().unwrap(), &rec.id).unwrap();
    assert!(shown.starts_with(sig.as_bytes()));

    // No key for example.org: unsigned, no error.
    let r = c
        .send_mail(
            "alice@example.com",
            &["r@example.net"],
            &msg("a@example.org", "hi\r\n"),
        )
        .await;
    assert_eq!(stored_record(&h, &r).dkim_signature, None);

    // A reload brings example.org's key in; a body far past SPILL_AT
    // (streamed to disk) is signed as it streams.
    generate(&dir, "example.org", Algorithm::Rsa, Some("rsa")).unwrap();
    assert_eq!(h.shared.dkim.reload().unwrap(), 2);
    let big = "x".repeat(900) + "\r\n";
    let r = c
        .send_mail(
            "alice@example.com",
            &["r@example.net"],
            &msg("a@example.org", &big.repeat(300)),
        )
        .await;
    let rec = stored_record(&h, &r);
    assert!(rec.size > 256 * 1024);
    let sig = rec.dkim_signature.expect("signed");
    assert!(sig.contains("a=rsa-sha256; s=rsa; d=example.org;"), "{sig}");
    assert_eq!(h.shared.stats.snapshot().messages_signed, 2);

    // A `header_from = "any"` user writing example.org's From: gets the
    // envelope's domain (list@example.com), never example.org's key.
    let mut l = h.authed("list", "list-pw").await;
    let r = l
        .send_mail(
            "list@example.com",
            &["r@example.net"],
            &msg("boss@example.org", "hi\r\n"),
        )
        .await;
    let sig = stored_record(&h, &r).dkim_signature.expect("signed");
    assert!(sig.contains("; d=example.com;"), "{sig}");
    // Its own From: is its own domain, as for anyone.
    let r = l
        .send_mail(
            "list@example.com",
            &["r@example.net"],
            &msg("list@example.com", "hi\r\n"),
        )
        .await;
    let sig = stored_record(&h, &r).dkim_signature.expect("signed");
    assert!(sig.contains("; d=example.com;"), "{sig}");
}
