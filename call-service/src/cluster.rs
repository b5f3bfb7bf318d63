//! A node of a cluster: the [`Switchboard`] over the shared store
//! ([`crate::shared`]), for `--redis-url`.
//!
//! **Who owns what.** The call state is in Redis; every input runs the
//! rules over loaded records and commits with version checks, so inputs of
//! this node run concurrently (each in the task that brought it: a device's
//! stream, an approval, the timer task) and races between them, or with
//! other nodes, are settled by the commit. What is node-local is the
//! streams attached here, in [`Local`] behind a mutex that is never held
//! across an `.await`.
//!
//! **Order.** A device's events, and the business service's notices, are
//! not handed on by the task that committed them but through this node's
//! inbox, which the commit script appends to: one reader task
//! ([`inbox_loop`]) delivers them in commit order, whichever node
//! committed. A control's result is queued by the device's own stream task
//! once its commit is in and the inbox has been handed on up to the
//! commit's mark (what was in it before the commit's own entries), so a
//! device gets every event committed before its control, then the result,
//! then the events of the result's own transition, as on one node. A
//! result whose inbox is read late (Redis away) waits at most until its
//! control's bound, [`INPUT_TIMEOUT`], then goes out of turn rather than
//! late.
//!
//! **An attachment's first events.** A device's events may be read from
//! the inbox before the task that attached it has registered its stream
//! (the commit returns to both at once): they wait in [`Local::early`],
//! by epoch, and follow `Connected` (and what was parked).
//!
//! **Leases.** A node renews its lease ([`lease_loop`]); a node whose lease
//! ran out is reaped by the others ([`timer_loop`]): marked first, then its
//! devices become detached for the resume grace window, its unread inbox
//! is taken over. A lease nobody has marked is renewed even late; a node
//! that finds its own lease lost (marked, or gone) closes its streams (its
//! clients resume elsewhere) and joins afresh. A node reaps only after its
//! own lease has been renewed without a failure for a whole lease period,
//! so nodes that come back from a Redis outage together renew late and do
//! not reap each other: their streams stay open. A node that cannot reach
//! Redis keeps its streams until its lease and half the grace window have
//! passed, then closes them (its clients resume on another node).
//!
//! **Redis faults.** Every input is bounded by [`INPUT_TIMEOUT`]: past it,
//! or on a Redis error, a control is answered STORE_UNAVAILABLE (100208)
//! and health turns NOT_SERVING until the lease is renewed again. Streams
//! stay open; talking calls are not touched.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::clock::Clock;
use crate::codes;
use crate::device::{DeviceTx, Outgoing, Reason};
use crate::domain::{
    CallId, ConnId, Control, ControlKind, Effect, ForceFinish, Notice, Outcome, Time, UserId,
    Verdict,
};
use crate::hook::Hook;
use crate::machine::{CallSummary, MachineConfig, UserSummary, state_of};
use crate::metrics::Metrics;
use crate::shared::{
    EntryId, Inbound, InboxReader, LaneDone, LaneReader, Lease, Node, SharedError, SharedStore,
    Timing,
};
use crate::store::NodeId;
use crate::switchboard::{
    APPROVALS_FULL, Attached, CALLER_OVER_QUOTA, ConnectError, DEVICE_QUEUE, OBSERVER_QUEUE,
    Observed, ShuttingDown, Stats, Switchboard, SwitchboardLimits, Unavailable, connected,
    new_call_id, observer,
};

/// The longest an input may wait for the store before it is refused
/// (STORE_UNAVAILABLE): a few round trips, each bounded by
/// [`crate::shared::STORE_TIMEOUT`].
pub const INPUT_TIMEOUT: Duration = Duration::from_millis(1500);
/// How often a node looks for due timers (ring timeouts, grace windows).
/// Every node does, a little apart; a timer fired twice acts once.
const TICK: Duration = Duration::from_millis(50);
/// Attachments' first events held for a stream not yet registered, in all.
const EARLY_LIMIT: usize = 4096;
/// How long a node keeps the inbox entries it has read: events handed to
/// its streams that far back may not have reached their clients when it
/// dies, so a reaper parks them again (clients drop what they already had:
/// one event of each type per call and device).
const REDELIVERY_WINDOW: Duration = Duration::from_secs(3);
/// How often the inbox reader trims what it read past the redelivery
/// window (the inbox holds at most this much more).
const TRIM_EVERY: Duration = Duration::from_millis(500);

/// The pause after a read of the notice lanes that found notices (see
/// `lane_loop`): notices are not awaited by calls, so a few milliseconds
/// more for some of them buys one read per batch instead of per notice.
const LANE_LINGER: Duration = Duration::from_millis(5);
/// How long they are held.
const EARLY_TTL: Duration = Duration::from_secs(5);

/// Where the cluster's state is, and this node's lease.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// `redis://host:port/`.
    pub redis_url: String,
    /// Prefix of every key (`vc:`): clusters may share a Redis.
    pub prefix: String,
    /// How long a node's lease lasts without renewal; a node silent for
    /// longer is reaped.
    pub lease: Duration,
    /// How long after its REQUEST a call still waiting for approval is
    /// decided by the failure policy (this verdict; without a business
    /// service, Allow) on any node: for when the node that asked died, or
    /// never learnt its REQUEST had committed (the reply lost).
    pub approval: (Duration, Verdict),
}

/// Handle to this node. Cheap to clone.
#[derive(Clone)]
pub struct ClusterSwitchboard {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ClusterSwitchboard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterSwitchboard")
            .field("node", &self.inner.id)
            .finish_non_exhaustive()
    }
}

