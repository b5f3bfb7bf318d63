//! What both services need to be run and watched, in one place.
//!
//! Layout (one file): [`LogFormat`] and [`init_logging`] (human-readable or
//! JSON `tracing` logs on stderr), [`serve_metrics`] (a Prometheus text
//! endpoint at `/metrics`), [`shutdown_signal`] (Ctrl-C or SIGTERM),
//! [`healthcheck`] (a gRPC health probe for container health checks).

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

/// How logs are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// For people: one line per event, coloured on a terminal unless NO_COLOR is set.
    #[default]
    Text,
    /// For log pipelines: one JSON object per line.
    Json,
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => {
            let color = std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
            builder.with_ansi(color).init()
        }
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
}

/// Something that refreshes scrape-time values (gauges read from elsewhere)
/// before the registry is encoded.
pub trait Refresh: Send + Sync + 'static {
    fn refresh(&self) -> impl Future<Output = ()> + Send;
}

/// Serves `registry` as Prometheus text at `GET /metrics` on `listener`
/// until `shutdown` resolves. `refresh` runs before each scrape.
pub async fn serve_metrics<R: Refresh>(
    listener: TcpListener,
    registry: Arc<Registry>,
    refresh: R,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let refresh = Arc::new(refresh);
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            let refresh = refresh.clone();
            async move {
                refresh.refresh().await;
                let mut body = String::new();
                match prometheus_client::encoding::text::encode(&mut body, &registry) {
                    Ok(()) => (
                        [(
                            CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        body,
                    )
                        .into_response(),
                    Err(e) => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
                        .into_response(),
                }
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Resolves on Ctrl-C or SIGTERM.
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
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

/// Asks the gRPC health service at `url` about the whole server (`""`):
/// `Ok` if SERVING, an error saying what it is otherwise.
pub async fn healthcheck(url: &str, timeout: std::time::Duration) -> Result<(), HealthcheckError> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .map_err(|e| HealthcheckError(format!("{url}: {e}")))?
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect()
        .await
        .map_err(|e| HealthcheckError(format!("{url}: {e}")))?;
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map_err(|e| HealthcheckError(format!("{url}: {}", e.message())))?
        .into_inner()
        .status;
    match ServingStatus::try_from(status) {
        Ok(ServingStatus::Serving) => Ok(()),
        Ok(other) => Err(HealthcheckError(format!("{url}: {}", other.as_str_name()))),
        Err(_) => Err(HealthcheckError(format!("{url}: unknown status {status}"))),
    }
}

/// The health probe's answer was not SERVING.
#[derive(Debug)]
pub struct HealthcheckError(String);

impl std::fmt::Display for HealthcheckError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "not healthy: {}", self.0)
    }
}

impl std::error::Error for HealthcheckError {}
