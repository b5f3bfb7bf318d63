//! Minting client tokens (JWT) for testing and demos: the business backend
//! is what normally signs them, after its own login.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

/// What a client token says.
#[derive(Clone, Debug, Serialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// Issued at (Unix seconds).
    pub iat: u64,
    /// Expires at (Unix seconds).
    pub exp: u64,
    /// Not valid before (Unix seconds), if set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
}

/// Could not sign a token.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("the private key is neither an EC (P-256) nor an RSA key in PEM")]
    Key,
    #[error("cannot sign the token: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
}

/// HS256 with a shared secret.
pub fn hs256(claims: &Claims, secret: &[u8]) -> Result<String, TokenError> {
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )?)
}

/// ES256 or RS256, chosen by the kind of PEM private key.
pub fn signed(claims: &Claims, pem: &[u8]) -> Result<String, TokenError> {
    let (key, alg) = match EncodingKey::from_ec_pem(pem) {
        Ok(key) => (key, Algorithm::ES256),
        Err(_) => (
            EncodingKey::from_rsa_pem(pem).map_err(|_| TokenError::Key)?,
            Algorithm::RS256,
        ),
    };
    Ok(jsonwebtoken::encode(&Header::new(alg), claims, &key)?)
}
