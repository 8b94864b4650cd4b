//! How Envoy rate limit *rules* live in tally: as ordinary limits, with ids derived from
//! the rule's domain and descriptor path and their metadata in reserved scope entries.
//! Pure functions, no I/O; the service and the importer both go through them, so a rule
//! written by `tally import envoy-ratelimit` is found by the gRPC service on every node.
//!
//! - A **rule** (one leaf of an envoyproxy/ratelimit config that has a `rate_limit`) is
//!   the limit `rls.<domain slug>.<hash of domain and path>`. Its scope is
//!   `{rls_domain: <domain>, rls_descriptor: <path>}` plus, when set, `rls_name`,
//!   `rls_replaces` (names, comma-separated) and `rls_flags` (`shadow`, `unlimited`). The scope makes the limit inert for ordinary checks (no client sends
//!   `rls_descriptor`), keeps every rule's scope distinct, and carries the metadata with
//!   the limit through gossip and restarts: there is no second config store.
//! - A path is the descriptor's entries, `key=value` or `key` alone for a wildcard
//!   (any value: ratelimit's key without `value`), joined by `/`, with `%`, `/`, `=`,
//!   `*` and control characters percent-escaped: `generic_key=foo/remote_address`.
//! - A wildcard rule counts each value apart (ratelimit's per-value buckets) in an
//!   **instance**: the limit `rlsv.<hash of rule id and concrete path>` with scope
//!   `{rls_domain, rls_template: <rule id>, rls_value: <concrete path>}`. Instances are
//!   created on first use with the rule's generation and anchor
//!   (`Node::put_limit_derived`), so two nodes that see a new value at once count it in
//!   one epoch.
//! - A limit scoped `{rls_domain: D}` alone (or `{}`) also applies to every rule and
//!   instance of domain D: a cap over the whole domain, checked and charged with them.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};
use tally_core::units::ATTRIBUTE_VALUE_LEN_MAX;
use tally_core::{Period, Scope, Unit};

pub const DOMAIN: &str = "rls_domain";
pub const DESCRIPTOR: &str = "rls_descriptor";
pub const NAME: &str = "rls_name";
pub const REPLACES: &str = "rls_replaces";
pub const FLAGS: &str = "rls_flags";
pub const TEMPLATE: &str = "rls_template";
pub const VALUE: &str = "rls_value";

/// Most entries in one descriptor: tally's attribute bound is 8, and ratelimit configs
/// nest 1 to 3 deep; the candidate search is 2^n lookups.
pub const ENTRIES_MAX: usize = 8;

/// One descriptor entry of a rule: a key with a value, or a wildcard (`None`).
pub type PathEntry = (String, Option<String>);

/// Flags of a rule, from ratelimit's `shadow_mode` and `unlimited`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flags {
    /// Counted, but an over-limit answer is turned into OK (`shadow_mode`).
    pub shadow: bool,
    /// Never limited, never counted (`unlimited: true`).
    pub unlimited: bool,
}

/// A rule's metadata as read back from its limit's scope.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleMeta {
    pub domain: String,
    pub descriptor: String,
    pub name: Option<String>,
    pub replaces: Vec<String>,
    pub flags: Flags,
}

impl RuleMeta {
    /// Reads a rule's metadata from its scope; `None` if the scope is not a rule's.
    pub fn from_scope(scope: &Scope) -> Option<RuleMeta> {
        let mut flags = Flags::default();
        for f in scope
            .get(FLAGS)
            .map(String::as_str)
            .unwrap_or("")
            .split(',')
        {
            match f {
                "shadow" => flags.shadow = true,
                "unlimited" => flags.unlimited = true,
                _ => {}
            }
        }
        Some(RuleMeta {
            domain: scope.get(DOMAIN)?.clone(),
            descriptor: scope.get(DESCRIPTOR)?.clone(),
            name: scope.get(NAME).cloned(),
            replaces: scope
                .get(REPLACES)
                .map(|r| r.split(',').map(str::to_string).collect())
                .unwrap_or_default(),
            flags,
        })
    }

