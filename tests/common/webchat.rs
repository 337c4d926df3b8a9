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

/// A WebSocket client written out by hand, frame by frame, for what a library client will
/// not do (unmasked frames, a length past the limit, a ping between fragments).
pub struct RawSocket {
    io: tokio::net::TcpStream,
    buf: Vec<u8>,
}

/// A frame as the server wrote it.
#[derive(Debug, PartialEq, Eq)]
pub struct RawFrame {
    pub fin: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl RawFrame {
    pub fn json(&self) -> Value {
        assert_eq!(self.opcode, 1, "a text frame: {self:?}");
        serde_json::from_slice(&self.payload).expect("JSON frame")
    }

    /// A close frame's code.
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == 8 && self.payload.len() >= 2).then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

impl RawSocket {
    /// Upgrades `GET {base}/ws` with a fixed key, checking the server's accept value.
    pub async fn open(base: &str) -> RawSocket {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let rest = base.strip_prefix("http://").expect("http base");
        let (host, path) = rest.split_once('/').expect("a path");
        let mut io = tokio::net::TcpStream::connect(host).await.expect("connect");
        let req = format!(
            "GET /{path}/ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        io.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let end = loop {
            let mut chunk = [0u8; 1024];
            let n = io.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed during the handshake: {}", String::from_utf8_lossy(&buf));
            buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
        assert!(head.starts_with("http/1.1 101"), "{head}");
        // RFC 6455 section 1.3's example key and its accept value.
        assert!(head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="), "{head}");
        RawSocket { io, buf: buf[end..].to_vec() }
    }

    /// Writes one frame: `masked` as a client must, or not, to see it refused.
    pub async fn frame(&mut self, fin: bool, opcode: u8, payload: &[u8], masked: bool) {
        use tokio::io::AsyncWriteExt;
        let mut out = vec![(fin as u8) << 7 | opcode];
        let mask_bit = if masked { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => out.push(mask_bit | n as u8),
            n if n <= 0xffff => {
                out.push(mask_bit | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(mask_bit | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let key = [0x12, 0x34, 0x56, 0x78];
        if masked {
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        } else {
            out.extend_from_slice(payload);
        }
        self.io.write_all(&out).await.expect("write");
    }

    /// Writes only a frame's head, claiming `len` bytes that never follow.
    pub async fn head_only(&mut self, opcode: u8, len: u64) {
        use tokio::io::AsyncWriteExt;
        let mut out = vec![0x80 | opcode, 0x80 | 127];
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&[1, 2, 3, 4]);
        self.io.write_all(&out).await.expect("write");
    }

    pub async fn text(&mut self, v: Value) {
        self.frame(true, 1, v.to_string().as_bytes(), true).await;
    }

    /// The next frame within 10 s; None when the server closed the connection.
    pub async fn next(&mut self) -> Option<RawFrame> {
        use tokio::io::AsyncReadExt;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some((frame, used)) = parse_server_frame(&self.buf) {
                self.buf.drain(..used);
                return Some(frame);
            }
            let mut chunk = vec![0u8; 64 * 1024];
            let n = match tokio::time::timeout_at(deadline, self.io.read(&mut chunk)).await {
                Ok(Ok(n)) => n,
                Ok(Err(_)) => 0,
                Err(_) => panic!("no frame within 10 s"),
            };
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next frame that is not a ping (nor `typing`/`received`).
    pub async fn next_significant(&mut self) -> Option<RawFrame> {
        loop {
            let f = self.next().await?;
            if f.opcode == 9 {
                continue;
            }
            if f.opcode == 1 && matches!(f.json()["type"].as_str(), Some("typing" | "received")) {
                continue;
            }
            return Some(f);
        }
    }
}

fn parse_server_frame(b: &[u8]) -> Option<(RawFrame, usize)> {
    if b.len() < 2 {
        return None;
    }
    assert_eq!(b[1] & 0x80, 0, "a server frame must not be masked");
    let (len, mut at) = match b[1] & 0x7f {
        126 => (u16::from_be_bytes([*b.get(2)?, *b.get(3)?]) as usize, 4),
        127 => (u64::from_be_bytes(b.get(2..10)?.try_into().ok()?) as usize, 10),
        n => (n as usize, 2),
    };
    let payload = b.get(at..at + len)?.to_vec();
    at += len;
    Some((RawFrame { fin: b[0] & 0x80 != 0, opcode: b[0] & 0x0f, payload }, at))
}
