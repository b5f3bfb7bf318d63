//! Configuration: command-line flags, each with an environment variable
//! fallback (flags win).

use std::net::SocketAddr;
use std::time::Duration;

use std::path::PathBuf;

use crate::business::FailurePolicy;
use crate::defaults;

/// Limits that protect the service and its users from each other. Going
/// over one affects only whoever went over it.
#[derive(Clone, Debug, clap::Args)]
pub struct Limits {
    /// The largest gRPC message a client or admin may send (bytes). A larger
    /// one ends that stream with OUT_OF_RANGE.
    #[arg(long, env = "CALL_SERVICE_MAX_MESSAGE_BYTES", default_value_t = defaults::MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,

    /// Devices one user may connect at once; one more is refused with
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "CALL_SERVICE_MAX_DEVICES_PER_USER", default_value_t = defaults::MAX_DEVICES_PER_USER)]
    pub max_devices_per_user: usize,

    /// Connected devices (`Session` streams, over however many HTTP/2
    /// connections) this node holds; one more is refused with
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "CALL_SERVICE_MAX_CONNECTIONS", default_value_t = defaults::MAX_CONNECTIONS)]
    pub max_connections: usize,

    /// Controls per second one device (one `Session` stream, whether it has
    /// a connection of its own or shares one) may send (sustained); beyond
    /// it (and the burst) a control is answered RATE_LIMITED (100204) and
    /// the stream stays.
    #[arg(long, env = "CALL_SERVICE_CONTROLS_PER_SECOND", default_value_t = defaults::CONTROLS_PER_SECOND)]
    pub controls_per_second: u32,

    /// Controls one device may send at once before the rate applies.
    #[arg(long, env = "CALL_SERVICE_CONTROL_BURST", default_value_t = defaults::CONTROL_BURST)]
    pub control_burst: u32,

    /// Approvals waiting for the business service at once; a REQUEST beyond
    /// it is answered OVERLOADED (100207).
    #[arg(
        long,
        env = "CALL_SERVICE_MAX_PENDING_APPROVALS",
        default_value_t = defaults::MAX_PENDING_APPROVALS
    )]
    pub max_pending_approvals: usize,

    /// HTTP/2 keepalive ping interval on idle connections; a peer that does
    /// not answer within --keepalive-timeout is dropped.
    #[arg(long, env = "CALL_SERVICE_KEEPALIVE_INTERVAL", default_value = defaults::KEEPALIVE_INTERVAL, value_parser = humantime::parse_duration)]
    pub keepalive_interval: Duration,

    /// How long a device whose stream broke is kept for it to resume (its
    /// calls go on meanwhile); 0 ends its calls at once (100106).
    #[arg(long, env = "CALL_SERVICE_RESUME_GRACE", default_value = defaults::RESUME_GRACE, value_parser = humantime::parse_duration)]
    pub resume_grace: Duration,

    /// How long to wait for a keepalive answer.
    #[arg(long, env = "CALL_SERVICE_KEEPALIVE_TIMEOUT", default_value = defaults::KEEPALIVE_TIMEOUT, value_parser = humantime::parse_duration)]
    pub keepalive_timeout: Duration,

    /// Notices of one caller's calls that may wait for the business service;
    /// with that many waiting, the caller's next REQUEST is answered
    /// OVERLOADED (100207) until they drain. Keeps one caller's flood from
    /// getting other callers' notices dropped.
    #[arg(
        long,
        env = "CALL_SERVICE_MAX_NOTICES_PER_CALLER",
        default_value_t = defaults::MAX_NOTICES_PER_CALLER
    )]
    pub max_notices_per_caller: usize,

    /// Notices that may wait for the business service, in all (spread over
    /// its 8 delivery lanes); beyond, the newest is dropped and counted.
    #[arg(long, env = "CALL_SERVICE_NOTICE_QUEUE", default_value_t = defaults::NOTICE_QUEUE)]
    pub notice_queue: usize,

    /// Connections one IP address may hold open (on each listener); one
    /// more is closed at once. Behind a proxy every client shares its
    /// address: raise it there.
    #[arg(
        long,
        env = "CALL_SERVICE_MAX_CONNECTIONS_PER_PEER",
        default_value_t = defaults::MAX_CONNECTIONS_PER_PEER
    )]
    pub max_connections_per_peer: usize,

    /// How long a new connection has to send its first bytes (the HTTP/2
    /// preface; with TLS, to finish the TLS handshake) before it is closed.
    #[arg(long, env = "CALL_SERVICE_HANDSHAKE_TIMEOUT", default_value = defaults::HANDSHAKE_TIMEOUT, value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,

    /// Concurrent HTTP/2 streams on one connection (devices sharing it
    /// through a proxy count one each); beyond, the stream is refused.
    #[arg(
        long,
        env = "CALL_SERVICE_MAX_STREAMS_PER_CONNECTION",
        default_value_t = defaults::MAX_STREAMS_PER_CONNECTION
    )]
    pub max_streams_per_connection: u32,

    /// Health and reflection streams open at once, in all (they need no
    /// credential); beyond, RESOURCE_EXHAUSTED.
    #[arg(long, env = "CALL_SERVICE_MAX_AUX_STREAMS", default_value_t = defaults::MAX_AUX_STREAMS)]
    pub max_aux_streams: usize,

    /// Health and reflection streams one IP address may have open at once.
    #[arg(
        long,
        env = "CALL_SERVICE_MAX_AUX_STREAMS_PER_PEER",
        default_value_t = defaults::MAX_AUX_STREAMS_PER_PEER
    )]
    pub max_aux_streams_per_peer: usize,
}

