//! The HTTP wire schema of tally (docs/API.md): every request and reply body of the JSON
//! API as one serde type, used by the server's handlers, the `tally` client commands,
//! `tally-load` and the integration tests, and the OpenAPI 3.1 document generated from
//! them ([`openapi::document`], served at `GET /openapi.json` and committed as
//! `docs/openapi.json`).
//!
//! Field order is the order the server writes: replies that were built as `serde_json`
//! maps before this crate existed keep their (alphabetical) key order, so the bytes on the
//! wire did not change. Request bodies refuse unknown fields; the server reads every body
//! as a JSON object only (a derived struct would also take an array of its fields).
//!
//! The check and usage request bodies borrow their attributes from the request bytes
//! ([`Attributes`]), so the server's hot path allocates nothing for them; clients build
//! them from owned or borrowed strings alike.

pub mod openapi;

use std::borrow::Cow;
use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Most attributes (or scope / parents entries) one body may carry.
pub const ATTRIBUTES_MAX: usize = 8;
/// Largest `ttl_s` of a check (the node caps it lower, `--reservation-ttl-max-secs`).
pub const TTL_S_MAX: u64 = 1_000_000_000;
/// Most records in one `POST /v1/usage/batch`.
pub const BATCH_RECORDS_MAX: usize = 1000;
/// Most denials `GET /v1/denials` returns (the node's ring).
pub const DENIALS_MAX: usize = 512;
/// Most epochs one `GET /v1/limits/{id}/history` returns.
pub const HISTORY_EPOCHS_MAX: usize = 1000;

// ----- errors --------------------------------------------------------------------------

/// Every error reply: `{"error": {"code": ..., "message": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorReply {
    pub error: ErrorBody,
}

/// The code (`snake_case`, stable) and a message for a human (not stable).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorBody {
    /// `invalid_argument` (400), `unauthenticated` (401), `permission_denied` (403),
    /// `not_found` (404), `request_timeout` (408), `conflict` (409), `payload_too_large`
    /// (413) or `unavailable` (503).
    pub code: String,
    #[serde(default)]
    pub message: String,
}

impl ErrorReply {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> ErrorReply {
        ErrorReply {
            error: ErrorBody {
                code: code.into(),
                message: message.into(),
            },
        }
    }
}

// ----- amounts -------------------------------------------------------------------------

/// An amount of a limit's metric: USD (a JSON number with a fraction, `12.5`, `0.0`) for
/// `cost`, a whole count (`1800`) for `tokens` and `requests`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Amount {
    Count(u64),
    Usd(f64),
}

impl Amount {
    /// An amount from the node's integer units: micro-USD for cost, a count otherwise.
    pub fn of(is_cost: bool, units: u64) -> Amount {
        if is_cost {
            Amount::Usd(units as f64 / 1e6)
        } else {
            Amount::Count(units)
        }
    }

    pub fn as_f64(self) -> f64 {
        match self {
            Amount::Count(n) => n as f64,
            Amount::Usd(x) => x,
        }
    }
}

impl Serialize for Amount {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match *self {
            Amount::Count(n) => s.serialize_u64(n),
            Amount::Usd(x) => s.serialize_f64(x),
        }
    }
}

impl<'de> Deserialize<'de> for Amount {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Amount, D::Error> {
        struct Visit;
        impl serde::de::Visitor<'_> for Visit {
            type Value = Amount;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a non-negative number")
            }
            fn visit_u64<E>(self, v: u64) -> Result<Amount, E> {
                Ok(Amount::Count(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Amount, E> {
                u64::try_from(v)
                    .map(Amount::Count)
                    .map_err(|_| E::custom("an amount is never negative"))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Amount, E> {
                Ok(Amount::Usd(v))
            }
        }
        d.deserialize_any(Visit)
    }
}

impl JsonSchema for Amount {
    fn schema_name() -> Cow<'static, str> {
        "Amount".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "number",
            "minimum": 0,
            "description": "USD for a cost limit (a number with a fraction, e.g. 12.5 or 0.0); a whole count for tokens and requests."
        })
    }
}

// ----- attributes ----------------------------------------------------------------------

/// Request attributes (`{"virtual_key": "vk-1", ...}`), at most [`ATTRIBUTES_MAX`],
/// borrowed from the body where they need no unescaping. A repeated name keeps its last
/// value, as a map would; a map past the cap is refused at its first extra name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attributes<'a>(pub Vec<(Cow<'a, str>, Cow<'a, str>)>);

