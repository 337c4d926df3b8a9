//! The `mattermost` channel kind, in two modes.
//!
//! **Webhook mode** (`mode = "webhook"`, the default): an admin creates a Mattermost outgoing webhook whose callback URL is the channel's
//! (`{public_url}/hooks/mattermost/{hook_id}`), pastes its token back as `outgoing_token`,
//! and (for asynchronous replies) an incoming webhook's URL as `incoming_webhook_url`.
//!
//! - [`webhook`]: receives outgoing-webhook posts (JSON or form), checks the token in constant
//!   time first, normalizes, and hands them to the inbox.
//! - [`incoming`]: delivers replies through the incoming webhook, split at Mattermost's post
//!   length, with Mattermost's errors classified.
//! - [`split`]: splitting on rune boundaries.
//!
//! **WebSocket mode** (`mode = "websocket"`): a bot account with a personal access token.
//!
//! - [`websocket`]: the connector, listening on `/api/v4/websocket` (resume, catch-up, liveness).
//! - [`posted`]: which posts are answered, and how they become inbound messages.
//! - [`rest`]: the REST calls (`users/me`, `posts`, channel posts, typing).
//! - [`bot`]: the channel: replies through `POST /api/v4/posts`, typing, check.

mod bot;
mod incoming;
mod posted;
mod rest;
mod settings;
mod split;
mod webhook;
mod websocket;

use actix_web::{web, HttpRequest, HttpResponse};
use async_trait::async_trait;
use futures_util::future::LocalBoxFuture;
use patchbay_channel_core::{
    BuildEnv, Channel, ChannelKind, CheckReport, Delivered, HookCtx, OutboundReply, SendError, SettingsError,
};
use std::sync::Arc;

pub use settings::{parse_any, AnySettings, ReplyMode, RespondTo, Settings, WsSettings};
pub use split::split_runes;

/// Mattermost's longest post, in runes (`PostMessageMaxRunesV2`).
pub const MAX_POST_RUNES: usize = 16383;

pub struct MattermostKind;

impl ChannelKind for MattermostKind {
    fn name(&self) -> &'static str {
        "mattermost"
    }

    fn secret_fields(&self) -> &'static [&'static str] {
        &["outgoing_token", "incoming_webhook_url", "access_token"]
    }

    fn build(&self, settings: &serde_json::Value, env: &BuildEnv) -> Result<Arc<dyn Channel>, SettingsError> {
        match parse_any(settings)? {
            AnySettings::Webhook(settings) => Ok(Arc::new(Mattermost {
                incoming: incoming::IncomingWebhook::new(&settings, env.http.clone()),
                settings,
            })),
            AnySettings::Websocket(settings) => Ok(Arc::new(bot::WsChannel(bot::Bot::new(settings, env.http.clone())))),
        }
    }
}

struct Mattermost {
    settings: Settings,
    incoming: incoming::IncomingWebhook,
}

#[async_trait]
impl Channel for Mattermost {
    fn handle_hook<'a>(&'a self, ctx: HookCtx, req: HttpRequest, body: web::Payload) -> LocalBoxFuture<'a, HttpResponse> {
        Box::pin(webhook::handle(&self.settings, ctx, req, body))
    }

    async fn send(&self, reply: &OutboundReply) -> Result<Delivered, SendError> {
        self.incoming.send(reply).await
    }

    async fn check(&self) -> CheckReport {
        self.incoming.check(&self.settings).await
    }
}
