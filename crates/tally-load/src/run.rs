//! The closed loop: `connections` tasks, each with one keep-alive connection, each sending a
//! request, awaiting the whole response, recording its latency, and repeating.
//!
//! The loop is the same whatever is on the other end; a [`Protocol`] says how to open a
//! connection and make one request on it (HTTP/1.1, Redis RESP, or an in-process call of
//! tally's embedded `Node` API, where a "connection" is just a task).
//!
//! Closed-loop means the offered load adapts to the server: a slow response delays the
//! next request on that connection, so the numbers are "latency at the throughput this many
//! concurrent clients achieve", not latency under a fixed arrival rate (which would also
//! count queueing the server causes; see coordinated omission).
//!
//! Time is split into a warmup (connections open, caches fill; nothing is counted) and a
//! measurement window `[start, end]`. A response counts when it *completes* inside the
//! window; at `end` whatever is in flight is abandoned, so `requests / duration` is exact.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, sleep_until, timeout_at};

use crate::histogram::Histogram;

/// How to talk to the system under test. One `Conn` per closed-loop task; `Gen` is that
/// task's request generator (bodies, ids), owned by the task.
pub trait Protocol: Send + Sync + 'static {
    type Conn: Send + 'static;
    type Gen: Send + 'static;

    /// Opens one connection.
    fn connect(&self) -> impl Future<Output = anyhow::Result<Self::Conn>> + Send;

    /// Makes one request on `conn` and waits for its complete answer. `Ok(status)` is an
    /// answer (HTTP status; other protocols map success to 200 and failures to the HTTP
    /// status closest in meaning); `Err` is a transport failure, after which the
    /// connection is dropped and reopened.
    fn call(
        &self,
        conn: &mut Self::Conn,
        generator: &mut Self::Gen,
    ) -> impl Future<Output = anyhow::Result<u16>> + Send;
}

/// How long a connection waits before reconnecting after a failed connect, so a dead
/// server costs a trickle of errors rather than a busy loop.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(10);

#[derive(Clone, Copy, Debug)]
pub struct RunConfig {
    pub connections: usize,
    pub warmup: Duration,
    pub duration: Duration,
    /// A request not answered within this is a transport error (and its connection is
    /// dropped, since its state is unknown).
    pub request_timeout: Duration,
}

/// What the connections saw inside the measurement window.
#[derive(Clone, Debug, Default)]
pub struct RunStats {
    /// Latency of every response (2xx or not), in nanoseconds.
    pub latency: Histogram,
    /// Responses of any status plus transport errors.
    pub requests: u64,
    /// Non-2xx responses by status code.
    pub error_statuses: BTreeMap<u16, u64>,
    /// Failed connects, broken connections and timeouts.
    pub transport_errors: u64,
    /// CPU time (user + system, all threads) this process spent during the window, when
    /// the OS tells (Linux): the client's cost, or everything in the embedded mode.
    pub process_cpu_secs: Option<f64>,
}

impl RunStats {
    pub fn merge(&mut self, other: &RunStats) {
        self.latency.merge(&other.latency);
        self.requests += other.requests;
        for (status, count) in &other.error_statuses {
            *self.error_statuses.entry(*status).or_default() += count;
        }
        self.transport_errors += other.transport_errors;
    }

    /// Non-2xx responses plus transport errors.
    pub fn errors(&self) -> u64 {
        self.error_statuses.values().sum::<u64>() + self.transport_errors
    }
}

#[derive(Clone, Copy, Debug)]
struct Window {
    start: Instant,
    end: Instant,
}

impl Window {
    fn contains(&self, at: Instant) -> bool {
        self.start <= at && at <= self.end
    }
}

