//! The `webhook` assistant, held to the contract in DESIGN.md "Assistants": a fake assistant
//! (`Fake`) checks each request's signature and body; replies in the response are delivered;
//! 202 and a later push through `POST /api/v1/conversations/{id}/replies` with the
//! assistant's own key is delivered, with anyone else's key it is not; failures are retried
//! or dead-lettered.

mod common;
#[path = "common/recorder.rs"]
mod recorder;

use common::*;
use recorder::*;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const WAIT: Duration = Duration::from_secs(30);
const SECRET: &str = "s3cret-for-signing-0123456789";
const KEY: &str = "helpdesk-key-0123456789abcdef";
const OTHER_KEY: &str = "other-key-0123456789abcdef";

/// A webhook assistant `helpdesk` (timeout 300 ms) behind channel `help`, and an echo
/// assistant `other` with its own key behind channel `side`.
fn config(assistant_url: &str, deliver_url: &str, max_attempts: u32) -> String {
    format!(
        r#"{pipeline}
[assistants.helpdesk]
backend = "webhook"
url = "{assistant_url}"
secret = "{SECRET}"
api_key = "{KEY}"
timeout_ms = 300

[assistants.other]
backend = "echo"
api_key = "{OTHER_KEY}"

[channels.help]
kind = "loopback"
assistant = "helpdesk"
deliver_url = "{deliver_url}"
wait_timeout_ms = 200

[channels.side]
kind = "loopback"
assistant = "other"
deliver_url = "{deliver_url}"
"#,
        pipeline = fast_pipeline(max_attempts)
    )
}

fn replies(texts: &[&str]) -> Answer {
    Answer::json(200, json!({"replies": texts.iter().map(|t| json!({"text": t})).collect::<Vec<_>>()}))
}

