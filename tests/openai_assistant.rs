//! The `openai` assistant against a fake OpenAI-compatible upstream, behind a loopback
//! channel: what it sends (system prompt, the conversation's earlier turns, the upstream key),
//! streamed and non-streamed answers, and the upstream's failures retried or dead-lettered
//! with the upstream's own words.

mod common;
#[path = "common/fake_openai.rs"]
mod fake_openai;
#[path = "common/recorder.rs"]
mod recorder;

use common::*;
use fake_openai::{FakeOpenAi, Script};
use recorder::*;
use std::time::Duration;

const UPSTREAM_KEY: &str = "sk-test-upstream-0123456789abcdefXYZ";
const WAIT: Duration = Duration::from_secs(30);

fn config(base_url: &str, deliver_url: &str, extra: &str) -> String {
    format!(
        r#"{pipeline}
[assistants.llm]
backend = "openai"
base_url = "{base_url}"
model = "fake-model"
upstream_api_key = "env:UPSTREAM_KEY"
system_prompt = "You are the helpdesk of Example Corp."
{extra}

[channels.desk]
kind = "loopback"
assistant = "llm"
deliver_url = "{deliver_url}"
"#,
        pipeline = fast_pipeline(5)
    )
}

async fn start(extra: &str) -> (Patchbay, FakeOpenAi, Fake, String) {
    let upstream = FakeOpenAi::start().await;
    let rx = Fake::start().await;
    let pb = Patchbay::start_with_env(&config(&upstream.base_url, &rx.url, extra), &[("UPSTREAM_KEY", UPSTREAM_KEY)]);
    let hook = pb.callback_url("desk").await;
    (pb, upstream, rx, hook)
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter().map(|(r, c)| (r.to_string(), c.to_string())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_system_prompt_and_the_conversations_earlier_turns_are_sent() {
    let (pb, upstream, rx, hook) = start("").await;
    send(&hook, "m1", "ada", "my name is Ada").await;
    wait_delivered(&rx, "You said: my name is Ada").await;
    send(&hook, "m2", "ada", "what is my name?").await;
    wait_delivered(&rx, "You said: what is my name?").await;
    send(&hook, "m3", "bob", "hello").await;
    wait_delivered(&rx, "You said: hello").await;

    let reqs = upstream.requests();
    assert_eq!(reqs.len(), 3);
    let system = ("system", "You are the helpdesk of Example Corp.");
    assert_eq!(reqs[0].messages(), pairs(&[system, ("user", "my name is Ada")]));
    assert_eq!(
        reqs[1].messages(),
        pairs(&[system, ("user", "my name is Ada"), ("assistant", "You said: my name is Ada"), ("user", "what is my name?")]),
        "the conversation's earlier turns come along"
    );
    assert_eq!(reqs[2].messages(), pairs(&[system, ("user", "hello")]), "another conversation has its own turns");
    for r in &reqs {
        assert_eq!(r.headers.get("authorization").map(String::as_str), Some(format!("Bearer {UPSTREAM_KEY}").as_str()));
        assert_eq!(r.body["model"], "fake-model");
        assert_eq!(r.body["stream"], true);
    }

    // A repeated message is answered once and remembered once.
    send(&hook, "m2", "ada", "what is my name?").await;
    send(&hook, "m4", "ada", "thanks").await;
    wait_delivered(&rx, "You said: thanks").await;
    let last = upstream.requests().last().unwrap().messages();
    assert_eq!(last.iter().filter(|(_, c)| c == "what is my name?").count(), 1, "{last:?}");
    assert_eq!(rx.delivered_texts().iter().filter(|t| *t == "You said: what is my name?").count(), 1);

    // The upstream key is a secret: not in the admin API, not in the log.
    let (status, v) = pb.admin("GET", "/api/v1/assistants/llm", None).await;
    assert_eq!(status, 200, "{v}");
    assert!(!v.to_string().contains(UPSTREAM_KEY), "{v}");
    assert!(v.to_string().contains("upstream_api_key"), "the key is listed as set: {v}");
    assert!(!pb.stderr().contains(UPSTREAM_KEY));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_streaming_upstream_is_read_whole_and_history_can_be_off() {
    let (_pb, upstream, rx, hook) = start("stream = false\nhistory_turns = 0").await;
    send(&hook, "m1", "c", "first").await;
    wait_delivered(&rx, "You said: first").await;
    send(&hook, "m2", "c", "second").await;
    wait_delivered(&rx, "You said: second").await;
    let reqs = upstream.requests();
    assert_eq!(reqs[1].body["stream"], false);
    assert_eq!(reqs[1].messages(), pairs(&[("system", "You are the helpdesk of Example Corp."), ("user", "second")]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failures_are_retried_and_rejections_dead_lettered_in_the_upstreams_words() {
    let (pb, upstream, rx, hook) = start("").await;
    // 429 with Retry-After, then a stream that breaks off, then one that fails midway: each
    // is tried again, and the message is answered once.
    upstream.push(Script::Error { status: 429, message: "Rate limit reached for requests".into(), code: "rate_limit_exceeded".into(), retry_after: Some(1) });
    upstream.push(Script::BreakOff { pieces: fake_openai::pieces("half an") });
    upstream.push(Script::FailMidStream { pieces: fake_openai::pieces("half"), delay: Duration::ZERO, message: "The server is overloaded".into() });
    send(&hook, "m1", "c", "are you up?").await;
    wait_delivered(&rx, "You said: are you up?").await;
    let reqs = upstream.requests();
    assert_eq!(reqs.len(), 4, "three failures, then the answer");
    assert_eq!(rx.delivered_texts(), ["You said: are you up?"], "nothing of the broken attempts was delivered");

    // A rejected key is not worth retrying: dead-lettered with what OpenAI said and what to check.
    upstream.push(Script::Error { status: 401, message: "Incorrect API key provided: sk-te****XYZ".into(), code: "invalid_api_key".into(), retry_after: None });
    send(&hook, "m2", "c", "hello?").await;
    let dead = eventually(WAIT, "a dead letter", || async {
        let d = dead_letters(&pb).await;
        (!d.is_empty()).then_some(d)
    })
    .await;
    let reason = dead[0]["reason"].as_str().unwrap_or_default().to_owned();
    assert!(reason.contains("Incorrect API key provided"), "{reason}");
    assert!(reason.contains("upstream_api_key"), "says what to check: {reason}");
    assert_eq!(upstream.requests().len(), 5, "a 401 is not retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_errors_name_the_field() {
    let upstream = FakeOpenAi::start().await;
    let mut pb = Patchbay::start(&loopback_config("x", "http://127.0.0.1:9/none"));
    let (status, v) = pb
        .admin("POST", "/api/v1/assistants", Some(serde_json::json!({"id": "bad", "backend": "openai", "settings": {"base_url": upstream.base_url}})))
        .await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["field"], "settings.model", "{v}");
    pb.terminate();
}