impl Default for Limits {
    fn default() -> Self {
        use defaults::duration;
        Self {
            max_message_bytes: defaults::MAX_MESSAGE_BYTES,
            max_devices_per_user: defaults::MAX_DEVICES_PER_USER,
            max_connections: defaults::MAX_CONNECTIONS,
            controls_per_second: defaults::CONTROLS_PER_SECOND,
            control_burst: defaults::CONTROL_BURST,
            max_pending_approvals: defaults::MAX_PENDING_APPROVALS,
            resume_grace: duration(defaults::RESUME_GRACE),
            keepalive_interval: duration(defaults::KEEPALIVE_INTERVAL),
            keepalive_timeout: duration(defaults::KEEPALIVE_TIMEOUT),
            max_notices_per_caller: defaults::MAX_NOTICES_PER_CALLER,
            notice_queue: defaults::NOTICE_QUEUE,
            max_connections_per_peer: defaults::MAX_CONNECTIONS_PER_PEER,
            handshake_timeout: duration(defaults::HANDSHAKE_TIMEOUT),
            max_streams_per_connection: defaults::MAX_STREAMS_PER_CONNECTION,
            max_aux_streams: defaults::MAX_AUX_STREAMS,
            max_aux_streams_per_peer: defaults::MAX_AUX_STREAMS_PER_PEER,
        }
    }
}

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
    #[arg(long, env = "CALL_SERVICE_APPROVAL_DEADLINE", default_value = defaults::APPROVAL_DEADLINE, value_parser = humantime::parse_duration)]
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

    /// How long a notice may wait for others to go with it in one
    /// `OnCallEvents` request. Notices never hold up a call; a short wait
    /// turns many small requests into a few larger ones under load. 0: send
    /// at once.
    #[arg(long, env = "CALL_SERVICE_NOTICE_LINGER", default_value = defaults::NOTICE_LINGER, value_parser = humantime::parse_duration)]
    pub notice_linger: Duration,

    /// How long a call rings before the caller gets REPLY 100105.
    #[arg(long, env = "CALL_SERVICE_RING_TIMEOUT", default_value = defaults::RING_TIMEOUT, value_parser = humantime::parse_duration)]
    pub ring_timeout: Duration,

    /// DEVELOPMENT ONLY: trust the x-videocall-user metadata as the client's
    /// identity, so anybody can act as anybody. Not with --jwt-*.
    #[arg(long, env = "CALL_SERVICE_DEV_IDENTITY")]
    pub dev_identity: bool,

    /// Verify client tokens (JWT, HS256) with this shared secret (32 bytes
    /// or more).
    #[arg(long, env = "CALL_SERVICE_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// Verify client tokens (JWT, RS256 or ES256) with this PEM public key;
    /// the business backend keeps the private key.
    #[arg(
        long,
        env = "CALL_SERVICE_JWT_PUBLIC_KEY",
        conflicts_with = "jwt_secret"
    )]
    pub jwt_public_key: Option<PathBuf>,

    /// Tolerated clock difference when checking a token's exp and nbf.
    #[arg(long, env = "CALL_SERVICE_JWT_LEEWAY", default_value = defaults::JWT_LEEWAY, value_parser = humantime::parse_duration)]
    pub jwt_leeway: Duration,

    /// How long before a stream's token expires the server asks the client
    /// for a new one (`RefreshDue`); a token with less time left is asked
    /// about at once.
    #[arg(long, env = "CALL_SERVICE_REFRESH_AHEAD", default_value = defaults::REFRESH_AHEAD, value_parser = humantime::parse_duration)]
    pub refresh_ahead: Duration,

    /// The admin API's own credential: requests must carry
    /// `authorization: Bearer <this>`. Without it (and without
    /// --admin-client-ca) the admin API is served on a loopback address only.
    #[arg(long, env = "CALL_SERVICE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// TLS certificate chain (PEM) for both listeners; with --tls-key.
    #[arg(long, env = "CALL_SERVICE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// TLS private key (PEM) for both listeners; with --tls-cert.
    #[arg(long, env = "CALL_SERVICE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Mutual TLS on the admin listener: admin clients must present a
    /// certificate signed by this CA (PEM). Needs --tls-cert.
    #[arg(long, env = "CALL_SERVICE_ADMIN_CLIENT_CA", requires = "tls_cert")]
    pub admin_client_ca: Option<PathBuf>,

    #[command(flatten)]
    pub limits: Limits,

    /// Join a cluster of call-service nodes sharing their call state in
    /// this Redis (`redis://host:port/`). Unset: a single node, with its
    /// state in memory.
    #[arg(long, env = "CALL_SERVICE_REDIS_URL")]
    pub redis_url: Option<String>,

    /// The prefix of the cluster's keys in Redis (clusters may share one).
    #[arg(long, env = "CALL_SERVICE_REDIS_PREFIX", default_value = defaults::REDIS_PREFIX)]
    pub redis_prefix: String,

    /// How long a node's lease lasts without renewal (renewed every third
    /// of it); the devices of a node silent for longer are detached by the
    /// others, for their clients to resume elsewhere.
    #[arg(long, env = "CALL_SERVICE_NODE_LEASE", default_value = defaults::NODE_LEASE, value_parser = humantime::parse_duration)]
    pub node_lease: Duration,

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

    /// Serve browsers here (HTTP): the client session over a WebSocket at
    /// `/v1/session` and the web phone at `/`. Unset: no browser edge.
    #[arg(long, env = "CALL_SERVICE_WEB_ADDR")]
    pub web_addr: Option<SocketAddr>,

    /// Origins (`scheme://host[:port]`, comma-separated; `*` for any) whose
    /// pages may open a web session, besides the web address itself.
    #[arg(long, env = "CALL_SERVICE_WEB_ORIGINS", value_delimiter = ',')]
    pub web_origins: Vec<String>,

    /// On shutdown, how long to keep serving while health reports
    /// NOT_SERVING (so load balancers stop sending new clients) before
    /// closing the listeners.
    #[arg(long, env = "CALL_SERVICE_DRAIN_TIME", default_value = defaults::DRAIN_TIME, value_parser = humantime::parse_duration)]
    pub drain_time: Duration,

    /// On shutdown, after every call has ended, how long the notices still
    /// queued (the calls' last events among them) may take to reach the
    /// business service; what is left then is dropped, and logged.
    #[arg(long, env = "CALL_SERVICE_NOTICE_DRAIN", default_value = defaults::NOTICE_DRAIN, value_parser = humantime::parse_duration)]
    pub notice_drain: Duration,

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
            approval_deadline: defaults::duration(defaults::APPROVAL_DEADLINE),
            approval_failure_policy: FailurePolicy::Refuse,
            notice_linger: defaults::duration(defaults::NOTICE_LINGER),
            ring_timeout: defaults::duration(defaults::RING_TIMEOUT),
            dev_identity: true,
            jwt_secret: None,
            jwt_public_key: None,
            jwt_leeway: defaults::duration(defaults::JWT_LEEWAY),
            refresh_ahead: defaults::duration(defaults::REFRESH_AHEAD),
            admin_token: None,
            tls_cert: None,
            tls_key: None,
            admin_client_ca: None,
            // Tests that want a resume window set one.
            limits: Limits {
                resume_grace: Duration::ZERO,
                ..Limits::default()
            },
            redis_url: None,
            redis_prefix: defaults::REDIS_PREFIX.to_owned(),
            node_lease: defaults::duration(defaults::NODE_LEASE),
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            no_metrics: true,
            web_addr: None,
            web_origins: Vec::new(),
            drain_time: Duration::ZERO,
            notice_drain: defaults::duration(defaults::NOTICE_DRAIN),
            log_format: videocall_telemetry::LogFormat::Text,
        }
    }
}
