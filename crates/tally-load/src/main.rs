//! tally-load: a closed-loop HTTP/1.1 load generator for benchmarking tally (and, with the
//! `raw` scenario, any other HTTP server on the same terms).
//!
//! **What it measures.** Throughput (`rps`) and the latency distribution (mean, p50, p90,
//! p99, p99.9, max) that `--connections` concurrent clients see, each client a single
//! keep-alive HTTP/1.1 connection that sends a request, waits for the complete response,
//! and immediately sends the next (closed loop: no pipelining, no fixed arrival rate, so
//! queueing shows up as lower throughput rather than as unbounded latency). Latency is
//! wall time from handing the request to the connection to having read the whole body.
//! Non-2xx answers and transport failures are errors; more than 1% fails the run.
//!
//! **How.** A tokio multi-thread runtime with `--threads` workers (default 1, to leave the
//! other core of a small machine to the server) runs one task per connection
//! (`run`), each with its own log-linear histogram (`histogram`), merged at the end.
//! A warmup phase runs the same loop uncounted. `--setup` first creates the limit set the
//! `check`/`record` scenarios are designed around (`workload`, `setup`): many limits, of
//! which exactly five apply to each request.
//!
//! Output is one `key=value` line on stdout, or one JSON object with `--json`; setup
//! progress and error breakdowns go to stderr.

mod client;
mod histogram;
mod run;
mod setup;
mod workload;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, ensure};
use clap::{Parser, ValueEnum};
use hyper::Method;
use hyper::body::Bytes;
use serde_json::json;

use crate::client::{RequestTemplate, Target};
use crate::run::{RunConfig, RunStats};
use crate::workload::{BodyGen, LimitPlan, check_body};

const CONNECTIONS_MAX: usize = 10_000;
const THREADS_MAX: usize = 256;
const DURATION_MAX_SECS: f64 = 24.0 * 3600.0;
/// More than this share of errors (non-2xx or transport) fails the run.
const ERROR_RATE_MAX: f64 = 0.01;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// POST /v1/check, cycling over --keys attribute sets.
    Check,
    /// POST /v1/usage with a unique id per request.
    Record,
    /// --method --path with a fixed --body, for comparing other servers.
    Raw,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Self::Check => "check",
            Self::Record => "record",
            Self::Raw => "raw",
        }
    }
}

