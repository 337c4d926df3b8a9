//! `openai`: any OpenAI-compatible chat-completions upstream (OpenAI, Azure-style gateways,
//! vLLM, Ollama, LiteLLM…). Sends a system prompt and the conversation's recent turns, reads
//! the answer as a server-sent-event stream and reports the text as it grows, so channels
//! that can edit a message in place show it growing.
//!
//! The turns are kept in the conversation log under a name of the assistant's own
//! (`~assistant.<id>`), keyed by the message id, so a retried message is remembered once.
//! They are appended when the upstream has finished its answer; a message whose reply is
//! then lost to a crash is answered again from the same history.

use super::*;
use patchbay_channel_core::backoff::parse_retry_after;
use patchbay_channel_core::{ChannelId, ConversationLog, LogRange, Secret};
use serde::Deserialize;
use std::sync::atomic::{AtomicI64, Ordering};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default = "default_base_url")]
    base_url: String,
    /// The upstream's key (`Authorization: Bearer`); none for upstreams without auth.
    #[serde(default)]
    upstream_api_key: Option<Secret>,
    model: String,
    #[serde(default)]
    system_prompt: Option<String>,
    /// How many earlier turns (a user message or an answer each) are sent along.
    #[serde(default = "default_history_turns")]
    history_turns: usize,
    /// How long turns are remembered.
    #[serde(default = "default_history_hours")]
    history_hours: u64,
    #[serde(default = "default_true")]
    stream: bool,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    max_tokens: Option<u32>,
    /// The longest wait for the upstream's headers, and then between two parts of a stream.
    #[serde(default = "default_timeout_ms")]
    timeout_ms: u64,
    /// The push key every assistant may have (see `webhook`).
    #[serde(default)]
    #[allow(dead_code)]
    api_key: Option<String>,
}

fn default_base_url() -> String {
    "https://api.openai.com/v1".into()
}
fn default_history_turns() -> usize {
    20
}
fn default_history_hours() -> u64 {
    24 * 7
}
fn default_true() -> bool {
    true
}
fn default_timeout_ms() -> u64 {
    60_000
}

pub fn build(
    id: &str,
    settings: &serde_json::Value,
    http: &reqwest::Client,
    log: Arc<dyn ConversationLog>,
) -> Result<Arc<dyn Assistant>, SettingsError> {
    let s: Settings = patchbay_channel_core::parse_settings(settings)?;
    let base = reqwest::Url::parse(s.base_url.trim_end_matches('/')).map_err(|e| {
        SettingsError::new("base_url", format!("is not a URL ({e}); give the API's base, like https://api.openai.com/v1"))
    })?;
    if !matches!(base.scheme(), "http" | "https") {
        return Err(SettingsError::new("base_url", "must be an http or https URL, like https://api.openai.com/v1"));
    }
    if base.path().ends_with("/chat/completions") {
        return Err(SettingsError::new("base_url", "is the API's base (…/v1), without /chat/completions"));
    }
    if s.model.trim().is_empty() {
        return Err(SettingsError::new("model", "must name the upstream's model, like gpt-4o-mini"));
    }
    if s.history_turns > 200 {
        return Err(SettingsError::new("history_turns", "must be between 0 and 200"));
    }
    if s.history_hours == 0 || s.history_hours > 24 * 365 {
        return Err(SettingsError::new("history_hours", "must be between 1 and 8760"));
    }
    if s.timeout_ms == 0 || s.timeout_ms > 600_000 {
        return Err(SettingsError::new("timeout_ms", "must be between 1 and 600000"));
    }
    if let Some(t) = s.temperature {
        if !(0.0..=2.0).contains(&t) {
            return Err(SettingsError::new("temperature", "must be between 0 and 2"));
        }
    }
    let mut url = base.clone();
    url.set_path(&format!("{}/chat/completions", base.path().trim_end_matches('/')));
    Ok(Arc::new(OpenAi(Arc::new(Inner {
        url,
        key: s.upstream_api_key,
        model: s.model,
        system_prompt: s.system_prompt.filter(|p| !p.trim().is_empty()),
        history_turns: s.history_turns,
        history: Duration::from_secs(s.history_hours * 3600),
        stream: s.stream,
        temperature: s.temperature,
        max_tokens: s.max_tokens,
        timeout: Duration::from_millis(s.timeout_ms),
        http: http.clone(),
        log,
        log_name: ChannelId::from_trusted(format!("~assistant.{id}")),
        pruned_at: AtomicI64::new(0),
    }))))
}

