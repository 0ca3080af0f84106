//! Pure RFC 5322 header-section helpers for what the relay checks and adds
//! on submission (Postfix's cleanup does the same jobs): where the header
//! section ends, which fields it has, the mailboxes in From:/Sender:, and
//! how to put client-supplied text (EHLO names, user names) into our own
//! Received header without letting it change the header's syntax.
//!
//! Input is the unstuffed message with CRLF line ends, as `dataread`
//! produces it: no bare CR or LF can occur.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::parse::{Address, AddressError, parse_address};

/// Where the header section of a message ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderEnd {
    /// Bytes of header fields (complete CRLF-terminated lines).
    pub fields_len: usize,
    /// Whether an empty line follows them (it is then `fields_len..+2`).
    /// Without one, the body starts with a line that is not a header field,
    /// or the message is all headers.
    pub blank_line: bool,
}

impl HeaderEnd {
    /// Offset of the first body byte.
    pub fn body_start(&self) -> usize {
        self.fields_len + if self.blank_line { 2 } else { 0 }
    }
}

/// `name:` with RFC 5322 ftext (printable ASCII except ':').
fn field_name(line: &[u8]) -> Option<&[u8]> {
    let colon = line.iter().position(|&b| b == b':')?;
    let name = &line[..colon];
    (!name.is_empty() && name.iter().all(|&b| (33..=126).contains(&b))).then_some(name)
}

/// Classifies one complete line for the header-section scanner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineKind {
    /// A new header field.
    Field,
    /// A folded continuation (starts with space or tab).
    Continuation,
    /// The empty line that ends the header section.
    Blank,
    /// Anything else: the body has started without an empty line.
    Other,
}

/// `line` includes its CRLF (or is the unterminated tail of the message).
pub fn classify(line: &[u8], first: bool) -> LineKind {
    match line.first() {
        None => LineKind::Other,
        Some(b'\r') if line.starts_with(b"\r\n") => LineKind::Blank,
        Some(b' ' | b'\t') if !first => LineKind::Continuation,
        _ if field_name(line).is_some() => LineKind::Field,
        _ => LineKind::Other,
    }
}

/// Finds the end of the header section of a complete message.
pub fn header_end(msg: &[u8]) -> HeaderEnd {
    let mut at = 0;
    while at < msg.len() {
        let len = msg[at..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(msg.len() - at, |i| i + 1);
        match classify(&msg[at..at + len], at == 0) {
            LineKind::Field | LineKind::Continuation if msg[at..at + len].ends_with(b"\n") => {
                at += len;
            }
            LineKind::Blank => {
                return HeaderEnd {
                    fields_len: at,
                    blank_line: true,
                };
            }
            _ => break,
        }
    }
    HeaderEnd {
        fields_len: at,
        blank_line: false,
    }
}

/// `header_end` for the start of a message still arriving: None until
/// the end of the header section is among the complete lines of `msg`.
pub fn header_end_partial(msg: &[u8]) -> Option<HeaderEnd> {
    let mut at = 0;
    while let Some(nl) = msg[at..].iter().position(|&b| b == b'\n') {
        let line = &msg[at..at + nl + 1];
        match classify(line, at == 0) {
            LineKind::Field | LineKind::Continuation => at += line.len(),
            LineKind::Blank => {
                return Some(HeaderEnd {
                    fields_len: at,
                    blank_line: true,
                });
            }
            LineKind::Other => {
                return Some(HeaderEnd {
                    fields_len: at,
                    blank_line: false,
                });
            }
        }
    }
    None
}

/// One header field: its name and its value with folding removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field<'a> {
    pub name: &'a [u8],
    /// The raw value after the colon, CRLFs of folding still in it.
    pub raw_value: &'a [u8],
}

impl Field<'_> {
    pub fn is(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name.as_bytes())
    }

    /// The value unfolded (RFC 5322 3.2.2: CRLF before WSP is removed).
    pub fn value(&self) -> String {
        let v = String::from_utf8_lossy(self.raw_value);
        v.replace("\r\n", "")
    }
}

/// One field from `from..to` of `section`, if it starts with a field name.
fn field_at(section: &[u8], from: usize, to: usize) -> Option<Field<'_>> {
    let f = &section[from..to];
    let name = field_name(f)?;
    let value = &f[name.len() + 1..];
    Some(Field {
        name,
        raw_value: value.strip_suffix(b"\r\n").unwrap_or(value),
    })
}