    /// The scope of the rule's limit. Fails if a value does not fit tally's attribute
    /// values (128 bytes of printable text).
    pub fn to_scope(&self) -> Result<Scope, String> {
        let mut s = BTreeMap::new();
        s.insert(DOMAIN.to_string(), self.domain.clone());
        s.insert(DESCRIPTOR.to_string(), self.descriptor.clone());
        if let Some(n) = &self.name {
            s.insert(NAME.to_string(), n.clone());
        }
        if !self.replaces.is_empty() {
            s.insert(REPLACES.to_string(), self.replaces.join(","));
        }
        let f = self.flags;
        let flags: Vec<&str> = [(f.shadow, "shadow"), (f.unlimited, "unlimited")]
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, n)| *n)
            .collect();
        if !flags.is_empty() {
            s.insert(FLAGS.to_string(), flags.join(","));
        }
        for (k, v) in &s {
            tally_core::units::validate_attribute_value(v).map_err(|_| {
                format!("{k} {v:?} must be 1 to {ATTRIBUTE_VALUE_LEN_MAX} bytes of printable text")
            })?;
        }
        Ok(s)
    }
}

/// Percent-escapes the characters that structure a path.
fn escape(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '%' | '/' | '=' | '*' => out.push_str(&format!("%{:02X}", c as u32)),
            c if c.is_control() => {
                let mut b = [0u8; 4];
                for byte in c.encode_utf8(&mut b).bytes() {
                    out.push_str(&format!("%{byte:02X}"));
                }
            }
            c => out.push(c),
        }
    }
}

/// The canonical text of a path: `k=v` or `k` per entry, joined by `/`.
pub fn encode_path<'a>(entries: impl IntoIterator<Item = (&'a str, Option<&'a str>)>) -> String {
    let mut out = String::new();
    for (i, (k, v)) in entries.into_iter().enumerate() {
        if i > 0 {
            out.push('/');
        }
        escape(&mut out, k);
        if let Some(v) = v {
            out.push('=');
            escape(&mut out, v);
        }
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// 96 bits of SHA-256 over the parts, separated by NUL (no part contains one: paths
/// escape control characters and domains are refused with them).
fn digest(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0u8]);
    }
    hex(&h.finalize()[..12])
}

/// Up to 32 characters of the domain that fit a limit id, for people reading ids.
fn slug(domain: &str) -> String {
    domain
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(32)
        .collect()
}

/// The limit id of the rule at `path` in `domain`.
pub fn rule_id(domain: &str, path: &str) -> String {
    format!("rls.{}.{}", slug(domain), digest(&[domain, path]))
}

/// The limit id of a wildcard rule's instance for one concrete path.
pub fn instance_id(rule_id: &str, concrete_path: &str) -> String {
    format!("rlsv.{}", digest(&[rule_id, concrete_path]))
}

/// A scope value made from text of any length: the text itself when it fits, else its
/// first bytes and a hash of the whole (so two long values never share a scope).
pub fn scope_value(text: &str) -> String {
    if text.len() <= ATTRIBUTE_VALUE_LEN_MAX && !text.chars().any(char::is_control) {
        return text.to_string();
    }
    let mut cut = 100;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let head: String = text[..cut].chars().filter(|c| !c.is_control()).collect();
    format!("{head}~{}", digest(&[text]))
}

/// The scope of a wildcard rule's instance.
pub fn instance_scope(domain: &str, rule_id: &str, concrete_path: &str) -> Scope {
    [
        (DOMAIN.to_string(), scope_value(domain)),
        (TEMPLATE.to_string(), rule_id.to_string()),
        (VALUE.to_string(), scope_value(concrete_path)),
    ]
    .into()
}

