//! tally-rls: Envoy's global rate limit service (gRPC,
//! `envoy.service.ratelimit.v3.RateLimitService`) served from a tally node, and the import
//! of envoyproxy/ratelimit configs as tally limits.
//!
//! - [`rules`]: how a rate limit rule (domain + descriptor path) is a tally limit, pure.
//! - [`import`]: ratelimit's YAML → rules, with what cannot be expressed, pure.
//! - [`service`]: `ShouldRateLimit` on a [`tally_node::Node`].
//! - [`serve`]: the gRPC listener (bounded connections, streams and message size,
//!   graceful shutdown).
//!
//! The messages are Envoy's own (crate `envoy-types`, generated from data-plane-api).
//! This crate knows gRPC; it knows no HTTP/JSON (tally-server) and no redb.

pub mod import;
pub mod rules;
pub mod service;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use service::{RateLimiter, RlsMetrics};

/// Bounds of the gRPC listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Open connections; the listener stops accepting at the bound (the kernel's backlog
    /// holds the rest).
    pub connections_max: usize,
    /// Concurrent streams (calls) per HTTP/2 connection.
    pub streams_per_connection_max: u32,
    /// Largest request message (bytes).
    pub message_bytes_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections_max: 1024,
            streams_per_connection_max: 256,
            message_bytes_max: 64 << 10,
        }
    }
}

/// Why the listener stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    #[error("the gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// A connection holding one of the listener's permits until it closes.
struct Conn {
    tcp: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = Option<SocketAddr>;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.tcp.peer_addr().ok()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
}

/// Serves `ShouldRateLimit` on an already-bound listener until `shutdown` completes,
/// then finishes the calls in flight. `tokens`: the bearer tokens a call may carry
/// (empty: no check, for a loopback-only node without tokens).
pub async fn serve(
    limiter: Arc<RateLimiter>,
    tokens: Vec<String>,
    listener: TcpListener,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let permits = Arc::new(Semaphore::new(limits.connections_max));
    let incoming =
        futures_util::stream::unfold((listener, permits), |(listener, permits)| async move {
            let permit = permits
                .clone()
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            let conn = loop {
                match listener.accept().await {
                    Ok((tcp, _)) => {
                        let _ = tcp.set_nodelay(true);
                        break Ok::<_, std::io::Error>(Conn {
                            tcp,
                            _permit: permit,
                        });
                    }
                    // A failed accept (EMFILE, a reset before accept) is the peer's or
                    // the moment's problem, not the listener's: log it and go on.
                    Err(e) => {
                        tracing::warn!(error = %e, "rls: accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    }
                }
            };
            Some((conn, (listener, permits)))
        });
    let svc = RateLimitServiceServer::from_arc(Arc::new(service::Service { limiter, tokens }))
        .max_decoding_message_size(limits.message_bytes_max);
    tonic::transport::Server::builder()
        .max_concurrent_streams(limits.streams_per_connection_max)
        .serve_with_incoming_shutdown(svc, incoming, shutdown)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The listener's bounds and shutdown, over real gRPC on loopback.

    use std::time::Duration;

    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
    use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
    use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;

    use super::*;

    fn call(value_len: usize) -> tonic::Request<RateLimitRequest> {
        let mut r = tonic::Request::new(RateLimitRequest {
            domain: "d".into(),
            descriptors: vec![RateLimitDescriptor {
                entries: vec![Entry {
                    key: "k".into(),
                    value: "v".repeat(value_len),
                }],
                ..RateLimitDescriptor::default()
            }],
            hits_addend: 1,
        });
        r.metadata_mut()
            .insert("authorization", "Bearer t".parse().unwrap());
        r
    }

    #[tokio::test]
    async fn connections_and_message_size_are_bounded_and_shutdown_is_graceful() {
        let dir = tempfile::tempdir().unwrap();
        let node = tally_node::Node::open(tally_node::NodeConfig::new(dir.path())).unwrap();
        let limiter = Arc::new(RateLimiter::new(node.clone(), 10, Arc::default()));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let limits = Limits {
            connections_max: 1,
            streams_per_connection_max: 4,
            message_bytes_max: 4 << 10,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(limiter, vec!["t".into()], listener, limits, async {
            let _ = stopped.await;
        }));
        let mut a = RateLimitServiceClient::connect(url.clone()).await.unwrap();
        assert!(a.should_rate_limit(call(3)).await.is_ok());
        // Over the message bound: refused, the connection stays usable.
        let e = a.should_rate_limit(call(8 << 10)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::OutOfRange, "{e}");
        // Unknown token: refused.
        let mut bad = call(3);
        bad.metadata_mut()
            .insert("authorization", "Bearer x".parse().unwrap());
        let e = a.should_rate_limit(bad).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        // A second connection waits while the first holds the only permit...
        let b_url = url.clone();
        let second = tokio::spawn(async move {
            let mut b = RateLimitServiceClient::connect(b_url).await.unwrap();
            b.should_rate_limit(call(3)).await.map(|_| ())
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !second.is_finished(),
            "a second connection was served past the bound"
        );
        // ...and is served once the first closes.
        drop(a);
        tokio::time::timeout(Duration::from_secs(10), second)
            .await
            .expect("served after the first connection closed")
            .unwrap()
            .unwrap();
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the server stops on the shutdown signal")
            .unwrap()
            .unwrap();
        node.shutdown().await;
    }
}
