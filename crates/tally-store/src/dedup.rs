//! The idempotency-id index (I2): which record ids were applied inside their window, at
//! about 2.5 bytes of memory per id.
//!
//! **On disk.** Ids are appended to `dedup_log`, one row per group commit (more for big
//! groups) holding the ids and the latest window end among them, so a commit dirties the
//! same few pages whatever the ids are (a table keyed by id wrote one random B-tree leaf
//! per record: ARCHITECTURE.md). Rows are grouped into *buckets* in commit order:
//!
//! - the **open bucket** holds the newest rows. Memory indexes it exactly: an
//!   [`OpenTable`] maps 40 bits of each id's fingerprint to its row (8 bytes a slot).
//! - when the open bucket reaches [`DedupOptions::bucket_cap`] ids, it is **closed**: a
//!   sorted run of `(fingerprint, row)` pairs is written to `dedup_runs` in large chunks,
//!   a binary fuse filter of its fingerprints (16-bit entries, about 2.26 bytes per id,
//!   false-positive rate 2^-16) to `dedup_filters`, and its extent to `dedup_buckets`, all
//!   in one transaction. Memory keeps only the filter. Start-up loads filters, not ids.
//!
//! A lookup checks the open table, then each closed bucket whose window has not ended:
//! its filter, and on a hit the run (one B-tree lookup and a binary search) and the log
//! row, where the full id and the row's window end are compared. A filter's false
//! positive costs a read, never an answer: a new id is never taken for a repeat (lost
//! usage) and a repeat is always found (filters have no false negatives), so the answer
//! is exactly the log's: "some row holding this id has a window end after now".
//!
//! **Expiry** drops closed buckets whole, oldest first, once every id in them has expired
//! (the bucket's latest window end has passed; a younger bucket that expired first waits
//! for the older one). While no closed bucket is left, rows of the open bucket expire one
//! by one, oldest first. The log rows and run chunks of dropped buckets are deleted a
//! bounded number per pass afterwards. Memory changes only after the transaction that
//! wrote the change committed, so a failed commit leaves memory and disk in agreement,
//! and a crash at any point is recovered exactly: the open bucket is rebuilt from the log
//! rows after the last closed bucket.
//!
//! Fingerprints are SipHash-1-3 of the id under a key chosen when the store is created and
//! kept in `meta`: stable across restarts and versions (persisted runs and filters depend
//! on it), and not predictable by clients who would like to aim ids at one another.

use std::collections::VecDeque;
use std::hash::Hasher;

