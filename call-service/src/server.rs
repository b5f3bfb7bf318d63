//! Wiring: the switchboard, the business hook and both gRPC servers, on
//! listeners the caller has already bound, until a shutdown future resolves.

use std::future::Future;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Server;
use tracing::{info, warn};
use videocall_proto::v1::call_admin_server::CallAdminServer;
use videocall_proto::v1::call_service_server::CallServiceServer;

use crate::api::{AdminApi, ClientApi};
use crate::auth::Authenticator;
use crate::business::{Business, BusinessConfig, BusinessUrlError, Clock};
use crate::config::Config;
use crate::machine::MachineConfig;
use crate::switchboard::LocalSwitchboard;

/// The largest message a client or admin may send. A control is at most
/// about 4.3 KiB (user string 4096 bytes, peer id 128 bytes).
pub const MAX_MESSAGE: usize = 16 * 1024;

/// Why the service stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    BusinessUrl(#[from] BusinessUrlError),
    #[error("the {api} server failed: {source}")]
    Transport {
        api: &'static str,
        source: tonic::transport::Error,
    },
}

/// Runs the call service on `client` (CallService) and `admin` (CallAdmin)
/// until `shutdown` resolves, then stops accepting, ends every device stream
/// and returns once every task it started has ended.
pub async fn serve(
    client: TcpListener,
    admin: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let tasks = TaskTracker::new();
    let token = CancellationToken::new();
    let clock = Clock::now();

    let business = match &config.business_url {
        Some(url) => Some(Business::start(
            &BusinessConfig {
                url: url.clone(),
                deadline: config.approval_deadline,
                failure_policy: config.approval_failure_policy,
            },
            clock,
            &tasks,
            token.clone(),
        )?),
        None => {
            warn!(
                "no business service configured: every call is allowed and no events are reported"
            );
            None
        }
    };
    let auth = if config.dev_identity {
        warn!(
            "DEVELOPMENT IDENTITIES ARE ON: clients are trusted to say who they are (x-videocall-user); never use this in production"
        );
        Authenticator::DevIdentity
    } else {
        Authenticator::RefuseAll
    };
    let switchboard = LocalSwitchboard::start(
        MachineConfig {
            ring_timeout: config.ring_timeout,
        },
        clock.start,
        business,
        &tasks,
        token.clone(),
    );

    let client_api = CallServiceServer::new(ClientApi::new(
        switchboard.clone(),
        auth,
        tasks.clone(),
        token.clone(),
    ))
    .max_decoding_message_size(MAX_MESSAGE);
    let admin_api =
        CallAdminServer::new(AdminApi::new(switchboard)).max_decoding_message_size(MAX_MESSAGE);

    info!(
        client = %client.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        admin = %admin.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        business = config.business_url.as_deref().unwrap_or("none"),
        ring_timeout = ?config.ring_timeout,
        approval_deadline = ?config.approval_deadline,
        "call service started"
    );
    let client_srv = builder()
        .add_service(client_api)
        .serve_with_incoming_shutdown(
            TcpListenerStream::new(client),
            token.clone().cancelled_owned(),
        );
    let admin_srv = builder()
        .add_service(admin_api)
        .serve_with_incoming_shutdown(
            TcpListenerStream::new(admin),
            token.clone().cancelled_owned(),
        );
    // Whichever ends first (shutdown asked, or a server failed) stops the rest.
    let stop = |r: Result<(), tonic::transport::Error>, api| {
        token.cancel();
        r.map_err(|source| ServeError::Transport { api, source })
    };
    let watch = async {
        tokio::select! {
            () = shutdown => info!("shutting down"),
            () = token.cancelled() => {}
        }
        token.cancel();
    };
    let (client_res, admin_res, ()) = tokio::join!(
        async { stop(client_srv.await, "client") },
        async { stop(admin_srv.await, "admin") },
        watch,
    );
    tasks.close();
    tasks.wait().await;
    info!("call service stopped");
    client_res.and(admin_res)
}

fn builder() -> Server {
    Server::builder()
        .tcp_nodelay(true)
        // Finds dead peers on idle connections.
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
}
