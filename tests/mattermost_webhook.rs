//! The Mattermost channel in webhook mode, end to end: the real binary, driven by a fake
//! Mattermost that sends outgoing webhooks as the server does and serves incoming webhooks
//! with the server's status codes and body rules.

mod common;
#[path = "common/fake_mattermost.rs"]
mod fake_mattermost;
#[path = "common/recorder.rs"]
mod recorder;

use fake_mattermost::{Encoding, Fault, FakeMattermost, OutgoingHook, OutgoingPayload};
use common::*;
use serde_json::{json, Value};
use std::time::Duration;

const CONFIG: &str = r#"
[pipeline]
retry_initial_ms = 50
retry_max_ms = 400
max_attempts = 6

[assistants.echo]
backend = "echo"
"#;

/// The admin's path: create the channel (no token yet), copy the callback URL into an
/// outgoing webhook, paste its token and an incoming webhook's URL back, enable.
async fn set_up(pb: &Patchbay, mm: &FakeMattermost, id: &str, extra: Value, content_type: &str) -> (String, String) {
    set_up_with(pb, mm, id, "echo", extra, content_type).await
}

/// [`set_up`] with another assistant.
async fn set_up_with(pb: &Patchbay, mm: &FakeMattermost, id: &str, assistant: &str, extra: Value, content_type: &str) -> (String, String) {
    let (status, created) = pb
        .admin("POST", "/api/v1/channels", Some(json!({"id": id, "kind": "mattermost", "assistant": assistant})))
        .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["enabled"], false);
    let callback = created["callback_url"].as_str().unwrap().to_owned();
    assert!(callback.starts_with(&format!("{}/hooks/mattermost/", pb.url)), "{callback}");

    let token = mm.create_outgoing_webhook(OutgoingHook {
        team: "acme".into(),
        channel: None,
        trigger_words: vec!["@helpdesk".into()],
        trigger_when: 0,
        callback_urls: vec![callback.clone()],
        content_type: content_type.into(),
        ..Default::default()
    });
    let mut settings = json!({"outgoing_token": token});
    for (k, v) in extra.as_object().cloned().unwrap_or_default() {
        settings[k] = v;
    }
    let (status, patched) = pb
        .admin("PATCH", &format!("/api/v1/channels/{id}"), Some(json!({"settings": settings, "enabled": true})))
        .await;
    assert_eq!(status, 200, "{patched}");
    (callback, token)
}