/// The fields of a header section (`msg[..fields_len]`).
pub fn fields(section: &[u8]) -> Vec<Field<'_>> {
    let mut out = Vec::new();
    let mut start = None::<usize>;
    let mut at = 0;
    while at < section.len() {
        let len = section[at..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(section.len() - at, |i| i + 1);
        if matches!(section[at], b' ' | b'\t') && start.is_some() {
            at += len;
            continue;
        }
        if let Some(s) = start {
            out.extend(field_at(section, s, at));
        }
        start = Some(at);
        at += len;
    }
    if let Some(s) = start {
        out.extend(field_at(section, s, section.len()));
    }
    out
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MailboxError {
    #[error("no address")]
    Empty,
    #[error("unbalanced quotes, comment or angle brackets")]
    Unbalanced,
    #[error("group syntax is not accepted here")]
    Group,
    #[error("more than one address in one mailbox")]
    TwoAddresses,
    #[error("bad address {text:?}: {source}")]
    Address {
        text: String,
        #[source]
        source: AddressError,
    },
}

/// Ends one mailbox of a list: its angle-addr if it had one, else its bare
/// text, parsed strictly.
fn finish(
    bare: &mut String,
    angle: &mut Option<String>,
    out: &mut Vec<Address>,
) -> Result<(), MailboxError> {
    let text = match angle.take() {
        Some(a) => a,
        None => bare.clone(),
    };
    bare.clear();
    let text = text.trim().to_owned();
    if text.is_empty() {
        return Err(MailboxError::Empty);
    }
    let a = parse_address(&text).map_err(|source| MailboxError::Address { text, source })?;
    out.push(a);
    Ok(())
}

/// The addresses of an RFC 5322 mailbox-list (From:, Sender:). Display
/// names, quoted strings and (nested) comments are understood so that
/// `"alice@example.com" <billing@bank.example>` yields the address a
/// receiving MUA will treat as the sender, never the decoy. Addresses are
/// then held to the same strict syntax as envelope addresses: what cannot be
/// parsed cannot be checked, so it is refused.
pub fn mailboxes(value: &str) -> Result<Vec<Address>, MailboxError> {
    // Per mailbox: text outside comments/quotes/angles, and the angle-addr.
    let mut out = Vec::new();
    let mut bare = String::new();
    let mut angle: Option<String> = None;
    let mut in_angle: Option<String> = None;
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if let Some(a) = in_angle.as_mut() {
            match c {
                '>' => {
                    if angle.is_some() {
                        return Err(MailboxError::TwoAddresses);
                    }
                    angle = in_angle.take();
                }
                '<' => return Err(MailboxError::Unbalanced),
                // Quotes inside <> are a quoted local part: refused later
                // by parse_address with a precise error.
                _ => a.push(c),
            }
            continue;
        }
        match c {
            '"' => {
                // Display-name quoted string: skipped, escapes honoured.
                // Bare text is kept so an unquoted addr-spec still parses.
                let mut closed = false;
                while let Some(q) = chars.next() {
                    match q {
                        '\\' => {
                            chars.next();
                        }
                        '"' => {
                            closed = true;
                            break;
                        }
                        _ => {}
                    }
                }
                if !closed {
                    return Err(MailboxError::Unbalanced);
                }
                // A quoted string outside <> can only be a display name (a
                // quoted local part is refused anyway); mark that a phrase
                // was here so `"x" a@b` is not taken as an address.
                bare.push('\u{0}');
            }
            '(' => {
                let mut depth = 1u32;
                while depth > 0 {
                    match chars.next() {
                        Some('\\') => {
                            chars.next();
                        }
                        Some('(') => depth += 1,
                        Some(')') => depth -= 1,
                        Some(_) => {}
                        None => return Err(MailboxError::Unbalanced),
                    }
                }
                bare.push(' ');
            }
            '<' => {
                if angle.is_some() {
                    return Err(MailboxError::TwoAddresses);
                }
                in_angle = Some(String::new());
            }
            ')' | '>' => return Err(MailboxError::Unbalanced),
            ':' | ';' => return Err(MailboxError::Group),
            ',' => finish(&mut bare, &mut angle, &mut out)?,
            _ => {
                if angle.is_some() && !c.is_whitespace() {
                    // Text after the angle-addr of a mailbox.
                    return Err(MailboxError::TwoAddresses);
                }
                bare.push(c);
            }
        }
    }
    if in_angle.is_some() {
        return Err(MailboxError::Unbalanced);
    }
    if angle.is_none() && bare.trim().is_empty() && !out.is_empty() {
        // Trailing comma: tolerated (obs-mbox-list).
        return Ok(out);
    }
    finish(&mut bare, &mut angle, &mut out)?;
    Ok(out)
}

