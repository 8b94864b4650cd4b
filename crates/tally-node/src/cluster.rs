//! The node's side of gossip (DESIGN.md §2, §4): what it publishes, how it merges what
//! others publish, relays for departed nodes, removal of closed epochs from gossip, and
//! readiness.
//!
//! - Own slots are published by the writer after their commit (I3: only durable values).
//! - Values from other nodes go through the writer too: they are made durable (peer slots,
//!   config) before memory changes, so a restart never forgets usage it had counted.
//! - Every node re-publishes every config record and reset register at the highest
//!   version it knows, so config outlives the node that wrote it.
//! - For origins that are not live, a node relays their slots of open epochs under
//!   `r/{origin}/…`, so a node that joins after another was removed still counts it (I1).
//! - Keys of epochs that are not open (`State::is_open`: closed periods, superseded
//!   epochs) are deleted from gossip; they stay on disk as history. The sweep also
//!   re-publishes every own slot of an open epoch that gossip lacks (a record stamped in
//!   the next period is open before it is current): what is published is reconciled with
//!   memory, not only updated at commits.
//! - Readiness ([`Readiness`]): every node republishes a hello (its wall clock) at each
//!   sweep. chitchat delivers a publisher's keys in version order and the writer merges
//!   them in order, so once a hello is merged, so is everything its publisher published
//!   before it. A node is caught up when it merged a fresh hello of every live peer that
//!   holds the cluster key.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tally_core::{EntityRecord, Epoch, LimitRecord, ResetRegister};
use tally_gossip::{
    Gossip, GossipConfig, GossipKey, GossipNetwork, Incoming, Member, encode_record, encode_slot,
};
use tokio::sync::mpsc;

use crate::Shared;
use crate::writer::Op;

/// How this node joins a fleet.
#[derive(Clone)]
pub struct ClusterConfig {
    /// Where and with whom to gossip; its transport is `tally_gossip::udp_transport()`
    /// outside the simulator.
    pub network: GossipNetwork,
    /// How long a caught-up node may be cut off from every peer before it reports not
    /// ready again (`None`: it stays ready while isolated).
    pub isolated_unready_after: Option<Duration>,
}

/// Something the writer made durable that the fleet should learn.
#[derive(Debug)]
pub(crate) enum Publication {
    Slots(Vec<(String, Epoch, u64)>),
    Limit(LimitRecord),
    Entity(EntityRecord),
    Reset(String, ResetRegister),
    /// This node's total grant of a hard limit's rights: (limit, epoch, to, total).
    Grant(String, Epoch, String, u64),
    Decommission(tally_core::DecommissionRecord),
    Price(tally_core::PriceRecord),
}

/// What the writer committed and gossip has not published yet, coalesced by gossip key:
/// the newest value of a key replaces an older one still waiting, so the outbox holds at
/// most one entry per key this node publishes (bounded by the state, not by time), and a
/// slow publisher never stalls the writer.
#[derive(Default)]
pub(crate) struct Outbox {
    pending: parking_lot::Mutex<OutboxItems>,
    ready: tokio::sync::Notify,
}

#[derive(Default)]
struct OutboxItems {
    /// Own slots: the writer commits them in increasing order, so the newest is the max.
    slots: HashMap<(String, Epoch), u64>,
    config: HashMap<GossipKey, Publication>,
    /// Wall clock of the first commit whose values wait here (stamped in a hello).
    first_commit_ms: Option<i64>,
}

impl Outbox {
    /// Queues what a commit made durable at `commit_ms` (this node's wall clock).
    pub(crate) fn push(&self, p: Publication, commit_ms: i64) {
        {
            let mut q = self.pending.lock();
            q.first_commit_ms.get_or_insert(commit_ms);
            match p {
                Publication::Slots(slots) => {
                    for (limit, epoch, v) in slots {
                        let e = q.slots.entry((limit, epoch)).or_default();
                        *e = (*e).max(v);
                    }
                }
                Publication::Limit(r) => {
                    q.config
                        .insert(GossipKey::Limit(r.id.clone()), Publication::Limit(r));
                }
                Publication::Entity(r) => {
                    let key = GossipKey::Entity {
                        dimension: r.dimension.clone(),
                        value: r.value.clone(),
                    };
                    q.config.insert(key, Publication::Entity(r));
                }
                Publication::Reset(id, r) => {
                    q.config
                        .insert(GossipKey::Reset(id.clone()), Publication::Reset(id, r));
                }
                Publication::Grant(limit, epoch, to, total) => {
                    let key = GossipKey::Grant {
                        limit: limit.clone(),
                        epoch,
                        to: to.clone(),
                    };
                    // Grants only grow and the writer commits them in order.
                    q.config
                        .insert(key, Publication::Grant(limit, epoch, to, total));
                }
                Publication::Decommission(r) => {
                    q.config.insert(
                        GossipKey::Decommission(r.node.clone()),
                        Publication::Decommission(r),
                    );
                }
                Publication::Price(r) => {
                    q.config
                        .insert(GossipKey::Price(r.model.clone()), Publication::Price(r));
                }
            }
        }
        self.ready.notify_one();
    }

