//! Signing in: a session token from the pod (RSA: `/login/pubkey/authenticate`; certificate:
//! `/sessionauth/v1/authenticate`) and a key-manager token (`/relay/pubkey/authenticate` or
//! `/keyauth/v1/authenticate`) — skipped when the session allows simplified key delivery
//! (claim `canUseSimplifiedKeyDelivery` and an agent of version 24.12 or later), in which
//! case `keyManagerToken` is sent empty, as the BDKs do.

use crate::http::{proxy_refused, transport_error, Clients, Transport};
use crate::jwt::{now_secs, unverified_claims};
use crate::settings::{Auth, Settings, Which};
use patchbay_channel_core::{backoff::parse_retry_after, Secret};
use std::time::Duration;

/// The tokens of one session.
#[derive(Clone, Debug)]
pub struct Tokens {
    pub session: Secret,
    pub key_manager: Secret,
    /// The key manager was skipped (simplified key delivery).
    pub skd: bool,
}

/// Which authentication call failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The session token (pod login, or session auth for certificates).
    Session,
    KeyManager,
}

impl Step {
    pub fn label(self) -> &'static str {
        match self {
            Step::Session => "session auth",
            Step::KeyManager => "key manager",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum AuthError {
    /// The endpoint refused the bot (401/403): a configuration problem an admin must fix.
    Rejected { step: Step, message: String },
    /// A proxy refused our credentials (407).
    Proxy { step: Step, message: String },
    /// The proxy cannot be reached (or cannot reach the endpoint): worth trying again.
    ProxyUnreachable { step: Step, message: String },
    /// Network trouble, 429 or 5xx: worth trying again.
    Unavailable { step: Step, message: String, retry_after: Option<Duration> },
    /// Any other answer (404: a wrong host or context, 400): needs an admin.
    Unexpected { step: Step, message: String },
}

impl AuthError {
    pub fn message(&self) -> &str {
        match self {
            AuthError::Rejected { message, .. }
            | AuthError::Proxy { message, .. }
            | AuthError::ProxyUnreachable { message, .. }
            | AuthError::Unavailable { message, .. }
            | AuthError::Unexpected { message, .. } => message,
        }
    }

    pub fn step(&self) -> Step {
        match self {
            AuthError::Rejected { step, .. }
            | AuthError::Proxy { step, .. }
            | AuthError::ProxyUnreachable { step, .. }
            | AuthError::Unavailable { step, .. }
            | AuthError::Unexpected { step, .. } => *step,
        }
    }

    pub fn is_retryable(&self) -> bool {
        matches!(self, AuthError::Unavailable { .. } | AuthError::ProxyUnreachable { .. })
    }
}

/// What an admin checks when an authentication endpoint answers 401.
fn rejected_help(s: &Settings, step: Step) -> String {
    match (&s.auth, step) {
        (Auth::Rsa(_), Step::Session) => format!(
            "the pod does not accept the bot's signed JWT: check that bot_username ({}) is the service account's username, \
             that the account's public key in the pod's admin portal matches the private key configured here, that the \
             account is active, and that this machine's clock is right (the JWT expires 240 s after signing)",
            s.bot_username
        ),
        (Auth::Rsa(_), Step::KeyManager) => format!(
            "the key manager does not accept the bot's signed JWT although the pod did: check key_manager_host (now {}) \
             and that the key manager knows the service account {}",
            s.key_manager.base, s.bot_username
        ),
        (Auth::Certificate(_), Step::Session) => format!(
            "session auth refused the client certificate: check that the certificate in bot_certificate_* is the one \
             registered for {} (its common name must be the username) and that it is signed by a CA the pod trusts",
            s.bot_username
        ),
        (Auth::Certificate(_), Step::KeyManager) => format!(
            "the key manager refused the client certificate although session auth accepted it: check key_manager_host (now {})",
            s.key_manager.base
        ),
    }
}

/// The pod's error body (`{"code", "message"}`), or the first 200 characters of whatever it was.
pub fn error_text(body: &[u8]) -> String {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(v) if v.get("message").and_then(|m| m.as_str()).is_some() => v["message"].as_str().unwrap_or_default().to_owned(),
        _ => String::from_utf8_lossy(body).chars().take(200).collect::<String>().trim().to_owned(),
    }
}

/// One authentication call: POST, JSON `{"token": jwt}` (RSA) or no body (certificate).
async fn post_token(s: &Settings, clients: &Clients, which: Which, path: &str, step: Step, jwt: Option<String>) -> Result<Secret, AuthError> {
    let ep = s.endpoint(which);
    let url = ep.url(path);
    let mut req = clients.get(which).post(&url).timeout(s.timeout).header("accept", "application/json");
    if let Some(jwt) = jwt {
        req = req.json(&serde_json::json!({"token": jwt}));
    }
    let what = format!("{} (POST {url})", step.label());
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => {
            return Err(match transport_error(ep, &e) {
                Transport::ProxyAuth(message) => AuthError::Proxy { step, message },
                Transport::ProxyUnreachable(message) => AuthError::ProxyUnreachable { step, message },
                Transport::Tls(message) => AuthError::Unexpected { step, message: format!("{what}: {message}") },
                Transport::Failed(message) => AuthError::Unavailable { step, message: format!("{}: {message}", step.label()), retry_after: None },
            })
        }
    };
    let status = resp.status().as_u16();
    let retry_after = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(parse_retry_after);
    let body = resp.bytes().await.unwrap_or_default();
    match status {
        200 => {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            match v.get("token").and_then(|t| t.as_str()) {
                Some(t) if !t.is_empty() => Ok(Secret::new(t)),
                _ => Err(AuthError::Unexpected { step, message: format!("{what} answered 200 without a token") }),
            }
        }
        407 => Err(AuthError::Proxy {
            step,
            message: ep.proxy.as_ref().map(|p| proxy_refused(ep, p)).unwrap_or_else(|| format!("{what} answered 407 (a proxy wants credentials): set proxy_username / proxy_password")),
        }),
        401 | 403 => Err(AuthError::Rejected {
            step,
            message: format!("{what} answered {status} ({}): {}", error_text(&body), rejected_help(s, step)),
        }),
        429 | 500..=599 => Err(AuthError::Unavailable { step, message: format!("{what} answered {status}: {}", error_text(&body)), retry_after }),
        _ => Err(AuthError::Unexpected {
            step,
            message: format!(
                "{what} answered {status} ({}): check {}host, port, scheme and context",
                error_text(&body),
                ep.which.prefix()
            ),
        }),
    }
}

