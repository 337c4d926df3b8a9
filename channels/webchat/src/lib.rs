//! The `webchat` channel kind: a built-in web chat in the spirit of Botkit Anywhere, speaking
//! Botkit's web-client wire format over a WebSocket and over two webhooks, with a widget
//! compiled into the binary.
//!
//! Everything lives under `/hooks/webchat/{hook_id}` (see docs/channels.md for the table):
//! the socket (`/ws`, or the base URL with an Upgrade), the webhooks (`/botkit/receive`
//! answers one reply, `/api/messages` an array), `/session` (user tokens), `/history`
//! (`/botkit/history` for Botkit's client), and the widget (`/chat`, `/embed.js`).
//!
//! - Identity: patchbay issues a signed user token ([`token`]); the conversation is the
//!   token's user, and a socket or a call acts only as that user.
//! - Every reply is appended to the conversation log (sequence-numbered) before it is handed
//!   to the live socket, if any; a socket that comes back replays what it missed from its
//!   watermark, in order, none twice.

mod conn;
mod http;
mod hub;
mod limit;
mod settings;
mod socket;
pub mod token;
pub mod wire;

use actix_web::{web, HttpRequest, HttpResponse};
use async_trait::async_trait;
use futures_util::future::LocalBoxFuture;
use hub::{Hub, Push};
use patchbay_channel_core::{
    BuildEnv, Channel, ChannelId, ChannelKind, CheckReport, Connector, ConnectorCtx, ConversationLog, Delivered,
    HookCtx, Inbound, LogRange, OutboundReply, SendError, SettingsError,
};
use settings::Settings;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use token::Signer;

pub struct WebchatKind;

impl ChannelKind for WebchatKind {
    fn name(&self) -> &'static str {
        "webchat"
    }

    fn secret_fields(&self) -> &'static [&'static str] {
        &[]
    }

    fn build(&self, settings: &serde_json::Value, env: &BuildEnv) -> Result<Arc<dyn Channel>, SettingsError> {
        let s = Settings::parse(settings)?;
        let mut origins: Vec<String> = s
            .allowed_origins
            .iter()
            .map(|o| if o == "*" { o.clone() } else { settings::normalize_origin(o).unwrap_or_default() })
            .collect();
        // The service's own pages (`/chat`, the embed iframe) are always allowed.
        if let Ok(url) = reqwest::Url::parse(&env.callback_url) {
            origins.push(url.origin().ascii_serialization());
        }
        let base_path = reqwest::Url::parse(&env.callback_url)
            .map(|u| u.path().trim_end_matches('/').to_owned())
            .unwrap_or_else(|_| format!("/hooks/webchat/{}", env.hook_id));
        Ok(Arc::new(Webchat(Arc::new(Inner {
            signer: Signer::new(&env.signing_key),
            log: env.log.clone(),
            channel_id: env.channel_id.clone(),
            hub: Hub::default(),
            origins,
            base_path,
            limiter: limit::Limiter::new(s.messages_per_minute, s.message_burst),
            settings: s,
        }))))
    }
}

pub(crate) struct Inner {
    pub settings: Settings,
    pub signer: Signer,
    pub log: Arc<dyn ConversationLog>,
    pub channel_id: ChannelId,
    pub hub: Hub,
    /// Normalized allowed origins (`*` for any); includes the service's own.
    pub origins: Vec<String>,
    /// `/hooks/webchat/{hook_id}` (with the public URL's path prefix, if any).
    pub base_path: String,
    pub limiter: limit::Limiter,
}

impl Inner {
    pub fn now_secs() -> i64 {
        patchbay_channel_core::now_ms() / 1000
    }

    pub fn origin_allowed(&self, origin: &str) -> bool {
        self.origins.iter().any(|o| o == "*" || o.eq_ignore_ascii_case(origin))
    }

    /// The newest sequence number of a conversation (0 when it has none).
    pub async fn head(&self, user: &str) -> Result<i64, patchbay_channel_core::LogError> {
        Ok(self
            .log
            .read(&self.channel_id, user, LogRange::Before(None), 1)
            .await?
            .last()
            .map(|e| e.seq)
            .unwrap_or(0))
    }
}

