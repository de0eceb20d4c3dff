//! Server-Sent Events from the core endpoint, read tolerantly: the framing of the SSE standard
//! (any line ending, comments, multi-line data, a last event without its blank line), then the
//! meaning of Maestra's events (`delta`, `done`, `error`). Kept apart so that the event format
//! can change in one place.

use serde_json::Value;

/// One event as sent: its name (`message` when unnamed) and its data lines joined by `\n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub name: String,
    pub data: String,
}

/// Turns a byte stream, fed in chunks of any size, into whole events.
#[derive(Debug, Default)]
pub struct EventParser {
    pending: Vec<u8>,
    name: Option<String>,
    data: Vec<String>,
    seen_first_line: bool,
}

impl EventParser {
    /// The events completed by this chunk.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<Event> {
        self.pending.extend_from_slice(chunk);
        let mut events = Vec::new();
        while let Some((line_len, ending_len)) = next_line(&self.pending) {
            let line: Vec<u8> = self
                .pending
                .drain(..line_len + ending_len)
                .take(line_len)
                .collect();
            if let Some(event) = self.line(&line) {
                events.push(event);
            }
        }
        events
    }

    /// The last event when the stream ends without the blank line that closes it.
    pub fn finish(&mut self) -> Option<Event> {
        let rest = std::mem::take(&mut self.pending);
        if !rest.is_empty() {
            let rest = rest.strip_suffix(b"\r").unwrap_or(&rest).to_vec();
            if let Some(event) = self.line(&rest) {
                return Some(event);
            }
        }
        self.dispatch()
    }

    fn line(&mut self, line: &[u8]) -> Option<Event> {
        let mut text = String::from_utf8_lossy(line).into_owned();
        if !self.seen_first_line {
            self.seen_first_line = true;
            if let Some(rest) = text.strip_prefix('\u{feff}') {
                text = rest.to_owned();
            }
        }
        if text.is_empty() {
            return self.dispatch();
        }
        if text.starts_with(':') {
            return None; // a comment, e.g. a keep-alive
        }
        let (field, value) = match text.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (text.as_str(), ""),
        };
        match field {
            "event" => self.name = Some(value.to_owned()),
            "data" => self.data.push(value.to_owned()),
            _ => {} // id, retry and unknown fields change nothing here
        }
        None
    }

    fn dispatch(&mut self) -> Option<Event> {
        let name = self.name.take();
        if self.data.is_empty() {
            return None;
        }
        let data = std::mem::take(&mut self.data).join("\n");
        Some(Event {
            name: name
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| "message".to_owned()),
            data,
        })
    }
}

/// The length of the first complete line and of its ending (`\n`, `\r\n` or `\r`), if any.
fn next_line(buffer: &[u8]) -> Option<(usize, usize)> {
    let at = buffer.iter().position(|b| *b == b'\n' || *b == b'\r')?;
    match (buffer[at], buffer.get(at + 1)) {
        (b'\r', Some(b'\n')) => Some((at, 2)),
        // A `\r` at the very end may be the first half of `\r\n`: wait for more.
        (b'\r', None) => None,
        _ => Some((at, 1)),
    }
}

/// What a Maestra event means.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamItem {
    /// A piece of the reply.
    Delta(String),
    /// The reply is complete: the same object a non-streamed answer has.
    Done(Value),
    /// The server failed after the stream began.
    Error { code: String, message: String },
    /// Anything else (keep-alives, future events): ignored.
    Other,
}

pub fn interpret(event: &Event) -> StreamItem {
    let json: Option<Value> = serde_json::from_str(&event.data).ok();
    match event.name.as_str() {
        "delta" => {
            StreamItem::Delta(delta_text(json.as_ref()).unwrap_or_else(|| event.data.clone()))
        }
        "done" => match json {
            // Either the response object itself or one wrapped as {"response": {...}}.
            Some(Value::Object(mut object)) => match object.remove("response") {
                Some(inner @ Value::Object(_)) if !object.contains_key("reply") => {
                    StreamItem::Done(inner)
                }
                Some(inner) => {
                    object.insert("response".to_owned(), inner);
                    StreamItem::Done(Value::Object(object))
                }
                None => StreamItem::Done(Value::Object(object)),
            },
            _ => StreamItem::Error {
                code: "invalid_stream".to_owned(),
                message: "the done event holds no response object".to_owned(),
            },
        },
        "error" => {
            let error = json.as_ref().map(|j| j.get("error").unwrap_or(j));
            let field = |name: &str| {
                error
                    .and_then(|e| e.get(name))
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            };
            StreamItem::Error {
                code: field("code").unwrap_or_else(|| "stream_error".to_owned()),
                message: field("message")
                    .or_else(|| json.as_ref().and_then(Value::as_str).map(str::to_owned))
                    .unwrap_or_else(|| event.data.clone()),
            }
        }
        // Unnamed events: a piece of text, or the final object if it looks like one.
        "message" => match json {
            Some(Value::Object(object)) if object.contains_key("reply") => {
                StreamItem::Done(Value::Object(object))
            }
            json => delta_text(json.as_ref()).map_or(StreamItem::Other, StreamItem::Delta),
        },
        _ => StreamItem::Other,
    }
}

