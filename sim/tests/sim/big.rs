//! The convergence goal at scale: 25 nodes, 10 000 active limits, the fleet cut in half
//! while every limit gets usage on one side, then healed. Measures gossip rounds until all
//! nodes agree on every limit (the goal: within 10) and checks every total (I1).
//!
//! `#[ignore]`d in the workspace run (minutes long), run by name in `.ci/run`;
//! `TALLY_SIM_BIG_NODES` and `TALLY_SIM_BIG_LIMITS` scale it down, `TALLY_SIM_SEED` picks
//! the seed.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::{Duration, Instant};

use serde_json::json;
use sim::Rng;

use crate::fleet::{Fleet, Knobs, Violation};
use crate::net::HttpOutcome;
use crate::scenario::Plan;

/// The goal (ROADMAP): convergence after heal within this many gossip rounds.
const GOAL_ROUNDS: u64 = 10;
/// Limits created per burst of concurrent PUTs.
const PUT_BURST: usize = 100;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One hash per node over every limit's (id, epoch, baseline, used, per-origin slots).
fn digest(fleet: &Fleet, i: usize) -> Option<(usize, u64)> {
    fleet.registry().with(&fleet.names()[i], |n| {
        let all = n.limits(&Default::default());
        let mut h = DefaultHasher::new();
        for d in &all {
            d.report.id.hash(&mut h);
            d.epoch.hash(&mut h);
            d.baseline.hash(&mut h);
            d.report.used.hash(&mut h);
            for (o, v) in &d.nodes {
                if *v > 0 {
                    o.hash(&mut h);
                    v.hash(&mut h);
                }
            }
        }
        (all.len(), h.finish())
    })
}

fn agreed(fleet: &Fleet, limits: usize) -> bool {
    let mut first = None;
    for &i in &fleet.up_nodes() {
        let Some(d) = digest(fleet, i) else {
            return false;
        };
        if d.0 != limits {
            return false;
        }
        match first {
            None => first = Some(d),
            Some(f) if f != d => return false,
            Some(_) => {}
        }
    }
    first.is_some()
}

/// Steps one gossip round at a time until every node agrees; returns rounds taken.
fn rounds_until_agreed(
    fleet: &mut Fleet,
    limits: usize,
    interval: Duration,
    max_rounds: u64,
) -> Result<u64, Violation> {
    let mut rounds = 0;
    while !agreed(fleet, limits) {
        if rounds >= max_rounds {
            return Err(format!("no agreement within {max_rounds} rounds"));
        }
        fleet.run_for(interval.as_millis() as u64)?;
        rounds += 1;
    }
    Ok(rounds)
}

