//! Byte sizes written as Kubernetes quantities: `2Gi`, `512Mi`, `10G`, `1073741824`.
//!
//! The schema admits a quantity as an int-or-string with [`SIZE_PATTERN`] (so `kubectl apply`
//! refuses `lots`); [`ByteQuantity::bytes`] turns it into a byte count. Deserializing never
//! fails on a value the schema admits: a watcher must not lose a whole list because one object
//! holds a size that is well-formed but meaningless (`0.5`), so meaning is checked by
//! [`ByteQuantity::bytes`] and reported as a condition.

use std::fmt;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// The shape of a byte size: a non-negative decimal number with an optional binary (`Ki`…`Ei`)
/// or decimal (`k`…`E`) suffix. Signs, milli-units and exponents are refused: they make no sense
/// for bytes.
pub const SIZE_PATTERN: &str = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$";

/// A size in bytes, as the user wrote it (`2Gi`), so that status and `kubectl get` show the
/// user's own words.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ByteQuantity(String);

/// Why a size could not be turned into bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    /// The text does not match [`SIZE_PATTERN`].
    #[error(
        "`{0}` is not a size: write a whole number of bytes or a quantity like `512Mi`, `2Gi`, `10G`"
    )]
    Malformed(String),
    /// The size is not a whole number of bytes (`0.5`, `1.1k`).
    #[error("`{0}` is not a whole number of bytes")]
    Fractional(String),
    /// The size does not fit in 64 bits.
    #[error("`{0}` is too large")]
    TooLarge(String),
}

impl ByteQuantity {
    /// Wraps a quantity string without checking it; see [`ByteQuantity::bytes`].
    pub fn new(text: impl Into<String>) -> Self {
        Self(text.into())
    }

    /// A quantity of exactly `bytes`, written with the largest binary suffix that divides it.
    pub fn from_bytes(bytes: u64) -> Self {
        const UNITS: [(&str, u64); 6] = [
            ("Ei", 1 << 60),
            ("Pi", 1 << 50),
            ("Ti", 1 << 40),
            ("Gi", 1 << 30),
            ("Mi", 1 << 20),
            ("Ki", 1 << 10),
        ];
        for (suffix, factor) in UNITS {
            if bytes >= factor && bytes.is_multiple_of(factor) {
                return Self(format!("{}{suffix}", bytes / factor));
            }
        }
        Self(bytes.to_string())
    }

    /// The text as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The size in bytes.
    pub fn bytes(&self) -> Result<u64, QuantityError> {
        parse_bytes(&self.0)
    }
}

/// Parses a size quantity into bytes; see [`SIZE_PATTERN`] for the accepted shape.
pub fn parse_bytes(text: &str) -> Result<u64, QuantityError> {
    let malformed = || QuantityError::Malformed(text.to_string());
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let factor: u128 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000,
        _ => return Err(malformed()),
    };
    let (whole, fraction) = match number.split_once('.') {
        Some((w, f)) if !f.is_empty() => (w, f),
        Some(_) => return Err(malformed()),
        None => (number, ""),
    };
    if whole.is_empty()
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !fraction.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(malformed());
    }
    let too_large = || QuantityError::TooLarge(text.to_string());
    // Exact decimal arithmetic: value = (whole.fraction) * factor, which must be an integer.
    let scale = 10u128
        .checked_pow(fraction.len() as u32)
        .ok_or_else(too_large)?;
    let digits: u128 = format!("{whole}{fraction}")
        .parse()
        .map_err(|_| too_large())?;
    let scaled = digits.checked_mul(factor).ok_or_else(too_large)?;
    if !scaled.is_multiple_of(scale) {
        return Err(QuantityError::Fractional(text.to_string()));
    }
    u64::try_from(scaled / scale).map_err(|_| too_large())
}

impl fmt::Display for ByteQuantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ByteQuantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ByteQuantity({})", self.0)
    }
}

/// Zero bytes.
impl Default for ByteQuantity {
    fn default() -> Self {
        ByteQuantity::new("0")
    }
}

