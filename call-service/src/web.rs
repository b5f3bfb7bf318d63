//! The browser edge: the `Session` protocol over a WebSocket, and the web
//! phone's page.
//!
//! A browser cannot open a bidirectional gRPC stream, so `--web-addr`
//! serves the same session over a WebSocket at [`SESSION_PATH`]
//! (subprotocol [`SUBPROTOCOL`]): one message per text frame, in protobuf's
//! canonical JSON mapping, read and written through the contract's own
//! descriptors (`prost-reflect`; no mapping is written by hand). The first
//! frame is a `WebHello` (the token, the development user, the resume token:
//! what gRPC carries in metadata); from then on it is [`ClientApi::open`],
//! the very session the gRPC edge runs, so results, events, limits, resume,
//! refresh, the slow-consumer policy and the metrics are the same.
//!
//! **Ends.** A session ends with a close frame whose code is
//! `4000 + the gRPC status code` the gRPC stream would have ended with
//! (4014 UNAVAILABLE: reconnect and resume; 4016 UNAUTHENTICATED; 4003
//! INVALID_ARGUMENT: bad input; 4008 RESOURCE_EXHAUSTED; 4009
//! FAILED_PRECONDITION: resumed by another stream), the status message as
//! its reason. Bad input (not JSON, an unknown field or type, a binary
//! frame, a frame over [`MAX_FRAME_BYTES`]) ends that session only, with
//! 4003 and what was wrong; nothing changes.
//!
//! **Origins.** A page from another site could open a session with a
//! token it got hold of, so a request carrying `Origin` is served only
//! when that origin is the web address itself or on `--web-origins`'s list.
//! Clients that are not browsers send no `Origin`.
//!
//! **Connections.** The web listener accepts with the gRPC listeners'
//! limits ([`Limited`]): `--max-connections-per-peer` per IP address (its
//! own count), the first bytes within `--handshake-timeout`, accept errors
//! waited out; then a socket has [`HELLO_TIMEOUT`] to say who it is.
//!
//! **Slow consumers.** A socket is written as fast as the browser reads;
//! behind it the device's queue fills and the device is dropped exactly as
//! on gRPC. A write that stalls for [`WRITE_TIMEOUT`] closes the socket.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage, SerializeOptions};
use tokio::net::TcpListener;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Status;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::server::Connected;
use tracing::debug;
use videocall_proto::v1 as pb;
use videocall_telemetry::accept::{AcceptLimits, Conn, Refused, incoming};

use crate::api::{ClientApi, RESUME_HEADER};
use crate::auth::DEV_USER_HEADER;
use crate::switchboard::Switchboard;

/// The WebSocket subprotocol a client must ask for.
pub const SUBPROTOCOL: &str = "videocall.v1.json";
/// Where the session is served.
pub const SESSION_PATH: &str = "/v1/session";
/// The largest frame a client may send (a `CallControl` with the largest
/// user string, escaped, is well under it).
pub const MAX_FRAME_BYTES: usize = 64 * 1024;
/// How long a new socket may take to send its `WebHello`.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one write to a socket may stall before the socket is closed.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// The web phone: a page, its script and its style, served as they are.
const INDEX_HTML: &str = include_str!("../web/index.html");
const PHONE_JS: &str = include_str!("../web/phone.js");
const PHONE_CSS: &str = include_str!("../web/phone.css");

/// The contract's descriptors, for the JSON mapping.
static POOL: LazyLock<DescriptorPool> = LazyLock::new(|| {
    DescriptorPool::decode(videocall_proto::FILE_DESCRIPTOR_SET)
        .expect("the contract's descriptors are built with it")
});

