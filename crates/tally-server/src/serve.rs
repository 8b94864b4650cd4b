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
    });
    {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
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
        .with_graceful_shutdown(shutdown)
        .await
        .context("the HTTP server failed")?;
    tracing::info!("draining: committing queued writes");
    node.shutdown().await;
    tracing::info!("stopped cleanly");
    Ok(())
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
