//! Policy sources that change by themselves, against real peers: allowlist
//! names served by a real DNS server (dnsmasq, in the lab's internet
//! host), and allowlist files edited and swapped the way an admin and a
//! Kubernetes ConfigMap volume do. Verdicts are read from real connection
//! attempts, probed continuously while the source changes.

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use xtask::{
    agent::{Agent, privileged},
    lab::{self, Host, Lab, Options},
};

const FAST: Duration = Duration::from_millis(1500);
/// The records' TTL the DNS server gives.
const TTL_SECS: u64 = 2;
/// `[resolver] min_ttl_secs`: a failed lookup (the server restarting) is
/// retried after this.
const MIN_TTL_SECS: u64 = 1;

fn connect(lab: &Lab, src: &str) -> String {
    let dst = if src.contains(':') {
        lab::INET_V6
    } else {
        lab::INET_V4
    };
    lab.connect(Host::Client, src, dst, 25, FAST)
        .unwrap()
        .result
}

fn cli(lab: &Lab, agent: &Agent, args: &[&str]) -> String {
    let out = lab.cli(agent, args).unwrap();
    assert!(
        out.status.success(),
        "smtpgate {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn status(lab: &Lab, agent: &Agent) -> serde_json::Value {
    serde_json::from_str(&cli(lab, agent, &["status", "--output", "json"])).unwrap()
}

/// Polls `f` every 20 ms until it holds; the time it took.
fn wait(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "{what}: not after {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

/// dnsmasq in the internet host, authoritative for `lab` (with
/// `--local`: a name it has no record for is NXDOMAIN, never forwarded),
/// answering with `records` (dnsmasq options such as
/// `--host-record=mail.lab,192.0.2.10`). Killed when dropped. Not the
/// lab's own `spawn`: a test restarts it while another thread probes
/// through the lab.
struct Dns {
    child: Option<std::process::Child>,
    log: PathBuf,
}

impl Dns {
    fn start(lab: &Lab, records: &[String]) -> Dns {
        let mut dns = Dns {
            child: None,
            log: lab.dir.join("dnsmasq.log"),
        };
        dns.restart(lab, records);
        dns
    }

    /// Stops the server (if it runs) and starts it with `records`.
    fn restart(&mut self, lab: &Lab, records: &[String]) {
        self.stop();
        let log = std::fs::File::create(&self.log).unwrap();
        let mut cmd = lab.command(Host::Inet, "/usr/sbin/dnsmasq");
        cmd.args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            "--bind-interfaces",
            &format!("--listen-address={}", lab::INET_V4),
            "--port=53",
            "--pid-file=",
            "--user=root",
            "--log-facility=-",
            "--log-queries",
            &format!("--local-ttl={TTL_SECS}"),
            "--local=/lab/",
        ])
        .args(records)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
        self.child = Some(cmd.spawn().expect("starting dnsmasq"));
        wait("dnsmasq started", Duration::from_secs(10), || {
            std::fs::read_to_string(&self.log).is_ok_and(|l| l.contains("started"))
        });
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A and AAAA records: one `--host-record` per address, since dnsmasq
/// keeps one IPv4 and one IPv6 address per option (a second IPv4 in one
/// option replaces the first).
fn host_record(name: &str, addrs: &[&str]) -> Vec<String> {
    addrs
        .iter()
        .map(|a| format!("--host-record={name},{a}"))
        .collect()
}

fn config(allowlist: &[&str], extra: &str) -> String {
    let quoted: Vec<String> = allowlist.iter().map(|s| format!("{s:?}")).collect();
    format!(
        "action = \"reject\"\nallowlist = [{}]\n{extra}\n[[attach]]\nhook = \"tc-ingress\"\ninterface = \"lan0\"\n[resolver]\nnameservers = [\"{}\"]\nmin_ttl_secs = {MIN_TTL_SECS}\nmax_ttl_secs = 60\ntimeout_secs = 1\n[metrics]\nenabled = true\nlisten = \"127.0.0.1:9725\"\n",
        quoted.join(", "),
        lab::INET_V4,
    )
}

fn scrape(lab: &Lab) -> String {
    lab.sh(
        Host::Gw,
        "curl -s --max-time 10 http://127.0.0.1:9725/metrics",
    )
    .unwrap()
}

/// The value of one series in a scrape.
fn metric(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find_map(|l| {
        let v = l.strip_prefix(series)?.strip_prefix(' ')?;
        Some(if v == "inf" || v == "+Inf" {
            f64::INFINITY
        } else {
            v.parse().unwrap()
        })
    })
}

/// Probes `src` continuously on a thread while `change` runs, and returns
/// what `change` returned and every result the probes saw.
fn probing<T: Send>(lab: &Lab, src: &str, change: impl FnOnce() -> T + Send) -> (T, Vec<String>) {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let probe = s.spawn(|| {
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                seen.push(connect(lab, src));
            }
            seen
        });
        let out = change();
        // And a while after: a late wrong verdict counts too.
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        (out, probe.join().unwrap())
    })
}

