//! The ceiling of scripts/bench: a bare actix-web 4 server with one POST handler that parses
//! the same small JSON body a loopback hook takes and answers the same JSON. Whatever
//! patchbay does on top of this (routing to the channel, dedupe, the group commit to SQLite,
//! the pipeline) is the difference between its figures and these.
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
        let server = HttpServer::new(|| App::new().route("/hooks/loopback/{hook_id}", web::post().to(hook)))
            .workers(args.workers)
            .listen(listener)?
            .run();
        println!("ceiling listening on http://{local}");
        server.await
    })
}
