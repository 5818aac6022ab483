//! `accord run`: a node as a long-running service, from its configuration file.
//!
//! Joins the node (capture, apply, replication loop) to QUIC with the configured certificates,
//! serves metrics/status and the review page, and stops gracefully on SIGINT or SIGTERM.

use std::net::SocketAddr;

use accord_transport::{EndpointConfig, PeerAddr, TlsIdentity};
use anyhow::{bail, Context, Result};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{resolve, ServiceConfig};
use crate::node::quic::quic_port;
use crate::node::runtime::{self, NodeConfig, NodeStatus};
use crate::review_page::{self, ReviewPage};
use crate::status;

/// Runs the node until SIGINT or SIGTERM.
pub async fn run(config: ServiceConfig) -> Result<()> {
    run_until(config, shutdown_signal()).await
}

/// Runs the node until `stop` completes (a signal, in the service; a test's trigger).
pub async fn run_until(config: ServiceConfig, stop: impl std::future::Future<Output = ()>) -> Result<()> {
    check_key_permissions(&config.tls.key);
    let tls = TlsIdentity::load(&config.tls.ca, &config.tls.cert, &config.tls.key)
        .with_context(|| format!("cannot load the certificates named in [tls] ({})", tls_files(&config)))?;
    if tls.node() != config.node {
        bail!(
            "tls.cert ({}) is node {}'s certificate, but this is node {} (node_id)",
            config.tls.cert.display(),
            tls.node(),
            config.node
        );
    }
    let mut peers = Vec::new();
    for peer in &config.peers {
        let addr = resolve(peer).map_err(anyhow::Error::msg)?;
        peers.push(PeerAddr { node: peer.id, addr });
    }
    // Bind the HTTP addresses before starting the node, so that a taken port is an error at start,
    // not a node that runs without the metrics or review page its operator expects.
    let metrics = match config.metrics {
        Some(addr) => Some(bind(addr, "metrics.listen").await?),
        None => None,
    };
    let review = match &config.review_page {
        Some(page) => Some((bind(page.listen, "review_page.listen").await?, page.token.clone())),
        None => None,
    };

    let node_config = NodeConfig {
        node: config.node,
        dsn: config.dsn.clone(),
        cluster: config.cluster.clone(),
        peers: config.peers.iter().map(|p| p.id).collect(),
        addresses: config
            .peers
            .iter()
            .map(|p| (p.id, p.address.clone()))
            .chain(config.address.clone().map(|a| (config.node, a)))
            .collect(),
        replication: config.replication,
        synchronous_commit: config.synchronous_commit,
        spool: config.spool.clone(),
    };
    let listen = config.listen;
    let handle = runtime::start(node_config, move |identity, hello| async move {
        let endpoint = EndpointConfig::new(identity, listen, peers, tls);
        quic_port(endpoint, hello).map(|(port, _)| port)
    })
    .await
    .context("the node cannot start")?;
    tracing::info!(node = %config.node, %listen, peers = config.peers.len(), "node started");

    let mut servers = Vec::new();
    if let Some(listener) = metrics {
        let addr = local_addr(&listener);
        let app = Router::new()
            .route("/metrics", get(metrics_handler))
            .route("/status", get(status_handler))
            .with_state(handle.status.clone())
            .merge(
                Router::new()
                    .route("/verify", post(verify_handler))
                    .route("/repair", post(repair_handler))
                    .with_state(handle.verify.clone()),
            );
        servers.push(tokio::spawn(serve(listener, app, "metrics")));
        tracing::info!(%addr, "serving /metrics and /status");
    }
    if let Some((listener, token)) = review {
        let addr = local_addr(&listener);
        let app = review_page::router(ReviewPage {
            dsn: config.dsn.clone(),
            token,
        });
        servers.push(tokio::spawn(serve(listener, app, "review page")));
        tracing::info!(%addr, "serving the review page");
    }

    let result = handle.run_until(stop).await;
    for server in servers {
        server.abort();
    }
    match &result {
        Ok(()) => tracing::info!("node stopped"),
        Err(error) => tracing::error!(error = error_chain(error), "node failed"),
    }
    result
}

fn tls_files(config: &ServiceConfig) -> String {
    format!(
        "tls.ca {}, tls.cert {}, tls.key {}",
        config.tls.ca.display(),
        config.tls.cert.display(),
        config.tls.key.display()
    )
}

/// An error and its causes on one line, like `{:#}`, but a cause whose text its wrapper already
/// ends with (an error that prints its source, and also returns it as its source) is not repeated.
pub fn error_chain(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

async fn bind(addr: SocketAddr, key: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} ({key})"))
}

fn local_addr(listener: &TcpListener) -> String {
    listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into())
}

async fn serve(listener: TcpListener, app: Router, what: &'static str) {
    if let Err(error) = axum::serve(listener, app).await {
        tracing::error!(%error, "the {what} server stopped");
    }
}

type Status = watch::Receiver<NodeStatus>;

async fn metrics_handler(State(status): State<Status>) -> Response {
    let snapshot = status.borrow().clone();
    match status::prometheus_text(&snapshot) {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{error:#}")).into_response(),
    }
}

/// `accord verify`: compares the nodes, coordinated by this one (read-only).
async fn verify_handler(
    State(hub): State<crate::node::verify::VerifyHub>,
    axum::Json(request): axum::Json<crate::verify_command::VerifyRequest>,
) -> Response {
    match hub.verify(request.tables).await {
        Ok(report) => axum::Json(report).into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error_chain(&error)).into_response(),
    }
}

/// `accord repair`: verifies, repairs what differs, verifies again, coordinated by this node.
async fn repair_handler(
    State(hub): State<crate::node::verify::VerifyHub>,
    axum::Json(request): axum::Json<crate::verify_command::VerifyRequest>,
) -> Response {
    match hub.repair(request.tables).await {
        Ok(report) => axum::Json(report).into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error_chain(&error)).into_response(),
    }
}

async fn status_handler(State(status): State<Status>) -> axum::Json<NodeStatus> {
    axum::Json(status.borrow().clone())
}

/// SIGINT (Ctrl-C) or SIGTERM (service managers, `kill`).
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT: stopping"),
        () = term => tracing::info!("SIGTERM: stopping"),
    }
}

/// A key others can read is worth a warning, not a refusal: the operator may have reasons (a
/// group-readable secret mount), but should know.
fn check_key_permissions(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "the node's key file is readable by others than its owner; chmod 600 it");
        }
    }
}
