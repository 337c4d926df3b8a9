//! The ceiling of scripts/bench: a bare actix-web 4 server with one POST handler that parses
//! the same small JSON body a loopback hook takes and answers the same JSON. Whatever
//! patchbay does on top of this (routing to the channel, dedupe, the group commit to SQLite,
//! the pipeline) is the difference between its figures and these.
//!
//! `POST /hooks/mattermost/{hook_id}` is the same for a Mattermost outgoing webhook: it parses
//! the twelve fields, compares the token, strips the trigger word and answers the inline reply
//! `{"text": "echo: …"}` at once — what patchbay's inline mode answers, with nothing behind it.
//!
//! `ceiling --bind 127.0.0.1:0 --workers 2` prints `ceiling listening on http://ADDR`.

use actix_web::{web, App, HttpResponse, HttpServer};
use clap::Parser;
use serde::Deserialize;

#[derive(Parser)]
struct Args {
    /// Where to listen (127.0.0.1 only; port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    bind: String,
    /// HTTP worker threads (patchbay's default is one per core: 2 on the bench machine).
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// The Mattermost outgoing webhook token the Mattermost route expects.
    #[arg(long, default_value = "rgfe9bc9j3gste59mbyrmzk33w")]
    token: String,
}

/// A Mattermost outgoing webhook (JSON encoding).
#[derive(Deserialize)]
#[allow(dead_code)]
struct Outgoing {
    #[serde(default)]
    token: String,
    #[serde(default)]
    team_id: String,
    #[serde(default)]
    team_domain: String,
    #[serde(default)]
    channel_id: String,
    #[serde(default)]
    channel_name: String,
    #[serde(default)]
    timestamp: Option<i64>,
    #[serde(default)]
    user_id: String,
    #[serde(default)]
    user_name: String,
    #[serde(default)]
    post_id: String,
    #[serde(default)]
    text: String,
    #[serde(default)]
    trigger_word: String,
    #[serde(default)]
    file_ids: String,
}

async fn mattermost(token: web::Data<String>, p: web::Json<Outgoing>) -> HttpResponse {
    let p = p.into_inner();
    if p.token != **token {
        return HttpResponse::Unauthorized().json(serde_json::json!({"error": {"code": "bad_token", "field": "token"}}));
    }
    if p.post_id.is_empty() || p.channel_id.is_empty() {
        return HttpResponse::BadRequest().json(serde_json::json!({"error": {"code": "invalid_payload"}}));
    }
    let text = p.text.trim_start().strip_prefix(p.trigger_word.as_str()).unwrap_or(&p.text).trim();
    HttpResponse::Ok().json(serde_json::json!({"text": format!("echo: {text}")}))
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct Message {
    id: String,
    conversation: String,
    text: String,
}

async fn hook(msg: web::Json<Message>) -> HttpResponse {
    let msg = msg.into_inner();
    if msg.id.is_empty() {
        return HttpResponse::BadRequest().json(serde_json::json!({"error": {"code": "invalid_message", "field": "id"}}));
    }
    HttpResponse::Ok().json(serde_json::json!({"accepted": true, "duplicate": false}))
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let addr: std::net::SocketAddr = args
        .bind
        .parse()
        .map_err(|e| std::io::Error::other(format!("--bind {}: {e}", args.bind)))?;
    if !addr.ip().is_loopback() {
        return Err(std::io::Error::other("--bind must be a loopback address"));
    }
    let listener = std::net::TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    actix_web::rt::System::new().block_on(async move {
        let token = web::Data::new(args.token.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(token.clone())
                .route("/hooks/loopback/{hook_id}", web::post().to(hook))
                .route("/hooks/mattermost/{hook_id}", web::post().to(mattermost))
        })
            .workers(args.workers)
            .listen(listener)?
            .run();
        println!("ceiling listening on http://{local}");
        server.await
    })
}
