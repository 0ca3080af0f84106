//! One allowlist item as an admin writes it: a prefix, a host name (its
//! A/AAAA records) or `mx:` and a domain (every MX host of the domain, and
//! their A/AAAA records). The same syntax in the config's `allowlist` and in
//! allowlist files, one item per line there.

use std::{fmt, str::FromStr};

use super::{Prefix, PrefixError};

/// A DNS name, validated and in canonical form: lowercase ASCII, no
/// trailing dot. Always resolved as absolute (no search domains), so a
/// resolver's `search` line cannot turn `mail.example.com` into
/// `mail.example.com.corp.example`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DnsName(String);

/// A name entry: what to resolve.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Named {
    /// A and AAAA of the host.
    Host(DnsName),
    /// Every MX host of the domain, and their A and AAAA.
    Mx(DnsName),
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Item {
    Prefix(Prefix),
    Named(Named),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ItemError {
    /// Looks like an address (digits and dots, or a colon, or a slash) but
    /// is not a valid one: the prefix parser's own reason.
    #[error(transparent)]
    Prefix(#[from] PrefixError),
    #[error("not a DNS name: {reason}")]
    Name { reason: String },
    #[error("empty")]
    Empty,
}

/// Longest name in presentation form (RFC 1035 2.3.4, without the root dot).
const MAX_NAME: usize = 253;
const MAX_LABEL: usize = 63;

impl DnsName {
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The absolute form resolvers are given: with the root dot.
    #[must_use]
    pub fn fqdn(&self) -> String {
        format!("{}.", self.0)
    }
}

impl FromStr for DnsName {
    type Err = ItemError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: String| ItemError::Name { reason };
        let name = s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
        if name.is_empty() {
            return Err(ItemError::Empty);
        }
        if name.len() > MAX_NAME {
            return Err(bad(format!("longer than {MAX_NAME} characters")));
        }
        let labels: Vec<&str> = name.split('.').collect();
        if labels.len() < 2 {
            // A single label would be resolved as a top-level domain (no
            // search domains here), which is never what was meant.
            return Err(bad(format!(
                "{name:?} has a single label; write the full name (mail.example.com)"
            )));
        }
        if labels
            .last()
            .is_some_and(|l| l.chars().all(|c| c.is_ascii_digit()))
        {
            return Err(bad(format!(
                "{name:?} ends in a numeric label: an address is not a name"
            )));
        }
        for label in &labels {
            if label.is_empty() {
                return Err(bad("empty label (two dots in a row)".into()));
            }
            if label.len() > MAX_LABEL {
                return Err(bad(format!("label {label:?} is longer than {MAX_LABEL}")));
            }
            // Host names are letters, digits and hyphens (RFC 952/1123);
            // underscores appear in service names, never in a mail host's.
            if let Some(c) = label
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
            {
                return Err(bad(format!(
                    "{c:?} in {label:?}: only letters, digits and hyphens (IDNs in their xn-- form)"
                )));
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err(bad(format!("label {label:?} starts or ends with a hyphen")));
            }
        }
        Ok(Self(name))
    }
}

impl fmt::Display for DnsName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Named {
    #[must_use]
    pub fn name(&self) -> &DnsName {
        match self {
            Named::Host(n) | Named::Mx(n) => n,
        }
    }
}

impl fmt::Display for Named {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Named::Host(n) => write!(f, "{n}"),
            Named::Mx(n) => write!(f, "mx:{n}"),
        }
    }
}

impl FromStr for Named {
    type Err = ItemError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        match strip_mx(s) {
            Some(domain) => Ok(Named::Mx(domain.trim().parse()?)),
            None => Ok(Named::Host(s.parse()?)),
        }
    }
}

/// The domain of `mx:domain` (any case, as DNS is).
fn strip_mx(s: &str) -> Option<&str> {
    s.get(..3)
        .filter(|p| p.eq_ignore_ascii_case("mx:"))
        .map(|_| &s[3..])
}

impl FromStr for Item {
    type Err = ItemError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Err(ItemError::Empty);
        }
        let prefix_error = match s.parse::<Prefix>() {
            Ok(p) => return Ok(Item::Prefix(p)),
            Err(e) => e,
        };
        if strip_mx(s).is_some() {
            return Ok(Item::Named(s.parse()?));
        }
        // What is meant as an address gets the address parser's reason
        // ("host bits set", "IPv4-mapped"), not "not a DNS name": a colon
        // or slash never appears in a name, and a last label of digits
        // cannot be a top-level domain (RFC 3696 2), so 192.0.2.300 is a
        // bad address.
        let last = s.trim_end_matches('.').rsplit('.').next().unwrap_or(s);
        if s.contains([':', '/']) || last.chars().all(|c| c.is_ascii_digit()) {
            return Err(prefix_error.into());
        }
        Ok(Item::Named(Named::Host(s.parse()?)))
    }
}

impl fmt::Display for Item {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Item::Prefix(p) => p.fmt(f),
            Item::Named(n) => n.fmt(f),
        }
    }
}

impl serde::Serialize for Named {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Named {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}")))
    }
}

impl serde::Serialize for DnsName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for DnsName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}")))
    }
}

