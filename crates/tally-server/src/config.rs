//! Configuration of `tally serve`: one [`ServeConfig`] resolved from flags, the
//! environment, an optional TOML file and defaults, in that order of precedence (API.md,
//! "Command line").
//!
//! The resolution is a pure function ([`ServeConfig::resolve`]) of the parsed flags, an
//! environment lookup and the file's text, so precedence is tested without touching the
//! process environment. This module validates shapes (addresses parse, numbers are in
//! range, the data directory is named) and the start-up security rule of DESIGN.md §4
//! ([`ServeConfig::validate_security`]); it does not open files other than the config
//! file, bind sockets, or know anything about the node runtime.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use serde::Deserialize;

use crate::cli::ServeArgs;

// The one table of `tally serve`'s defaults (API.md lists them): `ServeConfig::default`,
// the CLI's help and client URL, and, through tally-node's constants, `NodeConfig::new`
// all read these.

/// Default HTTP address: loopback only, so a node started with no flags is not reachable
/// from other hosts (DESIGN.md §4, Security).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";
/// Default URL of the client commands: the default listen address (a test holds the two
/// together; clap needs a literal).
pub const DEFAULT_URL: &str = "http://127.0.0.1:7070";
/// Default data directory, relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = "./tally-data";
/// Default cluster id.
pub const DEFAULT_CLUSTER_ID: &str = "tally";
/// Default gossip round interval.
pub const DEFAULT_GOSSIP_INTERVAL_MS: u64 = 100;
/// Default window during which a usage id is remembered for deduplication (one day).
pub const DEFAULT_DEDUP_WINDOW_SECS: u64 = (tally_node::DEDUP_WINDOW_DEFAULT_MS / 1000) as u64;
/// Default time closed periods are kept as history (a calendar month, and some days to
/// read it after the month ends).
pub const DEFAULT_HISTORY_RETENTION_DAYS: u64 =
    (tally_node::HISTORY_RETENTION_DEFAULT_MS / 86_400_000) as u64;
/// Default cap on a reservation's lifetime, seconds.
pub const DEFAULT_RESERVATION_TTL_MAX_SECS: u64 =
    (tally_node::RESERVATION_TTL_MAX_DEFAULT_MS / 1000) as u64;
/// Largest cap on a reservation's lifetime: a day (it is also the fence after a crash).
pub const RESERVATION_TTL_MAX_SECS_MAX: u64 = 86_400;
/// Default largest number of usage records the writer commits in one transaction.
pub const DEFAULT_BATCH_RECORDS_MAX: usize = tally_node::BATCH_RECORDS_MAX_DEFAULT;
/// Default capacity of the writer's queue, in records.
pub const DEFAULT_QUEUE_RECORDS_MAX: usize = tally_node::QUEUE_RECORDS_MAX_DEFAULT;
/// Default time a request waits for queue space before it is refused with 503.
pub const DEFAULT_QUEUE_WAIT_MS: u64 = tally_node::QUEUE_WAIT_DEFAULT_MS;
/// Default bound on Envoy rate limit wildcard instances (one limit per value seen).
pub const DEFAULT_RLS_INSTANCES_MAX: usize = 10_000;
/// Default time a node cut off from every peer stays ready.
pub const DEFAULT_ISOLATED_UNREADY_SECS: u64 = 10;
/// Default number of limits with their own series in /metrics: none (opt-in).
pub const DEFAULT_METRICS_LIMITS: usize = 0;
/// Most limits that may have their own series in /metrics: each costs 2 gauges and up to
/// one denial counter, so a Prometheus scraping 10 000 of them stores about 30 000 series.
pub const METRICS_LIMITS_MAX: usize = 10_000;

/// Upper bounds on tuning values: far above any sensible setting, low enough that a typo
/// (an extra few zeros) is reported instead of silently stalling or exhausting memory.
const GOSSIP_INTERVAL_MS_MAX: u64 = 60_000;
const DEDUP_WINDOW_SECS_MAX: u64 = 366 * 86_400;
const HISTORY_RETENTION_DAYS_MAX: u64 = 3_660;
const BATCH_RECORDS_MAX_MAX: usize = 1 << 20;
const QUEUE_RECORDS_MAX_MAX: usize = 1 << 24;
const QUEUE_WAIT_MS_MAX: u64 = 600_000;
const RLS_INSTANCES_MAX_MAX: usize = 1_000_000;
const ISOLATED_UNREADY_SECS_MAX: u64 = 30 * 86_400;
/// Ids (node id, cluster id) follow the API's id pattern `[A-Za-z0-9._:-]{1,128}`.
const ID_LEN_MAX: usize = 128;

