//! The WebSocket: Botkit's web-client protocol with signed identities, one live socket per
//! conversation, and replay from a watermark.
//!
//! A socket is anonymous until its first `hello` / `welcome_back` (or a `?token=` on the
//! upgrade URL). With a valid token it becomes that user's socket; without one patchbay makes
//! a new user and answers `hello` with the token. The answer is `hello` (new user),
//! `welcome_back` (known user) or `reconnect` (the conversation had a live socket, or one that
//! closed within `reconnect_window_secs`), then every reply after the client's `watermark`
//! is replayed in order. After that, replies arrive as they are sent; a sequence number is
//! never written twice to a socket, and a gap is filled from the log first.

use crate::http::{session_frame, take_message};
use crate::hub::{Push, SocketTx};
use crate::token::{looks_like_token, Claims};
use crate::wire::{self, ClientKind, FrameError};
use crate::{Inner, Webchat};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use actix_ws::{AggregatedMessage, CloseCode, CloseReason, Session};
use patchbay_channel_core::channel::error_response;
use patchbay_channel_core::{HookCtx, LogRange};
use serde_json::{json, Value};
use std::time::Duration;

/// Frames larger than this close the socket (1009); between `max_frame_bytes` and this they
/// are answered with an error frame and the socket is kept.
const HARD_FRAME_LIMIT: usize = 1024 * 1024;
const HEARTBEAT: Duration = Duration::from_secs(30);
/// The longest a frame may wait for a client to read.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// A replay reads the log in pages of this many, and at most this many pages.
const REPLAY_PAGE: usize = 200;
const REPLAY_MAX_PAGES: usize = 50;

pub async fn upgrade(chat: Webchat, ctx: HookCtx, req: &HttpRequest, body: web::Payload) -> HttpResponse {
    let inner = &chat.0;
    // A token on the URL is checked before upgrading, so a bad one gets a plain status.
    let query_token = web::Query::<std::collections::HashMap<String, String>>::from_query(req.query_string())
        .ok()
        .and_then(|q| q.get("token").cloned());
    let preset = match query_token {
        Some(t) => match inner.signer.verify(&t, Inner::now_secs()) {
            Ok(c) => Some(c),
            Err(e) => return error_response(StatusCode::UNAUTHORIZED, e.code(), e.message(), Some("token")),
        },
        None => None,
    };
    let (resp, session, stream) = match actix_ws::handle(req, body) {
        Ok(x) => x,
        Err(e) => {
            return error_response(StatusCode::BAD_REQUEST, "bad_upgrade", &format!("not a WebSocket upgrade: {e}"), None)
        }
    };
    let stream = stream.max_frame_size(HARD_FRAME_LIMIT).aggregate_continuations().max_continuation_size(HARD_FRAME_LIMIT);
    actix_web::rt::spawn(async move {
        let mut s = Socket {
            chat: chat.clone(),
            ctx,
            session,
            user: None,
            last_sent: 0,
            name: None,
        };
        s.run(stream, preset).await;
    });
    resp
}

struct Socket {
    chat: Webchat,
    ctx: HookCtx,
    session: Session,
    /// Set once attached: (claims, connection number).
    user: Option<(Claims, u64)>,
    /// The newest sequence number this socket has written (or the client said it has).
    last_sent: i64,
    name: Option<String>,
}

enum Flow {
    Continue,
    Stop,
}

impl Socket {
    fn inner(&self) -> &Inner {
        &self.chat.0
    }

    /// Writes a frame; a client that has not taken a frame for [`SEND_TIMEOUT`] (its
    /// buffers full: it stopped reading) is dropped, and replays what it missed when it
    /// comes back.
    async fn send(&mut self, v: &Value) -> Flow {
        match tokio::time::timeout(SEND_TIMEOUT, self.session.text(v.to_string())).await {
            Ok(Ok(())) => Flow::Continue,
            Ok(Err(_)) => Flow::Stop,
            Err(_) => {
                tracing::debug!("a web chat client stopped reading; its socket is closed");
                Flow::Stop
            }
        }
    }

    async fn error(&mut self, e: FrameError) -> Flow {
        self.send(&e.frame()).await
    }

