//! Prometheus text exposition of the node's counters.

use std::fmt::{Display, Write as _};

use tally_node::{Metrics, Node};

fn metric(out: &mut String, kind: &str, name: &str, help: &str, v: impl Display) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
    );
}

pub fn render(node: &Node) -> String {
    let m = node.metrics();
    let g = Metrics::get;
    let mut out = String::with_capacity(2048);
    let o = &mut out;
    metric(
        o,
        "counter",
        "tally_checks_total",
        "Checks answered.",
        g(&m.checks_total),
    );
    metric(
        o,
        "counter",
        "tally_checks_denied_total",
        "Checks answered with a denial.",
        g(&m.checks_denied_total),
    );
    metric(
        o,
        "counter",
        "tally_records_applied_total",
        "Usage records applied.",
        g(&m.records_applied_total),
    );
    metric(
        o,
        "counter",
        "tally_records_duplicate_total",
        "Usage records whose id was already applied (not counted again).",
        g(&m.records_duplicate_total),
    );
    metric(
        o,
        "counter",
        "tally_commits_total",
        "Durable group commits of records.",
        g(&m.commits_total),
    );
    metric(
        o,
        "counter",
        "tally_commit_records_total",
        "Records in group commits.",
        g(&m.commit_records_total),
    );
    metric(
        o,
        "counter",
        "tally_commit_seconds_total",
        "Time spent in group commits, seconds.",
        g(&m.commit_seconds_micros_total) as f64 / 1e6,
    );
    metric(
        o,
        "counter",
        "tally_commit_errors_total",
        "Commits that failed (nothing of them was acknowledged).",
        g(&m.commit_errors_total),
    );
    metric(
        o,
        "counter",
        "tally_queue_rejected_total",
        "Writes refused with 503 because the write queue stayed full.",
        g(&m.queue_rejected_total),
    );
    metric(
        o,
        "counter",
        "tally_dedup_expired_total",
        "Idempotency ids expired.",
        g(&m.dedup_expired_total),
    );
    metric(
        o,
        "gauge",
        "tally_queue_depth",
        "Records waiting for the writer.",
        node.queue_depth(),
    );
    metric(
        o,
        "gauge",
        "tally_slots",
        "(limit, epoch, origin) slots in memory.",
        node.slot_count(),
    );
    out
}
