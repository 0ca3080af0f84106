//! Crash safety: the relay runs as its own process (relay-lab), concurrent
//! clients submit as fast as they can, the process is killed with SIGKILL
//! mid-load and restarted on the same spool. Every message that got a 250
//! must reach the sink (at-least-once: duplicates are allowed, loss is not).

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Client, Lab, Sink, free_port, spawn_relay, stuff};

/// One client: logs in once, then sends messages until told to stop or the
/// connection dies. Records the Message-IDs that got a 250.
async fn client_loop(
    addr: SocketAddr,
    pem: String,
    worker: usize,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<String>>>,
) {
    let mut c = Client::login_587(addr, &pem, "alice", "alice-pw").await;
    for n in 0.. {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let id = format!("crash-{worker}-{n}");
        let ok = async {
            c.try_cmd("MAIL FROM:<alice@example.com>")
                .await
                .ok()?
                .starts_with("250")
                .then_some(())?;
            c.try_cmd("RCPT TO:<r@example.net>")
                .await
                .ok()?
                .starts_with("250")
                .then_some(())?;
            c.try_cmd("DATA")
                .await
                .ok()?
                .starts_with("354")
                .then_some(())?;
            let msg =
                format!("From: alice@example.com\r\nMessage-ID: <{id}@example.com>\r\nSubject: {id}\r\n\r\nend {id}\r\n");
            c.send_bytes(stuff(&msg).as_bytes()).await.ok()?;
            c.try_reply().await.ok()?.starts_with("250 ").then_some(())
        }
        .await;
        match ok {
            Some(()) => acked.lock().unwrap().push(id),
            None => return,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_load_loses_no_acknowledged_message() {
    let lab = Lab::new();
    let sink = Sink::start(&lab.dir.path().join("sink"), free_port());
    let mut cfg = lab.config(Some(sink.port));
    cfg.limits.messages_per_hour = 0;
    cfg.limits.recipients_per_hour = 0;
    cfg.submissions_listen = None;
    // One delivery slot, so a backlog is on disk when the kill lands.
    cfg.delivery_workers = 1;
    let cfg_path = lab.dir.path().join("relay.toml");
    std::fs::write(&cfg_path, toml::to_string(&cfg).unwrap()).unwrap();

    let (mut child, addr) = spawn_relay(&cfg_path).await;
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..8)
        .map(|w| {
            tokio::spawn(client_loop(
                addr,
                lab.cert_pem(),
                w,
                stop.clone(),
                acked.clone(),
            ))
        })
        .collect();
    // Let the load build up, then kill while clients are mid-transaction.
    let start = Instant::now();
    while acked.lock().unwrap().len() < 150 && start.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child.start_kill().unwrap();
    let status = child.wait().await.unwrap();
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    let acked: Vec<String> = acked.lock().unwrap().clone();
    assert!(!status.success(), "relay-lab must have died from SIGKILL");
    assert!(
        acked.len() >= 20,
        "load too small to mean anything: {}",
        acked.len()
    );
    let delivered_before = sink.messages().len();

    let (_child, _addr) = spawn_relay(&cfg_path).await;
    let wanted: HashSet<&str> = acked.iter().map(String::as_str).collect();
    let msgs = sink
        .wait_for("every acknowledged message", Duration::from_secs(90), |m| {
            let got: HashSet<String> = m
                .iter()
                .filter_map(|d| {
                    d.split("Subject: ")
                        .nth(1)
                        .and_then(|s| s.lines().next())
                        .map(str::to_owned)
                })
                .filter(|id| m.iter().any(|d| d.contains(&format!("end {id}\n"))))
                .collect();
            wanted.iter().all(|id| got.contains(*id))
        })
        .await;
    eprintln!(
        "crash test: {} acknowledged, {} delivered before the kill, {} dumps in total after restart",
        acked.len(),
        delivered_before,
        msgs.len()
    );
}
