//! The call service's side of the business hook: approvals and notices.
//!
//! - **Approval** of a REQUEST is one unary call with its own deadline
//!   ([`BusinessConfig::deadline`]), a future the switchboard polls, never
//!   queued behind notices. A timeout, a transport error or an error status is
//!   turned into a verdict by the failure policy.
//! - **Notices** (every other event) go through [`LANES`] ordered lanes: a
//!   call always maps to the same lane, and a lane delivers one notice at a
//!   time, so the business service sees each call's events in order while
//!   different calls proceed in parallel.
//! - **At least once**: a notice that fails (business service down,
//!   restarting, too slow, or answering UNAVAILABLE) is retried with
//!   exponential backoff ([`RETRY_FIRST`] doubling up to [`RETRY_MAX`]) until
//!   it is taken; the lane waits behind it, which keeps each call in order.
//!   Each notice carries a unique `event_id`, so a notice delivered twice (a
//!   lost answer) can be recognised. A notice the business service refuses
//!   as malformed (INVALID_ARGUMENT, UNIMPLEMENTED, OUT_OF_RANGE) is not
//!   retried: it is logged and counted (`videocall_notices_rejected_total`).
//! - **Batches**: notices that queued up on a lane while the previous
//!   delivery was in flight, or that arrive within the linger
//!   ([`BusinessConfig::notice_linger`], counted from when the first of them
//!   happened) go together in one `OnCallEvents` request (at most
//!   [`BATCH_MAX`]), retried as a whole; a lone notice goes with
//!   `OnCallEvent`. Under load this replaces hundreds of round trips with
//!   one: each round trip costs both services far more than the notices it
//!   carries. A business service that answers UNIMPLEMENTED (the method is
//!   optional) gets every notice one at a time from then on, without
//!   lingering.
//! - **A REQUEST whose approval failed** is queued as a notice too
//!   (`decision_required` false), so the call's record is complete once the
//!   business service is back.
//! - **Fairness between callers**: each notice counts against its call's
//!   caller until it is delivered ([`Business::caller_backlog`]). A caller
//!   with [`BusinessConfig::max_notices_per_caller`] waiting gets OVERLOADED
//!   (100207) for its next REQUEST until they drain (the switchboard
//!   checks): a flood is pushed back on the flooder's own controls, and
//!   since a user has at most one call at a time, no caller holds more than
//!   that bound plus one call's notices in the lanes. Others' notices wait
//!   behind at most those, and are not dropped for them.
//! - **Shutdown**: the switchboard's last transition ends every call
//!   (TERMINATED) and then closes the lanes ([`Business::close`]); they
//!   deliver what they hold, the calls' last events included, and end. The
//!   server waits for that at most `--notice-drain` (5 s): what a business
//!   service that is down by then has not taken is lost, logged with its
//!   count.
//! - **Full lanes**: each lane holds at most [`LANE_QUEUE`] notices. When
//!   one is full the *newest* notice is dropped, counted in
//!   `videocall_notices_dropped_total` and logged; the call flow never waits for the
//!   business service. With the per-caller bound, filling the lanes takes
//!   hundreds of callers flooding at once.

use std::collections::HashMap;
use std::sync::Mutex;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, info, warn};
use videocall_proto::v1 as pb;
use videocall_proto::v1::business_hook_client::BusinessHookClient;

use crate::codes;
use crate::convert::notice_to_proto;
use crate::domain::{CallId, Initiator, Notice, UserId, Verdict};
use crate::metrics::{KindLabel, Metrics};
use crate::unary::EndWithMessage;

/// Ordered delivery lanes for notices ([`LANES`]); a lane holds
/// [`LANE_QUEUE`] notices by default before it drops new ones
/// ([`BusinessConfig::lane_queue`]); the default of
/// [`BusinessConfig::max_notices_per_caller`].
pub use crate::defaults::{LANE_QUEUE, LANES, MAX_NOTICES_PER_CALLER};

/// The business hook's client.
type Client = BusinessHookClient<EndWithMessage<Channel>>;

/// The most notices one `OnCallEvents` request carries.
pub const BATCH_MAX: usize = 256;
/// The first wait before retrying a notice.
pub const RETRY_FIRST: Duration = Duration::from_millis(50);
/// The longest wait between retries.
pub const RETRY_MAX: Duration = Duration::from_secs(2);

