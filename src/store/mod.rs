//! The store: everything patchbay must not forget. A trait, so the pipeline and the registry
//! never name the database; SQLite is the embedded default.
//!
//! Rules every implementation keeps, so that several replicas can share one database:
//! - no in-process lock is the source of truth: work is claimed in the database with a lease
//!   (`lease_owner`, `lease_until`) that expires, so a dead replica's work is taken over;
//! - completing or releasing claimed work checks the lease owner, so a replica that lost its
//!   lease cannot complete work another replica now holds;
//! - a message is claimable only when no earlier message of its conversation is still in the
//!   queue: that keeps replies in order within a conversation while conversations run
//!   concurrently.

pub mod sqlite;

use async_trait::async_trait;
use patchbay_channel_core::{Accepted, LogEntry, LogRange};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Db(String),
    #[error("the store is closed")]
    Closed,
    /// The lease on a claimed row expired and another owner may hold it now.
    #[error("the lease on this work was lost")]
    LeaseLost,
    #[error("{0}")]
    Conflict(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Where a record came from: config (declared as code, settings changed only there) or the
/// admin API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Config,
    Api,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Config => "config",
            Source::Api => "api",
        }
    }
    pub fn parse(s: &str) -> Source {
        if s == "config" {
            Source::Config
        } else {
            Source::Api
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct AssistantRecord {
    pub id: String,
    pub backend: String,
    /// Settings without secrets.
    pub settings: serde_json::Value,
    /// The secrets as a JSON object, sealed (AES-256-GCM).
    pub sealed_secrets: Option<Vec<u8>>,
    /// SHA-256 (hex) of the key the assistant presents to push replies.
    pub api_key_hash: Option<String>,
    pub source: Source,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ChannelRecord {
    pub id: String,
    pub kind: String,
    pub assistant: String,
    pub enabled: bool,
    pub hook_id: String,
    pub settings: serde_json::Value,
    pub sealed_secrets: Option<Vec<u8>>,
    pub source: Source,
    pub created_at: i64,
    pub updated_at: i64,
}

/// How a channel upsert treats what is already stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Upsert {
    /// Create only: `Conflict` when the id (or the hook id) is taken, so two concurrent
    /// creates of one id cannot both succeed.
    Insert,
    /// An admin edit of an existing channel: kind, assistant, settings and secrets. It never
    /// writes `enabled` (only [`Store::set_channel_enabled`] does) nor `hook_id`, so an edit
    /// made from a stale snapshot cannot undo a concurrent toggle or hook rotation.
    /// `Conflict` when the channel is gone.
    Edit,
    /// A new hook id for an existing channel, and nothing else.
    RotateHook,
    /// A config channel at start: keep the stored `enabled` and `hook_id` (the store is the
    /// truth for both once the channel exists), refresh the rest.
    KeepStateFromStore,
}

/// A message to put in the inbox.
#[derive(Clone, Debug)]
pub struct NewInbox {
    pub channel_id: String,
    pub event_id: String,
    pub conversation_id: String,
    /// The `Inbound` as JSON.
    pub payload: String,
    pub received_at: i64,
    /// A log entry to append with the message when it is new: (conversation, entry as JSON
    /// text), keyed by the event id.
    pub log: Option<(String, String)>,
}

/// A conversation-log entry appended by the commit that completes a message.
#[derive(Clone, Debug)]
pub struct NewLogEntry {
    pub channel_id: String,
    pub conversation: String,
    pub key: String,
    /// The entry as JSON text.
    pub body: String,
    pub at: i64,
}

/// What completing a message also did in its commit.
#[derive(Debug, Default)]
pub struct Completed {
    /// The conversation's next message, claimed along.
    pub next: Option<InboxItem>,
    /// The first of these replies, claimed for sending at once.
    pub sending: Option<OutboxItem>,
    /// The numbers the `logs` got, in order.
    pub logged: Vec<i64>,
}

#[derive(Clone, Debug)]
pub struct InboxItem {
    pub id: i64,
    pub channel_id: String,
    pub event_id: String,
    pub conversation_id: String,
    pub payload: String,
    pub attempts: u32,
    pub received_at: i64,
    /// Whether replies of this conversation were waiting in the outbox when the message was
    /// claimed: its answer must then queue behind them rather than be sent at once.
    pub replies_queued: bool,
}

/// Claims some of the messages an [`Store::inbox_put`] stores, in the same commit.
#[derive(Clone, Debug)]
pub struct PutClaim {
    pub owner: String,
    pub lease_until: i64,
    pub limit: usize,
}

/// A reply to put in the outbox.
#[derive(Clone, Debug)]
pub struct NewOutbox {
    pub reply_id: String,
    pub channel_id: String,
    pub conversation_id: String,
    /// The `OutboundReply` as JSON (its `attempt` is filled in when claimed).
    pub payload: String,
    pub received_at: i64,
    /// Not to be sent before this time (Unix ms).
    pub not_before: i64,
    /// Stored already leased to this owner until this time (Unix ms): a reply handed to a
    /// waiting request, kept until the request has it and delivered by the sender should the
    /// process die first.
    pub held_by: Option<(String, i64)>,
    /// Attempts already made (a reply tried at once, before it was queued), and the last
    /// one's error.
    pub attempts: u32,
    pub last_error: Option<String>,
    /// Already tried and failed for good: recorded as a dead letter with this reason, not
    /// queued.
    pub dead_letter: Option<String>,
}

#[derive(Clone, Debug)]
pub struct OutboxItem {
    pub id: i64,
    pub reply_id: String,
    pub channel_id: String,
    pub payload: String,
    pub attempts: u32,
    pub received_at: i64,
}

/// What a conversation id stands for, so a pushed reply finds its way.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ConversationRecord {
    pub id: String,
    pub channel_id: String,
    pub platform_conversation: String,
    pub thread: Option<String>,
    pub route: serde_json::Value,
    pub updated_at: i64,
}

/// One claim of work.
#[derive(Clone, Debug)]
pub struct Claim {
    pub owner: String,
    pub now: i64,
    pub lease_until: i64,
    pub limit: usize,
    /// Channels whose work waits (disabled): their rows are left alone.
    pub paused_channels: Vec<String>,
}

/// Claiming the next row of the same conversation when one is finished.
#[derive(Clone, Copy, Debug)]
pub struct ChainClaim {
    pub now: i64,
    pub lease_until: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Queue {
    Inbox,
    Outbox,
}

impl Queue {
    pub fn as_str(self) -> &'static str {
        match self {
            Queue::Inbox => "inbox",
            Queue::Outbox => "outbox",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct DeadLetter {
    pub id: i64,
    /// `inbox`: the assistant never answered; `outbox`: a reply was never delivered.
    pub queue: Queue,
    pub channel_id: String,
    pub conversation_id: String,
    pub reason: String,
    pub attempts: u32,
    pub failed_at: i64,
    /// The message or reply as stored (JSON).
    #[serde(skip)]
    pub payload: String,
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct QueueDepths {
    pub inbox: u64,
    pub outbox: u64,
    pub dead_letters: u64,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    // Registry.
    /// Bumped by every registry change; replicas poll it to see each other's changes.
    async fn registry_version(&self) -> StoreResult<i64>;
    async fn load_registry(&self) -> StoreResult<(i64, Vec<AssistantRecord>, Vec<ChannelRecord>)>;
    async fn put_assistant(&self, rec: AssistantRecord) -> StoreResult<()>;
    /// Create only: `Conflict` when an assistant with this id exists.
    async fn insert_assistant(&self, rec: AssistantRecord) -> StoreResult<()>;
    async fn delete_assistant(&self, id: &str) -> StoreResult<bool>;
    /// Inserts or updates; answers the record as stored.
    async fn put_channel(&self, rec: ChannelRecord, mode: Upsert) -> StoreResult<ChannelRecord>;
    async fn set_channel_enabled(&self, id: &str, enabled: bool) -> StoreResult<bool>;
    async fn delete_channel(&self, id: &str) -> StoreResult<bool>;

    // Inbox.
    /// Stores new messages in one commit, dropping those whose (channel, event id) was seen
    /// within the dedupe window (`dedupe_until` is when this sighting expires). With `claim`,
    /// the same commit claims up to `claim.limit` of the new ones whose conversation has
    /// nothing else in the inbox (the others are answered in their turn).
    /// A new message's `log` entry is appended in the same commit; the third list answers its
    /// number, for each message in order (`None`: no entry, or a duplicate). A message with a
    /// `log` entry is deduped by the log instead of the dedupe window: it is a repeat while an
    /// entry with its event id is among its conversation's last 64.
    #[allow(clippy::type_complexity)]
    async fn inbox_put(&self, items: Vec<NewInbox>, dedupe_until: i64, claim: Option<PutClaim>) -> StoreResult<(Vec<Accepted>, Vec<InboxItem>, Vec<Option<i64>>)>;
    async fn inbox_claim(&self, claim: Claim) -> StoreResult<Vec<InboxItem>>;
    /// Removes the answered message and queues its replies, atomically. With `next`, the
    /// same commit claims the next message of the conversation (when it is due and free)
    /// under the same owner, so a busy conversation does not wait for a new claim round. With
    /// `send`, it also claims the conversation's first queued reply under `send`'s owner when
    /// that is one of these replies (nothing of the conversation queued before them), so it
    /// can be sent at once. `remember` records (or refreshes) the conversation, for
    /// assistants that may push replies to it later. `logs` are appended to their
    /// conversation logs in the same commit (replies whose delivery is a log entry), and
    /// their numbers answered in order.
    #[allow(clippy::too_many_arguments)]
    async fn inbox_complete(
        &self,
        id: i64,
        owner: &str,
        replies: Vec<NewOutbox>,
        logs: Vec<NewLogEntry>,
        conversation_id: String,
        remember: Option<ConversationRecord>,
        next: Option<ChainClaim>,
        send: Option<(String, ChainClaim)>,
    ) -> StoreResult<Completed>;
    /// Gives the message back for another attempt no sooner than `next_at`.
    async fn inbox_release(&self, id: i64, owner: &str, next_at: i64, error: &str) -> StoreResult<()>;
    async fn inbox_dead(&self, id: i64, owner: &str, reason: &str) -> StoreResult<()>;

    // Outbox.
    /// Queues replies; a reply id already queued or delivered is not queued again.
    async fn outbox_put(&self, replies: Vec<NewOutbox>) -> StoreResult<usize>;
    async fn outbox_claim(&self, claim: Claim) -> StoreResult<Vec<OutboxItem>>;
    /// Removes the delivered reply; with `next`, claims the conversation's next reply in
    /// the same commit (as [`Store::inbox_complete`]).
    async fn outbox_done(&self, id: i64, owner: &str, next: Option<ChainClaim>) -> StoreResult<Option<OutboxItem>>;
    async fn outbox_release(&self, id: i64, owner: &str, next_at: i64, error: &str) -> StoreResult<()>;
    async fn outbox_dead(&self, id: i64, owner: &str, reason: &str) -> StoreResult<()>;
    /// Removes the replies held by `owner` (delivered another way: in a response), or with
    /// `deliver`, gives them to the sender instead.
    async fn outbox_unhold(&self, owner: String, deliver: bool) -> StoreResult<()>;

    // Conversations and dead letters.
    async fn conversation(&self, id: &str) -> StoreResult<Option<ConversationRecord>>;
    async fn dead_letters(&self, channel: Option<String>, limit: usize) -> StoreResult<Vec<DeadLetter>>;
    /// Puts a dead letter back in its queue for a fresh series of attempts.
    async fn dead_letter_retry(&self, id: i64) -> StoreResult<bool>;
    async fn dead_letter_delete(&self, id: i64) -> StoreResult<bool>;
    /// Records a message that was never queued (answered in its request) as a dead letter of
    /// the inbox, so it can be seen and retried like any other.
    async fn dead_letter_put(&self, item: NewInbox, attempts: u32, reason: String) -> StoreResult<()>;

    // Conversation logs (what kinds keep through `ConversationLog`: web chat replay and history).
    /// Appends an entry with the conversation's next sequence number and answers it; an entry
    /// with the same `key` in the same conversation answers its number and stores nothing.
    /// Numbers are never reused, even after pruning removed every entry.
    async fn log_append(&self, channel: &str, conversation: &str, key: Option<String>, body: String, at: i64)
        -> StoreResult<i64>;
    async fn log_read(&self, channel: &str, conversation: &str, range: LogRange, limit: usize) -> StoreResult<Vec<LogEntry>>;
    /// Removes a channel's entries appended before `before`.
    async fn log_prune(&self, channel: &str, before: i64) -> StoreResult<u64>;

    // Channel key/value spaces (what kinds keep through `SealedKv`: Slack's workspace tokens).
    // Values arrive sealed; `now` decides expiry. Deleting a channel removes its entries.
    async fn kv_get(&self, channel: &str, key: &str, now: i64) -> StoreResult<Option<Vec<u8>>>;
    async fn kv_put(&self, channel: &str, key: &str, sealed: Vec<u8>, expires_at: Option<i64>) -> StoreResult<()>;
    /// Removes the entry; answers whether an unexpired one was there (atomic).
    async fn kv_delete(&self, channel: &str, key: &str, now: i64) -> StoreResult<bool>;
    async fn kv_keys(&self, channel: &str, prefix: &str, now: i64) -> StoreResult<Vec<String>>;

    // Housekeeping.
    async fn prune(&self, now: i64) -> StoreResult<u64>;
    async fn depths(&self) -> StoreResult<QueueDepths>;
    /// Finishes pending writes and makes the database compact and durable.
    async fn close(&self);
}

/// The store as the [`patchbay_channel_core::ConversationLog`] kinds get through `BuildEnv`.
pub struct StoreLog(pub std::sync::Arc<dyn Store>);

#[async_trait]
impl patchbay_channel_core::ConversationLog for StoreLog {
    async fn append(
        &self,
        channel: &patchbay_channel_core::ChannelId,
        conversation: &str,
        key: Option<&str>,
        body: serde_json::Value,
    ) -> Result<i64, patchbay_channel_core::LogError> {
        self.0
            .log_append(channel.as_str(), conversation, key.map(str::to_owned), body.to_string(), patchbay_channel_core::now_ms())
            .await
            .map_err(|e| patchbay_channel_core::LogError::Unavailable(e.to_string()))
    }

    async fn read(
        &self,
        channel: &patchbay_channel_core::ChannelId,
        conversation: &str,
        range: LogRange,
        limit: usize,
    ) -> Result<Vec<LogEntry>, patchbay_channel_core::LogError> {
        self.0
            .log_read(channel.as_str(), conversation, range, limit)
            .await
            .map_err(|e| patchbay_channel_core::LogError::Unavailable(e.to_string()))
    }

    async fn prune(&self, channel: &patchbay_channel_core::ChannelId, before: i64) -> Result<u64, patchbay_channel_core::LogError> {
        self.0
            .log_prune(channel.as_str(), before)
            .await
            .map_err(|e| patchbay_channel_core::LogError::Unavailable(e.to_string()))
    }
}

/// The store as the [`patchbay_channel_core::SealedKv`] kinds get through `BuildEnv`: values
/// sealed with the encryption key, bound to ("kv", channel, key) so a sealed value cannot be
/// moved to another key or channel.
pub struct StoreKv {
    pub store: std::sync::Arc<dyn Store>,
    pub sealer: crate::seal::Sealer,
}

impl StoreKv {
    fn context(channel: &patchbay_channel_core::ChannelId, key: &str) -> String {
        format!("kv:{}:{key}", channel.as_str())
    }
}

fn kv_err(e: impl std::fmt::Display) -> patchbay_channel_core::KvError {
    patchbay_channel_core::KvError::Unavailable(e.to_string())
}

#[async_trait]
impl patchbay_channel_core::SealedKv for StoreKv {
    async fn get(&self, channel: &patchbay_channel_core::ChannelId, key: &str) -> Result<Option<patchbay_channel_core::Secret>, patchbay_channel_core::KvError> {
        let Some(sealed) = self.store.kv_get(channel.as_str(), key, patchbay_channel_core::now_ms()).await.map_err(kv_err)? else {
            return Ok(None);
        };
        let plain = self.sealer.open(&Self::context(channel, key), &sealed).map_err(kv_err)?;
        let text = String::from_utf8(plain).map_err(kv_err)?;
        Ok(Some(patchbay_channel_core::Secret::new(text)))
    }

    async fn put(
        &self,
        channel: &patchbay_channel_core::ChannelId,
        key: &str,
        value: &patchbay_channel_core::Secret,
        expires_at: Option<i64>,
    ) -> Result<(), patchbay_channel_core::KvError> {
        let sealed = self.sealer.seal(&Self::context(channel, key), value.expose().as_bytes());
        self.store.kv_put(channel.as_str(), key, sealed, expires_at).await.map_err(kv_err)
    }

    async fn delete(&self, channel: &patchbay_channel_core::ChannelId, key: &str) -> Result<bool, patchbay_channel_core::KvError> {
        self.store.kv_delete(channel.as_str(), key, patchbay_channel_core::now_ms()).await.map_err(kv_err)
    }

    async fn keys(&self, channel: &patchbay_channel_core::ChannelId, prefix: &str) -> Result<Vec<String>, patchbay_channel_core::KvError> {
        self.store.kv_keys(channel.as_str(), prefix, patchbay_channel_core::now_ms()).await.map_err(kv_err)
    }
}