/// Whether `name` is an RFC 5321 Domain (ASCII letters, digits, hyphens;
/// no underscores) or an address literal: what may stand as-is after
/// `from` in a Received header.
pub fn valid_helo(name: &str) -> bool {
    if let Some(lit) = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        return match lit.get(..5) {
            Some(p) if p.eq_ignore_ascii_case("IPv6:") => lit[5..].parse::<Ipv6Addr>().is_ok(),
            _ => lit.parse::<Ipv4Addr>().is_ok(),
        };
    }
    !name.is_empty()
        && name.len() <= 255
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Client-supplied text made safe inside a header comment: printable ASCII
/// only, without the characters that would end or nest the comment or the
/// Received header's token list (`( ) \ ;`) or quote; at most `max` chars,
/// with "..." when cut.
pub fn comment_safe(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .take(max)
        .map(|c| {
            if c.is_ascii_graphic() && !matches!(c, '(' | ')' | '\\' | ';' | '"') {
                c
            } else {
                '?'
            }
        })
        .collect();
    if s.chars().count() > max {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_end_variants() {
        let m = b"A: 1\r\nB: 2\r\n continued\r\n\r\nbody\r\n";
        let e = header_end(m);
        assert_eq!(
            e,
            HeaderEnd {
                fields_len: 24,
                blank_line: true
            }
        );
        assert_eq!(&m[e.body_start()..], b"body\r\n");
        // No blank line: the first non-header line starts the body.
        let m = b"A: 1\r\nnot a header\r\n";
        assert_eq!(
            header_end(m),
            HeaderEnd {
                fields_len: 6,
                blank_line: false
            }
        );
        // All headers, and no headers at all.
        assert_eq!(header_end(b"A: 1\r\n").fields_len, 6);
        assert_eq!(
            header_end(b"\r\nbody\r\n"),
            HeaderEnd {
                fields_len: 0,
                blank_line: true
            }
        );
        assert_eq!(header_end(b" leading space\r\n").fields_len, 0);
        assert_eq!(header_end(b"").fields_len, 0);
        // A name with a space is not a field name.
        assert_eq!(header_end(b"Bad Name: x\r\n").fields_len, 0);
    }

    #[test]
    fn partial_header_end_agrees_with_the_complete_one() {
        for m in [
            &b"A: 1\r\nB: 2\r\n continued\r\n\r\nbody\r\n"[..],
            b"A: 1\r\nnot a header\r\nmore\r\n",
            b"\r\nbody\r\n",
            b" leading space\r\n",
        ] {
            let whole = header_end(m);
            // Every prefix either does not know yet or agrees.
            for cut in 0..=m.len() {
                if let Some(e) = header_end_partial(&m[..cut]) {
                    assert_eq!(e, whole, "{:?} cut at {cut}", String::from_utf8_lossy(m));
                }
            }
            assert_eq!(header_end_partial(m), Some(whole));
        }
        // All headers so far: not known until the section ends.
        assert_eq!(header_end_partial(b"A: 1\r\nB: 2\r\n"), None);
        assert_eq!(header_end_partial(b"A: 1\r\nB: 2"), None);
    }

    #[test]
    fn fields_are_unfolded() {
        let f = fields(b"From: a@b.c\r\nSubject: one\r\n two\r\nX-Empty:\r\n");
        assert_eq!(f.len(), 3);
        assert!(f[0].is("from") && f[0].value() == " a@b.c");
        assert_eq!(f[1].value(), " one two");
        assert_eq!(f[2].value(), "");
    }

    fn addrs(v: &str) -> Result<Vec<String>, MailboxError> {
        mailboxes(v).map(|l| l.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn mailbox_lists() {
        assert_eq!(addrs(" alice@example.com").unwrap(), ["alice@example.com"]);
        assert_eq!(
            addrs(" Alice <alice@example.com>").unwrap(),
            ["alice@example.com"]
        );
        assert_eq!(
            addrs(" \"Payments <alice@example.com>\" <billing@bank.example>").unwrap(),
            ["billing@bank.example"],
            "the quoted decoy must not be taken"
        );
        assert_eq!(
            addrs(" billing@bank.example (alice@example.com)").unwrap(),
            ["billing@bank.example"]
        );
        assert_eq!(
            addrs(" a@example.com, \"B, Jr.\" <b@example.org> (x (nested) y),").unwrap(),
            ["a@example.com", "b@example.org"]
        );
        assert_eq!(
            addrs(" =?utf-8?q?J=C3=B6rg?= <j@example.com>").unwrap(),
            ["j@example.com"]
        );
        for bad in [
            "",
            "  ",
            " <a@example.com> <b@example.com>",
            " <a@example.com> trailing",
            " undisclosed-recipients:;",
            " \"unterminated <a@example.com>",
            " (unterminated a@example.com",
            " <a@example.com",
            " \"x\" a@example.com",
            " <@route:a@example.com>",
            " <\"quoted\"@example.com>",
            " not an address",
        ] {
            assert!(addrs(bad).is_err(), "{bad:?} gave {:?}", addrs(bad));
        }
    }

    #[test]
    fn helo_names_and_comment_text() {
        for ok in [
            "client.test",
            "DESKTOP-1A2B",
            "[192.0.2.7]",
            "[IPv6:2001:db8::1]",
            "a",
        ] {
            assert!(valid_helo(ok), "{ok}");
        }
        for bad in [
            "a;b",
            "my_pc",
            "-x",
            "[300.1.1.1]",
            "[2001:db8::1]",
            "caf\u{e9}",
            "a..b",
            &"x".repeat(300),
        ] {
            assert!(!valid_helo(bad), "{bad}");
        }
        assert_eq!(comment_safe("a;b(c)\\\"d\u{e9}", 64), "a?b?c???d?");
        assert_eq!(comment_safe(&"x".repeat(100), 8), "xxxxxxxx...");
    }
}
