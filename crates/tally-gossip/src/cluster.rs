//! The chitchat glue: one [`Gossip`] per node runs chitchat over UDP, publishes sealed
//! values in this node's key-value state, and turns every verified value other nodes
//! publish into an [`Incoming`] for the node to merge.
//!
//! chitchat's listeners run under its lock, so the listener only copies the raw strings
//! into a channel; MAC checks and decoding happen in a task outside the lock. Values whose
//! MAC fails, or that do not decode, are dropped and counted (no one without the cluster
//! key can raise usage or change a limit).
//!
//! Every queue is bounded. The listener cannot wait (it runs under chitchat's lock), so
//! when the raw queue is full it drops the value and counts it; chitchat has already taken
//! the value into its state and will not deliver it again, so a resync task then re-reads
//! every peer's state from chitchat and feeds it through the same path (what is already
//! merged is cheap to skip downstream). Hellos, which tell the node that everything before
//! them was merged (readiness), are held back while values are missing and fed last.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport, UdpTransport};
use chitchat::{
    ChitchatConfig, ChitchatEnvelope, ChitchatHandle, ChitchatId, FailureDetectorConfig,
    ListenerHandle,
};
use tally_core::{EntityRecord, Epoch, LimitRecord, ResetRegister};
use tokio::sync::mpsc;

use crate::keys::GossipKey;
use crate::mac::{ClusterKey, open, seal};
use crate::values::{decode_hello, decode_record, decode_slot};

/// How a node joins the fleet, as its operator configures it: tally-node's `ClusterConfig`
/// embeds it and adds what the node decides, and [`GossipConfig`] adds who this node is.
#[derive(Clone)]
pub struct GossipNetwork {
    pub listen: SocketAddr,
    pub advertise: SocketAddr,
    pub seeds: Vec<String>,
    pub cluster_id: String,
    pub key: ClusterKey,
    pub interval: Duration,
    /// The network seam: real UDP in production, a simulated network in `sim/`.
    pub transport: Arc<dyn Transport>,
}

/// What [`Gossip::start`] needs: the fleet to join and who this node is in it.
#[derive(Clone)]
pub struct GossipConfig {
    pub node_id: String,
    /// Changes on every start (chitchat's generation).
    pub generation: u64,
    pub network: GossipNetwork,
    /// How long a dead node's state is kept by chitchat (its slots stay durable here).
    pub dead_node_grace: Duration,
    /// How long deleted keys are kept as tombstones before chitchat forgets them.
    pub tombstone_grace: Duration,
}

/// The production transport: chitchat's UDP.
pub fn udp_transport() -> Arc<dyn Transport> {
    Arc::new(UdpTransport)
}

/// A verified value published by another node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// `origin`'s slot of (limit, epoch), from the origin itself or relayed for it.
    Slot {
        origin: String,
        limit: String,
        epoch: Epoch,
        value: u64,
    },
    Limit(LimitRecord),
    Entity(EntityRecord),
    Reset(String, ResetRegister),
    /// `origin`'s hello: everything `origin` published before it was delivered before it.
    Hello {
        origin: String,
        wall_ms: i64,
    },
    /// Hard limits: `from`'s total grant of rights to `to` in (limit, epoch).
    Grant {
        from: String,
        limit: String,
        epoch: Epoch,
        to: String,
        value: u64,
    },
    /// Hard limits: `from` asks for rights in (limit, epoch).
    Demand {
        from: String,
        limit: String,
        epoch: Epoch,
        demand: crate::values::Demand,
    },
    Decommission(tally_core::DecommissionRecord),
    Price(tally_core::PriceRecord),
}

/// Counters for /metrics.
#[derive(Debug, Default)]
pub struct GossipStats {
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub values_rejected: AtomicU64,
    pub values_accepted: AtomicU64,
    pub transport_errors: AtomicU64,
    /// Values dropped because the node could not take them in time (re-read later).
    pub values_dropped: AtomicU64,
    /// Times every peer's state was re-read from chitchat after drops.
    pub resyncs: AtomicU64,
}

/// Raw values from the listener waiting for their MAC check.
const RAW_QUEUE_MAX: usize = 16_384;
/// How often the resync task looks whether values were dropped.
const RESYNC_EVERY: Duration = Duration::from_secs(1);

