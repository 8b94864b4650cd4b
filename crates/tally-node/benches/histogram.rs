//! What a latency observation costs (docs/METRICS.md): `Histogram::observe` on one
//! thread, and on two threads at once (as tokio's two workers answering checks do), next
//! to an `Instant::now()` pair that a timed request also pays.
//! Run: `cargo bench -p tally-node --bench histogram`.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use tally_node::metrics::{CHECK_BUCKETS_NS, Histogram};

fn bench(c: &mut Criterion) {
    let h = Arc::new(Histogram::new(CHECK_BUCKETS_NS));
    c.bench_function("observe (1 thread)", |b| {
        let d = Duration::from_micros(180);
        b.iter(|| h.observe(black_box(d)))
    });
    c.bench_function("Instant::now + elapsed", |b| {
        b.iter(|| black_box(Instant::now()).elapsed())
    });
    // A second thread observing into the same histogram all the while.
    let stop = Arc::new(AtomicBool::new(false));
    let other = {
        let (h, stop) = (h.clone(), stop.clone());
        std::thread::spawn(move || {
            let d = Duration::from_micros(90);
            while !stop.load(Ordering::Relaxed) {
                h.observe(black_box(d));
            }
        })
    };
    c.bench_function("observe (2 threads)", |b| {
        let d = Duration::from_micros(180);
        b.iter(|| h.observe(black_box(d)))
    });
    stop.store(true, Ordering::Relaxed);
    other.join().unwrap();
}

criterion_group!(benches, bench);
criterion_main!(benches);
