//! Random bits from the kernel (getrandom(2)) for queue ids, temp-file
//! names, salts, Message-IDs and retry jitter: one place instead of an
//! `OsRng` borrowed from argon2's re-export in four files.

/// 64 random bits. getrandom(2) fails only for a bad buffer or on a kernel
/// without the call (before 3.17, far older than any the agent's eBPF
/// runs on); the crate retries interruptions. Nothing in a queue id or a
/// jitter can go on without randomness, so this stops with the reason,
/// as `OsRng` did.
pub(crate) fn u64() -> u64 {
    getrandom::u64().expect("getrandom(2) failed: no randomness from the kernel")
}

/// A uniform draw from [0, 1): the top 53 bits, all an f64 holds exactly.
pub(crate) fn unit_f64() -> f64 {
    (u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// `buf` filled with random bytes, or the kernel's error as an
/// `io::Error` for callers that can report one.
pub(crate) fn fill(buf: &mut [u8]) -> std::io::Result<()> {
    getrandom::fill(buf).map_err(std::io::Error::from)
}

#[cfg(test)]
mod tests {
    #[test]
    fn bits_differ() {
        // Two equal 64-bit draws in a row: a 2^-64 chance, or a broken source.
        assert_ne!(super::u64(), super::u64());
        let mut a = [0u8; 16];
        let mut b = [0u8; 16];
        super::fill(&mut a).unwrap();
        super::fill(&mut b).unwrap();
        assert_ne!(a, b);
        assert!((0.0..1.0).contains(&super::unit_f64()));
    }
}