    /// Waits until something is pending, then takes all of it, with the wall clock of
    /// the first commit it holds.
    async fn take(&self) -> (Vec<(GossipKey, String)>, Option<i64>) {
        loop {
            let items = std::mem::take(&mut *self.pending.lock());
            if !items.slots.is_empty() || !items.config.is_empty() {
                let slots = items
                    .slots
                    .into_iter()
                    .map(|((limit, epoch), v)| (GossipKey::Slot { limit, epoch }, encode_slot(v)));
                let values = slots
                    .chain(items.config.into_values().flat_map(publication_items))
                    .collect();
                return (values, items.first_commit_ms);
            }
            self.ready.notified().await;
        }
    }
}

/// Most batches of values from peers queued for the writer at once; with
/// [`REMOTE_BATCH_MAX`] values each, this bounds what gossip can queue there.
const REMOTE_BATCHES_IN_FLIGHT: usize = 4;
/// Verified values from peers waiting to be batched for the writer.
const INCOMING_QUEUE_MAX: usize = 16_384;

/// State of this node's membership in a fleet.
pub(crate) struct ClusterHandle {
    pub(crate) gossip: Gossip,
    pub(crate) outbox: Outbox,
    /// Caught up with the fleet (what [`Readiness`] last decided).
    pub(crate) caught_up: AtomicBool,
    /// Hellos merged so far, by publisher; written by the writer after it merged
    /// everything delivered before them.
    pub(crate) hellos: parking_lot::Mutex<HashMap<String, HelloSeen>>,
    /// Hard limits: the newest demand for rights of each (asker, limit, epoch) heard.
    pub(crate) demands: parking_lot::Mutex<HashMap<(String, String, Epoch), tally_gossip::Demand>>,
    /// The newest hello stamp this node handed out: stamps only increase, so peers count
    /// each hello they merge. (The sweep and the publisher publish hellos in two tasks, so
    /// one may land just after a newer one; peers ignore a hello that is not newer, and
    /// every hello still follows the values published before it.)
    pub(crate) hello_ms: parking_lot::Mutex<i64>,
}

impl ClusterHandle {
    /// The hello to publish now (`stamp_ms`, or just after the last one if the clock
    /// went back); `None` if a hello went out less than `min_gap_ms` ago.
    fn next_hello(&self, stamp_ms: i64, min_gap_ms: i64) -> Option<(GossipKey, String)> {
        let mut last = self.hello_ms.lock();
        if stamp_ms < *last + min_gap_ms {
            return None;
        }
        *last = stamp_ms.max(*last + 1);
        Some((GossipKey::Hello, tally_gossip::encode_hello(*last)))
    }
}

/// The hellos of one publisher merged so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct HelloSeen {
    /// The newest hello's value: the publisher's wall clock when it published it.
    pub(crate) newest_ms: i64,
    /// How many distinct hellos were merged (only grows).
    pub(crate) count: u64,
    /// This node's clock when the newest one was merged.
    pub(crate) merged_at_ms: i64,
}

impl HelloSeen {
    /// Takes in a hello merged at `now_ms`; `true` if it is newer than every one before.
    pub(crate) fn merge(&mut self, wall_ms: i64, now_ms: i64) -> bool {
        if wall_ms > self.newest_ms || self.count == 0 {
            self.newest_ms = wall_ms;
            self.count += 1;
            self.merged_at_ms = now_ms;
            return true;
        }
        false
    }

