//! The traits a channel kind implements.

use crate::ids::{ChannelId, HookId};
use crate::kv::SealedKv;
use crate::log::ConversationLog;
use crate::message::{Inbound, Inbox, OutboundReply};
use crate::secret::Secret;
use crate::settings::SettingsError;
use crate::status::StatusHandle;
use actix_web::{http::StatusCode, web, HttpRequest, HttpResponse};
use async_trait::async_trait;
use futures_util::{future::LocalBoxFuture, StreamExt};
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A channel kind: a factory that turns validated settings into a running [`Channel`].
pub trait ChannelKind: Send + Sync + 'static {
    /// The `kind` name in config and in callback URLs (`/hooks/{kind}/{hook_id}`).
    fn name(&self) -> &'static str;

    /// Settings fields that are secrets: resolved from `file:`/`env:`, sealed at rest,
    /// never returned by the admin API.
    fn secret_fields(&self) -> &'static [&'static str];

    /// Validates `settings` (secrets already resolved to their values) and builds the
    /// channel. Errors name the field relative to the channel.
    fn build(&self, settings: &serde_json::Value, env: &BuildEnv) -> Result<Arc<dyn Channel>, SettingsError>;
}

/// What a kind may use while building a channel.
#[derive(Clone)]
pub struct BuildEnv {
    pub channel_id: ChannelId,
    pub hook_id: HookId,
    /// `{public_url}/hooks/{kind}/{hook_id}`: what the admin pastes into the platform.
    pub callback_url: String,
    /// A shared HTTP client (rustls, connection pool) for kinds without proxy settings.
    pub http: reqwest::Client,
    /// A durable per-conversation log (sequence-numbered, retention by the kind's choice),
    /// for kinds that replay missed messages or serve history (web chat).
    pub log: Arc<dyn ConversationLog>,
    /// A key of this channel alone, for what the kind signs itself (web chat's user tokens):
    /// 32 bytes as 64 hex digits, derived from the service's encryption key and the channel
    /// id, so it is stable across restarts and replicas and never stored.
    pub signing_key: Secret,
    /// A small key/value space of this channel whose values are sealed at rest (Slack's
    /// per-workspace tokens and OAuth states): see [`crate::kv`].
    pub kv: Arc<dyn SealedKv>,
}

/// What a hook handler gets besides the request.
#[derive(Clone)]
pub struct HookCtx {
    pub channel_id: ChannelId,
    /// The registry's current answer; a disabled channel must not reach the inbox.
    pub enabled: bool,
    pub inbox: Arc<dyn Inbox>,
    pub status: StatusHandle,
    /// The most a hook may read of a request body.
    pub body_limit: usize,
    /// The part of the path after `/hooks/{kind}/{hook_id}` (empty, or starting with `/`).
    pub subpath: String,
}

/// Delivery succeeded; what the platform called the message, when it said.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Delivered {
    pub platform_message_id: Option<String>,
}

/// Why a delivery failed, and whether trying again can help.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum SendError {
    /// Trying again cannot help (unknown channel, malformed reply): dead-letter it.
    #[error("permanent: {0}")]
    Permanent(String),
    /// Worth trying again (5xx, 429, timeout, connection reset), no sooner than `retry_after`.
    #[error("retryable: {message}")]
    Retryable {
        message: String,
        retry_after: Option<Duration>,
    },
    /// The platform rejected our credentials: the channel is marked failed and delivery is
    /// retried on a slow schedule, so fixing the credentials lets queued replies through.
    #[error("credentials rejected: {0}")]
    Unauthorized(String),
}

impl SendError {
    pub fn retryable(message: impl Into<String>) -> Self {
        SendError::Retryable {
            message: message.into(),
            retry_after: None,
        }
    }
}

/// One step of a credentials check.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CheckStep {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// What a check could verify, what failed, and what it cannot know without posting.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct CheckReport {
    pub ok: bool,
    pub steps: Vec<CheckStep>,
    /// Things that cannot be verified without side effects, said plainly.
    pub unverifiable: Vec<String>,
}

impl CheckReport {
    pub fn step(&mut self, name: impl Into<String>, ok: bool, detail: impl Into<String>) {
        self.steps.push(CheckStep {
            name: name.into(),
            ok,
            detail: detail.into(),
        });
        self.ok = self.steps.iter().all(|s| s.ok);
    }
}

