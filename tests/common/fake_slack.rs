//! A protocol-faithful fake Slack, written from `shared/reference/slack.md` (§1 Events API,
//! §2 Socket Mode, §3 Web API, §4 OAuth v2). Declared by the test files that use it:
//! `#[path = "common/fake_slack.rs"] mod fake_slack;`.
//!
//! What it plays:
//! - **One workspace** (`T0ACME`, "Acme") with users, public channels (`C…`), direct
//!   messages (`D…`), the app `A0APP` and its bot user `U0BOT` / bot `B0BOT`. People post with
//!   [`FakeSlack::user_says`]; Slack turns a post into events for the app's subscriptions
//!   (default: `app_mention`, `message.channels`, `message.im` — so a mention arrives twice,
//!   as `app_mention` and as `message`, with different `event_id`s, as it does for Montag's
//!   documented setup). The bot's own posts come back as `message` events too (with
//!   `bot_id`), exactly the loop a real app must break.
//! - **Events API sender**: each event is POSTed to the Request URL, signed like Slack
//!   (`v0` HMAC with the signing secret, `X-Slack-Request-Timestamp`), and retried like Slack:
//!   a non-2xx answer or none within [`Settings::ack_timeout`] (3 s) is retried up to three
//!   times with `X-Slack-Retry-Num` and `X-Slack-Retry-Reason` (`http_timeout`, `http_error`,
//!   `connection_failed`); the retry delays are [`Settings::retry_delays`] (Slack: at once,
//!   1 min, 5 min; shortened for tests). [`FakeSlack::set_request_url`] runs the
//!   `url_verification` handshake as the app settings page does.
//! - **Web API** (`POST /api/{method}`): `auth.test`, `chat.postMessage`, `chat.update`,
//!   `chat.delete`, `apps.connections.open`, `oauth.v2.access`, with Slack's `ok:false` errors, and a fault
//!   script ([`Fault`]): HTTP 429 with `Retry-After`, 5xx, or an `ok:false` error code.
//!   Every call is recorded ([`ApiCall`]).
//! - **Socket Mode**: `apps.connections.open` hands out a `ws://` URL with a single-use
//!   ticket; the socket says `hello`, delivers `events_api` envelopes to one open connection
//!   and waits for the ack (`{"envelope_id"}`), redelivering with `retry_attempt` /
//!   `retry_reason: "timeout"` when none comes; it can send `disconnect` (`warning`,
//!   `refresh_requested`, `link_disabled`), drop a connection, or stall (stop reading, so no
//!   pong comes back).
//! - **OAuth v2**: `GET /oauth/v2/authorize` (the user approves at once) redirects to the
//!   `redirect_uri` with `code` and `state`; `oauth.v2.access` exchanges the code (HTTP Basic
//!   or form client credentials, recorded), with token rotation (`expires_in`,
//!   `refresh_token`) when [`Settings::token_rotation`] is on.
//!
//! Where the sheet is silent the fake chooses, and says so: `apps.connections.open` with a
//! bot token answers `not_allowed_token_type`; a disabled Socket Mode answers
//! `socket_mode_not_enabled` (assumed); `chat.postMessage` keeps at most 40,000 characters of
//! `text` (the docs' truncation) and records the length it was given.
#![allow(dead_code)]

use actix_web::dev::ServerHandle;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

pub const TEAM_ID: &str = "T0ACME";
pub const TEAM_NAME: &str = "Acme";
pub const APP_ID: &str = "A0APP";
pub const BOT_USER: &str = "U0BOT";
pub const BOT_ID: &str = "B0BOT";
pub const BOT_NAME: &str = "helpdesk";
pub const CLIENT_ID: &str = "1111111111.2222222222";
pub const CLIENT_SECRET: &str = "fakeclientsecret0123456789abcdef";
/// The deprecated verification token Slack still puts in every payload.
pub const VERIFICATION_TOKEN: &str = "Jhj5dZrVaK7ZwHHjRyZWjbDl";

#[derive(Clone, Debug)]
pub struct Settings {
    pub signing_secret: String,
    /// Event subscriptions: `app_mention`, `message.channels`, `message.im`.
    pub subscriptions: HashSet<&'static str>,
    /// How long Slack waits for an HTTP 2xx / a Socket Mode ack.
    pub ack_timeout: Duration,
    /// Before retry 1, 2, 3.
    pub retry_delays: [Duration; 3],
    /// oauth.v2.access hands out `xoxe.xoxb-` tokens with `expires_in` and `refresh_token`.
    pub token_rotation: bool,
    pub expires_in: u64,
    /// Server pings on Socket Mode connections this often (None: never).
    pub ws_ping_every: Option<Duration>,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            signing_secret: "8f742231b10e8888abcd99yyyzzz85a5".into(),
            subscriptions: ["app_mention", "message.channels", "message.im"].into_iter().collect(),
            ack_timeout: Duration::from_secs(3),
            retry_delays: [Duration::from_millis(10), Duration::from_millis(300), Duration::from_millis(600)],
            token_rotation: false,
            expires_in: 43_200,
            ws_ping_every: None,
        }
    }
}

