//! Tests of the fake Mattermost itself (tests/common/fake_mattermost.rs) against the
//! reference sheet (shared/reference/mattermost.md): the §8.1 byte-exact encodings, the
//! §1.1 trigger rules, the §1.3 request headers, the §1.4 response handling (including a
//! `comment` on a reply failing), the §2.2 incoming-webhook status matrix, the §2.4 split at
//! 16383 runes, and webhook posts never firing outgoing webhooks.

#[path = "common/fake_mattermost.rs"]
mod fake_mattermost;

use fake_mattermost::*;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::time::Duration;

const T: Duration = Duration::from_secs(10);

fn fixture() -> OutgoingPayload {
    OutgoingPayload {
        token: "Token".into(),
        team_id: "TeamId".into(),
        team_domain: "TeamDomain".into(),
        channel_id: "ChannelId".into(),
        channel_name: "ChannelName".into(),
        timestamp: 123000,
        user_id: "UserId".into(),
        user_name: "UserName".into(),
        post_id: "PostId".into(),
        text: "Text".into(),
        trigger_word: "TriggerWord".into(),
        file_ids: "FileIds".into(),
    }
}

const FORM_FIXTURE: &str = "channel_id=ChannelId&channel_name=ChannelName&file_ids=FileIds&post_id=PostId&team_domain=TeamDomain&team_id=TeamId&text=Text&timestamp=123&token=Token&trigger_word=TriggerWord&user_id=UserId&user_name=UserName";
const JSON_FIXTURE: &str = r#"{"token":"Token","team_id":"TeamId","team_domain":"TeamDomain","channel_id":"ChannelId","channel_name":"ChannelName","timestamp":123000,"user_id":"UserId","user_name":"UserName","post_id":"PostId","text":"Text","trigger_word":"TriggerWord","file_ids":"FileIds"}"#;

// ---------------------------------------------------------------------------------------
// Encodings (§8.1, §1.3)
// ---------------------------------------------------------------------------------------

#[test]
fn form_encoding_matches_the_go_fixture_byte_for_byte() {
    assert_eq!(fixture().to_form(), FORM_FIXTURE);
    assert_eq!(fixture().encode(Encoding::Form), FORM_FIXTURE.as_bytes());
}

#[test]
fn json_encoding_matches_the_go_fixture_byte_for_byte() {
    assert_eq!(fixture().to_json(), JSON_FIXTURE);
    assert_eq!(fixture().encode(Encoding::Json), JSON_FIXTURE.as_bytes());
}

