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
    // websocket mode
    #[serde(default)]
    server_url: Option<String>,
    #[serde(default)]
    access_token: Option<Secret>,
    #[serde(default)]
    teams: Option<Vec<String>>,
    #[serde(default)]
    channels: Option<Vec<String>>,
    #[serde(default)]
    respond_to: Option<RespondTo>,
    #[serde(default)]
    typing_indicator: Option<bool>,
    #[serde(default)]
    ping_interval_ms: Option<u64>,
    #[serde(default)]
    stream_edit_interval_ms: Option<u64>,
}

/// Which posts in channels (not direct messages, which are always answered) reach the
/// assistant in websocket mode.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RespondTo {
    /// Posts that @mention the bot.
    #[default]
    Mentions,
    /// Every post in the channels the bot is a member of.
    All,
}

/// Settings of a channel in websocket mode: a bot account's personal access token, used on
/// the WebSocket API (posts in) and the REST API (replies out).
#[derive(Clone, Debug)]
pub struct WsSettings {
    /// `https://mm.example.com` (no trailing slash, no path beyond a subpath install).
    pub server_url: reqwest::Url,
    pub access_token: Secret,
    /// Team ids or names whose channels are answered (empty: all teams).
    pub teams: Vec<String>,
    /// Channel ids or names answered (empty: every channel the bot is in).
    pub channels: Vec<String>,
    pub respond_to: RespondTo,
    pub typing_indicator: bool,
    /// How often the connector pings; a socket silent for two intervals is dead.
    pub ping_interval: Duration,
    pub send_timeout: Duration,
    /// How often a reply that the assistant streams is edited in place (`None`: streaming
    /// off, the finished reply is posted once).
    pub stream_edit_interval: Option<Duration>,
}

/// A Mattermost channel's settings in either mode.
#[derive(Clone, Debug)]
pub enum AnySettings {
    Webhook(Settings),
    Websocket(WsSettings),
}

/// Parses settings of either mode, refusing the other mode's fields by name.
pub fn parse_any(value: &serde_json::Value) -> Result<AnySettings, SettingsError> {
    let raw: Raw = parse_settings(value)?;
    match raw.mode {
        Mode::Webhook => {
            let ws_fields = [
                ("server_url", raw.server_url.is_some()),
                ("access_token", raw.access_token.is_some()),
                ("teams", raw.teams.is_some()),
                ("channels", raw.channels.is_some()),
                ("respond_to", raw.respond_to.is_some()),
                ("typing_indicator", raw.typing_indicator.is_some()),
                ("ping_interval_ms", raw.ping_interval_ms.is_some()),
                ("stream_edit_interval_ms", raw.stream_edit_interval_ms.is_some()),
            ];
            if let Some((field, _)) = ws_fields.iter().find(|(_, set)| *set) {
                return Err(SettingsError::new(
                    *field,
                    "is a websocket-mode setting; set mode = \"websocket\" or remove it",
                ));
            }
            Settings::from_raw(raw).map(AnySettings::Webhook)
        }
        Mode::Websocket => WsSettings::from_raw(raw).map(AnySettings::Websocket),
    }
}

impl WsSettings {
    fn from_raw(raw: Raw) -> Result<WsSettings, SettingsError> {
        let webhook_fields = [
            ("outgoing_token", raw.outgoing_token.is_some()),
            ("incoming_webhook_url", raw.incoming_webhook_url.is_some()),
            ("reply_mode", raw.reply_mode.is_some()),
            ("reply_in_thread", raw.reply_in_thread),
            ("username", raw.username.is_some()),
            ("icon_url", raw.icon_url.is_some()),
        ];
        if let Some((field, _)) = webhook_fields.iter().find(|(_, set)| *set) {
            return Err(SettingsError::new(
                *field,
                "is a webhook-mode setting; in websocket mode the bot posts as itself through the REST API",
            ));
        }
        let server_url = raw.server_url.ok_or_else(|| {
            SettingsError::new("server_url", "is required in websocket mode: the Mattermost server's address, like https://mm.example.com")
        })?;
        let mut url = reqwest::Url::parse(server_url.trim()).map_err(|_| {
            SettingsError::new("server_url", "is not a URL; give the Mattermost server's address, like https://mm.example.com")
        })?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(SettingsError::new("server_url", "must be an http(s) URL, like https://mm.example.com"));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(SettingsError::new("server_url", "must not have a query or fragment"));
        }
        if url.path().contains("/api/v4") {
            return Err(SettingsError::new("server_url", "is the server's address, without /api/v4"));
        }
        let path = url.path().trim_end_matches('/').to_owned();
        url.set_path(&path);
        let access_token = raw.access_token.ok_or_else(|| {
            SettingsError::new(
                "access_token",
                "is required in websocket mode: the bot account's personal access token (Integrations → Bot Accounts → Create New Token)",
            )
        })?;
        let t = access_token.expose();
        if t.len() != 26 || !t.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(SettingsError::new(
                "access_token",
                "does not look like a Mattermost personal access token (26 letters and digits); copy the token shown when it was created",
            ));
        }
        let list = |field: &str, v: Option<Vec<String>>| -> Result<Vec<String>, SettingsError> {
            let v = v.unwrap_or_default();
            if let Some(i) = v.iter().position(|s| s.trim().is_empty()) {
                return Err(SettingsError::new(format!("{field}[{i}]"), "must not be empty; give an id or a name"));
            }
            Ok(v.into_iter().map(|s| s.trim().trim_start_matches('~').to_owned()).collect())
        };
        let ping = raw.ping_interval_ms.unwrap_or(30_000);
        if !(100..=300_000).contains(&ping) {
            return Err(SettingsError::new("ping_interval_ms", "must be between 100 and 300000"));
        }
        if raw.send_timeout_ms == 0 || raw.send_timeout_ms > 120_000 {
            return Err(SettingsError::new("send_timeout_ms", "must be between 1 and 120000"));
        }
        // Mattermost's default rate limit is 10 requests/s per user: an edit every half
        // second leaves room for the bot's other posts.
        let stream_edit = raw.stream_edit_interval_ms.unwrap_or(DEFAULT_STREAM_EDIT_MS);
        if stream_edit != 0 && !(100..=60_000).contains(&stream_edit) {
            return Err(SettingsError::new(
                "stream_edit_interval_ms",
                "must be 0 (post the finished reply only) or between 100 and 60000",
            ));
        }
        Ok(WsSettings {
            server_url: url,
            access_token,
            teams: list("teams", raw.teams)?,
            channels: list("channels", raw.channels)?,
            respond_to: raw.respond_to.unwrap_or_default(),
            typing_indicator: raw.typing_indicator.unwrap_or(true),
            ping_interval: Duration::from_millis(ping),
            send_timeout: Duration::from_millis(raw.send_timeout_ms),
            stream_edit_interval: (stream_edit > 0).then(|| Duration::from_millis(stream_edit)),
        })
    }
}

