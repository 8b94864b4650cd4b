//! Usage from proxy access logs: each access-log line a proxy writes is one usage record,
//! idempotent by the request id the proxy generated.
//!
//! Where lines come from (all off by default):
//! - `--log-listen-udp ADDR`: syslog datagrams (nginx `access_log syslog:server=`,
//!   HAProxy `log ADDR`), one or more lines each;
//! - `--log-listen-tcp ADDR`: newline-separated lines (Caddy `output net`, or syslog
//!   over TCP, octet-counted or not);
//! - `POST /v1/usage/logs` (client role): a body of lines, answered once they are durable.
//!
//! What a line may be, after an optional syslog header (`<PRI>...` up to the first `{`):
//! - a **tally line**, JSON `{"id", "attributes": {dim: value}, "cost", "tokens",
//!   "requests", "at"}`, which `log_format ... escape=json` (nginx) and `log-format`
//!   (HAProxy) can write: numbers may be JSON strings, an empty string or `-` is absent
//!   (a header the request did not have), `at` is RFC 3339 or Unix seconds (nginx
//!   `$msec`);
//! - a **Caddy access log** line (`"logger":"http.log.access..."`): the id is the `id`
//!   field (`log_append id {http.request.uuid}`), else the `X-Request-Id` request or
//!   response header; attributes are `attr.<dimension>` fields (`log_append
//!   attr.virtual_key {http.request.header.X-Api-Key}`) and `X-Tally-Attr-*` request
//!   headers; cost and tokens are the `X-Tally-Cost` / `X-Tally-Tokens` response headers
//!   (what the upstream reports); `at` is `ts`.
//!
//! Records go through one bounded queue to a batcher that applies up to
//! [`BATCH_RECORDS_MAX`] at a time with `Node::record` (one group commit). A line that is
//! not one of these shapes, or whose record the node refuses, is counted in
//! `tally_log_lines_malformed_total` and skipped alone; it never stops the listener and
//! never takes other lines down with it. When the queue is full, UDP lines are dropped
//! and counted (`tally_log_lines_dropped_total`; UDP has no back-pressure) and TCP
//! readers wait.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tally_core::units::ATTRIBUTES_MAX;
use tally_core::{Amounts, Micros};
use tally_node::{Node, NodeError, UsageRecord};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{Semaphore, mpsc};

use crate::http::{ApiError, AppState, RawBody, Role, authorize, check_attribute_pairs, check_id};

/// Longest line read (bytes); longer lines are skipped as malformed.
pub const LINE_BYTES_MAX: usize = 64 << 10;
/// Records queued between the listeners and the batcher.
pub const QUEUE_RECORDS_MAX: usize = 16_384;
/// Most records in one `Node::record` call.
pub const BATCH_RECORDS_MAX: usize = 1_000;
/// Most lines in one `POST /v1/usage/logs` body (which is also at most 1 MiB).
pub const BODY_LINES_MAX: usize = 10_000;
/// Open TCP log connections.
pub const TCP_CONNECTIONS_MAX: usize = 256;
/// How long the batcher retries a batch the node cannot take (queue full, stopping).
const RETRY_FOR: Duration = Duration::from_secs(10);
/// Errors listed in a `POST /v1/usage/logs` reply.
const REPLY_ERRORS_MAX: usize = 20;

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct LogMetrics {
    pub lines_total: AtomicU64,
    pub malformed_total: AtomicU64,
    pub dropped_total: AtomicU64,
    pub applied_total: AtomicU64,
    pub duplicate_total: AtomicU64,
    pub failed_total: AtomicU64,
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// A number a proxy may write as a JSON number or as a string.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Num {
    Number(serde_json::Number),
    Text(String),
}

impl Num {
    /// `None` for the empty string and `-` (a header or variable the request lacked).
    fn text(&self) -> Option<String> {
        match self {
            Num::Number(n) => Some(n.to_string()),
            Num::Text(t) => {
                let t = t.trim();
                (!t.is_empty() && t != "-").then(|| t.to_string())
            }
        }
    }
}

/// One access-log line, in either shape (module docs). Unknown fields are ignored so
/// Caddy's many fields pass; the shape is told by `logger`/`request`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct LogLine {
    // tally line
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attributes: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<Num>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<Num>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<Num>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<Num>,
    // Caddy access log
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logger: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<CaddyRequest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resp_headers: Option<BTreeMap<String, Vec<String>>>,
    /// Every other field; Caddy's `attr.<dimension>` fields are read from here.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct CaddyRequest {
    #[serde(default)]
    pub headers: BTreeMap<String, Vec<String>>,
}