/// One member of the fleet as this node sees it (merged over generations by node id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub node_id: String,
    pub gossip_addr: SocketAddr,
    pub live: bool,
    pub generation: u64,
    /// Time since a value from this node was last accepted.
    pub newest_value_age: Option<Duration>,
    /// A value it published passed the MAC check: it holds the cluster key. A node that
    /// speaks chitchat with the right cluster id but another key is a member to chitchat,
    /// not to tally (every value it sends is rejected).
    pub verified: bool,
}

/// A running gossip endpoint.
pub struct Gossip {
    handle: ChitchatHandle,
    key: ClusterKey,
    node_id: String,
    stats: Arc<GossipStats>,
    last_seen: Arc<parking_lot_free::Seen>,
    _listener: ListenerHandle,
}

/// Per-publisher time of the newest accepted value (a tiny mutex-protected map; the
/// listener task is its only writer).
mod parking_lot_free {
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::time::Instant;

    #[derive(Default, Debug)]
    pub struct Seen(pub Mutex<HashMap<String, Instant>>);
}

/// Counts bytes and keeps chitchat's loop alive: a failed send is logged and reported as
/// sent (UDP may drop it anyway), a failed receive is retried after a pause, because an
/// error returned from `recv` stops chitchat's loop for good.
struct CountingTransport {
    inner: Arc<dyn Transport>,
    stats: Arc<GossipStats>,
}

struct CountingSocket {
    inner: Box<dyn Socket>,
    stats: Arc<GossipStats>,
}

#[async_trait]
impl Transport for CountingTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let inner = self.inner.open(listen_addr).await?;
        Ok(Box::new(CountingSocket {
            inner,
            stats: self.stats.clone(),
        }))
    }
}

#[async_trait]
impl Socket for CountingSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.inner.local_addr()
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        match self.inner.send(to, envelope).await {
            Ok(out) => {
                self.stats
                    .bytes_sent
                    .fetch_add(out.num_bytes_sent as u64, Ordering::Relaxed);
                Ok(out)
            }
            Err(e) => {
                self.stats.transport_errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, %to, "gossip send failed; the peer will be retried next round");
                Ok(SendOutcome { num_bytes_sent: 0 })
            }
        }
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        loop {
            match self.inner.recv().await {
                Ok(out) => {
                    self.stats
                        .bytes_received
                        .fetch_add(out.num_bytes_received as u64, Ordering::Relaxed);
                    return Ok(out);
                }
                Err(e) => {
                    self.stats.transport_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "gossip receive failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Raw key/value from the listener, checked outside chitchat's lock.
struct Raw {
    publisher: String,
    key: String,
    value: String,
}

/// Why gossip could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GossipError {
    /// chitchat could not start on `listen` (the UDP port is taken, or the address is not
    /// this host's).
    #[error(
        "cannot start gossip on {listen}: {message}; check that the port is free and the address is this host's"
    )]
    Start { listen: SocketAddr, message: String },
}

