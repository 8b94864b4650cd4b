use super::*;
use crate::config::BrokenRule;
use crate::period::Period;
use proptest::prelude::*;

const T0: i64 = 1_795_327_200_000; // 2026-11-22T06:00:00Z

fn input(scope: &[(&str, &str)], metric: Metric, max: u64, period: &str) -> LimitInput {
    LimitInput {
        scope: scope
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        metric,
        max,
        period: period.parse().unwrap(),
        calendar_aligned: false,
        timezone: "UTC".into(),
        mode: Default::default(),
        members: Vec::new(),
    }
}

fn put(s: &mut State, id: &str, i: LimitInput, now: i64) {
    let rec = s.prepare_limit_put(id, i, now).unwrap();
    assert!(s.apply_limit(rec, now));
}

fn record(s: &mut State, attrs: &[(&str, &str)], amounts: Amounts, at: i64) -> Vec<Increment> {
    let mut incs = Vec::new();
    s.plan_record(attrs, amounts, at, &mut incs);
    s.apply_increments(&incs);
    incs
}

fn cost(usd_micros: u64) -> Amounts {
    Amounts {
        cost: Micros(usd_micros),
        tokens: 0,
        requests: 1,
    }
}

fn ids(s: &State, d: &Decision) -> Vec<String> {
    let mut v: Vec<String> = d
        .limits
        .iter()
        .map(|l| s.limit_id(l.limit).to_string())
        .collect();
    v.sort();
    v
}

use crate::units::Micros;

#[test]
fn scope_subsets_apply() {
    let mut s = State::new("a");
    put(
        &mut s,
        "global",
        input(&[], Metric::Requests, 100, "1d"),
        T0,
    );
    put(
        &mut s,
        "team",
        input(&[("team", "eng")], Metric::Cost, 10, "1d"),
        T0,
    );
    put(
        &mut s,
        "vk-openai",
        input(
            &[("virtual_key", "vk-1"), ("provider", "openai")],
            Metric::Tokens,
            10,
            "1d",
        ),
        T0,
    );
    put(
        &mut s,
        "other-team",
        input(&[("team", "ops")], Metric::Cost, 10, "1d"),
        T0,
    );
    let d = s.check(
        &[
            ("virtual_key", "vk-1"),
            ("team", "eng"),
            ("provider", "openai"),
        ],
        Amounts::default(),
        T0,
    );
    assert_eq!(ids(&s, &d), ["global", "team", "vk-openai"]);
    let d = s.check(
        &[("virtual_key", "vk-1"), ("team", "eng")],
        Amounts::default(),
        T0,
    );
    assert_eq!(ids(&s, &d), ["global", "team"]);
    let d = s.check(&[("model", "gpt-4o")], Amounts::default(), T0);
    assert_eq!(ids(&s, &d), ["global"]);
}

#[test]
fn check_rule_used_plus_requested() {
    let mut s = State::new("a");
    put(
        &mut s,
        "b",
        input(&[("team", "eng")], Metric::Cost, 100, "1d"),
        T0,
    );
    let attrs = [("team", "eng")];
    record(&mut s, &attrs, cost(60), T0);
    // 60 + 40 <= 100 allowed, 60 + 41 denied.
    assert!(s.check(&attrs, cost(40), T0).allowed);
    let d = s.check(&attrs, cost(41), T0);
    assert!(!d.allowed);
    assert_eq!(
        (d.limits[0].used, d.limits[0].remaining, d.limits[0].denied),
        (60, 40, true)
    );
    record(&mut s, &attrs, cost(40), T0);
    // Exactly at max: nothing requested is denied (used < max fails).
    let d = s.check(&attrs, Amounts::default(), T0);
    assert!(!d.allowed);
    assert_eq!(d.limits[0].used, 100);
    // Requests limits count 1 per check.
    put(
        &mut s,
        "r",
        input(&[("user", "u")], Metric::Requests, 2, "1d"),
        T0,
    );
    let u = [("user", "u")];
    assert!(s.check(&u, Amounts::default(), T0).allowed);
    record(
        &mut s,
        &u,
        Amounts {
            requests: 1,
            ..Amounts::default()
        },
        T0,
    );
    assert!(s.check(&u, Amounts::default(), T0).allowed);
    record(
        &mut s,
        &u,
        Amounts {
            requests: 1,
            ..Amounts::default()
        },
        T0,
    );
    assert!(!s.check(&u, Amounts::default(), T0).allowed);
}

