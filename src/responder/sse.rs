//! A small incremental parser for `text/event-stream` bodies, as the model provider streams
//! them: lines end with `\n`, `\r\n` or `\r` (possibly split across network chunks); an event's
//! `data:` lines are joined with `\n`; a blank line ends the event; comments (`:`) and other
//! fields (`event:`, `id:`, `retry:`) are ignored, since chat-completion streams carry
//! everything in `data`.

#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    data: Option<String>,
    /// The last byte seen was `\r`: a `\n` right after it belongs to the same line end.
    after_cr: bool,
}

impl SseParser {
    /// Feeds the next bytes of the body; returns the data of every event they complete.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut events = Vec::new();
        for &byte in bytes {
            if std::mem::take(&mut self.after_cr) && byte == b'\n' {
                continue;
            }
            match byte {
                b'\n' => self.end_line(&mut events),
                b'\r' => {
                    self.end_line(&mut events);
                    self.after_cr = true;
                }
                _ => self.line.push(byte),
            }
        }
        events
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
        body.chunks(piece).flat_map(|c| parser.feed(c)).collect()
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
}
