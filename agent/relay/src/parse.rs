//! Pure command-line parser: bytes in, a typed command or a precise error out.
//! Kept free of I/O and session state so it can be fuzzed directly
//! (`fuzz/fuzz_targets/command.rs`).
//!
//! Addresses are parsed strictly on purpose: this relay only ever sends on
//! behalf of authenticated users, so the legacy forms that made open relays
//! possible (percent hack, bang paths, source routes, quoted local parts,
//! several `@`) are refused outright rather than interpreted.

use std::fmt;

/// RFC 5321 4.5.3.1.4: a command line is at most 512 octets including CRLF.
pub const MAX_COMMAND_LINE: usize = 512;
/// RFC 5321 4.5.3.1.6: a text line is at most 1000 octets including CRLF.
pub const MAX_TEXT_LINE: usize = 1000;
const MAX_LOCAL_PART: usize = 64;
const MAX_DOMAIN: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Address {
    pub local: String,
    /// Lower-cased: domains are case-insensitive, and sender binding and rate
    /// limiting compare them.
    pub domain: String,
}

impl Address {
    pub fn is_ascii(&self) -> bool {
        self.local.is_ascii() && self.domain.is_ascii()
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.local, self.domain)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Body {
    #[default]
    SevenBit,
    EightBitMime,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MailParams {
    pub size: Option<u64>,
    pub body: Body,
    pub smtputf8: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Ehlo(String),
    Helo(String),
    StartTls,
    Auth {
        mechanism: String,
        initial: Option<String>,
    },
    /// `from == None` is the null reverse path `<>`.
    Mail {
        from: Option<Address>,
        params: MailParams,
    },
    Rcpt {
        to: Address,
    },
    Data,
    Rset,
    Noop,
    Quit,
    Vrfy,
    Expn,
    Help,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("address must be enclosed in <>")]
    MissingBrackets,
    #[error("source routes are not accepted")]
    SourceRoute,
    #[error("quoted local parts are not accepted")]
    QuotedLocalPart,
    #[error("percent-hack addresses are not accepted")]
    PercentHack,
    #[error("bang-path addresses are not accepted")]
    BangPath,
    #[error("address must contain exactly one @")]
    AtCount,
    #[error("address literals are not accepted")]
    AddressLiteral,
    #[error("invalid local part")]
    BadLocalPart,
    #[error("invalid domain")]
    BadDomain,
    #[error("address too long")]
    TooLong,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("command not recognized")]
    Unknown,
    #[error("HTTP request on the SMTP port")]
    Http,
    #[error("syntax error: {what}")]
    Syntax { what: &'static str },
    #[error("bad address: {source}")]
    Address {
        #[from]
        source: AddressError,
    },
    #[error("unsupported parameter {param}")]
    UnsupportedParam { param: String },
}

const HTTP_VERBS: &[&str] = &[
    "GET", "POST", "HEAD", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// Parses one command line. `line` excludes the terminating CRLF.
pub fn parse_command(line: &[u8]) -> Result<Command, ParseError> {
    let line = std::str::from_utf8(line).map_err(|_| ParseError::Syntax {
        what: "command is not valid UTF-8",
    })?;
    let (verb, rest) = match line.find(' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, ""),
    };
    let upper = verb.to_ascii_uppercase();
    if HTTP_VERBS.contains(&upper.as_str())
        || upper.ends_with(':') && (upper == "HOST:" || upper == "USER-AGENT:")
    {
        return Err(ParseError::Http);
    }
    let no_args = |cmd: Command| {
        if rest.trim().is_empty() {
            Ok(cmd)
        } else {
            Err(ParseError::Syntax {
                what: "no arguments allowed",
            })
        }
    };
    match upper.as_str() {
        "EHLO" | "HELO" => {
            let arg = rest.trim();
            if arg.is_empty()
                || arg.contains(char::is_whitespace)
                || arg.chars().any(char::is_control)
            {
                return Err(ParseError::Syntax {
                    what: "EHLO/HELO needs one domain argument",
                });
            }
            Ok(if upper == "EHLO" {
                Command::Ehlo(arg.to_owned())
            } else {
                Command::Helo(arg.to_owned())
            })
        }
        "STARTTLS" => no_args(Command::StartTls),
        "AUTH" => parse_auth(rest),
        "MAIL" => parse_mail(rest),
        "RCPT" => parse_rcpt(rest),
        "DATA" => no_args(Command::Data),
        "RSET" => no_args(Command::Rset),
        // NOOP, VRFY, EXPN and HELP may carry an argument, which we ignore.
        "NOOP" => Ok(Command::Noop),
        "QUIT" => no_args(Command::Quit),
        "VRFY" => Ok(Command::Vrfy),
        "EXPN" => Ok(Command::Expn),
        "HELP" => Ok(Command::Help),
        _ => Err(ParseError::Unknown),
    }
}

fn parse_auth(rest: &str) -> Result<Command, ParseError> {
    let mut parts = rest.split(' ').filter(|p| !p.is_empty());
    let mechanism = parts
        .next()
        .ok_or(ParseError::Syntax {
            what: "AUTH needs a mechanism",
        })?
        .to_ascii_uppercase();
    let initial = parts.next().map(str::to_owned);
    if parts.next().is_some() {
        return Err(ParseError::Syntax {
            what: "too many AUTH arguments",
        });
    }
    Ok(Command::Auth { mechanism, initial })
}

/// Strips a case-insensitive `FROM:`/`TO:` keyword and the optional spaces
/// some clients put after the colon.
fn strip_keyword<'a>(rest: &'a str, kw: &str) -> Option<&'a str> {
    let head = rest.get(..kw.len())?;
    head.eq_ignore_ascii_case(kw)
        .then(|| rest[kw.len()..].trim_start_matches(' '))
}

