//! The single writer: group commit of records and config changes (DESIGN.md §4).
//!
//! Records are planned against memory, written to one redb transaction together with their
//! dedup ids, committed with one fsync, and only then applied to memory and acknowledged.
//! A config change is committed in a transaction of its own (after the records queued
//! before it), so each change sees the ones before it. If a commit fails, nothing of that
//! batch reaches memory and every caller gets `Unavailable`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use tally_core::{
    EntityRecord, Epoch, Increment, LimitIdx, LimitRecord, ResetRegister, Scope, State,
};
use tally_store::{Batch, Store, StoreError};
use tokio::sync::{OwnedSemaphorePermit, oneshot};

use tally_gossip::Incoming;

use crate::cluster::Publication;
use crate::{Metrics, NodeError, Shared, UsageRecord};

pub(crate) enum ConfigChange {
    PutLimit(String, tally_core::LimitInput),
    DeleteLimit(String),
    Reset(String, u64),
    PutEntity(String, String, Scope),
    DeleteEntity(String, String),
}

/// Where a records op's answer goes: per record, applied or already seen; and the records
/// themselves, handed back so the caller can reuse them and frees them on its own thread.
pub(crate) type RecordsReply = oneshot::Sender<(Result<Vec<bool>, NodeError>, Vec<UsageRecord>)>;

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
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// How often the writer advances windows and expires dedup ids when idle.
const MAINTENANCE_EVERY: Duration = Duration::from_millis(100);
/// Expiry runs every second and forgets at most this many ids per pass (whole log rows,
/// a few ms of the writer's time), so it keeps up with 100 000 records/s.
const DEDUP_EXPIRE_EVERY: Duration = Duration::from_secs(1);
const DEDUP_EXPIRE_MAX: usize = 100_000;

fn unavailable(e: &StoreError) -> NodeError {
    NodeError::Unavailable(format!("could not store the write durably: {e}"))
}

/// A group of record ops being committed together.
struct Group<'a> {
    batch: Batch<'a>,
    /// New values of this node's slots, by (limit, epoch).
    pending: HashMap<(LimitIdx, Epoch), u64, foldhash::fast::RandomState>,
    replies: Vec<(RecordsReply, Vec<bool>, Vec<UsageRecord>)>,
    records: usize,
    shared: &'a Shared,
}

impl Group<'_> {
    fn add(&mut self, records: &[UsageRecord]) -> Result<Vec<bool>, StoreError> {
        let now = self.shared.clock.now_ms();
        let window = self.shared.config.dedup_window_ms;
        let state = self.shared.state.read();
        let mut incs: Vec<Increment> = Vec::with_capacity(8);
        let mut applied = Vec::with_capacity(records.len());
        for r in records {
            // The batch also knows the ids it holds, so a repeat inside one group is caught.
            if self.batch.dedup_contains(&r.id, now)? {
                applied.push(false);
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
            // A record is accepted while its `at` is inside the window (`at > now -
            // window`), and `at` may be ahead of now: the id must be remembered for as long
            // as a retry of the same record could still be accepted (I2).
            let at = r.at_ms.unwrap_or(now);
            self.batch.dedup_insert(&r.id, at.max(now) + window)?;
            applied.push(true);
        }
        self.records += records.len();
        Ok(applied)
    }

    fn commit(mut self) {
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
                        state.merge_slot_idx(limit, epoch, me, value);
                    }
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
                Metrics::add(&m.commits_total, 1);
                Metrics::add(&m.commit_records_total, self.records as u64);
                Metrics::add(
                    &m.commit_seconds_micros_total,
                    started.elapsed().as_micros() as u64,
                );
                for (reply, applied, records) in self.replies {
                    let n = applied.iter().filter(|a| **a).count() as u64;
                    Metrics::add(&m.records_applied_total, n);
                    Metrics::add(&m.records_duplicate_total, applied.len() as u64 - n);
                    let _ = reply.send((Ok(applied), records));
                }
            }
            Err(e) => {
                Metrics::add(&m.commit_errors_total, 1);
                tracing::error!(error = %e, records = self.records, "group commit failed; nothing of it was acknowledged");
                for (reply, _, records) in self.replies {
                    let _ = reply.send((Err(unavailable(&e)), records));
                }
            }
        }
    }
}

