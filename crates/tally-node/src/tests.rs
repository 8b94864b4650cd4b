use super::*;
use std::sync::atomic::{AtomicI64, Ordering};

/// A clock the test moves by hand.
struct TestClock(AtomicI64);

impl Clock for TestClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

const T0: i64 = 1_795_327_200_000; // 2026-11-22T06:00:00Z

fn config(dir: &std::path::Path, clock: &Arc<TestClock>) -> NodeConfig {
    let mut c = NodeConfig::new(dir);
    c.clock = clock.clone();
    c.node_id = Some("node-a".into());
    c
}

fn limit(metric: Metric, max: u64, period: &str) -> LimitInput {
    LimitInput {
        scope: [("team".to_string(), "eng".to_string())].into(),
        metric,
        max,
        period: period.parse().unwrap(),
        calendar_aligned: true,
        timezone: "UTC".into(),
        mode: Default::default(),
        members: Vec::new(),
    }
}

fn rec(id: &str, micros: u64) -> UsageRecord {
    UsageRecord {
        id: id.into(),
        attributes: vec![("team".into(), "eng".into())],
        amounts: Amounts {
            cost: tally_core::Micros(micros),
            tokens: 0,
            requests: 1,
        },
        at_ms: None,
        reservation: None,
    }
}

#[tokio::test]
async fn records_are_durable_deduplicated_and_restored() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(TestClock(AtomicI64::new(T0)));
    {
        let node = Node::open(config(dir.path(), &clock)).unwrap();
        node.put_limit("b", limit(Metric::Cost, 100, "1d"))
            .await
            .unwrap();
        // The same id twice in one batch and again later: applied once (I2).
        let out = node
            .record(vec![rec("r1", 10), rec("r2", 5), rec("r1", 10)])
            .await
            .unwrap();
        assert_eq!(out, vec![true, true, false]);
        assert_eq!(node.record(vec![rec("r1", 10)]).await.unwrap(), vec![false]);
        assert_eq!(node.limit("b").unwrap().report.used, 15);
        node.reset_limit("b", 40).await.unwrap();
        assert_eq!(node.limit("b").unwrap().report.used, 40);
        node.record(vec![rec("r3", 1)]).await.unwrap();
        node.shutdown().await;
    }
    let node = Node::open(config(dir.path(), &clock)).unwrap();
    assert_eq!(node.node_id(), "node-a");
    let d = node.limit("b").unwrap();
    assert_eq!((d.report.used, d.report.max), (41, 100));
    assert_eq!(d.nodes, vec![("node-a".to_string(), 1)]);
    // Ids survive the restart.
    assert_eq!(
        node.record(vec![rec("r3", 1), rec("r4", 2)]).await.unwrap(),
        vec![false, true]
    );
    assert_eq!(node.limit("b").unwrap().report.used, 43);
    // A new day is a new epoch.
    clock.0.store(T0 + 86_400_000, Ordering::SeqCst);
    let c = node.check(&[("team", "eng")], Amounts::default());
    assert!(c.allowed);
    assert_eq!(c.limits[0].used, 0);
    // A late record for yesterday lands in yesterday's epoch, read back from disk.
    let mut late = rec("r5", 7);
    late.at_ms = Some(T0 + 1000);
    node.record(vec![late]).await.unwrap();
    assert_eq!(node.limit("b").unwrap().report.used, 0);
    node.shutdown().await;
}

