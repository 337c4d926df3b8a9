//! The web chat widget in a real browser: headless Chromium (Debian's `chromium`) opens
//! `/chat`, sends a message and sees the echo; the network between page and service is cut,
//! replies sent meanwhile arrive once it is back, in order and once; quick replies and images
//! render; and with no configuration at all, `patchbay serve` prints a chat URL that works.
//! Screenshots go to `test-artifacts/`.

mod common;
#[path = "common/browser.rs"]
mod browser;
#[path = "common/webchat.rs"]
mod webchat;

use serde_json::{json, Value};
use browser::{Browser, CutProxy};
use common::{http, Patchbay};
use webchat::conversation_id;

const KEY: &str = "pbk_browser_test_key_for_pushing_0001";

async fn push(svc: &Patchbay, user: &str, reply: Value) {
    let url = format!("{}/api/v1/conversations/{}/replies", svc.url, conversation_id("chat", user));
    let resp = http().post(url).bearer_auth(KEY).json(&json!({"replies": [reply]})).send().await.unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
}

/// The page's bot messages, in order.
const BOT_TEXTS: &str = "JSON.stringify([...document.querySelectorAll('.msg.bot')].map(e => e.textContent))";

fn texts(v: &Value) -> Vec<String> {
    serde_json::from_str(v.as_str().unwrap_or("[]")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_widget_echoes_survives_a_cut_connection_and_renders_replies() {
    let proxy = CutProxy::start().await;
    let config = format!(
        r#"
[server]
public_url = "{}"

[assistants.echo]
backend = "echo"
api_key = "{KEY}"

[channels.chat]
kind = "webchat"
assistant = "echo"
title = "Browser test"
"#,
        proxy.url
    );
    let svc = Patchbay::start(&config);
    proxy.point_at(&svc.url);
    let mut b = Browser::launch().await;
    b.goto(&format!("{}/chat", proxy.url)).await;
    b.wait_for("document.body && document.body.dataset.state === 'connected'", 20).await;
    assert_eq!(b.eval("document.title").await, "Browser test");

    // Send with the keyboard; the echo shows up.
    b.eval("document.getElementById('text').focus()").await;
    b.type_enter("hello browser").await;
    b.wait_for("[...document.querySelectorAll('.msg.bot')].some(e => e.textContent === 'echo: hello browser')", 10).await;
    assert_eq!(b.eval("document.querySelectorAll('.msg.user').length").await, 1);
    b.screenshot("webchat-1-echo").await;

    // Who the page is: the user named in its token.
    let token = b.eval("JSON.parse(localStorage.getItem('patchbay-webchat:' + document.body.dataset.base)).token").await;
    let user = token.as_str().unwrap().split('.').nth(1).unwrap().to_owned();

    // Cut the network; the page says it is reconnecting.
    proxy.cut();
    b.wait_for("document.body.dataset.state === 'reconnecting'", 10).await;
    b.screenshot("webchat-2-reconnecting").await;
    // Meanwhile the assistant sends three replies, one with quick replies and an image.
    push(&svc, &user, json!({"text": "missed 1"})).await;
    push(&svc, &user, json!({"text": "missed 2, see https://example.com/docs"})).await;
    push(
        &svc,
        &user,
        json!({"text": "missed 3", "quick_replies": [{"title": "Yes please", "payload": "yes"}],
               "attachments": [{"url": format!("{}/hooks/none/picture.png", proxy.url)}]}),
    )
    .await;
    // Delivered into the log while the page is away (bounded wait).
    for _ in 0..100 {
        let (_, q) = svc.admin("GET", "/readyz", None).await;
        if q["queues"]["outbox"] == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let before = texts(&b.eval(BOT_TEXTS).await);
    assert_eq!(before, vec!["echo: hello browser"], "nothing arrives while the network is cut");

    // The network comes back: the missed replies arrive, in order, once.
    proxy.restore();
    b.wait_for("document.body.dataset.state === 'connected' && document.querySelectorAll('.msg.bot').length >= 4", 30).await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let after = texts(&b.eval(BOT_TEXTS).await);
    assert_eq!(
        after,
        vec!["echo: hello browser", "missed 1", "missed 2, see https://example.com/docs", "missed 3"],
        "in order and none twice"
    );
    // Links, images and quick replies render.
    assert_eq!(b.eval("document.querySelector('.msg.bot a[href=\"https://example.com/docs\"]') !== null").await, true);
    assert_eq!(b.eval("document.querySelectorAll('.msg.bot img').length").await, 1);
    assert_eq!(b.eval("document.querySelector('#quick button').textContent").await, "Yes please");
    b.screenshot("webchat-3-replayed").await;

    // A quick reply is a button: pressing it sends its payload.
    b.eval("document.querySelector('#quick button').focus()").await;
    b.page("Input.dispatchKeyEvent", json!({"type": "keyDown", "key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13, "text": "\r"})).await;
    b.page("Input.dispatchKeyEvent", json!({"type": "keyUp", "key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13})).await;
    b.wait_for("[...document.querySelectorAll('.msg.bot')].some(e => e.textContent === 'echo: yes')", 10).await;
    assert_eq!(b.eval("document.querySelectorAll('#quick button').length").await, 0);

    // Reloading shows the history, each message once.
    b.goto(&format!("{}/chat", proxy.url)).await;
    b.wait_for("document.body.dataset.state === 'connected' && document.querySelectorAll('.msg.bot').length >= 5", 20).await;
    let reloaded = texts(&b.eval(BOT_TEXTS).await);
    assert_eq!(reloaded.len(), 5, "{reloaded:?}");
    assert_eq!(b.eval("document.querySelector('.chat').getBoundingClientRect().width <= 390").await, true, "fits a phone");
    b.screenshot("webchat-4-history").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_config_serve_prints_a_chat_url_that_works() {
    let svc = Patchbay::start_without_config();
    let banner = svc.banner();
    let line = banner
        .iter()
        .find_map(|l| l.trim().strip_prefix("chat: "))
        .unwrap_or_else(|| panic!("no chat URL printed: {banner:?}"))
        .to_owned();
    let chat_url = line.split_whitespace().next().unwrap().to_owned();
    assert_eq!(chat_url, format!("{}/chat", svc.url));
    let mut b = Browser::launch().await;
    b.goto(&chat_url).await;
    b.wait_for("document.body && document.body.dataset.state === 'connected'", 20).await;
    b.eval("document.getElementById('text').focus()").await;
    b.type_enter("zero config").await;
    b.wait_for("[...document.querySelectorAll('.msg.bot')].some(e => e.textContent === 'echo: zero config')", 10).await;
    b.screenshot("webchat-5-zero-config").await;
}
