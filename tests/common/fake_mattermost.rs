//! A protocol-faithful fake Mattermost server, written from `shared/reference/mattermost.md`
//! (§1 outgoing webhooks, §2 incoming webhooks, §7 pain points, §8 fixtures) and the
//! Mattermost server source that sheet quotes (`app/webhook.go`, `web/webhook.go`,
//! `model/incoming_webhook.go`, `model/outgoing_webhook.go`).
//!
//! What it plays:
//! - **Outgoing webhooks** (Mattermost → patchbay): [`FakeMattermost::user_posts`] creates a
//!   post as a user and fires the team's outgoing webhooks exactly as `handleWebhookEvents`
//!   does, POSTs the payload byte for byte as Go encodes it, and turns each callback's answer
//!   into posts as `TriggerWebhook` does (inline responses, `response_type: "comment"`,
//!   overrides, splitting). The firing is awaited so the test gets a [`PostOutcome`].
//! - **Incoming webhooks** (patchbay → Mattermost): `POST {url}/hooks/{id}` implemented as
//!   `web/webhook.go` `incomingWebhook` + `app/webhook.go` `HandleIncomingWebhook`, with a
//!   fault script ([`Fault`]) and a record of every request ([`IncomingRequest`]).
//!
//! Room to grow: all HTTP routes are declared in [`routes`] (a `ServiceConfig`), every post is
//! created through one place (`State::save_post`) and announced on a broadcast channel
//! ([`FakeMattermost::subscribe`]), and [`Post::to_api_json`] gives the REST/WebSocket shape —
//! so `/api/v4/posts`, `/api/v4/users/me` and a `/api/v4/websocket` endpoint emitting
//! `posted` events can be added without reshaping the state.
//!
//! Where the sheet is silent or ambiguous, the fake follows the server source:
//! - AppError bodies omit `is_oauth` (`json:"is_oauth,omitempty"` in `model.AppError`; real
//!   captures have `{"id","message","detailed_error","request_id","status_code"}`), and
//!   `detailed_error` is `""`. Error ids are exact; messages are the English strings, best effort.
//! - The 429 body is `limit exceeded\n` (Go's `http.Error` appends a newline).
//! - multipart/form-data is decoded with gorilla/schema's defaults: Go field names matched
//!   case-insensitively (`text`, `username`, `iconurl`, `channelname`, `type`, `iconemoji`),
//!   any other field (`channel`, `icon_url`, `props`, …) → 400 `api.webhook.incoming.error`.
//! - `"attachments": []` without text passes the `Attachments == nil` check and posts an
//!   empty message; `props.webhook_display_name` is overwritten by the hook's display name;
//!   `props.attachments` is ignored (only top-level attachments count).
//! - Attachments are stored as the JSON given (Slack text/link processing applied to
//!   `text`/`pretext`/`title`/`fields[].value`), not re-marshalled through Go's struct.
//! - `@user` posts into the direct channel `<id>__<id>` (sorted) of the hook's creator and the
//!   user, created on demand; a private channel needs the creator to be a member or admin.
//! - Hooks of one post fire one after the other, the callback URLs of one hook concurrently
//!   (`TriggerWebhook` waits on a `WaitGroup`); [`FakeMattermost::user_posts`] awaits them all,
//!   whereas the real server answers the user first and fires in the background.
//! - No rate limiter, request-size limit or SSRF filter is modelled; use [`Fault`]s.
//!
//! Deliberate differences from a stock server, for convenience (see [`Settings`]):
//! `EnablePostUsernameOverride` and `EnablePostIconOverride` default to **true** here (false
//! on a real server), and `AllowedUntrustedInternalConnections` is not modelled (callbacks on
//! 127.0.0.1 are allowed, as if the admin had listed them).
#![allow(dead_code)]

use actix_web::dev::{Extensions, ServerHandle};
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::{Map, Value};
use std::any::Any;
use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

// ------------------------------------------------------------------------------------------
// Constants (values from the Mattermost source quoted in the reference sheet)
// ------------------------------------------------------------------------------------------

/// The team every fake starts with (its name = `team_domain` in outgoing payloads).
pub const DEFAULT_TEAM: &str = "acme";
/// The system admin every fake starts with; it creates webhooks unless told otherwise, so
/// webhook posts are authored by it (`hook.CreatorId`).
pub const ADMIN_USER: &str = "sysadmin";
/// `model.PostMessageMaxRunesV2` = 65535 / 4: the longest message, in runes (§2.4).
pub const POST_MESSAGE_MAX_RUNES_V2: usize = 16383;
/// `model.PostPropsMaxUserRunes` = 800000 - 40000 (§2.4).
pub const POST_PROPS_MAX_USER_RUNES: usize = 760_000;
/// `MaxIntegrationResponseSize`: how much of a callback's answer is read (§1.3).
pub const MAX_INTEGRATION_RESPONSE_SIZE: usize = 1024 * 1024;
/// `defaultUserAgent` of Mattermost's httpservice (§1.3).
pub const USER_AGENT: &str = "Mattermost-Bot/1.1";
/// `OutgoingIntegrationRequestsDefaultTimeout` (§1.3).
pub const DEFAULT_OUTGOING_TIMEOUT: Duration = Duration::from_secs(30);
/// httpservice `ConnectTimeout` (§1.3).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// `X-Version-Id` answered on webhook responses (`<version>.<build>.<config hash>.<licensed>`).
pub const VERSION_ID: &str = "10.11.0.10.11.0.fakeconfighash.false";
/// Go's `ParseForm` bound on a form body (10 MB).
const GO_MAX_FORM_SIZE: usize = 10 << 20;

const ID_ALPHABET: &[u8; 32] = b"ybndrfg8ejkmcpqxot1uwisza345h769";

