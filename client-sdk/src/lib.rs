//! Rust client for the video-call service.
//!
//! A [`Client`] is one connected device of one user: it holds the single
//! bidirectional stream to the call service. Controls ([`Client::request`],
//! [`Client::reply`], [`Client::finish`]) return the service's result code;
//! call events arrive on the [`Events`] stream returned next to the client.
//!
//! ```no_run
//! use client_sdk::{Client, Code, Credentials, EventKind};
//!
//! # async fn demo() -> Result<(), client_sdk::Error> {
//! let (alice, mut alice_events) =
//!     Client::connect("http://127.0.0.1:50051", Credentials::dev_user("alice")).await?;
//! let code = alice.request("bob", client_sdk::flags::AUDIO | client_sdk::flags::VIDEO, 0, "hello").await?;
//! assert_eq!(code, Code::OK);
//! while let Some(event) = alice_events.next().await {
//!     match event.kind {
//!         EventKind::Reply if event.code != Code::OK => println!("bob did not answer: {}", event.code),
//!         EventKind::Start => println!("talking in room {}", event.param),
//!         EventKind::Finish => break,
//!         _ => {}
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! Layout: everything is in this file — [`Client`] and [`Events`], the
//! typed [`CallEvent`], result [`Code`]s, [`Credentials`] (with
//! [`TokenProvider`]), and [`Error`]; then the reader task: reconnect and
//! resume (`run`), the stream's messages (`read`), and token refresh
//! (`Refresher`).
//!
//! Tokens expire and calls last longer: with [`Credentials::provider`] the
//! SDK asks the application for a new token when the service asks for one
//! (a while before the stream's expiry), by itself a little before expiry
//! if the service said nothing, and before every reconnect, and sends it on
//! the live stream; the call goes on. A provider that fails is asked again
//! with backoff until the stream expires; then [`Events::end_reason`] says
//! `UNAUTHENTICATED` "token expired".
//!
//! Events must be read: the SDK buffers [`EVENT_BUFFER`] of them, then stops
//! reading the stream (results of controls wait too), and a server whose
//! queue for this device fills up closes the stream.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tracing::{debug, warn};
use videocall_proto::v1 as pb;
use videocall_proto::v1::call_service_client::CallServiceClient;

pub use videocall_proto;

/// Events buffered in the SDK before it stops reading the stream.
pub const EVENT_BUFFER: usize = 1024;
/// Metadata key of the development identity.
pub const DEV_USER_HEADER: &str = "x-videocall-user";

/// The flag bits of the contract; pass them through `flags`.
pub mod flags {
    pub const AUDIO: u32 = 0x01;
    pub const VIDEO: u32 = 0x02;
    pub const BLOCK_CALLER_AUDIO: u32 = 0x10;
    pub const BLOCK_CALLER_VIDEO: u32 = 0x20;
    pub const BLOCK_CALLEE_AUDIO: u32 = 0x40;
    pub const BLOCK_CALLEE_VIDEO: u32 = 0x80;
    pub const ASSISTANCE_REQUEST: u32 = 0x100;
    pub const CONTROL_REQUEST: u32 = 0x200;
}

/// A result or reason code: 0 for success, a contract code, a code added by
/// the project, or a business service's own code.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Code(pub u32);

impl Code {
    pub const OK: Code = Code(pb::ResultCode::Ok as u32);
    pub const CANCELLED: Code = Code(pb::ResultCode::Cancelled as u32);
    pub const OFFLINE: Code = Code(pb::ResultCode::Offline as u32);
    pub const BUSY: Code = Code(pb::ResultCode::Busy as u32);
    pub const REJECTED: Code = Code(pb::ResultCode::Rejected as u32);
    pub const NO_ANSWER: Code = Code(pb::ResultCode::NoAnswer as u32);
    pub const CONNECTION_LOST: Code = Code(pb::ResultCode::ConnectionLost as u32);
    pub const NOT_IN_CALL: Code = Code(pb::ResultCode::NotInCall as u32);
    pub const ALREADY_IN_CALL: Code = Code(pb::ResultCode::AlreadyInCall as u32);
    pub const BUSINESS_UNAVAILABLE: Code = Code(pb::ResultCode::BusinessUnavailable as u32);
    pub const ANSWERED_ELSEWHERE: Code = Code(pb::ResultCode::AnsweredElsewhere as u32);
    pub const INVALID_ARGUMENT: Code = Code(pb::ResultCode::InvalidArgument as u32);
    pub const RATE_LIMITED: Code = Code(pb::ResultCode::RateLimited as u32);
    pub const NOT_ALLOWED: Code = Code(pb::ResultCode::NotAllowed as u32);
    pub const TERMINATED: Code = Code(pb::ResultCode::Terminated as u32);
    pub const OVERLOADED: Code = Code(pb::ResultCode::Overloaded as u32);
    pub const STORE_UNAVAILABLE: Code = Code(pb::ResultCode::StoreUnavailable as u32);
    pub const TOKEN_REFUSED: Code = Code(pb::ResultCode::TokenRefused as u32);

