//! The `tally` command line (API.md, "Command line"): `tally serve` and the client
//! commands, as clap derive types.
//!
//! This module only describes and parses arguments. Values that need no context are
//! checked here (`k=v` pairs, decimals), so mistakes are usage errors (exit code 2);
//! resolving `serve` flags against env and file lives in `config`, talking HTTP in
//! `client`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::builder::BoolishValueParser;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::LogFormat;

/// tally: distributed budgets and rate limits.
#[derive(Debug, Parser)]
#[command(
    name = "tally",
    bin_name = "tally",
    version,
    about,
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process: the size of the serve variant costs nothing worth a Box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node.
    Serve(Box<ServeArgs>),
    /// Create, list, inspect, delete and reset limits.
    Limits(LimitsArgs),
    /// Manage entities: a dimension value and its parents (virtual_key/vk-1 → team=eng).
    Entities(EntitiesArgs),
    /// Ask whether a request with these attributes would be allowed now.
    Check(CheckArgs),
    /// Record usage of one request (idempotent by --id).
    Usage(UsageArgs),
    /// Show the node's health, readiness and cluster membership.
    Status(StatusArgs),
    /// Manage the nodes of a fleet (decommission one that is gone for good).
    Nodes(NodesArgs),
    /// Manage model prices (USD per million tokens), which price usage given by tokens.
    Prices(PricesArgs),
    /// Turn another system's config into tally limits.
    Import(ImportArgs),
}

#[derive(Debug, Args)]
pub struct NodesArgs {
    #[command(flatten)]
    pub client: ClientOpts,
    #[command(subcommand)]
    pub command: NodesCommand,
}