/// A Mattermost id: `model.NewId()` = a random (v4) UUID in base32 with Mattermost's
/// alphabet, truncated to 26 characters (lowercase letters and digits).
pub fn new_id() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut out = String::with_capacity(26);
    let (mut acc, mut bits) = (0u32, 0u32);
    for byte in b {
        acc = (acc << 8) | byte as u32;
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ID_ALPHABET[((acc >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ID_ALPHABET[((acc << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// `model.IsValidId`: 26 letters or digits.
pub fn is_valid_id(s: &str) -> bool {
    s.len() == 26 && s.chars().all(|c| c.is_alphanumeric())
}

fn now_millis() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

// ------------------------------------------------------------------------------------------
// Go encodings: encoding/json (HTML-safe) and net/url
// ------------------------------------------------------------------------------------------

/// Appends `s` as a JSON string exactly as Go's `encoding/json.Marshal` writes it: `<` `>`
/// `&` as `\u003c` `\u003e` `\u0026`, U+2028/U+2029 as `\u2028`/`\u2029`, `\b` `\f` `\n` `\r`
/// `\t` short escapes (Go ≥ 1.22), other control characters as `\u00XX` (lowercase hex).
pub fn go_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '<' | '>' | '&' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A JSON value as Go marshals a `map[string]any`: compact, keys sorted, HTML-safe strings.
pub fn go_json_value(v: &Value) -> String {
    fn go(out: &mut String, v: &Value) {
        match v {
            Value::Null => out.push_str("null"),
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Value::Number(n) => out.push_str(&n.to_string()),
            Value::String(s) => go_json_string(out, s),
            Value::Array(a) => {
                out.push('[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    go(out, x);
                }
                out.push(']');
            }
            Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                out.push('{');
                for (i, k) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    go_json_string(out, k);
                    out.push(':');
                    go(out, &m[k.as_str()]);
                }
                out.push('}');
            }
        }
    }
    let mut s = String::new();
    go(&mut s, v);
    s
}

/// Go's `url.QueryEscape`: `[A-Za-z0-9-_.~]` kept, space → `+`, every other byte `%XX`
/// (uppercase hex).
pub fn go_query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(b as char),
            b' ' => out.push('+'),
            _ => {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    out
}

/// Go's `url.Values.Encode()`: keys sorted, `key=value` pairs (both query-escaped) joined by
/// `&`, no trailing newline.
pub fn go_values_encode(pairs: &[(&str, &str)]) -> String {
    let mut sorted: Vec<&(&str, &str)> = pairs.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0)); // stable: values of one key keep their order
    sorted
        .iter()
        .map(|(k, v)| format!("{}={}", go_query_escape(k), go_query_escape(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Go's `url.QueryUnescape` on bytes (`+` → space; a bad `%` sequence is an error).
fn go_query_unescape(s: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'%' => {
                let hex = |b: u8| (b as char).to_digit(16);
                let (h, l) = (s.get(i + 1).and_then(|b| hex(*b))?, s.get(i + 2).and_then(|b| hex(*b))?);
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Some(out)
}

/// Go's `url.ParseQuery`: pairs split on `&` (a `;` makes the pair invalid), bad escapes
/// skipped; values in order of appearance.
fn go_parse_query(s: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    for part in s.split(|b| *b == b'&') {
        if part.is_empty() || part.contains(&b';') {
            continue;
        }
        let (k, v) = match part.iter().position(|b| *b == b'=') {
            Some(i) => (&part[..i], &part[i + 1..]),
            None => (part, &part[part.len()..]),
        };
        if let (Some(k), Some(v)) = (go_query_unescape(k), go_query_unescape(v)) {
            out.push((k, v));
        }
    }
    out
}

// ------------------------------------------------------------------------------------------
// Go mime.ParseMediaType and a multipart/form-data reader
// ------------------------------------------------------------------------------------------

#[derive(Debug, PartialEq)]
enum MediaErr {
    /// `mime.ErrInvalidMediaParameter`: the media type is still returned.
    InvalidParameter,
    Other(String),
}

fn is_tspecial(c: char) -> bool {
    "()<>@,;:\\\"/[]?=".contains(c)
}

fn is_token_char(c: char) -> bool {
    (c as u32) > 0x20 && (c as u32) < 0x7f && !is_tspecial(c)
}

fn consume_token(v: &str) -> (&str, &str) {
    let end = v.find(|c: char| !is_token_char(c)).unwrap_or(v.len());
    (&v[..end], &v[end..])
}

fn consume_value(v: &str) -> (String, &str) {
    if !v.starts_with('"') {
        let (t, rest) = consume_token(v);
        return (t.to_owned(), rest);
    }
    let mut buf = String::new();
    let mut chars = v.char_indices().skip(1).peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return (buf, &v[i + 1..]),
            '\\' if chars.peek().is_some_and(|(_, n)| is_tspecial(*n)) => {
                buf.push(chars.next().unwrap().1);
            }
            '\r' | '\n' => return (String::new(), v),
            c => buf.push(c),
        }
    }
    (String::new(), v)
}

fn consume_media_param(v: &str) -> Option<(String, String, &str)> {
    let rest = v.trim_start().strip_prefix(';')?.trim_start();
    let (param, rest) = consume_token(rest);
    if param.is_empty() {
        return None;
    }
    let rest = rest.trim_start().strip_prefix('=')?.trim_start();
    let (value, rest2) = consume_value(rest);
    if value.is_empty() && rest2.len() == rest.len() {
        return None;
    }
    Some((param.to_lowercase(), value, rest2))
}

/// Go's `mime.ParseMediaType` (no RFC 2231 continuations): lowercased media type, params.
fn parse_media_type(v: &str) -> (String, HashMap<String, String>, Option<MediaErr>) {
    let base = v.split(';').next().unwrap_or("");
    let mediatype = base.to_lowercase().trim().to_owned();
    // checkMediaTypeDisposition
    let check = {
        let (typ, rest) = consume_token(&mediatype);
        if typ.is_empty() {
            Err("mime: no media type")
        } else if rest.is_empty() {
            Ok(())
        } else if let Some(rest) = rest.strip_prefix('/') {
            let (sub, rest) = consume_token(rest);
            if sub.is_empty() {
                Err("mime: expected token after slash")
            } else if !rest.is_empty() {
                Err("mime: unexpected content after media subtype")
            } else {
                Ok(())
            }
        } else {
            Err("mime: expected slash after first token")
        }
    };
    if let Err(e) = check {
        return (String::new(), HashMap::new(), Some(MediaErr::Other(e.into())));
    }
    let mut params = HashMap::new();
    let mut rest = &v[base.len()..];
    loop {
        rest = rest.trim_start();
        if rest.is_empty() {
            break;
        }
        match consume_media_param(rest) {
            None => {
                if rest.trim() == ";" {
                    break;
                }
                return (mediatype, HashMap::new(), Some(MediaErr::InvalidParameter));
            }
            Some((k, val, r)) => {
                if params.get(&k).is_some_and(|old: &String| *old != val) {
                    return (String::new(), HashMap::new(), Some(MediaErr::Other("mime: duplicate parameter name".into())));
                }
                params.insert(k, val);
                rest = r;
            }
        }
    }
    (mediatype, params, None)
}

fn find_sub(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    (from..=hay.len() - needle.len()).find(|&i| &hay[i..i + needle.len()] == needle)
}

/// The non-file fields of a multipart/form-data body as Go's `Request.ParseMultipartForm`
/// leaves them in `PostForm`; `None` when the body is malformed (Go then keeps no field).
fn parse_multipart(body: &[u8], boundary: &str) -> Option<Vec<(String, String)>> {
    if boundary.is_empty() {
        return None;
    }
    let dash = format!("--{boundary}").into_bytes();
    // First boundary line (preamble allowed before it).
    let mut pos = 0;
    let start = loop {
        let i = find_sub(body, &dash, pos)?;
        if i == 0 || body[i - 1] == b'\n' {
            break i;
        }
        pos = i + 1;
    };
    let mut cur = start + dash.len();
    let mut fields = Vec::new();
    loop {
        // After a boundary: `--` ends the body, else optional whitespace and a newline.
        if body[cur..].starts_with(b"--") {
            return Some(fields);
        }
        while cur < body.len() && (body[cur] == b' ' || body[cur] == b'\t') {
            cur += 1;
        }
        if body[cur..].starts_with(b"\r\n") {
            cur += 2;
        } else if body[cur..].starts_with(b"\n") {
            cur += 1;
        } else {
            return None;
        }
        // The part runs to the next "\n--boundary".
        let mut nl_dash = b"\n".to_vec();
        nl_dash.extend_from_slice(&dash);
        let end = find_sub(body, &nl_dash, cur)?;
        let mut part_end = end;
        if part_end > cur && body[part_end - 1] == b'\r' {
            part_end -= 1;
        }
        let part = &body[cur..part_end];
        cur = end + nl_dash.len();
        // Headers, blank line, content.
        let (head, content) = if let Some(i) = find_sub(part, b"\r\n\r\n", 0) {
            (&part[..i], &part[i + 4..])
        } else if let Some(i) = find_sub(part, b"\n\n", 0) {
            (&part[..i], &part[i + 2..])
        } else if part.starts_with(b"\r\n") {
            (&part[..0], &part[2..])
        } else if part.starts_with(b"\n") {
            (&part[..0], &part[1..])
        } else {
            return None;
        };
        let head = std::str::from_utf8(head).ok()?;
        let mut name = None;
        let mut filename = None;
        for line in head.lines() {
            let (k, v) = line.split_once(':')?;
            if k.trim().eq_ignore_ascii_case("content-disposition") {
                let (disp, params, err) = parse_media_type(v.trim());
                if err.is_none() && disp == "form-data" {
                    name = params.get("name").cloned();
                    filename = params.get("filename").cloned();
                }
            }
        }
        if let (Some(name), None) = (name, filename) {
            if !name.is_empty() {
                fields.push((name, String::from_utf8_lossy(content).into_owned()));
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// Go encoding/json decoding of the webhook request/response structs
// ------------------------------------------------------------------------------------------

/// The top-level JSON value with object keys in document order (Go assigns fields in that
/// order, so a later duplicate wins); `None` for `null`.
struct OrderedTop(Option<Vec<(String, Value)>>);

impl<'de> Deserialize<'de> for OrderedTop {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OrderedTop;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_unit<E>(self) -> Result<OrderedTop, E> {
                Ok(OrderedTop(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<OrderedTop, A::Error> {
                let mut v = Vec::new();
                while let Some((k, val)) = m.next_entry::<String, Value>()? {
                    v.push((k, val));
                }
                Ok(OrderedTop(Some(v)))
            }
        }
        d.deserialize_any(V)
    }
}

enum FirstValue {
    Eof,
    Value(Option<Vec<(String, Value)>>),
    Err(String),
}

/// `json.NewDecoder(r).Decode(&v)`: the first JSON value only (trailing bytes ignored),
/// `io.EOF` on an empty or all-whitespace input. Invalid UTF-8 is replaced by U+FFFD as Go
/// does in strings.
fn go_decode_first(bytes: &[u8]) -> FirstValue {
    let text = String::from_utf8_lossy(bytes);
    if text.trim_matches(|c| matches!(c, ' ' | '\t' | '\r' | '\n')).is_empty() {
        return FirstValue::Eof;
    }
    let mut it = serde_json::Deserializer::from_str(&text).into_iter::<OrderedTop>();
    match it.next() {
        None => FirstValue::Eof,
        Some(Ok(OrderedTop(v))) => FirstValue::Value(v),
        Some(Err(e)) => FirstValue::Err(e.to_string()),
    }
}

/// Go's field matching: the exact json tag first, else a case-insensitive match.
fn go_field<'a>(key: &str, fields: &[&'a str]) -> Option<&'a str> {
    fields
        .iter()
        .find(|f| **f == key)
        .or_else(|| fields.iter().find(|f| f.eq_ignore_ascii_case(key)))
        .copied()
}

fn type_err(field: &str, v: &Value, go_type: &str) -> String {
    let kind = match v {
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
        Value::Null => "null",
    };
    format!("json: cannot unmarshal {kind} into Go struct field .{field} of type {go_type}")
}

/// Decodes into a Go `string` field: `null` leaves it unchanged.
fn set_go_string(dst: &mut String, field: &str, v: Value, errs: &mut Vec<String>) {
    match v {
        Value::String(s) => *dst = s,
        Value::Null => {}
        other => errs.push(type_err(field, &other, "string")),
    }
}

/// Decodes into a Go `map[string]any` field: `null` sets nil, an object adds its keys.
fn set_go_map(dst: &mut Option<Map<String, Value>>, field: &str, v: Value, errs: &mut Vec<String>) {
    match v {
        Value::Object(m) => dst.get_or_insert_with(Map::new).extend(m),
        Value::Null => *dst = None,
        other => errs.push(type_err(field, &other, "model.StringInterface")),
    }
}

/// Decodes into `[]*SlackAttachment`: `null` sets nil; elements must be objects or null.
fn set_go_attachments(dst: &mut Option<Vec<Value>>, field: &str, v: Value, errs: &mut Vec<String>) {
    match v {
        Value::Array(a) => {
            if let Some(bad) = a.iter().find(|x| !x.is_object() && !x.is_null()) {
                errs.push(type_err(field, bad, "model.SlackAttachment"));
            } else {
                *dst = Some(a);
            }
        }
        Value::Null => *dst = None,
        other => errs.push(type_err(field, &other, "[]*model.SlackAttachment")),
    }
}

/// Decodes into `*PostPriority` (`priority` *string, `requested_ack`/`persistent_notifications` *bool).
fn set_go_priority(dst: &mut Option<Value>, field: &str, v: Value, errs: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in &m {
                let ok = match go_field(k, &["priority", "requested_ack", "persistent_notifications"]) {
                    Some("priority") => x.is_string() || x.is_null(),
                    Some(_) => x.is_boolean() || x.is_null(),
                    None => true,
                };
                if !ok {
                    errs.push(type_err(k, x, "model.PostPriority"));
                }
            }
            *dst = Some(Value::Object(m));
        }
        Value::Null => *dst = None,
        other => errs.push(type_err(field, &other, "*model.PostPriority")),
    }
}

fn priority_level(p: &Value) -> Option<String> {
    let m = p.as_object()?;
    let key = m.keys().find(|k| go_field(k, &["priority"]).is_some())?;
    m[key.as_str()].as_str().map(str::to_owned)
}

/// `model.OutgoingWebhookResponse`, the callback's inline answer (§1.4).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OutgoingResponse {
    /// `*string`: `None` when absent or `null` (then nothing is posted unless attachments).
    pub text: Option<String>,
    pub username: String,
    pub icon_url: String,
    pub props: Option<Map<String, Value>>,
    pub attachments: Option<Vec<Value>>,
    pub post_type: String,
    pub response_type: String,
    pub priority: Option<Value>,
}

/// How Mattermost reads a callback's answer (`doOutgoingWebhookRequest`): the first 1 MiB,
/// decoded as JSON whatever the status and Content-Type. `Ok(None)` for an empty body (or
/// `null`-free EOF); `Err("api.unmarshal_error: …")` for anything Go's decoder rejects.
pub fn parse_outgoing_response(body: &[u8]) -> Result<Option<OutgoingResponse>, String> {
    let limited = &body[..body.len().min(MAX_INTEGRATION_RESPONSE_SIZE)];
    let entries = match go_decode_first(limited) {
        FirstValue::Eof => return Ok(None),
        FirstValue::Err(e) => return Err(format!("api.unmarshal_error: {e}")),
        FirstValue::Value(None) => return Ok(Some(OutgoingResponse::default())),
        FirstValue::Value(Some(entries)) => entries,
    };
    let mut r = OutgoingResponse::default();
    let mut errs = Vec::new();
    let fields = ["text", "username", "icon_url", "props", "attachments", "type", "response_type", "priority"];
    for (k, v) in entries {
        match go_field(&k, &fields) {
            Some("text") => match v {
                Value::String(s) => r.text = Some(s),
                Value::Null => r.text = None,
                other => errs.push(type_err("text", &other, "string")),
            },
            Some("username") => set_go_string(&mut r.username, "username", v, &mut errs),
            Some("icon_url") => set_go_string(&mut r.icon_url, "icon_url", v, &mut errs),
            Some("props") => set_go_map(&mut r.props, "props", v, &mut errs),
            Some("attachments") => set_go_attachments(&mut r.attachments, "attachments", v, &mut errs),
            Some("type") => set_go_string(&mut r.post_type, "type", v, &mut errs),
            Some("response_type") => set_go_string(&mut r.response_type, "response_type", v, &mut errs),
            Some("priority") => set_go_priority(&mut r.priority, "priority", v, &mut errs),
            _ => {}
        }
    }
    match errs.into_iter().next() {
        Some(e) => Err(format!("api.unmarshal_error: {e}")),
        None => Ok(Some(r)),
    }
}

/// `model.IncomingWebhookRequest` (§2.3).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct IncomingPayload {
    pub text: String,
    pub username: String,
    pub icon_url: String,
    /// `channel`: a name, `#name` or `@username`.
    pub channel: String,
    pub props: Option<Map<String, Value>>,
    pub attachments: Option<Vec<Value>>,
    pub post_type: String,
    pub icon_emoji: String,
    pub priority: Option<Value>,
}

fn decode_incoming_once(bytes: &[u8]) -> Result<IncomingPayload, String> {
    let entries = match go_decode_first(bytes) {
        FirstValue::Eof => return Err("EOF".into()),
        FirstValue::Err(e) => return Err(e),
        FirstValue::Value(None) => return Ok(IncomingPayload::default()),
        FirstValue::Value(Some(e)) => e,
    };
    let mut r = IncomingPayload::default();
    let mut errs = Vec::new();
    let fields = ["text", "username", "icon_url", "channel", "props", "attachments", "type", "icon_emoji", "priority"];
    for (k, v) in entries {
        match go_field(&k, &fields) {
            Some("text") => set_go_string(&mut r.text, "text", v, &mut errs),
            Some("username") => set_go_string(&mut r.username, "username", v, &mut errs),
            Some("icon_url") => set_go_string(&mut r.icon_url, "icon_url", v, &mut errs),
            Some("channel") => set_go_string(&mut r.channel, "channel", v, &mut errs),
            Some("props") => set_go_map(&mut r.props, "props", v, &mut errs),
            Some("attachments") => set_go_attachments(&mut r.attachments, "attachments", v, &mut errs),
            Some("type") => set_go_string(&mut r.post_type, "type", v, &mut errs),
            Some("icon_emoji") => set_go_string(&mut r.icon_emoji, "icon_emoji", v, &mut errs),
            Some("priority") => set_go_priority(&mut r.priority, "priority", v, &mut errs),
            _ => {}
        }
    }
    match errs.into_iter().next() {
        Some(e) => Err(e),
        None => Ok(r),
    }
}

/// `escapeControlCharsFromPayload`: the regexp
/// `(?s)"(text|fallback|pretext|author_name|title|value)"\s*:\s*"(\\"|[^"])*"` with every raw
/// `\n`/`\t` inside each match escaped (Go `\s` = `[\t\n\f\r ]`; leftmost-first, greedy).
pub fn escape_control_chars(by: &[u8]) -> Vec<u8> {
    const KEYS: [&[u8]; 6] = [b"text", b"fallback", b"pretext", b"author_name", b"title", b"value"];
    let is_space = |b: u8| matches!(b, b'\t' | b'\n' | b'\x0c' | b'\r' | b' ');
    // The end (exclusive) of a match starting at `i`, if any.
    let match_at = |i: usize| -> Option<usize> {
        if by[i] != b'"' {
            return None;
        }
        let key = KEYS.iter().find(|k| by[i + 1..].starts_with(k) && by.get(i + 1 + k.len()) == Some(&b'"'))?;
        let mut j = i + 2 + key.len();
        while j < by.len() && is_space(by[j]) {
            j += 1;
        }
        if by.get(j) != Some(&b':') {
            return None;
        }
        j += 1;
        while j < by.len() && is_space(by[j]) {
            j += 1;
        }
        if by.get(j) != Some(&b'"') {
            return None;
        }
        j += 1;
        // (\\"|[^"])* then `"`: greedy; if no bare quote follows, backtrack to the quote
        // of the last `\"` consumed as a pair.
        let mut last_pair_quote = None;
        while j < by.len() {
            if by[j] == b'\\' && by.get(j + 1) == Some(&b'"') {
                last_pair_quote = Some(j + 1);
                j += 2;
            } else if by[j] == b'"' {
                return Some(j + 1);
            } else {
                j += 1;
            }
        }
        last_pair_quote.map(|q| q + 1)
    };
    let mut out = Vec::with_capacity(by.len());
    let mut i = 0;
    while i < by.len() {
        if let Some(end) = match_at(i) {
            for &b in &by[i..end] {
                match b {
                    b'\n' => out.extend_from_slice(b"\\n"),
                    b'\t' => out.extend_from_slice(b"\\t"),
                    b => out.push(b),
                }
            }
            i = end;
        } else {
            out.push(by[i]);
            i += 1;
        }
    }
    out
}

/// `model.IncomingWebhookRequestFromJSON`: strict decode, then one retry after
/// [`escape_control_chars`]; failure → 400 `model.incoming_hook.parse_data.app_error`.
pub fn decode_incoming_json(bytes: &[u8]) -> Result<IncomingPayload, AppError> {
    decode_incoming_once(bytes)
        .or_else(|_| decode_incoming_once(&escape_control_chars(bytes)))
        .map_err(|e| AppError::new("model.incoming_hook.parse_data.app_error", "Unable to parse incoming data.", 400).detail(e))
}

// ------------------------------------------------------------------------------------------
// Slack compatibility text processing
// ------------------------------------------------------------------------------------------

/// `linkWithTextRegex` `<([^\n<\|>]+)\|([^\|\n>]+)>` → `[$2]($1)` (`CreateWebhookPost`,
/// `ParseSlackLinksToMarkdown`).
pub fn slack_links_to_markdown(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('<') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let g1_end = after.find(['\n', '<', '|', '>']).unwrap_or(after.len());
        let ok = g1_end > 0 && after[g1_end..].starts_with('|') && {
            let a2 = &after[g1_end + 1..];
            let g2_end = a2.find(['|', '\n', '>']).unwrap_or(a2.len());
            g2_end > 0 && a2[g2_end..].starts_with('>')
        };
        if ok {
            let url = &after[..g1_end];
            let a2 = &after[g1_end + 1..];
            let g2_end = a2.find('>').unwrap();
            let _ = write!(out, "[{}]({url})", &a2[..g2_end]);
            rest = &a2[g2_end + 1..];
        } else {
            out.push('<');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

// ------------------------------------------------------------------------------------------
// Errors
// ------------------------------------------------------------------------------------------

/// Mattermost's `model.AppError`, serialised as the server does:
/// `{"id","message","detailed_error","request_id","status_code"}` in that order. `request_id`
/// and `status_code` are `omitempty`; `is_oauth` is `omitempty` too and therefore absent
/// (it is never true on these endpoints). `detailed_error` is wiped to `""` as a
/// non-developer-mode server does.
#[derive(Clone, Debug, PartialEq)]
pub struct AppError {
    pub id: String,
    pub message: String,
    pub detailed_error: String,
    pub request_id: String,
    pub status_code: u16,
    /// What the server would only log (kept for assertions; never sent).
    pub logged_detail: String,
}

impl AppError {
    pub fn new(id: &str, message: &str, status: u16) -> AppError {
        AppError {
            id: id.into(),
            message: message.into(),
            detailed_error: String::new(),
            request_id: String::new(),
            status_code: status,
            logged_detail: String::new(),
        }
    }

    fn detail(mut self, d: impl Into<String>) -> AppError {
        self.logged_detail = d.into();
        self
    }

    pub fn to_json(&self) -> String {
        let mut s = String::from("{\"id\":");
        go_json_string(&mut s, &self.id);
        s.push_str(",\"message\":");
        go_json_string(&mut s, &self.message);
        s.push_str(",\"detailed_error\":");
        go_json_string(&mut s, &self.detailed_error);
        if !self.request_id.is_empty() {
            s.push_str(",\"request_id\":");
            go_json_string(&mut s, &self.request_id);
        }
        if self.status_code != 0 {
            let _ = write!(s, ",\"status_code\":{}", self.status_code);
        }
        s.push('}');
        s
    }
}

impl std::fmt::Display for AppError {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.id, self.status_code, self.message)?;
        if !self.logged_detail.is_empty() {
            write!(f, " [{}]", self.logged_detail)?;
        }
        Ok(())
    }
}

/// The AppError a fault answers for a status (ids the real endpoint uses for that status).
fn app_error_for_status(status: u16) -> AppError {
    match status {
        400 => AppError::new("model.incoming_hook.parse_data.app_error", "Unable to parse incoming data.", 400),
        403 => AppError::new("web.incoming_webhook.permissions.app_error", "Inappropriate channel permissions.", 403),
        404 => AppError::new("web.incoming_webhook.channel.app_error", "Couldn't find the channel.", 404),
        500 => AppError::new("api.post.create_webhook_post.creating.app_error", "Error creating post.", 500),
        501 => AppError::new("web.incoming_webhook.disabled.app_error", "Incoming webhooks have been disabled by the system admin.", 501),
        s => AppError::new("fake.injected_fault.app_error", "Injected fault.", s),
    }
}

// ------------------------------------------------------------------------------------------
// Model
// ------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelType {
    Open,
    Private,
    Direct,
    Group,
}

impl ChannelType {
    /// `"O"`, `"P"`, `"D"`, `"G"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelType::Open => "O",
            ChannelType::Private => "P",
            ChannelType::Direct => "D",
            ChannelType::Group => "G",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Team {
    pub id: String,
    /// The URL slug (`team_domain` in outgoing payloads).
    pub name: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Channel {
    pub id: String,
    /// `""` for direct and group channels.
    pub team_id: String,
    pub name: String,
    pub kind: ChannelType,
}

#[derive(Clone, Debug, PartialEq)]
pub struct User {
    pub id: String,
    pub username: String,
    pub is_bot: bool,
    pub is_system_admin: bool,
}

/// A post as Mattermost stores it (the fields this fake models).
#[derive(Clone, Debug, PartialEq)]
pub struct Post {
    pub id: String,
    /// Milliseconds since the epoch.
    pub create_at: i64,
    pub user_id: String,
    pub channel_id: String,
    /// `""` for a root post.
    pub root_id: String,
    pub message: String,
    /// `type` (`""`, `slack_attachment`, `custom_…`).
    pub post_type: String,
    /// `from_webhook`, `override_username`, `override_icon_url`, `override_icon_emoji`,
    /// `webhook_display_name`, `attachments`, `from_bot`, plus the integration's own props.
    pub props: Map<String, Value>,
    /// `metadata.priority` when a webhook set one.
    pub priority: Option<Value>,
}

impl Post {
    pub fn prop(&self, key: &str) -> Option<&Value> {
        self.props.get(key)
    }

    pub fn prop_str(&self, key: &str) -> Option<&str> {
        self.props.get(key).and_then(Value::as_str)
    }

    /// `props.from_webhook == "true"`.
    pub fn from_webhook(&self) -> bool {
        self.prop_str("from_webhook") == Some("true")
    }

    /// The post as the REST API and `posted` events carry it (`model.Post` JSON).
    pub fn to_api_json(&self) -> Value {
        let mut metadata = Map::new();
        if let Some(p) = &self.priority {
            metadata.insert("priority".into(), p.clone());
        }
        serde_json::json!({
            "id": self.id, "create_at": self.create_at, "update_at": self.create_at,
            "edit_at": 0, "delete_at": 0, "is_pinned": false, "user_id": self.user_id,
            "channel_id": self.channel_id, "root_id": self.root_id, "original_id": "",
            "message": self.message, "type": self.post_type, "props": self.props,
            "hashtags": "", "pending_post_id": "", "reply_count": 0, "metadata": metadata,
        })
    }
}

/// An outgoing webhook to create (§1.2). `team` and `channel` are names.
#[derive(Clone, Debug, PartialEq)]
pub struct OutgoingHook {
    pub team: String,
    /// Channel name in `team`; `None` = any public channel of the team (trigger words required).
    pub channel: Option<String>,
    pub trigger_words: Vec<String>,
    /// 0 = first word matches a trigger word exactly; 1 = first word starts with one.
    pub trigger_when: i32,
    pub callback_urls: Vec<String>,
    /// Only the exact string `application/json` gives JSON; anything else gives a form.
    pub content_type: String,
    pub display_name: String,
    pub description: String,
    pub username: String,
    pub icon_url: String,
    /// Username of the creator (authors the response posts); `None` = [`ADMIN_USER`].
    pub creator: Option<String>,
}

impl Default for OutgoingHook {
    fn default() -> Self {
        OutgoingHook {
            team: DEFAULT_TEAM.into(),
            channel: None,
            trigger_words: Vec::new(),
            trigger_when: 0,
            callback_urls: Vec::new(),
            content_type: "application/json".into(),
            display_name: String::new(),
            description: String::new(),
            username: String::new(),
            icon_url: String::new(),
            creator: None,
        }
    }
}

#[derive(Clone, Debug)]
struct OutgoingHookRec {
    id: String,
    token: String,
    creator_id: String,
    team_id: String,
    channel_id: String,
    trigger_words: Vec<String>,
    trigger_when: i32,
    callback_urls: Vec<String>,
    content_type: String,
    display_name: String,
    username: String,
    icon_url: String,
}

impl OutgoingHookRec {
    fn exact(&self, word: &str) -> bool {
        !word.is_empty() && self.trigger_words.iter().any(|t| t == word)
    }
    fn starts(&self, word: &str) -> bool {
        !word.is_empty() && self.trigger_words.iter().any(|t| word.starts_with(t.as_str()))
    }
    fn trigger_word(&self, word: &str, exact: bool) -> String {
        if word.is_empty() {
            return String::new();
        }
        self.trigger_words
            .iter()
            .find(|t| if exact { t.as_str() == word } else { word.starts_with(t.as_str()) })
            .cloned()
            .unwrap_or_default()
    }
}

/// An incoming webhook to create (§2).
#[derive(Clone, Debug, PartialEq, Default)]
pub struct IncomingHook {
    /// Default channel, a name (or `team/name` when names repeat across teams).
    pub channel: String,
    /// `channel_locked`: posting elsewhere → 403.
    pub locked: bool,
    pub display_name: String,
    pub username: String,
    pub icon_url: String,
    /// Username of the creator (authors the posts); `None` = [`ADMIN_USER`].
    pub creator: Option<String>,
}

#[derive(Clone, Debug)]
struct IncomingHookRec {
    id: String,
    user_id: String,
    channel_id: String,
    team_id: String,
    display_name: String,
    username: String,
    icon_url: String,
    locked: bool,
}

/// Server settings the fake honours.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// `ServiceSettings.EnableIncomingWebhooks` (real default true). Off → 501.
    pub enable_incoming_webhooks: bool,
    /// `ServiceSettings.EnableOutgoingWebhooks` (real default true). Off → nothing fires.
    pub enable_outgoing_webhooks: bool,
    /// `ServiceSettings.EnablePostUsernameOverride`. **Default true here** for convenience;
    /// a real server defaults to false (then `username` is ignored and no
    /// `override_username` prop is set).
    pub enable_post_username_override: bool,
    /// `ServiceSettings.EnablePostIconOverride`. **Default true here**; real default false.
    pub enable_post_icon_override: bool,
    /// `ServiceSettings.OutgoingIntegrationRequestsTimeout` (default 30 s).
    pub outgoing_timeout: Duration,
    /// `a.MaxPostSize()` (default `PostMessageMaxRunesV2` = 16383).
    pub max_post_size: usize,
    /// How often the WebSocket server pings (`pingInterval`, 60 s on a real server).
    pub ws_ping_interval: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            enable_incoming_webhooks: true,
            enable_outgoing_webhooks: true,
            enable_post_username_override: true,
            enable_post_icon_override: true,
            outgoing_timeout: DEFAULT_OUTGOING_TIMEOUT,
            max_post_size: POST_MESSAGE_MAX_RUNES_V2,
            ws_ping_interval: Duration::from_secs(60),
        }
    }
}

/// Header list with lowercased names (order not significant: actix and reqwest keep maps).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Headers(pub Vec<(String, String)>);

impl Headers {
    /// The first value of `name` (case-insensitive).
    pub fn get(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.0.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str())
    }

    pub fn get_all(&self, name: &str) -> Vec<&str> {
        let name = name.to_ascii_lowercase();
        self.0.iter().filter(|(k, _)| *k == name).map(|(_, v)| v.as_str()).collect()
    }

    fn from_actix(h: &actix_web::http::header::HeaderMap) -> Headers {
        Headers(
            h.iter()
                .map(|(k, v)| (k.as_str().to_ascii_lowercase(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
                .collect(),
        )
    }

    fn from_reqwest(h: &reqwest::header::HeaderMap) -> Headers {
        Headers(
            h.iter()
                .map(|(k, v)| (k.as_str().to_ascii_lowercase(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
                .collect(),
        )
    }
}

// ------------------------------------------------------------------------------------------
// Outgoing payload
// ------------------------------------------------------------------------------------------

/// `model.OutgoingWebhookPayload` (§1.3).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutgoingPayload {
    pub token: String,
    pub team_id: String,
    pub team_domain: String,
    pub channel_id: String,
    pub channel_name: String,
    /// Milliseconds (`post.CreateAt`); the form variant sends seconds.
    pub timestamp: i64,
    pub user_id: String,
    pub user_name: String,
    pub post_id: String,
    pub text: String,
    pub trigger_word: String,
    /// Comma-joined file ids, `""` when none.
    pub file_ids: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// `Content-Type: application/json`, Go `json.Marshal` bytes.
    Json,
    /// `Content-Type: application/x-www-form-urlencoded`, Go `url.Values.Encode()`.
    Form,
}

impl Encoding {
    pub fn content_type(self) -> &'static str {
        match self {
            Encoding::Json => "application/json",
            Encoding::Form => "application/x-www-form-urlencoded",
        }
    }

    /// What `TriggerWebhook` picks for a hook's `content_type`.
    pub fn for_hook(content_type: &str) -> Encoding {
        if content_type == "application/json" {
            Encoding::Json
        } else {
            Encoding::Form
        }
    }
}

impl OutgoingPayload {
    /// Go `json.Marshal`: compact, struct field order, HTML-safe, timestamp in ms.
    pub fn to_json(&self) -> String {
        let mut s = String::from("{");
        let strs: [(&str, &str); 5] = [
            ("token", &self.token),
            ("team_id", &self.team_id),
            ("team_domain", &self.team_domain),
            ("channel_id", &self.channel_id),
            ("channel_name", &self.channel_name),
        ];
        for (k, v) in strs {
            let _ = write!(s, "\"{k}\":");
            go_json_string(&mut s, v);
            s.push(',');
        }
        let _ = write!(s, "\"timestamp\":{}", self.timestamp);
        let strs: [(&str, &str); 6] = [
            ("user_id", &self.user_id),
            ("user_name", &self.user_name),
            ("post_id", &self.post_id),
            ("text", &self.text),
            ("trigger_word", &self.trigger_word),
            ("file_ids", &self.file_ids),
        ];
        for (k, v) in strs {
            let _ = write!(s, ",\"{k}\":");
            go_json_string(&mut s, v);
        }
        s.push('}');
        s
    }

    /// `ToFormValues()`: `url.Values.Encode()` with the timestamp in **seconds**.
    pub fn to_form(&self) -> String {
        let ts = (self.timestamp / 1000).to_string();
        go_values_encode(&[
            ("token", &self.token),
            ("team_id", &self.team_id),
            ("team_domain", &self.team_domain),
            ("channel_id", &self.channel_id),
            ("channel_name", &self.channel_name),
            ("timestamp", &ts),
            ("user_id", &self.user_id),
            ("user_name", &self.user_name),
            ("post_id", &self.post_id),
            ("text", &self.text),
            ("trigger_word", &self.trigger_word),
            ("file_ids", &self.file_ids),
        ])
    }

    pub fn encode(&self, enc: Encoding) -> Vec<u8> {
        match enc {
            Encoding::Json => self.to_json().into_bytes(),
            Encoding::Form => self.to_form().into_bytes(),
        }
    }
}

// ------------------------------------------------------------------------------------------
// Outcomes, faults, records
// ------------------------------------------------------------------------------------------

/// What [`FakeMattermost::user_posts`] did.
#[derive(Clone, Debug)]
pub struct PostOutcome {
    pub post_id: String,
    pub post: Post,
    /// One per (fired hook × callback URL), hooks in creation order, URLs in hook order.
    pub callbacks: Vec<CallbackOutcome>,
}

impl PostOutcome {
    /// Ids of every post created from the callbacks' answers.
    pub fn reply_post_ids(&self) -> Vec<String> {
        self.callbacks.iter().filter_map(|c| c.posts.as_ref().ok()).flatten().cloned().collect()
    }
}

/// One POST to one callback URL and what came of it.
#[derive(Clone, Debug)]
pub struct CallbackOutcome {
    pub token: String,
    pub url: String,
    pub trigger_word: String,
    /// `application/json` or `application/x-www-form-urlencoded`.
    pub sent_content_type: String,
    pub sent_body: Vec<u8>,
    /// What patchbay answered; `None` when the request failed (timeout, refused, reset).
    pub status: Option<u16>,
    pub headers: Headers,
    /// The answer's body (after gzip decoding, as Go's transport would).
    pub body: Vec<u8>,
    /// Ids of the posts created from the answer (`[]` when it asked for none), or the
    /// error Mattermost would only have logged (transport, `api.unmarshal_error`, a failed
    /// post creation such as a comment on a reply).
    pub posts: Result<Vec<String>, String>,
}

impl CallbackOutcome {
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A scripted misbehaviour of the incoming-webhook endpoint, consumed one per request.
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// Answer this status with an AppError JSON body (429 answers as [`Fault::RateLimited`]
    /// with `retry_after: 1`). Nothing is posted.
    Status(u16),
    /// The rate limiter's answer (`app/ratelimit.go` + `http.Error`): 429,
    /// `Content-Type: text/plain; charset=utf-8`, `X-Content-Type-Options: nosniff`,
    /// `X-Ratelimit-Limit: 101`, `X-Ratelimit-Remaining: 0`, `X-Ratelimit-Reset: 10`,
    /// `Retry-After: <retry_after>`, body `limit exceeded\n`. Nothing is posted.
    RateLimited { retry_after: u64 },
    /// Any answer. Nothing is posted.
    Raw { status: u16, headers: Vec<(String, String)>, body: Vec<u8> },
    /// Wait, then handle the request normally — the post is created even if the client
    /// has given up meanwhile (as a slow real server would).
    Delay(Duration),
    /// Close the connection without answering; nothing is posted.
    Drop,
    /// Handle the request (posts are created), then close the connection without answering.
    DropAfterPosting,
}

/// One request to `/hooks/{id}` as the fake saw it.
#[derive(Clone, Debug)]
pub struct IncomingRequest {
    pub at: Instant,
    pub hook_id: String,
    pub method: String,
    /// Path and query as sent.
    pub uri: String,
    pub headers: Headers,
    pub body: Vec<u8>,
    pub fault: Option<Fault>,
    /// What was answered; `None` while in flight or when the connection was dropped.
    pub status: Option<u16>,
    pub response_headers: Headers,
    pub response_body: Vec<u8>,
    /// The error, when the request was refused by the (non-fault) logic.
    pub error: Option<AppError>,
    /// Ids of posts created by this request.
    pub posts: Vec<String>,
}

impl IncomingRequest {
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn response_text(&self) -> String {
        String::from_utf8_lossy(&self.response_body).into_owned()
    }
}

// ------------------------------------------------------------------------------------------
// State
// ------------------------------------------------------------------------------------------

struct State {
    settings: Settings,
    teams: Vec<Team>,
    channels: Vec<Channel>,
    users: Vec<User>,
    members: HashSet<(String, String)>,
    posts: Vec<Post>,
    outgoing: Vec<OutgoingHookRec>,
    incoming: Vec<IncomingHookRec>,
    faults: VecDeque<Fault>,
    requests: Vec<IncomingRequest>,
    /// Personal access tokens: token → user id.
    tokens: HashMap<String, String>,
    /// Every `/api/v4` REST request, in arrival order.
    rest: Vec<RestRequest>,
    /// Faults for the next `/api/v4` REST requests (not the WebSocket), consumed in order.
    rest_faults: VecDeque<u16>,
    /// `POST /api/v4/users/{id}/typing` and `user_typing` actions: (user id, channel id, parent id).
    typing: Vec<(String, String, String)>,
    /// `PUT /api/v4/posts/{id}/patch` that changed a message: (post id, new message).
    edits: Vec<(String, String)>,
    /// `DELETE /api/v4/posts/{id}`: the ids, in order.
    deleted: Vec<String>,
}

/// A planned firing of one hook (`handleWebhookEvents`).
struct Firing {
    hook: OutgoingHookRec,
    payload: OutgoingPayload,
}

fn rune_count(s: &str) -> usize {
    s.chars().count()
}

impl State {
    fn team_by_name(&self, name: &str) -> Option<&Team> {
        self.teams.iter().find(|t| t.name == name)
    }

    fn user_by_name(&self, name: &str) -> Option<&User> {
        self.users.iter().find(|u| u.username == name)
    }

    fn user(&self, id: &str) -> Option<&User> {
        self.users.iter().find(|u| u.id == id)
    }

    fn channel(&self, id: &str) -> Option<&Channel> {
        self.channels.iter().find(|c| c.id == id)
    }

    fn channel_in_team(&self, team_id: &str, name: &str) -> Option<&Channel> {
        self.channels.iter().find(|c| c.team_id == team_id && c.name == name)
    }

    /// `name` or `team/name`; panics when unknown or ambiguous (test setup error).
    fn channel_ref(&self, r: &str) -> &Channel {
        if let Some((team, name)) = r.split_once('/') {
            let t = self.team_by_name(team).unwrap_or_else(|| panic!("fake mattermost: no team {team:?}"));
            return self
                .channel_in_team(&t.id, name)
                .unwrap_or_else(|| panic!("fake mattermost: no channel {name:?} in team {team:?}"));
        }
        let found: Vec<&Channel> = self.channels.iter().filter(|c| c.name == r).collect();
        match found.len() {
            1 => found[0],
            0 => panic!("fake mattermost: no channel {r:?}"),
            _ => panic!("fake mattermost: channel name {r:?} is in several teams; say team/{r}"),
        }
    }

    fn user_ref(&self, name: &str) -> &User {
        self.user_by_name(name).unwrap_or_else(|| panic!("fake mattermost: no user {name:?}"))
    }

    /// `CreatePost`'s checks, then save (the one place posts are created).
    fn save_post(&mut self, mut post: Post) -> Result<Post, AppError> {
        if !post.root_id.is_empty() {
            let root_err = || {
                AppError::new("api.post.create_post.root_id.app_error", "Invalid RootId parameter.", 400)
                    .detail(format!("root_id={}", post.root_id))
            };
            match self.posts.iter().find(|p| p.id == post.root_id) {
                None => return Err(root_err()),
                Some(root) if !root.root_id.is_empty() => return Err(root_err()),
                Some(root) if root.channel_id != post.channel_id => {
                    return Err(AppError::new(
                        "api.post.create_post.channel_root_id.app_error",
                        "Invalid ChannelId for RootId parameter.",
                        400,
                    ))
                }
                Some(_) => {}
            }
        }
        if rune_count(&post.message) > self.settings.max_post_size {
            return Err(AppError::new("model.post.is_valid.message_length.app_error", "Message property is longer than the maximum permitted length.", 400));
        }
        if self.user(&post.user_id).is_some_and(|u| u.is_bot) {
            post.props.insert("from_bot".into(), "true".into());
        }
        post.id = new_id();
        // Strictly increasing, so `after=` paging never loses a post created in the same
        // millisecond as its anchor (a real server can; see the module doc).
        post.create_at = now_millis().max(self.posts.last().map_or(0, |p| p.create_at + 1));
        self.posts.push(post.clone());
        Ok(post)
    }

    fn get_or_create_dm(&mut self, a: &str, b: &str) -> Channel {
        let name = if a > b { format!("{b}__{a}") } else { format!("{a}__{b}") };
        if let Some(c) = self.channels.iter().find(|c| c.kind == ChannelType::Direct && c.name == name) {
            return c.clone();
        }
        let c = Channel { id: new_id(), team_id: String::new(), name, kind: ChannelType::Direct };
        self.members.insert((c.id.clone(), a.to_owned()));
        self.members.insert((c.id.clone(), b.to_owned()));
        self.channels.push(c.clone());
        c
    }

    fn has_read_permission(&self, user_id: &str, channel: &Channel) -> bool {
        self.user(user_id).is_some_and(|u| u.is_system_admin)
            || self.members.contains(&(channel.id.clone(), user_id.to_owned()))
    }

    /// `ProcessSlackText`: `<!channel>`/`<!here>`/`<!all>` and `<@userid>` of known users.
    fn process_slack_text(&self, text: &str) -> String {
        let mut t = text.replace("<!channel>", "@channel").replace("<!here>", "@here").replace("<!all>", "@all");
        for u in &self.users {
            let tag = format!("<@{}>", u.id);
            if t.contains(&tag) {
                t = t.replace(&tag, &format!("@{}", u.username));
            }
        }
        t
    }

    /// `ProcessSlackAttachments`: nil attachments dropped, Slack text expanded in
    /// pretext/text/title and field values.
    fn process_slack_attachments(&self, attachments: Option<Vec<Value>>) -> Vec<Value> {
        let mut out = Vec::new();
        for mut a in attachments.unwrap_or_default().into_iter().filter(|a| a.is_object()) {
            let m = a.as_object_mut().unwrap();
            for k in ["pretext", "text", "title"] {
                if let Some(Value::String(s)) = m.get(k) {
                    let s = self.process_slack_text(s);
                    m.insert(k.into(), Value::String(s));
                }
            }
            if let Some(Value::Array(fields)) = m.get_mut("fields") {
                for f in fields.iter_mut().filter_map(Value::as_object_mut) {
                    let v = match f.get("value") {
                        Some(Value::String(s)) => Some(s.clone()),
                        Some(Value::Null) | None => None,
                        Some(other) => Some(other.to_string()),
                    };
                    if let Some(v) = v {
                        f.insert("value".into(), Value::String(self.process_slack_text(&v)));
                    }
                }
            }
            out.push(a);
        }
        out
    }

    /// `CreateWebhookPost` + `SplitWebhookPost` + `CreatePost(…, CreatePostFlags{})`:
    /// webhook posts never fire outgoing webhooks. Answers every created post.
    #[allow(clippy::too_many_arguments)]
    fn create_webhook_post(
        &mut self,
        user_id: &str,
        channel: &Channel,
        text: &str,
        override_username: &str,
        override_icon_url: &str,
        override_icon_emoji: &str,
        props: Map<String, Value>,
        attachments: Vec<Value>,
        post_type: &str,
        root_id: &str,
        priority: Option<Value>,
    ) -> Result<Vec<Post>, AppError> {
        let text = slack_links_to_markdown(text);
        let mut post = Post {
            id: String::new(),
            create_at: 0,
            user_id: user_id.into(),
            channel_id: channel.id.clone(),
            root_id: root_id.into(),
            message: text,
            post_type: post_type.into(),
            props: Map::new(),
            priority: None,
        };
        post.props.insert("from_webhook".into(), "true".into());
        if let Some(p) = priority {
            if priority_level(&p).is_none() {
                return Err(AppError::new("api.context.invalid_param.app_error", "Invalid webhook.priority.priority parameter.", 400)
                    .detail("Setting the priority of a post is required to use priority."));
            }
            post.priority = Some(p);
        }
        if post.post_type.starts_with("system_") {
            return Err(AppError::new("api.context.invalid_param.app_error", "Invalid post.type parameter.", 400));
        }
        if self.settings.enable_post_username_override {
            let name = if override_username.is_empty() { "webhook" } else { override_username };
            post.props.insert("override_username".into(), name.into());
        }
        if self.settings.enable_post_icon_override {
            if !override_icon_url.is_empty() {
                post.props.insert("override_icon_url".into(), override_icon_url.into());
            }
            if !override_icon_emoji.is_empty() {
                post.props.insert("override_icon_emoji".into(), override_icon_emoji.into());
            }
        }
        for (k, v) in props {
            if !matches!(k.as_str(), "attachments" | "override_icon_url" | "override_username" | "from_webhook") {
                post.props.insert(k, v);
            }
        }
        if !attachments.is_empty() {
            // ParseSlackAttachment
            if post.post_type.is_empty() {
                post.post_type = "slack_attachment".into();
            }
            let atts: Vec<Value> = attachments
                .into_iter()
                .map(|mut a| {
                    if let Some(m) = a.as_object_mut() {
                        for k in ["text", "pretext"] {
                            if let Some(Value::String(s)) = m.get(k) {
                                let s = slack_links_to_markdown(s);
                                m.insert(k.into(), Value::String(s));
                            }
                        }
                        if let Some(Value::Array(fields)) = m.get_mut("fields") {
                            for f in fields.iter_mut().filter_map(Value::as_object_mut) {
                                if let Some(Value::String(s)) = f.get("value") {
                                    let s = slack_links_to_markdown(s);
                                    f.insert("value".into(), Value::String(s));
                                }
                            }
                        }
                    }
                    a
                })
                .collect();
            post.props.insert("attachments".into(), Value::Array(atts));
        }
        let splits = split_webhook_post(&post, self.settings.max_post_size)?;
        let mut created = Vec::new();
        for split in splits {
            match self.save_post(split) {
                Ok(p) => created.push(p),
                Err(e) => {
                    return Err(AppError::new("api.post.create_webhook_post.creating.app_error", "Error creating post.", 500)
                        .detail(format!("err={} ({}); posts already created: {}", e.message, e.id, created.len())))
                }
            }
        }
        Ok(created)
    }

    /// `HandleIncomingWebhook`.
    fn handle_incoming_webhook(&mut self, hook_id: &str, req: IncomingPayload) -> Result<Vec<Post>, AppError> {
        if !self.settings.enable_incoming_webhooks {
            return Err(AppError::new("web.incoming_webhook.disabled.app_error", "Incoming webhooks have been disabled by the system admin.", 501));
        }
        if req.text.is_empty() && req.attachments.is_none() {
            return Err(AppError::new("web.incoming_webhook.text.app_error", "No text specified.", 400));
        }
        let hook = self
            .incoming
            .iter()
            .find(|h| h.id == hook_id)
            .cloned()
            .ok_or_else(|| AppError::new("web.incoming_webhook.invalid.app_error", "Invalid webhook.", 400))?;
        let mut props = req.props.unwrap_or_default();
        props.insert("webhook_display_name".into(), hook.display_name.clone().into());
        let text = self.process_slack_text(&req.text);
        let attachments = self.process_slack_attachments(req.attachments);
        let mut post_type = req.post_type.clone();
        if !attachments.is_empty() {
            post_type = "slack_attachment".into();
        }
        let channel = if let Some(uname) = req.channel.strip_prefix('@') {
            let uid = self
                .user_by_name(uname)
                .map(|u| u.id.clone())
                .ok_or_else(|| AppError::new("web.incoming_webhook.user.app_error", "Couldn't find the user.", 400))?;
            self.get_or_create_dm(&hook.user_id, &uid)
        } else if !req.channel.is_empty() {
            let name = req.channel.strip_prefix('#').unwrap_or(&req.channel);
            self.channel_in_team(&hook.team_id, name)
                .cloned()
                .ok_or_else(|| AppError::new("web.incoming_webhook.channel.app_error", "Couldn't find the channel.", 404))?
        } else {
            self.channel(&hook.channel_id)
                .cloned()
                .ok_or_else(|| AppError::new("app.channel.get.existing.app_error", "Unable to find the existing channel.", 404))?
        };
        if hook.locked && hook.channel_id != channel.id {
            return Err(AppError::new(
                "web.incoming_webhook.channel_locked.app_error",
                "This webhook is not permitted to post to the requested channel.",
                403,
            ));
        }
        if self.user(&hook.user_id).is_none() {
            return Err(AppError::new("web.incoming_webhook.user.app_error", "Couldn't find the user.", 403));
        }
        if channel.kind != ChannelType::Open && !self.has_read_permission(&hook.user_id, &channel) {
            return Err(AppError::new("web.incoming_webhook.permissions.app_error", "Inappropriate channel permissions.", 403));
        }
        let username = if req.username.is_empty() { hook.username.clone() } else { req.username.clone() };
        let icon = if req.icon_url.is_empty() { hook.icon_url.clone() } else { req.icon_url.clone() };
        self.create_webhook_post(
            &hook.user_id,
            &channel,
            &text,
            &username,
            &icon,
            &req.icon_emoji,
            props,
            attachments,
            &post_type,
            "",
            req.priority,
        )
    }

    /// `web/webhook.go` `incomingWebhook`: content-type dispatch, then the app logic.
    fn incoming_webhook(&mut self, hook_id: &str, query: &str, content_type: Option<&str>, body: &[u8]) -> Result<Vec<Post>, AppError> {
        let content_type = content_type.unwrap_or("");
        let (mut media_type, mut params) = (String::new(), HashMap::new());
        if !content_type.is_empty() {
            let (mt, p, err) = parse_media_type(content_type);
            if let Some(MediaErr::Other(e)) = err {
                return Err(AppError::new(
                    "api.webhook.incoming.error",
                    "Could not decode the multipart payload of incoming webhook.",
                    400,
                )
                .detail(format!("webhook_id={hook_id}, error: {e}")));
            }
            media_type = mt;
            params = p;
        }
        let payload = if media_type == "application/x-www-form-urlencoded" {
            // r.FormValue("payload"): body values first, then the URL query's.
            let mut values = if body.len() <= GO_MAX_FORM_SIZE { go_parse_query(body) } else { Vec::new() };
            values.extend(go_parse_query(query.as_bytes()));
            let payload = values.into_iter().find(|(k, _)| k == b"payload").map(|(_, v)| v).unwrap_or_default();
            decode_incoming_json(&payload)?
        } else if media_type == "multipart/form-data" {
            let fields = params.get("boundary").and_then(|b| parse_multipart(body, b)).unwrap_or_default();
            decode_multipart_fields(fields).map_err(|e| {
                AppError::new("api.webhook.incoming.error", "Could not decode the multipart payload of incoming webhook.", 400)
                    .detail(format!("webhook_id={hook_id}, error: {e}"))
            })?
        } else {
            decode_incoming_json(body)?
        };
        self.handle_incoming_webhook(hook_id, payload)
    }

    /// `handleWebhookEvents`: which hooks fire for `post`, with their payloads.
    fn plan_firings(&self, post: &Post) -> Vec<Firing> {
        if !self.settings.enable_outgoing_webhooks {
            return Vec::new();
        }
        let Some(channel) = self.channel(&post.channel_id) else { return Vec::new() };
        if channel.kind != ChannelType::Open {
            return Vec::new();
        }
        let Some(team) = self.teams.iter().find(|t| t.id == channel.team_id) else { return Vec::new() };
        let first_word = post.message.split_whitespace().next().unwrap_or("");
        let mut trigger_word = String::new(); // one variable for the whole loop (§1.1 quirk)
        let mut relevant = Vec::new();
        for hook in self.outgoing.iter().filter(|h| h.team_id == team.id) {
            if hook.channel_id == post.channel_id || hook.channel_id.is_empty() {
                if hook.channel_id == post.channel_id && hook.trigger_words.is_empty() {
                    relevant.push(hook.clone());
                    trigger_word = String::new();
                } else if hook.trigger_when == 0 && hook.exact(first_word) {
                    relevant.push(hook.clone());
                    trigger_word = hook.trigger_word(first_word, true);
                } else if hook.trigger_when == 1 && hook.starts(first_word) {
                    relevant.push(hook.clone());
                    trigger_word = hook.trigger_word(first_word, false);
                }
            }
        }
        let user_name = self.user(&post.user_id).map(|u| u.username.clone()).unwrap_or_default();
        relevant
            .into_iter()
            .map(|hook| Firing {
                payload: OutgoingPayload {
                    token: hook.token.clone(),
                    team_id: hook.team_id.clone(),
                    team_domain: team.name.clone(),
                    channel_id: post.channel_id.clone(),
                    channel_name: channel.name.clone(),
                    timestamp: post.create_at,
                    user_id: post.user_id.clone(),
                    user_name: user_name.clone(),
                    post_id: post.id.clone(),
                    text: post.message.clone(),
                    trigger_word: trigger_word.clone(),
                    file_ids: String::new(),
                },
                hook,
            })
            .collect()
    }

    /// The part of `TriggerWebhook` after the answer is decoded.
    fn handle_callback_response(&mut self, hook: &OutgoingHookRec, trigger: &Post, resp: Option<OutgoingResponse>) -> Result<Vec<Post>, AppError> {
        let Some(mut resp) = resp else { return Ok(Vec::new()) };
        if resp.text.is_none() && resp.attachments.as_ref().is_none_or(|a| a.is_empty()) {
            return Ok(Vec::new());
        }
        let root = if resp.response_type == "comment" { trigger.id.clone() } else { String::new() };
        let mut props = resp.props.take().unwrap_or_default();
        props.insert("webhook_display_name".into(), hook.display_name.clone().into());
        let text = resp.text.as_deref().map(|t| self.process_slack_text(t)).unwrap_or_default();
        let attachments = self.process_slack_attachments(resp.attachments.take());
        if self.settings.enable_post_username_override && !hook.username.is_empty() && resp.username.is_empty() {
            resp.username = hook.username.clone();
        }
        if self.settings.enable_post_icon_override && !hook.icon_url.is_empty() && resp.icon_url.is_empty() {
            resp.icon_url = hook.icon_url.clone();
        }
        let channel = self.channel(&trigger.channel_id).cloned().expect("channel of the triggering post");
        self.create_webhook_post(
            &hook.creator_id,
            &channel,
            &text,
            &resp.username,
            &resp.icon_url,
            "",
            props,
            attachments,
            &resp.post_type,
            &root,
            resp.priority,
        )
    }
}

/// gorilla/schema's default decoder into `IncomingWebhookRequest` from multipart fields:
/// Go field names matched case-insensitively (`text`, `username`, `iconurl`, `channelname`,
/// `type`, `iconemoji`; no json tags), the last value wins, and any other key (including
/// `channel` and `icon_url`) is an unknown-key error.
fn decode_multipart_fields(fields: Vec<(String, String)>) -> Result<IncomingPayload, String> {
    let mut r = IncomingPayload::default();
    for (k, v) in fields {
        match k.to_ascii_lowercase().as_str() {
            "text" => r.text = v,
            "username" => r.username = v,
            "iconurl" => r.icon_url = v,
            "channelname" => r.channel = v,
            "type" => r.post_type = v,
            "iconemoji" => r.icon_emoji = v,
            _ => return Err(format!("schema: invalid path \"{k}\"")),
        }
    }
    Ok(r)
}

/// `SplitWebhookPost`: the message cut into `max` runes per post (on rune boundaries), props
/// (less attachments) copied to every split, attachments appended while the props stay under
/// `PostPropsMaxUserRunes`, overflowing into new posts or truncating a lone attachment's text.
pub fn split_webhook_post(post: &Post, max: usize) -> Result<Vec<Post>, AppError> {
    let too_long = || {
        AppError::new(
            "web.incoming_webhook.split_props_length.app_error",
            &format!("Unable to split webhook props into {POST_PROPS_MAX_USER_RUNES} character parts."),
            400,
        )
    };
    let mut base = post.clone();
    base.message = String::new();
    base.props.remove("attachments");
    if rune_count(&go_json_value(&Value::Object(base.props.clone()))) > POST_PROPS_MAX_USER_RUNES {
        return Err(too_long());
    }
    let mut splits = Vec::new();
    let mut remaining = post.message.as_str();
    while rune_count(remaining) > max {
        let idx = remaining.char_indices().nth(max).map(|(i, _)| i).unwrap();
        let mut s = base.clone();
        s.message = remaining[..idx].to_owned();
        splits.push(s);
        remaining = &remaining[idx..];
    }
    let mut last = base.clone();
    last.message = remaining.to_owned();
    splits.push(last);

    let attachments = post.props.get("attachments").and_then(Value::as_array).cloned().unwrap_or_default();
    for attachment in attachments {
        let mut new_att = attachment.clone();
        loop {
            let last = splits.last_mut().unwrap();
            let mut new_props = last.props.clone();
            let orig = new_props.get("attachments").and_then(Value::as_array).cloned().unwrap_or_default();
            let mut list = orig.clone();
            list.push(new_att.clone());
            new_props.insert("attachments".into(), Value::Array(list.clone()));
            let runes = rune_count(&go_json_value(&Value::Object(new_props.clone())));
            if runes <= POST_PROPS_MAX_USER_RUNES {
                last.props = new_props;
                break;
            }
            if !orig.is_empty() {
                splits.push(base.clone());
                continue;
            }
            let truncation = runes - POST_PROPS_MAX_USER_RUNES;
            let text = attachment.get("text").and_then(Value::as_str).unwrap_or("");
            let text_runes = rune_count(text);
            if text_runes < truncation {
                return Err(too_long());
            }
            let keep: String = text.chars().take(text_runes - truncation).collect();
            new_att["text"] = Value::String(keep);
            list.pop();
            list.push(new_att.clone());
            new_props.insert("attachments".into(), Value::Array(list));
            last.props = new_props;
            break;
        }
    }
    Ok(splits)
}

// ------------------------------------------------------------------------------------------
// The server
// ------------------------------------------------------------------------------------------

struct Shared {
    state: Mutex<State>,
    posted: tokio::sync::broadcast::Sender<Post>,
    /// WebSocket sessions. Lock order: `state` before `ws`, never the other way.
    ws: Mutex<WsHub>,
}

impl Shared {
    fn announce(&self, posts: &[Post]) {
        for p in posts {
            let _ = self.posted.send(p.clone());
            self.ws_posted(p);
        }
    }
}

/// The raw fd of a connection, to drop it without answering.
#[derive(Clone, Copy)]
struct ConnFd(i32);

/// Every HTTP route of the fake. Add `/api/v4/...` and `/api/v4/websocket` here.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/hooks/{id}").route(web::post().to(incoming_webhook)).route(web::route().to(method_not_allowed)));
    cfg.service(web::resource(["/api/v4/websocket", "/api/v4/websocket/"]).route(web::get().to(websocket)));
    cfg.service(web::resource("/api/v4/users/{user_id}").route(web::get().to(rest_get_user)));
    cfg.service(web::resource("/api/v4/users/{user_id}/teams").route(web::get().to(rest_user_teams)));
    cfg.service(web::resource("/api/v4/users/{user_id}/channels").route(web::get().to(rest_user_channels)));
    cfg.service(web::resource("/api/v4/users/{user_id}/typing").route(web::post().to(rest_typing)));
    cfg.service(web::resource("/api/v4/channels/{channel_id}/posts").route(web::get().to(rest_channel_posts)));
    cfg.service(web::resource("/api/v4/posts").route(web::post().to(rest_create_post)));
    cfg.service(web::resource("/api/v4/posts/{post_id}/patch").route(web::put().to(rest_patch_post)));
    cfg.service(web::resource("/api/v4/posts/{post_id}").route(web::delete().to(rest_delete_post)));
}

async fn method_not_allowed() -> HttpResponse {
    HttpResponse::MethodNotAllowed().finish()
}

struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn ok(request_id: &str) -> Answer {
        Answer {
            status: 200,
            headers: vec![
                ("Content-Type".into(), "text/plain".into()),
                ("X-Request-Id".into(), request_id.into()),
                ("X-Version-Id".into(), VERSION_ID.into()),
            ],
            body: b"ok".to_vec(),
        }
    }

    fn error(mut e: AppError, request_id: &str) -> Answer {
        e.request_id = request_id.into();
        Answer {
            status: e.status_code,
            headers: vec![
                ("Content-Type".into(), "application/json".into()),
                ("X-Request-Id".into(), request_id.into()),
                ("X-Version-Id".into(), VERSION_ID.into()),
            ],
            body: e.to_json().into_bytes(),
        }
    }

    fn rate_limited(retry_after: u64) -> Answer {
        Answer {
            status: 429,
            headers: vec![
                ("Content-Type".into(), "text/plain; charset=utf-8".into()),
                ("X-Content-Type-Options".into(), "nosniff".into()),
                ("X-Ratelimit-Limit".into(), "101".into()),
                ("X-Ratelimit-Remaining".into(), "0".into()),
                ("X-Ratelimit-Reset".into(), "10".into()),
                ("Retry-After".into(), retry_after.to_string()),
            ],
            body: b"limit exceeded\n".to_vec(),
        }
    }

    fn into_response(self) -> HttpResponse {
        let mut b = HttpResponse::build(actix_web::http::StatusCode::from_u16(self.status).expect("status"));
        for (k, v) in &self.headers {
            b.append_header((k.as_str(), v.as_str()));
        }
        b.body(self.body)
    }

    fn headers(&self) -> Headers {
        Headers(self.headers.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.clone())).collect())
    }
}

struct Processed {
    answer: Answer,
    error: Option<AppError>,
    posts: Vec<String>,
}

fn process_incoming(shared: &Shared, hook_id: &str, query: &str, content_type: Option<&str>, body: &[u8]) -> Processed {
    let request_id = new_id();
    let result = shared.state.lock().unwrap().incoming_webhook(hook_id, query, content_type, body);
    match result {
        Ok(posts) => {
            shared.announce(&posts);
            Processed { answer: Answer::ok(&request_id), error: None, posts: posts.into_iter().map(|p| p.id).collect() }
        }
        Err(e) => Processed { answer: Answer::error(e.clone(), &request_id), error: Some(e), posts: Vec::new() },
    }
}

fn drop_connection(req: &HttpRequest) {
    if let Some(ConnFd(fd)) = req.conn_data::<ConnFd>() {
        // SAFETY: shutting a socket down does not close the fd, which actix still owns.
        unsafe {
            libc::shutdown(*fd, libc::SHUT_RDWR);
        }
    }
}

async fn incoming_webhook(req: HttpRequest, body: web::Bytes, shared: web::Data<Arc<Shared>>) -> HttpResponse {
    let hook_id = req.match_info().get("id").unwrap_or("").to_owned();
    if hook_id.is_empty() || !hook_id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return HttpResponse::NotFound().finish();
    }
    let headers = Headers::from_actix(req.headers());
    let content_type = req
        .headers()
        .get(actix_web::http::header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let query = req.query_string().to_owned();
    let (index, fault) = {
        let mut st = shared.state.lock().unwrap();
        let fault = st.faults.pop_front();
        st.requests.push(IncomingRequest {
            at: Instant::now(),
            hook_id: hook_id.clone(),
            method: req.method().to_string(),
            uri: req.uri().to_string(),
            headers,
            body: body.to_vec(),
            fault: fault.clone(),
            status: None,
            response_headers: Headers::default(),
            response_body: Vec::new(),
            error: None,
            posts: Vec::new(),
        });
        (st.requests.len() - 1, fault)
    };
    let record = |p: &Processed, answered: bool| {
        let mut st = shared.state.lock().unwrap();
        let r = &mut st.requests[index];
        if answered {
            r.status = Some(p.answer.status);
            r.response_headers = p.answer.headers();
            r.response_body = p.answer.body.clone();
        }
        r.error = p.error.clone();
        r.posts = p.posts.clone();
    };
    let canned = |answer: Answer| Processed { answer, error: None, posts: Vec::new() };
    let processed = match fault {
        None => process_incoming(&shared, &hook_id, &query, content_type.as_deref(), &body),
        Some(Fault::Delay(d)) => {
            // In a task of its own, so a client giving up does not cancel the work.
            let sh = shared.clone().into_inner();
            let task = actix_web::rt::spawn(async move {
                tokio::time::sleep(d).await;
                process_incoming(&sh, &hook_id, &query, content_type.as_deref(), &body)
            });
            task.await.expect("delayed incoming webhook")
        }
        Some(Fault::Drop) => {
            drop_connection(&req);
            return HttpResponse::Ok().finish();
        }
        Some(Fault::DropAfterPosting) => {
            let p = process_incoming(&shared, &hook_id, &query, content_type.as_deref(), &body);
            record(&p, false);
            drop_connection(&req);
            return HttpResponse::Ok().finish();
        }
        Some(Fault::RateLimited { retry_after }) => canned(Answer::rate_limited(retry_after)),
        Some(Fault::Status(429)) => canned(Answer::rate_limited(1)),
        Some(Fault::Status(s)) => canned(Answer::error(app_error_for_status(s), &new_id())),
        Some(Fault::Raw { status, headers, body }) => canned(Answer { status, headers, body }),
    };
    record(&processed, true);
    processed.answer.into_response()
}

/// A fake Mattermost server. Cheap to clone (shared state); start one per test.
#[derive(Clone)]
pub struct FakeMattermost {
    shared: Arc<Shared>,
    url: String,
    handle: ServerHandle,
    client: reqwest::Client,
}

impl FakeMattermost {
    /// Starts on 127.0.0.1:0 with [`Settings::default`], team [`DEFAULT_TEAM`] holding the
    /// open channels `town-square` and `off-topic`, and the system admin [`ADMIN_USER`].
    pub async fn start() -> FakeMattermost {
        Self::start_with(Settings::default()).await
    }

    pub async fn start_with(settings: Settings) -> FakeMattermost {
        let (posted, _) = tokio::sync::broadcast::channel(1024);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                settings,
                teams: Vec::new(),
                channels: Vec::new(),
                users: Vec::new(),
                members: HashSet::new(),
                posts: Vec::new(),
                outgoing: Vec::new(),
                incoming: Vec::new(),
                faults: VecDeque::new(),
                requests: Vec::new(),
                tokens: HashMap::new(),
                rest: Vec::new(),
                rest_faults: VecDeque::new(),
                typing: Vec::new(),
                edits: Vec::new(),
                deleted: Vec::new(),
            }),
            posted,
            ws: Mutex::new(WsHub { allow_resume: true, ..Default::default() }),
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind fake mattermost");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let data = web::Data::new(shared.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .app_data(web::PayloadConfig::new(64 << 20))
                .configure(routes)
        })
        .workers(1)
        .disable_signals()
        .on_connect(|conn: &dyn Any, ext: &mut Extensions| {
            use std::os::fd::AsRawFd;
            if let Some(sock) = conn.downcast_ref::<actix_web::rt::net::TcpStream>() {
                ext.insert(ConnFd(sock.as_raw_fd()));
            }
        })
        .listen(listener)
        .expect("listen")
        .run();
        let handle = server.handle();
        tokio::spawn(server);
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .no_proxy()
            .build()
            .expect("http client");
        let fake = FakeMattermost { shared, url, handle, client };
        fake.add_team(DEFAULT_TEAM);
        fake.add_channel(DEFAULT_TEAM, "town-square", ChannelType::Open);
        fake.add_channel(DEFAULT_TEAM, "off-topic", ChannelType::Open);
        {
            let mut st = fake.state();
            st.users.push(User { id: new_id(), username: ADMIN_USER.into(), is_bot: false, is_system_admin: true });
        }
        fake
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap()
    }

    /// `http://127.0.0.1:PORT` (the SiteURL).
    pub fn url(&self) -> String {
        self.url.clone()
    }

    pub fn settings(&self) -> Settings {
        self.state().settings.clone()
    }

    pub fn update_settings(&self, f: impl FnOnce(&mut Settings)) {
        f(&mut self.state().settings)
    }

    // ---- world ----

    /// Adds a team; answers its id.
    pub fn add_team(&self, name: &str) -> String {
        let mut st = self.state();
        assert!(st.team_by_name(name).is_none(), "team {name:?} exists");
        let id = new_id();
        st.teams.push(Team { id: id.clone(), name: name.into() });
        id
    }

    /// Adds a channel to `team` (a name); answers its id.
    pub fn add_channel(&self, team: &str, name: &str, kind: ChannelType) -> String {
        let mut st = self.state();
        let team_id = st.team_by_name(team).unwrap_or_else(|| panic!("no team {team:?}")).id.clone();
        assert!(st.channel_in_team(&team_id, name).is_none(), "channel {name:?} exists in {team:?}");
        let id = new_id();
        st.channels.push(Channel { id: id.clone(), team_id, name: name.into(), kind });
        id
    }

    /// Adds a (non-admin) user; answers its id.
    pub fn add_user(&self, username: &str) -> String {
        self.add_user_with(username, false, false)
    }

    pub fn add_bot(&self, username: &str) -> String {
        self.add_user_with(username, true, false)
    }

    pub fn add_user_with(&self, username: &str, is_bot: bool, is_system_admin: bool) -> String {
        let mut st = self.state();
        assert!(st.user_by_name(username).is_none(), "user {username:?} exists");
        let id = new_id();
        st.users.push(User { id: id.clone(), username: username.into(), is_bot, is_system_admin });
        id
    }

    /// Makes `user` a member of `channel` (matters for private channels).
    pub fn join(&self, user: &str, channel: &str) {
        let mut st = self.state();
        let uid = st.user_ref(user).id.clone();
        let cid = st.channel_ref(channel).id.clone();
        st.members.insert((cid, uid));
    }

    pub fn team(&self, name: &str) -> Team {
        self.state().team_by_name(name).cloned().unwrap_or_else(|| panic!("no team {name:?}"))
    }

    /// `name` or `team/name`.
    pub fn channel(&self, name: &str) -> Channel {
        self.state().channel_ref(name).clone()
    }

    pub fn channel_by_id(&self, id: &str) -> Option<Channel> {
        self.state().channel(id).cloned()
    }

    pub fn user(&self, username: &str) -> User {
        self.state().user_ref(username).clone()
    }

    pub fn user_by_id(&self, id: &str) -> Option<User> {
        self.state().user(id).cloned()
    }

    // ---- outgoing webhooks ----

    /// Creates an outgoing webhook as `CreateOutgoingWebhook` + `IsValid` would; answers its
    /// 26-character token. Panics on an invalid hook (use [`Self::try_create_outgoing_webhook`]).
    pub fn create_outgoing_webhook(&self, hook: OutgoingHook) -> String {
        self.try_create_outgoing_webhook(hook).unwrap_or_else(|e| panic!("create_outgoing_webhook: {e}"))
    }

    pub fn try_create_outgoing_webhook(&self, hook: OutgoingHook) -> Result<String, AppError> {
        let mut st = self.state();
        if !st.settings.enable_outgoing_webhooks {
            return Err(AppError::new("api.outgoing_webhook.disabled.app_error", "Outgoing webhooks have been disabled by the system admin.", 501));
        }
        let team_id = st
            .team_by_name(&hook.team)
            .map(|t| t.id.clone())
            .ok_or_else(|| AppError::new("app.team.get_by_name.missing.app_error", "Unable to find the existing team.", 404))?;
        let creator = hook.creator.as_deref().unwrap_or(ADMIN_USER);
        let creator_id = st.user_ref(creator).id.clone();
        let mut channel_id = String::new();
        if let Some(name) = &hook.channel {
            let ch = st
                .channel_in_team(&team_id, name)
                .ok_or_else(|| AppError::new("app.channel.get.existing.app_error", "Unable to find the existing channel.", 404))?;
            if ch.kind != ChannelType::Open {
                return Err(AppError::new("api.outgoing_webhook.disabled.app_error", "Outgoing webhooks have been disabled by the system admin.", 403));
            }
            channel_id = ch.id.clone();
        } else if hook.trigger_words.is_empty() {
            return Err(AppError::new("api.webhook.create_outgoing.triggers.app_error", "Either trigger_words or channel_id must be set.", 400));
        }
        for existing in st.outgoing.iter().filter(|h| h.team_id == team_id) {
            let urls = existing.callback_urls.iter().any(|u| hook.callback_urls.contains(u));
            let words = existing.trigger_words.iter().any(|w| hook.trigger_words.contains(w));
            if existing.channel_id == channel_id && urls && words {
                return Err(AppError::new(
                    "api.webhook.create_outgoing.intersect.app_error",
                    "Outgoing webhooks from the same channel cannot have the same trigger words/callback URLs.",
                    500,
                ));
            }
        }
        // model.OutgoingWebhook.IsValid
        let invalid = |id: &str| AppError::new(id, "Invalid outgoing webhook.", 400);
        let printed = |v: &[String]| format!("[{}]", v.join(" ")).len();
        if printed(&hook.trigger_words) > 1024 {
            return Err(invalid("model.outgoing_hook.is_valid.words.app_error"));
        }
        if hook.trigger_words.iter().any(String::is_empty) {
            return Err(invalid("model.outgoing_hook.is_valid.trigger_words.app_error"));
        }
        if hook.callback_urls.is_empty() || printed(&hook.callback_urls) > 1024 {
            return Err(invalid("model.outgoing_hook.is_valid.callback.app_error"));
        }
        if hook
            .callback_urls
            .iter()
            .any(|u| !(u.starts_with("http://") || u.starts_with("https://")) || reqwest::Url::parse(u).is_err())
        {
            return Err(invalid("model.outgoing_hook.is_valid.url.app_error"));
        }
        if hook.display_name.len() > 64 {
            return Err(invalid("model.outgoing_hook.is_valid.display_name.app_error"));
        }
        if hook.description.len() > 500 {
            return Err(invalid("model.outgoing_hook.is_valid.description.app_error"));
        }
        if hook.content_type.len() > 128 || hook.trigger_when > 1 {
            return Err(invalid("model.outgoing_hook.is_valid.content_type.app_error"));
        }
        if hook.username.len() > 64 {
            return Err(invalid("model.outgoing_hook.username.app_error"));
        }
        if hook.icon_url.len() > 1024 {
            return Err(invalid("model.outgoing_hook.icon_url.app_error"));
        }
        let token = new_id();
        st.outgoing.push(OutgoingHookRec {
            id: new_id(),
            token: token.clone(),
            creator_id,
            team_id,
            channel_id,
            trigger_words: hook.trigger_words,
            trigger_when: hook.trigger_when,
            callback_urls: hook.callback_urls,
            content_type: hook.content_type,
            display_name: hook.display_name,
            username: hook.username,
            icon_url: hook.icon_url,
        });
        Ok(token)
    }

    /// `RegenOutgoingWebhookToken`: the hook with `token` gets a new one (answered).
    pub fn regen_outgoing_token(&self, token: &str) -> String {
        let mut st = self.state();
        let hook = st.outgoing.iter_mut().find(|h| h.token == token).expect("no hook with that token");
        hook.token = new_id();
        hook.token.clone()
    }

    /// Deletes the outgoing webhook with `token`.
    pub fn delete_outgoing_webhook(&self, token: &str) {
        self.state().outgoing.retain(|h| h.token != token);
    }

    /// `user` posts `message` in `channel` (a name or `team/name`), as a reply to `root_id`
    /// if given, through the path that fires outgoing webhooks (`CreatePostAsUser`). Every
    /// matching hook fires (hooks one after the other, a hook's callback URLs concurrently,
    /// as `TriggerWebhook` does); each answer is turned into posts. Returns when all are done.
    /// Panics if the user/channel is unknown or the post is refused (e.g. `root_id` is a reply).
    pub async fn user_posts(&self, user: &str, channel: &str, message: &str, root_id: Option<&str>) -> PostOutcome {
        let (post, firings, timeout) = {
            let mut st = self.state();
            let user_id = st.user_ref(user).id.clone();
            let channel_id = st.channel_ref(channel).id.clone();
            let post = st
                .save_post(Post {
                    id: String::new(),
                    create_at: 0,
                    user_id,
                    channel_id,
                    root_id: root_id.unwrap_or("").into(),
                    message: message.into(),
                    post_type: String::new(),
                    props: Map::new(),
                    priority: None,
                })
                .unwrap_or_else(|e| panic!("user_posts: {e}"));
            let firings = st.plan_firings(&post);
            (post, firings, st.settings.outgoing_timeout)
        };
        self.shared.announce(std::slice::from_ref(&post));
        let mut callbacks = Vec::new();
        for firing in firings {
            let enc = Encoding::for_hook(&firing.hook.content_type);
            let body = firing.payload.encode(enc);
            let calls = firing.hook.callback_urls.iter().map(|url| {
                let body = body.clone();
                let hook = firing.hook.clone();
                let payload = &firing.payload;
                let post = &post;
                async move {
                    let result = send(&self.client, url, Some(enc.content_type()), body.clone(), timeout).await;
                    let (status, headers, resp_body, posts) = match result {
                        Err(e) => (None, Headers::default(), Vec::new(), Err(e)),
                        Ok((status, headers, resp_body)) => {
                            let posts = match parse_outgoing_response(&resp_body) {
                                Err(e) => Err(e),
                                Ok(resp) => {
                                    let created = self.state().handle_callback_response(&hook, post, resp);
                                    match created {
                                        Ok(created) => {
                                            self.shared.announce(&created);
                                            Ok(created.into_iter().map(|p| p.id).collect())
                                        }
                                        Err(e) => Err(format!("Failed to create response post. {e}")),
                                    }
                                }
                            };
                            (Some(status), headers, resp_body, posts)
                        }
                    };
                    CallbackOutcome {
                        token: hook.token.clone(),
                        url: url.clone(),
                        trigger_word: payload.trigger_word.clone(),
                        sent_content_type: enc.content_type().into(),
                        sent_body: body,
                        status,
                        headers,
                        body: resp_body,
                        posts,
                    }
                }
            });
            callbacks.extend(futures_util::future::join_all(calls).await);
        }
        PostOutcome { post_id: post.id.clone(), post, callbacks }
    }

    /// POSTs raw bytes to `url` as Mattermost's outgoing-webhook client does (same headers,
    /// timeout from the settings), with `content_type` (`None` = no Content-Type header).
    /// Answers (status, headers, body); panics if the request fails (use [`send`] to see errors).
    pub async fn send_outgoing_raw(&self, url: &str, content_type: Option<&str>, body: impl Into<Vec<u8>>) -> (u16, Headers, Vec<u8>) {
        let timeout = self.settings().outgoing_timeout;
        send(&self.client, url, content_type, body.into(), timeout)
            .await
            .unwrap_or_else(|e| panic!("send_outgoing_raw {url}: {e}"))
    }

    /// [`Self::send_outgoing_raw`] that answers the transport error (timeout, reset, …)
    /// instead of panicking.
    pub async fn try_send_outgoing_raw(&self, url: &str, content_type: Option<&str>, body: impl Into<Vec<u8>>) -> Result<(u16, Headers, Vec<u8>), String> {
        let timeout = self.settings().outgoing_timeout;
        send(&self.client, url, content_type, body.into(), timeout).await
    }

    /// POSTs a hand-made payload in either encoding (byte-exact as Mattermost would).
    pub async fn send_outgoing(&self, url: &str, payload: &OutgoingPayload, enc: Encoding) -> (u16, Headers, Vec<u8>) {
        self.send_outgoing_raw(url, Some(enc.content_type()), payload.encode(enc)).await
    }

    // ---- incoming webhooks ----

    /// Creates an incoming webhook defaulting to `channel` (a name or `team/name`); answers
    /// its full URL `{url}/hooks/{id}`.
    pub fn create_incoming_webhook(&self, channel: &str, locked: bool) -> String {
        self.create_incoming_webhook_with(IncomingHook { channel: channel.into(), locked, ..Default::default() })
    }

    pub fn create_incoming_webhook_with(&self, hook: IncomingHook) -> String {
        let mut st = self.state();
        let ch = st.channel_ref(&hook.channel).clone();
        let creator = hook.creator.as_deref().unwrap_or(ADMIN_USER);
        let user_id = st.user_ref(creator).id.clone();
        let id = new_id();
        // CreateIncomingWebhookForChannel drops username/icon when overrides are off.
        let username = if st.settings.enable_post_username_override { hook.username } else { String::new() };
        let icon_url = if st.settings.enable_post_icon_override { hook.icon_url } else { String::new() };
        st.incoming.push(IncomingHookRec {
            id: id.clone(),
            user_id,
            channel_id: ch.id.clone(),
            team_id: ch.team_id.clone(),
            display_name: hook.display_name,
            username,
            icon_url,
            locked: hook.locked,
        });
        format!("{}/hooks/{id}", self.url)
    }

    /// Faults for the next requests to `/hooks/*`, consumed in order (appended to any left).
    pub fn script_incoming(&self, faults: Vec<Fault>) {
        self.state().faults.extend(faults);
    }

    /// Every request to `/hooks/*` so far, in arrival order.
    pub fn incoming_requests(&self) -> Vec<IncomingRequest> {
        self.state().requests.clone()
    }

    // ---- posts ----

    /// Every post, in creation order.
    pub fn posts(&self) -> Vec<Post> {
        self.state().posts.clone()
    }

    /// The posts of `channel` (a name or `team/name`), in creation order.
    pub fn posts_in(&self, channel: &str) -> Vec<Post> {
        let st = self.state();
        let id = st.channel_ref(channel).id.clone();
        st.posts.iter().filter(|p| p.channel_id == id).cloned().collect()
    }

    pub fn post(&self, id: &str) -> Option<Post> {
        self.state().posts.iter().find(|p| p.id == id).cloned()
    }

    /// Every post created from now on (user and webhook posts), for a future WebSocket.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Post> {
        self.shared.posted.subscribe()
    }

    /// Waits until `channel` holds at least `n` posts; panics after `within`.
    pub async fn wait_for_posts_in(&self, channel: &str, n: usize, within: Duration) -> Vec<Post> {
        let deadline = Instant::now() + within;
        loop {
            let posts = self.posts_in(channel);
            if posts.len() >= n {
                return posts;
            }
            if Instant::now() > deadline {
                panic!("fake mattermost: {channel:?} has {} posts, waited for {n}: {posts:#?}", posts.len());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn stop(&self) {
        self.handle.stop(false).await;
    }
}

/// One POST as Mattermost's outgoing client sends it: `Content-Type` (if any),
/// `Accept: application/json`, `User-Agent: Mattermost-Bot/1.1`, `Accept-Encoding: gzip`
/// (and the answer gunzipped as Go's transport does), one attempt, `timeout` for the whole
/// exchange. The error text is what Mattermost logs.
pub async fn send(client: &reqwest::Client, url: &str, content_type: Option<&str>, body: Vec<u8>, timeout: Duration) -> Result<(u16, Headers, Vec<u8>), String> {
    let mut req = client
        .post(url)
        .header("Accept", "application/json")
        .header("User-Agent", USER_AGENT)
        .header("Accept-Encoding", "gzip")
        .timeout(timeout)
        .body(body);
    if let Some(ct) = content_type {
        req = req.header("Content-Type", ct);
    }
    let fail = |e: reqwest::Error| {
        if e.is_timeout() {
            format!("Outgoing Webhook POST timed out. Consider increasing ServiceSettings.OutgoingIntegrationRequestsTimeout. ({})", error_chain(&e))
        } else {
            format!("Outgoing Webhook POST failed: {}", error_chain(&e))
        }
    };
    let resp = req.send().await.map_err(fail)?;
    let status = resp.status().as_u16();
    let headers = Headers::from_reqwest(resp.headers());
    let raw = resp.bytes().await.map_err(fail)?.to_vec();
    let body = if headers.get("content-encoding").is_some_and(|v| v.eq_ignore_ascii_case("gzip")) {
        use std::io::Read;
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| format!("Outgoing Webhook POST failed: gzip: {e}"))?;
        out
    } else {
        raw
    };
    Ok((status, headers, body))
}

/// A plain POST (no Mattermost headers) — e.g. to call an incoming webhook from a test.
pub async fn post_raw(url: &str, content_type: Option<&str>, body: impl Into<Vec<u8>>, timeout: Duration) -> Result<(u16, Headers, Vec<u8>), String> {
    let client = reqwest::Client::builder().no_proxy().build().expect("client");
    let mut req = client.post(url).timeout(timeout).body(body.into());
    if let Some(ct) = content_type {
        req = req.header("Content-Type", ct);
    }
    let fail = |e: reqwest::Error| if e.is_timeout() { format!("timed out: {}", error_chain(&e)) } else { error_chain(&e) };
    let resp = req.send().await.map_err(fail)?;
    let status = resp.status().as_u16();
    let headers = Headers::from_reqwest(resp.headers());
    let body = resp.bytes().await.map_err(fail)?.to_vec();
    Ok((status, headers, body))
}

/// An error and its sources, `a: b: c`.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        let _ = write!(s, ": {x}");
        src = x.source();
    }
    s
}

