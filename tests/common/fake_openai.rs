//! A fake OpenAI-compatible upstream for the `openai` assistant's tests, built from
//! ../shared/reference/webchat-openai.md §2: `POST /v1/chat/completions` answering a
//! `chat.completion` object, or with `"stream": true` a `text/event-stream` of
//! `chat.completion.chunk` events (a first chunk with the role, one per piece of content, a
//! last one with `finish_reason`, then `data: [DONE]`); errors as `{"error": {message, type,
//! param, code}}` with `Retry-After` on 429. It records every request (headers and body).
//!
//! By default it answers `You said: <the last user message>` word by word, `delay` apart;
//! a test scripts other answers with [`FakeOpenAi::push`]. Declared by the test files that
//! use it (`#[path = "common/fake_openai.rs"] mod fake_openai;`).
#![allow(dead_code)]

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One request as the fake saw it.
#[derive(Clone, Debug)]
pub struct Request {
    /// Header names lowercased.
    pub headers: HashMap<String, String>,
    pub body: Value,
}

impl Request {
    /// The `messages` as (role, content) pairs.
    pub fn messages(&self) -> Vec<(String, String)> {
        self.body["messages"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|m| (m["role"].as_str().unwrap_or("").to_owned(), m["content"].as_str().unwrap_or("").to_owned()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// How to answer one request.
#[derive(Clone, Debug)]
pub enum Script {
    /// The content in these pieces, `delay` apart (streamed when asked to stream, else whole).
    Pieces { pieces: Vec<String>, delay: Duration },
    /// Each piece after its own pause.
    Paced { pieces: Vec<(Duration, String)> },
    /// Streams these pieces `delay` apart, then an `error` event, then closes.
    FailMidStream { pieces: Vec<String>, delay: Duration, message: String },
    /// Streams these pieces, then closes without `[DONE]`.
    BreakOff { pieces: Vec<String> },
    /// An error status with OpenAI's error body.
    Error { status: u16, message: String, code: String, retry_after: Option<u64> },
}

#[derive(Default)]
struct State {
    requests: Vec<Request>,
    script: VecDeque<Script>,
    /// The pause between pieces of the default answer.
    delay: Duration,
}

pub struct FakeOpenAi {
    /// The base URL to configure (`…/v1`).
    pub base_url: String,
    state: Arc<Mutex<State>>,
    handle: actix_web::dev::ServerHandle,
}

impl FakeOpenAi {
    pub async fn start() -> FakeOpenAi {
        let state = Arc::new(Mutex::new(State::default()));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base_url = format!("http://{}/v1", listener.local_addr().unwrap());
        let data = web::Data::new(state.clone());
        let server = HttpServer::new(move || {
            App::new().app_data(data.clone()).route("/v1/chat/completions", web::post().to(completions))
        })
        .workers(1)
        .disable_signals()
        .listen(listener)
        .unwrap()
        .run();
        let handle = server.handle();
        tokio::spawn(server);
        FakeOpenAi { base_url, state, handle }
    }

    /// Answers the next request so (scripted answers are used in order, then the default).
    pub fn push(&self, s: Script) {
        self.state.lock().unwrap().script.push_back(s);
    }

    /// The pause between the words of the default answer.
    pub fn set_delay(&self, d: Duration) {
        self.state.lock().unwrap().delay = d;
    }

    pub fn requests(&self) -> Vec<Request> {
        self.state.lock().unwrap().requests.clone()
    }

    pub async fn stop(self) {
        self.handle.stop(false).await;
    }
}

/// Words with their following space, so that joined they give the text back.
pub fn pieces(text: &str) -> Vec<String> {
    text.split_inclusive(' ').map(str::to_owned).collect()
}

fn chunk(delta: Value, finish: Option<&str>) -> String {
    let c = json!({
        "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1_700_000_000, "model": "fake-model",
        "system_fingerprint": "fp_fake",
        "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
    });
    format!("data: {c}\n\n")
}

async fn completions(req: HttpRequest, body: web::Bytes, state: web::Data<Arc<Mutex<State>>>) -> HttpResponse {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let headers = req
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    let request = Request { headers, body: body.clone() };
    let last_user = request.messages().into_iter().rev().find(|(r, _)| r == "user").map(|(_, c)| c).unwrap_or_default();
    let script = {
        let mut st = state.lock().unwrap();
        st.requests.push(request);
        st.script.pop_front().unwrap_or_else(|| Script::Pieces { pieces: pieces(&format!("You said: {last_user}")), delay: st.delay })
    };
    if body.get("model").and_then(Value::as_str).is_none() || body.get("messages").and_then(Value::as_array).is_none() {
        return error(400, "you must provide a model parameter and messages", "invalid_request_error", None);
    }
    let streaming = body["stream"] == true;
    let each = |pieces: Vec<String>, delay: Duration| pieces.into_iter().map(|p| (delay, p)).collect::<Vec<_>>();
    let (pieces, ending) = match script {
        Script::Error { status, message, code, retry_after } => return error(status, &message, &code, retry_after),
        Script::Pieces { pieces, delay } => (each(pieces, delay), Ending::Done),
        Script::Paced { pieces } => (pieces, Ending::Done),
        Script::FailMidStream { pieces, delay, message } => (each(pieces, delay), Ending::Error(message)),
        Script::BreakOff { pieces } => (each(pieces, Duration::ZERO), Ending::Drop),
    };
    if !streaming {
        tokio::time::sleep(pieces.iter().map(|(d, _)| *d).sum()).await;
        let pieces: Vec<String> = pieces.into_iter().map(|(_, p)| p).collect();
        return HttpResponse::Ok().json(json!({
            "id": "chatcmpl-fake", "object": "chat.completion", "created": 1_700_000_000, "model": "fake-model",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": pieces.concat(), "refusal": null},
                         "logprobs": null, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": pieces.len(), "total_tokens": 1 + pieces.len()},
        }));
    }
    let mut events = vec![(Duration::ZERO, chunk(json!({"role": "assistant", "content": ""}), None))];
    events.extend(pieces.iter().map(|(pause, p)| (*pause, chunk(json!({"content": p}), None))));
    match ending {
        Ending::Done => {
            events.push((Duration::ZERO, chunk(json!({}), Some("stop"))));
            events.push((Duration::ZERO, "data: [DONE]\n\n".to_owned()));
        }
        Ending::Error(message) => {
            let e = json!({"error": {"message": message, "type": "server_error", "param": null, "code": null}});
            events.push((Duration::ZERO, format!("data: {e}\n\n")));
        }
        Ending::Drop => {}
    }
    let stream = futures_util::stream::unfold(events.into_iter(), |mut it| async move {
        let (pause, text) = it.next()?;
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
        Some((Ok::<_, actix_web::Error>(web::Bytes::from(text)), it))
    });
    HttpResponse::Ok()
        .content_type("text/event-stream; charset=utf-8")
        .insert_header(("cache-control", "no-cache"))
        .streaming(stream)
}

enum Ending {
    Done,
    Error(String),
    Drop,
}

fn error(status: u16, message: &str, code: &str, retry_after: Option<u64>) -> HttpResponse {
    let kind = match status {
        429 => "rate_limit_error",
        500..=599 => "server_error",
        _ => "invalid_request_error",
    };
    let mut resp = HttpResponse::build(actix_web::http::StatusCode::from_u16(status).unwrap());
    if let Some(s) = retry_after {
        resp.insert_header(("retry-after", s.to_string()));
    }
    resp.json(json!({"error": {"message": message, "type": kind, "param": null, "code": code}}))
}
