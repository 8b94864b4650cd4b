//! Plugging tally into the proxies gateways already run (issue 14): forward-auth for
//! nginx, Caddy, HAProxy, Traefik and Envoy's HTTP ext_authz ([`forward_auth`]), usage
//! from their access logs ([`access_log`]), and the import of envoyproxy/ratelimit
//! configs ([`import`]). Envoy's gRPC rate limit service itself is the `tally-rls` crate,
//! started by `serve` with `--rls-listen`.
//!
//! Every JSON body here is a serde type defined in its module.

pub mod access_log;
pub mod forward_auth;
pub mod import;

use std::sync::Arc;

use axum::Router;
use axum::routing::{MethodFilter, on, post};

use crate::http::AppState;

/// Counters of the integrations, for `/metrics`.
#[derive(Debug, Default)]
pub struct Proxies {
    /// Counters of the gRPC rate limit service, when it runs.
    pub rls: std::sync::OnceLock<Arc<tally_rls::RlsMetrics>>,
    pub logs: access_log::LogMetrics,
}

/// Envoy's HTTP ext_authz sends the original request's method: forward-auth answers the
/// eight methods OpenAPI can describe (others are a 405, as on every path).
const FORWARD_AUTH_METHODS: MethodFilter = MethodFilter::GET
    .or(MethodFilter::POST)
    .or(MethodFilter::PUT)
    .or(MethodFilter::DELETE)
    .or(MethodFilter::PATCH)
    .or(MethodFilter::HEAD)
    .or(MethodFilter::OPTIONS)
    .or(MethodFilter::TRACE);

/// The routes of this module, merged into `http::router`.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route(
            "/v1/forward-auth",
            on(FORWARD_AUTH_METHODS, forward_auth::handle),
        )
        // Envoy's HTTP ext_authz appends the original path to its path_prefix.
        .route(
            "/v1/forward-auth/{*original_path}",
            on(FORWARD_AUTH_METHODS, forward_auth::handle),
        )
        .route("/v1/usage/logs", post(access_log::handle))
        .route("/v1/import/envoy-ratelimit", post(import::handle))
}

/// Appends the integrations' counters to the Prometheus text of `/metrics`.
pub fn render_metrics(p: &Proxies, out: &mut String) {
    use std::fmt::Write as _;
    use std::sync::atomic::{AtomicU64, Ordering};
    let mut counter = |name: &str, help: &str, v: &AtomicU64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
            v.load(Ordering::Relaxed)
        );
    };
    let l = &p.logs;
    counter(
        "tally_log_lines_total",
        "Access-log lines read (UDP, TCP, POST /v1/usage/logs).",
        &l.lines_total,
    );
    counter(
        "tally_log_lines_malformed_total",
        "Access-log lines skipped: not a usage line, or refused by the node.",
        &l.malformed_total,
    );
    counter(
        "tally_log_lines_dropped_total",
        "Access-log lines dropped because the queue was full (UDP only).",
        &l.dropped_total,
    );
    counter(
        "tally_log_records_applied_total",
        "Usage records applied from access logs.",
        &l.applied_total,
    );
    counter(
        "tally_log_records_duplicate_total",
        "Access-log records whose request id was already applied.",
        &l.duplicate_total,
    );
    counter(
        "tally_log_records_failed_total",
        "Access-log records lost because the node stayed unavailable.",
        &l.failed_total,
    );
    if let Some(r) = p.rls.get() {
        counter(
            "tally_rls_calls_total",
            "ShouldRateLimit calls answered.",
            &r.calls_total,
        );
        counter(
            "tally_rls_over_limit_total",
            "ShouldRateLimit calls answered OVER_LIMIT.",
            &r.over_limit_total,
        );
        counter(
            "tally_rls_errors_total",
            "ShouldRateLimit calls answered with a gRPC error.",
            &r.errors_total,
        );
        counter(
            "tally_rls_descriptors_unknown_total",
            "Descriptors that matched no rule (answered OK).",
            &r.descriptors_unknown_total,
        );
        counter(
            "tally_rls_shadow_over_limit_total",
            "Descriptors over a shadow_mode rule (answered OK).",
            &r.shadow_over_limit_total,
        );
        counter(
            "tally_rls_instances_created_total",
            "Wildcard instances (a limit per descriptor value) created by this node.",
            &r.instances_created_total,
        );
        counter(
            "tally_rls_instances_overflow_total",
            "Descriptors counted in their rule because --rls-instances-max was reached.",
            &r.instances_overflow_total,
        );
    }
}
