//! The dashboard at `/ui` and the two small endpoints only it needs.
//!
//! The page is four static files compiled into the binary (`crates/tally-server/ui/`):
//! vanilla JS and CSS, no build step, nothing fetched from elsewhere at run time. It calls
//! the JSON API with the token the user typed (kept in the browser's sessionStorage), so
//! it has exactly the rights of that token. Every URL it uses is relative (`./app.js`,
//! `../v1/limits`), so it works behind a reverse proxy that mounts the node under a path
//! prefix; `/ui` redirects to `ui/` (relative too) so those URLs resolve from `/ui/`.
//!
//! Every UI response carries a strict Content-Security-Policy: scripts and styles from
//! the node only, no inline script or style, no framing, and Trusted Types required, so
//! the page cannot put a string into `innerHTML` even by mistake (it builds its DOM with
//! `textContent`; the browser tests feed it hostile values).
//!
//! Endpoints (client role):
//! - `GET /v1/whoami`: the role of the caller's token, so the page can hide admin actions
//!   from a client token (the API refuses them anyway).
//! - `GET /v1/denials?limit=N`: the most recent denied checks of this node, from the
//!   in-memory ring of `tally_node::denials`.
//!
//! Must not touch: the check and usage handlers (the ring is filled by the node itself,
//! only on denial).

use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tally_core::Micros;
use tally_node::{DENIALS_MAX, Denial, Metrics};

use crate::http::{ApiError, AppState, Role, authorize, form_pairs};

/// Denials a `GET /v1/denials` returns when `limit` is not given.
pub const DENIALS_DEFAULT: usize = 100;

/// The policy of every UI response. `default-src 'self'` and no `'unsafe-inline'`: no
/// inline script, style or event handler runs, whatever a value shown on the page holds.
/// Trusted Types turn any string assigned to `innerHTML` and friends into an error.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; font-src 'self'; \
     object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; \
     require-trusted-types-for 'script'; trusted-types 'none'";

struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

const ASSETS: [Asset; 4] = [
    Asset {
        path: "index.html",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("../ui/index.html"),
    },
    Asset {
        path: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../ui/app.js"),
    },
    Asset {
        path: "app.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../ui/app.css"),
    },
    Asset {
        path: "favicon.svg",
        content_type: "image/svg+xml",
        body: include_bytes!("../ui/favicon.svg"),
    },
];

/// The routes of this module, merged into `http::router`.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/ui", get(ui_root))
        .route(
            "/ui/",
            get(|h: HeaderMap| async move { asset("index.html", &h) }),
        )
        .route(
            "/ui/{file}",
            get(
                |h: HeaderMap, axum::extract::Path(file): axum::extract::Path<String>| async move {
                    asset(&file, &h)
                },
            ),
        )
        .route("/v1/whoami", get(whoami))
        .route("/v1/denials", get(denials))
}

/// Headers every UI response carries.
fn ui_headers(h: &mut HeaderMap) {
    let set = |h: &mut HeaderMap, k: header::HeaderName, v: &'static str| {
        h.insert(k, HeaderValue::from_static(v));
    };
    set(h, header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY);
    set(h, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(h, header::X_FRAME_OPTIONS, "DENY");
    set(h, header::REFERRER_POLICY, "no-referrer");
    set(
        h,
        header::HeaderName::from_static("cross-origin-opener-policy"),
        "same-origin",
    );
    // Revalidate every time (the ETag makes that a 304): a new binary's page is never
    // mixed with an old cached script.
    set(h, header::CACHE_CONTROL, "no-cache");
}

/// `/ui` → `ui/`: relative, so a proxy prefix (`/tally/ui` → `/tally/ui/`) is kept.
async fn ui_root(uri: Uri) -> Response {
    let location = match uri.query() {
        Some(q) => format!("ui/?{q}"),
        None => "ui/".to_string(),
    };
    let mut r = StatusCode::PERMANENT_REDIRECT.into_response();
    ui_headers(r.headers_mut());
    if let Ok(v) = HeaderValue::from_str(&location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// A strong ETag per asset: a hash of its bytes, computed once.
fn etag(i: usize) -> &'static str {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    &TAGS.get_or_init(|| {
        ASSETS
            .iter()
            .map(|a| {
                // FNV-1a: stable across builds and Rust versions, unlike std's hasher.
                let h = a.body.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                    (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
                });
                format!("\"{h:016x}-{}\"", a.body.len())
            })
            .collect()
    })[i]
}

fn asset(file: &str, req: &HeaderMap) -> Response {
    let Some(i) = ASSETS.iter().position(|a| a.path == file) else {
        let mut r = ApiError {
            status: StatusCode::NOT_FOUND,
            code: "not_found",
            message: format!("no dashboard file {file:?}"),
        }
        .into_response();
        ui_headers(r.headers_mut());
        return r;
    };
    let tag = etag(i);
    let fresh = req
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag));
    let mut r = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let mut r = ASSETS[i].body.into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(ASSETS[i].content_type),
        );
        r
    };
    ui_headers(r.headers_mut());
    if let Ok(v) = HeaderValue::from_str(tag) {
        r.headers_mut().insert(header::ETAG, v);
    }
    r
}

// ----- GET /v1/whoami ------------------------------------------------------------------

use tally_api::{Denial as DenialView, DenialsReply, WhoAmI};

async fn whoami(State(s): State<Arc<AppState>>, headers: HeaderMap) -> Result<Response, ApiError> {
    let role = authorize(&s, &headers, Role::Client)?;
    let body = WhoAmI {
        role: match role {
            Role::Admin => "admin",
            Role::Client => "client",
        }
        .to_string(),
        tokens_required: s.auth.admin_token.is_some() || s.auth.client_token.is_some(),
        node_id: s.node.node_id().to_string(),
    };
    Ok(axum::Json(body).into_response())
}

// ----- GET /v1/denials -----------------------------------------------------------------

fn denial_view(d: Denial) -> DenialView {
    DenialView {
        seq: d.seq,
        at: jiff::Timestamp::from_millisecond(d.at_ms)
            .map(|t| t.to_string())
            .unwrap_or_default(),
        attributes: d.attributes.into_iter().collect(),
        denied_by: d.denied_by,
        denied_by_more: d.denied_by_more as u64,
        cost: Micros(d.estimate.cost.0).to_usd(),
        tokens: d.estimate.tokens,
    }
}

async fn denials(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response, ApiError> {
    authorize(&s, &headers, Role::Client)?;
    let mut max = DENIALS_DEFAULT;
    for (k, v) in form_pairs(uri.query().unwrap_or(""))? {
        if k != "limit" {
            return Err(ApiError::invalid(format!(
                "unknown query parameter {k:?}; the only one is limit=<1..={DENIALS_MAX}>"
            )));
        }
        max = v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=DENIALS_MAX).contains(n))
            .ok_or_else(|| {
                ApiError::invalid(format!(
                    "limit {v:?} must be a whole number from 1 to {DENIALS_MAX}"
                ))
            })?;
    }
    let node = &s.node;
    let body = DenialsReply {
        node_id: node.node_id().to_string(),
        capacity: DENIALS_MAX as u64,
        denied_total: Metrics::get(&node.metrics().checks_denied_total),
        skipped: node.denials_skipped(),
        denials: node
            .recent_denials(max)
            .into_iter()
            .map(denial_view)
            .collect(),
    };
    Ok(axum::Json(body).into_response())
}
