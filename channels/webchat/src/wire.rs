//! Botkit's web-client wire format: what clients send and what patchbay sends back.
//!
//! Client → patchbay: `{"type": "message", "text", "user"?, "channel"?, "id"?, …}` and the
//! connection events `hello` / `welcome_back` (with patchbay's `token` and `watermark`),
//! `identify` and `typing`. Fields the format does not name pass through to the assistant in
//! the inbound's raw payload.
//!
//! patchbay → client: `message` (with `seq`, `quick_replies`, `files`), `typing`, the session
//! events `hello` / `welcome_back` / `reconnect`, `received`, `error` and `disconnect`.

use patchbay_channel_core::{Attachment, Reply};
use serde_json::{json, Map, Value};

/// A parsed client frame.
#[derive(Debug)]
pub struct ClientFrame {
    pub kind: ClientKind,
    pub obj: Map<String, Value>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum ClientKind {
    Message,
    /// `hello` or `welcome_back`: a socket (re)opened.
    Connect,
    Identify,
    Typing,
}

/// Why a frame was refused: an error frame (or status) with a stable code.
#[derive(Debug, PartialEq, Eq)]
pub struct FrameError {
    pub code: &'static str,
    pub message: String,
    /// When trying again makes sense (`rate_limited`), in seconds.
    pub retry_after: Option<u64>,
}

impl FrameError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        FrameError { code, message: message.into(), retry_after: None }
    }
    pub fn frame(&self) -> Value {
        let mut f = error_frame(self.code, &self.message);
        if let Some(s) = self.retry_after {
            f["retry_after"] = s.into();
        }
        f
    }
}

pub fn error_frame(code: &str, message: &str) -> Value {
    json!({"type": "error", "code": code, "message": message})
}

pub const MAX_TEXT_CHARS: usize = 8_000;

pub fn parse(bytes: &[u8]) -> Result<ClientFrame, FrameError> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| FrameError::new("bad_json", format!("the frame is not JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(FrameError::new("bad_frame", "a frame must be a JSON object"));
    };
    let kind = match obj.get("type") {
        Some(Value::String(t)) => match t.as_str() {
            "message" => ClientKind::Message,
            "hello" | "welcome_back" => ClientKind::Connect,
            "identify" => ClientKind::Identify,
            "typing" => ClientKind::Typing,
            other => {
                return Err(FrameError::new(
                    "unknown_type",
                    format!("unknown frame type `{}`: send message, hello, welcome_back, identify or typing", truncate(other, 40)),
                ))
            }
        },
        Some(_) => return Err(FrameError::new("bad_frame", "`type` must be a string")),
        None => return Err(FrameError::new("bad_frame", "the frame has no `type`")),
    };
    if kind == ClientKind::Message {
        match obj.get("text") {
            Some(Value::String(t)) if t.trim().is_empty() => {
                return Err(FrameError::new("empty_message", "`text` is empty"))
            }
            Some(Value::String(t)) if t.chars().count() > MAX_TEXT_CHARS => {
                return Err(FrameError::new("text_too_long", format!("`text` is longer than {MAX_TEXT_CHARS} characters")))
            }
            Some(Value::String(_)) => {}
            Some(_) => return Err(FrameError::new("bad_frame", "`text` must be a string")),
            None => return Err(FrameError::new("bad_frame", "a message needs `text`")),
        }
    }
    Ok(ClientFrame { kind, obj })
}

