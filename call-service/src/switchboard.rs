//! Where the call state lives, and who may touch it.
//!
//! **One owner.** All call state of a node is one [`Machine`] (the call
//! rules over the in-memory store of records, see [`crate::store`]), owned
//! by one task, the switchboard actor ([`LocalSwitchboard`]). Everything
//! else talks to it through a bounded command channel: device streams send
//! controls and their own end, approval tasks send verdicts, the admin API
//! sends forced FINISHes and queries. The actor runs each command as one
//! transition and performs the effects in the same order, so the events of
//! a call reach each device, and the business hook, in the order they
//! happened. Nothing holds a lock; the actor never awaits anything but its
//! next command or timer.
//!
//! **The actor does only state.** It queues domain values for devices (the
//! streams encode them), hands what it saw to an observer task for logs and
//! metrics (a bounded queue, dropped and counted when full), and never
//! sees a control refused for its rate or form (the edge answers those).
//!
//! **The edge's view.** The gRPC edge only sees the [`Switchboard`] trait;
//! the business service is behind [`Hook`]. The records live below the
//! rules, behind [`crate::store::Store`]; the actor keeps only what is
//! node-local: the queues of the streams attached here ([`Stream`]).
//!
//! **Slow consumers.** Each device has a bounded queue of outgoing messages
//! ([`DEVICE_QUEUE`]). A device that lets it fill up is disconnected (its
//! stream ends, its calls end as "connection lost" for the peer): dropping
//! call events instead would break the contract's event lines.
//!
//! **Grace window.** A stream that broke leaves its device detached for
//! [`SwitchboardLimits::resume_grace`]: what is sent meanwhile is parked in
//! the device's record (at most [`PARK_LIMIT`]), and a stream that presents
//! the device's resume token (single use) takes its place. One device has
//! one stream at a time: a resume ends a stream still attached
//! ([`Attached::superseded`]) and the epoch in every control refuses a late
//! one from it.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::clock::Clock;
use crate::codes;
pub use crate::device::DeviceRx;
use crate::device::{DeviceTx, Outgoing};
use crate::hook::Hook;
use crate::machine::{
    Call, CallId, ConnId, Control, ControlKind, Effect, EventKind, ForceFinish, GivenUp, Machine,
    MachineConfig, Notice, Outcome, Time, UserId, Verdict,
};
pub use crate::machine::{CallSummary, UserSummary};
use crate::metrics::{Metrics, OutcomeLabels, ResultLabel};
use crate::store::{NodeId, PARK_LIMIT};

/// Outgoing messages a device may have queued before it counts as a slow
/// consumer and is disconnected.
pub const DEVICE_QUEUE: usize = 256;
/// Commands waiting for the actor. Senders wait when it is full
/// (backpressure), which is what a burst should do.
const COMMAND_QUEUE: usize = 4096;

/// A REQUEST refused while the approvals in flight are at their limit.
pub(crate) const APPROVALS_FULL: Outcome = Outcome {
    code: codes::OVERLOADED,
    call_id: None,
    reason: "too many calls are waiting for approval; try again",
};

/// A REQUEST refused while the caller's calls' notices pile up.
pub(crate) const CALLER_OVER_QUOTA: Outcome = Outcome {
    code: codes::OVERLOADED,
    call_id: None,
    reason: "too many events of your calls wait for the business service; try again",
};

/// The id a control brings for a call it may start. Only a REQUEST names
/// a call; an id costs a system call, so the others get none.
/// Time-ordered (v7): stores keyed by call (the business service's call
/// records) append instead of writing a random page of their index for
/// every event.
pub(crate) fn new_call_id(request: bool) -> CallId {
    CallId(if request {
        uuid::Uuid::now_v7()
    } else {
        uuid::Uuid::nil()
    })
}

/// The limits the switchboard enforces.
#[derive(Clone, Copy, Debug)]
pub struct SwitchboardLimits {
    /// Devices per user; one more is refused with RESOURCE_EXHAUSTED.
    pub max_devices_per_user: usize,
    /// Approvals in flight; a REQUEST beyond is answered OVERLOADED.
    pub max_pending_approvals: usize,
    /// How long a device whose stream broke is kept for it to resume.
    pub resume_grace: Duration,
    /// Notices of one caller's calls that may wait (a cluster counts them
    /// in Redis; a single node's business hook counts its own).
    pub max_notices_per_caller: usize,
}

impl Default for SwitchboardLimits {
    fn default() -> Self {
        use crate::defaults;
        Self {
            max_devices_per_user: defaults::MAX_DEVICES_PER_USER,
            max_pending_approvals: defaults::MAX_PENDING_APPROVALS,
            resume_grace: defaults::duration(defaults::RESUME_GRACE),
            max_notices_per_caller: defaults::MAX_NOTICES_PER_CALLER,
        }
    }
}

/// A registered stream.
#[derive(Debug)]
pub struct Attached {
    pub conn: ConnId,
    /// Which attachment of the device this stream is.
    pub epoch: u64,
    pub rx: DeviceRx,
    /// Cancelled when another stream resumes the device: this one must end.
    pub superseded: CancellationToken,
    /// Cancelled when this node gives the device up for another node to
    /// take (a cluster node that lost its hold on the call state): the
    /// stream ends UNAVAILABLE, so the client reconnects and resumes.
    pub moved: CancellationToken,
}

