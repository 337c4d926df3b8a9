//! The Mattermost channel in websocket mode: a bot account that hears posts on the WebSocket
//! API ([`crate::websocket`]) and answers through the REST API (here).

use crate::posted::BotIdentity;
use crate::rest::{Rest, RestError};
use crate::settings::WsSettings;
use crate::split::split_runes;
use crate::MAX_POST_RUNES;
use actix_web::{http::StatusCode, web, HttpRequest, HttpResponse};
use async_trait::async_trait;
use futures_util::future::LocalBoxFuture;
use patchbay_channel_core::{
    channel::error_response, Channel, CheckReport, Connector, Delivered, HookCtx, Inbound, OutboundReply, SendError,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often the typing indicator is renewed while the assistant works (Mattermost's web
/// client shows it for a few seconds after each event).
const TYPING_EVERY: Duration = Duration::from_secs(4);

/// What the channel and its connector share.
pub struct Bot {
    pub settings: WsSettings,
    pub rest: Rest,
    /// Learnt by the connector from `GET /api/v4/users/me`.
    pub me: Mutex<Option<BotIdentity>>,
    /// Parts of a split reply already posted, by reply id, so a retry resumes at the part
    /// that failed.
    progress: Mutex<HashMap<String, usize>>,
}

impl Bot {
    pub fn new(settings: WsSettings, http: reqwest::Client) -> Arc<Bot> {
        let rest = Rest::new(&settings.server_url, settings.access_token.clone(), http, settings.send_timeout);
        Arc::new(Bot { settings, rest, me: Mutex::new(None), progress: Mutex::new(HashMap::new()) })
    }

    fn my_id(&self) -> String {
        self.me.lock().unwrap().as_ref().map(|m| m.id.clone()).unwrap_or_else(|| "me".into())
    }
}

pub struct WsChannel(pub Arc<Bot>);

/// The channel and thread (root post id) a reply goes to.
fn target(reply: &OutboundReply) -> Result<(String, String), SendError> {
    let route = |k: &str| reply.route.get(k).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
    let channel_id = route("channel_id");
    if channel_id.is_empty() {
        return Err(SendError::Permanent("the conversation has no Mattermost channel id to post into".into()));
    }
    // The reply's own thread wins; else the message's thread (a root post id).
    let root_id = reply.thread.clone().unwrap_or_else(|| route("root_id"));
    Ok((channel_id, root_id))
}

/// A streamed draft's text: what one post can hold, marked as cut when longer (the finished
/// reply is split into several posts).
fn draft_text(draft: &OutboundReply) -> String {
    let text = crate::incoming::render(&draft.reply);
    match text.char_indices().nth(MAX_POST_RUNES - 1) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

fn send_error(e: RestError) -> SendError {
    match e {
        RestError::Permanent(m) if m.contains("403") => {
            SendError::Permanent(format!("{m}: add the bot to the channel, or give it the post:channels / post:all permission"))
        }
        RestError::Unauthorized(m) => SendError::Unauthorized(format!("{m}: {}", crate::websocket::UNAUTHORIZED_HELP)),
        e => e.into(),
    }
}

#[async_trait]
impl Channel for WsChannel {
    fn handle_hook<'a>(&'a self, _ctx: HookCtx, _req: HttpRequest, _body: web::Payload) -> LocalBoxFuture<'a, HttpResponse> {
        Box::pin(async {
            error_response(
                StatusCode::NOT_FOUND,
                "no_hook",
                "this Mattermost channel is in websocket mode: it listens on Mattermost's WebSocket API and has no callback URL",
                None,
            )
        })
    }

    async fn send(&self, reply: &OutboundReply) -> Result<Delivered, SendError> {
        let bot = &self.0;
        let (channel_id, root_id) = target(reply)?;
        let text = crate::incoming::render(&reply.reply);
        let parts = split_runes(&text, MAX_POST_RUNES);
        let done = bot.progress.lock().unwrap().get(&reply.reply_id).copied().unwrap_or(0);
        let mut last = None;
        for (i, part) in parts.iter().enumerate().skip(done) {
            let posted = match (&reply.draft, i) {
                // A streamed draft becomes the reply's first part.
                (Some(draft), 0) => match bot.rest.patch_post(draft, part).await {
                    Ok(()) => Ok(draft.clone()),
                    // The draft cannot be edited (deleted by someone, edits forbidden or past
                    // the server's edit time limit): post the reply anew, and remove the cut-off
                    // draft if it is still there.
                    Err(RestError::Permanent(m)) => {
                        tracing::info!(post = %draft, error = %m, "the streamed draft cannot be finished in place; posting the reply anew");
                        let posted = bot.rest.create_post(&channel_id, part, &root_id).await;
                        if posted.is_ok() {
                            let _ = bot.rest.delete_post(draft).await;
                        }
                        posted
                    }
                    Err(e) => Err(e),
                },
                _ => bot.rest.create_post(&channel_id, part, &root_id).await,
            };
            match posted {
                Ok(id) => last = Some(id),
                Err(e) => {
                    if i > 0 {
                        bot.progress.lock().unwrap().insert(reply.reply_id.clone(), i);
                    }
                    return Err(send_error(e));
                }
            }
        }
        bot.progress.lock().unwrap().remove(&reply.reply_id);
        Ok(Delivered { platform_message_id: last })
    }

    fn stream_interval(&self) -> Option<Duration> {
        self.0.settings.stream_edit_interval
    }

    async fn stream_start(&self, draft: &OutboundReply) -> Result<Delivered, SendError> {
        let (channel_id, root_id) = target(draft)?;
        let id = self.0.rest.create_post(&channel_id, &draft_text(draft), &root_id).await.map_err(send_error)?;
        Ok(Delivered { platform_message_id: Some(id) })
    }

    async fn stream_update(&self, draft: &OutboundReply, message_id: &str) -> Result<(), SendError> {
        self.0.rest.patch_post(message_id, &draft_text(draft)).await.map_err(send_error)
    }

    async fn stream_discard(&self, _draft: &OutboundReply, message_id: &str) {
        if let Err(e) = self.0.rest.delete_post(message_id).await {
            tracing::warn!(post = message_id, error = e.message(), "could not delete an unfinished streamed reply");
        }
    }

    async fn check(&self) -> CheckReport {
        let bot = &self.0;
        let mut r = CheckReport::default();
        match bot.rest.me().await {
            Ok(me) => {
                let kind = if me.is_bot { "a bot account" } else { "a user account, not a bot account" };
                r.step("access_token", true, format!("Mattermost at {} accepts the token: @{} ({kind})", bot.settings.server_url, me.username));
                match bot.rest.my_channels(&me.id).await {
                    Ok(chs) => r.step("channels", true, format!("@{} is a member of {} channels (direct messages included)", me.username, chs.len())),
                    Err(e) => r.step("channels", false, format!("could not list the bot's channels: {}", e.message())),
                }
            }
            Err(RestError::Unauthorized(m)) => r.step("access_token", false, format!("{m}: {}", crate::websocket::UNAUTHORIZED_HELP)),
            Err(e) => r.step("access_token", false, e.message().to_owned()),
        }
        r.unverifiable.push(
            "whether the WebSocket API is reachable through every proxy in between: the channel's status shows the live connection".into(),
        );
        r
    }

    fn typing_interval(&self) -> Option<Duration> {
        self.0.settings.typing_indicator.then_some(TYPING_EVERY)
    }

    async fn typing(&self, inbound: &Inbound) {
        let bot = &self.0;
        let channel_id = inbound.route.get("channel_id").and_then(|v| v.as_str()).unwrap_or(&inbound.platform_conversation);
        let parent = inbound.thread.as_deref().unwrap_or("");
        if let Err(e) = bot.rest.typing(&bot.my_id(), channel_id, parent).await {
            tracing::debug!(error = e.message(), "typing indicator not shown");
        }
    }

    fn connector(&self) -> Option<Arc<dyn Connector>> {
        Some(Arc::new(crate::websocket::WsConnector(self.0.clone())))
    }
}