struct Inner {
    id: NodeId,
    /// Cloned for each input (its connection is shared, multiplexed).
    node: Node,
    cluster: ClusterConfig,
    local: Mutex<Local>,
    limits: SwitchboardLimits,
    business: Option<Arc<dyn Hook>>,
    clock: Clock,
    metrics: Metrics,
    observer: mpsc::Sender<Observed>,
    next_conn: AtomicU64,
    approvals: AtomicUsize,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    /// The inbox and lane readers' reads (round trips of their own
    /// connections).
    reads: AtomicU64,
    /// Cancelled once the node has made its last transition (on shutdown).
    closed: CancellationToken,
    /// Whether the store answers and the lease is held (health).
    serving: watch::Sender<bool>,
    /// Since when (ms) the lease has been renewed without a failure; 0:
    /// it failed last.
    healthy_since: AtomicU64,
    /// Whether this node holds its lease: without it, it takes no devices
    /// and leaves its inbox to be reaped (see `lease_loop`).
    held: AtomicBool,
    /// Held (shared) by each connect from its check of `held` until its
    /// stream is registered; taken (exclusive) by a node losing its lease
    /// before it closes its streams and reaps itself, so no device is
    /// attached in the store halfway through that and left with a stream
    /// nobody serves.
    connecting: tokio::sync::RwLock<()>,
    /// Woken when a result waits for the inbox: a reader backing off after
    /// a Redis failure tries again at once.
    nudge: tokio::sync::Notify,
}

/// The streams attached to this node.
#[derive(Default)]
struct Local {
    streams: HashMap<ConnId, Entry>,
    /// Events read for an attachment (device, epoch) whose stream is not
    /// registered yet, with when the first came.
    early: HashMap<ConnId, (u64, Time, Vec<Outgoing>)>,
    early_count: usize,
    /// The last inbox entry handed on.
    delivered: EntryId,
    /// Results waiting for the inbox to be handed on up to their commit's
    /// mark (few, and only while the reader lags): in control order per
    /// stream.
    waiting: std::collections::VecDeque<Waiting>,
    next_waiting: u64,
    /// The devices with a control being committed, and the events the
    /// inbox brought them meanwhile: those before the commit's mark go
    /// before its result, the rest (its own transition's) after.
    in_flight: HashMap<ConnId, Vec<(EntryId, Outgoing)>>,
}

/// A control's result held until the events committed before it are
/// handed on.
struct Waiting {
    id: u64,
    conn: ConnId,
    epoch: u64,
    after: EntryId,
    msg: Outgoing,
    sent: tokio::sync::oneshot::Sender<()>,
}

struct Entry {
    user: UserId,
    epoch: u64,
    tx: DeviceTx,
    superseded: CancellationToken,
    moved: CancellationToken,
}

impl ClusterSwitchboard {
    /// Joins the cluster (a new node id, a lease) and starts this node's
    /// tasks on `tasks`, until `shutdown`.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        cluster: ClusterConfig,
        config: MachineConfig,
        limits: SwitchboardLimits,
        clock: Clock,
        business: Option<Arc<dyn Hook>>,
        metrics: Metrics,
        tasks: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<Self, SharedError> {
        let mut store = SharedStore::join(&cluster.redis_url, &cluster.prefix).await?;
        store.time_round_trips(Timing {
            commits: metrics.store_commit_seconds.clone(),
            loads: metrics.store_load_seconds.clone(),
        });
        let id = store.node();
        store.lease(clock.time(), cluster.lease, true).await?;
        // A new id's inbox is empty: read from its start.
        let reader = InboxReader::open(&cluster.redis_url, &cluster.prefix, id, "0-0")
            .await?
            .feeding(&store);
        let lanes = LaneReader::open(&cluster.redis_url, &cluster.prefix).await?;
        let (observed, observed_rx) = mpsc::channel(OBSERVER_QUEUE);
        // The handle (and with it the observer's sender) lives as long as
        // the servers that hold it: the observer ends with the node's last
        // transition instead.
        let closed = CancellationToken::new();
        let observing = observer(observed_rx, metrics.clone());
        let end = closed.clone();
        tasks.spawn(async move {
            tokio::select! {
                () = observing => {}
                () = end.cancelled() => {}
            }
        });
        let (serving, _) = watch::channel(true);
        let inner = Arc::new(Inner {
            id,
            node: {
                let mut node = Node::new(store, config.ring_timeout);
                let (timeout, failure) = cluster.approval;
                node.time_approvals(timeout, failure);
                node
            },
            cluster,
            local: Mutex::new(Local::default()),
            limits,
            business,
            clock,
            metrics,
            observer: observed,
            next_conn: AtomicU64::new(1),
            approvals: AtomicUsize::new(0),
            tasks: tasks.clone(),
            shutdown,
            closed,
            reads: AtomicU64::new(0),
            serving,
            healthy_since: AtomicU64::new(millis(clock.time())),
            held: AtomicBool::new(true),
            connecting: tokio::sync::RwLock::new(()),
            nudge: tokio::sync::Notify::new(),
        });
        info!(node = id.0, "joined the cluster");
        tasks.spawn(inbox_loop(inner.clone(), reader));
        tasks.spawn(lane_loop(inner.clone(), lanes));
        tasks.spawn(timer_loop(inner.clone()));
        tasks.spawn(lease_loop(inner.clone()));
        Ok(Self { inner })
    }

    /// This node's id in the cluster.
    pub fn node(&self) -> NodeId {
        self.inner.id
    }

    /// Round trips to Redis so far (the readers' blocking reads too), and
    /// commits that lost a race.
    pub fn store_counts(&self) -> (u64, u64) {
        let mut node = self.inner.node.clone();
        let s = node.store();
        (
            s.round_trips() + self.inner.reads.load(Ordering::Relaxed),
            s.conflicts(),
        )
    }

    /// Whether this node can serve: the store answers and the lease is held.
    pub fn serving(&self) -> watch::Receiver<bool> {
        self.inner.serving.subscribe()
    }
}

fn millis(t: Time) -> u64 {
    u64::try_from(t.as_millis()).unwrap_or(u64::MAX)
}

/// Runs an input against the store within [`INPUT_TIMEOUT`].
async fn bounded<T>(
    inner: &Inner,
    f: impl Future<Output = Result<T, SharedError>>,
) -> Result<T, SharedError> {
    let r = match tokio::time::timeout(INPUT_TIMEOUT, f).await {
        Ok(r) => r,
        Err(_) => Err(SharedError::Timeout),
    };
    if let Err(e) = &r {
        // Any failure, on any of this node's commands (a lease renewal, a
        // timer poll, a query), may be Redis restarting: nothing cached is
        // trusted again before it is loaded.
        inner.node.forget_cached();
        inner.unhealthy(e);
    }
    r
}

