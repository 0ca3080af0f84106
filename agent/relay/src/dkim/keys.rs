//! DKIM keys on disk, for `smtpgate dkim generate|list|remove` and for the
//! relay's loader: one PEM private key per file, `<dir>/<domain>/<selector>.key`
//! (the layout opendkim's key tables use, so existing keys can be copied
//! in). PKCS#8 for both algorithms; PKCS#1 (`BEGIN RSA PRIVATE KEY`, what
//! `opendkim-genkey` writes) is read too.
//!
//! Private keys are 0600 and their directories 0700, owned by whoever owns
//! the keys directory: the package makes it smtpgate:smtpgate, so keys that
//! root creates with the CLI stay readable by the agent, and by no one else
//! (Debian's opendkim does the same with /etc/dkimkeys).

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use base64::Engine as _;
use mail_auth::common::crypto::Ed25519Key;
use rsa::pkcs1::DecodeRsaPrivateKey as _;
use rsa::pkcs8::{DecodePrivateKey as _, EncodePrivateKey as _, EncodePublicKey as _};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject as _;
use serde::Serialize;

/// The key sizes RFC 8301 asks for: at least 1024, and signers SHOULD use
/// 2048. ring signs with 2048 to 4096.
pub const RSA_BITS: usize = 2048;

/// Longest TXT character-string (RFC 1035 3.3): longer records are split.
const TXT_STRING_MAX: usize = 255;

const OID_RSA: &str = "1.2.840.113549.1.1.1";
const OID_ED25519: &str = "1.3.101.112";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    /// ed25519-sha256 (RFC 8463): short keys and signatures; not every
    /// verifier knows it yet, so pair it with an RSA key for wide reach.
    Ed25519,
    /// rsa-sha256, 2048 bits: what every verifier checks.
    Rsa,
}

impl Algorithm {
    /// The `k=` tag of the DNS record.
    pub fn dns_tag(self) -> &'static str {
        match self {
            Self::Ed25519 => "ed25519",
            Self::Rsa => "rsa",
        }
    }
}

impl std::fmt::Display for Algorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `pad`, so table columns (`{:<9}`) line up.
        f.pad(self.dns_tag())
    }
}

impl std::str::FromStr for Algorithm {
    type Err = DkimError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "ed25519" => Ok(Self::Ed25519),
            "rsa" => Ok(Self::Rsa),
            _ => Err(DkimError::BadAlgorithm { given: s.into() }),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DkimError {
    #[error("{domain:?} is not a domain name for DKIM: {problem}")]
    BadDomain {
        domain: String,
        problem: &'static str,
    },
    #[error("{selector:?} is not a DKIM selector: {problem}")]
    BadSelector {
        selector: String,
        problem: &'static str,
    },
    #[error("unknown DKIM algorithm {given:?}: use ed25519 or rsa")]
    BadAlgorithm { given: String },
    #[error(
        "{domain} already has a key with selector {selector} ({path}): choose another with --selector"
    )]
    Exists {
        domain: String,
        selector: String,
        path: PathBuf,
    },
    #[error("no DKIM key for {domain}{}", selector.as_ref().map(|s| format!(" with selector {s}")).unwrap_or_default())]
    NotFound {
        domain: String,
        selector: Option<String>,
    },
    #[error("{domain} has {} keys ({}): name the one to remove with --selector", selectors.len(), selectors.join(", "))]
    Ambiguous {
        domain: String,
        selectors: Vec<String>,
    },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("DKIM key {path}: {problem}")]
    BadKey { path: PathBuf, problem: String },
    #[error("generating a DKIM {algorithm} key: {problem}")]
    Generate {
        algorithm: Algorithm,
        problem: String,
    },
    #[error("DKIM key for {domain} (selector {selector}) cannot sign: {problem}")]
    Sign {
        domain: String,
        selector: String,
        problem: String,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> DkimError + 'a {
    move |source| DkimError::Io {
        op,
        path: path.into(),
        source,
    }
}

