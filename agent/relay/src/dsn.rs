//! Delivery status notifications (RFC 3464 multipart/report) sent back to the
//! envelope sender when recipients fail permanently or expire, and the one
//! warning when a message is still waiting after `retry.delay_warning_secs`.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use crate::spool::{QueueRecord, RcptState, RecipientStatus, new_id, now_ms};

/// Builds the DSN for the failed recipients of `original`; `headers` is the
/// original message's header section. Returns the new queue record and body.
pub fn build(
    hostname: &str,
    original: &QueueRecord,
    failed: &[&RecipientStatus],
    headers: &[u8],
) -> (QueueRecord, Vec<u8>) {
    build_with_id(new_id(), hostname, original, failed, headers)
}

/// The queue id of the bounce for `recipients` of `original`: derived from
/// both, so that a crash between queueing a bounce and recording it in the
/// original, which makes the restart bounce the same recipients again,
/// replaces the queued bounce instead of adding a second one; while a later
/// bounce for other recipients of the same message (one fails at once,
/// another after days of retries) gets an id of its own. Same time prefix,
/// random part flipped and mixed with a hash of the addresses.
pub fn bounce_id(original: &str, recipients: &[&str]) -> String {
    match (
        original.get(..12),
        original
            .get(12..)
            .and_then(|r| u64::from_str_radix(r, 16).ok()),
    ) {
        (Some(t), Some(r)) if original.len() == 28 => {
            format!("{t}{:016x}", !r ^ fnv1a(recipients))
        }
        _ => new_id(),
    }
}

