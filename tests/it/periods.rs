//! Periods: rolling and calendar-aligned windows as the server reports them, and the epoch a
//! recorded event lands in (I5: deterministic epochs; checks use the current epoch).
//!
//! Expected boundaries come from an oracle written here with jiff's calendar and tz
//! database ([`aligned_bounds`], [`rolling_end`]); the oracle itself is pinned by hand-
//! computed values in `oracle_matches_hand_computed_boundaries`, so a test does not merely
//! agree with the server's own use of the same library.

use std::time::{Duration, Instant};

use jiff::civil;
use jiff::tz::TimeZone;
use jiff::{Span, Timestamp, ToSpan, Zoned};
use tally_tests::{Node, Value, assert_keys, count, json, micros, ok, time};

/// `"<n><unit>"` → (n, unit).
fn parse_period(period: &str) -> (i64, char) {
    let unit = period.chars().last().expect("period has a unit");
    let n = period[..period.len() - 1].parse().expect("period count");
    (n, unit)
}

/// The span of a period, for calendar arithmetic in the limit's timezone.
fn period_span(period: &str) -> Span {
    let (n, unit) = parse_period(period);
    match unit {
        's' => n.seconds(),
        'm' => n.minutes(),
        'h' => n.hours(),
        'd' => n.days(),
        'w' => n.weeks(),
        'M' => n.months(),
        'Y' => n.years(),
        other => panic!("unknown unit {other}"),
    }
}

/// The calendar-aligned period containing `at`: it starts on a unit boundary in `tz`
/// (minute, hour, midnight, Monday, the 1st, Jan 1; `3M` = quarters) and lasts one span.
/// Only the multiples the contract defines are supported: n = 1, or months dividing 12.
fn aligned_bounds(at: Timestamp, period: &str, tz: &str) -> (Timestamp, Timestamp) {
    let (n, unit) = parse_period(period);
    assert!(
        n == 1 || (unit == 'M' && 12 % n == 0),
        "oracle does not define aligned {period}"
    );
    let tz = TimeZone::get(tz).expect("known timezone");
    let z = at.to_zoned(tz.clone());
    let d = z.date();
    let start: civil::DateTime = match unit {
        'm' => d.at(z.hour(), z.minute(), 0, 0),
        'h' => d.at(z.hour(), 0, 0, 0),
        'd' => d.at(0, 0, 0, 0),
        'w' => {
            let monday = d
                .checked_sub(i64::from(d.weekday().to_monday_zero_offset()).days())
                .expect("date arithmetic");
            monday.at(0, 0, 0, 0)
        }
        'M' => {
            let month = (i64::from(d.month()) - 1) / n * n + 1;
            civil::date(d.year(), month as i8, 1).at(0, 0, 0, 0)
        }
        'Y' => civil::date(d.year(), 1, 1).at(0, 0, 0, 0),
        other => panic!("oracle does not define aligned unit {other}"),
    };
    let end = start
        .checked_add(period_span(period))
        .expect("date arithmetic");
    let instant = |dt: civil::DateTime| dt.to_zoned(tz.clone()).expect("in tz").timestamp();
    (instant(start), instant(end))
}

/// The end of a rolling period that starts at `start`: one span later by calendar
/// arithmetic in `tz` (so `1M` from Nov 22 ends Dec 22 at the same local time).
fn rolling_end(start: Timestamp, period: &str, tz: &str) -> Timestamp {
    let tz = TimeZone::get(tz).expect("known timezone");
    let z: Zoned = start.to_zoned(tz);
    z.checked_add(period_span(period))
        .expect("date arithmetic")
        .timestamp()
}

fn ts(s: &str) -> Timestamp {
    s.parse().expect("timestamp literal")
}