/// A scripted failure of the next call to a method.
#[derive(Clone, Debug)]
pub enum Fault {
    /// HTTP 429 with `Retry-After: secs`, body `{"ok":false,"error":"ratelimited"}`.
    RateLimited { retry_after: u64 },
    /// An HTTP status with an empty body (5xx).
    Status(u16),
    /// HTTP 200 `{"ok":false,"error":code}`.
    Error(&'static str),
}

/// One Web API call as the fake saw it.
#[derive(Clone, Debug)]
pub struct ApiCall {
    pub method: String,
    pub at: Instant,
    /// `Bearer <token>` / `Basic …` / none.
    pub authorization: Option<String>,
    pub content_type: String,
    /// Body fields (JSON, or a form as strings).
    pub body: Value,
    /// What the fake answered: HTTP status and `error` (empty when ok).
    pub status: u16,
    pub error: String,
}

/// A message in a conversation.
#[derive(Clone, Debug)]
pub struct Msg {
    pub channel: String,
    pub ts: String,
    pub thread_ts: Option<String>,
    pub user: String,
    pub bot_id: Option<String>,
    pub text: String,
    /// Characters of `text` as it was given (before the 40,000 truncation).
    pub given_chars: usize,
    pub edits: u32,
    pub at: Instant,
}

/// One HTTP attempt of an event delivery.
#[derive(Clone, Debug)]
pub struct Attempt {
    pub retry_num: u32,
    pub reason: Option<&'static str>,
    /// `None`: no answer within the ack timeout, or no connection.
    pub status: Option<u16>,
    pub body: String,
    pub elapsed: Duration,
}

/// How one event was delivered (all attempts).
#[derive(Clone, Debug)]
pub struct Delivery {
    pub event_id: String,
    pub event_type: String,
    pub attempts: Vec<Attempt>,
}

impl Delivery {
    pub fn acked(&self) -> bool {
        self.attempts.iter().any(|a| a.status.is_some_and(|s| (200..300).contains(&s)))
    }
}

#[derive(Clone, Debug)]
struct Token {
    team_id: String,
    user_id: String,
    kind: TokenKind,
    revoked: bool,
    expires_at: Option<Instant>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum TokenKind {
    Bot,
    App,
}

/// A Socket Mode connection as the fake saw it.
#[derive(Clone, Debug)]
pub struct WsConn {
    pub id: usize,
    pub opened_at: Instant,
    pub closed_at: Option<Instant>,
    /// Who closed it: "client", "server" or "dropped".
    pub closed_by: Option<&'static str>,
    pub acks: Vec<String>,
    pub pings_received: u32,
}

enum WsCmd {
    Text(String),
    Ping,
    Close,
    Drop,
}

struct WsLive {
    tx: tokio::sync::mpsc::UnboundedSender<WsCmd>,
}

struct State {
    settings: Settings,
    users: HashMap<String, String>,
    channels: HashMap<String, (String, bool, HashSet<String>)>,
    messages: Vec<Msg>,
    tokens: HashMap<String, Token>,
    calls: Vec<ApiCall>,
    faults: VecDeque<(String, Fault)>,
    deliveries: Vec<Delivery>,
    request_url: Option<String>,
    ts_counter: u64,
    id_counter: u64,
    // Socket Mode
    ws_url: String,
    socket_mode: bool,
    tickets: HashSet<String>,
    conns: Vec<WsConn>,
    live: HashMap<usize, WsLive>,
    stalled: bool,
    next_conn: usize,
    // OAuth
    codes: HashMap<String, String>,
    refresh_tokens: HashMap<String, String>,
    installed_tokens: Vec<String>,
    /// chat.update: (ts, new text), in order.
    edits: Vec<(String, String)>,
    /// chat.delete: the ts deleted.
    deleted: Vec<String>,
}

struct Shared {
    state: Mutex<State>,
    acks: tokio::sync::Notify,
}

pub struct FakeSlack {
    shared: Arc<Shared>,
    url: String,
    ws_url: String,
    handle: ServerHandle,
    client: reqwest::Client,
    pub bot_token: String,
    pub app_token: String,
}

fn sign(secret: &str, ts: &str, body: &[u8]) -> String {
    let mut m = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    m.update(b"v0:");
    m.update(ts.as_bytes());
    m.update(b":");
    m.update(body);
    format!("v0={}", hex::encode(m.finalize().into_bytes()))
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

impl State {
    fn next_id(&mut self, prefix: &str) -> String {
        self.id_counter += 1;
        format!("{prefix}0{:08X}", self.id_counter * 7919 + 100_000)
    }

    fn next_ts(&mut self) -> String {
        self.ts_counter += 1;
        format!("{}.{:06}", now_secs(), self.ts_counter % 1_000_000)
    }

    fn token(&self, auth: Option<&str>, body: &Value) -> Result<Token, &'static str> {
        let raw = auth
            .and_then(|a| a.strip_prefix("Bearer "))
            .map(str::to_owned)
            .or_else(|| body.get("token").and_then(|t| t.as_str()).map(str::to_owned));
        let Some(raw) = raw else { return Err("not_authed") };
        match self.tokens.get(&raw) {
            None => Err("invalid_auth"),
            Some(t) if t.revoked => Err("token_revoked"),
            Some(t) if t.expires_at.is_some_and(|e| e < Instant::now()) => Err("token_expired"),
            Some(t) => Ok(t.clone()),
        }
    }
}

impl FakeSlack {
    pub async fn start() -> FakeSlack {
        Self::start_with(Settings::default()).await
    }

    pub async fn start_with(settings: Settings) -> FakeSlack {
        let mut st = State {
            settings,
            users: HashMap::new(),
            channels: HashMap::new(),
            messages: Vec::new(),
            tokens: HashMap::new(),
            calls: Vec::new(),
            faults: VecDeque::new(),
            deliveries: Vec::new(),
            request_url: None,
            ts_counter: 0,
            id_counter: 0,
            ws_url: String::new(),
            socket_mode: true,
            tickets: HashSet::new(),
            conns: Vec::new(),
            live: HashMap::new(),
            stalled: false,
            next_conn: 0,
            codes: HashMap::new(),
            refresh_tokens: HashMap::new(),
            installed_tokens: Vec::new(),
            edits: Vec::new(),
            deleted: Vec::new(),
        };
        let bot_token = "xoxb-1111-2222-fakebottokenAAAA".to_owned();
        let app_token = "xapp-1-A0APP-3333-fakeapptokenBBBB".to_owned();
        st.tokens.insert(bot_token.clone(), Token { team_id: TEAM_ID.into(), user_id: BOT_USER.into(), kind: TokenKind::Bot, revoked: false, expires_at: None });
        st.tokens.insert(app_token.clone(), Token { team_id: TEAM_ID.into(), user_id: String::new(), kind: TokenKind::App, revoked: false, expires_at: None });
        st.users.insert(BOT_NAME.into(), BOT_USER.into());
        let shared = Arc::new(Shared { state: Mutex::new(st), acks: tokio::sync::Notify::new() });

        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind fake slack");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let data = web::Data::new(shared.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .route("/api/{method}", web::post().to(web_api))
                .route("/oauth/v2/authorize", web::get().to(authorize))
        })
        .workers(1)
        .disable_signals()
        .listen(listener)
        .expect("listen")
        .run();
        let handle = server.handle();
        tokio::spawn(server);