use redb::{ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use siphasher::sip::SipHasher13;
use tally_core::codec;
use xorf::{BinaryFuse16, Filter as _};

use crate::StoreError;

/// Row sequence number → `(window end in Unix ms, record ids)` (codec-encoded): the ids
/// of one group commit, in commit order. Unchanged since schema 2.
pub(crate) const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("dedup_log");
/// First row of a closed bucket → `(last row, ids, latest window end)` (codec-encoded).
pub(crate) const BUCKETS: TableDefinition<u64, &[u8]> = TableDefinition::new("dedup_buckets");
/// First row of a closed bucket → its filter ([`Filter::to_bytes`]).
pub(crate) const FILTERS: TableDefinition<u64, &[u8]> = TableDefinition::new("dedup_filters");
/// (first row of a closed bucket, first fingerprint of the chunk) → sorted
/// `(fingerprint, row)` pairs, 16 bytes each, little-endian.
pub(crate) const RUNS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("dedup_runs");

/// `meta` key of the fingerprint key (32 hex digits).
pub(crate) const META_KEY: &str = "dedup_key";
/// `meta` key of the first row of the open bucket (rows before it belong to closed
/// buckets, or to dropped ones not yet deleted).
pub(crate) const META_OPEN_ROW: &str = "dedup_open_row";

/// Most ids in one log row, so confirming a hit decodes a small value.
pub(crate) const IDS_PER_ROW_MAX: usize = 512;
/// Pairs in one run chunk (64 KiB): one B-tree value per lookup, written sequentially.
const RUN_CHUNK_PAIRS: usize = 4096;
const PAIR_BYTES: usize = 16;

/// Rows of the open bucket are stored in the open table as an offset from its first row in
/// this many bits; the rest of the slot is fingerprint.
const DELTA_BITS: u32 = 24;
const DELTA_MASK: u64 = (1 << DELTA_BITS) - 1;
/// The open bucket closes before its rows span this many (a second of commits of one
/// record each is far fewer), so every offset fits.
const OPEN_ROWS_MAX: u64 = DELTA_MASK - (1 << 20);

pub(crate) type DedupRow = (i64, Vec<String>);
/// `(last row, ids, latest window end)` of a closed bucket.
type BucketMeta = (u64, u64, i64);

pub(crate) fn decode_row(bytes: &[u8]) -> Result<DedupRow, StoreError> {
    codec::decode(bytes).map_err(|source| StoreError::Corrupt {
        table: "dedup_log",
        source,
    })
}

fn corrupt(table: &'static str, what: &str) -> StoreError {
    StoreError::CorruptDedup {
        table,
        what: what.to_string(),
    }
}

/// How big buckets are, and (in tests) how good filters are.
#[derive(Debug, Clone)]
pub(crate) struct DedupOptions {
    /// The open bucket closes at `ids in the window / 32`, within these bounds: small
    /// enough that its exact index stays a small part of memory, large enough that a
    /// full window has few buckets to probe (86 at 86 million ids).
    pub(crate) bucket_ids_min: usize,
    pub(crate) bucket_ids_max: usize,
    /// Replace the fuse filter by a bitmap of 2^bits bits indexed by the fingerprint's low
    /// bits: a deliberately poor filter, so tests see false positives.
    pub(crate) lossy_filter_bits: Option<u8>,
}

impl Default for DedupOptions {
    fn default() -> Self {
        DedupOptions {
            bucket_ids_min: 1 << 16,
            bucket_ids_max: 1 << 20,
            lossy_filter_bits: None,
        }
    }
}

impl DedupOptions {
    fn bucket_cap(&self, ids_in_window: usize) -> usize {
        (ids_in_window / 32).clamp(self.bucket_ids_min, self.bucket_ids_max)
    }
}

/// The keyed fingerprint of an id.
#[derive(Clone, Copy)]
pub(crate) struct IdHasher {
    k0: u64,
    k1: u64,
}

impl IdHasher {
    /// A fresh random key (from the OS-seeded `RandomState` and the time).
    pub(crate) fn random() -> IdHasher {
        use std::hash::BuildHasher;
        let s = std::collections::hash_map::RandomState::new();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        IdHasher {
            k0: s.hash_one((nanos, 0u8)),
            k1: s.hash_one((nanos, 1u8)),
        }
    }

    pub(crate) fn to_hex(self) -> String {
        format!("{:016x}{:016x}", self.k0, self.k1)
    }

    pub(crate) fn from_hex(s: &str) -> Option<IdHasher> {
        if s.len() != 32 || !s.is_ascii() {
            return None;
        }
        Some(IdHasher {
            k0: u64::from_str_radix(&s[..16], 16).ok()?,
            k1: u64::from_str_radix(&s[16..], 16).ok()?,
        })
    }

    pub(crate) fn fingerprint(&self, id: &str) -> u64 {
        let mut h = SipHasher13::new_with_keys(self.k0, self.k1);
        h.write(id.as_bytes());
        h.finish()
    }
}

/// The exact index of the open bucket: fingerprint → row offset, open addressing with
/// linear probing over one `Vec<u64>`. Each slot packs the fingerprint's top 40 bits and
/// the row's offset + 1 (0 is an empty slot): 8 bytes a slot, no per-entry allocation,
/// where a `HashMap<u64, u64>` costs 17 bytes a slot (measured in BENCHMARKS.md). Two ids
/// that share 40 bits both answer a probe; the log row decides.
#[derive(Debug, Default)]
pub(crate) struct OpenTable {
    slots: Vec<u64>,
    len: usize,
}

impl OpenTable {
    fn tag(fp: u64) -> u64 {
        fp & !DELTA_MASK
    }

    fn home(&self, tag: u64) -> usize {
        ((tag >> DELTA_BITS) as usize) & (self.slots.len() - 1)
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Notes that the row at `delta` from the bucket's first row holds an id with
    /// fingerprint `fp`.
    pub(crate) fn insert(&mut self, fp: u64, delta: u64) {
        assert!(delta < DELTA_MASK, "open bucket rows fit their offset bits");
        if (self.len + 1) * 4 > self.slots.len() * 3 {
            self.grow();
        }
        let v = Self::tag(fp) | (delta + 1);
        let mask = self.slots.len() - 1;
        let mut i = self.home(Self::tag(fp));
        while self.slots[i] != 0 {
            i = (i + 1) & mask;
        }
        self.slots[i] = v;
        self.len += 1;
    }

    fn grow(&mut self) {
        let cap = (self.slots.len() * 2).max(16);
        let old = std::mem::replace(&mut self.slots, vec![0; cap]);
        let mask = cap - 1;
        for v in old.into_iter().filter(|&v| v != 0) {
            let mut i = self.home(Self::tag(v));
            while self.slots[i] != 0 {
                i = (i + 1) & mask;
            }
            self.slots[i] = v;
        }
    }

    /// Row offsets that may hold an id with this fingerprint.
    pub(crate) fn candidates(&self, fp: u64) -> impl Iterator<Item = u64> + '_ {
        let tag = Self::tag(fp);
        let mask = self.slots.len().wrapping_sub(1);
        let mut i = if self.slots.is_empty() {
            0
        } else {
            self.home(tag)
        };
        std::iter::from_fn(move || {
            loop {
                let v = *self.slots.get(i)?;
                if v == 0 {
                    return None;
                }
                i = (i + 1) & mask;
                if Self::tag(v) == tag {
                    return Some((v & DELTA_MASK) - 1);
                }
            }
        })
    }

    /// Forgets one (fingerprint, offset) pair, if present (backward-shift deletion, so
    /// probes never stop early at a hole).
    pub(crate) fn remove(&mut self, fp: u64, delta: u64) {
        if self.slots.is_empty() {
            return;
        }
        let v = Self::tag(fp) | (delta + 1);
        let mask = self.slots.len() - 1;
        let mut i = self.home(Self::tag(fp));
        loop {
            match self.slots[i] {
                0 => return,
                s if s == v => break,
                _ => i = (i + 1) & mask,
            }
        }
        let mut j = i;
        loop {
            j = (j + 1) & mask;
            let s = self.slots[j];
            if s == 0 {
                break;
            }
            let k = self.home(Self::tag(s));
            // The entry at j may move to i only if its home is not cyclically in (i, j].
            let stays = if i <= j {
                i < k && k <= j
            } else {
                i < k || k <= j
            };
            if !stays {
                self.slots[i] = s;
                i = j;
            }
        }
        self.slots[i] = 0;
        self.len -= 1;
    }

    /// Bytes held.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.slots.capacity() * 8
    }
}

