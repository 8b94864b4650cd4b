//! The HTTP API of API.md on axum: routes, auth, JSON shapes, validation and the error
//! shape. Handlers validate everything before touching the node, so bad input changes
//! nothing (I8); the node does the rest.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header, request::Parts};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tally_api::{
    AccessDenied, Amount, Attributes, Balance, BatchReply, BatchRequest, BatchResult,
    ChargedPrices, CheckRequest, ClusterReply, DecommissionRequest, Decommissioned, Deleted,
    EntityRequest, EntityView, ErrorReply, Health, HistoryEpoch, HistoryReply, LimitList,
    LimitRequest, LimitView, Member, MemberSpec, MemberWeight, Obj, PriceBatchRequest, PriceList,
    PriceRequest, PriceView, Priced, PricesWritten, Ready, Released, Reservation, ResetRequest,
    RightsView, UsageRequest,
};
use tally_core::units::{self, ATTRIBUTES_MAX, Micros};
use tally_core::{Amounts, LimitInput, Metric, Mode, Period, Scope};
use tally_node::{
    HISTORY_EPOCHS_MAX, HistoryQuery, LimitDetails, LimitHistory, LimitReport, Node, NodeError,
    UsageRecord,
};

use crate::json::Json;
use crate::metrics::{Timed, Timing};

// The wire schema's caps are the node's.
const _: () = assert!(
    tally_api::ATTRIBUTES_MAX == ATTRIBUTES_MAX
        && tally_api::DENIALS_MAX == tally_node::DENIALS_MAX
        && tally_api::HISTORY_EPOCHS_MAX == HISTORY_EPOCHS_MAX
);

/// Largest request body accepted (API.md: 1 MiB).
pub const BODY_BYTES_MAX: usize = 1 << 20;
/// Most records in one batch.
pub const BATCH_RECORDS_MAX: usize = tally_api::BATCH_RECORDS_MAX;

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
        let body = ErrorReply::new(self.code, self.message);
        (self.status, axum::Json(body)).into_response()
    }
}

