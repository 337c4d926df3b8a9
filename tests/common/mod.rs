//! Test support: the real `patchbay` binary in a temporary directory, its admin API, and a
//! receiver that plays the platform a loopback channel delivers to.
#![allow(dead_code)]

pub mod fake_mattermost;

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use serde_json::Value;
use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_patchbay");

/// A running patchbay, its directory (config, database, keys) and its address.
pub struct Patchbay {
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    pub url: String,
    pub token: String,
    stderr_log: PathBuf,
    envs: Vec<(String, String)>,
}

impl Patchbay {
    /// Starts patchbay with `config` (TOML: assistants, channels, and any section to
    /// override) in a fresh directory.
    pub fn start(config: &str) -> Patchbay {
        Self::start_with_env(config, &[])
    }

    pub fn start_with_env(config: &str, envs: &[(&str, &str)]) -> Patchbay {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("patchbay.toml"), config).expect("write config");
        let mut pb = Patchbay {
            stderr_log: dir.path().join("stderr.log"),
            dir,
            child: None,
            url: String::new(),
            token: String::new(),
            envs: envs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        pb.spawn();
        pb
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    fn spawn(&mut self) {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr_log)
            .expect("stderr log");
        let mut cmd = Command::new(BIN);
        cmd.current_dir(self.dir.path())
            .args(["--config", "patchbay.toml", "serve", "--bind", "127.0.0.1:0"])
            .env_remove("RUST_LOG")
            .env("PATCHBAY_TEST", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr));
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn patchbay");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if !sent {
                    if let Some(url) = line.strip_prefix("patchbay listening on ") {
                        let _ = tx.send(url.trim().to_owned());
                        sent = true;
                    }
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(url) => self.url = url,
            Err(_) => {
                let _ = child.kill();
                panic!("patchbay did not start; stderr:\n{}", self.stderr());
            }
        }
        self.child = Some(child);
        self.token = std::fs::read_to_string(self.dir.path().join("data/admin.token"))
            .map(|t| t.trim().to_owned())
            .unwrap_or_default();
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("kill");
            c.wait().expect("wait");
        }
    }

    /// SIGTERM, then wait for the process to exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("running");
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = c.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("patchbay did not exit within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts again on the same directory (same database, keys and config).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "still running");
        self.spawn();
    }

    /// Calls the admin API with the admin token.
    pub async fn admin(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.call(method, path, body, Some(&self.token)).await
    }

    pub async fn call(&self, method: &str, path: &str, body: Option<Value>, token: Option<&str>) -> (u16, Value) {
        let mut req = http()
            .request(method.parse().expect("method"), format!("{}{path}", self.url));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("admin API reachable");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub async fn callback_url(&self, channel: &str) -> String {
        let (status, v) = self.admin("GET", &format!("/api/v1/channels/{channel}"), None).await;
        assert_eq!(status, 200, "{v}");
        v["callback_url"].as_str().expect("callback_url").to_owned()
    }

    /// Runs the CLI against this instance.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .current_dir(self.dir.path())
            .arg("--config")
            .arg("patchbay.toml")
            .args(args)
            .arg("--url")
            .arg(&self.url)
            .env("PATCHBAY_ADMIN_TOKEN", &self.token)
            .output()
            .expect("run the CLI")
    }
}

impl Drop for Patchbay {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// Sends one message to a loopback channel; answers the JSON reply.
pub async fn send(hook: &str, id: &str, conversation: &str, text: &str) -> (u16, Value) {
    let resp = http()
        .post(hook)
        .json(&serde_json::json!({"id": id, "conversation": conversation, "text": text}))
        .send()
        .await
        .expect("hook reachable");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Polls `f` until it answers `Some`, or panics after `within` with `what`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// What the receiver answers to the next deliveries (then 200 for the rest).
#[derive(Clone, Debug)]
pub struct Scripted {
    pub status: u16,
    pub retry_after: Option<u64>,
    pub body: &'static str,
}

/// An HTTP endpoint that records what is POSTed to it (the platform a loopback channel
/// delivers to, or an assistant's webhook), answering from a script first.
pub struct Receiver {
    pub url: String,
    pub received: Arc<Mutex<Vec<Value>>>,
    pub attempts: Arc<Mutex<Vec<(Value, u16)>>>,
    pub script: Arc<Mutex<VecDeque<Scripted>>>,
    handle: actix_web::dev::ServerHandle,
}

#[derive(Clone)]
struct ReceiverState {
    received: Arc<Mutex<Vec<Value>>>,
    attempts: Arc<Mutex<Vec<(Value, u16)>>>,
    script: Arc<Mutex<VecDeque<Scripted>>>,
}

async fn receive(req: HttpRequest, body: web::Bytes, state: web::Data<ReceiverState>) -> HttpResponse {
    let _ = req;
    let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let next = state.script.lock().unwrap().pop_front();
    match next {
        Some(s) => {
            state.attempts.lock().unwrap().push((value, s.status));
            let mut resp = HttpResponse::build(actix_web::http::StatusCode::from_u16(s.status).unwrap());
            if let Some(ra) = s.retry_after {
                resp.insert_header(("Retry-After", ra.to_string()));
            }
            resp.body(s.body)
        }
        None => {
            state.attempts.lock().unwrap().push((value.clone(), 200));
            state.received.lock().unwrap().push(value);
            HttpResponse::Ok().finish()
        }
    }
}

impl Receiver {
    pub async fn start() -> Receiver {
        let state = ReceiverState {
            received: Default::default(),
            attempts: Default::default(),
            script: Default::default(),
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/deliver", listener.local_addr().unwrap());
        let data = web::Data::new(state.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .route("/deliver", web::post().to(receive))
                .route("/deliver", web::head().to(HttpResponse::Ok))
        })
        .workers(1)
        .disable_signals()
        .listen(listener)
        .unwrap()
        .run();
        let handle = server.handle();
        tokio::spawn(server);
        Receiver {
            url,
            received: state.received,
            attempts: state.attempts,
            script: state.script,
            handle,
        }
    }

    pub fn push_script(&self, s: Scripted) {
        self.script.lock().unwrap().push_back(s);
    }

    pub fn received(&self) -> Vec<Value> {
        self.received.lock().unwrap().clone()
    }

    pub async fn stop(self) {
        self.handle.stop(false).await;
    }
}

/// A config with a loopback channel `name` delivering to `deliver_url` and the echo assistant.
pub fn loopback_config(name: &str, deliver_url: &str) -> String {
    format!(
        r#"
[assistants.echo]
backend = "echo"

[channels.{name}]
kind = "loopback"
assistant = "echo"
deliver_url = "{deliver_url}"
"#
    )
}