    pub fn is_ok(self) -> bool {
        self == Code::OK
    }

    /// What the code means, in a few words; `None` for a code the system
    /// does not define (a business service's own).
    pub fn describe(self) -> Option<&'static str> {
        Some(match pb::ResultCode::try_from(self.0 as i32).ok()? {
            pb::ResultCode::Ok => "ok",
            pb::ResultCode::Cancelled => "cancelled by the caller",
            pb::ResultCode::Offline => "the callee is offline",
            pb::ResultCode::Busy => "the callee is busy",
            pb::ResultCode::Rejected => "rejected",
            pb::ResultCode::NoAnswer => "no answer",
            pb::ResultCode::ConnectionLost => "connection lost",
            pb::ResultCode::NotInCall => "not in a call",
            pb::ResultCode::AlreadyInCall => "already in a call",
            pb::ResultCode::BusinessUnavailable => "the business service is unavailable",
            pb::ResultCode::AnsweredElsewhere => "answered on another device",
            pb::ResultCode::InvalidArgument => "invalid argument",
            pb::ResultCode::RateLimited => "rate limited",
            pb::ResultCode::NotAllowed => "not allowed now",
            pb::ResultCode::Terminated => "ended by the service",
            pb::ResultCode::Overloaded => "the service is overloaded",
            pb::ResultCode::StoreUnavailable => "the shared call state is unavailable",
            pb::ResultCode::TokenRefused => "the new token was refused",
        })
    }
}

impl fmt::Debug for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.describe() {
            Some(d) => write!(f, "{} ({d})", self.0),
            None => write!(f, "{}", self.0),
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The four event types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    Request,
    Reply,
    Start,
    Finish,
}

/// A call event for this device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallEvent {
    pub kind: EventKind,
    /// The other party.
    pub peer: String,
    /// REPLY: 0 accepted, otherwise why not; FINISH: the reason.
    pub code: Code,
    pub flags: u32,
    /// START: the room id.
    pub param: u32,
    pub user_str: String,
    pub call_id: String,
}

impl CallEvent {
    /// The room id, for START.
    pub fn room_id(&self) -> Option<u32> {
        (self.kind == EventKind::Start).then_some(self.param)
    }

    fn from_proto(e: pb::CallEvent) -> Option<Self> {
        let kind = match pb::EventType::try_from(e.event_type).ok()? {
            pb::EventType::Request => EventKind::Request,
            pb::EventType::Reply => EventKind::Reply,
            pb::EventType::Start => EventKind::Start,
            pb::EventType::Finish => EventKind::Finish,
            pb::EventType::Unspecified => return None,
        };
        Some(Self {
            kind,
            peer: e.peer_user_id,
            code: Code(e.error_code),
            flags: e.flags,
            param: e.param,
            user_str: e.user_str,
            call_id: e.call_id,
        })
    }
}

/// A control with every field of the contract.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Control {
    /// `pb::EventType` as a number (REQUEST 1, REPLY 2, FINISH 4).
    pub event_type: i32,
    pub peer: String,
    pub code: u32,
    pub flags: u32,
    pub param: u32,
    pub user_str: String,
}

/// The answer to a control.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlResult {
    pub code: Code,
    /// The call it applied to (a new REQUEST's call id), if any.
    pub call_id: String,
    /// Why a non-zero code was given.
    pub message: String,
}

/// How the client proves who it is.
#[derive(Clone)]
pub enum Credentials {
    /// A signed token, sent as `authorization: Bearer <token>`. It cannot
    /// be renewed: the stream ends when it expires.
    Bearer(String),
    /// Signed tokens from the application, asked for when the stream
    /// opens, when it needs a new one, and before every reconnect.
    Provider(TokenProvider),
    /// Development only: the user id, trusted as is by a call service
    /// started with `--dev-identity`.
    DevUser(String),
}

impl Credentials {
    pub fn dev_user(user: impl Into<String>) -> Self {
        Credentials::DevUser(user.into())
    }

    /// Tokens from `fetch`, an async callback of the application (it asks
    /// its backend for a token of the signed-in user, say).
    pub fn provider<F, Fut, E>(fetch: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, E>> + Send + 'static,
        E: fmt::Display,
    {
        Credentials::Provider(TokenProvider::new(fetch))
    }

    /// The metadata the stream opens with (a provider is asked for a
    /// token).
    async fn header(&self) -> Result<(&'static str, MetadataValue<tonic::metadata::Ascii>), Error> {
        let (key, value) = match self {
            Credentials::Bearer(t) => ("authorization", format!("Bearer {t}")),
            Credentials::Provider(p) => ("authorization", format!("Bearer {}", p.fetch().await?)),
            Credentials::DevUser(u) => (DEV_USER_HEADER, u.clone()),
        };
        Ok((key, value.parse().map_err(|_| Error::Credentials)?))
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::Bearer(_) => f.write_str("Bearer(..)"),
            Credentials::Provider(_) => f.write_str("Provider(..)"),
            Credentials::DevUser(u) => f.debug_tuple("DevUser").field(u).finish(),
        }
    }
}

