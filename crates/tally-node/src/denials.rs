//! The most recent denied checks, for people looking at the node (the dashboard's
//! denials view, `GET /v1/denials`). Memory only: a ring of [`DENIALS_MAX`] entries,
//! forgotten on restart and never written to disk.
//!
//! Recording must cost the check path nothing measurable. An allowed check does not come
//! here at all. A denied check takes the ring's lock with `try_lock`: if a reader or
//! another denial holds it, this denial is counted in `skipped` and not kept, so a check
//! never waits. The entries are allocated once and overwritten in place, so once the ring
//! has gone round, recording copies a few short strings into buffers that already have
//! room for them and allocates nothing. Copying them is still about 500 instructions
//! (BENCHMARKS.md), so in a storm of denials (a gateway retrying a spent budget) at most
//! [`KEPT_PER_MS_MAX`] denials per millisecond are copied; the others cost two atomic
//! operations and are counted in `skipped`.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};

use tally_core::Amounts;

/// Denials kept.
pub const DENIALS_MAX: usize = 512;
/// Denying limit ids kept per denial; `denied_by_more` counts the rest.
pub const DENIED_BY_MAX: usize = 16;
/// Denials copied into the ring per millisecond at most (8 000/s): more than a person
/// reads, and the ring then still spans the last 64 ms of a storm.
pub const KEPT_PER_MS_MAX: u32 = 8;

/// One denied check, as it was asked.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Denial {
    /// 1 for the first denial the node recorded since it started, then +1 per denial kept.
    pub seq: u64,
    pub at_ms: i64,
    /// The request's attributes as sent (before expansion through parents).
    pub attributes: Vec<(String, String)>,
    /// The limits that denied it (at most [`DENIED_BY_MAX`]).
    pub denied_by: Vec<String>,
    /// Denying limits beyond the ones in `denied_by`.
    pub denied_by_more: usize,
    /// The estimate the check asked for.
    pub estimate: Amounts,
}

/// A fixed-size ring of the most recent denials.
#[derive(Debug)]
pub struct DenialRing {
    ring: Mutex<Ring>,
    /// Denials not kept because the ring was busy or the millisecond's quota was spent.
    skipped: AtomicU64,
    /// The millisecond `kept_in_ms` counts for. Both are updated without a lock, so two
    /// threads may briefly disagree: the quota is approximate, never the ring's contents.
    window_ms: AtomicI64,
    kept_in_ms: AtomicU32,
}

#[derive(Debug)]
struct Ring {
    /// Grows to [`DENIALS_MAX`] entries, then is overwritten oldest first.
    entries: Vec<Denial>,
    /// Where the next denial goes once the ring is full.
    next: usize,
    seq: u64,
}

impl Default for DenialRing {
    fn default() -> Self {
        DenialRing {
            ring: Mutex::new(Ring {
                entries: Vec::with_capacity(DENIALS_MAX),
                next: 0,
                seq: 0,
            }),
            skipped: AtomicU64::new(0),
            window_ms: AtomicI64::new(i64::MIN),
            kept_in_ms: AtomicU32::new(0),
        }
    }
}

/// Overwrites `dst` with `src`, reusing the strings `dst` already holds.
fn refill<'a>(dst: &mut Vec<String>, src: impl Iterator<Item = &'a str>) {
    let mut n = 0;
    for s in src {
        if let Some(d) = dst.get_mut(n) {
            d.clear();
            d.push_str(s);
        } else {
            dst.push(s.to_string());
        }
        n += 1;
    }
    dst.truncate(n);
}

fn refill_pairs<'a>(dst: &mut Vec<(String, String)>, src: &[(&'a str, &'a str)]) {
    for (i, (k, v)) in src.iter().enumerate() {
        if let Some((dk, dv)) = dst.get_mut(i) {
            dk.clear();
            dk.push_str(k);
            dv.clear();
            dv.push_str(v);
        } else {
            dst.push(((*k).to_string(), (*v).to_string()));
        }
    }
    dst.truncate(src.len());
}

