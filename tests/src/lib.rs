//! Harness for the end-to-end tests: real servers on `127.0.0.1:0`, real
//! SDK clients, and helpers that wait for events (never for time).
//!
//! Layout: [`CallService`] and [`Business`] start and stop the services
//! in-process; [`Phone`] is an SDK client with expectations; [`HookLog`]
//! collects what the business hook received; [`process`] runs the built
//! binaries and example programs; [`redis`] a `redis-server` of a test's
//! own.
//!
//! **Three ways.** [`CallService`] is one node with its state in memory,
//! one node on Redis, or three nodes on one Redis with the test's phones
//! and admin clients spread over them, as `VIDEOCALL_TEST_STORE` says
//! (`memory`, the default; `redis`; `cluster`): `scripts/test.sh` runs the
//! end-to-end suites all three ways.

pub mod browser;
pub mod process;
pub mod redis;
pub mod web;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use business_service::{Hook, admin::Admin};
use call_service::Config;
use client_sdk::{CallEvent, Client, Code, Credentials, EventKind, Events};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, oneshot};
use tokio::task::JoinHandle;
use videocall_proto::v1 as pb;

/// The longest any expected event may take before a test fails. A guard
/// against hangs, not a way to synchronise: tests wait for events.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// Logs for a failing test: `RUST_LOG=debug cargo test ...`.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Where the call service under test keeps its state (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    Memory,
    Redis,
    Cluster,
}

impl StoreKind {
    /// From `VIDEOCALL_TEST_STORE`; anything else than the three fails.
    pub fn from_env() -> Self {
        match std::env::var("VIDEOCALL_TEST_STORE").as_deref() {
            Err(_) | Ok("") | Ok("memory") => Self::Memory,
            Ok("redis") => Self::Redis,
            Ok("cluster") => Self::Cluster,
            Ok(other) => panic!("VIDEOCALL_TEST_STORE={other}: memory, redis or cluster"),
        }
    }

    fn nodes(self) -> usize {
        match self {
            Self::Cluster => 3,
            _ => 1,
        }
    }
}

/// A call service running in this process: one node, or the nodes of a
/// cluster (see [`StoreKind`]).
#[derive(Debug)]
pub struct CallService {
    /// The first node's client API.
    pub client_url: String,
    /// The first node's admin API.
    pub admin_url: String,
    pub kind: StoreKind,
    nodes: Vec<NodeProcess>,
    /// Which node the next phone or admin client goes to.
    next: AtomicUsize,
    /// The cluster's Redis, if any.
    pub redis: Option<Arc<redis::RedisServer>>,
}

/// One node serving in this process.
#[derive(Debug)]
pub struct NodeProcess {
    pub client_url: String,
    pub admin_url: String,
    /// The browser edge, when the configuration has a `web_addr`.
    pub web_url: Option<String>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), call_service::ServeError>>,
}

impl CallService {
    /// Starts a call service with development identities, using `business`
    /// as its hook (if any). `tweak` adjusts the configuration (of every
    /// node).
    pub async fn start(business: Option<&str>, tweak: impl Fn(&mut Config)) -> Self {
        Self::start_as(StoreKind::from_env(), business, tweak).await
    }

    /// Like [`CallService::start`], with the (first node's) client API on
    /// `client_addr` (to restart a service where its clients expect it).
    pub async fn start_at(
        client_addr: &str,
        business: Option<&str>,
        tweak: impl Fn(&mut Config),
    ) -> Self {
        Self::start_with(StoreKind::from_env(), client_addr, business, tweak).await
    }

    /// Like [`CallService::start`], with the state kept as `kind` says.
    pub async fn start_as(
        kind: StoreKind,
        business: Option<&str>,
        tweak: impl Fn(&mut Config),
    ) -> Self {
        Self::start_with(kind, "127.0.0.1:0", business, tweak).await
    }