fn big(seed: u64, nodes: usize, limits: usize) -> Result<(), Violation> {
    let knobs = Knobs {
        // Safety sampling of 10 000 limits on 25 nodes every few ms would dominate; the
        // scenarios cover I3/I5, this run measures convergence.
        sample_every: u64::MAX,
        ..Knobs::default()
    };
    let interval = knobs.gossip_interval;
    let plan = Plan {
        nodes,
        spares: 0,
        start: "2025-03-14T12:00:00Z",
        skews_ms: vec![0; nodes],
        limits: Vec::new(),
        ops: Vec::new(),
    };
    let wall = Instant::now();
    let mut fleet = Fleet::new(seed, plan, knobs)?;
    for i in 0..nodes {
        fleet.wait_up(i)?;
    }
    println!(
        "big: {nodes} nodes up after {:.1} s wall",
        wall.elapsed().as_secs_f64()
    );

    // Setup: every limit through the API of node 0, then wait until all nodes know all.
    let t = Instant::now();
    for chunk in (0..limits).collect::<Vec<_>>().chunks(PUT_BURST) {
        let reqs = chunk
            .iter()
            .map(|i| {
                let body = json!({
                    "scope": {"customer": format!("c{i}")},
                    "metric": "tokens",
                    "max": 1_000_000_000u64,
                    "period": "never",
                });
                (
                    0,
                    "PUT",
                    format!("/v1/limits/l{i}"),
                    body.to_string().into_bytes(),
                )
            })
            .collect();
        for out in fleet.http_many(reqs)? {
            if !matches!(out, HttpOutcome::Response(200, _)) {
                return Err(format!("creating a limit failed: {out:?}"));
            }
        }
    }
    let created = fleet.elapsed();
    let setup_rounds = rounds_until_agreed(&mut fleet, limits, interval, 100_000)?;
    println!(
        "big: {limits} limits created and known everywhere after {setup_rounds} rounds ({} ms simulated, {:.1} s wall)",
        (fleet.elapsed() - created).as_millis(),
        t.elapsed().as_secs_f64()
    );

    // Fault: the fleet in two halves; every limit gets usage on one side.
    let half: Vec<usize> = (0..nodes / 2).collect();
    let rest: Vec<usize> = (nodes / 2..nodes).collect();
    fleet.sides(&half, &rest, |s, a, b| s.partition(a, b));
    let mut rng = Rng::new(seed);
    let mut per_node: BTreeMap<usize, Vec<serde_json::Value>> = BTreeMap::new();
    let mut expected = vec![0u64; limits];
    for (i, e) in expected.iter_mut().enumerate() {
        let tokens = rng.range(1, 1000);
        *e = tokens;
        per_node
            .entry(rng.below(nodes as u64) as usize)
            .or_default()
            .push(json!({"id": format!("r{i}"), "attributes": {"customer": format!("c{i}")}, "tokens": tokens}));
    }
    let mut reqs = Vec::new();
    for (node, recs) in per_node {
        for batch in recs.chunks(1000) {
            let body = json!({ "records": batch }).to_string().into_bytes();
            reqs.push((node, "POST", "/v1/usage/batch".to_string(), body));
        }
    }
    for out in fleet.http_many(reqs)? {
        if !matches!(out, HttpOutcome::Response(200, _)) {
            return Err(format!("a usage batch failed: {out:?}"));
        }
    }
    fleet.run_for(1_000)?;

    // Heal and measure.
    fleet.repair_all();
    let healed = fleet.elapsed();
    let t = Instant::now();
    let rounds = rounds_until_agreed(&mut fleet, limits, interval, 10_000)?;
    let sim_ms = (fleet.elapsed() - healed).as_millis();
    println!(
        "big: converged {rounds} gossip rounds ({sim_ms} ms simulated, {:.1} s wall) after heal; goal <= {GOAL_ROUNDS}: {}",
        t.elapsed().as_secs_f64(),
        if rounds <= GOAL_ROUNDS {
            "MET"
        } else {
            "NOT MET"
        }
    );

    // I1: every limit counts exactly its record, on every node (they agree: read one).
    let name = fleet.names()[0].clone();
    let wrong = fleet
        .registry()
        .with(&name, |n| {
            (0..limits)
                .filter(|&i| n.limit(&format!("l{i}")).map(|d| d.report.used) != Some(expected[i]))
                .count()
        })
        .unwrap_or(limits);
    if wrong > 0 {
        return Err(format!(
            "I1: {wrong} limits do not count their record after heal"
        ));
    }
    println!(
        "big: every limit counts its record (I1); total {:.1} s wall",
        wall.elapsed().as_secs_f64()
    );
    if rounds > GOAL_ROUNDS {
        return Err(format!(
            "goal not met: convergence took {rounds} gossip rounds, the goal is {GOAL_ROUNDS}"
        ));
    }
    Ok(())
}

pub fn run() {
    let seed = sim::seeds("big")
        .ok()
        .and_then(|s| s.first().copied())
        .unwrap_or(1);
    let nodes = env_usize("TALLY_SIM_BIG_NODES", 25);
    let limits = env_usize("TALLY_SIM_BIG_LIMITS", 10_000);
    println!("big: seed {seed}, {nodes} nodes, {limits} limits");
    if let Err(v) = big(seed, nodes, limits) {
        panic!(
            "\nsim big: seed {seed} FAILED\n{v}\n\nrerun with:\n  TALLY_SIM_SEED={seed} cargo test --release -p sim --test sim big_fleet_convergence -- --ignored --nocapture\n"
        );
    }
}
