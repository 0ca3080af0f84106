//! DKIM signing (RFC 6376, Ed25519 per RFC 8463) with Stalwart's
//! `mail-auth`, on ring.
//!
//! Every key of the signing domain signs (`keys` module for the files):
//! an Ed25519 key and an RSA key side by side reach verifiers that know
//! only RSA, and during a rotation the old and the new selector both sign,
//! so nothing depends on when DNS publishes the new record. A verifier
//! passes a message if any signature verifies (RFC 6376 6.1; DMARC too).
//!
//! Signing streams: the session feeds the header block and then the body
//! chunk by chunk as it spools them; mail-auth keeps the header section
//! (bounded by the session's own header limit) and hashes the body as it
//! goes, so a 25 MiB message costs no more memory than a small one. The
//! signature fields are known only at the end of DATA, after the body is
//! on disk: they travel in the queue record (`QueueRecord::dkim`) and are
//! sent before the body file's bytes.

pub mod keys;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter as _;
use mail_auth::dkim::{Canonicalization, DkimSigner, DkimSigningStream, Done};
use rustls_pki_types::PrivateKeyDer;

pub use keys::{Algorithm, DkimError, KeyInfo};

/// The fields each signature covers (h=), relaxed/relaxed. A field listed
/// but absent is signed as absent (RFC 6376 5.4.2): nobody can add a Cc:,
/// a Reply-To: or a second Subject: later without breaking the signature.
/// From: is listed twice for the same reason: a second From: added on the
/// way fails the signature instead of hiding behind the first. Trace and
/// transport fields (Received, Return-Path) are left out: every hop adds
/// them.
pub const SIGNED_HEADERS: &[&str] = &[
    "From",
    "From",
    "Sender",
    "Reply-To",
    "Subject",
    "Date",
    "Message-ID",
    "To",
    "Cc",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
];

enum Signer {
    Rsa(DkimSigner<RsaKey<Sha256>, Done>),
    Ed25519(DkimSigner<Ed25519Key, Done>),
}

struct Key {
    info: KeyInfo,
    signer: Signer,
}

/// The keys loaded at one moment; sessions take a snapshot, so a reload in
/// the middle of a DATA does not change the keys signing it.
#[derive(Default)]
pub struct KeySet {
    by_domain: HashMap<String, Vec<Key>>,
}

impl KeySet {
    /// Loads every key under `dir` and signs a test message with each, so a
    /// key that cannot sign is refused here rather than in a session.
    pub fn load(dir: &Path) -> Result<Self, DkimError> {
        let mut by_domain: HashMap<String, Vec<Key>> = HashMap::new();
        for (domain, selector, path) in keys::key_files(dir)? {
            let key = load_key(&domain, &selector, &path)?;
            by_domain.entry(domain).or_default().push(key);
        }
        Ok(Self { by_domain })
    }

    pub fn len(&self) -> usize {
        self.by_domain.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The keys that sign for `domain` (case-insensitive), as (selector,
    /// algorithm).
    pub fn keys_for(&self, domain: &str) -> Vec<(&str, Algorithm)> {
        self.by_domain
            .get(&domain.to_ascii_lowercase())
            .map(|v| {
                v.iter()
                    .map(|k| (k.info.selector.as_str(), k.info.algorithm))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A streaming signer for a message from `domain`; `None` when the
    /// domain has no key (such mail goes out unsigned, as before).
    pub fn signer_for(&self, domain: &str) -> Option<MessageSigner<'_>> {
        let keys = self.by_domain.get(&domain.to_ascii_lowercase())?;
        Some(MessageSigner {
            streams: keys.iter().map(|k| (k, k.stream())).collect(),
        })
    }
}

fn load_key(domain: &str, selector: &str, path: &Path) -> Result<Key, DkimError> {
    let (algorithm, der) = keys::read_key(path)?;
    let public = keys::public_of(path, algorithm, &der)?;
    let bad = |e: mail_auth::Error| DkimError::BadKey {
        path: path.into(),
        problem: e.to_string(),
    };
    let signer = match (algorithm, der) {
        (Algorithm::Ed25519, PrivateKeyDer::Pkcs8(k)) => {
            let key =
                Ed25519Key::from_pkcs8_maybe_unchecked_der(k.secret_pkcs8_der()).map_err(bad)?;
            Signer::Ed25519(configure(DkimSigner::from_key(key), domain, selector))
        }
        (Algorithm::Rsa, der) => {
            let key = RsaKey::<Sha256>::from_key_der(der).map_err(bad)?;
            Signer::Rsa(configure(DkimSigner::from_key(key), domain, selector))
        }
        (Algorithm::Ed25519, _) => {
            return Err(DkimError::BadKey {
                path: path.into(),
                problem: "an Ed25519 key must be PKCS#8".into(),
            });
        }
    };
    let key = Key {
        info: KeyInfo::new(domain, selector, algorithm, path.into(), &public),
        signer,
    };
    // ring refuses RSA keys under 2048 bits only when signing.
    let mut probe = MessageSigner {
        streams: vec![(&key, key.stream())],
    };
    probe.write(b"From: probe@invalid\r\n\r\nprobe\r\n");
    probe.finish()?;
    Ok(key)
}

fn configure<T: mail_auth::common::crypto::SigningKey>(
    s: DkimSigner<T>,
    domain: &str,
    selector: &str,
) -> DkimSigner<T, Done> {
    s.domain(domain)
        .selector(selector)
        .headers(SIGNED_HEADERS.iter().copied())
        .header_canonicalization(Canonicalization::Relaxed)
        .body_canonicalization(Canonicalization::Relaxed)
}

impl Key {
    fn stream(&self) -> Stream<'_> {
        match &self.signer {
            Signer::Rsa(s) => Stream::Rsa(s.sign_streaming()),
            Signer::Ed25519(s) => Stream::Ed25519(s.sign_streaming()),
        }
    }
}

enum Stream<'k> {
    Rsa(DkimSigningStream<'k, RsaKey<Sha256>>),
    Ed25519(DkimSigningStream<'k, Ed25519Key>),
}

/// Signs one message with every key of its domain, fed as it arrives.
pub struct MessageSigner<'k> {
    streams: Vec<(&'k Key, Stream<'k>)>,
}

impl MessageSigner<'_> {
    /// The next bytes of the message as it will be sent (header block
    /// first, CRLF line ends, no dot-stuffing).
    pub fn write(&mut self, bytes: &[u8]) {
        for (_, s) in &mut self.streams {
            match s {
                Stream::Rsa(s) => s.write(bytes),
                Stream::Ed25519(s) => s.write(bytes),
            }
        }
    }

    /// The DKIM-Signature fields, each ending in CRLF, to put before the
    /// message.
    pub fn finish(self) -> Result<String, DkimError> {
        let mut out = String::new();
        for (key, s) in self.streams {
            let sig = match s {
                Stream::Rsa(s) => s.finish(),
                Stream::Ed25519(s) => s.finish(),
            }
            .map_err(|e| DkimError::Sign {
                domain: key.info.domain.clone(),
                selector: key.info.selector.clone(),
                problem: e.to_string(),
            })?;
            out.push_str(&sig.to_header());
        }
        Ok(out)
    }
}

/// The relay's current keys, swapped whole on reload (as `TlsStore` swaps
/// certificates): a reload that fails keeps the keys that were signing.
pub struct DkimStore {
    dir: PathBuf,
    current: RwLock<Arc<KeySet>>,
}

impl std::fmt::Debug for DkimStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DkimStore")
            .field("dir", &self.dir)
            .field("keys", &self.snapshot().len())
            .finish()
    }
}

