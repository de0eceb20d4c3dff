//! Whole numbers as JSON may write them. JSON Schema (so OpenAPI clients, and fuzzers) counts
//! `3.0` as the integer 3, while serde's integer types take only `3`: these take both, and
//! refuse fractions and numbers out of range with a message that says what fits.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use super::UserId;

/// A whole number, as read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Whole(pub i128);

impl<'de> Deserialize<'de> for Whole {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct WholeVisitor;
        impl Visitor<'_> for WholeVisitor {
            type Value = Whole;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a whole number")
            }

            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Whole, E> {
                Ok(Whole(n.into()))
            }

            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Whole, E> {
                Ok(Whole(n.into()))
            }

            fn visit_f64<E: de::Error>(self, n: f64) -> Result<Whole, E> {
                // Exactly representable whole numbers only (|n| < 2^63 here).
                if n.fract() == 0.0 && n.abs() < 9.2e18 {
                    Ok(Whole(n as i128))
                } else {
                    Err(E::invalid_value(de::Unexpected::Float(n), &self))
                }
            }
        }
        deserializer.deserialize_any(WholeVisitor)
    }
}

fn in_range<T: TryFrom<i128>, E: de::Error>(n: Whole, range: &str) -> Result<T, E> {
    T::try_from(n.0).map_err(|_| E::custom(format!("{} is not a whole number {range}", n.0)))
}

/// 0 to 2^63-1: what a Postgres `BIGINT` holds.
pub fn count<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    let n = Whole::deserialize(deserializer)?;
    if n.0 > i128::from(i64::MAX) {
        return Err(de::Error::custom(format!(
            "{} is larger than {}",
            n.0,
            i64::MAX
        )));
    }
    in_range(n, "from 0")
}

/// An optional count (absent or null: `None`).
pub fn optional_count<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<usize>, D::Error> {
    match Option::<Whole>::deserialize(deserializer)? {
        None => Ok(None),
        Some(n) => in_range(n, "from 0").map(Some),
    }
}

/// Positions by user.
pub fn positions<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<UserId, i64>, D::Error> {
    BTreeMap::<UserId, Whole>::deserialize(deserializer)?
        .into_iter()
        .map(|(user, n)| Ok((user, in_range(n, "of 64 bits")?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[derive(Deserialize)]
    struct Counted {
        #[serde(deserialize_with = "count")]
        n: u64,
    }

    #[test]
    fn whole_numbers_written_as_floats_are_taken_and_fractions_are_not() {
        let read = |v| serde_json::from_value::<Counted>(json!({ "n": v })).map(|c| c.n);
        assert_eq!(read(json!(3)).unwrap(), 3);
        assert_eq!(read(json!(3.0)).unwrap(), 3);
        assert!(read(json!(3.5)).is_err());
        assert!(read(json!(-1)).is_err());
        assert!(read(json!(u64::MAX)).is_err(), "over a BIGINT");
        assert!(read(json!("3")).is_err());
    }
}
