//! The Slack channel over the Events API, end to end: the real binary behind the fake
//! Slack's Events API sender (signed and retried like Slack) and Web API.

mod common;
#[path = "common/fake_slack.rs"]
mod fake_slack;
#[path = "common/recorder.rs"]
mod recorder;
#[path = "common/fake_openai.rs"]
mod fake_openai;

use common::*;
use fake_slack::{Fault, FakeSlack, BOT_USER};
use serde_json::{json, Value};
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

struct World {
    pb: Patchbay,
    slack: FakeSlack,
    hook: String,
}

fn config(slack: &FakeSlack, assistants: &str, assistant: &str, extra: &str) -> String {
    format!(
        r#"
[pipeline]
retry_initial_ms = 50
retry_max_ms = 400
max_attempts = 4

[assistants.echo]
backend = "echo"
{assistants}

[channels.slack]
kind = "slack"
assistant = "{assistant}"
bot_token = "{}"
signing_secret = "{}"
api_url = "{}"
{extra}
"#,
        slack.bot_token,
        slack.signing_secret(),
        slack.api_url()
    )
}

/// The fake with alice in #general (the bot is there too) and patchbay's channel `slack`
/// set as the app's Request URL.
async fn start_with(assistants: &str, assistant: &str, extra: &str) -> World {
    let slack = FakeSlack::start().await;
    slack.add_user("alice");
    slack.join("alice", "general");
    let pb = Patchbay::start(&config(&slack, assistants, assistant, extra));
    let hook = pb.callback_url("slack").await;
    assert!(slack.set_request_url(&hook).await, "the Request URL is verified");
    World { pb, slack, hook }
}

async fn start() -> World {
    start_with("", "echo", "").await
}

impl World {
    async fn status(&self) -> Value {
        let (s, v) = self.pb.admin("GET", "/api/v1/channels/slack", None).await;
        assert_eq!(s, 200, "{v}");
        v["status"].clone()
    }

    async fn wait_bot_messages(&self, channel: &str, n: usize) -> Vec<fake_slack::Msg> {
        eventually(T, &format!("{n} bot messages in {channel}"), || async {
            let m = self.slack.bot_messages(channel);
            (m.len() >= n).then_some(m)
        })
        .await
    }

    async fn metric(&self, name: &str) -> u64 {
        let (_, v) = self.pb.call("GET", "/metrics", None, None).await;
        let text = v.as_str().unwrap_or_default().to_owned();
        let key = format!("{name}{{channel=\"slack\"}} ");
        text.lines().find_map(|l| l.strip_prefix(&key)).and_then(|n| n.trim().parse().ok()).unwrap_or(0)
    }
}

