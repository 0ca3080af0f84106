//! The metrics endpoint as Prometheus sees it: a real agent in a lab
//! gateway, scraped by curl (checked by `promtool check metrics`) and by a
//! real Prometheus server (Debian's) while crafted SYNs flow; plus the alert
//! rules (promtool) and the Grafana dashboard against real metric names.
//!
//! The lab tests need root (they fail in CI without it); the promtool and
//! dashboard tests do not, and fail, never skip, without promtool.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use xtask::{
    agent::privileged,
    lab::{self, Host, Lab, Options},
};

const METRICS_URL: &str = "http://127.0.0.1:9725";
/// Inside the gateway's namespace: no clash with anything on the host.
const PROM_PORT: u16 = 9090;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn promtool() -> Command {
    Command::new(std::env::var_os("PROMTOOL").unwrap_or_else(|| "promtool".into()))
}

/// Runs promtool; panics with its output unless it succeeds.
fn promtool_ok(args: &[&str], stdin: Option<&Path>) -> String {
    let mut cmd = promtool();
    cmd.args(args).current_dir(repo());
    if let Some(p) = stdin {
        cmd.stdin(std::fs::File::open(p).unwrap());
    }
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("promtool is required (apt install prometheus, or set PROMTOOL): {e}")
    });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn alert_rules_and_scrape_config_pass_promtool() {
    promtool_ok(&["check", "rules", "deploy/prometheus/rules.yml"], None);
    let out = promtool_ok(&["test", "rules", "deploy/prometheus/rules.test.yml"], None);
    assert!(out.contains("SUCCESS"), "{out}");
    promtool_ok(
        &["check", "config", "deploy/prometheus/prometheus.yml"],
        None,
    );
}

/// The relay's metric names, from the agent's metrics table: they exist only
/// when the relay is enabled, so a scrape of a relay-less agent lacks them.
fn relay_metrics() -> BTreeSet<String> {
    let src = std::fs::read_to_string(repo().join("agent/src/metrics/names.rs")).unwrap();
    let start = src
        .find("pub const RELAY_METRICS: &[&str] = &[")
        .expect("RELAY_METRICS in agent/src/metrics/names.rs");
    let block = &src[start..];
    let block = &block[..block.find("];").unwrap()];
    let names: BTreeSet<String> = block
        .split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect();
    assert!(names.len() >= 5, "RELAY_METRICS looks wrong: {names:?}");
    names
}

/// Every `smtpgate_*` metric name in the dashboard's queries, with the
/// histogram suffixes folded into the family name when `families` knows it.
fn dashboard_metrics(families: &BTreeSet<String>) -> BTreeSet<String> {
    let text = std::fs::read_to_string(repo().join("deploy/grafana/smtpgate.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).expect("dashboard is valid JSON");
    assert_eq!(v["uid"], "smtpgate");
    let mut exprs = Vec::new();
    collect_exprs(&v, &mut exprs);
    assert!(exprs.len() > 10, "too few queries: {exprs:?}");
    let mut names = BTreeSet::new();
    for e in &exprs {
        let mut rest = e.as_str();
        while let Some(i) = rest.find("smtpgate_") {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                .unwrap_or(tail.len());
            let name = &tail[..end];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|b| families.contains(*b)))
                .unwrap_or(name);
            names.insert(base.to_owned());
            rest = &tail[end..];
        }
    }
    names
}

fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr" | "definition", serde_json::Value::String(s)) => out.push(s.clone()),
                    ("query", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// Metric family names (from `# TYPE` lines) of a scrape.
fn scraped_families(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn dashboard_is_valid_and_names_only_defined_metrics() {
    // Without root: against the names the agent defines. The lab test
    // below checks the same against a real scrape.
    let src = std::fs::read_to_string(repo().join("agent/src/metrics/names.rs")).unwrap();
    let defined: BTreeSet<String> = src
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| s.starts_with("smtpgate_") && !s.contains(' '))
        .map(str::to_owned)
        .collect();
    let used = dashboard_metrics(&defined);
    let unknown: Vec<_> = used.difference(&defined).collect();
    assert!(
        unknown.is_empty(),
        "dashboard uses undefined metrics: {unknown:?}"
    );
    let relay = relay_metrics();
    assert!(relay.is_subset(&defined));
    // The dashboard covers the relay, attachments and the allowlist.
    for name in [
        "smtpgate_relay_queue_length",
        "smtpgate_attachment_up",
        "smtpgate_allowlist_entries",
        "smtpgate_egress_connections_total",
    ] {
        assert!(used.contains(name), "dashboard lacks {name}");
    }
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// (HTTP status, body) of a request to the agent, from inside the gateway.
fn http(lab: &Lab, method: &str, path: &str) -> (u16, String) {
    let body = lab.dir.join("body");
    let _ = std::fs::remove_file(&body);
    let flag = match method {
        "HEAD" => "-I",
        "POST" => "-d ''",
        _ => "",
    };
    let out = lab
        .sh(
            Host::Gw,
            &format!(
                "curl -s --max-time 10 {flag} -o {} -w '%{{http_code}}' {METRICS_URL}{path}",
                body.display()
            ),
        )
        .unwrap();
    let text = std::fs::read_to_string(&body).unwrap_or_default();
    (out.trim().parse().unwrap_or(0), text)
}

/// Instant query against the lab's Prometheus: (labels, value) per series.
fn query(lab: &Lab, expr: &str) -> Vec<(serde_json::Value, f64)> {
    let out = lab
        .sh(
            Host::Gw,
            &format!(
                "curl -sfG http://127.0.0.1:{PROM_PORT}/api/v1/query --data-urlencode {}",
                sh_quote(&format!("query={expr}"))
            ),
        )
        .unwrap_or_else(|e| panic!("query {expr}: {e}"));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["status"], "success", "{expr}: {out}");
    v["data"]["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["metric"].clone(),
                r["value"][1].as_str().unwrap().parse().unwrap(),
            )
        })
        .collect()
}

