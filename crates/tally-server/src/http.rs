//! The HTTP API of API.md on axum: routes, auth, JSON shapes, validation and the error
//! shape. Handlers validate everything before touching the node, so bad input changes
//! nothing (I8); the node does the rest.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header, request::Parts};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tally_core::units::{self, ATTRIBUTES_MAX, Micros};
use tally_core::{Amounts, LimitInput, Metric, Period, Scope};
use tally_node::{
    HISTORY_EPOCHS_MAX, HistoryQuery, LimitDetails, LimitHistory, LimitReport, Node, NodeError,
    UsageRecord,
};

use crate::json::Json;

/// Largest request body accepted (API.md: 1 MiB).
pub const BODY_BYTES_MAX: usize = 1 << 20;
/// Most records in one batch.
pub const BATCH_RECORDS_MAX: usize = 1000;

/// Who may do what.
#[derive(Clone, Debug, Default)]
pub struct Auth {
    pub admin_token: Option<String>,
    pub client_token: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Role {
    Client,
    Admin,
}

/// Shared by every handler.
pub struct AppState {
    pub node: Node,
    pub auth: Auth,
    pub started_ms: i64,
    pub gossip_addr: Option<String>,
    /// State of the proxy integrations (Envoy RLS, forward-auth, access logs).
    pub proxies: Arc<crate::proxies::Proxies>,
}

type App = State<Arc<AppState>>;

/// An API error: status, code and message, rendered in API.md's shape.
#[derive(Debug)]
pub struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) code: &'static str,
    pub(crate) message: String,
}

impl ApiError {
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_argument",
            message: message.into(),
        }
    }

    fn not_found(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            code: "not_found",
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        (self.status, axum::Json(body)).into_response()
    }
}

impl From<NodeError> for ApiError {
    fn from(e: NodeError) -> ApiError {
        let (status, code) = match &e {
            NodeError::InvalidArgument(_) => (StatusCode::BAD_REQUEST, "invalid_argument"),
            NodeError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            NodeError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            _ => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        };
        ApiError {
            status,
            code,
            message: e.to_string(),
        }
    }
}

type ApiResult = Result<Response, ApiError>;

fn ok(v: Value) -> ApiResult {
    Ok(axum::Json(v).into_response())
}

/// How long a client may take to send a request body.
pub const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Request body bytes all connections together may hold in memory while they are read
/// and handled: 2 000 slow clients each trickling a 1 MiB body cannot take 2 GB.
pub const BODY_BYTES_IN_FLIGHT_MAX: usize = 64 << 20;
static BODY_BUDGET: tokio::sync::Semaphore =
    tokio::sync::Semaphore::const_new(BODY_BYTES_IN_FLIGHT_MAX);

/// A request body of at most 1 MiB (413 beyond), received within [`BODY_READ_TIMEOUT`]
/// (408 beyond), and counted against [`BODY_BYTES_IN_FLIGHT_MAX`] until the handler is done
/// with it (503 if the budget stays exhausted past the timeout). Handlers parse it with
/// [`parse_json`] after checking the token, so an unauthenticated request is refused before
/// its body is looked at, and check and usage bodies can borrow from it.
pub struct RawBody {
    pub(crate) bytes: Bytes,
    /// Released when the handler drops the body.
    _budget: tokio::sync::SemaphorePermit<'static>,
}

