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
//! `cpu_us` is this process's CPU time (all threads, user + system) per request in the
//! window: the client's cost, which on a small machine shares the cores with the server
//! (in the embedded mode it is the whole cost, tally's writer thread included).
//!
//! **How.** A tokio multi-thread runtime with `--threads` workers (default 1, to leave the
//! other core of a small machine to the server) runs one task per connection
//! (`run`), each with its own log-linear histogram (`histogram`), merged at the end.
//! A warmup phase runs the same loop uncounted. `--setup` first creates the limit set the
//! `check`/`record` scenarios are designed around (`workload`, `setup`): many limits, of
//! which exactly five apply to each request.
//!
//! **Other systems on the same terms.** `--mode redis --url redis://HOST:PORT` runs the
//! check and record workloads against a central Redis, one `EVALSHA` of a Lua script per
//! request over the same closed loop (`redis`, `resp`); `--mode embedded --data-dir DIR`
//! calls tally's embeddable `Node` API in this process instead of going over HTTP
//! (`embedded`). The histogram, windows and output are the same in every mode.
//!
//! Output is one `key=value` line on stdout, or one JSON object with `--json`; setup
//! progress and error breakdowns go to stderr.

mod client;
mod embedded;
mod histogram;
mod redis;
mod resp;
mod run;
mod setup;
mod workload;

/// The same allocator as the `tally` binary, so the embedded mode measures tally as it is
/// shipped, and the client's own allocations cost as little as possible in every mode.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, ensure};
use clap::{Parser, ValueEnum};
use hyper::Method;
use hyper::body::Bytes;
use serde_json::json;

use crate::client::{Http, RequestTemplate, Target};
use crate::embedded::Embedded;
use crate::redis::Redis;
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

/// What the load generator talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// A tally server (or any HTTP server, with --scenario raw) at --url http://...
    Http,
    /// A Redis server at --url redis://HOST:PORT: check = EVALSHA of a check-and-increment
    /// script, record = EVALSHA of an idempotent 5-counter increment.
    Redis,
    /// tally's Node API in this process, on --data-dir (no HTTP).
    Embedded,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Redis => "redis",
            Self::Embedded => "embedded",
        }
    }
}

