//! `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit` on a [`Node`].
//!
//! Per descriptor, in order: find its rule ([`crate::rules`]: the most specific path
//! that has one; none → OK with no limit, as envoyproxy/ratelimit answers), pick the
//! counter (the rule, or for a wildcard rule the instance for this value, created on
//! first use), and read every limit that applies to the counter's scope (the rule and any
//! `{rls_domain: D}` or global limit). Hits are the descriptor's `hits_addend` when set
//! (0 = check only), else `max(1, request.hits_addend)` (ratelimit's `GetHitsAddends`).
//! A `requests` limit is over when `used + hits > max` (ratelimit's rule, so `hits = 0`
//! at exactly the max is still OK); a `cost` or `tokens` limit, which RLS hits do not
//! charge, is over once spent (`used >= max`).
//!
//! If no descriptor is over, the hits are recorded, one usage record per descriptor, in
//! one durable group commit, before the reply; if one is over, nothing is recorded (the
//! answer of ratelimit's `STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT`). Like `/v1/check`
//! followed by `/v1/usage`, the check and the record are two steps: calls in flight at
//! the same moment can all pass the last unit (soft mode, DESIGN.md I6).
//!
//! Retries: a gRPC call has no idempotency key. When the call carries `x-request-id`
//! (Envoy's request id, when the filter forwards it), the record id is a hash of it and
//! of the call's content, so a retry of the same call is applied once (I2). Without it,
//! every call is a new record.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, RateLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::Duration as PbDuration;
use sha2::{Digest, Sha256};
use tally_core::{Amounts, LimitInput, LimitSpec, Metric, Micros, Period, Scope};
use tally_node::{LimitReport, Node, NodeError, UsageRecord};
use tonic::{Request, Response, Status};

use crate::rules::{self, RlsUnit, RuleMeta};

