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
//!
//! **The storage seam.** redb reads and writes through a `redb::StorageBackend`. In
//! production that is redb's file backend on `tally.redb` ([`Location::Dir`]), wrapped only
//! to mark a failed fsync; the simulator and tests put the same store on a
//! [`faults::FaultyDisk`] ([`Location::Simulated`]) that loses unsynced writes on a power
//! cut, fails syncs and fills up. Errors say which of these happened ([`StoreError`]),
//! because the node must react differently: a full disk is a state to leave (reopen when
//! there is space), a failed sync means the data may not be on disk (stop writing).

mod dedup;
pub mod faults;
mod history;

use std::fs::File;
use std::io;
use std::ops::Bound;
use std::path::{Path, PathBuf};

use redb::backends::FileBackend;
use redb::{
    BackendError, Builder, Database, Durability, ReadableDatabase, ReadableTable, StorageBackend,
    TableDefinition, TableHandle,
};
use tally_core::codec::{self, DecodeError, Record};
use tally_core::{
    DecommissionRecord, EntityRecord, Epoch, LimitRecord, PriceRecord, ResetRegister,
};

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
/// model → `PriceRecord` (prices per token, or a tombstone).
const PRICES: TableDefinition<&str, &[u8]> = TableDefinition::new("prices");
const DEDUP_LOG: TableDefinition<u64, &[u8]> = dedup::LOG;
/// Hard limits: (limit id, period, reset, to) → this node's total grant of rights to `to`.
const OWN_GRANTS: TableDefinition<(&str, i64, u64, &str), u64> = TableDefinition::new("own_grants");
/// Hard limits: (from, limit id, period, reset, to) → `from`'s grant to `to` as last heard.
const PEER_GRANTS: TableDefinition<(&str, &str, i64, u64, &str), u64> =
    TableDefinition::new("peer_grants");
/// node id → `DecommissionRecord`.
const DECOMMISSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("decommissions");
/// Written by a clean shutdown, removed by the next start: [`SHUTDOWN_KEY`] → the open
/// reservations (see [`ReservationRow`]). Its absence on a used store means the last run
/// did not stop cleanly.
const SHUTDOWN: TableDefinition<&str, &[u8]> = TableDefinition::new("shutdown");
const SHUTDOWN_KEY: &str = "reservations";

/// An open reservation's hold on a hard limit, kept across a clean restart:
/// (reservation id, limit id, period, reset, amount, expires at ms).
pub type ReservationRow = (String, String, i64, u64, u64, i64);
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
    Dir { path: PathBuf, source: io::Error },
    /// The disk is full. Nothing of the failed transaction was acknowledged; redb refuses
    /// every operation after an I/O error, so the store must be opened again
    /// ([`Store::open_at`]) once there is space.
    #[error(
        "the disk holding the data directory is full ({0}); free space on it: writes resume by themselves once there is room"
    )]
    NoSpace(redb::Error),
    /// A sync (fsync) failed: what was written since the last successful sync may not be on
    /// disk, and the page cache may no longer match it (PostgreSQL's fsyncgate). Writing on
    /// would build on data that may not exist.
    #[error(
        "the disk failed to sync the database ({0}); writes since the last successful sync may be lost. Check the disk (kernel log), then restart tally so it recovers what is durable"
    )]
    SyncFailed(redb::Error),
    /// Another I/O error: the disk cannot be trusted either.
    #[error(
        "I/O error on the database ({0}); check the disk (kernel log), then restart tally so it recovers what is durable"
    )]
    Io(redb::Error),
    /// The disk no longer holds what it acknowledged as synced (found by the node when it
    /// compares memory with a store it opened again).
    #[error(
        "the disk lost data it had acknowledged as written ({0}); check the disk (kernel log), then restart tally so it recovers what is durable"
    )]
    Lost(String),
    #[error("database error: {0}; the data directory may be read-only or in use by another tally")]
    Db(redb::Error),
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

impl From<redb::Error> for StoreError {
    /// Sorts redb's errors by what the node must do about them.
    fn from(e: redb::Error) -> Self {
        match &e {
            redb::Error::Io(io) if is_sync_failure(io) => StoreError::SyncFailed(e),
            redb::Error::Io(io) if is_no_space(io) => StoreError::NoSpace(e),
            // PreviousIo: an earlier I/O error poisoned the database; without knowing which,
            // assume the worst.
            redb::Error::Io(_) | redb::Error::PreviousIo => StoreError::Io(e),
            _ => StoreError::Db(e),
        }
    }
}

