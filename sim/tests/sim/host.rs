//! One simulated tally host: the real node (the real redb store on the host's
//! [`FaultyDisk`], which survives crashes and bounces and keeps only what was synced when
//! the power goes), gossip over [`SimTransport`], the real router over turmoil TCP, and a
//! clock made of simulated time plus a per-host skew.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tally_node::faults::FaultyDisk;
use tally_node::{Clock, ClusterConfig, ClusterKey, GossipNetwork, Node, NodeConfig};
use tally_server::http::{AppState, Auth, router};

use crate::net::{Parked, SimListener, SimTransport};

pub const GOSSIP_PORT: u16 = 7000;
pub const HTTP_PORT: u16 = 8080;
const CLUSTER_KEY: &[u8] = b"sim-cluster-key-0123456789abcdef";

/// A host's wall clock: a fixed start instant + simulated elapsed time + skew. It is read
/// from the node's writer thread too, so it is made of atomics the executor updates after
/// every simulation step, not of turmoil's thread-local time.
#[derive(Debug)]
pub struct SimClock {
    start_ms: i64,
    skew_ms: AtomicI64,
    elapsed_ms: Arc<AtomicI64>,
}

impl SimClock {
    pub fn new(start_ms: i64, skew_ms: i64, elapsed_ms: Arc<AtomicI64>) -> SimClock {
        SimClock {
            start_ms,
            skew_ms: AtomicI64::new(skew_ms),
            elapsed_ms,
        }
    }
}

impl Clock for SimClock {
    fn now_ms(&self) -> i64 {
        self.start_ms
            + self.elapsed_ms.load(Ordering::Relaxed)
            + self.skew_ms.load(Ordering::Relaxed)
    }
}

/// The running nodes, by name. A host registers its node once it serves and unregisters
/// when its software is dropped (crash, bounce), so nothing here keeps a dead node's
/// writer alive. Callers use a node only inside [`Registry::with`], never across an await.
#[derive(Clone, Default)]
pub struct Registry(Arc<Mutex<HashMap<String, Node>>>);

impl Registry {
    pub fn with<R>(&self, name: &str, f: impl FnOnce(&Node) -> R) -> Option<R> {
        let map = self.0.lock().expect("registry");
        map.get(name).map(f)
    }

    pub fn is_up(&self, name: &str) -> bool {
        self.0.lock().expect("registry").contains_key(name)
    }

    fn register(&self, name: &str, node: Node) -> Registration {
        self.0
            .lock()
            .expect("registry")
            .insert(name.to_string(), node);
        Registration {
            registry: self.clone(),
            name: name.to_string(),
        }
    }
}

struct Registration {
    registry: Registry,
    name: String,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut m) = self.registry.0.lock() {
            m.remove(&self.name);
        }
    }
}

/// Everything a host needs to (re)start its software.
pub struct HostConfig {
    pub name: String,
    /// The host's disk: every boot mounts it again.
    pub disk: FaultyDisk,
    pub clock: Arc<SimClock>,
    /// Host names whose gossip address is a seed.
    pub seeds: Vec<String>,
    pub interval: Duration,
    pub parked: Arc<Parked>,
    pub registry: Registry,
}

pub fn gossip_addr(ip: IpAddr) -> SocketAddr {
    SocketAddr::new(ip, GOSSIP_PORT)
}

/// Opens the node on a fresh mount of the host's disk. Every restart in the simulator
/// follows a power cut, which releases the previous boot's database at once (its handles
/// are dead), so the open succeeds the first time: no real-time wait inside simulated
/// time. A failure (the disk still in use: a bounce without a power cut) fails the run.
fn open_node(cfg: &HostConfig) -> anyhow::Result<Node> {
    let mut nc = NodeConfig::new(format!("/simulated/{}", cfg.name));
    nc.node_id = Some(cfg.name.clone());
    nc.clock = cfg.clock.clone();
    nc.disk = Some(cfg.disk.mount());
    Node::open(nc).map_err(|e| {
        anyhow::anyhow!(
            "{}: cannot open its disk: {e:?} (a host must lose power before it restarts)",
            cfg.name
        )
    })
}

/// The host's software; turmoil runs it again from the start after a bounce.
pub async fn run(cfg: Arc<HostConfig>) -> turmoil::Result {
    let node = open_node(&cfg)?;
    let me = gossip_addr(turmoil::lookup(cfg.name.as_str()));
    let seeds = cfg
        .seeds
        .iter()
        .map(|s| gossip_addr(turmoil::lookup(s.as_str())).to_string())
        .collect();
    node.start_cluster(ClusterConfig {
        network: GossipNetwork {
            listen: me,
            advertise: me,
            seeds,
            cluster_id: "sim".into(),
            key: ClusterKey::new(CLUSTER_KEY)?,
            interval: cfg.interval,
            transport: Arc::new(SimTransport(cfg.parked.clone())),
        },
        isolated_unready_after: Some(Duration::from_secs(10)),
    })
    .await?;
    let listener =
        turmoil::net::TcpListener::bind(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), HTTP_PORT))
            .await?;
    let state = Arc::new(AppState {
        started_ms: node.now_ms(),
        node: node.clone(),
        auth: Auth::default(),
        gossip_addr: Some(me.to_string()),
        proxies: Default::default(),
    });
    let _registration = cfg.registry.register(&cfg.name, node);
    axum::serve(SimListener(listener), router(state)).await?;
    Ok(())
}