impl ClientFrame {
    pub fn str(&self, key: &str) -> Option<&str> {
        self.obj.get(key).and_then(Value::as_str)
    }
    pub fn text(&self) -> &str {
        self.str("text").unwrap_or_default()
    }
    /// The client's own id for the message (dedupe of a resend), when it gave a usable one.
    pub fn client_id(&self) -> Option<&str> {
        self.str("id").filter(|id| !id.is_empty() && id.len() <= 100)
    }
    /// `watermark` (or `seq`): the last sequence number the client has seen.
    pub fn watermark(&self) -> Option<i64> {
        self.obj
            .get("watermark")
            .and_then(|w| w.as_i64().or_else(|| w.as_str().and_then(|s| s.parse().ok())))
            .filter(|w| *w >= 0)
    }
    /// The display name from `user_profile` (Botkit's `identify`/`hello`), if any.
    pub fn profile_name(&self) -> Option<String> {
        let p = self.obj.get("user_profile")?.as_object()?;
        ["name", "full_name", "first_name"]
            .iter()
            .find_map(|k| p.get(*k).and_then(Value::as_str).filter(|s| !s.is_empty()))
            .map(|s| truncate(s, 80).to_owned())
    }
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Whether an attachment is shown as an image.
fn is_image(a: &Attachment) -> bool {
    if let Some(ct) = &a.content_type {
        return ct.starts_with("image/");
    }
    let path = a.url.split(['?', '#']).next().unwrap_or("").to_ascii_lowercase();
    [".png", ".jpg", ".jpeg", ".gif", ".webp", ".svg"].iter().any(|e| path.ends_with(e))
}

/// A reply as Botkit's client renders it (without `seq`, which the log assigns).
pub fn reply_frame(reply: &Reply, user: &str, id: &str) -> Value {
    let mut f = json!({"type": "message", "text": reply.text, "user": user, "to": user, "id": id});
    if !reply.quick_replies.is_empty() {
        f["quick_replies"] = json!(reply
            .quick_replies
            .iter()
            .map(|q| json!({"title": q.title, "payload": q.payload}))
            .collect::<Vec<_>>());
    }
    if !reply.attachments.is_empty() {
        f["files"] = json!(reply
            .attachments
            .iter()
            .map(|a| {
                let mut file = json!({"url": a.url, "image": is_image(a)});
                if let Some(n) = &a.name {
                    file["name"] = json!(n);
                }
                file
            })
            .collect::<Vec<_>>());
    }
    f
}

/// The user's own message as logged (Botkit's history calls it `message_received`).
pub fn received_entry(text: &str, user: &str, id: &str) -> Value {
    json!({"type": "message_received", "text": text, "user": user, "id": id})
}

/// A logged entry as sent to a client: its body plus `seq`.
pub fn with_seq(mut body: Value, seq: i64) -> Value {
    if let Value::Object(m) = &mut body {
        m.insert("seq".into(), json!(seq));
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;
    use patchbay_channel_core::QuickReply;

    #[test]
    fn frames_are_checked() {
        assert_eq!(parse(b"not json").unwrap_err().code, "bad_json");
        assert_eq!(parse(b"[1]").unwrap_err().code, "bad_frame");
        assert_eq!(parse(br#"{"type":"launch"}"#).unwrap_err().code, "unknown_type");
        assert_eq!(parse(br#"{"type":"message"}"#).unwrap_err().code, "bad_frame");
        assert_eq!(parse(br#"{"type":"message","text":"  "}"#).unwrap_err().code, "empty_message");
        let f = parse(br#"{"type":"welcome_back","user":"x","watermark":"7"}"#).unwrap();
        assert_eq!(f.kind, ClientKind::Connect);
        assert_eq!(f.watermark(), Some(7));
    }

    #[test]
    fn replies_render_as_botkit_messages() {
        let r = Reply {
            text: "look".into(),
            quick_replies: vec![QuickReply { title: "Yes".into(), payload: "yes".into() }],
            attachments: vec![
                Attachment { url: "https://x.example/a.GIF?x=1".into(), name: None, content_type: None },
                Attachment { url: "https://x.example/doc".into(), name: Some("doc".into()), content_type: None },
            ],
            thread: None,
        };
        let f = reply_frame(&r, "u1", "r1");
        assert_eq!(f["type"], "message");
        assert_eq!(f["quick_replies"][0]["payload"], "yes");
        assert_eq!(f["files"][0]["image"], true);
        assert_eq!(f["files"][1]["image"], false);
        assert_eq!(with_seq(f, 4)["seq"], 4);
    }
}
