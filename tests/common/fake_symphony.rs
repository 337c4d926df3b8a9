//! A fake Symphony pod — pod, agent, key manager and session auth in one server — written
//! from `shared/reference/symphony.md` (§2 authentication, §3 datafeed, §4 messages) and
//! the public OpenAPI files it cites.
//!
//! What it plays:
//! - **RSA login**: `POST /login/pubkey/authenticate` and `/relay/pubkey/authenticate` take
//!   `{"token": jwt}`; the JWT must be RS512, signed by the public key registered for its
//!   `sub`, with `exp` in the future and at most 5 minutes ahead. Anything else is `401`.
//!   Every JWT seen is kept ([`FakeSymphony::jwts`]) so the tests can check it with PyJWT.
//! - **Certificate login**: `/sessionauth/v1/authenticate`, `/keyauth/v1/authenticate` answer
//!   only on a TLS connection whose client certificate was signed by the fake's CA (see
//!   [`FakeSymphony::start_tls`]); without one, `401`.
//! - Session tokens are JWT-shaped (`canUseSimplifiedKeyDelivery` in the claims when SKD is
//!   on). Pod calls need `sessionToken`; agent calls `sessionToken` and `keyManagerToken`
//!   (empty allowed for an SKD session). Unknown tokens: `401 {"code":401,"message":"Invalid session"}`.
//! - **Datafeed v2**: list/create/delete/read with `ackId`. A read acknowledges the previous
//!   batch only if it carries that batch's ackId; otherwise the batch is delivered again (the
//!   real agent does so after a 30 s visibility timeout; here at once). Reads long-poll.
//!   An unknown feed or a never-issued ackId is `400`.
//! - **Datafeed v1**: create, and read that answers `204` when nothing came within the poll.
//! - **Messages**: `POST /agent/v4/stream/{sid}/message/create`, multipart. The sid must be
//!   URL-safe; the MessageML must be well-formed XML under `<messageML>`, with no raw `${` or
//!   `#{` (Freemarker), within the limits; else `400` with a V2Error. A sent message goes into
//!   every datafeed as a `MESSAGESENT` from the bot, as on a real pod.
//! - `GET /pod/v2/sessioninfo`, `POST /pod/v3/room/search`, `GET /agent/v1/info`.
//! - Fault injection ([`FakeSymphony::fault`]): the next N requests matching a method and a
//!   path fragment get a status (with `Retry-After` if given).
#![allow(dead_code)]

use actix_web::dev::ServerHandle;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;

/// The MessageML limits the fake enforces: 81,130 characters of encrypted markdown is about
/// 60,000 characters of text; 2,500 distinct tokens.
pub const MAX_TEXT_CHARS: usize = 60_000;
pub const MAX_TOKENS: usize = 2_500;

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

fn random_id(n: usize) -> String {
    (0..n).map(|_| format!("{:x}", rand::random::<u8>() % 16)).collect()
}

// ------------------------------------------------------------------------------------------
// Small parsers: DER (public keys), multipart, MessageML
// ------------------------------------------------------------------------------------------

/// (tag, content, rest) of one DER element.
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *input.first()?;
    let first = *input.get(1)? as usize;
    let (len, hdr) = if first < 0x80 {
        (first, 2)
    } else {
        let n = first & 0x7f;
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | *input.get(2 + i)? as usize;
        }
        (len, 2 + n)
    };
    let content = input.get(hdr..hdr + len)?;
    Some((tag, content, &input[hdr + len..]))
}

/// A `-----BEGIN PUBLIC KEY-----` (SubjectPublicKeyInfo) PEM → PKCS#1 RSAPublicKey DER.
pub fn rsa_public_key_der(pem: &str) -> Vec<u8> {
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let spki = STANDARD.decode(b64.trim()).expect("public key base64");
    let (_, seq, _) = der(&spki).expect("SPKI");
    let (_, _alg, rest) = der(seq).expect("algorithm");
    let (tag, bits, _) = der(rest).expect("bit string");
    assert_eq!(tag, 0x03);
    bits[1..].to_vec()
}

