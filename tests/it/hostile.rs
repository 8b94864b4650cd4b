//! Clients that do not play by the rules: thousands of slow or idle connections, headers
//! and bodies trickled or never finished (STYLE.md: put a limit on everything; issue 17).
//!
//! The node must keep answering normal requests promptly, keep its memory bounded, and
//! close what it will never be able to serve: a request whose headers do not arrive within
//! the header timeout (10 s, also the idle timeout of a kept-alive connection), a body that
//! does not arrive within the body timeout (10 s, answered 408).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use tally_tests::{CLUSTER_KEY, Node, NodeOpts, free_udp_port, json, loopback, metric, ok};

/// Slow connections opened at once.
const SLOW_CONNECTIONS: usize = 2_000;
/// Bytes of unfinished headers each sends (the node buffers at most 32 KiB per connection).
const HEADER_BYTES: usize = 16 * 1024;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

fn connect(url: &str) -> TcpStream {
    let addr = url.strip_prefix("http://").expect("http url");
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

/// Whether the server closed `s` (EOF or reset) or answered with `status`, within 30 s.
fn closed_or_answered(s: &mut TcpStream, status: &str) -> Result<(), String> {
    let mut buf = [0u8; 512];
    match s.read(&mut buf) {
        Ok(0) => Ok(()),
        Ok(n) => {
            let text = String::from_utf8_lossy(&buf[..n]);
            if text.starts_with(&format!("HTTP/1.1 {status}")) {
                Ok(())
            } else {
                Err(format!("unexpected reply {text:?}"))
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
        Err(e) => Err(format!("still open ({e})")),
    }
}

/// 2 000 connections holding unfinished headers, plus slow bodies: a normal check is still
/// answered in under 100 ms (median of 21), the node's RSS grows by a bounded amount, and
/// after the timeouts every slow connection has been closed (headers) or answered 408
/// (bodies), while a kept-alive idle connection is closed too.
#[test]
fn slow_clients_neither_starve_nor_bloat_the_node() {
    let node = Node::single();
    let c = node.client();
    ok(c.put(
        "/v1/limits/h",
        json!({"scope": {"team": "h"}, "metric": "requests", "max": 1000, "period": "1d"}),
    ));
    let rss_before = rss_kib(node.pid());
    let start = Instant::now();

    let pad = "a".repeat(HEADER_BYTES);
    let mut slow: Vec<TcpStream> = (0..SLOW_CONNECTIONS)
        .map(|_| {
            let mut s = connect(node.url());
            write!(s, "POST /v1/check HTTP/1.1\r\nHost: x\r\nX-Pad: {pad}").unwrap();
            s
        })
        .collect();
    // Bodies that never finish: the headers promise 1 000 000 bytes, 10 000 arrive.
    let mut slow_bodies: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut s = connect(node.url());
            write!(
                s,
                "POST /v1/usage HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                 Content-Length: 1000000\r\n\r\n{}",
                " ".repeat(10_000)
            )
            .unwrap();
            s
        })
        .collect();
    // A kept-alive connection that goes idle after one request.
    let mut idle = connect(node.url());
    write!(idle, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut buf = [0u8; 1024];
    let n = idle.read(&mut buf).unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "healthz");
    eprintln!(
        "{SLOW_CONNECTIONS} slow connections open after {:?}",
        start.elapsed()
    );

    // A normal client is served promptly meanwhile.
    let mut took: Vec<Duration> = (0..21)
        .map(|_| {
            let t = Instant::now();
            let d = ok(c.post("/v1/check", json!({"attributes": {"team": "h"}})));
            assert_eq!(d["allowed"], json!(true), "{d}");
            t.elapsed()
        })
        .collect();
    took.sort();
    let rss_during = rss_kib(node.pid());
    eprintln!(
        "check with {SLOW_CONNECTIONS} slow connections: median {:?}, max {:?}; RSS {} -> {} KiB",
        took[10], took[20], rss_before, rss_during
    );
    assert!(
        took[10] < Duration::from_millis(100),
        "median check {:?}",
        took[10]
    );
    // Bounded: 32 KiB of header buffer per connection at most, plus bookkeeping.
    let growth_mib = rss_during.saturating_sub(rss_before) / 1024;
    assert!(
        growth_mib < 200,
        "RSS grew {growth_mib} MiB for {SLOW_CONNECTIONS} slow connections"
    );

    // After the timeouts, the node has let go of all of them.
    for (i, s) in slow.iter_mut().enumerate() {
        closed_or_answered(s, "408").unwrap_or_else(|e| panic!("slow header connection {i}: {e}"));
    }
    for (i, s) in slow_bodies.iter_mut().enumerate() {
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        assert!(
            text.starts_with("HTTP/1.1 408"),
            "slow body {i} got {text:?}"
        );
        assert!(text.contains("\"request_timeout\""), "{text}");
    }
    closed_or_answered(&mut idle, "408").expect("the idle kept-alive connection");
    drop((slow, slow_bodies, idle));
    std::thread::sleep(Duration::from_millis(500));
    eprintln!(
        "every slow connection let go {:?} after start; RSS then {} KiB",
        start.elapsed(),
        rss_kib(node.pid())
    );
    assert!(
        start.elapsed() < Duration::from_secs(40),
        "the timeouts are 10 s"
    );
    // Nothing was recorded by the bodies that never arrived.
    let view = ok(c.get("/v1/limits/h"));
    assert_eq!(view["used"], json!(0), "{view}");
}

/// 10 000 junk datagrams on the gossip port: none is logged line by line (chitchat warns
/// about each; they are counted in `tally_gossip_datagrams_invalid_total` instead and
/// summarised at most once a minute), and the node keeps serving.
#[test]
fn junk_on_the_gossip_port_is_counted_not_logged() {
    let port = free_udp_port();
    let node = Node::start(NodeOpts::gossip("junk-a", port, &[port], CLUSTER_KEY));
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let c = node.client();
    ok(c.post("/v1/check", json!({"attributes": {"team": "j"}})));
    let rss_before = rss_kib(node.pid());
    let mut sent = 0;
    for i in 0..100_000u32 {
        let junk = format!("junk {i} {}", "x".repeat((i % 200) as usize));
        sock.send_to(junk.as_bytes(), loopback(port)).expect("send");
        sent += 1;
        if i % 500 == 0 {
            // Let the node drain its socket buffer now and then.
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let counted = tally_tests::wait_for(Duration::from_secs(10), "datagrams counted", || {
        let n = metric(&c, "tally_gossip_datagrams_invalid_total").unwrap_or(0.0);
        (n >= 1_000.0).then_some(n).ok_or(format!("{n} counted"))
    })
    .0;
    let logged = node
        .log_lines()
        .iter()
        .filter(|l| l.contains("invalid-chitchat-payload") || l.contains("not chitchat"))
        .count();
    let rss_after = rss_kib(node.pid());
    eprintln!(
        "{sent} junk datagrams sent, {counted} counted, {logged} log lines; RSS {rss_before} -> {rss_after} KiB"
    );
    assert!(counted <= f64::from(sent), "{counted} > {sent}");
    // Nothing of a junk datagram is kept: memory does not grow with the flood.
    assert!(
        rss_after.saturating_sub(rss_before) < 16 * 1024,
        "RSS grew from {rss_before} to {rss_after} KiB under {sent} junk datagrams"
    );
    assert_eq!(logged, 0, "junk datagrams were logged line by line");
    ok(c.post("/v1/check", json!({"attributes": {"team": "j"}})));
}
