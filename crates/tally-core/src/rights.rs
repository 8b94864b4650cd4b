//! Hard limits as an escrow (DESIGN.md I7; a state-based bounded counter in the spirit of
//! Balegas et al., SRDS 2015, and AntidoteDB's `antidote_crdt_counter_b`).
//!
//! For a hard limit in an epoch, every member node starts with a share of the budget,
//! its *allocation*, a pure function of replicated config: `max − baseline` split by the
//! members' weights, frozen into the limit's generation. Nodes move rights by *grants*:
//! node `i` owns the row `G_i = {j: rights i has given j in total}`, which only grows and
//! merges by maximum per entry, like a slot. A node's usage `U_i` is its slot. Then
//!
//! `free_i = alloc_i + Σ_k G_k[i] − Σ_j G_i[j] − U_i − held_i`
//!
//! where `held_i` (reservations, writes in flight) lives in the node's memory. A node
//! reserves, records within, or grants only what its own `free_i` covers. Its own row and
//! slot come only from its own disk, and what it knows of the others' rows are lower
//! bounds of the truth (they only grow), so at every instant, on every side of any
//! partition, `Σ U_i <= Σ alloc_i <= max − baseline`: grants cancel out. Usage is a fact
//! and is always recorded; spending beyond `free` is *overrun*, the node's debt, and the
//! only way `Σ U` can pass `max`: `Σ U_i <= max − baseline + Σ_i debt_i`.
//!
//! A decommissioned node's remaining rights (its `free` with nothing held, computed live
//! from its final rows, so later, higher rows lower it) count as its successor's.
//!
//! Pure arithmetic; the state glue is in `state.rs`.

use crate::config::Member;

/// One node's position in a hard limit's epoch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rights {
    /// Its share of `max − baseline`.
    pub alloc: u64,
    /// Σ granted to it by others.
    pub received: u64,
    /// Σ it granted to others.
    pub given: u64,
    /// Its own usage (its slot).
    pub used: u64,
}

impl Rights {
    /// Rights it may still spend with `held` already promised; negative is debt.
    pub fn free(&self, held: u64) -> i128 {
        i128::from(self.alloc) + i128::from(self.received)
            - i128::from(self.given)
            - i128::from(self.used)
            - i128::from(held)
    }

    /// Usage beyond its rights (never negative).
    pub fn debt(&self) -> u64 {
        u64::try_from((-self.free(0)).max(0)).unwrap_or(u64::MAX)
    }
}

/// `node`'s allocation of `total` among `members` (sorted by node id, distinct): each gets
/// `⌊total · w / W⌋`, and the units left by rounding go one each to the first members in
/// id order, so the allocations add up to exactly `total`. Non-members get 0.
pub fn alloc(total: u64, members: &[Member], node: &str) -> u64 {
    let Some(pos) = members.iter().position(|m| m.node == node) else {
        return 0;
    };
    let weights: u128 = members.iter().map(|m| u128::from(m.weight)).sum();
    if weights == 0 {
        return 0;
    }
    let share = |w: u32| (u128::from(total) * u128::from(w) / weights) as u64;
    let assigned: u64 = members.iter().map(|m| share(m.weight)).sum();
    let left = total - assigned;
    debug_assert!(
        left < members.len() as u64,
        "rounding leaves less than one unit each"
    );
    share(members[pos].weight) + u64::from((pos as u64) < left)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn members(weights: &[u32]) -> Vec<Member> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| Member {
                node: format!("n{i:02}"),
                weight,
            })
            .collect()
    }

    #[test]
    fn allocation_examples() {
        let m = members(&[1, 1, 1]);
        assert_eq!(
            ["n00", "n01", "n02", "x"].map(|n| alloc(100, &m, n)),
            [34, 33, 33, 0]
        );
        let m = members(&[3, 1]);
        assert_eq!(["n00", "n01"].map(|n| alloc(10, &m, n)), [8, 2]);
        assert_eq!(alloc(0, &m, "n00"), 0);
        assert_eq!(alloc(u64::MAX, &members(&[1]), "n00"), u64::MAX);
    }

    #[test]
    fn free_and_debt() {
        let r = Rights {
            alloc: 10,
            received: 5,
            given: 3,
            used: 9,
        };
        assert_eq!(r.free(0), 3);
        assert_eq!(r.free(4), -1);
        assert_eq!(r.debt(), 0);
        let over = Rights { used: 20, ..r };
        assert_eq!(over.debt(), 8);
    }

    proptest! {
        /// Allocations add up to exactly the total, and follow the weights to within one.
        #[test]
        fn allocations_sum_to_the_total(total in any::<u64>(), weights in prop::collection::vec(1u32..1_000_000, 1..64)) {
            let m = members(&weights);
            let all: Vec<u64> = m.iter().map(|x| alloc(total, &m, &x.node)).collect();
            let sum: u128 = all.iter().map(|&a| u128::from(a)).sum();
            prop_assert_eq!(sum, u128::from(total));
            let w: u128 = weights.iter().map(|&w| u128::from(w)).sum();
            for (a, &wi) in all.iter().zip(&weights) {
                let exact = u128::from(total) * u128::from(wi) / w;
                prop_assert!(u128::from(*a) == exact || u128::from(*a) == exact + 1);
            }
        }
    }
}