    /// `nodes` nodes on a Redis of the test's own (at `redis_url`).
    pub async fn start_on(
        redis_url: &str,
        nodes: usize,
        business: Option<&str>,
        tweak: impl Fn(&mut Config),
    ) -> Self {
        let kind = if nodes > 1 {
            StoreKind::Cluster
        } else {
            StoreKind::Redis
        };
        Self::start_nodes(
            kind,
            nodes,
            Some(redis_url),
            None,
            "127.0.0.1:0",
            business,
            tweak,
        )
        .await
    }

    async fn start_with(
        kind: StoreKind,
        client_addr: &str,
        business: Option<&str>,
        tweak: impl Fn(&mut Config),
    ) -> Self {
        let redis = (kind != StoreKind::Memory).then(|| Arc::new(redis::RedisServer::start()));
        let url = redis.as_ref().map(|r| r.url.clone());
        let n = kind.nodes();
        Self::start_nodes(kind, n, url.as_deref(), redis, client_addr, business, tweak).await
    }

    async fn start_nodes(
        kind: StoreKind,
        n: usize,
        redis_url: Option<&str>,
        redis: Option<Arc<redis::RedisServer>>,
        client_addr: &str,
        business: Option<&str>,
        tweak: impl Fn(&mut Config),
    ) -> Self {
        init_tracing();
        let mut nodes = Vec::new();
        for i in 0..n {
            let mut config = Config::for_tests(business.map(str::to_owned));
            config.redis_url = redis_url.map(str::to_owned);
            tweak(&mut config);
            let addr = if i == 0 { client_addr } else { "127.0.0.1:0" };
            nodes.push(NodeProcess::start_at(addr, config).await);
        }
        Self {
            client_url: nodes[0].client_url.clone(),
            admin_url: nodes[0].admin_url.clone(),
            kind,
            nodes,
            next: AtomicUsize::new(0),
            redis,
        }
    }

    /// The nodes serving.
    pub fn nodes(&self) -> &[NodeProcess] {
        &self.nodes
    }

    /// The client API of the node the next client goes to (in turn).
    pub fn next_client_url(&self) -> String {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.nodes.len();
        self.nodes[i].client_url.clone()
    }

    /// Connects a device of `user`, to the nodes in turn.
    pub async fn phone(&self, user: &str) -> Phone {
        phone_at(&self.next_client_url(), user).await
    }

    /// An admin client, of the nodes in turn.
    pub async fn admin(&self) -> Admin {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.nodes.len();
        Admin::connect(self.nodes[i].admin_url.clone())
            .await
            .expect("admin connect")
    }

    /// Stops every node and checks that each stopped cleanly.
    pub async fn stop(self) {
        futures_util::future::join_all(self.nodes.into_iter().map(NodeProcess::stop)).await;
    }
}

impl NodeProcess {
    /// Serves `config`, the client API on `client_addr`, the admin API on
    /// a free port.
    pub async fn start_at(client_addr: &str, config: Config) -> Self {
        init_tracing();
        let client = TcpListener::bind(client_addr)
            .await
            .expect("bind client port");
        let admin = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind admin port");
        let client_url = format!("http://{}", client.local_addr().expect("client addr"));
        let admin_url = format!("http://{}", admin.local_addr().expect("admin addr"));
        // The browser edge when the configuration asks for it (on a free
        // port: `web_addr` says only where).
        let web = match config.web_addr {
            Some(addr) => Some(TcpListener::bind(addr).await.expect("bind web port")),
            None => None,
        };
        let web_url = web
            .as_ref()
            .map(|w| format!("http://{}", w.local_addr().expect("web addr")));
        let (stop, stopped) = oneshot::channel::<()>();
        let listeners = call_service::Listeners {
            client,
            admin,
            metrics: None,
            web,
        };
        let task = tokio::spawn(call_service::serve(listeners, config, async {
            let _ = stopped.await;
        }));
        Self {
            client_url,
            admin_url,
            web_url,
            stop: Some(stop),
            task,
        }
    }

