//! The one place values become bytes: config records and reset registers for the store
//! (and, later, gossip). bincode 2 with its standard configuration; every decode checks
//! that the whole input was consumed, so a truncated or padded value is an error, not a
//! silently different record.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// A value that could not be decoded.
#[derive(Debug, thiserror::Error)]
#[error("cannot decode a stored or received value: {0}")]
pub struct DecodeError(String);

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(value, config()).expect("plain values always encode")
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    let (value, read) = bincode::serde::decode_from_slice(bytes, config())
        .map_err(|e| DecodeError(e.to_string()))?;
    if read != bytes.len() {
        return Err(DecodeError(format!(
            "{} trailing bytes",
            bytes.len() - read
        )));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{EntityRecord, LimitInput, LimitRecord, LimitSpec, ResetRegister};
    use crate::hlc::{Hlc, Version};
    use crate::units::Metric;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn limit_records_round_trip(id in "[a-z0-9]{1,20}", hlc in any::<u64>(), max in any::<u64>(), anchor in any::<i64>(),
                                     scope in proptest::collection::btree_map("[a-z]{1,5}", "[a-z0-9-]{1,8}", 0..4), tomb in any::<bool>()) {
            let rec = LimitRecord {
                id,
                version: Version { hlc: Hlc(hlc), node: "n1".into() },
                spec: (!tomb).then(|| LimitSpec {
                    input: LimitInput { scope, metric: Metric::Tokens, max, period: "3M".parse().unwrap(), calendar_aligned: true, timezone: "Europe/Berlin".into() },
                    anchor_ms: anchor,
                    spec_gen: Hlc(hlc / 2),
                }),
            };
            let bytes = encode(&rec);
            prop_assert_eq!(decode::<LimitRecord>(&bytes).unwrap(), rec);
            prop_assert!(decode::<LimitRecord>(&bytes[..bytes.len() - 1]).is_err());
        }

        #[test]
        fn entity_and_reset_round_trip(hlc in any::<u64>(), baseline in any::<u64>(), period in any::<i64>()) {
            let e = EntityRecord { dimension: "team".into(), value: "eng".into(), version: Version { hlc: Hlc(hlc), node: "n".into() }, parents: None };
            prop_assert_eq!(decode::<EntityRecord>(&encode(&e)).unwrap(), e);
            let r = ResetRegister { spec_gen: Hlc(hlc), period, reset: Version { hlc: Hlc(hlc), node: "n".into() }, baseline };
            prop_assert_eq!(decode::<ResetRegister>(&encode(&r)).unwrap(), r);
        }
    }
}