fn all_connected(what: &str, seen: &[String]) {
    assert!(seen.len() >= 3, "{what}: only {} probes", seen.len());
    let wrong: Vec<&String> = seen.iter().filter(|r| *r != "connected").collect();
    assert!(
        wrong.is_empty(),
        "{what}: {} of {} probes were not connected: {wrong:?}",
        wrong.len(),
        seen.len()
    );
}

#[test]
fn a_name_follows_its_dns_records_within_the_ttl() {
    if !privileged() {
        return;
    }
    let mut lab = Lab::up("dnsfollow", Options::default()).unwrap();
    lab.start_listeners().unwrap();
    let (a, b) = (lab::CLIENT_ALLOWED_V4, lab::CLIENT_DENIED_V4);
    let mut dns = Dns::start(&lab, &host_record("mail.lab", &[a]));
    let agent = lab
        .start_agent("agent", &config(&["mail.lab"], ""))
        .unwrap();
    wait("mail.lab resolved", Duration::from_secs(10), || {
        status(&lab, &agent)["sources"]["names"][0]["addresses"] == serde_json::json!([a])
    });
    assert_eq!(connect(&lab, a), "connected");
    assert_eq!(connect(&lab, b), "refused");
    let list = cli(&lab, &agent, &["allow", "list"]);
    assert!(
        list.lines()
            .any(|l| l.starts_with("192.0.2.10/32") && l.contains("dns:mail.lab")),
        "{list}"
    );
    let check = cli(&lab, &agent, &["check", a]);
    assert!(check.contains("dns:mail.lab"), "{check}");

    // A second address: b is allowed within the TTL, and a, unchanged,
    // connects on every probe meanwhile.
    let (added, seen) = probing(&lab, a, || {
        let t0 = Instant::now();
        dns.restart(&lab, &host_record("mail.lab", &[a, b]));
        wait("b allowed", Duration::from_secs(10), || {
            connect(&lab, b) == "connected"
        });
        t0.elapsed()
    });
    all_connected("the unchanged address while one was added", &seen);
    eprintln!(
        "MEASURED: address added to mail.lab (TTL {TTL_SECS} s) allowed {:.0} ms after the DNS server changed; {} probes of the unchanged address, all connected",
        added.as_secs_f64() * 1e3,
        seen.len()
    );
    // Within the TTL, plus one retry if a lookup hit the server's restart,
    // plus the time to swap the table and probe.
    let bound = Duration::from_secs(TTL_SECS + MIN_TTL_SECS) + Duration::from_millis(700);
    assert!(added < bound, "took {added:?}, more than {bound:?}");

    // The first address leaves: a is refused within the TTL, b, unchanged,
    // connects throughout.
    let (removed, seen) = probing(&lab, b, || {
        let t0 = Instant::now();
        dns.restart(&lab, &host_record("mail.lab", &[b]));
        wait("a refused", Duration::from_secs(10), || {
            connect(&lab, a) == "refused"
        });
        t0.elapsed()
    });
    all_connected("the unchanged address while another left", &seen);
    eprintln!(
        "MEASURED: address removed from mail.lab refused {:.0} ms after the DNS server changed; {} probes of the unchanged address, all connected",
        removed.as_secs_f64() * 1e3,
        seen.len()
    );
    assert!(removed < bound, "took {removed:?}, more than {bound:?}");
    let st = status(&lab, &agent);
    assert_eq!(
        st["sources"]["names"][0]["addresses"],
        serde_json::json!([b])
    );

    // A name that does not exist allows nothing (and is no failure: DNS
    // answered).
    dns.restart(&lab, &host_record("other.lab", &[a]));
    wait("b refused after NXDOMAIN", Duration::from_secs(10), || {
        connect(&lab, b) == "refused"
    });
    let text = cli(&lab, &agent, &["status"]);
    assert!(text.contains("mail.lab (config): no addresses"), "{text}");
    assert!(
        lab.read_log(&agent.log).contains("no addresses in DNS"),
        "{}",
        lab.read_log(&agent.log)
    );

    // Files that a reload brings in are watched from then on (this agent
    // had none, so no inotify instance, until now).
    let dir = lab.dir.join("later.d");
    std::fs::create_dir(&dir).unwrap();
    let text = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(
        &agent.config,
        format!("allowlist_files = [\"{}/*.txt\"]\n{text}", dir.display()),
    )
    .unwrap();
    cli(&lab, &agent, &["reload"]);
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(dir.join("a.txt"), format!("{a}\n")).unwrap();
    let took = wait(
        "a allowed by a file added by reload",
        Duration::from_secs(5),
        || connect(&lab, a) == "connected",
    );
    assert!(took < Duration::from_secs(1), "took {took:?}");
}

