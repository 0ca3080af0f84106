//! cgroup ids as the programs see them, and back to names an admin knows.
//!
//! On cgroup v2 a cgroup's id (what `bpf_get_current_cgroup_id` and
//! `bpf_skb_cgroup_id` return) is the inode number of its directory, so
//! the agent finds its own with one stat, and a denied process's cgroup by
//! walking the hierarchy once per id it has not seen.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// The agent's own cgroup id: the cgroup its relay's sockets belong to.
pub fn own_id(root: &Path) -> std::io::Result<u64> {
    let text = std::fs::read_to_string("/proc/self/cgroup")?;
    let path = parse_proc_cgroup(&text).ok_or_else(|| {
        std::io::Error::other("/proc/self/cgroup has no cgroup v2 entry (\"0::/...\")")
    })?;
    Ok(std::fs::metadata(root.join(path.trim_start_matches('/')))?.ino())
}

/// The v2 path in a /proc/PID/cgroup text.
fn parse_proc_cgroup(text: &str) -> Option<&str> {
    text.lines().find_map(|l| l.strip_prefix("0::"))
}

/// What `top` and the log say of a cgroup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Named {
    /// Relative to the cgroup2 root, with a leading `/` (`/` itself for
    /// the root).
    pub path: String,
    /// The systemd unit: the innermost `.service` or `.scope` on the path.
    pub unit: Option<String>,
}

/// Resolves ids to paths, remembering what it found; a cgroup that is gone
/// is looked for again next time (ids are not reused while the system is up,
/// so a hit stays right).
#[derive(Debug)]
pub struct Names {
    root: PathBuf,
    known: HashMap<u64, Named>,
}

/// How deep the walk goes: systemd's hierarchy is a few levels deep;
/// containers add a few more.
const MAX_DEPTH: usize = 12;

impl Names {
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            known: HashMap::new(),
        }
    }

    pub fn name(&mut self, id: u64) -> Option<Named> {
        if let Some(n) = self.known.get(&id) {
            return Some(n.clone());
        }
        let found = find(&self.root, id)?;
        let rel = found.strip_prefix(&self.root).ok()?;
        let path = format!("/{}", rel.display());
        let unit = unit_of(&path);
        let named = Named { path, unit };
        // Bounded: a host with more cgroups than this has the rest looked up
        // again, not an agent that grows forever.
        if self.known.len() < 4096 {
            self.known.insert(id, named.clone());
        }
        Some(named)
    }
}

/// The innermost systemd unit on a cgroup path.
fn unit_of(path: &str) -> Option<String> {
    path.rsplit('/')
        .find(|c| c.ends_with(".service") || c.ends_with(".scope"))
        .map(str::to_owned)
}

fn find(root: &Path, id: u64) -> Option<PathBuf> {
    let mut stack = vec![(root.to_path_buf(), 0)];
    while let Some((dir, depth)) = stack.pop() {
        let Ok(meta) = std::fs::metadata(&dir) else {
            continue;
        };
        if meta.ino() == id {
            return Some(dir);
        }
        if depth == MAX_DEPTH {
            continue;
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push((e.path(), depth + 1));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_cgroup_v2_line() {
        let text = "12:cpu:/legacy\n0::/system.slice/smtpgate.service\n";
        assert_eq!(
            parse_proc_cgroup(text),
            Some("/system.slice/smtpgate.service")
        );
        assert_eq!(parse_proc_cgroup("1:name=systemd:/x\n"), None);
    }

    #[test]
    fn innermost_unit() {
        assert_eq!(
            unit_of("/system.slice/postfix.service").as_deref(),
            Some("postfix.service")
        );
        assert_eq!(
            unit_of("/user.slice/user-1000.slice/session-3.scope").as_deref(),
            Some("session-3.scope")
        );
        assert_eq!(
            unit_of("/system.slice/docker-abc.scope/init").as_deref(),
            Some("docker-abc.scope")
        );
        assert_eq!(unit_of("/"), None);
    }

    #[test]
    fn finds_a_directory_by_inode() {
        let dir = std::env::temp_dir().join(format!("smtpgate-cgroups-{}", std::process::id()));
        let deep = dir.join("a.slice/b.service");
        std::fs::create_dir_all(&deep).unwrap();
        let id = std::fs::metadata(&deep).unwrap().ino();
        let mut names = Names::new(dir.clone());
        assert_eq!(
            names.name(id),
            Some(Named {
                path: "/a.slice/b.service".into(),
                unit: Some("b.service".into()),
            })
        );
        assert_eq!(names.name(u64::MAX), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
