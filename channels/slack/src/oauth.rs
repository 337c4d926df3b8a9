//! The OAuth v2 install ("Add to Slack") and the per-workspace bot tokens it brings.
//!
//! - `GET {callback_url}/install`: a fresh random `state`, remembered for 10 minutes in the
//!   channel's sealed key/value space and set as a `Secure; HttpOnly` cookie scoped to the
//!   callback URL; redirect to Slack's authorize page (derived from `api_url`:
//!   `https://slack.com/api` → `https://slack.com/oauth/v2/authorize`).
//! - `GET {callback_url}/oauth/callback?code&state`: the `state` must equal the cookie (the
//!   same browser started the install) and be taken from the store (single use, unexpired);
//!   then `oauth.v2.access` with HTTP Basic client authentication, `auth.test` for the bot
//!   id, and the workspace's record — bot token, refresh token, expiry — sealed in the store
//!   under `workspace:{team_id}`.
//! - Replies to a workspace use its token; a rotating token (`xoxe.xoxb-`, `expires_in`) is
//!   refreshed with `grant_type=refresh_token` a minute before it expires.
//! - `app_uninstalled` / `tokens_revoked` remove the workspace's record.

use crate::api::ApiError;
use crate::events::Identity;
use crate::settings::OAuthApp;
use crate::Slack;
use actix_web::{http::StatusCode, HttpRequest, HttpResponse};
use patchbay_channel_core::{ct_eq, HookCtx, Secret};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How long an install may take from `/install` to the callback.
const STATE_TTL: Duration = Duration::from_secs(600);
/// A rotating token is refreshed this long before it expires.
const REFRESH_MARGIN_MS: i64 = 60_000;
const COOKIE: &str = "patchbay_slack_oauth_state";
/// How long "this workspace has no install" is believed without asking the store again.
const NOT_INSTALLED_TTL: Duration = Duration::from_secs(10);

/// One installed workspace, as sealed in the store.
#[derive(Clone, Serialize, Deserialize)]
pub struct Workspace {
    pub team_id: String,
    #[serde(default)]
    pub team_name: String,
    pub bot_token: String,
    #[serde(default)]
    pub bot_user_id: String,
    #[serde(default)]
    pub bot_id: Option<String>,
    #[serde(default)]
    pub refresh_token: Option<String>,
    /// Unix ms; `None` for a token that does not expire.
    #[serde(default)]
    pub expires_at: Option<i64>,
    #[serde(default)]
    pub scope: String,
    #[serde(default)]
    pub enterprise_id: Option<String>,
    pub installed_at: i64,
}

impl std::fmt::Debug for Workspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workspace").field("team_id", &self.team_id).field("expires_at", &self.expires_at).finish_non_exhaustive()
    }
}

pub fn workspace_key(team: &str) -> String {
    format!("workspace:{team}")
}

fn state_key(state: &str) -> String {
    format!("oauth_state:{state}")
}

/// Slack's authorize page for an `api_url`.
pub fn authorize_url(api_url: &str) -> String {
    let base = api_url.strip_suffix("/api").unwrap_or(api_url);
    format!("{base}/oauth/v2/authorize")
}

fn page(status: StatusCode, title: &str, text: &str) -> HttpResponse {
    let esc = |s: &str| s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    HttpResponse::build(status)
        .content_type("text/html; charset=utf-8")
        .insert_header(("Cache-Control", "no-store"))
        .body(format!(
            "<!doctype html><meta charset=utf-8><title>{t}</title><h1>{t}</h1><p>{x}</p>",
            t = esc(title),
            x = esc(text)
        ))
}

fn cookie_path(slack: &Slack) -> String {
    reqwest::Url::parse(&slack.callback_url).map(|u| u.path().to_owned()).unwrap_or_else(|_| "/".into())
}

fn clear_cookie(slack: &Slack) -> String {
    format!("{COOKIE}=; Path={}; Max-Age=0; Secure; HttpOnly; SameSite=Lax", cookie_path(slack))
}