/// A filter over the fingerprints of a closed bucket: no false negatives.
pub(crate) enum Filter {
    Fuse(BinaryFuse16),
    /// 2^bits bits indexed by the fingerprint's low bits: the fallback when a fuse filter
    /// cannot be built (xorf gives up after many seeds; never seen) and the lossy filter of
    /// tests.
    Bits {
        bits: u8,
        words: Vec<u64>,
    },
}

const FILTER_FUSE: u8 = 1;
const FILTER_BITS: u8 = 2;
/// Bits of the fallback bitmap: 8 KiB, which still spares most lookups a read.
const FALLBACK_BITS: u8 = 16;

impl Filter {
    /// Builds a filter of sorted, deduplicated fingerprints.
    fn build(fps: &[u64], lossy_bits: Option<u8>) -> Filter {
        if lossy_bits.is_none() {
            match BinaryFuse16::try_from(fps) {
                Ok(f) => return Filter::Fuse(f),
                Err(e) => tracing::warn!(
                    error = e,
                    ids = fps.len(),
                    "could not build a fuse filter for a dedup bucket; using a bitmap (lookups read the disk more often)"
                ),
            }
        }
        let bits = lossy_bits.unwrap_or(FALLBACK_BITS);
        let mut words = vec![0u64; (1usize << bits).div_ceil(64)];
        for &fp in fps {
            let b = (fp & ((1 << bits) - 1)) as usize;
            words[b / 64] |= 1 << (b % 64);
        }
        Filter::Bits { bits, words }
    }

    pub(crate) fn may_contain(&self, fp: u64) -> bool {
        match self {
            Filter::Fuse(f) => f.contains(&fp),
            Filter::Bits { bits, words } => {
                let b = (fp & ((1 << bits) - 1)) as usize;
                words[b / 64] & (1 << (b % 64)) != 0
            }
        }
    }

