//! The client commands: turn parsed arguments into HTTP requests (docs/API.md), send them
//! to a node with ureq, and print the reply as a table or, with `--json`, as pretty JSON.
//! Request bodies are built as, and replies read as, the types of `tally_api`: a reply
//! that does not have its type's shape is an error, not a table of dashes.
//!
//! Building requests ([`plan`]) and rendering replies (`render_*`, [`Table`]) are pure
//! functions, tested without a server; only [`Http::send`] does I/O. Errors are returned
//! as `anyhow` errors whose text is what `main` prints after `error: `: an error reply
//! reads `<code>: <message>`, an unreachable node says how to start one.

use std::fmt::Write as _;
use std::time::Duration;

use std::collections::BTreeMap;

use anyhow::{anyhow, bail};
use serde::Deserialize as _;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tally_api::{
    Amount, Attributes, Balance, CheckReply, CheckRequest, ClusterReply, Decommissioned,
    EntityRequest, EntityView, ErrorReply, HistoryReply, LimitList, LimitRequest, LimitStatus,
    LimitView, MemberSpec, MemberWeight, ResetRequest, UsageReply, UsageRequest,
};

use crate::cli::{
    CheckArgs, ClientOpts, Command, Decimal, EntitiesArgs, EntitiesCommand, EntityRef, LimitPut,
    LimitsArgs, LimitsCommand, MetricArg, ModeArg, NodesArgs, NodesCommand, PricesArgs,
    PricesCommand, StatusArgs, UsageArgs,
};

/// Whole-request timeout: generous, since a usage record waits for a durable commit.
const REQUEST_TIMEOUT_SECS: u64 = 30;
/// Largest reply body read; a list of every limit stays far below it.
const REPLY_BYTES_MAX: u64 = 64 << 20;

/// HTTP method of a planned request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Put,
    Post,
    Delete,
}

/// One HTTP request to make: method, path (with query) and optional JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub method: Method,
    pub path: String,
    pub body: Option<Value>,
}

impl Request {
    fn get(path: String) -> Request {
        Request {
            method: Method::Get,
            path,
            body: None,
        }
    }
}

/// How a successful reply is shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum View {
    LimitList,
    Limit,
    History,
    Entity,
    Deleted(String),
    Check,
    Usage,
    Decommissioned,
    Price,
    PriceList,
}

/// A reply: status code and body (JSON, or a JSON string holding a non-JSON body).
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
}

