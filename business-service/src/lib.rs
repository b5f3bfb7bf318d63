//! The reference business service: implements the `BusinessHook` API that
//! the call service calls to approve each call and to report every call
//! event, and drives the call service's admin API (forced hang-up).
//!
//! Layout:
//! - [`Policy`]: who may call (blocked callers, with the refusal code).
//! - [`Hook`]: the `BusinessHook` implementation; logs every event and
//!   lets in-process observers [`Hook::subscribe`] to them.
//! - [`serve`]: runs the hook on a bound listener until shutdown.
//! - [`admin`]: a small client of the call service's admin API.

pub mod admin;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};
use tracing::info;
use videocall_proto::v1 as pb;
use videocall_proto::v1::business_hook_server::{BusinessHook, BusinessHookServer};

/// The refusal code used when none is given: not a number the contract or
/// the call service uses.
pub const DEFAULT_REFUSAL_CODE: u32 = 200_001;

/// Notices kept for a slow observer before it starts losing the oldest.
const OBSERVER_BUFFER: usize = 1024;

/// Who may place calls.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// Callers whose requests are refused, with the code the caller gets.
    pub blocked_callers: HashMap<String, u32>,
}

impl Policy {
    /// The result code for a call request: 0 allows.
    pub fn decide(&self, caller: &str, _callee: &str) -> u32 {
        self.blocked_callers.get(caller).copied().unwrap_or(0)
    }
}

/// The `BusinessHook` implementation.
#[derive(Clone, Debug)]
pub struct Hook {
    policy: Arc<Policy>,
    observers: broadcast::Sender<pb::CallEventNotice>,
}

impl Hook {
    pub fn new(policy: Policy) -> Self {
        let (observers, _) = broadcast::channel(OBSERVER_BUFFER);
        Self {
            policy: Arc::new(policy),
            observers,
        }
    }

    /// Every notice received from now on. A receiver that falls more than
    /// 1024 notices behind loses the oldest (and is told so by `recv`).
    pub fn subscribe(&self) -> broadcast::Receiver<pb::CallEventNotice> {
        self.observers.subscribe()
    }
}

fn event_name(t: i32) -> &'static str {
    match pb::EventType::try_from(t) {
        Ok(pb::EventType::Request) => "REQUEST",
        Ok(pb::EventType::Reply) => "REPLY",
        Ok(pb::EventType::Start) => "START",
        Ok(pb::EventType::Finish) => "FINISH",
        _ => "UNKNOWN",
    }
}

#[tonic::async_trait]
impl BusinessHook for Hook {
    async fn on_call_event(
        &self,
        request: Request<pb::CallEventNotice>,
    ) -> Result<Response<pb::CallEventAck>, Status> {
        let n = request.into_inner();
        let result_code = if n.decision_required && n.event_type == pb::EventType::Request as i32 {
            self.policy.decide(&n.caller_user_id, &n.callee_user_id)
        } else {
            0
        };
        info!(
            event = event_name(n.event_type),
            call_id = %n.call_id,
            seq = n.sequence,
            source = %n.source_user_id,
            target = %n.target_user_id,
            code = n.error_code,
            decision = n.decision_required.then_some(result_code),
            "call event"
        );
        // No observer is fine.
        let _ = self.observers.send(n);
        Ok(Response::new(pb::CallEventAck { result_code }))
    }
}

/// Runs the hook on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    hook: Hook,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(BusinessHookServer::new(hook))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
}
