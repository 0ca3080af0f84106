//! Rendering synthetic snapshots, and the HTTP endpoint on a real socket.

use std::{collections::BTreeSet, net::IpAddr, sync::Arc, time::Duration};

use prometheus::{Encoder as _, TextEncoder};
use smtpgate_common::{Family, Reason, Verdict};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::{
    AttachmentState, DnsNameSnapshot, RelaySnapshot, Snapshot, SnapshotFn, families,
    names::{self, RELAY_METRICS},
    registry, serve, serve_with,
};
use crate::datapath::CounterRow;

/// Every combination at zero, as the agent's snapshot has it at start.
fn zero_rows() -> Vec<CounterRow> {
    let mut rows = Vec::new();
    for f in Family::ALL {
        for v in Verdict::ALL {
            for r in Reason::ALL {
                rows.push(CounterRow {
                    family: f.as_str(),
                    verdict: v.as_str(),
                    reason: r.as_str(),
                    packets: 0,
                    connections: 0,
                });
            }
        }
    }
    rows
}

fn snapshot() -> Snapshot {
    Snapshot {
        counters: zero_rows(),
        allowlist_ipv4: 3,
        allowlist_ipv6: 1,
        attachments: vec![
            AttachmentState {
                hook: "tc-ingress".into(),
                target: "lan0".into(),
                program: "smtpgate_tc".into(),
                attached: true,
            },
            AttachmentState {
                hook: "cgroup".into(),
                target: "/sys/fs/cgroup".into(),
                program: "smtpgate_connect4".into(),
                attached: false,
            },
        ],
        programs: vec![("smtpgate_tc".into(), 42)],
        reloads_ok: 2,
        reloads_failed: 1,
        last_reload_unix: 1_700_000_000.5,
        ready: true,
        dns: vec![
            DnsNameSnapshot {
                name: "mail.example.com".into(),
                failures: 2,
                addresses: 1,
                last_success_age_secs: 12.5,
            },
            DnsNameSnapshot {
                name: "mx:example.org".into(),
                failures: 1,
                addresses: 0,
                last_success_age_secs: f64::INFINITY,
            },
        ],
        allowlist_files: vec![
            ("/etc/smtpgate/allow.d/a.txt".into(), true),
            ("/etc/smtpgate/allow.d/b.txt".into(), false),
        ],
        relay: None,
    }
}

fn relay() -> RelaySnapshot {
    RelaySnapshot {
        stats: smtpgate_relay::StatsSnapshot::default(),
        latency: smtpgate_relay::LatencySnapshot {
            buckets: vec![(0.5, 1), (1.0, 3), (f64::INFINITY, 4)],
            sum_secs: 12.25,
            count: 4,
        },
    }
}

fn render(s: &Snapshot) -> String {
    let mut out = Vec::new();
    TextEncoder::new().encode(&families(s), &mut out).unwrap();
    String::from_utf8(out).unwrap()
}

/// (name, labels, value) of each sample line.
fn samples(text: &str) -> Vec<(String, String, String)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            (
                name.to_owned(),
                labels.trim_end_matches('}').to_owned(),
                value.to_owned(),
            )
        })
        .collect()
}

fn names_in(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| l.split_whitespace().next().unwrap().to_owned())
        .collect()
}

