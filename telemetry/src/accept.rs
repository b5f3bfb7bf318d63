//! Accepting connections, with the limits that keep one peer from holding
//! what everyone needs.
//!
//! - **Connections per peer** (by IP address): one more is closed at once.
//!   A peer cannot take every file descriptor the node has.
//! - **Handshake timeout**: a connection must send its first bytes (the
//!   24-byte HTTP/2 preface, or a TLS ClientHello) within
//!   [`AcceptLimits::handshake_timeout`], or it is closed. Silent sockets
//!   are not kept. (With TLS, the TLS handshake has the same timeout.)
//! - **Accept errors**: out of file descriptors (or memory), `accept` fails
//!   at once, again and again; the loop backs off (10 ms doubling to 1 s)
//!   instead of spinning a core, and existing connections keep being served.
//! - **Auxiliary streams** ([`AuxLimit`]): health and reflection need no
//!   credential, so their streams are bounded per peer and in all, and
//!   refused with RESOURCE_EXHAUSTED beyond: what they can pin stays small.
//!
//! The per-peer counts live in a map behind a `std` mutex, held only to
//! add or remove one, never across an `.await`. Both services accept with
//! this; each counts the refusals in its own [`Refused`] family.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::stream::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tonic::server::NamedService;
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};
use tracing::{debug, warn};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

/// Why a connection (or an auxiliary stream) was refused: `per_peer`,
/// `handshake_timeout`, `accept_failed`, `aux_streams`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// The counter of refusals a service registers (as
/// `<prefix>_connections_refused_total`), by reason.
pub type Refused = Family<ReasonLabel, Counter>;

/// Bytes a client sends before anything else: the HTTP/2 connection preface.
const PREFACE: usize = 24;
const BACKOFF_FIRST: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// What [`incoming`] enforces.
#[derive(Clone, Copy, Debug)]
pub struct AcceptLimits {
    pub max_connections_per_peer: usize,
    pub handshake_timeout: Duration,
}

/// Counts per peer address; a [`PeerSlot`] gives its one back when dropped.
#[derive(Clone, Debug, Default)]
struct PeerCounts(Arc<Mutex<HashMap<IpAddr, usize>>>);

impl PeerCounts {
    fn lock(&self) -> MutexGuard<'_, HashMap<IpAddr, usize>> {
        // Poisoning cannot leave a count half-changed: each change is one
        // insert or remove.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for `ip`, unless it holds `max` already.
    fn take(&self, ip: IpAddr, max: usize) -> Option<PeerSlot> {
        let mut counts = self.lock();
        let n = counts.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            counts: self.clone(),
            ip,
        })
    }
}

#[derive(Debug)]
struct PeerSlot {
    counts: PeerCounts,
    ip: IpAddr,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock();
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// The listener's connections, past the per-peer limit, each with its
/// handshake deadline. Never yields an error: accept errors are waited out.
pub fn incoming(
    listener: TcpListener,
    limits: AcceptLimits,
    refused: Refused,
) -> impl Stream<Item = Result<Conn, Infallible>> + Send + 'static {
    let state = (listener, PeerCounts::default(), BACKOFF_FIRST);
    futures_util::stream::unfold(state, move |(listener, peers, mut backoff)| {
        let refused = refused.clone();
        async move {
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    // The peer gave up before we took it: nothing to wait for.
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::ConnectionAborted
                                | io::ErrorKind::ConnectionReset
                                | io::ErrorKind::Interrupted
                        ) =>
                    {
                        continue;
                    }
                    Err(e) => {
                        // EMFILE, ENFILE, ENOBUFS, ENOMEM: retrying at once
                        // fails the same way.
                        if backoff == BACKOFF_FIRST {
                            warn!(error = %e, "cannot accept connections; backing off");
                        }
                        refused
                            .get_or_create(&ReasonLabel {
                                reason: "accept_failed",
                            })
                            .inc();
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        continue;
                    }
                };
                backoff = BACKOFF_FIRST;
                let Some(slot) = peers.take(peer.ip(), limits.max_connections_per_peer) else {
                    debug!(%peer, "too many connections from this peer: closed");
                    refused
                        .get_or_create(&ReasonLabel { reason: "per_peer" })
                        .inc();
                    continue;
                };
                // Events are small writes: with Nagle on, one waits for the
                // peer's delayed ACK (about 40 ms on Linux).
                let _ = stream.set_nodelay(true);
                let conn = Conn {
                    stream,
                    deadline: Some(Box::pin(tokio::time::sleep(limits.handshake_timeout))),
                    read: 0,
                    refused: refused.clone(),
                    _slot: slot,
                };
                return Some((Ok(conn), (listener, peers, backoff)));
            }
        }
    })
}

