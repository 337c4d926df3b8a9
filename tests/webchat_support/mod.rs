//! Support for the web chat tests: the real binary in a fresh directory, a WebSocket client
//! speaking the web chat's frames, and (in `browser`) headless Chromium driven over the
//! DevTools protocol.
#![allow(dead_code)]

pub mod browser;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest, Message};

pub const BIN: &str = env!("CARGO_BIN_EXE_patchbay");

pub struct Service {
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    pub url: String,
    pub token: String,
    /// Every line the service printed on stdout before it was ready.
    pub banner: Vec<String>,
}

impl Service {
    /// Starts `patchbay serve` with `config` (None: no config file at all, the embedded default).
    pub fn start(config: Option<&str>) -> Service {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = Command::new(BIN);
        cmd.current_dir(dir.path());
        if let Some(c) = config {
            std::fs::write(dir.path().join("patchbay.toml"), c).expect("write config");
            cmd.args(["--config", "patchbay.toml"]);
        }
        cmd.args(["serve", "--bind", "127.0.0.1:0"])
            .env_remove("RUST_LOG")
            .env("PATCHBAY_TEST", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(dir.path().join("stderr.log")).expect("log")));
        let mut child = cmd.spawn().expect("spawn patchbay");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut banner = Vec::new();
        let mut url = None;
        // The listening line, then the channel lines printed right after it.
        while let Ok(line) = rx.recv_timeout(if url.is_some() { Duration::from_millis(500) } else { Duration::from_secs(60) }) {
            if let Some(u) = line.strip_prefix("patchbay listening on ") {
                url = Some(u.trim().to_owned());
            }
            banner.push(line);
        }
        let Some(url) = url else {
            let _ = child.kill();
            panic!("patchbay did not start: {}", std::fs::read_to_string(dir.path().join("stderr.log")).unwrap_or_default());
        };
        let token = std::fs::read_to_string(dir.path().join("data/admin.token")).map(|t| t.trim().to_owned()).unwrap_or_default();
        Service { dir, child: Some(child), url, token, banner }
    }

    pub async fn admin(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = http().request(method.parse().unwrap(), format!("{}{path}", self.url)).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("admin API");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// The channel's base URL: `{url}/hooks/webchat/{hook_id}`.
    pub async fn base(&self, channel: &str) -> String {
        let (status, v) = self.admin("GET", &format!("/api/v1/channels/{channel}"), None).await;
        assert_eq!(status, 200, "{v}");
        v["callback_url"].as_str().expect("callback_url").to_owned()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("client")
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
