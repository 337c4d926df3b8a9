//! Which Slack events reach the assistant, and how they become [`Inbound`] messages. Shared by
//! the Events API hook and the Socket Mode connector (an `events_api` envelope's payload is
//! the same `event_callback` body).
//!
//! **Dedupe.** The inbound's `event_id` is `{ts}:{team}:{channel}` — the message's identity —
//! not Slack's `event_id`. A retried delivery carries the same message, and a mention that
//! arrives both as `app_mention` and as `message` (two events, two Slack `event_id`s) does too,
//! so the inbox's one dedupe key answers each message once. Slack's own `event_id` is kept in
//! the route and the raw payload. The `ts` comes first because it is a time: new keys then
//! sort after the ones already in the store's dedupe b-tree and land on its last page,
//! where `{team}:{channel}:…` put each one on a random leaf of its own (4 KiB more written
//! per event when events are spread over many channels).

use crate::settings::RespondTo;
use patchbay_channel_core::{Inbound, User};
use serde_json::Value;

/// Who the bot is in one workspace (`auth.test`, or an OAuth install).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Identity {
    pub team_id: String,
    pub team: String,
    /// The bot user (`U…`), what mentions name.
    pub user_id: String,
    pub user: String,
    /// The bot (`B…`), what the bot's own messages carry.
    pub bot_id: Option<String>,
}

/// What to do with one `event_callback`.
#[derive(Debug, PartialEq)]
pub enum Decision {
    Answer(Box<Inbound>),
    Ignore(&'static str),
    /// `app_uninstalled`: forget the workspace's tokens.
    Uninstalled { team_id: String },
    /// `tokens_revoked`: forget the workspace's bot token if the bot's user is among them.
    TokensRevoked { team_id: String, bot_users: Vec<String> },
}

pub struct Rules<'a> {
    pub respond_to: RespondTo,
    /// Only this workspace's events are answered, when set.
    pub team_id: Option<&'a str>,
}

fn s<'a>(v: &'a Value, k: &str) -> Option<&'a str> {
    v.get(k).and_then(Value::as_str).filter(|x| !x.is_empty())
}

/// The team an `event_callback` belongs to.
pub fn team_of(body: &Value) -> &str {
    s(body, "team_id")
        .or_else(|| body.get("authorizations").and_then(|a| a.get(0)).and_then(|a| s(a, "team_id")))
        .unwrap_or("")
}

/// Decides on an `event_callback` body. `identity` is the bot of the event's workspace, when
/// known; without it the bot's own messages are still recognised by their `bot_id`.
pub fn decide(body: &Value, rules: &Rules, identity: Option<&Identity>) -> Decision {
    let team = team_of(body).to_owned();
    let Some(event) = body.get("event").filter(|e| e.is_object()) else {
        return Decision::Ignore("an event_callback without an event");
    };
    let kind = s(event, "type").unwrap_or("");
    match kind {
        "app_uninstalled" => return Decision::Uninstalled { team_id: team },
        "tokens_revoked" => {
            let bot_users = event
                .pointer("/tokens/bot")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect())
                .unwrap_or_default();
            return Decision::TokensRevoked { team_id: team, bot_users };
        }
        "app_mention" | "message" => {}
        _ => return Decision::Ignore("an event type patchbay does not answer"),
    }
    if let Some(only) = rules.team_id {
        if team != only {
            return Decision::Ignore("an event of another workspace than team_id");
        }
    }
    match s(event, "subtype") {
        None | Some("file_share") | Some("thread_broadcast") => {}
        Some("bot_message") => return Decision::Ignore("a bot_message"),
        Some(_) => return Decision::Ignore("a message subtype that is not a new message (edit, join, topic, …)"),
    }
    if event.get("hidden").and_then(Value::as_bool) == Some(true) {
        return Decision::Ignore("a hidden message");
    }
    // Loop safety: our own messages never come back to the assistant, and neither do other
    // bots' (two bots answering each other would never stop).
    let user = s(event, "user").unwrap_or("");
    if let Some(me) = identity {
        if user == me.user_id || (me.bot_id.is_some() && s(event, "bot_id") == me.bot_id.as_deref()) {
            return Decision::Ignore("the bot's own message");
        }
    }
    if event.get("bot_id").is_some_and(|b| !b.is_null()) || event.get("bot_profile").is_some_and(|b| !b.is_null()) {
        return Decision::Ignore("a message of a bot");
    }
    let (Some(channel), Some(ts)) = (s(event, "channel"), s(event, "ts")) else {
        return Decision::Ignore("a message without channel or ts");
    };
    if user.is_empty() {
        return Decision::Ignore("a message without a user");
    }
    let text = s(event, "text").unwrap_or("");
    let bot_user = identity.map(|i| i.user_id.as_str()).filter(|u| !u.is_empty());
    let direct = s(event, "channel_type") == Some("im") || channel.starts_with('D');
    let mentioned = kind == "app_mention" || bot_user.is_some_and(|u| mentions(text, u));
    if kind == "message" && !direct && !mentioned && rules.respond_to == RespondTo::Mentions {
        return Decision::Ignore("a message in a channel that does not mention the bot");
    }
    let thread_ts = s(event, "thread_ts").unwrap_or(ts);
    let mut raw = body.clone();
    if let Some(o) = raw.as_object_mut() {
        // The deprecated verification token: a credential, not content.
        o.remove("token");
    }
    let slack_event_id = s(body, "event_id").unwrap_or("");
    Decision::Answer(Box::new(Inbound {
        event_id: format!("{ts}:{team}:{channel}"),
        platform_conversation: channel.to_owned(),
        thread: Some(thread_ts.to_owned()),
        user: User { id: user.to_owned(), name: String::new() },
        text: unescape(&strip_mention(text, bot_user, kind == "app_mention")),
        addressed: mentioned || direct,
        route: serde_json::json!({
            "team_id": team,
            "channel": channel,
            "thread_ts": thread_ts,
            "ts": ts,
            "event_id": slack_event_id,
            "event_type": kind,
        }),
        raw: raw.into(),
        received_at: patchbay_channel_core::now_ms(),
    }))
}

