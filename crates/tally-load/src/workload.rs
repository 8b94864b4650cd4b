//! What the load generator sends: the scenarios' request bodies and the `--setup` limit plan.
//!
//! Every generated request carries the same five attributes, keyed by a small key index
//! `k` in `0..keys`: `virtual_key=vk-k`, `team=team-k`, `customer=cust-k`,
//! `provider=openai`, `model=gpt-4o`. The setup plan puts exactly one cost limit on each of
//! those five scopes (so every request has exactly five applicable limits) and fills the
//! rest of `--limits` with per-virtual-key limits on `vk-other-n`, which never match: they
//! measure how the server's lookup copes with many limits it must *not* apply.
//!
//! Pure body building; no I/O. Every body is a type of `tally_api` serialised by serde;
//! the tests parse every shape back.

use std::borrow::Cow;

use hyper::body::Bytes;
use tally_api::{Attributes, CheckRequest, LimitRequest, UsageRequest};

pub const PROVIDER: &str = "openai";
pub const MODEL: &str = "gpt-4o";
/// Cost and tokens of every generated check/usage: tiny, so limits never run out.
const REQUEST_COST_USD: f64 = 0.0001;
/// [`REQUEST_COST_USD`] in micro-USD, for the clients that send integers.
pub const REQUEST_COST_MICROS: u64 = 100;
/// Tokens of every generated check/usage.
pub const REQUEST_TOKENS_COUNT: u64 = 10;
/// `max` of every setup limit: 1e8 USD, far above anything a run can spend, so every check
/// is allowed (a denial could take a different, cheaper path in the server).
const LIMIT_MAX_USD: f64 = 100_000_000.0;
/// [`LIMIT_MAX_USD`] in micro-USD (1e14, exact in a double, so Lua compares it exactly).
pub const LIMIT_MAX_MICROS: u64 = 100_000_000_000_000;
pub const LIMIT_PERIOD: &str = "1M";

/// The largest `--keys`: keys are meant to be few (hot limits), and the plan must fit.
pub const KEYS_MAX: usize = 1_000_000;
/// The largest `--limits`.
pub const LIMITS_MAX: usize = 10_000_000;

/// Which attribute key a connection's `n`-th request uses: connections start staggered and
/// each walks all keys in turn.
pub fn key_for(connection: usize, n: u64, keys: usize) -> usize {
    debug_assert!(keys > 0);
    ((connection as u64 + n) % keys as u64) as usize
}

/// The attributes of key `key`, in the order they are sent.
pub fn request_attributes(key: usize) -> Attributes<'static> {
    attributes(key)
        .into_iter()
        .map(|(k, v)| (Cow::Borrowed(k), Cow::Owned(v)))
        .collect()
}

/// The `POST /v1/check` body for `key`.
pub fn check_body(key: usize) -> String {
    serde_json::to_string(&CheckRequest {
        attributes: request_attributes(key),
        cost: Some(REQUEST_COST_USD),
        tokens: Some(REQUEST_TOKENS_COUNT),
        reserve: hard(),
        ttl_s: hard().then_some(1),
        ..Default::default()
    })
    .expect("a check body serialises")
}

static HARD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `--hard`: limits are created hard, and checks reserve (for 1 s) on them.
pub fn set_hard(on: bool) {
    HARD.store(on, std::sync::atomic::Ordering::Relaxed);
}

pub fn hard() -> bool {
    HARD.load(std::sync::atomic::Ordering::Relaxed)
}

/// The idempotency id of a connection's `n`-th usage record; `run_id` keeps repeated runs
/// against the same server from being deduplicated.
pub fn usage_id(connection: usize, n: u64, run_id: &str) -> String {
    format!("load-{connection}-{n}-{run_id}")
}

/// The `POST /v1/usage` body.
pub fn usage_body(id: &str, key: usize) -> String {
    serde_json::to_string(&UsageRequest {
        id: id.to_owned(),
        attributes: request_attributes(key),
        cost: Some(REQUEST_COST_USD),
        tokens: Some(REQUEST_TOKENS_COUNT),
        ..Default::default()
    })
    .expect("a usage body serialises")
}

/// The bodies one connection sends, in order.
#[derive(Clone, Debug)]
pub enum BodyGen {
    /// Cycles through fixed bodies (check: one per key; raw: the one `--body`).
    Cycle { bodies: Vec<Bytes>, next: usize },
    /// A fresh usage record per request.
    Usage {
        connection: usize,
        n: u64,
        keys: usize,
        run_id: String,
    },
}

