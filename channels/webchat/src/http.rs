//! The HTTP side of a web chat channel: routing under `/hooks/webchat/{hook_id}`, origin
//! checks and CORS, user tokens (`/session`), the two webhooks, history, and the widget's
//! files.

use crate::token::{looks_like_token, Claims, TokenError};
use crate::wire::{self, ClientFrame, ClientKind, FrameError};
use crate::{Inner, Webchat};
use actix_web::http::{header, Method, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use patchbay_channel_core::channel::{error_response, read_body};
use patchbay_channel_core::{HookCtx, Inbound, LogRange, Reply, User, WaitOutcome};
use serde_json::{json, Value};
use std::time::Duration;

const PAGE: &str = include_str!("../assets/chat.html");
const WIDGET_JS: &str = include_str!("../assets/widget.js");
const WIDGET_CSS: &str = include_str!("../assets/widget.css");
const EMBED_JS: &str = include_str!("../assets/embed.js");

pub async fn handle(chat: Webchat, ctx: HookCtx, req: HttpRequest, body: web::Payload) -> HttpResponse {
    let inner = &chat.0;
    let path = ctx.subpath.trim_end_matches('/').to_owned();
    let method = req.method().clone();
    // The widget's files: plain GETs, no origin involved (a <script> tag sends none).
    if method == Method::GET {
        let asset = match path.as_str() {
            "/chat" => Some(("text/html; charset=utf-8", page(inner))),
            "/widget.js" => Some(("text/javascript; charset=utf-8", WIDGET_JS.to_owned())),
            "/widget.css" => Some(("text/css; charset=utf-8", WIDGET_CSS.to_owned())),
            "/embed.js" => Some(("text/javascript; charset=utf-8", EMBED_JS.to_owned())),
            _ => None,
        };
        if let Some((ct, body)) = asset {
            return HttpResponse::Ok()
                .content_type(ct)
                .insert_header((header::CACHE_CONTROL, "no-cache"))
                .insert_header(("X-Content-Type-Options", "nosniff"))
                .body(body);
        }
    }
    // Everything else is answered only to pages of an allowed origin (and to non-browser
    // clients, which send no Origin).
    let origin = req.headers().get(header::ORIGIN).and_then(|v| v.to_str().ok()).map(str::to_owned);
    if let Some(o) = &origin {
        if !inner.origin_allowed(o) {
            return error_response(
                StatusCode::FORBIDDEN,
                "origin_not_allowed",
                &format!("pages of {o} may not use this chat; add the origin to the channel's allowed_origins"),
                Some("Origin"),
            );
        }
    }
    let mut resp = route(&chat, ctx, &req, body, &method, &path).await;
    if let Some(o) = origin {
        cors(&mut resp, &o);
    }
    resp
}

fn cors(resp: &mut HttpResponse, origin: &str) {
    let h = resp.headers_mut();
    if let Ok(v) = header::HeaderValue::from_str(origin) {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
    }
    h.insert(header::VARY, header::HeaderValue::from_static("Origin"));
    h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, header::HeaderValue::from_static("GET, POST, OPTIONS"));
    h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, header::HeaderValue::from_static("authorization, content-type"));
    h.insert(header::ACCESS_CONTROL_MAX_AGE, header::HeaderValue::from_static("600"));
}

async fn route(chat: &Webchat, ctx: HookCtx, req: &HttpRequest, body: web::Payload, method: &Method, path: &str) -> HttpResponse {
    let inner = &chat.0;
    if method == Method::OPTIONS {
        return HttpResponse::NoContent().finish();
    }
    let upgrade = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let known = matches!(
        (method.as_str(), path),
        ("GET", "" | "/ws" | "/history") | ("POST", "/session" | "/botkit/receive" | "/api/messages" | "/botkit/history")
    );
    if !known {
        return error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            "web chat serves GET /chat, /embed.js, /ws (WebSocket), /history and POST /session, /botkit/receive, /api/messages, /botkit/history under its callback URL",
            None,
        );
    }
    if !ctx.enabled {
        return error_response(StatusCode::SERVICE_UNAVAILABLE, "channel_disabled", "this chat is switched off", None);
    }
    match (method.as_str(), path) {
        ("GET", "" | "/ws") if upgrade => crate::socket::upgrade(chat.clone(), ctx, req),
        ("GET", "") => HttpResponse::Found()
            .insert_header((header::LOCATION, format!("{}/chat", inner.base_path)))
            .finish(),
        ("GET", "/ws") => error_response(
            StatusCode::BAD_REQUEST,
            "websocket_expected",
            "this URL takes a WebSocket upgrade",
            None,
        ),
        ("GET", "/history") => history(inner, req).await,
        ("POST", p) => {
            let bytes = match read_body(body, inner.settings.max_frame_bytes.min(ctx.body_limit)).await {
                Ok(b) => b,
                Err(resp) => return resp,
            };
            match p {
                "/session" => session(inner, req, &bytes),
                "/botkit/history" => botkit_history(inner, req, &bytes).await,
                "/botkit/receive" => webhook(inner, &ctx, req, &bytes, false).await,
                _ => webhook(inner, &ctx, req, &bytes, true).await,
            }
        }
        _ => HttpResponse::NotFound().finish(),
    }
}