/// Why a device was not registered.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("the user already has {0} devices connected, the most allowed")]
    TooManyDevices(usize),
    #[error(transparent)]
    ShuttingDown(#[from] ShuttingDown),
    /// The shared call state could not be reached (a node of a cluster).
    #[error("the shared call state is unavailable; try again")]
    StoreUnavailable,
}

/// The switchboard is gone (the node is shutting down).
#[derive(Debug, thiserror::Error)]
#[error("the call service is shutting down")]
pub struct ShuttingDown;

/// A query could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    #[error(transparent)]
    ShuttingDown(#[from] ShuttingDown),
    /// The shared call state could not be reached (a node of a cluster).
    #[error("the shared call state is unavailable; try again")]
    Store,
}

/// Counts for metrics, read at scrape time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub connections: usize,
    pub approving: usize,
    pub ringing: usize,
    pub talking: usize,
}

/// What the gRPC edge needs from the owner of call state. See the module
/// docs for why this is a trait.
pub trait Switchboard: Clone + Send + Sync + 'static {
    /// Registers a device of `user`, or says why not. Its first queued
    /// message is `Connected`; the device can be called once that is queued.
    ///
    /// With `resume`, the token of a device whose stream was lost within the
    /// grace window, the stream takes that device's place: its calls and
    /// ringing go on, and what was sent meanwhile follows `Connected`.
    /// A token works once (the new `Connected` carries the next one); a
    /// stream still attached to the device is told to end
    /// ([`Attached::superseded`]), so a device has one stream at a time.
    fn connect(
        &self,
        user: UserId,
        resume: Option<String>,
    ) -> impl Future<Output = Result<Attached, ConnectError>> + Send;
    /// A control from a device's stream `epoch`; its result goes to the
    /// device's queue. A control from a stream that no longer holds the
    /// device (it was resumed elsewhere) is ignored.
    fn control(
        &self,
        conn: ConnId,
        epoch: u64,
        seq: u64,
        control: Control,
    ) -> impl Future<Output = Result<(), ShuttingDown>> + Send;
    /// The device's stream ended.
    /// `lost`: the stream broke (rather than the client closing it), so the
    /// device is kept for the grace window. `epoch` tells a stale stream of
    /// a resumed device from the current one.
    fn disconnect(&self, conn: ConnId, epoch: u64, lost: bool) -> impl Future<Output = ()> + Send;
    /// Forced FINISH of a user's call.
    fn force_finish(
        &self,
        f: ForceFinish,
    ) -> impl Future<Output = Result<Outcome, ShuttingDown>> + Send;
    /// Up to `limit` live calls with ids above `after`, in id order, and
    /// whether more follow.
    fn list_calls(
        &self,
        after: Option<CallId>,
        limit: usize,
    ) -> impl Future<Output = Result<(Vec<CallSummary>, bool), Unavailable>> + Send;
    /// Counts for metrics.
    fn stats(&self) -> impl Future<Output = Result<Stats, Unavailable>> + Send;
    fn user_state(
        &self,
        user: UserId,
    ) -> impl Future<Output = Result<UserSummary, Unavailable>> + Send;
}

enum Command {
    Connect {
        conn: ConnId,
        user: UserId,
        resume: Option<String>,
        tx: DeviceTx,
        superseded: CancellationToken,
        reply: oneshot::Sender<Result<(ConnId, u64), ConnectError>>,
    },
    Control {
        conn: ConnId,
        epoch: u64,
        seq: u64,
        control: Control,
    },
    Disconnect {
        conn: ConnId,
        epoch: u64,
        lost: bool,
    },
    ForceFinish {
        f: ForceFinish,
        reply: oneshot::Sender<Outcome>,
    },
    ListCalls {
        after: Option<CallId>,
        limit: usize,
        reply: oneshot::Sender<(Vec<CallSummary>, bool)>,
    },
    Stats {
        reply: oneshot::Sender<Stats>,
    },
    UserState {
        user: UserId,
        reply: oneshot::Sender<UserSummary>,
    },
}

/// Handle to the in-process switchboard actor. Cheap to clone.
#[derive(Clone, Debug)]
pub struct LocalSwitchboard {
    tx: mpsc::Sender<Command>,
    node: NodeId,
    next_conn: Arc<AtomicU64>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Command")
    }
}

impl LocalSwitchboard {
    /// Starts the actor on `tasks`; it runs until `shutdown` is cancelled.
    pub fn start(
        config: MachineConfig,
        limits: SwitchboardLimits,
        clock: Clock,
        business: Option<Arc<dyn Hook>>,
        metrics: Metrics,
        tasks: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Self {
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let (observed, observed_rx) = mpsc::channel(OBSERVER_QUEUE);
        tasks.spawn(observer(observed_rx, metrics.clone()));
        let machine = Machine::new(config);
        let node = machine.node();
        let actor = Actor {
            machine,
            limits,
            approvals: FuturesUnordered::new(),
            streams: HashMap::new(),
            business,
            clock,
            effects: Vec::new(),
            metrics,
            observer: observed,
        };
        tasks.spawn(actor.run(rx, shutdown));
        Self {
            tx,
            node,
            next_conn: Arc::new(AtomicU64::new(1)),
        }
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, ShuttingDown> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| ShuttingDown)?;
        rx.await.map_err(|_| ShuttingDown)
    }
}

