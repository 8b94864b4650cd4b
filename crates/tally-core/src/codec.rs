//! The one place values become bytes: config records and reset registers for the store
//! and gossip. bincode 2 with its standard configuration; every decode checks that the
//! whole input was consumed, so a truncated or padded value is an error, not a silently
//! different record.
//!
//! Replicated records go through [`Record`]. A limit's hard-mode fields (`mode`,
//! `members`) are a trailing extension that only hard limits carry: a soft limit encodes
//! exactly as before hard mode existed, so stored data and nodes of the previous version
//! still read it; a node of the previous version refuses a hard limit's record (trailing
//! bytes) rather than misreading it.

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

/// A replicated record: its bytes in the store and in gossip.
pub trait Record: Sized {
    fn to_bytes(&self) -> Vec<u8>;
    fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError>;
}

macro_rules! plain_record {
    ($($t:ty),*) => {$(
        impl Record for $t {
            fn to_bytes(&self) -> Vec<u8> {
                encode(self)
            }
            fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
                decode(bytes)
            }
        }
    )*};
}
plain_record!(
    crate::config::ResetRegister,
    crate::config::DecommissionRecord,
    crate::prices::PriceRecord
);

/// A trailing extension of a record: its first field is its layout number (1 today).
trait Extension: DeserializeOwned {
    fn layout(&self) -> u8;
}

/// A record's plain bytes and, when more bytes follow, its extension: one `E`, of layout
/// 1, and nothing after it (a newer layout is refused, not misread).
fn decode_extended<T: DeserializeOwned, E: Extension>(
    bytes: &[u8],
    what: &str,
) -> Result<(T, Option<E>), DecodeError> {
    let (rec, read): (T, usize) = bincode::serde::decode_from_slice(bytes, config())
        .map_err(|e| DecodeError(e.to_string()))?;
    if read == bytes.len() {
        return Ok((rec, None));
    }
    let ext: E = decode(&bytes[read..])?;
    if ext.layout() != 1 {
        return Err(DecodeError(format!(
            "{what} extension layout {} is from a newer tally",
            ext.layout()
        )));
    }
    Ok((rec, Some(ext)))
}

/// The access rules of an entity record, after its plain bytes (only when not the
/// default, so entities without rules keep their old bytes).
#[derive(serde::Serialize, serde::Deserialize)]
struct EntityExtension {
    /// 1: this layout. Newer layouts take new numbers.
    layout: u8,
    rules: crate::config::AccessRules,
}

impl Extension for EntityExtension {
    fn layout(&self) -> u8 {
        self.layout
    }
}

impl Record for crate::config::EntityRecord {
    fn to_bytes(&self) -> Vec<u8> {
        let mut out = encode(self);
        if self.parents.is_some() && !self.rules.is_default() {
            out.extend(encode(&EntityExtension {
                layout: 1,
                rules: self.rules.clone(),
            }));
        }
        out
    }

    fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        let (mut rec, ext) = decode_extended::<Self, EntityExtension>(bytes, "entity")?;
        if let Some(ext) = ext {
            if rec.parents.is_none() {
                return Err(DecodeError("a tombstone with access rules".into()));
            }
            rec.rules = ext.rules;
        }
        Ok(rec)
    }
}

/// The hard-mode part of a limit record, after its plain bytes.
#[derive(serde::Serialize, serde::Deserialize)]
struct LimitExtension {
    /// 1: this layout. Newer layouts take new numbers.
    layout: u8,
    mode: crate::config::Mode,
    members: Vec<crate::config::Member>,
}

impl Extension for LimitExtension {
    fn layout(&self) -> u8 {
        self.layout
    }
}

impl Record for crate::config::LimitRecord {
    fn to_bytes(&self) -> Vec<u8> {
        let mut out = encode(self);
        if let Some(spec) = self
            .spec
            .as_ref()
            .filter(|s| s.input.mode != crate::config::Mode::Soft || !s.input.members.is_empty())
        {
            out.extend(encode(&LimitExtension {
                layout: 1,
                mode: spec.input.mode,
                members: spec.input.members.clone(),
            }));
        }
        out
    }

    fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        let (mut rec, ext) = decode_extended::<Self, LimitExtension>(bytes, "limit")?;
        if let Some(ext) = ext {
            let spec = rec
                .spec
                .as_mut()
                .ok_or_else(|| DecodeError("a tombstone with hard-mode fields".into()))?;
            spec.input.mode = ext.mode;
            spec.input.members = ext.members;
        }
        Ok(rec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{
        EntityRecord, LimitInput, LimitRecord, LimitSpec, Member, Mode, ResetRegister,
    };
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
                    input: LimitInput::soft(scope, Metric::Tokens, max, "3M".parse().unwrap(), true, "Europe/Berlin"),
                    anchor_ms: anchor,
                    spec_gen: Hlc(hlc / 2),
                }),
            };
            let bytes = rec.to_bytes();
            // A soft limit's bytes are the plain encoding, as before hard mode.
            prop_assert_eq!(&bytes, &encode(&rec));
            prop_assert_eq!(LimitRecord::from_bytes(&bytes).unwrap(), rec.clone());
            prop_assert!(LimitRecord::from_bytes(&bytes[..bytes.len() - 1]).is_err());
            // Hard: the extension round-trips, and a reader of the plain form refuses it.
            if let Some(spec) = &rec.spec {
                let mut hard = rec.clone();
                let input = &mut hard.spec.as_mut().unwrap().input;
                input.mode = Mode::Hard;
                input.members = (0..(max % 5 + 1)).map(|i| Member { node: format!("n{i}"), weight: (i as u32) + 1 }).collect();
                let bytes = hard.to_bytes();
                prop_assert_eq!(LimitRecord::from_bytes(&bytes).unwrap(), hard);
                prop_assert!(decode::<LimitRecord>(&bytes).is_err());
                prop_assert!(LimitRecord::from_bytes(&bytes[..bytes.len() - 1]).is_err());
                let _ = spec;
            }
        }

        #[test]
        fn entity_and_reset_round_trip(hlc in any::<u64>(), baseline in any::<u64>(), period in any::<i64>()) {
            let e = EntityRecord { dimension: "team".into(), value: "eng".into(), version: Version { hlc: Hlc(hlc), node: "n".into() }, parents: None, rules: Default::default() };
            prop_assert_eq!(decode::<EntityRecord>(&encode(&e)).unwrap(), e);
            let r = ResetRegister { spec_gen: Hlc(hlc), period, reset: Version { hlc: Hlc(hlc), node: "n".into() }, baseline };
            prop_assert_eq!(decode::<ResetRegister>(&encode(&r)).unwrap(), r);
        }
    }

    proptest! {
        #[test]
        fn entity_rules_round_trip(hlc in any::<u64>(), active in any::<bool>(), expires in proptest::option::of(any::<i64>()),
                                   allow in proptest::collection::btree_map("[a-z]{1,5}", proptest::collection::vec("[a-z0-9-]{1,8}", 1..4), 0..3),
                                   parents in proptest::collection::btree_map("[a-z]{1,5}", "[a-z0-9-]{1,8}", 0..3)) {
            let plain = EntityRecord { dimension: "virtual_key".into(), value: "vk-1".into(), version: Version { hlc: Hlc(hlc), node: "n".into() }, parents: Some(parents), rules: Default::default() };
            // Without rules: exactly the bytes of before rules existed.
            prop_assert_eq!(plain.to_bytes(), encode(&plain));
            prop_assert_eq!(EntityRecord::from_bytes(&plain.to_bytes()).unwrap(), plain.clone());
            let mut ruled = plain.clone();
            ruled.rules = crate::config::AccessRules { active, expires_at_ms: expires, allow };
            let bytes = ruled.to_bytes();
            prop_assert_eq!(EntityRecord::from_bytes(&bytes).unwrap(), ruled.clone());
            if !ruled.rules.is_default() {
                // A reader of the plain form (an older node) refuses it rather than drop the rules.
                prop_assert!(decode::<EntityRecord>(&bytes).is_err());
                prop_assert!(EntityRecord::from_bytes(&bytes[..bytes.len() - 1]).is_err());
            }
        }

        #[test]
        fn price_records_round_trip(hlc in any::<u64>(), p in proptest::array::uniform5(any::<u64>()), some in any::<bool>(), tomb in any::<bool>()) {
            let r = crate::prices::PriceRecord {
                model: "openai/gpt-4o".into(),
                version: Version { hlc: Hlc(hlc), node: "n".into() },
                price: (!tomb).then_some(crate::prices::Price { input: p[0], output: p[1], cache_read: some.then_some(p[2]), cache_creation: None, reasoning: some.then_some(p[4]) }),
            };
            prop_assert_eq!(crate::prices::PriceRecord::from_bytes(&r.to_bytes()).unwrap(), r.clone());
        }
    }
}
