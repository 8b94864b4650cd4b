//! Prometheus text exposition of the node's counters.

use std::fmt::{Display, Write as _};

use tally_node::{Metrics, Node};

fn metric(out: &mut String, kind: &str, name: &str, help: &str, v: impl Display) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
    );
}

pub async fn render(node: &Node) -> String {
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
        "tally_hard_overrun_total",
        "Hard limits: usage recorded beyond the rights this node held (the only way a hard limit's total can pass its max).",
        g(&m.hard_overrun_total),
    );
    metric(
        o,
        "counter",
        "tally_rights_granted_total",
        "Hard limits: rights this node granted to other nodes.",
        g(&m.rights_granted_total),
    );
    metric(
        o,
        "counter",
        "tally_rights_asked_total",
        "Hard limits: rights this node asked other nodes for.",
        g(&m.rights_asked_total),
    );
    metric(
        o,
        "counter",
        "tally_reservations_expired_total",
        "Hard limits: reservations released because they expired unsettled.",
        g(&m.reservations_expired_total),
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
        "counter",
        "tally_history_slots_dropped_total",
        "Stored slots of closed epochs dropped after the history retention.",
        g(&m.history_slots_dropped_total),
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
        "tally_reservations_open",
        "Hard limits: reservations open on this node.",
        node.open_reservations(),
    );
    metric(
        o,
        "gauge",
        "tally_slots",
        "(limit, epoch, origin) slots in memory.",
        node.slot_count(),
    );
    metric(
        o,
        "gauge",
        "tally_ready",
        "1 when caught up with the fleet and able to store writes.",
        u8::from(node.ready()),
    );
    metric(
        o,
        "gauge",
        "tally_storage_health",
        "0 when writes can be stored, 1 while the disk is full, 2 after the disk failed (restart the node).",
        node.storage_health() as u8,
    );
    if let Some(st) = node.gossip_stats() {
        let r = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        metric(
            o,
            "counter",
            "tally_gossip_bytes_sent_total",
            "Gossip bytes sent.",
            r(&st.bytes_sent),
        );
        metric(
            o,
            "counter",
            "tally_gossip_bytes_received_total",
            "Gossip bytes received.",
            r(&st.bytes_received),
        );
        metric(
            o,
            "counter",
            "tally_gossip_values_rejected_total",
            "Gossip values ignored: MAC check failed or malformed (wrong cluster key?).",
            r(&st.values_rejected),
        );
        metric(
            o,
            "counter",
            "tally_gossip_values_dropped_total",
            "Gossip values dropped because the node was behind (re-read from gossip state later).",
            r(&st.values_dropped),
        );
        metric(
            o,
            "counter",
            "tally_gossip_resyncs_total",
            "Times every peer's gossip state was re-read after values were dropped.",
            r(&st.resyncs),
        );
        metric(
            o,
            "counter",
            "tally_gossip_datagrams_invalid_total",
            "Datagrams on the gossip port that were not chitchat messages (dropped).",
            crate::logging::gossip_datagrams_invalid(),
        );
        metric(
            o,
            "counter",
            "tally_gossip_values_accepted_total",
            "Gossip values accepted.",
            r(&st.values_accepted),
        );
    }
    if let Some(members) = node.members().await {
        let live = members.iter().filter(|m| m.live).count();
        metric(
            o,
            "gauge",
            "tally_gossip_live_nodes",
            "Live nodes, this one included.",
            live,
        );
        metric(
            o,
            "gauge",
            "tally_gossip_dead_nodes",
            "Nodes known but not live.",
            members.len() - live,
        );
        let name = "tally_gossip_peer_newest_value_age_seconds";
        let _ = writeln!(
            o,
            "# HELP {name} Seconds since a value from this peer was last accepted.\n# TYPE {name} gauge"
        );
        for m in members.iter().filter(|m| m.node_id != node.node_id()) {
            if let Some(age) = m.newest_value_age {
                let _ = writeln!(o, "{name}{{peer=\"{}\"}} {}", m.node_id, age.as_secs_f64());
            }
        }
    }
    out
}
