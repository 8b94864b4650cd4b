//! The scope index: finds every limit whose scope is a subset of a request's attributes.
//!
//! Each (dimension, value) pair hashes to a u64; a set of pairs hashes to the wrapping sum
//! of its members, so the hash of any subset is a sum of the request's pair hashes. Limits
//! are indexed by the hash of their scope. Instead of enumerating all 2^k subsets of the
//! request, the index enumerates the *dimension sets* in use by some limit (usually a
//! handful) that are subsets of the request's dimensions: one lookup each. Every hit is
//! verified against the real strings, so a hash collision can never apply a foreign limit.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};

use foldhash::fast::FixedState;

use crate::units::EXPANDED_ATTRIBUTES_MAX;

/// Interned limit id.
pub type LimitIdx = u32;

/// Bit reserved for dimensions beyond the first 63 distinct ones.
const OVERFLOW_BIT: u8 = 63;

/// Hash of one attribute pair; the same on every node and every run.
pub fn pair_hash(dim: &str, value: &str) -> u64 {
    let mut h = FixedState::with_seed(0x7a11_7a11_7a11_7a11).build_hasher();
    dim.hash(&mut h);
    value.hash(&mut h);
    h.finish()
}

/// Hash of a set of pairs: order-independent.
pub fn set_hash<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> u64 {
    pairs
        .into_iter()
        .fold(0u64, |acc, (d, v)| acc.wrapping_add(pair_hash(d, v)))
}

/// A request's attributes after expansion: at most [`EXPANDED_ATTRIBUTES_MAX`], each with
/// its pair hash. Fixed capacity, so a check allocates nothing for it.
#[derive(Clone, Copy)]
pub struct Attrs<'a> {
    items: [(&'a str, &'a str, u64); EXPANDED_ATTRIBUTES_MAX],
    len: usize,
}

impl<'a> Attrs<'a> {
    pub fn new() -> Attrs<'a> {
        Attrs {
            items: [("", "", 0); EXPANDED_ATTRIBUTES_MAX],
            len: 0,
        }
    }

    /// Adds a pair unless its dimension is present or the buffer is full. Returns whether
    /// it was added.
    pub fn push(&mut self, dim: &'a str, value: &'a str) -> bool {
        if self.len == EXPANDED_ATTRIBUTES_MAX || self.get(dim).is_some() {
            return false;
        }
        self.items[self.len] = (dim, value, pair_hash(dim, value));
        self.len += 1;
        true
    }

    pub fn get(&self, dim: &str) -> Option<&'a str> {
        self.as_slice()
            .iter()
            .find(|(d, _, _)| *d == dim)
            .map(|(_, v, _)| *v)
    }

    pub fn as_slice(&self) -> &[(&'a str, &'a str, u64)] {
        &self.items[..self.len]
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether every pair of `scope` is among these attributes. Each scope pair carries its
    /// [`pair_hash`], compared first, so strings are compared once, on a likely match.
    pub fn covers<'s>(&self, mut scope: impl Iterator<Item = (&'s str, &'s str, u64)>) -> bool {
        scope.all(|(d, v, h)| {
            self.as_slice()
                .iter()
                .any(|&(ad, av, ah)| ah == h && ad == d && av == v)
        })
    }
}

impl Default for Attrs<'_> {
    fn default() -> Self {
        Attrs::new()
    }
}

/// A list of limit indices that lives on the stack up to 32 entries and spills beyond,
/// so the hot path does not allocate for ordinary requests.
#[derive(Debug, Clone)]
pub struct IdxBuf {
    inline: [LimitIdx; 32],
    len: usize,
    spill: Vec<LimitIdx>,
}

impl IdxBuf {
    pub fn new() -> IdxBuf {
        IdxBuf {
            inline: [0; 32],
            len: 0,
            spill: Vec::new(),
        }
    }

    pub fn push(&mut self, idx: LimitIdx) {
        if self.len < self.inline.len() {
            self.inline[self.len] = idx;
            self.len += 1;
        } else {
            self.spill.push(idx);
        }
    }

    pub fn contains(&self, idx: &LimitIdx) -> bool {
        self.inline[..self.len].contains(idx) || self.spill.contains(idx)
    }

