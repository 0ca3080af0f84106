//! Large, short-lived buffers that go back to the OS when freed.
//!
//! glibc serves a request above its mmap threshold with a mapping of its
//! own and unmaps it on free. The threshold starts at 128 KiB but rises to
//! the size of any large block freed, up to 32 MiB: soon every buffer of a
//! few MiB comes from the allocator's arenas, which keep the memory after
//! it is freed. Measured here: 99 argon2id logins through 4 threads took
//! the relay from 34 to 815 MiB, and delivering 40 messages of 8 MiB left
//! it at 118 MiB; neither was ever returned. A request above 32 MiB is
//! always mapped and always unmapped. Only the capacity is that large:
//! pages never written are never touched, so RSS grows by what is used.

/// Requests of at least this many bytes are always mmapped by glibc.
pub(crate) const RETURNED_ON_FREE_BYTES: usize = 40 << 20;

/// An empty Vec whose buffer will be returned to the OS on drop, with room
/// for `len` elements.
pub(crate) fn returned_on_free<T>(len: usize) -> Vec<T> {
    let floor = RETURNED_ON_FREE_BYTES / std::mem::size_of::<T>().max(1);
    Vec::with_capacity(len.max(floor))
}

/// `prefix` followed by a whole file, in one `returned_on_free` buffer (a
/// queued message is its DKIM signatures, kept in the record, then its
/// body file).
pub(crate) async fn read_returned_on_free(
    prefix: &[u8],
    path: &std::path::Path,
) -> std::io::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt as _;
    let mut f = tokio::fs::File::open(path).await?;
    let len = usize::try_from(f.metadata().await?.len()).unwrap_or(usize::MAX);
    let mut v = returned_on_free(len.saturating_add(prefix.len()).saturating_add(1));
    v.extend_from_slice(prefix);
    f.read_to_end(&mut v).await?;
    Ok(v)
}
