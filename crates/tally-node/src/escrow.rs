//! What this node holds back from the free rights of hard limits (ARCHITECTURE.md, "Hard
//! limits"): open reservations, and writes between their plan and their commit.
//!
//! Everything here is memory. A check with `reserve` takes the state's read lock, then
//! this lock, decides and holds in one step, so two checks never spend the same rights.
//! The writer takes the same two locks in the same order when it turns holds into usage
//! (state write lock, then this), so a check sees either the hold or the usage, never
//! neither. After a crash the holds are gone while their clients may still spend: the
//! node then refuses to spend rights ("fence") for the longest reservation lifetime. A
//! clean shutdown stores the open reservations instead, and no fence is needed.

use std::collections::HashMap;

use parking_lot::Mutex;
use tally_core::{Epoch, LimitIdx};

/// One hold of a reservation: (limit, epoch, amount).
pub(crate) type Item = (LimitIdx, Epoch, u64);

#[derive(Debug, Clone)]
pub(crate) struct Reservation {
    pub(crate) items: Vec<Item>,
    pub(crate) expires_at_ms: i64,
}

#[derive(Default)]
pub(crate) struct Inner {
    held: HashMap<(LimitIdx, Epoch), u64, foldhash::fast::RandomState>,
    pub(crate) reservations: HashMap<String, Reservation>,
    next_id: u64,
    /// No hard limit may be spent before this instant (after an unclean restart).
    pub(crate) fenced_until_ms: i64,
    /// The clean-shutdown mark of the last run is still on disk: a crash now would look
    /// clean, so nothing may be spent until the writer removed it.
    pub(crate) mark_pending: bool,
    /// Own spending per hard limit since the rights task last looked, and its rate.
    spent: HashMap<LimitIdx, u64, foldhash::fast::RandomState>,
    rates: HashMap<LimitIdx, f64, foldhash::fast::RandomState>,
    /// Rights asked for by denied checks since the rights task last looked, per limit.
    shortfall: HashMap<LimitIdx, u64, foldhash::fast::RandomState>,
}

impl Inner {
    pub(crate) fn held(&self, limit: LimitIdx, epoch: Epoch) -> u64 {
        self.held.get(&(limit, epoch)).copied().unwrap_or(0)
    }

    pub(crate) fn fenced(&self, now_ms: i64) -> bool {
        self.mark_pending || now_ms < self.fenced_until_ms
    }

    pub(crate) fn hold(&mut self, limit: LimitIdx, epoch: Epoch, amount: u64) {
        if amount > 0 {
            let h = self.held.entry((limit, epoch)).or_default();
            *h = h.saturating_add(amount);
        }
    }

    pub(crate) fn release(&mut self, limit: LimitIdx, epoch: Epoch, amount: u64) {
        if amount == 0 {
            return;
        }
        let key = (limit, epoch);
        let h = self.held.get_mut(&key).expect("a release matches a hold");
        assert!(*h >= amount, "released {amount} of {h} held");
        *h -= amount;
        if *h == 0 {
            self.held.remove(&key);
        }
    }

    /// Opens a reservation holding `items`; returns its id.
    pub(crate) fn reserve(&mut self, node: &str, items: Vec<Item>, expires_at_ms: i64) -> String {
        self.next_id += 1;
        let id = format!("{node}~{:x}~{:x}", expires_at_ms, self.next_id);
        self.insert(id.clone(), items, expires_at_ms);
        id
    }

    /// Adds a reservation (its holds too).
    pub(crate) fn insert(&mut self, id: String, items: Vec<Item>, expires_at_ms: i64) {
        for &(l, e, a) in &items {
            self.hold(l, e, a);
        }
        self.reservations.insert(
            id,
            Reservation {
                items,
                expires_at_ms,
            },
        );
    }

    /// Closes a reservation and releases its holds; whether it was open.
    pub(crate) fn cancel(&mut self, id: &str) -> bool {
        match self.reservations.remove(id) {
            Some(r) => {
                for (l, e, a) in r.items {
                    self.release(l, e, a);
                }
                true
            }
            None => false,
        }
    }

    /// Closes a reservation without releasing its holds (the writer settles them).
    pub(crate) fn take(&mut self, id: &str) -> Option<Reservation> {
        self.reservations.remove(id)
    }

    /// Releases reservations that expired; how many.
    pub(crate) fn expire(&mut self, now_ms: i64) -> usize {
        let gone: Vec<String> = self
            .reservations
            .iter()
            .filter(|(_, r)| r.expires_at_ms <= now_ms)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &gone {
            self.cancel(id);
        }
        gone.len()
    }

