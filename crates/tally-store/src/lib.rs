//! tally-store: everything tally keeps on disk, in one redb file (DESIGN.md §4).
//!
//! Tables: `meta` (node id, schema version), `own_slots` and `peer_slots` (G-counter slots
//! of this node and of every other origin it has heard of, so a restart cannot under-count;
//! closed epochs stay here as history), `limits`, `entities` and `resets` (config registers,
//! encoded by `tally_core::codec`), and the idempotency ids of the dedup window:
//! `dedup_log`, `dedup_buckets`, `dedup_filters` and `dedup_runs` (see [`dedup`]).
//!
//! This crate only knows redb. It does not decide anything: the node's writer opens one
//! [`Batch`] per group commit, writes what tally-core decided, and commits durably (one
//! fsync for the whole batch). Only this crate touches redb.

mod dedup;
mod history;

use std::fs::File;
use std::path::{Path, PathBuf};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tally_core::codec::{self, DecodeError};
use tally_core::{EntityRecord, Epoch, LimitRecord, ResetRegister};

pub use crate::history::{EpochRows, HistoryScan, SweepCursor};

use crate::dedup::{DedupIndex, DedupOptions, DedupRow, IDS_PER_ROW_MAX, IdHasher};

const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
/// (limit id, period, reset) → this node's slot.
const OWN_SLOTS: TableDefinition<(&str, i64, u64), u64> = TableDefinition::new("own_slots");
/// (origin node id, limit id, period, reset) → that origin's slot as last heard.
const PEER_SLOTS: TableDefinition<(&str, &str, i64, u64), u64> = TableDefinition::new("peer_slots");
const LIMITS: TableDefinition<&str, &[u8]> = TableDefinition::new("limits");
const ENTITIES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("entities");
const RESETS: TableDefinition<&str, &[u8]> = TableDefinition::new("resets");
const DEDUP_LOG: TableDefinition<u64, &[u8]> = dedup::LOG;
/// Schema 1 kept ids in a B-tree keyed by id (one random leaf written per record);
/// read once to migrate.
const V1_DEDUP: TableDefinition<&str, i64> = TableDefinition::new("dedup");
const V1_DEDUP_EXPIRY: TableDefinition<(i64, &str), ()> = TableDefinition::new("dedup_expiry");

/// Schema 3 indexes dedup ids by buckets with filters (schema 2 kept only the log; its
/// rows are read as they are and closed into buckets on the first start).
/// redb's page cache (see `Store::open`).
const CACHE_BYTES: usize = 64 << 20;
const SCHEMA_VERSION: &str = "3";
/// Name of the database file inside the data directory.
pub const DB_FILE: &str = "tally.redb";

