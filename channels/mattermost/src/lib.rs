//! The `mattermost` channel kind, webhook mode.
//!
//! An admin creates a Mattermost outgoing webhook whose callback URL is the channel's
//! (`{public_url}/hooks/mattermost/{hook_id}`), pastes its token back as `outgoing_token`,
//! and (for asynchronous replies) an incoming webhook's URL as `incoming_webhook_url`.
//!
//! - [`webhook`]: receives outgoing-webhook posts (JSON or form), checks the token in constant
//!   time first, normalizes, and hands them to the inbox.
//! - [`incoming`]: delivers replies through the incoming webhook, split at Mattermost's post
//!   length, with Mattermost's errors classified.
//! - [`split`]: splitting on rune boundaries.

mod incoming;
mod settings;
mod split;
mod webhook;

use actix_web::{web, HttpRequest, HttpResponse};
use async_trait::async_trait;
use futures_util::future::LocalBoxFuture;
use patchbay_channel_core::{
    BuildEnv, Channel, ChannelKind, CheckReport, Delivered, HookCtx, OutboundReply, SendError, SettingsError,
};
use std::sync::Arc;

pub use settings::{ReplyMode, Settings};
pub use split::split_runes;

/// Mattermost's longest post, in runes (`PostMessageMaxRunesV2`).
pub const MAX_POST_RUNES: usize = 16383;

pub struct MattermostKind;

impl ChannelKind for MattermostKind {
    fn name(&self) -> &'static str {
        "mattermost"
    }

    fn secret_fields(&self) -> &'static [&'static str] {
        &["outgoing_token", "incoming_webhook_url"]
    }

    fn build(&self, settings: &serde_json::Value, env: &BuildEnv) -> Result<Arc<dyn Channel>, SettingsError> {
        let settings = Settings::parse(settings)?;
        Ok(Arc::new(Mattermost {
            incoming: incoming::IncomingWebhook::new(&settings, env.http.clone()),
            settings,
        }))
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
