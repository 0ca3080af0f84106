//! The client's typed decisions and the delivery socket mark, tested on
//! real sockets.

use super::*;

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
    })
}

/// Set by `mark_without_cap_net_admin_is_a_mark_error` in the copy of
/// this test binary it runs without CAP_NET_ADMIN.
const NO_NET_ADMIN_ENV: &str = "SMTPGATE_TEST_NO_NET_ADMIN";

/// The delivery socket itself carries the mark: read back with
/// getsockopt(SO_MARK) on the connected socket. Root (CI) is required:
/// only CAP_NET_ADMIN may set a mark, which is the point of it.
#[tokio::test]
async fn delivery_socket_carries_the_mark() {
    if std::env::var_os(NO_NET_ADMIN_ENV).is_some() {
        return;
    }
    assert!(
        is_root(),
        "this test needs root (CAP_NET_ADMIN) to set SO_MARK, as CI has; refusing to skip"
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let s = connect_tcp(addr, Some(0x0534_7002), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(socket2::SockRef::from(&s).mark().unwrap(), 0x0534_7002);
    assert!(s.nodelay().unwrap());
    let plain = connect_tcp(addr, None, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(socket2::SockRef::from(&plain).mark().unwrap(), 0);
}

/// Without CAP_NET_ADMIN (or CAP_NET_RAW) the mark cannot be set: the
/// attempt fails as a typed, transient mark error (not as "connection
/// refused"), and the next hop is not tried (it would fail the same
/// way). Run as root, the test re-runs itself with both capabilities
/// dropped from the bounding set (setpriv), since root could otherwise
/// always set it.
#[tokio::test]
async fn mark_without_cap_net_admin_is_a_mark_error() {
    if is_root() && std::env::var_os(NO_NET_ADMIN_ENV).is_none() {
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new("setpriv")
            // Linux lets CAP_NET_RAW set a mark too (since 5.17).
            .args([
                "--bounding-set",
                "-net_admin,-net_raw",
                "--inh-caps",
                "-net_admin,-net_raw",
                "--",
            ])
            .arg(exe)
            .args([
                "--exact",
                "client::tests::mark_without_cap_net_admin_is_a_mark_error",
                "--nocapture",
            ])
            .env(NO_NET_ADMIN_ENV, "1")
            .output()
            .expect("running setpriv (util-linux)");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{text}");
        assert!(
            text.contains("1 passed"),
            "the inner run ran nothing: {text}"
        );
        return;
    }
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let out = Outbound::new(
        ClientId::Domain("relay.test".into()),
        Some(7),
        Duration::from_secs(5),
    );
    let t = Transport {
        host: "127.0.0.1".into(),
        port: addr.port(),
        tls: HopTls::None,
        credentials: None,
    };
    let to: lettre::Address = "r@example.test".parse().unwrap();
    let msg = Message {
        from: None,
        rcpts: std::slice::from_ref(&to),
        body: b"x\r\n",
        smtputf8: false,
    };
    for _ in 0..2 {
        let e = out.send(&t, addr, &msg).await.unwrap_err();
        // EPERM: the capability is missing, not the socket broken.
        assert!(
            matches!(&e, HopError::Mark { mark: 7, source } if source.raw_os_error() == Some(1)),
            "{e:?}"
        );
        assert!(!e.try_next() && !e.is_permanent(), "{e:?}");
        assert!(e.diagnostic().starts_with("4.3.0 ") && e.diagnostic().contains("CAP_NET_ADMIN"));
    }
    // Logged once for the two attempts.
    assert_eq!(out.mark_errors_logged.lock().unwrap().len(), 1);
}

#[test]
fn typed_decisions() {
    let addr: SocketAddr = "192.0.2.1:25".parse().unwrap();
    let reply = |stage, code| HopError::Reply {
        host: "mx.example.test".into(),
        addr,
        stage,
        reply: Reply {
            code,
            text: "x".into(),
        },
    };
    // Next MX: busy or odd before any recipient.
    for (stage, code) in [
        (Stage::Greeting, 421),
        (Stage::Greeting, 554),
        (Stage::Starttls, 454),
        (Stage::Mail, 451),
    ] {
        let e = reply(stage, code);
        assert!(e.try_next() && !e.is_permanent(), "{stage} {code}");
    }
    // A 5xx to MAIL speaks for the domain: bounce.
    let e = reply(Stage::Mail, 550);
    assert!(!e.try_next() && e.is_permanent());
    let e = HopError::Unsupported {
        host: "h".into(),
        addr,
        missing: Missing::SmtpUtf8Addresses,
    };
    assert!(!e.try_next() && e.is_permanent());
    assert!(e.diagnostic().starts_with("553 5.6.7 "));
    let e = HopError::Connect {
        host: "h".into(),
        addr,
        source: std::io::ErrorKind::ConnectionRefused.into(),
    };
    assert!(e.try_next() && !e.is_permanent());
    assert!(
        e.diagnostic()
            .starts_with("4.4.1 connection to h[192.0.2.1:25] failed")
    );
}