impl BodyGen {
    pub fn check(connection: usize, keys: usize) -> Self {
        let bodies = (0..keys).map(|key| Bytes::from(check_body(key))).collect();
        Self::Cycle {
            bodies,
            next: key_for(connection, 0, keys),
        }
    }

    pub fn usage(connection: usize, keys: usize, run_id: &str) -> Self {
        assert!(keys > 0);
        Self::Usage {
            connection,
            n: 0,
            keys,
            run_id: run_id.to_owned(),
        }
    }

    pub fn fixed(body: Bytes) -> Self {
        Self::Cycle {
            bodies: vec![body],
            next: 0,
        }
    }

    pub fn next_body(&mut self) -> Bytes {
        match self {
            Self::Cycle { bodies, next } => {
                let body = bodies[*next].clone();
                *next = (*next + 1) % bodies.len();
                body
            }
            Self::Usage {
                connection,
                n,
                keys,
                run_id,
            } => {
                let id = usage_id(*connection, *n, run_id);
                let body = usage_body(&id, key_for(*connection, *n, *keys));
                *n += 1;
                Bytes::from(body)
            }
        }
    }
}

/// The limits `--setup` creates: `total` in all, `3 * keys + 2` of them matching generated
/// requests (five per request), the rest never matching.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitPlan {
    total: usize,
    keys: usize,
}

impl LimitPlan {
    pub fn new(total: usize, keys: usize) -> Result<Self, String> {
        if keys == 0 || keys > KEYS_MAX {
            return Err(format!("--keys must be in 1..={KEYS_MAX}"));
        }
        let matching = 3 * keys + 2;
        if total < matching || total > LIMITS_MAX {
            return Err(format!(
                "--limits must be in {matching}..={LIMITS_MAX} for --keys {keys} \
                 (3 per key for virtual_key/team/customer, plus provider and model)"
            ));
        }
        Ok(Self { total, keys })
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// How many limits match some generated request.
    pub fn matching(&self) -> usize {
        3 * self.keys + 2
    }

    /// The `n`-th limit as `(id, PUT body)`.
    pub fn limit(&self, n: usize) -> (String, String) {
        let LimitParts {
            id,
            dimension,
            value,
        } = self.parts(n);
        let body = serde_json::to_string(&LimitRequest {
            scope: [(dimension.to_owned(), value)].into(),
            metric: "cost".into(),
            max: serde_json::Number::from_f64(LIMIT_MAX_USD).expect("finite"),
            period: LIMIT_PERIOD.into(),
            calendar_aligned: false,
            timezone: None,
            mode: hard().then(|| "hard".to_string()),
            members: None,
        })
        .expect("a limit body serialises");
        (id, body)
    }

    /// The `n`-th limit's id and its one-dimension scope; every limit is a `cost` limit
    /// with `max` [`LIMIT_MAX_MICROS`] and period [`LIMIT_PERIOD`].
    pub fn parts(&self, n: usize) -> LimitParts {
        assert!(n < self.total, "limit {n} of {}", self.total);
        let keys = self.keys;
        let (id, dimension, value) = if n < keys {
            (format!("load-vk-{n}"), "virtual_key", format!("vk-{n}"))
        } else if n < 2 * keys {
            let key = n - keys;
            (format!("load-team-{key}"), "team", format!("team-{key}"))
        } else if n < 3 * keys {
            let key = n - 2 * keys;
            (
                format!("load-cust-{key}"),
                "customer",
                format!("cust-{key}"),
            )
        } else if n == 3 * keys {
            (
                format!("load-provider-{PROVIDER}"),
                "provider",
                PROVIDER.to_owned(),
            )
        } else if n == 3 * keys + 1 {
            (format!("load-model-{MODEL}"), "model", MODEL.to_owned())
        } else {
            let other = n - self.matching();
            (
                format!("load-other-{other}"),
                "virtual_key",
                format!("vk-other-{other}"),
            )
        };
        LimitParts {
            id,
            dimension,
            value,
        }
    }
}

/// One planned limit, for clients that do not speak tally's JSON (Redis, embedded).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitParts {
    pub id: String,
    pub dimension: &'static str,
    pub value: String,
}

/// The ids of the five limits that apply to attribute key `key` (the same five a tally
/// server finds by itself), in a fixed order.
pub fn applicable_limit_ids(key: usize) -> [String; 5] {
    [
        format!("load-vk-{key}"),
        format!("load-team-{key}"),
        format!("load-cust-{key}"),
        format!("load-provider-{PROVIDER}"),
        format!("load-model-{MODEL}"),
    ]
}

