//! Fuzzes the command parser. Beyond "never panics", checks that whatever
//! it accepts as an address is free of the open-relay tricks it promises to
//! refuse.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smtpgate_relay::parse::{Address, Command, parse_command};

fn check(a: &Address) {
    assert!(!a.local.is_empty() && !a.domain.is_empty());
    for bad in ['%', '!', '@', '"', ':', ',', '\\', ' ', '<', '>'] {
        assert!(!a.local.contains(bad), "local part {:?} contains {bad:?}", a.local);
    }
    assert!(!a.domain.contains('@') && !a.domain.starts_with('['));
    assert!(a.local.len() <= 64 && a.domain.len() <= 255);
}

fuzz_target!(|data: &[u8]| {
    match parse_command(data) {
        Ok(Command::Mail { from: Some(a), .. }) | Ok(Command::Rcpt { to: a }) => check(&a),
        _ => {}
    }
});
