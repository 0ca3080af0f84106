//! Load generator: N concurrent sessions, each STARTTLS + AUTH PLAIN, then M
//! messages; reports messages/s and p50/p99 per-message latency (MAIL to
//! the final 250, i.e. including the durable spool write).
//!
//! Lab mode (default) starts everything on loopback: a relay in this process
//! with a temp spool, and /usr/sbin/smtp-sink as its smarthost.
//!   cargo run --release -p smtpgate-relay --example loadgen -- --sessions 16 --messages 50 --size 2000
//! `--dkim none|ed25519|rsa|both` (lab mode) gives the sender's domain keys,
//! so every message is signed.
//! Against a running relay (e.g. relay-lab):
//!   ... --example loadgen -- --addr 127.0.0.1:587 --ca cert.pem --user alice --pass pw --from alice@example.com
//! Only loopback targets make sense here; the tool refuses anything else.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

struct Opts {
    addr: Option<SocketAddr>,
    ca: Option<String>,
    user: String,
    pass: String,
    from: String,
    to: String,
    sessions: usize,
    messages: usize,
    size: usize,
    /// Lab mode: DKIM keys for the sender's domain ("none", "ed25519",
    /// "rsa" or "both"), to measure what signing costs.
    dkim: String,
}

fn opts() -> Opts {
    let mut o = Opts {
        addr: None,
        ca: None,
        user: "load".into(),
        pass: "load-pw".into(),
        from: "load@example.com".into(),
        to: "sink@example.net".into(),
        sessions: 8,
        messages: 50,
        size: 2000,
        dkim: "none".into(),
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let v = pair.get(1).cloned().unwrap_or_default();
        match pair[0].as_str() {
            "--addr" => o.addr = Some(v.parse().expect("--addr ip:port")),
            "--ca" => o.ca = Some(v),
            "--user" => o.user = v,
            "--pass" => o.pass = v,
            "--from" => o.from = v,
            "--to" => o.to = v,
            "--sessions" => o.sessions = v.parse().expect("--sessions N"),
            "--messages" => o.messages = v.parse().expect("--messages N"),
            "--size" => o.size = v.parse().expect("--size BYTES"),
            "--dkim" => o.dkim = v,
            other => panic!("unknown option {other}"),
        }
    }
    if let Some(a) = o.addr {
        assert!(
            a.ip().is_loopback(),
            "loadgen only targets loopback addresses"
        );
    }
    o
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

async fn reply<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> String {
    let mut all = String::new();
    loop {
        let mut line = String::new();
        assert!(
            r.read_line(&mut line).await.unwrap() > 0,
            "connection closed"
        );
        all.push_str(&line);
        if line.len() >= 4 && line.as_bytes()[3] == b' ' {
            return all;
        }
    }
}

async fn cmd<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut BufReader<S>,
    line: &str,
    want: &str,
) {
    s.get_mut()
        .write_all(format!("{line}\r\n").as_bytes())
        .await
        .unwrap();
    let r = reply(s).await;
    assert!(r.starts_with(want), "{line}: {r}");
}