const UNAVAILABLE: Outcome = Outcome {
    code: codes::STORE_UNAVAILABLE,
    call_id: None,
    reason: "the shared call state is unavailable; nothing changed, try again",
};

impl Inner {
    fn now(&self) -> Time {
        self.clock.time()
    }

    /// Backpressure on a caller whose calls' notices pile up (see
    /// `business`): its flood must not cost others theirs. Counted over
    /// the cluster: what waits here if this node hands them on (`Err`:
    /// over quota already), and what waits in the notice lanes in Redis,
    /// which the REQUEST's commit checks (the caller and the quota, `Ok`).
    fn quota(&self, conn: ConnId) -> Result<Option<(UserId, usize)>, ()> {
        let Some(b) = &self.business else {
            return Ok(None);
        };
        let user = {
            let local = self.local.lock().unwrap_or_else(|p| p.into_inner());
            match local.streams.get(&conn) {
                Some(e) => e.user.clone(),
                None => return Ok(None),
            }
        };
        if b.caller_over_quota(&user) {
            return Err(());
        }
        Ok(Some((user, self.limits.max_notices_per_caller)))
    }

    fn unhealthy(&self, e: &SharedError) {
        warn!(error = %e, "the shared store failed");
        self.metrics.store_errors.inc();
        self.healthy_since.store(0, Ordering::Relaxed);
        self.serving
            .send_if_modified(|s| std::mem::replace(s, false));
    }

    fn report(&self, o: Observed) {
        if self.observer.try_send(o).is_err() {
            self.metrics.observations_dropped.inc();
        }
    }

    /// Performs what a commit left in `out`: approvals (events and notices
    /// went through the inboxes).
    fn perform(self: &Arc<Self>, out: Vec<Effect>) {
        for effect in out {
            let Effect::Approve(notice) = effect else {
                continue;
            };
            self.report(Observed::Event(notice.clone()));
            let this = self.clone();
            self.approvals.fetch_add(1, Ordering::Relaxed);
            self.tasks.spawn(async move {
                let call_id = notice.call_id;
                let verdict = match &this.business {
                    // A node that stops drops the approvals it waits for,
                    // as a single node does: the calls end with the node.
                    Some(b) => tokio::select! {
                        v = b.approve(notice) => Some(v),
                        () = this.shutdown.cancelled() => None,
                    },
                    None => Some(Verdict::Allow),
                };
                if let Some(verdict) = verdict {
                    this.approved(call_id, verdict).await;
                }
                this.approvals.fetch_sub(1, Ordering::Relaxed);
            });
        }
    }

    /// Commits a verdict, retrying while the store is unavailable (the call
    /// would otherwise wait in approval), until shutdown.
    async fn approved(self: &Arc<Self>, call_id: CallId, verdict: Verdict) {
        self.until_done(move |mut node, now| async move {
            let mut out = Vec::new();
            let r = node.approval_done(call_id, verdict, now, &mut out).await;
            r.map(|()| out)
        })
        .await;
    }

    /// Runs an input that must not be lost (a verdict, a stream's end)
    /// until it commits, with back-off while the store is unavailable, or
    /// until shutdown; performs what it left.
    async fn until_done<F, Fut>(self: &Arc<Self>, mut input: F)
    where
        F: FnMut(Node, Time) -> Fut,
        Fut: Future<Output = Result<Vec<Effect>, SharedError>>,
    {
        let mut wait = Duration::from_millis(50);
        loop {
            if let Ok(out) = bounded(self, input(self.node.clone(), self.now())).await {
                self.perform(out);
                return;
            }
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(Duration::from_secs(1));
        }
    }

    /// Queues a message on a stream of this node; a full queue is a slow
    /// consumer: its stream ends and the device is dropped (its calls end
    /// as "connection lost"), as on one node.
    fn push(self: &Arc<Self>, local: &mut Local, conn: ConnId, msg: Outgoing) {
        let Some(entry) = local.streams.get(&conn) else {
            return;
        };
        if entry.tx.try_send(Box::new(msg)).is_ok() {
            return;
        }
        warn!(
            conn = conn.0,
            queue = DEVICE_QUEUE,
            "device not reading its stream: disconnecting it"
        );
        self.metrics.slow_consumers.inc();
        if let Some(entry) = local.streams.remove(&conn) {
            self.end_stream(conn, entry.epoch, None);
        }
    }

    /// Commits a stream's end in a task of its own (retried while the store
    /// is unavailable, so no device stays attached to a stream that is
    /// gone).
    fn end_stream(self: &Arc<Self>, conn: ConnId, epoch: u64, keep: Option<Time>) {
        let this = self.clone();
        self.tasks
            .spawn(async move { this.stream_ended(conn, epoch, keep).await });
    }

    async fn stream_ended(self: &Arc<Self>, conn: ConnId, epoch: u64, keep: Option<Time>) {
        self.until_done(move |mut node, now| async move {
            let mut out = Vec::new();
            let r = node.stream_ended(conn, epoch, keep, now, &mut out).await;
            r.map(|()| out)
        })
        .await;
    }

    /// Registers a stream the store now names for `conn` at `epoch`: its
    /// `Connected` first, then what was parked, then what the inbox
    /// brought meanwhile.
    #[allow(clippy::too_many_arguments)]
    fn register(
        self: &Arc<Self>,
        conn: ConnId,
        epoch: u64,
        user: &UserId,
        token: &Arc<str>,
        resumed: bool,
        parked: impl IntoIterator<Item = Outgoing>,
        tx: DeviceTx,
        superseded: CancellationToken,
    ) -> CancellationToken {
        let moved = CancellationToken::new();
        let mut local = self.local.lock().unwrap_or_else(|p| p.into_inner());
        let parked: Vec<Outgoing> = parked.into_iter().collect();
        let _ = tx.try_send(Box::new(connected(user, conn, token, resumed, &parked)));
        if let Some(old) = local.streams.insert(
            conn,
            Entry {
                user: user.clone(),
                epoch,
                tx,
                superseded,
                moved: moved.clone(),
            },
        ) {
            old.superseded.cancel();
        }
        let early = local.early.remove(&conn);
        if let Some((_, _, msgs)) = &early {
            local.early_count -= msgs.len();
        }
        for msg in parked {
            self.push(&mut local, conn, msg);
        }
        if let Some((e, _, msgs)) = early
            && e == epoch
        {
            for msg in msgs {
                self.push(&mut local, conn, msg);
            }
        }
        moved
    }