#[test]
fn entity_parents_expand_transitively_and_cycles_are_refused() {
    let mut s = State::new("a");
    put(
        &mut s,
        "cust",
        input(&[("customer", "acme")], Metric::Cost, 5, "1M"),
        T0,
    );
    let scope = |k: &str, v: &str| Scope::from([(k.to_string(), v.to_string())]);
    let r = s
        .prepare_entity_put(
            "virtual_key",
            "vk-1",
            scope("team", "eng"),
            Default::default(),
            T0,
        )
        .unwrap();
    s.apply_entity(r);
    let r = s
        .prepare_entity_put(
            "team",
            "eng",
            scope("customer", "acme"),
            Default::default(),
            T0,
        )
        .unwrap();
    s.apply_entity(r);
    let d = s.check(&[("virtual_key", "vk-1")], Amounts::default(), T0);
    assert_eq!(ids(&s, &d), ["cust"]);
    let err = s
        .prepare_entity_put(
            "customer",
            "acme",
            scope("virtual_key", "vk-1"),
            Default::default(),
            T0,
        )
        .unwrap_err();
    assert!(matches!(err, ConfigError::Cycle { .. }), "{err}");
    assert!(matches!(
        s.prepare_entity_put("team", "x", scope("team", "y"), Default::default(), T0),
        Err(ConfigError::SelfDimension(_))
    ));
    // Naming itself as its own parent is a cycle (409 over HTTP), not a dimension clash.
    let err = s
        .prepare_entity_put("team", "x", scope("team", "x"), Default::default(), T0)
        .unwrap_err();
    assert_eq!(
        err,
        ConfigError::Cycle {
            dimension: "team".into(),
            value: "x".into(),
            path: "team/x -> team/x".into()
        }
    );
    // A request's own value wins over a parent's.
    let d = s.check(
        &[("virtual_key", "vk-1"), ("customer", "other")],
        Amounts::default(),
        T0,
    );
    assert!(d.limits.is_empty());
    // Delete unlinks.
    let r = s.prepare_entity_delete("team", "eng", T0).unwrap();
    s.apply_entity(r);
    assert!(
        s.check(&[("virtual_key", "vk-1")], Amounts::default(), T0)
            .limits
            .is_empty()
    );
}

#[test]
fn rolling_period_resets_by_epoch_not_mutation() {
    let mut s = State::new("a");
    put(&mut s, "r", input(&[], Metric::Requests, 2, "1s"), T0);
    let one = Amounts {
        requests: 1,
        ..Amounts::default()
    };
    record(&mut s, &[], one, T0);
    record(&mut s, &[], one, T0 + 10);
    assert!(!s.check(&[], one, T0 + 999).allowed);
    s.tick(T0 + 1000);
    let d = s.check(&[], one, T0 + 1000);
    assert!(d.allowed);
    assert_eq!(d.limits[0].used, 0);
    assert_eq!(d.limits[0].period_start_ms, T0 + 1000);
    assert_eq!(d.limits[0].resets_at_ms, T0 + 2000);
}

#[test]
fn reset_and_set_usage_open_new_epochs() {
    let mut s = State::new("a");
    put(&mut s, "b", input(&[], Metric::Cost, 100, "1d"), T0);
    record(&mut s, &[], cost(70), T0);
    let before = s.epoch_of("b", T0).unwrap();
    let reg = s.prepare_reset("b", 0, T0 + 5).unwrap();
    assert!(s.apply_reset("b", reg.clone()));
    assert!(!s.apply_reset("b", reg), "idempotent");
    let after = s.epoch_of("b", T0 + 6).unwrap();
    assert!(after > before && after.period == before.period);
    assert_eq!(s.limit_view("b", T0 + 6).unwrap().status.used, 0);
    record(&mut s, &[], cost(5), T0 + 7);
    let reg = s.prepare_reset("b", 40, T0 + 8).unwrap();
    s.apply_reset("b", reg);
    let v = s.limit_view("b", T0 + 9).unwrap();
    assert_eq!((v.status.used, v.baseline), (40, 40));
    // Changing max is not a reset; changing the period is.
    put(&mut s, "b", input(&[], Metric::Cost, 200, "1d"), T0 + 10);
    assert_eq!(s.limit_view("b", T0 + 11).unwrap().status.used, 40);
    put(&mut s, "b", input(&[], Metric::Cost, 200, "1w"), T0 + 12);
    assert_eq!(s.limit_view("b", T0 + 13).unwrap().status.used, 0);
}

#[test]
fn open_epochs_are_current_or_later_and_not_superseded() {
    let mut s = State::new("a");
    put(&mut s, "d", input(&[], Metric::Requests, 100, "1d"), T0);
    let day = 86_400_000;
    let today = s.epoch_of("d", T0).unwrap();
    let tomorrow = s.epoch_of("d", T0 + day).unwrap();
    let yesterday = s.epoch_of("d", T0 - day).unwrap();
    assert!(s.is_open("d", today, T0));
    assert!(
        s.is_open("d", tomorrow, T0),
        "a record slightly ahead counts later"
    );
    assert!(!s.is_open("d", yesterday, T0), "a closed period is history");
    assert!(!s.is_open("unknown", today, T0));
    // A reset supersedes today's first epoch; the reset's epoch is open.
    let reg = s.prepare_reset("d", 0, T0 + 5).unwrap();
    s.apply_reset("d", reg);
    let after = s.epoch_of("d", T0 + 6).unwrap();
    assert!(s.is_open("d", after, T0 + 6));
    assert!(!s.is_open("d", today, T0 + 6));
    assert!(
        s.is_open("d", tomorrow, T0 + 6),
        "the reset is of today only"
    );
    // A period edit supersedes the day's epochs for good: a concurrent edit that kept the
    // old period loses even with a newer version, so no epoch goes back (I5).
    let old_gen = s.limit_record("d").unwrap().clone();
    put(&mut s, "d", input(&[], Metric::Requests, 100, "1w"), T0 + 7);
    let week = s.epoch_of("d", T0 + 8).unwrap();
    assert!(!s.is_open("d", after, T0 + 8));
    let mut keep = old_gen;
    keep.version.hlc = s.hlc_now(T0 + 9);
    assert!(!s.apply_limit(keep, T0 + 9));
    assert!(!s.is_open("d", after, T0 + 10));
    assert_eq!(s.epoch_of("d", T0 + 10), Some(week));
    // Deleted limits have no open epochs.
    let t = s.prepare_limit_delete("d", T0 + 11).unwrap();
    s.apply_limit(t, T0 + 11);
    assert!(!s.is_open("d", after, T0 + 12));
}

