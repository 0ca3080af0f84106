//! Pure DATA-phase reader: feeds raw bytes, unstuffs dots, and finds the end
//! of data. It is deliberately strict: the only terminator is CRLF "." CRLF,
//! and any bare CR or bare LF ends the transaction with an error. Lenient
//! readers that also accepted LF "." LF are what made SMTP smuggling
//! (CVE-2023-51764 and friends) possible: a message could hide a second
//! message that a downstream MTA would see as separate.

use crate::parse::MAX_TEXT_LINE;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a line (also right after the DATA command).
    LineStart,
    /// Saw "." at the start of a line.
    Dot,
    /// Saw "." CR at the start of a line.
    DotCr,
    /// Inside a line.
    Mid,
    /// Saw CR inside a line.
    Cr,
}

/// What feeding a chunk produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feed {
    /// All input consumed; the end of data has not been seen yet.
    NeedMore,
    /// End of data found after `consumed` bytes of this chunk; the rest of the
    /// chunk belongs to the next command (pipelining).
    Done { consumed: usize },
    /// A bare CR or LF was found after `consumed` bytes. The session must
    /// stop reading: we cannot know where the sender thinks the data ends.
    BareNewline { consumed: usize },
}

/// The verdict on a completed message, checked after `Feed::Done`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    TooBig,
    LineTooLong,
}

/// Keeps only the state machine and counters: the unstuffed bytes go to
/// the caller's buffer ([`DataReader::feed_into`]), which the session
/// streams to the spool, so a message never has to fit in memory. `feed`
/// and `into_body` collect them internally instead (fuzzing, tests).
#[derive(Debug)]
pub struct DataReader {
    state: State,
    line_len: usize,
    body: Vec<u8>,
    /// Unstuffed bytes produced so far.
    size: usize,
    max_bytes: usize,
    too_big: bool,
    long_line: bool,
}

impl DataReader {
    pub fn new(max_bytes: usize) -> Self {
        Self {
            state: State::LineStart,
            line_len: 0,
            body: Vec::new(),
            size: 0,
            max_bytes,
            too_big: false,
            long_line: false,
        }
    }

    fn push(&mut self, out: &mut Vec<u8>, bytes: &[u8]) {
        // Stop producing once over the limit, so an oversized message costs
        // nothing more and is refused only after its end is found (RFC 5321
        // requires reading to the end before replying).
        if self.too_big || self.size + bytes.len() > self.max_bytes {
            self.too_big = true;
            return;
        }
        self.size += bytes.len();
        out.extend_from_slice(bytes);
    }

    fn count(&mut self) {
        self.line_len += 1;
        // 998 octets of text plus CRLF.
        if self.line_len > MAX_TEXT_LINE - 2 {
            self.long_line = true;
        }
    }

    /// Feeds a chunk, collecting the unstuffed bytes internally.
    pub fn feed(&mut self, input: &[u8]) -> Feed {
        let mut body = std::mem::take(&mut self.body);
        let f = self.feed_into(input, &mut body);
        self.body = body;
        f
    }

