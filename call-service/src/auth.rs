//! Who a client is, and who may use the admin API.
//!
//! **Clients** prove who they are with a signed token (JWT) in
//! `authorization: Bearer <token>`: HS256 with a shared secret, or RS256 /
//! ES256 with the business backend's public key (it keeps the private key).
//! The token's `sub` is the user id; `exp` is required, `nbf` honoured, and
//! only the configured algorithm is accepted. The user id always comes from
//! the verified token, never from anything else the client sends. A missing,
//! malformed, forged, expired or not-yet-valid token is refused with
//! UNAUTHENTICATED before any state changes. When a token expires during a
//! stream, the server ends the stream with UNAUTHENTICATED ("token
//! expired") — unless the client sent a new token on the stream first
//! (`TokenRefresh`, checked by [`Authenticator::refresh`] exactly as at
//! connect, for the same user), which moves the stream's expiry to the new
//! token's. The server asks for one `--refresh-ahead` before expiry
//! (`RefreshDue`); see the reader in [`crate::api`].
//!
//! The development scheme trusts `x-videocall-user` as is, so anybody can
//! act as anybody. It is on only with `--dev-identity`, logged loudly, and
//! never the default. With neither configured, every stream is refused.
//!
//! **The admin API** has its own credential: a separate secret sent as
//! `authorization: Bearer <admin token>` (client tokens are refused there),
//! and/or mutual TLS on the admin listener. Without a secret it is served
//! only on a loopback address.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tonic::Status;
use tonic::metadata::MetadataMap;

use crate::convert;
use crate::domain::UserId;

/// The shortest shared secret accepted, for client tokens (HS256) and the
/// admin token alike.
pub const MIN_SECRET_BYTES: usize = 32;

/// The metadata key carrying the user id in development mode.
pub const DEV_USER_HEADER: &str = "x-videocall-user";

/// A verified client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub user: UserId,
    /// When the credential stops being valid (the stream ends then);
    /// `None`: never, or later than any clock can say.
    pub expires: Option<SystemTime>,
}

/// How client tokens are checked.
#[derive(Clone)]
pub struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
    leeway: Duration,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("algorithms", &self.validation.algorithms)
            .finish()
    }
}

/// A token verification key that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the JWT public key {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the JWT public key is neither an RSA nor an EC (P-256) public key in PEM")]
    Pem,
    #[error("the JWT secret must be at least 32 bytes")]
    ShortSecret,
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
}

impl JwtVerifier {
    /// HS256 with a shared secret (at least [`MIN_SECRET_BYTES`]).
    pub fn hs256(secret: &[u8], leeway: Duration) -> Result<Self, KeyError> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(KeyError::ShortSecret);
        }
        Ok(Self::new(
            DecodingKey::from_secret(secret),
            Algorithm::HS256,
            leeway,
        ))
    }

    /// RS256 or ES256, from a PEM public key (the kind of key decides).
    pub fn public_key_pem(pem: &[u8], leeway: Duration) -> Result<Self, KeyError> {
        if let Ok(key) = DecodingKey::from_ec_pem(pem) {
            return Ok(Self::new(key, Algorithm::ES256, leeway));
        }
        match DecodingKey::from_rsa_pem(pem) {
            Ok(key) => Ok(Self::new(key, Algorithm::RS256, leeway)),
            Err(_) => Err(KeyError::Pem),
        }
    }

    fn new(key: DecodingKey, algorithm: Algorithm, leeway: Duration) -> Self {
        let mut validation = Validation::new(algorithm);
        validation.leeway = leeway.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Self {
            key,
            validation,
            leeway,
        }
    }

    /// Checks a token and returns who it names.
    pub fn verify(&self, token: &str) -> Result<Identity, Status> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| Status::unauthenticated(format!("invalid token: {e}")))?;
        let user = convert::user_id(&data.claims.sub)
            .map_err(|e| Status::unauthenticated(format!("invalid token subject: {e}")))?;
        // No claim value may panic: an `exp` too far out to be a time is
        // taken as "does not expire before the stream ends anyway".
        let expires = UNIX_EPOCH
            .checked_add(Duration::from_secs(data.claims.exp))
            .and_then(|t| t.checked_add(self.leeway));
        Ok(Identity { user, expires })
    }
}

/// How client streams are identified.
#[derive(Clone, Debug)]
pub enum Authenticator {
    /// Signed tokens.
    Jwt(Box<JwtVerifier>),
    /// Development only: trust `x-videocall-user`.
    DevIdentity,
    /// No scheme configured: refuse everybody.
    RefuseAll,
}