impl Switchboard for LocalSwitchboard {
    async fn connect(
        &self,
        user: UserId,
        resume: Option<String>,
    ) -> Result<Attached, ConnectError> {
        let conn = ConnId::on(self.node, self.next_conn.fetch_add(1, Ordering::Relaxed));
        // One slot more than a device may park: on resume, `Connected` and
        // everything parked fit.
        let (tx, rx) = mpsc::channel(DEVICE_QUEUE + 1);
        let superseded = CancellationToken::new();
        let (conn, epoch) = self
            .ask(|reply| Command::Connect {
                conn,
                user,
                resume,
                tx,
                superseded: superseded.clone(),
                reply,
            })
            .await??;
        Ok(Attached {
            conn,
            epoch,
            rx,
            superseded,
            // A single node never gives a device to another.
            moved: CancellationToken::new(),
        })
    }

    async fn control(
        &self,
        conn: ConnId,
        epoch: u64,
        seq: u64,
        control: Control,
    ) -> Result<(), ShuttingDown> {
        self.tx
            .send(Command::Control {
                conn,
                epoch,
                seq,
                control,
            })
            .await
            .map_err(|_| ShuttingDown)
    }

    async fn disconnect(&self, conn: ConnId, epoch: u64, lost: bool) {
        // During shutdown the actor is gone and there is nothing to clean.
        let _ = self
            .tx
            .send(Command::Disconnect { conn, epoch, lost })
            .await;
    }

    async fn force_finish(&self, f: ForceFinish) -> Result<Outcome, ShuttingDown> {
        self.ask(|reply| Command::ForceFinish { f, reply }).await
    }

    async fn list_calls(
        &self,
        after: Option<CallId>,
        limit: usize,
    ) -> Result<(Vec<CallSummary>, bool), Unavailable> {
        Ok(self
            .ask(|reply| Command::ListCalls {
                after,
                limit,
                reply,
            })
            .await?)
    }

    async fn stats(&self) -> Result<Stats, Unavailable> {
        Ok(self.ask(|reply| Command::Stats { reply }).await?)
    }

    async fn user_state(&self, user: UserId) -> Result<UserSummary, Unavailable> {
        Ok(self.ask(|reply| Command::UserState { user, reply }).await?)
    }
}

/// The node-local half of an attached device: its stream's queue. All
/// else about the device is its record in the store.
#[derive(Debug)]
struct Stream {
    tx: DeviceTx,
    /// Ends the stream when another one resumes the device.
    superseded: CancellationToken,
}

/// Observer messages waiting; beyond, they are dropped and counted.
pub(crate) const OBSERVER_QUEUE: usize = 8192;

/// What the actor saw, for logs and metrics. Recorded by the observer task
/// ([`observer`]), so that formatting log lines and looking up labelled
/// metrics do not run on the actor's core.
#[derive(Debug)]
pub(crate) enum Observed {
    /// A call event, with the call id, both users and the code.
    Event(Notice),
    /// A control's result.
    Control {
        conn: ConnId,
        seq: u64,
        code: u32,
        reason: &'static str,
    },
    /// A forced FINISH and what came of it.
    Forced {
        user: UserId,
        code: u32,
        result: u32,
    },
    /// A metrics scrape's counts, answered once what came before is in.
    Stats(Stats, oneshot::Sender<Stats>),
}

/// Records what the actor saw, a batch at a time; ends with the actor (the
/// channel's only sender).
pub(crate) async fn observer(mut rx: mpsc::Receiver<Observed>, metrics: Metrics) {
    let mut batch = Vec::with_capacity(64);
    while rx.recv_many(&mut batch, 64).await > 0 {
        for o in batch.drain(..) {
            match o {
                Observed::Event(n) => observe_event(&n, &metrics),
                Observed::Control {
                    conn,
                    seq,
                    code,
                    reason,
                } => {
                    metrics
                        .controls
                        .get_or_create(&ResultLabel {
                            result: code.into(),
                        })
                        .inc();
                    if code != codes::OK {
                        debug!(conn = conn.0, seq, code, reason, "control refused");
                    }
                }
                Observed::Forced { user, code, result } => {
                    info!(user = %user, code, result, "forced FINISH");
                    metrics
                        .forced_finishes
                        .get_or_create(&ResultLabel {
                            result: result.into(),
                        })
                        .inc();
                }
                Observed::Stats(stats, reply) => {
                    let _ = reply.send(stats);
                }
            }
        }
    }
}

