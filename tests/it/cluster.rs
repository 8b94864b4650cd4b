//! Fleets of real nodes gossiping on loopback: config and usage replicate (I4), no
//! acknowledged record is lost across a crash or the permanent removal of the node that
//! took it (I1), slots never go down (I3), and a node with the wrong cluster key changes
//! nothing (DESIGN.md §4, Integrity).
//!
//! Nodes come from `tally_tests::Fleet` (fixed node ids and gossip ports, every node seeded
//! with the others, one cluster key); extra nodes join with `NodeOpts::gossip`.
//!
//! A usage record counts against the limits the receiving node knows at that moment, so
//! every test waits until a new limit is visible on every node before recording. Every wait
//! is bounded; every total is exact (counts, and cost in integer micro-USD).

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tally_tests::{
    CLUSTER_KEY, Client, FLEET_READY_TIMEOUT, Fleet, Node, NodeOpts, RetryLoad, RetryOutcome,
    Value, cluster_members, count, free_udp_port, is_ready, json, metric, micros, ok, retry_client,
    rng_from_env_or_time, try_matches, wait_for,
};

/// How long a limit written on one node may take to be visible on all (about a second
/// nominally; generous for a loaded 2-core machine).
const CONFIG_TIMEOUT: Duration = Duration::from_secs(10);
/// How long usage may take to reach every node once the fleet is healthy.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------
// Helpers.

/// A limit view's usage: `used` and the per-origin `nodes` map, both as integer micro-units
/// (counts × 1e6 for tokens and requests), so comparisons are exact.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Usage {
    used: i128,
    nodes: BTreeMap<String, i128>,
}

impl Usage {
    /// The usage a fleet should report when each node took `per_node[id]` (zero entries
    /// omitted: a node that took nothing has no slot).
    fn of(per_node: &BTreeMap<String, i128>) -> Usage {
        let nodes: BTreeMap<String, i128> = per_node
            .iter()
            .filter(|&(_, &v)| v != 0)
            .map(|(k, &v)| (k.clone(), v))
            .collect();
        Usage {
            used: nodes.values().sum(),
            nodes,
        }
    }
}

/// `GET /v1/limits/{id}` as [`Usage`]; `Err` on a transport error or a non-200 reply.
fn try_usage(client: &Client, limit: &str) -> Result<Usage, String> {
    let (status, text) = client
        .try_request("GET", &format!("/v1/limits/{limit}"), None)
        .map_err(|e| format!("GET /v1/limits/{limit}: {e}"))?;
    if status != 200 {
        return Err(format!("GET /v1/limits/{limit}: {status} {text}"));
    }
    let view: Value = serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
    let nodes = view["nodes"]
        .as_object()
        .ok_or_else(|| format!("no nodes map in {view}"))?
        .iter()
        .map(|(k, v)| (k.clone(), micros(v)))
        .collect::<BTreeMap<_, _>>();
    let used = micros(&view["used"]);
    if used != nodes.values().sum::<i128>() {
        return Err(format!("used is not the sum of the nodes map: {view}"));
    }
    Ok(Usage { used, nodes })
}

/// Waits until every node in `nodes` reports exactly `want` for `limit`; returns how long
/// that took.
#[track_caller]
fn wait_usage(nodes: &[&Node], limit: &str, want: &Usage, timeout: Duration) -> Duration {
    let what = format!("{limit} to reach {want:?} on every node");
    wait_for(timeout, &what, || {
        for node in nodes {
            let got = try_usage(&node.client(), limit)?;
            if got != *want {
                return Err(format!("{} reports {got:?}", node.node_id()));
            }
        }
        Ok(())
    })
    .1
}

/// PUTs `spec` as limit `id` on `writer`, then waits until every node in `nodes` serves a
/// view with the same spec (I4: config replicates). Returns how long that took.
#[track_caller]
fn put_limit_everywhere(writer: &Node, nodes: &[&Node], id: &str, spec: Value) -> Duration {
    ok(writer.put(&format!("/v1/limits/{id}"), spec.clone()));
    let what = format!("limit {id} to be visible on every node");
    wait_for(CONFIG_TIMEOUT, &what, || {
        for node in nodes {
            let (status, view) = node.get(&format!("/v1/limits/{id}"));
            if status != 200 {
                return Err(format!("{}: {status} {view}", node.node_id()));
            }
            try_matches(&view, &spec).map_err(|e| format!("{}: {e}", node.node_id()))?;
        }
        Ok(())
    })
    .1
}

fn record(id: &str, team: &str, cost: f64) -> Value {
    json!({"id": id, "attributes": {"team": team}, "cost": cost, "requests": 1})
}

/// POSTs a fresh record and requires `applied: true`; returns the reply.
#[track_caller]
fn record_fresh(client: &Client, id: &str, team: &str, cost: f64) -> Value {
    let reply = ok(client.post("/v1/usage", record(id, team, cost)));
    assert_eq!(reply["applied"], json!(true), "record {id}: {reply}");
    reply
}

/// A requests limit with a max no test reaches.
fn requests_limit(team: &str) -> Value {
    json!({"scope": {"team": team}, "metric": "requests", "max": 1_000_000_000_000u64,
           "period": "1Y"})
}