impl DkimStore {
    pub fn load(dir: &Path) -> Result<Self, DkimError> {
        let set = KeySet::load(dir)?;
        log_keys(dir, &set);
        Ok(Self {
            dir: dir.into(),
            current: RwLock::new(Arc::new(set)),
        })
    }

    /// Re-reads the keys directory; returns how many keys sign now. On
    /// error the old keys stay.
    pub fn reload(&self) -> Result<usize, DkimError> {
        let set = KeySet::load(&self.dir)?;
        log_keys(&self.dir, &set);
        let n = set.len();
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(set);
        Ok(n)
    }

    pub fn snapshot(&self) -> Arc<KeySet> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

fn log_keys(dir: &Path, set: &KeySet) {
    let mut names: Vec<String> = set
        .by_domain
        .values()
        .flatten()
        .map(|k| {
            format!(
                "{}/{} ({})",
                k.info.domain, k.info.selector, k.info.algorithm
            )
        })
        .collect();
    names.sort();
    tracing::info!(dir = %dir.display(), keys = names.len(), signing = names.join(", "), "DKIM keys loaded");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_with_every_key_of_the_domain_and_reloads() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let store = DkimStore::load(dir).unwrap();
        assert!(store.snapshot().signer_for("example.com").is_none());
        keys::generate(dir, "example.com", Algorithm::Ed25519, Some("e")).unwrap();
        keys::generate(dir, "example.com", Algorithm::Rsa, Some("r")).unwrap();
        keys::generate(dir, "example.org", Algorithm::Ed25519, Some("o")).unwrap();
        // Not before the reload.
        let old = store.snapshot();
        assert!(old.signer_for("example.com").is_none());
        assert_eq!(store.reload().unwrap(), 3);
        let set = store.snapshot();
        let mut s = set.signer_for("Example.COM").unwrap();
        // Chunks split anywhere, the header/body boundary included.
        for chunk in [
            &b"From: a@example.com\r\nTo: b@example.net\r\nSubject: hi\r"[..],
            b"\n\r",
            b"\nbody\r\n",
        ] {
            s.write(chunk);
        }
        let sigs = s.finish().unwrap();
        assert_eq!(sigs.matches("DKIM-Signature: ").count(), 2, "{sigs}");
        assert!(sigs.contains("a=ed25519-sha256; s=e; d=example.com; c=relaxed/relaxed"));
        assert!(sigs.contains("a=rsa-sha256; s=r; d=example.com; c=relaxed/relaxed"));
        assert!(sigs.ends_with("\r\n"));
        // Every line but the first is a continuation: one field per key.
        for line in sigs.split_inclusive("\r\n") {
            assert!(
                line.starts_with("DKIM-Signature: ") || line.starts_with([' ', '\t']),
                "{line:?}"
            );
        }
        // A broken key fails the reload and the old keys stay.
        std::fs::write(dir.join("example.org/o.key"), "garbage").unwrap();
        assert!(store.reload().is_err());
        assert_eq!(store.snapshot().len(), 3);
    }
}
