//! G-counter slots: per (limit, epoch) one slot per origin node, merged by maximum.
//!
//! A node only ever raises its own slot; replicas merge any slot by taking the larger value,
//! so merge is commutative, associative and idempotent and replaying old state is harmless
//! (DESIGN.md §2). The total of an epoch is kept incrementally, so reading usage costs one
//! lookup, not a sum.

use std::fmt;

/// `(period_index, reset_id)`, ordered lexicographically. `period_index` is the period's
/// start in Unix ms; `reset_id` is the HLC of the reset that opened the epoch, or the
/// limit's spec generation when no reset happened in that period (see ARCHITECTURE.md).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct Epoch {
    pub period: i64,
    pub reset: u64,
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.period, self.reset)
    }
}

/// Interned origin node id.
pub type OriginIdx = u32;

/// The slots of one (limit, epoch), and for hard limits the grant rows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EpochCounter {
    slots: Vec<(OriginIdx, u64)>,
    total: u64,
    /// (from, to, rights `from` has granted `to` in total): each entry grows only and
    /// merges by maximum (`rights.rs`). Few: most epochs have none.
    grants: Vec<(OriginIdx, OriginIdx, u64)>,
}

impl EpochCounter {
    /// Raises `origin`'s slot to `value` if that is higher. Returns whether it changed.
    pub fn merge(&mut self, origin: OriginIdx, value: u64) -> bool {
        match self.slots.iter_mut().find(|(o, _)| *o == origin) {
            Some((_, cur)) if *cur >= value => false,
            Some((_, cur)) => {
                self.total = self.total.saturating_add(value - *cur);
                *cur = value;
                true
            }
            None if value == 0 => false,
            None => {
                self.slots.push((origin, value));
                self.total = self.total.saturating_add(value);
                true
            }
        }
    }

    /// Σ slots.
    pub fn total(&self) -> u64 {
        debug_assert_eq!(
            self.total,
            self.slots
                .iter()
                .fold(0u64, |a, (_, v)| a.saturating_add(*v))
        );
        self.total
    }

    pub fn slot(&self, origin: OriginIdx) -> u64 {
        self.slots
            .iter()
            .find(|(o, _)| *o == origin)
            .map_or(0, |(_, v)| *v)
    }

    pub fn slots(&self) -> &[(OriginIdx, u64)] {
        &self.slots
    }

    /// Merges every slot and grant of `other` into this one.
    pub fn merge_all(&mut self, other: &EpochCounter) {
        for &(o, v) in &other.slots {
            self.merge(o, v);
        }
        for &(f, t, v) in &other.grants {
            self.merge_grant(f, t, v);
        }
    }

    /// Raises `from`'s grant to `to` to `value` if that is higher. Returns whether it
    /// changed.
    pub fn merge_grant(&mut self, from: OriginIdx, to: OriginIdx, value: u64) -> bool {
        match self
            .grants
            .iter_mut()
            .find(|(f, t, _)| *f == from && *t == to)
        {
            Some((_, _, cur)) if *cur >= value => false,
            Some((_, _, cur)) => {
                *cur = value;
                true
            }
            None if value == 0 => false,
            None => {
                self.grants.push((from, to, value));
                true
            }
        }
    }

    /// What `from` has granted `to` in total.
    pub fn grant(&self, from: OriginIdx, to: OriginIdx) -> u64 {
        self.grants
            .iter()
            .find(|(f, t, _)| *f == from && *t == to)
            .map_or(0, |g| g.2)
    }

    /// Σ granted to `to`.
    pub fn received(&self, to: OriginIdx) -> u64 {
        self.grants
            .iter()
            .filter(|g| g.1 == to)
            .fold(0u64, |a, g| a.saturating_add(g.2))
    }

    /// Σ granted by `from`.
    pub fn given(&self, from: OriginIdx) -> u64 {
        self.grants
            .iter()
            .filter(|g| g.0 == from)
            .fold(0u64, |a, g| a.saturating_add(g.2))
    }

    /// Every (from, to, total granted).
    pub fn grants(&self) -> &[(OriginIdx, OriginIdx, u64)] {
        &self.grants
    }
}

/// All epochs of one limit. Few epochs are live at once (the current one, maybe the one
/// before while gossip catches up), so a small vector beats a map.
#[derive(Debug, Clone, Default)]
pub struct LimitCounters {
    epochs: Vec<(Epoch, EpochCounter)>,
}

impl LimitCounters {
    pub fn get(&self, epoch: Epoch) -> Option<&EpochCounter> {
        self.epochs
            .iter()
            .rev()
            .find(|(e, _)| *e == epoch)
            .map(|(_, c)| c)
    }

    pub fn get_mut_or_default(&mut self, epoch: Epoch) -> &mut EpochCounter {
        let pos = match self.epochs.iter().rposition(|(e, _)| *e == epoch) {
            Some(p) => p,
            None => {
                // Keep epochs sorted so the newest (the one checks read) is found first.
                let at = self.epochs.partition_point(|(e, _)| *e < epoch);
                self.epochs.insert(at, (epoch, EpochCounter::default()));
                at
            }
        };
        &mut self.epochs[pos].1
    }

