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

use crate::conn::{Conn, Incoming, ReadError};
use crate::http::{session_frame, take_message};
use crate::hub::{Push, SocketTx};
use crate::token::{looks_like_token, Claims};
use crate::wire::{self, ClientKind, FrameError};
use crate::{Inner, Webchat};
use actix_http::ws::{CloseCode, CloseReason};
use actix_web::http::StatusCode;
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse};
use patchbay_channel_core::channel::error_response;
use patchbay_channel_core::upgrade::{HandOver, TakeOver, Upgraded};
use patchbay_channel_core::{HookCtx, LogRange};
use serde_json::{json, Value};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Frames larger than this close the socket (1009); between `max_frame_bytes` and this they
/// are answered with an error frame and the socket is kept.
const HARD_FRAME_LIMIT: usize = 1024 * 1024;
const HEARTBEAT: Duration = Duration::from_secs(30);
/// The longest a frame may wait for a client to read.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// A replay reads the log in pages of this many, and at most this many pages.
const REPLAY_PAGE: usize = 200;
const REPLAY_MAX_PAGES: usize = 50;

/// Answers an upgrade request: `101` with the socket to run once the server has handed the
/// connection over (see `patchbay_channel_core::upgrade`), or a plain status.
pub fn upgrade(chat: Webchat, ctx: HookCtx, req: &HttpRequest) -> HttpResponse {
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
    if let Err(e) = actix_http::ws::verify_handshake(req.head()) {
        return error_response(StatusCode::BAD_REQUEST, "bad_upgrade", &format!("not a WebSocket upgrade: {e}"), None);
    }
    if req.extensions().get::<HandOver>().is_none() {
        // Only patchbay's own server (src/server.rs) hands connections over.
        return error_response(
            StatusCode::NOT_IMPLEMENTED,
            "no_websocket",
            "this server does not hand WebSocket connections over",
            None,
        );
    }
    let mut resp = actix_http::ws::handshake_response(req.head()).finish();
    let run = TakeOver::new(move |up: Upgraded| {
        // Built here, not in an async block: the socket's task then holds `run`'s state only,
        // without a second copy of what the block captured.
        let s = Socket {
            chat,
            ctx,
            conn: Conn::new(up.io, up.buffered, HARD_FRAME_LIMIT),
            user: None,
            last_sent: 0,
            name: None,
        };
        Box::pin(s.run(up.stop, preset))
    });
    resp.extensions_mut().insert(run);
    HttpResponse::from(resp).map_into_boxed_body()
}

struct Socket {
    chat: Webchat,
    ctx: HookCtx,
    conn: Conn,
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

/// What woke a socket's loop.
enum Event {
    Frame(Result<Incoming, ReadError>),
    Push(Push),
    Heartbeat,
}

/// How a socket's loop ended.
enum End {
    /// The client closed the connection: nothing more can be said.
    Gone,
    /// A write failed or timed out: a close frame without a reason, if it still goes out.
    Stop,
    /// Say goodbye with this close frame.
    Close(CloseReason),
}

/// A write bounded by [`SEND_TIMEOUT`]: whether the socket goes on.
fn written(r: Result<std::io::Result<()>, tokio::time::error::Elapsed>) -> Flow {
    match r {
        Ok(Ok(())) => Flow::Continue,
        _ => Flow::Stop,
    }
}

fn close(code: CloseCode, description: Option<&str>) -> End {
    End::Close(CloseReason { code, description: description.map(str::to_owned) })
}

impl Socket {
    fn inner(&self) -> &Inner {
        &self.chat.0
    }

