//! The writer under storage faults, on the real store over [`faults::FaultyDisk`]: a failed
//! sync is never acknowledged and stops writing; a full disk refuses writes and they
//! resume by themselves; a full queue is `Overloaded` after `queue_wait`; maintenance
//! commits follow the same rules. Each test ends with a power loss and a restart, and
//! checks that memory and disk agreed: exactly the acknowledged records count (I1, I2).
//! Then what the writer does with values from peers (own echoes), maintenance that
//! succeeds (dedup expiry, tombstone GC), and the cluster sweep that follows it
//! (stale gossip keys).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use tally_core::{Amounts, LimitInput, Metric};

use crate::faults::{FaultyDisk, PowerLoss};
use crate::{Clock, Node, NodeConfig, NodeError, StorageHealth, UsageRecord};

struct TestClock(AtomicI64);

impl Clock for TestClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

const T0: i64 = 1_795_327_200_000; // 2026-11-22T06:00:00Z

fn open(disk: &FaultyDisk, clock: &Arc<TestClock>, tweak: impl FnOnce(&mut NodeConfig)) -> Node {
    let mut c = NodeConfig::new("/nonexistent/tally-writer-tests");
    c.clock = clock.clone();
    c.node_id = Some("node-a".into());
    c.disk = Some(disk.mount());
    tweak(&mut c);
    Node::open(c).unwrap()
}

fn clock() -> Arc<TestClock> {
    Arc::new(TestClock(AtomicI64::new(T0)))
}

fn rec(id: &str) -> UsageRecord {
    UsageRecord {
        id: id.into(),
        attributes: vec![("team".into(), "eng".into())],
        amounts: Amounts {
            cost: tally_core::Micros(0),
            tokens: 0,
            requests: 1,
        },
        at_ms: None,
        reservation: None,
    }
}

async fn with_limit(node: &Node) {
    let input = LimitInput {
        scope: [("team".to_string(), "eng".to_string())].into(),
        metric: Metric::Requests,
        max: 1_000_000,
        period: "never".parse().unwrap(),
        calendar_aligned: false,
        timezone: "UTC".into(),
        mode: Default::default(),
        members: Vec::new(),
    };
    node.put_limit("reqs", input).await.unwrap();
}

fn used(node: &Node) -> u64 {
    node.limit("reqs").unwrap().report.used
}

/// The message of a refusal of the kind `want` names; any other outcome fails the test.
#[track_caller]
fn refused(r: Result<Vec<bool>, NodeError>, want: &str) -> String {
    match (want, r) {
        ("storage failed", Err(NodeError::StorageFailed(m)))
        | ("disk full", Err(NodeError::DiskFull(m)))
        | ("overloaded", Err(NodeError::Overloaded(m))) => m,
        (_, other) => panic!("expected {want}, got {other:?}"),
    }
}

/// Powers the host off and on: only what was synced survives.
async fn power_cycle(node: Node, disk: &FaultyDisk, clock: &Arc<TestClock>) -> Node {
    node.shutdown().await;
    disk.power_loss(PowerLoss::DropUnsynced);
    open(disk, clock, |_| {})
}

#[tokio::test]
async fn a_failed_sync_is_never_acknowledged_and_stops_writing() {
    let (disk, clock) = (FaultyDisk::new(), clock());
    let node = open(&disk, &clock, |_| {});
    with_limit(&node).await;
    assert_eq!(node.record(vec![rec("r1")]).await.unwrap(), vec![true]);
    disk.fail_syncs(Some(1));
    let m = refused(
        node.record(vec![rec("r2"), rec("r3")]).await,
        "storage failed",
    );
    assert!(m.contains("failed to sync"), "{m}");
    // Memory did not take the commit that failed.
    assert_eq!(used(&node), 1);
    assert_eq!(node.storage_health(), StorageHealth::Failed);
    assert!(!node.ready());
    // The next sync would succeed, but the node does not trust what it wrote: it stopped.
    let m = refused(node.record(vec![rec("r4")]).await, "storage failed");
    assert!(m.contains("restart the node"), "{m}");
    assert!(matches!(
        node.reset_limit("reqs", 0).await,
        Err(NodeError::StorageFailed(_))
    ));
    assert_eq!(disk.stats().syncs_failed, 1);
    let synced = disk.stats().syncs_ok;
    // Checks answer from memory.
    let c = node.check(&[("team", "eng")], Amounts::default());
    assert!(c.allowed);
    assert_eq!(c.limits[0].used, 1);
    assert!(!c.stale, "stale means behind the fleet, not a bad disk");
    assert_eq!(
        disk.stats().syncs_ok,
        synced,
        "nothing written after the failure"
    );
    // A restart recovers what is durable: exactly r1, and r2 is new to it.
    let node = power_cycle(node, &disk, &clock).await;
    assert_eq!(used(&node), 1);
    assert!(node.ready());
    assert_eq!(
        node.record(vec![rec("r1"), rec("r2")]).await.unwrap(),
        vec![false, true]
    );
    assert_eq!(used(&node), 2);
}