/// Log output format. Only text is built in (tracing-subscriber's `json` feature is not
/// enabled); `json` is accepted so configs stay forward compatible, and `main` says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Everything `tally serve` needs to start, fully resolved and validated.
///
/// `Debug` is written by hand so that tokens and the cluster key never reach a log line.
#[derive(Clone, PartialEq, Eq)]
pub struct ServeConfig {
    /// HTTP API address (default 127.0.0.1:7070; port 0 picks a free port).
    pub listen: SocketAddr,
    /// Directory holding the node's database (default ./tally-data).
    pub data_dir: PathBuf,
    /// Bearer token with the `admin` role (which includes `client`).
    pub admin_token: Option<String>,
    /// Bearer token with the `client` role.
    pub client_token: Option<String>,
    /// Node id; when absent the runtime uses the persisted one or creates one.
    pub node_id: Option<String>,
    /// Gossip (UDP) address; `None` runs a single node without gossip.
    pub gossip_listen: Option<SocketAddr>,
    /// Gossip address announced to peers (`host:port`), when it differs from the bound one.
    pub gossip_advertise: Option<String>,
    /// Gossip seeds, `host:port` each.
    pub seeds: Vec<String>,
    /// Nodes gossip only with nodes of the same cluster id.
    pub cluster_id: String,
    /// Shared secret that authenticates gossiped values (HMAC key).
    pub cluster_key: Option<String>,
    /// Allow gossip on a non-loopback address without a cluster key.
    pub insecure: bool,
    pub gossip_interval_ms: u64,
    pub dedup_window_secs: u64,
    pub history_retention_days: u64,
    pub reservation_ttl_max_secs: u64,
    pub batch_records_max: usize,
    pub queue_records_max: usize,
    pub queue_wait_ms: u64,
    /// Seconds a node cut off from every peer stays ready; 0 = while isolated.
    pub isolated_unready_secs: u64,
    pub log_format: LogFormat,
    /// Envoy rate limit service (gRPC) address; `None`: not served.
    pub rls_listen: Option<SocketAddr>,
    /// Most wildcard instances (limits per descriptor value) the RLS creates.
    pub rls_instances_max: usize,
    /// Limits with their own `used`/`max` gauges and denial counter in /metrics; 0: none.
    pub metrics_limits: usize,
    /// Syslog (UDP) address for proxy access logs; `None`: not read.
    pub log_listen_udp: Option<SocketAddr>,
    /// TCP address for proxy access logs (lines or syslog); `None`: not read.
    pub log_listen_tcp: Option<SocketAddr>,
}

impl fmt::Debug for ServeConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn redact(secret: &Option<String>) -> Option<&'static str> {
            secret.as_ref().map(|_| "<redacted>")
        }
        f.debug_struct("ServeConfig")
            .field("listen", &self.listen)
            .field("data_dir", &self.data_dir)
            .field("admin_token", &redact(&self.admin_token))
            .field("client_token", &redact(&self.client_token))
            .field("node_id", &self.node_id)
            .field("gossip_listen", &self.gossip_listen)
            .field("gossip_advertise", &self.gossip_advertise)
            .field("seeds", &self.seeds)
            .field("cluster_id", &self.cluster_id)
            .field("cluster_key", &redact(&self.cluster_key))
            .field("insecure", &self.insecure)
            .field("gossip_interval_ms", &self.gossip_interval_ms)
            .field("dedup_window_secs", &self.dedup_window_secs)
            .field("history_retention_days", &self.history_retention_days)
            .field("reservation_ttl_max_secs", &self.reservation_ttl_max_secs)
            .field("batch_records_max", &self.batch_records_max)
            .field("queue_records_max", &self.queue_records_max)
            .field("queue_wait_ms", &self.queue_wait_ms)
            .field("isolated_unready_secs", &self.isolated_unready_secs)
            .field("log_format", &self.log_format)
            .field("rls_listen", &self.rls_listen)
            .field("rls_instances_max", &self.rls_instances_max)
            .field("metrics_limits", &self.metrics_limits)
            .field("log_listen_udp", &self.log_listen_udp)
            .field("log_listen_tcp", &self.log_listen_tcp)
            .finish()
    }
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            listen: DEFAULT_LISTEN
                .parse()
                .expect("DEFAULT_LISTEN is a socket address"),
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            admin_token: None,
            client_token: None,
            node_id: None,
            gossip_listen: None,
            gossip_advertise: None,
            seeds: Vec::new(),
            cluster_id: DEFAULT_CLUSTER_ID.to_owned(),
            cluster_key: None,
            insecure: false,
            gossip_interval_ms: DEFAULT_GOSSIP_INTERVAL_MS,
            dedup_window_secs: DEFAULT_DEDUP_WINDOW_SECS,
            history_retention_days: DEFAULT_HISTORY_RETENTION_DAYS,
            reservation_ttl_max_secs: DEFAULT_RESERVATION_TTL_MAX_SECS,
            batch_records_max: DEFAULT_BATCH_RECORDS_MAX,
            queue_records_max: DEFAULT_QUEUE_RECORDS_MAX,
            queue_wait_ms: DEFAULT_QUEUE_WAIT_MS,
            isolated_unready_secs: DEFAULT_ISOLATED_UNREADY_SECS,
            log_format: LogFormat::Text,
            rls_listen: None,
            rls_instances_max: DEFAULT_RLS_INSTANCES_MAX,
            metrics_limits: DEFAULT_METRICS_LIMITS,
            log_listen_udp: None,
            log_listen_tcp: None,
        }
    }
}

/// The TOML file: snake_case keys named as the fields; unknown keys are errors.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    admin_token: Option<String>,
    client_token: Option<String>,
    node_id: Option<String>,
    gossip_listen: Option<String>,
    gossip_advertise: Option<String>,
    #[serde(alias = "seeds")]
    seed: Option<Vec<String>>,
    cluster_id: Option<String>,
    cluster_key: Option<String>,
    insecure: Option<bool>,
    gossip_interval_ms: Option<u64>,
    dedup_window_secs: Option<u64>,
    history_retention_days: Option<u64>,
    reservation_ttl_max_secs: Option<u64>,
    batch_records_max: Option<usize>,
    queue_records_max: Option<usize>,
    queue_wait_ms: Option<u64>,
    isolated_unready_secs: Option<u64>,
    log_format: Option<String>,
    rls_listen: Option<String>,
    rls_instances_max: Option<usize>,
    metrics_limits: Option<usize>,
    log_listen_udp: Option<String>,
    log_listen_tcp: Option<String>,
}

/// The environment variable for a config key: `data_dir` → `TALLY_DATA_DIR`.
pub fn env_var_name(key: &str) -> String {
    format!("TALLY_{}", key.to_ascii_uppercase())
}