fn split_path(s: &str) -> Result<(&str, &str), ParseError> {
    if !s.starts_with('<') {
        return Err(AddressError::MissingBrackets.into());
    }
    // A quoted local part may legally contain '>'; we refuse quotes anyway,
    // and checking for them first keeps the error precise.
    let end = s.find('>').ok_or(AddressError::MissingBrackets)?;
    if s[..end].contains('"') {
        return Err(AddressError::QuotedLocalPart.into());
    }
    Ok((&s[1..end], &s[end + 1..]))
}

fn parse_mail(rest: &str) -> Result<Command, ParseError> {
    let s = strip_keyword(rest, "FROM:").ok_or(ParseError::Syntax {
        what: "expected MAIL FROM:<address>",
    })?;
    let (path, params) = split_path(s)?;
    let from = if path.is_empty() {
        None
    } else {
        Some(parse_address(path)?)
    };
    let mut out = MailParams::default();
    for p in params.split(' ').filter(|p| !p.is_empty()) {
        let (k, v) = p.split_once('=').map_or((p, None), |(k, v)| (k, Some(v)));
        match (k.to_ascii_uppercase().as_str(), v) {
            ("SIZE", Some(v)) => {
                let n = v.parse().map_err(|_| ParseError::Syntax {
                    what: "bad SIZE value",
                })?;
                out.size = Some(n);
            }
            ("BODY", Some(v)) if v.eq_ignore_ascii_case("7BIT") => out.body = Body::SevenBit,
            ("BODY", Some(v)) if v.eq_ignore_ascii_case("8BITMIME") => {
                out.body = Body::EightBitMime
            }
            ("SMTPUTF8", None) => out.smtputf8 = true,
            // RFC 4954 AUTH= on MAIL: we know who submitted from the session.
            ("AUTH", Some(_)) => {}
            _ => {
                return Err(ParseError::UnsupportedParam {
                    param: p.to_owned(),
                });
            }
        }
    }
    Ok(Command::Mail { from, params: out })
}

fn parse_rcpt(rest: &str) -> Result<Command, ParseError> {
    let s = strip_keyword(rest, "TO:").ok_or(ParseError::Syntax {
        what: "expected RCPT TO:<address>",
    })?;
    let (path, params) = split_path(s)?;
    if let Some(p) = params.split(' ').find(|p| !p.is_empty()) {
        return Err(ParseError::UnsupportedParam {
            param: p.to_owned(),
        });
    }
    Ok(Command::Rcpt {
        to: parse_address(path)?,
    })
}

/// RFC 5322 atext without '%' and '!' (refused separately so the error names
/// the trick).
fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "#$&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii() && !c.is_control()
}

/// Parses the inside of `<...>`: exactly `local@domain`.
pub fn parse_address(path: &str) -> Result<Address, AddressError> {
    if path.len() > 254 {
        return Err(AddressError::TooLong);
    }
    if path.starts_with('@') || path.contains(':') || path.contains(',') {
        return Err(AddressError::SourceRoute);
    }
    if path.contains('"') || path.contains('\\') {
        return Err(AddressError::QuotedLocalPart);
    }
    let mut parts = path.split('@');
    let (local, domain) = match (parts.next(), parts.next(), parts.next()) {
        (Some(l), Some(d), None) => (l, d),
        _ => return Err(AddressError::AtCount),
    };
    if local.contains('%') {
        return Err(AddressError::PercentHack);
    }
    if local.contains('!') {
        return Err(AddressError::BangPath);
    }
    if local.is_empty()
        || local.len() > MAX_LOCAL_PART
        || local.starts_with('.')
        || local.ends_with('.')
        || local.contains("..")
        || !local.chars().all(|c| c == '.' || is_atext(c))
    {
        return Err(AddressError::BadLocalPart);
    }
    if domain.starts_with('[') {
        return Err(AddressError::AddressLiteral);
    }
    if !valid_domain(domain) {
        return Err(AddressError::BadDomain);
    }
    Ok(Address {
        local: local.to_owned(),
        domain: domain.to_lowercase(),
    })
}