/// What `list` and `generate` report about one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyInfo {
    pub domain: String,
    pub selector: String,
    pub algorithm: Algorithm,
    pub path: PathBuf,
    /// The `p=` value: base64 of the raw Ed25519 key, or of the RSA key's
    /// SubjectPublicKeyInfo (what opendkim and most verifiers require,
    /// RFC 6376's errata 3017).
    pub public_key: String,
    /// Owner name of the record, with the final dot.
    pub dns_name: String,
    /// The TXT record's text, unsplit.
    pub dns_record: String,
    /// The zone-file line to publish (long records split into strings of at
    /// most 255 octets, as TXT requires).
    pub zone_line: String,
}

impl KeyInfo {
    pub(crate) fn new(
        domain: &str,
        selector: &str,
        algorithm: Algorithm,
        path: PathBuf,
        pk: &[u8],
    ) -> Self {
        let public_key = base64::engine::general_purpose::STANDARD.encode(pk);
        let dns_name = format!("{selector}._domainkey.{domain}.");
        let dns_record = format!("v=DKIM1; k={}; p={public_key}", algorithm.dns_tag());
        let strings: Vec<String> = dns_record
            .as_bytes()
            .chunks(TXT_STRING_MAX)
            .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
            .collect();
        let zone_line = format!("{dns_name} IN TXT {}", strings.join(" "));
        Self {
            domain: domain.into(),
            selector: selector.into(),
            algorithm,
            path,
            public_key,
            dns_name,
            dns_record,
            zone_line,
        }
    }
}

/// Lower-cases and checks a domain: LDH labels of 1..=63 octets, at least
/// two of them, 253 octets in all. It names a directory too, so nothing
/// else (no `/`, no `..`) may pass.
pub fn check_domain(domain: &str) -> Result<String, DkimError> {
    let d = domain.trim_end_matches('.').to_ascii_lowercase();
    let bad = |problem| {
        Err(DkimError::BadDomain {
            domain: domain.into(),
            problem,
        })
    };
    if d.is_empty() || d.len() > 253 {
        return bad("must be 1 to 253 characters");
    }
    if !d.contains('.') {
        return bad("must have at least two labels (example.com)");
    }
    if let Err(problem) = check_labels(&d) {
        return bad(problem);
    }
    Ok(d)
}

/// A selector is a dot-separated list of LDH labels (RFC 6376 3.1).
pub fn check_selector(selector: &str) -> Result<String, DkimError> {
    let s = selector.to_ascii_lowercase();
    let bad = |problem| {
        Err(DkimError::BadSelector {
            selector: selector.into(),
            problem,
        })
    };
    if s.is_empty() || s.len() > 63 {
        return bad("must be 1 to 63 characters");
    }
    if let Err(problem) = check_labels(&s) {
        return bad(problem);
    }
    Ok(s)
}

fn check_labels(name: &str) -> Result<(), &'static str> {
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("every label must be 1 to 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err("only letters, digits, '-' and '.' are allowed");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a label cannot start or end with '-'");
        }
    }
    Ok(())
}

/// `s2026-12`: the year and month of `now` (UTC), so a rotation's new key
/// gets a new name by itself and the name says how old a key is.
pub fn default_selector(now: SystemTime) -> String {
    let (y, m) = crate::date::year_month(now);
    format!("s{y}-{m:02}")
}

fn key_path(dir: &Path, domain: &str, selector: &str) -> PathBuf {
    dir.join(domain).join(format!("{selector}.key"))
}

/// Creates `<dir>/<domain>/<selector>.key` with a new key and returns what
/// to publish. The key is written atomically; an existing selector is
/// refused (a key cannot be replaced by accident: its DNS record would
/// stop matching).
pub fn generate(
    dir: &Path,
    domain: &str,
    algorithm: Algorithm,
    selector: Option<&str>,
) -> Result<KeyInfo, DkimError> {
    let domain = check_domain(domain)?;
    let selector = match selector {
        Some(s) => check_selector(s)?,
        None => default_selector(SystemTime::now()),
    };
    let path = key_path(dir, &domain, &selector);
    if path.exists() {
        return Err(DkimError::Exists {
            domain,
            selector,
            path,
        });
    }
    let pem = new_key_pem(algorithm)?;
    let owner = make_dirs(dir, &domain)?;
    crate::safeio::write_atomic_owned(&path, pem.as_bytes(), 0o600, owner)
        .map_err(io_err("writing", &path))?;
    let (alg, pk) = public_key(&path, pem.as_bytes())?;
    Ok(KeyInfo::new(&domain, &selector, alg, path, &pk))
}

