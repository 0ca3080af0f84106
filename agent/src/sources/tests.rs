//! Merging what the tasks report into the policy, without DNS or inotify:
//! the rules of last good state, fail closed, and where each entry came
//! from.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use super::*;
use crate::policy::{Allowlist, Builder};

const ATTACH: &str = "[[attach]]\nhook = \"tc-ingress\"\ninterface = \"lan0\"\n";

fn config(extra: &str) -> Config {
    Config::parse(&format!("{extra}\n{ATTACH}"), "test").unwrap()
}

fn path(name: &str) -> PathBuf {
    PathBuf::from(format!("/etc/smtpgate/allow.d/{name}"))
}

fn scan(files: &[(&str, Result<&str, &str>)]) -> Scan {
    Scan {
        files: files
            .iter()
            .map(|(name, r)| {
                (
                    path(name),
                    r.map(|text| crate::policy::parse_list(text).unwrap())
                        .map_err(ToOwned::to_owned),
                )
            })
            .collect(),
        ..Scan::default()
    }
}

fn allowlist(s: &Sources) -> Allowlist {
    let mut b = Builder::default();
    s.contribute(&mut b);
    b.build()
}

fn allowed(s: &Sources) -> Vec<String> {
    allowlist(s)
        .entries()
        .map(|e| format!("{} {}", e.prefix, e.origin))
        .collect()
}

fn answer(name: &str, addrs: &[&str]) -> DnsAnswer {
    DnsAnswer {
        name: name.parse().unwrap(),
        result: Ok(Resolved {
            addresses: addrs
                .iter()
                .map(|a| (a.parse::<IpAddr>().unwrap(), None))
                .collect(),
            ttl_secs: 60,
        }),
        next_unix: 1060.0,
    }
}

fn failure(name: &str) -> DnsAnswer {
    DnsAnswer {
        name: name.parse().unwrap(),
        result: Err("A mail.example.com: request timed out".into()),
        next_unix: 1030.0,
    }
}

#[test]
fn a_broken_file_keeps_its_last_good_entries() {
    let c = config("allowlist_files = [\"/etc/smtpgate/allow.d/*.txt\"]");
    let mut s = Sources::new(
        &c,
        Stored::default(),
        scan(&[
            ("a.txt", Ok("192.0.2.7\n192.0.2.8\n")),
            ("b.txt", Ok("192.0.2.9\n")),
        ]),
        1000.0,
    );
    assert_eq!(
        allowed(&s),
        [
            "192.0.2.7/32 file:/etc/smtpgate/allow.d/a.txt:1",
            "192.0.2.8/32 file:/etc/smtpgate/allow.d/a.txt:2",
            "192.0.2.9/32 file:/etc/smtpgate/allow.d/b.txt:1",
        ]
    );
    assert!(!s.degraded());

    // a.txt broken, b.txt edited: b's edit applies, a keeps its entries.
    let changed = s.apply_scan(
        scan(&[
            (
                "a.txt",
                Err("line 2: \"192.0.2.300\": not an IPv4 or IPv6 address or prefix"),
            ),
            ("b.txt", Ok("192.0.2.10\n")),
        ]),
        1010.0,
    );
    assert!(changed);
    assert_eq!(
        allowed(&s),
        [
            "192.0.2.7/32 file:/etc/smtpgate/allow.d/a.txt:1",
            "192.0.2.8/32 file:/etc/smtpgate/allow.d/a.txt:2",
            "192.0.2.10/32 file:/etc/smtpgate/allow.d/b.txt:1",
        ]
    );
    let st = s.status();
    let a = st.files.iter().find(|f| f.path == path("a.txt")).unwrap();
    assert_eq!(a.entries, 2);
    assert!(a.error.as_ref().unwrap().contains("192.0.2.300"));
    assert_eq!(a.error_since_unix, Some(1010.0));
    assert_eq!(a.loaded_unix, Some(1000.0));
    assert!(s.degraded());

    // Still broken later: the error's start stays.
    assert!(!s.apply_scan(
        scan(&[
            (
                "a.txt",
                Err("line 2: \"192.0.2.300\": not an IPv4 or IPv6 address or prefix")
            ),
            ("b.txt", Ok("192.0.2.10\n")),
        ]),
        1020.0,
    ));
    let st = s.status();
    assert_eq!(st.files[0].error_since_unix, Some(1010.0));

    // Fixed: the fix applies. b.txt deleted: its entries leave.
    assert!(s.apply_scan(scan(&[("a.txt", Ok("192.0.2.7\n"))]), 1030.0));
    assert_eq!(
        allowed(&s),
        ["192.0.2.7/32 file:/etc/smtpgate/allow.d/a.txt:1"]
    );
    assert!(!s.degraded());
}

