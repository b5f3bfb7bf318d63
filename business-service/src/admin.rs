//! A client of the call service's admin API (`CallAdmin`).

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use videocall_proto::v1 as pb;
use videocall_proto::v1::call_admin_client::CallAdminClient;

/// Talking to the admin API failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("invalid admin URL: {0}")]
    Url(#[source] tonic::transport::Error),
    #[error("cannot reach the call service's admin API: {0}")]
    Connect(#[source] tonic::transport::Error),
    #[error("the admin API answered {}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
}

/// A connection to one call service's admin API.
#[derive(Clone, Debug)]
pub struct Admin {
    client: CallAdminClient<Channel>,
}

impl Admin {
    pub async fn connect(url: impl Into<String>) -> Result<Self, AdminError> {
        let channel = Endpoint::from_shared(url.into())
            .map_err(AdminError::Url)?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(AdminError::Connect)?;
        Ok(Self {
            client: CallAdminClient::new(channel),
        })
    }

    /// Forced FINISH: ends `user`'s call with `code`. Returns the result
    /// code (0, or 100107 when the user has no call) and the call id.
    pub async fn hang_up(
        &self,
        user: &str,
        code: u32,
        user_str: &str,
    ) -> Result<pb::AdminControlResult, AdminError> {
        let request = pb::AdminControl {
            event_type: pb::EventType::Finish as i32,
            user_id: user.into(),
            error_code: code,
            flags: 0,
            param: 0,
            user_str: user_str.into(),
            call_id: String::new(),
        };
        Ok(self
            .client
            .clone()
            .video_call_control(request)
            .await?
            .into_inner())
    }

    pub async fn calls(&self) -> Result<Vec<pb::CallInfo>, AdminError> {
        Ok(self
            .client
            .clone()
            .list_calls(pb::ListCallsRequest {})
            .await?
            .into_inner()
            .calls)
    }

    pub async fn user_state(&self, user: &str) -> Result<pb::GetUserStateResponse, AdminError> {
        let request = pb::GetUserStateRequest {
            user_id: user.into(),
        };
        Ok(self
            .client
            .clone()
            .get_user_state(request)
            .await?
            .into_inner())
    }
}