#[test]
fn json_strings_are_escaped_as_go_does() {
    let mut s = String::new();
    go_json_string(&mut s, "<a href=\"x\">&amp;</a>\\ \u{2028}\u{2029}\n\r\t\u{8}\u{c}\u{1}\u{1f}\u{7f} é😀/");
    assert_eq!(
        s,
        r#""\u003ca href=\"x\"\u003e\u0026amp;\u003c/a\u003e\\ \u2028\u2029\n\r\t\b\f\u0001\u001f"#.to_owned() + "\u{7f} é😀/\""
    );
    let p = OutgoingPayload { text: "bot <b> & \"q\"".into(), timestamp: -1, ..Default::default() };
    assert!(p.to_json().contains(r#""timestamp":-1,"#));
    assert!(p.to_json().contains(r#""text":"bot \u003cb\u003e \u0026 \"q\"""#));
}

#[test]
fn form_values_are_escaped_and_sorted_as_go_does() {
    assert_eq!(go_query_escape("hello world, @bot ~x_y.z-!*'()+/?:;=&é"), "hello+world%2C+%40bot+~x_y.z-%21%2A%27%28%29%2B%2F%3F%3A%3B%3D%26%C3%A9");
    assert_eq!(go_values_encode(&[("b", "2"), ("a", "1"), ("b", "1")]), "a=1&b=2&b=1");
    // Timestamp in seconds in the form (integer division), milliseconds in JSON.
    let p = OutgoingPayload { timestamp: 1649958010052, ..Default::default() };
    assert!(p.to_form().contains("&timestamp=1649958010&"));
    assert!(p.to_json().contains("\"timestamp\":1649958010052,"));
}

#[test]
fn ids_look_like_mattermost_new_id() {
    let mut seen = BTreeSet::new();
    for _ in 0..200 {
        let id = new_id();
        assert_eq!(id.len(), 26, "{id}");
        assert!(id.bytes().all(|b| b"ybndrfg8ejkmcpqxot1uwisza345h769".contains(&b)), "{id}");
        assert!(is_valid_id(&id));
        seen.insert(id);
    }
    assert_eq!(seen.len(), 200);
}

#[test]
fn control_chars_are_escaped_only_inside_the_listed_keys() {
    let raw = b"{\"text\": \"a\n\tb\", \"other\": \"c\nd\", \"title\":\"x\\\"\ny\"}";
    let esc = escape_control_chars(raw);
    assert_eq!(esc, b"{\"text\": \"a\\n\\tb\", \"other\": \"c\nd\", \"title\":\"x\\\"\\ny\"}".to_vec());
    // The strict decode fails, the retry succeeds.
    let p = decode_incoming_json(b"{\"text\": \"line1\nline2\tend\"}").unwrap();
    assert_eq!(p.text, "line1\nline2\tend");
    let e = decode_incoming_json(b"{\"other\": \"a\nb\", \"text\": \"x\"}").unwrap_err();
    assert_eq!((e.id.as_str(), e.status_code), ("model.incoming_hook.parse_data.app_error", 400));
}

#[test]
fn slack_links_become_markdown() {
    assert_eq!(slack_links_to_markdown("see <https://mattermost.com|Mattermost> now"), "see [Mattermost](https://mattermost.com) now");
    assert_eq!(slack_links_to_markdown("<<a|b> <x> <|y> <a|> 1<2"), "<[b](a) <x> <|y> <a|> 1<2");
}

#[test]
fn split_webhook_post_cuts_on_rune_boundaries() {
    let post = |m: &str| Post {
        id: String::new(),
        create_at: 0,
        user_id: "u".into(),
        channel_id: "c".into(),
        root_id: String::new(),
        message: m.into(),
        post_type: String::new(),
        props: serde_json::Map::from_iter([("k".to_owned(), json!("v"))]),
        priority: None,
    };
    let msgs = |m: &str, max| split_webhook_post(&post(m), max).unwrap().into_iter().map(|p| p.message).collect::<Vec<_>>();
    assert_eq!(msgs("12345678901234567890", 10), ["1234567890", "1234567890"]);
    assert_eq!(msgs("123456789012345678901", 10), ["1234567890", "1234567890", "1"]);
    assert_eq!(msgs("日本語日本語日本語日本語", 10), ["日本語日本語日本語日", "本語"]);
    assert_eq!(msgs("", 10), [""]);
    assert!(split_webhook_post(&post("abc"), 2).unwrap().iter().all(|p| p.props["k"] == "v"));
}

#[test]
fn callback_answers_are_decoded_as_go_does() {
    let r = parse_outgoing_response(br#"{"text": "Hello, World!"}"#).unwrap().unwrap();
    assert_eq!(r.text.as_deref(), Some("Hello, World!"));
    assert!(parse_outgoing_response(b"aaaaaaaa").unwrap_err().starts_with("api.unmarshal_error"));
    assert_eq!(parse_outgoing_response(b"").unwrap(), None);
    assert_eq!(parse_outgoing_response(b" \r\n\t").unwrap(), None);
    assert_eq!(parse_outgoing_response(b"null").unwrap(), Some(OutgoingResponse::default()));
    assert!(parse_outgoing_response(b"\"text\"").is_err());
    assert!(parse_outgoing_response(br#"{"text": 5}"#).is_err());
    // Only the first JSON value is read; keys match case-insensitively; the last one wins.
    let r = parse_outgoing_response(br#"{"TEXT":"a","Response_Type":"comment","text":"b"} trailing"#).unwrap().unwrap();
    assert_eq!((r.text.as_deref(), r.response_type.as_str()), (Some("b"), "comment"));
    // 1 MiB limit: a larger valid answer is cut and fails.
    let big = format!(r#"{{"text":"{}"}}"#, "x".repeat(MAX_INTEGRATION_RESPONSE_SIZE));
    assert!(parse_outgoing_response(big.as_bytes()).is_err());
}

// ---------------------------------------------------------------------------------------
// Outgoing webhooks (§1)
// ---------------------------------------------------------------------------------------

fn hook(urls: &[String], words: &[&str], when: i32) -> OutgoingHook {
    OutgoingHook {
        trigger_words: words.iter().map(|w| w.to_string()).collect(),
        trigger_when: when,
        callback_urls: urls.to_vec(),
        ..Default::default()
    }
}

#[tokio::test]
async fn outgoing_requests_carry_mattermost_headers_and_exact_bodies() {
    let mm = FakeMattermost::start().await;
    let rec = Recorder::start().await;
    let alice = mm.add_user("alice");
    let json_tok = mm.create_outgoing_webhook(hook(&[rec.url_for("/json?x=1")], &["bot"], 0));
    let form_tok = mm.create_outgoing_webhook(OutgoingHook {
        content_type: "application/x-www-form-urlencoded".into(),
        ..hook(&[rec.url_for("/form")], &["bot"], 0)
    });
    // Anything but exactly "application/json" gives a form.
    let plain_tok = mm.create_outgoing_webhook(OutgoingHook {
        content_type: "application/json; charset=utf-8".into(),
        ..hook(&[rec.url_for("/charset")], &["bot"], 0)
    });
    let text = "bot <b>&\"q\" é, @x";
    let out = mm.user_posts("alice", "town-square", text, None).await;
    assert_eq!(out.callbacks.len(), 3);
    let reqs = rec.requests();
    assert_eq!(reqs.len(), 3);
    let team = mm.team(DEFAULT_TEAM);
    let ch = mm.channel("town-square");
    let (pid, ts) = (out.post.id.clone(), out.post.create_at);
    assert!(ts > 1_600_000_000_000, "create_at in ms");
    for r in &reqs {
        assert_eq!(r.method, "POST");
        assert_eq!(r.headers.get("accept"), Some("application/json"));
        assert_eq!(r.headers.get("user-agent"), Some("Mattermost-Bot/1.1"));
        assert_eq!(r.headers.get("accept-encoding"), Some("gzip"));
        assert_eq!(r.headers.get("authorization"), None);
    }
    let by_uri = |u: &str| reqs.iter().find(|r| r.uri == u).unwrap_or_else(|| panic!("no request to {u}"));
    let j = by_uri("/json?x=1");
    assert_eq!(j.headers.get("content-type"), Some("application/json"));
    let expected_json = format!(
        r#"{{"token":"{json_tok}","team_id":"{}","team_domain":"acme","channel_id":"{}","channel_name":"town-square","timestamp":{ts},"user_id":"{alice}","user_name":"alice","post_id":"{pid}","text":"bot \u003cb\u003e\u0026\"q\" é, @x","trigger_word":"bot","file_ids":""}}"#,
        team.id, ch.id
    );
    assert_eq!(j.body_text(), expected_json);
    let form_body = |tok: &str| {
        format!(
            "channel_id={}&channel_name=town-square&file_ids=&post_id={pid}&team_domain=acme&team_id={}&text=bot+%3Cb%3E%26%22q%22+%C3%A9%2C+%40x&timestamp={}&token={tok}&trigger_word=bot&user_id={alice}&user_name=alice",
            ch.id,
            team.id,
            ts / 1000
        )
    };
    for (uri, tok) in [("/form", &form_tok), ("/charset", &plain_tok)] {
        let f = by_uri(uri);
        assert_eq!(f.headers.get("content-type"), Some("application/x-www-form-urlencoded"));
        assert_eq!(f.body_text(), form_body(tok));
    }
    // The outcome says the same.
    let c = out.callbacks.iter().find(|c| c.token == json_tok).unwrap();
    assert_eq!((c.sent_content_type.as_str(), c.sent_body.clone()), ("application/json", expected_json.into_bytes()));
    assert_eq!(c.status, Some(200));
    assert_eq!(c.posts, Ok(vec![]));
}

/// Posts `message` and answers which callback paths fired, with their trigger words.
async fn fired(mm: &FakeMattermost, rec: &Recorder, user: &str, channel: &str, message: &str) -> BTreeSet<(String, String)> {
    let before = rec.requests().len();
    let out = mm.user_posts(user, channel, message, None).await;
    let got: BTreeSet<(String, String)> = out
        .callbacks
        .iter()
        .map(|c| (c.url.trim_start_matches(&rec.url).to_owned(), c.trigger_word.clone()))
        .collect();
    let reqs = rec.requests();
    assert_eq!(reqs.len() - before, out.callbacks.len(), "every callback reached the endpoint once");
    for (r, c) in reqs[before..].iter().zip(&out.callbacks) {
        let _ = c;
        assert_eq!(r.json()["text"], message);
    }
    got
}

fn set(items: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    items.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
}

#[tokio::test]
async fn trigger_rules_follow_handle_webhook_events() {
    let mm = FakeMattermost::start().await;
    let rec = Recorder::start().await;
    mm.add_user("alice");
    mm.add_channel(DEFAULT_TEAM, "secret", ChannelType::Private);
    mm.join("alice", "secret");
    mm.add_team("other");
    mm.add_channel("other", "general", ChannelType::Open);
    mm.create_outgoing_webhook(hook(&[rec.url_for("/exact")], &["bot", "hey"], 0));
    mm.create_outgoing_webhook(hook(&[rec.url_for("/starts")], &["!do", "!"], 1));
    mm.create_outgoing_webhook(OutgoingHook { channel: Some("off-topic".into()), ..hook(&[rec.url_for("/chan")], &[], 0) });
    mm.create_outgoing_webhook(OutgoingHook { channel: Some("town-square".into()), ..hook(&[rec.url_for("/chantrig")], &["ts"], 0) });
    mm.create_outgoing_webhook(OutgoingHook { team: "other".into(), ..hook(&[rec.url_for("/other")], &["bot"], 0) });

    let cases: &[(&str, &str, &[(&str, &str)])] = &[
        ("town-square", "bot hello", &[("/exact", "bot")]),
        ("town-square", "hey", &[("/exact", "hey")]),
        ("town-square", " \t bot\u{a0}hello", &[("/exact", "bot")]), // first whitespace-delimited word
        ("town-square", "Bot hello", &[]),                           // case-sensitive
        ("town-square", "BOT", &[]),
        ("town-square", "botty hello", &[]), // exact: no prefix match
        ("town-square", "hello bot", &[]),   // first word only
        ("town-square", "", &[]),
        ("town-square", "!dothis now", &[("/starts", "!do")]), // the trigger, not the word
        ("town-square", "!x", &[("/starts", "!")]),
        ("town-square", "x!do", &[]),
        ("town-square", "ts hi", &[("/chantrig", "ts")]), // channel + trigger: both
        ("off-topic", "ts hi", &[("/chan", "")]),         // channel-only: every message there
        ("off-topic", "anything at all", &[("/chan", "")]),
        ("off-topic", "", &[("/chan", "")]),
        ("secret", "bot hello", &[]),       // private channels never fire
        ("other/general", "bot x", &[("/other", "bot")]), // hooks are per team
        ("other/general", "hey x", &[]),
    ];
    for (channel, message, want) in cases {
        assert_eq!(fired(&mm, &rec, "alice", channel, message).await, set(want), "{message:?} in {channel}");
    }
    // Two hooks on one post, no quirk when the trigger words agree.
    let got = fired(&mm, &rec, "alice", "off-topic", "bot two").await;
    assert_eq!(got.len(), 2);

    // Direct messages never fire either.
    mm.add_user("bob");
    let dm_hook = mm.create_incoming_webhook("town-square", false);
    let (s, _, _) = post_raw(&dm_hook, Some("application/json"), r#"{"text":"bot hi","channel":"@bob"}"#, T).await.unwrap();
    assert_eq!(s, 200);
    let dm = mm.posts().last().unwrap().channel_id.clone();
    assert_eq!(mm.channel_by_id(&dm).unwrap().kind, ChannelType::Direct);

    // Outgoing webhooks switched off: nothing fires.
    mm.update_settings(|s| s.enable_outgoing_webhooks = false);
    assert_eq!(fired(&mm, &rec, "alice", "town-square", "bot x").await, set(&[]));
}

#[tokio::test]
async fn every_payload_carries_the_last_matched_trigger_word() {
    let mm = FakeMattermost::start().await;
    let rec = Recorder::start().await;
    mm.add_user("alice");
    mm.create_outgoing_webhook(hook(&[rec.url_for("/a")], &["a"], 1)); // matches "abc" by prefix: own word "a"
    mm.create_outgoing_webhook(hook(&[rec.url_for("/b")], &["abc"], 0)); // exact: "abc"
    let out = mm.user_posts("alice", "town-square", "abc hi", None).await;
    assert_eq!(out.callbacks.len(), 2);
    for r in rec.requests() {
        assert_eq!(r.json()["trigger_word"], "abc", "{}", r.uri);
    }
    // In the other order the first hook's payload carries "a".
    let rec2 = Recorder::start().await;
    mm.create_outgoing_webhook(hook(&[rec2.url_for("/c")], &["xyz"], 0));
    mm.create_outgoing_webhook(hook(&[rec2.url_for("/d")], &["x"], 1));
    mm.user_posts("alice", "town-square", "xyz", None).await;
    let words: Vec<Value> = rec2.requests().iter().map(|r| r.json()["trigger_word"].clone()).collect();
    assert_eq!(words, [json!("x"), json!("x")]);
}

#[tokio::test]
async fn inline_answers_become_webhook_posts() {
    let mm = FakeMattermost::start().await;
    let rec = Recorder::start().await;
    mm.add_user("alice");
    let admin = mm.user(ADMIN_USER).id;
    mm.create_outgoing_webhook(OutgoingHook {
        display_name: "Helper".into(),
        username: "hookbot".into(),
        icon_url: "http://example.com/hook.png".into(),
        ..hook(&[rec.url_for("/cb")], &["bot"], 0)
    });
    let ask = |reply: Reply| {
        rec.push(reply);
        mm.user_posts("alice", "town-square", "bot please", None)
    };

    // Plain text: a root post by the hook's creator, with the webhook props.
    let out = ask(Reply::json(200, &json!({"text": "hello <b> <!channel>"}))).await;
    let ids = out.callbacks[0].posts.clone().unwrap();
    assert_eq!(ids.len(), 1);
    let p = mm.post(&ids[0]).unwrap();
    assert_eq!(p.message, "hello <b> @channel");
    assert_eq!((p.user_id.as_str(), p.root_id.as_str(), p.channel_id.clone()), (admin.as_str(), "", mm.channel("town-square").id));
    assert_eq!(p.prop_str("from_webhook"), Some("true"));
    assert_eq!(p.prop_str("override_username"), Some("hookbot"));
    assert_eq!(p.prop_str("override_icon_url"), Some("http://example.com/hook.png"));
    assert_eq!(p.prop_str("webhook_display_name"), Some("Helper"));

    // The status is not looked at; reserved props are ignored; the answer's username wins.
    let out = ask(Reply::json(500, &json!({"text": "still", "username": "other", "icon_url": "http://i/x.png",
        "props": {"from_webhook": "false", "override_username": "x", "override_icon_url": "y", "custom": 1}}))).await;
    assert_eq!(out.callbacks[0].status, Some(500));
    let p = mm.post(&out.callbacks[0].posts.clone().unwrap()[0]).unwrap();
    assert_eq!(p.prop_str("from_webhook"), Some("true"));
    assert_eq!(p.prop_str("override_username"), Some("other"));
    assert_eq!(p.prop_str("override_icon_url"), Some("http://i/x.png"));
    assert_eq!(p.prop("custom"), Some(&json!(1)));

    // Nothing to post: {}, an empty body, text null.
    for reply in [Reply::json(200, &json!({})), Reply::empty(200), Reply::json(200, &json!({"text": null, "username": "u"}))] {
        let before = mm.posts().len();
        let out = ask(reply).await;
        assert_eq!(out.callbacks[0].posts, Ok(vec![]));
        assert_eq!(mm.posts().len(), before + 1, "only the user's post");
    }
    // An empty string is text: a post with an empty message.
    let out = ask(Reply::json(200, &json!({"text": ""}))).await;
    assert_eq!(mm.post(&out.callbacks[0].posts.clone().unwrap()[0]).unwrap().message, "");

    // Not JSON (whatever the Content-Type): logged error, nothing posted.
    let out = ask(Reply::raw(200, "aaaaaaaa").header("Content-Type", "text/plain")).await;
    assert!(out.callbacks[0].posts.as_ref().unwrap_err().starts_with("api.unmarshal_error"));
    assert_eq!(out.callbacks[0].body_text(), "aaaaaaaa");
    // JSON with a text/plain Content-Type is still JSON.
    let out = ask(Reply::raw(200, r#"{"text":"typed"}"#).header("Content-Type", "text/plain")).await;
    assert_eq!(out.callbacks[0].posts.as_ref().unwrap().len(), 1);

    // Attachments without text; Slack links become Markdown.
    let out = ask(Reply::json(200, &json!({"text": null, "attachments": [{"text": "see <http://a.b|here>", "fields": [{"value": "<http://c|d>"}]}]}))).await;
    let p = mm.post(&out.callbacks[0].posts.clone().unwrap()[0]).unwrap();
    assert_eq!(p.post_type, "slack_attachment");
    assert_eq!(p.props["attachments"][0]["text"], "see [here](http://a.b)");
    assert_eq!(p.props["attachments"][0]["fields"][0]["value"], "[d](http://c)");

    // `comment`: a reply to the triggering post; other response types: a root post.
    let out = ask(Reply::json(200, &json!({"text": "threaded", "response_type": "comment"}))).await;
    assert_eq!(mm.post(&out.callbacks[0].posts.clone().unwrap()[0]).unwrap().root_id, out.post_id);
    let out = ask(Reply::json(200, &json!({"text": "flat", "response_type": "post"}))).await;
    assert_eq!(mm.post(&out.callbacks[0].posts.clone().unwrap()[0]).unwrap().root_id, "");

    // type system_* is refused; priority needs its level.
    let out = ask(Reply::json(200, &json!({"text": "x", "type": "system_join_channel"}))).await;
    assert!(out.callbacks[0].posts.as_ref().unwrap_err().contains("api.context.invalid_param.app_error"));
    let out = ask(Reply::json(200, &json!({"text": "x", "priority": {"requested_ack": true}}))).await;
    assert!(out.callbacks[0].posts.is_err());
    let out = ask(Reply::json(200, &json!({"text": "x", "priority": {"priority": "urgent"}}))).await;
    assert_eq!(mm.post(&out.callbacks[0].posts.clone().unwrap()[0]).unwrap().priority, Some(json!({"priority": "urgent"})));

    // gzip answers are decoded as Go's transport does.
    let gz = {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(br#"{"text":"zipped"}"#).unwrap();
        e.finish().unwrap()
    };
    let out = ask(Reply::raw(200, gz).header("Content-Encoding", "gzip")).await;
    assert_eq!(mm.post(&out.callbacks[0].posts.clone().unwrap()[0]).unwrap().message, "zipped");

    // Long answers are split like incoming ones.
    let long = "é".repeat(POST_MESSAGE_MAX_RUNES_V2 + 3);
    let out = ask(Reply::json(200, &json!({"text": long}))).await;
    let ids = out.callbacks[0].posts.clone().unwrap();
    assert_eq!(ids.iter().map(|i| mm.post(i).unwrap().message.chars().count()).collect::<Vec<_>>(), [16383, 3]);

    // With the server's real defaults (overrides off) no override props are set.
    mm.update_settings(|s| {
        s.enable_post_username_override = false;
        s.enable_post_icon_override = false;
    });
    let out = ask(Reply::json(200, &json!({"text": "plain", "username": "ignored", "icon_url": "http://i"}))).await;
    let p = mm.post(&out.callbacks[0].posts.clone().unwrap()[0]).unwrap();
    assert_eq!((p.prop("override_username"), p.prop("override_icon_url")), (None, None));
    assert_eq!(p.prop_str("from_webhook"), Some("true"));
}

#[tokio::test]
async fn a_comment_answer_to_a_reply_fails_and_posts_nothing() {
    let mm = FakeMattermost::start().await;
    let rec = Recorder::start().await;
    mm.add_user("alice");
    mm.create_outgoing_webhook(hook(&[rec.url_for("/cb")], &["bot"], 0));
    rec.set_default(Reply::json(200, &json!({"text": "answer", "response_type": "comment"})));
    let root = mm.user_posts("alice", "town-square", "bot first", None).await;
    let reply_id = root.callbacks[0].posts.clone().unwrap()[0].clone();
    assert_eq!(mm.post(&reply_id).unwrap().root_id, root.post_id);

    // A user's reply in that thread fires the hook too (the payload has no root_id) …
    let before = mm.posts().len();
    let inner = mm.user_posts("alice", "town-square", "bot again", Some(&root.post_id)).await;
    assert_eq!(inner.post.root_id, root.post_id);
    assert_eq!(rec.requests().len(), 2);
    assert!(!rec.requests()[1].body_text().contains("root"), "no thread info in the payload");
    // … but the comment would be a reply to a reply: refused, only logged.
    let err = inner.callbacks[0].posts.clone().unwrap_err();
    assert!(err.contains("api.post.create_webhook_post.creating.app_error"), "{err}");
    assert!(err.contains("api.post.create_post.root_id.app_error"), "{err}");
    assert_eq!(inner.callbacks[0].status, Some(200));
    assert_eq!(mm.posts().len(), before + 1, "only the user's reply");

    // A non-comment answer to a reply is a new root post.
    rec.push(Reply::json(200, &json!({"text": "flat"})));
    let flat = mm.user_posts("alice", "town-square", "bot third", Some(&root.post_id)).await;
    assert_eq!(mm.post(&flat.callbacks[0].posts.clone().unwrap()[0]).unwrap().root_id, "");
}

#[tokio::test]
async fn each_callback_url_gets_the_post_and_each_answer_is_posted() {
    let mm = FakeMattermost::start().await;
    let (r1, r2) = (Recorder::start().await, Recorder::start().await);
    mm.add_user("alice");
    r1.set_default(Reply::json(200, &json!({"text": "one"})));
    r2.set_default(Reply::json(200, &json!({"text": "two"})));
    let tok = mm.create_outgoing_webhook(hook(&[r1.url_for("/x"), r2.url_for("/y")], &["bot"], 0));
    let out = mm.user_posts("alice", "town-square", "bot hi", None).await;
    assert_eq!(out.callbacks.len(), 2);
    assert_eq!((r1.requests().len(), r2.requests().len()), (1, 1));
    assert_eq!(r1.requests()[0].body, r2.requests()[0].body);
    let texts: BTreeSet<String> = out.reply_post_ids().iter().map(|i| mm.post(i).unwrap().message).collect();
    assert_eq!(texts, BTreeSet::from(["one".to_owned(), "two".to_owned()]));
    assert!(out.callbacks.iter().all(|c| c.token == tok));
    // Validation of hook definitions (§1.2).
    let bad = |h: OutgoingHook| mm.try_create_outgoing_webhook(h).unwrap_err().id;
    let url = vec![r1.url_for("/z")];
    assert_eq!(bad(hook(&url, &[], 0)), "api.webhook.create_outgoing.triggers.app_error");
    mm.add_channel(DEFAULT_TEAM, "priv", ChannelType::Private);
    assert_eq!(mm.try_create_outgoing_webhook(OutgoingHook { channel: Some("priv".into()), ..hook(&url, &["a"], 0) }).unwrap_err().status_code, 403);
    assert_eq!(bad(hook(&url, &["a"], 2)), "model.outgoing_hook.is_valid.content_type.app_error");
    assert_eq!(bad(hook(&url, &["a", ""], 0)), "model.outgoing_hook.is_valid.trigger_words.app_error");
    assert_eq!(bad(hook(&["nowhere.com/".into()], &["a"], 0)), "model.outgoing_hook.is_valid.url.app_error");
    assert_eq!(bad(hook(&[], &["a"], 0)), "model.outgoing_hook.is_valid.callback.app_error");
    assert_eq!(bad(OutgoingHook { display_name: "d".repeat(65), ..hook(&url, &["a"], 0) }), "model.outgoing_hook.is_valid.display_name.app_error");
    assert_eq!(bad(OutgoingHook { username: "u".repeat(65), ..hook(&url, &["a"], 0) }), "model.outgoing_hook.username.app_error");
    assert_eq!(bad(hook(&[r1.url_for("/x")], &["bot"], 0)), "api.webhook.create_outgoing.intersect.app_error");
    assert!(mm.try_create_outgoing_webhook(OutgoingHook { display_name: "d".repeat(64), ..hook(&["http://nowhere.com/".into()], &["a"], 0) }).is_ok());
    let t = mm.create_outgoing_webhook(hook(&url, &["q"], 0));
    assert!(is_valid_id(&t) && t != tok);
}

#[tokio::test]
async fn a_slow_callback_times_out_once_without_retry() {
    let mm = FakeMattermost::start_with(Settings { outgoing_timeout: Duration::from_millis(300), ..Default::default() }).await;
    let rec = Recorder::start().await;
    mm.add_user("alice");
    mm.create_outgoing_webhook(hook(&[rec.url_for("/slow")], &["bot"], 0));
    rec.push(Reply::json(200, &json!({"text": "too late"})).delayed(Duration::from_millis(1500)));
    let started = std::time::Instant::now();
    let out = mm.user_posts("alice", "town-square", "bot hi", None).await;
    assert!(started.elapsed() < Duration::from_millis(1400));
    assert_eq!(out.callbacks[0].status, None);
    assert!(out.callbacks[0].posts.as_ref().unwrap_err().contains("timed out"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(rec.requests().len(), 1, "one attempt");
    assert_eq!(mm.posts().len(), 1, "nothing posted from the late answer");
    // A refused connection is just as final.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/cb", l.local_addr().unwrap())
    };
    mm.create_outgoing_webhook(hook(&[dead], &["dead"], 0));
    let out = mm.user_posts("alice", "town-square", "dead hi", None).await;
    assert!(out.callbacks[0].posts.as_ref().unwrap_err().contains("Outgoing Webhook POST failed"));
}

#[tokio::test]
async fn webhook_posts_never_fire_outgoing_webhooks() {
    let mm = FakeMattermost::start().await;
    let rec = Recorder::start().await;
    mm.add_user("alice");
    // A channel-only hook sees every message of off-topic, and a trigger hook on "bot".
    mm.create_outgoing_webhook(OutgoingHook { channel: Some("off-topic".into()), ..hook(&[rec.url_for("/all")], &[], 0) });
    mm.create_outgoing_webhook(hook(&[rec.url_for("/bot")], &["bot"], 0));
    rec.set_default(Reply::json(200, &json!({"text": "bot echo"})));
    let out = mm.user_posts("alice", "off-topic", "hello", None).await;
    assert_eq!(out.callbacks.len(), 1);
    assert_eq!(out.reply_post_ids().len(), 1);
    assert_eq!(rec.requests().len(), 1, "the answer \"bot echo\" fired nothing");

    let url = mm.create_incoming_webhook("off-topic", false);
    let (s, _, body) = post_raw(&url, Some("application/json"), r#"{"text":"bot from incoming"}"#, T).await.unwrap();
    assert_eq!((s, body), (200, b"ok".to_vec()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(rec.requests().len(), 1, "the incoming webhook post fired nothing");
    assert_eq!(mm.posts_in("off-topic").len(), 3);
    assert!(mm.posts_in("off-topic")[1..].iter().all(Post::from_webhook));

    // A user's post still fires.
    mm.user_posts("alice", "off-topic", "again", None).await;
    assert_eq!(rec.requests().len(), 2);
}

#[tokio::test]
async fn hand_made_outgoing_calls_send_exact_bytes() {
    let mm = FakeMattermost::start().await;
    let rec = Recorder::start().await;
    rec.push(Reply::raw(201, "first").header("X-Thing", "1"));
    let (s, h, b) = mm.send_outgoing(&rec.url_for("/j"), &fixture(), Encoding::Json).await;
    assert_eq!((s, h.get("x-thing"), b), (201, Some("1"), b"first".to_vec()));
    mm.send_outgoing(&rec.url_for("/f"), &fixture(), Encoding::Form).await;
    mm.send_outgoing_raw(&rec.url_for("/r"), None, vec![0xff, 0x00, b'x']).await;
    mm.send_outgoing_raw(&rec.url_for("/t"), Some("text/plain"), "token=wrong").await;
    let reqs = rec.requests();
    assert_eq!((reqs[0].body_text(), reqs[0].headers.get("content-type")), (JSON_FIXTURE.to_owned(), Some("application/json")));
    assert_eq!((reqs[1].body_text(), reqs[1].headers.get("content-type")), (FORM_FIXTURE.to_owned(), Some("application/x-www-form-urlencoded")));
    assert_eq!((reqs[2].body.clone(), reqs[2].headers.get("content-type")), (vec![0xff, 0x00, b'x'], None));
    assert_eq!(reqs[3].headers.get("content-type"), Some("text/plain"));
    assert!(reqs.iter().all(|r| r.headers.get("user-agent") == Some(USER_AGENT)));
}

// ---------------------------------------------------------------------------------------
// Incoming webhooks (§2)
// ---------------------------------------------------------------------------------------

async fn call(url: &str, ct: Option<&str>, body: impl Into<Vec<u8>>) -> (u16, Headers, Value, String) {
    let (s, h, b) = post_raw(url, ct, body, T).await.expect("incoming webhook reachable");
    let text = String::from_utf8_lossy(&b).into_owned();
    (s, h, serde_json::from_str(&text).unwrap_or(Value::Null), text)
}

fn form(payload: &str) -> String {
    format!("payload={}", go_query_escape(payload))
}

fn multipart(boundary: &str, fields: &[(&str, &str)]) -> String {
    let mut s = String::new();
    for (k, v) in fields {
        s.push_str(&format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n"));
    }
    s.push_str(&format!("--{boundary}--\r\n"));
    s
}

#[tokio::test]
async fn incoming_webhook_status_matrix() {
    let mm = FakeMattermost::start().await;
    mm.add_user("alice");
    mm.add_channel(DEFAULT_TEAM, "private", ChannelType::Private);
    mm.add_team("other");
    mm.add_channel("other", "elsewhere", ChannelType::Open);
    let url = mm.create_incoming_webhook("town-square", false);
    let base = mm.url();
    const JSON: Option<&str> = Some("application/json");
    const FORM: Option<&str> = Some("application/x-www-form-urlencoded");
    let mp = "multipart/form-data; boundary=XyZ";

    let cases: Vec<(&str, String, Option<&str>, Vec<u8>, u16, &str)> = vec![
        ("form payload", url.clone(), FORM, form(r#"{"text": "test text"}"#).into(), 200, ""),
        ("form raw payload", url.clone(), FORM, br#"payload={"text": "raw form"}"#.to_vec(), 200, ""),
        ("form empty text", url.clone(), FORM, form(r#"{"text": ""}"#).into(), 400, "web.incoming_webhook.text.app_error"),
        ("junk channel", url.clone(), JSON, br#"{"text":"x","channel":"junk"}"#.to_vec(), 404, "web.incoming_webhook.channel.app_error"),
        ("other team's channel", url.clone(), JSON, br#"{"text":"x","channel":"elsewhere"}"#.to_vec(), 404, "web.incoming_webhook.channel.app_error"),
        ("unknown hook", format!("{base}/hooks/abc123"), JSON, br#"{"text":"x"}"#.to_vec(), 400, "web.incoming_webhook.invalid.app_error"),
        ("unknown hook, no text", format!("{base}/hooks/abc123"), JSON, br#"{"text":""}"#.to_vec(), 400, "web.incoming_webhook.text.app_error"),
        ("json", url.clone(), JSON, br#"{"text":"this is a test"}"#.to_vec(), 200, ""),
        ("json raw newline and tab", url.clone(), JSON, b"{\"text\":\"this is a test\nwith\ttabs\"}".to_vec(), 200, ""),
        ("channel by name", url.clone(), JSON, br#"{"text":"x","channel":"off-topic"}"#.to_vec(), 200, ""),
        ("channel by #name", url.clone(), JSON, br##"{"text":"x","channel":"#off-topic"}"##.to_vec(), 200, ""),
        ("channel @user", url.clone(), JSON, br#"{"text":"x","channel":"@alice"}"#.to_vec(), 200, ""),
        ("unknown @user", url.clone(), JSON, br#"{"text":"x","channel":"@nobody"}"#.to_vec(), 400, "web.incoming_webhook.user.app_error"),
        ("private channel, admin creator", url.clone(), JSON, br#"{"text":"x","channel":"private"}"#.to_vec(), 200, ""),
        ("mixed-case form type", url.clone(), Some("AppLicaTion/x-www-Form-urlencoded"), form(r#"{"text":"x"}"#).into(), 200, ""),
        ("form;charset", url.clone(), Some("application/x-www-form-urlencoded;charset=utf-8"), form(r#"{"text":"x"}"#).into(), 200, ""),
        ("form; charset", url.clone(), Some("application/x-www-form-urlencoded; charset=utf-8"), form(r#"{"text":"x"}"#).into(), 200, ""),
        ("form type, raw JSON", url.clone(), FORM, br#"{"text":"x"}"#.to_vec(), 400, "model.incoming_hook.parse_data.app_error"),
        ("json type, payload= body", url.clone(), JSON, form(r#"{"text":"x"}"#).into(), 400, "model.incoming_hook.parse_data.app_error"),
        ("mimetype/wrong", url.clone(), Some("mimetype/wrong"), form(r#"{"text":"x"}"#).into(), 400, "model.incoming_hook.parse_data.app_error"),
        ("unparsable type", url.clone(), Some("application/x-www-form-urlencoded wrongtext"), form(r#"{"text":"x"}"#).into(), 400, "api.webhook.incoming.error"),
        ("multipart", url.clone(), Some(mp), multipart("XyZ", &[("username", "mp-user"), ("text", "multipart text")]).into(), 200, ""),
        ("multipart unknown key", url.clone(), Some(mp), multipart("XyZ", &[("text", "t"), ("channel", "off-topic")]).into(), 400, "api.webhook.incoming.error"),
        ("multipart no boundary", url.clone(), Some("multipart/form-data"), multipart("XyZ", &[("text", "t")]).into(), 400, "web.incoming_webhook.text.app_error"),
        ("no content type", url.clone(), None, br#"{"text":"no content type"}"#.to_vec(), 200, ""),
        ("empty body", url.clone(), JSON, Vec::new(), 400, "model.incoming_hook.parse_data.app_error"),
        ("null body", url.clone(), JSON, b"null".to_vec(), 400, "web.incoming_webhook.text.app_error"),
        ("trailing bytes ignored", url.clone(), JSON, br#"{"text":"x"} trailing"#.to_vec(), 200, ""),
        ("keys fold case", url.clone(), JSON, br#"{"TEXT":"folded"}"#.to_vec(), 200, ""),
        ("text of the wrong type", url.clone(), JSON, br#"{"text":5}"#.to_vec(), 400, "model.incoming_hook.parse_data.app_error"),
        ("8200 characters", url.clone(), JSON, json!({"text": "a".repeat(8200)}).to_string().into(), 200, ""),
        ("attachments, no text", url.clone(), JSON, br#"{"attachments":[{"text":"att"}]}"#.to_vec(), 200, ""),
        ("attachments null, no text", url.clone(), JSON, br#"{"attachments":null}"#.to_vec(), 400, "web.incoming_webhook.text.app_error"),
        ("attachments [], no text", url.clone(), JSON, br#"{"attachments":[]}"#.to_vec(), 200, ""),
        ("system_ type", url.clone(), JSON, br#"{"text":"x","type":"system_join_channel"}"#.to_vec(), 400, "api.context.invalid_param.app_error"),
        ("priority without level", url.clone(), JSON, br#"{"text":"x","priority":{"requested_ack":true}}"#.to_vec(), 400, "api.context.invalid_param.app_error"),
    ];
    for (name, u, ct, body, status, id) in cases {
        let before = mm.posts().len();
        let (s, h, v, text) = call(&u, ct, body).await;
        assert_eq!(s, status, "{name}: {text}");
        if status == 200 {
            assert_eq!(text, "ok", "{name}");
            assert_eq!(h.get("content-type"), Some("text/plain"), "{name}");
            assert!(mm.posts().len() > before, "{name}: posted");
        } else {
            assert_eq!(h.get("content-type"), Some("application/json"), "{name}");
            assert_eq!(v["id"], id, "{name}: {text}");
            assert_eq!(v["status_code"], status, "{name}");
            assert_eq!(v["detailed_error"], "", "{name}");
            assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{name}");
            assert_eq!(v["request_id"].as_str().map(str::len), Some(26), "{name}");
            assert_eq!(v["request_id"], h.get("x-request-id").unwrap(), "{name}");
            assert!(text.starts_with(&format!("{{\"id\":\"{id}\",\"message\":")), "{name}: Go field order: {text}");
            assert_eq!(v.as_object().unwrap().len(), 5, "{name}: is_oauth is omitempty: {text}");
            assert_eq!(mm.posts().len(), before, "{name}: nothing posted");
        }
    }

    let posts = mm.posts();
    let by_text = |t: &str| posts.iter().find(|p| p.message == t).unwrap_or_else(|| panic!("no post {t:?}")).clone();
    assert_eq!(by_text("this is a test\nwith\ttabs").channel_id, mm.channel("town-square").id);
    let mp_post = by_text("multipart text");
    assert_eq!(mp_post.prop_str("override_username"), Some("mp-user"));
    let att = posts.iter().find(|p| p.props.get("attachments").is_some()).unwrap();
    assert_eq!((att.post_type.as_str(), att.message.as_str()), ("slack_attachment", ""));
    assert_eq!(by_text(&"a".repeat(8200)).message.len(), 8200);
    // @alice: a direct channel between the hook's creator and alice.
    let dm = posts.iter().filter_map(|p| mm.channel_by_id(&p.channel_id)).find(|c| c.kind == ChannelType::Direct).unwrap();
    let (a, b) = (mm.user(ADMIN_USER).id, mm.user("alice").id);
    assert_eq!(dm.name, if a < b { format!("{a}__{b}") } else { format!("{b}__{a}") });
    assert_eq!(mm.posts_in("off-topic").len(), 2);
    assert_eq!(mm.posts_in("private").len(), 1);

    // Every request was recorded with its answer.
    let reqs = mm.incoming_requests();
    assert_eq!(reqs.len(), 36);
    assert!(reqs.iter().all(|r| r.status.is_some() && r.method == "POST"));
    assert_eq!(reqs[0].headers.get("content-type"), Some("application/x-www-form-urlencoded"));
    assert_eq!(reqs[3].error.as_ref().unwrap().status_code, 404);

    // A locked hook: its own channel only.
    let locked = mm.create_incoming_webhook("town-square", true);
    assert_eq!(call(&locked, JSON, r#"{"text":"x","channel":"off-topic"}"#).await.0, 403);
    assert_eq!(call(&locked, JSON, r#"{"text":"x","channel":"off-topic"}"#).await.2["id"], "web.incoming_webhook.channel_locked.app_error");
    assert_eq!(call(&locked, JSON, r#"{"text":"x","channel":"town-square"}"#).await.0, 200);
    assert_eq!(call(&locked, JSON, r#"{"text":"x"}"#).await.0, 200);

    // A non-admin's hook cannot post into a private channel it does not belong to.
    let alices = mm.create_incoming_webhook_with(IncomingHook { channel: "town-square".into(), creator: Some("alice".into()), ..Default::default() });
    assert_eq!(call(&alices, JSON, r#"{"text":"x","channel":"private"}"#).await.2["id"], "web.incoming_webhook.permissions.app_error");
    mm.join("alice", "private");
    assert_eq!(call(&alices, JSON, r#"{"text":"x","channel":"private"}"#).await.0, 200);

    // Only POST on /hooks/{id:[A-Za-z0-9]+}.
    let c = reqwest::Client::new();
    assert_eq!(c.get(&url).send().await.unwrap().status(), 405);
    assert_eq!(c.post(format!("{base}/hooks/not-alnum")).body("{}").send().await.unwrap().status(), 404);

    // Incoming webhooks switched off.
    mm.update_settings(|s| s.enable_incoming_webhooks = false);
    let (s, _, v, _) = call(&url, JSON, r#"{"text":"x"}"#).await;
    assert_eq!((s, v["id"].as_str()), (501, Some("web.incoming_webhook.disabled.app_error")));
}

#[tokio::test]
async fn incoming_posts_carry_webhook_props_and_overrides() {
    let mm = FakeMattermost::start().await;
    let url = mm.create_incoming_webhook_with(IncomingHook {
        channel: "town-square".into(),
        display_name: "Kore".into(),
        username: "hook-name".into(),
        icon_url: "http://h/icon.png".into(),
        ..Default::default()
    });
    let admin = mm.user(ADMIN_USER).id;
    call(&url, Some("application/json"), r#"{"text":"a <http://x|y>"}"#).await;
    call(&url, Some("application/json"), r###"{"text":"b","username":"custom","icon_url":"http://c","icon_emoji":"smile","props":{"card":"## c","from_webhook":"no","override_username":"z","webhook_display_name":"mine"}}"###).await;
    let posts = mm.posts_in("town-square");
    let (a, b) = (&posts[0], &posts[1]);
    assert_eq!(a.message, "a [y](http://x)");
    assert_eq!(a.user_id, admin);
    assert_eq!(a.props, serde_json::from_value::<serde_json::Map<String, Value>>(json!({
        "from_webhook": "true", "override_username": "hook-name", "override_icon_url": "http://h/icon.png", "webhook_display_name": "Kore"
    })).unwrap());
    assert_eq!(b.prop_str("override_username"), Some("custom"));
    assert_eq!(b.prop_str("override_icon_url"), Some("http://c"));
    assert_eq!(b.prop_str("override_icon_emoji"), Some("smile"));
    assert_eq!(b.prop_str("from_webhook"), Some("true"));
    assert_eq!(b.prop_str("card"), Some("## c"));
    // The hook's display name overwrites one given in props (`req.Props["webhook_display_name"] = …`).
    assert_eq!(b.prop_str("webhook_display_name"), Some("Kore"));
    // Overrides off: no username at all; the server would show the creator.
    mm.update_settings(|s| s.enable_post_username_override = false);
    call(&url, Some("application/json"), r#"{"text":"c","username":"custom"}"#).await;
    assert_eq!(mm.posts_in("town-square")[2].prop("override_username"), None);
    // The posts are announced to subscribers (the future WebSocket's feed).
    let mut rx = mm.subscribe();
    call(&url, Some("application/json"), r#"{"text":"d"}"#).await;
    assert_eq!(tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap().message, "d");
    assert_eq!(mm.posts_in("town-square")[3].to_api_json()["props"]["from_webhook"], "true");
}

#[tokio::test]
async fn incoming_text_is_split_at_16383_runes_on_rune_boundaries() {
    let mm = FakeMattermost::start().await;
    let url = mm.create_incoming_webhook("off-topic", false);
    // 1-, 2-, 3- and 4-byte characters, so a byte-based cut would break one.
    let unit = "aé€😀";
    let text: String = unit.chars().cycle().take(2 * POST_MESSAGE_MAX_RUNES_V2 + 7).collect();
    let (s, _, _, _) = call(&url, Some("application/json"), json!({"text": text, "props": {"k": "v"}}).to_string()).await;
    assert_eq!(s, 200);
    let posts = mm.posts_in("off-topic");
    assert_eq!(posts.iter().map(|p| p.message.chars().count()).collect::<Vec<_>>(), [16383, 16383, 7]);
    assert_eq!(posts.iter().map(|p| p.message.as_str()).collect::<String>(), text);
    assert!(posts.iter().all(|p| p.from_webhook() && p.prop_str("k") == Some("v")));
    assert!(posts.iter().all(|p| p.root_id.is_empty()));
    let ids: BTreeSet<_> = posts.iter().map(|p| p.id.clone()).collect();
    assert_eq!(ids.len(), 3);
    assert_eq!(mm.incoming_requests()[0].posts, posts.iter().map(|p| p.id.clone()).collect::<Vec<_>>());

    // Exactly 16383 runes: one post; 16384: two.
    for (n, want) in [(16383usize, vec![16383usize]), (16384, vec![16383, 1])] {
        let url = mm.create_incoming_webhook("town-square", false);
        let before = mm.posts_in("town-square").len();
        call(&url, Some("application/json"), json!({"text": "😀".repeat(n)}).to_string()).await;
        let got: Vec<usize> = mm.posts_in("town-square")[before..].iter().map(|p| p.message.chars().count()).collect();
        assert_eq!(got, want);
    }
}

#[tokio::test]
async fn scripted_faults_on_the_incoming_endpoint() {
    let mm = FakeMattermost::start().await;
    let url = mm.create_incoming_webhook("town-square", false);
    let body = r#"{"text":"hello"}"#;
    mm.script_incoming(vec![
        Fault::RateLimited { retry_after: 3 },
        Fault::Status(429),
        Fault::Status(500),
        Fault::Status(403),
        Fault::Raw { status: 502, headers: vec![("Content-Type".into(), "text/html".into())], body: b"<html>bad gateway</html>".to_vec() },
        Fault::Delay(Duration::from_millis(700)),
        Fault::Drop,
        Fault::DropAfterPosting,
    ]);
    let json = Some("application/json");

    let (s, h, b) = post_raw(&url, json, body, T).await.unwrap();
    assert_eq!((s, String::from_utf8(b).unwrap()), (429, "limit exceeded\n".to_owned()));
    assert_eq!(h.get("retry-after"), Some("3"));
    assert_eq!(h.get("x-ratelimit-limit"), Some("101"));
    assert_eq!(h.get("x-ratelimit-remaining"), Some("0"));
    assert_eq!(h.get("x-ratelimit-reset"), Some("10"));
    assert_eq!(h.get("content-type"), Some("text/plain; charset=utf-8"));
    let (s, h, _) = post_raw(&url, json, body, T).await.unwrap();
    assert_eq!((s, h.get("retry-after")), (429, Some("1")));

    for (status, id) in [(500, "api.post.create_webhook_post.creating.app_error"), (403, "web.incoming_webhook.permissions.app_error")] {
        let (s, h, b) = post_raw(&url, json, body, T).await.unwrap();
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!((s, v["id"].as_str(), v["status_code"].as_u64()), (status, Some(id), Some(status as u64)));
        assert_eq!(h.get("content-type"), Some("application/json"));
    }
    let (s, h, b) = post_raw(&url, json, body, T).await.unwrap();
    assert_eq!((s, h.get("content-type"), b), (502, Some("text/html"), b"<html>bad gateway</html>".to_vec()));
    assert!(mm.posts().is_empty(), "no fault so far posted anything");

    // Delay: the client gives up, the server still posts.
    let err = post_raw(&url, json, r#"{"text":"slow"}"#, Duration::from_millis(150)).await.unwrap_err();
    assert!(err.contains("timed out") || err.contains("timeout"), "{err}");
    let posts = mm.wait_for_posts_in("town-square", 1, T).await;
    assert_eq!(posts[0].message, "slow");

    // Drop: no answer, nothing posted.
    assert!(post_raw(&url, json, r#"{"text":"dropped"}"#, T).await.is_err());
    // Drop after posting: no answer, but the post exists.
    assert!(post_raw(&url, json, r#"{"text":"posted then dropped"}"#, T).await.is_err());
    let texts: Vec<String> = mm.posts().into_iter().map(|p| p.message).collect();
    assert_eq!(texts, ["slow", "posted then dropped"]);

    // Then normal behaviour resumes.
    let (s, _, b) = post_raw(&url, json, body, T).await.unwrap();
    assert_eq!((s, b), (200, b"ok".to_vec()));

    let reqs = mm.incoming_requests();
    assert_eq!(reqs.len(), 9);
    assert_eq!(reqs.iter().map(|r| r.status).collect::<Vec<_>>(), [Some(429), Some(429), Some(500), Some(403), Some(502), Some(200), None, None, Some(200)]);
    assert_eq!(reqs[6].fault, Some(Fault::Drop));
    assert_eq!(reqs[7].posts.len(), 1);
    assert_eq!(reqs[0].body_text(), body);
    assert_eq!(reqs[0].headers.get("content-type"), Some("application/json"));
    assert!(reqs[8].fault.is_none());
}

// ---------------------------------------------------------------------------------------
// REST for a bot (§3.6) and the WebSocket API (§3.1–3.5)
// ---------------------------------------------------------------------------------------

async fn rest(mm: &FakeMattermost, method: &str, path: &str, token: &str, body: Option<Value>) -> (u16, Value) {
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = format!("{}/api/v4/{path}", mm.url());
    let mut req = match method {
        "GET" => client.get(url),
        _ => client.post(url),
    }
    .bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// A fake with alice, the bot `helpdesk` (member of town-square) and its token.
async fn with_bot() -> (FakeMattermost, String) {
    let mm = FakeMattermost::start().await;
    mm.add_user("alice");
    mm.add_bot("helpdesk");
    mm.join("helpdesk", "town-square");
    mm.join("alice", "town-square");
    let token = mm.create_token("helpdesk");
    (mm, token)
}

#[test]
fn websocket_accept_key_is_the_rfc_6455_example() {
    assert_eq!(ws_accept_key("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
}

#[tokio::test]
async fn rest_needs_a_valid_token_and_a_revoked_one_is_401() {
    let (mm, token) = with_bot().await;
    let (s, me) = rest(&mm, "GET", "users/me", &token, None).await;
    assert_eq!((s, me["username"].as_str(), me["is_bot"].as_bool()), (200, Some("helpdesk"), Some(true)));
    let (s, e) = rest(&mm, "GET", "users/me", "wrongtokenwrongtokenwrongt", None).await;
    assert_eq!((s, e["id"].as_str()), (401, Some("api.context.session_expired.app_error")));
    mm.revoke_token(&token);
    assert_eq!(rest(&mm, "GET", "users/me", &token, None).await.0, 401);
}

#[tokio::test]
async fn bots_post_where_they_are_members_and_read_channels_since_and_after() {
    let (mm, token) = with_bot().await;
    let ts = mm.channel("town-square").id;
    let off = mm.channel("off-topic").id;
    let (s, chans) = rest(&mm, "GET", "users/me/channels", &token, None).await;
    assert_eq!(s, 200);
    assert_eq!(chans.as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap()).collect::<Vec<_>>(), [ts.as_str()]);

    let (s, e) = rest(&mm, "POST", "posts", &token, Some(json!({"channel_id": off, "message": "hi"}))).await;
    assert_eq!((s, e["id"].as_str()), (403, Some("api.context.permissions.app_error")));
    let first = mm.user_posts("alice", "town-square", "one", None).await.post;
    let (s, p) = rest(&mm, "POST", "posts", &token, Some(json!({"channel_id": ts, "message": "two", "root_id": first.id}))).await;
    assert_eq!((s, p["root_id"].as_str(), p["props"]["from_bot"].as_str()), (201, Some(first.id.as_str()), Some("true")));
    // A reply to a reply is refused, as CreatePost does.
    let (s, e) = rest(&mm, "POST", "posts", &token, Some(json!({"channel_id": ts, "message": "x", "root_id": p["id"]}))).await;
    assert_eq!((s, e["id"].as_str()), (400, Some("api.post.create_post.root_id.app_error")));
    let third = mm.user_posts("alice", "town-square", "three", None).await.post;

    let (_, after) = rest(&mm, "GET", &format!("channels/{ts}/posts?after={}", first.id), &token, None).await;
    let order: Vec<&str> = after["order"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(order, [third.id.as_str(), p["id"].as_str().unwrap()], "newest first, the anchor excluded");
    let (_, since) = rest(&mm, "GET", &format!("channels/{ts}/posts?since={}", third.create_at), &token, None).await;
    assert_eq!(since["order"], json!([third.id]));
    assert_eq!(since["posts"][&third.id]["message"], "three");

    let (s, _) = rest(&mm, "POST", "users/me/typing", &token, Some(json!({"channel_id": ts, "parent_id": first.id}))).await;
    assert_eq!(s, 200);
    assert_eq!(mm.typing(), vec![(mm.user("helpdesk").id, ts.clone(), first.id.clone())]);
    mm.script_rest(vec![503]);
    assert_eq!(rest(&mm, "GET", "users/me", &token, None).await.0, 503);
    assert_eq!(rest(&mm, "GET", "users/me", &token, None).await.0, 200);
}

const WS: &str = "/api/v4/websocket";

#[tokio::test]
async fn header_auth_gets_hello_then_posted_events_with_seq() {
    let (mm, token) = with_bot().await;
    let bearer = format!("Bearer {token}");
    let mut ws = WsClient::connect(&mm.url(), WS, &[("Authorization", &bearer)]).await.unwrap();
    let (hello, raw) = ws.recv_json(T).await.unwrap();
    assert_eq!((hello["event"].as_str(), hello["seq"].as_i64()), (Some("hello"), Some(0)));
    assert!(is_valid_id(hello["data"]["connection_id"].as_str().unwrap()));
    assert!(raw.ends_with("}\n") && !raw.contains("\": "), "json.Encoder: compact with a newline: {raw}");

    mm.user_posts("alice", "town-square", "hello @helpdesk", None).await;
    let (ev, raw) = ws.recv_json(T).await.unwrap();
    assert_eq!((ev["event"].as_str(), ev["seq"].as_i64()), (Some("posted"), Some(1)));
    assert!(raw.starts_with("{\"event\": \"posted\", \"data\": "), "precomputed spacing: {raw}");
    let post: Value = serde_json::from_str(ev["data"]["post"].as_str().expect("post is a JSON string")).unwrap();
    assert_eq!(post["message"], "hello @helpdesk");
    assert_eq!(ev["data"]["mentions"].as_str(), Some(format!("[\"{}\"]", mm.user("helpdesk").id).as_str()));
    assert_eq!((ev["data"]["channel_type"].as_str(), ev["data"]["sender_name"].as_str()), (Some("O"), Some("@alice")));
    // Not a member: nothing from off-topic.
    mm.user_posts("alice", "off-topic", "elsewhere", None).await;
    ws.send_json(&json!({"seq": 2, "action": "ping"})).await;
    let (pong, _) = ws.recv_json(T).await.unwrap();
    assert_eq!((pong["status"].as_str(), pong["seq_reply"].as_i64(), pong["data"]["text"].as_str()), (Some("OK"), Some(2), Some("pong")));
    assert!(pong.get("seq").is_none(), "replies carry no seq");
    ws.send_json(&json!({"seq": 0, "action": "ping"})).await;
    let (fail, _) = ws.recv_json(T).await.unwrap();
    assert_eq!((fail["status"].as_str(), fail["error"]["id"].as_str()), (Some("FAIL"), Some("api.web_socket_router.bad_seq.app_error")));
    assert!(fail.get("seq_reply").is_none());

    // A bad token is refused before the upgrade.
    let err = WsClient::connect(&mm.url(), WS, &[("Authorization", "Bearer wrongtokenwrongtokenwrongt")]).await.err().unwrap();
    assert_eq!(err.0, 401);
    assert!(err.1.contains("api.context.session_expired.app_error"), "{}", err.1);
}

#[tokio::test]
async fn the_challenge_is_answered_after_hello_and_a_bad_one_closes_the_socket() {
    let (mm, token) = with_bot().await;
    let mut ws = WsClient::connect(&mm.url(), WS, &[]).await.unwrap();
    ws.send_json(&json!({"seq": 1, "action": "authentication_challenge", "data": {"token": token}})).await;
    let (first, _) = ws.recv_json(T).await.unwrap();
    let (second, _) = ws.recv_json(T).await.unwrap();
    assert_eq!(first["event"], "hello", "hello comes before the OK reply");
    assert_eq!((second["status"].as_str(), second["seq_reply"].as_i64()), (Some("OK"), Some(1)));

    let mut bad = WsClient::connect(&mm.url(), WS, &[]).await.unwrap();
    bad.send_json(&json!({"seq": 1, "action": "authentication_challenge", "data": {"token": "wrongtokenwrongtokenwrongt"}})).await;
    assert!(bad.closed_within(T).await, "closed without a reply");

    // Revoking the token closes its sockets.
    mm.revoke_token(&token);
    assert!(ws.closed_within(T).await);
}

#[tokio::test]
async fn a_dropped_socket_resumes_with_the_missed_events_and_a_refused_resume_gets_a_new_hello() {
    let (mm, token) = with_bot().await;
    let bearer = format!("Bearer {token}");
    let mut ws = WsClient::connect(&mm.url(), WS, &[("Authorization", &bearer)]).await.unwrap();
    let (hello, _) = ws.recv_json(T).await.unwrap();
    let cid = hello["data"]["connection_id"].as_str().unwrap().to_owned();
    mm.user_posts("alice", "town-square", "one", None).await;
    let (ev, _) = ws.recv_json(T).await.unwrap();
    assert_eq!(ev["seq"], 1);

    mm.ws_drop();
    assert!(ws.closed_within(T).await);
    mm.user_posts("alice", "town-square", "two", None).await;
    mm.user_posts("alice", "town-square", "three", None).await;

    // Resume from seq 1 (as if event 1 had been lost too): 1, 2, 3 in order, no hello.
    let q = format!("{WS}?connection_id={cid}&sequence_number=1");
    let mut ws = WsClient::connect(&mm.url(), &q, &[("Authorization", &bearer)]).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        let (ev, _) = ws.recv_json(T).await.unwrap();
        let post: Value = serde_json::from_str(ev["data"]["post"].as_str().unwrap()).unwrap();
        got.push((ev["seq"].as_i64().unwrap(), post["message"].as_str().unwrap().to_owned()));
    }
    assert_eq!(got, [(1, "one".into()), (2, "two".into()), (3, "three".into())]);
    assert_eq!(mm.ws_connects().last().unwrap().resumed, Some(true));

    // Refused: a new connection id, seq back to 0.
    mm.ws_drop();
    assert!(ws.closed_within(T).await);
    mm.ws_refuse_resume(true);
    let q = format!("{WS}?connection_id={cid}&sequence_number=4");
    let mut ws = WsClient::connect(&mm.url(), &q, &[("Authorization", &bearer)]).await.unwrap();
    let (hello, _) = ws.recv_json(T).await.unwrap();
    assert_eq!((hello["event"].as_str(), hello["seq"].as_i64()), (Some("hello"), Some(0)));
    assert_ne!(hello["data"]["connection_id"].as_str(), Some(cid.as_str()));

    // A resume without header auth is never a resume.
    mm.ws_refuse_resume(false);
    let cid2 = hello["data"]["connection_id"].as_str().unwrap().to_owned();
    mm.ws_drop();
    let q = format!("{WS}?connection_id={cid2}&sequence_number=1");
    let mut ws = WsClient::connect(&mm.url(), &q, &[]).await.unwrap();
    ws.send_json(&json!({"seq": 1, "action": "authentication_challenge", "data": {"token": token}})).await;
    let (hello, _) = ws.recv_json(T).await.unwrap();
    assert_eq!(hello["event"], "hello");
    assert_ne!(hello["data"]["connection_id"].as_str(), Some(cid2.as_str()));
}

#[tokio::test]
async fn a_sequence_number_older_than_the_dead_queue_cannot_resume() {
    let (mm, token) = with_bot().await;
    let bearer = format!("Bearer {token}");
    let mut ws = WsClient::connect(&mm.url(), WS, &[("Authorization", &bearer)]).await.unwrap();
    let (hello, _) = ws.recv_json(T).await.unwrap();
    let cid = hello["data"]["connection_id"].as_str().unwrap().to_owned();
    for i in 0..130 {
        mm.user_posts("alice", "town-square", &format!("m{i}"), None).await;
    }
    for _ in 0..130 {
        ws.recv_json(T).await.unwrap();
    }
    mm.ws_drop();
    // Events 1..=130 were sent; the dead queue keeps the last 128 (3..=130).
    let q = format!("{WS}?connection_id={cid}&sequence_number=2");
    let mut ws = WsClient::connect(&mm.url(), &q, &[("Authorization", &bearer)]).await.unwrap();
    let (hello, _) = ws.recv_json(T).await.unwrap();
    assert_eq!(hello["event"], "hello");
}