    /// Stops the node and checks that it stopped cleanly.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let result = tokio::time::timeout(PATIENCE, &mut self.task).await;
        match result {
            Ok(Ok(Ok(()))) => {}
            other => panic!("call service did not stop cleanly: {other:?}"),
        }
    }
}

/// The reference business service running in this process.
#[derive(Debug)]
pub struct Business {
    pub url: String,
    pub hook: Hook,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), business_service::Error>>,
}

impl Business {
    /// The reference business service, with callers blocked with codes.
    pub async fn start(blocked: &[(&str, u32)]) -> Self {
        let config = business_service::Config {
            extra_blocked: blocked.iter().map(|(u, c)| ((*u).to_owned(), *c)).collect(),
            ..Default::default()
        };
        Self::with_config(config).await
    }

    /// The reference business service with any configuration.
    pub async fn with_config(config: business_service::Config) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind hook port");
        let url = format!("http://{}", listener.local_addr().expect("hook addr"));
        let business = business_service::Business::start(config).expect("business service starts");
        let hook = business.hook().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(business.serve(listener, None, async {
            let _ = stopped.await;
        }));
        Self {
            url,
            hook,
            stop: Some(stop),
            task,
        }
    }

    pub fn log(&self) -> HookLog {
        HookLog {
            rx: self.hook.subscribe(),
        }
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match tokio::time::timeout(PATIENCE, &mut self.task).await {
            Ok(Ok(Ok(()))) => {}
            other => panic!("business service did not stop cleanly: {other:?}"),
        }
    }
}

/// What the business hook received, in order.
#[derive(Debug)]
pub struct HookLog {
    rx: broadcast::Receiver<pb::CallEventNotice>,
}

impl HookLog {
    /// The next notice received by the hook.
    pub async fn next(&mut self) -> pb::CallEventNotice {
        match tokio::time::timeout(PATIENCE, self.rx.recv()).await {
            Ok(Ok(n)) => n,
            other => panic!("no notice reached the business hook: {other:?}"),
        }
    }

    /// The next `count` notices of call `call_id`, skipping other calls'.
    pub async fn call(&mut self, call_id: &str, count: usize) -> Vec<pb::CallEventNotice> {
        let mut out = Vec::new();
        while out.len() < count {
            let n = self.next().await;
            if n.call_id == call_id {
                out.push(n);
            }
        }
        out
    }
}

/// One connected device, with expectations about its events.
#[derive(Debug)]
pub struct Phone {
    pub user: String,
    pub client: Client,
    pub events: Events,
}

impl Phone {
    /// The next event; fails the test if none comes within [`PATIENCE`].
    pub async fn next(&mut self) -> CallEvent {
        match tokio::time::timeout(PATIENCE, self.events.next()).await {
            Ok(Some(e)) => e,
            Ok(None) => panic!("{}: stream ended while an event was expected", self.user),
            Err(_) => panic!("{}: no event within {PATIENCE:?}", self.user),
        }
    }

    /// The next event, which must be `kind` from `peer` with `code`.
    pub async fn expect(&mut self, kind: EventKind, peer: &str, code: Code) -> CallEvent {
        let e = self.next().await;
        assert_eq!(
            (e.kind, e.peer.as_str(), e.code),
            (kind, peer, code),
            "{}: unexpected event {e:?}",
            self.user
        );
        e
    }

    /// Places a call; the control must be taken.
    pub async fn call(&self, peer: &str) -> String {
        let r = self
            .client
            .control(client_sdk::Control {
                event_type: pb::EventType::Request as i32,
                peer: peer.into(),
                flags: client_sdk::flags::AUDIO | client_sdk::flags::VIDEO,
                param: 42,
                user_str: format!("{} calling", self.user),
                ..Default::default()
            })
            .await
            .expect("request");
        assert_eq!(
            r.code,
            Code::OK,
            "{}: REQUEST to {peer} refused: {}",
            self.user,
            r.message
        );
        r.call_id
    }

