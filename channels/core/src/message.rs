//! What flows through the pipeline: inbound messages in, replies out.

use crate::ids::{ChannelId, ConversationId};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The person (or system) who wrote a message, as the platform names them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct User {
    pub id: String,
    #[serde(default)]
    pub name: String,
}

/// One normalized message from a platform.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Inbound {
    /// The platform's own id of the event (Slack `event_id`, Mattermost `post_id`, …): the
    /// dedupe key, unique within a channel.
    pub event_id: String,
    /// The platform's conversation (a channel, a room, a stream, a chat session).
    pub platform_conversation: String,
    /// The thread inside it, when the platform has threads and the message is in one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread: Option<String>,
    pub user: User,
    /// The text the assistant sees: bot mention or trigger word stripped.
    pub text: String,
    /// Whether the bot was addressed (mentioned, direct message, trigger word).
    #[serde(default)]
    pub addressed: bool,
    /// What the kind needs later to deliver a reply (ids, names, timestamps); opaque to the
    /// core and handed back unchanged in [`OutboundReply::route`].
    #[serde(default)]
    pub route: serde_json::Value,
    /// The platform's payload as received, for assistants that want more than the text.
    #[serde(default)]
    pub raw: RawPayload,
    /// When patchbay received it, in Unix milliseconds.
    pub received_at: i64,
}

/// A platform payload kept as JSON text: written into the stored message as it is and read
/// back as one string, not as a tree of maps and strings. Nothing on the way from the inbox
/// to the assistant looks inside it, and rebuilding the tree for every message read back
/// (and freeing it afterwards) was a tenth of the dispatcher's work under load.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RawPayload(Box<serde_json::value::RawValue>);

impl RawPayload {
    /// The JSON text of `value`.
    pub fn new(value: &serde_json::Value) -> RawPayload {
        // Writing a `Value` cannot fail: its keys are strings and its numbers finite.
        RawPayload(serde_json::value::to_raw_value(value).unwrap_or_else(|_| Self::null()))
    }

    fn null() -> Box<serde_json::value::RawValue> {
        serde_json::value::RawValue::from_string("null".into()).expect("`null` is JSON")
    }

    /// `text` as it is, if it is JSON.
    pub fn parse(text: &str) -> Option<RawPayload> {
        serde_json::value::RawValue::from_string(text.to_owned()).ok().map(RawPayload)
    }

    /// The payload as JSON text.
    pub fn json(&self) -> &str {
        self.0.get()
    }

    /// The payload as a JSON tree.
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::from_str(self.0.get()).unwrap_or_default()
    }
}

impl Default for RawPayload {
    fn default() -> Self {
        RawPayload(Self::null())
    }
}

impl From<serde_json::Value> for RawPayload {
    fn from(value: serde_json::Value) -> Self {
        RawPayload::new(&value)
    }
}

impl PartialEq for RawPayload {
    fn eq(&self, other: &Self) -> bool {
        self.json() == other.json()
    }
}

/// A button the user can press instead of typing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuickReply {
    pub title: String,
    pub payload: String,
}

/// A file or image the reply points to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Attachment {
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
}

/// What an assistant sends back. Text is markdown; each kind renders it in its platform's
/// format and limits.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reply {
    pub text: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quick_replies: Vec<QuickReply>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<Attachment>,
    /// Answer in this thread instead of the inbound's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread: Option<String>,
}

impl Reply {
    pub fn text(text: impl Into<String>) -> Self {
        Reply {
            text: text.into(),
            ..Default::default()
        }
    }
}

/// A reply on its way to a platform: the reply and where it goes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutboundReply {
    /// Stable across retries and restarts, so a receiver can recognise a repeat.
    pub reply_id: String,
    pub channel_id: ChannelId,
    pub conversation_id: ConversationId,
    pub platform_conversation: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread: Option<String>,
    /// The inbound's `route`, unchanged.
    #[serde(default)]
    pub route: serde_json::Value,
    pub reply: Reply,
    /// 1 on the first try.
    pub attempt: u32,
    /// The platform's id of the message a streamed draft of this reply was posted as (see
    /// [`crate::Channel::stream_start`]): `send` finishes that message by editing it instead
    /// of posting a new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draft: Option<String>,
}

