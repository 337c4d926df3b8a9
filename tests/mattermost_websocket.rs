//! The Mattermost channel in websocket mode, end to end: the real binary as a bot account on
//! the fake Mattermost's WebSocket and REST APIs. Posts are made as users (the fake announces
//! them as `posted` events); replies are the bot's posts.

mod common;
#[path = "common/fake_mattermost.rs"]
mod fake_mattermost;
#[path = "common/recorder.rs"]
mod recorder;
#[path = "common/fake_openai.rs"]
mod fake_openai;

use fake_mattermost::{FakeMattermost, Post};
use common::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(20);

struct World {
    pb: Patchbay,
    mm: FakeMattermost,
    token: String,
    bot_id: String,
}

/// A fake with alice and bob in town-square, the bot `helpdesk` (member of town-square), and
/// patchbay with channel `bot` in websocket mode (`extra`: more settings lines), connected.
async fn start(extra: &str) -> World {
    start_with("", "echo", extra).await
}

/// [`start`] with more assistants (TOML) and the channel's assistant.
async fn start_with(assistants: &str, assistant: &str, extra: &str) -> World {
    let mm = FakeMattermost::start().await;
    mm.add_user("alice");
    mm.add_user("bob");
    let bot_id = mm.add_bot("helpdesk");
    for u in ["alice", "bob", "helpdesk"] {
        mm.join(u, "town-square");
    }
    let token = mm.create_token("helpdesk");
    let config = format!(
        r#"
[pipeline]
retry_initial_ms = 50
retry_max_ms = 400

[assistants.echo]
backend = "echo"
{assistants}

[channels.bot]
kind = "mattermost"
assistant = "{assistant}"
mode = "websocket"
server_url = "{}"
access_token = "{token}"
ping_interval_ms = 300
{extra}
"#,
        mm.url()
    );
    let pb = Patchbay::start(&config);
    let w = World { pb, mm, token, bot_id };
    w.wait_connected().await;
    w
}

impl World {
    async fn status(&self) -> Value {
        let (s, v) = self.pb.admin("GET", "/api/v1/channels/bot", None).await;
        assert_eq!(s, 200, "{v}");
        v["status"].clone()
    }

    async fn wait_connected(&self) {
        eventually(T, "the bot is connected", || async {
            let st = self.status().await;
            (st["state"] == "connected" && self.mm.ws_live() == 1).then_some(())
        })
        .await;
    }

    fn replies_in(&self, channel: &str) -> Vec<Post> {
        self.mm.posts_in(channel).into_iter().filter(|p| p.user_id == self.bot_id).collect()
    }