/// Most descriptors in one call.
pub const DESCRIPTORS_MAX: usize = 64;
/// Longest descriptor key or value accepted (bytes).
pub const ENTRY_BYTES_MAX: usize = 1024;
/// Least time between two counts of the instances when the bound is hit (a count reads
/// every limit).
const RECOUNT_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct RlsMetrics {
    pub calls_total: AtomicU64,
    pub over_limit_total: AtomicU64,
    pub errors_total: AtomicU64,
    pub descriptors_unknown_total: AtomicU64,
    pub shadow_over_limit_total: AtomicU64,
    pub instances_created_total: AtomicU64,
    pub instances_overflow_total: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The rate limit service of one node.
pub struct RateLimiter {
    node: Node,
    metrics: Arc<RlsMetrics>,
    /// Wildcard instances known to exist: counted at start, then as this node creates
    /// them, and counted again (at most every [`RECOUNT_EVERY`]) when the bound is hit,
    /// which takes in the instances other nodes created and those deleted since. New
    /// values beyond `instances_max` count in their rule, shared.
    instances: AtomicUsize,
    instances_max: usize,
    recounted_at: parking_lot::Mutex<std::time::Instant>,
    seq: AtomicU64,
    started_ns: u128,
}

/// What a descriptor resolved to.
struct Target {
    meta: RuleMeta,
    /// The limit its hits go to (the rule, or the wildcard instance).
    limit_id: String,
    /// That limit's scope, as record attributes.
    attrs: Vec<(String, String)>,
    /// That limit's period (an instance has its rule's).
    period: Period,
}

/// One descriptor, evaluated.
struct Eval {
    target: Option<Target>,
    hits: u64,
    /// Applicable limits, the target's first.
    reports: Vec<LimitReport>,
    over: bool,
    /// Its hits were recorded by this call (not a repeat of an applied record id).
    charged: bool,
}

impl RateLimiter {
    pub fn new(node: Node, instances_max: usize, metrics: Arc<RlsMetrics>) -> RateLimiter {
        let instances = count_instances(&node);
        RateLimiter {
            node,
            metrics,
            instances: AtomicUsize::new(instances),
            instances_max,
            recounted_at: parking_lot::Mutex::new(std::time::Instant::now()),
            seq: AtomicU64::new(0),
            started_ns: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        }
    }

    pub fn metrics(&self) -> &Arc<RlsMetrics> {
        &self.metrics
    }

    /// The rule a descriptor matches in `domain`, most specific path first.
    fn rule(&self, domain: &str, entries: &[(&str, &str)]) -> Option<(String, LimitSpec, bool)> {
        for cand in rules::candidates(entries) {
            let path = rules::encode_path(cand.iter().copied());
            let id = rules::rule_id(domain, &path);
            if let Some(spec) = self.node.limit_spec(&id) {
                let wildcard = cand.iter().any(|(_, v)| v.is_none());
                return Some((id, spec, wildcard));
            }
        }
        None
    }

    /// The counter of a descriptor, creating its wildcard instance if needed.
    async fn target(
        &self,
        domain: &str,
        entries: &[(&str, &str)],
    ) -> Result<Option<Target>, NodeError> {
        let Some((rule_id, spec, wildcard)) = self.rule(domain, entries) else {
            return Ok(None);
        };
        let Some(meta) = RuleMeta::from_scope(&spec.input.scope) else {
            return Ok(None);
        };
        if !wildcard || meta.flags.unlimited {
            let period = spec.input.period;
            let attrs = spec.input.scope.into_iter().collect();
            return Ok(Some(Target {
                meta,
                limit_id: rule_id,
                attrs,
                period,
            }));
        }
        let concrete = rules::encode_path(entries.iter().map(|&(k, v)| (k, Some(v))));
        let id = rules::instance_id(&rule_id, &concrete);
        let input = LimitInput {
            scope: rules::instance_scope(domain, &rule_id, &concrete),
            ..spec.input.clone()
        };
        let current = self.node.limit_spec(&id);
        if current.as_ref().is_none_or(|c| c.input != input) {
            if current.is_none() && !self.room_for_an_instance() {
                // Past the bound, new values share the rule's own counter: stricter than
                // a counter per value, never looser.
                bump(&self.metrics.instances_overflow_total);
                let period = spec.input.period;
                let attrs = spec.input.scope.into_iter().collect();
                return Ok(Some(Target {
                    meta,
                    limit_id: rule_id,
                    attrs,
                    period,
                }));
            }
            self.node
                .put_limit_derived(&id, input.clone(), &spec)
                .await?;
            if current.is_none() {
                self.instances.fetch_add(1, Ordering::Relaxed);
                bump(&self.metrics.instances_created_total);
            }
        }
        Ok(Some(Target {
            meta,
            limit_id: id,
            period: input.period,
            attrs: input.scope.into_iter().collect(),
        }))
    }

    /// Whether one more instance fits the bound; at the bound, counts again if the last
    /// count is old enough.
    fn room_for_an_instance(&self) -> bool {
        if self.instances.load(Ordering::Relaxed) < self.instances_max {
            return true;
        }
        {
            let mut at = self.recounted_at.lock();
            if at.elapsed() < RECOUNT_EVERY {
                return false;
            }
            *at = std::time::Instant::now();
        }
        let n = count_instances(&self.node);
        self.instances.store(n, Ordering::Relaxed);
        n < self.instances_max
    }

    /// Answers one call. `request_id` is the caller's `x-request-id`, if any.
    pub async fn should_rate_limit(
        &self,
        req: &RateLimitRequest,
        request_id: Option<&str>,
    ) -> Result<RateLimitResponse, Status> {
        bump(&self.metrics.calls_total);
        let r = self.answer(req, request_id).await;
        match &r {
            Ok(resp) if resp.overall_code == Code::OverLimit as i32 => {
                bump(&self.metrics.over_limit_total)
            }
            Ok(_) => {}
            Err(_) => bump(&self.metrics.errors_total),
        }
        r
    }

    async fn answer(
        &self,
        req: &RateLimitRequest,
        request_id: Option<&str>,
    ) -> Result<RateLimitResponse, Status> {
        validate(req)?;
        let mut evals = Vec::with_capacity(req.descriptors.len());
        for d in &req.descriptors {
            let entries: Vec<(&str, &str)> = d
                .entries
                .iter()
                .map(|e| (e.key.as_str(), e.value.as_str()))
                .collect();
            let target = self
                .target(&req.domain, &entries)
                .await
                .map_err(node_status)?;
            if target.is_none() {
                bump(&self.metrics.descriptors_unknown_total);
            }
            let hits = match &d.hits_addend {
                Some(h) => h.value,
                None => u64::from(req.hits_addend.max(1)),
            };
            evals.push(Eval {
                target,
                hits,
                reports: Vec::new(),
                over: false,
                charged: false,
            });
        }
        // `replaces`: a named rule is skipped when a rule applying in this call replaces it.
        let replaced: Vec<String> = evals
            .iter()
            .filter_map(|e| e.target.as_ref())
            .flat_map(|t| t.meta.replaces.iter().cloned())
            .collect();
        for e in &mut evals {
            let skip = e.target.as_ref().is_some_and(|t| {
                t.meta
                    .name
                    .as_deref()
                    .is_some_and(|n| replaced.iter().any(|r| r == n))
            });
            if skip {
                e.target = None;
            }
        }
        for e in &mut evals {
            let Some(t) = &e.target else { continue };
            if t.meta.flags.unlimited {
                continue;
            }
            let attrs: Vec<(&str, &str)> = t
                .attrs
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let mut reports = self.node.statuses(&attrs);
            let Some(pos) = reports.iter().position(|r| r.id == t.limit_id) else {
                // Deleted between lookup and read: as if it had never matched.
                e.target = None;
                continue;
            };
            reports.swap(0, pos);
            for (i, r) in reports.iter().enumerate() {
                if !is_over(r, e.hits) {
                    continue;
                }
                if i == 0 && t.meta.flags.shadow {
                    bump(&self.metrics.shadow_over_limit_total);
                } else {
                    e.over = true;
                }
            }
            e.reports = reports;
        }
        let over = evals.iter().any(|e| e.over);
        if !over {
            let base = record_base(req, request_id, self);
            let (idx, records): (Vec<usize>, Vec<UsageRecord>) = evals
                .iter()
                .enumerate()
                .filter(|(_, e)| e.hits > 0 && !e.reports.is_empty())
                .filter_map(|(i, e)| {
                    let t = e.target.as_ref()?;
                    let rec = UsageRecord {
                        id: format!("{base}-{i}"),
                        attributes: t.attrs.clone(),
                        amounts: Amounts {
                            requests: e.hits,
                            ..Amounts::default()
                        },
                        at_ms: None,
                        reservation: None,
                    };
                    Some((i, rec))
                })
                .unzip();
            if !records.is_empty() {
                let applied = self.node.record(records).await.map_err(node_status)?;
                for (i, a) in idx.into_iter().zip(applied) {
                    evals[i].charged = a;
                }
            }
        }
        let now = self.node.now_ms();
        let mut resp = RateLimitResponse {
            overall_code: if over { Code::OverLimit } else { Code::Ok } as i32,
            ..RateLimitResponse::default()
        };
        for e in &evals {
            resp.statuses.push(self.status(e, now));
        }
        resp.response_headers_to_add = headers(&resp.statuses);
        Ok(resp)
    }

    fn status(&self, e: &Eval, now_ms: i64) -> DescriptorStatus {
        let Some(t) = &e.target else {
            return DescriptorStatus {
                code: Code::Ok as i32,
                ..DescriptorStatus::default()
            };
        };
        if t.meta.flags.unlimited {
            return DescriptorStatus {
                code: Code::Ok as i32,
                limit_remaining: u32::MAX,
                ..DescriptorStatus::default()
            };
        }
        // The limit to show: the target, unless another applicable limit denies alone.
        let shown = if e.over && !is_over(&e.reports[0], e.hits) {
            e.reports
                .iter()
                .skip(1)
                .find(|r| is_over(r, e.hits))
                .unwrap_or(&e.reports[0])
        } else {
            &e.reports[0]
        };
        let is_target = std::ptr::eq(shown, &e.reports[0]);
        // A repeated record id was counted by the first call: `used` already has it.
        let charged = e.charged && shown.metric == Metric::Requests;
        let remaining = if is_over(shown, e.hits) {
            0
        } else if charged {
            shown.max.saturating_sub(shown.used.saturating_add(e.hits))
        } else {
            shown.max.saturating_sub(shown.used)
        };
        let period = if is_target {
            t.period
        } else {
            self.node
                .limit_spec(&shown.id)
                .map_or(Period::Never, |s| s.input.period)
        };
        let (unit, exact) = RlsUnit::of_period(period);
        // The rule's name as configured (ratelimit's `name`, empty when unset), another
        // limit's id; and when the period is not exactly the reported unit, the real one.
        let base = if is_target {
            t.meta.name.clone().unwrap_or_default()
        } else {
            shown.id.clone()
        };
        let name = if exact {
            base
        } else {
            let who = if base.is_empty() { &t.limit_id } else { &base };
            format!("{who} ({} per {period})", shown.max)
        };
        DescriptorStatus {
            code: if e.over { Code::OverLimit } else { Code::Ok } as i32,
            current_limit: Some(RateLimit {
                name,
                requests_per_unit: rls_amount(shown.metric, shown.max),
                unit: unit as i32,
            }),
            limit_remaining: rls_amount(shown.metric, remaining),
            duration_until_reset: shown.resets_at_ms.map(|at| {
                let ms = (at - now_ms).max(0);
                PbDuration {
                    seconds: ms / 1000,
                    nanos: ((ms % 1000) * 1_000_000) as i32,
                }
            }),
            ..DescriptorStatus::default()
        }
    }
}

/// Live wildcard instances the node knows, created here or by any other node.
fn count_instances(node: &Node) -> usize {
    node.limits(&Scope::new())
        .iter()
        .filter(|l| l.input.scope.contains_key(rules::TEMPLATE))
        .count()
}

/// A limit's amount as RLS's `u32`: counts as they are, cost in US cents (RLS has no
/// money type), both saturating.
fn rls_amount(metric: Metric, v: u64) -> u32 {
    let v = match metric {
        Metric::Cost => Micros(v).0 / 10_000,
        _ => v,
    };
    u32::try_from(v).unwrap_or(u32::MAX)
}

fn is_over(r: &LimitReport, hits: u64) -> bool {
    match r.metric {
        Metric::Requests => r.used.saturating_add(hits) > r.max,
        _ => r.used >= r.max,
    }
}

/// `x-ratelimit-limit/remaining/reset` of the descriptor closest to its limit (an over
/// one first), as ratelimit's `RATE_LIMIT_RESPONSE_HEADERS_ENABLED` sends them.
fn headers(statuses: &[DescriptorStatus]) -> Vec<HeaderValue> {
    let closest = statuses
        .iter()
        .filter(|s| s.current_limit.is_some())
        .min_by_key(|s| (s.code != Code::OverLimit as i32, s.limit_remaining));
    let Some(s) = closest else {
        return Vec::new();
    };
    let limit = s.current_limit.as_ref().map_or(0, |l| l.requests_per_unit);
    let reset = s
        .duration_until_reset
        .as_ref()
        .map(|d| d.seconds + i64::from(d.nanos > 0));
    let h = |k: &str, v: String| HeaderValue {
        key: k.into(),
        value: v,
        ..HeaderValue::default()
    };
    let mut out = vec![
        h("x-ratelimit-limit", limit.to_string()),
        h("x-ratelimit-remaining", s.limit_remaining.to_string()),
    ];
    if let Some(r) = reset {
        out.push(h("x-ratelimit-reset", r.to_string()));
    }
    out
}

/// The id shared by a call's records: a hash of the caller's request id and the call's
/// content (a retry of the same call gets the same id), or of a per-process sequence.
fn record_base(req: &RateLimitRequest, request_id: Option<&str>, rl: &RateLimiter) -> String {
    let mut h = Sha256::new();
    match request_id {
        Some(id) => {
            h.update(b"x-request-id\0");
            h.update(id.as_bytes());
        }
        None => {
            h.update(b"seq\0");
            h.update(rl.node.node_id().as_bytes());
            h.update(rl.started_ns.to_le_bytes());
            h.update(rl.seq.fetch_add(1, Ordering::Relaxed).to_le_bytes());
        }
    }
    h.update([0]);
    h.update(req.domain.as_bytes());
    h.update(req.hits_addend.to_le_bytes());
    for d in &req.descriptors {
        h.update(b"\0d");
        for e in &d.entries {
            h.update((e.key.len() as u64).to_le_bytes());
            h.update(e.key.as_bytes());
            h.update((e.value.len() as u64).to_le_bytes());
            h.update(e.value.as_bytes());
        }
        match &d.hits_addend {
            Some(v) => h.update(v.value.to_le_bytes()),
            None => h.update(b"-"),
        }
    }
    let digest = h.finalize();
    let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
    format!("rls-{hex}")
}

fn validate(req: &RateLimitRequest) -> Result<(), Status> {
    if req.domain.is_empty() {
        return Err(Status::invalid_argument(
            "rate limit domain must not be empty",
        ));
    }
    if req.descriptors.is_empty() {
        return Err(Status::invalid_argument(
            "rate limit descriptor list must not be empty",
        ));
    }
    if req.descriptors.len() > DESCRIPTORS_MAX {
        return Err(Status::invalid_argument(format!(
            "{} descriptors in one call; at most {DESCRIPTORS_MAX} are accepted",
            req.descriptors.len()
        )));
    }
    for (i, d) in req.descriptors.iter().enumerate() {
        if d.entries.is_empty() || d.entries.len() > rules::ENTRIES_MAX {
            return Err(Status::invalid_argument(format!(
                "descriptor {i} has {} entries; 1 to {} are accepted",
                d.entries.len(),
                rules::ENTRIES_MAX
            )));
        }
        if d.entries
            .iter()
            .any(|e| e.key.len() > ENTRY_BYTES_MAX || e.value.len() > ENTRY_BYTES_MAX)
        {
            return Err(Status::invalid_argument(format!(
                "descriptor {i} has a key or value longer than {ENTRY_BYTES_MAX} bytes"
            )));
        }
        if d.is_negative_hits {
            return Err(Status::invalid_argument(format!(
                "descriptor {i}: negative hits (refunds) are not supported, tally's counters only grow"
            )));
        }
        if d.limit.is_some() {
            tracing::debug!(
                descriptor = i,
                "descriptor limit override ignored; the tally rule applies"
            );
        }
    }
    Ok(())
}

fn node_status(e: NodeError) -> Status {
    match e {
        NodeError::InvalidArgument { message, .. } => Status::invalid_argument(message),
        NodeError::NotFound(m) => Status::not_found(m),
        NodeError::Conflict(m) => Status::aborted(m),
        NodeError::Overloaded(m) => Status::resource_exhausted(m),
        e => Status::unavailable(e.to_string()),
    }
}

/// The tonic service: checks the caller's token, reads `x-request-id` from the call's
/// metadata. With `tokens` empty (a node without tokens, loopback only) every call is
/// accepted; otherwise the call must carry `authorization: Bearer <token>` with one of
/// them (Envoy: `initial_metadata` of the rate limit service's `grpc_service`).
pub struct Service {
    pub limiter: Arc<RateLimiter>,
    pub tokens: Vec<String>,
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Service {
    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        if self.tokens.is_empty() {
            return Ok(());
        }
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Status::unauthenticated("missing `authorization: Bearer <token>` metadata")
            })?;
        if self
            .tokens
            .iter()
            .any(|t| constant_time_eq(t.as_bytes(), token.as_bytes()))
        {
            Ok(())
        } else {
            Err(Status::unauthenticated("unknown token"))
        }
    }
}

#[tonic::async_trait]
impl RateLimitService for Service {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        self.authorize(&request)?;
        let request_id = request
            .metadata()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let resp = self
            .limiter
            .should_rate_limit(request.get_ref(), request_id.as_deref())
            .await?;
        Ok(Response::new(resp))
    }
}

#[cfg(test)]
mod tests;
