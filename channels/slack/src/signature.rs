//! Slack's request signing (`v0`): HMAC-SHA256 of `v0:{timestamp}:{raw body}` with the
//! app's Signing Secret, hex, sent as `X-Slack-Signature: v0=<hex>` beside
//! `X-Slack-Request-Timestamp`. Verified over the raw bytes, before anything is parsed.

use hmac::{Hmac, Mac};
use patchbay_channel_core::Secret;
use sha2::Sha256;

/// How far a request's timestamp may be from our clock, either way (Slack's docs and
/// `slack_sdk` use the absolute difference).
pub const WINDOW_SECS: i64 = 300;

/// Why a request was refused. The messages never contain the expected signature.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    MissingTimestamp,
    MissingSignature,
    BadTimestamp,
    Stale,
    Mismatch,
}

impl Refused {
    pub fn message(self) -> &'static str {
        match self {
            Refused::MissingTimestamp => "the X-Slack-Request-Timestamp header is missing",
            Refused::MissingSignature => "the X-Slack-Signature header is missing",
            Refused::BadTimestamp => "the X-Slack-Request-Timestamp header is not a number of seconds",
            Refused::Stale => "the request's timestamp is more than 5 minutes from this server's clock (a replay, or a clock to fix)",
            Refused::Mismatch => "the signature does not match: check that signing_secret is this app's Signing Secret",
        }
    }
}

fn mac(secret: &Secret, timestamp: &str, body: &[u8]) -> Hmac<Sha256> {
    let mut m = Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes()).expect("HMAC takes any key length");
    m.update(b"v0:");
    m.update(timestamp.as_bytes());
    m.update(b":");
    m.update(body);
    m
}

/// `v0=<hex>` for a request (what Slack sends; the tests' fake signs with it).
pub fn sign(secret: &Secret, timestamp: &str, body: &[u8]) -> String {
    format!("v0={}", hex::encode(mac(secret, timestamp, body).finalize().into_bytes()))
}

/// Checks a request's headers against its raw body at `now` (Unix seconds). The signature
/// is compared in constant time (`Mac::verify_slice`); the window is checked as well, so a
/// captured request cannot be replayed later.
pub fn verify(secret: &Secret, timestamp: Option<&str>, signature: Option<&str>, body: &[u8], now: i64) -> Result<(), Refused> {
    let timestamp = timestamp.ok_or(Refused::MissingTimestamp)?;
    let signature = signature.ok_or(Refused::MissingSignature)?;
    let ts: i64 = timestamp.trim().parse().map_err(|_| Refused::BadTimestamp)?;
    let presented = signature
        .strip_prefix("v0=")
        .and_then(|h| hex::decode(h).ok())
        .ok_or(Refused::Mismatch)?;
    mac(secret, timestamp, body).verify_slice(&presented).map_err(|_| Refused::Mismatch)?;
    if (now - ts).abs() > WINDOW_SECS {
        return Err(Refused::Stale);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slack_docs_vector() {
        // docs.slack.dev/authentication/verifying-requests-from-slack
        let secret = Secret::new("8f742231b10e8888abcd99yyyzzz85a5");
        let body = b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
        let expected = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503";
        assert_eq!(sign(&secret, "1531420618", body), expected);
        assert_eq!(verify(&secret, Some("1531420618"), Some(expected), body, 1531420618 + 10), Ok(()));
    }

    #[test]
    fn slack_morphism_vector() {
        let secret = Secret::new("fa2c05deeef5a4077494e89f54394de0");
        let sig = "v0=baa91ef62d346e56607bbdd278a8acd570b91226854f15a382f43d33be42f666";
        assert_eq!(verify(&secret, Some("1531420618"), Some(sig), b"test-body", 1531420620), Ok(()));
    }

    #[test]
    fn refusals() {
        let secret = Secret::new("s3cret");
        let sig = sign(&secret, "1000", b"{}");
        assert_eq!(verify(&secret, None, Some(&sig), b"{}", 1000), Err(Refused::MissingTimestamp));
        assert_eq!(verify(&secret, Some("1000"), None, b"{}", 1000), Err(Refused::MissingSignature));
        assert_eq!(verify(&secret, Some("soon"), Some(&sig), b"{}", 1000), Err(Refused::BadTimestamp));
        assert_eq!(verify(&secret, Some("1000"), Some(&sig), b"{ }", 1000), Err(Refused::Mismatch), "another body");
        assert_eq!(verify(&secret, Some("1001"), Some(&sig), b"{}", 1000), Err(Refused::Mismatch), "another timestamp");
        assert_eq!(verify(&Secret::new("other"), Some("1000"), Some(&sig), b"{}", 1000), Err(Refused::Mismatch));
        assert_eq!(verify(&secret, Some("1000"), Some("v1=00"), b"{}", 1000), Err(Refused::Mismatch));
        assert_eq!(verify(&secret, Some("1000"), Some("v0=zz"), b"{}", 1000), Err(Refused::Mismatch));
        // The window, both ways.
        assert_eq!(verify(&secret, Some("1000"), Some(&sig), b"{}", 1300), Ok(()));
        assert_eq!(verify(&secret, Some("1000"), Some(&sig), b"{}", 1301), Err(Refused::Stale));
        assert_eq!(verify(&secret, Some("1000"), Some(&sig), b"{}", 699), Err(Refused::Stale));
    }
}