    /// Feeds a chunk and appends the unstuffed bytes it yields to `out`
    /// (nothing once the message is too big).
    pub fn feed_into(&mut self, input: &[u8], out: &mut Vec<u8>) -> Feed {
        let mut i = 0;
        while i < input.len() {
            if self.state == State::Mid {
                // Fast path: copy the rest of the line up to the next CR or
                // LF in one go; the state machine below handles those.
                let run = input[i..]
                    .iter()
                    .position(|&b| b == b'\r' || b == b'\n')
                    .unwrap_or(input.len() - i);
                if run > 0 {
                    self.line_len += run;
                    if self.line_len > MAX_TEXT_LINE - 2 {
                        self.long_line = true;
                    }
                    self.push(out, &input[i..i + run]);
                    i += run;
                    continue;
                }
            }
            let b = input[i];
            self.state = match (self.state, b) {
                (State::LineStart | State::Dot | State::Mid, b'\n') => {
                    return Feed::BareNewline { consumed: i };
                }
                (State::LineStart, b'.') => {
                    self.count();
                    State::Dot
                }
                (State::LineStart | State::Mid, b'\r') => State::Cr,
                (State::Dot, b'\r') => State::DotCr,
                (State::DotCr, b'\n') => return Feed::Done { consumed: i + 1 },
                (State::DotCr | State::Cr, _) if b != b'\n' => {
                    return Feed::BareNewline { consumed: i };
                }
                (State::Cr, _) => {
                    self.push(out, b"\r\n");
                    self.line_len = 0;
                    State::LineStart
                }
                // Dot-unstuffing: the leading dot has been dropped; keep this byte.
                (State::LineStart | State::Dot | State::Mid, _) => {
                    self.count();
                    self.push(out, &[b]);
                    State::Mid
                }
                (State::DotCr, _) => unreachable!("DotCr with LF handled above"),
            };
            i += 1;
        }
        Feed::NeedMore
    }

    pub fn verdict(&self) -> Verdict {
        if self.too_big {
            Verdict::TooBig
        } else if self.long_line {
            Verdict::LineTooLong
        } else {
            Verdict::Ok
        }
    }

    /// Unstuffed bytes produced so far (counted up to the limit).
    pub fn size(&self) -> usize {
        self.size
    }

    /// The unstuffed message collected by `feed`, with CRLF line endings,
    /// without the final "." line; empty when it was too big.
    pub fn into_body(self) -> Vec<u8> {
        if self.too_big { Vec::new() } else { self.body }
    }
}