impl std::ops::Deref for RawBody {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, _: &S) -> Result<Self, ApiError> {
        use http_body_util::BodyExt as _;
        let too_large = || ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            code: "payload_too_large",
            message: format!("request body is larger than {BODY_BYTES_MAX} bytes"),
        };
        let timed_out = || ApiError {
            status: StatusCode::REQUEST_TIMEOUT,
            code: "request_timeout",
            message: format!(
                "the request body did not arrive within {} s; send it whole, at once",
                BODY_READ_TIMEOUT.as_secs()
            ),
        };
        let deadline = tokio::time::Instant::now() + BODY_READ_TIMEOUT;
        let mut body = req.into_body();
        let mut held = BODY_BUDGET
            .try_acquire_many(0)
            .expect("zero permits are always there");
        let mut first: Option<Bytes> = None;
        let mut rest: Vec<u8> = Vec::new();
        loop {
            let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
                Err(_) => return Err(timed_out()),
                Ok(None) => break,
                Ok(Some(Err(_))) => {
                    return Err(ApiError::invalid(
                        "the request body could not be read (connection error)",
                    ));
                }
                Ok(Some(Ok(frame))) => frame,
            };
            let Ok(data) = frame.into_data() else {
                continue; // trailers
            };
            let len = first.as_ref().map_or(0, Bytes::len) + rest.len() + data.len();
            if len > BODY_BYTES_MAX {
                return Err(too_large());
            }
            let permits = u32::try_from(data.len()).expect("a frame is under 1 MiB here");
            let permit = tokio::time::timeout_at(deadline, BODY_BUDGET.acquire_many(permits))
                .await
                .map_err(|_| ApiError {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    code: "unavailable",
                    message: "the node is reading too many request bodies at once; retry later"
                        .into(),
                })?
                .expect("the body budget is never closed");
            held.merge(permit);
            // One frame is the common case: keep it without copying.
            match first.take() {
                None if rest.is_empty() => first = Some(data),
                Some(f) => {
                    rest.extend_from_slice(&f);
                    rest.extend_from_slice(&data);
                }
                None => rest.extend_from_slice(&data),
            }
        }
        let bytes = first.unwrap_or_else(|| Bytes::from(rest));
        Ok(RawBody {
            bytes,
            _budget: held,
        })
    }
}

/// Parses a JSON object body strictly (400 on any mismatch); an empty body is `{}`.
fn parse_json<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, ApiError> {
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        bytes
    };
    serde_json::from_slice::<Obj<T>>(bytes)
        .map(|o| o.0)
        .map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))
}

/// A JSON object read as `T`. serde's derived struct visitors also take a JSON array as
/// the fields in declaration order, so `["id-1",{},0.5,5,1,null]` would be read as a usage
/// record. Bodies are objects only (I8): `T` is read through `deserialize_map`, which
/// refuses anything but an object before looking inside it.
struct Obj<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Obj<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Visit<T> {
            type Value = T;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(self, m: M) -> Result<T, M::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(m))
            }
        }
        d.deserialize_map(Visit(std::marker::PhantomData)).map(Obj)
    }
}

/// A scope-like map (`scope`, `parents`) of at most [`ATTRIBUTES_MAX`] entries, refused
/// as soon as it grows past the cap: a body of 1 MiB can hold ~80 000 names, and reading
/// them all before refusing costs far more than the request is worth.
fn bounded_scope<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Scope, D::Error> {
    struct Visit;
    impl<'de> serde::de::Visitor<'de> for Visit {
        type Value = Scope;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a map of dimension names to string values")
        }
        fn visit_map<M: serde::de::MapAccess<'de>>(self, mut m: M) -> Result<Scope, M::Error> {
            let mut out = Scope::new();
            while let Some((k, v)) = m.next_entry::<String, String>()? {
                out.insert(k, v);
                if out.len() > ATTRIBUTES_MAX {
                    return Err(serde::de::Error::custom(format_args!(
                        "more than {ATTRIBUTES_MAX} entries; at most {ATTRIBUTES_MAX} are allowed"
                    )));
                }
            }
            Ok(out)
        }
    }
    d.deserialize_map(Visit)
}

/// Path parameters, with API.md's error shape on failure.
pub struct Params<T>(T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for Params<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| Params(p.0))
            .map_err(|e| ApiError::invalid(format!("invalid path: {e}")))
    }
}

// ----- auth --------------------------------------------------------------------------

