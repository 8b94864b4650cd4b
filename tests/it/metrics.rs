//! `/metrics` (docs/METRICS.md): latency histograms count exactly the requests sent, the
//! opt-in per-limit series, process metrics, and gossip lag and bytes in a fleet of two.

use std::collections::BTreeMap;
use std::time::Duration;

use tally_tests::*;

/// One sample of the text format: name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

fn scrape(client: &Client) -> Vec<Sample> {
    let (status, text) = client.get_text("/metrics");
    assert_eq!(status, 200, "{text}");
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("name value");
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("not a number: {line}"));
            let (name, labels) = match series.split_once('{') {
                None => (series.to_string(), BTreeMap::new()),
                Some((name, rest)) => {
                    let rest = rest.strip_suffix('}').expect("closing brace");
                    let labels = rest
                        .split(',')
                        .map(|kv| {
                            let (k, v) = kv.split_once('=').expect("k=v");
                            (k.to_string(), v.trim_matches('"').to_string())
                        })
                        .collect();
                    (name.to_string(), labels)
                }
            };
            (name, labels, value)
        })
        .collect()
}

/// The value of the one sample `name` with exactly these labels.
fn sample(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let found: Vec<f64> = samples
        .iter()
        .filter(|(n, l, _)| n == name && *l == want)
        .map(|(_, _, v)| *v)
        .collect();
    assert!(found.len() <= 1, "{name} {labels:?} appears twice");
    found.first().copied()
}

/// A histogram's buckets are cumulative, end in `+Inf` equal to `_count`, and `_sum` is
/// not negative. Returns the count.
#[track_caller]
fn histogram_count(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> u64 {
    let bucket = format!("{name}_bucket");
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let buckets: Vec<(String, f64)> = samples
        .iter()
        .filter(|(n, l, _)| {
            *n == bucket && {
                let mut l = l.clone();
                l.remove("le");
                l == want
            }
        })
        .map(|(_, l, v)| (l["le"].clone(), *v))
        .collect();
    assert!(buckets.len() >= 2, "{name} {labels:?} has no buckets");
    assert_eq!(buckets.last().unwrap().0, "+Inf", "{buckets:?}");
    let mut last_le = f64::NEG_INFINITY;
    for w in buckets.windows(2) {
        assert!(
            w[0].1 <= w[1].1,
            "{name}: buckets not cumulative: {buckets:?}"
        );
    }
    for (le, _) in &buckets[..buckets.len() - 1] {
        let le: f64 = le.parse().unwrap();
        assert!(le > last_le, "{name}: bounds not increasing: {buckets:?}");
        last_le = le;
    }
    let count = sample(samples, &format!("{name}_count"), labels).expect("_count");
    assert_eq!(buckets.last().unwrap().1, count, "{name}: +Inf != count");
    let sum = sample(samples, &format!("{name}_sum"), labels).expect("_sum");
    assert!(sum >= 0.0, "{name}_sum {sum}");
    count as u64
}

fn limit(scope: Value, metric: &str, max: Value) -> Value {
    json!({"scope": scope, "metric": metric, "max": max, "period": "1d"})
}

/// N checks (one of them malformed, one denied), M single records and two batches give
/// histograms with exactly those counts; with `--metrics-limits 2`, the 2 limits closest
/// to their max get `used`/`max` gauges and the denials are counted per limit.
#[test]
fn histograms_count_exactly_what_was_sent() {
    let node = Node::start(NodeOpts::default().args(["--metrics-limits", "2"]));
    let c = node.client();
    ok(c.put(
        "/v1/limits/eng-cost",
        limit(json!({"team": "eng"}), "cost", json!(1)),
    ));
    ok(c.put(
        "/v1/limits/eng-requests",
        limit(json!({"team": "eng"}), "requests", json!(1000)),
    ));
    ok(c.put(
        "/v1/limits/ops-tokens",
        limit(json!({"team": "ops"}), "tokens", json!(100)),
    ));
    const CHECKS: u64 = 6;
    for _ in 0..CHECKS {
        let v = ok(c.post(
            "/v1/check",
            json!({"attributes": {"team": "eng"}, "cost": 0.1}),
        ));
        assert_eq!(v["allowed"], json!(true), "{v}");
    }
    // Malformed: 400, timed all the same.
    assert_error(
        &c.post("/v1/check", json!({"attributes": 5})),
        400,
        "invalid_argument",
    );
    const RECORDS: u64 = 5;
    for i in 0..RECORDS {
        ok(c.post(
            "/v1/usage",
            json!({"id": format!("r{i}"), "attributes": {"team": "eng"}, "cost": 0.1}),
        ));
    }
    for (b, n) in [(0, 3), (1, 2)] {
        let records: Vec<Value> = (0..n)
            .map(
                |i| json!({"id": format!("b{b}-{i}"), "attributes": {"team": "eng"}, "cost": 0.01}),
            )
            .collect();
        ok(c.post("/v1/usage/batch", json!({"records": records})));
    }
    // eng-cost: 0.5 + 0.05 = 0.55 used of 1; a check for 0.5 more is denied by it.
    let v = ok(c.post(
        "/v1/check",
        json!({"attributes": {"team": "eng"}, "cost": 0.5}),
    ));
    assert_eq!(v["denied_by"], json!(["eng-cost"]), "{v}");

    let m = scrape(&c);
    assert_eq!(
        histogram_count(&m, "tally_check_duration_seconds", &[]),
        CHECKS + 2
    );
    assert_eq!(
        histogram_count(
            &m,
            "tally_record_duration_seconds",
            &[("endpoint", "usage")]
        ),
        RECORDS
    );
    assert_eq!(
        histogram_count(
            &m,
            "tally_record_duration_seconds",
            &[("endpoint", "usage_batch")]
        ),
        2
    );
    // Requests one after the other: one group commit per request, 5 + 3 + 2 records.
    assert_eq!(
        histogram_count(&m, "tally_commit_duration_seconds", &[]),
        RECORDS + 2
    );
    assert_eq!(sample(&m, "tally_commit_records_total", &[]), Some(10.0));
    assert_eq!(
        sample(&m, "tally_checks_total", &[]),
        Some((CHECKS + 1) as f64)
    );
    assert_eq!(sample(&m, "tally_checks_denied_total", &[]), Some(1.0));

    // Per-limit series: the two limits closest to their max, in the API's units.
    assert_eq!(sample(&m, "tally_limits", &[]), Some(3.0));
    let used = |id: &str, metric: &str| {
        sample(&m, "tally_limit_used", &[("limit", id), ("metric", metric)])
    };
    let max = |id: &str, metric: &str| {
        sample(&m, "tally_limit_max", &[("limit", id), ("metric", metric)])
    };
    assert_eq!(used("eng-cost", "cost"), Some(0.55));
    assert_eq!(max("eng-cost", "cost"), Some(1.0));
    assert_eq!(used("eng-requests", "requests"), Some(10.0));
    assert_eq!(max("eng-requests", "requests"), Some(1000.0));
    assert_eq!(used("ops-tokens", "tokens"), None, "past the cap of 2");
    let limit_series = m
        .iter()
        .filter(|(n, _, _)| n == "tally_limit_used" || n == "tally_limit_max")
        .count();
    assert_eq!(limit_series, 4);
    assert_eq!(
        sample(&m, "tally_limit_denials_total", &[("limit", "eng-cost")]),
        Some(1.0)
    );
    assert_eq!(
        sample(&m, "tally_limit_denials_untracked_total", &[]),
        Some(0.0)
    );

    // Process metrics from /proc.
    let rss = sample(&m, "process_resident_memory_bytes", &[]).expect("rss");
    assert!(rss > 1e6, "{rss}");
    let fds = sample(&m, "process_open_fds", &[]).expect("fds");
    assert!(fds >= 4.0, "{fds}");
    let start = sample(&m, "process_start_time_seconds", &[]).expect("start");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        start <= now + 1.0 && start > now - 600.0,
        "{start} vs {now}"
    );
    assert!(sample(&m, "process_cpu_seconds_total", &[]).expect("cpu") >= 0.0);
}

