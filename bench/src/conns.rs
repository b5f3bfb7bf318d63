//! Idle connections: N devices connected at once, each its own TCP + HTTP/2
//! connection and `Session` stream, from several 127.0.0.x source addresses
//! (one address has about 28k ephemeral ports), or their streams spread over
//! a few shared connections (as behind an HTTP/2 proxy or gateway, where one
//! process's file descriptors no longer bound the count). Measures the call
//! service's resident memory per connected device and per active call. With
//! several nodes (`--nodes`), the clients are spread over them in turn, and
//! memory is the nodes' together.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use anyhow::Context;
use client_sdk::{Client, Code, Credentials, EventKind, Events};
use serde::Serialize;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use crate::procs::{Server, scrape};

/// What to connect.
#[derive(Debug, Clone)]
pub struct ConnSpec {
    pub clients: usize,
    pub sources: Vec<IpAddr>,
    /// 0: each device its own connection; otherwise the devices' streams
    /// share this many connections.
    pub shared: usize,
    /// Connection attempts in flight at once.
    pub parallel: usize,
    /// Calls to put in the talking state among the connected devices, to
    /// measure memory per call.
    pub active_calls: usize,
    /// How long to keep them connected before measuring (to look at the
    /// service from outside meanwhile).
    pub hold: Duration,
    pub quiet: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ConnResult {
    pub clients: usize,
    pub connected: usize,
    pub failed: usize,
    pub sources: usize,
    /// HTTP/2 connections the devices shared (0: each its own).
    pub shared_connections: usize,
    pub connect_s: f64,
    pub connects_per_s: f64,
    /// Call-service nodes the clients were spread over.
    pub nodes: usize,
    /// The call service's RSS before the first client and with all
    /// connected (KiB; all nodes together).
    pub server_rss_before_kib: u64,
    pub server_rss_connected_kib: u64,
    /// (connected − before) / connected, KiB and bytes.
    pub server_kib_per_client: f64,
    /// Devices the service counts (its `videocall_connected_devices`, all
    /// nodes together).
    pub server_reports_connected: f64,
    /// The same, node by node.
    pub node_reports_connected: Vec<f64>,
    pub active_calls: usize,
    pub server_rss_calls_kib: u64,
    /// Extra RSS per call in the talking state (KiB).
    pub server_kib_per_call: f64,
    /// The load generator's own RSS per client (KiB), for reference.
    pub generator_kib_per_client: f64,
    /// Redis's `used_memory` per connected client (bytes: the device
    /// record, its token and its node's set), on Redis.
    pub redis_bytes_per_client: Option<f64>,
    pub first_errors: Vec<String>,
}

type Device = (Client, Events);

/// Connects `spec.clients` idle devices to the call service's nodes, client
/// `i` to node `i mod n` (shared connections are divided among the nodes,
/// at least one each); on Redis, Redis's memory per device too.
pub async fn run(services: &crate::procs::Services, spec: &ConnSpec) -> anyhow::Result<ConnResult> {
    let nodes: Vec<&Server> = services.call_nodes().collect();
    let urls = services.client_urls()?;
    let metrics = nodes
        .iter()
        .map(|n| n.addr("metrics"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let rss = || nodes.iter().map(|n| n.sample().rss_kib).sum::<u64>();
    let before = rss();
    let redis_before = services.redis_used_memory().await?;
    let me_before = crate::procs::sample(std::process::id()).unwrap_or_default();
    let started = Instant::now();
    let done = Arc::new(AtomicU64::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(spec.parallel.max(1)));
    let mut set = JoinSet::new();
    let progress = (!spec.quiet).then(|| {
        let done = done.clone();
        let total = spec.clients;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                eprintln!(
                    "[{:>4.0}s] connected {}/{}",
                    started.elapsed().as_secs_f64(),
                    done.load(Relaxed),
                    total
                );
            }
        })
    });
    // shared[node]: that node's shared connections.
    let mut shared: Vec<Vec<Channel>> = vec![Vec::new(); urls.len()];
    if spec.shared > 0 {
        for j in 0..spec.shared.max(urls.len()) {
            let node = j % urls.len();
            let source = spec.sources[j % spec.sources.len()];
            shared[node].push(connect(&urls[node], source).await?);
        }
    }
    for i in 0..spec.clients {
        let source = spec.sources[i % spec.sources.len()];
        let node = i % urls.len();
        let url = urls[node].clone();
        let gate = gate.clone();
        let done = done.clone();
        let on_node = &shared[node];
        let channel =
            (!on_node.is_empty()).then(|| on_node[(i / urls.len()) % on_node.len()].clone());
        set.spawn(async move {
            let _permit = gate.acquire_owned().await.map_err(|e| e.to_string())?;
            let channel = match channel {
                Some(c) => c,
                None => connect(&url, source).await.map_err(|e| e.to_string())?,
            };
            let device =
                Client::connect_with_channel(channel, Credentials::dev_user(format!("idle{i}")))
                    .await
                    .map_err(|e| format!("session: {e}"))?;
            done.fetch_add(1, Relaxed);
            Ok::<(usize, Device), String>((i, device))
        });
    }
    let mut devices: Vec<Option<Device>> = (0..spec.clients).map(|_| None).collect();
    let mut failed = 0;
    let mut first_errors = Vec::new();
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok((i, d))) => devices[i] = Some(d),
            Ok(Err(e)) => {
                failed += 1;
                if first_errors.len() < 5 {
                    first_errors.push(e);
                }
            }
            Err(e) => {
                failed += 1;
                if first_errors.len() < 5 {
                    first_errors.push(e.to_string());
                }
            }
        }
    }
    let connect_s = started.elapsed().as_secs_f64();
    if let Some(p) = progress {
        p.abort();
    }
    let connected = spec.clients - failed;
    if !spec.hold.is_zero() {
        eprintln!(
            "holding {connected} clients for {:?} (call-service pids {:?})",
            spec.hold,
            nodes.iter().map(|n| n.pid()).collect::<Vec<_>>()
        );
        tokio::time::sleep(spec.hold).await;
    }
    let mut node_reports = Vec::with_capacity(metrics.len());
    for m in &metrics {
        node_reports.push(
            scrape(m, "videocall_connected_devices")
                .await
                .unwrap_or(f64::NAN),
        );
    }
    let reported = node_reports.iter().sum();
    let with_clients = rss();
    let redis_with_clients = services.redis_used_memory().await?;
    let me_after = crate::procs::sample(std::process::id()).unwrap_or_default();
    let per = |a: u64, b: u64, n: usize| (a as f64 - b as f64) / n.max(1) as f64;

    // Calls in the talking state between pairs of the connected devices.
    let mut pairs: Vec<(Device, Device)> = Vec::new();
    let mut it = devices.iter_mut().filter_map(Option::take);
    while pairs.len() < spec.active_calls {
        match (it.next(), it.next()) {
            (Some(a), Some(b)) => pairs.push((a, b)),
            _ => break,
        }
    }
    let mut talking = 0;
    for ((caller, ce), (callee, ee)) in pairs.iter_mut() {
        if talk(caller, ce, callee, ee).await.is_ok() {
            talking += 1;
        }
    }
    let with_calls = rss();
    for ((caller, _), (callee, _)) in &pairs {
        let _ = caller.finish(callee.user_id()).await;
    }
    Ok(ConnResult {
        clients: spec.clients,
        connected,
        failed,
        sources: spec.sources.len(),
        shared_connections: spec.shared,
        connect_s,
        connects_per_s: connected as f64 / connect_s.max(1e-9),
        nodes: nodes.len(),
        server_rss_before_kib: before,
        server_rss_connected_kib: with_clients,
        server_kib_per_client: per(with_clients, before, connected),
        server_reports_connected: reported,
        node_reports_connected: node_reports,
        active_calls: talking,
        server_rss_calls_kib: with_calls,
        server_kib_per_call: per(with_calls, with_clients, talking),
        generator_kib_per_client: per(me_after.rss_kib, me_before.rss_kib, connected),
        redis_bytes_per_client: redis_before
            .zip(redis_with_clients)
            .map(|(b, a)| (a as f64 - b as f64) / connected.max(1) as f64),
        first_errors,
    })
}