/// The role of the request's token, if it has at least `need`.
pub(crate) fn authorize(
    state: &AppState,
    headers: &HeaderMap,
    need: Role,
) -> Result<Role, ApiError> {
    let auth = &state.auth;
    if auth.admin_token.is_none() && auth.client_token.is_none() {
        return Ok(Role::Admin); // loopback-only node without tokens (DESIGN.md §4)
    }
    let unauthenticated = |m: &str| ApiError {
        status: StatusCode::UNAUTHORIZED,
        code: "unauthenticated",
        message: m.to_string(),
    };
    let token = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| unauthenticated("missing Authorization: Bearer <token> header"))?
        .to_str()
        .ok()
        .and_then(|h| h.strip_prefix("Bearer "))
        .ok_or_else(|| unauthenticated("Authorization header must be 'Bearer <token>'"))?;
    let is = |t: &Option<String>| {
        t.as_deref()
            .is_some_and(|t| constant_time_eq(t.as_bytes(), token.as_bytes()))
    };
    let role = if is(&auth.admin_token) {
        Role::Admin
    } else if is(&auth.client_token) {
        Role::Client
    } else {
        return Err(unauthenticated("unknown token"));
    };
    if role < need {
        return Err(ApiError {
            status: StatusCode::FORBIDDEN,
            code: "permission_denied",
            message: "this token's role may not do this; an admin token is needed".into(),
        });
    }
    Ok(role)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

// ----- JSON shapes -------------------------------------------------------------------

fn rfc3339(ms: i64) -> Value {
    match jiff::Timestamp::from_millisecond(ms) {
        Ok(t) => Value::String(t.to_string()),
        Err(_) => Value::Null,
    }
}

fn amount(metric: Metric, v: u64) -> Value {
    match metric {
        Metric::Cost => json!(Micros(v).to_usd()),
        _ => json!(v),
    }
}

/// The `limits` array of check and usage replies (API.md), written directly.
fn write_reports(j: &mut Json, reports: &[LimitReport]) {
    j.raw("[");
    for (i, r) in reports.iter().enumerate() {
        if i > 0 {
            j.raw(",");
        }
        j.raw("{\"id\":").str(&r.id);
        j.raw(",\"metric\":").str(r.metric.as_str());
        j.raw(",\"used\":").amount(r.metric, r.used);
        j.raw(",\"max\":").amount(r.metric, r.max);
        j.raw(",\"remaining\":").amount(r.metric, r.remaining);
        j.raw(",\"resets_at\":");
        match r.resets_at_ms {
            Some(ms) => j.time(ms),
            None => j.raw("null"),
        };
        j.raw("}");
    }
    j.raw("]");
}

/// Room for a reply listing `n` limits, so the buffer is allocated once.
fn reply_capacity(n: usize) -> usize {
    64 + n * 160
}

fn json_reply(j: Json) -> ApiResult {
    Ok(([(header::CONTENT_TYPE, "application/json")], j.into_bytes()).into_response())
}

fn view_json(d: &LimitDetails) -> Value {
    let m = d.input.metric;
    let never = d.input.period == Period::Never;
    let nodes: serde_json::Map<String, Value> = d
        .nodes
        .iter()
        .map(|(n, v)| (n.clone(), amount(m, *v)))
        .collect();
    json!({
        "id": d.report.id,
        "scope": d.input.scope,
        "metric": m.as_str(),
        "max": amount(m, d.input.max),
        "period": d.input.period.to_string(),
        "calendar_aligned": d.input.calendar_aligned,
        "timezone": d.input.timezone,
        "used": amount(m, d.report.used),
        "remaining": amount(m, d.report.remaining),
        "period_start": if never { Value::Null } else { rfc3339(d.report.period_start_ms) },
        "resets_at": d.report.resets_at_ms.map_or(Value::Null, rfc3339),
        "nodes": nodes,
    })
}

pub(crate) fn check_id(id: &str, what: &'static str) -> Result<(), ApiError> {
    units::validate_id(id, what).map_err(|e| ApiError::invalid(e.to_string()))
}

fn check_attributes(attrs: &BTreeMap<String, String>) -> Result<(), ApiError> {
    check_attribute_pairs(
        attrs.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        attrs.len(),
    )
}

pub(crate) fn check_attribute_pairs<'a>(
    attrs: impl Iterator<Item = (&'a str, &'a str)>,
    len: usize,
) -> Result<(), ApiError> {
    if len > ATTRIBUTES_MAX {
        return Err(ApiError::invalid(format!(
            "attributes has {len} entries; at most {ATTRIBUTES_MAX} are allowed"
        )));
    }
    for (k, v) in attrs {
        units::validate_dimension(k).map_err(|e| ApiError::invalid(e.to_string()))?;
        units::validate_attribute_value(v).map_err(|e| ApiError::invalid(e.to_string()))?;
    }
    Ok(())
}

