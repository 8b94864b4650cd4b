//! The service against a real node (redb in a temp dir), ported from envoyproxy/ratelimit's
//! integration test `testBasicBaseConfig` and its config tests, plus tally's own rules
//! (wildcard instances, replaces, shadow, unlimited, retries, domain caps).

use std::sync::atomic::AtomicI64;

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::google::protobuf::UInt64Value;
use tally_node::{Clock, NodeConfig};

use super::*;
use crate::import;

/// A clock the test moves by hand.
struct TestClock(AtomicI64);

impl Clock for TestClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// 2026-11-22T06:00:00.250Z: 250 ms into a second, so per-second windows have 750 ms left.
const T0: i64 = 1_795_327_200_250;

const CONFIG: &str = r#"
domain: basic
descriptors:
  - key: key1
    rate_limit: {unit: second, requests_per_unit: 50}
  - key: one_per_minute
    rate_limit: {unit: minute, requests_per_unit: 1}
---
"#;

const ANOTHER: &str = r#"
domain: another
descriptors:
  - key: key2
    rate_limit: {unit: minute, requests_per_unit: 20, name: key2-per-minute}
  - key: key3
    rate_limit: {unit: hour, requests_per_unit: 10}
  - key: user
    value: admin
    rate_limit: {unlimited: true}
  - key: user
    rate_limit: {unit: minute, requests_per_unit: 2, name: per-user}
  - key: team
    rate_limit: {unit: minute, requests_per_unit: 1, replaces: [{name: per-user}]}
  - key: probe
    shadow_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1}
"#;

struct Fixture {
    _dir: tempfile::TempDir,
    clock: Arc<TestClock>,
    node: Node,
    rl: RateLimiter,
}

async fn fixture(configs: &[&str]) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(TestClock(AtomicI64::new(T0)));
    let mut cfg = NodeConfig::new(dir.path());
    cfg.clock = clock.clone();
    cfg.node_id = Some("n1".into());
    let node = Node::open(cfg).unwrap();
    for c in configs {
        let text = c.trim_end_matches("---\n");
        let plan = import::plan(&import::parse(text).unwrap()).unwrap();
        import::apply(&node, &plan, false).await.unwrap();
    }
    let rl = RateLimiter::new(node.clone(), 100, Arc::default());
    Fixture {
        _dir: dir,
        clock,
        node,
        rl,
    }
}

fn desc(entries: &[(&str, &str)], hits: Option<u64>) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(k, v)| Entry {
                key: k.to_string(),
                value: v.to_string(),
            })
            .collect(),
        hits_addend: hits.map(|value| UInt64Value { value }),
        ..RateLimitDescriptor::default()
    }
}

fn req(domain: &str, descriptors: Vec<RateLimitDescriptor>, hits: u32) -> RateLimitRequest {
    RateLimitRequest {
        domain: domain.into(),
        descriptors,
        hits_addend: hits,
    }
}

/// (code, requests_per_unit, unit, remaining) of each status.
fn shape(r: &RateLimitResponse) -> Vec<(Code, u32, i32, u32)> {
    r.statuses
        .iter()
        .map(|s| {
            let (rpu, unit) = s
                .current_limit
                .as_ref()
                .map_or((0, 0), |l| (l.requests_per_unit, l.unit));
            (s.code(), rpu, unit, s.limit_remaining)
        })
        .collect()
}

const OK: Code = Code::Ok;
const OVER: Code = Code::OverLimit;
const SECOND: i32 = RlsUnit::Second as i32;
const MINUTE: i32 = RlsUnit::Minute as i32;
const HOUR: i32 = RlsUnit::Hour as i32;

impl Fixture {
    async fn call(&self, r: RateLimitRequest) -> RateLimitResponse {
        self.rl.should_rate_limit(&r, None).await.unwrap()
    }

    fn used(&self, id: &str) -> u64 {
        self.node.limit(id).unwrap().report.used
    }
}

