//! The gRPC edge: the client API (`CallService`) and the admin API
//! (`CallAdmin`). Requests are validated into domain types here
//! ([`crate::convert`]) and errors become `tonic::Status` here, nowhere else.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::oneshot;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};
use tracing::debug;
use videocall_proto::v1 as pb;

use crate::auth::Authenticator;
use crate::codes;
use crate::convert;
use crate::machine::{CallId, ConnId, ForceFinish};
use crate::switchboard::{DeviceRx, ShuttingDown, Switchboard};

impl From<ShuttingDown> for Status {
    fn from(e: ShuttingDown) -> Self {
        Status::unavailable(e.to_string())
    }
}

/// `videocall.v1.CallService`: one stream per device.
#[derive(Debug)]
pub struct ClientApi<S> {
    switchboard: S,
    auth: Authenticator,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl<S: Switchboard> ClientApi<S> {
    pub fn new(
        switchboard: S,
        auth: Authenticator,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            switchboard,
            auth,
            tasks,
            shutdown,
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
        let user = self.auth.identify(request.metadata())?;
        let inbound = request.into_inner();
        let (conn, rx) = self.switchboard.connect(user).await?;
        let (gone_tx, gone_rx) = oneshot::channel();
        self.tasks.spawn(read_controls(
            self.switchboard.clone(),
            conn,
            inbound,
            gone_rx,
            self.shutdown.clone(),
        ));
        Ok(Response::new(DeviceStream { rx, _gone: gone_tx }))
    }
}

/// A device's response stream. Dropping it (the client went away, or the
/// server is stopping) tells the device's reader task to end.
#[derive(Debug)]
pub struct DeviceStream {
    rx: DeviceRx,
    _gone: oneshot::Sender<()>,
}

impl Stream for DeviceStream {
    type Item = Result<pb::ServerMessage, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

/// Forwards a device's controls to the switchboard until its stream ends,
/// then reports the device gone. Being the only sender of both, it keeps
/// them in order: a FINISH sent just before hanging up is applied first.
async fn read_controls<S: Switchboard>(
    switchboard: S,
    conn: ConnId,
    mut inbound: Streaming<pb::ClientMessage>,
    mut gone: oneshot::Receiver<()>,
    shutdown: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            m = inbound.message() => m,
            _ = &mut gone => break,
            () = shutdown.cancelled() => break,
        };
        let msg = match msg {
            Ok(Some(msg)) => msg,
            Ok(None) => break,
            Err(status) => {
                debug!(conn = conn.0, error = %status.message(), "device stream failed");
                break;
            }
        };
        let (seq, control) = match msg.kind {
            Some(pb::client_message::Kind::Control(c)) => (c.seq, convert::control(c)),
            None => (0, Err((codes::INVALID_ARGUMENT, "empty client message"))),
        };
        if switchboard.control(conn, seq, control).await.is_err() {
            return;
        }
    }
    switchboard.disconnect(conn).await;
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
        _request: Request<pb::ListCallsRequest>,
    ) -> Result<Response<pb::ListCallsResponse>, Status> {
        let calls = self.switchboard.list_calls().await?;
        Ok(Response::new(pb::ListCallsResponse {
            calls: calls.iter().map(convert::call_info).collect(),
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
