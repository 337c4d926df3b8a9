//! Toggles and the supervisor, as an admin sees them: a toggle is seen by the next request
//! at once and by the channel's connector within a second; a disabled channel never reaches
//! its assistant; work accepted before a channel was disabled is held (durably, across a
//! restart) and goes out when it is enabled again.

mod common;
#[path = "common/recorder.rs"]
mod recorder;

use common::*;
use recorder::*;
use serde_json::{json, Value};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);
/// DESIGN.md: a toggle starts/stops the channel's connector within a second.
const TOGGLE: Duration = Duration::from_secs(1);

/// A webhook assistant in front of `assistant_url`, a loopback channel `ch` (with a
/// connector when `connector`) delivering to `deliver_url`.
fn config(assistant_url: &str, deliver_url: &str, connector: bool) -> String {
    format!(
        r#"{pipeline}
[assistants.bot]
backend = "webhook"
url = "{assistant_url}"
secret = "toggle-secret-0123456789"
timeout_ms = 5000

[channels.ch]
kind = "loopback"
assistant = "bot"
deliver_url = "{deliver_url}"
connector = {connector}
"#,
        pipeline = fast_pipeline(10)
    )
}

fn replies(text: &str) -> Answer {
    Answer::json(200, json!({"replies": [{"text": text}]}))
}

async fn state(pb: &Patchbay) -> (bool, String) {
    let (status, v) = pb.admin("GET", "/api/v1/channels/ch", None).await;
    assert_eq!(status, 200, "{v}");
    (v["enabled"].as_bool().unwrap(), v["status"]["state"].as_str().unwrap().to_owned())
}

async fn toggle(pb: &Patchbay, enabled: bool) -> Value {
    let (status, v) = pb.admin("PATCH", "/api/v1/channels/ch", Some(json!({"enabled": enabled}))).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["enabled"], enabled, "{v}");
    v
}

/// Lines of the log that say `what` about channel `ch` (colours, if any, removed).
fn log_lines(pb: &Patchbay, what: &str) -> usize {
    let mut plain = String::new();
    let mut chars = pb.stderr().chars().collect::<Vec<_>>().into_iter();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain.lines().filter(|l| l.contains(what) && l.contains("channel=ch")).count()
}