#[test]
fn a_counting_change_wins_over_a_concurrent_edit_and_epochs_never_go_back() {
    // a and b share a 1d limit; partitioned, b changes the period (a reset) and back,
    // while a edits only max, later. After exchanging records both hold b's last edit.
    let mut a = State::new("a");
    put(&mut a, "l", input(&[], Metric::Requests, 100, "1d"), T0);
    let mut b = State::new("b");
    b.apply_limit(a.limit_record("l").unwrap().clone(), T0);
    let before = a.epoch_of("l", T0 + 1).unwrap();
    put(
        &mut b,
        "l",
        input(&[], Metric::Requests, 100, "1M"),
        T0 + 10,
    );
    put(
        &mut b,
        "l",
        input(&[], Metric::Requests, 300, "1d"),
        T0 + 20,
    );
    let b_epoch = b.epoch_of("l", T0 + 21).unwrap();
    assert!(b_epoch > before, "b's period edits reset the day");
    put(
        &mut a,
        "l",
        input(&[], Metric::Requests, 200, "1d"),
        T0 + 30,
    );
    let (ra, rb) = (
        a.limit_record("l").unwrap().clone(),
        b.limit_record("l").unwrap().clone(),
    );
    assert!(rb.supersedes(&ra) && !ra.supersedes(&rb));
    assert!(a.apply_limit(rb.clone(), T0 + 40));
    assert!(!b.apply_limit(ra, T0 + 40));
    assert_eq!(a.limit_record("l"), Some(&rb));
    assert_eq!(a.epoch_of("l", T0 + 41), Some(b_epoch));
    assert_eq!(a.limit("l").unwrap().input.max, 300);
    // A manual reset made under the old generation after b's edits also survives: the
    // epoch takes the later of the generation and the reset. (Aligned periods: a rolling
    // period re-anchors when its counting changes, which is a new period anyway.)
    let aligned = |period| LimitInput {
        calendar_aligned: true,
        ..input(&[], Metric::Requests, 100, period)
    };
    let mut c = State::new("c");
    put(&mut c, "l", aligned("1d"), T0);
    let mut d = State::new("d");
    d.apply_limit(c.limit_record("l").unwrap().clone(), T0);
    put(&mut d, "l", aligned("1M"), T0 + 10);
    put(&mut d, "l", aligned("1d"), T0 + 20);
    let reg = c.prepare_reset("l", 7, T0 + 30).unwrap();
    c.apply_reset("l", reg.clone());
    let c_epoch = c.epoch_of("l", T0 + 31).unwrap();
    c.apply_limit(d.limit_record("l").unwrap().clone(), T0 + 40);
    d.apply_reset("l", reg);
    assert_eq!(
        c.epoch_of("l", T0 + 41),
        Some(c_epoch),
        "the later reset stays"
    );
    assert_eq!(d.epoch_of("l", T0 + 41), Some(c_epoch));
    assert_eq!(d.limit_view("l", T0 + 41).unwrap().baseline, 7);
}

#[test]
fn concurrent_resets_settle_on_one_register() {
    let mut a = State::new("a");
    let mut b = State::new("b");
    for s in [&mut a, &mut b] {
        let rec = LimitRecord {
            id: "l".into(),
            version: Version {
                hlc: Hlc::from_wall_ms(T0),
                node: "a".into(),
            },
            spec: Some(LimitSpec {
                input: input(&[], Metric::Cost, 100, "1d"),
                anchor_ms: T0,
                spec_gen: Hlc::from_wall_ms(T0),
            }),
        };
        s.apply_limit(rec, T0);
    }
    let ra = a.prepare_reset("l", 10, T0 + 100).unwrap();
    let rb = b.prepare_reset("l", 20, T0 + 100).unwrap();
    a.apply_reset("l", ra.clone());
    b.apply_reset("l", rb.clone());
    a.apply_reset("l", rb);
    b.apply_reset("l", ra);
    assert_eq!(a.epoch_of("l", T0 + 200), b.epoch_of("l", T0 + 200));
    assert_eq!(
        a.limit_view("l", T0 + 200).unwrap().baseline,
        b.limit_view("l", T0 + 200).unwrap().baseline
    );
    assert_eq!(
        a.limit_view("l", T0 + 200).unwrap().baseline,
        20,
        "b's node id wins the tie"
    );
}

#[test]
fn delete_then_recreate_starts_fresh() {
    let mut s = State::new("a");
    put(&mut s, "b", input(&[], Metric::Cost, 100, "1d"), T0);
    record(&mut s, &[], cost(70), T0);
    let t = s.prepare_limit_delete("b", T0 + 1).unwrap();
    s.apply_limit(t, T0 + 1);
    assert!(s.limit("b").is_none());
    assert!(s.check(&[], Amounts::default(), T0 + 2).limits.is_empty());
    assert!(matches!(
        s.prepare_limit_delete("b", T0 + 3),
        Err(StateError::UnknownLimit(_))
    ));
    put(&mut s, "b", input(&[], Metric::Cost, 100, "1d"), T0 + 4);
    assert_eq!(s.limit_view("b", T0 + 5).unwrap().status.used, 0);
    let limits = s.gc_tombstones(T0 + 8 * 86_400_000).limits;
    assert!(limits.is_empty(), "live records are never collected");
}

