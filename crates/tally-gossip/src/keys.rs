//! Gossip keys: what each key in a node's chitchat state means, as text.
//!
//! | key                                  | value (before sealing)           | owner            |
//! |--------------------------------------|----------------------------------|------------------|
//! | `s/{limit}/{period}/{reset}`         | own slot, decimal u64            | the origin node  |
//! | `r/{origin}/{limit}/{period}/{reset}`| relayed slot of a departed node  | any relaying node|
//! | `l/{limit}`                          | `LimitRecord`                    | any node         |
//! | `x/{limit}`                          | `ResetRegister`                  | any node         |
//! | `e/{dimension}/{value}`              | `EntityRecord`                   | any node         |
//! | `h`                                  | publisher's wall clock, ms       | the publisher    |
//! | `g/{limit}/{period}/{reset}/{to}`    | rights granted to `to`, total u64| the grantor      |
//! | `w/{limit}/{period}/{reset}`         | demand: `{donor} {want} {seq}`   | the asker        |
//! | `k/{node}`                           | `DecommissionRecord`             | any node         |
//! | `p/{model}`                          | `PriceRecord`                    | any node         |
//!
//! Limit ids and node ids match `[A-Za-z0-9._:-]{1,128}` and dimensions `[a-z0-9_]{1,32}`,
//! so none contains `/`; an entity value may, so it comes last and keeps everything after
//! the dimension, and so may a model name (an attribute value), which is all of its key. `period` and `reset` are the [`Epoch`] fields in canonical decimal.
//!
//! [`GossipKey::parse`] accepts exactly the strings [`GossipKey::encode`] produces, so
//! `parse(k).map(|k| k.encode()) == Some(k)` for every accepted `k`: one key has one
//! spelling, and a peer cannot make two keys that a reader would merge as one.
//! This module knows nothing of values, MACs or chitchat.

use tally_core::Epoch;
use tally_core::units::{validate_attribute_value, validate_dimension, validate_id};

use crate::text::{parse_i64, parse_u64};

/// Own slot of the publishing node: `s/{limit}/{period}/{reset}`.
pub const SLOT_PREFIX: &str = "s/";
/// A slot of a departed origin, relayed by a live node: `r/{origin}/{limit}/{period}/{reset}`.
pub const RELAY_PREFIX: &str = "r/";
/// A limit record: `l/{limit}`.
pub const LIMIT_PREFIX: &str = "l/";
/// A limit's reset register: `x/{limit}`.
pub const RESET_PREFIX: &str = "x/";
/// An entity record: `e/{dimension}/{value}`.
pub const ENTITY_PREFIX: &str = "e/";
/// The publisher's hello: its wall clock when it last republished the key (readiness).
pub const HELLO_KEY: &str = "h";
/// Hard limits: the publisher's total grant of rights to a node in an epoch:
/// `g/{limit}/{period}/{reset}/{to}`.
pub const GRANT_PREFIX: &str = "g/";
/// Hard limits: the publisher asks a donor for rights: `w/{limit}/{period}/{reset}`.
pub const DEMAND_PREFIX: &str = "w/";
/// A decommission record: `k/{node}`.
pub const DECOMMISSION_PREFIX: &str = "k/";
/// A model's price record: `p/{model}`.
pub const PRICE_PREFIX: &str = "p/";

/// The meaning of one gossip key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum GossipKey {
    /// The publisher's own slot of `limit` in `epoch`.
    Slot { limit: String, epoch: Epoch },
    /// `origin`'s slot of `limit` in `epoch`, re-published by another node because
    /// `origin` is not live (DESIGN.md §4, departed nodes).
    Relay {
        origin: String,
        limit: String,
        epoch: Epoch,
    },
    /// The config record of a limit.
    Limit(String),
    /// The config record of an entity.
    Entity { dimension: String, value: String },
    /// The reset register of a limit.
    Reset(String),
    /// Republished by every node on a schedule with its wall clock. chitchat delivers a
    /// node's keys in version order, so whoever has merged a hello has merged everything
    /// its publisher published before it: that is how a node knows it caught up.
    Hello,
    /// Hard limits: the publisher's total grant of rights to `to` in an epoch.
    Grant {
        limit: String,
        epoch: Epoch,
        to: String,
    },
    /// Hard limits: the publisher's current request for rights in an epoch.
    Demand { limit: String, epoch: Epoch },
    /// The decommission record of a node.
    Decommission(String),
    /// The price record of a model.
    Price(String),
}