/// A cost limit over `team` with `max` USD.
fn cost_limit(team: &str, max: f64) -> Value {
    json!({"scope": {"team": team}, "metric": "cost", "max": max, "period": "1Y"})
}

/// `n` fresh records on each of `nodes`, one thread per node, ids `{prefix}-{node id}-{i}`;
/// each must be answered `applied: true`.
fn record_on_all(nodes: &[&Node], n: usize, prefix: &str, team: &str, cost: f64) {
    std::thread::scope(|s| {
        for node in nodes {
            let client = node.client();
            let id = node.node_id().to_string();
            s.spawn(move || {
                for i in 0..n {
                    record_fresh(&client, &format!("{prefix}-{id}-{i}"), team, cost);
                }
            });
        }
    });
}

// ---------------------------------------------------------------------------------------
// 1. Replication in a healthy fleet.

/// I1, I4: three nodes form a fleet (each lists three live members, each ready); a limit
/// written on one appears on the others; records sent concurrently to all three add up
/// exactly on every node, per origin and in total, for a requests and a cost limit; and a
/// cost budget exhausted through two nodes is denied by a check on the third.
#[test]
fn three_nodes_replicate_config_and_usage() {
    let start = Instant::now();
    let fleet = Fleet::start(3);
    let all: Vec<&Node> = fleet.nodes.iter().collect();
    let (a, b, c) = (all[0], all[1], all[2]);
    for node in &all {
        let members = cluster_members(&node.client()).expect("cluster view");
        assert_eq!(members.len(), 3, "{}: {members:?}", node.node_id());
        assert!(members.values().all(|&(_, live)| live), "{members:?}");
        assert_eq!(node.get("/readyz").0, 200, "{} ready", node.node_id());
    }

    // Config written on A reaches B and C.
    let took = put_limit_everywhere(a, &all, "t1-requests", requests_limit("t1"));
    eprintln!("t1-requests visible everywhere after {took:?}");
    put_limit_everywhere(a, &all, "t1-cost", cost_limit("t1", 1e6));

    // 30 records on each node, concurrently: every node counts all 90, each origin 30.
    const PER_NODE: usize = 30;
    const UNIT_COST: f64 = 0.003;
    record_on_all(&all, PER_NODE, "r", "t1", UNIT_COST);
    let per_node = |unit: i128| -> BTreeMap<String, i128> {
        fleet
            .ids()
            .into_iter()
            .map(|id| (id, PER_NODE as i128 * unit))
            .collect()
    };
    let took = wait_usage(
        &all,
        "t1-requests",
        &Usage::of(&per_node(1_000_000)),
        CONVERGE_TIMEOUT,
    );
    eprintln!("requests converged on 90 after {took:?}");
    wait_usage(
        &all,
        "t1-cost",
        &Usage::of(&per_node(micros(&json!(UNIT_COST)))),
        CONVERGE_TIMEOUT,
    );

    // A 1 USD budget, spent 0.1 at a time through A and B until one of them reports it
    // used up. C took nothing, yet must deny once gossip has told it.
    put_limit_everywhere(b, &all, "t2-budget", cost_limit("t2", 1.0));
    let mut spent: BTreeMap<String, i128> = BTreeMap::new();
    let mut i = 0;
    loop {
        let node = if i % 2 == 0 { a } else { b };
        let reply = record_fresh(&node.client(), &format!("b-{i}"), "t2", 0.1);
        *spent.entry(node.node_id().to_string()).or_default() += 100_000;
        i += 1;
        let used = micros(&reply["limits"][0]["used"]);
        assert_eq!(reply["limits"][0]["id"], json!("t2-budget"), "{reply}");
        if used >= 1_000_000 {
            break;
        }
        assert!(i < 100, "the budget never filled up: {reply}");
    }
    eprintln!("budget exhausted by {i} records of 0.1 USD: {spent:?}");
    let check = json!({"attributes": {"team": "t2"}});
    let (decision, took) = wait_for(CONVERGE_TIMEOUT, "C to deny the spent budget", || {
        let d = ok(c.post("/v1/check", check.clone()));
        if d["allowed"] == json!(false) {
            Ok(d)
        } else {
            Err(d.to_string())
        }
    });
    eprintln!("C denied after {took:?}");
    assert_eq!(decision["denied_by"], json!(["t2-budget"]), "{decision}");
    assert_eq!(decision["stale"], json!(false), "{decision}");
    wait_usage(&all, "t2-budget", &Usage::of(&spent), CONVERGE_TIMEOUT);
    // The earlier limits are untouched by the budget traffic (other scope).
    for node in &all {
        assert_eq!(
            try_usage(&node.client(), "t1-requests").expect("t1-requests"),
            Usage::of(&per_node(1_000_000))
        );
    }
    eprintln!(
        "three_nodes_replicate_config_and_usage: {:?}",
        start.elapsed()
    );
}