    /// Sends a harmless control until one is answered within `patience`:
    /// the client is back (resumed or reconnected), through whichever node.
    pub async fn back(&self, patience: Duration) {
        let deadline = tokio::time::Instant::now() + patience;
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            tick.tick().await;
            if let Ok(code) = self.client.finish("nobody-at-all").await {
                assert_eq!(code, Code::NOT_IN_CALL);
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} did not come back",
                self.user
            );
        }
    }

    /// Asserts no event is waiting. Sound without sleeping: a control's
    /// result travels on the same ordered stream as events, so once it is
    /// back, every event sent before it has arrived.
    pub async fn assert_quiet(&mut self) {
        let code = self
            .client
            .finish("nobody-at-all")
            .await
            .expect("barrier control");
        assert_eq!(code, Code::NOT_IN_CALL);
        if let Some(e) = self.events.try_next() {
            panic!("{}: unexpected event {e:?}", self.user);
        }
    }
}

/// `GET /metrics` of a service (plain HTTP/1.0); `None` while it does not
/// answer.
pub async fn scrape_metrics(addr: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: node\r\n\r\n")
        .await
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    Some(out)
}

/// Connects a device of `user` (development identity) to the client API
/// at `url`.
pub async fn phone_at(url: &str, user: &str) -> Phone {
    phone_with(url, user, Credentials::dev_user(user)).await
}

/// Connects a device with `credentials`, which must name `user`.
pub async fn phone_with(url: &str, user: &str, credentials: Credentials) -> Phone {
    let (client, events) = Client::connect(url.to_owned(), credentials)
        .await
        .unwrap_or_else(|e| panic!("{user} cannot connect: {e}"));
    assert_eq!(client.user_id(), user);
    Phone {
        user: user.to_owned(),
        client,
        events,
    }
}

/// `caller` calls `callee`, who answers: both have seen START. Returns
/// the room id.
pub async fn talking(caller: &mut Phone, callee: &mut Phone) -> u32 {
    let (a, b) = (caller.user.clone(), callee.user.clone());
    caller.call(&b).await;
    callee.expect(EventKind::Request, &a, Code::OK).await;
    assert_eq!(
        callee.client.reply(&a, Code::OK).await.expect("reply"),
        Code::OK
    );
    caller.expect(EventKind::Reply, &b, Code::OK).await;
    let room = caller.expect(EventKind::Start, &b, Code::OK).await.param;
    assert_eq!(
        callee.expect(EventKind::Start, &a, Code::OK).await.param,
        room
    );
    room
}

/// A user's state through the admin API.
pub async fn user_state(admin: &Admin, user: &str) -> pb::UserState {
    let s = admin.user_state(user).await.expect("user state");
    pb::UserState::try_from(s.state).expect("known state")
}

/// A business hook that never answers: stands for one slower than any
/// deadline.
#[derive(Debug)]
struct Silent;

#[tonic::async_trait]
impl pb::business_hook_server::BusinessHook for Silent {
    async fn on_call_event(
        &self,
        _: tonic::Request<pb::CallEventNotice>,
    ) -> Result<tonic::Response<pb::CallEventAck>, tonic::Status> {
        std::future::pending().await
    }

    async fn on_call_events(
        &self,
        _: tonic::Request<pb::CallEventBatch>,
    ) -> Result<tonic::Response<pb::CallEventBatchAck>, tonic::Status> {
        std::future::pending().await
    }
}

/// Starts a hook that never answers; returns its URL. It runs until the
/// test's runtime ends.
pub async fn start_silent_hook() -> String {
    serve_hook(Silent).await
}

/// Serves `hook` as a business service on a new port; returns its URL. It
/// runs until the test's runtime ends.
pub async fn serve_hook(hook: impl pb::business_hook_server::BusinessHook) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(pb::business_hook_server::BusinessHookServer::new(hook))
            .serve_with_incoming(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            ),
    );
    url
}

