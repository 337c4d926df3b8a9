//! The bot's RSA key and the login JWT it signs: RS512, claims `sub` (the bot's username)
//! and `exp` (now + 240 s, in seconds), a fresh token for every authentication call — as both
//! BDKs do. The pod accepts an expiry at most five minutes ahead; 240 s leaves room for a
//! clock that runs a little ahead of the pod's.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA512};
use std::sync::Arc;

/// Seconds between signing a JWT and its expiry.
pub const JWT_LIFETIME_SECS: u64 = 240;

/// The bot's private key, parsed once. Never printed.
#[derive(Clone)]
pub struct RsaKey {
    pair: Arc<RsaKeyPair>,
}

impl std::fmt::Debug for RsaKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RsaKey({} bits)", self.pair.public().modulus_len() * 8)
    }
}

/// Literal `\n` (two characters) become newlines: keys pasted into a one-line value (an
/// environment variable, a JSON field) keep working.
pub fn normalize_pem(text: &str) -> String {
    text.replace("\\r\\n", "\n").replace("\\n", "\n").replace("\r\n", "\n").trim().to_owned()
}

/// The base64 body of the first PEM block labelled `label`, decoded.
pub fn pem_block(text: &str, label: &str) -> Option<Result<Vec<u8>, String>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin)? + begin.len();
    let Some(len) = text[start..].find(&end) else {
        return Some(Err(format!("has `{begin}` but no `{end}`")));
    };
    let body: String = text[start..start + len].chars().filter(|c| !c.is_whitespace()).collect();
    Some(STANDARD.decode(body).map_err(|_| format!("the `{label}` block is not valid base64")))
}

impl RsaKey {
    /// Parses an unencrypted RSA private key in PEM: PKCS#1 (`BEGIN RSA PRIVATE KEY`) or
    /// PKCS#8 (`BEGIN PRIVATE KEY`). The error says what was found instead, never the key.
    pub fn from_pem(text: &str) -> Result<RsaKey, String> {
        let text = normalize_pem(text);
        if text.contains("BEGIN ENCRYPTED PRIVATE KEY") || text.contains("Proc-Type: 4,ENCRYPTED") {
            return Err("is an encrypted key, which neither patchbay nor the Symphony BDKs read; decrypt it \
                        (`openssl pkey -in key.pem -out plain.pem`) and keep the file readable only by patchbay"
                .into());
        }
        let rejected = |e: ring::error::KeyRejected| match e.to_string().as_str() {
            "WrongAlgorithm" => "is not an RSA key; Symphony bots authenticate with RSA keys".to_owned(),
            "TooSmall" | "TooLarge" => "must be an RSA key of 2048 to 4096 bits (Symphony recommends 4096)".to_owned(),
            other => format!("could not be read as an RSA private key ({other})"),
        };
        let pair = if let Some(der) = pem_block(&text, "RSA PRIVATE KEY") {
            RsaKeyPair::from_der(&der?).map_err(rejected)?
        } else if let Some(der) = pem_block(&text, "PRIVATE KEY") {
            RsaKeyPair::from_pkcs8(&der?).map_err(rejected)?
        } else if text.contains("BEGIN PUBLIC KEY") || text.contains("BEGIN RSA PUBLIC KEY") {
            return Err("is a public key; give the bot's private key (the pod holds the public one)".into());
        } else if text.contains("BEGIN CERTIFICATE") {
            return Err("is a certificate, not a private key; for certificate authentication use bot_certificate_path or bot_certificate_content".into());
        } else {
            return Err("is not a PEM private key: expected `-----BEGIN RSA PRIVATE KEY-----` (PKCS#1) or \
                        `-----BEGIN PRIVATE KEY-----` (PKCS#8)"
                .into());
        };
        Ok(RsaKey { pair: Arc::new(pair) })
    }

    /// The public key as DER (PKCS#1 `RSAPublicKey`), what a pod verifies with.
    pub fn public_der(&self) -> Vec<u8> {
        self.pair.public().as_ref().to_vec()
    }

    /// A login JWT for `sub` expiring `JWT_LIFETIME_SECS` after `now_secs`.
    pub fn sign(&self, sub: &str, now_secs: u64) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS512","typ":"JWT"}"#);
        let claims = serde_json::json!({"sub": sub, "exp": now_secs + JWT_LIFETIME_SECS});
        let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
        let signing_input = format!("{header}.{payload}");
        let mut sig = vec![0u8; self.pair.public().modulus_len()];
        // Signing with a valid key pair and a buffer of the modulus' length cannot fail.
        self.pair
            .sign(&RSA_PKCS1_SHA512, &SystemRandom::new(), signing_input.as_bytes(), &mut sig)
            .expect("RSA signing");
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig))
    }
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The claims of a JWT-shaped token, read without verifying it (the session token is the
/// pod's; patchbay only looks for `canUseSimplifiedKeyDelivery`).
pub fn unverified_claims(token: &str) -> Option<serde_json::Value> {
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{UnparsedPublicKey, RSA_PKCS1_2048_8192_SHA512};

    const PKCS1: &str = include_str!("../../../tests/fixtures/symphony/bot_pkcs1.pem");
    const PKCS8: &str = include_str!("../../../tests/fixtures/symphony/bot_pkcs8.pem");

    fn verify(token: &str, public: &[u8]) -> serde_json::Value {
        let (input, sig) = token.rsplit_once('.').unwrap();
        let sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
        UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA512, public).verify(input.as_bytes(), &sig).expect("signature");
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(input.split('.').next().unwrap()).unwrap()).unwrap();
        assert_eq!(header["alg"], "RS512");
        unverified_claims(token).unwrap()
    }

    #[test]
    fn pkcs1_and_pkcs8_are_the_same_key_and_sign_rs512() {
        let a = RsaKey::from_pem(PKCS1).unwrap();
        let b = RsaKey::from_pem(PKCS8).unwrap();
        assert_eq!(a.public_der(), b.public_der());
        let token = a.sign("patchbay-bot", 1_700_000_000);
        let claims = verify(&token, &b.public_der());
        assert_eq!(claims, serde_json::json!({"sub": "patchbay-bot", "exp": 1_700_000_240u64}));
    }

    #[test]
    fn literal_backslash_n_is_normalized() {
        let one_line = PKCS8.trim().replace('\n', "\\n");
        assert!(!one_line.contains('\n'));
        assert!(RsaKey::from_pem(&one_line).is_ok());
    }

    #[test]
    fn wrong_material_is_named_without_echoing_it() {
        let public = include_str!("../../../tests/fixtures/symphony/bot_public.pem");
        assert!(RsaKey::from_pem(public).unwrap_err().contains("public key"));
        assert!(RsaKey::from_pem("hello").unwrap_err().contains("not a PEM private key"));
        let broken = PKCS8.replace("MII", "M*I");
        let e = RsaKey::from_pem(&broken).unwrap_err();
        assert!(e.contains("base64") && !e.contains("MII"), "{e}");
        let enc = "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----";
        assert!(RsaKey::from_pem(enc).unwrap_err().contains("encrypted"));
    }
}