        let ws_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind fake socket mode");
        let ws_url = format!("ws://{}", ws_listener.local_addr().unwrap());
        shared.state.lock().unwrap().ws_url = ws_url.clone();
        let ws_shared = shared.clone();
        tokio::spawn(async move {
            // Bounded by the test: the runtime ends with it.
            loop {
                let Ok((tcp, _)) = ws_listener.accept().await else { return };
                tokio::spawn(socket_conn(ws_shared.clone(), tcp));
            }
        });
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let fake = FakeSlack { shared, url, ws_url, handle, client, bot_token, app_token };
        fake.add_channel("general");
        fake.join(BOT_NAME, "general");
        fake
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap()
    }

    /// `http://127.0.0.1:PORT/api`: what `api_url` points at.
    pub fn api_url(&self) -> String {
        format!("{}/api", self.url)
    }

    pub fn signing_secret(&self) -> String {
        self.state().settings.signing_secret.clone()
    }

    pub fn update_settings(&self, f: impl FnOnce(&mut Settings)) {
        f(&mut self.state().settings)
    }

    // ---- workspace ----

    pub fn add_user(&self, name: &str) -> String {
        let mut st = self.state();
        let id = st.next_id("U");
        st.users.insert(name.into(), id.clone());
        id
    }

    pub fn user_id(&self, name: &str) -> String {
        self.state().users.get(name).cloned().unwrap_or_else(|| panic!("no user {name}"))
    }

    /// A public channel; answers its id.
    pub fn add_channel(&self, name: &str) -> String {
        let mut st = self.state();
        let id = st.next_id("C");
        st.channels.insert(id.clone(), (name.into(), false, HashSet::new()));
        id
    }

    /// The direct message conversation of `user` with the bot.
    pub fn dm(&self, user: &str) -> String {
        let mut st = self.state();
        let uid = st.users[user].clone();
        let name = format!("dm-{uid}");
        if let Some((id, _)) = st.channels.iter().find(|(_, c)| c.0 == name) {
            return id.clone();
        }
        let id = st.next_id("D");
        st.channels.insert(id.clone(), (name, true, [uid, BOT_USER.to_owned()].into_iter().collect()));
        id
    }

    pub fn channel_id(&self, name: &str) -> String {
        let st = self.state();
        st.channels.iter().find(|(_, c)| c.0 == name).map(|(id, _)| id.clone()).unwrap_or_else(|| panic!("no channel {name}"))
    }

    pub fn join(&self, user: &str, channel: &str) {
        let cid = self.channel_id(channel);
        let mut st = self.state();
        let uid = st.users[user].clone();
        st.channels.get_mut(&cid).unwrap().2.insert(uid);
    }

    pub fn kick(&self, user: &str, channel: &str) {
        let cid = self.channel_id(channel);
        let mut st = self.state();
        let uid = st.users[user].clone();
        st.channels.get_mut(&cid).unwrap().2.remove(&uid);
    }

    /// Revokes a token (`token_revoked` from then on).
    pub fn revoke(&self, token: &str) {
        if let Some(t) = self.state().tokens.get_mut(token) {
            t.revoked = true;
        }
    }

    /// Turns Socket Mode off for the app (apps.connections.open refuses from then on).
    pub fn set_socket_mode(&self, on: bool) {
        self.state().socket_mode = on;
    }

    // ---- faults and records ----

    /// The next call to `method` fails with `fault` (faults of one method are used in order).
    pub fn fail_next(&self, method: &str, fault: Fault) {
        self.state().faults.push_back((method.into(), fault));
    }

    pub fn calls(&self, method: &str) -> Vec<ApiCall> {
        self.state().calls.iter().filter(|c| c.method == method).cloned().collect()
    }

    /// Messages in `channel` (a name or an id), oldest first.
    pub fn messages_in(&self, channel: &str) -> Vec<Msg> {
        let st = self.state();
        let cid = st.channels.iter().find(|(id, c)| c.0 == channel || *id == channel).map(|(id, _)| id.clone()).unwrap_or_default();
        st.messages.iter().filter(|m| m.channel == cid).cloned().collect()
    }

    /// The bot's messages in `channel`.
    pub fn bot_messages(&self, channel: &str) -> Vec<Msg> {
        self.messages_in(channel).into_iter().filter(|m| m.user == BOT_USER).collect()
    }

    /// chat.update calls that changed `ts`, oldest first: the texts it was given.
    pub fn edits_of(&self, ts: &str) -> Vec<String> {
        self.state().edits.iter().filter(|(t, _)| t == ts).map(|(_, x)| x.clone()).collect()
    }

    /// The ts of every message deleted with chat.delete.
    pub fn deleted(&self) -> Vec<String> {
        self.state().deleted.clone()
    }

    pub fn deliveries(&self) -> Vec<Delivery> {
        self.state().deliveries.clone()
    }

    // ---- Events API ----