/// What a [`TokenProvider`] returns: a token, or why there is none.
pub type TokenFuture = Pin<Box<dyn Future<Output = Result<String, String>> + Send>>;

/// The application's source of tokens (see [`Credentials::provider`]).
/// Cheap to clone.
#[derive(Clone)]
pub struct TokenProvider(Arc<dyn Fn() -> TokenFuture + Send + Sync>);

impl TokenProvider {
    pub fn new<F, Fut, E>(fetch: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, E>> + Send + 'static,
        E: fmt::Display,
    {
        Self(Arc::new(move || {
            let fut = fetch();
            Box::pin(async move { fut.await.map_err(|e| e.to_string()) })
        }))
    }

    /// Asks for a token.
    fn ask(&self) -> TokenFuture {
        (self.0)()
    }

    async fn fetch(&self) -> Result<String, Error> {
        self.ask().await.map_err(Error::Token)
    }
}

impl fmt::Debug for TokenProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenProvider(..)")
    }
}

/// What went wrong talking to the call service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid endpoint: {0}")]
    Endpoint(#[source] tonic::transport::Error),
    #[error("cannot connect to the call service: {0}")]
    Connect(#[source] tonic::transport::Error),
    #[error("the call service refused the stream: {}: {}", .0.code(), .0.message())]
    Refused(#[source] tonic::Status),
    #[error("credentials cannot be sent as metadata (visible ASCII only)")]
    Credentials,
    #[error("the token provider gave no token: {0}")]
    Token(String),
    #[error("the call service did not follow the protocol: {0}")]
    Protocol(&'static str),
    #[error("the stream to the call service has ended")]
    Disconnected,
    /// The stream broke after the control was sent and before its result
    /// came; the device resumed on a new stream, but the result was lost
    /// with the old one (or the control never reached the service). The
    /// control may or may not have been applied: the call's events, which
    /// the resumed stream delivers, say what happened.
    #[error(
        "the connection broke before this control's result arrived; it may or may not have \
         been applied (the call's events tell)"
    )]
    ResultLost,
}

/// Controls waiting for their result, by `seq`.
type Pending = Arc<Mutex<HashMap<u64, Waiting>>>;

/// A control waiting for its result.
#[derive(Debug)]
struct Waiting {
    /// The generation of the stream it was sent on (see [`Outbound`]).
    generation: u64,
    done: oneshot::Sender<Result<ControlResult, Error>>,
    /// A REQUEST's peer: taken, it starts a call the SDK keeps track of.
    dial: Option<String>,
}

/// The calls of this device that have not ended, by call id, as its
/// events and results tell: when the device is lost (a reconnect could not
/// resume it), the SDK ends them for the application with the events the
/// peer gets too (100106), so no call is left open in the application.
///
/// It also drops an event the device has had already: after a node of a
/// cluster dies, the events it had just handed to its streams are sent
/// again on the resumed stream, since they may not have arrived. A device
/// gets at most one event of each type per call (the contract's lines), so
/// the call id and the type say which were had: remembered for the last
/// [`SEEN_CALLS`] calls.
#[derive(Debug, Default)]
struct Calls {
    open: HashMap<String, Call>,
    /// The event types (a bit each) had, by call id; oldest first in
    /// `order`.
    seen: HashMap<String, u8>,
    order: std::collections::VecDeque<String>,
}

/// How many calls' events [`Calls`] remembers to drop repeats.
const SEEN_CALLS: usize = 4096;

#[derive(Debug)]
struct Call {
    peer: String,
    /// This device placed it.
    caller: bool,
    started: bool,
}

impl Calls {
    /// Takes the event into account; `false` if the device had it already.
    fn event(&mut self, e: &CallEvent) -> bool {
        let bit = 1u8 << (e.kind as u8);
        match self.seen.get_mut(&e.call_id) {
            // An event naming no call (a server that does not name its
            // calls) cannot be told from another: never dropped.
            _ if e.call_id.is_empty() => {}
            Some(had) if *had & bit != 0 => return false,
            Some(had) => *had |= bit,
            None => {
                self.seen.insert(e.call_id.clone(), bit);
                self.order.push_back(e.call_id.clone());
                if self.order.len() > SEEN_CALLS
                    && let Some(old) = self.order.pop_front()
                {
                    self.seen.remove(&old);
                }
            }
        }
        match e.kind {
            EventKind::Request => {
                self.open.insert(
                    e.call_id.clone(),
                    Call {
                        peer: e.peer.clone(),
                        caller: false,
                        started: false,
                    },
                );
            }
            EventKind::Start => {
                if let Some(c) = self.open.get_mut(&e.call_id) {
                    c.started = true;
                }
            }
            EventKind::Reply if e.code.is_ok() => {}
            EventKind::Reply | EventKind::Finish => {
                self.open.remove(&e.call_id);
            }
        }
        true
    }

    /// The events that end every call: REPLY for a caller still waiting
    /// for one, FINISH otherwise, each with CONNECTION_LOST.
    fn lost(&mut self) -> Vec<CallEvent> {
        let lost: Vec<_> = self.open.drain().collect();
        lost.into_iter()
            .map(|(call_id, c)| CallEvent {
                kind: if c.caller && !c.started {
                    EventKind::Reply
                } else {
                    EventKind::Finish
                },
                peer: c.peer,
                code: Code::CONNECTION_LOST,
                flags: 0,
                param: 0,
                user_str: String::new(),
                call_id,
            })
            .inspect(|e| {
                self.event(e);
            })
            .collect()
    }
}

/// Aborts the reader task when the last of `Client` and `Events` is gone.
#[derive(Debug)]
struct ReaderGuard(JoinHandle<()>);

impl Drop for ReaderGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One connected device. Cheap to share by reference across tasks; every
/// method takes `&self`. Dropping it closes the stream.
#[derive(Debug)]
pub struct Client {
    /// The current stream's outbound queue; replaced on reconnect.
    tx: Outbound,
    pending: Pending,
    next_seq: Arc<AtomicU64>,
    user_id: String,
    connection_id: String,
    _reader: Arc<ReaderGuard>,
}

/// The call events of one device, in order. Ends when the stream ends.
#[derive(Debug)]
pub struct Events {
    rx: mpsc::Receiver<CallEvent>,
    end: EndReason,
    _reader: Arc<ReaderGuard>,
}

/// Why the stream ended, once it has: the status the service ended it with.
type EndReason = Arc<Mutex<Option<tonic::Status>>>;

impl Events {
    /// The next event, or `None` once the stream has ended.
    pub async fn next(&mut self) -> Option<CallEvent> {
        self.rx.recv().await
    }

    /// An event that has already arrived, without waiting.
    ///
    /// Results and events share one ordered stream, so once a control's
    /// result is back, every event the service sent before it is here.
    pub fn try_next(&mut self) -> Option<CallEvent> {
        self.rx.try_recv().ok()
    }

    /// After [`Events::next`] returned `None`: the error status the stream
    /// ended with (`UNAUTHENTICATED` "token expired", say), or `None` if it
    /// ended cleanly.
    pub fn end_reason(&self) -> Option<tonic::Status> {
        lock(&self.end).clone()
    }
}

impl tokio_stream::Stream for Events {
    type Item = CallEvent;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<CallEvent>> {
        self.rx.poll_recv(cx)
    }
}

impl Client {
    /// Connects to the call service at `url` (e.g. `http://127.0.0.1:50051`)
    /// and waits until the device is registered, so it can be called as soon
    /// as this returns.
    pub async fn connect(
        url: impl Into<String>,
        credentials: Credentials,
    ) -> Result<(Client, Events), Error> {
        let endpoint = endpoint(url.into())?;
        let channel = endpoint.connect().await.map_err(Error::Connect)?;
        Self::start(channel, Some(endpoint), credentials).await
    }

    /// Like [`Client::connect`] over TLS (`https://` URL), trusting the CA
    /// certificate `ca_pem` (PEM) for the server's certificate.
    pub async fn connect_tls(
        url: impl Into<String>,
        credentials: Credentials,
        ca_pem: impl AsRef<[u8]>,
    ) -> Result<(Client, Events), Error> {
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
        let endpoint = endpoint(url.into())?
            .tls_config(tls)
            .map_err(Error::Endpoint)?;
        let channel = endpoint.connect().await.map_err(Error::Connect)?;
        Self::start(channel, Some(endpoint), credentials).await
    }

    /// Like [`Client::connect`], on a channel the caller configured (TLS,
    /// timeouts, a shared connection).
    pub async fn connect_with_channel(
        channel: Channel,
        credentials: Credentials,
    ) -> Result<(Client, Events), Error> {
        Self::start(channel, None, credentials).await
    }

    async fn start(
        channel: Channel,
        endpoint: Option<Endpoint>,
        credentials: Credentials,
    ) -> Result<(Client, Events), Error> {
        let (tx, session) = open(&channel, &credentials, None).await?;
        let connected = session.connected.clone();
        let tx_for_reader = tx.clone();
        let outbound: Outbound = Arc::new(Mutex::new((0, tx)));
        let pending: Pending = Arc::default();
        let next_seq = Arc::new(AtomicU64::new(1));
        let (events_tx, events_rx) = mpsc::channel(EVENT_BUFFER);
        let end = EndReason::default();
        let link = Link {
            channel,
            endpoint,
            credentials,
            outbound: Arc::downgrade(&outbound),
            next_seq: next_seq.clone(),
        };
        let reader = tokio::spawn(run(
            link,
            session,
            tx_for_reader,
            pending.clone(),
            events_tx,
            end.clone(),
        ));
        let guard = Arc::new(ReaderGuard(reader));
        let client = Client {
            tx: outbound,
            pending,
            next_seq,
            user_id: connected.user_id,
            connection_id: connected.connection_id,
            _reader: guard.clone(),
        };
        Ok((
            client,
            Events {
                rx: events_rx,
                end,
                _reader: guard,
            },
        ))
    }

    /// The user id the service authenticated this device as.
    pub fn user_id(&self) -> &str {
        &self.user_id
    }

    /// This device's connection id (as in the service's logs).
    pub fn connection_id(&self) -> &str {
        &self.connection_id
    }

    /// Dials `peer`. Code 0 means the call was placed (its outcome arrives
    /// as a REPLY event); 440 means this user already has a call.
    pub async fn request(
        &self,
        peer: &str,
        flags: u32,
        param: u32,
        user_str: &str,
    ) -> Result<Code, Error> {
        let c = Control {
            event_type: pb::EventType::Request as i32,
            peer: peer.into(),
            flags,
            param,
            user_str: user_str.into(),
            ..Control::default()
        };
        Ok(self.control(c).await?.code)
    }

    /// Answers `peer`'s call: [`Code::OK`] accepts, any other code (usually
    /// [`Code::REJECTED`]) rejects. A caller may send [`Code::CANCELLED`] to
    /// give up.
    pub async fn reply(&self, peer: &str, code: Code) -> Result<Code, Error> {
        let c = Control {
            event_type: pb::EventType::Reply as i32,
            peer: peer.into(),
            code: code.0,
            ..Control::default()
        };
        Ok(self.control(c).await?.code)
    }

    /// Hangs up the call with `peer` (before START: cancels, or rejects).
    pub async fn finish(&self, peer: &str) -> Result<Code, Error> {
        let c = Control {
            event_type: pb::EventType::Finish as i32,
            peer: peer.into(),
            ..Control::default()
        };
        Ok(self.control(c).await?.code)
    }

    /// Sends any control and waits for its result.
    pub async fn control(&self, c: Control) -> Result<ControlResult, Error> {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let (generation, tx) = lock(&self.tx).clone();
        let (done, rx) = oneshot::channel();
        let dial = (c.event_type == pb::EventType::Request as i32).then(|| c.peer.clone());
        lock(&self.pending).insert(
            seq,
            Waiting {
                generation,
                done,
                dial,
            },
        );
        let msg = pb::ClientMessage {
            kind: Some(pb::client_message::Kind::Control(pb::CallControl {
                seq,
                event_type: c.event_type,
                peer_user_id: c.peer,
                error_code: c.code,
                flags: c.flags,
                param: c.param,
                user_str: c.user_str,
            })),
        };
        if tx.send(msg).await.is_err() {
            lock(&self.pending).remove(&seq);
            return Err(Error::Disconnected);
        }
        rx.await.map_err(|_| Error::Disconnected)?
    }
}

/// The SDK's connection settings. HTTP/2 keepalive pings every 30 s
/// while a stream is open (a call service allows that; gRPC servers refuse
/// pings more often than every 10 s with streams, 5 min without), so a dead
/// server or a dead network path is noticed.
fn endpoint(url: String) -> Result<Endpoint, Error> {
    Ok(Endpoint::from_shared(url)
        .map_err(Error::Endpoint)?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(false))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The map stays consistent even if a holder panicked: each operation is
    // one insert or remove.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How many times the SDK tries to reconnect after its stream breaks,
/// waiting 100 ms, then twice as long each time (at most 5 s), with jitter.
pub const RECONNECT_ATTEMPTS: u32 = 8;
/// The metadata key a stream resumes a device with.
pub const RESUME_HEADER: &str = "x-videocall-resume";

/// The current stream's sender, with its generation (bumped on every
/// reconnect), so that a control sent on a stream that broke can be told
/// from one sent on the stream that resumed the device.
type Outbound = Arc<Mutex<(u64, mpsc::Sender<pb::ClientMessage>)>>;

/// What it takes to open another stream.
struct Link {
    channel: Channel,
    /// Where `channel` was connected, when the SDK made it: a reconnect
    /// after a refusal opens a new connection, so a load balancer in front
    /// of several nodes can take it to another (the old connection may be
    /// held by a node that cannot serve).
    endpoint: Option<Endpoint>,
    credentials: Credentials,
    /// The client's outbound slot; gone once the client is dropped.
    outbound: std::sync::Weak<Mutex<(u64, mpsc::Sender<pb::ClientMessage>)>>,
    /// The client's control sequence numbers, for the resume barrier.
    next_seq: Arc<AtomicU64>,
}

/// An open stream, past its `Connected`.
struct Session {
    inbound: tonic::Streaming<pb::ServerMessage>,
    connected: pb::Connected,
}

/// Opens a stream (resuming a device when `resume` is its token) and waits
/// for `Connected`.
async fn open(
    channel: &Channel,
    credentials: &Credentials,
    resume: Option<&str>,
) -> Result<(mpsc::Sender<pb::ClientMessage>, Session), Error> {
    let (key, value) = credentials.header().await?;
    let (tx, rx) = mpsc::channel(64);
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    request.metadata_mut().insert(key, value);
    if let Some(token) = resume {
        let value: MetadataValue<_> = token
            .parse()
            .map_err(|_| Error::Protocol("bad resume token"))?;
        request.metadata_mut().insert(RESUME_HEADER, value);
    }
    let mut inbound = CallServiceClient::new(channel.clone())
        .session(request)
        .await
        .map_err(Error::Refused)?
        .into_inner();
    let connected = match inbound.message().await.map_err(Error::Refused)? {
        Some(pb::ServerMessage {
            kind: Some(pb::server_message::Kind::Connected(c)),
        }) => c,
        Some(_) => return Err(Error::Protocol("the first message was not Connected")),
        None => return Err(Error::Disconnected),
    };
    Ok((tx, Session { inbound, connected }))
}

/// Whether a stream that ended with `code` is worth reopening: the network
/// or the server went away, as opposed to being refused.
fn reconnectable(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Aborted
            | tonic::Code::Internal
    )
}

/// `base` scaled by a factor in [0.5, 1.0), so that clients cut off together
/// do not all come back at the same instant.
fn jitter(base: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    base.mul_f64(0.5 + f64::from(nanos % 1000) / 2000.0)
}

/// Reads the stream; when it breaks, reconnects with backoff and resumes
/// the device, so calls go on (the service keeps a device for a grace
/// window). If the device could not be resumed (the window passed, or the
/// service lost its state), the new stream is a fresh device: controls
/// waiting for a result fail with [`Error::Disconnected`], and the old
/// device's calls end for the application with the events their peers got
/// (REPLY 100106 for a call still waiting for its answer, FINISH 100106
/// otherwise).
///
/// After a resume, a control sent on the broken stream may never have
/// reached the service, or its result may have been lost with the stream;
/// either way it will never be answered. One whose result the service still
/// held is answered in the messages the service kept, which follow
/// `Connected`. So the SDK sends a *barrier* on the resumed stream (a
/// FINISH with no peer, answered INVALID_ARGUMENT and changing nothing):
/// once its result is in, every control of an older stream still waiting
/// fails with [`Error::ResultLost`]. Every control gets exactly one
/// answer.
async fn run(
    mut link: Link,
    mut session: Session,
    mut tx: mpsc::Sender<pb::ClientMessage>,
    pending: Pending,
    events: mpsc::Sender<CallEvent>,
    end: EndReason,
) {
    let mut generation = 0u64;
    let mut barrier = None;
    let mut calls = Calls::default();
    loop {
        let refresher = Refresher::new(&link.credentials, session.connected.expires_at_ms);
        let stream = Stream {
            inbound: &mut session.inbound,
            tx: &tx,
            next_seq: &link.next_seq,
        };
        let status = read(
            stream,
            refresher,
            &pending,
            &events,
            &mut barrier,
            &mut calls,
        )
        .await;
        let cause = match status {
            Some(s) if reconnectable(s.code()) => s,
            other => {
                *lock(&end) = other;
                break;
            }
        };
        let mut delay = Duration::from_millis(100);
        let mut reopened = None;
        for attempt in 1..=RECONNECT_ATTEMPTS {
            tokio::time::sleep(jitter(delay)).await;
            if link.outbound.strong_count() == 0 {
                return;
            }
            // Boxed, as the connect below: the task is sized for its
            // largest state, and every idle device would pay for these.
            match Box::pin(open(
                &link.channel,
                &link.credentials,
                Some(&session.connected.resume_token),
            ))
            .await
            {
                Ok(x) => {
                    reopened = Some(x);
                    break;
                }
                Err(Error::Refused(s)) if !reconnectable(s.code()) => {
                    warn!(code = ?s.code(), message = s.message(), "reconnect refused");
                    break;
                }
                Err(e) => {
                    debug!(attempt, error = %e, "reconnect failed");
                    // The next attempt on a connection of its own.
                    if let Some(ep) = &link.endpoint
                        && let Ok(c) = Box::pin(ep.connect()).await
                    {
                        link.channel = c;
                    }
                }
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
        let Some((next_tx, next)) = reopened else {
            *lock(&end) = Some(cause);
            break;
        };
        if next.connected.resumed {
            debug!("stream resumed");
        } else {
            warn!("reconnected as a new device: the old device's calls have ended");
            lock(&pending).clear();
            for e in calls.lost() {
                let _ = events.send(e).await;
            }
        }
        tx = next_tx;
        generation += 1;
        match link.outbound.upgrade() {
            Some(slot) => *lock(&slot) = (generation, tx.clone()),
            None => return,
        }
        if next.connected.resumed {
            let seq = link.next_seq.fetch_add(1, Ordering::Relaxed);
            let msg = pb::ClientMessage {
                kind: Some(pb::client_message::Kind::Control(pb::CallControl {
                    seq,
                    event_type: pb::EventType::Finish as i32,
                    ..Default::default()
                })),
            };
            if tx.send(msg).await.is_ok() {
                barrier = Some((seq, generation));
            }
        }
        session = next;
    }
    // Waiting controls learn that the stream is gone.
    lock(&pending).clear();
}

/// One open stream, as [`read`] needs it.
struct Stream<'a> {
    inbound: &'a mut tonic::Streaming<pb::ServerMessage>,
    tx: &'a mpsc::Sender<pb::ClientMessage>,
    next_seq: &'a AtomicU64,
}

/// Sleeps until `at`; never when `None`.
async fn alarm(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Waits for the token being fetched, if one is.
async fn fetched(fetching: &mut Option<TokenFuture>) -> Result<String, String> {
    match fetching {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// Reads one stream until it ends: `None` when it ended cleanly, else the
/// status it failed with. Meanwhile keeps its token fresh.
async fn read(
    stream: Stream<'_>,
    mut refresher: Refresher,
    pending: &Pending,
    events: &mpsc::Sender<CallEvent>,
    barrier: &mut Option<(u64, u64)>,
    calls: &mut Calls,
) -> Option<tonic::Status> {
    let Stream {
        inbound,
        tx,
        next_seq,
    } = stream;
    loop {
        let msg = tokio::select! {
            msg = inbound.message() => msg,
            () = alarm(refresher.next) => {
                refresher.fire();
                continue;
            }
            token = fetched(&mut refresher.fetching) => {
                let seq = next_seq.fetch_add(1, Ordering::Relaxed);
                if let Some(msg) = refresher.fetched(token, seq)
                    && tx.try_send(msg).is_err()
                {
                    refresher.retry();
                }
                continue;
            }
        };
        let msg = match msg {
            Ok(Some(msg)) => msg,
            Ok(None) => return None,
            Err(status) => {
                warn!(code = ?status.code(), message = status.message(), "call service stream failed");
                return Some(status);
            }
        };
        match msg.kind {
            Some(pb::server_message::Kind::RefreshDue(_)) => refresher.due(),
            Some(pb::server_message::Kind::RefreshResult(r)) => refresher.answered(r),
            Some(pb::server_message::Kind::Result(r)) => {
                if let Some((seq, generation)) = *barrier
                    && r.seq == seq
                {
                    // Everything the service kept has arrived: what an older
                    // stream still waits for will never come.
                    *barrier = None;
                    let mut waiting = lock(pending);
                    for (_, w) in waiting.extract_if(|_, w| w.generation < generation) {
                        let _ = w.done.send(Err(Error::ResultLost));
                    }
                    continue;
                }
                if let Some(w) = lock(pending).remove(&r.seq) {
                    if let Some(peer) = w.dial
                        && r.code == Code::OK.0
                    {
                        calls.open.insert(
                            r.call_id.clone(),
                            Call {
                                peer,
                                caller: true,
                                started: false,
                            },
                        );
                    }
                    let _ = w.done.send(Ok(ControlResult {
                        code: Code(r.code),
                        call_id: r.call_id,
                        message: r.message,
                    }));
                }
            }
            Some(pb::server_message::Kind::Event(e)) => match CallEvent::from_proto(e) {
                // If nobody reads events any more, keep serving results.
                Some(event) => {
                    if calls.event(&event) {
                        let _ = events.send(event).await;
                    } else {
                        debug!(call = %event.call_id, kind = ?event.kind, "dropped an event had already");
                    }
                }
                None => warn!("ignoring an event of an unknown type"),
            },
            Some(pb::server_message::Kind::Connected(_)) | None => {}
        }
    }
}

/// The first wait before asking a failed token provider again, doubled
/// (with jitter) after each failure up to [`REFRESH_RETRY_MAX`].
pub const REFRESH_RETRY: Duration = Duration::from_secs(1);
/// The longest wait between two asks of a failing token provider.
pub const REFRESH_RETRY_MAX: Duration = Duration::from_secs(30);

/// Keeps one stream's token fresh, when the credentials are a provider:
/// fetches a token when the service sends `RefreshDue`, or by itself before
/// expiry (a third of the time left, at most 30 s, before it) if the
/// service said nothing, and sends it as a `TokenRefresh`. A failed fetch or
/// a refused token is tried again with backoff until the stream expires.
/// Pure state; [`read`] does the waiting.
struct Refresher {
    provider: Option<TokenProvider>,
    /// When the stream ends unless refreshed (`None`: never).
    expires: Option<SystemTime>,
    /// When to fetch a token next.
    next: Option<tokio::time::Instant>,
    /// The token being fetched.
    fetching: Option<TokenFuture>,
    /// The `seq` of the refresh sent and not answered yet.
    awaiting: Option<u64>,
    backoff: Duration,
}

impl Refresher {
    fn new(credentials: &Credentials, expires_at_ms: u64) -> Self {
        let provider = match credentials {
            Credentials::Provider(p) => Some(p.clone()),
            Credentials::Bearer(_) | Credentials::DevUser(_) => None,
        };
        let mut r = Self {
            provider,
            expires: None,
            next: None,
            fetching: None,
            awaiting: None,
            backoff: REFRESH_RETRY,
        };
        r.set_expiry(expires_at_ms);
        r
    }

    fn set_expiry(&mut self, expires_at_ms: u64) {
        self.expires = (expires_at_ms != 0)
            .then(|| UNIX_EPOCH.checked_add(Duration::from_millis(expires_at_ms)))
            .flatten();
        self.next = None;
        if self.provider.is_none() {
            return;
        }
        if let Some(expires) = self.expires {
            let left = expires
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            let margin = (left / 3).min(Duration::from_secs(30));
            self.next = tokio::time::Instant::now().checked_add(left - margin);
        }
    }

    /// The service asks for a token.
    fn due(&mut self) {
        if self.provider.is_none() {
            debug!("the service asks for a new token, but the credentials are a fixed token");
            return;
        }
        if self.fetching.is_none() && self.awaiting.is_none() {
            self.next = Some(tokio::time::Instant::now());
        }
    }

    /// Time to fetch a token.
    fn fire(&mut self) {
        self.next = None;
        if let Some(p) = &self.provider {
            self.fetching = Some(p.ask());
        }
    }

    /// The provider answered: the refresh to send, if it gave a token.
    fn fetched(&mut self, token: Result<String, String>, seq: u64) -> Option<pb::ClientMessage> {
        self.fetching = None;
        match token {
            Ok(token) => {
                self.awaiting = Some(seq);
                Some(pb::ClientMessage {
                    kind: Some(pb::client_message::Kind::Refresh(pb::TokenRefresh {
                        seq,
                        token,
                    })),
                })
            }
            Err(e) => {
                warn!(error = %e, "the token provider failed; asking again later");
                self.retry();
                None
            }
        }
    }

    /// Try again after the backoff.
    fn retry(&mut self) {
        self.awaiting = None;
        self.next = Some(tokio::time::Instant::now() + jitter(self.backoff));
        self.backoff = (self.backoff * 2).min(REFRESH_RETRY_MAX);
    }

    fn answered(&mut self, r: pb::RefreshResult) {
        if self.awaiting != Some(r.seq) {
            return;
        }
        self.awaiting = None;
        if r.code == Code::OK.0 {
            debug!(expires_at_ms = r.expires_at_ms, "token refreshed");
            self.backoff = REFRESH_RETRY;
            self.set_expiry(r.expires_at_ms);
        } else {
            warn!(code = ?Code(r.code), message = r.message, "token refresh refused");
            self.retry();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: EventKind, call: &str) -> CallEvent {
        CallEvent {
            kind,
            peer: "bob".into(),
            code: Code::OK,
            flags: 0,
            param: 0,
            user_str: String::new(),
            call_id: call.into(),
        }
    }

    #[test]
    fn an_event_sent_again_after_a_resume_is_dropped() {
        let mut calls = Calls::default();
        assert!(calls.event(&event(EventKind::Request, "c1")));
        assert!(calls.event(&event(EventKind::Start, "c1")));
        // Sent again on the resumed stream: had already.
        assert!(!calls.event(&event(EventKind::Request, "c1")));
        assert!(!calls.event(&event(EventKind::Start, "c1")));
        assert!(calls.event(&event(EventKind::Finish, "c1")));
        assert!(!calls.event(&event(EventKind::Finish, "c1")));
        assert!(calls.open.is_empty());
        // Another call's events are its own.
        assert!(calls.event(&event(EventKind::Request, "c2")));
        // Events that name no call are never taken for repeats.
        assert!(calls.event(&event(EventKind::Reply, "")));
        assert!(calls.event(&event(EventKind::Reply, "")));
    }

    #[test]
    fn the_calls_remembered_are_bounded() {
        let mut calls = Calls::default();
        for i in 0..SEEN_CALLS + 10 {
            let id = format!("c{i}");
            assert!(calls.event(&event(EventKind::Reply, &id)));
        }
        assert_eq!(calls.seen.len(), SEEN_CALLS);
        assert_eq!(calls.order.len(), SEEN_CALLS);
        // The oldest are forgotten, the newest still known.
        assert!(calls.event(&event(EventKind::Reply, "c0")));
        assert!(!calls.event(&event(EventKind::Reply, &format!("c{}", SEEN_CALLS + 9))));
    }

    #[test]
    fn the_events_the_sdk_ends_a_lost_device_s_calls_with_are_had() {
        let mut calls = Calls::default();
        calls.event(&event(EventKind::Request, "c1"));
        let lost = calls.lost();
        assert_eq!(lost.len(), 1);
        assert_eq!(lost[0].kind, EventKind::Finish);
        // The service's own FINISH for it, arriving late, is not repeated.
        assert!(!calls.event(&event(EventKind::Finish, "c1")));
    }
}
