//! The tally simulation (DESIGN.md §6): real nodes on turmoil hosts, one scenario per test,
//! each under many seeds. Every run logs its seed first and, on a violation, fails with the
//! seed, the plan, the timeline and the command that reruns it.
//!
//! Invariants checked (DESIGN.md §3): I1 and I2 against the clients' ledger after every
//! heal, I3 and I5 by sampling every node every few simulated milliseconds, I4 as the
//! convergence condition (bounded in gossip rounds), I8 with malformed requests through
//! the real router. Overshoot (I6) and convergence rounds are measured and printed.
//!
//! - `cargo test -p sim` — the fixed CI seeds (`sim::CI_SEEDS` per scenario);
//! - `TALLY_SIM_SEED=<seed> cargo test -p sim --test sim <scenario>` — one seed;
//! - `TALLY_SIM_SEEDS=<n>` — a soak of `n` seeds per scenario;
//! - `cargo test --release -p sim --test sim big_fleet_convergence -- --ignored` — the 25-node,
//!   10 000-limit convergence goal; `-- --nocapture` shows the measurements.

mod big;
mod driver;
mod fleet;
mod host;
mod ledger;
mod net;
mod oracle;
mod scenario;

use std::io::Write as _;
use std::panic::AssertUnwindSafe;
use std::sync::{Mutex, Once};
use std::time::Instant;

use sim::Rng;

use crate::fleet::{Fleet, Knobs, Report};
use crate::scenario::{Op, Plan};

static PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());
static HOOK: Once = Once::new();

/// Panics of the nodes' writer threads are not seen by turmoil: record them so the run
/// that is stepping fails with its seed.
fn install_panic_hook() {
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current();
            if thread.name() == Some("tally-writer") {
                if let Ok(mut p) = PANICS.lock() {
                    p.push(format!("in tally-writer: {info}"));
                }
            }
            previous(info);
        }));
    });
}

pub fn take_panic() -> Option<String> {
    PANICS.lock().ok()?.pop()
}

fn init_tracing() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// Percentiles of a small sample, for the summary line.
fn spread(mut v: Vec<u64>) -> String {
    if v.is_empty() {
        return "-".into();
    }
    v.sort_unstable();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    format!(
        "min {} / median {} / p90 {} / max {}",
        v[0],
        at(0.5),
        at(0.9),
        v[v.len() - 1]
    )
}

/// Runs one seed of a scenario; a violation panics with everything needed to rerun it.
fn run_seed(scenario: &str, seed: u64, plan: Plan) -> Report {
    let rerun = format!("TALLY_SIM_SEED={seed} cargo test -p sim --test sim {scenario}");
    let mut events = Vec::new();
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        // Skewed nodes disagree on the current period until the slowest clock passes a
        // boundary, so a heal that lands on one may wait out the spread of the clocks.
        let spread_ms = plan.skews_ms.iter().max().copied().unwrap_or(0)
            - plan.skews_ms.iter().min().copied().unwrap_or(0);
        let defaults = Knobs::default();
        let skew_rounds = spread_ms as u64 / defaults.gossip_interval.as_millis() as u64;
        let knobs = Knobs {
            rounds_max: rounds_max(scenario) + skew_rounds,
            ..defaults
        };
        let mut fleet = Fleet::new(seed, plan.clone(), knobs)?;
        let r = fleet.run();
        events = std::mem::take(&mut fleet.events);
        r.map(|()| fleet.report.clone())
    }));
    let failure = match result {
        Ok(Ok(report)) => return report,
        Ok(Err(v)) => v,
        Err(p) => p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into()),
    };
    panic!(
        "\nsim {scenario}: seed {seed} FAILED\n{failure}\n\nplan: {plan:#?}\n\ntimeline:\n{}\n\nrerun with:\n  {rerun}\n",
        events.join("\n")
    );
}

/// Records a plan sends (traffic, the bursts of mid-commit crashes, and the one good
/// record `BadInput` sends).
fn planned_records(plan: &Plan) -> u64 {
    plan.ops
        .iter()
        .map(|op| match op {
            Op::Traffic(t) => u64::from(t.count),
            Op::CrashMidCommit { records, .. } | Op::PowerLossMidCommit { records, .. } => {
                u64::from(*records)
            }
            // BadInput sends the valid record of a refused batch once more, alone.
            Op::BadInput(_) => 1,
            _ => 0,
        })
        .sum()
}