pub async fn install(slack: &Slack, ctx: &HookCtx) -> HttpResponse {
    let Some(app) = &slack.settings.oauth else { return not_configured() };
    let state = patchbay_channel_core::ids::random_token(32);
    let expires = patchbay_channel_core::now_ms() + STATE_TTL.as_millis() as i64;
    if let Err(e) = slack.kv.put(&ctx.channel_id, &state_key(&state), &Secret::new("1"), Some(expires)).await {
        return page(StatusCode::SERVICE_UNAVAILABLE, "Try again", &e.to_string());
    }
    let query = serde_urlencoded::to_string([
        ("client_id", app.client_id.as_str()),
        ("scope", &app.scopes.join(",")),
        ("redirect_uri", &redirect_uri(slack)),
        ("state", &state),
    ])
    .unwrap_or_default();
    let cookie = format!("{COOKIE}={state}; Path={}; Max-Age={}; Secure; HttpOnly; SameSite=Lax", cookie_path(slack), STATE_TTL.as_secs());
    HttpResponse::Found()
        .insert_header(("Location", format!("{}?{query}", authorize_url(&slack.settings.api_url))))
        .insert_header(("Set-Cookie", cookie))
        .insert_header(("Cache-Control", "no-store"))
        .finish()
}

fn not_configured() -> HttpResponse {
    page(
        StatusCode::NOT_FOUND,
        "No OAuth install",
        "This Slack channel has no client_id and client_secret, so it cannot be installed from here: set them (Basic Information → App Credentials) or paste a bot_token.",
    )
}

pub fn redirect_uri(slack: &Slack) -> String {
    format!("{}/oauth/callback", slack.callback_url)
}

pub async fn callback(slack: &Slack, ctx: &HookCtx, req: &HttpRequest) -> HttpResponse {
    let Some(app) = &slack.settings.oauth else { return not_configured() };
    let q: Vec<(String, String)> = serde_urlencoded::from_str(req.query_string()).unwrap_or_default();
    let get = |k: &str| q.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()).unwrap_or_default();
    let clear = clear_cookie(slack);
    let fail = |status: StatusCode, title: &str, text: &str| {
        let mut r = page(status, title, text);
        if let Ok(v) = actix_web::http::header::HeaderValue::from_str(&clear) {
            r.headers_mut().insert(actix_web::http::header::SET_COOKIE, v);
        }
        r
    };
    if !get("error").is_empty() {
        return fail(StatusCode::BAD_REQUEST, "Not installed", &format!("Slack says: {}", get("error")));
    }
    let state = get("state");
    let cookie = cookie_value(req, COOKIE).unwrap_or_default();
    if state.is_empty() || cookie.is_empty() || !ct_eq(state.as_bytes(), cookie.as_bytes()) {
        tracing::warn!(channel = %ctx.channel_id, "refused an OAuth callback whose state is not this browser's");
        return fail(StatusCode::FORBIDDEN, "Not installed", "The state parameter is not for this browser session: start again from the install link.");
    }
    match slack.kv.delete(&ctx.channel_id, &state_key(&state)).await {
        Ok(true) => {}
        Ok(false) => {
            return fail(StatusCode::FORBIDDEN, "Not installed", "This install link expired or was already used: start again from the install link.")
        }
        Err(e) => return fail(StatusCode::SERVICE_UNAVAILABLE, "Try again", &e.to_string()),
    }
    let code = get("code");
    if code.is_empty() {
        return fail(StatusCode::BAD_REQUEST, "Not installed", "Slack's answer has no code: start again from the install link.");
    }
    let redirect = redirect_uri(slack);
    let v = match slack.api.call_basic("oauth.v2.access", &app.client_id, &app.client_secret, &[("code", &code), ("redirect_uri", &redirect)]).await {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(channel = %ctx.channel_id, error = e.message(), "oauth.v2.access failed");
            return fail(StatusCode::BAD_GATEWAY, "Not installed", &oauth_error(&e));
        }
    };
    let ws = match workspace_from(&v, None) {
        Some(ws) => ws,
        None => return fail(StatusCode::BAD_GATEWAY, "Not installed", "Slack's answer to oauth.v2.access has no bot token: add bot scopes to the app."),
    };
    let ws = slack.complete_install(ws).await;
    match slack.save_workspace(&ws).await {
        Ok(()) => {
            tracing::info!(channel = %ctx.channel_id, team = %ws.team_id, "installed in a Slack workspace");
            let mut r = page(StatusCode::OK, "Installed", &format!("The app is installed in {} ({}). You can close this page.", ws.team_name, ws.team_id));
            if let Ok(v) = actix_web::http::header::HeaderValue::from_str(&clear) {
                r.headers_mut().insert(actix_web::http::header::SET_COOKIE, v);
            }
            r
        }
        Err(e) => fail(StatusCode::SERVICE_UNAVAILABLE, "Not installed", &format!("the token could not be stored: {e}")),
    }
}

