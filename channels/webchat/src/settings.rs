//! The `webchat` channel's settings.

use patchbay_channel_core::{parse_settings, SettingsError};
use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Origins (scheme://host[:port]) whose pages may open the socket and call the webhooks,
    /// besides patchbay's own `public_url`; `"*"` allows any origin.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// How long a user token is valid; the widget renews it on every visit.
    #[serde(default = "default_token_ttl")]
    pub token_ttl_secs: u64,
    /// How long messages are kept for replay and history.
    #[serde(default = "default_retention")]
    pub history_retention_days: u64,
    /// How long a webhook call waits for the assistant's answer.
    #[serde(default = "default_reply_timeout")]
    pub reply_timeout_ms: u64,
    /// The largest text frame (and webhook body) a client may send.
    #[serde(default = "default_max_frame")]
    pub max_frame_bytes: usize,
    /// A socket that comes back within this long after its conversation's last socket closed
    /// is told `reconnect` (not `welcome_back`).
    #[serde(default = "default_reconnect_window")]
    pub reconnect_window_secs: u64,
    /// The widget's title.
    #[serde(default = "default_title")]
    pub title: String,
    /// Messages a user may send per minute (0: no limit), and at once.
    #[serde(default = "default_rate")]
    pub messages_per_minute: u32,
    #[serde(default = "default_burst")]
    pub message_burst: u32,
}

fn default_token_ttl() -> u64 {
    30 * 24 * 3600
}
fn default_retention() -> u64 {
    30
}
fn default_reply_timeout() -> u64 {
    10_000
}
fn default_max_frame() -> usize {
    16 * 1024
}
fn default_reconnect_window() -> u64 {
    60
}
fn default_rate() -> u32 {
    30
}
fn default_burst() -> u32 {
    10
}
fn default_title() -> String {
    "Chat".into()
}

impl Settings {
    pub fn parse(value: &serde_json::Value) -> Result<Settings, SettingsError> {
        let s: Settings = parse_settings(value)?;
        for (i, o) in s.allowed_origins.iter().enumerate() {
            if o != "*" && normalize_origin(o).is_none() {
                return Err(SettingsError::new(
                    format!("allowed_origins[{i}]"),
                    format!("`{o}` is not an origin: give scheme://host[:port] (no path), or \"*\" for any"),
                ));
            }
        }
        if s.token_ttl_secs < 60 {
            return Err(SettingsError::new("token_ttl_secs", "must be at least 60"));
        }
        if s.history_retention_days == 0 {
            return Err(SettingsError::new("history_retention_days", "must be at least 1"));
        }
        if !(256..=1024 * 1024).contains(&s.max_frame_bytes) {
            return Err(SettingsError::new("max_frame_bytes", "must be between 256 and 1048576"));
        }
        if s.reply_timeout_ms == 0 || s.reply_timeout_ms > 120_000 {
            return Err(SettingsError::new("reply_timeout_ms", "must be between 1 and 120000"));
        }
        if s.messages_per_minute > 6_000 {
            return Err(SettingsError::new("messages_per_minute", "must be between 0 (no limit) and 6000"));
        }
        if s.message_burst == 0 || s.message_burst > 1_000 {
            return Err(SettingsError::new("message_burst", "must be between 1 and 1000"));
        }
        if s.title.chars().count() > 80 {
            return Err(SettingsError::new("title", "must be at most 80 characters"));
        }
        Ok(s)
    }
}

/// `https://Example.com:443/` → `https://example.com`; `None` when it is not an origin.
pub fn normalize_origin(s: &str) -> Option<String> {
    let url = reqwest::Url::parse(s).ok()?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return None;
    }
    if !(url.path() == "/" || url.path().is_empty()) || url.query().is_some() || url.fragment().is_some() {
        return None;
    }
    if !url.username().is_empty() || url.password().is_some() {
        return None;
    }
    Some(url.origin().ascii_serialization())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_checked_and_normalized() {
        assert_eq!(normalize_origin("https://Example.com:443/").as_deref(), Some("https://example.com"));
        assert_eq!(normalize_origin("http://127.0.0.1:8080").as_deref(), Some("http://127.0.0.1:8080"));
        assert!(normalize_origin("https://example.com/path").is_none());
        assert!(normalize_origin("example.com").is_none());
        let e = Settings::parse(&serde_json::json!({"allowed_origins": ["https://a.example", "nope"]})).unwrap_err();
        assert_eq!(e.field, "allowed_origins[1]");
        let e = Settings::parse(&serde_json::json!({"allowed_orgins": []})).unwrap_err();
        assert_eq!(e.field, "allowed_orgins");
        assert!(Settings::parse(&serde_json::json!({})).is_ok());
    }
}
