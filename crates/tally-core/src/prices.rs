//! Prices: the cost of a request from its token counts, exactly.
//!
//! A price is integer femto-USD (1e-15 USD) per token for each kind of token. That is fine
//! enough for every real price (the cheapest published ones are a few hundredths of a
//! micro-USD per token) and leaves no float anywhere in the arithmetic: a request's cost
//! is `Σ tokens_k × price_k` in femto-USD as a `u128` (at most 5 × 1e15 × 1e15), charged
//! rounded **up** to the whole micro-USD that limits count, so a budget never counts less
//! than was spent (the error is below one micro-USD per request).
//!
//! People and the HTTP API write prices in USD per million tokens (`2.5` for
//! $2.50 / 1M tokens; 9 decimal places are exactly femto-USD per token, further places
//! are rounded); LiteLLM's price file writes USD per token (`2.5e-06`; 15 places).

use crate::hlc::Version;
use crate::units::{MICROS_MAX, NameError, validate_attribute_value};

/// Femto-USD per micro-USD.
const FEMTO_PER_MICRO: u128 = 1_000_000_000;
/// Largest price of one token: 1 USD (1e6 USD per million tokens).
pub const PRICE_MAX_FEMTO: u64 = 1_000_000_000_000_000;

/// Per-token prices of one model, in femto-USD. The optional kinds fall back: cached
/// reads and cache writes to the input price, reasoning to the output price.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Price {
    pub input: u64,
    pub output: u64,
    pub cache_read: Option<u64>,
    pub cache_creation: Option<u64>,
    pub reasoning: Option<u64>,
}

/// Token counts by kind. The kinds are disjoint: `input` excludes tokens read from or
/// written to a prompt cache, `output` excludes reasoning tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TokenKinds {
    pub input: u64,
    pub output: u64,
    pub cache_read: u64,
    pub cache_creation: u64,
    pub reasoning: u64,
}

impl TokenKinds {
    /// Every token of every kind.
    pub fn total(&self) -> u128 {
        [
            self.input,
            self.output,
            self.cache_read,
            self.cache_creation,
            self.reasoning,
        ]
        .iter()
        .map(|&n| u128::from(n))
        .sum()
    }
}

/// The five prices a request is charged at, fallbacks resolved, in the order of
/// [`TokenKinds`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolved {
    pub input: u64,
    pub output: u64,
    pub cache_read: u64,
    pub cache_creation: u64,
    pub reasoning: u64,
}

impl Price {
    pub fn resolved(&self) -> Resolved {
        Resolved {
            input: self.input,
            output: self.output,
            cache_read: self.cache_read.unwrap_or(self.input),
            cache_creation: self.cache_creation.unwrap_or(self.input),
            reasoning: self.reasoning.unwrap_or(self.output),
        }
    }

    /// The exact cost of `tokens` in femto-USD.
    pub fn cost_femto(&self, tokens: &TokenKinds) -> u128 {
        let p = self.resolved();
        [
            (tokens.input, p.input),
            (tokens.output, p.output),
            (tokens.cache_read, p.cache_read),
            (tokens.cache_creation, p.cache_creation),
            (tokens.reasoning, p.reasoning),
        ]
        .iter()
        .map(|&(n, p)| u128::from(n) * u128::from(p))
        .sum()
    }

    pub fn validate(&self) -> Result<(), PriceError> {
        let all = [
            Some(self.input),
            Some(self.output),
            self.cache_read,
            self.cache_creation,
            self.reasoning,
        ];
        if all.iter().flatten().any(|&p| p > PRICE_MAX_FEMTO) {
            return Err(PriceError::TooLarge);
        }
        Ok(())
    }
}

/// A femto-USD amount charged as micro-USD: rounded up. `None` past the largest cost a
/// request may have (1e9 USD).
pub fn charge_micros(femto: u128) -> Option<u64> {
    let micros = femto.div_ceil(FEMTO_PER_MICRO);
    u64::try_from(micros).ok().filter(|&m| m <= MICROS_MAX)
}

/// A femto-USD amount as an exact decimal USD string, trailing zeros trimmed:
/// `0.0000125`, `3`.
pub fn femto_to_usd_string(femto: u128) -> String {
    decimal_string(femto, 15)
}

/// A per-token femto price as USD per million tokens (the nearest double of the exact
/// decimal, which prints as that decimal when it has at most 15 significant digits).
pub fn femto_to_per_mtok(femto: u64) -> f64 {
    // Both operands are exact doubles (femto ≤ 1e15 < 2^53) and division rounds correctly.
    femto as f64 / 1e9
}

