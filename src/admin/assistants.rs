//! `/api/v1/assistants`.

use super::{json_body, require_admin, respond, ApiError};
use crate::registry::{AssistantEntry, NewAssistant};
use crate::server::AppState;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};

pub fn view(a: &AssistantEntry) -> Value {
    let mut settings = a.record.settings.as_object().cloned().unwrap_or_default();
    for name in &a.secrets_set {
        settings.insert(name.clone(), json!({"set": true}));
    }
    json!({
        "id": a.record.id,
        "backend": a.record.backend,
        "source": a.record.source,
        "settings": settings,
        "error": a.build_error,
        "created_at": a.record.created_at,
        "updated_at": a.record.updated_at,
    })
}

pub async fn list(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    respond((|| {
        require_admin(&req, &state)?;
        let snap = state.registry.snapshot();
        let list: Vec<Value> = snap.assistants.values().map(|a| view(a)).collect();
        Ok(HttpResponse::Ok().json(json!({ "assistants": list })))
    })())
}

pub async fn get(req: HttpRequest, path: web::Path<String>, state: web::Data<AppState>) -> HttpResponse {
    respond((|| {
        require_admin(&req, &state)?;
        Ok(HttpResponse::Ok().json(view(&*state.registry.assistant(&path)?)))
    })())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateAssistant {
    id: String,
    backend: String,
    #[serde(default)]
    settings: serde_json::Map<String, Value>,
}

pub async fn create(req: HttpRequest, body: web::Payload, state: web::Data<AppState>) -> HttpResponse {
    if let Err(e) = require_admin(&req, &state) {
        return respond(Err(e));
    }
    let a: CreateAssistant = match json_body(body, &state).await {
        Ok(a) => a,
        Err(resp) => return resp,
    };
    let result = state
        .registry
        .create_assistant(NewAssistant {
            id: a.id,
            backend: a.backend,
            settings: a.settings,
        })
        .await;
    respond(
        result
            .map(|(entry, key)| {
                let mut body = view(&entry);
                if let Some(k) = key {
                    // The only time the generated key is ever shown.
                    body["api_key"] = Value::String(k.expose().to_owned());
                }
                HttpResponse::Created().json(body)
            })
            .map_err(ApiError::from),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchAssistant {
    settings: serde_json::Map<String, Value>,
}

pub async fn patch(req: HttpRequest, path: web::Path<String>, body: web::Payload, state: web::Data<AppState>) -> HttpResponse {
    if let Err(e) = require_admin(&req, &state) {
        return respond(Err(e));
    }
    let p: PatchAssistant = match json_body(body, &state).await {
        Ok(p) => p,
        Err(resp) => return resp,
    };
    respond(
        state
            .registry
            .update_assistant(&path, p.settings)
            .await
            .map(|e| HttpResponse::Ok().json(view(&e)))
            .map_err(ApiError::from),
    )
}

pub async fn delete(req: HttpRequest, path: web::Path<String>, state: web::Data<AppState>) -> HttpResponse {
    if let Err(e) = require_admin(&req, &state) {
        return respond(Err(e));
    }
    respond(
        state
            .registry
            .delete_assistant(&path)
            .await
            .map(|_| HttpResponse::NoContent().finish())
            .map_err(ApiError::from),
    )
}
