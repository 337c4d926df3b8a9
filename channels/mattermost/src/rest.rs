//! The REST calls a bot account needs (`/api/v4`, `Authorization: Bearer <token>`), with
//! Mattermost's AppError bodies turned into messages and failures classified.

use patchbay_channel_core::{backoff::parse_retry_after, Secret, SendError};
use serde::Deserialize;
use std::time::Duration;

/// Why a REST call failed.
#[derive(Clone, Debug, PartialEq)]
pub enum RestError {
    /// 401: the token was revoked or the bot deactivated.
    Unauthorized(String),
    /// 429, 5xx, timeouts, connection errors: worth trying again.
    Retryable { message: String, retry_after: Option<Duration> },
    /// Anything else (400, 403, 404): trying again cannot help.
    Permanent(String),
}

impl RestError {
    pub fn message(&self) -> &str {
        match self {
            RestError::Unauthorized(m) | RestError::Permanent(m) => m,
            RestError::Retryable { message, .. } => message,
        }
    }
}

impl From<RestError> for SendError {
    fn from(e: RestError) -> SendError {
        match e {
            RestError::Unauthorized(m) => SendError::Unauthorized(m),
            RestError::Retryable { message, retry_after } => SendError::Retryable { message, retry_after },
            RestError::Permanent(m) => SendError::Permanent(m),
        }
    }
}

/// `GET /api/v4/users/me`.
#[derive(Clone, Debug, Deserialize)]
pub struct Me {
    pub id: String,
    pub username: String,
    #[serde(default)]
    pub is_bot: bool,
}

/// A channel the bot is a member of.
#[derive(Clone, Debug, Deserialize)]
pub struct ChannelInfo {
    pub id: String,
    #[serde(default)]
    pub team_id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default, rename = "type")]
    pub kind: String,
}

#[derive(Clone, Debug, Deserialize)]
pub struct TeamInfo {
    pub id: String,
    pub name: String,
}

/// A `model.Post`, the fields patchbay reads.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct Post {
    pub id: String,
    #[serde(default)]
    pub create_at: i64,
    #[serde(default)]
    pub user_id: String,
    #[serde(default)]
    pub channel_id: String,
    #[serde(default)]
    pub root_id: String,
    #[serde(default)]
    pub message: String,
    #[serde(default, rename = "type")]
    pub post_type: String,
    #[serde(default)]
    pub props: serde_json::Map<String, serde_json::Value>,
}

impl Post {
    pub fn prop_true(&self, key: &str) -> bool {
        match self.props.get(key) {
            Some(serde_json::Value::String(s)) => s == "true",
            Some(serde_json::Value::Bool(b)) => *b,
            _ => false,
        }
    }
}

/// `model.PostList`.
#[derive(Debug, Default, Deserialize)]
struct PostList {
    #[serde(default)]
    order: Vec<String>,
    #[serde(default)]
    posts: std::collections::HashMap<String, Post>,
}

#[derive(Clone)]
pub struct Rest {
    base: reqwest::Url,
    token: Secret,
    http: reqwest::Client,
    timeout: Duration,
}

/// At most this many pages of 200 posts are fetched per channel when catching up.
const MAX_BACKFILL_PAGES: u32 = 25;

impl Rest {
    pub fn new(server_url: &reqwest::Url, token: Secret, http: reqwest::Client, timeout: Duration) -> Rest {
        Rest { base: server_url.clone(), token, http, timeout }
    }

    /// `{server_url}/api/v4/{path}` (a subpath install keeps its prefix).
    pub fn url(&self, path: &str) -> reqwest::Url {
        let mut url = self.base.clone();
        let prefix = url.path().trim_end_matches('/').to_owned();
        url.set_path(&format!("{prefix}/api/v4/{}", path.trim_start_matches('/')));
        url
    }