/// Waits until `GET path` answers `status` on every node of `nodes`.
#[track_caller]
fn wait_status(nodes: &[&Node], path: &str, status: u16) -> Duration {
    wait_for(
        CONFIG_TIMEOUT,
        &format!("{path} to answer {status} everywhere"),
        || {
            for node in nodes {
                let (got, body) = node.get(path);
                if got != status {
                    return Err(format!("{}: {got} {body}", node.node_id()));
                }
            }
            Ok(())
        },
    )
    .1
}

/// I4 for config other than limits: an entity written on one node replicates (another
/// node expands a record's attributes through it), its deletion replicates (the same
/// record then counts against nothing), and a limit deleted while a node was down (its
/// disk still holds the limit) stays deleted when that node comes back: the tombstone
/// wins on the returning node and the old record does not come back on the others.
/// (Tombstone expiry after its 7-day retention needs a clock the processes do not
/// share; `tally-node`'s `tombstones_are_collected_after_their_retention` and
/// `the_sweep_unpublishes_closed_epochs_and_collected_tombstones` cover it.)
#[test]
fn entities_and_deletions_replicate_across_nodes() {
    let mut fleet = Fleet::start(3);
    {
        let all: Vec<&Node> = fleet.nodes.iter().collect();
        let (a, b, c) = (all[0], all[1], all[2]);
        let vk = "/v1/entities/virtual_key/vk-9";
        ok(a.put(vk, json!({"parents": {"team": "t9"}})));
        wait_for(CONFIG_TIMEOUT, "vk-9 on every node", || {
            for node in &all {
                let (status, body) = node.get(vk);
                if status != 200 || body["parents"] != json!({"team": "t9"}) {
                    return Err(format!("{}: {status} {body}", node.node_id()));
                }
            }
            Ok(())
        });
        put_limit_everywhere(a, &all, "t9-cost", cost_limit("t9", 100.0));
        let by_key =
            |id: &str| json!({"id": id, "attributes": {"virtual_key": "vk-9"}, "cost": 1.0});
        // C learned the entity from A: a record naming only the key counts for team t9.
        let reply = ok(c.post("/v1/usage", by_key("e-1")));
        assert_eq!(reply["applied"], json!(true), "{reply}");
        assert_eq!(reply["limits"][0]["id"], json!("t9-cost"), "{reply}");
        let one_on_c: BTreeMap<String, i128> = [(c.node_id().to_string(), 1_000_000)].into();
        wait_usage(&all, "t9-cost", &Usage::of(&one_on_c), CONVERGE_TIMEOUT);

        // The entity is deleted on B: A and C forget it, and the key no longer expands.
        let (status, body) = b.delete(vk);
        assert!(
            status == 200 || status == 204,
            "DELETE {vk}: {status} {body}"
        );
        wait_status(&all, vk, 404);
        let reply = ok(a.post("/v1/usage", by_key("e-2")));
        assert_eq!(reply["applied"], json!(true), "{reply}");
        assert_eq!(
            reply["limits"],
            json!([]),
            "vk-9 still expands on A: {reply}"
        );
        wait_usage(&all, "t9-cost", &Usage::of(&one_on_c), CONVERGE_TIMEOUT);
    }

    // B goes down with the limit on its disk; C deletes the limit meanwhile.
    fleet.nodes[1].kill9();
    {
        let (a, c) = (&fleet.nodes[0], &fleet.nodes[2]);
        let (status, body) = c.delete("/v1/limits/t9-cost");
        assert!(status == 200 || status == 204, "DELETE: {status} {body}");
        wait_status(&[a, c], "/v1/limits/t9-cost", 404);
    }
    fleet.nodes[1].restart();
    fleet.wait_formed(FLEET_READY_TIMEOUT);
    let all: Vec<&Node> = fleet.nodes.iter().collect();
    wait_status(&all, "/v1/limits/t9-cost", 404);
    // And it stays gone: a few gossip rounds later no node has it back.
    std::thread::sleep(Duration::from_millis(1_000));
    for node in &all {
        let (status, body) = node.get("/v1/limits/t9-cost");
        assert_eq!(
            status,
            404,
            "{} resurrected the limit: {body}",
            node.node_id()
        );
        let reply = ok(node.post(
            "/v1/check",
            json!({"attributes": {"team": "t9"}, "cost": 1.0}),
        ));
        assert_eq!(reply["limits"], json!([]), "{}: {reply}", node.node_id());
    }
}

// ---------------------------------------------------------------------------------------
// 2. SIGKILL of one node under load.

/// Client threads per node.
const THREADS_PER_NODE: usize = 2;
/// Bound on the load phase, so a wedged server fails instead of hanging.
const LOAD_DEADLINE: Duration = Duration::from_secs(30);
/// Pause between two rounds of the monotonicity sampler.
const SAMPLE_EVERY: Duration = Duration::from_millis(20);

/// Shared between the test and its client threads.
struct Load {
    /// Where clients of node `i` send: `None` while node `i` is down (its clients then hold
    /// their pending id and wait: an id is only ever retried against the node that may
    /// have applied it, since deduplication is per node).
    targets: Vec<RwLock<Option<Client>>>,
    stop: AtomicBool,
    acked: AtomicU64,
    deadline: Instant,
}