/// Strips a syslog header (RFC 3164 or 5424, optionally octet-counted) up to the JSON.
fn payload(line: &str) -> &str {
    let line = line.trim();
    if line.starts_with('{') {
        return line;
    }
    line.find('{').map_or(line, |i| &line[i..])
}

fn header<'a>(map: &'a BTreeMap<String, Vec<String>>, name: &str) -> Option<&'a str> {
    map.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .and_then(|(_, v)| v.first())
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

/// Turns one line into a usage record, or says why it cannot.
pub fn parse_line(line: &str) -> Result<UsageRecord, String> {
    let json = payload(line);
    if !json.starts_with('{') {
        return Err("not a JSON access-log line".into());
    }
    let l: LogLine = serde_json::from_str(json).map_err(|e| format!("invalid JSON: {e}"))?;
    let caddy = l.logger.is_some() || l.request.is_some() || l.resp_headers.is_some();
    let (id, attributes, cost, tokens, requests, at_ms) = if caddy {
        if let Some(lg) = &l.logger {
            if !lg.starts_with("http.log.access") {
                return Err(format!("a Caddy {lg:?} line, not an access log"));
            }
        }
        let empty = BTreeMap::new();
        let req = l.request.as_ref().map_or(&empty, |r| &r.headers);
        let resp = l.resp_headers.as_ref().unwrap_or(&empty);
        let id = l
            .id
            .clone()
            .filter(|i| !i.is_empty())
            .or_else(|| header(resp, "x-request-id").map(str::to_string))
            .or_else(|| header(req, "x-request-id").map(str::to_string))
            .ok_or("no id field (log_append id {http.request.uuid}) and no X-Request-Id header")?;
        let mut attrs = BTreeMap::new();
        for (k, v) in &l.other {
            if let (Some(dim), Some(v)) = (k.strip_prefix("attr."), v.as_str()) {
                if !v.is_empty() {
                    attrs.insert(dim.to_string(), v.to_string());
                }
            }
        }
        for (k, v) in req.iter().chain(resp.iter()) {
            let lower = k.to_ascii_lowercase();
            if let Some(dim) = lower.strip_prefix(super::forward_auth::ATTR_PREFIX) {
                if let Some(v) = v.first().filter(|v| !v.is_empty()) {
                    attrs.insert(dim.replace('-', "_"), v.clone());
                }
            }
        }
        let num = |name: &str| header(resp, name).map(|s| Num::Text(s.to_string()));
        let at = l.ts.map(|t| (t * 1000.0).round() as i64);
        (
            id,
            attrs,
            num("x-tally-cost"),
            num("x-tally-tokens"),
            None,
            at,
        )
    } else {
        let id = l.id.filter(|i| !i.is_empty()).ok_or("no id")?;
        let attrs: BTreeMap<String, String> = l
            .attributes
            .unwrap_or_default()
            .into_iter()
            .filter(|(_, v)| !v.is_empty() && v != "-")
            .collect();
        let at = match l.at.as_ref().and_then(Num::text) {
            Some(t) => Some(parse_at(&t)?),
            None => None,
        };
        (id, attrs, l.cost, l.tokens, l.requests, at)
    };
    check_id(&id, "record id").map_err(|e| e.message)?;
    if attributes.len() > ATTRIBUTES_MAX {
        return Err(format!(
            "{} attributes; at most {ATTRIBUTES_MAX} are allowed",
            attributes.len()
        ));
    }
    check_attribute_pairs(
        attributes.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        attributes.len(),
    )
    .map_err(|e| e.message)?;
    let cost = match cost.as_ref().and_then(Num::text) {
        Some(c) => {
            let usd: f64 = c
                .parse()
                .map_err(|_| format!("cost {c:?} is not a number"))?;
            Micros::from_usd(usd, "cost").map_err(|e| e.to_string())?
        }
        None => Micros(0),
    };
    let count = |n: &Option<Num>, what: &'static str, default: u64| -> Result<u64, String> {
        match n.as_ref().and_then(Num::text) {
            Some(t) => {
                let v: u64 = t
                    .parse()
                    .map_err(|_| format!("{what} {t:?} is not a whole number"))?;
                tally_core::units::check_count(v, what).map_err(|e| e.to_string())
            }
            None => Ok(default),
        }
    };
    Ok(UsageRecord {
        id,
        attributes: attributes.into_iter().collect(),
        amounts: Amounts {
            cost,
            tokens: count(&tokens, "tokens", 0)?,
            requests: count(&requests, "requests", 1)?,
        },
        at_ms,
        reservation: None,
    })
}