impl serde::Serialize for Item {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Item {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}")))
    }
}

/// A bad line in an allowlist file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ListError {
    #[error("line {line}: {text:?}: {source}")]
    Item {
        line: usize,
        text: String,
        #[source]
        source: ItemError,
    },
    #[error("line {line}: {text:?}: one entry per line")]
    TwoOnALine { line: usize, text: String },
    #[error("line {line}: {item} is listed twice (first on line {first})")]
    Duplicate {
        line: usize,
        first: usize,
        item: String,
    },
}

/// Parses an allowlist file: one prefix or name per line; `#` starts a
/// comment (anywhere: it never appears in an address or a name), blank
/// lines are skipped. The first bad line makes the whole file bad, so a
/// half-understood file is never applied. Lines are numbered from 1.
pub fn parse_list(text: &str) -> Result<Vec<(usize, Item)>, ListError> {
    let mut items: Vec<(usize, Item)> = Vec::new();
    let mut seen = std::collections::BTreeMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let content = raw.split('#').next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        if content.split_whitespace().nth(1).is_some() {
            return Err(ListError::TwoOnALine {
                line,
                text: content.to_owned(),
            });
        }
        let item: Item = content.parse().map_err(|source| ListError::Item {
            line,
            text: content.to_owned(),
            source,
        })?;
        if let Some(first) = seen.insert(item.clone(), line) {
            return Err(ListError::Duplicate {
                line,
                first,
                item: item.to_string(),
            });
        }
        items.push((line, item));
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(s: &str) -> Item {
        s.parse().unwrap()
    }

    #[test]
    fn items_are_prefixes_names_or_mx_domains() {
        assert_eq!(
            item("192.0.2.7"),
            Item::Prefix("192.0.2.7".parse().unwrap())
        );
        assert_eq!(
            item("Mail.Example.COM."),
            Item::Named(Named::Host("mail.example.com".parse().unwrap()))
        );
        assert_eq!(item("mail.example.com").to_string(), "mail.example.com");
        assert_eq!(item("mx:example.org").to_string(), "mx:example.org");
        assert_eq!(item(" mx: example.org ").to_string(), "mx:example.org");
        assert_eq!(
            item("xn--bcher-kva.example").to_string(),
            "xn--bcher-kva.example"
        );
        assert_eq!(DnsName::from_str("mail.lab").unwrap().fqdn(), "mail.lab.");
    }

    #[test]
    fn junk_gets_the_right_reason() {
        let err = |s: &str| s.parse::<Item>().unwrap_err().to_string();
        // Meant as addresses: the address parser's reason.
        assert_eq!(err("192.0.2.300"), "not an IPv4 or IPv6 address or prefix");
        assert!(
            err("192.0.2.1/24").contains("host bits set"),
            "{}",
            err("192.0.2.1/24")
        );
        assert!(err("::ffff:192.0.2.1").contains("IPv4-mapped"));
        assert!(err("2001:db8::zz").contains("not an IPv4 or IPv6"));
        // Meant as names.
        assert!(
            err("mailhost").contains("single label"),
            "{}",
            err("mailhost")
        );
        assert!(err("mail..example.com").contains("two dots"));
        assert!(
            err("mail_1.example.com").contains("'_'"),
            "{}",
            err("mail_1.example.com")
        );
        assert!(err("-mail.example.com").contains("hyphen"));
        assert!(err("mail.example.com/32").contains("not an IPv4"));
        assert!(err("mx:").contains("empty"), "{}", err("mx:"));
        assert!(
            err("mx:192.0.2.1").contains("numeric label"),
            "{}",
            err("mx:192.0.2.1")
        );
        assert!(err(&format!("{}.example", "a".repeat(64))).contains("longer than 63"));
        assert!(err(&format!("{}example", "abc.".repeat(70))).contains("longer than 253"));
        assert_eq!(err(""), "empty");
    }

    #[test]
    fn lists_have_comments_blank_lines_and_line_numbers() {
        let text = "# mail hosts\n\n192.0.2.7   # mx1\n  mail.example.com\nmx:example.org\n\t\n2001:db8::/48\n";
        let items = parse_list(text).unwrap();
        let got: Vec<(usize, String)> = items.iter().map(|(l, i)| (*l, i.to_string())).collect();
        assert_eq!(
            got,
            vec![
                (3, "192.0.2.7/32".into()),
                (4, "mail.example.com".into()),
                (5, "mx:example.org".into()),
                (7, "2001:db8::/48".into()),
            ]
        );
        assert!(parse_list("").unwrap().is_empty());
        assert!(parse_list("# nothing\n\n").unwrap().is_empty());
    }

    #[test]
    fn a_bad_line_makes_the_file_bad_and_says_where() {
        let e = parse_list("192.0.2.7\n192.0.2.300\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "line 2: \"192.0.2.300\": not an IPv4 or IPv6 address or prefix"
        );
        let e = parse_list("192.0.2.7 192.0.2.8\n").unwrap_err();
        assert!(e.to_string().contains("one entry per line"), "{e}");
        let e = parse_list("192.0.2.7\n\n192.0.2.7/32\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "line 3: 192.0.2.7/32 is listed twice (first on line 1)"
        );
    }
}