/// Verifies an RS512 JWT with `public_der`; answers its claims or why not.
pub fn verify_jwt(token: &str, public_der: &[u8]) -> Result<Value, String> {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err("not a JWT".into());
    };
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(h).map_err(|_| "bad header")?).map_err(|_| "bad header")?;
    if header["alg"] != "RS512" {
        return Err(format!("alg must be RS512, got {}", header["alg"]));
    }
    let sig = URL_SAFE_NO_PAD.decode(s).map_err(|_| "bad signature encoding")?;
    ring::signature::UnparsedPublicKey::new(&ring::signature::RSA_PKCS1_2048_8192_SHA512, public_der)
        .verify(format!("{h}.{p}").as_bytes(), &sig)
        .map_err(|_| "invalid token signature".to_owned())?;
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).map_err(|_| "bad payload")?).map_err(|_| "bad payload".into())
}

/// multipart/form-data fields (name → value).
fn parse_multipart(content_type: &str, body: &[u8]) -> Option<HashMap<String, String>> {
    let boundary = content_type.split(';').find_map(|p| p.trim().strip_prefix("boundary="))?.trim_matches('"');
    let body = String::from_utf8_lossy(body);
    let delim = format!("--{boundary}");
    let mut fields = HashMap::new();
    for part in body.split(&delim).skip(1) {
        if part.starts_with("--") {
            break;
        }
        let part = part.strip_prefix("\r\n")?;
        let (headers, value) = part.split_once("\r\n\r\n")?;
        let name = headers
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("content-disposition"))?
            .split(';')
            .find_map(|p| p.trim().strip_prefix("name="))?
            .trim_matches('"')
            .to_owned();
        fields.insert(name, value.strip_suffix("\r\n").unwrap_or(value).to_owned());
    }
    Some(fields)
}

/// Checks MessageML as the agent does (well-formed XML under `<messageML>`, no raw Freemarker
/// interpolation) and answers its text (entities decoded, `<br/>` as newlines).
pub fn messageml_text(ml: &str) -> Result<String, String> {
    let ml = ml.trim();
    let inner = ml
        .strip_prefix("<messageML>")
        .and_then(|r| r.strip_suffix("</messageML>"))
        .ok_or("Error parsing message: the root element must be <messageML>")?;
    if inner.contains("${") || inner.contains("#{") {
        return Err("Error parsing message: Freemarker interpolation (${ or #{) in the text".into());
    }
    let mut out = String::new();
    let mut stack: Vec<String> = Vec::new();
    let mut rest = inner;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('<') {
            let end = r.find('>').ok_or("Error parsing message: unclosed tag")?;
            let tag = &r[..end];
            rest = &r[end + 1..];
            if let Some(name) = tag.strip_prefix('/') {
                if stack.pop().as_deref() != Some(name.trim()) {
                    return Err(format!("Error parsing message: unexpected </{name}>"));
                }
            } else if let Some(t) = tag.strip_suffix('/') {
                if t.trim() == "br" {
                    out.push('\n');
                }
            } else {
                let name: String = tag.chars().take_while(|c| !c.is_whitespace()).collect();
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric()) {
                    return Err("Error parsing message: a raw `<` must be escaped as &lt;".into());
                }
                stack.push(name);
            }
        } else if let Some(r) = rest.strip_prefix('&') {
            let end = r.find(';').ok_or("Error parsing message: a raw `&` must be escaped")?;
            let name = &r[..end];
            let c = match name {
                "amp" => '&',
                "lt" => '<',
                "gt" => '>',
                "quot" => '"',
                "apos" => '\'',
                n if n.starts_with("#x") => u32::from_str_radix(&n[2..], 16).ok().and_then(char::from_u32).ok_or("bad reference")?,
                n if n.starts_with('#') => n[1..].parse::<u32>().ok().and_then(char::from_u32).ok_or("bad reference")?,
                _ => return Err(format!("Error parsing message: unknown entity &{name};")),
            };
            out.push(c);
            rest = &r[end + 1..];
        } else {
            let end = rest.find(['<', '&']).unwrap_or(rest.len());
            out.push_str(&rest[..end]);
            rest = &rest[end..];
        }
    }
    if let Some(open) = stack.pop() {
        return Err(format!("Error parsing message: <{open}> is not closed"));
    }
    if out.chars().count() > MAX_TEXT_CHARS {
        return Err(format!("Message too long: more than {MAX_TEXT_CHARS} characters"));
    }
    let tokens: HashSet<&str> = out.split_whitespace().collect();
    if tokens.len() > MAX_TOKENS {
        return Err(format!("Message has more than {MAX_TOKENS} unique tokens"));
    }
    Ok(out)
}

/// Escapes text for PresentationML (what users' messages look like in events).
pub fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

// ------------------------------------------------------------------------------------------
// State
// ------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct User {
    pub id: i64,
    pub username: String,
    pub display_name: String,
}