impl Reply {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The error of a failed reply as `<code>: <message>` (the API's error shape), or the
    /// status and body when the body has another shape.
    pub fn error(&self) -> anyhow::Error {
        match ErrorReply::deserialize(&self.body) {
            Ok(ErrorReply { error }) => anyhow!("{}: {}", error.code, error.message),
            Err(_) => {
                let text = match &self.body {
                    Value::String(s) => s.trim().to_owned(),
                    Value::Null => String::new(),
                    other => other.to_string(),
                };
                anyhow!("http_{}: {}", self.status, truncate(&text, 200))
            }
        }
    }
}

/// Runs a client command (anything but `serve`).
pub fn run(command: Command) -> anyhow::Result<()> {
    if let Command::Import(args) = &command {
        return crate::proxies::import::run_cli(args);
    }
    if let Command::Prices(PricesArgs {
        client,
        command:
            PricesCommand::Import {
                file,
                provider,
                dry_run,
            },
    }) = &command
    {
        return crate::prices::import_cli(client, file, provider, *dry_run);
    }
    if let Command::Status(StatusArgs {
        client,
        health_only,
    }) = &command
    {
        return if *health_only {
            health(client)
        } else {
            status(client)
        };
    }
    let (opts, request, view) = plan(&command)?;
    let http = Http::new(opts)?;
    let reply = http.send(&request)?;
    if !reply.is_success() {
        return Err(reply.error());
    }
    if opts.json {
        println!("{}", pretty(&reply.body));
    } else {
        print!("{}", render(&view, &reply.body)?);
    }
    Ok(())
}

/// Plans the request of a client command (not `serve` or `status`).
pub fn plan(command: &Command) -> anyhow::Result<(&ClientOpts, Request, View)> {
    Ok(match command {
        Command::Limits(LimitsArgs { client, command }) => {
            let (request, view) = plan_limits(command)?;
            (client, request, view)
        }
        Command::Entities(EntitiesArgs { client, command }) => {
            let (request, view) = plan_entities(command)?;
            (client, request, view)
        }
        Command::Check(args) => (&args.client, check_request(args)?, View::Check),
        Command::Nodes(NodesArgs { client, command }) => match command {
            NodesCommand::Decommission { id, successor } => {
                let mut body = json!({});
                if let Some(s) = successor {
                    body["successor"] = json!(s);
                }
                (
                    client,
                    Request {
                        method: Method::Post,
                        path: format!("/v1/nodes/{}/decommission", encode(id)),
                        body: Some(body),
                    },
                    View::Decommissioned,
                )
            }
        },
        Command::Usage(args) => (&args.client, usage_request(args)?, View::Usage),
        Command::Prices(PricesArgs { client, command }) => {
            let path = |m: &str| format!("/v1/prices/{}", encode(m));
            let (request, view) = match command {
                PricesCommand::Put {
                    model,
                    input,
                    output,
                    cache_read,
                    cache_creation,
                    reasoning,
                } => (
                    Request {
                        method: Method::Put,
                        path: path(model),
                        body: Some(to_json(&tally_api::PriceRequest {
                            input: *input,
                            output: *output,
                            cache_read: *cache_read,
                            cache_creation: *cache_creation,
                            reasoning: *reasoning,
                        })),
                    },
                    View::Price,
                ),
                PricesCommand::Get { model } => (Request::get(path(model)), View::Price),
                PricesCommand::List => (Request::get("/v1/prices".to_owned()), View::PriceList),
                PricesCommand::Delete { model } => (
                    Request {
                        method: Method::Delete,
                        path: path(model),
                        body: None,
                    },
                    View::Deleted(format!("price of {model}")),
                ),
                PricesCommand::Import { .. } => {
                    bail!("internal: prices import is not one request")
                }
            };
            (client, request, view)
        }
        Command::Serve(_) | Command::Status(_) | Command::Import(_) => {
            bail!("internal: plan() covers request/reply commands only")
        }
    })
}

fn plan_limits(command: &LimitsCommand) -> anyhow::Result<(Request, View)> {
    Ok(match command {
        LimitsCommand::Put(put) => (
            Request {
                method: Method::Put,
                path: format!("/v1/limits/{}", encode(&put.id)),
                body: Some(limit_put_body(put)?),
            },
            View::Limit,
        ),
        LimitsCommand::List { scope } => {
            pairs_to_map("--scope", scope)?;
            let query: Vec<String> = scope
                .iter()
                .map(|(k, v)| format!("scope.{}={}", encode(k), encode(v)))
                .collect();
            let mut path = "/v1/limits".to_owned();
            if !query.is_empty() {
                path = format!("{path}?{}", query.join("&"));
            }
            (Request::get(path), View::LimitList)
        }
        LimitsCommand::Get { id } => (
            Request::get(format!("/v1/limits/{}", encode(id))),
            View::Limit,
        ),
        LimitsCommand::History {
            id,
            since,
            until,
            limit,
        } => {
            let mut query = Vec::new();
            if let Some(t) = since {
                query.push(format!("since={}", encode(t)));
            }
            if let Some(t) = until {
                query.push(format!("until={}", encode(t)));
            }
            if let Some(n) = limit {
                query.push(format!("limit={n}"));
            }
            let mut path = format!("/v1/limits/{}/history", encode(id));
            if !query.is_empty() {
                path = format!("{path}?{}", query.join("&"));
            }
            (Request::get(path), View::History)
        }
        LimitsCommand::Delete { id } => (
            Request {
                method: Method::Delete,
                path: format!("/v1/limits/{}", encode(id)),
                body: None,
            },
            View::Deleted(format!("limit {id}")),
        ),
        LimitsCommand::Reset { id, used } => {
            let body = to_json(&ResetRequest {
                used: used.as_ref().map(decimal_json),
            });
            (
                Request {
                    method: Method::Post,
                    path: format!("/v1/limits/{}/reset", encode(id)),
                    body: Some(body),
                },
                View::Limit,
            )
        }
    })
}

fn plan_entities(command: &EntitiesCommand) -> anyhow::Result<(Request, View)> {
    let path =
        |e: &EntityRef| format!("/v1/entities/{}/{}", encode(&e.dimension), encode(&e.value));
    Ok(match command {
        EntitiesCommand::Put {
            entity,
            parents,
            inactive,
            expires_at,
            allow,
        } => {
            let mut rules: std::collections::BTreeMap<String, Vec<String>> = Default::default();
            for (k, v) in allow {
                rules.entry(k.clone()).or_default().push(v.clone());
            }
            (
                Request {
                    method: Method::Put,
                    path: path(entity),
                    body: Some(to_json(&EntityRequest {
                        parents: pairs_to_map("--parent", parents)?,
                        active: inactive.then_some(false),
                        expires_at: expires_at.clone(),
                        allow: (!rules.is_empty()).then_some(rules),
                    })),
                },
                View::Entity,
            )
        }
        EntitiesCommand::Get { entity } => (Request::get(path(entity)), View::Entity),
        EntitiesCommand::Delete { entity } => (
            Request {
                method: Method::Delete,
                path: path(entity),
                body: None,
            },
            View::Deleted(format!("entity {entity}")),
        ),
    })
}

/// A request body as the JSON it is sent as.
fn to_json<T: serde::Serialize>(body: &T) -> Value {
    serde_json::to_value(body).expect("a request body serialises")
}

/// The body of `PUT /v1/limits/{id}`: `max` is a JSON number of USD for cost and an exact
/// JSON integer for tokens and requests.
pub fn limit_put_body(put: &LimitPut) -> anyhow::Result<Value> {
    let max = match put.metric {
        MetricArg::Cost => serde_json::Number::from_f64(put.max.value)
            .ok_or_else(|| anyhow!("--max must be a finite number, got {}", put.max.text))?,
        metric => match put.max.as_whole() {
            Some(n) => n.into(),
            None => bail!(
                "--max for a {} limit must be a whole number, got {}",
                metric.as_str(),
                put.max.text
            ),
        },
    };
    Ok(to_json(&LimitRequest {
        scope: pairs_to_map("--scope", &put.scope)?,
        metric: put.metric.as_str().to_owned(),
        max,
        period: put.period.clone(),
        calendar_aligned: put.calendar_aligned,
        timezone: put.timezone.clone(),
        mode: put.mode.map(|m| {
            match m {
                ModeArg::Soft => "soft",
                ModeArg::Hard => "hard",
            }
            .to_owned()
        }),
        members: (!put.members.is_empty()).then(|| {
            put.members
                .iter()
                .map(|(node, weight)| {
                    MemberSpec::Weighted(MemberWeight {
                        node: node.clone(),
                        weight: *weight,
                    })
                })
                .collect()
        }),
    }))
}

/// `--attr` pairs as request attributes.
fn attributes(pairs: &[(String, String)]) -> anyhow::Result<Attributes<'static>> {
    Ok(pairs_to_map("--attr", pairs)?.into_iter().collect())
}

/// `POST /v1/check`; estimates are sent only when given.
pub fn check_request(args: &CheckArgs) -> anyhow::Result<Request> {
    let body = CheckRequest {
        attributes: attributes(&args.attrs)?,
        cost: args.cost.as_ref().map(|c| c.value),
        tokens: args.tokens,
        input_tokens: args.kinds.input_tokens,
        output_tokens: args.kinds.output_tokens,
        cache_read_tokens: args.kinds.cache_read_tokens,
        cache_creation_tokens: args.kinds.cache_creation_tokens,
        reasoning_tokens: args.kinds.reasoning_tokens,
        reserve: args.reserve,
        ttl_s: args.ttl_s,
    };
    Ok(Request {
        method: Method::Post,
        path: "/v1/check".to_owned(),
        body: Some(to_json(&body)),
    })
}

