//! The OpenAPI document and a readable page for it, both served without a token.

use crate::server::AppState;
use actix_web::{web, HttpResponse};

pub const DOCUMENT: &str = include_str!("openapi.json");

pub async fn document(state: web::Data<AppState>) -> HttpResponse {
    let mut doc: serde_json::Value = serde_json::from_str(DOCUMENT).expect("openapi.json is valid JSON (tested)");
    doc["servers"] = serde_json::json!([{ "url": state.public_url }]);
    HttpResponse::Ok().json(doc)
}

/// `/docs`: the API rendered from the document, with no framework and nothing fetched from
/// elsewhere.
pub async fn page() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(include_str!("docs.html"))
}