#[test]
fn every_label_combination_is_there_at_zero() {
    let text = render(&snapshot());
    let s = samples(&text);
    for metric in [names::EGRESS_PACKETS, names::EGRESS_CONNECTIONS] {
        for f in Family::ALL {
            for v in Verdict::ALL {
                for r in Reason::ALL {
                    let labels = format!(
                        "family=\"{}\",verdict=\"{}\",reason=\"{}\"",
                        f.as_str(),
                        v.as_str(),
                        r.as_str()
                    );
                    let hit: Vec<_> = s
                        .iter()
                        .filter(|(n, l, _)| n == metric && *l == labels)
                        .collect();
                    assert_eq!(hit.len(), 1, "{metric}{{{labels}}} in\n{text}");
                    assert_eq!(hit[0].2, "0");
                }
            }
        }
    }
    for (labels, v) in [("result=\"success\"", "2"), ("result=\"failure\"", "1")] {
        assert!(
            s.contains(&(names::CONFIG_RELOADS.into(), labels.into(), v.into())),
            "{text}"
        );
    }
    assert!(
        text.contains("smtpgate_allowlist_entries{family=\"ipv4\"} 3\n"),
        "{text}"
    );
    assert!(
        text.contains("smtpgate_allowlist_entries{family=\"ipv6\"} 1\n"),
        "{text}"
    );
    assert!(text.contains("smtpgate_ready 1\n"), "{text}");
    assert!(
        text.contains("smtpgate_config_last_reload_timestamp_seconds 1700000000.5\n"),
        "{text}"
    );
    assert!(
        text.contains("smtpgate_program_info{program=\"smtpgate_tc\",id=\"42\"} 1\n"),
        "{text}"
    );
    assert!(text.contains(&format!(
        "smtpgate_build_info{{version=\"{}\"}} 1\n",
        env!("CARGO_PKG_VERSION")
    )));
    assert!(text.contains(
        "smtpgate_attachment_up{hook=\"tc-ingress\",target=\"lan0\",program=\"smtpgate_tc\"} 1\n"
    ));
    assert!(text.contains("smtpgate_attachment_up{hook=\"cgroup\",target=\"/sys/fs/cgroup\",program=\"smtpgate_connect4\"} 0\n"));
}

#[test]
fn counts_land_on_their_own_series_and_unknown_rows_survive() {
    let mut s = snapshot();
    for row in &mut s.counters {
        if (row.family, row.verdict, row.reason) == ("ipv4", "dropped", "not_allowlisted") {
            row.packets = 9;
            row.connections = 3;
        }
    }
    // A reason this build's lists do not know (a newer datapath).
    s.counters.push(CounterRow {
        family: "ipv6",
        verdict: "dropped",
        reason: "from_the_future",
        packets: 5,
        connections: 5,
    });
    let text = render(&s);
    assert!(text.contains("smtpgate_egress_packets_total{family=\"ipv4\",verdict=\"dropped\",reason=\"not_allowlisted\"} 9\n"));
    assert!(text.contains("smtpgate_egress_connections_total{family=\"ipv4\",verdict=\"dropped\",reason=\"not_allowlisted\"} 3\n"));
    assert!(text.contains("smtpgate_egress_connections_total{family=\"ipv6\",verdict=\"dropped\",reason=\"from_the_future\"} 5\n"));
    let total: usize = Family::ALL.len() * Verdict::ALL.len() * Reason::ALL.len() + 1;
    let n = samples(&text)
        .iter()
        .filter(|(n, ..)| n == names::EGRESS_PACKETS)
        .count();
    assert_eq!(n, total);
}

#[test]
fn names_and_files_have_their_own_series() {
    let text = render(&snapshot());
    for line in [
        "smtpgate_dns_failures_total{name=\"mail.example.com\"} 2\n",
        "smtpgate_dns_failures_total{name=\"mx:example.org\"} 1\n",
        "smtpgate_dns_last_success_age_seconds{name=\"mail.example.com\"} 12.5\n",
        // Never resolved: infinitely old, which any age alert catches.
        // (the encoder writes "inf", which Prometheus parses as +Inf)
        "smtpgate_dns_last_success_age_seconds{name=\"mx:example.org\"} inf\n",
        "smtpgate_dns_addresses{name=\"mx:example.org\"} 0\n",
        "smtpgate_allowlist_file_valid{path=\"/etc/smtpgate/allow.d/a.txt\"} 1\n",
        "smtpgate_allowlist_file_valid{path=\"/etc/smtpgate/allow.d/b.txt\"} 0\n",
    ] {
        assert!(text.contains(line), "{line:?} not in {text}");
    }
}