/// The process environment, read once at start-up (by `main`) and only looked up after:
/// configuration and logging read this copy, never `std::env` again.
#[derive(Debug, Clone, Default)]
pub struct Environment(std::collections::HashMap<String, String>);

impl Environment {
    /// A copy of the process environment (variables that are not UTF-8 are left out:
    /// none of tally's are).
    pub fn capture() -> Environment {
        Environment(
            std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
                .collect(),
        )
    }

    pub fn get(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }
}

impl ServeConfig {
    /// Resolves the configuration of this process: `args` (clap has already merged in the
    /// `TALLY_*` variables it knows), the environment `env` captured at start-up, and the
    /// file named by `--config`/`TALLY_CONFIG`, if any.
    pub fn load(args: &ServeArgs, environment: &Environment) -> anyhow::Result<ServeConfig> {
        let env = |name: &str| environment.get(name);
        let path = args
            .config
            .clone()
            .filter(|p| !p.as_os_str().is_empty())
            .or_else(|| {
                env("TALLY_CONFIG")
                    .filter(|v| !v.is_empty())
                    .map(PathBuf::from)
            });
        let text = match &path {
            Some(path) => Some(std::fs::read_to_string(path).with_context(|| {
                format!(
                    "cannot read config file {}: check the --config/TALLY_CONFIG path",
                    path.display()
                )
            })?),
            None => None,
        };
        Self::resolve(args, &env, text.as_deref(), path.as_deref())
    }

    /// Resolves flags > environment > file > defaults, then validates the result.
    ///
    /// `args` holds what was given on the command line (in a real run clap has already
    /// filled in the variables it knows, which is the same precedence); `env` looks up
    /// `TALLY_<KEY>` for whatever `args` lacks; `file` is the text of the TOML config file
    /// and `file_path` its name for error messages. Empty flag and variable values count
    /// as not given, so `TALLY_ADMIN_TOKEN=` in a compose file means "no token".
    pub fn resolve(
        args: &ServeArgs,
        env: &dyn Fn(&str) -> Option<String>,
        file: Option<&str>,
        file_path: Option<&Path>,
    ) -> anyhow::Result<ServeConfig> {
        let file_name = file_path
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "<config>".to_owned());
        let file: FileConfig = match file {
            Some(text) => toml::from_str(text)
                .map_err(|e| anyhow!("config file {file_name}: {}", e.to_string().trim_end()))?,
            None => FileConfig::default(),
        };
        let from_file = FileValues { name: &file_name };

        let listen = pick(
            "listen",
            args.listen,
            env,
            from_file.get("listen", file.listen, parse_socket_addr)?,
            parse_socket_addr,
        )?;
        let data_dir = pick(
            "data_dir",
            non_empty_path(&args.data_dir),
            env,
            file.data_dir,
            |s| Ok(PathBuf::from(s)),
        )?;
        let admin_token = pick(
            "admin_token",
            non_empty(&args.admin_token),
            env,
            from_file.get("admin_token", file.admin_token, parse_secret)?,
            parse_secret,
        )?;
        let client_token = pick(
            "client_token",
            non_empty(&args.client_token),
            env,
            from_file.get("client_token", file.client_token, parse_secret)?,
            parse_secret,
        )?;
        let node_id = pick(
            "node_id",
            non_empty(&args.node_id),
            env,
            from_file.get("node_id", file.node_id, parse_id)?,
            parse_id,
        )?;
        let gossip_listen = pick(
            "gossip_listen",
            args.gossip_listen,
            env,
            from_file.get("gossip_listen", file.gossip_listen, parse_socket_addr)?,
            parse_socket_addr,
        )?;
        let gossip_advertise = pick(
            "gossip_advertise",
            non_empty(&args.gossip_advertise),
            env,
            from_file.get("gossip_advertise", file.gossip_advertise, parse_host_port)?,
            parse_host_port,
        )?;
        let seeds_from_args = split_list(&args.seeds);
        let seeds = pick(
            "seed",
            (!seeds_from_args.is_empty()).then_some(seeds_from_args),
            env,
            file.seed,
            |s| Ok(split_list(&[s.to_owned()])),
        )?;
        let cluster_id = pick(
            "cluster_id",
            non_empty(&args.cluster_id),
            env,
            from_file.get("cluster_id", file.cluster_id, parse_id)?,
            parse_id,
        )?;
        let cluster_key = pick(
            "cluster_key",
            non_empty(&args.cluster_key),
            env,
            from_file.get("cluster_key", file.cluster_key, parse_secret)?,
            parse_secret,
        )?;
        // A flag can only say "true"; the variable and the file can also say "false".
        let insecure = pick(
            "insecure",
            args.insecure.then_some(true),
            env,
            file.insecure,
            parse_bool,
        )?;
        let gossip_interval_ms = pick(
            "gossip_interval_ms",
            args.gossip_interval_ms,
            env,
            file.gossip_interval_ms,
            parse_number,
        )?;
        let dedup_window_secs = pick(
            "dedup_window_secs",
            args.dedup_window_secs,
            env,
            file.dedup_window_secs,
            parse_number,
        )?;
        let history_retention_days = pick(
            "history_retention_days",
            args.history_retention_days,
            env,
            file.history_retention_days,
            parse_number,
        )?;
        let reservation_ttl_max_secs = pick(
            "reservation_ttl_max_secs",
            args.reservation_ttl_max_secs,
            env,
            file.reservation_ttl_max_secs,
            parse_number,
        )?;
        let batch_records_max = pick(
            "batch_records_max",
            args.batch_records_max,
            env,
            file.batch_records_max,
            parse_number,
        )?;
        let queue_records_max = pick(
            "queue_records_max",
            args.queue_records_max,
            env,
            file.queue_records_max,
            parse_number,
        )?;
        let queue_wait_ms = pick(
            "queue_wait_ms",
            args.queue_wait_ms,
            env,
            file.queue_wait_ms,
            parse_number,
        )?;
        let isolated_unready_secs = pick(
            "isolated_unready_secs",
            args.isolated_unready_secs,
            env,
            file.isolated_unready_secs,
            parse_number,
        )?;
        let log_format = pick(
            "log_format",
            args.log_format,
            env,
            from_file.get("log_format", file.log_format, parse_log_format)?,
            parse_log_format,
        )?;
        let rls_listen = pick(
            "rls_listen",
            args.rls_listen,
            env,
            from_file.get("rls_listen", file.rls_listen, parse_socket_addr)?,
            parse_socket_addr,
        )?;
        let rls_instances_max = pick(
            "rls_instances_max",
            args.rls_instances_max,
            env,
            file.rls_instances_max,
            parse_number,
        )?;
        let metrics_limits = pick(
            "metrics_limits",
            args.metrics_limits,
            env,
            file.metrics_limits,
            parse_number,
        )?;
        let log_listen_udp = pick(
            "log_listen_udp",
            args.log_listen_udp,
            env,
            from_file.get("log_listen_udp", file.log_listen_udp, parse_socket_addr)?,
            parse_socket_addr,
        )?;
        let log_listen_tcp = pick(
            "log_listen_tcp",
            args.log_listen_tcp,
            env,
            from_file.get("log_listen_tcp", file.log_listen_tcp, parse_socket_addr)?,
            parse_socket_addr,
        )?;