    pub fn iter(&self) -> impl Iterator<Item = LimitIdx> + '_ {
        self.inline[..self.len]
            .iter()
            .chain(self.spill.iter())
            .copied()
    }

    pub fn len(&self) -> usize {
        self.len + self.spill.len()
    }

    /// Drops repeated entries, keeping the first of each.
    pub fn dedup(&mut self) {
        let mut n = 0;
        for i in 0..self.len {
            if !self.inline[..n].contains(&self.inline[i]) {
                self.inline[n] = self.inline[i];
                n += 1;
            }
        }
        self.len = n;
        if !self.spill.is_empty() {
            let mut seen: Vec<LimitIdx> = self.inline[..n].to_vec();
            self.spill.retain(|i| {
                let new = !seen.contains(i);
                seen.push(*i);
                new
            });
        }
    }

    /// Keeps only the entries for which `keep` holds, in order.
    pub fn retain(&mut self, mut keep: impl FnMut(LimitIdx) -> bool) {
        let mut n = 0;
        for i in 0..self.len {
            if keep(self.inline[i]) {
                self.inline[n] = self.inline[i];
                n += 1;
            }
        }
        self.len = n;
        self.spill.retain(|&i| keep(i));
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Default for IdxBuf {
    fn default() -> Self {
        IdxBuf::new()
    }
}

/// Index from scope hash to limits, plus the dimension sets in use.
#[derive(Debug, Default)]
pub struct ScopeIndex {
    dims: HashMap<Box<str>, u8, FixedState>,
    by_hash: HashMap<u64, Vec<LimitIdx>, FixedState>,
    /// (dimension-set mask, number of limits with it).
    masks: Vec<(u64, usize)>,
    overflow_in_use: bool,
}

impl ScopeIndex {
    fn bit_of(&mut self, dim: &str) -> u8 {
        if let Some(b) = self.dims.get(dim) {
            return *b;
        }
        let b = (self.dims.len() as u8).min(OVERFLOW_BIT);
        if b == OVERFLOW_BIT {
            self.overflow_in_use = true;
        }
        self.dims.insert(dim.into(), b);
        b
    }

    fn mask_of<'s>(&mut self, scope: impl Iterator<Item = &'s str>) -> u64 {
        scope.fold(0u64, |m, d| m | (1u64 << self.bit_of(d)))
    }

    pub fn insert<'s>(
        &mut self,
        idx: LimitIdx,
        scope: impl Iterator<Item = (&'s str, &'s str)> + Clone,
    ) {
        let mask = self.mask_of(scope.clone().map(|(d, _)| d));
        let list = self.by_hash.entry(set_hash(scope)).or_default();
        debug_assert!(!list.contains(&idx), "limit {idx} indexed twice");
        list.push(idx);
        match self.masks.iter_mut().find(|(m, _)| *m == mask) {
            Some((_, n)) => *n += 1,
            None => self.masks.push((mask, 1)),
        }
    }

    pub fn remove<'s>(
        &mut self,
        idx: LimitIdx,
        scope: impl Iterator<Item = (&'s str, &'s str)> + Clone,
    ) {
        let mask = self.mask_of(scope.clone().map(|(d, _)| d));
        let h = set_hash(scope);
        if let Some(list) = self.by_hash.get_mut(&h) {
            list.retain(|i| *i != idx);
            if list.is_empty() {
                self.by_hash.remove(&h);
            }
        }
        if let Some(pos) = self.masks.iter().position(|(m, _)| *m == mask) {
            self.masks[pos].1 -= 1;
            if self.masks[pos].1 == 0 {
                self.masks.swap_remove(pos);
            }
        }
    }

    /// Pushes onto `out` every limit whose scope hash matches a subset of `attrs`. The
    /// caller verifies each candidate with [`Attrs::covers`].
    pub fn candidates(&self, attrs: &Attrs<'_>, out: &mut IdxBuf) {
        let mut bits = [(0u64, 0u64); EXPANDED_ATTRIBUTES_MAX];
        let mut n = 0;
        let mut req_mask = 0u64;
        let mut shared_bit = false;
        for &(d, _, h) in attrs.as_slice() {
            if let Some(&b) = self.dims.get(d) {
                let bit = 1u64 << b;
                shared_bit |= req_mask & bit != 0;
                req_mask |= bit;
                bits[n] = (bit, h);
                n += 1;
            }
        }
        let bits = &bits[..n];
        // A limit sits in one bucket, and distinct subsets reach the same bucket only on a
        // 64-bit sum collision; callers dedup after verifying (see `IdxBuf::dedup`).
        let visit = |h: u64, out: &mut IdxBuf| {
            if let Some(list) = self.by_hash.get(&h) {
                for &idx in list {
                    out.push(idx);
                }
            }
        };
        if shared_bit {
            // Several request dimensions share the overflow bit: masks cannot tell subsets
            // apart, so enumerate subsets of the known dimensions (rare: >63 dimensions).
            for subset in 0u32..(1u32 << n) {
                let h = (0..n)
                    .filter(|i| subset & (1 << i) != 0)
                    .fold(0u64, |acc, i| acc.wrapping_add(bits[i].1));
                visit(h, out);
            }
            return;
        }
        for &(mask, _) in &self.masks {
            if mask & !req_mask == 0 {
                let h = bits
                    .iter()
                    .filter(|(bit, _)| mask & bit != 0)
                    .fold(0u64, |acc, (_, h)| acc.wrapping_add(*h));
                visit(h, out);
            }
        }
    }

    pub fn dimension_sets_in_use(&self) -> usize {
        self.masks.len()
    }
}