/// Reads one message of type `name` from its canonical JSON: unknown
/// fields and values of the wrong type are errors, as is anything after
/// the object.
pub fn from_json<T: prost::Message + Default>(name: &str, text: &str) -> Result<T, String> {
    let desc = POOL
        .get_message_by_name(name)
        .ok_or_else(|| format!("no message {name}"))?;
    let mut de = serde_json::Deserializer::from_str(text);
    let options = DeserializeOptions::new().deny_unknown_fields(true);
    let msg = DynamicMessage::deserialize_with_options(desc, &mut de, &options)
        .map_err(|e| format!("not a {name} in JSON: {e}"))?;
    de.end().map_err(|e| format!("not a {name} in JSON: {e}"))?;
    msg.transcode_to::<T>()
        .map_err(|e| format!("not a {name}: {e}"))
}

/// Writes one message of type `name` in its canonical JSON (fields with
/// their default value left out, enums by name, 64-bit integers as
/// strings).
pub fn to_json<T: prost::Message>(name: &str, msg: &T) -> Result<String, String> {
    let desc = POOL
        .get_message_by_name(name)
        .ok_or_else(|| format!("no message {name}"))?;
    let mut dynamic = DynamicMessage::new(desc);
    dynamic.transcode_from(msg).map_err(|e| e.to_string())?;
    let mut out = serde_json::Serializer::new(Vec::new());
    dynamic
        .serialize_with_options(&mut out, &SerializeOptions::new())
        .map_err(|e| e.to_string())?;
    String::from_utf8(out.into_inner()).map_err(|e| e.to_string())
}

/// What the web edge serves with.
struct Web<S> {
    api: Arc<ClientApi<S>>,
    /// Origins allowed besides the web address itself
    /// (`scheme://host[:port]`).
    origins: Vec<String>,
    tasks: TaskTracker,
}

/// The web listener's connections, past the accept limits every listener
/// of the node has ([`videocall_telemetry::accept::incoming`]).
pub struct Limited {
    conns: Pin<Box<dyn Stream<Item = Result<Conn, Infallible>> + Send>>,
    addr: SocketAddr,
}

impl Limited {
    pub fn new(
        listener: TcpListener,
        limits: AcceptLimits,
        refused: Refused,
    ) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        Ok(Self {
            conns: Box::pin(incoming(listener, limits, refused)),
            addr,
        })
    }
}

impl std::fmt::Debug for Limited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limited").field("addr", &self.addr).finish()
    }
}

impl axum::serve::Listener for Limited {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Conn, SocketAddr) {
        match self.conns.next().await {
            Some(Ok(conn)) => {
                let peer = conn.connect_info().remote_addr().unwrap_or(self.addr);
                (conn, peer)
            }
            // The stream never ends (accept errors are waited out).
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.addr)
    }
}

