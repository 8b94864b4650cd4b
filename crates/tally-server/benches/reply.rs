//! What the hand-written writer of check replies (`tally_server::json`) buys over the
//! typed serde serialisation of the same reply (`tally_api::CheckReply`): both build the
//! bytes of a check reply listing `n` applicable limits, from the node's `LimitReport`s.
//!
//! `cargo bench -p tally-server --bench reply`

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use tally_core::Metric;
use tally_node::LimitReport;
use tally_server::http::{check_reply, check_reply_json};

fn reports(n: usize) -> Vec<LimitReport> {
    (0..n)
        .map(|i| LimitReport {
            id: format!("load-team-{i}"),
            metric: if i % 3 == 2 {
                Metric::Tokens
            } else {
                Metric::Cost
            },
            used: 1_234_567 + i as u64,
            max: 100_000_000_000_000,
            remaining: 100_000_000_000_000 - 1_234_567 - i as u64,
            period_start_ms: 1_764_547_200_000,
            resets_at_ms: Some(1_767_225_600_000),
            denied: false,
            mode: tally_core::Mode::Soft,
            free: 0,
            reason: None,
            retry_after_ms: None,
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("check_reply");
    for n in [1usize, 5, 20] {
        let r = reports(n);
        g.bench_with_input(BenchmarkId::new("writer", n), &r, |b, r| {
            b.iter(|| {
                check_reply_json(true, false, black_box(r), None, &Default::default()).into_bytes()
            })
        });
        g.bench_with_input(BenchmarkId::new("serde_typed", n), &r, |b, r| {
            b.iter(|| {
                serde_json::to_vec(&check_reply(
                    true,
                    false,
                    black_box(r),
                    None,
                    &Default::default(),
                ))
                .unwrap()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
