//! Header hygiene on submission, the jobs Postfix's cleanup does: our
//! Received header (who submitted, how, over which TLS), and Message-ID and
//! Date when the MUA left them out (large receivers junk or refuse mail
//! without them). Also the header From: binding: the envelope sender is
//! bound to the user at MAIL, but people read the header.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::SystemTime;

use tokio::io::{AsyncRead, AsyncWrite};

use super::{ListenerKind, Session};
use crate::headers::{self, Field};
use crate::parse::Address;
use crate::reply::Reply;
use crate::users::HeaderFrom;

/// Longest client-supplied text (EHLO name, user name) copied into a
/// Received comment.
const MAX_COMMENT_TEXT: usize = 64;

/// How an address appears after `from` in a Received header.
fn address_literal(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => format!("[{a}]"),
        IpAddr::V6(a) => format!("[IPv6:{a}]"),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// RFC 5321 4.4 trace field. The EHLO name goes in as-is only when it
    /// is a valid domain or address literal; anything else is recorded
    /// sanitised inside a comment, so a name like `a;b` cannot end the
    /// token list early and 8-bit or over-long names cannot make the header
    /// invalid. (Such names are accepted at EHLO: MUAs behind NAT send
    /// whatever their OS calls itself, and on submission the name only
    /// informs; the user is identified by AUTH.)
    pub(super) fn received_header(&self, id: &str, rcpts: &[Address]) -> String {
        let ip = self.peer.ip();
        let helo = self.helo.as_deref().unwrap_or("");
        let from = if headers::valid_helo(helo) {
            format!("{helo} ({})", address_literal(ip))
        } else {
            format!(
                "{lit} (invalid HELO \"{}\")",
                headers::comment_safe(helo, MAX_COMMENT_TEXT),
                lit = address_literal(ip)
            )
        };
        let mut h = format!("Received: from {from}");
        if let Some(t) = &self.tls_info {
            let _ = write!(
                h,
                "\r\n\t(using {} with cipher {})",
                headers::comment_safe(&t.version, MAX_COMMENT_TEXT),
                headers::comment_safe(&t.cipher, MAX_COMMENT_TEXT)
            );
        }
        if let Some(l) = &self.login {
            // Postfix's smtpd_sasl_authenticated_header: the receiving side
            // (and the abuse desk) can tell which account sent it.
            let _ = write!(
                h,
                "\r\n\t(authenticated user {})",
                headers::comment_safe(&l.user, MAX_COMMENT_TEXT)
            );
        }
        // RFC 3848: ESMTPSA = ESMTP with TLS and AUTH, the only way a
        // message gets here. HELO sessions have no RFC 3848 keyword.
        let proto = if self.esmtp { "ESMTPSA" } else { "SMTPSA" };
        let _ = write!(
            h,
            "\r\n\tby {} (smtpgate) with {proto} id {id}",
            self.cfg().hostname
        );
        if self.kind == ListenerKind::Intercept {
            let _ = write!(
                h,
                "\r\n\t(intercepted; original destination {})",
                self.local
            );
        }
        if let [only] = rcpts {
            let _ = write!(h, "\r\n\tfor <{only}>");
        }
        let _ = write!(h, ";\r\n\t{}\r\n", crate::date::rfc5322(SystemTime::now()));
        h
    }

    /// Header From: binding (maddy's `check_header_from`-like rule):
    /// exactly one From: field (RFC 5322 3.6 and DMARC both need it), and,
    /// unless the user's `header_from = "any"`, every mailbox in it, and in
    /// Sender: if there is one, must be an address the user may use as
    /// envelope sender. None when the message may go.
    pub(super) fn check_header_from(&self, section: &[u8]) -> Option<Reply> {
        let login = self.login.as_ref()?;
        let fields = headers::fields(section);
        let refuse = |why: String| {
            tracing::warn!(peer = %self.peer, user = login.user, why, "header From: refused");
            Some(Reply::new(550, "5.7.1", why))
        };
        let from: Vec<&Field<'_>> = fields.iter().filter(|f| f.is("From")).collect();
        if from.len() != 1 {
            return refuse(format!(
                "Message must have exactly one From: header, found {}",
                from.len()
            ));
        }
        let sender: Vec<&Field<'_>> = fields.iter().filter(|f| f.is("Sender")).collect();
        if sender.len() > 1 {
            return refuse(format!(
                "Message may have at most one Sender: header, found {}",
                sender.len()
            ));
        }
        if login.entry.header_from == HeaderFrom::Any {
            return None;
        }
        for (name, field) in
            std::iter::once(("From", from[0])).chain(sender.iter().map(|f| ("Sender", *f)))
        {
            let list = match headers::mailboxes(&field.value()) {
                Ok(l) => l,
                Err(e) => return refuse(format!("{name}: header cannot be checked: {e}")),
            };
            if name == "Sender" && list.len() != 1 {
                return refuse("Sender: header must name exactly one mailbox".into());
            }
            if let Some(bad) = list.iter().find(|a| !login.entry.may_send_as(a)) {
                return refuse(format!(
                    "{name}: header address {} is not one user {} may send as",
                    headers::comment_safe(&bad.to_string(), 254),
                    headers::comment_safe(&login.user, 64)
                ));
            }
        }
        None
    }

    /// The domain whose DKIM keys sign the message: the header From:'s
    /// (the first mailbox's), which DMARC aligns with, when the user may
    /// send as that address, as every user bound by the default
    /// `header_from = "senders"` may. Otherwise (a `header_from = "any"`
    /// user writing someone else's From:) the envelope sender's, which is
    /// always one of the user's: a free From: must not get the signature of
    /// a domain the user does not own just because the relay holds its key.
    pub(super) fn signing_domain(&self, section: &[u8]) -> Option<String> {
        let login = self.login.as_ref()?;
        let envelope = &self.txn.as_ref()?.from;
        let from = headers::fields(section)
            .iter()
            .find(|f| f.is("From"))
            .and_then(|f| headers::mailboxes(&f.value()).ok())
            .and_then(|list| list.into_iter().next());
        Some(match from {
            Some(a) if login.entry.may_send_as(&a) => a.domain,
            _ => envelope.domain.clone(),
        })
    }

    /// Everything that goes before the body: our Received header, the
    /// client's header fields unchanged, the fields we add, and the empty
    /// line if the message had one. Added fields go at the end of the
    /// section, where cleanup puts them.
    pub(super) fn header_block(
        &self,
        id: &str,
        rcpts: &[Address],
        section: &[u8],
        blank_line: bool,
    ) -> Vec<u8> {
        let fields = headers::fields(section);
        let has = |name: &str| fields.iter().any(|f: &Field<'_>| f.is(name));
        let mut out = self.received_header(id, rcpts).into_bytes();
        out.extend_from_slice(section);
        if !has("Message-ID") {
            // The queue id is time-ordered and has 64 random bits; 64 more
            // keep ids unique even across relays that share a hostname.
            let _ = write!(
                ByteWriter(&mut out),
                "Message-ID: <{id}.{:016x}@{}>\r\n",
                crate::random::u64(),
                self.cfg().hostname
            );
        }
        if !has("Date") {
            let _ = write!(
                ByteWriter(&mut out),
                "Date: {}\r\n",
                crate::date::rfc5322(SystemTime::now())
            );
        }
        if blank_line {
            out.extend_from_slice(b"\r\n");
        }
        out
    }
}

/// `fmt::Write` into a byte buffer.
struct ByteWriter<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for ByteWriter<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}