/// A metric amount given as a JSON number: USD for cost, a whole count otherwise.
fn metric_amount(
    metric: Metric,
    n: &serde_json::Number,
    what: &'static str,
) -> Result<u64, ApiError> {
    let bad = |e: units::UnitError| ApiError::invalid(e.to_string());
    match metric {
        Metric::Cost => {
            let f = n
                .as_f64()
                .ok_or_else(|| ApiError::invalid(format!("{what} must be a number")))?;
            Micros::from_usd(f, what).map(|m| m.0).map_err(bad)
        }
        _ => match n.as_u64() {
            Some(v) => units::check_count(v, what).map_err(bad),
            None => {
                let f = n
                    .as_f64()
                    .ok_or_else(|| ApiError::invalid(format!("{what} must be a number")))?;
                units::count_from_f64(f, what).map_err(bad)
            }
        },
    }
}

pub(crate) fn cost(c: Option<f64>) -> Result<Micros, ApiError> {
    c.map_or(Ok(Micros(0)), |c| Micros::from_usd(c, "cost"))
        .map_err(|e| ApiError::invalid(e.to_string()))
}

fn count(c: Option<u64>, what: &'static str, default: u64) -> Result<u64, ApiError> {
    units::check_count(c.unwrap_or(default), what).map_err(|e| ApiError::invalid(e.to_string()))
}

// ----- limits ------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitBody {
    #[serde(default, deserialize_with = "bounded_scope")]
    scope: BTreeMap<String, String>,
    metric: String,
    max: serde_json::Number,
    period: String,
    #[serde(default)]
    calendar_aligned: bool,
    #[serde(default = "utc")]
    timezone: String,
}

fn utc() -> String {
    "UTC".into()
}

async fn put_limit(
    State(s): App,
    headers: HeaderMap,
    Params(id): Params<String>,
    body: RawBody,
) -> ApiResult {
    authorize(&s, &headers, Role::Admin)?;
    let b: LimitBody = parse_json(&body)?;
    check_id(&id, "limit id")?;
    let metric = Metric::parse(&b.metric).ok_or_else(|| {
        ApiError::invalid(format!(
            "metric {:?} must be one of cost, tokens, requests",
            b.metric
        ))
    })?;
    let max = metric_amount(metric, &b.max, "max")?;
    let period: Period = b
        .period
        .parse()
        .map_err(|e: tally_core::PeriodError| ApiError::invalid(e.to_string()))?;
    let input = LimitInput {
        scope: b.scope,
        metric,
        max,
        period,
        calendar_aligned: b.calendar_aligned,
        timezone: b.timezone,
    };
    let d = s.node.put_limit(&id, input).await?;
    ok(view_json(&d))
}

async fn get_limit(State(s): App, headers: HeaderMap, Params(id): Params<String>) -> ApiResult {
    authorize(&s, &headers, Role::Client)?;
    let d = s
        .node
        .limit(&id)
        .ok_or_else(|| ApiError::not_found(format!("no limit with id {id:?}")))?;
    ok(view_json(&d))
}

async fn list_limits(State(s): App, headers: HeaderMap, uri: axum::http::Uri) -> ApiResult {
    authorize(&s, &headers, Role::Client)?;
    let mut filter = Scope::new();
    if let Some(q) = uri.query() {
        for (k, v) in form_pairs(q)? {
            let dim = k.strip_prefix("scope.").ok_or_else(|| {
                ApiError::invalid(format!(
                    "unknown query parameter {k:?}; filter with scope.<dimension>=<value>"
                ))
            })?;
            units::validate_dimension(dim).map_err(|e| ApiError::invalid(e.to_string()))?;
            filter.insert(dim.to_string(), v);
        }
    }
    let limits: Vec<Value> = s.node.limits(&filter).iter().map(view_json).collect();
    ok(json!({ "limits": limits }))
}

