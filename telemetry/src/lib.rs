//! What both services need to be run and watched, in one place.
//!
//! Layout: [`accept`] (accepting connections with per-peer limits, a
//! handshake timeout, accept back-off, Nagle off, and bounded auxiliary
//! streams); in this file, [`LogFormat`] and [`init_logging`] (human-readable or
//! JSON `tracing` logs on stderr), [`serve_metrics`] (a Prometheus text
//! endpoint at `/metrics`), [`shutdown_signal`] (Ctrl-C or SIGTERM),
//! [`healthcheck`] (a gRPC health probe for container health checks); the
//! serving plumbing both services share: [`reflection`] (server reflection
//! of every service they serve), [`set_health`], and [`run_server`] (a gRPC
//! server closed with a grace for its connections, closing the others).

pub mod accept;

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
            builder.with_ansi(color).fmt_fields(EscapedFields).init()
        }
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
}

/// Text log fields as `key=value`, with every value that is not one plain
/// word quoted and escaped ([`videocall_proto::text::log_value`]), and
/// control and format characters in messages escaped: a user id such as
/// `x caller=victim code=0` cannot pose as fields of its own, nor a value
/// with a newline as a line of its own. (The default formatter writes
/// `%`-values as they are.)
#[derive(Clone, Copy, Debug, Default)]
pub struct EscapedFields;

impl<'writer> tracing_subscriber::fmt::FormatFields<'writer> for EscapedFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        writer: tracing_subscriber::fmt::format::Writer<'writer>,
        fields: R,
    ) -> std::fmt::Result {
        let mut visitor = EscapingVisitor {
            writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct EscapingVisitor<'writer> {
    writer: tracing_subscriber::fmt::format::Writer<'writer>,
    first: bool,
    result: std::fmt::Result,
}

impl EscapingVisitor<'_> {
    fn write(&mut self, name: &str, value: &str) {
        if self.result.is_err() {
            return;
        }
        let sep = if self.first { "" } else { " " };
        self.first = false;
        self.result = if name == "message" {
            write!(self.writer, "{sep}{}", videocall_proto::text::escape(value))
        } else {
            let name = name.strip_prefix("r#").unwrap_or(name);
            write!(
                self.writer,
                "{sep}{name}={}",
                videocall_proto::text::log_value(value)
            )
        };
    }
}

impl tracing::field::Visit for EscapingVisitor<'_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.write(field.name(), value);
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.write(field.name(), &format!("{value:?}"));
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

/// Server reflection of the project's services and `grpc.health.v1`:
/// `.build_v1()` and `.build_v1alpha()` give the two services to add.
pub fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(videocall_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

/// Sets the health of each service in `names` (`""`: the whole server).
pub async fn set_health(
    health: &tonic_health::server::HealthReporter,
    names: &[&str],
    status: tonic_health::ServingStatus,
) {
    for name in names {
        health.set_service_status(*name, status).await;
    }
}

/// How long a server's connections get to finish once it stops listening,
/// before they are dropped: health `Watch` streams (and idle clients) never
/// end on their own.
pub const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs a gRPC server future (one from `serve_with_incoming_shutdown` on
/// `closing`): once `closing` is cancelled, its connections get
/// [`CLOSE_GRACE`], then are dropped. A server that ends or fails cancels
/// `closing`, so the servers of a process stop together.
pub async fn run_server<F>(
    srv: F,
    api: &'static str,
    closing: &tokio_util::sync::CancellationToken,
) -> Result<(), tonic::transport::Error>
where
    F: Future<Output = Result<(), tonic::transport::Error>>,
{
    tokio::pin!(srv);
    let result = tokio::select! {
        r = &mut srv => r,
        () = closing.cancelled() => match tokio::time::timeout(CLOSE_GRACE, srv).await {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!(api, "connections still open after the grace period: dropping them");
                Ok(())
            }
        },
    };
    closing.cancel();
    result
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn text_logs_quote_values_that_could_pose_as_fields_or_lines() {
        let buffer = Buffer::default();
        let out = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .without_time()
            .fmt_fields(EscapedFields)
            .with_writer(move || out.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let peer: Arc<str> = Arc::from(r#"x caller=victim code=0 event="START""#);
            tracing::info!(peer = %peer, code = 7, "call\nevent");
            tracing::info!(user = %"alice", line = %"a\nINFO forged", "plain");
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            lines[0]
                .ends_with(r#"call\nevent peer="x caller=victim code=0 event=\"START\"" code=7"#),
            "{text}"
        );
        assert!(
            lines[1].ends_with(r#"plain user=alice line="a\nINFO forged""#),
            "{text}"
        );
    }
}