    /// Sets the Request URL as the app settings page does: a signed `url_verification` whose
    /// answer must carry the challenge. Answers whether Slack would accept the URL.
    pub async fn set_request_url(&self, url: &str) -> bool {
        let challenge = "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P";
        let body = json!({"token": VERIFICATION_TOKEN, "challenge": challenge, "type": "url_verification"}).to_string();
        let secret = self.signing_secret();
        let ts = now_secs().to_string();
        let resp = self
            .client
            .post(url)
            .header("content-type", "application/json")
            .header("x-slack-request-timestamp", &ts)
            .header("x-slack-signature", sign(&secret, &ts, body.as_bytes()))
            .body(body)
            .send()
            .await;
        let Ok(resp) = resp else { return false };
        if !resp.status().is_success() {
            return false;
        }
        let text = resp.text().await.unwrap_or_default();
        // Slack accepts the challenge as plain text, a form or JSON.
        let ok = text == challenge
            || serde_json::from_str::<Value>(&text).is_ok_and(|v| v["challenge"] == challenge)
            || text == format!("challenge={challenge}");
        if ok {
            self.state().request_url = Some(url.to_owned());
        }
        ok
    }

    /// Sets the Request URL without the handshake (a test that wants to see the refusal).
    pub fn force_request_url(&self, url: &str) {
        self.state().request_url = Some(url.to_owned());
    }

    /// A user posts `text` in `channel` (name or id), optionally in the thread `thread_ts`.
    /// Slack turns it into the events the app subscribed to and delivers each (Socket Mode
    /// when a connection is open, else the Request URL), retrying as Slack does; answers the
    /// message's `ts` and the deliveries once they are all done.
    pub async fn user_says(&self, user: &str, channel: &str, text: &str, thread_ts: Option<&str>) -> (String, Vec<Delivery>) {
        let (msg, events) = self.post_as_user(user, channel, text, thread_ts);
        let mut out = Vec::new();
        for e in events {
            out.push(self.deliver(e).await);
        }
        (msg.ts, out)
    }

    /// The message and the `event_callback` bodies Slack makes of it, without delivering.
    pub fn post_as_user(&self, user: &str, channel: &str, text: &str, thread_ts: Option<&str>) -> (Msg, Vec<Value>) {
        let mut st = self.state();
        let uid = st.users.get(user).cloned().unwrap_or_else(|| panic!("no user {user}"));
        let (cid, is_dm) = st
            .channels
            .iter()
            .find(|(id, c)| c.0 == channel || *id == channel)
            .map(|(id, c)| (id.clone(), c.1))
            .unwrap_or_else(|| panic!("no channel {channel}"));
        let ts = st.next_ts();
        let msg = Msg {
            channel: cid.clone(),
            ts: ts.clone(),
            thread_ts: thread_ts.map(str::to_owned),
            user: uid.clone(),
            bot_id: None,
            text: text.to_owned(),
            given_chars: text.chars().count(),
            edits: 0,
            at: Instant::now(),
        };
        st.messages.push(msg.clone());
        let mut base = json!({
            "user": uid, "text": text, "ts": ts, "team": TEAM_ID, "channel": cid, "event_ts": ts,
            "client_msg_id": format!("{:08x}-0000-4000-8000-{:012x}", st.ts_counter, st.id_counter),
            "blocks": [{"type": "rich_text", "block_id": "b1", "elements": [{"type": "rich_text_section", "elements": [{"type": "text", "text": text}]}]}],
        });
        if let Some(t) = thread_ts {
            base["thread_ts"] = t.into();
            base["parent_user_id"] = uid.clone().into();
        }
        let bot_in_channel = is_dm || st.channels[&cid].2.contains(BOT_USER);
        let mentioned = text.contains(&format!("<@{BOT_USER}>")) || text.contains(&format!("<@{BOT_USER}|"));
        let mut events = Vec::new();
        if mentioned && !is_dm && st.settings.subscriptions.contains("app_mention") {
            let mut e = base.clone();
            e["type"] = "app_mention".into();
            events.push(e);
        }
        let sub = if is_dm { "message.im" } else { "message.channels" };
        if bot_in_channel && st.settings.subscriptions.contains(sub) {
            let mut e = base;
            e["type"] = "message".into();
            e["channel_type"] = if is_dm { "im" } else { "channel" }.into();
            events.push(e);
        }
        let bodies = events.into_iter().map(|e| callback(&mut st, e)).collect();
        (msg, bodies)
    }

    /// The `message` event Slack sends the app for one of the bot's own posts (it has
    /// `bot_id`, `bot_profile` and the bot's user, no subtype): the loop an app must break.
    pub fn echo_of(&self, m: &Msg) -> Value {
        let mut st = self.state();
        let is_dm = st.channels.get(&m.channel).is_some_and(|c| c.1);
        let mut e = json!({"type": "message", "user": m.user, "bot_id": BOT_ID, "app_id": APP_ID, "text": m.text, "ts": m.ts,
                           "team": TEAM_ID, "channel": m.channel, "event_ts": m.ts, "channel_type": if is_dm { "im" } else { "channel" },
                           "bot_profile": {"id": BOT_ID, "app_id": APP_ID, "name": BOT_NAME, "team_id": TEAM_ID}});
        if let Some(t) = &m.thread_ts {
            e["thread_ts"] = t.clone().into();
        }
        callback(&mut st, e)
    }

    /// Any event wrapped as Slack wraps it (`app_uninstalled`, `tokens_revoked`, …).
    pub fn event(&self, event: Value) -> Value {
        callback(&mut self.state(), event)
    }

    /// A classic integration (another bot) posts in `channel`: a `bot_message` subtype.
    pub fn integration_says(&self, channel: &str, text: &str) -> Value {
        let cid = self.channel_id(channel);
        let mut st = self.state();
        let ts = st.next_ts();
        let e = json!({"type": "message", "subtype": "bot_message", "bot_id": "B0OTHER", "username": "deploybot", "text": text,
                       "ts": ts, "channel": cid, "event_ts": ts, "channel_type": "channel"});
        callback(&mut st, e)
    }

