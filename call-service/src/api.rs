//! The gRPC edge: the client API (`CallService`) and the admin API
//! (`CallAdmin`). Requests are validated into domain types here
//! ([`crate::convert`]) and errors become `tonic::Status` here, nowhere else.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, warn};
use videocall_proto::v1 as pb;

use crate::auth::Authenticator;
use crate::codes;
use crate::config::Limits;
use crate::convert;
use crate::device::Outgoing;
use crate::domain::{CallId, ConnId, ForceFinish, UserId};
use crate::metrics::{Metrics, ResultLabel};
use crate::switchboard::{
    Attached, ConnectError, DEVICE_QUEUE, DeviceRx, ShuttingDown, Switchboard, Unavailable,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

impl From<ShuttingDown> for Status {
    fn from(e: ShuttingDown) -> Self {
        Status::unavailable(e.to_string())
    }
}

impl From<Unavailable> for Status {
    fn from(e: Unavailable) -> Self {
        match e {
            Unavailable::ShuttingDown(e) => e.into(),
            Unavailable::Store => Status::unavailable(e.to_string()),
        }
    }
}

impl From<ConnectError> for Status {
    fn from(e: ConnectError) -> Self {
        match e {
            ConnectError::TooManyDevices(_) => Status::resource_exhausted(e.to_string()),
            ConnectError::ShuttingDown(e) => e.into(),
            ConnectError::StoreUnavailable => Status::unavailable(e.to_string()),
        }
    }
}

/// The metadata key a client resumes its device with (the `resume_token`
/// of its last `Connected`).
pub const RESUME_HEADER: &str = "x-videocall-resume";

/// `videocall.v1.CallService`: one stream per device.
#[derive(Debug)]
pub struct ClientApi<S> {
    switchboard: S,
    /// Shared by every device's reader (it checks refreshed tokens).
    auth: Arc<Authenticator>,
    /// How long before expiry a stream is asked for a new token.
    refresh_ahead: Duration,
    limits: Limits,
    /// One permit per connected device ([`Limits::max_connections`]).
    connections: Arc<Semaphore>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    metrics: Metrics,
}

impl<S: Switchboard> ClientApi<S> {
    pub fn new(
        switchboard: S,
        auth: Authenticator,
        refresh_ahead: Duration,
        limits: Limits,
        tasks: TaskTracker,
        shutdown: CancellationToken,
        metrics: Metrics,
    ) -> Self {
        let connections = Arc::new(Semaphore::new(limits.max_connections));
        Self {
            switchboard,
            auth: Arc::new(auth),
            refresh_ahead,
            limits,
            connections,
            tasks,
            shutdown,
            metrics,
        }
    }
}

#[tonic::async_trait]
impl<S: Switchboard> pb::call_service_server::CallService for ClientApi<S> {
    type SessionStream = DeviceStream;

    async fn session(
        &self,
        request: Request<Streaming<pb::ClientMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let (metadata, _, inbound) = request.into_parts();
        self.open(&metadata, inbound).await.map(Response::new)
    }
}

impl<S: Switchboard> ClientApi<S> {
    /// Opens a device's session: who `metadata` says it is, its controls
    /// from `inbound`, its messages in the stream returned. The gRPC
    /// `Session` and the WebSocket edge ([`crate::web`]) both come here.
    pub async fn open<I>(&self, metadata: &MetadataMap, inbound: I) -> Result<DeviceStream, Status>
    where
        I: Stream<Item = Result<pb::ClientMessage, Status>> + Send + Unpin + 'static,
    {
        let identity = self.auth.identify(metadata)?;
        let permit = self.connections.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted("this call service holds as many connections as it may")
        })?;
        let resume = metadata
            .get(RESUME_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let Attached {
            conn,
            epoch,
            rx,
            superseded,
            moved,
        } = self
            .switchboard
            .connect(identity.user.clone(), resume)
            .await?;
        let (gone_tx, gone_rx) = oneshot::channel();
        let (end_tx, end_rx) = oneshot::channel();
        let answers = SharedAnswers::default();
        let reader = Reader {
            switchboard: self.switchboard.clone(),
            conn,
            epoch,
            superseded,
            moved,
            gone: gone_rx,
            end: end_tx,
            expires: identity.expires,
            since: SystemTime::now(),
            asked: false,
            refresh_ahead: self.refresh_ahead,
            auth: self.auth.clone(),
            user: identity.user,
            bucket: TokenBucket::new(self.limits.controls_per_second, self.limits.control_burst),
            shutdown: self.shutdown.clone(),
            answers: answers.clone(),
            forwarded: 0,
            controls: self.metrics.controls.clone(),
            refreshes: self.metrics.refreshes.clone(),
            token_expiries: self.metrics.token_expiries.clone(),
            slow_consumers: self.metrics.slow_consumers.clone(),
            _permit: permit,
        };
        self.tasks.spawn(reader.run(inbound));
        Ok(DeviceStream {
            rx,
            answers,
            expires_at_ms: identity.expires.map_or(0, unix_ms),
            started: false,
            parked_results: 0,
            answered: 0,
            end: Some(end_rx),
            _gone: gone_tx,
        })
    }
}

