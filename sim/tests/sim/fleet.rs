//! The executor: builds a turmoil simulation for a [`Plan`], runs its ops one after the
//! other (traffic runs in the background on the gateway), samples every running node
//! continuously for the safety invariants (I3, I5), and after `Heal` measures convergence
//! (I4) and checks it against the ledger (I1, I2); `BadInput` checks I8.
//!
//! A violation is an `Err(String)`; the caller adds the seed and the rerun command.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use serde_json::json;
use tally_core::{Epoch, LimitInput, Period};
use tally_node::faults::{FaultyDisk, PowerLoss};
use tally_node::{Clock as _, LimitDetails};

use crate::driver::{self, Cmd, Driver};
use crate::host::{self, HTTP_PORT, HostConfig, Registry, SimClock};
use crate::ledger::Unit;
use crate::net::{HttpOutcome, Parked};
use crate::scenario::{LATENCY_MS, LimitDef, Op, Plan, Traffic};

pub type Violation = String;

/// Longest a step waits for busy writers (a writer held in a sync on purpose never
/// finishes: then time goes on).
const WRITER_WAIT_MAX: Duration = Duration::from_millis(100);

/// Simulation knobs of one run.
#[derive(Debug, Clone)]
pub struct Knobs {
    pub gossip_interval: Duration,
    pub tick: Duration,
    /// Convergence after heal must happen within this many gossip rounds (I4 bound).
    pub rounds_max: u64,
    /// Steps between two safety samples.
    pub sample_every: u64,
}

impl Default for Knobs {
    fn default() -> Knobs {
        Knobs {
            gossip_interval: Duration::from_millis(100),
            tick: Duration::from_millis(2),
            rounds_max: 150,
            sample_every: 5,
        }
    }
}

/// What a run measured.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Per heal: (gossip rounds, simulated ms) until every node agreed.
    pub convergence: Vec<(u64, u64)>,
    /// Usage of `budget` beyond its max that checks let through (tokens), and the max.
    pub overshoot: u64,
    pub budget_max: u64,
    pub acked: usize,
    pub unknown: usize,
    pub denied: u64,
    pub cross_node_retries: u64,
    pub sim_ms: u64,
    pub samples: u64,
    /// Crashes that hit a node while its writer held queued records.
    pub mid_commit_crashes: u64,
    /// Hard limit after heal: used and max; tokens reported as overrun; checks denied
    /// for rights and for budget; `used` at the first denial; how long demands for
    /// rights waited for a grant (ms, every node).
    pub hard_used: u64,
    pub hard_max: u64,
    pub hard_overrun: u64,
    pub hard_denied_rights: u64,
    pub hard_denied_budget: u64,
    pub hard_first_denial_used: Option<u64>,
    pub rights_waits_ms: Vec<i64>,
    /// Distinct record ids acknowledged, gated records whose check got no answer, and
    /// records given up on (floors in `main.rs` bound these against the plan).
    pub acked_ids: usize,
    pub check_failed: u64,
    pub given_up: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HostState {
    NotStarted,
    Up,
    Down,
    Removed,
}

/// What the samples remember between two samples (I3, I5).
#[derive(Default)]
struct Sampler {
    /// Highest value seen of every (node, limit, epoch, origin) slot.
    slots: HashMap<(usize, String, Epoch, String), u64>,
    /// Hard limits: highest value of every (limit, epoch, origin) slot seen on any node:
    /// no more than that can have been spent, so Σ over origins bounds the spending.
    hard: HashMap<(String, Epoch), HashMap<String, u64>>,
    /// Last current epoch per (node, limit), with the counting part of the spec it was
    /// seen under (a spec change starts a new generation of epochs).
    epochs: HashMap<(usize, String), (String, Epoch)>,
    count: u64,
}

fn counting_key(i: &LimitInput) -> String {
    format!(
        "{}/{}/{}/{}",
        i.metric.as_str(),
        i.period,
        i.calendar_aligned,
        i.timezone
    )
}