    /// The gossip lag of the newest hello: from the peer stamping it (its clock) to this
    /// node merging it (this node's clock); 0 if the peer's clock is ahead.
    pub(crate) fn lag_ms(&self) -> i64 {
        (self.merged_at_ms - self.newest_ms).max(0)
    }
}

/// A live peer whose hellos stopped for this long is not waited for: it is dead and
/// chitchat's failure detector has not said so yet (a node first learned of through
/// others' copies of its state looks live for several seconds). Hellos come every
/// [`SWEEP_EVERY`].
const HELLO_SILENCE_MS: i64 = 3_000;

/// Hellos from one peer that arrive after a sync point prove the stream is live even when
/// the peer's clock is behind this node's (the clock rule of [`Readiness`] would wait for
/// it to catch up).
const FRESH_HELLOS: u64 = 3;

/// When a node is ready (DESIGN.md §4, ARCHITECTURE.md "Readiness"). Pure: the sweep feeds
/// it what it sees, so the rules are unit-tested.
///
/// - A node is *caught up* once, for every live peer that holds the cluster key, it has
///   merged a hello published at or after the sync point (this node's start, or the end of
///   its last isolation), or [`FRESH_HELLOS`] hellos of that peer merged since the sync
///   point. Peers that fail the MAC check (another cluster key) never count; nor do peers
///   whose hellos have been silent for [`HELLO_SILENCE_MS`] (dead, not yet detected).
/// - A node whose seeds are only itself (or none) and that has seen no peer with the key
///   for `bootstrap_grace` is a fleet of one, caught up.
/// - A caught-up node stays caught up while at least one peer is live (a new peer does not
///   make it unready); cut off from every peer for `isolated_unready_after`, it is not
///   caught up until it syncs again with fresh hellos.
#[derive(Debug)]
pub(crate) struct Readiness {
    started_ms: i64,
    solo_allowed: bool,
    bootstrap_grace_ms: i64,
    isolated_unready_ms: Option<i64>,
    sync_after_ms: i64,
    /// Hello counts per peer at the sync point.
    baseline: HashMap<String, u64>,
    isolated_since_ms: Option<i64>,
    caught_up: bool,
}

impl Readiness {
    pub(crate) fn new(
        started_ms: i64,
        solo_allowed: bool,
        bootstrap_grace: Duration,
        isolated_unready_after: Option<Duration>,
    ) -> Readiness {
        Readiness {
            started_ms,
            solo_allowed,
            bootstrap_grace_ms: bootstrap_grace.as_millis() as i64,
            isolated_unready_ms: isolated_unready_after.map(|d| d.as_millis() as i64),
            sync_after_ms: started_ms,
            baseline: HashMap::new(),
            isolated_since_ms: None,
            caught_up: false,
        }
    }

    fn fresh(&self, peer: &str, hellos: &HashMap<String, HelloSeen>) -> bool {
        hellos.get(peer).is_some_and(|h| {
            let since = h.count - self.baseline.get(peer).copied().unwrap_or(0);
            h.newest_ms >= self.sync_after_ms && since > 0 || since >= FRESH_HELLOS
        })
    }

    /// Whether the node is caught up now, given the members it sees and the hellos merged.
    pub(crate) fn evaluate(
        &mut self,
        now_ms: i64,
        me: &str,
        members: &[Member],
        hellos: &HashMap<String, HelloSeen>,
    ) -> bool {
        let peers: Vec<&str> = members
            .iter()
            .filter(|m| m.node_id != me && m.live && m.verified)
            .map(|m| m.node_id.as_str())
            .collect();
        let caught_up = if peers.is_empty() {
            let peer_known = members.iter().any(|m| m.node_id != me && m.verified);
            if self.caught_up {
                let since = *self.isolated_since_ms.get_or_insert(now_ms);
                self.isolated_unready_ms
                    .is_none_or(|grace| now_ms - since < grace)
            } else {
                self.solo_allowed
                    && !peer_known
                    && now_ms - self.started_ms >= self.bootstrap_grace_ms
            }
        } else {
            self.isolated_since_ms = None;
            let silent = |p: &&str| {
                hellos
                    .get(*p)
                    .is_some_and(|h| now_ms - h.merged_at_ms >= HELLO_SILENCE_MS)
            };
            let mut waited = peers.iter().filter(|p| !silent(p)).peekable();
            self.caught_up || waited.peek().is_some() && waited.all(|p| self.fresh(p, hellos))
        };
        if !caught_up && peers.is_empty() {
            // Whatever peer shows up next must prove it is current from here on.
            self.sync_after_ms = now_ms;
            self.baseline = hellos.iter().map(|(k, h)| (k.clone(), h.count)).collect();
        }
        self.caught_up = caught_up;
        caught_up
    }
}

