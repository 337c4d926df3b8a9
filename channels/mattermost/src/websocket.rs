//! The connector: a bot listening on Mattermost's WebSocket API (`/api/v4/websocket`).
//!
//! - Authenticates twice over: `Authorization: Bearer` on the upgrade (only a connection
//!   authenticated at the upgrade can be resumed) and the `authentication_challenge` action
//!   (for proxies that drop the header; the server ignores it on an authenticated connection).
//!   `hello` may come before or after the challenge's reply; nothing waits for either.
//! - Tracks the server's event `seq`; reconnects with `connection_id` and `sequence_number`.
//!   A `hello` carrying a different connection id (resume refused), or a `seq` that skips,
//!   means events were lost: the posts of every channel the bot is in are fetched over REST
//!   (`after=` the last post seen there, else `since=` the newest time seen) and handed to the
//!   inbox like live ones. The pipeline dedupes on the post id, so overlaps are harmless.
//! - Liveness: a `ping` action every `ping_interval`; a socket that has sent nothing since the
//!   previous ping is dead (detected within two intervals).
//! - 401 marks the channel failed and waits (long backoff) for the token to work again.

use crate::bot::Bot;
use crate::posted::{decide, parse_posted, BotIdentity, Decision, Rules, Where};
use crate::rest::{Post, RestError};
use async_trait::async_trait;
use futures_util::{FutureExt, SinkExt, StreamExt};
use patchbay_channel_core::{backoff::Backoff, Connector, ConnectorCtx};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// The most posts stored in one durable write (frames already read, or one catch-up page).
const MAX_BATCH: usize = 256;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest, Message};
use tokio_util::sync::CancellationToken;

/// What an admin must do when Mattermost refuses the token.
pub const UNAUTHORIZED_HELP: &str = "the bot's personal access token was revoked, or the bot account was deactivated or lost its \
     access; create a new token (Integrations → Bot Accounts → Create New Token, or System Console → Users for a user \
     account) and paste it into this channel's access_token";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub struct WsConnector(pub Arc<Bot>);

/// What one connection's life ended with.
enum Ended {
    Stopped,
    Unauthorized(String),
    Lost(String),
}

/// What survives reconnects within one run of the connector.
#[derive(Default)]
struct Session {
    connection_id: Option<String>,
    /// The `seq` the next event must carry.
    next_seq: i64,
    /// Events may have been missed: fetch posts over REST before going on.
    catch_up: bool,
    /// The newest post time seen (server clock), or when the first connection was made.
    watermark: Option<i64>,
    /// Per channel, the newest post seen: (create_at, id).
    last_post: HashMap<String, (i64, String)>,
}

impl Session {
    fn seen(&mut self, post: &Post) {
        if post.create_at > 0 {
            self.watermark = Some(self.watermark.map_or(post.create_at, |w| w.max(post.create_at)));
        }
        let newer = self.last_post.get(&post.channel_id).is_none_or(|(t, _)| post.create_at >= *t);
        if newer {
            self.last_post.insert(post.channel_id.clone(), (post.create_at, post.id.clone()));
        }
    }
}

