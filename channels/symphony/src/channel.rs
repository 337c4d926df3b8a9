//! The channel: replies through `POST /agent/v4/stream/{sid}/message/create` (multipart,
//! MessageML), failures reported to `error_room` and the user's stream (`inform_client`),
//! and `check` (sign in, `sessioninfo`, the error room).

use crate::api::{Api, ApiError, Body};
use crate::auth::{AuthError, Step};
use crate::event::BotInfo;
use crate::messageml::{escape, multipart, render, url_safe_stream_id};
use crate::settings::{Auth, Which};
use actix_web::{http::StatusCode, web, HttpRequest, HttpResponse};
use async_trait::async_trait;
use futures_util::future::LocalBoxFuture;
use patchbay_channel_core::{
    channel::error_response, Channel, ChannelId, CheckReport, Connector, Delivered, HookCtx, OutboundReply, SendError,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// What the channel and its connector share.
pub struct Symphony {
    pub channel_id: ChannelId,
    pub api: Api,
    /// Learnt from `sessioninfo`: whose messages to ignore, whose mention addresses the bot.
    pub bot: Mutex<Option<BotInfo>>,
    /// The error room's stream id, once found.
    error_stream: tokio::sync::Mutex<Option<String>>,
    /// Parts of a split reply already posted, by reply id, so a retry resumes at the part
    /// that failed.
    progress: Mutex<HashMap<String, usize>>,
}

pub struct SymphonyChannel(pub Arc<Symphony>);

impl SymphonyChannel {
    pub fn new(channel_id: ChannelId, api: Api) -> SymphonyChannel {
        SymphonyChannel(Arc::new(Symphony {
            channel_id,
            api,
            bot: Mutex::new(None),
            error_stream: tokio::sync::Mutex::new(None),
            progress: Mutex::new(HashMap::new()),
        }))
    }
}

impl Symphony {
    /// `GET /pod/v2/sessioninfo`.
    pub async fn sessioninfo(&self) -> Result<BotInfo, ApiError> {
        let a = self.api.call(Which::Pod, reqwest::Method::GET, "/pod/v2/sessioninfo", &Body::None, self.api.settings.timeout).await?;
        if !a.ok() {
            return Err(ApiError::Network(format!("GET /pod/v2/sessioninfo answered {}: {}", a.status, a.error_text())));
        }
        let v: serde_json::Value = a.json().map_err(ApiError::Network)?;
        let bot = BotInfo::from_sessioninfo(&v).ok_or_else(|| ApiError::Network("sessioninfo has no user id".into()))?;
        *self.bot.lock().unwrap() = Some(bot.clone());
        Ok(bot)
    }

    /// Posts one MessageML message; answers the new message's id.
    pub async fn post_message(&self, stream_id: &str, message_ml: &str) -> Result<String, SendError> {
        let sid = url_safe_stream_id(stream_id);
        let (boundary, bytes) = multipart(&[("message", message_ml)]);
        let path = format!("/agent/v4/stream/{sid}/message/create");
        let answer = self
            .api
            .call(Which::Agent, reqwest::Method::POST, &path, &Body::Multipart { boundary, bytes }, self.api.settings.timeout)
            .await;
        let a = match answer {
            Ok(a) => a,
            Err(ApiError::Auth(e)) if e.is_retryable() => return Err(SendError::retryable(e.message())),
            Err(ApiError::Network(m)) => return Err(SendError::retryable(m)),
            Err(e) => return Err(SendError::Unauthorized(e.message().to_owned())),
        };
        if a.ok() {
            /// Only the id of what was posted; the rest of the answer is skipped unread.
            #[derive(serde::Deserialize, Default)]
            struct Created {
                #[serde(rename = "messageId", default)]
                message_id: Option<String>,
            }
            let created: Created = a.json().unwrap_or_default();
            return Ok(created.message_id.unwrap_or_default());
        }
        let text = a.error_text();
        match a.status {
            400 => Err(SendError::Permanent(format!("Symphony refused the message (400): {text}"))),
            403 => Err(SendError::Permanent(format!(
                "Symphony refused the message (403: {text}): the bot is not a member of stream {sid} or lacks the entitlement to post; add it to the room"
            ))),
            404 => Err(SendError::Permanent(format!("Symphony does not know stream {sid} (404): {text}"))),
            451 => Err(SendError::Permanent(format!("Symphony's compliance rules blocked the message (451): {text}"))),
            429 => Err(SendError::Retryable { message: format!("Symphony is rate limiting (429): {text}"), retry_after: a.retry_after }),
            500..=599 => Err(SendError::Retryable { message: format!("Symphony answered {}: {text}", a.status), retry_after: a.retry_after }),
            s => Err(SendError::Permanent(format!("Symphony answered {s}: {text}"))),
        }
    }

    /// The error room's stream id, looked up by name (`POST /pod/v3/room/search`, exact name).
    pub async fn error_stream(&self) -> Result<Option<String>, String> {
        let Some(name) = self.api.settings.error_room.clone() else { return Ok(None) };
        let mut cached = self.error_stream.lock().await;
        if let Some(id) = cached.clone() {
            return Ok(Some(id));
        }
        let body = Body::Json(serde_json::json!({"query": name}));
        let a = self
            .api
            .call(Which::Pod, reqwest::Method::POST, "/pod/v3/room/search?limit=100", &body, self.api.settings.timeout)
            .await
            .map_err(|e| format!("looking up the error room: {}", e.message()))?;
        if !a.ok() {
            return Err(format!("looking up the error room: POST /pod/v3/room/search answered {}: {}", a.status, a.error_text()));
        }
        let v: serde_json::Value = a.json()?;
        let found = v["rooms"].as_array().into_iter().flatten().find(|r| r["roomAttributes"]["name"].as_str() == Some(name.as_str()));
        match found.and_then(|r| r["roomSystemInfo"]["id"].as_str()) {
            Some(id) => {
                *cached = Some(id.to_owned());
                Ok(Some(id.to_owned()))
            }
            None => Err(format!(
                "error_room: no room named \"{name}\" is visible to the bot; create it or add the bot to it, or correct the name"
            )),
        }
    }

    /// Tells the error room and (with `inform_client`) the user's stream that a reply was not
    /// delivered. Best effort: failures here are logged, never retried.
    async fn report_failure(&self, reply: &OutboundReply, stream_id: &str, why: &str) {
        let s = &self.api.settings;
        match self.error_stream().await {
            Ok(Some(room)) => {
                let text = format!(
                    "patchbay ({}) could not deliver a reply to stream {} (conversation {}, reply {}): {why}",
                    self.channel_id, url_safe_stream_id(stream_id), reply.conversation_id, reply.reply_id
                );
                if let Err(e) = self.post_message(&room, &format!("<messageML>{}</messageML>", escape(&text))).await {
                    tracing::warn!(channel = %self.channel_id, error = %e, "could not report a delivery failure to the error room");
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(channel = %self.channel_id, error = %e, "could not report a delivery failure"),
        }
        if s.inform_client {
            let text = "Sorry, a reply to your message could not be delivered on Symphony.";
            if let Err(e) = self.post_message(stream_id, &format!("<messageML>{}</messageML>", escape(text))).await {
                tracing::warn!(channel = %self.channel_id, error = %e, "could not tell the user that a reply was not delivered");
            }
        }
    }

    async fn send(&self, reply: &OutboundReply) -> Result<Delivered, SendError> {
        let stream_id = reply
            .route
            .get("stream_id")
            .and_then(|v| v.as_str())
            .unwrap_or(&reply.platform_conversation)
            .to_owned();
        if stream_id.is_empty() {
            return Err(SendError::Permanent("the conversation has no Symphony stream id to post into".into()));
        }
        let parts = render(&reply.reply);
        let done = self.progress.lock().unwrap().get(&reply.reply_id).copied().unwrap_or(0);
        let mut last = None;
        for (i, part) in parts.iter().enumerate().skip(done) {
            match self.post_message(&stream_id, part).await {
                Ok(id) => last = Some(id),
                Err(e) => {
                    if i > 0 {
                        self.progress.lock().unwrap().insert(reply.reply_id.clone(), i);
                    }
                    let e = match (e, self.api.settings.max_attempts) {
                        (SendError::Retryable { message, .. }, Some(max)) if reply.attempt >= max => SendError::Permanent(format!(
                            "{message} (gave up after {} attempts: max_attempts = {max})",
                            reply.attempt
                        )),
                        (e, _) => e,
                    };
                    if let SendError::Permanent(why) = &e {
                        self.progress.lock().unwrap().remove(&reply.reply_id);
                        self.report_failure(reply, &stream_id, why).await;
                    }
                    return Err(e);
                }
            }
        }
        self.progress.lock().unwrap().remove(&reply.reply_id);
        Ok(Delivered { platform_message_id: last })
    }

    async fn check(&self) -> CheckReport {
        let s = &self.api.settings;
        let mut r = CheckReport::default();
        let method = match s.auth {
            Auth::Rsa(_) => "RSA JWT",
            Auth::Certificate(_) => "client certificate",
        };
        let mut proxies: Vec<String> = [&s.pod, &s.agent, &s.session_auth, &s.key_manager]
            .iter()
            .filter_map(|ep| ep.proxy.as_ref().map(|p| format!("{} via {}", ep.which.label(), p.url())))
            .collect();
        proxies.dedup();
        let session_ep = match s.auth {
            Auth::Rsa(_) => format!("{}/login/pubkey/authenticate", s.pod.base),
            Auth::Certificate(_) => format!("{}/sessionauth/v1/authenticate", s.session_auth.base),
        };
        match self.api.sign_in_now().await {
            Ok(session) => {
                if !proxies.is_empty() {
                    r.step("proxy", true, format!("the proxies accepted the credentials: {}", proxies.join(", ")));
                }
                r.step("session auth", true, format!("{session_ep} accepted {} ({method})", s.bot_username));
                if session.tokens.skd {
                    r.step("key manager", true, "skipped: the session allows simplified key delivery (agent 24.12 or later)");
                } else {
                    r.step("key manager", true, format!("{} issued a key manager token", s.key_manager.base));
                }
                match self.sessioninfo().await {
                    Ok(bot) => r.step("sessioninfo", true, format!("the bot is {} (@{}, user id {})", bot.display_name, bot.username, bot.id)),
                    Err(e) => r.step("sessioninfo", false, e.message().to_owned()),
                }
                if s.error_room.is_some() {
                    match self.error_stream().await {
                        Ok(Some(id)) => r.step("error_room", true, format!("found (stream {id})")),
                        Ok(None) => {}
                        Err(e) => r.step("error_room", false, e),
                    }
                }
            }
            Err(e @ (AuthError::Proxy { .. } | AuthError::ProxyUnreachable { .. })) => r.step("proxy", false, e.message().to_owned()),
            Err(e) => {
                if e.step() == Step::KeyManager {
                    r.step("session auth", true, format!("{session_ep} accepted {} ({method})", s.bot_username));
                }
                r.step(e.step().label(), false, e.message().to_owned());
            }
        }
        r.unverifiable.push("whether the datafeed can be read and messages posted: the channel's status shows the datafeed".into());
        r
    }
}

#[async_trait]
impl Channel for SymphonyChannel {
    fn handle_hook<'a>(&'a self, _ctx: HookCtx, _req: HttpRequest, _body: web::Payload) -> LocalBoxFuture<'a, HttpResponse> {
        Box::pin(async {
            error_response(
                StatusCode::NOT_FOUND,
                "no_hook",
                "a Symphony channel reads the pod's datafeed and has no callback URL",
                None,
            )
        })
    }

    async fn send(&self, reply: &OutboundReply) -> Result<Delivered, SendError> {
        self.0.send(reply).await
    }

    async fn check(&self) -> CheckReport {
        self.0.check().await
    }

    fn connector(&self) -> Option<Arc<dyn Connector>> {
        Some(Arc::new(crate::datafeed::Datafeed(self.0.clone())))
    }
}
