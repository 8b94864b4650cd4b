//! `--mode embedded`: the check and record workloads as in-process calls of tally's
//! embeddable API (`tally_node::Node`), with no HTTP, JSON or sockets: what a gateway
//! written in Rust that links tally would pay.
//!
//! The closed loop is unchanged: `--connections` tasks on the load generator's runtime,
//! each making one call, awaiting it, and making the next. A check is synchronous (it
//! reads memory under a read lock), so after each one the task yields to the scheduler,
//! as a request handler would between requests; without that, one task would keep its
//! worker thread for the whole window and the others would never run. A record awaits
//! the writer's group commit (durable when it returns), like `POST /v1/usage`.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, bail};
use tally_core::{Amounts, LimitInput, Metric, Micros, Period};
use tally_node::{Node, NodeConfig, NodeError, UsageRecord};

use crate::run::Protocol;
use crate::workload::{
    LIMIT_MAX_MICROS, LIMIT_PERIOD, LimitPlan, REQUEST_COST_MICROS, REQUEST_TOKENS_COUNT,
    attributes, key_for, usage_id,
};

/// Which call the run makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    Check,
    Record,
}

/// The in-process [`Protocol`]: a "connection" is nothing (every task shares the node).
pub struct Embedded {
    node: Node,
    workload: Workload,
    keys: usize,
    /// Attributes of each key, owned; calls borrow them.
    attributes: Vec<[(&'static str, String); 5]>,
    run_id: String,
}

/// What one task sends next.
#[derive(Debug)]
pub struct EmbeddedGen {
    connection: usize,
    n: u64,
}

/// The amounts every generated request carries (the HTTP bodies' `cost`/`tokens`).
fn amounts() -> Amounts {
    Amounts {
        cost: Micros(REQUEST_COST_MICROS),
        tokens: REQUEST_TOKENS_COUNT,
        requests: 1,
    }
}

/// A node error as the HTTP status tally-server would answer with.
fn status_of(error: &NodeError) -> u16 {
    match error {
        NodeError::InvalidArgument { .. } => 400,
        NodeError::NotFound(_) => 404,
        NodeError::Conflict(_) => 409,
        _ => 503,
    }
}

/// Opens the node in `dir` (blocking: it restores the state from disk).
pub fn open(dir: &Path) -> anyhow::Result<Node> {
    Node::open(NodeConfig::new(dir))
        .with_context(|| format!("opening a tally node in {}", dir.display()))
}

impl Embedded {
    pub fn new(node: Node, workload: Workload, keys: usize, run_id: String) -> Self {
        Self {
            node,
            workload,
            keys,
            attributes: (0..keys).map(attributes).collect(),
            run_id,
        }
    }

    pub fn generator(&self, connection: usize) -> EmbeddedGen {
        EmbeddedGen { connection, n: 0 }
    }

    fn check(&self, key: usize) -> u16 {
        let owned = &self.attributes[key];
        let pairs: [(&str, &str); 5] = std::array::from_fn(|i| (owned[i].0, owned[i].1.as_str()));
        let reply = self.node.check(&pairs, amounts());
        // A denial is an answer (200), as over HTTP; the reply is used so that it is built.
        std::hint::black_box(&reply);
        200
    }

    async fn record(&self, connection: usize, n: u64) -> u16 {
        let key = key_for(connection, n, self.keys);
        let record = UsageRecord {
            id: usage_id(connection, n, &self.run_id),
            attributes: self.attributes[key]
                .iter()
                .map(|(name, value)| ((*name).to_owned(), value.clone()))
                .collect(),
            amounts: amounts(),
            at_ms: None,
            reservation: None,
        };
        match self.node.record(vec![record]).await {
            Ok(_) => 200,
            Err(error) => status_of(&error),
        }
    }
}

impl Protocol for Embedded {
    type Conn = ();
    type Gen = EmbeddedGen;

    async fn connect(&self) -> anyhow::Result<()> {
        Ok(())
    }

    async fn call(&self, _conn: &mut (), generator: &mut EmbeddedGen) -> anyhow::Result<u16> {
        let n = generator.n;
        generator.n += 1;
        let status = match self.workload {
            Workload::Check => {
                let status = self.check(key_for(generator.connection, n, self.keys));
                tokio::task::yield_now().await;
                status
            }
            Workload::Record => self.record(generator.connection, n).await,
        };
        Ok(status)
    }
}

/// `--setup` in process: puts every planned limit the node does not already have
/// (`connections` concurrent callers; each put is its own durable commit, as over HTTP).
/// Returns how many it created.
pub async fn create_limits(
    node: &Node,
    plan: LimitPlan,
    connections: usize,
) -> anyhow::Result<usize> {
    let period: Period = LIMIT_PERIOD
        .parse()
        .map_err(|error| anyhow::anyhow!("period {LIMIT_PERIOD}: {error:?}"))?;
    let next = Arc::new(AtomicUsize::new(0));
    let created = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..connections.clamp(1, plan.total()))
        .map(|_| {
            let node = node.clone();
            let next = Arc::clone(&next);
            let created = Arc::clone(&created);
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= plan.total() {
                        return Ok(());
                    }
                    let parts = plan.parts(n);
                    if node.limit(&parts.id).is_some() {
                        continue;
                    }
                    let input = LimitInput {
                        scope: [(parts.dimension.to_owned(), parts.value)].into(),
                        metric: Metric::Cost,
                        max: LIMIT_MAX_MICROS,
                        period,
                        calendar_aligned: false,
                        timezone: "UTC".to_owned(),
                        mode: Default::default(),
                        members: Vec::new(),
                    };
                    if let Err(error) = node.put_limit(&parts.id, input).await {
                        next.store(plan.total(), Ordering::Relaxed);
                        bail!("put limit {}: {error}", parts.id);
                    }
                    created.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let mut first_error = None;
    for worker in workers {
        if let Err(error) = worker.await.context("setup worker panicked")? {
            first_error.get_or_insert(error);
        }
    }
    first_error.map_or(Ok(created.load(Ordering::Relaxed)), Err)
}

/// How many limits apply to key 0, by the node's own check.
pub fn probe(node: &Node) -> usize {
    let owned = attributes(0);
    let pairs: [(&str, &str); 5] = std::array::from_fn(|i| (owned[i].0, owned[i].1.as_str()));
    node.check(&pairs, amounts()).limits.len()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::run::{RunConfig, run};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn checks_and_records_in_process() {
        let dir = tempfile::tempdir().unwrap();
        let node = tokio::task::spawn_blocking({
            let dir = dir.path().to_owned();
            move || open(&dir)
        })
        .await
        .unwrap()
        .unwrap();
        let plan = LimitPlan::new(20, 2).unwrap();
        assert_eq!(create_limits(&node, plan, 4).await.unwrap(), 20);
        // A second setup finds everything in place.
        assert_eq!(create_limits(&node, plan, 4).await.unwrap(), 0);
        assert_eq!(probe(&node), 5);

        let config = RunConfig {
            connections: 3,
            warmup: Duration::from_millis(20),
            duration: Duration::from_millis(500),
            request_timeout: Duration::from_secs(5),
        };
        for workload in [Workload::Check, Workload::Record] {
            let embedded = Arc::new(Embedded::new(node.clone(), workload, 2, "t".into()));
            let generators = Arc::clone(&embedded);
            let stats = run(embedded, |c| generators.generator(c), config).await;
            // Not a speed test (durable records wait for fsyncs, and CI machines are
            // shared): answers came, none failed.
            assert!(stats.requests >= 1, "{workload:?}: {}", stats.requests);
            assert_eq!(stats.errors(), 0, "{workload:?}");
        }
        let used = node.limit("load-model-gpt-4o").unwrap().report.used;
        assert!(used > 0 && used % REQUEST_COST_MICROS == 0, "used {used}");
        node.shutdown().await;
    }
}