/// What to do when the business service does not answer an approval in time
/// or fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FailurePolicy {
    /// Refuse the call with RESULT_CODE_BUSINESS_UNAVAILABLE (100201).
    Refuse,
    /// Let the call ring as if approved.
    Allow,
}

/// How to reach the business service.
#[derive(Clone, Debug)]
pub struct BusinessConfig {
    /// e.g. `http://127.0.0.1:50061`.
    pub url: String,
    /// The longest the call service waits for an approval (and for a
    /// notice to be taken).
    pub deadline: Duration,
    pub failure_policy: FailurePolicy,
    /// How long a notice may wait for others to share its request.
    pub notice_linger: Duration,
    /// Notices of one caller's calls that may wait for delivery before its
    /// next REQUEST is refused OVERLOADED.
    pub max_notices_per_caller: usize,
    /// Notices each lane holds before it drops new ones.
    pub lane_queue: usize,
}

/// Invalid business service settings.
#[derive(Debug, thiserror::Error)]
#[error("invalid business service URL {url:?}: {source}")]
pub struct BusinessUrlError {
    url: String,
    source: tonic::transport::Error,
}

/// A handle to the business service. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Business {
    client: Client,
    deadline: Duration,
    policy: FailurePolicy,
    lanes: Arc<[mpsc::Sender<Notice>]>,
    backlog: CallerBacklog,
    max_notices_per_caller: usize,
    metrics: Metrics,
    clock: Clock,
    /// Set by [`Business::close`]: the lanes deliver what they hold, then end.
    draining: CancellationToken,
}

/// Notices waiting for delivery, per caller. Behind a `std` mutex held
/// only to change or read one count, never across an `.await`.
#[derive(Clone, Debug, Default)]
struct CallerBacklog(Arc<Mutex<HashMap<UserId, usize>>>);

impl CallerBacklog {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<UserId, usize>> {
        // Each change is one insert or remove: nothing half-done to see.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn of(&self, caller: &UserId) -> usize {
        self.lock().get(caller).copied().unwrap_or(0)
    }

    fn add(&self, caller: &UserId) {
        *self.lock().entry(caller.clone()).or_insert(0) += 1;
    }

    fn release<'a>(&self, notices: impl IntoIterator<Item = &'a Notice>) {
        let mut counts = self.lock();
        for n in notices {
            if let Some(c) = counts.get_mut(&n.caller) {
                *c = c.saturating_sub(1);
                if *c == 0 {
                    counts.remove(&n.caller);
                }
            }
        }
    }
}

pub use crate::clock::Clock;

impl Business {
    /// Prepares a lazily connected channel (the business service may start
    /// later or restart at any time) and starts the notice lanes on `tasks`.
    /// They end once [`Business::close`] was called and they have delivered
    /// what they hold, or at once on `stop` (what they hold is then lost).
    pub fn start(
        config: &BusinessConfig,
        clock: Clock,
        metrics: Metrics,
        tasks: &TaskTracker,
        stop: CancellationToken,
    ) -> Result<Self, BusinessUrlError> {
        let endpoint = Endpoint::from_shared(config.url.clone())
            .map_err(|source| BusinessUrlError {
                url: config.url.clone(),
                source,
            })?
            .connect_timeout(config.deadline)
            .tcp_nodelay(true);
        let client = BusinessHookClient::new(EndWithMessage(endpoint.connect_lazy()));
        let mut lanes = Vec::with_capacity(LANES);
        // Until the business service shows it has no OnCallEvents.
        let batches = Arc::new(AtomicBool::new(true));
        let backlog = CallerBacklog::default();
        let draining = CancellationToken::new();
        for _ in 0..LANES {
            let (tx, rx) = mpsc::channel(config.lane_queue.max(1));
            lanes.push(tx);
            let lane = Lane {
                client: client.clone(),
                timing: LaneTiming {
                    deadline: config.deadline,
                    linger: config.notice_linger,
                    clock,
                },
                rx,
                metrics: metrics.clone(),
                stop: LaneStop {
                    draining: draining.clone(),
                    stop: stop.clone(),
                },
                batches: batches.clone(),
                backlog: backlog.clone(),
            };
            tasks.spawn(lane.run());
        }
        Ok(Self {
            client,
            deadline: config.deadline,
            policy: config.failure_policy,
            lanes: lanes.into(),
            backlog,
            max_notices_per_caller: config.max_notices_per_caller,
            metrics,
            clock,
            draining,
        })
    }