/// FNV-1a over the sorted addresses: stable across builds and Rust
/// versions, unlike std's hasher, since the ids live on disk.
fn fnv1a(recipients: &[&str]) -> u64 {
    let mut sorted = recipients.to_vec();
    sorted.sort_unstable();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for a in sorted {
        for b in a.bytes().chain(std::iter::once(0)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// What a DSN reports about its recipients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    /// Failed for good (`Action: failed`): a bounce.
    Failed,
    /// Still being retried (`Action: delayed`): a warning, nothing to do
    /// yet. `waited` is how long the message has been queued, `until` when
    /// the relay gives up on it.
    Delayed { waited: Duration, until: SystemTime },
}

/// The queue id of `original`'s delay warning: derived from it (as
/// `bounce_id` is), so a crash between queueing the warning and recording
/// it replaces the warning instead of sending a second one. The name mixed
/// in is not an address, so no bounce of real recipients gets this id.
pub fn delay_warning_id(original: &str) -> String {
    bounce_id(original, &["<delay warning>"])
}

/// `build` with a given queue id (see `bounce_id`).
pub fn build_with_id(
    id: String,
    hostname: &str,
    original: &QueueRecord,
    failed: &[&RecipientStatus],
    headers: &[u8],
) -> (QueueRecord, Vec<u8>) {
    build_report(id, Report::Failed, hostname, original, failed, headers)
}

/// A DSN of either kind for `recipients` of `original`.
pub fn build_report(
    id: String,
    report: Report,
    hostname: &str,
    original: &QueueRecord,
    recipients: &[&RecipientStatus],
    headers: &[u8],
) -> (QueueRecord, Vec<u8>) {
    let failed = recipients;
    let (subject, intro) = match report {
        Report::Failed => (
            "Undelivered Mail Returned to Sender".to_owned(),
            "Your message could not be delivered to one or more recipients.\r\n".to_owned(),
        ),
        Report::Delayed { waited, until } => (
            "Delayed Mail (still being retried)".to_owned(),
            format!(
                "Your message could not be delivered for {} to the recipients below.\r\n\
                 This is only a warning: you do not need to send it again. The mail\r\n\
                 system will keep trying until {}, and tell you if it gives up.\r\n",
                hours(waited),
                crate::date::rfc5322(until)
            ),
        ),
    };
    let boundary = format!("{id}/{hostname}");
    let arrival = SystemTime::UNIX_EPOCH + Duration::from_millis(original.created_unix_ms);
    let now = crate::date::rfc5322(SystemTime::now());
    let mut m = String::new();
    let _ = write!(
        m,
        "From: Mail Delivery System <MAILER-DAEMON@{hostname}>\r\n\
         To: <{to}>\r\n\
         Subject: {subject}\r\n\
         Date: {now}\r\n\
         Message-ID: <{id}@{hostname}>\r\n\
         Auto-Submitted: auto-replied\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n\
         \r\n\
         This is a MIME-encapsulated message.\r\n\
         \r\n\
         --{boundary}\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         \r\n\
         This is the mail system at host {hostname}.\r\n\
         \r\n\
         {intro}\
         \r\n",
        to = original.from,
    );
    for r in failed {
        let _ = write!(
            m,
            "<{}>: {}\r\n",
            r.address,
            one_line(r.last_error.as_deref().unwrap_or("delivery failed"))
        );
    }
    let _ = write!(
        m,
        "\r\n--{boundary}\r\n\
         Content-Type: message/delivery-status\r\n\
         \r\n\
         Reporting-MTA: dns; {hostname}\r\n\
         X-Smtpgate-Queue-ID: {qid}\r\n\
         Arrival-Date: {arrival}\r\n",
        qid = original.id,
        arrival = crate::date::rfc5322(arrival),
    );
    for r in failed {
        let err = r.last_error.as_deref().unwrap_or(match report {
            Report::Failed => "delivery failed",
            Report::Delayed { .. } => "not delivered yet",
        });
        let (action, status) = match report {
            Report::Failed => ("failed", status_of(err)),
            Report::Delayed { .. } => ("delayed", delayed_status_of(err)),
        };
        let _ = write!(
            m,
            "\r\nFinal-Recipient: rfc822; {addr}\r\n\
             Action: {action}\r\n\
             Status: {status}\r\n\
             Diagnostic-Code: smtp; {diag}\r\n",
            addr = r.address,
            diag = one_line(err),
        );
        if let Report::Delayed { until, .. } = report {
            // RFC 3464 2.3.9.
            let _ = write!(m, "Will-Retry-Until: {}\r\n", crate::date::rfc5322(until));
        }
    }
    let _ = write!(
        m,
        "\r\n--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n"
    );
    let mut body = m.into_bytes();
    body.extend_from_slice(headers);
    if !headers.ends_with(b"\r\n") {
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let now = now_ms();
    let record = QueueRecord {
        id,
        from: String::new(),
        recipients: vec![RecipientStatus {
            address: original.from.clone(),
            state: RcptState::Pending,
            attempts: 0,
            last_error: None,
            notified: false,
        }],
        created_unix_ms: now,
        next_attempt_unix_ms: now,
        attempts: 0,
        auth_user: None,
        client: "localhost".into(),
        is_dsn: true,
        size: body.len() as u64,
        // The bounce is ours and ASCII but for the original's headers it
        // quotes, which need 8BITMIME at most: no SMTPUTF8 demand, so it
        // reaches even a sender whose next hop lacks SMTPUTF8.
        smtputf8: false,
        dkim_signature: None,
        delay_warned: false,
    };
    (record, body)
}

/// The header section of a message (up to and including the blank line's
/// CRLF, excluded), capped so a huge header does not bloat the bounce.
pub fn header_section(msg: &[u8]) -> &[u8] {
    let end = msg
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(msg.len(), |i| i + 2);
    &msg[..end.min(64 * 1024)]
}

fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// "3 hours", "1 hour", "40 minutes": how long a warning says mail waited.
fn hours(d: Duration) -> String {
    let mins = d.as_secs() / 60;
    match (mins / 60, mins % 60) {
        (0, m) => format!("{m} minute{}", if m == 1 { "" } else { "s" }),
        (h, _) => format!("{h} hour{}", if h == 1 { "" } else { "s" }),
    }
}

/// The first RFC 3463 code in an error text.
fn enhanced_code(err: &str) -> Option<&str> {
    err.split_whitespace().find(|w| {
        let p: Vec<&str> = w.split('.').collect();
        p.len() == 3
            && matches!(p[0], "2" | "4" | "5")
            && p.iter()
                .all(|x| !x.is_empty() && x.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// A delayed recipient's Status: its last transient code, or 4.0.0 (a
/// delay is a 4.x.x by definition, RFC 3464 2.3.4).
fn delayed_status_of(err: &str) -> String {
    enhanced_code(err)
        .filter(|c| c.starts_with('4'))
        .unwrap_or("4.0.0")
        .to_owned()
}

/// The RFC 3463 code in an error text ("550 5.1.1 ..."), or a generic one.
fn status_of(err: &str) -> String {
    enhanced_code(err)
        // A 4.x.x code in a final failure means the message expired.
        .map_or_else(
            || "5.0.0".to_owned(),
            |s| {
                if s.starts_with('4') {
                    "4.4.7".to_owned()
                } else {
                    s.to_owned()
                }
            },
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_shape() {
        let orig = QueueRecord {
            id: new_id(),
            from: "alice@example.com".into(),
            recipients: vec![],
            created_unix_ms: now_ms(),
            next_attempt_unix_ms: 0,
            attempts: 3,
            auth_user: Some("alice".into()),
            client: "127.0.0.1".into(),
            is_dsn: false,
            size: 0,
            smtputf8: false,
            dkim_signature: None,
            delay_warned: false,
        };
        let failed = RecipientStatus {
            address: "bob@example.net".into(),
            state: RcptState::Failed,
            attempts: 3,
            last_error: Some("550 5.1.1 no such user\r\nsecond".into()),
            notified: false,
        };
        let (rec, body) = build(
            "relay.test",
            &orig,
            &[&failed],
            header_section(b"Subject: x\r\nFrom: a\r\n\r\nbody"),
        );
        let text = String::from_utf8(body).unwrap();
        assert!(
            rec.is_dsn && rec.from.is_empty() && rec.recipients[0].address == "alice@example.com"
        );
        assert!(text.contains("Content-Type: multipart/report; report-type=delivery-status;"));
        assert!(text.contains(
            "Final-Recipient: rfc822; bob@example.net\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        ));
        assert!(text.contains("Diagnostic-Code: smtp; 550 5.1.1 no such user  second\r\n"));
        assert!(text.contains("text/rfc822-headers\r\n\r\nSubject: x\r\nFrom: a\r\n"));
        assert!(!text.contains("body"));
        assert_eq!(status_of("timed out"), "5.0.0");
        // The bounce id is a function of the original's: a second bounce
        // for the same message replaces the first in the spool.
        let orig = new_id();
        let b = bounce_id(&orig, &["a@example.test", "b@example.test"]);
        assert_eq!(b, bounce_id(&orig, &["b@example.test", "a@example.test"]));
        assert_ne!(b, orig);
        assert_ne!(b, bounce_id(&orig, &["a@example.test"]));
        assert_ne!(
            b,
            bounce_id(&new_id(), &["a@example.test", "b@example.test"])
        );
        assert_eq!((b.len(), &b[..12]), (28, &orig[..12]));
        assert!(b.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(status_of("451 4.3.0 try later"), "4.4.7");
    }

    #[test]
    fn delay_warning_shape() {
        let orig = QueueRecord {
            id: new_id(),
            from: "alice@example.com".into(),
            recipients: vec![],
            created_unix_ms: now_ms(),
            next_attempt_unix_ms: 0,
            attempts: 3,
            auth_user: Some("alice".into()),
            client: "127.0.0.1".into(),
            is_dsn: false,
            size: 0,
            smtputf8: false,
            dkim_signature: None,
            delay_warned: false,
        };
        let waiting = RecipientStatus {
            address: "bob@example.net".into(),
            state: RcptState::Pending,
            attempts: 3,
            last_error: Some("connection to 192.0.2.1:25 failed: 4.4.1 refused".into()),
            notified: false,
        };
        let until = SystemTime::UNIX_EPOCH + Duration::from_secs(1_709_210_096);
        let (rec, body) = build_report(
            delay_warning_id(&orig.id),
            Report::Delayed {
                waited: Duration::from_secs(4 * 3600 + 59),
                until,
            },
            "relay.test",
            &orig,
            &[&waiting],
            header_section(b"Subject: x\r\n\r\nbody"),
        );
        let text = String::from_utf8(body).unwrap();
        assert!(
            rec.is_dsn && rec.from.is_empty(),
            "never bounced, never warned"
        );
        assert!(text.contains("Subject: Delayed Mail (still being retried)\r\n"));
        assert!(text.contains("could not be delivered for 4 hours"));
        assert!(text.contains(
            "Final-Recipient: rfc822; bob@example.net\r\nAction: delayed\r\nStatus: 4.4.1\r\n"
        ));
        assert!(text.contains("Will-Retry-Until: Thu, 29 Feb 2024 12:34:56 +0000\r\n"));
        assert_eq!(delayed_status_of("550 5.1.1 no"), "4.0.0");
        assert_eq!(delayed_status_of("timed out"), "4.0.0");
        assert_eq!(hours(Duration::from_secs(60)), "1 minute");
        assert_eq!(hours(Duration::from_secs(3600)), "1 hour");
        assert_ne!(
            delay_warning_id(&orig.id),
            bounce_id(&orig.id, &["bob@example.net"])
        );
    }
}
