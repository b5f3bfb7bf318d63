//! Configuration: command-line flags, each with an environment variable
//! fallback (flags win).

use std::net::SocketAddr;
use std::time::Duration;

use crate::business::FailurePolicy;

/// The call service's settings.
#[derive(Clone, Debug, clap::Args)]
pub struct Config {
    /// Where clients connect (the CallService API).
    #[arg(
        long,
        env = "CALL_SERVICE_CLIENT_ADDR",
        default_value = "127.0.0.1:50051"
    )]
    pub client_addr: SocketAddr,

    /// Where the business service and operators connect (the CallAdmin API).
    /// Keep it off the public network.
    #[arg(
        long,
        env = "CALL_SERVICE_ADMIN_ADDR",
        default_value = "127.0.0.1:50052"
    )]
    pub admin_addr: SocketAddr,

    /// The business service's BusinessHook endpoint, e.g.
    /// http://127.0.0.1:50061. Unset: every call is allowed and no events are
    /// reported.
    #[arg(long, env = "CALL_SERVICE_BUSINESS_URL")]
    pub business_url: Option<String>,

    /// The longest wait for the business service's approval of a REQUEST.
    #[arg(long, env = "CALL_SERVICE_APPROVAL_DEADLINE", default_value = "2s", value_parser = humantime::parse_duration)]
    pub approval_deadline: Duration,

    /// What a timed-out or failed approval means: refuse (REPLY 100201) or
    /// allow.
    #[arg(
        long,
        env = "CALL_SERVICE_APPROVAL_FAILURE_POLICY",
        value_enum,
        default_value = "refuse"
    )]
    pub approval_failure_policy: FailurePolicy,

    /// How long a call rings before the caller gets REPLY 100105.
    #[arg(long, env = "CALL_SERVICE_RING_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub ring_timeout: Duration,

    /// DEVELOPMENT ONLY: trust the x-videocall-user metadata as the client's
    /// identity, so anybody can act as anybody.
    #[arg(long, env = "CALL_SERVICE_DEV_IDENTITY")]
    pub dev_identity: bool,

    /// Where Prometheus scrapes `/metrics` (HTTP).
    #[arg(
        long,
        env = "CALL_SERVICE_METRICS_ADDR",
        default_value = "127.0.0.1:9151"
    )]
    pub metrics_addr: SocketAddr,

    /// Serve no metrics.
    #[arg(long, env = "CALL_SERVICE_NO_METRICS")]
    pub no_metrics: bool,

    /// On shutdown, how long to keep serving while health reports
    /// NOT_SERVING (so load balancers stop sending new clients) before
    /// closing the listeners.
    #[arg(long, env = "CALL_SERVICE_DRAIN_TIME", default_value = "0s", value_parser = humantime::parse_duration)]
    pub drain_time: Duration,

    /// Log format on stderr.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: videocall_telemetry::LogFormat,
}

impl Config {
    /// Settings for tests and embedding: the defaults, with development
    /// identities on and the given business service.
    pub fn for_tests(business_url: Option<String>) -> Self {
        Self {
            client_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            business_url,
            approval_deadline: Duration::from_secs(2),
            approval_failure_policy: FailurePolicy::Refuse,
            ring_timeout: Duration::from_secs(30),
            dev_identity: true,
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            no_metrics: true,
            drain_time: Duration::ZERO,
            log_format: videocall_telemetry::LogFormat::Text,
        }
    }
}
