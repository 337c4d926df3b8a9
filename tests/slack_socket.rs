//! The Slack channel in Socket Mode, end to end: the real binary on the fake Slack's Socket
//! Mode WebSocket (hello, envelopes and acks, disconnect/refresh, dropped and silent links).

mod common;
#[path = "common/fake_slack.rs"]
mod fake_slack;

use common::*;
use fake_slack::{FakeSlack, BOT_USER};
use serde_json::{json, Value};
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

struct World {
    pb: Patchbay,
    slack: FakeSlack,
}

async fn start(extra: &str) -> World {
    start_n(extra, 1).await
}

/// [`start`], waiting for `links` live links.
async fn start_n(extra: &str, links: usize) -> World {
    let slack = FakeSlack::start().await;
    slack.add_user("alice");
    slack.join("alice", "general");
    let config = format!(
        r#"
[pipeline]
retry_initial_ms = 50
retry_max_ms = 400

[assistants.echo]
backend = "echo"

[channels.slack]
kind = "slack"
assistant = "echo"
socket_mode = true
bot_token = "{}"
app_token = "{}"
api_url = "{}"
{extra}
"#,
        slack.bot_token,
        slack.app_token,
        slack.api_url()
    );
    let pb = Patchbay::start(&config);
    let w = World { pb, slack };
    w.wait_live(links).await;
    w
}

fn mention(text: &str) -> String {
    format!("<@{BOT_USER}> {text}")
}

impl World {
    async fn status(&self) -> Value {
        let (s, v) = self.pb.admin("GET", "/api/v1/channels/slack", None).await;
        assert_eq!(s, 200, "{v}");
        v["status"].clone()
    }