async fn post(hook: &str, body: Value) -> Value {
    let resp = http().post(hook).json(&body).send().await.expect("hook reachable");
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

/// Checks `X-Patchbay-Signature` the way an assistant team would.
fn verify_signature(hit: &Hit) {
    let header = hit.headers.get("x-patchbay-signature").expect("X-Patchbay-Signature is sent");
    let (t, v1) = header
        .split_once(',')
        .and_then(|(t, v)| Some((t.strip_prefix("t=")?, v.strip_prefix("v1=")?)))
        .unwrap_or_else(|| panic!("signature header is not t=<secs>,v1=<hex>: {header}"));
    let t: i64 = t.parse().expect("t is Unix seconds");
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!((now - t).abs() <= 60, "t={t} is not now ({now})");
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(&hit.raw);
    let want = hex::encode(mac.finalize().into_bytes());
    assert_eq!(v1, want, "v1 is not HMAC-SHA256(secret, \"<t>.<raw body>\")");
    assert!(
        hit.headers.get("content-type").is_some_and(|c| c.starts_with("application/json")),
        "{:?}",
        hit.headers
    );
}

async fn push(pb: &Patchbay, conversation: &str, key: Option<&str>, text: &str) -> (u16, Value) {
    pb.call(
        "POST",
        &format!("/api/v1/conversations/{conversation}/replies"),
        Some(json!({"replies": [{"text": text}]})),
        key,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_signed_and_carry_the_contract_fields_and_replies_are_delivered() {
    let assistant = Fake::start().await;
    assistant.respond_with(|_| replies(&["hi", "how can I help?"]));
    let rx = Fake::start().await;
    let pb = Patchbay::start(&config(&assistant.url, &rx.url, 5));
    let hook = pb.callback_url("help").await;

    let v = post(
        &hook,
        json!({"id": "ev-1", "conversation": "town-square", "thread": "t-9", "user": {"id": "u-1", "name": "Ada"}, "text": "hello bot"}),
    )
    .await;
    assert_eq!(v["accepted"], true, "{v}");
    wait_delivered(&rx, "how can I help?").await;

    let hits = assistant.hits();
    assert_eq!(hits.len(), 1);
    let hit = &hits[0];
    verify_signature(hit);
    let b = &hit.json;
    let keys: BTreeSet<&str> = b.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        ["addressed", "channel", "conversation", "id", "received_at", "text", "user"].into_iter().collect(),
        "{b}"
    );
    assert!(b["id"].as_str().is_some_and(|s| !s.is_empty()), "{b}");
    assert_eq!(b["channel"], json!({"id": "help", "kind": "loopback"}));
    assert_eq!(b["conversation"]["thread_id"], "t-9");
    let conv = b["conversation"]["id"].as_str().unwrap();
    assert!(!conv.is_empty() && !conv.contains("town-square"), "an opaque, stable id: {conv}");
    assert_eq!(b["user"], json!({"id": "u-1", "name": "Ada"}));
    assert_eq!(b["text"], "hello bot");
    assert_eq!(b["addressed"], true);
    let received = humantime::parse_rfc3339(b["received_at"].as_str().unwrap()).expect("received_at is RFC 3339");
    let age = SystemTime::now().duration_since(received).unwrap_or_default();
    assert!(age < Duration::from_secs(60), "received_at is not when it was received: {b}");

    // Both replies, in order, to the conversation and thread the message came from.
    let ok = rx.ok();
    let texts: Vec<&str> = ok.iter().map(|r| r["reply"]["text"].as_str().unwrap()).collect();
    assert_eq!(texts, vec!["hi", "how can I help?"]);
    for r in &ok {
        assert_eq!(r["platform_conversation"], "town-square", "{r}");
        assert_eq!(r["thread"], "t-9", "{r}");
        assert_eq!(r["conversation_id"], conv, "{r}");
    }

    // The same conversation keeps its id; the message id is stable across attempts but
    // differs between messages.
    post(&hook, json!({"id": "ev-2", "conversation": "town-square", "thread": "t-9", "text": "again"})).await;
    eventually(WAIT, "second request", || async { (assistant.hits().len() == 2).then_some(()) }).await;
    let second = &assistant.hits()[1];
    verify_signature(second);
    assert_eq!(second.json["conversation"]["id"], conv);
    assert_ne!(second.json["id"], b["id"]);
    assistant.stop().await;
    rx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_202_the_assistant_pushes_with_its_own_key_and_only_its_own_key() {
    let assistant = Fake::start().await;
    assistant.respond_with(|_| Answer::status(202));
    let rx = Fake::start().await;
    let pb = Patchbay::start(&config(&assistant.url, &rx.url, 5));
    let hook = pb.callback_url("help").await;

    post(&hook, json!({"id": "ev-1", "conversation": "room", "text": "think about it"})).await;
    let hit = eventually(WAIT, "the assistant asked", || async { assistant.hits().first().cloned() }).await;
    verify_signature(&hit);
    let conv = hit.json["conversation"]["id"].as_str().unwrap().to_owned();

    // An assistant may push as soon as it has answered 202.
    let (status, v) = push(&pb, &conv, Some(KEY), "here is my answer").await;
    assert_eq!(status, 202, "{v}");
    assert_eq!(v["reply_ids"].as_array().map(Vec::len), Some(1), "{v}");
    wait_delivered(&rx, "here is my answer").await;
    let ok = rx.ok();
    assert_eq!(ok.len(), 1, "the 202 itself delivers nothing: {ok:?}");
    assert_eq!(ok[0]["platform_conversation"], "room");

    // Another assistant's key cannot reach this conversation: it looks like no conversation.
    let (status, v) = push(&pb, &conv, Some(OTHER_KEY), "hijack").await;
    assert_eq!(status, 404, "{v}");
    assert!(v["error"]["code"].is_string() && v["error"]["message"].is_string(), "{v}");
    // No key, or a key of no assistant (the admin token is not an assistant key either).
    let (status, v) = push(&pb, &conv, None, "anonymous").await;
    assert_eq!(status, 401, "{v}");
    let (status, v) = push(&pb, &conv, Some("not-a-key-of-anyone-0123456789"), "guess").await;
    assert_eq!(status, 401, "{v}");
    let (status, v) = push(&pb, &conv, Some(&pb.token), "admin").await;
    assert_eq!(status, 401, "{v}");
    // The right key on a conversation that does not exist.
    let (status, v) = push(&pb, "c_00000000000000000000000000000000", Some(KEY), "nowhere").await;
    assert_eq!(status, 404, "{v}");

    // And the other assistant's key does reach its own conversations.
    let side = pb.callback_url("side").await;
    post(&side, json!({"id": "ev-s", "conversation": "side-room", "text": "ping"})).await;
    wait_delivered(&rx, "echo: ping").await;
    let side_conv = rx
        .ok()
        .iter()
        .find(|r| r["reply"]["text"] == "echo: ping")
        .map(|r| r["conversation_id"].as_str().unwrap().to_owned())
        .unwrap();
    let (status, v) = push(&pb, &side_conv, Some(KEY), "not mine").await;
    assert_eq!(status, 404, "{v}");
    let (status, v) = push(&pb, &side_conv, Some(OTHER_KEY), "mine").await;
    assert_eq!(status, 202, "{v}");
    wait_delivered(&rx, "mine").await;

    tokio::time::sleep(Duration::from_millis(300)).await;
    let texts = rx.delivered_texts();
    for t in ["hijack", "anonymous", "guess", "admin", "nowhere", "not mine"] {
        assert!(!texts.iter().any(|x| x == t), "`{t}` was delivered: {texts:?}");
    }
    assistant.stop().await;
    rx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assistant_failing_with_500_is_retried_and_answered_once() {
    let assistant = Fake::start().await;
    assistant.push(Answer::status(500).body("oops"));
    assistant.push(Answer::status(500).body("oops again"));
    assistant.respond_with(|_| replies(&["finally"]));
    let rx = Fake::start().await;
    let pb = Patchbay::start(&config(&assistant.url, &rx.url, 5));
    let hook = pb.callback_url("help").await;

    post(&hook, json!({"id": "ev-1", "conversation": "room", "text": "are you there?"})).await;
    wait_delivered(&rx, "finally").await;
    // The next message of the conversation is answered after, so a repeat would be in by then.
    assistant.respond_with(|_| replies(&["next"]));
    post(&hook, json!({"id": "ev-2", "conversation": "room", "text": "and now?"})).await;
    wait_delivered(&rx, "next").await;

    let hits = assistant.hits();
    let first: Vec<&Hit> = hits.iter().filter(|h| h.json["text"] == "are you there?").collect();
    assert_eq!(first.iter().map(|h| h.status).collect::<Vec<_>>(), vec![500, 500, 200]);
    // Every attempt is signed afresh and carries the same message id.
    for h in &first {
        verify_signature(h);
        assert_eq!(h.json["id"], first[0].json["id"]);
    }
    assert_eq!(rx.delivered_texts(), vec!["finally", "next"]);
    assert!(dead_letters(&pb).await.is_empty());
    assistant.stop().await;
    rx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assistant_rejecting_a_message_with_400_dead_letters_it_with_the_reason() {
    let assistant = Fake::start().await;
    assistant.push(Answer::status(400).body("{\"error\": \"cannot parse the user\"}"));
    assistant.respond_with(|_| replies(&["ok now"]));
    let rx = Fake::start().await;
    let pb = Patchbay::start(&config(&assistant.url, &rx.url, 5));
    let hook = pb.callback_url("help").await;

    post(&hook, json!({"id": "ev-1", "conversation": "room", "text": "weird message"})).await;
    let dead = eventually(WAIT, "a dead letter", || async {
        let d = dead_letters(&pb).await;
        (!d.is_empty()).then_some(d)
    })
    .await;
    let d = &dead[0];
    assert_eq!(d["queue"], "inbox", "{d}");
    assert_eq!(d["channel_id"], "help", "{d}");
    assert_eq!(d["attempts"], 1, "{d}");
    assert_eq!(d["text"], "weird message", "{d}");
    let reason = d["reason"].as_str().unwrap();
    assert!(reason.contains("400") && reason.contains("cannot parse the user"), "{reason}");
    assert_eq!(assistant.hits().len(), 1, "a 400 is not retried");
    assert!(rx.ok().is_empty());

    // Requeued by an admin, it goes to the assistant again and is answered.
    let id = d["id"].as_i64().unwrap();
    let (status, v) = pb.admin("POST", &format!("/api/v1/dead-letters/{id}/retry"), None).await;
    assert_eq!(status, 202, "{v}");
    wait_delivered(&rx, "ok now").await;
    assert_eq!(assistant.hits().len(), 2);
    assert!(dead_letters(&pb).await.is_empty());
    assistant.stop().await;
    rx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assistant_slower_than_its_timeout_is_retried() {
    let assistant = Fake::start().await;
    // timeout_ms = 300: the first answer comes too late and is not used.
    assistant.push(replies(&["too late"]).delay(Duration::from_millis(1500)));
    assistant.respond_with(|_| replies(&["in time"]));
    let rx = Fake::start().await;
    let pb = Patchbay::start(&config(&assistant.url, &rx.url, 5));
    let hook = pb.callback_url("help").await;

    post(&hook, json!({"id": "ev-1", "conversation": "room", "text": "quick question"})).await;
    wait_delivered(&rx, "in time").await;
    let hits = assistant.hits();
    assert!(hits.len() >= 2, "{hits:?}");
    assert!(hits[1].at - hits[0].at >= Duration::from_millis(250), "retried before the timeout");
    assert_eq!(hits[0].json["id"], hits[1].json["id"]);
    // Let the late answer arrive: it must not be delivered.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(rx.delivered_texts(), vec!["in time"]);
    assistant.stop().await;
    rx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inline_wait_that_times_out_answers_pending_and_delivers_later_once() {
    let assistant = Fake::start().await;
    // The channel waits 200 ms for an inline answer; the assistant takes 800 ms.
    assistant.respond_with(|_| replies(&["thought it over"]).delay(Duration::from_millis(800)));
    let rx = Fake::start().await;
    // The assistant's own timeout (300 ms elsewhere) must outlast its 800 ms here.
    let cfg = config(&assistant.url, &rx.url, 5).replace("timeout_ms = 300", "timeout_ms = 5000");
    let pb = Patchbay::start(&cfg);
    let hook = pb.callback_url("help").await;

    let v = post(&hook, json!({"id": "ev-1", "conversation": "room", "text": "hard one", "wait": true})).await;
    assert_eq!(v["accepted"], true, "{v}");
    assert_eq!(v["pending"], true, "{v}");
    assert!(v.get("replies").is_none(), "{v}");
    wait_delivered(&rx, "thought it over").await;
    post(&hook, json!({"id": "ev-2", "conversation": "room", "text": "next"})).await;
    eventually(WAIT, "second answer", || async { (rx.ok().len() >= 2).then_some(()) }).await;
    assert_eq!(rx.delivered_texts(), vec!["thought it over", "thought it over"]);
    assert_eq!(assistant.hits().len(), 2, "each message asked once");
    assistant.stop().await;
    rx.stop().await;
}
