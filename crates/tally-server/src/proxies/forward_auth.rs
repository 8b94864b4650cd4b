//! `GET|POST /v1/forward-auth`: a check for proxies that ask an HTTP endpoint before they
//! pass a request on (nginx `auth_request`, Caddy `forward_auth`, Traefik `ForwardAuth`,
//! HAProxy through Lua, Envoy's HTTP `ext_authz`, which sends `path_prefix` + the original
//! path, so `/v1/forward-auth/<anything>` is the same endpoint). Everything travels in
//! headers, since these proxies send no body with the sub-request:
//!
//! - `X-Tally-Attr-<dimension>: <value>`: one request attribute per header;
//!   `X-Tally-Attr-Virtual-Key` is the dimension `virtual_key` (lower case, `-` → `_`).
//! - `X-Tally-Cost: <USD>`, `X-Tally-Tokens: <n>`: estimates, as in `/v1/check`.
//! - `X-Tally-Record-Id: <id>`: when allowed, also record the estimate as usage under
//!   this id (durably, once; for proxies that cannot report usage after the response).
//! - `X-Tally-Deny-Status: <400..499>` or `?deny_status=`: the status of a denial
//!   (default 429). nginx's `auth_request` passes only 401 and 403 through (anything
//!   else becomes a 500), so nginx asks for 403 and maps it back to 429 itself; Caddy,
//!   Traefik and Envoy pass any status to the client.
//!
//! Allowed: 200. Denied: the chosen status. Either way the headers say `X-Tally-Allowed`,
//! and for the limit closest to its max `X-Tally-Limit-Id`, `X-Tally-Remaining` (in the
//! limit's unit, USD for cost) and `X-Tally-Reset` (seconds); a denial adds
//! `X-Tally-Denied-By` and `Retry-After`. The body is [`ForwardAuthReply`]. A bad header
//! is a 400 in API.md's error shape and changes nothing.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use tally_core::units::{self, ATTRIBUTES_MAX, Micros};
use tally_core::{Amounts, Metric};
use tally_node::{LimitReport, UsageRecord};

use crate::http::{ApiError, AppState, Role, authorize, check_attribute_pairs, check_id, cost};

pub const ATTR_PREFIX: &str = "x-tally-attr-";
pub const COST: &str = "x-tally-cost";
pub const TOKENS: &str = "x-tally-tokens";
pub const RECORD_ID: &str = "x-tally-record-id";
pub const DENY_STATUS: &str = "x-tally-deny-status";
/// Status of a denial when the caller names none.
pub const DENY_STATUS_DEFAULT: u16 = 429;

pub use tally_api::{ForwardAuthReply, LimitStatus};

/// What the headers of a forward-auth request ask.
#[derive(Debug, Clone, PartialEq)]
pub struct Ask {
    pub attributes: Vec<(String, String)>,
    pub estimate: Amounts,
    pub record_id: Option<String>,
    pub deny_status: StatusCode,
}

fn header_text<'a>(name: &str, v: &'a HeaderValue) -> Result<&'a str, ApiError> {
    v.to_str()
        .map_err(|_| ApiError::invalid(format!("header {name} is not visible ASCII text")))
}

fn one<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    let mut all = headers.get_all(name).iter();
    let Some(v) = all.next() else {
        return Ok(None);
    };
    if all.next().is_some() {
        return Err(ApiError::invalid(format!(
            "header {name} is given more than once"
        )));
    }
    header_text(name, v).map(|s| Some(s.trim()))
}