/// Per scenario, the least share (in %) of a seed's planned records that must be
/// acknowledged: a run whose traffic silently stops (every request failing, checks
/// failing closed, a task lost) must fail, not pass with nothing checked. Clients retry
/// until acknowledged, so every record of an ungated scenario is (8 seeds each, all 100%
/// when these were set); gated traffic is denied once the budget is spent (least seen:
/// split_brain 58%, flaky_links 67%). Since every plan has a hard limit that gated
/// traffic reserves on, a side of a partition is denied once it spent the rights it can
/// reach, so gated scenarios acknowledge less (split_brain: 37% seen in 4 seeds); the
/// floors below only prove that traffic ran. Scenarios not listed have no floor yet.
fn acked_floor_pct(scenario: &str) -> u64 {
    match scenario {
        "split_brain" => 20,
        "flaky_links" => 35,
        "hard_split_brain" | "hard_restart" | "hard_decommission" | "hard_max_edit" => 10,
        "hard_one_node" => 25,
        "crash_commit"
        | "power_loss"
        | "torn_write"
        | "sync_error"
        | "disk_full"
        | "replace_node"
        | "clock_skew"
        | "clock_skew_future_at"
        | "reset_race"
        | "config_race"
        | "config_race_period"
        | "client_retries" => 100,
        _ => 0,
    }
}

/// Scenarios whose point is a crash that hits a busy writer: at least this share (in %)
/// of their seeds must do so (checked when 8 or more seeds ran; 8 of 8 did when set).
fn mid_commit_floor_pct(scenario: &str) -> u64 {
    match scenario {
        "crash_commit" | "power_loss" | "torn_write" => 75,
        _ => 0,
    }
}

/// Gossip rounds after heal within which every node must agree (I4), per scenario.
/// README states these bounds: 1000 seeds per scenario converged within 3 rounds, and
/// within 11 with clocks skewed across period boundaries (skewed nodes disagree on the
/// current epoch until their clocks pass it). Scenarios not listed keep the loose
/// default of [`Knobs`].
fn rounds_max(scenario: &str) -> u64 {
    match scenario {
        // Plus the spread of the clocks in rounds (`run_seed`): a heal that lands on a
        // period boundary waits for the slowest clock to pass it. The hard limits, written
        // once the fleet is live, moved the plans' timelines so that heals can land there.
        "clock_skew" => 12,
        "split_brain"
        | "flaky_links"
        | "crash_commit"
        | "power_loss"
        | "torn_write"
        | "sync_error"
        | "disk_full"
        | "replace_node"
        | "clock_skew_future_at"
        | "reset_race"
        | "config_race"
        | "config_race_period"
        | "client_retries" => 5,
        _ => Knobs::default().rounds_max,
    }
}

/// The floors of one seed: every planned record is accounted for (acknowledged, denied by
/// its check, failed closed or given up on: a record a lost task never sent breaks this),
/// and enough were acknowledged.
fn check_floors(scenario: &str, plan: &Plan, r: &Report) -> Result<(), String> {
    let planned = planned_records(plan);
    let accounted = r.acked_ids as u64 + r.denied + r.check_failed + r.given_up;
    if accounted != planned {
        return Err(format!(
            "{planned} records planned but {accounted} accounted for ({} acknowledged, {} denied, {} checks failed closed, {} given up)",
            r.acked_ids, r.denied, r.check_failed, r.given_up
        ));
    }
    let floor = acked_floor_pct(scenario);
    let (need, why) = match budget_cap(plan) {
        Some(cap) if cap < (planned * floor).div_ceil(100) => (
            cap,
            format!("what the plan's smallest hard max admits of its largest records ({cap})"),
        ),
        _ => ((planned * floor).div_ceil(100), format!("{floor}%")),
    };
    if (r.acked_ids as u64) < need {
        return Err(format!(
            "only {} of {planned} planned records were acknowledged; {scenario} needs at least {why} ({} denied, {} checks failed closed, {} given up)",
            r.acked_ids, r.denied, r.check_failed, r.given_up
        ));
    }
    Ok(())
}

/// How many records a plan that lowers its hard limit's `max` is sure to admit: the
/// smallest `max` it ever sets, in records of the largest size its traffic sends. Gated
/// traffic reserves on the hard limit, so once `max` is lowered below what was already
/// spent, every later record is denied by design (seed 13712880355538652147 of
/// hard_max_edit lowers 3000 to 519 tokens early, for 121 records of 1 to 100 tokens: 10
/// were acknowledged, under 10%). `None` when the plan never lowers it.
fn budget_cap(plan: &Plan) -> Option<u64> {
    let largest = plan
        .ops
        .iter()
        .filter_map(|op| match op {
            Op::Traffic(t) if t.gated => Some(t.tokens.1),
            _ => None,
        })
        .max()?;
    plan.ops
        .iter()
        .filter_map(|op| match op {
            Op::PutLimit { def, .. } if def.hard => Some(def.max),
            _ => None,
        })
        .min()
        .map(|max| max / largest.max(1))
}