/// `at`: RFC 3339, or Unix seconds with a fraction (nginx `$msec`).
fn parse_at(t: &str) -> Result<i64, String> {
    if let Ok(secs) = t.parse::<f64>() {
        if secs.is_finite() && secs > 0.0 && secs < 1e11 {
            return Ok((secs * 1000.0).round() as i64);
        }
        return Err(format!("at {t:?} is not a time in Unix seconds"));
    }
    t.parse::<jiff::Timestamp>()
        .map(|ts| ts.as_millisecond())
        .map_err(|e| format!("at {t:?} is neither RFC 3339 nor Unix seconds: {e}"))
}

/// Outcome of applying records.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Applied {
    applied: u64,
    duplicates: u64,
    refused: u64,
}

/// Applies records in one group commit; if the node refuses the batch (one record's
/// `at` outside the window), applies them one by one so only the bad ones are skipped.
/// Retries while the node is unavailable (write queue full, stopping), for up to
/// [`RETRY_FOR`]; a batch the node could not queue is dropped by it, so each attempt
/// sends a copy.
async fn apply(
    node: &Node,
    records: Vec<UsageRecord>,
    errors: &mut Vec<String>,
) -> Result<Applied, NodeError> {
    let mut out = Applied::default();
    let deadline = tokio::time::Instant::now() + RETRY_FOR;
    loop {
        match node.record(records.clone()).await {
            Ok(applied) => {
                for a in applied {
                    if a {
                        out.applied += 1;
                    } else {
                        out.duplicates += 1;
                    }
                }
                return Ok(out);
            }
            Err(NodeError::InvalidArgument { .. }) if records.len() > 1 => {
                for rec in records {
                    let a = Box::pin(apply(node, vec![rec], errors)).await?;
                    out.applied += a.applied;
                    out.duplicates += a.duplicates;
                    out.refused += a.refused;
                }
                return Ok(out);
            }
            Err(NodeError::InvalidArgument { message, .. }) => {
                errors.push(message);
                out.refused += records.len() as u64;
                return Ok(out);
            }
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Applies everything queued, batch by batch, until every sender is gone.
pub async fn batcher(node: Node, metrics: Arc<AppState>, mut rx: mpsc::Receiver<UsageRecord>) {
    let m = &metrics.proxies.logs;
    let mut batch = Vec::with_capacity(BATCH_RECORDS_MAX);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < BATCH_RECORDS_MAX {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let n = batch.len() as u64;
        let mut errors = Vec::new();
        match apply(&node, std::mem::take(&mut batch), &mut errors).await {
            Ok(a) => {
                add(&m.applied_total, a.applied);
                add(&m.duplicate_total, a.duplicates);
                add(&m.malformed_total, a.refused);
                for e in errors.iter().take(3) {
                    tracing::warn!(error = %e, "access-log record refused by the node; skipped");
                }
            }
            Err(e) => {
                add(&m.failed_total, n);
                tracing::error!(error = %e, records = n, "access-log records not applied: the node stayed unavailable; they are lost, see tally_log_records_failed_total");
            }
        }
    }
}

fn malformed(m: &LogMetrics, why: &str, from: &str) {
    let n = m.malformed_total.fetch_add(1, Ordering::Relaxed);
    // The first few, then one in a thousand: a misconfigured proxy must not flood the log.
    if n < 5 || n % 1000 == 0 {
        tracing::warn!(from, error = %why, malformed_so_far = n + 1, "skipping an access-log line that is not usage");
    }
}

/// Splits off RFC 6587 octet counting (`123 <14>...`) if present.
fn strip_octet_count(line: &str) -> &str {
    match line.split_once(' ') {
        Some((n, rest))
            if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) && rest.starts_with('<') =>
        {
            rest
        }
        _ => line,
    }
}

/// Receives syslog datagrams until `shutdown`.
pub async fn udp(
    socket: UdpSocket,
    state: Arc<AppState>,
    tx: mpsc::Sender<UsageRecord>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let m = &state.proxies.logs;
    let mut buf = vec![0u8; LINE_BYTES_MAX];
    tokio::pin!(shutdown);
    loop {
        let (n, _) = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "access-log UDP receive failed");
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        let Ok(text) = std::str::from_utf8(&buf[..n]) else {
            add(&m.lines_total, 1);
            malformed(m, "not UTF-8", "udp");
            continue;
        };
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            add(&m.lines_total, 1);
            match parse_line(line) {
                Ok(rec) => {
                    if tx.try_send(rec).is_err() {
                        add(&m.dropped_total, 1);
                    }
                }
                Err(e) => malformed(m, &e, "udp"),
            }
        }
    }
}