    /// Hands a notice from a lane this node owns to the business service.
    fn notice(&self, n: Notice) {
        self.report(Observed::Event(n.clone()));
        if let Some(b) = &self.business {
            b.notify(n);
        }
    }

    /// Hands on what the inbox brought, each entry after the results
    /// waiting for the entries before it.
    fn deliver(self: &Arc<Self>, entries: Vec<(EntryId, Inbound)>) {
        let now = self.now();
        let mut notices = Vec::new();
        {
            let mut local = self.local.lock().unwrap_or_else(|p| p.into_inner());
            for (id, entry) in entries {
                self.release(&mut local, |after| after < id);
                local.delivered = local.delivered.max(id);
                match entry {
                    // Not in inboxes (see `shared`); handed on if found.
                    Inbound::Notice(n) => notices.push(n),
                    // Resumed on another node: this stream ends as one a
                    // resume replaces on one node (FAILED_PRECONDITION).
                    Inbound::Moved { conn, epoch } => {
                        if local.streams.get(&conn).is_some_and(|e| e.epoch == epoch)
                            && let Some(old) = local.streams.remove(&conn)
                        {
                            old.superseded.cancel();
                        }
                    }
                    Inbound::Event { conn, epoch, event } => {
                        let msg = Outgoing::Event(event);
                        match local.streams.get(&conn).map(|e| e.epoch) {
                            // Its control is being committed: these wait to
                            // go around its result.
                            Some(e)
                                if e == epoch
                                    && local
                                        .in_flight
                                        .get(&conn)
                                        .is_some_and(|held| held.len() < DEVICE_QUEUE) =>
                            {
                                if let Some(held) = local.in_flight.get_mut(&conn) {
                                    held.push((id, msg));
                                }
                            }
                            Some(e) if e == epoch => self.push(&mut local, conn, msg),
                            // Sent to an attachment that was taken over.
                            Some(e) if e > epoch => {}
                            _ => hold_early(&mut local, conn, epoch, now, msg),
                        }
                    }
                }
            }
            let delivered = local.delivered;
            self.release(&mut local, |after| after <= delivered);
        }
        for n in notices {
            self.notice(n);
        }
    }

    /// Queues the waiting results that `ready` (given their mark) lets go,
    /// in the order they came.
    fn release(self: &Arc<Self>, local: &mut Local, ready: impl Fn(EntryId) -> bool) {
        if local.waiting.is_empty() {
            return;
        }
        let mut keep = std::collections::VecDeque::new();
        while let Some(w) = local.waiting.pop_front() {
            // Behind a result of its stream that still waits: in turn.
            if ready(w.after) && !keep.iter().any(|k: &Waiting| k.conn == w.conn) {
                self.answer_now(local, w.conn, w.epoch, w.msg);
                let _ = w.sent.send(());
            } else {
                keep.push_back(w);
            }
        }
        local.waiting = keep;
    }

    fn answer_now(self: &Arc<Self>, local: &mut Local, conn: ConnId, epoch: u64, msg: Outgoing) {
        if local.streams.get(&conn).is_some_and(|e| e.epoch == epoch) {
            self.push(local, conn, msg);
        }
    }

    /// Notes that a control of `conn` is being committed: the events the
    /// inbox brings it meanwhile wait for [`Inner::answer`].
    fn committing(&self, conn: ConnId) {
        let mut local = self.local.lock().unwrap_or_else(|p| p.into_inner());
        local.in_flight.insert(conn, Vec::new());
    }

    /// Queues a control's result on its stream once every inbox entry up
    /// to `after` (its commit's mark) is handed on, and after any earlier
    /// result of the stream, and the events of its own transition after it
    /// (`msg` `None`: no result, from a stream that no longer holds the
    /// device; `after` `None`: nothing committed, so what came meanwhile
    /// goes first); past `deadline` it goes at once.
    async fn answer(
        self: &Arc<Self>,
        conn: ConnId,
        epoch: u64,
        after: Option<EntryId>,
        msg: Option<Outgoing>,
        deadline: tokio::time::Instant,
    ) {
        let (id, sent) = {
            let mut local = self.local.lock().unwrap_or_else(|p| p.into_inner());
            let held = local.in_flight.remove(&conn).unwrap_or_default();
            let (before, own): (Vec<_>, Vec<_>) = held
                .into_iter()
                .partition(|(i, _)| after.is_none_or(|a| *i <= a));
            let after = after.unwrap_or_default();
            for (_, m) in before {
                self.answer_now(&mut local, conn, epoch, m);
            }
            let behind = local.waiting.iter().any(|w| w.conn == conn);
            let Some(msg) = msg else {
                for (_, m) in own {
                    self.answer_now(&mut local, conn, epoch, m);
                }
                return;
            };
            if after <= local.delivered && !behind {
                self.answer_now(&mut local, conn, epoch, msg);
                for (_, m) in own {
                    self.answer_now(&mut local, conn, epoch, m);
                }
                return;
            }
            // Not read that far yet: nothing of its own came either.
            let id = local.next_waiting;
            local.next_waiting += 1;
            let (tx, rx) = tokio::sync::oneshot::channel();
            local.waiting.push_back(Waiting {
                id,
                conn,
                epoch,
                after,
                msg,
                sent: tx,
            });
            (id, rx)
        };
        self.nudge.notify_one();
        if tokio::time::timeout_at(deadline, sent).await.is_ok() {
            return;
        }
        // The inbox is not read in time (Redis away): this result, and
        // those of its stream before it, go now, out of turn rather than
        // late.
        let mut local = self.local.lock().unwrap_or_else(|p| p.into_inner());
        let mut keep = std::collections::VecDeque::new();
        while let Some(w) = local.waiting.pop_front() {
            if w.conn == conn && w.id <= id {
                self.answer_now(&mut local, w.conn, w.epoch, w.msg);
                let _ = w.sent.send(());
            } else {
                keep.push_back(w);
            }
        }
        local.waiting = keep;
    }