/// The oracle against boundaries worked out by hand for 2026-11-22T07:58:29Z (a Sunday) and
/// for both 2026 DST changes in New York (23 h and 25 h days).
#[test]
fn oracle_matches_hand_computed_boundaries() {
    let now = ts("2026-11-22T07:58:29Z");
    let table = [
        ("1m", "UTC", "2026-11-22T07:58:00Z", "2026-11-22T07:59:00Z"),
        ("1h", "UTC", "2026-11-22T07:00:00Z", "2026-11-22T08:00:00Z"),
        ("1d", "UTC", "2026-11-22T00:00:00Z", "2026-11-23T00:00:00Z"),
        // IST is UTC+5:30 all year.
        (
            "1d",
            "Asia/Kolkata",
            "2026-11-21T18:30:00Z",
            "2026-11-22T18:30:00Z",
        ),
        // 02:58 EST on Nov 22.
        (
            "1d",
            "America/New_York",
            "2026-11-22T05:00:00Z",
            "2026-11-23T05:00:00Z",
        ),
        ("1w", "UTC", "2026-11-16T00:00:00Z", "2026-11-23T00:00:00Z"),
        ("1M", "UTC", "2026-11-01T00:00:00Z", "2026-12-01T00:00:00Z"),
        // DST ended 2026-11-01 at 06:00Z, so local midnight of Nov 1 was still EDT (−4).
        (
            "1M",
            "America/New_York",
            "2026-11-01T04:00:00Z",
            "2026-12-01T05:00:00Z",
        ),
        ("3M", "UTC", "2026-10-01T00:00:00Z", "2027-01-01T00:00:00Z"),
        ("1Y", "UTC", "2026-01-01T00:00:00Z", "2027-01-01T00:00:00Z"),
        // Sydney is on AEDT (+11) on Jan 1.
        (
            "1Y",
            "Australia/Sydney",
            "2025-12-31T13:00:00Z",
            "2026-12-31T13:00:00Z",
        ),
    ];
    for (period, tz, start, end) in table {
        assert_eq!(
            aligned_bounds(now, period, tz),
            (ts(start), ts(end)),
            "aligned {period} in {tz}"
        );
    }
    // 25 h and 23 h local days.
    assert_eq!(
        aligned_bounds(ts("2026-11-01T12:00:00Z"), "1d", "America/New_York"),
        (ts("2026-11-01T04:00:00Z"), ts("2026-11-02T05:00:00Z"))
    );
    assert_eq!(
        aligned_bounds(ts("2026-03-08T12:00:00Z"), "1d", "America/New_York"),
        (ts("2026-03-08T05:00:00Z"), ts("2026-03-09T04:00:00Z"))
    );
    assert_eq!(
        rolling_end(ts("2026-11-22T07:58:29.123Z"), "1M", "UTC"),
        ts("2026-12-22T07:58:29.123Z")
    );
    assert_eq!(
        rolling_end(ts("2026-11-22T07:58:29Z"), "1m", "UTC"),
        ts("2026-11-22T07:59:29Z")
    );
}

// ---------------------------------------------------------------------------------------
// The suite's check helper.

/// One limit whose reported period is checked.
struct Case {
    period: &'static str,
    aligned: bool,
    tz: &'static str,
}

const fn aligned(period: &'static str, tz: &'static str) -> Case {
    Case {
        period,
        aligned: true,
        tz,
    }
}

const fn rolling(period: &'static str, tz: &'static str) -> Case {
    Case {
        period,
        aligned: false,
        tz,
    }
}

/// How often a case is retried when the clock crossed one of its boundaries mid-check.
const BOUNDARY_RETRIES: usize = 5;

/// For each case: create a cost limit with that period, then require that the view's
/// `period_start`/`resets_at` (UTC, `Z`) are exactly the oracle's, and that a check's entry
/// reports the same `resets_at`.
///
/// Aligned: the bounds of the aligned period containing the time of the request, computed
/// from the clock just before and just after (a case whose boundary passed in between is
/// retried). Rolling: the period starts at creation (between those two clock readings,
/// with 1 s of slack for coarse anchors) and ends one span later by calendar arithmetic.
fn check_periods(node: &Node, cases: &[Case]) {
    for (i, case) in cases.iter().enumerate() {
        let what = format!(
            "{} {} in {}",
            if case.aligned { "aligned" } else { "rolling" },
            case.period,
            case.tz
        );
        let id = format!("p{i}");
        let attrs = json!({"model": format!("m{i}")});
        let body = json!({"scope": attrs, "metric": "cost", "max": 10.0, "period": case.period,
                          "calendar_aligned": case.aligned, "timezone": case.tz});
        let mut done = false;
        for _ in 0..BOUNDARY_RETRIES {
            let before = Timestamp::now();
            let view = ok(node.put(&format!("/v1/limits/{id}"), body.clone()));
            let decision = ok(node.post("/v1/check", json!({"attributes": attrs})));
            let got = ok(node.get(&format!("/v1/limits/{id}")));
            let after = Timestamp::now();
            for v in [&view, &got] {
                assert_eq!(v["period"], json!(case.period), "{what}: {v}");
                assert_eq!(v["calendar_aligned"], json!(case.aligned), "{what}: {v}");
                assert_eq!(v["timezone"], json!(case.tz), "{what}: {v}");
            }
            let (start, end) = (time(&got["period_start"]), time(&got["resets_at"]));
            let entry = &decision["limits"][0];
            assert_eq!(entry["id"], json!(id), "{what}: {decision}");
            let expected = if case.aligned {
                let bounds = aligned_bounds(before, case.period, case.tz);
                if bounds != aligned_bounds(after, case.period, case.tz) {
                    continue; // a boundary passed during the requests
                }
                bounds
            } else {
                assert!(
                    before - 1.second() <= start && start <= after + 1.second(),
                    "{what}: rolling period_start {start} should be its creation time, \
                     between {before} and {after}"
                );
                (start, rolling_end(start, case.period, case.tz))
            };
            assert_eq!((start, end), expected, "{what}: view {got}");
            assert_eq!(
                (time(&view["period_start"]), time(&view["resets_at"])),
                expected,
                "{what}: PUT reply {view}"
            );
            assert_eq!(time(&entry["resets_at"]), end, "{what}: check {decision}");
            done = true;
            break;
        }
        assert!(done, "{what}: boundary crossed on every attempt");
    }
}

