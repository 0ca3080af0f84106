//! Every filesystem path smtpgate uses by default: the constants live in
//! the `smtpgate-paths` crate, shared with the relay, whose defaults must be
//! the same as the package's. Here: finding the cgroup v2 mount.

use std::path::PathBuf;

pub use smtpgate_paths::*;

/// Finds where the cgroup v2 hierarchy is mounted, from /proc/self/mounts.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let mut f = line.split_whitespace();
        let (_dev, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(dir))
    })
}

/// The package and the unit must create and open exactly these paths: a
/// default the package does not create, or that the unit keeps read-only,
/// fails on the first start (the relay's old `/var/spool/smtpgate/relay`).
#[cfg(test)]
mod tests {
    use super::*;

    fn deploy_file(rel: &str) -> String {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy")
            .join(rel);
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    /// The values of `key=` lines in the unit, comments left out.
    fn unit_values(unit: &str, key: &str) -> Vec<String> {
        unit.lines()
            .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .flat_map(|v| v.split_whitespace().map(str::to_owned))
            .collect()
    }

    #[test]
    fn the_unit_opens_what_the_defaults_use() {
        let unit = deploy_file("systemd/smtpgate.service");
        let one = |key| {
            let v = unit_values(&unit, key);
            assert_eq!(v.len(), 1, "{key}= {v:?}");
            v[0].clone()
        };
        assert_eq!(
            format!("/etc/{}", one("ConfigurationDirectory")),
            CONFIG_DIR
        );
        assert_eq!(format!("/var/lib/{}", one("StateDirectory")), STATE_DIR);
        assert_eq!(format!("/run/{}", one("RuntimeDirectory")), RUNTIME_DIR);
        // ProtectSystem=strict: besides the directories above, only these
        // are writable. Every default the agent or relay writes must be in
        // one of them.
        let writable: Vec<String> = unit_values(&unit, "ReadWritePaths")
            .into_iter()
            .map(|p| p.trim_start_matches('-').to_owned())
            .chain([STATE_DIR.to_owned(), RUNTIME_DIR.to_owned()])
            .collect();
        for written in [STATE_DIR, RELAY_SPOOL_DIR, CONTROL_SOCKET, PIN_DIR] {
            assert!(
                writable
                    .iter()
                    .any(|w| written == w || written.starts_with(&format!("{w}/"))),
                "{written} is not writable under the unit ({writable:?})"
            );
        }
        assert!(
            unit_values(&unit, "ExecStart")
                .windows(2)
                .any(|w| w[0] == "--config" && w[1] == CONFIG_FILE),
            "ExecStart does not name {CONFIG_FILE}"
        );
    }

    #[test]
    fn the_package_creates_what_the_defaults_use() {
        let postinst = deploy_file("debian/postinst");
        let made: Vec<&str> = postinst
            .lines()
            .filter_map(|l| l.trim().strip_prefix("install -d "))
            .flat_map(str::split_whitespace)
            .collect();
        for dir in [CONFIG_DIR, STATE_DIR, RELAY_SPOOL_DIR] {
            assert!(
                made.contains(&dir),
                "postinst does not create {dir} ({made:?})"
            );
        }
        assert!(
            postinst.contains(&format!("cat > {RELAY_USERS_FILE} ")),
            "postinst does not create {RELAY_USERS_FILE}"
        );
        for path in [CONFIG_DIR, RELAY_USERS_FILE, STATE_DIR, RELAY_SPOOL_DIR] {
            assert!(
                postinst.lines().any(|l| l.trim().starts_with("fix_perms ")
                    && l.trim().ends_with(&format!(" {path}"))),
                "postinst sets no owner and mode on {path}"
            );
        }
    }

    /// The built-in defaults, and the shipped config, which spells them
    /// out: the same paths, so leaving a key out changes nothing.
    #[test]
    fn defaults_and_the_shipped_config_agree() {
        let relay = smtpgate_relay::RelayConfig::default();
        let shipped = crate::config::Config::parse(
            &deploy_file("config/smtpgate.toml"),
            "deploy/config/smtpgate.toml",
        )
        .unwrap();
        for (what, cfg) in [("built-in", &relay), ("shipped", &shipped.relay)] {
            assert_eq!(cfg.users_file.to_str(), Some(RELAY_USERS_FILE), "{what}");
            assert_eq!(cfg.spool_dir.to_str(), Some(RELAY_SPOOL_DIR), "{what}");
            assert_eq!(cfg.tls_cert.to_str(), Some(RELAY_TLS_CERT), "{what}");
            assert_eq!(cfg.tls_key.to_str(), Some(RELAY_TLS_KEY), "{what}");
        }
        assert_eq!(shipped.state_dir.to_str(), Some(STATE_DIR));
    }
}
