//! The simulated network edges: gossip over turmoil UDP (a ticket per envelope), the real
//! axum router over turmoil TCP, and a small HTTP/1.1 client over turmoil TCP.
//!
//! chitchat's envelope encoding is crate-private (DESIGN.md §6), so the gossip transport
//! parks each envelope in a map shared by the whole simulation and sends only its ticket
//! (8 bytes) as a turmoil datagram. turmoil decides whether, when and in which order the
//! ticket arrives (loss, latency, partition, hold); the receiver then takes the envelope by
//! ticket. A ticket that never arrives leaves its envelope parked until it expires.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tally_gossip::{ChitchatEnvelope, RecvOutcome, SendOutcome, Socket, Transport};

/// Envelopes whose ticket is older than this (simulated time) were lost on the way.
const PARKED_TTL_MS: i64 = 120_000;
/// How often (in parked envelopes) expired ones are swept.
const SWEEP_EVERY: u64 = 4096;

/// Envelopes in flight, by ticket. One per simulation, shared by every host.
pub struct Parked {
    next: AtomicU64,
    map: Mutex<HashMap<u64, (i64, ChitchatEnvelope)>>,
    /// Simulated milliseconds since the start (the executor updates it every step).
    elapsed_ms: Arc<AtomicI64>,
}

impl Parked {
    pub fn new(elapsed_ms: Arc<AtomicI64>) -> Arc<Parked> {
        Arc::new(Parked {
            next: AtomicU64::new(1),
            map: Mutex::new(HashMap::new()),
            elapsed_ms,
        })
    }

    fn park(&self, env: ChitchatEnvelope) -> u64 {
        let ticket = self.next.fetch_add(1, Ordering::Relaxed);
        let now = self.elapsed_ms.load(Ordering::Relaxed);
        let mut map = self.map.lock().expect("parked map");
        if ticket % SWEEP_EVERY == 0 {
            map.retain(|_, (at, _)| now - *at < PARKED_TTL_MS);
        }
        map.insert(ticket, (now, env));
        ticket
    }

    fn take(&self, ticket: u64) -> Option<ChitchatEnvelope> {
        self.map
            .lock()
            .expect("parked map")
            .remove(&ticket)
            .map(|(_, e)| e)
    }
}

/// chitchat's transport on a turmoil host.
pub struct SimTransport(pub Arc<Parked>);

#[async_trait]
impl Transport for SimTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        // turmoil binds only the unspecified address; the host has one IP anyway.
        let any = SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), listen_addr.port());
        let socket = turmoil::net::UdpSocket::bind(any).await?;
        Ok(Box::new(SimSocket {
            socket,
            parked: self.0.clone(),
            local: listen_addr,
        }))
    }
}

struct SimSocket {
    socket: turmoil::net::UdpSocket,
    parked: Arc<Parked>,
    local: SocketAddr,
}

#[async_trait]
impl Socket for SimSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.local)
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        let ticket = self.parked.park(envelope);
        let n = self.socket.send_to(&ticket.to_le_bytes(), to).await?;
        Ok(SendOutcome { num_bytes_sent: n })
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        let mut buf = [0u8; 16];
        loop {
            let (n, from_addr) = self.socket.recv_from(&mut buf).await?;
            let Ok(bytes) = <[u8; 8]>::try_from(&buf[..n]) else {
                continue;
            };
            if let Some(envelope) = self.parked.take(u64::from_le_bytes(bytes)) {
                return Ok(RecvOutcome {
                    from_addr,
                    envelope,
                    num_bytes_received: n,
                });
            }
        }
    }
}

/// turmoil's TCP listener as an axum listener, so `axum::serve` runs the real router.
pub struct SimListener(pub turmoil::net::TcpListener);

impl axum::serve::Listener for SimListener {
    type Io = turmoil::net::TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.0.accept().await {
                Ok(conn) => return conn,
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// What became of an HTTP request.
#[derive(Debug)]
pub enum HttpOutcome {
    /// A response arrived.
    Response(u16, serde_json::Value),
    /// The connection could not be made: the server never saw the request.
    NotSent(#[allow(dead_code)] String),
    /// The request may or may not have been processed (connection lost, timeout).
    Unknown(#[allow(dead_code)] String),
}

/// One HTTP/1.1 request on a fresh turmoil TCP connection, with a deadline in simulated
/// time. Bodies are JSON.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
    deadline: Duration,
) -> HttpOutcome {
    let stream = match tokio::time::timeout(deadline, turmoil::net::TcpStream::connect(addr)).await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return HttpOutcome::NotSent(e.to_string()),
        Err(_) => return HttpOutcome::NotSent("connect timed out".into()),
    };
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    {
        Ok(x) => x,
        Err(e) => return HttpOutcome::NotSent(e.to_string()),
    };
    let conn = tokio::task::spawn_local(async move {
        let _ = conn.await;
    });
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "tally")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .expect("request");
    let exchange = async {
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        Ok::<_, String>((status, json))
    };
    let out = match tokio::time::timeout(deadline, exchange).await {
        Ok(Ok((status, json))) => HttpOutcome::Response(status, json),
        Ok(Err(e)) => HttpOutcome::Unknown(e),
        Err(_) => HttpOutcome::Unknown("timed out".into()),
    };
    conn.abort();
    out
}
