//! The JSON request body, read one way for every route that takes one: it must be an object,
//! a key may appear only once in it (at any depth, as in a query string, where a repeated
//! parameter is refused too), and it may be as large as its texts need however they are
//! escaped.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// Room in a body for everything but its long texts: ids (up to 128 characters each, maybe
/// escaped), field names, punctuation and some whitespace.
pub const BODY_SLACK_BYTES: usize = 16 * 1024;

/// The most bytes JSON can take to write one byte of text: any character may be written as
/// `\u00XX`, 6 bytes for a 1-byte character. Longer characters take less per byte: `\uXXXX`
/// for 2 or 3 bytes, a surrogate pair `\ud83d\ude00` (12 bytes) for 4.
pub const WORST_ESCAPE_RATIO: usize = 6;

/// The largest body accepted for a request that carries `texts` texts of at most
/// `max_message_bytes` each: any text within the limit fits, however the client escapes it.
pub fn body_limit(max_message_bytes: usize, texts: usize) -> usize {
    max_message_bytes
        .saturating_mul(WORST_ESCAPE_RATIO)
        .saturating_mul(texts)
        .saturating_add(BODY_SLACK_BYTES)
}

/// A request body: a JSON object in which no key appears twice.
pub struct JsonObject(Map<String, Value>);

impl JsonObject {
    pub fn into_value(self) -> Value {
        Value::Object(self.0)
    }
}

impl<'de> Deserialize<'de> for JsonObject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ObjectOnly)
    }
}

/// Accepts an object and nothing else; the error says so in the client's terms.
struct ObjectOnly;

impl<'de> Visitor<'de> for ObjectOnly {
    type Value = JsonObject;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object, e.g. {\"user_id\": \"ana\", …}")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<JsonObject, A::Error> {
        unique_keys(map).map(JsonObject)
    }
}

/// Any JSON value whose objects have distinct keys.
struct StrictValue(Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(AnyValue).map(StrictValue)
    }
}

struct AnyValue;

impl<'de> Visitor<'de> for AnyValue {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(StrictValue(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Value, A::Error> {
        unique_keys(map).map(Value::Object)
    }
}

/// Parsers disagree on a repeated key (first wins, last wins, both kept), so a body that has
/// one could mean one thing here and another to a proxy or a log reader: it is refused.
fn unique_keys<'de, A: MapAccess<'de>>(mut map: A) -> Result<Map<String, Value>, A::Error> {
    let mut object = Map::new();
    while let Some(key) = map.next_key::<String>()? {
        if object.contains_key(&key) {
            return Err(de::Error::custom(format!(
                "the key {key:?} appears more than once"
            )));
        }
        let StrictValue(value) = map.next_value()?;
        object.insert(key, value);
    }
    Ok(object)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Value, String> {
        serde_json::from_str::<JsonObject>(text)
            .map(JsonObject::into_value)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn an_object_is_read_as_it_is() {
        let text = r#"{"a": 1, "b": [true, null, 2.5, "x", {"c": -3}], "d": {}}"#;
        assert_eq!(
            parse(text).unwrap(),
            serde_json::from_str::<Value>(text).unwrap()
        );
    }

    #[test]
    fn anything_but_an_object_is_refused_in_the_clients_terms() {
        for text in [
            r#"["u","cli","conv_arr","hi"]"#,
            r#""just a string""#,
            "42",
            "null",
        ] {
            let error = parse(text).unwrap_err();
            assert!(error.contains("expected a JSON object"), "{text}: {error}");
            assert!(!error.contains("struct"), "{text}: {error}");
        }
    }

    #[test]
    fn a_repeated_key_is_refused_at_any_depth() {
        for text in [
            r#"{"message": "a", "message": "b"}"#,
            r#"{"x": {"k": 1, "k": 2}}"#,
            r#"{"x": [{"k": 1, "k": 2}]}"#,
        ] {
            let error = parse(text).unwrap_err();
            assert!(error.contains("appears more than once"), "{text}: {error}");
        }
    }

    #[test]
    fn the_body_limit_holds_every_text_escaped_at_worst() {
        assert_eq!(body_limit(32_768, 1), 6 * 32_768 + BODY_SLACK_BYTES);
        assert_eq!(body_limit(32_768, 2), 12 * 32_768 + BODY_SLACK_BYTES);
        assert_eq!(body_limit(usize::MAX, 2), usize::MAX);
    }
}