/// A client thread of node `node`: records `n{node}-t{thread}-{k}` until told to stop,
/// always against its own node (see `retry_client`).
fn load_client(node: usize, thread: usize, load: Arc<Load>) -> RetryOutcome {
    let shared = RetryLoad {
        stop: &load.stop,
        acked: &load.acked,
        deadline: load.deadline,
    };
    retry_client(
        &format!("n{node}-t{thread}"),
        &load.targets[node],
        shared,
        |id| record(id, "load", 0.001),
    )
}

/// Samples every node's view of one limit and requires it never to go down: neither the
/// total nor any origin's entry (I3, and peer slots persisted across a restart). A node's
/// samples are taken one at a time under the lock, so two samples of one node are ordered.
struct Monotone {
    limit: &'static str,
    last: Mutex<Vec<Option<Usage>>>,
    samples: AtomicU64,
}

impl Monotone {
    fn new(limit: &'static str, nodes: usize) -> Monotone {
        Monotone {
            limit,
            last: Mutex::new(vec![None; nodes]),
            samples: AtomicU64::new(0),
        }
    }

    /// Samples node `i` through `client`; a failed request (node down) is skipped. Panics
    /// if the value went down since the previous sample of node `i`.
    fn sample(&self, i: usize, client: &Client) -> Option<Usage> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let now = try_usage(client, self.limit).ok()?;
        self.samples.fetch_add(1, Ordering::Relaxed);
        if let Some(prev) = &last[i] {
            assert!(
                now.used >= prev.used,
                "node {i}: used went down from {prev:?} to {now:?} (I3)"
            );
            for (origin, &v) in &prev.nodes {
                let v_now = now.nodes.get(origin).copied().unwrap_or(0);
                assert!(
                    v_now >= v,
                    "node {i}: slot of {origin} went down from {v} to {v_now}: \
                     {prev:?} then {now:?} (I3)"
                );
            }
        }
        last[i] = Some(now.clone());
        Some(now)
    }
}

/// I1, I3, I4 under SIGKILL: two client threads per node record usage on a three-node
/// fleet; one node (chosen by the seed) is SIGKILLed mid-load, the others keep taking
/// records, then it restarts on the same data directory. Ids whose outcome was unknown are
/// retried against the same node until acknowledged. Every node converges to exactly the
/// number of acknowledged ids, with each origin's slot equal to what that node
/// acknowledged; throughout, a sampler requires no node's total or slot ever to go down.
#[test]
fn kill9_one_node_under_load_converges() {
    let start = Instant::now();
    let mut rng = rng_from_env_or_time("kill9_one_node_under_load_converges");
    let mut fleet = Fleet::start(3);
    let ids = fleet.ids();
    {
        let all: Vec<&Node> = fleet.nodes.iter().collect();
        put_limit_everywhere(all[0], &all, "load-requests", requests_limit("load"));
    }

    let load = Arc::new(Load {
        targets: fleet
            .nodes
            .iter()
            .map(|n| RwLock::new(Some(n.client())))
            .collect(),
        stop: AtomicBool::new(false),
        acked: AtomicU64::new(0),
        deadline: Instant::now() + LOAD_DEADLINE,
    });
    let monotone = Arc::new(Monotone::new("load-requests", 3));
    let sampler_stop = Arc::new(AtomicBool::new(false));
    let sampler: JoinHandle<()> = {
        let (load, monotone, stop) = (load.clone(), monotone.clone(), sampler_stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                for (i, target) in load.targets.iter().enumerate() {
                    let client = target.read().expect("target lock").clone();
                    if let Some(client) = client {
                        monotone.sample(i, &client);
                    }
                }
                std::thread::sleep(SAMPLE_EVERY);
            }
        })
    };
    let clients: Vec<(usize, JoinHandle<RetryOutcome>)> = (0..3)
        .flat_map(|node| (0..THREADS_PER_NODE).map(move |t| (node, t)))
        .map(|(node, t)| {
            let load = load.clone();
            (node, std::thread::spawn(move || load_client(node, t, load)))
        })
        .collect();

    let victim = rng.range(0, 2) as usize;
    let before_kill = Duration::from_millis(rng.range(300, 1000));
    let down_for = Duration::from_millis(rng.range(1000, 2500));
    let after_restart = Duration::from_millis(rng.range(500, 1500));
    std::thread::sleep(before_kill);
    *load.targets[victim].write().expect("target lock") = None;
    fleet.nodes[victim].kill9();
    let acked_at_kill = load.acked.load(Ordering::SeqCst);
    std::thread::sleep(down_for);
    let acked_while_down = load.acked.load(Ordering::SeqCst) - acked_at_kill;
    fleet.nodes[victim].restart();
    assert_eq!(
        fleet.nodes[victim].node_id(),
        ids[victim],
        "node id persisted"
    );
    *load.targets[victim].write().expect("target lock") = Some(fleet.nodes[victim].client());
    std::thread::sleep(after_restart);
    load.stop.store(true, Ordering::SeqCst);

    let mut per_node: BTreeMap<String, i128> = BTreeMap::new();
    let mut seen = HashSet::new();
    let (mut unknown, mut retried_already_applied) = (0, 0);
    for (node, handle) in clients {
        let out = handle.join().expect("client thread panicked");
        unknown += out.unknown;
        retried_already_applied += out.retried_already_applied;
        *per_node.entry(ids[node].clone()).or_default() += out.acked.len() as i128 * 1_000_000;
        for id in out.acked {
            assert!(seen.insert(id.clone()), "{id} acknowledged twice");
        }
    }
    eprintln!(
        "killed {} after {before_kill:?} ({acked_at_kill} acknowledged), down {down_for:?} \
         ({acked_while_down} acknowledged meanwhile by the others), ran {after_restart:?} \
         after restart; {} acknowledged in all: {per_node:?}; {unknown} attempts with unknown \
         outcome, {retried_already_applied} retries found already applied",
        ids[victim],
        seen.len()
    );
    assert!(
        acked_while_down > 0,
        "the other nodes took no record while one was down"
    );
    for id in &ids {
        assert!(per_node[id] > 0, "{id} acknowledged nothing");
    }

    // Convergence, sampled through the same monotonicity check.
    let want = Usage::of(&per_node);
    let (_, took) = wait_for(CONVERGE_TIMEOUT, "convergence after the crash", || {
        for (i, node) in fleet.nodes.iter().enumerate() {
            let got = monotone
                .sample(i, &node.client())
                .ok_or_else(|| format!("{} did not answer", ids[i]))?;
            if got != want {
                return Err(format!("{} reports {got:?}, want {want:?}", ids[i]));
            }
        }
        Ok(())
    });
    eprintln!("converged {took:?} after the clients stopped");
    // The restarted node is a full member again: ready, and every node sees all three live.
    let took = fleet.wait_formed(FLEET_READY_TIMEOUT);
    eprintln!("fleet formed again {took:?} later");
    // Stays converged (nothing counts twice later, e.g. through relays).
    std::thread::sleep(Duration::from_millis(1000));
    sampler_stop.store(true, Ordering::SeqCst);
    sampler.join().expect("sampler thread panicked");
    let all: Vec<&Node> = fleet.nodes.iter().collect();
    wait_usage(&all, "load-requests", &want, Duration::ZERO);
    eprintln!(
        "{} monotonicity samples; kill9_one_node_under_load_converges: {:?}",
        monotone.samples.load(Ordering::Relaxed),
        start.elapsed()
    );
}