impl<'a> Attributes<'a> {
    pub fn pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (&**k, &**v))
    }

    pub fn into_owned(self) -> Vec<(String, String)> {
        self.0
            .into_iter()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    }
}

impl<'a, K: Into<Cow<'a, str>>, V: Into<Cow<'a, str>>> FromIterator<(K, V)> for Attributes<'a> {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(it: I) -> Self {
        Attributes(it.into_iter().map(|(k, v)| (k.into(), v.into())).collect())
    }
}

impl Serialize for Attributes<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.pairs())
    }
}

#[derive(Deserialize)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Attributes<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visit<'a> {
            type Value = Attributes<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map of attribute names to string values")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut m: M,
            ) -> Result<Self::Value, M::Error> {
                let mut out: Vec<(Cow<'a, str>, Cow<'a, str>)> = Vec::with_capacity(ATTRIBUTES_MAX);
                while let Some((Text(k), Text(v))) = m.next_entry::<Text<'a>, Text<'a>>()? {
                    if let Some(slot) = out.iter_mut().find(|(ok, _)| *ok == k) {
                        slot.1 = v;
                    } else if out.len() == ATTRIBUTES_MAX {
                        // Refused at the first name past the cap, so a huge map costs no
                        // more than its first few entries (and the search stays tiny).
                        return Err(serde::de::Error::custom(format_args!(
                            "attributes has more than {ATTRIBUTES_MAX} entries; at most {ATTRIBUTES_MAX} are allowed"
                        )));
                    } else {
                        out.push((k, v));
                    }
                }
                Ok(Attributes(out))
            }
        }
        d.deserialize_map(Visit(std::marker::PhantomData))
    }
}

impl JsonSchema for Attributes<'_> {
    fn schema_name() -> Cow<'static, str> {
        "Attributes".into()
    }
    fn json_schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
        scope_schema(g)
    }
}

/// A map of dimension names to values (attributes, a limit's scope, an entity's parents).
pub type Scope = BTreeMap<String, String>;

/// The schema of a scope-like map: names `[a-z0-9_]{1,32}`, values 1 to 128 bytes without
/// control characters, at most [`ATTRIBUTES_MAX`] entries.
pub fn scope_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "maxProperties": ATTRIBUTES_MAX,
        "propertyNames": {"pattern": NAME_PATTERN},
        "additionalProperties": {"$ref": "#/components/schemas/AttributeValue"},
    })
}

/// Dimension (attribute) names.
pub const NAME_PATTERN: &str = "^[a-z0-9_]{1,32}$";
/// Limit ids and record ids.
pub const ID_PATTERN: &str = "^[A-Za-z0-9._:-]{1,128}$";

/// Reads a scope-like map of at most [`ATTRIBUTES_MAX`] entries, refused as soon as it
/// grows past the cap: a body of 1 MiB can hold ~80 000 names, and reading them all before
/// refusing costs far more than the request is worth.
pub fn bounded_scope<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Scope, D::Error> {
    struct Visit;
    impl<'de> serde::de::Visitor<'de> for Visit {
        type Value = Scope;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a map of dimension names to string values")
        }
        fn visit_map<M: serde::de::MapAccess<'de>>(self, mut m: M) -> Result<Scope, M::Error> {
            let mut out = Scope::new();
            while let Some((k, v)) = m.next_entry::<String, String>()? {
                out.insert(k, v);
                if out.len() > ATTRIBUTES_MAX {
                    return Err(serde::de::Error::custom(format_args!(
                        "more than {ATTRIBUTES_MAX} entries; at most {ATTRIBUTES_MAX} are allowed"
                    )));
                }
            }
            Ok(out)
        }
    }
    d.deserialize_map(Visit)
}

/// A JSON object read as `T`. serde's derived struct visitors also take a JSON array as
/// the fields in declaration order, so `["id-1",{},0.5,5,1,null]` would be read as a usage
/// record. Bodies are objects only: `T` is read through `deserialize_map`, which refuses
/// anything but an object before looking inside it.
pub struct Obj<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Obj<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Visit<T> {
            type Value = T;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(self, m: M) -> Result<T, M::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(m))
            }
        }
        d.deserialize_map(Visit(std::marker::PhantomData)).map(Obj)
    }
}