/// Unix time in milliseconds, as the protocol gives times (at least 1, so
/// that 0 keeps meaning "never").
fn unix_ms(t: SystemTime) -> u64 {
    let ms = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
    u64::try_from(ms).unwrap_or(u64::MAX).max(1)
}

/// A device's response stream: the switchboard's messages, and the
/// reader's own messages: answers to controls it refused (rate-limited,
/// malformed) and everything about tokens (`RefreshDue`, `RefreshResult`),
/// each put in its place: after the answers to the controls forwarded before
/// it, so every control is answered in the order it was sent. Messages are
/// encoded here, on the stream's task. Dropping it (the client went away, or
/// the server is stopping) tells the device's reader task to end. When the
/// queue ends, a status the reader left (an expired token) ends the stream.
#[derive(Debug)]
pub struct DeviceStream {
    rx: DeviceRx,
    /// The reader's answers, each with how many of the switchboard's
    /// answers go before it.
    answers: SharedAnswers,
    /// The switchboard's answers passed on so far.
    answered: u64,
    /// The stream's expiry at connect, for `Connected` (which the
    /// switchboard makes without knowing the credential).
    expires_at_ms: u64,
    /// Whether the switchboard's first message (`Connected`) is out.
    started: bool,
    /// Results parked for a resumed device still to pass: they answer the
    /// controls of an older stream, and go before the reader's answers.
    parked_results: u32,
    end: Option<oneshot::Receiver<Status>>,
    _gone: oneshot::Sender<()>,
}

impl Stream for DeviceStream {
    type Item = Result<pb::ServerMessage, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        // Nothing of the reader's before `Connected` (the switchboard's
        // first message; a token due at once waits for it), nor before the
        // results parked for a resumed device (the SDK's resume barrier is
        // refused here, and must come after them).
        if this.started
            && this.parked_results == 0
            && let Some(answer) = this.answers.next(this.answered, cx)
        {
            return Poll::Ready(Some(Ok(answer)));
        }
        match this.rx.poll_recv(cx) {
            Poll::Ready(None) => {}
            Poll::Ready(Some(msg)) => {
                if let Outgoing::Connected { parked_results, .. } = &*msg {
                    this.parked_results = *parked_results;
                } else if msg.is_result() {
                    if this.parked_results > 0 {
                        this.parked_results -= 1;
                    } else {
                        this.answered += 1;
                    }
                }
                this.started = true;
                let mut out = convert::server_message(&msg);
                if let Some(pb::server_message::Kind::Connected(c)) = &mut out.kind {
                    c.expires_at_ms = this.expires_at_ms;
                }
                return Poll::Ready(Some(Ok(out)));
            }
            Poll::Pending => return Poll::Pending,
        }
        let Some(end) = this.end.as_mut() else {
            return Poll::Ready(None);
        };
        let status = match Pin::new(end).poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(r) => r.ok(),
        };
        this.end = None;
        Poll::Ready(status.map(Err))
    }
}

