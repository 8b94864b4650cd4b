//! `tally serve`: opens the node, binds the listener, serves API.md until SIGTERM/SIGINT,
//! then drains in-flight requests, commits and exits 0.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tally_node::{ClusterConfig, ClusterKey, GossipNetwork, Node, NodeConfig};
use tokio::net::TcpListener;

use crate::config::ServeConfig;
use crate::http::{AppState, Auth, router};

/// Runs a node until a shutdown signal. Blocks.
pub fn run(cfg: ServeConfig) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tally")
        .build()
        .context("cannot start the async runtime")?;
    // The handlers go in before anything slow (opening the store, a dedup rebuild): a
    // SIGTERM or SIGINT during start-up then stops the node cleanly once it is open,
    // instead of killing it with the default action (exit 143 / 130).
    let shutdown = {
        let _in_runtime = rt.enter();
        shutdown_signal()
    };
    rt.block_on(async move {
        let listener = TcpListener::bind(cfg.listen).await.with_context(|| {
            format!(
                "cannot listen on {}: is another process using it?",
                cfg.listen
            )
        })?;
        serve(cfg, listener, shutdown).await
    })
}

/// The node config a serve config implies.
pub fn node_config(cfg: &ServeConfig) -> NodeConfig {
    let mut n = NodeConfig::new(&cfg.data_dir);
    n.node_id = cfg.node_id.clone();
    n.dedup_window_ms = cfg.dedup_window_secs as i64 * 1000;
    n.history_retention_ms = cfg.history_retention_days as i64 * 86_400_000;
    n.reservation_ttl_max_ms = cfg.reservation_ttl_max_secs as i64 * 1000;
    n.batch_records_max = cfg.batch_records_max;
    n.queue_records_max = cfg.queue_records_max;
    n.queue_wait = Duration::from_millis(cfg.queue_wait_ms);
    n.denials_by_limit_max = cfg.metrics_limits;
    n
}

/// Serves on an already-bound listener until `shutdown` completes (tests bind port 0).
pub async fn serve(
    cfg: ServeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let node_cfg = node_config(&cfg);
    let node = tokio::task::spawn_blocking(move || Node::open(node_cfg))
        .await
        .context("opening the node panicked")?
        .with_context(|| format!("cannot open the data directory {}", cfg.data_dir.display()))?;
    if let Some(cluster) = cluster_config(&cfg)? {
        tokio::spawn(crate::logging::summarise_invalid_datagrams());
        let gossip_listen = cluster.network.listen;
        node.start_cluster(cluster)
            .await
            .with_context(|| format!("cannot start gossip on {gossip_listen}"))?;
        tracing::info!(%gossip_listen, seeds = ?cfg.seeds, "gossip started");
    }
    let addr = listener.local_addr().context("listener has no address")?;
    let state = Arc::new(AppState {
        started_ms: node.now_ms(),
        node: node.clone(),
        auth: Auth {
            admin_token: cfg.admin_token.clone(),
            client_token: cfg.client_token.clone(),
        },
        gossip_addr: cfg
            .gossip_advertise
            .clone()
            .or_else(|| cfg.gossip_listen.map(|a| a.to_string())),
        proxies: Arc::default(),
    });
    // One shutdown signal, seen by every listener.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut w: tokio::sync::watch::Receiver<bool>| async move {
        let _ = w.wait_for(|s| *s).await;
    };
    let extra = start_proxies(&cfg, &state, stop_rx.clone()).await?;
    {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        for line in &extra.lines {
            writeln!(out, "{line}")?;
        }
        writeln!(
            out,
            "tally listening on http://{addr} node={}",
            node.node_id()
        )?;
        out.flush()?;
    }
    tracing::info!(%addr, node = node.node_id(), data_dir = %cfg.data_dir.display(), "serving");
    serve_http(
        listener,
        router(state),
        stopped(stop_rx),
        HttpLimits::default(),
    )
    .await
    .context("the HTTP server failed")?;
    if let Some(rls) = extra.rls {
        match rls.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "the rate limit service failed"),
            Err(e) => tracing::error!(error = %e, "the rate limit service panicked"),
        }
    }
    if let Some(logs) = extra.logs {
        // Listeners stopped with the signal; this applies what they queued.
        let _ = logs.await;
    }
    tracing::info!("draining: committing queued writes");
    node.shutdown().await;
    tracing::info!("stopped cleanly");
    Ok(())
}

/// Bounds on what HTTP clients may hold (STYLE.md: put a limit on everything). A slow or
/// hostile client must not grow memory without bound or keep connections forever.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// Connections served at once; beyond, new ones wait in the kernel's accept queue.
    pub connections_max: usize,
    /// Time to receive a request's headers, and the longest a kept-alive connection may
    /// sit idle between requests (hyper starts this clock when it waits for a request).
    pub header_read_timeout: Duration,
    /// Most bytes buffered per connection while reading headers.
    pub header_bytes_max: usize,
    /// How long SIGTERM waits for in-flight requests before closing their connections.
    pub drain_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            // With at most 32 KiB of unfinished headers each (about 64 KiB of memory per
            // connection, measured), 4 096 connections bound that memory near 256 MiB.
            connections_max: 4_096,
            header_read_timeout: Duration::from_secs(10),
            header_bytes_max: 32 * 1024,
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// Serves `app` on `listener` until `shutdown` completes, then lets in-flight requests
/// finish (bounded by `drain_timeout`). HTTP/1.1 through hyper with a header-read (and
/// idle) timeout, a header buffer cap and a connection cap; request bodies are bounded in
/// size, time and total bytes in flight by `http::RawBody`.
pub async fn serve_http(
    listener: TcpListener,
    app: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    limits: HttpLimits,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::server::graceful::GracefulShutdown;
    use hyper_util::service::TowerToHyperService;

    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.header_bytes_max);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.connections_max));
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            () = &mut shutdown => break,
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
        };
        let (tcp, _) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: the listener itself is fine.
                    tracing::warn!(error = %e, "cannot accept a connection; retrying in 50 ms (raise the open-files limit if this repeats)");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Replies are written whole; Nagle would only hold a reply back while an earlier
        // one is unacknowledged.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY on a connection");
        }
        let conn = http.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(app.clone()));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(limits.drain_timeout) => {
            tracing::warn!(timeout = ?limits.drain_timeout, "in-flight requests did not finish in time; closing their connections");
        }
    }
    Ok(())
}