        let defaults = ServeConfig::default();
        let config = ServeConfig {
            listen: listen.unwrap_or(defaults.listen),
            data_dir: data_dir.unwrap_or(defaults.data_dir),
            admin_token,
            client_token,
            node_id,
            gossip_listen,
            gossip_advertise,
            seeds: seeds.unwrap_or_default(),
            cluster_id: cluster_id.unwrap_or(defaults.cluster_id),
            cluster_key,
            insecure: insecure.unwrap_or(false),
            gossip_interval_ms: gossip_interval_ms.unwrap_or(defaults.gossip_interval_ms),
            dedup_window_secs: dedup_window_secs.unwrap_or(defaults.dedup_window_secs),
            history_retention_days: history_retention_days
                .unwrap_or(defaults.history_retention_days),
            reservation_ttl_max_secs: reservation_ttl_max_secs
                .unwrap_or(defaults.reservation_ttl_max_secs),
            batch_records_max: batch_records_max.unwrap_or(defaults.batch_records_max),
            queue_records_max: queue_records_max.unwrap_or(defaults.queue_records_max),
            queue_wait_ms: queue_wait_ms.unwrap_or(defaults.queue_wait_ms),
            isolated_unready_secs: isolated_unready_secs.unwrap_or(defaults.isolated_unready_secs),
            log_format: log_format.unwrap_or(defaults.log_format),
            rls_listen,
            rls_instances_max: rls_instances_max.unwrap_or(defaults.rls_instances_max),
            metrics_limits: metrics_limits.unwrap_or(defaults.metrics_limits),
            log_listen_udp,
            log_listen_tcp,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks values that are wrong whatever the deployment (shapes and ranges).
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.data_dir.as_os_str().is_empty() {
            bail!("the data directory is empty: set --data-dir DIR (default ./tally-data)");
        }
        for seed in &self.seeds {
            parse_host_port(seed).map_err(|e| anyhow!("invalid seed {seed:?}: {e}"))?;
        }
        if let Some(advertise) = &self.gossip_advertise {
            parse_host_port(advertise)
                .map_err(|e| anyhow!("invalid gossip_advertise {advertise:?}: {e}"))?;
        }
        if self.gossip_listen.is_none() {
            if !self.seeds.is_empty() {
                bail!(
                    "--seed given without --gossip-listen: set --gossip-listen ADDR \
                     (e.g. 0.0.0.0:7071) so this node can gossip, or drop the seeds"
                );
            }
            if self.gossip_advertise.is_some() {
                bail!(
                    "--gossip-advertise given without --gossip-listen: set --gossip-listen ADDR \
                     or drop --gossip-advertise"
                );
            }
        }
        check_range(
            "gossip_interval_ms",
            self.gossip_interval_ms,
            1,
            GOSSIP_INTERVAL_MS_MAX,
        )?;
        check_range(
            "dedup_window_secs",
            self.dedup_window_secs,
            1,
            DEDUP_WINDOW_SECS_MAX,
        )?;
        check_range(
            "history_retention_days",
            self.history_retention_days,
            1,
            HISTORY_RETENTION_DAYS_MAX,
        )?;
        check_range(
            "reservation_ttl_max_secs",
            self.reservation_ttl_max_secs,
            1,
            RESERVATION_TTL_MAX_SECS_MAX,
        )?;
        if self.history_retention_days * 86_400 < self.dedup_window_secs {
            bail!(
                "history_retention_days ({} days) is shorter than dedup_window_secs ({} s): a \
                 late record inside the window must still find its period, so raise \
                 --history-retention-days or shorten --dedup-window-secs",
                self.history_retention_days,
                self.dedup_window_secs
            );
        }
        check_range(
            "batch_records_max",
            self.batch_records_max as u64,
            1,
            BATCH_RECORDS_MAX_MAX as u64,
        )?;
        check_range(
            "queue_records_max",
            self.queue_records_max as u64,
            1,
            QUEUE_RECORDS_MAX_MAX as u64,
        )?;
        check_range("queue_wait_ms", self.queue_wait_ms, 0, QUEUE_WAIT_MS_MAX)?;
        check_range(
            "rls_instances_max",
            self.rls_instances_max as u64,
            0,
            RLS_INSTANCES_MAX_MAX as u64,
        )?;
        check_range(
            "isolated_unready_secs",
            self.isolated_unready_secs,
            0,
            ISOLATED_UNREADY_SECS_MAX,
        )?;
        check_range(
            "metrics_limits",
            self.metrics_limits as u64,
            0,
            METRICS_LIMITS_MAX as u64,
        )?;
        if self.queue_records_max < self.batch_records_max {
            bail!(
                "queue_records_max ({}) is smaller than batch_records_max ({}): a batch is \
                 taken from the queue, so raise --queue-records-max or lower --batch-records-max",
                self.queue_records_max,
                self.batch_records_max
            );
        }
        Ok(())
    }

