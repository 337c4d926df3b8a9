//! The Socket Mode connector: `settings.connections` WebSocket links to Slack, no public URL.
//!
//! Each link: `apps.connections.open` with the app-level token (a fresh URL every time; a
//! URL is single-use) → WebSocket → `hello`. Every `events_api` envelope is handed to the
//! inbox and acknowledged (`{"envelope_id"}`) right after the write — never before (a crash
//! in between makes Slack redeliver) and never after the assistant. Envelopes patchbay does
//! not answer (or cannot read) are acknowledged at once, so Slack does not redeliver them
//! forever.
//!
//! - `disconnect` with `warning` / `refresh_requested`: a replacement link is opened first
//!   (its own URL, its `hello`); only then is the old one closed, so no event falls between.
//!   Meanwhile the old link keeps delivering and acknowledging.
//! - `disconnect` with `link_disabled` (Socket Mode turned off in the app's settings): the
//!   channel is failed with what to do; no reconnect loop (a slow retry every 5 minutes).
//! - `too_many_websockets`: closed first, then reconnected with backoff (reopening before
//!   closing would make it worse).
//! - Liveness: a ping every `ping_interval`; a link that sent nothing at all (no event, no
//!   pong, no ping) for four intervals is dead and replaced.
//! - Failures to connect back off exponentially with jitter (1 s doubling to 60 s; Slack's
//!   `Retry-After` is a floor). A refused token fails the channel and retries slowly.

use crate::api::ApiError;
use crate::events::{decide, Decision, Rules};
use crate::Slack;
use async_trait::async_trait;
use futures_util::{SinkExt, StreamExt};
use patchbay_channel_core::{backoff::Backoff, ChannelState, Connector, ConnectorCtx};
use serde_json::Value;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// A replacement link being opened while the old one still serves.
type Opening<'a> = Pin<Box<dyn Future<Output = Result<Ws, Ended>> + Send + 'a>>;

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How long a new link may take from `apps.connections.open` to `hello`.
const OPEN_TIMEOUT: Duration = Duration::from_secs(15);
/// After `link_disabled` or a refused token: how long before trying again.
const SLOW_RETRY: Duration = Duration::from_secs(300);

pub struct SocketConnector(pub Arc<Slack>);

/// Why a link ended.
enum Ended {
    Stopped,
    /// Connection lost or refused; reconnect with backoff (`Retry-After` as a floor).
    Lost(String, Option<Duration>),
    /// A replacement is open and its `hello` arrived; the old link is closed.
    Replaced(Box<Ws>),
    /// Something an admin must fix (token, Socket Mode off).
    Fatal(String),
}

/// Runs `fut` unless `stop` comes first.
async fn unless_stopped<T>(stop: &CancellationToken, fut: impl Future<Output = T>) -> Option<T> {
    tokio::select! {
        _ = stop.cancelled() => None,
        v = fut => Some(v),
    }
}

struct Shared {
    slack: Arc<Slack>,
    ctx: ConnectorCtx,
    live: AtomicUsize,
}

impl Shared {
    fn link_up(&self) {
        let n = self.live.fetch_add(1, Ordering::SeqCst) + 1;
        self.show(n);
    }
    fn link_down(&self) {
        let n = self.live.fetch_sub(1, Ordering::SeqCst) - 1;
        self.show(n);
    }
    fn show(&self, n: usize) {
        let want = self.slack.settings.connections as usize;
        self.ctx.status.set_detail("connections", format!("{n} of {want}").into());
        if n > 0 {
            if self.ctx.status.snapshot().state != ChannelState::Failed {
                self.ctx.status.connected();
            }
        } else if self.ctx.status.snapshot().state == ChannelState::Connected {
            self.ctx.status.connecting();
        }
    }
}

