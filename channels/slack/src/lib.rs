//! The `slack` channel kind.
//!
//! - [`settings`]: the channel's settings (`bot_token`, `app_token`, `signing_secret`, …).
//! - [`signature`]: Slack's `v0` request signatures.
//! - [`hook`]: the Events API Request URL (`POST {callback_url}`).
//! - [`events`]: which events are answered, and how they become inbound messages (both modes).
//! - [`socket`]: the Socket Mode connector (`apps.connections.open`, envelopes, acks, refresh).
//! - [`api`]: Web API calls with Slack's errors classified and 429s honoured per method.
//! - [`render`], [`pacing`]: replies as mrkdwn split within Slack's limits, paced per channel.
//! - [`oauth`]: the OAuth v2 install (`/install`, `/oauth/callback`) and per-workspace tokens.

pub mod api;
pub mod events;
pub mod hook;
pub mod oauth;
pub mod pacing;
pub mod render;
pub mod settings;
pub mod signature;
pub mod socket;

use actix_web::{http::StatusCode, web, HttpRequest, HttpResponse};
use api::{Api, ApiError};
use async_trait::async_trait;
use events::Identity;
use futures_util::future::LocalBoxFuture;
use patchbay_channel_core::{
    backoff::Backoff, channel::error_response, BuildEnv, Channel, ChannelId, ChannelState, ChannelKind, CheckReport, Connector, ConnectorCtx,
    Delivered, HookCtx, OutboundReply, SealedKv, Secret, SendError, SettingsError,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub use settings::{RespondTo, Settings};

/// Per channel: one message a second, bursts of three.
const PACE_INTERVAL: Duration = Duration::from_secs(1);
const PACE_BURST: u32 = 3;
/// A send waits at most this long for its channel's next slot; a later slot gives the reply
/// back to the queue with that delay, so a busy channel does not hold a sender.
const PACE_MAX_WAIT: Duration = Duration::from_millis(1500);

pub struct SlackKind;

impl ChannelKind for SlackKind {
    fn name(&self) -> &'static str {
        "slack"
    }

    fn secret_fields(&self) -> &'static [&'static str] {
        &["bot_token", "app_token", "signing_secret", "client_secret"]
    }

    fn build(&self, settings: &serde_json::Value, env: &BuildEnv) -> Result<Arc<dyn Channel>, SettingsError> {
        let settings = Settings::parse(settings)?;
        Ok(Arc::new(SlackChannel(Slack::new(settings, env))))
    }
}

/// What the channel, its hook and its connector share.
pub struct Slack {
    pub settings: Settings,
    pub api: Api,
    pub channel_id: ChannelId,
    pub callback_url: String,
    /// Installed workspaces' records (sealed), OAuth states.
    pub kv: Arc<dyn SealedKv>,
    /// Installed workspaces read so far.
    workspaces: Mutex<HashMap<String, oauth::Workspace>>,
    /// Workspaces found without an install, and when (see `Slack::workspace`).
    not_installed: Mutex<HashMap<String, std::time::Instant>>,
    /// One token refresh at a time (a refresh token is single use).
    refreshing: tokio::sync::Mutex<()>,
    pacer: pacing::Pacer,
    /// Who the bot is, per workspace (`auth.test` at start, or an install).
    identities: Mutex<HashMap<String, Identity>>,
    /// Parts of a split reply already posted, by reply id, so a retry resumes at the part
    /// that failed.
    progress: Mutex<HashMap<String, usize>>,
}

impl Slack {
    pub fn new(settings: Settings, env: &BuildEnv) -> Arc<Slack> {
        let api = Api::new(&settings.api_url, env.http.clone(), settings.send_timeout, settings.api_concurrency);
        Arc::new(Slack {
            api,
            settings,
            channel_id: env.channel_id.clone(),
            callback_url: env.callback_url.clone(),
            kv: env.kv.clone(),
            workspaces: Mutex::new(HashMap::new()),
            not_installed: Mutex::new(HashMap::new()),
            refreshing: tokio::sync::Mutex::new(()),
            pacer: pacing::Pacer::new(PACE_INTERVAL, PACE_BURST),
            identities: Mutex::new(HashMap::new()),
            progress: Mutex::new(HashMap::new()),
        })
    }