/// Runs the closed loop; `generators(i)` makes connection `i`'s request generator.
pub async fn run<P: Protocol>(
    protocol: Arc<P>,
    generators: impl Fn(usize) -> P::Gen,
    config: RunConfig,
) -> RunStats {
    assert!(config.connections > 0);
    let start = Instant::now() + config.warmup;
    let window = Window {
        start,
        end: start + config.duration,
    };
    let cpu_at_start = tokio::spawn(async move {
        sleep_until(start).await;
        process_cpu_secs()
    });
    let tasks: Vec<_> = (0..config.connections)
        .map(|connection| {
            tokio::spawn(connection_loop(
                Arc::clone(&protocol),
                generators(connection),
                window,
                config.request_timeout,
            ))
        })
        .collect();
    let mut total = RunStats::default();
    for task in tasks {
        let stats = task.await.expect("connection task panicked");
        total.merge(&stats);
    }
    let cpu_at_end = process_cpu_secs();
    if let (Ok(Some(started)), Some(ended)) = (cpu_at_start.await, cpu_at_end) {
        total.process_cpu_secs = Some(ended - started);
    }
    total
}

/// User + system CPU time of this process so far, from `/proc/self/stat` (Linux; `None`
/// elsewhere). Its unit is USER_HZ, which Linux fixes at 100 for user space.
fn process_cpu_secs() -> Option<f64> {
    const USER_HZ: f64 = 100.0;
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name (which may hold spaces) start at field 3;
    // utime and stime are fields 14 and 15.
    let mut fields = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some((user + system) as f64 / USER_HZ)
}

