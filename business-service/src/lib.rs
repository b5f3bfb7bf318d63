//! The reference business service: implements the `BusinessHook` API that
//! the call service calls to approve each call and to report every call
//! event; keeps call detail records; enforces a maximum call duration
//! through the call service's admin API.
//!
//! Layout:
//! - [`policy`]: the rules (TOML), checked whole before use; deciding is
//!   pure. [`PolicyStore`] holds the policy in force and reloads it.
//! - [`records`]: call detail records in SQLite, each call's events folded
//!   idempotently into its row (`records::row`, pure); queries and CSV for
//!   the operator CLI.
//! - [`enforcer`]: forced FINISH when a call reaches the maximum duration.
//! - [`admin`]: a small client of the call service's admin API.
//! - [`tokens`]: minting client tokens for tests and demos.
//! - [`metrics`]: Prometheus metrics.
//! - [`Hook`]: the `BusinessHook` implementation; [`Business`] starts its
//!   background tasks and serves it (with health and reflection) until
//!   shutdown.

pub mod admin;
pub mod enforcer;
pub mod metrics;
pub mod policy;
pub mod records;
pub mod tokens;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use jiff::Timestamp;
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};
use tracing::{info, warn};
use videocall_proto::v1 as pb;
use videocall_proto::v1::business_hook_server::{BusinessHook, BusinessHookServer};
use videocall_telemetry::accept::{AcceptLimits, AuxLimit, incoming};

pub use policy::{PairHistory, Policy, PolicyError};
pub use records::Records;

/// Notices kept for a slow observer before it starts losing the oldest.
const OBSERVER_BUFFER: usize = 1024;

/// Settings of the business service.
#[derive(Clone, Debug, Default)]
pub struct Config {
    /// The policy file (TOML); none: allow everything (plus `extra_blocked`).
    pub policy_file: Option<PathBuf>,
    /// Callers refused on top of the policy file, with their code.
    pub extra_blocked: HashMap<String, u32>,
    /// How often the policy file is checked for changes.
    pub reload_interval: Option<Duration>,
    /// The call records database; none: records are not kept.
    pub database: Option<PathBuf>,
    /// The call service's admin API, for forced FINISH at the maximum call
    /// duration; none: the maximum is not enforced.
    pub admin_url: Option<String>,
    /// The admin API's credential and TLS settings.
    pub admin_access: admin::AdminAccess,
}