    /// The bot of `team`, when known.
    pub fn identity(&self, team: &str) -> Option<Identity> {
        let ids = self.identities.lock().unwrap();
        ids.get(team).cloned().or_else(|| {
            // A single-workspace channel: the configured token's identity answers for events
            // whose team field is missing.
            (ids.len() == 1 && team.is_empty()).then(|| ids.values().next().cloned()).flatten()
        })
    }

    pub fn learn_identity(&self, id: Identity) {
        self.identities.lock().unwrap().insert(id.team_id.clone(), id);
    }

    /// The bot token for `team`: the workspace's own (an OAuth install, refreshed when it
    /// rotates), else the configured `bot_token`.
    pub async fn token_for(&self, team: &str) -> Result<Secret, SendError> {
        match self.installed_token(team).await {
            Some(Ok(t)) => return Ok(t),
            Some(Err(e)) => return Err(e.into()),
            None => {}
        }
        self.settings.bot_token.clone().ok_or_else(|| SendError::Unauthorized(format!("no bot token for workspace {team}: {NO_TOKEN}")))
    }

    /// `app_uninstalled` (or the bot's token revoked): the workspace's identity and its
    /// installed tokens are forgotten.
    pub async fn forget_workspace(&self, team: &str, why: &str) {
        tracing::warn!(channel = %self.channel_id, team, why, "Slack says the app is gone from a workspace; its tokens are removed");
        self.identities.lock().unwrap().remove(team);
        self.remove_workspace(team).await;
    }

    /// `tokens_revoked`: when the bot's user is among the revoked, as [`Self::forget_workspace`].
    pub async fn tokens_revoked(&self, team: &str, bot_users: &[String]) {
        let mine = self.identity(team).is_some_and(|i| bot_users.contains(&i.user_id));
        if mine {
            self.forget_workspace(team, "tokens_revoked").await;
        }
    }

    /// `auth.test` with the configured bot token; remembers the identity and shows it in
    /// the channel's status.
    pub async fn whoami(&self, status: Option<&patchbay_channel_core::StatusHandle>) -> Result<Identity, ApiError> {
        let Some(token) = &self.settings.bot_token else {
            return Err(ApiError::Unauthorized { code: "no_token".into(), message: NO_TOKEN.into() });
        };
        let a = self.api.auth_test(token).await?;
        let id = Identity { team_id: a.team_id, team: a.team, user_id: a.user_id, user: a.user, bot_id: a.bot_id };
        if let Some(s) = status {
            s.set_detail("team", format!("{} ({})", id.team, id.team_id).into());
            s.set_detail("bot", format!("@{} ({})", id.user, id.user_id).into());
        }
        self.learn_identity(id.clone());
        Ok(id)
    }

    /// Where a reply goes: (team, channel, thread_ts, token).
    async fn target(&self, reply: &OutboundReply) -> Result<(String, String, Option<String>, Secret), SendError> {
        let route = |k: &str| reply.route.get(k).and_then(|v| v.as_str()).filter(|s| !s.is_empty()).map(str::to_owned);
        let team = route("team_id").unwrap_or_default();
        let channel = route("channel")
            .or_else(|| (!reply.platform_conversation.is_empty()).then(|| reply.platform_conversation.clone()))
            .or_else(|| self.settings.default_channel.clone())
            .ok_or_else(|| SendError::Permanent("the reply has no Slack channel to go to, and no default_channel is set".into()))?;
        // The reply's own thread wins; else the message's (its thread_ts, else its ts).
        let thread_ts = reply.reply.thread.clone().or_else(|| route("thread_ts")).or_else(|| reply.thread.clone());
        let token = self.token_for(&team).await?;
        Ok((team, channel, thread_ts, token))
    }

    /// One `chat.postMessage`, paced per channel; answers the message's `ts`.
    async fn post(&self, team: &str, channel: &str, thread_ts: Option<&str>, token: &Secret, text: &str) -> Result<Option<String>, SendError> {
        match self.pacer.reserve((team, channel), PACE_MAX_WAIT) {
            Ok(wait) if !wait.is_zero() => tokio::time::sleep(wait).await,
            Ok(_) => {}
            Err(wait) => {
                return Err(SendError::Retryable {
                    message: format!("pacing: channel {channel} gets one message a second"),
                    retry_after: Some(wait),
                })
            }
        }
        let mut body = serde_json::json!({"channel": channel, "text": text, "unfurl_links": false});
        if let Some(ts) = thread_ts {
            body["thread_ts"] = ts.into();
        }
        let v = self.api.call(team, "chat.postMessage", token, &body).await?;
        Ok(v.get("ts").and_then(|t| t.as_str()).map(str::to_owned))
    }

