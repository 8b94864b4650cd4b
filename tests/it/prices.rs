//! Prices and access rules (issue 15) against the real binary: usage and checks given by
//! token counts are priced exactly from the price table; bad prices and unpriced models
//! are refused and change nothing (I8); prices and rules survive a restart and replicate
//! to a peer (I4); an entity's access rules deny checks with their own reason, never
//! usage (I1); forward-auth answers an access denial with 403; `tally prices import`
//! reads LiteLLM's price file.

use std::time::Duration;

use serde_json::{Value, json};
use tally_tests::{
    Fleet, Node, NodeOpts, assert_error, assert_keys, micros, ok, tally_bin, wait_for,
};

fn team_budget(c: &tally_tests::Client, max_usd: f64) {
    ok(c.put(
        "/v1/limits/team-eng",
        json!({"scope": {"team": "eng"}, "metric": "cost", "max": max_usd, "period": "1d"}),
    ));
}

fn used_micros(c: &tally_tests::Client, id: &str) -> i128 {
    micros(&ok(c.get(&format!("/v1/limits/{id}")))["used"])
}

/// I1, I8: token counts by kind are priced exactly, rounded up to the micro-USD; the
/// reply says what was charged and why; an explicit cost wins; an unpriced model is a
/// 400 that records nothing (and leaves the id free for a retry with a cost).
#[test]
fn usage_by_tokens_is_priced_exactly() {
    let node = Node::start(NodeOpts::default());
    let c = node.client();
    team_budget(&c, 100.0);
    let v = ok(c.put(
        "/v1/prices/gpt-4o",
        json!({"input": 2.5, "output": 10, "cache_read": 1.25}),
    ));
    assert_eq!(
        v,
        json!({"model": "gpt-4o", "input": 2.5, "output": 10.0, "cache_read": 1.25,
               "cache_creation": null, "reasoning": null})
    );
    assert_eq!(ok(c.get("/v1/prices/gpt-4o")), v);
    // A model name may hold '/': the rest of the path, or percent-encoded.
    ok(c.put(
        "/v1/prices/openai/o1",
        json!({"input": 15, "output": 60, "reasoning": 60}),
    ));
    assert_eq!(ok(c.get("/v1/prices/openai%2Fo1"))["model"], "openai/o1");
    let list = ok(c.get("/v1/prices"));
    let models: Vec<&str> = list["prices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["model"].as_str().unwrap())
        .collect();
    assert_eq!(models, ["gpt-4o", "openai/o1"]);
    assert_error(&c.get("/v1/prices?model=gpt-4o"), 400, "invalid_argument");

    // 1000 input, 500 output, 2000 cached reads, 100 cache writes, 3 reasoning:
    // 2500 + 5000 + 2500 + 250 + 30 µUSD = 10280 µUSD; tokens = their sum.
    let r = ok(c.post(
        "/v1/usage",
        json!({"id": "p-1", "attributes": {"team": "eng", "model": "gpt-4o"},
               "input_tokens": 1000, "output_tokens": 500, "cache_read_tokens": 2000,
               "cache_creation_tokens": 100, "reasoning_tokens": 3}),
    ));
    assert_eq!(r["applied"], true);
    assert_eq!(
        r["priced"],
        json!({"model": "gpt-4o", "cost": 0.01028, "exact_usd": "0.01028",
               "prices": {"input": 2.5, "output": 10.0, "cache_read": 1.25,
                          "cache_creation": 2.5, "reasoning": 10.0}})
    );
    assert_eq!(used_micros(&c, "team-eng"), 10_280);
    // One input token costs 2.5 µUSD: charged 3 (rounded up), exactly 0.0000025.
    let r = ok(c.post(
        "/v1/usage",
        json!({"id": "p-2", "attributes": {"team": "eng", "model": "gpt-4o"}, "input_tokens": 1}),
    ));
    assert_eq!(r["priced"]["cost"], json!(0.000003));
    assert_eq!(r["priced"]["exact_usd"], "0.0000025");
    assert_eq!(used_micros(&c, "team-eng"), 10_283);
    // An explicit cost wins: no pricing, no "priced".
    let r = ok(c.post(
        "/v1/usage",
        json!({"id": "p-3", "attributes": {"team": "eng", "model": "gpt-4o"},
               "input_tokens": 1000000, "cost": 0.5}),
    ));
    assert!(r.get("priced").is_none(), "{r}");
    assert_eq!(used_micros(&c, "team-eng"), 510_283);

    // Unpriced model, or no model: 400, nothing recorded, the id still free.
    let before = used_micros(&c, "team-eng");
    let bad = c.post(
        "/v1/usage",
        json!({"id": "p-4", "attributes": {"team": "eng", "model": "gpt-9"}, "output_tokens": 10}),
    );
    assert_error(&bad, 400, "invalid_argument");
    assert!(bad.1.to_string().contains("gpt-9"), "{}", bad.1);
    assert_error(
        &c.post(
            "/v1/usage",
            json!({"id": "p-4", "attributes": {"team": "eng"}, "output_tokens": 10}),
        ),
        400,
        "invalid_argument",
    );
    // A batch with one unpriced record records none of them.
    let bad = c.post(
        "/v1/usage/batch",
        json!({"records": [
            {"id": "b-1", "attributes": {"team": "eng", "model": "gpt-4o"}, "output_tokens": 10},
            {"id": "b-2", "attributes": {"team": "eng", "model": "gpt-9"}, "output_tokens": 10}]}),
    );
    assert_error(&bad, 400, "invalid_argument");
    assert!(bad.1.to_string().contains("records[1]"), "{}", bad.1);
    assert_eq!(used_micros(&c, "team-eng"), before);
    let r = ok(c.post(
        "/v1/usage",
        json!({"id": "p-4", "attributes": {"team": "eng", "model": "gpt-9"}, "output_tokens": 10, "cost": 0.001}),
    ));
    assert_eq!(r["applied"], true, "the refused id was not consumed");
    let r = ok(c.post(
        "/v1/usage/batch",
        json!({"records": [{"id": "b-1", "attributes": {"team": "eng", "model": "openai/o1"}, "reasoning_tokens": 1000}]}),
    ));
    assert_eq!(r["results"][0]["priced"]["cost"], json!(0.06));
    assert_eq!(used_micros(&c, "team-eng"), before + 1_000 + 60_000);

    // A check given by tokens is priced the same way, and denied past the budget.
    let r = ok(c.post(
        "/v1/check",
        json!({"attributes": {"team": "eng", "model": "gpt-4o"}, "output_tokens": 1000}),
    ));
    assert_eq!(r["allowed"], true);
    assert_eq!(r["priced"]["cost"], json!(0.01));
    let r = ok(c.post(
        "/v1/check",
        json!({"attributes": {"team": "eng", "model": "gpt-4o"}, "output_tokens": 10000000}),
    ));
    assert_eq!(r["allowed"], false);
    assert_eq!(r["denied_by"], json!(["team-eng"]));
    assert_eq!(r["priced"]["cost"], json!(100.0));

    // Prices survive a restart.
    let mut node = node;
    node.restart();
    let c = node.client();
    assert_eq!(ok(c.get("/v1/prices/gpt-4o"))["cache_read"], json!(1.25));
    ok(c.delete("/v1/prices/gpt-4o"));
    assert_error(&c.get("/v1/prices/gpt-4o"), 404, "not_found");
    assert_error(&c.delete("/v1/prices/gpt-4o"), 404, "not_found");
}

/// I8: bad prices are refused and change nothing; a batch is all or nothing.
#[test]
fn bad_prices_change_nothing() {
    let node = Node::start(NodeOpts::default());
    let c = node.client();
    for (body, why) in [
        (json!({"input": -1, "output": 1}), "negative"),
        (json!({"input": 1000001, "output": 1}), "over 1e6"),
        (json!({"input": 1}), "no output"),
        (
            json!({"input": 1, "output": 1, "batch": 2}),
            "unknown field",
        ),
        (json!([1, 1]), "an array"),
        (json!({"input": "1", "output": 1}), "a string"),
    ] {
        let r = c.put("/v1/prices/m", body);
        assert!(r.0 == 400, "{why}: {} {}", r.0, r.1);
        assert_error(&r, 400, "invalid_argument");
    }
    assert_error(&c.get("/v1/prices/m"), 404, "not_found");
    let r = c.post(
        "/v1/prices/batch",
        json!({"prices": [{"model": "a", "input": 1, "output": 2},
                          {"model": "b\u{7}", "input": 1, "output": 2}]}),
    );
    assert_error(&r, 400, "invalid_argument");
    assert!(r.1.to_string().contains("prices[1]"), "{}", r.1);
    assert_eq!(ok(c.get("/v1/prices")), json!({"prices": []}));
    let r = ok(c.post(
        "/v1/prices/batch",
        json!({"prices": [{"model": "a", "input": 1, "output": 2},
                          {"model": "b", "input": 0.000000001, "output": 999999.999999999}]}),
    ));
    assert_eq!(r, json!({"written": 2}));
    let b = ok(c.get("/v1/prices/b"));
    assert_eq!(b["input"], json!(0.000000001));
    assert_eq!(b["output"], json!(999999.999999999));
    // Finer than 9 decimal places per million tokens (a femto-USD per token): rounded.
    let v = ok(c.put(
        "/v1/prices/c",
        json!({"input": 0.0000000015, "output": 1.2345678914}),
    ));
    assert_eq!(
        (v["input"].clone(), v["output"].clone()),
        (json!(0.000000002), json!(1.234567891))
    );
    // "batch" is reserved: POST /v1/prices/batch is the batch, other methods are 405.
    assert_error(
        &c.put("/v1/prices/batch", json!({"input": 1, "output": 1})),
        405,
        "method_not_allowed",
    );
    assert_error(
        &c.post(
            "/v1/prices/batch",
            json!({"prices": [{"model": "batch", "input": 1, "output": 1}]}),
        ),
        400,
        "invalid_argument",
    );
    // Clients may read prices, not write them.
    let node =
        Node::start(NodeOpts::default().args(["--admin-token", "adm", "--client-token", "cli"]));
    let client = node.client_as(Some("cli"));
    assert_error(
        &client.put("/v1/prices/x", json!({"input": 1, "output": 1})),
        403,
        "permission_denied",
    );
    assert_eq!(ok(client.get("/v1/prices")), json!({"prices": []}));
}

/// Access rules deny checks with their own reason and never refuse usage (I1); the
/// view shows them; bad rules change nothing (I8); forward-auth says 403.
#[test]
fn access_rules_deny_checks_not_usage() {
    let node = Node::start(NodeOpts::default());
    let c = node.client();
    team_budget(&c, 100.0);
    let v = ok(c.put(
        "/v1/entities/virtual_key/vk-1",
        json!({"parents": {"team": "eng"}, "allow": {"model": ["gpt-4o-mini", "gpt-4o", "gpt-4o"]}}),
    ));
    assert_eq!(
        v,
        json!({"allow": {"model": ["gpt-4o", "gpt-4o-mini"]}, "dimension": "virtual_key",
               "parents": {"team": "eng"}, "value": "vk-1"})
    );
    // Without rules the view keeps its three fields.
    let plain = ok(c.put(
        "/v1/entities/virtual_key/vk-2",
        json!({"parents": {"team": "eng"}}),
    ));
    assert_keys(&plain, &["dimension", "parents", "value"]);

    let allowed = ok(c.post(
        "/v1/check",
        json!({"attributes": {"virtual_key": "vk-1", "model": "gpt-4o"}}),
    ));
    assert_eq!(allowed["allowed"], true);
    assert!(allowed.get("access").is_none(), "{allowed}");
    let r = ok(c.post(
        "/v1/check",
        json!({"attributes": {"virtual_key": "vk-1", "model": "gpt-5"}}),
    ));
    assert_eq!(r["allowed"], false);
    assert_eq!(r["denied_by"], json!([]));
    assert_eq!(
        r["access"],
        json!({"dimension": "virtual_key", "value": "vk-1", "rule": "allow",
               "attribute": "model", "given": "gpt-5"})
    );
    let r = ok(c.post("/v1/check", json!({"attributes": {"virtual_key": "vk-1"}})));
    assert_eq!(r["access"]["given"], Value::Null);

    // A disabled team disables its keys; usage is still recorded (a fact).
    ok(c.put("/v1/entities/team/eng", json!({"active": false})));
    let r = ok(c.post(
        "/v1/check",
        json!({"attributes": {"virtual_key": "vk-2"}, "cost": 1}),
    ));
    assert_eq!(
        r["access"],
        json!({"dimension": "team", "value": "eng", "rule": "inactive"})
    );
    let r = ok(c.post(
        "/v1/usage",
        json!({"id": "u-1", "attributes": {"virtual_key": "vk-2"}, "cost": 1}),
    ));
    assert_eq!(r["applied"], true);
    assert_eq!(used_micros(&c, "team-eng"), 1_000_000);
    // forward-auth: 403 for an access rule, whatever denial status was asked for.
    let resp = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build(),
    )
    .get(&format!("{}/v1/forward-auth?deny_status=429", node.url()))
    .header("X-Tally-Attr-Virtual-Key", "vk-2")
    .call()
    .unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    assert_eq!(
        resp.headers()
            .get("x-tally-access-denied")
            .and_then(|v| v.to_str().ok()),
        Some("team/eng inactive")
    );

    // Expiry is an instant.
    ok(c.put(
        "/v1/entities/team/eng",
        json!({"expires_at": "2020-01-01T00:00:00Z"}),
    ));
    let r = ok(c.post("/v1/check", json!({"attributes": {"virtual_key": "vk-2"}})));
    assert_eq!(
        r["access"],
        json!({"dimension": "team", "value": "eng", "rule": "expired", "expires_at": "2020-01-01T00:00:00Z"})
    );
    ok(c.put(
        "/v1/entities/team/eng",
        json!({"expires_at": "2999-01-01T00:00:00Z"}),
    ));
    let r = ok(c.post("/v1/check", json!({"attributes": {"virtual_key": "vk-2"}})));
    assert_eq!(r["allowed"], true, "{r}");

    // Bad rules: 400, nothing changed.
    for body in [
        json!({"allow": {"model": []}}),
        json!({"allow": {"Model": ["x"]}}),
        json!({"allow": {"model": "gpt-4o"}}),
        json!({"expires_at": "tomorrow"}),
        json!({"active": "no"}),
    ] {
        assert_error(
            &c.put("/v1/entities/virtual_key/vk-1", body),
            400,
            "invalid_argument",
        );
    }
    assert_eq!(ok(c.get("/v1/entities/virtual_key/vk-1")), v);
    // Rules survive a restart.
    let mut node = node;
    node.restart();
    assert_eq!(ok(node.client().get("/v1/entities/virtual_key/vk-1")), v);
}

