//! The HTTP contract of API.md, step by step, plus bad input (I8) and auth.
//!
//! Tests are tables of [`Step`]s run by the one [`check`] helper: each step is a request and
//! what must come back. Every step that is rejected is also an I8 check: `check` snapshots
//! all limit views before and after it and requires them to be identical.

use tally_tests::{
    Client, Node, NodeOpts, Value, assert_keys, count, is_valid_id, json, micros, ok, sorted_by_id,
    time, try_error, try_matches,
};

/// Fields of a limit view (API.md, `GET /v1/limits/{id}`).
const VIEW_KEYS: [&str; 12] = [
    "id",
    "scope",
    "metric",
    "max",
    "period",
    "calendar_aligned",
    "timezone",
    "used",
    "remaining",
    "period_start",
    "resets_at",
    "nodes",
];
/// Fields of one entry of `limits` in check and usage replies.
const ENTRY_KEYS: [&str; 6] = ["id", "metric", "used", "max", "remaining", "resets_at"];
/// Fields of a check reply.
const DECISION_KEYS: [&str; 4] = ["allowed", "stale", "denied_by", "limits"];

// ---------------------------------------------------------------------------------------
// Steps and the `check` helper.

enum Body {
    Empty,
    Json(Value),
    Raw(Vec<u8>),
    /// Sent with `Client::post_oversized` (the server may answer before reading it all).
    Huge(Vec<u8>),
}

/// One entry expected in a check/usage `limits` array: (id, metric, used, max, remaining).
type Entry = (&'static str, &'static str, f64, f64, f64);

