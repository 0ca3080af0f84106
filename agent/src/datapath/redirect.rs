//! What `action = "redirect"` needs outside the eBPF program: the relay's
//! intercept listener, in the SOCKMAP the program reads, and the policy
//! routing that delivers the marked packets locally.

use std::{
    net::{SocketAddr, TcpListener},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    process::Command,
};

use smtpgate_common::{REDIRECT_MARK, REDIRECT_TABLE};

use super::{Datapath, DatapathError, map_err};

/// Binds the intercept listener: dual-stack, with IP_TRANSPARENT and
/// IPV6_TRANSPARENT, without which the stack refuses steered IPv4
/// connections (their destination is not a local address).
pub fn intercept_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket calls on a descriptor we own from here on.
    unsafe {
        let fd = libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let owned = OwnedFd::from_raw_fd(fd);
        let one: libc::c_int = 1;
        let zero: libc::c_int = 0;
        let set = |level, name, v: &libc::c_int| {
            if libc::setsockopt(fd, level, name, (v as *const libc::c_int).cast(), 4) != 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        set(libc::SOL_SOCKET, libc::SO_REUSEADDR, &one)?;
        set(libc::SOL_IP, libc::IP_TRANSPARENT, &one)?;
        if family == libc::AF_INET6 {
            set(libc::SOL_IPV6, libc::IPV6_V6ONLY, &zero)?;
            set(libc::SOL_IPV6, libc::IPV6_TRANSPARENT, &one)?;
        }
        let listener = TcpListener::from(owned);
        let sock = socket2_addr(addr);
        if libc::bind(listener.as_raw_fd(), sock.0.as_ptr().cast(), sock.1) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::listen(listener.as_raw_fd(), 1024) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(listener)
    }
}

/// A sockaddr for `addr`, as bytes and length.
fn socket2_addr(addr: SocketAddr) -> ([u8; 28], libc::socklen_t) {
    let mut buf = [0u8; 28];
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: copying a plain C struct into a large enough buffer.
            unsafe {
                std::ptr::copy_nonoverlapping((&raw const sin).cast::<u8>(), buf.as_mut_ptr(), 16)
            };
            (buf, 16)
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as u16,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above.
            unsafe {
                std::ptr::copy_nonoverlapping((&raw const sin6).cast::<u8>(), buf.as_mut_ptr(), 28)
            };
            (buf, 28)
        }
    }
}

/// The `ip` commands that make marked packets local, per family: a rule
/// that sends them to our table, and a table that says "everything is
/// local".
fn routing_steps() -> [(&'static str, Vec<String>); 4] {
    let mark = format!("{REDIRECT_MARK:#x}");
    let table = REDIRECT_TABLE.to_string();
    [
        (
            "-4",
            vec![
                "rule".into(),
                "add".into(),
                "fwmark".into(),
                mark.clone(),
                "lookup".into(),
                table.clone(),
            ],
        ),
        (
            "-6",
            vec![
                "rule".into(),
                "add".into(),
                "fwmark".into(),
                mark,
                "lookup".into(),
                table.clone(),
            ],
        ),
        (
            "-4",
            vec![
                "route".into(),
                "replace".into(),
                "local".into(),
                "0.0.0.0/0".into(),
                "dev".into(),
                "lo".into(),
                "table".into(),
                table.clone(),
            ],
        ),
        (
            "-6",
            vec![
                "route".into(),
                "replace".into(),
                "local".into(),
                "::/0".into(),
                "dev".into(),
                "lo".into(),
                "table".into(),
                table,
            ],
        ),
    ]
}

fn ip(family: &str, args: &[String]) -> std::io::Result<std::process::Output> {
    Command::new("ip").arg(family).args(args).output()
}

/// Installs the policy routing, once (the rules are checked first).
pub fn install_routing() -> Result<(), DatapathError> {
    let err = |what: String| DatapathError::Routing { what };
    for (family, args) in routing_steps() {
        if args[0] == "rule" {
            let shown = ip(
                family,
                &[
                    "rule".into(),
                    "show".into(),
                    "fwmark".into(),
                    args[3].clone(),
                ],
            )
            .map_err(|e| err(format!("running ip: {e}")))?;
            if String::from_utf8_lossy(&shown.stdout).contains(&format!("lookup {REDIRECT_TABLE}"))
            {
                continue;
            }
        }
        let out = ip(family, &args).map_err(|e| err(format!("running ip: {e}")))?;
        if !out.status.success() {
            return Err(err(format!(
                "ip {family} {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    }
    Ok(())
}

/// Removes the policy routing (detach). Missing pieces are fine.
pub fn remove_routing() {
    for family in ["-4", "-6"] {
        let mark = format!("{REDIRECT_MARK:#x}");
        let table = REDIRECT_TABLE.to_string();
        // A rule may have been added more than once by hand: remove all.
        for _ in 0..8 {
            let ok = ip(
                family,
                &[
                    "rule".into(),
                    "del".into(),
                    "fwmark".into(),
                    mark.clone(),
                    "lookup".into(),
                    table.clone(),
                ],
            )
            .is_ok_and(|o| o.status.success());
            if !ok {
                break;
            }
        }
        let _ = ip(
            family,
            &["route".into(), "flush".into(), "table".into(), table],
        );
    }
}

impl Datapath {
    /// Puts the relay's intercept listener where the programs find it, and
    /// tells the connect hooks its port.
    pub fn set_relay_listener(&mut self, listener: &TcpListener) -> Result<(), DatapathError> {
        self.relay
            .set(0, listener, 0)
            .map_err(map_err("writing the relay SOCKMAP"))?;
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        self.settings.relay_port = u32::from(port);
        self.write_settings()
    }
}