/// Aligned periods start on unit boundaries in the limit's timezone and end one span later,
/// in UTC with a `Z` (I5: every node derives the same epoch from the same clock reading).
#[test]
fn aligned_periods() {
    let node = Node::single();
    check_periods(
        &node,
        &[
            aligned("1d", "UTC"),
            aligned("1M", "America/New_York"),
            aligned("1h", "UTC"),
            aligned("1m", "UTC"),
            aligned("1d", "Asia/Kolkata"),
            aligned("1d", "America/New_York"),
            aligned("1w", "UTC"),
            aligned("1M", "UTC"),
            aligned("3M", "UTC"),
            aligned("1Y", "UTC"),
            aligned("1Y", "Australia/Sydney"),
        ],
    );
}

/// Rolling periods start at the limit's creation and last one span, months by calendar
/// arithmetic (I5).
#[test]
fn rolling_periods() {
    let node = Node::single();
    check_periods(
        &node,
        &[
            rolling("1m", "UTC"),
            rolling("1h", "UTC"),
            rolling("1d", "UTC"),
            rolling("1d", "America/New_York"),
            rolling("1w", "UTC"),
            rolling("1M", "UTC"),
            rolling("1Y", "UTC"),
        ],
    );
    // The span in plain seconds for the fixed units.
    for (i, secs) in [(0, 60), (1, 3600), (2, 86_400), (4, 7 * 86_400)] {
        let v = ok(node.get(&format!("/v1/limits/p{i}")));
        let (start, end) = (time(&v["period_start"]), time(&v["resets_at"]));
        assert_eq!(end.as_second() - start.as_second(), secs, "{v}");
        assert_eq!(
            end.subsec_nanosecond(),
            start.subsec_nanosecond(),
            "same sub-second phase: {v}"
        );
    }
}