    pub fn merge(&mut self, epoch: Epoch, origin: OriginIdx, value: u64) -> bool {
        self.get_mut_or_default(epoch).merge(origin, value)
    }

    pub fn merge_grant(
        &mut self,
        epoch: Epoch,
        from: OriginIdx,
        to: OriginIdx,
        value: u64,
    ) -> bool {
        self.get_mut_or_default(epoch).merge_grant(from, to, value)
    }

    pub fn epochs(&self) -> impl Iterator<Item = (Epoch, &EpochCounter)> {
        self.epochs.iter().map(|(e, c)| (*e, c))
    }

    /// Drops epochs for which `keep` is false (closed epochs already durable as history).
    pub fn retain(&mut self, mut keep: impl FnMut(Epoch) -> bool) {
        self.epochs.retain(|(e, _)| keep(*e));
    }

    pub fn slot_count(&self) -> usize {
        self.epochs.iter().map(|(_, c)| c.slots.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn counter(slots: &[(OriginIdx, u64)]) -> EpochCounter {
        let mut c = EpochCounter::default();
        for &(o, v) in slots {
            c.merge(o, v);
        }
        c
    }

    fn sorted(c: &EpochCounter) -> Vec<(OriginIdx, u64)> {
        let mut s = c.slots.clone();
        s.sort();
        s
    }

    fn arb_slots() -> impl Strategy<Value = Vec<(OriginIdx, u64)>> {
        proptest::collection::vec((0u32..5, 0u64..1_000), 0..12)
    }

    proptest! {
        #[test]
        fn merge_is_commutative(a in arb_slots(), b in arb_slots()) {
            let (mut ab, mut ba) = (counter(&a), counter(&b));
            ab.merge_all(&counter(&b));
            ba.merge_all(&counter(&a));
            prop_assert_eq!(sorted(&ab), sorted(&ba));
            prop_assert_eq!(ab.total(), ba.total());
        }

        #[test]
        fn merge_is_associative(a in arb_slots(), b in arb_slots(), c in arb_slots()) {
            let mut left = counter(&a);
            left.merge_all(&counter(&b));
            left.merge_all(&counter(&c));
            let mut bc = counter(&b);
            bc.merge_all(&counter(&c));
            let mut right = counter(&a);
            right.merge_all(&bc);
            prop_assert_eq!(sorted(&left), sorted(&right));
        }

        #[test]
        fn merge_is_idempotent(a in arb_slots()) {
            let mut x = counter(&a);
            let before = sorted(&x);
            x.merge_all(&counter(&a));
            prop_assert_eq!(sorted(&x), before);
        }

        #[test]
        fn grant_merge_is_commutative_idempotent_and_monotone(
            a in proptest::collection::vec((0u32..3, 0u32..3, 0u64..1_000), 0..12),
            b in proptest::collection::vec((0u32..3, 0u32..3, 0u64..1_000), 0..12),
        ) {
            let build = |g: &[(u32, u32, u64)]| {
                let mut c = EpochCounter::default();
                for &(f, t, v) in g {
                    let before = c.grant(f, t);
                    c.merge_grant(f, t, v);
                    assert_eq!(c.grant(f, t), before.max(v));
                }
                c
            };
            let (mut ab, mut ba) = (build(&a), build(&b));
            ab.merge_all(&build(&b));
            ba.merge_all(&build(&a));
            for f in 0..3 {
                for t in 0..3 {
                    prop_assert_eq!(ab.grant(f, t), ba.grant(f, t));
                    let want = a.iter().chain(&b).filter(|g| g.0 == f && g.1 == t).map(|g| g.2).max().unwrap_or(0);
                    prop_assert_eq!(ab.grant(f, t), want);
                }
                prop_assert_eq!(ab.received(f), (0..3).map(|x| ab.grant(x, f)).sum::<u64>());
                prop_assert_eq!(ab.given(f), (0..3).map(|x| ab.grant(f, x)).sum::<u64>());
            }
            let again = ab.clone();
            ab.merge_all(&again);
            prop_assert_eq!(ab, again);
        }

        #[test]
        fn slots_never_decrease(ops in proptest::collection::vec((0u32..4, 0u64..1_000), 0..64)) {
            let mut c = EpochCounter::default();
            for (o, v) in ops {
                let before = c.slot(o);
                let total_before = c.total();
                c.merge(o, v);
                prop_assert!(c.slot(o) >= before);
                prop_assert_eq!(c.slot(o), before.max(v));
                prop_assert!(c.total() >= total_before);
            }
        }
    }

    #[test]
    fn epochs_stay_sorted() {
        let mut l = LimitCounters::default();
        let e = |p, r| Epoch {
            period: p,
            reset: r,
        };
        l.merge(e(20, 0), 0, 5);
        l.merge(e(10, 0), 0, 3);
        l.merge(e(20, 7), 1, 4);
        let order: Vec<Epoch> = l.epochs().map(|(e, _)| e).collect();
        assert_eq!(order, vec![e(10, 0), e(20, 0), e(20, 7)]);
        assert_eq!(l.get(e(20, 0)).unwrap().total(), 5);
        assert_eq!(l.slot_count(), 3);
    }
}
