//! The Symphony channel end to end: the real binary as a bot service account on the fake pod
//! (`common/fake_symphony.rs`), every request through a real forwarding proxy with Basic
//! proxy authentication (`common/proxy.rs`). The pod's host names (`*.symphony.test`) exist
//! only in the proxy's table, so a request that bypassed the proxy could not reach the pod.

mod common;
#[path = "common/fake_symphony.rs"]
mod fake_symphony;
#[path = "common/proxy.rs"]
mod proxy;
#[path = "common/tls.rs"]
mod tls;

use common::*;
use fake_symphony::FakeSymphony;
use proxy::Proxy;
use serde_json::Value;
use std::time::Duration;

const T: Duration = Duration::from_secs(20);
const BOT: &str = "patchbay-bot";
const BOT_NAME: &str = "Patchbay Bot";
const PROXY_USER: &str = "svc-patchbay";
const PROXY_PASSWORD: &str = "pr0xy-pa55word-do-not-log";
const HOSTS: [&str; 4] = ["pod.symphony.test", "agent.symphony.test", "km.symphony.test", "sessionauth.symphony.test"];

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/symphony/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn public_pem() -> String {
    std::fs::read_to_string(fixture("bot_public.pem")).unwrap()
}

/// Channel settings as (key, TOML value); later entries replace earlier ones, `None` removes.
struct Config(Vec<(String, Option<String>)>);

impl Config {
    fn rsa(proxy_port: u16) -> Config {
        let q = |s: &str| format!("{s:?}");
        Config(
            [
                ("host", q("pod.symphony.test")),
                ("scheme", q("http")),
                ("port", "80".into()),
                ("agent_host", q("agent.symphony.test")),
                ("key_manager_host", q("km.symphony.test")),
                ("session_auth_host", q("sessionauth.symphony.test")),
                ("bot_username", q(BOT)),
                ("bot_private_key_path", q(&fixture("bot_pkcs8.pem"))),
                ("proxy_host", q("127.0.0.1")),
                ("proxy_port", proxy_port.to_string()),
                ("proxy_username", q(PROXY_USER)),
                ("proxy_password", q(PROXY_PASSWORD)),
                ("initial_interval_ms", "50".into()),
                ("max_interval_ms", "400".into()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), Some(v)))
            .collect(),
        )
    }

    fn set(mut self, key: &str, value: impl Into<Option<String>>) -> Config {
        self.0.retain(|(k, _)| k != key);
        self.0.push((key.to_owned(), value.into()));
        self
    }

    fn toml(&self) -> String {
        let settings: String = self.0.iter().filter_map(|(k, v)| v.as_ref().map(|v| format!("{k} = {v}\n"))).collect();
        format!(
            r#"
[pipeline]
retry_initial_ms = 50
retry_max_ms = 400
max_attempts = 4

[assistants.echo]
backend = "echo"

[channels.sym]
kind = "symphony"
assistant = "echo"
{settings}"#
        )
    }
}

fn q(s: &str) -> String {
    format!("{s:?}")
}

struct World {
    pb: Patchbay,
    pod: FakeSymphony,
    proxy: Proxy,
    bot_id: i64,
    alice: i64,
}

/// A plain-HTTP pod behind the proxy (absolute-form requests), the bot registered with the
/// fixture key, and patchbay started with `change` applied to the channel's settings.
async fn world_with(change: impl FnOnce(Config) -> Config) -> World {
    world_setup(|_| {}, change).await
}

/// [`world_with`], with `setup` run on the pod before patchbay starts.
async fn world_setup(setup: impl FnOnce(&FakeSymphony), change: impl FnOnce(Config) -> Config) -> World {
    let pod = FakeSymphony::start().await;
    let bot_id = pod.add_bot(BOT, BOT_NAME, &public_pem());
    let alice = pod.add_user("alice", "Alice Smith");
    setup(&pod);
    let routes: Vec<(&str, u16)> = HOSTS.iter().map(|h| (*h, pod.port)).collect();
    let proxy = Proxy::start(&routes, Some((PROXY_USER, PROXY_PASSWORD))).await;
    let config = change(Config::rsa(proxy.port));
    let pb = Patchbay::start(&config.toml());
    World { pb, pod, proxy, bot_id, alice }
}

