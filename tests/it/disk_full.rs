//! A real disk that fills up: the real `tally` binary with its data directory on a small
//! tmpfs that `tests/disk_full.sh` mounts (it needs root, so `.ci/run` runs it; the test
//! is ignored in a plain `cargo test` and fails loudly without the mount).
//!
//! Writers record batches of unique ids until writes get 503. While the disk is full,
//! writes are refused with 503 `unavailable`, checks answer 200, `/readyz` is 503, and the
//! count is exactly what was acknowledged, also after a SIGKILL and restart on the full
//! disk. Once a ballast file placed on the same file system beforehand is deleted, writes
//! resume without a restart; every refused batch is retried with its ids until it gets a
//! 200. At the end the count is every acknowledged id exactly once, also after a restart
//! (I1, I2, I3).

use std::collections::HashSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tally_tests::{
    Client, Node, NodeOpts, Value, assert_error, count, is_ready, json, metric, ok, wait_until,
};

/// Set by `tests/disk_full.sh`: the mount point of the small tmpfs.
const DIR_VAR: &str = "TALLY_DISK_FULL_DIR";
/// Bytes of the file deleted to give space back.
const BALLAST_BYTES: usize = 2 << 20;
const THREADS: usize = 4;
/// Ids per request (`POST /v1/usage/batch`), so the disk fills in seconds.
const BATCH: usize = 50;
/// Bound on every phase, so a wedged node fails the test instead of hanging it.
const PHASE_DEADLINE: Duration = Duration::from_secs(180);

fn batch(ids: &[String]) -> Vec<u8> {
    let records: Vec<Value> = ids
        .iter()
        .map(|id| json!({"id": id, "attributes": {"team": "disk"}, "requests": 1}))
        .collect();
    serde_json::to_vec(&json!({ "records": records })).expect("serialize")
}

/// Per id of a 200 reply: applied or already applied.
fn results(text: &str, ids: &[String]) -> Vec<bool> {
    let reply: Value = serde_json::from_str(text).expect("JSON reply");
    let results = reply["results"].as_array().expect("results");
    assert_eq!(results.len(), ids.len(), "{reply}");
    results
        .iter()
        .zip(ids)
        .map(|(r, id)| {
            assert_eq!(r["id"].as_str(), Some(id.as_str()), "{reply}");
            r["applied"].as_bool().expect("applied")
        })
        .collect()
}

/// Records requests counted by the node (the limit every record hits).
fn used(client: &Client) -> u64 {
    count(&ok(client.get("/v1/limits/all-requests"))["used"])
}

/// Writes zeros to `path` until the file system has no space left.
fn fill_rest(path: &Path) {
    let mut f = std::fs::File::create(path).expect("create filler");
    let chunk = vec![0u8; 16 * 1024];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
}

fn write_ballast(path: &Path) {
    let mut f = std::fs::File::create(path).expect("create ballast");
    f.write_all(&vec![0xa5; BALLAST_BYTES])
        .expect("write ballast: is the tmpfs large enough?");
    f.sync_all().expect("sync ballast");
}

