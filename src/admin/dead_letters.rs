//! `/api/v1/dead-letters`: what was given up on, with the reason; retry or discard.

use super::{require_admin, respond, ApiError};
use crate::server::AppState;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    channel: Option<String>,
    limit: Option<usize>,
}

pub async fn list(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    if let Err(e) = require_admin(&req, &state) {
        return respond(Err(e));
    }
    let q = match web::Query::<ListQuery>::from_query(req.query_string()) {
        Ok(q) => q.into_inner(),
        Err(e) => return respond(Err(ApiError::bad_request("query", format!("{e}; use ?channel=<id>&limit=<1..1000>")))),
    };
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return respond(Err(ApiError::bad_request("limit", "must be between 1 and 1000")));
    }
    match state.store.dead_letters(q.channel, limit).await {
        Ok(rows) => {
            let items: Vec<serde_json::Value> = rows
                .iter()
                .map(|d| {
                    let mut v = serde_json::to_value(d).unwrap_or_default();
                    // What it was: the inbound's text or the reply's text, for the admin to judge.
                    let payload: serde_json::Value = serde_json::from_str(&d.payload).unwrap_or_default();
                    v["text"] = payload.get("text").or_else(|| payload.pointer("/reply/text")).cloned().unwrap_or_default();
                    v
                })
                .collect();
            HttpResponse::Ok().json(serde_json::json!({ "dead_letters": items }))
        }
        Err(e) => respond(Err(e.into())),
    }
}

fn parse_id(s: &str) -> Result<i64, ApiError> {
    s.parse().map_err(|_| ApiError::bad_request("id", "a dead letter id is a number"))
}

pub async fn retry(req: HttpRequest, path: web::Path<String>, state: web::Data<AppState>) -> HttpResponse {
    if let Err(e) = require_admin(&req, &state) {
        return respond(Err(e));
    }
    let id = match parse_id(&path) {
        Ok(i) => i,
        Err(e) => return respond(Err(e)),
    };
    match state.store.dead_letter_retry(id).await {
        Ok(true) => {
            state.pipeline.inbox_wake.notify_one();
            state.pipeline.outbox_wake.notify_one();
            HttpResponse::Accepted().json(serde_json::json!({ "requeued": id }))
        }
        Ok(false) => respond(Err(ApiError::not_found(format!("dead letter {id}")))),
        Err(e) => respond(Err(e.into())),
    }
}

pub async fn delete(req: HttpRequest, path: web::Path<String>, state: web::Data<AppState>) -> HttpResponse {
    if let Err(e) = require_admin(&req, &state) {
        return respond(Err(e));
    }
    let id = match parse_id(&path) {
        Ok(i) => i,
        Err(e) => return respond(Err(e)),
    };
    match state.store.dead_letter_delete(id).await {
        Ok(true) => HttpResponse::NoContent().finish(),
        Ok(false) => respond(Err(ApiError::not_found(format!("dead letter {id}")))),
        Err(e) => respond(Err(e.into())),
    }
}