    async fn wait_replies(&self, channel: &str, n: usize) -> Vec<Post> {
        eventually(T, &format!("{n} bot replies in {channel}"), || async {
            let r = self.replies_in(channel);
            (r.len() >= n).then_some(r)
        })
        .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mention_is_answered_in_its_thread_and_a_reply_in_the_same_thread() {
    let w = start("").await;
    let st = w.status().await;
    assert_eq!(st["details"]["bot"], "@helpdesk", "{st}");
    assert_eq!(st["reconnects"], 0);

    let root = w.mm.user_posts("alice", "town-square", "@helpdesk where is the VPN guide?", None).await.post;
    let replies = w.wait_replies("town-square", 1).await;
    assert_eq!(replies[0].message, "echo: where is the VPN guide?", "mention stripped");
    assert_eq!(replies[0].root_id, root.id, "a top-level post is answered in its thread");
    assert_eq!(replies[0].prop_str("from_bot"), Some("true"));

    // A reply in that thread: the answer goes to the thread's root, not to the reply.
    w.mm.user_posts("bob", "town-square", "@helpdesk and the wiki?", Some(&root.id)).await;
    let replies = w.wait_replies("town-square", 2).await;
    assert_eq!(replies[1].message, "echo: and the wiki?");
    assert_eq!(replies[1].root_id, root.id);

    let out = w.pb.cli(&["channels", "show", "bot"]);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("connected"), "{shown}");
    assert!(!shown.contains(&w.token), "the token is a secret: {shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_mentions_mode_only_mentions_and_direct_messages_are_answered() {
    let w = start("").await;
    w.mm.user_posts("alice", "town-square", "just chatting, nobody called helpdesk", None).await;
    w.mm.user_posts("alice", "town-square", "mail me@helpdesk.example please", None).await;
    let dm = w.mm.direct_channel("bob", "helpdesk");
    // The bot was already connected when the DM channel was made: its events still arrive.
    let dm_post = w.mm.user_posts("bob", &dm.name, "can you reset my password?", None).await.post;
    let dm_replies = w.wait_replies(&dm.name, 1).await;
    assert_eq!(dm_replies[0].message, "echo: can you reset my password?", "direct messages need no mention");
    assert_eq!(dm_replies[0].root_id, dm_post.id);

    // A marker answered after the unmentioned posts proves they were seen and skipped.
    w.mm.user_posts("alice", "town-square", "@helpdesk marker", None).await;
    let replies = w.wait_replies("town-square", 1).await;
    assert_eq!(replies.iter().map(|p| p.message.as_str()).collect::<Vec<_>>(), ["echo: marker"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_all_mode_every_post_is_answered_but_never_the_bots_own_or_a_webhooks() {
    let w = start(r#"respond_to = "all""#).await;
    let hook = w.mm.create_incoming_webhook("town-square", false);
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let r = client.post(&hook).json(&json!({"text": "build 42 passed"})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    w.mm.user_posts("alice", "town-square", "first", None).await;
    w.mm.user_posts("bob", "town-square", "second", None).await;
    let replies = w.wait_replies("town-square", 2).await;
    // Had the bot answered its own replies it would loop; had it answered the webhook, there
    // would be a reply to "build 42 passed".
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut texts: Vec<String> = w.replies_in("town-square").into_iter().map(|p| p.message).collect();
    texts.sort();
    assert_eq!(texts, ["echo: first", "echo: second"], "{replies:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_reply_is_split_at_16383_runes_in_the_same_thread() {
    let w = start("").await;
    // The longest post Mattermost takes (in a DM: no mention to strip), answered with
    // "echo: " in front: 6 runes too long for one post.
    let long = "é".repeat(16383);
    let dm = w.mm.direct_channel("alice", "helpdesk");
    let root = w.mm.user_posts("alice", &dm.name, &long, None).await.post;
    let replies = w.wait_replies(&dm.name, 2).await;
    let runes: Vec<usize> = replies.iter().map(|p| p.message.chars().count()).collect();
    assert_eq!(runes, [16383, long.chars().count() + 6 - 16383]);
    assert_eq!(replies.iter().map(|p| p.message.as_str()).collect::<String>(), format!("echo: {long}"));
    assert!(replies.iter().all(|p| p.root_id == root.id));
}

/// Posts `n` messages while the socket is dropped twice; answers the posts.
async fn posts_during_drops(w: &World, n: usize) -> Vec<Post> {
    let mut posts = Vec::new();
    for i in 0..n {
        posts.push(w.mm.user_posts("alice", "town-square", &format!("@helpdesk question {i}"), None).await.post);
        if i == n / 3 || i == 2 * n / 3 {
            // Posts keep coming while the bot reconnects.
            eventually(T, "a live socket to drop", || async { (w.mm.ws_live() == 1).then_some(()) }).await;
            w.mm.ws_drop();
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    posts
}

/// Every post answered exactly once, in its own thread.
async fn each_answered_once(w: &World, posts: &[Post]) {
    w.wait_replies("town-square", posts.len()).await;
    // Give duplicates (if any) time to show up.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut by_root: HashMap<String, Vec<String>> = HashMap::new();
    for r in w.replies_in("town-square") {
        by_root.entry(r.root_id.clone()).or_default().push(r.message);
    }
    for (i, p) in posts.iter().enumerate() {
        assert_eq!(by_root.get(&p.id), Some(&vec![format!("echo: question {i}")]), "post {i}");
    }
    assert_eq!(by_root.len(), posts.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_socket_resumes_and_every_post_is_answered_once() {
    let w = start("").await;
    let posts = posts_during_drops(&w, 30).await;
    each_answered_once(&w, &posts).await;
    let connects = w.mm.ws_connects();
    assert!(connects.len() >= 3, "{connects:?}");
    assert!(connects[1..].iter().all(|c| c.resumed == Some(true)), "{connects:?}");
    assert!(connects[1..].iter().all(|c| c.query.contains("connection_id=") && c.query.contains("sequence_number=")));
    assert!(connects.iter().all(|c| c.authorization.as_deref() == Some(&format!("Bearer {}", w.token))));
    w.wait_connected().await;
    assert!(w.status().await["reconnects"].as_u64().unwrap() >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_resume_is_caught_up_over_rest_and_every_post_is_answered_once() {
    let w = start("").await;
    w.mm.ws_refuse_resume(true);
    let posts = posts_during_drops(&w, 30).await;
    each_answered_once(&w, &posts).await;
    let connects = w.mm.ws_connects();
    assert!(connects[1..].iter().all(|c| c.resumed == Some(false)), "{connects:?}");
    let fetched = w.mm.rest_requests().into_iter().filter(|r| r.path.ends_with("/posts") && r.method == "GET").count();
    assert!(fetched >= 2, "missed posts were fetched over REST after each refused resume");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_socket_is_noticed_and_replaced() {
    let w = start("").await;
    w.mm.ws_stall(true);
    // Two ping intervals (300 ms) without a frame: dead. Then a new connection.
    eventually(T, "the connector reconnects", || async { (w.mm.ws_connects().len() >= 2).then_some(()) }).await;
    w.mm.ws_stall(false);
    let st = w.status().await;
    assert!(st["last_error"]["message"].as_str().unwrap_or("").contains("dead"), "{st}");
    w.mm.user_posts("alice", "town-square", "@helpdesk still there?", None).await;
    w.wait_replies("town-square", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_fails_the_channel_with_what_to_do_and_does_not_hammer() {
    let w = start("").await;
    w.mm.revoke_token(&w.token);
    let st = eventually(T, "the channel is failed", || async {
        let st = w.status().await;
        (st["state"] == "failed").then_some(st)
    })
    .await;
    let message = st["last_error"]["message"].as_str().unwrap();
    assert!(message.contains("401") && message.contains("access_token") && message.contains("new token"), "{message}");
    let before = w.mm.rest_requests().len();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = w.mm.rest_requests();
    assert_eq!(after.len(), before, "a refused token is retried slowly, not in a loop: {:?}", &after[before.min(after.len())..]);
    assert_eq!(w.mm.ws_live(), 0);

    let (_, r) = w.pb.admin("POST", "/api/v1/channels/bot/check", None).await;
    assert_eq!(r["report"]["ok"], false, "{r}");
    assert!(r.to_string().contains("new token"), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabling_closes_the_socket_within_a_second_and_nothing_is_answered_while_disabled() {
    let w = start("").await;
    w.mm.user_posts("alice", "town-square", "@helpdesk before", None).await;
    w.wait_replies("town-square", 1).await;

    let t0 = Instant::now();
    let (s, v) = w.pb.admin("PATCH", "/api/v1/channels/bot", Some(json!({"enabled": false}))).await;
    assert_eq!(s, 200, "{v}");
    eventually(Duration::from_secs(3), "the socket is closed", || async { (w.mm.ws_live() == 0).then_some(()) }).await;
    let closed_after = t0.elapsed();
    assert!(closed_after < Duration::from_millis(1500), "closed after {closed_after:?}");
    assert_eq!(w.status().await["state"], "disabled");

    let ignored = w.mm.user_posts("alice", "town-square", "@helpdesk while disabled", None).await.post;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(w.replies_in("town-square").len(), 1, "nothing answered while disabled");

    let (s, _) = w.pb.admin("PATCH", "/api/v1/channels/bot", Some(json!({"enabled": true}))).await;
    assert_eq!(s, 200);
    w.wait_connected().await;
    w.mm.user_posts("alice", "town-square", "@helpdesk after", None).await;
    let replies = w.wait_replies("town-square", 2).await;
    assert_eq!(replies[1].message, "echo: after");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(w.replies_in("town-square").iter().all(|r| r.root_id != ignored.id), "a post made while disabled stays unanswered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_the_bot_and_allow_lists_limit_the_channels() {
    let w = start(r#"channels = ["off-topic"]"#).await;
    let (s, r) = w.pb.admin("POST", "/api/v1/channels/bot/check", None).await;
    assert_eq!(s, 200);
    assert_eq!(r["report"]["ok"], true, "{r}");
    assert!(r.to_string().contains("@helpdesk"), "{r}");

    w.mm.join("helpdesk", "off-topic");
    w.mm.join("alice", "off-topic");
    w.mm.user_posts("alice", "town-square", "@helpdesk not here", None).await;
    w.mm.user_posts("alice", "off-topic", "@helpdesk here", None).await;
    let replies = w.wait_replies("off-topic", 1).await;
    assert_eq!(replies[0].message, "echo: here");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(w.replies_in("town-square").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_settings_name_the_field() {
    let pb = Patchbay::start("[assistants.echo]\nbackend = \"echo\"\n");
    let (s, v) = pb
        .admin(
            "POST",
            "/api/v1/channels",
            Some(json!({"id": "x", "kind": "mattermost", "assistant": "echo",
                "settings": {"mode": "websocket", "server_url": "https://mm.example.com"}})),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    assert!(v.to_string().contains("access_token"), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_typing_indicator_shows_in_the_thread_while_the_assistant_works() {
    let assistant = recorder::Fake::start().await;
    assistant.push(recorder::Answer::json(200, json!({"replies": [{"text": "done"}]})).delay(Duration::from_millis(1500)));
    let toml = format!("[assistants.slow]\nbackend = \"webhook\"\nurl = \"{}\"\nsecret = \"0123456789abcdef0123456789abcdef\"\n", assistant.url);
    let w = start_with(&toml, "slow", "").await;
    let root = w.mm.user_posts("alice", "town-square", "@helpdesk think hard", None).await.post;
    let replies = w.wait_replies("town-square", 1).await;
    assert_eq!(replies[0].message, "done");
    let typing = w.mm.typing();
    assert!(typing.iter().any(|(u, c, p)| *u == w.bot_id && *c == root.channel_id && *p == root.id), "{typing:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_retried_on_replies_and_on_reconnect() {
    let w = start("typing_indicator = false").await;
    w.mm.script_rest(vec![503, 502]);
    w.mm.user_posts("alice", "town-square", "@helpdesk hello", None).await;
    w.wait_replies("town-square", 1).await;
    let posts: Vec<u16> = w.mm.rest_requests().into_iter().filter(|r| r.method == "POST" && r.path == "/api/v4/posts").map(|r| r.status).collect();
    assert_eq!(posts, [503, 502, 201]);

    // users/me fails on the next connection: the connector tries again.
    w.mm.script_rest(vec![500]);
    w.mm.ws_drop();
    eventually(T, "reconnected after a 500", || async {
        let st = w.status().await;
        (st["state"] == "connected" && w.mm.ws_connects().len() >= 2).then_some(())
    })
    .await;
    let st = w.status().await;
    assert!(st["reconnects"].as_u64().unwrap() >= 2, "{st}");
    assert!(st["last_error"]["message"].as_str().unwrap().contains("500"), "{st}");
    w.mm.user_posts("alice", "town-square", "@helpdesk again", None).await;
    w.wait_replies("town-square", 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(w.replies_in("town-square").len(), 2);
}

/// An `openai` assistant on the fake upstream, streaming word by word `delay` apart.
async fn streaming_world(delay: Duration, extra: &str) -> (World, fake_openai::FakeOpenAi) {
    let upstream = fake_openai::FakeOpenAi::start().await;
    upstream.set_delay(delay);
    let assistants = format!("[assistants.llm]\nbackend = \"openai\"\nbase_url = \"{}\"\nmodel = \"fake-model\"\n", upstream.base_url);
    (start_with(&assistants, "llm", extra).await, upstream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_answer_grows_in_place_and_ends_as_one_post() {
    let (w, upstream) = streaming_world(Duration::from_millis(120), "stream_edit_interval_ms = 200").await;
    let root = w.mm.user_posts("alice", "town-square", "@helpdesk tell me about the new VPN rollout please", None).await.post;
    let expected = "You said: tell me about the new VPN rollout please";
    let replies = eventually(T, "the streamed reply is finished", || async {
        let r = w.replies_in("town-square");
        (r.len() == 1 && r[0].message == expected).then_some(r)
    })
    .await;
    let post = &replies[0];
    assert_eq!(post.root_id, root.id, "the draft is posted in the thread");
    // The draft was posted with the first words and then edited as the text grew: every
    // edit is a longer prefix of the answer, the last one the whole answer.
    let edits: Vec<String> = w.mm.post_edits().into_iter().filter(|(id, _)| *id == post.id).map(|(_, m)| m).collect();
    assert!(edits.len() >= 2, "the post grew through several edits: {edits:?}");
    assert_eq!(edits.last().map(String::as_str), Some(expected));
    for pair in edits.windows(2) {
        assert!(pair[1].starts_with(pair[0].trim_end()) && pair[1].len() >= pair[0].len(), "edits only grow: {edits:?}");
    }
    let created: Vec<_> = w
        .mm
        .rest_requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path == "/api/v4/posts")
        .collect();
    assert_eq!(created.len(), 1, "one post, edited in place, not one per piece: {created:?}");
    let first = created[0].body["message"].as_str().unwrap_or("");
    assert!(expected.starts_with(first.trim_end()) && first.len() < expected.len(), "the draft held the text so far: {first:?}");
    assert!(w.mm.deleted_posts().is_empty());
    assert_eq!(upstream.requests().len(), 1);
    assert_eq!(upstream.requests()[0].body["stream"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_pieces_is_coalesced_into_few_edits() {
    let (w, upstream) = streaming_world(Duration::ZERO, "stream_edit_interval_ms = 250").await;
    // A first piece, a pause long enough for the draft to be posted, then 60 pieces in a
    // burst: one edit per piece would be 60 edits; paced edits show only the newest text.
    let mut pieces = vec![(Duration::ZERO, "Counting: ".to_owned())];
    pieces.push((Duration::from_millis(700), "1 ".to_owned()));
    pieces.extend((2..=60).map(|i| (Duration::from_millis(2), format!("{i} "))));
    upstream.push(fake_openai::Script::Paced { pieces: pieces.clone() });
    w.mm.user_posts("alice", "town-square", "@helpdesk count to sixty", None).await;
    let expected: String = pieces.into_iter().map(|(_, p)| p).collect();
    let replies = eventually(T, "the streamed reply is finished", || async {
        let r = w.replies_in("town-square");
        (r.len() == 1 && r[0].message.trim_end() == expected.trim_end()).then_some(r)
    })
    .await;
    let edits = w.mm.post_edits().into_iter().filter(|(id, _)| *id == replies[0].id).count();
    assert!((1..=10).contains(&edits), "60 pieces shown in a few paced edits, not one each: {edits}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_fails_midway_leaves_no_half_answer_behind() {
    let (w, upstream) = streaming_world(Duration::from_millis(100), "stream_edit_interval_ms = 100").await;
    upstream.push(fake_openai::Script::FailMidStream {
        pieces: fake_openai::pieces("This answer will break off before it is finished"),
        delay: Duration::from_millis(100),
        message: "The server is overloaded".into(),
    });
    w.mm.user_posts("alice", "town-square", "@helpdesk are you there", None).await;
    // The failed attempt's draft is deleted; the retry answers in full.
    let replies = eventually(T, "the retried answer", || async {
        let r = w.replies_in("town-square");
        (r.len() == 1 && r[0].message == "You said: are you there").then_some(r)
    })
    .await;
    let deleted = w.mm.deleted_posts();
    assert_eq!(deleted.len(), 1, "the broken draft was removed");
    assert_ne!(deleted[0], replies[0].id);
    assert!(w.mm.post(&deleted[0]).is_none());
    assert_eq!(upstream.requests().len(), 2, "tried again after the mid-stream error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_streaming_off_the_finished_answer_is_posted_once() {
    let (w, _upstream) = streaming_world(Duration::from_millis(80), "stream_edit_interval_ms = 0").await;
    w.mm.user_posts("alice", "town-square", "@helpdesk one two three four five six", None).await;
    let replies = w.wait_replies("town-square", 1).await;
    assert_eq!(replies[0].message, "You said: one two three four five six");
    assert!(w.mm.post_edits().is_empty(), "nothing edited");
}