/// The reader's messages (answers to controls refused at the edge, token
/// messages), encoded, waiting for their turn on the
/// device's stream: pushed by the reader, taken by the stream. Behind a
/// `std` mutex held for one push or take, never across an `.await`; nothing
/// is allocated until the first refusal (an idle device pays for the `Arc`
/// alone).
#[derive(Clone, Debug, Default)]
struct SharedAnswers(Arc<Mutex<EdgeAnswers>>);

#[derive(Debug, Default)]
struct EdgeAnswers {
    /// Each answer with how many of the switchboard's go before it.
    queue: VecDeque<(u64, pb::ServerMessage)>,
    /// The stream's, while it waits for an answer.
    waker: Option<Waker>,
}

impl SharedAnswers {
    fn lock(&self) -> std::sync::MutexGuard<'_, EdgeAnswers> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues an answer to follow the switchboard's `after`th. False when
    /// [`DEVICE_QUEUE`] are already waiting: the device does not read.
    fn push(&self, after: u64, answer: pb::ServerMessage) -> bool {
        let waker = {
            let mut a = self.lock();
            if a.queue.len() >= DEVICE_QUEUE {
                return false;
            }
            a.queue.push_back((after, answer));
            a.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        true
    }

    /// The next answer if its turn has come (`answered` of the
    /// switchboard's are out); otherwise wakes `cx` on the next push.
    fn next(&self, answered: u64, cx: &Context<'_>) -> Option<pb::ServerMessage> {
        let mut a = self.lock();
        if a.queue.front().is_some_and(|(after, _)| *after <= answered) {
            return a.queue.pop_front().map(|(_, answer)| answer);
        }
        if !a.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            a.waker = Some(cx.waker().clone());
        }
        None
    }
}

/// Controls per second for one connection: a token bucket, refilled with
/// time. Pure; time comes in as an argument.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Option<Instant>,
}

impl TokenBucket {
    pub fn new(per_second: u32, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate: f64::from(per_second),
            burst,
            tokens: burst,
            last: None,
        }
    }

    /// Takes a token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        if let Some(last) = self.last {
            let refill = now.saturating_duration_since(last).as_secs_f64() * self.rate;
            self.tokens = (self.tokens + refill).min(self.burst);
        }
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// After a device's request stream ends cleanly, how long its response
/// stream may take to be dropped for the end to count as a lost connection
/// rather than the client leaving (see [`Reader::run`]).
const LEAVE_CHECK: std::time::Duration = std::time::Duration::from_millis(200);

/// Reads one device's controls.
struct Reader<S> {
    switchboard: S,
    conn: ConnId,
    epoch: u64,
    /// Another stream resumed this device.
    superseded: CancellationToken,
    /// This node gave the device up (see [`Attached::moved`]).
    moved: CancellationToken,
    gone: oneshot::Receiver<()>,
    end: oneshot::Sender<Status>,
    /// When the stream ends unless its token is refreshed.
    expires: Option<SystemTime>,
    /// When the current credential was taken (at connect, or refreshed).
    since: SystemTime,
    /// Whether `RefreshDue` went out for the current token.
    asked: bool,
    refresh_ahead: Duration,
    auth: Arc<Authenticator>,
    /// Whom the stream's token names: a refreshed token must name them too.
    user: UserId,
    bucket: TokenBucket,
    shutdown: CancellationToken,
    /// Answers to the controls refused here, for the response stream.
    answers: SharedAnswers,
    /// Controls forwarded to the switchboard so far.
    forwarded: u64,
    /// The two counters it needs (not all of [`Metrics`]: this is per
    /// device, and an idle device's memory counts).
    controls: Family<ResultLabel, Counter>,
    refreshes: Family<ResultLabel, Counter>,
    token_expiries: Counter,
    slow_consumers: Counter,
    /// Held while the device is connected.
    _permit: OwnedSemaphorePermit,
}

