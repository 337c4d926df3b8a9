//! The Web API calls patchbay makes (`{api_url}/{method}`), with Slack's answers classified.
//!
//! Slack answers HTTP 200 with `{"ok": false, "error": "…"}` for almost every failure; the
//! only meaningful statuses are 429 (with `Retry-After`, for that method in that workspace)
//! and 5xx. A 429 blocks the method for the workspace until `Retry-After` has passed: calls
//! in between fail at once, without reaching Slack, and say how long to wait.

use patchbay_channel_core::{backoff::parse_retry_after, Secret, SendError};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// Why a call failed.
#[derive(Clone, Debug, PartialEq)]
pub enum ApiError {
    /// The token is not (or no longer) valid: `invalid_auth`, `token_revoked`, …
    Unauthorized { code: String, message: String },
    /// 429, 5xx, `ratelimited`, `internal_error`, timeouts: worth trying again.
    Retryable { code: String, message: String, retry_after: Option<Duration> },
    /// Trying again cannot help (`channel_not_found`, `not_in_channel`, `missing_scope`, …).
    Permanent { code: String, message: String },
}

impl ApiError {
    pub fn message(&self) -> &str {
        match self {
            ApiError::Unauthorized { message, .. } | ApiError::Permanent { message, .. } | ApiError::Retryable { message, .. } => message,
        }
    }
    /// Slack's error code (`invalid_auth`), or `http_…`/`network` for transport failures.
    pub fn code(&self) -> &str {
        match self {
            ApiError::Unauthorized { code, .. } | ApiError::Permanent { code, .. } | ApiError::Retryable { code, .. } => code,
        }
    }
}

impl From<ApiError> for SendError {
    fn from(e: ApiError) -> SendError {
        match e {
            ApiError::Unauthorized { message, .. } => SendError::Unauthorized(message),
            ApiError::Retryable { message, retry_after, .. } => SendError::Retryable { message, retry_after },
            ApiError::Permanent { message, .. } => SendError::Permanent(message),
        }
    }
}

/// What an `ok: false` error means and what to do about it.
pub fn classify(method: &str, code: &str, body: &serde_json::Value, retry_after: Option<Duration>) -> ApiError {
    let said = format!("Slack refused {method}: {code}");
    let code_s = code.to_owned();
    match code {
        "invalid_auth" | "not_authed" | "token_revoked" | "account_inactive" | "token_expired" => ApiError::Unauthorized {
            code: code_s,
            message: format!(
                "{said}: the token no longer works (revoked, expired, or the app was uninstalled); reinstall the app and paste the new \
                 token, or install it again through the channel's /install page"
            ),
        },
        "ratelimited" | "rate_limited" | "internal_error" | "service_unavailable" | "fatal_error" | "request_timeout" => {
            ApiError::Retryable { code: code_s, message: said, retry_after }
        }
        "not_in_channel" => ApiError::Permanent {
            code: code_s,
            message: format!("{said}: invite the bot to the channel (/invite @yourbot), or add the chat:write.public scope"),
        },
        "channel_not_found" => ApiError::Permanent {
            code: code_s,
            message: format!("{said}: the channel does not exist in this workspace, or the bot cannot see it (private channels need an invite)"),
        },
        "missing_scope" => {
            let needed = body.get("needed").and_then(|v| v.as_str()).unwrap_or("?");
            ApiError::Permanent {
                code: code_s,
                message: format!("{said}: the app lacks the {needed} scope; add it under OAuth & Permissions and reinstall the app"),
            }
        }
        "is_archived" => ApiError::Permanent { code: code_s, message: format!("{said}: the channel is archived") },
        _ => ApiError::Permanent { code: code_s, message: said },
    }
}

/// `auth.test`: who the token is.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct AuthTest {
    #[serde(default)]
    pub url: String,
    #[serde(default)]
    pub team: String,
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub team_id: String,
    #[serde(default)]
    pub user_id: String,
    #[serde(default)]
    pub bot_id: Option<String>,
    #[serde(default)]
    pub enterprise_id: Option<String>,
}

pub struct Api {
    base: String,
    http: reqwest::Client,
    timeout: Duration,
    /// Calls in flight (`api_concurrency`). The pipeline sends up to `pipeline.concurrency`
    /// replies at once, and the HTTP client would open (and keep, for its idle timeout) one
    /// connection for each: measured, 237 connections to the Web API and ~9 MB of buffers
    /// under the benchmark's load, before TLS.
    in_flight: tokio::sync::Semaphore,
    /// (workspace, method) → no call before this instant (a 429's `Retry-After`).
    blocked: Mutex<HashMap<(String, &'static str), Instant>>,
    /// Each method's URL, parsed once: parsing (with the host's IDNA check) was ~2% of the
    /// CPU per reply under load.
    urls: Mutex<HashMap<&'static str, reqwest::Url>>,
}

impl Api {
    /// `concurrency`: calls in flight at once (at least 1); more wait for a turn.
    pub fn new(base: &str, http: reqwest::Client, timeout: Duration, concurrency: usize) -> Api {
        Api {
            base: base.trim_end_matches('/').to_owned(),
            http,
            timeout,
            in_flight: tokio::sync::Semaphore::new(concurrency.max(1)),
            blocked: Mutex::new(HashMap::new()),
            urls: Mutex::new(HashMap::new()),
        }
    }