#[test]
fn dns_down_keeps_the_last_addresses_even_across_a_restart() {
    if !privileged() {
        return;
    }
    let mut lab = Lab::up("dnsdown", Options::default()).unwrap();
    lab.start_listeners().unwrap();
    let (a, b) = (lab::CLIENT_ALLOWED_V4, lab::CLIENT_DENIED_V4);
    let mut records = vec!["--mx-host=corp.lab,mx1.lab,10".to_owned()];
    records.extend(host_record("mx1.lab", &[a, lab::CLIENT_ALLOWED_V6]));
    let mut dns = Dns::start(&lab, &records);
    let cfg = config(&["mx:corp.lab"], "");
    let agent = lab.start_agent("agent", &cfg).unwrap();
    wait("mx:corp.lab resolved", Duration::from_secs(10), || {
        status(&lab, &agent)["sources"]["names"][0]["addresses"]
            .as_array()
            .is_some_and(|a| a.len() == 2)
    });
    let list = cli(&lab, &agent, &["allow", "list"]);
    assert!(
        list.lines()
            .any(|l| l.starts_with("192.0.2.10/32") && l.contains("dns:mx:corp.lab via mx1.lab")),
        "{list}"
    );
    assert_eq!(connect(&lab, a), "connected");
    assert_eq!(connect(&lab, lab::CLIENT_ALLOWED_V6), "connected");
    assert_eq!(connect(&lab, b), "refused");
    let m = scrape(&lab);
    assert_eq!(
        metric(&m, "smtpgate_dns_failures_total{name=\"mx:corp.lab\"}"),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "smtpgate_dns_addresses{name=\"mx:corp.lab\"}"),
        Some(2.0),
        "{m}"
    );

    // The server goes away: the addresses stay, and everything says why.
    let (_, seen) = probing(&lab, a, || {
        dns.stop();
        wait("the failure in status", Duration::from_secs(15), || {
            status(&lab, &agent)["sources"]["names"][0]["failures"]
                .as_u64()
                .is_some_and(|n| n >= 2)
        });
    });
    all_connected("the last good address while DNS is down", &seen);
    assert_eq!(connect(&lab, lab::CLIENT_ALLOWED_V6), "connected");
    assert_eq!(connect(&lab, b), "refused");
    let st = status(&lab, &agent);
    let name = &st["sources"]["names"][0];
    assert!(
        name["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{name}"
    );
    let text = cli(&lab, &agent, &["status"]);
    assert!(
        text.contains("FAILING") && text.contains("keeping the last good addresses"),
        "{text}"
    );
    let m = scrape(&lab);
    let failures = metric(&m, "smtpgate_dns_failures_total{name=\"mx:corp.lab\"}").unwrap();
    let age = metric(
        &m,
        "smtpgate_dns_last_success_age_seconds{name=\"mx:corp.lab\"}",
    )
    .unwrap();
    assert!(failures >= 2.0, "{m}");
    assert!(age >= 1.0 && age.is_finite(), "age {age}: {m}");
    assert_eq!(
        metric(&m, "smtpgate_dns_addresses{name=\"mx:corp.lab\"}"),
        Some(2.0),
        "{m}"
    );
    let log = lab.read_log(&agent.log);
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("DNS lookup failed")),
        "{log}"
    );

    // A restart while DNS is still down enforces the saved addresses.
    lab.stop(agent.pid, false).unwrap();
    let agent = lab.start_agent("agent2", &cfg).unwrap();
    assert_eq!(connect(&lab, a), "connected");
    assert_eq!(connect(&lab, lab::CLIENT_ALLOWED_V6), "connected");
    assert_eq!(connect(&lab, b), "refused");
    wait(
        "the failure after the restart",
        Duration::from_secs(15),
        || {
            status(&lab, &agent)["sources"]["names"][0]["failures"]
                .as_u64()
                .is_some_and(|n| n >= 1)
        },
    );
    let st = status(&lab, &agent);
    let name = &st["sources"]["names"][0];
    assert_eq!(name["restored"], true, "{name}");
    let text = cli(&lab, &agent, &["status"]);
    assert!(text.contains("from the state file"), "{text}");

    // DNS back, with a changed record: the new answer applies.
    let mut records = vec!["--mx-host=corp.lab,mx1.lab,10".to_owned()];
    records.extend(host_record("mx1.lab", &[b]));
    dns.restart(&lab, &records);
    wait(
        "b allowed after DNS came back",
        Duration::from_secs(10),
        || connect(&lab, b) == "connected",
    );
    assert_eq!(connect(&lab, a), "refused");
    let st = status(&lab, &agent);
    let name = &st["sources"]["names"][0];
    assert_eq!(name["error"], serde_json::Value::Null, "{name}");
    assert_eq!(name["restored"], false, "{name}");
}

