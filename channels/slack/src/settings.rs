//! Settings of a Slack channel, valid once constructed.
//!
//! The names are the ones people already use (chatom's `SlackConfig`, Montag): `bot_token`,
//! `app_token`, `signing_secret`, `socket_mode`, `api_url`, `team_id`, `default_channel`.
//! Secrets arrive resolved (`file:`/`env:` are read by the service before `build`), so the
//! prefix checks below apply to a file's content too.

use patchbay_channel_core::{parse_settings, Secret, SettingsError};
use serde::Deserialize;
use std::time::Duration;

/// Slack's Web API, unless `api_url` says otherwise (tests, GovSlack, a proxy).
pub const DEFAULT_API_URL: &str = "https://slack.com/api";

/// The bot scopes asked for by the OAuth install when `scopes` is not given.
pub const DEFAULT_SCOPES: &[&str] = &["app_mentions:read", "channels:history", "groups:history", "im:history", "chat:write"];

/// Which messages in channels reach the assistant (direct messages always do).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RespondTo {
    /// `app_mention`s, and `message`s that mention the bot.
    #[default]
    Mentions,
    /// Every message in the channels the bot is in (needs the `message.channels` event).
    All,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default)]
    bot_token: Option<Secret>,
    #[serde(default)]
    app_token: Option<Secret>,
    #[serde(default)]
    socket_mode: bool,
    #[serde(default)]
    signing_secret: Option<Secret>,
    #[serde(default)]
    api_url: Option<String>,
    #[serde(default)]
    team_id: Option<String>,
    #[serde(default)]
    default_channel: Option<String>,
    #[serde(default)]
    respond_to: RespondTo,
    #[serde(default)]
    connections: Option<u8>,
    #[serde(default)]
    ping_interval_ms: Option<u64>,
    #[serde(default)]
    client_id: Option<String>,
    #[serde(default)]
    client_secret: Option<Secret>,
    #[serde(default)]
    scopes: Option<Vec<String>>,
    #[serde(default = "default_send_timeout_ms")]
    send_timeout_ms: u64,
    #[serde(default)]
    stream_edit_interval_ms: Option<u64>,
    #[serde(default = "default_api_concurrency")]
    api_concurrency: u16,
}

/// The default pause between edits of a streamed reply: `chat.update` is a Tier 3 method
/// (about 50 calls a minute per workspace), so one edit every 1.5 s leaves room for a second
/// stream and for the bot's other calls.
pub const DEFAULT_STREAM_EDIT_MS: u64 = 1500;

fn default_send_timeout_ms() -> u64 {
    10_000
}

/// Web API calls in flight at once, per channel (see `Settings::api_concurrency`).
pub const DEFAULT_API_CONCURRENCY: u16 = 16;

fn default_api_concurrency() -> u16 {
    DEFAULT_API_CONCURRENCY
}