    /// Commits the end of every stream of this node: with a grace window
    /// its devices are detached, for their clients to resume elsewhere;
    /// without one, when the node stops, their calls end TERMINATED
    /// (100206) as a single node's do. The streams stay registered, to
    /// get what these commits send them ([`Inner::close_all`] ends them).
    async fn detach_all(self: &Arc<Self>, stopping: bool) {
        let streams: Vec<(ConnId, u64)> = {
            let local = self.local.lock().unwrap_or_else(|p| p.into_inner());
            local.streams.iter().map(|(c, e)| (*c, e.epoch)).collect()
        };
        let now = self.now();
        let grace = self.limits.resume_grace;
        let keep = (!grace.is_zero()).then(|| now + grace);
        for (conn, epoch) in streams {
            let mut node = self.node.clone();
            let mut out = Vec::new();
            let done = if keep.is_none() && stopping {
                bounded(self, node.end_device(conn, epoch, now, &mut out)).await
            } else {
                bounded(self, node.stream_ended(conn, epoch, keep, now, &mut out)).await
            };
            if done.is_ok() {
                self.perform(out);
            }
        }
    }

    /// Ends every stream of this node once it has sent what it holds,
    /// with UNAVAILABLE: clients reconnect (through the balancer, to
    /// another node) and resume.
    fn close_all(&self) {
        let mut local = self.local.lock().unwrap_or_else(|p| p.into_inner());
        local.early.clear();
        local.early_count = 0;
        local.waiting.clear();
        local.in_flight.clear();
        // Dropping a queue's sender ends its response stream.
        for (_, e) in local.streams.drain() {
            e.moved.cancel();
        }
    }
}

fn hold_early(local: &mut Local, conn: ConnId, epoch: u64, now: Time, msg: Outgoing) {
    if local.early_count >= EARLY_LIMIT {
        debug!(
            conn = conn.0,
            "too many events for streams not registered: dropped"
        );
        return;
    }
    let slot = local
        .early
        .entry(conn)
        .or_insert_with(|| (epoch, now, Vec::new()));
    if slot.0 < epoch {
        local.early_count -= slot.2.len();
        *slot = (epoch, now, Vec::new());
    }
    if slot.0 == epoch && slot.2.len() < DEVICE_QUEUE {
        slot.2.push(msg);
        local.early_count += 1;
    }
}

/// Reads this node's inbox and hands on what it brings, in commit order,
/// then drops it from the inbox (what a node leaves unread when it dies is
/// taken over by the one that reaps it). On shutdown: this node's devices
/// are detached for their clients to resume on another node, the notices
/// committed until then are handed on, and the node leaves.
async fn inbox_loop(inner: Arc<Inner>, mut reader: InboxReader) {
    let mut wait = Duration::from_millis(50);
    let mut trimmed = tokio::time::Instant::now();
    loop {
        if !inner.held.load(Ordering::SeqCst) {
            // Its lease ran out: what is in the inbox is for the reaping
            // (parked for the devices), not for streams it no longer has.
            tokio::select! {
                () = inner.shutdown.cancelled() => break,
                () = tokio::time::sleep(Duration::from_millis(50)) => continue,
            }
        }
        let read = tokio::select! {
            () = inner.shutdown.cancelled() => break,
            r = reader.next(Duration::from_secs(1), 512) => r,
        };
        inner.reads.fetch_add(1, Ordering::Relaxed);
        match read {
            Ok(entries) => {
                wait = Duration::from_millis(50);
                if entries.is_empty() {
                    continue;
                }
                inner.deliver(entries);
                if let Some(at) = reader.oldest_ms() {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis());
                    // Clocks apart (another host's) read as no lag.
                    let lag = now.saturating_sub(u128::from(at));
                    inner.metrics.inbox_lag_seconds.observe(lag as f64 / 1000.0);
                }
                // Trimmed at most every TRIM_EVERY, not after every read:
                // a round trip per read would be one per event at low rates.
                if trimmed.elapsed() >= TRIM_EVERY {
                    trimmed = tokio::time::Instant::now();
                    let mut node = inner.node.clone();
                    let last = reader.last().to_owned();
                    let trim = node
                        .store()
                        .trim_inbox_read(inner.id, &last, REDELIVERY_WINDOW);
                    let _ = bounded(&inner, trim).await;
                }
            }
            Err(e) => {
                inner.unhealthy(&e);
                tokio::select! {
                    () = inner.shutdown.cancelled() => break,
                    () = tokio::time::sleep(wait) => {}
                    () = inner.nudge.notified() => {}
                }
                wait = (wait * 2).min(Duration::from_secs(1));
                let c = &inner.cluster;
                match InboxReader::open(&c.redis_url, &c.prefix, inner.id, reader.last()).await {
                    Ok(r) => reader = r.feeding(inner.node.clone().store()),
                    Err(e) => debug!(error = %e, "inbox reader: not reconnected yet"),
                }
            }
        }
    }
    inner.detach_all(true).await;
    // What the last transitions committed, for this node's streams and the
    // business service. Read on the shared connection: the reader's may
    // still wait for the blocking read this loop left.
    let mut node = inner.node.clone();
    let mut last = reader.last().to_owned();
    while let Ok(entries) = bounded(&inner, node.store().inbox(inner.id, &last, 512)).await {
        let Some((id, _)) = entries.last() else { break };
        last = id.clone();
        inner.deliver(
            entries
                .into_iter()
                .map(|(id, e)| (EntryId::parse(&id).unwrap_or_default(), e))
                .collect(),
        );
    }
    inner.close_all();
    // The notices of the lanes this node owns, to their end; then the
    // lanes go to the other nodes.
    if let Ok(lanes) = bounded(&inner, node.store().claim_lanes(inner.now())).await {
        for (lane, mut after) in lanes {
            while let Ok(notices) = bounded(&inner, node.store().lane(lane, &after, 512)).await {
                let Some((id, _)) = notices.last() else { break };
                after = id.clone();
                let mut done = LaneDone {
                    lane,
                    upto: after.clone(),
                    callers: HashMap::new(),
                };
                for (_, n) in notices {
                    *done.callers.entry(n.caller.clone()).or_insert(0) += 1;
                    inner.notice(n);
                }
                let _ = bounded(&inner, node.store().lanes_done(&[done])).await;
            }
        }
    }
    let _ = bounded(&inner, node.store().release_lanes()).await;
    if let Some(b) = &inner.business {
        b.close();
    }
    let _ = bounded(&inner, node.store().leave()).await;
    info!(node = inner.id.0, "left the cluster");
    inner.closed.cancel();
}