/// Decodes `a=b&c=d` with percent-escapes and `+` as space.
pub(crate) fn form_pairs(q: &str) -> Result<Vec<(String, String)>, ApiError> {
    fn decode(s: &str) -> Result<String, ApiError> {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < b.len() => {
                    let hex = std::str::from_utf8(&b[i + 1..i + 3])
                        .ok()
                        .and_then(|h| u8::from_str_radix(h, 16).ok());
                    out.push(hex.ok_or_else(|| ApiError::invalid("bad percent-escape in query"))?);
                    i += 2;
                }
                c => out.push(c),
            }
            i += 1;
        }
        String::from_utf8(out).map_err(|_| ApiError::invalid("query is not UTF-8"))
    }
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Ok((decode(k)?, decode(v)?))
        })
        .collect()
}

/// Epochs a history reply lists when the query does not say.
const HISTORY_EPOCHS_DEFAULT: usize = 100;

/// A metric amount in the limit's units: USD for cost, a count otherwise.
struct Amount(Metric, u64);

impl Serialize for Amount {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Metric::Cost => s.serialize_f64(Micros(self.1).to_usd()),
            _ => s.serialize_u64(self.1),
        }
    }
}

/// `GET /v1/limits/{id}/history`.
#[derive(Serialize)]
struct HistoryReply {
    id: String,
    metric: &'static str,
    /// Newest first.
    epochs: Vec<HistoryEpoch>,
}

#[derive(Serialize)]
struct HistoryEpoch {
    /// `null` for a `never` period.
    period_start: Option<String>,
    /// When the period ended (or, for the current epoch, `resets_at`); `null` for `never`.
    period_end: Option<String>,
    /// The epoch's reset id (a decimal string: it does not fit a JSON number exactly).
    reset: String,
    /// The epoch checks count against now.
    current: bool,
    /// `baseline + Σ nodes`.
    used: Amount,
    /// Usage the epoch started with (a set-usage reset).
    baseline: Amount,
    nodes: BTreeMap<String, Amount>,
}

impl HistoryReply {
    fn new(id: String, h: LimitHistory) -> HistoryReply {
        let m = h.metric;
        let time = |ms: i64| {
            jiff::Timestamp::from_millisecond(ms)
                .ok()
                .map(|t| t.to_string())
        };
        HistoryReply {
            id,
            metric: m.as_str(),
            epochs: h
                .epochs
                .into_iter()
                .map(|e| HistoryEpoch {
                    period_start: if h.never {
                        None
                    } else {
                        time(e.period_start_ms)
                    },
                    period_end: e.period_end_ms.and_then(time),
                    reset: e.epoch.reset.to_string(),
                    current: e.current,
                    used: Amount(m, e.used),
                    baseline: Amount(m, e.baseline),
                    nodes: e
                        .nodes
                        .into_iter()
                        .map(|(n, v)| (n, Amount(m, v)))
                        .collect(),
                })
                .collect(),
        }
    }
}

/// `?since=RFC3339&until=RFC3339&limit=N`, each at most once.
fn history_query(q: Option<&str>) -> Result<HistoryQuery, ApiError> {
    let mut out = HistoryQuery {
        since_ms: None,
        until_ms: None,
        epochs_max: HISTORY_EPOCHS_DEFAULT,
    };
    let mut seen = Vec::new();
    for (k, v) in form_pairs(q.unwrap_or(""))? {
        if seen.contains(&k) {
            return Err(ApiError::invalid(format!(
                "query parameter {k:?} given twice"
            )));
        }
        let time = |v: &str| {
            v.parse::<jiff::Timestamp>()
                .map(|t| t.as_millisecond())
                .map_err(|e| {
                    ApiError::invalid(format!(
                        "{k} {v:?} is not an RFC 3339 time such as 2026-11-01T00:00:00Z: {e}"
                    ))
                })
        };
        match k.as_str() {
            "since" => out.since_ms = Some(time(&v)?),
            "until" => out.until_ms = Some(time(&v)?),
            "limit" => {
                out.epochs_max = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=HISTORY_EPOCHS_MAX).contains(n))
                    .ok_or_else(|| {
                        ApiError::invalid(format!(
                            "limit {v:?} must be a whole number from 1 to {HISTORY_EPOCHS_MAX}"
                        ))
                    })?
            }
            _ => {
                return Err(ApiError::invalid(format!(
                    "unknown query parameter {k:?}; use since, until and limit"
                )));
            }
        }
        seen.push(k);
    }
    if let (Some(since), Some(until)) = (out.since_ms, out.until_ms) {
        if since >= until {
            return Err(ApiError::invalid("since must be before until"));
        }
    }
    Ok(out)
}

