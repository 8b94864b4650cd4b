//! The dashboard's HTTP side, black-box: what `/ui` serves and with which headers, and the
//! two endpoints only the dashboard needs (`/v1/whoami`, `/v1/denials`), with their roles
//! and bad input (I8). The page itself is tested in a real browser by
//! `tests/browser/` (run from `.ci/run`).

use std::time::Duration;

use tally_tests::{Node, NodeOpts, Value, assert_error, assert_keys, json, ok};

const ADMIN: &str = "ui-admin-token";
const CLIENT: &str = "ui-client-token";
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; \
    connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; \
    form-action 'none'; frame-ancestors 'none'; require-trusted-types-for 'script'; \
    trusted-types 'none'";

fn with_tokens() -> Node {
    Node::start(
        NodeOpts::default()
            .arg("--admin-token")
            .arg(ADMIN)
            .arg("--client-token")
            .arg(CLIENT),
    )
}

/// A raw GET that does not follow redirects: (status, headers, body).
fn raw_get(url: &str, headers: &[(&str, &str)]) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_global(Some(Duration::from_secs(20)))
        .proxy(None)
        .build()
        .into();
    let mut req = agent.get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut res = req.call().unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = res.status().as_u16();
    let hs = res
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let body = res.body_mut().read_to_vec().expect("read body");
    (status, hs, body)
}

fn header<'a>(hs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    hs.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

#[track_caller]
fn assert_ui_headers(hs: &[(String, String)]) {
    assert_eq!(header(hs, "content-security-policy"), Some(CSP));
    assert_eq!(header(hs, "x-content-type-options"), Some("nosniff"));
    assert_eq!(header(hs, "x-frame-options"), Some("DENY"));
    assert_eq!(header(hs, "referrer-policy"), Some("no-referrer"));
}