/// An accepted connection: until its first [`PREFACE`] bytes have come, a
/// read past the handshake deadline fails (and the connection closes).
#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    deadline: Option<Pin<Box<Sleep>>>,
    read: usize,
    refused: Refused,
    _slot: PeerSlot,
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let result = Pin::new(&mut this.stream).poll_read(cx, buf);
        let Some(deadline) = this.deadline.as_mut() else {
            return result;
        };
        match result {
            Poll::Ready(Ok(())) => {
                this.read += buf.filled().len() - before;
                if this.read >= PREFACE {
                    this.deadline = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match deadline.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    this.refused
                        .get_or_create(&ReasonLabel {
                            reason: "handshake_timeout",
                        })
                        .inc();
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no HTTP/2 preface within the handshake timeout",
                    )))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

/// The peer a request came from, with or without TLS.
fn peer_of<B>(request: &http::Request<B>) -> Option<SocketAddr> {
    let ext = request.extensions();
    ext.get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            ext.get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|i| i.get_ref().remote_addr())
        })
}

/// Bounds the streams of services anyone may open without a credential
/// (health, reflection): at most `per_peer` open from one address and
/// `total` in all; beyond, RESOURCE_EXHAUSTED. A stream's slot is held
/// until its response body is done or dropped.
#[derive(Clone, Debug)]
pub struct AuxLimit {
    total: Arc<Semaphore>,
    per_peer: usize,
    peers: PeerCounts,
    refused: Refused,
}

impl AuxLimit {
    pub fn new(total: usize, per_peer: usize, refused: Refused) -> Self {
        Self {
            total: Arc::new(Semaphore::new(total)),
            per_peer,
            peers: PeerCounts::default(),
            refused,
        }
    }

    /// `service`, bounded by this limit.
    pub fn wrap<S>(&self, service: S) -> Aux<S> {
        Aux {
            inner: service,
            limit: self.clone(),
        }
    }

    fn admit<B>(&self, request: &http::Request<B>) -> Option<AuxSlot> {
        let peer = match peer_of(request) {
            Some(addr) => Some(self.peers.take(addr.ip(), self.per_peer)?),
            None => None,
        };
        let total = self.total.clone().try_acquire_owned().ok()?;
        Some(AuxSlot {
            _total: total,
            _peer: peer,
        })
    }
}

#[derive(Debug)]
struct AuxSlot {
    _total: OwnedSemaphorePermit,
    _peer: Option<PeerSlot>,
}

/// A service behind an [`AuxLimit`].
#[derive(Clone, Debug)]
pub struct Aux<S> {
    inner: S,
    limit: AuxLimit,
}

impl<S: NamedService> NamedService for Aux<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tower::Service<http::Request<B>> for Aux<S>
where
    S: tower::Service<
            http::Request<B>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
        >,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let Some(slot) = self.limit.admit(&request) else {
            self.limit
                .refused
                .get_or_create(&ReasonLabel {
                    reason: "aux_streams",
                })
                .inc();
            let status = tonic::Status::resource_exhausted(
                "too many health or reflection streams are open; close some",
            );
            return Box::pin(std::future::ready(Ok(status.into_http())));
        };
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| tonic::body::Body::new(SlotBody { body, _slot: slot })))
        })
    }
}

/// A response body that holds its stream's slot until it is done.
struct SlotBody {
    body: tonic::body::Body,
    _slot: AuxSlot,
}

impl http_body::Body for SlotBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
