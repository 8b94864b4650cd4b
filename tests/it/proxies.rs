//! The proxy integrations over real HTTP (issue 14): forward-auth, usage from access-log
//! lines, and the import of envoyproxy/ratelimit configs. Bad input is a 400 in API.md's
//! shape and changes nothing (I8); a log line repeated is counted once (I2). The real
//! proxies and Envoy's gRPC client are exercised by integrations/run.sh.

use tally_tests::{Node, Value, json};

/// A GET with extra headers; returns (status, headers we look at, JSON body).
fn forward_auth(
    node: &Node,
    query: &str,
    headers: &[(&str, &str)],
) -> (u16, Vec<(String, String)>, Value) {
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build(),
    );
    let mut req = agent.get(&format!("{}/v1/forward-auth{query}", node.url()));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.call().expect("forward-auth reachable");
    let status = resp.status().as_u16();
    let hs = resp
        .headers()
        .iter()
        .filter(|(k, _)| k.as_str().starts_with("x-tally") || k.as_str() == "retry-after")
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let body: Value = serde_json::from_str(&resp.into_body().read_to_string().unwrap()).unwrap();
    (status, hs, body)
}

fn header<'a>(hs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    hs.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn used(node: &Node, id: &str) -> Value {
    let (st, v) = node.get(&format!("/v1/limits/{id}"));
    assert_eq!(st, 200, "{v}");
    v["used"].clone()
}

#[test]
fn forward_auth_allows_records_and_denies_with_the_chosen_status() {
    let node = Node::single();
    let (st, v) = node.put(
        "/v1/limits/vk-rate",
        json!({"scope": {"virtual_key": "vk-1"}, "metric": "requests", "max": 2, "period": "1h"}),
    );
    assert_eq!(st, 200, "{v}");
    let vk = [("X-Tally-Attr-Virtual-Key", "vk-1")];
    // Check only: allowed, nothing counted.
    let (st, hs, body) = forward_auth(&node, "", &vk);
    assert_eq!(st, 200, "{body}");
    assert_eq!(header(&hs, "x-tally-allowed"), Some("true"));
    // Envoy's HTTP ext_authz appends the original path.
    assert_eq!(forward_auth(&node, "/v1/chat/completions", &vk).0, 200);
    assert_eq!(header(&hs, "x-tally-limit-id"), Some("vk-rate"));
    assert_eq!(header(&hs, "x-tally-remaining"), Some("2"));
    assert_eq!(body["allowed"], true);
    assert_eq!(body["limits"][0]["id"], "vk-rate");
    assert_eq!(used(&node, "vk-rate"), 0);
    // With a record id: counted at once, and once per id (I2).
    for _ in 0..2 {
        let mut h = vk.to_vec();
        h.push(("X-Tally-Record-Id", "fa-1"));
        let (st, hs, _) = forward_auth(&node, "", &h);
        assert_eq!(st, 200);
        assert_eq!(header(&hs, "x-tally-remaining"), Some("1"));
    }
    let mut h = vk.to_vec();
    h.push(("X-Tally-Record-Id", "fa-2"));
    assert_eq!(forward_auth(&node, "", &h).0, 200);
    assert_eq!(used(&node, "vk-rate"), 2);
    // Over: 429 by default, 403 for nginx, 402 by header; the denial in headers and body.
    let (st, hs, body) = forward_auth(&node, "", &vk);
    assert_eq!(st, 429, "{body}");
    assert_eq!(header(&hs, "x-tally-allowed"), Some("false"));
    assert_eq!(header(&hs, "x-tally-denied-by"), Some("vk-rate"));
    let retry: i64 = header(&hs, "retry-after").unwrap().parse().unwrap();
    assert!((1..=3600).contains(&retry), "{retry}");
    assert_eq!(body["denied_by"], json!(["vk-rate"]));
    assert_eq!(forward_auth(&node, "?deny_status=403", &vk).0, 403);
    let mut h = vk.to_vec();
    h.push(("X-Tally-Deny-Status", "402"));
    assert_eq!(forward_auth(&node, "", &h).0, 402);
    // A denied request with a record id records nothing.
    h.push(("X-Tally-Record-Id", "fa-3"));
    assert_eq!(forward_auth(&node, "", &h).0, 402);
    assert_eq!(used(&node, "vk-rate"), 2);
    // Bad headers: 400 in API.md's shape, nothing changes (I8).
    for bad in [
        vec![("X-Tally-Cost", "lots")],
        vec![("X-Tally-Tokens", "-3")],
        vec![
            ("X-Tally-Attr-Virtual-Key", "vk-1"),
            ("X-Tally-Record-Id", "bad id"),
        ],
        vec![("X-Tally-Deny-Status", "302")],
    ] {
        let (st, _, body) = forward_auth(&node, "", &bad);
        assert_eq!(st, 400, "{bad:?}: {body}");
        assert_eq!(body["error"]["code"], "invalid_argument", "{body}");
    }
    assert_eq!(used(&node, "vk-rate"), 2);
}

