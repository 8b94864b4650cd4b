//! The wire schema (`tally_api`) is what the real binary sends: every reply of a session
//! that touches every JSON route is read as its type, strictly, and written back by serde
//! byte for byte as the node sent it. The node serves the generated OpenAPI document, and a
//! path with a method it lacks is a 405 with `Allow` (I8: none of it changes state).

use serde::Serialize;
use serde::de::DeserializeOwned;
use tally_api::{
    BatchReply, BatchRequest, CheckReply, CheckRequest, ClusterReply, Deleted, DenialsReply,
    EntityRequest, EntityView, ErrorReply, Health, HistoryReply, LimitList, LimitRequest,
    LimitView, LogsReply, Ready, ResetRequest, UsageReply, UsageRequest, WhoAmI,
};
use tally_tests::{Client, Node};

/// `(status, text)` of a request with a typed body.
fn send<B: Serialize>(c: &Client, method: &str, path: &str, body: Option<&B>) -> (u16, String) {
    let bytes = body.map(|b| serde_json::to_vec(b).unwrap());
    c.try_request(method, path, bytes.as_deref())
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// The reply as `T`, and `T` written back is exactly the reply.
fn typed<T: DeserializeOwned + Serialize>(status: u16, want: u16, text: &str) -> T {
    assert_eq!(status, want, "{text}");
    let v: T = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(serde_json::to_string(&v).unwrap(), text, "re-serialised");
    v
}

const NONE: Option<&()> = None;

#[test]
fn every_reply_is_its_type_byte_for_byte() {
    let node = Node::single();
    let c = node.client();
    let (s, t) = send(&c, "GET", "/healthz", NONE);
    assert_eq!(typed::<Health>(s, 200, &t).status, "ok");
    let (s, t) = send(&c, "GET", "/readyz", NONE);
    assert!(typed::<Ready>(s, 200, &t).ready);

    let limit = LimitRequest {
        scope: [("team".to_string(), "eng".to_string())].into(),
        metric: "cost".into(),
        max: serde_json::Number::from_f64(10.0).unwrap(),
        period: "1d".into(),
        calendar_aligned: true,
        timezone: Some("Europe/Paris".into()),
        mode: None,
        members: None,
    };
    let (s, t) = send(&c, "PUT", "/v1/limits/eng-daily", Some(&limit));
    let view: LimitView = typed(s, 200, &t);
    assert_eq!((view.id.as_str(), view.max.as_f64()), ("eng-daily", 10.0));
    let tokens = LimitRequest {
        scope: Default::default(),
        metric: "tokens".into(),
        max: 1000.into(),
        period: "never".into(),
        calendar_aligned: false,
        timezone: None,
        mode: None,
        members: None,
    };
    let (s, t) = send(&c, "PUT", "/v1/limits/all-tokens", Some(&tokens));
    let view: LimitView = typed(s, 200, &t);
    assert_eq!(view.period_start, None);
    let (s, t) = send(&c, "GET", "/v1/limits/eng-daily", NONE);
    typed::<LimitView>(s, 200, &t);
    let (s, t) = send(&c, "GET", "/v1/limits?scope.team=eng", NONE);
    assert_eq!(typed::<LimitList>(s, 200, &t).limits.len(), 1);
    // OpenAPI's deepObject spelling of the same filter.
    let (s, t) = send(&c, "GET", "/v1/limits?scope%5Bteam%5D=eng", NONE);
    assert_eq!(typed::<LimitList>(s, 200, &t).limits.len(), 1);

    let entity = EntityRequest {
        parents: [("team".to_string(), "eng".to_string())].into(),
        ..Default::default()
    };
    let (s, t) = send(&c, "PUT", "/v1/entities/virtual_key/vk-1", Some(&entity));
    typed::<EntityView>(s, 200, &t);
    let (s, t) = send(&c, "GET", "/v1/entities/virtual_key/vk-1", NONE);
    assert_eq!(typed::<EntityView>(s, 200, &t).parents, entity.parents);

    let check = CheckRequest {
        attributes: [("virtual_key", "vk-1")].into_iter().collect(),
        cost: Some(0.25),
        tokens: Some(10),
        ..Default::default()
    };
    let (s, t) = send(&c, "POST", "/v1/check", Some(&check));
    let r: CheckReply = typed(s, 200, &t);
    assert!(r.allowed && r.limits.len() == 2, "{t}");
    let usage = UsageRequest {
        id: "contract-1".into(),
        attributes: [("virtual_key", "vk-1")].into_iter().collect(),
        cost: Some(12.5),
        tokens: Some(10),
        ..Default::default()
    };
    let (s, t) = send(&c, "POST", "/v1/usage", Some(&usage));
    assert!(typed::<UsageReply>(s, 200, &t).applied);
    let batch = BatchRequest {
        records: vec![
            usage.clone(),
            UsageRequest {
                id: "contract-2".into(),
                ..Default::default()
            },
        ],
    };
    let (s, t) = send(&c, "POST", "/v1/usage/batch", Some(&batch));
    let r: BatchReply = typed(s, 200, &t);
    assert_eq!(
        r.results.iter().map(|r| r.applied).collect::<Vec<_>>(),
        [false, true]
    );
    // Now over the cost limit: a denial, remembered for the dashboard.
    let (s, t) = send(&c, "POST", "/v1/check", Some(&check));
    let r: CheckReply = typed(s, 200, &t);
    assert_eq!(r.denied_by, ["eng-daily"]);
    let (s, t) = send(&c, "GET", "/v1/denials?limit=5", NONE);
    assert_eq!(typed::<DenialsReply>(s, 200, &t).denials.len(), 1);
    let (s, t) = send(&c, "GET", "/v1/limits/eng-daily/history", NONE);
    assert_eq!(typed::<HistoryReply>(s, 200, &t).epochs.len(), 1);
    let reset = ResetRequest {
        used: Some(1.into()),
    };
    let (s, t) = send(&c, "POST", "/v1/limits/eng-daily/reset", Some(&reset));
    assert_eq!(typed::<LimitView>(s, 200, &t).used.as_f64(), 1.0);
    let (s, t) = c
        .try_request(
            "POST",
            "/v1/usage/logs",
            Some(br#"{"id":"log-1","attributes":{"team":"eng"},"cost":"0.5"}"#),
        )
        .unwrap();
    assert_eq!(typed::<LogsReply>(s, 200, &t).applied, 1);
    let (s, t) = send(&c, "GET", "/v1/cluster", NONE);
    assert_eq!(typed::<ClusterReply>(s, 200, &t).node_id, node.node_id());
    let (s, t) = send(&c, "GET", "/v1/whoami", NONE);
    assert_eq!(typed::<WhoAmI>(s, 200, &t).role, "admin");
    // Hard limits: the view with members and rights, a reservation, its settlement
    // with an overrun, a release, a decommission.
    let hard = LimitRequest {
        scope: [("app".to_string(), "hard".to_string())].into(),
        metric: "tokens".into(),
        max: 100.into(),
        period: "1d".into(),
        calendar_aligned: false,
        timezone: None,
        mode: Some("hard".into()),
        members: Some(vec![tally_api::MemberSpec::Node(
            node.node_id().to_string(),
        )]),
    };
    let (s, t) = send(&c, "PUT", "/v1/limits/hard", Some(&hard));
    let view: LimitView = typed(s, 200, &t);
    assert_eq!(view.mode.as_deref(), Some("hard"));
    let reserve = CheckRequest {
        attributes: [("app", "hard")].into_iter().collect(),
        tokens: Some(60),
        reserve: true,
        ttl_s: Some(30),
        ..Default::default()
    };
    let (s, t) = send(&c, "POST", "/v1/check", Some(&reserve));
    let r: CheckReply = typed(s, 200, &t);
    let res = r.reservation.expect("allowed with a reservation");
    let (s, t) = send(&c, "POST", "/v1/check", Some(&reserve));
    let denied: CheckReply = typed(s, 200, &t);
    let hard_entry = denied
        .limits
        .iter()
        .find(|l| l.id == "hard")
        .expect("hard applies");
    assert_eq!(hard_entry.reason, Some(Some("rights".into())), "{t}");
    let soft_entry = denied
        .limits
        .iter()
        .find(|l| l.id == "all-tokens")
        .expect("all-tokens applies");
    assert_eq!(soft_entry.reason, None, "a soft entry has no reason: {t}");
    let settle = UsageRequest {
        id: "hard-1".into(),
        attributes: [("app", "hard")].into_iter().collect(),
        tokens: Some(70),
        reservation: Some(res.id.clone()),
        ..Default::default()
    };
    let (s, t) = send(&c, "POST", "/v1/usage", Some(&settle));
    assert!(typed::<UsageReply>(s, 200, &t).overrun.is_none(), "{t}");
    let (s, t) = send(&c, "POST", "/v1/check", Some(&reserve));
    let second = typed::<CheckReply>(s, 200, &t);
    assert!(!second.allowed, "{t}");
    let (s, t) = send(&c, "GET", "/v1/limits/hard", NONE);
    assert_eq!(
        typed::<LimitView>(s, 200, &t).rights.map(|r| r.len()),
        Some(1)
    );
    let (s, t) = send(
        &c,
        "POST",
        "/v1/check",
        Some(&CheckRequest {
            tokens: Some(10),
            ..reserve.clone()
        }),
    );
    let r: CheckReply = typed(s, 200, &t);
    let id = r.reservation.expect("10 of 30 left").id;
    let (s, t) = send(&c, "DELETE", &format!("/v1/reservations/{id}"), NONE);
    assert!(typed::<tally_api::Released>(s, 200, &t).released);
    let over = UsageRequest {
        id: "hard-2".into(),
        attributes: [("app", "hard")].into_iter().collect(),
        tokens: Some(50),
        ..Default::default()
    };
    let (s, t) = send(&c, "POST", "/v1/usage", Some(&over));
    assert_eq!(
        typed::<UsageReply>(s, 200, &t).overrun.map(|o| o.len()),
        Some(1),
        "{t}"
    );
    let decommission = tally_api::DecommissionRequest {
        successor: Some(node.node_id().to_string()),
    };
    let (s, t) = send(
        &c,
        "POST",
        "/v1/nodes/gone-1/decommission",
        Some(&decommission),
    );
    assert!(typed::<tally_api::Decommissioned>(s, 200, &t).decommissioned);
    let (s, t) = send(&c, "DELETE", "/v1/entities/virtual_key/vk-1", NONE);
    assert!(typed::<Deleted>(s, 200, &t).deleted);
    let (s, t) = send(&c, "DELETE", "/v1/limits/all-tokens", NONE);
    assert!(typed::<Deleted>(s, 200, &t).deleted);

    // Errors are the error type.
    let (s, t) = send(&c, "GET", "/v1/limits/nope", NONE);
    assert_eq!(typed::<ErrorReply>(s, 404, &t).error.code, "not_found");
    let (s, t) = c
        .try_request("POST", "/v1/check", Some(br#"{"tokens": 1.5}"#))
        .unwrap();
    assert_eq!(
        typed::<ErrorReply>(s, 400, &t).error.code,
        "invalid_argument"
    );
    // JSON Schema's integer: 1800.0 is 1800.
    let (s, t) = c
        .try_request("POST", "/v1/check", Some(br#"{"tokens": 1800.0}"#))
        .unwrap();
    typed::<CheckReply>(s, 200, &t);

    // The document, as generated from the types.
    let (s, t) = c.get_text("/openapi.json");
    assert_eq!(s, 200);
    assert_eq!(t, tally_api::openapi::document_text());
}

#[test]
fn a_method_a_path_lacks_is_405_with_allow() {
    let node = Node::single();
    let url = format!("{}/v1/check", node.url());
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .allow_non_standard_methods(true)
            .build(),
    );
    let r = agent
        .run(
            ureq::http::Request::builder()
                .method("TRACE")
                .uri(&url)
                .body(())
                .unwrap(),
        )
        .unwrap();
    assert_eq!(r.status().as_u16(), 405);
    assert_eq!(r.headers().get("allow").unwrap(), "POST");
    let text = r.into_body().read_to_string().unwrap();
    let e: ErrorReply = serde_json::from_str(&text).unwrap();
    assert_eq!(e.error.code, "method_not_allowed");
    let (s, t) = node
        .client()
        .try_request("GET", "/v1/nothing", None)
        .unwrap();
    assert_eq!(typed::<ErrorReply>(s, 404, &t).error.code, "not_found");
}