fn objects<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Vec<T>, D::Error> {
    Vec::<Obj<T>>::deserialize(d).map(|v| v.into_iter().map(|o| o.0).collect())
}

/// A whole number: JSON Schema's `integer` is any number without a fraction, so `650.0`
/// is read as 650. Anything else is refused with serde's own message.
fn whole<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    struct Visit;
    impl<'de> serde::de::Visitor<'de> for Visit {
        type Value = Option<u64>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("u64")
        }
        fn visit_none<E>(self) -> Result<Option<u64>, E> {
            Ok(None)
        }
        fn visit_unit<E>(self) -> Result<Option<u64>, E> {
            Ok(None)
        }
        fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Option<u64>, D::Error> {
            d.deserialize_any(self)
        }
        fn visit_u64<E>(self, v: u64) -> Result<Option<u64>, E> {
            Ok(Some(v))
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Option<u64>, E> {
            u64::try_from(v)
                .map(Some)
                .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Option<u64>, E> {
            // Below 2^64 and whole: exact as a u64.
            if v.fract() == 0.0 && (0.0..18_446_744_073_709_551_616.0).contains(&v) {
                Ok(Some(v as u64))
            } else {
                Err(E::invalid_type(serde::de::Unexpected::Float(v), &self))
            }
        }
    }
    d.deserialize_option(Visit)
}

// ----- limits --------------------------------------------------------------------------

/// `PUT /v1/limits/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitRequest {
    /// The attributes a request must carry for the limit to apply (`{}`: every request).
    #[serde(default, deserialize_with = "bounded_scope")]
    #[schemars(schema_with = "scope_schema")]
    pub scope: Scope,
    /// `cost`, `tokens` or `requests`.
    #[schemars(schema_with = "metric_schema")]
    pub metric: String,
    /// USD for cost (rounded to the micro-USD, at most 1e9), a whole count otherwise (at
    /// most 1e15).
    #[schemars(schema_with = "amount_in_schema")]
    pub max: serde_json::Number,
    /// `<n><s|m|h|d|w|M|Y>` or `never`.
    #[schemars(schema_with = "period_schema")]
    pub period: String,
    /// Periods start at calendar boundaries of `timezone` (midnight, the 1st of the month).
    #[serde(default)]
    pub calendar_aligned: bool,
    /// An IANA time zone name (default `UTC`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// `soft` (default: each node enforces on what it knows) or `hard` (never overspent,
    /// even across a partition: an escrow of rights).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "mode_schema")]
    pub mode: Option<String>,
    /// Hard limits: the nodes that hold rights, by weight (default: the live nodes of the
    /// fleet, weight 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub members: Option<Vec<MemberSpec>>,
}

/// A member of a hard limit: a node id, or a node id with a weight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum MemberSpec {
    /// A node id (weight 1).
    Node(String),
    Weighted(MemberWeight),
}

/// A member and its weight (its share of `max` is proportional to it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MemberWeight {
    #[schemars(regex(pattern = "^[A-Za-z0-9._:-]{1,128}$"))]
    pub node: String,
    #[schemars(range(min = 1, max = 1_000_000))]
    pub weight: u32,
}

/// One node's rights in a hard limit's current period.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RightsView {
    /// Its share of `max` (less a set-usage baseline).
    pub allocated: Amount,
    /// An operator decommissioned it: its unspent rights passed to its successor.
    pub decommissioned: bool,
    /// What it may still spend (negative: debt), rights adopted from decommissioned
    /// nodes included.
    pub free: Balance,
    pub given: Amount,
    pub received: Amount,
    pub used: Amount,
}

/// A signed amount: USD for cost, a whole count otherwise.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Balance {
    Count(i64),
    Usd(f64),
}

impl Balance {
    /// From the node's integer units (micro-USD for cost).
    pub fn of(is_cost: bool, units: i64) -> Balance {
        if is_cost {
            Balance::Usd(units as f64 / 1e6)
        } else {
            Balance::Count(units)
        }
    }
}

impl Serialize for Balance {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match *self {
            Balance::Count(n) => s.serialize_i64(n),
            Balance::Usd(x) => s.serialize_f64(x),
        }
    }
}