pub struct Fleet {
    sim: turmoil::Sim<'static>,
    plan: Plan,
    knobs: Knobs,
    names: Vec<String>,
    states: Vec<HostState>,
    configs: Vec<Arc<HostConfig>>,
    clocks: Vec<Arc<SimClock>>,
    elapsed_ms: Arc<AtomicI64>,
    registry: Registry,
    driver: Rc<Driver>,
    sampler: Sampler,
    steps: u64,
    /// Limit inputs written through the API, per id (config after heal must be one).
    written: HashMap<String, Vec<LimitInput>>,
    /// Baselines of set-usage resets per limit (0 is always allowed).
    baselines: HashMap<String, Vec<u64>>,
    pub report: Report,
    pub events: Vec<String>,
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// What a node must hold after `def` was written through its API. A hard limit's
/// members are the fleet the writing node saw live, so they are compared apart
/// ([`written_matches`]).
fn input_of(def: &LimitDef) -> LimitInput {
    let mut scope: tally_core::Scope = [("team".to_string(), "eng".to_string())].into();
    if def.hard {
        scope.insert("gate".into(), "hard".into());
    }
    LimitInput {
        scope,
        metric: tally_core::Metric::parse(def.metric).expect("metric"),
        max: def.max,
        period: def.period.parse().expect("period"),
        calendar_aligned: def.aligned,
        timezone: def.timezone.to_string(),
        mode: if def.hard {
            tally_core::Mode::Hard
        } else {
            tally_core::Mode::Soft
        },
        members: Vec::new(),
    }
}

/// Whether a converged limit config is one that was written (members aside: the node
/// chose them, from the nodes it saw; they must be non-empty and sorted).
fn written_matches(written: &[LimitInput], got: &LimitInput) -> bool {
    let mut bare = got.clone();
    if bare.mode == tally_core::Mode::Hard {
        if bare.members.is_empty() || !bare.members.windows(2).all(|w| w[0].node < w[1].node) {
            return false;
        }
        bare.members.clear();
    }
    written.contains(&bare)
}

fn unit_of(i: &LimitInput) -> Unit {
    match i.metric {
        tally_core::Metric::Requests => Unit::Requests,
        _ => Unit::Tokens,
    }
}

impl Fleet {
    pub fn new(seed: u64, plan: Plan, knobs: Knobs) -> Result<Fleet, Violation> {
        let start: jiff::Timestamp = plan.start.parse().expect("plan start");
        let start_ms = start.as_millisecond();
        let mut sim = turmoil::Builder::new()
            .simulation_duration(Duration::from_secs(24 * 3600))
            .tick_duration(knobs.tick)
            .min_message_latency(Duration::from_millis(1))
            .max_message_latency(Duration::from_millis(LATENCY_MS))
            .rng_seed(seed)
            .tcp_capacity(1024)
            .udp_capacity(1024)
            .build();
        let elapsed_ms = Arc::new(AtomicI64::new(0));
        let parked = Parked::new(elapsed_ms.clone());
        let registry = Registry::default();
        let total = plan.nodes + plan.spares;
        let names: Vec<String> = (0..total).map(|i| format!("n{}", i + 1)).collect();
        let clocks: Vec<Arc<SimClock>> = (0..total)
            .map(|i| {
                Arc::new(SimClock::new(
                    start_ms,
                    plan.skews_ms.get(i).copied().unwrap_or(0),
                    elapsed_ms.clone(),
                ))
            })
            .collect();
        let configs: Vec<Arc<HostConfig>> = (0..total)
            .map(|i| {
                Arc::new(HostConfig {
                    name: names[i].clone(),
                    disk: FaultyDisk::new(),
                    clock: clocks[i].clone(),
                    seeds: names[..plan.nodes]
                        .iter()
                        .filter(|n| **n != names[i])
                        .cloned()
                        .collect(),
                    interval: knobs.gossip_interval,
                    parked: parked.clone(),
                    registry: registry.clone(),
                })
            })
            .collect();
        let mut at_specs = HashMap::new();
        for def in &plan.limits {
            let i = input_of(def);
            if i.calendar_aligned || i.period == Period::Never {
                at_specs.insert(def.id.to_string(), (i.period.to_string(), i.timezone));
            }
        }
        let driver = Rc::new(Driver {
            cmds: RefCell::default(),
            busy: Default::default(),
            ledger: RefCell::default(),
            http: RefCell::default(),
            names: names.clone(),
            registry: registry.clone(),
            clocks: clocks.clone(),
            limits: plan.limits.iter().map(|l| l.id.to_string()).collect(),
            at_specs: RefCell::new(at_specs),
            elapsed_ms: elapsed_ms.clone(),
            violations: RefCell::default(),
        });
        {
            let d = driver.clone();
            sim.client("gw", driver::run(d));
        }
        let mut fleet = Fleet {
            sim,
            knobs,
            states: vec![HostState::NotStarted; total],
            names,
            configs,
            clocks,
            elapsed_ms,
            registry,
            driver,
            sampler: Sampler::default(),
            steps: 0,
            written: HashMap::new(),
            baselines: HashMap::new(),
            report: Report::default(),
            events: Vec::new(),
            plan,
        };
        for i in 0..fleet.plan.nodes {
            fleet.start_host(i);
        }
        Ok(fleet)
    }

    fn start_host(&mut self, i: usize) {
        let cfg = self.configs[i].clone();
        self.sim
            .host(self.names[i].as_str(), move || host::run(cfg.clone()));
        let ip = self.sim.lookup(self.names[i].as_str());
        self.sim
            .set_link_latency("gw", self.names[i].as_str(), Duration::from_millis(1));
        self.driver
            .http
            .borrow_mut()
            .insert(i, SocketAddr::new(ip, HTTP_PORT));
        self.states[i] = HostState::Up;
    }

    fn now_ms(&self) -> u64 {
        ms(self.sim.elapsed())
    }

    pub(crate) fn event(&mut self, what: impl Into<String>) {
        let e = format!("{:>7} ms  {}", self.now_ms(), what.into());
        self.events.push(e);
    }

    /// Waits (in real time, at most [`WRITER_WAIT_MAX`]) until every running node's writer
    /// has finished what it was handed. Writers are real threads: while one waits for a
    /// core, simulated time must stand still, or a busy machine runs the clients'
    /// deadlines out and a run fails for the machine's sake, not tally's.
    fn settle_writers(&self) {
        let until = std::time::Instant::now() + WRITER_WAIT_MAX;
        for name in &self.names {
            while self.registry.with(name, |n| !n.writer_idle()) == Some(true) {
                if std::time::Instant::now() >= until {
                    return;
                }
                std::thread::sleep(Duration::from_micros(20));
            }
        }
    }

    /// One simulation step, then the safety samples.
    pub(crate) fn step(&mut self) -> Result<(), Violation> {
        self.settle_writers();
        self.sim
            .step()
            .map_err(|e| format!("the simulation failed: {e}"))?;
        self.elapsed_ms
            .store(self.sim.elapsed().as_millis() as i64, Ordering::Relaxed);
        self.steps += 1;
        if let Some(p) = crate::take_panic() {
            return Err(format!("a thread panicked: {p}"));
        }
        if let Some(v) = self.driver.violations.borrow_mut().pop() {
            return Err(v);
        }
        if self.steps % self.knobs.sample_every == 0 {
            self.sample()?;
        }
        Ok(())
    }

    pub(crate) fn run_for(&mut self, ms: u64) -> Result<(), Violation> {
        let until = self.sim.elapsed() + Duration::from_millis(ms);
        while self.sim.elapsed() < until {
            self.step()?;
        }
        Ok(())
    }

