//! Counters and latency histograms the node keeps for /metrics. Plain atomics:
//! incremented on hot paths, read rarely, never locked.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

#[derive(Debug)]
pub struct Metrics {
    pub checks_total: AtomicU64,
    pub checks_denied_total: AtomicU64,
    pub records_applied_total: AtomicU64,
    pub records_duplicate_total: AtomicU64,
    pub commit_records_total: AtomicU64,
    pub commit_errors_total: AtomicU64,
    pub queue_rejected_total: AtomicU64,
    pub dedup_expired_total: AtomicU64,
    pub history_slots_dropped_total: AtomicU64,
    /// Hard limits: usage recorded beyond the rights the node held.
    pub hard_overrun_total: AtomicU64,
    /// Hard limits: rights this node granted to others.
    pub rights_granted_total: AtomicU64,
    /// Hard limits: rights this node asked others for (sum of what it asked).
    pub rights_asked_total: AtomicU64,
    pub reservations_expired_total: AtomicU64,
    /// `POST /v1/check`, from the request reaching its route to the reply (tally-server
    /// observes it; the node only holds it so every node of a process has its own).
    pub check_seconds: Histogram,
    /// `POST /v1/usage`, from the request reaching its route to the durable reply.
    pub record_seconds: Histogram,
    /// `POST /v1/usage/batch`, likewise (one observation per request).
    pub record_batch_seconds: Histogram,
    /// The writer's durable group commits of records: the transaction from the first
    /// write to the fsync returning, and memory updated (one observation per commit).
    pub commit_seconds: Histogram,
    /// Time from a peer's commit (the wall clock it stamps in its hello) to this node
    /// having merged everything the peer published before that hello, durably.
    pub gossip_lag_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            checks_total: AtomicU64::new(0),
            checks_denied_total: AtomicU64::new(0),
            records_applied_total: AtomicU64::new(0),
            records_duplicate_total: AtomicU64::new(0),
            commit_records_total: AtomicU64::new(0),
            commit_errors_total: AtomicU64::new(0),
            queue_rejected_total: AtomicU64::new(0),
            dedup_expired_total: AtomicU64::new(0),
            history_slots_dropped_total: AtomicU64::new(0),
            hard_overrun_total: AtomicU64::new(0),
            rights_granted_total: AtomicU64::new(0),
            rights_asked_total: AtomicU64::new(0),
            reservations_expired_total: AtomicU64::new(0),
            check_seconds: Histogram::new(CHECK_BUCKETS_NS),
            record_seconds: Histogram::new(RECORD_BUCKETS_NS),
            record_batch_seconds: Histogram::new(RECORD_BUCKETS_NS),
            commit_seconds: Histogram::new(COMMIT_BUCKETS_NS),
            gossip_lag_seconds: Histogram::new(GOSSIP_LAG_BUCKETS_NS),
        }
    }
}

impl Metrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

const US: u64 = 1_000;
const MS: u64 = 1_000_000;
const S: u64 = 1_000_000_000;

/// A check answers from memory in tens of microseconds; the tail is scheduling.
pub const CHECK_BUCKETS_NS: &[u64] = &[
    25 * US,
    50 * US,
    100 * US,
    250 * US,
    500 * US,
    MS,
    2_500 * US,
    5 * MS,
    10 * MS,
    25 * MS,
    100 * MS,
    S,
];
/// A durable record waits for a group commit (one fsync, 0.1–2 ms here) and at worst for
/// queue space (2 s by default, then 503).
pub const RECORD_BUCKETS_NS: &[u64] = &[
    100 * US,
    250 * US,
    500 * US,
    MS,
    2_500 * US,
    5 * MS,
    10 * MS,
    25 * MS,
    50 * MS,
    100 * MS,
    250 * MS,
    500 * MS,
    S,
    2_500 * MS,
    5 * S,
];
/// One redb transaction with its fsync.
pub const COMMIT_BUCKETS_NS: &[u64] = &[
    50 * US,
    100 * US,
    250 * US,
    500 * US,
    MS,
    2_500 * US,
    5 * MS,
    10 * MS,
    25 * MS,
    50 * MS,
    100 * MS,
    250 * MS,
    S,
    5 * S,
];
/// Gossip rounds are 100 ms apart by default; a partition makes it minutes.
pub const GOSSIP_LAG_BUCKETS_NS: &[u64] = &[
    5 * MS,
    10 * MS,
    25 * MS,
    50 * MS,
    100 * MS,
    250 * MS,
    500 * MS,
    S,
    2_500 * MS,
    5 * S,
    10 * S,
    30 * S,
    60 * S,
    300 * S,
];

/// Most buckets a histogram has (the `+Inf` one included).
const BUCKETS_MAX: usize = 16;
/// Shards per histogram: threads observe into different cache lines, so two workers
/// answering checks do not bounce one line between cores on every observation.
const SHARDS: usize = 8;