/// Signs in: session token, then key-manager token unless simplified key delivery applies.
pub async fn authenticate(s: &Settings, clients: &Clients) -> Result<Tokens, AuthError> {
    let session = match &s.auth {
        Auth::Rsa(key) => {
            let jwt = key.sign(&s.bot_username, now_secs());
            post_token(s, clients, Which::Pod, "/login/pubkey/authenticate", Step::Session, Some(jwt)).await?
        }
        Auth::Certificate(_) => post_token(s, clients, Which::SessionAuth, "/sessionauth/v1/authenticate", Step::Session, None).await?,
    };
    if skd_allowed(&session) && agent_supports_skd(s, clients, &session).await {
        return Ok(Tokens { session, key_manager: Secret::new(""), skd: true });
    }
    let key_manager = match &s.auth {
        Auth::Rsa(key) => {
            // A fresh JWT for every call, as the BDKs do.
            let jwt = key.sign(&s.bot_username, now_secs());
            post_token(s, clients, Which::KeyManager, "/relay/pubkey/authenticate", Step::KeyManager, Some(jwt)).await?
        }
        Auth::Certificate(_) => post_token(s, clients, Which::KeyManager, "/keyauth/v1/authenticate", Step::KeyManager, None).await?,
    };
    Ok(Tokens { session, key_manager, skd: false })
}

/// The session token says the bot may skip the key manager.
fn skd_allowed(session: &Secret) -> bool {
    unverified_claims(session.expose())
        .and_then(|c| c.get("canUseSimplifiedKeyDelivery").and_then(|v| v.as_bool()))
        .unwrap_or(false)
}

/// `GET /agent/v1/info` says `Agent-24.12` or later. Any failure: no (use the key manager).
async fn agent_supports_skd(s: &Settings, clients: &Clients, session: &Secret) -> bool {
    let req = clients
        .get(Which::Agent)
        .get(s.agent.url("/agent/v1/info"))
        .timeout(s.timeout)
        .header("sessionToken", session.expose());
    let Ok(resp) = req.send().await else { return false };
    if !resp.status().is_success() {
        return false;
    }
    let v: serde_json::Value = resp.json().await.unwrap_or_default();
    v.get("version").and_then(|v| v.as_str()).is_some_and(version_at_least_24_12)
}

/// `Agent-24.12.1` → true; `Agent-24.9.0` → false.
pub fn version_at_least_24_12(v: &str) -> bool {
    let Some(rest) = v.strip_prefix("Agent-") else { return false };
    let mut parts = rest.split('.');
    let major = parts.next().and_then(|p| p.parse::<u32>().ok());
    let minor = parts.next().and_then(|p| p.parse::<u32>().ok());
    match (major, minor) {
        (Some(ma), Some(mi)) => (ma, mi) >= (24, 12),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_versions() {
        assert!(version_at_least_24_12("Agent-24.12.0"));
        assert!(version_at_least_24_12("Agent-25.1.3-SNAPSHOT"));
        assert!(!version_at_least_24_12("Agent-24.9.1"));
        assert!(!version_at_least_24_12("Agent-2.57.0"));
        assert!(!version_at_least_24_12("24.12.0"));
    }

    #[test]
    fn skd_claim_is_read_from_the_session_token() {
        use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
        let t = |claims: &str| Secret::new(format!("e30.{}.sig", URL_SAFE_NO_PAD.encode(claims)));
        assert!(skd_allowed(&t(r#"{"canUseSimplifiedKeyDelivery":true}"#)));
        assert!(!skd_allowed(&t(r#"{"canUseSimplifiedKeyDelivery":false}"#)));
        assert!(!skd_allowed(&Secret::new("opaque-token")));
    }

    #[test]
    fn pod_errors_are_read() {
        assert_eq!(error_text(br#"{"code":401,"message":"Invalid session"}"#), "Invalid session");
        assert_eq!(error_text(b"Bad Gateway"), "Bad Gateway");
    }
}
