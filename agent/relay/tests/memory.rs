//! Memory per session while many clients send large messages slowly (issue
//! 12: 16 sessions holding 24 MiB of unfinished DATA each took the agent
//! from 199 MiB to 926 MiB, and 706 MiB stayed after they closed). The relay
//! runs as its own process (`relay-lab`) so its RSS is its own.
//!
//! Defaults: 40 sessions x 8 MiB, enough to fail loudly if bodies sat in
//! memory (320 MiB). The issue's full case is
//! `SMTPGATE_RSS_SESSIONS=100 SMTPGATE_RSS_MIB=25 cargo test -p smtpgate-relay --test memory -- --nocapture`.
//! Every message is DKIM-signed with an Ed25519 and an RSA key while it
//! streams (`SMTPGATE_RSS_DKIM=0` sends them unsigned, for comparison).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Client, Lab};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_slow_large_messages_keep_relay_memory_flat() {
    let sessions = env_or("SMTPGATE_RSS_SESSIONS", 40);
    let mib = env_or("SMTPGATE_RSS_MIB", 8);
    let dkim = env_or("SMTPGATE_RSS_DKIM", 1) != 0;
    let lab = Lab::new();
    let mut cfg = lab.config(None);
    if dkim {
        use smtpgate_relay::dkim::keys::{Algorithm, generate};
        generate(&cfg.dkim_dir, "example.com", Algorithm::Ed25519, Some("e")).unwrap();
        generate(&cfg.dkim_dir, "example.com", Algorithm::Rsa, Some("r")).unwrap();
    }
    cfg.limits.messages_per_hour = 0;
    cfg.limits.max_sessions = 1000;
    cfg.limits.max_sessions_per_client = 1000;
    cfg.limits.max_message_bytes = (mib + 1) << 20;
    // Not None: a None is left out of the TOML, and relay-lab would then
    // bind the default [::]:465.
    cfg.submissions_listen = Some("127.0.0.1:0".parse().unwrap());
    // Nowhere to deliver to, once each: delivery reads a whole body to
    // send it (lettre takes a slice), and only sessions are measured here.
    cfg.upstream = Some(smtpgate_relay::UpstreamConfig {
        host: "127.0.0.1".into(),
        port: common::free_port(),
        tls: smtpgate_relay::UpstreamTls::None,
        username: None,
        password_file: None,
        ca_file: None,
    });
    cfg.delivery_workers = 1;
    cfg.retry.initial_backoff_secs = 3600.0;
    cfg.retry.max_backoff_secs = 3600.0;
    let cfg_path = lab.dir.path().join("relay.toml");
    std::fs::write(&cfg_path, toml::to_string(&cfg).unwrap()).unwrap();
    let (child, addr) = common::spawn_relay(&cfg_path).await;
    let pid = child.id().unwrap();
    let pem = lab.cert_pem();
    let base = common::proc_kib(pid, "VmRSS");

    // 64 KiB pieces of 998-octet lines; `mib` MiB per message, sent in two
    // halves with a pause between, so every session is mid-DATA at once.
    let piece: Arc<String> = Arc::new(format!("{}\r\n", "m".repeat(998)).repeat(64));
    let pieces = (mib << 20).div_ceil(piece.len());
    let halfway = Arc::new(tokio::sync::Barrier::new(sessions + 1));
    let resume = Arc::new(tokio::sync::Barrier::new(sessions + 1));
    let mut tasks = Vec::new();
    for n in 0..sessions {
        let (pem, piece, halfway, resume) =
            (pem.clone(), piece.clone(), halfway.clone(), resume.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = Client::login_587(addr, &pem, "alice", "alice-pw").await;
            c.cmd("MAIL FROM:<alice@example.com>", "250").await;
            c.cmd("RCPT TO:<r@example.net>", "250").await;
            c.cmd("DATA", "354").await;
            c.send(&format!(
                "From: alice@example.com\r\nSubject: big {n}\r\n\r\n"
            ))
            .await;
            for i in 0..pieces {
                if i == pieces / 2 {
                    halfway.wait().await;
                    resume.wait().await;
                }
                c.send(&piece).await;
                // Slowly: a pause every 1 MiB.
                if i % 16 == 15 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            c.send(".\r\n").await;
            c.expect("250 2.0.0 Ok: queued").await;
        }));
    }
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        tokio::spawn(async move {
            let mut peak = 0;
            while !done.load(Ordering::Relaxed) {
                peak = peak.max(common::proc_kib(pid, "VmRSS"));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            peak
        })
    };
    let t = Instant::now();
    halfway.wait().await;
    // Everyone holds half a message now; let the relay catch up on what is
    // in flight.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mid = common::proc_kib(pid, "VmRSS");
    resume.wait().await;
    for t in tasks {
        t.await.unwrap();
    }
    done.store(true, Ordering::Relaxed);
    let peak = sampler.await.unwrap();
    let elapsed = t.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = common::proc_kib(pid, "VmRSS");
    let queued = smtpgate_relay::queue::list(&lab.spool).unwrap();
    assert_eq!(queued.len(), sessions, "every message on disk");
    assert!(queued.iter().all(|r| r.size > (mib as u64) << 20));
    assert!(
        queued.iter().all(|r| r
            .dkim_signature
            .as_ref()
            .map(|s| s.matches("DKIM-Signature:").count())
            == dkim.then_some(2)),
        "every message signed by both keys (or, with SMTPGATE_RSS_DKIM=0, none)"
    );
    let per_session = (mid.saturating_sub(base)) as f64 / sessions as f64;
    eprintln!(
        "{sessions} sessions x {mib} MiB (DKIM {dkim}) in {elapsed:.1?}: relay RSS baseline {:.1} MiB, \
         all mid-DATA {:.1} MiB ({per_session:.0} KiB per session), peak {:.1} MiB, after {:.1} MiB",
        base as f64 / 1024.0,
        mid as f64 / 1024.0,
        peak as f64 / 1024.0,
        after as f64 / 1024.0
    );
    // Half of every message was in: bodies in memory would show as
    // sessions x mib/2 MiB. Allow 256 KiB per session (TLS, buffers, the
    // header section) and 40 MiB for everything else, including one
    // delivery attempt holding one body.
    assert!(
        per_session < 256.0,
        "{per_session:.0} KiB per session mid-DATA"
    );
    assert!(
        peak - base < (sessions as u64) * 256 + 40 * 1024 + ((mib as u64) << 10),
        "peak {peak} KiB from {base} KiB"
    );
    drop(child);
}
