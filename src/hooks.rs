//! `/hooks/{kind}/{hook_id}[/…]`: finds the channel by its hook id and hands the request to
//! its kind. Unknown hooks get 404 without a hint of which part was wrong.

use crate::server::AppState;
use actix_web::{http::StatusCode, web, HttpRequest, HttpResponse};
use patchbay_channel_core::{channel::error_response, ChannelId, HookCtx};
use std::sync::atomic::Ordering;

/// Splits what follows `/hooks` into the kind, the hook id and the rest (`""` or `/…`); `None`
/// unless both are there and not empty.
fn split_hook_path(rest: &str) -> Option<(&str, &str, &str)> {
    let rest = rest.strip_prefix('/')?;
    let (kind, rest) = rest.split_once('/')?;
    let (hook, tail) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    // `/hooks/k/h/` is `/hooks/k/h`, as it was when the routes were patterns.
    let tail = if tail == "/" { "" } else { tail };
    (!kind.is_empty() && !hook.is_empty()).then_some((kind, hook, tail))
}

pub async fn handle(req: HttpRequest, body: web::Payload, state: web::Data<AppState>) -> HttpResponse {
    let path = req.path();
    let found = path.strip_prefix("/hooks").and_then(split_hook_path).and_then(|(kind, hook, tail)| {
        let snap = state.registry.snapshot();
        let entry = snap.by_hook.get(&(kind.to_owned(), hook.to_owned())).cloned();
        entry.map(|e| (e, tail.to_owned()))
    });
    let Some((entry, subpath)) = found else {
        return error_response(StatusCode::NOT_FOUND, "unknown_hook", "no channel has this callback URL", None);
    };
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

#[cfg(test)]
mod tests {
    use super::split_hook_path;

    #[test]
    fn a_hook_path_splits_into_kind_hook_and_the_rest() {
        assert_eq!(split_hook_path("/slack/abc"), Some(("slack", "abc", "")));
        assert_eq!(split_hook_path("/slack/abc/"), Some(("slack", "abc", "")));
        assert_eq!(split_hook_path("/webchat/abc/api/messages"), Some(("webchat", "abc", "/api/messages")));
        assert_eq!(split_hook_path("/slack/abc/oauth/callback/"), Some(("slack", "abc", "/oauth/callback/")));
        for no in ["", "/", "/slack", "/slack/", "//abc", "slack/abc"] {
            assert_eq!(split_hook_path(no), None, "{no:?}");
        }
    }
}
