//! The single writer: group commit of records and config changes (DESIGN.md §4).
//!
//! Records are planned against memory, written to one redb transaction together with their
//! dedup ids, committed with one fsync, and only then applied to memory and acknowledged.
//! A config change is committed in a transaction of its own (after the records queued
//! before it), so each change sees the ones before it. If a commit fails, nothing of that
//! batch reaches memory and every caller gets `StorageFailed` or `DiskFull`.
//!
//! **Storage faults** (ARCHITECTURE.md, "Storage faults"). What a failed commit means
//! depends on why it failed ([`tally_store::Fault`]):
//! - *The disk is full*: redb refuses every operation after an I/O error, so the writer
//!   closes the store and refuses writes with `DiskFull` while checks go on answering
//!   from memory. It opens the store again, with back-off, once the disk has room, makes
//!   memory agree with what is on disk (a refused commit may have reached the disk: its
//!   records were never acknowledged, and their ids are now remembered), merges the values
//!   from peers it had to defer, and writes again: no restart.
//! - *A sync failed, or another I/O error*: what the disk acknowledged may not be on it,
//!   and the page cache may not match it (PostgreSQL's fsyncgate). Retrying would build on
//!   data that may not exist, so the writer stops writing for the life of the process,
//!   says so once, and every write gets `StorageFailed` saying to check the disk and restart
//!   (a restart recovers what is durable).
//!
//! The node is not ready ([`crate::Node::ready`]) while it cannot write. Maintenance
//! commits (dedup expiry, tombstone GC) and merges of values from peers follow the same
//! rules.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use tally_core::{
    EntityRecord, Epoch, Increment, LimitIdx, LimitRecord, ResetRegister, Scope, State,
};
use tally_store::{Batch, EpochRows, Fault, HistoryScan, Location, Store, StoreError, SweepCursor};
use tokio::sync::{OwnedSemaphorePermit, oneshot};

use tally_gossip::Incoming;

use crate::cluster::Publication;
use crate::escrow::Reservation;
use crate::{
    EpochHistory, HistoryQuery, LimitHistory, Metrics, NodeError, RecordOutcome, Shared,
    StorageHealth, UsageRecord,
};

pub(crate) enum ConfigChange {
    PutLimit(String, tally_core::LimitInput),
    /// A derived limit: (id, input, anchor, pinned generation); see
    /// `State::prepare_limit_put_pinned`.
    PutLimitPinned(String, tally_core::LimitInput, i64, tally_core::Hlc),
    DeleteLimit(String),
    Reset(String, u64),
    PutEntity(String, String, Scope, tally_core::AccessRules),
    /// Prices of models, all in one durable commit (`None`: delete). All or nothing:
    /// any bad entry refuses the whole change.
    Prices(Vec<(String, Option<tally_core::Price>)>),
    DeleteEntity(String, String),
    /// (node, successor).
    Decommission(String, String),
}

/// Where a records op's answer goes: per record, applied or already seen; and the records
/// themselves, handed back so the caller can reuse them and frees them on its own thread.
pub(crate) type RecordsReply =
    oneshot::Sender<(Result<Vec<RecordOutcome>, NodeError>, Vec<UsageRecord>)>;

pub(crate) enum Op {
    Records {
        records: Vec<UsageRecord>,
        reply: RecordsReply,
        _permit: OwnedSemaphorePermit,
    },
    Config {
        change: ConfigChange,
        reply: oneshot::Sender<Result<(), NodeError>>,
        _permit: OwnedSemaphorePermit,
    },
    /// Values other nodes published, already verified.
    Remote {
        items: Vec<Incoming>,
        _permit: OwnedSemaphorePermit,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
    History {
        id: String,
        query: HistoryQuery,
        reply: oneshot::Sender<Result<LimitHistory, NodeError>>,
        _permit: OwnedSemaphorePermit,
    },
    /// Run maintenance now (see [`crate::Node::maintain_now`]).
    Maintain {
        reply: oneshot::Sender<Result<(), NodeError>>,
        _permit: OwnedSemaphorePermit,
    },
    /// Hard limits: give `amount` of this node's free rights to `to` (the rights task,
    /// answering a demand). Durable before it is published; the new total, or why not.
    Grant {
        limit: String,
        epoch: Epoch,
        to: String,
        amount: u64,
        reply: Option<oneshot::Sender<Result<u64, NodeError>>>,
    },
}

/// How often the writer advances windows and expires dedup ids when idle.
const MAINTENANCE_EVERY: Duration = Duration::from_millis(100);
/// Expiry runs every second: it drops expired dedup buckets whole, closes the open bucket
/// when it is full, and deletes at most this many leftover rows of dropped buckets per
/// pass (a few ms of the writer's time), so it keeps up with 100 000 records/s.
const DEDUP_EXPIRE_EVERY: Duration = Duration::from_secs(1);
const DEDUP_EXPIRE_ROWS_MAX: usize = 20_000;
/// Closed epochs older than the retention are dropped by a sweep that reads at most this
/// many slot rows every 10 s (a few ms), so a full sweep of 10 million rows takes under 3
/// hours, far faster than a steady workload closes epochs.
const HISTORY_SWEEP_EVERY: Duration = Duration::from_secs(10);
const HISTORY_SWEEP_ROWS_MAX: usize = 10_000;
/// After a full disk: first wait before looking for room again, doubled per attempt up to
/// the max. Looking is cheap (a probe file), opening the store is not (redb re-checks a
/// database that was not closed cleanly), so the store is opened only once there is room.
const REOPEN_BACKOFF_MIN_MS: u64 = 50;
const REOPEN_BACKOFF_MAX_MS: u64 = 1_000;
/// Room there must be before the store is opened again.
const REOPEN_ROOM_BYTES: u64 = 1 << 20;
/// Most distinct values from peers kept while the disk is full (slots keep only their
/// highest value per key, so this bounds keys, not traffic); beyond it they are dropped
/// until a restart re-reads gossip.
const DEFERRED_MAX: usize = 1_000_000;

/// A failed commit as the callers' error: nothing of it was acknowledged.
fn unavailable(e: &StoreError) -> NodeError {
    let message = format!("could not store the write durably: {e}");
    match e.fault() {
        Fault::Unavailable => NodeError::DiskFull(message),
        Fault::Transaction => NodeError::WriteFailed(message),
        // Untrusted, and whatever a newer store may add: stop trusting the disk.
        _ => NodeError::StorageFailed(message),
    }
}

/// The writer's store, and whether it may be written.
enum Disk {
    Open(Store),
    /// Closed after a full disk; opened again once there is room (see the module docs).
    Full {
        error: String,
        since: Instant,
        next_try: Instant,
        next_try_ms: i64,
        backoff_ms: u64,
    },
    /// Not to be written again by this process (see the module docs).
    Failed {
        error: String,
    },
}

/// Values from peers that could not be stored yet, merged once the store is back.
#[derive(Default)]
struct Deferred {
    slots: HashMap<(String, String, Epoch), u64>,
    records: Vec<Incoming>,
    dropped: u64,
}

impl Deferred {
    fn len(&self) -> usize {
        self.slots.len() + self.records.len()
    }