fn bearer(metadata: &MetadataMap) -> Result<Option<&str>, Status> {
    let Some(value) = metadata.get("authorization") else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| Status::unauthenticated("authorization is not visible ASCII"))?;
    match value.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(Some(token.trim()))
        }
        _ => Err(Status::unauthenticated(
            "authorization must be `Bearer <token>`",
        )),
    }
}

impl Authenticator {
    /// The client a stream belongs to, or UNAUTHENTICATED. Runs before any
    /// state is touched.
    pub fn identify(&self, metadata: &MetadataMap) -> Result<Identity, Status> {
        match self {
            Authenticator::RefuseAll => Err(Status::unauthenticated(
                "no client authentication is configured on this call service \
                 (--jwt-secret, --jwt-public-key, or --dev-identity for development)",
            )),
            Authenticator::Jwt(verifier) => match bearer(metadata)? {
                Some(token) => verifier.verify(token),
                None => Err(Status::unauthenticated(
                    "missing `authorization: Bearer <token>`",
                )),
            },
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
                let user = convert::user_id(raw)
                    .map_err(|e| Status::unauthenticated(format!("bad {DEV_USER_HEADER}: {e}")))?;
                Ok(Identity {
                    user,
                    expires: None,
                })
            }
        }
    }
}

impl Authenticator {
    /// Checks a token sent on a live stream of `user` (a `TokenRefresh`):
    /// exactly as at connect, and it must name the same user. The new
    /// expiry, or why the token is refused. Changes nothing either way.
    pub fn refresh(&self, user: &UserId, token: &str) -> Result<Option<SystemTime>, String> {
        match self {
            Authenticator::Jwt(verifier) => {
                let identity = verifier
                    .verify(token.trim())
                    .map_err(|s| s.message().to_owned())?;
                if identity.user != *user {
                    return Err("the token names another user than this stream's".into());
                }
                Ok(identity.expires)
            }
            Authenticator::DevIdentity => Err(
                "this call service identifies streams without tokens (--dev-identity): \
                 there is nothing to refresh"
                    .into(),
            ),
            Authenticator::RefuseAll => Err("no client authentication is configured".into()),
        }
    }
}

/// Checks the admin secret on every admin request (a tonic interceptor).
#[derive(Clone)]
pub struct AdminGuard {
    token: Option<std::sync::Arc<[u8]>>,
}

impl std::fmt::Debug for AdminGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminGuard")
            .field("token", &self.token.as_ref().map(|_| ".."))
            .finish()
    }
}

impl AdminGuard {
    /// `None`: no secret (only allowed on loopback, checked at start).
    pub fn new(token: Option<&str>) -> Self {
        Self {
            token: token.map(|t| std::sync::Arc::from(t.as_bytes())),
        }
    }

    pub fn check(&self, metadata: &MetadataMap) -> Result<(), Status> {
        let Some(want) = &self.token else {
            return Ok(());
        };
        match bearer(metadata)? {
            Some(got) if constant_time_eq(got.as_bytes(), want) => Ok(()),
            Some(_) => Err(Status::unauthenticated("wrong admin credential")),
            None => Err(Status::unauthenticated(
                "missing admin credential (`authorization: Bearer <admin token>`)",
            )),
        }
    }
}

impl tonic::service::Interceptor for AdminGuard {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        self.check(request.metadata())?;
        Ok(request)
    }
}

