//! `/hooks/{kind}/{hook_id}[/…]`: finds the channel by its hook id and hands the request to
//! its kind. Unknown hooks get 404 without a hint of which part was wrong.

use crate::server::AppState;
use actix_web::{http::StatusCode, web, HttpRequest, HttpResponse};
use patchbay_channel_core::{channel::error_response, ChannelId, HookCtx};
use std::sync::atomic::Ordering;

pub async fn handle(req: HttpRequest, body: web::Payload, state: web::Data<AppState>) -> HttpResponse {
    let kind = req.match_info().get("kind").unwrap_or_default().to_owned();
    let hook = req.match_info().get("hook_id").unwrap_or_default().to_owned();
    let tail = req.match_info().get("tail").unwrap_or_default();
    let subpath = if tail.is_empty() { String::new() } else { format!("/{tail}") };
    let snap = state.registry.snapshot();
    let Some(entry) = snap.by_hook.get(&(kind, hook)).cloned() else {
        return error_response(StatusCode::NOT_FOUND, "unknown_hook", "no channel has this callback URL", None);
    };
    drop(snap);
    let Some(instance) = entry.instance.clone() else {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "channel_unavailable",
            "the channel's settings cannot be loaded; an admin must fix them",
            None,
        );
    };
    let ctx = HookCtx {
        channel_id: ChannelId::from_trusted(entry.record.id.clone()),
        enabled: entry.record.enabled,
        inbox: state.inbox.clone(),
        status: entry.status.clone(),
        body_limit: state.body_limit,
        subpath,
    };
    if !entry.record.enabled {
        state
            .metrics
            .channel(&entry.record.id)
            .dropped_disabled
            .fetch_add(1, Ordering::Relaxed);
    }
    instance.handle_hook(ctx, req, body).await
}
