//! Receiving Mattermost outgoing webhooks.
//!
//! Mattermost POSTs either JSON (`timestamp` in milliseconds, a number) or a form
//! (`timestamp` in seconds), with twelve fields; `file_ids` is one comma-joined string. The
//! token travels in the body, so the body is read (bounded) and parsed, and the token is
//! compared in constant time before anything else happens with the message.

use crate::settings::{ReplyMode, Settings};
use actix_web::{http::StatusCode, web, HttpRequest, HttpResponse};
use patchbay_channel_core::{
    channel::{error_response, read_body},
    HookCtx, Inbound, Reply, User, WaitOutcome,
};
use serde::Deserialize;
use std::collections::HashMap;

/// The outgoing webhook payload, as either encoding carries it.
#[derive(Debug, Default, Deserialize)]
pub struct OutgoingPayload {
    #[serde(default)]
    pub token: String,
    #[serde(default)]
    pub team_id: String,
    #[serde(default)]
    pub team_domain: String,
    #[serde(default)]
    pub channel_id: String,
    #[serde(default)]
    pub channel_name: String,
    #[serde(default)]
    pub timestamp: Option<Timestamp>,
    #[serde(default)]
    pub user_id: String,
    #[serde(default)]
    pub user_name: String,
    #[serde(default)]
    pub post_id: String,
    #[serde(default)]
    pub text: String,
    #[serde(default)]
    pub trigger_word: String,
    #[serde(default)]
    pub file_ids: String,
    /// Not sent by Mattermost (webhook posts never fire outgoing webhooks), but bridges that
    /// relay posts may add it: a webhook's own post is never answered.
    #[serde(default)]
    pub from_webhook: Option<String>,
    #[serde(default)]
    pub props: Option<serde_json::Value>,
}

/// JSON carries milliseconds as a number (old docs show seconds as a string); the form
/// carries seconds.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Timestamp {
    Number(i64),
    Text(String),
}

impl OutgoingPayload {
    fn timestamp_ms(&self, form: bool) -> Option<i64> {
        let (v, seconds) = match self.timestamp.as_ref()? {
            Timestamp::Number(n) => (*n, form),
            Timestamp::Text(s) => (s.trim().parse::<i64>().ok()?, true),
        };
        // A value below 10^11 cannot be milliseconds since 1973: it is seconds.
        Some(if seconds || v < 100_000_000_000 { v * 1000 } else { v })
    }

    fn from_webhook(&self) -> bool {
        let flag = |v: Option<&serde_json::Value>| match v {
            Some(serde_json::Value::String(s)) => s == "true",
            Some(serde_json::Value::Bool(b)) => *b,
            _ => false,
        };
        self.from_webhook.as_deref() == Some("true")
            || flag(self.props.as_ref().and_then(|p| p.get("from_webhook")))
    }

    fn raw(&self, timestamp_ms: Option<i64>) -> serde_json::Value {
        serde_json::json!({
            "team_id": self.team_id,
            "team_domain": self.team_domain,
            "channel_id": self.channel_id,
            "channel_name": self.channel_name,
            "timestamp": timestamp_ms,
            "user_id": self.user_id,
            "user_name": self.user_name,
            "post_id": self.post_id,
            "text": self.text,
            "trigger_word": self.trigger_word,
            "file_ids": self.file_ids.split(',').filter(|s| !s.is_empty()).collect::<Vec<_>>(),
        })
    }
}

/// Parses the body by its media type. Errors name the field or the header.
pub fn parse(content_type: &str, body: &[u8]) -> Result<(OutgoingPayload, bool), (String, String)> {
    let media = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    match media.as_str() {
        "application/json" => patchbay_channel_core::parse_json_body::<OutgoingPayload>(body)
            .map(|p| (p, false))
            .map_err(|e| (e.field, e.message)),
        "application/x-www-form-urlencoded" => {
            let fields: HashMap<String, String> = serde_urlencoded::from_bytes(body)
                .map_err(|e| ("body".to_owned(), format!("the body is not a form: {e}")))?;
            let get = |k: &str| fields.get(k).cloned().unwrap_or_default();
            Ok((
                OutgoingPayload {
                    token: get("token"),
                    team_id: get("team_id"),
                    team_domain: get("team_domain"),
                    channel_id: get("channel_id"),
                    channel_name: get("channel_name"),
                    timestamp: fields.get("timestamp").map(|t| Timestamp::Text(t.clone())),
                    user_id: get("user_id"),
                    user_name: get("user_name"),
                    post_id: get("post_id"),
                    text: get("text"),
                    trigger_word: get("trigger_word"),
                    file_ids: get("file_ids"),
                    from_webhook: fields.get("from_webhook").cloned(),
                    props: None,
                },
                true,
            ))
        }
        other => Err((
            "Content-Type".to_owned(),
            format!(
                "`{other}` is not an outgoing webhook encoding: Mattermost sends application/json or application/x-www-form-urlencoded"
            ),
        )),
    }
}