/// Whether `text` mentions `user` (`<@U123>` or `<@U123|name>`).
pub fn mentions(text: &str, user: &str) -> bool {
    text.contains(&format!("<@{user}>")) || text.contains(&format!("<@{user}|"))
}

/// Removes the bot's mentions (and, for an `app_mention` whose bot is not known yet, the
/// leading mention, which is the one that triggered it), and the separator after a leading one.
pub fn strip_mention(text: &str, bot_user: Option<&str>, leading_any: bool) -> String {
    let mut out = text.to_owned();
    if let Some(u) = bot_user {
        for token in mention_tokens(text).into_iter().filter(|t| mention_user(t) == u) {
            out = out.replace(&token, "");
        }
    } else if leading_any {
        let trimmed = out.trim_start();
        if let Some(first) = mention_tokens(trimmed).into_iter().next().filter(|t| trimmed.starts_with(t.as_str())) {
            out = trimmed[first.len()..].to_owned();
        }
    }
    let out = out.trim_start().trim_start_matches([':', ',']).trim();
    // Mentions removed from the middle leave double spaces.
    let mut clean = String::with_capacity(out.len());
    let mut prev_space = false;
    for c in out.chars() {
        if c == ' ' && prev_space {
            continue;
        }
        prev_space = c == ' ';
        clean.push(c);
    }
    clean
}

fn mention_tokens(text: &str) -> Vec<String> {
    let mut v = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("<@") {
        let Some(end) = rest[i..].find('>') else { break };
        v.push(rest[i..i + end + 1].to_owned());
        rest = &rest[i + end + 1..];
    }
    v
}

fn mention_user(token: &str) -> &str {
    let inner = token.trim_start_matches("<@").trim_end_matches('>');
    inner.split('|').next().unwrap_or("")
}

