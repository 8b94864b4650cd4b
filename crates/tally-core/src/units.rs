//! Units of measure: money as integer micro-USD, token and request counts, and the
//! validation of names, ids and attribute values shared by every layer.
//!
//! No floating point ever reaches a counter: float addition is not associative, so float
//! counters could not converge exactly (DESIGN.md §1). Floats exist only at the edge, where
//! a JSON number is turned into micros once, rounding to the nearest micro.

use std::fmt;

/// Largest amount of money accepted anywhere: 1e9 USD.
pub const USD_MAX: f64 = 1e9;
/// Largest money amount in micro-USD (1e9 USD).
pub const MICROS_MAX: u64 = 1_000_000_000_000_000;
/// Largest token or request count accepted in one value (API.md: 1e15).
pub const COUNT_MAX: u64 = 1_000_000_000_000_000;
/// Most attributes a request may carry (DESIGN.md §1).
pub const ATTRIBUTES_MAX: usize = 8;
/// Most attributes after entity-parent expansion; expansion stops adding beyond this.
pub const EXPANDED_ATTRIBUTES_MAX: usize = 16;
/// Longest attribute value, in bytes.
pub const ATTRIBUTE_VALUE_LEN_MAX: usize = 128;

/// An amount of money in micro-USD (1e-6 USD).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Micros(pub u64);

/// Why a value was refused. Every variant carries enough to write a clear 400 message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UnitError {
    #[error("{what} must be a finite number")]
    NotFinite { what: &'static str },
    #[error("{what} must not be negative")]
    Negative { what: &'static str },
    #[error("{what} must be at most {max}")]
    TooLarge { what: &'static str, max: String },
    #[error("{what} must be a whole number")]
    NotInteger { what: &'static str },
    #[error("{what} is not a decimal number: {input:?}")]
    NotDecimal { what: &'static str, input: String },
}

impl Micros {
    /// Converts a USD amount to micros, rounding to the nearest micro (half away from zero).
    ///
    /// Exact for every input that is itself the nearest double to a decimal with at most
    /// six fractional digits: below 1e9 USD the product is below 2^53, where doubles are
    /// exact integers, so the only error is the multiplication's half-ulp, far below 0.5.
    pub fn from_usd(usd: f64, what: &'static str) -> Result<Micros, UnitError> {
        if !usd.is_finite() {
            return Err(UnitError::NotFinite { what });
        }
        if usd < 0.0 {
            return Err(UnitError::Negative { what });
        }
        if usd > USD_MAX {
            return Err(UnitError::TooLarge {
                what,
                max: "1000000000 USD".into(),
            });
        }
        let micros = (usd * 1e6).round();
        debug_assert!(micros >= 0.0 && micros <= MICROS_MAX as f64);
        Ok(Micros(micros as u64))
    }

    /// Parses a decimal USD string exactly (no float on the way), rounding to the nearest
    /// micro. Used by the command line, where the user typed the decimal.
    pub fn parse_usd(input: &str, what: &'static str) -> Result<Micros, UnitError> {
        let bad = || UnitError::NotDecimal {
            what,
            input: input.to_string(),
        };
        let s = input.trim();
        if s.starts_with('-') {
            return Err(UnitError::Negative { what });
        }
        let (int, frac) = s.split_once('.').unwrap_or((s, ""));
        if int.is_empty() && frac.is_empty() {
            return Err(bad());
        }
        if !int.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let int = int.trim_start_matches('0');
        if int.len() > 10 {
            return Err(UnitError::TooLarge {
                what,
                max: "1000000000 USD".into(),
            });
        }
        let whole: u64 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| bad())?
        };
        let mut micros = whole * 1_000_000;
        let digits = frac.as_bytes();
        for i in 0..6 {
            let d = digits.get(i).map_or(0, |b| u64::from(b - b'0'));
            micros += d * 10u64.pow(5 - i as u32);
        }
        if digits.get(6).is_some_and(|b| *b >= b'5') {
            micros += 1;
        }
        if micros > MICROS_MAX {
            return Err(UnitError::TooLarge {
                what,
                max: "1000000000 USD".into(),
            });
        }
        Ok(Micros(micros))
    }

    /// The amount in USD, the nearest double to the exact decimal.
    pub fn to_usd(self) -> f64 {
        // Both operands are exact doubles below 2^53 and division is correctly rounded.
        self.0 as f64 / 1e6
    }
}

impl fmt::Display for Micros {
    /// Exact decimal USD with trailing zeros trimmed: `12.5`, `0.000001`, `3`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let whole = self.0 / 1_000_000;
        let frac = self.0 % 1_000_000;
        if frac == 0 {
            write!(f, "{whole}")
        } else {
            let s = format!("{frac:06}");
            write!(f, "{whole}.{}", s.trim_end_matches('0'))
        }
    }
}

/// Checks a token or request count given as a JSON number.
pub fn count_from_f64(value: f64, what: &'static str) -> Result<u64, UnitError> {
    if !value.is_finite() {
        return Err(UnitError::NotFinite { what });
    }
    if value < 0.0 {
        return Err(UnitError::Negative { what });
    }
    if value.fract() != 0.0 {
        return Err(UnitError::NotInteger { what });
    }
    if value > COUNT_MAX as f64 {
        return Err(UnitError::TooLarge {
            what,
            max: "1000000000000000".into(),
        });
    }
    Ok(value as u64)
}

/// Checks a token or request count.
pub fn check_count(value: u64, what: &'static str) -> Result<u64, UnitError> {
    if value > COUNT_MAX {
        return Err(UnitError::TooLarge {
            what,
            max: "1000000000000000".into(),
        });
    }
    Ok(value)
}

/// What a limit counts.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Metric {
    /// Money, in micro-USD.
    Cost,
    /// Tokens.
    Tokens,
    /// Requests; every request counts 1 unless a record says otherwise.
    Requests,
}

