//! Datafeed events (`V4Event`) to inbound messages: only `MESSAGESENT`, never the bot's own
//! (the datafeed carries those too), in IMs always, elsewhere (rooms, multi-party IMs, wall
//! posts) only when the bot is @mentioned.

use crate::presentation::to_text;
use patchbay_channel_core::{now_ms, Inbound, RawPayload, User};
use serde_json::Value;

/// Who the bot is (`GET /pod/v2/sessioninfo`).
#[derive(Clone, Debug, PartialEq)]
pub struct BotInfo {
    pub id: String,
    pub username: String,
    pub display_name: String,
}

impl BotInfo {
    pub fn from_sessioninfo(v: &Value) -> Option<BotInfo> {
        let id = match v.get("id")? {
            Value::Number(n) => n.to_string(),
            Value::String(s) => s.clone(),
            _ => return None,
        };
        let username = v.get("username").and_then(|u| u.as_str()).unwrap_or_default().to_owned();
        let display_name = v.get("displayName").and_then(|u| u.as_str()).unwrap_or(&username).to_owned();
        Some(BotInfo { id, username, display_name })
    }
}

/// What became of an event.
#[derive(Debug, PartialEq)]
pub enum Decision {
    Answer(Box<Inbound>),
    Ignore(&'static str),
}

fn id_string(v: &Value) -> String {
    match v {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        _ => String::new(),
    }
}

/// Takes the event by value: an answered event becomes the inbound's `raw` as it is (no copy).
pub fn decide(event: Value, bot: &BotInfo) -> Decision {
    if event.get("type").and_then(|t| t.as_str()) != Some("MESSAGESENT") {
        return Decision::Ignore("not a MESSAGESENT event");
    }
    let initiator = id_string(&event["initiator"]["user"]["userId"]);
    if initiator == bot.id {
        return Decision::Ignore("the bot's own message");
    }
    let msg = &event["payload"]["messageSent"]["message"];
    let message_id = msg.get("messageId").and_then(|m| m.as_str()).or_else(|| event.get("messageId").and_then(|m| m.as_str()));
    let Some(message_id) = message_id.filter(|m| !m.is_empty()).map(str::to_owned) else {
        return Decision::Ignore("a message without a messageId");
    };
    let stream_id = msg["stream"]["streamId"].as_str().unwrap_or_default().to_owned();
    if stream_id.is_empty() {
        return Decision::Ignore("a message without a stream");
    }
    let stream_type = msg["stream"]["streamType"].as_str().unwrap_or("ROOM").to_owned();
    let parsed = to_text(msg["message"].as_str().unwrap_or_default(), msg["data"].as_str().unwrap_or_default(), &bot.id);
    let im = stream_type == "IM";
    if !im && !parsed.mentions_bot {
        return Decision::Ignore("a room message that does not mention the bot");
    }
    let user = &msg["user"];
    let user_id = match id_string(&user["userId"]) {
        s if s.is_empty() => initiator,
        s => s,
    };
    let name = user["displayName"].as_str().or(user["username"].as_str()).unwrap_or_default().to_owned();
    Decision::Answer(Box::new(Inbound {
        route: serde_json::json!({
            "stream_id": stream_id,
            "stream_type": stream_type,
            "message_id": message_id,
            "user_id": user_id,
        }),
        event_id: message_id,
        platform_conversation: stream_id,
        thread: None,
        user: User { id: user_id, name },
        text: parsed.text,
        addressed: true,
        raw: RawPayload::new(&event),
        received_at: now_ms(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn bot() -> BotInfo {
        BotInfo { id: "100".into(), username: "patchbay-bot".into(), display_name: "Patchbay".into() }
    }

    fn event(from: i64, stream_type: &str, ml: &str, data: &str) -> Value {
        json!({"id": "ev1", "messageId": "m1", "timestamp": 1, "type": "MESSAGESENT",
               "initiator": {"user": {"userId": from, "displayName": "Alice"}},
               "payload": {"messageSent": {"message": {
                   "messageId": "m1", "timestamp": 1, "message": ml, "data": data,
                   "user": {"userId": from, "displayName": "Alice", "username": "alice"},
                   "stream": {"streamId": "s+1/x==", "streamType": stream_type}}}}})
    }

    const MENTION: &str = r#"{"0":{"type":"com.symphony.user.mention","id":[{"type":"com.symphony.user.userId","value":100}]}}"#;

    #[test]
    fn ims_are_always_answered() {
        let Decision::Answer(i) = decide(event(7, "IM", "<div>hello</div>", ""), &bot()) else { panic!() };
        assert_eq!((i.event_id.as_str(), i.platform_conversation.as_str(), i.text.as_str()), ("m1", "s+1/x==", "hello"));
        assert_eq!(i.user, User { id: "7".into(), name: "Alice".into() });
        assert_eq!(i.route["stream_type"], "IM");
    }

    #[test]
    fn rooms_only_when_mentioned_and_never_the_bots_own() {
        assert_eq!(decide(event(7, "ROOM", "<div>hello</div>", ""), &bot()), Decision::Ignore("a room message that does not mention the bot"));
        let ml = r#"<div><span class="entity" data-entity-id="0">@Patchbay</span> hello</div>"#;
        let Decision::Answer(i) = decide(event(7, "ROOM", ml, MENTION), &bot()) else { panic!() };
        assert_eq!(i.text, "hello");
        assert_eq!(decide(event(100, "IM", "<div>echo: hi</div>", ""), &bot()), Decision::Ignore("the bot's own message"));
        let mut other = event(7, "IM", "<div>x</div>", "");
        other["type"] = "USERJOINEDROOM".into();
        assert!(matches!(decide(other, &bot()), Decision::Ignore(_)));
    }
}