#[derive(Clone, Debug)]
pub struct Stream {
    /// As events carry it (may be standard base64 with `+`, `/`, `=`).
    pub id: String,
    /// `IM` or `ROOM`.
    pub kind: String,
    pub name: String,
}

/// A message the bot sent.
#[derive(Clone, Debug)]
pub struct Sent {
    pub message_id: String,
    pub stream_id: String,
    pub message_ml: String,
    /// The MessageML's text.
    pub text: String,
}

/// One request, as the fake saw it.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub session_token: Option<String>,
    pub key_manager_token: Option<String>,
    /// `Via` header (the test proxy adds one to what it forwards in absolute form).
    pub via: Option<String>,
    /// Came in over TLS (through the TLS front), with a client certificate.
    pub tls: bool,
    pub client_cert: bool,
    pub status: u16,
}

/// One datafeed read.
#[derive(Clone, Debug)]
pub struct Read {
    pub feed: String,
    pub ack_in: String,
    /// The ackId this read answered with (v2).
    pub ack_out: String,
    pub delivered: Vec<String>,
    /// Message ids delivered again because the previous batch was not acknowledged.
    pub redelivered: usize,
}

#[derive(Clone, Debug)]
struct Fault {
    method: String,
    path_contains: String,
    status: u16,
    retry_after: Option<u64>,
    remaining: usize,
}

#[derive(Default)]
struct FeedV2 {
    queue: VecDeque<Value>,
    inflight: Option<(String, Vec<Value>)>,
    issued: HashSet<String>,
}

#[derive(Default)]
struct State {
    users: HashMap<i64, User>,
    bot_keys: HashMap<String, (i64, Vec<u8>)>,
    bot_cert_user: Option<String>,
    sessions: HashMap<String, (String, bool)>,
    km_tokens: HashSet<String>,
    skd: bool,
    agent_version: String,
    streams: Vec<Stream>,
    feeds_v2: HashMap<String, FeedV2>,
    feed_order: Vec<String>,
    feeds_v1: HashMap<String, VecDeque<Value>>,
    sent: Vec<Sent>,
    requests: Vec<Request>,
    jwts: Vec<String>,
    reads: Vec<Read>,
    faults: Vec<Fault>,
    long_poll: Duration,
    next_user: i64,
    /// Users' messages by id, to deliver one again.
    posted: HashMap<String, Value>,
}

impl State {
    fn bot(&self) -> Option<&User> {
        let name = self.bot_keys.keys().next().cloned().or(self.bot_cert_user.clone())?;
        self.users.values().find(|u| u.username == name)
    }

    fn push_event(&mut self, ev: Value) {
        for f in self.feeds_v2.values_mut() {
            f.queue.push_back(ev.clone());
        }
        for f in self.feeds_v1.values_mut() {
            f.push_back(ev.clone());
        }
    }

    fn stream_by_url_id(&self, sid: &str) -> Option<Stream> {
        self.streams
            .iter()
            .find(|s| s.id.replace('+', "-").replace('/', "_").trim_end_matches('=') == sid)
            .cloned()
    }

    fn issue_session(&mut self, username: &str) -> String {
        let claims = json!({"sub": username, "canUseSimplifiedKeyDelivery": self.skd, "jti": random_id(16)});
        let token = format!("{}.{}.{}", URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#), URL_SAFE_NO_PAD.encode(claims.to_string()), random_id(8));
        self.sessions.insert(token.clone(), (username.to_owned(), self.skd));
        token
    }
}

// ------------------------------------------------------------------------------------------
// The server
// ------------------------------------------------------------------------------------------

pub struct FakeSymphony {
    state: Arc<Mutex<State>>,
    notify: Arc<Notify>,
    handle: ServerHandle,
    /// Plain HTTP.
    pub port: u16,
    /// HTTPS (when started with TLS): the front that accepts client certificates.
    pub tls_port: Option<u16>,
    tls_task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for FakeSymphony {
    fn drop(&mut self) {
        if let Some(t) = &self.tls_task {
            t.abort();
        }
        let h = self.handle.clone();
        tokio::spawn(async move { h.stop(false).await });
    }
}

#[derive(Clone)]
struct Shared {
    state: Arc<Mutex<State>>,
    notify: Arc<Notify>,
    /// Local ports of the inner listeners behind the TLS front: (anonymous, client cert).
    tls_inner: (u16, u16),
}

impl FakeSymphony {
    /// A plain-HTTP pod.
    pub async fn start() -> FakeSymphony {
        Self::launch(None).await
    }