/// The OAuth v2 app credentials (Basic Information → App Credentials).
#[derive(Clone, Debug)]
pub struct OAuthApp {
    pub client_id: String,
    pub client_secret: Secret,
    pub scopes: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct Settings {
    /// The Bot User OAuth Token of a single-workspace install. Optional: a channel is
    /// created before the app is installed (Slack verifies the Request URL first), and
    /// workspaces installed through OAuth bring their own tokens.
    pub bot_token: Option<Secret>,
    pub app_token: Option<Secret>,
    pub socket_mode: bool,
    /// Required for the Events API; with Socket Mode the hook is not served without it.
    pub signing_secret: Option<Secret>,
    /// `https://slack.com/api` without a trailing slash.
    pub api_url: String,
    pub team_id: Option<String>,
    pub default_channel: Option<String>,
    pub respond_to: RespondTo,
    /// Socket Mode connections kept open (1–10; Slack allows 10 per app).
    pub connections: u8,
    /// Socket Mode liveness: a ping this often; silence for 4 intervals is a dead link.
    pub ping_interval: Duration,
    pub oauth: Option<OAuthApp>,
    pub send_timeout: Duration,
    /// How often a streamed reply is edited in place with `chat.update` (`None`: streaming
    /// off, the finished reply is posted once).
    pub stream_edit_interval: Option<Duration>,
    /// Web API calls in flight at once (1–256), and so the most HTTP connections to Slack
    /// the channel keeps: each costs buffers (and a TLS session) for as long as it stays in
    /// the pool, and Slack's pacing is per channel anyway, so a few dozen carry far more
    /// replies than Slack accepts. Calls beyond it wait for one to finish (within
    /// `send_timeout`).
    pub api_concurrency: usize,
}

impl Settings {
    pub fn parse(value: &serde_json::Value) -> Result<Settings, SettingsError> {
        let raw: Raw = parse_settings(value)?;
        if let Some(t) = &raw.bot_token {
            check_bot_token(t.expose())?;
        }
        if let Some(t) = &raw.app_token {
            check_app_token(t.expose())?;
        }
        if raw.socket_mode && raw.app_token.is_none() {
            return Err(SettingsError::new(
                "app_token",
                "is required with socket_mode = true: create an app-level token with the connections:write scope \
                 (Basic Information → App-Level Tokens) and paste it here (it starts with xapp-)",
            ));
        }
        if !raw.socket_mode && raw.app_token.is_some() {
            return Err(SettingsError::new(
                "app_token",
                "is only used with socket_mode = true: set socket_mode = true, or remove app_token to use the Events API",
            ));
        }
        if let Some(s) = &raw.signing_secret {
            let v = s.expose();
            if v.trim().is_empty() || v.chars().any(char::is_whitespace) {
                return Err(SettingsError::new("signing_secret", "must be the Signing Secret from Basic Information → App Credentials, without spaces"));
            }
            if v.starts_with("xox") || v.starts_with("xapp-") {
                return Err(SettingsError::new(
                    "signing_secret",
                    "is a token, not the Signing Secret: copy the Signing Secret from Basic Information → App Credentials",
                ));
            }
        }
        if !raw.socket_mode && raw.signing_secret.is_none() {
            return Err(SettingsError::new(
                "signing_secret",
                "is required for the Events API (socket_mode = false): copy the Signing Secret from Basic Information → App Credentials",
            ));
        }
        let api_url = parse_api_url(raw.api_url.as_deref())?;
        if let Some(t) = &raw.team_id {
            let ok = t.len() >= 2 && t.starts_with(['T', 'E']) && t.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit());
            if !ok {
                return Err(SettingsError::new("team_id", "must be a workspace id like T0123ABCD (or an Enterprise Grid id like E0123ABCD)"));
            }
        }
        let default_channel = match raw.default_channel {
            Some(c) => {
                let c = c.trim().trim_start_matches('#').to_owned();
                if c.is_empty() || c.chars().any(char::is_whitespace) {
                    return Err(SettingsError::new("default_channel", "must be a channel id like C0123ABCD (or a channel name)"));
                }
                Some(c)
            }
            None => None,
        };
        let connections = match raw.connections {
            Some(_) if !raw.socket_mode => {
                return Err(SettingsError::new("connections", "is a Socket Mode setting; set socket_mode = true or remove it"))
            }
            Some(n) if !(1..=10).contains(&n) => {
                return Err(SettingsError::new("connections", "must be between 1 and 10 (Slack allows 10 Socket Mode connections per app)"))
            }
            Some(n) => n,
            None => 1,
        };
        let ping = match raw.ping_interval_ms {
            Some(_) if !raw.socket_mode => {
                return Err(SettingsError::new("ping_interval_ms", "is a Socket Mode setting; set socket_mode = true or remove it"))
            }
            Some(p) if !(100..=300_000).contains(&p) => {
                return Err(SettingsError::new("ping_interval_ms", "must be between 100 and 300000"))
            }
            Some(p) => p,
            None => 10_000,
        };
        let oauth = match (raw.client_id, raw.client_secret) {
            (None, None) => {
                if raw.scopes.is_some() {
                    return Err(SettingsError::new("scopes", "is used by the OAuth install; set client_id and client_secret too"));
                }
                None
            }
            (Some(_), None) => {
                return Err(SettingsError::new("client_secret", "is required with client_id: copy the Client Secret from Basic Information → App Credentials"))
            }
            (None, Some(_)) => {
                return Err(SettingsError::new("client_id", "is required with client_secret: copy the Client ID from Basic Information → App Credentials"))
            }
            (Some(id), Some(secret)) => {
                let id = id.trim().to_owned();
                if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit() || c == '.') {
                    return Err(SettingsError::new("client_id", "must be the Client ID from Basic Information → App Credentials, like 1234567890.1234567890"));
                }
                if secret.expose().trim().is_empty() {
                    return Err(SettingsError::new("client_secret", "is empty"));
                }
                let scopes = match raw.scopes {
                    None => DEFAULT_SCOPES.iter().map(|s| s.to_string()).collect(),
                    Some(v) => {
                        if v.is_empty() {
                            return Err(SettingsError::new("scopes", "must list at least one bot scope, like chat:write"));
                        }
                        if let Some(i) = v.iter().position(|s| s.trim().is_empty() || s.contains([',', ' '])) {
                            return Err(SettingsError::new(format!("scopes[{i}]"), "must be one scope name, like chat:write"));
                        }
                        v
                    }
                };
                Some(OAuthApp { client_id: id, client_secret: secret, scopes })
            }
        };
        if raw.send_timeout_ms == 0 || raw.send_timeout_ms > 120_000 {
            return Err(SettingsError::new("send_timeout_ms", "must be between 1 and 120000"));
        }
        if !(1..=256).contains(&raw.api_concurrency) {
            return Err(SettingsError::new("api_concurrency", "must be between 1 and 256"));
        }
        let stream_edit = raw.stream_edit_interval_ms.unwrap_or(DEFAULT_STREAM_EDIT_MS);
        if stream_edit != 0 && !(100..=60_000).contains(&stream_edit) {
            return Err(SettingsError::new(
                "stream_edit_interval_ms",
                "must be 0 (post the finished reply only) or between 100 and 60000",
            ));
        }
        Ok(Settings {
            bot_token: raw.bot_token,
            app_token: raw.app_token,
            socket_mode: raw.socket_mode,
            signing_secret: raw.signing_secret,
            api_url,
            team_id: raw.team_id,
            default_channel,
            respond_to: raw.respond_to,
            connections,
            ping_interval: Duration::from_millis(ping),
            oauth,
            send_timeout: Duration::from_millis(raw.send_timeout_ms),
            stream_edit_interval: (stream_edit > 0).then(|| Duration::from_millis(stream_edit)),
            api_concurrency: raw.api_concurrency.into(),
        })
    }
}