impl Metric {
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Cost => "cost",
            Metric::Tokens => "tokens",
            Metric::Requests => "requests",
        }
    }

    pub fn parse(s: &str) -> Option<Metric> {
        match s {
            "cost" => Some(Metric::Cost),
            "tokens" => Some(Metric::Tokens),
            "requests" => Some(Metric::Requests),
            _ => None,
        }
    }
}

/// The amounts of one request: what a check estimates or what a record reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Amounts {
    pub cost: Micros,
    pub tokens: u64,
    pub requests: u64,
}

impl Amounts {
    pub fn of(&self, metric: Metric) -> u64 {
        match metric {
            Metric::Cost => self.cost.0,
            Metric::Tokens => self.tokens,
            Metric::Requests => self.requests,
        }
    }
}

/// Why a name or id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    #[error("{what} {value:?} must match {pattern}")]
    Pattern {
        what: &'static str,
        value: String,
        pattern: &'static str,
    },
}

/// Limit ids and record ids: `[A-Za-z0-9._:-]{1,128}`.
pub fn validate_id(value: &str, what: &'static str) -> Result<(), NameError> {
    let ok = (1..=128).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(NameError::Pattern {
            what,
            value: value.to_string(),
            pattern: "[A-Za-z0-9._:-]{1,128}",
        })
    }
}

/// Attribute (dimension) names: `[a-z0-9_]{1,32}`.
pub fn validate_dimension(value: &str) -> Result<(), NameError> {
    let ok = (1..=32).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(NameError::Pattern {
            what: "attribute name",
            value: value.to_string(),
            pattern: "[a-z0-9_]{1,32}",
        })
    }
}

