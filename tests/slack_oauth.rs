//! The Slack channel's OAuth v2 install, end to end: "Add to Slack" through the fake's
//! authorize page, the code exchanged with HTTP Basic client authentication, the workspace's
//! token sealed in the store and used for replies, rotation, and uninstall.

mod common;
#[path = "common/fake_slack.rs"]
mod fake_slack;

use common::*;
use fake_slack::{FakeSlack, Settings, BOT_USER, CLIENT_ID, CLIENT_SECRET};
use serde_json::{json, Value};
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

struct World {
    pb: Patchbay,
    slack: FakeSlack,
    hook: String,
}

/// patchbay with an OAuth-installable channel `slack` (no bot_token), set as the Request URL.
async fn start(settings: Settings) -> World {
    let slack = FakeSlack::start_with(settings).await;
    slack.add_user("alice");
    slack.join("alice", "general");
    let config = format!(
        r#"
[pipeline]
retry_initial_ms = 50
retry_max_ms = 400
max_attempts = 3

[assistants.echo]
backend = "echo"

[channels.slack]
kind = "slack"
assistant = "echo"
signing_secret = "{}"
client_id = "{CLIENT_ID}"
client_secret = "{CLIENT_SECRET}"
api_url = "{}"
"#,
        slack.signing_secret(),
        slack.api_url()
    );
    let pb = Patchbay::start(&config);
    let hook = pb.callback_url("slack").await;
    assert!(slack.set_request_url(&hook).await);
    World { pb, slack, hook }
}

fn mention(text: &str) -> String {
    format!("<@{BOT_USER}> {text}")
}

impl World {
    async fn wait_bot_messages(&self, n: usize) -> Vec<fake_slack::Msg> {
        eventually(T, &format!("{n} bot messages"), || async {
            let m = self.slack.bot_messages("general");
            (m.len() >= n).then_some(m)
        })
        .await
    }