/// Hands the notices of the lanes this node owns to the business service,
/// in commit order, and notes how far each lane went (its next owner goes
/// on from there: a notice may then be delivered twice, never lost).
/// Lanes are claimed every third of a lease: those of a node whose lease
/// ran out go to whichever live node claims them first.
async fn lane_loop(inner: Arc<Inner>, mut reader: LaneReader) {
    let mut node = inner.node.clone();
    let every = inner.cluster.lease / 3;
    let mut owned: Vec<(u32, String)> = Vec::new();
    let mut claimed: Option<tokio::time::Instant> = None;
    let mut wait = Duration::from_millis(50);
    loop {
        if claimed.is_none_or(|t| t.elapsed() >= every) {
            claimed = Some(tokio::time::Instant::now());
            if let Ok(lanes) = bounded(&inner, node.store().claim_lanes(inner.now())).await {
                let before: Vec<u32> = owned.iter().map(|(l, _)| *l).collect();
                // Where this node has got to is ahead of what it saved.
                owned = lanes
                    .into_iter()
                    .map(
                        |(lane, saved)| match owned.iter().find(|(l, _)| *l == lane) {
                            Some((_, mine)) => (lane, mine.clone()),
                            None => (lane, saved),
                        },
                    )
                    .collect();
                inner
                    .metrics
                    .lanes_owned
                    .set(i64::try_from(owned.len()).unwrap_or(0));
                let gained = owned.iter().filter(|(l, _)| !before.contains(l)).count();
                let lost = before
                    .iter()
                    .filter(|l| !owned.iter().any(|(o, _)| o == *l))
                    .count();
                inner.metrics.lane_changes.inc_by((gained + lost) as u64);
            }
        }
        if owned.is_empty() || inner.business.as_ref().is_some_and(|b| b.busy()) {
            // Nothing to read, or the business service's queues are full:
            // the notices wait in Redis (never dropped here).
            let pause = if owned.is_empty() {
                every
            } else {
                Duration::from_millis(10)
            };
            tokio::select! {
                () = inner.shutdown.cancelled() => return,
                () = tokio::time::sleep(pause) => continue,
            }
        }
        let read = tokio::select! {
            () = inner.shutdown.cancelled() => return,
            r = reader.next(&owned, every.min(Duration::from_secs(1)), 512) => r,
        };
        inner.reads.fetch_add(1, Ordering::Relaxed);
        match read {
            Ok(notices) => {
                wait = Duration::from_millis(50);
                if notices.is_empty() {
                    continue;
                }
                let mut done: Vec<LaneDone> = Vec::new();
                for (lane, id, n) in notices {
                    let caller = n.caller.clone();
                    inner.notice(n);
                    let d = match done.iter().position(|d| d.lane == lane) {
                        Some(i) => &mut done[i],
                        None => {
                            done.push(LaneDone {
                                lane,
                                ..LaneDone::default()
                            });
                            done.last_mut().expect("pushed")
                        }
                    };
                    d.upto = id;
                    *d.callers.entry(caller).or_insert(0) += 1;
                }
                for d in &done {
                    if let Some(o) = owned.iter_mut().find(|(l, _)| *l == d.lane) {
                        o.1 = d.upto.clone();
                    }
                }
                let _ = bounded(&inner, node.store().lanes_done(&done)).await;
                // A read that found notices is followed by a short pause, so
                // that under load one read (and one note of how far it got)
                // carries the notices of many calls instead of a round trip
                // each; the first notice after a quiet spell is read at once.
                tokio::select! {
                    () = inner.shutdown.cancelled() => return,
                    () = tokio::time::sleep(LANE_LINGER) => {}
                }
            }
            Err(e) => {
                inner.unhealthy(&e);
                tokio::select! {
                    () = inner.shutdown.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
                wait = (wait * 2).min(Duration::from_secs(1));
                let c = &inner.cluster;
                match LaneReader::open(&c.redis_url, &c.prefix).await {
                    Ok(r) => reader = r,
                    Err(e) => debug!(error = %e, "lane reader: not reconnected yet"),
                }
            }
        }
    }
}

/// Fires due timers and reaps nodes whose lease ran out, every [`TICK`]
/// (a little jittered, so nodes do not all poll at once).
async fn timer_loop(inner: Arc<Inner>) {
    let mut node = inner.node.clone();
    let mut last_reap = Time::ZERO;
    loop {
        let jitter = Duration::from_millis(u64::from(rand_u8() % 20));
        tokio::select! {
            () = inner.shutdown.cancelled() => return,
            () = tokio::time::sleep(TICK - Duration::from_millis(10) + jitter) => {}
        }
        let now = inner.now();
        let mut out = Vec::new();
        if bounded(&inner, node.tick(now, &mut out)).await.is_ok() {
            inner.perform(std::mem::take(&mut out));
        }
        let lease = inner.cluster.lease;
        let since = inner.healthy_since.load(Ordering::Relaxed);
        let settled = since != 0 && millis(now) >= since + millis(lease);
        if settled && now >= last_reap + lease / 2 {
            last_reap = now;
            let grace = inner.limits.resume_grace;
            match bounded(&inner, node.reap(now, grace, &mut out)).await {
                Ok(0) => {}
                Ok(n) => {
                    info!(devices = n, "reaped a node whose lease ran out");
                    inner.metrics.reaped_devices.inc_by(n as u64);
                }
                Err(_) => {}
            }
            inner.perform(out);
        }
        {
            let mut local = inner.local.lock().unwrap_or_else(|p| p.into_inner());
            let before = local.early.len();
            local.early.retain(|_, (_, at, _)| now < *at + EARLY_TTL);
            if local.early.len() != before {
                local.early_count = local.early.values().map(|(_, _, m)| m.len()).sum();
            }
        }
    }
}

fn rand_u8() -> u8 {
    uuid::Uuid::new_v4().as_bytes()[0]
}

/// Renews this node's lease every third of it. A lease found lost: this
/// node was reaped (cut off from Redis for longer than its lease), so its
/// streams are closed (their clients resume elsewhere) and it joins again.
async fn lease_loop(inner: Arc<Inner>) {
    let mut node = inner.node.clone();
    let lease = inner.cluster.lease;
    // When the lease was last renewed: a node cut off from Redis for
    // longer is being reaped by the others.
    let mut renewed = inner.now();
    // Whether it closed its streams while cut off: what the store still
    // has attached here is then served by nobody, so once Redis answers it
    // reaps its own lease instead of renewing it (below).
    let mut cut_closed = false;
    loop {
        tokio::select! {
            () = inner.shutdown.cancelled() => return,
            () = tokio::time::sleep(lease / 3) => {}
        }
        let now = inner.now();
        let renewal = if cut_closed {
            Ok(Lease::Lost)
        } else {
            bounded(&inner, node.store().lease(now, lease, false)).await
        };
        match renewal {
            Ok(Lease::Held) => {
                renewed = now;
                inner.held.store(true, Ordering::SeqCst);
                let _ = inner.healthy_since.compare_exchange(
                    0,
                    millis(now),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
                inner
                    .serving
                    .send_if_modified(|s| !std::mem::replace(s, true));
            }
            Ok(Lease::Lost) => {
                // Being reaped (or reaped and forgotten), or its streams
                // closed while it was cut off: what it holds may be stale.
                // It takes no devices and stops reading its inbox, ends its
                // streams (its clients resume, here or elsewhere), reaps its
                // old lease itself as any node would (devices the store
                // still has attached here are detached for their grace, its
                // inbox parked for them), and only then joins again. Until
                // it holds a lease it is not serving, so no client is taken
                // only to be dropped.
                warn!(
                    node = inner.id.0,
                    "this node's lease ran out: closing its streams and joining again"
                );
                inner.held.store(false, Ordering::SeqCst);
                inner.healthy_since.store(0, Ordering::Relaxed);
                inner
                    .serving
                    .send_if_modified(|s| std::mem::replace(s, false));
                // Connects under way finish first (each bounded), so the
                // streams closed below are all there are.
                let connects = inner.connecting.write().await;
                inner.detach_all(false).await;
                inner.close_all();
                drop(connects);
                let now = inner.now();
                let mut out = Vec::new();
                let grace = inner.limits.resume_grace;
                if bounded(&inner, node.reap_self(now, grace, &mut out))
                    .await
                    .is_err()
                {
                    continue;
                }
                inner.perform(out);
                let now = inner.now();
                if let Ok(Lease::Held) = bounded(&inner, node.store().lease(now, lease, true)).await
                {
                    renewed = now;
                    cut_closed = false;
                    inner.held.store(true, Ordering::SeqCst);
                    inner.healthy_since.store(millis(now), Ordering::Relaxed);
                    inner
                        .serving
                        .send_if_modified(|s| !std::mem::replace(s, true));
                }
            }
            Err(_) if now >= renewed + lease + inner.limits.resume_grace / 2 => {
                // Past its lease the others may reap this node (if they
                // reach Redis: it cannot tell a cut of its own from Redis
                // away for every node, when nobody reaps and its lease is
                // renewed late once Redis is back). Its clients are kept
                // for half their grace window, then they are better off
                // resuming on another node, with half of it left, than
                // waiting on a node that cannot act. It joins again once
                // Redis answers.
                let streams = inner
                    .local
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .streams
                    .len();
                if streams > 0 {
                    warn!(
                        node = inner.id.0,
                        streams,
                        "cut off from the store for longer than the lease: closing streams"
                    );
                    inner.close_all();
                }
                cut_closed = true;
            }
            Err(_) => {}
        }
    }
}

impl Switchboard for ClusterSwitchboard {
    async fn connect(
        &self,
        user: UserId,
        resume: Option<String>,
    ) -> Result<Attached, ConnectError> {
        let inner = &self.inner;
        if inner.shutdown.is_cancelled() {
            return Err(ShuttingDown.into());
        }
        let _connecting = inner.connecting.read().await;
        if !inner.held.load(Ordering::SeqCst) {
            return Err(ConnectError::StoreUnavailable);
        }
        let (tx, rx) = mpsc::channel(DEVICE_QUEUE + 1);
        let superseded = CancellationToken::new();
        let token: Arc<str> = Arc::from(uuid::Uuid::new_v4().simple().to_string());
        let mut node = inner.node.clone();
        if let Some(old) = resume.as_deref() {
            let resumed = bounded(inner, node.resume(&user, old, token.clone()))
                .await
                .map_err(|_| ConnectError::StoreUnavailable)?;
            if let Some((conn, epoch, parked)) = resumed {
                info!(user = %user, conn = conn.0, epoch, parked = parked.len(), "device resumed");
                let moved = inner.register(
                    conn,
                    epoch,
                    &user,
                    &token,
                    true,
                    parked,
                    tx,
                    superseded.clone(),
                );
                return Ok(Attached {
                    conn,
                    epoch,
                    rx,
                    superseded,
                    moved,
                });
            }
        }
        let conn = ConnId::on(inner.id, inner.next_conn.fetch_add(1, Ordering::Relaxed));
        let max = inner.limits.max_devices_per_user;
        let mut out = Vec::new();
        let attached = bounded(
            inner,
            node.attach(conn, user.clone(), token.clone(), max, &mut out),
        )
        .await
        .map_err(|_| ConnectError::StoreUnavailable)?;
        if let Err(devices) = attached {
            return Err(ConnectError::TooManyDevices(devices));
        }
        let moved = inner.register(conn, 1, &user, &token, false, [], tx, superseded.clone());
        inner.perform(out);
        info!(user = %user, conn = conn.0, "device connected");
        Ok(Attached {
            conn,
            epoch: 1,
            rx,
            superseded,
            moved,
        })
    }

    async fn control(
        &self,
        conn: ConnId,
        epoch: u64,
        seq: u64,
        ctl: Control,
    ) -> Result<(), ShuttingDown> {
        let inner = &self.inner;
        let deadline = tokio::time::Instant::now() + INPUT_TIMEOUT;
        let request = ctl.kind == ControlKind::Request;
        // The commit's mark; `None`: nothing committed (or not known to).
        let mut after = None;
        let outcome = if request
            && inner.business.is_some()
            && inner.approvals.load(Ordering::Relaxed) >= inner.limits.max_pending_approvals
        {
            APPROVALS_FULL
        } else if let (true, Err(())) = (request, inner.quota(conn)) {
            CALLER_OVER_QUOTA
        } else {
            let quota = if request {
                inner.quota(conn).ok().flatten()
            } else {
                None
            };
            let call_id = new_call_id(request);
            let mut node = inner.node.clone();
            let mut out = Vec::new();
            let now = inner.now();
            inner.committing(conn);
            match bounded(
                inner,
                node.control(conn, Some(epoch), &ctl, call_id, quota, now, &mut out),
            )
            .await
            {
                Ok(Some(outcome)) => {
                    inner.perform(out);
                    after = Some(node.store().mark());
                    outcome
                }
                // From a stream that no longer holds the device.
                Ok(None) => {
                    inner.answer(conn, epoch, None, None, deadline).await;
                    return Ok(());
                }
                Err(_) => UNAVAILABLE,
            }
        };
        inner.report(Observed::Control {
            conn,
            seq,
            code: outcome.code,
            reason: outcome.reason,
        });
        let msg = Outgoing::Result {
            seq,
            code: outcome.code,
            call_id: outcome.call_id,
            reason: Reason(outcome.reason),
        };
        inner.answer(conn, epoch, after, Some(msg), deadline).await;
        Ok(())
    }

    async fn disconnect(&self, conn: ConnId, epoch: u64, lost: bool) {
        let inner = &self.inner;
        if inner.shutdown.is_cancelled() {
            // The node is stopping: it ends every device itself, and the
            // stream is kept until its last events are queued.
            return;
        }
        let mine = {
            let mut local = inner.local.lock().unwrap_or_else(|p| p.into_inner());
            local.early.remove(&conn);
            match local.streams.get(&conn) {
                Some(e) if e.epoch == epoch => local.streams.remove(&conn).is_some(),
                _ => false,
            }
        };
        if !mine {
            // Resumed elsewhere (or here, by a newer stream).
            return;
        }
        let grace = inner.limits.resume_grace;
        let keep = (lost && !grace.is_zero()).then(|| inner.now() + grace);
        if keep.is_some() {
            info!(
                conn = conn.0,
                ?grace,
                "device stream lost: kept for it to resume"
            );
        } else {
            info!(conn = conn.0, "device disconnected");
        }
        inner.stream_ended(conn, epoch, keep).await;
    }

    async fn force_finish(&self, f: ForceFinish) -> Result<Outcome, ShuttingDown> {
        let inner = &self.inner;
        let mut node = inner.node.clone();
        let mut out = Vec::new();
        let now = inner.now();
        let o = match bounded(inner, node.force_finish(&f, now, &mut out)).await {
            Ok(o) => {
                inner.perform(out);
                o
            }
            Err(_) => UNAVAILABLE,
        };
        inner.report(Observed::Forced {
            user: f.user.clone(),
            code: f.code,
            result: o.code,
        });
        Ok(o)
    }

    async fn list_calls(
        &self,
        after: Option<CallId>,
        limit: usize,
    ) -> Result<(Vec<CallSummary>, bool), Unavailable> {
        let inner = &self.inner;
        let limit = limit.max(1);
        let mut node = inner.node.clone();
        let page = bounded(inner, async {
            let ids = node.store().call_ids(after, limit + 1).await?;
            node.store()
                .read(|t| {
                    ids.iter()
                        .filter_map(|id| t.call(id).cloned())
                        .collect::<Vec<_>>()
                })
                .await
        })
        .await
        .map_err(|_| Unavailable::Store)?;
        let now = inner.now();
        let more = page.len() > limit;
        let calls = page.iter().take(limit).map(|c| c.summary(now)).collect();
        Ok((calls, more))
    }

    async fn stats(&self) -> Result<Stats, Unavailable> {
        let inner = &self.inner;
        let connections = inner
            .local
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .streams
            .len();
        let mut node = inner.node.clone();
        let (approving, ringing, talking) = bounded(inner, node.store().phase_counts())
            .await
            .map_err(|_| Unavailable::Store)?;
        Ok(Stats {
            connections,
            approving,
            ringing,
            talking,
        })
    }

    async fn user_state(&self, user: UserId) -> Result<UserSummary, Unavailable> {
        let inner = &self.inner;
        let mut node = inner.node.clone();
        let read = bounded(
            inner,
            node.store().read(|t| {
                let u = t.user(&user).cloned();
                let call = u
                    .as_ref()
                    .and_then(|u| u.call)
                    .and_then(|id| t.call(&id).cloned());
                (u, call)
            }),
        )
        .await
        .map_err(|_| Unavailable::Store)?;
        let now = inner.now();
        Ok(match read {
            (Some(u), call) => UserSummary {
                state: state_of(&user, &u, call.as_ref()),
                connections: u.devices.len(),
                call: call.map(|c| c.summary(now)),
            },
            (None, _) => UserSummary {
                state: crate::machine::UserState::Offline,
                connections: 0,
                call: None,
            },
        })
    }
}