    /// Steps until `done` holds, failing after `limit_ms` of simulated time.
    pub(crate) fn run_until(
        &mut self,
        what: &str,
        limit_ms: u64,
        mut done: impl FnMut(&mut Fleet) -> bool,
    ) -> Result<(), Violation> {
        let until = self.sim.elapsed() + Duration::from_millis(limit_ms);
        while !done(self) {
            if self.sim.elapsed() >= until {
                return Err(format!("{what}: not done after {limit_ms} ms"));
            }
            self.step()?;
        }
        Ok(())
    }

    pub(crate) fn up_nodes(&self) -> Vec<usize> {
        (0..self.names.len())
            .filter(|&i| self.states[i] == HostState::Up && self.registry.is_up(&self.names[i]))
            .collect()
    }

    fn limit_ids(&self) -> Vec<String> {
        self.plan.limits.iter().map(|l| l.id.to_string()).collect()
    }

    /// I3 (no slot decreases, across restarts; an epoch never goes back) and I5 (every
    /// node's current period is the calendar's period of its own clock reading).
    fn sample(&mut self) -> Result<(), Violation> {
        self.sampler.count += 1;
        let ids = self.limit_ids();
        for i in 0..self.names.len() {
            let now = self.clocks[i].now_ms();
            let views: Option<Vec<Option<LimitDetails>>> = self
                .registry
                .with(&self.names[i], |n| ids.iter().map(|l| n.limit(l)).collect());
            let Some(views) = views else { continue };
            for (id, d) in ids.iter().zip(views) {
                let Some(d) = d else { continue };
                let key = counting_key(&d.input);
                match self.sampler.epochs.get(&(i, id.clone())) {
                    Some((k, e)) if *k == key && d.epoch < *e => {
                        return Err(format!(
                            "I5: {}'s current epoch of {id} went back from {e} to {}",
                            self.names[i], d.epoch
                        ));
                    }
                    _ => {}
                }
                self.sampler.epochs.insert((i, id.clone()), (key, d.epoch));
                for (origin, v) in &d.nodes {
                    let k = (i, id.clone(), d.epoch, origin.clone());
                    let last = self.sampler.slots.entry(k).or_insert(0);
                    if *v < *last {
                        return Err(format!(
                            "I3: {}'s view of {origin}'s slot of {id} epoch {} went down from {last} to {v}",
                            self.names[i], d.epoch
                        ));
                    }
                    *last = *v;
                }
                if d.input.mode == tally_core::Mode::Hard {
                    let bound = self.hard_bound(id, d.input.max);
                    let seen = self.sampler.hard.entry((id.clone(), d.epoch)).or_default();
                    for (origin, v) in &d.nodes {
                        let s = seen.entry(origin.clone()).or_insert(0);
                        *s = (*s).max(*v);
                    }
                    let spent: u64 = seen.values().sum::<u64>() + d.baseline;
                    if spent > bound {
                        return Err(format!(
                            "I7: at sample {} the nodes of the fleet have spent {spent} of hard limit {id} epoch {} (slots seen {seen:?}, baseline {}), more than max {} + the overrun reported to clients {}",
                            self.sampler.count,
                            d.epoch,
                            d.baseline,
                            bound - self.driver.ledger.borrow().overrun,
                            self.driver.ledger.borrow().overrun
                        ));
                    }
                }
                let sum: u64 = d.nodes.iter().map(|(_, v)| v).sum();
                if d.report.used != d.baseline + sum {
                    return Err(format!(
                        "{}: {id} reports used {} but baseline {} + slots {sum}",
                        self.names[i], d.report.used, d.baseline
                    ));
                }
                let inp = &d.input;
                if inp.calendar_aligned || inp.period == Period::Never {
                    // The calendar's answer, not PeriodSpec's (the code under test).
                    let w =
                        crate::oracle::aligned_window(&inp.period.to_string(), &inp.timezone, now);
                    let (start, resets) = w;
                    if d.epoch.period != start
                        || (inp.period != Period::Never && d.report.period_start_ms != start)
                        || d.report.resets_at_ms != resets
                    {
                        return Err(format!(
                            "I5: at {} ({}) {} puts {id} ({} aligned, {}) in period {} starting {} (resets {:?}); the calendar says {:?}",
                            now,
                            jiff::Timestamp::from_millisecond(now)
                                .map(|t| t.to_string())
                                .unwrap_or_default(),
                            self.names[i],
                            inp.period,
                            inp.timezone,
                            d.epoch.period,
                            d.report.period_start_ms,
                            d.report.resets_at_ms,
                            w
                        ));
                    }
                }
            }
        }
        self.report.samples = self.sampler.count;
        Ok(())
    }

