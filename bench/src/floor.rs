//! The floor under the call rate: a relay that serves the call service's
//! `Session` protocol but keeps no call state. Each control is answered and
//! turned straight into the events of an answered call for the device it
//! names; each REQUEST is first approved by the business service with the
//! same unary `OnCallEvent` the call service sends. No checks, no timers, no
//! records, no notices besides the approval.
//!
//! Driven by the same load generator (the same SDK clients, a connection per
//! device, the same message pattern per call), what the relay sustains is
//! what tonic and the machine leave for any call service built this way: the
//! call service's rate is measured against it (`ramp --floor`). It handles
//! answered and rejected calls; cancelling and ring timeouts need call state
//! and are not there.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use client_sdk::DEV_USER_HEADER;
use client_sdk::videocall_proto::v1 as pb;
use pb::business_hook_client::BusinessHookClient;
use pb::call_service_server::{CallService, CallServiceServer};
use pb::{EventType, ResultCode};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Server};
use tonic::{Request, Response, Status, Streaming};

/// Messages queued for one device, as in the call service; a device whose
/// queue is full loses the message (its call then fails in the generator).
const QUEUE: usize = 256;

type Outbox = mpsc::Sender<Result<pb::ServerMessage, Status>>;

/// The connected devices by user id. A lock held only to look up, insert or
/// queue a message without waiting, never across an `.await`: the relay has
/// no other shared state.
#[derive(Debug, Default)]
struct Devices(Mutex<HashMap<Arc<str>, Outbox>>);

impl Devices {
    fn insert(&self, user: Arc<str>, tx: Outbox) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(user, tx);
    }

    /// Forgets `user` unless a newer stream of the same user took its place.
    fn remove(&self, user: &str, tx: &Outbox) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(user).is_some_and(|t| t.same_channel(tx)) {
            map.remove(user);
        }
    }

    /// Queues `msg` for `user`, if connected; `try_send` never waits, so
    /// it runs under the lock.
    fn send(&self, user: &str, msg: pb::ServerMessage) {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = map.get(user) {
            let _ = tx.try_send(Ok(msg));
        }
    }
}

/// The relay.
#[derive(Debug, Clone)]
pub struct Floor {
    devices: Arc<Devices>,
    approver: Option<BusinessHookClient<Channel>>,
    calls: Arc<AtomicU64>,
}

impl Floor {
    /// A relay asking `approver` (a business service) to approve each call,
    /// or approving every call itself.
    pub fn new(approver: Option<Channel>) -> Self {
        Self {
            devices: Arc::default(),
            approver: approver.map(BusinessHookClient::new),
            calls: Arc::default(),
        }
    }
}

fn event(
    kind: EventType,
    peer: &str,
    code: u32,
    c: &pb::CallControl,
    call_id: &str,
) -> pb::ServerMessage {
    pb::ServerMessage {
        kind: Some(pb::server_message::Kind::Event(pb::CallEvent {
            event_type: kind as i32,
            peer_user_id: peer.to_owned(),
            error_code: code,
            flags: c.flags,
            param: c.param,
            user_str: c.user_str.clone(),
            call_id: call_id.to_owned(),
        })),
    }
}

fn result(seq: u64, code: u32, call_id: String) -> pb::ServerMessage {
    pb::ServerMessage {
        kind: Some(pb::server_message::Kind::Result(pb::ControlResult {
            seq,
            code,
            call_id,
            message: String::new(),
        })),
    }
}

impl Floor {
    /// Relays the controls of `user`'s stream until it ends.
    async fn read(self, user: Arc<str>, tx: Outbox, mut inbound: Streaming<pb::ClientMessage>) {
        while let Ok(Some(msg)) = inbound.message().await {
            let Some(pb::client_message::Kind::Control(c)) = msg.kind else {
                continue;
            };
            self.control(&user, &tx, c).await;
        }
        self.devices.remove(&user, &tx);
    }