    fn heap_bytes(&self) -> usize {
        match self {
            Filter::Fuse(f) => f.fingerprints.len() * 2,
            Filter::Bits { words, .. } => words.len() * 8,
        }
    }

    /// Tag, then for a fuse filter its descriptor (seed u64, three u32) and fingerprints
    /// (u16), for a bitmap its bit count and words; little-endian.
    fn to_bytes(&self) -> Vec<u8> {
        match self {
            Filter::Fuse(f) => {
                let d = &f.descriptor;
                let mut out = Vec::with_capacity(21 + f.fingerprints.len() * 2);
                out.push(FILTER_FUSE);
                out.extend_from_slice(&d.seed.to_le_bytes());
                out.extend_from_slice(&d.segment_length.to_le_bytes());
                out.extend_from_slice(&d.segment_length_mask.to_le_bytes());
                out.extend_from_slice(&d.segment_count_length.to_le_bytes());
                for fp in f.fingerprints.iter() {
                    out.extend_from_slice(&fp.to_le_bytes());
                }
                out
            }
            Filter::Bits { bits, words } => {
                let mut out = Vec::with_capacity(2 + words.len() * 8);
                out.push(FILTER_BITS);
                out.push(*bits);
                for w in words {
                    out.extend_from_slice(&w.to_le_bytes());
                }
                out
            }
        }
    }

    fn from_bytes(b: &[u8]) -> Option<Filter> {
        let (&tag, rest) = b.split_first()?;
        match tag {
            FILTER_FUSE => {
                if rest.len() < 20 || (rest.len() - 20) % 2 != 0 {
                    return None;
                }
                let u32_at = |i: usize| u32::from_le_bytes(rest[i..i + 4].try_into().unwrap());
                let descriptor = xorf::Descriptor {
                    seed: u64::from_le_bytes(rest[..8].try_into().unwrap()),
                    segment_length: u32_at(8),
                    segment_length_mask: u32_at(12),
                    segment_count_length: u32_at(16),
                };
                let fingerprints: Box<[u16]> = rest[20..]
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect();
                // The probe indexes up to segment_count_length + 2 segments.
                let needed = descriptor.segment_count_length as usize
                    + 2 * descriptor.segment_length as usize;
                if fingerprints.len() < needed {
                    return None;
                }
                Some(Filter::Fuse(BinaryFuse16 {
                    descriptor,
                    fingerprints,
                }))
            }
            FILTER_BITS => {
                let (&bits, words) = rest.split_first()?;
                if bits > 32 || words.len() != (1usize << bits).div_ceil(64) * 8 {
                    return None;
                }
                let words = words
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                Some(Filter::Bits { bits, words })
            }
            _ => None,
        }
    }
}

/// A closed bucket as memory keeps it.
pub(crate) struct Closed {
    /// First and last log row (its rows may have gaps where open rows expired).
    first_row: u64,
    last_row: u64,
    ids: u64,
    /// Latest window end of any id in it: the bucket may go once this has passed.
    expiry_max_ms: i64,
    filter: Filter,
}

/// Everything memory knows about the ids of the window.
pub(crate) struct DedupIndex {
    pub(crate) hasher: IdHasher,
    options: DedupOptions,
    /// First row of the open bucket; the open table stores offsets from it.
    open_row: u64,
    open: OpenTable,
    /// Oldest first.
    closed: VecDeque<Closed>,
    closed_ids: u64,
    /// Key of the next log row.
    pub(crate) next_row: u64,
}

/// Changes a batch made to the index's disk state, applied to memory once it commits.
#[derive(Default)]
pub(crate) struct Pending {
    /// (fingerprint, offset) pairs of open rows the batch deleted.
    open_removed: Vec<(u64, u64)>,
    /// Closed buckets dropped from the front.
    dropped: usize,
    /// The open bucket, closed by this batch.
    closed: Option<Closed>,
    /// Something was written.
    pub(crate) dirty: bool,
}