fn new_key_pem(algorithm: Algorithm) -> Result<String, DkimError> {
    let fail = |problem: String| DkimError::Generate { algorithm, problem };
    let der = match algorithm {
        Algorithm::Ed25519 => Ed25519Key::generate_pkcs8().map_err(|e| fail(e.to_string()))?,
        Algorithm::Rsa => rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, RSA_BITS)
            .and_then(|k| k.to_pkcs8_der().map_err(Into::into))
            .map_err(|e| fail(e.to_string()))?
            .as_bytes()
            .to_vec(),
    };
    rsa::pkcs8::der::pem::encode_string("PRIVATE KEY", rsa::pkcs8::LineEnding::LF, &der)
        .map_err(|e| fail(e.to_string()))
}

/// Creates the keys directory and the domain's directory (0700) if needed;
/// returns the owner new files must get, when it is not the process's.
fn make_dirs(dir: &Path, domain: &str) -> Result<Option<(u32, u32)>, DkimError> {
    let mut b = fs::DirBuilder::new();
    b.recursive(true).mode(0o700);
    b.create(dir).map_err(io_err("creating", dir))?;
    let top = fs::metadata(dir).map_err(io_err("reading", dir))?;
    let sub = dir.join(domain);
    b.create(&sub).map_err(io_err("creating", &sub))?;
    let mine = fs::metadata(&sub).map_err(io_err("reading", &sub))?;
    let owner = (top.uid(), top.gid());
    if (mine.uid(), mine.gid()) == owner {
        return Ok(None);
    }
    std::os::unix::fs::chown(&sub, Some(owner.0), Some(owner.1))
        .map_err(io_err("giving the keys directory's owner", &sub))?;
    Ok(Some(owner))
}

/// Reads a key file: its DER, as ring and the rsa crate take it.
pub(crate) fn read_key(path: &Path) -> Result<(Algorithm, PrivateKeyDer<'static>), DkimError> {
    let pem = fs::read(path).map_err(io_err("reading", path))?;
    parse_key(path, &pem)
}

fn parse_key(path: &Path, pem: &[u8]) -> Result<(Algorithm, PrivateKeyDer<'static>), DkimError> {
    let bad = |problem: String| DkimError::BadKey {
        path: path.into(),
        problem,
    };
    let der = PrivateKeyDer::from_pem_slice(pem)
        .map_err(|e| bad(format!("not a PEM private key: {e}")))?;
    let alg = match &der {
        PrivateKeyDer::Pkcs1(_) => Algorithm::Rsa,
        PrivateKeyDer::Pkcs8(k) => {
            let info = rsa::pkcs8::PrivateKeyInfo::try_from(k.secret_pkcs8_der())
                .map_err(|e| bad(format!("not a PKCS#8 key: {e}")))?;
            match info.algorithm.oid.to_string().as_str() {
                OID_RSA => Algorithm::Rsa,
                OID_ED25519 => Algorithm::Ed25519,
                other => {
                    return Err(bad(format!(
                        "algorithm {other} is not one DKIM signs with (ed25519, rsa)"
                    )));
                }
            }
        }
        _ => return Err(bad("an EC key: DKIM signs with ed25519 or rsa".into())),
    };
    Ok((alg, der))
}

/// The `p=` bytes of a key file's public half.
fn public_key(path: &Path, pem: &[u8]) -> Result<(Algorithm, Vec<u8>), DkimError> {
    let (alg, der) = parse_key(path, pem)?;
    public_of(path, alg, &der).map(|pk| (alg, pk))
}

pub(crate) fn public_of(
    path: &Path,
    alg: Algorithm,
    der: &PrivateKeyDer<'_>,
) -> Result<Vec<u8>, DkimError> {
    let bad = |problem: String| DkimError::BadKey {
        path: path.into(),
        problem,
    };
    match (alg, der) {
        (Algorithm::Ed25519, PrivateKeyDer::Pkcs8(k)) => {
            Ed25519Key::from_pkcs8_maybe_unchecked_der(k.secret_pkcs8_der())
                .map(|k| k.public_key())
                .map_err(|e| bad(e.to_string()))
        }
        (Algorithm::Rsa, k) => {
            let private = match k {
                PrivateKeyDer::Pkcs1(k) => rsa::RsaPrivateKey::from_pkcs1_der(k.secret_pkcs1_der())
                    .map_err(|e| bad(e.to_string()))?,
                PrivateKeyDer::Pkcs8(k) => rsa::RsaPrivateKey::from_pkcs8_der(k.secret_pkcs8_der())
                    .map_err(|e| bad(e.to_string()))?,
                _ => return Err(bad("not an RSA key".into())),
            };
            rsa::RsaPublicKey::from(&private)
                .to_public_key_der()
                .map(|d| d.as_bytes().to_vec())
                .map_err(|e| bad(e.to_string()))
        }
        (Algorithm::Ed25519, _) => Err(bad("an Ed25519 key must be PKCS#8".into())),
    }
}