    /// Delivers one `event_callback` body the way Slack would (Socket Mode if a connection is
    /// open, else the Request URL), with retries.
    pub async fn deliver(&self, body: Value) -> Delivery {
        let use_socket = !self.state().live.is_empty();
        let d = if use_socket { self.deliver_socket(body).await } else { self.deliver_http(body, &[]).await };
        self.state().deliveries.push(d.clone());
        d
    }

    /// POSTs one body to the Request URL with retries; `extra` headers on every attempt.
    pub async fn deliver_http(&self, body: Value, extra: &[(&str, &str)]) -> Delivery {
        let (url, secret, timeout, delays) = {
            let st = self.state();
            (st.request_url.clone().expect("no Request URL set"), st.settings.signing_secret.clone(), st.settings.ack_timeout, st.settings.retry_delays)
        };
        let raw = body.to_string();
        let mut d = Delivery {
            event_id: body["event_id"].as_str().unwrap_or("").into(),
            event_type: body["event"]["type"].as_str().unwrap_or(body["type"].as_str().unwrap_or("")).into(),
            attempts: Vec::new(),
        };
        let mut reason: Option<&'static str> = None;
        for retry in 0..=3u32 {
            if retry > 0 {
                tokio::time::sleep(delays[retry as usize - 1]).await;
            }
            let ts = now_secs().to_string();
            let mut req = self
                .client
                .post(&url)
                .timeout(timeout)
                .header("content-type", "application/json")
                .header("user-agent", "Slackbot 1.0 (+https://api.slack.com/robots)")
                .header("x-slack-request-timestamp", &ts)
                .header("x-slack-signature", sign(&secret, &ts, raw.as_bytes()))
                .body(raw.clone());
            if retry > 0 {
                req = req.header("x-slack-retry-num", retry.to_string()).header("x-slack-retry-reason", reason.unwrap_or("unknown_error"));
            }
            for (k, v) in extra {
                req = req.header(*k, *v);
            }
            let started = Instant::now();
            let result = req.send().await;
            let (status, text, next_reason) = match result {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let text = resp.text().await.unwrap_or_default();
                    (Some(status), text, Some("http_error"))
                }
                Err(e) if e.is_timeout() => (None, String::new(), Some("http_timeout")),
                Err(_) => (None, String::new(), Some("connection_failed")),
            };
            let ok = status.is_some_and(|s| (200..300).contains(&s));
            d.attempts.push(Attempt { retry_num: retry, reason, status, body: text, elapsed: started.elapsed() });
            if ok {
                break;
            }
            reason = next_reason;
        }
        d
    }

    /// Signs and POSTs `raw` once, as Slack would (no retries): for tests of the signature.
    pub async fn post_signed(&self, url: &str, raw: &str, ts: &str, secret: &str) -> (u16, String) {
        let resp = self
            .client
            .post(url)
            .header("content-type", "application/json")
            .header("x-slack-request-timestamp", ts)
            .header("x-slack-signature", sign(secret, ts, raw.as_bytes()))
            .body(raw.to_owned())
            .send()
            .await
            .expect("patchbay reachable");
        (resp.status().as_u16(), resp.text().await.unwrap_or_default())
    }

    // ---- Socket Mode ----

    async fn deliver_socket(&self, body: Value) -> Delivery {
        let (timeout, delays) = {
            let st = self.state();
            (st.settings.ack_timeout, st.settings.retry_delays)
        };
        let mut d = Delivery {
            event_id: body["event_id"].as_str().unwrap_or("").into(),
            event_type: body["event"]["type"].as_str().unwrap_or("").into(),
            attempts: Vec::new(),
        };
        for retry in 0..=3u32 {
            if retry > 0 {
                tokio::time::sleep(delays[retry as usize - 1]).await;
            }
            let envelope_id = {
                let mut st = self.state();
                st.id_counter += 1;
                format!("{:08x}-1543-4f94-bfb4-{:012x}", st.ts_counter, st.id_counter)
            };
            let env = json!({
                "envelope_id": envelope_id, "payload": body, "type": "events_api", "accepts_response_payload": false,
                "retry_attempt": retry, "retry_reason": if retry == 0 { "" } else { "timeout" },
            });
            let started = Instant::now();
            let sent = {
                let mut st = self.state();
                // Any one open connection (Slack does not broadcast).
                let mut ids: Vec<usize> = st.live.keys().copied().collect();
                ids.sort();
                let n = ids.len();
                let pick = if n == 0 { None } else { Some(ids[(st.ts_counter as usize + retry as usize) % n]) };
                st.ts_counter += 1;
                pick.and_then(|id| st.live.get(&id).map(|l| l.tx.send(WsCmd::Text(env.to_string())).is_ok()))
                    .unwrap_or(false)
            };
            let acked = sent && {
                let deadline = tokio::time::Instant::now() + timeout;
                loop {
                    if self.state().conns.iter().any(|c| c.acks.contains(&envelope_id)) {
                        break true;
                    }
                    let notified = self.shared.acks.notified();
                    if tokio::time::timeout_at(deadline, notified).await.is_err() {
                        break self.state().conns.iter().any(|c| c.acks.contains(&envelope_id));
                    }
                }
            };
            d.attempts.push(Attempt {
                retry_num: retry,
                reason: if retry == 0 { None } else { Some("timeout") },
                status: acked.then_some(200),
                body: envelope_id,
                elapsed: started.elapsed(),
            });
            if acked {
                break;
            }
        }
        d
    }

    /// Every Socket Mode connection ever opened.
    pub fn connections(&self) -> Vec<WsConn> {
        self.state().conns.clone()
    }

    /// Connections open now.
    pub fn live_connections(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self.state().live.keys().copied().collect();
        v.sort();
        v
    }

    /// Sends `{"type":"disconnect","reason":…}` on connection `id`; the fake closes it
    /// itself after `close_after` if the client has not (Slack: ~10 s after a warning).
    pub fn disconnect(&self, id: usize, reason: &str, close_after: Duration) {
        let msg = json!({"type": "disconnect", "reason": reason, "debug_info": {"host": "applink-fake-1"}}).to_string();
        let tx = self.state().live.get(&id).map(|l| l.tx.clone());
        if let Some(tx) = tx {
            let _ = tx.send(WsCmd::Text(msg));
            tokio::spawn(async move {
                tokio::time::sleep(close_after).await;
                let _ = tx.send(WsCmd::Close);
            });
        }
    }

    /// Drops connection `id` without a close frame (the TCP connection just ends).
    pub fn drop_connection(&self, id: usize) {
        if let Some(l) = self.state().live.get(&id) {
            let _ = l.tx.send(WsCmd::Drop);
        }
    }

    /// A stalled network: the fake stops reading (so no pong is sent) and writing.
    pub fn stall(&self, on: bool) {
        self.state().stalled = on;
    }

    pub fn calls_count(&self, method: &str) -> usize {
        self.state().calls.iter().filter(|c| c.method == method).count()
    }

    // ---- OAuth ----

    /// Follows an install: GETs patchbay's install URL (keeping its cookie), lets the user
    /// approve on the fake's authorize page, and GETs the callback patchbay redirected to with
    /// the same cookie. Answers the callback's status and body.
    pub async fn install(&self, install_url: &str) -> InstallRun {
        let no_redirect = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).no_proxy().build().unwrap();
        let r = no_redirect.get(install_url).send().await.expect("install reachable");
        let status = r.status().as_u16();
        let cookie = r.headers().get("set-cookie").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let location = r.headers().get("location").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let mut run = InstallRun { install_status: status, set_cookie: cookie.clone(), authorize_url: location.clone(), callback_url: None, status: 0, body: String::new() };
        let Some(location) = location else { return run };
        let a = no_redirect.get(&location).send().await.expect("authorize reachable");
        let Some(callback) = a.headers().get("location").and_then(|v| v.to_str().ok()).map(str::to_owned) else {
            run.body = a.text().await.unwrap_or_default();
            return run;
        };
        run.callback_url = Some(callback.clone());
        let mut req = no_redirect.get(&callback);
        if let Some(c) = &cookie {
            req = req.header("cookie", c.split(';').next().unwrap_or(""));
        }
        let resp = req.send().await.expect("callback reachable");
        run.status = resp.status().as_u16();
        run.body = resp.text().await.unwrap_or_default();
        run
    }

    /// Tokens handed out by oauth.v2.access, oldest first.
    pub fn installed_tokens(&self) -> Vec<String> {
        self.state().installed_tokens.clone()
    }

    /// Expires every token handed out by OAuth (rotation tests).
    pub fn expire_installed_tokens(&self) {
        let mut st = self.state();
        let list = st.installed_tokens.clone();
        for t in list {
            if let Some(tok) = st.tokens.get_mut(&t) {
                tok.expires_at = Some(Instant::now());
            }
        }
    }
}