#[test]
fn log_lines_count_once_and_malformed_lines_are_skipped() {
    let node = Node::single();
    let (st, v) = node.put(
        "/v1/limits/team-cost",
        json!({"scope": {"team": "eng"}, "metric": "cost", "max": 10.0, "period": "1d"}),
    );
    assert_eq!(st, 200, "{v}");
    let body = concat!(
        r#"<190>Dec  3 10:40:00 tally: {"id":"l-1","attributes":{"team":"eng"},"cost":"0.5"}"#,
        "\n",
        "this is not an access log line\n",
        "\n",
        r#"{"id":"l-2","attributes":{"team":"eng"},"cost":0.25,"tokens":"12"}"#,
        "\n",
        r#"{"id":"l-1","attributes":{"team":"eng"},"cost":"0.5"}"#,
        "\n",
    );
    let (st, v) = node.post_raw("/v1/usage/logs", body.as_bytes());
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["lines"], 4);
    assert_eq!(v["applied"], 2);
    assert_eq!(v["duplicates"], 1);
    assert_eq!(v["malformed"], 1);
    assert_eq!(v["errors"][0]["line"], 2);
    assert_eq!(used(&node, "team-cost"), 0.75);
    // The same body again: nothing new (I2).
    let (_, v) = node.post_raw("/v1/usage/logs", body.as_bytes());
    assert_eq!(
        (v["applied"].clone(), v["duplicates"].clone()),
        (json!(0), json!(3))
    );
    assert_eq!(used(&node, "team-cost"), 0.75);
}

const RATELIMIT: &str = "
domain: shop
descriptors:
  - key: user
    rate_limit: {unit: minute, requests_per_unit: 10}
  - key: path
    value: /checkout
    rate_limit: {unit: second, requests_per_unit: 2, name: checkout}
  - key: path
    value: /api/*
    rate_limit: {unit: second, requests_per_unit: 5}
";

#[test]
fn import_validates_everything_first_and_says_what_it_cannot_express() {
    let node = Node::single();
    let limits = |node: &Node| {
        node.get("/v1/limits?scope.rls_domain=shop").1["limits"]
            .as_array()
            .unwrap()
            .len()
    };
    // Invalid anywhere: 400, nothing written (I8).
    let bad = RATELIMIT.replace(
        "unit: second, requests_per_unit: 2",
        "unit: fortnight, requests_per_unit: 2",
    );
    let (st, v) = node.post_raw("/v1/import/envoy-ratelimit", bad.as_bytes());
    assert_eq!(st, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("fortnight"),
        "{v}"
    );
    assert_eq!(limits(&node), 0);
    // A dry run says what it would do and writes nothing.
    let (st, v) = node.post_raw(
        "/v1/import/envoy-ratelimit?dry_run=true",
        RATELIMIT.as_bytes(),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["dry_run"], true);
    assert_eq!(limits(&node), 0);
    let (st, v) = node.post_raw("/v1/import/envoy-ratelimit", RATELIMIT.as_bytes());
    assert_eq!(st, 200, "{v}");
    let rules: Vec<(String, String)> = v["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["descriptor"].as_str().unwrap().to_string(),
                r["action"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        rules,
        [
            ("user".to_string(), "created".to_string()),
            ("path=%2Fcheckout".to_string(), "created".to_string())
        ]
    );
    assert!(
        v["rules"][0]["notes"][0]
            .as_str()
            .unwrap()
            .starts_with("wildcard"),
        "{v}"
    );
    assert_eq!(v["skipped"][0]["descriptor"], "path=%2Fapi%2F%2A");
    assert_eq!(limits(&node), 2);
    let id = v["rules"][1]["id"].as_str().unwrap().to_string();
    let (_, l) = node.get(&format!("/v1/limits/{id}"));
    assert_eq!(l["max"], 2);
    assert_eq!(l["period"], "1s");
    assert_eq!(l["calendar_aligned"], true);
    assert_eq!(l["scope"]["rls_name"], "checkout");
    // Again: unchanged.
    let (_, v) = node.post_raw("/v1/import/envoy-ratelimit", RATELIMIT.as_bytes());
    assert!(
        v["rules"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["action"] == "unchanged"),
        "{v}"
    );
}

/// `tally import envoy-ratelimit FILE`: the table, the notes, what was not imported, the
/// dry run, and a refused file (exit 1, nothing written).
#[test]
fn import_command_prints_what_it_did() {
    let node = Node::single();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rl.yaml");
    std::fs::write(&file, RATELIMIT).unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(tally_tests::tally_bin())
            .args(["import", "envoy-ratelimit"])
            .args(args)
            .args(["--url", node.url()])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let f = file.to_str().unwrap();
    let (code, out, err) = run(&[f, "--dry-run"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("dry run: nothing written"), "{out}");
    assert!(out.contains("would be created  user"), "{out}");
    let (code, out, err) = run(&[f]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("domain shop\n"), "{out}");
    assert!(out.contains("created  path=%2Fcheckout"), "{out}");
    assert!(out.contains("note: user: wildcard"), "{out}");
    assert!(out.contains("NOT IMPORTED: path=%2Fapi%2F%2A"), "{out}");
    let (code, out, _) = run(&[f, "--json"]);
    assert_eq!(code, Some(0));
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["rules"][0]["action"], "unchanged");
    std::fs::write(
        &file,
        "domain: shop\ndescriptors: [{key: k, rate_limit: {unit: eon}}]\n",
    )
    .unwrap();
    let (code, _, err) = run(&[f]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("invalid_argument") && err.contains("'eon'"),
        "{err}"
    );
    let (_, l) = node.get("/v1/limits?scope.rls_domain=shop");
    assert_eq!(l["limits"].as_array().unwrap().len(), 2);
}
