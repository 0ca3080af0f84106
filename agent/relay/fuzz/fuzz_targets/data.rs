//! Fuzzes the DATA reader. The first byte picks a chunk size so the same
//! input is also fed in pieces: the result must not depend on how the bytes
//! arrive. An accepted body must be free of bare CR/LF, and re-stuffing it
//! must read back to the same body (no smuggled terminator survives).
#![no_main]

use libfuzzer_sys::fuzz_target;
use smtpgate_relay::dataread::{DataReader, Feed, read_all};

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, input)) = data.split_first() else { return };
    let chunk = usize::from(chunk).max(1);
    let (whole, verdict, body) = read_all(input, 1 << 16);

    let mut r = DataReader::new(1 << 16);
    let mut offset = 0;
    let mut pieced = Feed::NeedMore;
    for piece in input.chunks(chunk) {
        match r.feed(piece) {
            Feed::NeedMore => offset += piece.len(),
            Feed::Done { consumed } => {
                pieced = Feed::Done { consumed: offset + consumed };
                break;
            }
            Feed::BareNewline { consumed } => {
                pieced = Feed::BareNewline { consumed: offset + consumed };
                break;
            }
        }
    }
    assert_eq!(whole, pieced, "chunking changed the outcome");

    if let Feed::Done { .. } = whole {
        assert_eq!(verdict, r.verdict());
        assert_eq!(body, r.into_body());
        let mut i = 0;
        while i < body.len() {
            match body[i] {
                b'\r' => assert_eq!(body.get(i + 1), Some(&b'\n'), "bare CR in accepted body"),
                b'\n' => assert!(i > 0 && body[i - 1] == b'\r', "bare LF in accepted body"),
                _ => {}
            }
            i += 1;
        }
        if verdict == smtpgate_relay::dataread::Verdict::Ok {
            let mut wire = Vec::new();
            for line in body.split_inclusive(|&b| b == b'\n') {
                if line.first() == Some(&b'.') {
                    wire.push(b'.');
                }
                wire.extend_from_slice(line);
            }
            wire.extend_from_slice(b".\r\n");
            let (again, _, body2) = read_all(&wire, 1 << 16);
            assert_eq!(again, Feed::Done { consumed: wire.len() });
            assert_eq!(body2, body);
        }
    }
});