impl<'de> Deserialize<'de> for Balance {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Balance, D::Error> {
        struct Visit;
        impl serde::de::Visitor<'_> for Visit {
            type Value = Balance;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Balance, E> {
                i64::try_from(v)
                    .map(Balance::Count)
                    .map_err(|_| E::custom("too large"))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Balance, E> {
                Ok(Balance::Count(v))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Balance, E> {
                Ok(Balance::Usd(v))
            }
        }
        d.deserialize_any(Visit)
    }
}

impl JsonSchema for Balance {
    fn schema_name() -> Cow<'static, str> {
        "Balance".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "number",
            "description": "USD for a cost limit, a whole count otherwise; negative is debt."
        })
    }
}

/// A limit as `GET /v1/limits/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LimitView {
    pub calendar_aligned: bool,
    pub id: String,
    pub max: Amount,
    /// Hard limits only: who holds rights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members: Option<Vec<MemberWeight>>,
    #[schemars(schema_with = "metric_schema")]
    pub metric: String,
    /// Hard limits only: `hard` (soft views have no `mode`, as before hard mode existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "mode_schema")]
    pub mode: Option<String>,
    /// Usage per node id (this epoch).
    pub nodes: BTreeMap<String, Amount>,
    pub period: String,
    /// RFC 3339; `null` for a `never` period.
    pub period_start: Option<String>,
    pub remaining: Amount,
    /// RFC 3339; `null` for a `never` period.
    pub resets_at: Option<String>,
    /// Hard limits only: every node's rights this period, by node id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rights: Option<BTreeMap<String, RightsView>>,
    pub scope: Scope,
    pub timezone: String,
    pub used: Amount,
}

/// `GET /v1/limits`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LimitList {
    pub limits: Vec<LimitView>,
}

/// `DELETE` replies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Deleted {
    pub deleted: bool,
}

/// `POST /v1/limits/{id}/reset`: `{}` starts a new epoch at zero, `{"used": x}` at `x`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ResetRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "amount_in_schema")]
    pub used: Option<serde_json::Number>,
}

/// `GET /v1/limits/{id}/history`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct HistoryReply {
    pub id: String,
    #[schemars(schema_with = "metric_schema")]
    pub metric: String,
    /// Newest first.
    pub epochs: Vec<HistoryEpoch>,
}

/// One epoch of a limit: a period, or the part of one after a reset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct HistoryEpoch {
    /// `null` for a `never` period.
    pub period_start: Option<String>,
    /// When the period ended (or, for the current epoch, `resets_at`); `null` for `never`.
    pub period_end: Option<String>,
    /// The epoch's reset id (a decimal string: it does not fit a JSON number exactly).
    pub reset: String,
    /// The epoch checks count against now.
    pub current: bool,
    /// `baseline + Σ nodes`.
    pub used: Amount,
    /// Usage the epoch started with (a set-usage reset).
    pub baseline: Amount,
    pub nodes: BTreeMap<String, Amount>,
}

// ----- entities ------------------------------------------------------------------------

/// `PUT /v1/entities/{dimension}/{value}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EntityRequest {
    /// The entity's parents: a request carrying this entity's attribute also carries these.
    #[serde(default, deserialize_with = "bounded_scope")]
    #[schemars(schema_with = "scope_schema")]
    pub parents: Scope,
    /// Access rule: `false` denies every check that reaches this entity (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<bool>,
    /// Access rule: from this instant (RFC 3339) on, every check reaching it is denied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "time_schema")]
    pub expires_at: Option<String>,
    /// Access rule: per attribute, the values a request reaching this entity may have (a
    /// request without the attribute is denied too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "allow_schema")]
    pub allow: Option<BTreeMap<String, Vec<String>>>,
}

/// An entity. The access rules are shown only when set (`active` only when false).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct EntityView {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<BTreeMap<String, Vec<String>>>,
    pub dimension: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    pub parents: Scope,
    pub value: String,
}

// ----- prices --------------------------------------------------------------------------

/// `PUT /v1/prices/{model}`: USD per million tokens, kept as integer femto-USD per token
/// (9 decimal places; finer ones are rounded).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PriceRequest {
    /// Input tokens (neither read from nor written to a prompt cache).
    #[schemars(range(min = 0.0, max = 1e6))]
    pub input: f64,
    /// Output tokens (not reasoning).
    #[schemars(range(min = 0.0, max = 1e6))]
    pub output: f64,
    /// Input tokens read from a prompt cache (default: the input price).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1e6))]
    pub cache_read: Option<f64>,
    /// Input tokens written to a prompt cache (default: the input price).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1e6))]
    pub cache_creation: Option<f64>,
    /// Reasoning tokens (default: the output price).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1e6))]
    pub reasoning: Option<f64>,
}

