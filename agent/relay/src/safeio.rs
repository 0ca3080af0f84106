//! Files that hold either their old or their new contents across a crash or
//! a power loss (chasquid's `safeio`): a temp file in the same directory,
//! fsync, rename over the old one, fsync the directory. The one copy of
//! this for the spool's records, the users file, lab keys and the agent's
//! state file.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

/// Temp files start with this, so that a reader of the directory (spool
/// recovery) can tell a write a crash interrupted from a real file.
pub const TEMP_PREFIX: &str = ".tmp-";

/// Makes the renames and unlinks in `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates or truncates `path` with `mode` (less the umask), writes
/// `bytes` and fsyncs. Not atomic by itself: for callers that rename
/// several such files and sync the directory once (the spool's group
/// commit).
pub fn write_synced(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Replaces `path` with `bytes`, atomically and durably; a new file gets
/// `mode` (less the umask).
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    write_atomic_owned(path, bytes, mode, None)
}

/// `write_atomic`, the new file given `owner` (uid, gid) before it replaces
/// the old one: a file an admin made readable to the agent's group stays so.
pub fn write_atomic_owned(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} has no file name", path.display()),
        )
    })?;
    // Random, not the pid: two writers in one process (the relay's
    // committer and `user` commands in tests) must not share a temp file.
    let mut r = [0u8; 8];
    crate::random::fill(&mut r)?;
    let tmp = dir.join(format!(
        "{TEMP_PREFIX}{}-{:x}",
        name.to_string_lossy(),
        u64::from_ne_bytes(r)
    ));
    let written = write_synced(&tmp, bytes, mode).and_then(|()| match owner {
        Some((uid, gid)) => std::os::unix::fs::chown(&tmp, Some(uid), Some(gid)),
        None => Ok(()),
    });
    if let Err(e) = written.and_then(|()| fs::rename(&tmp, path)) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};

    #[test]
    fn replaces_whole_files_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.json");
        write_atomic(&p, b"old", 0o600).unwrap();
        write_atomic(&p, b"new contents", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"new contents");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["f.json"]);
    }

    #[test]
    fn a_failed_write_keeps_the_old_file_and_removes_the_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_atomic(&p, b"old", 0o600).unwrap();
        // A directory in the way of the rename: the write must fail, not
        // half-happen.
        let blocked = dir.path().join("d");
        fs::create_dir(&blocked).unwrap();
        fs::write(blocked.join("x"), b"").unwrap();
        assert!(write_atomic(&blocked, b"new", 0o600).is_err());
        assert_eq!(fs::read(&p).unwrap(), b"old");
        let temps = fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with(TEMP_PREFIX)
            })
            .count();
        assert_eq!(temps, 0);
        assert!(write_atomic(Path::new("/"), b"x", 0o600).is_err());
    }

    #[test]
    fn owner_is_set_before_the_rename() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("users.toml");
        let me = fs::metadata(dir.path()).unwrap();
        // Our own uid/gid: chown to them works unprivileged, and the path
        // through chown is what is tested.
        write_atomic_owned(&p, b"x", 0o640, Some((me.uid(), me.gid()))).unwrap();
        let m = fs::metadata(&p).unwrap();
        assert_eq!((m.uid(), m.gid()), (me.uid(), me.gid()));
        assert_eq!(m.permissions().mode() & 0o777, 0o640 & !umask());
    }

    fn umask() -> u32 {
        let s = fs::read_to_string("/proc/self/status").unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix("Umask:"))
            .map_or(0o022, |v| u32::from_str_radix(v.trim(), 8).unwrap())
    }
}