/// Without `--metrics-limits` no per-limit series exist (the cardinality is opt-in), and a
/// fresh node's histograms are present with zero counts.
#[test]
fn per_limit_series_are_opt_in() {
    let node = Node::single();
    let c = node.client();
    ok(c.put(
        "/v1/limits/a",
        limit(json!({"team": "eng"}), "requests", json!(5)),
    ));
    let m = scrape(&c);
    assert!(
        m.iter().all(|(n, _, _)| !n.starts_with("tally_limit")),
        "per-limit series without --metrics-limits"
    );
    assert_eq!(histogram_count(&m, "tally_check_duration_seconds", &[]), 0);
    assert_eq!(histogram_count(&m, "tally_commit_duration_seconds", &[]), 0);
    // No gossip: no gossip series.
    assert!(m.iter().all(|(n, _, _)| !n.starts_with("tally_gossip")));
}

/// In a fleet of two, a record on one node shows on the other as gossip lag observations
/// (hellos merged after the values they follow), a per-peer lag, and bytes both ways.
#[test]
fn gossip_lag_and_bytes_in_a_fleet_of_two() {
    let fleet = Fleet::start(2);
    let (a, b) = (&fleet.nodes[0], &fleet.nodes[1]);
    ok(a.client().put(
        "/v1/limits/shared",
        limit(json!({"team": "eng"}), "requests", json!(1000)),
    ));
    ok(a.client().post(
        "/v1/usage",
        json!({"id": "g1", "attributes": {"team": "eng"}, "requests": 7}),
    ));
    wait_for(
        Duration::from_secs(20),
        "node-2 to count the record",
        || {
            let (status, v) = b.client().get("/v1/limits/shared");
            if status == 200 && count(&v["used"]) == 7 {
                Ok(())
            } else {
                Err(format!("{v}"))
            }
        },
    );
    // Hellos come at least twice a second; wait for one merged after the record.
    std::thread::sleep(Duration::from_millis(1200));
    let m = scrape(&b.client());
    let n = histogram_count(&m, "tally_gossip_lag_seconds", &[]);
    assert!(n >= 2, "{n} lag observations");
    let sum = sample(&m, "tally_gossip_lag_seconds_sum", &[]).unwrap();
    assert!(
        sum / (n as f64) < 5.0,
        "mean lag {} s on loopback",
        sum / n as f64
    );
    let lag = sample(&m, "tally_gossip_peer_lag_seconds", &[("peer", "node-1")])
        .expect("a lag for node-1");
    assert!((0.0..5.0).contains(&lag), "{lag}");
    for name in [
        "tally_gossip_sent_bytes_total",
        "tally_gossip_received_bytes_total",
    ] {
        let v = sample(&m, name, &[]).unwrap();
        assert!(v > 0.0, "{name} = {v}");
    }
    assert_eq!(sample(&m, "tally_gossip_live_nodes", &[]), Some(2.0));
    assert_eq!(sample(&m, "tally_gossip_dead_nodes", &[]), Some(0.0));
    // The origin's own commit is one group commit.
    let ma = scrape(&a.client());
    assert_eq!(
        histogram_count(&ma, "tally_commit_duration_seconds", &[]),
        1
    );
}