/// Accepts line streams until `shutdown`; open connections end with it.
pub async fn tcp(
    listener: TcpListener,
    state: Arc<AppState>,
    tx: mpsc::Sender<UsageRecord>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(TCP_CONNECTIONS_MAX));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("never closed"),
            () = &mut shutdown => break,
        };
        let (conn, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "access-log TCP accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let (state, tx, mut stop) = (state.clone(), tx.clone(), stop_rx.clone());
        tokio::spawn(async move {
            let _permit = permit;
            tokio::select! {
                () = read_lines(conn, peer, &state, &tx) => {}
                _ = stop.changed() => {}
            }
        });
    }
    let _ = stop_tx.send(true);
}

async fn read_lines(
    conn: tokio::net::TcpStream,
    peer: SocketAddr,
    state: &AppState,
    tx: &mpsc::Sender<UsageRecord>,
) {
    let m = &state.proxies.logs;
    let mut r = BufReader::new(conn);
    let mut buf = Vec::with_capacity(4096);
    loop {
        buf.clear();
        let n = match (&mut r)
            .take(LINE_BYTES_MAX as u64)
            .read_until(b'\n', &mut buf)
            .await
        {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "access-log connection ended");
                return;
            }
        };
        if n == LINE_BYTES_MAX && buf.last() != Some(&b'\n') {
            // Too long: skip to the end of this line.
            add(&m.lines_total, 1);
            malformed(m, "line longer than 64 KiB", "tcp");
            loop {
                buf.clear();
                match (&mut r)
                    .take(LINE_BYTES_MAX as u64)
                    .read_until(b'\n', &mut buf)
                    .await
                {
                    Ok(0) | Err(_) => return,
                    Ok(_) if buf.last() == Some(&b'\n') => break,
                    Ok(_) => {}
                }
            }
            continue;
        }
        let Ok(line) = std::str::from_utf8(&buf) else {
            add(&m.lines_total, 1);
            malformed(m, "not UTF-8", "tcp");
            continue;
        };
        if line.trim().is_empty() {
            continue;
        }
        add(&m.lines_total, 1);
        match parse_line(strip_octet_count(line.trim())) {
            Ok(rec) => {
                if tx.send(rec).await.is_err() {
                    return;
                }
            }
            Err(e) => malformed(m, &e, "tcp"),
        }
    }
}

pub use tally_api::{LineError, LogsReply};

/// `POST /v1/usage/logs`: a body of access-log lines; replies once their usage is durable.
pub async fn handle(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: RawBody,
) -> Result<Response, ApiError> {
    authorize(&s, &headers, Role::Client)?;
    let text =
        std::str::from_utf8(&body).map_err(|_| ApiError::invalid("the body is not UTF-8 text"))?;
    let m = &s.proxies.logs;
    let mut reply = LogsReply {
        lines: 0,
        applied: 0,
        duplicates: 0,
        malformed: 0,
        errors: Vec::new(),
    };
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        reply.lines += 1;
        if reply.lines as usize > BODY_LINES_MAX {
            return Err(ApiError::invalid(format!(
                "more than {BODY_LINES_MAX} lines in one body; send several"
            )));
        }
        match parse_line(strip_octet_count(line.trim())) {
            Ok(r) => records.push(r),
            Err(e) => {
                reply.malformed += 1;
                if reply.errors.len() < REPLY_ERRORS_MAX {
                    reply.errors.push(LineError {
                        line: i as u64 + 1,
                        message: e,
                    });
                }
            }
        }
    }
    add(&m.lines_total, reply.lines);
    add(&m.malformed_total, reply.malformed);
    while !records.is_empty() {
        let rest = records.split_off(records.len().min(BATCH_RECORDS_MAX));
        let mut errors = Vec::new();
        let a = apply(&s.node, std::mem::replace(&mut records, rest), &mut errors).await?;
        reply.applied += a.applied;
        reply.duplicates += a.duplicates;
        reply.malformed += a.refused;
        add(&m.applied_total, a.applied);
        add(&m.duplicate_total, a.duplicates);
        add(&m.malformed_total, a.refused);
        for e in errors {
            if reply.errors.len() < REPLY_ERRORS_MAX {
                reply.errors.push(LineError {
                    line: 0,
                    message: e,
                });
            }
        }
    }
    Ok(axum::Json(reply).into_response())
}