/// Serves the web phone and the WebSocket session on `listener` until
/// `shutdown`; the sessions are tracked on `tasks` (they end with the
/// switchboard, as gRPC streams do).
pub async fn serve<S: Switchboard>(
    listener: Limited,
    api: Arc<ClientApi<S>>,
    origins: Vec<String>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let web = Arc::new(Web {
        api,
        origins,
        tasks,
    });
    let app = Router::new()
        .route(
            "/",
            get(|| async { page("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/phone.js",
            get(|| async { page("text/javascript; charset=utf-8", PHONE_JS) }),
        )
        .route(
            "/phone.css",
            get(|| async { page("text/css; charset=utf-8", PHONE_CSS) }),
        )
        .route(SESSION_PATH, get(upgrade::<S>))
        .with_state(web);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

fn page(kind: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            // The page talks to its own origin only, and runs no code from
            // elsewhere.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; connect-src 'self'; img-src 'self' data:; media-src 'self' blob: mediastream:",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn upgrade<S: Switchboard>(
    State(web): State<Arc<Web<S>>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if let Err(why) = web.origin_allowed(&headers) {
        debug!(why, "web session refused");
        return (StatusCode::FORBIDDEN, why).into_response();
    }
    let asked = ws
        .requested_protocols()
        .any(|p| p.as_bytes() == SUBPROTOCOL.as_bytes());
    if !asked {
        return (
            StatusCode::BAD_REQUEST,
            format!("ask for the WebSocket subprotocol {SUBPROTOCOL}"),
        )
            .into_response();
    }
    let tasks = web.tasks.clone();
    ws.protocols([SUBPROTOCOL])
        // Beyond our own limit, for a frame over it to get a clear answer.
        .max_message_size(MAX_FRAME_BYTES * 4)
        .max_frame_size(MAX_FRAME_BYTES * 4)
        .on_upgrade(move |socket| tasks.track_future(web.session(socket)))
}

impl<S: Switchboard> Web<S> {
    /// Whether a browser's request may open a session: no `Origin` (not a
    /// browser), the web address itself (`Host`), or a listed origin.
    fn origin_allowed(&self, headers: &HeaderMap) -> Result<(), &'static str> {
        let Some(origin) = headers.get(header::ORIGIN) else {
            return Ok(());
        };
        let origin = origin.to_str().map_err(|_| "origin not allowed")?;
        if self.origins.iter().any(|o| o == "*" || o == origin) {
            return Ok(());
        }
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
        let same = origin
            .split_once("://")
            .is_some_and(|(_, rest)| Some(rest) == host);
        if same {
            Ok(())
        } else {
            Err("origin not allowed (see --web-origins)")
        }
    }

    /// One browser device: its `WebHello`, then the session.
    async fn session(self: Arc<Self>, socket: WebSocket) {
        let (mut tx, mut rx) = socket.split();
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, rx.next()).await {
            Err(_) => Err(Status::deadline_exceeded("no WebHello in time")),
            Ok(None | Some(Err(_))) => return,
            Ok(Some(Ok(frame))) => match frame {
                Message::Text(text) => from_json::<pb::WebHello>("videocall.v1.WebHello", &text)
                    .map_err(Status::invalid_argument),
                _ => Err(Status::invalid_argument(
                    "the first frame is a WebHello, as JSON text",
                )),
            },
        };
        let opened = match hello.and_then(|h| metadata(&h)) {
            Ok(md) => self.api.open(&md, Inbound { rx }).await,
            Err(status) => Err(status),
        };
        let mut out = match opened {
            Ok(out) => out,
            Err(status) => {
                close(&mut tx, &status).await;
                return;
            }
        };
        while let Some(item) = out.next().await {
            let msg = match item {
                Ok(msg) => msg,
                Err(status) => {
                    debug!(code = ?status.code(), message = status.message(), "web session ended");
                    close(&mut tx, &status).await;
                    return;
                }
            };
            let text = match to_json("videocall.v1.ServerMessage", &msg) {
                Ok(text) => text,
                Err(e) => {
                    close(&mut tx, &Status::internal(e)).await;
                    return;
                }
            };
            let sent = tokio::time::timeout(WRITE_TIMEOUT, tx.send(Message::text(text))).await;
            if !matches!(sent, Ok(Ok(()))) {
                debug!("web session: the socket does not take writes; closed");
                return;
            }
        }
        debug!("web session: the device's stream ended");
        let _ = tx.send(Message::Close(None)).await;
    }
}

/// The metadata a gRPC client would have sent.
fn metadata(hello: &pb::WebHello) -> Result<MetadataMap, Status> {
    let mut md = MetadataMap::new();
    let value = |v: String, what: &str| {
        MetadataValue::try_from(v)
            .map_err(|_| Status::unauthenticated(format!("{what} is not visible ASCII")))
    };
    if !hello.token.is_empty() {
        md.insert(
            "authorization",
            value(format!("Bearer {}", hello.token), "token")?,
        );
    }
    if !hello.dev_user_id.is_empty() {
        md.insert(
            DEV_USER_HEADER,
            value(hello.dev_user_id.clone(), "dev_user_id")?,
        );
    }
    if !hello.resume_token.is_empty() {
        md.insert(
            RESUME_HEADER,
            value(hello.resume_token.clone(), "resume_token")?,
        );
    }
    Ok(md)
}

/// Ends a session the way its gRPC stream would have ended: close code
/// 4000 + the status code, the message as the reason (cut to what a close
/// frame holds).
async fn close(tx: &mut SplitSink<WebSocket, Message>, status: &Status) {
    let mut reason = status.message().to_owned();
    if reason.len() > 123 {
        let mut cut = 120;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
        reason.push_str("...");
    }
    let frame = CloseFrame {
        code: 4000 + status.code() as u16,
        reason: reason.into(),
    };
    let _ = tokio::time::timeout(WRITE_TIMEOUT, tx.send(Message::Close(Some(frame)))).await;
}

/// A socket's frames as the session's controls: a text frame is one
/// `ClientMessage`; bad input is an INVALID_ARGUMENT (the session ends, the
/// device is not kept for a resume); a socket that breaks is UNAVAILABLE
/// (kept, as a broken gRPC stream is); a close frame ends the controls as
/// a client that leaves.
struct Inbound {
    rx: SplitStream<WebSocket>,
}

impl Stream for Inbound {
    type Item = Result<pb::ClientMessage, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            let frame = match std::task::ready!(self.rx.poll_next_unpin(cx)) {
                None | Some(Ok(Message::Close(_))) => return Poll::Ready(None),
                Some(Err(e)) => {
                    return Poll::Ready(Some(Err(Status::unavailable(format!(
                        "the socket failed: {e}"
                    )))));
                }
                Some(Ok(frame)) => frame,
            };
            let item = match frame {
                Message::Text(text) if text.len() > MAX_FRAME_BYTES => Err(
                    Status::invalid_argument(format!("a frame over {MAX_FRAME_BYTES} bytes")),
                ),
                Message::Text(text) => {
                    from_json("videocall.v1.ClientMessage", &text).map_err(Status::invalid_argument)
                }
                Message::Binary(_) => Err(Status::invalid_argument(
                    "binary frames are not read: send ClientMessage as JSON text",
                )),
                Message::Ping(_) | Message::Pong(_) | Message::Close(_) => continue,
            };
            return Poll::Ready(Some(item));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_message_reads_from_canonical_json_and_unknown_fields_are_refused() {
        let msg: pb::ClientMessage = from_json(
            "videocall.v1.ClientMessage",
            r#"{"control":{"seq":"7","eventType":"EVENT_TYPE_REQUEST","peerUserId":"bob","userStr":"hi"}}"#,
        )
        .unwrap();
        let Some(pb::client_message::Kind::Control(c)) = msg.kind else {
            panic!("{msg:?}")
        };
        assert_eq!((c.seq, c.peer_user_id.as_str()), (7, "bob"));
        assert_eq!(c.event_type, pb::EventType::Request as i32);
        // Numbers for 64-bit integers too, and enum numbers.
        let msg: pb::ClientMessage = from_json(
            "videocall.v1.ClientMessage",
            r#"{"control":{"seq":8,"eventType":3}}"#,
        )
        .unwrap();
        assert!(matches!(msg.kind, Some(pb::client_message::Kind::Control(c)) if c.seq == 8));
        for bad in [
            r#"{"control":{"seq":"1","peer":"bob"}}"#,
            r#"{"control":{"seq":"x"}}"#,
            r#"{"control":{"eventType":"EVENT_TYPE_NONE_SUCH"}}"#,
            r#"{"control":{}} {}"#,
            "not json",
            "[]",
        ] {
            let r: Result<pb::ClientMessage, _> = from_json("videocall.v1.ClientMessage", bad);
            assert!(r.is_err(), "{bad}: {r:?}");
        }
    }

    #[test]
    fn a_server_message_writes_canonical_json() {
        let msg = pb::ServerMessage {
            kind: Some(pb::server_message::Kind::Result(pb::ControlResult {
                seq: 3,
                code: 100104,
                ..Default::default()
            })),
        };
        let text = to_json("videocall.v1.ServerMessage", &msg).unwrap();
        assert_eq!(text, r#"{"result":{"seq":"3","code":100104}}"#);
    }
}