    async fn wait_live(&self, n: usize) {
        eventually(T, &format!("{n} live Socket Mode links"), || async {
            let st = self.status().await;
            (st["state"] == "connected" && self.slack.live_connections().len() == n).then_some(())
        })
        .await;
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
        let key = format!("{name}{{channel=\"slack\"}} ");
        v.as_str().unwrap_or_default().lines().find_map(|l| l.strip_prefix(&key)).and_then(|n| n.trim().parse().ok()).unwrap_or(0)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelopes_are_acknowledged_once_stored_and_a_mention_is_answered_once() {
    let w = start("").await;
    let open = &w.slack.calls("apps.connections.open")[0];
    assert!(open.authorization.as_deref().is_some_and(|a| a.starts_with("Bearer xapp-")), "the app-level token, in the header");
    let st = w.status().await;
    assert_eq!(st["details"]["bot"], format!("@helpdesk ({BOT_USER})"), "{st}");
    assert_eq!(st["details"]["connections"], "1 of 1");

    let (ts, deliveries) = w.slack.user_says("alice", "general", &mention("is the VPN down?"), None).await;
    assert_eq!(deliveries.len(), 2, "app_mention and message");
    for d in &deliveries {
        assert_eq!(d.attempts.len(), 1, "acknowledged at once: {d:?}");
        assert!(d.acked());
    }
    // The ack came after the inbox write: both are counted the moment the acks are in.
    assert_eq!(w.metric("patchbay_messages_received_total").await, 2);
    assert_eq!(w.metric("patchbay_messages_duplicate_total").await, 1);
    let replies = w.wait_bot_messages("general", 1).await;
    assert_eq!(replies[0].text, "echo: is the VPN down?");
    assert_eq!(replies[0].thread_ts.as_deref(), Some(ts.as_str()));

    // A redelivered envelope (Slack thought the ack was late) is acknowledged, not answered.
    let (_, bodies) = w.slack.post_as_user("alice", "general", &mention("again"), None);
    assert!(w.slack.deliver(bodies[0].clone()).await.acked());
    assert!(w.slack.deliver(bodies[0].clone()).await.acked());
    let replies = w.wait_bot_messages("general", 2).await;
    assert_eq!(replies.len(), 2);
    assert_eq!(w.metric("patchbay_messages_duplicate_total").await, 2);
    // The bot's own message coming back over the socket is acknowledged and ignored.
    assert!(w.slack.deliver(w.slack.echo_of(&replies[1])).await.acked());
    assert_eq!(w.metric("patchbay_messages_received_total").await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_opens_the_new_link_before_closing_the_old() {
    let w = start("").await;
    for (round, reason) in ["refresh_requested", "warning"].into_iter().enumerate() {
        let old = w.slack.live_connections()[0];
        // Slack would close it itself much later; patchbay must not wait for that.
        w.slack.disconnect(old, reason, Duration::from_secs(30));
        let conns = eventually(T, "the old link closed", || async {
            let c = w.slack.connections();
            c[old].closed_at.is_some().then_some(c)
        })
        .await;
        let new = &conns[round + 1];
        assert_eq!(conns[old].closed_by, Some("client"), "{reason}: patchbay closed it");
        assert!(new.opened_at < conns[old].closed_at.unwrap(), "{reason}: make before break");
        assert_eq!(w.slack.calls("apps.connections.open").len(), round + 2, "a fresh URL for each link");
        w.wait_live(1).await;
    }
    w.slack.user_says("alice", "general", &mention("still there?"), None).await;
    let replies = w.wait_bot_messages("general", 1).await;
    assert_eq!(replies[0].text, "echo: still there?");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_link_is_reopened_with_a_fresh_url() {
    let w = start("").await;
    w.slack.drop_connection(0);
    w.wait_live(1).await;
    assert_eq!(w.slack.live_connections(), vec![1]);
    assert_eq!(w.slack.calls("apps.connections.open").len(), 2);
    let st = w.status().await;
    assert_eq!(st["reconnects"], 1, "{st}");
    w.slack.user_says("alice", "general", &mention("back?"), None).await;
    assert_eq!(w.wait_bot_messages("general", 1).await[0].text, "echo: back?");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_link_is_declared_dead_and_replaced() {
    let w = start("ping_interval_ms = 200").await;
    eventually(T, "patchbay pings", || async { (w.slack.connections()[0].pings_received >= 2).then_some(()) }).await;
    w.slack.stall(true);
    let st = eventually(T, "the silent link is given up", || async {
        let st = w.status().await;
        st["last_error"]["message"].as_str().is_some_and(|m| m.contains("the link is dead")).then_some(st)
    })
    .await;
    assert!(st["reconnects"].as_u64().unwrap() >= 1, "{st}");
    w.slack.stall(false);
    eventually(T, "the fake sees the old link closed", || async {
        (w.slack.connections()[0].closed_at.is_some()).then_some(())
    })
    .await;
    assert_eq!(w.slack.connections()[0].closed_by, Some("client"));
    eventually(T, "a new link", || async {
        let live = w.slack.live_connections();
        (!live.is_empty() && !live.contains(&0)).then_some(())
    })
    .await;
    w.wait_live(1).await;
    w.slack.user_says("alice", "general", &mention("alive?"), None).await;
    assert_eq!(w.wait_bot_messages("general", 1).await[0].text, "echo: alive?");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_disabled_fails_the_channel_instead_of_reconnecting() {
    let w = start("").await;
    w.slack.set_socket_mode(false);
    w.slack.disconnect(0, "link_disabled", Duration::from_secs(30));
    let st = eventually(T, "the channel is failed", || async {
        let st = w.status().await;
        (st["state"] == "failed").then_some(st)
    })
    .await;
    let msg = st["last_error"]["message"].as_str().unwrap();
    assert!(msg.contains("link_disabled") && msg.contains("Socket Mode"), "{msg}");
    assert_eq!(w.slack.connections()[0].closed_by, Some("client"));
    assert_eq!(w.slack.calls("apps.connections.open").len(), 1, "no reconnect loop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_connections_share_the_events_and_disabling_closes_them() {
    let w = start_n("connections = 3", 3).await;
    assert_eq!(w.status().await["details"]["connections"], "3 of 3");
    for i in 0..6 {
        w.slack.user_says("alice", "general", &mention(&format!("q{i}")), None).await;
    }
    let replies = w.wait_bot_messages("general", 6).await;
    assert_eq!(replies.len(), 6);
    let acking = w.slack.connections().iter().filter(|c| !c.acks.is_empty()).count();
    assert!(acking >= 2, "events went to more than one link");

    let (s, v) = w.pb.admin("PATCH", "/api/v1/channels/slack", Some(json!({"enabled": false}))).await;
    assert_eq!(s, 200, "{v}");
    eventually(T, "every link closed", || async { w.slack.live_connections().is_empty().then_some(()) }).await;
    assert!(w.slack.connections().iter().all(|c| c.closed_by == Some("client")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_app_token_fails_the_channel_and_says_what_to_do() {
    let w = start("").await;
    w.slack.revoke(&w.slack.app_token.clone());
    w.slack.drop_connection(0);
    let st = eventually(T, "the channel is failed", || async {
        let st = w.status().await;
        (st["state"] == "failed").then_some(st)
    })
    .await;
    let msg = st["last_error"]["message"].as_str().unwrap();
    assert!(msg.contains("token_revoked") && msg.contains("app-level token"), "{msg}");
    assert!(!msg.contains(&w.slack.app_token));
    assert!(!w.pb.stderr().contains(&w.slack.app_token), "no secret in the logs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_process_on_the_same_app_token_is_reported() {
    let w = start("").await;
    // A forgotten instance elsewhere opens a link with the same app token: Slack now splits
    // the events between the two, and tells the next link so in its hello.
    let open: Value = reqwest::Client::new()
        .post(format!("{}/apps.connections.open", w.slack.api_url()))
        .bearer_auth(&w.slack.app_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (_other, _) = tokio_tungstenite::connect_async(open["url"].as_str().unwrap()).await.unwrap();
    eventually(T, "two live links", || async { (w.slack.live_connections().len() == 2).then_some(()) }).await;
    w.slack.drop_connection(0);
    let st = eventually(T, "the status says so", || async {
        let st = w.status().await;
        st["last_error"]["message"].as_str().is_some_and(|m| m.contains("another process")).then_some(st)
    })
    .await;
    assert!(st["last_error"]["message"].as_str().unwrap().contains("2 Socket Mode connections"), "{st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_reconnects_back_off_exponentially() {
    let w = start("").await;
    w.slack.fail_next("apps.connections.open", fake_slack::Fault::Error("internal_error"));
    w.slack.fail_next("apps.connections.open", fake_slack::Fault::Status(503));
    w.slack.drop_connection(0);
    w.wait_live(1).await;
    let calls = w.slack.calls("apps.connections.open");
    assert_eq!(calls.len(), 4, "the first link, two refusals, the new link: {calls:?}");
    assert_eq!((calls[1].error.as_str(), calls[2].error.as_str(), calls[3].error.as_str()), ("internal_error", "http_503", ""));
    // Backoff with equal jitter from 1 s, doubling: each wait at least half its nominal delay.
    let gaps = [calls[2].at - calls[1].at, calls[3].at - calls[2].at];
    assert!(gaps[0] >= Duration::from_secs(1) && gaps[1] >= Duration::from_secs(2), "{gaps:?}");
    w.slack.user_says("alice", "general", &mention("recovered?"), None).await;
    assert_eq!(w.wait_bot_messages("general", 1).await[0].text, "echo: recovered?");
}