#[async_trait]
impl Connector for SocketConnector {
    async fn run(&self, ctx: ConnectorCtx, stop: CancellationToken) {
        ctx.status.connecting();
        ctx.status.set_detail("mode", "socket".into());
        let shared = Arc::new(Shared { slack: self.0.clone(), ctx: ctx.clone(), live: AtomicUsize::new(0) });
        // Installed workspaces' identities, for loop safety and mentions.
        self.0.workspaces().await;
        // Who the bot is, first (loop safety, mention detection); without a bot token the
        // events still flow (installs bring their identities).
        if self.0.settings.bot_token.is_some() {
            let backoff = Backoff { initial: Duration::from_secs(1), max: Duration::from_secs(60), factor: 2.0 };
            for attempt in 1.. {
                match unless_stopped(&stop, self.0.whoami(Some(&ctx.status))).await {
                    None => return,
                    Some(Ok(_)) => break,
                    Some(Err(ApiError::Unauthorized { message, .. })) => {
                        // Events can still be received; replies will fail until it is fixed.
                        ctx.status.failed(format!("auth.test: {message}"));
                        break;
                    }
                    Some(Err(e)) => {
                        ctx.status.error(format!("auth.test: {}", e.message()));
                        if unless_stopped(&stop, tokio::time::sleep(backoff.delay(attempt))).await.is_none() {
                            return;
                        }
                    }
                }
            }
        }
        let mut slots = tokio::task::JoinSet::new();
        for i in 0..self.0.settings.connections {
            let shared = shared.clone();
            let stop = stop.clone();
            slots.spawn(async move { slot(shared, i, stop).await });
        }
        while slots.join_next().await.is_some() {}
    }
}

/// One of the channel's links, kept open until `stop`.
async fn slot(shared: Arc<Shared>, index: u8, stop: CancellationToken) {
    let ctx = &shared.ctx;
    let backoff = Backoff { initial: Duration::from_secs(1), max: Duration::from_secs(60), factor: 2.0 };
    let mut attempt = 0u32;
    let mut next: Option<Ws> = None;
    // Bounded by `stop`: every wait selects on it.
    loop {
        let ws = match next.take() {
            Some(ws) => ws,
            None => match unless_stopped(&stop, open(&shared)).await {
                None => return,
                Some(Ok(ws)) => ws,
                Some(Err(end)) => {
                    let wait = match end {
                        Ended::Fatal(message) => {
                            tracing::error!(channel = %ctx.channel_id, link = index, error = %message, "Socket Mode cannot connect");
                            ctx.status.failed(message);
                            SLOW_RETRY
                        }
                        Ended::Lost(message, retry_after) => {
                            attempt += 1;
                            tracing::warn!(channel = %ctx.channel_id, link = index, error = %message, "Socket Mode connection failed; retrying");
                            ctx.status.reconnecting(message);
                            backoff.delay_honouring(attempt, retry_after)
                        }
                        Ended::Stopped | Ended::Replaced(_) => return,
                    };
                    if unless_stopped(&stop, tokio::time::sleep(wait)).await.is_none() {
                        return;
                    }
                    continue;
                }
            },
        };
        attempt = 0;
        if ctx.status.snapshot().state == ChannelState::Failed && shared.slack.settings.bot_token.is_some() {
            // A link is up again after a failure (Socket Mode back on): the token decides.
            if shared.slack.whoami(None).await.is_ok() {
                ctx.status.set_state(ChannelState::Connecting);
            }
        }
        shared.link_up();
        let end = run_link(&shared, index, ws, &stop).await;
        shared.link_down();
        match end {
            Ended::Stopped => return,
            Ended::Replaced(ws) => {
                tracing::info!(channel = %ctx.channel_id, link = index, "Socket Mode link refreshed");
                next = Some(*ws);
            }
            Ended::Lost(message, retry_after) => {
                tracing::warn!(channel = %ctx.channel_id, link = index, error = %message, "Socket Mode link lost; reconnecting");
                ctx.status.reconnecting(message);
                // The first retry after a working link is quick.
                attempt = 1;
                if unless_stopped(&stop, tokio::time::sleep(backoff.delay_honouring(attempt, retry_after))).await.is_none() {
                    return;
                }
            }
            Ended::Fatal(message) => {
                tracing::error!(channel = %ctx.channel_id, link = index, error = %message, "Socket Mode stopped");
                ctx.status.failed(message);
                if unless_stopped(&stop, tokio::time::sleep(SLOW_RETRY)).await.is_none() {
                    return;
                }
            }
        }
    }
}

/// A new link: a fresh URL, the WebSocket, and its `hello` (bounded by [`OPEN_TIMEOUT`]).
async fn open(shared: &Shared) -> Result<Ws, Ended> {
    match tokio::time::timeout(OPEN_TIMEOUT, open_inner(shared)).await {
        Ok(r) => r,
        Err(_) => Err(Ended::Lost("Slack did not say hello within 15 s of apps.connections.open".into(), None)),
    }
}