/// One price of `POST /v1/prices/batch`: the model and its prices.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PriceEntry {
    #[schemars(schema_with = "attribute_value")]
    pub model: String,
    #[schemars(range(min = 0.0, max = 1e6))]
    pub input: f64,
    #[schemars(range(min = 0.0, max = 1e6))]
    pub output: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1e6))]
    pub cache_read: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1e6))]
    pub cache_creation: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1e6))]
    pub reasoning: Option<f64>,
}

/// `POST /v1/prices/batch`: validated all or nothing, written in one durable commit.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PriceBatchRequest {
    #[serde(deserialize_with = "objects")]
    #[schemars(length(max = 1000))]
    pub prices: Vec<PriceEntry>,
}

/// The reply of `POST /v1/prices/batch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PricesWritten {
    pub written: usize,
}

/// A model's prices, USD per million tokens; `null`: priced as input (cache kinds) or
/// output (reasoning).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PriceView {
    pub model: String,
    pub input: f64,
    pub output: f64,
    pub cache_read: Option<f64>,
    pub cache_creation: Option<f64>,
    pub reasoning: Option<f64>,
}

/// `GET /v1/prices`, by model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PriceList {
    pub prices: Vec<PriceView>,
}

/// The five prices a request was charged at (USD per million tokens), fallbacks resolved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ChargedPrices {
    pub input: f64,
    pub output: f64,
    pub cache_read: f64,
    pub cache_creation: f64,
    pub reasoning: f64,
}

/// How a request given by token counts was priced (check and usage replies).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Priced {
    /// The `model` attribute whose price applied.
    pub model: String,
    /// What limits count, USD: the exact cost rounded up to the micro-USD.
    pub cost: f64,
    /// The exact cost, USD, as a decimal string.
    pub exact_usd: String,
    pub prices: ChargedPrices,
}

/// A check denied by an access rule of an entity the request reaches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AccessDenied {
    pub dimension: String,
    pub value: String,
    /// `inactive`, `expired` or `allow`.
    #[schemars(schema_with = "rule_schema")]
    pub rule: String,
    /// `expired`: the instant it expired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// `allow`: the attribute whose value is not allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attribute: Option<String>,
    /// `allow`: the request's value of it (`null` when it has none).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "serde_with_null"
    )]
    #[schemars(schema_with = "nullable_string")]
    pub given: Option<Option<String>>,
}

// ----- check and usage -----------------------------------------------------------------

/// `POST /v1/check`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckRequest<'a> {
    #[serde(default, borrow)]
    pub attributes: Attributes<'a>,
    /// Estimated USD (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1e9))]
    pub cost: Option<f64>,
    /// Estimated tokens (default 0).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "whole"
    )]
    #[schemars(range(max = 1_000_000_000_000_000_u64))]
    pub tokens: Option<u64>,
    /// Tokens by kind (disjoint: input excludes cached reads and cache writes, output
    /// excludes reasoning). With any of them and no `cost`, the node prices the request
    /// from the price of its `model` attribute; `tokens`, when absent, is their sum.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "whole"
    )]
    #[schemars(range(max = 1_000_000_000_000_000_u64))]
    pub input_tokens: Option<u64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "whole"
    )]
    #[schemars(range(max = 1_000_000_000_000_000_u64))]
    pub output_tokens: Option<u64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "whole"
    )]
    #[schemars(range(max = 1_000_000_000_000_000_u64))]
    pub cache_read_tokens: Option<u64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "whole"
    )]
    #[schemars(range(max = 1_000_000_000_000_000_u64))]
    pub cache_creation_tokens: Option<u64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "whole"
    )]
    #[schemars(range(max = 1_000_000_000_000_000_u64))]
    pub reasoning_tokens: Option<u64>,
    /// Hold the estimate on every applicable hard limit when allowed (a reservation).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reserve: bool,
    /// Lifetime of the reservation in seconds (default 120, capped by the node's
    /// `--reservation-ttl-max-secs`); only with `reserve`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "whole"
    )]
    #[schemars(range(min = 1, max = 1_000_000_000))]
    pub ttl_s: Option<u64>,
}