/// What a failed operation means for the store, and so for the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// Only this transaction failed; nothing of it is durable and the store is usable.
    Transaction,
    /// The store cannot write now (the disk is full, or the directory cannot be opened):
    /// drop it and open it again later ([`Store::open_at`]); what was synced is safe.
    Unavailable,
    /// The disk may have lost or changed what it acknowledged (a failed sync, an I/O
    /// error, corruption): nothing written from now on can be trusted. Stop writing.
    Untrusted,
}

impl StoreError {
    /// The disk has no room (yet): what a look for room ([`has_room`]) that found none means.
    pub fn no_room() -> StoreError {
        StoreError::NoSpace(redb::Error::Io(io::Error::new(
            io::ErrorKind::StorageFull,
            "no room on the disk yet",
        )))
    }

    pub fn fault(&self) -> Fault {
        match self {
            StoreError::NoSpace(_) | StoreError::Dir { .. } => Fault::Unavailable,
            StoreError::SyncFailed(_)
            | StoreError::Io(_)
            | StoreError::Corrupt { .. }
            | StoreError::CorruptDedup { .. }
            | StoreError::Lost(_)
            | StoreError::Db(redb::Error::Corrupted(_))
            | StoreError::Schema { .. }
            | StoreError::NodeIdMismatch { .. } => Fault::Untrusted,
            StoreError::Db(_) => Fault::Transaction,
        }
    }
}

/// Whether the disk under `location` has `bytes` free, found out cheaply, without
/// opening the database (after a full disk, every open of a database that was not closed
/// cleanly re-checks the whole file). In a directory: writes a probe file of that size
/// and removes it (file systems allocate or reserve blocks at write time).
pub fn has_room(location: &Location, bytes: u64) -> io::Result<bool> {
    match location {
        Location::Dir(dir) => {
            let probe = dir.join("tally.space-probe");
            let written = (|| {
                let mut f = File::create(&probe)?;
                let chunk = vec![0u8; 64 * 1024];
                let mut left = bytes;
                while left > 0 {
                    let n = left.min(chunk.len() as u64) as usize;
                    io::Write::write_all(&mut f, &chunk[..n])?;
                    left -= n as u64;
                }
                Ok(())
            })();
            let _ = std::fs::remove_file(&probe);
            match written {
                Ok(()) => Ok(true),
                Err(e) if is_no_space(&e) => Ok(false),
                Err(e) => Err(e),
            }
        }
        Location::Simulated(mount) => Ok(mount.disk().free_bytes() >= bytes),
    }
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                redb::Error::from(e).into()
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

/// Out of space: ENOSPC, or EDQUOT (a quota is a full disk for this process).
fn is_no_space(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

/// Marks an error as coming from a sync: a failed write can be retried, a failed sync
/// cannot (the kernel may have dropped the dirty pages it could not write).
#[derive(Debug)]
struct SyncFailure(io::Error);

impl std::fmt::Display for SyncFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sync failed: {}", self.0)
    }
}

impl std::error::Error for SyncFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// Wraps the error of a failed sync so [`StoreError`] can tell it apart (its kind is kept).
pub(crate) fn sync_failed(e: io::Error) -> io::Error {
    io::Error::new(e.kind(), SyncFailure(e))
}

pub(crate) fn is_sync_failure(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|i| i.is::<SyncFailure>())
}

/// redb's file backend, unchanged except that a failed `sync_data` is marked
/// ([`sync_failed`]). Static dispatch and one branch on the error path: production pays
/// nothing for the seam.
#[derive(Debug)]
struct FileDisk(FileBackend);

impl StorageBackend for FileDisk {
    fn len(&self) -> io::Result<u64> {
        self.0.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.0.read(offset, out)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data().map_err(sync_failed)
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.write(offset, data)
    }
    fn close(&self) -> io::Result<()> {
        self.0.close()
    }
    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.0.try_lock_range(start, end)
    }
    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.0.try_lock_shared_range(start, end)
    }
    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.0.lock_range(start, end)
    }
    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.0.lock_shared_range(start, end)
    }
    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.0.unlock_range(start, end)
    }
    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.0.query_lock_range(start, end)
    }
}

