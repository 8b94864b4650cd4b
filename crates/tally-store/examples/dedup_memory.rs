//! Memory and start-up time of the dedup index with a full window (issue 18): fills a
//! store through the `Store`/`Batch` API the way the node's writer does (a lookup, then an
//! insert, per id; one durable commit per `--batch` ids; maintenance every simulated
//! second), at a simulated 1 000 records/s with a 24 h window, so no id expires. Prints
//! the process's RSS and the index's own bytes as it goes, then the cost of lookups with
//! the window full. `--reopen` only opens an existing store and reports the time it took
//! and the RSS after it (run it as a fresh process after a fill); `--probe` opens it and
//! measures lookups.
//!
//! ```sh
//! cargo run --release -p tally-store --example dedup_memory -- --dir /work/tmp/d --ids 86400000
//! cargo run --release -p tally-store --example dedup_memory -- --dir /work/tmp/d --reopen
//! ```
//! Same allocator as `tally serve` (mimalloc).

use std::time::Instant;

use tally_store::Store;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

const WINDOW_MS: i64 = 24 * 3_600_000;
const START_MS: i64 = 1_795_327_200_000;

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

/// A UUID-shaped id (36 characters), distinct for every `i`.
fn id(i: u64) -> String {
    let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        (z >> 32) as u32,
        (z >> 16) as u16,
        z as u16 & 0xfff,
        (i >> 48) as u16 & 0xfff,
        i & 0xffff_ffff_ffff
    )
}

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().unwrap_or_else(|_| panic!("bad value for {name}")))
        .unwrap_or(default)
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::metadata(dir.join(tally_store::DB_FILE)).map_or(0, |m| m.len())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(arg(&args, "--dir", "/tmp/tally-dedup-memory".to_string()));
    let ids: u64 = arg(&args, "--ids", 1_000_000);
    let batch: u64 = arg(&args, "--batch", 8192);
    let report_every: u64 = arg(&args, "--report-every", 1_000_000);
    let rss_start = rss_mib();
    let t = Instant::now();
    let mut store = Store::open(&dir).expect("open store");
    let opened_s = t.elapsed().as_secs_f64();
    let r = store.recover().expect("recover");
    println!(
        "open: {opened_s:.2}s ids={} index_mib={:.1} rss_before_open_mib={rss_start:.1} rss_mib={:.1} file_mib={:.0}",
        r.dedup_ids,
        r.dedup_bytes as f64 / 1048576.0,
        rss_mib(),
        dir_bytes(&dir) as f64 / 1048576.0
    );
    if args.iter().any(|a| a == "--reopen") {
        return;
    }
    if args.iter().any(|a| a == "--probe") {
        probe(&mut store, r.dedup_ids as u64);
        return;
    }
    let first = r.dedup_ids as u64;
    let rss0 = rss_mib();
    let t = Instant::now();
    let mut next_maintenance = START_MS + first as i64 + 1000;
    let mut i = first;
    while i < first + ids {
        let n = batch.min(first + ids - i);
        let now = START_MS + i as i64;
        let mut b = store.batch().expect("batch");
        for k in i..i + n {
            let id = id(k);
            assert!(!b.dedup_contains(&id, now).expect("lookup"), "{id} is new");
            b.dedup_insert(&id, now + WINDOW_MS).expect("insert");
        }
        b.commit().expect("commit");
        i += n;
        let now = START_MS + i as i64;
        while next_maintenance <= now {
            let mut b = store.batch().expect("batch");
            b.dedup_expire(next_maintenance, 20_000).expect("expire");
            if b.dedup_dirty() {
                b.commit().expect("commit");
            }
            next_maintenance += 1000;
        }
        if (i - first) % report_every < batch || i == first + ids {
            let r = store.recover().expect("recover");
            let rss = rss_mib();
            println!(
                "ids={} elapsed_s={:.0} rss_mib={rss:.1} rss_growth_bytes_per_id={:.2} index_mib={:.1} index_bytes_per_id={:.2} file_mib={:.0}",
                r.dedup_ids,
                t.elapsed().as_secs_f64(),
                (rss - rss0) * 1048576.0 / (i - first) as f64,
                r.dedup_bytes as f64 / 1048576.0,
                r.dedup_bytes as f64 / r.dedup_ids as f64,
                dir_bytes(&dir) as f64 / 1048576.0
            );
        }
    }
    probe(&mut store, i);
}

/// Lookups with the window full (`ids` ids, the newest at now): ids never seen, and
/// repeats of ids spread over the window (the oldest commits are left out: their window,
/// counted from their commit's start, ends now).
fn probe(store: &mut Store, ids: u64) {
    let now = START_MS + ids as i64;
    let b = store.batch().expect("batch");
    let probes = 100_000u64;
    let t = Instant::now();
    for k in 0..probes {
        assert!(
            !b.dedup_contains(&id(u64::MAX / 2 + k), now)
                .expect("lookup")
        );
    }
    let miss_us = t.elapsed().as_secs_f64() * 1e6 / probes as f64;
    let repeats = probes.min(ids);
    let step = (ids.saturating_sub(100_000) / repeats.max(1)).max(1);
    let t = Instant::now();
    for k in 0..repeats {
        let seen = ids - 1 - k * step;
        assert!(
            b.dedup_contains(&id(seen), now).expect("lookup"),
            "repeat {seen}"
        );
    }
    let hit_us = t.elapsed().as_secs_f64() * 1e6 / repeats.max(1) as f64;
    println!("lookup: new id {miss_us:.2} us, repeat {hit_us:.2} us (window of {ids} ids)");
}
