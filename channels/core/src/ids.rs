//! Identifiers with rules attached.

use rand::Rng;
use serde::{Deserialize, Serialize};
use std::fmt;

/// A channel's name, chosen by the admin: `[a-z0-9][a-z0-9_-]{0,62}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ChannelId(String);

impl ChannelId {
    pub fn parse(s: &str) -> Result<Self, String> {
        valid_name(s).map(|_| ChannelId(s.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// For ids read back from the store, which were validated when written.
    pub fn from_trusted(s: String) -> Self {
        ChannelId(s)
    }
}

impl fmt::Display for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks an admin-chosen name (channel or assistant id).
pub fn valid_name(s: &str) -> Result<(), String> {
    let ok_len = !s.is_empty() && s.len() <= 63;
    let mut chars = s.chars();
    let first_ok = chars
        .next()
        .map(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        .unwrap_or(false);
    let rest_ok = s
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if ok_len && first_ok && rest_ok {
        Ok(())
    } else {
        Err(format!(
            "`{s}` is not a valid name: use 1 to 63 lowercase letters, digits, `-` or `_`, starting with a letter or digit"
        ))
    }
}

/// The unguessable id in a callback URL. 128 random bits, lowercase base32 without padding.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct HookId(String);

impl HookId {
    pub fn generate() -> Self {
        HookId(random_token(26))
    }
    /// Hook ids given in config must be long and plain enough to be unguessable URL parts.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.len() >= 16 && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            Ok(HookId(s.to_owned()))
        } else {
            Err("must be 16 to 64 characters of letters, digits, `-` or `_` (it is what keeps the callback URL unguessable)".into())
        }
    }
    pub fn from_trusted(s: String) -> Self {
        HookId(s)
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for HookId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The stable id an assistant sees for (channel, platform conversation, thread).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ConversationId(String);

impl ConversationId {
    pub fn from_trusted(s: String) -> Self {
        ConversationId(s)
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ConversationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// 24 hex characters of SHA-256 over (channel, platform event id): the same for a redelivery.
fn event_hash(channel: &str, event_id: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(channel.as_bytes());
    h.update([0]);
    h.update(event_id.as_bytes());
    hex::encode(&h.finalize()[..12])
}

/// The stable id of a message (channel, platform event id), as its assistant sees it.
pub fn message_id(channel: &str, event_id: &str) -> String {
    format!("m_{}", event_hash(channel, event_id))
}

/// The stable id of the `index`-th reply to a message: the same however often the message is
/// processed and however it is delivered (in a response or through `Channel::send`), so a
/// receiver — or a kind's log — can recognise a repeat.
pub fn reply_id(channel: &str, event_id: &str, index: usize) -> String {
    format!("r_{}_{index}", event_hash(channel, event_id))
}

/// `len` characters of lowercase base32 from the OS-seeded CSPRNG (5 bits each).
pub fn random_token(len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut rng = rand::thread_rng();
    (0..len)
        .map(|_| ALPHABET[rng.gen_range(0..32)] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(ChannelId::parse("sales-slack").is_ok());
        assert!(ChannelId::parse("Sales").is_err());
        assert!(ChannelId::parse("-x").is_err());
        assert!(ChannelId::parse("").is_err());
        assert!(ChannelId::parse("a/b").is_err());
    }

    #[test]
    fn hook_ids_are_long_and_distinct() {
        let a = HookId::generate();
        let b = HookId::generate();
        assert_eq!(a.as_str().len(), 26);
        assert_ne!(a, b);
        assert!(HookId::parse("short").is_err());
    }
}
