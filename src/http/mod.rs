//! The local HTTP endpoint: liveness and readiness probes, metrics, and the Kubernetes-style
//! API in [`kube`] and [`write`].
//!
//! The listener is bound before anything else starts, so a port that is taken stops start-up
//! with the address in the error; it serves once the other parts exist and stops with the other
//! tasks, on the same stop signal.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{FromRef, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio::sync::watch as flag;

use crate::ops::api_write::ApiWrites;
use crate::readiness::Readiness;
use crate::shutdown::Shutdown;
use crate::store::Store;
use crate::watchdog::BrokerServing;
use exporter::Exporter;

pub mod accept;
pub mod auth;
pub mod caps;
pub mod discovery;
pub mod exporter;
pub mod host;
pub mod kinds;
pub mod kube;
pub mod list_page;
pub mod openapi;
pub mod scope;
pub mod selector;
pub mod server;
pub mod settings;
pub mod table;
pub mod target;
pub mod versions;
pub mod watch;
pub mod write;

/// Content type of the OpenMetrics text that [`Exporter::render`] writes.
const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen for HTTP on {addr} (http.listen): {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// What the endpoint serves from, given at construction.
pub struct Context {
    /// Read by the Kubernetes-style API and the readiness probe.
    pub store: Store,
    /// `/metrics`.
    pub exporter: Exporter,
    /// Whether MetaManager's link to the broker is up, for the readiness probe.
    pub broker_connected: flag::Receiver<bool>,
    /// Whether the embedded broker accepts clients, for both probes.
    pub serving: BrokerServing,
    /// Whether a new client can connect now, for the readiness probe.
    pub readiness: Arc<Readiness>,
    /// Who may use the API.
    pub auth: Arc<auth::Auth>,
    /// What the API's writes are carried out with.
    pub writes: ApiWrites,
}

/// The endpoint's bounds, from the `http` config keys (see docs/limits.md).
#[derive(Debug, Clone)]
pub struct Limits {
    pub connections: server::ConnectionLimits,
    /// API requests in progress at once (watches not counted), at most.
    pub max_requests: usize,
    /// Watches open at once, at most.
    pub max_watches: usize,
    /// Names a loopback listener answers besides the loopback ones.
    pub allowed_hosts: Vec<String>,
}

/// What handlers share: the context, the caps, and the stop flag that ends open watches on
/// shutdown (graceful shutdown waits for every connection, and a watch would otherwise never
/// end).
#[derive(Clone)]
pub struct HttpState {
    pub ctx: Arc<Context>,
    pub caps: caps::Caps,
    pub stop: Shutdown,
}

impl FromRef<HttpState> for Arc<Context> {
    fn from_ref(state: &HttpState) -> Self {
        state.ctx.clone()
    }
}

impl FromRef<HttpState> for Store {
    fn from_ref(state: &HttpState) -> Self {
        state.ctx.store.clone()
    }
}

/// A bound listener, not yet serving.
pub struct Listener {
    listener: TcpListener,
}

impl Listener {
    pub async fn bind(addr: SocketAddr) -> Result<Self, HttpError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| HttpError::Bind { addr, source })?;
        Ok(Self { listener })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until shutdown; requests in progress finish, open watches end.
    pub async fn serve(
        self,
        ctx: Context,
        limits: Limits,
        tls: Option<tokio_rustls::TlsAcceptor>,
        stop: Shutdown,
    ) {
        let addr = self.local_addr();
        tracing::info!(
            addr = addr.map(tracing::field::display),
            "HTTP endpoint listening"
        );
        let who = ctx.auth.clone();
        let state = HttpState {
            ctx: Arc::new(ctx),
            caps: caps::Caps::new(limits.max_requests, limits.max_watches),
            stop: stop.clone(),
        };
        let mut app = router(state).layer(axum::middleware::from_fn_with_state(who, auth::check));
        if addr.is_some_and(|a| a.ip().is_loopback()) {
            let allowed = host::AllowedHosts::new(&limits.allowed_hosts);
            app = app.layer(axum::middleware::from_fn_with_state(
                allowed,
                host::check_host,
            ));
        }
        server::serve(self.listener, app, limits.connections, tls, stop).await;
    }
}

/// Every route the endpoint serves.
pub fn router(state: HttpState) -> Router {
    let caps = state.caps.clone();
    // Write bodies are checked against the message size in `write`; this only keeps axum's own
    // cap from refusing them first, without a Status.
    let body_limit = axum::extract::DefaultBodyLimit::max(state.ctx.writes.max_payload());
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi/v2", get(no_openapi))
        .route("/openapi/v3", get(openapi::index))
        .route("/openapi/v3/*document", get(openapi::document))
        .merge(kube::routes())
        .layer(body_limit)
        .layer(axum::middleware::from_fn(write::log_refusals))
        .layer(axum::middleware::from_fn_with_state(
            caps,
            caps::limit_requests,
        ))
        .with_state(state)
}

/// Alive while the process answers and, with the embedded broker, while that broker accepts
/// new connections (its watchdog's last check): a node whose broker stopped serving is not
/// alive for edged and edgehub, whatever MetaManager's own connections say.
async fn healthz(State(ctx): State<Arc<Context>>) -> Response {
    if ctx.serving.get() {
        "ok".into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "embedded broker is not accepting connections",
        )
            .into_response()
    }
}

/// Ready when the store takes writes (open, and not full: see [`crate::store::space`]),
/// MetaManager's broker connections are up, and a new client can connect to the broker
/// (checked with a fresh connection, see [`Readiness`]): without all of them, no message can be
/// handled or no peer can reach the node.
async fn readyz(State(ctx): State<Arc<Context>>) -> Response {
    let (store, store_word) = match (ctx.store.is_open(), ctx.store.space().full()) {
        (false, _) => (false, "closed".to_owned()),
        (true, Some(full)) => (false, full.to_string()),
        (true, None) => (true, "ok".to_owned()),
    };
    let broker = *ctx.broker_connected.borrow();
    let serving = ctx.serving.get();
    let fresh = ctx.readiness.fresh_connection().await;
    let body = serde_json::json!({
        "store": store_word,
        "broker": if !serving { "not serving" } else if broker { "connected" } else { "disconnected" },
        "new_connection": match &fresh {
            Ok(()) => "ok".to_owned(),
            Err(e) => e.clone(),
        },
    });
    let code = if store && broker && serving && fresh.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

/// No OpenAPI v2 document (see [`openapi`]): a 404 whatever the client accepts (kubectl asks
/// for protobuf there).
async fn no_openapi() -> scope::ApiError {
    scope::ApiError::NoRoute
}

async fn metrics(State(ctx): State<Arc<Context>>) -> Response {
    (
        [(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)],
        ctx.exporter.render().await,
    )
        .into_response()
}
