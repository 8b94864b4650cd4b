//! Prometheus text exposition of `/metrics` (docs/METRICS.md): the node's counters and
//! latency histograms, gossip, opt-in per-limit series, and the process's own metrics
//! read from `/proc`. Also the layer that times requests into the histograms.

use std::fmt::{Display, Write as _};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tally_core::Metric;
use tally_node::metrics::{Histogram, HistogramSnapshot};
use tally_node::{Metrics, Node};

use crate::http::AppState;

fn metric(out: &mut String, kind: &str, name: &str, help: &str, v: impl Display) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
    );
}

fn header(out: &mut String, kind: &str, name: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A label value as the text format wants it (ids never need it; be safe anyway).
fn label(v: &str) -> std::borrow::Cow<'_, str> {
    if v.contains(['\\', '"', '\n']) {
        v.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
            .into()
    } else {
        v.into()
    }
}

/// One histogram's samples; `labels` is `""` or `k="v",` (with the trailing comma).
fn histogram_samples(out: &mut String, name: &str, labels: &str, s: &HistogramSnapshot) {
    for (le, n) in &s.buckets {
        let _ = writeln!(out, "{name}_bucket{{{labels}le=\"{le}\"}} {n}");
    }
    let _ = writeln!(out, "{name}_bucket{{{labels}le=\"+Inf\"}} {}", s.count);
    let braces = |l: &str| {
        if l.is_empty() {
            String::new()
        } else {
            format!("{{{}}}", l.trim_end_matches(','))
        }
    };
    let _ = writeln!(out, "{name}_sum{} {}", braces(labels), s.sum_seconds);
    let _ = writeln!(out, "{name}_count{} {}", braces(labels), s.count);
}

fn histogram(out: &mut String, name: &str, help: &str, h: &Histogram) {
    header(out, "histogram", name, help);
    histogram_samples(out, name, "", &h.snapshot());
}