/// `POST /v1/usage`; amounts are sent only when given (the node applies its defaults).
pub fn usage_request(args: &UsageArgs) -> anyhow::Result<Request> {
    let body = UsageRequest {
        id: args.id.clone(),
        attributes: attributes(&args.attrs)?,
        cost: args.cost.as_ref().map(|c| c.value),
        tokens: args.tokens,
        input_tokens: args.kinds.input_tokens,
        output_tokens: args.kinds.output_tokens,
        cache_read_tokens: args.kinds.cache_read_tokens,
        cache_creation_tokens: args.kinds.cache_creation_tokens,
        reasoning_tokens: args.kinds.reasoning_tokens,
        requests: args.requests,
        at: None,
        reservation: args.reservation.clone(),
    };
    Ok(Request {
        method: Method::Post,
        path: "/v1/usage".to_owned(),
        body: Some(to_json(&body)),
    })
}

/// Whole numbers go as JSON integers (exact for counts), others as JSON numbers.
fn decimal_json(d: &Decimal) -> serde_json::Number {
    match d.as_whole() {
        Some(n) => n.into(),
        None => serde_json::Number::from_f64(d.value).unwrap_or_else(|| 0.into()),
    }
}

/// `k=v` pairs as a map; a key given twice is an error rather than a silent pick.
fn pairs_to_map(
    flag: &str,
    pairs: &[(String, String)],
) -> anyhow::Result<BTreeMap<String, String>> {
    let mut map = BTreeMap::new();
    for (k, v) in pairs {
        if map.insert(k.clone(), v.clone()).is_some() {
            bail!("{flag} {k}=… given twice: give each key once");
        }
    }
    Ok(map)
}

/// Percent-encodes a path segment or query component (RFC 3986 unreserved and `:` pass).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b':') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// HTTP

/// A blocking HTTP client for one node.
pub struct Http {
    agent: ureq::Agent,
    base: String,
    token: Option<String>,
}

impl Http {
    pub fn new(opts: &ClientOpts) -> anyhow::Result<Http> {
        let base = opts.url.trim().trim_end_matches('/').to_owned();
        if base.starts_with("https://") {
            bail!(
                "{base}: https is not built into this client; use http:// (tally serves \
                 plain HTTP; terminate TLS in a proxy)"
            );
        }
        if !base.starts_with("http://") || base.len() == "http://".len() {
            bail!(
                "invalid --url {base:?}: expected http://HOST:PORT such as http://127.0.0.1:7070"
            );
        }
        let config = ureq::Agent::config_builder()
            // Error replies carry a JSON body worth showing; read them as replies.
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(REQUEST_TIMEOUT_SECS)))
            .build();
        Ok(Http {
            agent: ureq::Agent::new_with_config(config),
            base,
            token: opts.token.clone().filter(|t| !t.is_empty()),
        })
    }

    /// Sends a request. Transport failures are errors; any HTTP status is a [`Reply`].
    pub fn send(&self, request: &Request) -> anyhow::Result<Reply> {
        let url = format!("{}{}", self.base, request.path);
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let body = request.body.as_ref().map(Value::to_string);
        let result = match request.method {
            Method::Get | Method::Delete => {
                let mut rb = if request.method == Method::Get {
                    self.agent.get(&url)
                } else {
                    self.agent.delete(&url)
                };
                if let Some(auth) = &auth {
                    rb = rb.header("authorization", auth);
                }
                rb.call()
            }
            Method::Put | Method::Post => {
                let mut rb = if request.method == Method::Put {
                    self.agent.put(&url)
                } else {
                    self.agent.post(&url)
                };
                if let Some(auth) = &auth {
                    rb = rb.header("authorization", auth);
                }
                rb.header("content-type", "application/json")
                    .send(body.as_deref().unwrap_or("{}"))
            }
        };
        let mut response = result.map_err(|e| self.transport_error(e))?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .with_config()
            .limit(REPLY_BYTES_MAX)
            .read_to_string()
            .map_err(|e| anyhow!("reading the reply from {url}: {e}"))?;
        let body = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Ok(Reply { status, body })
    }

    fn transport_error(&self, e: ureq::Error) -> anyhow::Error {
        let base = &self.base;
        match &e {
            ureq::Error::ConnectionFailed => {
                anyhow!("cannot reach {base}: is the node running? (tally serve)")
            }
            ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
                anyhow!("cannot reach {base}: is the node running? (tally serve)")
            }
            ureq::Error::HostNotFound => {
                anyhow!("cannot reach {base}: host not found (check --url or TALLY_URL)")
            }
            ureq::Error::Io(io) => anyhow!("cannot reach {base}: {io}"),
            _ => anyhow!("cannot reach {base}: {e}"),
        }
    }
}

/// `tally status`: /healthz, /readyz and /v1/cluster. Not ready is shown, not an error;
/// an unreachable node or a failed cluster request is.
/// `tally status --health-only`: GET /healthz alone.
fn health(opts: &ClientOpts) -> anyhow::Result<()> {
    let http = Http::new(opts)?;
    let health = http.send(&Request::get("/healthz".to_owned()))?;
    if opts.json {
        println!(
            "{}",
            pretty(
                &json!({"url": http.base, "healthz": {"status": health.status, "body": health.body}})
            )
        );
    } else {
        println!(
            "healthy  {}",
            if health.is_success() { "yes" } else { "no" }
        );
    }
    if !health.is_success() {
        return Err(health.error());
    }
    Ok(())
}

