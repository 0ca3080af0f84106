//! Durable on-disk queue.
//!
//! Each message is two files in `<spool>/queue/`: `<id>.eml` (the bytes to
//! send, Received header included, after the record's DKIM signatures if it
//! has any) and `<id>.json` (envelope and per-recipient state). The `.json` file is the commit point: a message
//! exists iff its record exists. A third, `<id>.done`, is the delivery
//! journal: one `delivered <address>` line appended the moment a next hop
//! answers 250 for that recipient, folded into the record whenever it is
//! read and dropped when the record is next rewritten. Appending a line is
//! one write(2), so the window in which a crash forgets a delivery (and
//! the restart sends it again) is that short; rewriting the record would
//! take a temp file, an fsync and a rename. Both are written as temp files, fsynced,
//! renamed into place (body first), and then the directory is fsynced; only
//! after that does the session answer 250 (chasquid's safeio, maddy's queue).
//!
//! Group commit: sessions hand finished messages to one committer thread
//! that drains everything queued while it was busy and fsyncs the directory
//! once per batch instead of once per message. Under concurrency the number
//! of directory syncs stays flat while the message rate grows; with a single
//! client it costs nothing extra. There is no per-message thread.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::safeio::{sync_dir, write_atomic, write_synced};
use crate::stats::CommitCounters;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no queued message {id}")]
    NotFound { id: String },
    #[error("bad queue id {id:?}")]
    BadId { id: String },
    #[error("spool committer is gone (relay shutting down)")]
    CommitterGone,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SpoolError + 'a {
    move |source| SpoolError::Io {
        op,
        path: path.into(),
        source,
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RcptState {
    Pending,
    Delivered,
    Failed,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RecipientStatus {
    pub address: String,
    pub state: RcptState,
    pub attempts: u32,
    pub last_error: Option<String>,
    /// `Failed` and the sender told: its bounce is queued (or none is due,
    /// for a bounce or a null sender). A recipient fails at once on a 5xx
    /// while others may wait for days; this keeps it from being bounced a
    /// second time when the message finishes. Left out of the file when
    /// false (records of older relays have no such field).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub notified: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct QueueRecord {
    pub id: String,
    /// Envelope sender; empty for the null sender (DSNs).
    pub from: String,
    pub recipients: Vec<RecipientStatus>,
    pub created_unix_ms: u64,
    pub next_attempt_unix_ms: u64,
    pub attempts: u32,
    pub auth_user: Option<String>,
    pub client: String,
    /// A bounce we generated: its own failures are dropped, never bounced.
    pub is_dsn: bool,
    pub size: u64,
    /// Submitted with SMTPUTF8 (RFC 6531): passed on to the next hop, and a
    /// next hop without it cannot take the message if its headers are
    /// UTF-8. Left out of the file when false, so records stay readable by
    /// relays from before the field.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub smtputf8: bool,
    /// DKIM-Signature fields (CRLF-terminated) sent before the body file's
    /// bytes: they are computed while the body streams to disk, so they
    /// exist only after it is written (`dkim` module). Left out when the
    /// message is unsigned; older records have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dkim_signature: Option<String>,
    /// The sender got the delay warning (`retry.delay_warning_secs`): it
    /// is sent once per message. Left out when false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub delay_warned: bool,
}

impl QueueRecord {
    pub fn pending(&self) -> impl Iterator<Item = &RecipientStatus> {
        self.recipients
            .iter()
            .filter(|r| r.state == RcptState::Pending)
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Time-ordered, unguessable queue id: 12 hex digits of milliseconds, then
/// 16 random hex digits.
pub fn new_id() -> String {
    format!(
        "{:012x}{:016x}",
        now_ms() & 0xffff_ffff_ffff,
        crate::random::u64()
    )
}

fn check_id(id: &str) -> Result<(), SpoolError> {
    if id.len() == 28 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(SpoolError::BadId { id: id.into() })
    }
}

enum JobBody {
    /// Written by the committer (bounces).
    Bytes(Vec<u8>),
    /// Already written by the session (`TempBody`), to be fsynced.
    File(PathBuf),
}

struct Job {
    record: QueueRecord,
    body: JobBody,
    done: oneshot::Sender<Result<(), SpoolError>>,
}

/// Bytes the session buffers before each write to a streamed body: with
/// the file's own buffer, about what one session in DATA holds.
const BODY_WRITE_BUFFER: usize = 32 * 1024;

/// Bodies up to this size stay in memory until the commit writes them (in
/// its parallel batch writers, one write each); larger ones spill to a
/// `TempBody`. Streaming every message measured at half the submission
/// rate for small ones (three blocking-pool round trips per message).
pub const SPILL_AT: usize = 64 * 1024;

/// A message body arriving during DATA: in memory while small, spilled to
/// the spool (`TempBody`) once it passes `SPILL_AT`, so memory per session
/// stays bounded whatever the message size.
#[derive(Debug)]
pub enum IncomingBody {
    Memory(Vec<u8>),
    File(TempBody),
}

impl IncomingBody {
    pub fn new() -> Self {
        Self::Memory(Vec::new())
    }

    pub async fn write(&mut self, spool: &Spool, id: &str, bytes: &[u8]) -> Result<(), SpoolError> {
        match self {
            Self::Memory(buf) if buf.len() + bytes.len() <= SPILL_AT => {
                buf.extend_from_slice(bytes);
                Ok(())
            }
            Self::Memory(buf) => {
                let mut f = spool.create_body(id).await?;
                f.write(buf).await?;
                f.write(bytes).await?;
                *self = Self::File(f);
                Ok(())
            }
            Self::File(f) => f.write(bytes).await,
        }
    }

    pub fn len(&self) -> u64 {
        match self {
            Self::Memory(b) => b.len() as u64,
            Self::File(f) => f.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Default for IncomingBody {
    fn default() -> Self {
        Self::new()
    }
}

/// A message body being streamed to the spool during DATA, as
/// `.tmp-<id>.eml` in the queue directory (start-up recovery deletes such
/// files, so a crash mid-DATA leaves nothing behind for long). Removed on
/// drop unless committed.
#[derive(Debug)]
pub struct TempBody {
    path: PathBuf,
    file: Option<tokio::io::BufWriter<tokio::fs::File>>,
    written: u64,
}

impl TempBody {
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), SpoolError> {
        use tokio::io::AsyncWriteExt as _;
        let f = self.file.as_mut().expect("written only before commit");
        f.write_all(bytes)
            .await
            .map_err(io_err("writing", &self.path))?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.written
    }

    pub fn is_empty(&self) -> bool {
        self.written == 0
    }
}

impl Drop for TempBody {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// The fsyncs still owed by a `journal_append`.
#[derive(Debug)]
pub struct JournalSync {
    file: File,
    path: PathBuf,
    /// The queue directory, when the journal was created by this append.
    dir: Option<PathBuf>,
}

impl JournalSync {
    pub fn sync(self) -> Result<(), SpoolError> {
        self.file
            .sync_data()
            .map_err(io_err("syncing", &self.path))?;
        if let Some(d) = &self.dir {
            sync_dir(d).map_err(io_err("syncing", d))?;
        }
        Ok(())
    }
}

/// Handle on a spool directory. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Spool {
    queue: PathBuf,
    quarantine: PathBuf,
    committer: Option<mpsc::Sender<Job>>,
    counters: Arc<CommitCounters>,
}

impl Spool {
    /// Opens the spool for reading only (the `queue` CLI on a stopped relay).
    pub fn open_offline(dir: &Path) -> Self {
        Self {
            queue: dir.join("queue"),
            quarantine: dir.join("quarantine"),
            committer: None,
            counters: Arc::default(),
        }
    }

    /// Opens the spool for the running relay, creating directories and
    /// starting the committer thread.
    pub fn open(dir: &Path) -> Result<Self, SpoolError> {
        Self::open_counted(dir, Arc::default())
    }

    /// `open`, counting group-commit batches into `counters`.
    pub fn open_counted(dir: &Path, counters: Arc<CommitCounters>) -> Result<Self, SpoolError> {
        let mut s = Self::open_offline(dir);
        s.counters = counters;
        for d in [dir, &s.queue, &s.quarantine] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)
                .map_err(io_err("creating", d))?;
        }
        let (tx, rx) = mpsc::channel::<Job>();
        let queue = s.queue.clone();
        let counters = s.counters.clone();
        std::thread::Builder::new()
            .name("spool-commit".into())
            .spawn(move || committer(&queue, &rx, &counters))
            .map_err(io_err("spawning committer for", dir))?;
        s.committer = Some(tx);
        Ok(s)
    }

    /// How well group commit is batching (messages / batches).
    pub fn commit_counters(&self) -> &CommitCounters {
        &self.counters
    }

    pub fn queue_dir(&self) -> &Path {
        &self.queue
    }

    fn meta_path(&self, id: &str) -> PathBuf {
        self.queue.join(format!("{id}.json"))
    }

    fn journal_path(&self, id: &str) -> PathBuf {
        self.queue.join(format!("{id}.done"))
    }

    /// Records durably that `addrs` of message `id` were delivered (see the
    /// module docs). Blocking.
    pub fn journal_delivered(&self, id: &str, addrs: &[String]) -> Result<(), SpoolError> {
        self.journal_append(id, addrs)?.sync()
    }

    /// The write(2) of `journal_delivered`; the returned handle does its
    /// fsyncs (which only power loss needs), so a caller can do them
    /// elsewhere.
    pub fn journal_append(&self, id: &str, addrs: &[String]) -> Result<JournalSync, SpoolError> {
        check_id(id)?;
        let p = self.journal_path(id);
        let mut lines = String::new();
        for a in addrs {
            // Addresses come from the record, which the session built from
            // parsed (single-line) addresses; never let one split a line.
            if !a.contains(['\r', '\n']) {
                lines.push_str("delivered ");
                lines.push_str(a);
                lines.push('\n');
            }
        }
        let existed = p.exists();
        let mut f = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&p)
            .map_err(io_err("opening", &p))?;
        // One write: from here a kill -9 cannot lose the delivery.
        f.write_all(lines.as_bytes())
            .map_err(io_err("writing", &p))?;
        Ok(JournalSync {
            file: f,
            path: p,
            dir: (!existed).then(|| self.queue.clone()),
        })
    }

    /// Marks the recipients named in the journal delivered. Only complete
    /// lines count: a torn last line (power loss mid-write) is ignored.
    fn apply_journal(&self, rec: &mut QueueRecord) {
        let Ok(text) = fs::read_to_string(self.journal_path(&rec.id)) else {
            return;
        };
        for line in text.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
            if let Some(addr) = line.trim_end_matches('\n').strip_prefix("delivered ") {
                for r in rec.recipients.iter_mut().filter(|r| r.address == addr) {
                    r.state = RcptState::Delivered;
                    r.last_error = None;
                }
            }
        }
    }

    pub fn body_path(&self, id: &str) -> PathBuf {
        self.queue.join(format!("{id}.eml"))
    }

    /// Durably stores a new message; returns once it is on disk.
    pub async fn commit(&self, record: QueueRecord, body: Vec<u8>) -> Result<(), SpoolError> {
        self.submit(record, JobBody::Bytes(body)).await
    }

    async fn submit(&self, record: QueueRecord, body: JobBody) -> Result<(), SpoolError> {
        let tx = self.committer.as_ref().ok_or(SpoolError::CommitterGone)?;
        let (done, rx) = oneshot::channel();
        tx.send(Job { record, body, done })
            .map_err(|_| SpoolError::CommitterGone)?;
        rx.await.map_err(|_| SpoolError::CommitterGone)?
    }

    /// `commit` or `commit_streamed`, whichever the body needs.
    pub async fn commit_incoming(
        &self,
        record: QueueRecord,
        body: IncomingBody,
    ) -> Result<(), SpoolError> {
        match body {
            IncomingBody::Memory(b) => self.commit(record, b).await,
            IncomingBody::File(f) => self.commit_streamed(record, f).await,
        }
    }

    /// Starts streaming the body of message `id` to the spool.
    pub async fn create_body(&self, id: &str) -> Result<TempBody, SpoolError> {
        check_id(id)?;
        let path = self.queue.join(format!(".tmp-{id}.eml"));
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .await
            .map_err(io_err("creating", &path))?;
        Ok(TempBody {
            file: Some(tokio::io::BufWriter::with_capacity(BODY_WRITE_BUFFER, file)),
            path,
            written: 0,
        })
    }

    /// `commit` for a streamed body: flushes it, then the committer fsyncs
    /// it with the batch and renames it into place with the record.
    pub async fn commit_streamed(
        &self,
        record: QueueRecord,
        mut body: TempBody,
    ) -> Result<(), SpoolError> {
        use tokio::io::AsyncWriteExt as _;
        if body.path != self.queue.join(format!(".tmp-{}.eml", record.id)) {
            return Err(SpoolError::BadId { id: record.id });
        }
        let mut f = body.file.take().expect("committed once");
        if let Err(e) = f.flush().await {
            let _ = fs::remove_file(&body.path);
            return Err(io_err("writing", &body.path)(e));
        }
        drop(f);
        let path = body.path.clone();
        let r = self.submit(record, JobBody::File(path.clone())).await;
        if r.is_err() {
            // The committer removes what it failed on; this covers it being
            // gone altogether.
            let _ = fs::remove_file(&path);
        }
        r
    }

    pub fn exists(&self, id: &str) -> bool {
        check_id(id).is_ok() && self.meta_path(id).exists()
    }

    /// Atomically replaces a record (recipient state changed). Blocking.
    pub fn rewrite(&self, record: &QueueRecord) -> Result<(), SpoolError> {
        let p = self.meta_path(&record.id);
        // Never resurrect a message deleted meanwhile.
        if !p.exists() {
            return Err(SpoolError::NotFound {
                id: record.id.clone(),
            });
        }
        let json = serde_json::to_vec_pretty(record).expect("record serialises");
        write_atomic(&p, &json, 0o600).map_err(io_err("rewriting", &p))?;
        // The record now holds what the journal said (callers rewrite the
        // state they read, journal folded in): the journal can go. A crash
        // before this only leaves lines that repeat the record.
        let _ = fs::remove_file(self.journal_path(&record.id));
        Ok(())
    }

    /// Removes a message: record first, so a crash in between leaves an
    /// orphan body (cleaned at start) rather than a record without body.
    pub fn remove(&self, id: &str) -> Result<(), SpoolError> {
        self.unlink_record(id)?;
        self.remove_rest(id)
    }

    /// The commit point of a removal: the record's unlink, one syscall.
    /// From its return the message is gone for any restart after a crash of
    /// the process (for power loss, `remove_rest`'s directory sync).
    pub fn unlink_record(&self, id: &str) -> Result<(), SpoolError> {
        check_id(id)?;
        let meta = self.meta_path(id);
        match fs::remove_file(&meta) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(SpoolError::NotFound { id: id.into() })
            }
            Err(e) => Err(io_err("removing", &meta)(e)),
        }
    }

    /// What follows `unlink_record`: body, journal, directory sync.
    pub fn remove_rest(&self, id: &str) -> Result<(), SpoolError> {
        check_id(id)?;
        let _ = fs::remove_file(self.body_path(id));
        let _ = fs::remove_file(self.journal_path(id));
        sync_dir(&self.queue).map_err(io_err("syncing", &self.queue))
    }

    pub fn read_record(&self, id: &str) -> Result<QueueRecord, SpoolError> {
        check_id(id)?;
        let p = self.meta_path(id);
        let bytes = fs::read(&p).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                SpoolError::NotFound { id: id.into() }
            } else {
                io_err("reading", &p)(e)
            }
        })?;
        let mut rec: QueueRecord = serde_json::from_slice(&bytes).map_err(|e| SpoolError::Io {
            op: "parsing",
            path: p.clone(),
            source: io::Error::new(io::ErrorKind::InvalidData, e),
        })?;
        if rec.id == id {
            self.apply_journal(&mut rec);
        }
        Ok(rec)
    }

    pub fn read_body(&self, id: &str) -> Result<Vec<u8>, SpoolError> {
        check_id(id)?;
        let p = self.body_path(id);
        fs::read(&p).map_err(io_err("reading", &p))
    }

    /// All readable records, without touching anything (offline listing).
    pub fn scan(&self) -> Result<Vec<QueueRecord>, SpoolError> {
        let mut out = Vec::new();
        for id in self.ids()? {
            if let Ok(r) = self.read_record(&id) {
                out.push(r);
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    fn ids(&self) -> Result<Vec<String>, SpoolError> {
        let rd = match fs::read_dir(&self.queue) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(io_err("listing", &self.queue)(e)),
        };
        Ok(rd
            .filter_map(Result::ok)
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".json"))
                    .map(str::to_owned)
            })
            .filter(|id| check_id(id).is_ok())
            .collect())
    }

    /// Start-up recovery: loads every record; moves unreadable records or
    /// records without a body to `quarantine/`; deletes temp files and
    /// bodies without a record (never acknowledged to the client).
    pub fn recover(&self) -> Result<Vec<QueueRecord>, SpoolError> {
        let mut out = Vec::new();
        for id in self.ids()? {
            match self.read_record(&id) {
                Ok(r) if r.id == id && self.body_path(&id).exists() => out.push(r),
                Ok(_) => self.quarantine(&id, "record without body or with mismatched id"),
                Err(e) => self.quarantine(&id, &e.to_string()),
            }
        }
        let rd = fs::read_dir(&self.queue).map_err(io_err("listing", &self.queue))?;
        for e in rd.filter_map(Result::ok) {
            let name = e.file_name().to_string_lossy().into_owned();
            let orphan = name
                .strip_suffix(".eml")
                .or_else(|| name.strip_suffix(".done"))
                .is_some_and(|id| !self.meta_path(id).exists());
            if name.starts_with(crate::safeio::TEMP_PREFIX) || orphan {
                let _ = fs::remove_file(e.path());
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    fn quarantine(&self, id: &str, why: &str) {
        tracing::error!(id, why, "quarantining unreadable queue entry");
        for p in [
            self.meta_path(id),
            self.body_path(id),
            self.journal_path(id),
        ] {
            if let Some(name) = p.file_name() {
                let _ = fs::rename(&p, self.quarantine.join(name));
            }
        }
    }
}

fn committer(queue: &Path, rx: &mpsc::Receiver<Job>, counters: &CommitCounters) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        // Everything that arrived while the previous batch was syncing.
        while batch.len() < 256
            && let Ok(j) = rx.try_recv()
        {
            batch.push(j);
        }
        counters.batches.fetch_add(1, Ordering::Relaxed);
        counters
            .messages
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        commit_batch(queue, batch);
    }
}