// ------------------------------------------------------------------------------------------
// A recording callback endpoint (plays the bot side in tests of the fake)
// ------------------------------------------------------------------------------------------

/// How the [`Recorder`] answers one request.
#[derive(Clone, Debug, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub delay: Duration,
}

impl Reply {
    /// `status` with an empty body.
    pub fn empty(status: u16) -> Reply {
        Reply { status, headers: Vec::new(), body: Vec::new(), delay: Duration::ZERO }
    }

    /// `status` with `Content-Type: application/json` and `body`.
    pub fn json(status: u16, body: &Value) -> Reply {
        Reply::raw(status, body.to_string()).header("Content-Type", "application/json")
    }

    /// `status` with these exact bytes and no Content-Type.
    pub fn raw(status: u16, body: impl Into<Vec<u8>>) -> Reply {
        Reply { status, headers: Vec::new(), body: body.into(), delay: Duration::ZERO }
    }

    pub fn header(mut self, k: &str, v: &str) -> Reply {
        self.headers.push((k.into(), v.into()));
        self
    }

    pub fn delayed(mut self, d: Duration) -> Reply {
        self.delay = d;
        self
    }
}

/// One request the recorder received.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// Path and query.
    pub uri: String,
    pub headers: Headers,
    pub body: Vec<u8>,
}

