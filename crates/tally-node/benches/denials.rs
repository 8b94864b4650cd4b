//! What keeping recent denials costs a check (issue 16): `Node::check` allowed and
//! denied by one of its 5 applicable limits (the denied one also writes the ring), and
//! `DenialRing::record` alone, in steady state (the ring full, its buffers reused).
//! Run: `cargo bench -p tally-node --bench denials`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use tally_core::{Amounts, LimitInput, Metric, Micros};
use tally_node::denials::{DENIALS_MAX, DenialRing};
use tally_node::{Node, NodeConfig};

const ATTRS: [(&str, &str); 5] = [
    ("virtual_key", "vk-0"),
    ("team", "team-0"),
    ("customer", "cust-0"),
    ("provider", "openai"),
    ("model", "gpt-4o"),
];

fn limit(scope: &[(&str, &str)], max: u64) -> LimitInput {
    LimitInput {
        scope: scope
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        metric: Metric::Cost,
        max,
        period: "1M".parse().unwrap(),
        calendar_aligned: true,
        timezone: "UTC".into(),
        mode: Default::default(),
        members: Vec::new(),
    }
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let node = Node::open(NodeConfig::new(dir.path())).unwrap();
    rt.block_on(async {
        for (i, (k, v)) in ATTRS.iter().enumerate().take(3) {
            node.put_limit(&format!("l{i}"), limit(&[(k, v)], 1_000_000_000_000_000))
                .await
                .unwrap();
        }
        node.put_limit("pm", limit(&ATTRS[3..], 1_000_000_000_000_000))
            .await
            .unwrap();
        // Denies every check that asks for more than 1 USD.
        node.put_limit("global", limit(&[], 1_000_000))
            .await
            .unwrap();
        for i in 0..1000 {
            node.put_limit(&format!("other-{i}"), limit(&[("virtual_key", "x")], 1))
                .await
                .unwrap();
        }
    });
    let ask = |usd: u64| Amounts {
        cost: Micros(usd * 1_000_000),
        tokens: 0,
        requests: 1,
    };
    assert!(node.check(&ATTRS, ask(0)).allowed);
    assert!(!node.check(&ATTRS, ask(2)).allowed);

    let mut g = c.benchmark_group("node_check");
    g.bench_function("allowed", |b| {
        b.iter(|| black_box(node.check(black_box(&ATTRS), ask(0))))
    });
    g.bench_function("denied", |b| {
        b.iter(|| black_box(node.check(black_box(&ATTRS), ask(2))))
    });
    g.finish();

    let ring = DenialRing::default();
    for _ in 0..DENIALS_MAX {
        ring.record(0, &ATTRS, ["global"].into_iter(), ask(2));
    }
    c.bench_function("denial_ring_record", |b| {
        b.iter(|| {
            ring.record(
                black_box(1),
                black_box(&ATTRS),
                ["global"].into_iter(),
                ask(2),
            )
        })
    });
    rt.block_on(node.shutdown());
}

criterion_group!(benches, bench);
criterion_main!(benches);
