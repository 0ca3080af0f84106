//! Shared helpers for the integration tests: a TLS-capable SMTP client, a
//! lab relay config, and RAII wrappers for real peers (smtp-sink, swaks).
//! Tools that a test needs must exist: a missing one fails the test loudly.

#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls_pki_types::pem::PemObject;
use smtpgate_relay::{RelayConfig, UpstreamConfig, UpstreamTls};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::Child as TokioChild;

pub const SMTP_SINK: &str = "/usr/sbin/smtp-sink";
pub const SWAKS: &str = "/usr/bin/swaks";

pub fn require_tool(path: &str) {
    assert!(
        Path::new(path).exists(),
        "{path} is required for this test (apt-get install postfix swaks); refusing to skip silently"
    );
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
    })
}

pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A lab directory: TLS cert, users file (alice, bob), spool.
pub struct Lab {
    pub dir: tempfile::TempDir,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub users: PathBuf,
    pub spool: PathBuf,
}

mod fast_hash;
pub use fast_hash::fast_hash;

impl Lab {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = smtpgate_relay::write_lab_cert(dir.path(), &["localhost"]).unwrap();
        let users = dir.path().join("users.toml");
        smtpgate_relay::users::user_add_hash(
            &users,
            "alice",
            &fast_hash("alice-pw"),
            vec!["alice@example.com".into()],
        )
        .unwrap();
        smtpgate_relay::users::user_add_hash(
            &users,
            "bob",
            &fast_hash("bob-pw"),
            vec!["@example.org".into()],
        )
        .unwrap();
        let spool = dir.path().join("spool");
        Self {
            dir,
            cert,
            key,
            users,
            spool,
        }
    }

    pub fn config(&self, sink_port: Option<u16>) -> RelayConfig {
        let mut c = RelayConfig {
            enabled: true,
            hostname: "relay.test".into(),
            submission_listen: Some("127.0.0.1:0".parse().unwrap()),
            submissions_listen: Some("127.0.0.1:0".parse().unwrap()),
            intercept_listen: None,
            tls_cert: self.cert.clone(),
            tls_key: self.key.clone(),
            users_file: self.users.clone(),
            spool_dir: self.spool.clone(),
            // The lab's own (empty unless a test adds keys), never the host's.
            dkim_dir: self.dir.path().join("dkim"),
            upstream: sink_port.map(|p| UpstreamConfig {
                host: "127.0.0.1".into(),
                port: p,
                tls: UpstreamTls::None,
                username: None,
                password_file: None,
                ca_file: None,
            }),
            ..RelayConfig::default()
        };
        c.limits.auth_failure_delay_secs = 0.0;
        c.retry.initial_backoff_secs = 0.2;
        c.retry.max_backoff_secs = 0.5;
        c.retry.attempt_timeout_secs = 5.0;
        c
    }

    pub fn cert_pem(&self) -> String {
        std::fs::read_to_string(&self.cert).unwrap()
    }
}

/// smtp-sink dumping each message to its own file under `dir`.
pub struct Sink {
    pub port: u16,
    pub dir: PathBuf,
    child: Child,
}

impl Sink {
    pub fn start(dir: &Path, port: u16) -> Self {
        Self::start_with(dir, SocketAddr::from(([127, 0, 0, 1], port)), &[])
    }

