//! Headless Chromium (Debian's `chromium`), driven over the Chrome DevTools protocol, and a
//! TCP proxy whose connections a test can cut — a real network drop between page and service.
//! Declared by the test files that use it (`#[path = "common/browser.rs"] mod browser;`).

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub struct Browser {
    child: Child,
    ws: Ws,
    next_id: u64,
    session: String,
    _profile: tempfile::TempDir,
}

/// Where screenshots go: `test-artifacts/` at the repository root (gitignored).
pub fn artifacts() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("test-artifacts");
    dir
}

impl Browser {
    /// Starts headless Chromium with a fresh profile and opens one phone-sized page.
    pub async fn launch() -> Browser {
        let exe = ["chromium", "/usr/bin/chromium"]
            .into_iter()
            .find(|p| Command::new(p).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok())
            .expect("Debian's `chromium` is needed (scripts/test installs it: apt-get install -y chromium)");
        let profile = tempfile::tempdir().expect("profile dir");
        let mut child = Command::new(exe)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start chromium");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    let _ = tx.send(url.trim().to_owned());
                }
            }
        });
        let url = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(u) => u,
            Err(_) => {
                let _ = child.kill();
                panic!("chromium did not start its DevTools endpoint within 30 s");
            }
        };
        let (ws, _) = tokio_tungstenite::connect_async(url.as_str()).await.expect("DevTools socket");
        let mut b = Browser { child, ws, next_id: 0, session: String::new(), _profile: profile };
        let target = b.call("Target.createTarget", json!({"url": "about:blank"})).await;
        let attached = b
            .call("Target.attachToTarget", json!({"targetId": target["targetId"], "flatten": true}))
            .await;
        b.session = attached["sessionId"].as_str().expect("sessionId").to_owned();
        b.page("Page.enable", json!({})).await;
        b.page("Runtime.enable", json!({})).await;
        b.page(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 390, "height": 700, "deviceScaleFactor": 1, "mobile": true}),
        )
        .await;
        b
    }

    async fn raw(&mut self, method: &str, params: Value, session: Option<String>) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        self.ws.send(Message::text(msg.to_string())).await.expect("DevTools send");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let m = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("DevTools did not answer {method} within 30 s"))
                .expect("DevTools socket open")
                .expect("DevTools frame");
            if let Message::Text(t) = m {
                let v: Value = serde_json::from_str(t.as_str()).expect("DevTools JSON");
                if v["id"] == id {
                    if let Some(e) = v.get("error") {
                        panic!("{method} failed: {e}");
                    }
                    return v["result"].clone();
                }
            }
        }
    }

    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        self.raw(method, params, None).await
    }

    /// A command to the page's session.
    pub async fn page(&mut self, method: &str, params: Value) -> Value {
        let s = self.session.clone();
        self.raw(method, params, Some(s)).await
    }

    pub async fn goto(&mut self, url: &str) {
        self.page("Page.navigate", json!({"url": url})).await;
    }

    /// Evaluates `expr` in the page (promises awaited) and answers its JSON value.
    pub async fn eval(&mut self, expr: &str) -> Value {
        let r = self
            .page("Runtime.evaluate", json!({"expression": expr, "returnByValue": true, "awaitPromise": true}))
            .await;
        if let Some(e) = r.get("exceptionDetails") {
            return json!({"exception": e});
        }
        r["result"]["value"].clone()
    }

    /// Polls `expr` every 100 ms until it is truthy, for at most `secs`; answers its value.
    pub async fn wait_for(&mut self, expr: &str, secs: u64) -> Value {
        let tries = secs * 10;
        let mut last = Value::Null;
        for _ in 0..tries {
            last = self.eval(expr).await;
            let truthy = match &last {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                Value::Object(o) => !o.contains_key("exception"),
                Value::Array(_) => true,
            };
            if truthy {
                return last;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("`{expr}` did not become true within {secs} s (last: {last})");
    }

    /// Types `text` into the focused element and presses Enter, as a keyboard would.
    pub async fn type_enter(&mut self, text: &str) {
        self.page("Input.insertText", json!({"text": text})).await;
        for kind in ["keyDown", "keyUp"] {
            self.page(
                "Input.dispatchKeyEvent",
                json!({"type": kind, "key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13, "nativeVirtualKeyCode": 13}),
            )
            .await;
        }
    }

    /// Saves a PNG screenshot as `test-artifacts/<name>.png`; answers the path.
    pub async fn screenshot(&mut self, name: &str) -> PathBuf {
        use base64::Engine;
        let r = self.page("Page.captureScreenshot", json!({"format": "png"})).await;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().expect("screenshot data"))
            .expect("base64");
        let path = artifacts().join(format!("{name}.png"));
        std::fs::write(&path, bytes).expect("write screenshot");
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP proxy on 127.0.0.1 in front of the service. `cut()` drops every connection and
/// refuses new ones until `restore()`.
pub struct CutProxy {
    pub url: String,
    refusing: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    upstream: Arc<Mutex<String>>,
    accept: tokio::task::JoinHandle<()>,
}

impl CutProxy {
    pub async fn start() -> CutProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let refusing = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let upstream: Arc<Mutex<String>> = Arc::default();
        let (r, c, u) = (refusing.clone(), conns.clone(), upstream.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut down, _)) = listener.accept().await {
                if r.load(Ordering::SeqCst) {
                    drop(down);
                    continue;
                }
                let target = u.lock().unwrap().clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut up) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
                let mut list = c.lock().unwrap();
                list.retain(|h| !h.is_finished());
                list.push(task.abort_handle());
            }
        });
        CutProxy { url, refusing, conns, upstream, accept }
    }

    /// Where connections go: the service's `http://127.0.0.1:PORT`.
    pub fn point_at(&self, service_url: &str) {
        *self.upstream.lock().unwrap() = service_url.trim_start_matches("http://").to_owned();
    }

    pub fn cut(&self) {
        self.refusing.store(true, Ordering::SeqCst);
        for h in self.conns.lock().unwrap().drain(..) {
            h.abort();
        }
    }

    pub fn restore(&self) {
        self.refusing.store(false, Ordering::SeqCst);
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}