fn page(inner: &Inner) -> String {
    let title: String = inner
        .settings
        .title
        .chars()
        .map(|c| match c {
            '<' => "&lt;".to_owned(),
            '>' => "&gt;".to_owned(),
            '&' => "&amp;".to_owned(),
            '"' => "&quot;".to_owned(),
            '\'' => "&#39;".to_owned(),
            c => c.to_string(),
        })
        .collect();
    PAGE.replace("{{TITLE}}", &title).replace("{{BASE}}", &inner.base_path)
}

fn bearer(req: &HttpRequest) -> Option<&str> {
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// The token a call presents: `Authorization: Bearer`, else the body's `token`, else its
/// `user` when that is a token (Botkit's client sends the id it was booted with as `user`).
fn presented<'a>(req: &'a HttpRequest, obj: Option<&'a serde_json::Map<String, Value>>) -> Option<&'a str> {
    bearer(req).or_else(|| {
        let obj = obj?;
        obj.get("token")
            .and_then(Value::as_str)
            .or_else(|| obj.get("user").and_then(Value::as_str).filter(|u| looks_like_token(u)))
    })
}

fn token_error(e: TokenError) -> HttpResponse {
    error_response(StatusCode::UNAUTHORIZED, e.code(), e.message(), Some("token"))
}

fn token_required() -> HttpResponse {
    error_response(
        StatusCode::UNAUTHORIZED,
        "token_required",
        "this call needs a user token (Authorization: Bearer, or `user`/`token` in the body); POST …/session issues one",
        Some("token"),
    )
}

/// The session frame a (re)connecting client gets: who it is, a renewed token, and the
/// conversation's newest sequence number.
pub(crate) fn session_frame(inner: &Inner, kind: &str, claims: &Claims, watermark: i64) -> Value {
    let expires = Inner::now_secs() + inner.settings.token_ttl_secs as i64;
    json!({
        "type": kind,
        "user": claims.user,
        "token": inner.signer.issue(&claims.user, expires),
        "expires_at": expires,
        "watermark": watermark,
    })
}

/// `POST /session`: `{}` → a new user; `{"token"}` (or Bearer) → the same user, renewed.
fn session(inner: &Inner, req: &HttpRequest, bytes: &[u8]) -> HttpResponse {
    let obj = if bytes.iter().all(u8::is_ascii_whitespace) {
        serde_json::Map::new()
    } else {
        match serde_json::from_slice::<Value>(bytes) {
            Ok(Value::Object(o)) => o,
            Ok(_) => return error_response(StatusCode::BAD_REQUEST, "bad_json", "the body must be a JSON object", None),
            Err(e) => return error_response(StatusCode::BAD_REQUEST, "bad_json", &format!("the body is not JSON: {e}"), None),
        }
    };
    let now = Inner::now_secs();
    let (claims, new) = match presented(req, Some(&obj)) {
        Some(t) => match inner.signer.verify(t, now) {
            Ok(c) => (c, false),
            Err(e) => return token_error(e),
        },
        None => (inner.signer.new_user(inner.settings.token_ttl_secs, now).0, true),
    };
    let expires = now + inner.settings.token_ttl_secs as i64;
    HttpResponse::Ok().json(json!({
        "user": claims.user,
        "token": inner.signer.issue(&claims.user, expires),
        "expires_at": expires,
        "new": new,
    }))
}

/// Turns a client's message into an inbound and the log entry to store with it (handed to
/// `Inbox::accept_logged`, which appends it in the commit that stores the message, so the
/// conversation log has the user's message before any reply to it).
pub(crate) async fn take_message(
    inner: &Inner,
    claims: &Claims,
    frame: &ClientFrame,
    via: &str,
    name: Option<String>,
) -> Result<(Inbound, Value), FrameError> {
    if let Err(wait) = inner.limiter.take(&claims.user, std::time::Instant::now()) {
        let secs = wait.as_secs() + 1;
        let mut e = FrameError::new(
            "rate_limited",
            format!("too many messages: this chat takes {} a minute; try again in {secs} s", inner.settings.messages_per_minute),
        );
        e.retry_after = Some(secs);
        return Err(e);
    }
    let event_id = match frame.client_id() {
        Some(id) => format!("{}:{id}", claims.user),
        None => format!("{}:{}", claims.user, patchbay_channel_core::ids::random_token(20)),
    };
    let text = frame.text().to_owned();
    let entry = wire::received_entry(&text, &claims.user, &event_id);
    // The raw payload goes to the assistant: never the token, never a claimed `user`.
    let mut raw = frame.obj.clone();
    raw.remove("token");
    raw.insert("user".into(), json!(claims.user));
    raw.insert("channel".into(), json!(via));
    let inbound = Inbound {
        event_id,
        platform_conversation: claims.user.clone(),
        thread: None,
        user: User {
            id: claims.user.clone(),
            name: name.or_else(|| frame.profile_name()).unwrap_or_default(),
        },
        text,
        addressed: true,
        route: json!({"via": via}),
        raw: Value::Object(raw).into(),
        received_at: patchbay_channel_core::now_ms(),
    };
    Ok((inbound, entry))
}

fn frame_error_response(e: FrameError) -> HttpResponse {
    let status = match e.code {
        "unavailable" => StatusCode::SERVICE_UNAVAILABLE,
        "rate_limited" => StatusCode::TOO_MANY_REQUESTS,
        _ => StatusCode::BAD_REQUEST,
    };
    let mut resp = error_response(status, e.code, &e.message, None);
    if let Some(secs) = e.retry_after {
        if let Ok(v) = actix_web::http::header::HeaderValue::from_str(&secs.to_string()) {
            resp.headers_mut().insert(actix_web::http::header::RETRY_AFTER, v);
        }
    }
    resp
}


/// `POST /botkit/receive` (one reply, Botkit Anywhere) and `POST /api/messages` (an array,
/// Botkit 4).
async fn webhook(inner: &Inner, ctx: &HookCtx, req: &HttpRequest, bytes: &[u8], array: bool) -> HttpResponse {
    let frame = match wire::parse(bytes) {
        Ok(f) => f,
        Err(e) => return frame_error_response(e),
    };
    let now = Inner::now_secs();
    let claims = match presented(req, Some(&frame.obj)) {
        Some(t) => match inner.signer.verify(t, now) {
            Ok(c) => Some(c),
            Err(e) => return token_error(e),
        },
        None => None,
    };
    let answer = |frames: Vec<Value>| {
        if array {
            HttpResponse::Ok().json(frames)
        } else {
            HttpResponse::Ok().json(combine(frames))
        }
    };
    match frame.kind {
        ClientKind::Connect => {
            let (claims, kind) = match claims {
                Some(c) => (c, "welcome_back"),
                None => (inner.signer.new_user(inner.settings.token_ttl_secs, now).0, "hello"),
            };
            let head = inner.head(&claims.user).await.unwrap_or(0);
            answer(vec![session_frame(inner, kind, &claims, head)])
        }
        ClientKind::Identify | ClientKind::Typing => {
            if claims.is_none() {
                return token_required();
            }
            answer(Vec::new())
        }
        ClientKind::Message => {
            let Some(claims) = claims else { return token_required() };
            let (inbound, entry) = match take_message(inner, &claims, &frame, "webhook", None).await {
                Ok(x) => x,
                Err(e) => return frame_error_response(e),
            };
            ctx.status.event_seen();
            let event_id = inbound.event_id.clone();
            let timeout = Duration::from_millis(inner.settings.reply_timeout_ms);
            match ctx.inbox.accept_logged_and_wait(&ctx.channel_id, inbound, entry, timeout).await {
                // Logged by the pipeline in the commit that completed the message.
                Ok(WaitOutcome::Logged(entries)) => {
                    answer(entries.into_iter().map(|(entry, seq)| wire::with_seq(entry, seq)).collect())
                }
                // Handed over unlogged (the conversation had replies still queued).
                Ok(WaitOutcome::Replies(replies)) => {
                    let mut frames = Vec::with_capacity(replies.len());
                    for (i, r) in replies.iter().enumerate() {
                        frames.push(log_inline(inner, &claims.user, &event_id, i, r).await);
                    }
                    answer(frames)
                }
                Ok(WaitOutcome::Duplicate) | Ok(WaitOutcome::Pending) => {
                    // The replies will be in the log (the socket and the history show them).
                    answer(Vec::new())
                }
                Err(e) => error_response(StatusCode::SERVICE_UNAVAILABLE, "inbox_unavailable", &e.to_string(), None),
            }
        }
    }
}

/// Logs a reply answered inline, so history and sockets know it; answers its frame.
async fn log_inline(inner: &Inner, user: &str, event_id: &str, index: usize, reply: &Reply) -> Value {
    // The id the pipeline gives this reply: should the answer also be delivered through
    // `send` (a crash right after it was handed over here), it is logged once.
    let id = patchbay_channel_core::ids::reply_id(inner.channel_id.as_str(), event_id, index);
    let frame = wire::reply_frame(reply, user, &id);
    match inner.log.append(&inner.channel_id, user, Some(&id), frame.clone()).await {
        Ok(seq) => wire::with_seq(frame, seq),
        Err(e) => {
            tracing::warn!(channel = %inner.channel_id, error = %e, "an inline web chat reply could not be logged");
            frame
        }
    }
}

/// Botkit Anywhere's webhook answers one message: several replies are joined (text one
/// paragraph each, files together, the last quick replies). No reply: `{}`.
fn combine(frames: Vec<Value>) -> Value {
    let mut it = frames.into_iter();
    let Some(mut first) = it.next() else { return json!({}) };
    for f in it {
        if first["type"] == "message" && f["type"] == "message" {
            let text = format!("{}\n\n{}", first["text"].as_str().unwrap_or(""), f["text"].as_str().unwrap_or(""));
            first["text"] = json!(text);
            if let Some(files) = f.get("files").and_then(Value::as_array) {
                let mut all = first.get("files").and_then(Value::as_array).cloned().unwrap_or_default();
                all.extend(files.iter().cloned());
                first["files"] = json!(all);
            }
            if f.get("quick_replies").is_some() {
                first["quick_replies"] = f["quick_replies"].clone();
            }
            if f.get("seq").is_some() {
                first["seq"] = f["seq"].clone();
            }
        }
    }
    first
}

fn history_entry(e: patchbay_channel_core::LogEntry) -> Value {
    let mut v = wire::with_seq(e.body, e.seq);
    v["at"] = json!(e.at);
    v
}

/// `GET /history?before=<seq>&limit=<n>` with `Authorization: Bearer <token>`: the token's
/// user's messages, newest page first, each page oldest first.
async fn history(inner: &Inner, req: &HttpRequest) -> HttpResponse {
    let Some(token) = bearer(req) else { return token_required() };
    let claims = match inner.signer.verify(token, Inner::now_secs()) {
        Ok(c) => c,
        Err(e) => return token_error(e),
    };
    #[derive(serde::Deserialize)]
    struct Q {
        before: Option<i64>,
        limit: Option<usize>,
    }
    let q = match web::Query::<Q>::from_query(req.query_string()) {
        Ok(q) => q.into_inner(),
        Err(e) => return error_response(StatusCode::BAD_REQUEST, "bad_query", &format!("before and limit must be numbers: {e}"), None),
    };
    let limit = q.limit.unwrap_or(50).clamp(1, 200);
    match inner.log.read(&inner.channel_id, &claims.user, LogRange::Before(q.before), limit).await {
        Ok(entries) => {
            let next = (entries.len() == limit).then(|| entries.first().map(|e| e.seq)).flatten().filter(|s| *s > 1);
            let messages: Vec<Value> = entries.into_iter().map(history_entry).collect();
            HttpResponse::Ok().json(json!({"user": claims.user, "messages": messages, "next_before": next}))
        }
        Err(e) => error_response(StatusCode::SERVICE_UNAVAILABLE, "unavailable", &e.to_string(), None),
    }
}

/// `POST /botkit/history` `{"user": <token>}`: Botkit's client's history call, answered as it
/// expects (`{"success", "history"}`), for the token's user only.
async fn botkit_history(inner: &Inner, req: &HttpRequest, bytes: &[u8]) -> HttpResponse {
    let fail = |status: StatusCode, error: &str| HttpResponse::build(status).json(json!({"success": false, "history": [], "error": error}));
    let obj = match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(o)) => o,
        _ => return fail(StatusCode::BAD_REQUEST, "the body must be a JSON object"),
    };
    let Some(token) = presented(req, Some(&obj)) else {
        return fail(StatusCode::UNAUTHORIZED, "no user specified: send the user token as `user`");
    };
    let claims = match inner.signer.verify(token, Inner::now_secs()) {
        Ok(c) => c,
        Err(e) => return fail(StatusCode::UNAUTHORIZED, e.message()),
    };
    let limit = obj.get("limit").and_then(Value::as_u64).unwrap_or(10).clamp(1, 200) as usize;
    match inner.log.read(&inner.channel_id, &claims.user, LogRange::Before(None), limit).await {
        Ok(entries) => {
            let history: Vec<Value> = entries.into_iter().map(history_entry).collect();
            HttpResponse::Ok().json(json!({"success": true, "history": history}))
        }
        Err(e) => fail(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