/// The default pause between edits of a streamed reply, in milliseconds.
pub const DEFAULT_STREAM_EDIT_MS: u64 = 500;

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
    /// Webhook-mode settings; a websocket-mode value is refused (use [`parse_any`]).
    pub fn parse(value: &serde_json::Value) -> Result<Settings, SettingsError> {
        match parse_any(value)? {
            AnySettings::Webhook(s) => Ok(s),
            AnySettings::Websocket(_) => Err(SettingsError::new("mode", "expected webhook mode")),
        }
    }

    fn from_raw(raw: Raw) -> Result<Settings, SettingsError> {
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
        let e = Settings::parse(&json!({"outgoing_token": TOKEN, "server_url": "https://mm.example.com"})).unwrap_err();
        assert_eq!(e.field, "server_url");
    }

    fn ws(extra: serde_json::Value) -> Result<WsSettings, SettingsError> {
        let mut v = json!({"mode": "websocket", "server_url": "https://mm.example.com/", "access_token": TOKEN});
        for (k, x) in extra.as_object().unwrap() {
            if x.is_null() {
                v.as_object_mut().unwrap().remove(k);
            } else {
                v[k] = x.clone();
            }
        }
        match parse_any(&v)? {
            AnySettings::Websocket(s) => Ok(s),
            AnySettings::Webhook(_) => panic!("webhook mode"),
        }
    }

    #[test]
    fn websocket_defaults() {
        let s = ws(json!({})).unwrap();
        assert_eq!(s.server_url.as_str(), "https://mm.example.com/");
        assert_eq!(s.respond_to, RespondTo::Mentions);
        assert!(s.typing_indicator);
        assert_eq!(s.ping_interval, Duration::from_secs(30));
        let s = ws(json!({"server_url": "https://example.com/chat/", "respond_to": "all", "channels": ["~sales", "x"]})).unwrap();
        assert_eq!(s.server_url.path(), "/chat");
        assert_eq!(s.respond_to, RespondTo::All);
        assert_eq!(s.channels, vec!["sales", "x"]);
    }

    #[test]
    fn websocket_errors_name_the_field() {
        assert_eq!(ws(json!({"server_url": null})).unwrap_err().field, "server_url");
        assert_eq!(ws(json!({"server_url": "mm.example.com"})).unwrap_err().field, "server_url");
        assert_eq!(ws(json!({"server_url": "https://mm.example.com/api/v4"})).unwrap_err().field, "server_url");
        assert_eq!(ws(json!({"access_token": null})).unwrap_err().field, "access_token");
        let e = ws(json!({"access_token": "not-a-token"})).unwrap_err();
        assert_eq!(e.field, "access_token");
        assert!(!e.message.contains("not-a-token"), "the secret must not be echoed");
        assert_eq!(ws(json!({"respond_to": "everyone"})).unwrap_err().field, "respond_to");
        assert_eq!(ws(json!({"channels": ["ok", " "]})).unwrap_err().field, "channels[1]");
        assert_eq!(ws(json!({"outgoing_token": TOKEN})).unwrap_err().field, "outgoing_token");
        assert_eq!(ws(json!({"ping_interval_ms": 5})).unwrap_err().field, "ping_interval_ms");
    }
}