/// Closed-loop HTTP/1.1 load generator for tally.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Server root: http://HOST:PORT, or redis://HOST:PORT with --mode redis
    /// [default: http://127.0.0.1:7070, or redis://127.0.0.1:6379].
    #[arg(long)]
    url: Option<String>,
    #[arg(long, value_enum, default_value_t = Mode::Http)]
    mode: Mode,
    /// embedded only: the node's data directory (created if missing).
    #[arg(long)]
    data_dir: Option<PathBuf>,
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
    /// never match. In Redis mode, --setup writes their maxima.
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
    /// --setup creates hard limits, and checks reserve on them (`"reserve":true`, 1 s).
    #[arg(long)]
    hard: bool,
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
    workload::set_hard(cli.hard);
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
            cli.target_name()
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
        ensure!(
            cli.mode == Mode::Http,
            "--scenario raw is for --mode http only"
        );
    } else {
        ensure!(
            cli.path.is_none() && cli.body.is_none() && cli.method.is_none(),
            "--path, --body and --method apply to the raw scenario only"
        );
    }
    match cli.mode {
        Mode::Embedded => {
            ensure!(cli.data_dir.is_some(), "--mode embedded needs --data-dir");
            ensure!(cli.url.is_none(), "--mode embedded takes no --url");
        }
        Mode::Http | Mode::Redis => ensure!(
            cli.data_dir.is_none(),
            "--data-dir applies to --mode embedded only"
        ),
    }
    if cli.mode == Mode::Redis {
        resp::parse_url(&cli.url())?;
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

impl Cli {
    /// --url, or the mode's default.
    fn url(&self) -> String {
        match (&self.url, self.mode) {
            (Some(url), _) => url.clone(),
            (None, Mode::Redis) => "redis://127.0.0.1:6379".to_owned(),
            (None, _) => "http://127.0.0.1:7070".to_owned(),
        }
    }

    /// What the run talks to, for messages.
    fn target_name(&self) -> String {
        match (&self.data_dir, self.mode) {
            (Some(dir), Mode::Embedded) => format!("the node in {}", dir.display()),
            _ => self.url(),
        }
    }

    fn run_config(&self) -> RunConfig {
        RunConfig {
            connections: self.connections,
            warmup: Duration::from_secs_f64(self.warmup_secs),
            duration: Duration::from_secs_f64(self.duration_secs),
            request_timeout: Duration::from_secs_f64(self.timeout_secs),
        }
    }
}

async fn drive(cli: &Cli) -> anyhow::Result<RunStats> {
    match cli.mode {
        Mode::Http => drive_http(cli).await,
        Mode::Redis => drive_redis(cli).await,
        Mode::Embedded => drive_embedded(cli).await,
    }
}

/// Prints how a setup went and warns when the probe does not see five limits.
fn report_setup(plan: LimitPlan, created: usize, took: Duration, applicable: usize, how: &str) {
    eprintln!(
        "setup: created {created} of {} limits ({} matching, 5 per request) in {:.2}s \
         ({:.0}/s, {how})",
        plan.total(),
        plan.matching(),
        took.as_secs_f64(),
        created as f64 / took.as_secs_f64(),
    );
    if applicable != 5 {
        eprintln!("setup: WARNING: a probe check reports {applicable} applicable limits, not 5");
    }
}

async fn drive_http(cli: &Cli) -> anyhow::Result<RunStats> {
    let target = Target::parse(&cli.url(), cli.token.as_deref())?;
    if cli.setup {
        let plan = LimitPlan::new(cli.limits, cli.keys).map_err(anyhow::Error::msg)?;
        let started = Instant::now();
        setup::create_limits(Arc::new(target.clone()), plan, cli.setup_connections)
            .await
            .context("--setup")?;
        let took = started.elapsed();
        let applicable = setup::probe_applicable_limits(&target).await?;
        let how = format!(
            "PUT over {} connections",
            cli.setup_connections.min(plan.total())
        );
        report_setup(plan, plan.total(), took, applicable, &how);
    }

    let config = cli.run_config();
    let keys = cli.keys;
    let stats = match cli.scenario {
        Scenario::Check => {
            let template = RequestTemplate::new(&target, Method::POST, "/v1/check", true)?;
            run::run(
                Arc::new(Http::new(target, template)),
                |connection| BodyGen::check(connection, keys),
                config,
            )
            .await
        }
        Scenario::Record => {
            let template = RequestTemplate::new(&target, Method::POST, "/v1/usage", true)?;
            let run_id = run_id();
            run::run(
                Arc::new(Http::new(target, template)),
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
                Arc::new(Http::new(target, template)),
                |_| BodyGen::fixed(body.clone()),
                config,
            )
            .await
        }
    };
    Ok(stats)
}

async fn drive_redis(cli: &Cli) -> anyhow::Result<RunStats> {
    let addr = resp::parse_url(&cli.url())?;
    let workload = match cli.scenario {
        Scenario::Check => redis::Workload::Check,
        Scenario::Record => redis::Workload::Record,
        Scenario::Raw => unreachable!("validated"),
    };
    let redis = Arc::new(
        Redis::new(addr, workload, cli.keys, run_id())
            .await
            .context("loading the Lua script")?,
    );
    if cli.setup {
        let plan = LimitPlan::new(cli.limits, cli.keys).map_err(anyhow::Error::msg)?;
        let started = Instant::now();
        redis::create_limits(addr, plan).await.context("--setup")?;
        let took = started.elapsed();
        let probe = Redis::new(addr, redis::Workload::Check, cli.keys, run_id()).await?;
        let applicable = redis::probe(&probe).await?;
        report_setup(plan, plan.total(), took, applicable, "pipelined MSET");
    }
    let generators = Arc::clone(&redis);
    Ok(run::run(
        redis,
        |connection| generators.generator(connection),
        cli.run_config(),
    )
    .await)
}

async fn drive_embedded(cli: &Cli) -> anyhow::Result<RunStats> {
    let dir = cli.data_dir.clone().expect("validated");
    let started = Instant::now();
    let node = tokio::task::spawn_blocking(move || embedded::open(&dir))
        .await
        .context("opening the node panicked")??;
    eprintln!(
        "embedded: opened node {} in {:.2}s",
        node.node_id(),
        started.elapsed().as_secs_f64()
    );
    if cli.setup {
        let plan = LimitPlan::new(cli.limits, cli.keys).map_err(anyhow::Error::msg)?;
        let started = Instant::now();
        let created = embedded::create_limits(&node, plan, cli.setup_connections)
            .await
            .context("--setup")?;
        let how = format!("Node::put_limit from {} tasks", cli.setup_connections);
        report_setup(
            plan,
            created,
            started.elapsed(),
            embedded::probe(&node),
            &how,
        );
    }
    let workload = match cli.scenario {
        Scenario::Check => embedded::Workload::Check,
        Scenario::Record => embedded::Workload::Record,
        Scenario::Raw => unreachable!("validated"),
    };
    let protocol = Arc::new(Embedded::new(node.clone(), workload, cli.keys, run_id()));
    let generators = Arc::clone(&protocol);
    let stats = run::run(
        protocol,
        |connection| generators.generator(connection),
        cli.run_config(),
    )
    .await;
    node.shutdown().await;
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
    mode: &'static str,
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
    /// This process's CPU time per request in the window, µs; -1 when unknown.
    cpu_us: f64,
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
            mode: cli.mode.name(),
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
            cpu_us: match stats.process_cpu_secs {
                Some(secs) if stats.requests > 0 => {
                    (secs * 1e6 / stats.requests as f64 * 100.0).round() / 100.0
                }
                _ => -1.0,
            },
            stats: stats.clone(),
        }
    }

    fn line(&self) -> String {
        format!(
            "mode={} scenario={} conns={} threads={} secs={} requests={} rps={:.1} \
             mean_us={:.1} p50_us={:.1} p90_us={:.1} p99_us={:.1} p999_us={:.1} max_us={:.1} \
             errors={} cpu_us={:.2}",
            self.mode,
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
            self.cpu_us,
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
            "mode": self.mode,
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
            "cpu_us": self.cpu_us,
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
        assert_eq!(cli.url(), "http://127.0.0.1:7070");
        assert_eq!(cli.mode, Mode::Http);
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
            &["--mode", "embedded"],
            &[
                "--mode",
                "embedded",
                "--data-dir",
                "d",
                "--url",
                "http://h:1",
            ],
            &["--data-dir", "d"],
            &["--mode", "redis", "--url", "http://127.0.0.1:1"],
            &["--mode", "redis", "--scenario", "raw"],
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
        let redis = cli(&["--mode", "redis", "--scenario", "record"]);
        validate(&redis).unwrap();
        assert_eq!(redis.url(), "redis://127.0.0.1:6379");
        validate(&cli(&["--mode", "embedded", "--data-dir", "d", "--setup"])).unwrap();
    }

    #[test]
    fn summary_has_the_same_fields_in_both_forms() {
        let mut stats = RunStats {
            requests: 4,
            transport_errors: 1,
            process_cpu_secs: Some(0.000_002),
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
            "mode=http scenario=check conns=32 threads=1 secs=2 requests=4 rps=2.0 mean_us=20.0 \
             p50_us=20.1 p90_us=30.0 p99_us=30.0 p999_us=30.0 max_us=30.0 errors=2 cpu_us=0.50"
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