pub async fn render(node: &Node) -> String {
    let m = node.metrics();
    let g = Metrics::get;
    let mut out = String::with_capacity(8192);
    let o = &mut out;
    metric(
        o,
        "counter",
        "tally_checks_total",
        "Checks answered (HTTP, forward-auth, Envoy RLS).",
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
    histogram(
        o,
        "tally_check_duration_seconds",
        "POST /v1/check: from the request reaching its route to the reply, any status.",
        &m.check_seconds,
    );
    let name = "tally_record_duration_seconds";
    header(
        o,
        "histogram",
        name,
        "POST /v1/usage and /v1/usage/batch: from the request reaching its route to the reply, after the records are durable (any status).",
    );
    histogram_samples(o, name, "endpoint=\"usage\",", &m.record_seconds.snapshot());
    histogram_samples(
        o,
        name,
        "endpoint=\"usage_batch\",",
        &m.record_batch_seconds.snapshot(),
    );
    histogram(
        o,
        "tally_commit_duration_seconds",
        "Durable group commits of records by the writer: the transaction through its fsync (the count is the number of commits).",
        &m.commit_seconds,
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
            "tally_gossip_sent_bytes_total",
            "Gossip bytes sent: UDP payloads of chitchat messages as its transport reports them (IP/UDP headers not included).",
            r(&st.bytes_sent),
        );
        metric(
            o,
            "counter",
            "tally_gossip_received_bytes_total",
            "Gossip bytes received: UDP payloads that decoded as chitchat messages (IP/UDP headers and invalid datagrams not included).",
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
        histogram(
            o,
            "tally_gossip_lag_seconds",
            "Per hello merged from a peer: from the commit (or sweep) time the peer stamped in it, by its clock, to this node having durably merged everything the peer published before it, by this node's clock (clock offset included, negative counted as 0).",
            &m.gossip_lag_seconds,
        );
        let name = "tally_gossip_peer_lag_seconds";
        header(
            o,
            "gauge",
            name,
            "Gossip lag of the newest hello merged from this peer (see tally_gossip_lag_seconds).",
        );
        for (peer, lag) in node.gossip_lags() {
            let _ = writeln!(
                o,
                "{name}{{peer=\"{}\"}} {}",
                label(&peer),
                lag.as_secs_f64()
            );
        }
    }
    if let Some(members) = node.members().await {
        let live = members.iter().filter(|m| m.live && m.verified).count();
        metric(
            o,
            "gauge",
            "tally_gossip_live_nodes",
            "Live nodes holding the cluster key, this one included.",
            live,
        );
        metric(
            o,
            "gauge",
            "tally_gossip_dead_nodes",
            "Nodes known but not live (or not holding the cluster key).",
            members.len() - live,
        );
        let name = "tally_gossip_peer_newest_value_age_seconds";
        header(
            o,
            "gauge",
            name,
            "Seconds since a value from this peer was last accepted.",
        );
        for m in members.iter().filter(|m| m.node_id != node.node_id()) {
            if let Some(age) = m.newest_value_age {
                let _ = writeln!(
                    o,
                    "{name}{{peer=\"{}\"}} {}",
                    label(&m.node_id),
                    age.as_secs_f64()
                );
            }
        }
    }
    render_limits(o, node);
    render_process(o);
    out
}

/// A limit's amount in the unit the API shows: USD for cost, else the count.
fn in_api_units(metric: Metric, v: u64) -> f64 {
    match metric {
        Metric::Cost => v as f64 / 1e6,
        _ => v as f64,
    }
}

/// Per-limit series, only with `--metrics-limits N`: `used` and `max` of the N limits
/// closest to their max (highest used/max, then id), and denials per limit for the first
/// N limits that denied.
fn render_limits(o: &mut String, node: &Node) {
    let cap = node.denials_by_limit_max();
    if cap == 0 {
        return;
    }
    let mut usages = node.limit_usages();
    metric(
        o,
        "gauge",
        "tally_limits",
        "Live limits on this node.",
        usages.len(),
    );
    let ratio = |u: &tally_node::LimitUsage| u.used as f64 / u.max.max(1) as f64;
    usages.sort_by(|a, b| ratio(b).total_cmp(&ratio(a)).then_with(|| a.id.cmp(&b.id)));
    usages.truncate(cap);
    usages.sort_by(|a, b| a.id.cmp(&b.id));
    for (name, help, used) in [
        (
            "tally_limit_used",
            "Usage of the limit's current period (USD for cost; only the --metrics-limits limits closest to their max).",
            true,
        ),
        (
            "tally_limit_max",
            "The limit's max (USD for cost; only the --metrics-limits limits closest to their max).",
            false,
        ),
    ] {
        header(o, "gauge", name, help);
        for u in &usages {
            let v = if used { u.used } else { u.max };
            let _ = writeln!(
                o,
                "{name}{{limit=\"{}\",metric=\"{}\"}} {}",
                label(&u.id),
                u.metric.as_str(),
                in_api_units(u.metric, v)
            );
        }
    }
    let denials = node.denials_by_limit();
    let name = "tally_limit_denials_total";
    header(
        o,
        "counter",
        name,
        "Checks denied by this limit (a check denied by two limits counts for each; only the first --metrics-limits limits that denied).",
    );
    let mut by: Vec<(&String, &u64)> = denials.by_limit.iter().collect();
    by.sort();
    for (id, n) in by {
        let _ = writeln!(o, "{name}{{limit=\"{}\"}} {n}", label(id));
    }
    metric(
        o,
        "counter",
        "tally_limit_denials_untracked_total",
        "Denials by limits past the --metrics-limits cap (not in tally_limit_denials_total).",
        denials.untracked,
    );
}

/// The kernel's clock ticks per second for `/proc` times (USER_HZ: 100 on every Linux
/// architecture tally builds for).
const USER_HZ: f64 = 100.0;

/// What `/proc` says of this process (Linux; nothing elsewhere).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub open_fds: u64,
    pub max_fds: Option<u64>,
    pub start_time_seconds: f64,
    pub threads: u64,
}

/// Reads this process's stats from `/proc`; `None` where it is not mounted.
pub fn process_stats() -> Option<ProcessStats> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name is in parentheses and may hold spaces: fields follow the last ')'.
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split(' ').collect();
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    let btime: u64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())?;
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib = |key: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))?
            .split_whitespace()
            .next()?
            .parse::<u64>()
            .ok()
            .map(|k| k * 1024)
    };
    let max_fds = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find_map(|l| l.strip_prefix("Max open files"))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        });
    Some(ProcessStats {
        cpu_seconds: (field(14)? + field(15)?) as f64 / USER_HZ,
        resident_bytes: kib("VmRSS:").unwrap_or(0),
        virtual_bytes: field(23)?,
        open_fds: std::fs::read_dir("/proc/self/fd").ok()?.count() as u64,
        max_fds,
        start_time_seconds: btime as f64 + field(22)? as f64 / USER_HZ,
        threads: field(20)?,
    })
}

