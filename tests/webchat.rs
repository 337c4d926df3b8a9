//! The web chat channel end to end, against the real binary: user tokens, both Botkit
//! webhooks, CORS and origins, history, the WebSocket (session events, replay from a
//! watermark, one socket per conversation), bad input, and toggles.

mod common;
#[path = "common/webchat.rs"]
mod webchat;

use serde_json::{json, Value};
use common::{http, Patchbay};
use webchat::{conversation_id, new_token, post, Connect, RawSocket, Socket};

const CONFIG: &str = r#"
[assistants.echo]
backend = "echo"
api_key = "pbk_test_key_for_pushing_replies_0001"

[channels.web]
kind = "webchat"
assistant = "echo"
allowed_origins = ["https://site.example"]
max_frame_bytes = 1024
"#;

/// Pushes a reply into `user`'s conversation the way an assistant does later.
async fn push(svc: &Patchbay, user: &str, text: &str) {
    let url = format!("{}/api/v1/conversations/{}/replies", svc.url, conversation_id("web", user));
    let resp = http()
        .post(url)
        .bearer_auth("pbk_test_key_for_pushing_replies_0001")
        .json(&json!({"replies": [{"text": text}]}))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{} {}", resp.status(), resp.text().await.unwrap_or_default());
}

/// A new user's socket that has said hello and sent `text`: (socket, token, user, the echo).
async fn chatting(base: &str, text: &str) -> (Socket, String, String, Value) {
    let mut s = Socket::open(base).await;
    s.send(json!({"type": "hello"})).await;
    let hello = s.next_of("hello").await;
    let token = hello["token"].as_str().unwrap().to_owned();
    let user = hello["user"].as_str().unwrap().to_owned();
    s.send(json!({"type": "message", "text": text})).await;
    let echo = s.next_of("message").await;
    assert_eq!(echo["text"], format!("echo: {text}"));
    (s, token, user, echo)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_answer_botkit_style_for_the_tokens_user_only() {
    let svc = Patchbay::start(CONFIG);
    let base = svc.callback_url("web").await;
    let (token, user) = new_token(&base).await;
    assert!(token.starts_with("wc1."));

    // Botkit 4: an array of replies, each with its sequence number.
    let msg = json!({"type": "message", "text": "hi", "user": token, "channel": "webhook", "extra": 1}).to_string();
    let (status, v, _) = post(&format!("{base}/api/messages"), &msg, &[]).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v.as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v[0]["type"], "message");
    assert_eq!(v[0]["text"], "echo: hi");
    assert_eq!(v[0]["user"], user.as_str());
    assert_eq!(v[0]["seq"], 2, "the user's message is 1, its reply 2: {v}");

    // Botkit Anywhere: one object; the token may come as a Bearer header.
    let msg = json!({"type": "message", "text": "again"}).to_string();
    let bearer = format!("Bearer {token}");
    let (status, v, _) = post(&format!("{base}/botkit/receive"), &msg, &[("authorization", &bearer)]).await;
    assert_eq!(status, 200, "{v}");
    assert!(v.is_object(), "{v}");
    assert_eq!(v["text"], "echo: again");

    // A connection event answers the session without reaching the assistant.
    let (status, v, _) = post(&format!("{base}/botkit/receive"), &json!({"type": "hello"}).to_string(), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(v["type"], "hello");
    assert!(v["token"].as_str().unwrap().starts_with("wc1."));
    let (_, v, _) = post(&format!("{base}/api/messages"), &json!({"type": "welcome_back", "user": token}).to_string(), &[]).await;
    assert_eq!(v[0]["type"], "welcome_back");
    assert_eq!(v[0]["user"], user.as_str());
    assert_eq!(v[0]["watermark"], 4);

    // Bad input, each with its own clear answer.
    let cases: Vec<(&str, String, Vec<(&str, &str)>, u16, &str)> = vec![
        ("/api/messages", json!({"type": "message", "text": "x"}).to_string(), vec![], 401, "token_required"),
        ("/api/messages", json!({"type": "message", "text": "x", "user": "botkit-guid-123"}).to_string(), vec![], 401, "token_required"),
        ("/api/messages", json!({"type": "message", "text": "x", "user": forge(&token)}).to_string(), vec![], 401, "invalid_token"),
        ("/api/messages", "not json".into(), vec![], 400, "bad_json"),
        ("/api/messages", json!({"type": "launch", "user": token}).to_string(), vec![], 400, "unknown_type"),
        ("/api/messages", json!({"type": "message", "text": "", "user": token}).to_string(), vec![], 400, "empty_message"),
        ("/api/messages", json!({"type": "message", "text": "x".repeat(2000), "user": token}).to_string(), vec![], 413, "body_too_large"),
        ("/botkit/receive", json!({"type": "message", "text": "x", "user": token}).to_string(), vec![("origin", "https://evil.example")], 403, "origin_not_allowed"),
        ("/session", json!({"token": "wc1.uabc.1.sig"}).to_string(), vec![], 401, "invalid_token"),
        ("/nope", "{}".into(), vec![], 404, "not_found"),
    ];
    for (path, body, headers, want_status, want_code) in cases {
        let (status, v, _) = post(&format!("{base}{path}"), &body, &headers).await;
        assert_eq!((status, v["error"]["code"].as_str().unwrap_or("")), (want_status, want_code), "{path} {body:.80}: {v}");
    }

    // CORS for an allowed origin, and its preflight.
    let (status, _, headers) =
        post(&format!("{base}/api/messages"), &json!({"type": "hello"}).to_string(), &[("origin", "https://site.example")]).await;
    assert_eq!(status, 200);
    assert_eq!(headers["access-control-allow-origin"], "https://site.example");
    let resp = http()
        .request(reqwest::Method::OPTIONS, format!("{base}/api/messages"))
        .header("origin", "https://site.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 204);
    assert!(resp.headers()["access-control-allow-headers"].to_str().unwrap().contains("authorization"));

    // History: the token's user's messages, in order, paginated; nobody else's.
    let resp = http().get(format!("{base}/history?limit=3")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let h: Value = resp.json().await.unwrap();
    let texts: Vec<&str> = h["messages"].as_array().unwrap().iter().map(|m| m["text"].as_str().unwrap()).collect();
    assert_eq!(texts, vec!["echo: hi", "again", "echo: again"]);
    assert_eq!(h["next_before"], 2);
    let resp = http().get(format!("{base}/history?before=2")).bearer_auth(&token).send().await.unwrap();
    let h: Value = resp.json().await.unwrap();
    assert_eq!(h["messages"][0]["text"], "hi");
    assert_eq!(h["messages"][0]["type"], "message_received");
    let (other, _) = new_token(&base).await;
    let resp = http().get(format!("{base}/history")).bearer_auth(&other).send().await.unwrap();
    let h: Value = resp.json().await.unwrap();
    assert_eq!(h["messages"], json!([]), "another user sees nothing of this conversation");
    let resp = http().get(format!("{base}/history")).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    // Botkit's client's history call.
    let (status, v, _) = post(&format!("{base}/botkit/history"), &json!({"user": token}).to_string(), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(v["success"], true);
    assert_eq!(v["history"].as_array().unwrap().len(), 4);
    let (status, v, _) = post(&format!("{base}/botkit/history"), &json!({"user": "someone"}).to_string(), &[]).await;
    assert_eq!((status, v["success"].clone()), (401, json!(false)));
}

/// The token with the signature of another user's token.
fn forge(token: &str) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    format!("wc1.uaaaaaaaaaaaaaaaaaaaaaaaaaa.{}.{}", parts[2], parts[3])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_speaks_botkit_and_refuses_bad_frames_keeping_the_socket() {
    let svc = Patchbay::start(CONFIG);
    let base = svc.callback_url("web").await;
    let mut s = Socket::open(&base).await;
    // A new user: hello, with a token.
    s.send(json!({"type": "hello", "user": "botkit-cookie-guid", "channel": "websocket"})).await;
    let hello = s.next().await;
    assert_eq!(hello["type"], "hello", "{hello}");
    let token = hello["token"].as_str().unwrap().to_owned();
    let user = hello["user"].as_str().unwrap().to_owned();

    s.send(json!({"type": "message", "text": "hello there", "user": "botkit-cookie-guid", "id": "m1"})).await;
    let received = s.next_of("received").await;
    assert_eq!(received["id"], "m1");
    let echo = s.next_of("message").await;
    assert_eq!(echo["text"], "echo: hello there");
    assert_eq!(echo["to"], user.as_str());
    assert!(received["seq"].as_i64().unwrap() < echo["seq"].as_i64().unwrap(), "the message is logged before its reply");
    // The same client id again (a client retrying after a lost `received`): stored once,
    // answered once.
    s.send(json!({"type": "message", "text": "hello there", "user": "botkit-cookie-guid", "id": "m1"})).await;
    let again = s.next_of("received").await;
    assert_eq!((again["id"].clone(), again["duplicate"].clone()), (json!("m1"), json!(true)), "{again}");
    s.send(json!({"type": "message", "text": "and then", "user": "botkit-cookie-guid", "id": "m2"})).await;
    let next = s.next_of("message").await;
    assert_eq!(next["text"], "echo: and then", "no second echo of m1 came first");
    assert_eq!(next["seq"].as_i64().unwrap(), echo["seq"].as_i64().unwrap() + 2, "m1 was not logged again");

    // Bad frames: each answered with an error frame; the socket stays usable.
    for (frame, code) in [
        ("not json".to_owned(), "bad_json"),
        (json!({"type": "launch"}).to_string(), "unknown_type"),
        (json!({"type": "message"}).to_string(), "bad_frame"),
        (json!({"type": "message", "text": "x".repeat(2000)}).to_string(), "frame_too_large"),
        (json!({"type": "message", "text": "x", "user": forge(&token)}).to_string(), "invalid_token"),
    ] {
        s.send_raw(tokio_tungstenite::tungstenite::Message::text(frame.clone())).await;
        let e = s.next_of("error").await;
        assert_eq!(e["code"], code, "{frame:.60}: {e}");
    }
    // Another valid user's token on this socket: refused, not acted on.
    let (other, _) = new_token(&base).await;
    s.send(json!({"type": "message", "text": "as someone else", "user": other})).await;
    assert_eq!(s.next_of("error").await["code"], "user_mismatch");
    s.send(json!({"type": "message", "text": "still here"})).await;
    assert_eq!(s.next_of("message").await["text"], "echo: still here");
    // Nothing of the refused frames (nor the repeat of m1) reached the assistant: the history
    // has exactly the three exchanges.
    let resp = http().get(format!("{base}/history")).bearer_auth(&token).send().await.unwrap();
    let h: Value = resp.json().await.unwrap();
    let texts: Vec<&str> = h["messages"].as_array().unwrap().iter().map(|m| m["text"].as_str().unwrap()).collect();
    assert_eq!(texts, vec!["hello there", "echo: hello there", "and then", "echo: and then", "still here", "echo: still here"]);

    // A message before hello, without a token: refused.
    let mut anon = Socket::open(&base).await;
    anon.send(json!({"type": "message", "text": "hi"})).await;
    assert_eq!(anon.next_of("error").await["code"], "hello_first");

    // Foreign origin, and a bad token on the URL: refused before the upgrade, with a status.
    match Socket::connect(&base, Some("https://evil.example"), "").await {
        Connect::Refused(status, body) => assert_eq!((status, body.contains("origin_not_allowed")), (403, true), "{body}"),
        Connect::Open(_) => panic!("a foreign origin was upgraded"),
    }
    match Socket::connect(&base, None, "?token=wc1.ux.1.y").await {
        Connect::Refused(status, body) => assert_eq!((status, body.contains("invalid_token")), (401, true), "{body}"),
        Connect::Open(_) => panic!("a forged token was upgraded"),
    }
    match Socket::connect(&base, Some("https://site.example"), "").await {
        Connect::Open(s) => s.close().await,
        Connect::Refused(status, body) => panic!("an allowed origin was refused: {status} {body}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_sent_while_the_socket_is_down_are_replayed_in_order_once() {
    let svc = Patchbay::start(CONFIG);
    let base = svc.callback_url("web").await;
    let (s, token, user, echo) = chatting(&base, "one").await;
    let watermark = echo["seq"].as_i64().unwrap();
    s.close().await;

    // While no socket is open, the assistant pushes three replies.
    for t in ["missed 1", "missed 2", "missed 3"] {
        push(&svc, &user, t).await;
    }
    // They are in the log once delivered; wait for the third (bounded).
    for _ in 0..100 {
        let resp = http().get(format!("{base}/history")).bearer_auth(&token).send().await.unwrap();
        let h: Value = resp.json().await.unwrap();
        if h["messages"].as_array().unwrap().iter().any(|m| m["text"] == "missed 3") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // Back within the window with the watermark: `reconnect`, then exactly the missed ones.
    let mut s = Socket::open(&base).await;
    s.send(json!({"type": "welcome_back", "user": token, "watermark": watermark})).await;
    let back = s.next().await;
    assert_eq!(back["type"], "reconnect", "{back}");
    let mut seqs = Vec::new();
    for want in ["missed 1", "missed 2", "missed 3"] {
        let m = s.next_of("message").await;
        assert_eq!(m["text"], want);
        seqs.push(m["seq"].as_i64().unwrap());
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]) && seqs[0] > watermark, "{seqs:?}");
    // A live push now arrives once, and nothing else comes.
    push(&svc, &user, "live").await;
    let m = s.next_of("message").await;
    assert_eq!(m["text"], "live");
    assert_eq!(m["seq"].as_i64().unwrap(), seqs[2] + 1);
    assert_eq!(s.next_within(1).await, None, "nothing is sent twice");

    // A second socket for the conversation takes over; the first is told why and closed.
    let mut s2 = Socket::open(&base).await;
    s2.send(json!({"type": "welcome_back", "token": token, "watermark": m["seq"]})).await;
    assert_eq!(s2.next().await["type"], "reconnect");
    let why = s.next_of("disconnect").await;
    assert_eq!(why["reason"], "collision");
    assert!(s.closed_within(5).await);
    push(&svc, &user, "to the new one").await;
    assert_eq!(s2.next_of("message").await["text"], "to the new one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_chat_closes_its_sockets_and_refuses_new_ones() {
    let svc = Patchbay::start(CONFIG);
    let base = svc.callback_url("web").await;
    let mut s = Socket::open(&base).await;
    s.send(json!({"type": "hello"})).await;
    let token = s.next_of("hello").await["token"].as_str().unwrap().to_owned();
    let (status, v) = svc.admin("PATCH", "/api/v1/channels/web", Some(json!({"enabled": false}))).await;
    assert_eq!(status, 200, "{v}");
    let why = s.next_of("disconnect").await;
    assert_eq!(why["reason"], "channel_disabled");
    assert!(s.closed_within(5).await);
    match Socket::connect(&base, None, "").await {
        Connect::Refused(status, body) => assert_eq!((status, body.contains("channel_disabled")), (503, true)),
        Connect::Open(_) => panic!("a disabled chat upgraded a socket"),
    }
    let msg = json!({"type": "message", "text": "x", "user": token}).to_string();
    let (status, v, _) = post(&format!("{base}/api/messages"), &msg, &[]).await;
    assert_eq!((status, v["error"]["code"].as_str().unwrap()), (503, "channel_disabled"));
    // The page still loads (it says the chat is off when it cannot start a session).
    let resp = http().get(format!("{base}/chat")).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    svc.admin("PATCH", "/api/v1/channels/web", Some(json!({"enabled": true}))).await;
    let mut s = Socket::open(&base).await;
    s.send(json!({"type": "welcome_back", "token": token})).await;
    assert_eq!(s.next().await["type"], "reconnect");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_dropped_and_replays_everything_on_return() {
    let svc = Patchbay::start(CONFIG);
    let base = svc.callback_url("web").await;
    let (mut s, token, user, first) = chatting(&base, "start").await;

    // The client stops reading while 600 replies of 40 KB (24 MB, more than the kernel's
    // socket buffers and patchbay's bounded queues hold) are pushed to it.
    const N: usize = 600;
    let filler = "x".repeat(40_000);
    let url = format!("{}/api/v1/conversations/{}/replies", svc.url, conversation_id("web", &user));
    for batch in 0..N / 4 {
        let replies: Vec<Value> = (0..4).map(|i| json!({"text": format!("r{:04} {filler}", batch * 4 + i)})).collect();
        let resp = http()
            .post(&url)
            .bearer_auth("pbk_test_key_for_pushing_replies_0001")
            .json(&json!({"replies": replies}))
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "{}", resp.status());
    }

    // patchbay gives up on the socket instead of buffering without bound. Reading now drains
    // what the buffers held, then the socket is closed.
    let mut got: Vec<(i64, String)> = Vec::new();
    while let Some(f) = s.next_within(30).await {
        if f["type"] == "message" {
            got.push((f["seq"].as_i64().unwrap(), f["text"].as_str().unwrap()[..5].to_owned()));
        }
    }
    assert!(got.len() < N, "the slow socket was closed before all {N} replies were written to it");
    let watermark = got.last().map(|(seq, _)| *seq).unwrap_or(first["seq"].as_i64().unwrap());

    // Back with its watermark, the client receives the rest, in order, none twice.
    let mut s = Socket::open(&base).await;
    s.send(json!({"type": "welcome_back", "user": token, "watermark": watermark})).await;
    assert_eq!(s.next().await["type"], "reconnect");
    while got.len() < N {
        let f = s.next_of("message").await;
        got.push((f["seq"].as_i64().unwrap(), f["text"].as_str().unwrap()[..5].to_owned()));
    }
    let texts: Vec<String> = got.iter().map(|(_, t)| t.clone()).collect();
    let expected: Vec<String> = (0..N).map(|i| format!("r{i:04}")).collect();
    assert_eq!(texts, expected, "every reply once, in order");
    assert!(got.windows(2).all(|w| w[0].0 < w[1].0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_sending_too_fast_is_told_to_wait_and_others_are_not_affected() {
    let svc = Patchbay::start(
        r#"
[assistants.echo]
backend = "echo"

[channels.web]
kind = "webchat"
assistant = "echo"
messages_per_minute = 6
message_burst = 3
"#,
    );
    let base = svc.callback_url("web").await;
    let (token, _) = new_token(&base).await;
    let hook = format!("{base}/botkit/receive");
    let mut statuses = Vec::new();
    for i in 0..4 {
        let (status, body, headers) = post(&hook, &json!({"type": "message", "text": format!("m{i}")}).to_string(), &[("authorization", &format!("Bearer {token}"))]).await;
        statuses.push(status);
        if status == 429 {
            assert_eq!(body["error"]["code"], "rate_limited", "{body}");
            let wait: u64 = headers.get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).expect("Retry-After");
            assert!((1..=10).contains(&wait), "one message per 10 s: {wait}");
        }
    }
    assert_eq!(statuses, [200, 200, 200, 429], "a burst of three, then the rate");

    // Over the socket: an error frame that says when, and the socket stays open.
    let mut s = Socket::open(&base).await;
    s.send(json!({"type": "welcome_back", "token": token})).await;
    let attached = s.next().await;
    assert!(attached["token"].is_string(), "{attached}");
    s.send(json!({"type": "message", "text": "again"})).await;
    let e = s.next_of("error").await;
    assert_eq!(e["code"], "rate_limited", "{e}");
    assert!(e["retry_after"].as_u64().is_some(), "{e}");

    // Another user has an allowance of their own.
    let (other, _) = new_token(&base).await;
    let (status, body, _) = post(&hook, &json!({"type": "message", "text": "hi"}).to_string(), &[("authorization", &format!("Bearer {other}"))]).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_joins_fragments_answers_pings_between_them_and_closes_cleanly() {
    let svc = Patchbay::start(CONFIG);
    let base = svc.callback_url("web").await;
    let mut s = RawSocket::open(&base).await;
    // `hello` in three fragments, with a ping between two of them (RFC 6455 5.4, 5.5.2).
    let hello = json!({"type": "hello"}).to_string();
    let (a, rest) = hello.as_bytes().split_at(4);
    let (b, c) = rest.split_at(5);
    s.frame(false, 1, a, true).await;
    s.frame(false, 0, b, true).await;
    s.frame(true, 9, b"are you there", true).await;
    s.frame(true, 0, c, true).await;
    let pong = s.next().await.expect("a pong");
    assert_eq!((pong.opcode, pong.payload.as_slice()), (10, &b"are you there"[..]));
    let answer = s.next().await.expect("the hello").json();
    assert_eq!(answer["type"], "hello", "{answer}");
    // A message in fragments longer than max_frame_bytes all together: refused, socket kept.
    let long = json!({"type": "message", "text": "x".repeat(1500)}).to_string();
    let (a, b) = long.as_bytes().split_at(800);
    s.frame(false, 1, a, true).await;
    s.frame(true, 0, b, true).await;
    assert_eq!(s.next_significant().await.unwrap().json()["code"], "frame_too_large");
    s.text(json!({"type": "message", "text": "short"})).await;
    assert_eq!(s.next_significant().await.unwrap().json()["text"], "echo: short");
    // A binary frame is refused with an error frame, and the socket stays.
    s.frame(true, 2, b"\x00\x01", true).await;
    assert_eq!(s.next_significant().await.unwrap().json()["code"], "binary_not_supported");
    // The client closes: the server answers with a close frame (1000), then ends the connection.
    s.frame(true, 8, &1000u16.to_be_bytes(), true).await;
    let closing = s.next_significant().await.expect("a close frame");
    assert_eq!(closing.close_code(), Some(1000), "{closing:?}");
    assert_eq!(s.next().await, None, "the connection ends after the close handshake");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_past_the_hard_limit_and_unmasked_frames_close_the_socket_with_a_reason() {
    let svc = Patchbay::start(CONFIG);
    let base = svc.callback_url("web").await;
    // A frame claiming 2 MiB (over the 1 MiB hard limit): refused as soon as its head arrives.
    let mut s = RawSocket::open(&base).await;
    s.head_only(1, 2 * 1024 * 1024).await;
    let e = s.next().await.expect("an error frame").json();
    assert_eq!(e["code"], "protocol_error", "{e}");
    assert_eq!(s.next().await.expect("a close frame").close_code(), Some(1009));
    assert_eq!(s.next().await, None);

    // Fragments adding up past the hard limit: the same.
    let mut s = RawSocket::open(&base).await;
    let part = vec![b'x'; 600 * 1024];
    s.frame(false, 1, &part, true).await;
    s.frame(true, 0, &part, true).await;
    assert_eq!(s.next().await.expect("an error frame").json()["code"], "protocol_error");
    assert_eq!(s.next().await.expect("a close frame").close_code(), Some(1009));

    // A client frame without a mask (RFC 6455 5.1): a protocol error (1002).
    let mut s = RawSocket::open(&base).await;
    s.frame(true, 1, json!({"type": "hello"}).to_string().as_bytes(), false).await;
    assert_eq!(s.next().await.expect("an error frame").json()["code"], "protocol_error");
    assert_eq!(s.next().await.expect("a close frame").close_code(), Some(1002));
    assert_eq!(s.next().await, None);

    // Text that is not UTF-8: closed as invalid data (1007).
    let mut s = RawSocket::open(&base).await;
    s.frame(true, 1, &[0xff, 0xfe, b'{'], true).await;
    assert_eq!(s.next().await.expect("an error frame").json()["code"], "protocol_error");
    assert_eq!(s.next().await.expect("a close frame").close_code(), Some(1007));

    // Other routes still answer upgrade requests as plain HTTP, and the chat keeps working.
    let resp = http()
        .get(format!("{}/healthz", svc.url))
        .header("upgrade", "websocket")
        .header("connection", "upgrade")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let (s, ..) = chatting(&base, "still fine").await;
    s.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sigterm_sockets_are_told_going_away_and_the_process_exits_promptly() {
    let mut svc = Patchbay::start(CONFIG);
    let base = svc.callback_url("web").await;
    let mut s = RawSocket::open(&base).await;
    s.text(json!({"type": "hello"})).await;
    assert_eq!(s.next_significant().await.unwrap().json()["type"], "hello");
    let started = std::time::Instant::now();
    let exit = tokio::task::spawn_blocking(move || (svc.terminate(), svc));
    // 1001: the client reconnects (to the next process) and replays from its watermark.
    let f = s.next_significant().await.expect("a close frame");
    assert_eq!(f.close_code(), Some(1001), "{f:?}");
    s.frame(true, 8, &1001u16.to_be_bytes(), true).await;
    drop(s);
    let (exit, svc) = exit.await.unwrap();
    assert!(exit.success(), "SIGTERM exit status {exit:?}; stderr:\n{}", svc.stderr());
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "stopped in {:?}", started.elapsed());
}