// ---------------------------------------------------------------------------------------
// 3. A node removed for good.

/// How long a brand-new node may take to learn the usage of a node removed for good: the
/// failure detector must first declare it dead before the others relay its slots.
const REPLACEMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// The limits of the departure tests: a requests limit and a cost limit over `team=dep`.
const DEP_LIMITS: [&str; 2] = ["dep-requests", "dep-cost"];

/// A formed three-node fleet where node-1, node-2 and node-3 took 10, 20 and 30 records
/// (1 request and 0.007 USD each; different counts, so a mixed-up origin shows), converged
/// on every node. Returns the fleet and the exact usage of each of [`DEP_LIMITS`].
fn departed_fixture() -> (Fleet, [Usage; 2]) {
    let fleet = Fleet::start(3);
    let ids = fleet.ids();
    let all: Vec<&Node> = fleet.nodes.iter().collect();
    put_limit_everywhere(all[0], &all, DEP_LIMITS[0], requests_limit("dep"));
    put_limit_everywhere(all[1], &all, DEP_LIMITS[1], cost_limit("dep", 1e6));
    let mut requests: BTreeMap<String, i128> = BTreeMap::new();
    let mut cost: BTreeMap<String, i128> = BTreeMap::new();
    std::thread::scope(|s| {
        for (i, node) in all.iter().enumerate() {
            let n = 10 * (i + 1);
            requests.insert(ids[i].clone(), n as i128 * 1_000_000);
            cost.insert(ids[i].clone(), n as i128 * 7_000);
            let client = node.client();
            let id = ids[i].clone();
            s.spawn(move || {
                for k in 0..n {
                    record_fresh(&client, &format!("dep-{id}-{k}"), "dep", 0.007);
                }
            });
        }
    });
    let want = [Usage::of(&requests), Usage::of(&cost)];
    for (limit, want) in DEP_LIMITS.iter().zip(&want) {
        wait_usage(&all, limit, want, CONVERGE_TIMEOUT);
    }
    (fleet, want)
}

/// `Ok` iff `node` reports exactly `want` for every one of [`DEP_LIMITS`].
fn try_dep_usage(node: &Node, want: &[Usage; 2]) -> Result<(), String> {
    for (limit, want) in DEP_LIMITS.iter().zip(want) {
        let got = try_usage(&node.client(), limit)?;
        if got != *want {
            return Err(format!(
                "{} reports {limit} {got:?}, want {want:?}",
                node.node_id()
            ));
        }
    }
    Ok(())
}

