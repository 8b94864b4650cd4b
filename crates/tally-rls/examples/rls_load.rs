//! A closed-loop load generator for tally's Envoy rate limit service, for BENCHMARKS.md:
//! `--streams` calls in flight over `--connections` HTTP/2 connections (Envoy multiplexes
//! its calls on few connections), each call one descriptor `[user=<one of --values>]`
//! of `--domain`, with `hits_addend` `--hits` (0: check only, 1: a durable record).
//!
//! ```sh
//! cargo run --release -p tally-rls --example rls_load -- --addr 127.0.0.1:8089 \
//!     --token T --streams 32 --duration-secs 5 --hits 0
//! ```
//! Prints one line: `rls streams=32 connections=1 hits=0 secs=5 calls=.. rps=.. p50_us=..
//! p99_us=.. errors=..`.

use std::time::{Duration, Instant};

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::google::protobuf::UInt64Value;
use tonic::transport::{Channel, Endpoint};

struct Args {
    addr: String,
    token: Option<String>,
    streams: usize,
    connections: usize,
    duration: Duration,
    warmup: Duration,
    hits: u64,
    domain: String,
    values: usize,
}

fn args() -> Args {
    let mut a = Args {
        addr: "127.0.0.1:8089".into(),
        token: None,
        streams: 32,
        connections: 1,
        duration: Duration::from_secs(5),
        warmup: Duration::from_secs(1),
        hits: 0,
        domain: "bench".into(),
        values: 1000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--addr" => a.addr = v,
            "--token" => a.token = Some(v),
            "--streams" => a.streams = v.parse().expect("--streams N"),
            "--connections" => a.connections = v.parse().expect("--connections N"),
            "--duration-secs" => a.duration = Duration::from_secs(v.parse().expect("secs")),
            "--warmup-secs" => a.warmup = Duration::from_secs(v.parse().expect("secs")),
            "--hits" => a.hits = v.parse().expect("--hits N"),
            "--domain" => a.domain = v,
            "--values" => a.values = v.parse().expect("--values N"),
            other => panic!("unknown flag {other}"),
        }
    }
    assert!(a.streams >= a.connections && a.connections > 0);
    a
}

fn request(a: &Args, i: usize) -> tonic::Request<RateLimitRequest> {
    let mut r = tonic::Request::new(RateLimitRequest {
        domain: a.domain.clone(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![Entry {
                key: "user".into(),
                value: format!("u{}", i % a.values),
            }],
            hits_addend: Some(UInt64Value { value: a.hits }),
            ..RateLimitDescriptor::default()
        }],
        hits_addend: 0,
    });
    if let Some(t) = &a.token {
        r.metadata_mut().insert(
            "authorization",
            format!("Bearer {t}").parse().expect("ascii"),
        );
    }
    r
}

/// This process's user + system CPU time so far, in microseconds (Linux /proc).
fn cpu_us() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses): utime is the 14th field
    // of the line, stime the 15th; in clock ticks of 1/100 s on Linux.
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks * 10_000.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    let a = std::sync::Arc::new(args());
    let mut channels: Vec<Channel> = Vec::new();
    for _ in 0..a.connections {
        let ch = Endpoint::from_shared(format!("http://{}", a.addr))
            .expect("address")
            .tcp_nodelay(true)
            .connect()
            .await
            .expect("connect to the rate limit service");
        channels.push(ch);
    }
    let start = Instant::now();
    let measure_from = start + a.warmup;
    let end = measure_from + a.duration;
    let mut tasks = Vec::new();
    for s in 0..a.streams {
        let mut client = RateLimitServiceClient::new(channels[s % a.connections].clone());
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            let (mut lat, mut errors, mut i) = (Vec::new(), 0u64, s);
            loop {
                let t = Instant::now();
                if t >= end {
                    break;
                }
                let ok = client.should_rate_limit(request(&a, i)).await.is_ok();
                i += a.streams;
                if t >= measure_from {
                    if ok {
                        lat.push(t.elapsed().as_micros() as u32);
                    } else {
                        errors += 1;
                    }
                }
            }
            (lat, errors)
        }));
    }
    let cpu_at_start = cpu_us();
    let (mut lat, mut errors) = (Vec::new(), 0);
    for t in tasks {
        let (l, e) = t.await.expect("task");
        lat.extend(l);
        errors += e;
    }
    // Client CPU per measured call: the whole run's CPU over the measured calls (the
    // warm-up's calls make this an over-estimate by warmup/duration at most).
    let client_cpu = (cpu_us() - cpu_at_start) / lat.len().max(1) as f64;
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "rls streams={} connections={} hits={} secs={} calls={} rps={:.0} p50_us={} p99_us={} errors={} cpu_us={:.1}",
        a.streams,
        a.connections,
        a.hits,
        a.duration.as_secs(),
        lat.len(),
        lat.len() as f64 / a.duration.as_secs_f64(),
        pct(0.50),
        pct(0.99),
        errors,
        client_cpu
    );
}
