//! Accept loops: session limits first (cheapest refusal), then TLS for 465,
//! then a `Session` per connection.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

use crate::config::secs;
use crate::session::{ListenerKind, Session, Shared, TlsInfo};
use crate::stats::RelayStats;

pub(crate) async fn accept_loop(listener: TcpListener, kind: ListenerKind, shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.clone();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let (mut sock, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, listener = ?kind, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        // For intercepted connections this is the address the client meant
        // to reach (the datapath redirects without rewriting it). A
        // dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d: logs,
        // limits and Received headers use the plain IPv4 form.
        let local = canonical(
            sock.local_addr()
                .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0))),
        );
        let peer = canonical(peer);
        let guard = match shared.limits.pool(kind).try_acquire(peer.ip()) {
            Ok(g) => g,
            Err(why) => {
                RelayStats::inc(&shared.stats.sessions_refused);
                tracing::info!(peer = %peer, listener = ?kind, %why, "session limit reached; refusing connection");
                if kind == ListenerKind::Submissions {
                    // Port 465 speaks TLS from the first byte: a cleartext
                    // 421 there is garbage to the client and a plaintext
                    // leak, and a handshake just to refuse would hand a
                    // flood our CPU. Close instead.
                    drop(sock);
                } else {
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(
                            std::time::Duration::from_secs(5),
                            sock.write_all(b"421 4.7.0 Too many connections, try again later\r\n"),
                        )
                        .await;
                        let _ = sock.shutdown().await;
                    });
                }
                continue;
            }
        };
        let _ = sock.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            let res = if kind == ListenerKind::Submissions {
                let acceptor = shared.tls.acceptor();
                let l = &shared.config.limits;
                let timeout = secs(l.command_timeout_secs.min(l.preauth_timeout_secs));
                let evicted = guard.evicted();
                // An evicted handshake just ends: nothing may be sent in
                // cleartext on 465.
                let tls = tokio::select! {
                    r = tokio::time::timeout(timeout, acceptor.accept(sock)) => r,
                    () = evicted.notified() => {
                        RelayStats::inc(&shared.stats.sessions_evicted);
                        return;
                    }
                };
                match tls {
                    Ok(Ok(tls)) => {
                        let info = TlsInfo::of(tls.get_ref().1);
                        Session::new(tls, shared.clone(), kind, peer, local, true)
                            .with_tls_info(info)
                            .with_slot(guard)
                            .run()
                            .await
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(peer = %peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                }
            } else {
                Session::new(sock, shared.clone(), kind, peer, local, false)
                    .with_slot(guard)
                    .run()
                    .await
            };
            if let Err(e) = res {
                tracing::debug!(peer = %peer, error = %e, "session ended with error");
            }
        });
    }
}

/// `::ffff:a.b.c.d` as `a.b.c.d`, same port.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}