/// Closed-loop HTTP/1.1 load generator for tally.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Server root (http only).
    #[arg(long, default_value = "http://127.0.0.1:7070")]
    url: String,
    #[arg(long, value_enum, default_value_t = Scenario::Check)]
    scenario: Scenario,
    /// Concurrent keep-alive connections, one request in flight on each.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Length of the measured window.
    #[arg(long, default_value_t = 10.0)]
    duration_secs: f64,
    /// Uncounted load before the measured window.
    #[arg(long, default_value_t = 2.0)]
    warmup_secs: f64,
    /// tokio worker threads driving the connections.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Bearer token for every request (an admin token is needed for --setup).
    #[arg(long, env = "TALLY_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Before the run, create --limits limits (check/record only).
    #[arg(long)]
    setup: bool,
    /// Limits --setup creates; 3*keys+2 match generated requests (5 per request), the rest
    /// never match.
    #[arg(long, default_value_t = 100_000)]
    limits: usize,
    /// Distinct attribute sets (vk-i/team-i/cust-i) requests cycle over.
    #[arg(long, default_value_t = 1)]
    keys: usize,
    /// Concurrent connections used by --setup.
    #[arg(long, default_value_t = 32)]
    setup_connections: usize,
    /// raw only: request path [default: /v1/check].
    #[arg(long)]
    path: Option<String>,
    /// raw only: request body [default: a check body for POST, empty for GET/HEAD].
    #[arg(long)]
    body: Option<String>,
    /// raw only: request method [default: POST].
    #[arg(long)]
    method: Option<String>,
    /// A request unanswered for this long is an error (and its connection is replaced).
    #[arg(long, default_value_t = 10.0)]
    timeout_secs: f64,
    /// Print the summary as one JSON object instead of key=value.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    match main_inner() {
        Ok(code) => code,
        Err(error) => {
            eprintln!("tally-load: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn main_inner() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    validate(&cli)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.threads)
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    let stats = runtime.block_on(drive(&cli))?;
    debug_assert!(stats.latency.count() <= stats.requests);
    let summary = Summary::new(&cli, &stats);
    if cli.json {
        println!("{}", summary.json());
    } else {
        println!("{}", summary.line());
    }
    if stats.errors() > 0 {
        eprintln!(
            "errors: {} transport, by status {:?}",
            stats.transport_errors, stats.error_statuses
        );
    }
    if stats.requests == 0 {
        eprintln!(
            "tally-load: no request to {} completed in the measured window",
            cli.url
        );
        return Ok(ExitCode::FAILURE);
    }
    let error_rate = stats.errors() as f64 / stats.requests as f64;
    if error_rate > ERROR_RATE_MAX {
        eprintln!(
            "tally-load: error rate {:.2}% exceeds {:.0}%",
            error_rate * 100.0,
            ERROR_RATE_MAX * 100.0
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn validate(cli: &Cli) -> anyhow::Result<()> {
    ensure!(
        (1..=CONNECTIONS_MAX).contains(&cli.connections),
        "--connections must be in 1..={CONNECTIONS_MAX}"
    );
    ensure!(
        (1..=THREADS_MAX).contains(&cli.threads),
        "--threads must be in 1..={THREADS_MAX}"
    );
    ensure!(
        (1..=CONNECTIONS_MAX).contains(&cli.setup_connections),
        "--setup-connections must be in 1..={CONNECTIONS_MAX}"
    );
    ensure!(
        cli.duration_secs > 0.0 && cli.duration_secs <= DURATION_MAX_SECS,
        "--duration-secs must be in (0, {DURATION_MAX_SECS}]"
    );
    ensure!(
        cli.warmup_secs >= 0.0 && cli.warmup_secs <= DURATION_MAX_SECS,
        "--warmup-secs must be in [0, {DURATION_MAX_SECS}]"
    );
    ensure!(
        cli.timeout_secs > 0.0 && cli.timeout_secs <= DURATION_MAX_SECS,
        "--timeout-secs must be in (0, {DURATION_MAX_SECS}]"
    );
    if cli.scenario == Scenario::Raw {
        ensure!(
            !cli.setup,
            "--setup applies to the check and record scenarios"
        );
    } else {
        ensure!(
            cli.path.is_none() && cli.body.is_none() && cli.method.is_none(),
            "--path, --body and --method apply to the raw scenario only"
        );
    }
    // Validates --keys (and --limits, which only matters with --setup).
    let plan = LimitPlan::new(cli.limits, cli.keys);
    if cli.setup {
        plan.map_err(anyhow::Error::msg)?;
    } else {
        LimitPlan::new(3 * cli.keys + 2, cli.keys).map_err(anyhow::Error::msg)?;
    }
    Ok(())
}

async fn drive(cli: &Cli) -> anyhow::Result<RunStats> {
    let target = Arc::new(Target::parse(&cli.url, cli.token.as_deref())?);
    if cli.setup {
        let plan = LimitPlan::new(cli.limits, cli.keys).map_err(anyhow::Error::msg)?;
        let started = Instant::now();
        setup::create_limits(Arc::clone(&target), plan, cli.setup_connections)
            .await
            .context("--setup")?;
        let took = started.elapsed();
        eprintln!(
            "setup: created {} limits ({} matching, 5 per request) in {:.2}s \
             ({:.0} PUT/s over {} connections)",
            plan.total(),
            plan.matching(),
            took.as_secs_f64(),
            plan.total() as f64 / took.as_secs_f64(),
            cli.setup_connections.min(plan.total()),
        );
        let applicable = setup::probe_applicable_limits(&target).await?;
        if applicable != 5 {
            eprintln!(
                "setup: WARNING: a probe check reports {applicable} applicable limits, not 5"
            );
        }
    }

    let config = RunConfig {
        connections: cli.connections,
        warmup: Duration::from_secs_f64(cli.warmup_secs),
        duration: Duration::from_secs_f64(cli.duration_secs),
        request_timeout: Duration::from_secs_f64(cli.timeout_secs),
    };
    let keys = cli.keys;
    let stats = match cli.scenario {
        Scenario::Check => {
            let template = RequestTemplate::new(&target, Method::POST, "/v1/check", true)?;
            run::run(
                target,
                Arc::new(template),
                |connection| BodyGen::check(connection, keys),
                config,
            )
            .await
        }
        Scenario::Record => {
            let template = RequestTemplate::new(&target, Method::POST, "/v1/usage", true)?;
            let run_id = run_id();
            run::run(
                target,
                Arc::new(template),
                |connection| BodyGen::usage(connection, keys, &run_id),
                config,
            )
            .await
        }
        Scenario::Raw => {
            let method = cli.method.as_deref().unwrap_or("POST").to_ascii_uppercase();
            let method = Method::from_bytes(method.as_bytes())
                .with_context(|| format!("bad --method {method:?}"))?;
            let body = match &cli.body {
                Some(body) => body.clone(),
                None if method == Method::GET || method == Method::HEAD => String::new(),
                None => check_body(0),
            };
            let path = cli.path.as_deref().unwrap_or("/v1/check");
            let template = RequestTemplate::new(&target, method, path, !body.is_empty())?;
            let body = Bytes::from(body);
            run::run(
                target,
                Arc::new(template),
                |_| BodyGen::fixed(body.clone()),
                config,
            )
            .await
        }
    };
    Ok(stats)
}

/// A per-invocation suffix for usage ids, so a rerun's records are not deduplicated
/// against the previous run's.
fn run_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos());
    format!("{nanos:x}")
}

/// The result of a run, in the units printed.
#[derive(Debug)]
struct Summary {
    scenario: &'static str,
    conns: usize,
    threads: usize,
    secs: f64,
    requests: u64,
    rps: f64,
    mean_us: f64,
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
    p999_us: f64,
    max_us: f64,
    errors: u64,
    stats: RunStats,
}

/// Nanoseconds to microseconds, to 0.1 µs.
fn micros(nanos: f64) -> f64 {
    (nanos / 100.0).round() / 10.0
}

impl Summary {
    fn new(cli: &Cli, stats: &RunStats) -> Self {
        let latency = &stats.latency;
        Self {
            scenario: cli.scenario.name(),
            conns: cli.connections,
            threads: cli.threads,
            secs: cli.duration_secs,
            requests: stats.requests,
            rps: (stats.requests as f64 / cli.duration_secs * 10.0).round() / 10.0,
            mean_us: micros(latency.mean()),
            p50_us: micros(latency.percentile(50.0) as f64),
            p90_us: micros(latency.percentile(90.0) as f64),
            p99_us: micros(latency.percentile(99.0) as f64),
            p999_us: micros(latency.percentile(99.9) as f64),
            max_us: micros(latency.max() as f64),
            errors: stats.errors(),
            stats: stats.clone(),
        }
    }

    fn line(&self) -> String {
        format!(
            "scenario={} conns={} threads={} secs={} requests={} rps={:.1} mean_us={:.1} \
             p50_us={:.1} p90_us={:.1} p99_us={:.1} p999_us={:.1} max_us={:.1} errors={}",
            self.scenario,
            self.conns,
            self.threads,
            self.secs,
            self.requests,
            self.rps,
            self.mean_us,
            self.p50_us,
            self.p90_us,
            self.p99_us,
            self.p999_us,
            self.max_us,
            self.errors,
        )
    }

    fn json(&self) -> serde_json::Value {
        let error_statuses: serde_json::Map<String, serde_json::Value> = self
            .stats
            .error_statuses
            .iter()
            .map(|(status, count)| (status.to_string(), json!(count)))
            .collect();
        json!({
            "scenario": self.scenario,
            "conns": self.conns,
            "threads": self.threads,
            "secs": self.secs,
            "requests": self.requests,
            "rps": self.rps,
            "mean_us": self.mean_us,
            "p50_us": self.p50_us,
            "p90_us": self.p90_us,
            "p99_us": self.p99_us,
            "p999_us": self.p999_us,
            "max_us": self.max_us,
            "errors": self.errors,
            "error_statuses": error_statuses,
            "transport_errors": self.stats.transport_errors,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("tally-load").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn defaults_match_the_documented_invocation() {
        let cli = cli(&[]);
        assert_eq!(cli.url, "http://127.0.0.1:7070");
        assert_eq!(cli.scenario, Scenario::Check);
        assert_eq!((cli.connections, cli.threads, cli.keys), (32, 1, 1));
        assert_eq!((cli.duration_secs, cli.warmup_secs), (10.0, 2.0));
        assert_eq!(cli.limits, 100_000);
        validate(&cli).unwrap();
    }

    #[test]
    fn validation_rejects_mismatched_options() {
        for args in [
            &["--scenario", "raw", "--setup"][..],
            &["--path", "/x"],
            &["--connections", "0"],
            &["--duration-secs", "0"],
            &["--setup", "--limits", "4"],
            &["--keys", "0"],
        ] {
            assert!(validate(&cli(args)).is_err(), "{args:?} accepted");
        }
        validate(&cli(&[
            "--scenario",
            "raw",
            "--method",
            "get",
            "--path",
            "/",
        ]))
        .unwrap();
        validate(&cli(&["--setup", "--limits", "5"])).unwrap();
    }

    #[test]
    fn summary_has_the_same_fields_in_both_forms() {
        let mut stats = RunStats {
            requests: 4,
            transport_errors: 1,
            ..RunStats::default()
        };
        stats.error_statuses.insert(503, 1);
        for nanos in [10_000, 20_000, 30_000] {
            stats.latency.record(nanos);
        }
        let summary = Summary::new(&cli(&["--duration-secs", "2"]), &stats);
        let line = summary.line();
        // p50 is 20 µs reported as its bucket's highest value, 20.095 µs (see
        // Histogram::percentile); p90 and above are clamped to the exact max.
        assert_eq!(
            line,
            "scenario=check conns=32 threads=1 secs=2 requests=4 rps=2.0 mean_us=20.0 \
             p50_us=20.1 p90_us=30.0 p99_us=30.0 p999_us=30.0 max_us=30.0 errors=2"
        );
        let json = summary.json();
        for pair in line.split(' ') {
            let (key, value) = pair.split_once('=').unwrap();
            let field = &json[key];
            assert!(!field.is_null(), "{key} missing from JSON");
            match field.as_str() {
                Some(text) => assert_eq!(text, value),
                None => assert_eq!(field.as_f64().unwrap(), value.parse::<f64>().unwrap()),
            }
        }
        assert_eq!(json["error_statuses"]["503"], 1);
    }
}