/// One applicable limit in a check or usage reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LimitStatus {
    pub id: String,
    #[schemars(schema_with = "metric_schema")]
    pub metric: String,
    pub used: Amount,
    pub max: Amount,
    pub remaining: Amount,
    /// RFC 3339; `null` for a limit that never resets.
    pub resets_at: Option<String>,
    /// Hard limits only (soft entries have exactly the six fields above): `hard`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "mode_schema")]
    pub mode: Option<String>,
    /// Hard limits only: rights this node may still spend before this request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free: Option<Balance>,
    /// Hard limits only: why it denies: `null`, `budget` (spent) or `rights` (this node
    /// holds too few rights now).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "serde_with_null"
    )]
    #[schemars(schema_with = "reason_schema")]
    pub reason: Option<Option<String>>,
    /// Hard limits denied for `rights`: when to ask again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

/// `Option<Option<T>>` as absent / `null` / a value.
mod serde_with_null {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer, T: Serialize>(
        v: &Option<Option<T>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match v {
            Some(inner) => inner.serialize(s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
        d: D,
    ) -> Result<Option<Option<T>>, D::Error> {
        Option::<T>::deserialize(d).map(Some)
    }
}

/// An open reservation: the check's estimate is held on the hard limits that applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Reservation {
    /// Settle it with `POST /v1/usage` (`"reservation"`) or release it with `DELETE
    /// /v1/reservations/{id}`, on this node.
    pub id: String,
    /// The node that holds it.
    pub node: String,
    /// RFC 3339: it is released then if not settled.
    pub expires_at: String,
}

/// The reply of `POST /v1/check` (a denial is an answer, not an error).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CheckReply {
    pub allowed: bool,
    /// The node has not heard from a live peer lately: counts may miss recent usage.
    pub stale: bool,
    pub denied_by: Vec<String>,
    /// Every applicable limit.
    pub limits: Vec<LimitStatus>,
    /// The access rule the request breaks (then `allowed` is false; absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<AccessDenied>,
    /// With `reserve`, when allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservation: Option<Reservation>,
    /// When the estimate was priced from token counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priced: Option<Priced>,
}

/// `POST /v1/usage`, and one record of a batch.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UsageRequest<'a> {
    /// The idempotency key.
    #[schemars(regex(pattern = "^[A-Za-z0-9._:-]{1,128}$"))]
    pub id: String,
    #[serde(default, borrow)]
    pub attributes: Attributes<'a>,
    /// USD (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1e9))]
    pub cost: Option<f64>,
    /// Tokens (default 0).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "whole"
    )]
    #[schemars(range(max = 1_000_000_000_000_000_u64))]
    pub tokens: Option<u64>,
    /// Tokens by kind (disjoint: input excludes cached reads and cache writes, output
    /// excludes reasoning). With any of them and no `cost`, the node prices the request
    /// from the price of its `model` attribute; `tokens`, when absent, is their sum.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "whole"
    )]
    #[schemars(range(max = 1_000_000_000_000_000_u64))]
    pub input_tokens: Option<u64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "whole"
    )]
    #[schemars(range(max = 1_000_000_000_000_000_u64))]
    pub output_tokens: Option<u64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "whole"
    )]
    #[schemars(range(max = 1_000_000_000_000_000_u64))]
    pub cache_read_tokens: Option<u64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "whole"
    )]
    #[schemars(range(max = 1_000_000_000_000_000_u64))]
    pub cache_creation_tokens: Option<u64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "whole"
    )]
    #[schemars(range(max = 1_000_000_000_000_000_u64))]
    pub reasoning_tokens: Option<u64>,
    /// Requests (default 1).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "whole"
    )]
    #[schemars(range(max = 1_000_000_000_000_000_u64))]
    pub requests: Option<u64>,
    /// When it happened, RFC 3339 (default now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "time_schema")]
    pub at: Option<String>,
    /// The reservation (from a check with `reserve`) this usage settles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^[A-Za-z0-9._:~-]{1,200}$"))]
    pub reservation: Option<String>,
}

/// The reply of `POST /v1/usage`, once the record is durable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct UsageReply {
    /// `false`: a record with this id was already applied on this node (nothing changed).
    pub applied: bool,
    pub limits: Vec<LimitStatus>,
    /// Hard limits this record spent beyond the rights the node held, by limit id (absent
    /// when none): usage is always counted; this is the only way past a hard `max`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overrun: Option<BTreeMap<String, Amount>>,
    /// When the record was priced from token counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priced: Option<Priced>,
}

