//! Assistants: the bots that answer. A backend turns one request into a stream of events, so
//! that streaming backends (deltas as the text grows) and one-shot backends share one trait.

pub mod echo;
pub mod openai;
pub mod webhook;

use async_trait::async_trait;
use futures_util::stream::BoxStream;
use patchbay_channel_core::{Reply, SettingsError, User};
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;

/// What an assistant is asked: the webhook contract's request body.
#[derive(Clone, Debug, Serialize)]
pub struct AssistantRequest {
    /// The message's stable id (the same on every attempt).
    pub id: String,
    pub channel: ChannelRef,
    pub conversation: ConversationRef,
    pub user: User,
    pub text: String,
    pub addressed: bool,
    /// RFC 3339.
    pub received_at: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct ChannelRef {
    pub id: String,
    pub kind: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct ConversationRef {
    pub id: String,
    pub thread_id: Option<String>,
}

/// One step of an answer.
#[derive(Clone, Debug, PartialEq)]
pub enum AssistantEvent {
    /// The reply being written grew to this text (streaming backends: `openai`); channels
    /// that can edit a message in place show it, the others wait for the `Reply`.
    Partial(String),
    /// A finished reply.
    Reply(Reply),
}

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum AssistantError {
    /// Worth another attempt (timeout, 5xx, 429), no sooner than `retry_after`.
    #[error("{message}")]
    Retryable {
        message: String,
        retry_after: Option<Duration>,
    },
    /// Another attempt cannot help (the assistant rejected the request).
    #[error("{0}")]
    Permanent(String),
}

/// An answer in progress. A stream that ends without a `Reply` means "no reply now" (the
/// assistant may push one later through the conversations API).
pub type AssistantStream = BoxStream<'static, Result<AssistantEvent, AssistantError>>;

#[async_trait]
pub trait Assistant: Send + Sync + 'static {
    async fn respond(&self, request: AssistantRequest) -> AssistantStream;
}

/// The backend names and the secret fields each one has.
pub fn secret_fields(backend: &str) -> &'static [&'static str] {
    match backend {
        "webhook" => &["secret", "api_key"],
        "openai" => &["upstream_api_key", "api_key"],
        _ => &["api_key"],
    }
}

/// What a backend may use besides its settings.
#[derive(Clone)]
pub struct AssistantEnv {
    pub http: reqwest::Client,
    /// Where backends that remember conversations (`openai`) keep their turns.
    pub log: Arc<dyn patchbay_channel_core::ConversationLog>,
}

/// Builds the backend of assistant `id` from its settings (secrets resolved). Errors name
/// the field.
pub fn build(
    id: &str,
    backend: &str,
    settings: &serde_json::Value,
    env: &AssistantEnv,
) -> Result<Arc<dyn Assistant>, SettingsError> {
    match backend {
        "echo" => echo::build(settings),
        "webhook" => webhook::build(settings, &env.http),
        "openai" => openai::build(id, settings, &env.http, env.log.clone()),
        other => Err(SettingsError::new(
            "backend",
            format!("unknown backend `{other}`: use echo, webhook or openai"),
        )),
    }
}