/// Slack escapes `&`, `<` and `>` in message text.
pub fn unescape(text: &str) -> String {
    text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn me() -> Identity {
        Identity { team_id: "T1".into(), team: "Acme".into(), user_id: "UBOT".into(), user: "helpdesk".into(), bot_id: Some("BBOT".into()) }
    }

    fn rules() -> Rules<'static> {
        Rules { respond_to: RespondTo::Mentions, team_id: None }
    }

    fn callback(event: Value) -> Value {
        json!({"type": "event_callback", "token": "verif", "team_id": "T1", "api_app_id": "A1", "event_id": "Ev1", "event_time": 1, "event": event})
    }

    fn answer(d: Decision) -> Inbound {
        match d {
            Decision::Answer(i) => *i,
            other => panic!("not answered: {other:?}"),
        }
    }

    #[test]
    fn a_mention_and_its_message_copy_share_one_key() {
        let mention = callback(json!({"type": "app_mention", "user": "U2", "text": "<@UBOT> is it a river?", "ts": "1515449522.000016", "channel": "C1", "event_ts": "1515449522.000016"}));
        let mut message = callback(json!({"type": "message", "channel_type": "channel", "user": "U2", "text": "<@UBOT> is it a river?", "ts": "1515449522.000016", "channel": "C1"}));
        message["event_id"] = json!("Ev2");
        let a = answer(decide(&mention, &rules(), Some(&me())));
        let b = answer(decide(&message, &rules(), Some(&me())));
        assert_eq!(a.event_id, "1515449522.000016:T1:C1");
        assert_eq!(a.event_id, b.event_id);
        assert_eq!(a.text, "is it a river?");
        assert_eq!(a.thread.as_deref(), Some("1515449522.000016"));
        assert_eq!(a.route["event_id"], "Ev1");
        assert!(a.raw.to_value().get("token").is_none(), "the verification token is not passed on");
        assert!(a.addressed);
    }

    #[test]
    fn threads_answer_in_the_parent() {
        let e = callback(json!({"type": "app_mention", "user": "U2", "text": "<@UBOT|helpdesk> more", "ts": "2.0", "thread_ts": "1.0", "channel": "C1"}));
        let i = answer(decide(&e, &rules(), None));
        assert_eq!(i.route["thread_ts"], "1.0");
        assert_eq!(i.thread.as_deref(), Some("1.0"));
        assert_eq!(i.text, "more", "the leading mention is stripped even before auth.test answered");
    }

    #[test]
    fn loops_and_noise_are_ignored() {
        let own = callback(json!({"type": "message", "user": "UBOT", "bot_id": "BBOT", "text": "echo: hi", "ts": "3.0", "channel": "D1", "channel_type": "im"}));
        assert!(matches!(decide(&own, &rules(), Some(&me())), Decision::Ignore(_)));
        let own_unknown = callback(json!({"type": "message", "bot_id": "BBOT", "text": "echo: hi", "ts": "3.0", "channel": "D1", "channel_type": "im"}));
        assert!(matches!(decide(&own_unknown, &rules(), None), Decision::Ignore(_)), "recognised by bot_id before auth.test");
        let bot_message = callback(json!({"type": "message", "subtype": "bot_message", "bot_id": "B9", "text": "x", "ts": "3.0", "channel": "C1"}));
        assert_eq!(decide(&bot_message, &rules(), Some(&me())), Decision::Ignore("a bot_message"));
        let edit = callback(json!({"type": "message", "subtype": "message_changed", "channel": "C1", "ts": "4.0", "hidden": true}));
        assert!(matches!(decide(&edit, &rules(), Some(&me())), Decision::Ignore(_)));
        let chatter = callback(json!({"type": "message", "user": "U2", "text": "lunch?", "ts": "5.0", "channel": "C1", "channel_type": "channel"}));
        assert!(matches!(decide(&chatter, &rules(), Some(&me())), Decision::Ignore(_)));
        let all = Rules { respond_to: RespondTo::All, team_id: None };
        assert!(!answer(decide(&chatter, &all, Some(&me()))).addressed);
        let other_team = Rules { respond_to: RespondTo::All, team_id: Some("T9") };
        assert!(matches!(decide(&chatter, &other_team, Some(&me())), Decision::Ignore(_)));
        let reaction = callback(json!({"type": "reaction_added", "user": "U2"}));
        assert!(matches!(decide(&reaction, &rules(), Some(&me())), Decision::Ignore(_)));
    }

    #[test]
    fn direct_messages_are_answered() {
        let dm = callback(json!({"type": "message", "user": "U2", "text": "a &lt;b&gt; &amp; c", "ts": "6.0", "channel": "D1", "channel_type": "im"}));
        let i = answer(decide(&dm, &rules(), Some(&me())));
        assert_eq!(i.text, "a <b> & c");
        assert!(i.addressed);
    }

    #[test]
    fn uninstall_and_revocation() {
        assert_eq!(decide(&callback(json!({"type": "app_uninstalled"})), &rules(), None), Decision::Uninstalled { team_id: "T1".into() });
        let revoked = callback(json!({"type": "tokens_revoked", "tokens": {"oauth": ["U5"], "bot": ["UBOT"]}}));
        assert_eq!(
            decide(&revoked, &rules(), None),
            Decision::TokensRevoked { team_id: "T1".into(), bot_users: vec!["UBOT".into()] }
        );
    }

    #[test]
    fn mentions_are_stripped() {
        assert_eq!(strip_mention("<@UBOT>: reset my password", Some("UBOT"), true), "reset my password");
        assert_eq!(strip_mention("hey <@UBOT> there <@U2>", Some("UBOT"), true), "hey there <@U2>");
        assert_eq!(strip_mention("<@U7> hi", None, true), "hi");
        assert_eq!(strip_mention("<@U7> hi", None, false), "<@U7> hi");
    }
}