    /// No more notices will come (the switchboard has stopped, its last
    /// act ending every call): the lanes deliver what they hold, with the
    /// usual retries, and end.
    pub fn close(&self) {
        self.draining.cancel();
    }

    /// Asks whether a call may proceed. Always returns within the deadline.
    pub async fn approve(&self, notice: Notice) -> Verdict {
        let call_id = notice.call_id;
        let notice_copy = notice.clone();
        let mut request =
            tonic::Request::new(notice_to_proto(&notice, self.clock.wall_time(notice.at)));
        request.set_timeout(self.deadline);
        let mut client = self.client.clone();
        let began = std::time::Instant::now();
        let answer = tokio::time::timeout(self.deadline, client.on_call_event(request)).await;
        self.metrics
            .approval_seconds
            .observe(began.elapsed().as_secs_f64());
        let failure = match answer {
            Ok(Ok(ack)) => {
                let code = ack.into_inner().result_code;
                return if code == codes::OK {
                    Verdict::Allow
                } else {
                    Verdict::Refuse {
                        code,
                        initiator: Initiator::Business,
                    }
                };
            }
            Ok(Err(status)) => {
                self.metrics
                    .approval_failures
                    .get_or_create(&KindLabel { kind: "error" })
                    .inc();
                format!("{}: {}", status.code(), status.message())
            }
            Err(_) => {
                self.metrics
                    .approval_failures
                    .get_or_create(&KindLabel { kind: "timeout" })
                    .inc();
                format!("no answer within {:?}", self.deadline)
            }
        };
        warn!(call_id = %call_id, error = %failure, policy = ?self.policy, "approval failed; applying the failure policy");
        // The business service may not have seen the REQUEST: deliver it
        // as a notice, ahead of the REPLY the verdict will cause.
        let mut notice = notice_copy;
        notice.decision_required = false;
        self.notify(notice);
        match self.policy {
            FailurePolicy::Allow => Verdict::Allow,
            FailurePolicy::Refuse => Verdict::Refuse {
                code: codes::BUSINESS_UNAVAILABLE,
                initiator: Initiator::Service,
            },
        }
    }

    /// Queues a notice on its call's lane without waiting.
    pub fn notify(&self, notice: Notice) {
        let lane = (notice.call_id.0.as_u128() % self.lanes.len() as u128) as usize;
        // Counted before it is queued, so a quick delivery cannot release
        // it first.
        self.backlog.add(&notice.caller);
        if let Err(e) = self.lanes[lane].try_send(notice) {
            let notice = e.into_inner();
            self.backlog.release([&notice]);
            self.metrics.notices_dropped.inc();
            let n = self.metrics.notices_dropped.get();
            warn!(call_id = %notice.call_id, seq = notice.seq, dropped_total = n, "notice lane full: notice dropped");
        }
    }

    /// Notices of `caller`'s calls waiting for delivery.
    pub fn caller_backlog(&self, caller: &UserId) -> usize {
        self.backlog.of(caller)
    }

    /// Whether `caller` has as many notices waiting as it may: its next
    /// REQUEST is refused OVERLOADED until they drain.
    pub fn caller_over_quota(&self, caller: &UserId) -> bool {
        self.caller_backlog(caller) >= self.max_notices_per_caller
    }

    /// Notices waiting in the lanes.
    pub fn backlog(&self) -> usize {
        self.lanes
            .iter()
            .map(|l| l.max_capacity() - l.capacity())
            .sum()
    }
}

/// When a lane ends: once `draining` and empty, or at once on `stop`.
#[derive(Clone)]
struct LaneStop {
    draining: CancellationToken,
    stop: CancellationToken,
}