/// What an install run saw.
#[derive(Debug)]
pub struct InstallRun {
    pub install_status: u16,
    pub set_cookie: Option<String>,
    pub authorize_url: Option<String>,
    pub callback_url: Option<String>,
    pub status: u16,
    pub body: String,
}

fn callback(st: &mut State, event: Value) -> Value {
    let event_id = st.next_id("Ev");
    json!({
        "token": VERIFICATION_TOKEN,
        "team_id": TEAM_ID,
        "context_team_id": TEAM_ID,
        "context_enterprise_id": null,
        "api_app_id": APP_ID,
        "event": event,
        "type": "event_callback",
        "event_id": event_id,
        "event_time": now_secs(),
        "authorizations": [{"enterprise_id": null, "team_id": TEAM_ID, "user_id": BOT_USER, "is_bot": true, "is_enterprise_install": false}],
        "is_ext_shared_channel": false,
        "event_context": "4-eyJldCI6Im1lc3NhZ2UiLCJ0aWQiOiJUMEFDTUUifQ",
    })
}

fn slack_json(v: Value) -> HttpResponse {
    HttpResponse::Ok().content_type("application/json; charset=utf-8").body(v.to_string())
}

fn slack_error(code: &str) -> HttpResponse {
    slack_json(json!({"ok": false, "error": code}))
}

async fn web_api(req: HttpRequest, path: web::Path<String>, body: web::Bytes, shared: web::Data<Arc<Shared>>) -> HttpResponse {
    let method = path.into_inner();
    let auth = req.headers().get("authorization").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let content_type = req.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let parsed: Value = if content_type.starts_with("application/json") {
        serde_json::from_slice(&body).unwrap_or(Value::Null)
    } else {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(&body).unwrap_or_default();
        Value::Object(pairs.into_iter().map(|(k, v)| (k, Value::String(v))).collect())
    };
    let (resp, status, error) = {
        let mut st = shared.state.lock().unwrap();
        let fault = st.faults.iter().position(|(m, _)| *m == method).and_then(|i| st.faults.remove(i)).map(|(_, f)| f);
        match fault {
            Some(Fault::RateLimited { retry_after }) => (
                HttpResponse::TooManyRequests()
                    .insert_header(("Retry-After", retry_after.to_string()))
                    .content_type("application/json; charset=utf-8")
                    .body(json!({"ok": false, "error": "ratelimited"}).to_string()),
                429,
                "ratelimited".to_owned(),
            ),
            Some(Fault::Status(s)) => (HttpResponse::build(actix_web::http::StatusCode::from_u16(s).unwrap()).finish(), s, format!("http_{s}")),
            Some(Fault::Error(code)) => (slack_error(code), 200, code.to_owned()),
            None => match api_method(&mut st, &method, auth.as_deref(), &content_type, &parsed) {
                Ok(v) => (slack_json(v), 200, String::new()),
                Err(code) => (slack_error(code), 200, code.to_owned()),
            },
        }
    };
    shared.state.lock().unwrap().calls.push(ApiCall { method, at: Instant::now(), authorization: auth, content_type, body: parsed, status, error });
    resp
}