/// The page and its assets come from the binary with a strict CSP, revalidated by ETag;
/// they need no token (they hold no data: the page asks the API with the user's token).
#[test]
fn ui_assets_are_served_with_a_strict_policy() {
    let node = with_tokens();
    let base = node.url();

    let (status, hs, body) = raw_get(&format!("{base}/ui"), &[]);
    assert_eq!(status, 308);
    // Relative, so a proxy's path prefix survives the redirect.
    assert_eq!(header(&hs, "location"), Some("ui/"));
    assert!(body.is_empty());
    assert_ui_headers(&hs);

    let (status, hs, body) = raw_get(&format!("{base}/ui/"), &[]);
    assert_eq!(status, 200);
    assert_ui_headers(&hs);
    assert_eq!(
        header(&hs, "content-type"),
        Some("text/html; charset=utf-8")
    );
    let html = String::from_utf8(body).expect("utf-8 page");
    // Every URL in the page is relative (a proxy prefix must work) and nothing is inline.
    assert!(html.contains(r#"<script src="./app.js" defer></script>"#));
    assert!(html.contains(r#"<link rel="stylesheet" href="./app.css">"#));
    assert!(!html.contains("style="), "inline style in the page");
    assert!(!html.contains("http://") && !html.contains("https://") && !html.contains("//cdn"));
    for asset in ["app.js", "app.css", "favicon.svg", "index.html"] {
        let (status, hs, body) = raw_get(&format!("{base}/ui/{asset}"), &[]);
        assert_eq!(status, 200, "{asset}");
        assert_ui_headers(&hs);
        assert!(!body.is_empty(), "{asset}");
        let etag = header(&hs, "etag").expect("etag").to_string();
        let (status, hs, body) = raw_get(
            &format!("{base}/ui/{asset}"),
            &[("if-none-match", etag.as_str())],
        );
        assert_eq!(status, 304, "{asset}");
        assert!(body.is_empty());
        assert_ui_headers(&hs);
    }
    let js = raw_get(&format!("{base}/ui/app.js"), &[]).2;
    let js = String::from_utf8(js).expect("utf-8 script");
    // The script never hands a string to the HTML parser.
    for sink in [
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
    ] {
        assert!(!js.contains(sink), "app.js uses {sink}");
    }

    let (status, hs, body) = raw_get(&format!("{base}/ui/nope.js"), &[]);
    assert_eq!(status, 404);
    assert_ui_headers(&hs);
    let body: Value = serde_json::from_slice(&body).expect("JSON error");
    assert_error(&(status, body), 404, "not_found");
}

/// `GET /v1/whoami` tells the page its role; the same roles as the rest of the API.
#[test]
fn whoami_reports_the_tokens_role() {
    let node = with_tokens();
    let id = node.node_id().to_string();
    assert_error(
        &node.client_as(None).get("/v1/whoami"),
        401,
        "unauthenticated",
    );
    assert_error(
        &node.client_as(Some("nope")).get("/v1/whoami"),
        401,
        "unauthenticated",
    );
    let v = ok(node.client_as(Some(CLIENT)).get("/v1/whoami"));
    assert_eq!(
        v,
        json!({"role": "client", "tokens_required": true, "node_id": id})
    );
    let v = ok(node.client_as(Some(ADMIN)).get("/v1/whoami"));
    assert_eq!(
        v,
        json!({"role": "admin", "tokens_required": true, "node_id": id})
    );

    // Without tokens (loopback only) every caller may do everything.
    let open = Node::single();
    let v = ok(open.get("/v1/whoami"));
    assert_eq!(
        v,
        json!({"role": "admin", "tokens_required": false, "node_id": open.node_id()})
    );
}

/// Denied checks are listed newest first with the limits that denied them; allowed
/// checks and usage records are not; bad queries are refused (I8).
#[test]
fn denials_lists_the_latest_denied_checks() {
    let node = with_tokens();
    let admin = node.client_as(Some(ADMIN));
    let client = node.client_as(Some(CLIENT));
    let put = |id: &str, body: Value| ok(admin.put(&format!("/v1/limits/{id}"), body));
    put(
        "eng-cost",
        json!({"scope": {"team": "eng"}, "metric": "cost", "max": 1.0, "period": "1d"}),
    );
    put(
        "eng-tokens",
        json!({"scope": {"team": "eng"}, "metric": "tokens", "max": 100, "period": "1d"}),
    );

    let empty = ok(client.get("/v1/denials"));
    assert_keys(
        &empty,
        &["node_id", "capacity", "denied_total", "skipped", "denials"],
    );
    assert_eq!(
        empty,
        json!({"node_id": node.node_id(), "capacity": 512, "denied_total": 0, "skipped": 0,
               "denials": []})
    );

    let check = |body: Value| ok(client.post("/v1/check", body));
    assert_eq!(
        check(json!({"attributes": {"team": "eng"}, "cost": 0.5, "tokens": 10}))["allowed"],
        json!(true)
    );
    ok(client.post(
        "/v1/usage",
        json!({"id": "u1", "attributes": {"team": "eng"}, "cost": 5.0}),
    ));
    let hostile = "<img src=x onerror=alert(1)>";
    check(json!({"attributes": {"team": "eng", "user": hostile}, "cost": 0.25}));
    check(json!({"attributes": {"team": "eng"}, "tokens": 500}));

    let v = ok(client.get("/v1/denials"));
    assert_eq!(v["denied_total"], json!(2));
    let denials = v["denials"].as_array().expect("denials");
    assert_eq!(denials.len(), 2, "{v}");
    for d in denials {
        assert_keys(
            d,
            &[
                "seq",
                "at",
                "attributes",
                "denied_by",
                "denied_by_more",
                "cost",
                "tokens",
            ],
        );
        assert!(
            d["at"]
                .as_str()
                .is_some_and(|t| t.parse::<jiff::Timestamp>().is_ok()),
            "{d}"
        );
    }
    let strip = |d: &Value| {
        let mut d = d.clone();
        d.as_object_mut().expect("object").remove("at");
        d
    };
    // The usage record put eng-cost over its max, so both limits deny the last check.
    assert_eq!(
        strip(&denials[0]),
        json!({"seq": 2, "attributes": {"team": "eng"}, "denied_by": ["eng-cost", "eng-tokens"],
               "denied_by_more": 0, "cost": 0.0, "tokens": 500})
    );
    assert_eq!(
        strip(&denials[1]),
        json!({"seq": 1, "attributes": {"team": "eng", "user": hostile},
               "denied_by": ["eng-cost"], "denied_by_more": 0, "cost": 0.25, "tokens": 0})
    );
    let one = ok(client.get("/v1/denials?limit=1"));
    assert_eq!(one["denials"].as_array().map(Vec::len), Some(1));
    assert_eq!(one["denials"][0]["seq"], json!(2));
    assert_eq!(
        ok(admin.get("/v1/denials?limit=512"))["denials"],
        v["denials"]
    );

    for bad in [
        "/v1/denials?limit=0",
        "/v1/denials?limit=513",
        "/v1/denials?limit=x",
        "/v1/denials?limit=-1",
        "/v1/denials?since=1",
    ] {
        assert_error(&client.get(bad), 400, "invalid_argument");
    }
    assert_error(
        &node.client_as(None).get("/v1/denials"),
        401,
        "unauthenticated",
    );
    // Nothing above changed what is kept.
    assert_eq!(ok(client.get("/v1/denials"))["denials"], v["denials"]);
}
