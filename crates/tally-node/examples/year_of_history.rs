//! A year of hourly limits on one node, the clock driven by hand (issue 18): every
//! simulated hour, 100 records touch 10 hourly limits, 2 daily ones and a monthly one;
//! then the writer's maintenance runs (dedup expiry, history sweep). Prints the data file's
//! size and the history a limit still has, every 30 days. With the default retention the
//! file stops growing once the retention is full; `--retention-days 0` keeps everything
//! (the behaviour before retention) for comparison.
//!
//! ```sh
//! cargo run --release -p tally-node --example year_of_history -- --dir /tmp/year
//! cargo run --release -p tally-node --example year_of_history -- --dir /tmp/year-all --retention-days 0
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use tally_core::{Amounts, LimitInput, Metric, Micros};
use tally_node::{Clock, HistoryQuery, Node, NodeConfig, UsageRecord};

struct HandClock(AtomicI64);

impl Clock for HandClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

const HOUR: i64 = 3_600_000;
/// 2026-01-01T00:00:00Z.
const START_MS: i64 = 1_767_225_600_000;

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().unwrap_or_else(|_| panic!("bad value for {name}")))
        .unwrap_or(default)
}

fn limit(period: &str) -> LimitInput {
    LimitInput {
        scope: [("team".to_string(), "eng".to_string())].into(),
        metric: Metric::Cost,
        max: 1_000_000_000_000_000,
        period: period.parse().expect("period"),
        calendar_aligned: true,
        timezone: "UTC".into(),
        mode: Default::default(),
        members: Vec::new(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(arg(&args, "--dir", "/tmp/tally-year".to_string()));
    let days: i64 = arg(&args, "--days", 365);
    let retention_days: i64 = arg(&args, "--retention-days", 35);
    let records_per_hour: usize = arg(&args, "--records-per-hour", 100);
    let clock = Arc::new(HandClock(AtomicI64::new(START_MS)));
    let mut config = NodeConfig::new(&dir);
    config.clock = clock.clone();
    config.node_id = Some("year".into());
    config.history_retention_ms = if retention_days == 0 {
        i64::MAX / 4
    } else {
        retention_days * 24 * HOUR
    };
    let node = Node::open(config)?;
    for i in 0..10 {
        node.put_limit(&format!("hourly-{i}"), limit("1h")).await?;
    }
    node.put_limit("daily-0", limit("1d")).await?;
    node.put_limit("daily-1", limit("1d")).await?;
    node.put_limit("monthly", limit("1M")).await?;
    let file = dir.join(tally_store::DB_FILE);
    let started = std::time::Instant::now();
    println!("day  file_mib  hourly_epochs_kept  daily_epochs_kept  wall_s");
    for h in 0..days * 24 {
        clock
            .0
            .store(START_MS + h * HOUR + HOUR / 2, Ordering::SeqCst);
        let records = (0..records_per_hour)
            .map(|i| UsageRecord {
                id: format!("r-{h}-{i}"),
                attributes: vec![("team".into(), "eng".into())],
                amounts: Amounts {
                    cost: Micros(1000),
                    tokens: 0,
                    requests: 1,
                },
                at_ms: None,
                reservation: None,
            })
            .collect();
        node.record(records).await?;
        node.maintain_now().await?;
        let day = (h + 1) / 24;
        if (h + 1) % 24 == 0 && (day % 30 == 0 || day == days) {
            let q = HistoryQuery {
                since_ms: None,
                until_ms: None,
                epochs_max: 1000,
            };
            let hourly = node.history("hourly-0", q).await?.epochs.len();
            let daily = node.history("daily-0", q).await?.epochs.len();
            let mib = std::fs::metadata(&file)?.len() as f64 / 1048576.0;
            println!(
                "{day:>3}  {mib:>8.1}  {hourly:>18}  {daily:>17}  {:>6.0}",
                started.elapsed().as_secs_f64()
            );
        }
    }
    node.shutdown().await;
    Ok(())
}