/// Convenience for fuzzing and tests: runs a whole buffer through a reader.
pub fn read_all(input: &[u8], max_bytes: usize) -> (Feed, Verdict, Vec<u8>) {
    let mut r = DataReader::new(max_bytes);
    let f = r.feed(input);
    let v = r.verdict();
    (f, v, r.into_body())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_message_and_pipelined_tail() {
        let input = b"Subject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n";
        let (f, v, body) = read_all(input, 1000);
        assert_eq!(
            f,
            Feed::Done {
                consumed: input.len() - 6
            }
        );
        assert_eq!(v, Verdict::Ok);
        assert_eq!(body, b"Subject: x\r\n\r\nhello\r\n");
    }

    #[test]
    fn empty_message() {
        assert_eq!(
            read_all(b".\r\n", 10),
            (Feed::Done { consumed: 3 }, Verdict::Ok, vec![])
        );
    }

    #[test]
    fn dot_unstuffing() {
        let (f, _, body) = read_all(b"..leading\r\n...\r\n.x\r\n.\r\n", 1000);
        assert!(matches!(f, Feed::Done { .. }));
        assert_eq!(body, b".leading\r\n..\r\nx\r\n");
    }

    #[test]
    fn byte_at_a_time_matches_whole() {
        let input = b"a\r\n..b\r\n\r\n.\r\n";
        let mut r = DataReader::new(1000);
        let mut done = false;
        for (i, b) in input.iter().enumerate() {
            match r.feed(std::slice::from_ref(b)) {
                Feed::NeedMore => {}
                Feed::Done { consumed: 1 } => {
                    assert_eq!(i, input.len() - 1);
                    done = true;
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(done);
        assert_eq!(r.into_body(), b"a\r\n.b\r\n\r\n");
    }

    #[test]
    fn feed_into_streams_what_feed_collects() {
        let input = b"a\r\n..b\r\nlong line here\r\n\r\n.\r\nQUIT\r\n";
        let mut r = DataReader::new(1000);
        let mut streamed = Vec::new();
        let mut out = Vec::new();
        for piece in input.chunks(3) {
            let f = r.feed_into(piece, &mut out);
            // The caller drains `out` after every chunk, as the session does.
            streamed.append(&mut out);
            if let Feed::Done { .. } = f {
                break;
            }
        }
        assert_eq!(streamed, b"a\r\n.b\r\nlong line here\r\n\r\n");
        assert_eq!(r.size(), streamed.len());
        // Over the limit nothing more is produced, and the verdict says so.
        let mut r = DataReader::new(5);
        let mut out = Vec::new();
        assert!(matches!(
            r.feed_into(b"abc\r\ndef\r\n.\r\n", &mut out),
            Feed::Done { .. }
        ));
        assert_eq!(out, b"abc\r\n");
        assert_eq!(r.verdict(), Verdict::TooBig);
    }

    #[test]
    fn smuggling_variants_are_refused() {
        for input in [
            &b"a\n.\nMAIL FROM:<x@y>\r\n"[..],
            b"a\r\n.\nMAIL FROM:<x@y>\r\n",
            b"a\n.\r\nMAIL FROM:<x@y>\r\n",
            b"a\r.\r\nMAIL FROM:<x@y>\r\n",
            b"a\r\n.\rMAIL FROM:<x@y>\r\n",
            b"a\r\n.\r\r\n",
            b"bare\rcr\r\n.\r\n",
            b"bare\nlf\r\n.\r\n",
            b"\n.\r\n",
        ] {
            let (f, _, _) = read_all(input, 1000);
            assert!(
                matches!(f, Feed::BareNewline { .. }),
                "{:?} gave {f:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn limits() {
        let mut big = vec![b'a'; 2000];
        big.extend_from_slice(b"\r\n.\r\n");
        assert_eq!(read_all(&big, 10_000).1, Verdict::LineTooLong);
        let ok_line = [&[b'a'; 998][..], b"\r\n.\r\n"].concat();
        assert_eq!(read_all(&ok_line, 10_000).1, Verdict::Ok);
        let (f, v, body) = read_all(&ok_line, 100);
        assert!(matches!(f, Feed::Done { .. }));
        assert_eq!(v, Verdict::TooBig);
        assert!(body.is_empty());
    }

    /// A cheap stand-in for the cargo-fuzz target that runs with every
    /// `cargo test`: random inputs over the interesting alphabet, fed whole
    /// and in random pieces, must agree, and accepted bodies must be clean.
    #[test]
    fn random_inputs_chunking_invariant() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let len = usize::try_from(next() % 40).unwrap();
            let input: Vec<u8> = (0..len)
                .map(|_| b"\r\n.a"[usize::try_from(next() % 4).unwrap()])
                .collect();
            let chunk = usize::try_from(next() % 5 + 1).unwrap();
            let (whole, verdict, body) = read_all(&input, 1 << 16);
            let mut r = DataReader::new(1 << 16);
            let mut offset = 0;
            let mut pieced = Feed::NeedMore;
            for piece in input.chunks(chunk) {
                match r.feed(piece) {
                    Feed::NeedMore => offset += piece.len(),
                    Feed::Done { consumed } => {
                        pieced = Feed::Done {
                            consumed: offset + consumed,
                        };
                        break;
                    }
                    Feed::BareNewline { consumed } => {
                        pieced = Feed::BareNewline {
                            consumed: offset + consumed,
                        };
                        break;
                    }
                }
            }
            assert_eq!(whole, pieced, "{input:?}");
            if let Feed::Done { consumed } = whole {
                assert_eq!(verdict, r.verdict());
                assert_eq!(body, r.into_body());
                assert!(
                    input[..consumed].ends_with(b"\r\n.\r\n") || input[..consumed] == *b".\r\n",
                    "{input:?}"
                );
                for (i, &b) in body.iter().enumerate() {
                    match b {
                        b'\r' => assert_eq!(body.get(i + 1), Some(&b'\n'), "{input:?}"),
                        b'\n' => assert!(i > 0 && body[i - 1] == b'\r', "{input:?}"),
                        _ => {}
                    }
                }
            }
        }
    }
}