/// Every `<domain>/<selector>.key` under `dir`, sorted; a missing `dir` has
/// none. Names that are not a domain and a selector are left alone (a
/// README or a backup beside the keys is not an error), dot files too.
pub(crate) fn key_files(dir: &Path) -> Result<Vec<(String, String, PathBuf)>, DkimError> {
    let top = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("listing", dir)(e)),
    };
    let mut out = Vec::new();
    for d in top {
        let d = d.map_err(io_err("listing", dir))?;
        let name = d.file_name().to_string_lossy().into_owned();
        let Ok(domain) = check_domain(&name) else {
            continue;
        };
        if domain != name || !d.path().is_dir() {
            continue;
        }
        let sub = d.path();
        for f in fs::read_dir(&sub).map_err(io_err("listing", &sub))? {
            let f = f.map_err(io_err("listing", &sub))?;
            let fname = f.file_name().to_string_lossy().into_owned();
            let Some(stem) = fname.strip_suffix(".key") else {
                continue;
            };
            if check_selector(stem).is_ok_and(|s| s == stem) {
                out.push((domain.clone(), stem.to_owned(), f.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Every key under `dir`, with its DNS record.
pub fn list(dir: &Path) -> Result<Vec<KeyInfo>, DkimError> {
    key_files(dir)?
        .into_iter()
        .map(|(domain, selector, path)| {
            let pem = fs::read(&path).map_err(io_err("reading", &path))?;
            let (alg, pk) = public_key(&path, &pem)?;
            Ok(KeyInfo::new(&domain, &selector, alg, path, &pk))
        })
        .collect()
}

/// Removes the domain's key with `selector`, or its only key. A domain
/// with several keys needs the selector: which one to drop is the admin's
/// call (the other may be the one DNS already publishes).
pub fn remove(dir: &Path, domain: &str, selector: Option<&str>) -> Result<KeyInfo, DkimError> {
    let domain = check_domain(domain)?;
    let selector = selector.map(check_selector).transpose()?;
    let mut keys: Vec<KeyInfo> = list(dir)?
        .into_iter()
        .filter(|k| k.domain == domain)
        .collect();
    let not_found = || DkimError::NotFound {
        domain: domain.clone(),
        selector: selector.clone(),
    };
    let key = match &selector {
        Some(s) => keys
            .into_iter()
            .find(|k| &k.selector == s)
            .ok_or_else(not_found)?,
        None if keys.len() > 1 => {
            return Err(DkimError::Ambiguous {
                domain: domain.clone(),
                selectors: keys.into_iter().map(|k| k.selector).collect(),
            });
        }
        None => keys.pop().ok_or_else(not_found)?,
    };
    fs::remove_file(&key.path).map_err(io_err("removing", &key.path))?;
    let sub = dir.join(&domain);
    // The domain's directory goes with its last key; anything else in it
    // (not ours) keeps it.
    let _ = fs::remove_dir(&sub);
    if let Ok(f) = fs::File::open(dir) {
        let _ = f.sync_all();
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn names_are_checked() {
        assert_eq!(check_domain("Example.COM.").unwrap(), "example.com");
        for bad in [
            "", "com", "../etc", "a/b.com", "-a.com", "a..com", "a b.com", "ä.com",
        ] {
            assert!(check_domain(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(check_selector("S2026-12").unwrap(), "s2026-12");
        assert_eq!(check_selector("a.b").unwrap(), "a.b");
        for bad in ["", "a/b", "..", "x_y", "-a"] {
            assert!(check_selector(bad).is_err(), "{bad:?} accepted");
        }
        assert!("RSA".parse::<Algorithm>().is_ok());
        assert!("dsa".parse::<Algorithm>().is_err());
    }

    #[test]
    fn default_selector_is_year_and_month() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_796_083_200); // 2026-12-01
        assert_eq!(default_selector(t), "s2026-12");
    }

    #[test]
    fn generate_list_remove() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("dkim");
        let ed = generate(&dir, "Example.com", Algorithm::Ed25519, Some("e1")).unwrap();
        assert_eq!(ed.dns_name, "e1._domainkey.example.com.");
        assert!(ed.dns_record.starts_with("v=DKIM1; k=ed25519; p="));
        // 32 raw bytes.
        assert_eq!(ed.public_key.len(), 44);
        assert_eq!(
            ed.zone_line,
            format!("e1._domainkey.example.com. IN TXT \"{}\"", ed.dns_record)
        );
        let mode = fs::metadata(&ed.path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let mode = fs::metadata(dir.join("example.com"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o700);

        let rsa = generate(&dir, "example.com", Algorithm::Rsa, Some("r1")).unwrap();
        // SubjectPublicKeyInfo of a 2048-bit key: 294 octets, 392 in base64.
        assert!(
            rsa.public_key
                .starts_with("MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA")
        );
        assert_eq!(rsa.public_key.len(), 392);
        // Split into TXT strings of at most 255.
        let strings: Vec<&str> = rsa.zone_line.split('"').skip(1).step_by(2).collect();
        assert_eq!(strings.len(), 2);
        assert!(strings.iter().all(|s| s.len() <= 255));
        assert_eq!(strings.concat(), rsa.dns_record);

        assert!(matches!(
            generate(&dir, "example.com", Algorithm::Rsa, Some("r1")),
            Err(DkimError::Exists { .. })
        ));
        // Stray files are ignored, not errors.
        fs::write(dir.join("example.com/README"), "x").unwrap();
        fs::write(dir.join("notes.txt"), "x").unwrap();
        let all = list(&dir).unwrap();
        assert_eq!(all, vec![ed.clone(), rsa.clone()]);

        assert!(matches!(
            remove(&dir, "example.com", None),
            Err(DkimError::Ambiguous { .. })
        ));
        assert!(matches!(
            remove(&dir, "example.com", Some("nope")),
            Err(DkimError::NotFound { .. })
        ));
        assert_eq!(remove(&dir, "example.com", Some("r1")).unwrap(), rsa);
        assert_eq!(remove(&dir, "EXAMPLE.com", None).unwrap(), ed);
        assert!(list(&dir).unwrap().is_empty());
        assert!(matches!(
            remove(&dir, "example.com", None),
            Err(DkimError::NotFound { .. })
        ));
        // A missing keys directory has no keys.
        assert!(list(&tmp.path().join("none")).unwrap().is_empty());
    }

    /// Keys that root makes with the CLI belong to the keys directory's
    /// owner (the agent's user under the package), mode 0600: readable by
    /// the agent, by no one else. Needs root to give files away, as CI has.
    #[test]
    fn new_keys_belong_to_the_keys_directory_owner() {
        let root = std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
        });
        assert!(
            root,
            "this test needs root to chown, as CI has; refusing to skip"
        );
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("dkim");
        fs::create_dir(&dir).unwrap();
        // nobody:nogroup, standing in for smtpgate:smtpgate.
        std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
        let k = generate(&dir, "example.com", Algorithm::Ed25519, None).unwrap();
        for p in [k.path.clone(), dir.join("example.com")] {
            let m = fs::metadata(&p).unwrap();
            assert_eq!((m.uid(), m.gid()), (65534, 65534), "{}", p.display());
        }
        let m = fs::metadata(&k.path).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        // And it still lists (root reads anything).
        assert_eq!(list(&dir).unwrap(), vec![k]);
    }

    #[test]
    fn bad_key_files_say_what_is_wrong() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("k.key");
        let err = parse_key(&p, b"garbage").unwrap_err().to_string();
        assert!(err.contains("not a PEM private key"), "{err}");
        // An EC key (P-256, from rcgen) is refused by name.
        let ec = rcgen::KeyPair::generate().unwrap().serialize_pem();
        let err = parse_key(&p, ec.as_bytes()).unwrap_err().to_string();
        assert!(err.contains("1.2.840.10045.2.1"), "{err}");
    }
}
