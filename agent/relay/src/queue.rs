//! Queue inspection for `smtpgate queue ...`. `list`, `show` and `delete`
//! work on the spool directory directly, so they also work while the relay
//! is stopped; on a running relay prefer `RelayHandle::delete` (it also
//! stops the message's delivery task) and `RelayHandle::flush`.

use std::path::Path;

use crate::spool::Spool;
pub use crate::spool::{QueueRecord, RcptState, RecipientStatus, SpoolError};

/// Every readable queued message, oldest first.
pub fn list(spool_dir: &Path) -> Result<Vec<QueueRecord>, SpoolError> {
    Spool::open_offline(spool_dir).scan()
}

/// One message's record and raw bytes (as they will be sent: its DKIM
/// signatures, from the record, then the body file).
pub fn show(spool_dir: &Path, id: &str) -> Result<(QueueRecord, Vec<u8>), SpoolError> {
    let s = Spool::open_offline(spool_dir);
    let rec = s.read_record(id)?;
    let mut msg = rec.dkim_signature.clone().unwrap_or_default().into_bytes();
    msg.extend_from_slice(&s.read_body(id)?);
    Ok((rec, msg))
}

/// Removes a message without bouncing it.
pub fn delete(spool_dir: &Path, id: &str) -> Result<(), SpoolError> {
    Spool::open_offline(spool_dir).remove(id)
}