/// How often relays, closed-epoch removal and readiness are re-evaluated, and the hello
/// republished.
const SWEEP_EVERY: Duration = Duration::from_millis(500);
/// How long a node whose only seed is itself waits for a peer before it decides it is a
/// fleet of one: long enough for peers that seed it to find it after it restarted (they
/// gossip to their seeds and to nodes they saw die every round or two).
const BOOTSTRAP_GRACE_MIN: Duration = Duration::from_secs(3);
const BOOTSTRAP_GRACE_ROUNDS: u32 = 30;
/// Most remote values merged in one durable batch.
const REMOTE_BATCH_MAX: usize = 4096;

fn payload<T: tally_core::codec::Record>(what: &str, rec: &T) -> Option<String> {
    match encode_record(rec) {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::error!(%what, error = %e, "config record too large to gossip; it stays local to this node");
            None
        }
    }
}

fn publication_items(p: Publication) -> Vec<(GossipKey, String)> {
    match p {
        Publication::Slots(slots) => slots
            .into_iter()
            .map(|(limit, epoch, v)| (GossipKey::Slot { limit, epoch }, encode_slot(v)))
            .collect(),
        Publication::Limit(r) => payload("limit", &r)
            .map(|p| (GossipKey::Limit(r.id.clone()), p))
            .into_iter()
            .collect(),
        Publication::Entity(r) => payload("entity", &r)
            .map(|p| {
                (
                    GossipKey::Entity {
                        dimension: r.dimension.clone(),
                        value: r.value.clone(),
                    },
                    p,
                )
            })
            .into_iter()
            .collect(),
        Publication::Reset(id, r) => payload("reset", &r)
            .map(|p| (GossipKey::Reset(id), p))
            .into_iter()
            .collect(),
        Publication::Grant(limit, epoch, to, total) => {
            vec![(GossipKey::Grant { limit, epoch, to }, encode_slot(total))]
        }
        Publication::Decommission(r) => payload("decommission", &r)
            .map(|p| (GossipKey::Decommission(r.node.clone()), p))
            .into_iter()
            .collect(),
        Publication::Price(r) => payload("price", &r)
            .map(|p| (GossipKey::Price(r.model.clone()), p))
            .into_iter()
            .collect(),
    }
}

/// Everything this node should publish right now: own current slots and all config, and
/// the hello's stamp.
fn snapshot(shared: &Shared) -> (Vec<(GossipKey, String)>, i64) {
    let now = shared.clock.now_ms();
    let state = shared.state.read();
    let me = state.me();
    let mut out = Vec::new();
    for (limit, epoch, counter) in state.counters() {
        if state.is_open(limit, epoch, now) {
            let v = counter.slot(me);
            if v > 0 {
                out.push((
                    GossipKey::Slot {
                        limit: limit.to_string(),
                        epoch,
                    },
                    encode_slot(v),
                ));
            }
        }
    }
    out.extend(own_grants(&state, now));
    out.push((GossipKey::Hello, tally_gossip::encode_hello(now)));
    let mut pubs = Vec::new();
    pubs.extend(
        state
            .decommission_records()
            .cloned()
            .map(Publication::Decommission),
    );
    pubs.extend(state.limit_records().cloned().map(Publication::Limit));
    pubs.extend(state.entity_records().cloned().map(Publication::Entity));
    pubs.extend(state.price_records().cloned().map(Publication::Price));
    pubs.extend(
        state
            .reset_registers()
            .map(|(id, r)| Publication::Reset(id.to_string(), r.clone())),
    );
    drop(state);
    out.extend(pubs.into_iter().flat_map(publication_items));
    (out, now)
}

/// This node's grants of open epochs, as gossip items.
fn own_grants(state: &tally_core::State, now: i64) -> Vec<(GossipKey, String)> {
    let mut out = Vec::new();
    for (limit, epoch, _) in state.counters() {
        if !state.is_open(limit, epoch, now) {
            continue;
        }
        let Some(idx) = state.limit_idx(limit) else {
            continue;
        };
        for (to, total) in state.grant_row(idx, epoch, state.node_id()) {
            out.push((
                GossipKey::Grant {
                    limit: limit.to_string(),
                    epoch,
                    to: to.to_string(),
                },
                encode_slot(total),
            ));
        }
    }
    out
}

