//! tally-store: everything tally keeps on disk, in one redb file (DESIGN.md §4).
//!
//! Tables: `meta` (node id, schema version), `own_slots` and `peer_slots` (G-counter slots
//! of this node and of every other origin it has heard of, so a restart cannot under-count;
//! closed epochs stay here as history), `limits`, `entities` and `resets` (config registers,
//! encoded by `tally_core::codec`), and `dedup` / `dedup_expiry` (idempotency ids until
//! their window ends).
//!
//! This crate only knows redb. It does not decide anything: the node's writer opens one
//! [`Batch`] per group commit, writes what tally-core decided, and commits durably (one
//! fsync for the whole batch). Only this crate touches redb.

use std::fs::File;
use std::path::{Path, PathBuf};

use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};
use tally_core::codec::{self, DecodeError};
use tally_core::{EntityRecord, Epoch, LimitRecord, ResetRegister};

const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
/// (limit id, period, reset) → this node's slot.
const OWN_SLOTS: TableDefinition<(&str, i64, u64), u64> = TableDefinition::new("own_slots");
/// (origin node id, limit id, period, reset) → that origin's slot as last heard.
const PEER_SLOTS: TableDefinition<(&str, &str, i64, u64), u64> = TableDefinition::new("peer_slots");
const LIMITS: TableDefinition<&str, &[u8]> = TableDefinition::new("limits");
const ENTITIES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("entities");
const RESETS: TableDefinition<&str, &[u8]> = TableDefinition::new("resets");
/// Record id → when its dedup window ends (Unix ms).
const DEDUP: TableDefinition<&str, i64> = TableDefinition::new("dedup");
/// (expiry ms, record id) → (): the same ids ordered by expiry, for cheap expiry.
const DEDUP_EXPIRY: TableDefinition<(i64, &str), ()> = TableDefinition::new("dedup_expiry");

const SCHEMA_VERSION: &str = "1";
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
}

/// The durable store of one node.
pub struct Store {
    db: Database,
    path: PathBuf,
}

impl Store {
    /// Opens (or creates) the store in `dir`. On first creation the directory entry is
    /// fsynced, so the new file survives a crash right after start-up.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let dir_err = |source| StoreError::Dir {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(dir_err)?;
        let path = dir.join(DB_FILE);
        let existed = path.exists();
        let db = Database::create(&path)?;
        if !existed {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(dir_err)?;
        }
        let store = Store { db, path };
        store.init_tables()?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn init_tables(&self) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        {
            let mut meta = txn.open_table(META)?;
            let found = meta.get("schema_version")?.map(|v| v.value().to_string());
            match found {
                Some(v) if v != SCHEMA_VERSION => return Err(StoreError::Schema { found: v }),
                Some(_) => {}
                None => {
                    meta.insert("schema_version", SCHEMA_VERSION)?;
                }
            }
            txn.open_table(OWN_SLOTS)?;
            txn.open_table(PEER_SLOTS)?;
            txn.open_table(LIMITS)?;
            txn.open_table(ENTITIES)?;
            txn.open_table(RESETS)?;
            txn.open_table(DEDUP)?;
            txn.open_table(DEDUP_EXPIRY)?;
        }
        txn.commit()?;
        Ok(())
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
        out.dedup_ids = txn.open_table(DEDUP)?.len()? as usize;
        Ok(out)
    }

    /// Starts one group-commit batch.
    pub fn batch(&self) -> Result<Batch, StoreError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        Ok(Batch { txn })
    }
}

/// One durable write transaction: everything written through it becomes durable together
/// at [`Batch::commit`], with one fsync.
pub struct Batch {
    txn: redb::WriteTransaction,
}

impl Batch {
    /// Whether `id` is inside its dedup window (I2).
    pub fn dedup_contains(&self, id: &str, now_ms: i64) -> Result<bool, StoreError> {
        let t = self.txn.open_table(DEDUP)?;
        Ok(t.get(id)?.is_some_and(|exp| exp.value() > now_ms))
    }

    pub fn dedup_insert(&mut self, id: &str, expiry_ms: i64) -> Result<(), StoreError> {
        let old = self
            .txn
            .open_table(DEDUP)?
            .insert(id, expiry_ms)?
            .map(|v| v.value());
        let mut by_expiry = self.txn.open_table(DEDUP_EXPIRY)?;
        if let Some(old) = old {
            // A re-used id past its window: drop its old expiry entry.
            by_expiry.remove((old, id))?;
        }
        by_expiry.insert((expiry_ms, id), ())?;
        Ok(())
    }

    /// Forgets ids whose window ended at or before `now_ms`, at most `max` of them.
    pub fn dedup_expire(&mut self, now_ms: i64, max: usize) -> Result<usize, StoreError> {
        let mut expired: Vec<(i64, String)> = Vec::new();
        {
            let t = self.txn.open_table(DEDUP_EXPIRY)?;
            for row in t.range(..(now_ms + 1, ""))? {
                let (k, _) = row?;
                let (exp, id) = k.value();
                if exp > now_ms {
                    break;
                }
                expired.push((exp, id.to_string()));
                if expired.len() >= max {
                    break;
                }
            }
        }
        let mut by_expiry = self.txn.open_table(DEDUP_EXPIRY)?;
        let mut by_id = self.txn.open_table(DEDUP)?;
        for (exp, id) in &expired {
            by_expiry.remove((*exp, id.as_str()))?;
            if by_id.get(id.as_str())?.is_some_and(|e| e.value() == *exp) {
                by_id.remove(id.as_str())?;
            }
        }
        Ok(expired.len())
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

    pub fn put_reset(&mut self, limit: &str, reg: &ResetRegister) -> Result<(), StoreError> {
        self.txn
            .open_table(RESETS)?
            .insert(limit, codec::encode(reg).as_slice())?;
        Ok(())
    }

    /// Makes the whole batch durable (one fsync).
    pub fn commit(self) -> Result<(), StoreError> {
        self.txn.commit()?;
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
            let s = Store::open(dir.path()).unwrap();
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
        let s = Store::open(dir.path()).unwrap();
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
    fn uncommitted_batch_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let mut b = s.batch().unwrap();
        b.put_own_slot("l", epoch(1), 3).unwrap();
        drop(b);
        assert!(s.recover().unwrap().own_slots.is_empty());
    }

    #[test]
    #[should_panic(expected = "would go down")]
    fn own_slots_never_decrease() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let mut b = s.batch().unwrap();
        b.put_own_slot("l", epoch(1), 3).unwrap();
        b.put_own_slot("l", epoch(1), 2).unwrap();
    }
}