impl Gossip {
    /// Starts chitchat with `initial` values (gossip key, payload) already published, and
    /// forwards every verified value from other nodes to `incoming`.
    pub async fn start(
        cfg: GossipConfig,
        initial: Vec<(GossipKey, String)>,
        incoming: mpsc::Sender<Incoming>,
    ) -> Result<Gossip, GossipError> {
        let stats = Arc::new(GossipStats::default());
        let chitchat_id =
            ChitchatId::new(cfg.node_id.clone(), cfg.generation, cfg.network.advertise);
        let failure_detector_config = FailureDetectorConfig {
            dead_node_grace_period: cfg.dead_node_grace,
            initial_interval: cfg.network.interval * 10,
            ..FailureDetectorConfig::default()
        };
        let config = ChitchatConfig {
            chitchat_id,
            cluster_id: cfg.network.cluster_id.clone(),
            gossip_interval: cfg.network.interval,
            listen_addr: cfg.network.listen,
            seed_nodes: cfg.network.seeds.clone(),
            failure_detector_config,
            marked_for_deletion_grace_period: cfg.tombstone_grace,
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: chitchat::ProtocolVersion::V0,
        };
        let sealed: Vec<(String, String)> = initial
            .into_iter()
            .map(|(k, payload)| {
                let k = k.encode();
                let v = seal(&cfg.network.key, &cfg.node_id, &k, &payload);
                (k, v)
            })
            .collect();
        let transport = CountingTransport {
            inner: cfg.network.transport.clone(),
            stats: stats.clone(),
        };
        // chitchat's API speaks anyhow; it stops here.
        let handle = chitchat::spawn_chitchat(config, sealed, &transport)
            .await
            .map_err(|e| GossipError::Start {
                listen: cfg.network.listen,
                message: format!("{e:#}"),
            })?;
        let (raw_tx, mut raw_rx) = mpsc::channel::<Raw>(RAW_QUEUE_MAX);
        let missing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let me = cfg.node_id.clone();
        let listener = handle
            .with_chitchat(|c| {
                let raw_tx = raw_tx.clone();
                let (me, stats, missing) = (me.clone(), stats.clone(), missing.clone());
                c.subscribe_event("", move |ev| {
                    if *ev.node.node_id == *me
                        || (ev.key == crate::keys::HELLO_KEY && missing.load(Ordering::SeqCst))
                    {
                        return;
                    }
                    let raw = Raw {
                        publisher: ev.node.node_id.to_string(),
                        key: ev.key.to_string(),
                        value: ev.value.to_string(),
                    };
                    if raw_tx.try_send(raw).is_err() {
                        stats.values_dropped.fetch_add(1, Ordering::Relaxed);
                        missing.store(true, Ordering::SeqCst);
                    }
                })
            })
            .await;
        let last_seen = Arc::new(parking_lot_free::Seen::default());
        {
            let (key, stats, last_seen) =
                (cfg.network.key.clone(), stats.clone(), last_seen.clone());
            tokio::spawn(async move {
                while let Some(raw) = raw_rx.recv().await {
                    match verify(&key, &raw) {
                        Some(item) => {
                            stats.values_accepted.fetch_add(1, Ordering::Relaxed);
                            if let Ok(mut m) = last_seen.0.lock() {
                                m.insert(raw.publisher.clone(), Instant::now());
                            }
                            if incoming.send(item).await.is_err() {
                                return;
                            }
                        }
                        None => {
                            stats.values_rejected.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(publisher = %raw.publisher, key = %raw.key, "gossip value rejected (bad MAC or format)");
                        }
                    }
                }
            });
        }
        tokio::spawn(resync(
            handle.chitchat(),
            cfg.node_id.clone(),
            raw_tx,
            missing,
            stats.clone(),
        ));
        Ok(Gossip {
            handle,
            key: cfg.network.key,
            node_id: cfg.node_id,
            stats,
            last_seen,
            _listener: listener,
        })
    }

    pub fn stats(&self) -> &GossipStats {
        &self.stats
    }

    /// Publishes (or updates) values in this node's state.
    pub async fn publish(&self, items: Vec<(GossipKey, String)>) {
        self.set_where(items, |held, new| held != Some(new)).await;
    }

    /// Publishes values only under keys this node does not publish now (never published,
    /// or deleted). A value read from memory a moment ago must not overwrite a newer one
    /// published meanwhile; the check and the set happen under chitchat's lock.
    pub async fn publish_missing(&self, items: Vec<(GossipKey, String)>) {
        self.set_where(items, |held, _| held.is_none()).await;
    }

    /// Seals `items` and, under chitchat's lock, sets each whose key holds a value `held`
    /// (`None`: not published) for which `set(held, sealed)` is true.
    async fn set_where(
        &self,
        items: Vec<(GossipKey, String)>,
        set: impl Fn(Option<&str>, &str) -> bool + Send,
    ) {
        if items.is_empty() {
            return;
        }
        let mut sealed = self.seal_all(items);
        self.handle
            .with_chitchat(|c| {
                let state = c.self_node_state();
                for (k, v) in sealed.drain(..) {
                    if set(state.get(&k), &v) {
                        state.set(k, v);
                    }
                }
            })
            .await;
    }

    fn seal_all(&self, items: Vec<(GossipKey, String)>) -> Vec<(String, String)> {
        items
            .into_iter()
            .map(|(k, payload)| {
                let k = k.encode();
                let v = seal(&self.key, &self.node_id, &k, &payload);
                (k, v)
            })
            .collect()
    }

    /// Deletes keys from this node's state (chitchat keeps tombstones for a grace period).
    pub async fn unpublish(&self, keys: Vec<String>) {
        if keys.is_empty() {
            return;
        }
        self.handle
            .with_chitchat(|c| {
                let state = c.self_node_state();
                for k in &keys {
                    state.delete(k);
                }
            })
            .await;
    }

    /// Keys this node publishes now, with their prefix.
    pub async fn own_keys(&self, prefix: &str) -> Vec<String> {
        self.handle
            .with_chitchat(|c| {
                c.self_node_state()
                    .key_values()
                    .filter(|(k, _)| k.starts_with(prefix))
                    .map(|(k, _)| k.to_string())
                    .collect()
            })
            .await
    }

