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

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tally_core::{EntityRecord, Epoch, LimitRecord, ResetRegister};
use tally_gossip::{
    ClusterKey, Gossip, GossipConfig, GossipKey, Incoming, Member, encode_record, encode_slot,
};
use tokio::sync::mpsc;

use crate::Shared;
use crate::writer::Op;

/// How this node joins a fleet.
#[derive(Clone)]
pub struct ClusterConfig {
    pub listen: SocketAddr,
    pub advertise: SocketAddr,
    pub seeds: Vec<String>,
    pub cluster_id: String,
    pub key: ClusterKey,
    pub interval: Duration,
    /// The gossip network: `tally_gossip::udp_transport()` outside the simulator.
    pub transport: Arc<dyn tally_gossip::Transport>,
}

/// Something the writer made durable that the fleet should learn.
#[derive(Debug)]
pub(crate) enum Publication {
    Slots(Vec<(String, Epoch, u64)>),
    Limit(LimitRecord),
    Entity(EntityRecord),
    Reset(String, ResetRegister),
}

/// State of this node's membership in a fleet.
pub(crate) struct ClusterHandle {
    pub(crate) gossip: Gossip,
    pub(crate) publish: mpsc::UnboundedSender<Publication>,
    pub(crate) ready: AtomicBool,
    pub(crate) config: ClusterConfig,
}

/// How often relays, closed-epoch removal and readiness are re-evaluated.
const SWEEP_EVERY: Duration = Duration::from_millis(500);
/// Most remote values merged in one durable batch.
const REMOTE_BATCH_MAX: usize = 4096;

fn payload<T: serde::Serialize>(what: &str, rec: &T) -> Option<String> {
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
    }
}

/// Everything this node should publish right now: own current slots and all config.
fn snapshot(shared: &Shared) -> Vec<(GossipKey, String)> {
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
    let mut pubs = Vec::new();
    pubs.extend(state.limit_records().cloned().map(Publication::Limit));
    pubs.extend(state.entity_records().cloned().map(Publication::Entity));
    pubs.extend(
        state
            .reset_registers()
            .map(|(id, r)| Publication::Reset(id.to_string(), r.clone())),
    );
    drop(state);
    out.extend(pubs.into_iter().flat_map(publication_items));
    out
}

/// Starts gossip for a node and the tasks that connect the two.
pub(crate) async fn start(
    shared: Arc<Shared>,
    writer: std::sync::mpsc::Sender<Op>,
    config: ClusterConfig,
) -> anyhow::Result<()> {
    let (in_tx, mut in_rx) = mpsc::unbounded_channel::<Incoming>();
    let generation = shared.clock.now_ms().max(0) as u64;
    let gossip = Gossip::start(
        GossipConfig {
            node_id: shared.node_id.clone(),
            generation,
            listen: config.listen,
            advertise: config.advertise,
            seeds: config.seeds.clone(),
            cluster_id: config.cluster_id.clone(),
            key: config.key.clone(),
            interval: config.interval,
            dead_node_grace: Duration::from_secs(3600),
            tombstone_grace: Duration::from_secs(600),
            transport: config.transport.clone(),
        },
        snapshot(&shared),
        in_tx,
    )
    .await?;
    let (pub_tx, mut pub_rx) = mpsc::unbounded_channel::<Publication>();
    // With no seeds other than itself, a node has nobody to catch up with.
    let ready = config.seeds.iter().all(|s| {
        s.parse::<SocketAddr>()
            .is_ok_and(|a| a == config.advertise || a == config.listen)
    });
    if shared
        .cluster
        .set(ClusterHandle {
            gossip,
            publish: pub_tx,
            ready: AtomicBool::new(ready),
            config,
        })
        .is_err()
    {
        anyhow::bail!("the cluster is already started");
    }

    // Incoming: batch what is available and hand it to the writer.
    let s = shared.clone();
    tokio::spawn(async move {
        while let Some(first) = in_rx.recv().await {
            let mut items = vec![first];
            while items.len() < REMOTE_BATCH_MAX {
                match in_rx.try_recv() {
                    Ok(i) => items.push(i),
                    Err(_) => break,
                }
            }
            s.remote_pending.fetch_add(items.len(), Ordering::SeqCst);
            if writer.send(Op::Remote { items }).is_err() {
                return;
            }
        }
    });

    // Outgoing: publish what the writer committed.
    let s = shared.clone();
    tokio::spawn(async move {
        while let Some(first) = pub_rx.recv().await {
            let mut items = publication_items(first);
            while let Ok(p) = pub_rx.try_recv() {
                items.extend(publication_items(p));
            }
            if let Some(c) = s.cluster.get() {
                c.gossip.publish(items).await;
            }
        }
    });

    // Sweep: relays, closed epochs, readiness.
    let s = shared.clone();
    tokio::spawn(async move {
        let mut first_live_peer: Option<Instant> = None;
        loop {
            tokio::time::sleep(SWEEP_EVERY).await;
            let Some(c) = s.cluster.get() else { return };
            let members = c.gossip.members().await;
            sweep(&s, c, &members).await;
            if !c.ready.load(Ordering::Relaxed) {
                let live_peer = members.iter().any(|m| m.live && m.node_id != s.node_id);
                if live_peer {
                    let since = *first_live_peer.get_or_insert_with(Instant::now);
                    if since.elapsed() >= c.config.interval * 5
                        && s.remote_pending.load(Ordering::SeqCst) == 0
                    {
                        c.ready.store(true, Ordering::Relaxed);
                        tracing::info!("caught up with the fleet: ready");
                    }
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