/// I4: prices and access rules written on one node reach its peer, which prices and
/// denies with them.
#[test]
fn prices_and_rules_replicate() {
    let fleet = Fleet::start(2);
    let (a, b) = (fleet.nodes[0].client(), fleet.nodes[1].client());
    ok(a.post(
        "/v1/prices/batch",
        json!({"prices": [{"model": "m-1", "input": 1, "output": 2}]}),
    ));
    ok(a.put("/v1/entities/virtual_key/vk-9", json!({"active": false})));
    wait_for(
        Duration::from_secs(10),
        "prices and rules on node-2",
        || {
            let p = b.get("/v1/prices/m-1");
            let e = b.get("/v1/entities/virtual_key/vk-9");
            if p.0 == 200 && e.0 == 200 {
                Ok(())
            } else {
                Err(format!("price {} entity {}", p.0, e.0))
            }
        },
    );
    let r = ok(b.post(
        "/v1/usage",
        json!({"id": "r-1", "attributes": {"model": "m-1", "virtual_key": "vk-9"}, "output_tokens": 1000000}),
    ));
    assert_eq!(r["priced"]["cost"], json!(2.0));
    let r = ok(b.post("/v1/check", json!({"attributes": {"virtual_key": "vk-9"}})));
    assert_eq!(r["access"]["rule"], "inactive");
}