#[test]
fn unreadable_counters_go_stale_rather_than_reset() {
    let s = Snapshot {
        counters: Vec::new(),
        ..snapshot()
    };
    let text = render(&s);
    assert!(!text.contains("smtpgate_egress_"), "{text}");
    assert!(text.contains("smtpgate_ready 1\n"));
}

#[test]
fn duplicate_attachments_are_merged() {
    let mut s = snapshot();
    let mut dup = s.attachments[0].clone();
    dup.attached = false;
    s.attachments.push(dup);
    let text = render(&s);
    let n = text
        .matches("smtpgate_attachment_up{hook=\"tc-ingress\"")
        .count();
    assert_eq!(n, 1, "{text}");
    assert!(text.contains("program=\"smtpgate_tc\"} 0\n"), "{text}");
}

#[test]
fn relay_families_exist_only_with_the_relay_and_match_the_list() {
    let without = names_in(&render(&snapshot()));
    assert!(
        without.iter().all(|n| !n.starts_with("smtpgate_relay_")),
        "{without:?}"
    );
    let agent: BTreeSet<String> = names::AGENT.iter().map(|d| d.name.to_owned()).collect();
    assert_eq!(
        without, agent,
        "a def the collector never fills, or the reverse"
    );

    let mut s = snapshot();
    s.relay = Some(RelaySnapshot {
        stats: smtpgate_relay::StatsSnapshot::default(),
        latency: smtpgate_relay::LatencySnapshot {
            buckets: vec![(0.5, 0), (f64::INFINITY, 0)],
            sum_secs: 0.0,
            count: 0,
        },
    });
    let text = render(&s);
    let with = names_in(&text);
    let relay: BTreeSet<String> = with.difference(&without).cloned().collect();
    let listed: BTreeSet<String> = RELAY_METRICS.iter().map(|n| (*n).to_owned()).collect();
    assert_eq!(relay, listed);
    let defs: BTreeSet<String> = names::RELAY.iter().map(|d| d.name.to_owned()).collect();
    assert_eq!(defs, listed);
    // All at zero from the start, every label value present.
    for line in [
        "smtpgate_relay_sessions_total 0\n",
        "smtpgate_relay_sessions_active 0\n",
        "smtpgate_relay_sessions_refused_total 0\n",
        "smtpgate_relay_sessions_evicted_total 0\n",
        "smtpgate_relay_dkim_signed_messages_total 0\n",
        "smtpgate_relay_dkim_keys 0\n",
        "smtpgate_relay_delay_warnings_total 0\n",
        "smtpgate_relay_auth_total{result=\"success\"} 0\n",
        "smtpgate_relay_auth_total{result=\"failure\"} 0\n",
        "smtpgate_relay_messages_total{outcome=\"accepted\"} 0\n",
        "smtpgate_relay_messages_total{outcome=\"rejected\"} 0\n",
        "smtpgate_relay_messages_total{outcome=\"delivered\"} 0\n",
        "smtpgate_relay_messages_total{outcome=\"deferred\"} 0\n",
        "smtpgate_relay_messages_total{outcome=\"bounced\"} 0\n",
        "smtpgate_relay_queue_length 0\n",
        "smtpgate_relay_delivery_duration_seconds_count 0\n",
    ] {
        assert!(text.contains(line), "{line} missing from\n{text}");
    }
}

