//! What outlives the agent: maps, programs and links pinned in bpffs.
//!
//! ```text
//! <pin_dir>/v1/maps/SMTPGATE_*     the policy, the tables, the counters
//! <pin_dir>/v1/programs/smtpgate_* for bpftool and humans
//! <pin_dir>/v1/links/<hook>-<target>[-<program>]
//! ```
//!
//! A pinned link keeps its program attached after the agent dies (kill -9,
//! upgrade), so enforcement never depends on the agent being up. Only
//! `smtpgate detach` removes the pins. `v1` is the layout version: a future
//! agent that cannot read it attaches its own layout first, then removes the
//! old one, so there is no gap.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

/// What to say when `pin_dir` is not on bpffs.
fn not_bpffs(root: &Path) -> String {
    format!(
        "{} is not on a BPF filesystem: mount one with `mount -t bpf bpf /sys/fs/bpf` \
         (or set datapath.pin_dir to a directory on bpffs). Inside a network namespace, \
         start the agent with `nsenter --net=/run/netns/NAME`, not `ip netns exec`, \
         which mounts a /sys of its own without bpffs",
        root.display()
    )
}

/// The pin layout this agent reads and writes.
pub const LAYOUT: &str = "v1";

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_PROG_QUERY: libc::c_long = 16;

#[derive(Clone, Debug)]
pub struct PinDir {
    root: PathBuf,
}

impl PinDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn layout(&self) -> PathBuf {
        self.root.join(LAYOUT)
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.layout().join("maps").join(name)
    }

    pub fn program(&self, name: &str) -> PathBuf {
        self.layout().join("programs").join(name)
    }

    pub fn link(&self, id: &str) -> PathBuf {
        self.layout().join("links").join(id)
    }

    /// Creates the layout's directories; the root must be on a bpffs.
    pub fn ensure(&self) -> io::Result<()> {
        // Look before creating anything: on a plain sysfs (no bpffs mounted,
        // or `ip netns exec`, which mounts a fresh /sys without it) the
        // directory cannot even be made, and "No such file or directory"
        // would tell the admin nothing.
        let existing = self
            .root
            .ancestors()
            .find(|p| p.exists())
            .unwrap_or(Path::new("/"));
        if !is_bpffs(existing) {
            return Err(io::Error::other(not_bpffs(&self.root)));
        }
        std::fs::create_dir_all(&self.root)?;
        if !is_bpffs(&self.root) {
            return Err(io::Error::other(not_bpffs(&self.root)));
        }
        for sub in ["maps", "programs", "links"] {
            std::fs::create_dir_all(self.layout().join(sub))?;
        }
        Ok(())
    }

    /// Names of the pinned links of this layout.
    pub fn links(&self) -> Vec<String> {
        list(&self.layout().join("links"))
    }

    /// Directories of other (older or newer) layouts under the root.
    pub fn other_layouts(&self) -> Vec<PathBuf> {
        list(&self.root)
            .into_iter()
            .filter(|n| n != LAYOUT)
            .map(|n| self.root.join(n))
            .collect()
    }

    pub fn exists(&self) -> bool {
        self.root.exists()
    }
}

fn list(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

/// Removes a pin tree: links first, so programs detach before their maps
/// lose their last pin (the order does not matter for the kernel, but it
/// keeps a half-removed tree meaningful).
pub fn remove_tree(path: &Path) -> io::Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let links = path.join("links");
    if links.is_dir() {
        std::fs::remove_dir_all(&links)?;
    }
    std::fs::remove_dir_all(path)
}

/// Replaces whatever is pinned at `path` (a stale object from an older
/// agent) with nothing, so a new object can be pinned there.
pub fn unpin(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills the zeroed struct for a valid path string.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

fn sys_bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> io::Result<libc::c_long> {
    // SAFETY: bpf(2) with a zero-initialised attribute buffer as large as
    // the kernel's union bpf_attr prefix we use.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), size_of_val(attr)) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Opens a pinned object.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut attr = [0u64; 16];
    attr[0] = c.as_ptr() as u64; // pathname
    let fd = sys_bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel just returned this new descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Atomically swaps the program a link runs: no packet goes without one.
pub fn link_update(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = [0u64; 16];
    // struct { u32 link_fd; u32 new_prog_fd; u32 flags; u32 old_prog_fd; }
    attr[0] = u64::from(link.as_raw_fd() as u32) | (u64::from(program.as_raw_fd() as u32) << 32);
    sys_bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

/// What BPF_PROG_QUERY asks about: a cgroup (by fd) or an interface's TCX
/// hook (by index).
pub enum QueryTarget<'a> {
    Fd(BorrowedFd<'a>),
    Ifindex(u32),
}

/// The ids of the programs attached at `attach_type` of `target`, as the
/// kernel sees them now. This, not what the agent remembers doing, is what
/// health reports: an interface that was deleted and created again keeps
/// its name and loses its programs.
pub fn prog_query(target: QueryTarget<'_>, attach_type: u32) -> io::Result<Vec<u32>> {
    const MAX: usize = 64;
    let mut ids = [0u32; MAX];
    let mut attr = [0u64; 16];
    // struct { u32 target_fd|target_ifindex; u32 attach_type; u32 query_flags;
    //          u32 attach_flags; u64 prog_ids; u32 prog_cnt; ... }
    let target = match target {
        QueryTarget::Fd(fd) => fd.as_raw_fd() as u32,
        QueryTarget::Ifindex(i) => i,
    };
    attr[0] = u64::from(target) | (u64::from(attach_type) << 32);
    attr[2] = ids.as_mut_ptr() as u64;
    attr[3] = MAX as u64;
    sys_bpf(BPF_PROG_QUERY, &mut attr)?;
    let count = (attr[3] as u32 as usize).min(MAX);
    Ok(ids[..count].to_vec())
}

/// A file name for a link: hook, target (with '%', '/' and '.' escaped:
/// bpffs refuses dots in names, and cgroups like `system.slice` or
/// interfaces like `eth0.100` have them), and the program when a hook has
/// several.
pub fn link_id(hook: &str, target: &str, program: Option<&str>) -> String {
    let target = target
        .replace('%', "%25")
        .replace('/', "%2F")
        .replace('.', "%2E");
    match program {
        Some(p) => format!("{hook}-{target}-{p}"),
        None => format!("{hook}-{target}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_ids_are_file_names() {
        assert_eq!(link_id("tc-ingress", "lan0", None), "tc-ingress-lan0");
        let id = link_id("cgroup", "/sys/fs/cgroup/a%b", Some("smtpgate_cgroup"));
        assert_eq!(id, "cgroup-%2Fsys%2Ffs%2Fcgroup%2Fa%25b-smtpgate_cgroup");
        assert!(!id.contains('/'));
        let id = link_id("cgroup", "/sys/fs/cgroup/system.slice", Some("p"));
        assert_eq!(id, "cgroup-%2Fsys%2Ffs%2Fcgroup%2Fsystem%2Eslice-p");
        assert_eq!(
            link_id("tc-ingress", "eth0.100", None),
            "tc-ingress-eth0%2E100"
        );
    }
}