fn mention(text: &str) -> String {
    format!("<@{BOT_USER}> {text}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mention_delivered_as_app_mention_and_as_message_is_answered_once_in_its_thread() {
    let w = start().await;
    let (ts, deliveries) = w.slack.user_says("alice", "general", &mention("where is the VPN guide?"), None).await;
    let kinds: Vec<&str> = deliveries.iter().map(|d| d.event_type.as_str()).collect();
    assert_eq!(kinds, ["app_mention", "message"], "Slack sends both for a mention with both subscriptions");
    assert_ne!(deliveries[0].event_id, deliveries[1].event_id);
    for d in &deliveries {
        assert_eq!(d.attempts.len(), 1, "acknowledged at the first attempt: {d:?}");
        assert_eq!(d.attempts[0].status, Some(200));
    }
    let replies = w.wait_bot_messages("general", 1).await;
    assert_eq!(replies[0].text, "echo: where is the VPN guide?", "mention stripped");
    assert_eq!(replies[0].thread_ts.as_deref(), Some(ts.as_str()), "a top-level message is answered in its thread");
    // Both copies reached the inbox; one was a duplicate, so one answer.
    assert_eq!(w.metric("patchbay_messages_received_total").await, 2);
    assert_eq!(w.metric("patchbay_messages_duplicate_total").await, 1);

    // A reply in the thread goes to the thread's parent, not to the reply.
    w.slack.user_says("alice", "general", &mention("and the wiki?"), Some(&ts)).await;
    let replies = w.wait_bot_messages("general", 2).await;
    assert_eq!(replies.len(), 2, "{replies:?}");
    assert_eq!(replies[1].text, "echo: and the wiki?");
    assert_eq!(replies[1].thread_ts.as_deref(), Some(ts.as_str()));

    let post = &w.slack.calls("chat.postMessage")[0];
    assert!(post.authorization.as_deref().is_some_and(|a| a.starts_with("Bearer xoxb-")), "token in the header");
    assert!(post.content_type.starts_with("application/json"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_event_is_answered_once() {
    let w = start().await;
    let (msg, bodies) = w.slack.post_as_user("alice", "general", &mention("status?"), None);
    let first = w.slack.deliver_http(bodies[0].clone(), &[]).await;
    assert!(first.acked());
    // Slack retries what it thinks failed (a timeout on its side), with the same event_id.
    let retry = w.slack.deliver_http(bodies[0].clone(), &[("x-slack-retry-num", "1"), ("x-slack-retry-reason", "http_timeout")]).await;
    assert!(retry.acked(), "a retry is acknowledged too, so Slack stops: {retry:?}");
    let replies = w.wait_bot_messages("general", 1).await;
    assert_eq!(replies[0].thread_ts.as_deref(), Some(msg.ts.as_str()));
    assert_eq!(w.metric("patchbay_messages_duplicate_total").await, 1);
    assert_eq!(w.metric("patchbay_messages_received_total").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_is_acknowledged_once_stored_not_after_the_assistant() {
    let assistant = recorder::Fake::start().await;
    assistant.hold();
    let assistants = format!("[assistants.slow]\nbackend = \"webhook\"\nurl = \"{}\"\nsecret = \"s3cret-for-the-assistant\"\ntimeout_ms = 20000\n", assistant.url);
    let w = start_with(&assistants, "slow", "").await;
    let (_, deliveries) = w.slack.user_says("alice", "general", &mention("think hard"), None).await;
    // Acknowledged at the first attempt, within Slack's 3 s, while the assistant is still
    // holding the request: the ack did not wait for it.
    assert!(deliveries.iter().all(|d| d.attempts.len() == 1 && d.attempts[0].status == Some(200)), "{deliveries:?}");
    eventually(T, "the assistant got the message", || async { (assistant.arrived() >= 1).then_some(()) }).await;
    assert!(w.slack.bot_messages("general").is_empty(), "nothing posted while the assistant works");
    assistant.release();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_signature_is_refused_with_401_and_nothing_else_happens() {
    let w = start().await;
    let (_, bodies) = w.slack.post_as_user("alice", "general", &mention("forged"), None);
    let raw = bodies[0].to_string();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let secret = w.slack.signing_secret();
    let cases = [
        ("another secret", now.to_string(), "not-the-secret".to_owned(), raw.clone()),
        // Well past the ±300 s window (its exact edges are the unit test's in signature.rs):
        // the server reads its clock a second or so after `now` was taken.
        ("stale timestamp", (now - 310).to_string(), secret.clone(), raw.clone()),
        ("future timestamp", (now + 310).to_string(), secret.clone(), raw.clone()),
    ];
    for (what, ts, key, body) in cases {
        let (status, text) = w.slack.post_signed(&w.hook, &body, &ts, &key).await;
        assert_eq!(status, 401, "{what}: {text}");
        assert!(!text.contains("v0="), "no signature in the answer: {text}");
    }
    // A body changed after signing.
    let client = http();
    let ts = now.to_string();
    let sig = {
        use hmac::{Hmac, Mac};
        let mut m = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        m.update(format!("v0:{ts}:{raw}").as_bytes());
        format!("v0={}", hex::encode(m.finalize().into_bytes()))
    };
    let tampered = raw.replace("forged", "FORGED");
    let r = client.post(&w.hook).header("x-slack-request-timestamp", &ts).header("x-slack-signature", &sig).body(tampered).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = client.post(&w.hook).body(raw.clone()).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401, "no headers at all");
    let refused = r.json::<Value>().await.unwrap();
    assert_eq!(refused["error"]["field"], "X-Slack-Request-Timestamp", "{refused}");

    assert_eq!(w.metric("patchbay_messages_received_total").await, 0, "nothing reached the inbox");
    // The same body, signed properly, goes through: the refusals were the signature's doing.
    let (status, _) = w.slack.post_signed(&w.hook, &raw, &now.to_string(), &secret).await;
    assert_eq!(status, 200);
    let replies = w.wait_bot_messages("general", 1).await;
    assert_eq!(replies[0].text, "echo: forged");
}

/// Runs `slack_sdk`'s `SignatureVerifier` (scripts/test installs it).
fn slack_sdk(args: &[&str]) -> String {
    const SCRIPT: &str = r#"
import sys
from slack_sdk.signature import SignatureVerifier
op, secret, ts, body = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
v = SignatureVerifier(signing_secret=secret)
if op == "sign":
    print(v.generate_signature(timestamp=ts, body=body))
else:
    print("valid" if v.is_valid(body=body, timestamp=ts, signature=sys.argv[5]) else "invalid")
"#;
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(SCRIPT)
        .args(args)
        .output()
        .expect("python3 runs (scripts/test installs slack_sdk)");
    assert!(out.status.success(), "slack_sdk is needed (python3 -m pip install slack_sdk): {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signatures_agree_with_slack_sdk_signature_verifier() {
    let w = start().await;
    let secret = w.slack.signing_secret();
    let (_, bodies) = w.slack.post_as_user("alice", "general", &mention("signed by the SDK"), None);
    let raw = bodies[0].to_string();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs().to_string();

    // What slack_sdk signs, patchbay accepts.
    let sdk_sig = slack_sdk(&["sign", &secret, &now, &raw]);
    assert!(sdk_sig.starts_with("v0="), "{sdk_sig}");
    let r = http().post(&w.hook).header("x-slack-request-timestamp", &now).header("x-slack-signature", &sdk_sig).body(raw.clone()).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let replies = w.wait_bot_messages("general", 1).await;
    assert_eq!(replies[0].text, "echo: signed by the SDK");

    // What slack_sdk refuses, patchbay refuses.
    let tampered = raw.replace("signed", "forged");
    assert_eq!(slack_sdk(&["verify", &secret, &now, &tampered, &sdk_sig]), "invalid");
    let r = http().post(&w.hook).header("x-slack-request-timestamp", &now).header("x-slack-signature", &sdk_sig).body(tampered).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let old = (now.parse::<u64>().unwrap() - 400).to_string();
    let old_sig = slack_sdk(&["sign", &secret, &old, &raw]);
    assert_eq!(slack_sdk(&["verify", &secret, &old, &raw, &old_sig]), "invalid", "slack_sdk refuses stale requests");
    let r = http().post(&w.hook).header("x-slack-request-timestamp", &old).header("x-slack-signature", &old_sig).body(raw.clone()).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);

    // And the fake signs the way slack_sdk verifies (the fake is checked too).
    let (_, bodies) = w.slack.post_as_user("alice", "general", &mention("again"), None);
    let raw2 = bodies[0].to_string();
    let (status, _) = w.slack.post_signed(&w.hook, &raw2, &now, &secret).await;
    assert_eq!(status, 200);
    let fake_sig = {
        use hmac::{Hmac, Mac};
        let mut m = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        m.update(format!("v0:{now}:{raw2}").as_bytes());
        format!("v0={}", hex::encode(m.finalize().into_bytes()))
    };
    assert_eq!(slack_sdk(&["verify", &secret, &now, &raw2, &fake_sig]), "valid");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_verification_is_answered_while_disabled_and_events_are_acked_but_not_answered() {
    let slack = FakeSlack::start().await;
    slack.add_user("alice");
    slack.join("alice", "general");
    let pb = Patchbay::start(&config(&slack, "", "echo", "enabled = false"));
    let hook = pb.callback_url("slack").await;
    assert!(slack.set_request_url(&hook).await, "setup comes before enabling");

    let (_, deliveries) = slack.user_says("alice", "general", &mention("anyone?"), None).await;
    assert!(deliveries.iter().all(|d| d.attempts.len() == 1 && d.attempts[0].status == Some(200)), "no retries, no app disabling: {deliveries:?}");

    // ssl_check is answered empty.
    let r = http().post(&hook).header("content-type", "application/x-www-form-urlencoded").body("ssl_check=1&token=x").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.text().await.unwrap(), "");

    let (s, v) = pb.admin("PATCH", "/api/v1/channels/slack", Some(json!({"enabled": true}))).await;
    assert_eq!(s, 200, "{v}");
    slack.user_says("alice", "general", &mention("now?"), None).await;
    let replies = eventually(T, "a reply", || async {
        let m = slack.bot_messages("general");
        (!m.is_empty()).then_some(m)
    })
    .await;
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].text, "echo: now?", "the message sent while disabled is not answered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bot_never_answers_itself_or_other_bots() {
    let w = start().await;
    let dm = w.slack.dm("alice");
    w.slack.user_says("alice", &dm, "hello there", None).await;
    let replies = w.wait_bot_messages(&dm, 1).await;
    assert_eq!(replies[0].text, "echo: hello there", "a direct message needs no mention");
    // Slack sends the bot's own post back as a message event (message.im), and another
    // integration's post as a bot_message.
    let echo = w.slack.echo_of(&replies[0]);
    assert!(w.slack.deliver(echo).await.acked());
    assert!(w.slack.deliver(w.slack.integration_says("general", &mention("deploy done"))).await.acked());
    // A last message in the same conversation: its answer comes after anything the echo
    // could have caused, and both echo and bot_message never reached the inbox.
    w.slack.user_says("alice", &dm, "bye", None).await;
    let replies = w.wait_bot_messages(&dm, 2).await;
    assert_eq!(replies.len(), 2);
    assert_eq!(replies[1].text, "echo: bye");
    assert_eq!(w.metric("patchbay_messages_received_total").await, 2, "only alice's two messages");
    assert!(w.slack.bot_messages("general").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_replies_are_split_within_slacks_limit_in_order() {
    let w = start().await;
    let long = (0..1200).map(|i| format!("w{i}")).collect::<Vec<_>>().join(" "); // ~6,000 characters
    let (ts, _) = w.slack.user_says("alice", "general", &mention(&long), None).await;
    let replies = w.wait_bot_messages("general", 2).await;
    assert_eq!(replies.len(), 2, "{:?}", replies.iter().map(|r| r.given_chars).collect::<Vec<_>>());
    assert!(replies.iter().all(|r| r.given_chars <= 4000 && r.thread_ts.as_deref() == Some(ts.as_str())));
    let joined = replies.iter().map(|r| r.text.as_str()).collect::<Vec<_>>().join(" ");
    assert_eq!(joined, format!("echo: {long}"), "in order, nothing lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_is_honoured_and_the_reply_delivered_after_retry_after() {
    let w = start().await;
    w.slack.fail_next("chat.postMessage", Fault::RateLimited { retry_after: 2 });
    w.slack.user_says("alice", "general", &mention("busy?"), None).await;
    let replies = w.wait_bot_messages("general", 1).await;
    assert_eq!(replies[0].text, "echo: busy?");
    let calls = w.slack.calls("chat.postMessage");
    assert_eq!(calls.len(), 2, "one refused, one delivered: {calls:?}");
    assert_eq!(calls[0].status, 429);
    assert!(calls[1].at - calls[0].at >= Duration::from_secs(2), "not before Retry-After: {:?}", calls[1].at - calls[0].at);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_errors_are_classified() {
    let w = start().await;
    // Retryable: internal_error and a 503, then delivered.
    w.slack.fail_next("chat.postMessage", Fault::Error("internal_error"));
    w.slack.fail_next("chat.postMessage", Fault::Status(503));
    w.slack.user_says("alice", "general", &mention("one"), None).await;
    let replies = w.wait_bot_messages("general", 1).await;
    assert_eq!(replies[0].text, "echo: one");
    assert_eq!(w.slack.calls("chat.postMessage").len(), 3);

    // Permanent: the bot was removed from the channel; dead-lettered at the first attempt.
    w.slack.kick("helpdesk", "general");
    w.slack.user_says("alice", "general", &mention("two"), None).await;
    let dead = eventually(T, "a dead letter", || async {
        let d = dead_letters(&w.pb).await;
        (!d.is_empty()).then_some(d)
    })
    .await;
    assert_eq!(dead[0]["attempts"], 1, "{dead:?}");
    assert!(dead[0]["reason"].as_str().unwrap().contains("not_in_channel"), "{dead:?}");
    w.slack.join("helpdesk", "general");

    // Unauthorized: the token was revoked; the channel is failed, and says why.
    w.slack.revoke(&w.slack.bot_token.clone());
    w.slack.user_says("alice", "general", &mention("three"), None).await;
    let st = eventually(T, "the channel is failed", || async {
        let st = w.status().await;
        (st["state"] == "failed").then_some(st)
    })
    .await;
    let err = st["last_error"]["message"].as_str().unwrap();
    assert!(err.contains("token_revoked") && err.contains("reinstall"), "{st}");
    assert!(!err.contains(&w.slack.bot_token), "no secret in the status");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_the_workspace_and_the_bot_or_slacks_error() {
    let w = start().await;
    let (s, r) = w.pb.admin("POST", "/api/v1/channels/slack/check", None).await;
    assert_eq!(s, 200, "{r}");
    let r = &r["report"];
    assert_eq!(r["ok"], true, "{r}");
    let detail = r["steps"][0]["detail"].as_str().unwrap();
    assert!(detail.contains("Acme") && detail.contains("T0ACME") && detail.contains("@helpdesk") && detail.contains(BOT_USER), "{detail}");
    let st = eventually(T, "the status shows the bot", || async {
        let st = w.status().await;
        st["details"]["bot"].is_string().then_some(st)
    })
    .await;
    assert_eq!(st["details"]["team"], "Acme (T0ACME)");

    w.slack.revoke(&w.slack.bot_token.clone());
    let (_, r) = w.pb.admin("POST", "/api/v1/channels/slack/check", None).await;
    let r = &r["report"];
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["steps"][0]["detail"].as_str().unwrap().contains("token_revoked"), "{r}");
    let shown = w.pb.cli(&["channels", "show", "slack"]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(!shown.contains(&w.slack.bot_token) && !shown.contains(&w.slack.signing_secret()), "secrets are write-only: {shown}");
    let stderr = w.pb.stderr();
    assert!(!stderr.contains(&w.slack.bot_token) && !stderr.contains(&w.slack.signing_secret()), "no secret in the logs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_rate_limited_is_acknowledged_and_shown() {
    let w = start().await;
    let body = json!({"token": fake_slack::VERIFICATION_TOKEN, "type": "app_rate_limited", "team_id": "T0ACME", "minute_rate_limited": 1518467820, "api_app_id": "A0APP"});
    let d = w.slack.deliver_http(body, &[]).await;
    assert_eq!(d.attempts[0].status, Some(200));
    let st = w.status().await;
    assert!(st["last_error"]["message"].as_str().unwrap_or("").contains("app_rate_limited"), "{st}");
    assert!(w.pb.stderr().contains("30,000"), "logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_errors_name_the_field() {
    let slack = FakeSlack::start().await;
    let pb = Patchbay::start("[assistants.echo]\nbackend = \"echo\"\n");
    for (settings, field) in [
        (json!({"bot_token": "xoxp-1-2", "signing_secret": "abc"}), "bot_token"),
        (json!({"bot_token": slack.bot_token, "socket_mode": true}), "app_token"),
        (json!({"bot_token": slack.bot_token}), "signing_secret"),
        (json!({"signing_secret": "abc", "socket_mode": true, "app_token": "xoxb-1"}), "app_token"),
    ] {
        let (s, v) = pb.admin("POST", "/api/v1/channels", Some(json!({"id": "s", "kind": "slack", "assistant": "echo", "settings": settings}))).await;
        assert_eq!(s, 400, "{v}");
        assert!(v["error"]["field"].as_str().unwrap_or("").ends_with(field), "{v}");
        assert!(!v.to_string().contains("xoxp-1-2"), "the value is not echoed: {v}");
    }
}

/// An `openai` assistant on the fake upstream, streaming word by word `delay` apart.
async fn streaming_world(delay: Duration, extra: &str) -> (World, fake_openai::FakeOpenAi) {
    let upstream = fake_openai::FakeOpenAi::start().await;
    upstream.set_delay(delay);
    let assistants = format!("[assistants.llm]\nbackend = \"openai\"\nbase_url = \"{}\"\nmodel = \"fake-model\"\n", upstream.base_url);
    (start_with(&assistants, "llm", extra).await, upstream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_answer_grows_in_place_with_chat_update() {
    let (w, upstream) = streaming_world(Duration::from_millis(120), "stream_edit_interval_ms = 200").await;
    let (ts, _) = w.slack.user_says("alice", "general", &mention("tell me about the new VPN rollout please"), None).await;
    let expected = "You said: tell me about the new VPN rollout please";
    let replies = eventually(T, "the streamed reply is finished", || async {
        let r = w.slack.bot_messages("general");
        (r.len() == 1 && r[0].text == expected).then_some(r)
    })
    .await;
    assert_eq!(replies[0].thread_ts.as_deref(), Some(ts.as_str()), "the draft is posted in the thread");
    let posted = w.slack.calls("chat.postMessage");
    assert_eq!(posted.len(), 1, "one message, edited in place: {posted:?}");
    let first = posted[0].body["text"].as_str().unwrap_or("");
    assert!(expected.starts_with(first.trim_end()) && first.len() < expected.len(), "the draft held the text so far: {first:?}");
    let edits = w.slack.edits_of(&replies[0].ts);
    assert!(edits.len() >= 2, "it grew through several chat.update calls: {edits:?}");
    assert_eq!(edits.last().map(String::as_str), Some(expected));
    for pair in edits.windows(2) {
        assert!(pair[1].starts_with(pair[0].trim_end()) && pair[1].len() >= pair[0].len(), "edits only grow: {edits:?}");
    }
    assert!(w.slack.deleted().is_empty());
    assert_eq!(upstream.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_fails_midway_is_deleted_and_answered_again() {
    let (w, upstream) = streaming_world(Duration::from_millis(100), "stream_edit_interval_ms = 100").await;
    upstream.push(fake_openai::Script::FailMidStream {
        pieces: fake_openai::pieces("This answer will break off before it is finished"),
        delay: Duration::from_millis(100),
        message: "The server is overloaded".into(),
    });
    w.slack.user_says("alice", "general", &mention("are you there"), None).await;
    let replies = eventually(T, "the retried answer", || async {
        let r = w.slack.bot_messages("general");
        (r.len() == 1 && r[0].text == "You said: are you there").then_some(r)
    })
    .await;
    let deleted = w.slack.deleted();
    assert_eq!(deleted.len(), 1, "the broken draft was deleted with chat.delete");
    assert_ne!(deleted[0], replies[0].ts);
}

#[test]
fn a_token_file_is_checked_like_a_value_and_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("slack_bot");
    std::fs::write(&token_file, "xoxp-1234-user-token-in-the-wrong-place\n").unwrap();
    let config = format!(
        "[assistants.echo]\nbackend = \"echo\"\n\n[channels.slack]\nkind = \"slack\"\nassistant = \"echo\"\nbot_token = \"file:{}\"\nsigning_secret = \"abc123\"\n",
        token_file.display()
    );
    std::fs::write(dir.path().join("patchbay.toml"), &config).unwrap();
    let check = |dir: &std::path::Path| {
        std::process::Command::new(BIN).current_dir(dir).args(["--config", "patchbay.toml", "config", "check"]).output().unwrap()
    };
    let out = check(dir.path());
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("channels.slack.bot_token") && said.contains("user token"), "{said}");
    assert!(!said.contains("xoxp-1234"), "the file's content is not printed: {said}");
    // The right token in the file passes.
    std::fs::write(&token_file, "xoxb-1234-5678-bot\n").unwrap();
    let out = check(dir.path());
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}