struct OpenAi(Arc<Inner>);

struct Inner {
    url: reqwest::Url,
    key: Option<Secret>,
    model: String,
    system_prompt: Option<String>,
    history_turns: usize,
    history: Duration,
    stream: bool,
    temperature: Option<f64>,
    max_tokens: Option<u32>,
    timeout: Duration,
    http: reqwest::Client,
    log: Arc<dyn ConversationLog>,
    log_name: ChannelId,
    pruned_at: AtomicI64,
}

/// How often old turns are pruned.
const PRUNE_EVERY_MS: i64 = 3_600_000;

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
struct Turn {
    role: String,
    content: String,
    /// The message the turn belongs to: a message answered again (after a crash or a lost
    /// lease) does not see its own earlier turns as history.
    #[serde(default)]
    id: String,
}

impl Inner {
    async fn turns(&self, conversation: &str, current: &str) -> Result<Vec<Turn>, AssistantError> {
        if self.history_turns == 0 {
            return Ok(Vec::new());
        }
        let since = patchbay_channel_core::now_ms() - self.history.as_millis() as i64;
        let entries = self
            .log
            .read(&self.log_name, conversation, LogRange::Before(None), self.history_turns)
            .await
            .map_err(|e| AssistantError::Retryable { message: e.to_string(), retry_after: None })?;
        Ok(entries
            .into_iter()
            .filter(|e| e.at >= since)
            .filter_map(|e| serde_json::from_value::<Turn>(e.body).ok())
            .filter(|t| t.id != current)
            .collect())
    }

    async fn remember(&self, request: &AssistantRequest, answer: &str) {
        if self.history_turns == 0 {
            return;
        }
        let conv = &request.conversation.id;
        let user = Turn { role: "user".into(), content: request.text.clone(), id: request.id.clone() };
        let assistant = Turn { role: "assistant".into(), content: answer.to_owned(), id: request.id.clone() };
        for (key, turn) in [(format!("{}:user", request.id), user), (format!("{}:assistant", request.id), assistant)] {
            let body = serde_json::to_value(turn).unwrap_or_default();
            if let Err(e) = self.log.append(&self.log_name, conv, Some(&key), body).await {
                tracing::warn!(error = %e, "the conversation's turn was not remembered");
                return;
            }
        }
        let now = patchbay_channel_core::now_ms();
        let last = self.pruned_at.load(Ordering::Relaxed);
        if now - last > PRUNE_EVERY_MS && self.pruned_at.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            let before = now - self.history.as_millis() as i64;
            if let Err(e) = self.log.prune(&self.log_name, before).await {
                tracing::warn!(error = %e, "old turns were not pruned");
            }
        }
    }

    fn body(&self, request: &AssistantRequest, turns: Vec<Turn>) -> serde_json::Value {
        let mut messages = Vec::with_capacity(turns.len() + 2);
        if let Some(p) = &self.system_prompt {
            messages.push(serde_json::json!({"role": "system", "content": p}));
        }
        messages.extend(turns.into_iter().map(|t| serde_json::json!({"role": t.role, "content": t.content})));
        messages.push(serde_json::json!({"role": "user", "content": request.text}));
        let mut body = serde_json::json!({"model": self.model, "messages": messages, "stream": self.stream});
        if let Some(t) = self.temperature {
            body["temperature"] = t.into();
        }
        if let Some(m) = self.max_tokens {
            body["max_tokens"] = m.into();
        }
        if !request.user.id.is_empty() {
            // OpenAI's abuse monitoring asks for a stable end-user id; never the name.
            body["user"] = serde_json::Value::String(request.user.id.clone());
        }
        body
    }

    /// Runs one request, sending the text so far into `events` as it grows (skipped while
    /// the reader is behind: the next one carries the newest text); answers the finished text.
    async fn call(
        &self,
        request: &AssistantRequest,
        events: &tokio::sync::mpsc::Sender<Result<AssistantEvent, AssistantError>>,
    ) -> Result<String, AssistantError> {
        let turns = self.turns(&request.conversation.id, &request.id).await?;
        let mut req = self
            .http
            .post(self.url.clone())
            .header("accept", if self.stream { "text/event-stream" } else { "application/json" })
            .json(&self.body(request, turns));
        if let Some(k) = &self.key {
            req = req.bearer_auth(k.expose());
        }
        let mut resp = tokio::time::timeout(self.timeout, req.send())
            .await
            .map_err(|_| self.slow())?
            .map_err(|e| AssistantError::Retryable {
                message: format!("cannot reach the upstream at {}: {}", self.url, e.without_url()),
                retry_after: None,
            })?;
        let status = resp.status();
        if !status.is_success() {
            let h = resp.headers();
            let retry_after = h
                .get("retry-after-ms")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_millis)
                .or_else(|| h.get("retry-after").and_then(|v| v.to_str().ok()).and_then(parse_retry_after));
            let body = tokio::time::timeout(self.timeout, resp.bytes()).await.ok().and_then(|b| b.ok()).unwrap_or_default();
            let message = format!("the upstream answered {status}: {}", error_message(&body));
            return Err(match status.as_u16() {
                408 | 409 | 429 | 500..=599 => AssistantError::Retryable { message, retry_after },
                401 | 403 => AssistantError::Permanent(format!("{message} (check upstream_api_key)")),
                404 => AssistantError::Permanent(format!("{message} (check base_url and model)")),
                _ => AssistantError::Permanent(message),
            });
        }
        let is_sse = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if !is_sse {
            let body = tokio::time::timeout(self.timeout, resp.bytes())
                .await
                .map_err(|_| self.slow())?
                .map_err(broke_off)?;
            return completion_text(&body);
        }
        let mut sse = SseLines::default();
        let mut text = String::new();
        loop {
            let chunk = tokio::time::timeout(self.timeout, resp.chunk())
                .await
                .map_err(|_| self.slow())?
                .map_err(broke_off)?;
            let Some(chunk) = chunk else {
                // A stream that ends without [DONE] broke off.
                return Err(AssistantError::Retryable {
                    message: "the upstream's stream ended before [DONE]".into(),
                    retry_after: None,
                });
            };
            let before = text.len();
            for data in sse.push(&chunk) {
                if data == "[DONE]" {
                    return Ok(text);
                }
                text.push_str(&delta(&data)?);
            }
            if text.len() > before {
                // The newest text wins; a slow reader misses intermediate ones.
                let _ = events.try_send(Ok(AssistantEvent::Partial(text.clone())));
            }
        }
    }

    fn slow(&self) -> AssistantError {
        AssistantError::Retryable {
            message: format!("the upstream did not answer within {} ms", self.timeout.as_millis()),
            retry_after: None,
        }
    }
}