/// Logs a call event once, with the call id, both users and the code, and
/// counts it.
fn observe_event(n: &Notice, metrics: &Metrics) {
    let event = match n.kind {
        EventKind::Request => "REQUEST",
        EventKind::Reply => "REPLY",
        EventKind::Start => "START",
        EventKind::Finish => "FINISH",
    };
    info!(
        call_id = %n.call_id,
        event,
        caller = %n.caller,
        callee = %n.callee,
        code = n.code,
        initiator = ?n.initiator,
        param = n.param,
        "call event"
    );
    match n.kind {
        EventKind::Start => {
            metrics
                .setup_seconds
                .observe(n.at.saturating_sub(n.requested_at).as_secs_f64());
        }
        EventKind::Reply if n.code != codes::OK => {
            metrics
                .outcomes
                .get_or_create(&OutcomeLabels {
                    event,
                    code: n.code.into(),
                })
                .inc();
        }
        EventKind::Finish => {
            metrics
                .outcomes
                .get_or_create(&OutcomeLabels {
                    event,
                    code: n.code.into(),
                })
                .inc();
        }
        _ => {}
    }
}

struct Actor {
    machine: Machine,
    limits: SwitchboardLimits,
    /// Approvals waiting for the business service. Polled by the actor
    /// itself rather than spawned: a verdict is applied the moment it
    /// arrives, with no task to wake and no command to queue in between.
    /// Each has its own deadline, so none waits forever.
    approvals: FuturesUnordered<BoxFuture<'static, (CallId, Verdict)>>,
    /// The streams of the devices attached here.
    streams: HashMap<ConnId, Stream>,
    business: Option<Arc<dyn Hook>>,
    clock: Clock,
    effects: Vec<Effect>,
    metrics: Metrics,
    observer: mpsc::Sender<Observed>,
}