impl<S: Switchboard> Reader<S> {
    /// Answers a control refused at the edge, counted as the switchboard
    /// counts the others. The status to end the stream with when the device
    /// does not read its answers (the same slow-consumer policy as for its
    /// events).
    fn refuse(&mut self, seq: u64, code: u32, reason: &'static str) -> Option<Status> {
        self.controls
            .get_or_create(&ResultLabel {
                result: code.into(),
            })
            .inc();
        debug!(conn = self.conn.0, seq, code, reason, "control refused");
        let answer = Outgoing::Result {
            seq,
            code,
            call_id: None,
            reason: crate::device::Reason(reason),
        };
        self.say(convert::server_message(&answer))
    }

    /// Queues one of the reader's messages in its place on the stream; the
    /// status to end the stream with when the device does not read it.
    fn say(&mut self, msg: pb::ServerMessage) -> Option<Status> {
        if self.answers.push(self.forwarded, msg) {
            return None;
        }
        warn!(
            conn = self.conn.0,
            "device not reading its stream: ending it"
        );
        self.slow_consumers.inc();
        Some(Status::resource_exhausted(
            "this device does not read its stream",
        ))
    }

    /// When the reader's alarm next goes off: first (once per token) to ask
    /// for a new token, `refresh_ahead` before expiry, but not before half
    /// the token's life on this stream has passed (a client whose tokens
    /// live less than `refresh_ahead` is not asked again at once after each
    /// refresh); then at expiry. `None`: the credential never expires.
    fn alarm(&self) -> Option<tokio::time::Instant> {
        let expires = self.expires?;
        let at = if self.asked {
            expires
        } else {
            let ahead = expires
                .checked_sub(self.refresh_ahead)
                .unwrap_or(SystemTime::UNIX_EPOCH);
            let half = expires.duration_since(self.since).unwrap_or_default() / 2;
            ahead.max(self.since + half)
        };
        let left = at.duration_since(SystemTime::now()).unwrap_or_default();
        // Beyond what an Instant can hold (exp near 2^63): never.
        tokio::time::Instant::now().checked_add(left)
    }

    /// A `TokenRefresh`: checked, and on success the stream's expiry moves.
    /// Answered in its place either way.
    fn refresh(&mut self, r: pb::TokenRefresh) -> Option<Status> {
        let (code, message) = if !self.bucket.take(Instant::now()) {
            (
                codes::RATE_LIMITED,
                "too many messages; slow down".to_owned(),
            )
        } else {
            match self.auth.refresh(&self.user, &r.token) {
                Ok(expires) => {
                    self.expires = expires;
                    self.since = SystemTime::now();
                    self.asked = false;
                    (codes::OK, String::new())
                }
                Err(why) => (codes::TOKEN_REFUSED, why),
            }
        };
        self.refreshes
            .get_or_create(&ResultLabel {
                result: code.into(),
            })
            .inc();
        debug!(conn = self.conn.0, seq = r.seq, code, %message, "token refresh");
        self.say(pb::ServerMessage {
            kind: Some(pb::server_message::Kind::RefreshResult(pb::RefreshResult {
                seq: r.seq,
                code,
                message,
                expires_at_ms: self.expires.map_or(0, unix_ms),
            })),
        })
    }

