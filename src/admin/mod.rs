//! The admin API under `/api/v1`: bearer admin token, JSON in and out, errors as
//! `{"error": {"code", "message", "field"?}}`. Secrets are write-only: shown as
//! `{"set": true}`, never returned.

mod assistants;
mod channels;
mod conversations;
mod dead_letters;
pub mod openapi;

use crate::registry::RegistryError;
use crate::server::AppState;
use actix_web::{http::StatusCode, web, HttpRequest, HttpResponse, ResponseError};
use patchbay_channel_core::channel::{error_response, read_body};
use serde::de::DeserializeOwned;
use std::fmt;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/api/v1")
            .route("/openapi.json", web::get().to(openapi::document))
            .route("/channels", web::get().to(channels::list))
            .route("/channels", web::post().to(channels::create))
            .route("/channels/{id}", web::get().to(channels::get))
            .route("/channels/{id}", web::patch().to(channels::patch))
            .route("/channels/{id}", web::delete().to(channels::delete))
            .route("/channels/{id}/check", web::post().to(channels::check))
            .route("/channels/{id}/rotate-hook", web::post().to(channels::rotate_hook))
            .route("/assistants", web::get().to(assistants::list))
            .route("/assistants", web::post().to(assistants::create))
            .route("/assistants/{id}", web::get().to(assistants::get))
            .route("/assistants/{id}", web::patch().to(assistants::patch))
            .route("/assistants/{id}", web::delete().to(assistants::delete))
            .route("/conversations/{id}/replies", web::post().to(conversations::push_replies))
            .route("/dead-letters", web::get().to(dead_letters::list))
            .route("/dead-letters/{id}/retry", web::post().to(dead_letters::retry))
            .route("/dead-letters/{id}", web::delete().to(dead_letters::delete))
            .default_service(web::to(|| async {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint; see /api/v1/openapi.json").error_response()
            })),
    );
}

/// An API error: status, a stable code, a message that says what to do, and the field.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    field: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }
    pub fn field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }
    pub fn bad_request(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid", message).field(field)
    }
    pub fn not_found(what: impl fmt::Display) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("{what} not found"))
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }
    fn error_response(&self) -> HttpResponse {
        let mut resp = error_response(self.status, self.code, &self.message, self.field.as_deref());
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                actix_web::http::header::WWW_AUTHENTICATE,
                actix_web::http::header::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::NotFound(what) => ApiError::not_found(what),
            RegistryError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m),
            RegistryError::Invalid { field, message } => ApiError::bad_request(field, message),
            RegistryError::Store(e) => {
                tracing::error!(error = %e, "store error in the admin API");
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", "the store is unavailable; try again")
            }
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        RegistryError::Store(e).into()
    }
}

fn bearer(req: &HttpRequest) -> Option<&str> {
    req.headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
}

/// Refuses the request unless it carries the admin token.
pub fn require_admin(req: &HttpRequest, state: &AppState) -> Result<(), ApiError> {
    match bearer(req) {
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send the admin token as `Authorization: Bearer <token>`",
        )
        .field("Authorization")),
        Some(t) if state.admin_token.matches(t) => Ok(()),
        Some(_) => Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "the admin token is wrong").field("Authorization")),
    }
}

/// Reads and parses a JSON body: 413 past the limit, 400 naming the field otherwise.
pub async fn json_body<T: DeserializeOwned>(body: web::Payload, state: &AppState) -> Result<T, HttpResponse> {
    let bytes = read_body(body, state.body_limit).await?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_json", format!("the body is not valid JSON: {e}")).error_response()
    })?;
    // serde would read a JSON array positionally into a struct; the API speaks objects only.
    if !value.is_object() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "bad_json", "the body must be a JSON object").error_response());
    }
    patchbay_channel_core::parse_settings::<T>(&value).map_err(|e| {
        let field = if e.field.is_empty() { None } else { Some(e.field) };
        let mut err = ApiError::new(StatusCode::BAD_REQUEST, "invalid", e.message);
        err.field = field;
        err.error_response()
    })
}

/// Turns a handler's result into a response.
pub fn respond(r: Result<HttpResponse, ApiError>) -> HttpResponse {
    r.unwrap_or_else(|e| e.error_response())
}