/// The paths a descriptor may match, most specific first: at each entry the value, then
/// the wildcard, depth first (2^n candidates for n entries). ratelimit walks its tree
/// greedily, taking a `key=value` node when one exists even if only the wildcard branch
/// leads to a rule; tally backtracks to the wildcard branch in that case (ARCHITECTURE.md).
pub fn candidates<'a>(entries: &[(&'a str, &'a str)]) -> Vec<Vec<(&'a str, Option<&'a str>)>> {
    let n = entries.len();
    let mut out = Vec::with_capacity(1 << n);
    // Bit i of `mask` set = entry i is taken as a wildcard; counting up in binary with
    // entry 0 as the most significant bit gives the depth-first, value-first order.
    for mask in 0u32..(1 << n) {
        out.push(
            entries
                .iter()
                .enumerate()
                .map(|(i, &(k, v))| {
                    let wild = mask & (1 << (n - 1 - i)) != 0;
                    (k, (!wild).then_some(v))
                })
                .collect(),
        );
    }
    out
}

/// Envoy's `RateLimitResponse.RateLimit.Unit` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum RlsUnit {
    Unknown = 0,
    Second = 1,
    Minute = 2,
    Hour = 3,
    Day = 4,
    Month = 5,
    Year = 6,
    Week = 7,
}

impl RlsUnit {
    /// ratelimit's `unit` names, case-insensitive as ratelimit reads them.
    pub fn parse(s: &str) -> Option<RlsUnit> {
        Some(match s.to_ascii_uppercase().as_str() {
            "SECOND" => RlsUnit::Second,
            "MINUTE" => RlsUnit::Minute,
            "HOUR" => RlsUnit::Hour,
            "DAY" => RlsUnit::Day,
            "WEEK" => RlsUnit::Week,
            "MONTH" => RlsUnit::Month,
            "YEAR" => RlsUnit::Year,
            _ => return None,
        })
    }

    /// The tally period a ratelimit unit becomes (calendar-aligned in UTC).
    pub fn period(self) -> Option<Period> {
        let unit = match self {
            RlsUnit::Unknown => return None,
            RlsUnit::Second => Unit::Second,
            RlsUnit::Minute => Unit::Minute,
            RlsUnit::Hour => Unit::Hour,
            RlsUnit::Day => Unit::Day,
            RlsUnit::Week => Unit::Week,
            RlsUnit::Month => Unit::Month,
            RlsUnit::Year => Unit::Year,
        };
        Some(Period::Every { n: 1, unit })
    }