    /// `chat.update` of message `ts`.
    async fn update(&self, team: &str, channel: &str, ts: &str, token: &Secret, text: &str) -> Result<(), ApiError> {
        let body = serde_json::json!({"channel": channel, "ts": ts, "text": text});
        self.api.call(team, "chat.update", token, &body).await.map(|_| ())
    }

    async fn send(&self, reply: &OutboundReply) -> Result<Delivered, SendError> {
        let (team, channel, thread_ts, token) = self.target(reply).await?;
        let text = render::render(&reply.reply);
        let parts = render::split(&text, render::MAX_TEXT_CHARS);
        let done = self.progress.lock().unwrap().get(&reply.reply_id).copied().unwrap_or(0);
        let mut last = None;
        for (i, part) in parts.iter().enumerate().skip(done) {
            let posted = match (&reply.draft, i) {
                // A streamed draft becomes the reply's first part.
                (Some(draft), 0) => match self.update(&team, &channel, draft, &token, part).await {
                    Ok(()) => Ok(Some(draft.clone())),
                    // Someone deleted the draft: post the reply anew.
                    Err(e) if e.code() == "message_not_found" => self.post(&team, &channel, thread_ts.as_deref(), &token, part).await,
                    Err(e) => Err(e.into()),
                },
                _ => self.post(&team, &channel, thread_ts.as_deref(), &token, part).await,
            };
            match posted {
                Ok(ts) => last = ts,
                Err(e) => {
                    if i > 0 {
                        self.progress.lock().unwrap().insert(reply.reply_id.clone(), i);
                    }
                    return Err(e);
                }
            }
        }
        self.progress.lock().unwrap().remove(&reply.reply_id);
        Ok(Delivered { platform_message_id: last })
    }

    async fn check(&self) -> CheckReport {
        let mut r = CheckReport::default();
        let installed = self.workspaces().await;
        for ws in &installed {
            let step = format!("workspace {}", ws.team_id);
            match self.installed_token(&ws.team_id).await {
                Some(Ok(token)) => match self.api.auth_test(&token).await {
                    Ok(a) => r.step(step, true, format!("installed in {} ({}): bot @{} ({})", a.team, a.team_id, a.user, a.user_id)),
                    Err(e) => r.step(step, false, format!("auth.test: {}", e.message())),
                },
                Some(Err(e)) => r.step(step, false, format!("token refresh: {}", e.message())),
                None => {}
            }
        }
        match &self.settings.bot_token {
            None if !installed.is_empty() => {}
            None if self.settings.oauth.is_some() => {
                r.step("install", false, format!("no workspace has installed the app yet: open {}/install", self.callback_url))
            }
            None => r.step("bot_token", false, NO_TOKEN),
            Some(_) => match self.whoami(None).await {
                Ok(id) => {
                    let bot = id.bot_id.as_deref().unwrap_or("no bot id: not a bot token?");
                    r.step(
                        "bot_token",
                        true,
                        format!("Slack ({}) accepts the token: workspace {} ({}), bot @{} ({}, {bot})", self.settings.api_url, id.team, id.team_id, id.user, id.user_id),
                    );
                    if let Some(want) = &self.settings.team_id {
                        let same = *want == id.team_id;
                        r.step("team_id", same, if same { format!("the token is of workspace {want}") } else {
                            format!("the token is of workspace {}, but team_id is {want}: events of {} would be ignored", id.team_id, id.team_id)
                        });
                    }
                }
                Err(e) => r.step("bot_token", false, format!("auth.test: {}", e.message())),
            },
        }
        if let Some(app) = &self.settings.app_token {
            match self.api.connections_open(app).await {
                Ok(_) => r.step("app_token", true, "apps.connections.open accepts the app-level token (Socket Mode is on for the app)"),
                Err(e) => r.step("app_token", false, format!("apps.connections.open: {}", e.message())),
            }
        }
        if !self.settings.socket_mode {
            r.unverifiable.push(format!(
                "whether Slack can reach the Request URL {}: Slack verifies it when you save it under Event Subscriptions",
                self.callback_url
            ));
        }
        r.unverifiable.push("whether the bot is in the channels it should answer in: invite it with /invite @yourbot".into());
        r
    }
}

const NO_TOKEN: &str = "no bot token: install the app to the workspace (OAuth & Permissions → Install to Workspace) and paste the \
                        Bot User OAuth Token (xoxb-…) into bot_token";