    /// A pod that also serves HTTPS with `tls` (server certificate, and the CA whose client
    /// certificates it accepts).
    pub async fn start_tls(tls: &crate::tls::Pki) -> FakeSymphony {
        Self::launch(Some(tls)).await
    }

    async fn launch(tls: Option<&crate::tls::Pki>) -> FakeSymphony {
        let state = Arc::new(Mutex::new(State {
            agent_version: "Agent-25.8.1".into(),
            long_poll: Duration::from_millis(1000),
            next_user: 7_078_106_000_000,
            ..Default::default()
        }));
        let notify = Arc::new(Notify::new());
        let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let anon = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mtls = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = plain.local_addr().unwrap().port();
        let shared = Shared {
            state: state.clone(),
            notify: notify.clone(),
            tls_inner: (anon.local_addr().unwrap().port(), mtls.local_addr().unwrap().port()),
        };
        let inner = shared.tls_inner;
        let server = HttpServer::new(move || {
            App::new()
                .app_data(web::Data::new(shared.clone()))
                .app_data(web::PayloadConfig::new(8 << 20))
                .default_service(web::to(handle))
        })
        .workers(2)
        .disable_signals()
        .listen(plain)
        .unwrap()
        .listen(anon)
        .unwrap()
        .listen(mtls)
        .unwrap()
        .run();
        let handle = server.handle();
        tokio::spawn(server);
        let (tls_port, tls_task) = match tls {
            None => (None, None),
            Some(pki) => {
                let (p, t) = crate::tls::front(pki, inner.0, inner.1).await;
                (Some(p), Some(t))
            }
        };
        FakeSymphony { state, notify, handle, port, tls_port, tls_task }
    }