/// `{"text": …}` (or `delta`/`content`), or a bare JSON string.
fn delta_text(json: Option<&Value>) -> Option<String> {
    match json? {
        Value::String(text) => Some(text.clone()),
        Value::Object(object) => ["text", "delta", "content"]
            .iter()
            .find_map(|key| object.get(*key).and_then(Value::as_str))
            .map(str::to_owned),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse_all(chunks: &[&[u8]]) -> Vec<Event> {
        let mut parser = EventParser::default();
        let mut events: Vec<Event> = chunks.iter().flat_map(|c| parser.feed(c)).collect();
        events.extend(parser.finish());
        events
    }

    fn event(name: &str, data: &str) -> Event {
        Event {
            name: name.to_owned(),
            data: data.to_owned(),
        }
    }

    #[test]
    fn maestras_events_are_read_whole() {
        let stream = b"event: delta\ndata: {\"text\":\"Hel\"}\n\nevent: delta\ndata: {\"text\":\"lo\"}\n\nevent: done\ndata: {\"reply\":\"Hello\"}\n\n";
        assert_eq!(
            parse_all(&[stream]),
            [
                event("delta", r#"{"text":"Hel"}"#),
                event("delta", r#"{"text":"lo"}"#),
                event("done", r#"{"reply":"Hello"}"#),
            ]
        );
    }

    #[test]
    fn events_split_anywhere_across_chunks_are_the_same() {
        let stream: &[u8] =
            b"event: delta\r\ndata: {\"text\":\"a\"}\r\n\r\nevent: done\r\ndata: {}\r\n\r\n";
        let whole = parse_all(&[stream]);
        for cut in 0..stream.len() {
            assert_eq!(
                parse_all(&[&stream[..cut], &stream[cut..]]),
                whole,
                "cut at {cut}"
            );
        }
        let byte_by_byte: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(parse_all(&byte_by_byte), whole);
    }

    #[test]
    fn comments_unknown_fields_and_multi_line_data_are_handled() {
        let stream =
            b": keep-alive\nid: 7\nretry: 100\nevent: delta\ndata: line one\ndata:line two\n\n";
        assert_eq!(parse_all(&[stream]), [event("delta", "line one\nline two")]);
    }

    #[test]
    fn a_last_event_without_its_blank_line_is_still_delivered() {
        assert_eq!(
            parse_all(&[b"event: done\ndata: {}"]),
            [event("done", "{}")]
        );
    }

    #[test]
    fn deltas_take_text_from_the_usual_shapes() {
        for data in [
            r#"{"text":"hi"}"#,
            r#"{"delta":"hi"}"#,
            r#"{"content":"hi"}"#,
            r#""hi""#,
            "hi",
        ] {
            assert_eq!(
                interpret(&event("delta", data)),
                StreamItem::Delta("hi".to_owned()),
                "{data}"
            );
        }
    }

    #[test]
    fn done_holds_the_response_object_plain_or_wrapped() {
        let plain = json!({"reply": "Hello", "conversation_id": "conv_1"});
        assert_eq!(
            interpret(&event("done", &plain.to_string())),
            StreamItem::Done(plain.clone())
        );
        let wrapped = json!({"response": plain});
        assert_eq!(
            interpret(&event("done", &wrapped.to_string())),
            StreamItem::Done(plain)
        );
    }

    #[test]
    fn errors_carry_the_envelopes_code_and_message() {
        let envelope = json!({"error": {"code": "provider_error", "message": "the model failed"}});
        assert_eq!(
            interpret(&event("error", &envelope.to_string())),
            StreamItem::Error {
                code: "provider_error".to_owned(),
                message: "the model failed".to_owned()
            }
        );
        assert_eq!(
            interpret(&event("error", "boom")),
            StreamItem::Error {
                code: "stream_error".to_owned(),
                message: "boom".to_owned()
            }
        );
    }

    #[test]
    fn unknown_events_are_ignored() {
        assert_eq!(interpret(&event("ping", "{}")), StreamItem::Other);
    }
}