enum Expect {
    /// 200 and a body containing these fields (numbers by value, see `try_matches`).
    Gives(Value),
    /// 200, a limit view with exactly [`VIEW_KEYS`], containing these fields, and internally
    /// consistent (remaining = max(0, max − used), period_start < resets_at, UTC times).
    View(Value),
    /// 200 for `/v1/check`: allowed, exactly these `denied_by` ids (any order), exactly
    /// these `limits` entries (any order), `stale: false`.
    Decision(bool, Vec<&'static str>, Vec<Entry>),
    /// 200 for `/v1/usage`: `{"applied": .., "limits": [exactly these entries]}`.
    Recorded(bool, Vec<Entry>),
    /// Just this status (bodies the contract leaves open, e.g. `/healthz`).
    Status(u16),
    /// The error shape with this status and code, and no state change (I8).
    Fails(u16, &'static str),
}

struct Step {
    method: &'static str,
    path: String,
    body: Body,
    /// `None`: the client's own token. `Some(t)`: override (`Some(None)` sends none).
    token: Option<Option<&'static str>>,
    expect: Expect,
}

impl Step {
    fn token(mut self, token: &'static str) -> Step {
        self.token = Some(Some(token));
        self
    }

    fn no_token(mut self) -> Step {
        self.token = Some(None);
        self
    }

    fn describe(&self) -> String {
        let body = match &self.body {
            Body::Empty => String::new(),
            Body::Json(v) => v.to_string(),
            Body::Raw(b) | Body::Huge(b) => String::from_utf8_lossy(b).into_owned(),
        };
        let mut s = format!("{} {} {}", self.method, self.path, body);
        if s.len() > 300 {
            let mut cut = 300;
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            s.truncate(cut);
            s.push_str("...");
        }
        match self.token {
            Some(Some(t)) => format!("{s} [token {t}]"),
            Some(None) => format!("{s} [no token]"),
            None => s,
        }
    }
}

fn step(method: &'static str, path: impl Into<String>, body: Body, expect: Expect) -> Step {
    Step {
        method,
        path: path.into(),
        body,
        token: None,
        expect,
    }
}

fn get(path: impl Into<String>, expect: Expect) -> Step {
    step("GET", path, Body::Empty, expect)
}

fn put(path: impl Into<String>, body: Value, expect: Expect) -> Step {
    step("PUT", path, Body::Json(body), expect)
}

fn post(path: impl Into<String>, body: Value, expect: Expect) -> Step {
    step("POST", path, Body::Json(body), expect)
}

fn del(path: impl Into<String>, expect: Expect) -> Step {
    step("DELETE", path, Body::Empty, expect)
}

fn put_raw(path: impl Into<String>, body: impl Into<Vec<u8>>, expect: Expect) -> Step {
    step("PUT", path, Body::Raw(body.into()), expect)
}

fn post_raw(path: impl Into<String>, body: impl Into<Vec<u8>>, expect: Expect) -> Step {
    step("POST", path, Body::Raw(body.into()), expect)
}

fn post_huge(path: impl Into<String>, body: impl Into<Vec<u8>>, expect: Expect) -> Step {
    step("POST", path, Body::Huge(body.into()), expect)
}

fn gives(v: Value) -> Expect {
    Expect::Gives(v)
}

fn view(v: Value) -> Expect {
    Expect::View(v)
}

fn decision(allowed: bool, denied_by: &[&'static str], entries: &[Entry]) -> Expect {
    Expect::Decision(allowed, denied_by.to_vec(), entries.to_vec())
}

fn recorded(applied: bool, entries: &[Entry]) -> Expect {
    Expect::Recorded(applied, entries.to_vec())
}

fn status(s: u16) -> Expect {
    Expect::Status(s)
}

fn fails(status: u16, code: &'static str) -> Expect {
    Expect::Fails(status, code)
}

fn invalid() -> Expect {
    fails(400, "invalid_argument")
}

/// Runs `steps` in order through `client` and asserts each expectation; returns the bodies.
/// A rejected step must leave every limit view unchanged (I8). `client` must be able to
/// read limits (it is also used for the before/after snapshots).
fn check(client: &Client, steps: &[Step]) -> Vec<Value> {
    let mut bodies = Vec::with_capacity(steps.len());
    for (i, s) in steps.iter().enumerate() {
        let what = format!("step {i}: {}", s.describe());
        let c = match s.token {
            None => client.clone(),
            Some(t) => client.with_token(t),
        };
        let before = match s.expect {
            Expect::Fails(..) => Some(limit_views(client)),
            _ => None,
        };
        let reply = match &s.body {
            Body::Empty => c.request(s.method, &s.path, None),
            Body::Json(v) => c.request(s.method, &s.path, Some(v)),
            Body::Raw(b) if s.method == "PUT" => c.put_raw(&s.path, b),
            Body::Raw(b) => c.post_raw(&s.path, b),
            Body::Huge(b) => c.post_oversized(&s.path, b),
        };
        let status = reply.0;
        let fail =
            |msg: String| -> ! { panic!("{what}\n  {msg}\n  reply {} {}", reply.0, reply.1) };
        match &s.expect {
            Expect::Status(want) => {
                if status != *want {
                    fail(format!("expected status {want}"));
                }
            }
            Expect::Gives(want) => {
                if status != 200 {
                    fail("expected 200".into());
                }
                if let Err(e) = try_matches(&reply.1, want) {
                    fail(e);
                }
            }
            Expect::View(want) => {
                if status != 200 {
                    fail("expected 200".into());
                }
                if let Err(e) = try_matches(&reply.1, want) {
                    fail(e);
                }
                assert_view(&reply.1);
            }
            Expect::Decision(allowed, denied_by, entries) => {
                if status != 200 {
                    fail("expected 200".into());
                }
                assert_keys(&reply.1, &DECISION_KEYS);
                if reply.1["allowed"] != json!(*allowed) || reply.1["stale"] != json!(false) {
                    fail(format!("expected allowed {allowed}, stale false"));
                }
                let mut got: Vec<&str> = reply.1["denied_by"]
                    .as_array()
                    .unwrap_or_else(|| fail("denied_by is not an array".into()))
                    .iter()
                    .map(|v| v.as_str().unwrap_or("<not a string>"))
                    .collect();
                got.sort_unstable();
                let mut want = denied_by.clone();
                want.sort_unstable();
                if got != want {
                    fail(format!("expected denied_by {want:?}"));
                }
                if let Err(e) = entries_match(client, &reply.1["limits"], entries) {
                    fail(e);
                }
            }
            Expect::Recorded(applied, entries) => {
                if status != 200 {
                    fail("expected 200".into());
                }
                assert_keys(&reply.1, &["applied", "limits"]);
                if reply.1["applied"] != json!(*applied) {
                    fail(format!("expected applied {applied}"));
                }
                if let Err(e) = entries_match(client, &reply.1["limits"], entries) {
                    fail(e);
                }
            }
            Expect::Fails(status, code) => {
                if let Err(e) = try_error(&reply, *status, code) {
                    fail(e);
                }
                let after = limit_views(client);
                if before.as_ref() != Some(&after) {
                    fail(format!(
                        "rejected request changed state (I8)\n  before {:?}\n  after  {after:?}",
                        before
                    ));
                }
            }
        }
        bodies.push(reply.1);
    }
    bodies
}

/// All limit views, sorted by id: the state a rejected request must not change (I8).
fn limit_views(client: &Client) -> Vec<Value> {
    let list = ok(client.get("/v1/limits"));
    assert_keys(&list, &["limits"]);
    let views = sorted_by_id(&list["limits"]);
    for v in &views {
        assert_view(v);
    }
    views
}

/// A limit view has exactly the documented fields and is internally consistent.
#[track_caller]
fn assert_view(v: &Value) {
    assert_keys(v, &VIEW_KEYS);
    let (used, max) = (micros(&v["used"]), micros(&v["max"]));
    assert_eq!(
        micros(&v["remaining"]),
        (max - used).max(0),
        "remaining = max(0, max - used) in {v}"
    );
    if v["metric"] != "cost" {
        count(&v["used"]);
        count(&v["max"]);
    }
    let (start, end) = (time(&v["period_start"]), time(&v["resets_at"]));
    assert!(start < end, "period_start < resets_at in {v}");
    assert!(v["nodes"].is_object(), "nodes is an object in {v}");
}

/// Compares a check/usage `limits` array with `want` (any order). Each entry must have
/// exactly [`ENTRY_KEYS`] and a `resets_at` equal to its limit view's.
fn entries_match(client: &Client, limits: &Value, want: &[Entry]) -> Result<(), String> {
    let got = limits
        .as_array()
        .ok_or_else(|| format!("limits is not an array: {limits}"))?;
    let mut got = got.clone();
    got.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    let mut want = want.to_vec();
    want.sort_by_key(|e| e.0);
    let ids = |v: &[Value]| -> Vec<String> { v.iter().map(|e| e["id"].to_string()).collect() };
    if got.len() != want.len() {
        return Err(format!(
            "expected limits {:?}, got {:?}",
            want.iter().map(|e| e.0).collect::<Vec<_>>(),
            ids(&got)
        ));
    }
    for (g, &(id, metric, used, max, remaining)) in got.iter().zip(&want) {
        let keys: Vec<&str> = {
            let mut k: Vec<&str> = g
                .as_object()
                .map(|o| o.keys().map(String::as_str).collect())
                .unwrap_or_default();
            k.sort_unstable();
            k
        };
        let mut want_keys = ENTRY_KEYS.to_vec();
        want_keys.sort_unstable();
        if keys != want_keys {
            return Err(format!("entry fields {keys:?}, expected {want_keys:?}"));
        }
        try_matches(
            g,
            &json!({"id": id, "metric": metric, "used": used, "max": max, "remaining": remaining}),
        )?;
        let view = ok(client.get(&format!("/v1/limits/{id}")));
        if time(&g["resets_at"]) != time(&view["resets_at"]) {
            return Err(format!(
                "entry {id} resets_at {} != view resets_at {}",
                g["resets_at"], view["resets_at"]
            ));
        }
    }
    Ok(())
}

/// A limit body. `max` is sent as a JSON integer for `tokens` and `requests` (API.md:
/// "integer otherwise"), as a decimal for `cost`.
fn limit(scope: Value, metric: &str, max: f64, period: &str) -> Value {
    let max = if metric == "cost" {
        json!(max)
    } else {
        assert_eq!(max.fract(), 0.0, "integer max for {metric}");
        json!(max as u64)
    };
    json!({"scope": scope, "metric": metric, "max": max, "period": period})
}

/// `base` with `key` set to `value`.
fn with(base: &Value, key: &str, value: Value) -> Value {
    let mut v = base.clone();
    v[key] = value;
    v
}

/// `base` without `key`.
fn without(base: &Value, key: &str) -> Value {
    let mut v = base.clone();
    v.as_object_mut().expect("object").remove(key);
    v
}

/// Ids of the limits a `GET` of `path` lists, sorted.
fn listed_ids(client: &Client, path: &str) -> Vec<String> {
    let list = ok(client.get(path));
    assert_keys(&list, &["limits"]);
    sorted_by_id(&list["limits"])
        .iter()
        .map(|v| {
            assert_view(v);
            v["id"].as_str().expect("id").to_string()
        })
        .collect()
}

/// `n` distinct attributes with valid names.
fn attributes(n: usize) -> Value {
    let map: serde_json::Map<String, Value> = (0..n)
        .map(|i| (format!("dim_{i}"), json!(format!("v{i}"))))
        .collect();
    Value::Object(map)
}

// ---------------------------------------------------------------------------------------
// Limits.

/// Limits: create, read, list with a scope filter, replace, delete; views are complete and
/// consistent. Rejected requests change nothing (I8).
#[test]
fn limits_crud() {
    let node = Node::single();
    let c = node.client();
    let eng = limit(json!({"team": "eng"}), "cost", 100.0, "1d");
    check(
        &c,
        &[
            get("/v1/limits", gives(json!({"limits": []}))),
            get("/v1/limits/eng-daily", fails(404, "not_found")),
            put(
                "/v1/limits/eng-daily",
                eng.clone(),
                view(json!({
                    "id": "eng-daily", "scope": {"team": "eng"}, "metric": "cost", "max": 100.0,
                    "period": "1d", "calendar_aligned": false, "timezone": "UTC",
                    "used": 0.0, "remaining": 100.0,
                })),
            ),
            put(
                "/v1/limits/ops-tokens",
                json!({"scope": {"team": "ops"}, "metric": "tokens", "max": 5000, "period": "1h",
                       "calendar_aligned": true, "timezone": "Europe/Berlin"}),
                view(json!({
                    "id": "ops-tokens", "scope": {"team": "ops"}, "metric": "tokens",
                    "max": 5000, "period": "1h", "calendar_aligned": true,
                    "timezone": "Europe/Berlin", "used": 0, "remaining": 5000,
                })),
            ),
            put(
                "/v1/limits/global.rpm:1",
                limit(json!({}), "requests", 10.0, "1m"),
                view(json!({
                    "id": "global.rpm:1", "scope": {}, "metric": "requests", "max": 10,
                    "period": "1m", "used": 0, "remaining": 10,
                })),
            ),
            put(
                "/v1/limits/eng-gpt",
                limit(json!({"team": "eng", "model": "gpt-4o"}), "cost", 5.0, "1w"),
                view(json!({"id": "eng-gpt", "scope": {"team": "eng", "model": "gpt-4o"}})),
            ),
            get(
                "/v1/limits/ops-tokens",
                view(json!({"id": "ops-tokens", "max": 5000, "timezone": "Europe/Berlin"})),
            ),
            // `never` is a valid period.
            put(
                "/v1/limits/forever",
                limit(json!({"customer": "acme"}), "cost", 1.0, "never"),
                gives(json!({"id": "forever", "period": "never", "max": 1.0, "used": 0.0})),
            ),
            del("/v1/limits/forever", gives(json!({"deleted": true}))),
        ],
    );
    assert_eq!(
        listed_ids(&c, "/v1/limits"),
        ["eng-daily", "eng-gpt", "global.rpm:1", "ops-tokens"]
    );
    // The filter selects by the scope's `team` value.
    assert_eq!(
        listed_ids(&c, "/v1/limits?scope.team=eng"),
        ["eng-daily", "eng-gpt"]
    );
    assert_eq!(listed_ids(&c, "/v1/limits?scope.team=ops"), ["ops-tokens"]);
    assert!(listed_ids(&c, "/v1/limits?scope.team=nobody").is_empty());

    check(
        &c,
        &[
            // Replace: the new body wins entirely.
            put(
                "/v1/limits/eng-daily",
                with(&eng, "max", json!(50.0)),
                view(json!({"id": "eng-daily", "max": 50.0, "remaining": 50.0, "period": "1d"})),
            ),
            get("/v1/limits/eng-daily", view(json!({"max": 50.0}))),
            del("/v1/limits/global.rpm:1", gives(json!({"deleted": true}))),
            get("/v1/limits/global.rpm:1", fails(404, "not_found")),
            del("/v1/limits/global.rpm:1", fails(404, "not_found")),
            del("/v1/limits/never-existed", fails(404, "not_found")),
            // A deleted id can be created again.
            put(
                "/v1/limits/global.rpm:1",
                limit(json!({}), "requests", 20.0, "1m"),
                view(json!({"max": 20, "used": 0})),
            ),
        ],
    );
    // Deletion above is visible in the filtered and unfiltered lists.
    assert_eq!(
        listed_ids(&c, "/v1/limits"),
        ["eng-daily", "eng-gpt", "global.rpm:1", "ops-tokens"]
    );
}

/// Replacing a limit keeps its usage when only `max` changes and resets it when the period
/// changes; `reset` with `{}` zeroes usage and `{"used": X}` sets it; usage per node is
/// reported in `nodes` (I5: the epoch moves, counters are not rewritten; I8 on bad resets).
#[test]
fn limit_replace_and_reset() {
    let node = Node::single();
    let c = node.client();
    let id = node.node_id().to_string();
    let eng = limit(json!({"team": "eng"}), "cost", 100.0, "1d");
    let rec =
        |rid: &str, cost: f64| json!({"id": rid, "attributes": {"team": "eng"}, "cost": cost});
    // Records carry no tokens, so the tokens limit stays at 0 until its own reset.
    let both = |used: f64, max: f64, remaining: f64| {
        [
            ("eng", "cost", used, max, remaining),
            ("eng-tok", "tokens", 0.0, 10000.0, 10000.0),
        ]
    };
    check(
        &c,
        &[
            put("/v1/limits/eng", eng.clone(), view(json!({"used": 0.0}))),
            put(
                "/v1/limits/eng-tok",
                limit(json!({"team": "eng"}), "tokens", 10000.0, "1d"),
                view(json!({"used": 0})),
            ),
            post(
                "/v1/usage",
                rec("u1", 12.5),
                recorded(true, &both(12.5, 100.0, 87.5)),
            ),
            get(
                "/v1/limits/eng",
                view(json!({"used": 12.5, "remaining": 87.5, "nodes": {id.as_str(): 12.5}})),
            ),
            // Changing max is not a reset.
            put(
                "/v1/limits/eng",
                with(&eng, "max", json!(50.0)),
                view(json!({"max": 50.0, "used": 12.5, "remaining": 37.5})),
            ),
            // Changing the period is a reset.
            put(
                "/v1/limits/eng",
                with(&with(&eng, "max", json!(50.0)), "period", json!("2d")),
                view(json!({"period": "2d", "used": 0.0, "remaining": 50.0})),
            ),
            post(
                "/v1/usage",
                rec("u2", 5.0),
                recorded(true, &both(5.0, 50.0, 45.0)),
            ),
            post(
                "/v1/limits/eng/reset",
                json!({}),
                view(json!({"id": "eng", "used": 0.0, "remaining": 50.0})),
            ),
            get("/v1/limits/eng", view(json!({"used": 0.0}))),
            post(
                "/v1/limits/eng/reset",
                json!({"used": 40.0}),
                view(json!({"id": "eng", "used": 40.0, "remaining": 10.0})),
            ),
            post(
                "/v1/usage",
                rec("u3", 1.5),
                recorded(true, &both(41.5, 50.0, 8.5)),
            ),
            get(
                "/v1/limits/eng",
                view(json!({"used": 41.5, "remaining": 8.5})),
            ),
            // A reset does not forget idempotency ids (I2): u1 was applied before.
            post(
                "/v1/usage",
                rec("u1", 12.5),
                recorded(false, &both(41.5, 50.0, 8.5)),
            ),
            post(
                "/v1/limits/eng-tok/reset",
                json!({"used": 1000}),
                view(json!({"used": 1000, "remaining": 9000})),
            ),
            // Bad resets (I8).
            post("/v1/limits/nope/reset", json!({}), fails(404, "not_found")),
            post("/v1/limits/eng/reset", json!({"used": -1.0}), invalid()),
            post("/v1/limits/eng/reset", json!({"used": "40"}), invalid()),
            post("/v1/limits/eng/reset", json!({"bogus": 1}), invalid()),
            post("/v1/limits/eng/reset", json!({"used": 2e9}), invalid()),
            post_raw("/v1/limits/eng/reset", r#"{"used": 1e400}"#, invalid()),
            post_raw("/v1/limits/eng/reset", r#"{"used": "#, invalid()),
            post("/v1/limits/eng-tok/reset", json!({"used": 1.5}), invalid()),
            post("/v1/limits/eng-tok/reset", json!({"used": -3}), invalid()),
            get("/v1/limits/eng", view(json!({"used": 41.5}))),
            get("/v1/limits/eng-tok", view(json!({"used": 1000}))),
        ],
    );
}

// ---------------------------------------------------------------------------------------
// Entities.

/// Entities: write, read, replace, delete; cycles are rejected with 409 and change nothing
/// (I8); a record carrying only `virtual_key` is expanded through parents (two levels) and
/// counts against team and customer limits; after the entity is deleted it no longer is.
#[test]
fn entities_and_parent_expansion() {
    let node = Node::single();
    let c = node.client();
    let entity = |dim: &str, value: &str, parents: Value| json!({"dimension": dim, "value": value, "parents": parents});
    check(
        &c,
        &[
            get("/v1/entities/virtual_key/vk-1", fails(404, "not_found")),
            put(
                "/v1/entities/virtual_key/vk-1",
                json!({"parents": {"team": "eng"}}),
                gives(entity("virtual_key", "vk-1", json!({"team": "eng"}))),
            ),
            put(
                "/v1/entities/team/eng",
                json!({"parents": {"customer": "acme"}}),
                gives(entity("team", "eng", json!({"customer": "acme"}))),
            ),
            get(
                "/v1/entities/virtual_key/vk-1",
                gives(entity("virtual_key", "vk-1", json!({"team": "eng"}))),
            ),
            // vk-1 → team/eng → customer/acme → vk-1 would close a cycle.
            put(
                "/v1/entities/customer/acme",
                json!({"parents": {"virtual_key": "vk-1"}}),
                fails(409, "conflict"),
            ),
            get("/v1/entities/customer/acme", fails(404, "not_found")),
            // A two-entity cycle: team/t2 → customer/c2 → team/t2.
            put(
                "/v1/entities/team/t2",
                json!({"parents": {"customer": "c2"}}),
                gives(entity("team", "t2", json!({"customer": "c2"}))),
            ),
            put(
                "/v1/entities/customer/c2",
                json!({"parents": {"team": "t2"}}),
                fails(409, "conflict"),
            ),
            get("/v1/entities/customer/c2", fails(404, "not_found")),
            // The shortest cycle: an entity naming itself as its parent (409, not 400).
            put(
                "/v1/entities/team/self",
                json!({"parents": {"team": "self"}}),
                fails(409, "conflict"),
            ),
            get("/v1/entities/team/self", fails(404, "not_found")),
            // Re-pointing team/eng at vk-1 is a cycle too, and leaves the old parents.
            put(
                "/v1/entities/team/eng",
                json!({"parents": {"virtual_key": "vk-1"}}),
                fails(409, "conflict"),
            ),
            get(
                "/v1/entities/team/eng",
                gives(entity("team", "eng", json!({"customer": "acme"}))),
            ),
            put(
                "/v1/limits/team-eng",
                limit(json!({"team": "eng"}), "cost", 10.0, "1d"),
                view(json!({})),
            ),
            put(
                "/v1/limits/cust-acme",
                limit(json!({"customer": "acme"}), "cost", 100.0, "1d"),
                view(json!({})),
            ),
            put(
                "/v1/limits/vk-2",
                limit(json!({"virtual_key": "vk-2"}), "cost", 1.0, "1d"),
                view(json!({})),
            ),
            post(
                "/v1/usage",
                json!({"id": "r1", "attributes": {"virtual_key": "vk-1"}, "cost": 2.0}),
                recorded(
                    true,
                    &[
                        ("cust-acme", "cost", 2.0, 100.0, 98.0),
                        ("team-eng", "cost", 2.0, 10.0, 8.0),
                    ],
                ),
            ),
            post(
                "/v1/check",
                json!({"attributes": {"virtual_key": "vk-1"}, "cost": 8.0}),
                decision(
                    true,
                    &[],
                    &[
                        ("cust-acme", "cost", 2.0, 100.0, 98.0),
                        ("team-eng", "cost", 2.0, 10.0, 8.0),
                    ],
                ),
            ),
            post(
                "/v1/check",
                json!({"attributes": {"virtual_key": "vk-1"}, "cost": 8.000001}),
                decision(
                    false,
                    &["team-eng"],
                    &[
                        ("cust-acme", "cost", 2.0, 100.0, 98.0),
                        ("team-eng", "cost", 2.0, 10.0, 8.0),
                    ],
                ),
            ),
            // A request naming the team directly also reaches the customer.
            post(
                "/v1/check",
                json!({"attributes": {"team": "eng"}}),
                decision(
                    true,
                    &[],
                    &[
                        ("cust-acme", "cost", 2.0, 100.0, 98.0),
                        ("team-eng", "cost", 2.0, 10.0, 8.0),
                    ],
                ),
            ),
            del("/v1/entities/virtual_key/vk-1", status(200)),
            get("/v1/entities/virtual_key/vk-1", fails(404, "not_found")),
            // Without the entity, vk-1 reaches no limit.
            post(
                "/v1/usage",
                json!({"id": "r2", "attributes": {"virtual_key": "vk-1"}, "cost": 1.0}),
                recorded(true, &[]),
            ),
            get("/v1/limits/team-eng", view(json!({"used": 2.0}))),
            // Replace team/eng with no parents: the customer is no longer reached.
            put(
                "/v1/entities/team/eng",
                json!({"parents": {}}),
                gives(entity("team", "eng", json!({}))),
            ),
            post(
                "/v1/check",
                json!({"attributes": {"team": "eng"}}),
                decision(true, &[], &[("team-eng", "cost", 2.0, 10.0, 8.0)]),
            ),
            // Bad entity writes (I8).
            put("/v1/entities/Team/eng", json!({"parents": {}}), invalid()),
            put(
                "/v1/entities/team/eng",
                json!({"parents": {"Customer": "acme"}}),
                invalid(),
            ),
            put(
                "/v1/entities/team/eng",
                json!({"parents": "acme"}),
                invalid(),
            ),
            put(
                "/v1/entities/team/eng",
                json!({"parents": {}, "extra": 1}),
                invalid(),
            ),
            put(
                "/v1/entities/team/eng",
                json!({"parents": {"customer": 5}}),
                invalid(),
            ),
            get(
                "/v1/entities/team/eng",
                gives(entity("team", "eng", json!({}))),
            ),
        ],
    );
}

// ---------------------------------------------------------------------------------------
// Check.

/// Decisions: scopes match by subset; allowed iff for every limit `used + requested <= max`,
/// and `used < max` when nothing is requested; `denied_by` names exactly the limits that
/// deny; requests limits count 1 per check and per record (default); a check records
/// nothing; recording is never refused and `remaining` floors at 0.
#[test]
fn check_decisions() {
    let node = Node::single();
    let c = node.client();
    let eng = json!({"team": "eng"});
    let eng_gpt = json!({"team": "eng", "model": "gpt-4o", "provider": "openai"});
    let chk = |attrs: &Value, extra: Value| {
        let mut body = json!({"attributes": attrs});
        for (k, v) in extra.as_object().expect("object") {
            body[k] = v.clone();
        }
        body
    };
    let rec = |id: &str, attrs: &Value, extra: Value| {
        let mut body = chk(attrs, extra);
        body["id"] = json!(id);
        body
    };
    check(
        &c,
        &[
            put(
                "/v1/limits/cost-cap",
                limit(eng.clone(), "cost", 1.0, "1d"),
                view(json!({})),
            ),
            put(
                "/v1/limits/tok-cap",
                limit(
                    json!({"team": "eng", "model": "gpt-4o"}),
                    "tokens",
                    100.0,
                    "1d",
                ),
                view(json!({})),
            ),
            put(
                "/v1/limits/req-cap",
                limit(json!({"user": "u1"}), "requests", 2.0, "1d"),
                view(json!({})),
            ),
            put(
                "/v1/limits/zero-cap",
                limit(json!({"customer": "broke"}), "cost", 0.0, "1d"),
                view(json!({"max": 0.0, "remaining": 0.0})),
            ),
            // No limit applies: allowed with an empty list.
            post(
                "/v1/check",
                chk(&json!({"model": "gpt-4o"}), json!({"cost": 5.0})),
                decision(true, &[], &[]),
            ),
            post(
                "/v1/check",
                chk(&eng, json!({})),
                decision(true, &[], &[("cost-cap", "cost", 0.0, 1.0, 1.0)]),
            ),
            // Exactly at max is allowed (used + requested <= max).
            post(
                "/v1/check",
                chk(&eng_gpt, json!({"cost": 1.0, "tokens": 100})),
                decision(
                    true,
                    &[],
                    &[
                        ("cost-cap", "cost", 0.0, 1.0, 1.0),
                        ("tok-cap", "tokens", 0.0, 100.0, 100.0),
                    ],
                ),
            ),
            post(
                "/v1/check",
                chk(&eng_gpt, json!({"cost": 1.000001, "tokens": 100})),
                decision(
                    false,
                    &["cost-cap"],
                    &[
                        ("cost-cap", "cost", 0.0, 1.0, 1.0),
                        ("tok-cap", "tokens", 0.0, 100.0, 100.0),
                    ],
                ),
            ),
            post(
                "/v1/check",
                chk(&eng_gpt, json!({"cost": 0.5, "tokens": 101})),
                decision(
                    false,
                    &["tok-cap"],
                    &[
                        ("cost-cap", "cost", 0.0, 1.0, 1.0),
                        ("tok-cap", "tokens", 0.0, 100.0, 100.0),
                    ],
                ),
            ),
            post(
                "/v1/check",
                chk(&eng_gpt, json!({"cost": 2.0, "tokens": 200})),
                decision(
                    false,
                    &["cost-cap", "tok-cap"],
                    &[
                        ("cost-cap", "cost", 0.0, 1.0, 1.0),
                        ("tok-cap", "tokens", 0.0, 100.0, 100.0),
                    ],
                ),
            ),
            // max 0: nothing requested still needs used < max.
            post(
                "/v1/check",
                chk(&json!({"customer": "broke"}), json!({})),
                decision(false, &["zero-cap"], &[("zero-cap", "cost", 0.0, 0.0, 0.0)]),
            ),
            post(
                "/v1/usage",
                rec("u1", &eng_gpt, json!({"cost": 0.5, "tokens": 60})),
                recorded(
                    true,
                    &[
                        ("cost-cap", "cost", 0.5, 1.0, 0.5),
                        ("tok-cap", "tokens", 60.0, 100.0, 40.0),
                    ],
                ),
            ),
            post(
                "/v1/check",
                chk(&eng_gpt, json!({})),
                decision(
                    true,
                    &[],
                    &[
                        ("cost-cap", "cost", 0.5, 1.0, 0.5),
                        ("tok-cap", "tokens", 60.0, 100.0, 40.0),
                    ],
                ),
            ),
            post(
                "/v1/check",
                chk(&eng_gpt, json!({"tokens": 40})),
                decision(
                    true,
                    &[],
                    &[
                        ("cost-cap", "cost", 0.5, 1.0, 0.5),
                        ("tok-cap", "tokens", 60.0, 100.0, 40.0),
                    ],
                ),
            ),
            post(
                "/v1/check",
                chk(&eng_gpt, json!({"tokens": 41})),
                decision(
                    false,
                    &["tok-cap"],
                    &[
                        ("cost-cap", "cost", 0.5, 1.0, 0.5),
                        ("tok-cap", "tokens", 60.0, 100.0, 40.0),
                    ],
                ),
            ),
            post(
                "/v1/usage",
                rec("u2", &eng_gpt, json!({"cost": 0.5, "tokens": 40})),
                recorded(
                    true,
                    &[
                        ("cost-cap", "cost", 1.0, 1.0, 0.0),
                        ("tok-cap", "tokens", 100.0, 100.0, 0.0),
                    ],
                ),
            ),
            // used == max and nothing requested: denied by both.
            post(
                "/v1/check",
                chk(&eng_gpt, json!({"cost": 0.0, "tokens": 0})),
                decision(
                    false,
                    &["cost-cap", "tok-cap"],
                    &[
                        ("cost-cap", "cost", 1.0, 1.0, 0.0),
                        ("tok-cap", "tokens", 100.0, 100.0, 0.0),
                    ],
                ),
            ),
            post(
                "/v1/check",
                chk(&eng, json!({})),
                decision(false, &["cost-cap"], &[("cost-cap", "cost", 1.0, 1.0, 0.0)]),
            ),
            // Requests: a check asks for 1.
            post(
                "/v1/check",
                chk(&json!({"user": "u1"}), json!({})),
                decision(true, &[], &[("req-cap", "requests", 0.0, 2.0, 2.0)]),
            ),
            post(
                "/v1/usage",
                rec("q1", &json!({"user": "u1"}), json!({})),
                recorded(true, &[("req-cap", "requests", 1.0, 2.0, 1.0)]),
            ),
            post(
                "/v1/check",
                chk(&json!({"user": "u1"}), json!({})),
                decision(true, &[], &[("req-cap", "requests", 1.0, 2.0, 1.0)]),
            ),
            post(
                "/v1/usage",
                rec(
                    "q2",
                    &json!({"user": "u1", "model": "m"}),
                    json!({"cost": 0.1}),
                ),
                recorded(true, &[("req-cap", "requests", 2.0, 2.0, 0.0)]),
            ),
            post(
                "/v1/check",
                chk(&json!({"user": "u1"}), json!({})),
                decision(
                    false,
                    &["req-cap"],
                    &[("req-cap", "requests", 2.0, 2.0, 0.0)],
                ),
            ),
            // Recording is never refused, even past max; remaining floors at 0.
            post(
                "/v1/usage",
                rec("q3", &json!({"user": "u1"}), json!({"requests": 3})),
                recorded(true, &[("req-cap", "requests", 5.0, 2.0, 0.0)]),
            ),
            post(
                "/v1/usage",
                rec("q4", &json!({"user": "u1"}), json!({"requests": 0})),
                recorded(true, &[("req-cap", "requests", 5.0, 2.0, 0.0)]),
            ),
            // None of the checks above recorded anything.
            get("/v1/limits/cost-cap", view(json!({"used": 1.0}))),
            get("/v1/limits/tok-cap", view(json!({"used": 100}))),
            get(
                "/v1/limits/req-cap",
                view(json!({"used": 5, "remaining": 0})),
            ),
            get("/v1/limits/zero-cap", view(json!({"used": 0.0}))),
        ],
    );
}

// ---------------------------------------------------------------------------------------
// Usage.

/// I2 at the edge of the window: a record is accepted while its `at` is inside the window
/// and `at` may be up to 5 minutes ahead, so its id must be remembered until `at + window`.
/// It used to be forgotten at (apply time + window): with a 5 s window and `at` 4 minutes
/// ahead, the same record sent again 8 s later was applied twice (used 14, not 7).
#[test]
fn dedup_window_covers_a_future_at() {
    let node = Node::start(NodeOpts::default().args(["--dedup-window-secs", "5"]));
    let c = node.client();
    ok(c.put(
        "/v1/limits/edge",
        limit(json!({"team": "eng"}), "tokens", 1000.0, "never"),
    ));
    let at = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(240);
    let rec = json!({"id": "edge-1", "attributes": {"team": "eng"}, "tokens": 7,
                     "at": at.to_string()});
    assert_eq!(ok(c.post("/v1/usage", rec.clone()))["applied"], json!(true));
    // Past the 5 s window counted from the apply time, and past the writer's once-a-second
    // expiry of ids.
    std::thread::sleep(std::time::Duration::from_secs(8));
    assert_eq!(
        ok(c.post("/v1/usage", rec))["applied"],
        json!(false),
        "the id was forgotten while the record could still be accepted"
    );
    assert_eq!(count(&ok(c.get("/v1/limits/edge"))["used"]), 7);
}

/// Usage idempotency (I2): a repeated id is answered `applied: false` and changes nothing,
/// whatever the repeat carries; one record updates every metric it names.
#[test]
fn usage_is_idempotent() {
    let node = Node::single();
    let c = node.client();
    let scope = json!({"virtual_key": "vk-1"});
    let attrs = json!({"virtual_key": "vk-1", "model": "gpt-4o"});
    let after_one = [
        ("vk-cost", "cost", 0.0123, 100.0, 99.9877),
        ("vk-req", "requests", 1.0, 1000.0, 999.0),
        ("vk-tok", "tokens", 1800.0, 1e6, 998200.0),
    ];
    check(
        &c,
        &[
            put(
                "/v1/limits/vk-cost",
                limit(scope.clone(), "cost", 100.0, "1d"),
                view(json!({})),
            ),
            put(
                "/v1/limits/vk-tok",
                limit(scope.clone(), "tokens", 1e6, "1d"),
                view(json!({})),
            ),
            put(
                "/v1/limits/vk-req",
                limit(scope.clone(), "requests", 1000.0, "1d"),
                view(json!({})),
            ),
            post(
                "/v1/usage",
                json!({"id": "req-7f3a", "attributes": attrs, "cost": 0.0123, "tokens": 1800,
                       "requests": 1}),
                recorded(true, &after_one),
            ),
            post(
                "/v1/usage",
                json!({"id": "req-7f3a", "attributes": attrs, "cost": 0.0123, "tokens": 1800,
                       "requests": 1}),
                recorded(false, &after_one),
            ),
            // Same id, different content: still the same record.
            post(
                "/v1/usage",
                json!({"id": "req-7f3a", "attributes": attrs, "cost": 5.0, "tokens": 1}),
                recorded(false, &after_one),
            ),
            get("/v1/limits/vk-cost", view(json!({"used": 0.0123}))),
            get("/v1/limits/vk-tok", view(json!({"used": 1800}))),
            get("/v1/limits/vk-req", view(json!({"used": 1}))),
            // Ids are case-sensitive and use the whole pattern.
            post(
                "/v1/usage",
                json!({"id": "REQ-7f3a", "attributes": attrs, "tokens": 200}),
                recorded(
                    true,
                    &[
                        ("vk-cost", "cost", 0.0123, 100.0, 99.9877),
                        ("vk-req", "requests", 2.0, 1000.0, 998.0),
                        ("vk-tok", "tokens", 2000.0, 1e6, 998000.0),
                    ],
                ),
            ),
            post(
                "/v1/usage",
                json!({"id": format!("A.b_c:d-{}", "9".repeat(120)), "attributes": attrs}),
                recorded(
                    true,
                    &[
                        ("vk-cost", "cost", 0.0123, 100.0, 99.9877),
                        ("vk-req", "requests", 3.0, 1000.0, 997.0),
                        ("vk-tok", "tokens", 2000.0, 1e6, 998000.0),
                    ],
                ),
            ),
        ],
    );
    // Dedup survives a restart (I2, persisted).
    let mut node = node;
    node.restart();
    check(
        &node.client(),
        &[post(
            "/v1/usage",
            json!({"id": "req-7f3a", "attributes": attrs, "cost": 0.0123}),
            recorded(
                false,
                &[
                    ("vk-cost", "cost", 0.0123, 100.0, 99.9877),
                    ("vk-req", "requests", 3.0, 1000.0, 997.0),
                    ("vk-tok", "tokens", 2000.0, 1e6, 998000.0),
                ],
            ),
        )],
    );
}

/// Batches: one result per record in order, dedup against earlier records, exactly 1000
/// records accepted, all-or-nothing validation (I8: a batch with one bad record, or 1001
/// records, applies nothing and marks no id as seen).
#[test]
fn usage_batch() {
    let node = Node::single();
    let c = node.client();
    let scope = json!({"team": "eng"});
    let rec = |id: &str, cost: f64| json!({"id": id, "attributes": {"team": "eng"}, "cost": cost});
    check(
        &c,
        &[
            put(
                "/v1/limits/cost",
                limit(scope.clone(), "cost", 1000.0, "1d"),
                view(json!({})),
            ),
            put(
                "/v1/limits/req",
                limit(scope.clone(), "requests", 1e6, "1d"),
                view(json!({})),
            ),
            post(
                "/v1/usage",
                rec("b2", 0.25),
                recorded(
                    true,
                    &[
                        ("cost", "cost", 0.25, 1000.0, 999.75),
                        ("req", "requests", 1.0, 1e6, 999999.0),
                    ],
                ),
            ),
        ],
    );
    let (status, reply) = c.post(
        "/v1/usage/batch",
        json!({"records": [rec("b1", 1.0), rec("b2", 0.25), rec("b3", 0.5)]}),
    );
    assert_eq!(status, 200, "{reply}");
    assert_keys(&reply, &["results"]);
    assert_eq!(
        reply["results"],
        json!([
            {"id": "b1", "applied": true},
            {"id": "b2", "applied": false},
            {"id": "b3", "applied": true},
        ])
    );
    let bad_batch = |records: Vec<Value>| json!({"records": records});
    let thousand: Vec<Value> = (0..1000).map(|i| rec(&format!("k-{i}"), 0.001)).collect();
    let mut too_many: Vec<Value> = (0..1001).map(|i| rec(&format!("m-{i}"), 0.001)).collect();
    check(
        &c,
        &[
            get("/v1/limits/cost", view(json!({"used": 1.75}))),
            get("/v1/limits/req", view(json!({"used": 3}))),
            // One bad record rejects the whole batch.
            post(
                "/v1/usage/batch",
                bad_batch(vec![rec("c1", 1.0), rec("c2", -1.0), rec("c3", 1.0)]),
                invalid(),
            ),
            post(
                "/v1/usage/batch",
                bad_batch(vec![rec("c1", 1.0), rec("c 2", 1.0)]),
                invalid(),
            ),
            post(
                "/v1/usage/batch",
                bad_batch(vec![rec("c1", 1.0), json!({"attributes": {}})]),
                invalid(),
            ),
            post("/v1/usage/batch", bad_batch(too_many.clone()), invalid()),
            post("/v1/usage/batch", json!({"records": {}}), invalid()),
            post("/v1/usage/batch", json!({"records": [], "x": 1}), invalid()),
            post("/v1/usage/batch", json!([rec("c1", 1.0)]), invalid()),
            // None of c1, c3, m-0 was marked as seen.
            post(
                "/v1/usage",
                rec("c1", 1.0),
                recorded(
                    true,
                    &[
                        ("cost", "cost", 2.75, 1000.0, 997.25),
                        ("req", "requests", 4.0, 1e6, 999996.0),
                    ],
                ),
            ),
        ],
    );
    let (status, reply) = c.post("/v1/usage/batch", json!({ "records": thousand }));
    assert_eq!(status, 200, "{reply}");
    let results = reply["results"].as_array().expect("results array");
    assert_eq!(results.len(), 1000);
    for (i, r) in results.iter().enumerate() {
        assert_eq!(*r, json!({"id": format!("k-{i}"), "applied": true}));
    }
    // m-0 .. m-999 were never applied: the 1001-record batch changed nothing.
    too_many.truncate(1000);
    let (status, reply) = c.post("/v1/usage/batch", json!({ "records": too_many }));
    assert_eq!(status, 200, "{reply}");
    assert!(
        reply["results"]
            .as_array()
            .expect("results array")
            .iter()
            .all(|r| r["applied"] == json!(true)),
        "{reply}"
    );
    check(
        &c,
        &[
            get(
                "/v1/limits/cost",
                view(json!({"used": 4.75, "remaining": 995.25})),
            ),
            get("/v1/limits/req", view(json!({"used": 2004}))),
        ],
    );
}

/// Money is integer micro-USD, each amount rounded to the nearest micro on its own; the
/// decision compares exact micros.
#[test]
fn money_rounds_to_micro_usd() {
    let node = Node::single();
    let c = node.client();
    let rec =
        |id: &str, cost: f64| json!({"id": id, "attributes": {"customer": "r"}, "cost": cost});
    let entry = |used: f64, remaining: f64| [("round", "cost", used, 1000.0, remaining)];
    check(
        &c,
        &[
            put(
                "/v1/limits/round",
                limit(json!({"customer": "r"}), "cost", 1000.0, "1d"),
                view(json!({})),
            ),
            // 0.4 micro rounds to 0.
            post(
                "/v1/usage",
                rec("a", 0.0000004),
                recorded(true, &entry(0.0, 1000.0)),
            ),
            // 0.6 micro rounds to 1 (not accumulated with the 0.4 above).
            post(
                "/v1/usage",
                rec("b", 0.0000006),
                recorded(true, &entry(0.000001, 999.999999)),
            ),
            post(
                "/v1/usage",
                rec("c", 0.0123),
                recorded(true, &entry(0.012301, 999.987699)),
            ),
            post(
                "/v1/usage",
                rec("d", 1.0000014),
                recorded(true, &entry(1.012302, 998.987698)),
            ),
            post(
                "/v1/usage",
                rec("e", 0.0000016),
                recorded(true, &entry(1.012304, 998.987696)),
            ),
            // 1.012304 + 998.987696 = 1000 exactly: allowed; one micro more is not.
            post(
                "/v1/check",
                json!({"attributes": {"customer": "r"}, "cost": 998.987696}),
                decision(true, &[], &entry(1.012304, 998.987696)),
            ),
            post(
                "/v1/check",
                json!({"attributes": {"customer": "r"}, "cost": 998.987697}),
                decision(false, &["round"], &entry(1.012304, 998.987696)),
            ),
        ],
    );
    let v = ok(c.get("/v1/limits/round"));
    assert_eq!(micros(&v["used"]), 1_012_304);
    assert_eq!(micros(&v["remaining"]), 998_987_696);
}

// ---------------------------------------------------------------------------------------
// Operations.

/// Health, readiness of a lone node, cluster view of one live node, Prometheus metrics;
/// the node id is stable across restarts while the generation changes (DESIGN.md §4).
#[test]
fn operations() {
    let mut node = Node::single();
    let id = node.node_id().to_string();
    let cluster = |node: &Node| {
        let v = ok(node.get("/v1/cluster"));
        assert_keys(&v, &["node_id", "nodes"]);
        assert_eq!(v["node_id"], json!(id));
        let nodes = v["nodes"].as_array().expect("nodes array");
        assert_eq!(nodes.len(), 1, "{v}");
        assert_keys(
            &nodes[0],
            &[
                "node_id",
                "gossip_addr",
                "live",
                "generation",
                "newest_value_age_ms",
            ],
        );
        assert_eq!(nodes[0]["node_id"], json!(id), "{v}");
        // A lone node has no peer whose gossip could lag.
        assert_eq!(nodes[0]["newest_value_age_ms"], Value::Null, "{v}");
        assert_eq!(nodes[0]["live"], json!(true), "{v}");
        assert!(nodes[0]["generation"].is_u64(), "{v}");
        nodes[0]["generation"].clone()
    };
    check(
        &node.client(),
        &[get("/healthz", status(200)), get("/readyz", status(200))],
    );
    let generation = cluster(&node);
    let (code, text) = node.client().get_text("/metrics");
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("# TYPE "), "not Prometheus text:\n{text}");

    node.restart();
    assert_eq!(node.node_id(), id, "node id is persisted");
    let again = cluster(&node);
    assert_ne!(again, generation, "generation changes on every start");
    check(&node.client(), &[get("/healthz", status(200))]);
}

// ---------------------------------------------------------------------------------------
// Bad input.

/// I8: every malformed or out-of-range request gets its exact 4xx and the error shape,
/// leaves every limit view unchanged (checked after each step by `check`), and marks no
/// usage id as seen (checked at the end: every well-formed id used in a rejected record can
/// still be applied).
#[test]
fn bad_input_changes_nothing() {
    let node = Node::single();
    let c = node.client();
    let eng = json!({"team": "eng"});
    let cost_limit = limit(eng.clone(), "cost", 100.0, "1d");
    check(
        &c,
        &[
            put("/v1/limits/eng-cost", cost_limit.clone(), view(json!({}))),
            put(
                "/v1/limits/eng-tok",
                limit(eng.clone(), "tokens", 1e6, "1d"),
                view(json!({})),
            ),
            put(
                "/v1/limits/eng-req",
                limit(eng.clone(), "requests", 1000.0, "1d"),
                view(json!({})),
            ),
            post(
                "/v1/usage",
                json!({"id": "seed", "attributes": eng, "cost": 1.5, "tokens": 10}),
                recorded(
                    true,
                    &[
                        ("eng-cost", "cost", 1.5, 100.0, 98.5),
                        ("eng-req", "requests", 1.0, 1000.0, 999.0),
                        ("eng-tok", "tokens", 10.0, 1e6, 999990.0),
                    ],
                ),
            ),
        ],
    );

    let l = "/v1/limits/eng-cost";
    let tok_limit = limit(eng.clone(), "tokens", 1e6, "1d");
    let mut steps = vec![
        // Limits: fields, types, ranges, periods, timezones (onto an existing limit).
        put(l, with(&cost_limit, "colour", json!("red")), invalid()),
        put(l, with(&cost_limit, "metric", json!("dollars")), invalid()),
        put(l, with(&cost_limit, "metric", json!(5)), invalid()),
        put(l, with(&cost_limit, "max", json!("100")), invalid()),
        put(l, with(&cost_limit, "max", json!(-1.0)), invalid()),
        put(l, with(&cost_limit, "max", Value::Null), invalid()),
        put(l, with(&tok_limit, "max", json!(1.5)), invalid()),
        put(
            l,
            with(
                &with(&cost_limit, "metric", json!("requests")),
                "max",
                json!(2.5),
            ),
            invalid(),
        ),
        put(l, with(&cost_limit, "period", json!(7)), invalid()),
        put(
            l,
            with(&cost_limit, "timezone", json!("Mars/Olympus")),
            invalid(),
        ),
        put(l, with(&cost_limit, "timezone", json!("")), invalid()),
        put(
            l,
            with(&cost_limit, "calendar_aligned", json!("yes")),
            invalid(),
        ),
        put(
            l,
            with(&cost_limit, "scope", json!({"Team": "eng"})),
            invalid(),
        ),
        put(l, with(&cost_limit, "scope", json!({"team": 5})), invalid()),
        put(l, with(&cost_limit, "scope", json!(["team"])), invalid()),
        put(
            l,
            with(&cost_limit, "scope", json!({"t".repeat(33): "x"})),
            invalid(),
        ),
        put(
            l,
            with(&cost_limit, "scope", json!({"te-am": "x"})),
            invalid(),
        ),
        put(l, without(&cost_limit, "metric"), invalid()),
        put(l, without(&cost_limit, "max"), invalid()),
        put(l, without(&cost_limit, "period"), invalid()),
        put_raw(
            l,
            r#"{"scope": {"team": "eng"}, "metric": "cost", "#,
            invalid(),
        ),
        put_raw(
            l,
            r#"{"scope": {}, "metric": "cost", "max": 1e400, "period": "1d"}"#,
            invalid(),
        ),
        // Empty body: whether read as `{}` or as malformed, required fields are missing.
        put_raw(l, "", invalid()),
        // Limit ids out of `[A-Za-z0-9._:-]{1,128}`.
        put(
            format!("/v1/limits/{}", "a".repeat(129)),
            cost_limit.clone(),
            invalid(),
        ),
        put("/v1/limits/a%2Fb", cost_limit.clone(), invalid()),
        put("/v1/limits/a%20b", cost_limit.clone(), invalid()),
        put("/v1/limits/a%24b", cost_limit.clone(), invalid()),
        put("/v1/limits/%C3%A9", cost_limit.clone(), invalid()),
        // Resets and deletes of unknown limits.
        post("/v1/limits/nope/reset", json!({}), fails(404, "not_found")),
        post(
            "/v1/limits/nope/reset",
            json!({"used": 40.0}),
            fails(404, "not_found"),
        ),
        del("/v1/limits/nope", fails(404, "not_found")),
        // Check: attributes, numbers, fields, JSON.
        post("/v1/check", json!({"attributes": attributes(9)}), invalid()),
        post(
            "/v1/check",
            json!({"attributes": {"t".repeat(33): "x"}}),
            invalid(),
        ),
        post(
            "/v1/check",
            json!({"attributes": {"Team": "eng"}}),
            invalid(),
        ),
        post(
            "/v1/check",
            json!({"attributes": {"te-am": "eng"}}),
            invalid(),
        ),
        post("/v1/check", json!({"attributes": {"": "eng"}}), invalid()),
        post("/v1/check", json!({"attributes": ["team"]}), invalid()),
        post("/v1/check", json!({"attributes": {"team": 5}}), invalid()),
        post(
            "/v1/check",
            json!({"attributes": eng, "cost": -0.01}),
            invalid(),
        ),
        post(
            "/v1/check",
            json!({"attributes": eng, "cost": "0.1"}),
            invalid(),
        ),
        post(
            "/v1/check",
            json!({"attributes": eng, "cost": 1_000_000_001.0}),
            invalid(),
        ),
        post_raw(
            "/v1/check",
            r#"{"attributes": {"team": "eng"}, "cost": 1e400}"#,
            invalid(),
        ),
        post_raw(
            "/v1/check",
            r#"{"attributes": {"team": "eng"}, "cost": NaN}"#,
            invalid(),
        ),
        post(
            "/v1/check",
            json!({"attributes": eng, "tokens": -1}),
            invalid(),
        ),
        post(
            "/v1/check",
            json!({"attributes": eng, "tokens": 1.5}),
            invalid(),
        ),
        post(
            "/v1/check",
            json!({"attributes": eng, "tokens": 1_000_000_000_000_001u64}),
            invalid(),
        ),
        post("/v1/check", json!({"attributes": eng, "foo": 1}), invalid()),
        post_raw("/v1/check", r#"{"attributes": "#, invalid()),
        post_raw("/v1/check", "[]", invalid()),
        // The boundaries themselves are accepted (and a check changes nothing).
        post(
            "/v1/check",
            json!({"attributes": attributes(8)}),
            decision(true, &[], &[]),
        ),
        post(
            "/v1/check",
            json!({"attributes": {"t".repeat(32): "x"}, "cost": 1e9,
                   "tokens": 1_000_000_000_000_000u64}),
            decision(true, &[], &[]),
        ),
    ];

    // Arrays in place of objects: serde would read them as the fields in order (I8).
    steps.extend([
        post_raw("/v1/check", r#"[{"team": "eng"}, 0.5, 5]"#, invalid()),
        post_raw(
            "/v1/check",
            r#"{"attributes": [["team", "eng"]]}"#,
            invalid(),
        ),
        put_raw(
            l,
            r#"[{"team": "eng"}, "cost", 5, "1d", false, "UTC"]"#,
            invalid(),
        ),
        put_raw(
            l,
            r#"{"scope": [["team", "eng"]], "metric": "cost", "max": 5, "period": "1d"}"#,
            invalid(),
        ),
        post_raw("/v1/limits/eng-cost/reset", "[40.0]", invalid()),
        post_raw("/v1/limits/eng-cost/reset", "[]", invalid()),
        put_raw(
            "/v1/entities/virtual_key/vk-arr",
            r#"[{"team": "eng"}]"#,
            invalid(),
        ),
        get("/v1/entities/virtual_key/vk-arr", fails(404, "not_found")),
        put_raw(
            "/v1/entities/virtual_key/vk-arr",
            r#"{"parents": [["team", "eng"]]}"#,
            invalid(),
        ),
        get("/v1/entities/virtual_key/vk-arr", fails(404, "not_found")),
        post_raw(
            "/v1/usage",
            r#"["arr-1", {"team": "eng"}, 0.5, 5, 1, null]"#,
            invalid(),
        ),
        post_raw(
            "/v1/usage/batch",
            r#"[[{"id": "arr-2", "attributes": {"team": "eng"}, "cost": 0.5}]]"#,
            invalid(),
        ),
        post_raw(
            "/v1/usage/batch",
            r#"{"records": [["arr-3", {"team": "eng"}, 0.5, 5, 1, null]]}"#,
            invalid(),
        ),
        post_raw(
            "/v1/usage/batch",
            r#"{"records": [{"id": "arr-4", "attributes": {"team": "eng"}}, ["arr-5", {}, 0.5]]}"#,
            invalid(),
        ),
    ]);

    // Usage: each rejected record has a fresh well-formed id where it can, so the probe at
    // the end can show the id was not marked as seen.
    let mut n = 0;
    let mut rec = |extra: Value| {
        n += 1;
        let mut r = json!({"id": format!("bad-{n}"), "attributes": {"team": "eng"},
                           "cost": 1.0, "tokens": 10, "requests": 1});
        for (k, v) in extra.as_object().expect("object") {
            r[k] = v.clone();
        }
        r
    };
    let u = "/v1/usage";
    let usage_cases = vec![
        without(&rec(json!({})), "id"),
        rec(json!({"id": ""})),
        rec(json!({"id": "a".repeat(129)})),
        rec(json!({"id": "a b"})),
        rec(json!({"id": "a/b"})),
        rec(json!({"id": "é"})),
        rec(json!({"id": 5})),
        rec(json!({"cost": -1.0})),
        rec(json!({"cost": "1"})),
        rec(json!({"cost": 1_000_000_001.0})),
        rec(json!({"cost": 2e9})),
        rec(json!({"tokens": 1_000_000_000_000_001u64})),
        rec(json!({"tokens": -5})),
        rec(json!({"tokens": 2.5})),
        rec(json!({"requests": 1_000_000_000_000_001u64})),
        rec(json!({"requests": -1})),
        rec(json!({"requests": 1.5})),
        rec(json!({"attributes": attributes(9)})),
        rec(json!({"attributes": {"Team": "eng"}})),
        rec(json!({"attributes": {"t".repeat(33): "eng"}})),
        rec(json!({"attributes": {"team": 5}})),
        rec(json!({"attributes": "team=eng"})),
        rec(json!({"at": "yesterday"})),
        rec(json!({"at": "2026-13-01T00:00:00Z"})),
        rec(json!({"at": 5})),
        rec(json!({"colour": "red"})),
    ];
    let mut probe_ids: Vec<String> = Vec::new();
    for body in usage_cases {
        if let Some(id) = body["id"].as_str().filter(|id| is_valid_id(id)) {
            probe_ids.push(id.to_string());
        }
        steps.push(post(u, body, invalid()));
    }
    steps.extend([
        post_raw(
            u,
            r#"{"id": "bad-raw-1", "attributes": {"team": "eng"}, "cost": 1e400}"#,
            invalid(),
        ),
        post_raw(
            u,
            r#"{"id": "bad-raw-2", "attributes": {"team": "eng"}, "cost": NaN}"#,
            invalid(),
        ),
        post_raw(
            u,
            r#"{"id": "bad-raw-3", "attributes": {"team": "eng"}, "cost": 1.0"#,
            invalid(),
        ),
        // Empty body: no `id` either way.
        post_raw(u, "", invalid()),
    ]);
    probe_ids.extend(["bad-raw-1".into(), "bad-raw-2".into(), "bad-raw-3".into()]);
    probe_ids.extend((1..=5).map(|i| format!("arr-{i}")));

    // Bodies over 1 MiB.
    let big = format!(
        r#"{{"id": "bad-big", "attributes": {{"team": "{}"}}, "cost": 1.0}}"#,
        "x".repeat((1 << 20) + 1024)
    );
    steps.push(post_huge(u, big.clone(), fails(413, "payload_too_large")));
    steps.push(post_huge(
        "/v1/usage/batch",
        format!(r#"{{"records": [{big}]}}"#),
        fails(413, "payload_too_large"),
    ));
    probe_ids.push("bad-big".into());

    // Batches: too many records, one bad record.
    let batch_rec = |id: String| json!({"id": id, "attributes": {"team": "eng"}, "cost": 0.5});
    let too_many: Vec<Value> = (0..1001).map(|i| batch_rec(format!("bm-{i}"))).collect();
    steps.push(post(
        "/v1/usage/batch",
        json!({ "records": too_many }),
        invalid(),
    ));
    probe_ids.extend((0..1001).map(|i| format!("bm-{i}")));
    let mut one_bad: Vec<Value> = (0..3).map(|i| batch_rec(format!("bb-{i}"))).collect();
    one_bad[1]["tokens"] = json!(-1);
    steps.push(post(
        "/v1/usage/batch",
        json!({ "records": one_bad }),
        invalid(),
    ));
    probe_ids.extend((0..3).map(|i| format!("bb-{i}")));

    check(&c, &steps);

    // Nothing changed, and no rejected id was marked as seen (probes reach no limit).
    let before = limit_views(&c);
    assert_eq!(micros(&before[0]["used"]), 1_500_000, "{:?}", before);
    for chunk in probe_ids.chunks(1000) {
        let records: Vec<Value> = chunk
            .iter()
            .map(|id| json!({"id": id, "attributes": {"team": "probe"}, "cost": 0.0}))
            .collect();
        let reply = ok(c.post("/v1/usage/batch", json!({ "records": records })));
        let results = reply["results"].as_array().expect("results");
        assert_eq!(results.len(), chunk.len());
        for (id, r) in chunk.iter().zip(results) {
            assert_eq!(
                *r,
                json!({"id": id, "applied": true}),
                "id {id} was marked as seen by a rejected request"
            );
        }
    }
    assert_eq!(limit_views(&c), before);
}

/// A body of ~1 MiB holding ~80 000 distinct names in one map is refused at the ninth
/// name, for every map a client can send (attributes of check and usage, a limit's scope,
/// an entity's parents), and changes nothing (I8). Reading every name before refusing
/// once cost seconds of CPU per request (the map was searched linearly per name).
#[test]
fn huge_maps_are_refused_at_the_cap() {
    let node = Node::single();
    let c = node.client();
    let names: String = (0..80_000)
        .map(|i| format!(r#""a{i}":"x""#))
        .collect::<Vec<_>>()
        .join(",");
    let map = format!("{{{names}}}");
    assert!(
        map.len() < 1 << 20,
        "the body must stay under the 1 MiB cap"
    );
    let cases = [
        (
            "POST",
            "/v1/check".to_string(),
            format!(r#"{{"attributes":{map}}}"#),
        ),
        (
            "POST",
            "/v1/usage".to_string(),
            format!(r#"{{"id":"huge-1","attributes":{map}}}"#),
        ),
        (
            "PUT",
            "/v1/limits/huge".to_string(),
            format!(r#"{{"scope":{map},"metric":"requests","max":5,"period":"1d"}}"#),
        ),
        (
            "PUT",
            "/v1/entities/team/huge".to_string(),
            format!(r#"{{"parents":{map}}}"#),
        ),
    ];
    for (method, path, body) in &cases {
        let reply = match *method {
            "PUT" => c.put_raw(path, body.as_bytes()),
            _ => c.post_raw(path, body.as_bytes()),
        };
        assert_eq!(reply.0, 400, "{method} {path}: {}", reply.1);
        assert_eq!(reply.1["error"]["code"], "invalid_argument", "{}", reply.1);
        let msg = reply.1["error"]["message"].as_str().unwrap_or_default();
        assert!(
            msg.contains("more than 8 entries"),
            "{method} {path}: refused after reading the whole map: {msg}"
        );
    }
    assert_eq!(c.get("/v1/limits/huge").0, 404);
    assert_eq!(c.get("/v1/entities/team/huge").0, 404);
    let recorded = ok(c.post(
        "/v1/usage",
        json!({"id": "huge-1", "attributes": {"team": "x"}}),
    ));
    assert_eq!(
        recorded["applied"],
        json!(true),
        "the refused id was not marked as seen"
    );
}

// ---------------------------------------------------------------------------------------
// Auth.

/// Auth (DESIGN.md §4, I8 for rejected calls): no or unknown token → 401; the client token
/// may check, record and read but not write config or reset → 403; the admin token may do
/// everything; `/healthz` and `/metrics` need no token.
#[test]
fn auth_roles() {
    let node = Node::start(
        NodeOpts::default()
            .arg("--admin-token")
            .arg("adm")
            .arg("--client-token")
            .arg("cli"),
    );
    let admin = node.client_as(Some("adm"));
    let eng = limit(json!({"team": "eng"}), "cost", 100.0, "1d");
    let usage = |id: &str| json!({"id": id, "attributes": {"team": "eng"}, "cost": 1.0});
    let chk = json!({"attributes": {"team": "eng"}});
    let unauth = || fails(401, "unauthenticated");
    let denied = || fails(403, "permission_denied");
    check(
        &admin,
        &[
            get("/healthz", status(200)).no_token(),
            get("/metrics", status(200)).no_token(),
            // Admin: everything.
            put("/v1/limits/eng", eng.clone(), view(json!({"id": "eng"}))).token("adm"),
            get("/v1/limits/eng", view(json!({"used": 0.0}))).token("adm"),
            get("/v1/limits", status(200)).token("adm"),
            put(
                "/v1/entities/virtual_key/vk-1",
                json!({"parents": {"team": "eng"}}),
                status(200),
            )
            .token("adm"),
            get("/v1/entities/virtual_key/vk-1", status(200)).token("adm"),
            post("/v1/check", chk.clone(), status(200)).token("adm"),
            post(
                "/v1/usage",
                usage("a1"),
                recorded(true, &[("eng", "cost", 1.0, 100.0, 99.0)]),
            )
            .token("adm"),
            post(
                "/v1/usage/batch",
                json!({"records": [usage("a2")]}),
                gives(json!({"results": [{"id": "a2", "applied": true}]})),
            )
            .token("adm"),
            get("/v1/cluster", status(200)).token("adm"),
            // No token, or an unknown one.
            get("/v1/limits", unauth()).no_token(),
            get("/v1/limits/eng", unauth()).no_token(),
            get("/v1/limits", unauth()).token("wrong"),
            get("/v1/limits", unauth()).token("admx"),
            post("/v1/check", chk.clone(), unauth()).no_token(),
            post("/v1/usage", usage("n1"), unauth()).no_token(),
            post("/v1/usage", usage("n2"), unauth()).token("wrong"),
            post(
                "/v1/usage/batch",
                json!({"records": [usage("n3")]}),
                unauth(),
            )
            .no_token(),
            put("/v1/limits/eng", with(&eng, "max", json!(1.0)), unauth()).no_token(),
            post("/v1/limits/eng/reset", json!({}), unauth()).token("wrong"),
            del("/v1/limits/eng", unauth()).no_token(),
            get("/v1/cluster", unauth()).no_token(),
            get("/v1/entities/virtual_key/vk-1", unauth()).no_token(),
            // The token is checked before the body is looked at.
            post_raw("/v1/check", "{not json", unauth()).no_token(),
            post_raw("/v1/usage", "[]", unauth()).no_token(),
            put_raw("/v1/limits/eng", "{", unauth()).no_token(),
            post_raw("/v1/usage", "{", invalid()).token("cli"),
            // Client: may not write config or reset.
            put("/v1/limits/eng", with(&eng, "max", json!(1.0)), denied()).token("cli"),
            put("/v1/limits/new", eng.clone(), denied()).token("cli"),
            post("/v1/limits/eng/reset", json!({}), denied()).token("cli"),
            post("/v1/limits/eng/reset", json!({"used": 5.0}), denied()).token("cli"),
            del("/v1/limits/eng", denied()).token("cli"),
            put(
                "/v1/entities/virtual_key/vk-2",
                json!({"parents": {"team": "eng"}}),
                denied(),
            )
            .token("cli"),
            del("/v1/entities/virtual_key/vk-1", denied()).token("cli"),
            // Client: may check, record and read.
            get("/v1/limits", status(200)).token("cli"),
            get("/v1/limits/eng", view(json!({"used": 2.0, "max": 100.0}))).token("cli"),
            get(
                "/v1/entities/virtual_key/vk-1",
                gives(json!({"dimension": "virtual_key", "value": "vk-1",
                             "parents": {"team": "eng"}})),
            )
            .token("cli"),
            post(
                "/v1/check",
                json!({"attributes": {"virtual_key": "vk-1"}}),
                decision(true, &[], &[("eng", "cost", 2.0, 100.0, 98.0)]),
            )
            .token("cli"),
            post(
                "/v1/usage",
                usage("c1"),
                recorded(true, &[("eng", "cost", 3.0, 100.0, 97.0)]),
            )
            .token("cli"),
            post(
                "/v1/usage/batch",
                json!({"records": [usage("c2"), usage("n1")]}),
                gives(json!({"results": [{"id": "c2", "applied": true},
                                         {"id": "n1", "applied": true}]})),
            )
            .token("cli"),
            get("/v1/cluster", status(200)).token("cli"),
            // Rejected entity writes changed nothing.
            get("/v1/entities/virtual_key/vk-2", fails(404, "not_found")).token("adm"),
            get("/v1/entities/virtual_key/vk-1", status(200)).token("adm"),
            // Exactly the five accepted records counted (a1, a2, c1, c2, n1).
            get("/v1/limits/eng", view(json!({"used": 5.0}))).token("adm"),
            post(
                "/v1/limits/eng/reset",
                json!({"used": 10.0}),
                view(json!({"used": 10.0})),
            )
            .token("adm"),
            del("/v1/limits/eng", gives(json!({"deleted": true}))).token("adm"),
            del("/v1/entities/virtual_key/vk-1", status(200)).token("adm"),
        ],
    );
    // The client token reads the (now empty) list.
    let (status, body) = node.client_as(Some("cli")).get("/v1/limits");
    assert_eq!((status, body), (200, json!({"limits": []})));
}

// ---------------------------------------------------------------------------------------
// History.

/// `GET /v1/limits/{id}/history`: one entry per epoch, newest first, in the limit's units
/// (USD for cost), with per-node usage, the current epoch marked; `since`/`until`/`limit`
/// select; bad parameters are 400 and an unknown limit 404. Records carry `at` one and two
/// hours back (inside the dedup window), so three hourly periods have known usage.
#[test]
fn limit_history_lists_periods_newest_first() {
    let hour = 3_600;
    // Keep the records and the reads inside one hour of the server's clock.
    let into_hour = jiff::Timestamp::now().as_second().rem_euclid(hour);
    if into_hour > hour - 60 {
        std::thread::sleep(std::time::Duration::from_secs(
            (hour - into_hour + 1) as u64,
        ));
    }
    let node = Node::single();
    let c = node.client();
    let mut tokens = limit(json!({"team": "eng"}), "tokens", 1e6, "1h");
    tokens["calendar_aligned"] = json!(true);
    ok(c.put("/v1/limits/hist-tokens", tokens));
    let mut usd = limit(json!({"team": "eng"}), "cost", 100.0, "1h");
    usd["calendar_aligned"] = json!(true);
    ok(c.put("/v1/limits/hist-usd", usd));
    let now = jiff::Timestamp::now();
    let this_hour = now.as_second() - now.as_second().rem_euclid(hour);
    let at = |hours_back: i64| {
        jiff::Timestamp::from_second(now.as_second() - hours_back * hour)
            .unwrap()
            .to_string()
    };
    let hour_start = |hours_back: i64| {
        jiff::Timestamp::from_second(this_hour - hours_back * hour)
            .unwrap()
            .to_string()
    };
    // Two hours back: 5 tokens, $0.25; one hour back: 3 + 4 tokens, $1.50; now: 1 token.
    let records = json!({"records": [
        {"id": "h-1", "attributes": {"team": "eng"}, "tokens": 5, "cost": 0.25, "at": at(2)},
        {"id": "h-2", "attributes": {"team": "eng"}, "tokens": 3, "cost": 1.0, "at": at(1)},
        {"id": "h-3", "attributes": {"team": "eng"}, "tokens": 4, "cost": 0.5, "at": at(1)},
        {"id": "h-4", "attributes": {"team": "eng"}, "tokens": 1, "at": at(0)},
    ]});
    ok(c.post("/v1/usage/batch", records));
    let node_id = node.node_id().to_string();
    let entry = |hours_back: i64, used: Value| {
        json!({
            "period_start": hour_start(hours_back),
            "period_end": hour_start(hours_back - 1),
            "current": hours_back == 0,
            "used": used,
            "baseline": 0,
            "nodes": {node_id.clone(): used},
        })
    };
    let h = ok(c.get("/v1/limits/hist-tokens/history"));
    assert_keys(&h, &["id", "metric", "epochs"]);
    assert_eq!(
        (&h["id"], &h["metric"]),
        (&json!("hist-tokens"), &json!("tokens"))
    );
    let epochs = h["epochs"].as_array().unwrap();
    assert_eq!(epochs.len(), 3, "{h}");
    for (e, (back, used)) in epochs.iter().zip([(0, 1), (1, 7), (2, 5)]) {
        assert_keys(
            e,
            &[
                "period_start",
                "period_end",
                "reset",
                "current",
                "used",
                "baseline",
                "nodes",
            ],
        );
        try_matches(e, &entry(back, json!(used))).unwrap();
        assert!(e["reset"].as_str().unwrap().parse::<u64>().is_ok(), "{e}");
    }
    // Cost in USD; the current hour has no cost recorded but is listed.
    let h = ok(c.get("/v1/limits/hist-usd/history"));
    let used: Vec<i128> = h["epochs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| micros(&e["used"]))
        .collect();
    assert_eq!(used, vec![0, 1_500_000, 250_000]);
    // limit, since and until (epochs overlapping [since, until)).
    let h = ok(c.get("/v1/limits/hist-tokens/history?limit=2"));
    let starts: Vec<&str> = h["epochs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["period_start"].as_str().unwrap())
        .collect();
    assert_eq!(starts, vec![hour_start(0), hour_start(1)]);
    let q = format!(
        "/v1/limits/hist-tokens/history?since={}&until={}",
        hour_start(1).replace(':', "%3A"),
        hour_start(0)
    );
    let h = ok(c.get(&q));
    assert_eq!(h["epochs"].as_array().unwrap().len(), 1, "{h}");
    try_matches(&h["epochs"][0], &entry(1, json!(7))).unwrap();
    check(
        &c,
        &[
            get("/v1/limits/nope/history", Expect::Fails(404, "not_found")),
            get(
                "/v1/limits/hist-tokens/history?limit=0",
                Expect::Fails(400, "invalid_argument"),
            ),
            get(
                "/v1/limits/hist-tokens/history?limit=1001",
                Expect::Fails(400, "invalid_argument"),
            ),
            get(
                "/v1/limits/hist-tokens/history?limit=x",
                Expect::Fails(400, "invalid_argument"),
            ),
            get(
                "/v1/limits/hist-tokens/history?since=yesterday",
                Expect::Fails(400, "invalid_argument"),
            ),
            get(
                "/v1/limits/hist-tokens/history?until=2026-13-01T00:00:00Z",
                Expect::Fails(400, "invalid_argument"),
            ),
            get(
                format!(
                    "/v1/limits/hist-tokens/history?since={0}&until={0}",
                    hour_start(0)
                ),
                Expect::Fails(400, "invalid_argument"),
            ),
            get(
                "/v1/limits/hist-tokens/history?limit=1&limit=2",
                Expect::Fails(400, "invalid_argument"),
            ),
            get(
                "/v1/limits/hist-tokens/history?sort=asc",
                Expect::Fails(400, "invalid_argument"),
            ),
        ],
    );
}

/// The client role reads history; a request without a token is refused.
#[test]
fn limit_history_needs_the_client_role() {
    let node =
        Node::start(NodeOpts::default().args(["--admin-token", "adm", "--client-token", "cli"]));
    let admin = node.client_as(Some("adm"));
    ok(admin.put("/v1/limits/h", limit(json!({}), "requests", 10.0, "1d")));
    let h = ok(node.client_as(Some("cli")).get("/v1/limits/h/history"));
    assert_eq!(h["epochs"].as_array().unwrap().len(), 1, "the current day");
    let (status, _) = node.client_as(None).get("/v1/limits/h/history");
    assert_eq!(status, 401);
}