/// Errors starting the business service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Records(#[from] records::RecordsError),
    #[error("invalid admin URL: {0}")]
    AdminUrl(#[source] tonic::transport::Error),
    #[error("the hook server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("the metrics server failed: {0}")]
    Metrics(#[source] std::io::Error),
    #[error("server reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// The policy in force. Readers take a cheap snapshot; a reload swaps it
/// whole, and only after the new file checked out.
#[derive(Debug)]
pub struct PolicyStore {
    file: Option<PathBuf>,
    extra_blocked: HashMap<String, u32>,
    current: RwLock<Arc<Policy>>,
    metrics: metrics::Metrics,
    /// The file's (modification time, length) when last loaded.
    seen: Mutex<Option<(SystemTime, u64)>>,
}

impl PolicyStore {
    fn load(
        file: Option<PathBuf>,
        extra_blocked: HashMap<String, u32>,
        metrics: metrics::Metrics,
    ) -> Result<Self, PolicyError> {
        let store = Self {
            file,
            extra_blocked,
            current: RwLock::new(Arc::new(Policy::default())),
            metrics,
            seen: Mutex::new(None),
        };
        store.reload()?;
        Ok(store)
    }

    /// The policy in force.
    pub fn get(&self) -> Arc<Policy> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reads the file again. On error the policy in force stays.
    pub fn reload(&self) -> Result<(), PolicyError> {
        let mut policy = match &self.file {
            Some(path) => {
                *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = fingerprint(path);
                Policy::load(path)?
            }
            None => Policy::default(),
        };
        policy.extra_blocked = self.extra_blocked.clone();
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
        Ok(())
    }

    /// Reloads if the file changed since the last load; logs the outcome.
    fn reload_if_changed(&self) {
        let Some(path) = &self.file else { return };
        if fingerprint(path) == *self.seen.lock().unwrap_or_else(|e| e.into_inner()) {
            return;
        }
        self.reload_logged("file changed");
    }

    /// Reloads and logs the outcome (for SIGHUP and file changes).
    pub fn reload_logged(&self, why: &str) {
        let outcome = match self.reload() {
            Ok(()) => {
                info!(why, file = ?self.file, "policy reloaded");
                "ok"
            }
            Err(e) => {
                warn!(why, error = %e, "policy NOT reloaded; the previous policy stays in force");
                "refused"
            }
        };
        self.metrics
            .policy_reloads
            .get_or_create(&metrics::OutcomeLabel { outcome })
            .inc();
    }
}

fn fingerprint(path: &std::path::Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// What callers did lately: each caller's approved calls (the rate limit)
/// and each caller→callee pair's history (the re-dial rule,
/// [`Policy::redial`]). One `std` mutex over both, held for a whole
/// decision, check and record together (two approvals for one caller at
/// once cannot both pass on the same count), and never across an
/// `.await`. Bounded: a caller keeps at most the rate limit's worth of
/// times, and past [`MAX_PAIRS`] pairs those older than the rule's memory
/// are forgotten.
#[derive(Debug, Default)]
struct History {
    inner: Mutex<HistoryInner>,
}

#[derive(Debug, Default)]
struct HistoryInner {
    by_caller: HashMap<String, VecDeque<Timestamp>>,
    pairs: HashMap<(String, String), PairHistory>,
}

/// Caller→callee pairs kept before old ones are swept.
const MAX_PAIRS: usize = 100_000;

impl History {
    fn lock(&self) -> std::sync::MutexGuard<'_, HistoryInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The policy's decision for one REQUEST, recorded if it is an
    /// approval, under one lock.
    fn decide(
        &self,
        policy: &Policy,
        caller: &str,
        callee: &str,
        now: Timestamp,
    ) -> Result<(), policy::Refusal> {
        let mut guard = self.lock();
        let HistoryInner { by_caller, pairs } = &mut *guard;
        let recent: &[Timestamp] = match by_caller.get_mut(caller) {
            Some(q) => q.make_contiguous(),
            None => &[],
        };
        let key = (caller.to_owned(), callee.to_owned());
        let empty = PairHistory::default();
        let pair = pairs.get(&key).unwrap_or(&empty);
        policy
            .decide(caller, callee, now, recent)
            .and_then(|()| policy.redial(pair, now))?;
        guard.update_pair(key, policy, now, |h| h.approved.push(now));
        if let Some(limit) = &policy.rate_limit {
            let q = guard.by_caller.entry(caller.to_owned()).or_default();
            q.push_back(now);
            // The rate limit never needs more.
            while q.len() > limit.calls as usize {
                q.pop_front();
            }
        }
        Ok(())
    }

    /// The callee declined the caller's call: the caller waits before
    /// calling again.
    fn declined(&self, caller: &str, callee: &str, policy: &Policy) {
        let now = Timestamp::now();
        self.lock()
            .update_pair((caller.to_owned(), callee.to_owned()), policy, now, |h| {
                h.declined = Some(now)
            });
    }
}

impl HistoryInner {
    fn update_pair(
        &mut self,
        key: (String, String),
        policy: &Policy,
        now: Timestamp,
        f: impl FnOnce(&mut PairHistory),
    ) {
        let memory = jiff::SignedDuration::try_from(policy.redial_memory())
            .unwrap_or(jiff::SignedDuration::MAX);
        let since = now.checked_sub(memory).unwrap_or(Timestamp::MIN);
        if self.pairs.len() >= MAX_PAIRS {
            self.pairs.retain(|_, h| {
                h.declined.is_some_and(|t| t > since) || h.approved.iter().any(|t| *t > since)
            });
        }
        let h = self.pairs.entry(key).or_default();
        f(h);
        // The count never needs more than the limit's worth.
        h.approved.retain(|t| *t > since);
        let keep = policy.redial.calls as usize;
        if h.approved.len() > keep {
            let extra = h.approved.len() - keep;
            h.approved.drain(..extra);
        }
    }
}

/// The `BusinessHook` implementation.
#[derive(Clone, Debug)]
pub struct Hook {
    policy: Arc<PolicyStore>,
    history: Arc<History>,
    records: Option<Records>,
    enforcer: Option<enforcer::Enforcer>,
    observers: broadcast::Sender<pb::CallEventNotice>,
    metrics: metrics::Metrics,
    health: HealthReporter,
}

impl Hook {
    /// Every notice received from now on. A receiver that falls more than
    /// 1024 notices behind loses the oldest (and is told so by `recv`).
    pub fn subscribe(&self) -> broadcast::Receiver<pb::CallEventNotice> {
        self.observers.subscribe()
    }

    /// Whether anybody observes notices: only then are they copied for
    /// observers (sent once stored); in production nobody does, and the
    /// records take the notices themselves.
    fn observed(&self) -> bool {
        self.observers.receiver_count() > 0
    }

    /// The policy holder (to reload it, e.g. on SIGHUP).
    pub fn policy(&self) -> &PolicyStore {
        &self.policy
    }

    /// Health follows the records database, the one dependency: a failed
    /// write makes the service NOT_SERVING until a write succeeds.
    async fn records_ok(&self, ok: bool) {
        let was = self.metrics.records_healthy.get() == 1;
        if was == ok {
            return;
        }
        self.metrics.records_healthy.set(i64::from(ok));
        let status = if ok {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        set_health(&self.health, status).await;
    }

    /// The approval decision, pure but for the history it updates.
    fn decide(&self, n: &pb::CallEventNotice) -> u32 {
        let policy = self.policy.get();
        let decision = self.history.decide(
            &policy,
            &n.caller_user_id,
            &n.callee_user_id,
            Timestamp::now(),
        );
        let code = match decision {
            Ok(()) => 0,
            Err(refusal) => {
                let code = policy.code(refusal);
                info!(call_id = %n.call_id, caller = %n.caller_user_id, callee = %n.callee_user_id, ?refusal, code, "call refused");
                code
            }
        };
        self.metrics
            .decisions
            .get_or_create(&metrics::CodeLabel { code })
            .inc();
        code
    }
}

fn event_name(t: i32) -> &'static str {
    match pb::EventType::try_from(t) {
        Ok(pb::EventType::Request) => "REQUEST",
        Ok(pb::EventType::Reply) => "REPLY",
        Ok(pb::EventType::Start) => "START",
        Ok(pb::EventType::Finish) => "FINISH",
        _ => "UNKNOWN",
    }
}

impl Hook {
    /// Counts, logs and observes one notice; returns the decision for an
    /// approval.
    fn observe(&self, n: &pb::CallEventNotice, approval: bool) -> Option<u32> {
        let decision =
            (approval && n.event_type == pb::EventType::Request as i32).then(|| self.decide(n));
        let event = event_name(n.event_type);
        self.metrics
            .notices
            .get_or_create(&metrics::EventLabel { event })
            .inc();
        info!(
            event,
            call_id = %n.call_id,
            seq = n.sequence,
            source = %n.source_user_id,
            target = %n.target_user_id,
            code = n.error_code,
            decision,
            "call event"
        );
        if let Some(enforcer) = &self.enforcer {
            enforcer.observe(n, self.policy.get().as_ref());
        }
        // A callee who declined: the caller waits before calling again.
        if n.event_type == pb::EventType::Reply as i32
            && n.initiator == pb::Initiator::Callee as i32
            && n.error_code != 0
        {
            let policy = self.policy.get();
            self.history
                .declined(&n.caller_user_id, &n.callee_user_id, &policy);
        }
        decision
    }

    /// After a write: healthy again, or refused so that the call service
    /// delivers the notices again.
    async fn stored(
        &self,
        result: Result<(), records::RecordsError>,
        call_id: &str,
    ) -> Result<(), Status> {
        match result {
            Ok(()) => {
                self.records_ok(true).await;
                Ok(())
            }
            Err(e) => {
                self.records_ok(false).await;
                warn!(call_id, error = %e, "call event not recorded");
                Err(Status::unavailable(format!(
                    "call records unavailable: {e}"
                )))
            }
        }
    }
}

fn check(n: &pb::CallEventNotice) -> Result<(), Status> {
    if n.call_id.is_empty() || n.event_id.is_empty() {
        return Err(Status::invalid_argument(
            "call_id and event_id are required",
        ));
    }
    Ok(())
}

#[tonic::async_trait]
impl BusinessHook for Hook {
    async fn on_call_event(
        &self,
        request: Request<pb::CallEventNotice>,
    ) -> Result<Response<pb::CallEventAck>, Status> {
        let n = request.into_inner();
        check(&n)?;
        let decision = self.observe(&n, n.decision_required);
        let observed = self.observed().then(|| n.clone());
        if let Some(records) = &self.records {
            let call_id = n.call_id.clone();
            if decision.is_some() {
                // In the approval journal before the answer: once approved,
                // the call service does not send this REQUEST again, so a
                // crash right after answering must not lose it. The journal
                // append is one small write; the commit comes later, with
                // the notices (see `records`). A failed write does not hold
                // up the call: it is logged and the service reports
                // NOT_SERVING, as for any notice.
                let rang_ms = (decision == Some(0)).then(|| Timestamp::now().as_millisecond());
                let started = std::time::Instant::now();
                let result = records.approval(n, rang_ms).await;
                self.metrics
                    .approval_record_seconds
                    .observe(started.elapsed().as_secs_f64());
                let _ = self.stored(result, &call_id).await;
            } else {
                let result = records.store(n).await;
                self.stored(result, &call_id).await?;
            }
        }
        if let Some(n) = observed {
            let _ = self.observers.send(n);
        }
        Ok(Response::new(pb::CallEventAck {
            result_code: decision.unwrap_or(0),
        }))
    }

    async fn on_call_events(
        &self,
        request: Request<pb::CallEventBatch>,
    ) -> Result<Response<pb::CallEventBatchAck>, Status> {
        let batch = request.into_inner().notices;
        // All or nothing: a malformed notice refuses the batch unseen.
        batch.iter().try_for_each(check)?;
        for n in &batch {
            // A batch carries no approvals.
            self.observe(n, false);
        }
        let observed = if self.observed() {
            batch.clone()
        } else {
            Vec::new()
        };
        if let Some(records) = &self.records {
            let first = batch.first().map(|n| n.call_id.clone()).unwrap_or_default();
            let result = records.store_all(batch).await;
            self.stored(result, &first).await?;
        }
        for n in observed {
            let _ = self.observers.send(n);
        }
        Ok(Response::new(pb::CallEventBatchAck {}))
    }
}

/// The business service: the hook and its background tasks.
#[derive(Debug)]
pub struct Business {
    hook: Hook,
    tasks: TaskTracker,
    token: CancellationToken,
    health_service: HealthServer<HealthService>,
}

impl Business {
    /// Loads the policy, opens the records and starts the background tasks
    /// (policy watcher, duration enforcer). Needs a Tokio runtime.
    pub fn start(config: Config) -> Result<Self, Error> {
        let tasks = TaskTracker::new();
        let token = CancellationToken::new();
        let metrics = metrics::Metrics::default();
        metrics.records_healthy.set(1);
        let policy = Arc::new(PolicyStore::load(
            config.policy_file.clone(),
            config.extra_blocked.clone(),
            metrics.clone(),
        )?);
        let records = config.database.as_deref().map(Records::start).transpose()?;
        let enforcer = config
            .admin_url
            .as_deref()
            .map(|url| {
                let access = config.admin_access.clone();
                enforcer::Enforcer::start(url, access, metrics.clone(), &tasks, token.clone())
            })
            .transpose()
            .map_err(Error::AdminUrl)?;
        if let (Some(every), Some(_)) = (config.reload_interval, &config.policy_file) {
            let policy = policy.clone();
            let token = token.clone();
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        () = token.cancelled() => return,
                        _ = tick.tick() => policy.reload_if_changed(),
                    }
                }
            });
        }
        let (observers, _) = broadcast::channel(OBSERVER_BUFFER);
        let health = HealthReporter::new();
        let health_service = HealthServer::new(HealthService::from_health_reporter(health.clone()));
        let hook = Hook {
            policy,
            history: Arc::default(),
            records,
            enforcer,
            observers,
            metrics,
            health,
        };
        Ok(Self {
            hook,
            tasks,
            token,
            health_service,
        })
    }

    pub fn hook(&self) -> &Hook {
        &self.hook
    }

    /// Serves the hook on `listener` (with `grpc.health.v1` and reflection)
    /// and, if given, Prometheus `/metrics` on `metrics`, until `shutdown`
    /// resolves; then reports NOT_SERVING, stops the background tasks and
    /// waits for them. Health: `""` and `videocall.v1.BusinessHook` are
    /// SERVING, but NOT_SERVING while shutting down or while the records
    /// database fails writes.
    pub async fn serve(
        self,
        listener: TcpListener,
        metrics: Option<TcpListener>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), Error> {
        set_health(&self.hook.health, ServingStatus::Serving).await;
        let reflection = videocall_telemetry::reflection;
        let closing = CancellationToken::new();
        // The call service's own acceptor: per-peer limits, a handshake
        // timeout, accept back-off, Nagle off (answers are small writes);
        // health and reflection streams bounded. Its limits are generous:
        // the clients are call-service nodes.
        let refused = self.hook.metrics.connections_refused.clone();
        let aux = AuxLimit::new(AUX_STREAMS, AUX_STREAMS_PER_PEER, refused.clone());
        let accept = AcceptLimits {
            max_connections_per_peer: CONNECTIONS_PER_PEER,
            handshake_timeout: HANDSHAKE_TIMEOUT,
        };
        let hook_srv = tonic::transport::Server::builder()
            .add_service(aux.wrap(self.health_service.clone()))
            .add_service(aux.wrap(reflection().build_v1()?))
            .add_service(aux.wrap(reflection().build_v1alpha()?))
            .add_service(BusinessHookServer::new(self.hook.clone()))
            .serve_with_incoming_shutdown(
                incoming(listener, accept, refused),
                closing.clone().cancelled_owned(),
            );
        let metrics_srv = async {
            match metrics {
                Some(l) => {
                    let registry = self.hook.metrics.registry.clone();
                    videocall_telemetry::serve_metrics(
                        l,
                        registry,
                        NoRefresh,
                        closing.clone().cancelled_owned(),
                    )
                    .await
                    .map_err(Error::Metrics)
                }
                None => Ok(()),
            }
        };
        let watch = async {
            tokio::select! {
                () = shutdown => set_health(&self.hook.health, ServingStatus::NotServing).await,
                () = closing.cancelled() => {}
            }
            closing.cancel();
        };
        let (hook_res, metrics_res, ()) = tokio::join!(
            videocall_telemetry::run_server(hook_srv, "hook", &closing),
            async {
                let r = metrics_srv.await;
                if r.is_err() {
                    closing.cancel();
                }
                r
            },
            watch,
        );
        self.token.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        if let Some(records) = &self.hook.records {
            // Approvals answered in the last few milliseconds are in the
            // journal; committed now, the database is complete without
            // needing the next start's replay.
            match tokio::time::timeout(RECORDS_FLUSH, records.flush()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(error = %e, "call records not flushed"),
                Err(_) => warn!(
                    "call records not committed within {RECORDS_FLUSH:?}: the next start stores them from the journal"
                ),
            }
        }
        hook_res?;
        metrics_res
    }
}

