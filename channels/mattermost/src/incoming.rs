//! Delivering replies through a Mattermost incoming webhook, into the channel the message
//! came from.

use crate::settings::{ReplyMode, Settings};
use crate::split::split_runes;
use crate::MAX_POST_RUNES;
use patchbay_channel_core::{backoff::parse_retry_after, CheckReport, Delivered, OutboundReply, Reply, SendError};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

pub struct IncomingWebhook {
    url: Option<reqwest::Url>,
    username: Option<String>,
    icon_url: Option<String>,
    timeout: Duration,
    http: reqwest::Client,
    /// Parts of a split reply already posted, by reply id, so a retry resumes where the
    /// failure was instead of posting the first parts again.
    progress: Mutex<HashMap<String, usize>>,
}

/// Markdown for one reply: text unchanged; attachments as links (images inline); quick
/// replies listed (incoming webhooks cannot carry interactive buttons without an
/// integration URL).
pub fn render(reply: &Reply) -> String {
    let mut out = reply.text.clone();
    for a in &reply.attachments {
        let name = a.name.clone().unwrap_or_else(|| a.url.clone());
        let is_image = a.content_type.as_deref().is_some_and(|c| c.starts_with("image/"));
        out.push_str(if out.is_empty() { "" } else { "\n" });
        out.push_str(&format!("{}[{}]({})", if is_image { "!" } else { "" }, name, a.url));
    }
    if !reply.quick_replies.is_empty() {
        let options: Vec<&str> = reply.quick_replies.iter().map(|q| q.title.as_str()).collect();
        out.push_str(&format!("\n\n{}", options.join(" · ")));
    }
    out
}

/// Mattermost's error body: `{"id", "message", "detailed_error", …}`.
fn mattermost_error(status: reqwest::StatusCode, body: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(body) {
        Ok(v) if v.get("message").is_some() => format!(
            "Mattermost answered {status}: {} ({})",
            v["message"].as_str().unwrap_or_default(),
            v["id"].as_str().unwrap_or_default()
        ),
        _ => format!("Mattermost answered {status}: {}", body.chars().take(200).collect::<String>()),
    }
}

/// reqwest errors print the URL, and an incoming webhook URL is a secret.
fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "the incoming webhook did not answer in time".to_owned()
    } else if e.is_connect() {
        format!("cannot connect to Mattermost: {}", source_chain(e))
    } else {
        format!("the request to the incoming webhook failed: {}", source_chain(e))
    }
}

fn source_chain(e: &reqwest::Error) -> String {
    use std::error::Error;
    let mut parts = Vec::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        parts.push(s.to_string());
        cur = s.source();
    }
    if parts.is_empty() {
        "connection error".into()
    } else {
        parts.join(": ")
    }
}

impl IncomingWebhook {
    pub fn new(settings: &Settings, http: reqwest::Client) -> Self {
        IncomingWebhook {
            url: settings.incoming_webhook_url.clone(),
            username: settings.username.clone(),
            icon_url: settings.icon_url.clone(),
            timeout: settings.send_timeout,
            http,
            progress: Mutex::new(HashMap::new()),
        }
    }

    pub async fn send(&self, reply: &OutboundReply) -> Result<Delivered, SendError> {
        let Some(url) = &self.url else {
            return Err(SendError::Permanent(
                "the reply came after the inline answer was due, and no incoming_webhook_url is set to deliver it".into(),
            ));
        };
        let channel = reply.route.get("channel_name").and_then(|v| v.as_str()).unwrap_or_default();
        if channel.is_empty() {
            return Err(SendError::Permanent("the conversation has no Mattermost channel name to post into".into()));
        }
        let text = render(&reply.reply);
        let parts = split_runes(&text, MAX_POST_RUNES);
        let done = self.progress.lock().unwrap().get(&reply.reply_id).copied().unwrap_or(0);
        for (i, part) in parts.iter().enumerate().skip(done) {
            let mut body = serde_json::json!({ "text": part, "channel": channel });
            if let Some(u) = &self.username {
                body["username"] = u.clone().into();
            }
            if let Some(icon) = &self.icon_url {
                body["icon_url"] = icon.clone().into();
            }
            if let Err(e) = self.post(url, &body).await {
                if i > 0 {
                    self.progress.lock().unwrap().insert(reply.reply_id.clone(), i);
                }
                return Err(e);
            }
        }
        self.progress.lock().unwrap().remove(&reply.reply_id);
        Ok(Delivered::default())
    }

    async fn post(&self, url: &reqwest::Url, body: &serde_json::Value) -> Result<(), SendError> {
        let resp = self
            .http
            .post(url.clone())
            .timeout(self.timeout)
            .json(body)
            .send()
            .await
            .map_err(|e| SendError::retryable(describe(&e)))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap_or_default();
        let message = mattermost_error(status, &text);
        match status.as_u16() {
            429 => {
                let retry_after = headers
                    .get("retry-after")
                    .or_else(|| headers.get("x-ratelimit-reset"))
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_retry_after);
                Err(SendError::Retryable { message, retry_after })
            }
            500..=599 if status.as_u16() != 501 => Err(SendError::retryable(message)),
            _ => Err(SendError::Permanent(message)),
        }
    }

    pub async fn check(&self, settings: &Settings) -> CheckReport {
        let mut r = CheckReport::default();
        match &settings.outgoing_token {
            Some(_) => r.step("outgoing_token", true, "set, shaped like a Mattermost token"),
            None => r.step(
                "outgoing_token",
                false,
                "not set: every call is refused until the outgoing webhook's token is pasted into patchbay",
            ),
        }
        match (&self.url, settings.reply_mode) {
            (None, _) => r.step(
                "reply_mode",
                true,
                "inline: replies go back in the response to the outgoing webhook (no incoming_webhook_url)",
            ),
            (Some(url), mode) => {
                // A GET reaches the server (DNS, TCP, TLS) without creating a post:
                // Mattermost serves /hooks/{id} for POST only.
                match self.http.get(url.clone()).timeout(Duration::from_secs(10)).send().await {
                    Ok(resp) => r.step(
                        "incoming_webhook_url",
                        true,
                        format!("the Mattermost server is reachable over {} (answered {} to a GET)", url.scheme(), resp.status()),
                    ),
                    Err(e) => r.step("incoming_webhook_url", false, describe(&e)),
                }
                if mode == ReplyMode::Inline {
                    r.step("reply_mode", true, "inline, with the incoming webhook for late replies");
                }
                r.unverifiable.push(
                    "whether the incoming webhook exists and may post into each channel: only a real post can tell (and a locked webhook answers 403)".into(),
                );
            }
        }
        r.unverifiable.push(
            "whether Mattermost's outgoing webhook calls the callback URL with this token: Mattermost calls only when someone posts a trigger word; the channel's last_event_at shows the last call".into(),
        );
        r
    }
}