#[derive(Debug, Subcommand)]
pub enum NodesCommand {
    /// Say that a node is gone for good: its unspent rights of hard limits pass to a
    /// successor. Never undone; the node may not spend hard limits again under this id.
    Decommission {
        /// The node id (as `tally status` lists it).
        id: String,
        /// The node that takes over its rights [default: the node this command talks to].
        #[arg(long, value_name = "NODE")]
        successor: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct PricesArgs {
    #[command(flatten)]
    pub client: ClientOpts,
    #[command(subcommand)]
    pub command: PricesCommand,
}

#[derive(Debug, Subcommand)]
pub enum PricesCommand {
    /// Create or replace the price of a model, in USD per million tokens (kept to 9
    /// decimal places). Cache prices default to the input price, reasoning to output.
    Put {
        /// The model, as requests name it in their `model` attribute.
        model: String,
        #[arg(long, value_name = "USD")]
        input: f64,
        #[arg(long, value_name = "USD")]
        output: f64,
        #[arg(long, value_name = "USD")]
        cache_read: Option<f64>,
        #[arg(long, value_name = "USD")]
        cache_creation: Option<f64>,
        #[arg(long, value_name = "USD")]
        reasoning: Option<f64>,
    },
    /// Show the price of a model.
    Get { model: String },
    /// List every price.
    List,
    /// Delete the price of a model.
    Delete { model: String },
    /// Import LiteLLM's model_prices_and_context_window.json (per-token USD prices:
    /// input_cost_per_token, output_cost_per_token, cache_read_input_token_cost,
    /// cache_creation_input_token_cost, output_cost_per_reasoning_token). Entries
    /// without both an input and an output price per token are skipped. Written 1000
    /// prices per durable commit. Needs an admin token.
    Import {
        /// The JSON file (`-` reads standard input).
        file: PathBuf,
        /// Only models of this `litellm_provider` (repeatable).
        #[arg(long, value_name = "PROVIDER")]
        provider: Vec<String>,
        /// Only say what would be imported.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    #[command(flatten)]
    pub client: ClientOpts,
    #[command(subcommand)]
    pub command: ImportCommand,
}

#[derive(Debug, Subcommand)]
pub enum ImportCommand {
    /// An envoyproxy/ratelimit config (YAML): each descriptor with a rate_limit becomes a
    /// limit Envoy's rate limit service (`tally serve --rls-listen`) applies. The domain's
    /// rules become exactly the file's: rules the file no longer has are deleted. Needs
    /// an admin token.
    EnvoyRatelimit {
        /// The config file (`-` reads standard input).
        file: PathBuf,
        /// Only say what would change.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Flags of `tally serve`. Every flag is also read from `TALLY_<FLAG>` and from the
/// `--config` file (snake_case keys); flags win over env over file over defaults. No
/// flag has a clap default, so "not given" is visible and the file can fill it in.
#[derive(Debug, Clone, Default, Args)]
#[command(
    after_help = "Every flag can also be set as TALLY_<FLAG> (TALLY_SEED is \
comma-separated) or as a snake_case key in the --config TOML file; flags win over the \
environment, which wins over the file. Empty values count as not given."
)]
pub struct ServeArgs {
    /// TOML config file with the same settings as snake_case keys.
    #[arg(long, env = "TALLY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// HTTP address [default: 127.0.0.1:7070]; port 0 picks a free port.
    #[arg(long, env = "TALLY_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Data directory [default: ./tally-data].
    #[arg(long, env = "TALLY_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Bearer token with the admin role (configure limits and entities, resets).
    #[arg(
        long,
        env = "TALLY_ADMIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,
    /// Bearer token with the client role (check, record usage, read).
    #[arg(
        long,
        env = "TALLY_CLIENT_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub client_token: Option<String>,
    /// Node id [default: persisted in the data directory, generated on first start].
    #[arg(long, env = "TALLY_NODE_ID", value_name = "ID")]
    pub node_id: Option<String>,
    /// Gossip address (UDP) [default: no gossip, a single node].
    #[arg(long, env = "TALLY_GOSSIP_LISTEN", value_name = "ADDR")]
    pub gossip_listen: Option<SocketAddr>,
    /// Gossip address announced to peers, HOST:PORT [default: the --gossip-listen address].
    #[arg(long, env = "TALLY_GOSSIP_ADVERTISE", value_name = "ADDR")]
    pub gossip_advertise: Option<String>,
    /// A gossip seed, HOST:PORT; repeat or separate with commas.
    #[arg(
        long = "seed",
        env = "TALLY_SEED",
        value_name = "ADDR",
        value_delimiter = ','
    )]
    pub seeds: Vec<String>,
    /// Cluster id; nodes gossip only within the same id [default: tally].
    #[arg(long, env = "TALLY_CLUSTER_ID", value_name = "ID")]
    pub cluster_id: Option<String>,
    /// Shared secret authenticating gossip; the same on every node.
    #[arg(
        long,
        env = "TALLY_CLUSTER_KEY",
        value_name = "KEY",
        hide_env_values = true
    )]
    pub cluster_key: Option<String>,
    /// Allow gossip on a non-loopback address without --cluster-key.
    #[arg(long, env = "TALLY_INSECURE", value_parser = BoolishValueParser::new())]
    pub insecure: bool,
    /// Gossip round interval [default: 100].
    #[arg(long, env = "TALLY_GOSSIP_INTERVAL_MS", value_name = "MS")]
    pub gossip_interval_ms: Option<u64>,
    /// How long usage ids are remembered for deduplication [default: 86400].
    #[arg(long, env = "TALLY_DEDUP_WINDOW_SECS", value_name = "SECS")]
    pub dedup_window_secs: Option<u64>,
    /// How long closed periods are kept as history, in days; at least the dedup window
    /// [default: 35].
    #[arg(long, env = "TALLY_HISTORY_RETENTION_DAYS", value_name = "DAYS")]
    pub history_retention_days: Option<u64>,
    /// Longest lifetime of a reservation on hard limits, and how long a node that did not
    /// stop cleanly refuses to spend hard limits after it restarts [default: 300].
    #[arg(long, env = "TALLY_RESERVATION_TTL_MAX_SECS", value_name = "SECS")]
    pub reservation_ttl_max_secs: Option<u64>,
    /// Most usage records committed in one transaction [default: 4096].
    #[arg(long, env = "TALLY_BATCH_RECORDS_MAX", value_name = "N")]
    pub batch_records_max: Option<usize>,
    /// Capacity of the write queue, in records [default: 65536].
    #[arg(long, env = "TALLY_QUEUE_RECORDS_MAX", value_name = "N")]
    pub queue_records_max: Option<usize>,
    /// How long a write waits for queue space before 503 [default: 2000].
    #[arg(long, env = "TALLY_QUEUE_WAIT_MS", value_name = "MS")]
    pub queue_wait_ms: Option<u64>,
    /// How long a node cut off from every peer stays ready (/readyz 200) before it reports
    /// 503 until it syncs again; 0 keeps it ready while isolated [default: 10].
    #[arg(long, env = "TALLY_ISOLATED_UNREADY_SECS", value_name = "SECS")]
    pub isolated_unready_secs: Option<u64>,
    /// Log format [default: text]; logs go to stderr, filtered by RUST_LOG.
    #[arg(long, env = "TALLY_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Serve Envoy's rate limit service (gRPC ShouldRateLimit) on ADDR [default: off].
    #[arg(long, env = "TALLY_RLS_LISTEN", value_name = "ADDR")]
    pub rls_listen: Option<SocketAddr>,
    /// Most wildcard instances (one limit per descriptor value) the rate limit service
    /// creates; past it, new values share their rule's counter [default: 10000].
    #[arg(long, env = "TALLY_RLS_INSTANCES_MAX", value_name = "N")]
    pub rls_instances_max: Option<usize>,
    /// Give the N limits closest to their max their own series in /metrics
    /// (tally_limit_used, tally_limit_max) and count denials per limit for the first N
    /// limits that deny; at most 10000 [default: 0, none].
    #[arg(long, env = "TALLY_METRICS_LIMITS", value_name = "N")]
    pub metrics_limits: Option<usize>,
    /// Read proxy access logs as syslog datagrams on ADDR (UDP) [default: off].
    #[arg(long, env = "TALLY_LOG_LISTEN_UDP", value_name = "ADDR")]
    pub log_listen_udp: Option<SocketAddr>,
    /// Read proxy access logs as newline-separated lines on ADDR (TCP) [default: off].
    #[arg(long, env = "TALLY_LOG_LISTEN_TCP", value_name = "ADDR")]
    pub log_listen_tcp: Option<SocketAddr>,
}

