//! A real argon2id hash at the lowest cost argon2 allows (8 KiB, one
//! pass): test logins stay fast in debug builds, and the tests need no
//! legacy hash scheme, so they run with and without `legacy-hashes`.
//! Shared by the unit tests (through `#[path]`) and the integration tests.

use argon2::password_hash::{PasswordHasher as _, SaltString};

pub fn fast_hash(pw: &str) -> String {
    let params = argon2::Params::new(8, 1, 1, None).expect("argon2's minimum parameters");
    let salt = SaltString::from_b64("c21ndGVzdHNhbHQ").expect("a valid B64 salt");
    argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password(pw.as_bytes(), &salt)
        .expect("hashing with valid parameters")
        .to_string()
}