/// A store failure. Every message says what happened and what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("cannot use data directory {path}: {source}; check it exists and is writable")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "database error: {0}; the data directory may be full, read-only or in use by another tally"
    )]
    Db(#[from] redb::Error),
    #[error(
        "the data directory was written by schema version {found}, this build reads {SCHEMA_VERSION}; use a matching tally version"
    )]
    Schema { found: String },
    #[error(
        "the data directory belongs to node {stored:?}, not {requested:?}; drop --node-id or use another --data-dir"
    )]
    NodeIdMismatch { stored: String, requested: String },
    #[error("corrupt value in table {table}: {source}")]
    Corrupt {
        table: &'static str,
        source: DecodeError,
    },
    #[error(
        "corrupt dedup index in table {table}: {what}; restore the data directory from a backup"
    )]
    CorruptDedup { table: &'static str, what: String },
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// Everything read back at start-up.
#[derive(Debug, Default)]
pub struct Recovered {
    pub limits: Vec<LimitRecord>,
    pub entities: Vec<EntityRecord>,
    pub resets: Vec<(String, ResetRegister)>,
    /// (limit id, epoch, value) of this node.
    pub own_slots: Vec<(String, Epoch, u64)>,
    /// (origin, limit id, epoch, value) of other nodes.
    pub peer_slots: Vec<(String, String, Epoch, u64)>,
    pub dedup_ids: usize,
    /// Bytes of memory the dedup index holds.
    pub dedup_bytes: usize,
}

/// The durable store of one node.
pub struct Store {
    db: Database,
    path: PathBuf,
    dedup: DedupIndex,
}

impl Store {
    /// Opens (or creates) the store in `dir`. On first creation the directory entry is
    /// fsynced, so the new file survives a crash right after start-up.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Store::open_with(dir, DedupOptions::default())
    }

    fn open_with(dir: &Path, options: DedupOptions) -> Result<Store, StoreError> {
        let dir_err = |source| StoreError::Dir {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(dir_err)?;
        let path = dir.join(DB_FILE);
        let existed = path.exists();
        // redb caches pages it wrote and read up to this size (1 GiB by default), which
        // would be most of a node's memory; the hot pages (log tail, slot tables) fit.
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(&path)?;
        if !existed {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(dir_err)?;
        }
        let (hasher, open_row) = init_tables(&db)?;
        let dedup = DedupIndex::load(&db, hasher, open_row, options)?;
        Ok(Store { db, path, dedup })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The node id stored on first start; `requested` (from `--node-id`) must match it, and
    /// is stored when there is none. `generate` makes one when neither exists.
    pub fn node_id(
        &self,
        requested: Option<&str>,
        generate: impl FnOnce() -> String,
    ) -> Result<String, StoreError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        let id = {
            let mut meta = txn.open_table(META)?;
            let stored = meta.get("node_id")?.map(|v| v.value().to_string());
            match (stored, requested) {
                (Some(s), Some(r)) if s != r => {
                    return Err(StoreError::NodeIdMismatch {
                        stored: s,
                        requested: r.to_string(),
                    });
                }
                (Some(s), _) => s,
                (None, r) => {
                    let id = r.map_or_else(generate, str::to_string);
                    meta.insert("node_id", id.as_str())?;
                    id
                }
            }
        };
        txn.commit()?;
        Ok(id)
    }

    /// Reads everything back for start-up.
    pub fn recover(&self) -> Result<Recovered, StoreError> {
        let txn = self.db.begin_read()?;
        let mut out = Recovered::default();
        for row in txn.open_table(LIMITS)?.iter()? {
            let (_, v) = row?;
            out.limits.push(
                codec::decode(v.value()).map_err(|source| StoreError::Corrupt {
                    table: "limits",
                    source,
                })?,
            );
        }
        for row in txn.open_table(ENTITIES)?.iter()? {
            let (_, v) = row?;
            out.entities.push(
                codec::decode(v.value()).map_err(|source| StoreError::Corrupt {
                    table: "entities",
                    source,
                })?,
            );
        }
        for row in txn.open_table(RESETS)?.iter()? {
            let (k, v) = row?;
            let reg = codec::decode(v.value()).map_err(|source| StoreError::Corrupt {
                table: "resets",
                source,
            })?;
            out.resets.push((k.value().to_string(), reg));
        }
        for row in txn.open_table(OWN_SLOTS)?.iter()? {
            let (k, v) = row?;
            let (limit, period, reset) = k.value();
            out.own_slots
                .push((limit.to_string(), Epoch { period, reset }, v.value()));
        }
        for row in txn.open_table(PEER_SLOTS)?.iter()? {
            let (k, v) = row?;
            let (origin, limit, period, reset) = k.value();
            out.peer_slots.push((
                origin.to_string(),
                limit.to_string(),
                Epoch { period, reset },
                v.value(),
            ));
        }
        out.dedup_ids = self.dedup.len();
        out.dedup_bytes = self.dedup.heap_bytes();
        Ok(out)
    }

    /// The newest `epochs_max` epochs of `limit` that started at or before `until_period`
    /// and that `scan` takes, newest first, with every slot and baseline stored for them.
    pub fn history(
        &self,
        limit: &str,
        until_period: i64,
        epochs_max: usize,
        scan: &mut dyn FnMut(Epoch) -> HistoryScan,
    ) -> Result<Vec<EpochRows>, StoreError> {
        history::read(
            &self.db.begin_read()?,
            limit,
            until_period,
            epochs_max,
            scan,
        )
    }

    /// Starts one group-commit batch.
    pub fn batch(&mut self) -> Result<Batch<'_>, StoreError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        Ok(Batch {
            txn,
            store: self,
            new_ids: Vec::new(),
            new_fps: Vec::new(),
            new_expiry_ms: i64::MIN,
            dedup: dedup::Pending::default(),
        })
    }
}