/// Writes and fsyncs one message's two temp files.
fn write_temps(queue: &Path, job: &Job) -> Result<(PathBuf, PathBuf), SpoolError> {
    let id = &job.record.id;
    let tmp_body = queue.join(format!(".tmp-{id}.eml"));
    let tmp_meta = queue.join(format!(".tmp-{id}.json"));
    let json = serde_json::to_vec_pretty(&job.record).expect("record serialises");
    let body = match &job.body {
        JobBody::Bytes(b) => write_synced(&tmp_body, b, 0o600),
        // Same path: `create_body` names it so.
        JobBody::File(p) => File::open(p).and_then(|f| f.sync_all()),
    };
    let res = body
        .map_err(io_err("writing", &tmp_body))
        .and_then(|()| write_synced(&tmp_meta, &json, 0o600).map_err(io_err("writing", &tmp_meta)));
    match res {
        Ok(()) => Ok((tmp_body, tmp_meta)),
        Err(e) => {
            let _ = fs::remove_file(&tmp_body);
            let _ = fs::remove_file(&tmp_meta);
            Err(e)
        }
    }
}

/// Up to this many threads write and fsync a batch's files side by side:
/// the filesystem journal folds concurrent fsyncs into one commit, so a
/// batch costs about one sync round instead of one per file. The threads
/// live for one batch only; there is no thread per message.
const WRITERS: usize = 8;