#[test]
fn histogram_buckets_sum_and_count() {
    let mut s = snapshot();
    s.relay = Some(relay());
    let text = render(&s);
    let h: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("smtpgate_relay_delivery_duration_seconds"))
        .collect();
    assert_eq!(
        h,
        [
            "smtpgate_relay_delivery_duration_seconds_bucket{le=\"0.5\"} 1",
            "smtpgate_relay_delivery_duration_seconds_bucket{le=\"1\"} 3",
            "smtpgate_relay_delivery_duration_seconds_bucket{le=\"+Inf\"} 4",
            "smtpgate_relay_delivery_duration_seconds_sum 12.25",
            "smtpgate_relay_delivery_duration_seconds_count 4",
        ]
    );
    assert!(text.contains("# TYPE smtpgate_relay_delivery_duration_seconds histogram\n"));

    // A count read ahead of the buckets never leaves +Inf below them.
    let mut r = relay();
    r.latency.count = 5;
    s.relay = Some(r);
    let text = render(&s);
    assert!(text.contains("smtpgate_relay_delivery_duration_seconds_bucket{le=\"+Inf\"} 5\n"));
    assert!(text.contains("smtpgate_relay_delivery_duration_seconds_count 5\n"));
}

#[test]
fn no_label_value_is_an_address_and_counters_end_in_total() {
    let mut s = snapshot();
    s.relay = Some(relay());
    let text = render(&s);
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert_eq!(kind == "counter", name.ends_with("_total"), "{line}");
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        for value in line.split('"').skip(1).step_by(2) {
            assert!(
                value.parse::<IpAddr>().is_err(),
                "address in a label: {line}"
            );
            assert!(
                value.parse::<std::net::SocketAddr>().is_err(),
                "address in a label: {line}"
            );
        }
    }
}

#[test]
fn the_registry_accepts_every_def() {
    let source: SnapshotFn = Arc::new(snapshot);
    let r = registry(source).unwrap();
    let gathered = r.gather();
    assert!(gathered.iter().any(|f| f.name() == names::EGRESS_PACKETS));
    assert!(gathered.iter().any(|f| f.name().starts_with("process_")));
}

/// Sends raw HTTP/1.1 over one connection and reads `n` responses.
async fn exchange(addr: std::net::SocketAddr, requests: &str) -> String {
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    c.write_all(requests.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), c.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn http_endpoint() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let r2 = ready.clone();
    let source: SnapshotFn = Arc::new(move || Snapshot {
        ready: r2.load(std::sync::atomic::Ordering::Relaxed),
        ..snapshot()
    });
    let heartbeat = crate::heartbeat::Heartbeat::new();
    heartbeat.beat();
    tokio::spawn(serve(listener, source, heartbeat));

    // Keep-alive: three requests on one connection, the last one closes.
    let out = exchange(
        addr,
        "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /readyz HTTP/1.1\r\nHost: x\r\n\r\nGET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(out.matches("HTTP/1.1 ").count(), 3, "{out}");
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    assert!(
        out.contains("HTTP/1.1 503 Service Unavailable\r\n"),
        "{out}"
    );
    assert!(
        out.contains("content-type: text/plain; version=0.0.4"),
        "{out}"
    );
    assert!(out.contains("smtpgate_ready 0\n"), "{out}");

    ready.store(true, std::sync::atomic::Ordering::Relaxed);
    let out = exchange(
        addr,
        "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");

    let out = exchange(
        addr,
        "HEAD /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    assert!(out.ends_with("\r\n\r\n"), "HEAD with a body: {out}");

    let out = exchange(
        addr,
        "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        out.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
        "{out}"
    );

    let out = exchange(
        addr,
        "GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 404 Not Found\r\n"), "{out}");

    let out = exchange(addr, "GARBAGE\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{out}");
}

#[tokio::test]
async fn slow_and_idle_clients_are_cut_off_and_connections_capped() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let limits = super::Limits {
        max_connections: 2,
        request: Duration::from_millis(300),
        idle: Duration::from_millis(600),
    };
    let heartbeat = crate::heartbeat::Heartbeat::new();
    tokio::spawn(serve_with(listener, Arc::new(snapshot), heartbeat, limits));
    let closed = |mut c: tokio::net::TcpStream| async move {
        let mut buf = [0u8; 512];
        let t = std::time::Instant::now();
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
            .await
            .expect("the server never closed the connection")
            .unwrap_or(0);
        (n, t.elapsed())
    };

    // Half a request, then silence: closed after the request timeout.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHo")
        .await
        .unwrap();
    // Nothing at all: closed as well.
    let silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    // Both slots are taken: a third client waits in the backlog...
    let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    assert!(
        tokio::time::timeout(Duration::from_millis(150), third.read(&mut buf))
            .await
            .is_err(),
        "served beyond the connection cap"
    );
    let (n, took) = closed(slow).await;
    assert_eq!(n, 0, "the slow client got an answer");
    assert!(took < Duration::from_secs(2), "slow client held {took:?}");
    let (_, took) = closed(silent).await;
    assert!(took < Duration::from_secs(2), "silent client held {took:?}");
    // ...and is served once a slot frees up.
    let n = tokio::time::timeout(Duration::from_secs(2), third.read(&mut buf))
        .await
        .expect("third client never served")
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200 OK"));
    // Kept alive after the response, then closed when idle.
    let (n, took) = closed(third).await;
    assert_eq!(n, 0);
    assert!(
        took >= Duration::from_millis(300),
        "idle connection closed after {took:?}"
    );
}