/// Flags shared by every client command; `global` so they may follow a subcommand.
#[derive(Debug, Clone, Args)]
pub struct ClientOpts {
    /// URL of a tally node.
    #[arg(
        long,
        global = true,
        env = "TALLY_URL",
        default_value = crate::config::DEFAULT_URL
    )]
    pub url: String,
    /// Bearer token.
    #[arg(long, global = true, env = "TALLY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print the node's JSON reply instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct LimitsArgs {
    #[command(flatten)]
    pub client: ClientOpts,
    #[command(subcommand)]
    pub command: LimitsCommand,
}

#[derive(Debug, Subcommand)]
pub enum LimitsCommand {
    /// Create or replace a limit.
    Put(LimitPut),
    /// List limits, optionally only those whose scope includes the given pairs.
    List {
        /// Only limits with this scope pair (k=v), repeatable.
        #[arg(long = "scope", value_name = "K=V", value_parser = parse_pair)]
        scope: Vec<(String, String)>,
    },
    /// Show one limit with its usage per node.
    Get { id: String },
    /// Show a limit's usage per period, newest first (closed periods are kept for the
    /// node's --history-retention-days).
    History {
        id: String,
        /// Only periods that end after this time (RFC 3339, e.g. 2026-11-01T00:00:00Z).
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        /// Only periods that start before this time (RFC 3339).
        #[arg(long, value_name = "TIME")]
        until: Option<String>,
        /// Most periods shown, 1 to 1000 [default: 100].
        #[arg(long, value_name = "N")]
        limit: Option<u32>,
    },
    /// Delete a limit.
    Delete { id: String },
    /// Start a new period for a limit now, optionally with usage already counted.
    Reset {
        id: String,
        /// Usage to start from (USD for cost, a count otherwise) [default: 0].
        #[arg(long, value_name = "X", value_parser = parse_decimal)]
        used: Option<Decimal>,
    },
}