/// Why a node could not join its fleet.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    #[error(transparent)]
    Gossip(#[from] tally_gossip::GossipError),
    #[error("the cluster is already started")]
    AlreadyStarted,
}

/// Starts gossip for a node and the tasks that connect the two.
pub(crate) async fn start(
    shared: Arc<Shared>,
    writer: std::sync::mpsc::Sender<Op>,
    config: ClusterConfig,
) -> Result<(), ClusterError> {
    let (in_tx, mut in_rx) = mpsc::channel::<Incoming>(INCOMING_QUEUE_MAX);
    let generation = shared.clock.now_ms().max(0) as u64;
    let (initial, hello_ms) = snapshot(&shared);
    let gossip = Gossip::start(
        GossipConfig {
            node_id: shared.node_id.clone(),
            generation,
            network: config.network.clone(),
            dead_node_grace: Duration::from_secs(3600),
            tombstone_grace: Duration::from_secs(600),
        },
        initial,
        in_tx,
    )
    .await?;
    // With no seeds other than itself, a node may be the first of its fleet.
    let solo_allowed = config.network.seeds.iter().all(|s| {
        s.parse::<SocketAddr>()
            .is_ok_and(|a| a == config.network.advertise || a == config.network.listen)
    });
    let mut readiness = Readiness::new(
        shared.clock.now_ms(),
        solo_allowed,
        BOOTSTRAP_GRACE_MIN.max(config.network.interval * BOOTSTRAP_GRACE_ROUNDS),
        config.isolated_unready_after,
    );
    if shared
        .cluster
        .set(ClusterHandle {
            gossip,
            outbox: Outbox::default(),
            caught_up: AtomicBool::new(false),
            hellos: parking_lot::Mutex::new(HashMap::new()),
            demands: parking_lot::Mutex::new(HashMap::new()),
            hello_ms: parking_lot::Mutex::new(hello_ms),
        })
        .is_err()
    {
        return Err(ClusterError::AlreadyStarted);
    }

    // Incoming: batch what is available and hand it to the writer, at most
    // REMOTE_BATCHES_IN_FLIGHT batches at a time; while the writer is behind, the bounded
    // channels back up to gossip, which drops and counts what does not fit and re-reads
    // it from chitchat's state later (tally-gossip, `Gossip::start`).
    let in_flight = Arc::new(tokio::sync::Semaphore::new(REMOTE_BATCHES_IN_FLIGHT));
    let s = shared.clone();
    let w = writer.clone();
    tokio::spawn(async move {
        let writer = w;
        while let Some(first) = in_rx.recv().await {
            let mut items = vec![first];
            while items.len() < REMOTE_BATCH_MAX {
                match in_rx.try_recv() {
                    Ok(i) => items.push(i),
                    Err(_) => break,
                }
            }
            // Demands for rights are for the rights task, not for the disk.
            if let Some(c) = s.cluster.get() {
                let mut demands = None;
                items.retain_mut(|i| match i {
                    Incoming::Demand {
                        from,
                        limit,
                        epoch,
                        demand,
                    } => {
                        demands.get_or_insert_with(|| c.demands.lock()).insert(
                            (std::mem::take(from), std::mem::take(limit), *epoch),
                            demand.clone(),
                        );
                        false
                    }
                    _ => true,
                });
                if items.is_empty() {
                    continue;
                }
            }
            let Ok(permit) = in_flight.clone().acquire_owned().await else {
                return;
            };
            s.writer_ops.fetch_add(1, Ordering::SeqCst);
            if writer
                .send(Op::Remote {
                    items,
                    _permit: permit,
                })
                .is_err()
            {
                return;
            }
        }
    });

    // Hard limits: ask for rights when short, grant when asked (module `rights`).
    let s = shared.clone();
    let interval = config.network.interval;
    tokio::spawn(async move {
        let mut task = crate::rights::RightsTask::new(s.clock.now_ms());
        let every = interval.max(Duration::from_millis(50));
        loop {
            tokio::time::sleep(every).await;
            let Some(c) = s.cluster.get() else { return };
            let members = c.gossip.members().await;
            let (publish, unpublish, grants) = task.round(&s, c, &members, every);
            if !publish.is_empty() {
                c.gossip.publish(publish).await;
            }
            if !unpublish.is_empty() {
                c.gossip.unpublish(unpublish).await;
            }
            for op in grants {
                s.writer_ops.fetch_add(1, Ordering::SeqCst);
                if writer.send(op).is_err() {
                    return;
                }
            }
        }
    });

    // Outgoing: publish what the writer committed. After the values, a hello stamped with
    // the first of their commits, at most one per gossip round: peers measure the gossip
    // lag from it (the time from that commit to their merge of it), and the next round
    // carries it with the values it follows (the hello is set last, so its version is the
    // highest). Commits within a round share the hello of the first, whose lag includes
    // the wait for the round.
    let s = shared.clone();
    let round_ms = config.network.interval.as_millis() as i64;
    tokio::spawn(async move {
        let Some(c) = s.cluster.get() else { return };
        loop {
            let (mut items, first_commit_ms) = c.outbox.take().await;
            if let Some(hello) = first_commit_ms.and_then(|t| c.next_hello(t, round_ms)) {
                items.push(hello);
            }
            c.gossip.publish(items).await;
        }
    });

    // Sweep: hello, relays, closed epochs, readiness.
    let s = shared.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(SWEEP_EVERY).await;
            let Some(c) = s.cluster.get() else { return };
            let now = s.clock.now_ms();
            if let Some(hello) = c.next_hello(now, 0) {
                c.gossip.publish(vec![hello]).await;
            }
            let members = c.gossip.members().await;
            sweep(&s, c, &members).await;
            let hellos = c.hellos.lock().clone();
            let caught_up = readiness.evaluate(now, &s.node_id, &members, &hellos);
            if caught_up != c.caught_up.swap(caught_up, Ordering::Relaxed) {
                if caught_up {
                    tracing::info!("caught up with the fleet: ready");
                } else {
                    tracing::warn!(
                        "cut off from every peer of the fleet: not ready until it syncs again; check the network between nodes"
                    );
                }
            }
        }
    });
    Ok(())
}