impl Recorded {
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

#[derive(Clone)]
struct RecorderState {
    hits: Arc<Mutex<Vec<Recorded>>>,
    script: Arc<Mutex<VecDeque<Reply>>>,
    default: Arc<Mutex<Reply>>,
}

/// An HTTP endpoint on 127.0.0.1 recording every request on any path and answering from a
/// script (then the default reply, initially `200` with an empty body).
pub struct Recorder {
    pub url: String,
    state: RecorderState,
    handle: ServerHandle,
}

async fn record(req: HttpRequest, body: web::Bytes, st: web::Data<RecorderState>) -> HttpResponse {
    st.hits.lock().unwrap().push(Recorded {
        method: req.method().to_string(),
        uri: req.uri().to_string(),
        headers: Headers::from_actix(req.headers()),
        body: body.to_vec(),
    });
    let reply = st.script.lock().unwrap().pop_front().unwrap_or_else(|| st.default.lock().unwrap().clone());
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    Answer { status: reply.status, headers: reply.headers, body: reply.body }.into_response()
}

impl Recorder {
    pub async fn start() -> Recorder {
        let state = RecorderState {
            hits: Default::default(),
            script: Default::default(),
            default: Arc::new(Mutex::new(Reply::empty(200))),
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let data = web::Data::new(state.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .app_data(web::PayloadConfig::new(64 << 20))
                .default_service(web::to(record))
        })
        .workers(1)
        .disable_signals()
        .listen(listener)
        .unwrap()
        .run();
        let handle = server.handle();
        tokio::spawn(server);
        Recorder { url, state, handle }
    }

