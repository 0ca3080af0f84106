//! Every filesystem path smtpgate uses by default, in one place. They follow
//! systemd's directories: RuntimeDirectory=smtpgate, StateDirectory=smtpgate,
//! ConfigurationDirectory=smtpgate.

use std::path::PathBuf;

pub const CONFIG_FILE: &str = "/etc/smtpgate/smtpgate.toml";
/// Pins in bpffs: what keeps enforcing while the agent is down.
pub const PIN_DIR: &str = "/sys/fs/bpf/smtpgate";
/// StateDirectory: allowlist entries added from the CLI.
pub const STATE_DIR: &str = "/var/lib/smtpgate";
/// The control socket (RuntimeDirectory).
pub const CONTROL_SOCKET: &str = "/run/smtpgate/control.sock";

/// Finds where the cgroup v2 hierarchy is mounted, from /proc/self/mounts.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let mut f = line.split_whitespace();
        let (_dev, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(dir))
    })
}