/// Runs a scenario under the seeds the environment asks for and prints what it measured.
fn run_scenario(scenario: &str, generate: fn(&mut Rng) -> Plan) {
    install_panic_hook();
    init_tracing();
    let seeds = sim::seeds(scenario).unwrap_or_else(|e| panic!("{e}"));
    let started = Instant::now();
    let mut reports = Vec::new();
    for &seed in &seeds {
        println!("sim {scenario}: seed {seed}");
        let plan = generate(&mut Rng::new(seed));
        let t = Instant::now();
        let r = run_seed(scenario, seed, plan.clone());
        if let Err(e) = check_floors(scenario, &plan, &r) {
            panic!(
                "\nsim {scenario}: seed {seed} FAILED its floor: {e}\n\nplan: {plan:#?}\n\nrerun with:\n  TALLY_SIM_SEED={seed} cargo test -p sim --test sim {scenario}\n"
            );
        }
        println!(
            "sim {scenario}: seed {seed} ok in {:.1} s wall, {} ms simulated, convergence {:?}, overshoot {}/{}, acknowledged {}/{} planned ({} denied, {} checks failed, {} given up), {} mid-commit crashes",
            t.elapsed().as_secs_f64(),
            r.sim_ms,
            r.convergence,
            r.overshoot,
            r.budget_max,
            r.acked_ids,
            planned_records(&plan),
            r.denied,
            r.check_failed,
            r.given_up,
            r.mid_commit_crashes,
        );
        reports.push(r);
    }
    let floor = mid_commit_floor_pct(scenario);
    if seeds.len() >= 8 && floor > 0 {
        let hit = reports.iter().filter(|r| r.mid_commit_crashes > 0).count();
        assert!(
            hit * 100 >= seeds.len() * floor as usize,
            "sim {scenario}: a crash hit a busy writer in only {hit} of {} seeds; the scenario needs {floor}%",
            seeds.len()
        );
    }
    summarize(scenario, &seeds, started, &reports);
}

fn summarize(scenario: &str, seeds: &[u64], started: Instant, reports: &[Report]) {
    let rounds: Vec<u64> = reports
        .iter()
        .flat_map(|r| r.convergence.iter().map(|c| c.0))
        .collect();
    let conv_ms: Vec<u64> = reports
        .iter()
        .flat_map(|r| r.convergence.iter().map(|c| c.1))
        .collect();
    let over: Vec<u64> = reports.iter().map(|r| r.overshoot).collect();
    let over_pct: Vec<u64> = reports
        .iter()
        .filter(|r| r.budget_max > 0)
        .map(|r| r.overshoot * 100 / r.budget_max)
        .collect();
    let sum = |f: fn(&Report) -> u64| reports.iter().map(f).sum::<u64>();
    let text = format!(
        "sim {scenario}: {} seeds in {:.1} s wall\n  convergence after heal: rounds {}; simulated ms {}\n  overshoot of `budget` (tokens beyond max let through by checks): {}; % of max {}\n  records acknowledged {}, unknown outcome {}, denied by checks {}, re-sent to another node {}; {} safety samples; {} crashes mid group commit\n",
        seeds.len(),
        started.elapsed().as_secs_f64(),
        spread(rounds),
        spread(conv_ms),
        spread(over),
        spread(over_pct),
        sum(|r| r.acked as u64),
        sum(|r| r.unknown as u64),
        sum(|r| r.denied),
        sum(|r| r.cross_node_retries),
        sum(|r| r.samples),
        sum(|r| r.mid_commit_crashes),
    );
    let hard_pct: Vec<u64> = reports
        .iter()
        .filter(|r| r.hard_max > 0)
        .map(|r| r.hard_used * 100 / r.hard_max)
        .collect();
    let first: Vec<u64> = reports
        .iter()
        .filter(|r| r.hard_max > 0)
        .filter_map(|r| r.hard_first_denial_used.map(|u| u * 100 / r.hard_max))
        .collect();
    let waits: Vec<u64> = reports
        .iter()
        .flat_map(|r| r.rights_waits_ms.iter().map(|&w| w.max(0) as u64 / 100))
        .collect();
    let text = format!(
        "{text}  hard limit (I7): used/max % after heal {}; used/max % at the first denial {}; overrun reported {}; denied for rights {}, for budget {}; demand-to-grant gossip rounds {}\n",
        spread(hard_pct),
        spread(first),
        sum(|r| r.hard_overrun),
        sum(|r| r.hard_denied_rights),
        sum(|r| r.hard_denied_budget),
        spread(waits),
    );
    println!("{text}");
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("sim-report.txt");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = f.write_all(text.as_bytes());
    }
}