    async fn run(&mut self, mut stream: actix_ws::AggregatedMessageStream, preset: Option<Claims>) {
        let (tx, mut rx, kick) = SocketTx::new();
        let mut tx = Some(tx);
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.tick().await;
        let mut alive = true;
        let mut preset = preset;
        let close: Option<CloseReason> = loop {
            tokio::select! {
                msg = stream.recv() => {
                    let Some(msg) = msg else { break None };
                    match msg {
                        Ok(AggregatedMessage::Text(text)) => {
                            alive = true;
                            if let Flow::Stop = self.on_text(text.as_bytes(), &mut tx, &mut preset).await {
                                break None;
                            }
                        }
                        Ok(AggregatedMessage::Binary(_)) => {
                            if let Flow::Stop = self.error(FrameError::new("binary_not_supported", "send JSON text frames")).await {
                                break None;
                            }
                        }
                        Ok(AggregatedMessage::Ping(p)) => {
                            alive = true;
                            if self.session.pong(&p).await.is_err() {
                                break None;
                            }
                        }
                        Ok(AggregatedMessage::Pong(_)) => alive = true,
                        Ok(AggregatedMessage::Close(_)) => break Some(CloseReason::from(CloseCode::Normal)),
                        Err(e) => {
                            // Oversized past the hard limit, or not WebSocket at all: nothing safe to keep.
                            let code = if matches!(e, actix_ws::ProtocolError::Overflow) { CloseCode::Size } else { CloseCode::Protocol };
                            let _ = self.send(&wire::error_frame("protocol_error", &e.to_string())).await;
                            break Some(CloseReason { code, description: Some(e.to_string()) });
                        }
                    }
                }
                push = rx.recv(), if self.user.is_some() => {
                    let Some(push) = push else { break None };
                    match push {
                        Push::Logged(seq, frame) => {
                            if let Flow::Stop = self.deliver(seq, frame).await {
                                break None;
                            }
                        }
                        Push::Typing => {
                            if let Flow::Stop = self.send(&json!({"type": "typing"})).await {
                                break None;
                            }
                        }
                        Push::Close { reason, message } => {
                            let _ = self.send(&json!({"type": "disconnect", "reason": reason, "message": message})).await;
                            break Some(CloseReason { code: CloseCode::Other(4000), description: Some(reason.to_owned()) });
                        }
                    }
                }
                _ = kick.notify.notified() => {
                    if let Some((reason, message)) = kick.take() {
                        let _ = self.send(&json!({"type": "disconnect", "reason": reason, "message": message})).await;
                        break Some(CloseReason { code: CloseCode::Other(4000), description: Some(reason.to_owned()) });
                    }
                }
                _ = heartbeat.tick() => {
                    if !alive {
                        break Some(CloseReason { code: CloseCode::Away, description: Some("no pong".into()) });
                    }
                    alive = false;
                    if self.session.ping(b"").await.is_err() {
                        break None;
                    }
                }
            }
        };
        if let Some((claims, conn)) = self.user.take() {
            self.inner().hub.detach(&claims.user, conn, self.last_sent);
        }
        // The client may have stopped reading: the close frame must not wait for it forever.
        let _ = tokio::time::timeout(SEND_TIMEOUT, self.session.clone().close(close)).await;
    }