fn api_method(st: &mut State, method: &str, auth: Option<&str>, content_type: &str, body: &Value) -> Result<Value, &'static str> {
    let str_of = |k: &str| body.get(k).and_then(|v| v.as_str()).map(str::to_owned);
    match method {
        "auth.test" => {
            let t = st.token(auth, body)?;
            if t.kind == TokenKind::App {
                return Err("not_allowed_token_type");
            }
            Ok(json!({"ok": true, "url": "https://acme.slack.com/", "team": TEAM_NAME, "user": BOT_NAME, "team_id": t.team_id,
                      "user_id": t.user_id, "bot_id": BOT_ID, "is_enterprise_install": false}))
        }
        "chat.postMessage" | "chat.update" => {
            // JSON bodies must carry the token in the header (installing-with-oauth docs).
            if content_type.starts_with("application/json") && !auth.is_some_and(|a| a.starts_with("Bearer ")) {
                return Err("not_authed");
            }
            let t = st.token(auth, body)?;
            if t.kind != TokenKind::Bot {
                return Err("not_allowed_token_type");
            }
            let channel = str_of("channel").ok_or("channel_not_found")?;
            let Some((_, is_dm, members)) = st.channels.get(&channel).cloned() else { return Err("channel_not_found") };
            if !is_dm && !members.contains(BOT_USER) {
                return Err("not_in_channel");
            }
            let text = str_of("text").unwrap_or_default();
            if text.is_empty() && body.get("blocks").is_none() {
                return Err("no_text");
            }
            let given = text.chars().count();
            let kept: String = text.chars().take(40_000).collect();
            if method == "chat.update" {
                let ts = str_of("ts").ok_or("message_not_found")?;
                let m = st.messages.iter_mut().find(|m| m.channel == channel && m.ts == ts).ok_or("message_not_found")?;
                if m.user != BOT_USER {
                    return Err("cant_update_message");
                }
                m.text = kept.clone();
                m.given_chars = given;
                m.edits += 1;
                st.edits.push((ts.clone(), kept.clone()));
                return Ok(json!({"ok": true, "channel": channel, "ts": ts, "text": kept}));
            }
            let thread_ts = str_of("thread_ts");
            let ts = st.next_ts();
            st.messages.push(Msg {
                channel: channel.clone(),
                ts: ts.clone(),
                thread_ts: thread_ts.clone(),
                user: BOT_USER.into(),
                bot_id: Some(BOT_ID.into()),
                text: kept.clone(),
                given_chars: given,
                edits: 0,
                at: Instant::now(),
            });
            let mut message = json!({"type": "message", "user": BOT_USER, "bot_id": BOT_ID, "app_id": APP_ID, "text": kept, "ts": ts, "team": TEAM_ID,
                                     "bot_profile": {"id": BOT_ID, "app_id": APP_ID, "name": BOT_NAME, "team_id": TEAM_ID}});
            if let Some(t) = &thread_ts {
                message["thread_ts"] = t.clone().into();
            }
            Ok(json!({"ok": true, "channel": channel, "ts": ts, "message": message}))
        }
        "chat.delete" => {
            let t = st.token(auth, body)?;
            if t.kind != TokenKind::Bot {
                return Err("not_allowed_token_type");
            }
            let channel = str_of("channel").ok_or("channel_not_found")?;
            let ts = str_of("ts").ok_or("message_not_found")?;
            let i = st.messages.iter().position(|m| m.channel == channel && m.ts == ts).ok_or("message_not_found")?;
            if st.messages[i].user != BOT_USER {
                return Err("cant_delete_message");
            }
            st.messages.remove(i);
            st.deleted.push(ts.clone());
            Ok(json!({"ok": true, "channel": channel, "ts": ts}))
        }
        "apps.connections.open" => {
            let t = st.token(auth, body)?;
            if t.kind != TokenKind::App {
                return Err("not_allowed_token_type");
            }
            if !st.socket_mode {
                return Err("socket_mode_not_enabled");
            }
            let ticket = st.next_id("tk");
            st.tickets.insert(ticket.clone());
            Ok(json!({"ok": true, "url": format!("{}/link/?ticket={ticket}&app_id={APP_ID}", st.ws_url)}))
        }
        "oauth.v2.access" => {
            let (client_id, client_secret) = match auth.and_then(|a| a.strip_prefix("Basic ")) {
                Some(b64) => {
                    let decoded = base64::engine::general_purpose::STANDARD.decode(b64).map_err(|_| "invalid_client_id")?;
                    let s = String::from_utf8(decoded).map_err(|_| "invalid_client_id")?;
                    let (a, b) = s.split_once(':').ok_or("invalid_client_id")?;
                    (a.to_owned(), b.to_owned())
                }
                None => (str_of("client_id").unwrap_or_default(), str_of("client_secret").unwrap_or_default()),
            };
            if client_id != CLIENT_ID {
                return Err("invalid_client_id");
            }
            if client_secret != CLIENT_SECRET {
                return Err("bad_client_secret");
            }
            let rotation = st.settings.token_rotation;
            if str_of("grant_type").as_deref() == Some("refresh_token") {
                let rt = str_of("refresh_token").ok_or("invalid_refresh_token")?;
                let team = st.refresh_tokens.remove(&rt).ok_or("invalid_refresh_token")?;
                return Ok(issue_token(st, &team, true));
            }
            let code = str_of("code").ok_or("invalid_code")?;
            let redirect = st.codes.remove(&code).ok_or("invalid_code")?;
            if str_of("redirect_uri").unwrap_or_default() != redirect {
                return Err("bad_redirect_uri");
            }
            Ok(issue_token(st, TEAM_ID, rotation))
        }
        _ => Err("unknown_method"),
    }
}