    async fn call(&self, method: reqwest::Method, path: &str, query: &[(&str, String)], body: Option<&serde_json::Value>) -> Result<reqwest::Response, RestError> {
        let mut req = self
            .http
            .request(method, self.url(path))
            .timeout(self.timeout)
            .bearer_auth(self.token.expose());
        if !query.is_empty() {
            req = req.query(query);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|e| RestError::Retryable { message: describe(&e), retry_after: None })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap_or_default();
        let message = app_error(status, &text);
        Err(match status.as_u16() {
            401 => RestError::Unauthorized(message),
            429 => RestError::Retryable {
                message,
                retry_after: headers
                    .get("retry-after")
                    .or_else(|| headers.get("x-ratelimit-reset"))
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_retry_after),
            },
            500..=599 if status.as_u16() != 501 => RestError::Retryable { message, retry_after: None },
            _ => RestError::Permanent(message),
        })
    }

    async fn json<T: serde::de::DeserializeOwned>(&self, path: &str, query: &[(&str, String)]) -> Result<T, RestError> {
        let resp = self.call(reqwest::Method::GET, path, query, None).await?;
        resp.json::<T>()
            .await
            .map_err(|e| RestError::Retryable { message: format!("Mattermost's answer to GET {path} is not what was expected: {e}"), retry_after: None })
    }

    pub async fn me(&self) -> Result<Me, RestError> {
        self.json("users/me", &[]).await
    }

    pub async fn my_teams(&self, user_id: &str) -> Result<Vec<TeamInfo>, RestError> {
        self.json(&format!("users/{user_id}/teams"), &[]).await
    }

    /// Every channel the bot is a member of, across teams (server ≥ 6.1).
    pub async fn my_channels(&self, user_id: &str) -> Result<Vec<ChannelInfo>, RestError> {
        self.json(&format!("users/{user_id}/channels"), &[]).await
    }

    /// Posts of a channel created after `after` (a post id), oldest first.
    pub async fn posts_after(&self, channel_id: &str, after: &str) -> Result<Vec<Post>, RestError> {
        let mut all = Vec::new();
        for page in 0..MAX_BACKFILL_PAGES {
            let list: PostList = self
                .json(
                    &format!("channels/{channel_id}/posts"),
                    &[("after", after.to_owned()), ("page", page.to_string()), ("per_page", "200".into())],
                )
                .await?;
            let n = list.order.len();
            all.extend(in_order(list));
            if n < 200 {
                break;
            }
        }
        all.sort_by_key(|p: &Post| p.create_at);
        all.dedup_by(|a, b| a.id == b.id);
        Ok(all)
    }

    /// Posts of a channel created or changed since `since_ms`, oldest first (only those
    /// created since then are kept: an edit of an older post is not a new message).
    pub async fn posts_since(&self, channel_id: &str, since_ms: i64) -> Result<Vec<Post>, RestError> {
        let list: PostList = self.json(&format!("channels/{channel_id}/posts"), &[("since", since_ms.to_string())]).await?;
        let mut posts: Vec<Post> = in_order(list).into_iter().filter(|p| p.create_at >= since_ms).collect();
        posts.sort_by_key(|p| p.create_at);
        Ok(posts)
    }

    /// `POST /api/v4/posts`; answers the new post's id.
    pub async fn create_post(&self, channel_id: &str, message: &str, root_id: &str) -> Result<String, RestError> {
        let body = serde_json::json!({"channel_id": channel_id, "message": message, "root_id": root_id});
        let resp = self.call(reqwest::Method::POST, "posts", &[], Some(&body)).await?;
        let post: Post = resp.json().await.map_err(|e| RestError::Retryable {
            message: format!("Mattermost's answer to POST /posts is not a post: {e}"),
            retry_after: None,
        })?;
        Ok(post.id)
    }

    /// `PUT /api/v4/posts/{id}/patch`: replaces the post's message (the author may edit its
    /// own posts; the post shows "(edited)").
    pub async fn patch_post(&self, post_id: &str, message: &str) -> Result<(), RestError> {
        let body = serde_json::json!({"message": message});
        self.call(reqwest::Method::PUT, &format!("posts/{post_id}/patch"), &[], Some(&body)).await.map(|_| ())
    }

    /// `DELETE /api/v4/posts/{id}`.
    pub async fn delete_post(&self, post_id: &str) -> Result<(), RestError> {
        self.call(reqwest::Method::DELETE, &format!("posts/{post_id}"), &[], None).await.map(|_| ())
    }

    /// `POST /api/v4/users/{id}/typing`.
    pub async fn typing(&self, user_id: &str, channel_id: &str, parent_id: &str) -> Result<(), RestError> {
        let body = serde_json::json!({"channel_id": channel_id, "parent_id": parent_id});
        self.call(reqwest::Method::POST, &format!("users/{user_id}/typing"), &[], Some(&body)).await.map(|_| ())
    }
}

fn in_order(mut list: PostList) -> Vec<Post> {
    list.order.iter().filter_map(|id| list.posts.remove(id)).collect()
}

/// Mattermost's error body: `{"id", "message", "detailed_error", "request_id", "status_code"}`.
pub fn app_error(status: reqwest::StatusCode, body: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(body) {
        Ok(v) if v.get("message").is_some() => format!(
            "Mattermost answered {status}: {} ({})",
            v["message"].as_str().unwrap_or_default(),
            v["id"].as_str().unwrap_or_default()
        ),
        _ => format!("Mattermost answered {status}: {}", body.chars().take(200).collect::<String>().trim()),
    }
}

/// A transport error in words, with its causes (the URL holds no secret here, but the
/// message stays short).
pub fn describe(e: &reqwest::Error) -> String {
    use std::error::Error;
    if e.is_timeout() {
        return "Mattermost did not answer in time".to_owned();
    }
    let mut parts = Vec::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        parts.push(s.to_string());
        cur = s.source();
    }
    let detail = if parts.is_empty() { e.to_string() } else { parts.join(": ") };
    if e.is_connect() {
        format!("cannot connect to Mattermost: {detail}")
    } else {
        format!("the request to Mattermost failed: {detail}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_keep_a_subpath() {
        let r = Rest::new(&reqwest::Url::parse("https://x.example/chat").unwrap(), Secret::new("t"), reqwest::Client::new(), Duration::from_secs(1));
        assert_eq!(r.url("users/me").as_str(), "https://x.example/chat/api/v4/users/me");
        let r = Rest::new(&reqwest::Url::parse("https://x.example/").unwrap(), Secret::new("t"), reqwest::Client::new(), Duration::from_secs(1));
        assert_eq!(r.url("posts").as_str(), "https://x.example/api/v4/posts");
    }

    #[test]
    fn app_errors_are_worded() {
        let m = app_error(
            reqwest::StatusCode::UNAUTHORIZED,
            r#"{"id":"api.context.session_expired.app_error","message":"Invalid or expired session, please login again.","detailed_error":"","status_code":401}"#,
        );
        assert!(m.contains("Invalid or expired session") && m.contains("session_expired"), "{m}");
    }
}