    /// The start-up security rule (DESIGN.md §4): without tokens the HTTP API only listens
    /// on loopback, and gossip without a cluster key only on loopback unless `insecure`.
    pub fn validate_security(&self) -> anyhow::Result<()> {
        if self.admin_token.is_none()
            && self.client_token.is_none()
            && !self.listen.ip().is_loopback()
        {
            bail!(
                "refusing to listen on {} without tokens: set --admin-token/--client-token \
                 or listen on 127.0.0.1",
                self.listen
            );
        }
        if let Some(rls) = self.rls_listen.filter(|a| !a.ip().is_loopback()) {
            if self.admin_token.is_none() && self.client_token.is_none() {
                bail!(
                    "refusing to serve the rate limit service on {rls} without tokens: set \
                     --client-token (Envoy then sends it as `authorization: Bearer <token>` \
                     in the gRPC service's initial_metadata) or listen on 127.0.0.1"
                );
            }
        }
        for (flag, addr) in [
            ("--log-listen-udp", self.log_listen_udp),
            ("--log-listen-tcp", self.log_listen_tcp),
        ] {
            if let Some(a) = addr.filter(|a| !a.ip().is_loopback() && !self.insecure) {
                bail!(
                    "refusing to read access logs on {a} ({flag}): syslog carries no token, \
                     so anyone who reaches it can add usage; listen on 127.0.0.1, or pass \
                     --insecure on a trusted network"
                );
            }
        }
        let unprotected_gossip = self
            .gossip_listen
            .filter(|g| self.cluster_key.is_none() && !self.insecure && !g.ip().is_loopback());
        if let Some(gossip) = unprotected_gossip {
            bail!(
                "refusing to gossip on {gossip} without a cluster key: set --cluster-key \
                 (the same secret on every node), gossip on 127.0.0.1, or pass --insecure \
                 on a trusted network"
            );
        }
        Ok(())
    }
}

type Parser<T> = fn(&str) -> Result<T, String>;

/// One layer of precedence: the flag if given, else the variable `TALLY_<KEY>` if set and
/// non-empty, else the file's value.
fn pick<T>(
    key: &str,
    flag: Option<T>,
    env: &dyn Fn(&str) -> Option<String>,
    file: Option<T>,
    parse: Parser<T>,
) -> anyhow::Result<Option<T>> {
    if flag.is_some() {
        return Ok(flag);
    }
    let var = env_var_name(key);
    if let Some(raw) = env(&var).filter(|v| !v.is_empty()) {
        let value = parse(&raw).map_err(|e| {
            if is_secret(key) {
                anyhow!("invalid {var}: {e}")
            } else {
                anyhow!("invalid {var}={raw:?}: {e}")
            }
        })?;
        return Ok(Some(value));
    }
    Ok(file)
}

/// Parses values read from the config file, naming the file and key in errors.
struct FileValues<'a> {
    name: &'a str,
}

impl FileValues<'_> {
    fn get<T>(
        &self,
        key: &str,
        value: Option<String>,
        parse: Parser<T>,
    ) -> anyhow::Result<Option<T>> {
        value
            .map(|raw| parse(&raw).map_err(|e| file_error(self.name, key, &raw, &e)))
            .transpose()
    }
}

fn is_secret(key: &str) -> bool {
    matches!(key, "admin_token" | "client_token" | "cluster_key")
}

fn file_error(file: &str, key: &str, raw: &str, err: &str) -> anyhow::Error {
    if is_secret(key) {
        anyhow!("config file {file}: invalid `{key}`: {err}")
    } else {
        anyhow!("config file {file}: invalid `{key}` = {raw:?}: {err}")
    }
}

fn check_range(key: &str, value: u64, min: u64, max: u64) -> anyhow::Result<()> {
    if value < min || value > max {
        bail!(
            "{key} = {value} is out of range: use a value from {min} to {max} (--{})",
            key.replace('_', "-")
        );
    }
    Ok(())
}

fn non_empty(value: &Option<String>) -> Option<String> {
    value.clone().filter(|v| !v.is_empty())
}

fn non_empty_path(value: &Option<PathBuf>) -> Option<PathBuf> {
    value.clone().filter(|v| !v.as_os_str().is_empty())
}