    /// On `addr` (e.g. an MX host's 127.0.0.x:25 in a test's own network
    /// namespace), with extra smtp-sink options (`-r MAIL`, `-f RCPT`, `-8`).
    pub fn start_with(dir: &Path, addr: SocketAddr, extra: &[&str]) -> Self {
        require_tool(SMTP_SINK);
        std::fs::create_dir_all(dir).unwrap();
        let child = Command::new(SMTP_SINK)
            .args(["-u", "root", "-d", &format!("{}/msg.", dir.display())])
            .args(extra)
            .args([&addr.to_string(), "100"])
            .stdin(Stdio::null())
            .spawn()
            .expect("spawning smtp-sink");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "smtp-sink did not start on {addr}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            port: addr.port(),
            dir: dir.into(),
            child,
        }
    }

    /// Dumped messages (smtp-sink's own headers included).
    pub fn messages(&self) -> Vec<String> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.dir).unwrap().flatten() {
            if let Ok(b) = std::fs::read(e.path()) {
                out.push(String::from_utf8_lossy(&b).into_owned());
            }
        }
        out
    }

    /// Waits until `pred` holds for the dumped messages.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&[String]) -> bool,
    ) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let m = self.messages();
            if pred(&m) {
                return m;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; sink has {} messages",
                m.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Splits a smtp-sink dump into (envelope lines, message as received with
/// LF line ends). smtp-sink ends its own headers with a three-line
/// Received header and appends one empty line after the message.
pub fn sink_split(dump: &str) -> (Vec<String>, String) {
    let marker = dump.find("Received: from ").expect("sink Received header");
    let env: Vec<String> = dump[..marker].lines().map(str::to_owned).collect();
    let rest = &dump[marker..];
    let mut lines = rest.split_inclusive('\n');
    lines.next();
    lines.next();
    lines.next();
    let msg: String = lines.collect();
    (env, msg.strip_suffix('\n').unwrap_or(&msg).to_owned())
}

/// Removes the relay's Received header (first header, folded with tabs).
pub fn strip_relay_received(msg: &str) -> &str {
    assert!(
        msg.starts_with("Received: from "),
        "relay Received header missing: {msg:?}"
    );
    let mut idx = 0;
    for (i, line) in msg.split_inclusive('\n').enumerate() {
        if i > 0 && !line.starts_with('\t') {
            return &msg[idx..];
        }
        idx += line.len();
    }
    ""
}

pub fn tls_connector(cert_pem: &str) -> tokio_rustls::TlsConnector {
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

enum S {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Gone,
}

/// Minimal SMTP client for scripted dialogues against a real listener.
pub struct Client {
    s: S,
    buf: Vec<u8>,
    cert_pem: String,
}

impl Client {
    pub async fn connect(addr: SocketAddr, cert_pem: &str) -> Self {
        let s = TcpStream::connect(addr).await.expect("connect");
        Self::from_tcp(s, cert_pem)
    }

    /// Over a connection the caller set up (e.g. from a chosen source).
    pub fn from_tcp(s: TcpStream, cert_pem: &str) -> Self {
        Self {
            s: S::Plain(s),
            buf: Vec::new(),
            cert_pem: cert_pem.into(),
        }
    }

    /// Port 465 style: TLS from the first byte.
    pub async fn connect_tls(addr: SocketAddr, cert_pem: &str) -> Self {
        let mut c = Self::connect(addr, cert_pem).await;
        c.upgrade().await;
        c
    }

    pub async fn upgrade(&mut self) {
        let S::Plain(raw) = std::mem::replace(&mut self.s, S::Gone) else {
            panic!("already TLS")
        };
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let tls = tls_connector(&self.cert_pem)
            .connect(name, raw)
            .await
            .expect("TLS handshake");
        self.s = S::Tls(Box::new(tls));
    }

    pub async fn send_bytes(&mut self, b: &[u8]) -> std::io::Result<()> {
        match &mut self.s {
            S::Plain(s) => s.write_all(b).await,
            S::Tls(s) => {
                s.write_all(b).await?;
                s.flush().await
            }
            S::Gone => unreachable!(),
        }
    }

    pub async fn send(&mut self, line: &str) {
        self.send_bytes(line.as_bytes()).await.expect("send");
    }

    async fn read_more(&mut self) -> std::io::Result<usize> {
        let mut chunk = [0u8; 4096];
        let fut = async {
            match &mut self.s {
                S::Plain(s) => s.read(&mut chunk).await,
                S::Tls(s) => s.read(&mut chunk).await,
                S::Gone => unreachable!(),
            }
        };
        let n = tokio::time::timeout(Duration::from_secs(20), fut)
            .await
            .map_err(|_| std::io::ErrorKind::TimedOut)??;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    pub async fn try_reply(&mut self) -> std::io::Result<String> {
        loop {
            let mut start = 0;
            while let Some(i) = self.buf[start..].iter().position(|&b| b == b'\n') {
                let line = &self.buf[start..start + i + 1];
                if line.len() >= 4 && line[3] == b' ' {
                    let all: Vec<u8> = self.buf.drain(..start + i + 1).collect();
                    return Ok(String::from_utf8_lossy(&all).into_owned());
                }
                start += i + 1;
            }
            if self.read_more().await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    pub async fn expect(&mut self, prefix: &str) -> String {
        let r = self
            .try_reply()
            .await
            .unwrap_or_else(|e| panic!("waiting for {prefix:?}: {e}"));
        assert!(r.starts_with(prefix), "expected {prefix:?}, got {r:?}");
        r
    }

    pub async fn cmd(&mut self, line: &str, prefix: &str) -> String {
        self.send(&format!("{line}\r\n")).await;
        self.expect(prefix).await
    }

    pub async fn try_cmd(&mut self, line: &str) -> std::io::Result<String> {
        self.send_bytes(format!("{line}\r\n").as_bytes()).await?;
        self.try_reply().await
    }

    pub async fn expect_closed(&mut self) {
        assert!(
            self.buf.is_empty(),
            "unexpected data {:?}",
            String::from_utf8_lossy(&self.buf)
        );
        match self.read_more().await {
            Ok(0) | Err(_) => {}
            Ok(_) => panic!(
                "expected close, got {:?}",
                String::from_utf8_lossy(&self.buf)
            ),
        }
    }

    /// EHLO, STARTTLS, EHLO, AUTH PLAIN.
    pub async fn login_587(addr: SocketAddr, cert_pem: &str, user: &str, pw: &str) -> Self {
        let mut c = Self::connect(addr, cert_pem).await;
        c.expect("220 ").await;
        c.cmd("EHLO client.test", "250").await;
        c.cmd("STARTTLS", "220").await;
        c.upgrade().await;
        c.cmd("EHLO client.test", "250").await;
        c.cmd(&format!("AUTH PLAIN {}", plain(user, pw)), "235")
            .await;
        c
    }
}

pub fn plain(user: &str, pw: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{pw}"))
}

/// Dot-stuffs a CRLF message and appends the terminator.
pub fn stuff(msg: &str) -> String {
    let mut out = String::new();
    for line in msg.split_inclusive("\r\n") {
        if line.starts_with('.') {
            out.push('.');
        }
        out.push_str(line);
    }
    out.push_str(".\r\n");
    out
}

/// Starts `relay-lab CONFIG` (the relay alone, in its own process) and
/// waits for its READY line; returns it with the submission address.
pub async fn spawn_relay(config: &Path) -> (TokioChild, SocketAddr) {
    let (child, addrs) = spawn_relay_all(config).await;
    (child, addrs[0].expect("submission listener"))
}

/// `spawn_relay`, with [submission, submissions, intercept] addresses.
pub async fn spawn_relay_all(config: &Path) -> (TokioChild, [Option<SocketAddr>; 3]) {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_relay-lab"))
        .arg(config)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawning relay-lab");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("relay-lab READY in time")
        .unwrap()
        .expect("relay-lab printed READY");
    let get = |key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .unwrap_or_else(|| panic!("bad READY line {line:?}"))
            .parse()
            .ok()
    };
    let addrs = [get("submission="), get("submissions="), get("intercept=")];
    (child, addrs)
}

/// A `/proc/PID/status` field in KiB (VmRSS, VmHWM).
pub fn proc_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}
