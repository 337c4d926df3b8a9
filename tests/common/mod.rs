//! Test support shared by every end-to-end test: the real `patchbay` binary in a temporary
//! directory (`Patchbay`: its admin API, CLI, stdout banner and stderr), and small helpers
//! (`http`, `send`, `eventually`, `loopback_config`, `fast_pipeline`, `dead_letters`).
//!
//! The rest of the support lives next to this file and is declared only by the test files
//! that use it, so that other test binaries do not compile it:
//!
//! ```ignore
//! mod common;
//! #[path = "common/recorder.rs"]
//! mod recorder; // Fake: a recording, scriptable HTTP endpoint (platform or assistant webhook)
//! #[path = "common/webchat.rs"]
//! mod webchat; // the web chat's HTTP and WebSocket client
//! #[path = "common/browser.rs"]
//! mod browser; // headless Chromium and a TCP proxy that can cut connections
//! #[path = "common/fake_mattermost.rs"]
//! mod fake_mattermost; // a fake Mattermost server
//! ```
//!
//! `recorder` and `webchat` use this module as `crate::common`.
#![allow(dead_code)]

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_patchbay");

/// How long stdout must stay quiet before `Patchbay::banner` answers.
const BANNER_QUIET: Duration = Duration::from_millis(500);

/// What the current run printed on stdout, and when its last line came.
#[derive(Default)]
struct Stdout {
    lines: Vec<String>,
    last: Option<Instant>,
}

/// A running patchbay, its directory (config, database, keys) and its address.
pub struct Patchbay {
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    pub url: String,
    pub token: String,
    /// Whether it runs with `--config patchbay.toml` (else: no config file at all).
    config: bool,
    stdout: Arc<Mutex<Stdout>>,
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
        Self::launch(Some(config), envs)
    }

    /// Starts `patchbay serve` in a fresh directory with no config file at all (the embedded
    /// default).
    pub fn start_without_config() -> Patchbay {
        Self::launch(None, &[])
    }

    fn launch(config: Option<&str>, envs: &[(&str, &str)]) -> Patchbay {
        let dir = tempfile::tempdir().expect("tempdir");
        if let Some(config) = config {
            std::fs::write(dir.path().join("patchbay.toml"), config).expect("write config");
        }
        let mut pb = Patchbay {
            stderr_log: dir.path().join("stderr.log"),
            dir,
            child: None,
            url: String::new(),
            token: String::new(),
            config: config.is_some(),
            stdout: Arc::default(),
            envs: envs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        pb.spawn();
        pb
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `--config patchbay.toml` when started with a config, else nothing.
    fn config_args(&self) -> &'static [&'static str] {
        if self.config {
            &["--config", "patchbay.toml"]
        } else {
            &[]
        }
    }

    fn spawn(&mut self) {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr_log)
            .expect("stderr log");
        let mut cmd = Command::new(BIN);
        cmd.current_dir(self.dir.path())
            .args(self.config_args())
            .args(["serve", "--bind", "127.0.0.1:0"])
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
        // Every run keeps its own lines: the banner is this run's.
        self.stdout = Arc::default();
        let lines = self.stdout.clone();
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
                let mut out = lines.lock().unwrap();
                out.lines.push(line);
                out.last = Some(Instant::now());
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

    /// The lines this run printed on stdout: the listening line, then the chat and channel
    /// lines printed right after it. Waits until stdout has been quiet for half a second.
    pub fn banner(&self) -> Vec<String> {
        loop {
            {
                let out = self.stdout.lock().unwrap();
                if out.last.is_some_and(|t| t.elapsed() >= BANNER_QUIET) {
                    return out.lines.clone();
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
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
            .args(self.config_args())
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
        // Below the server's keep-alive, so a pooled connection is never reused just as the
        // server closes it.
        .pool_idle_timeout(Duration::from_secs(30))
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

/// Fast retries for tests.
pub fn fast_pipeline(max_attempts: u32) -> String {
    format!(
        "[pipeline]\nretry_initial_ms = 50\nretry_max_ms = 200\nmax_attempts = {max_attempts}\npoll_interval_ms = 50\n"
    )
}

/// The dead letters, from the admin API.
pub async fn dead_letters(pb: &Patchbay) -> Vec<Value> {
    let (status, v) = pb.admin("GET", "/api/v1/dead-letters", None).await;
    assert_eq!(status, 200, "{v}");
    v["dead_letters"].as_array().cloned().unwrap_or_default()
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