#[tokio::test]
async fn a_full_disk_refuses_writes_and_they_resume_when_space_returns() {
    let (disk, clock) = (FaultyDisk::new(), clock());
    let node = open(&disk, &clock, |_| {});
    with_limit(&node).await;
    disk.fill();
    let mut acked = 0;
    let m = loop {
        match node.record(vec![rec(&format!("a{acked}"))]).await {
            Ok(v) => {
                assert_eq!(v, vec![true]);
                acked += 1;
            }
            Err(e) => break refused(Err(e), "disk full"),
        }
        assert!(acked < 100_000, "the disk never filled");
    };
    assert!(m.contains("is full"), "{m}");
    assert_eq!(node.storage_health(), StorageHealth::Full);
    assert!(!node.ready(), "not ready while writes cannot be stored");
    assert_eq!(used(&node), acked);
    // Writes are refused with a message that says it is a full disk and what happens next.
    let m = refused(node.record(vec![rec("refused")]).await, "disk full");
    assert!(
        m.contains("full") && m.contains("resume by themselves"),
        "{m}"
    );
    assert!(node.check(&[("team", "eng")], Amounts::default()).allowed);
    // A restart on the full disk: the node opens, checks answer, writes are refused.
    let node = power_cycle(node, &disk, &clock).await;
    assert_eq!(used(&node), acked);
    refused(node.record(vec![rec("still-full")]).await, "disk full");
    // Space returns: the node notices by itself, without a write or a restart.
    disk.set_capacity(u64::MAX);
    let started = Instant::now();
    while !node.storage_ok() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "writes never resumed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(node.ready());
    // Retries of refused records: each is applied once (a refused commit that reached the
    // disk would make it `false` here, and still count once).
    let again = node
        .record(vec![
            rec(&format!("a{acked}")),
            rec("refused"),
            rec("still-full"),
            rec("a0"),
        ])
        .await
        .unwrap();
    assert!(!again[3], "a0 was acknowledged before the disk filled");
    assert_eq!(used(&node), acked + 3);
    let node = power_cycle(node, &disk, &clock).await;
    assert_eq!(used(&node), acked + 3);
}

#[tokio::test]
async fn a_full_queue_is_unavailable_after_queue_wait() {
    let (disk, clock) = (FaultyDisk::new(), clock());
    let node = open(&disk, &clock, |c| {
        c.queue_records_max = 2;
        c.queue_wait = Duration::from_millis(50);
    });
    with_limit(&node).await;
    // Stall the disk: the writer holds one record in a commit, one more fits the queue.
    disk.hold_syncs(true);
    let first = tokio::spawn({
        let n = node.clone();
        async move { n.record(vec![rec("q1")]).await }
    });
    let started = Instant::now();
    while disk.syncs_waiting() == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the writer never synced: {:?} {}",
            disk.stats(),
            node.queue_depth()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let second = tokio::spawn({
        let n = node.clone();
        async move { n.record(vec![rec("q2")]).await }
    });
    while node.queue_depth() < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "q2 was never queued"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let waited = Instant::now();
    let m = refused(node.record(vec![rec("q3")]).await, "overloaded");
    assert!(waited.elapsed() >= Duration::from_millis(50));
    assert!(m.contains("write queue stayed full for 50 ms"), "{m}");
    assert_eq!(
        node.metrics().queue_rejected_total.load(Ordering::Relaxed),
        1
    );
    disk.hold_syncs(false);
    assert_eq!(first.await.unwrap().unwrap(), vec![true]);
    assert_eq!(second.await.unwrap().unwrap(), vec![true]);
    assert_eq!(used(&node), 2);
    let node = power_cycle(node, &disk, &clock).await;
    assert_eq!(used(&node), 2);
}