    /// Sends requests through the gateway, all at once, and waits for every outcome.
    pub(crate) fn http_many(
        &mut self,
        reqs: Vec<(usize, &'static str, String, Vec<u8>)>,
    ) -> Result<Vec<HttpOutcome>, Violation> {
        let outs: Vec<Rc<RefCell<Option<HttpOutcome>>>> =
            reqs.iter().map(|_| Rc::new(RefCell::new(None))).collect();
        for ((node, method, path, body), out) in reqs.into_iter().zip(&outs) {
            self.driver.cmds.borrow_mut().push_back(Cmd::Http {
                node: self.names[node].clone(),
                method,
                path,
                body: Some(body),
                out: out.clone(),
            });
        }
        let pending = outs.clone();
        self.run_until("requests", 120_000, move |_| {
            pending.iter().all(|o| o.borrow().is_some())
        })?;
        Ok(outs
            .iter()
            .map(|o| o.borrow_mut().take().expect("outcome"))
            .collect())
    }

    /// What a hard limit may have spent: the largest max it ever had (lowering max
    /// mid-period cannot undo spending), plus the overrun reported to clients.
    fn hard_bound(&self, id: &str, max_now: u64) -> u64 {
        let written = self
            .written
            .get(id)
            .and_then(|w| w.iter().map(|i| i.max).max())
            .unwrap_or(0);
        max_now.max(written) + self.driver.ledger.borrow().overrun
    }

    pub(crate) fn names(&self) -> &[String] {
        &self.names
    }

    pub(crate) fn registry(&self) -> &Registry {
        &self.registry
    }

    pub(crate) fn elapsed(&self) -> Duration {
        self.sim.elapsed()
    }

    /// Sends one request through the gateway and waits for its outcome.
    fn http(
        &mut self,
        node: usize,
        method: &'static str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<HttpOutcome, Violation> {
        let out = Rc::new(RefCell::new(None));
        self.driver.cmds.borrow_mut().push_back(Cmd::Http {
            node: self.names[node].clone(),
            method,
            path: path.to_string(),
            body,
            out: out.clone(),
        });
        self.run_until(&format!("{method} {path}"), 30_000, |_| {
            out.borrow().is_some()
        })?;
        Ok(out.borrow_mut().take().expect("outcome"))
    }

    fn put_limit(&mut self, node: usize, def: &LimitDef) -> Result<(), Violation> {
        let body = def.body().to_string().into_bytes();
        let path = format!("/v1/limits/{}", def.id);
        let mut outcome = self.http(node, "PUT", &path, Some(body.clone()))?;
        // The node's writer is a real thread: when the machine is busy it may miss the
        // client's deadline in simulated time. A PUT is idempotent, so a careful client
        // sends it again; a node that never answers still fails the run.
        for _ in 0..2 {
            if !matches!(outcome, HttpOutcome::Unknown(_)) {
                break;
            }
            self.event(format!("PUT {path} timed out; sending it again"));
            outcome = self.http(node, "PUT", &path, Some(body.clone()))?;
        }
        match outcome {
            HttpOutcome::Response(200, _) => {
                self.written
                    .entry(def.id.to_string())
                    .or_default()
                    .push(input_of(def));
                self.event(format!(
                    "{}: PUT {} max={} period={}",
                    self.names[node], def.id, def.max, def.period
                ));
                Ok(())
            }
            other => Err(format!(
                "PUT {path} on {} failed: {other:?}",
                self.names[node]
            )),
        }
    }

    /// Every running node's view: (limit ids it has, per plan limit its details).
    fn view(&self, i: usize) -> Option<(Vec<String>, Vec<Option<LimitDetails>>)> {
        let ids = self.limit_ids();
        self.registry.with(&self.names[i], |n| {
            let all = n
                .limits(&Default::default())
                .into_iter()
                .map(|d| d.report.id)
                .collect();
            (all, ids.iter().map(|l| n.limit(l)).collect())
        })
    }

    /// I4: every running node shows the same limits, config, epochs, baselines and
    /// per-origin slots. Returns the first difference.
    fn agreement(&self) -> Result<(), String> {
        let up = self.up_nodes();
        let mut first: Option<(usize, NodeView)> = None;
        for &i in &up {
            let Some((ids, views)) = self.view(i) else {
                return Err(format!("{} is not serving", self.names[i]));
            };
            let views: Vec<Option<Comparable>> =
                views.into_iter().map(|v| v.map(Comparable::from)).collect();
            match &first {
                None => first = Some((i, (ids, views))),
                Some((j, (ids0, views0))) => {
                    if ids != *ids0 {
                        return Err(format!(
                            "{} has limits {ids0:?}, {} has {ids:?}",
                            self.names[*j], self.names[i]
                        ));
                    }
                    for (k, (a, b)) in views0.iter().zip(&views).enumerate() {
                        if a != b {
                            return Err(format!(
                                "limit {}: {} has {a:?}, {} has {b:?}",
                                self.plan.limits[k].id, self.names[*j], self.names[i]
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// I1/I2 against the ledger, on converged state (all nodes equal: read the first).
    fn check_ledger(&mut self) -> Result<(), Violation> {
        self.driver.ledger.borrow().check_dedup()?;
        let up = self.up_nodes();
        let Some(&first) = up.first() else {
            return Err("no node is running".into());
        };
        let (_, views) = self.view(first).ok_or("first node vanished")?;
        let ledger = self.driver.ledger.borrow();
        let mut origins = ledger.origins();
        for (def, d) in self.plan.limits.iter().zip(views) {
            let Some(d) = d else {
                if !self.written.contains_key(def.id) {
                    continue; // not written yet (hard limits come after the fleet formed)
                }
                return Err(format!("limit {} is missing after heal", def.id));
            };
            let slots: BTreeMap<String, u64> = d.nodes.iter().cloned().collect();
            origins.extend(slots.keys().cloned());
            for o in &origins {
                let b = ledger.bounds(def.id, unit_of(&d.input), d.epoch, o);
                let v = slots.get(o).copied().unwrap_or(0);
                if v < b.lower {
                    return Err(format!(
                        "I1: limit {} epoch {}: {o}'s slot is {v} on every node, but {} was acknowledged there (lost usage; may be up to {})",
                        def.id, d.epoch, b.lower, b.upper
                    ));
                }
                if v > b.upper {
                    return Err(format!(
                        "I2: limit {} epoch {}: {o}'s slot is {v} on every node, but at most {} can have been applied there (acknowledged {})",
                        def.id, d.epoch, b.upper, b.lower
                    ));
                }
            }
            if self
                .written
                .get(def.id)
                .is_some_and(|w| !written_matches(w, &d.input))
            {
                return Err(format!(
                    "I4: limit {} converged to a config nobody wrote: {:?}",
                    def.id, d.input
                ));
            }
            let allowed = self.baselines.get(def.id);
            if d.baseline != 0 && !allowed.is_some_and(|b| b.contains(&d.baseline)) {
                return Err(format!(
                    "limit {} epoch {} has baseline {} that no reset set",
                    def.id, d.epoch, d.baseline
                ));
            }
            if def.id == "budget" {
                self.report.budget_max = d.input.max;
                self.report.overshoot = d.report.used.saturating_sub(d.input.max);
            }
            if def.hard {
                let bound = self.hard_bound(def.id, d.input.max);
                if d.report.used > bound {
                    return Err(format!(
                        "I7: hard limit {} converged to used {} > max {} + reported overrun {} (nodes {:?})",
                        def.id,
                        d.report.used,
                        bound - ledger.overrun,
                        ledger.overrun,
                        d.nodes
                    ));
                }
                self.report.hard_used = d.report.used;
                self.report.hard_max = d.input.max;
            }
        }
        Ok(())
    }

    fn set_links(&mut self, f: impl Fn(&mut turmoil::Sim<'static>, &str, &str)) {
        let n = self.names.len();
        for i in 0..n {
            for j in (i + 1)..n {
                if self.states[i] != HostState::NotStarted
                    && self.states[j] != HostState::NotStarted
                {
                    f(&mut self.sim, &self.names[i], &self.names[j]);
                }
            }
        }
    }

    pub(crate) fn sides(
        &mut self,
        a: &[usize],
        b: &[usize],
        f: impl Fn(&mut turmoil::Sim<'static>, &str, &str),
    ) {
        for &x in a {
            for &y in b {
                f(&mut self.sim, &self.names[x], &self.names[y]);
            }
        }
    }

    pub(crate) fn repair_all(&mut self) {
        self.set_links(|s, a, b| {
            s.repair(a, b);
            s.release(a, b);
            s.set_link_fail_rate(a, b, 0.0);
            s.set_link_max_message_latency(a, b, Duration::from_millis(LATENCY_MS));
        });
    }

    fn wait_drained(&mut self) -> Result<(), Violation> {
        let d = self.driver.clone();
        self.run_until("traffic", 600_000, move |_| {
            d.busy.get() == 0 && d.cmds.borrow().is_empty()
        })
    }

    pub(crate) fn wait_up(&mut self, i: usize) -> Result<(), Violation> {
        let name = self.names[i].clone();
        let reg = self.registry.clone();
        self.run_until(&format!("{name} start"), 10_000, move |_| reg.is_up(&name))
    }

    /// Steps until every running node agrees (I4), then checks the ledger (I1, I2).
    fn converge(&mut self, measure: bool) -> Result<(), Violation> {
        let started = self.sim.elapsed();
        let limit = self.knobs.gossip_interval * self.knobs.rounds_max as u32;
        loop {
            if self.agreement().is_ok() {
                break;
            }
            if self.sim.elapsed() - started > limit {
                let why = self.agreement().err().unwrap_or_default();
                return Err(format!(
                    "I4: no convergence within {} gossip rounds ({} ms) after heal: {why}",
                    self.knobs.rounds_max,
                    ms(limit)
                ));
            }
            self.step()?;
        }
        let took = self.sim.elapsed() - started;
        let rounds = took
            .as_millis()
            .div_ceil(self.knobs.gossip_interval.as_millis()) as u64;
        if measure {
            self.report.convergence.push((rounds, ms(took)));
        }
        self.event(format!("converged after {rounds} rounds ({} ms)", ms(took)));
        self.check_ledger()?;
        self.check_history()
    }

    /// I1/I2 in every epoch, past ones included (records with a late `at`, records that
    /// crossed a period boundary in flight): each running node's own slot of every epoch
    /// in its history (`GET /v1/limits/{id}/history`, read from its disk) lies within what
    /// the ledger allows for the records that node took in that epoch. Closed epochs are
    /// no longer gossiped, so each node answers for its own slots only.
    fn check_history(&mut self) -> Result<(), Violation> {
        let mut checked = 0u64;
        for node in self.up_nodes() {
            let name = self.names[node].clone();
            for def in self.plan.limits.clone() {
                if !self.written.contains_key(def.id) {
                    continue; // not written yet (hard limits come once the fleet formed)
                }
                let path = format!("/v1/limits/{}/history?limit=1000", def.id);
                let v = match self.http(node, "GET", &path, None)? {
                    HttpOutcome::Response(200, v) => v,
                    other => return Err(format!("{name}: GET {path}: {other:?}")),
                };
                let unit = unit_of(&input_of(&def));
                for e in v["epochs"].as_array().into_iter().flatten() {
                    let period = match e["period_start"].as_str() {
                        Some(t) => t
                            .parse::<jiff::Timestamp>()
                            .map_err(|err| format!("{name}: {path}: {t}: {err}"))?
                            .as_millisecond(),
                        None => crate::oracle::NEVER_START_MS,
                    };
                    let reset = e["reset"]
                        .as_str()
                        .and_then(|r| r.parse().ok())
                        .ok_or_else(|| format!("{name}: {path}: no reset in {e}"))?;
                    let epoch = Epoch { period, reset };
                    let own = e["nodes"][name.as_str()].as_u64().unwrap_or(0);
                    let b = self
                        .driver
                        .ledger
                        .borrow()
                        .bounds(def.id, unit, epoch, &name);
                    if own < b.lower || own > b.upper {
                        return Err(format!(
                            "{}: limit {} epoch {epoch} (current: {}): {name}'s own slot on its disk is {own}, the ledger allows {}..={} (lost or double-counted usage in this epoch)",
                            if own < b.lower { "I1" } else { "I2" },
                            def.id,
                            e["current"],
                            b.lower,
                            b.upper
                        ));
                    }
                    checked += 1;
                }
            }
        }
        self.event(format!(
            "history: {checked} own slots checked in every epoch"
        ));
        Ok(())
    }

    /// I8: malformed requests get a 4xx and leave the node's state as it was.
    fn bad_input(&mut self, node: usize) -> Result<(), Violation> {
        let before = self.view(node).ok_or("node down")?;
        let before: Vec<Option<Comparable>> = before
            .1
            .into_iter()
            .map(|v| v.map(|d| Comparable::from(d).without_rights()))
            .collect();
        let good_id = format!("i8-{}", self.steps);
        let big = "x".repeat(2 << 20);
        let attrs9: serde_json::Map<String, serde_json::Value> =
            (0..9).map(|i| (format!("d{i}"), json!("v"))).collect();
        let cases: Vec<(&'static str, String, String)> = vec![
            ("POST", "/v1/usage".into(), r#"{"id":"","tokens":5}"#.into()),
            (
                "POST",
                "/v1/usage".into(),
                r#"{"id":"ok-1","tokens":-5}"#.into(),
            ),
            (
                "POST",
                "/v1/usage".into(),
                r#"{"id":"ok-2","tokens":1e30}"#.into(),
            ),
            (
                "POST",
                "/v1/usage".into(),
                r#"{"id":"ok-3","tokens":5,"bogus":1}"#.into(),
            ),
            ("POST", "/v1/usage".into(), "{not json".into()),
            (
                "POST",
                "/v1/usage".into(),
                json!({"id":"ok-4","tokens":5,"attributes":attrs9}).to_string(),
            ),
            (
                "POST",
                "/v1/usage".into(),
                r#"{"id":"ok-5","tokens":5,"at":"2999-01-01T00:00:00Z"}"#.into(),
            ),
            (
                "POST",
                "/v1/usage".into(),
                r#"{"id":"ok-6","tokens":5,"at":"1999-01-01T00:00:00Z"}"#.into(),
            ),
            (
                "POST",
                "/v1/usage".into(),
                r#"{"id":"ok-7","tokens":5,"at":"yesterday"}"#.into(),
            ),
            (
                "POST",
                "/v1/usage".into(),
                format!(r#"{{"id":"ok-8","tokens":5,"pad":"{big}"}}"#),
            ),
            (
                "POST",
                "/v1/usage/batch".into(),
                json!({"records":[
                    {"id": good_id, "attributes":{"team":"eng"}, "tokens": 7},
                    {"id": "", "tokens": 1}
                ]})
                .to_string(),
            ),
            (
                "POST",
                "/v1/check".into(),
                r#"{"attributes":{"Team!":"eng"}}"#.into(),
            ),
            ("POST", "/v1/check".into(), r#"{"tokens":-1}"#.into()),
            (
                "PUT",
                "/v1/limits/total".into(),
                r#"{"metric":"tokens","max":5,"period":"7s","calendar_aligned":true}"#.into(),
            ),
            (
                "PUT",
                "/v1/limits/total".into(),
                r#"{"metric":"bananas","max":5,"period":"1d"}"#.into(),
            ),
            (
                "PUT",
                "/v1/limits/total".into(),
                r#"{"metric":"tokens","max":-5,"period":"1d"}"#.into(),
            ),
            (
                "PUT",
                "/v1/limits/total".into(),
                r#"{"metric":"tokens","max":5,"period":"1d","timezone":"Mars/Olympus"}"#.into(),
            ),
            (
                "PUT",
                "/v1/limits/bad%20id".into(),
                r#"{"metric":"tokens","max":5,"period":"1d"}"#.into(),
            ),
            (
                "POST",
                "/v1/limits/total/reset".into(),
                r#"{"used":-5}"#.into(),
            ),
            (
                "POST",
                "/v1/limits/total/reset".into(),
                r#"{"used":"lots"}"#.into(),
            ),
            ("POST", "/v1/limits/nope/reset".into(), "{}".into()),
            ("PUT", "/v1/entities/Bad-Dim/x".into(), "{}".into()),
            ("DELETE", "/v1/limits/nope".into(), String::new()),
            (
                "PUT",
                "/v1/limits/hard".into(),
                r#"{"scope":{"team":"eng","gate":"hard"},"metric":"tokens","max":1,"period":"never","mode":"firm"}"#.into(),
            ),
            (
                "PUT",
                "/v1/limits/hard".into(),
                r#"{"scope":{"team":"eng","gate":"hard"},"metric":"tokens","max":1,"period":"never","mode":"hard","members":[]}"#.into(),
            ),
            (
                "POST",
                "/v1/check".into(),
                r#"{"attributes":{"team":"eng","gate":"hard"},"tokens":1,"reserve":true,"ttl_s":0}"#.into(),
            ),
            (
                "POST",
                "/v1/usage".into(),
                r#"{"id":"bad-res","attributes":{"team":"eng","gate":"hard"},"tokens":5,"reservation":"no such thing"}"#.into(),
            ),
            ("DELETE", "/v1/reservations/a~b".into(), String::new()),
            (
                "POST",
                "/v1/nodes/n1/decommission".into(),
                r#"{"successor":"n1"}"#.into(),
            ),
        ];
        for (method, path, body) in cases {
            let shown = body.chars().take(120).collect::<String>();
            match self.http(node, method, &path, Some(body.into_bytes()))? {
                HttpOutcome::Response(s, _) if (400..500).contains(&s) => {}
                other => {
                    return Err(format!(
                        "I8: {method} {path} {shown} got {other:?}, expected a 4xx"
                    ));
                }
            }
        }
        let after = self.view(node).ok_or("node down")?;
        let after: Vec<Option<Comparable>> = after
            .1
            .into_iter()
            .map(|v| v.map(|d| Comparable::from(d).without_rights()))
            .collect();
        if before != after {
            return Err(format!(
                "I8: bad requests changed {}'s state:\nbefore {before:?}\nafter  {after:?}",
                self.names[node]
            ));
        }
        // The good record of the refused batch was not remembered either: sent alone it
        // is applied (and counted, like any record, by the ledger).
        self.driver
            .cmds
            .borrow_mut()
            .push_back(Cmd::Traffic(Traffic {
                tag: good_id,
                nodes: vec![node],
                count: 1,
                tokens: (7, 7),
                spacing_ms: 1,
                gated: false,
                retry: crate::scenario::Retry::UntilAcked,
                at_back_ms: None,
                seed: 0,
            }));
        self.wait_drained()?;
        let last = self.driver.ledger.borrow().attempts.last().cloned();
        match last {
            Some(a) if a.outcome == crate::ledger::Outcome::Acked(true) => Ok(()),
            other => Err(format!(
                "I8: the valid record of a refused batch was kept: sent alone it got {other:?}"
            )),
        }
    }

    pub fn run(&mut self) -> Result<(), Violation> {
        for i in 0..self.plan.nodes {
            self.wait_up(i)?;
        }
        self.event("fleet up");
        let limits = self.plan.limits.clone();
        for def in limits.iter().filter(|d| !d.hard) {
            self.put_limit(0, def)?;
        }
        self.converge(false)?;
        // Hard limits take the live fleet as members: written once every node sees the
        // others live.
        let fleet: Vec<String> = self.names[..self.plan.nodes].to_vec();
        let mut tries = 0;
        loop {
            let live: Vec<String> = match self.http(0, "GET", "/v1/cluster", None)? {
                HttpOutcome::Response(200, v) => v["nodes"]
                    .as_array()
                    .map(|ns| {
                        ns.iter()
                            .filter(|n| n["live"] == true)
                            .filter_map(|n| n["node_id"].as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default(),
                _ => Vec::new(),
            };
            if fleet.iter().all(|f| live.contains(f)) {
                break;
            }
            tries += 1;
            if tries > 600 {
                return Err(format!("node 0 sees only {live:?} live after 30 s"));
            }
            self.run_for(50)?;
        }
        for def in limits.iter().filter(|d| d.hard) {
            self.put_limit(0, def)?;
        }
        self.converge(false)?;
        self.event("limits everywhere");
        let ops = self.plan.ops.clone();
        for op in ops {
            self.event(format!("{op:?}"));
            self.apply(op)?;
        }
        let l = self.driver.ledger.borrow();
        self.report.acked = l.acked();
        self.report.unknown = l.unknown();
        self.report.denied = l.denied;
        self.report.cross_node_retries = l.cross_node_retries;
        self.report.hard_overrun = l.overrun;
        self.report.hard_denied_rights = l.denied_rights;
        self.report.hard_denied_budget = l.denied_budget;
        self.report.hard_first_denial_used = l.first_denial_used;
        self.report.acked_ids = l.acked_ids();
        self.report.check_failed = l.check_failed;
        self.report.given_up = l.given_up;
        drop(l);
        for name in self.names.clone() {
            if let Some(w) = self.registry.with(&name, |n| n.rights_waits_ms()) {
                self.report.rights_waits_ms.extend(w);
            }
        }
        self.report.sim_ms = self.now_ms();
        Ok(())
    }

    /// Cuts a host's power: its software stops and its disk keeps what `how` says.
    fn power_off(&mut self, i: usize, how: PowerLoss) {
        self.configs[i].disk.power_loss(how);
        self.sim.crash(self.names[i].as_str());
        self.states[i] = HostState::Down;
    }

    /// Holds the node's syncs, sends it a burst, and cuts the power once its writer waits
    /// in the sync of a group commit (every page of it written, nothing synced).
    fn power_loss_mid_commit(
        &mut self,
        node: usize,
        records: u32,
        torn: bool,
        seed: u64,
    ) -> Result<(), Violation> {
        let disk = self.configs[node].disk.clone();
        disk.hold_syncs(true);
        self.driver
            .cmds
            .borrow_mut()
            .push_back(Cmd::Traffic(Traffic {
                tag: format!("cut{seed:x}"),
                nodes: vec![node],
                count: records,
                tokens: (1, 100),
                spacing_ms: 0,
                gated: false,
                retry: crate::scenario::Retry::UntilAcked,
                at_back_ms: None,
                seed,
            }));
        // Step until the writer holds records, then stop simulated time and give the
        // writer (a real thread) real time to write its pages and reach the sync: spinning
        // the simulation meanwhile would starve it of CPU and run the clients' clocks out.
        let name = self.names[node].clone();
        let until = self.sim.elapsed() + Duration::from_millis(500);
        while self.sim.elapsed() < until
            && self.registry.with(&name, |n| n.queue_depth()).unwrap_or(0) == 0
        {
            self.step()?;
        }
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while disk.syncs_waiting() == 0 && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_micros(100));
        }
        let in_sync = disk.syncs_waiting() > 0;
        let unsynced = disk.stats().unsynced_changes;
        let how = if torn {
            let mut rng = sim::Rng::new(seed);
            PowerLoss::Partial {
                changes: rng.below(unsynced as u64 + 1) as usize,
                torn_bytes: rng.below(4097) as usize,
            }
        } else {
            PowerLoss::DropUnsynced
        };
        self.power_off(node, how);
        if in_sync {
            self.report.mid_commit_crashes += 1;
        }
        self.event(format!(
            "power cut on {} {} with {unsynced} unsynced changes: {how:?}",
            self.names[node],
            if in_sync {
                "inside a sync"
            } else {
                "(no sync reached)"
            },
        ));
        Ok(())
    }

    fn apply(&mut self, op: Op) -> Result<(), Violation> {
        match op {
            Op::Traffic(t) => self.driver.cmds.borrow_mut().push_back(Cmd::Traffic(t)),
            Op::Drain => self.wait_drained()?,
            Op::Wait(ms) => self.run_for(ms)?,
            Op::Partition(a, b) => self.sides(&a, &b, |s, x, y| s.partition(x, y)),
            Op::OneWay(a, b) => {
                let (x, y) = (self.names[a].clone(), self.names[b].clone());
                self.sim.partition_oneway(x.as_str(), y.as_str());
            }
            Op::Repair => self.repair_all(),
            Op::Hold(a, b) => self.sides(&a, &b, |s, x, y| s.hold(x, y)),
            Op::Release(a, b) => self.sides(&a, &b, |s, x, y| s.release(x, y)),
            Op::Loss(rate) => self.set_links(|s, a, b| s.set_link_fail_rate(a, b, rate)),
            Op::Latency(max) => self.set_links(|s, a, b| {
                s.set_link_max_message_latency(a, b, Duration::from_millis(max))
            }),
            Op::Flap {
                a,
                b,
                every_ms,
                times,
            } => {
                for _ in 0..times {
                    self.sides(&a, &b, |s, x, y| s.partition(x, y));
                    self.run_for(every_ms)?;
                    self.sides(&a, &b, |s, x, y| s.repair(x, y));
                    self.run_for(every_ms)?;
                }
            }
            Op::Crash(i) => self.power_off(i, PowerLoss::DropUnsynced),
            Op::Restart(i) => {
                self.sim.bounce(self.names[i].as_str());
                self.states[i] = HostState::Up;
                self.wait_up(i)?;
            }
            Op::CrashMidCommit {
                node,
                records,
                seed,
            } => {
                self.driver
                    .cmds
                    .borrow_mut()
                    .push_back(Cmd::Traffic(Traffic {
                        tag: format!("burst{seed:x}"),
                        nodes: vec![node],
                        count: records,
                        tokens: (1, 100),
                        spacing_ms: 0,
                        gated: false,
                        retry: crate::scenario::Retry::UntilAcked,
                        at_back_ms: None,
                        seed,
                    }));
                // Crash as soon as the writer holds queued records (it is then planning,
                // writing or fsyncing them); if the burst slipped through between two
                // steps, crash right after it anyway.
                let name = self.names[node].clone();
                let until = self.sim.elapsed() + Duration::from_millis(500);
                let mut depth = 0;
                while self.sim.elapsed() < until {
                    self.step()?;
                    depth = self.registry.with(&name, |n| n.queue_depth()).unwrap_or(0);
                    if depth > 0 {
                        self.report.mid_commit_crashes += 1;
                        break;
                    }
                }
                self.power_off(node, PowerLoss::DropUnsynced);
                self.event(format!(
                    "crashed {} with {depth} records queued",
                    self.names[node]
                ));
            }
            Op::Decommission { node, via } => {
                let path = format!("/v1/nodes/{}/decommission", self.names[node]);
                let body = serde_json::json!({"successor": self.names[via]}).to_string();
                match self.http(via, "POST", &path, Some(body.into_bytes()))? {
                    HttpOutcome::Response(200, _) => {}
                    other => return Err(format!("POST {path} on {}: {other:?}", self.names[via])),
                }
            }
            Op::Remove(i) => {
                self.power_off(i, PowerLoss::DropUnsynced);
                self.states[i] = HostState::Removed;
            }
            Op::PowerLossMidCommit {
                node,
                records,
                torn,
                seed,
            } => self.power_loss_mid_commit(node, records, torn, seed)?,
            Op::FailSyncs { node, count } => self.configs[node].disk.fail_syncs(count),
            Op::FillDisk {
                node,
                copy_on_write,
            } => {
                let disk = &self.configs[node].disk;
                if copy_on_write {
                    disk.fill_cow();
                } else {
                    disk.fill();
                }
            }
            Op::FixDisk(i) => {
                let disk = &self.configs[i].disk;
                disk.fail_syncs(Some(0));
                disk.set_capacity(u64::MAX);
            }
            Op::ExpectStorage {
                node,
                want,
                within_ms,
            } => {
                let name = self.names[node].clone();
                let reg = self.registry.clone();
                let health = move || reg.with(&name, |n| n.storage_health());
                let until = self.sim.elapsed() + Duration::from_millis(within_ms);
                while health() != Some(want) {
                    if self.sim.elapsed() >= until {
                        return Err(format!(
                            "{}'s storage is {:?} after {within_ms} ms, expected {want:?}",
                            self.names[node],
                            health()
                        ));
                    }
                    self.step()?;
                    // What we wait for happens on the node's writer, a real thread: give it
                    // real time, or a busy machine runs simulated time out from under it.
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
            Op::Join(i) => {
                self.start_host(i);
                self.repair_all();
                self.wait_up(i)?;
            }
            Op::PutLimit { node, def } => self.put_limit(node, &def)?,
            Op::Reset { node, id, used } => {
                let body = match used {
                    Some(u) => json!({ "used": u }),
                    None => json!({}),
                };
                let path = format!("/v1/limits/{id}/reset");
                match self.http(node, "POST", &path, Some(body.to_string().into_bytes()))? {
                    HttpOutcome::Response(200, _) => {
                        self.baselines
                            .entry(id.to_string())
                            .or_default()
                            .push(used.unwrap_or(0));
                    }
                    other => {
                        return Err(format!("reset on {} failed: {other:?}", self.names[node]));
                    }
                }
            }
            Op::Settle => self.converge(false)?,
            Op::Heal => {
                self.repair_all();
                for i in 0..self.names.len() {
                    if self.states[i] == HostState::Down {
                        self.sim.bounce(self.names[i].as_str());
                        self.states[i] = HostState::Up;
                        self.wait_up(i)?;
                    }
                }
                self.converge(true)?;
            }
            Op::BadInput(i) => {
                // The plan names a node; if it is gone, the next running one.
                let up = self.up_nodes();
                let node = up.iter().copied().find(|&u| u >= i).or(up.first().copied());
                self.bad_input(node.ok_or("no node is running")?)?;
            }
        }
        Ok(())
    }
}

/// A node's limit ids and, per plan limit, what must agree.
type NodeView = (Vec<String>, Vec<Option<Comparable>>);

/// The parts of a limit view that must be equal on every node after heal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Comparable {
    input: LimitInput,
    epoch: Epoch,
    baseline: u64,
    used: u64,
    nodes: Vec<(String, u64)>,
    /// Hard limits: every node's rights (grants included) must agree too.
    rights: Vec<tally_node::NodeRights>,
}

impl Comparable {
    /// Without hard limits' rights, which the rights task moves at any time.
    fn without_rights(mut self) -> Comparable {
        self.rights.clear();
        self
    }
}

impl From<LimitDetails> for Comparable {
    fn from(d: LimitDetails) -> Comparable {
        Comparable {
            input: d.input,
            epoch: d.epoch,
            baseline: d.baseline,
            used: d.report.used,
            nodes: d.nodes.into_iter().filter(|(_, v)| *v > 0).collect(),
            rights: d.rights,
        }
    }
}