async fn open_inner(shared: &Shared) -> Result<Ws, Ended> {
    let app_token = shared.slack.settings.app_token.as_ref().ok_or_else(|| Ended::Fatal("socket_mode needs app_token".into()))?;
    let url = match shared.slack.api.connections_open(app_token).await {
        Ok(u) => u,
        Err(ApiError::Retryable { message, retry_after, .. }) => return Err(Ended::Lost(message, retry_after)),
        Err(ApiError::Unauthorized { message, .. }) => {
            return Err(Ended::Fatal(format!(
                "apps.connections.open: {message} (the app_token: create a new app-level token with connections:write under Basic Information → App-Level Tokens)"
            )))
        }
        Err(ApiError::Permanent { code, message }) => {
            let hint = match code.as_str() {
                "not_allowed_token_type" => "app_token must be an app-level token (xapp-), not a bot or user token",
                "socket_mode_not_enabled" => "turn Socket Mode on in the app's settings (Settings → Socket Mode)",
                _ => "check the app's Socket Mode settings and the app_token",
            };
            return Err(Ended::Fatal(format!("apps.connections.open: {message}: {hint}")));
        }
    };
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .map_err(|e| Ended::Lost(format!("cannot open the Socket Mode WebSocket: {e}"), None))?;
    // Nothing comes before `hello`; answer pings meanwhile.
    loop {
        match ws.next().await {
            None => return Err(Ended::Lost("Slack closed the new link before hello".into(), None)),
            Some(Err(e)) => return Err(Ended::Lost(format!("the new Socket Mode link failed: {e}"), None)),
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap_or(Value::Null);
                match v.get("type").and_then(Value::as_str) {
                    Some("hello") => {
                        on_hello(shared, &v);
                        return Ok(ws);
                    }
                    Some("disconnect") => {
                        let reason = v.get("reason").and_then(Value::as_str).unwrap_or("");
                        return Err(disconnect_error(reason));
                    }
                    _ => {}
                }
            }
            Some(Ok(Message::Close(_))) => return Err(Ended::Lost("Slack closed the new link before hello".into(), None)),
            Some(Ok(_)) => {}
        }
    }
}

fn disconnect_error(reason: &str) -> Ended {
    if reason == "link_disabled" {
        Ended::Fatal(LINK_DISABLED.into())
    } else {
        Ended::Lost(format!("Slack disconnected the link ({reason})"), None)
    }
}

const LINK_DISABLED: &str = "Slack disabled the Socket Mode link (link_disabled): Socket Mode was turned off in the app's settings. \
                             Turn it on again (Settings → Socket Mode), or use the Events API (socket_mode = false with a signing_secret); \
                             patchbay tries again every 5 minutes";

fn on_hello(shared: &Shared, v: &Value) {
    let ctx = &shared.ctx;
    let n = v.get("num_connections").and_then(Value::as_u64).unwrap_or(0);
    let approx = v.pointer("/debug_info/approximate_connection_time").and_then(Value::as_u64);
    tracing::info!(channel = %ctx.channel_id, num_connections = n, approximate_connection_time = approx, "Socket Mode link open");
    let want = shared.slack.settings.connections as u64;
    if n > want {
        // Slack sends each event to one connection only: another process on this app token
        // silently takes some of them.
        let msg = format!(
            "Slack counts {n} Socket Mode connections for this app but this channel keeps {want}: another process (a forgotten \
             instance?) is connected with the same app token and receives some of the events"
        );
        tracing::warn!(channel = %ctx.channel_id, "{msg}");
        ctx.status.error(msg);
    }
}