fn commit_batch(queue: &Path, batch: Vec<Job>) {
    let results: Vec<Result<(PathBuf, PathBuf), SpoolError>> = if batch.len() == 1 {
        vec![write_temps(queue, &batch[0])]
    } else {
        let per = batch.len().div_ceil(WRITERS.min(batch.len()));
        std::thread::scope(|sc| {
            let handles: Vec<_> = batch
                .chunks(per)
                .map(|chunk| {
                    sc.spawn(move || {
                        chunk
                            .iter()
                            .map(|j| write_temps(queue, j))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("spool writer thread panicked"))
                .collect()
        })
    };
    let mut written = Vec::with_capacity(batch.len());
    for (job, res) in batch.into_iter().zip(results) {
        match res {
            Ok((tmp_body, tmp_meta)) => written.push((job, tmp_body, tmp_meta)),
            Err(e) => {
                let _ = job.done.send(Err(e));
            }
        }
    }
    let mut renamed = Vec::with_capacity(written.len());
    for (job, tmp_body, tmp_meta) in written {
        let id = &job.record.id;
        let body = queue.join(format!("{id}.eml"));
        let meta = queue.join(format!("{id}.json"));
        match fs::rename(&tmp_body, &body).and_then(|()| fs::rename(&tmp_meta, &meta)) {
            Ok(()) => renamed.push(job),
            Err(e) => {
                let _ = job.done.send(Err(SpoolError::Io {
                    op: "renaming into",
                    path: queue.into(),
                    source: e,
                }));
            }
        }
    }
    let synced = sync_dir(queue);
    for job in renamed {
        let r = match &synced {
            Ok(()) => Ok(()),
            Err(e) => Err(SpoolError::Io {
                op: "syncing",
                path: queue.into(),
                source: io::Error::new(e.kind(), e.to_string()),
            }),
        };
        let _ = job.done.send(r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str) -> QueueRecord {
        QueueRecord {
            id: id.into(),
            from: "a@example.com".into(),
            recipients: vec![RecipientStatus {
                address: "b@example.org".into(),
                state: RcptState::Pending,
                attempts: 0,
                last_error: None,
                notified: false,
            }],
            created_unix_ms: now_ms(),
            next_attempt_unix_ms: 0,
            attempts: 0,
            auth_user: Some("alice".into()),
            client: "127.0.0.1".into(),
            is_dsn: false,
            size: 5,
            smtputf8: false,
            dkim_signature: None,
            delay_warned: false,
        }
    }

    #[tokio::test]
    async fn commit_recover_quarantine() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path()).unwrap();
        let ids: Vec<String> = (0..20).map(|_| new_id()).collect();
        let futs: Vec<_> = ids
            .iter()
            .map(|id| s.commit(rec(id), b"hello".to_vec()))
            .collect();
        for f in futs {
            f.await.unwrap();
        }
        // Unreadable record, orphan body, stale temp file.
        let bad = new_id();
        fs::write(s.meta_path(&bad), b"{not json").unwrap();
        fs::write(s.body_path(&bad), b"x").unwrap();
        let orphan = new_id();
        fs::write(s.body_path(&orphan), b"x").unwrap();
        fs::write(s.queue.join(".tmp-zzz"), b"x").unwrap();
        let got = s.recover().unwrap();
        assert_eq!(got.len(), 20);
        assert!(
            dir.path()
                .join("quarantine")
                .join(format!("{bad}.json"))
                .exists()
        );
        assert!(!s.body_path(&orphan).exists());
        assert!(!s.queue.join(".tmp-zzz").exists());
        let mut r = s.read_record(&ids[0]).unwrap();
        r.recipients[0].state = RcptState::Delivered;
        s.rewrite(&r).unwrap();
        assert_eq!(
            s.read_record(&ids[0]).unwrap().recipients[0].state,
            RcptState::Delivered
        );
        assert_eq!(s.read_body(&ids[0]).unwrap(), b"hello");
        s.remove(&ids[0]).unwrap();
        assert!(matches!(
            s.remove(&ids[0]),
            Err(SpoolError::NotFound { .. })
        ));
        assert!(matches!(
            s.read_record("../etc/passwd"),
            Err(SpoolError::BadId { .. })
        ));
        assert_eq!(Spool::open_offline(dir.path()).scan().unwrap().len(), 19);
    }

    #[tokio::test]
    async fn delivery_journal_survives_and_folds_into_the_record() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path()).unwrap();
        let id = new_id();
        let mut r = rec(&id);
        r.recipients.push(RecipientStatus {
            address: "c@example.org".into(),
            state: RcptState::Pending,
            attempts: 0,
            last_error: Some("earlier".into()),
            notified: false,
        });
        s.commit(r.clone(), b"x".to_vec()).await.unwrap();
        s.journal_delivered(&id, &["c@example.org".into()]).unwrap();
        // What a restart (or `queue list`) sees: c delivered, b pending.
        let got = Spool::open_offline(dir.path()).read_record(&id).unwrap();
        let states: Vec<_> = got
            .recipients
            .iter()
            .map(|r| (r.address.as_str(), r.state))
            .collect();
        assert_eq!(
            states,
            [
                ("b@example.org", RcptState::Pending),
                ("c@example.org", RcptState::Delivered)
            ]
        );
        assert_eq!(got.recipients[1].last_error, None);
        assert_eq!(s.recover().unwrap()[0].pending().count(), 1);
        // A torn line is ignored, not half-applied.
        fs::OpenOptions::new()
            .append(true)
            .open(s.journal_path(&id))
            .unwrap()
            .write_all(b"delivered b@exam")
            .unwrap();
        assert_eq!(s.read_record(&id).unwrap().pending().count(), 1);
        // A rewrite folds the journal in and drops it.
        s.rewrite(&got).unwrap();
        assert!(!s.journal_path(&id).exists());
        assert_eq!(s.read_record(&id).unwrap(), got);
        // Removal takes the journal along; an orphan journal is cleaned.
        s.journal_delivered(&id, &["b@example.org".into()]).unwrap();
        s.remove(&id).unwrap();
        assert!(!s.journal_path(&id).exists());
        let stray = new_id();
        fs::write(s.journal_path(&stray), b"delivered x@y.z\n").unwrap();
        s.recover().unwrap();
        assert!(!s.journal_path(&stray).exists());
    }
}