#[test]
fn split_brain() {
    run_scenario("split_brain", scenario::split_brain);
}

#[test]
fn flaky_links() {
    run_scenario("flaky_links", scenario::flaky_links);
}

#[test]
fn crash_commit() {
    run_scenario("crash_commit", scenario::crash_commit);
}

#[test]
fn power_loss() {
    run_scenario("power_loss", scenario::power_loss);
}

#[test]
fn torn_write() {
    run_scenario("torn_write", scenario::torn_write);
}

#[test]
fn sync_error() {
    run_scenario("sync_error", scenario::sync_error);
}

#[test]
fn disk_full() {
    run_scenario("disk_full", scenario::disk_full);
}

#[test]
fn replace_node() {
    run_scenario("replace_node", scenario::replace_node);
}

#[test]
fn clock_skew() {
    run_scenario("clock_skew", scenario::clock_skew);
}

#[test]
fn clock_skew_future_at() {
    run_scenario("clock_skew_future_at", scenario::clock_skew_future_at);
}

#[test]
fn reset_race() {
    run_scenario("reset_race", scenario::reset_race);
}

#[test]
fn config_race() {
    run_scenario("config_race", scenario::config_race);
}

#[test]
fn config_race_period() {
    run_scenario("config_race_period", scenario::config_race_period);
}

#[test]
fn client_retries() {
    run_scenario("client_retries", scenario::client_retries);
}

#[test]
fn hard_split_brain() {
    run_scenario("hard_split_brain", scenario::hard_split_brain);
}

#[test]
fn hard_one_node() {
    run_scenario("hard_one_node", scenario::hard_one_node);
}

#[test]
fn hard_restart() {
    run_scenario("hard_restart", scenario::hard_restart);
}

#[test]
fn hard_decommission() {
    run_scenario("hard_decommission", scenario::hard_decommission);
}

#[test]
fn hard_max_edit() {
    run_scenario("hard_max_edit", scenario::hard_max_edit);
}

/// Seeds that once failed, pinned so they run on every CI run (scenario, seed).
const REGRESSIONS: &[(&str, u64)] = &[
    // The sweep unpublished own slots of every epoch that was not current and nothing
    // re-published them: the slots of an old-period epoch that became current again when
    // a concurrent period edit lost (config_race_period), and of a record whose `at` fell
    // in the next period (clock_skew_future_at), were never counted elsewhere (I1, I4).
    ("config_race_period", 4236088466256068178),
    ("clock_skew_future_at", 14045485886648683237),
    // Plain LWW let an edit that kept the old period win over a concurrent period change
    // (a reset): the current epoch went back to the old generation (I5). Limit records
    // are now ordered by generation first.
    ("config_race_period", 508686422237443830),
];

#[test]
fn regressions() {
    install_panic_hook();
    for &(scenario, seed) in REGRESSIONS {
        let generate = match scenario {
            "split_brain" => scenario::split_brain,
            "flaky_links" => scenario::flaky_links,
            "crash_commit" => scenario::crash_commit,
            "replace_node" => scenario::replace_node,
            "clock_skew" => scenario::clock_skew,
            "clock_skew_future_at" => scenario::clock_skew_future_at,
            "reset_race" => scenario::reset_race,
            "config_race" => scenario::config_race,
            "config_race_period" => scenario::config_race_period,
            "client_retries" => scenario::client_retries,
            "power_loss" => scenario::power_loss,
            "torn_write" => scenario::torn_write,
            "sync_error" => scenario::sync_error,
            "disk_full" => scenario::disk_full,
            "hard_split_brain" => scenario::hard_split_brain,
            "hard_one_node" => scenario::hard_one_node,
            "hard_restart" => scenario::hard_restart,
            "hard_decommission" => scenario::hard_decommission,
            "hard_max_edit" => scenario::hard_max_edit,
            other => panic!("unknown scenario {other}"),
        };
        println!("sim regression {scenario}: seed {seed}");
        run_seed(scenario, seed, generate(&mut Rng::new(seed)));
    }
}

/// The 25-node, 10 000-limit convergence goal. Ignored in `cargo test --workspace` because
/// it takes minutes; `.ci/run` runs it by name with `--ignored`.
#[test]
#[ignore = "minutes long: .ci/run runs it by name (cargo test --release -p sim --test sim big_fleet_convergence -- --ignored)"]
fn big_fleet_convergence() {
    install_panic_hook();
    init_tracing();
    big::run();
}
