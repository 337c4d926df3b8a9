//! The WebSocket ceiling of scripts/bench-webchat: a bare actix-web 4 + actix-ws server (the
//! same stack as patchbay's web chat socket) answering Botkit-style frames from memory:
//! `hello` → `{"type":"hello","token":…}`, `message` → `{"type":"message","text":"echo: …"}`.
//! No store, no pipeline, no hub: what is left of patchbay's figures is the rest.
//!
//! `wsceiling --bind 127.0.0.1:0 --workers 2` prints `wsceiling listening on http://ADDR`;
//! the socket is at `ws://ADDR/ws`.

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use actix_ws::AggregatedMessage;
use clap::Parser;
use serde_json::{json, Value};

#[derive(Parser)]
struct Args {
    /// Where to listen (127.0.0.1 only; port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    bind: String,
    /// HTTP worker threads (patchbay's default is one per core: 2 on the bench machine).
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Set TCP_NODELAY on accepted sockets (patchbay does not).
    #[arg(long)]
    nodelay: bool,
}

async fn ws(req: HttpRequest, body: web::Payload) -> actix_web::Result<HttpResponse> {
    let (resp, mut session, stream) = actix_ws::handle(&req, body)?;
    let mut stream = stream.max_frame_size(1 << 20).aggregate_continuations().max_continuation_size(1 << 20);
    actix_web::rt::spawn(async move {
        while let Some(Ok(msg)) = stream.recv().await {
            match msg {
                AggregatedMessage::Text(text) => {
                    let Ok(v) = serde_json::from_str::<Value>(&text) else { continue };
                    let answer = match v["type"].as_str() {
                        Some("hello") => json!({"type": "hello", "user": "u", "token": "t"}),
                        Some("message") => {
                            json!({"type": "message", "text": format!("echo: {}", v["text"].as_str().unwrap_or(""))})
                        }
                        _ => continue,
                    };
                    if session.text(answer.to_string()).await.is_err() {
                        break;
                    }
                }
                AggregatedMessage::Ping(p) => {
                    if session.pong(&p).await.is_err() {
                        break;
                    }
                }
                AggregatedMessage::Close(_) => break,
                _ => {}
            }
        }
        let _ = session.close(None).await;
    });
    Ok(resp)
}

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let addr: std::net::SocketAddr = args.bind.parse().map_err(std::io::Error::other)?;
    if !addr.ip().is_loopback() {
        return Err(std::io::Error::other("only loopback addresses"));
    }
    let mut server = HttpServer::new(|| App::new().route("/ws", web::get().to(ws))).workers(args.workers);
    if args.nodelay {
        server = server.tcp_nodelay(true);
    }
    let server = server.bind(addr)?;
    for a in server.addrs() {
        println!("wsceiling listening on http://{a}");
    }
    server.run().await
}
