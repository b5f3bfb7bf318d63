//! Who a client is.
//!
//! Identity comes from request metadata and nothing else the client sends.
//! The only scheme so far is the development one: the `x-videocall-user`
//! header is trusted as is, which lets anybody act as anybody. It is on only
//! when the service is started with `--dev-identity`, which is logged
//! loudly; without it every stream is refused with UNAUTHENTICATED.

use tonic::Status;
use tonic::metadata::MetadataMap;

use crate::convert;
use crate::machine::UserId;

/// The metadata key carrying the user id in development mode.
pub const DEV_USER_HEADER: &str = "x-videocall-user";

/// How client streams are identified.
#[derive(Clone, Debug)]
pub enum Authenticator {
    /// Development only: trust `x-videocall-user`.
    DevIdentity,
    /// No scheme configured: refuse everybody.
    RefuseAll,
}

impl Authenticator {
    /// The user a stream belongs to, or UNAUTHENTICATED. Runs before any
    /// state is touched.
    pub fn identify(&self, metadata: &MetadataMap) -> Result<UserId, Status> {
        match self {
            Authenticator::RefuseAll => Err(Status::unauthenticated(
                "no client authentication is configured on this call service \
                 (development identities need --dev-identity)",
            )),
            Authenticator::DevIdentity => {
                let raw = metadata
                    .get(DEV_USER_HEADER)
                    .ok_or_else(|| {
                        Status::unauthenticated(format!("missing {DEV_USER_HEADER} metadata"))
                    })?
                    .to_str()
                    .map_err(|_| {
                        Status::unauthenticated(format!("{DEV_USER_HEADER} is not visible ASCII"))
                    })?;
                convert::user_id(raw)
                    .map_err(|e| Status::unauthenticated(format!("bad {DEV_USER_HEADER}: {e}")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_identity_reads_the_header_and_refuses_bad_ones() {
        let mut md = MetadataMap::new();
        assert_eq!(
            Authenticator::DevIdentity.identify(&md).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        md.insert(DEV_USER_HEADER, "alice".parse().unwrap());
        assert_eq!(&*Authenticator::DevIdentity.identify(&md).unwrap(), "alice");
        assert_eq!(
            Authenticator::RefuseAll.identify(&md).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        md.insert(DEV_USER_HEADER, "".parse().unwrap());
        assert_eq!(
            Authenticator::DevIdentity.identify(&md).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }
}