impl Actor {
    fn now(&self) -> Time {
        self.clock.time()
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Command>, shutdown: CancellationToken) {
        let timer = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(timer);
        let mut armed: Option<Time> = None;
        loop {
            let next = self.machine.next_deadline();
            if next != armed {
                armed = next;
                if let Some(t) = next {
                    timer.as_mut().reset(self.clock.instant(t));
                }
            }
            tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    self.end_all_calls();
                    break;
                }
                // Before commands: under load there is always a command, and
                // approvals in flight are bounded.
                Some((call_id, verdict)) = self.approvals.next(), if !self.approvals.is_empty() => {
                    let now = self.now();
                    self.machine.approval_done(call_id, verdict, now, &mut self.effects);
                    self.apply();
                }
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.handle(cmd),
                    None => break,
                },
                () = &mut timer, if armed.is_some() => {
                    armed = None;
                    let now = self.now();
                    self.machine.tick(now, &mut self.effects);
                    self.apply();
                }
            }
        }
        // No transition comes after this one: the notice lanes may drain.
        if let Some(business) = &self.business {
            business.close();
        }
        // Dropping the device queues ends every response stream.
        debug!(devices = self.streams.len(), "switchboard stopped");
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Connect {
                conn,
                user,
                resume,
                tx,
                superseded,
                reply,
            } => self.connect(conn, user, resume, tx, superseded, reply),
            Command::Control {
                conn,
                epoch,
                seq,
                control,
            } => self.control(conn, epoch, seq, control),
            Command::Disconnect { conn, epoch, lost } => self.disconnect(conn, epoch, lost),
            Command::ForceFinish { f, reply } => self.force_finish(f, reply),
            Command::Stats { reply } => self.stats(reply),
            Command::ListCalls {
                after,
                limit,
                reply,
            } => self.list_calls(after, limit, reply),
            Command::UserState { user, reply } => self.user_state(user, reply),
        }
        self.apply();
    }

    /// A new stream: resumes the device its token names (the same user's),
    /// or registers a new device.
    fn connect(
        &mut self,
        conn: ConnId,
        user: UserId,
        resume: Option<String>,
        tx: DeviceTx,
        superseded: CancellationToken,
        reply: oneshot::Sender<Result<(ConnId, u64), ConnectError>>,
    ) {
        let token: Arc<str> = Arc::from(uuid::Uuid::new_v4().simple().to_string());
        if let Some(old) = resume.as_deref()
            && let Some((conn, epoch, parked)) = self.machine.resume(&user, old, token.clone())
        {
            self.resumed(conn, epoch, &user, token, parked, Stream { tx, superseded });
            let _ = reply.send(Ok((conn, epoch)));
            return;
        }
        let max = self.limits.max_devices_per_user;
        if let Err(devices) =
            self.machine
                .attach(conn, user.clone(), token.clone(), max, &mut self.effects)
        {
            let _ = reply.send(Err(ConnectError::TooManyDevices(devices)));
            return;
        }
        // First in the queue: the device's events (a ringing call's
        // REQUEST) are among the effects, performed after this.
        let _ = tx.try_send(Box::new(connected(&user, conn, &token, false, &[])));
        self.streams.insert(conn, Stream { tx, superseded });
        let _ = reply.send(Ok((conn, 1)));
        info!(user = %user, conn = conn.0, "device connected");
    }

    /// A control from a device's current stream, answered on its queue.
    fn control(&mut self, conn: ConnId, epoch: u64, seq: u64, ctl: Control) {
        let now = self.now();
        let Some(user) = self
            .machine
            .device(conn)
            .filter(|d| d.epoch == epoch)
            .map(|d| d.user.clone())
        else {
            // From a stream that lost the device to a resume (or a
            // device already gone): it acts on nothing.
            return;
        };
        let request = ctl.kind == ControlKind::Request;
        let outcome = if request
            && self.business.is_some()
            && self.approvals.len() >= self.limits.max_pending_approvals
        {
            APPROVALS_FULL
        } else if request
            // Backpressure on a caller whose calls' events pile up
            // (see `business`): its flood must not cost others theirs.
            && self
                .business
                .as_ref()
                .is_some_and(|b| b.caller_over_quota(&user))
        {
            CALLER_OVER_QUOTA
        } else {
            let call_id = new_call_id(request);
            let done =
                self.machine
                    .control_from(conn, Some(epoch), &ctl, call_id, now, &mut self.effects);
            match done {
                Some(outcome) => outcome,
                None => return,
            }
        };
        self.report(Observed::Control {
            conn,
            seq,
            code: outcome.code,
            reason: outcome.reason,
        });
        self.send(
            conn,
            Outgoing::Result {
                seq,
                code: outcome.code,
                call_id: outcome.call_id,
                reason: crate::device::Reason(outcome.reason),
            },
        );
    }

    /// A stream ended: a broken one parks its device for the grace window.
    fn disconnect(&mut self, conn: ConnId, epoch: u64, lost: bool) {
        let now = self.now();
        let grace = self.limits.resume_grace;
        let Some(device) = self.machine.device(conn).filter(|d| d.epoch == epoch) else {
            // A resumed device's old stream, ending late.
            return;
        };
        let keep = (lost && !grace.is_zero()).then(|| now + grace);
        if keep.is_some() {
            info!(user = %device.user, conn = conn.0, ?grace, "device stream lost: kept for it to resume");
        } else {
            info!(user = %device.user, conn = conn.0, "device disconnected");
        }
        self.streams.remove(&conn);
        self.machine
            .stream_ended(conn, epoch, keep, now, &mut self.effects);
    }

    /// A forced FINISH from the admin API.
    fn force_finish(&mut self, f: ForceFinish, reply: oneshot::Sender<Outcome>) {
        let now = self.now();
        let o = self.machine.force_finish(&f, now, &mut self.effects);
        self.report(Observed::Forced {
            user: f.user.clone(),
            code: f.code,
            result: o.code,
        });
        let _ = reply.send(o);
    }

    /// Counts for a metrics scrape.
    fn stats(&mut self, reply: oneshot::Sender<Stats>) {
        let (approving, ringing, talking) = self.machine.phase_counts();
        let stats = Stats {
            connections: self.machine.connection_count(),
            approving,
            ringing,
            talking,
        };
        // Answered by the observer once it has recorded everything
        // before: a scrape sees the metrics of all that happened
        // before it. Full: answered now, the metrics a little behind.
        if let Err(e) = self.observer.try_send(Observed::Stats(stats, reply))
            && let Observed::Stats(stats, reply) = e.into_inner()
        {
            let _ = reply.send(stats);
        }
    }

    /// A page of live calls, by id, past `after`.
    fn list_calls(
        &self,
        after: Option<CallId>,
        limit: usize,
        reply: oneshot::Sender<(Vec<CallSummary>, bool)>,
    ) {
        let now = self.now();
        // A page in O(calls): select the lowest ids past the token,
        // sort only those.
        let mut page: Vec<&Call> = self
            .machine
            .calls()
            .filter(|c| after.is_none_or(|a| c.id > a))
            .collect();
        let limit = limit.max(1);
        let more = page.len() > limit;
        if more {
            page.select_nth_unstable_by_key(limit, |c| c.id);
            page.truncate(limit);
        }
        page.sort_unstable_by_key(|c| c.id);
        let calls = page.into_iter().map(|c| c.summary(now)).collect();
        let _ = reply.send((calls, more));
    }

    /// One user's state for the admin API.
    fn user_state(&self, user: UserId, reply: oneshot::Sender<UserSummary>) {
        let now = self.now();
        let (state, connections, call) = self.machine.user_state(&user);
        let _ = reply.send(UserSummary {
            state,
            connections,
            call: call.map(|c| c.summary(now)),
        });
    }

    /// Performs the machine's effects, in order. Effects can produce more
    /// (an evicted slow device is a disconnect; an approval without a
    /// business service is an immediate verdict), hence the loop.
    fn apply(&mut self) {
        while !self.effects.is_empty() {
            let mut batch = std::mem::take(&mut self.effects);
            for effect in batch.drain(..) {
                self.perform(effect);
            }
            if self.effects.is_empty() {
                // Keep the allocation for the next command.
                self.effects = batch;
            }
            for g in self.machine.take_given_up() {
                let conn = match g {
                    GivenUp::Overflowed(conn) => {
                        warn!(
                            conn = conn.0,
                            parked = PARK_LIMIT,
                            "detached device parked too much: given up"
                        );
                        self.metrics.slow_consumers.inc();
                        conn
                    }
                    GivenUp::Expired(conn) => {
                        info!(conn = conn.0, "device did not resume in time");
                        conn
                    }
                };
                self.streams.remove(&conn);
            }
        }
    }

    fn perform(&mut self, effect: Effect) {
        {
            match effect {
                Effect::Send { conn, event } => self.push(conn, Outgoing::Event(event)),
                Effect::Approve(notice) => {
                    self.report(Observed::Event(notice.clone()));
                    match &self.business {
                        None => {
                            let now = self.now();
                            self.machine.approval_done(
                                notice.call_id,
                                Verdict::Allow,
                                now,
                                &mut self.effects,
                            );
                        }
                        Some(business) => {
                            let call_id = notice.call_id;
                            let verdict = business.approve(notice);
                            self.approvals
                                .push(Box::pin(async move { (call_id, verdict.await) }));
                        }
                    }
                }
                Effect::Notify(notice) => {
                    self.report(Observed::Event(notice.clone()));
                    if let Some(business) = &self.business {
                        business.notify(notice);
                    }
                }
            }
        }
    }

    /// On shutdown: every live call ends with TERMINATED (100206), so both
    /// parties hear it rather than see their streams just end.
    fn end_all_calls(&mut self) {
        let now = self.now();
        let users: Vec<UserId> = self.machine.calls().map(|c| c.caller.clone()).collect();
        for user in users {
            let f = ForceFinish {
                user,
                only: None,
                code: codes::TERMINATED,
                flags: 0,
                param: 0,
                user_str: Arc::from("the call service is shutting down"),
            };
            self.machine.force_finish(&f, now, &mut self.effects);
        }
        self.apply();
    }

    /// Hands what happened to the observer (logs, metrics), off this
    /// task. A full observer queue drops it, counted: the call flow never
    /// waits for its own logging.
    fn report(&self, o: Observed) {
        if self.observer.try_send(o).is_err() {
            self.metrics.observations_dropped.inc();
        }
    }

    /// A message for a device outside a call event (a control's result):
    /// to its stream, or parked by the store while it is detached.
    fn send(&mut self, conn: ConnId, msg: Outgoing) {
        let now = self.now();
        if let Some(msg) = self.machine.deliver(conn, msg, now, &mut self.effects) {
            self.push(conn, msg);
        }
    }

    /// Queues a message on an attached device's stream; a device whose
    /// queue is full is disconnected (see the module docs).
    fn push(&mut self, conn: ConnId, msg: Outgoing) {
        let Some(stream) = self.streams.get(&conn) else {
            return;
        };
        if stream.tx.try_send(Box::new(msg)).is_err() {
            warn!(
                conn = conn.0,
                queue = DEVICE_QUEUE,
                "device not reading its stream: disconnecting it"
            );
            self.metrics.slow_consumers.inc();
            self.streams.remove(&conn);
            let now = self.now();
            self.machine.disconnect(conn, now, &mut self.effects);
        }
    }

    /// A stream took the place of a device whose stream was lost (or is
    /// about to be found lost): `Connected` again with the next resume
    /// token, then what was parked. A stream still attached is told to end,
    /// and its controls from now on are ignored (see the epoch check).
    fn resumed(
        &mut self,
        conn: ConnId,
        epoch: u64,
        user: &UserId,
        token: Arc<str>,
        parked: VecDeque<Outgoing>,
        stream: Stream,
    ) {
        let parked = Vec::from(parked);
        let _ = stream
            .tx
            .try_send(Box::new(connected(user, conn, &token, true, &parked)));
        // Dropping the old queue's sender ends the old response stream once
        // it has sent what it holds.
        if let Some(old) = self.streams.insert(conn, stream) {
            old.superseded.cancel();
        }
        info!(user = %user, conn = conn.0, epoch, parked = parked.len(), "device resumed");
        for msg in parked {
            self.push(conn, msg);
        }
    }
}