    /// `{url}{path}`.
    pub fn url_for(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    pub fn push(&self, r: Reply) {
        self.state.script.lock().unwrap().push_back(r);
    }

    pub fn set_default(&self, r: Reply) {
        *self.state.default.lock().unwrap() = r;
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.hits.lock().unwrap().clone()
    }

    pub async fn stop(self) {
        self.handle.stop(false).await;
    }
}

// ------------------------------------------------------------------------------------------
// REST API for a bot account (§3.6) and the WebSocket API (§3.1–3.5)
// ------------------------------------------------------------------------------------------
//
// REST: `Authorization: Bearer <token>` (or `Token <token>`) with a personal access token
// from [`FakeMattermost::create_token`]; an unknown or revoked token is 401
// `api.context.session_expired.app_error`. `me` works for `{user_id}`. Posts: members only
// (403 `api.context.permissions.app_error`), `CreatePost`'s checks, 201 with the post.
// Channel posts: `since=` (create_at ≥ since; the fake has no edits) or `after=` a post id,
// `page`/`per_page` (default 60, max 200), as a `PostList` (`order` newest first).
//
// WebSocket, as `api4/websocket.go` + `platform/web_conn.go` + `web_hub.go`:
// - Auth at the upgrade (`Authorization`, or `?access_token=`): a bad token is 401 before
//   the upgrade. Without one the socket waits up to 5 s for `authentication_challenge`; a bad
//   challenge closes the socket without a reply; the OK reply comes *after* `hello`.
//   A challenge on an authenticated socket is ignored (no reply).
// - `hello` (seq 0) is compact JSON plus `\n` (json.Encoder); `posted` events use the
//   "precomputed" form with a space after the top-level `:`/`,`. Replies carry no `seq`.
// - Sessions survive a disconnect: events meanwhile queue (up to 256; more and the session
//   is dropped). `?connection_id=&sequence_number=` on an authenticated upgrade resumes: the
//   last 128 sent events are the dead queue, replayed from `sequence_number`, then the queue;
//   no `hello`. An unknown id, a sequence number outside the dead queue, or resumes refused
//   by the test ([`FakeMattermost::ws_refuse_resume`]) give a new connection id and `hello`.
// - `ping` action → `{"status":"OK","data":{"text":"pong",…},"seq_reply":N}`; protocol pings
//   every `Settings::ws_ping_interval`; `user_typing` recorded; seq ≤ 0 → FAIL bad_seq.
// - Revoking a token closes its sockets at once (a real server notices within its 5 s auth
//   check).
// - `PUT /posts/{id}/patch` (`message`) and `DELETE /posts/{id}`: only the author (or a
//   system admin); an unknown or deleted post → 404 `app.post.get.app_error`; a deleted
//   post leaves the channel's post list.
// Simplifications: one node; edits and deletions send no `post_edited` / `post_deleted`
// events; `create_at` strictly
// increases (a real server can give two posts the same millisecond); no inactive-session
// reaping after 5 minutes (refuse resumes instead).

const WS_DEAD_QUEUE: usize = 128;
const WS_SEND_QUEUE: usize = 256;
const WS_AUTH_WAIT: Duration = Duration::from_secs(5);

/// One `/api/v4` REST request as the fake saw it.
#[derive(Clone, Debug)]
pub struct RestRequest {
    pub method: String,
    pub path: String,
    pub query: String,
    pub status: u16,
    pub body: Value,
}

/// One WebSocket upgrade as the fake saw it.
#[derive(Clone, Debug)]
pub struct WsConnect {
    pub query: String,
    pub authorization: Option<String>,
    /// 101, or the status the upgrade was refused with.
    pub status: u16,
    /// Set once the connection is registered: resumed (no hello) or a new connection id.
    pub resumed: Option<bool>,
}

enum WsOut {
    Text(String),
    Ping,
    Pong(Vec<u8>),
    Close,
}

struct WsLive {
    tx: tokio::sync::mpsc::UnboundedSender<WsOut>,
    fd: Option<i32>,
    gen: u64,
}

struct WsSession {
    conn_id: String,
    user_id: String,
    token: String,
    next_seq: i64,
    dead: VecDeque<(i64, String)>,
    pending: VecDeque<(String, Value, Value)>,
    live: Option<WsLive>,
}

impl WsSession {
    /// Sends an event with the next seq (write pump: `SetSequence`, dead queue).
    fn emit(&mut self, event: &str, data: &Value, broadcast: &Value) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let frame = if event == "hello" {
            format!(
                "{{\"event\":\"hello\",\"data\":{},\"broadcast\":{},\"seq\":{seq}}}\n",
                go_json_value(data),
                broadcast_json(broadcast)
            )
        } else {
            format!("{{\"event\": {}, \"data\": {}, \"broadcast\": {}, \"seq\": {seq}}}", json_str(event), go_json_value(data), broadcast_json(broadcast))
        };
        self.dead.push_back((seq, frame.clone()));
        while self.dead.len() > WS_DEAD_QUEUE {
            self.dead.pop_front();
        }
        if let Some(l) = &self.live {
            let _ = l.tx.send(WsOut::Text(frame));
        }
    }