pub(crate) fn run(shared: Arc<Shared>, mut store: Store, rx: Receiver<Op>) {
    let mut last = Maintained {
        tick: Instant::now(),
        expire: Instant::now(),
    };
    let mut carry: Option<Op> = None;
    loop {
        let first = match carry.take() {
            Some(op) => op,
            None => match rx.recv_timeout(MAINTENANCE_EVERY) {
                Ok(op) => op,
                Err(RecvTimeoutError::Timeout) => {
                    maintain(&shared, &mut store, &mut last);
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return,
            },
        };
        match first {
            Op::Shutdown { reply } => {
                // Close the database before replying, so the caller may reopen it at once.
                drop(store);
                tracing::info!("writer stopped: everything acknowledged is committed");
                let _ = reply.send(());
                return;
            }
            Op::Config { change, reply, .. } => {
                let _ = reply.send(apply_config(&shared, &mut store, change));
            }
            Op::Remote { items } => apply_remote(&shared, &mut store, items),
            Op::Records { records, reply, .. } => {
                let mut group = match store.batch() {
                    Ok(batch) => Group {
                        batch,
                        pending: HashMap::default(),
                        replies: Vec::new(),
                        records: 0,
                        shared: &shared,
                    },
                    Err(e) => {
                        let _ = reply.send((Err(unavailable(&e)), records));
                        continue;
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
                                let _ = reply.send((Err(unavailable(&e)), records));
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
                        Ok(Op::Records { records, reply, .. }) => next = Some((records, reply)),
                        Ok(other) => carry = Some(other),
                        Err(_) => {}
                    }
                }
                if let Some(e) = failed {
                    for (reply, _, records) in group.replies {
                        let _ = reply.send((Err(unavailable(&e)), records));
                    }
                    continue;
                }
                group.commit();
            }
        }
        if last.tick.elapsed() >= MAINTENANCE_EVERY {
            maintain(&shared, &mut store, &mut last);
        }
    }
}

/// When maintenance last ran.
struct Maintained {
    tick: Instant,
    expire: Instant,
}

/// Advances windows; every second expires dedup ids and old tombstones (a commit only
/// when there is something to forget).
fn maintain(shared: &Shared, store: &mut Store, last: &mut Maintained) {
    last.tick = Instant::now();
    let now = shared.clock.now_ms();
    shared.state.write().tick(now);
    if last.expire.elapsed() < DEDUP_EXPIRE_EVERY {
        return;
    }
    last.expire = Instant::now();
    let result = (|| {
        let (limits, entities) = shared.state.write().gc_tombstones(now);
        let mut b = store.batch()?;
        let n = b.dedup_expire(now, DEDUP_EXPIRE_MAX)?;
        for id in &limits {
            b.remove_limit(id)?;
        }
        for (d, v) in &entities {
            b.remove_entity(d, v)?;
        }
        if n > 0 || !limits.is_empty() || !entities.is_empty() {
            b.commit()?;
        }
        Ok::<_, StoreError>(n)
    })();
    match result {
        Ok(n) => Metrics::add(&shared.metrics.dedup_expired_total, n as u64),
        Err(e) => tracing::warn!(error = %e, "expiring dedup ids failed; will retry"),
    }
}

/// A config record, from this node's API or from a peer: persisted, then applied.
enum ConfigRecord {
    Limit(LimitRecord),
    Entity(EntityRecord),
    Reset(String, ResetRegister),
}

impl ConfigRecord {
    fn persist(&self, b: &mut Batch) -> Result<(), StoreError> {
        match self {
            ConfigRecord::Limit(r) => b.put_limit(r),
            ConfigRecord::Entity(r) => b.put_entity(r),
            ConfigRecord::Reset(id, r) => b.put_reset(id, r),
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
        }
    }
}

fn apply_config(shared: &Shared, store: &mut Store, change: ConfigChange) -> Result<(), NodeError> {
    let now = shared.clock.now_ms();
    let record = {
        let mut state = shared.state.write();
        match change {
            ConfigChange::PutLimit(id, input) => {
                ConfigRecord::Limit(state.prepare_limit_put(&id, input, now)?)
            }
            ConfigChange::DeleteLimit(id) => {
                ConfigRecord::Limit(state.prepare_limit_delete(&id, now)?)
            }
            ConfigChange::Reset(id, baseline) => {
                let reg = state.prepare_reset(&id, baseline, now)?;
                ConfigRecord::Reset(id, reg)
            }
            ConfigChange::PutEntity(d, v, parents) => {
                ConfigRecord::Entity(state.prepare_entity_put(&d, &v, parents, now)?)
            }
            ConfigChange::DeleteEntity(d, v) => {
                ConfigRecord::Entity(state.prepare_entity_delete(&d, &v, now)?)
            }
        }
    };
    let result = (|| {
        let mut b = store.batch()?;
        record.persist(&mut b)?;
        b.commit()
    })();
    if let Err(e) = result {
        Metrics::add(&shared.metrics.commit_errors_total, 1);
        tracing::error!(error = %e, "config change not committed");
        return Err(unavailable(&e));
    }
    record.log();
    let publication = record.apply(&mut shared.state.write(), now);
    if let Some(p) = publication {
        publish(shared, p);
    }
    Ok(())
}

/// Hands durable changes to gossip, when the node is clustered.
fn publish(shared: &Shared, p: Publication) {
    if let Some(c) = shared.cluster.get() {
        let _ = c.publish.send(p);
    }
}

/// Merges values from other nodes: keeps only what is news (a higher slot, a newer
/// record), makes it durable, then applies it to memory. Own slots echoed back are
/// ignored: this node's slots come only from its own disk.
fn apply_remote(shared: &Shared, store: &mut Store, items: Vec<Incoming>) {
    let now = shared.clock.now_ms();
    let mut hellos = Vec::new();
    let (slots, records) = {
        let state = shared.state.read();
        let me = state.node_id();
        let mut slots = Vec::new();
        let mut records = Vec::new();
        for item in items {
            let record = match item {
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
                Incoming::Reset(id, r) => ConfigRecord::Reset(id, r),
            };
            if !record.is_known(&state) {
                records.push(record);
            }
        }
        (slots, records)
    };
    if slots.is_empty() && records.is_empty() {
        note_hellos(shared, hellos);
        return;
    }
    let result = (|| {
        let mut b = store.batch()?;
        for (origin, limit, epoch, value) in &slots {
            b.merge_peer_slot(origin, limit, *epoch, *value)?;
        }
        for r in &records {
            r.persist(&mut b)?;
        }
        b.commit()
    })();
    if let Err(e) = result {
        Metrics::add(&shared.metrics.commit_errors_total, 1);
        tracing::error!(error = %e, "could not store values from peers; gossip will deliver them again");
        return;
    }
    let mut state = shared.state.write();
    for (origin, limit, epoch, value) in slots {
        let o = state.origin_idx(&origin);
        state.merge_slot(&limit, epoch, o, value);
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
            seen.entry(origin).or_default().merge(wall_ms, now);
        }
    }
}