/// Starts the configured listeners and the batcher. Returns the batcher's handle, which
/// ends once the listeners stopped (on `shutdown`) and everything queued is applied.
pub fn start(
    state: Arc<AppState>,
    udp_socket: Option<UdpSocket>,
    tcp_listener: Option<TcpListener>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<()>> {
    if udp_socket.is_none() && tcp_listener.is_none() {
        return None;
    }
    let (tx, rx) = mpsc::channel(QUEUE_RECORDS_MAX);
    let stopped = |mut w: tokio::sync::watch::Receiver<bool>| async move {
        let _ = w.wait_for(|s| *s).await;
    };
    if let Some(sock) = udp_socket {
        tokio::spawn(udp(
            sock,
            state.clone(),
            tx.clone(),
            stopped(shutdown.clone()),
        ));
    }
    if let Some(l) = tcp_listener {
        tokio::spawn(tcp(l, state.clone(), tx.clone(), stopped(shutdown.clone())));
    }
    drop(tx);
    let node = state.node.clone();
    Some(tokio::spawn(batcher(node, state, rx)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nginx_json_line_over_syslog() {
        let line = r#"<190>Dec  3 10:40:00 host nginx: {"id":"7f3a9c","attributes":{"virtual_key":"vk-1","team":""},"cost":"0.0123","tokens":"1800","at":"1795327200.250"}"#;
        let r = parse_line(line).unwrap();
        assert_eq!(r.id, "7f3a9c");
        assert_eq!(
            r.attributes,
            [("virtual_key".to_string(), "vk-1".to_string())]
        );
        assert_eq!(r.amounts.cost, Micros(12_300));
        assert_eq!((r.amounts.tokens, r.amounts.requests), (1800, 1));
        assert_eq!(r.at_ms, Some(1_795_327_200_250));
        // Missing upstream headers are "" in nginx and "-" in HAProxy: absent.
        let r = parse_line(
            r#"{"id":"a","cost":"","tokens":"-","requests":2,"at":"2026-11-22T06:00:00Z"}"#,
        )
        .unwrap();
        assert_eq!(
            r.amounts,
            Amounts {
                cost: Micros(0),
                tokens: 0,
                requests: 2
            }
        );
        assert_eq!(r.at_ms, Some(1_795_327_200_000));
    }

    #[test]
    fn caddy_access_log_line() {
        let line = r#"{"level":"info","ts":1795327200.5,"logger":"http.log.access.log0","msg":"handled request","request":{"remote_ip":"127.0.0.1","method":"GET","headers":{"X-Tally-Attr-Team":["eng"],"User-Agent":["curl"]}},"status":200,"resp_headers":{"X-Tally-Cost":["0.5"],"X-Tally-Tokens":["10"]},"id":"c-1","attr.virtual_key":"vk-2","attr.model":""}"#;
        let r = parse_line(line).unwrap();
        assert_eq!(r.id, "c-1");
        assert_eq!(
            r.attributes,
            [
                ("team".to_string(), "eng".to_string()),
                ("virtual_key".to_string(), "vk-2".to_string())
            ]
        );
        let by_header = line.replace(r#""id":"c-1","#, "").replace(
            r#""resp_headers":{"#,
            r#""resp_headers":{"X-Request-Id":["h-1"],"#,
        );
        assert_eq!(parse_line(&by_header).unwrap().id, "h-1");
        assert_eq!(
            r.amounts,
            Amounts {
                cost: Micros(500_000),
                tokens: 10,
                requests: 1
            }
        );
        assert_eq!(r.at_ms, Some(1_795_327_200_500));
        let e = parse_line(r#"{"logger":"http.handlers.reverse_proxy","msg":"x"}"#).unwrap_err();
        assert!(e.contains("not an access log"), "{e}");
    }

    #[test]
    fn malformed_lines_say_why() {
        for (line, says) in [
            ("GET / HTTP/1.1 200", "not a JSON"),
            ("{\"id\":", "invalid JSON"),
            (r#"{"attributes":{}}"#, "no id"),
            (r#"{"id":"a b"}"#, "record id"),
            (r#"{"id":"a","cost":"x"}"#, "cost"),
            (r#"{"id":"a","cost":"-5"}"#, "cost"),
            (r#"{"id":"a","tokens":"1.5"}"#, "tokens"),
            (r#"{"id":"a","attributes":{"Bad":"v"}}"#, "attribute name"),
            (r#"{"id":"a","at":"yesterday"}"#, "at"),
            (
                r#"{"request":{"headers":{}},"resp_headers":{}}"#,
                "no id field",
            ),
        ] {
            let e = parse_line(line).unwrap_err();
            assert!(e.contains(says), "{line}: {e}");
        }
    }

    #[test]
    fn octet_counting_is_stripped() {
        assert_eq!(strip_octet_count("12 <14>x {}"), "<14>x {}");
        assert_eq!(strip_octet_count("{\"id\":\"1 <\"}"), "{\"id\":\"1 <\"}");
    }
}
