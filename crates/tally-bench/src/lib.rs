//! Benchmark helpers for tally. The crate's binary `tally-floor` is the floor of
//! `scripts/bench_vs_redis.sh`: the least an HTTP check can cost on this stack (axum on
//! tokio, serde_json, mimalloc) with tally's own parsing and validation of the body
//! (`tally_server::http::parse_check`), against which tally's `POST /v1/check` is compared.
//!
//! The library half is the floor's router, so tests can serve it on port 0.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

/// Largest body read, as tally (1 MiB).
pub const BODY_BYTES_MAX: usize = 1 << 20;

/// What the floor counts.
#[derive(Debug, Default)]
pub struct Floor {
    checks: AtomicU64,
}

impl Floor {
    pub fn checks(&self) -> u64 {
        self.checks.load(Ordering::Relaxed)
    }
}

/// `POST /v1/check`: parse the body, bump one atomic counter, answer a small JSON.
/// `GET /healthz`: 200.
pub fn router(floor: Arc<Floor>) -> Router {
    Router::new()
        .route("/v1/check", post(check))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(floor)
}

async fn check(State(floor): State<Arc<Floor>>, body: Bytes) -> Response {
    // The body is parsed and validated by tally's own function (borrowed attributes,
    // name and value rules, amounts in micro-USD), so the floor does the same parsing
    // work as tally; only the check against limits and the reply differ.
    let parsed = tally_server::http::parse_check(&body, |attrs, estimate, _reserve| {
        (attrs.len(), estimate.cost.0 + estimate.tokens)
    });
    let (attributes, estimate) = match parsed {
        Ok(p) => p,
        Err(error) => return error.into_response(),
    };
    let seen = floor.checks.fetch_add(1, Ordering::Relaxed) + 1;
    // Use what was parsed, as a check would, so none of it is optimised away.
    let reply = format!(
        r#"{{"allowed":{},"checks":{seen},"attributes":{attributes}}}"#,
        estimate < u64::MAX,
    );
    ([(header::CONTENT_TYPE, "application/json")], reply).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn post(addr: std::net::SocketAddr, body: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!(
            "POST /v1/check HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).await.unwrap();
        reply
    }

    #[tokio::test]
    async fn counts_checks_and_refuses_bad_bodies() {
        let floor = Arc::new(Floor::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = router(Arc::clone(&floor));
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

        let body =
            r#"{"attributes":{"virtual_key":"vk-0","model":"gpt-4o"},"cost":0.0001,"tokens":10}"#;
        let reply = post(addr, body).await;
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(
            reply.ends_with(r#"{"allowed":true,"checks":1,"attributes":2}"#),
            "{reply}"
        );
        let reply = post(addr, r#"{"attributes":{},"nope":1}"#).await;
        assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
        // tally's validation: an attribute name with a space is refused, as by tally.
        let reply = post(addr, r#"{"attributes":{"bad name":"x"}}"#).await;
        assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
        assert!(reply.contains(r#""code":"invalid_argument""#), "{reply}");
        let reply = post(addr, r#"{"cost":-1}"#).await;
        assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
        assert_eq!(floor.checks(), 1);
    }
}
