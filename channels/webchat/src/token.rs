//! Server-issued user tokens: `wc1.<user>.<expires>.<signature>`, signed with the channel's
//! key (HMAC-SHA256, base64url). The token is the identity: a socket or a webhook call acts
//! as the user the token names, and only as that user.

use base64::Engine;
use hmac::{Hmac, Mac};
use patchbay_channel_core::Secret;
use sha2::Sha256;

const PREFIX: &str = "wc1";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenError {
    /// Not a token, or a token whose signature does not verify (forged, or another channel's).
    Invalid,
    Expired,
}

impl TokenError {
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::Invalid => "invalid_token",
            TokenError::Expired => "token_expired",
        }
    }
    pub fn message(&self) -> &'static str {
        match self {
            TokenError::Invalid => "the user token is not one this chat issued (forged, damaged, or from another chat); ask POST …/session for a new one",
            TokenError::Expired => "the user token has expired; ask POST …/session for a new one",
        }
    }
}

/// A verified token's claims.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claims {
    pub user: String,
    /// Unix seconds.
    pub expires: i64,
}

#[derive(Clone)]
pub struct Signer {
    key: Vec<u8>,
}

impl Signer {
    pub fn new(key: &Secret) -> Signer {
        Signer {
            key: hex::decode(key.expose()).unwrap_or_else(|_| key.expose().as_bytes().to_vec()),
        }
    }

    fn sign(&self, payload: &str) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(payload.as_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    }

    pub fn issue(&self, user: &str, expires: i64) -> String {
        let payload = format!("{PREFIX}.{user}.{expires}");
        let sig = self.sign(&payload);
        format!("{payload}.{sig}")
    }

    /// A token for a brand-new user.
    pub fn new_user(&self, ttl_secs: u64, now_secs: i64) -> (Claims, String) {
        let user = format!("u{}", patchbay_channel_core::ids::random_token(26));
        let expires = now_secs + ttl_secs as i64;
        let token = self.issue(&user, expires);
        (Claims { user, expires }, token)
    }

    pub fn verify(&self, token: &str, now_secs: i64) -> Result<Claims, TokenError> {
        if token.len() > 200 {
            return Err(TokenError::Invalid);
        }
        let mut parts = token.split('.');
        let (Some(prefix), Some(user), Some(expires), Some(sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Invalid);
        };
        if prefix != PREFIX || user.is_empty() || !user.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(TokenError::Invalid);
        }
        let expected = self.sign(&format!("{PREFIX}.{user}.{expires}"));
        if !patchbay_channel_core::ct_eq(expected.as_bytes(), sig.as_bytes()) {
            return Err(TokenError::Invalid);
        }
        let expires: i64 = expires.parse().map_err(|_| TokenError::Invalid)?;
        if expires <= now_secs {
            return Err(TokenError::Expired);
        }
        Ok(Claims { user: user.to_owned(), expires })
    }
}

/// Whether a string claims to be a token (as opposed to a Botkit client's own cookie id).
pub fn looks_like_token(s: &str) -> bool {
    s.starts_with("wc1.")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> Signer {
        Signer::new(&Secret::new("11".repeat(32)))
    }

    #[test]
    fn issued_tokens_verify_and_forgeries_do_not() {
        let s = signer();
        let (claims, token) = s.new_user(3600, 1000);
        assert_eq!(s.verify(&token, 1000).unwrap(), claims);
        // Another user's name with this user's signature.
        let forged = token.replacen(&claims.user, "uaaaaaaaaaaaaaaaaaaaaaaaaaa", 1);
        assert_eq!(s.verify(&forged, 1000), Err(TokenError::Invalid));
        // A later expiry with the old signature.
        let stretched = token.replacen(&claims.expires.to_string(), &(claims.expires + 1).to_string(), 1);
        assert_eq!(s.verify(&stretched, 1000), Err(TokenError::Invalid));
        // Another channel's key.
        let other = Signer::new(&Secret::new("22".repeat(32)));
        assert_eq!(other.verify(&token, 1000), Err(TokenError::Invalid));
        assert_eq!(s.verify(&token, claims.expires), Err(TokenError::Expired));
        assert_eq!(s.verify("garbage", 0), Err(TokenError::Invalid));
        assert_eq!(s.verify("wc1.a.b.c.d", 0), Err(TokenError::Invalid));
    }
}