async fn queues(pb: &Patchbay) -> Value {
    let (status, v) = pb.call("GET", "/readyz", None, None).await;
    assert_eq!(status, 200, "{v}");
    v["queues"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connector_runs_only_while_the_channel_is_enabled() {
    let assistant = Fake::start().await;
    let rx = Fake::start().await;
    let pb = Patchbay::start(&config(&assistant.url, &rx.url, true));

    eventually(WAIT, "connected at start", || async { (state(&pb).await.1 == "connected").then_some(()) }).await;
    assert_eq!(log_lines(&pb, "starting connector"), 1, "{}", pb.stderr());
    assert_eq!(log_lines(&pb, "stopping connector"), 0, "{}", pb.stderr());

    // Disabled: the answer to the PATCH and the next read say so at once…
    let v = toggle(&pb, false).await;
    assert_eq!(v["status"]["state"], "disabled", "{v}");
    assert_eq!(state(&pb).await, (false, "disabled".into()));
    // …and the connector is stopped within a second.
    eventually(TOGGLE, "the connector stopped", || async {
        (log_lines(&pb, "stopping connector") == 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(state(&pb).await, (false, "disabled".into()), "stays disabled");
    assert_eq!(log_lines(&pb, "starting connector"), 1, "not restarted while disabled");

    // Enabled again: a new connector runs and reports connected within a second.
    toggle(&pb, true).await;
    eventually(TOGGLE, "connected again", || async {
        (log_lines(&pb, "starting connector") == 2 && state(&pb).await == (true, "connected".into())).then_some(())
    })
    .await;

    // Twice more, to be sure it is not a one-off.
    toggle(&pb, false).await;
    eventually(TOGGLE, "stopped again", || async { (log_lines(&pb, "stopping connector") == 2).then_some(()) }).await;
    toggle(&pb, true).await;
    eventually(TOGGLE, "connected a third time", || async {
        (log_lines(&pb, "starting connector") == 3 && state(&pb).await.1 == "connected").then_some(())
    })
    .await;
    assistant.stop().await;
    rx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_channel_never_reaches_its_assistant() {
    let assistant = Fake::start().await;
    assistant.respond_with(|v| replies(&format!("answer to {}", v["text"].as_str().unwrap_or_default())));
    let rx = Fake::start().await;
    let pb = Patchbay::start(&config(&assistant.url, &rx.url, false));
    let hook = pb.callback_url("ch").await;

    toggle(&pb, false).await;
    // The very next request sees the toggle. The platform gets a 200 (so it neither retries
    // nor disables the app), and nothing is accepted.
    for i in 0..5 {
        let (status, v) = send(&hook, &format!("off-{i}"), "room", "anyone there?").await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["accepted"], false, "{v}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(assistant.arrived(), 0, "the assistant was reached through a disabled channel");
    assert!(rx.hits().is_empty(), "something was posted for a disabled channel");
    assert_eq!(queues(&pb).await["inbox"], 0);
    let (_, metrics) = pb.call("GET", "/metrics", None, None).await;
    let metrics = metrics.as_str().unwrap_or_default().to_owned();
    assert!(
        metrics.contains("patchbay_messages_dropped_disabled_total{channel=\"ch\"} 5"),
        "{metrics}"
    );

    // Enabled: the very next request goes through. Nothing of what was dropped was kept, so
    // a platform redelivering one of those events now gets it answered.
    toggle(&pb, true).await;
    let (status, v) = send(&hook, "off-0", "room", "now?").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["accepted"], true, "{v}");
    assert_eq!(v["duplicate"], false, "{v}");
    eventually(WAIT, "answered", || async {
        rx.delivered_texts().iter().any(|t| t == "answer to now?").then_some(())
    })
    .await;
    assert_eq!(assistant.hits().len(), 1);
    assert_eq!(assistant.hits()[0].json["text"], "now?");
    assistant.stop().await;
    rx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_made_before_disabling_is_held_across_a_restart_and_delivered_after_enabling() {
    let assistant = Fake::start().await;
    assistant.respond_with(|_| replies("worth the wait"));
    let rx = Fake::start().await;
    let mut pb = Patchbay::start(&config(&assistant.url, &rx.url, false));
    let hook = pb.callback_url("ch").await;

    // The message is with the assistant when the channel is disabled.
    assistant.hold();
    let (_, v) = send(&hook, "m1", "room", "question").await;
    assert_eq!(v["accepted"], true, "{v}");
    eventually(WAIT, "the assistant asked", || async { (assistant.arrived() == 1).then_some(()) }).await;
    toggle(&pb, false).await;
    assistant.release();

    // Its reply is queued, not posted, while the channel is disabled.
    eventually(WAIT, "the reply queued", || async { (queues(&pb).await["outbox"] == 1).then_some(()) }).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(rx.hits().is_empty(), "a reply was posted through a disabled channel: {:?}", rx.hits());

    // A restart neither re-enables the channel (config says enabled) nor loses the reply.
    let exit = pb.terminate();
    assert!(exit.success(), "{exit:?}");
    pb.start_again();
    assert_eq!(state(&pb).await, (false, "disabled".into()), "a restart re-enabled the channel");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(rx.hits().is_empty(), "a reply was posted through a disabled channel after restart");
    assert_eq!(queues(&pb).await["outbox"], 1);

    toggle(&pb, true).await;
    eventually(WAIT, "delivered once enabled", || async {
        (rx.delivered_texts() == vec!["worth the wait"]).then_some(())
    })
    .await;
    assert_eq!(assistant.hits().len(), 1);
    assistant.stop().await;
    rx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_waiting_for_a_retry_is_not_sent_to_the_assistant_while_disabled() {
    let assistant = Fake::start().await;
    // The assistant is busy and asks for 1 s; meanwhile the channel is disabled.
    assistant.push(Answer::status(503).retry_after(1));
    assistant.respond_with(|_| replies("back again"));
    let rx = Fake::start().await;
    let pb = Patchbay::start(&config(&assistant.url, &rx.url, false));
    let hook = pb.callback_url("ch").await;

    let (_, v) = send(&hook, "m1", "room", "hello?").await;
    assert_eq!(v["accepted"], true, "{v}");
    eventually(WAIT, "first attempt", || async { (assistant.hits().len() == 1).then_some(()) }).await;
    toggle(&pb, false).await;
    // Well past the retry time: still one attempt, still queued.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(assistant.arrived(), 1, "the assistant was asked while the channel was disabled");
    assert_eq!(queues(&pb).await["inbox"], 1);
    assert!(rx.hits().is_empty());

    toggle(&pb, true).await;
    eventually(WAIT, "answered once enabled", || async {
        (rx.delivered_texts() == vec!["back again"]).then_some(())
    })
    .await;
    assert_eq!(assistant.hits().len(), 2);
    assistant.stop().await;
    rx.stop().await;
}