async fn connection_loop<P: Protocol>(
    protocol: Arc<P>,
    mut generator: P::Gen,
    window: Window,
    request_timeout: Duration,
) -> RunStats {
    let mut stats = RunStats::default();
    let mut conn: Option<P::Conn> = None;
    let count_error = |stats: &mut RunStats| {
        if window.contains(Instant::now()) {
            stats.requests += 1;
            stats.transport_errors += 1;
        }
    };
    while Instant::now() < window.end {
        let conn_ref = match conn.as_mut() {
            Some(conn) => conn,
            None => match timeout_at(window.end, protocol.connect()).await {
                Err(_end) => break,
                Ok(Ok(connected)) => conn.insert(connected),
                Ok(Err(_)) => {
                    count_error(&mut stats);
                    sleep_until((Instant::now() + RECONNECT_BACKOFF).min(window.end)).await;
                    continue;
                }
            },
        };
        let sent_at = Instant::now();
        let deadline = (sent_at + request_timeout).min(window.end);
        // Bound first: the in-flight future borrows `conn`, which the arms may reset.
        let outcome = timeout_at(deadline, protocol.call(conn_ref, &mut generator)).await;
        match outcome {
            Ok(Ok(status)) => {
                let done_at = Instant::now();
                if window.contains(done_at) {
                    let nanos = done_at.duration_since(sent_at).as_nanos();
                    stats
                        .latency
                        .record(u64::try_from(nanos).unwrap_or(u64::MAX));
                    stats.requests += 1;
                    if !(200..300).contains(&status) {
                        *stats.error_statuses.entry(status).or_default() += 1;
                    }
                }
            }
            Ok(Err(_)) => {
                conn = None;
                count_error(&mut stats);
            }
            Err(_timeout) => {
                // Either the window closed (abandon, uncounted) or the request timed out.
                conn = None;
                if deadline < window.end {
                    count_error(&mut stats);
                }
            }
        }
    }
    stats
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicU64, Ordering};

    use http_body_util::{BodyExt, Full};
    use hyper::body::{Bytes, Incoming};
    use hyper::service::service_fn;
    use hyper::{Method, Request, Response, StatusCode};
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpListener;

    use super::*;
    use crate::client::{Http, RequestTemplate, Target};
    use crate::workload::BodyGen;

    /// A loopback HTTP/1.1 server on port 0 that answers every request with
    /// `respond(method, path, body)`; returns its address. It lives until the test runtime
    /// ends.
    pub(crate) async fn serve(
        respond: impl Fn(&Method, &str, &[u8]) -> (StatusCode, String) + Send + Sync + 'static,
    ) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let respond = Arc::new(respond);
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let respond = Arc::clone(&respond);
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        let respond = Arc::clone(&respond);
                        async move {
                            let method = request.method().clone();
                            let path = request.uri().path().to_owned();
                            let body = request.into_body().collect().await?.to_bytes();
                            let (status, reply) = respond(&method, &path, &body);
                            let mut response = Response::new(Full::new(Bytes::from(reply)));
                            *response.status_mut() = status;
                            Ok::<_, hyper::Error>(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        addr
    }

    fn config(connections: usize) -> RunConfig {
        RunConfig {
            connections,
            warmup: Duration::from_millis(50),
            duration: Duration::from_millis(300),
            request_timeout: Duration::from_secs(5),
        }
    }

    async fn run_against(addr: SocketAddr, connections: usize, path: &str) -> RunStats {
        let target = Target::parse(&format!("http://{addr}"), Some("tok")).unwrap();
        let template = RequestTemplate::new(&target, Method::POST, path, true).unwrap();
        run(
            Arc::new(Http::new(target, template)),
            |connection| BodyGen::check(connection, 2),
            config(connections),
        )
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn counts_responses_and_latencies() {
        let seen = Arc::new(AtomicU64::new(0));
        let seen_by_server = Arc::clone(&seen);
        let addr = serve(move |method, path, body| {
            assert_eq!(method, Method::POST);
            assert_eq!(path, "/v1/check");
            let body: serde_json::Value = serde_json::from_slice(body).unwrap();
            assert_eq!(body["attributes"]["provider"], "openai");
            seen_by_server.fetch_add(1, Ordering::Relaxed);
            (StatusCode::OK, r#"{"allowed":true}"#.to_owned())
        })
        .await;
        let stats = run_against(addr, 4, "/v1/check").await;
        assert!(stats.requests > 10, "only {} requests", stats.requests);
        assert_eq!(stats.errors(), 0);
        assert_eq!(stats.latency.count(), stats.requests);
        assert!(stats.latency.percentile(50.0) > 0);
        // Warmup requests reached the server but were not counted.
        assert!(seen.load(Ordering::Relaxed) > stats.requests);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn non_2xx_responses_are_errors() {
        let addr = serve(|_, path, _| match path {
            "/v1/check" => (StatusCode::OK, String::new()),
            _ => (StatusCode::NOT_FOUND, String::new()),
        })
        .await;
        let stats = run_against(addr, 2, "/nope").await;
        assert!(stats.requests > 0);
        assert_eq!(stats.error_statuses.get(&404), Some(&stats.requests));
        assert_eq!(stats.errors(), stats.requests);
        assert_eq!(stats.transport_errors, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_dead_server_is_transport_errors() {
        // Bind then drop, so the port is (very likely) closed.
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let stats = run_against(addr, 2, "/v1/check").await;
        assert!(stats.transport_errors > 0);
        assert_eq!(stats.errors(), stats.requests);
        assert_eq!(stats.latency.count(), 0);
    }

    #[test]
    fn process_cpu_time_is_read_on_linux() {
        if cfg!(target_os = "linux") {
            let before = process_cpu_secs().unwrap();
            let spin = std::time::Instant::now();
            let mut x = 0u64;
            while spin.elapsed() < Duration::from_millis(50) {
                x = std::hint::black_box(x.wrapping_add(1));
            }
            assert!(process_cpu_secs().unwrap() >= before);
        }
    }

    #[test]
    fn stats_merge_adds_up() {
        let mut left = RunStats {
            requests: 3,
            error_statuses: BTreeMap::from([(500, 1)]),
            ..RunStats::default()
        };
        left.latency.record(1_000);
        let right = RunStats {
            requests: 4,
            error_statuses: BTreeMap::from([(500, 2), (429, 1)]),
            transport_errors: 1,
            ..RunStats::default()
        };
        left.merge(&right);
        assert_eq!(left.requests, 7);
        assert_eq!(left.errors(), 5);
        assert_eq!(left.error_statuses[&500], 3);
        assert_eq!(left.latency.count(), 1);
    }
}