/// I4/I5 for derived limits: two nodes that create the same derived limit on their own,
/// at different times, write one generation, so usage counted on both sides lands in one
/// epoch and adds up once merged; after a delete, both re-create it past the tombstone.
#[test]
fn pinned_puts_on_two_nodes_share_one_generation() {
    let (mut a, mut b) = (State::new("a"), State::new("b"));
    let i = input(&[("rls_template", "t")], Metric::Requests, 10, "1m");
    let pinned = Hlc(77 << 16);
    let ra = a
        .prepare_limit_put_pinned("x", i.clone(), T0, pinned, T0 + 5)
        .unwrap();
    let rb = b
        .prepare_limit_put_pinned("x", i.clone(), T0, pinned, T0 + 900)
        .unwrap();
    assert_eq!(ra.generation(), pinned);
    assert_eq!(rb.generation(), pinned);
    assert_ne!(ra.version, rb.version);
    for s in [&mut a, &mut b] {
        s.apply_limit(ra.clone(), T0 + 1000);
        s.apply_limit(rb.clone(), T0 + 1000);
    }
    assert_eq!(a.epoch_of("x", T0 + 1000), b.epoch_of("x", T0 + 1000));
    let one = Amounts {
        requests: 1,
        ..Amounts::default()
    };
    record(&mut a, &[("rls_template", "t")], one, T0 + 1000);
    record(&mut b, &[("rls_template", "t")], one, T0 + 1000);
    let e = a.epoch_of("x", T0 + 1000).unwrap();
    let (sa, sb) = (a.slot("x", e, "a"), b.slot("x", e, "b"));
    let ai = b.origin_idx("a");
    b.merge_slot("x", e, ai, sa);
    let bi = a.origin_idx("b");
    a.merge_slot("x", e, bi, sb);
    let used = |s: &State| s.statuses(&[("rls_template", "t")], T0 + 1000)[0].used;
    assert_eq!(used(&a), 2);
    assert_eq!(used(&b), 2);
    // Same counting again keeps the generation; a tombstone is passed by one step.
    let again = a
        .prepare_limit_put_pinned("x", i.clone(), T0 + 50, pinned, T0 + 2000)
        .unwrap();
    assert_eq!(again.generation(), pinned);
    let tomb = a.prepare_limit_delete("x", T0 + 3000).unwrap();
    let t = tomb.generation();
    a.apply_limit(tomb.clone(), T0 + 3000);
    b.apply_limit(tomb, T0 + 3000);
    let (ra, rb) = (
        a.prepare_limit_put_pinned("x", i.clone(), T0, pinned, T0 + 4000)
            .unwrap(),
        b.prepare_limit_put_pinned("x", i, T0, pinned, T0 + 4500)
            .unwrap(),
    );
    assert_eq!(ra.generation(), Hlc(t.0 + 1));
    assert_eq!(rb.generation(), Hlc(t.0 + 1));
    assert!(a.apply_limit(ra, T0 + 5000));
    assert!(a.limit("x").is_some());
}

#[test]
fn many_dimensions_fall_back_to_subset_enumeration() {
    let mut s = State::new("a");
    for i in 0..70 {
        let d = format!("d{i}");
        put(
            &mut s,
            &format!("l{i}"),
            input(&[(&d, "x")], Metric::Requests, 1, "1d"),
            T0,
        );
    }
    let attrs = [("d1", "x"), ("d65", "x"), ("d69", "x"), ("d3", "y")];
    let d = s.check(&attrs, Amounts::default(), T0);
    assert_eq!(ids(&s, &d), ["l1", "l65", "l69"]);
}

// ----- property tests -----------------------------------------------------------------

/// One replica's event: record on node `node` for limit `limit` at `dt` ms after T0.
#[derive(Debug, Clone)]
enum Op {
    Record {
        node: usize,
        limit: usize,
        amount: u64,
        dt: i64,
    },
    Sync {
        from: usize,
        to: usize,
        drop_mask: u8,
    },
}

fn arb_ops(nodes: usize) -> impl Strategy<Value = Vec<Op>> {
    let op = prop_oneof![
        (0..nodes, 0..3usize, 1u64..1000, 0i64..5_000).prop_map(|(node, limit, amount, dt)| {
            Op::Record {
                node,
                limit,
                amount,
                dt,
            }
        }),
        (0..nodes, 0..nodes, any::<u8>()).prop_map(|(from, to, drop_mask)| Op::Sync {
            from,
            to,
            drop_mask
        }),
    ];
    proptest::collection::vec(op, 0..80)
}

/// Full state of a replica as a message: every counter slot.
fn snapshot(s: &State) -> Vec<(String, Epoch, String, u64)> {
    let mut v = Vec::new();
    for (id, e, c) in s.counters() {
        for &(o, val) in c.slots() {
            v.push((id.to_string(), e, s.origin_name(o).to_string(), val));
        }
    }
    v
}

fn deliver(to: &mut State, msg: &[(String, Epoch, String, u64)], drop_mask: u8) {
    for (i, (id, e, origin, v)) in msg.iter().enumerate() {
        if drop_mask & (1 << (i % 8)) != 0 {
            continue;
        }
        let o = to.origin_idx(origin);
        to.merge_slot(id, *e, o, *v);
        // Duplicate delivery is harmless.
        to.merge_slot(id, *e, o, *v);
    }
}

fn fleet(n: usize) -> Vec<State> {
    let limits = ["1s", "1m", "never"];
    (0..n)
        .map(|i| {
            let mut s = State::new(&format!("node-{i}"));
            for (j, p) in limits.iter().enumerate() {
                let rec = LimitRecord {
                    id: format!("l{j}"),
                    version: Version {
                        hlc: Hlc::from_wall_ms(T0),
                        node: "node-0".into(),
                    },
                    spec: Some(LimitSpec {
                        input: input(&[("k", &j.to_string())], Metric::Tokens, 1 << 40, p),
                        anchor_ms: T0,
                        spec_gen: Hlc::from_wall_ms(T0),
                    }),
                };
                s.apply_limit(rec, T0);
            }
            s
        })
        .collect()
}