impl GossipKey {
    /// The key's text. Panics (in debug builds) if a field would not parse back: building
    /// a key from unvalidated input is a programmer error, not a runtime condition.
    pub fn encode(&self) -> String {
        let key = match self {
            GossipKey::Slot { limit, epoch } => {
                format!("{SLOT_PREFIX}{limit}/{}/{}", epoch.period, epoch.reset)
            }
            GossipKey::Relay {
                origin,
                limit,
                epoch,
            } => format!(
                "{RELAY_PREFIX}{origin}/{limit}/{}/{}",
                epoch.period, epoch.reset
            ),
            GossipKey::Limit(limit) => format!("{LIMIT_PREFIX}{limit}"),
            GossipKey::Reset(limit) => format!("{RESET_PREFIX}{limit}"),
            GossipKey::Entity { dimension, value } => {
                format!("{ENTITY_PREFIX}{dimension}/{value}")
            }
            GossipKey::Hello => HELLO_KEY.to_string(),
            GossipKey::Grant { limit, epoch, to } => format!(
                "{GRANT_PREFIX}{limit}/{}/{}/{to}",
                epoch.period, epoch.reset
            ),
            GossipKey::Demand { limit, epoch } => {
                format!("{DEMAND_PREFIX}{limit}/{}/{}", epoch.period, epoch.reset)
            }
            GossipKey::Decommission(node) => format!("{DECOMMISSION_PREFIX}{node}"),
            GossipKey::Price(model) => format!("{PRICE_PREFIX}{model}"),
        };
        debug_assert_eq!(
            GossipKey::parse(&key).as_ref(),
            Some(self),
            "gossip key built from invalid fields: {key:?}"
        );
        key
    }

    /// Parses a key; `None` for anything [`GossipKey::encode`] would not produce, including
    /// keys of other kinds (chitchat's own, or from a newer tally).
    pub fn parse(key: &str) -> Option<GossipKey> {
        if key == HELLO_KEY {
            Some(GossipKey::Hello)
        } else if let Some(rest) = key.strip_prefix(SLOT_PREFIX) {
            let [limit, period, reset] = split_exact(rest)?;
            Some(GossipKey::Slot {
                limit: id(limit)?,
                epoch: epoch(period, reset)?,
            })
        } else if let Some(rest) = key.strip_prefix(RELAY_PREFIX) {
            let [origin, limit, period, reset] = split_exact(rest)?;
            Some(GossipKey::Relay {
                origin: id(origin)?,
                limit: id(limit)?,
                epoch: epoch(period, reset)?,
            })
        } else if let Some(rest) = key.strip_prefix(GRANT_PREFIX) {
            let [limit, period, reset, to] = split_exact(rest)?;
            Some(GossipKey::Grant {
                limit: id(limit)?,
                epoch: epoch(period, reset)?,
                to: id(to)?,
            })
        } else if let Some(rest) = key.strip_prefix(DEMAND_PREFIX) {
            let [limit, period, reset] = split_exact(rest)?;
            Some(GossipKey::Demand {
                limit: id(limit)?,
                epoch: epoch(period, reset)?,
            })
        } else if let Some(rest) = key.strip_prefix(DECOMMISSION_PREFIX) {
            Some(GossipKey::Decommission(id(rest)?))
        } else if let Some(rest) = key.strip_prefix(PRICE_PREFIX) {
            validate_attribute_value(rest).ok()?;
            Some(GossipKey::Price(rest.to_string()))
        } else if let Some(rest) = key.strip_prefix(LIMIT_PREFIX) {
            Some(GossipKey::Limit(id(rest)?))
        } else if let Some(rest) = key.strip_prefix(RESET_PREFIX) {
            Some(GossipKey::Reset(id(rest)?))
        } else if let Some(rest) = key.strip_prefix(ENTITY_PREFIX) {
            let (dimension, value) = rest.split_once('/')?;
            validate_dimension(dimension).ok()?;
            validate_attribute_value(value).ok()?;
            Some(GossipKey::Entity {
                dimension: dimension.to_string(),
                value: value.to_string(),
            })
        } else {
            None
        }
    }
}