#[derive(Debug, Clone, Args)]
pub struct LimitPut {
    /// Limit id: [A-Za-z0-9._:-]{1,128}.
    pub id: String,
    /// Scope pair k=v, repeatable; omit for a global limit.
    #[arg(long = "scope", value_name = "K=V", value_parser = parse_pair)]
    pub scope: Vec<(String, String)>,
    /// What is counted.
    #[arg(long, value_enum)]
    pub metric: MetricArg,
    /// Maximum per period: USD for cost (e.g. 100 or 0.50), a whole number otherwise.
    #[arg(long, value_name = "X", value_parser = parse_decimal)]
    pub max: Decimal,
    /// Period length: <n><s|m|h|d|w|M|Y> (1M = one month) or `never`.
    #[arg(long)]
    pub period: String,
    /// Periods start on calendar boundaries (midnight, the 1st) instead of at creation.
    #[arg(long)]
    pub calendar_aligned: bool,
    /// IANA time zone for calendar-aligned periods [default: UTC].
    #[arg(long, value_name = "TZ")]
    pub timezone: Option<String>,
    /// soft: each node enforces on what it knows; hard: never overspent, even across a
    /// partition (an escrow of rights) [default: soft].
    #[arg(long, value_enum)]
    pub mode: Option<ModeArg>,
    /// Hard limits: a node that holds rights, NODE or NODE:WEIGHT, repeatable
    /// [default: the live nodes of the fleet, weight 1].
    #[arg(long = "member", value_name = "NODE[:WEIGHT]", value_parser = parse_member)]
    pub members: Vec<(String, u32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    Soft,
    Hard,
}

/// `NODE` or `NODE:WEIGHT` (node ids may contain `:`, so the weight is the part after the
/// last one, when it is a number).
fn parse_member(s: &str) -> Result<(String, u32), String> {
    match s.rsplit_once(':') {
        Some((node, w)) if !w.is_empty() && w.bytes().all(|b| b.is_ascii_digit()) => {
            let weight: u32 = w
                .parse()
                .map_err(|_| format!("weight {w:?} is too large"))?;
            Ok((node.to_string(), weight))
        }
        _ => Ok((s.to_string(), 1)),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MetricArg {
    Cost,
    Tokens,
    Requests,
}

impl MetricArg {
    pub fn as_str(self) -> &'static str {
        match self {
            MetricArg::Cost => "cost",
            MetricArg::Tokens => "tokens",
            MetricArg::Requests => "requests",
        }
    }
}

#[derive(Debug, Args)]
pub struct EntitiesArgs {
    #[command(flatten)]
    pub client: ClientOpts,
    #[command(subcommand)]
    pub command: EntitiesCommand,
}

#[derive(Debug, Subcommand)]
pub enum EntitiesCommand {
    /// Create or replace an entity and its parents.
    Put {
        /// DIMENSION/VALUE, e.g. virtual_key/vk-1.
        #[arg(value_parser = parse_entity)]
        entity: EntityRef,
        /// Parent pair k=v, repeatable (e.g. --parent team=eng).
        #[arg(long = "parent", value_name = "K=V", value_parser = parse_pair)]
        parents: Vec<(String, String)>,
        /// Access rule: deny every check that reaches this entity.
        #[arg(long)]
        inactive: bool,
        /// Access rule: deny every check that reaches it from this instant (RFC 3339).
        #[arg(long, value_name = "TIME")]
        expires_at: Option<String>,
        /// Access rule: an allowed value of an attribute, repeatable (e.g. --allow
        /// model=gpt-4o --allow model=gpt-4o-mini); a request reaching this entity with
        /// another value, or none, is denied.
        #[arg(long = "allow", value_name = "K=V", value_parser = parse_pair)]
        allow: Vec<(String, String)>,
    },
    /// Show an entity.
    Get {
        /// DIMENSION/VALUE, e.g. virtual_key/vk-1.
        #[arg(value_parser = parse_entity)]
        entity: EntityRef,
    },
    /// Delete an entity.
    Delete {
        /// DIMENSION/VALUE, e.g. virtual_key/vk-1.
        #[arg(value_parser = parse_entity)]
        entity: EntityRef,
    },
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub client: ClientOpts,
    /// Request attribute k=v, repeatable (e.g. --attr virtual_key=vk-1).
    #[arg(long = "attr", value_name = "K=V", value_parser = parse_pair)]
    pub attrs: Vec<(String, String)>,
    /// Estimated cost in USD [default: 0].
    #[arg(long, value_name = "USD", value_parser = parse_decimal)]
    pub cost: Option<Decimal>,
    /// Estimated tokens [default: 0, or the sum of the token kinds].
    #[arg(long, value_name = "N")]
    pub tokens: Option<u64>,
    #[command(flatten)]
    pub kinds: TokenKindArgs,
    /// Hold the estimate on the hard limits that apply, when allowed (settle it with
    /// `tally usage --reservation ID`).
    #[arg(long)]
    pub reserve: bool,
    /// Lifetime of the reservation in seconds [default: 120].
    #[arg(long, value_name = "SECS", requires = "reserve")]
    pub ttl_s: Option<u64>,
}

/// Token counts by kind, on `check` and `usage`.
#[derive(Debug, Clone, Default, Args)]
pub struct TokenKindArgs {
    /// Input tokens (not read from or written to a prompt cache). With any token kind
    /// and no --cost, the node prices the request by its `model` attribute.
    #[arg(long, value_name = "N")]
    pub input_tokens: Option<u64>,
    /// Output tokens (not reasoning).
    #[arg(long, value_name = "N")]
    pub output_tokens: Option<u64>,
    /// Input tokens read from a prompt cache.
    #[arg(long, value_name = "N")]
    pub cache_read_tokens: Option<u64>,
    /// Input tokens written to a prompt cache.
    #[arg(long, value_name = "N")]
    pub cache_creation_tokens: Option<u64>,
    /// Reasoning tokens.
    #[arg(long, value_name = "N")]
    pub reasoning_tokens: Option<u64>,
}

#[derive(Debug, Args)]
pub struct UsageArgs {
    #[command(flatten)]
    pub client: ClientOpts,
    /// Idempotency key of the request: [A-Za-z0-9._:-]{1,128}.
    #[arg(long)]
    pub id: String,
    /// Request attribute k=v, repeatable.
    #[arg(long = "attr", value_name = "K=V", value_parser = parse_pair)]
    pub attrs: Vec<(String, String)>,
    /// Cost in USD [default: 0].
    #[arg(long, value_name = "USD", value_parser = parse_decimal)]
    pub cost: Option<Decimal>,
    /// Tokens used [default: 0, or the sum of the token kinds].
    #[arg(long, value_name = "N")]
    pub tokens: Option<u64>,
    #[command(flatten)]
    pub kinds: TokenKindArgs,
    /// Requests made [default: 1].
    #[arg(long, value_name = "N")]
    pub requests: Option<u64>,
    /// The reservation (from `tally check --reserve`) this usage settles.
    #[arg(long, value_name = "ID")]
    pub reservation: Option<String>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Only ask GET /healthz (no token needed): exit 0 when the process serves, 1 when it
    /// does not. For container health checks.
    #[arg(long)]
    pub health_only: bool,
    #[command(flatten)]
    pub client: ClientOpts,
}

/// A non-negative decimal as typed, with its value. The text is kept so a count can be
/// sent as an exact JSON integer.
#[derive(Debug, Clone, PartialEq)]
pub struct Decimal {
    pub text: String,
    pub value: f64,
}

impl Decimal {
    /// The value as a whole number, if it is one (`100`, `100.0`, `1e6`).
    pub fn as_whole(&self) -> Option<u64> {
        // 2^53: beyond it an f64 no longer holds every integer.
        const EXACT_MAX: f64 = 9_007_199_254_740_992.0;
        if let Ok(n) = self.text.parse::<u64>() {
            return Some(n);
        }
        (self.value.fract() == 0.0 && self.value <= EXACT_MAX).then_some(self.value as u64)
    }
}

/// `DIMENSION/VALUE` of an entity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntityRef {
    pub dimension: String,
    pub value: String,
}

impl std::fmt::Display for EntityRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.dimension, self.value)
    }
}