    fn flush_pending(&mut self) {
        while let Some((e, d, b)) = self.pending.pop_front() {
            self.emit(&e, &d, &b);
        }
    }
}

fn json_str(s: &str) -> String {
    let mut o = String::new();
    go_json_string(&mut o, s);
    o
}

/// `WebsocketBroadcast` in struct order.
fn broadcast_json(b: &Value) -> String {
    let s = |k: &str| json_str(b.get(k).and_then(Value::as_str).unwrap_or(""));
    let omit = b.get("omit_users").filter(|v| !v.is_null()).map(go_json_value).unwrap_or_else(|| "null".into());
    format!(
        "{{\"omit_users\":{omit},\"user_id\":{},\"channel_id\":{},\"team_id\":{},\"connection_id\":\"\",\"omit_connection_id\":\"\"}}",
        s("user_id"),
        s("channel_id"),
        s("team_id")
    )
}

#[derive(Default)]
struct WsHub {
    sessions: Vec<WsSession>,
    allow_resume: bool,
    stalled: bool,
    connects: Vec<WsConnect>,
    next_gen: u64,
}

impl WsHub {
    /// Registers a connection (`HubRegister`): resume when possible, else a new connection
    /// id and `hello`. Answers whether it resumed.
    fn register(&mut self, user_id: &str, token: &str, resume: Option<(String, i64)>, live: WsLive) -> bool {
        if let Some((cid, seq)) = resume {
            let found = self.sessions.iter().position(|s| s.conn_id == cid && s.user_id == user_id && s.live.is_none());
            if let Some(i) = found {
                let s = &mut self.sessions[i];
                let oldest = s.dead.front().map_or(s.next_seq, |d| d.0);
                if self.allow_resume && (seq == s.next_seq || (seq >= oldest && seq < s.next_seq)) {
                    for (q, frame) in &s.dead {
                        if *q >= seq {
                            let _ = live.tx.send(WsOut::Text(frame.clone()));
                        }
                    }
                    s.live = Some(live);
                    s.token = token.to_owned();
                    s.flush_pending();
                    return true;
                }
                // clearDeadQueue: the old connection is gone.
                self.sessions.remove(i);
            }
        }
        let mut s = WsSession {
            conn_id: new_id(),
            user_id: user_id.to_owned(),
            token: token.to_owned(),
            next_seq: 0,
            dead: VecDeque::new(),
            pending: VecDeque::new(),
            live: Some(live),
        };
        let data = serde_json::json!({"connection_id": s.conn_id, "server_version": VERSION_ID});
        s.emit("hello", &data, &serde_json::json!({"user_id": user_id}));
        self.sessions.push(s);
        false
    }

    fn disconnected(&mut self, gen: u64) {
        for s in &mut self.sessions {
            if s.live.as_ref().is_some_and(|l| l.gen == gen) {
                s.live = None;
            }
        }
    }