/// A TCP proxy in front of a server, whose connections a test can cut, the
/// way a network blip would.
#[derive(Debug)]
pub struct Proxy {
    pub url: String,
    cut: tokio::sync::watch::Sender<u64>,
    freeze: tokio::sync::watch::Sender<u64>,
    /// Bumped each time the server closes a frozen connection.
    server_closed: tokio::sync::watch::Receiver<u64>,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Forwards connections on a new port to `target` (`host:port`).
    pub async fn start(target: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let (cut, cuts) = tokio::sync::watch::channel(0u64);
        let (freeze, freezes) = tokio::sync::watch::channel(0u64);
        let (closed_tx, server_closed) = tokio::sync::watch::channel(0u64);
        let closed_tx = std::sync::Arc::new(closed_tx);
        let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let target = target.to_owned();
        let accepting = open.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !accepting.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: refused
                }
                let target = target.clone();
                let mut cuts = cuts.clone();
                cuts.mark_unchanged();
                let mut freezes = freezes.clone();
                freezes.mark_unchanged();
                let closed_tx = closed_tx.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cuts.changed() => return,
                        _ = freezes.changed() => {}
                    }
                    // Frozen: nothing goes through either way, and both
                    // sockets stay open, as on a dead path. Only the
                    // server's end closing is watched for (and told).
                    let mut sink = [0u8; 4096];
                    tokio::select! {
                        _ = async {
                            use tokio::io::AsyncReadExt;
                            while matches!(outbound.read(&mut sink).await, Ok(n) if n > 0) {}
                        } => {
                            closed_tx.send_modify(|n| *n += 1);
                            // The client's end stays open until cut.
                            let _ = cuts.changed().await;
                        }
                        _ = cuts.changed() => {}
                    }
                });
            }
        });
        Self {
            url,
            cut,
            freeze,
            server_closed,
            open,
            task,
        }
    }

    /// Stops every connection going through now from carrying anything,
    /// while keeping its sockets open: a dead path, found only by keepalive.
    pub fn freeze(&self) {
        self.freeze.send_modify(|n| *n += 1);
    }

    /// Waits until the server has closed a frozen connection.
    pub async fn server_closed(&mut self) {
        tokio::time::timeout(PATIENCE, self.server_closed.changed())
            .await
            .expect("the server never closed the frozen connection")
            .expect("proxy running");
    }

    /// Cuts every connection going through now.
    pub fn cut(&self) {
        self.cut.send_modify(|n| *n += 1);
    }

    /// Whether new connections get through.
    pub fn set_open(&self, open: bool) {
        self.open.store(open, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TCP load balancer for a cluster's nodes, as HAProxy would be: each
/// connection goes to the next backend in turn that accepts it, so a
/// client whose node died reconnects to a live one. Records which backend
/// each connection went to.
#[derive(Debug)]
pub struct Balancer {
    pub url: String,
    routes: Arc<std::sync::Mutex<Vec<usize>>>,
    task: JoinHandle<()>,
}

impl Balancer {
    /// Balances connections on a new port over `backends` (`host:port`).
    pub async fn start(backends: Vec<String>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind balancer");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let routes: Arc<std::sync::Mutex<Vec<usize>>> = Arc::default();
        let taken = routes.clone();
        let task = tokio::spawn(async move {
            let mut next = 0usize;
            while let Ok((mut inbound, _)) = listener.accept().await {
                let first = next;
                next += 1;
                let backends = backends.clone();
                let routes = taken.clone();
                tokio::spawn(async move {
                    for i in 0..backends.len() {
                        let b = (first + i) % backends.len();
                        if let Ok(mut out) = tokio::net::TcpStream::connect(&backends[b]).await {
                            routes.lock().expect("lock").push(b);
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                            return;
                        }
                    }
                });
            }
        });
        Self { url, routes, task }
    }

    /// The backend of every connection so far, in order.
    pub fn routes(&self) -> Vec<usize> {
        self.routes.lock().expect("lock").clone()
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
