//! The simulated gateway: a turmoil client host that sends the plan's traffic to the nodes
//! through their HTTP API and writes every attempt into the [`Ledger`].
//!
//! The executor (outside the simulation) hands it [`Cmd`]s; each runs as its own task, so
//! traffic goes on while the executor injects faults.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use sim::Rng;
use tally_core::Epoch;

use crate::host::{Registry, SimClock};
use crate::ledger::{Attempt, Ledger, Outcome, Placement};
use crate::net::{HttpOutcome, request};
use crate::scenario::{Retry, Traffic};
use tally_node::Clock as _;

/// How long a client waits for a reply (simulated).
const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// Pause before retrying a record whose fate is unknown.
const RETRY_PAUSE: Duration = Duration::from_millis(250);
/// Attempts per record before the client gives up (a node down for longer than this
/// leaves the record unacknowledged, which the ledger accounts as unknown).
const ATTEMPTS_MAX: u32 = 60;

pub enum Cmd {
    Traffic(Traffic),
    Http {
        node: String,
        method: &'static str,
        path: String,
        body: Option<Vec<u8>>,
        out: Rc<RefCell<Option<HttpOutcome>>>,
    },
}

/// State shared by the executor and the gateway (same thread: turmoil is single-threaded).
pub struct Driver {
    pub cmds: RefCell<VecDeque<Cmd>>,
    /// Commands started and not finished.
    pub busy: Cell<usize>,
    pub ledger: RefCell<Ledger>,
    /// HTTP address of every node, by node index.
    pub http: RefCell<HashMap<usize, SocketAddr>>,
    pub names: Vec<String>,
    pub registry: Registry,
    pub clocks: Vec<Arc<SimClock>>,
    /// Limit ids every record is observed against (all plan limits match every record).
    pub limits: Vec<String>,
    /// (period, timezone) of the calendar-aligned and all-time limits, to place records
    /// that carry `at` with the independent oracle ([`crate::oracle`]).
    pub at_specs: RefCell<HashMap<String, (String, String)>>,
    pub elapsed_ms: Arc<std::sync::atomic::AtomicI64>,
    /// What the gateway saw that must not happen; the executor fails the run on it.
    pub violations: RefCell<Vec<String>>,
}