    fn add(&mut self, items: Vec<Incoming>) {
        for item in items {
            if self.len() >= DEFERRED_MAX {
                self.dropped += 1;
                continue;
            }
            match item {
                Incoming::Slot {
                    origin,
                    limit,
                    epoch,
                    value,
                } => {
                    let v = self.slots.entry((origin, limit, epoch)).or_insert(0);
                    *v = (*v).max(value);
                }
                // A hello says everything its sender published before it is merged: not
                // true of values that wait. New hellos come every sweep.
                Incoming::Hello { .. } => {}
                other => self.records.push(other),
            }
        }
    }

    fn take(&mut self) -> Vec<Incoming> {
        let mut items: Vec<Incoming> = std::mem::take(&mut self.slots)
            .into_iter()
            .map(|((origin, limit, epoch), value)| Incoming::Slot {
                origin,
                limit,
                epoch,
                value,
            })
            .collect();
        items.append(&mut self.records);
        items
    }
}

/// A records op waiting for its commit: where the answer goes, per record applied or
/// already seen, and the records.
type Reply = (RecordsReply, Vec<RecordOutcome>, Vec<UsageRecord>);

/// A group of record ops being committed together.
struct Group<'a> {
    batch: Batch<'a>,
    /// New values of this node's slots, by (limit, epoch).
    pending: HashMap<(LimitIdx, Epoch), u64, foldhash::fast::RandomState>,
    replies: Vec<Reply>,
    records: usize,
    shared: &'a Shared,
    /// Hard limits: what this group holds in the escrow until it commits (its records'
    /// spending), and the reservations its records settle (restored if it fails).
    holds: Vec<(LimitIdx, Epoch, u64)>,
    taken: Vec<(String, Reservation)>,
}

impl Group<'_> {
    fn add(&mut self, records: &[UsageRecord]) -> Result<Vec<RecordOutcome>, StoreError> {
        let now = self.shared.clock.now_ms();
        let window = self.shared.config.dedup_window_ms;
        let state = self.shared.state.read();
        let mut incs: Vec<Increment> = Vec::with_capacity(8);
        let mut applied = Vec::with_capacity(records.len());
        for r in records {
            // The batch also knows the ids it holds, so a repeat inside one group is caught.
            if self.batch.dedup_contains(&r.id, now)? {
                if let Some(id) = &r.reservation {
                    // Counted before: the reservation has nothing left to settle.
                    self.shared.escrow.0.lock().cancel(id);
                }
                applied.push(RecordOutcome::default());
                continue;
            }
            let attrs: Vec<(&str, &str)> = r
                .attributes
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            incs.clear();
            state.plan_record(&attrs, r.amounts, r.at_ms.unwrap_or(now), &mut incs);
            for inc in &incs {
                let key = (inc.limit, inc.epoch);
                let current = match self.pending.get(&key) {
                    Some(v) => *v,
                    // Memory has every durable own slot of epochs it holds; closed epochs
                    // dropped from memory are read back from disk.
                    None => match state.own_slot(inc.limit, inc.epoch) {
                        Some(v) => v,
                        None => self.batch.own_slot(state.limit_id(inc.limit), inc.epoch)?,
                    },
                };
                self.pending.insert(key, current.saturating_add(inc.delta));
            }
            let overrun = self.settle(&state, r, &incs);
            // A record is accepted while its `at` is inside the window (`at > now -
            // window`), and `at` may be ahead of now: the id must be remembered for as long
            // as a retry of the same record could still be accepted (I2).
            let at = r.at_ms.unwrap_or(now);
            self.batch.dedup_insert(&r.id, at.max(now) + window)?;
            applied.push(RecordOutcome {
                applied: true,
                overrun,
            });
        }
        debug_assert_eq!(applied.len(), records.len());
        self.records += records.len();
        Ok(applied)
    }

    /// Hard limits: settles the record's reservation and holds what it spends until the
    /// commit; what it spends beyond this node's free rights is its overrun. Nothing to
    /// do (and no lock taken) for a record that touches no hard limit.
    fn settle(&mut self, state: &State, r: &UsageRecord, incs: &[Increment]) -> Vec<(String, u64)> {
        let hard = incs.iter().any(|i| state.is_hard(i.limit));
        if !hard && r.reservation.is_none() {
            return Vec::new();
        }
        let mut esc = self.shared.escrow.0.lock();
        let reservation = r.reservation.as_ref().and_then(|id| {
            let res = esc.take(id)?;
            for &(l, e, a) in &res.items {
                esc.release(l, e, a);
            }
            Some((id.clone(), res))
        });
        let mut overrun = Vec::new();
        for inc in incs.iter().filter(|i| state.is_hard(i.limit)) {
            let held = esc.held(inc.limit, inc.epoch);
            let free = state.hard_free(inc.limit, inc.epoch, held).unwrap_or(0);
            let over = i128::from(inc.delta) - free.clamp(0, i128::from(inc.delta));
            if over > 0 {
                overrun.push((state.limit_id(inc.limit).to_string(), over as u64));
            }
            esc.hold(inc.limit, inc.epoch, inc.delta);
            self.holds.push((inc.limit, inc.epoch, inc.delta));
            if reservation.is_none() {
                esc.note_spent(inc.limit, inc.delta);
            }
        }
        if let Some(taken) = reservation {
            self.taken.push(taken);
        }
        overrun
    }

    /// Gives back what the group held and, when it failed, the reservations it took.
    fn unhold(
        shared: &Shared,
        holds: &[(LimitIdx, Epoch, u64)],
        restore: Vec<(String, Reservation)>,
    ) {
        if holds.is_empty() && restore.is_empty() {
            return;
        }
        let mut esc = shared.escrow.0.lock();
        for &(l, e, a) in holds {
            esc.release(l, e, a);
        }
        for (id, r) in restore {
            esc.insert(id, r.items, r.expires_at_ms);
        }
    }

    /// Commits; on success applies to memory, publishes and acknowledges. On failure the
    /// replies come back with the error: the writer acts on it before anyone hears of it
    /// (a caller that sees 503 then sees the node not ready).
    fn commit(mut self) -> Result<(), (StoreError, Vec<Reply>)> {
        let started = Instant::now();
        let result = (|| {
            {
                let state = self.shared.state.read();
                for (&(limit, epoch), &value) in &self.pending {
                    self.batch
                        .put_own_slot(state.limit_id(limit), epoch, value)?;
                }
            }
            self.batch.commit()
        })();
        let m = &self.shared.metrics;
        match result {
            Ok(()) => {
                let published: Option<Vec<(String, Epoch, u64)>> = {
                    let mut state = self.shared.state.write();
                    let me = state.me();
                    for (&(limit, epoch), &value) in &self.pending {
                        // I3: what was just made durable is at least what memory had.
                        assert!(
                            state.own_slot(limit, epoch).is_none_or(|v| v <= value),
                            "own slot of {} {epoch} would go down in memory",
                            state.limit_id(limit)
                        );
                        state.merge_slot_idx(limit, epoch, me, value);
                    }
                    // Under the state's write lock: a check sees the usage or the hold.
                    Group::unhold(self.shared, &self.holds, Vec::new());
                    // Only a node in a fleet has anyone to tell.
                    self.shared.cluster.get().map(|_| {
                        self.pending
                            .iter()
                            .map(|(&(limit, epoch), &value)| {
                                (state.limit_id(limit).to_string(), epoch, value)
                            })
                            .collect()
                    })
                };
                if let Some(slots) = published {
                    publish(self.shared, Publication::Slots(slots));
                }
                m.commit_seconds.observe(started.elapsed());
                Metrics::add(&m.commit_records_total, self.records as u64);
                for (reply, applied, records) in self.replies {
                    let n = applied.iter().filter(|a| a.applied).count() as u64;
                    Metrics::add(&m.records_applied_total, n);
                    Metrics::add(&m.records_duplicate_total, applied.len() as u64 - n);
                    let over: u64 = applied
                        .iter()
                        .flat_map(|a| a.overrun.iter().map(|o| o.1))
                        .sum();
                    if over > 0 {
                        Metrics::add(&m.hard_overrun_total, over);
                    }
                    let _ = reply.send((Ok(applied), records));
                }
                Ok(())
            }
            Err(e) => {
                Metrics::add(&m.commit_errors_total, 1);
                tracing::warn!(error = %e, records = self.records, "group commit failed; nothing of it was acknowledged");
                Group::unhold(self.shared, &self.holds, self.taken);
                Err((e, self.replies))
            }
        }
    }
}