/// Parses `k=v` (both sides non-empty; the value may contain `=`).
pub fn parse_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && !v.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected KEY=VALUE such as team=eng, got {s:?}")),
    }
}

/// Parses a finite, non-negative decimal such as `100`, `0.02` or `1e6`.
pub fn parse_decimal(s: &str) -> Result<Decimal, String> {
    match s.trim().parse::<f64>() {
        Ok(value) if value.is_finite() && value >= 0.0 => Ok(Decimal {
            text: s.trim().to_owned(),
            value,
        }),
        _ => Err(format!(
            "expected a non-negative number such as 100 or 0.02, got {s:?}"
        )),
    }
}

/// Parses `DIMENSION/VALUE`, splitting at the first `/`.
pub fn parse_entity(s: &str) -> Result<EntityRef, String> {
    match s.split_once('/') {
        Some((d, v)) if !d.is_empty() && !v.is_empty() => Ok(EntityRef {
            dimension: d.to_owned(),
            value: v.to_owned(),
        }),
        _ => Err(format!(
            "expected DIMENSION/VALUE such as virtual_key/vk-1, got {s:?}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("tally").chain(args.iter().copied()))
    }

    #[test]
    fn command_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn limits_put() {
        let cli = parse(&[
            "limits",
            "put",
            "team-eng",
            "--scope",
            "team=eng",
            "--scope",
            "model=gpt-4o",
            "--metric",
            "cost",
            "--max",
            "100",
            "--period",
            "1M",
            "--calendar-aligned",
            "--timezone",
            "Europe/Paris",
            "--json",
            "--url",
            "http://n1:7070",
        ])
        .unwrap();
        let Command::Limits(LimitsArgs {
            client,
            command: LimitsCommand::Put(put),
        }) = cli.command
        else {
            panic!("wrong command");
        };
        assert!(client.json);
        assert_eq!(client.url, "http://n1:7070");
        assert_eq!(put.id, "team-eng");
        assert_eq!(
            put.scope,
            [
                ("team".into(), "eng".into()),
                ("model".into(), "gpt-4o".into())
            ]
        );
        assert_eq!(put.metric, MetricArg::Cost);
        assert_eq!(put.max.value, 100.0);
        assert!(put.calendar_aligned);
        assert_eq!(put.timezone.as_deref(), Some("Europe/Paris"));
    }

    #[test]
    fn usage_errors() {
        for bad in [
            &[
                "limits", "put", "x", "--metric", "cost", "--max", "-1", "--period", "1d",
            ][..],
            &[
                "limits", "put", "x", "--metric", "cash", "--max", "1", "--period", "1d",
            ],
            &[
                "limits", "put", "x", "--metric", "cost", "--max", "NaN", "--period", "1d",
            ],
            &["check", "--attr", "novalue"],
            &["check", "--attr", "=v"],
            &["entities", "put", "no-slash"],
            &["usage", "--attr", "a=b"],
            &["serve", "--listen", "localhost"],
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn client_commands() {
        let cli = parse(&[
            "entities",
            "put",
            "virtual_key/vk-1",
            "--parent",
            "team=eng",
        ])
        .unwrap();
        let Command::Entities(EntitiesArgs {
            command: EntitiesCommand::Put {
                entity, parents, ..
            },
            ..
        }) = cli.command
        else {
            panic!("wrong command");
        };
        assert_eq!(entity.to_string(), "virtual_key/vk-1");
        assert_eq!(parents, [("team".into(), "eng".into())]);

        let cli = parse(&["limits", "reset", "x", "--used", "40"]).unwrap();
        let Command::Limits(LimitsArgs {
            command: LimitsCommand::Reset { used, .. },
            ..
        }) = cli.command
        else {
            panic!("wrong command");
        };
        assert_eq!(used.unwrap().as_whole(), Some(40));

        let cli = parse(&[
            "check", "--attr", "k=a=b", "--cost", "0.02", "--tokens", "5",
        ])
        .unwrap();
        let Command::Check(check) = cli.command else {
            panic!("wrong command");
        };
        assert_eq!(check.attrs, [("k".into(), "a=b".into())]);
        assert_eq!(check.cost.unwrap().value, 0.02);
        assert_eq!(check.tokens, Some(5));

        assert!(parse(&["status", "--json"]).is_ok());
        assert!(parse(&["limits", "list", "--scope", "team=eng"]).is_ok());
        assert!(parse(&["usage", "--id", "r1", "--attr", "a=b", "--requests", "2"]).is_ok());
    }

    #[test]
    fn serve_flags_parse_without_defaults() {
        let cli = parse(&[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--seed",
            "a:1",
            "--seed",
            "b:2,c:3",
            "--insecure",
            "--log-format",
            "json",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("wrong command");
        };
        assert_eq!(args.listen, Some("127.0.0.1:0".parse().unwrap()));
        assert_eq!(args.seeds, ["a:1", "b:2", "c:3"]);
        assert!(args.insecure);
        assert_eq!(args.log_format, Some(LogFormat::Json));
        assert_eq!(args.data_dir, None);
    }

    #[test]
    fn decimal_whole_numbers() {
        let d = |s| parse_decimal(s).unwrap();
        assert_eq!(d("100").as_whole(), Some(100));
        assert_eq!(d("100.0").as_whole(), Some(100));
        assert_eq!(d("1e6").as_whole(), Some(1_000_000));
        assert_eq!(d("1.5").as_whole(), None);
        assert_eq!(d("18446744073709551615").as_whole(), Some(u64::MAX));
        assert_eq!(d("1e30").as_whole(), None);
    }
}
