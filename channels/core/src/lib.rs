//! The contract every patchbay channel kind implements, and the types the kinds share.
//!
//! A kind (Mattermost, Slack, …) lives in its own crate under `channels/<kind>` and depends
//! only on this crate. It knows its platform's wire format and nothing about the store, the
//! pipeline or other kinds: it hands normalized [`Inbound`] messages to an [`Inbox`] and
//! renders [`OutboundReply`]s back to its platform.

pub mod backoff;
pub mod channel;
pub mod ids;
pub mod kv;
pub mod log;
pub mod message;
pub mod secret;
pub mod settings;
pub mod status;
pub mod upgrade;

pub use channel::{
    BuildEnv, Channel, ChannelKind, CheckReport, CheckStep, Connector, ConnectorCtx, Delivered,
    HookCtx, SendError,
};
pub use ids::{ChannelId, ConversationId, HookId};
pub use kv::{KvError, MemoryKv, SealedKv};
pub use log::{ConversationLog, LogEntry, LogError, LogRange, MemoryLog};
pub use message::{
    Accepted, Attachment, Inbound, Inbox, InboxError, OutboundReply, QuickReply, RawPayload, Reply, User,
    WaitOutcome,
};
pub use secret::{ct_eq, Secret};
pub use settings::{parse_json_body, parse_settings, SettingsError};
pub use status::{ChannelState, ChannelStatus, StatusHandle};

/// Milliseconds since the Unix epoch, the one clock unit stored and exchanged everywhere.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