/// One thread's share of a histogram: bucket counts (not cumulative) and the sum, on
/// their own cache lines.
#[derive(Debug)]
#[repr(align(128))]
struct Shard {
    buckets: [AtomicU64; BUCKETS_MAX],
    sum_ns: AtomicU64,
}

impl Default for Shard {
    fn default() -> Self {
        Shard {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
        }
    }
}

/// A Prometheus histogram of durations with fixed bounds. Observing is a bucket search
/// over at most 15 bounds and two relaxed `fetch_add`s on the calling thread's shard: no
/// lock, no allocation.
#[derive(Debug)]
pub struct Histogram {
    /// Upper bounds in nanoseconds, increasing; the `+Inf` bucket follows them.
    bounds_ns: &'static [u64],
    shards: Box<[Shard; SHARDS]>,
}

/// What a histogram has counted: cumulative counts per upper bound (`le`, seconds),
/// the `+Inf` count and the sum in seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
    pub sum_seconds: f64,
}

fn shard_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    INDEX.with(|i| {
        let mut v = i.get();
        if v == usize::MAX {
            v = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
            i.set(v);
        }
        v
    })
}

impl Histogram {
    /// A histogram with these upper bounds (nanoseconds, strictly increasing, at most
    /// 15 of them).
    pub fn new(bounds_ns: &'static [u64]) -> Histogram {
        assert!(
            bounds_ns.len() < BUCKETS_MAX,
            "at most {} bounds",
            BUCKETS_MAX - 1
        );
        assert!(
            bounds_ns.windows(2).all(|w| w[0] < w[1]),
            "bounds must increase"
        );
        Histogram {
            bounds_ns,
            shards: Box::new(std::array::from_fn(|_| Shard::default())),
        }
    }

    #[inline]
    pub fn observe(&self, d: Duration) {
        self.observe_ns(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    #[inline]
    pub fn observe_ns(&self, ns: u64) {
        // Prometheus buckets are `value <= le`: the first bound not below the value.
        let i = self.bounds_ns.partition_point(|&b| b < ns);
        let shard = &self.shards[shard_index()];
        shard.buckets[i].fetch_add(1, Ordering::Relaxed);
        shard.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Counts so far. Each bucket is read once, so the count always equals the `+Inf`
    /// bucket; the sum may include an observation the buckets do not yet (or the reverse).
    pub fn snapshot(&self) -> HistogramSnapshot {
        let n = self.bounds_ns.len() + 1;
        let mut counts = vec![0u64; n];
        let mut sum_ns: u64 = 0;
        for shard in self.shards.iter() {
            for (c, b) in counts.iter_mut().zip(&shard.buckets) {
                *c += b.load(Ordering::Relaxed);
            }
            sum_ns = sum_ns.wrapping_add(shard.sum_ns.load(Ordering::Relaxed));
        }
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(self.bounds_ns.len());
        for (i, &b) in self.bounds_ns.iter().enumerate() {
            cumulative += counts[i];
            buckets.push((b as f64 / 1e9, cumulative));
        }
        HistogramSnapshot {
            buckets,
            count: cumulative + counts[n - 1],
            sum_seconds: sum_ns as f64 / 1e9,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_inclusive() {
        const B: &[u64] = &[10, 20, 30];
        let h = Histogram::new(B);
        for ns in [0, 10, 11, 20, 25, 30, 31, 1_000_000_000] {
            h.observe_ns(ns);
        }
        let s = h.snapshot();
        assert_eq!(
            s.buckets,
            vec![(10e-9, 2), (20e-9, 4), (30e-9, 6)],
            "le is inclusive"
        );
        assert_eq!(s.count, 8);
        assert!(
            (s.sum_seconds - 1.000000127).abs() < 1e-12,
            "{}",
            s.sum_seconds
        );
    }

    #[test]
    fn observations_from_many_threads_all_count() {
        let h = std::sync::Arc::new(Histogram::new(CHECK_BUCKETS_NS));
        let threads: Vec<_> = (0..12)
            .map(|t| {
                let h = h.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000u64 {
                        h.observe(Duration::from_micros((i + t) % 2_000));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let s = h.snapshot();
        assert_eq!(s.count, 120_000);
        // 25 µs bound: values 0..=25 of every 2 000, per thread.
        let le_25us = s.buckets[0].1;
        let want: u64 = (0..12u64)
            .map(|t| (0..10_000u64).filter(|i| (i + t) % 2_000 <= 25).count() as u64)
            .sum();
        assert_eq!(le_25us, want);
    }

    #[test]
    fn bucket_tables_are_valid() {
        for b in [
            CHECK_BUCKETS_NS,
            RECORD_BUCKETS_NS,
            COMMIT_BUCKETS_NS,
            GOSSIP_LAG_BUCKETS_NS,
        ] {
            let _ = Histogram::new(b);
        }
    }
}