    /// Forwards the device's controls to the switchboard until its stream
    /// ends, then reports the device gone. Being the only sender of both, it
    /// keeps them in order: a FINISH sent just before hanging up is applied
    /// first.
    async fn run<I>(mut self, mut inbound: I)
    where
        I: Stream<Item = Result<pb::ClientMessage, Status>> + Unpin,
    {
        let conn = self.conn;
        // One timer: the token is asked for, then the stream ends with it.
        let mut armed = self.alarm();
        let alarm = tokio::time::sleep_until(armed.unwrap_or_else(tokio::time::Instant::now));
        tokio::pin!(alarm);
        // Whether the stream broke (kept for a resume) rather than ended.
        let mut lost = true;
        loop {
            let msg = tokio::select! {
                m = inbound.next() => m.transpose(),
                _ = &mut self.gone => break,
                () = self.superseded.cancelled() => {
                    // Not a code the SDK reconnects on: the device lives on
                    // in the stream that resumed it.
                    let _ = self.end.send(Status::failed_precondition(
                        "this device was resumed by another stream",
                    ));
                    lost = false;
                    break;
                }
                () = self.moved.cancelled() => {
                    let _ = self.end.send(Status::unavailable(
                        "this node lost its hold on the call state: reconnect",
                    ));
                    lost = false;
                    break;
                }
                () = self.shutdown.cancelled() => {
                    // Clients reconnect (to this node restarted, or another).
                    let _ = self.end.send(Status::unavailable("the call service is shutting down"));
                    break;
                }
                () = &mut alarm, if armed.is_some() => {
                    if self.asked {
                        debug!(conn = conn.0, "token expired: ending the stream");
                        self.token_expiries.inc();
                        let _ = self.end.send(Status::unauthenticated("token expired"));
                        lost = false;
                        break;
                    }
                    self.asked = true;
                    let due = pb::ServerMessage {
                        kind: Some(pb::server_message::Kind::RefreshDue(pb::RefreshDue {
                            expires_at_ms: self.expires.map_or(0, unix_ms),
                        })),
                    };
                    if let Some(status) = self.say(due) {
                        let _ = self.end.send(status);
                        lost = false;
                        break;
                    }
                    armed = self.alarm();
                    if let Some(at) = armed {
                        alarm.as_mut().reset(at);
                    }
                    continue;
                }
            };
            let msg = match msg {
                Ok(Some(msg)) => msg,
                // The client closed its side: it is leaving, not lost...
                // unless the connection is gone. A connection that keepalive
                // found dead is shut down with GOAWAY NO_ERROR, which ends
                // every request body as cleanly as a client that leaves; but
                // then the response stream goes with it, at once.
                Ok(None) => {
                    lost = tokio::time::timeout(LEAVE_CHECK, &mut self.gone)
                        .await
                        .is_ok();
                    break;
                }
                Err(status) => {
                    // Malformed or oversized input ends this stream with the
                    // reason; a client that is simply gone reads nothing.
                    debug!(conn = conn.0, error = %status.message(), "device stream failed");
                    lost = broken_path(&status);
                    let _ = self.end.send(status);
                    break;
                }
            };
            let (seq, control) = match msg.kind {
                Some(pb::client_message::Kind::Control(c)) if self.bucket.take(Instant::now()) => {
                    (c.seq, convert::control(c))
                }
                Some(pb::client_message::Kind::Control(c)) => (
                    c.seq,
                    Err((codes::RATE_LIMITED, "too many controls; slow down")),
                ),
                Some(pb::client_message::Kind::Refresh(r)) => {
                    if let Some(status) = self.refresh(r) {
                        let _ = self.end.send(status);
                        lost = false;
                        break;
                    }
                    armed = self.alarm();
                    if let Some(at) = armed {
                        alarm.as_mut().reset(at);
                    }
                    continue;
                }
                None => (0, Err((codes::INVALID_ARGUMENT, "empty client message"))),
            };
            match control {
                Ok(control) => {
                    if self
                        .switchboard
                        .control(conn, self.epoch, seq, control)
                        .await
                        .is_err()
                    {
                        return;
                    }
                    self.forwarded += 1;
                }
                // Refused here: the switchboard never sees it.
                Err((code, reason)) => {
                    if let Some(status) = self.refuse(seq, code, reason) {
                        let _ = self.end.send(status);
                        lost = false;
                        break;
                    }
                }
            }
        }
        self.switchboard.disconnect(conn, self.epoch, lost).await;
    }
}

/// Calls in a `ListCalls` answer when the request does not say.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// The most calls in one `ListCalls` answer: 500 of the largest (4 KiB
/// user string, 128-byte ids) stay under 2.5 MB.
pub const MAX_PAGE_SIZE: usize = 500;

/// Whether a stream that failed with `status` broke on the way (kept for a
/// resume) rather than carrying malformed input (not a network fault: no
/// resume). A transport failure (a reset, a connection torn down) carries
/// its h2 / hyper / io error as the source, whatever code it maps to;
/// malformed input is a status of tonic's decoder, with no source. (A dead
/// path found by keepalive ends the body cleanly instead: see the `Ok(None)`
/// arm of [`Reader::run`].)
fn broken_path(status: &Status) -> bool {
    std::error::Error::source(status).is_some()
        || !matches!(
            status.code(),
            tonic::Code::Internal | tonic::Code::OutOfRange | tonic::Code::InvalidArgument
        )
}

