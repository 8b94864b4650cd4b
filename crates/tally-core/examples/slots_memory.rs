//! Resident memory of the in-memory state holding 1 000 000 (limit, epoch, origin) slots:
//! 100 000 limits × 10 origin nodes, current epoch each (issue 3's goal: ≤ 200 MB).
//! Run: `cargo run --release -p tally-core --example slots_memory`.

use tally_core::{Amounts, LimitInput, Metric, State};

const NOW: i64 = 1_795_327_200_000;

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn main() {
    let (limits, origins) = (100_000usize, 10usize);
    let before = rss_kib();
    let mut s = State::new("node-0");
    for i in 0..limits {
        let input = LimitInput {
            scope: [("virtual_key".to_string(), format!("vk-{i}"))].into(),
            metric: Metric::Cost,
            max: 1_000_000_000,
            period: "1M".parse().expect("valid period"),
            calendar_aligned: true,
            timezone: "UTC".into(),
            mode: Default::default(),
            members: Vec::new(),
        };
        let rec = s
            .prepare_limit_put(&format!("limit-{i}"), input, NOW)
            .expect("valid limit");
        s.apply_limit(rec, NOW);
    }
    let with_limits = rss_kib();
    let origin_idx: Vec<u32> = (0..origins)
        .map(|o| s.origin_idx(&format!("node-{o}")))
        .collect();
    for i in 0..limits {
        let id = format!("limit-{i}");
        let epoch = s.epoch_of(&id, NOW).expect("live limit");
        for (o, &idx) in origin_idx.iter().enumerate() {
            s.merge_slot(&id, epoch, idx, (i * origins + o + 1) as u64);
        }
    }
    let after = rss_kib();
    assert_eq!(s.slot_count(), limits * origins);
    let probe = s.check(&[("virtual_key", "vk-7")], Amounts::default(), NOW);
    assert_eq!(probe.limits.len(), 1);
    println!(
        "limits={limits} slots={} rss_total_mib={:.1} limits_mib={:.1} slots_mib={:.1} bytes_per_slot={:.0}",
        s.slot_count(),
        (after - before) as f64 / 1024.0,
        (with_limits - before) as f64 / 1024.0,
        (after - with_limits) as f64 / 1024.0,
        (after - with_limits) as f64 * 1024.0 / (limits * origins) as f64,
    );
}