/// Seeds come as repeated flags, comma-separated variables, or both (`--seed a,b`).
fn split_list(items: &[String]) -> Vec<String> {
    items
        .iter()
        .flat_map(|item| item.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    s.trim()
        .parse()
        .map_err(|_| "expected IP:PORT such as 127.0.0.1:7070 or [::1]:7070".to_owned())
}

/// `host:port` where host is an IP or a DNS name (seeds and advertised addresses).
fn parse_host_port(s: &str) -> Result<String, String> {
    const HINT: &str = "expected HOST:PORT such as 10.0.0.2:7071 or tally-1:7071";
    let s = s.trim();
    let (host, port) = s.rsplit_once(':').ok_or_else(|| HINT.to_owned())?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() || host.contains(char::is_whitespace) || port.parse::<u16>().is_err() {
        return Err(HINT.to_owned());
    }
    Ok(s.to_owned())
}

fn parse_secret(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if s.chars().any(|c| c.is_control() || c == ' ') {
        return Err("must not contain spaces or control characters".to_owned());
    }
    Ok(s.to_owned())
}

fn parse_id(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= ID_LEN_MAX
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "expected 1 to {ID_LEN_MAX} characters from A-Z a-z 0-9 . _ : -"
        ))
    }
}

fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err("expected true or false".to_owned()),
    }
}

fn parse_number<T: std::str::FromStr>(s: &str) -> Result<T, String> {
    s.trim()
        .parse()
        .map_err(|_| "expected a non-negative whole number".to_owned())
}

fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err("expected text or json".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn resolve(
        args: &ServeArgs,
        env: &[(&str, &str)],
        file: Option<&str>,
    ) -> anyhow::Result<ServeConfig> {
        ServeConfig::resolve(args, &env_of(env), file, None)
    }

    fn err(args: &ServeArgs, env: &[(&str, &str)], file: Option<&str>) -> String {
        format!("{:#}", resolve(args, env, file).unwrap_err())
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn defaults() {
        let cfg = resolve(&ServeArgs::default(), &[], None).unwrap();
        assert_eq!(cfg, ServeConfig::default());
        assert_eq!(cfg.listen, addr("127.0.0.1:7070"));
        assert_eq!(cfg.data_dir, PathBuf::from("./tally-data"));
        assert_eq!(cfg.cluster_id, "tally");
        assert_eq!(cfg.gossip_interval_ms, 100);
        assert_eq!(cfg.dedup_window_secs, 86_400);
        assert_eq!(cfg.history_retention_days, 35);
        assert_eq!(cfg.batch_records_max, 4_096);
        assert_eq!(cfg.queue_records_max, 65_536);
        assert_eq!(cfg.queue_wait_ms, 2_000);
        assert_eq!(cfg.log_format, LogFormat::Text);
        assert!(!cfg.insecure);
        cfg.validate_security().unwrap();
    }

    #[test]
    fn precedence_flag_over_env_over_file_over_default() {
        let file = r#"
            listen = "127.0.0.1:3"
            data_dir = "/file"
            cluster_id = "from-file"
            node_id = "file-node"
            gossip_interval_ms = 30
        "#;
        let env = [
            ("TALLY_LISTEN", "127.0.0.1:2"),
            ("TALLY_DATA_DIR", "/env"),
            ("TALLY_CLUSTER_ID", "from-env"),
        ];
        let args = ServeArgs {
            listen: Some(addr("127.0.0.1:1")),
            data_dir: Some(PathBuf::from("/flag")),
            ..ServeArgs::default()
        };
        let cfg = resolve(&args, &env, Some(file)).unwrap();
        assert_eq!(cfg.listen, addr("127.0.0.1:1"), "flag beats env and file");
        assert_eq!(cfg.data_dir, PathBuf::from("/flag"));
        assert_eq!(cfg.cluster_id, "from-env", "env beats file");
        assert_eq!(
            cfg.node_id.as_deref(),
            Some("file-node"),
            "file beats default"
        );
        assert_eq!(cfg.gossip_interval_ms, 30);
        assert_eq!(cfg.queue_wait_ms, DEFAULT_QUEUE_WAIT_MS, "default last");

        let cfg = resolve(&ServeArgs::default(), &env, Some(file)).unwrap();
        assert_eq!(cfg.listen, addr("127.0.0.1:2"));
        assert_eq!(cfg.data_dir, PathBuf::from("/env"));

        let cfg = resolve(&ServeArgs::default(), &[], Some(file)).unwrap();
        assert_eq!(cfg.listen, addr("127.0.0.1:3"));
        assert_eq!(cfg.cluster_id, "from-file");
    }

    #[test]
    fn seeds_from_flags_env_and_file() {
        let args = ServeArgs {
            gossip_listen: Some(addr("127.0.0.1:7071")),
            seeds: vec!["a:1".into(), "b:2,c:3".into()],
            ..ServeArgs::default()
        };
        let env = [("TALLY_SEED", "x:1,y:2")];
        let file = Some(r#"seed = ["f:1"]"#);
        assert_eq!(
            resolve(&args, &env, file).unwrap().seeds,
            ["a:1", "b:2", "c:3"]
        );
        let args = ServeArgs {
            seeds: vec![],
            ..args
        };
        assert_eq!(resolve(&args, &env, file).unwrap().seeds, ["x:1", "y:2"]);
        assert_eq!(resolve(&args, &[], file).unwrap().seeds, ["f:1"]);
        let file = Some(r#"seeds = ["g:1", "[::1]:7071"]"#);
        assert_eq!(
            resolve(&args, &[], file).unwrap().seeds,
            ["g:1", "[::1]:7071"]
        );
    }

    #[test]
    fn insecure_layers() {
        let yes = ServeArgs {
            insecure: true,
            ..ServeArgs::default()
        };
        let no = ServeArgs::default();
        let file = Some("insecure = true");
        assert!(
            resolve(&yes, &[("TALLY_INSECURE", "false")], None)
                .unwrap()
                .insecure
        );
        assert!(
            !resolve(&no, &[("TALLY_INSECURE", "false")], file)
                .unwrap()
                .insecure
        );
        assert!(
            resolve(&no, &[("TALLY_INSECURE", "1")], None)
                .unwrap()
                .insecure
        );
        assert!(resolve(&no, &[], file).unwrap().insecure);
        assert!(!resolve(&no, &[], None).unwrap().insecure);
    }

    #[test]
    fn empty_values_count_as_not_given() {
        let args = ServeArgs {
            admin_token: Some(String::new()),
            ..ServeArgs::default()
        };
        let cfg = resolve(
            &args,
            &[("TALLY_CLIENT_TOKEN", ""), ("TALLY_LISTEN", "")],
            Some(r#"admin_token = "from-file""#),
        )
        .unwrap();
        assert_eq!(cfg.admin_token.as_deref(), Some("from-file"));
        assert_eq!(cfg.client_token, None);
        assert_eq!(cfg.listen, addr(DEFAULT_LISTEN));
    }

    #[test]
    fn history_retention_covers_the_dedup_window() {
        let d = ServeArgs::default();
        let cfg = resolve(&d, &[("TALLY_HISTORY_RETENTION_DAYS", "400")], None).unwrap();
        assert_eq!(cfg.history_retention_days, 400);
        let e = err(&d, &[], Some("history_retention_days = 0"));
        assert!(e.contains("--history-retention-days"), "{e}");
        let e = err(
            &d,
            &[("TALLY_DEDUP_WINDOW_SECS", "172801")],
            Some("history_retention_days = 2"),
        );
        assert!(
            e.contains("shorter than dedup_window_secs") && e.contains("--history-retention-days"),
            "{e}"
        );
        let cfg = resolve(
            &d,
            &[("TALLY_DEDUP_WINDOW_SECS", "172800")],
            Some("history_retention_days = 2"),
        )
        .unwrap();
        assert_eq!(serve_node_config(&cfg).history_retention_ms, 2 * 86_400_000);
    }

    #[test]
    fn metrics_limits_is_opt_in_and_capped() {
        let d = ServeArgs::default();
        let cfg = resolve(&d, &[], None).unwrap();
        assert_eq!(cfg.metrics_limits, 0);
        assert_eq!(serve_node_config(&cfg).denials_by_limit_max, 0);
        let cfg = resolve(&d, &[], Some("metrics_limits = 50")).unwrap();
        assert_eq!(cfg.metrics_limits, 50);
        let cfg = resolve(
            &d,
            &[("TALLY_METRICS_LIMITS", "70")],
            Some("metrics_limits = 50"),
        )
        .unwrap();
        assert_eq!(cfg.metrics_limits, 70);
        let flag = ServeArgs {
            metrics_limits: Some(90),
            ..ServeArgs::default()
        };
        let cfg = resolve(&flag, &[("TALLY_METRICS_LIMITS", "70")], None).unwrap();
        assert_eq!(cfg.metrics_limits, 90);
        assert_eq!(serve_node_config(&cfg).denials_by_limit_max, 90);
        let e = err(&d, &[("TALLY_METRICS_LIMITS", "10001")], None);
        assert!(
            e.contains("metrics_limits = 10001 is out of range") && e.contains("--metrics-limits"),
            "{e}"
        );
    }

    fn serve_node_config(cfg: &ServeConfig) -> tally_node::NodeConfig {
        crate::serve::node_config(cfg)
    }

    #[test]
    fn serve_defaults_are_the_node_defaults() {
        let (served, node) = (
            serve_node_config(&ServeConfig::default()),
            tally_node::NodeConfig::new("d"),
        );
        assert_eq!(served.dedup_window_ms, node.dedup_window_ms);
        assert_eq!(served.history_retention_ms, node.history_retention_ms);
        assert_eq!(served.reservation_ttl_max_ms, node.reservation_ttl_max_ms);
        assert_eq!(served.batch_records_max, node.batch_records_max);
        assert_eq!(served.queue_records_max, node.queue_records_max);
        assert_eq!(served.queue_wait, node.queue_wait);
        assert_eq!(served.denials_by_limit_max, node.denials_by_limit_max);
        // API.md's values.
        assert_eq!(DEFAULT_DEDUP_WINDOW_SECS, 86_400);
        assert_eq!(DEFAULT_HISTORY_RETENTION_DAYS, 35);
        assert_eq!(DEFAULT_RESERVATION_TTL_MAX_SECS, 300);
        assert_eq!(DEFAULT_BATCH_RECORDS_MAX, 4_096);
        assert_eq!(DEFAULT_QUEUE_RECORDS_MAX, 65_536);
        assert_eq!(DEFAULT_QUEUE_WAIT_MS, 2_000);
        assert_eq!(DEFAULT_URL, format!("http://{DEFAULT_LISTEN}"));
    }

    #[test]
    fn unknown_file_key_is_named() {
        let e = err(&ServeArgs::default(), &[], Some("listne = \"127.0.0.1:1\""));
        assert!(e.contains("listne"), "{e}");
        assert!(e.starts_with("config file"), "{e}");
    }

    #[test]
    fn bad_values_say_what_and_where() {
        let d = ServeArgs::default();
        let e = err(&d, &[], Some(r#"listen = "localhost""#));
        assert!(e.contains("`listen`") && e.contains("IP:PORT"), "{e}");
        let e = err(&d, &[("TALLY_GOSSIP_LISTEN", "nope")], None);
        assert!(
            e.contains("TALLY_GOSSIP_LISTEN") && e.contains("IP:PORT"),
            "{e}"
        );
        let e = err(&d, &[("TALLY_QUEUE_WAIT_MS", "-1")], None);
        assert!(e.contains("TALLY_QUEUE_WAIT_MS"), "{e}");
        let e = err(&d, &[], Some(r#"data_dir = """#));
        assert!(e.contains("--data-dir"), "{e}");
        let e = err(&d, &[], Some("gossip_interval_ms = 0"));
        assert!(e.contains("gossip_interval_ms") && e.contains("--gossip-interval-ms"));
        let e = err(&d, &[], Some(r#"node_id = "a b""#));
        assert!(e.contains("node_id"), "{e}");
        let e = err(&d, &[], Some("gossip_interval_ms = \"fast\""));
        assert!(e.contains("gossip_interval_ms"), "{e}");
        let e = err(&d, &[("TALLY_LOG_FORMAT", "xml")], None);
        assert!(e.contains("text or json"), "{e}");
        let e = err(&d, &[("TALLY_SEED", "a:1")], None);
        assert!(e.contains("--gossip-listen"), "{e}");
        let e = err(
            &d,
            &[
                ("TALLY_GOSSIP_LISTEN", "127.0.0.1:7071"),
                ("TALLY_SEED", "no-port"),
            ],
            None,
        );
        assert!(e.contains("no-port") && e.contains("HOST:PORT"), "{e}");
        let e = err(&d, &[("TALLY_QUEUE_RECORDS_MAX", "10")], None);
        assert!(e.contains("batch_records_max"), "{e}");
    }

    #[test]
    fn secrets_are_not_echoed() {
        let d = ServeArgs::default();
        let e = err(&d, &[], Some(r#"cluster_key = "sec ret""#));
        assert!(!e.contains("sec ret"), "{e}");
        let cfg = resolve(&d, &[("TALLY_ADMIN_TOKEN", "s3cret")], None).unwrap();
        assert!(!format!("{cfg:?}").contains("s3cret"));
    }

    #[test]
    fn proxy_listeners_are_off_by_default_and_layered() {
        let d = resolve(&ServeArgs::default(), &[], None).unwrap();
        assert_eq!(
            (d.rls_listen, d.log_listen_udp, d.log_listen_tcp),
            (None, None, None)
        );
        assert_eq!(d.rls_instances_max, DEFAULT_RLS_INSTANCES_MAX);
        let file = Some(
            "rls_listen = \"127.0.0.1:3\"\nlog_listen_udp = \"127.0.0.1:4\"\nrls_instances_max = 7",
        );
        let env = [
            ("TALLY_RLS_LISTEN", "127.0.0.1:2"),
            ("TALLY_LOG_LISTEN_TCP", "127.0.0.1:5"),
        ];
        let args = ServeArgs {
            rls_listen: Some(addr("127.0.0.1:1")),
            ..ServeArgs::default()
        };
        let c = resolve(&args, &env, file).unwrap();
        assert_eq!(c.rls_listen, Some(addr("127.0.0.1:1")));
        assert_eq!(c.log_listen_udp, Some(addr("127.0.0.1:4")));
        assert_eq!(c.log_listen_tcp, Some(addr("127.0.0.1:5")));
        assert_eq!(c.rls_instances_max, 7);
        let c = resolve(&ServeArgs::default(), &env, file).unwrap();
        assert_eq!(c.rls_listen, Some(addr("127.0.0.1:2")));
        let e = err(
            &ServeArgs::default(),
            &[("TALLY_RLS_INSTANCES_MAX", "9999999999")],
            None,
        );
        assert!(e.contains("rls_instances_max"), "{e}");
    }

    #[test]
    fn proxy_listeners_follow_the_security_rule() {
        let rls = ServeConfig {
            rls_listen: Some(addr("0.0.0.0:8089")),
            ..ServeConfig::default()
        };
        let e = rls.validate_security().unwrap_err().to_string();
        assert!(e.contains("--client-token"), "{e}");
        ServeConfig {
            client_token: Some("t".into()),
            listen: addr("0.0.0.0:7070"),
            ..rls
        }
        .validate_security()
        .unwrap();
        let logs = ServeConfig {
            log_listen_udp: Some(addr("0.0.0.0:5514")),
            client_token: Some("t".into()),
            ..ServeConfig::default()
        };
        let e = logs.validate_security().unwrap_err().to_string();
        assert!(
            e.contains("--log-listen-udp") && e.contains("--insecure"),
            "{e}"
        );
        ServeConfig {
            insecure: true,
            ..logs
        }
        .validate_security()
        .unwrap();
        ServeConfig {
            log_listen_tcp: Some(addr("127.0.0.1:5515")),
            rls_listen: Some(addr("127.0.0.1:8089")),
            ..ServeConfig::default()
        }
        .validate_security()
        .unwrap();
    }

    #[test]
    fn security_rules() {
        let open = ServeConfig {
            listen: addr("0.0.0.0:7070"),
            ..ServeConfig::default()
        };
        let e = open.validate_security().unwrap_err().to_string();
        assert!(
            e.contains("refusing to listen on 0.0.0.0:7070 without tokens"),
            "{e}"
        );
        ServeConfig {
            client_token: Some("t".into()),
            ..open.clone()
        }
        .validate_security()
        .unwrap();
        ServeConfig {
            listen: addr("[::1]:7070"),
            ..ServeConfig::default()
        }
        .validate_security()
        .unwrap();

        let gossip = ServeConfig {
            gossip_listen: Some(addr("10.0.0.1:7071")),
            ..ServeConfig::default()
        };
        let e = gossip.validate_security().unwrap_err().to_string();
        assert!(
            e.contains("--cluster-key") && e.contains("--insecure"),
            "{e}"
        );
        for ok in [
            ServeConfig {
                insecure: true,
                ..gossip.clone()
            },
            ServeConfig {
                cluster_key: Some("k".into()),
                ..gossip.clone()
            },
            ServeConfig {
                gossip_listen: Some(addr("127.0.0.1:7071")),
                ..gossip.clone()
            },
        ] {
            ok.validate_security().unwrap();
        }
    }
}
