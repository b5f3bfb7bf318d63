//! The transport baseline: a minimal tonic echo service (unary and
//! bidirectional streaming) in its own process, loaded closed loop. What it
//! sustains bounds what any tonic service on this machine can do per message.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Request, Response, Status, Streaming};

use crate::stats::{Latency, Percentiles};

#[allow(missing_docs, missing_debug_implementations, clippy::all)]
pub mod pb {
    tonic::include_proto!("bench.echo");
}

use pb::echo_client::EchoClient;
use pb::echo_server::{Echo, EchoServer};

/// The size of a typical call event on the wire (ids, codes, a call id).
pub const BODY: &str = "alice-0000000000 bob-0000000000 3f2b1c4e-9d3a-4c55-8e0f-1a2b3c4d5e6f";

#[derive(Debug, Default)]
struct EchoService;

type EchoStream = Pin<Box<dyn Stream<Item = Result<pb::Message, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(&self, r: Request<pb::Message>) -> Result<Response<pb::Message>, Status> {
        Ok(Response::new(r.into_inner()))
    }

    type StreamStream = EchoStream;

    async fn stream(
        &self,
        r: Request<Streaming<pb::Message>>,
    ) -> Result<Response<EchoStream>, Status> {
        Ok(Response::new(Box::pin(r.into_inner())))
    }
}

/// Serves the echo service on `listener` until `shutdown` completes, with
/// tonic's defaults (plus TCP_NODELAY, as the call service).
pub async fn serve(
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    Server::builder()
        .add_service(EchoServer::new(EchoService))
        .serve_with_incoming_shutdown(incoming(listener), shutdown)
        .await
}

/// Connections accepted on `listener` with Nagle off, as the call service
/// does (the builder's `tcp_nodelay` covers only listeners tonic binds
/// itself). Shared with the floor relay.
pub(crate) fn incoming(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// One closed-loop measurement.
#[derive(Debug, Clone, Serialize)]
pub struct EchoResult {
    /// `unary` or `stream`.
    pub kind: &'static str,
    /// Requests in flight at once.
    pub concurrency: usize,
    pub connections: usize,
    pub seconds: f64,
    /// Round trips per second.
    pub per_s: f64,
    pub latency: Percentiles,
    pub errors: u64,
    /// The echo server's CPU seconds over the run.
    pub server_cpu_s: f64,
}

async fn channels(url: &str, n: usize) -> anyhow::Result<Vec<Channel>> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(
            Endpoint::from_shared(url.to_owned())?
                .tcp_nodelay(true)
                .connect()
                .await?,
        );
    }
    Ok(v)
}

/// Unary echo round trips, `concurrency` loops over `connections`
/// connections, for `seconds`.
pub async fn unary(
    url: &str,
    connections: usize,
    concurrency: usize,
    seconds: f64,
) -> anyhow::Result<EchoResult> {
    load(Kind::Unary, url, connections, concurrency, seconds).await
}

/// Bidirectional-stream ping-pong: `concurrency` streams over `connections`
/// connections, each waits for the echo before sending the next message.
pub async fn stream(
    url: &str,
    connections: usize,
    concurrency: usize,
    seconds: f64,
) -> anyhow::Result<EchoResult> {
    load(Kind::Stream, url, connections, concurrency, seconds).await
}

#[derive(Clone, Copy)]
enum Kind {
    Unary,
    Stream,
}

impl Kind {
    /// As in the results.
    fn name(self) -> &'static str {
        match self {
            Kind::Unary => "unary",
            Kind::Stream => "stream",
        }
    }
}

/// `concurrency` loops of `kind` until `seconds` pass.
async fn load(
    kind: Kind,
    url: &str,
    connections: usize,
    concurrency: usize,
    seconds: f64,
) -> anyhow::Result<EchoResult> {
    let chans = channels(url, connections.max(1)).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let mut set = JoinSet::new();
    for i in 0..concurrency {
        let client = EchoClient::new(chans[i % chans.len()].clone());
        let (stop, errors) = (stop.clone(), errors.clone());
        match kind {
            Kind::Unary => set.spawn(unary_loop(client, stop, errors)),
            Kind::Stream => set.spawn(stream_loop(client, stop, errors)),
        };
    }
    finish(
        kind.name(),
        set,
        stop,
        errors,
        connections,
        concurrency,
        seconds,
    )
    .await
}

fn message(seq: u64) -> pb::Message {
    pb::Message {
        seq,
        body: BODY.into(),
    }
}

async fn unary_loop(
    mut client: EchoClient<Channel>,
    stop: Arc<AtomicBool>,
    errors: Arc<AtomicU64>,
) -> Latency {
    let mut lat = Latency::default();
    let mut seq = 0u64;
    while !stop.load(Relaxed) {
        seq += 1;
        let t = Instant::now();
        match client.unary(message(seq)).await {
            Ok(_) => lat.record(t.elapsed()),
            Err(_) => {
                errors.fetch_add(1, Relaxed);
            }
        }
    }
    lat
}

async fn stream_loop(
    mut client: EchoClient<Channel>,
    stop: Arc<AtomicBool>,
    errors: Arc<AtomicU64>,
) -> Latency {
    let mut lat = Latency::default();
    let (tx, rx) = mpsc::channel(1);
    let mut inbound = match client.stream(ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(_) => {
            errors.fetch_add(1, Relaxed);
            return lat;
        }
    };
    let mut seq = 0u64;
    while !stop.load(Relaxed) {
        seq += 1;
        let t = Instant::now();
        if tx.send(message(seq)).await.is_err() {
            errors.fetch_add(1, Relaxed);
            break;
        }
        match inbound.next().await {
            Some(Ok(_)) => lat.record(t.elapsed()),
            _ => {
                errors.fetch_add(1, Relaxed);
                break;
            }
        }
    }
    lat
}

async fn finish(
    kind: &'static str,
    mut set: JoinSet<Latency>,
    stop: Arc<AtomicBool>,
    errors: Arc<AtomicU64>,
    connections: usize,
    concurrency: usize,
    seconds: f64,
) -> anyhow::Result<EchoResult> {
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    stop.store(true, Relaxed);
    let mut all = Latency::default();
    while let Some(l) = set.join_next().await {
        all.add(&l?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let latency = all.summary();
    Ok(EchoResult {
        kind,
        concurrency,
        connections,
        seconds: elapsed,
        per_s: latency.count as f64 / elapsed,
        latency,
        errors: errors.load(Relaxed),
        server_cpu_s: 0.0,
    })
}