/// Where a store keeps its database.
#[derive(Debug, Clone)]
pub enum Location {
    /// [`DB_FILE`] in this directory on the real file system (production).
    Dir(PathBuf),
    /// A simulated disk that loses, refuses and fills ([`faults`]): simulator and tests.
    Simulated(faults::Mount),
}

/// fsyncs a directory, so the entries created in it survive a crash.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` (and missing parents) so that it survives a crash: every directory created
/// here is fsynced, and so is the existing ancestor that got the first new entry.
fn create_dir_durably(dir: &Path) -> io::Result<()> {
    create_dir_syncing(dir, sync_dir)
}

/// [`create_dir_durably`] with the fsync passed in (tests record what it syncs).
fn create_dir_syncing(dir: &Path, mut sync: impl FnMut(&Path) -> io::Result<()>) -> io::Result<()> {
    let mut created = Vec::new();
    let mut p = dir;
    while !p.as_os_str().is_empty() && !p.exists() {
        created.push(p.to_path_buf());
        match p.parent() {
            Some(parent) => p = parent,
            None => break,
        }
    }
    if created.is_empty() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    let top = created.last().expect("not empty");
    match top.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => sync(parent)?,
        _ => sync(Path::new("."))?,
    }
    for d in created.iter().rev() {
        sync(d)?;
    }
    Ok(())
}

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
    /// (limit id, epoch, to, total) of this node's grants.
    pub own_grants: Vec<(String, Epoch, String, u64)>,
    /// (from, limit id, epoch, to, total) of other nodes' grants.
    pub peer_grants: Vec<(String, String, Epoch, String, u64)>,
    pub decommissions: Vec<DecommissionRecord>,
    pub prices: Vec<PriceRecord>,
    /// The reservations a clean shutdown left; `None` if the last run did not stop
    /// cleanly (or never ran).
    pub clean_shutdown: Option<Vec<ReservationRow>>,
    /// Nothing was ever written: no limit, entity, slot or grant.
    pub fresh: bool,
}

/// The durable store of one node.
pub struct Store {
    db: Database,
    path: PathBuf,
    dedup: DedupIndex,
}

