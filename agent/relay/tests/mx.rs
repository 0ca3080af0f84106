//! Direct-to-MX delivery with a real DNS server (issue 12, item 3): dnsmasq
//! serves a lab zone under example.test; smtp-sink instances are the MX
//! hosts, on 127.0.0.x port 25; a private Postfix instance is the MX with a
//! self-signed certificate (smtp-sink speaks no TLS, and the relay itself
//! cannot stand in: it accepts mail only after AUTH, on every listener).
//! swaks submits as a user whose sender domain has an MX of its own, so
//! bounces are seen arriving there.
//!
//! Each test re-runs itself in new network and PID namespaces (`unshare`):
//! port 25 and 127.0.0.0/8 are then its own, tests run side by side,
//! nothing can leave the namespace, and every process a test started dies
//! with it. That needs root, as CI has; elsewhere the tests fail, loudly.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Lab, Sink, fast_hash, free_port, require_tool};
use smtpgate_relay::queue::RcptState;
use smtpgate_relay::{Listeners, MxTls, Relay, RelayConfig};

const NETNS_ENV: &str = "SMTPGATE_TEST_IN_NETNS";
const DNSMASQ: &str = "/usr/sbin/dnsmasq";
const POSTFIX: &str = "/usr/sbin/postfix";

/// Runs `body` in a network namespace of its own: re-executes this test
/// binary for test `name` under `unshare`, with loopback up.
fn netns_test<F: std::future::Future<Output = ()>>(name: &str, body: impl FnOnce() -> F) {
    if std::env::var_os(NETNS_ENV).is_some() {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(body());
        return;
    }
    assert!(
        common::is_root(),
        "{name} needs root (network namespaces, port 25), as CI has; refusing to skip"
    );
    let out = Command::new("unshare")
        .args(["--net", "--pid", "--fork", "--kill-child", "--"])
        .args(["sh", "-c", "ip link set lo up && exec \"$0\" \"$@\""])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(NETNS_ENV, "1")
        .stdin(Stdio::null())
        .output()
        .expect("running unshare (util-linux)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{name} in its namespace failed:\n{text}"
    );
    assert!(
        text.contains("1 passed"),
        "{name} ran nothing in its namespace:\n{text}"
    );
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// The lab zone, as dnsmasq options. `--local` makes dnsmasq authoritative
/// for example.test: a name it does not hold is NXDOMAIN, a type it does
/// not hold is NODATA, and nothing is forwarded anywhere.
const ZONE: &[&str] = &[
    "--local=/example.test/",
    // The submitting user's domain: bounces arrive here.
    "--mx-host=sender.example.test,mx.sender.example.test,10",
    "--host-record=mx.sender.example.test,127.0.0.20",
    // Three MX hosts by preference: down, busy (4xx to MAIL), good.
    "--mx-host=two.example.test,mx1.two.example.test,10",
    "--mx-host=two.example.test,mx2.two.example.test,20",
    "--mx-host=two.example.test,mx3.two.example.test,30",
    "--host-record=mx1.two.example.test,127.0.0.2",
    "--host-record=mx2.two.example.test,127.0.0.3",
    "--host-record=mx3.two.example.test,127.0.0.4",
    // Postfix with a self-signed certificate.
    "--mx-host=tls.example.test,mx.tls.example.test,10",
    "--host-record=mx.tls.example.test,127.0.0.5",
    // Postfix whose TLS no client can complete (TLS 1.0/1.1 only).
    "--mx-host=oldtls.example.test,mx.oldtls.example.test,10",
    "--host-record=mx.oldtls.example.test,127.0.0.9",
    // No MX at all: the domain's own address (implicit MX).
    "--host-record=implicit.example.test,127.0.0.6",
    // RFC 7505 null MX, "0 .", as raw RDATA: preference 0, root name.
    "--dns-rr=nullmx.example.test,15,000000",
    // An MX that refuses every recipient with 5xx.
    "--mx-host=reject.example.test,mx.reject.example.test,10",
    "--host-record=mx.reject.example.test,127.0.0.7",
    // An MX without STARTTLS.
    "--mx-host=plain.example.test,mx.plain.example.test,10",
    "--host-record=mx.plain.example.test,127.0.0.8",
    // A server error at once (REFUSED: with no upstream to use, dnsmasq
    // refuses), and no answer at all (forwarded to a port where nothing
    // listens): both mean "try again later".
    "--server=/refused.example.test/#",
    "--server=/timeout.example.test/127.0.0.1#9",
];

/// dnsmasq on 127.0.0.1:<free port> serving `ZONE`.
struct Dns {
    addr: SocketAddr,
    child: Child,
    /// dnsmasq's query log.
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Dns {
    fn start() -> Self {
        require_tool(DNSMASQ);
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("dnsmasq.log");
        let child = Command::new(DNSMASQ)
            .args([
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                "--conf-file=/dev/null",
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                "--user=root",
                "--group=root",
                "--pid-file=",
                "--log-queries",
                // Real zones have TTLs; dnsmasq's own data has 0 unless told.
                "--local-ttl=300",
            ])
            .arg(format!("--log-facility={}", log.display()))
            .arg(format!("--port={port}"))
            .args(ZONE)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawning dnsmasq");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        // It listens on TCP as well: connectable means ready.
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "dnsmasq did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            addr,
            child,
            log,
            _dir: dir,
        }
    }

    /// How many `rtype` queries for `name` reached the server.
    fn queries(&self, rtype: &str, name: &str) -> usize {
        let needle = format!("query[{rtype}] {name} from");
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&needle))
            .count()
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A private Postfix instance (its own config, queue and log under `dir`)
/// as the MX `mx.<domain>` on `listen`, with a self-signed
/// certificate, relaying what it accepts to `next` (a smtp-sink).
struct Postfix {
    etc: PathBuf,
    log: PathBuf,
    child: Child,
}

impl Postfix {
    /// `extra` is appended to main.cf.
    fn start(dir: &Path, listen: SocketAddr, domain: &str, next: SocketAddr, extra: &str) -> Self {
        let name = format!("mx.{domain}");
        require_tool(POSTFIX);
        let etc = dir.join("etc");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::create_dir_all(dir.join("queue")).unwrap();
        std::fs::create_dir_all(dir.join("data")).unwrap();
        // Postfix's daemons run as the postfix user: it must reach (not
        // read) the test's private directory, and own its data directory.
        for d in dir
            .ancestors()
            .take_while(|d| d.starts_with(std::env::temp_dir()) && *d != std::env::temp_dir())
        {
            chmod(d, 0o755);
        }
        let st = Command::new("chown")
            .args(["postfix:postfix"])
            .arg(dir.join("data"))
            .status()
            .unwrap();
        assert!(st.success(), "chown postfix data directory");
        let (cert, key) = smtpgate_relay::write_lab_cert(&etc, &[name.as_str()]).unwrap();
        let log = dir.join("maillog");
        let d = dir.display();
        std::fs::write(
            etc.join("main.cf"),
            format!(
                "compatibility_level = 3.6\n\
                 queue_directory = {d}/queue\n\
                 data_directory = {d}/data\n\
                 mail_owner = postfix\n\
                 setgid_group = postdrop\n\
                 myhostname = {name}\n\
                 mydestination =\n\
                 inet_interfaces = all\n\
                 inet_protocols = ipv4\n\
                 mynetworks = 127.0.0.0/8\n\
                 relay_domains = {domain}\n\
                 relayhost = [{ip}]:{port}\n\
                 smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination\n\
                 smtpd_tls_cert_file = {cert}\n\
                 smtpd_tls_key_file = {key}\n\
                 smtpd_tls_security_level = may\n\
                 smtpd_tls_received_header = yes\n\
                 smtp_tls_security_level = none\n\
                 smtputf8_enable = yes\n\
                 maillog_file = {log}\n\
                 maillog_file_prefixes = {d}\n\
                 alias_maps =\n\
                 alias_database =\n\
                 biff = no\n\
                 {extra}\n",
                ip = next.ip(),
                port = next.port(),
                cert = cert.display(),
                key = key.display(),
                log = log.display(),
            ),
        )
        .unwrap();
        // Only what an MX that relays on needs; no chroot.
        std::fs::write(
            etc.join("master.cf"),
            format!(
                "{listen} inet n - n - - smtpd\n\
             pickup unix n - n 60 1 pickup\n\
             cleanup unix n - n - 0 cleanup\n\
             qmgr unix n - n 300 1 qmgr\n\
             tlsmgr unix - - n 1000? 1 tlsmgr\n\
             rewrite unix - - n - - trivial-rewrite\n\
             bounce unix - - n - 0 bounce\n\
             defer unix - - n - 0 bounce\n\
             trace unix - - n - 0 bounce\n\
             verify unix - - n - 1 verify\n\
             flush unix n - n 1000? 0 flush\n\
             proxymap unix - - n - - proxymap\n\
             smtp unix - - n - - smtp\n\
             relay unix - - n - - smtp\n\
             showq unix n - n - - showq\n\
             error unix - - n - - error\n\
             retry unix - - n - - error\n\
             discard unix - - n - - discard\n\
             anvil unix - - n - 1 anvil\n\
             scache unix - - n - 1 scache\n\
             postlog unix-dgram n - n - 1 postlogd\n"
            ),
        )
        .unwrap();
        let out = std::fs::File::create(dir.join("postfix.out")).unwrap();
        let child = Command::new(POSTFIX)
            .arg("-c")
            .arg(&etc)
            .arg("start-fg")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawning postfix");
        let me = Self { etc, log, child };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(listen).is_err() {
            assert!(
                Instant::now() < deadline,
                "postfix did not start: {}\n{}",
                std::fs::read_to_string(dir.join("postfix.out")).unwrap_or_default(),
                me.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        me
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = Command::new(POSTFIX)
            .arg("-c")
            .arg(&self.etc)
            .arg("stop")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A lab with carol, who sends as @sender.example.test, and a relay config
/// that delivers straight to MX hosts through the lab DNS server.
fn mx_lab(dns: &Dns) -> (Lab, RelayConfig) {
    let lab = Lab::new();
    smtpgate_relay::users::user_add_hash(
        &lab.users,
        "carol",
        &fast_hash("carol-pw"),
        vec!["@sender.example.test".into()],
    )
    .unwrap();
    let mut cfg = lab.config(None);
    cfg.hostname = "relay.example.test".into();
    cfg.nameservers = vec![dns.addr];
    (lab, cfg)
}

/// swaks submits as carol over STARTTLS with AUTH; `to` is a comma list.
async fn swaks_submit(relay: SocketAddr, to: &str, subject: &str) {
    require_tool(common::SWAKS);
    let out = tokio::process::Command::new(common::SWAKS)
        .args([
            "--server",
            &relay.to_string(),
            "--ehlo",
            "client.test",
            "-tls",
        ])
        .args([
            "--auth",
            "PLAIN",
            "--auth-user",
            "carol",
            "--auth-password",
            "carol-pw",
        ])
        .args(["--from", "carol@sender.example.test", "--to", to])
        .args(["--header", &format!("Subject: {subject}")])
        .args(["--body", &format!("body of {subject}")])
        .output()
        .await
        .expect("running swaks");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("250 2.0.0 Ok: queued"),
        "swaks to {to}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn queue(lab: &Lab) -> Vec<smtpgate_relay::queue::QueueRecord> {
    smtpgate_relay::queue::list(&lab.spool).unwrap()
}

/// The first MX refuses connections, the second answers MAIL with 4xx, the
/// third takes the message: delivered in the first attempt, by the third.
#[test]
fn two_mx_first_down_second_busy_third_delivers() {
    netns_test("two_mx_first_down_second_busy_third_delivers", || async {
        let dns = Dns::start();
        let (lab, cfg) = mx_lab(&dns);
        let d = lab.dir.path();
        // mx1 (127.0.0.2): nothing listens.
        let busy = Sink::start_with(&d.join("mx2"), addr("127.0.0.3:25"), &["-r", "MAIL"]);
        let good = Sink::start_with(&d.join("mx3"), addr("127.0.0.4:25"), &[]);
        let relay = Relay::start(cfg, Listeners::default()).await.unwrap();
        swaks_submit(
            relay.addrs().submission.unwrap(),
            "dana@two.example.test",
            "three-mx",
        )
        .await;
        let got = good
            .wait_for("delivery by the third MX", Duration::from_secs(30), |m| {
                m.iter().any(|d| d.contains("body of three-mx"))
            })
            .await;
        let (env, msg) = common::sink_split(&got[0]);
        assert!(
            env.iter()
                .any(|l| l == "X-Rcpt-Args: <dana@two.example.test>"),
            "{env:?}"
        );
        assert!(
            env.iter().any(|l| l == "X-Helo-Args: relay.example.test"),
            "{env:?}"
        );
        assert!(msg.contains("Subject: three-mx"), "{msg}");
        until("empty queue", 10, || queue(&lab).is_empty()).await;
        let s = relay.stats().snapshot();
        assert_eq!(
            (s.recipients_delivered, s.deliveries_deferred),
            (1, 0),
            "{s:?}"
        );
        // A second message: the relay's one resolver answers from its
        // cache (a resolver per lookup, as before, asked every time).
        swaks_submit(
            relay.addrs().submission.unwrap(),
            "dana@two.example.test",
            "again",
        )
        .await;
        good.wait_for("the second delivery", Duration::from_secs(30), |m| {
            m.iter().any(|d| d.contains("body of again"))
        })
        .await;
        assert_eq!(dns.queries("MX", "two.example.test"), 1);
        assert_eq!(dns.queries("A", "mx3.two.example.test"), 1);
        assert!(busy.messages().is_empty(), "the busy MX got a transaction");
        relay.shutdown().await;
    });
}

/// An MX with a self-signed certificate. Opportunistic (the default): the
/// message goes out at once, over STARTTLS, unverified; Postfix's Received
/// header shows the TLS. An MX whose TLS cannot be completed at all gets
/// the message in plaintext, at once. With mx_tls = "verify" it waits in the queue
/// (typed certificate failure), and so does mail to an MX without STARTTLS.
#[test]
fn self_signed_mx_opportunistic_delivers_over_tls_verify_defers() {
    netns_test(
        "self_signed_mx_opportunistic_delivers_over_tls_verify_defers",
        || async {
            let dns = Dns::start();
            let (lab, cfg) = mx_lab(&dns);
            let d = lab.dir.path();
            let after = Sink::start_with(
                &d.join("after"),
                SocketAddr::from(([127, 0, 0, 1], free_port())),
                &[],
            );
            let postfix = Postfix::start(
                &d.join("postfix"),
                addr("127.0.0.5:25"),
                "tls.example.test",
                SocketAddr::from(([127, 0, 0, 1], after.port)),
                "",
            );
            let plain = Sink::start_with(&d.join("plain"), addr("127.0.0.8:25"), &[]);

            assert_eq!(cfg.mx_tls, MxTls::Opportunistic);
            let relay = Relay::start(cfg, Listeners::default()).await.unwrap();
            swaks_submit(
                relay.addrs().submission.unwrap(),
                "erin@tls.example.test",
                "self-signed",
            )
            .await;
            let got = after
                .wait_for("delivery through Postfix", Duration::from_secs(30), |m| {
                    m.iter().any(|d| d.contains("body of self-signed"))
                })
                .await;
            let (_, msg) = common::sink_split(&got[0]);
            let by_postfix = msg
                .split("\nReceived: ")
                .find(|h| h.contains("by mx.tls.example.test (Postfix)"))
                .unwrap_or_else(|| panic!("Postfix's Received header: {msg}"));
            assert!(
                by_postfix.contains("from relay.example.test (localhost [127.0.0.1])")
                    && by_postfix.contains("(using TLSv1.")
                    && by_postfix.contains("with ESMTPS"),
                "STARTTLS to the self-signed MX: {by_postfix}"
            );
            until("empty queue", 10, || queue(&lab).is_empty()).await;
            assert_eq!(relay.stats().snapshot().deliveries_deferred, 0);
            // A TLS handshake that fails for another reason than the certificate
            // (this Postfix offers STARTTLS but only TLS 1.0/1.1, which rustls does
            // not speak): plaintext, at once.
            let old = Postfix::start(
                &d.join("postfix-old"),
                addr("127.0.0.9:25"),
                "oldtls.example.test",
                SocketAddr::from(([127, 0, 0, 1], after.port)),
                "smtpd_tls_protocols = !SSLv2, !SSLv3, !TLSv1.2, !TLSv1.3\n\
                 smtpd_tls_mandatory_protocols = !SSLv2, !SSLv3, !TLSv1.2, !TLSv1.3",
            );
            swaks_submit(
                relay.addrs().submission.unwrap(),
                "olga@oldtls.example.test",
                "old-tls",
            )
            .await;
            let got = after
                .wait_for("delivery in plaintext", Duration::from_secs(30), |m| {
                    m.iter().any(|d| d.contains("body of old-tls"))
                })
                .await;
            let dump = got.iter().find(|d| d.contains("body of old-tls")).unwrap();
            let (_, msg) = common::sink_split(dump);
            let by_old = msg
                .split("\nReceived: ")
                .find(|h| h.contains("by mx.oldtls.example.test (Postfix)"))
                .unwrap_or_else(|| panic!("{msg}"));
            assert!(
                by_old.contains("with ESMTP ") && !by_old.contains("using TLS"),
                "plaintext after the failed handshake: {by_old}"
            );
            assert!(old.log().contains("SSL_accept error"), "{}", old.log());
            until("empty queue", 10, || queue(&lab).is_empty()).await;
            assert_eq!(relay.stats().snapshot().deliveries_deferred, 0);
            drop(old);
            relay.shutdown().await;

            // The same MX with verification required: deferred, not sent; an
            // MX without STARTTLS: the same.
            let (lab2, mut cfg2) = mx_lab(&dns);
            cfg2.mx_tls = MxTls::Verify;
            let relay = Relay::start(cfg2, Listeners::default()).await.unwrap();
            swaks_submit(
                relay.addrs().submission.unwrap(),
                "erin@tls.example.test,finn@plain.example.test",
                "verify",
            )
            .await;
            until("two deferred attempts on disk", 30, || {
                queue(&lab2)
                    .first()
                    .is_some_and(|r| r.recipients.iter().all(|r| r.attempts >= 2))
            })
            .await;
            let q = queue(&lab2);
            assert_eq!(q.len(), 1, "{q:?}");
            for r in &q[0].recipients {
                assert_eq!(r.state, RcptState::Pending, "{r:?}");
            }
            let err = |who: &str| {
                q[0].recipients
                    .iter()
                    .find(|r| r.address.starts_with(who))
                    .and_then(|r| r.last_error.clone())
                    .unwrap_or_default()
            };
            assert!(
                err("erin").starts_with(
                    "4.7.5 TLS with mx.tls.example.test[127.0.0.5:25] failed (certificate)"
                ),
                "{}",
                err("erin")
            );
            assert!(
                err("finn").starts_with(
                    "4.7.5 mx.plain.example.test[127.0.0.8:25] does not offer STARTTLS"
                ),
                "{}",
                err("finn")
            );
            assert!(relay.stats().snapshot().deliveries_deferred >= 2);
            assert_eq!(
                after
                    .messages()
                    .iter()
                    .filter(|d| d.contains("body of verify"))
                    .count(),
                0,
                "sent despite mx_tls = verify"
            );
            assert!(
                plain.messages().is_empty(),
                "sent in plaintext despite mx_tls = verify"
            );
            drop(postfix);
            relay.shutdown().await;
        },
    );
}

/// One message, five recipients: at one MX (Postfix) one recipient is
/// accepted and one refused with 550; another domain's MX refuses its
/// recipient with 550; a fourth domain's DNS fails (REFUSED). The accepted
/// one is delivered once, the two refused ones bounce at once, in one
/// bounce, while the deferred one is still queued; nothing is sent twice
/// over the retries that follow.
#[test]
fn split_recipients_deliver_once_and_5xx_bounces_at_once() {
    netns_test(
        "split_recipients_deliver_once_and_5xx_bounces_at_once",
        || async {
            let dns = Dns::start();
            let (lab, cfg) = mx_lab(&dns);
            let d = lab.dir.path();
            let after = Sink::start_with(
                &d.join("after"),
                SocketAddr::from(([127, 0, 0, 1], free_port())),
                &[],
            );
            let postfix = Postfix::start(
                &d.join("postfix"),
                addr("127.0.0.5:25"),
                "tls.example.test",
                SocketAddr::from(([127, 0, 0, 1], after.port)),
                "smtpd_recipient_restrictions = check_recipient_access \
                 inline:{ { nobody@tls.example.test = 550 5.1.1 No such user here } }, permit",
            );
            let reject = Sink::start_with(
                &d.join("reject"),
                addr("127.0.0.7:25"),
                &[
                    "-f",
                    "RCPT",
                    "-B",
                    "550 5.1.1 Recipient address rejected: unknown user",
                ],
            );
            let bounces = Sink::start_with(&d.join("bounces"), addr("127.0.0.20:25"), &[]);
            let relay = Relay::start(cfg, Listeners::default()).await.unwrap();
            swaks_submit(
            relay.addrs().submission.unwrap(),
            "gail@tls.example.test,nobody@tls.example.test,hank@reject.example.test,ivan@refused.example.test",
            "split",
        )
        .await;
            let got = bounces
                .wait_for("the bounce", Duration::from_secs(60), |m| {
                    m.iter().any(|d| d.contains("Final-Recipient"))
                })
                .await;
            let (env, dsn) = common::sink_split(&got[0]);
            assert!(env.iter().any(|l| l == "X-Mail-Args: <>"), "{env:?}");
            assert!(
                env.iter()
                    .any(|l| l == "X-Rcpt-Args: <carol@sender.example.test>"),
                "{env:?}"
            );
            for (who, status) in [
                ("nobody@tls.example.test", "5.1.1"),
                ("hank@reject.example.test", "5.1.1"),
            ] {
                assert!(
                    dsn.contains(&format!(
                        "Final-Recipient: rfc822; {who}\nAction: failed\nStatus: {status}\n"
                    )),
                    "{who}: {dsn}"
                );
            }
            assert!(
                dsn.contains("No such user here"),
                "Postfix's own words: {dsn}"
            );
            assert!(
                !dsn.contains("Final-Recipient: rfc822; gail@")
                    && !dsn.contains("Final-Recipient: rfc822; ivan@"),
                "{dsn}"
            );
            // The bounce went out while ivan is still queued.
            let q = queue(&lab);
            let orig = q
                .iter()
                .find(|r| !r.is_dsn)
                .expect("original still queued for ivan");
            let st = |who: &str| {
                orig.recipients
                    .iter()
                    .find(|r| r.address.starts_with(who))
                    .unwrap()
                    .clone()
            };
            assert_eq!(st("gail").state, RcptState::Delivered);
            assert_eq!(st("ivan").state, RcptState::Pending);
            assert!(
                st("ivan")
                    .last_error
                    .unwrap_or_default()
                    .starts_with("451 4.4.3 refused.example.test: MX lookup failed"),
                "{orig:?}"
            );
            for who in ["nobody", "hank"] {
                let r = st(who);
                assert!(
                    r.state == RcptState::Failed && r.notified && r.attempts == 1,
                    "{r:?}"
                );
            }
            let delivered = after
                .wait_for("gail's copy", Duration::from_secs(30), |m| {
                    m.iter().any(|d| d.contains("body of split"))
                })
                .await;
            // Let a few retries for ivan pass: nothing more may arrive.
            let a = orig.attempts;
            until("two more attempts for ivan", 60, || {
                queue(&lab)
                    .iter()
                    .find(|r| !r.is_dsn)
                    .is_some_and(|r| r.attempts >= a + 2)
            })
            .await;
            let copies = after
                .messages()
                .into_iter()
                .filter(|d| d.contains("body of split"))
                .collect::<Vec<_>>();
            assert_eq!(copies.len(), 1, "gail got {} copies", copies.len());
            let (env, _) = common::sink_split(&delivered[0]);
            assert!(
                env.iter()
                    .any(|l| l.starts_with("X-Rcpt-Args: <gail@tls.example.test>")),
                "{env:?}"
            );
            assert!(!env.iter().any(|l| l.contains("nobody@")), "{env:?}");
            assert_eq!(bounces.messages().len(), 1, "bounced once");
            assert!(reject.messages().is_empty());
            assert_eq!(relay.stats().snapshot().messages_bounced, 1);
            assert!(
                postfix.log().contains("reject: RCPT from"),
                "{}",
                postfix.log()
            );
            let id = queue(&lab).into_iter().find(|r| !r.is_dsn).unwrap().id;
            relay.delete(&id).unwrap();
            relay.shutdown().await;
        },
    );
}

/// A null MX (RFC 7505) and a domain that does not exist bounce in the
/// first attempt, each with its own status; a domain without MX gets its
/// mail at its own address (implicit MX).
#[test]
fn null_mx_and_nxdomain_bounce_at_once_no_mx_uses_the_address() {
    netns_test(
        "null_mx_and_nxdomain_bounce_at_once_no_mx_uses_the_address",
        || async {
            let dns = Dns::start();
            let (lab, cfg) = mx_lab(&dns);
            let d = lab.dir.path();
            let implicit = Sink::start_with(&d.join("implicit"), addr("127.0.0.6:25"), &[]);
            let bounces = Sink::start_with(&d.join("bounces"), addr("127.0.0.20:25"), &[]);
            let relay = Relay::start(cfg, Listeners::default()).await.unwrap();
            swaks_submit(
                relay.addrs().submission.unwrap(),
                "jan@nullmx.example.test,kim@nx.example.test,lee@implicit.example.test",
                "dns",
            )
            .await;
            implicit
                .wait_for(
                    "delivery to the implicit MX",
                    Duration::from_secs(30),
                    |m| m.iter().any(|d| d.contains("body of dns")),
                )
                .await;
            let got = bounces
                .wait_for("the bounce", Duration::from_secs(30), |m| {
                    m.iter().any(|d| d.contains("Final-Recipient"))
                })
                .await;
            let (_, dsn) = common::sink_split(&got[0]);
            assert!(
            dsn.contains("Final-Recipient: rfc822; jan@nullmx.example.test\nAction: failed\nStatus: 5.1.10\n"),
            "{dsn}"
        );
            assert!(dsn.contains("null MX, RFC 7505"), "{dsn}");
            assert!(
                dsn.contains(
                    "Final-Recipient: rfc822; kim@nx.example.test\nAction: failed\nStatus: 5.1.2\n"
                ),
                "{dsn}"
            );
            assert!(!dsn.contains("Final-Recipient: rfc822; lee@"), "{dsn}");
            until("empty queue", 20, || queue(&lab).is_empty()).await;
            let s = relay.stats().snapshot();
            assert_eq!((s.deliveries_deferred, s.messages_bounced), (0, 1), "{s:?}");
            relay.shutdown().await;
        },
    );
}

/// The delivery mark on the real delivery path, judged by the kernel: in
/// the test's namespace an nftables rule (standing in for the agent's
/// datapath) rejects every port-25 connection without the mark. The relay
/// with `delivery_mark` delivers to the MX; without it the same message is
/// deferred; and another process (swaks, unmarked) is refused.
#[test]
fn delivery_mark_gets_the_relay_out_where_port_25_is_closed() {
    netns_test(
        "delivery_mark_gets_the_relay_out_where_port_25_is_closed",
        || async {
            const MARK: u32 = 0x0534_7002;
            let nft = |rules: &str| {
                let st = Command::new("nft")
                    .args(["-f", "-"])
                    .stdin(Stdio::piped())
                    .spawn()
                    .and_then(|mut c| {
                        use std::io::Write;
                        c.stdin.take().unwrap().write_all(rules.as_bytes())?;
                        c.wait()
                    });
                assert!(st.is_ok_and(|s| s.success()), "nft -f: {rules}");
            };
            let dns = Dns::start();
            let d = Lab::new();
            // Started (and checked) before port 25 closes.
            let mx = Sink::start_with(&d.dir.path().join("mx3"), addr("127.0.0.4:25"), &[]);
            require_tool("/usr/sbin/nft");
            // Standing in for the datapath: port 25 only with the mark.
            nft(&format!(
                "table inet lab {{\n\tchain out {{\n\t\ttype filter hook output priority 0\n\
                 \t\ttcp dport 25 meta mark != {MARK:#x} reject with tcp reset\n\t}}\n}}\n"
            ));
            // Unmarked, the way any other process connects: refused.
            assert!(
                std::net::TcpStream::connect("127.0.0.4:25").is_err(),
                "port 25 open without the mark"
            );

            let (lab, mut cfg) = mx_lab(&dns);
            cfg.delivery_mark = Some(MARK);
            let relay = Relay::start(cfg, Listeners::default()).await.unwrap();
            swaks_submit(
                relay.addrs().submission.unwrap(),
                "mark@two.example.test",
                "marked",
            )
            .await;
            mx.wait_for("the marked delivery", Duration::from_secs(30), |m| {
                m.iter().any(|d| d.contains("body of marked"))
            })
            .await;
            until("empty queue", 10, || queue(&lab).is_empty()).await;
            relay.shutdown().await;

            let (lab, cfg) = mx_lab(&dns);
            assert_eq!(cfg.delivery_mark, None);
            let relay = Relay::start(cfg, Listeners::default()).await.unwrap();
            swaks_submit(
                relay.addrs().submission.unwrap(),
                "nomark@two.example.test",
                "unmarked",
            )
            .await;
            until("a deferred attempt", 30, || {
                queue(&lab)
                    .first()
                    .is_some_and(|r| r.recipients[0].attempts >= 1)
            })
            .await;
            let q = queue(&lab);
            assert_eq!(q[0].recipients[0].state, RcptState::Pending, "{q:?}");
            assert!(
                q[0].recipients[0].last_error.as_deref().is_some_and(|e| e
                    .starts_with("4.4.1 connection to mx3.two.example.test[127.0.0.4:25] failed")),
                "{q:?}"
            );
            assert!(!mx.messages().iter().any(|d| d.contains("body of unmarked")));
            relay.shutdown().await;
        },
    );
}