impl From<&str> for ByteQuantity {
    fn from(text: &str) -> Self {
        Self::new(text)
    }
}

impl Serialize for ByteQuantity {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ByteQuantity {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // int-or-string: YAML `size: 1073741824` arrives as a number.
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Unsigned(u64),
        }
        Ok(
            match Raw::deserialize(deserializer).map_err(|_| {
                serde::de::Error::custom(
                    "expected a size: a whole number of bytes or a quantity like `2Gi`",
                )
            })? {
                Raw::Text(text) => Self(text),
                Raw::Unsigned(n) => Self(n.to_string()),
            },
        )
    }
}

impl JsonSchema for ByteQuantity {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ByteQuantity".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        // A pattern beside int-or-string makes the API server refuse `lots` (checked on v1.24).
        json_schema!({
            "x-kubernetes-int-or-string": true,
            "pattern": SIZE_PATTERN,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binary_decimal_and_plain_sizes() {
        let cases = [
            ("0", 0),
            ("1073741824", 1 << 30),
            ("2Gi", 2 << 30),
            ("512Mi", 512 << 20),
            ("10G", 10_000_000_000),
            ("1.5Gi", 3 << 29),
            ("4Ki", 4096),
            ("1k", 1000),
            ("15Ei", 15 << 60),
        ];
        for (text, bytes) in cases {
            assert_eq!(parse_bytes(text), Ok(bytes), "{text}");
        }
    }

    #[test]
    fn refuses_what_is_not_a_byte_count() {
        for bad in [
            "", "lots", "2 Gi", "2gi", "-1", "+1", "1.", ".5", "1e3", "100m", "2Gib", "1.2.3",
        ] {
            assert!(
                matches!(parse_bytes(bad), Err(QuantityError::Malformed(_))),
                "{bad}"
            );
        }
        assert_eq!(
            parse_bytes("0.5"),
            Err(QuantityError::Fractional("0.5".into()))
        );
        assert_eq!(
            parse_bytes("1.0001k"),
            Err(QuantityError::Fractional("1.0001k".into()))
        );
        assert!(matches!(
            parse_bytes("16Ei"),
            Err(QuantityError::TooLarge(_))
        ));
        assert!(matches!(
            parse_bytes("99999999999999999999999999999999999999999"),
            Err(QuantityError::TooLarge(_))
        ));
    }

    #[test]
    fn pattern_and_parser_agree_on_shape() {
        let pattern = regex::Regex::new(SIZE_PATTERN).unwrap();
        for text in [
            "0", "2Gi", "1.5Gi", "10G", "lots", "2 Gi", "-1", "1e3", "100m", ".5", "1.",
        ] {
            let parsed = !matches!(parse_bytes(text), Err(QuantityError::Malformed(_)));
            assert_eq!(pattern.is_match(text), parsed, "{text}");
        }
    }

    #[test]
    fn deserializes_int_or_string_and_keeps_the_users_words() {
        let q: ByteQuantity = serde_json::from_str("\"2Gi\"").unwrap();
        assert_eq!(q.as_str(), "2Gi");
        let n: ByteQuantity = serde_json::from_str("1024").unwrap();
        assert_eq!(n.bytes(), Ok(1024));
        let odd: ByteQuantity = serde_json::from_str("\"0.5\"").unwrap();
        assert!(
            odd.bytes().is_err(),
            "meaning is checked later, not at deserialization"
        );
        assert!(serde_json::from_str::<ByteQuantity>("true").is_err());
    }

    #[test]
    fn from_bytes_picks_the_largest_exact_unit() {
        assert_eq!(ByteQuantity::from_bytes(2 << 30).as_str(), "2Gi");
        assert_eq!(ByteQuantity::from_bytes(1536 << 20).as_str(), "1536Mi");
        assert_eq!(ByteQuantity::from_bytes(1000).as_str(), "1000");
        assert_eq!(ByteQuantity::from_bytes(0).as_str(), "0");
    }
}
