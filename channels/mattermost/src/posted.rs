//! `posted` events (and posts fetched over REST to catch up) turned into inbound messages,
//! or ignored, by the bot's rules: its own posts and webhook posts never; direct messages
//! always; channel posts when they mention the bot (or always with `respond_to = "all"`),
//! within the team and channel allow-lists.

use crate::rest::{ChannelInfo, Post};
use crate::settings::{RespondTo, WsSettings};
use patchbay_channel_core::{Inbound, User};
use std::collections::HashMap;

/// Who the bot is, learnt from `GET /api/v4/users/me`.
#[derive(Clone, Debug)]
pub struct BotIdentity {
    pub id: String,
    pub username: String,
}

/// Where a post was made, from the event's data or the bot's channel list.
#[derive(Clone, Debug, Default)]
pub struct Where {
    /// `O`, `P`, `D`, `G`.
    pub channel_type: String,
    pub channel_name: String,
    /// `""` for direct and group messages.
    pub team_id: String,
    /// `@username` as the event names the sender (empty for fetched posts).
    pub sender_name: String,
    /// The event's `mentions` said the bot was mentioned (fetched posts: `None`).
    pub mentioned: Option<bool>,
}

impl Where {
    pub fn from_channel(c: &ChannelInfo) -> Where {
        Where {
            channel_type: c.kind.clone(),
            channel_name: c.name.clone(),
            team_id: c.team_id.clone(),
            sender_name: String::new(),
            mentioned: None,
        }
    }
}

/// A `posted` event's data: the post (a JSON string inside the JSON) and where it was made.
pub fn parse_posted(data: &serde_json::Value, me: &str) -> Option<(Post, Where)> {
    let post: Post = serde_json::from_str(data.get("post")?.as_str()?).ok()?;
    let s = |k: &str| data.get(k).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
    // `mentions` is a JSON-encoded array of user ids (current servers put only the
    // receiving user's id in it).
    let mentioned = data
        .get("mentions")
        .and_then(|v| v.as_str())
        .and_then(|m| serde_json::from_str::<Vec<String>>(m).ok())
        .map(|ids| ids.iter().any(|id| id == me))
        .unwrap_or(false);
    Some((
        post,
        Where {
            channel_type: s("channel_type"),
            channel_name: s("channel_name"),
            team_id: s("team_id"),
            sender_name: s("sender_name"),
            mentioned: Some(mentioned),
        },
    ))
}

/// The allow-lists and the answering rule, with team names resolved to ids.
#[derive(Clone, Debug, Default)]
pub struct Rules {
    pub respond_to: RespondTo,
    /// Allowed team ids (names resolved); empty: all.
    pub teams: Vec<String>,
    /// Allowed channel ids or names; empty: all.
    pub channels: Vec<String>,
}

impl Rules {
    pub fn new(settings: &WsSettings, team_names: &HashMap<String, String>) -> Rules {
        let teams = settings
            .teams
            .iter()
            .map(|t| team_names.get(t).cloned().unwrap_or_else(|| t.clone()))
            .collect();
        Rules { respond_to: settings.respond_to, teams, channels: settings.channels.clone() }
    }

    /// Whether posts of this channel can ever be answered (saves REST calls when catching up).
    pub fn channel_allowed(&self, channel_id: &str, w: &Where) -> bool {
        if w.channel_type == "D" {
            return true;
        }
        let team_ok = self.teams.is_empty() || w.team_id.is_empty() || self.teams.contains(&w.team_id);
        let channel_ok = self.channels.is_empty() || self.channels.iter().any(|c| c == channel_id || *c == w.channel_name);
        team_ok && channel_ok
    }
}