#[tokio::test]
async fn bad_input_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(TestClock(AtomicI64::new(T0)));
    let node = Node::open(config(dir.path(), &clock)).unwrap();
    node.put_limit("b", limit(Metric::Cost, 100, "1d"))
        .await
        .unwrap();
    let mut future = rec("f", 1);
    future.at_ms = Some(T0 + 10 * 60_000);
    let err = node.record(vec![rec("ok", 1), future]).await.unwrap_err();
    assert!(matches!(err, NodeError::InvalidArgument { .. }), "{err}");
    let mut old = rec("o", 1);
    old.at_ms = Some(T0 - 25 * 3_600_000);
    assert!(node.record(vec![old]).await.is_err());
    assert!(node.record(vec![rec("bad id", 1)]).await.is_err());
    assert_eq!(node.limit("b").unwrap().report.used, 0, "all or nothing");
    assert!(matches!(
        node.reset_limit("nope", 0).await,
        Err(NodeError::NotFound(_))
    ));
    assert!(matches!(
        node.delete_limit("nope").await,
        Err(NodeError::NotFound(_))
    ));
    node.put_entity(
        "virtual_key",
        "vk-1",
        [("team".to_string(), "eng".to_string())].into(),
        Default::default(),
    )
    .await
    .unwrap();
    let cycle = node
        .put_entity(
            "team",
            "eng",
            [("virtual_key".to_string(), "vk-1".to_string())].into(),
            Default::default(),
        )
        .await;
    assert!(matches!(cycle, Err(NodeError::Conflict(_))), "{cycle:?}");
    assert!(node.entity("team", "eng").is_none());
    // Parent expansion: a record with only the key counts against the team.
    let mut r = rec("vk", 3);
    r.attributes = vec![("virtual_key".into(), "vk-1".into())];
    node.record(vec![r]).await.unwrap();
    assert_eq!(node.limit("b").unwrap().report.used, 3);
    node.shutdown().await;
}

