//! The `loopback` channel kind: a platform-free channel for tests and benchmarks, in the
//! spirit of Errbot's test backend. It proves the pipeline end to end before any real
//! platform exists, with the same contract every real kind implements.
//!
//! - `POST /hooks/loopback/{hook_id}` takes `{"id", "conversation", "thread"?, "user"?,
//!   "text", "wait"?}`. It answers `{"accepted": true, "duplicate": false}` once the
//!   message is in the inbox; with `"wait": true` it waits for the assistant and answers
//!   the replies too (the inline-reply path Mattermost and web chat use).
//! - Replies are POSTed as JSON to `deliver_url` when it is set (2xx delivered; 429 and 5xx
//!   retried, honouring `Retry-After`; other statuses permanent), else kept in memory and
//!   listed by `GET /hooks/loopback/{hook_id}/replies`.
//! - With `connector = true` it also runs a connector that does nothing but report
//!   `connected` while the supervisor runs it, so start/stop can be observed.

use actix_web::{http::StatusCode, web, HttpRequest, HttpResponse};
use async_trait::async_trait;
use futures_util::future::LocalBoxFuture;
use tokio_util::sync::CancellationToken;
use patchbay_channel_core::{
    channel::{error_response, read_body},
    backoff::parse_retry_after, parse_settings, Accepted, BuildEnv, Channel, ChannelKind,
    CheckReport, Connector, ConnectorCtx, Delivered, HookCtx, Inbound, OutboundReply, Secret,
    SendError, SettingsError, User, WaitOutcome,
};
use serde::Deserialize;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How many replies the in-memory log keeps when there is no `deliver_url`.
const MEMORY_LOG_CAPACITY: usize = 10_000;

pub struct LoopbackKind;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    /// Where replies are POSTed. Without it they are kept in memory.
    #[serde(default)]
    deliver_url: Option<String>,
    /// When set, hook requests must carry `Authorization: Bearer <token>`.
    #[serde(default)]
    token: Option<Secret>,
    /// Run a (do-nothing) connector so the supervisor's start/stop can be observed.
    #[serde(default)]
    connector: bool,
    /// How long a `"wait": true` request waits for the assistant, in milliseconds.
    #[serde(default = "default_wait_ms")]
    wait_timeout_ms: u64,
}

fn default_wait_ms() -> u64 {
    5_000
}

impl ChannelKind for LoopbackKind {
    fn name(&self) -> &'static str {
        "loopback"
    }

    fn secret_fields(&self) -> &'static [&'static str] {
        &["token"]
    }

    fn build(&self, settings: &serde_json::Value, env: &BuildEnv) -> Result<Arc<dyn Channel>, SettingsError> {
        let s: Settings = parse_settings(settings)?;
        if let Some(url) = &s.deliver_url {
            let parsed = reqwest::Url::parse(url)
                .map_err(|e| SettingsError::new("deliver_url", format!("is not a URL ({e}); give an absolute http(s) URL")))?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(SettingsError::new("deliver_url", "must be an http or https URL"));
            }
        }
        if s.token.as_ref().is_some_and(|t| t.is_empty()) {
            return Err(SettingsError::new("token", "is empty; remove it or give a value"));
        }
        Ok(Arc::new(Loopback {
            http: env.http.clone(),
            settings: s,
            memory: Mutex::new(VecDeque::new()),
        }))
    }
}

struct Loopback {
    http: reqwest::Client,
    settings: Settings,
    memory: Mutex<VecDeque<OutboundReply>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HookMessage {
    id: String,
    conversation: String,
    #[serde(default)]
    thread: Option<String>,
    #[serde(default)]
    user: Option<User>,
    text: String,
    #[serde(default)]
    wait: bool,
}

impl Loopback {
    fn authorized(&self, req: &HttpRequest) -> bool {
        let Some(token) = &self.settings.token else { return true };
        let presented = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        token.matches(presented)
    }

    async fn hook(&self, ctx: HookCtx, req: HttpRequest, body: web::Payload) -> HttpResponse {
        if !self.authorized(&req) {
            return error_response(
                StatusCode::UNAUTHORIZED,
                "bad_token",
                "the Authorization header does not carry this channel's token",
                Some("Authorization"),
            );
        }
        match (req.method().as_str(), ctx.subpath.as_str()) {
            ("POST", "") => {
                if !ctx.enabled {
                    return HttpResponse::Ok().json(serde_json::json!({"accepted": false, "reason": "channel disabled"}));
                }
                self.receive(ctx, body).await
            }
            ("GET", "/replies") => {
                let replies: Vec<OutboundReply> = self.memory.lock().unwrap().iter().cloned().collect();
                HttpResponse::Ok().json(serde_json::json!({ "replies": replies }))
            }
            _ => error_response(
                StatusCode::NOT_FOUND,
                "not_found",
                "the loopback channel serves POST on its callback URL and GET …/replies",
                None,
            ),
        }
    }

