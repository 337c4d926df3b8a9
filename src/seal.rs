//! Secrets at rest: AES-256-GCM with a random 96-bit nonce per sealing, bound to the record it
//! belongs to (the associated data), so a sealed value copied onto another record fails to open.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use patchbay_channel_core::Secret;
use rand::RngCore;

const NONCE_LEN: usize = 12;

#[derive(Clone)]
pub struct Sealer {
    cipher: Aes256Gcm,
    /// Kept only to derive per-purpose keys ([`Sealer::derive_key`]); never leaves this type.
    key: [u8; 32],
}

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("the encryption key must be 32 bytes written as 64 hex digits or as base64")]
    BadKey,
    #[error("a stored secret cannot be opened: the encryption key is not the one it was sealed with, or the data is damaged")]
    Open,
}

impl Sealer {
    pub fn from_key(key: &Secret) -> Result<Sealer, SealError> {
        let text = key.expose().trim();
        let bytes = if text.len() == 64 {
            hex::decode(text).map_err(|_| SealError::BadKey)?
        } else {
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|_| SealError::BadKey)?
        };
        if bytes.len() != 32 {
            return Err(SealError::BadKey);
        }
        let cipher = Aes256Gcm::new_from_slice(&bytes).map_err(|_| SealError::BadKey)?;
        let mut key = [0u8; 32];
        key.copy_from_slice(&bytes);
        Ok(Sealer { cipher, key })
    }

    /// A new random key, as written to a fresh key file.
    pub fn generate_key() -> String {
        let mut k = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut k);
        hex::encode(k)
    }

    /// A key for one purpose, HMAC-SHA256(encryption key, `context`), as 64 hex digits: the
    /// same on every start and replica, different for every context, and never stored. A
    /// channel's signing key is `derive_key("channel:<id>")`.
    pub fn derive_key(&self, context: &str) -> Secret {
        use hmac::{Hmac, Mac};
        let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(context.as_bytes());
        Secret::new(hex::encode(mac.finalize().into_bytes()))
    }

    pub fn seal(&self, context: &str, plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let ct = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: plaintext, aad: context.as_bytes() })
            .expect("AES-GCM encryption of an in-memory buffer does not fail");
        let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    pub fn open(&self, context: &str, sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        if sealed.len() < NONCE_LEN {
            return Err(SealError::Open);
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        self.cipher
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad: context.as_bytes() })
            .map_err(|_| SealError::Open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_binding() {
        let s = Sealer::from_key(&Secret::new(Sealer::generate_key())).unwrap();
        let sealed = s.seal("channel:a", b"xoxb-123");
        assert!(!sealed.windows(8).any(|w| w == b"xoxb-123"), "plaintext visible in the sealed bytes");
        assert_eq!(s.open("channel:a", &sealed).unwrap(), b"xoxb-123");
        assert!(s.open("channel:b", &sealed).is_err());
        let other = Sealer::from_key(&Secret::new(Sealer::generate_key())).unwrap();
        assert!(other.open("channel:a", &sealed).is_err());
    }

    #[test]
    fn derived_keys_are_stable_and_distinct() {
        let key = Secret::new(Sealer::generate_key());
        let a = Sealer::from_key(&key).unwrap();
        let b = Sealer::from_key(&key).unwrap();
        assert_eq!(a.derive_key("channel:web").expose(), b.derive_key("channel:web").expose());
        assert_ne!(a.derive_key("channel:web").expose(), a.derive_key("channel:web2").expose());
        assert_eq!(a.derive_key("channel:web").expose().len(), 64);
        let other = Sealer::from_key(&Secret::new(Sealer::generate_key())).unwrap();
        assert_ne!(a.derive_key("channel:web").expose(), other.derive_key("channel:web").expose());
    }

    #[test]
    fn rejects_short_keys() {
        assert!(Sealer::from_key(&Secret::new("abcd")).is_err());
    }
}