    /// A POST to `method`. A URL that does not parse is handed to the client as text, so the
    /// call fails with the client's own error, as any other.
    fn post(&self, method: &'static str) -> reqwest::RequestBuilder {
        if let Some(url) = self.urls.lock().unwrap().get(method) {
            return self.http.post(url.clone());
        }
        let text = self.url(method);
        match reqwest::Url::parse(&text) {
            Ok(url) => {
                self.urls.lock().unwrap().insert(method, url.clone());
                self.http.post(url)
            }
            Err(_) => self.http.post(text),
        }
    }

    pub fn url(&self, method: &str) -> String {
        format!("{}/{method}", self.base)
    }

    /// How long `method` is still blocked for `scope` by an earlier 429.
    pub fn blocked_for(&self, scope: &str, method: &'static str) -> Option<Duration> {
        let mut b = self.blocked.lock().unwrap();
        if b.is_empty() {
            return None;
        }
        let key = (scope.to_owned(), method);
        match b.get(&key) {
            Some(until) if *until > Instant::now() => Some(*until - Instant::now()),
            Some(_) => {
                b.remove(&key);
                None
            }
            None => None,
        }
    }

    fn block(&self, scope: &str, method: &'static str, wait: Duration) {
        let mut b = self.blocked.lock().unwrap();
        if b.len() > 10_000 {
            let now = Instant::now();
            b.retain(|_, until| *until > now);
        }
        b.insert((scope.to_owned(), method), Instant::now() + wait);
    }

    /// POSTs `body` as JSON with `Authorization: Bearer`; answers the `ok: true` body.
    /// `scope` is the workspace the 429 bookkeeping is kept for.
    pub async fn call(&self, scope: &str, method: &'static str, token: &Secret, body: &serde_json::Value) -> Result<serde_json::Value, ApiError> {
        self.send(scope, method, || self.post(method).bearer_auth(token.expose()).json(body)).await
    }

    /// POSTs a form with HTTP Basic client authentication (`oauth.v2.access`).
    pub async fn call_basic(&self, method: &'static str, client_id: &str, client_secret: &Secret, form: &[(&str, &str)]) -> Result<serde_json::Value, ApiError> {
        self.send("", method, || self.post(method).basic_auth(client_id, Some(client_secret.expose())).form(form)).await
    }

    /// `request` is built once the call has its turn: a call waiting for one holds nothing
    /// but its arguments.
    async fn send(&self, scope: &str, method: &'static str, request: impl FnOnce() -> reqwest::RequestBuilder) -> Result<serde_json::Value, ApiError> {
        if let Some(wait) = self.blocked_for(scope, method) {
            return Err(ApiError::Retryable {
                code: "ratelimited".into(),
                message: format!("Slack asked patchbay to wait before calling {method} again ({} ms left)", wait.as_millis()),
                retry_after: Some(wait),
            });
        }
        // The wait for a turn counts against the call's timeout, so a slow Slack cannot make
        // a reply wait longer than `send_timeout` in all.
        let deadline = Instant::now() + self.timeout;
        let turn = tokio::time::timeout_at(deadline, self.in_flight.acquire()).await;
        let left = deadline.saturating_duration_since(Instant::now());
        // A turn that came only as the time ran out (the call before it gave up at the same
        // instant) is no turn: a request with no time left could only fail as a timeout.
        let (Ok(Ok(_turn)), false) = (turn, left.is_zero()) else {
            return Err(ApiError::Retryable {
                code: "busy".into(),
                message: format!(
                    "no call of {method} could start within send_timeout_ms: all of this channel's Web API calls (api_concurrency) were in flight"
                ),
                retry_after: None,
            });
        };
        let resp = request().timeout(left).send().await.map_err(|e| ApiError::Retryable {
            code: "network".into(),
            message: describe(method, &e),
            retry_after: None,
        })?;
        let status = resp.status();
        let retry_after = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(parse_retry_after);
        if status.as_u16() == 429 {
            let wait = retry_after.unwrap_or(Duration::from_secs(1));
            self.block(scope, method, wait);
            return Err(ApiError::Retryable {
                code: "ratelimited".into(),
                message: format!("Slack rate-limited {method} (HTTP 429, Retry-After {} s)", wait.as_secs_f64()),
                retry_after: Some(wait),
            });
        }
        let text = resp.text().await.map_err(|e| ApiError::Retryable {
            code: "network".into(),
            message: describe(method, &e),
            retry_after: None,
        })?;
        if status.is_server_error() {
            return Err(ApiError::Retryable {
                code: format!("http_{}", status.as_u16()),
                message: format!("Slack answered {method} with HTTP {status}"),
                retry_after,
            });
        }
        if !status.is_success() {
            let code = format!("http_{}", status.as_u16());
            let message = format!("Slack answered {method} with HTTP {status}: check api_url ({})", self.base);
            return Err(if status.as_u16() == 401 {
                ApiError::Unauthorized { code, message }
            } else {
                ApiError::Permanent { code, message }
            });
        }
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|_| ApiError::Retryable {
            code: "bad_response".into(),
            message: format!("Slack's answer to {method} is not JSON: check api_url ({})", self.base),
            retry_after: None,
        })?;
        if v.get("ok").and_then(|o| o.as_bool()) == Some(true) {
            return Ok(v);
        }
        let code = v.get("error").and_then(|e| e.as_str()).unwrap_or("unknown_error").to_owned();
        if code == "ratelimited" || code == "rate_limited" {
            if let Some(wait) = retry_after {
                self.block(scope, method, wait);
            }
        }
        Err(classify(method, &code, &v, retry_after))
    }