#[test]
fn a_file_broken_from_the_start_allows_nothing_and_an_unreadable_directory_keeps_all() {
    let c = config("allowlist_files = [\"/etc/smtpgate/allow.d/*.txt\"]");
    let mut s = Sources::new(
        &c,
        Stored::default(),
        scan(&[("a.txt", Err("line 1: bad")), ("b.txt", Ok("192.0.2.9\n"))]),
        1000.0,
    );
    assert_eq!(
        allowed(&s),
        ["192.0.2.9/32 file:/etc/smtpgate/allow.d/b.txt:1"]
    );
    let mut gone = Scan::default();
    gone.dir_errors.insert(
        PathBuf::from("/etc/smtpgate/allow.d"),
        "cannot list /etc/smtpgate/allow.d: No such file or directory".into(),
    );
    assert!(!s.apply_scan(gone, 1010.0));
    assert_eq!(
        allowed(&s),
        ["192.0.2.9/32 file:/etc/smtpgate/allow.d/b.txt:1"]
    );
    let st = s.status();
    let b = st.files.iter().find(|f| f.path == path("b.txt")).unwrap();
    assert!(b.error.as_ref().unwrap().contains("cannot list"), "{b:?}");
}

#[test]
fn names_fail_closed_and_keep_their_last_good_addresses() {
    let c = config("allowlist = [\"mail.example.com\", \"mx:example.org\"]");
    let mut s = Sources::new(&c, Stored::default(), Scan::default(), 1000.0);
    let (tx, rx) = s.channels();
    let wanted: Vec<String> = rx
        .dns
        .borrow()
        .names
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(wanted, ["mail.example.com", "mx:example.org"]);
    // Never resolved: nothing allowed.
    assert!(allowed(&s).is_empty());
    let st = s.status();
    assert_eq!(st.names[0].last_success_unix, None);
    assert_eq!(st.names[0].listed_in, [Origin::Config]);

    assert!(s.apply_dns(
        answer("mail.example.com", &["192.0.2.7", "2001:db8::7"]),
        1001.0
    ));
    assert_eq!(
        allowed(&s),
        [
            "192.0.2.7/32 dns:mail.example.com",
            "2001:db8::7/128 dns:mail.example.com"
        ]
    );
    // The same answer again changes nothing.
    assert!(!s.apply_dns(
        answer("mail.example.com", &["192.0.2.7", "2001:db8::7"]),
        1061.0
    ));
    // A failure keeps the addresses, and is counted and shown.
    assert!(!s.apply_dns(failure("mail.example.com"), 1121.0));
    assert!(!s.apply_dns(failure("mail.example.com"), 1151.0));
    assert_eq!(allowed(&s).len(), 2);
    let n = &s.status().names[0];
    assert_eq!(n.failures, 2);
    assert_eq!(n.failing_since_unix, Some(1121.0));
    assert_eq!(n.last_success_unix, Some(1061.0));
    assert!(n.error.as_ref().unwrap().contains("timed out"));
    assert!(s.degraded());
    // A new answer replaces the set; an empty one allows nothing.
    assert!(s.apply_dns(answer("mail.example.com", &["192.0.2.8"]), 1181.0));
    assert_eq!(allowed(&s), ["192.0.2.8/32 dns:mail.example.com"]);
    assert_eq!(s.status().names[0].error, None);
    assert!(s.apply_dns(answer("mail.example.com", &[]), 1241.0));
    assert!(allowed(&s).is_empty());

    // MX hosts are named in the origin.
    let mx = DnsAnswer {
        name: "mx:example.org".parse().unwrap(),
        result: Ok(Resolved {
            addresses: BTreeMap::from([(
                "198.51.100.25".parse().unwrap(),
                Some("mx1.example.org".parse().unwrap()),
            )]),
            ttl_secs: 300,
        }),
        next_unix: 0.0,
    };
    assert!(s.apply_dns(mx, 1300.0));
    assert_eq!(
        allowed(&s),
        ["198.51.100.25/32 dns:mx:example.org via mx1.example.org"]
    );
    // A name that is no longer configured: its answers are ignored.
    let mut s2 = s.clone();
    s2.set_config(&config(""), Scan::default(), 1400.0);
    tx.update(&s2);
    assert!(rx.dns.borrow().names.is_empty());
    assert!(!s2.apply_dns(answer("mail.example.com", &["192.0.2.1"]), 1401.0));
    assert!(allowed(&s2).is_empty());
}