    fn live_sender(&self, gen: u64) -> Option<tokio::sync::mpsc::UnboundedSender<WsOut>> {
        self.sessions.iter().filter_map(|s| s.live.as_ref()).find(|l| l.gen == gen).map(|l| l.tx.clone())
    }
}

fn shutdown_fd(fd: Option<i32>) {
    if let Some(fd) = fd {
        // SAFETY: shutting a socket down does not close the fd, which actix still owns.
        unsafe {
            libc::shutdown(fd, libc::SHUT_RDWR);
        }
    }
}

/// Whether `text` @mentions `username` (whole name).
fn mentions_user(text: &str, username: &str) -> bool {
    let needle = format!("@{}", username.to_lowercase());
    let lower = text.to_lowercase();
    let name_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.';
    lower.match_indices(&needle).any(|(i, _)| {
        let after = lower[i + needle.len()..].chars().next();
        let before = lower[..i].chars().next_back();
        after.is_none_or(|c| !name_char(c) || (c == '.' && lower[i + needle.len() + 1..].chars().next().is_none_or(|d| !name_char(d))))
            && before.is_none_or(|c| !name_char(c))
    })
}

impl Shared {
    /// `posted` to every session of every member of the post's channel (its author included).
    fn ws_posted(&self, post: &Post) {
        let receivers: Vec<(String, Value)> = {
            let st = self.state.lock().unwrap();
            let Some(ch) = st.channel(&post.channel_id).cloned() else { return };
            let sender = st.user(&post.user_id).map(|u| u.username.clone()).unwrap_or_default();
            let sender_name = post
                .prop_str("override_username")
                .filter(|_| post.from_webhook())
                .map(str::to_owned)
                .unwrap_or_else(|| format!("@{sender}"));
            let display = if ch.kind == ChannelType::Direct { format!("@{sender}") } else { ch.name.clone() };
            let post_json = serde_json::to_string(&post.to_api_json()).unwrap();
            st.users
                .iter()
                .filter(|u| st.members.contains(&(ch.id.clone(), u.id.clone())))
                .map(|u| {
                    let mut data = serde_json::json!({
                        "channel_display_name": display, "channel_name": ch.name, "channel_type": ch.kind.as_str(),
                        "post": post_json, "sender_name": sender_name, "set_online": true, "team_id": ch.team_id,
                    });
                    let dm_to_me = ch.kind == ChannelType::Direct && u.id != post.user_id;
                    if dm_to_me || (u.id != post.user_id && mentions_user(&post.message, &u.username)) {
                        data["mentions"] = Value::String(format!("[\"{}\"]", u.id));
                    }
                    (u.id.clone(), data)
                })
                .collect()
        };
        let broadcast = serde_json::json!({"channel_id": post.channel_id});
        let mut hub = self.ws.lock().unwrap();
        let mut overflowed = Vec::new();
        for (user, data) in receivers {
            for s in hub.sessions.iter_mut().filter(|s| s.user_id == user) {
                if s.live.is_some() {
                    s.emit("posted", &data, &broadcast);
                } else if s.pending.len() >= WS_SEND_QUEUE {
                    overflowed.push(s.conn_id.clone());
                } else {
                    s.pending.push_back(("posted".into(), data.clone(), broadcast.clone()));
                }
            }
        }
        hub.sessions.retain(|s| !overflowed.contains(&s.conn_id));
    }

    fn user_for_token(&self, token: &str) -> Option<User> {
        let st = self.state.lock().unwrap();
        let id = st.tokens.get(token)?;
        st.user(id).cloned()
    }
}

/// The token of a request as `ParseAuthTokenFromRequest` finds it (header `Bearer`/`Token`,
/// then `access_token` in the query).
fn request_token(req: &HttpRequest) -> Option<String> {
    if let Some(h) = req.headers().get("authorization").and_then(|v| v.to_str().ok()) {
        let h = h.trim();
        for prefix in ["bearer ", "token "] {
            if h.len() > prefix.len() && h[..prefix.len()].eq_ignore_ascii_case(prefix) {
                return Some(h[prefix.len()..].trim().to_owned());
            }
        }
    }
    web::Query::<HashMap<String, String>>::from_query(req.query_string())
        .ok()
        .and_then(|q| q.get("access_token").cloned())
}

fn session_expired() -> AppError {
    AppError::new("api.context.session_expired.app_error", "Invalid or expired session, please login again.", 401)
}

fn no_permission() -> AppError {
    AppError::new("api.context.permissions.app_error", "You do not have the appropriate permissions.", 403)
}

fn json_answer(status: u16, body: &Value) -> HttpResponse {
    HttpResponse::build(actix_web::http::StatusCode::from_u16(status).unwrap())
        .insert_header(("Content-Type", "application/json"))
        .insert_header(("X-Request-Id", new_id()))
        .insert_header(("X-Version-Id", VERSION_ID))
        .body(serde_json::to_string(body).unwrap())
}

/// Authenticates a REST request (and applies a scripted fault), recording it.
fn rest_begin(req: &HttpRequest, shared: &Shared, body: &Value) -> Result<User, HttpResponse> {
    let record = |status: u16| {
        shared.state.lock().unwrap().rest.push(RestRequest {
            method: req.method().to_string(),
            path: req.path().to_owned(),
            query: req.query_string().to_owned(),
            status,
            body: body.clone(),
        })
    };
    let fault = shared.state.lock().unwrap().rest_faults.pop_front();
    if let Some(status) = fault {
        record(status);
        let e = app_error_for_status(status);
        return Err(Answer::error(e, &new_id()).into_response());
    }
    match request_token(req).and_then(|t| shared.user_for_token(&t)) {
        Some(u) => {
            record(0);
            Ok(u)
        }
        None => {
            record(401);
            Err(Answer::error(session_expired(), &new_id()).into_response())
        }
    }
}

fn finish(shared: &Shared, status: u16, body: &Value) -> HttpResponse {
    if let Some(last) = shared.state.lock().unwrap().rest.last_mut() {
        if last.status == 0 {
            last.status = status;
        }
    }
    json_answer(status, body)
}

fn fail(shared: &Shared, e: AppError) -> HttpResponse {
    let status = e.status_code;
    if let Some(last) = shared.state.lock().unwrap().rest.last_mut() {
        if last.status == 0 {
            last.status = status;
        }
    }
    Answer::error(e, &new_id()).into_response()
}

/// `{user_id}` as the user itself (`me` or its own id); others need admin rights.
fn path_user(req: &HttpRequest, me: &User) -> Result<(), AppError> {
    let id = req.match_info().get("user_id").unwrap_or("");
    if id == "me" || id == me.id || me.is_system_admin {
        Ok(())
    } else if !is_valid_id(id) {
        Err(AppError::new("api.context.invalid_url_param.app_error", "Invalid or missing user_id parameter in request URL.", 400))
    } else {
        Err(no_permission())
    }
}

fn user_json(u: &User) -> Value {
    let roles = if u.is_system_admin { "system_user system_admin" } else { "system_user" };
    serde_json::json!({"id": u.id, "create_at": 0, "update_at": 0, "delete_at": 0, "username": u.username,
        "auth_service": "", "email": format!("{}@example.com", u.username), "nickname": "", "first_name": "",
        "last_name": "", "position": "", "roles": roles, "locale": "en", "is_bot": u.is_bot})
}

fn channel_json(c: &Channel) -> Value {
    serde_json::json!({"id": c.id, "create_at": 0, "update_at": 0, "delete_at": 0, "team_id": c.team_id,
        "type": c.kind.as_str(), "display_name": c.name, "name": c.name, "header": "", "purpose": ""})
}

async fn rest_get_user(req: HttpRequest, shared: web::Data<Arc<Shared>>) -> HttpResponse {
    let me = match rest_begin(&req, &shared, &Value::Null) {
        Ok(u) => u,
        Err(r) => return r,
    };
    let id = req.match_info().get("user_id").unwrap_or("");
    let user = if id == "me" { Some(me) } else { shared.state.lock().unwrap().user(id).cloned() };
    match user {
        Some(u) => finish(&shared, 200, &user_json(&u)),
        None => fail(&shared, AppError::new("app.user.missing_account.const", "Unable to find the user.", 404)),
    }
}

async fn rest_user_teams(req: HttpRequest, shared: web::Data<Arc<Shared>>) -> HttpResponse {
    let me = match rest_begin(&req, &shared, &Value::Null) {
        Ok(u) => u,
        Err(r) => return r,
    };
    if let Err(e) = path_user(&req, &me) {
        return fail(&shared, e);
    }
    let teams: Vec<Value> = shared
        .state
        .lock()
        .unwrap()
        .teams
        .iter()
        .map(|t| serde_json::json!({"id": t.id, "name": t.name, "display_name": t.name, "type": "O"}))
        .collect();
    finish(&shared, 200, &Value::Array(teams))
}

async fn rest_user_channels(req: HttpRequest, shared: web::Data<Arc<Shared>>) -> HttpResponse {
    let me = match rest_begin(&req, &shared, &Value::Null) {
        Ok(u) => u,
        Err(r) => return r,
    };
    if let Err(e) = path_user(&req, &me) {
        return fail(&shared, e);
    }
    let id = req.match_info().get("user_id").unwrap_or("");
    let uid = if id == "me" { me.id.clone() } else { id.to_owned() };
    let chans: Vec<Value> = {
        let st = shared.state.lock().unwrap();
        st.channels.iter().filter(|c| st.members.contains(&(c.id.clone(), uid.clone()))).map(channel_json).collect()
    };
    finish(&shared, 200, &Value::Array(chans))
}

async fn rest_typing(req: HttpRequest, body: web::Bytes, shared: web::Data<Arc<Shared>>) -> HttpResponse {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let me = match rest_begin(&req, &shared, &body) {
        Ok(u) => u,
        Err(r) => return r,
    };
    if let Err(e) = path_user(&req, &me) {
        return fail(&shared, e);
    }
    let channel_id = body["channel_id"].as_str().unwrap_or("").to_owned();
    let parent_id = body["parent_id"].as_str().unwrap_or("").to_owned();
    {
        let mut st = shared.state.lock().unwrap();
        if !st.members.contains(&(channel_id.clone(), me.id.clone())) {
            drop(st);
            return fail(&shared, no_permission());
        }
        st.typing.push((me.id.clone(), channel_id, parent_id));
    }
    finish(&shared, 200, &serde_json::json!({"status": "OK"}))
}

async fn rest_channel_posts(req: HttpRequest, shared: web::Data<Arc<Shared>>) -> HttpResponse {
    let me = match rest_begin(&req, &shared, &Value::Null) {
        Ok(u) => u,
        Err(r) => return r,
    };
    let cid = req.match_info().get("channel_id").unwrap_or("").to_owned();
    let q = web::Query::<HashMap<String, String>>::from_query(req.query_string()).map(|q| q.into_inner()).unwrap_or_default();
    let list = {
        let st = shared.state.lock().unwrap();
        if st.channel(&cid).is_none() || !(st.members.contains(&(cid.clone(), me.id.clone())) || me.is_system_admin) {
            drop(st);
            return fail(&shared, no_permission());
        }
        let in_channel = st.posts.iter().filter(|p| p.channel_id == cid);
        let mut chosen: Vec<&Post> = if let Some(since) = q.get("since").and_then(|s| s.parse::<i64>().ok()) {
            in_channel.filter(|p| p.create_at >= since).collect()
        } else {
            let per_page = q.get("per_page").and_then(|s| s.parse::<usize>().ok()).unwrap_or(60).min(200);
            let page = q.get("page").and_then(|s| s.parse::<usize>().ok()).unwrap_or(0);
            match q.get("after") {
                Some(after) => {
                    let anchor = st.posts.iter().find(|p| p.id == *after).map(|p| p.create_at);
                    match anchor {
                        None => Vec::new(),
                        Some(t) => in_channel.filter(|p| p.create_at > t).skip(page * per_page).take(per_page).collect(),
                    }
                }
                None => {
                    let mut all: Vec<&Post> = in_channel.collect();
                    all.reverse();
                    let mut v: Vec<&Post> = all.into_iter().skip(page * per_page).take(per_page).collect();
                    v.reverse();
                    v
                }
            }
        };
        chosen.reverse();
        let order: Vec<Value> = chosen.iter().map(|p| Value::String(p.id.clone())).collect();
        let posts: Map<String, Value> = chosen.iter().map(|p| (p.id.clone(), p.to_api_json())).collect();
        serde_json::json!({"order": order, "posts": posts, "next_post_id": "", "prev_post_id": "", "has_next": false})
    };
    finish(&shared, 200, &list)
}

async fn rest_create_post(req: HttpRequest, body: web::Bytes, shared: web::Data<Arc<Shared>>) -> HttpResponse {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let me = match rest_begin(&req, &shared, &body) {
        Ok(u) => u,
        Err(r) => return r,
    };
    let Some(obj) = body.as_object() else {
        return fail(&shared, AppError::new("api.context.invalid_body_param.app_error", "Invalid or missing post in request body.", 400));
    };
    let cid = obj.get("channel_id").and_then(Value::as_str).unwrap_or("").to_owned();
    let saved = {
        let mut st = shared.state.lock().unwrap();
        let member = st.members.contains(&(cid.clone(), me.id.clone())) || me.is_system_admin;
        if st.channel(&cid).is_none() || !member {
            Err(no_permission())
        } else {
            let props = obj.get("props").and_then(Value::as_object).cloned().unwrap_or_default();
            st.save_post(Post {
                id: String::new(),
                create_at: 0,
                user_id: me.id.clone(),
                channel_id: cid,
                root_id: obj.get("root_id").and_then(Value::as_str).unwrap_or("").to_owned(),
                message: obj.get("message").and_then(Value::as_str).unwrap_or("").to_owned(),
                post_type: String::new(),
                props,
                priority: None,
            })
        }
    };
    match saved {
        Ok(post) => {
            shared.announce(std::slice::from_ref(&post));
            finish(&shared, 201, &post.to_api_json())
        }
        Err(e) => fail(&shared, e),
    }
}

/// `PUT /api/v4/posts/{post_id}/patch` (`api4/post.go patchPost`): the fields this fake
/// models are `message` only.
async fn rest_patch_post(req: HttpRequest, path: web::Path<String>, body: web::Bytes, shared: web::Data<Arc<Shared>>) -> HttpResponse {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let me = match rest_begin(&req, &shared, &body) {
        Ok(u) => u,
        Err(r) => return r,
    };
    let post_id = path.into_inner();
    let result = {
        let mut st = shared.state.lock().unwrap();
        let max = st.settings.max_post_size;
        match st.posts.iter().position(|p| p.id == post_id) {
            None => Err(AppError::new("app.post.get.app_error", "Unable to get the post.", 404)),
            Some(i) if st.posts[i].user_id != me.id && !me.is_system_admin => Err(no_permission()),
            Some(i) => match body.get("message").and_then(Value::as_str) {
                Some(m) if rune_count(m) > max => Err(AppError::new(
                    "model.post.is_valid.message_length.app_error",
                    "Message property is longer than the maximum permitted length.",
                    400,
                )),
                Some(m) => {
                    st.posts[i].message = m.to_owned();
                    st.edits.push((post_id.clone(), m.to_owned()));
                    Ok(st.posts[i].to_api_json())
                }
                None => Ok(st.posts[i].to_api_json()),
            },
        }
    };
    match result {
        Ok(mut post) => {
            post["edit_at"] = Value::from(now_millis());
            finish(&shared, 200, &post)
        }
        Err(e) => fail(&shared, e),
    }
}

/// `DELETE /api/v4/posts/{post_id}`.
async fn rest_delete_post(req: HttpRequest, path: web::Path<String>, shared: web::Data<Arc<Shared>>) -> HttpResponse {
    let me = match rest_begin(&req, &shared, &Value::Null) {
        Ok(u) => u,
        Err(r) => return r,
    };
    let post_id = path.into_inner();
    let result = {
        let mut st = shared.state.lock().unwrap();
        match st.posts.iter().position(|p| p.id == post_id) {
            None => Err(AppError::new("app.post.get.app_error", "Unable to get the post.", 404)),
            Some(i) if st.posts[i].user_id != me.id && !me.is_system_admin => Err(no_permission()),
            Some(i) => {
                st.posts.remove(i);
                st.deleted.push(post_id);
                Ok(())
            }
        }
    };
    match result {
        Ok(()) => finish(&shared, 200, &serde_json::json!({"status": "OK"})),
        Err(e) => fail(&shared, e),
    }
}

// ---- WebSocket frames (RFC 6455), enough for JSON text frames and control frames ----

/// One frame (fragments are reassembled by [`FrameReader`]).
#[derive(Clone, Debug, PartialEq)]
pub enum WsFrame {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<u16>),
}