/// What happened to a message handed to the inbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accepted {
    /// Durably stored; it will be answered.
    New,
    /// Seen before within the dedupe window; nothing more will happen.
    Duplicate,
}

/// What a waiting (inline-reply) hand-over produced.
#[derive(Clone, Debug, PartialEq)]
pub enum WaitOutcome {
    /// The assistant answered in time: answer the platform's request with these.
    Replies(Vec<Reply>),
    /// The assistant answered in time and the pipeline appended the replies to the
    /// conversation log in the commit that completed the message (kinds with
    /// [`crate::Channel::log_entry`]): each entry as logged, with its number in the log.
    Logged(Vec<(serde_json::Value, i64)>),
    /// Seen before; the first delivery answered it.
    Duplicate,
    /// Stored, but the assistant did not answer in time (or deferred its answer): the replies
    /// will go out through [`crate::Channel::send`] when they come.
    Pending,
}

#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    /// The message could not be stored; the platform must not be told it was received.
    #[error("the inbox could not store the message: {0}")]
    Unavailable(String),
    #[error("the service is shutting down")]
    ShuttingDown,
}

/// Where a kind hands what it received. Implemented by the service's durable pipeline.
#[async_trait]
pub trait Inbox: Send + Sync {
    /// Stores the message durably (or finds it a duplicate). Only after `Ok` may the kind
    /// acknowledge it to the platform.
    async fn accept(&self, channel: &ChannelId, inbound: Inbound) -> Result<Accepted, InboxError>;

    /// Stores several messages in one durable write, answering for each in order (a datafeed
    /// batch, a Socket Mode burst).
    async fn accept_batch(
        &self,
        channel: &ChannelId,
        inbound: Vec<Inbound>,
    ) -> Result<Vec<Accepted>, InboxError>;

    /// Stores the message and waits up to `timeout` for the assistant's replies, for platforms
    /// that take the answer in the response to their request.
    async fn accept_and_wait(
        &self,
        channel: &ChannelId,
        inbound: Inbound,
        timeout: Duration,
    ) -> Result<WaitOutcome, InboxError>;

    /// [`Inbox::accept`] for kinds that keep a conversation log (web chat): a new message's
    /// `entry` is appended to the log of `inbound.platform_conversation`, under the key
    /// `inbound.event_id`, in the same commit that stores the message, and its number
    /// answered (`None` for a duplicate: nothing is appended). One durable write instead of
    /// two, and the entry is in the log before any reply to it can be.
    async fn accept_logged(
        &self,
        channel: &ChannelId,
        inbound: Inbound,
        entry: serde_json::Value,
    ) -> Result<(Accepted, Option<i64>), InboxError> {
        let _ = entry;
        self.accept(channel, inbound).await.map(|a| (a, None))
    }

    /// [`Inbox::accept_and_wait`] with a log entry for the message, as [`Inbox::accept_logged`].
    async fn accept_logged_and_wait(
        &self,
        channel: &ChannelId,
        inbound: Inbound,
        entry: serde_json::Value,
        timeout: Duration,
    ) -> Result<WaitOutcome, InboxError> {
        let _ = entry;
        self.accept_and_wait(channel, inbound, timeout).await
    }

    /// Has the assistant answer within this request, for platforms that take a reply only in
    /// the response and offer the channel no way to deliver one later (Mattermost's inline
    /// mode without an incoming webhook). Nothing is queued — a reply that missed its request
    /// could not be delivered anyway — so the answer costs no durable write; a message whose
    /// answer fails or comes too late is recorded as a dead letter. Repeats are recognised
    /// among recent messages (in memory), not over the whole dedupe window.
    async fn answer_in_request(
        &self,
        channel: &ChannelId,
        inbound: Inbound,
        timeout: Duration,
    ) -> Result<WaitOutcome, InboxError> {
        self.accept_and_wait(channel, inbound, timeout).await
    }
}