/// A rolling `1s` requests limit with max 2: two check-then-record rounds are allowed, the
/// third check is denied, and once the second has passed checks are allowed again with
/// `used` 0 (I5: checks use the current epoch; old usage is history).
#[test]
fn rolling_one_second_requests_limit() {
    let node = Node::single();
    let attrs = json!({"user": "p1"});
    let view = ok(node.put(
        "/v1/limits/rps",
        json!({"scope": attrs, "metric": "requests", "max": 2, "period": "1s"}),
    ));
    assert_eq!(
        time(&view["resets_at"]).as_millisecond() - time(&view["period_start"]).as_millisecond(),
        1000,
        "{view}"
    );
    let check = || ok(node.post("/v1/check", json!({"attributes": attrs})));
    let entry = |reply: &Value| -> (i64, u64, u64, Timestamp) {
        let limits = reply["limits"].as_array().expect("limits array");
        assert_eq!(limits.len(), 1, "{reply}");
        let e = &limits[0];
        assert_keys(
            e,
            &["id", "metric", "used", "max", "remaining", "resets_at"],
        );
        assert_eq!(e["id"], json!("rps"), "{reply}");
        assert_eq!(count(&e["max"]), 2, "{reply}");
        let allowed = i64::from(reply["allowed"].as_bool().unwrap_or(true));
        (
            allowed,
            count(&e["used"]),
            count(&e["remaining"]),
            time(&e["resets_at"]),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    for attempt in 0.. {
        assert!(
            Instant::now() < deadline,
            "never got three decisions inside one 1 s period"
        );
        // Start right after a boundary, so the round fits in one period.
        let first = entry(&check()).3;
        let fresh = loop {
            let reply = check();
            if entry(&reply).3 != first {
                break reply;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let rec = |n: u32| {
            ok(node.post(
                "/v1/usage",
                json!({"id": format!("a{attempt}-{n}"), "attributes": attrs}),
            ))
        };
        let c1 = entry(&fresh);
        let r1 = rec(1);
        let c2 = entry(&check());
        let r2 = rec(2);
        let c3_reply = check();
        let c3 = entry(&c3_reply);
        let (u1, u2) = (
            entry(&json!({"allowed": true, "limits": r1["limits"]})),
            entry(&json!({"allowed": true, "limits": r2["limits"]})),
        );
        let same_period = [c2.3, u1.3, u2.3, c3.3].iter().all(|t| *t == c1.3);
        if !same_period {
            continue; // a boundary passed mid-round
        }
        assert_eq!(
            (r1["applied"].clone(), r2["applied"].clone()),
            (json!(true), json!(true))
        );
        // (allowed, used, remaining)
        assert_eq!((c1.0, c1.1, c1.2), (1, 0, 2), "first check");
        assert_eq!((u1.1, u1.2), (1, 1), "after first record");
        assert_eq!((c2.0, c2.1, c2.2), (1, 1, 1), "second check: 1 + 1 <= 2");
        assert_eq!((u2.1, u2.2), (2, 0), "after second record");
        assert_eq!((c3.0, c3.1, c3.2), (0, 2, 0), "third check: 2 + 1 > 2");
        assert_eq!(c3_reply["denied_by"], json!(["rps"]), "{c3_reply}");
        // Allowed again once the period is over, within 3 s.
        let until = Instant::now() + Duration::from_secs(3);
        loop {
            let reply = check();
            let e = entry(&reply);
            if e.0 == 1 {
                assert_eq!((e.1, e.2), (0, 2), "new period starts empty: {reply}");
                assert!(e.3 > c3.3, "resets_at moved forward: {reply}");
                assert!(
                    Timestamp::now() >= c3.3,
                    "allowed again only after resets_at {}",
                    c3.3
                );
                assert_eq!(reply["denied_by"], json!([]), "{reply}");
                return;
            }
            assert!(
                Instant::now() < until,
                "still denied 3 s after the denial: {reply}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A record counts in the epoch of its `at`: one second before today's midnight (UTC) is
/// yesterday's period and does not count today; midnight itself and "now" do (I5).
#[test]
fn records_land_in_the_epoch_of_their_at() {
    let node = Node::single();
    for attempt in 0..3 {
        let now = Timestamp::now();
        let (midnight, tomorrow) = aligned_bounds(now, "1d", "UTC");
        let id = format!("daily{attempt}");
        let attrs = json!({"customer": format!("e{attempt}")});
        ok(node.put(
            &format!("/v1/limits/{id}"),
            json!({"scope": attrs, "metric": "cost", "max": 100.0, "period": "1d",
                   "calendar_aligned": true}),
        ));
        let rec = |n: u32, cost: f64, at: Option<Timestamp>| {
            let mut body = json!({"id": format!("{id}-{n}"), "attributes": attrs, "cost": cost});
            if let Some(at) = at {
                body["at"] = json!(at.to_string());
            }
            let reply = ok(node.post("/v1/usage", body));
            assert_eq!(reply["applied"], json!(true), "{reply}");
            micros(&reply["limits"][0]["used"])
        };
        let used = [
            rec(1, 1.0, Some(midnight - 1.second())),
            rec(2, 2.0, Some(midnight)),
            rec(3, 4.0, None),
        ];
        let view = ok(node.get(&format!("/v1/limits/{id}")));
        if aligned_bounds(Timestamp::now(), "1d", "UTC").0 != midnight {
            continue; // the day changed mid-test
        }
        assert_eq!(used, [0, 2_000_000, 6_000_000], "used after each record");
        assert_eq!(micros(&view["used"]), 6_000_000, "{view}");
        assert_eq!(time(&view["period_start"]), midnight, "{view}");
        assert_eq!(time(&view["resets_at"]), tomorrow, "{view}");
        return;
    }
    panic!("the UTC day changed on every attempt");
}