    /// The unit to report for a tally period: the same unit when the period is one of
    /// them (`1m` → MINUTE), else the largest unit not longer than the period (`5m` →
    /// MINUTE, `3M` → MONTH) and `false`: the caller says the exact period elsewhere.
    pub fn of_period(p: Period) -> (RlsUnit, bool) {
        // Approximate spans in seconds, only to order periods (a month as 1/12 year).
        const SPANS: [(RlsUnit, u64); 7] = [
            (RlsUnit::Second, 1),
            (RlsUnit::Minute, 60),
            (RlsUnit::Hour, 3_600),
            (RlsUnit::Day, 86_400),
            (RlsUnit::Week, 604_800),
            (RlsUnit::Month, 2_628_000),
            (RlsUnit::Year, 31_536_000),
        ];
        match p {
            Period::Never => (RlsUnit::Unknown, false),
            Period::Every { n, unit } => {
                let own = match unit {
                    Unit::Second => 0,
                    Unit::Minute => 1,
                    Unit::Hour => 2,
                    Unit::Day => 3,
                    Unit::Week => 4,
                    Unit::Month => 5,
                    Unit::Year => 6,
                };
                let span = u64::from(n).saturating_mul(SPANS[own].1);
                let (u, _) = SPANS
                    .iter()
                    .rev()
                    .find(|(_, secs)| *secs <= span)
                    .copied()
                    .unwrap_or(SPANS[0]);
                (u, n == 1)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_escape_their_structure() {
        assert_eq!(
            encode_path([("generic_key", Some("foo")), ("remote_address", None)]),
            "generic_key=foo/remote_address"
        );
        assert_eq!(
            encode_path([("a/b", Some("x=y*%")), ("k", Some("\n"))]),
            "a%2Fb=x%3Dy%2A%25/k=%0A"
        );
        // A literal "*" value and a wildcard differ.
        assert_ne!(encode_path([("k", Some("*"))]), encode_path([("k", None)]));
    }

    #[test]
    fn ids_are_deterministic_and_valid() {
        let a = rule_id("my domain!", "k=v");
        assert_eq!(a, rule_id("my domain!", "k=v"));
        assert!(a.starts_with("rls.my_domain_."), "{a}");
        assert_ne!(a, rule_id("my domain!", "k=w"));
        assert_ne!(a, rule_id("other", "k=v"));
        tally_core::units::validate_id(&a, "id").unwrap();
        let long = "d".repeat(500);
        tally_core::units::validate_id(&rule_id(&long, "k"), "id").unwrap();
        let i = instance_id(&a, "k=1.2.3.4");
        tally_core::units::validate_id(&i, "id").unwrap();
        assert_ne!(i, instance_id(&a, "k=1.2.3.5"));
    }

    #[test]
    fn candidates_are_most_specific_first() {
        let c = candidates(&[("a", "1"), ("b", "2")]);
        let text: Vec<String> = c.iter().map(|p| encode_path(p.iter().copied())).collect();
        assert_eq!(text, ["a=1/b=2", "a=1/b", "a/b=2", "a/b"]);
        assert_eq!(candidates(&[]).len(), 1);
    }

    #[test]
    fn meta_round_trips_through_a_scope() {
        let m = RuleMeta {
            domain: "rl".into(),
            descriptor: "k=v".into(),
            name: Some("per-key".into()),
            replaces: vec!["a".into(), "b".into()],
            flags: Flags {
                shadow: true,
                unlimited: false,
            },
        };
        let s = m.to_scope().unwrap();
        assert_eq!(s.get(FLAGS).unwrap(), "shadow");
        assert_eq!(RuleMeta::from_scope(&s).unwrap(), m);
        assert!(RuleMeta::from_scope(&instance_scope("rl", "x", "k=1")).is_none());
        let too_long = RuleMeta {
            descriptor: "x".repeat(200),
            ..m
        };
        assert!(too_long.to_scope().is_err());
    }

    #[test]
    fn long_scope_values_stay_distinct() {
        let a = scope_value(&format!("{}a", "x".repeat(300)));
        let b = scope_value(&format!("{}b", "x".repeat(300)));
        assert_ne!(a, b);
        assert!(a.len() <= ATTRIBUTE_VALUE_LEN_MAX);
        tally_core::units::validate_attribute_value(&a).unwrap();
        assert_eq!(scope_value("short"), "short");
    }

    #[test]
    fn units_map_both_ways() {
        for u in ["second", "MINUTE", "Hour", "day", "week", "month", "year"] {
            let unit = RlsUnit::parse(u).unwrap();
            assert_eq!(RlsUnit::of_period(unit.period().unwrap()), (unit, true));
        }
        assert_eq!(RlsUnit::parse("fortnight"), None);
        for (p, u) in [
            ("5m", RlsUnit::Minute),
            ("90s", RlsUnit::Minute),
            ("36h", RlsUnit::Day),
            ("10d", RlsUnit::Week),
            ("3M", RlsUnit::Month),
            ("12M", RlsUnit::Year),
        ] {
            assert_eq!(RlsUnit::of_period(p.parse().unwrap()), (u, false), "{p}");
        }
        assert_eq!(RlsUnit::of_period(Period::Never), (RlsUnit::Unknown, false));
    }
}