async fn limit_history(
    State(s): App,
    headers: HeaderMap,
    Params(id): Params<String>,
    uri: axum::http::Uri,
) -> ApiResult {
    authorize(&s, &headers, Role::Client)?;
    check_id(&id, "limit id")?;
    let query = history_query(uri.query())?;
    let h = s.node.history(&id, query).await?;
    Ok(axum::Json(HistoryReply::new(id, h)).into_response())
}

async fn delete_limit(State(s): App, headers: HeaderMap, Params(id): Params<String>) -> ApiResult {
    authorize(&s, &headers, Role::Admin)?;
    s.node.delete_limit(&id).await?;
    ok(json!({"deleted": true}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResetBody {
    used: Option<serde_json::Number>,
}

async fn reset_limit(
    State(s): App,
    headers: HeaderMap,
    Params(id): Params<String>,
    body: RawBody,
) -> ApiResult {
    authorize(&s, &headers, Role::Admin)?;
    let b: ResetBody = parse_json(&body)?;
    let d = s
        .node
        .limit(&id)
        .ok_or_else(|| ApiError::not_found(format!("no limit with id {id:?}")))?;
    let baseline = match &b.used {
        Some(n) => metric_amount(d.input.metric, n, "used")?,
        None => 0,
    };
    let d = s.node.reset_limit(&id, baseline).await?;
    ok(view_json(&d))
}

// ----- entities ----------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EntityBody {
    #[serde(default, deserialize_with = "bounded_scope")]
    parents: BTreeMap<String, String>,
}

fn check_entity(dim: &str, value: &str) -> Result<(), ApiError> {
    units::validate_dimension(dim).map_err(|e| ApiError::invalid(e.to_string()))?;
    units::validate_attribute_value(value).map_err(|e| ApiError::invalid(e.to_string()))
}

async fn put_entity(
    State(s): App,
    headers: HeaderMap,
    Params((dim, value)): Params<(String, String)>,
    body: RawBody,
) -> ApiResult {
    authorize(&s, &headers, Role::Admin)?;
    let b: EntityBody = parse_json(&body)?;
    check_entity(&dim, &value)?;
    check_attributes(&b.parents)?;
    let e = s.node.put_entity(&dim, &value, b.parents).await?;
    ok(json!({"dimension": e.dimension, "value": e.value, "parents": e.parents}))
}

async fn get_entity(
    State(s): App,
    headers: HeaderMap,
    Params((dim, value)): Params<(String, String)>,
) -> ApiResult {
    authorize(&s, &headers, Role::Client)?;
    let e = s
        .node
        .entity(&dim, &value)
        .ok_or_else(|| ApiError::not_found(format!("no entity {dim}/{value}")))?;
    ok(json!({"dimension": e.dimension, "value": e.value, "parents": e.parents}))
}

async fn delete_entity(
    State(s): App,
    headers: HeaderMap,
    Params((dim, value)): Params<(String, String)>,
) -> ApiResult {
    authorize(&s, &headers, Role::Admin)?;
    s.node.delete_entity(&dim, &value).await?;
    ok(json!({"deleted": true}))
}

// ----- check and usage ---------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckBody<'a> {
    #[serde(default, borrow)]
    attributes: Attributes<'a>,
    cost: Option<f64>,
    tokens: Option<u64>,
}

/// Request attributes borrowed from the body where they need no unescaping (a check
/// allocates nothing for them). A repeated name keeps its last value, as a map would.
#[derive(Default)]
struct Attributes<'a>(Vec<(Cow<'a, str>, Cow<'a, str>)>);

#[derive(Deserialize)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

impl Attributes<'_> {
    fn validate(&self) -> Result<(), ApiError> {
        check_attribute_pairs(self.0.iter().map(|(k, v)| (&**k, &**v)), self.0.len())
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Attributes<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visit<'a> {
            type Value = Attributes<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map of attribute names to string values")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut m: M,
            ) -> Result<Self::Value, M::Error> {
                let mut out: Vec<(Cow<'a, str>, Cow<'a, str>)> = Vec::with_capacity(ATTRIBUTES_MAX);
                while let Some((Text(k), Text(v))) = m.next_entry::<Text<'a>, Text<'a>>()? {
                    if let Some(slot) = out.iter_mut().find(|(ok, _)| *ok == k) {
                        slot.1 = v;
                    } else if out.len() == ATTRIBUTES_MAX {
                        // Refused at the first name past the cap, so a huge map costs no
                        // more than its first few entries (and the search stays tiny).
                        return Err(serde::de::Error::custom(format_args!(
                            "attributes has more than {ATTRIBUTES_MAX} entries; at most {ATTRIBUTES_MAX} are allowed"
                        )));
                    } else {
                        out.push((k, v));
                    }
                }
                Ok(Attributes(out))
            }
        }
        d.deserialize_map(Visit(std::marker::PhantomData))
    }
}