async fn session(
    o: Arc<Opts>,
    addr: SocketAddr,
    connector: tokio_rustls::TlsConnector,
    id: usize,
) -> Vec<Duration> {
    let mut plain = BufReader::new(TcpStream::connect(addr).await.unwrap());
    reply(&mut plain).await;
    cmd(&mut plain, "EHLO loadgen", "250").await;
    cmd(&mut plain, "STARTTLS", "220").await;
    let tls: Tls = connector
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            plain.into_inner(),
        )
        .await
        .unwrap();
    let mut s = BufReader::new(tls);
    cmd(&mut s, "EHLO loadgen", "250").await;
    let auth =
        base64::engine::general_purpose::STANDARD.encode(format!("\0{}\0{}", o.user, o.pass));
    cmd(&mut s, &format!("AUTH PLAIN {auth}"), "235").await;
    let filler = "x".repeat(70);
    let mut lat = Vec::with_capacity(o.messages);
    for n in 0..o.messages {
        let t = Instant::now();
        let mut body = format!(
            "From: {}\r\nMessage-ID: <load-{id}-{n}@example.com>\r\nSubject: load {id} {n}\r\n\r\n",
            o.from
        );
        while body.len() < o.size {
            body.push_str(&filler);
            body.push_str("\r\n");
        }
        // Pipelined envelope (PIPELINING is advertised).
        let w = format!("MAIL FROM:<{}>\r\nRCPT TO:<{}>\r\nDATA\r\n", o.from, o.to);
        s.get_mut().write_all(w.as_bytes()).await.unwrap();
        for want in ["250", "250", "354"] {
            let r = reply(&mut s).await;
            assert!(r.starts_with(want), "{r}");
        }
        s.get_mut()
            .write_all(format!("{body}.\r\n").as_bytes())
            .await
            .unwrap();
        let r = reply(&mut s).await;
        assert!(r.starts_with("250 "), "{r}");
        lat.push(t.elapsed());
    }
    let _ = s.get_mut().write_all(b"QUIT\r\n").await;
    lat
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "index math on small counts"
    )]
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[tokio::main]
async fn main() {
    let o = Arc::new(opts());
    let mut _lab: Option<(
        tempfile::TempDir,
        std::process::Child,
        smtpgate_relay::RelayHandle,
    )> = None;
    let (addr, ca_pem) = if let Some(a) = o.addr {
        let ca = std::fs::read_to_string(o.ca.as_ref().expect("--ca with --addr")).unwrap();
        (a, ca)
    } else {
        assert!(
            std::path::Path::new("/usr/sbin/smtp-sink").exists(),
            "lab mode needs /usr/sbin/smtp-sink (postfix)"
        );
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = smtpgate_relay::write_lab_cert(dir.path(), &["localhost"]).unwrap();
        let users = dir.path().join("users.toml");
        smtpgate_relay::users::user_add(&users, &o.user, &o.pass, vec![o.from.clone()]).unwrap();
        let sink_port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // Sink without dumping: we measure the relay, not smtp-sink's disk.
        let root = std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
        });
        let mut sink_args = if root {
            vec!["-u".to_owned(), "root".to_owned()]
        } else {
            vec![]
        };
        sink_args.extend([format!("127.0.0.1:{sink_port}"), "1000".to_owned()]);
        let sink = std::process::Command::new("/usr/sbin/smtp-sink")
            .args(&sink_args)
            .spawn()
            .unwrap();
        let dkim_dir = dir.path().join("dkim");
        let domain = o.from.rsplit('@').next().unwrap_or_default().to_owned();
        {
            use smtpgate_relay::dkim::keys::{Algorithm, generate};
            let algs: &[Algorithm] = match o.dkim.as_str() {
                "none" => &[],
                "ed25519" => &[Algorithm::Ed25519],
                "rsa" => &[Algorithm::Rsa],
                "both" => &[Algorithm::Ed25519, Algorithm::Rsa],
                other => panic!("--dkim {other}: none, ed25519, rsa or both"),
            };
            for (i, a) in algs.iter().enumerate() {
                generate(&dkim_dir, &domain, *a, Some(&format!("load{i}"))).unwrap();
            }
        }
        let mut cfg = smtpgate_relay::RelayConfig {
            hostname: "relay.lab".into(),
            dkim_dir,
            submission_listen: Some("127.0.0.1:0".parse().unwrap()),
            submissions_listen: None,
            tls_cert: cert.clone(),
            tls_key: key,
            users_file: users,
            spool_dir: dir.path().join("spool"),
            upstream: Some(smtpgate_relay::UpstreamConfig {
                host: "127.0.0.1".into(),
                port: sink_port,
                tls: smtpgate_relay::UpstreamTls::None,
                username: None,
                password_file: None,
                ca_file: None,
            }),
            ..smtpgate_relay::RelayConfig::default()
        };
        cfg.limits.messages_per_hour = 0;
        cfg.limits.recipients_per_hour = 0;
        cfg.limits.max_sessions_per_client = cfg.limits.max_sessions;
        let relay = smtpgate_relay::Relay::start(cfg, smtpgate_relay::Listeners::default())
            .await
            .unwrap();
        let addr = relay.addrs().submission.unwrap();
        let pem = std::fs::read_to_string(&cert).unwrap();
        _lab = Some((dir, sink, relay));
        (addr, pem)
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));

    let start = Instant::now();
    let tasks: Vec<_> = (0..o.sessions)
        .map(|i| tokio::spawn(session(o.clone(), addr, connector.clone(), i)))
        .collect();
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let elapsed = start.elapsed();
    lat.sort();
    #[expect(clippy::cast_precision_loss, reason = "rates of small counts")]
    let rate = lat.len() as f64 / elapsed.as_secs_f64();
    println!(
        "sessions={} messages={} size={}B elapsed={:.2}s rate={:.1} msg/s p50={:.2}ms p99={:.2}ms max={:.2}ms",
        o.sessions,
        lat.len(),
        o.size,
        elapsed.as_secs_f64(),
        rate,
        pct(&lat, 0.5).as_secs_f64() * 1e3,
        pct(&lat, 0.99).as_secs_f64() * 1e3,
        lat.last().unwrap().as_secs_f64() * 1e3,
    );
    if let Some((_dir, mut sink, relay)) = _lab.take() {
        let st = relay.stats().snapshot();
        #[expect(clippy::cast_precision_loss, reason = "ratio of small counts")]
        let mean = st.spool_batched_messages as f64 / st.spool_batches.max(1) as f64;
        println!(
            "spool group commit: {} messages in {} directory syncs (mean batch {mean:.2})",
            st.spool_batched_messages, st.spool_batches
        );
        relay.shutdown_with(Duration::from_secs(2)).await;
        let _ = sink.kill();
        let _ = sink.wait();
    }
}