proptest! {
    /// I4: replicas that increment and exchange state in any order, with drops and
    /// duplicates, end with identical usage once everything is exchanged.
    #[test]
    fn replicas_converge(ops in arb_ops(4)) {
        let mut nodes = fleet(4);
        let mut truth: HashMap<(String, Epoch), u64> = HashMap::new();
        for op in ops {
            match op {
                Op::Record { node, limit, amount, dt } => {
                    let key = limit.to_string();
                    let attrs = [("k", key.as_str())];
                    let incs = record(&mut nodes[node], &attrs, Amounts { tokens: amount, ..Amounts::default() }, T0 + dt);
                    prop_assert_eq!(incs.len(), 1);
                    *truth.entry((format!("l{limit}"), incs[0].epoch)).or_default() += amount;
                }
                Op::Sync { from, to, drop_mask } => {
                    let msg = snapshot(&nodes[from]);
                    deliver(&mut nodes[to], &msg, drop_mask);
                }
            }
        }
        for from in 0..4 {
            let msg = snapshot(&nodes[from]);
            for to in nodes.iter_mut() {
                deliver(to, &msg, 0);
            }
        }
        for n in &nodes {
            let mut totals: HashMap<(String, Epoch), u64> = HashMap::new();
            for (id, e, c) in n.counters() {
                if c.total() > 0 {
                    totals.insert((id.to_string(), e), c.total());
                }
            }
            prop_assert_eq!(&totals, &truth);
        }
    }

    /// I5: the epoch of an event depends only on the limit, its reset register and the
    /// event's instant, not on the node, its clock or the order it learned things in.
    #[test]
    fn epochs_are_deterministic(dt in -86_400_000i64..86_400_000, skew in -5_000i64..5_000, reset_dt in 0i64..60_000) {
        let mut nodes = fleet(3);
        let reg = nodes[0].prepare_reset("l1", 0, T0 + reset_dt).unwrap();
        nodes[0].apply_reset("l1", reg.clone());
        nodes[2].tick(T0 + skew); // a node with a skewed clock ticks differently
        nodes[2].apply_reset("l1", reg.clone());
        nodes[1].apply_reset("l1", reg);
        for id in ["l0", "l1", "l2"] {
            let e0 = nodes[0].epoch_of(id, T0 + dt);
            prop_assert_eq!(e0, nodes[1].epoch_of(id, T0 + dt));
            prop_assert_eq!(e0, nodes[2].epoch_of(id, T0 + dt));
        }
    }

    /// LWW config converges to the same winner whatever the merge order.
    #[test]
    fn lww_config_converges(writes in proptest::collection::vec((0u64..5, 0usize..3, 1u64..100, any::<bool>()), 1..12), order in Just(()).prop_perturb(|_, mut rng| {
        let mut v: Vec<usize> = (0..12).collect();
        for i in (1..v.len()).rev() { let j = (rng.next_u32() as usize) % (i + 1); v.swap(i, j); }
        v
    })) {
        // A version is unique to one write (the HLC is strictly monotone per node).
        let mut seen = std::collections::HashSet::new();
        let writes: Vec<_> = writes.into_iter().filter(|&(hlc, node, _, _)| seen.insert((hlc, node))).collect();
        let recs: Vec<LimitRecord> = writes.iter().map(|&(hlc, node, max, delete)| LimitRecord {
            id: "x".into(),
            version: Version { hlc: Hlc(hlc), node: format!("n{node}") },
            // Edits that keep the counting inherit an older generation.
            spec: (!delete).then(|| LimitSpec { input: input(&[], Metric::Requests, max, "1d"), anchor_ms: T0, spec_gen: Hlc(hlc.saturating_sub(max % 3)) }),
        }).collect();
        let mut a = State::new("a");
        for r in &recs { a.apply_limit(r.clone(), T0); }
        let mut b = State::new("b");
        for &i in order.iter().filter(|&&i| i < recs.len()) { b.apply_limit(recs[i].clone(), T0); }
        for r in recs.iter().rev() { b.apply_limit(r.clone(), T0); }
        let wa: Vec<_> = a.limit_records().cloned().collect();
        let wb: Vec<_> = b.limit_records().cloned().collect();
        prop_assert_eq!(&wa, &wb);
        prop_assert_eq!(a.limit("x"), b.limit("x"));
        let best = recs.iter().max_by(|x, y| (x.generation(), &x.version).cmp(&(y.generation(), &y.version))).unwrap();
        prop_assert_eq!(&wa[0], best);
    }
}

#[test]
fn period_parse_round_trip_through_state() {
    let p: Period = "3M".parse().unwrap();
    assert_eq!(p.to_string(), "3M");
}