/// A bot token: `xoxb-`, or `xoxe.xoxb-` once token rotation is on. The message says what
/// was pasted instead, never the value.
pub fn check_bot_token(t: &str) -> Result<(), SettingsError> {
    if (t.starts_with("xoxb-") || t.starts_with("xoxe.xoxb-")) && !t.chars().any(char::is_whitespace) {
        return Ok(());
    }
    let what = if t.starts_with("xoxp-") || t.starts_with("xoxe.xoxp-") {
        "is a user token (xoxp-); patchbay needs the Bot User OAuth Token"
    } else if t.starts_with("xapp-") {
        "is an app-level token (xapp-), which belongs in app_token; bot_token is the Bot User OAuth Token"
    } else if t.starts_with("xoxe-") {
        "is a refresh token (xoxe-), not an access token; bot_token is the Bot User OAuth Token"
    } else {
        "must start with xoxb- (or xoxe.xoxb- with token rotation)"
    };
    Err(SettingsError::new(
        "bot_token",
        format!("{what}: copy it from OAuth & Permissions → Bot User OAuth Token (it starts with xoxb-)"),
    ))
}

pub fn check_app_token(t: &str) -> Result<(), SettingsError> {
    if t.starts_with("xapp-") && !t.chars().any(char::is_whitespace) {
        return Ok(());
    }
    let what = if t.starts_with("xoxb-") || t.starts_with("xoxe.xoxb-") {
        "is a bot token (xoxb-), which belongs in bot_token; app_token is an app-level token"
    } else {
        "must start with xapp-"
    };
    Err(SettingsError::new(
        "app_token",
        format!("{what}: create one with the connections:write scope under Basic Information → App-Level Tokens"),
    ))
}