    async fn receive(&self, ctx: HookCtx, body: web::Payload) -> HttpResponse {
        let bytes = match read_body(body, ctx.body_limit).await {
            Ok(b) => b,
            Err(resp) => return resp,
        };
        let msg: HookMessage = match parse_message(&bytes) {
            Ok(m) => m,
            Err((field, message)) => {
                return error_response(StatusCode::BAD_REQUEST, "invalid_message", &message, field.as_deref())
            }
        };
        if msg.id.is_empty() {
            return error_response(StatusCode::BAD_REQUEST, "invalid_message", "`id` must not be empty: it is the dedupe key", Some("id"));
        }
        ctx.status.event_seen();
        let inbound = Inbound {
            event_id: msg.id,
            platform_conversation: msg.conversation,
            thread: msg.thread,
            user: msg.user.unwrap_or_default(),
            text: msg.text,
            addressed: true,
            route: serde_json::Value::Null,
            raw: std::str::from_utf8(&bytes).ok().and_then(patchbay_channel_core::RawPayload::parse).unwrap_or_default(),
            received_at: patchbay_channel_core::now_ms(),
        };
        if msg.wait {
            let timeout = Duration::from_millis(self.settings.wait_timeout_ms);
            return match ctx.inbox.accept_and_wait(&ctx.channel_id, inbound, timeout).await {
                Ok(WaitOutcome::Replies(replies)) => HttpResponse::Ok()
                    .json(serde_json::json!({"accepted": true, "duplicate": false, "replies": replies})),
                Ok(WaitOutcome::Duplicate) => HttpResponse::Ok().json(serde_json::json!({"accepted": true, "duplicate": true})),
                // (A loopback channel keeps no log, so nothing is answered as `Logged`.)
                Ok(WaitOutcome::Pending | WaitOutcome::Logged(_)) => HttpResponse::Ok()
                    .json(serde_json::json!({"accepted": true, "duplicate": false, "pending": true})),
                Err(e) => error_response(StatusCode::SERVICE_UNAVAILABLE, "inbox_unavailable", &e.to_string(), None),
            };
        }
        match ctx.inbox.accept(&ctx.channel_id, inbound).await {
            Ok(a) => HttpResponse::Ok().json(serde_json::json!({"accepted": true, "duplicate": a == Accepted::Duplicate})),
            Err(e) => error_response(StatusCode::SERVICE_UNAVAILABLE, "inbox_unavailable", &e.to_string(), None),
        }
    }
}

/// Parses the hook body, naming the offending field on error.
fn parse_message(bytes: &[u8]) -> Result<HookMessage, (Option<String>, String)> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| (None, format!("the body is not JSON: {e}")))?;
    parse_settings::<HookMessage>(&value).map_err(|e| {
        let field = (!e.field.is_empty()).then_some(e.field);
        (field, e.message)
    })
}

#[async_trait]
impl Channel for Loopback {
    fn handle_hook<'a>(&'a self, ctx: HookCtx, req: HttpRequest, body: web::Payload) -> LocalBoxFuture<'a, HttpResponse> {
        Box::pin(self.hook(ctx, req, body))
    }

    async fn send(&self, reply: &OutboundReply) -> Result<Delivered, SendError> {
        let Some(url) = &self.settings.deliver_url else {
            let mut log = self.memory.lock().unwrap();
            if log.len() == MEMORY_LOG_CAPACITY {
                log.pop_front();
            }
            log.push_back(reply.clone());
            return Ok(Delivered::default());
        };
        let resp = self
            .http
            .post(url)
            .timeout(Duration::from_secs(10))
            .json(reply)
            .send()
            .await
            .map_err(|e| SendError::retryable(format!("POST to deliver_url failed: {}", without_url(&e))))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(Delivered::default());
        }
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let text: String = resp.text().await.unwrap_or_default().chars().take(200).collect();
        let message = format!("deliver_url answered {status}: {text}");
        match status.as_u16() {
            429 | 500..=599 => Err(SendError::Retryable { message, retry_after }),
            401 | 403 => Err(SendError::Unauthorized(message)),
            _ => Err(SendError::Permanent(message)),
        }
    }

    async fn check(&self) -> CheckReport {
        let mut report = CheckReport::default();
        match &self.settings.deliver_url {
            None => report.step("deliver_url", true, "not set: replies are kept in memory"),
            Some(url) => match self.http.head(url).timeout(Duration::from_secs(5)).send().await {
                Ok(r) => report.step("deliver_url", true, format!("reachable, answered {}", r.status())),
                Err(e) => report.step("deliver_url", false, format!("unreachable: {}", without_url(&e))),
            },
        }
        report
            .unverifiable
            .push("whether deliver_url accepts replies: that needs a real delivery".into());
        report
    }

    fn connector(&self) -> Option<Arc<dyn Connector>> {
        self.settings.connector.then(|| Arc::new(IdleConnector) as Arc<dyn Connector>)
    }
}

/// reqwest errors print the URL, which may carry a token in its path; keep only the cause.
fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(url) = e.url() {
        s = s.replace(url.as_str(), "<deliver_url>");
    }
    s
}

struct IdleConnector;

#[async_trait]
impl Connector for IdleConnector {
    async fn run(&self, ctx: ConnectorCtx, stop: CancellationToken) {
        ctx.status.connected();
        stop.cancelled().await;
    }
}