fn render_process(o: &mut String) {
    let Some(p) = process_stats() else { return };
    metric(
        o,
        "counter",
        "process_cpu_seconds_total",
        "User and system CPU time of the process, seconds.",
        p.cpu_seconds,
    );
    metric(
        o,
        "gauge",
        "process_resident_memory_bytes",
        "Resident memory of the process (VmRSS).",
        p.resident_bytes,
    );
    metric(
        o,
        "gauge",
        "process_virtual_memory_bytes",
        "Virtual memory of the process.",
        p.virtual_bytes,
    );
    metric(
        o,
        "gauge",
        "process_open_fds",
        "Open file descriptors (sockets included).",
        p.open_fds,
    );
    if let Some(max) = p.max_fds {
        metric(
            o,
            "gauge",
            "process_max_fds",
            "Soft limit on open file descriptors.",
            max,
        );
    }
    metric(
        o,
        "gauge",
        "process_start_time_seconds",
        "When the process started, Unix seconds.",
        p.start_time_seconds,
    );
    metric(
        o,
        "gauge",
        "process_threads",
        "Threads of the process.",
        p.threads,
    );
}

// ----- timing requests -----------------------------------------------------------------

/// Which histogram a [`Timed`] route observes into.
#[derive(Clone, Copy, Debug)]
pub enum Timing {
    Check,
    Record,
    RecordBatch,
}

/// A handler timed from the moment axum hands it the request (before its body is read
/// and its extractors run) to its response being ready, whatever the status, into the
/// node's histogram. Wraps the handler itself rather than adding a layer, so the route
/// costs no extra boxing: per request, two `Instant` reads, one `Arc` clone and the
/// histogram's two atomic additions (BENCHMARKS.md).
#[derive(Clone)]
pub struct Timed<H> {
    inner: H,
    timing: Timing,
}

impl<H> Timed<H> {
    pub fn new(inner: H, timing: Timing) -> Timed<H> {
        Timed { inner, timing }
    }
}

impl<H, T> axum::handler::Handler<T, Arc<AppState>> for Timed<H>
where
    H: axum::handler::Handler<T, Arc<AppState>>,
    T: 'static,
{
    type Future = TimedFuture<H::Future>;

    fn call(self, req: axum::extract::Request, state: Arc<AppState>) -> Self::Future {
        let started = Instant::now();
        TimedFuture {
            inner: self.inner.call(req, state.clone()),
            started,
            timed: Some((state, self.timing)),
        }
    }
}

pin_project_lite::pin_project! {
    pub struct TimedFuture<F> {
        #[pin]
        inner: F,
        started: Instant,
        timed: Option<(Arc<AppState>, Timing)>,
    }
}

impl<F: Future> Future for TimedFuture<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let out = std::task::ready!(this.inner.poll(cx));
        if let Some((state, timing)) = this.timed.take() {
            let m = state.node.metrics();
            let h = match timing {
                Timing::Check => &m.check_seconds,
                Timing::Record => &m.record_seconds,
                Timing::RecordBatch => &m.record_batch_seconds,
            };
            h.observe(this.started.elapsed());
        }
        Poll::Ready(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_stats_are_read_from_proc() {
        let p = process_stats().expect("/proc is mounted on Linux");
        assert!(p.resident_bytes > 1 << 20, "{p:?}");
        assert!(p.virtual_bytes >= p.resident_bytes, "{p:?}");
        assert!(p.open_fds >= 3, "{p:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        // Started in the last hour (this test process), not in the future.
        assert!(
            p.start_time_seconds <= now + 1.0 && p.start_time_seconds > now - 3600.0,
            "{p:?} now {now}"
        );
        assert!(p.threads >= 1, "{p:?}");
        let f = std::fs::File::open("/proc/self/stat").unwrap();
        assert_eq!(process_stats().unwrap().open_fds, p.open_fds + 1);
        drop(f);
    }

    #[test]
    fn histograms_render_cumulative_buckets() {
        let h = Histogram::new(&[1_000_000, 10_000_000]);
        h.observe_ns(500_000);
        h.observe_ns(2_000_000);
        h.observe_ns(20_000_000);
        let mut out = String::new();
        histogram(&mut out, "x_seconds", "Help.", &h);
        assert_eq!(
            out,
            "# HELP x_seconds Help.\n# TYPE x_seconds histogram\n\
             x_seconds_bucket{le=\"0.001\"} 1\nx_seconds_bucket{le=\"0.01\"} 2\n\
             x_seconds_bucket{le=\"+Inf\"} 3\nx_seconds_sum 0.0225\nx_seconds_count 3\n"
        );
        let mut out = String::new();
        histogram_samples(&mut out, "y", "a=\"b\",", &h.snapshot());
        assert!(
            out.contains(
                "y_bucket{a=\"b\",le=\"+Inf\"} 3\ny_sum{a=\"b\"} 0.0225\ny_count{a=\"b\"} 3\n"
            ),
            "{out}"
        );
    }
}