/// A configured channel of some kind.
#[async_trait]
pub trait Channel: Send + Sync + 'static {
    /// Serves `/hooks/{kind}/{hook_id}[/…]`. Verification comes first, before any parsing
    /// that allocates on the sender's behalf; only a message in the inbox is acknowledged.
    ///
    /// actix request types are not `Send`, so this future is local to the worker thread.
    fn handle_hook<'a>(&'a self, ctx: HookCtx, req: HttpRequest, body: web::Payload) -> LocalBoxFuture<'a, HttpResponse>;

    /// Renders and delivers one reply.
    async fn send(&self, reply: &OutboundReply) -> Result<Delivered, SendError>;

    /// For kinds whose delivery *is* an entry in the conversation log (web chat: a socket
    /// that is down replays the log): the entry to append for this reply, in the log of
    /// `reply.platform_conversation` under the key `reply.reply_id`. The pipeline then
    /// appends it in the same commit that completes the message — one durable write instead
    /// of an append from `send` and a completion after it — and tells [`Channel::logged`] its
    /// number; `send` is not called for it. `None` (the default): replies go through `send`.
    fn log_entry(&self, _reply: &OutboundReply) -> Option<serde_json::Value> {
        None
    }

    /// Told that the pipeline logged `entry` (from [`Channel::log_entry`]) as number `seq` of
    /// its conversation, after the commit: the kind hands it to whoever is listening.
    fn logged(&self, _reply: &OutboundReply, _entry: serde_json::Value, _seq: i64) {}

    /// Asks the platform whether the credentials work, without posting anything.
    async fn check(&self) -> CheckReport;

    /// How often to show a typing indicator while the assistant works on an answer, for
    /// kinds whose platform has one (`None`: no indicator).
    fn typing_interval(&self) -> Option<Duration> {
        None
    }

    /// Shows that an answer to `inbound` is being written. Called once the assistant has been
    /// working for a moment (300 ms: a quicker answer needs no indicator) and then every
    /// `typing_interval` while it works; a failure is the kind's to log, never an error of the
    /// message.
    async fn typing(&self, _inbound: &Inbound) {}

    /// How often a reply that the assistant streams may be edited in place, for kinds whose
    /// platform can edit a posted message (`None`, the default: the finished reply is sent as
    /// usual). The pipeline posts a draft with [`Channel::stream_start`] once the assistant has
    /// been writing for a moment, edits it with [`Channel::stream_update`] at most this often,
    /// and hands the finished reply to [`Channel::send`] with [`OutboundReply::draft`] set, so
    /// the last edit is as durable as any reply.
    fn stream_interval(&self) -> Option<Duration> {
        None
    }

    /// Posts the text so far (`draft.reply.text`) of a reply still being written; answers the
    /// platform's id of the new message. Best effort: a failure ends streaming for this
    /// answer, and the finished reply is sent as usual.
    async fn stream_start(&self, _draft: &OutboundReply) -> Result<Delivered, SendError> {
        Err(SendError::Permanent("this channel cannot edit messages in place".into()))
    }

    /// Replaces the text of the draft message `message_id` with `draft.reply.text` (the kind
    /// shortens it to what one message can hold). Best effort, like `stream_start`.
    async fn stream_update(&self, _draft: &OutboundReply, _message_id: &str) -> Result<(), SendError> {
        Err(SendError::Permanent("this channel cannot edit messages in place".into()))
    }

    /// Removes a draft whose answer failed or came to nothing (a retried answer starts a new
    /// draft). Best effort: a failure is the kind's to log.
    async fn stream_discard(&self, _draft: &OutboundReply, _message_id: &str) {}

    /// The long-lived part, if the kind has one; run by the supervisor while enabled.
    fn connector(&self) -> Option<Arc<dyn Connector>> {
        None
    }
}

/// What a connector gets from the supervisor.
#[derive(Clone)]
pub struct ConnectorCtx {
    pub channel_id: ChannelId,
    pub inbox: Arc<dyn Inbox>,
    pub status: StatusHandle,
}

/// A long-lived connection (WebSocket, datafeed loop). `run` returns when `stop` is
/// cancelled (promptly: within a second) or when it gives up for good.
#[async_trait]
pub trait Connector: Send + Sync + 'static {
    async fn run(&self, ctx: ConnectorCtx, stop: CancellationToken);
}

/// The error body every patchbay endpoint uses: `{"error": {"code", "message", "field"?}}`.
pub fn error_response(status: StatusCode, code: &str, message: &str, field: Option<&str>) -> HttpResponse {
    let mut err = serde_json::json!({ "code": code, "message": message });
    if let Some(f) = field {
        err["field"] = serde_json::Value::String(f.to_owned());
    }
    HttpResponse::build(status).json(serde_json::json!({ "error": err }))
}

/// Reads a request body, refusing with 413 as soon as it grows past `limit` (so an
/// oversized body is never buffered whole).
pub async fn read_body(mut body: web::Payload, limit: usize) -> Result<web::Bytes, HttpResponse> {
    let mut buf = web::BytesMut::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| {
            error_response(StatusCode::BAD_REQUEST, "bad_body", &format!("could not read the request body: {e}"), None)
        })?;
        if buf.len() + chunk.len() > limit {
            return Err(error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                &format!("the request body is larger than the limit of {limit} bytes"),
                None,
            ));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}