/// Serves one link until it ends.
async fn run_link(shared: &Shared, index: u8, mut ws: Ws, stop: &CancellationToken) -> Ended {
    let ctx = &shared.ctx;
    let every = shared.slack.settings.ping_interval;
    let mut ticker = tokio::time::interval_at(Instant::now() + every, every);
    let mut last_rx = Instant::now();
    let mut replacement: Option<Opening<'_>> = None;
    // Bounded by the link's life and by `stop`.
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                let _ = tokio::time::timeout(Duration::from_millis(300), ws.close(None)).await;
                return Ended::Stopped;
            }
            new = async { replacement.as_mut().unwrap().await }, if replacement.is_some() => {
                replacement = None;
                match new {
                    Ok(new) => {
                        // Make before break: the new link said hello; now the old one goes.
                        let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
                        return Ended::Replaced(Box::new(new));
                    }
                    Err(Ended::Fatal(m)) => return Ended::Fatal(m),
                    Err(_) => {
                        // Keep the old link for as long as Slack keeps it; it will end and
                        // be reconnected with backoff.
                        tracing::warn!(channel = %ctx.channel_id, link = index, "could not open a replacement link yet");
                    }
                }
            }
            _ = ticker.tick() => {
                if last_rx.elapsed() >= every * 4 {
                    return Ended::Lost(format!(
                        "Slack sent nothing for {} ms, not even a pong: the link is dead",
                        last_rx.elapsed().as_millis()
                    ), None);
                }
                if let Err(e) = ws.send(Message::Ping(Vec::new().into())).await {
                    return Ended::Lost(format!("cannot send a ping: {e}"), None);
                }
            }
            frame = ws.next() => {
                last_rx = Instant::now();
                match frame {
                    None => return Ended::Lost("Slack closed the link".into(), None),
                    Some(Err(e)) => return Ended::Lost(format!("the Socket Mode link failed: {e}"), None),
                    Some(Ok(Message::Close(f))) => {
                        let why = f.map(|f| format!(" (code {}, {})", u16::from(f.code), f.reason)).unwrap_or_default();
                        return Ended::Lost(format!("Slack closed the link{why}"), None);
                    }
                    Some(Ok(Message::Text(text))) => {
                        let v: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
                        match v.get("type").and_then(Value::as_str).unwrap_or("") {
                            "disconnect" => {
                                let reason = v.get("reason").and_then(Value::as_str).unwrap_or("").to_owned();
                                tracing::info!(channel = %ctx.channel_id, link = index, reason = %reason, "Slack asks to reconnect");
                                match reason.as_str() {
                                    "link_disabled" => {
                                        let _ = tokio::time::timeout(Duration::from_millis(300), ws.close(None)).await;
                                        return Ended::Fatal(LINK_DISABLED.into());
                                    }
                                    "too_many_websockets" => {
                                        let _ = tokio::time::timeout(Duration::from_millis(300), ws.close(None)).await;
                                        return Ended::Lost("Slack refused another link (too_many_websockets): more than 10 for this app".into(), Some(Duration::from_secs(5)));
                                    }
                                    _ => {
                                        if replacement.is_none() {
                                            replacement = Some(Box::pin(open(shared)));
                                        }
                                    }
                                }
                            }
                            "hello" => on_hello(shared, &v),
                            _ => {
                                if let Some(reply) = on_envelope(shared, &v).await {
                                    if let Err(e) = ws.send(Message::text(reply)).await {
                                        return Ended::Lost(format!("cannot acknowledge an envelope: {e}"), None);
                                    }
                                }
                            }
                        }
                    }
                    Some(Ok(_)) => {}
                }
            }
        }
    }
}

/// Handles one envelope; answers the ack to send, if any (none when the inbox could not
/// store it: Slack redelivers).
async fn on_envelope(shared: &Shared, v: &Value) -> Option<String> {
    let ctx = &shared.ctx;
    let envelope_id = v.get("envelope_id").and_then(Value::as_str)?;
    let ack = serde_json::json!({ "envelope_id": envelope_id }).to_string();
    if v.get("type").and_then(Value::as_str) != Some("events_api") {
        // Slash commands and interactivity are not served: acknowledged, not answered.
        return Some(ack);
    }
    let payload = v.get("payload").cloned().unwrap_or(Value::Null);
    let retry = v.get("retry_attempt").and_then(Value::as_u64).unwrap_or(0);
    if retry > 0 {
        let reason = v.get("retry_reason").and_then(|r| r.as_str()).unwrap_or("");
        tracing::debug!(channel = %ctx.channel_id, retry, reason, "a redelivered envelope");
    }
    if payload.get("type").and_then(Value::as_str) != Some("event_callback") {
        return Some(ack);
    }
    let slack = &shared.slack;
    let rules = Rules { respond_to: slack.settings.respond_to, team_id: slack.settings.team_id.as_deref() };
    let team = crate::events::team_of(&payload).to_owned();
    let identity = slack.identity(&team);
    match decide(&payload, &rules, identity.as_ref()) {
        Decision::Uninstalled { team_id } => slack.forget_workspace(&team_id, "app_uninstalled").await,
        Decision::TokensRevoked { team_id, bot_users } => slack.tokens_revoked(&team_id, &bot_users).await,
        Decision::Ignore(why) => tracing::debug!(channel = %ctx.channel_id, why, "event not answered"),
        Decision::Answer(inbound) => {
            ctx.status.event_seen();
            if let Err(e) = ctx.inbox.accept(&ctx.channel_id, *inbound).await {
                tracing::warn!(channel = %ctx.channel_id, error = %e, "an event could not be stored; Slack will redeliver it");
                return None;
            }
        }
    }
    Some(ack)
}
