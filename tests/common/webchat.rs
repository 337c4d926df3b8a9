//! The web chat as a client meets it: its HTTP calls (`post`, `new_token`), the conversation
//! id a user's messages land in, and a WebSocket client (`Socket`) speaking the web chat's
//! frames. Declared by the test files that use it (`#[path = "common/webchat.rs"] mod
//! webchat;`) next to `mod common;`.
#![allow(dead_code)]

use crate::common::http;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::time::Duration;
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest, Message};

/// The conversation id of `user`'s chat on `channel`, as the web chat derives it.
pub fn conversation_id(channel: &str, user: &str) -> String {
    let mut h = Sha256::new();
    for part in [channel, user, ""] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    format!("c_{}", &hex::encode(h.finalize())[..32])
}

/// POSTs JSON, answering (status, body as JSON or as a string).
pub async fn post(url: &str, body: &str, headers: &[(&str, &str)]) -> (u16, Value, reqwest::header::HeaderMap) {
    let mut req = http().post(url).header("content-type", "application/json").body(body.to_owned());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("reachable");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)), headers)
}

/// A new user's token from `POST {base}/session`.
pub async fn new_token(base: &str) -> (String, String) {
    let (status, v, _) = post(&format!("{base}/session"), "{}", &[]).await;
    assert_eq!(status, 200, "{v}");
    (v["token"].as_str().unwrap().to_owned(), v["user"].as_str().unwrap().to_owned())
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A web chat socket as a test drives it.
pub struct Socket {
    ws: Ws,
}

pub enum Connect {
    Open(Socket),
    Refused(u16, String),
}

impl Socket {
    pub async fn connect(base: &str, origin: Option<&str>, query: &str) -> Connect {
        let url = format!("{}/ws{query}", base.replacen("http://", "ws://", 1));
        let mut req = url.into_client_request().expect("request");
        if let Some(o) = origin {
            req.headers_mut().insert("origin", o.parse().unwrap());
        }
        match tokio_tungstenite::connect_async(req).await {
            Ok((ws, _)) => Connect::Open(Socket { ws }),
            Err(tungstenite::Error::Http(resp)) => {
                let body = resp.body().as_ref().map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
                Connect::Refused(resp.status().as_u16(), body)
            }
            Err(e) => panic!("connect failed: {e}"),
        }
    }

    pub async fn open(base: &str) -> Socket {
        match Self::connect(base, None, "").await {
            Connect::Open(s) => s,
            Connect::Refused(s, b) => panic!("refused {s}: {b}"),
        }
    }

    pub async fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).await.expect("send");
    }

    pub async fn send_raw(&mut self, m: Message) {
        self.ws.send(m).await.expect("send");
    }

    /// The next JSON frame within `secs` (pings are answered by the library); None when the
    /// socket closed or nothing came.
    pub async fn next_within(&mut self, secs: u64) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next()).await.ok()??;
            match msg {
                Ok(Message::Text(t)) => return Some(serde_json::from_str(t.as_str()).expect("JSON frame")),
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => continue,
            }
        }
    }

    pub async fn next(&mut self) -> Value {
        self.next_within(10).await.expect("a frame within 10 s")
    }

    /// The next frame of `type`, skipping others (typing, received), within 10 s.
    pub async fn next_of(&mut self, kind: &str) -> Value {
        for _ in 0..50 {
            let f = self.next().await;
            if f["type"] == kind {
                return f;
            }
        }
        panic!("no `{kind}` frame among the next 50");
    }

    /// Whether the server closed the socket (within `secs`), skipping frames.
    pub async fn closed_within(&mut self, secs: u64) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return false,
                Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Message::Close(_)))) => return true,
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}
