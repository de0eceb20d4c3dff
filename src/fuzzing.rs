//! Entry points for the fuzz targets in fuzz/ (`cargo +nightly fuzz`, which builds with
//! `--cfg fuzzing`; absent from every other build). Each takes any bytes at all, as the parser
//! it drives would get them from a damaged disk or a misbehaving provider, and panics only on
//! a bug: see `.ci/fuzz`.

pub use crate::store::fuzzing::{conversation_file, journal_replay};

use crate::responder::SseParser;

/// `data` as a provider's event stream, its first two bytes aside (the size of the network
/// chunks it arrives in, and the parser's event limit): the events must be the same whatever
/// the chunking, each bounded, and an event over the limit an error at the same byte.
pub fn provider_sse(data: &[u8]) {
    let Some((&[piece, limit], body)) = data.split_first_chunk::<2>() else {
        return;
    };
    let piece = usize::from(piece) + 1;
    let limit = 16 * (usize::from(limit) + 1);
    let mut whole = SseParser::with_limit(limit);
    let at_once = whole.feed(body);
    let mut chunked = SseParser::with_limit(limit);
    let mut in_pieces = Ok(Vec::new());
    for chunk in body.chunks(piece) {
        match chunked.feed(chunk) {
            Ok(events) => {
                if let Ok(all) = &mut in_pieces {
                    all.extend(events);
                }
            }
            Err(e) => {
                in_pieces = Err(e);
                break;
            }
        }
    }
    match (&at_once, &in_pieces) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "the events depend on the chunking"),
        (Err(a), Err(b)) => assert_eq!(a, b),
        _ => panic!("the limit depends on the chunking: {at_once:?} / {in_pieces:?}"),
    }
    // Replacement characters for invalid UTF-8 may make an event up to 3 times the bytes read.
    for event in at_once.iter().flatten() {
        assert!(
            event.len() <= 3 * limit + 1,
            "an event of {} bytes",
            event.len()
        );
    }
}
