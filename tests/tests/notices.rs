//! Notice delivery in batches (`OnCallEvents`) and one at a time when the
//! business service does not implement it: nothing lost, each call's notices
//! in order either way.
//!
//! The hook holds every `OnCallEvent` notice until the test opens a gate, so
//! that notices queue up on the lanes while all calls are placed and ended;
//! once the gate opens, what queued goes out. With a long linger and the
//! gate open, notices wait for each other instead.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use client_sdk::{Code, EventKind};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status};
use videocall_proto::v1 as pb;
use videocall_proto::v1::business_hook_server::{BusinessHook, BusinessHookServer};
use videocall_tests::{CallService, PATIENCE, talking};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Single,
    Batch,
}

#[derive(Clone)]
struct GatedHook {
    open: watch::Receiver<bool>,
    batches: bool,
    seen: mpsc::UnboundedSender<(Via, pb::CallEventNotice)>,
    batch_sizes: Arc<Mutex<Vec<usize>>>,
}

#[tonic::async_trait]
impl BusinessHook for GatedHook {
    async fn on_call_event(
        &self,
        request: Request<pb::CallEventNotice>,
    ) -> Result<Response<pb::CallEventAck>, Status> {
        let n = request.into_inner();
        if !n.decision_required {
            let mut open = self.open.clone();
            let _ = open.wait_for(|o| *o).await;
            let _ = self.seen.send((Via::Single, n));
        }
        Ok(Response::new(pb::CallEventAck { result_code: 0 }))
    }

    async fn on_call_events(
        &self,
        request: Request<pb::CallEventBatch>,
    ) -> Result<Response<pb::CallEventBatchAck>, Status> {
        if !self.batches {
            return Err(Status::unimplemented("OnCallEvents"));
        }
        let batch = request.into_inner().notices;
        assert!(
            batch.iter().all(|n| !n.decision_required),
            "an approval in a batch"
        );
        self.batch_sizes.lock().expect("lock").push(batch.len());
        for n in batch {
            let _ = self.seen.send((Via::Batch, n));
        }
        Ok(Response::new(pb::CallEventBatchAck {}))
    }
}

const CALLS: usize = 12;
/// REPLY, START and FINISH of each answered call (its REQUEST is the approval).
const NOTICES: usize = CALLS * 3;

/// Places `CALLS` answered calls while the hook holds notices, opens the
/// gate and returns what the hook received, in order, with the batch sizes.
/// With `linger`, the gate is open from the start and the call service's
/// notices linger that long.
async fn run(
    batches: bool,
    linger: Option<Duration>,
) -> (Vec<(Via, pb::CallEventNotice)>, Vec<usize>) {
    let (open_tx, open) = watch::channel(linger.is_some());
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let batch_sizes = Arc::new(Mutex::new(Vec::new()));
    let hook = GatedHook {
        open,
        batches,
        seen: seen_tx,
        batch_sizes: batch_sizes.clone(),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(BusinessHookServer::new(hook))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let svc = CallService::start(Some(&url), |c| {
        if let Some(linger) = linger {
            c.notice_linger = linger;
        }
    })
    .await;
    for i in 0..CALLS {
        let (a, b) = (format!("caller{i}"), format!("callee{i}"));
        let mut caller = svc.phone(&a).await;
        let mut callee = svc.phone(&b).await;
        talking(&mut caller, &mut callee).await;
        assert_eq!(caller.client.finish(&b).await.expect("finish"), Code::OK);
        caller.expect(EventKind::Finish, &b, Code::OK).await;
        callee.expect(EventKind::Finish, &a, Code::OK).await;
    }
    // Every notice exists now; most wait behind a held one.
    open_tx.send(true).expect("the hook is listening");
    let mut received = Vec::new();
    let mut ids = HashSet::new();
    while ids.len() < NOTICES {
        let (via, n) = tokio::time::timeout(PATIENCE, seen.recv())
            .await
            .expect("every notice arrives")
            .expect("the hook is running");
        // At least once: a repeat is allowed, and ignored here.
        if ids.insert(n.event_id.clone()) {
            received.push((via, n));
        }
    }
    svc.stop().await;
    let sizes = batch_sizes.lock().expect("lock").clone();
    (received, sizes)
}

/// Each call's notices in sequence order: REPLY, START, FINISH.
fn assert_in_order(received: &[(Via, pb::CallEventNotice)]) {
    let mut per_call: HashMap<&str, Vec<(u32, i32)>> = HashMap::new();
    for (_, n) in received {
        per_call
            .entry(&n.call_id)
            .or_default()
            .push((n.sequence, n.event_type));
    }
    assert_eq!(per_call.len(), CALLS);
    for (call, events) in per_call {
        let types: Vec<i32> = events.iter().map(|e| e.1).collect();
        assert_eq!(
            types,
            [
                pb::EventType::Reply as i32,
                pb::EventType::Start as i32,
                pb::EventType::Finish as i32
            ],
            "call {call}: {events:?}"
        );
        assert!(
            events.windows(2).all(|w| w[0].0 < w[1].0),
            "call {call}: {events:?}"
        );
    }
}

#[tokio::test]
async fn queued_notices_go_in_batches_in_order() {
    let (received, sizes) = run(true, None).await;
    assert_in_order(&received);
    // 36 notices on 8 lanes, each lane held at its first: some lane queued
    // several, and they went together.
    assert!(!sizes.is_empty(), "no batch was sent");
    assert!(sizes.iter().all(|&s| s >= 2), "a batch of one: {sizes:?}");
    let batched = received.iter().filter(|(v, _)| *v == Via::Batch).count();
    assert_eq!(batched, sizes.iter().sum::<usize>());
}

#[tokio::test]
async fn without_on_call_events_notices_go_one_at_a_time() {
    let (received, sizes) = run(false, None).await;
    assert_in_order(&received);
    assert!(sizes.is_empty());
    assert!(received.iter().all(|(v, _)| *v == Via::Single));
}

#[tokio::test]
async fn notices_within_the_linger_share_one_request_per_lane() {
    // Twelve calls take far less than this; each lane's first notice waits
    // for all the others of its lane.
    let (received, sizes) = run(true, Some(Duration::from_secs(3))).await;
    assert_in_order(&received);
    assert!(received.iter().all(|(v, _)| *v == Via::Batch));
    assert_eq!(sizes.iter().sum::<usize>(), NOTICES);
    assert!(
        sizes.len() <= call_service::business::LANES,
        "more requests than lanes: {sizes:?}"
    );
}