/// The writer thread's state.
struct Writer {
    shared: Arc<Shared>,
    location: Location,
    disk: Disk,
    deferred: Deferred,
    last: Maintained,
}

/// Marks storage failed if the writer thread unwinds: an assertion (a violated invariant,
/// TIGER_STYLE) stops writing for good and says so, rather than leaving a node that
/// answers every write "shutting down" or, worse, writes on.
struct StopOnPanic(Arc<Shared>);

impl Drop for StopOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0
                .storage
                .store(StorageHealth::Failed as u8, Ordering::SeqCst);
            tracing::error!(
                "the writer stopped on a violated invariant (a bug): writes are refused and /readyz is 503; restart the node and report this log"
            );
        }
    }
}

pub(crate) fn run(shared: Arc<Shared>, store: Store, rx: Receiver<Op>) {
    let _stop = StopOnPanic(shared.clone());
    let mut w = Writer {
        location: shared.config.location(),
        shared,
        disk: Disk::Open(store),
        deferred: Deferred::default(),
        last: Maintained {
            tick: Instant::now(),
            expire: Instant::now(),
            history: Instant::now(),
            cursor: SweepCursor::default(),
        },
    };
    w.clear_shutdown_mark();
    let mut carry: Option<Op> = None;
    loop {
        let first = match carry.take() {
            Some(op) => op,
            None => match rx.recv_timeout(MAINTENANCE_EVERY) {
                Ok(op) => op,
                Err(RecvTimeoutError::Timeout) => {
                    // Failures are logged and retried on the next pass.
                    let _ = w.maintain(false);
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return,
            },
        };
        match first {
            Op::Shutdown { reply } => {
                w.mark_clean_shutdown();
                // Close the database before replying, so the caller may reopen it at once.
                drop(w);
                tracing::info!("writer stopped: everything acknowledged is committed");
                let _ = reply.send(());
                return;
            }
            Op::Config { change, reply, .. } => {
                let _ = reply.send(w.config(change));
                w.done(1);
            }
            Op::Remote { items, .. } => {
                w.remote(items);
                w.done(1);
            }
            Op::History {
                id, query, reply, ..
            } => {
                let shared = w.shared.clone();
                let result = w
                    .store()
                    .and_then(|store| read_history(&shared, store, &id, query));
                let _ = reply.send(result);
                w.done(1);
            }
            Op::Maintain { reply, .. } => {
                let _ = reply.send(w.maintain(true));
                w.done(1);
            }
            Op::Records { records, reply, .. } => {
                let ops = w.records(records, reply, &rx, &mut carry);
                w.done(ops);
            }
            Op::Grant {
                limit,
                epoch,
                to,
                amount,
                reply,
            } => {
                let result = w.grant(&limit, epoch, &to, amount);
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
                w.done(1);
            }
        }
        if w.last.tick.elapsed() >= MAINTENANCE_EVERY {
            let _ = w.maintain(false);
        }
    }
}

impl Writer {
    /// Removes the last run's clean-shutdown mark before this run spends hard limits: from
    /// now on a crash must look like one. Until it is gone, hard limits are not spent.
    fn clear_shutdown_mark(&mut self) {
        if !self.shared.escrow.0.lock().mark_pending {
            return;
        }
        let result = self.store().and_then(|store| {
            let mut b = store.batch().map_err(|e| unavailable(&e))?;
            b.clear_clean_shutdown().map_err(|e| unavailable(&e))?;
            b.commit().map_err(|e| unavailable(&e))
        });
        match result {
            Ok(()) => self.shared.escrow.0.lock().mark_pending = false,
            Err(e) => {
                tracing::warn!(error = %e, "could not clear the clean-shutdown mark; hard limits are not spent until it is cleared (retried every maintenance pass)")
            }
        }
    }

    /// Stores the open reservations and marks a clean shutdown, so the next start needs no
    /// fence.
    fn mark_clean_shutdown(&mut self) {
        let shared = self.shared.clone();
        let rows = {
            let state = shared.state.read();
            let esc = shared.escrow.0.lock();
            if esc.mark_pending {
                // This run never cleared the last mark: it is still there.
                return;
            }
            esc.snapshot(|l| state.limit_id(l).to_string())
        };
        let result = self.store().and_then(|store| {
            let mut b = store.batch().map_err(|e| unavailable(&e))?;
            b.put_clean_shutdown(&rows).map_err(|e| unavailable(&e))?;
            b.commit().map_err(|e| unavailable(&e))
        });
        match result {
            Ok(()) => tracing::info!(reservations = rows.len(), "clean shutdown marked"),
            Err(e) => {
                tracing::warn!(error = %e, "could not mark a clean shutdown; the next start fences hard limits")
            }
        }
    }

    /// Gives `amount` of this node's free rights of a hard limit to `to`: durable, then
    /// in memory, then published. Held in the escrow while it commits, so a check never
    /// spends what is being given.
    fn grant(
        &mut self,
        limit: &str,
        epoch: Epoch,
        to: &str,
        amount: u64,
    ) -> Result<u64, NodeError> {
        let shared = self.shared.clone();
        let (idx, total) = {
            let state = shared.state.read();
            let idx = state
                .limit_idx(limit)
                .ok_or_else(|| NodeError::NotFound(format!("no limit with id {limit:?}")))?;
            let mut esc = shared.escrow.0.lock();
            if esc.fenced(shared.clock.now_ms()) {
                return Err(NodeError::Fenced(
                    "this node restarted after a crash: it grants no rights until its fence ends"
                        .into(),
                ));
            }
            let held = esc.held(idx, epoch);
            let total = state
                .prepare_grant(idx, epoch, to, amount, held)
                .map_err(|e| NodeError::Conflict(e.to_string()))?;
            esc.hold(idx, epoch, amount);
            (idx, total)
        };
        let result = self.store().and_then(|store| {
            let mut b = store.batch().map_err(|e| unavailable(&e))?;
            b.put_own_grant(limit, epoch, to, total)
                .map_err(|e| unavailable(&e))?;
            b.commit()
                .map_err(|e| {
                    let msg = unavailable(&e);
                    (msg, e)
                })
                .map_err(|(m, _)| m)
        });
        {
            let mut state = shared.state.write();
            if result.is_ok() {
                let me = shared.node_id.clone();
                state.merge_grant(limit, epoch, &me, to, total);
            }
            shared.escrow.0.lock().release(idx, epoch, amount);
        }
        match result {
            Ok(()) => {
                Metrics::add(&shared.metrics.rights_granted_total, amount);
                tracing::debug!(%limit, %epoch, %to, amount, total, "rights granted");
                publish(
                    &shared,
                    Publication::Grant(limit.to_string(), epoch, to.to_string(), total),
                );
                Ok(total)
            }
            Err(e) => Err(e),
        }
    }

    /// `n` ops handed to the writer are finished (see `Node::writer_idle`).
    fn done(&self, n: usize) {
        let before = self.shared.writer_ops.fetch_sub(n, Ordering::SeqCst);
        debug_assert!(before >= n, "writer ops counted {before}, finished {n}");
    }

    /// The store, if it may be written; after a full disk, opens it again first when it
    /// is time to look for room.
    fn store(&mut self) -> Result<&mut Store, NodeError> {
        if let Disk::Full {
            next_try,
            next_try_ms,
            ..
        } = &self.disk
        {
            // Whichever clock says the back-off has passed: the node's (simulated time in
            // the simulator) or the monotonic one (a test's clock may stand still).
            if Instant::now() >= *next_try || self.shared.clock.now_ms() >= *next_try_ms {
                self.reopen();
            }
        }
        match &mut self.disk {
            Disk::Open(store) => Ok(store),
            Disk::Full { error, .. } => Err(NodeError::DiskFull(format!(
                "the disk holding the data directory is full ({error}); writes are refused until space is freed and resume by themselves then; checks still answer"
            ))),
            Disk::Failed { error } => Err(NodeError::StorageFailed(format!(
                "writes are stopped: the disk failed ({error}) and what it acknowledged may not be on it. Check the disk, then restart the node so it recovers what is durable; checks still answer from memory"
            ))),
        }
    }

    /// Acts on a failed store operation (see the module docs).
    fn failed(&mut self, e: &StoreError) {
        let health = &self.shared.storage;
        match e.fault() {
            Fault::Transaction => {}
            Fault::Unavailable => {
                let since = match &self.disk {
                    Disk::Full { since, .. } => *since,
                    Disk::Failed { .. } => return,
                    Disk::Open(_) => {
                        tracing::error!(error = %e, "the disk holding the data directory is full: writes get 503 until space is freed, checks still answer; free space and writing resumes by itself");
                        Instant::now()
                    }
                };
                let backoff_ms = match &self.disk {
                    Disk::Full { backoff_ms, .. } => (backoff_ms * 2).min(REOPEN_BACKOFF_MAX_MS),
                    _ => REOPEN_BACKOFF_MIN_MS,
                };
                // Dropping the store closes the database redb refuses to use any more.
                self.disk = Disk::Full {
                    error: e.to_string(),
                    since,
                    next_try: Instant::now() + Duration::from_millis(backoff_ms),
                    next_try_ms: self.shared.clock.now_ms() + backoff_ms as i64,
                    backoff_ms,
                };
                health.store(StorageHealth::Full as u8, Ordering::SeqCst);
            }
            // Untrusted, and whatever a later tally-store may add: assume the worst.
            _ => {
                if !matches!(self.disk, Disk::Failed { .. }) {
                    tracing::error!(error = %e, "storage failed: this node stops writing (writes get 503, checks answer from memory, /readyz is 503). Check the disk (kernel log), then restart the node so it recovers what is durable");
                }
                self.disk = Disk::Failed {
                    error: e.to_string(),
                };
                health.store(StorageHealth::Failed as u8, Ordering::SeqCst);
                self.deferred = Deferred::default();
            }
        }
    }

    /// After a full disk: opens the store again if the disk has room, makes memory agree
    /// with it, and merges the values from peers that waited.
    fn reopen(&mut self) {
        let result = (|| {
            if !tally_store::has_room(&self.location, REOPEN_ROOM_BYTES).map_err(|source| {
                StoreError::Dir {
                    path: self.shared.config.data_dir.clone(),
                    source,
                }
            })? {
                return Ok(None);
            }
            let mut store = Store::open_at(&self.location)?;
            store.probe()?;
            reconcile(&self.shared, &store)?;
            Ok::<_, StoreError>(Some(store))
        })();
        match result {
            Ok(Some(store)) => {
                if let Disk::Full { since, .. } = &self.disk {
                    tracing::info!(
                        full_ms = since.elapsed().as_millis() as u64,
                        "the disk has room again: writes resume"
                    );
                }
                self.disk = Disk::Open(store);
                self.shared
                    .storage
                    .store(StorageHealth::Ok as u8, Ordering::SeqCst);
                if self.deferred.dropped > 0 {
                    tracing::warn!(
                        dropped = self.deferred.dropped,
                        "values from peers were dropped while the disk was full; restart the node to read them from gossip again"
                    );
                    self.deferred.dropped = 0;
                }
                let items = self.deferred.take();
                if !items.is_empty() {
                    self.remote(items);
                }
            }
            Ok(None) => self.failed(&StoreError::no_room()),
            Err(e) if e.fault() == Fault::Transaction => {
                self.failed(&StoreError::Dir {
                    path: self.shared.config.data_dir.clone(),
                    source: std::io::Error::other(e.to_string()),
                });
            }
            Err(e) => self.failed(&e),
        }
    }

    fn records(
        &mut self,
        records: Vec<UsageRecord>,
        reply: RecordsReply,
        rx: &Receiver<Op>,
        carry: &mut Option<Op>,
    ) -> usize {
        let shared = self.shared.clone();
        let mut ops = 1;
        let store = match self.store() {
            Ok(store) => store,
            Err(e) => {
                let _ = reply.send((Err(e), records));
                return ops;
            }
        };
        let mut group = match store.batch() {
            Ok(batch) => Group {
                batch,
                pending: HashMap::default(),
                replies: Vec::new(),
                records: 0,
                shared: &shared,
                holds: Vec::new(),
                taken: Vec::new(),
            },
            Err(e) => {
                self.failed(&e);
                let _ = reply.send((Err(unavailable(&e)), records));
                return ops;
            }
        };
        let mut next = Some((records, reply));
        let mut failed: Option<StoreError> = None;
        while let Some((records, reply)) = next.take() {
            // Validated when queued, and again now: an id is forgotten once its
            // window ends, so a record whose `at` left the window while it waited
            // could otherwise be applied a second time (I2).
            let now = shared.clock.now_ms();
            if let Err(invalid) = crate::validate_records(&records, now, &shared.config) {
                let _ = reply.send((Err(invalid), records));
            } else {
                match group.add(&records) {
                    Ok(applied) => group.replies.push((reply, applied, records)),
                    Err(e) => {
                        group.replies.push((reply, Vec::new(), records));
                        failed = Some(e);
                        break;
                    }
                }
            }
            if group.records >= shared.config.batch_records_max {
                break;
            }
            // Drain what is already queued into the same commit.
            match rx.try_recv() {
                Ok(Op::Records { records, reply, .. }) => {
                    ops += 1;
                    next = Some((records, reply));
                }
                Ok(other) => *carry = Some(other),
                Err(_) => {}
            }
        }
        let result = match failed {
            Some(e) => {
                Group::unhold(&shared, &group.holds, group.taken);
                Err((e, group.replies))
            }
            None => group.commit(),
        };
        if let Err((e, replies)) = result {
            self.failed(&e);
            for (reply, _, records) in replies {
                let _ = reply.send((Err(unavailable(&e)), records));
            }
        }
        ops
    }

    fn config(&mut self, change: ConfigChange) -> Result<(), NodeError> {
        let shared = self.shared.clone();
        let store = self.store()?;
        let result = apply_config(&shared, store, change);
        if let Err((_, Some(e))) = &result {
            self.failed(e);
        }
        result.map_err(|(e, _)| e)
    }

    fn remote(&mut self, items: Vec<Incoming>) {
        match &mut self.disk {
            Disk::Open(store) => {
                if let Err((e, items)) = apply_remote(&self.shared, store, items) {
                    self.failed(&e);
                    if matches!(self.disk, Disk::Full { .. }) {
                        self.deferred.add(items);
                    }
                }
            }
            Disk::Full { .. } => self.deferred.add(items),
            // Dropped: a restart reads gossip again.
            Disk::Failed { .. } => {}
        }
    }

    /// Advances windows; every second expires dedup ids and old tombstones, every 10 s
    /// drops a slice of history older than the retention (a commit only when there is
    /// something to write). `now` forces all of it, and a whole history sweep.
    fn maintain(&mut self, now: bool) -> Result<(), NodeError> {
        self.last.tick = Instant::now();
        let now_ms = self.shared.clock.now_ms();
        self.shared.state.write().tick(now_ms);
        {
            let _state = self.shared.state.read();
            let n = self.shared.escrow.0.lock().expire(now_ms);
            Metrics::add(&self.shared.metrics.reservations_expired_total, n as u64);
        }
        if self.shared.escrow.0.lock().mark_pending {
            self.clear_shutdown_mark();
        }
        if !matches!(self.disk, Disk::Open(_)) {
            // Look for room (after a full disk) even when no write comes.
            self.store()?;
        }
        let shared = self.shared.clone();
        if now || self.last.expire.elapsed() >= DEDUP_EXPIRE_EVERY {
            self.last.expire = Instant::now();
            let expired = expire(&shared, self.store()?, now_ms);
            match expired {
                Ok(n) => Metrics::add(&shared.metrics.dedup_expired_total, n as u64),
                Err(e) => {
                    tracing::warn!(error = %e, "expiring dedup ids failed; will retry");
                    self.failed(&e);
                    return Err(unavailable(&e));
                }
            }
        }
        if now || self.last.history.elapsed() >= HISTORY_SWEEP_EVERY {
            self.last.history = Instant::now();
            // A forced run sweeps everything: passes until the cursor comes back to the start.
            let passes_max = if now { 1_000_000 } else { 1 };
            for _ in 0..passes_max {
                let mut cursor = std::mem::take(&mut self.last.cursor);
                let swept = sweep_history(&shared, self.store()?, &mut cursor, now_ms);
                self.last.cursor = cursor;
                match swept {
                    Ok(n) => Metrics::add(&shared.metrics.history_slots_dropped_total, n as u64),
                    Err(e) => {
                        tracing::warn!(error = %e, "dropping old history failed; will retry");
                        self.failed(&e);
                        return Err(unavailable(&e));
                    }
                }
                if self.last.cursor.is_at_start() {
                    break;
                }
            }
        }
        Ok(())
    }
}

/// When maintenance last ran, and where the history sweep resumes.
struct Maintained {
    tick: Instant,
    expire: Instant,
    history: Instant,
    cursor: SweepCursor,
}

/// One maintenance commit: dedup ids whose window ended, and tombstones past their
/// retention. Memory forgets the tombstones only once the disk has.
fn expire(shared: &Shared, store: &mut Store, now: i64) -> Result<usize, StoreError> {
    let cutoff = now - tally_core::config::TOMBSTONE_RETENTION_MS;
    let mut due = {
        let state = shared.state.read();
        tally_core::Forgotten {
            limits: state
                .limit_records()
                .filter(|r| r.spec.is_none() && r.version.hlc.wall_ms() < cutoff)
                .map(|r| r.id.clone())
                .collect(),
            entities: state
                .entity_records()
                .filter(|r| r.parents.is_none() && r.version.hlc.wall_ms() < cutoff)
                .map(|r| (r.dimension.clone(), r.value.clone()))
                .collect(),
            prices: state
                .price_records()
                .filter(|r| r.price.is_none() && r.version.hlc.wall_ms() < cutoff)
                .map(|r| r.model.clone())
                .collect(),
        }
    };
    let mut b = store.batch()?;
    let n = b.dedup_expire(now, DEDUP_EXPIRE_ROWS_MAX)?;
    for id in &due.limits {
        b.remove_limit(id)?;
    }
    for (d, v) in &due.entities {
        b.remove_entity(d, v)?;
    }
    for m in &due.prices {
        b.remove_price(m)?;
    }
    let any = due != tally_core::Forgotten::default();
    if b.dedup_dirty() || any {
        b.commit()?;
    }
    if any {
        let mut gone = shared.state.write().gc_tombstones(now);
        for f in [&mut gone, &mut due] {
            f.limits.sort();
            f.entities.sort();
            f.prices.sort();
        }
        // The writer is the only one changing config, so memory forgets what disk did.
        assert_eq!(gone, due, "tombstones collected differ from disk");
    }
    Ok(n)
}

/// Makes memory agree with a store opened again after a full disk. Memory holds only
/// what was committed, so the disk holds at least that; it may hold more (a commit that
/// was refused may still have reached the disk: never acknowledged, so taking it is safe,
/// and its record ids are remembered, so a retry is not counted twice). What memory
/// learns is published.
fn reconcile(shared: &Shared, store: &Store) -> Result<(), StoreError> {
    let r = store.recover()?;
    let now = shared.clock.now_ms();
    let mut pubs = Vec::new();
    let mut state = shared.state.write();
    let me = state.me();
    let node_id = state.node_id().to_string();
    let on_disk: HashMap<(&str, Epoch), u64> = r
        .own_slots
        .iter()
        .map(|(l, e, v)| ((l.as_str(), *e), *v))
        .collect();
    for (limit, epoch, counter) in state.counters() {
        let v = counter.slot(me);
        let d = on_disk.get(&(limit, epoch)).copied().unwrap_or(0);
        if v > d {
            // The disk lost what it acknowledged as synced: not a bug here, a disk that lies.
            return Err(StoreError::Lost(format!(
                "the database opened again without own slot {limit} {epoch} = {v} that was committed (it has {d})"
            )));
        }
    }
    for rec in r.limits {
        if state.apply_limit(rec.clone(), now) {
            pubs.push(Publication::Limit(rec));
        }
    }
    for rec in r.entities {
        if state.apply_entity(rec.clone()) {
            pubs.push(Publication::Entity(rec));
        }
    }
    for rec in r.prices {
        if state.apply_price(rec.clone()) {
            pubs.push(Publication::Price(rec));
        }
    }
    for (id, reg) in r.resets {
        if state.apply_reset(&id, reg.clone()) {
            pubs.push(Publication::Reset(id, reg));
        }
    }
    let mut slots = Vec::new();
    for (limit, epoch, value) in r.own_slots {
        if value > state.slot(&limit, epoch, &node_id) {
            state.merge_slot(&limit, epoch, me, value);
            slots.push((limit, epoch, value));
        }
    }
    for (origin, limit, epoch, value) in r.peer_slots {
        let o = state.origin_idx(&origin);
        state.merge_slot(&limit, epoch, o, value);
    }
    let mut grants = Vec::new();
    for (limit, epoch, to, total) in r.own_grants {
        if state.merge_grant(&limit, epoch, &node_id, &to, total) {
            grants.push(Publication::Grant(limit, epoch, to, total));
        }
    }
    for (from, limit, epoch, to, total) in r.peer_grants {
        state.merge_grant(&limit, epoch, &from, &to, total);
    }
    for rec in r.decommissions {
        state.apply_decommission(rec);
    }
    state.tick(now);
    drop(state);
    pubs.extend(grants);
    if !slots.is_empty() {
        tracing::info!(
            slots = slots.len(),
            "a refused commit had reached the disk: its usage now counts (its records were answered 503, their ids are remembered)"
        );
        pubs.push(Publication::Slots(slots));
    }
    for p in pubs {
        publish(shared, p);
    }
    Ok(())
}

/// A config record, from this node's API or from a peer: persisted, then applied.
enum ConfigRecord {
    Limit(LimitRecord),
    Entity(EntityRecord),
    Reset(String, ResetRegister),
    Decommission(tally_core::DecommissionRecord),
    Price(tally_core::PriceRecord),
}

impl ConfigRecord {
    fn into_incoming(self) -> Incoming {
        match self {
            ConfigRecord::Limit(r) => Incoming::Limit(r),
            ConfigRecord::Entity(r) => Incoming::Entity(r),
            ConfigRecord::Reset(id, r) => Incoming::Reset(id, r),
            ConfigRecord::Decommission(r) => Incoming::Decommission(r),
            ConfigRecord::Price(r) => Incoming::Price(r),
        }
    }

    fn persist(&self, b: &mut Batch) -> Result<(), StoreError> {
        match self {
            ConfigRecord::Limit(r) => b.put_limit(r),
            ConfigRecord::Entity(r) => b.put_entity(r),
            ConfigRecord::Reset(id, r) => b.put_reset(id, r),
            ConfigRecord::Decommission(r) => b.put_decommission(r),
            ConfigRecord::Price(r) => b.put_price(r),
        }
    }

    /// Whether memory already holds this record or a newer one.
    fn is_known(&self, state: &State) -> bool {
        match self {
            ConfigRecord::Limit(r) => state.limit_record(&r.id).is_some_and(|c| !r.supersedes(c)),
            ConfigRecord::Entity(r) => state
                .entity_record(&r.dimension, &r.value)
                .is_some_and(|c| c.version >= r.version),
            ConfigRecord::Reset(id, r) => {
                state.reset_register(id).is_some_and(|c| !r.supersedes(c))
            }
            ConfigRecord::Decommission(r) => state
                .decommission(&r.node)
                .is_some_and(|c| c.version >= r.version),
            ConfigRecord::Price(r) => state
                .price_record(&r.model)
                .is_some_and(|c| c.version >= r.version),
        }
    }

    /// Applies to memory (LWW); what changed is returned for gossip, since every node
    /// re-publishes the newest config it knows, so it outlives its writer.
    fn apply(self, state: &mut State, now: i64) -> Option<Publication> {
        match self {
            ConfigRecord::Limit(r) => state
                .apply_limit(r.clone(), now)
                .then_some(Publication::Limit(r)),
            ConfigRecord::Entity(r) => state
                .apply_entity(r.clone())
                .then_some(Publication::Entity(r)),
            ConfigRecord::Reset(id, r) => state
                .apply_reset(&id, r.clone())
                .then_some(Publication::Reset(id, r)),
            ConfigRecord::Decommission(r) => state
                .apply_decommission(r.clone())
                .then_some(Publication::Decommission(r)),
            ConfigRecord::Price(r) => state
                .apply_price(r.clone())
                .then_some(Publication::Price(r)),
        }
    }

    fn log(&self) {
        match self {
            ConfigRecord::Limit(r) => {
                tracing::info!(limit = %r.id, deleted = r.spec.is_none(), version = %r.version.hlc, "limit written")
            }
            ConfigRecord::Entity(r) => tracing::info!(
                entity = %format!("{}/{}", r.dimension, r.value),
                deleted = r.parents.is_none(),
                "entity written"
            ),
            ConfigRecord::Reset(id, r) => {
                tracing::info!(limit = %id, baseline = r.baseline, reset = %r.reset.hlc, "limit reset")
            }
            ConfigRecord::Decommission(r) => tracing::warn!(
                node = %r.node, successor = %r.successor,
                "node decommissioned: its unspent rights of hard limits pass to its successor; it may not spend hard limits again"
            ),
            ConfigRecord::Price(r) => {
                tracing::debug!(model = %r.model, deleted = r.price.is_none(), "price written")
            }
        }
    }
}

fn apply_config(
    shared: &Shared,
    store: &mut Store,
    change: ConfigChange,
) -> Result<(), (NodeError, Option<Box<StoreError>>)> {
    let now = shared.clock.now_ms();
    // Derived limits come one per new descriptor value (Envoy RLS wildcards): logged
    // at debug, so a stream of new client addresses does not flood the log.
    let derived = matches!(change, ConfigChange::PutLimitPinned(..));
    let record = {
        let mut state = shared.state.write();
        let prepared: Result<ConfigRecord, NodeError> = match change {
            ConfigChange::PutLimit(id, input) => state
                .prepare_limit_put(&id, input, now)
                .map(ConfigRecord::Limit)
                .map_err(Into::into),
            ConfigChange::PutLimitPinned(id, input, anchor, pinned) => state
                .prepare_limit_put_pinned(&id, input, anchor, pinned, now)
                .map(ConfigRecord::Limit)
                .map_err(Into::into),
            ConfigChange::DeleteLimit(id) => state
                .prepare_limit_delete(&id, now)
                .map(ConfigRecord::Limit)
                .map_err(Into::into),
            ConfigChange::Reset(id, baseline) => state
                .prepare_reset(&id, baseline, now)
                .map(|reg| ConfigRecord::Reset(id, reg))
                .map_err(Into::into),
            ConfigChange::Prices(prices) => {
                let records = prepare_prices(&mut state, prices, now).map_err(|e| (e, None))?;
                drop(state); // commit_config takes the state lock again to apply
                return commit_config(shared, store, records, now, false);
            }
            ConfigChange::PutEntity(d, v, parents, rules) => state
                .prepare_entity_put(&d, &v, parents, rules, now)
                .map(ConfigRecord::Entity)
                .map_err(Into::into),
            ConfigChange::DeleteEntity(d, v) => state
                .prepare_entity_delete(&d, &v, now)
                .map(ConfigRecord::Entity)
                .map_err(Into::into),
            ConfigChange::Decommission(node, successor) => state
                .prepare_decommission(&node, &successor, now)
                .map(ConfigRecord::Decommission)
                .map_err(Into::into),
        };
        prepared.map(|r| vec![r]).map_err(|e| (e, None))?
    };
    commit_config(shared, store, record, now, derived)
}

/// The records of a batch of price writes, all or nothing.
fn prepare_prices(
    state: &mut State,
    prices: Vec<(String, Option<tally_core::Price>)>,
    now: i64,
) -> Result<Vec<ConfigRecord>, NodeError> {
    let n = prices.len();
    let mut out = Vec::with_capacity(n);
    for (i, (model, price)) in prices.into_iter().enumerate() {
        let rec = match price {
            Some(p) => state.prepare_price_put(&model, p, now),
            None => state.prepare_price_delete(&model, now),
        };
        // One write keeps its own error (a delete of an unknown model is a 404); in a
        // batch, any bad entry is the batch's bad argument, named by its index.
        out.push(ConfigRecord::Price(rec.map_err(|e| {
            if n == 1 {
                NodeError::from(e)
            } else {
                NodeError::invalid_field("prices", format!("prices[{i}]: {e}"))
            }
        })?));
    }
    Ok(out)
}

/// Makes config records durable in one commit, then applies and publishes them.
fn commit_config(
    shared: &Shared,
    store: &mut Store,
    records: Vec<ConfigRecord>,
    now: i64,
    derived: bool,
) -> Result<(), (NodeError, Option<Box<StoreError>>)> {
    let result = (|| {
        let mut b = store.batch()?;
        for record in &records {
            record.persist(&mut b)?;
        }
        b.commit()
    })();
    if let Err(e) = result {
        Metrics::add(&shared.metrics.commit_errors_total, 1);
        tracing::warn!(error = %e, "config change not committed");
        return Err((unavailable(&e), Some(Box::new(e))));
    }
    if records.len() > 1 {
        tracing::info!(
            records = records.len(),
            "config records written in one commit"
        );
    }
    for record in records {
        if let (true, ConfigRecord::Limit(r)) = (derived, &record) {
            tracing::debug!(limit = %r.id, version = %r.version.hlc, "derived limit written");
        } else {
            record.log();
        }
        let publication = record.apply(&mut shared.state.write(), now);
        if let Some(p) = publication {
            publish(shared, p);
        }
    }
    Ok(())
}

/// Hands durable changes to gossip, when the node is clustered.
fn publish(shared: &Shared, p: Publication) {
    if let Some(c) = shared.cluster.get() {
        c.outbox.push(p, shared.clock.now_ms());
    }
}

/// Merges values from other nodes: keeps only what is news (a higher slot, a newer
/// record), makes it durable, then applies it to memory. Own slots echoed back are
/// ignored: this node's slots come only from its own disk. If the commit fails, the
/// items come back with the error, so they can wait for the disk.
fn apply_remote(
    shared: &Shared,
    store: &mut Store,
    items: Vec<Incoming>,
) -> Result<(), (StoreError, Vec<Incoming>)> {
    let now = shared.clock.now_ms();
    let mut hellos = Vec::new();
    let mut grants = Vec::new();
    let (slots, records) = {
        let state = shared.state.read();
        let me = state.node_id();
        let mut slots = Vec::new();
        let mut records = Vec::new();
        for item in items {
            let record = match item {
                Incoming::Grant {
                    from,
                    limit,
                    epoch,
                    to,
                    value,
                } => {
                    // Own grants come only from this node's disk, like its slots.
                    let known = state
                        .limit_idx(&limit)
                        .map_or(0, |l| state.grant(l, epoch, &from, &to));
                    if from != me && value > known {
                        grants.push((from, limit, epoch, to, value));
                    }
                    continue;
                }
                // Demands are read by the rights task, never stored.
                Incoming::Demand { .. } => continue,
                Incoming::Decommission(r) => ConfigRecord::Decommission(r),
                Incoming::Hello { origin, wall_ms } => {
                    hellos.push((origin, wall_ms));
                    continue;
                }
                Incoming::Slot {
                    origin,
                    limit,
                    epoch,
                    value,
                } => {
                    if origin != me && value > state.slot(&limit, epoch, &origin) {
                        slots.push((origin, limit, epoch, value));
                    }
                    continue;
                }
                Incoming::Limit(r) => ConfigRecord::Limit(r),
                Incoming::Entity(r) => ConfigRecord::Entity(r),
                Incoming::Price(r) => ConfigRecord::Price(r),
                Incoming::Reset(id, r) => ConfigRecord::Reset(id, r),
            };
            if !record.is_known(&state) {
                records.push(record);
            }
        }
        (slots, records)
    };
    if slots.is_empty() && records.is_empty() && grants.is_empty() {
        note_hellos(shared, hellos);
        return Ok(());
    }
    let result = (|| {
        let mut b = store.batch()?;
        for (origin, limit, epoch, value) in &slots {
            b.merge_peer_slot(origin, limit, *epoch, *value)?;
        }
        for (from, limit, epoch, to, value) in &grants {
            b.merge_peer_grant(from, limit, *epoch, to, *value)?;
        }
        for r in &records {
            r.persist(&mut b)?;
        }
        b.commit()
    })();
    if let Err(e) = result {
        Metrics::add(&shared.metrics.commit_errors_total, 1);
        tracing::warn!(error = %e, "could not store values from peers; they wait for the disk");
        let items = slots
            .into_iter()
            .map(|(origin, limit, epoch, value)| Incoming::Slot {
                origin,
                limit,
                epoch,
                value,
            })
            .chain(records.into_iter().map(ConfigRecord::into_incoming))
            .chain(
                grants
                    .into_iter()
                    .map(|(from, limit, epoch, to, value)| Incoming::Grant {
                        from,
                        limit,
                        epoch,
                        to,
                        value,
                    }),
            )
            .collect();
        return Err((e, items));
    }
    let mut state = shared.state.write();
    for (origin, limit, epoch, value) in slots {
        let o = state.origin_idx(&origin);
        state.merge_slot(&limit, epoch, o, value);
    }
    for (from, limit, epoch, to, value) in grants {
        state.merge_grant(&limit, epoch, &from, &to, value);
    }
    let republish: Vec<Publication> = records
        .into_iter()
        .filter_map(|r| r.apply(&mut state, now))
        .collect();
    drop(state);
    for p in republish {
        publish(shared, p);
    }
    note_hellos(shared, hellos);
    Ok(())
}

/// Notes hellos once everything delivered before them is merged (readiness).
fn note_hellos(shared: &Shared, hellos: Vec<(String, i64)>) {
    if hellos.is_empty() {
        return;
    }
    if let Some(c) = shared.cluster.get() {
        let now = shared.clock.now_ms();
        let mut seen = c.hellos.lock();
        for (origin, wall_ms) in hellos {
            let h = seen.entry(origin).or_default();
            if h.merge(wall_ms, now) {
                let lag_ms = h.lag_ms() as u64;
                shared
                    .metrics
                    .gossip_lag_seconds
                    .observe(std::time::Duration::from_millis(lag_ms));
            }
        }
    }
}

#[cfg(test)]
mod tests;

/// One pass of the history sweep: slots of closed epochs that ended more than the
/// retention ago go (never an open epoch; never one a late record could still reach).
fn sweep_history(
    shared: &Shared,
    store: &mut Store,
    cursor: &mut SweepCursor,
    now: i64,
) -> Result<usize, StoreError> {
    let keep = shared.config.history_keep_ms();
    let mut b = store.batch()?;
    let n = {
        let state = shared.state.read();
        b.sweep_history(cursor, HISTORY_SWEEP_ROWS_MAX, &mut |limit, epoch| {
            state.history_expired(limit, epoch, now, keep)
        })?
    };
    if n > 0 {
        b.commit()?;
    }
    Ok(n)
}

/// A limit's history from disk (which holds everything memory does: values reach memory
/// only after they are durable).
fn read_history(
    shared: &Shared,
    store: &Store,
    id: &str,
    q: HistoryQuery,
) -> Result<LimitHistory, NodeError> {
    let now = shared.clock.now_ms();
    let (cal, never) = {
        let state = shared.state.read();
        let cal = state
            .calendar(id, now)
            .ok_or_else(|| NodeError::NotFound(format!("no limit with id {id:?}")))?;
        let never = state
            .limit(id)
            .is_some_and(|s| s.input.period == tally_core::Period::Never);
        (cal, never)
    };
    let since = q.since_ms.unwrap_or(i64::MIN);
    let until = q.until_ms.unwrap_or(i64::MAX);
    let mut rows = store
        .history(
            id,
            until.saturating_sub(1),
            q.epochs_max,
            &mut |e| match cal.window_of(e) {
                None => HistoryScan::Skip,
                Some(w) if w.end_ms <= since => HistoryScan::Stop,
                Some(_) => HistoryScan::Take,
            },
        )
        .map_err(|e| unavailable(&e))?;
    let w = cal.current_window;
    if w.start_ms < until && w.end_ms > since && !rows.iter().any(|r| r.epoch == cal.current) {
        rows.push(EpochRows {
            epoch: cal.current,
            own: None,
            peers: Vec::new(),
            baseline: None,
        });
        rows.sort_by_key(|r| std::cmp::Reverse(r.epoch));
        rows.truncate(q.epochs_max);
    }
    let epochs = rows
        .into_iter()
        .filter_map(|r| {
            let w = cal.window_of(r.epoch)?;
            let current = r.epoch == cal.current;
            let baseline = r
                .baseline
                .unwrap_or(if current { cal.current_baseline } else { 0 });
            let mut nodes: Vec<(String, u64)> = r.peers;
            if let Some(v) = r.own {
                nodes.push((shared.node_id.clone(), v));
            }
            nodes.sort_unstable();
            let used = nodes
                .iter()
                .fold(baseline, |acc, (_, v)| acc.saturating_add(*v));
            Some(EpochHistory {
                epoch: r.epoch,
                period_start_ms: w.start_ms,
                period_end_ms: (w.end_ms != i64::MAX).then_some(w.end_ms),
                used,
                baseline,
                nodes,
                current,
            })
        })
        .collect();
    Ok(LimitHistory {
        metric: cal.metric,
        never,
        epochs,
    })
}