/// Reads the request's headers and query; all or nothing.
pub fn ask(headers: &HeaderMap, uri: &Uri) -> Result<Ask, ApiError> {
    let mut attributes: Vec<(String, String)> = Vec::new();
    for name in headers.keys() {
        let Some(dim) = name.as_str().strip_prefix(ATTR_PREFIX) else {
            continue;
        };
        let dim = dim.replace('-', "_");
        let Some(value) = one(headers, name.as_str())? else {
            continue;
        };
        if attributes.len() == ATTRIBUTES_MAX {
            return Err(ApiError::invalid(format!(
                "more than {ATTRIBUTES_MAX} X-Tally-Attr-* headers; at most {ATTRIBUTES_MAX} attributes are allowed"
            )));
        }
        attributes.push((dim, value.to_string()));
    }
    check_attribute_pairs(
        attributes.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        attributes.len(),
    )
    .map_err(|e| ApiError::invalid(format!("X-Tally-Attr-*: {}", e.message)))?;
    let usd = match one(headers, COST)? {
        Some(c) => Some(c.parse::<f64>().map_err(|_| {
            ApiError::invalid(format!(
                "X-Tally-Cost {c:?} must be a number of USD such as 0.02"
            ))
        })?),
        None => None,
    };
    let tokens = match one(headers, TOKENS)? {
        Some(t) => {
            let n = t.parse::<u64>().map_err(|_| {
                ApiError::invalid(format!("X-Tally-Tokens {t:?} must be a whole number"))
            })?;
            units::check_count(n, "X-Tally-Tokens").map_err(|e| ApiError::invalid(e.to_string()))?
        }
        None => 0,
    };
    let record_id = one(headers, RECORD_ID)?.map(str::to_string);
    if let Some(id) = &record_id {
        check_id(id, "X-Tally-Record-Id")?;
    }
    // Both are checked when both are given; the query wins.
    let mut deny = one(headers, DENY_STATUS)?.map(deny_status).transpose()?;
    if let Some(q) = uri.query() {
        for (k, v) in crate::http::form_pairs(q)? {
            match k.as_str() {
                "deny_status" => deny = Some(deny_status(&v)?),
                _ => {
                    return Err(ApiError::invalid(format!(
                        "unknown query parameter {k:?}; only deny_status is read"
                    )));
                }
            }
        }
    }
    let deny_status =
        deny.unwrap_or_else(|| StatusCode::from_u16(DENY_STATUS_DEFAULT).expect("a valid status"));
    Ok(Ask {
        attributes,
        estimate: Amounts {
            cost: cost(usd)
                .map_err(|e| ApiError::invalid(format!("X-Tally-Cost: {}", e.message)))?,
            tokens,
            requests: 1,
        },
        record_id,
        deny_status,
    })
}

/// A denial's status: a client error (a denial is never the server failing, and a 5xx
/// would make the proxy's and the client's monitoring page someone).
fn deny_status(d: &str) -> Result<StatusCode, ApiError> {
    d.parse::<u16>()
        .ok()
        .filter(|s| (400..=499).contains(s))
        .and_then(|s| StatusCode::from_u16(s).ok())
        .ok_or_else(|| {
            ApiError::invalid(format!(
                "deny status {d:?} must be an HTTP status from 400 to 499"
            ))
        })
}

fn amount_text(metric: Metric, v: u64) -> String {
    match metric {
        Metric::Cost => Micros(v).to_string(),
        _ => v.to_string(),
    }
}

/// Seconds from `now_ms` until `at_ms`, rounded up.
fn secs_until(at_ms: i64, now_ms: i64) -> i64 {
    ((at_ms - now_ms).max(0) + 999) / 1000
}

pub async fn handle(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response, ApiError> {
    authorize(&s, &headers, Role::Client)?;
    let ask = ask(&headers, &uri)?;
    let attrs: Vec<(&str, &str)> = ask
        .attributes
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let r = s.node.check(&attrs, ask.estimate);
    let mut recorded = None;
    let mut limits = r.limits;
    if r.allowed {
        if let Some(id) = &ask.record_id {
            let rec = UsageRecord {
                id: id.clone(),
                attributes: ask.attributes.clone(),
                amounts: ask.estimate,
                at_ms: None,
                reservation: None,
            };
            recorded = Some(s.node.record(vec![rec]).await?[0]);
            limits = s.node.statuses(&attrs);
        }
    }
    let now = s.node.now_ms();
    let reply = ForwardAuthReply {
        allowed: r.allowed,
        stale: r.stale,
        denied_by: limits
            .iter()
            .filter(|l| l.denied)
            .map(|l| l.id.clone())
            .collect(),
        limits: limits.iter().map(crate::http::limit_status).collect(),
        access: r.access.as_ref().map(crate::http::access_view),
        recorded,
    };
    let mut out = HeaderMap::new();
    let mut set = |k: &'static str, v: String| {
        if let Ok(v) = HeaderValue::from_str(&v) {
            out.insert(HeaderName::from_static(k), v);
        }
    };
    set("x-tally-allowed", r.allowed.to_string());
    if r.stale {
        set("x-tally-stale", "true".into());
    }
    if let Some(c) = closest(&limits) {
        set("x-tally-limit-id", c.id.clone());
        set("x-tally-remaining", amount_text(c.metric, c.remaining));
        if let Some(at) = c.resets_at_ms {
            set("x-tally-reset", secs_until(at, now).to_string());
        }
    }
    if let Some(a) = &reply.access {
        set(
            "x-tally-access-denied",
            format!("{}/{} {}", a.dimension, a.value, a.rule),
        );
    }
    if !r.allowed {
        set("x-tally-denied-by", reply.denied_by.join(","));
        // Worth retrying once every denying limit has reset; never, if one never resets.
        let denying = limits.iter().filter(|l| l.denied);
        let retry = denying
            .map(|l| l.resets_at_ms)
            .try_fold(now, |acc, at| at.map(|a| acc.max(a)));
        if let Some(at) = retry {
            set("retry-after", secs_until(at, now).to_string());
        }
    }
    // An access rule is not a budget: 403 whatever the denial status asked for (nginx
    // passes 403 through auth_request as it is).
    let status = if r.allowed {
        StatusCode::OK
    } else if reply.access.is_some() {
        StatusCode::FORBIDDEN
    } else {
        ask.deny_status
    };
    out.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let body = serde_json::to_vec(&reply).map_err(|e| ApiError::invalid(e.to_string()))?;
    Ok((status, out, body).into_response())
}