impl From<NodeError> for ApiError {
    fn from(e: NodeError) -> ApiError {
        // Every kind of failure has its status; a new kind must be placed here.
        let (status, code) = match &e {
            NodeError::InvalidArgument { .. } => (StatusCode::BAD_REQUEST, "invalid_argument"),
            NodeError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            NodeError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            NodeError::Overloaded(_)
            | NodeError::DiskFull(_)
            | NodeError::WriteFailed(_)
            | NodeError::StorageFailed(_)
            | NodeError::Fenced(_)
            | NodeError::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            // `NodeError` is non_exhaustive across crates: a kind added without a status
            // here is a 503 (nothing was done) until it gets one.
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

fn ok<T: serde::Serialize>(v: T) -> ApiResult {
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

pub(crate) fn rfc3339(ms: i64) -> Option<String> {
    jiff::Timestamp::from_millisecond(ms)
        .ok()
        .map(|t| t.to_string())
}

/// A metric amount in the limit's units: USD for cost, a count otherwise.
pub(crate) fn amount(metric: Metric, v: u64) -> Amount {
    Amount::of(metric == Metric::Cost, v)
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
        if r.mode == Mode::Hard {
            // Soft entries keep exactly their six fields.
            j.raw(",\"mode\":\"hard\",\"free\":");
            if r.free < 0 {
                j.raw("-");
            }
            j.amount(r.metric, r.free.unsigned_abs());
            j.raw(",\"reason\":");
            match r.reason {
                Some(reason) => j.str(reason.as_str()),
                None => j.raw("null"),
            };
            if let Some(ms) = r.retry_after_ms {
                j.raw(",\"retry_after_ms\":").raw(&ms.to_string());
            }
        }
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

fn view(d: &LimitDetails) -> LimitView {
    let m = d.input.metric;
    let never = d.input.period == Period::Never;
    let hard = d.input.mode == Mode::Hard;
    LimitView {
        calendar_aligned: d.input.calendar_aligned,
        id: d.report.id.clone(),
        max: amount(m, d.input.max),
        members: hard.then(|| {
            d.input
                .members
                .iter()
                .map(|mb| MemberWeight {
                    node: mb.node.clone(),
                    weight: mb.weight,
                })
                .collect()
        }),
        metric: m.as_str().to_string(),
        mode: hard.then(|| "hard".to_string()),
        nodes: d
            .nodes
            .iter()
            .map(|(n, v)| (n.clone(), amount(m, *v)))
            .collect(),
        period: d.input.period.to_string(),
        period_start: if never {
            None
        } else {
            rfc3339(d.report.period_start_ms)
        },
        remaining: amount(m, d.report.remaining),
        resets_at: d.report.resets_at_ms.and_then(rfc3339),
        // A soft limit's view is exactly as before hard mode existed.
        rights: hard.then(|| {
            d.rights
                .iter()
                .map(|r| {
                    (
                        r.node.clone(),
                        RightsView {
                            allocated: amount(m, r.rights.alloc),
                            decommissioned: r.decommissioned,
                            free: Balance::of(m == Metric::Cost, r.free),
                            given: amount(m, r.rights.given),
                            received: amount(m, r.rights.received),
                            used: amount(m, r.rights.used),
                        },
                    )
                })
                .collect()
        }),
        scope: d.input.scope.clone(),
        timezone: d.input.timezone.clone(),
        used: amount(m, d.report.used),
    }
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

/// `mode` and `members` of a limit body, checked.
fn limit_mode(
    mode: Option<&str>,
    members: Option<Vec<MemberSpec>>,
) -> Result<(Mode, Vec<tally_core::Member>), ApiError> {
    let mode = match mode {
        None => Mode::Soft,
        Some(m) => Mode::parse(m)
            .ok_or_else(|| ApiError::invalid(format!("mode {m:?} must be soft or hard")))?,
    };
    let Some(members) = members else {
        return Ok((mode, Vec::new()));
    };
    if members.is_empty() {
        return Err(ApiError::invalid(
            "members lists no node; omit it for the default (the live nodes of the fleet)",
        ));
    }
    if members.len() > tally_core::config::MEMBERS_MAX {
        return Err(ApiError::invalid(format!(
            "members has {} entries; at most {} are allowed",
            members.len(),
            tally_core::config::MEMBERS_MAX
        )));
    }
    let mut out: Vec<tally_core::Member> = members
        .into_iter()
        .map(|m| match m {
            MemberSpec::Node(node) => tally_core::Member { node, weight: 1 },
            MemberSpec::Weighted(w) => tally_core::Member {
                node: w.node,
                weight: w.weight,
            },
        })
        .collect();
    for m in &out {
        check_id(&m.node, "member node id")?;
    }
    out.sort_by(|a, b| a.node.cmp(&b.node));
    if let Some(w) = out.windows(2).find(|w| w[0].node == w[1].node) {
        return Err(ApiError::invalid(format!(
            "member {} is listed twice",
            w[0].node
        )));
    }
    if mode == Mode::Soft && !out.is_empty() {
        return Err(ApiError::invalid(
            "members apply to hard limits only; add \"mode\": \"hard\"",
        ));
    }
    Ok((mode, out))
}

async fn put_limit(
    State(s): App,
    headers: HeaderMap,
    Params(id): Params<String>,
    body: RawBody,
) -> ApiResult {
    authorize(&s, &headers, Role::Admin)?;
    let b: LimitRequest = parse_json(&body)?;
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
    let (mode, members) = limit_mode(b.mode.as_deref(), b.members)?;
    let input = LimitInput {
        scope: b.scope,
        metric,
        max,
        period,
        calendar_aligned: b.calendar_aligned,
        timezone: b.timezone.unwrap_or_else(|| "UTC".into()),
        mode,
        members,
    };
    let d = s.node.put_limit(&id, input).await?;
    ok(view(&d))
}

async fn get_limit(State(s): App, headers: HeaderMap, Params(id): Params<String>) -> ApiResult {
    authorize(&s, &headers, Role::Client)?;
    let d = s
        .node
        .limit(&id)
        .ok_or_else(|| ApiError::not_found(format!("no limit with id {id:?}")))?;
    ok(view(&d))
}

async fn list_limits(State(s): App, headers: HeaderMap, uri: axum::http::Uri) -> ApiResult {
    authorize(&s, &headers, Role::Client)?;
    let mut filter = Scope::new();
    if let Some(q) = uri.query() {
        for (k, v) in form_pairs(q)? {
            // `scope.team=eng`, or OpenAPI's deepObject spelling `scope[team]=eng`.
            let dim = k
                .strip_prefix("scope.")
                .or_else(|| k.strip_prefix("scope[").and_then(|d| d.strip_suffix(']')))
                .ok_or_else(|| {
                    ApiError::invalid(format!(
                        "unknown query parameter {k:?}; filter with scope.<dimension>=<value>"
                    ))
                })?;
            units::validate_dimension(dim).map_err(|e| ApiError::invalid(e.to_string()))?;
            filter.insert(dim.to_string(), v);
        }
    }
    ok(LimitList {
        limits: s.node.limits(&filter).iter().map(view).collect(),
    })
}

/// Decodes `a=b&c=d` with percent-escapes and `+` as space (`form_urlencoded`).
///
/// `form_urlencoded` is lenient where a client that sent such a query meant something else:
/// it keeps a malformed escape (`%zz`) as text and replaces bytes that are not UTF-8. Both
/// are refused here first with a 400 that says which.
pub(crate) fn form_pairs(q: &str) -> Result<Vec<(String, String)>, ApiError> {
    let b = q.as_bytes();
    for (i, _) in b.iter().enumerate().filter(|(_, c)| **c == b'%') {
        if !matches!(b.get(i + 1..i + 3), Some([h, l]) if h.is_ascii_hexdigit() && l.is_ascii_hexdigit())
        {
            return Err(ApiError::invalid("bad percent-escape in query"));
        }
    }
    // '&', '=' and '+' are ASCII, so the whole query decodes to UTF-8 iff every part does.
    if percent_encoding::percent_decode(b).decode_utf8().is_err() {
        return Err(ApiError::invalid("query is not UTF-8"));
    }
    Ok(form_urlencoded::parse(b)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect())
}

#[cfg(test)]
mod form_pairs_tests {
    use super::form_pairs;

    #[test]
    fn decodes_like_a_form() {
        let got = form_pairs("a=b&&c=d%20e+f&g&h=%C3%A9&a=2").unwrap();
        let want = [
            ("a", "b"),
            ("c", "d e f"),
            ("g", ""),
            ("h", "é"),
            ("a", "2"),
        ];
        assert_eq!(
            got,
            want.map(|(k, v)| (k.to_string(), v.to_string())).to_vec()
        );
        assert_eq!(form_pairs("").unwrap(), vec![]);
        assert_eq!(
            form_pairs("x=%2B%26%3D").unwrap(),
            vec![("x".into(), "+&=".into())]
        );
    }

    #[test]
    fn refuses_bad_escapes_and_non_utf8() {
        for q in ["a=%zz", "a=%4", "a=%", "%g0=1", "a=%+1"] {
            let e = form_pairs(q).unwrap_err();
            assert!(
                format!("{e:?}").contains("bad percent-escape"),
                "{q}: {e:?}"
            );
        }
        for q in ["a=%ff", "%C3=1"] {
            let e = form_pairs(q).unwrap_err();
            assert!(format!("{e:?}").contains("not UTF-8"), "{q}: {e:?}");
        }
    }
}

/// Epochs a history reply lists when the query does not say.
const HISTORY_EPOCHS_DEFAULT: usize = 100;

fn history_reply(id: String, h: LimitHistory) -> HistoryReply {
    let m = h.metric;
    let time = rfc3339;
    HistoryReply {
        id,
        metric: m.as_str().to_string(),
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
                used: amount(m, e.used),
                baseline: amount(m, e.baseline),
                nodes: e
                    .nodes
                    .into_iter()
                    .map(|(n, v)| (n, amount(m, v)))
                    .collect(),
            })
            .collect(),
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
    ok(history_reply(id, h))
}

async fn delete_limit(State(s): App, headers: HeaderMap, Params(id): Params<String>) -> ApiResult {
    authorize(&s, &headers, Role::Admin)?;
    s.node.delete_limit(&id).await?;
    ok(Deleted { deleted: true })
}

async fn reset_limit(
    State(s): App,
    headers: HeaderMap,
    Params(id): Params<String>,
    body: RawBody,
) -> ApiResult {
    authorize(&s, &headers, Role::Admin)?;
    let b: ResetRequest = parse_json(&body)?;
    let d = s
        .node
        .limit(&id)
        .ok_or_else(|| ApiError::not_found(format!("no limit with id {id:?}")))?;
    let baseline = match &b.used {
        Some(n) => metric_amount(d.input.metric, n, "used")?,
        None => 0,
    };
    let d = s.node.reset_limit(&id, baseline).await?;
    ok(view(&d))
}

// ----- entities ----------------------------------------------------------------------

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
    let b: EntityRequest = parse_json(&body)?;
    check_entity(&dim, &value)?;
    check_attributes(&b.parents)?;
    let rules = tally_core::AccessRules {
        active: b.active.unwrap_or(true),
        expires_at_ms: b
            .expires_at
            .as_deref()
            .map(|t| parse_time(t, "expires_at"))
            .transpose()?,
        allow: b.allow.unwrap_or_default(),
    };
    let e = s.node.put_entity(&dim, &value, b.parents, rules).await?;
    ok(entity_view(e))
}

/// An entity as the API shows it: rules only when set.
fn entity_view(e: tally_node::EntityDetails) -> EntityView {
    EntityView {
        active: (!e.rules.active).then_some(false),
        allow: (!e.rules.allow.is_empty()).then_some(e.rules.allow),
        dimension: e.dimension,
        expires_at: e.rules.expires_at_ms.and_then(rfc3339),
        parents: e.parents,
        value: e.value,
    }
}

/// An RFC 3339 instant in ms since the epoch, or a 400 naming the field.
fn parse_time(t: &str, what: &str) -> Result<i64, ApiError> {
    t.parse::<jiff::Timestamp>()
        .map(|t| t.as_millisecond())
        .map_err(|e| ApiError::invalid(format!("{what} {t:?} is not an RFC 3339 time: {e}")))
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
    ok(entity_view(e))
}

async fn delete_entity(
    State(s): App,
    headers: HeaderMap,
    Params((dim, value)): Params<(String, String)>,
) -> ApiResult {
    authorize(&s, &headers, Role::Admin)?;
    s.node.delete_entity(&dim, &value).await?;
    ok(Deleted { deleted: true })
}

// ----- prices ------------------------------------------------------------------------

/// A price body (USD per million tokens) as exact femto-USD per token.
fn price_of(
    input: f64,
    output: f64,
    cache_read: Option<f64>,
    cache_creation: Option<f64>,
    reasoning: Option<f64>,
) -> Result<tally_core::Price, ApiError> {
    use tally_core::prices::per_mtok_to_femto;
    let one = |v: f64, what: &str| {
        per_mtok_to_femto(v).map_err(|e| ApiError::invalid(format!("{what}: {e}")))
    };
    let opt = |v: Option<f64>, what: &str| v.map(|v| one(v, what)).transpose();
    Ok(tally_core::Price {
        input: one(input, "input")?,
        output: one(output, "output")?,
        cache_read: opt(cache_read, "cache_read")?,
        cache_creation: opt(cache_creation, "cache_creation")?,
        reasoning: opt(reasoning, "reasoning")?,
    })
}

fn price_view(model: String, p: &tally_core::Price) -> PriceView {
    use tally_core::prices::femto_to_per_mtok as f;
    PriceView {
        model,
        input: f(p.input),
        output: f(p.output),
        cache_read: p.cache_read.map(f),
        cache_creation: p.cache_creation.map(f),
        reasoning: p.reasoning.map(f),
    }
}

fn check_model(model: &str) -> Result<(), ApiError> {
    tally_core::prices::validate_model(model).map_err(|e| ApiError::invalid(format!("model: {e}")))
}

async fn put_price(
    State(s): App,
    headers: HeaderMap,
    Params(model): Params<String>,
    body: RawBody,
) -> ApiResult {
    authorize(&s, &headers, Role::Admin)?;
    let b: PriceRequest = parse_json(&body)?;
    check_model(&model)?;
    let price = price_of(
        b.input,
        b.output,
        b.cache_read,
        b.cache_creation,
        b.reasoning,
    )?;
    s.node
        .put_prices(vec![(model.clone(), Some(price))])
        .await?;
    ok(price_view(model, &price))
}

async fn get_price(State(s): App, headers: HeaderMap, Params(model): Params<String>) -> ApiResult {
    authorize(&s, &headers, Role::Client)?;
    let p = s
        .node
        .price(&model)
        .ok_or_else(|| ApiError::not_found(format!("no price for model {model:?}")))?;
    ok(price_view(model, &p))
}

async fn delete_price(
    State(s): App,
    headers: HeaderMap,
    Params(model): Params<String>,
) -> ApiResult {
    authorize(&s, &headers, Role::Admin)?;
    check_model(&model)?;
    s.node.put_prices(vec![(model, None)]).await?;
    ok(Deleted { deleted: true })
}

async fn list_prices(State(s): App, headers: HeaderMap, uri: axum::http::Uri) -> ApiResult {
    authorize(&s, &headers, Role::Client)?;
    if let Some((k, _)) = form_pairs(uri.query().unwrap_or(""))?.first() {
        return Err(ApiError::invalid(format!(
            "unknown query parameter {k:?}; GET /v1/prices takes none"
        )));
    }
    ok(PriceList {
        prices: s
            .node
            .prices()
            .into_iter()
            .map(|(m, p)| price_view(m, &p))
            .collect(),
    })
}

/// Most prices in one `POST /v1/prices/batch`.
pub const PRICE_BATCH_MAX: usize = 1000;

async fn price_batch(State(s): App, headers: HeaderMap, body: RawBody) -> ApiResult {
    authorize(&s, &headers, Role::Admin)?;
    let b: PriceBatchRequest = parse_json(&body)?;
    if b.prices.len() > PRICE_BATCH_MAX {
        return Err(ApiError::invalid(format!(
            "a batch has at most {PRICE_BATCH_MAX} prices, this one has {}",
            b.prices.len()
        )));
    }
    let prices = b
        .prices
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            let at = |err: ApiError| ApiError::invalid(format!("prices[{i}]: {}", err.message));
            check_model(&e.model).map_err(at)?;
            let p = price_of(
                e.input,
                e.output,
                e.cache_read,
                e.cache_creation,
                e.reasoning,
            )
            .map_err(at)?;
            Ok((e.model, Some(p)))
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let written = prices.len();
    if written > 0 {
        s.node.put_prices(prices).await?;
    }
    ok(PricesWritten { written })
}

/// The prices a request was charged at and why, as the API shows it.
pub fn priced_view(p: &tally_node::Priced) -> Priced {
    use tally_core::prices::femto_to_per_mtok as f;
    Priced {
        model: p.model.clone(),
        cost: p.cost.to_usd(),
        exact_usd: tally_core::prices::femto_to_usd_string(p.femto),
        prices: ChargedPrices {
            input: f(p.prices.input),
            output: f(p.prices.output),
            cache_read: f(p.prices.cache_read),
            cache_creation: f(p.prices.cache_creation),
            reasoning: f(p.prices.reasoning),
        },
    }
}

/// An access denial as the API shows it.
pub fn access_view(a: &tally_core::AccessDenial) -> AccessDenied {
    let mut v = AccessDenied {
        dimension: a.dimension.clone(),
        value: a.value.clone(),
        rule: a.rule.as_str().to_string(),
        expires_at: None,
        attribute: None,
        given: None,
    };
    match &a.rule {
        tally_core::BrokenRule::Inactive => {}
        tally_core::BrokenRule::Expired { expires_at_ms } => v.expires_at = rfc3339(*expires_at_ms),
        tally_core::BrokenRule::Allow { attribute, given } => {
            v.attribute = Some(attribute.clone());
            v.given = Some(given.clone());
        }
    }
    v
}

/// Token counts by kind of a check or record: `None` when none is given.
fn token_kinds(
    input: Option<u64>,
    output: Option<u64>,
    cache_read: Option<u64>,
    cache_creation: Option<u64>,
    reasoning: Option<u64>,
) -> Result<Option<tally_core::TokenKinds>, ApiError> {
    if [input, output, cache_read, cache_creation, reasoning]
        .iter()
        .all(Option::is_none)
    {
        return Ok(None);
    }
    Ok(Some(tally_core::TokenKinds {
        input: count(input, "input_tokens", 0)?,
        output: count(output, "output_tokens", 0)?,
        cache_read: count(cache_read, "cache_read_tokens", 0)?,
        cache_creation: count(cache_creation, "cache_creation_tokens", 0)?,
        reasoning: count(reasoning, "reasoning_tokens", 0)?,
    }))
}

/// Cost and tokens of a check or record: an explicit `cost` wins; else token counts by
/// kind are priced at the `model` attribute's price; else 0. `tokens`, when absent, is
/// the sum of the kinds.
fn cost_and_tokens(
    node: Option<&Node>,
    attributes: &Attributes<'_>,
    cost_usd: Option<f64>,
    tokens: Option<u64>,
    kinds: Option<tally_core::TokenKinds>,
) -> Result<(Micros, u64, Option<tally_node::Priced>), ApiError> {
    let tokens = match (tokens, &kinds) {
        (Some(t), _) => count(Some(t), "tokens", 0)?,
        (None, Some(k)) => {
            let sum = u64::try_from(k.total()).unwrap_or(u64::MAX);
            units::check_count(sum, "the sum of the token kinds")
                .map_err(|e| ApiError::invalid(e.to_string()))?
        }
        (None, None) => 0,
    };
    match (cost_usd, kinds, node) {
        (Some(_), _, _) | (None, None, _) => Ok((cost(cost_usd)?, tokens, None)),
        (None, Some(k), Some(node)) => {
            let model = attributes
                .pairs()
                .filter(|(n, _)| *n == "model")
                .last()
                .map(|(_, v)| v);
            let p = node.price_tokens(model, &k)?;
            Ok((p.cost, tokens, Some(p)))
        }
        (None, Some(_), None) => Err(ApiError::invalid(
            "token counts by kind are priced by a node; give \"cost\"",
        )),
    }
}

// ----- check and usage ---------------------------------------------------------------

fn validate_attributes(a: &Attributes<'_>) -> Result<(), ApiError> {
    check_attribute_pairs(a.pairs(), a.0.len())
}

/// Everything tally does with a `POST /v1/check` body before it asks the node: parse it
/// (attributes borrowed from the body), validate names, values, amounts and the
/// reservation fields, then call `then` with the attributes, the estimate and the
/// reservation's lifetime. Public so the benchmark floor (`tally-bench`) does exactly this
/// work and differs from tally only in the check itself.
pub fn parse_check<R>(
    body: &[u8],
    then: impl FnOnce(&[(&str, &str)], Amounts, Option<i64>) -> R,
) -> Result<R, ApiError> {
    parse_check_priced(body, None, |attrs, estimate, reserve, _| {
        then(attrs, estimate, reserve)
    })
}

/// [`parse_check`] that prices token counts by kind at `node`'s prices.
pub fn parse_check_priced<R>(
    body: &[u8],
    node: Option<&Node>,
    then: impl FnOnce(&[(&str, &str)], Amounts, Option<i64>, Option<tally_node::Priced>) -> R,
) -> Result<R, ApiError> {
    let b: CheckRequest = parse_json(body)?;
    validate_attributes(&b.attributes)?;
    let kinds = token_kinds(
        b.input_tokens,
        b.output_tokens,
        b.cache_read_tokens,
        b.cache_creation_tokens,
        b.reasoning_tokens,
    )?;
    let (cost, tokens, priced) = cost_and_tokens(node, &b.attributes, b.cost, b.tokens, kinds)?;
    let estimate = Amounts {
        cost,
        tokens,
        requests: 1,
    };
    // `ttl_s` is read only with `reserve` (a client may always send both).
    let reserve = match (b.reserve, b.ttl_s) {
        (_, Some(t)) if t == 0 || t > tally_api::TTL_S_MAX => {
            return Err(ApiError::invalid(format!(
                "ttl_s must be between 1 and {}",
                tally_api::TTL_S_MAX
            )));
        }
        (false, _) => None,
        (true, Some(t)) => Some(i64::try_from(t.saturating_mul(1000)).unwrap_or(i64::MAX)),
        (true, None) => Some(tally_node::RESERVATION_TTL_DEFAULT_MS),
    };
    let attrs: Vec<(&str, &str)> = b.attributes.pairs().collect();
    Ok(then(&attrs, estimate, reserve, priced))
}

async fn check(State(s): App, headers: HeaderMap, body: RawBody) -> ApiResult {
    authorize(&s, &headers, Role::Client)?;
    let (r, priced) = parse_check_priced(&body, Some(&s.node), |attrs, estimate, reserve, p| {
        s.node
            .check_reserve(attrs, estimate, reserve)
            .map(|r| (r, p))
    })??;
    let reservation = r.reservation.as_ref().map(|res| Reservation {
        id: res.id.clone(),
        node: s.node.node_id().to_string(),
        expires_at: rfc3339(res.expires_at_ms).unwrap_or_default(),
    });
    let extras = ReplyExtras {
        access: r.access.as_ref().map(access_view),
        priced: priced.as_ref().map(priced_view),
    };
    json_reply(check_reply_json(
        r.allowed,
        r.stale,
        &r.limits,
        reservation.as_ref(),
        &extras,
    ))
}

/// The rarely present parts of check and usage replies.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplyExtras {
    pub access: Option<AccessDenied>,
    pub priced: Option<Priced>,
}

/// Appends `"name": value` as serde writes it (for the rare parts of a reply).
fn write_serde<T: serde::Serialize>(j: &mut Json, name: &str, value: &T) {
    j.raw(",").str(name).raw(":");
    j.raw(&serde_json::to_string(value).expect("reply parts always serialize"));
}

/// The [`tally_api::CheckReply`] of a check, written directly (see [`crate::json`]).
pub fn check_reply_json(
    allowed: bool,
    stale: bool,
    limits: &[LimitReport],
    reservation: Option<&Reservation>,
    extras: &ReplyExtras,
) -> Json {
    let mut j = Json::with_capacity(reply_capacity(limits.len()));
    j.raw("{\"allowed\":").bool(allowed);
    j.raw(",\"stale\":").bool(stale);
    j.raw(",\"denied_by\":[");
    for (i, l) in limits.iter().filter(|l| l.denied).enumerate() {
        if i > 0 {
            j.raw(",");
        }
        j.str(&l.id);
    }
    j.raw("],\"limits\":");
    write_reports(&mut j, limits);
    if let Some(a) = &extras.access {
        write_serde(&mut j, "access", a);
    }
    if let Some(res) = reservation {
        j.raw(",\"reservation\":{\"id\":").str(&res.id);
        j.raw(",\"node\":").str(&res.node);
        j.raw(",\"expires_at\":").str(&res.expires_at);
        j.raw("}");
    }
    if let Some(p) = &extras.priced {
        write_serde(&mut j, "priced", p);
    }
    j.raw("}");
    j
}

/// The [`tally_api::UsageReply`] of a record, written directly (see [`crate::json`]).
pub fn usage_reply_json(
    applied: bool,
    limits: &[LimitReport],
    overrun: &[(String, u64)],
    priced: Option<&Priced>,
) -> Json {
    let mut j = Json::with_capacity(reply_capacity(limits.len()));
    j.raw("{\"applied\":").bool(applied);
    j.raw(",\"limits\":");
    write_reports(&mut j, limits);
    write_overrun(&mut j, limits, overrun);
    if let Some(p) = priced {
        write_serde(&mut j, "priced", p);
    }
    j.raw("}");
    j
}

/// The typed value [`check_reply_json`] writes: what serde would send.
pub fn check_reply(
    allowed: bool,
    stale: bool,
    limits: &[LimitReport],
    reservation: Option<&Reservation>,
    extras: &ReplyExtras,
) -> tally_api::CheckReply {
    tally_api::CheckReply {
        access: extras.access.clone(),
        priced: extras.priced.clone(),
        reservation: reservation.cloned(),
        allowed,
        stale,
        denied_by: limits
            .iter()
            .filter(|l| l.denied)
            .map(|l| l.id.clone())
            .collect(),
        limits: limits.iter().map(limit_status).collect(),
    }
}

/// The typed value [`usage_reply_json`] writes.
pub fn usage_reply(
    applied: bool,
    limits: &[LimitReport],
    overrun: &[(String, u64)],
    priced: Option<&Priced>,
) -> tally_api::UsageReply {
    tally_api::UsageReply {
        priced: priced.cloned(),
        overrun: (!overrun.is_empty()).then(|| {
            overrun
                .iter()
                .map(|(id, v)| {
                    let metric = limits
                        .iter()
                        .find(|l| &l.id == id)
                        .map_or(Metric::Requests, |l| l.metric);
                    (id.clone(), amount(metric, *v))
                })
                .collect()
        }),
        applied,
        limits: limits.iter().map(limit_status).collect(),
    }
}

pub fn limit_status(l: &LimitReport) -> tally_api::LimitStatus {
    tally_api::LimitStatus {
        id: l.id.clone(),
        metric: l.metric.as_str().to_string(),
        used: amount(l.metric, l.used),
        max: amount(l.metric, l.max),
        remaining: amount(l.metric, l.remaining),
        resets_at: l.resets_at_ms.and_then(rfc3339),
        mode: (l.mode == Mode::Hard).then(|| "hard".to_string()),
        free: (l.mode == Mode::Hard)
            .then(|| tally_api::Balance::of(l.metric == Metric::Cost, l.free)),
        reason: (l.mode == Mode::Hard).then(|| l.reason.map(|r| r.as_str().to_string())),
        retry_after_ms: l.retry_after_ms,
    }
}

fn usage_record(
    node: &Node,
    b: UsageRequest<'_>,
) -> Result<(UsageRecord, Option<tally_node::Priced>), ApiError> {
    check_id(&b.id, "record id")?;
    if let Some(r) = &b.reservation {
        check_reservation_id(r)?;
    }
    validate_attributes(&b.attributes)?;
    let at_ms = match &b.at {
        Some(at) => Some(
            at.parse::<jiff::Timestamp>()
                .map_err(|e| ApiError::invalid(format!("at {at:?} is not an RFC 3339 time: {e}")))?
                .as_millisecond(),
        ),
        None => None,
    };
    let kinds = token_kinds(
        b.input_tokens,
        b.output_tokens,
        b.cache_read_tokens,
        b.cache_creation_tokens,
        b.reasoning_tokens,
    )?;
    let (cost, tokens, priced) =
        cost_and_tokens(Some(node), &b.attributes, b.cost, b.tokens, kinds)?;
    let record = UsageRecord {
        amounts: Amounts {
            cost,
            tokens,
            requests: count(b.requests, "requests", 1)?,
        },
        id: b.id,
        attributes: b.attributes.into_owned(),
        at_ms,
        reservation: b.reservation,
    };
    Ok((record, priced))
}

async fn usage(State(s): App, headers: HeaderMap, body: RawBody) -> ApiResult {
    authorize(&s, &headers, Role::Client)?;
    let (rec, priced) = usage_record(&s.node, parse_json(&body)?)?;
    let (outcomes, records) = s.node.record_outcomes(vec![rec]).await;
    let outcome = outcomes?.swap_remove(0);
    // The writer hands the record back with its answer.
    let pairs: Vec<(&str, &str)> = records
        .first()
        .map(|r| &r.attributes[..])
        .unwrap_or_default()
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let statuses = s.node.statuses(&pairs);
    json_reply(usage_reply_json(
        outcome.applied,
        &statuses,
        &outcome.overrun,
        priced.as_ref().map(priced_view).as_ref(),
    ))
}

/// `"overrun": {limit: amount}` of a usage reply, when the record spent hard limits
/// beyond this node's rights.
fn write_overrun(j: &mut Json, statuses: &[LimitReport], overrun: &[(String, u64)]) {
    if overrun.is_empty() {
        return;
    }
    j.raw(",\"overrun\":{");
    for (i, (id, v)) in overrun.iter().enumerate() {
        if i > 0 {
            j.raw(",");
        }
        let metric = statuses
            .iter()
            .find(|l| &l.id == id)
            .map_or(Metric::Requests, |l| l.metric);
        j.str(id).raw(":").amount(metric, *v);
    }
    j.raw("}");
}

/// Reservation ids are this node's: `{node id}~{hex}~{hex}`.
fn check_reservation_id(id: &str) -> Result<(), ApiError> {
    let ok = id.len() <= 200
        && id.split('~').count() == 3
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._:-~".contains(c));
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "reservation {id:?} is not a reservation id this API gave"
        )))
    }
}