    /// The fleet as this node sees it, itself included, one entry per node id (the newest
    /// generation; live if any generation is live).
    pub async fn members(&self) -> Vec<Member> {
        let seen: HashMap<String, Instant> = self
            .last_seen
            .0
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default();
        self.handle
            .with_chitchat(|c| {
                let live: Vec<ChitchatId> = c.live_nodes().cloned().collect();
                let mut out: BTreeMap<String, Member> = BTreeMap::new();
                for id in c.node_states().keys() {
                    let is_live = live.contains(id) || *id.node_id == *self.node_id;
                    let m = out.entry(id.node_id.to_string()).or_insert_with(|| Member {
                        node_id: id.node_id.to_string(),
                        gossip_addr: id.gossip_advertise_addr,
                        live: false,
                        generation: id.generation_id,
                        newest_value_age: seen.get(&*id.node_id).map(Instant::elapsed),
                        verified: *id.node_id == *self.node_id || seen.contains_key(&*id.node_id),
                    });
                    m.live |= is_live;
                    if id.generation_id >= m.generation {
                        m.generation = id.generation_id;
                        m.gossip_addr = id.gossip_advertise_addr;
                    }
                }
                out.into_values().collect()
            })
            .await
    }

    /// Stops gossiping.
    pub async fn shutdown(self) {
        let _ = self.handle.shutdown().await;
    }
}