/// The limit to show in headers: a denying one, else the one with the smallest share of
/// its max left.
fn closest(limits: &[LimitReport]) -> Option<&LimitReport> {
    limits.iter().min_by(|a, b| {
        let share = |l: &LimitReport| {
            if l.max == 0 {
                0.0
            } else {
                l.remaining as f64 / l.max as f64
            }
        };
        (!a.denied, share(a))
            .partial_cmp(&(!b.denied, share(b)))
            .unwrap_or(std::cmp::Ordering::Equal)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn uri(s: &str) -> Uri {
        s.parse().unwrap()
    }

    #[test]
    fn headers_become_a_check() {
        let a = ask(
            &headers(&[
                ("X-Tally-Attr-Virtual-Key", "vk-1"),
                ("x-tally-attr-model", " gpt-4o "),
                ("X-Tally-Cost", "0.02"),
                ("X-Tally-Tokens", "1500"),
                ("X-Tally-Record-Id", "req-1"),
                ("X-Tally-Deny-Status", "402"),
                ("Authorization", "Bearer t"),
            ]),
            &uri("/v1/forward-auth"),
        )
        .unwrap();
        let mut attrs = a.attributes.clone();
        attrs.sort();
        assert_eq!(
            attrs,
            [
                ("model".to_string(), "gpt-4o".to_string()),
                ("virtual_key".to_string(), "vk-1".to_string())
            ]
        );
        assert_eq!(a.estimate.cost, Micros(20_000));
        assert_eq!((a.estimate.tokens, a.estimate.requests), (1500, 1));
        assert_eq!(a.record_id.as_deref(), Some("req-1"));
        assert_eq!(a.deny_status, StatusCode::PAYMENT_REQUIRED);
        let a = ask(&headers(&[]), &uri("/v1/forward-auth?deny_status=403")).unwrap();
        assert_eq!(a.deny_status, StatusCode::FORBIDDEN);
        assert!(a.attributes.is_empty());
        let a = ask(&headers(&[]), &uri("/v1/forward-auth")).unwrap();
        assert_eq!(a.deny_status, StatusCode::TOO_MANY_REQUESTS);
    }

    #[test]
    fn bad_headers_are_refused() {
        let nine: Vec<(String, String)> = (0..9)
            .map(|i| (format!("x-tally-attr-d{i}"), "v".to_string()))
            .collect();
        let nine: Vec<(&str, &str)> = nine.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        for (h, q, says) in [
            (vec![("X-Tally-Cost", "-1")], "", "X-Tally-Cost"),
            (vec![("X-Tally-Cost", "abc")], "", "X-Tally-Cost"),
            (vec![("X-Tally-Tokens", "1.5")], "", "X-Tally-Tokens"),
            (vec![("X-Tally-Attr-Bad.Name", "v")], "", "attribute name"),
            (
                vec![("X-Tally-Attr-A", "1"), ("X-Tally-Attr-A", "2")],
                "",
                "more than once",
            ),
            (vec![("X-Tally-Record-Id", "a b")], "", "X-Tally-Record-Id"),
            (vec![("X-Tally-Deny-Status", "200")], "", "400 to 499"),
            (vec![], "?deny_status=99", "400 to 499"),
            (vec![], "?deny_status=503", "400 to 499"),
            (
                vec![("X-Tally-Deny-Status", "{}")],
                "?deny_status=403",
                "400 to 499",
            ),
            (vec![], "?other=1", "unknown query parameter"),
            (nine, "", "at most 8"),
        ] {
            let e = ask(&headers(&h), &uri(&format!("/v1/forward-auth{q}"))).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert!(e.message.contains(says), "{h:?}{q}: {}", e.message);
        }
    }
}
