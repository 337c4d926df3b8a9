//! `webhook`: the assistant team's HTTP endpoint, exactly the contract in docs/assistants.md.
//!
//! Each request is signed: `X-Patchbay-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret,
//! "<t>.<raw body>")>`. `200 {"replies": [...]}` answers now; `202`/`204` (or a 200 with an
//! empty body) mean "no reply now" — the assistant may push later. Timeouts, connection
//! errors, 429 and 5xx are retried by the pipeline with backoff (honouring Retry-After);
//! other statuses are permanent.

use super::*;
use hmac::{Hmac, Mac};
use patchbay_channel_core::backoff::parse_retry_after;
use patchbay_channel_core::Secret;
use serde::Deserialize;
use sha2::Sha256;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    url: String,
    secret: Secret,
    #[serde(default)]
    #[allow(dead_code)]
    api_key: Option<String>,
    #[serde(default = "default_timeout_ms")]
    timeout_ms: u64,
}

fn default_timeout_ms() -> u64 {
    10_000
}

pub fn build(settings: &serde_json::Value, http: &reqwest::Client) -> Result<Arc<dyn Assistant>, SettingsError> {
    let s: Settings = patchbay_channel_core::parse_settings(settings)?;
    let url = reqwest::Url::parse(&s.url)
        .map_err(|e| SettingsError::new("url", format!("is not a URL ({e}); give an absolute http(s) URL")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(SettingsError::new("url", "must be an http or https URL"));
    }
    if s.secret.expose().len() < 16 {
        return Err(SettingsError::new("secret", "must be at least 16 characters: it signs every request"));
    }
    if s.timeout_ms == 0 || s.timeout_ms > 300_000 {
        return Err(SettingsError::new("timeout_ms", "must be between 1 and 300000"));
    }
    Ok(Arc::new(Webhook {
        url,
        secret: s.secret,
        timeout: Duration::from_millis(s.timeout_ms),
        http: http.clone(),
    }))
}

struct Webhook {
    url: reqwest::Url,
    secret: Secret,
    timeout: Duration,
    http: reqwest::Client,
}

/// The signature header value for `body` at time `t` (Unix seconds).
pub fn signature(secret: &Secret, t: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes()).expect("HMAC takes any key length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WebhookAnswer {
    #[serde(default)]
    replies: Vec<Reply>,
}

impl Webhook {
    async fn call(&self, request: AssistantRequest) -> Result<Vec<Reply>, AssistantError> {
        let body = serde_json::to_vec(&request).map_err(|e| AssistantError::Permanent(e.to_string()))?;
        let t = patchbay_channel_core::now_ms() / 1000;
        let resp = self
            .http
            .post(self.url.clone())
            .timeout(self.timeout)
            .header("content-type", "application/json")
            .header("x-patchbay-signature", signature(&self.secret, t, &body))
            .body(body)
            .send()
            .await
            .map_err(|e| AssistantError::Retryable {
                message: if e.is_timeout() {
                    format!("the assistant did not answer within {} ms", self.timeout.as_millis())
                } else {
                    format!("cannot reach the assistant: {}", e.without_url())
                },
                retry_after: None,
            })?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let bytes = resp.bytes().await.map_err(|e| AssistantError::Retryable {
            message: format!("the assistant's answer broke off: {}", e.without_url()),
            retry_after: None,
        })?;
        match status.as_u16() {
            200 if bytes.iter().all(|b| b.is_ascii_whitespace()) => Ok(Vec::new()),
            200 => {
                let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
                    AssistantError::Permanent(format!("the assistant answered 200 with a body that is not JSON: {e}"))
                })?;
                let answer: WebhookAnswer = patchbay_channel_core::parse_settings(&value).map_err(|e| {
                    AssistantError::Permanent(format!("the assistant's answer is not {{\"replies\": [...]}}: {e}"))
                })?;
                Ok(answer.replies)
            }
            202 | 204 => Ok(Vec::new()),
            429 | 500..=599 => Err(AssistantError::Retryable {
                message: format!("the assistant answered {status}: {}", snippet(&bytes)),
                retry_after,
            }),
            _ => Err(AssistantError::Permanent(format!(
                "the assistant answered {status}: {}",
                snippet(&bytes)
            ))),
        }
    }
}

fn snippet(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned()
}

#[async_trait]
impl Assistant for Webhook {
    async fn respond(&self, request: AssistantRequest) -> AssistantStream {
        let result = self.call(request).await;
        let events: Vec<Result<AssistantEvent, AssistantError>> = match result {
            Ok(replies) => replies.into_iter().map(|r| Ok(AssistantEvent::Reply(r))).collect(),
            Err(e) => vec![Err(e)],
        };
        Box::pin(futures_util::stream::iter(events))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_the_contract() {
        // HMAC-SHA256("0123456789abcdef", "1700000000.{}"), computed independently with
        // `printf '1700000000.{}' | openssl dgst -sha256 -hmac 0123456789abcdef`.
        let s = signature(&Secret::new("0123456789abcdef"), 1_700_000_000, b"{}");
        assert_eq!(s, "t=1700000000,v1=e4f8e2ecae2295b2ddb2f0b5584c8275e226c0ebe9b3b819e70156bb67122e3e");
    }

    #[test]
    fn settings_name_the_field() {
        let http = reqwest::Client::new();
        let e = build(&serde_json::json!({"url": "ftp://x", "secret": "0123456789abcdef"}), &http).err().unwrap();
        assert_eq!(e.field, "url");
        let e = build(&serde_json::json!({"url": "http://x", "secret": "short"}), &http).err().unwrap();
        assert_eq!(e.field, "secret");
        let e = build(&serde_json::json!({"url": "http://x", "secret": "0123456789abcdef", "timeout": 1}), &http).err().unwrap();
        assert_eq!(e.field, "timeout");
    }
}
