//! Settings of a Mattermost channel, valid once constructed.

use patchbay_channel_core::{parse_settings, Secret, SettingsError};
use serde::Deserialize;
use std::time::Duration;

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Webhook,
    Websocket,
}

/// How replies reach Mattermost in webhook mode.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ReplyMode {
    /// Acknowledge at once; reply through the incoming webhook into the same channel.
    IncomingWebhook,
    /// Answer in the HTTP response to the outgoing webhook (within `inline_timeout_ms`).
    Inline,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default)]
    mode: Mode,
    #[serde(default)]
    outgoing_token: Option<Secret>,
    #[serde(default)]
    incoming_webhook_url: Option<Secret>,
    #[serde(default)]
    reply_mode: Option<ReplyMode>,
    #[serde(default)]
    reply_in_thread: bool,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    icon_url: Option<String>,
    #[serde(default = "default_inline_timeout_ms")]
    inline_timeout_ms: u64,
    #[serde(default = "default_send_timeout_ms")]
    send_timeout_ms: u64,
}

fn default_inline_timeout_ms() -> u64 {
    // Under Mattermost's default OutgoingIntegrationRequestsTimeout of 30 s.
    25_000
}

fn default_send_timeout_ms() -> u64 {
    10_000
}

#[derive(Clone, Debug)]
pub struct Settings {
    /// `None` until the admin pastes the outgoing webhook's token: the channel is created
    /// first, because Mattermost asks for the callback URL before it shows the token.
    pub outgoing_token: Option<Secret>,
    pub incoming_webhook_url: Option<reqwest::Url>,
    pub reply_mode: ReplyMode,
    pub reply_in_thread: bool,
    pub username: Option<String>,
    pub icon_url: Option<String>,
    pub inline_timeout: Duration,
    pub send_timeout: Duration,
}

impl Settings {
    pub fn parse(value: &serde_json::Value) -> Result<Settings, SettingsError> {
        let raw: Raw = parse_settings(value)?;
        if raw.mode == Mode::Websocket {
            return Err(SettingsError::new(
                "mode",
                "websocket mode is not available in this build yet; use mode = \"webhook\"",
            ));
        }
        if let Some(token) = &raw.outgoing_token {
            let t = token.expose();
            if t.len() != 26 || !t.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()) {
                return Err(SettingsError::new(
                    "outgoing_token",
                    "does not look like a Mattermost token (26 lowercase letters and digits); copy it from the outgoing webhook's page",
                ));
            }
        }
        let incoming_webhook_url = match raw.incoming_webhook_url {
            None => None,
            Some(s) => {
                let url = reqwest::Url::parse(s.expose()).map_err(|_| {
                    SettingsError::new("incoming_webhook_url", "is not a URL; copy the incoming webhook's URL, like https://mm.example.com/hooks/xxx")
                })?;
                if !matches!(url.scheme(), "http" | "https") || !url.path().contains("/hooks/") {
                    return Err(SettingsError::new(
                        "incoming_webhook_url",
                        "must be an http(s) URL whose path contains /hooks/, as Mattermost shows it",
                    ));
                }
                Some(url)
            }
        };
        let reply_mode = match (raw.reply_mode, &incoming_webhook_url) {
            (Some(ReplyMode::IncomingWebhook), None) => {
                return Err(SettingsError::new(
                    "incoming_webhook_url",
                    "is required when reply_mode = \"incoming_webhook\"",
                ))
            }
            (Some(m), _) => m,
            (None, Some(_)) => ReplyMode::IncomingWebhook,
            (None, None) => ReplyMode::Inline,
        };
        if let Some(u) = &raw.username {
            if u.is_empty() || u.chars().count() > 64 {
                return Err(SettingsError::new("username", "must be 1 to 64 characters"));
            }
        }
        if let Some(i) = &raw.icon_url {
            let ok = reqwest::Url::parse(i).map(|u| matches!(u.scheme(), "http" | "https")).unwrap_or(false);
            if !ok || i.len() > 1024 {
                return Err(SettingsError::new("icon_url", "must be an http(s) URL of at most 1024 characters"));
            }
        }
        if raw.inline_timeout_ms == 0 || raw.inline_timeout_ms > 29_000 {
            return Err(SettingsError::new(
                "inline_timeout_ms",
                "must be between 1 and 29000: Mattermost gives up on the callback after 30 s by default",
            ));
        }
        if raw.send_timeout_ms == 0 || raw.send_timeout_ms > 120_000 {
            return Err(SettingsError::new("send_timeout_ms", "must be between 1 and 120000"));
        }
        Ok(Settings {
            outgoing_token: raw.outgoing_token,
            incoming_webhook_url,
            reply_mode,
            reply_in_thread: raw.reply_in_thread,
            username: raw.username,
            icon_url: raw.icon_url,
            inline_timeout: Duration::from_millis(raw.inline_timeout_ms),
            send_timeout: Duration::from_millis(raw.send_timeout_ms),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const TOKEN: &str = "rgfe9bc9j3gste59mbyrmzk33w";

    #[test]
    fn reply_mode_follows_the_incoming_url() {
        let s = Settings::parse(&json!({"outgoing_token": TOKEN})).unwrap();
        assert_eq!(s.reply_mode, ReplyMode::Inline);
        let s = Settings::parse(&json!({"outgoing_token": TOKEN, "incoming_webhook_url": "https://mm.example.com/hooks/abc"})).unwrap();
        assert_eq!(s.reply_mode, ReplyMode::IncomingWebhook);
    }

    #[test]
    fn errors_name_the_field() {
        assert!(Settings::parse(&json!({})).unwrap().outgoing_token.is_none());
        let e = Settings::parse(&json!({"outgoing_token": "short"})).unwrap_err();
        assert_eq!(e.field, "outgoing_token");
        assert!(!e.message.contains("short"), "the secret must not be echoed");
        let e = Settings::parse(&json!({"outgoing_token": TOKEN, "incoming_webhook_url": "https://mm.example.com/x"})).unwrap_err();
        assert_eq!(e.field, "incoming_webhook_url");
        let e = Settings::parse(&json!({"outgoing_token": TOKEN, "reply_mode": "incoming_webhook"})).unwrap_err();
        assert_eq!(e.field, "incoming_webhook_url");
        let e = Settings::parse(&json!({"outgoing_token": TOKEN, "incoming_webhok_url": "x"})).unwrap_err();
        assert_eq!(e.field, "incoming_webhok_url");
        let e = Settings::parse(&json!({"outgoing_token": TOKEN, "inline_timeout_ms": 60000})).unwrap_err();
        assert_eq!(e.field, "inline_timeout_ms");
    }
}