async fn world() -> World {
    world_with(|c| c).await
}

impl World {
    async fn status(&self) -> Value {
        let (s, v) = self.pb.admin("GET", "/api/v1/channels/sym", None).await;
        assert_eq!(s, 200, "{v}");
        v["status"].clone()
    }

    /// Connected and reading.
    async fn wait_reading(&self) {
        eventually(T, "the datafeed is being read", || async {
            let st = self.status().await;
            (st["state"] == "connected" && !self.pod.reads().is_empty()).then_some(())
        })
        .await;
    }

    async fn wait_sent(&self, stream: &str, n: usize) -> Vec<fake_symphony::Sent> {
        eventually(T, &format!("{n} messages in {stream}"), || async {
            let s = self.pod.sent_to(stream);
            (s.len() >= n).then_some(s)
        })
        .await
    }

    async fn wait_failed(&self, what: &str) -> String {
        eventually(T, what, || async {
            let st = self.status().await;
            (st["state"] == "failed").then(|| st["last_error"]["message"].as_str().unwrap_or_default().to_owned())
        })
        .await
    }

    async fn check(&self) -> Value {
        let (s, v) = self.pb.admin("POST", "/api/v1/channels/sym/check", None).await;
        assert_eq!(s, 200, "{v}");
        v["report"].clone()
    }