    async fn control(&self, user: &str, tx: &Outbox, c: pb::CallControl) {
        let peer = c.peer_user_id.as_str();
        match EventType::try_from(c.event_type) {
            Ok(EventType::Request) => {
                let call_id = format!("floor-{}", self.calls.fetch_add(1, Relaxed));
                let _ = tx.try_send(Ok(result(c.seq, 0, call_id.clone())));
                let verdict = match &self.approver {
                    None => 0,
                    Some(a) => {
                        let notice = pb::CallEventNotice {
                            event_type: EventType::Request as i32,
                            source_user_id: user.to_owned(),
                            target_user_id: peer.to_owned(),
                            flags: c.flags,
                            param: c.param,
                            user_str: c.user_str.clone(),
                            call_id: call_id.clone(),
                            event_id: format!("{call_id}-1"),
                            sequence: 1,
                            decision_required: true,
                            initiator: pb::Initiator::Caller as i32,
                            caller_user_id: user.to_owned(),
                            callee_user_id: peer.to_owned(),
                            ..Default::default()
                        };
                        match a.clone().on_call_event(notice).await {
                            Ok(ack) => ack.into_inner().result_code,
                            Err(_) => ResultCode::BusinessUnavailable as u32,
                        }
                    }
                };
                if verdict == 0 {
                    self.devices
                        .send(peer, event(EventType::Request, user, 0, &c, &call_id));
                } else {
                    let _ = tx.try_send(Ok(event(EventType::Reply, peer, verdict, &c, &call_id)));
                }
            }
            Ok(EventType::Reply) => {
                let _ = tx.try_send(Ok(result(c.seq, 0, String::new())));
                let code = c.error_code;
                self.devices
                    .send(peer, event(EventType::Reply, user, code, &c, ""));
                if code == 0 {
                    self.devices
                        .send(peer, event(EventType::Start, user, 0, &c, ""));
                    let _ = tx.try_send(Ok(event(EventType::Start, peer, 0, &c, "")));
                } else {
                    let _ = tx.try_send(Ok(event(EventType::Finish, peer, code, &c, "")));
                }
            }
            Ok(EventType::Finish) => {
                let _ = tx.try_send(Ok(result(c.seq, 0, String::new())));
                let _ = tx.try_send(Ok(event(EventType::Finish, peer, 0, &c, "")));
                self.devices
                    .send(peer, event(EventType::Finish, user, 0, &c, ""));
            }
            _ => {
                let code = ResultCode::InvalidArgument as u32;
                let _ = tx.try_send(Ok(result(c.seq, code, String::new())));
            }
        }
    }
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<pb::ServerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl CallService for Floor {
    type SessionStream = SessionStream;

    async fn session(
        &self,
        request: Request<Streaming<pb::ClientMessage>>,
    ) -> Result<Response<SessionStream>, Status> {
        let user: Arc<str> = request
            .metadata()
            .get(DEV_USER_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|u| !u.is_empty())
            .ok_or_else(|| Status::unauthenticated(format!("no {DEV_USER_HEADER}")))?
            .into();
        let (tx, rx) = mpsc::channel(QUEUE);
        let connected = pb::Connected {
            user_id: user.to_string(),
            connection_id: user.to_string(),
            resume_token: String::new(),
            resumed: false,
            expires_at_ms: 0,
        };
        let _ = tx.try_send(Ok(pb::ServerMessage {
            kind: Some(pb::server_message::Kind::Connected(connected)),
        }));
        self.devices.insert(user.clone(), tx.clone());
        // The reader ends with its stream: when the client goes, or when
        // the server stops and closes the connection.
        tokio::spawn(self.clone().read(user, tx, request.into_inner()));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Serves the relay on `listener` until `shutdown` completes, with the
/// call service's transport settings (TCP_NODELAY on accepted connections,
/// the contract's codec).
pub async fn serve(
    listener: TcpListener,
    floor: Floor,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    Server::builder()
        .add_service(CallServiceServer::new(floor))
        .serve_with_incoming_shutdown(crate::echo::incoming(listener), shutdown)
        .await
}