/// Writes `text` to `path` the way editors and config management do: a
/// new file renamed over the old one.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp-new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn allowlist_files_apply_live_and_a_broken_one_keeps_the_last_good_policy() {
    if !privileged() {
        return;
    }
    let mut lab = Lab::up("files", Options::default()).unwrap();
    lab.start_listeners().unwrap();
    let (a, b) = (lab::CLIENT_ALLOWED_V4, lab::CLIENT_DENIED_V4);
    let dir = lab.dir.join("allow.d");
    std::fs::create_dir(&dir).unwrap();
    let file = dir.join("mail.txt");
    std::fs::write(&file, format!("# mail hosts\n{a}\n")).unwrap();
    std::fs::write(dir.join("notes.md"), "192.0.2.20\n").unwrap();
    let files = format!("allowlist_files = [\"{}/*.txt\"]", dir.display());
    let agent = lab.start_agent("agent", &config(&[], &files)).unwrap();
    assert_eq!(connect(&lab, a), "connected");
    assert_eq!(connect(&lab, b), "refused");
    let list = cli(&lab, &agent, &["allow", "list"]);
    let origin = format!("file:{}:2", file.display());
    assert!(
        list.lines()
            .any(|l| l.starts_with("192.0.2.10/32") && l.contains(&origin)),
        "{list}"
    );

    // An edit in place (truncate and write): applied live; a, unchanged,
    // connects throughout.
    let (took, seen) = probing(&lab, a, || {
        let t0 = Instant::now();
        std::fs::write(&file, format!("{a}\n{b} # new relay\n")).unwrap();
        wait("b allowed", Duration::from_secs(5), || {
            connect(&lab, b) == "connected"
        });
        t0.elapsed()
    });
    all_connected("the unchanged entry during an edit", &seen);
    eprintln!(
        "MEASURED: an edited allowlist file applied {:.0} ms after the write; {} probes of the unchanged entry, all connected",
        took.as_secs_f64() * 1e3,
        seen.len()
    );
    // inotify, not the 2 s poll of an agent without it.
    assert!(took < Duration::from_secs(1), "took {took:?}");

    // Broken: the last good policy stays, and status, metrics and the log
    // say why.
    let (_, seen) = probing(&lab, b, || {
        replace(&file, &format!("{a}\n{b}\n192.0.2.300\n"));
        wait("the broken file in status", Duration::from_secs(5), || {
            status(&lab, &agent)["sources"]["files"][0]["error"].is_string()
        });
        std::thread::sleep(Duration::from_millis(500));
    });
    all_connected("the last good entries of a broken file", &seen);
    assert_eq!(connect(&lab, a), "connected");
    let text = cli(&lab, &agent, &["status"]);
    assert!(
        text.contains("BROKEN") && text.contains("line 3: \"192.0.2.300\""),
        "{text}"
    );
    let m = scrape(&lab);
    assert_eq!(
        metric(
            &m,
            &format!(
                "smtpgate_allowlist_file_valid{{path=\"{}\"}}",
                file.display()
            )
        ),
        Some(0.0),
        "{m}"
    );
    let log = lab.read_log(&agent.log);
    assert!(
        log.lines()
            .any(|l| l.contains("ERROR") && l.contains("allowlist file refused")),
        "{log}"
    );

    // Fixed, by a rename over it: the fix applies (a leaves).
    replace(&file, &format!("{b}\n"));
    let took = wait("a refused", Duration::from_secs(5), || {
        connect(&lab, a) == "refused"
    });
    eprintln!(
        "MEASURED: a file renamed into place applied {:.0} ms after the rename",
        took.as_secs_f64() * 1e3
    );
    assert_eq!(connect(&lab, b), "connected");
    let m = scrape(&lab);
    assert_eq!(
        metric(
            &m,
            &format!(
                "smtpgate_allowlist_file_valid{{path=\"{}\"}}",
                file.display()
            )
        ),
        Some(1.0),
        "{m}"
    );

    // A file broken while the agent is down: the next agent enforces its
    // last good entries.
    lab.stop(agent.pid, false).unwrap();
    std::fs::write(&file, "mail..lab\n").unwrap();
    let agent = lab.start_agent("agent2", &config(&[], &files)).unwrap();
    assert_eq!(connect(&lab, b), "connected");
    assert_eq!(connect(&lab, a), "refused");
    let text = cli(&lab, &agent, &["status"]);
    assert!(
        text.contains("BROKEN") && text.contains("two dots"),
        "{text}"
    );

    // A second file, then the first deleted: its entries leave.
    std::fs::write(dir.join("more.txt"), format!("{a}\n")).unwrap();
    wait("a allowed by more.txt", Duration::from_secs(5), || {
        connect(&lab, a) == "connected"
    });
    std::fs::remove_file(&file).unwrap();
    wait(
        "b refused after mail.txt went",
        Duration::from_secs(5),
        || connect(&lab, b) == "refused",
    );
    assert_eq!(connect(&lab, a), "connected");
    let st = status(&lab, &agent);
    assert_eq!(st["sources"]["files"].as_array().unwrap().len(), 1, "{st}");
}

