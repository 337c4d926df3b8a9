//! A recording HTTP endpoint for the tests: it records every request with its arrival time,
//! headers and raw body, answers from a script, then from a responder, and can answer late or
//! hold requests. It plays the platform a loopback channel delivers to, or an assistant's
//! webhook. Declared by the test files that use it (`#[path = "common/recorder.rs"] mod
//! recorder;`) next to `mod common;`.
#![allow(dead_code)]

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use serde_json::Value;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One request as the fake endpoint saw it.
#[derive(Clone, Debug)]
pub struct Hit {
    pub at: Instant,
    /// Header names lowercased.
    pub headers: HashMap<String, String>,
    pub raw: Vec<u8>,
    pub json: Value,
    /// What it was answered.
    pub status: u16,
}

/// How to answer one request.
#[derive(Clone, Debug)]
pub struct Answer {
    pub status: u16,
    pub retry_after: Option<u64>,
    pub body: String,
    /// Answer only after this long.
    pub delay: Duration,
}

impl Answer {
    pub fn status(status: u16) -> Answer {
        Answer {
            status,
            retry_after: None,
            body: String::new(),
            delay: Duration::ZERO,
        }
    }
    pub fn json(status: u16, body: Value) -> Answer {
        Answer {
            body: body.to_string(),
            ..Answer::status(status)
        }
    }
    pub fn body(mut self, body: &str) -> Answer {
        self.body = body.to_owned();
        self
    }
    pub fn retry_after(mut self, secs: u64) -> Answer {
        self.retry_after = Some(secs);
        self
    }
    pub fn delay(mut self, d: Duration) -> Answer {
        self.delay = d;
        self
    }
}

type Responder = Arc<dyn Fn(&Value) -> Answer + Send + Sync>;

#[derive(Clone)]
struct State {
    hits: Arc<Mutex<Vec<Hit>>>,
    script: Arc<Mutex<VecDeque<Answer>>>,
    responder: Arc<Mutex<Responder>>,
    gate: tokio::sync::watch::Receiver<bool>,
    arrived: Arc<Mutex<usize>>,
}

/// A fake HTTP endpoint at `url` (POST). Answers from the script first, then with the
/// responder (200 with an empty body unless set).
pub struct Fake {
    pub url: String,
    hits: Arc<Mutex<Vec<Hit>>>,
    script: Arc<Mutex<VecDeque<Answer>>>,
    responder: Arc<Mutex<Responder>>,
    gate: tokio::sync::watch::Sender<bool>,
    arrived: Arc<Mutex<usize>>,
    handle: actix_web::dev::ServerHandle,
}

async fn handle(req: HttpRequest, body: web::Bytes, state: web::Data<State>) -> HttpResponse {
    let at = Instant::now();
    *state.arrived.lock().unwrap() += 1;
    // Held requests wait here until the gate opens.
    let mut gate = state.gate.clone();
    let _ = gate.wait_for(|open| *open).await;
    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let answer = state.script.lock().unwrap().pop_front();
    let answer = match answer {
        Some(a) => a,
        None => {
            let r = state.responder.lock().unwrap().clone();
            r(&json)
        }
    };
    let headers = req
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_ascii_lowercase(), v.to_str().unwrap_or_default().to_owned()))
        .collect();
    state.hits.lock().unwrap().push(Hit {
        at,
        headers,
        raw: body.to_vec(),
        json,
        status: answer.status,
    });
    if !answer.delay.is_zero() {
        tokio::time::sleep(answer.delay).await;
    }
    let mut resp = HttpResponse::build(actix_web::http::StatusCode::from_u16(answer.status).unwrap());
    if let Some(ra) = answer.retry_after {
        resp.insert_header(("Retry-After", ra.to_string()));
    }
    if answer.body.is_empty() {
        resp.finish()
    } else {
        resp.content_type("application/json").body(answer.body)
    }
}

impl Fake {
    pub async fn start() -> Fake {
        let (gate_tx, gate_rx) = tokio::sync::watch::channel(true);
        let state = State {
            hits: Default::default(),
            script: Default::default(),
            responder: Arc::new(Mutex::new(Arc::new(|_: &Value| Answer::status(200)) as Responder)),
            gate: gate_rx,
            arrived: Default::default(),
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/endpoint", listener.local_addr().unwrap());
        let data = web::Data::new(state.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .app_data(web::PayloadConfig::new(16 * 1024 * 1024))
                .route("/endpoint", web::post().to(handle))
                .route("/endpoint", web::head().to(HttpResponse::Ok))
        })
        .workers(1)
        .disable_signals()
        .listen(listener)
        .unwrap()
        .run();
        let handle = server.handle();
        tokio::spawn(server);
        Fake {
            url,
            hits: state.hits,
            script: state.script,
            responder: state.responder,
            gate: gate_tx,
            arrived: state.arrived,
            handle,
        }
    }

    /// Answers the next request with `a` (scripted answers are used in order).
    pub fn push(&self, a: Answer) {
        self.script.lock().unwrap().push_back(a);
    }

    /// How unscripted requests are answered.
    pub fn respond_with(&self, f: impl Fn(&Value) -> Answer + Send + Sync + 'static) {
        *self.responder.lock().unwrap() = Arc::new(f);
    }

    /// Requests wait (unanswered, unrecorded) until `release`.
    pub fn hold(&self) {
        self.gate.send_replace(false);
    }

    pub fn release(&self) {
        self.gate.send_replace(true);
    }

    /// Requests that arrived, held ones included.
    pub fn arrived(&self) -> usize {
        *self.arrived.lock().unwrap()
    }

    /// Every request answered so far, in arrival order.
    pub fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    /// The bodies of the requests answered with a 2xx.
    pub fn ok(&self) -> Vec<Value> {
        self.hits()
            .into_iter()
            .filter(|h| (200..300).contains(&h.status))
            .map(|h| h.json)
            .collect()
    }

    /// The reply texts delivered (loopback deliveries answered 2xx).
    pub fn delivered_texts(&self) -> Vec<String> {
        self.ok()
            .iter()
            .filter_map(|v| v["reply"]["text"].as_str().map(str::to_owned))
            .collect()
    }

    pub async fn stop(self) {
        self.gate.send_replace(true);
        self.handle.stop(false).await;
    }
}

/// Waits (30 s at most) until `text` is among the reply texts `rx` was delivered.
pub async fn wait_delivered(rx: &Fake, text: &str) {
    crate::common::eventually(Duration::from_secs(30), &format!("`{text}` delivered"), || async {
        rx.delivered_texts().iter().any(|t| t == text).then_some(())
    })
    .await;
}