/// Everything tally does with a `POST /v1/check` body before it asks the node: parse it
/// (attributes borrowed from the body), validate names, values and amounts, then call
/// `then` with the attributes and the estimate. Public so the benchmark floor
/// (`tally-bench`) does exactly this work and differs from tally only in the check itself.
pub fn parse_check<R>(
    body: &[u8],
    then: impl FnOnce(&[(&str, &str)], Amounts) -> R,
) -> Result<R, ApiError> {
    let b: CheckBody = parse_json(body)?;
    b.attributes.validate()?;
    let estimate = Amounts {
        cost: cost(b.cost)?,
        tokens: count(b.tokens, "tokens", 0)?,
        requests: 1,
    };
    let attrs: Vec<(&str, &str)> = b.attributes.0.iter().map(|(k, v)| (&**k, &**v)).collect();
    Ok(then(&attrs, estimate))
}

async fn check(State(s): App, headers: HeaderMap, body: RawBody) -> ApiResult {
    authorize(&s, &headers, Role::Client)?;
    let r = parse_check(&body, |attrs, estimate| s.node.check(attrs, estimate))?;
    let mut j = Json::with_capacity(reply_capacity(r.limits.len()));
    j.raw("{\"allowed\":").bool(r.allowed);
    j.raw(",\"stale\":").bool(r.stale);
    j.raw(",\"denied_by\":[");
    for (i, l) in r.limits.iter().filter(|l| l.denied).enumerate() {
        if i > 0 {
            j.raw(",");
        }
        j.str(&l.id);
    }
    j.raw("],\"limits\":");
    write_reports(&mut j, &r.limits);
    j.raw("}");
    json_reply(j)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsageBody<'a> {
    id: String,
    #[serde(default, borrow)]
    attributes: Attributes<'a>,
    cost: Option<f64>,
    tokens: Option<u64>,
    requests: Option<u64>,
    at: Option<String>,
}

fn usage_record(b: UsageBody<'_>) -> Result<UsageRecord, ApiError> {
    check_id(&b.id, "record id")?;
    b.attributes.validate()?;
    let at_ms = match &b.at {
        Some(at) => Some(
            at.parse::<jiff::Timestamp>()
                .map_err(|e| ApiError::invalid(format!("at {at:?} is not an RFC 3339 time: {e}")))?
                .as_millisecond(),
        ),
        None => None,
    };
    Ok(UsageRecord {
        amounts: Amounts {
            cost: cost(b.cost)?,
            tokens: count(b.tokens, "tokens", 0)?,
            requests: count(b.requests, "requests", 1)?,
        },
        id: b.id,
        attributes: b
            .attributes
            .0
            .into_iter()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect(),
        at_ms,
    })
}

async fn usage(State(s): App, headers: HeaderMap, body: RawBody) -> ApiResult {
    authorize(&s, &headers, Role::Client)?;
    let rec = usage_record(parse_json(&body)?)?;
    let (applied, records) = s.node.record_returning(vec![rec]).await;
    let applied = applied?;
    // The writer hands the record back with its answer.
    let pairs: Vec<(&str, &str)> = records
        .first()
        .map(|r| &r.attributes[..])
        .unwrap_or_default()
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let statuses = s.node.statuses(&pairs);
    let mut j = Json::with_capacity(reply_capacity(statuses.len()));
    j.raw("{\"applied\":").bool(applied[0]);
    j.raw(",\"limits\":");
    write_reports(&mut j, &statuses);
    j.raw("}");
    json_reply(j)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchBody<'a> {
    #[serde(borrow)]
    records: Vec<Obj<UsageBody<'a>>>,
}