#[test]
#[ignore = "needs a small tmpfs mounted by tests/disk_full.sh (root); .ci/run runs it"]
fn writes_stop_while_the_disk_is_full_and_resume_when_space_returns() {
    let mount = PathBuf::from(std::env::var_os(DIR_VAR).unwrap_or_else(|| {
        panic!("{DIR_VAR} is not set: run tests/disk_full.sh, which mounts the small tmpfs")
    }));
    let ballast = mount.join("ballast");
    write_ballast(&ballast);
    let mut node = Node::start_in(&mount.join("data"), NodeOpts::default());
    ok(node.put(
        "/v1/limits/all-requests",
        json!({"scope": {}, "metric": "requests", "max": 1_000_000_000_000u64, "period": "never"}),
    ));
    let acked: Arc<Mutex<HashSet<String>>> = Arc::default();

    // Fill: every writer records batches of fresh ids until one is refused.
    let deadline = Instant::now() + PHASE_DEADLINE;
    let writers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (client, acked) = (node.client(), acked.clone());
            std::thread::spawn(move || {
                for n in 0.. {
                    assert!(
                        Instant::now() < deadline,
                        "writer {t}: the disk never filled"
                    );
                    let ids: Vec<String> = (0..BATCH).map(|i| format!("w{t}-{n}-{i}")).collect();
                    match client.try_request("POST", "/v1/usage/batch", Some(&batch(&ids))) {
                        Ok((200, text)) => {
                            assert!(results(&text, &ids).iter().all(|a| *a), "fresh ids: {text}");
                            acked.lock().unwrap().extend(ids);
                        }
                        Ok((503, text)) => {
                            let reply: Value = serde_json::from_str(&text).expect("JSON");
                            assert_eq!(reply["error"]["code"], "unavailable", "{reply}");
                            return ids;
                        }
                        other => panic!("writer {t}: unexpected reply {other:?}"),
                    }
                }
                unreachable!()
            })
        })
        .collect();
    let mut refused: Vec<Vec<String>> = writers
        .into_iter()
        .map(|w| w.join().expect("writer"))
        .collect();
    let full_acked = acked.lock().unwrap().len() as u64;
    eprintln!("disk full after {full_acked} acknowledged records");
    assert!(full_acked > 0, "the disk was full before any write");
    // A refused commit may leave room behind (redb grows its file in steps, and the step
    // that did not fit is not used): fill what is left, so the disk is really full while
    // the node is expected to refuse writes.
    let filler = mount.join("filler");
    fill_rest(&filler);

    // Full: writes refused, saying why; checks answer; not ready; nothing lost.
    let full_checks = |node: &Node, want_used: u64| {
        let client = node.client();
        let r = client.post(
            "/v1/usage",
            json!({"id": "while-full", "attributes": {"team": "disk"}, "requests": 1}),
        );
        assert_error(&r, 503, "unavailable");
        let msg = r.1["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(msg.contains("full"), "{msg}");
        let c = ok(client.post("/v1/check", json!({"attributes": {"team": "disk"}})));
        assert_eq!(c["allowed"], true, "{c}");
        let ready = client.get("/readyz");
        assert_error(&ready, 503, "unavailable");
        assert!(ready.1.to_string().contains("full"), "{}", ready.1);
        assert_eq!(metric(&client, "tally_storage_health"), Some(1.0));
        assert_eq!(used(&client), want_used, "I1: acknowledged records lost");
    };
    full_checks(&node, full_acked);
    refused.push(vec!["while-full".to_string()]);
    // A restart on the full disk: the node starts and counts the same. Its database file
    // may still have free pages (the crash left some), and a commit that fits in them
    // is durable and acknowledged: write until the disk refuses, then it refuses writes.
    node.restart();
    let client = node.client();
    let mut fitted = 0u64;
    loop {
        let id = format!("after-restart-{fitted}");
        let r = client.post(
            "/v1/usage",
            json!({"id": id, "attributes": {"team": "disk"}, "requests": 1}),
        );
        if r.0 != 200 {
            assert_error(&r, 503, "unavailable");
            refused.push(vec![id]);
            break;
        }
        acked.lock().unwrap().insert(id);
        fitted += 1;
        assert!(
            fitted < 100_000,
            "a full disk took 100 000 records after a restart"
        );
    }
    eprintln!("after the restart {fitted} records fitted in the database file's free pages");
    full_checks(&node, full_acked + fitted);

    // Space returns: no restart, the node writes again by itself.
    std::fs::remove_file(&ballast).expect("delete ballast");
    std::fs::remove_file(&filler).expect("delete filler");
    let client = node.client();
    let took = wait_until(Duration::from_secs(30), || is_ready(&client))
        .expect("writes never resumed after space was freed");
    eprintln!(
        "ready again {} ms after the ballast was deleted",
        took.as_millis()
    );
    assert_eq!(metric(&client, "tally_storage_health"), Some(0.0));
    // Every refused batch is retried with its ids until it is acknowledged: a refused
    // commit may have reached the disk (then its ids say `applied: false`), never twice.
    for ids in refused {
        let deadline = Instant::now() + PHASE_DEADLINE;
        loop {
            assert!(
                Instant::now() < deadline,
                "batch {} never acknowledged",
                ids[0]
            );
            match client.try_request("POST", "/v1/usage/batch", Some(&batch(&ids))) {
                Ok((200, text)) => {
                    results(&text, &ids);
                    acked.lock().unwrap().extend(ids);
                    break;
                }
                Ok((503, _)) => std::thread::sleep(Duration::from_millis(50)),
                other => panic!("retry of {}: unexpected reply {other:?}", ids[0]),
            }
        }
    }
    let fresh: Vec<String> = (0..BATCH).map(|i| format!("after-{i}")).collect();
    let (status, text) = client
        .try_request("POST", "/v1/usage/batch", Some(&batch(&fresh)))
        .expect("request");
    assert_eq!(status, 200, "{text}");
    assert!(results(&text, &fresh).iter().all(|a| *a));
    acked.lock().unwrap().extend(fresh);

    // Every acknowledged id exactly once, before and after a graceful restart.
    let expected = acked.lock().unwrap().len() as u64;
    assert_eq!(used(&client), expected, "I1/I2: count vs acknowledged ids");
    assert!(node.terminate().success());
    node.restart();
    assert_eq!(used(&node.client()), expected, "I1/I2 after a restart");
    assert!(is_ready(&node.client()));
}