fn broke_off(e: reqwest::Error) -> AssistantError {
    AssistantError::Retryable { message: format!("the upstream's answer broke off: {}", e.without_url()), retry_after: None }
}

/// The `error.message` of an OpenAI error body, else the body's start.
fn error_message(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.pointer("/error/message").and_then(|m| m.as_str()).map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(200)]).trim().to_owned())
}

/// The text of a non-streamed `chat.completion`.
fn completion_text(body: &[u8]) -> Result<String, AssistantError> {
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| AssistantError::Permanent(format!("the upstream's answer is not JSON: {e}")))?;
    match v.pointer("/choices/0/message/content") {
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(serde_json::Value::Null) | None if v.pointer("/choices/0").is_some() => Ok(String::new()),
        _ => Err(AssistantError::Permanent(format!(
            "the upstream's answer has no choices[0].message: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        ))),
    }
}

/// The text a `chat.completion.chunk` adds; an `error` object in the stream fails the answer.
fn delta(data: &str) -> Result<String, AssistantError> {
    let v: serde_json::Value = serde_json::from_str(data)
        .map_err(|e| AssistantError::Retryable { message: format!("the upstream sent a stream event that is not JSON: {e}"), retry_after: None })?;
    if let Some(err) = v.get("error").filter(|e| !e.is_null()) {
        let message = err.get("message").and_then(|m| m.as_str()).unwrap_or("An error occurred during streaming");
        return Err(AssistantError::Retryable { message: format!("the upstream failed mid-stream: {message}"), retry_after: None });
    }
    Ok(v.pointer("/choices/0/delta/content").and_then(|c| c.as_str()).unwrap_or_default().to_owned())
}

/// Server-sent events, cut from arbitrary chunks: answers the `data` of each complete event
/// (several `data:` lines of one event joined with newlines; comments and other fields
/// skipped).
#[derive(Default)]
struct SseLines {
    pending: Vec<u8>,
    data: Option<String>,
}

impl SseLines {
    fn push(&mut self, chunk: &[u8]) -> Vec<String> {
        self.pending.extend_from_slice(chunk);
        let mut out = Vec::new();
        while let Some(nl) = self.pending.iter().position(|&b| b == b'\n') {
            let mut line: Vec<u8> = self.pending.drain(..=nl).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let line = String::from_utf8_lossy(&line);
            if line.is_empty() {
                if let Some(d) = self.data.take() {
                    out.push(d);
                }
            } else if let Some(value) = line.strip_prefix("data:") {
                let value = value.strip_prefix(' ').unwrap_or(value);
                match &mut self.data {
                    Some(d) => {
                        d.push('\n');
                        d.push_str(value);
                    }
                    None => self.data = Some(value.to_owned()),
                }
            }
        }
        out
    }
}

/// Aborts the answering task when the dispatcher drops the stream (a timeout, a shutdown).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[async_trait]
impl Assistant for OpenAi {
    async fn respond(&self, request: AssistantRequest) -> AssistantStream {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<AssistantEvent, AssistantError>>(8);
        let inner = self.0.clone();
        let task = tokio::spawn(async move {
            let result = inner.call(&request, &tx).await;
            if let Ok(text) = &result {
                inner.remember(&request, text).await;
            }
            let last = result.map(|text| AssistantEvent::Reply(Reply::text(text)));
            let _ = tx.send(last).await;
        });
        let guard = AbortOnDrop(task);
        Box::pin(futures_util::stream::poll_fn(move |cx| {
            let _ = &guard;
            rx.poll_recv(cx)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_cut_from_any_chunking() {
        let stream = "data: {\"a\":1}\n\n: keep-alive comment\n\ndata: {\"b\":\r\ndata: 2}\r\n\r\nevent: x\ndata: [DONE]\n\n";
        for size in [1, 2, 3, 7, stream.len()] {
            let mut sse = SseLines::default();
            let mut all = Vec::new();
            for chunk in stream.as_bytes().chunks(size) {
                all.extend(sse.push(chunk));
            }
            assert_eq!(all, vec!["{\"a\":1}", "{\"b\":\n2}", "[DONE]"], "chunks of {size}");
        }
    }

    #[test]
    fn deltas_and_errors_in_the_stream() {
        let chunk = r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"Hel"},"logprobs":null,"finish_reason":null}]}"#;
        assert_eq!(delta(chunk).unwrap(), "Hel");
        let role_only = r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#;
        assert_eq!(delta(role_only).unwrap(), "");
        let usage = r#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;
        assert_eq!(delta(usage).unwrap(), "");
        let err = r#"{"error":{"message":"overloaded","type":"server_error","param":null,"code":null}}"#;
        assert!(matches!(delta(err), Err(AssistantError::Retryable { message, .. }) if message.contains("overloaded")));
    }

    #[test]
    fn non_streamed_answers_and_error_bodies() {
        let body = br#"{"id":"x","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"Hi!"},"logprobs":null,"finish_reason":"stop"}]}"#;
        assert_eq!(completion_text(body).unwrap(), "Hi!");
        assert!(completion_text(b"{}").is_err());
        let e = br#"{"error":{"message":"Incorrect API key provided","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#;
        assert_eq!(error_message(e), "Incorrect API key provided");
        assert_eq!(error_message(b"Bad Gateway"), "Bad Gateway");
    }

    #[test]
    fn settings_name_the_field() {
        let env = AssistantEnv { http: reqwest::Client::new(), log: Arc::new(patchbay_channel_core::MemoryLog::default()) };
        let field = |v: serde_json::Value| super::super::build("a", "openai", &v, &env).err().map(|e| e.field);
        assert_eq!(field(serde_json::json!({})), Some("model".into()));
        assert_eq!(field(serde_json::json!({"model": " "})), Some("model".into()));
        assert_eq!(field(serde_json::json!({"model": "m", "base_url": "ftp://x"})), Some("base_url".into()));
        assert_eq!(
            field(serde_json::json!({"model": "m", "base_url": "http://x/v1/chat/completions"})),
            Some("base_url".into())
        );
        assert_eq!(field(serde_json::json!({"model": "m", "temperature": 3.0})), Some("temperature".into()));
        assert_eq!(field(serde_json::json!({"model": "m", "history_turns": 1000})), Some("history_turns".into()));
        assert_eq!(field(serde_json::json!({"model": "m", "modle": "x"})), Some("modle".into()));
        assert_eq!(field(serde_json::json!({"model": "m", "base_url": "http://127.0.0.1:9/v1/"})), None);
    }
}
