//! A small incremental parser for `text/event-stream` bodies, as the model provider streams
//! them: lines end with `\n`, `\r\n` or `\r` (possibly split across network chunks); an event's
//! `data:` lines are joined with `\n`; a blank line ends the event; comments (`:`) and other
//! fields (`event:`, `id:`, `retry:`) are ignored, since chat-completion streams carry
//! everything in `data`.
//!
//! What it holds is bounded: an event (its data so far plus the line being read) larger than
//! [`MAX_EVENT_BYTES`] is an error, whatever else bounds the body, so that a provider sending a
//! line that never ends cannot make it grow without limit.

/// The largest event the parser holds. A chat-completion chunk is a few hundred bytes; a whole
/// reply in one event is well under this.
pub const MAX_EVENT_BYTES: usize = 1 << 20;

/// An event (or a line) larger than the parser's limit: the stream cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("an event in the stream is larger than {max_bytes} bytes")]
pub struct EventTooLarge {
    pub max_bytes: usize,
}

#[derive(Debug)]
pub struct SseParser {
    line: Vec<u8>,
    data: Option<String>,
    /// The last byte seen was `\r`: a `\n` right after it belongs to the same line end.
    after_cr: bool,
    max_event_bytes: usize,
}

impl Default for SseParser {
    fn default() -> Self {
        Self::with_limit(MAX_EVENT_BYTES)
    }
}

impl SseParser {
    /// A parser that refuses events larger than `max_event_bytes`.
    pub fn with_limit(max_event_bytes: usize) -> Self {
        Self {
            line: Vec::new(),
            data: None,
            after_cr: false,
            max_event_bytes,
        }
    }

    /// Feeds the next bytes of the body; returns the data of every event they complete, or an
    /// error once an event grows larger than the limit (the stream is then unreadable: nothing
    /// more should be fed).
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<Vec<String>, EventTooLarge> {
        let mut events = Vec::new();
        while let Some(&first) = bytes.first() {
            if std::mem::take(&mut self.after_cr) && first == b'\n' {
                bytes = &bytes[1..];
                continue;
            }
            // The line's bytes up to its end (or the chunk's), taken in one piece rather than
            // byte by byte: a provider's stream is read in full, chunk after chunk.
            let end = bytes
                .iter()
                .position(|&b| b == b'\n' || b == b'\r')
                .unwrap_or(bytes.len());
            let (text, rest) = bytes.split_at(end);
            let held = self.data.as_ref().map_or(0, String::len) + self.line.len();
            if held + text.len() > self.max_event_bytes {
                self.line = Vec::new();
                self.data = None;
                return Err(EventTooLarge {
                    max_bytes: self.max_event_bytes,
                });
            }
            self.line.extend_from_slice(text);
            bytes = match rest.split_first() {
                Some((&ending, after)) => {
                    self.end_line(&mut events);
                    self.after_cr = ending == b'\r';
                    after
                }
                None => rest,
            };
        }
        Ok(events)
    }

    fn end_line(&mut self, events: &mut Vec<String>) {
        let line = std::mem::take(&mut self.line);
        if line.is_empty() {
            events.extend(self.data.take());
            return;
        }
        let line = String::from_utf8_lossy(&line);
        let (field, value) = match line.find(':') {
            Some(0) => return, // a comment, e.g. a keep-alive
            Some(i) => (&line[..i], &line[i + 1..]),
            None => (&line[..], ""),
        };
        if field != "data" {
            return;
        }
        let value = value.strip_prefix(' ').unwrap_or(value);
        match &mut self.data {
            Some(data) => {
                data.push('\n');
                data.push_str(value);
            }
            None => self.data = Some(value.to_owned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_in_pieces(body: &[u8], piece: usize) -> Vec<String> {
        let mut parser = SseParser::default();
        body.chunks(piece)
            .flat_map(|c| parser.feed(c).expect("within the limit"))
            .collect()
    }

    #[test]
    fn events_are_read_whatever_the_network_chunking() {
        let body = "data: {\"a\":1}\n\ndata: {\"b\":2}\r\n\r\ndata: [DONE]\r\r";
        for piece in 1..body.len() {
            assert_eq!(
                parse_in_pieces(body.as_bytes(), piece),
                ["{\"a\":1}", "{\"b\":2}", "[DONE]"],
                "chunks of {piece}"
            );
        }
    }

    #[test]
    fn multi_line_data_is_joined_and_other_fields_ignored() {
        let body = b": keep-alive\nevent: message\nid: 7\ndata: one\ndata:two\n\n";
        assert_eq!(parse_in_pieces(body, 64), ["one\ntwo"]);
    }

    #[test]
    fn an_unfinished_event_is_not_emitted() {
        assert!(parse_in_pieces(b"data: half", 64).is_empty());
    }

    #[test]
    fn utf8_split_across_chunks_survives() {
        let body = "data: Grüße ✓\n\n".as_bytes();
        assert_eq!(parse_in_pieces(body, 1), ["Grüße ✓"]);
    }

    #[test]
    fn a_line_that_never_ends_is_an_error_not_unbounded_memory() {
        let mut parser = SseParser::with_limit(64);
        assert_eq!(parser.feed(&[b'x'; 64]), Ok(vec![]));
        assert_eq!(parser.feed(b"x"), Err(EventTooLarge { max_bytes: 64 }));
        assert!(parser.line.capacity() == 0 && parser.data.is_none());

        // The limit is the default's: a provider streaming one endless line is stopped there.
        let mut parser = SseParser::default();
        let chunk = [b'a'; 64 << 10];
        let mut fed = 0;
        let error = loop {
            match parser.feed(&chunk) {
                Ok(events) => assert!(events.is_empty()),
                Err(e) => break e,
            }
            fed += chunk.len();
            assert!(fed <= MAX_EVENT_BYTES, "still buffering after {fed} bytes");
        };
        assert_eq!(error.max_bytes, MAX_EVENT_BYTES);
    }

    #[test]
    fn an_event_of_many_data_lines_is_bounded_too() {
        let mut parser = SseParser::with_limit(64);
        let line = b"data: 0123456789\n";
        let mut result = Ok(vec![]);
        for _ in 0..10 {
            result = parser.feed(line);
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(EventTooLarge { max_bytes: 64 }));
        // Events under the limit, however many, go through.
        let mut parser = SseParser::with_limit(64);
        for _ in 0..1000 {
            assert_eq!(
                parser.feed(b"data: 0123456789\n\n"),
                Ok(vec!["0123456789".to_owned()])
            );
        }
    }
}
