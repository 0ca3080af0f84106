//! SMTP replies: every reply carries a basic code, an RFC 3463 enhanced status
//! code and human text, so clients (and our tests) never have to guess.

use std::borrow::Cow;
use std::fmt;

/// One SMTP reply. Multi-line replies (EHLO) keep one entry per line of text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// Enhanced status code ("2.0.0"). Empty only for the 220 greeting, the
    /// EHLO keyword list and the 334 AUTH challenges: RFC 2034 leaves those
    /// out, and clients parse EHLO keywords from the start of each line.
    pub enhanced: &'static str,
    pub lines: Vec<Cow<'static, str>>,
}

impl Reply {
    pub fn new(code: u16, enhanced: &'static str, text: impl Into<Cow<'static, str>>) -> Self {
        Self {
            code,
            enhanced,
            lines: vec![text.into()],
        }
    }

    pub fn multi(code: u16, enhanced: &'static str, lines: Vec<Cow<'static, str>>) -> Self {
        Self {
            code,
            enhanced,
            lines,
        }
    }

    /// A 4xx or 5xx reply; counted towards the per-session error limit.
    pub fn is_error(&self) -> bool {
        self.code >= 400
    }

    /// Wire form, CRLF-terminated.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.to_string().into_bytes()
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let last = self.lines.len().saturating_sub(1);
        for (i, line) in self.lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            if self.enhanced.is_empty() {
                write!(f, "{}{}{}\r\n", self.code, sep, line)?;
            } else {
                write!(f, "{}{}{} {}\r\n", self.code, sep, self.enhanced, line)?;
            }
        }
        Ok(())
    }
}

/// The replies used in more than one place, kept together so wording and
/// codes stay consistent.
pub mod canned {
    use super::Reply;

    pub fn ok() -> Reply {
        Reply::new(250, "2.0.0", "Ok")
    }
    pub fn bad_sequence(what: &'static str) -> Reply {
        Reply::new(503, "5.5.1", what)
    }
    pub fn syntax(what: &'static str) -> Reply {
        Reply::new(501, "5.5.4", what)
    }
    pub fn unknown_command() -> Reply {
        Reply::new(500, "5.5.2", "Command not recognized")
    }
    pub fn line_too_long() -> Reply {
        Reply::new(500, "5.5.2", "Line too long")
    }
    pub fn bare_lf_command() -> Reply {
        Reply::new(500, "5.5.2", "Command lines must end with CRLF")
    }
    pub fn auth_required() -> Reply {
        Reply::new(530, "5.7.0", "Authentication required")
    }
    pub fn encryption_required() -> Reply {
        Reply::new(
            538,
            "5.7.11",
            "Encryption required for requested authentication mechanism",
        )
    }
    pub fn too_many_errors() -> Reply {
        Reply::new(421, "4.7.0", "Too many errors, closing connection")
    }
    pub fn timeout() -> Reply {
        Reply::new(421, "4.4.2", "Timeout, closing connection")
    }
    pub fn shutting_down() -> Reply {
        Reply::new(421, "4.3.2", "Service shutting down, closing connection")
    }
    pub fn http_refused() -> Reply {
        Reply::new(
            421,
            "4.7.0",
            "This is an SMTP server, not HTTP; closing connection",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_and_multi_line_forms() {
        assert_eq!(
            Reply::new(250, "2.1.0", "Ok").to_string(),
            "250 2.1.0 Ok\r\n"
        );
        let r = Reply::multi(
            250,
            "",
            vec!["host".into(), "SIZE 10".into(), "PIPELINING".into()],
        );
        assert_eq!(
            r.to_string(),
            "250-host\r\n250-SIZE 10\r\n250 PIPELINING\r\n"
        );
        let r = Reply::multi(530, "5.7.0", vec!["a".into(), "b".into()]);
        assert_eq!(r.to_string(), "530-5.7.0 a\r\n530 5.7.0 b\r\n");
        assert_eq!(
            Reply::new(334, "", "VXNlcm5hbWU6").to_string(),
            "334 VXNlcm5hbWU6\r\n"
        );
    }
}
