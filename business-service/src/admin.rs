//! A client of the call service's admin API (`CallAdmin`).

use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
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

/// How to reach the admin API: its credential and TLS.
#[derive(Clone, Debug, Default)]
pub struct AdminAccess {
    /// The admin secret (`--admin-token` of the call service).
    pub token: Option<String>,
    /// For `https://` URLs: the CA that signed the call service's
    /// certificate (PEM).
    pub ca_pem: Option<Vec<u8>>,
    /// For mutual TLS: this client's certificate and key (PEM).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl AdminAccess {
    /// The endpoint for `url` with these settings.
    pub fn endpoint(&self, url: impl Into<String>) -> Result<Endpoint, tonic::transport::Error> {
        let mut endpoint = Endpoint::from_shared(url.into())?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(5));
        if self.ca_pem.is_some() || self.identity.is_some() {
            let mut tls = ClientTlsConfig::new();
            if let Some(ca) = &self.ca_pem {
                tls = tls.ca_certificate(Certificate::from_pem(ca));
            }
            if let Some((cert, key)) = &self.identity {
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            endpoint = endpoint.tls_config(tls)?;
        }
        Ok(endpoint)
    }

    /// Adds the credential to a request.
    pub fn authorize<T>(&self, request: &mut tonic::Request<T>) {
        if let Some(Ok(value)) = self.token.as_ref().map(|t| format!("Bearer {t}").parse()) {
            request.metadata_mut().insert("authorization", value);
        }
    }
}

/// A connection to one call service's admin API.
#[derive(Clone, Debug)]
pub struct Admin {
    client: CallAdminClient<Channel>,
    access: AdminAccess,
}

impl Admin {
    /// Connects without a credential (an admin API on loopback with none).
    pub async fn connect(url: impl Into<String>) -> Result<Self, AdminError> {
        Self::connect_with(url, AdminAccess::default()).await
    }

    /// Connects with a credential and TLS settings.
    pub async fn connect_with(
        url: impl Into<String>,
        access: AdminAccess,
    ) -> Result<Self, AdminError> {
        let channel = access
            .endpoint(url)
            .map_err(AdminError::Url)?
            .connect()
            .await
            .map_err(AdminError::Connect)?;
        Ok(Self {
            client: CallAdminClient::new(channel),
            access,
        })
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        self.access.authorize(&mut request);
        request
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
            .video_call_control(self.request(request))
            .await?
            .into_inner())
    }

    /// Every live call, read page by page.
    pub async fn calls(&self) -> Result<Vec<pb::CallInfo>, AdminError> {
        let mut calls = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = self
                .client
                .clone()
                .list_calls(self.request(pb::ListCallsRequest {
                    page_size: 0,
                    page_token,
                }))
                .await?
                .into_inner();
            calls.extend(page.calls);
            if page.next_page_token.is_empty() {
                return Ok(calls);
            }
            page_token = page.next_page_token;
        }
    }

    pub async fn user_state(&self, user: &str) -> Result<pb::GetUserStateResponse, AdminError> {
        let request = pb::GetUserStateRequest {
            user_id: user.into(),
        };
        Ok(self
            .client
            .clone()
            .get_user_state(self.request(request))
            .await?
            .into_inner())
    }
}
