//! Calls to the pod and the agent with the session's tokens (`sessionToken` on both,
//! `keyManagerToken` on the agent). A 401 re-authenticates once — one sign-in however many
//! calls saw the 401 together — and the call is tried again; a second 401 is the answer.

use crate::auth::{authenticate, error_text, AuthError, Tokens};
use crate::http::{proxy_refused, transport_error, Clients, Transport};
use crate::settings::{Settings, Which};
use patchbay_channel_core::backoff::parse_retry_after;
use reqwest::header::{HeaderName, HeaderValue, ACCEPT};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Mutex, RwLock};

/// A session and its number: a refresh replaces it only if nobody else did meanwhile.
#[derive(Debug)]
pub struct Session {
    pub tokens: Tokens,
    pub generation: u64,
    /// The tokens as header values, made once per session rather than once per call (None
    /// when a token is not a valid header value: the call then fails as it would have).
    session_header: Option<HeaderValue>,
    key_manager_header: Option<HeaderValue>,
}

impl Session {
    pub fn new(tokens: Tokens, generation: u64) -> Session {
        let header = |v: &str| {
            HeaderValue::from_str(v).ok().map(|mut h| {
                h.set_sensitive(true);
                h
            })
        };
        Session {
            session_header: header(tokens.session.expose()),
            key_manager_header: header(tokens.key_manager.expose()),
            tokens,
            generation,
        }
    }
}

static SESSION_TOKEN: HeaderName = HeaderName::from_static("sessiontoken");
static KEY_MANAGER_TOKEN: HeaderName = HeaderName::from_static("keymanagertoken");

/// An answer from the pod or the agent other than 401/407.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub retry_after: Option<Duration>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, String> {
        serde_json::from_slice(&self.body).map_err(|e| format!("unexpected answer: {e}"))
    }
    pub fn error_text(&self) -> String {
        error_text(&self.body)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum ApiError {
    /// Signing in (again) failed.
    Auth(AuthError),
    /// 401 even with a fresh session.
    Unauthorized(String),
    /// A proxy refused our credentials.
    Proxy(String),
    /// No answer: network, DNS, TLS, timeout.
    Network(String),
}

impl ApiError {
    pub fn message(&self) -> &str {
        match self {
            ApiError::Auth(e) => e.message(),
            ApiError::Unauthorized(m) | ApiError::Proxy(m) | ApiError::Network(m) => m,
        }
    }
}

/// What a request carries.
pub enum Body {
    None,
    Json(serde_json::Value),
    Multipart { boundary: String, bytes: Vec<u8> },
}

pub struct Api {
    pub settings: Settings,
    clients: Clients,
    session: RwLock<Option<Arc<Session>>>,
    refreshing: Mutex<()>,
}

impl Api {
    pub fn new(settings: Settings, clients: Clients) -> Api {
        Api { settings, clients, session: RwLock::new(None), refreshing: Mutex::new(()) }
    }

    /// The current session, signing in when there is none.
    pub async fn session(&self) -> Result<Arc<Session>, AuthError> {
        if let Some(s) = self.session.read().await.clone() {
            return Ok(s);
        }
        self.refresh(None).await
    }

    /// Signs in again unless the session already moved past `stale` (someone else refreshed).
    pub async fn refresh(&self, stale: Option<u64>) -> Result<Arc<Session>, AuthError> {
        let _one_at_a_time = self.refreshing.lock().await;
        let current = self.session.read().await.clone();
        if let Some(cur) = &current {
            if stale != Some(cur.generation) {
                return Ok(cur.clone());
            }
        }
        let tokens = authenticate(&self.settings, &self.clients).await?;
        let generation = current.map(|c| c.generation + 1).unwrap_or(1);
        let s = Arc::new(Session::new(tokens, generation));
        *self.session.write().await = Some(s.clone());
        Ok(s)
    }

    /// Signs in from scratch (for `check`), replacing the session on success.
    pub async fn sign_in_now(&self) -> Result<Arc<Session>, AuthError> {
        let _one_at_a_time = self.refreshing.lock().await;
        let tokens = authenticate(&self.settings, &self.clients).await?;
        let generation = self.session.read().await.as_ref().map(|c| c.generation + 1).unwrap_or(1);
        let s = Arc::new(Session::new(tokens, generation));
        *self.session.write().await = Some(s.clone());
        Ok(s)
    }

    /// Calls `path` on the pod or the agent; re-authenticates once on a 401.
    pub async fn call(&self, which: Which, method: reqwest::Method, path: &str, body: &Body, timeout: Duration) -> Result<Answer, ApiError> {
        let mut session = self.session().await.map_err(ApiError::Auth)?;
        let ep = self.settings.endpoint(which);
        let url = ep.url(path);
        for attempt in 0..2 {
            let mut req = self
                .clients
                .get(which)
                .request(method.clone(), &url)
                .timeout(timeout)
                .header(ACCEPT, HeaderValue::from_static("application/json"));
            req = match &session.session_header {
                Some(h) => req.header(&SESSION_TOKEN, h.clone()),
                None => req.header(&SESSION_TOKEN, session.tokens.session.expose()),
            };
            if which == Which::Agent {
                req = match &session.key_manager_header {
                    Some(h) => req.header(&KEY_MANAGER_TOKEN, h.clone()),
                    None => req.header(&KEY_MANAGER_TOKEN, session.tokens.key_manager.expose()),
                };
            }
            req = match body {
                Body::None => req,
                Body::Json(v) => req.json(v),
                Body::Multipart { boundary, bytes } => req
                    .header("content-type", format!("multipart/form-data; boundary={boundary}"))
                    .body(bytes.clone()),
            };
            let resp = match req.send().await {
                Ok(r) => r,
                Err(e) => {
                    return Err(match transport_error(ep, &e) {
                        Transport::ProxyAuth(m) => ApiError::Proxy(m),
                        Transport::Failed(m) | Transport::ProxyUnreachable(m) | Transport::Tls(m) => ApiError::Network(m),
                    })
                }
            };
            let status = resp.status().as_u16();
            if status == 407 {
                let m = ep
                    .proxy
                    .as_ref()
                    .map(|p| proxy_refused(ep, p))
                    .unwrap_or_else(|| format!("{} {url} answered 407: a proxy wants credentials; set proxy_username / proxy_password", method));
                return Err(ApiError::Proxy(m));
            }
            if status == 401 {
                let text = error_text(&resp.bytes().await.unwrap_or_default());
                if attempt == 0 {
                    tracing::info!(endpoint = ep.which.label(), path, "the session was refused (401); signing in again");
                    session = self.refresh(Some(session.generation)).await.map_err(ApiError::Auth)?;
                    continue;
                }
                return Err(ApiError::Unauthorized(format!(
                    "{method} {url} answered 401 ({text}) even right after signing in again: check that the service account {} \
                     is active and entitled to this call",
                    self.settings.bot_username
                )));
            }
            let retry_after = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(parse_retry_after);
            let body = resp.bytes().await.map_err(|e| ApiError::Network(format!("reading the answer of {method} {url}: {e}")))?;
            return Ok(Answer { status, retry_after, body: body.to_vec() });
        }
        unreachable!("the loop returns on its second pass")
    }
}