/// Attribute values: 1 to 128 bytes of printable text (no control characters).
pub fn validate_attribute_value(value: &str) -> Result<(), NameError> {
    let ok = (1..=ATTRIBUTE_VALUE_LEN_MAX).contains(&value.len())
        && !value.chars().any(char::is_control);
    if ok {
        Ok(())
    } else {
        Err(NameError::Pattern {
            what: "attribute value",
            value: value.to_string(),
            pattern: "1 to 128 bytes without control characters",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usd_round_trip_table() {
        let cases: &[(f64, u64, &str)] = &[
            (0.0, 0, "0"),
            (0.0123, 12_300, "0.0123"),
            (0.000001, 1, "0.000001"),
            (0.0000004, 0, "0"),
            (0.0000005, 1, "0.000001"),
            (0.0000006, 1, "0.000001"),
            (12.5, 12_500_000, "12.5"),
            (100.0, 100_000_000, "100"),
            (1e9, MICROS_MAX, "1000000000"),
            (0.1 + 0.2, 300_000, "0.3"),
        ];
        for &(usd, micros, text) in cases {
            let m = Micros::from_usd(usd, "cost").unwrap();
            assert_eq!(m, Micros(micros), "{usd}");
            assert_eq!(m.to_string(), text);
            assert_eq!(Micros::parse_usd(text, "cost").unwrap(), m);
        }
        assert_eq!(Micros(12_300).to_usd(), 0.0123);
        assert_eq!(Micros(1).to_usd(), 0.000001);
    }

    #[test]
    fn usd_rejects() {
        assert_eq!(
            Micros::from_usd(-0.01, "cost"),
            Err(UnitError::Negative { what: "cost" })
        );
        assert!(matches!(
            Micros::from_usd(f64::NAN, "cost"),
            Err(UnitError::NotFinite { .. })
        ));
        assert!(matches!(
            Micros::from_usd(f64::INFINITY, "cost"),
            Err(UnitError::NotFinite { .. })
        ));
        assert!(matches!(
            Micros::from_usd(1e9 + 1.0, "cost"),
            Err(UnitError::TooLarge { .. })
        ));
        assert!(matches!(
            Micros::parse_usd("1e3", "cost"),
            Err(UnitError::NotDecimal { .. })
        ));
        assert!(matches!(
            Micros::parse_usd("-1", "cost"),
            Err(UnitError::Negative { .. })
        ));
        assert!(matches!(
            Micros::parse_usd("1000000000.000001", "cost"),
            Err(UnitError::TooLarge { .. })
        ));
        assert_eq!(Micros::parse_usd("0.0000005", "c").unwrap(), Micros(1));
        assert_eq!(Micros::parse_usd(".5", "c").unwrap(), Micros(500_000));
        assert_eq!(Micros::parse_usd("7.", "c").unwrap(), Micros(7_000_000));
    }

    #[test]
    fn counts() {
        assert_eq!(count_from_f64(1500.0, "tokens"), Ok(1500));
        assert!(matches!(
            count_from_f64(1.5, "tokens"),
            Err(UnitError::NotInteger { .. })
        ));
        assert!(matches!(
            count_from_f64(1e16, "tokens"),
            Err(UnitError::TooLarge { .. })
        ));
        assert!(check_count(COUNT_MAX + 1, "tokens").is_err());
    }

    #[test]
    fn names() {
        assert!(validate_id("team-eng.monthly:v1_2", "limit id").is_ok());
        assert!(validate_id(&"a".repeat(128), "limit id").is_ok());
        assert!(validate_id(&"a".repeat(129), "limit id").is_err());
        assert!(validate_id("", "limit id").is_err());
        assert!(validate_id("a b", "limit id").is_err());
        assert!(validate_id("a/b", "limit id").is_err());
        assert!(validate_dimension("virtual_key").is_ok());
        assert!(validate_dimension("Team").is_err());
        assert!(validate_dimension(&"a".repeat(33)).is_err());
        assert!(validate_attribute_value("meta-llama/Llama-3 70b").is_ok());
        assert!(validate_attribute_value("").is_err());
        assert!(validate_attribute_value("a\nb").is_err());
    }
}