/// Creates the tables, migrates older schemas, and returns the dedup fingerprint key and
/// the first row of the open dedup bucket.
fn init_tables(db: &Database) -> Result<(IdHasher, u64), StoreError> {
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate)?;
    let found = {
        let meta = txn.open_table(META)?;
        meta.get("schema_version")?.map(|v| v.value().to_string())
    };
    match found.as_deref() {
        Some(SCHEMA_VERSION) | None => {}
        Some("1") => {
            migrate_v1_dedup(&txn)?;
            migrate_v2_baselines(&txn)?;
        }
        // Schema 2's log rows are schema 3's; the buckets are built from them at load.
        Some("2") => migrate_v2_baselines(&txn)?,
        Some(v) => {
            return Err(StoreError::Schema {
                found: v.to_string(),
            });
        }
    }
    let mut meta = txn.open_table(META)?;
    meta.insert("schema_version", SCHEMA_VERSION)?;
    let key = meta.get(dedup::META_KEY)?.map(|v| v.value().to_string());
    let hasher = match key {
        Some(k) => IdHasher::from_hex(&k).ok_or_else(|| StoreError::CorruptDedup {
            table: "meta",
            what: format!("{} {k:?}", dedup::META_KEY),
        })?,
        None => {
            let h = IdHasher::random();
            meta.insert(dedup::META_KEY, h.to_hex().as_str())?;
            h
        }
    };
    let open_row = match meta.get(dedup::META_OPEN_ROW)? {
        Some(v) => v.value().parse().map_err(|_| StoreError::CorruptDedup {
            table: "meta",
            what: format!("{} {:?}", dedup::META_OPEN_ROW, v.value()),
        })?,
        None => 0,
    };
    drop(meta);
    txn.open_table(OWN_SLOTS)?;
    txn.open_table(PEER_SLOTS)?;
    txn.open_table(LIMITS)?;
    txn.open_table(ENTITIES)?;
    txn.open_table(RESETS)?;
    txn.open_table(DEDUP_LOG)?;
    txn.open_table(dedup::BUCKETS)?;
    txn.open_table(dedup::FILTERS)?;
    txn.open_table(dedup::RUNS)?;
    txn.open_table(history::BASELINES)?;
    txn.commit()?;
    Ok((hasher, open_row))
}

/// Schema 3 keeps each epoch's baseline; before, only the latest reset register had one.
fn migrate_v2_baselines(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    let resets = txn.open_table(RESETS)?;
    let mut baselines = txn.open_table(history::BASELINES)?;
    for row in resets.iter()? {
        let (k, v) = row?;
        let reg: ResetRegister =
            codec::decode(v.value()).map_err(|source| StoreError::Corrupt {
                table: "resets",
                source,
            })?;
        baselines.insert((k.value(), reg.period, reg.reset.hlc.0), reg.baseline)?;
    }
    Ok(())
}

/// Moves schema 1's per-id dedup table into log rows (one migration transaction).
fn migrate_v1_dedup(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    let mut rows: Vec<DedupRow> = Vec::new();
    {
        let old = txn.open_table(V1_DEDUP)?;
        let mut row: DedupRow = (i64::MIN, Vec::new());
        for entry in old.iter()? {
            let (id, expiry) = entry?;
            row.0 = row.0.max(expiry.value());
            row.1.push(id.value().to_string());
            if row.1.len() == IDS_PER_ROW_MAX {
                rows.push(std::mem::replace(&mut row, (i64::MIN, Vec::new())));
            }
        }
        if !row.1.is_empty() {
            rows.push(row);
        }
    }
    let mut log = txn.open_table(DEDUP_LOG)?;
    for (seq, row) in rows.iter().enumerate() {
        log.insert(seq as u64, codec::encode(row).as_slice())?;
    }
    drop(log);
    txn.delete_table(V1_DEDUP)?;
    txn.delete_table(V1_DEDUP_EXPIRY)?;
    Ok(())
}

/// One durable write transaction: everything written through it becomes durable together
/// at [`Batch::commit`], with one fsync. The in-memory dedup index changes only once the
/// commit succeeded, so a failed commit leaves memory and disk in agreement.
pub struct Batch<'s> {
    txn: redb::WriteTransaction,
    store: &'s mut Store,
    /// Ids applied in this batch, with their fingerprints, and the latest window end.
    new_ids: Vec<String>,
    new_fps: Vec<u64>,
    new_expiry_ms: i64,
    /// What this batch did to the dedup index, for memory once it commits.
    dedup: dedup::Pending,
}