/// How long a shutdown waits for the records' last commit.
const RECORDS_FLUSH: Duration = Duration::from_secs(5);
/// Connections one address may hold (a call-service node needs one).
const CONNECTIONS_PER_PEER: usize = 256;
/// How long a new connection may stay silent.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Health and reflection streams, in all and per address.
const AUX_STREAMS: usize = 1024;
const AUX_STREAMS_PER_PEER: usize = 32;

async fn set_health(health: &HealthReporter, status: ServingStatus) {
    let names = ["", videocall_proto::v1::business_hook_server::SERVICE_NAME];
    videocall_telemetry::set_health(health, &names, status).await;
}

struct NoRefresh;

impl videocall_telemetry::Refresh for NoRefresh {
    async fn refresh(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(caller: &str, callee: &str) -> pb::CallEventNotice {
        pb::CallEventNotice {
            event_type: pb::EventType::Request as i32,
            source_user_id: caller.into(),
            target_user_id: callee.into(),
            call_id: format!("{caller}-{callee}"),
            event_id: format!("{caller}-{callee}-1"),
            sequence: 1,
            decision_required: true,
            initiator: pb::Initiator::Caller as i32,
            caller_user_id: caller.into(),
            callee_user_id: callee.into(),
            ..Default::default()
        }
    }

    /// A rate limit of one call: of two approvals for one caller at once,
    /// exactly one passes, however the threads interleave.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_approvals_for_one_caller_pass_the_rate_limit_once() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("policy.toml");
        std::fs::write(&file, "[rate_limit]\ncalls = 1\nper = \"1h\"\n").unwrap();
        let business = Business::start(Config {
            policy_file: Some(file),
            extra_blocked: HashMap::new(),
            reload_interval: None,
            database: None,
            admin_url: None,
            admin_access: admin::AdminAccess::default(),
        })
        .unwrap();
        let callers = 300;
        let start = Arc::new(tokio::sync::Barrier::new(callers * 2));
        let mut answers = tokio::task::JoinSet::new();
        for i in 0..callers {
            for callee in ["bob", "carol"] {
                let hook = business.hook().clone();
                let start = start.clone();
                let n = request(&format!("caller-{i}"), &format!("{callee}-{i}"));
                answers.spawn(async move {
                    start.wait().await;
                    let code = hook
                        .on_call_event(Request::new(n))
                        .await
                        .unwrap()
                        .into_inner()
                        .result_code;
                    (i, code)
                });
            }
        }
        let mut approved = vec![0; callers];
        while let Some(answer) = answers.join_next().await {
            let (i, code) = answer.unwrap();
            if code == 0 {
                approved[i] += 1;
            } else {
                assert_eq!(code, 200_005, "refused for the rate limit");
            }
        }
        assert!(approved.iter().all(|&n| n == 1), "{approved:?}");
    }