async fn connect(url: &str, source: IpAddr) -> anyhow::Result<Channel> {
    Endpoint::from_shared(url.to_owned())?
        .local_address(Some(source))
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(30))
        .connect()
        .await
        .with_context(|| format!("connect from {source}"))
}

/// Puts a call between two idle devices into the talking state.
async fn talk(
    caller: &Client,
    caller_events: &mut Events,
    callee: &Client,
    callee_events: &mut Events,
) -> anyhow::Result<()> {
    let patience = Duration::from_secs(10);
    anyhow::ensure!(caller.request(callee.user_id(), 3, 0, "").await? == Code::OK);
    anyhow::ensure!(next(callee_events, patience).await == Some(EventKind::Request));
    anyhow::ensure!(callee.reply(caller.user_id(), Code::OK).await? == Code::OK);
    anyhow::ensure!(next(caller_events, patience).await == Some(EventKind::Reply));
    anyhow::ensure!(next(caller_events, patience).await == Some(EventKind::Start));
    anyhow::ensure!(next(callee_events, patience).await == Some(EventKind::Start));
    Ok(())
}

async fn next(events: &mut Events, patience: Duration) -> Option<EventKind> {
    tokio::time::timeout(patience, events.next())
        .await
        .ok()
        .flatten()
        .map(|e| e.kind)
}