async fn cancel_reservation(
    State(s): App,
    headers: HeaderMap,
    Params(id): Params<String>,
) -> ApiResult {
    authorize(&s, &headers, Role::Client)?;
    check_reservation_id(&id)?;
    if s.node.cancel_reservation(&id) {
        ok(Released { released: true })
    } else {
        Err(ApiError::not_found(format!(
            "no open reservation {id:?} on this node: it was settled, released or expired (reservations are held by the node that made them)"
        )))
    }
}

async fn decommission_node(
    State(s): App,
    headers: HeaderMap,
    Params(id): Params<String>,
    body: RawBody,
) -> ApiResult {
    authorize(&s, &headers, Role::Admin)?;
    check_id(&id, "node id")?;
    let b: DecommissionRequest = if body.bytes.is_empty() {
        DecommissionRequest::default()
    } else {
        parse_json(&body)?
    };
    if let Some(succ) = &b.successor {
        check_id(succ, "successor node id")?;
    }
    let rec = s.node.decommission(&id, b.successor.as_deref()).await?;
    ok(Decommissioned {
        decommissioned: true,
        node: rec.node,
        successor: rec.successor,
    })
}

async fn usage_batch(State(s): App, headers: HeaderMap, body: RawBody) -> ApiResult {
    authorize(&s, &headers, Role::Client)?;
    let b: BatchRequest = parse_json(&body)?;
    if b.records.len() > BATCH_RECORDS_MAX {
        return Err(ApiError::invalid(format!(
            "a batch has at most {BATCH_RECORDS_MAX} records, this one has {}",
            b.records.len()
        )));
    }
    let (records, priced): (Vec<UsageRecord>, Vec<Option<tally_node::Priced>>) = b
        .records
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            usage_record(&s.node, r)
                .map_err(|e| ApiError::invalid(format!("records[{i}]: {}", e.message)))
        })
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .unzip();
    let ids: Vec<String> = records.iter().map(|r| r.id.clone()).collect();
    let outcomes = if records.is_empty() {
        Vec::new()
    } else {
        s.node.record_outcomes(records).await.0?
    };
    ok(BatchReply {
        results: ids
            .into_iter()
            .zip(outcomes)
            .zip(priced)
            .map(|((id, o), p)| BatchResult {
                priced: p.as_ref().map(priced_view),
                applied: o.applied,
                id,
                overrun: (!o.overrun.is_empty()).then(|| {
                    o.overrun
                        .iter()
                        .map(|(l, n)| {
                            let metric = s
                                .node
                                .limit_spec(l)
                                .map_or(Metric::Requests, |x| x.input.metric);
                            (l.clone(), amount(metric, *n))
                        })
                        .collect()
                }),
            })
            .collect(),
    })
}