/// `tally prices import` reads LiteLLM's format; `tally usage` prices by tokens.
#[test]
fn cli_imports_litellm_prices() {
    let node = Node::start(NodeOpts::default());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("prices.json");
    std::fs::write(
        &file,
        r#"{"sample_spec": {"input_cost_per_token": 0},
            "gpt-4o": {"input_cost_per_token": 2.5e-06, "output_cost_per_token": 1e-05,
                       "cache_read_input_token_cost": 1.25e-06, "litellm_provider": "openai"},
            "anthropic/claude-3-haiku-20240307": {"input_cost_per_token": 2.5e-07,
                       "output_cost_per_token": 1.25e-06, "litellm_provider": "anthropic"},
            "dall-e-3": {"output_cost_per_image": 0.04, "litellm_provider": "openai"}}"#,
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(tally_bin())
            .args(args)
            .args(["--url", node.url()])
            .env_remove("TALLY_TOKEN")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let out = run(&["prices", "import", file.to_str().unwrap()]);
    assert_eq!(
        out,
        "imported 2 prices; skipped 1 entries (no input and output price per token, a price that is not a number, or a name over 128 bytes; --json lists them)\n"
    );
    let c = node.client();
    assert_eq!(
        ok(c.get("/v1/prices/anthropic/claude-3-haiku-20240307")),
        json!({"model": "anthropic/claude-3-haiku-20240307", "input": 0.25, "output": 1.25,
               "cache_read": null, "cache_creation": null, "reasoning": null})
    );
    let out = run(&["prices", "get", "gpt-4o"]);
    assert!(
        out.contains("gpt-4o") && out.contains("2.5") && out.contains("1.25"),
        "{out}"
    );
    let out = run(&[
        "usage",
        "--id",
        "cli-1",
        "--attr",
        "model=gpt-4o",
        "--input-tokens",
        "1000",
        "--json",
    ]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["priced"]["cost"], json!(0.0025));
    let out = run(&[
        "entities",
        "put",
        "virtual_key/vk-1",
        "--inactive",
        "--allow",
        "model=gpt-4o",
        "--allow",
        "model=o1",
    ]);
    assert!(
        out.contains("active") && out.contains("gpt-4o, o1"),
        "{out}"
    );
    let out = run(&["check", "--attr", "virtual_key=vk-1"]);
    assert!(
        out.contains("access denied: virtual_key/vk-1 is inactive"),
        "{out}"
    );
}
