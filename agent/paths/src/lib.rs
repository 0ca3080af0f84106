//! Every filesystem path smtpgate uses by default, in one place, for the
//! agent and the relay alike. They follow the systemd unit's directories
//! (ConfigurationDirectory=, StateDirectory=, RuntimeDirectory= smtpgate)
//! and what the Debian package creates (deploy/debian/postinst); the
//! agent's tests check the unit and the package against these.
//!
//! A crate of its own because the relay cannot depend on the agent, and
//! its defaults must be the package's: a relay default that the package
//! did not create (or that the unit keeps read-only) is a trap.

#![no_std]
#![forbid(unsafe_code)]

/// ConfigurationDirectory: root-owned, read-only for the agent.
pub const CONFIG_DIR: &str = "/etc/smtpgate";
pub const CONFIG_FILE: &str = "/etc/smtpgate/smtpgate.toml";
/// The relay's users (password hashes); the package creates it
/// root:smtpgate 0640.
pub const RELAY_USERS_FILE: &str = "/etc/smtpgate/users.toml";
/// The relay's TLS certificate chain and key (PEM), root:smtpgate 0640.
pub const RELAY_TLS_CERT: &str = "/etc/smtpgate/relay.crt";
pub const RELAY_TLS_KEY: &str = "/etc/smtpgate/relay.key";

/// StateDirectory, the one place the unit lets the agent write files:
/// allowlist entries added from the CLI, and the relay's queue under it.
pub const STATE_DIR: &str = "/var/lib/smtpgate";
/// The relay's mail queue; the package creates it smtpgate:smtpgate 0750.
pub const RELAY_SPOOL_DIR: &str = "/var/lib/smtpgate/spool";
/// The relay's DKIM keys, `<domain>/<selector>.key`; the package makes it
/// smtpgate:smtpgate 0700.
pub const RELAY_DKIM_DIR: &str = "/etc/smtpgate/dkim";

/// RuntimeDirectory.
pub const RUNTIME_DIR: &str = "/run/smtpgate";
/// The control socket.
pub const CONTROL_SOCKET: &str = "/run/smtpgate/control.sock";

/// Pins in bpffs: what keeps enforcing while the agent is down. The unit's
/// only ReadWritePaths=.
pub const PIN_DIR: &str = "/sys/fs/bpf/smtpgate";

#[cfg(test)]
mod tests {
    use super::*;

    /// `const` strings cannot be joined at compile time, so the nesting is
    /// checked here: a file moved out of its directory would leave the
    /// unit's sandbox.
    #[test]
    fn files_live_in_their_directories() {
        let under = |path: &str, dir: &str| {
            path.strip_prefix(dir)
                .is_some_and(|rest| rest.starts_with('/') && !rest[1..].contains('/'))
        };
        for f in [CONFIG_FILE, RELAY_USERS_FILE, RELAY_TLS_CERT, RELAY_TLS_KEY] {
            assert!(under(f, CONFIG_DIR), "{f}");
        }
        assert!(under(RELAY_SPOOL_DIR, STATE_DIR));
        assert!(under(CONTROL_SOCKET, RUNTIME_DIR));
    }
}