/// History retention: an epoch goes once it ended `keep` before now and is not open; one
/// that no longer belongs to what the limit counts is dated by its start. The oracle is
/// plain arithmetic on day boundaries (T0 is 06:00 UTC).
#[test]
fn closed_epochs_expire_after_the_retention() {
    let day = 86_400_000;
    let keep = 35 * day;
    let mut s = State::new("a");
    let mut daily = input(&[], Metric::Requests, 100, "1d");
    daily.calendar_aligned = true;
    put(&mut s, "d", daily, T0);
    let midnight = T0 - 6 * 3_600_000;
    let generation = s.epoch_of("d", T0).unwrap().reset;
    let day_k = |k: i64| Epoch {
        period: midnight + k * day,
        reset: generation,
    };
    assert_eq!(s.epoch_of("d", T0), Some(day_k(0)));
    let now = T0 + 40 * day;
    // The cutoff is T0 + 5 d; day 4 ends at 18:00 before it, day 5 after it.
    assert!(s.history_expired("d", day_k(0), now, keep));
    assert!(s.history_expired("d", day_k(4), now, keep));
    assert!(!s.history_expired("d", day_k(5), now, keep));
    // Open epochs never go, whatever the retention.
    assert!(!s.history_expired("d", day_k(40), now, 0));
    assert!(
        !s.history_expired("d", day_k(41), now, 0),
        "tomorrow is open"
    );
    assert!(s.history_expired("d", day_k(39), now, 0));
    let cal = s.calendar("d", now).unwrap();
    assert_eq!(cal.current, day_k(40));
    assert_eq!(
        cal.window_of(day_k(3)),
        Some(Window {
            index: midnight + 3 * day,
            start_ms: midnight + 3 * day,
            end_ms: midnight + 4 * day,
        })
    );
    assert_eq!(
        cal.window_of(Epoch {
            period: midnight + 1,
            reset: generation
        }),
        None
    );
    // After a period change the daily epochs are dated by their start: day 5 started at
    // midnight, 18 h before the cutoff.
    let mut weekly = input(&[], Metric::Requests, 100, "1w");
    weekly.calendar_aligned = true;
    put(&mut s, "d", weekly, now);
    assert_eq!(s.calendar("d", now).unwrap().window_of(day_k(5)), None);
    assert!(s.history_expired("d", day_k(5), now, keep));
    assert!(!s.history_expired("d", day_k(6), now, keep));
    // So are a deleted limit's.
    let t = s.prepare_limit_delete("d", now).unwrap();
    s.apply_limit(t, now);
    assert!(s.calendar("d", now).is_none());
    assert!(s.history_expired("d", day_k(5), now, keep));
    assert!(!s.history_expired("d", day_k(6), now, keep));
    assert!(!s.history_expired("unknown", day_k(6), now, keep));
}

// ----- hard limits -------------------------------------------------------------------

fn hard(max: u64, members: &[(&str, u32)]) -> LimitInput {
    let mut i = input(&[], Metric::Tokens, max, "1d");
    i.mode = Mode::Hard;
    i.members = members
        .iter()
        .map(|&(node, weight)| Member {
            node: node.into(),
            weight,
        })
        .collect();
    i
}

fn tokens(n: u64) -> Amounts {
    Amounts {
        cost: Micros(0),
        tokens: n,
        requests: 1,
    }
}

struct Held(u64, bool);

impl Holds for Held {
    fn held(&self, _: LimitIdx, _: Epoch) -> u64 {
        self.0
    }
    fn fenced(&self) -> bool {
        self.1
    }
}

fn decide(s: &State, want: u64, holds: &dyn Holds) -> LimitStatus {
    let mut d = Decision::default();
    s.check_held(&[], tokens(want), T0, holds, &mut d);
    assert_eq!(d.limits.len(), 1);
    d.limits[0]
}

/// Three nodes share 100 by weights 1:1:2 (25/25/50); each spends only its share; a
/// grant moves rights; every replica computes the same table (independent arithmetic).
#[test]
fn hard_limits_spend_only_held_rights() {
    let members = [("a", 1), ("b", 1), ("c", 2)];
    let mut a = State::new("a");
    let rec = a.prepare_limit_put("h", hard(100, &members), T0).unwrap();
    let mut b = State::new("b");
    assert!(a.apply_limit(rec.clone(), T0));
    assert!(b.apply_limit(rec, T0));
    let l = a.limit_idx("h").unwrap();
    let e = a.limit_view("h", T0).unwrap().status.epoch;

    let st = decide(&a, 25, &NoHolds);
    assert_eq!(
        (st.denied, st.free, st.reason, st.mode),
        (false, 25, None, Mode::Hard)
    );
    let st = decide(&a, 26, &NoHolds);
    assert_eq!((st.denied, st.reason), (true, Some(DenyReason::Rights)));
    // What is held for reservations is not free.
    let st = decide(&a, 20, &Held(10, false));
    assert_eq!(
        (st.denied, st.free, st.reason),
        (true, 15, Some(DenyReason::Rights))
    );
    // A fenced node spends nothing.
    assert_eq!(
        decide(&a, 1, &Held(0, true)).reason,
        Some(DenyReason::Rights)
    );

    // a spends 20 (its slot), then c grants a 30 (c's row); b learns both by merge.
    record(&mut a, &[], tokens(20), T0);
    let ai = a.me();
    let c_idx = a.origin_idx("c");
    assert!(a.merge_grant("h", e, "c", "a", 30));
    assert!(!a.merge_grant("h", e, "c", "a", 29), "grants only grow");
    let bo = b.origin_idx("a");
    b.merge_slot("h", e, bo, 20);
    assert!(b.merge_grant("h", e, "c", "a", 30));
    let _ = (ai, c_idx);
    assert_eq!(a.hard_free(l, e, 0), Some(25 + 30 - 20));
    let t = |s: &State| -> Vec<(String, Rights, i128)> {
        s.rights_table(s.limit_idx("h").unwrap(), e)
            .into_iter()
            .map(|(n, r, f)| (n.to_string(), r, f))
            .collect()
    };
    let want = vec![
        (
            "a".to_string(),
            Rights {
                alloc: 25,
                received: 30,
                given: 0,
                used: 20,
            },
            35,
        ),
        (
            "b".to_string(),
            Rights {
                alloc: 25,
                received: 0,
                given: 0,
                used: 0,
            },
            25,
        ),
        (
            "c".to_string(),
            Rights {
                alloc: 50,
                received: 0,
                given: 30,
                used: 0,
            },
            20,
        ),
    ];
    assert_eq!(t(&a), want);
    assert_eq!(t(&b), want);
    // Σ free + Σ used = max: nothing created, nothing lost.
    let total: i128 = want.iter().map(|(_, r, f)| f + i128::from(r.used)).sum();
    assert_eq!(total, 100);

    // a's own grant: checked against its free rights after what it holds.
    assert_eq!(a.prepare_grant(l, e, "b", 35, 0), Ok(35));
    assert!(matches!(
        a.prepare_grant(l, e, "b", 35, 1),
        Err(GrantError::TooFew {
            free: 34,
            amount: 35
        })
    ));
    assert_eq!(a.prepare_grant(l, e, "a", 1, 0), Err(GrantError::ToSelf));

    // The budget is spent: reason budget, whatever the rights.
    let bo = a.origin_idx("b");
    a.merge_slot("h", e, bo, 80);
    let st = decide(&a, 1, &NoHolds);
    assert_eq!((st.denied, st.reason), (true, Some(DenyReason::Budget)));
}