#[test]
fn names_in_files_are_resolved_while_the_file_lists_them() {
    let c = config("allowlist_files = [\"/etc/smtpgate/allow.d/*.txt\"]");
    let mut s = Sources::new(
        &c,
        Stored::default(),
        scan(&[("a.txt", Ok("# hosts\nmail.example.com\n"))]),
        1000.0,
    );
    let st = s.status();
    assert_eq!(st.names.len(), 1);
    assert_eq!(
        st.names[0].listed_in,
        [Origin::File {
            path: path("a.txt"),
            line: 2
        }]
    );
    assert!(s.apply_dns(answer("mail.example.com", &["192.0.2.7"]), 1001.0));
    // The file drops the name: its addresses leave with it.
    assert!(s.apply_scan(scan(&[("a.txt", Ok("192.0.2.9\n"))]), 1010.0));
    assert_eq!(
        allowed(&s),
        ["192.0.2.9/32 file:/etc/smtpgate/allow.d/a.txt:1"]
    );
    assert!(s.status().names.is_empty());
}

#[test]
fn a_restart_starts_from_the_saved_state_and_never_more() {
    let c = config(
        "allowlist = [\"mail.example.com\"]\nallowlist_files = [\"/etc/smtpgate/allow.d/*.txt\"]",
    );
    let mut s = Sources::new(
        &c,
        Stored::default(),
        scan(&[("a.txt", Ok("192.0.2.9\n"))]),
        1000.0,
    );
    s.apply_dns(answer("mail.example.com", &["192.0.2.7"]), 1001.0);
    let saved = s.effective();

    // The next agent: no DNS yet, a.txt broken meanwhile, and a name
    // that the saved state knows but the config no longer lists.
    let mut saved_more = saved.clone();
    saved_more.names.insert(
        "old.example.com".parse().unwrap(),
        StoredName {
            addresses: BTreeMap::from([("192.0.2.66".parse().unwrap(), None)]),
            resolved_unix: 900.0,
        },
    );
    let s = Sources::new(
        &c,
        saved_more,
        scan(&[("a.txt", Err("line 1: bad"))]),
        2000.0,
    );
    assert_eq!(
        allowed(&s),
        [
            "192.0.2.7/32 dns:mail.example.com",
            "192.0.2.9/32 file:/etc/smtpgate/allow.d/a.txt:1",
        ]
    );
    let n = &s.status().names[0];
    assert!(n.restored);
    assert_eq!(n.last_success_unix, Some(1001.0));
    // What it would save now leaves the old name out.
    assert_eq!(s.effective().names.len(), 1);
}