    pub(crate) fn note_spent(&mut self, limit: LimitIdx, amount: u64) {
        let s = self.spent.entry(limit).or_default();
        *s = s.saturating_add(amount);
    }

    pub(crate) fn note_shortfall(&mut self, limit: LimitIdx, amount: u64) {
        let s = self.shortfall.entry(limit).or_default();
        *s = (*s).max(amount.max(1));
    }

    /// Folds what was spent over the last `secs` into each limit's rate (per second, an
    /// exponentially weighted mean), and takes the shortfalls noted since.
    pub(crate) fn sample(
        &mut self,
        secs: f64,
    ) -> HashMap<LimitIdx, u64, foldhash::fast::RandomState> {
        const WEIGHT: f64 = 0.3;
        let spent = std::mem::take(&mut self.spent);
        for (l, r) in self.rates.iter_mut() {
            let now = spent.get(l).copied().unwrap_or(0) as f64 / secs;
            *r = *r * (1.0 - WEIGHT) + now * WEIGHT;
        }
        for (l, s) in spent {
            self.rates
                .entry(l)
                .or_insert_with(|| s as f64 / secs * WEIGHT);
        }
        self.rates.retain(|_, r| *r > 0.01);
        std::mem::take(&mut self.shortfall)
    }

    pub(crate) fn rate(&self, limit: LimitIdx) -> f64 {
        self.rates.get(&limit).copied().unwrap_or(0.0)
    }

    /// Open reservations and what they hold, as rows to keep across a clean restart.
    pub(crate) fn snapshot(
        &self,
        limit_id: impl Fn(LimitIdx) -> String,
    ) -> Vec<tally_store::ReservationRow> {
        let mut rows = Vec::new();
        for (id, r) in &self.reservations {
            for &(l, e, a) in &r.items {
                rows.push((
                    id.clone(),
                    limit_id(l),
                    e.period,
                    e.reset,
                    a,
                    r.expires_at_ms,
                ));
            }
        }
        rows.sort();
        rows
    }

    pub(crate) fn open_reservations(&self) -> usize {
        self.reservations.len()
    }
}

#[derive(Default)]
pub(crate) struct Escrow(pub(crate) Mutex<Inner>);

#[cfg(test)]
mod tests {
    use super::*;

    fn e(p: i64) -> Epoch {
        Epoch {
            period: p,
            reset: 0,
        }
    }

    #[test]
    fn reservations_hold_until_cancelled_taken_or_expired() {
        let mut i = Inner::default();
        let a = i.reserve("n1", vec![(0, e(1), 5), (1, e(1), 2)], 100);
        let b = i.reserve("n1", vec![(0, e(1), 3)], 200);
        assert_ne!(a, b);
        assert_eq!((i.held(0, e(1)), i.held(1, e(1))), (8, 2));
        assert!(i.cancel(&a));
        assert!(!i.cancel(&a));
        assert_eq!((i.held(0, e(1)), i.held(1, e(1))), (3, 0));
        let r = i.take(&b).unwrap();
        assert_eq!(r.items, vec![(0, e(1), 3)]);
        assert_eq!(i.held(0, e(1)), 3, "a taken reservation keeps its hold");
        i.release(0, e(1), 3);
        let c = i.reserve("n1", vec![(2, e(2), 7)], 150);
        assert_eq!(i.expire(149), 0);
        assert_eq!(i.expire(150), 1);
        assert_eq!(i.held(2, e(2)), 0);
        assert!(!i.cancel(&c));
        assert_eq!(i.open_reservations(), 0);
    }

    #[test]
    fn rates_follow_spending() {
        let mut i = Inner::default();
        i.note_spent(3, 100);
        i.sample(1.0);
        assert!((i.rate(3) - 30.0).abs() < 1e-9);
        i.note_spent(3, 100);
        i.sample(1.0);
        assert!((i.rate(3) - 51.0).abs() < 1e-9);
        for _ in 0..100 {
            i.sample(1.0);
        }
        assert_eq!(i.rate(3), 0.0, "a limit no longer spent has no rate");
        i.note_shortfall(4, 10);
        i.note_shortfall(4, 7);
        let s = i.sample(1.0);
        assert_eq!(s.get(&4), Some(&10));
        assert!(i.sample(1.0).is_empty());
    }

    #[test]
    fn fence() {
        let mut i = Inner {
            fenced_until_ms: 1000,
            ..Inner::default()
        };
        assert!(i.fenced(999));
        assert!(!i.fenced(1000));
        i.mark_pending = true;
        assert!(i.fenced(5000));
    }
}