#[tokio::test]
async fn unknown_descriptor_is_ok_without_a_limit() {
    let f = fixture(&[CONFIG]).await;
    let r = f
        .call(req("foo", vec![desc(&[("hello", "world")], None)], 1))
        .await;
    assert_eq!(r.overall_code(), OK);
    assert_eq!(r.statuses.len(), 1);
    assert_eq!(
        r.statuses[0],
        DescriptorStatus {
            code: OK as i32,
            ..Default::default()
        }
    );
    assert!(r.response_headers_to_add.is_empty());
    // A known domain with a deeper descriptor than any rule: no rule either.
    let r = f
        .call(req(
            "basic",
            vec![desc(&[("key1", "a"), ("x", "y")], None)],
            1,
        ))
        .await;
    assert_eq!(shape(&r), [(OK, 0, 0, 0)]);
}

#[tokio::test]
async fn first_hit_leaves_49_of_50_per_second_and_says_when_it_resets() {
    let f = fixture(&[CONFIG]).await;
    let r = f
        .call(req("basic", vec![desc(&[("key1", "foo")], None)], 1))
        .await;
    assert_eq!(r.overall_code(), OK);
    assert_eq!(shape(&r), [(OK, 50, SECOND, 49)]);
    let d = r.statuses[0].duration_until_reset.as_ref().unwrap();
    assert_eq!((d.seconds, d.nanos), (0, 750_000_000));
    let h: Vec<(&str, &str)> = r
        .response_headers_to_add
        .iter()
        .map(|h| (h.key.as_str(), h.value.as_str()))
        .collect();
    assert_eq!(
        h,
        [
            ("x-ratelimit-limit", "50"),
            ("x-ratelimit-remaining", "49"),
            ("x-ratelimit-reset", "1")
        ]
    );
    // Two seconds later the window is new and the reset is counted from the new second.
    f.clock.0.store(T0 + 2_100, Ordering::SeqCst);
    let r = f
        .call(req("basic", vec![desc(&[("key1", "foo")], None)], 1))
        .await;
    assert_eq!(shape(&r), [(OK, 50, SECOND, 49)]);
    let d = r.statuses[0].duration_until_reset.as_ref().unwrap();
    assert_eq!((d.seconds, d.nanos), (0, 650_000_000));
}

#[tokio::test]
async fn over_limit_exactly_after_the_limit_and_denials_record_nothing() {
    let f = fixture(&[ANOTHER]).await;
    for i in 0..25u32 {
        let r = f
            .call(req("another", vec![desc(&[("key2", "7")], None)], 1))
            .await;
        let (code, remaining) = if i >= 20 {
            (OVER, 0)
        } else {
            (OK, 20 - (i + 1))
        };
        assert_eq!(r.overall_code(), code, "call {i}");
        assert_eq!(shape(&r), [(code, 20, MINUTE, remaining)], "call {i}");
        assert_eq!(
            r.statuses[0].current_limit.as_ref().unwrap().name,
            "key2-per-minute"
        );
    }
    let rule = rules::rule_id("another", "key2");
    let inst = rules::instance_id(&rule, "key2=7");
    assert_eq!(f.used(&inst), 20, "the 5 denied calls were not counted");
    assert_eq!(f.used(&rule), 0, "each value counts in its own instance");
    // Another value has its own budget.
    let r = f
        .call(req("another", vec![desc(&[("key2", "8")], None)], 1))
        .await;
    assert_eq!(shape(&r), [(OK, 20, MINUTE, 19)]);
}

#[tokio::test]
async fn several_descriptors_worst_code_wins_statuses_in_order() {
    let f = fixture(&[ANOTHER]).await;
    for i in 0..15u32 {
        let r = f
            .call(req(
                "another",
                vec![desc(&[("key2", "r")], None), desc(&[("key3", "r")], None)],
                1,
            ))
            .await;
        // Once key3 (10/hour) is over, nothing is recorded, so key2 stays at 10 used.
        let (code, rem1, rem2) = if i >= 10 {
            (OVER, 10, 0)
        } else {
            (OK, 20 - (i + 1), 10 - (i + 1))
        };
        assert_eq!(r.overall_code(), code, "call {i}");
        assert_eq!(
            shape(&r),
            [(OK, 20, MINUTE, rem1), (code, 10, HOUR, rem2)],
            "call {i}"
        );
    }
}