/// /healthz follows the main loop's heartbeat: a loop that stopped beating
/// fails the liveness probe, and a beat brings it back.
#[tokio::test]
async fn healthz_follows_the_heartbeat() {
    use crate::heartbeat::{Heartbeat, STALE_AFTER};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heartbeat = Heartbeat::beaten_ago(STALE_AFTER + Duration::from_secs(5));
    tokio::spawn(serve(listener, Arc::new(snapshot), heartbeat.clone()));
    let get = "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let out = exchange(addr, get).await;
    assert!(out.starts_with("HTTP/1.1 503 "), "{out}");
    assert!(
        out.contains("stalled: the main loop has not run for"),
        "{out}"
    );
    heartbeat.beat();
    let out = exchange(addr, get).await;
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
}

/// /readyz names the attach point that is down.
#[tokio::test]
async fn readyz_names_what_is_down() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let source: SnapshotFn = Arc::new(|| {
        let mut s = snapshot();
        s.ready = false;
        s.attachments[0].attached = false;
        s
    });
    tokio::spawn(serve(listener, source, crate::heartbeat::Heartbeat::new()));
    let out = exchange(
        addr,
        "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 503 "), "{out}");
    assert!(out.contains("is down"), "{out}");
}

/// Relay stats that had no metric before (issue 12): pre-AUTH evictions,
/// DKIM-signed messages, the keys loaded, delay warnings. Each lands in its own family with
/// its own value, not a neighbour's.
#[test]
fn relay_evictions_and_dkim_are_exported() {
    let mut r = relay();
    r.stats = smtpgate_relay::StatsSnapshot {
        sessions_refused: 2,
        sessions_evicted: 7,
        messages_accepted: 5,
        messages_signed: 3,
        dkim_keys: 4,
        delay_warnings: 6,
        ..Default::default()
    };
    let mut s = snapshot();
    s.relay = Some(r);
    let text = render(&s);
    for line in [
        "# TYPE smtpgate_relay_sessions_evicted_total counter\n",
        "smtpgate_relay_sessions_evicted_total 7\n",
        "smtpgate_relay_sessions_refused_total 2\n",
        "# TYPE smtpgate_relay_dkim_signed_messages_total counter\n",
        "smtpgate_relay_dkim_signed_messages_total 3\n",
        "smtpgate_relay_messages_total{outcome=\"accepted\"} 5\n",
        "# TYPE smtpgate_relay_dkim_keys gauge\n",
        "smtpgate_relay_dkim_keys 4\n",
        "# TYPE smtpgate_relay_delay_warnings_total counter\n",
        "smtpgate_relay_delay_warnings_total 6\n",
    ] {
        assert!(text.contains(line), "{line} missing from\n{text}");
    }
}