// ----- operations --------------------------------------------------------------------

async fn healthz() -> ApiResult {
    ok(Health {
        status: "ok".into(),
    })
}

async fn readyz(State(s): App) -> ApiResult {
    if s.node.ready() {
        return ok(Ready { ready: true });
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
    let nodes: Vec<Member> = match s.node.members().await {
        Some(members) => members
            .iter()
            .map(|m| Member {
                gossip_addr: Some(m.gossip_addr.to_string()),
                generation: m.generation,
                // A node whose values fail the MAC (another cluster key) talks to
                // chitchat but takes no part in the fleet.
                live: m.live && m.verified,
                // Gossip lag where known: how long ago a value from it was accepted.
                newest_value_age_ms: m.newest_value_age.map(|d| d.as_millis() as u64),
                node_id: m.node_id.clone(),
            })
            .collect(),
        None => vec![Member {
            gossip_addr: s.gossip_addr.clone(),
            generation: u64::try_from(s.started_ms).unwrap_or(0),
            live: true,
            newest_value_age_ms: None,
            node_id: s.node.node_id().to_string(),
        }],
    };
    ok(ClusterReply {
        node_id: s.node.node_id().to_string(),
        nodes,
    })
}

async fn metrics(State(s): App) -> Response {
    let mut text = crate::metrics::render(&s.node).await;
    crate::proxies::render_metrics(&s.proxies, &mut text);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// `GET /openapi.json`: the OpenAPI 3.1 document of this API (no auth), built once.
async fn openapi() -> Response {
    static DOC: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    let doc = DOC.get_or_init(|| Bytes::from(tally_api::openapi::document_text()));
    ([(header::CONTENT_TYPE, "application/json")], doc.clone()).into_response()
}

async fn no_route(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("no route for {method} {}", uri.path()))
}

/// A path that exists with a method it does not have: 405 (axum adds `Allow`).
async fn no_method(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        code: "method_not_allowed",
        message: format!(
            "{} has no method {method}; the Allow header lists those it has",
            uri.path()
        ),
    }
}

/// The router of API.md.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
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
        .route("/v1/check", post(Timed::new(check, Timing::Check)))
        .route("/v1/usage", post(Timed::new(usage, Timing::Record)))
        .route(
            "/v1/usage/batch",
            post(Timed::new(usage_batch, Timing::RecordBatch)),
        )
        .route("/v1/prices", get(list_prices))
        // `batch` is not a model: the name is reserved (see `check_model`).
        .route("/v1/prices/batch", post(price_batch))
        .route(
            "/v1/prices/{*model}",
            put(put_price).get(get_price).delete(delete_price),
        )
        .route("/v1/reservations/{id}", delete(cancel_reservation))
        .route("/v1/nodes/{id}/decommission", post(decommission_node))
        .merge(crate::proxies::routes())
        .merge(crate::ui::routes())
        .fallback(no_route)
        .method_not_allowed_fallback(no_method)
        .with_state(state)
}
