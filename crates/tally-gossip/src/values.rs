//! Gossip payloads, the part of a value before the MAC tag (see [`crate::mac`]).
//!
//! - Slots (`s/…`, `r/…` keys): a `u64` in canonical decimal.
//! - Config (`l/…` → `LimitRecord`, `x/…` → `ResetRegister`, `e/…` → `EntityRecord`): the
//!   bytes of [`tally_core::codec::Record`] in base64url without padding. tally-core's codec
//!   stays the one place values become bytes; this module only makes them text.
//!
//! Every value must stay far below chitchat's ~64 KB message budget: a value that does not
//! fit stalls replication of the whole node state without an error. So encoders refuse
//! anything whose *sealed* form would exceed [`VALUE_BYTES_MAX`], and the caller refuses to
//! publish it, rather than discovering it on the wire. Decoders check the same bound before
//! doing any work. Whether a record matches the key it arrived under (same limit id, same
//! entity) is the caller's check, since only it knows both.

use tally_core::codec::Record;

use crate::mac::SEAL_OVERHEAD_BYTES;
use crate::text::{b64_decode, b64_encode, b64_len, parse_u64};

/// Largest sealed gossip value, payload and tag, in bytes.
pub const VALUE_BYTES_MAX: usize = 4096;
/// Largest payload that still seals within [`VALUE_BYTES_MAX`].
pub const PAYLOAD_BYTES_MAX: usize = VALUE_BYTES_MAX - SEAL_OVERHEAD_BYTES;

/// Why a payload was not produced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ValueError {
    #[error("gossip value would be {sealed_bytes} bytes sealed, more than the {max} allowed")]
    TooLarge { sealed_bytes: usize, max: usize },
}

/// A hello: the publisher's wall clock in Unix ms, canonical decimal.
pub fn encode_hello(wall_ms: i64) -> String {
    wall_ms.to_string()
}

/// Inverse of [`encode_hello`].
pub fn decode_hello(payload: &str) -> Option<i64> {
    crate::text::parse_i64(payload)
}

/// A slot value. Always fits: at most 20 digits.
pub fn encode_slot(value: u64) -> String {
    value.to_string()
}

/// Inverse of [`encode_slot`]; `None` for anything it would not produce.
pub fn decode_slot(payload: &str) -> Option<u64> {
    parse_u64(payload)
}

/// A demand for rights: the donor asked, how much, and a sequence number that is new
/// for every new request (a donor answers each sequence number once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Demand {
    pub donor: String,
    pub want: u64,
    pub seq: u64,
}

/// `{donor} {want} {seq}`; node ids contain no space.
pub fn encode_demand(d: &Demand) -> String {
    format!("{} {} {}", d.donor, d.want, d.seq)
}

/// Inverse of [`encode_demand`]; `None` for anything it would not produce.
pub fn decode_demand(payload: &str) -> Option<Demand> {
    let mut parts = payload.split(' ');
    let donor = parts.next()?;
    tally_core::units::validate_id(donor, "node id").ok()?;
    let want = parse_u64(parts.next()?)?;
    let seq = parse_u64(parts.next()?)?;
    if parts.next().is_some() {
        return None;
    }
    Some(Demand {
        donor: donor.to_string(),
        want,
        seq,
    })
}

/// A config record (`LimitRecord`, `EntityRecord`, `ResetRegister`) as a payload, or
/// [`ValueError::TooLarge`] if its sealed value would exceed [`VALUE_BYTES_MAX`].
pub fn encode_record<T: Record>(record: &T) -> Result<String, ValueError> {
    let bytes = record.to_bytes();
    let sealed_bytes = b64_len(bytes.len()) + SEAL_OVERHEAD_BYTES;
    if sealed_bytes > VALUE_BYTES_MAX {
        return Err(ValueError::TooLarge {
            sealed_bytes,
            max: VALUE_BYTES_MAX,
        });
    }
    let payload = b64_encode(&bytes);
    debug_assert!(payload.len() <= PAYLOAD_BYTES_MAX);
    Ok(payload)
}