fn value(lab: &Lab, expr: &str) -> Option<f64> {
    let r = query(lab, expr);
    assert!(r.len() <= 1, "{expr}: more than one series: {r:?}");
    r.first().map(|(_, v)| *v)
}

/// Polls until `f` gives Some, or panics with `what` after `timeout`.
fn wait<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not after {timeout:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The state (pending, firing) of an alert in the lab's Prometheus.
fn alert_state(lab: &Lab, alertname: &str) -> Option<String> {
    let out = lab
        .sh(
            Host::Gw,
            &format!("curl -sf http://127.0.0.1:{PROM_PORT}/api/v1/alerts"),
        )
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["data"]["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["labels"]["alertname"] == alertname)
        .map(|a| a["state"].as_str().unwrap_or_default().to_owned())
}

fn firing(lab: &Lab, alertname: &str) -> bool {
    alert_state(lab, alertname).as_deref() == Some("firing")
}

/// A real Prometheus in the gateway, scraping the agent every second and
/// evaluating the shipped rules, as they are; returns once it has scraped
/// the agent.
fn start_prometheus(lab: &mut Lab) {
    let prom_dir = lab.dir.join("prometheus");
    std::fs::create_dir_all(&prom_dir).unwrap();
    let rules = repo().join("deploy/prometheus/rules.yml");
    let prom_config = lab
        .write(
            "prometheus.yml",
            &format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {:?}\nscrape_configs:\n  - job_name: smtpgate\n    static_configs:\n      - targets: ['127.0.0.1:9725']\n",
                rules.canonicalize().unwrap().display().to_string()
            ),
        )
        .unwrap();
    let mut cmd = lab.command(Host::Gw, "/usr/bin/prometheus");
    cmd.arg(format!("--config.file={}", prom_config.display()))
        .arg(format!("--storage.tsdb.path={}", prom_dir.display()))
        .arg(format!("--web.listen-address=127.0.0.1:{PROM_PORT}"));
    lab.spawn(cmd, "prometheus.log").unwrap();
    wait(
        "prometheus scraping the agent",
        Duration::from_secs(60),
        || {
            let up = lab
            .sh(
                Host::Gw,
                &format!("curl -sf http://127.0.0.1:{PROM_PORT}/-/ready >/dev/null && echo ok || true"),
            )
            .unwrap();
            (up.trim() == "ok"
                && value(lab, r#"up{job="smtpgate"}"#) == Some(1.0)
                && value(lab, DENIED).is_some())
            .then_some(())
        },
    );
}

const DENIED: &str = r#"smtpgate_egress_connections_total{family="ipv4",verdict="dropped",reason="not_allowlisted"}"#;
const DENIED_PACKETS: &str =
    r#"smtpgate_egress_packets_total{family="ipv4",verdict="dropped",reason="not_allowlisted"}"#;
const ALLOWED: &str =
    r#"smtpgate_egress_connections_total{family="ipv4",verdict="allowed",reason="allowlisted"}"#;

#[test]
fn a_real_prometheus_scrapes_exact_counts() {
    if !privileged() {
        return;
    }
    let mut lab = Lab::up("metrics", Options::default()).unwrap();
    let config = format!(
        "action = \"drop\"\nallowlist = [\"{}\"]\n[[attach]]\nhook = \"tc-ingress\"\ninterface = \"lan0\"\n[metrics]\nenabled = true\nlisten = \"127.0.0.1:9725\"\n",
        lab::CLIENT_ALLOWED_V4
    );
    let agent = lab.start_agent("agent", &config).unwrap();

    // HTTP behaviour, as a probe and a scraper see it.
    wait("readyz", Duration::from_secs(10), || {
        (http(&lab, "GET", "/readyz").0 == 200).then_some(())
    });
    assert_eq!(http(&lab, "GET", "/healthz").0, 200);
    assert_eq!(http(&lab, "GET", "/nope").0, 404);
    assert_eq!(http(&lab, "POST", "/metrics").0, 405);
    assert_eq!(http(&lab, "HEAD", "/metrics").0, 200);

    // A scrape before any traffic: valid exposition, every label value
    // there. (Counters need not be 0: the datapath is pinned and an agent
    // adopts the counters of the one before it. Zeros are the unit tests'.)
    let (status, scrape) = http(&lab, "GET", "/metrics");
    assert_eq!(status, 200);
    let file = lab.write("scrape-0.txt", &scrape).unwrap();
    promtool_ok(&["check", "metrics"], Some(&file));
    for series in [
        DENIED,
        ALLOWED,
        r#"smtpgate_egress_packets_total{family="other",verdict="passed",reason="vlan_too_deep"}"#,
        r#"smtpgate_egress_connections_total{family="ipv6",verdict="audited",reason="mapped_address"}"#,
    ] {
        assert!(
            scrape.lines().any(|l| l
                .strip_prefix(series)
                .is_some_and(|v| v.trim().parse::<f64>().is_ok())),
            "{series} missing from\n{scrape}"
        );
    }
    for line in [
        r#"smtpgate_allowlist_entries{family="ipv4"} 1"#,
        r#"smtpgate_allowlist_entries{family="ipv6"} 0"#,
        r#"smtpgate_config_reloads_total{result="failure"} 0"#,
        "smtpgate_ready 1",
    ] {
        assert!(
            scrape.lines().any(|l| l == line),
            "{line} missing from\n{scrape}"
        );
    }
    assert!(
        scrape.lines().any(|l| l
            .starts_with(r#"smtpgate_attachment_up{hook="tc-ingress",target="lan0","#)
            && l.ends_with(" 1")),
        "{scrape}"
    );
    assert!(
        scrape.contains("smtpgate_build_info{version=\""),
        "{scrape}"
    );
    assert!(scrape.contains("smtpgate_program_info{"), "{scrape}");
    let combos = scrape
        .lines()
        .filter(|l| l.starts_with("smtpgate_egress_connections_total{"))
        .count();
    // 3 families x 6 verdicts x at least the 10 reasons of issue 3.
    assert!(combos >= 180, "only {combos} counter series");
    assert!(
        !scrape.contains("192.0.2."),
        "a client address in the scrape"
    );

    // Every metric the dashboard names exists: on this scrape, or (relay
    // off here) in the relay's list.
    let families = scraped_families(&scrape);
    let relay = relay_metrics();
    let known: BTreeSet<String> = families.union(&relay).cloned().collect();
    let used = dashboard_metrics(&known);
    let unknown: Vec<_> = used.difference(&known).collect();
    assert!(
        unknown.is_empty(),
        "dashboard names metrics no scrape has: {unknown:?}"
    );
    assert!(
        families.is_disjoint(&relay),
        "relay metrics without a relay"
    );

    start_prometheus(&mut lab);
    assert_eq!(value(&lab, "smtpgate_ready"), Some(1.0));
    assert_eq!(
        value(
            &lab,
            r#"smtpgate_attachment_up{hook="tc-ingress",target="lan0"}"#
        ),
        Some(1.0)
    );
    let before_denied = value(&lab, DENIED).unwrap();
    let before_denied_packets = value(&lab, DENIED_PACKETS).unwrap();
    let before_allowed = value(&lab, ALLOWED).unwrap();
    let stats_before = lab.stats(&agent).unwrap();

    // Allowed traffic alone: counted, and no "new denied source" alert.
    let allowed = lab
        .craft(
            Host::Client,
            "syn",
            lab::CLIENT_ALLOWED_V4,
            lab::INET_V4,
            5,
            &[],
        )
        .unwrap();
    let want = before_allowed + f64::from(allowed);
    let got = wait(
        "allowed SYNs in Prometheus",
        Duration::from_secs(30),
        || value(&lab, ALLOWED).filter(|v| *v >= want),
    );
    assert_eq!(got, want, "allowed attempts");
    // Several rule evaluations (every second) on the new data.
    std::thread::sleep(Duration::from_secs(3));
    let state = alert_state(&lab, "SmtpgateNewDeniedSmtpSource");
    assert!(
        state.is_none(),
        "allowed traffic alone: denied-source alert {state:?}"
    );

    let denied = lab
        .craft(
            Host::Client,
            "syn",
            lab::CLIENT_DENIED_V4,
            lab::INET_V4,
            7,
            &[],
        )
        .unwrap();
    let want = before_denied + f64::from(denied);
    let got = wait("denied SYNs in Prometheus", Duration::from_secs(30), || {
        value(&lab, DENIED).filter(|v| *v >= want)
    });
    assert_eq!(got, want, "denied attempts");
    // Settle: one more scrape must not move them further.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(value(&lab, DENIED), Some(want));
    assert_eq!(
        value(&lab, DENIED_PACKETS),
        Some(before_denied_packets + f64::from(denied))
    );
    assert_eq!(
        value(&lab, ALLOWED),
        Some(before_allowed + f64::from(allowed))
    );

    // Prometheus and the control socket agree.
    let c = lab.stats(&agent).unwrap().since(&stats_before);
    assert_eq!(
        c.connections("ipv4", "dropped", "not_allowlisted"),
        u64::from(denied)
    );
    assert_eq!(
        c.connections("ipv4", "allowed", "allowlisted"),
        u64::from(allowed)
    );

    // The shipped rule sees a new source on a gateway with no history.
    wait(
        "SmtpgateNewDeniedSmtpSource firing",
        Duration::from_secs(30),
        || firing(&lab, "SmtpgateNewDeniedSmtpSource").then_some(()),
    );
    for quiet in [
        "SmtpgateNotReady",
        "SmtpgateDown",
        "SmtpgateAttachmentDown",
        "SmtpgateTargetsMissing",
        "SmtpgateCountersUnreadable",
        "SmtpgateRestarting",
    ] {
        let state = alert_state(&lab, quiet);
        assert!(state.is_none(), "{quiet} is {state:?} on a healthy agent");
    }

    // The scrape after traffic is still valid exposition.
    let (_, scrape) = http(&lab, "GET", "/metrics");
    let file = lab.write("scrape-1.txt", &scrape).unwrap();
    promtool_ok(&["check", "metrics"], Some(&file));
    assert!(
        !scrape.contains("192.0.2."),
        "a client address in the scrape"
    );
    let log = lab.read_log("prometheus.log");
    assert!(!log.contains("level=error"), "prometheus errors:\n{log}");
}

/// The critical alert for an attach point that lost its program, fed by
/// what the agent really exports: it fires while the interface is gone
/// (after the rule's own `for: 2m`) and resolves once the agent has
/// attached again.
#[test]
fn attachment_down_fires_while_an_interface_is_gone_and_resolves() {
    if !privileged() {
        return;
    }
    let mut lab = Lab::up("alertdown", Options::default()).unwrap();
    let config = format!(
        "action = \"reject\"\nallowlist = [\"{}\"]\n[[attach]]\nhook = \"tc-ingress\"\ninterface = \"lan0\"\n[metrics]\nenabled = true\nlisten = \"127.0.0.1:9725\"\n",
        lab::CLIENT_ALLOWED_V4
    );
    lab.start_agent("agent", &config).unwrap();
    start_prometheus(&mut lab);
    const UP: &str =
        r#"smtpgate_attachment_up{hook="tc-ingress",target="lan0",program="smtpgate_tc_ingress"}"#;
    wait("attachment up", Duration::from_secs(30), || {
        (value(&lab, UP) == Some(1.0)).then_some(())
    });
    assert!(alert_state(&lab, "SmtpgateAttachmentDown").is_none());

    lab.delete_lan().unwrap();
    let gone = Instant::now();
    wait(
        "attachment down in Prometheus",
        Duration::from_secs(30),
        || (value(&lab, UP) == Some(0.0)).then_some(()),
    );
    wait(
        "SmtpgateAttachmentDown pending",
        Duration::from_secs(30),
        || {
            (alert_state(&lab, "SmtpgateAttachmentDown").as_deref() == Some("pending"))
                .then_some(())
        },
    );
    wait(
        "SmtpgateAttachmentDown firing",
        Duration::from_secs(200),
        || firing(&lab, "SmtpgateAttachmentDown").then_some(()),
    );
    eprintln!(
        "SmtpgateAttachmentDown fired {:.0} s after lan0 was deleted",
        gone.elapsed().as_secs_f64()
    );
    wait("SmtpgateNotReady firing", Duration::from_secs(30), || {
        firing(&lab, "SmtpgateNotReady").then_some(())
    });

    lab.create_lan().unwrap();
    let back = Instant::now();
    wait(
        "SmtpgateAttachmentDown resolved",
        Duration::from_secs(30),
        || {
            alert_state(&lab, "SmtpgateAttachmentDown")
                .is_none()
                .then_some(())
        },
    );
    eprintln!(
        "resolved {:.1} s after lan0 was back",
        back.elapsed().as_secs_f64()
    );
    assert_eq!(value(&lab, UP), Some(1.0));
    assert_eq!(value(&lab, "smtpgate_ready"), Some(1.0));
}