/// A decommissioned node's remaining rights pass to its successor (through a chain), and
/// it may spend nothing itself.
#[test]
fn decommission_passes_rights_to_the_successor() {
    let mut a = State::new("a");
    put(&mut a, "h", hard(90, &[("a", 1), ("b", 1), ("c", 1)]), T0);
    let l = a.limit_idx("h").unwrap();
    let e = a.limit_view("h", T0).unwrap().status.epoch;
    let bo = a.origin_idx("b");
    a.merge_slot("h", e, bo, 10);
    let rec = a.prepare_decommission("b", "c", T0).unwrap();
    assert!(a.apply_decommission(rec.clone()));
    assert!(!a.apply_decommission(rec));
    assert_eq!(a.hard_free(l, e, 0), Some(30), "a keeps its own");
    let table: Vec<(String, i128)> = a
        .rights_table(l, e)
        .into_iter()
        .map(|(n, _, f)| (n.to_string(), f))
        .collect();
    assert_eq!(
        table,
        vec![("a".into(), 30), ("b".into(), 0), ("c".into(), 30 + 20)]
    );
    // c is decommissioned in favour of a: b's rights follow the chain to a.
    let rec = a.prepare_decommission("c", "a", T0 + 1).unwrap();
    a.apply_decommission(rec);
    assert_eq!(a.successor_of("b"), "a");
    assert_eq!(a.hard_free(l, e, 0), Some(30 + 30 + 20));
    assert!(a.prepare_decommission("a", "a", T0 + 2).is_err());
    assert!(
        a.prepare_decommission("a", "b", T0 + 2).is_err(),
        "b is decommissioned"
    );
    // Decommissioned itself, a node spends nothing.
    let mut b = State::new("b");
    put(&mut b, "h", hard(90, &[("a", 1), ("b", 1), ("c", 1)]), T0);
    let rec = b.prepare_decommission("b", "a", T0).unwrap();
    b.apply_decommission(rec);
    assert_eq!(decide(&b, 1, &NoHolds).reason, Some(DenyReason::Rights));
}

/// Soft limits answer exactly as before: no rights, no reason, free 0.
#[test]
fn soft_limits_ignore_holds() {
    let mut s = State::new("a");
    put(&mut s, "s", input(&[], Metric::Tokens, 10, "1d"), T0);
    let st = decide(&s, 10, &Held(1000, true));
    assert_eq!(
        (st.denied, st.free, st.reason, st.mode),
        (false, 0, None, Mode::Soft)
    );
    assert!(
        s.rights_table(s.limit_idx("s").unwrap(), st.epoch)
            .is_empty()
    );
}