#[tokio::test]
async fn concurrent_records_group_commit_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(TestClock(AtomicI64::new(T0)));
    let node = Node::open(config(dir.path(), &clock)).unwrap();
    node.put_limit("b", limit(Metric::Requests, 1_000_000, "1d"))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for t in 0..16 {
        let node = node.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..50 {
                node.record(vec![rec(&format!("t{t}-{i}"), 0)])
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(node.limit("b").unwrap().report.used, 800);
    let commits = node.metrics().commit_seconds.snapshot().count;
    assert!(
        commits < 800,
        "records share commits ({commits} commits for 800 records)"
    );
    assert_eq!(Metrics::get(&node.metrics().commit_records_total), 800);
    node.shutdown().await;
}

/// History (issue 18): closed epochs stay readable for the retention, then their slots
/// leave the disk, and a set-usage reset keeps the baseline of the epoch it opened. Six
/// days of hourly periods with a 2-day retention, the clock driven by hand.
#[tokio::test]
async fn history_is_kept_for_the_retention_then_dropped() {
    let hour = 3_600_000;
    let dir = tempfile::tempdir().unwrap();
    let midnight = T0 - 6 * hour;
    let clock = Arc::new(TestClock(AtomicI64::new(midnight + hour / 2)));
    let mut c = config(dir.path(), &clock);
    c.dedup_window_ms = hour;
    c.history_retention_ms = 48 * hour;
    let node = Node::open(c).unwrap();
    node.put_limit("h", limit(Metric::Requests, 1 << 40, "1h"))
        .await
        .unwrap();
    node.put_limit("d", limit(Metric::Requests, 1 << 40, "1d"))
        .await
        .unwrap();
    let hours = 144i64;
    for k in 0..hours {
        clock
            .0
            .store(midnight + k * hour + hour / 2, Ordering::SeqCst);
        let recs: Vec<UsageRecord> = (0..=k).map(|i| rec(&format!("h{k}-{i}"), 0)).collect();
        assert!(node.record(recs).await.unwrap().iter().all(|a| *a));
        if k == 140 {
            // A set-usage: hour 140 gets a second epoch that starts at 1 000.
            node.reset_limit("h", 1000).await.unwrap();
            let recs: Vec<UsageRecord> = (0..5).map(|i| rec(&format!("r{i}"), 0)).collect();
            node.record(recs).await.unwrap();
        }
        node.maintain_now().await.unwrap();
    }
    let q = |since_ms, until_ms, epochs_max| HistoryQuery {
        since_ms,
        until_ms,
        epochs_max,
    };
    // Now is hour 143:30; the cutoff is 48 h before, at 95:30: hour 95 ends after it.
    let h = node.history("h", q(None, None, 1000)).await.unwrap();
    assert_eq!(h.metric, Metric::Requests);
    let starts: Vec<i64> = h
        .epochs
        .iter()
        .map(|e| (e.period_start_ms - midnight) / hour)
        .collect();
    let mut want: Vec<i64> = (95..hours).rev().collect();
    want.insert(hours as usize - 1 - 140, 140);
    assert_eq!(starts, want, "newest first, both epochs of hour 140");
    for e in &h.epochs {
        let k = (e.period_start_ms - midnight) / hour;
        assert_eq!(e.period_end_ms, Some(e.period_start_ms + hour));
        assert_eq!(e.current, k == hours - 1);
        let (used, baseline) = match (k, e.baseline) {
            (140, 1000) => (1005, 1000),
            _ => (k as u64 + 1, 0),
        };
        assert_eq!((e.used, e.baseline), (used, baseline), "hour {k}");
        assert_eq!(e.nodes, vec![("node-a".to_string(), used - baseline)]);
    }
    // A time range: epochs overlapping [100:00, 103:00).
    let r = node
        .history(
            "h",
            q(Some(midnight + 100 * hour), Some(midnight + 103 * hour), 10),
        )
        .await
        .unwrap();
    let starts: Vec<i64> = r
        .epochs
        .iter()
        .map(|e| (e.period_start_ms - midnight) / hour)
        .collect();
    assert_eq!(starts, vec![102, 101, 100]);
    let page = node.history("h", q(None, None, 2)).await.unwrap();
    assert_eq!(page.epochs.len(), 2);
    assert!(page.epochs[0].current);
    // Days: day 5 is current; days 3 and 4 ended after the cutoff.
    let d = node.history("d", q(None, None, 1000)).await.unwrap();
    let days: Vec<(i64, u64)> = d
        .epochs
        .iter()
        .map(|e| ((e.period_start_ms - midnight) / (24 * hour), e.used))
        .collect();
    let per_day = |day: i64| -> u64 { (day * 24..day * 24 + 24).map(|k| k as u64 + 1).sum() };
    assert_eq!(
        days,
        vec![(5, per_day(5) + 5), (4, per_day(4)), (3, per_day(3))]
    );
    assert!(matches!(
        node.history("nope", q(None, None, 10)).await,
        Err(NodeError::NotFound(_))
    ));
    for bad in [
        q(None, None, 0),
        q(None, None, 1001),
        q(Some(5), Some(5), 10),
    ] {
        assert!(matches!(
            node.history("h", bad).await,
            Err(NodeError::InvalidArgument { .. })
        ));
    }
    assert_eq!(
        Metrics::get(&node.metrics().history_slots_dropped_total),
        95 + 3
    );
    node.shutdown().await;
    // On disk: only the retained epochs' slots are left.
    let store = tally_store::Store::open(dir.path()).unwrap();
    let slots = store.recover().unwrap().own_slots;
    assert_eq!(slots.iter().filter(|(l, _, _)| l == "h").count(), 50);
    assert_eq!(slots.iter().filter(|(l, _, _)| l == "d").count(), 3);
}

#[tokio::test]
async fn denied_checks_are_kept_in_memory_newest_first() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(TestClock(AtomicI64::new(T0)));
    let node = Node::open(config(dir.path(), &clock)).unwrap();
    node.put_limit("b", limit(Metric::Cost, 100, "1d"))
        .await
        .unwrap();
    node.put_limit("t", limit(Metric::Tokens, 50, "1d"))
        .await
        .unwrap();
    let ask = |tokens| Amounts {
        cost: tally_core::Micros(10),
        tokens,
        requests: 1,
    };
    // Allowed checks leave nothing behind.
    assert!(node.check(&[("team", "eng")], ask(50)).allowed);
    assert!(node.recent_denials(10).is_empty());

    assert!(
        !node
            .check(&[("team", "eng"), ("model", "m<1>")], ask(51))
            .allowed
    );
    clock.0.store(T0 + 5, Ordering::SeqCst);
    assert!(!node.check(&[("team", "eng")], ask(60)).allowed);
    let got = node.recent_denials(10);
    assert_eq!(got.len(), 2);
    assert_eq!(
        (got[0].seq, got[0].at_ms, got[0].estimate),
        (2, T0 + 5, ask(60))
    );
    assert_eq!(got[0].attributes, [("team".into(), "eng".into())]);
    assert_eq!(got[0].denied_by, ["t"]);
    assert_eq!((got[1].seq, got[1].at_ms), (1, T0));
    assert_eq!(
        got[1].attributes,
        [
            ("team".into(), "eng".into()),
            ("model".into(), "m<1>".into())
        ]
    );
    assert_eq!(node.recent_denials(1), got[..1]);
    assert_eq!(node.denials_skipped(), 0);
    // Memory only: a restarted node starts with an empty ring.
    node.shutdown().await;
    drop(node);
    let node = Node::open(config(dir.path(), &clock)).unwrap();
    assert!(node.recent_denials(10).is_empty());
}