/// Inverse of [`encode_record`]; `None` for an oversized payload, bad base64, or bytes
/// that are not exactly one `T`.
pub fn decode_record<T: Record>(payload: &str) -> Option<T> {
    if payload.len() > PAYLOAD_BYTES_MAX {
        return None;
    }
    let bytes = b64_decode(payload)?;
    T::from_bytes(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mac::{ClusterKey, open, seal};
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use tally_core::config::{EntityRecord, LimitInput, LimitRecord, LimitSpec, ResetRegister};
    use tally_core::hlc::{Hlc, Version};
    use tally_core::units::Metric;

    fn version(hlc: u64) -> Version {
        Version {
            hlc: Hlc(hlc),
            node: "node-1".into(),
        }
    }

    fn limit(id: String, scope: BTreeMap<String, String>, max: u64, hlc: u64) -> LimitRecord {
        LimitRecord {
            id,
            version: version(hlc),
            spec: Some(LimitSpec {
                input: LimitInput {
                    scope,
                    metric: Metric::Cost,
                    max,
                    period: "1M".parse().unwrap(),
                    calendar_aligned: true,
                    timezone: "Europe/Berlin".into(),
                    mode: Default::default(),
                    members: Vec::new(),
                },
                anchor_ms: -5,
                spec_gen: Hlc(hlc / 3),
            }),
        }
    }

    #[test]
    fn slot_table() {
        let cases: &[(&str, Option<u64>)] = &[
            ("0", Some(0)),
            ("1800", Some(1800)),
            ("18446744073709551615", Some(u64::MAX)),
            ("18446744073709551616", None),
            ("", None),
            ("01", None),
            ("+1", None),
            ("-1", None),
            ("1.0", None),
            ("1~x", None),
            ("AAAA", None),
        ];
        for (payload, want) in cases {
            assert_eq!(decode_slot(payload), *want, "{payload:?}");
        }
    }

    #[test]
    fn records_reject_garbage() {
        let rec = limit("lim".into(), BTreeMap::new(), 5, 9);
        let good = encode_record(&rec).unwrap();
        assert_eq!(decode_record::<LimitRecord>(&good), Some(rec));
        let cases: Vec<(&str, String)> = vec![
            ("empty", String::new()),
            ("not base64", "!!!!".into()),
            ("padding", format!("{good}==")),
            ("truncated", good[..good.len() - 4].into()),
            ("trailing bytes", format!("{good}AAAA")),
            ("decimal slot", "42".into()),
            ("oversized", "A".repeat(PAYLOAD_BYTES_MAX + 4)),
        ];
        for (what, payload) in cases {
            assert_eq!(decode_record::<LimitRecord>(&payload), None, "{what}");
        }
        // A record of one type is not accepted as another.
        let reset = ResetRegister {
            spec_gen: Hlc(1),
            period: 2,
            reset: version(3),
            baseline: 4,
        };
        let reset = encode_record(&reset).unwrap();
        assert_eq!(decode_record::<LimitRecord>(&reset), None);
    }

    #[test]
    fn oversized_records_are_refused() {
        // Attribute values are at most 128 bytes, but a record is not trusted to be small:
        // the bound is checked on the encoded size.
        let scope: BTreeMap<String, String> = (0..64)
            .map(|i| (format!("dim_{i}"), "v".repeat(128)))
            .collect();
        let rec = limit("big".into(), scope, 1, 1);
        match encode_record(&rec) {
            Err(ValueError::TooLarge { sealed_bytes, max }) => {
                assert_eq!(max, VALUE_BYTES_MAX);
                assert!(sealed_bytes > VALUE_BYTES_MAX);
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        // The boundary is exact: grow a record one byte at a time until it is refused.
        let mut last_ok = 0;
        for len in 3000..3200 {
            let e = EntityRecord {
                dimension: "team".into(),
                value: "v".repeat(len),
                version: version(1),
                parents: None,
                rules: Default::default(),
            };
            match encode_record(&e) {
                Ok(payload) => {
                    let sealed = seal(&ClusterKey::insecure(), "n", "e/team/v", &payload);
                    assert!(sealed.len() <= VALUE_BYTES_MAX);
                    last_ok = sealed.len();
                }
                Err(ValueError::TooLarge { sealed_bytes, .. }) => {
                    assert!(sealed_bytes > VALUE_BYTES_MAX);
                    assert!(
                        last_ok > VALUE_BYTES_MAX - 4,
                        "refused too early: {last_ok}"
                    );
                    return;
                }
            }
        }
        panic!("never refused");
    }

    fn arb_version() -> impl Strategy<Value = Version> {
        (any::<u64>(), "[A-Za-z0-9._:-]{1,128}").prop_map(|(hlc, node)| Version {
            hlc: Hlc(hlc),
            node,
        })
    }

    proptest! {
        #[test]
        fn slots_round_trip(v in any::<u64>()) {
            prop_assert_eq!(decode_slot(&encode_slot(v)), Some(v));
        }

        #[test]
        fn limits_round_trip(id in "[A-Za-z0-9._:-]{1,128}", max in any::<u64>(), hlc in any::<u64>(), tomb in any::<bool>(),
                             scope in proptest::collection::btree_map("[a-z0-9_]{1,32}", "[^\\p{Cc}]{1,32}", 0..8)) {
            let mut rec = limit(id, scope, max, hlc);
            if tomb {
                rec.spec = None;
            }
            let payload = encode_record(&rec).unwrap();
            prop_assert_eq!(decode_record::<LimitRecord>(&payload), Some(rec));
        }

        #[test]
        fn entities_and_resets_round_trip(dimension in "[a-z0-9_]{1,32}", value in "[^\\p{Cc}]{1,32}", v in arb_version(),
                                          parents in proptest::option::of(proptest::collection::btree_map("[a-z0-9_]{1,32}", "[a-z/:-]{1,128}", 0..8)),
                                          period in any::<i64>(), baseline in any::<u64>(), spec_gen in any::<u64>()) {
            let e = EntityRecord { dimension, value, version: v.clone(), parents, rules: Default::default() };
            let payload = encode_record(&e).unwrap();
            prop_assert_eq!(decode_record::<EntityRecord>(&payload), Some(e));
            let r = ResetRegister { spec_gen: Hlc(spec_gen), period, reset: v, baseline };
            let payload = encode_record(&r).unwrap();
            prop_assert_eq!(decode_record::<ResetRegister>(&payload), Some(r));
        }

        /// The whole pipeline a receiver runs: open the sealed value, then decode.
        #[test]
        fn sealed_records_round_trip(hlc in any::<u64>(), baseline in any::<u64>()) {
            let k = ClusterKey::new(b"sixteen byte key").unwrap();
            let r = ResetRegister { spec_gen: Hlc(hlc), period: -1, reset: version(hlc), baseline };
            let sealed = seal(&k, "node-1", "x/lim", &encode_record(&r).unwrap());
            prop_assert!(sealed.len() <= VALUE_BYTES_MAX);
            let payload = open(&k, "node-1", "x/lim", &sealed).unwrap();
            prop_assert_eq!(decode_record::<ResetRegister>(payload), Some(r));
        }

        #[test]
        fn garbage_never_panics(payload in "\\PC{0,64}") {
            let _ = decode_record::<LimitRecord>(&payload);
            let _ = decode_record::<EntityRecord>(&payload);
            let _ = decode_record::<ResetRegister>(&payload);
            if let Some(v) = decode_slot(&payload) {
                prop_assert_eq!(encode_slot(v), payload);
            }
        }
    }
}