    /// Writes a frame; a client that has not taken a frame for [`SEND_TIMEOUT`] (its
    /// buffers full: it stopped reading) is dropped, and replays what it missed when it
    /// comes back.
    async fn send(&mut self, v: &Value) -> Flow {
        let text = v.to_string();
        match tokio::time::timeout(SEND_TIMEOUT, self.conn.send_text(&text)).await {
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

    async fn run(mut self, stop: CancellationToken, mut preset: Option<Claims>) {
        let (tx, rx) = SocketTx::new();
        let mut tx = Some(tx);
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT, HEARTBEAT);
        let mut alive = true;
        let end = loop {
            let event = tokio::select! {
                msg = self.conn.next() => Event::Frame(msg),
                push = rx.recv(), if self.user.is_some() => Event::Push(push),
                _ = heartbeat.tick() => Event::Heartbeat,
                _ = stop.cancelled() => break close(CloseCode::Away, Some("the server is restarting")),
            };
            // Boxed: what an event takes to handle (a message's storing, a replay, a write and
            // its timer) exists only while it is handled, not in every idle socket's task.
            if let Some(end) = Box::pin(self.on_event(event, &mut tx, &mut preset, &mut alive)).await {
                break end;
            }
        };
        drop(rx);
        if let Some((claims, conn)) = self.user.take() {
            self.inner().hub.detach(&claims.user, conn, self.last_sent);
        }
        // The client may have stopped reading: the close frame must not wait for it forever.
        let reason = match end {
            End::Gone => None,
            End::Stop => Some(None),
            End::Close(r) => Some(Some(r)),
        };
        Box::pin(self.conn.close(reason, SEND_TIMEOUT)).await;
    }

    /// Handles one event of the socket's loop; Some when the socket must end.
    async fn on_event(
        &mut self,
        event: Event,
        tx: &mut Option<SocketTx>,
        preset: &mut Option<Claims>,
        alive: &mut bool,
    ) -> Option<End> {
        let flow = match event {
            Event::Frame(Ok(Incoming::Text(text))) => {
                *alive = true;
                self.on_text(&text, tx, preset).await
            }
            Event::Frame(Ok(Incoming::Binary)) => {
                self.error(FrameError::new("binary_not_supported", "send JSON text frames")).await
            }
            Event::Frame(Ok(Incoming::Ping(p))) => {
                *alive = true;
                written(tokio::time::timeout(SEND_TIMEOUT, self.conn.send_pong(&p)).await)
            }
            Event::Frame(Ok(Incoming::Pong)) => {
                *alive = true;
                Flow::Continue
            }
            Event::Frame(Ok(Incoming::Close)) => return Some(close(CloseCode::Normal, None)),
            Event::Frame(Err(ReadError::Gone)) => return Some(End::Gone),
            Event::Frame(Err(ReadError::Protocol(code, message))) => {
                // Oversized past the hard limit, or not WebSocket at all: nothing safe to keep.
                let _ = self.send(&wire::error_frame("protocol_error", &message)).await;
                return Some(close(code, Some(&message)));
            }
            Event::Push(push) => return self.on_push(push).await,
            Event::Heartbeat => {
                if !*alive {
                    return Some(close(CloseCode::Away, Some("no pong")));
                }
                *alive = false;
                written(tokio::time::timeout(SEND_TIMEOUT, self.conn.send_ping()).await)
            }
        };
        match flow {
            Flow::Continue => None,
            Flow::Stop => Some(End::Stop),
        }
    }

    /// Writes what the hub pushed; Some when the socket must end.
    async fn on_push(&mut self, push: Push) -> Option<End> {
        let flow = match push {
            Push::Logged(seq, frame) => self.deliver(seq, frame).await,
            Push::Typing => self.send(&json!({"type": "typing"})).await,
            Push::Close { reason, message } => {
                let _ = self.send(&json!({"type": "disconnect", "reason": reason, "message": message})).await;
                return Some(close(CloseCode::Other(4000), Some(reason)));
            }
        };
        match flow {
            Flow::Continue => None,
            Flow::Stop => Some(End::Stop),
        }
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
                let (inbound, entry) = match take_message(&chat.0, &claims, &frame, "websocket", self.name.clone()).await {
                    Ok(x) => x,
                    Err(e) => return self.error(e).await,
                };
                let id = inbound.event_id.clone();
                self.ctx.status.event_seen();
                match self.ctx.inbox.accept_logged(&self.ctx.channel_id, inbound, entry).await {
                    Ok((_, seq)) => {
                        let client_id = frame.client_id().map(str::to_owned).unwrap_or(id);
                        let Some(seq) = seq else {
                            // Sent before (the same client id): stored once, answered once.
                            return self.send(&json!({"type": "received", "id": client_id, "duplicate": true})).await;
                        };
                        // The user's own entry: the client has it, it needs no replay.
                        if seq == self.last_sent + 1 {
                            self.last_sent = seq;
                        }
                        self.send(&json!({"type": "received", "id": client_id, "seq": seq})).await
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::Signer;
    use patchbay_channel_core::{Accepted, ChannelId, Inbound, Inbox, InboxError, MemoryLog, StatusHandle, WaitOutcome};
    use std::sync::Arc;

    struct NoInbox;

    #[async_trait::async_trait]
    impl Inbox for NoInbox {
        async fn accept(&self, _: &ChannelId, _: Inbound) -> Result<Accepted, InboxError> {
            unreachable!()
        }
        async fn accept_batch(&self, _: &ChannelId, _: Vec<Inbound>) -> Result<Vec<Accepted>, InboxError> {
            unreachable!()
        }
        async fn accept_and_wait(&self, _: &ChannelId, _: Inbound, _: Duration) -> Result<WaitOutcome, InboxError> {
            unreachable!()
        }
    }

    /// An idle socket's task holds the socket and its loop, not the room of the rarely
    /// running parts (message handling, replay, writes): those are boxed while they run.
    #[tokio::test]
    async fn an_idle_socket_task_is_small() {
        let settings = crate::settings::Settings::parse(&serde_json::json!({})).unwrap();
        let chat = Webchat(Arc::new(Inner {
            signer: Signer::new(&patchbay_channel_core::Secret::new("00".repeat(32))),
            log: Arc::new(MemoryLog::default()),
            channel_id: ChannelId::from_trusted("web".into()),
            hub: Default::default(),
            origins: Vec::new(),
            base_path: String::new(),
            limiter: crate::limit::Limiter::new(0, 1),
            settings,
        }));
        let ctx = HookCtx {
            channel_id: ChannelId::from_trusted("web".into()),
            enabled: true,
            inbox: Arc::new(NoInbox),
            status: StatusHandle::new(),
            body_limit: 0,
            subpath: "/ws".into(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (io, _) = listener.accept().await.unwrap();
        let conn = Conn::new(io, Vec::new(), HARD_FRAME_LIMIT);
        let s = Socket { chat, ctx, conn, user: None, last_sent: 0, name: None };
        let fut = s.run(CancellationToken::new(), None);
        let size = std::mem::size_of_val(&fut);
        assert!(size <= 1024, "the socket's future is {size} bytes");
        drop((fut, client));
    }
}