/// `POST /v1/usage/batch`: validated all or nothing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest<'a> {
    #[serde(borrow, deserialize_with = "objects")]
    #[schemars(length(max = 1000))]
    pub records: Vec<UsageRequest<'a>>,
}

/// The reply of `POST /v1/usage/batch`, in the order of the records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct BatchReply {
    pub results: Vec<BatchResult>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct BatchResult {
    pub applied: bool,
    pub id: String,
    /// As in [`UsageReply::overrun`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overrun: Option<BTreeMap<String, Amount>>,
    /// As in [`UsageReply::priced`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priced: Option<Priced>,
}

/// `DELETE /v1/reservations/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Released {
    pub released: bool,
}

/// `POST /v1/nodes/{id}/decommission`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DecommissionRequest {
    /// The node that takes over its unspent rights (default: the node asked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^[A-Za-z0-9._:-]{1,128}$"))]
    pub successor: Option<String>,
}

/// The reply of `POST /v1/nodes/{id}/decommission`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Decommissioned {
    pub decommissioned: bool,
    pub node: String,
    pub successor: String,
}

// ----- operations ----------------------------------------------------------------------

/// `GET /healthz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Health {
    /// Always `ok`.
    pub status: String,
}

/// `GET /readyz` when ready (503 with the error shape otherwise).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Ready {
    pub ready: bool,
}

/// `GET /v1/cluster`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ClusterReply {
    /// This node's id.
    pub node_id: String,
    pub nodes: Vec<Member>,
}

/// A node of the cluster as this node's gossip sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Member {
    /// `null` on a node started without gossip.
    pub gossip_addr: Option<String>,
    /// Start time of the node's process (Unix ms): a restart is a new generation.
    pub generation: u64,
    /// Live, and its values pass this cluster's MAC.
    pub live: bool,
    /// How long ago a value from it was accepted, where known.
    pub newest_value_age_ms: Option<u64>,
    pub node_id: String,
}

/// `GET /v1/whoami`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct WhoAmI {
    /// `admin` or `client`.
    pub role: String,
    /// `false` on a node started without tokens (loopback only; every caller is admin).
    pub tokens_required: bool,
    pub node_id: String,
}

/// `GET /v1/denials`: the most recent denied checks of this node, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DenialsReply {
    pub node_id: String,
    /// Most denials the node keeps (older ones are forgotten; nothing is on disk).
    pub capacity: u64,
    /// Checks denied since the node started (`tally_checks_denied_total`).
    pub denied_total: u64,
    /// Denials not kept because the ring was busy at that instant (a check never waits).
    pub skipped: u64,
    pub denials: Vec<Denial>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Denial {
    /// Increases by one per denial kept since the node started.
    pub seq: u64,
    pub at: String,
    /// The attributes the check was asked with (before expansion through parents).
    pub attributes: BTreeMap<String, String>,
    pub denied_by: Vec<String>,
    /// Denying limits beyond those listed in `denied_by`.
    pub denied_by_more: u64,
    /// The check's estimates: USD and tokens.
    pub cost: f64,
    pub tokens: u64,
}

// ----- integrations --------------------------------------------------------------------

/// The body of every `/v1/forward-auth` answer (allowed or denied).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ForwardAuthReply {
    pub allowed: bool,
    pub stale: bool,
    pub denied_by: Vec<String>,
    pub limits: Vec<LimitStatus>,
    /// The access rule the request breaks (the denial is then a 403).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<AccessDenied>,
    /// With `X-Tally-Record-Id` and allowed: whether the record was applied now (false:
    /// its id was already applied). Absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub recorded: Option<bool>,
}

/// The reply of `POST /v1/usage/logs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct LogsReply {
    /// Non-empty lines read.
    pub lines: u64,
    /// Records applied now.
    pub applied: u64,
    /// Records whose id was already applied on this node (not counted again).
    pub duplicates: u64,
    /// Lines skipped: not a usage line, or refused by the node.
    pub malformed: u64,
    /// Why, for the first few skipped lines.
    pub errors: Vec<LineError>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct LineError {
    /// 1-based line number in the body (0 when the node refused a record of the batch).
    pub line: u64,
    pub message: String,
}