async fn start() -> (Patchbay, FakeMattermost) {
    let mm = FakeMattermost::start().await;
    mm.add_user("alice");
    (Patchbay::start(CONFIG), mm)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_assistant_answers_in_the_channel_the_message_came_from() {
    let (pb, mm) = start().await;
    let incoming = mm.create_incoming_webhook("town-square", false);
    let (callback, _) = set_up(&pb, &mm, "helpdesk-mm", json!({"incoming_webhook_url": incoming, "username": "helpdesk"}), "application/json").await;

    // `channels show` gives the admin the same callback URL.
    let out = pb.cli(&["channels", "show", "helpdesk-mm"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&callback));

    let outcome = mm.user_posts("alice", "off-topic", "@helpdesk where is the VPN guide?", None).await;
    let cb = &outcome.callbacks[0];
    assert_eq!(cb.status, Some(200));
    assert!(cb.body.is_empty(), "incoming_webhook mode acknowledges with an empty body");
    assert_eq!(cb.posts, Ok(vec![]), "nothing is posted inline");

    // The reply goes to off-topic (the message's channel), not to the hook's default channel.
    let posts = mm.wait_for_posts_in("off-topic", 2, Duration::from_secs(20)).await;
    let reply = &posts[1];
    assert_eq!(reply.message, "echo: where is the VPN guide?", "trigger word stripped");
    assert!(reply.from_webhook());
    assert_eq!(reply.prop_str("override_username"), Some("helpdesk"));
    assert!(mm.posts_in("town-square").is_empty());

    // Secrets are write-only.
    let (_, ch) = pb.admin("GET", "/api/v1/channels/helpdesk-mm", None).await;
    assert_eq!(ch["settings"]["outgoing_token"], json!({"set": true}));
    assert_eq!(ch["settings"]["incoming_webhook_url"], json!({"set": true}));
    assert!(!ch.to_string().contains(&incoming));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn form_encoded_webhooks_work_the_same() {
    let (pb, mm) = start().await;
    let incoming = mm.create_incoming_webhook("town-square", false);
    // Any content type but exactly application/json makes Mattermost send a form.
    set_up(&pb, &mm, "form", json!({"incoming_webhook_url": incoming}), "").await;
    let outcome = mm.user_posts("alice", "town-square", "@helpdesk hi, form & friends", None).await;
    assert_eq!(outcome.callbacks[0].sent_content_type, "application/x-www-form-urlencoded");
    assert_eq!(outcome.callbacks[0].status, Some(200));
    let posts = mm.wait_for_posts_in("town-square", 2, Duration::from_secs(20)).await;
    assert_eq!(posts[1].message, "echo: hi, form & friends");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_or_missing_token_is_refused_and_nothing_is_posted() {
    let (pb, mm) = start().await;
    let incoming = mm.create_incoming_webhook("town-square", false);
    let (callback, token) = set_up(&pb, &mm, "guarded", json!({"incoming_webhook_url": incoming}), "application/json").await;
    let mut payload = OutgoingPayload {
        token: "wrongtokenwrongtokenwrongt".into(),
        team_id: mm.team("acme").id,
        team_domain: "acme".into(),
        channel_id: mm.channel("town-square").id,
        channel_name: "town-square".into(),
        timestamp: 1_700_000_000_000,
        user_id: mm.user("alice").id,
        user_name: "alice".into(),
        post_id: "p1p1p1p1p1p1p1p1p1p1p1p1p1".into(),
        text: "@helpdesk hello".into(),
        trigger_word: "@helpdesk".into(),
        file_ids: String::new(),
    };
    for enc in [Encoding::Json, Encoding::Form] {
        let (status, headers, body) = mm.send_outgoing(&callback, &payload, enc).await;
        assert_eq!(status, 401);
        assert!(headers.get("content-type").unwrap_or_default().starts_with("application/json"));
        let err: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(err["error"]["code"], "bad_token");
        assert_eq!(err["error"]["field"], "token");
        assert!(!String::from_utf8_lossy(&body).contains(&token), "the expected token must not leak");
    }
    payload.token = String::new();
    let (status, _, _) = mm.send_outgoing(&callback, &payload, Encoding::Json).await;
    assert_eq!(status, 401);
    let (status, _, _) = mm.send_outgoing_raw(&callback, Some("application/json"), b"{not json".to_vec()).await;
    assert_eq!(status, 401, "an unparsable body has no valid token either");

    // The right token goes through.
    payload.token = token;
    let (status, _, _) = mm.send_outgoing(&callback, &payload, Encoding::Json).await;
    assert_eq!(status, 200);
    let posts = mm.wait_for_posts_in("town-square", 1, Duration::from_secs(20)).await;
    assert_eq!(posts.len(), 1, "only the authenticated message was answered");
    assert_eq!(posts[0].message, "echo: hello");
    let metrics = reqwest::get(format!("{}/metrics", pb.url)).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("patchbay_messages_acknowledged_total{channel=\"guarded\"} 1"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_hooks_and_disabled_channels() {
    let (pb, mm) = start().await;
    let incoming = mm.create_incoming_webhook("town-square", false);
    let (callback, _) = set_up(&pb, &mm, "toggled", json!({"incoming_webhook_url": incoming}), "application/json").await;

    let unknown = format!("{}/hooks/mattermost/aaaaaaaaaaaaaaaaaaaaaaaaaa", pb.url);
    let (status, _, _) = mm.send_outgoing_raw(&unknown, Some("application/json"), b"{}".to_vec()).await;
    assert_eq!(status, 404);

    let (status, _) = pb.admin("PATCH", "/api/v1/channels/toggled", Some(json!({"enabled": false}))).await;
    assert_eq!(status, 200);
    let outcome = mm.user_posts("alice", "town-square", "@helpdesk are you there?", None).await;
    assert_eq!(outcome.callbacks[0].status, Some(200));
    assert!(outcome.callbacks[0].body.is_empty());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(mm.posts_in("town-square").len(), 1, "a disabled channel posts nothing");

    pb.admin("PATCH", "/api/v1/channels/toggled", Some(json!({"enabled": true}))).await;
    mm.user_posts("alice", "town-square", "@helpdesk now?", None).await;
    let posts = mm.wait_for_posts_in("town-square", 3, Duration::from_secs(20)).await;
    assert_eq!(posts[2].message, "echo: now?");
    let _ = callback;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_replies_and_threads() {
    let (pb, mm) = start().await;
    set_up(&pb, &mm, "inline", json!({"reply_in_thread": true, "username": "helpdesk"}), "application/json").await;

    let root = mm.user_posts("alice", "town-square", "@helpdesk thread me", None).await;
    let cb = &root.callbacks[0];
    assert_eq!(cb.status, Some(200));
    let answer: Value = serde_json::from_slice(&cb.body).unwrap();
    assert_eq!(answer["text"], "echo: thread me");
    assert_eq!(answer["response_type"], "comment");
    assert_eq!(answer["username"], "helpdesk");
    let replies = root.reply_post_ids();
    assert_eq!(replies.len(), 1);
    let reply = mm.post(&replies[0]).unwrap();
    assert_eq!(reply.root_id, root.post_id, "answered in the trigger post's thread");

    // The documented failure: a comment answer to a post that is itself a reply is refused
    // by Mattermost, which posts nothing (patchbay cannot see the thread in the payload).
    let in_thread = mm.user_posts("alice", "town-square", "@helpdesk again", Some(&root.post_id)).await;
    assert_eq!(in_thread.callbacks[0].status, Some(200));
    let err = in_thread.callbacks[0].posts.clone().unwrap_err();
    assert!(err.contains("root_id"), "{err}");

    // Without reply_in_thread, a new root post.
    pb.admin("PATCH", "/api/v1/channels/inline", Some(json!({"settings": {"reply_in_thread": false}}))).await;
    let plain = mm.user_posts("alice", "town-square", "@helpdesk flat", None).await;
    let reply = mm.post(&plain.reply_post_ids()[0]).unwrap();
    assert_eq!(reply.root_id, "");
    assert_eq!(reply.message, "echo: flat");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_replies_are_split_on_rune_boundaries_in_order() {
    let (pb, mm) = start().await;
    let incoming = mm.create_incoming_webhook("town-square", false);
    let (_, created) = pb
        .admin("POST", "/api/v1/channels", Some(json!({"id": "long", "kind": "mattermost", "assistant": "echo"})))
        .await;
    // A channel-only hook (no trigger word), so a post of the longest length Mattermost
    // allows reaches the assistant whole.
    let token = mm.create_outgoing_webhook(OutgoingHook {
        team: "acme".into(),
        channel: Some("town-square".into()),
        callback_urls: vec![created["callback_url"].as_str().unwrap().into()],
        content_type: "application/json".into(),
        ..Default::default()
    });
    pb.admin(
        "PATCH",
        "/api/v1/channels/long",
        Some(json!({"enabled": true, "settings": {"outgoing_token": token, "incoming_webhook_url": incoming}})),
    )
    .await;
    // 16,383 runes of mixed widths (1 to 4 bytes); "echo: " makes the reply 16,389 runes.
    let body: String = "aé😀ü".repeat(4095) + "*x*";
    assert_eq!(body.chars().count(), 16383);
    mm.user_posts("alice", "town-square", &body, None).await;
    let posts = mm.wait_for_posts_in("town-square", 3, Duration::from_secs(20)).await;
    let parts: Vec<&str> = posts[1..].iter().map(|p| p.message.as_str()).collect();
    assert_eq!(parts[0].chars().count(), 16383);
    assert_eq!(parts[1].chars().count(), 6);
    assert_eq!(parts.concat(), format!("echo: {body}"), "markdown passes through unchanged, in order");
    assert_eq!(mm.incoming_requests().len(), 2, "each part was posted once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incoming_webhook_faults_are_retried_or_reported() {
    let (pb, mm) = start().await;
    let incoming = mm.create_incoming_webhook("town-square", false);
    set_up(&pb, &mm, "faulty", json!({"incoming_webhook_url": incoming, "send_timeout_ms": 1000}), "application/json").await;

    // 429 with Retry-After, a 500, a dropped connection: retried until delivered, once.
    mm.script_incoming(vec![Fault::RateLimited { retry_after: 1 }, Fault::Status(500), Fault::Drop]);
    mm.user_posts("alice", "town-square", "@helpdesk persevere", None).await;
    let posts = mm.wait_for_posts_in("town-square", 2, Duration::from_secs(30)).await;
    assert_eq!(posts[1].message, "echo: persevere");
    let requests = mm.incoming_requests();
    assert_eq!(requests.len(), 4, "three failures, then the delivery");
    let gap = requests[1].at.duration_since(requests[0].at);
    assert!(gap >= Duration::from_millis(900), "Retry-After: 1 was not honoured ({gap:?})");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(mm.posts_in("town-square").len(), 2, "delivered exactly once");

    // 404 (the channel does not exist for this hook's team) is permanent: not retried, and
    // Mattermost's own words show in the channel status and the dead letters.
    mm.script_incoming(vec![Fault::Status(404)]);
    mm.user_posts("alice", "town-square", "@helpdesk lost", None).await;
    let dead = eventually(Duration::from_secs(20), "a dead letter", || async {
        let (_, v) = pb.admin("GET", "/api/v1/dead-letters?channel=faulty", None).await;
        v["dead_letters"].as_array().filter(|a| !a.is_empty()).cloned()
    })
    .await;
    let reason = dead[0]["reason"].as_str().unwrap();
    assert!(reason.contains("404"), "{reason}");
    assert_eq!(dead[0]["text"], "echo: lost");
    assert_eq!(mm.incoming_requests().len(), 5, "a permanent failure is not retried");
    let (_, ch) = pb.admin("GET", "/api/v1/channels/faulty", None).await;
    let last_error = ch["status"]["last_error"]["message"].as_str().unwrap();
    assert!(last_error.contains("404"), "{last_error}");
    assert!(!last_error.contains(&incoming), "the webhook URL is a secret");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_never_trigger_the_bot_again() {
    let (pb, mm) = start().await;
    let incoming = mm.create_incoming_webhook("town-square", false);
    let (status, created) = pb
        .admin("POST", "/api/v1/channels", Some(json!({"id": "loopy", "kind": "mattermost", "assistant": "echo"})))
        .await;
    assert_eq!(status, 201);
    // A channel-only hook: every message in town-square fires it, with no trigger word.
    let token = mm.create_outgoing_webhook(OutgoingHook {
        team: "acme".into(),
        channel: Some("town-square".into()),
        trigger_words: vec![],
        callback_urls: vec![created["callback_url"].as_str().unwrap().into()],
        content_type: "application/json".into(),
        ..Default::default()
    });
    pb.admin(
        "PATCH",
        "/api/v1/channels/loopy",
        Some(json!({"enabled": true, "settings": {"outgoing_token": token, "incoming_webhook_url": incoming}})),
    )
    .await;
    mm.user_posts("alice", "town-square", "hello", None).await;
    mm.wait_for_posts_in("town-square", 2, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let posts = mm.posts_in("town-square");
    assert_eq!(posts.len(), 2, "the reply was not answered: {:?}", posts.iter().map(|p| &p.message).collect::<Vec<_>>());

    // A relay that forwards a webhook's post (with from_webhook) is not answered either.
    let callback = created["callback_url"].as_str().unwrap();
    let body = json!({"token": token, "channel_id": mm.channel("town-square").id, "channel_name": "town-square",
        "post_id": "relayedrelayedrelayedrelay", "text": "echo: hello", "from_webhook": "true", "timestamp": 1});
    let (status, _, _) = mm.send_outgoing_raw(callback, Some("application/json"), body.to_string()).await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(mm.posts_in("town-square").len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_says_what_it_can_and_cannot_verify() {
    let (pb, mm) = start().await;
    let (status, _) = pb
        .admin("POST", "/api/v1/channels", Some(json!({"id": "fresh", "kind": "mattermost", "assistant": "echo"})))
        .await;
    assert_eq!(status, 201);
    let (_, r) = pb.admin("POST", "/api/v1/channels/fresh/check", None).await;
    assert_eq!(r["report"]["ok"], false, "no token yet: {r}");

    let incoming = mm.create_incoming_webhook("town-square", false);
    set_up(&pb, &mm, "checked", json!({"incoming_webhook_url": incoming}), "application/json").await;
    let (status, r) = pb.admin("POST", "/api/v1/channels/checked/check", None).await;
    assert_eq!(status, 200);
    assert_eq!(r["report"]["ok"], true, "{r}");
    assert!(!r["report"]["unverifiable"].as_array().unwrap().is_empty());
    assert!(mm.posts().is_empty(), "a check posts nothing");
    assert!(!r.to_string().contains(&incoming));

    let out = pb.cli(&["doctor", "checked"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("cannot verify"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_without_an_incoming_webhook_answers_within_the_request_and_records_failures() {
    use recorder::{Answer, Fake};
    let assistant = Fake::start().await;
    let config = format!(
        "{CONFIG}\n[assistants.desk]\nbackend = \"webhook\"\nurl = \"{}\"\nsecret = \"0123456789abcdef0123\"\ntimeout_ms = 2000\n",
        assistant.url
    );
    let mm = FakeMattermost::start().await;
    mm.add_user("alice");
    let pb = Patchbay::start(&config);
    set_up_with(&pb, &mm, "inline", "desk", json!({"inline_timeout_ms": 1500}), "application/json").await;
    let answer = |text: &str| Answer::json(200, json!({"replies": [{"text": text}]}));

    // A 503 from the assistant is tried again within the request: the reply still comes inline.
    assistant.push(Answer::status(503));
    assistant.push(answer("after a retry"));
    let first = mm.user_posts("alice", "town-square", "@helpdesk hello", None).await;
    let body: Value = serde_json::from_slice(&first.callbacks[0].body).unwrap();
    assert_eq!(body["text"], "after a retry");
    assert_eq!(assistant.hits().len(), 2);

    // The same outgoing webhook again (a replaying proxy): answered once, the repeat gets an
    // empty 200 and the assistant is not asked again.
    let cb = &first.callbacks[0];
    let (status, _, repeat) =
        fake_mattermost::post_raw(&cb.url, Some(&cb.sent_content_type), cb.sent_body.clone(), Duration::from_secs(10)).await.unwrap();
    assert_eq!(status, 200);
    assert!(repeat.is_empty(), "{}", String::from_utf8_lossy(&repeat));
    assert_eq!(assistant.hits().len(), 2);

    // Slower than inline_timeout_ms: nothing can carry a later reply, so Mattermost gets an
    // empty 200 and the message is a dead letter that says what to do.
    assistant.push(answer("too late").delay(Duration::from_millis(2500)));
    let slow = mm.user_posts("alice", "town-square", "@helpdesk are you slow?", None).await;
    assert_eq!(slow.callbacks[0].status, Some(200));
    assert!(slow.reply_post_ids().is_empty());
    let dead = eventually(Duration::from_secs(20), "a dead letter", || async {
        let d = dead_letters(&pb).await;
        (!d.is_empty()).then_some(d)
    })
    .await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    let reason = dead[0]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("did not answer within 1500 ms") && reason.contains("incoming webhook"), "{reason}");
}