    async fn status(&self) -> Value {
        let (_, v) = self.pb.admin("GET", "/api/v1/channels/slack", None).await;
        v["status"].clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_install_stores_the_workspace_token_sealed_and_replies_use_it() {
    let mut w = start(Settings::default()).await;
    let run = w.slack.install(&format!("{}/install", w.hook)).await;
    assert_eq!(run.install_status, 302, "{run:?}");
    let cookie = run.set_cookie.clone().unwrap();
    assert!(cookie.contains("Secure") && cookie.contains("HttpOnly") && cookie.contains("Max-Age=600"), "{cookie}");
    let authorize = run.authorize_url.clone().unwrap();
    assert!(authorize.starts_with(&format!("{}/oauth/v2/authorize?", w.slack.api_url().trim_end_matches("/api"))), "{authorize}");
    assert!(authorize.contains("scope=app_mentions%3Aread") && authorize.contains("state="), "{authorize}");
    assert_eq!(run.status, 200, "{run:?}");
    assert!(run.body.contains("Acme"), "{}", run.body);

    let exchange = &w.slack.calls("oauth.v2.access")[0];
    assert!(exchange.authorization.as_deref().is_some_and(|a| a.starts_with("Basic ")), "HTTP Basic client auth");
    assert!(exchange.body.get("client_secret").is_none(), "the secret is not in the form: {:?}", exchange.body);
    assert_eq!(exchange.body["redirect_uri"], format!("{}/oauth/callback", w.hook));

    let token = w.slack.installed_tokens()[0].clone();
    w.slack.user_says("alice", "general", &mention("hello from Acme"), None).await;
    assert_eq!(w.wait_bot_messages(1).await[0].text, "echo: hello from Acme");
    let post = w.slack.calls("chat.postMessage").pop().unwrap();
    assert_eq!(post.authorization.as_deref(), Some(format!("Bearer {token}").as_str()), "the workspace's own token");

    // Sealed at rest: the token is nowhere in the database files, nor in the logs.
    for entry in std::fs::read_dir(w.pb.path().join("data")).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        assert!(!bytes.windows(token.len()).any(|win| win == token.as_bytes()), "token in plain text in the data directory");
    }
    assert!(!w.pb.stderr().contains(&token));
    let (_, r) = w.pb.admin("POST", "/api/v1/channels/slack/check", None).await;
    assert_eq!(r["report"]["ok"], true, "{r}");
    assert!(r["report"]["steps"][0]["detail"].as_str().unwrap().contains("installed in Acme"), "{r}");

    // It survives a restart (on a new port: the Request URL is set again).
    w.pb.restart();
    w.hook = w.pb.callback_url("slack").await;
    assert!(w.slack.set_request_url(&w.hook).await);
    w.slack.user_says("alice", "general", &mention("after the restart"), None).await;
    assert_eq!(w.wait_bot_messages(2).await[1].text, "echo: after the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_is_single_use_and_bound_to_the_browser() {
    let w = start(Settings::default()).await;
    let run = w.slack.install(&format!("{}/install", w.hook)).await;
    assert_eq!(run.status, 200, "{run:?}");
    let callback = run.callback_url.clone().unwrap();
    let cookie = run.set_cookie.clone().unwrap();
    let cookie = cookie.split(';').next().unwrap().to_owned();
    let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    // Replayed with the same cookie: the state was used.
    let r = client.get(&callback).header("cookie", &cookie).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 403);
    assert!(r.text().await.unwrap().contains("already used"));

    // A fresh install whose callback arrives without the cookie, or with another browser's.
    let no_redirect = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let start_resp = no_redirect.get(format!("{}/install", w.hook)).send().await.unwrap();
    let authorize = start_resp.headers()["location"].to_str().unwrap().to_owned();
    let approve = no_redirect.get(&authorize).send().await.unwrap();
    let callback = approve.headers()["location"].to_str().unwrap().to_owned();
    let r = client.get(&callback).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 403, "no cookie");
    assert!(r.text().await.unwrap().contains("not for this browser"));
    let r = client.get(&callback).header("cookie", "patchbay_slack_oauth_state=someone-elses").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 403, "another browser's cookie");
    assert_eq!(w.slack.calls("oauth.v2.access").len(), 1, "only the first, genuine callback reached Slack");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotating_token_is_refreshed_before_it_expires() {
    let w = start(Settings { token_rotation: true, expires_in: 30, ..Settings::default() }).await;
    let run = w.slack.install(&format!("{}/install", w.hook)).await;
    assert_eq!(run.status, 200, "{run:?}");
    let first = w.slack.installed_tokens()[0].clone();
    assert!(first.starts_with("xoxe.xoxb-"));
    w.slack.user_says("alice", "general", &mention("rotate"), None).await;
    assert_eq!(w.wait_bot_messages(1).await[0].text, "echo: rotate");
    let refreshes: Vec<_> = w.slack.calls("oauth.v2.access").into_iter().filter(|c| c.body["grant_type"] == "refresh_token").collect();
    assert!(!refreshes.is_empty(), "a token expiring within a minute is refreshed first");
    assert!(refreshes[0].body["refresh_token"].as_str().unwrap().starts_with("xoxe-1-"));
    assert!(refreshes.iter().all(|c| c.error.is_empty()), "each refresh token used once: {refreshes:?}");
    let post = w.slack.calls("chat.postMessage").pop().unwrap();
    assert_ne!(post.authorization.as_deref(), Some(format!("Bearer {first}").as_str()), "the refreshed token is used");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_uninstalled_removes_the_workspace_tokens() {
    let w = start(Settings::default()).await;
    assert_eq!(w.slack.install(&format!("{}/install", w.hook)).await.status, 200);
    w.slack.user_says("alice", "general", &mention("before"), None).await;
    w.wait_bot_messages(1).await;
    let gone = w.slack.event(json!({"type": "app_uninstalled"}));
    assert!(w.slack.deliver(gone).await.acked());
    w.slack.user_says("alice", "general", &mention("after"), None).await;
    let st = eventually(T, "the channel has no token for the workspace", || async {
        let st = w.status().await;
        (st["state"] == "failed").then_some(st)
    })
    .await;
    assert!(st["last_error"]["message"].as_str().unwrap().contains("no bot token for workspace T0ACME"), "{st}");
    assert_eq!(w.slack.bot_messages("general").len(), 1, "nothing posted after the uninstall");
    let (_, r) = w.pb.admin("POST", "/api/v1/channels/slack/check", None).await;
    assert_eq!(r["report"]["ok"], false, "{r}");
    assert!(r.to_string().contains("/install"), "says how to install: {r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_revoked_for_the_bot_removes_them_too() {
    let w = start(Settings::default()).await;
    assert_eq!(w.slack.install(&format!("{}/install", w.hook)).await.status, 200);
    // A user's token revoked: the bot's stays.
    assert!(w.slack.deliver(w.slack.event(json!({"type": "tokens_revoked", "tokens": {"oauth": ["U0SOMEONE"], "bot": []}}))).await.acked());
    w.slack.user_says("alice", "general", &mention("still?"), None).await;
    assert_eq!(w.wait_bot_messages(1).await[0].text, "echo: still?");
    assert!(w.slack.deliver(w.slack.event(json!({"type": "tokens_revoked", "tokens": {"bot": [BOT_USER]}}))).await.acked());
    w.slack.user_says("alice", "general", &mention("now?"), None).await;
    eventually(T, "failed without a token", || async { (w.status().await["state"] == "failed").then_some(()) }).await;
    assert_eq!(w.slack.bot_messages("general").len(), 1);
}