/// I1 across the permanent removal of a node: three nodes take different amounts of usage
/// (10, 20, 30 records); C is SIGKILLed and never restarted; a brand-new node D with a
/// fresh data directory, seeded only with A, must count everything C acknowledged (learned
/// from what A and B keep and relay), exactly, per origin and in total.
///
/// Black-box limit: the survivors still hold C's own gossip state for chitchat's dead-node
/// grace period, so D may learn C's slots from that copy as well as from the relays; the
/// test asserts the outcome (D counts C exactly once), not the route.
#[test]
fn replacement_node_learns_departed_usage() {
    let start = Instant::now();
    let (mut fleet, want) = departed_fixture();
    let ids = fleet.ids();

    // C leaves for good.
    let c_id = ids[2].clone();
    fleet.nodes[2].kill9();
    let killed_at = Instant::now();

    // D: fresh data directory, seeded with A only.
    let d_port = free_udp_port();
    let d = Node::start(NodeOpts::gossip(
        "node-4",
        d_port,
        &[fleet.gossip_ports[0]],
        CLUSTER_KEY,
    ));
    let (_, took) = wait_for(REPLACEMENT_TIMEOUT, "D to count the departed node", || {
        try_dep_usage(&d, &want)
    });
    eprintln!(
        "D counted everything {took:?} after it started ({:?} after C was killed)",
        killed_at.elapsed()
    );

    // D is a full member (ready, knows A and B live, C not live), and the survivors and D
    // agree exactly, also after a few more rounds (relays never count C twice).
    let (_, took) = wait_for(REPLACEMENT_TIMEOUT, "D ready and C seen dead", || {
        if !is_ready(&d.client()) {
            return Err("D not ready".into());
        }
        for node in [&fleet.nodes[0], &fleet.nodes[1], &d] {
            let members = cluster_members(&node.client())?;
            let live = |id: &str| members.get(id).map(|e| e.1);
            if live(&ids[0]) != Some(true)
                || live(&ids[1]) != Some(true)
                || live("node-4") != Some(true)
                || live(&c_id) != Some(false)
            {
                return Err(format!("{} sees {members:?}", node.node_id()));
            }
        }
        Ok(())
    });
    eprintln!(
        "membership settled {took:?} later: every survivor sees C dead {:?} after the kill",
        killed_at.elapsed()
    );
    std::thread::sleep(Duration::from_millis(1000));
    for node in [&fleet.nodes[0], &fleet.nodes[1], &d] {
        try_dep_usage(node, &want).unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(
        fleet.nodes[0].get("/v1/cluster").1["nodes"]
            .as_array()
            .map(Vec::len),
        Some(4),
        "A lists A, B, C (dead) and D"
    );
    eprintln!(
        "replacement_node_learns_departed_usage: {:?}",
        start.elapsed()
    );
}

/// I1 when nothing but relays can carry a departed node's usage: C is SIGKILLed for good,
/// then A and B are SIGKILLed together and restarted, so no running process holds C's own
/// gossip state any more (their new processes know C's slots only from their disks). A
/// brand-new node E seeded with A must still count C exactly: only the relays A and B
/// publish for the non-live origin C can tell it. A and B themselves count C right after
/// their restart (peer slots are durable).
#[test]
fn departed_usage_reaches_a_new_node_through_relays_alone() {
    let start = Instant::now();
    let (mut fleet, want) = departed_fixture();
    let ids = fleet.ids();
    let c_id = ids[2].clone();
    fleet.nodes[2].kill9();
    fleet.nodes[0].kill9();
    fleet.nodes[1].kill9();
    fleet.nodes[0].restart();
    fleet.nodes[1].restart();
    for node in &fleet.nodes[..2] {
        try_dep_usage(node, &want)
            .unwrap_or_else(|e| panic!("right after the restart (I1: durable peer slots): {e}"));
    }

    let e = Node::start(NodeOpts::gossip(
        "node-5",
        free_udp_port(),
        &[fleet.gossip_ports[0]],
        CLUSTER_KEY,
    ));
    let e_started = Instant::now();
    let (_, took) = wait_for(REPLACEMENT_TIMEOUT, "E to count the departed node", || {
        try_dep_usage(&e, &want)
    });
    eprintln!("E counted everything {took:?} after it started");
    // The scenario's premise: C's own gossip state is gone, so what E learned of C came
    // through relays. (If this fails, the test proves less, not that the server is wrong.)
    for node in [&fleet.nodes[0], &fleet.nodes[1], &e] {
        let members = cluster_members(&node.client()).expect("cluster view");
        assert!(
            !members.contains_key(&c_id),
            "premise: {} should not know C as a member after the restarts: {members:?}",
            node.node_id()
        );
    }
    let (_, ready) = wait_for(REPLACEMENT_TIMEOUT, "E ready", || {
        is_ready(&e.client())
            .then_some(())
            .ok_or("E not ready".into())
    });
    eprintln!("E ready {ready:?} later");
    // Stays exact on every survivor, relays from two nodes counting C once.
    std::thread::sleep(Duration::from_millis(1000));
    for node in [&fleet.nodes[0], &fleet.nodes[1], &e] {
        try_dep_usage(node, &want).unwrap_or_else(|e| panic!("{e}"));
    }
    eprintln!(
        "departed_usage_reaches_a_new_node_through_relays_alone: {:?} ({:?} since E started)",
        start.elapsed(),
        e_started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------
// 4. A node with the wrong cluster key.

/// How long the good nodes are watched for leaks from the bad node.
const LEAK_WATCH: Duration = Duration::from_secs(3);

/// Integrity (DESIGN.md §4: no one without the cluster key can raise usage or change a
/// limit), and I1/I4 among the good nodes. A node with a different cluster key joins gossip
/// membership (chitchat's heartbeats are not sealed) but every value it publishes fails the
/// MAC check: the good nodes never see its limit, nor its usage, nor its overwrite of their
/// own limit; their totals stay exact; and they count the rejected values in
/// `tally_gossip_values_rejected_total`. Symmetrically, the bad node learns nothing.
#[test]
fn wrong_cluster_key_changes_nothing() {
    let start = Instant::now();
    let fleet = Fleet::start(2);
    let (a, b) = (&fleet.nodes[0], &fleet.nodes[1]);
    let good = [a, b];
    let bad_key = "not-the-cluster-key-9876543210";
    assert_ne!(bad_key, CLUSTER_KEY);
    let x = Node::start(NodeOpts::gossip(
        "bad-x",
        free_udp_port(),
        &fleet.gossip_ports,
        bad_key,
    ));
    // Gossip with X flows: its values reach the good nodes and fail the MAC. chitchat
    // knows X as a member, but tally does not count it live, and X, which holds no value
    // it can verify, never says it is ready.
    let (_, took) = wait_for(CONFIG_TIMEOUT, "X's values to reach A and B", || {
        for node in good {
            let rejected = metric(&node.client(), "tally_gossip_values_rejected_total");
            if !rejected.is_some_and(|r| r > 0.0) {
                return Err(format!("{}: rejected = {rejected:?}", node.node_id()));
            }
        }
        Ok(())
    });
    eprintln!("X's values arrived (and were rejected) after {took:?}");
    // The good fleet's limit, then X's: a limit of its own and an overwrite of theirs
    // (later in HLC order, so it would win if it were accepted), plus usage on both.
    let good_spec = requests_limit("wk");
    put_limit_everywhere(a, &good, "wk-good", good_spec.clone());
    let evil_spec = requests_limit("wk");
    ok(x.put("/v1/limits/wk-evil", evil_spec));
    let overwrite = json!({"scope": {"team": "wk"}, "metric": "requests", "max": 5,
                           "period": "1Y"});
    ok(x.put("/v1/limits/wk-good", overwrite));
    for k in 0..20 {
        let reply = record_fresh(&x.client(), &format!("x-{k}"), "wk", 0.01);
        assert_eq!(
            reply["limits"].as_array().map(Vec::len),
            Some(2),
            "X counts its own two limits: {reply}"
        );
    }
    record_on_all(&good, 15, "g", "wk", 0.01);
    let want: BTreeMap<String, i128> = fleet.ids().into_iter().map(|id| (id, 15_000_000)).collect();
    let want = Usage::of(&want);
    wait_usage(&good, "wk-good", &want, CONVERGE_TIMEOUT);

    // Watch the good nodes for a while: nothing from X ever shows; X is never live to
    // them, and X is never ready (its checks say stale).
    let watch_start = Instant::now();
    let mut rounds = 0;
    while watch_start.elapsed() < LEAK_WATCH {
        assert!(
            !is_ready(&x.client()),
            "X, which verifies nothing, says ready"
        );
        let decision = ok(x.post("/v1/check", json!({"attributes": {"team": "wk"}})));
        assert_eq!(decision["stale"], json!(true), "{decision}");
        for node in good {
            let members = cluster_members(&node.client()).expect("cluster view");
            assert_ne!(
                members.get("bad-x").map(|m| m.1),
                Some(true),
                "{} lists X as live: {members:?}",
                node.node_id()
            );
            let (status, body) = node.get("/v1/limits/wk-evil");
            assert_eq!(status, 404, "{} sees X's limit: {body}", node.node_id());
            let view = ok(node.get("/v1/limits/wk-good"));
            assert_eq!(count(&view["max"]), 1_000_000_000_000, "{view}");
            assert_eq!(
                try_usage(&node.client(), "wk-good").expect("wk-good"),
                want,
                "{} counts usage from X",
                node.node_id()
            );
            let listed = ok(node.get("/v1/limits"));
            let listed: Vec<&str> = listed["limits"]
                .as_array()
                .expect("limits array")
                .iter()
                .filter_map(|l| l["id"].as_str())
                .collect();
            assert_eq!(listed, ["wk-good"], "{} lists", node.node_id());
        }
        rounds += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    // X, symmetrically, learned nothing from the good nodes: only its own usage counts.
    let x_view = ok(x.get("/v1/limits/wk-good"));
    assert_eq!(count(&x_view["max"]), 5, "{x_view}");
    assert_eq!(
        try_usage(&x.client(), "wk-good").expect("X's wk-good"),
        Usage::of(&BTreeMap::from([("bad-x".to_string(), 20_000_000)]))
    );
    eprintln!(
        "{rounds} rounds of leak checks over {LEAK_WATCH:?}; \
         wrong_cluster_key_changes_nothing: {:?}",
        start.elapsed()
    );
}

// ---------------------------------------------------------------------------------------
// 5. Readiness (DESIGN.md §4): 503 and `stale: true` until a node has the fleet's data.

/// Polls `node` every 20 ms until `/readyz` says 200, checking at every poll that a check
/// made just before a 503 said `stale`, and at the first 200 that the node
/// already counts `want` for `limit` (it must not say ready before it has the data).
/// Returns how many polls said 503.
#[track_caller]
fn ready_only_with(node: &Node, limit: &str, want: i128, timeout: Duration) -> usize {
    let c = node.client();
    let start = Instant::now();
    let mut unready = 0;
    loop {
        // The check first: a node that said stale may be ready a moment later, never the
        // other way round while it syncs.
        let decision = ok(c.post("/v1/check", json!({"attributes": {"team": "rd"}})));
        let (status, _) = c.try_request("GET", "/readyz", None).expect("GET /readyz");
        if status == 200 {
            let used = try_usage(&c, limit).map(|u| u.used);
            assert_eq!(
                used,
                Ok(want),
                "{} said ready before it had the fleet's usage",
                node.node_id()
            );
            return unready;
        }
        assert_eq!(status, 503, "/readyz");
        assert_eq!(
            decision["stale"],
            json!(true),
            "not ready but not stale: {decision}"
        );
        unready += 1;
        assert!(
            start.elapsed() < timeout,
            "{} never became ready",
            node.node_id()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A node joining a fleet that already holds usage is not ready (and its checks are stale)
/// until it has merged that usage; a restarted first node whose only seed is itself, with a
/// fresh data directory, likewise waits for the peer that holds the usage.
#[test]
fn readiness_waits_for_the_fleets_data() {
    let (pa, pb) = (free_udp_port(), free_udp_port());
    let mut a = Node::start(NodeOpts::gossip("rd-a", pa, &[pa], CLUSTER_KEY));
    let b = Node::start(NodeOpts::gossip("rd-b", pb, &[pa], CLUSTER_KEY));
    wait_for(FLEET_READY_TIMEOUT, "a and b ready", || {
        (is_ready(&a.client()) && is_ready(&b.client()))
            .then_some(())
            .ok_or_else(|| "not ready".to_string())
    });
    put_limit_everywhere(&a, &[&a, &b], "rd", requests_limit("rd"));
    record_on_all(&[&b], 40, "rd", "rd", 0.0);
    let total = 40_000_000;
    wait_usage(
        &[&a, &b],
        "rd",
        &Usage::of(&BTreeMap::from([("rd-b".into(), total)])),
        CONVERGE_TIMEOUT,
    );

    // A new node seeded with a: ready only once it counts b's usage.
    let c = Node::start(NodeOpts::gossip(
        "rd-c",
        free_udp_port(),
        &[pa],
        CLUSTER_KEY,
    ));
    let unready = ready_only_with(&c, "rd", total, FLEET_READY_TIMEOUT);
    assert!(unready > 0, "c was never seen unready");

    // a, the fleet's first node (only seed: itself), comes back with a fresh disk and a new
    // id at the same address: b and c find it, and it must sync with them first.
    a.kill9();
    drop(a);
    let a2 = Node::start(NodeOpts::gossip("rd-a2", pa, &[pa], CLUSTER_KEY));
    let unready = ready_only_with(&a2, "rd", total, FLEET_READY_TIMEOUT);
    assert!(unready > 0, "a2 was never seen unready");
}

/// Readiness is not a latch: a node cut off from every peer reports 503 (and stale
/// checks) after `--isolated-unready-secs`, and 200 again once it has synced with a peer.
#[test]
fn readiness_goes_back_to_503_when_isolated() {
    let (pa, pb) = (free_udp_port(), free_udp_port());
    let opts = |id: &str, port: u16, seed: u16| {
        NodeOpts::gossip(id, port, &[seed], CLUSTER_KEY).args(["--isolated-unready-secs", "1"])
    };
    let a = Node::start(opts("iso-a", pa, pb));
    let mut b = Node::start(opts("iso-b", pb, pa));
    let (ca, cb) = (a.client(), b.client());
    let both_ready = || {
        (is_ready(&ca) && is_ready(&cb))
            .then_some(())
            .ok_or_else(|| "not ready".to_string())
    };
    wait_for(FLEET_READY_TIMEOUT, "a and b ready", both_ready);
    b.kill9();
    let (_, took) = wait_for(FLEET_READY_TIMEOUT, "a to report 503 once isolated", || {
        let (status, body) = a.get("/readyz");
        (status == 503)
            .then_some(())
            .ok_or(format!("{status} {body}"))
    });
    let decision = ok(a.post("/v1/check", json!({"attributes": {"team": "iso"}})));
    assert_eq!(decision["stale"], json!(true), "{decision}");
    eprintln!("a unready {took:?} after b died");
    b.restart(); // on another HTTP port
    let cb = b.client();
    wait_for(FLEET_READY_TIMEOUT, "a and b ready again", || {
        (is_ready(&ca) && is_ready(&cb))
            .then_some(())
            .ok_or_else(|| "not ready".to_string())
    });
    let decision = ok(a.post("/v1/check", json!({"attributes": {"team": "iso"}})));
    assert_eq!(decision["stale"], json!(false), "{decision}");
}