/// The five attributes of key `key`, as the embedded API takes them.
pub fn attributes(key: usize) -> [(&'static str, String); 5] {
    [
        ("virtual_key", format!("vk-{key}")),
        ("team", format!("team-{key}")),
        ("customer", format!("cust-{key}")),
        ("provider", PROVIDER.to_owned()),
        ("model", MODEL.to_owned()),
    ]
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::{Value, json};

    use super::*;

    fn parse(body: &Bytes) -> Value {
        serde_json::from_slice(body).expect("generated body is JSON")
    }

    /// Does a limit scope (an object of dimension → value) apply to `attributes`?
    fn applies(scope: &Value, attributes: &Value) -> bool {
        scope
            .as_object()
            .unwrap()
            .iter()
            .all(|(dimension, value)| attributes.get(dimension) == Some(value))
    }

    #[test]
    fn check_bodies_cycle_over_keys() {
        let mut bodies = BodyGen::check(1, 3);
        let got: Vec<Value> = (0..4).map(|_| parse(&bodies.next_body())).collect();
        assert_eq!(
            got[0],
            json!({"attributes": {"virtual_key": "vk-1", "team": "team-1", "customer": "cust-1",
                                  "provider": "openai", "model": "gpt-4o"},
                   "cost": 0.0001, "tokens": 10})
        );
        let keys: Vec<&str> = got
            .iter()
            .map(|body| body["attributes"]["virtual_key"].as_str().unwrap())
            .collect();
        assert_eq!(keys, ["vk-1", "vk-2", "vk-0", "vk-1"]);
    }

    #[test]
    fn usage_ids_are_unique_and_valid() {
        let mut ids = BTreeSet::new();
        for connection in 0..3 {
            let mut bodies = BodyGen::usage(connection, 2, "r1f");
            for n in 0..50 {
                let body = parse(&bodies.next_body());
                let id = body["id"].as_str().unwrap().to_owned();
                assert_eq!(id, format!("load-{connection}-{n}-r1f"));
                assert!(id.len() <= 128);
                assert!(
                    id.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
                );
                assert_eq!(body["cost"], json!(0.0001));
                assert_eq!(body["attributes"]["model"], "gpt-4o");
                assert!(ids.insert(id));
            }
        }
    }

    #[test]
    fn every_request_matches_exactly_five_limits() {
        for (total, keys) in [(5, 1), (100, 1), (1_000, 7)] {
            let plan = LimitPlan::new(total, keys).unwrap();
            let limits: Vec<(String, Value)> = (0..plan.total())
                .map(|n| {
                    let (id, body) = plan.limit(n);
                    (id, serde_json::from_str(&body).unwrap())
                })
                .collect();
            let ids: BTreeSet<&str> = limits.iter().map(|(id, _)| id.as_str()).collect();
            assert_eq!(ids.len(), total, "ids are distinct");
            for (_, limit) in &limits {
                assert_eq!(limit["metric"], "cost");
                assert_eq!(limit["max"], json!(1e8));
            }
            let mut matched = BTreeSet::new();
            for connection in 0..keys + 1 {
                let mut bodies = BodyGen::check(connection, keys);
                for _ in 0..keys {
                    let body = parse(&bodies.next_body());
                    let applicable: Vec<&str> = limits
                        .iter()
                        .filter(|(_, limit)| applies(&limit["scope"], &body["attributes"]))
                        .map(|(id, _)| id.as_str())
                        .collect();
                    assert_eq!(applicable.len(), 5, "{body}: {applicable:?}");
                    // The clients that name limits themselves (Redis) name the same five,
                    // and the embedded attributes are the body's.
                    let key: usize = body["attributes"]["virtual_key"].as_str().unwrap()[3..]
                        .parse()
                        .unwrap();
                    let named: BTreeSet<String> = applicable_limit_ids(key).into();
                    let found: BTreeSet<String> =
                        applicable.iter().map(|id| (*id).to_owned()).collect();
                    assert_eq!(named, found);
                    let pairs: serde_json::Map<String, Value> = attributes(key)
                        .into_iter()
                        .map(|(name, value)| (name.to_owned(), Value::String(value)))
                        .collect();
                    assert_eq!(Value::Object(pairs), body["attributes"]);
                    matched.extend(applicable);
                }
            }
            assert_eq!(
                matched.len(),
                plan.matching(),
                "every matching limit is used"
            );
        }
    }

    #[test]
    fn plan_rejects_impossible_sizes() {
        assert!(LimitPlan::new(4, 1).is_err());
        assert!(LimitPlan::new(100, 0).is_err());
        assert!(LimitPlan::new(LIMITS_MAX + 1, 1).is_err());
        assert_eq!(LimitPlan::new(100_000, 1).unwrap().matching(), 5);
    }
}