#[tokio::test]
async fn maintenance_commits_follow_the_same_rules() {
    let (disk, clock) = (FaultyDisk::new(), clock());
    let node = open(&disk, &clock, |c| c.dedup_window_ms = 1_000);
    with_limit(&node).await;
    node.record(vec![rec("m1")]).await.unwrap();
    // The id's window ends: the writer's next expiry pass (every second) commits, and
    // that commit's sync fails with no write in sight.
    clock.0.store(T0 + 2_000, Ordering::SeqCst);
    disk.fail_syncs(None);
    let started = Instant::now();
    while node.storage_health() != StorageHealth::Failed {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "expiry never ran"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!node.ready());
    refused(node.record(vec![rec("m2")]).await, "storage failed");
    assert_eq!(used(&node), 1);
    disk.fail_syncs(Some(0));
    let node = power_cycle(node, &disk, &clock).await;
    assert_eq!(used(&node), 1);
}

/// Hands values "from peers" to the writer, as the cluster's incoming task does, and
/// waits until it applied them (ops run in order: the maintenance op after them returns
/// once they are done).
async fn remote(node: &Node, items: Vec<tally_gossip::Incoming>) {
    node.submit(1, |permit| crate::writer::Op::Remote {
        items,
        _permit: permit,
    })
    .await
    .unwrap();
    node.maintain_now().await.unwrap();
}

/// Own echoes: this node's slot comes back from gossip (relayed by a peer, or published by
/// an earlier incarnation) with a higher value; the writer ignores it, since its own slots
/// come only from its disk (I3 holds by construction, I1 would break by over-counting).
/// A peer's slot in the same batch is merged and durable.
#[tokio::test]
async fn own_echoes_are_ignored_and_peer_slots_merged() {
    let (disk, clock) = (FaultyDisk::new(), clock());
    let node = open(&disk, &clock, |_| {});
    with_limit(&node).await;
    node.record(vec![rec("o1"), rec("o2"), rec("o3")])
        .await
        .unwrap();
    let epoch = node.limit("reqs").unwrap().epoch;
    let slot = |origin: &str, value| tally_gossip::Incoming::Slot {
        origin: origin.into(),
        limit: "reqs".into(),
        epoch,
        value,
    };
    remote(&node, vec![slot("node-a", 100), slot("node-b", 5)]).await;
    let d = node.limit("reqs").unwrap();
    assert_eq!(d.report.used, 8, "{:?}", d.nodes);
    assert_eq!(d.nodes, [("node-a".into(), 3), ("node-b".into(), 5)]);
    // A lower peer value changes nothing (slots merge by max).
    remote(&node, vec![slot("node-b", 2)]).await;
    assert_eq!(used(&node), 8);
    let node = power_cycle(node, &disk, &clock).await;
    let d = node.limit("reqs").unwrap();
    assert_eq!(d.report.used, 8, "after a power loss: {:?}", d.nodes);
    assert_eq!(d.nodes, [("node-a".into(), 3), ("node-b".into(), 5)]);
}

/// Dedup expiry: an id is remembered for the dedup window after its record was applied,
/// then forgotten by the writer's maintenance, in memory and on disk (a resend counts
/// again; before, it does not).
#[tokio::test]
async fn dedup_ids_expire_after_the_window() {
    let (disk, clock) = (FaultyDisk::new(), clock());
    let node = open(&disk, &clock, |c| c.dedup_window_ms = 60_000);
    with_limit(&node).await;
    assert_eq!(node.record(vec![rec("d1")]).await.unwrap(), vec![true]);
    clock.0.store(T0 + 59_000, Ordering::SeqCst);
    node.maintain_now().await.unwrap();
    assert_eq!(node.record(vec![rec("d1")]).await.unwrap(), vec![false]);
    let node = power_cycle(node, &disk, &clock).await;
    assert_eq!(node.record(vec![rec("d1")]).await.unwrap(), vec![false]);
    // The window ends (dedup ids expire in buckets: allow one bucket more).
    clock.0.store(T0 + 2 * 60_000 + 1_000, Ordering::SeqCst);
    node.maintain_now().await.unwrap();
    let node = power_cycle(node, &disk, &clock).await;
    assert_eq!(node.record(vec![rec("d1")]).await.unwrap(), vec![true]);
    assert_eq!(used(&node), 2);
}

