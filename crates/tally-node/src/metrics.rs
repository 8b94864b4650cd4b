//! Counters the node keeps for /metrics. Plain atomics: incremented on hot paths, read
//! rarely, never locked.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Metrics {
    pub checks_total: AtomicU64,
    pub checks_denied_total: AtomicU64,
    pub records_applied_total: AtomicU64,
    pub records_duplicate_total: AtomicU64,
    pub commits_total: AtomicU64,
    pub commit_records_total: AtomicU64,
    pub commit_seconds_micros_total: AtomicU64,
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
}

impl Metrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