    fn st(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// Registers the bot's service account with its RSA public key (PEM, `BEGIN PUBLIC KEY`).
    pub fn add_bot(&self, username: &str, display_name: &str, public_pem: &str) -> i64 {
        let id = self.add_user(username, display_name);
        self.st().bot_keys.insert(username.into(), (id, rsa_public_key_der(public_pem)));
        id
    }

    /// Registers the bot's service account for certificate authentication.
    pub fn add_cert_bot(&self, username: &str, display_name: &str) -> i64 {
        let id = self.add_user(username, display_name);
        self.st().bot_cert_user = Some(username.into());
        id
    }

    pub fn add_user(&self, username: &str, display_name: &str) -> i64 {
        let mut st = self.st();
        st.next_user += 1;
        let id = st.next_user;
        st.users.insert(id, User { id, username: username.into(), display_name: display_name.into() });
        id
    }

    /// An IM between `user` and the bot; the stream id as events carry it.
    pub fn im(&self, user: i64) -> String {
        self.stream_with_id(&format!("im{user}"), "IM", &URL_SAFE_NO_PAD.encode(format!("im-{user}-{}", random_id(6))))
    }

    pub fn room(&self, name: &str) -> String {
        self.stream_with_id(name, "ROOM", &URL_SAFE_NO_PAD.encode(format!("room-{name}-{}", random_id(6))))
    }

    /// A stream with exactly this id (standard base64 with `+ / =` for the URL-safety tests).
    pub fn stream_with_id(&self, name: &str, kind: &str, id: &str) -> String {
        self.st().streams.push(Stream { id: id.into(), kind: kind.into(), name: name.into() });
        id.into()
    }

    /// A user writes `presentation_ml` (inner HTML of the PresentationML div) with EntityJSON
    /// `data` in `stream`; answers the message id.
    pub fn post(&self, user: i64, stream: &str, inner: &str, data: Value) -> String {
        let mut st = self.st();
        let u = st.users[&user].clone();
        let s = st.streams.iter().find(|s| s.id == stream).expect("known stream").clone();
        let message_id = URL_SAFE_NO_PAD.encode(random_id(16));
        let ev = json!({
            "id": random_id(12), "messageId": message_id, "timestamp": now_ms(), "type": "MESSAGESENT",
            "initiator": {"user": {"userId": u.id, "displayName": u.display_name, "username": u.username}},
            "payload": {"messageSent": {"message": {
                "messageId": message_id, "timestamp": now_ms(),
                "message": format!(r#"<div data-format="PresentationML" data-version="2.0">{inner}</div>"#),
                "data": if data.is_null() { String::new() } else { data.to_string() },
                "user": {"userId": u.id, "displayName": u.display_name, "username": u.username},
                "stream": {"streamId": s.id, "streamType": s.kind},
                "externalRecipients": false, "originalFormat": "com.symphony.messageml.v2"}}}
        });
        st.posted.insert(message_id.clone(), ev.clone());
        st.push_event(ev);
        drop(st);
        self.notify.notify_waiters();
        message_id
    }

    /// Delivers a user's message again, byte for byte.
    pub fn redeliver(&self, message_id: &str) {
        let ev = self.st().posted[message_id].clone();
        self.push_raw_event(ev);
    }

    /// Plain text from a user.
    pub fn say(&self, user: i64, stream: &str, text: &str) -> String {
        self.post(user, stream, &xml_escape(text), Value::Null)
    }

    /// `@Bot` then `text`, the mention as a PresentationML entity.
    pub fn mention_bot(&self, user: i64, stream: &str, text: &str) -> String {
        let bot = self.st().bot().cloned().expect("a bot");
        let inner = format!(r#"<span class="entity" data-entity-id="0">@{}</span> {}"#, xml_escape(&bot.display_name), xml_escape(text));
        let data = json!({"0": {"type": "com.symphony.user.mention", "version": "1.0",
                                "id": [{"type": "com.symphony.user.userId", "value": bot.id}]}});
        self.post(user, stream, &inner, data)
    }

    /// Queues an event as given (duplicates, other types).
    pub fn push_raw_event(&self, ev: Value) {
        self.st().push_event(ev);
        self.notify.notify_waiters();
    }

    pub fn sent(&self) -> Vec<Sent> {
        self.st().sent.clone()
    }

    pub fn sent_to(&self, stream: &str) -> Vec<Sent> {
        self.st().sent.iter().filter(|m| m.stream_id == stream).cloned().collect()
    }

    pub fn requests(&self) -> Vec<Request> {
        self.st().requests.clone()
    }

    /// How many requests were `method` on a path containing `fragment`.
    pub fn count(&self, method: &str, fragment: &str) -> usize {
        self.st().requests.iter().filter(|r| r.method == method && r.path.contains(fragment)).count()
    }

    pub fn jwts(&self) -> Vec<String> {
        self.st().jwts.clone()
    }

    pub fn reads(&self) -> Vec<Read> {
        self.st().reads.clone()
    }

    pub fn feeds(&self) -> Vec<String> {
        self.st().feed_order.clone()
    }

    /// The next `times` requests `method` on a path containing `fragment` answer `status`.
    pub fn fault(&self, method: &str, fragment: &str, status: u16, times: usize, retry_after: Option<u64>) {
        self.st().faults.push(Fault { method: method.into(), path_contains: fragment.into(), status, retry_after, remaining: times });
    }

    pub fn clear_faults(&self) {
        self.st().faults.clear();
    }

    /// Every session and key-manager token stops working (a pod's session lifetime ended).
    pub fn expire_sessions(&self) {
        let mut st = self.st();
        st.sessions.clear();
        st.km_tokens.clear();
    }

    /// Every v2 feed disappears (the 30-minute TTL passed); events in them are lost.
    pub fn expire_feeds(&self) {
        let mut st = self.st();
        st.feeds_v2.clear();
        st.feeds_v1.clear();
        drop(st);
        self.notify.notify_waiters();
    }

    /// Creates a feed before the bot connects (as another instance of it would have).
    pub fn precreate_feed(&self) -> String {
        let id = format!("{}_f", random_id(32));
        let mut st = self.st();
        st.feeds_v2.insert(id.clone(), FeedV2::default());
        st.feed_order.push(id.clone());
        id
    }

    pub fn set_skd(&self, on: bool, agent_version: &str) {
        let mut st = self.st();
        st.skd = on;
        st.agent_version = agent_version.into();
    }

    pub fn set_long_poll(&self, d: Duration) {
        self.st().long_poll = d;
    }
}

fn error(status: u16, message: &str) -> HttpResponse {
    HttpResponse::build(actix_web::http::StatusCode::from_u16(status).unwrap())
        .json(json!({"code": status, "message": message}))
}

async fn handle(req: HttpRequest, body: web::Bytes, shared: web::Data<Shared>) -> HttpResponse {
    let local = req.app_config().local_addr().port();
    let tls = local == shared.tls_inner.0 || local == shared.tls_inner.1;
    let client_cert = local == shared.tls_inner.1;
    let header = |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let mut record = Request {
        method: req.method().to_string(),
        path: req.uri().path().to_owned(),
        session_token: header("sessionToken"),
        key_manager_token: header("keyManagerToken"),
        via: header("via"),
        tls,
        client_cert,
        status: 0,
    };
    let resp = route(&req, &body, &shared, client_cert).await;
    record.status = resp.status().as_u16();
    shared.state.lock().unwrap().requests.push(record);
    resp
}

async fn route(req: &HttpRequest, body: &[u8], shared: &Shared, client_cert: bool) -> HttpResponse {
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    let header = |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok()).map(str::to_owned);
    {
        let mut st = shared.state.lock().unwrap();
        if let Some(f) = st.faults.iter_mut().find(|f| f.remaining > 0 && f.method == method && path.contains(&f.path_contains)) {
            f.remaining -= 1;
            let mut r = HttpResponse::build(actix_web::http::StatusCode::from_u16(f.status).unwrap());
            if let Some(s) = f.retry_after {
                r.insert_header(("Retry-After", s.to_string()));
            }
            return r.json(json!({"code": f.status, "message": format!("injected fault {}", f.status)}));
        }
    }
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method.as_str(), segs.as_slice()) {
        ("POST", ["login", "pubkey", "authenticate"]) | ("POST", ["relay", "pubkey", "authenticate"]) => {
            let km = segs[0] == "relay";
            rsa_login(shared, body, km)
        }
        ("POST", ["sessionauth", "v1", "authenticate"]) | ("POST", ["keyauth", "v1", "authenticate"]) => {
            let mut st = shared.state.lock().unwrap();
            let Some(user) = st.bot_cert_user.clone().filter(|_| client_cert) else {
                return error(401, "Invalid user session: no valid client certificate was presented");
            };
            if segs[0] == "keyauth" {
                let t = random_id(24);
                st.km_tokens.insert(t.clone());
                HttpResponse::Ok().json(json!({"name": "keyManagerToken", "token": t}))
            } else {
                let t = st.issue_session(&user);
                HttpResponse::Ok().json(json!({"name": "sessionToken", "token": t}))
            }
        }
        _ => {
            // Everything else needs a session.
            let session = header("sessionToken").unwrap_or_default();
            let km = header("keyManagerToken");
            let (user, skd) = {
                let st = shared.state.lock().unwrap();
                match st.sessions.get(&session) {
                    Some(s) => s.clone(),
                    None => return error(401, "Invalid session"),
                }
            };
            if segs.first() == Some(&"agent") && segs.get(1) != Some(&"v1") {
                let st = shared.state.lock().unwrap();
                let ok = match km.as_deref() {
                    Some("") | None => skd,
                    Some(t) => st.km_tokens.contains(t),
                };
                if !ok {
                    return error(401, "Invalid key manager token");
                }
            }
            api(req, body, shared, &method, &segs, &user).await
        }
    }
}

fn rsa_login(shared: &Shared, body: &[u8], key_manager: bool) -> HttpResponse {
    let v: Value = serde_json::from_slice(body).unwrap_or_default();
    let Some(token) = v["token"].as_str() else { return error(400, "token is required") };
    let mut st = shared.state.lock().unwrap();
    st.jwts.push(token.to_owned());
    let claims: Option<Value> = token
        .split('.')
        .nth(1)
        .and_then(|p| URL_SAFE_NO_PAD.decode(p).ok())
        .and_then(|b| serde_json::from_slice(&b).ok());
    let Some(sub) = claims.as_ref().and_then(|c| c["sub"].as_str()).map(str::to_owned) else {
        return error(401, "malformed authentication token");
    };
    let Some((_, public)) = st.bot_keys.get(&sub).cloned() else {
        return error(401, "invalid user: unknown service account");
    };
    let claims = match verify_jwt(token, &public) {
        Ok(c) => c,
        Err(e) => return error(401, &e),
    };
    let exp = claims["exp"].as_u64().unwrap_or(0);
    let now = now_secs();
    if exp <= now || exp > now + 300 {
        return error(401, "the token must expire between now and five minutes from now");
    }
    if key_manager {
        let t = random_id(24);
        st.km_tokens.insert(t.clone());
        HttpResponse::Ok().json(json!({"name": "keyManagerToken", "token": t}))
    } else {
        let t = st.issue_session(&sub);
        HttpResponse::Ok().json(json!({"name": "sessionToken", "token": t, "authorizationToken": "Bearer x.y.z"}))
    }
}

async fn api(req: &HttpRequest, body: &[u8], shared: &Shared, method: &str, segs: &[&str], user: &str) -> HttpResponse {
    match (method, segs) {
        ("GET", ["pod", "v2", "sessioninfo"]) => {
            let st = shared.state.lock().unwrap();
            let u = st.users.values().find(|u| u.username == user).cloned().unwrap();
            HttpResponse::Ok().json(json!({"id": u.id, "username": u.username, "displayName": u.display_name,
                                            "emailAddress": format!("{}@example.com", u.username), "roles": ["INDIVIDUAL"]}))
        }
        ("POST", ["pod", "v3", "room", "search"]) => {
            let v: Value = serde_json::from_slice(body).unwrap_or_default();
            let q = v["query"].as_str().unwrap_or_default().to_lowercase();
            let st = shared.state.lock().unwrap();
            let rooms: Vec<Value> = st
                .streams
                .iter()
                .filter(|s| s.kind == "ROOM" && s.name.to_lowercase().contains(&q))
                .map(|s| json!({"roomAttributes": {"name": s.name}, "roomSystemInfo": {"id": s.id, "active": true}}))
                .collect();
            HttpResponse::Ok().json(json!({"count": rooms.len(), "skip": 0, "limit": 100, "rooms": rooms}))
        }
        ("GET", ["agent", "v1", "info"]) => {
            let st = shared.state.lock().unwrap();
            HttpResponse::Ok().json(json!({"version": st.agent_version, "ipAddress": "127.0.0.1"}))
        }
        ("GET", ["agent", "v5", "datafeeds"]) => {
            let st = shared.state.lock().unwrap();
            let list: Vec<Value> = st.feed_order.iter().filter(|f| st.feeds_v2.contains_key(*f)).map(|f| json!({"id": f, "type": "fanout"})).collect();
            HttpResponse::Ok().json(list)
        }
        ("POST", ["agent", "v5", "datafeeds"]) => {
            let id = format!("{}_f", random_id(32));
            let mut st = shared.state.lock().unwrap();
            st.feeds_v2.insert(id.clone(), FeedV2::default());
            st.feed_order.push(id.clone());
            HttpResponse::Created().json(json!({"id": id, "type": "fanout", "createdAt": now_ms()}))
        }
        ("DELETE", ["agent", "v5", "datafeeds", id]) => {
            let mut st = shared.state.lock().unwrap();
            if st.feeds_v2.remove(*id).is_some() {
                HttpResponse::NoContent().finish()
            } else {
                error(400, "the datafeed does not exist")
            }
        }
        ("POST", ["agent", "v5", "datafeeds", id, "read"]) => read_v2(shared, id, body).await,
        ("POST", ["agent", "v4", "datafeed", "create"]) => {
            let id = random_id(32);
            shared.state.lock().unwrap().feeds_v1.insert(id.clone(), VecDeque::new());
            HttpResponse::Ok().json(json!({"id": id}))
        }
        ("GET", ["agent", "v4", "datafeed", id, "read"]) => read_v1(shared, id).await,
        ("POST", ["agent", "v4", "stream", sid, "message", "create"]) => {
            let ct = req.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
            if !ct.starts_with("multipart/form-data") {
                return error(400, "Content-Type must be multipart/form-data");
            }
            let Some(fields) = parse_multipart(ct, body) else { return error(400, "malformed multipart body") };
            let Some(ml) = fields.get("message") else { return error(400, "the message field is required") };
            let text = match messageml_text(ml) {
                Ok(t) => t,
                Err(e) => return error(400, &e),
            };
            let mut st = shared.state.lock().unwrap();
            let Some(stream) = st.stream_by_url_id(sid) else { return error(404, "stream not found") };
            let bot = st.users.values().find(|u| u.username == user).cloned().unwrap();
            let message_id = URL_SAFE_NO_PAD.encode(random_id(16));
            st.sent.push(Sent { message_id: message_id.clone(), stream_id: stream.id.clone(), message_ml: ml.clone(), text: text.clone() });
            let presentation = format!(r#"<div data-format="PresentationML" data-version="2.0">{}</div>"#, xml_escape(&text).replace('\n', "<br/>"));
            let user_json = json!({"userId": bot.id, "displayName": bot.display_name, "username": bot.username});
            let message = json!({"messageId": message_id, "timestamp": now_ms(), "message": presentation, "data": "{}",
                                 "user": user_json, "stream": {"streamId": stream.id, "streamType": stream.kind},
                                 "originalFormat": "com.symphony.messageml.v2"});
            // The bot's own message reaches every feed, as on a real pod.
            st.push_event(json!({"id": random_id(12), "messageId": message_id, "timestamp": now_ms(), "type": "MESSAGESENT",
                                 "initiator": {"user": user_json}, "payload": {"messageSent": {"message": message}}}));
            drop(st);
            shared.notify.notify_waiters();
            HttpResponse::Ok().json(message)
        }
        _ => error(404, &format!("no such endpoint: {method} /{}", segs.join("/"))),
    }
}

/// Waits until `ready` answers something or the long poll ends.
async fn long_poll<T>(shared: &Shared, mut ready: impl FnMut(&mut State) -> Option<T>) -> Option<T> {
    let wait = shared.state.lock().unwrap().long_poll;
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let notified = shared.notify.notified();
        if let Some(v) = ready(&mut shared.state.lock().unwrap()) {
            return Some(v);
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return None;
        }
    }
}

async fn read_v2(shared: &Shared, id: &str, body: &[u8]) -> HttpResponse {
    let v: Value = serde_json::from_slice(body).unwrap_or_default();
    let ack_in = v["ackId"].as_str().unwrap_or_default().to_owned();
    let mut redelivered = 0;
    {
        let mut st = shared.state.lock().unwrap();
        let Some(feed) = st.feeds_v2.get_mut(id) else { return error(400, "Do not retry: the feed no longer exists") };
        if !ack_in.is_empty() && !feed.issued.contains(&ack_in) {
            return error(400, "the ackId is not valid for this feed");
        }
        if let Some((ack, events)) = feed.inflight.take() {
            if ack != ack_in {
                // Not acknowledged: delivered again.
                redelivered = events.len();
                for e in events.into_iter().rev() {
                    feed.queue.push_front(e);
                }
            }
        }
    }
    let feed_id = id.to_owned();
    let events = long_poll(shared, |st| {
        let feed = st.feeds_v2.get_mut(&feed_id)?;
        (!feed.queue.is_empty()).then(|| feed.queue.drain(..feed.queue.len().min(100)).collect::<Vec<_>>())
    })
    .await
    .unwrap_or_default();
    let mut st = shared.state.lock().unwrap();
    let Some(feed) = st.feeds_v2.get_mut(id) else {
        return error(400, "Do not retry: the feed no longer exists");
    };
    let ack = random_id(20);
    feed.issued.insert(ack.clone());
    feed.inflight = Some((ack.clone(), events.clone()));
    let delivered = events.iter().map(|e| e["messageId"].as_str().unwrap_or_default().to_owned()).collect();
    st.reads.push(Read { feed: id.to_owned(), ack_in, ack_out: ack.clone(), delivered, redelivered });
    HttpResponse::Ok().json(json!({"events": events, "ackId": ack}))
}

async fn read_v1(shared: &Shared, id: &str) -> HttpResponse {
    if !shared.state.lock().unwrap().feeds_v1.contains_key(id) {
        return error(400, "the datafeed does not exist");
    }
    let feed_id = id.to_owned();
    let events = long_poll(shared, |st| {
        let feed = st.feeds_v1.get_mut(&feed_id)?;
        (!feed.is_empty()).then(|| feed.drain(..).collect::<Vec<_>>())
    })
    .await;
    let mut st = shared.state.lock().unwrap();
    let delivered: Vec<String> = events.iter().flatten().map(|e| e["messageId"].as_str().unwrap_or_default().to_owned()).collect();
    st.reads.push(Read { feed: id.to_owned(), ack_in: String::new(), ack_out: String::new(), delivered, redelivered: 0 });
    match events {
        Some(ev) => HttpResponse::Ok().json(ev),
        None => HttpResponse::NoContent().finish(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messageml_is_checked_like_the_agent() {
        assert_eq!(messageml_text("<messageML>a &lt; b<br/>&#36;&#123;x&#125;</messageML>").unwrap(), "a < b\n${x}");
        assert!(messageml_text("<messageML>a < b</messageML>").is_err());
        assert!(messageml_text("<messageML>a & b</messageML>").is_err());
        assert!(messageml_text("<messageML>${x}</messageML>").is_err());
        assert!(messageml_text("hello").is_err());
        assert!(messageml_text("<messageML><b>x</messageML>").is_err());
    }
}
