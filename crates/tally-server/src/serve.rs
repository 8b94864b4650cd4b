//! `tally serve`: opens the node, binds the listener, serves API.md until SIGTERM/SIGINT,
//! then drains in-flight requests, commits and exits 0.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::serve::ListenerExt as _;
use tally_node::{ClusterConfig, ClusterKey, Node, NodeConfig};
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
    rt.block_on(async move {
        let listener = TcpListener::bind(cfg.listen).await.with_context(|| {
            format!(
                "cannot listen on {}: is another process using it?",
                cfg.listen
            )
        })?;
        serve(cfg, listener, shutdown_signal()).await
    })
}

/// The node config a serve config implies.
pub fn node_config(cfg: &ServeConfig) -> NodeConfig {
    let mut n = NodeConfig::new(&cfg.data_dir);
    n.node_id = cfg.node_id.clone();
    n.dedup_window_ms = cfg.dedup_window_secs as i64 * 1000;
    n.batch_records_max = cfg.batch_records_max;
    n.queue_records_max = cfg.queue_records_max;
    n.queue_wait = Duration::from_millis(cfg.queue_wait_ms);
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
        let gossip_listen = cluster.listen;
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
    // Replies are written whole; Nagle would only hold a reply back while an earlier one
    // is unacknowledged.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY on a connection");
        }
    });
    axum::serve(listener, router(state))
        .with_graceful_shutdown(stopped(stop_rx))
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

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the node");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received, shutting down"),
        () = term => tracing::info!("SIGTERM received, shutting down"),
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
        listen,
        advertise,
        seeds: cfg.seeds.clone(),
        cluster_id: cfg.cluster_id.clone(),
        key,
        interval: Duration::from_millis(cfg.gossip_interval_ms),
        transport: tally_gossip::udp_transport(),
        isolated_unready_after: (cfg.isolated_unready_secs > 0)
            .then(|| Duration::from_secs(cfg.isolated_unready_secs)),
    }))
}