/// A streamed draft's text: what one message holds, marked as cut when longer (the finished
/// reply is split into several messages).
fn draft_text(draft: &OutboundReply) -> String {
    let text = render::render(&draft.reply);
    match text.char_indices().nth(render::MAX_TEXT_CHARS - 1) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

pub struct SlackChannel(pub Arc<Slack>);

#[async_trait]
impl Channel for SlackChannel {
    fn handle_hook<'a>(&'a self, ctx: HookCtx, req: HttpRequest, body: web::Payload) -> LocalBoxFuture<'a, HttpResponse> {
        Box::pin(async move {
            let post = req.method() == actix_web::http::Method::POST;
            let get = req.method() == actix_web::http::Method::GET;
            match ctx.subpath.as_str() {
                "" | "/" if post => hook::events(&self.0, ctx, req, body).await,
                "/install" if get => oauth::install(&self.0, &ctx).await,
                "/oauth/callback" if get => oauth::callback(&self.0, &ctx, &req).await,
                _ => error_response(StatusCode::NOT_FOUND, "not_found", "Slack's Events API POSTs to the callback URL itself", None),
            }
        })
    }

    async fn send(&self, reply: &OutboundReply) -> Result<Delivered, SendError> {
        self.0.send(reply).await
    }

    async fn check(&self) -> CheckReport {
        self.0.check().await
    }

    fn stream_interval(&self) -> Option<Duration> {
        self.0.settings.stream_edit_interval
    }

    async fn stream_start(&self, draft: &OutboundReply) -> Result<Delivered, SendError> {
        let s = &self.0;
        let (team, channel, thread_ts, token) = s.target(draft).await?;
        let ts = s.post(&team, &channel, thread_ts.as_deref(), &token, &draft_text(draft)).await?;
        Ok(Delivered { platform_message_id: ts })
    }

    async fn stream_update(&self, draft: &OutboundReply, message_id: &str) -> Result<(), SendError> {
        let s = &self.0;
        let (team, channel, _, token) = s.target(draft).await?;
        s.update(&team, &channel, message_id, &token, &draft_text(draft)).await.map_err(Into::into)
    }

    async fn stream_discard(&self, draft: &OutboundReply, message_id: &str) {
        let s = &self.0;
        let Ok((team, channel, _, token)) = s.target(draft).await else { return };
        let body = serde_json::json!({"channel": channel, "ts": message_id});
        if let Err(e) = s.api.call(&team, "chat.delete", &token, &body).await {
            tracing::warn!(channel = %s.channel_id, error = e.message(), "could not delete an unfinished streamed reply");
        }
    }

    fn connector(&self) -> Option<Arc<dyn Connector>> {
        if self.0.settings.socket_mode {
            Some(Arc::new(socket::SocketConnector(self.0.clone())))
        } else {
            Some(Arc::new(IdentityConnector(self.0.clone())))
        }
    }
}

/// The Events API's connector: learns who the bot is (`auth.test`) when the channel starts,
/// shows it in the status, and marks the channel failed when the token is refused. It holds
/// no connection: Slack calls the Request URL.
struct IdentityConnector(Arc<Slack>);

#[async_trait]
impl Connector for IdentityConnector {
    async fn run(&self, ctx: ConnectorCtx, stop: CancellationToken) {
        // Installed workspaces' identities, for loop safety and mentions.
        let installed = self.0.workspaces().await;
        if !installed.is_empty() {
            ctx.status.set_detail("workspaces", installed.len().into());
        }
        if self.0.settings.bot_token.is_none() {
            stop.cancelled().await;
            return;
        }
        let backoff = Backoff { initial: Duration::from_secs(1), max: Duration::from_secs(300), factor: 2.0 };
        for attempt in 1.. {
            let wait = match self.0.whoami(Some(&ctx.status)).await {
                Ok(_) => {
                    if ctx.status.snapshot().state == ChannelState::Failed {
                        ctx.status.set_state(ChannelState::Ready);
                    }
                    break;
                }
                Err(ApiError::Unauthorized { message, .. }) => {
                    ctx.status.failed(format!("auth.test: {message}"));
                    backoff.delay(attempt).max(Duration::from_secs(60))
                }
                Err(e) => {
                    ctx.status.error(format!("auth.test: {}", e.message()));
                    backoff.delay(attempt)
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        stop.cancelled().await;
    }
}