#[tokio::test]
async fn hits_addend_zero_checks_and_more_than_one_counts_that_many() {
    let f = fixture(&[ANOTHER]).await;
    let inst = rules::instance_id(&rules::rule_id("another", "key2"), "key2=h");
    // Request-level 5.
    let r = f
        .call(req("another", vec![desc(&[("key2", "h")], None)], 5))
        .await;
    assert_eq!(shape(&r), [(OK, 20, MINUTE, 15)]);
    // Descriptor-level 0 wins over request-level 5: check only.
    let r = f
        .call(req("another", vec![desc(&[("key2", "h")], Some(0))], 5))
        .await;
    assert_eq!(shape(&r), [(OK, 20, MINUTE, 15)]);
    assert_eq!(f.used(&inst), 5);
    // 15 more exactly reach the max: OK with 0 left.
    let r = f
        .call(req("another", vec![desc(&[("key2", "h")], Some(15))], 0))
        .await;
    assert_eq!(shape(&r), [(OK, 20, MINUTE, 0)]);
    // At the max, a check-only call is still OK (ratelimit: over iff used + hits > max)...
    let r = f
        .call(req("another", vec![desc(&[("key2", "h")], Some(0))], 0))
        .await;
    assert_eq!(shape(&r), [(OK, 20, MINUTE, 0)]);
    // ...and one more hit is over, and not counted.
    let r = f
        .call(req("another", vec![desc(&[("key2", "h")], None)], 0))
        .await;
    assert_eq!(shape(&r), [(OVER, 20, MINUTE, 0)]);
    assert_eq!(f.used(&inst), 20);
}

#[tokio::test]
async fn unlimited_replaces_and_shadow() {
    let f = fixture(&[ANOTHER]).await;
    // user=admin is unlimited: remaining u32::MAX, no limit, never counted.
    for _ in 0..3 {
        let r = f
            .call(req("another", vec![desc(&[("user", "admin")], None)], 1))
            .await;
        assert_eq!(shape(&r), [(OK, 0, 0, u32::MAX)]);
    }
    // Any other user: 2 per minute.
    for rem in [1, 0] {
        let r = f
            .call(req("another", vec![desc(&[("user", "bob")], None)], 1))
            .await;
        assert_eq!(shape(&r), [(OK, 2, MINUTE, rem)]);
    }
    let r = f
        .call(req("another", vec![desc(&[("user", "bob")], None)], 1))
        .await;
    assert_eq!(r.overall_code(), OVER);
    // With the team rule in the same call, per-user is replaced: only team counts.
    let r = f
        .call(req(
            "another",
            vec![desc(&[("user", "bob")], None), desc(&[("team", "t")], None)],
            1,
        ))
        .await;
    assert_eq!(r.overall_code(), OK);
    assert_eq!(shape(&r), [(OK, 0, 0, 0), (OK, 1, MINUTE, 0)]);
    // Shadow mode: over the limit, answered OK, and counted.
    for _ in 0..3 {
        let r = f
            .call(req("another", vec![desc(&[("probe", "p")], None)], 1))
            .await;
        assert_eq!(r.overall_code(), OK);
    }
    let inst = rules::instance_id(&rules::rule_id("another", "probe"), "probe=p");
    assert_eq!(f.used(&inst), 3);
    assert_eq!(
        f.rl.metrics()
            .shadow_over_limit_total
            .load(Ordering::Relaxed),
        2
    );
}