    /// With records, an approval's journal append is timed: what storing
    /// its REQUEST adds to the answer.
    #[tokio::test]
    async fn an_approvals_record_is_timed() {
        let dir = tempfile::tempdir().unwrap();
        let business = Business::start(Config {
            policy_file: None,
            extra_blocked: HashMap::new(),
            reload_interval: None,
            database: Some(dir.path().join("records.db")),
            admin_url: None,
            admin_access: admin::AdminAccess::default(),
        })
        .unwrap();
        for callee in ["bob", "carol"] {
            let n = request("alice", callee);
            let ack = business.hook().on_call_event(Request::new(n)).await;
            assert_eq!(ack.unwrap().into_inner().result_code, 0);
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &business.hook().metrics.registry)
            .unwrap();
        assert!(
            text.contains("business_approval_record_seconds_count 2"),
            "{text}"
        );
    }

    /// Approvals are answered before they are committed; a shutdown
    /// commits them, so the database is complete when `serve` returns.
    #[tokio::test]
    async fn a_shutdown_commits_the_approvals_answered() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("records.db");
        let business = Business::start(Config {
            database: Some(db.clone()),
            ..Config::default()
        })
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hook = business.hook().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(business.serve(listener, None, async {
            let _ = stopped.await;
        }));
        // The writer cannot commit them before the shutdown starts.
        let mut blocker = records::open(&db).unwrap();
        let lock = blocker
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .unwrap();
        for callee in ["bob", "carol", "dave"] {
            let ack = hook
                .on_call_event(Request::new(request("alice", callee)))
                .await;
            assert_eq!(ack.unwrap().into_inner().result_code, 0);
        }
        drop(lock);
        stop.send(()).unwrap();
        served.await.unwrap().unwrap();
        let conn = records::open(&db).unwrap();
        let calls = records::query(&conn, records::Query::User("alice"), 10).unwrap();
        assert_eq!(calls.len(), 3, "{calls:?}");
    }
}