impl Store {
    /// Opens (or creates) the store in `dir` on the real file system.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Store::open_at(&Location::Dir(dir.to_path_buf()))
    }

    /// Opens (or creates) the store. In a directory, tally creates the directory (and its
    /// missing parents) durably, and fsyncs it after creating the database file, so neither
    /// vanishes in a crash right after start-up.
    ///
    /// Opening a current database writes nothing of tally's (only redb's own recovery
    /// after a crash, or closing an oversized dedup bucket, may write), so a node can start
    /// on a full disk and answer checks.
    pub fn open_at(location: &Location) -> Result<Store, StoreError> {
        Store::open_at_with(location, DedupOptions::default())
    }

    #[cfg(test)]
    fn open_with(dir: &Path, options: DedupOptions) -> Result<Store, StoreError> {
        Store::open_at_with(&Location::Dir(dir.to_path_buf()), options)
    }

    fn open_at_with(location: &Location, options: DedupOptions) -> Result<Store, StoreError> {
        // redb caches pages it wrote and read up to this size (1 GiB by default), which
        // would be most of a node's memory; the hot pages (log tail, slot tables) fit.
        let mut builder = Builder::new();
        builder.set_cache_size(CACHE_BYTES);
        let (db, path) = match location {
            Location::Dir(dir) => {
                let dir_err = |source| StoreError::Dir {
                    path: dir.clone(),
                    source,
                };
                create_dir_durably(dir).map_err(dir_err)?;
                let path = dir.join(DB_FILE);
                let existed = path.exists();
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&path)
                    .map_err(dir_err)?;
                if !existed {
                    sync_dir(dir).map_err(dir_err)?;
                }
                let backend = FileDisk(FileBackend::new(file)?);
                (builder.create_with_backend(backend)?, path)
            }
            Location::Simulated(mount) => {
                let backend = mount.backend().map_err(|source| StoreError::Dir {
                    path: PathBuf::from("(simulated disk)"),
                    source,
                })?;
                let db = builder.create_with_backend(backend)?;
                (db, PathBuf::from("(simulated disk)").join(DB_FILE))
            }
        };
        // Opening a current store writes nothing: a bucket left open past its size (the
        // disk was full when maintenance should have closed it) stays open in memory until
        // the writer closes it. After a migration, buckets are closed while loading, so a
        // whole migrated log never sits in the open bucket's memory.
        let (hasher, open_row, migrated) = match ready_tables(&db)? {
            Some((hasher, open_row)) => (hasher, open_row, false),
            None => {
                let (hasher, open_row) = init_tables(&db)?;
                (hasher, open_row, true)
            }
        };
        let dedup = DedupIndex::load(&db, hasher, open_row, options, migrated)?;
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
        // Read first: a restart writes nothing (see `open_at`).
        {
            let txn = self.db.begin_read()?;
            let stored = txn
                .open_table(META)?
                .get("node_id")?
                .map(|v| v.value().to_string());
            match (stored, requested) {
                (Some(s), Some(r)) if s != r => {
                    return Err(StoreError::NodeIdMismatch {
                        stored: s,
                        requested: r.to_string(),
                    });
                }
                (Some(s), _) => return Ok(s),
                (None, _) => {}
            }
        }
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
            out.limits
                .push(LimitRecord::from_bytes(v.value()).map_err(|source| {
                    StoreError::Corrupt {
                        table: "limits",
                        source,
                    }
                })?);
        }
        for row in txn.open_table(ENTITIES)?.iter()? {
            let (_, v) = row?;
            out.entities
                .push(EntityRecord::from_bytes(v.value()).map_err(|source| {
                    StoreError::Corrupt {
                        table: "entities",
                        source,
                    }
                })?);
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
        for row in txn.open_table(OWN_GRANTS)?.iter()? {
            let (k, v) = row?;
            let (limit, period, reset, to) = k.value();
            out.own_grants.push((
                limit.to_string(),
                Epoch { period, reset },
                to.to_string(),
                v.value(),
            ));
        }
        for row in txn.open_table(PEER_GRANTS)?.iter()? {
            let (k, v) = row?;
            let (from, limit, period, reset, to) = k.value();
            out.peer_grants.push((
                from.to_string(),
                limit.to_string(),
                Epoch { period, reset },
                to.to_string(),
                v.value(),
            ));
        }
        for row in txn.open_table(DECOMMISSIONS)?.iter()? {
            let (_, v) = row?;
            out.decommissions
                .push(DecommissionRecord::from_bytes(v.value()).map_err(|source| {
                    StoreError::Corrupt {
                        table: "decommissions",
                        source,
                    }
                })?);
        }
        for row in txn.open_table(PRICES)?.iter()? {
            let (_, v) = row?;
            out.prices
                .push(PriceRecord::from_bytes(v.value()).map_err(|source| {
                    StoreError::Corrupt {
                        table: "prices",
                        source,
                    }
                })?);
        }
        if let Some(v) = txn.open_table(SHUTDOWN)?.get(SHUTDOWN_KEY)? {
            out.clean_shutdown =
                Some(
                    codec::decode(v.value()).map_err(|source| StoreError::Corrupt {
                        table: "shutdown",
                        source,
                    })?,
                );
        }
        out.fresh = out.limits.is_empty()
            && out.entities.is_empty()
            && out.prices.is_empty()
            && out.own_slots.is_empty()
            && out.peer_slots.is_empty()
            && out.own_grants.is_empty();
        out.dedup_ids = self.dedup.len();
        out.dedup_bytes = self.dedup.heap_bytes();
        Ok(out)
    }

    /// A small durable commit: after the store was opened again, shows there is room to
    /// write and makes everything it read durable before the node trusts it.
    pub fn probe(&mut self) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        {
            let mut meta = txn.open_table(META)?;
            let n: u64 = meta
                .get("probes")?
                .and_then(|v| v.value().parse().ok())
                .unwrap_or(0);
            meta.insert("probes", (n + 1).to_string().as_str())?;
        }
        txn.commit()?;
        Ok(())
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
/// The dedup key and open row when the schema is current and every table exists, read
/// without writing (so opening on a full disk works); `None` when `init_tables` must run.
fn ready_tables(db: &Database) -> Result<Option<(IdHasher, u64)>, StoreError> {
    let txn = db.begin_read()?;
    let meta = match txn.open_table(META) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    if meta
        .get("schema_version")?
        .map(|v| v.value() == SCHEMA_VERSION)
        != Some(true)
    {
        return Ok(None);
    }
    let Some(key) = meta.get(dedup::META_KEY)?.map(|v| v.value().to_string()) else {
        return Ok(None);
    };
    let hasher = IdHasher::from_hex(&key).ok_or_else(|| StoreError::CorruptDedup {
        table: "meta",
        what: format!("{} {key:?}", dedup::META_KEY),
    })?;
    let open_row = match meta.get(dedup::META_OPEN_ROW)? {
        Some(v) => v.value().parse().map_err(|_| StoreError::CorruptDedup {
            table: "meta",
            what: format!("{} {:?}", dedup::META_OPEN_ROW, v.value()),
        })?,
        None => 0,
    };
    let present: Vec<String> = txn.list_tables()?.map(|t| t.name().to_string()).collect();
    let all = [
        OWN_SLOTS.name(),
        PEER_SLOTS.name(),
        LIMITS.name(),
        ENTITIES.name(),
        RESETS.name(),
        DEDUP_LOG.name(),
        dedup::BUCKETS.name(),
        dedup::FILTERS.name(),
        dedup::RUNS.name(),
        history::BASELINES.name(),
        OWN_GRANTS.name(),
        PEER_GRANTS.name(),
        DECOMMISSIONS.name(),
        SHUTDOWN.name(),
        PRICES.name(),
    ];
    let ready = all.iter().all(|name| present.iter().any(|p| p == name));
    Ok(ready.then_some((hasher, open_row)))
}

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
    txn.open_table(OWN_GRANTS)?;
    txn.open_table(PEER_GRANTS)?;
    txn.open_table(DECOMMISSIONS)?;
    txn.open_table(PRICES)?;
    txn.open_table(SHUTDOWN)?;
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
    /// Raises this node's total grant to `to` (never lowers it: grants only grow).
    pub fn put_own_grant(
        &mut self,
        limit: &str,
        epoch: Epoch,
        to: &str,
        total: u64,
    ) -> Result<(), StoreError> {
        let mut t = self.txn.open_table(OWN_GRANTS)?;
        let old = t
            .insert((limit, epoch.period, epoch.reset, to), total)?
            .map(|v| v.value());
        assert!(
            old.is_none_or(|o| o <= total),
            "own grant {limit} {epoch} to {to} would go down from {old:?} to {total}"
        );
        Ok(())
    }

    /// Keeps the larger of the stored and given grant of `from` to `to`; whether it rose.
    pub fn merge_peer_grant(
        &mut self,
        from: &str,
        limit: &str,
        epoch: Epoch,
        to: &str,
        total: u64,
    ) -> Result<bool, StoreError> {
        let mut t = self.txn.open_table(PEER_GRANTS)?;
        let key = (from, limit, epoch.period, epoch.reset, to);
        let old = t.get(key)?.map_or(0, |v| v.value());
        if total > old {
            t.insert(key, total)?;
            return Ok(true);
        }
        Ok(false)
    }

    pub fn put_decommission(&mut self, rec: &DecommissionRecord) -> Result<(), StoreError> {
        self.txn
            .open_table(DECOMMISSIONS)?
            .insert(rec.node.as_str(), rec.to_bytes().as_slice())?;
        Ok(())
    }

    /// Marks a clean shutdown, keeping the open reservations.
    pub fn put_clean_shutdown(&mut self, rows: &[ReservationRow]) -> Result<(), StoreError> {
        self.txn
            .open_table(SHUTDOWN)?
            .insert(SHUTDOWN_KEY, codec::encode(&rows).as_slice())?;
        Ok(())
    }

    /// Removes the clean-shutdown mark: from now on this run is the one that must stop
    /// cleanly. Whether there was one.
    pub fn clear_clean_shutdown(&mut self) -> Result<bool, StoreError> {
        Ok(self
            .txn
            .open_table(SHUTDOWN)?
            .remove(SHUTDOWN_KEY)?
            .is_some())
    }

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
            .insert(rec.id.as_str(), rec.to_bytes().as_slice())?;
        Ok(())
    }

    pub fn remove_limit(&mut self, id: &str) -> Result<(), StoreError> {
        self.txn.open_table(LIMITS)?.remove(id)?;
        Ok(())
    }

    pub fn put_entity(&mut self, rec: &EntityRecord) -> Result<(), StoreError> {
        self.txn.open_table(ENTITIES)?.insert(
            (rec.dimension.as_str(), rec.value.as_str()),
            rec.to_bytes().as_slice(),
        )?;
        Ok(())
    }

    pub fn put_price(&mut self, rec: &PriceRecord) -> Result<(), StoreError> {
        self.txn
            .open_table(PRICES)?
            .insert(rec.model.as_str(), rec.to_bytes().as_slice())?;
        Ok(())
    }

    pub fn remove_price(&mut self, model: &str) -> Result<(), StoreError> {
        self.txn.open_table(PRICES)?.remove(model)?;
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

    /// A data directory tally creates survives a crash: the existing parent that got the
    /// new entry is fsynced, then each created directory, outermost first; an existing
    /// directory is not touched.
    #[test]
    fn created_data_dir_is_synced_in_its_parent() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a").join("b");
        let mut synced = Vec::new();
        create_dir_syncing(&dir, |p| {
            synced.push(p.to_path_buf());
            Ok(())
        })
        .unwrap();
        assert!(dir.is_dir());
        assert_eq!(
            synced,
            [tmp.path().to_path_buf(), tmp.path().join("a"), dir.clone()]
        );
        synced.clear();
        create_dir_syncing(&dir, |p| {
            synced.push(p.to_path_buf());
            Ok(())
        })
        .unwrap();
        assert_eq!(synced, Vec::<PathBuf>::new(), "existing directory");
        // The real fsync works on these directories too.
        create_dir_durably(&tmp.path().join("c")).unwrap();
    }

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
                    mode: Default::default(),
                    members: Vec::new(),
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
        // 12 ids in the open bucket, more than it holds (cap 5): opening writes nothing
        // (a node may restart on a full disk), so they stay open until maintenance.
        let mut s = Store::open_with(dir.path(), tiny()).unwrap();
        assert_eq!(s.recover().unwrap().dedup_ids, 12);
        assert_eq!(s.dedup.closed_buckets(), 0);
        let b = s.batch().unwrap();
        for (i, id) in ids(0..12).iter().enumerate() {
            let expiry = [100, 200, 300][(i >= 3) as usize + (i >= 9) as usize];
            assert!(b.dedup_contains(id, expiry - 1).unwrap(), "{id}");
            assert!(!b.dedup_contains(id, expiry).unwrap(), "{id}");
        }
        assert!(!b.dedup_contains("c-12", 0).unwrap());
        drop(b);
        // The first maintenance closes them into one bucket, which expires whole once the
        // window of its newest id has ended.
        assert_eq!(maintain(&mut s, 0, usize::MAX), 0);
        assert_eq!(s.dedup.closed_buckets(), 1);
        assert_eq!(maintain(&mut s, 299, usize::MAX), 0);
        assert_eq!(maintain(&mut s, 300, usize::MAX), 12);
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

    // ----- the storage seam: the real store on a disk that loses, refuses and fills ----

    use crate::faults::{FaultyDisk, PowerLoss};

    fn on(disk: &FaultyDisk) -> Result<Store, StoreError> {
        Store::open_at(&Location::Simulated(disk.mount()))
    }

    /// One group commit: the slot goes to `v` and record id `id-v` is remembered.
    fn commit_slot(s: &mut Store, v: u64) -> Result<(), StoreError> {
        let mut b = s.batch()?;
        b.put_own_slot("l", epoch(1), v)?;
        b.dedup_insert(&format!("id-{v}"), i64::MAX)?;
        b.commit()
    }

    /// (own slot, dedup ids) as recovered.
    fn durable(s: &Store) -> (u64, usize) {
        let r = s.recover().unwrap();
        let slot = r.own_slots.iter().map(|(_, _, v)| *v).max().unwrap_or(0);
        (slot, r.dedup_ids)
    }

    #[test]
    fn nested_data_dirs_are_created() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a/b/c");
        let mut s = Store::open(&dir).unwrap();
        commit_slot(&mut s, 1).unwrap();
        drop(s);
        assert_eq!(durable(&Store::open(&dir).unwrap()), (1, 1));
    }

    #[test]
    fn a_power_loss_keeps_every_commit_and_nothing_of_a_failed_sync() {
        let disk = FaultyDisk::new();
        let mut s = on(&disk).unwrap();
        s.node_id(Some("a"), || unreachable!()).unwrap();
        commit_slot(&mut s, 1).unwrap();
        commit_slot(&mut s, 2).unwrap();
        disk.fail_syncs(Some(1));
        let e = commit_slot(&mut s, 3).unwrap_err();
        assert!(matches!(e, StoreError::SyncFailed(_)), "{e}");
        assert!(e.to_string().contains("restart tally"), "{e}");
        // redb refuses everything after an I/O error.
        assert!(matches!(s.batch().err(), Some(StoreError::Io(_))));
        drop(s);
        disk.power_loss(PowerLoss::DropUnsynced);
        let s = on(&disk).unwrap();
        assert_eq!(durable(&s), (2, 2));
        assert_eq!(s.node_id(None, || unreachable!()).unwrap(), "a");
    }

    #[test]
    fn every_torn_commit_recovers_to_the_previous_or_the_new_state() {
        let disk = FaultyDisk::new();
        let mut s = on(&disk).unwrap();
        commit_slot(&mut s, 1).unwrap();
        commit_slot(&mut s, 2).unwrap();
        disk.fail_syncs(Some(1));
        assert!(matches!(
            commit_slot(&mut s, 3),
            Err(StoreError::SyncFailed(_))
        ));
        drop(s);
        let n = disk.stats().unsynced_changes;
        assert!(n >= 2, "a commit writes pages and a header: {n} changes");
        let mut outcomes = Vec::new();
        for k in 0..=n {
            for torn in [0, 1, 17, 512, 4095, usize::MAX] {
                let d = disk.duplicate();
                d.power_loss(PowerLoss::Partial {
                    changes: k,
                    torn_bytes: torn,
                });
                let s =
                    on(&d).unwrap_or_else(|e| panic!("{k} of {n} changes, torn at {torn}: {e}"));
                // The slot and its record id commit together (I2): both or neither.
                let got = durable(&s);
                assert!(
                    got == (2, 2) || got == (3, 3),
                    "{k} of {n} changes, torn at {torn}: {got:?}"
                );
                outcomes.push(got.0);
            }
        }
        assert_eq!(
            outcomes.first(),
            Some(&2),
            "nothing of the commit reached the disk"
        );
        assert_eq!(outcomes.last(), Some(&3), "all of it did");
    }

    #[test]
    fn a_full_disk_fails_a_commit_and_the_store_reopens_once_space_returns() {
        let disk = FaultyDisk::new();
        let mut s = on(&disk).unwrap();
        commit_slot(&mut s, 1).unwrap();
        disk.fill();
        // Commits go on while redb reuses its free pages; one needs a new block.
        let mut v = 2;
        let e = loop {
            match commit_slot(&mut s, v) {
                Ok(()) => v += 1,
                Err(e) => break e,
            }
            assert!(v < 100_000, "the disk never filled");
        };
        assert!(matches!(e, StoreError::NoSpace(_)), "{e}");
        assert!(e.to_string().contains("resume by themselves"), "{e}");
        assert!(disk.stats().writes_refused > 0);
        assert!(matches!(s.batch().err(), Some(StoreError::Io(_))));
        drop(s);
        // Still full: the store opens (reads need no space), commits still fail.
        let mut s = on(&disk).unwrap();
        assert_eq!(durable(&s), (v - 1, (v - 1) as usize));
        assert!(matches!(
            commit_slot(&mut s, v),
            Err(StoreError::NoSpace(_))
        ));
        drop(s);
        disk.set_capacity(u64::MAX);
        let mut s = on(&disk).unwrap();
        assert_eq!(durable(&s), (v - 1, (v - 1) as usize));
        commit_slot(&mut s, v).unwrap();
        drop(s);
        disk.power_loss(PowerLoss::DropUnsynced);
        assert_eq!(durable(&on(&disk).unwrap()), (v, v as usize));
    }

    #[test]
    fn a_second_store_on_the_same_disk_is_refused() {
        let disk = FaultyDisk::new();
        let _s = on(&disk).unwrap();
        assert!(matches!(on(&disk), Err(StoreError::Dir { .. })));
    }
}
