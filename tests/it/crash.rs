//! Crashes under load: SIGKILL at random moments while clients record usage, and graceful
//! SIGTERM. Checks I1 (no acknowledged record is lost), I2 (a retried id is counted once,
//! across restarts) and I3 (the node's own slot never decreases across restarts).
//!
//! Clients behave like a careful gateway: every record has a unique id; an attempt whose
//! outcome is unknown (connection refused or reset, 503) is retried with the same id until
//! it gets a 200. The expected total is therefore exactly the number of distinct ids that
//! got a 200, whether that 200 said `applied: true` or (for a retry of a record that had
//! been applied before the crash) `applied: false`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tally_tests::{
    Client, Node, RetryLoad, RetryOutcome, Value, count, json, micros, ok, retry_client,
    rng_from_env_or_time,
};

/// Concurrent client threads.
const THREADS: usize = 4;
/// SIGKILL / restart cycles in the crash test.
const CYCLES: usize = 6;
/// Cost of every record, in micro-USD (0.001 USD).
const UNIT_COST_MICROS: i128 = 1_000;
/// Bound on the whole load phase, so a wedged server fails instead of hanging.
const LOAD_DEADLINE: Duration = Duration::from_secs(45);

/// Two global limits every record hits: requests (1 per record) and cost (0.001 each).
fn create_limits(node: &Node) {
    ok(node.put(
        "/v1/limits/all-requests",
        json!({"scope": {}, "metric": "requests", "max": 1_000_000_000_000u64,
               "period": "1Y"}),
    ));
    ok(node.put(
        "/v1/limits/all-cost",
        json!({"scope": {}, "metric": "cost", "max": 1e9, "period": "1Y"}),
    ));
}

fn record(id: &str) -> Value {
    json!({"id": id, "attributes": {"team": "crash"}, "cost": 0.001, "requests": 1})
}

/// What the node reports: records counted, and this node's own slot for the requests limit.
struct Totals {
    requests: u64,
    own_slot: u64,
}

/// The suite's check: reads both limits and requires them to agree with each other (one
/// record is one atomic unit: 1 request and 0.001 USD), that the node's own slot equals the
/// total (a single node and no baseline), and that the total lies in `expected` (I1 below,
/// I2 above).
#[track_caller]
fn check_totals(node: &Node, expected: std::ops::RangeInclusive<u64>) -> Totals {
    let req = ok(node.get("/v1/limits/all-requests"));
    let cost = ok(node.get("/v1/limits/all-cost"));
    let requests = count(&req["used"]);
    assert_eq!(
        micros(&cost["used"]),
        i128::from(requests) * UNIT_COST_MICROS,
        "cost and requests disagree: {cost} vs {req}"
    );
    let own_slot = req["nodes"].get(node.node_id()).map(count).unwrap_or(0);
    assert_eq!(own_slot, requests, "own slot vs total: {req}");
    assert!(
        expected.contains(&requests),
        "counted {requests} records, expected {expected:?} (I1 lost / I2 double count)"
    );
    Totals { requests, own_slot }
}

/// Shared between the test and its client threads.
struct Load {
    /// Where clients send: `None` while the node is being killed, restarted and checked
    /// (clients then hold their pending id and wait), so checks see an idle node.
    target: RwLock<Option<Client>>,
    stop: AtomicBool,
    /// Distinct ids that got a 200 so far.
    acked: AtomicU64,
    deadline: Instant,
}

/// A client thread: records `t{thread}-{n}` until told to stop (see `retry_client`).
fn client(thread: usize, load: Arc<Load>) -> RetryOutcome {
    let shared = RetryLoad {
        stop: &load.stop,
        acked: &load.acked,
        deadline: load.deadline,
    };
    retry_client(&format!("t{thread}"), &load.target, shared, record)
}