fn parse_api_url(v: Option<&str>) -> Result<String, SettingsError> {
    let Some(v) = v else { return Ok(DEFAULT_API_URL.to_owned()) };
    let url = reqwest::Url::parse(v.trim())
        .map_err(|_| SettingsError::new("api_url", "is not a URL; the default is https://slack.com/api"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(SettingsError::new("api_url", "must be an http(s) URL like https://slack.com/api"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(SettingsError::new("api_url", "must not have a query or fragment"));
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const BOT: &str = "xoxb-123-456-abcdef";

    fn with(extra: serde_json::Value) -> Result<Settings, SettingsError> {
        let mut v = json!({"bot_token": BOT, "signing_secret": "8f742231b10e8888abcd99yyyzzz85a5"});
        for (k, x) in extra.as_object().unwrap() {
            if x.is_null() {
                v.as_object_mut().unwrap().remove(k);
            } else {
                v[k] = x.clone();
            }
        }
        Settings::parse(&v)
    }

    #[test]
    fn events_api_defaults() {
        let s = with(json!({})).unwrap();
        assert_eq!(s.api_url, DEFAULT_API_URL);
        assert!(!s.socket_mode);
        assert_eq!(s.respond_to, RespondTo::Mentions);
        assert!(s.oauth.is_none());
        let s = with(json!({"api_url": "http://127.0.0.1:9/api/", "team_id": "T123", "default_channel": "#general"})).unwrap();
        assert_eq!(s.api_url, "http://127.0.0.1:9/api");
        assert_eq!(s.default_channel.as_deref(), Some("general"));
    }

    #[test]
    fn rotated_bot_tokens_are_accepted() {
        assert!(with(json!({"bot_token": "xoxe.xoxb-1-abc"})).is_ok());
        assert!(with(json!({"bot_token": null})).is_ok(), "a channel may be created before the app is installed");
    }

    #[test]
    fn wrong_prefixes_name_the_field_and_not_the_value() {
        for (token, hint) in [("xoxp-1-2", "user token"), ("xapp-1-A-2", "app_token"), ("abc", "xoxb-"), ("xoxe-1-refresh", "refresh")] {
            let e = with(json!({"bot_token": token})).unwrap_err();
            assert_eq!(e.field, "bot_token");
            assert!(e.message.contains(hint), "{e}");
            assert!(!e.message.contains(token), "the secret must not be echoed: {e}");
        }
        let e = with(json!({"socket_mode": true, "app_token": "xoxb-1-2"})).unwrap_err();
        assert_eq!(e.field, "app_token");
        assert!(e.message.contains("bot_token") && !e.message.contains("xoxb-1-2"), "{e}");
    }

    #[test]
    fn socket_mode_needs_an_app_token() {
        let e = with(json!({"socket_mode": true})).unwrap_err();
        assert_eq!(e.field, "app_token");
        let s = with(json!({"socket_mode": true, "app_token": "xapp-1-A1-2-abc", "signing_secret": null, "connections": 3})).unwrap();
        assert_eq!(s.connections, 3);
        assert!(s.signing_secret.is_none());
        assert_eq!(with(json!({"socket_mode": true, "app_token": "xapp-1", "connections": 11})).unwrap_err().field, "connections");
        assert_eq!(with(json!({"socket_mode": true, "app_token": "xapp-1", "connections": 0})).unwrap_err().field, "connections");
        assert_eq!(with(json!({"app_token": "xapp-1"})).unwrap_err().field, "app_token");
        assert_eq!(with(json!({"connections": 2})).unwrap_err().field, "connections");
    }

    #[test]
    fn events_api_needs_a_signing_secret() {
        let e = with(json!({"signing_secret": null})).unwrap_err();
        assert_eq!(e.field, "signing_secret");
        assert_eq!(with(json!({"signing_secret": "xoxb-oops"})).unwrap_err().field, "signing_secret");
    }

    #[test]
    fn other_fields_are_checked() {
        assert_eq!(with(json!({"api_url": "slack.com/api"})).unwrap_err().field, "api_url");
        assert_eq!(with(json!({"team_id": "acme"})).unwrap_err().field, "team_id");
        assert_eq!(with(json!({"default_channel": " "})).unwrap_err().field, "default_channel");
        assert_eq!(with(json!({"bot_tokn": BOT})).unwrap_err().field, "bot_tokn");
        assert_eq!(with(json!({"respond_to": "everyone"})).unwrap_err().field, "respond_to");
        assert_eq!(with(json!({"stream_edit_interval_ms": 50})).unwrap_err().field, "stream_edit_interval_ms");
        assert!(with(json!({"stream_edit_interval_ms": 0})).unwrap().stream_edit_interval.is_none());
        assert_eq!(with(json!({})).unwrap().api_concurrency, DEFAULT_API_CONCURRENCY as usize);
        assert_eq!(with(json!({"api_concurrency": 0})).unwrap_err().field, "api_concurrency");
        assert_eq!(with(json!({"api_concurrency": 257})).unwrap_err().field, "api_concurrency");
        assert_eq!(with(json!({"client_id": "1.2"})).unwrap_err().field, "client_secret");
        assert_eq!(with(json!({"client_secret": "s"})).unwrap_err().field, "client_id");
        assert_eq!(with(json!({"client_id": "x", "client_secret": "s"})).unwrap_err().field, "client_id");
        assert_eq!(with(json!({"client_id": "1.2", "client_secret": "s", "scopes": ["a b"]})).unwrap_err().field, "scopes[0]");
        let s = with(json!({"client_id": "1.2", "client_secret": "s"})).unwrap();
        assert!(s.oauth.unwrap().scopes.contains(&"chat:write".to_owned()));
    }
}