#[test]
fn access_rules_deny_checks_and_say_which() {
    let mut s = State::new("a");
    put(
        &mut s,
        "team",
        input(&[("team", "eng")], Metric::Requests, 100, "1d"),
        T0,
    );
    let scope = |k: &str, v: &str| Scope::from([(k.to_string(), v.to_string())]);
    let allow = |vals: &[&str]| AccessRules {
        allow: [(
            "model".to_string(),
            vals.iter().map(|v| v.to_string()).collect(),
        )]
        .into(),
        ..AccessRules::default()
    };
    let r = s
        .prepare_entity_put(
            "virtual_key",
            "vk-1",
            scope("team", "eng"),
            allow(&["gpt-4o-mini", "gpt-4o", "gpt-4o"]),
            T0,
        )
        .unwrap();
    assert_eq!(
        r.rules.allow["model"],
        ["gpt-4o", "gpt-4o-mini"],
        "sorted, distinct"
    );
    s.apply_entity(r);
    let ok = s.check(
        &[("virtual_key", "vk-1"), ("model", "gpt-4o")],
        Amounts::default(),
        T0,
    );
    assert!(ok.allowed);
    assert_eq!(ok.access, None);
    let d = s.check(
        &[("virtual_key", "vk-1"), ("model", "gpt-5")],
        Amounts::default(),
        T0,
    );
    assert!(!d.allowed);
    assert_eq!(ids(&s, &d), ["team"], "the limits are still listed");
    assert!(d.limits.iter().all(|l| !l.denied), "no limit denies");
    assert_eq!(
        d.access,
        Some(AccessDenial {
            dimension: "virtual_key".into(),
            value: "vk-1".into(),
            rule: BrokenRule::Allow {
                attribute: "model".into(),
                given: Some("gpt-5".into())
            },
        })
    );
    let d = s.check(&[("virtual_key", "vk-1")], Amounts::default(), T0);
    assert_eq!(
        d.access.unwrap().rule,
        BrokenRule::Allow {
            attribute: "model".into(),
            given: None
        }
    );
    // Rules of a parent apply to its children: an inactive team denies its keys.
    let r = s
        .prepare_entity_put(
            "team",
            "eng",
            Scope::new(),
            AccessRules {
                active: false,
                ..AccessRules::default()
            },
            T0,
        )
        .unwrap();
    s.apply_entity(r);
    let d = s.check(
        &[("virtual_key", "vk-1"), ("model", "gpt-4o")],
        Amounts::default(),
        T0,
    );
    assert_eq!(
        d.access,
        Some(AccessDenial {
            dimension: "team".into(),
            value: "eng".into(),
            rule: BrokenRule::Inactive
        })
    );
    // Expiry is an instant: allowed before it, denied from it on.
    let r = s
        .prepare_entity_put(
            "team",
            "eng",
            Scope::new(),
            AccessRules {
                expires_at_ms: Some(T0 + 1000),
                ..AccessRules::default()
            },
            T0,
        )
        .unwrap();
    s.apply_entity(r);
    let at = |s: &State, t| {
        s.check(
            &[("virtual_key", "vk-1"), ("model", "gpt-4o")],
            Amounts::default(),
            t,
        )
    };
    assert!(at(&s, T0 + 999).allowed);
    assert_eq!(
        at(&s, T0 + 1000).access.unwrap().rule,
        BrokenRule::Expired {
            expires_at_ms: T0 + 1000
        }
    );
    // A delete removes the rules with the entity.
    let r = s.prepare_entity_delete("team", "eng", T0 + 1).unwrap();
    s.apply_entity(r);
    assert!(at(&s, T0 + 5000).allowed);
    // Usage is a fact: recording ignores rules.
    let incs = record(
        &mut s,
        &[("virtual_key", "vk-1"), ("model", "gpt-5")],
        cost(0),
        T0,
    );
    assert_eq!(incs.len(), 1);
    // Bad rules are refused.
    assert!(matches!(
        s.prepare_entity_put("team", "x", Scope::new(), allow(&[]), T0),
        Err(ConfigError::Rules(_))
    ));
    let bad = AccessRules {
        allow: [("Model".to_string(), vec!["x".to_string()])].into(),
        ..AccessRules::default()
    };
    assert!(
        s.prepare_entity_put("team", "x", Scope::new(), bad, T0)
            .is_err()
    );
}

#[test]
fn prices_are_last_writer_wins_and_tombstones_go() {
    let mut s = State::new("a");
    let p = Price {
        input: 1,
        output: 2,
        cache_read: None,
        cache_creation: None,
        reasoning: None,
    };
    let r1 = s.prepare_price_put("openai/gpt-4o", p, T0).unwrap();
    let r2 = s
        .prepare_price_put("openai/gpt-4o", Price { input: 3, ..p }, T0 + 1)
        .unwrap();
    assert!(s.apply_price(r2.clone()));
    assert!(!s.apply_price(r1), "an older write loses");
    assert_eq!(s.price("openai/gpt-4o").unwrap().input, 3);
    assert!(matches!(
        s.prepare_price_delete("nope", T0),
        Err(StateError::UnknownPrice(_))
    ));
    let del = s.prepare_price_delete("openai/gpt-4o", T0 + 2).unwrap();
    assert!(s.apply_price(del));
    assert_eq!(s.price("openai/gpt-4o"), None);
    assert!(!s.apply_price(r2), "the delete wins over the older put");
    assert!(
        s.prepare_price_put(
            "m",
            Price {
                input: crate::prices::PRICE_MAX_FEMTO + 1,
                ..p
            },
            T0
        )
        .is_err()
    );
    assert!(s.prepare_price_put("", p, T0).is_err());
    let gone = s.gc_tombstones(T0 + 2 + TOMBSTONE_RETENTION_MS + 1);
    assert_eq!(gone.prices, ["openai/gpt-4o"]);
    assert!(s.price_record("openai/gpt-4o").is_none());
}

#[test]
fn records_too_large_to_gossip_are_refused() {
    let mut s = State::new("a");
    let many: Vec<String> = (0..64)
        .map(|i| format!("{i:02}{}", "m".repeat(100)))
        .collect();
    let rules = AccessRules {
        allow: [("model".to_string(), many)].into(),
        ..AccessRules::default()
    };
    let err = s
        .prepare_entity_put("virtual_key", "vk-1", Scope::new(), rules, T0)
        .unwrap_err();
    assert!(
        matches!(err, ConfigError::RecordTooLarge { what: "entity", .. }),
        "{err}"
    );
    // 64 members with 128-byte ids do not fit either.
    let mut i = input(&[], Metric::Tokens, 100, "1d");
    i.mode = Mode::Hard;
    i.members = (0..64)
        .map(|n| Member {
            node: format!("{n:03}{}", "n".repeat(125)),
            weight: 1,
        })
        .collect();
    assert!(matches!(
        s.prepare_limit_put("h", i, T0),
        Err(ConfigError::RecordTooLarge { what: "limit", .. })
    ));
}
