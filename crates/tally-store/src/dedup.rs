//! The idempotency-id index (I2): which record ids were applied inside their window.
//!
//! On disk the ids are an append-only log: one row per group commit (more for big groups),
//! keyed by a sequence number, holding the window's end and the ids. A commit therefore
//! dirties the same one or two pages of the log whatever the ids are, instead of one
//! random B-tree leaf per id (random ids land on random leaves), which is what made the
//! per-id table cost a page write per record.
//!
//! In memory, [`DedupIndex`] maps a 64-bit fingerprint of each id to the log row(s) that
//! may hold it (about 20 bytes per id in the window). A fingerprint hit is confirmed by
//! reading the row, so a fingerprint collision can never make a new record look like a
//! repeat (lost usage) or hide a repeat (double count): the answer is exact; collisions
//! only cost a read. The index is rebuilt from the log at start-up.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};

/// Most ids in one log row, so confirming a hit decodes a small value.
pub(crate) const IDS_PER_ROW_MAX: usize = 512;

/// Fingerprints are already uniformly distributed: hash them as they are.
#[derive(Default)]
pub(crate) struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

type FpMap<V> = HashMap<u64, V, BuildHasherDefault<PassThrough>>;
pub(crate) type FpSet = std::collections::HashSet<u64, BuildHasherDefault<PassThrough>>;

/// Fingerprint → log rows that may hold an id with that fingerprint.
pub(crate) struct DedupIndex {
    hasher: foldhash::quality::RandomState,
    /// The newest row per fingerprint.
    newest: FpMap<u64>,
    /// Older rows of fingerprints seen more than once while their rows live (the same id
    /// re-used after its window, or a collision of two ids); almost always empty.
    older: FpMap<Vec<u64>>,
    ids: usize,
}

impl DedupIndex {
    pub(crate) fn new() -> DedupIndex {
        DedupIndex {
            hasher: foldhash::quality::RandomState::default(),
            newest: FpMap::default(),
            older: FpMap::default(),
            ids: 0,
        }
    }

    pub(crate) fn fingerprint(&self, id: &str) -> u64 {
        self.hasher.hash_one(id)
    }

    /// Rows that may hold an id with this fingerprint, newest first.
    pub(crate) fn candidates(&self, fp: u64) -> impl Iterator<Item = u64> + '_ {
        let newest = self.newest.get(&fp).copied();
        let older = self.older.get(&fp).into_iter().flatten().rev().copied();
        newest.into_iter().chain(older)
    }

    /// Notes that row `seq` holds an id with fingerprint `fp`. Rows are added in
    /// increasing `seq`.
    pub(crate) fn insert(&mut self, fp: u64, seq: u64) {
        if let Some(prev) = self.newest.insert(fp, seq) {
            debug_assert!(prev <= seq, "log rows are indexed in order");
            if prev != seq {
                self.older.entry(fp).or_default().push(prev);
            }
        }
        self.ids += 1;
    }

    /// Forgets that row `seq` holds an id with fingerprint `fp` (the row expired).
    pub(crate) fn remove(&mut self, fp: u64, seq: u64) {
        if self.newest.get(&fp) == Some(&seq) {
            match self.older.get_mut(&fp).and_then(Vec::pop) {
                Some(prev) => {
                    self.newest.insert(fp, prev);
                }
                None => {
                    self.newest.remove(&fp);
                }
            }
        } else if let Some(rows) = self.older.get_mut(&fp) {
            rows.retain(|&r| r != seq);
        } else {
            return;
        }
        if self.older.get(&fp).is_some_and(Vec::is_empty) {
            self.older.remove(&fp);
        }
        self.ids = self.ids.saturating_sub(1);
    }

    /// Ids indexed (counting an id once per row that holds it).
    pub(crate) fn len(&self) -> usize {
        self.ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_of_a_fingerprint_are_kept_until_each_expires() {
        let mut ix = DedupIndex::new();
        ix.insert(7, 1);
        ix.insert(7, 4);
        ix.insert(9, 4);
        ix.insert(7, 6);
        assert_eq!(ix.candidates(7).collect::<Vec<_>>(), vec![6, 4, 1]);
        assert_eq!(ix.len(), 4);
        ix.remove(7, 1);
        assert_eq!(ix.candidates(7).collect::<Vec<_>>(), vec![6, 4]);
        ix.remove(7, 6);
        assert_eq!(ix.candidates(7).collect::<Vec<_>>(), vec![4]);
        ix.remove(7, 4);
        ix.remove(7, 4);
        assert_eq!(ix.candidates(7).count(), 0);
        assert_eq!(ix.candidates(9).collect::<Vec<_>>(), vec![4]);
        assert_eq!(ix.len(), 1);
        assert!(ix.older.is_empty());
    }

    #[test]
    fn fingerprints_differ_for_different_ids() {
        let ix = DedupIndex::new();
        assert_eq!(ix.fingerprint("req-1"), ix.fingerprint("req-1"));
        assert_ne!(ix.fingerprint("req-1"), ix.fingerprint("req-2"));
    }
}