impl DedupIndex {
    /// Reads the index of a store whose tables exist: closed buckets and their filters,
    /// then the open bucket's rows. Open rows beyond a bucket's worth (after a crash that
    /// kept the open bucket from closing, or the log of schema 2 on its first start) are
    /// closed into buckets on the way, each in its own transaction, so memory stays
    /// bounded and an interrupted start-up resumes where it stopped.
    pub(crate) fn load(
        db: &redb::Database,
        hasher: IdHasher,
        open_row: u64,
        options: DedupOptions,
        close_while_loading: bool,
    ) -> Result<DedupIndex, StoreError> {
        let mut ix = DedupIndex {
            hasher,
            options,
            open_row,
            open: OpenTable::default(),
            closed: VecDeque::new(),
            closed_ids: 0,
            next_row: open_row,
        };
        let txn = db.begin_read()?;
        let buckets = txn.open_table(BUCKETS)?;
        let filters = txn.open_table(FILTERS)?;
        for entry in buckets.iter()? {
            let (k, v) = entry?;
            let first_row = k.value();
            let (last_row, ids, expiry_max_ms): BucketMeta =
                codec::decode(v.value()).map_err(|source| StoreError::Corrupt {
                    table: "dedup_buckets",
                    source,
                })?;
            let filter = filters
                .get(first_row)?
                .and_then(|b| Filter::from_bytes(b.value()))
                .ok_or_else(|| corrupt("dedup_filters", &format!("bucket {first_row}")))?;
            ix.closed_ids += ids;
            ix.next_row = ix.next_row.max(last_row + 1);
            ix.closed.push_back(Closed {
                first_row,
                last_row,
                ids,
                expiry_max_ms,
                filter,
            });
        }
        drop((buckets, filters));
        // The open bucket's rows: indexed, or closed in bucket-sized runs.
        let log = txn.open_table(LOG)?;
        let mut pending: Vec<(u64, u64)> = Vec::new();
        let mut pending_first = open_row;
        let mut pending_expiry = i64::MIN;
        for row in log.range(open_row..)? {
            let (k, v) = row?;
            let seq = k.value();
            let (expiry, ids) = decode_row(v.value())?;
            pending.extend(ids.iter().map(|id| (hasher.fingerprint(id), seq)));
            pending_expiry = pending_expiry.max(expiry);
            ix.next_row = seq + 1;
            let cap = ix.options.bucket_cap(ix.len() + pending.len());
            if close_while_loading
                && (pending.len() >= cap || seq + 1 - pending_first >= OPEN_ROWS_MAX)
            {
                let w = db.begin_write()?;
                let closed = write_closed(
                    &w,
                    std::mem::take(&mut pending),
                    pending_first,
                    seq,
                    pending_expiry,
                    ix.options.lossy_filter_bits,
                )?;
                w.commit()?;
                ix.closed_ids += closed.ids;
                ix.closed.push_back(closed);
                pending_first = seq + 1;
                pending_expiry = i64::MIN;
                ix.open_row = pending_first;
                tracing::info!(
                    ids = ix.len(),
                    "closed a dedup bucket while loading the log"
                );
            }
        }
        for (fp, seq) in pending {
            ix.open.insert(fp, seq - ix.open_row);
        }
        Ok(ix)
    }

    /// Ids in the window (an id is counted once per row that holds it).
    pub(crate) fn len(&self) -> usize {
        self.closed_ids as usize + self.open.len()
    }

    /// Bytes of memory the index holds (filters and the open table).
    pub(crate) fn heap_bytes(&self) -> usize {
        self.open.heap_bytes()
            + self
                .closed
                .iter()
                .map(|c| c.filter.heap_bytes() + std::mem::size_of::<Closed>())
                .sum::<usize>()
    }

    #[cfg(test)]
    pub(crate) fn closed_buckets(&self) -> usize {
        self.closed.len()
    }