impl Driver {
    fn now_ms(&self) -> i64 {
        self.elapsed_ms.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn addr(&self, node: usize) -> Option<SocketAddr> {
        self.http.borrow().get(&node).copied()
    }

    /// The node's current epoch of every limit (`None`: node down or limit unknown).
    fn epochs(&self, node: usize) -> Vec<Option<Epoch>> {
        self.limits
            .iter()
            .map(|l| {
                self.registry
                    .with(&self.names[node], |n| n.limit(l).map(|d| d.epoch))
                    .flatten()
            })
            .collect()
    }
}

/// The gateway's main loop: start every command as a task.
pub async fn run(driver: Rc<Driver>) -> turmoil::Result {
    loop {
        let next = driver.cmds.borrow_mut().pop_front();
        match next {
            Some(cmd) => {
                driver.busy.set(driver.busy.get() + 1);
                let d = driver.clone();
                let work = tokio::task::spawn_local(async move {
                    match cmd {
                        Cmd::Traffic(t) => traffic(&d, t).await,
                        Cmd::Http {
                            node,
                            method,
                            path,
                            body,
                            out,
                        } => {
                            let idx = d.names.iter().position(|n| *n == node).expect("node");
                            let r = match d.addr(idx) {
                                Some(a) => request(a, method, &path, body, REQUEST_DEADLINE).await,
                                None => HttpOutcome::NotSent("node has no address".into()),
                            };
                            *out.borrow_mut() = Some(r);
                        }
                    }
                });
                // A panic in a command (an assertion of the gateway, a bug in the harness)
                // fails the run instead of silently leaving its records unsent.
                let d = driver.clone();
                tokio::task::spawn_local(async move {
                    if let Err(e) = work.await {
                        d.violations
                            .borrow_mut()
                            .push(format!("a gateway command task failed: {e}"));
                    }
                    d.busy.set(d.busy.get() - 1);
                });
            }
            None => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
}

async fn traffic(d: &Rc<Driver>, t: Traffic) {
    let mut rng = Rng::new(t.seed);
    let mut tasks = Vec::new();
    for i in 0..t.count {
        let node = *rng.pick(&t.nodes);
        let other = t.nodes.iter().copied().find(|&n| n != node).unwrap_or(node);
        let tokens = rng.range(t.tokens.0, t.tokens.1);
        let at_back = t
            .at_back_ms
            .map(|(lo, hi)| lo + rng.below((hi - lo).max(1) as u64) as i64);
        let id = format!("{}-{i}", t.tag);
        let rec = Rec {
            id,
            tokens,
            at_back,
            gated: t.gated,
            reservation: None,
        };
        if t.spacing_ms == 0 {
            let d = d.clone();
            let retry = t.retry;
            tasks.push(tokio::task::spawn_local(async move {
                send(&d, node, other, rec, retry).await;
            }));
        } else {
            send(d, node, other, rec, t.retry).await;
            tokio::time::sleep(Duration::from_millis(t.spacing_ms)).await;
        }
    }
    for task in tasks {
        if let Err(e) = task.await {
            d.violations
                .borrow_mut()
                .push(format!("a traffic task of {} failed: {e}", t.tag));
        }
    }
}

struct Rec {
    id: String,
    tokens: u64,
    at_back: Option<i64>,
    /// Checked first, with a reservation on the hard limit (which only gated traffic
    /// matches: attribute `gate=hard`), settled by the record.
    gated: bool,
    reservation: Option<String>,
}

impl Rec {
    fn attributes(&self) -> Value {
        if self.gated {
            json!({"team": "eng", "gate": "hard"})
        } else {
            json!({"team": "eng"})
        }
    }
}

async fn send(d: &Rc<Driver>, node: usize, other: usize, mut rec: Rec, retry: Retry) {
    if rec.gated {
        let Some(addr) = d.addr(node) else {
            d.ledger.borrow_mut().check_failed += 1;
            return;
        };
        let body = json!({"attributes": rec.attributes(), "tokens": rec.tokens, "reserve": true});
        match request(
            addr,
            "POST",
            "/v1/check",
            Some(body.to_string().into_bytes()),
            REQUEST_DEADLINE,
        )
        .await
        {
            HttpOutcome::Response(200, v) if v["allowed"] == json!(true) => {
                rec.reservation = v["reservation"]["id"].as_str().map(str::to_string);
                if rec.reservation.is_none() {
                    d.violations.borrow_mut().push(format!(
                        "an allowed check with reserve had no reservation: {v}"
                    ));
                }
            }
            HttpOutcome::Response(200, v) => {
                let mut l = d.ledger.borrow_mut();
                l.denied += 1;
                let hard = v["limits"]
                    .as_array()
                    .and_then(|ls| ls.iter().find(|e| e["id"] == "hard").cloned());
                if let Some(h) = hard {
                    match h["reason"].as_str() {
                        Some("rights") => l.denied_rights += 1,
                        Some("budget") => l.denied_budget += 1,
                        _ => {}
                    }
                    if h["denied"] != json!(false)
                        && h["reason"].is_string()
                        && l.first_denial_used.is_none()
                    {
                        l.first_denial_used = h["used"].as_u64();
                    }
                }
                return;
            }
            // A gateway that cannot check fails closed (counted: floors bound it).
            _ => {
                d.ledger.borrow_mut().check_failed += 1;
                return;
            }
        }
    }
    let mut acked = false;
    for _ in 0..ATTEMPTS_MAX {
        match attempt(d, node, &rec).await {
            Outcome::Acked(_) => {
                acked = true;
                break;
            }
            Outcome::NotApplied | Outcome::Unknown => {
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
    }
    if !acked {
        d.ledger.borrow_mut().given_up += 1;
        return;
    }
    match retry {
        Retry::UntilAcked => {}
        Retry::DuplicateSame => {
            attempt(d, node, &rec).await;
        }
        Retry::OtherNode if other != node => {
            d.ledger.borrow_mut().cross_node_retries += 1;
            for _ in 0..ATTEMPTS_MAX {
                if let Outcome::Acked(_) = attempt(d, other, &rec).await {
                    break;
                }
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
        Retry::OtherNode => {}
    }
}

/// One POST /v1/usage, written into the ledger with the epochs around it.
async fn attempt(d: &Rc<Driver>, node: usize, rec: &Rec) -> Outcome {
    let sent_ms = d.now_ms();
    let Some(addr) = d.addr(node) else {
        return Outcome::NotApplied;
    };
    let node_now = d.clocks[node].now_ms();
    let at_ms = rec.at_back.map(|b| node_now - b);
    let mut body = json!({
        "id": rec.id,
        "attributes": rec.attributes(),
        "tokens": rec.tokens,
        "requests": 1,
    });
    if let Some(r) = &rec.reservation {
        body["reservation"] = json!(r);
    }
    if let Some(at) = at_ms {
        let ts = jiff::Timestamp::from_millisecond(at).expect("at");
        body["at"] = Value::String(ts.to_string());
    }
    let pre = d.epochs(node);
    let out = request(
        addr,
        "POST",
        "/v1/usage",
        Some(body.to_string().into_bytes()),
        REQUEST_DEADLINE,
    )
    .await;
    if let HttpOutcome::Response(200, v) = &out {
        if let Some(n) = v["overrun"]["hard"].as_u64() {
            d.ledger.borrow_mut().overrun += n;
        }
    }
    let outcome = match &out {
        HttpOutcome::Response(200, v) => Outcome::Acked(v["applied"] == json!(true)),
        HttpOutcome::Response(s, _) if (400..500).contains(s) => Outcome::NotApplied,
        HttpOutcome::Response(..) | HttpOutcome::Unknown(_) => Outcome::Unknown,
        HttpOutcome::NotSent(_) => Outcome::NotApplied,
    };
    if let (HttpOutcome::Response(s, v), Outcome::NotApplied) = (&out, outcome) {
        d.violations.borrow_mut().push(format!(
            "valid record {} was refused by {}: {s} {v}",
            rec.id, d.names[node]
        ));
    }
    let post = match outcome {
        Outcome::Acked(_) => d.epochs(node),
        _ => vec![None; d.limits.len()],
    };
    let specs = d.at_specs.borrow();
    let placements = d
        .limits
        .iter()
        .zip(pre.iter().zip(post))
        // The hard limit applies only to gated records.
        .filter(|(limit, _)| rec.gated || *limit != "hard")
        .map(|(limit, (&pre, post))| Placement {
            limit: limit.clone(),
            pre,
            post,
            at_period: at_ms.and_then(|at| {
                specs
                    .get(limit)
                    .map(|(period, tz)| crate::oracle::aligned_window(period, tz, at).0)
            }),
        })
        .collect();
    d.ledger.borrow_mut().push(Attempt {
        id: rec.id.clone(),
        origin: d.names[node].clone(),
        tokens: rec.tokens,
        outcome,
        placements,
        sent_ms,
    });
    outcome
}
