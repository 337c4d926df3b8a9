//! The Events API Request URL: `POST {callback_url}`.
//!
//! Order of business, so that nothing about an unauthenticated request costs more than
//! reading a bounded body: `ssl_check` (Slack's probe, answered empty) → the `v0` signature
//! over the raw bytes (401, nothing else) → parse → `url_verification` (answered even while
//! the channel is disabled, so the Request URL can be set up first) → `event_callback`:
//! into the inbox, then 200. Retries are answered like first deliveries: the inbox dedupes.

use crate::events::{decide, Decision, Rules};
use crate::signature::{self, Refused};
use crate::Slack;
use actix_web::{http::StatusCode, web, HttpRequest, HttpResponse};
use patchbay_channel_core::{
    channel::{error_response, read_body},
    HookCtx,
};

fn header<'a>(req: &'a HttpRequest, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

fn now_secs() -> i64 {
    patchbay_channel_core::now_ms() / 1000
}

/// `ssl_check=1` in a form body: Slack checking the certificate. Nothing else in such a body
/// is looked at (it is not signed).
fn is_ssl_check(req: &HttpRequest, body: &[u8]) -> bool {
    let form = header(req, "content-type").is_some_and(|c| c.to_ascii_lowercase().starts_with("application/x-www-form-urlencoded"));
    form && serde_urlencoded::from_bytes::<Vec<(String, String)>>(body)
        .is_ok_and(|fields| fields.iter().any(|(k, v)| k == "ssl_check" && v == "1"))
}

pub async fn events(slack: &Slack, ctx: HookCtx, req: HttpRequest, body: web::Payload) -> HttpResponse {
    let Some(secret) = &slack.settings.signing_secret else {
        return error_response(
            StatusCode::NOT_FOUND,
            "no_events_api",
            "this Slack channel uses Socket Mode and has no signing_secret, so it does not take Events API requests; \
             set signing_secret to serve both",
            None,
        );
    };
    let bytes = match read_body(body, ctx.body_limit).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    if is_ssl_check(&req, &bytes) {
        return HttpResponse::Ok().finish();
    }
    let checked = signature::verify(
        secret,
        header(&req, "x-slack-request-timestamp"),
        header(&req, "x-slack-signature"),
        &bytes,
        now_secs(),
    );
    if let Err(why) = checked {
        tracing::warn!(channel = %ctx.channel_id, reason = why.message(), "refused an Events API request");
        let field = match why {
            Refused::MissingTimestamp | Refused::BadTimestamp | Refused::Stale => "X-Slack-Request-Timestamp",
            Refused::MissingSignature | Refused::Mismatch => "X-Slack-Signature",
        };
        return error_response(StatusCode::UNAUTHORIZED, "invalid_signature", why.message(), Some(field));
    }
    let Ok(payload) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return error_response(StatusCode::BAD_REQUEST, "invalid_payload", "the body is not JSON", Some("body"));
    };
    let retry_num = header(&req, "x-slack-retry-num");
    let retry_reason = header(&req, "x-slack-retry-reason");
    match payload.get("type").and_then(|t| t.as_str()).unwrap_or("") {
        "url_verification" => {
            let challenge = payload.get("challenge").and_then(|c| c.as_str()).unwrap_or("");
            tracing::info!(channel = %ctx.channel_id, "answered Slack's url_verification");
            HttpResponse::Ok().json(serde_json::json!({ "challenge": challenge }))
        }
        "app_rate_limited" => {
            tracing::warn!(
                channel = %ctx.channel_id,
                team = payload.get("team_id").and_then(|t| t.as_str()).unwrap_or(""),
                minute = payload.get("minute_rate_limited").and_then(|m| m.as_i64()).unwrap_or(0),
                "Slack is dropping this app's events: more than 30,000 in an hour for this workspace"
            );
            ctx.status.error("Slack reported app_rate_limited: events of this workspace are being dropped for the rest of the minute");
            HttpResponse::Ok().finish()
        }
        "event_callback" => {
            if retry_num.is_some() {
                tracing::debug!(channel = %ctx.channel_id, retry = retry_num, reason = retry_reason, "a retried delivery");
            }
            on_callback(slack, &ctx, payload).await
        }
        other => {
            tracing::debug!(channel = %ctx.channel_id, kind = other, "ignored an Events API request of another type");
            HttpResponse::Ok().finish()
        }
    }
}

async fn on_callback(slack: &Slack, ctx: &HookCtx, payload: serde_json::Value) -> HttpResponse {
    let rules = Rules { respond_to: slack.settings.respond_to, team_id: slack.settings.team_id.as_deref() };
    let team = crate::events::team_of(&payload).to_owned();
    let identity = slack.identity(&team);
    match decide(&payload, &rules, identity.as_ref()) {
        Decision::Uninstalled { team_id } => {
            // Tokens are forgotten whether or not the channel is enabled: they are dead anyway.
            slack.forget_workspace(&team_id, "app_uninstalled").await;
            HttpResponse::Ok().finish()
        }
        Decision::TokensRevoked { team_id, bot_users } => {
            slack.tokens_revoked(&team_id, &bot_users).await;
            HttpResponse::Ok().finish()
        }
        // Disabled: acknowledged (Slack neither retries nor disables the app), not answered.
        _ if !ctx.enabled => HttpResponse::Ok().finish(),
        Decision::Ignore(why) => {
            tracing::debug!(channel = %ctx.channel_id, why, "event not answered");
            HttpResponse::Ok().finish()
        }
        Decision::Answer(inbound) => {
            ctx.status.event_seen();
            match ctx.inbox.accept(&ctx.channel_id, *inbound).await {
                Ok(_) => HttpResponse::Ok().finish(),
                // Not stored: Slack must retry, so no 2xx.
                Err(e) => error_response(StatusCode::SERVICE_UNAVAILABLE, "inbox_unavailable", &e.to_string(), None),
            }
        }
    }
}