    /// Every request the pod saw came through the proxy (absolute form adds `Via`), and every
    /// one the proxy forwarded reached the pod.
    fn assert_all_through_proxy(&self) {
        let seen = self.pod.requests();
        assert!(!seen.is_empty());
        for r in &seen {
            assert_eq!(r.via.as_deref(), Some(proxy::VIA), "{} {} reached the pod without the proxy", r.method, r.path);
        }
        let forwarded: Vec<_> = self.proxy.passed().into_iter().filter(|p| p.refused_with == 0).collect();
        assert!(forwarded.iter().all(|p| p.authorized));
        let mut a: Vec<String> = seen.iter().map(|r| format!("{} {}", r.method, r.path)).collect();
        let mut b: Vec<String> = forwarded
            .iter()
            .map(|p| {
                let path = p.target.splitn(4, '/').nth(3).map(|s| format!("/{}", s.split('?').next().unwrap())).unwrap_or_default();
                format!("{} {path}", p.method)
            })
            .collect();
        a.sort();
        b.sort();
        // The proxy may hold a request the pod has not finished answering (a long poll).
        assert!(b.len() >= a.len() && b.len() <= a.len() + 1, "proxy {b:?} vs pod {a:?}");
        for r in &a {
            assert!(b.contains(r), "{r} reached the pod but not through the proxy");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_im_is_answered_and_every_request_went_through_the_authenticated_proxy() {
    let w = world().await;
    w.wait_reading().await;
    let im = w.pod.im(w.alice);
    w.pod.say(w.alice, &im, "where is the VPN guide?");
    let sent = w.wait_sent(&im, 1).await;
    assert_eq!(sent[0].text, "echo: where is the VPN guide?");
    assert!(sent[0].message_ml.starts_with("<messageML>"), "{}", sent[0].message_ml);

    // The BDK's order: session, who am I, key manager, the feed.
    let order: Vec<String> = w.pod.requests().iter().map(|r| format!("{} {}", r.method, r.path)).collect();
    let first = |p: &str| order.iter().position(|o| o == p).unwrap_or_else(|| panic!("{p} never called: {order:?}"));
    assert!(first("POST /login/pubkey/authenticate") < first("POST /relay/pubkey/authenticate"));
    assert!(first("POST /relay/pubkey/authenticate") < first("GET /pod/v2/sessioninfo"));
    assert!(first("GET /pod/v2/sessioninfo") < first("GET /agent/v5/datafeeds"));
    assert!(first("GET /agent/v5/datafeeds") < first("POST /agent/v5/datafeeds"));
    // Tokens in headers: sessionToken everywhere after login, keyManagerToken on the agent.
    for r in w.pod.requests().iter().filter(|r| r.path.starts_with("/agent/") || r.path.starts_with("/pod/")) {
        assert!(r.session_token.as_deref().is_some_and(|t| !t.is_empty()), "{} without sessionToken", r.path);
        if r.path.starts_with("/agent/") {
            assert!(r.key_manager_token.as_deref().is_some_and(|t| !t.is_empty()), "{} without keyManagerToken", r.path);
        }
    }
    w.assert_all_through_proxy();

    let st = w.status().await;
    assert_eq!(st["details"]["bot"], format!("{BOT_NAME} (@{BOT})"), "{st}");
    assert_eq!(st["details"]["datafeed_version"], "v2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_rooms_only_mentions_are_answered_and_never_the_bots_own_messages() {
    let w = world().await;
    w.wait_reading().await;
    let room = w.pod.room("trading-desk");
    w.pod.say(w.alice, &room, "just chatting, nobody called the bot");
    w.pod.mention_bot(w.alice, &room, ", what is the EUR/USD spread?");
    let sent = w.wait_sent(&room, 1).await;
    assert_eq!(sent[0].text, "echo: what is the EUR/USD spread?", "mention stripped, punctuation after it too");
    // The bot's reply came back on the datafeed as a MESSAGESENT from the bot; a marker
    // answered later proves it (and the unmentioned message) were read and skipped.
    w.pod.mention_bot(w.alice, &room, "marker");
    let sent = w.wait_sent(&room, 2).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let texts: Vec<String> = w.pod.sent_to(&room).into_iter().map(|m| m.text).collect();
    assert_eq!(texts, ["echo: what is the EUR/USD spread?", "echo: marker"], "{sent:?}");
    let delivered: usize = w.pod.reads().iter().map(|r| r.delivered.len()).sum();
    assert!(delivered >= 5, "the bot's own messages were on the feed too ({delivered} events read)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presentationml_entities_and_special_characters_survive_both_ways() {
    let w = world().await;
    w.wait_reading().await;
    let im = w.pod.im(w.alice);
    // What a user typed: XML-escaped in PresentationML, with a mention of someone else and
    // text that Freemarker would evaluate if it were sent back unescaped.
    let inner = concat!(
        "<p>a &lt; b &amp;&amp; c &gt; d: ${price} #{qty} 100% (net); [x] `y` \\z*</p>",
        r#"<p>ask <span class="entity" data-entity-id="m1">@Bob Jones</span> &#x2764;</p>"#
    );
    let data = serde_json::json!({"m1": {"type": "com.symphony.user.mention", "version": "1.0",
                                         "id": [{"type": "com.symphony.user.userId", "value": "7078106482890"}]}});
    w.pod.post(w.alice, &im, inner, data);
    let sent = w.wait_sent(&im, 1).await;
    assert_eq!(sent[0].text, "echo: a < b && c > d: ${price} #{qty} 100% (net); [x] `y` \\z*\nask @Bob Jones ❤");
    assert!(!sent[0].message_ml.contains("${") && !sent[0].message_ml.contains("#{"), "{}", sent[0].message_ml);
    assert!(sent[0].message_ml.contains("&#36;&#123;price&#125;"), "{}", sent[0].message_ml);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_reply_is_split_within_the_limits_and_arrives_in_order() {
    let w = world().await;
    w.wait_reading().await;
    let im = w.pod.im(w.alice);
    // 3,000 distinct words on 300 lines: over the token limit and over the length budget.
    let long: String = (0..300)
        .map(|l| (0..10).map(|i| format!("word{:05}", l * 10 + i)).collect::<Vec<_>>().join(" ") + " padding-padding-padding-padding-padding-padding-padding-padding-padding-padding-padding-padding-padding-padding-padding\n")
        .collect::<String>()
        .repeat(2);
    w.pod.say(w.alice, &im, long.trim_end());
    let sent = eventually(T, "the parts", || async {
        let s = w.pod.sent_to(&im);
        (s.iter().map(|m| m.text.chars().count()).sum::<usize>() >= long.trim_end().chars().count() + 6).then_some(s)
    })
    .await;
    assert!(sent.len() >= 3, "{} parts", sent.len());
    for m in &sent {
        assert!(m.text.chars().count() <= fake_symphony::MAX_TEXT_CHARS);
        let tokens: std::collections::HashSet<&str> = m.text.split_whitespace().collect();
        assert!(tokens.len() <= fake_symphony::MAX_TOKENS, "{} tokens", tokens.len());
    }
    assert_eq!(sent.iter().map(|m| m.text.as_str()).collect::<String>(), format!("echo: {}", long.trim_end()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_ids_with_plus_slash_and_padding_are_sent_url_safe() {
    let w = world().await;
    w.wait_reading().await;
    let im = w.pod.stream_with_id("im-b64", "IM", "XlU3OH9eVMzq+yss7M/xyn///oxwgbtGbQ==");
    w.pod.say(w.alice, &im, "hi");
    let sent = w.wait_sent(&im, 1).await;
    assert_eq!(sent[0].text, "echo: hi");
    assert!(w.pod.count("POST", "/agent/v4/stream/XlU3OH9eVMzq-yss7M_xyn___oxwgbtGbQ/message/create") >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_session_is_renewed_once_and_the_call_retried() {
    let w = world().await;
    w.wait_reading().await;
    let logins = w.pod.count("POST", "/login/pubkey/authenticate");
    w.pod.expire_sessions();
    let im = w.pod.im(w.alice);
    w.pod.say(w.alice, &im, "still there?");
    let sent = w.wait_sent(&im, 1).await;
    assert_eq!(sent[0].text, "echo: still there?");
    // The datafeed read and the send may both have met the 401; one sign-in served both.
    assert_eq!(w.pod.count("POST", "/login/pubkey/authenticate"), logins + 1);
    assert_eq!(w.pod.count("POST", "/relay/pubkey/authenticate"), logins + 1);
    assert!(w.pod.requests().iter().any(|r| r.status == 401 && r.path.starts_with("/agent/")));
    assert_eq!(w.status().await["state"], "connected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_the_pod_does_not_know_fails_the_channel_and_says_what_to_check() {
    let w = world_with(|c| c.set("bot_private_key_path", q(&fixture("other_pkcs8.pem")))).await;
    let message = w.wait_failed("the channel is failed").await;
    assert!(message.contains("/login/pubkey/authenticate") && message.contains("401"), "{message}");
    assert!(message.contains("public key") && message.contains("bot_username"), "{message}");
    let check = w.check().await;
    assert_eq!(check["ok"], false, "{check}");
    let step = check["steps"].as_array().unwrap().iter().find(|s| s["name"] == "session auth").cloned().unwrap();
    assert_eq!(step["ok"], false, "{check}");
    assert!(step["detail"].as_str().unwrap().contains("public key"), "{check}");
    // Never hammered: the slow schedule, not a tight loop.
    assert!(w.pod.count("POST", "/login/pubkey/authenticate") < 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_proxy_password_is_told_plainly_and_never_shown() {
    let w = world_with(|c| c.set("proxy_password", q("not-the-password"))).await;
    let message = w.wait_failed("the channel is failed").await;
    assert!(message.contains("407") && message.contains("proxy_username / proxy_password"), "{message}");
    assert!(w.pod.requests().is_empty(), "nothing reached the pod");
    assert!(w.proxy.passed().iter().all(|p| p.refused_with == 407 && !p.authorized));
    let check = w.check().await;
    let step = &check["steps"][0];
    assert_eq!((step["name"].as_str(), step["ok"].as_bool()), (Some("proxy"), Some(false)), "{check}");
    assert!(step["detail"].as_str().unwrap().contains("proxy_password"), "{check}");

    let (_, channel) = w.pb.admin("GET", "/api/v1/channels/sym", None).await;
    let shown = channel.to_string() + &check.to_string() + &w.pb.stderr();
    assert!(!shown.contains("not-the-password") && !shown.contains(PROXY_PASSWORD), "a proxy password leaked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_feed_is_deleted_and_recreated_and_reading_goes_on() {
    let w = world().await;
    w.wait_reading().await;
    let first = w.pod.feeds();
    assert_eq!(first.len(), 1);
    w.pod.expire_feeds();
    eventually(T, "a new feed", || async { (w.pod.feeds().len() == 2).then_some(()) }).await;
    assert!(w.pod.count("DELETE", &format!("/agent/v5/datafeeds/{}", first[0])) >= 1, "the stale feed was deleted");
    let im = w.pod.im(w.alice);
    w.pod.say(w.alice, &im, "after the feed expired");
    assert_eq!(w.wait_sent(&im, 1).await[0].text, "echo: after the feed expired");
    let reads = w.pod.reads();
    let new_feed = &w.pod.feeds()[1];
    assert_eq!(reads.iter().find(|r| &r.feed == new_feed).unwrap().ack_in, "", "a new feed is first read with an empty ackId");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_feed_is_reused_rather_than_a_new_one_created() {
    let mut feed = String::new();
    let w = world_setup(|pod| feed = pod.precreate_feed(), |c| c).await;
    w.wait_reading().await;
    let im = w.pod.im(w.alice);
    w.pod.say(w.alice, &im, "hello");
    w.wait_sent(&im, 1).await;
    let created = w.pod.requests().iter().filter(|r| r.method == "POST" && r.path == "/agent/v5/datafeeds").count();
    assert_eq!(created, 0, "no new feed");
    assert!(w.pod.reads().iter().all(|r| r.feed == feed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_datafeed_shows_failed_after_max_attempts_and_recovers_by_itself() {
    let w = world_with(|c| c.set("max_attempts", "3".to_owned())).await;
    w.wait_reading().await;
    w.pod.fault("POST", "/read", 503, 1000, None);
    let message = w.wait_failed("failed after max_attempts").await;
    assert!(message.contains("503") && message.contains("max_attempts = 3") && message.contains("still retrying"), "{message}");
    let failed_reads = w.pod.count("POST", "/read");
    eventually(T, "retries go on while failed", || async { (w.pod.count("POST", "/read") > failed_reads + 1).then_some(()) }).await;

    w.pod.clear_faults();
    let im = w.pod.im(w.alice);
    w.pod.say(w.alice, &im, "are you back?");
    assert_eq!(w.wait_sent(&im, 1).await[0].text, "echo: are you back?");
    assert_eq!(w.status().await["state"], "connected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_and_server_errors_on_the_datafeed_are_retried() {
    let w = world().await;
    w.wait_reading().await;
    w.pod.fault("POST", "/read", 429, 1, Some(1));
    w.pod.fault("POST", "/read", 500, 1, None);
    let im = w.pod.im(w.alice);
    w.pod.say(w.alice, &im, "through the storm");
    assert_eq!(w.wait_sent(&im, 1).await[0].text, "echo: through the storm");
    let st = w.status().await;
    assert!(st["reconnects"].as_u64().unwrap() >= 1, "{st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datafeed_v1_is_read_through_its_204s() {
    let w = world_with(|c| c.set("datafeed_version", q("v1"))).await;
    w.pod.set_long_poll(Duration::from_millis(200));
    eventually(T, "a 204", || async {
        w.pod.requests().iter().any(|r| r.path.contains("/agent/v4/datafeed/") && r.status == 204).then_some(())
    })
    .await;
    let im = w.pod.im(w.alice);
    w.pod.say(w.alice, &im, "old school");
    assert_eq!(w.wait_sent(&im, 1).await[0].text, "echo: old school");
    assert_eq!(w.pod.count("POST", "/agent/v4/datafeed/create"), 1);
    assert_eq!(w.pod.count("GET", "/agent/v5/datafeeds"), 0);
    assert_eq!(w.status().await["details"]["datafeed_version"], "v1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simplified_key_delivery_skips_the_key_manager() {
    let pod = FakeSymphony::start().await;
    pod.set_skd(true, "Agent-24.12.2");
    pod.add_bot(BOT, BOT_NAME, &public_pem());
    let alice = pod.add_user("alice", "Alice");
    let routes: Vec<(&str, u16)> = HOSTS.iter().map(|h| (*h, pod.port)).collect();
    let proxy = Proxy::start(&routes, Some((PROXY_USER, PROXY_PASSWORD))).await;
    let pb = Patchbay::start(&Config::rsa(proxy.port).toml());
    let w = World { pb, pod, proxy, bot_id: 0, alice };
    w.wait_reading().await;
    let im = w.pod.im(w.alice);
    w.pod.say(w.alice, &im, "no key manager");
    w.wait_sent(&im, 1).await;
    assert_eq!(w.pod.count("POST", "/relay/pubkey/authenticate"), 0);
    assert!(w.pod.count("GET", "/agent/v1/info") >= 1);
    for r in w.pod.requests().iter().filter(|r| r.path.starts_with("/agent/v") && !r.path.starts_with("/agent/v1/")) {
        assert_eq!(r.key_manager_token.as_deref(), Some(""), "{}", r.path);
    }
    let check = w.check().await;
    assert!(check["steps"].to_string().contains("simplified key delivery"), "{check}");

    // An older agent: the key manager is used even though the session allows SKD.
    w.pod.set_skd(true, "Agent-24.9.0");
    w.pod.expire_sessions();
    w.pod.say(w.alice, &im, "old agent");
    w.wait_sent(&im, 2).await;
    assert!(w.pod.count("POST", "/relay/pubkey/authenticate") >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_login_jwt_is_rs512_with_sub_and_exp_and_pyjwt_verifies_it() {
    let w = world().await;
    w.wait_reading().await;
    let jwts = w.pod.jwts();
    assert!(jwts.len() >= 2, "one JWT per call (login and relay)");
    let verify = |token: &str| {
        std::process::Command::new("python3")
            .args(["-c", PYJWT_VERIFY, token, &fixture("bot_public.pem"), BOT])
            .output()
            .expect("python3")
    };
    let out = verify(&jwts[0]);
    assert!(
        out.status.success(),
        "PyJWT refused the JWT (is PyJWT installed? scripts/test installs it): {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("ok {BOT} RS512 [\"exp\", \"sub\"]"));

    // The check can fail: a JWT signed with another key is refused by PyJWT too.
    let other = patchbay_channel_symphony::jwt::RsaKey::from_pem(&std::fs::read_to_string(fixture("other_pkcs8.pem")).unwrap()).unwrap();
    let forged = other.sign(BOT, patchbay_channel_symphony::jwt::now_secs());
    let out = verify(&forged);
    assert!(!out.status.success(), "PyJWT accepted a JWT signed with the wrong key");
    assert!(String::from_utf8_lossy(&out.stderr).contains("InvalidSignatureError"));
}

/// PyJWT: verify the signature (RS512 only) and the expiry, require `sub` and `exp`, and
/// check exp - now ≤ 300 s.
const PYJWT_VERIFY: &str = r#"
import sys, time, jwt
token, public, sub = sys.argv[1], open(sys.argv[2]).read(), sys.argv[3]
claims = jwt.decode(token, public, algorithms=["RS512"], options={"require": ["exp", "sub"]})
assert claims["sub"] == sub, claims
assert 0 < claims["exp"] - time.time() <= 300, claims
print("ok", claims["sub"], jwt.get_unverified_header(token)["alg"], sorted(claims).__repr__().replace("'", '"'))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_the_bots_display_name_and_each_step() {
    let w = world_with(|c| c.set("error_room", q("patchbay-errors"))).await;
    w.pod.room("patchbay-errors");
    let check = w.check().await;
    assert_eq!(check["ok"], true, "{check}");
    let names: Vec<&str> = check["steps"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["proxy", "session auth", "key manager", "sessioninfo", "error_room"]);
    let info = check["steps"][3]["detail"].as_str().unwrap();
    assert!(info.contains(BOT_NAME) && info.contains(&w.bot_id.to_string()), "{info}");

    let out = w.pb.cli(&["doctor", "sym"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains(BOT_NAME), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undeliverable_replies_reach_the_error_room_and_the_user() {
    let w = world_with(|c| c.set("error_room", q("patchbay-errors")).set("inform_client", "true".to_owned())).await;
    let errors = w.pod.room("patchbay-errors");
    w.wait_reading().await;
    let im = w.pod.im(w.alice);
    let sid = im.clone();
    // The reply is refused as invalid once (permanent); the notices that follow go through.
    w.pod.fault("POST", &format!("/agent/v4/stream/{sid}/message/create"), 400, 1, None);
    w.pod.say(w.alice, &im, "this answer will bounce");
    let notice = w.wait_sent(&errors, 1).await;
    assert!(notice[0].text.contains("could not deliver a reply") && notice[0].text.contains("400"), "{}", notice[0].text);
    let told = w.wait_sent(&im, 1).await;
    assert_eq!(told[0].text, "Sorry, a reply to your message could not be delivered on Symphony.");
    let dead = eventually(T, "a dead letter", || async {
        let d = dead_letters(&w.pb).await;
        (!d.is_empty()).then_some(d)
    })
    .await;
    assert!(dead[0].to_string().contains("400"), "{dead:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_or_failing_send_is_retried_until_delivered() {
    let w = world().await;
    w.wait_reading().await;
    let im = w.pod.im(w.alice);
    w.pod.fault("POST", "/message/create", 429, 1, Some(1));
    w.pod.fault("POST", "/message/create", 502, 1, None);
    w.pod.say(w.alice, &im, "eventually");
    let sent = w.wait_sent(&im, 1).await;
    assert_eq!(sent[0].text, "echo: eventually");
    assert_eq!(w.pod.count("POST", "/message/create"), 3);
    assert!(dead_letters(&w.pb).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_message_is_answered_once() {
    let w = world().await;
    w.wait_reading().await;
    let im = w.pod.im(w.alice);
    let id = w.pod.say(w.alice, &im, "once");
    w.wait_sent(&im, 1).await;
    // The same event again, as after a visibility timeout or from a second feed.
    w.pod.redeliver(&id);
    w.pod.say(w.alice, &im, "marker");
    w.wait_sent(&im, 2).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let texts: Vec<String> = w.pod.sent_to(&im).into_iter().map(|m| m.text).collect();
    assert_eq!(texts, ["echo: once", "echo: marker"]);
    assert_eq!(w.pod.reads().iter().flat_map(|r| r.delivered.clone()).filter(|d| *d == id).count(), 2, "it was read twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_write_only_and_never_logged() {
    let key = std::fs::read_to_string(fixture("bot_pkcs1.pem")).unwrap().trim().replace('\n', "\\n");
    let w = world_with(|c| c.set("bot_private_key_path", None).set("bot_private_key_content", q(&key))).await;
    w.wait_reading().await;
    let im = w.pod.im(w.alice);
    w.pod.say(w.alice, &im, "hello");
    w.wait_sent(&im, 1).await;
    let (_, channel) = w.pb.admin("GET", "/api/v1/channels/sym", None).await;
    let text = channel.to_string();
    let key_body = key.split("\\n").nth(1).unwrap();
    assert!(!text.contains(key_body) && !text.contains(PROXY_PASSWORD), "{text}");
    assert!(text.contains("bot_private_key_content") && text.contains("proxy_password"), "secrets shown as set: {text}");
    let logs = w.pb.stderr();
    assert!(!logs.contains(key_body) && !logs.contains(PROXY_PASSWORD));
    for tok in w.pod.requests().iter().filter_map(|r| r.session_token.clone()).filter(|t| !t.is_empty()) {
        assert!(!logs.contains(&tok) && !text.contains(&tok), "a session token leaked");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_errors_name_the_field() {
    let pb = Patchbay::start("[assistants.echo]\nbackend = \"echo\"\n");
    let base = serde_json::json!({"id": "sym2", "kind": "symphony", "assistant": "echo",
        "settings": {"host": "pod.example.com", "bot_username": "bot"}});
    let (s, v) = pb.admin("POST", "/api/v1/channels", Some(base.clone())).await;
    assert_eq!(s, 400, "{v}");
    assert!(v.to_string().contains("no authentication method"), "{v}");
    let mut two = base.clone();
    two["settings"]["bot_private_key_content"] = "x".into();
    two["settings"]["bot_certificate_content"] = "y".into();
    let (s, v) = pb.admin("POST", "/api/v1/channels", Some(two)).await;
    assert_eq!(s, 400);
    assert!(v.to_string().contains("two authentication methods"), "{v}");
    let mut bad = base.clone();
    bad["settings"]["bot_private_key_content"] = "-----BEGIN PRIVATE KEY-----\nnot base64!\n-----END PRIVATE KEY-----".into();
    let (s, v) = pb.admin("POST", "/api/v1/channels", Some(bad)).await;
    assert_eq!(s, 400);
    assert!(v["error"]["field"].as_str().unwrap().contains("bot_private_key_content"), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_auth_uses_mutual_tls_through_connect_tunnels() {
    let pki = tls::Pki::new(&HOSTS, BOT);
    let pod = FakeSymphony::start_tls(&pki).await;
    pod.add_cert_bot(BOT, BOT_NAME);
    let alice = pod.add_user("alice", "Alice");
    let tls_port = pod.tls_port.unwrap();
    let routes: Vec<(&str, u16)> = HOSTS.iter().map(|h| (*h, tls_port)).collect();
    let proxy = Proxy::start(&routes, Some((PROXY_USER, PROXY_PASSWORD))).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = pki.write_ca(dir.path());
    let cert_path = dir.path().join("bot.pem");
    std::fs::write(&cert_path, &pki.client_pem).unwrap();
    let config = Config::rsa(proxy.port)
        .set("scheme", q("https"))
        .set("port", "443".to_owned())
        .set("bot_private_key_path", None)
        .set("bot_certificate_path", q(&cert_path.display().to_string()))
        .set("trust_store_path", q(&ca));
    let pb = Patchbay::start(&config.toml());
    let w = World { pb, pod, proxy, bot_id: 0, alice };
    w.wait_reading().await;
    let im = w.pod.im(w.alice);
    w.pod.say(w.alice, &im, "over mTLS");
    assert_eq!(w.wait_sent(&im, 1).await[0].text, "echo: over mTLS");

    let reqs = w.pod.requests();
    let auth: Vec<_> = reqs.iter().filter(|r| r.path.ends_with("/v1/authenticate")).collect();
    assert!(auth.iter().any(|r| r.path == "/sessionauth/v1/authenticate" && r.client_cert && r.status == 200));
    assert!(auth.iter().any(|r| r.path == "/keyauth/v1/authenticate" && r.client_cert && r.status == 200));
    assert_eq!(w.pod.count("POST", "/login/pubkey/authenticate"), 0);
    // Everything over TLS, through CONNECT tunnels to the names only the proxy knows.
    assert!(reqs.iter().all(|r| r.tls));
    let passed = w.proxy.passed();
    assert!(passed.iter().all(|p| p.method == "CONNECT" && p.authorized), "{passed:?}");
    let targets: std::collections::HashSet<&str> = passed.iter().map(|p| p.target.as_str()).collect();
    for t in ["pod.symphony.test:443", "agent.symphony.test:443", "km.symphony.test:443", "sessionauth.symphony.test:443"] {
        assert!(targets.contains(t), "no tunnel to {t}: {targets:?}");
    }
    // Only the certificate endpoints got the client certificate.
    assert!(reqs.iter().filter(|r| r.path.starts_with("/pod/") || r.path.starts_with("/agent/")).all(|r| !r.client_cert));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_is_refused_with_what_to_check() {
    let pki = tls::Pki::new(&HOSTS, BOT);
    let pod = FakeSymphony::start_tls(&pki).await;
    pod.add_cert_bot(BOT, BOT_NAME);
    let alice = pod.add_user("alice", "Alice");
    let routes: Vec<(&str, u16)> = HOSTS.iter().map(|h| (*h, pod.tls_port.unwrap())).collect();
    let proxy = Proxy::start(&routes, Some((PROXY_USER, PROXY_PASSWORD))).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = pki.write_ca(dir.path());
    let config = Config::rsa(proxy.port)
        .set("scheme", q("https"))
        .set("port", "443".to_owned())
        .set("bot_private_key_path", None)
        .set("bot_certificate_content", q(&pki.stranger_pem.replace('\n', "\\n")))
        .set("trust_store_path", q(&ca));
    let pb = Patchbay::start(&config.toml());
    let w = World { pb, pod, proxy, bot_id: 0, alice };
    let message = w.wait_failed("refused").await;
    assert!(message.contains("/sessionauth/v1/authenticate") && message.contains("bot_certificate"), "{message}");
    assert!(message.contains("UnknownCA"), "the TLS alert is named: {message}");
}