/// Re-reads every peer's state from chitchat after the listener dropped values, and feeds
/// it through the MAC check again: hellos last, and only if nothing was dropped meanwhile.
async fn resync(
    chitchat: Arc<tokio::sync::Mutex<chitchat::Chitchat>>,
    me: String,
    raw_tx: mpsc::Sender<Raw>,
    missing: Arc<std::sync::atomic::AtomicBool>,
    stats: Arc<GossipStats>,
) {
    loop {
        tokio::time::sleep(RESYNC_EVERY).await;
        if !missing.load(Ordering::SeqCst) {
            continue;
        }
        // Drops from here on will need another pass.
        missing.store(false, Ordering::SeqCst);
        let all: Vec<Raw> = {
            let c = chitchat.lock().await;
            c.node_states()
                .iter()
                .filter(|(id, _)| *id.node_id != *me)
                .flat_map(|(id, state)| {
                    state.key_values().map(move |(k, v)| Raw {
                        publisher: id.node_id.to_string(),
                        key: k.to_string(),
                        value: v.to_string(),
                    })
                })
                .collect()
        };
        let (hellos, values): (Vec<Raw>, Vec<Raw>) = all
            .into_iter()
            .partition(|r| r.key == crate::keys::HELLO_KEY);
        tracing::warn!(
            values = values.len(),
            "gossip values were dropped while this node was behind; re-reading every peer's state"
        );
        stats.resyncs.fetch_add(1, Ordering::Relaxed);
        for raw in values {
            if raw_tx.send(raw).await.is_err() {
                return;
            }
        }
        if !missing.load(Ordering::SeqCst) {
            for raw in hellos {
                if raw_tx.send(raw).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// MAC check, key parse and payload decode; `None` for anything that fails.
fn verify(key: &ClusterKey, raw: &Raw) -> Option<Incoming> {
    let payload = open(key, &raw.publisher, &raw.key, &raw.value).ok()?;
    match GossipKey::parse(&raw.key)? {
        GossipKey::Slot { limit, epoch } => Some(Incoming::Slot {
            origin: raw.publisher.clone(),
            limit,
            epoch,
            value: decode_slot(payload)?,
        }),
        GossipKey::Relay {
            origin,
            limit,
            epoch,
        } => Some(Incoming::Slot {
            origin,
            limit,
            epoch,
            value: decode_slot(payload)?,
        }),
        GossipKey::Limit(id) => {
            let rec: LimitRecord = decode_record(payload)?;
            (rec.id == id).then_some(Incoming::Limit(rec))
        }
        GossipKey::Entity { dimension, value } => {
            let rec: EntityRecord = decode_record(payload)?;
            (rec.dimension == dimension && rec.value == value).then_some(Incoming::Entity(rec))
        }
        GossipKey::Reset(id) => Some(Incoming::Reset(id, decode_record(payload)?)),
        GossipKey::Hello => Some(Incoming::Hello {
            origin: raw.publisher.clone(),
            wall_ms: decode_hello(payload)?,
        }),
        GossipKey::Grant { limit, epoch, to } => Some(Incoming::Grant {
            from: raw.publisher.clone(),
            limit,
            epoch,
            to,
            value: decode_slot(payload)?,
        }),
        GossipKey::Demand { limit, epoch } => Some(Incoming::Demand {
            from: raw.publisher.clone(),
            limit,
            epoch,
            demand: crate::values::decode_demand(payload)?,
        }),
        GossipKey::Decommission(node) => {
            let rec: tally_core::DecommissionRecord = decode_record(payload)?;
            (rec.node == node).then_some(Incoming::Decommission(rec))
        }
        GossipKey::Price(model) => {
            let rec: tally_core::PriceRecord = decode_record(payload)?;
            (rec.model == model).then_some(Incoming::Price(rec))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::values::encode_slot;
    use chitchat::transport::ChannelTransport;

    fn config(id: &str, port: u16, seed: u16, transport: Arc<dyn Transport>) -> GossipConfig {
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        GossipConfig {
            node_id: id.into(),
            generation: 1,
            network: GossipNetwork {
                listen: addr,
                advertise: addr,
                seeds: vec![format!("127.0.0.1:{seed}")],
                cluster_id: "t".into(),
                key: ClusterKey::new(b"test-cluster-key-0123456789").unwrap(),
                interval: Duration::from_millis(20),
                transport,
            },
            dead_node_grace: Duration::from_secs(60),
            tombstone_grace: Duration::from_secs(60),
        }
    }

    /// Values of other nodes in `g`'s chitchat state.
    fn held_by(g: &Gossip) -> usize {
        let c = g.handle.chitchat();
        let Ok(c) = c.try_lock() else { return 0 };
        c.node_states()
            .iter()
            .filter(|(id, _)| *id.node_id != *g.node_id)
            .map(|(_, s)| s.key_values().count())
            .sum()
    }

    /// A node that cannot keep up drops values at the listener (bounded queue), counts
    /// them, and gets every one of them anyway: the resync re-reads chitchat's state.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropped_values_are_read_again() {
        const N: u64 = RAW_QUEUE_MAX as u64 + 4_000;
        let transport: Arc<dyn Transport> = Arc::new(ChannelTransport::with_mtu(65_507));
        let epoch = Epoch {
            period: 0,
            reset: 1,
        };
        let values: Vec<(GossipKey, String)> = (0..N)
            .map(|i| {
                let limit = format!("l{i}");
                (GossipKey::Slot { limit, epoch }, encode_slot(i + 1))
            })
            .collect();
        let (a_tx, _a_rx) = mpsc::channel(16);
        let a = Gossip::start(config("a", 1, 1, transport.clone()), values, a_tx)
            .await
            .unwrap();
        let (b_tx, mut b_rx) = mpsc::channel(16);
        let b = Gossip::start(config("b", 2, 1, transport), Vec::new(), b_tx)
            .await
            .unwrap();
        // b takes nothing until its chitchat holds all of a's values, more than its queues
        // can hold: the listener must have dropped some.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while held_by(&b) < N as usize {
            assert!(
                tokio::time::Instant::now() < deadline,
                "a's state never reached b"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut got: HashMap<String, u64> = HashMap::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while (got.len() as u64) < N {
            let item = tokio::time::timeout_at(deadline, b_rx.recv())
                .await
                .unwrap_or_else(|_| {
                    let held = held_by(&b);
                    panic!(
                        "only {} of {N} values arrived (chitchat holds {held}); dropped {}, resyncs {}",
                        got.len(),
                        b.stats().values_dropped.load(Ordering::Relaxed),
                        b.stats().resyncs.load(Ordering::Relaxed)
                    )
                })
                .expect("gossip running");
            if let Incoming::Slot {
                origin,
                limit,
                value,
                ..
            } = item
            {
                assert_eq!(origin, "a");
                got.insert(limit, value);
            }
        }
        for i in 0..N {
            assert_eq!(got.get(&format!("l{i}")), Some(&(i + 1)));
        }
        let dropped = b.stats().values_dropped.load(Ordering::Relaxed);
        let resyncs = b.stats().resyncs.load(Ordering::Relaxed);
        assert!(dropped > 0, "the test must overflow the listener's queue");
        assert!(resyncs > 0, "dropped values are re-read");
        a.shutdown().await;
        b.shutdown().await;
    }
}