impl crate::hook::Hook for Business {
    fn approve(&self, notice: Notice) -> futures_util::future::BoxFuture<'static, Verdict> {
        let this = self.clone();
        Box::pin(async move { this.approve(notice).await })
    }

    fn notify(&self, notice: Notice) {
        self.notify(notice);
    }

    fn caller_over_quota(&self, caller: &UserId) -> bool {
        self.caller_over_quota(caller)
    }

    fn busy(&self) -> bool {
        let capacity: usize = self.lanes.iter().map(|l| l.max_capacity()).sum();
        self.backlog() * 2 >= capacity
    }

    fn close(&self) {
        self.close();
    }
}

/// A lane's times: how long a delivery may take, how long a notice may
/// wait for company, and the clock notices are stamped with.
#[derive(Clone, Copy)]
struct LaneTiming {
    deadline: Duration,
    linger: Duration,
    clock: Clock,
}

/// One ordered lane: delivers its notices a batch (or, for a business
/// service without `OnCallEvents`, one) at a time.
struct Lane {
    client: Client,
    timing: LaneTiming,
    rx: mpsc::Receiver<Notice>,
    metrics: Metrics,
    stop: LaneStop,
    /// Shared by the lanes: false once the business service has shown it
    /// has no `OnCallEvents`.
    batches: Arc<AtomicBool>,
    backlog: CallerBacklog,
}

/// Whether a lane goes on.
enum Next {
    Continue,
    Stop,
}

/// What became of a batch.
enum Batch {
    /// Taken, or refused for good: the lane goes on.
    Done,
    /// The lane is to stop.
    Stop,
    /// The business service has no `OnCallEvents`: send one at a time.
    OneAtATime,
}

impl Lane {
    async fn run(mut self) {
        let mut queued = Vec::with_capacity(BATCH_MAX);
        while let Some(first) = self.first().await {
            self.gather(first, &mut queued).await;
            if queued.len() > 1 && self.batches.load(Ordering::Relaxed) {
                match self.send_batch(&queued).await {
                    Batch::Done => {
                        self.backlog.release(&queued);
                        queued.clear();
                        continue;
                    }
                    Batch::Stop => return,
                    Batch::OneAtATime => {}
                }
            }
            if let Next::Stop = self.send_each(&mut queued).await {
                return;
            }
        }
    }

    /// The next notice, waiting for it; none once the lane is to end.
    async fn first(&mut self) -> Option<Notice> {
        let LaneStop { draining, stop } = &self.stop;
        tokio::select! {
            biased;
            () = stop.cancelled() => None,
            n = self.rx.recv() => n,
            // Nothing queued, and nothing more will come.
            () = draining.cancelled() => self.rx.try_recv().ok(),
        }
    }