/// `videocall.v1.CallAdmin`: forced FINISH and queries.
#[derive(Debug)]
pub struct AdminApi<S> {
    switchboard: S,
}

impl<S: Switchboard> AdminApi<S> {
    pub fn new(switchboard: S) -> Self {
        Self { switchboard }
    }
}

fn admin_user(raw: &str) -> Result<Arc<str>, Status> {
    convert::user_id(raw).map_err(|e| Status::invalid_argument(e.to_string()))
}

#[tonic::async_trait]
impl<S: Switchboard> pb::call_admin_server::CallAdmin for AdminApi<S> {
    async fn video_call_control(
        &self,
        request: Request<pb::AdminControl>,
    ) -> Result<Response<pb::AdminControlResult>, Status> {
        let c = request.into_inner();
        let invalid = Response::new(pb::AdminControlResult {
            code: codes::INVALID_ARGUMENT,
            call_id: String::new(),
        });
        if c.event_type != pb::EventType::Finish as i32 || c.user_str.len() > convert::MAX_USER_STR
        {
            return Ok(invalid);
        }
        let Ok(user) = convert::user_id(&c.user_id) else {
            return Ok(invalid);
        };
        let only = match c.call_id.as_str() {
            "" => None,
            id => match uuid::Uuid::parse_str(id) {
                Ok(id) => Some(CallId(id)),
                Err(_) => return Ok(invalid),
            },
        };
        let f = ForceFinish {
            user,
            only,
            code: c.error_code,
            flags: c.flags,
            param: c.param,
            user_str: Arc::from(c.user_str),
        };
        let o = self.switchboard.force_finish(f).await?;
        Ok(Response::new(pb::AdminControlResult {
            code: o.code,
            call_id: o.call_id.map(|c| c.to_string()).unwrap_or_default(),
        }))
    }

    async fn list_calls(
        &self,
        request: Request<pb::ListCallsRequest>,
    ) -> Result<Response<pb::ListCallsResponse>, Status> {
        let r = request.into_inner();
        let limit = match r.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => usize::try_from(n)
                .unwrap_or(MAX_PAGE_SIZE)
                .min(MAX_PAGE_SIZE),
        };
        let after = match r.page_token.as_str() {
            "" => None,
            token => Some(
                uuid::Uuid::parse_str(token)
                    .map(CallId)
                    .map_err(|_| Status::invalid_argument("not a page token of ListCalls"))?,
            ),
        };
        let (calls, more) = self.switchboard.list_calls(after, limit).await?;
        let next_page_token = match (more, calls.last()) {
            (true, Some(last)) => last.call_id.to_string(),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListCallsResponse {
            calls: calls.iter().map(convert::call_info).collect(),
            next_page_token,
        }))
    }

    async fn get_user_state(
        &self,
        request: Request<pb::GetUserStateRequest>,
    ) -> Result<Response<pb::GetUserStateResponse>, Status> {
        let user = admin_user(&request.into_inner().user_id)?;
        let s = self.switchboard.user_state(user).await?;
        Ok(Response::new(pb::GetUserStateResponse {
            state: convert::user_state(s.state) as i32,
            connections: u32::try_from(s.connections).unwrap_or(u32::MAX),
            call: s.call.as_ref().map(convert::call_info),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_token_bucket_allows_a_burst_then_the_rate() {
        let mut b = TokenBucket::new(10, 3);
        let t0 = Instant::now();
        assert!((0..3).all(|_| b.take(t0)));
        assert!(!b.take(t0));
        // 100 ms at 10/s is one more token, not two.
        let t1 = t0 + Duration::from_millis(100);
        assert!(b.take(t1));
        assert!(!b.take(t1));
        // A long pause refills only up to the burst.
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| b.take(t2)).count(), 3);
    }
}