/// The text the assistant sees: the trigger word removed, with the separator after it.
pub fn strip_trigger(text: &str, trigger_word: &str) -> String {
    if trigger_word.is_empty() {
        return text.trim().to_owned();
    }
    match text.trim_start().strip_prefix(trigger_word) {
        Some(rest) => rest.trim_start_matches([':', ',']).trim().to_owned(),
        None => text.trim().to_owned(),
    }
}

fn empty_ok() -> HttpResponse {
    HttpResponse::Ok().finish()
}

pub async fn handle(settings: &Settings, ctx: HookCtx, req: HttpRequest, body: web::Payload) -> HttpResponse {
    if req.method() != actix_web::http::Method::POST || !ctx.subpath.is_empty() {
        return error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "Mattermost outgoing webhooks POST to the callback URL",
            None,
        );
    }
    let bytes = match read_body(body, ctx.body_limit).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let content_type = req
        .headers()
        .get(actix_web::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let parsed = parse(content_type, &bytes);
    // The token first, in constant time: nothing about an unauthenticated request is
    // reported beyond "wrong token", not even which field failed to parse.
    let Some(expected) = &settings.outgoing_token else {
        return error_response(
            StatusCode::UNAUTHORIZED,
            "no_token_configured",
            "this channel has no outgoing_token yet: paste the outgoing webhook's token into patchbay",
            Some("token"),
        );
    };
    let token = parsed.as_ref().map(|(p, _)| p.token.as_str()).unwrap_or("");
    if !expected.matches(token) {
        return error_response(
            StatusCode::UNAUTHORIZED,
            "bad_token",
            "the token does not match this channel's outgoing_token; copy the outgoing webhook's token into patchbay",
            Some("token"),
        );
    }
    let (payload, form) = match parsed {
        Ok(p) => p,
        Err((field, message)) => {
            return error_response(StatusCode::BAD_REQUEST, "invalid_payload", &message, Some(&field))
        }
    };
    if !ctx.enabled {
        return empty_ok();
    }
    if payload.from_webhook() {
        tracing::debug!(channel = %ctx.channel_id, post = %payload.post_id, "ignoring a post created by a webhook");
        return empty_ok();
    }
    for (field, value) in [("post_id", &payload.post_id), ("channel_id", &payload.channel_id)] {
        if value.is_empty() {
            return error_response(
                StatusCode::BAD_REQUEST,
                "invalid_payload",
                &format!("`{field}` is missing: this does not look like a Mattermost outgoing webhook"),
                Some(field),
            );
        }
    }
    ctx.status.event_seen();
    let timestamp_ms = payload.timestamp_ms(form);
    let inbound = Inbound {
        event_id: payload.post_id.clone(),
        platform_conversation: payload.channel_id.clone(),
        thread: None,
        user: User {
            id: payload.user_id.clone(),
            name: payload.user_name.clone(),
        },
        text: strip_trigger(&payload.text, &payload.trigger_word),
        addressed: true,
        route: serde_json::json!({
            "channel_name": payload.channel_name,
            "channel_id": payload.channel_id,
            "team_id": payload.team_id,
            "post_id": payload.post_id,
            "trigger_word": payload.trigger_word,
        }),
        raw: payload.raw(timestamp_ms).into(),
        received_at: patchbay_channel_core::now_ms(),
    };
    let unavailable = |e: patchbay_channel_core::InboxError| {
        error_response(StatusCode::SERVICE_UNAVAILABLE, "inbox_unavailable", &e.to_string(), None)
    };
    match settings.reply_mode {
        ReplyMode::IncomingWebhook => match ctx.inbox.accept(&ctx.channel_id, inbound).await {
            Ok(_) => empty_ok(),
            Err(e) => unavailable(e),
        },
        ReplyMode::Inline => {
            // With an incoming webhook, a late reply can still be delivered: the message is
            // queued durably. Without one, only this response can carry the reply.
            let answered = if settings.incoming_webhook_url.is_some() {
                ctx.inbox.accept_and_wait(&ctx.channel_id, inbound, settings.inline_timeout).await
            } else {
                ctx.inbox.answer_in_request(&ctx.channel_id, inbound, settings.inline_timeout).await
            };
            match answered {
                Ok(WaitOutcome::Replies(replies)) if !replies.is_empty() => {
                    HttpResponse::Ok().json(inline_response(settings, &replies))
                }
                Ok(_) => empty_ok(),
                Err(e) => unavailable(e),
            }
        }
    }
}