/// A web chat channel. Cheap to clone into socket tasks.
#[derive(Clone)]
pub struct Webchat(pub(crate) Arc<Inner>);

#[async_trait]
impl Channel for Webchat {
    fn handle_hook<'a>(&'a self, ctx: HookCtx, req: HttpRequest, body: web::Payload) -> LocalBoxFuture<'a, HttpResponse> {
        Box::pin(http::handle(self.clone(), ctx, req, body))
    }

    async fn send(&self, reply: &OutboundReply) -> Result<Delivered, SendError> {
        let inner = &self.0;
        let user = reply.platform_conversation.as_str();
        let frame = wire::reply_frame(&reply.reply, user, &reply.reply_id);
        // The log is the delivery: a socket that is down replays it when it comes back.
        let seq = inner
            .log
            .append(&inner.channel_id, user, Some(&reply.reply_id), frame.clone())
            .await
            .map_err(|e| SendError::retryable(e.to_string()))?;
        inner.hub.push(user, Push::Logged(seq, wire::with_seq(frame, seq)));
        Ok(Delivered {
            platform_message_id: Some(seq.to_string()),
        })
    }

    fn log_entry(&self, reply: &OutboundReply) -> Option<serde_json::Value> {
        Some(wire::reply_frame(&reply.reply, &reply.platform_conversation, &reply.reply_id))
    }

    fn logged(&self, reply: &OutboundReply, entry: serde_json::Value, seq: i64) {
        self.0.hub.push(&reply.platform_conversation, Push::Logged(seq, wire::with_seq(entry, seq)));
    }

    async fn check(&self) -> CheckReport {
        let inner = &self.0;
        let mut report = CheckReport::default();
        match inner.log.read(&inner.channel_id, "check", LogRange::Before(None), 1).await {
            Ok(_) => report.step("conversation_log", true, "readable"),
            Err(e) => report.step("conversation_log", false, e.to_string()),
        }
        report.step(
            "allowed_origins",
            true,
            format!("pages of {} may open the chat", inner.origins.join(", ")),
        );
        report.step("sockets", true, format!("{} live", inner.hub.count()));
        report
    }

    fn typing_interval(&self) -> Option<Duration> {
        Some(Duration::from_secs(4))
    }

    async fn typing(&self, inbound: &Inbound) {
        self.0.hub.push(&inbound.platform_conversation, Push::Typing);
    }

    fn connector(&self) -> Option<Arc<dyn Connector>> {
        Some(Arc::new(Housekeeper(self.0.clone())))
    }
}

/// Runs while the channel is enabled: applies the history retention, and when the channel is
/// disabled (or rebuilt) closes its sockets, so nothing more reaches the assistant.
struct Housekeeper(Arc<Inner>);

#[async_trait]
impl Connector for Housekeeper {
    async fn run(&self, ctx: ConnectorCtx, stop: CancellationToken) {
        let inner = &self.0;
        ctx.status.set_state(patchbay_channel_core::ChannelState::Ready);
        let retention_ms = inner.settings.history_retention_days as i64 * 24 * 3600 * 1000;
        let window = Duration::from_secs(inner.settings.reconnect_window_secs);
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        let mut ticks: u64 = 0;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            ctx.status.set_detail("sockets", serde_json::json!(inner.hub.count()));
            inner.hub.forget_closed(window);
            // Retention every 10 minutes (and at start).
            if ticks % 10 == 0 {
                let before = patchbay_channel_core::now_ms() - retention_ms;
                match inner.log.prune(&inner.channel_id, before).await {
                    Ok(n) if n > 0 => tracing::debug!(channel = %inner.channel_id, pruned = n, "web chat history pruned"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(channel = %inner.channel_id, error = %e, "pruning web chat history failed"),
                }
            }
            ticks += 1;
        }
        inner.hub.close_all("channel_disabled", "the chat was switched off or reconfigured");
    }
}
