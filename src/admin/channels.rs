//! `/api/v1/channels`.

use super::{json_body, require_admin, respond, ApiError};
use crate::registry::{ChannelEntry, NewChannel};
use crate::server::AppState;
use actix_web::{web, HttpRequest, HttpResponse};
use patchbay_channel_core::ChannelState;
use serde::Deserialize;
use serde_json::{json, Value};

/// A channel as the API shows it: secrets as `{"set": true}`, the state `disabled` when it is.
pub fn view(c: &ChannelEntry) -> Value {
    let mut settings = c.record.settings.as_object().cloned().unwrap_or_default();
    for name in &c.secrets_set {
        settings.insert(name.clone(), json!({"set": true}));
    }
    let mut status = serde_json::to_value(c.status.snapshot()).unwrap_or_default();
    if !c.record.enabled {
        status["state"] = serde_json::to_value(ChannelState::Disabled).unwrap_or_default();
    }
    if let Some(e) = &c.build_error {
        status["build_error"] = Value::String(e.clone());
    }
    json!({
        "id": c.record.id,
        "kind": c.record.kind,
        "assistant": c.record.assistant,
        "enabled": c.record.enabled,
        "source": c.record.source,
        "callback_url": c.callback_url,
        "settings": settings,
        "status": status,
        "created_at": c.record.created_at,
        "updated_at": c.record.updated_at,
    })
}

pub async fn list(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    respond((|| {
        require_admin(&req, &state)?;
        let snap = state.registry.snapshot();
        let channels: Vec<Value> = snap.channels.values().map(|c| view(c)).collect();
        Ok(HttpResponse::Ok().json(json!({ "channels": channels })))
    })())
}

pub async fn get(req: HttpRequest, path: web::Path<String>, state: web::Data<AppState>) -> HttpResponse {
    respond((|| {
        require_admin(&req, &state)?;
        Ok(HttpResponse::Ok().json(view(&*state.registry.channel(&path)?)))
    })())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateChannel {
    id: String,
    kind: String,
    assistant: String,
    /// Off until the admin has pasted the callback URL into the platform and enables it.
    #[serde(default)]
    enabled: bool,
    #[serde(default)]
    hook_id: Option<String>,
    #[serde(default)]
    settings: serde_json::Map<String, Value>,
}

pub async fn create(req: HttpRequest, body: web::Payload, state: web::Data<AppState>) -> HttpResponse {
    if let Err(e) = require_admin(&req, &state) {
        return respond(Err(e));
    }
    let c: CreateChannel = match json_body(body, &state).await {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    let result = state
        .registry
        .create_channel(NewChannel {
            id: c.id,
            kind: c.kind,
            assistant: c.assistant,
            enabled: c.enabled,
            hook_id: c.hook_id,
            settings: c.settings,
        })
        .await;
    respond(result.map(|e| HttpResponse::Created().json(view(&e))).map_err(ApiError::from))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchChannel {
    #[serde(default)]
    enabled: Option<bool>,
    #[serde(default)]
    assistant: Option<String>,
    #[serde(default)]
    settings: Option<serde_json::Map<String, Value>>,
}

pub async fn patch(req: HttpRequest, path: web::Path<String>, body: web::Payload, state: web::Data<AppState>) -> HttpResponse {
    if let Err(e) = require_admin(&req, &state) {
        return respond(Err(e));
    }
    let p: PatchChannel = match json_body(body, &state).await {
        Ok(p) => p,
        Err(resp) => return resp,
    };
    let result = state.registry.update_channel(&path, p.enabled, p.assistant, p.settings).await;
    if let Ok(e) = &result {
        tracing::info!(channel = %e.record.id, enabled = e.record.enabled, "channel changed through the admin API");
    }
    respond(result.map(|e| HttpResponse::Ok().json(view(&e))).map_err(ApiError::from))
}

pub async fn delete(req: HttpRequest, path: web::Path<String>, state: web::Data<AppState>) -> HttpResponse {
    if let Err(e) = require_admin(&req, &state) {
        return respond(Err(e));
    }
    respond(
        state
            .registry
            .delete_channel(&path)
            .await
            .map(|_| HttpResponse::NoContent().finish())
            .map_err(ApiError::from),
    )
}

pub async fn check(req: HttpRequest, path: web::Path<String>, state: web::Data<AppState>) -> HttpResponse {
    if let Err(e) = require_admin(&req, &state) {
        return respond(Err(e));
    }
    let entry = match state.registry.channel(&path) {
        Ok(e) => e,
        Err(e) => return respond(Err(e.into())),
    };
    let report = match &entry.instance {
        Some(i) => serde_json::to_value(i.check().await).unwrap_or_default(),
        None => json!({
            "ok": false,
            "steps": [{"name": "settings", "ok": false, "detail": entry.build_error.clone().unwrap_or_default()}],
            "unverifiable": [],
        }),
    };
    HttpResponse::Ok().json(json!({ "channel": entry.record.id, "report": report }))
}

pub async fn rotate_hook(req: HttpRequest, path: web::Path<String>, state: web::Data<AppState>) -> HttpResponse {
    if let Err(e) = require_admin(&req, &state) {
        return respond(Err(e));
    }
    respond(
        state
            .registry
            .rotate_hook(&path)
            .await
            .map(|e| HttpResponse::Ok().json(view(&e)))
            .map_err(ApiError::from),
    )
}