    pub async fn auth_test(&self, token: &Secret) -> Result<AuthTest, ApiError> {
        let v = self.call("", "auth.test", token, &serde_json::json!({})).await?;
        serde_json::from_value(v).map_err(|e| ApiError::Retryable {
            code: "bad_response".into(),
            message: format!("Slack's answer to auth.test is not what was expected: {e}"),
            retry_after: None,
        })
    }

    /// `apps.connections.open` with the app-level token: a fresh Socket Mode URL.
    pub async fn connections_open(&self, app_token: &Secret) -> Result<String, ApiError> {
        let v = self.call("app", "apps.connections.open", app_token, &serde_json::json!({})).await?;
        v.get("url").and_then(|u| u.as_str()).map(str::to_owned).ok_or_else(|| ApiError::Retryable {
            code: "bad_response".into(),
            message: "Slack's answer to apps.connections.open has no url".into(),
            retry_after: None,
        })
    }
}

/// A transport error in words, with its causes (no URL query, no token: neither is in them).
fn describe(method: &str, e: &reqwest::Error) -> String {
    use std::error::Error;
    if e.is_timeout() {
        return format!("Slack did not answer {method} in time");
    }
    let mut parts = Vec::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        parts.push(s.to_string());
        cur = s.source();
    }
    let detail = if parts.is_empty() { e.to_string() } else { parts.join(": ") };
    format!("calling Slack's {method} failed: {detail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_429_blocks_one_method_of_one_workspace_until_retry_after() {
        let api = Api::new("http://127.0.0.1:9/api", reqwest::Client::new(), Duration::from_secs(1), 4);
        api.block("T1", "chat.postMessage", Duration::from_secs(5));
        assert_eq!(api.blocked_for("T1", "chat.postMessage"), Some(Duration::from_secs(5)));
        assert_eq!(api.blocked_for("T1", "chat.update"), None, "other methods of the workspace are not restricted");
        assert_eq!(api.blocked_for("T2", "chat.postMessage"), None, "nor the method for other workspaces");
        let e = api.call("T1", "chat.postMessage", &Secret::new("xoxb-1"), &serde_json::json!({})).await.unwrap_err();
        assert!(matches!(e, ApiError::Retryable { retry_after: Some(_), .. }), "refused without a request: {e:?}");
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(api.blocked_for("T1", "chat.postMessage"), None);
    }

    #[tokio::test]
    async fn calls_beyond_api_concurrency_wait_for_a_turn_within_the_timeout() {
        // A Slack that takes connections and never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                held.push(s);
            }
        });
        let api = Api::new(&format!("http://{addr}/api"), reqwest::Client::new(), Duration::from_millis(300), 1);
        let token = Secret::new("xoxb-1");
        let body = serde_json::json!({});

        // The one turn is taken (as by a call in flight) for longer than the timeout: the
        // call waits, gives up as busy, and never reaches Slack.
        let held = api.in_flight.acquire().await.unwrap();
        let e = api.call("T1", "chat.postMessage", &token, &body).await.unwrap_err();
        assert_eq!(e.code(), "busy", "{e:?}");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 0, "the call never started");

        // Given back well within the timeout, the turn goes to the waiting call, which then
        // reaches Slack and times out there.
        let waiting = api.call("T1", "chat.postMessage", &token, &body);
        let give_back = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(held);
        };
        let (e, ()) = tokio::join!(waiting, give_back);
        assert_eq!(e.unwrap_err().code(), "network");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1, "one connection, from the call that got its turn");
    }

    #[test]
    fn errors_are_classified() {
        let v = serde_json::json!({});
        assert!(matches!(classify("chat.postMessage", "not_in_channel", &v, None), ApiError::Permanent { .. }));
        assert!(matches!(classify("chat.postMessage", "channel_not_found", &v, None), ApiError::Permanent { .. }));
        for c in ["invalid_auth", "token_revoked", "account_inactive"] {
            assert!(matches!(classify("chat.postMessage", c, &v, None), ApiError::Unauthorized { .. }), "{c}");
        }
        for c in ["ratelimited", "internal_error", "service_unavailable"] {
            assert!(matches!(classify("chat.postMessage", c, &v, None), ApiError::Retryable { .. }), "{c}");
        }
        let e = classify("chat.postMessage", "missing_scope", &serde_json::json!({"needed": "chat:write"}), None);
        assert!(e.message().contains("chat:write"), "{e:?}");
    }
}