/// Waits until the clients have `more` records acknowledged beyond what they had, instead
/// of sleeping a fixed time that a loaded machine may not fill with any work.
fn wait_acked(load: &Load, more: u64) {
    let want = load.acked.load(Ordering::SeqCst) + more;
    while load.acked.load(Ordering::SeqCst) < want {
        assert!(
            Instant::now() < load.deadline,
            "clients got only {} of {want} acknowledgements before the deadline",
            load.acked.load(Ordering::SeqCst)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn start_clients(load: &Arc<Load>) -> Vec<JoinHandle<RetryOutcome>> {
    (0..THREADS)
        .map(|t| {
            let load = load.clone();
            std::thread::spawn(move || client(t, load))
        })
        .collect()
}

/// Stops the clients (each first resolves its pending id) and returns every acked id.
fn stop_clients(load: &Load, handles: Vec<JoinHandle<RetryOutcome>>) -> Vec<String> {
    load.stop.store(true, Ordering::SeqCst);
    let mut ids = Vec::new();
    let (mut retried, mut unknown) = (0, 0);
    for h in handles {
        let out = h.join().expect("client thread panicked");
        ids.extend(out.acked);
        retried += out.retried_already_applied;
        unknown += out.unknown;
    }
    eprintln!(
        "clients: {} records acknowledged, {unknown} attempts with unknown outcome, \
         {retried} retries found already applied",
        ids.len()
    );
    let distinct: HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "an id was acknowledged twice");
    ids
}

/// Re-sends `ids` (a spread sample of at most `max`) and requires each to be answered
/// `applied: false` (I2).
fn resend_is_noop(node: &Node, ids: &[String], max: usize) {
    let step = ids.len().div_ceil(max).max(1);
    for id in ids.iter().step_by(step) {
        let reply = ok(node.post("/v1/usage", record(id)));
        assert_eq!(reply["applied"], json!(false), "re-sent {id}: {reply}");
    }
}

/// I1, I2, I3 under SIGKILL: four clients record usage while the node is killed at random
/// moments and restarted on the same data directory, six times. After each restart the
/// total is at least what was acknowledged before the kill (I1) and at most that plus one
/// in-flight record per client (I2), and the node's own slot has not decreased (I3). At the
/// end the total is exactly the number of acknowledged ids, re-sending them changes
/// nothing, and that still holds after one more crash.
#[test]
fn sigkill_under_load_loses_and_duplicates_nothing() {
    let mut rng = rng_from_env_or_time("sigkill_under_load");
    let mut node = Node::single();
    let node_id = node.node_id().to_string();
    create_limits(&node);
    let load = Arc::new(Load {
        target: RwLock::new(Some(node.client())),
        stop: AtomicBool::new(false),
        acked: AtomicU64::new(0),
        deadline: Instant::now() + LOAD_DEADLINE,
    });
    let handles = start_clients(&load);
    let mut last_slot = 0;
    for cycle in 0..CYCLES {
        let delay = rng.range(50, 400);
        std::thread::sleep(Duration::from_millis(delay));
        // Requests already sent stay in flight through the kill; no new ones start.
        *load.target.write().expect("target lock") = None;
        node.kill9();
        // Every 200 the clients count from here on came from a process that is dead.
        let acked_before = load.acked.load(Ordering::SeqCst);
        node.restart();
        assert_eq!(node.node_id(), node_id, "node id is persisted");
        let totals = check_totals(&node, acked_before..=acked_before + THREADS as u64);
        assert!(
            totals.own_slot >= last_slot,
            "own slot went from {last_slot} to {} (I3)",
            totals.own_slot
        );
        last_slot = totals.own_slot;
        eprintln!(
            "cycle {cycle}: killed after {delay} ms; {acked_before} acknowledged, {} counted",
            totals.requests
        );
        *load.target.write().expect("target lock") = Some(node.client());
    }
    wait_acked(&load, 50);
    let ids = stop_clients(&load, handles);
    let total = ids.len() as u64;
    assert!(total > 0, "no record was ever acknowledged");
    check_totals(&node, total..=total);
    resend_is_noop(&node, &ids, 200);
    check_totals(&node, total..=total);

    // Dedup and slots are durable: one more crash with no traffic changes nothing.
    node.kill9();
    node.restart();
    let totals = check_totals(&node, total..=total);
    assert!(totals.own_slot >= last_slot, "own slot decreased (I3)");
    resend_is_noop(&node, &ids, 200);
    check_totals(&node, total..=total);
}

/// Graceful shutdown (I1, I2): SIGTERM exits 0 and keeps every acknowledged record, first
/// with nothing in flight (exact), then under load (at least the acknowledged ones, at most
/// one in-flight record more per client; exact once the clients resolved their retries).
#[test]
fn sigterm_drains_and_keeps_acknowledged_records() {
    let mut node = Node::single();
    create_limits(&node);
    for i in 0..20 {
        let reply = ok(node.post("/v1/usage", record(&format!("seq-{i}"))));
        assert_eq!(reply["applied"], json!(true), "{reply}");
    }
    let status = node.terminate();
    assert_eq!(status.code(), Some(0), "SIGTERM exit status: {status}");
    node.restart();
    check_totals(&node, 20..=20);

    let load = Arc::new(Load {
        target: RwLock::new(Some(node.client())),
        stop: AtomicBool::new(false),
        acked: AtomicU64::new(20),
        deadline: Instant::now() + LOAD_DEADLINE,
    });
    let handles = start_clients(&load);
    wait_acked(&load, 50);
    *load.target.write().expect("target lock") = None;
    let status = node.terminate();
    assert_eq!(status.code(), Some(0), "SIGTERM under load: {status}");
    let acked_before = load.acked.load(Ordering::SeqCst);
    assert!(acked_before > 20, "no record acknowledged under load");
    node.restart();
    check_totals(&node, acked_before..=acked_before + THREADS as u64);
    *load.target.write().expect("target lock") = Some(node.client());
    wait_acked(&load, 20);
    let mut ids = stop_clients(&load, handles);
    ids.extend((0..20).map(|i| format!("seq-{i}")));
    let total = ids.len() as u64;
    check_totals(&node, total..=total);
    resend_is_noop(&node, &ids, 100);
    check_totals(&node, total..=total);
}

/// A shutdown signal that arrives while the node is still starting (the store is being
/// opened, nothing listens yet) stops it cleanly: exit 0 once it is open, not the default
/// action of the signal (143 for SIGTERM, 130 for SIGINT). The test waits until the
/// database file exists, which the node creates while opening the store, and signals then.
/// Before the handlers were installed first, every run here exited 143 / 130.
#[test]
fn shutdown_signal_during_start_up_exits_cleanly() {
    for (signal, name) in [("-TERM", "SIGTERM"), ("-INT", "SIGINT")] {
        for attempt in 0..3 {
            let dir = tempfile::Builder::new()
                .prefix("tally-it-")
                .tempdir()
                .expect("create temp dir");
            let data_dir = dir.path().join("data");
            let db = data_dir.join("tally.redb");
            let child = std::process::Command::new(tally_tests::tally_bin())
                .arg("serve")
                .args(["--listen", "127.0.0.1:0", "--data-dir"])
                .arg(&data_dir)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn tally");
            let deadline = Instant::now() + Duration::from_secs(15);
            while !db.exists() {
                assert!(
                    Instant::now() < deadline,
                    "the node never created {}",
                    db.display()
                );
                std::hint::spin_loop();
            }
            let sent = std::process::Command::new("kill")
                .args([signal, &child.id().to_string()])
                .status()
                .expect("run kill");
            assert!(sent.success(), "kill {signal} failed");
            let out = child.wait_with_output().expect("wait for tally");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(0),
                "{name} during start-up (attempt {attempt}): {}; stderr:\n{stderr}",
                out.status
            );
            assert!(
                stderr.contains(&format!("{name} received")),
                "{name} during start-up: no `{name} received` in:\n{stderr}"
            );
        }
    }
}

/// Sends the headers of a `POST /v1/usage` with `Expect: 100-continue` and waits for the
/// node's `100 Continue`, which hyper sends only once the handler reads the body: from
/// then on the request is in flight inside the node. Returns the connection and the body
/// still to send.
fn start_in_flight(node: &Node, id: &str) -> (std::net::TcpStream, Vec<u8>) {
    use std::io::{BufRead as _, Write as _};
    let addr = node.url().trim_start_matches("http://");
    let mut tcp = std::net::TcpStream::connect(addr).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    let body = serde_json::to_vec(&record(id)).expect("serialize");
    write!(
        tcp,
        "POST /v1/usage HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    )
    .expect("send headers");
    let mut reader = std::io::BufReader::new(tcp.try_clone().expect("clone"));
    let mut status = String::new();
    reader.read_line(&mut status).expect("read 100 Continue");
    assert!(
        status.starts_with("HTTP/1.1 100"),
        "expected 100 Continue for {id}, got {status:?}"
    );
    let mut blank = String::new();
    reader
        .read_line(&mut blank)
        .expect("read end of 100 Continue");
    assert_eq!(blank, "\r\n", "after 100 Continue");
    (tcp, body)
}

/// Sends the rest of a request started by [`start_in_flight`] and returns its reply. Fails
/// if the node dropped the connection instead of answering.
fn finish_in_flight(mut tcp: std::net::TcpStream, body: &[u8], id: &str) -> (u16, Value) {
    use std::io::{Read as _, Write as _};
    tcp.write_all(body)
        .unwrap_or_else(|e| panic!("{id}: the node dropped the in-flight request: {e}"));
    let mut text = String::new();
    tcp.read_to_string(&mut text)
        .unwrap_or_else(|e| panic!("{id}: the node dropped the in-flight request: {e}"));
    let status: u16 = text
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{id}: no HTTP status in the reply {text:?} (request dropped)"));
    let json = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_else(|| panic!("{id}: no body in {text:?}"));
    // The reply may be chunked; the JSON object is the part between the outer braces.
    let json = &json[json.find('{').expect("JSON body")..=json.rfind('}').expect("JSON body")];
    (status, serde_json::from_str(json).expect("JSON reply"))
}

/// Draining (I1): requests in flight when SIGTERM or SIGINT arrives are answered, applied
/// and durable, and the node then exits 0. Each request is provably inside the node's
/// handler (it got `100 Continue`) before the signal; its body is sent only after the
/// signal. A node that dropped them instead fails here: the reply read errors or is empty.
#[test]
fn shutdown_signal_answers_requests_in_flight() {
    for signal in ["-TERM", "-INT"] {
        let mut node = Node::single();
        create_limits(&node);
        let in_flight: Vec<_> = (0..3)
            .map(|i| {
                let id = format!("in-flight{signal}-{i}");
                let (tcp, body) = start_in_flight(&node, &id);
                (id, tcp, body)
            })
            .collect();
        let pid = node.pid().to_string();
        let sent = std::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill {signal} failed");
        for (id, tcp, body) in in_flight {
            let (status, reply) = finish_in_flight(tcp, &body, &id);
            assert_eq!(status, 200, "{signal}: {id}: {reply}");
            assert_eq!(reply["applied"], json!(true), "{signal}: {id}: {reply}");
        }
        let status = node.wait_exit();
        assert_eq!(status.code(), Some(0), "{signal}: exit status {status}");
        node.restart();
        check_totals(&node, 3..=3);
    }
}
