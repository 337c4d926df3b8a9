//! A durable, per-conversation message log that kinds may keep: what a web chat replays to a
//! socket that comes back (in order, none twice) and pages through as history.
//!
//! Kinds never see the store; the service hands them a [`ConversationLog`] through
//! [`crate::BuildEnv`]. Every entry of a conversation gets the next sequence number (1, 2, …)
//! of that conversation — Direct Line's watermark — and numbers are never reused, not even
//! after retention removed every entry of the conversation.

use crate::ids::ChannelId;
use async_trait::async_trait;
use serde::Serialize;

/// One logged entry.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LogEntry {
    /// Its number within the conversation, from 1, strictly increasing.
    pub seq: i64,
    /// When it was appended (Unix ms).
    pub at: i64,
    /// What the kind logged (its own wire format).
    pub body: serde_json::Value,
}

/// Which part of a conversation to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogRange {
    /// Entries with `seq > after`, oldest first: a replay from a watermark.
    After(i64),
    /// The newest entries with `seq < before` (`None`: the newest of all), oldest first:
    /// a page of history, read backwards page by page.
    Before(Option<i64>),
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("the conversation log is unavailable: {0}")]
    Unavailable(String),
}

#[async_trait]
pub trait ConversationLog: Send + Sync {
    /// Appends `body` and answers its sequence number. With a `key` (a reply id, an event
    /// id), appending the same key to the same conversation again answers the first entry's
    /// number and stores nothing: a retried delivery is logged once.
    async fn append(
        &self,
        channel: &ChannelId,
        conversation: &str,
        key: Option<&str>,
        body: serde_json::Value,
    ) -> Result<i64, LogError>;

    /// Reads at most `limit` entries of the range, oldest first.
    async fn read(
        &self,
        channel: &ChannelId,
        conversation: &str,
        range: LogRange,
        limit: usize,
    ) -> Result<Vec<LogEntry>, LogError>;

    /// Removes the channel's entries appended before `before` (Unix ms); answers how many.
    /// Sequence numbers continue where they were.
    async fn prune(&self, channel: &ChannelId, before: i64) -> Result<u64, LogError>;
}

/// A log in memory, for `config check`, unit tests and kinds' own tests. Same contract,
/// nothing durable.
#[derive(Default)]
pub struct MemoryLog {
    inner: std::sync::Mutex<std::collections::HashMap<(String, String), MemoryConversation>>,
}

#[derive(Default)]
struct MemoryConversation {
    last_seq: i64,
    entries: Vec<(Option<String>, LogEntry)>,
}

#[async_trait]
impl ConversationLog for MemoryLog {
    async fn append(
        &self,
        channel: &ChannelId,
        conversation: &str,
        key: Option<&str>,
        body: serde_json::Value,
    ) -> Result<i64, LogError> {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let conv = map.entry((channel.as_str().to_owned(), conversation.to_owned())).or_default();
        if let Some(k) = key {
            if let Some((_, e)) = conv.entries.iter().find(|(ek, _)| ek.as_deref() == Some(k)) {
                return Ok(e.seq);
            }
        }
        conv.last_seq += 1;
        let entry = LogEntry { seq: conv.last_seq, at: crate::now_ms(), body };
        conv.entries.push((key.map(str::to_owned), entry));
        Ok(conv.last_seq)
    }

    async fn read(
        &self,
        channel: &ChannelId,
        conversation: &str,
        range: LogRange,
        limit: usize,
    ) -> Result<Vec<LogEntry>, LogError> {
        let map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Some(conv) = map.get(&(channel.as_str().to_owned(), conversation.to_owned())) else {
            return Ok(Vec::new());
        };
        let all = conv.entries.iter().map(|(_, e)| e);
        Ok(match range {
            LogRange::After(after) => all.filter(|e| e.seq > after).take(limit).cloned().collect(),
            LogRange::Before(before) => {
                let mut v: Vec<LogEntry> =
                    all.rev().filter(|e| before.is_none_or(|b| e.seq < b)).take(limit).cloned().collect();
                v.reverse();
                v
            }
        })
    }

    async fn prune(&self, channel: &ChannelId, before: i64) -> Result<u64, LogError> {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut n = 0;
        for ((ch, _), conv) in map.iter_mut() {
            if ch == channel.as_str() {
                let len = conv.entries.len();
                conv.entries.retain(|(_, e)| e.at >= before);
                n += (len - conv.entries.len()) as u64;
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sequence_dedupe_ranges_and_prune() {
        let log = MemoryLog::default();
        let ch = ChannelId::parse("web").unwrap();
        for i in 1..=5 {
            let seq = log.append(&ch, "u1", Some(&format!("k{i}")), serde_json::json!(i)).await.unwrap();
            assert_eq!(seq, i);
        }
        assert_eq!(log.append(&ch, "u1", Some("k3"), serde_json::json!("again")).await.unwrap(), 3);
        assert_eq!(log.append(&ch, "u2", None, serde_json::json!(0)).await.unwrap(), 1);
        let after: Vec<i64> = log.read(&ch, "u1", LogRange::After(2), 2).await.unwrap().iter().map(|e| e.seq).collect();
        assert_eq!(after, vec![3, 4]);
        let page: Vec<i64> = log.read(&ch, "u1", LogRange::Before(None), 2).await.unwrap().iter().map(|e| e.seq).collect();
        assert_eq!(page, vec![4, 5]);
        let page: Vec<i64> = log.read(&ch, "u1", LogRange::Before(Some(4)), 10).await.unwrap().iter().map(|e| e.seq).collect();
        assert_eq!(page, vec![1, 2, 3]);
        assert_eq!(log.prune(&ch, i64::MAX).await.unwrap(), 6);
        assert_eq!(log.append(&ch, "u1", None, serde_json::json!(6)).await.unwrap(), 6, "numbers are never reused");
    }
}