fn status(opts: &ClientOpts) -> anyhow::Result<()> {
    let http = Http::new(opts)?;
    let health = http.send(&Request::get("/healthz".to_owned()))?;
    let ready = http.send(&Request::get("/readyz".to_owned()))?;
    let cluster = http.send(&Request::get("/v1/cluster".to_owned()))?;
    if opts.json {
        let doc = json!({
            "url": http.base,
            "healthz": {"status": health.status, "body": health.body},
            "readyz": {"status": ready.status, "body": ready.body},
            "cluster": {"status": cluster.status, "body": cluster.body},
        });
        println!("{}", pretty(&doc));
    } else {
        let cluster_body = if cluster.is_success() {
            Some(typed::<ClusterReply>(&cluster.body, "cluster reply")?)
        } else {
            None
        };
        print!(
            "{}",
            render_status(&http.base, &health, &ready, cluster_body.as_ref())
        );
    }
    if !cluster.is_success() {
        return Err(cluster.error());
    }
    Ok(())
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

// ---------------------------------------------------------------------------------------
// Rendering (pure)

/// A reply body read as its type; a node that sent another shape is an error.
pub fn typed<T: DeserializeOwned>(body: &Value, what: &str) -> anyhow::Result<T> {
    T::deserialize(body).map_err(|e| {
        anyhow!(
            "the node's reply is not a {what} ({e}): {}",
            truncate(&body.to_string(), 200)
        )
    })
}

/// Renders a successful reply for a view.
pub fn render(view: &View, body: &Value) -> anyhow::Result<String> {
    Ok(match view {
        View::LimitList => render_limit_list(&typed(body, "limit list")?),
        View::Limit => render_limit(&typed(body, "limit view")?),
        View::History => render_history(&typed(body, "limit history")?),
        View::Entity => render_entity(&typed(body, "entity")?),
        View::Deleted(what) => format!("deleted {what}\n"),
        View::Check => render_check(&typed(body, "check reply")?),
        View::Usage => render_usage(&typed(body, "usage reply")?),
        View::Price => render_prices(&[typed(body, "price")?]),
        View::PriceList => {
            render_prices(&typed::<tally_api::PriceList>(body, "price list")?.prices)
        }
        View::Decommissioned => {
            let d: Decommissioned = typed(body, "decommission reply")?;
            format!(
                "decommissioned {}: its unspent rights of hard limits pass to {}\n",
                d.node, d.successor
            )
        }
    })
}

/// A text table: columns separated by two spaces, numbers right-aligned, no trailing
/// whitespace. With no headers, only rows are printed (key/value views).
#[derive(Debug, Default)]
pub struct Table {
    headers: Vec<String>,
    right: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// Columns named `headers`; a name starting with `>` is right-aligned (the `>` is
    /// not printed).
    pub fn new(headers: &[&str]) -> Table {
        Table {
            headers: headers
                .iter()
                .map(|h| h.trim_start_matches('>').to_owned())
                .collect(),
            right: headers.iter().map(|h| h.starts_with('>')).collect(),
            rows: Vec::new(),
        }
    }

    /// A table without a header line, `columns` wide, all left-aligned.
    pub fn headless(columns: usize) -> Table {
        Table {
            headers: Vec::new(),
            right: vec![false; columns],
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        assert_eq!(
            cells.len(),
            self.right.len(),
            "row width must match the table"
        );
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let columns = self.right.len();
        let mut widths = vec![0usize; columns];
        let lines = std::iter::once(&self.headers)
            .filter(|h| !h.is_empty())
            .chain(&self.rows);
        for line in lines.clone() {
            for (w, cell) in widths.iter_mut().zip(line) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for line in lines {
            let mut text = String::new();
            for (i, cell) in line.iter().enumerate() {
                if i > 0 {
                    text.push_str("  ");
                }
                let pad = widths[i] - cell.chars().count();
                if self.right[i] {
                    text.extend(std::iter::repeat_n(' ', pad));
                    text.push_str(cell);
                } else {
                    text.push_str(cell);
                    text.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(text.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Money and other decimals: at most 6 decimals (micro-USD), trailing zeros trimmed.
pub fn format_money(x: f64) -> String {
    let s = format!("{x:.6}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".to_owned()
    } else {
        s.to_owned()
    }
}

/// An amount from a reply: counts as they are, USD via [`format_money`].
/// A signed amount (free rights may be negative).
pub fn format_balance(b: Balance) -> String {
    match b {
        Balance::Count(n) => n.to_string(),
        Balance::Usd(x) if x < 0.0 => format!("-{}", format_money(-x)),
        Balance::Usd(x) => format_money(x),
    }
}

pub fn format_amount(a: Amount) -> String {
    match a {
        Amount::Count(n) => n.to_string(),
        Amount::Usd(x) => format_money(x),
    }
}

/// An optional field (a time), or `-` when null.
fn text(v: &Option<String>) -> String {
    v.clone().unwrap_or_else(|| "-".to_owned())
}

/// A scope or parents map as `k=v,k=v` (sorted by key); `{}` when empty (global).
pub fn format_pairs(map: &BTreeMap<String, String>) -> String {
    if map.is_empty() {
        return "{}".to_owned();
    }
    let pairs: Vec<String> = map.iter().map(|(k, v)| format!("{k}={v}")).collect();
    pairs.join(",")
}

/// `1M`, or `1M cal` when calendar-aligned (with the zone when it is not UTC).
fn format_period(limit: &LimitView) -> String {
    let mut s = limit.period.clone();
    if limit.calendar_aligned {
        s.push_str(" cal");
        if limit.timezone != "UTC" {
            s.push(' ');
            s.push_str(&limit.timezone);
        }
    }
    s
}

/// `GET /v1/limits`.
pub fn render_limit_list(body: &LimitList) -> String {
    let limits = &body.limits;
    if limits.is_empty() {
        return "no limits\n".to_owned();
    }
    let mut table = Table::new(&[
        "ID",
        "SCOPE",
        "METRIC",
        ">USED",
        ">MAX",
        ">REMAINING",
        "PERIOD",
        "RESETS_AT",
    ]);
    for l in limits {
        table.row(vec![
            l.id.clone(),
            format_pairs(&l.scope),
            l.metric.clone(),
            format_amount(l.used),
            format_amount(l.max),
            format_amount(l.remaining),
            format_period(l),
            text(&l.resets_at),
        ]);
    }
    table.render()
}

/// `GET /v1/limits/{id}/history`: one row per epoch, newest first; `*` marks the
/// current one.
pub fn render_history(body: &HistoryReply) -> String {
    let epochs = &body.epochs;
    if epochs.is_empty() {
        return "no history\n".to_owned();
    }
    let mut table = Table::new(&["PERIOD_START", "PERIOD_END", ">USED", "NODES", "NOTE"]);
    for e in epochs {
        let nodes: Vec<String> = e
            .nodes
            .iter()
            .map(|(k, v)| format!("{k}={}", format_amount(*v)))
            .collect();
        let mut note = Vec::new();
        if e.current {
            note.push("current".to_owned());
        }
        if e.baseline.as_f64() > 0.0 {
            note.push(format!("baseline {}", format_amount(e.baseline)));
        }
        table.row(vec![
            text(&e.period_start),
            text(&e.period_end),
            format_amount(e.used),
            if nodes.is_empty() {
                "-".to_owned()
            } else {
                nodes.join(",")
            },
            note.join(", "),
        ]);
    }
    table.render()
}

/// One limit view (`GET`/`PUT /v1/limits/{id}`, reset), with usage per node.
pub fn render_limit(l: &LimitView) -> String {
    let mut period = l.period.clone();
    if l.calendar_aligned {
        let _ = write!(period, ", calendar-aligned in {}", l.timezone);
    }
    let mut kv = Table::headless(2);
    for (key, value) in [
        ("id", l.id.clone()),
        ("scope", format_pairs(&l.scope)),
        ("metric", l.metric.clone()),
        ("max", format_amount(l.max)),
        ("used", format_amount(l.used)),
        ("remaining", format_amount(l.remaining)),
        ("period", period),
        ("period_start", text(&l.period_start)),
        ("resets_at", text(&l.resets_at)),
    ] {
        kv.row(vec![key.to_owned(), value]);
    }
    if l.mode.as_deref() == Some("hard") {
        kv.row(vec!["mode".to_owned(), "hard".to_owned()]);
    }
    let mut out = kv.render();
    if let Some(rights) = l.rights.as_ref().filter(|n| !n.is_empty()) {
        let mut table = Table::new(&[
            "NODE",
            ">ALLOCATED",
            ">RECEIVED",
            ">GIVEN",
            ">USED",
            ">FREE",
        ]);
        for (node, r) in rights {
            let mut name = node.clone();
            if r.decommissioned {
                name.push_str(" (decommissioned)");
            }
            table.row(vec![
                name,
                format_amount(r.allocated),
                format_amount(r.received),
                format_amount(r.given),
                format_amount(r.used),
                format_balance(r.free),
            ]);
        }
        out.push('\n');
        out.push_str(&table.render());
    } else if !l.nodes.is_empty() {
        let mut table = Table::new(&["NODE", ">USED"]);
        for (node, used) in &l.nodes {
            table.row(vec![node.clone(), format_amount(*used)]);
        }
        out.push('\n');
        out.push_str(&table.render());
    }
    out
}

/// An entity (`{"dimension", "value", "parents"}`).
pub fn render_entity(e: &EntityView) -> String {
    let mut kv = Table::headless(2);
    kv.row(vec![
        "entity".to_owned(),
        format!("{}/{}", e.dimension, e.value),
    ]);
    let parents = if e.parents.is_empty() {
        "-".to_owned()
    } else {
        format_pairs(&e.parents)
    };
    kv.row(vec!["parents".to_owned(), parents]);
    if e.active == Some(false) {
        kv.row(vec![
            "active".to_owned(),
            "false (every check is denied)".to_owned(),
        ]);
    }
    if let Some(at) = &e.expires_at {
        kv.row(vec!["expires_at".to_owned(), at.clone()]);
    }
    for (k, vs) in e.allow.iter().flatten() {
        kv.row(vec![format!("allow {k}"), vs.join(", ")]);
    }
    kv.render()
}

/// Prices, USD per million tokens; `-` where a kind falls back to another price.
pub fn render_prices(prices: &[tally_api::PriceView]) -> String {
    if prices.is_empty() {
        return "no prices\n".to_owned();
    }
    let mut t = Table::new(&[
        "MODEL",
        ">INPUT",
        ">OUTPUT",
        ">CACHE_READ",
        ">CACHE_CREATION",
        ">REASONING",
    ]);
    let opt = |v: Option<f64>| v.map_or("-".to_owned(), |v| v.to_string());
    for p in prices {
        t.row(vec![
            p.model.clone(),
            p.input.to_string(),
            p.output.to_string(),
            opt(p.cache_read),
            opt(p.cache_creation),
            opt(p.reasoning),
        ]);
    }
    let mut out = "USD per million tokens\n".to_owned();
    out.push_str(&t.render());
    out
}

/// How a request given by tokens was priced.
fn render_priced(out: &mut String, p: Option<&tally_api::Priced>) {
    if let Some(p) = p {
        let _ = writeln!(
            out,
            "priced at {}: {} USD (exactly {})",
            p.model,
            format_money(p.cost),
            p.exact_usd
        );
    }
}

/// The limits of a check or usage reply; `*` marks the ones in `denied`.
fn limit_status_table(limits: &[LimitStatus], denied: Option<&[String]>) -> String {
    if limits.is_empty() {
        return "no limits apply\n".to_owned();
    }
    let mut headers = vec!["ID", "METRIC", ">USED", ">MAX", ">REMAINING", "RESETS_AT"];
    if denied.is_some() {
        headers.insert(0, "");
    }
    let mut table = Table::new(&headers);
    for l in limits {
        let mut row = vec![
            l.id.clone(),
            l.metric.clone(),
            format_amount(l.used),
            format_amount(l.max),
            format_amount(l.remaining),
            text(&l.resets_at),
        ];
        if let Some(denied) = denied {
            let mark = if denied.contains(&l.id) { "*" } else { "" };
            row.insert(0, mark.to_owned());
        }
        table.row(row);
    }
    table.render()
}

/// `POST /v1/check`: the verdict, then every applicable limit, `*` on the denying ones.
pub fn render_check(body: &CheckReply) -> String {
    let mut out = if body.allowed {
        "ALLOWED".to_owned()
    } else {
        format!("DENIED by {}", body.denied_by.join(", "))
    };
    if body.stale {
        out.push_str(" (stale: the node has not caught up with its peers yet)");
    }
    out.push('\n');
    if let Some(a) = &body.access {
        let why = match a.rule.as_str() {
            "inactive" => "is inactive".to_owned(),
            "expired" => format!("expired at {}", a.expires_at.as_deref().unwrap_or("?")),
            _ => format!(
                "does not allow {}={}",
                a.attribute.as_deref().unwrap_or("?"),
                a.given.clone().flatten().as_deref().unwrap_or("(none)")
            ),
        };
        let _ = writeln!(out, "access denied: {}/{} {why}", a.dimension, a.value);
    }
    render_priced(&mut out, body.priced.as_ref());
    if let Some(r) = &body.reservation {
        let _ = writeln!(out, "reservation {} until {}", r.id, r.expires_at);
    }
    for l in &body.limits {
        if let Some(Some(reason)) = &l.reason {
            let retry = l
                .retry_after_ms
                .map(|ms| format!("; retry in {ms} ms"))
                .unwrap_or_default();
            let why = if reason == "rights" {
                "this node holds too few rights now"
            } else {
                "the budget is spent"
            };
            let _ = writeln!(out, "{}: {why}{retry}", l.id);
        }
    }
    out.push_str(&limit_status_table(&body.limits, Some(&body.denied_by)));
    out
}

/// `POST /v1/usage`.
pub fn render_usage(body: &UsageReply) -> String {
    let mut out = if body.applied {
        "applied\n".to_owned()
    } else {
        "not applied: this id was already recorded on this node\n".to_owned()
    };
    render_priced(&mut out, body.priced.as_ref());
    if let Some(over) = &body.overrun {
        for (id, v) in over {
            let _ = writeln!(
                out,
                "overrun on hard limit {id}: {} beyond the rights this node held",
                format_amount(*v)
            );
        }
    }
    out.push_str(&limit_status_table(&body.limits, None));
    out
}

/// `tally status`: health, readiness, then the cluster's nodes (`cluster` is `None` when
/// that request failed; the caller reports the error).
pub fn render_status(
    url: &str,
    health: &Reply,
    ready: &Reply,
    cluster: Option<&ClusterReply>,
) -> String {
    let describe = |r: &Reply, ok: &str| {
        if r.is_success() {
            ok.to_owned()
        } else {
            let why = ErrorReply::deserialize(&r.body)
                .map(|e| e.error.message)
                .ok()
                .or_else(|| r.body.as_str().map(|s| truncate(s.trim(), 200)))
                .unwrap_or_default();
            if why.is_empty() {
                format!("no (http {})", r.status)
            } else {
                format!("no (http {}: {why})", r.status)
            }
        }
    };
    let mut kv = Table::headless(2);
    kv.row(vec!["url".to_owned(), url.to_owned()]);
    if let Some(c) = cluster {
        kv.row(vec!["node".to_owned(), c.node_id.clone()]);
    }
    kv.row(vec!["healthy".to_owned(), describe(health, "yes")]);
    kv.row(vec!["ready".to_owned(), describe(ready, "yes")]);
    let mut out = kv.render();
    if let Some(c) = cluster {
        if !c.nodes.is_empty() {
            let mut table = Table::new(&["NODE_ID", "GOSSIP_ADDR", "LIVE", ">GENERATION"]);
            for n in &c.nodes {
                let mut id = n.node_id.clone();
                if n.node_id == c.node_id {
                    id.push_str(" (this)");
                }
                let live = if n.live { "yes" } else { "no" };
                table.row(vec![
                    id,
                    text(&n.gossip_addr),
                    live.to_owned(),
                    n.generation.to_string(),
                ]);
            }
            out.push('\n');
            out.push_str(&table.render());
        }
    }
    out
}

fn truncate(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, parse_decimal};
    use clap::Parser;

    fn command(args: &[&str]) -> Command {
        Cli::try_parse_from(std::iter::once("tally").chain(args.iter().copied()))
            .unwrap()
            .command
    }

    fn planned(args: &[&str]) -> anyhow::Result<Request> {
        plan(&command(args)).map(|(_, request, _)| request)
    }

    /// A reply body as its type.
    fn v<T: DeserializeOwned>(j: Value) -> T {
        serde_json::from_value(j).unwrap()
    }

    #[test]
    fn money() {
        for (x, want) in [
            (0.0, "0"),
            (100.0, "100"),
            (12.5, "12.5"),
            (0.0123, "0.0123"),
            (0.1 + 0.2, "0.3"),
            (1.0000004, "1"),
            (0.000001, "0.000001"),
            (0.0000006, "0.000001"),
            (-0.0000001, "0"),
            (1e9, "1000000000"),
        ] {
            assert_eq!(format_money(x), want, "{x}");
        }
        assert_eq!(format_amount(v(json!(1500))), "1500");
        assert_eq!(format_amount(v(json!(87.5))), "87.5");
        assert_eq!(format_amount(v(json!(0.0))), "0");
        assert_eq!(text(&None), "-");
    }

    #[test]
    fn table_aligns_without_trailing_space() {
        let mut t = Table::new(&["ID", ">N", "NOTE"]);
        t.row(vec!["a".into(), "1".into(), "".into()]);
        t.row(vec!["long-id".into(), "100".into(), "x".into()]);
        assert_eq!(
            t.render(),
            "ID         N  NOTE\n\
             a          1\n\
             long-id  100  x\n"
        );
    }

    fn limit_view() -> Value {
        json!({"id": "team-eng-monthly", "scope": {"team": "eng"}, "metric": "cost",
               "max": 100.0, "period": "1M", "calendar_aligned": true, "timezone": "UTC",
               "used": 12.5, "remaining": 87.5, "period_start": "2026-11-01T00:00:00Z",
               "resets_at": "2026-12-01T00:00:00Z", "nodes": {"n1": 10.0, "n2": 2.5}})
    }

    #[test]
    fn limit_history() {
        let r = planned(&[
            "limits",
            "history",
            "team eng",
            "--since",
            "2026-11-01T00:00:00+01:00",
            "--limit",
            "5",
        ])
        .unwrap();
        assert_eq!(
            r.path,
            "/v1/limits/team%20eng/history?since=2026-11-01T00:00:00%2B01:00&limit=5"
        );
        assert_eq!(r.method, Method::Get);
        let body = json!({"id": "b", "metric": "cost", "epochs": [
            {"period_start": "2026-12-01T00:00:00Z", "period_end": "2027-01-01T00:00:00Z",
             "reset": "9", "current": true, "used": 41.5, "baseline": 40.0,
             "nodes": {"n2": 1.0, "n1": 0.5}},
            {"period_start": "2026-11-01T00:00:00Z", "period_end": "2026-12-01T00:00:00Z",
             "reset": "7", "current": false, "used": 12.5, "baseline": 0.0,
             "nodes": {"n1": 12.5}},
        ]});
        assert_eq!(
            render_history(&v(body)),
            "\
PERIOD_START          PERIOD_END            USED  NODES        NOTE
2026-12-01T00:00:00Z  2027-01-01T00:00:00Z  41.5  n1=0.5,n2=1  current, baseline 40
2026-11-01T00:00:00Z  2026-12-01T00:00:00Z  12.5  n1=12.5
"
        );
        assert_eq!(
            render_history(&v(json!({"id": "b", "metric": "cost", "epochs": []}))),
            "no history\n"
        );
        // A reply of another shape is an error, not a table of dashes.
        let e = render(&View::History, &json!({"epochs": []})).unwrap_err();
        assert!(e.to_string().contains("not a limit history"), "{e}");
    }

    #[test]
    fn limit_list() {
        let tokens = json!({"id": "global-tokens", "scope": {}, "metric": "tokens",
            "max": 1000000, "period": "1d", "calendar_aligned": false, "timezone": "UTC",
            "used": 1500, "remaining": 998500, "period_start": null, "resets_at": null,
            "nodes": {}});
        let body = json!({"limits": [limit_view(), tokens]});
        assert_eq!(
            render_limit_list(&v(body)),
            "\
ID                SCOPE     METRIC  USED      MAX  REMAINING  PERIOD  RESETS_AT
team-eng-monthly  team=eng  cost    12.5      100       87.5  1M cal  2026-12-01T00:00:00Z
global-tokens     {}        tokens  1500  1000000     998500  1d      -
"
        );
        assert_eq!(render_limit_list(&v(json!({"limits": []}))), "no limits\n");
    }

    #[test]
    fn limit_detail() {
        assert_eq!(
            render_limit(&v(limit_view())),
            "\
id            team-eng-monthly
scope         team=eng
metric        cost
max           100
used          12.5
remaining     87.5
period        1M, calendar-aligned in UTC
period_start  2026-11-01T00:00:00Z
resets_at     2026-12-01T00:00:00Z

NODE  USED
n1      10
n2     2.5
"
        );
    }

    #[test]
    fn check_marks_denying_limits() {
        let body = json!({"allowed": false, "stale": false,
            "denied_by": ["team-eng-monthly"],
            "limits": [
                {"id": "team-eng-monthly", "metric": "cost", "used": 100.0, "max": 100.0,
                 "remaining": 0.0, "resets_at": "2026-12-01T00:00:00Z"},
                {"id": "vk-rpm", "metric": "requests", "used": 3, "max": 60,
                 "remaining": 57, "resets_at": "2026-11-22T06:01:00Z"}]});
        assert_eq!(
            render_check(&v(body)),
            "\
DENIED by team-eng-monthly
   ID                METRIC    USED  MAX  REMAINING  RESETS_AT
*  team-eng-monthly  cost       100  100          0  2026-12-01T00:00:00Z
   vk-rpm            requests     3   60         57  2026-11-22T06:01:00Z
"
        );
        let ok = json!({"allowed": true, "stale": true, "denied_by": [], "limits": []});
        assert_eq!(
            render_check(&v(ok)),
            "ALLOWED (stale: the node has not caught up with its peers yet)\nno limits apply\n"
        );
    }

    #[test]
    fn usage_and_entity() {
        let body = json!({"applied": false, "limits": [{"id": "l", "metric": "cost",
            "used": 0.0123, "max": 1.0, "remaining": 0.9877, "resets_at": null}]});
        assert_eq!(
            render_usage(&v(body)),
            "\
not applied: this id was already recorded on this node
ID  METRIC    USED  MAX  REMAINING  RESETS_AT
l   cost    0.0123    1     0.9877  -
"
        );
        let e = json!({"dimension": "virtual_key", "value": "vk-1", "parents": {"team": "eng"}});
        assert_eq!(
            render_entity(&v(e)),
            "entity   virtual_key/vk-1\nparents  team=eng\n"
        );
    }

    #[test]
    fn status_view() {
        let ok = Reply {
            status: 200,
            body: json!({"status": "ok"}),
        };
        let not_ready = Reply {
            status: 503,
            body: json!({"error": {"code": "unavailable", "message": "catching up"}}),
        };
        let cluster = json!({"node_id": "n1", "nodes": [
            {"node_id": "n1", "gossip_addr": "10.0.0.1:7071", "live": true, "generation": 17},
            {"node_id": "n2", "gossip_addr": "10.0.0.2:7071", "live": false, "generation": 3}]});
        assert_eq!(
            render_status("http://x:7070", &ok, &not_ready, Some(&v(cluster))),
            "\
url      http://x:7070
node     n1
healthy  yes
ready    no (http 503: catching up)

NODE_ID    GOSSIP_ADDR    LIVE  GENERATION
n1 (this)  10.0.0.1:7071  yes           17
n2         10.0.0.2:7071  no             3
"
        );
    }

    #[test]
    fn error_replies() {
        let r = Reply {
            status: 404,
            body: json!({"error": {"code": "not_found", "message": "no limit x"}}),
        };
        assert_eq!(r.error().to_string(), "not_found: no limit x");
        let r = Reply {
            status: 502,
            body: json!("Bad Gateway"),
        };
        assert_eq!(r.error().to_string(), "http_502: Bad Gateway");
    }

    #[test]
    fn limit_put_bodies() {
        let r = planned(&[
            "limits",
            "put",
            "team-eng",
            "--scope",
            "team=eng",
            "--metric",
            "cost",
            "--max",
            "100",
            "--period",
            "1M",
            "--calendar-aligned",
        ])
        .unwrap();
        assert_eq!(r.method, Method::Put);
        assert_eq!(r.path, "/v1/limits/team-eng");
        assert_eq!(
            r.body.unwrap(),
            json!({"scope": {"team": "eng"}, "metric": "cost", "max": 100.0,
                   "period": "1M", "calendar_aligned": true})
        );
        let body = planned(&[
            "limits",
            "put",
            "t",
            "--metric",
            "tokens",
            "--max",
            "1e6",
            "--period",
            "1d",
            "--timezone",
            "Europe/Paris",
        ])
        .unwrap()
        .body
        .unwrap();
        assert_eq!(
            body.to_string(),
            r#"{"calendar_aligned":false,"max":1000000,"metric":"tokens","period":"1d","scope":{},"timezone":"Europe/Paris"}"#
        );
        let e = planned(&[
            "limits", "put", "t", "--metric", "requests", "--max", "1.5", "--period", "1m",
        ])
        .unwrap_err();
        assert!(e.to_string().contains("whole number"), "{e}");
        let e = planned(&[
            "limits", "put", "t", "--scope", "a=1", "--scope", "a=2", "--metric", "cost", "--max",
            "1", "--period", "1m",
        ])
        .unwrap_err();
        assert!(e.to_string().contains("given twice"), "{e}");
    }

    #[test]
    fn other_requests() {
        let r = planned(&["limits", "list", "--scope", "team=a b"]).unwrap();
        assert_eq!(r.path, "/v1/limits?scope.team=a%20b");
        let r = planned(&["limits", "reset", "x", "--used", "40"]).unwrap();
        assert_eq!(
            (r.method, r.path.as_str()),
            (Method::Post, "/v1/limits/x/reset")
        );
        assert_eq!(r.body.unwrap(), json!({"used": 40}));
        let r = planned(&["limits", "reset", "x"]).unwrap();
        assert_eq!(r.body.unwrap(), json!({}));
        let r = planned(&["limits", "delete", "x"]).unwrap();
        assert_eq!((r.method, r.body), (Method::Delete, None));
        let r = planned(&[
            "entities",
            "put",
            "virtual_key/vk-1",
            "--parent",
            "team=eng",
        ])
        .unwrap();
        assert_eq!(r.path, "/v1/entities/virtual_key/vk-1");
        assert_eq!(r.body.unwrap(), json!({"parents": {"team": "eng"}}));
        let r = planned(&["check", "--attr", "virtual_key=vk-1", "--cost", "0.02"]).unwrap();
        assert_eq!(
            r.body.unwrap(),
            json!({"attributes": {"virtual_key": "vk-1"}, "cost": 0.02})
        );
        let r = planned(&[
            "usage",
            "--id",
            "req-7f3a",
            "--attr",
            "virtual_key=vk-1",
            "--cost",
            "0.0123",
            "--tokens",
            "1800",
        ])
        .unwrap();
        assert_eq!(
            r.body.unwrap(),
            json!({"id": "req-7f3a", "attributes": {"virtual_key": "vk-1"},
                   "cost": 0.0123, "tokens": 1800})
        );
        assert_eq!(
            Value::Number(decimal_json(&parse_decimal("0.5").unwrap())),
            json!(0.5)
        );
    }

    #[test]
    fn urls() {
        let opts = |url: &str| ClientOpts {
            url: url.to_owned(),
            token: None,
            json: false,
        };
        assert_eq!(Http::new(&opts("http://h:1/")).unwrap().base, "http://h:1");
        assert!(Http::new(&opts("https://h:1")).is_err());
        assert!(Http::new(&opts("h:1")).is_err());
    }

    /// Serves one HTTP/1.1 exchange with a canned reply; returns the raw request text.
    fn one_shot_server(reply: &'static str) -> (String, std::thread::JoinHandle<String>) {
        use std::io::{Read as _, Write as _};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let handle = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            // Read the head, then as many body bytes as Content-Length says.
            loop {
                let n = stream.read(&mut buf).unwrap();
                request.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&request).to_string();
                if let Some(head_end) = text.find("\r\n\r\n") {
                    let length = text[..head_end]
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse::<usize>().unwrap())
                        })
                        .unwrap_or(0);
                    if request.len() >= head_end + 4 + length {
                        break;
                    }
                }
                assert!(n > 0, "client closed early");
            }
            let response = format!(
                "{reply_head}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                reply.split_once("\r\n\r\n").unwrap().1.len(),
                reply_head = reply.split_once("\r\n\r\n").unwrap().0,
                body = reply.split_once("\r\n\r\n").unwrap().1,
            );
            stream.write_all(response.as_bytes()).unwrap();
            String::from_utf8(request).unwrap()
        });
        (url, handle)
    }

    #[test]
    fn sends_token_and_reads_error_bodies() {
        let (url, server) = one_shot_server(
            "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\n\r\n\
             {\"error\":{\"code\":\"not_found\",\"message\":\"no limit x\"}}",
        );
        let http = Http::new(&ClientOpts {
            url,
            token: Some("t0k".to_owned()),
            json: false,
        })
        .unwrap();
        let request = planned(&["limits", "reset", "x", "--used", "2.5"]).unwrap();
        let reply = http.send(&request).unwrap();
        assert_eq!(reply.status, 404);
        assert_eq!(reply.error().to_string(), "not_found: no limit x");
        let seen = server.join().unwrap().to_ascii_lowercase();
        assert!(
            seen.starts_with("post /v1/limits/x/reset http/1.1"),
            "{seen}"
        );
        assert!(seen.contains("authorization: bearer t0k"), "{seen}");
        assert!(seen.contains("content-type: application/json"), "{seen}");
        assert!(seen.ends_with(r#"{"used":2.5}"#), "{seen}");
    }

    #[test]
    fn unreachable_node_is_explained() {
        // Bind then drop a listener: the port is (very likely) closed for the request.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}");
        let http = Http::new(&ClientOpts {
            url: url.clone(),
            token: None,
            json: false,
        })
        .unwrap();
        let e = http.send(&Request::get("/healthz".to_owned())).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("cannot reach {url}: is the node running? (tally serve)")
        );
    }
}