/// What `start_proxies` started: lines to print, and tasks to wait for at shutdown.
struct Extra {
    lines: Vec<String>,
    rls: Option<tokio::task::JoinHandle<Result<(), tally_rls::ServeError>>>,
    logs: Option<tokio::task::JoinHandle<()>>,
}

/// Binds and starts the optional listeners of the proxy integrations (issue 14): Envoy's
/// rate limit service and the access-log readers. They stop with `stop`.
async fn start_proxies(
    cfg: &ServeConfig,
    state: &Arc<AppState>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Extra> {
    let mut extra = Extra {
        lines: Vec::new(),
        rls: None,
        logs: None,
    };
    if let Some(addr) = cfg.rls_listen {
        let l = TcpListener::bind(addr).await.with_context(|| {
            format!("cannot listen on {addr} (--rls-listen): is another process using it?")
        })?;
        let bound = l.local_addr()?;
        let limiter = Arc::new(tally_rls::RateLimiter::new(
            state.node.clone(),
            cfg.rls_instances_max,
            Arc::default(),
        ));
        let _ = state.proxies.rls.set(limiter.metrics().clone());
        let tokens: Vec<String> = [&cfg.admin_token, &cfg.client_token]
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        let mut w = stop.clone();
        extra.rls = Some(tokio::spawn(tally_rls::serve(
            limiter,
            tokens,
            l,
            tally_rls::Limits::default(),
            async move {
                let _ = w.wait_for(|s| *s).await;
            },
        )));
        tracing::info!(%bound, "serving Envoy's rate limit service");
        extra
            .lines
            .push(format!("tally rls listening on grpc://{bound}"));
    }
    let udp = match cfg.log_listen_udp {
        Some(addr) => {
            let s = tokio::net::UdpSocket::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (--log-listen-udp)"))?;
            extra
                .lines
                .push(format!("tally access logs on udp://{}", s.local_addr()?));
            Some(s)
        }
        None => None,
    };
    let tcp = match cfg.log_listen_tcp {
        Some(addr) => {
            let l = TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (--log-listen-tcp)"))?;
            extra
                .lines
                .push(format!("tally access logs on tcp://{}", l.local_addr()?));
            Some(l)
        }
        None => None,
    };
    extra.logs = crate::proxies::access_log::start(state.clone(), udp, tcp, stop);
    Ok(extra)
}

/// Installs the SIGTERM and SIGINT handlers now (call it inside the runtime) and returns
/// a future that completes on the first of them. From this call on neither signal kills
/// the process.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let listen = |kind: SignalKind, name: &'static str| match signal(kind) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for {name}; it stops the node without draining");
            None
        }
    };
    let int = listen(SignalKind::interrupt(), "SIGINT");
    let term = listen(SignalKind::terminate(), "SIGTERM");
    let recv = |s: Option<tokio::signal::unix::Signal>| async move {
        match s {
            Some(mut s) => {
                s.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    async move {
        tokio::select! {
            () = recv(int) => tracing::info!("SIGINT received, shutting down"),
            () = recv(term) => tracing::info!("SIGTERM received, shutting down"),
        }
    }
}

/// The gossip settings a serve config implies; `None` for a single node.
pub fn cluster_config(cfg: &ServeConfig) -> anyhow::Result<Option<ClusterConfig>> {
    let Some(listen) = cfg.gossip_listen else {
        return Ok(None);
    };
    let advertise = match &cfg.gossip_advertise {
        Some(a) => a.parse().with_context(|| {
            format!(
                "--gossip-advertise {a:?} must be ip:port, the address peers reach this node at"
            )
        })?,
        None if listen.ip().is_unspecified() => {
            anyhow::bail!(
                "--gossip-listen {listen} listens on every address: set --gossip-advertise to the ip:port peers should use"
            )
        }
        None => listen,
    };
    let key = match &cfg.cluster_key {
        Some(k) => {
            ClusterKey::new(k.as_bytes()).map_err(|e| anyhow::anyhow!("--cluster-key: {e}"))?
        }
        None => ClusterKey::insecure(),
    };
    Ok(Some(ClusterConfig {
        network: GossipNetwork {
            listen,
            advertise,
            seeds: cfg.seeds.clone(),
            cluster_id: cfg.cluster_id.clone(),
            key,
            interval: Duration::from_millis(cfg.gossip_interval_ms),
            transport: tally_gossip::udp_transport(),
        },
        isolated_unready_after: (cfg.isolated_unready_secs > 0)
            .then(|| Duration::from_secs(cfg.isolated_unready_secs)),
    }))
}