/// What to do with a post.
#[derive(Debug, PartialEq)]
pub enum Decision {
    Answer(Box<Inbound>),
    Ignore(&'static str),
}

pub fn decide(me: &BotIdentity, rules: &Rules, post: &Post, w: &Where) -> Decision {
    if post.user_id == me.id {
        return Decision::Ignore("the bot's own post");
    }
    if post.prop_true("from_webhook") {
        return Decision::Ignore("a webhook's post");
    }
    if post.post_type.starts_with("system_") {
        return Decision::Ignore("a system message");
    }
    if post.message.trim().is_empty() {
        return Decision::Ignore("no text");
    }
    let direct = w.channel_type == "D";
    if !rules.channel_allowed(&post.channel_id, w) {
        return Decision::Ignore("not in the allowed teams or channels");
    }
    let mentioned = w.mentioned == Some(true) || mentions(&post.message, &me.username);
    if !direct && !mentioned && rules.respond_to == RespondTo::Mentions {
        return Decision::Ignore("does not mention the bot");
    }
    let thread = if post.root_id.is_empty() { post.id.clone() } else { post.root_id.clone() };
    Decision::Answer(Box::new(Inbound {
        event_id: post.id.clone(),
        platform_conversation: post.channel_id.clone(),
        thread: Some(thread.clone()),
        user: User { id: post.user_id.clone(), name: w.sender_name.trim_start_matches('@').to_owned() },
        text: strip_mention(&post.message, &me.username),
        addressed: direct || mentioned,
        route: serde_json::json!({
            "channel_id": post.channel_id,
            "root_id": thread,
            "post_id": post.id,
            "channel_type": w.channel_type,
            "team_id": w.team_id,
        }),
        raw: serde_json::json!({
            "post_id": post.id,
            "channel_id": post.channel_id,
            "channel_name": w.channel_name,
            "channel_type": w.channel_type,
            "team_id": w.team_id,
            "root_id": post.root_id,
            "user_id": post.user_id,
            "message": post.message,
            "create_at": post.create_at,
            "props": post.props,
        })
        .into(),
        received_at: patchbay_channel_core::now_ms(),
    }))
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

/// Where `@username` occurs as a whole mention (not `@usernamex`, not `x@username`).
fn mention_spans(text: &str, username: &str) -> Vec<(usize, usize)> {
    let needle = format!("@{}", username.to_ascii_lowercase());
    let lower = text.to_ascii_lowercase();
    let mut spans = Vec::new();
    let mut from = 0;
    while let Some(i) = lower[from..].find(&needle) {
        let start = from + i;
        let end = start + needle.len();
        let before_ok = lower[..start].chars().next_back().is_none_or(|c| !is_name_char(c) && c != '.');
        let mut after = lower[end..].chars();
        let after_ok = match after.next() {
            None => true,
            Some('.') => after.next().is_none_or(|c| !is_name_char(c)),
            Some(c) => !is_name_char(c),
        };
        if before_ok && after_ok {
            spans.push((start, end));
        }
        from = end;
    }
    spans
}

pub fn mentions(text: &str, username: &str) -> bool {
    !username.is_empty() && !mention_spans(text, username).is_empty()
}

/// The text without the bot's @mentions (and a `:` or `,` right after a leading one).
pub fn strip_mention(text: &str, username: &str) -> String {
    if username.is_empty() {
        return text.trim().to_owned();
    }
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for (s, e) in mention_spans(text, username) {
        out.push_str(&text[last..s]);
        last = e;
    }
    out.push_str(&text[last..]);
    let out = out.trim_start().trim_start_matches([':', ',']).trim();
    // Two spaces left where a mention was in the middle become one.
    let mut collapsed = String::with_capacity(out.len());
    let mut prev_space = false;
    for c in out.chars() {
        if c == ' ' && prev_space {
            continue;
        }
        prev_space = c == ' ';
        collapsed.push(c);
    }
    collapsed
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn me() -> BotIdentity {
        BotIdentity { id: "botid".into(), username: "helpdesk".into() }
    }

    fn post(user: &str, message: &str, root: &str) -> Post {
        Post {
            id: "p1".into(),
            create_at: 1,
            user_id: user.into(),
            channel_id: "c1".into(),
            root_id: root.into(),
            message: message.into(),
            ..Default::default()
        }
    }

    fn open() -> Where {
        Where { channel_type: "O".into(), channel_name: "town-square".into(), team_id: "t1".into(), sender_name: "@alice".into(), mentioned: Some(false) }
    }

    #[test]
    fn parses_the_double_encoded_post() {
        let data = json!({
            "channel_type": "O", "channel_name": "town-square", "team_id": "t1", "sender_name": "@alice",
            "mentions": "[\"botid\"]",
            "post": "{\"id\":\"p1\",\"create_at\":5,\"user_id\":\"u1\",\"channel_id\":\"c1\",\"root_id\":\"\",\"message\":\"@helpdesk hi\",\"type\":\"\",\"props\":{}}"
        });
        let (p, w) = parse_posted(&data, "botid").unwrap();
        assert_eq!(p.message, "@helpdesk hi");
        assert_eq!(w.mentioned, Some(true));
        assert!(parse_posted(&json!({"post": {"id": "x"}}), "botid").is_none(), "post must be a string");
    }

    #[test]
    fn own_and_webhook_posts_are_ignored() {
        let rules = Rules::default();
        assert_eq!(decide(&me(), &rules, &post("botid", "@helpdesk hi", ""), &open()), Decision::Ignore("the bot's own post"));
        let mut p = post("u1", "@helpdesk hi", "");
        p.props.insert("from_webhook".into(), "true".into());
        assert_eq!(decide(&me(), &rules, &p, &open()), Decision::Ignore("a webhook's post"));
    }

    #[test]
    fn channels_need_a_mention_unless_all_dms_always() {
        let rules = Rules::default();
        assert!(matches!(decide(&me(), &rules, &post("u1", "hello", ""), &open()), Decision::Ignore(_)));
        let Decision::Answer(i) = decide(&me(), &rules, &post("u1", "@helpdesk: where is it?", ""), &open()) else { panic!() };
        assert_eq!(i.text, "where is it?");
        assert_eq!(i.thread.as_deref(), Some("p1"), "a top-level post starts its thread");
        assert_eq!(i.user.name, "alice");
        let all = Rules { respond_to: RespondTo::All, ..Default::default() };
        assert!(matches!(decide(&me(), &all, &post("u1", "hello", ""), &open()), Decision::Answer(_)));
        let dm = Where { channel_type: "D".into(), ..open() };
        let Decision::Answer(i) = decide(&me(), &rules, &post("u1", "hello", "root9"), &dm) else { panic!() };
        assert!(i.addressed);
        assert_eq!(i.thread.as_deref(), Some("root9"), "a reply stays in its thread");
    }

    #[test]
    fn allow_lists() {
        let rules = Rules { teams: vec!["t2".into()], ..Default::default() };
        assert_eq!(decide(&me(), &rules, &post("u1", "@helpdesk hi", ""), &open()), Decision::Ignore("not in the allowed teams or channels"));
        let rules = Rules { channels: vec!["town-square".into()], ..Default::default() };
        assert!(matches!(decide(&me(), &rules, &post("u1", "@helpdesk hi", ""), &open()), Decision::Answer(_)));
        let rules = Rules { channels: vec!["other".into()], ..Default::default() };
        let dm = Where { channel_type: "D".into(), team_id: String::new(), ..open() };
        assert!(matches!(decide(&me(), &rules, &post("u1", "hi", ""), &dm), Decision::Answer(_)), "DMs are always answered");
    }

    #[test]
    fn mentions_are_whole_names() {
        assert!(mentions("hey @HelpDesk, help", "helpdesk"));
        assert!(mentions("@helpdesk.", "helpdesk"));
        assert!(!mentions("@helpdesk2 hi", "helpdesk"));
        assert!(!mentions("mail me@helpdesk", "helpdesk"));
        assert!(!mentions("@helpdesk.bot hi", "helpdesk"));
        assert_eq!(strip_mention("@helpdesk, reset my password", "helpdesk"), "reset my password");
        assert_eq!(strip_mention("can @helpdesk help me", "helpdesk"), "can help me");
        assert_eq!(strip_mention("no mention", "helpdesk"), "no mention");
    }
}