/// USD per million tokens, as written in JSON or on the command line, to femto-USD per
/// token: exact for up to 9 decimal places, rounded (half up) to the 9th beyond; at most
/// 1e6.
pub fn per_mtok_to_femto(usd_per_mtok: f64) -> Result<u64, PriceError> {
    from_f64(usd_per_mtok, 9)
}

/// USD per token, as LiteLLM's price file writes it, to femto-USD per token: exact for up
/// to 15 decimal places, rounded (half up) beyond; at most 1.
pub fn per_token_to_femto(usd_per_token: f64) -> Result<u64, PriceError> {
    from_f64(usd_per_token, 15)
}

/// A double to an integer count of `10^-scale` units, through its shortest decimal form
/// (what a JSON or command-line number most likely was written as), so a decimal with at
/// most `scale` places is read exactly and no binary rounding error creeps in; further
/// places are rounded half up.
fn from_f64(value: f64, scale: u32) -> Result<u64, PriceError> {
    if !value.is_finite() {
        return Err(PriceError::NotFinite);
    }
    if value < 0.0 {
        return Err(PriceError::Negative);
    }
    // `Display` of f64 is the shortest decimal that reads back as the same double, and
    // never uses an exponent.
    let text = format!("{value}");
    let (int, frac) = text.split_once('.').unwrap_or((&text, ""));
    let frac = frac.trim_end_matches('0');
    let (kept, rest) = frac.split_at(frac.len().min(scale as usize));
    let int: u128 = int.parse().map_err(|_| PriceError::TooLarge)?;
    let mut units = int
        .checked_mul(10u128.pow(scale))
        .ok_or(PriceError::TooLarge)?;
    if !kept.is_empty() {
        let f: u128 = kept.parse().map_err(|_| PriceError::TooLarge)?;
        units += f * 10u128.pow(scale - kept.len() as u32);
    }
    if rest.as_bytes().first().is_some_and(|&d| d >= b'5') {
        units += 1;
    }
    u64::try_from(units)
        .ok()
        .filter(|&u| u <= PRICE_MAX_FEMTO)
        .ok_or(PriceError::TooLarge)
}

/// `units` of `10^-scale` as a decimal string with trailing zeros trimmed.
fn decimal_string(units: u128, scale: u32) -> String {
    let one = 10u128.pow(scale);
    let (whole, frac) = (units / one, units % one);
    if frac == 0 {
        whole.to_string()
    } else {
        let f = format!("{frac:0width$}", width = scale as usize);
        format!("{whole}.{}", f.trim_end_matches('0'))
    }
}

/// Why a price was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PriceError {
    #[error("a price must be a finite number")]
    NotFinite,
    #[error("a price must not be negative")]
    Negative,
    #[error("a price is at most 1000000 USD per million tokens (1 USD per token)")]
    TooLarge,
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("the model name \"batch\" is reserved (POST /v1/prices/batch writes many prices)")]
    Reserved,
}

/// The price record of a model: its prices, or a tombstone. Last writer wins.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PriceRecord {
    pub model: String,
    pub version: Version,
    pub price: Option<Price>,
}

/// A model name the price table cannot hold: `POST /v1/prices/batch` is its path.
pub const RESERVED_MODEL: &str = "batch";