/// The layout the kubelet gives a ConfigMap volume: the data in a
/// timestamped directory, `..data` pointing at it, and each key a symlink
/// through `..data`.
fn configmap(dir: &Path, version: &str, text: &str) -> PathBuf {
    let data = dir.join(format!("..{version}"));
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("allow.txt"), text).unwrap();
    data
}

#[test]
fn a_configmap_symlink_swap_applies_live() {
    if !privileged() {
        return;
    }
    let mut lab = Lab::up("configmap", Options::default()).unwrap();
    lab.start_listeners().unwrap();
    let (a, b, v6) = (
        lab::CLIENT_ALLOWED_V4,
        lab::CLIENT_DENIED_V4,
        lab::CLIENT_ALLOWED_V6,
    );
    let dir = lab.dir.join("configmap");
    let old = configmap(&dir, "2026_01_01_00_00_00.1", &format!("{a}\n{v6}\n"));
    std::os::unix::fs::symlink(old.file_name().unwrap(), dir.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/allow.txt", dir.join("allow.txt")).unwrap();
    let files = format!("allowlist_files = [\"{}/*.txt\"]", dir.display());
    let agent = lab.start_agent("agent", &config(&[], &files)).unwrap();
    assert_eq!(connect(&lab, a), "connected");
    assert_eq!(connect(&lab, v6), "connected");
    assert_eq!(connect(&lab, b), "refused");

    // The kubelet's update: new data directory, ..data_tmp -> it, renamed
    // over ..data, old directory removed. Nothing in the watched files
    // themselves changes.
    let (took, seen) = probing(&lab, v6, || {
        let t0 = Instant::now();
        let new = configmap(&dir, "2026_01_01_00_01_00.2", &format!("{b}\n{v6}\n"));
        std::os::unix::fs::symlink(new.file_name().unwrap(), dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        std::fs::remove_dir_all(&old).unwrap();
        wait("b allowed", Duration::from_secs(5), || {
            connect(&lab, b) == "connected"
        });
        t0.elapsed()
    });
    all_connected("the entry both versions have, during the swap", &seen);
    assert_eq!(connect(&lab, a), "refused");
    eprintln!(
        "MEASURED: a ConfigMap-style symlink swap applied {:.0} ms after it began; {} probes of the unchanged entry, all connected",
        took.as_secs_f64() * 1e3,
        seen.len()
    );
    // inotify, not the 2 s poll of an agent without it.
    assert!(took < Duration::from_secs(1), "took {took:?}");
    let log = lab.read_log(&agent.log);
    assert!(!log.contains("polling"), "{log}");
    let list = cli(&lab, &agent, &["allow", "list"]);
    let origin = format!("file:{}:1", dir.join("allow.txt").display());
    assert!(
        list.lines()
            .any(|l| l.starts_with("192.0.2.20/32") && l.contains(&origin)),
        "{list}"
    );
}