/// `Connected`, for a device whose stream is followed by `parked`.
pub(crate) fn connected(
    user: &UserId,
    conn: ConnId,
    token: &Arc<str>,
    resumed: bool,
    parked: &[Outgoing],
) -> Outgoing {
    let results = parked.iter().filter(|m| m.is_result()).count();
    Outgoing::Connected {
        user: user.clone(),
        conn,
        resume_token: token.clone(),
        resumed,
        parked_results: u32::try_from(results).unwrap_or(u32::MAX),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::convert;
    use crate::machine::UserState;
    use tokio::time::Instant;
    use videocall_proto::v1 as pb;

    /// An in-memory switchboard with the defaults, until the token.
    pub(crate) fn start() -> (LocalSwitchboard, CancellationToken, TaskTracker) {
        let tasks = TaskTracker::new();
        let token = CancellationToken::new();
        let sb = LocalSwitchboard::start(
            MachineConfig::default(),
            SwitchboardLimits::default(),
            Clock::now(),
            None,
            Metrics::default(),
            &tasks,
            token.clone(),
        );
        (sb, token, tasks)
    }

    fn control(kind: ControlKind, peer: &str, code: u32) -> Control {
        Control {
            kind,
            peer: Arc::from(peer),
            code,
            flags: 0,
            param: 0,
            user_str: Arc::from(""),
        }
    }

    /// The next event on a device queue, skipping `Connected` and results.
    async fn event(rx: &mut DeviceRx) -> pb::CallEvent {
        loop {
            match convert::server_message(&rx.recv().await.expect("queue open")).kind {
                Some(pb::server_message::Kind::Event(e)) => return e,
                _ => continue,
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_default_ring_timeout_is_30_seconds() {
        let (sb, token, tasks) = start();
        let Attached {
            conn: alice,
            rx: mut alice_rx,
            ..
        } = sb.connect(Arc::from("alice"), None).await.unwrap();
        let Attached {
            conn: _bob,
            rx: mut bob_rx,
            ..
        } = sb.connect(Arc::from("bob"), None).await.unwrap();
        sb.control(alice, 1, 1, control(ControlKind::Request, "bob", 0))
            .await
            .unwrap();
        let began = Instant::now();
        assert_eq!(
            event(&mut bob_rx).await.event_type,
            pb::EventType::Request as i32
        );
        let reply = event(&mut alice_rx).await;
        assert_eq!(
            (reply.event_type, reply.error_code),
            (pb::EventType::Reply as i32, codes::NO_ANSWER)
        );
        assert_eq!(began.elapsed(), Duration::from_secs(30));
        let finish = event(&mut bob_rx).await;
        assert_eq!(
            (finish.event_type, finish.error_code),
            (pb::EventType::Finish as i32, codes::NO_ANSWER)
        );
        token.cancel();
        tasks.close();
        tasks.wait().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_device_resumes_within_the_grace_window_or_is_given_up() {
        let (sb, token, tasks) = start();
        let Attached {
            conn: alice,
            epoch,
            rx: mut alice_rx,
            ..
        } = sb.connect(Arc::from("alice"), None).await.unwrap();
        let hello = match convert::server_message(&alice_rx.recv().await.unwrap()).kind {
            Some(pb::server_message::Kind::Connected(c)) => c,
            other => panic!("{other:?}"),
        };
        let Attached {
            conn: bob,
            rx: mut bob_rx,
            ..
        } = sb.connect(Arc::from("bob"), None).await.unwrap();
        sb.control(alice, 1, 1, control(ControlKind::Request, "bob", 0))
            .await
            .unwrap();
        assert_eq!(
            event(&mut bob_rx).await.event_type,
            pb::EventType::Request as i32
        );
        // alice's stream breaks: bob's REPLY is parked for her.
        drop(alice_rx);
        sb.disconnect(alice, epoch, true).await;
        sb.control(bob, 1, 1, control(ControlKind::Reply, "alice", 0))
            .await
            .unwrap();
        // A stranger with alice's token but another identity gets a new device.
        let other = sb
            .connect(Arc::from("mallory"), Some(hello.resume_token.clone()))
            .await
            .unwrap();
        assert_ne!(other.conn, alice);
        // alice resumes: Connected (resumed), then REPLY and START.
        let back = sb
            .connect(Arc::from("alice"), Some(hello.resume_token.clone()))
            .await
            .unwrap();
        assert_eq!((back.conn, back.epoch), (alice, epoch + 1));
        let mut rx = back.rx;
        match convert::server_message(&rx.recv().await.unwrap()).kind {
            Some(pb::server_message::Kind::Connected(c)) => assert!(c.resumed),
            other => panic!("{other:?}"),
        }
        assert_eq!(event(&mut rx).await.event_type, pb::EventType::Reply as i32);
        assert_eq!(event(&mut rx).await.event_type, pb::EventType::Start as i32);
        // The old stream's late end changes nothing.
        sb.disconnect(alice, epoch, true).await;
        assert_eq!(
            sb.user_state(Arc::from("alice")).await.unwrap().state,
            UserState::Talking
        );
        // Lost again, and not back within 10 s: bob gets FINISH 100106.
        drop(rx);
        sb.disconnect(alice, epoch + 1, true).await;
        let began = Instant::now();
        let mut finish = event(&mut bob_rx).await;
        while finish.event_type != pb::EventType::Finish as i32 {
            finish = event(&mut bob_rx).await;
        }
        assert_eq!(finish.error_code, codes::CONNECTION_LOST);
        assert_eq!(began.elapsed(), Duration::from_secs(10));
        token.cancel();
        tasks.close();
        tasks.wait().await;
    }

    /// A device may park as many messages as its queue holds; resuming, it
    /// gets `Connected` and every one of them, and stays.
    #[tokio::test(start_paused = true)]
    async fn a_resumed_device_gets_all_it_may_park() {
        let (sb, token, tasks) = start();
        let Attached {
            conn: alice,
            epoch,
            rx: mut alice_rx,
            ..
        } = sb.connect(Arc::from("alice"), None).await.unwrap();
        let resume = hello(&mut alice_rx).await.resume_token;
        let Attached {
            conn: bob,
            rx: mut bob_rx,
            ..
        } = sb.connect(Arc::from("bob"), None).await.unwrap();
        drop(alice_rx);
        sb.disconnect(alice, epoch, true).await;
        // Each round parks a REQUEST and a FINISH for alice.
        let rounds = DEVICE_QUEUE / 2;
        for round in 0..rounds as u64 {
            sb.control(bob, 1, 2 * round, control(ControlKind::Request, "alice", 0))
                .await
                .unwrap();
            sb.control(
                bob,
                1,
                2 * round + 1,
                control(ControlKind::Finish, "alice", 0),
            )
            .await
            .unwrap();
            // Answered in order: once this is, so are the controls.
            sb.user_state(Arc::from("bob")).await.unwrap();
            while bob_rx.try_recv().is_ok() {}
        }
        let back = sb.connect(Arc::from("alice"), Some(resume)).await.unwrap();
        let mut rx = back.rx;
        assert!(hello(&mut rx).await.resumed);
        for _ in 0..rounds {
            assert_eq!(
                event(&mut rx).await.event_type,
                pb::EventType::Request as i32
            );
            assert_eq!(
                event(&mut rx).await.event_type,
                pb::EventType::Finish as i32
            );
        }
        assert_eq!(
            sb.user_state(Arc::from("alice")).await.unwrap().state,
            UserState::Idle
        );
        token.cancel();
        tasks.close();
        tasks.wait().await;
    }

    async fn hello(rx: &mut DeviceRx) -> pb::Connected {
        match convert::server_message(&rx.recv().await.expect("queue open")).kind {
            Some(pb::server_message::Kind::Connected(c)) => c,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_resume_token_works_once_and_takes_the_device_from_a_live_stream() {
        let (sb, token, tasks) = start();
        let mut first = sb.connect(Arc::from("alice"), None).await.unwrap();
        let t1 = hello(&mut first.rx).await.resume_token;
        // Resumed while the first stream is still attached: it is told to
        // end, its queue closes, and a new token comes with the new stream.
        let mut second = sb
            .connect(Arc::from("alice"), Some(t1.clone()))
            .await
            .unwrap();
        assert_eq!((second.conn, second.epoch), (first.conn, first.epoch + 1));
        let c2 = hello(&mut second.rx).await;
        assert!(c2.resumed);
        assert_ne!(c2.resume_token, t1);
        assert!(first.superseded.is_cancelled());
        assert!(!second.superseded.is_cancelled());
        assert!(first.rx.recv().await.is_none());
        // The used token gives a new device, not this one.
        let mut third = sb.connect(Arc::from("alice"), Some(t1)).await.unwrap();
        assert_ne!(third.conn, first.conn);
        assert!(!hello(&mut third.rx).await.resumed);
        assert_eq!(
            sb.user_state(Arc::from("alice")).await.unwrap().connections,
            2
        );
        // The old stream's controls act on nothing; the new one's do.
        let _bob = sb.connect(Arc::from("bob"), None).await.unwrap();
        sb.control(
            first.conn,
            first.epoch,
            1,
            control(ControlKind::Request, "bob", 0),
        )
        .await
        .unwrap();
        assert_eq!(
            sb.user_state(Arc::from("alice")).await.unwrap().state,
            UserState::Idle
        );
        sb.control(
            second.conn,
            second.epoch,
            2,
            control(ControlKind::Request, "bob", 0),
        )
        .await
        .unwrap();
        assert_eq!(
            sb.user_state(Arc::from("alice")).await.unwrap().state,
            UserState::Calling
        );
        // The next token works, once.
        let fourth = sb
            .connect(Arc::from("alice"), Some(c2.resume_token.clone()))
            .await
            .unwrap();
        assert_eq!(fourth.conn, second.conn);
        assert!(second.superseded.is_cancelled());
        token.cancel();
        tasks.close();
        tasks.wait().await;
    }

    #[tokio::test]
    async fn a_device_that_stops_reading_is_disconnected_and_its_peer_told() {
        let (sb, token, tasks) = start();
        let Attached {
            conn: alice,
            rx: _alice_rx_never_read,
            ..
        } = sb.connect(Arc::from("alice"), None).await.unwrap();
        let Attached {
            conn: bob,
            rx: mut bob_rx,
            ..
        } = sb.connect(Arc::from("bob"), None).await.unwrap();
        sb.control(alice, 1, 1, control(ControlKind::Request, "bob", 0))
            .await
            .unwrap();
        event(&mut bob_rx).await;
        sb.control(bob, 1, 1, control(ControlKind::Reply, "alice", 0))
            .await
            .unwrap();
        assert_eq!(
            event(&mut bob_rx).await.event_type,
            pb::EventType::Start as i32
        );
        // Every control is answered on alice's queue, which nobody reads.
        for seq in 0..=DEVICE_QUEUE as u64 {
            sb.control(alice, 1, seq, control(ControlKind::Reply, "carol", 0))
                .await
                .unwrap();
        }
        let finish = event(&mut bob_rx).await;
        assert_eq!(
            (finish.event_type, finish.error_code),
            (pb::EventType::Finish as i32, codes::CONNECTION_LOST)
        );
        let state = sb.user_state(Arc::from("alice")).await.unwrap();
        assert_eq!(state.state, UserState::Offline);
        token.cancel();
        tasks.close();
        tasks.wait().await;
    }
}