/// Checks a model name (the value of a request's `model` attribute).
pub fn validate_model(model: &str) -> Result<(), PriceError> {
    validate_attribute_value(model)?;
    if model == RESERVED_MODEL {
        return Err(PriceError::Reserved);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn prices_convert_exactly() {
        assert_eq!(per_mtok_to_femto(2.5), Ok(2_500_000_000));
        assert_eq!(per_mtok_to_femto(0.15), Ok(150_000_000));
        assert_eq!(per_mtok_to_femto(0.000000001), Ok(1));
        assert_eq!(per_mtok_to_femto(1e6), Ok(PRICE_MAX_FEMTO));
        assert_eq!(
            per_mtok_to_femto(0.0000000001),
            Ok(0),
            "below a femto-USD per token"
        );
        assert_eq!(per_mtok_to_femto(0.0000000005), Ok(1), "half up");
        assert_eq!(per_mtok_to_femto(1.2345678914), Ok(1_234_567_891));
        assert_eq!(per_mtok_to_femto(1.2345678915), Ok(1_234_567_892));
        assert_eq!(per_mtok_to_femto(1e6 + 1.0), Err(PriceError::TooLarge));
        assert_eq!(per_mtok_to_femto(-1.0), Err(PriceError::Negative));
        assert_eq!(per_mtok_to_femto(f64::NAN), Err(PriceError::NotFinite));
        assert_eq!(per_token_to_femto(2.5e-06), Ok(2_500_000_000));
        assert_eq!(per_token_to_femto(3.75e-08), Ok(37_500_000));
        assert_eq!(per_token_to_femto(1.6666667e-07), Ok(166_666_670));
        assert_eq!(per_token_to_femto(0.0), Ok(0));
        assert_eq!(femto_to_per_mtok(2_500_000_000), 2.5);
        assert_eq!(femto_to_per_mtok(150_000_000), 0.15);
    }

    #[test]
    fn cost_rounds_up_to_the_micro() {
        let p = Price {
            input: 2_500_000_000,
            output: 10_000_000_000,
            cache_read: Some(1_250_000_000),
            cache_creation: None,
            reasoning: None,
        };
        let t = TokenKinds {
            input: 1000,
            output: 500,
            cache_read: 2000,
            cache_creation: 100,
            reasoning: 50,
        };
        // 1000×2.5 + 500×10 + 2000×1.25 + 100×2.5 + 50×10 USD per 1e6 tokens
        // = 2500 + 5000 + 2500 + 250 + 500 = 10750 µUSD.
        assert_eq!(p.cost_femto(&t), 10_750_000_000_000);
        assert_eq!(charge_micros(p.cost_femto(&t)), Some(10_750));
        assert_eq!(femto_to_usd_string(p.cost_femto(&t)), "0.01075");
        let one = TokenKinds {
            input: 1,
            ..TokenKinds::default()
        };
        assert_eq!(p.cost_femto(&one), 2_500_000_000);
        assert_eq!(
            charge_micros(2_500_000_000),
            Some(3),
            "2.5 µUSD is charged 3"
        );
        assert_eq!(charge_micros(0), Some(0));
        assert_eq!(charge_micros(1), Some(1));
        assert_eq!(femto_to_usd_string(2_500_000_000), "0.0000025");
        assert_eq!(
            charge_micros(u128::from(MICROS_MAX) * FEMTO_PER_MICRO + 1),
            None
        );
    }

    proptest! {
        /// The charge is the exact rational cost, computed here independently in decimal
        /// text arithmetic-free form (per-kind products summed as u128), rounded up.
        #[test]
        fn charge_matches_the_table(
            prices in proptest::array::uniform5(0u64..=PRICE_MAX_FEMTO),
            optional in proptest::array::uniform3(any::<bool>()),
            tokens in proptest::array::uniform5(0u64..=10_000_000),
        ) {
            let p = Price {
                input: prices[0],
                output: prices[1],
                cache_read: optional[0].then_some(prices[2]),
                cache_creation: optional[1].then_some(prices[3]),
                reasoning: optional[2].then_some(prices[4]),
            };
            let t = TokenKinds {
                input: tokens[0],
                output: tokens[1],
                cache_read: tokens[2],
                cache_creation: tokens[3],
                reasoning: tokens[4],
            };
            let per = [
                prices[0],
                prices[1],
                if optional[0] { prices[2] } else { prices[0] },
                if optional[1] { prices[3] } else { prices[0] },
                if optional[2] { prices[4] } else { prices[1] },
            ];
            let exact: u128 = (0..5).map(|i| u128::from(tokens[i]) * u128::from(per[i])).sum();
            prop_assert_eq!(p.cost_femto(&t), exact);
            let charged = charge_micros(exact).unwrap();
            // Rounded up: never less than the cost, less than one micro more.
            prop_assert!(u128::from(charged) * FEMTO_PER_MICRO >= exact);
            prop_assert!(u128::from(charged) * FEMTO_PER_MICRO < exact + FEMTO_PER_MICRO);
            // The decimal string reads back as the same amount.
            let s = femto_to_usd_string(exact);
            let (w, f) = s.split_once('.').unwrap_or((&s, ""));
            let back = w.parse::<u128>().unwrap() * 10u128.pow(15)
                + if f.is_empty() { 0 } else { f.parse::<u128>().unwrap() * 10u128.pow(15 - f.len() as u32) };
            prop_assert_eq!(back, exact);
        }

        /// A price with at most 9 decimal places (every stored price) survives JSON (a
        /// double) exactly.
        #[test]
        fn per_mtok_prices_round_trip(femto in 0u64..=PRICE_MAX_FEMTO) {
            prop_assert_eq!(per_mtok_to_femto(femto_to_per_mtok(femto)), Ok(femto));
        }
    }
}