    /// Whatever queued up meanwhile, or comes within the linger, goes in
    /// the same request as `first`. The linger counts from when the first
    /// notice happened: one that already waited behind a delivery waits no
    /// more.
    async fn gather(&mut self, first: Notice, queued: &mut Vec<Notice>) {
        let LaneStop { draining, stop } = &self.stop;
        let until = self.timing.clock.instant(first.at) + self.timing.linger;
        queued.push(first);
        let batching = self.batches.load(Ordering::Relaxed);
        while queued.len() < BATCH_MAX {
            match self.rx.try_recv() {
                Ok(n) => queued.push(n),
                Err(_) if !batching || draining.is_cancelled() || Instant::now() >= until => {
                    break;
                }
                Err(_) => {
                    let room = BATCH_MAX - queued.len();
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = draining.cancelled() => break,
                        r = tokio::time::timeout_at(until, self.rx.recv_many(queued, room)) => {
                            if !matches!(r, Ok(n) if n > 0) {
                                break;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Sends `queued` in one `OnCallEvents`; a business service without it
    /// gets every notice one at a time from then on, from every lane.
    async fn send_batch(&self, queued: &[Notice]) -> Batch {
        let LaneTiming {
            deadline, clock, ..
        } = self.timing;
        let batch = pb::CallEventBatch {
            notices: queued
                .iter()
                .map(|n| notice_to_proto(n, clock.wall_time(n.at)))
                .collect(),
        };
        let send = || {
            let mut client = self.client.clone();
            let mut request = tonic::Request::new(batch.clone());
            request.set_timeout(deadline);
            async move { client.on_call_events(request).await.map(drop) }
        };
        let first = &queued[0];
        let what = Attempt {
            call_id: first.call_id,
            seq: first.seq,
            notices: queued.len(),
        };
        match deliver(send, what, deadline, &self.metrics, &self.stop.stop).await {
            Delivery::Done => Batch::Done,
            Delivery::Shutdown => Batch::Stop,
            Delivery::Refused(tonic::Code::Unimplemented) => {
                // Once is enough to know: one at a time from now on.
                if self.batches.swap(false, Ordering::Relaxed) {
                    info!(
                        "the business service does not implement OnCallEvents: notices go one at a time"
                    );
                }
                Batch::OneAtATime
            }
            Delivery::Refused(code) => {
                self.metrics.notices_rejected.inc_by(queued.len() as u64);
                warn!(call_id = %first.call_id, notices = queued.len(), ?code, "notice batch refused by the business service; not retried");
                Batch::Done
            }
        }
    }

    /// Sends each of `queued` in its own `OnCallEvent`, in order.
    async fn send_each(&self, queued: &mut Vec<Notice>) -> Next {
        let LaneTiming {
            deadline, clock, ..
        } = self.timing;
        for notice in queued.drain(..) {
            let proto = notice_to_proto(&notice, clock.wall_time(notice.at));
            let send = || {
                let mut client = self.client.clone();
                let mut request = tonic::Request::new(proto.clone());
                request.set_timeout(deadline);
                async move { client.on_call_event(request).await.map(drop) }
            };
            let what = Attempt {
                call_id: notice.call_id,
                seq: notice.seq,
                notices: 1,
            };
            let delivery = deliver(send, what, deadline, &self.metrics, &self.stop.stop).await;
            self.backlog.release([&notice]);
            match delivery {
                Delivery::Done => {}
                Delivery::Shutdown => return Next::Stop,
                Delivery::Refused(code) => {
                    self.metrics.notices_rejected.inc();
                    warn!(call_id = %notice.call_id, seq = notice.seq, ?code, "notice refused by the business service; not retried");
                }
            }
        }
        Next::Continue
    }
}

/// What a delivery attempt carries, for logs.
#[derive(Clone, Copy)]
struct Attempt {
    call_id: CallId,
    seq: u32,
    notices: usize,
}

enum Delivery {
    Done,
    /// Refused as malformed or unsupported: sending it again will not help.
    Refused(tonic::Code),
    Shutdown,
}

/// Sends until the business service takes it or refuses it for good,
/// retrying with exponential backoff in between.
async fn deliver<F, Fut>(
    send: F,
    what: Attempt,
    deadline: Duration,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Delivery
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(), tonic::Status>>,
{
    let mut backoff = RETRY_FIRST;
    let mut attempt = 1u32;
    loop {
        let result = tokio::select! {
            () = shutdown.cancelled() => return Delivery::Shutdown,
            r = tokio::time::timeout(deadline, send()) => r,
        };
        let error = match result {
            Ok(Ok(())) => return Delivery::Done,
            Ok(Err(status)) if !retryable(status.code()) => {
                if status.code() != tonic::Code::Unimplemented {
                    debug!(error = %status.message(), "refused");
                }
                return Delivery::Refused(status.code());
            }
            Ok(Err(status)) => format!("{}: {}", status.code(), status.message()),
            Err(_) => "deadline passed".to_owned(),
        };
        metrics.notice_retries.inc();
        if attempt == 1 {
            warn!(call_id = %what.call_id, seq = what.seq, notices = what.notices, %error, "notice not delivered; retrying with backoff");
        } else {
            debug!(call_id = %what.call_id, seq = what.seq, notices = what.notices, attempt, %error, "notice not delivered");
        }
        tokio::select! {
            () = shutdown.cancelled() => return Delivery::Shutdown,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(RETRY_MAX);
        attempt += 1;
    }
}

/// Whether a failed notice is worth sending again.
fn retryable(code: tonic::Code) -> bool {
    !matches!(
        code,
        tonic::Code::InvalidArgument | tonic::Code::Unimplemented | tonic::Code::OutOfRange
    )
}