#[tokio::test]
async fn a_retry_with_the_same_request_id_counts_once() {
    let f = fixture(&[ANOTHER]).await;
    let call = req("another", vec![desc(&[("key3", "z")], None)], 1);
    for _ in 0..3 {
        let r = f.rl.should_rate_limit(&call, Some("req-1")).await.unwrap();
        assert_eq!(
            shape(&r),
            [(OK, 10, HOUR, 9)],
            "a retry sees the first call's answer"
        );
    }
    let inst = rules::instance_id(&rules::rule_id("another", "key3"), "key3=z");
    assert_eq!(f.used(&inst), 1);
    f.rl.should_rate_limit(&call, Some("req-2")).await.unwrap();
    f.rl.should_rate_limit(&call, None).await.unwrap();
    f.rl.should_rate_limit(&call, None).await.unwrap();
    assert_eq!(f.used(&inst), 4);
}

/// A tally limit on the whole domain (rolling 5 minutes, not an RLS unit) applies to every
/// rule of the domain: it is reported with the closest unit, its real period in the name,
/// and the exact time to its reset.
#[tokio::test]
async fn a_domain_cap_with_a_rolling_period_applies_and_is_reported_honestly() {
    let f = fixture(&[ANOTHER]).await;
    let cap = LimitInput {
        scope: [(rules::DOMAIN.to_string(), "another".to_string())].into(),
        metric: Metric::Requests,
        max: 3,
        period: "5m".parse().unwrap(),
        calendar_aligned: false,
        timezone: "UTC".into(),
        mode: Default::default(),
        members: Vec::new(),
    };
    f.node.put_limit("another-cap", cap).await.unwrap();
    f.clock.0.store(T0 + 60_000, Ordering::SeqCst);
    for k in ["key2", "key3", "key2"] {
        let r = f
            .call(req("another", vec![desc(&[(k, "c")], None)], 1))
            .await;
        assert_eq!(r.overall_code(), OK);
    }
    let r = f
        .call(req("another", vec![desc(&[("key3", "c")], None)], 1))
        .await;
    assert_eq!(r.overall_code(), OVER);
    let s = &r.statuses[0];
    let l = s.current_limit.as_ref().unwrap();
    assert_eq!(l.name, "another-cap (3 per 5m)");
    assert_eq!((l.requests_per_unit, l.unit), (3, MINUTE));
    // Rolling from creation at T0: resets at T0 + 5 min, 4 minutes from now.
    let d = s.duration_until_reset.as_ref().unwrap();
    assert_eq!((d.seconds, d.nanos), (240, 0));
    assert_eq!(f.used("another-cap"), 3);
}

#[tokio::test]
async fn wildcard_instances_follow_their_rule_and_are_bounded() {
    let f = fixture(&[CONFIG]).await;
    let rule = rules::rule_id("basic", "key1");
    let spec = f.node.limit_spec(&rule).unwrap();
    f.call(req("basic", vec![desc(&[("key1", "a")], None)], 1))
        .await;
    let inst = rules::instance_id(&rule, "key1=a");
    let i = f.node.limit_spec(&inst).unwrap();
    assert_eq!(
        i.spec_gen, spec.spec_gen,
        "an instance counts in its rule's generation"
    );
    assert_eq!(i.input.max, 50);
    assert_eq!(i.input.scope.get(rules::TEMPLATE).unwrap(), &rule);
    // Raising the rule's max reaches the instance on its next use, usage kept.
    let text = CONFIG.replace("requests_per_unit: 50", "requests_per_unit: 60");
    let plan = import::plan(&import::parse(text.trim_end_matches("---\n")).unwrap()).unwrap();
    import::apply(&f.node, &plan, false).await.unwrap();
    let r = f
        .call(req("basic", vec![desc(&[("key1", "a")], None)], 1))
        .await;
    assert_eq!(shape(&r), [(OK, 60, SECOND, 58)]);
    // Past the bound, new values share the rule's counter.
    let small = RateLimiter::new(f.node.clone(), 1, Arc::default());
    let r = small
        .should_rate_limit(&req("basic", vec![desc(&[("key1", "b")], None)], 1), None)
        .await
        .unwrap();
    assert_eq!(shape(&r), [(OK, 60, SECOND, 59)]);
    assert_eq!(f.used(&rule), 1);
    assert!(
        f.node
            .limit_spec(&rules::instance_id(&rule, "key1=b"))
            .is_none()
    );
    assert_eq!(
        small
            .metrics()
            .instances_overflow_total
            .load(Ordering::Relaxed),
        1
    );
}

