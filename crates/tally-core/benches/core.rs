//! `check` and `record` on the in-memory state: a request with 5 attributes against
//! 100 000 limits of which 5 apply (issue 2's goal: ≤ 250 ns per check, ≤ 300 ns per
//! record). Run: `cargo bench -p tally-core --bench core`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use tally_core::{Amounts, Decision, Increment, LimitInput, Metric, Micros, State};

const NOW: i64 = 1_795_327_200_000;

fn state_with_limits(total: usize) -> State {
    let mut s = State::new("bench-node");
    let put = |s: &mut State, id: &str, scope: &[(&str, &str)], metric: Metric| {
        let input = LimitInput {
            scope: scope
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            metric,
            max: 1_000_000_000_000_000,
            period: "1M".parse().unwrap(),
            calendar_aligned: true,
            timezone: "UTC".into(),
            mode: Default::default(),
            members: Vec::new(),
        };
        let rec = s.prepare_limit_put(id, input, NOW).unwrap();
        s.apply_limit(rec, NOW);
    };
    put(&mut s, "vk", &[("virtual_key", "vk-0")], Metric::Cost);
    put(&mut s, "team", &[("team", "team-0")], Metric::Cost);
    put(&mut s, "cust", &[("customer", "cust-0")], Metric::Cost);
    put(
        &mut s,
        "prov-model",
        &[("provider", "openai"), ("model", "gpt-4o")],
        Metric::Tokens,
    );
    put(&mut s, "global", &[], Metric::Requests);
    for i in 5..total {
        let key = format!("vk-other-{i}");
        put(
            &mut s,
            &format!("other-{i}"),
            &[("virtual_key", &key)],
            Metric::Cost,
        );
    }
    s.tick(NOW);
    s
}

const ATTRS: [(&str, &str); 5] = [
    ("virtual_key", "vk-0"),
    ("team", "team-0"),
    ("customer", "cust-0"),
    ("provider", "openai"),
    ("model", "gpt-4o"),
];

fn benches(c: &mut Criterion) {
    let mut s = state_with_limits(100_000);
    let amounts = Amounts {
        cost: Micros(120),
        tokens: 1500,
        requests: 1,
    };
    assert_eq!(s.check(&ATTRS, amounts, NOW).limits.len(), 5);
    let mut decision = Decision::default();
    c.bench_function("check/5-attrs/100k-limits/5-apply", |b| {
        b.iter(|| {
            s.check_into(black_box(&ATTRS), amounts, NOW, &mut decision);
            black_box(&decision);
        })
    });
    let mut incs: Vec<Increment> = Vec::with_capacity(8);
    c.bench_function("record/5-attrs/100k-limits/5-apply", |b| {
        b.iter(|| {
            incs.clear();
            s.plan_record(black_box(&ATTRS), amounts, NOW, &mut incs);
            s.apply_increments(&incs);
        })
    });
    assert_eq!(incs.len(), 5);
}

criterion_group!(core, benches);
criterion_main!(core);