    async fn on_text(&mut self, bytes: &[u8], tx: &mut Option<SocketTx>, preset: &mut Option<Claims>) -> Flow {
        let max = self.inner().settings.max_frame_bytes;
        if bytes.len() > max {
            return self
                .error(FrameError::new("frame_too_large", format!("frames are limited to {max} bytes")))
                .await;
        }
        let frame = match wire::parse(bytes) {
            Ok(f) => f,
            Err(e) => return self.error(e).await,
        };
        // A frame may name a token; it must be this socket's user's (or, before the socket
        // is attached, any valid one). A plain `user` (Botkit's cookie id) is not identity.
        let presented = frame
            .str("token")
            .or_else(|| frame.str("user").filter(|u| looks_like_token(u)))
            .map(str::to_owned);
        let claims = match &presented {
            Some(t) => match self.inner().signer.verify(t, Inner::now_secs()) {
                Ok(c) => Some(c),
                Err(e) => return self.error(FrameError::new(e.code(), e.message())).await,
            },
            None => None,
        };
        if let (Some((mine, _)), Some(c)) = (&self.user, &claims) {
            if mine.user != c.user {
                return self
                    .error(FrameError::new("user_mismatch", "this socket belongs to another user; open a new socket for this token"))
                    .await;
            }
        }
        if let Some(n) = frame.profile_name() {
            self.name = Some(n);
        }
        match frame.kind {
            ClientKind::Connect => {
                if self.user.is_some() {
                    // Already attached: answer again without replaying twice.
                    return Flow::Continue;
                }
                let (claims, new) = match claims.or_else(|| preset.take()) {
                    Some(c) => (c, false),
                    None => (self.inner().signer.new_user(self.inner().settings.token_ttl_secs, Inner::now_secs()).0, true),
                };
                let Some(tx) = tx.take() else { return Flow::Continue };
                self.attach(claims, new, frame.watermark(), tx).await
            }
            ClientKind::Identify | ClientKind::Typing => Flow::Continue,
            ClientKind::Message => {
                if self.user.is_none() {
                    // Botkit's client always says hello first; a bare client may skip it when it
                    // came with a token.
                    match claims.or_else(|| preset.take()) {
                        Some(c) => {
                            let Some(tx) = tx.take() else { return Flow::Continue };
                            if let Flow::Stop = self.attach(c, false, None, tx).await {
                                return Flow::Stop;
                            }
                        }
                        None => {
                            return self
                                .error(FrameError::new("hello_first", "send hello (or welcome_back with your token) before messages"))
                                .await
                        }
                    }
                }
                let Some((claims, _)) = self.user.clone() else { return Flow::Continue };
                let chat = self.chat.clone();
                let (inbound, seq) = match take_message(&chat.0, &claims, &frame, "websocket", self.name.clone()).await {
                    Ok(x) => x,
                    Err(e) => return self.error(e).await,
                };
                let id = inbound.event_id.clone();
                self.ctx.status.event_seen();
                match self.ctx.inbox.accept(&self.ctx.channel_id, inbound).await {
                    Ok(_) => {
                        // The user's own entry: the client has it, it needs no replay.
                        if seq == self.last_sent + 1 {
                            self.last_sent = seq;
                        }
                        let client_id = frame.client_id().map(str::to_owned);
                        self.send(&json!({"type": "received", "id": client_id.unwrap_or(id), "seq": seq})).await
                    }
                    Err(e) => self.error(FrameError::new("unavailable", e.to_string())).await,
                }
            }
        }
    }

    async fn attach(&mut self, claims: Claims, new: bool, watermark: Option<i64>, tx: SocketTx) -> Flow {
        let window = Duration::from_secs(self.inner().settings.reconnect_window_secs);
        // Registered first, so anything sent from now on is pushed here; the replay below
        // then reads everything logged before, and pushes it already covered are skipped.
        let attached = self.inner().hub.attach(&claims.user, tx, window);
        self.user = Some((claims.clone(), attached.conn));
        let head = match self.inner().head(&claims.user).await {
            Ok(h) => h,
            Err(e) => {
                let _ = self.error(FrameError::new("unavailable", e.to_string())).await;
                return Flow::Stop;
            }
        };
        let kind = if new {
            "hello"
        } else if attached.resumed {
            "reconnect"
        } else {
            "welcome_back"
        };
        if let Flow::Stop = self.send(&session_frame(self.inner(), kind, &claims, head)).await {
            return Flow::Stop;
        }
        // Without a watermark (Botkit's own client), replay what this process knows the last
        // socket missed, else nothing; a watermark beyond the head (an old database) is the head.
        let from = watermark.or(attached.last_delivered).unwrap_or(head).min(head);
        self.last_sent = from;
        self.fill_to(head).await
    }

    /// Writes every logged reply after `last_sent` up to `upto`, in order.
    async fn fill_to(&mut self, upto: i64) -> Flow {
        let Some((claims, _)) = self.user.clone() else { return Flow::Continue };
        for _ in 0..REPLAY_MAX_PAGES {
            if self.last_sent >= upto {
                break;
            }
            let page = match self
                .inner()
                .log
                .read(&self.inner().channel_id, &claims.user, LogRange::After(self.last_sent), REPLAY_PAGE)
                .await
            {
                Ok(p) => p,
                Err(e) => return self.error(FrameError::new("unavailable", e.to_string())).await,
            };
            if page.is_empty() {
                break;
            }
            for e in page {
                if e.seq > upto {
                    return Flow::Continue;
                }
                let seq = e.seq;
                if e.body["type"] == "message" {
                    if let Flow::Stop = self.send(&wire::with_seq(e.body, seq)).await {
                        return Flow::Stop;
                    }
                }
                self.last_sent = seq;
            }
        }
        Flow::Continue
    }

    async fn deliver(&mut self, seq: i64, frame: Value) -> Flow {
        if seq <= self.last_sent {
            return Flow::Continue;
        }
        if seq > self.last_sent + 1 {
            if let Flow::Stop = self.fill_to(seq - 1).await {
                return Flow::Stop;
            }
        }
        if seq <= self.last_sent {
            return Flow::Continue;
        }
        let flow = self.send(&frame).await;
        if let Flow::Continue = flow {
            self.last_sent = seq;
        }
        flow
    }
}