/// Splits on '/' into exactly `N` parts.
fn split_exact<const N: usize>(text: &str) -> Option<[&str; N]> {
    let mut parts = text.split('/');
    let out: [&str; N] = std::array::from_fn(|_| parts.next().unwrap_or(""));
    // A missing part shows up as "" above and is refused by the field validators; here
    // only surplus parts need refusing.
    parts.next().is_none().then_some(out)
}

fn id(text: &str) -> Option<String> {
    validate_id(text, "id").ok()?;
    Some(text.to_string())
}

fn epoch(period: &str, reset: &str) -> Option<Epoch> {
    Some(Epoch {
        period: parse_i64(period)?,
        reset: parse_u64(reset)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn slot(limit: &str, period: i64, reset: u64) -> GossipKey {
        GossipKey::Slot {
            limit: limit.into(),
            epoch: Epoch { period, reset },
        }
    }

    fn check(key: &str, want: Option<GossipKey>) {
        let got = GossipKey::parse(key);
        assert_eq!(got, want, "parse({key:?})");
        if let Some(k) = got {
            assert_eq!(k.encode(), key, "encode(parse({key:?}))");
        }
    }

    #[test]
    fn valid_keys() {
        check(
            "s/daily-eng/1700000000000/0",
            Some(slot("daily-eng", 1_700_000_000_000, 0)),
        );
        check("s/a/-86400000/42", Some(slot("a", -86_400_000, 42)));
        check(
            &format!("s/L.1:x_y/{}/{}", i64::MIN, u64::MAX),
            Some(slot("L.1:x_y", i64::MIN, u64::MAX)),
        );
        check(
            "r/node-2/lim/0/7",
            Some(GossipKey::Relay {
                origin: "node-2".into(),
                limit: "lim".into(),
                epoch: Epoch {
                    period: 0,
                    reset: 7,
                },
            }),
        );
        check("l/monthly", Some(GossipKey::Limit("monthly".into())));
        check("x/monthly", Some(GossipKey::Reset("monthly".into())));
        check("h", Some(GossipKey::Hello));
        check(
            "g/lim/5/1/node-2",
            Some(GossipKey::Grant {
                limit: "lim".into(),
                epoch: Epoch {
                    period: 5,
                    reset: 1,
                },
                to: "node-2".into(),
            }),
        );
        check(
            "w/lim/5/1",
            Some(GossipKey::Demand {
                limit: "lim".into(),
                epoch: Epoch {
                    period: 5,
                    reset: 1,
                },
            }),
        );
        check("k/node-2", Some(GossipKey::Decommission("node-2".into())));
        check(
            "p/openai/gpt-4o",
            Some(GossipKey::Price("openai/gpt-4o".into())),
        );
        check("p/", None);
        check(
            "e/team/eng",
            Some(GossipKey::Entity {
                dimension: "team".into(),
                value: "eng".into(),
            }),
        );
        check(
            "e/model/openai/gpt-4o:2024/",
            Some(GossipKey::Entity {
                dimension: "model".into(),
                value: "openai/gpt-4o:2024/".into(),
            }),
        );
        check(
            "e/user/ Zoë ~ 🦀 ",
            Some(GossipKey::Entity {
                dimension: "user".into(),
                value: " Zoë ~ 🦀 ".into(),
            }),
        );
    }

    #[test]
    fn malformed_keys() {
        let long_id = "a".repeat(129);
        let long_value = format!("e/team/{}", "v".repeat(129));
        let long_dim = format!("e/{}/v", "d".repeat(33));
        let cases: &[&str] = &[
            "",
            "h/",
            "hh",
            "H",
            "s",
            "s/",
            "S/a/0/0",
            "q/a/0/0",
            "/s/a/0/0",
            // slots: part counts
            "s/a",
            "s/a/0",
            "s/a/0/0/",
            "s/a/0/0/0",
            "g/a/0/0",
            "g/a/0/0/",
            "g/a/0/0/b/c",
            "w/a/0",
            "w/a/0/0/b",
            "k/",
            "k/a b",
            "s//0/0",
            "s/a//0",
            "s/a/0/",
            // slots: non-canonical or out-of-range numbers
            "s/a/+1/0",
            "s/a/01/0",
            "s/a/-0/0",
            "s/a/-01/0",
            "s/a/0/-1",
            "s/a/0/+1",
            "s/a/0/00",
            "s/a/0/1 ",
            "s/a/ 0/1",
            "s/a/0x10/1",
            "s/a/9223372036854775808/0",
            "s/a/0/18446744073709551616",
            // ids: forbidden characters and lengths
            "s/a b/0/0",
            "s/é/0/0",
            "s/a~b/0/0",
            "s/a\n/0/0",
            // relays
            "r/n/a/0",
            "r//a/0/0",
            "r/n//0/0",
            "r/n/a/0/0/0",
            "r/n!/a/0/0",
            // limits and resets
            "l/",
            "l/a/b",
            "l/a b",
            "x/",
            "x/a/",
            "x/a\u{0}",
            // entities
            "e/",
            "e/team",
            "e/team/",
            "e//eng",
            "e/Team/eng",
            "e/te-am/eng",
            "e/team/e\u{7}ng",
            "e/team/eng\n",
            "e/team/\u{85}",
        ];
        for key in cases {
            check(key, None);
        }
        for key in [
            format!("s/{long_id}/0/0"),
            format!("l/{long_id}"),
            format!("r/{long_id}/a/0/0"),
            long_value,
            long_dim,
        ] {
            check(&key, None);
        }
    }

    fn epoch_strategy() -> impl Strategy<Value = Epoch> {
        (any::<i64>(), any::<u64>()).prop_map(|(period, reset)| Epoch { period, reset })
    }

    const ID: &str = "[A-Za-z0-9._:-]{1,128}";
    const DIMENSION: &str = "[a-z0-9_]{1,32}";
    // Up to 32 chars of at most 4 bytes each keeps values within 128 bytes.
    const VALUE: &str = "[^\\p{Cc}]{1,32}|[a-z/]{1,128}";

    fn key_strategy() -> impl Strategy<Value = GossipKey> {
        prop_oneof![
            (ID, epoch_strategy()).prop_map(|(limit, epoch)| GossipKey::Slot { limit, epoch }),
            (ID, ID, epoch_strategy()).prop_map(|(origin, limit, epoch)| GossipKey::Relay {
                origin,
                limit,
                epoch
            }),
            ID.prop_map(GossipKey::Limit),
            ID.prop_map(GossipKey::Reset),
            (DIMENSION, VALUE)
                .prop_map(|(dimension, value)| GossipKey::Entity { dimension, value }),
            Just(GossipKey::Hello),
        ]
    }

    proptest! {
        #[test]
        fn keys_round_trip(key in key_strategy()) {
            let text = key.encode();
            prop_assert_eq!(GossipKey::parse(&text), Some(key));
        }

        #[test]
        fn parse_accepts_only_canonical_keys(text in "[srlxeq]/[a-z0/+~ -]{0,12}(/[-+0-9a]{0,4}){0,4}") {
            if let Some(key) = GossipKey::parse(&text) {
                prop_assert_eq!(key.encode(), text);
            }
        }

        #[test]
        fn parse_never_panics(text in "\\PC{0,40}|[\\x00-\\x7f]{0,40}") {
            if let Some(key) = GossipKey::parse(&text) {
                prop_assert_eq!(key.encode(), text);
            }
        }
    }
}