/// The inline answer: all replies in one post (Mattermost splits a long one itself).
pub fn inline_response(settings: &Settings, replies: &[Reply]) -> serde_json::Value {
    let text = replies.iter().map(crate::incoming::render).collect::<Vec<_>>().join("\n\n");
    let mut body = serde_json::json!({ "text": text });
    if let Some(u) = &settings.username {
        body["username"] = u.clone().into();
    }
    if let Some(i) = &settings.icon_url {
        body["icon_url"] = i.clone().into();
    }
    if settings.reply_in_thread {
        body["response_type"] = "comment".into();
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_json_capture() {
        // The real capture from Mattermost 6.3.7 (reference sheet §1.3).
        let body = br#"{"token":"rgfe9bc9j3gste59mbyrmzk33w","team_id":"en76g45etjn98c6eyubfptn16o","team_domain":"awesome-team","channel_id":"yuko5hzu7jdcineenpafttbbzw","channel_name":"notify-test-channel","timestamp":1649958010052,"user_id":"a6khpd5m77d3de46xw599mp8by","user_name":"e.musk","post_id":"g19wczuo1byxz86fddtxcin5ec","text":"@notify subscribe TOPIC","trigger_word":"@notify","file_ids":""}"#;
        let (p, form) = parse("application/json", body).unwrap();
        assert!(!form);
        assert_eq!(p.post_id, "g19wczuo1byxz86fddtxcin5ec");
        assert_eq!(p.timestamp_ms(form), Some(1649958010052));
        assert_eq!(strip_trigger(&p.text, &p.trigger_word), "subscribe TOPIC");
    }

    #[test]
    fn parses_the_form_vector() {
        // Go's url.Values.Encode of the sheet's §8.1 struct: seconds in the form.
        let body = b"channel_id=ChannelId&channel_name=ChannelName&file_ids=FileIds&post_id=PostId&team_domain=TeamDomain&team_id=TeamId&text=Text&timestamp=123&token=Token&trigger_word=TriggerWord&user_id=UserId&user_name=UserName";
        let (p, form) = parse("application/x-www-form-urlencoded; charset=utf-8", body).unwrap();
        assert!(form);
        assert_eq!(p.token, "Token");
        assert_eq!(p.timestamp_ms(form), Some(123_000));
        assert_eq!(p.file_ids, "FileIds");
    }

    #[test]
    fn form_escapes_are_decoded() {
        let body = b"text=%40bot+hello%2C+world&trigger_word=%40bot&token=t&post_id=p&channel_id=c";
        let (p, _) = parse("Application/X-WWW-Form-Urlencoded", body).unwrap();
        assert_eq!(p.text, "@bot hello, world");
        assert_eq!(strip_trigger(&p.text, &p.trigger_word), "hello, world");
    }

    #[test]
    fn trigger_separators_are_removed() {
        assert_eq!(strip_trigger("@bot: hi", "@bot"), "hi");
        assert_eq!(strip_trigger("@bot, hi there", "@bot"), "hi there");
        assert_eq!(strip_trigger("hello", ""), "hello");
        assert_eq!(strip_trigger("other words", "@bot"), "other words");
    }

    #[test]
    fn unknown_media_type_names_the_header() {
        let e = parse("text/plain", b"x").unwrap_err();
        assert_eq!(e.0, "Content-Type");
    }

    #[test]
    fn old_string_seconds_are_accepted() {
        let (p, form) = parse("application/json", br#"{"timestamp":"1445532266","post_id":"p"}"#).unwrap();
        assert_eq!(p.timestamp_ms(form), Some(1_445_532_266_000));
    }
}