/// Runs `fut` unless `stop` comes first.
async fn unless_stopped<T>(stop: &CancellationToken, fut: impl Future<Output = T>) -> Option<T> {
    tokio::select! {
        _ = stop.cancelled() => None,
        v = fut => Some(v),
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

#[async_trait]
impl Connector for WsConnector {
    async fn run(&self, ctx: ConnectorCtx, stop: CancellationToken) {
        let bot = &self.0;
        ctx.status.set_detail("server", bot.settings.server_url.as_str().into());
        let backoff = Backoff { initial: Duration::from_millis(500), max: Duration::from_secs(60), factor: 2.0 };
        let mut session = Session::default();
        let mut attempt = 0u32;
        // Bounded by `stop`: every wait below selects on it.
        loop {
            let mut connected = false;
            match self.connection(&ctx, &stop, &mut session, &mut connected).await {
                Ended::Stopped => return,
                Ended::Unauthorized(message) => {
                    if !self.wait_for_valid_token(&ctx, &stop, message).await {
                        return;
                    }
                    attempt = 0;
                }
                Ended::Lost(message) => {
                    tracing::warn!(channel = %ctx.channel_id, error = %message, "Mattermost connection lost; reconnecting");
                    ctx.status.reconnecting(message);
                    attempt = if connected { 1 } else { attempt + 1 };
                    let delay = backoff.delay(attempt);
                    if unless_stopped(&stop, tokio::time::sleep(delay)).await.is_none() {
                        return;
                    }
                }
            }
        }
    }
}

impl WsConnector {
    /// A 401: the channel is failed until the token works again. Retries slowly so a revoked
    /// token does not hammer the server (an admin's new token rebuilds the channel anyway).
    /// Answers false when stopped.
    async fn wait_for_valid_token(&self, ctx: &ConnectorCtx, stop: &CancellationToken, message: String) -> bool {
        tracing::error!(channel = %ctx.channel_id, error = %message, "Mattermost refused the access token");
        ctx.status.failed(format!("{message}: {UNAUTHORIZED_HELP}"));
        let slow = Backoff { initial: Duration::from_secs(60), max: Duration::from_secs(30 * 60), factor: 2.0 };
        for attempt in 1.. {
            if unless_stopped(stop, tokio::time::sleep(slow.delay(attempt))).await.is_none() {
                return false;
            }
            match unless_stopped(stop, self.0.rest.me()).await {
                None => return false,
                Some(Err(RestError::Unauthorized(_))) => continue,
                Some(_) => return true,
            }
        }
        true
    }

    fn ws_request(&self, session: &Session) -> Result<tungstenite::handshake::client::Request, String> {
        let bot = &self.0;
        let mut url = bot.rest.url("websocket");
        let scheme = if url.scheme() == "https" { "wss" } else { "ws" };
        url.set_scheme(scheme).map_err(|_| "cannot build the WebSocket URL".to_owned())?;
        if let Some(id) = &session.connection_id {
            url.query_pairs_mut()
                .append_pair("connection_id", id)
                .append_pair("sequence_number", &session.next_seq.to_string());
        }
        let mut req = url.as_str().into_client_request().map_err(|e| format!("bad WebSocket URL: {e}"))?;
        let auth = format!("Bearer {}", bot.settings.access_token.expose());
        req.headers_mut().insert(
            "authorization",
            auth.parse().map_err(|_| "the access token cannot be sent in a header".to_owned())?,
        );
        Ok(req)
    }

    /// One connection, from `users/me` to its end.
    async fn connection(&self, ctx: &ConnectorCtx, stop: &CancellationToken, session: &mut Session, connected: &mut bool) -> Ended {
        let bot = &self.0;
        let me = match unless_stopped(stop, bot.rest.me()).await {
            None => return Ended::Stopped,
            Some(Ok(me)) => BotIdentity { id: me.id, username: me.username },
            Some(Err(RestError::Unauthorized(m))) => return Ended::Unauthorized(m),
            Some(Err(e)) => return Ended::Lost(e.message().to_owned()),
        };
        *bot.me.lock().unwrap() = Some(me.clone());
        ctx.status.set_detail("bot", format!("@{}", me.username).into());
        let mut team_names = HashMap::new();
        if !bot.settings.teams.is_empty() {
            match unless_stopped(stop, bot.rest.my_teams(&me.id)).await {
                None => return Ended::Stopped,
                Some(Ok(teams)) => team_names.extend(teams.into_iter().map(|t| (t.name, t.id))),
                Some(Err(RestError::Unauthorized(m))) => return Ended::Unauthorized(m),
                Some(Err(e)) => return Ended::Lost(e.message().to_owned()),
            }
        }
        let rules = Rules::new(&bot.settings, &team_names);

        let req = match self.ws_request(session) {
            Ok(r) => r,
            Err(e) => return Ended::Lost(e),
        };
        let mut ws: Ws = match unless_stopped(stop, tokio::time::timeout(CONNECT_TIMEOUT, tokio_tungstenite::connect_async(req))).await {
            None => return Ended::Stopped,
            Some(Err(_)) => return Ended::Lost("the WebSocket upgrade did not complete in time".into()),
            Some(Ok(Err(tungstenite::Error::Http(resp)))) => {
                let body = resp.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default().into_owned();
                let status = reqwest::StatusCode::from_u16(resp.status().as_u16()).unwrap_or(reqwest::StatusCode::BAD_GATEWAY);
                let message = crate::rest::app_error(status, &body);
                return if status == reqwest::StatusCode::UNAUTHORIZED { Ended::Unauthorized(message) } else { Ended::Lost(message) };
            }
            Some(Ok(Err(e))) => return Ended::Lost(format!("cannot open the WebSocket: {e}")),
            Some(Ok(Ok((ws, _)))) => ws,
        };
        let mut client_seq = 1i64;
        let challenge = serde_json::json!({
            "seq": client_seq, "action": "authentication_challenge",
            "data": {"token": bot.settings.access_token.expose()},
        });
        if let Err(e) = ws.send(Message::text(challenge.to_string())).await {
            return Ended::Lost(format!("cannot send the authentication challenge: {e}"));
        }
        *connected = true;
        ctx.status.connected();
        if session.watermark.is_none() {
            // Nothing before the first connection is answered; a little slack covers a server
            // clock slightly behind ours (duplicates are deduped).
            session.watermark = Some(patchbay_channel_core::now_ms() - 2_000);
        }

        let every = bot.settings.ping_interval;
        let mut ticker = tokio::time::interval_at(Instant::now() + every, every);
        let mut last_rx = Instant::now();
        let mut last_ping = Instant::now();
        // Bounded by the socket's life and by `stop`.
        loop {
            if session.catch_up {
                if let Some(end) = self.catch_up(ctx, stop, session, &me, &rules).await {
                    return end;
                }
            }
            tokio::select! {
                _ = stop.cancelled() => {
                    let _ = tokio::time::timeout(Duration::from_millis(300), ws.close(None)).await;
                    return Ended::Stopped;
                }
                _ = ticker.tick() => {
                    if last_rx < last_ping {
                        return Ended::Lost(format!(
                            "Mattermost sent nothing for {} ms, not even an answer to a ping: the connection is dead",
                            last_ping.elapsed().as_millis()
                        ));
                    }
                    client_seq += 1;
                    let ping = serde_json::json!({"seq": client_seq, "action": "ping"});
                    last_ping = Instant::now();
                    if let Err(e) = ws.send(Message::text(ping.to_string())).await {
                        return Ended::Lost(format!("cannot send a ping: {e}"));
                    }
                }
                frame = ws.next() => {
                    last_rx = Instant::now();
                    match frame {
                        None => return Ended::Lost("Mattermost closed the connection".into()),
                        Some(Err(e)) => return Ended::Lost(format!("the WebSocket failed: {e}")),
                        Some(Ok(Message::Close(f))) => {
                            let why = f.map(|f| format!(" (code {}, {})", u16::from(f.code), f.reason)).unwrap_or_default();
                            return Ended::Lost(format!("Mattermost closed the connection{why}"));
                        }
                        Some(Ok(Message::Text(text))) => {
                            let mut posts = Vec::new();
                            let mut end = self.on_frame(ctx, session, &me, text.as_str(), &mut posts);
                            // The frames the socket already holds go into the same durable
                            // write: under load one commit per post would bound the rate.
                            while end.is_none() && posts.len() < MAX_BATCH {
                                match ws.next().now_or_never() {
                                    None => break,
                                    Some(Some(Ok(Message::Text(text)))) => {
                                        end = self.on_frame(ctx, session, &me, text.as_str(), &mut posts);
                                    }
                                    Some(Some(Ok(Message::Close(_)))) | Some(None) => {
                                        end = Some(Ended::Lost("Mattermost closed the connection".into()));
                                    }
                                    Some(Some(Err(e))) => end = Some(Ended::Lost(format!("the WebSocket failed: {e}"))),
                                    Some(Some(Ok(_))) => {}
                                }
                            }
                            if let Err(e) = self.handle_posts(ctx, session, &me, &rules, posts).await {
                                return e;
                            }
                            if let Some(end) = end {
                                return end;
                            }
                        }
                        Some(Ok(_)) => {}
                    }
                }
            }
        }
    }

    /// One text frame: an event or the reply to an action. A post is added to `posts`, to be
    /// handled with the others read in the same go.
    fn on_frame(&self, ctx: &ConnectorCtx, session: &mut Session, me: &BotIdentity, text: &str, posts: &mut Vec<(Post, Where)>) -> Option<Ended> {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else {
            tracing::warn!(channel = %ctx.channel_id, "ignoring a WebSocket frame that is not JSON");
            return None;
        };
        let Some(event) = v.get("event").and_then(|e| e.as_str()) else {
            if v.get("status").and_then(|s| s.as_str()) == Some("FAIL") {
                tracing::warn!(channel = %ctx.channel_id, reply = %v, "Mattermost refused a WebSocket action");
            }
            return None;
        };
        let seq = v.get("seq").and_then(|s| s.as_i64());
        if event == "hello" {
            let id = v["data"]["connection_id"].as_str().unwrap_or_default().to_owned();
            if session.connection_id.as_ref().is_some_and(|old| *old != id) {
                tracing::info!(channel = %ctx.channel_id, "Mattermost could not resume the connection; fetching missed posts");
                session.catch_up = true;
            }
            ctx.status.set_detail("connection_id", id.clone().into());
            session.connection_id = Some(id);
            session.next_seq = seq.unwrap_or(0) + 1;
            return None;
        }
        if let Some(seq) = seq {
            if seq != session.next_seq && session.connection_id.is_some() {
                tracing::info!(channel = %ctx.channel_id, expected = session.next_seq, got = seq, "events were skipped; fetching missed posts");
                session.catch_up = true;
            }
            session.next_seq = seq + 1;
        }
        if event != "posted" {
            return None;
        }
        let Some((post, w)) = parse_posted(&v["data"], &me.id) else {
            tracing::warn!(channel = %ctx.channel_id, "a posted event without a readable post");
            return None;
        };
        ctx.status.event_seen();
        posts.push((post, w));
        None
    }

    /// Stores the posts to answer in one durable write, then marks them all seen.
    async fn handle_posts(&self, ctx: &ConnectorCtx, session: &mut Session, me: &BotIdentity, rules: &Rules, posts: Vec<(Post, Where)>) -> Result<(), Ended> {
        let mut answer = Vec::new();
        for (post, w) in &posts {
            match decide(me, rules, post, w) {
                Decision::Ignore(why) => tracing::debug!(channel = %ctx.channel_id, post = %post.id, why, "not answered"),
                Decision::Answer(inbound) => answer.push(*inbound),
            }
        }
        if !answer.is_empty() {
            if let Err(e) = ctx.inbox.accept_batch(&ctx.channel_id, answer).await {
                // Not seen: the next catch-up fetches them again.
                session.catch_up = true;
                return Err(Ended::Lost(format!("{} posts could not be stored: {e}", posts.len())));
            }
        }
        for (post, _) in &posts {
            session.seen(post);
        }
        Ok(())
    }

    /// Fetches what may have been missed in every channel the bot is in. `None` when done.
    async fn catch_up(&self, ctx: &ConnectorCtx, stop: &CancellationToken, session: &mut Session, me: &BotIdentity, rules: &Rules) -> Option<Ended> {
        let rest = &self.0.rest;
        let fail = |e: RestError| match e {
            RestError::Unauthorized(m) => Ended::Unauthorized(m),
            e => Ended::Lost(format!("catching up on missed posts failed: {}", e.message())),
        };
        let channels = match unless_stopped(stop, rest.my_channels(&me.id)).await {
            None => return Some(Ended::Stopped),
            Some(Ok(c)) => c,
            Some(Err(e)) => return Some(fail(e)),
        };
        let since = session.watermark.unwrap_or_else(patchbay_channel_core::now_ms);
        let mut fetched = 0usize;
        for c in channels {
            let w = Where::from_channel(&c);
            if !rules.channel_allowed(&c.id, &w) {
                continue;
            }
            let posts = match session.last_post.get(&c.id) {
                Some((_, last)) => unless_stopped(stop, rest.posts_after(&c.id, last)).await,
                None => unless_stopped(stop, rest.posts_since(&c.id, since)).await,
            };
            let posts = match posts {
                None => return Some(Ended::Stopped),
                Some(Ok(p)) => p,
                Some(Err(e)) => return Some(fail(e)),
            };
            fetched += posts.len();
            for chunk in posts.chunks(MAX_BATCH) {
                let chunk = chunk.iter().map(|p| (p.clone(), w.clone())).collect();
                if let Err(end) = self.handle_posts(ctx, session, me, rules, chunk).await {
                    return Some(end);
                }
            }
        }
        tracing::info!(channel = %ctx.channel_id, fetched, "caught up on posts missed while disconnected");
        session.catch_up = false;
        None
    }
}