#[tokio::test]
async fn import_is_idempotent_and_removes_what_the_config_dropped() {
    let f = fixture(&[ANOTHER]).await;
    f.call(req("another", vec![desc(&[("key3", "q")], None)], 1))
        .await;
    let plan = import::plan(&import::parse(ANOTHER).unwrap()).unwrap();
    let again = import::apply(&f.node, &plan, false).await.unwrap();
    assert!(
        again
            .actions
            .iter()
            .all(|(_, _, a)| *a == import::Action::Unchanged)
    );
    let smaller = "domain: another\ndescriptors:\n  - key: key2\n    rate_limit: {unit: minute, requests_per_unit: 5}\n";
    let plan = import::plan(&import::parse(smaller).unwrap()).unwrap();
    let dry = import::apply(&f.node, &plan, true).await.unwrap();
    let a = import::apply(&f.node, &plan, false).await.unwrap();
    assert_eq!(dry, a, "a dry run says what the run does");
    let by_action = |x: import::Action| {
        a.actions
            .iter()
            .filter(|(_, _, y)| *y == x)
            .map(|(_, d, _)| d.as_str())
            .collect::<Vec<_>>()
    };
    assert_eq!(by_action(import::Action::Updated), ["key2"]);
    assert_eq!(by_action(import::Action::Deleted).len(), 5);
    assert_eq!(a.instances_deleted, 1);
    let r = f
        .call(req("another", vec![desc(&[("key3", "q")], None)], 1))
        .await;
    assert_eq!(
        shape(&r),
        [(OK, 0, 0, 0)],
        "a deleted rule no longer matches"
    );
}

#[tokio::test]
async fn bad_calls_are_refused_and_change_nothing() {
    let f = fixture(&[ANOTHER]).await;
    for (r, says) in [
        (
            req("", vec![desc(&[("k", "v")], None)], 1),
            "domain must not be empty",
        ),
        (
            req("another", vec![], 1),
            "descriptor list must not be empty",
        ),
        (req("another", vec![desc(&[], None)], 1), "entries"),
        (
            req(
                "another",
                vec![desc(&[("key2", &"x".repeat(2000))], None)],
                1,
            ),
            "longer than",
        ),
    ] {
        let e = f.rl.should_rate_limit(&r, None).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains(says), "{}", e.message());
    }
    assert!(
        f.node
            .limits(&Scope::new())
            .iter()
            .all(|l| l.report.used == 0)
    );
}

/// A rule edited by hand to a rolling 90-second period (tally's own periods work through
/// RLS): reported with the closest unit, its real period in the name, the exact reset.
#[tokio::test]
async fn a_rule_with_a_rolling_period_that_is_no_rls_unit() {
    let f = fixture(&[ANOTHER]).await;
    let rule = rules::rule_id("another", "key2");
    let mut input = f.node.limit_spec(&rule).unwrap().input;
    input.period = "90s".parse().unwrap();
    input.calendar_aligned = false;
    f.node.put_limit(&rule, input).await.unwrap();
    f.clock.0.store(T0 + 30_000, Ordering::SeqCst);
    let r = f
        .call(req("another", vec![desc(&[("key2", "q")], None)], 1))
        .await;
    assert_eq!(shape(&r), [(OK, 20, MINUTE, 19)]);
    let s = &r.statuses[0];
    assert_eq!(
        s.current_limit.as_ref().unwrap().name,
        "key2-per-minute (20 per 90s)"
    );
    // The instance was created at T0 + 30 s with its rule's anchor (the edit at T0):
    // 60 s of the first 90 s window are left.
    let d = s.duration_until_reset.as_ref().unwrap();
    assert_eq!((d.seconds, d.nanos), (60, 0));
}