async fn sweep(shared: &Shared, c: &ClusterHandle, members: &[Member]) {
    let now = shared.clock.now_ms();
    let live: HashSet<&str> = members
        .iter()
        .filter(|m| m.live)
        .map(|m| m.node_id.as_str())
        .collect();
    let own_slot_keys = c.gossip.own_keys(tally_gossip::SLOT_PREFIX).await;
    let own_relay_keys = c.gossip.own_keys(tally_gossip::RELAY_PREFIX).await;
    let mut own_config_keys = c.gossip.own_keys(tally_gossip::LIMIT_PREFIX).await;
    own_config_keys.extend(c.gossip.own_keys(tally_gossip::ENTITY_PREFIX).await);
    own_config_keys.extend(c.gossip.own_keys(tally_gossip::GRANT_PREFIX).await);
    let (relays, missing, stale) = {
        let published: HashSet<&str> = own_slot_keys.iter().map(String::as_str).collect();
        let state = shared.state.read();
        let me = state.me();
        let mut relays = Vec::new();
        let mut missing = Vec::new();
        for (limit, epoch, counter) in state.counters() {
            if !state.is_open(limit, epoch, now) {
                continue;
            }
            for &(o, v) in counter.slots() {
                if v == 0 {
                    continue;
                }
                if o == me {
                    let key = GossipKey::Slot {
                        limit: limit.to_string(),
                        epoch,
                    };
                    if !published.contains(key.encode().as_str()) {
                        missing.push((key, encode_slot(v)));
                    }
                    continue;
                }
                let origin = state.origin_name(o);
                if !live.contains(origin) {
                    relays.push((
                        GossipKey::Relay {
                            origin: origin.to_string(),
                            limit: limit.to_string(),
                            epoch,
                        },
                        encode_slot(v),
                    ));
                }
            }
        }
        let stale: Vec<String> = own_slot_keys
            .into_iter()
            .chain(own_relay_keys)
            .chain(own_config_keys)
            .filter(|k| match GossipKey::parse(k) {
                Some(GossipKey::Slot { limit, epoch }) => !state.is_open(&limit, epoch, now),
                Some(GossipKey::Relay {
                    origin,
                    limit,
                    epoch,
                }) => live.contains(origin.as_str()) || !state.is_open(&limit, epoch, now),
                // Tombstones past their retention are forgotten here: stop gossiping them.
                Some(GossipKey::Limit(id)) => state.limit_record(&id).is_none(),
                Some(GossipKey::Entity { dimension, value }) => {
                    state.entity_record(&dimension, &value).is_none()
                }
                Some(GossipKey::Grant { limit, epoch, .. }) => !state.is_open(&limit, epoch, now),
                _ => true,
            })
            .collect();
        (relays, missing, stale)
    };
    if !missing.is_empty() {
        tracing::debug!(
            slots = missing.len(),
            "re-publishing own slots of open epochs that gossip lacked"
        );
    }
    c.gossip.publish(relays).await;
    c.gossip.publish_missing(missing).await;
    c.gossip.unpublish(stale).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_795_327_200_000;

    fn member(id: &str, live: bool, verified: bool) -> Member {
        Member {
            node_id: id.into(),
            gossip_addr: "127.0.0.1:1".parse().unwrap(),
            live,
            generation: 1,
            newest_value_age: None,
            verified,
        }
    }

    /// Hellos (publisher, newest hello, count), merged just now as far as the tests go.
    fn hellos(entries: &[(&str, i64, u64)]) -> HashMap<String, HelloSeen> {
        entries
            .iter()
            .map(|&(id, newest_ms, count)| {
                let h = HelloSeen {
                    newest_ms,
                    count,
                    merged_at_ms: i64::MAX / 2, // never silent in these tests
                };
                (id.to_string(), h)
            })
            .collect()
    }

    fn readiness(solo: bool) -> Readiness {
        Readiness::new(
            T0,
            solo,
            Duration::from_secs(3),
            Some(Duration::from_secs(10)),
        )
    }

    #[test]
    fn hello_seen_counts_distinct_newer_hellos() {
        let mut h = HelloSeen::default();
        assert!(h.merge(5, 100));
        assert!(!h.merge(5, 200));
        assert!(!h.merge(4, 300));
        let want = HelloSeen {
            newest_ms: 5,
            count: 1,
            merged_at_ms: 100,
        };
        assert_eq!(h, want);
        assert_eq!(h.lag_ms(), 95);
        assert!(h.merge(9, 400));
        let want = HelloSeen {
            newest_ms: 9,
            count: 2,
            merged_at_ms: 400,
        };
        assert_eq!(h, want);
        assert_eq!(h.lag_ms(), 391);
        // A peer whose clock is ahead: no negative lag.
        assert!(h.merge(1_000, 500));
        assert_eq!(h.lag_ms(), 0);
    }

    #[test]
    fn a_fleet_of_one_waits_out_the_bootstrap_grace() {
        let me = [member("a", true, true)];
        let mut r = readiness(true);
        assert!(!r.evaluate(T0 + 2_999, "a", &me, &HashMap::new()));
        assert!(r.evaluate(T0 + 3_000, "a", &me, &HashMap::new()));
        // A node with seeds that are not itself never is one.
        let mut r = readiness(false);
        assert!(!r.evaluate(T0 + 60_000, "a", &me, &HashMap::new()));
    }

    #[test]
    fn a_peer_with_another_key_neither_counts_nor_blocks() {
        let seen = [member("a", true, true), member("x", true, false)];
        let mut r = readiness(true);
        assert!(r.evaluate(T0 + 3_000, "a", &seen, &HashMap::new()));
        // Seeded by others, a node that only meets a peer with the wrong key never syncs.
        let mut r = readiness(false);
        assert!(!r.evaluate(T0 + 60_000, "x", &seen[1..], &HashMap::new()));
        let bad = [member("x", true, true), member("a", true, false)];
        assert!(!r.evaluate(T0 + 60_000, "x", &bad, &HashMap::new()));
    }

    #[test]
    fn catching_up_needs_a_fresh_hello_from_every_live_peer() {
        let seen = [
            member("a", true, true),
            member("b", true, true),
            member("c", true, true),
            member("d", false, true),
        ];
        let mut r = readiness(true);
        // A self-seeded node that meets peers inside the grace must sync with them.
        assert!(!r.evaluate(T0 + 500, "a", &seen, &HashMap::new()));
        // b's hello predates this node's start: it does not prove b is current.
        let h = hellos(&[("b", T0 - 1, 1), ("c", T0 + 400, 1)]);
        assert!(!r.evaluate(T0 + 4_000, "a", &seen, &h));
        let h = hellos(&[("b", T0 + 600, 2), ("c", T0 + 400, 1)]);
        assert!(r.evaluate(T0 + 4_500, "a", &seen, &h));
        // A dead peer first known through others' copies looks live to chitchat for a
        // while; once its hellos are silent it is not waited for.
        let mut r2 = readiness(false);
        let mut h2 = hellos(&[("b", T0 + 600, 2), ("c", T0 + 400, 1)]);
        h2.insert(
            "d".into(),
            HelloSeen {
                newest_ms: T0 - 9_000,
                count: 1,
                merged_at_ms: T0 + 1_000,
            },
        );
        let d_live = [&seen[..3], &[member("d", true, true)]].concat();
        assert!(!r2.evaluate(T0 + 3_999, "a", &d_live, &h2));
        assert!(r2.evaluate(T0 + 4_000, "a", &d_live, &h2));
        // A dead peer first known through others' copies looks live to chitchat for a
        // while; once its hellos are silent it is not waited for.
        let mut r2 = readiness(false);
        let mut h2 = h.clone();
        let d_hello = HelloSeen {
            newest_ms: T0 - 9_000,
            count: 1,
            merged_at_ms: T0 + 1_000,
        };
        h2.insert("d".into(), d_hello);
        let d_live = [&seen[..3], &[member("d", true, true)]].concat();
        assert!(!r2.evaluate(T0 + 3_999, "a", &d_live, &h2));
        assert!(r2.evaluate(T0 + 4_000, "a", &d_live, &h2));
        // Once caught up, a newcomer does not make the node unready.
        let more = [seen.as_slice(), &[member("e", true, true)]].concat();
        assert!(r.evaluate(T0 + 5_000, "a", &more, &h));
    }

    #[test]
    fn a_peer_whose_clock_is_behind_syncs_by_counting_hellos() {
        let seen = [member("a", true, true), member("b", true, true)];
        let mut r = readiness(false);
        let behind = T0 - 60_000;
        let h = hellos(&[("b", behind, 2)]);
        assert!(!r.evaluate(T0 + 100, "a", &seen, &h));
        // Hellos are counted from the sync point (here the start, when none were merged).
        let h = hellos(&[("b", behind + 1_500, FRESH_HELLOS)]);
        assert!(r.evaluate(T0 + 1_600, "a", &seen, &h));
    }

    #[test]
    fn isolation_makes_a_node_unready_until_it_syncs_again() {
        let alive = [member("a", true, true), member("b", true, true)];
        let cut = [member("a", true, true), member("b", false, true)];
        let mut r = readiness(false);
        let h = hellos(&[("b", T0 + 100, 1)]);
        assert!(r.evaluate(T0 + 200, "a", &alive, &h));
        assert!(r.evaluate(T0 + 1_000, "a", &cut, &h));
        assert!(r.evaluate(T0 + 10_999, "a", &cut, &h), "within the grace");
        assert!(!r.evaluate(T0 + 11_000, "a", &cut, &h));
        assert!(!r.evaluate(T0 + 20_000, "a", &cut, &h));
        // Back, b must prove it is current after the isolation: an old hello does not.
        assert!(!r.evaluate(T0 + 20_500, "a", &alive, &h));
        let h = hellos(&[("b", T0 + 20_600, 2)]);
        assert!(r.evaluate(T0 + 21_000, "a", &alive, &h));
        // After another isolation, hellos are counted from its end (b's clock is behind).
        assert!(r.evaluate(T0 + 22_000, "a", &cut, &h));
        assert!(!r.evaluate(T0 + 40_000, "a", &cut, &h));
        let h = hellos(&[("b", T0, 2 + FRESH_HELLOS - 1)]);
        assert!(!r.evaluate(T0 + 40_500, "a", &alive, &h));
        let h = hellos(&[("b", T0, 2 + FRESH_HELLOS)]);
        assert!(r.evaluate(T0 + 41_000, "a", &alive, &h));
        // Without the grace setting, an isolated node stays ready.
        let mut r = Readiness::new(T0, false, Duration::from_secs(3), None);
        assert!(r.evaluate(T0 + 200, "a", &alive, &h));
        assert!(r.evaluate(T0 + 999_000, "a", &cut, &h));
    }
}