pub fn encode_frame(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = vec![0x80 | opcode];
    let m = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(m | n as u8),
        n if n <= 0xffff => {
            out.push(m | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(m | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(k) => {
            out.extend_from_slice(&k);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

#[derive(Default)]
pub struct FrameReader {
    buf: Vec<u8>,
    fragments: Option<(u8, Vec<u8>)>,
}

impl FrameReader {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, `Ok(None)` when more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<WsFrame>, String> {
        // Bounded: each iteration consumes one frame from the buffer.
        loop {
            let b = &self.buf;
            if b.len() < 2 {
                return Ok(None);
            }
            let fin = b[0] & 0x80 != 0;
            let opcode = b[0] & 0x0f;
            let masked = b[1] & 0x80 != 0;
            let (len, mut at) = match b[1] & 0x7f {
                126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
                127 if b.len() >= 10 => (u64::from_be_bytes(b[2..10].try_into().unwrap()) as usize, 10),
                126 | 127 => return Ok(None),
                n => (n as usize, 2),
            };
            let key = if masked {
                if b.len() < at + 4 {
                    return Ok(None);
                }
                let k = [b[at], b[at + 1], b[at + 2], b[at + 3]];
                at += 4;
                Some(k)
            } else {
                None
            };
            if b.len() < at + len {
                return Ok(None);
            }
            let mut payload = b[at..at + len].to_vec();
            if let Some(k) = key {
                for (i, x) in payload.iter_mut().enumerate() {
                    *x ^= k[i % 4];
                }
            }
            self.buf.drain(..at + len);
            let (opcode, payload) = match opcode {
                0 => {
                    let Some((op, mut acc)) = self.fragments.take() else { return Err("continuation without a start".into()) };
                    acc.extend_from_slice(&payload);
                    if !fin {
                        self.fragments = Some((op, acc));
                        continue;
                    }
                    (op, acc)
                }
                1 | 2 if !fin => {
                    self.fragments = Some((opcode, payload));
                    continue;
                }
                _ => (opcode, payload),
            };
            return match opcode {
                1 => String::from_utf8(payload).map(|t| Some(WsFrame::Text(t))).map_err(|_| "text frame is not UTF-8".into()),
                2 => Ok(Some(WsFrame::Binary(payload))),
                8 => Ok(Some(WsFrame::Close((payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]))))),
                9 => Ok(Some(WsFrame::Ping(payload))),
                10 => Ok(Some(WsFrame::Pong(payload))),
                op => Err(format!("unknown opcode {op}")),
            };
        }
    }
}

/// SHA-1 (FIPS 180-4), for `Sec-WebSocket-Accept` only.
fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0];
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for chunk in msg.chunks(64) {
        let mut w = [0u32; 80];
        for i in 0..16 {
            w[i] = u32::from_be_bytes(chunk[i * 4..i * 4 + 4].try_into().unwrap());
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A827999),
                20..=39 => (b ^ c ^ d, 0x6ED9EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1BBCDC),
                _ => (b ^ c ^ d, 0xCA62C1D6),
            };
            let t = a.rotate_left(5).wrapping_add(f).wrapping_add(e).wrapping_add(k).wrapping_add(*wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 20];
    for (i, x) in h.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&x.to_be_bytes());
    }
    out
}

/// `Sec-WebSocket-Accept` for a key.
pub fn ws_accept_key(key: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(sha1(format!("{key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11").as_bytes()))
}

fn action_reply(status: &str, seq_reply: i64, data: Option<Value>, error: Option<AppError>) -> String {
    let mut o = Map::new();
    o.insert("status".into(), status.into());
    if seq_reply > 0 {
        o.insert("seq_reply".into(), seq_reply.into());
    }
    if let Some(d) = data {
        o.insert("data".into(), d);
    }
    if let Some(e) = error {
        o.insert("error".into(), serde_json::from_str(&e.to_json()).unwrap());
    }
    // json.Encoder: compact, newline.
    format!("{}\n", serde_json::to_string(&Value::Object(o)).unwrap())
}

async fn websocket(req: HttpRequest, mut payload: web::Payload, shared: web::Data<Arc<Shared>>) -> HttpResponse {
    use futures_util::StreamExt;
    let shared: Arc<Shared> = shared.get_ref().clone();
    let query = req.query_string().to_owned();
    let authorization = req.headers().get("authorization").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let refuse = |status: u16, e: Option<AppError>| {
        shared.ws.lock().unwrap().connects.push(WsConnect { query: query.clone(), authorization: authorization.clone(), status, resumed: None });
        match e {
            Some(e) => Answer::error(e, &new_id()).into_response(),
            None => HttpResponse::build(actix_web::http::StatusCode::from_u16(status).unwrap()).finish(),
        }
    };
    let upgrade = req.headers().get("upgrade").and_then(|v| v.to_str().ok()).is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let Some(key) = req.headers().get("sec-websocket-key").and_then(|v| v.to_str().ok()).map(str::to_owned) else {
        return refuse(400, None);
    };
    if !upgrade {
        return refuse(400, None);
    }
    // Authenticated at the upgrade, or not at all (then the challenge decides).
    let mut user: Option<(User, String)> = None;
    if let Some(token) = request_token(&req) {
        match shared.user_for_token(&token) {
            Some(u) => user = Some((u, token)),
            None => return refuse(401, Some(session_expired())),
        }
    }
    let q = web::Query::<HashMap<String, String>>::from_query(&query).map(|q| q.into_inner()).unwrap_or_default();
    let mut resume = None;
    if let Some(cid) = q.get("connection_id").filter(|c| !c.is_empty()) {
        let seq = q.get("sequence_number").and_then(|s| s.parse::<i64>().ok()).filter(|s| *s >= 0);
        match seq {
            Some(seq) if is_valid_id(cid) => resume = Some((cid.clone(), seq)),
            _ => return refuse(400, None),
        }
    }
    let fd = req.conn_data::<ConnFd>().map(|c| c.0);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<WsOut>();
    let (gen, connect_index) = {
        let mut hub = shared.ws.lock().unwrap();
        hub.next_gen += 1;
        hub.connects.push(WsConnect { query: query.clone(), authorization: authorization.clone(), status: 101, resumed: None });
        (hub.next_gen, hub.connects.len() - 1)
    };
    let register = {
        let shared = shared.clone();
        let tx = tx.clone();
        move |user: &User, token: &str, resume: Option<(String, i64)>| {
            let mut hub = shared.ws.lock().unwrap();
            let resumed = hub.register(&user.id, token, resume, WsLive { tx: tx.clone(), fd, gen });
            hub.connects[connect_index].resumed = Some(resumed);
        }
    };
    if let Some((u, token)) = &user {
        register(u, token, resume);
    }
    let out_shared = shared.clone();
    let body = futures_util::stream::unfold((rx, out_shared, false), |(mut rx, shared, done)| async move {
        if done {
            return None;
        }
        let out = rx.recv().await?;
        // A stalled network: nothing goes out until the test lets it.
        for _ in 0..6000 {
            if !shared.ws.lock().unwrap().stalled {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (bytes, last) = match out {
            WsOut::Text(t) => (encode_frame(1, t.as_bytes(), None), false),
            WsOut::Ping => (encode_frame(9, b"", None), false),
            WsOut::Pong(p) => (encode_frame(10, &p, None), false),
            WsOut::Close => (encode_frame(8, &1000u16.to_be_bytes(), None), true),
        };
        Some((Ok::<_, actix_web::Error>(web::Bytes::from(bytes)), (rx, shared, last)))
    });
    let ping_every = shared.state.lock().unwrap().settings.ws_ping_interval;
    let reader_shared = shared.clone();
    actix_web::rt::spawn(async move {
        let shared = reader_shared;
        let mut reader = FrameReader::default();
        let mut authed = user;
        let auth_deadline = tokio::time::sleep(WS_AUTH_WAIT);
        tokio::pin!(auth_deadline);
        let mut pings = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
        // Bounded by the connection's life.
        'conn: loop {
            tokio::select! {
                chunk = payload.next() => {
                    let Some(Ok(chunk)) = chunk else { break };
                    if shared.ws.lock().unwrap().stalled {
                        continue;
                    }
                    reader.push(&chunk);
                    loop {
                        let frame = match reader.next_frame() {
                            Ok(Some(f)) => f,
                            Ok(None) => break,
                            Err(_) => break 'conn,
                        };
                        match frame {
                            WsFrame::Ping(p) => { let _ = tx.send(WsOut::Pong(p)); }
                            WsFrame::Close(_) => { let _ = tx.send(WsOut::Close); break 'conn; }
                            WsFrame::Text(t) => {
                                let v: Value = serde_json::from_str(&t).unwrap_or(Value::Null);
                                let seq = v.get("seq").and_then(Value::as_i64).unwrap_or(0);
                                let action = v.get("action").and_then(Value::as_str).unwrap_or("");
                                if action == "authentication_challenge" {
                                    if authed.is_some() {
                                        continue;
                                    }
                                    let token = v["data"]["token"].as_str().unwrap_or("").to_owned();
                                    match shared.user_for_token(&token) {
                                        Some(u) => {
                                            register(&u, &token, None);
                                            let _ = tx.send(WsOut::Text(action_reply("OK", seq, None, None)));
                                            authed = Some((u, token));
                                        }
                                        None => break 'conn,
                                    }
                                    continue;
                                }
                                let reply = if authed.is_none() {
                                    action_reply("FAIL", seq, None, Some(AppError::new("api.web_socket_router.not_authenticated.app_error", "No websocket connection has been authenticated.", 401)))
                                } else if action.is_empty() {
                                    action_reply("FAIL", seq, None, Some(AppError::new("api.web_socket_router.no_action.app_error", "No websocket action.", 500)))
                                } else if seq <= 0 {
                                    action_reply("FAIL", seq, None, Some(AppError::new("api.web_socket_router.bad_seq.app_error", "Invalid sequence for WebSocket message.", 400)))
                                } else if action == "ping" {
                                    action_reply("OK", seq, Some(serde_json::json!({"text": "pong", "version": VERSION_ID, "server_time": now_millis(), "node_id": ""})), None)
                                } else if action == "user_typing" {
                                    let (uid, _) = authed.as_ref().map(|(u, t)| (u.id.clone(), t.clone())).unwrap();
                                    let ch = v["data"]["channel_id"].as_str().unwrap_or("").to_owned();
                                    let parent = v["data"]["parent_id"].as_str().unwrap_or("").to_owned();
                                    shared.state.lock().unwrap().typing.push((uid, ch, parent));
                                    action_reply("OK", seq, None, None)
                                } else {
                                    action_reply("FAIL", seq, None, Some(AppError::new("api.web_socket_router.bad_action.app_error", "Unknown WebSocket action.", 500)))
                                };
                                let _ = tx.send(WsOut::Text(reply));
                            }
                            _ => {}
                        }
                    }
                }
                _ = &mut auth_deadline, if authed.is_none() => break,
                _ = pings.tick() => {
                    if !shared.ws.lock().unwrap().stalled {
                        let _ = tx.send(WsOut::Ping);
                    }
                }
            }
        }
        shared.ws.lock().unwrap().disconnected(gen);
        // End the response stream, which closes the connection. Not `shutdown_fd`: by now
        // actix may have closed the fd, and its number may belong to another connection of
        // this process (a test's request to patchbay).
        let _ = tx.send(WsOut::Close);
    });
    HttpResponse::SwitchingProtocols()
        .upgrade("websocket")
        .insert_header(("Sec-WebSocket-Accept", ws_accept_key(&key)))
        .streaming(body)
}

impl FakeMattermost {
    // ---- bot accounts, tokens, REST ----

    /// Creates a personal access token for `username` (`POST /users/{id}/tokens`); answers it.
    pub fn create_token(&self, username: &str) -> String {
        let mut st = self.state();
        let uid = st.user_ref(username).id.clone();
        let token = new_id();
        st.tokens.insert(token.clone(), uid);
        token
    }

    /// Revokes a token: REST calls with it get 401 and its WebSockets are closed.
    pub fn revoke_token(&self, token: &str) {
        self.state().tokens.remove(token);
        let mut hub = self.shared.ws.lock().unwrap();
        for s in hub.sessions.iter_mut().filter(|s| s.token == token) {
            if let Some(l) = s.live.take() {
                // The fd only while the connection is surely open (its stream not ended), and
                // before the close frame ends it: a closed fd's number may be reused.
                if !l.tx.is_closed() {
                    shutdown_fd(l.fd);
                }
                let _ = l.tx.send(WsOut::Close);
            }
        }
        hub.sessions.retain(|s| s.token != token);
    }

    /// The direct channel of two users (created on demand, both members).
    pub fn direct_channel(&self, a: &str, b: &str) -> Channel {
        let mut st = self.state();
        let (a, b) = (st.user_ref(a).id.clone(), st.user_ref(b).id.clone());
        st.get_or_create_dm(&a, &b)
    }

    /// Answers the next `/api/v4` REST requests with these statuses (AppError bodies).
    pub fn script_rest(&self, statuses: Vec<u16>) {
        self.state().rest_faults.extend(statuses);
    }

    pub fn rest_requests(&self) -> Vec<RestRequest> {
        self.state().rest.clone()
    }

    /// Message edits so far (`PUT /posts/{id}/patch`): (post id, new message), in order.
    pub fn post_edits(&self) -> Vec<(String, String)> {
        self.state().edits.clone()
    }

    /// Posts deleted so far, in order.
    pub fn deleted_posts(&self) -> Vec<String> {
        self.state().deleted.clone()
    }

    /// Typing indicators so far: (user id, channel id, parent id).
    pub fn typing(&self) -> Vec<(String, String, String)> {
        self.state().typing.clone()
    }

    // ---- WebSocket controls ----

    /// Every WebSocket upgrade so far.
    pub fn ws_connects(&self) -> Vec<WsConnect> {
        self.shared.ws.lock().unwrap().connects.clone()
    }

    /// How many sockets are open now.
    pub fn ws_live(&self) -> usize {
        self.shared.ws.lock().unwrap().sessions.iter().filter(|s| s.live.is_some()).count()
    }

    /// Drops every open socket abruptly (TCP shutdown, no close frame), as a network fault
    /// does. Sessions stay resumable.
    pub fn ws_drop(&self) {
        let mut hub = self.shared.ws.lock().unwrap();
        for s in &mut hub.sessions {
            if let Some(l) = s.live.take() {
                if !l.tx.is_closed() {
                    shutdown_fd(l.fd);
                }
            }
        }
    }

    /// Refuse (true) or allow (false, the default) resuming: a refused resume gets a new
    /// connection id and `hello`, as after a server restart or on another cluster node.
    pub fn ws_refuse_resume(&self, refuse: bool) {
        let mut hub = self.shared.ws.lock().unwrap();
        hub.allow_resume = !refuse;
    }

    /// A black hole: while stalled, nothing is sent (no events, replies, pings or pongs)
    /// and nothing received is answered; the sockets stay open.
    pub fn ws_stall(&self, stalled: bool) {
        self.shared.ws.lock().unwrap().stalled = stalled;
    }

    /// The connection id and next seq of `user`'s sessions.
    pub fn ws_sessions(&self, username: &str) -> Vec<(String, i64, bool)> {
        let uid = self.user(username).id;
        let hub = self.shared.ws.lock().unwrap();
        hub.sessions.iter().filter(|s| s.user_id == uid).map(|s| (s.conn_id.clone(), s.next_seq, s.live.is_some())).collect()
    }
}

/// A minimal WebSocket client for tests of the fake (the bot under test uses tungstenite).
pub struct WsClient {
    stream: tokio::net::TcpStream,
    reader: FrameReader,
}

impl WsClient {
    /// Opens `{fake}/{path_and_query}` with extra headers; `Err((status, body))` when the
    /// upgrade is refused.
    pub async fn connect(base_url: &str, path_and_query: &str, headers: &[(&str, &str)]) -> Result<WsClient, (u16, String)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let host = base_url.trim_start_matches("http://");
        let mut stream = tokio::net::TcpStream::connect(host).await.map_err(|e| (0, e.to_string()))?;
        let key = {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 16]>())
        };
        let mut req = format!(
            "GET {path_and_query} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).await.map_err(|e| (0, e.to_string()))?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = find_sub(&buf, b"\r\n\r\n", 0) {
                break i + 4;
            }
            let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk)).await.map_err(|_| (0, "timeout".to_owned()))?.map_err(|e| (0, e.to_string()))?;
            if n == 0 {
                return Err((0, "closed during the handshake".into()));
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let status: u16 = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        if status != 101 {
            let len: usize = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
                .unwrap_or(0);
            let mut body = buf[head_end..].to_vec();
            while body.len() < len {
                let n = stream.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
            return Err((status, String::from_utf8_lossy(&body).into_owned()));
        }
        let accept = ws_accept_key(&key);
        assert!(head.to_ascii_lowercase().contains(&format!("sec-websocket-accept: {}", accept.to_ascii_lowercase())), "{head}");
        let mut reader = FrameReader::default();
        reader.push(&buf[head_end..]);
        Ok(WsClient { stream, reader })
    }

    pub async fn send_raw(&mut self, opcode: u8, payload: &[u8]) {
        use tokio::io::AsyncWriteExt;
        let _ = self.stream.write_all(&encode_frame(opcode, payload, Some(rand::random()))).await;
    }

    pub async fn send_json(&mut self, v: &Value) {
        self.send_raw(1, v.to_string().as_bytes()).await;
    }

    /// The next frame within `within` (`None`: timeout or the socket closed). Pings are
    /// answered and returned.
    pub async fn recv(&mut self, within: Duration) -> Option<WsFrame> {
        use tokio::io::AsyncReadExt;
        let deadline = tokio::time::Instant::now() + within;
        let mut chunk = [0u8; 8192];
        // Bounded by the deadline.
        loop {
            if let Ok(Some(f)) = self.reader.next_frame() {
                if let WsFrame::Ping(p) = &f {
                    let p = p.clone();
                    self.send_raw(10, &p).await;
                }
                return Some(f);
            }
            let n = tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await.ok()?.ok()?;
            if n == 0 {
                return None;
            }
            self.reader.push(&chunk[..n]);
        }
    }

    /// The next JSON text frame within `within`, skipping control frames; also the raw text.
    pub async fn recv_json(&mut self, within: Duration) -> Option<(Value, String)> {
        let deadline = tokio::time::Instant::now() + within;
        // Bounded by the deadline.
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv(left).await? {
                WsFrame::Text(t) => return Some((serde_json::from_str(&t).expect("JSON frame"), t)),
                WsFrame::Close(_) => return None,
                _ => continue,
            }
        }
    }

    /// Whether the server closed the socket (EOF or a close frame) within `within`.
    pub async fn closed_within(&mut self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        // Bounded by the deadline.
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            match self.recv(left).await {
                None => return tokio::time::Instant::now() < deadline,
                Some(WsFrame::Close(_)) => return true,
                Some(_) => continue,
            }
        }
    }
}
