//! Wiring: the switchboard, the business hook, both gRPC servers (with
//! health and reflection) and the metrics endpoint, on listeners the caller
//! has already bound, until a shutdown future resolves.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::{info, warn};
use videocall_proto::v1::call_admin_server::{self, CallAdminServer};
use videocall_proto::v1::call_service_server::{self, CallServiceServer};

use crate::api::{AdminApi, ClientApi};
use crate::auth::{AdminGuard, Authenticator, JwtVerifier};
use crate::business::{Business, BusinessConfig, BusinessUrlError, Clock};
use crate::cluster::{ClusterConfig, ClusterSwitchboard};
use crate::config::{Config, Limits};
use crate::domain::{CallId, ConnId, Control, ForceFinish, Outcome, UserId};
use crate::machine::MachineConfig;
use crate::machine::{CallSummary, UserSummary};
use crate::metrics::{Metrics, PhaseLabel};
use crate::switchboard::{
    Attached, ConnectError, LocalSwitchboard, ShuttingDown, Stats, Switchboard, SwitchboardLimits,
    Unavailable,
};
use videocall_telemetry::accept::{AcceptLimits, AuxLimit, incoming};

/// Why the service stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    BusinessUrl(#[from] BusinessUrlError),
    #[error("the {api} server failed: {source}")]
    Transport {
        api: &'static str,
        source: tonic::transport::Error,
    },
    #[error("the metrics server failed: {0}")]
    Metrics(#[source] std::io::Error),
    #[error("the web server failed: {0}")]
    Web(#[source] std::io::Error),
    #[error("server reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("could not join the cluster in redis: {0}")]
    Cluster(#[from] crate::shared::SharedError),
}

/// The listeners the service runs on, bound by the caller.
#[derive(Debug)]
pub struct Listeners {
    /// The client API (`CallService`).
    pub client: TcpListener,
    /// The admin API (`CallAdmin`).
    pub admin: TcpListener,
    /// Prometheus `/metrics`, if wanted.
    pub metrics: Option<TcpListener>,
    /// The browser edge (WebSocket session and web phone), if wanted.
    pub web: Option<TcpListener>,
}

/// Runs the call service until `shutdown` resolves. Health: `""`,
/// `videocall.v1.CallService` and `videocall.v1.CallAdmin` are SERVING while
/// it runs; on shutdown they turn NOT_SERVING, the service keeps serving for
/// `drain_time`, then stops accepting, ends every device stream and returns
/// once every task it started has ended. The call service has no dependency
/// whose loss makes it NOT_SERVING: without the business service, calls are
/// still answered (by the failure policy) and notices wait in their lanes.
pub async fn serve(
    listeners: Listeners,
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let tasks = TaskTracker::new();
    let token = CancellationToken::new();
    let clock = Clock::now();
    let metrics = Metrics::default();

    // The notice lanes outlive `token`: they deliver the calls' last events
    // after the switchboard has ended them, until `lanes_stop`.
    let lanes_stop = CancellationToken::new();
    let business = start_business(&config, clock, &metrics, &tasks, &lanes_stop)?;
    let lanes = business.clone();
    let admin_addr = listeners
        .admin
        .local_addr()
        .map_err(|e| ServeError::Config(format!("the admin listener: {e}")))?;
    check(&config, admin_addr)?;
    let auth = authenticator(&config)?;
    log_access(&auth, &config);
    let admin_credential = AdminGuard::new(config.admin_token.as_deref());
    let tls = tls(&config)?;
    let limits = &config.limits;
    let switchboard =
        start_switchboard(&config, clock, business.as_ref(), &metrics, &tasks, &token).await?;

    let (health, health_service) = tonic_health::server::health_reporter();
    let aux = AuxLimit::new(
        limits.max_aux_streams,
        limits.max_aux_streams_per_peer,
        metrics.connections_refused.clone(),
    );
    let accept = AcceptLimits {
        max_connections_per_peer: limits.max_connections_per_peer,
        handshake_timeout: limits.handshake_timeout,
    };
    set_health(&health, ServingStatus::Serving).await;
    if let Board::Cluster(c) = &switchboard {
        // A node that cannot reach the store says so to load balancers.
        tasks.spawn(follow_store(c.serving(), health.clone(), token.clone()));
    }
    let reflection_v1 = videocall_telemetry::reflection().build_v1()?;
    let reflection_v1alpha = videocall_telemetry::reflection().build_v1alpha()?;

    // Shared by the gRPC edge and the browser's.
    let sessions = Arc::new(ClientApi::new(
        switchboard.clone(),
        auth,
        config.refresh_ahead,
        limits.clone(),
        tasks.clone(),
        token.clone(),
        metrics.clone(),
    ));
    let client_api = CallServiceServer::from_arc(sessions.clone())
        .max_decoding_message_size(limits.max_message_bytes);
    let admin_api = InterceptedService::new(
        CallAdminServer::new(AdminApi::new(switchboard.clone()))
            .max_decoding_message_size(limits.max_message_bytes),
        admin_credential,
    );

    info!(
        client = %addr(&listeners.client),
        admin = %addr(&listeners.admin),
        metrics = %listeners.metrics.as_ref().map(addr).unwrap_or_else(|| "off".into()),
        web = %listeners.web.as_ref().map(addr).unwrap_or_else(|| "off".into()),
        business = config.business_url.as_deref().unwrap_or("none"),
        ring_timeout = ?config.ring_timeout,
        approval_deadline = ?config.approval_deadline,
        "call service started"
    );
    // `closing` ends the listeners; `token` (after them) ends the switchboard
    // and every task.
    let closing = CancellationToken::new();
    let client_srv = builder(limits, tls.client)?
        .add_service(aux.wrap(health_service.clone()))
        .add_service(aux.wrap(reflection_v1.clone()))
        .add_service(aux.wrap(reflection_v1alpha.clone()))
        .add_service(client_api)
        .serve_with_incoming_shutdown(
            incoming(
                listeners.client,
                accept,
                metrics.connections_refused.clone(),
            ),
            closing.clone().cancelled_owned(),
        );
    let admin_srv = builder(limits, tls.admin)?
        .add_service(aux.wrap(health_service))
        .add_service(aux.wrap(reflection_v1))
        .add_service(aux.wrap(reflection_v1alpha))
        .add_service(admin_api)
        .serve_with_incoming_shutdown(
            incoming(listeners.admin, accept, metrics.connections_refused.clone()),
            closing.clone().cancelled_owned(),
        );
    let stop_metrics = closing.clone().cancelled_owned();
    let metrics_srv = async {
        match listeners.metrics {
            Some(l) => {
                let refresh = Refresh {
                    last: std::sync::Mutex::new((0, 0)),
                    switchboard,
                    business,
                    metrics: metrics.clone(),
                };
                let stop = stop_metrics;
                videocall_telemetry::serve_metrics(l, metrics.registry.clone(), refresh, stop)
                    .await
                    .map_err(ServeError::Metrics)
            }
            None => Ok(()),
        }
    };
    let web_srv = async {
        match listeners.web {
            Some(l) => {
                let origins = config.web_origins.clone();
                let refused = metrics.connections_refused.clone();
                let conns =
                    crate::web::Limited::new(l, accept, refused).map_err(ServeError::Web)?;
                let r = crate::web::serve(conns, sessions, origins, tasks.clone(), closing.clone())
                    .await
                    .map_err(ServeError::Web);
                closing.cancel();
                r
            }
            None => Ok(()),
        }
    };
    let watch = watch_shutdown(shutdown, &health, config.drain_time, &closing, &token);
    let (client_res, admin_res, metrics_res, web_res, ()) = tokio::join!(
        run_server(client_srv, "client", &closing),
        run_server(admin_srv, "admin", &closing),
        async {
            let r = metrics_srv.await;
            if r.is_err() {
                closing.cancel();
            }
            r
        },
        web_srv,
        watch,
    );
    token.cancel();
    wait_for_tasks(&tasks, lanes.as_ref(), &lanes_stop, config.notice_drain).await;
    info!("call service stopped");
    client_res.and(admin_res).and(metrics_res).and(web_res)
}

/// The switchboard on `tasks`, until `token`: the in-memory actor, or
/// with `--redis-url` this node of a cluster.
async fn start_switchboard(
    config: &Config,
    clock: Clock,
    business: Option<&Business>,
    metrics: &Metrics,
    tasks: &TaskTracker,
    token: &CancellationToken,
) -> Result<Board, ServeError> {
    let limits = &config.limits;
    let machine = MachineConfig {
        ring_timeout: config.ring_timeout,
    };
    let limits = SwitchboardLimits {
        max_devices_per_user: limits.max_devices_per_user,
        max_pending_approvals: limits.max_pending_approvals,
        resume_grace: limits.resume_grace,
        max_notices_per_caller: limits.max_notices_per_caller,
    };
    let hook = business
        .cloned()
        .map(|b| Arc::new(b) as Arc<dyn crate::hook::Hook>);
    let Some(url) = &config.redis_url else {
        return Ok(Board::Local(LocalSwitchboard::start(
            machine,
            limits,
            clock,
            hook,
            metrics.clone(),
            tasks,
            token.clone(),
        )));
    };
    // A call whose node died while asking is decided a little after the
    // deadline that node would have kept; so is one whose REQUEST's commit
    // ran but whose reply was lost (Redis killed or slow right then), as
    // the node that asked never learnt it had to. Without a business
    // service nobody is asked and such a call is allowed, as every call is.
    let failure = match (&hook, config.approval_failure_policy) {
        (None, _) | (_, crate::business::FailurePolicy::Allow) => crate::domain::Verdict::Allow,
        (Some(_), crate::business::FailurePolicy::Refuse) => crate::domain::Verdict::Refuse {
            code: crate::codes::BUSINESS_UNAVAILABLE,
            initiator: crate::domain::Initiator::Service,
        },
    };
    let cluster = ClusterConfig {
        redis_url: url.clone(),
        prefix: config.redis_prefix.clone(),
        lease: config.node_lease,
        approval: (config.approval_deadline + APPROVAL_MARGIN, failure),
    };
    let board = ClusterSwitchboard::start(
        cluster,
        machine,
        limits,
        clock,
        hook,
        metrics.clone(),
        tasks,
        token.clone(),
    )
    .await?;
    info!(
        node = board.node().0,
        "a node of a cluster: call state in redis"
    );
    Ok(Board::Cluster(board))
}

/// How long past the approval deadline another node decides a call whose
/// node died while asking.
const APPROVAL_MARGIN: Duration = Duration::from_secs(1);

/// Mirrors a cluster node's view of the store into its health: NOT_SERVING
/// while the store fails or the lease is not held.
async fn follow_store(
    mut serving: tokio::sync::watch::Receiver<bool>,
    health: HealthReporter,
    token: CancellationToken,
) {
    loop {
        tokio::select! {
            () = token.cancelled() => return,
            changed = serving.changed() => if changed.is_err() { return },
        }
        let up = *serving.borrow_and_update();
        if up {
            info!("the shared store answers again: SERVING");
            set_health(&health, ServingStatus::Serving).await;
        } else {
            warn!("the shared store fails: NOT_SERVING");
            set_health(&health, ServingStatus::NotServing).await;
        }
    }
}

/// The switchboard this node runs. A cluster node's futures are boxed:
/// every device's reader task holds a `control` and a `disconnect` future
/// inline, sized for the largest variant, and the cluster's (the rules
/// over records from Redis) are kilobytes, which every idle device would
/// pay for on either kind of node.
#[derive(Clone, Debug)]
enum Board {
    Local(LocalSwitchboard),
    Cluster(ClusterSwitchboard),
}

impl Switchboard for Board {
    async fn connect(
        &self,
        user: UserId,
        resume: Option<String>,
    ) -> Result<Attached, ConnectError> {
        match self {
            Board::Local(b) => b.connect(user, resume).await,
            Board::Cluster(b) => Box::pin(b.connect(user, resume)).await,
        }
    }

    async fn control(
        &self,
        conn: ConnId,
        epoch: u64,
        seq: u64,
        control: Control,
    ) -> Result<(), ShuttingDown> {
        match self {
            Board::Local(b) => b.control(conn, epoch, seq, control).await,
            Board::Cluster(b) => Box::pin(b.control(conn, epoch, seq, control)).await,
        }
    }

    async fn disconnect(&self, conn: ConnId, epoch: u64, lost: bool) {
        match self {
            Board::Local(b) => b.disconnect(conn, epoch, lost).await,
            Board::Cluster(b) => Box::pin(b.disconnect(conn, epoch, lost)).await,
        }
    }

    async fn force_finish(&self, f: ForceFinish) -> Result<Outcome, ShuttingDown> {
        match self {
            Board::Local(b) => b.force_finish(f).await,
            Board::Cluster(b) => Box::pin(b.force_finish(f)).await,
        }
    }

    async fn list_calls(
        &self,
        after: Option<CallId>,
        limit: usize,
    ) -> Result<(Vec<CallSummary>, bool), Unavailable> {
        match self {
            Board::Local(b) => b.list_calls(after, limit).await,
            Board::Cluster(b) => Box::pin(b.list_calls(after, limit)).await,
        }
    }

    async fn stats(&self) -> Result<Stats, Unavailable> {
        match self {
            Board::Local(b) => b.stats().await,
            Board::Cluster(b) => Box::pin(b.stats()).await,
        }
    }

    async fn user_state(&self, user: UserId) -> Result<UserSummary, Unavailable> {
        match self {
            Board::Local(b) => b.user_state(user).await,
            Board::Cluster(b) => Box::pin(b.user_state(user)).await,
        }
    }
}

/// On `shutdown`: NOT_SERVING for `drain`, then the listeners close
/// (`closing`) and the switchboard ends (`token`), which ends the device
/// streams and lets the servers' graceful shutdown finish. A server that
/// fails closes everything the same way.
async fn watch_shutdown(
    shutdown: impl Future<Output = ()>,
    health: &HealthReporter,
    drain: Duration,
    closing: &CancellationToken,
    token: &CancellationToken,
) {
    tokio::select! {
        () = shutdown => {
            info!(?drain, "shutting down: NOT_SERVING");
            set_health(health, ServingStatus::NotServing).await;
            tokio::time::sleep(drain).await;
        }
        () = closing.cancelled() => {}
    }
    closing.cancel();
    token.cancel();
}

/// The business hook's client and notice lanes, if a business service is
/// configured. The lanes end on `lanes_stop` or once drained.
fn start_business(
    config: &Config,
    clock: Clock,
    metrics: &Metrics,
    tasks: &TaskTracker,
    lanes_stop: &CancellationToken,
) -> Result<Option<Business>, ServeError> {
    let Some(url) = &config.business_url else {
        warn!("no business service configured: every call is allowed and no events are reported");
        return Ok(None);
    };
    let business = Business::start(
        &BusinessConfig {
            url: url.clone(),
            deadline: config.approval_deadline,
            failure_policy: config.approval_failure_policy,
            notice_linger: config.notice_linger,
            max_notices_per_caller: config.limits.max_notices_per_caller,
            lane_queue: config.limits.notice_queue.div_ceil(crate::business::LANES),
        },
        clock,
        metrics.clone(),
        tasks,
        lanes_stop.clone(),
    )?;
    Ok(Some(business))
}

/// Waits for every task to end once the switchboard has been told to stop.
/// Its last transition ends every call and closes the notice lanes, which
/// then deliver what they hold: that may take at most `drain`, after which
/// what is left is dropped (and logged).
async fn wait_for_tasks(
    tasks: &TaskTracker,
    lanes: Option<&Business>,
    lanes_stop: &CancellationToken,
    drain: Duration,
) {
    tasks.close();
    if tokio::time::timeout(drain, tasks.wait()).await.is_err() {
        let left = lanes.map(Business::backlog).unwrap_or(0);
        warn!(
            notices = left,
            ?drain,
            "notices not delivered to the business service by the shutdown deadline: dropped"
        );
        lanes_stop.cancel();
        tasks.wait().await;
    }
}

/// Runs a server (see [`videocall_telemetry::run_server`]).
async fn run_server(
    srv: impl Future<Output = Result<(), tonic::transport::Error>>,
    api: &'static str,
    closing: &CancellationToken,
) -> Result<(), ServeError> {
    videocall_telemetry::run_server(srv, api, closing)
        .await
        .map_err(|source| ServeError::Transport { api, source })
}

async fn set_health(health: &HealthReporter, status: ServingStatus) {
    let names = [
        "",
        call_service_server::SERVICE_NAME,
        call_admin_server::SERVICE_NAME,
    ];
    videocall_telemetry::set_health(health, &names, status).await;
}

fn addr(l: &TcpListener) -> String {
    l.local_addr().map(|a| a.to_string()).unwrap_or_default()
}

fn builder(limits: &Limits, tls: Option<ServerTlsConfig>) -> Result<Server, ServeError> {
    let server = Server::builder()
        // Finds dead peers: a ping on idle connections, dropped if unanswered.
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
        .max_concurrent_streams(Some(limits.max_streams_per_connection));
    match tls {
        Some(tls) => server
            .tls_config(tls.timeout(limits.handshake_timeout))
            .map_err(|e| ServeError::Config(format!("TLS: {e}"))),
        None => Ok(server),
    }
}

/// How clients are identified, from the configuration.
fn authenticator(config: &Config) -> Result<Authenticator, ServeError> {
    let jwt = match (&config.jwt_secret, &config.jwt_public_key) {
        (Some(secret), _) => Some(JwtVerifier::hs256(secret.as_bytes(), config.jwt_leeway)),
        (None, Some(path)) => {
            let pem = std::fs::read(path)
                .map_err(|e| ServeError::Config(format!("cannot read {}: {e}", path.display())))?;
            Some(JwtVerifier::public_key_pem(&pem, config.jwt_leeway))
        }
        (None, None) => None,
    };
    match (jwt, config.dev_identity) {
        (Some(_), true) => Err(ServeError::Config(
            "--dev-identity and token verification (--jwt-*) exclude each other".into(),
        )),
        (Some(verifier), false) => {
            let verifier = verifier.map_err(|e| ServeError::Config(e.to_string()))?;
            Ok(Authenticator::Jwt(Box::new(verifier)))
        }
        (None, true) => Ok(Authenticator::DevIdentity),
        (None, false) => Ok(Authenticator::RefuseAll),
    }
}

/// Says once, at start, how clients and admins are identified.
fn log_access(auth: &Authenticator, config: &Config) {
    match auth {
        Authenticator::Jwt(verifier) => {
            info!(?verifier, "clients authenticate with signed tokens")
        }
        Authenticator::DevIdentity => warn!(
            "DEVELOPMENT IDENTITIES ARE ON: clients are trusted to say who they are (x-videocall-user); never use this in production"
        ),
        Authenticator::RefuseAll => warn!(
            "no client authentication configured (--jwt-secret, --jwt-public-key): every client will be refused"
        ),
    }
    if config.admin_token.is_none() && config.admin_client_ca.is_none() {
        warn!("the admin API has no credential: anyone on this machine can use it (loopback only)");
    }
}

/// Checks what can be checked before anything listens, so that a service
/// that will not start says why before it says "listening": the client
/// authentication (keys readable, secrets long enough), the admin
/// credential (as long as a JWT secret; required beyond loopback), and
/// options that exclude each other. `admin` is where the admin API listens.
pub fn check(config: &Config, admin: std::net::SocketAddr) -> Result<(), ServeError> {
    if let Some(token) = &config.admin_token
        && token.len() < MIN_SECRET_BYTES
    {
        return Err(ServeError::Config(format!(
            "the admin token (--admin-token) must be at least {MIN_SECRET_BYTES} bytes, like the JWT secret"
        )));
    }
    let credential = config.admin_token.is_some() || config.admin_client_ca.is_some();
    if !credential && !admin.ip().is_loopback() {
        return Err(ServeError::Config(
            "the admin API listens beyond loopback: give it a credential (--admin-token or --admin-client-ca)".into(),
        ));
    }
    authenticator(config)?;
    tls(config)?;
    Ok(())
}

/// The shortest secret accepted: the JWT secret and the admin token alike.
pub const MIN_SECRET_BYTES: usize = crate::auth::MIN_SECRET_BYTES;

struct Tls {
    client: Option<ServerTlsConfig>,
    admin: Option<ServerTlsConfig>,
}

fn tls(config: &Config) -> Result<Tls, ServeError> {
    let read = |p: &std::path::Path| {
        std::fs::read(p)
            .map_err(|e| ServeError::Config(format!("cannot read {}: {e}", p.display())))
    };
    let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
        return Ok(Tls {
            client: None,
            admin: None,
        });
    };
    let identity = Identity::from_pem(read(cert)?, read(key)?);
    let client = ServerTlsConfig::new().identity(identity.clone());
    let admin = match &config.admin_client_ca {
        Some(ca) => ServerTlsConfig::new()
            .identity(identity)
            .client_ca_root(Certificate::from_pem(read(ca)?)),
        None => ServerTlsConfig::new().identity(identity),
    };
    Ok(Tls {
        client: Some(client),
        admin: Some(admin),
    })
}

/// Reads the scrape-time gauges.
struct Refresh {
    /// The store's counts at the last scrape (a cluster node).
    last: std::sync::Mutex<(u64, u64)>,
    switchboard: Board,
    business: Option<Business>,
    metrics: Metrics,
}

impl videocall_telemetry::Refresh for Refresh {
    async fn refresh(&self) {
        if let Ok(s) = self.switchboard.stats().await {
            self.metrics
                .connected
                .set(i64::try_from(s.connections).unwrap_or(i64::MAX));
            for (phase, n) in [
                ("approving", s.approving),
                ("ringing", s.ringing),
                ("talking", s.talking),
            ] {
                self.metrics
                    .calls
                    .get_or_create(&PhaseLabel { phase })
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
        if let Board::Cluster(c) = &self.switchboard {
            let (trips, conflicts) = c.store_counts();
            let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            self.metrics
                .store_round_trips
                .inc_by(trips.saturating_sub(last.0));
            self.metrics
                .store_conflicts
                .inc_by(conflicts.saturating_sub(last.1));
            *last = (trips, conflicts);
        }
        if let Some(b) = &self.business {
            self.metrics
                .notice_backlog
                .set(i64::try_from(b.backlog()).unwrap_or(i64::MAX));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ControlKind;

    /// What a device's reader task holds for the switchboard while idle is
    /// sized by the switchboard's `control` and `disconnect` futures: on a
    /// node in memory they are the in-memory ones, whatever a cluster
    /// node's would weigh (every idle device pays for the largest variant
    /// otherwise: 5.9 against 12.1 KiB per idle client, measured).
    #[tokio::test]
    async fn a_device_pays_for_the_in_memory_futures_only() {
        let (local, token, _tasks) = crate::switchboard::tests::start();
        let control = Control {
            kind: ControlKind::Request,
            peer: Arc::from("bob"),
            code: 0,
            flags: 0,
            param: 0,
            user_str: Arc::from(""),
        };
        let own = std::mem::size_of_val(&local.control(ConnId(1), 1, 1, control.clone()));
        let gone = std::mem::size_of_val(&local.disconnect(ConnId(1), 1, false));
        let board = Board::Local(local);
        // Its own arguments and a box for the other variant on top.
        let over = 256;
        let size = std::mem::size_of_val(&board.control(ConnId(1), 1, 1, control));
        assert!(
            size <= own + over,
            "control: {size} bytes, {own} on its own"
        );
        let size = std::mem::size_of_val(&board.disconnect(ConnId(1), 1, false));
        assert!(
            size <= gone + over,
            "disconnect: {size} bytes, {gone} on its own"
        );
        token.cancel();
    }
}