impl Batch<'_> {
    /// Whether `id` is inside its dedup window (I2), this batch's own ids included.
    pub fn dedup_contains(&self, id: &str, now_ms: i64) -> Result<bool, StoreError> {
        let fp = self.store.dedup.hasher.fingerprint(id);
        // A group holds a few thousand ids at most; the fingerprints are compared first.
        if self
            .new_fps
            .iter()
            .zip(&self.new_ids)
            .any(|(&f, i)| f == fp && i == id)
        {
            return Ok(self.new_expiry_ms > now_ms);
        }
        self.store.dedup.contains(&self.txn, id, fp, now_ms)
    }

    /// Remembers `id` until `expiry_ms` (written at commit, one log row per
    /// [`IDS_PER_ROW_MAX`] ids; a row keeps the latest window end of its ids).
    pub fn dedup_insert(&mut self, id: &str, expiry_ms: i64) -> Result<(), StoreError> {
        self.new_fps.push(self.store.dedup.hasher.fingerprint(id));
        self.new_ids.push(id.to_string());
        self.new_expiry_ms = self.new_expiry_ms.max(expiry_ms);
        Ok(())
    }

    /// Forgets ids whose window ended at or before `now_ms` (whole buckets, or the open
    /// bucket's rows, oldest first), deletes at most `rows_max` leftover rows of buckets
    /// dropped before, and closes the open bucket when it is full. Returns how many ids
    /// were forgotten. Call it on a batch of its own, before any `dedup_insert`.
    pub fn dedup_expire(&mut self, now_ms: i64, rows_max: usize) -> Result<usize, StoreError> {
        assert!(
            self.new_ids.is_empty(),
            "dedup_expire runs before dedup_insert"
        );
        self.store
            .dedup
            .expire(&self.txn, now_ms, rows_max, &mut self.dedup)
    }

    /// Whether committing this batch would write anything the dedup index did.
    pub fn dedup_dirty(&self) -> bool {
        self.dedup.dirty
    }

    /// This node's durable slot of (limit, epoch).
    pub fn own_slot(&self, limit: &str, epoch: Epoch) -> Result<u64, StoreError> {
        let t = self.txn.open_table(OWN_SLOTS)?;
        Ok(t.get((limit, epoch.period, epoch.reset))?
            .map_or(0, |v| v.value()))
    }

    /// Writes this node's slot. Slots never decrease (I3): writing a lower value is a bug.
    pub fn put_own_slot(
        &mut self,
        limit: &str,
        epoch: Epoch,
        value: u64,
    ) -> Result<(), StoreError> {
        let mut t = self.txn.open_table(OWN_SLOTS)?;
        let old = t
            .insert((limit, epoch.period, epoch.reset), value)?
            .map(|v| v.value());
        assert!(
            old.is_none_or(|o| o <= value),
            "own slot {limit} {epoch} would go down from {old:?} to {value}"
        );
        Ok(())
    }

    /// Raises another origin's slot to `value` if higher (max merge, like memory).
    pub fn merge_peer_slot(
        &mut self,
        origin: &str,
        limit: &str,
        epoch: Epoch,
        value: u64,
    ) -> Result<bool, StoreError> {
        let mut t = self.txn.open_table(PEER_SLOTS)?;
        let key = (origin, limit, epoch.period, epoch.reset);
        let old = t.get(key)?.map_or(0, |v| v.value());
        if value > old {
            t.insert(key, value)?;
            return Ok(true);
        }
        Ok(false)
    }

    pub fn put_limit(&mut self, rec: &LimitRecord) -> Result<(), StoreError> {
        self.txn
            .open_table(LIMITS)?
            .insert(rec.id.as_str(), codec::encode(rec).as_slice())?;
        Ok(())
    }

    pub fn remove_limit(&mut self, id: &str) -> Result<(), StoreError> {
        self.txn.open_table(LIMITS)?.remove(id)?;
        Ok(())
    }

    pub fn put_entity(&mut self, rec: &EntityRecord) -> Result<(), StoreError> {
        self.txn.open_table(ENTITIES)?.insert(
            (rec.dimension.as_str(), rec.value.as_str()),
            codec::encode(rec).as_slice(),
        )?;
        Ok(())
    }

    pub fn remove_entity(&mut self, dimension: &str, value: &str) -> Result<(), StoreError> {
        self.txn.open_table(ENTITIES)?.remove((dimension, value))?;
        Ok(())
    }

    /// Writes a limit's reset register, and the baseline of the epoch it opens (kept as
    /// history after a later reset replaces the register).
    pub fn put_reset(&mut self, limit: &str, reg: &ResetRegister) -> Result<(), StoreError> {
        self.txn
            .open_table(RESETS)?
            .insert(limit, codec::encode(reg).as_slice())?;
        self.txn
            .open_table(history::BASELINES)?
            .insert((limit, reg.period, reg.reset.hlc.0), reg.baseline)?;
        Ok(())
    }

    /// One pass of the history sweep: reads at most `rows_max` slot and baseline rows from
    /// where `cursor` stopped, deleting those of epochs `expired(limit, epoch)` lets go.
    /// Per limit (and origin) it goes from the oldest epoch and stops at the first it
    /// keeps. Returns the rows deleted.
    pub fn sweep_history(
        &mut self,
        cursor: &mut SweepCursor,
        rows_max: usize,
        expired: &mut dyn FnMut(&str, Epoch) -> bool,
    ) -> Result<usize, StoreError> {
        history::sweep(&self.txn, cursor, rows_max, expired)
    }

    /// Makes the whole batch durable (one fsync), then updates the dedup index.
    pub fn commit(self) -> Result<(), StoreError> {
        let first_row = self.store.dedup.next_row;
        if !self.new_ids.is_empty() {
            let mut log = self.txn.open_table(DEDUP_LOG)?;
            for (i, chunk) in self.new_ids.chunks(IDS_PER_ROW_MAX).enumerate() {
                log.insert(
                    first_row + i as u64,
                    codec::encode(&(self.new_expiry_ms, chunk)).as_slice(),
                )?;
            }
        }
        self.txn.commit()?;
        self.store.dedup.apply(self.dedup, &self.new_fps, first_row);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_core::{Hlc, LimitInput, LimitSpec, Metric, Version};

    fn epoch(p: i64) -> Epoch {
        Epoch {
            period: p,
            reset: 7,
        }
    }

    #[test]
    fn everything_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let limit = LimitRecord {
            id: "l1".into(),
            version: Version {
                hlc: Hlc(9),
                node: "a".into(),
            },
            spec: Some(LimitSpec {
                input: LimitInput {
                    scope: [("team".to_string(), "eng".to_string())].into(),
                    metric: Metric::Cost,
                    max: 5,
                    period: "1M".parse().unwrap(),
                    calendar_aligned: true,
                    timezone: "UTC".into(),
                },
                anchor_ms: 1,
                spec_gen: Hlc(9),
            }),
        };
        let reg = ResetRegister {
            spec_gen: Hlc(9),
            period: 3,
            reset: Version {
                hlc: Hlc(10),
                node: "a".into(),
            },
            baseline: 4,
        };
        {
            let mut s = Store::open(dir.path()).unwrap();
            assert_eq!(s.node_id(None, || "gen".into()).unwrap(), "gen");
            let mut b = s.batch().unwrap();
            b.put_limit(&limit).unwrap();
            b.put_reset("l1", &reg).unwrap();
            b.put_own_slot("l1", epoch(1), 10).unwrap();
            b.put_own_slot("l1", epoch(1), 12).unwrap();
            assert!(b.merge_peer_slot("b", "l1", epoch(1), 5).unwrap());
            assert!(!b.merge_peer_slot("b", "l1", epoch(1), 4).unwrap());
            b.dedup_insert("r1", 1_000).unwrap();
            assert!(b.dedup_contains("r1", 999).unwrap());
            assert!(!b.dedup_contains("r1", 1_000).unwrap(), "window ended");
            b.commit().unwrap();
        }
        let mut s = Store::open(dir.path()).unwrap();
        assert_eq!(s.node_id(Some("gen"), || unreachable!()).unwrap(), "gen");
        assert!(matches!(
            s.node_id(Some("other"), || unreachable!()),
            Err(StoreError::NodeIdMismatch { .. })
        ));
        let r = s.recover().unwrap();
        assert_eq!(r.limits, vec![limit]);
        assert_eq!(r.resets, vec![("l1".to_string(), reg)]);
        assert_eq!(r.own_slots, vec![("l1".to_string(), epoch(1), 12)]);
        assert_eq!(
            r.peer_slots,
            vec![("b".to_string(), "l1".to_string(), epoch(1), 5)]
        );
        assert_eq!(r.dedup_ids, 1);
        let mut b = s.batch().unwrap();
        assert_eq!(b.own_slot("l1", epoch(1)).unwrap(), 12);
        assert_eq!(b.dedup_expire(999, 100).unwrap(), 0);
        assert_eq!(b.dedup_expire(1_000, 100).unwrap(), 1);
        b.commit().unwrap();
        assert_eq!(s.recover().unwrap().dedup_ids, 0);
    }

    #[test]
    fn dedup_ids_are_exact_across_rows_restarts_and_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let n = IDS_PER_ROW_MAX * 2 + 7;
        {
            let mut s = Store::open(dir.path()).unwrap();
            let mut b = s.batch().unwrap();
            for i in 0..n {
                b.dedup_insert(&format!("a-{i}"), 1_000).unwrap();
            }
            assert!(
                b.dedup_contains("a-3", 0).unwrap(),
                "the batch sees its own ids"
            );
            b.commit().unwrap();
            let mut b = s.batch().unwrap();
            b.dedup_insert("b-0", 2_000).unwrap();
            b.commit().unwrap();
            // A failed (dropped) batch changes neither disk nor the index.
            let mut b = s.batch().unwrap();
            b.dedup_insert("c-0", 2_000).unwrap();
            drop(b);
            let mut b = s.batch().unwrap();
            assert_eq!(b.dedup_expire(1_500, usize::MAX).unwrap(), n);
            drop(b);
            let b = s.batch().unwrap();
            assert!(!b.dedup_contains("c-0", 0).unwrap());
            assert!(b.dedup_contains("a-0", 999).unwrap());
        }
        let mut s = Store::open(dir.path()).unwrap();
        assert_eq!(s.recover().unwrap().dedup_ids, n + 1);
        let mut b = s.batch().unwrap();
        for i in [0, IDS_PER_ROW_MAX, n - 1] {
            assert!(b.dedup_contains(&format!("a-{i}"), 999).unwrap());
        }
        assert!(!b.dedup_contains(&format!("a-{n}"), 999).unwrap());
        assert!(!b.dedup_contains("a-0", 1_000).unwrap(), "window ended");
        assert!(b.dedup_contains("b-0", 1_999).unwrap());
        // Expiry goes row by row, oldest first, and stops at a row still in its window.
        assert_eq!(b.dedup_expire(1_000, 1).unwrap(), IDS_PER_ROW_MAX);
        assert_eq!(
            b.dedup_expire(1_000, usize::MAX).unwrap(),
            n - IDS_PER_ROW_MAX
        );
        // An id re-used after its window is remembered again.
        b.dedup_insert("a-0", 3_000).unwrap();
        b.commit().unwrap();
        assert_eq!(s.recover().unwrap().dedup_ids, 2);
        let b = s.batch().unwrap();
        assert!(b.dedup_contains("a-0", 2_500).unwrap());
        assert!(!b.dedup_contains("a-1", 500).unwrap());
    }

    #[test]
    fn schema_1_dedup_ids_are_migrated() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Database::create(dir.path().join(DB_FILE)).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut meta = txn.open_table(META).unwrap();
                meta.insert("schema_version", "1").unwrap();
                let mut by_id = txn.open_table(V1_DEDUP).unwrap();
                let mut by_exp = txn.open_table(V1_DEDUP_EXPIRY).unwrap();
                for i in 0..600 {
                    let id = format!("old-{i}");
                    by_id.insert(id.as_str(), 5_000 + i).unwrap();
                    by_exp.insert((5_000 + i, id.as_str()), ()).unwrap();
                }
            }
            txn.commit().unwrap();
        }
        let mut s = Store::open(dir.path()).unwrap();
        assert_eq!(s.recover().unwrap().dedup_ids, 600);
        let b = s.batch().unwrap();
        assert!(b.dedup_contains("old-599", 5_598).unwrap());
        assert!(!b.dedup_contains("old-600", 0).unwrap());
        drop(b);
        let txn = s.db.begin_read().unwrap();
        assert!(txn.open_table(V1_DEDUP).is_err(), "old tables are gone");
        let meta = txn.open_table(META).unwrap();
        assert_eq!(meta.get("schema_version").unwrap().unwrap().value(), "3");
    }

    fn tiny() -> DedupOptions {
        DedupOptions {
            bucket_ids_min: 5,
            bucket_ids_max: 5,
            lossy_filter_bits: Some(3),
        }
    }

    /// Inserts `ids` in one commit, like the writer: an id already in its window is not
    /// inserted again.
    fn commit_ids(s: &mut Store, ids: &[String], expiry: i64, now: i64) -> Vec<bool> {
        let mut b = s.batch().unwrap();
        let applied = ids
            .iter()
            .map(|id| {
                let seen = b.dedup_contains(id, now).unwrap();
                if !seen {
                    b.dedup_insert(id, expiry).unwrap();
                }
                !seen
            })
            .collect();
        b.commit().unwrap();
        applied
    }

    fn maintain(s: &mut Store, now: i64, rows_max: usize) -> usize {
        let mut b = s.batch().unwrap();
        let n = b.dedup_expire(now, rows_max).unwrap();
        if b.dedup_dirty() {
            b.commit().unwrap();
        }
        n
    }

    #[test]
    fn schema_2_log_is_closed_into_buckets_on_first_start() {
        let dir = tempfile::tempdir().unwrap();
        let ids: Vec<String> = (0..2000).map(|i| format!("v2-{i}")).collect();
        {
            let db = Database::create(dir.path().join(DB_FILE)).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut meta = txn.open_table(META).unwrap();
                meta.insert("schema_version", "2").unwrap();
                let mut log = txn.open_table(DEDUP_LOG).unwrap();
                // Rows of 500 ids; the second row's window ends last.
                for (seq, chunk) in ids.chunks(500).enumerate() {
                    let expiry = [1_000i64, 5_000, 2_000, 3_000][seq];
                    log.insert(seq as u64, codec::encode(&(expiry, chunk)).as_slice())
                        .unwrap();
                }
            }
            txn.commit().unwrap();
        }
        let options = DedupOptions {
            bucket_ids_min: 700,
            bucket_ids_max: 700,
            lossy_filter_bits: None,
        };
        let mut s = Store::open_with(dir.path(), options.clone()).unwrap();
        // Rows 0-1 then 2-3 closed (1 000 ids each, the cap reached inside the row).
        assert_eq!(s.dedup.closed_buckets(), 2);
        assert_eq!(s.recover().unwrap().dedup_ids, 2000);
        let b = s.batch().unwrap();
        for (i, id) in ids.iter().enumerate() {
            let expiry = [1_000i64, 5_000, 2_000, 3_000][i / 500];
            assert!(b.dedup_contains(id, expiry - 1).unwrap(), "{id}");
            assert!(!b.dedup_contains(id, expiry).unwrap(), "{id}");
        }
        assert!(!b.dedup_contains("v2-2000", 0).unwrap());
        drop(b);
        {
            let txn = s.db.begin_read().unwrap();
            let meta = txn.open_table(META).unwrap();
            assert_eq!(meta.get("schema_version").unwrap().unwrap().value(), "3");
        }
        // The first bucket (window end 5 000) holds the second (3 000) back.
        assert_eq!(maintain(&mut s, 4_000, usize::MAX), 0);
        assert_eq!(maintain(&mut s, 5_000, usize::MAX), 2000);
        drop(s);
        let s = Store::open_with(dir.path(), options).unwrap();
        assert_eq!(s.recover().unwrap().dedup_ids, 0);
        let txn = s.db.begin_read().unwrap();
        assert_eq!(txn.open_table(DEDUP_LOG).unwrap().len().unwrap(), 0);
        assert_eq!(txn.open_table(dedup::RUNS).unwrap().len().unwrap(), 0);
        assert_eq!(txn.open_table(dedup::FILTERS).unwrap().len().unwrap(), 0);
    }

    /// A crash can stop the writer anywhere: after a commit of ids (the open bucket is in
    /// the log only), inside the transaction that closes a bucket (dropped: nothing of it
    /// happened), or with more open rows than a bucket holds (closed at load).
    #[test]
    fn dedup_index_is_rebuilt_exactly_after_a_crash_mid_bucket() {
        let dir = tempfile::tempdir().unwrap();
        let ids =
            |r: std::ops::Range<usize>| -> Vec<String> { r.map(|i| format!("c-{i}")).collect() };
        {
            let mut s = Store::open_with(dir.path(), tiny()).unwrap();
            assert_eq!(commit_ids(&mut s, &ids(0..3), 100, 0), vec![true; 3]);
            assert_eq!(commit_ids(&mut s, &ids(3..9), 200, 0), vec![true; 6]);
            // The closing transaction is built and then lost.
            let mut b = s.batch().unwrap();
            assert_eq!(b.dedup_expire(0, usize::MAX).unwrap(), 0);
            assert!(b.dedup_dirty());
            drop(b);
            assert_eq!(s.dedup.closed_buckets(), 0);
            assert_eq!(commit_ids(&mut s, &ids(6..12), 300, 0), {
                let mut v = vec![false; 3];
                v.extend([true; 3]);
                v
            });
            // The process dies here: nothing more is written.
        }
        // 12 ids in the open bucket: closed at load (cap 5) in one bucket of the rows
        // that reach the cap, the rest indexed as the open bucket.
        let mut s = Store::open_with(dir.path(), tiny()).unwrap();
        assert_eq!(s.recover().unwrap().dedup_ids, 12);
        assert_eq!(s.dedup.closed_buckets(), 1);
        let b = s.batch().unwrap();
        for (i, id) in ids(0..12).iter().enumerate() {
            let expiry = [100, 200, 300][(i >= 3) as usize + (i >= 9) as usize];
            assert!(b.dedup_contains(id, expiry - 1).unwrap(), "{id}");
            assert!(!b.dedup_contains(id, expiry).unwrap(), "{id}");
        }
        assert!(!b.dedup_contains("c-12", 0).unwrap());
        drop(b);
        // Three ids are short of a bucket: they stay open, and expire row by row once the
        // closed bucket before them is gone.
        assert_eq!(maintain(&mut s, 0, usize::MAX), 0);
        assert_eq!(s.dedup.closed_buckets(), 1);
        assert_eq!(maintain(&mut s, 299, usize::MAX), 9);
        assert_eq!(maintain(&mut s, 300, usize::MAX), 3);
        assert_eq!(s.recover().unwrap().dedup_ids, 0);
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Ids (from a small pool, so repeats and re-use after expiry happen) committed
        /// together, remembered for `ttl` after now.
        Commit(Vec<u8>, i64),
        /// The same, but the batch is lost (a failed commit or a crash).
        Lost(Vec<u8>, i64),
        /// Time passes; maintenance runs, deleting at most `rows_max` leftovers.
        Advance(i64, usize),
        Restart,
    }

    fn op() -> impl Strategy<Value = Op> {
        let ids = prop::collection::vec(0u8..40, 0..12);
        prop_oneof![
            4 => (ids.clone(), 1i64..60).prop_map(|(i, t)| Op::Commit(i, t)),
            1 => (ids, 1i64..60).prop_map(|(i, t)| Op::Lost(i, t)),
            3 => (0i64..25, 1usize..4).prop_map(|(d, r)| Op::Advance(d, r)),
            1 => Just(Op::Restart),
        ]
    }

    use proptest::prelude::*;
    use redb::ReadableTableMetadata;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// The dedup index answers exactly like a model of the log (every commit's ids
        /// with the commit's window end), through inserts, lookups, expiry, bucket
        /// closing, restarts and lost batches, with buckets of 3-6 ids and a filter of 8
        /// bits, so false positives are frequent and must be confirmed on disk.
        #[test]
        fn dedup_index_matches_a_model(ops in prop::collection::vec(op(), 1..40), cap in 3usize..7) {
            let dir = tempfile::tempdir().unwrap();
            let options = DedupOptions {
                bucket_ids_min: cap,
                bucket_ids_max: cap,
                lossy_filter_bits: Some(3),
            };
            let mut s = Store::open_with(dir.path(), options.clone()).unwrap();
            let mut model: Vec<(i64, Vec<String>)> = Vec::new();
            let knows = |model: &[(i64, Vec<String>)], id: &str, now: i64| {
                model.iter().any(|(e, ids)| *e > now && ids.iter().any(|i| i == id))
            };
            let mut now = 0i64;
            for op in ops {
                match op {
                    Op::Commit(pool, ttl) => {
                        let ids: Vec<String> = pool.iter().map(|i| format!("id-{i}")).collect();
                        let mut b = s.batch().unwrap();
                        let mut fresh = Vec::new();
                        for id in &ids {
                            let want = knows(&model, id, now) || fresh.contains(id);
                            prop_assert_eq!(b.dedup_contains(id, now).unwrap(), want, "{}", id);
                            if !want {
                                b.dedup_insert(id, now + ttl).unwrap();
                                fresh.push(id.clone());
                            }
                        }
                        b.commit().unwrap();
                        if !fresh.is_empty() {
                            model.push((now + ttl, fresh));
                        }
                    }
                    Op::Lost(pool, ttl) => {
                        let mut b = s.batch().unwrap();
                        for i in pool {
                            b.dedup_insert(&format!("id-{i}"), now + ttl).unwrap();
                        }
                        drop(b);
                        let mut b = s.batch().unwrap();
                        b.dedup_expire(now + 1_000, usize::MAX).unwrap();
                        drop(b);
                    }
                    Op::Advance(d, rows_max) => {
                        now += d;
                        maintain(&mut s, now, rows_max);
                    }
                    Op::Restart => {
                        drop(s);
                        s = Store::open_with(dir.path(), options.clone()).unwrap();
                    }
                }
                let b = s.batch().unwrap();
                for i in 0..40 {
                    let id = format!("id-{i}");
                    prop_assert_eq!(b.dedup_contains(&id, now).unwrap(), knows(&model, &id, now), "{} at {}", id, now);
                }
            }
            // Once every window has ended and maintenance has caught up, nothing is left.
            now += 1_000;
            for _ in 0..200 {
                maintain(&mut s, now, 3);
            }
            prop_assert_eq!(s.recover().unwrap().dedup_ids, 0);
            let txn = s.db.begin_read().unwrap();
            prop_assert_eq!(txn.open_table(DEDUP_LOG).unwrap().len().unwrap(), 0);
            prop_assert_eq!(txn.open_table(dedup::RUNS).unwrap().len().unwrap(), 0);
            prop_assert_eq!(txn.open_table(dedup::BUCKETS).unwrap().len().unwrap(), 0);
        }
    }

    #[test]
    fn uncommitted_batch_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        let mut b = s.batch().unwrap();
        b.put_own_slot("l", epoch(1), 3).unwrap();
        drop(b);
        assert!(s.recover().unwrap().own_slots.is_empty());
    }

    #[test]
    #[should_panic(expected = "would go down")]
    fn own_slots_never_decrease() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        let mut b = s.batch().unwrap();
        b.put_own_slot("l", epoch(1), 3).unwrap();
        b.put_own_slot("l", epoch(1), 2).unwrap();
    }
}