fn issue_token(st: &mut State, team: &str, rotation: bool) -> Value {
    st.id_counter += 1;
    let n = st.id_counter;
    let token = if rotation { format!("xoxe.xoxb-1-installed{n:06}") } else { format!("xoxb-1111-installed{n:06}") };
    let expires_in = st.settings.expires_in;
    st.tokens.insert(
        token.clone(),
        Token {
            team_id: team.into(),
            user_id: BOT_USER.into(),
            kind: TokenKind::Bot,
            revoked: false,
            expires_at: rotation.then(|| Instant::now() + Duration::from_secs(expires_in)),
        },
    );
    st.installed_tokens.push(token.clone());
    let mut v = json!({
        "ok": true, "access_token": token, "token_type": "bot", "scope": "app_mentions:read,chat:write",
        "bot_user_id": BOT_USER, "app_id": APP_ID, "team": {"id": team, "name": TEAM_NAME}, "enterprise": null,
        "is_enterprise_install": false, "authed_user": {"id": "U0INSTALLER"},
    });
    if rotation {
        let rt = format!("xoxe-1-refresh{n:06}");
        st.refresh_tokens.insert(rt.clone(), team.into());
        v["refresh_token"] = rt.into();
        v["expires_in"] = expires_in.into();
    }
    v
}

async fn authorize(req: HttpRequest, shared: web::Data<Arc<Shared>>) -> HttpResponse {
    let q: HashMap<String, String> = serde_urlencoded::from_str(req.query_string()).unwrap_or_default();
    if q.get("client_id").map(String::as_str) != Some(CLIENT_ID) {
        return HttpResponse::BadRequest().body("invalid_client_id");
    }
    let Some(redirect) = q.get("redirect_uri") else { return HttpResponse::BadRequest().body("no redirect_uri") };
    if q.get("scope").is_none_or(|s| s.is_empty()) {
        return HttpResponse::BadRequest().body("invalid_scope");
    }
    let code = {
        let mut st = shared.state.lock().unwrap();
        let code = st.next_id("code");
        st.codes.insert(code.clone(), redirect.clone());
        code
    };
    let state = q.get("state").cloned().unwrap_or_default();
    let sep = if redirect.contains('?') { '&' } else { '?' };
    let location = format!("{redirect}{sep}{}", serde_urlencoded::to_string([("code", code.as_str()), ("state", state.as_str())]).unwrap());
    HttpResponse::Found().insert_header(("Location", location)).finish()
}

async fn socket_conn(shared: Arc<Shared>, tcp: tokio::net::TcpStream) {
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
    let mut ticket_ok = false;
    let shared_cb = shared.clone();
    let cb = |req: &Request, resp: Response| {
        let q = req.uri().query().unwrap_or("");
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(q).unwrap_or_default();
        let ticket = pairs.iter().find(|(k, _)| k == "ticket").map(|(_, v)| v.clone()).unwrap_or_default();
        // Single use, like Slack's.
        ticket_ok = shared_cb.state.lock().unwrap().tickets.remove(&ticket);
        Ok(resp)
    };
    let Ok(ws) = tokio_tungstenite::accept_hdr_async(tcp, cb).await else { return };
    let (mut sink, mut stream) = ws.split();
    if !ticket_ok {
        let _ = sink.send(Message::Close(None)).await;
        return;
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<WsCmd>();
    let (id, ping_every) = {
        let mut st = shared.state.lock().unwrap();
        let id = st.next_conn;
        st.next_conn += 1;
        st.conns.push(WsConn { id, opened_at: Instant::now(), closed_at: None, closed_by: None, acks: Vec::new(), pings_received: 0 });
        st.live.insert(id, WsLive { tx: tx.clone() });
        (id, st.settings.ws_ping_every)
    };
    let n = shared.state.lock().unwrap().live.len();
    let hello = json!({"type": "hello", "num_connections": n, "debug_info": {"host": "applink-fake-1", "build_number": 54, "approximate_connection_time": 18060},
                       "connection_info": {"app_id": APP_ID}});
    let _ = sink.send(Message::text(hello.to_string())).await;
    let mut pinger = ping_every.map(|d| tokio::time::interval_at(tokio::time::Instant::now() + d, d));
    let closed_by: &'static str;
    // Bounded by the connection's life.
    loop {
        let stalled = shared.state.lock().unwrap().stalled;
        tokio::select! {
            cmd = rx.recv() => match cmd {
                Some(WsCmd::Text(t)) => { if !stalled { let _ = sink.send(Message::text(t)).await; } }
                Some(WsCmd::Ping) => { let _ = sink.send(Message::Ping(Vec::new().into())).await; }
                Some(WsCmd::Close) => { let _ = sink.send(Message::Close(None)).await; closed_by = "server"; break; }
                Some(WsCmd::Drop) | None => { closed_by = "dropped"; break; }
            },
            frame = stream.next(), if !stalled => match frame {
                None | Some(Err(_)) => { closed_by = "client"; break; }
                Some(Ok(Message::Close(_))) => { closed_by = "client"; break; }
                Some(Ok(Message::Ping(p))) => {
                    shared.state.lock().unwrap().conns[id].pings_received += 1;
                    let _ = sink.send(Message::Pong(p)).await;
                }
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap_or(Value::Null);
                    if let Some(e) = v.get("envelope_id").and_then(|e| e.as_str()) {
                        shared.state.lock().unwrap().conns[id].acks.push(e.to_owned());
                        shared.acks.notify_waiters();
                    }
                }
                Some(Ok(_)) => {}
            },
            _ = tokio::time::sleep(Duration::from_millis(50)), if stalled => {}
            _ = async { pinger.as_mut().unwrap().tick().await }, if pinger.is_some() && !stalled => {
                let _ = sink.send(Message::Ping(Vec::new().into())).await;
            }
        }
    }
    let mut st = shared.state.lock().unwrap();
    st.live.remove(&id);
    let c = &mut st.conns[id];
    c.closed_at = Some(Instant::now());
    c.closed_by = Some(closed_by);
}