fn valid_domain(d: &str) -> bool {
    !d.is_empty()
        && d.len() <= MAX_DOMAIN
        && d.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| {
                    c.is_ascii_alphanumeric() || c == '-' || !c.is_ascii() && c.is_alphanumeric()
                })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(l: &str, d: &str) -> Address {
        Address {
            local: l.into(),
            domain: d.into(),
        }
    }

    #[test]
    fn verbs() {
        assert_eq!(
            parse_command(b"ehlo client.example"),
            Ok(Command::Ehlo("client.example".into()))
        );
        assert_eq!(parse_command(b"HELO x"), Ok(Command::Helo("x".into())));
        assert_eq!(parse_command(b"STARTTLS"), Ok(Command::StartTls));
        assert_eq!(parse_command(b"data"), Ok(Command::Data));
        assert_eq!(parse_command(b"NOOP whatever"), Ok(Command::Noop));
        assert_eq!(parse_command(b"VRFY root"), Ok(Command::Vrfy));
        assert_eq!(parse_command(b"QUIT"), Ok(Command::Quit));
        assert_eq!(parse_command(b"RSET"), Ok(Command::Rset));
        assert_eq!(
            parse_command(b"AUTH plain AGEAYg=="),
            Ok(Command::Auth {
                mechanism: "PLAIN".into(),
                initial: Some("AGEAYg==".into())
            })
        );
        assert_eq!(
            parse_command(b"EHLO"),
            Err(ParseError::Syntax {
                what: "EHLO/HELO needs one domain argument"
            })
        );
        assert_eq!(parse_command(b"XYZZY"), Err(ParseError::Unknown));
        assert!(matches!(
            parse_command(b"DATA now"),
            Err(ParseError::Syntax { .. })
        ));
    }

    #[test]
    fn http_verbs() {
        for l in [
            "GET / HTTP/1.1",
            "POST /x HTTP/1.0",
            "HEAD /",
            "CONNECT a:25 HTTP/1.1",
            "Host: x",
            "OPTIONS *",
        ] {
            assert_eq!(parse_command(l.as_bytes()), Err(ParseError::Http), "{l}");
        }
    }

    #[test]
    fn mail_and_rcpt() {
        assert_eq!(
            parse_command(b"MAIL FROM:<a@Example.COM> SIZE=100 BODY=8BITMIME"),
            Ok(Command::Mail {
                from: Some(addr("a", "example.com")),
                params: MailParams {
                    size: Some(100),
                    body: Body::EightBitMime,
                    smtputf8: false
                }
            })
        );
        assert_eq!(
            parse_command(b"mail from: <>"),
            Ok(Command::Mail {
                from: None,
                params: MailParams::default()
            })
        );
        assert_eq!(
            parse_command(b"RCPT TO:<b.c+d@x.org>"),
            Ok(Command::Rcpt {
                to: addr("b.c+d", "x.org")
            })
        );
        assert_eq!(
            parse_command(b"RCPT TO:<b@x.org> NOTIFY=NEVER"),
            Err(ParseError::UnsupportedParam {
                param: "NOTIFY=NEVER".into()
            })
        );
        assert_eq!(
            parse_command(b"MAIL FROM:<a@x> SMTPUTF8"),
            Ok(Command::Mail {
                from: Some(addr("a", "x")),
                params: MailParams {
                    smtputf8: true,
                    ..MailParams::default()
                }
            })
        );
    }

    #[test]
    fn address_tricks_refused() {
        let cases: &[(&str, AddressError)] = &[
            (
                "RCPT TO:<u%victim.example@relay.example>",
                AddressError::PercentHack,
            ),
            (
                "RCPT TO:<victim.example!u@relay.example>",
                AddressError::BangPath,
            ),
            (
                "RCPT TO:<@a.example,@b.example:u@c.example>",
                AddressError::SourceRoute,
            ),
            (
                "RCPT TO:<@a.example:u@c.example>",
                AddressError::SourceRoute,
            ),
            (
                "RCPT TO:<\"u@c.example\"@relay.example>",
                AddressError::QuotedLocalPart,
            ),
            (
                "RCPT TO:<\"u\"@relay.example>",
                AddressError::QuotedLocalPart,
            ),
            ("RCPT TO:<u@c.example@relay.example>", AddressError::AtCount),
            ("RCPT TO:<u@@relay.example>", AddressError::AtCount),
            ("RCPT TO:<postmaster>", AddressError::AtCount),
            ("RCPT TO:u@relay.example", AddressError::MissingBrackets),
            ("RCPT TO:<u@[192.0.2.1]>", AddressError::AddressLiteral),
            ("RCPT TO:<u@-bad.example>", AddressError::BadDomain),
            ("RCPT TO:<.u@x.example>", AddressError::BadLocalPart),
            ("RCPT TO:<u\\@x@y.example>", AddressError::QuotedLocalPart),
            ("MAIL FROM:<u%x@y.example>", AddressError::PercentHack),
        ];
        for (line, want) in cases {
            assert_eq!(
                parse_command(line.as_bytes()),
                Err(ParseError::Address {
                    source: want.clone()
                }),
                "{line}"
            );
        }
    }

    #[test]
    fn utf8_addresses_parse_but_are_marked() {
        let Ok(Command::Rcpt { to }) = parse_command("RCPT TO:<jösé@bücher.example>".as_bytes())
        else {
            panic!("utf-8 address should parse")
        };
        assert!(!to.is_ascii());
    }
}