/// The reply of `POST /v1/import/envoy-ratelimit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ImportReply {
    pub domain: String,
    pub dry_run: bool,
    /// Every rule of the config, then the domain's rules the config no longer has.
    pub rules: Vec<RuleOutcome>,
    /// Wildcard instances removed with deleted rules.
    pub instances_deleted: u64,
    /// Descriptors tally cannot express (no limit was made for them).
    pub skipped: Vec<SkippedDescriptor>,
}

/// What happened to one rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RuleOutcome {
    /// The tally limit id of the rule.
    pub id: String,
    /// The descriptor path, `key=value/key` (a key alone matches every value).
    pub descriptor: String,
    /// `created`, `updated`, `unchanged` or `deleted`.
    pub action: String,
    /// Where tally differs from envoyproxy/ratelimit for this rule, or what it ignores.
    #[serde(default)]
    pub notes: Vec<String>,
}

/// A descriptor of the config that became no limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SkippedDescriptor {
    pub descriptor: String,
    pub reason: String,
}

// ----- schema helpers ------------------------------------------------------------------

fn rule_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "string", "enum": ["inactive", "expired", "allow"]})
}

fn allow_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": ["object", "null"],
        "maxProperties": ATTRIBUTES_MAX,
        "propertyNames": {"pattern": NAME_PATTERN},
        "additionalProperties": {
            "type": "array",
            "minItems": 1,
            "maxItems": 64,
            "items": {"$ref": "#/components/schemas/AttributeValue"}
        }
    })
}

/// A model name: an attribute value, but not `batch` (reserved).
fn attribute_value(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"allOf": [{"$ref": "#/components/schemas/AttributeValue"}], "not": {"const": "batch"}})
}

fn nullable_string(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": ["string", "null"]})
}

fn mode_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "string", "enum": ["soft", "hard"]})
}

fn reason_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": ["string", "null"], "enum": ["budget", "rights", null]})
}

fn metric_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "string", "enum": ["cost", "tokens", "requests"]})
}

/// `never`, or a count of a unit up to a bound safely below the node's (100 years of the
/// unit: `3155760000s`, `36525d`, `1200M`, `100Y`), without zero.
fn period_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "string",
        "pattern": "^(never|0*[1-9][0-9]{0,8}s|0*[1-9][0-9]{0,6}m|0*[1-9][0-9]{0,4}h|0*[1-9][0-9]{0,3}d|0*[1-9][0-9]{0,2}[wM]|0*[1-9][0-9]?Y)$",
        "description": "<n><s|m|h|d|w|M|Y> or never; at most 100 years of the unit."
    })
}

fn time_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": ["string", "null"], "format": "date-time"})
}

fn amount_in_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "number",
        "minimum": 0,
        "maximum": 1e15,
        "description": "USD for a cost limit (at most 1e9), a whole count otherwise (at most 1e15)."
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_keep_their_kind() {
        let j = serde_json::to_string(&[Amount::Count(1800), Amount::Usd(12.5), Amount::Usd(0.0)])
            .unwrap();
        assert_eq!(j, "[1800,12.5,0.0]");
        let back: Vec<Amount> = serde_json::from_str(&j).unwrap();
        assert_eq!(
            back,
            [Amount::Count(1800), Amount::Usd(12.5), Amount::Usd(0.0)]
        );
    }

    #[test]
    fn bodies_are_objects_only() {
        let e =
            serde_json::from_str::<BatchRequest>(r#"{"records": [["a", {}, 0.5]]}"#).unwrap_err();
        assert!(e.to_string().contains("a JSON object"), "{e}");
        let b: BatchRequest = serde_json::from_str(r#"{"records": [{"id": "a"}]}"#).unwrap();
        assert_eq!(b.records[0].id, "a");
    }

    #[test]
    fn attributes_borrow_and_cap() {
        let body = r#"{"attributes": {"team": "eng", "team": "ops"}}"#;
        let c: CheckRequest = serde_json::from_str(body).unwrap();
        assert_eq!(c.attributes.pairs().collect::<Vec<_>>(), [("team", "ops")]);
        assert!(matches!(c.attributes.0[0].1, Cow::Borrowed(_)));
        let nine: String = (0..9).map(|i| format!("\"d{i}\":\"v\",")).collect();
        let body = format!("{{\"attributes\":{{{}}}}}", nine.trim_end_matches(','));
        let e = serde_json::from_str::<CheckRequest>(&body).unwrap_err();
        assert!(e.to_string().contains("at most 8"), "{e}");
    }
}