async fn usage_batch(State(s): App, headers: HeaderMap, body: RawBody) -> ApiResult {
    authorize(&s, &headers, Role::Client)?;
    let b: BatchBody = parse_json(&body)?;
    if b.records.len() > BATCH_RECORDS_MAX {
        return Err(ApiError::invalid(format!(
            "a batch has at most {BATCH_RECORDS_MAX} records, this one has {}",
            b.records.len()
        )));
    }
    let records = b
        .records
        .into_iter()
        .enumerate()
        .map(|(i, Obj(r))| {
            usage_record(r).map_err(|e| ApiError::invalid(format!("records[{i}]: {}", e.message)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let ids: Vec<String> = records.iter().map(|r| r.id.clone()).collect();
    let applied = if records.is_empty() {
        Vec::new()
    } else {
        s.node.record(records).await?
    };
    let results: Vec<Value> = ids
        .iter()
        .zip(applied)
        .map(|(id, a)| json!({"id": id, "applied": a}))
        .collect();
    ok(json!({ "results": results }))
}

// ----- operations --------------------------------------------------------------------

async fn healthz() -> ApiResult {
    ok(json!({"status": "ok"}))
}

async fn readyz(State(s): App) -> ApiResult {
    if s.node.ready() {
        return ok(json!({"ready": true}));
    }
    let message = match s.node.storage_health() {
        tally_node::StorageHealth::Ok => "not caught up with a live peer yet",
        tally_node::StorageHealth::Full => {
            "the disk holding the data directory is full: writes cannot be stored until space is freed"
        }
        _ => "storage failed: writes are stopped; check the disk, then restart the node",
    };
    Err(ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        code: "unavailable",
        message: message.into(),
    })
}

async fn cluster(State(s): App, headers: HeaderMap) -> ApiResult {
    authorize(&s, &headers, Role::Client)?;
    let nodes: Vec<Value> = match s.node.members().await {
        Some(members) => members
            .iter()
            .map(|m| {
                json!({
                    "node_id": m.node_id,
                    "gossip_addr": m.gossip_addr.to_string(),
                    // A node whose values fail the MAC (another cluster key) talks to
                    // chitchat but takes no part in the fleet.
                    "live": m.live && m.verified,
                    "generation": m.generation,
                    // Gossip lag where known: how long ago a value from it was accepted.
                    "newest_value_age_ms": m.newest_value_age.map(|d| d.as_millis() as u64),
                })
            })
            .collect(),
        None => vec![json!({
            "node_id": s.node.node_id(),
            "gossip_addr": s.gossip_addr,
            "live": true,
            "generation": s.started_ms,
            "newest_value_age_ms": null,
        })],
    };
    ok(json!({"node_id": s.node.node_id(), "nodes": nodes}))
}

async fn metrics(State(s): App) -> Response {
    let mut text = crate::metrics::render(&s.node).await;
    crate::proxies::render_metrics(&s.proxies, &mut text);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn no_route(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("no route for {method} {}", uri.path()))
}

/// The router of API.md.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/cluster", get(cluster))
        .route("/v1/limits", get(list_limits))
        .route(
            "/v1/limits/{id}",
            put(put_limit).get(get_limit).delete(delete_limit),
        )
        .route("/v1/limits/{id}/reset", post(reset_limit))
        .route("/v1/limits/{id}/history", get(limit_history))
        .route(
            "/v1/entities/{dimension}/{value}",
            put(put_entity).get(get_entity).delete(delete_entity),
        )
        .route("/v1/check", post(check))
        .route("/v1/usage", post(usage))
        .route("/v1/usage/batch", post(usage_batch))
        .merge(crate::proxies::routes())
        .merge(crate::ui::routes())
        .fallback(no_route)
        .method_not_allowed_fallback(no_route)
        .with_state(state)
}