/// Compares without stopping at the first difference, so the time taken
/// says nothing about the secret.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn token(claims: serde_json::Value, alg: Algorithm, key: &EncodingKey) -> String {
        jsonwebtoken::encode(&Header::new(alg), &claims, key).unwrap()
    }

    fn md(token: &str) -> MetadataMap {
        let mut md = MetadataMap::new();
        md.insert("authorization", format!("Bearer {token}").parse().unwrap());
        md
    }

    #[test]
    fn a_refreshed_token_must_be_valid_and_name_the_same_user() {
        let auth = Authenticator::Jwt(Box::new(
            JwtVerifier::hs256(SECRET, Duration::ZERO).unwrap(),
        ));
        let key = EncodingKey::from_secret(SECRET);
        let alice: UserId = "alice".into();
        let exp = now() + 600;
        let good = token(
            serde_json::json!({"sub": "alice", "exp": exp}),
            Algorithm::HS256,
            &key,
        );
        assert_eq!(
            auth.refresh(&alice, &good),
            Ok(Some(UNIX_EPOCH + Duration::from_secs(exp)))
        );
        let bobs = token(
            serde_json::json!({"sub": "bob", "exp": exp}),
            Algorithm::HS256,
            &key,
        );
        assert!(
            auth.refresh(&alice, &bobs)
                .unwrap_err()
                .contains("another user")
        );
        let wrong_alg = token(
            serde_json::json!({"sub": "alice", "exp": exp}),
            Algorithm::HS512,
            &key,
        );
        assert!(auth.refresh(&alice, &wrong_alg).is_err());
        let no_exp = token(serde_json::json!({"sub": "alice"}), Algorithm::HS256, &key);
        assert!(auth.refresh(&alice, &no_exp).is_err());
        let early = token(
            serde_json::json!({"sub": "alice", "exp": exp, "nbf": now() + 300}),
            Algorithm::HS256,
            &key,
        );
        assert!(auth.refresh(&alice, &early).is_err());
        assert!(auth.refresh(&alice, "").is_err());
        assert!(
            Authenticator::DevIdentity
                .refresh(&alice, &good)
                .unwrap_err()
                .contains("--dev-identity")
        );
    }

    #[test]
    fn hs256_tokens_name_the_user_and_bad_ones_are_refused() {
        let auth = Authenticator::Jwt(Box::new(
            JwtVerifier::hs256(SECRET, Duration::from_secs(5)).unwrap(),
        ));
        let key = EncodingKey::from_secret(SECRET);
        let good = token(
            serde_json::json!({"sub": "alice", "exp": now() + 60}),
            Algorithm::HS256,
            &key,
        );
        assert_eq!(&*auth.identify(&md(&good)).unwrap().user, "alice");

        let forged = token(
            serde_json::json!({"sub": "alice", "exp": now() + 60}),
            Algorithm::HS256,
            &EncodingKey::from_secret(b"another secret, 32 bytes long!!!"),
        );
        let expired = token(
            serde_json::json!({"sub": "alice", "exp": now() - 60}),
            Algorithm::HS256,
            &key,
        );
        let early = token(
            serde_json::json!({"sub": "alice", "exp": now() + 600, "nbf": now() + 300}),
            Algorithm::HS256,
            &key,
        );
        let no_exp = token(serde_json::json!({"sub": "alice"}), Algorithm::HS256, &key);
        let bad_sub = token(
            serde_json::json!({"sub": "", "exp": now() + 60}),
            Algorithm::HS256,
            &key,
        );
        let hs384 = token(
            serde_json::json!({"sub": "alice", "exp": now() + 60}),
            Algorithm::HS384,
            &key,
        );
        for bad in [
            forged,
            expired,
            early,
            no_exp,
            bad_sub,
            hs384,
            "not.a.token".into(),
            String::new(),
        ] {
            let err = auth.identify(&md(&bad)).unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated, "{bad}");
        }
        assert_eq!(
            auth.identify(&MetadataMap::new()).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        // Development metadata means nothing to the token scheme.
        let mut dev = MetadataMap::new();
        dev.insert(DEV_USER_HEADER, "alice".parse().unwrap());
        assert_eq!(
            auth.identify(&dev).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert!(matches!(
            JwtVerifier::hs256(b"short", Duration::ZERO),
            Err(KeyError::ShortSecret)
        ));
    }

    #[test]
    fn an_exp_too_far_out_for_a_clock_saturates_instead_of_panicking() {
        let verifier = JwtVerifier::hs256(SECRET, Duration::from_secs(5)).unwrap();
        let key = EncodingKey::from_secret(SECRET);
        for exp in [i64::MAX as u64, u64::MAX, u64::MAX - 4] {
            let t = token(
                serde_json::json!({"sub": "alice", "exp": exp}),
                Algorithm::HS256,
                &key,
            );
            let id = verifier.verify(&t).unwrap();
            assert_eq!(&*id.user, "alice");
            if let Some(at) = id.expires {
                assert!(at > SystemTime::now());
            }
        }
    }

    #[test]
    fn dev_identity_reads_the_header_and_refuses_bad_ones() {
        let mut md = MetadataMap::new();
        assert_eq!(
            Authenticator::DevIdentity.identify(&md).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        md.insert(DEV_USER_HEADER, "alice".parse().unwrap());
        assert_eq!(
            &*Authenticator::DevIdentity.identify(&md).unwrap().user,
            "alice"
        );
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

    #[test]
    fn the_admin_guard_wants_its_own_secret() {
        let guard = AdminGuard::new(Some("admin-secret"));
        assert!(guard.check(&md("admin-secret")).is_ok());
        assert_eq!(
            guard.check(&md("admin-secreT")).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            guard.check(&MetadataMap::new()).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert!(AdminGuard::new(None).check(&MetadataMap::new()).is_ok());
    }
}