    /// Whether an id with fingerprint `fp` is in a row whose window ends after `now_ms`.
    pub(crate) fn contains(
        &self,
        txn: &WriteTransaction,
        id: &str,
        fp: u64,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let mut log = None;
        for delta in self.open.candidates(fp) {
            let log = match &mut log {
                Some(l) => l,
                None => log.insert(txn.open_table(LOG)?),
            };
            if row_holds(log, self.open_row + delta, id, now_ms)? {
                return Ok(true);
            }
        }
        for b in self.closed.iter().rev() {
            if b.expiry_max_ms <= now_ms || !b.filter.may_contain(fp) {
                continue;
            }
            let rows = run_rows(&txn.open_table(RUNS)?, b.first_row, fp)?;
            if rows.is_empty() {
                continue;
            }
            let log = match &mut log {
                Some(l) => l,
                None => log.insert(txn.open_table(LOG)?),
            };
            for seq in rows {
                if row_holds(log, seq, id, now_ms)? {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Forgets what expired at `now_ms` and closes the open bucket if it is full; deletes
    /// at most `rows_max` rows and chunks of buckets dropped earlier. Returns the ids
    /// forgotten; memory follows at [`DedupIndex::apply`].
    pub(crate) fn expire(
        &self,
        txn: &WriteTransaction,
        now_ms: i64,
        rows_max: usize,
        p: &mut Pending,
    ) -> Result<usize, StoreError> {
        let mut forgotten = 0;
        // Closed buckets, oldest first, while every id in them has expired.
        {
            let mut buckets = txn.open_table(BUCKETS)?;
            let mut filters = txn.open_table(FILTERS)?;
            for b in &self.closed {
                if b.expiry_max_ms > now_ms {
                    break;
                }
                buckets.remove(b.first_row)?;
                filters.remove(b.first_row)?;
                p.dropped += 1;
                forgotten += b.ids as usize;
            }
        }
        // Rows and chunks of dropped buckets (now or earlier): whatever is older than the
        // oldest live bucket.
        let live_row = self
            .closed
            .get(p.dropped)
            .map_or(self.open_row, |b| b.first_row);
        let mut budget = rows_max;
        {
            let mut log = txn.open_table(LOG)?;
            let old: Vec<u64> = log
                .range(..live_row)?
                .take(budget)
                .map(|r| r.map(|(k, _)| k.value()))
                .collect::<Result<_, _>>()?;
            budget -= old.len();
            for k in &old {
                log.remove(k)?;
            }
            let mut runs = txn.open_table(RUNS)?;
            let old: Vec<(u64, u64)> = runs
                .range(..(live_row, 0))?
                .take(budget)
                .map(|r| r.map(|(k, _)| k.value()))
                .collect::<Result<_, _>>()?;
            budget -= old.len();
            for k in &old {
                runs.remove(k)?;
            }
        }
        // With no closed bucket left, the open bucket's rows expire one by one.
        if p.dropped == self.closed.len() {
            let mut log = txn.open_table(LOG)?;
            let mut gone = Vec::new();
            for row in log.range(self.open_row..)? {
                let (k, v) = row?;
                let (expiry, ids) = decode_row(v.value())?;
                // Rows are in commit order; a row whose window has not ended stops the
                // sweep (a clock that went back only delays later rows' expiry).
                if expiry > now_ms || budget == 0 {
                    break;
                }
                let seq = k.value();
                budget = budget.saturating_sub(ids.len());
                forgotten += ids.len();
                p.open_removed.extend(
                    ids.iter()
                        .map(|id| (self.hasher.fingerprint(id), seq - self.open_row)),
                );
                gone.push(seq);
            }
            for k in gone {
                log.remove(k)?;
            }
        }
        // Close the open bucket once it holds a bucket's worth.
        let open_ids = self.open.len() - p.open_removed.len();
        let cap = self.options.bucket_cap(self.len() - forgotten);
        if open_ids > 0 && (open_ids >= cap || self.next_row - self.open_row >= OPEN_ROWS_MAX) {
            let started = std::time::Instant::now();
            let mut pairs = Vec::with_capacity(open_ids);
            let mut expiry_max = i64::MIN;
            for row in txn.open_table(LOG)?.range(self.open_row..)? {
                let (k, v) = row?;
                let (expiry, ids) = decode_row(v.value())?;
                expiry_max = expiry_max.max(expiry);
                let seq = k.value();
                pairs.extend(ids.iter().map(|id| (self.hasher.fingerprint(id), seq)));
            }
            p.closed = Some(write_closed(
                txn,
                pairs,
                self.open_row,
                self.next_row - 1,
                expiry_max,
                self.options.lossy_filter_bits,
            )?);
            tracing::info!(
                ids = open_ids,
                buckets = self.closed.len() + 1 - p.dropped,
                ms = started.elapsed().as_millis() as u64,
                "closed a dedup bucket (commits wait while it is written)"
            );
        }
        p.dirty |= forgotten > 0 || budget < rows_max || p.closed.is_some();
        Ok(forgotten)
    }

    /// Applies a committed batch: its expiry and closing, then its new rows (`rows` in
    /// order from `first_row`, each with the fingerprints of its ids).
    pub(crate) fn apply(&mut self, p: Pending, new: &[u64], first_row: u64) {
        for (fp, delta) in p.open_removed {
            self.open.remove(fp, delta);
        }
        for _ in 0..p.dropped {
            let b = self.closed.pop_front().expect("dropped a live bucket");
            self.closed_ids -= b.ids;
        }
        if let Some(c) = p.closed {
            self.open_row = c.last_row + 1;
            self.open = OpenTable::default();
            self.closed_ids += c.ids;
            self.closed.push_back(c);
        }
        for (i, &fp) in new.iter().enumerate() {
            let seq = first_row + (i / IDS_PER_ROW_MAX) as u64;
            self.open.insert(fp, seq - self.open_row);
        }
        if !new.is_empty() {
            self.next_row = first_row + new.len().div_ceil(IDS_PER_ROW_MAX) as u64;
        }
    }
}

/// Whether log row `seq` holds `id` with a window end after `now_ms`.
fn row_holds(
    log: &redb::Table<u64, &[u8]>,
    seq: u64,
    id: &str,
    now_ms: i64,
) -> Result<bool, StoreError> {
    let Some(row) = log.get(seq)? else {
        return Ok(false);
    };
    let (expiry, ids) = decode_row(row.value())?;
    Ok(expiry > now_ms && ids.iter().any(|i| i == id))
}

fn pair_at(chunk: &[u8], i: usize) -> (u64, u64) {
    let p = &chunk[i * PAIR_BYTES..(i + 1) * PAIR_BYTES];
    (
        u64::from_le_bytes(p[..8].try_into().unwrap()),
        u64::from_le_bytes(p[8..].try_into().unwrap()),
    )
}

/// Rows of bucket `first_row` that hold an id with fingerprint `fp`, from its run. Pairs
/// of one fingerprint never straddle two chunks, so one chunk answers.
fn run_rows(
    runs: &redb::Table<(u64, u64), &[u8]>,
    first_row: u64,
    fp: u64,
) -> Result<Vec<u64>, StoreError> {
    let Some(entry) = runs.range((first_row, 0)..=(first_row, fp))?.next_back() else {
        return Ok(Vec::new());
    };
    let (_, v) = entry?;
    let chunk = v.value();
    if chunk.len() % PAIR_BYTES != 0 {
        return Err(corrupt("dedup_runs", &format!("bucket {first_row}")));
    }
    let n = chunk.len() / PAIR_BYTES;
    // First pair with a fingerprint >= fp.
    let (mut lo, mut hi) = (0, n);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if pair_at(chunk, mid).0 < fp {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    Ok((lo..n)
        .map(|i| pair_at(chunk, i))
        .take_while(|&(f, _)| f == fp)
        .map(|(_, seq)| seq)
        .collect())
}

/// Writes a closed bucket of rows `first_row..=last_row`: its run, filter and extent, and
/// moves the open bucket past it.
fn write_closed(
    txn: &WriteTransaction,
    mut pairs: Vec<(u64, u64)>,
    first_row: u64,
    last_row: u64,
    expiry_max_ms: i64,
    lossy_bits: Option<u8>,
) -> Result<Closed, StoreError> {
    pairs.sort_unstable();
    let ids = pairs.len() as u64;
    {
        let mut runs = txn.open_table(RUNS)?;
        let mut chunk: Vec<u8> = Vec::with_capacity((RUN_CHUNK_PAIRS + 16) * PAIR_BYTES);
        let mut chunk_fp = 0;
        for (i, &(fp, seq)) in pairs.iter().enumerate() {
            if chunk.is_empty() {
                chunk_fp = fp;
            }
            chunk.extend_from_slice(&fp.to_le_bytes());
            chunk.extend_from_slice(&seq.to_le_bytes());
            let next_differs = pairs.get(i + 1).is_none_or(|&(f, _)| f != fp);
            if chunk.len() >= RUN_CHUNK_PAIRS * PAIR_BYTES && next_differs {
                runs.insert((first_row, chunk_fp), chunk.as_slice())?;
                chunk.clear();
            }
        }
        if !chunk.is_empty() {
            runs.insert((first_row, chunk_fp), chunk.as_slice())?;
        }
    }
    let mut fps: Vec<u64> = pairs.iter().map(|&(fp, _)| fp).collect();
    drop(pairs);
    fps.dedup();
    let filter = Filter::build(&fps, lossy_bits);
    drop(fps);
    txn.open_table(FILTERS)?
        .insert(first_row, filter.to_bytes().as_slice())?;
    let meta: BucketMeta = (last_row, ids, expiry_max_ms);
    txn.open_table(BUCKETS)?
        .insert(first_row, codec::encode(&meta).as_slice())?;
    txn.open_table(crate::META)?
        .insert(META_OPEN_ROW, (last_row + 1).to_string().as_str())?;
    Ok(Closed {
        first_row,
        last_row,
        ids,
        expiry_max_ms,
        filter,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[test]
    fn fingerprints_are_keyed_and_stable() {
        let h = IdHasher { k0: 1, k1: 2 };
        assert_eq!(h.fingerprint("req-1"), h.fingerprint("req-1"));
        assert_ne!(h.fingerprint("req-1"), h.fingerprint("req-2"));
        assert_ne!(
            h.fingerprint("req-1"),
            IdHasher { k0: 1, k1: 3 }.fingerprint("req-1")
        );
        // Persisted runs and filters rely on the function never changing: this value,
        // taken from this code, pins it (a dependency update that changed it fails here).
        assert_eq!(h.fingerprint("req-1"), 0x75ea_e19b_eef2_24da);
        let back = IdHasher::from_hex(&h.to_hex()).unwrap();
        assert_eq!(back.fingerprint("x"), h.fingerprint("x"));
        assert!(IdHasher::from_hex("zz").is_none());
    }

    #[test]
    fn filters_round_trip_and_have_no_false_negatives() {
        let fps: Vec<u64> = (0..10_000u64)
            .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .collect();
        let mut sorted = fps.clone();
        sorted.sort_unstable();
        for lossy in [None, Some(6)] {
            let f = Filter::build(&sorted, lossy);
            let back = Filter::from_bytes(&f.to_bytes()).unwrap();
            assert!(fps.iter().all(|fp| back.may_contain(*fp)));
            let fp_rate = (1..=100_000u64)
                .filter(|i| back.may_contain(i.wrapping_mul(0xff51_afd7_ed55_8ccd)))
                .count();
            match lossy {
                None => assert!(fp_rate < 10, "fuse16: {fp_rate} in 100 000"),
                Some(_) => assert_eq!(fp_rate, 100_000, "64 bits all set by 10 000 ids"),
            }
        }
        assert!(Filter::from_bytes(&[FILTER_FUSE, 1, 2]).is_none());
        assert!(Filter::from_bytes(&[9]).is_none());
    }

    #[derive(Debug, Clone)]
    enum TableOp {
        Insert(u8, u16),
        Remove(u8, u16),
    }

    proptest! {
        /// The open table answers like a multimap, with fingerprints chosen to share
        /// their top bits (same probe chains) and their low bits.
        #[test]
        fn open_table_is_a_multimap(ops in prop::collection::vec(
            prop_oneof![
                (0u8..24, 0u16..6).prop_map(|(f, d)| TableOp::Insert(f, d)),
                (0u8..24, 0u16..6).prop_map(|(f, d)| TableOp::Remove(f, d)),
            ],
            0..400,
        )) {
            let fp = |f: u8| (u64::from(f % 6) << 60) | (u64::from(f) << 24) | 0xabc;
            let mut t = OpenTable::default();
            let mut model: HashMap<u8, Vec<u64>> = HashMap::new();
            for op in ops {
                match op {
                    TableOp::Insert(f, d) => {
                        t.insert(fp(f), u64::from(d));
                        model.entry(f).or_default().push(u64::from(d));
                    }
                    TableOp::Remove(f, d) => {
                        t.remove(fp(f), u64::from(d));
                        if let Some(v) = model.get_mut(&f) {
                            if let Some(i) = v.iter().position(|&x| x == u64::from(d)) {
                                v.swap_remove(i);
                            }
                        }
                    }
                }
                for f in 0..24u8 {
                    let mut got: Vec<u64> = t.candidates(fp(f)).collect();
                    got.sort_unstable();
                    let mut want = model.get(&f).cloned().unwrap_or_default();
                    want.sort_unstable();
                    prop_assert_eq!(got, want);
                }
                prop_assert_eq!(t.len(), model.values().map(Vec::len).sum::<usize>());
            }
        }
    }
}