/// A cookie's value from the `Cookie` headers.
fn cookie_value(req: &HttpRequest, name: &str) -> Option<String> {
    req.headers()
        .get_all(actix_web::http::header::COOKIE)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

fn oauth_error(e: &ApiError) -> String {
    let hint = match e.code() {
        "bad_client_secret" | "invalid_client_id" => ": check client_id and client_secret (Basic Information → App Credentials)",
        "bad_redirect_uri" => ": add the channel's callback URL + /oauth/callback under OAuth & Permissions → Redirect URLs",
        "invalid_code" => ": the code expired or was used; start again from the install link",
        _ => "",
    };
    format!("{}{hint}", e.message())
}

/// A workspace record from an `oauth.v2.access` answer (install or refresh).
pub fn workspace_from(v: &serde_json::Value, previous: Option<&Workspace>) -> Option<Workspace> {
    let s = |p: &str| v.pointer(p).and_then(|x| x.as_str()).map(str::to_owned);
    let token = s("/access_token")?;
    let now = patchbay_channel_core::now_ms();
    Some(Workspace {
        team_id: s("/team/id").or_else(|| previous.map(|p| p.team_id.clone()))?,
        team_name: s("/team/name").or_else(|| previous.map(|p| p.team_name.clone())).unwrap_or_default(),
        bot_token: token,
        bot_user_id: s("/bot_user_id").or_else(|| previous.map(|p| p.bot_user_id.clone())).unwrap_or_default(),
        bot_id: previous.and_then(|p| p.bot_id.clone()),
        refresh_token: s("/refresh_token").or_else(|| previous.and_then(|p| p.refresh_token.clone())),
        expires_at: v.get("expires_in").and_then(|e| e.as_i64()).map(|e| now + e * 1000),
        scope: s("/scope").unwrap_or_default(),
        enterprise_id: s("/enterprise/id"),
        installed_at: previous.map(|p| p.installed_at).unwrap_or(now),
    })
}

impl Slack {
    /// After the exchange: `auth.test` for the bot id (not in the OAuth answer), and the
    /// workspace's identity learnt.
    async fn complete_install(&self, mut ws: Workspace) -> Workspace {
        if let Ok(a) = self.api.auth_test(&Secret::new(ws.bot_token.clone())).await {
            ws.bot_id = a.bot_id;
            if ws.bot_user_id.is_empty() {
                ws.bot_user_id = a.user_id;
            }
        }
        self.learn_workspace(&ws);
        ws
    }

    fn learn_workspace(&self, ws: &Workspace) {
        self.learn_identity(Identity {
            team_id: ws.team_id.clone(),
            team: ws.team_name.clone(),
            user_id: ws.bot_user_id.clone(),
            user: String::new(),
            bot_id: ws.bot_id.clone(),
        });
        self.workspaces.lock().unwrap().insert(ws.team_id.clone(), ws.clone());
    }

    pub async fn save_workspace(&self, ws: &Workspace) -> Result<(), patchbay_channel_core::KvError> {
        let json = serde_json::to_string(ws).unwrap_or_default();
        self.kv.put(&self.channel_id, &workspace_key(&ws.team_id), &Secret::new(json), None).await?;
        self.workspaces.lock().unwrap().insert(ws.team_id.clone(), ws.clone());
        self.not_installed.lock().unwrap().remove(&ws.team_id);
        Ok(())
    }

    /// The installed workspace `team`, from memory or the store.
    pub async fn workspace(&self, team: &str) -> Option<Workspace> {
        if team.is_empty() {
            return None;
        }
        if let Some(ws) = self.workspaces.lock().unwrap().get(team).cloned() {
            return Some(ws);
        }
        // Most sends go to workspaces without an install (the configured bot_token's): ask
        // the store about one at most every 10 s, not on every message. An install on this
        // replica is seen at once; one on another replica within those 10 s.
        if self.not_installed.lock().unwrap().get(team).is_some_and(|at| at.elapsed() < NOT_INSTALLED_TTL) {
            return None;
        }
        let found = self.kv.get(&self.channel_id, &workspace_key(team)).await.ok().flatten();
        let Some(ws) = found.and_then(|v| serde_json::from_str::<Workspace>(v.expose()).ok()) else {
            let mut absent = self.not_installed.lock().unwrap();
            if absent.len() > 10_000 {
                absent.clear();
            }
            absent.insert(team.to_owned(), std::time::Instant::now());
            return None;
        };
        self.learn_workspace(&ws);
        Some(ws)
    }

    /// Every installed workspace (for `check` and the connector's start).
    pub async fn workspaces(&self) -> Vec<Workspace> {
        let keys = self.kv.keys(&self.channel_id, "workspace:").await.unwrap_or_default();
        let mut out = Vec::new();
        for k in keys {
            if let Some(ws) = self.workspace(k.trim_start_matches("workspace:")).await {
                out.push(ws);
            }
        }
        out
    }

    /// The workspace's token, refreshed first when it is about to expire. One refresh at a
    /// time per channel: a refresh token is single use.
    pub async fn installed_token(&self, team: &str) -> Option<Result<Secret, ApiError>> {
        let ws = self.workspace(team).await?;
        let due = ws.expires_at.is_some_and(|e| e - patchbay_channel_core::now_ms() < REFRESH_MARGIN_MS);
        if !due {
            return Some(Ok(Secret::new(ws.bot_token)));
        }
        let (Some(app), Some(_)) = (&self.settings.oauth, &ws.refresh_token) else {
            return Some(Ok(Secret::new(ws.bot_token)));
        };
        let _one = self.refreshing.lock().await;
        // Another caller may have refreshed while this one waited.
        let ws = self.workspace(team).await?;
        if ws.expires_at.is_some_and(|e| e - patchbay_channel_core::now_ms() >= REFRESH_MARGIN_MS) {
            return Some(Ok(Secret::new(ws.bot_token)));
        }
        Some(self.refresh(app, ws).await)
    }

    async fn refresh(&self, app: &OAuthApp, ws: Workspace) -> Result<Secret, ApiError> {
        let rt = ws.refresh_token.clone().unwrap_or_default();
        let v = self
            .api
            .call_basic("oauth.v2.access", &app.client_id, &app.client_secret, &[("grant_type", "refresh_token"), ("refresh_token", &rt)])
            .await?;
        let new = workspace_from(&v, Some(&ws)).ok_or_else(|| ApiError::Retryable {
            code: "bad_response".into(),
            message: "Slack's answer to the token refresh has no access_token".into(),
            retry_after: None,
        })?;
        self.save_workspace(&new).await.map_err(|e| ApiError::Retryable { code: "store".into(), message: e.to_string(), retry_after: None })?;
        tracing::info!(channel = %self.channel_id, team = %new.team_id, "refreshed a rotating Slack token");
        Ok(Secret::new(new.bot_token))
    }

    /// Forgets an installed workspace's record.
    pub async fn remove_workspace(&self, team: &str) {
        self.workspaces.lock().unwrap().remove(team);
        if let Err(e) = self.kv.delete(&self.channel_id, &workspace_key(team)).await {
            tracing::warn!(channel = %self.channel_id, team, error = %e, "could not remove the workspace's tokens");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorize_page_follows_api_url() {
        assert_eq!(authorize_url("https://slack.com/api"), "https://slack.com/oauth/v2/authorize");
        assert_eq!(authorize_url("https://slack-gov.com/api"), "https://slack-gov.com/oauth/v2/authorize");
    }

    #[test]
    fn records_keep_what_a_refresh_does_not_repeat() {
        let install = serde_json::json!({"ok": true, "access_token": "xoxe.xoxb-1", "refresh_token": "xoxe-1-r", "expires_in": 43200,
            "bot_user_id": "U1", "team": {"id": "T1", "name": "Acme"}, "scope": "chat:write"});
        let ws = workspace_from(&install, None).unwrap();
        assert_eq!(ws.team_id, "T1");
        assert!(ws.expires_at.unwrap() > patchbay_channel_core::now_ms());
        let refresh = serde_json::json!({"ok": true, "access_token": "xoxe.xoxb-2", "refresh_token": "xoxe-1-r2", "expires_in": 43200});
        let again = workspace_from(&refresh, Some(&ws)).unwrap();
        assert_eq!((again.team_id.as_str(), again.bot_user_id.as_str(), again.bot_token.as_str()), ("T1", "U1", "xoxe.xoxb-2"));
        assert!(!format!("{again:?}").contains("xoxe"), "Debug shows no token");
    }
}