/// Tombstone GC: a deleted limit and a deleted entity stay as tombstones (so a late
/// write from a peer cannot bring them back) for `TOMBSTONE_RETENTION_MS`, then the
/// writer's maintenance removes them from disk and memory, also across a power loss.
#[tokio::test]
async fn tombstones_are_collected_after_their_retention() {
    let (disk, clock) = (FaultyDisk::new(), clock());
    let node = open(&disk, &clock, |_| {});
    with_limit(&node).await;
    let parents: tally_core::Scope = [("team".to_string(), "eng".to_string())].into();
    node.put_entity("user", "ann", parents, Default::default())
        .await
        .unwrap();
    node.delete_limit("reqs").await.unwrap();
    node.delete_entity("user", "ann").await.unwrap();
    let tombstones = |node: &Node| {
        let state = node.shared.state.read();
        (
            state
                .limit_records()
                .filter(|r| r.spec.is_none())
                .map(|r| r.id.clone())
                .collect::<Vec<_>>(),
            state
                .entity_records()
                .filter(|r| r.parents.is_none())
                .map(|r| r.value.clone())
                .collect::<Vec<_>>(),
        )
    };
    let both = (vec!["reqs".to_string()], vec!["ann".to_string()]);
    assert_eq!(tombstones(&node), both);
    let retention = tally_core::config::TOMBSTONE_RETENTION_MS;
    clock.0.store(T0 + retention - 1_000, Ordering::SeqCst);
    node.maintain_now().await.unwrap();
    let node = power_cycle(node, &disk, &clock).await;
    assert_eq!(tombstones(&node), both, "kept within the retention");
    clock.0.store(T0 + retention + 1_000, Ordering::SeqCst);
    node.maintain_now().await.unwrap();
    assert_eq!(tombstones(&node), (vec![], vec![]), "memory after GC");
    let node = power_cycle(node, &disk, &clock).await;
    assert_eq!(tombstones(&node), (vec![], vec![]), "disk after GC");
    assert!(node.limit("reqs").is_none());
}

/// The cluster's sweep stops gossiping what no longer counts (stale-key removal): the
/// own slot of an epoch whose period ended, and the tombstone of a deleted limit once
/// maintenance collected it. Real gossip (chitchat on loopback UDP), a fleet of one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_unpublishes_closed_epochs_and_collected_tombstones() {
    let (disk, clock) = (FaultyDisk::new(), clock());
    let node = open(&disk, &clock, |_| {});
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    node.start_cluster(crate::ClusterConfig {
        network: crate::GossipNetwork {
            listen: addr,
            advertise: addr,
            seeds: vec![],
            cluster_id: "writer-tests".into(),
            key: crate::ClusterKey::new(&[7; 32]).unwrap(),
            interval: Duration::from_millis(100),
            transport: tally_gossip::udp_transport(),
        },
        isolated_unready_after: None,
    })
    .await
    .unwrap();
    let mut hourly = LimitInput {
        scope: [("team".to_string(), "eng".to_string())].into(),
        metric: Metric::Requests,
        max: 1_000_000,
        period: "1h".parse().unwrap(),
        calendar_aligned: true,
        timezone: "UTC".into(),
        mode: Default::default(),
        members: Vec::new(),
    };
    node.put_limit("hourly", hourly.clone()).await.unwrap();
    hourly.max = 5;
    node.put_limit("gone", hourly).await.unwrap();
    node.delete_limit("gone").await.unwrap();
    node.record(vec![rec("s1")]).await.unwrap();
    let epoch = node.limit("hourly").unwrap().epoch;
    let slot_key = tally_gossip::GossipKey::Slot {
        limit: "hourly".into(),
        epoch,
    }
    .encode();
    let tombstone_key = tally_gossip::GossipKey::Limit("gone".into()).encode();
    let keys = || async {
        let g = &node.shared.cluster.get().unwrap().gossip;
        let mut k = g.own_keys(tally_gossip::SLOT_PREFIX).await;
        k.extend(g.own_keys(tally_gossip::LIMIT_PREFIX).await);
        k
    };
    let wait_for = |want: bool, key: String| {
        let keys = &keys;
        async move {
            let started = Instant::now();
            while keys().await.contains(&key) != want {
                assert!(
                    started.elapsed() < Duration::from_secs(20),
                    "{key} {} gossip within 20 s; published: {:?}",
                    if want { "never reached" } else { "never left" },
                    keys().await
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    wait_for(true, slot_key.clone()).await;
    wait_for(true, tombstone_key.clone()).await;
    // The hour ends: the epoch is closed, its slot stays on disk as history only.
    clock.0.store(T0 + 3_600_000, Ordering::SeqCst);
    node.maintain_now().await.unwrap();
    wait_for(false, slot_key).await;
    assert!(keys().await.contains(&tombstone_key), "tombstone kept");
    // The tombstone's retention ends and maintenance collects it.
    clock.0.store(
        T0 + tally_core::config::TOMBSTONE_RETENTION_MS + 1_000,
        Ordering::SeqCst,
    );
    node.maintain_now().await.unwrap();
    wait_for(false, tombstone_key).await;
    node.shutdown().await;
}