impl DenialRing {
    /// Keeps a denial unless the ring is busy or [`KEPT_PER_MS_MAX`] denials were already
    /// kept in `at_ms` (then counts it in [`DenialRing::skipped`]).
    pub fn record<'a>(
        &self,
        at_ms: i64,
        attributes: &[(&str, &str)],
        denied_by: impl Iterator<Item = &'a str>,
        estimate: Amounts,
    ) {
        if self.window_ms.load(Ordering::Relaxed) == at_ms {
            if self.kept_in_ms.fetch_add(1, Ordering::Relaxed) >= KEPT_PER_MS_MAX {
                self.skipped.fetch_add(1, Ordering::Relaxed);
                return;
            }
        } else {
            self.window_ms.store(at_ms, Ordering::Relaxed);
            self.kept_in_ms.store(1, Ordering::Relaxed);
        }
        let Some(mut ring) = self.ring.try_lock() else {
            self.skipped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        ring.seq += 1;
        let seq = ring.seq;
        let slot = if ring.entries.len() < DENIALS_MAX {
            ring.entries.push(Denial::default());
            ring.entries.len() - 1
        } else {
            let i = ring.next;
            ring.next = (i + 1) % DENIALS_MAX;
            i
        };
        let d = &mut ring.entries[slot];
        d.seq = seq;
        d.at_ms = at_ms;
        d.estimate = estimate;
        refill_pairs(&mut d.attributes, attributes);
        let mut more = 0;
        refill(
            &mut d.denied_by,
            denied_by.enumerate().filter_map(|(i, id)| {
                if i < DENIED_BY_MAX {
                    Some(id)
                } else {
                    more += 1;
                    None
                }
            }),
        );
        d.denied_by_more = more;
    }

    /// Up to `max` denials, newest first.
    pub fn recent(&self, max: usize) -> Vec<Denial> {
        let ring = self.ring.lock();
        let n = ring.entries.len();
        // Once full, `next` is the oldest entry, so `next - 1` is the newest.
        let newest = if n < DENIALS_MAX { n } else { ring.next + n };
        (1..=max.min(n))
            .map(|back| ring.entries[(newest - back) % n].clone())
            .collect()
    }

    /// Denials not kept because the ring was busy or the millisecond's quota was spent.
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_core::units::Micros;

    fn amounts(tokens: u64) -> Amounts {
        Amounts {
            cost: Micros(20_000),
            tokens,
            requests: 1,
        }
    }

    fn record(ring: &DenialRing, i: u64, ids: &[&str]) {
        let v = format!("vk-{i}");
        ring.record(
            i as i64,
            &[("virtual_key", v.as_str())],
            ids.iter().copied(),
            amounts(i),
        );
    }

    #[test]
    fn newest_first_and_bounded() {
        let ring = DenialRing::default();
        assert!(ring.recent(10).is_empty());
        for i in 1..=3 {
            record(&ring, i, &["a"]);
        }
        let seqs: Vec<u64> = ring.recent(10).iter().map(|d| d.seq).collect();
        assert_eq!(seqs, [3, 2, 1]);
        assert_eq!(ring.recent(2).len(), 2);

        let total = DENIALS_MAX as u64 * 2 + 7;
        for i in 4..=total {
            record(&ring, i, &["a", "b"]);
        }
        let all = ring.recent(usize::MAX);
        assert_eq!(all.len(), DENIALS_MAX);
        let seqs: Vec<u64> = all.iter().map(|d| d.seq).collect();
        let want: Vec<u64> = (total - DENIALS_MAX as u64 + 1..=total).rev().collect();
        assert_eq!(seqs, want);
        // Every entry says what its own denial said, not what the slot held before.
        for d in &all {
            assert_eq!(d.at_ms, d.seq as i64);
            assert_eq!(
                d.attributes,
                [("virtual_key".into(), format!("vk-{}", d.seq))]
            );
            assert_eq!(d.denied_by, ["a", "b"]);
            assert_eq!(d.estimate, amounts(d.seq));
        }
        assert_eq!(ring.skipped(), 0);
    }

    #[test]
    fn reused_slots_lose_what_they_held_before() {
        let ring = DenialRing::default();
        let many: Vec<String> = (0..DENIED_BY_MAX + 3).map(|i| format!("l{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        for i in 1..=DENIALS_MAX as u64 {
            ring.record(
                i as i64,
                &[("team", "eng"), ("model", "gpt-4o")],
                many.iter().copied(),
                amounts(i),
            );
        }
        // The next denial overwrites the oldest slot with fewer attributes and ids.
        record(&ring, 9_999, &["only"]);
        let newest = &ring.recent(1)[0];
        assert_eq!(newest.seq, DENIALS_MAX as u64 + 1);
        assert_eq!(
            newest.attributes,
            [("virtual_key".into(), "vk-9999".into())]
        );
        assert_eq!(newest.denied_by, ["only"]);
        assert_eq!(newest.denied_by_more, 0);
        let older = &ring.recent(2)[1];
        assert_eq!(older.denied_by.len(), DENIED_BY_MAX);
        assert_eq!(older.denied_by_more, 3);
    }

    #[test]
    fn a_busy_ring_skips_instead_of_waiting() {
        let ring = DenialRing::default();
        let held = ring.ring.lock();
        record(&ring, 1, &["a"]);
        drop(held);
        assert_eq!(ring.skipped(), 1);
        assert!(ring.recent(10).is_empty());
        record(&ring, 2, &["a"]);
        assert_eq!(ring.recent(10)[0].seq, 1);
    }

    #[test]
    fn a_storm_keeps_a_bounded_sample_per_millisecond() {
        let ring = DenialRing::default();
        for _ in 0..20 {
            record(&ring, 7, &["a"]);
        }
        assert_eq!(ring.recent(100).len(), KEPT_PER_MS_MAX as usize);
        assert_eq!(ring.skipped(), 20 - u64::from(KEPT_PER_MS_MAX));
        // The next millisecond has its own quota.
        record(&ring, 8, &["a"]);
        assert_eq!(ring.recent(1)[0].at_ms, 8);
        assert_eq!(ring.recent(100).len(), KEPT_PER_MS_MAX as usize + 1);
    }
}
