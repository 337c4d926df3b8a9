//! A small per-channel key/value space whose values are secrets, sealed at rest: what a kind
//! must remember that is neither a message nor a setting (Slack's per-workspace tokens from
//! an OAuth install, single-use OAuth `state` values).
//!
//! Kinds never see the store; the service hands them a [`SealedKv`] through
//! [`crate::BuildEnv`]. Values are sealed (AES-256-GCM with the service's encryption key,
//! bound to the channel and the key), so the database alone does not reveal them. A channel's
//! entries go when the channel is deleted.

use crate::ids::ChannelId;
use crate::secret::Secret;
use async_trait::async_trait;

#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("the channel's key/value store is unavailable: {0}")]
    Unavailable(String),
}

#[async_trait]
pub trait SealedKv: Send + Sync {
    /// The value of `key`, unless absent or expired.
    async fn get(&self, channel: &ChannelId, key: &str) -> Result<Option<Secret>, KvError>;

    /// Sets `key` to `value`, replacing what was there; with `expires_at` (Unix ms) it reads
    /// as absent from then on.
    async fn put(&self, channel: &ChannelId, key: &str, value: &Secret, expires_at: Option<i64>) -> Result<(), KvError>;

    /// Removes `key`; answers whether an unexpired value was there. Atomic: of two callers
    /// taking the same key, one gets `true` — a single-use value is used once.
    async fn delete(&self, channel: &ChannelId, key: &str) -> Result<bool, KvError>;

    /// The unexpired keys starting with `prefix`, sorted.
    async fn keys(&self, channel: &ChannelId, prefix: &str) -> Result<Vec<String>, KvError>;
}

/// A key/value space in memory, for `config check` and kinds' own tests. Same contract,
/// nothing durable.
/// (channel, key) → (value, expires_at).
type Entries = std::collections::BTreeMap<(String, String), (Secret, Option<i64>)>;

#[derive(Default)]
pub struct MemoryKv {
    inner: std::sync::Mutex<Entries>,
}

fn live(expires_at: Option<i64>) -> bool {
    expires_at.is_none_or(|e| e > crate::now_ms())
}

#[async_trait]
impl SealedKv for MemoryKv {
    async fn get(&self, channel: &ChannelId, key: &str) -> Result<Option<Secret>, KvError> {
        let map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        Ok(map.get(&(channel.as_str().to_owned(), key.to_owned())).filter(|(_, e)| live(*e)).map(|(v, _)| v.clone()))
    }

    async fn put(&self, channel: &ChannelId, key: &str, value: &Secret, expires_at: Option<i64>) -> Result<(), KvError> {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        map.insert((channel.as_str().to_owned(), key.to_owned()), (value.clone(), expires_at));
        Ok(())
    }

    async fn delete(&self, channel: &ChannelId, key: &str) -> Result<bool, KvError> {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        Ok(map.remove(&(channel.as_str().to_owned(), key.to_owned())).is_some_and(|(_, e)| live(e)))
    }

    async fn keys(&self, channel: &ChannelId, prefix: &str) -> Result<Vec<String>, KvError> {
        let map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        Ok(map
            .iter()
            .filter(|((c, k), (_, e))| c == channel.as_str() && k.starts_with(prefix) && live(*e))
            .map(|((_, k), _)| k.clone())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_get_take_expire() {
        let kv = MemoryKv::default();
        let ch = ChannelId::parse("s").unwrap();
        kv.put(&ch, "team:T1", &Secret::new("xoxb-1"), None).await.unwrap();
        kv.put(&ch, "state:a", &Secret::new("1"), Some(crate::now_ms() + 60_000)).await.unwrap();
        kv.put(&ch, "state:old", &Secret::new("1"), Some(crate::now_ms() - 1)).await.unwrap();
        assert_eq!(kv.get(&ch, "team:T1").await.unwrap().unwrap().expose(), "xoxb-1");
        assert!(kv.get(&ch, "state:old").await.unwrap().is_none(), "expired");
        assert_eq!(kv.keys(&ch, "state:").await.unwrap(), vec!["state:a"]);
        assert!(kv.delete(&ch, "state:a").await.unwrap());
        assert!(!kv.delete(&ch, "state:a").await.unwrap(), "taken once");
        assert!(!kv.delete(&ch, "state:old").await.unwrap(), "an expired value cannot be taken");
    }
}
