//! `--setup`: create the [`LimitPlan`]'s limits with `PUT /v1/limits/{id}` over several
//! concurrent keep-alive connections, then probe one check to confirm the server applies
//! exactly the five limits the plan says it should.
//!
//! Unlike the measured loop, any failure here is fatal: a benchmark against half a setup
//! would measure the wrong thing.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use hyper::body::Bytes;
use hyper::{Method, StatusCode};

use crate::client::{Conn, RequestTemplate, Target};
use crate::workload::{LimitPlan, check_body};

/// Attempts per PUT when the connection breaks (PUT is idempotent, so a retry is safe).
const PUT_ATTEMPTS_MAX: u32 = 3;
const SETUP_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Creates every limit of `plan` using `connections` concurrent connections.
pub async fn create_limits(
    target: Arc<Target>,
    plan: LimitPlan,
    connections: usize,
) -> anyhow::Result<()> {
    assert!(connections > 0);
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..connections.min(plan.total()))
        .map(|_| {
            let target = Arc::clone(&target);
            let next = Arc::clone(&next);
            tokio::spawn(async move {
                let result = put_worker(&target, plan, &next).await;
                if result.is_err() {
                    // Stop the other workers: the run is off.
                    next.store(plan.total(), Ordering::Relaxed);
                }
                result
            })
        })
        .collect();
    let mut first_error = None;
    for worker in workers {
        if let Err(error) = worker.await.context("setup worker panicked")? {
            first_error.get_or_insert(error);
        }
    }
    first_error.map_or(Ok(()), Err)
}

async fn put_worker(target: &Target, plan: LimitPlan, next: &AtomicUsize) -> anyhow::Result<()> {
    let mut conn: Option<Conn> = None;
    loop {
        let n = next.fetch_add(1, Ordering::Relaxed);
        if n >= plan.total() {
            return Ok(());
        }
        let (id, body) = plan.limit(n);
        let template =
            RequestTemplate::new(target, Method::PUT, &format!("/v1/limits/{id}"), true)?;
        let body = Bytes::from(body);
        let mut attempt = 1;
        let (status, reply) = loop {
            let conn_ref = match conn.as_mut() {
                Some(conn) => conn,
                None => conn.insert(target.connect().await?),
            };
            let outcome = tokio::time::timeout(
                SETUP_REQUEST_TIMEOUT,
                conn_ref.send(template.build(body.clone())),
            )
            .await;
            match outcome {
                Ok(Ok(answer)) => break answer,
                Ok(Err(_)) if attempt < PUT_ATTEMPTS_MAX => {
                    conn = None;
                    attempt += 1;
                }
                Ok(Err(error)) => return Err(error).with_context(|| format!("PUT limit {id}")),
                Err(_) => bail!("PUT limit {id}: no answer in {SETUP_REQUEST_TIMEOUT:?}"),
            }
        };
        if !status.is_success() {
            bail!(
                "PUT /v1/limits/{id} answered {status}: {}",
                String::from_utf8_lossy(&reply)
            );
        }
    }
}

/// Sends one check for key 0 and returns how many limits the server says apply.
pub async fn probe_applicable_limits(target: &Target) -> anyhow::Result<usize> {
    let template = RequestTemplate::new(target, Method::POST, "/v1/check", true)?;
    let mut conn = target.connect().await?;
    let (status, reply) = tokio::time::timeout(
        SETUP_REQUEST_TIMEOUT,
        conn.send(template.build(Bytes::from(check_body(0)))),
    )
    .await
    .context("probe check timed out")??;
    if status != StatusCode::OK {
        bail!(
            "probe check answered {status}: {}",
            String::from_utf8_lossy(&reply)
        );
    }
    let reply: tally_api::CheckReply =
        serde_json::from_slice(&reply).context("probe check reply is not a check reply")?;
    Ok(reply.limits.len())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::Mutex;

    use super::*;
    use crate::run::tests::serve;

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn creates_every_limit_once_then_probes() {
        let puts = Arc::new(Mutex::new(Vec::new()));
        let puts_by_server = Arc::clone(&puts);
        let addr = serve(move |method, path, body| {
            if method == Method::PUT {
                let body: serde_json::Value = serde_json::from_slice(body).unwrap();
                assert_eq!(body["metric"], "cost");
                puts_by_server.lock().unwrap().push(path.to_owned());
                (StatusCode::OK, "{}".to_owned())
            } else {
                assert_eq!(path, "/v1/check");
                let status = |id: &str| tally_api::LimitStatus {
                    id: id.to_owned(),
                    metric: "cost".to_owned(),
                    used: tally_api::Amount::Usd(0.0),
                    max: tally_api::Amount::Usd(1.0),
                    remaining: tally_api::Amount::Usd(1.0),
                    resets_at: None,
                    mode: None,
                    free: None,
                    reason: None,
                    retry_after_ms: None,
                };
                let reply = tally_api::CheckReply {
                    allowed: true,
                    stale: false,
                    denied_by: Vec::new(),
                    limits: ["a", "b", "c", "d", "e"].map(status).to_vec(),
                    access: None,
                    reservation: None,
                    priced: None,
                };
                (StatusCode::OK, serde_json::to_string(&reply).unwrap())
            }
        })
        .await;
        let target = Arc::new(Target::parse(&format!("http://{addr}"), None).unwrap());
        // 3 keys: 11 matching limits, then load-other-0..=488.
        let plan = LimitPlan::new(500, 3).unwrap();
        create_limits(Arc::clone(&target), plan, 8).await.unwrap();
        let puts = puts.lock().unwrap().clone();
        assert_eq!(puts.len(), 500);
        let distinct: BTreeSet<&String> = puts.iter().collect();
        assert_eq!(distinct.len(), 500);
        assert!(puts.contains(&"/v1/limits/load-model-gpt-4o".to_owned()));
        assert!(puts.contains(&"/v1/limits/load-other-488".to_owned()));
        assert_eq!(probe_applicable_limits(&target).await.unwrap(), 5);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_rejected_put_fails_setup() {
        let addr = serve(|_, _, _| {
            (
                StatusCode::UNAUTHORIZED,
                r#"{"error":{"code":"unauthenticated"}}"#.to_owned(),
            )
        })
        .await;
        let target = Arc::new(Target::parse(&format!("http://{addr}"), None).unwrap());
        let error = create_limits(target, LimitPlan::new(50, 1).unwrap(), 4)
            .await
            .unwrap_err();
        assert!(error.to_string().contains("401"), "{error}");
    }
}
