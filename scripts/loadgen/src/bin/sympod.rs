//! The Symphony benchmark's pod (scripts/bench-symphony): a minimal fake pod + agent + key
//! manager on plain HTTP, and in the same process a forwarding proxy with Basic proxy
//! authentication (absolute-form requests, one request per upstream connection; `--proxy-open`
//! lets unauthenticated requests through too), so that the
//! bot under test — patchbay or symphony-bdk-python — does exactly the same wire work.
//!
//! The datafeed v2 holds `--events` MESSAGESENT events (IMs from one user across
//! `--streams` streams), handed out in batches of up to 100 per read; a batch is dropped once
//! a read carries its ackId, delivered again otherwise. Every `message/create` whose stream
//! is one of the event streams counts as a reply. `GET /bench/stats` answers
//! `{"replies", "events", "first_read_ms", "last_reply_ms"}` (milliseconds since start).
//! Nothing is verified (no JWT checks): this is a load target, the tests have the faithful fake.
//!
//! `sympod --events 20000 --streams 100` prints `sympod pod 127.0.0.1:P proxy 127.0.0.1:Q`.
//! Everything binds to 127.0.0.1; the event count bounds the work.

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use clap::Parser;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 20_000)]
    events: usize,
    #[arg(long, default_value_t = 100)]
    streams: usize,
    #[arg(long, default_value = "bench")]
    proxy_user: String,
    #[arg(long, default_value = "bench-password")]
    proxy_password: String,
    /// Let requests without proxy credentials through: symphony-bdk-python cannot send them
    /// on plain HTTP (aiohttp uses its `proxy_headers` only for CONNECT).
    #[arg(long)]
    proxy_open: bool,
}

struct Pod {
    start: Instant,
    queue: Mutex<VecDeque<Value>>,
    inflight: Mutex<Option<(String, Vec<Value>)>>,
    next_ack: AtomicU64,
    replies: AtomicU64,
    events: usize,
    first_read_ms: AtomicU64,
    last_reply_ms: AtomicU64,
}

fn ms(p: &Pod) -> u64 {
    p.start.elapsed().as_millis() as u64
}

async fn handle(req: HttpRequest, body: web::Bytes, pod: web::Data<Arc<Pod>>) -> HttpResponse {
    let path = req.uri().path();
    match (req.method().as_str(), path) {
        ("POST", "/login/pubkey/authenticate") => HttpResponse::Ok().json(json!({"name": "sessionToken", "token": "s.e.s"})),
        ("POST", "/relay/pubkey/authenticate") => HttpResponse::Ok().json(json!({"name": "keyManagerToken", "token": "km"})),
        ("GET", "/pod/v2/sessioninfo") => HttpResponse::Ok().json(json!({"id": 1, "username": "bench-bot", "displayName": "Bench Bot"})),
        ("GET", "/agent/v1/info") => HttpResponse::Ok().json(json!({"version": "Agent-24.9.0"})),
        ("GET", "/agent/v5/datafeeds") => HttpResponse::Ok().json(json!([])),
        ("POST", "/agent/v5/datafeeds") => HttpResponse::Created().json(json!({"id": "bench0000000000000000000000000000_f", "type": "fanout"})),
        ("GET", "/bench/stats") => HttpResponse::Ok().json(json!({
            "replies": pod.replies.load(Ordering::SeqCst), "events": pod.events,
            "first_read_ms": pod.first_read_ms.load(Ordering::SeqCst), "last_reply_ms": pod.last_reply_ms.load(Ordering::SeqCst)})),
        ("POST", p) if p.starts_with("/agent/v5/datafeeds/") && p.ends_with("/read") => {
            let ack_in = serde_json::from_slice::<Value>(&body).ok().and_then(|v| v["ackId"].as_str().map(str::to_owned)).unwrap_or_default();
            {
                let mut inflight = pod.inflight.lock().unwrap();
                if let Some((ack, evs)) = inflight.take() {
                    if ack != ack_in {
                        let mut q = pod.queue.lock().unwrap();
                        for e in evs.into_iter().rev() {
                            q.push_front(e);
                        }
                    }
                }
            }
            let batch: Vec<Value> = {
                let mut q = pod.queue.lock().unwrap();
                let n = q.len().min(100);
                q.drain(..n).collect()
            };
            if batch.is_empty() {
                // Nothing left: a short long-poll.
                tokio::time::sleep(Duration::from_millis(200)).await;
            } else {
                let _ = pod.first_read_ms.compare_exchange(0, ms(&pod).max(1), Ordering::SeqCst, Ordering::SeqCst);
            }
            let ack = format!("ack{}", pod.next_ack.fetch_add(1, Ordering::SeqCst));
            *pod.inflight.lock().unwrap() = Some((ack.clone(), batch.clone()));
            HttpResponse::Ok().json(json!({"events": batch, "ackId": ack}))
        }
        ("POST", p) if p.starts_with("/agent/v4/stream/") && p.ends_with("/message/create") => {
            if p.contains("/stream/bench-stream-") && body.windows(5).any(|w| w == b"echo:") {
                pod.replies.fetch_add(1, Ordering::SeqCst);
                pod.last_reply_ms.store(ms(&pod), Ordering::SeqCst);
            }
            HttpResponse::Ok().json(json!({"messageId": "m", "timestamp": 0, "message": "<div/>"}))
        }
        _ => HttpResponse::NotFound().json(json!({"code": 404, "message": "no such endpoint"})),
    }
}

fn events(n: usize, streams: usize) -> VecDeque<Value> {
    (0..n)
        .map(|i| {
            let id = format!("bench-message-{i:08}");
            let stream = format!("bench-stream-{:04}", i % streams);
            json!({"id": format!("ev{i}"), "messageId": id, "timestamp": 0, "type": "MESSAGESENT",
                   "initiator": {"user": {"userId": 2, "displayName": "Load User", "username": "load"}},
                   "payload": {"messageSent": {"message": {"messageId": id, "timestamp": 0,
                       "message": format!("<div data-format=\"PresentationML\" data-version=\"2.0\">question {i} &amp; more</div>"),
                       "data": "{}", "user": {"userId": 2, "displayName": "Load User", "username": "load"},
                       "stream": {"streamId": stream, "streamType": "IM"}}}}})
        })
        .collect()
}

/// The proxy: Basic auth, absolute form only (the bench pod is plain HTTP).
async fn proxy(listener: TcpListener, pod_port: u16, expected: String, open: bool) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else { continue };
        let expected = expected.clone();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 8192];
            let end = loop {
                if let Some(e) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break e;
                }
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                if buf.len() > 65536 {
                    return;
                }
            };
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let mut lines = head.lines();
            let first = lines.next().unwrap_or_default().to_owned();
            let ok = open || head.lines().any(|l| l.split_once(':').is_some_and(|(k, v)| k.trim().eq_ignore_ascii_case("proxy-authorization") && v.trim() == expected));
            if !ok {
                let _ = s.write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"bench\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
                return;
            }
            let mut parts = first.split_whitespace();
            let (method, target, version) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next().unwrap_or("HTTP/1.1"));
            let path = target.strip_prefix("http://").and_then(|t| t.find('/').map(|i| &t[i..])).unwrap_or("/");
            let mut out = format!("{method} {path} {version}\r\n");
            for l in lines {
                let name = l.split(':').next().unwrap_or("").trim().to_ascii_lowercase();
                if !matches!(name.as_str(), "proxy-authorization" | "proxy-connection" | "connection" | "keep-alive") {
                    out.push_str(l);
                    out.push_str("\r\n");
                }
            }
            out.push_str("Connection: close\r\n\r\n");
            let Ok(mut up) = TcpStream::connect(("127.0.0.1", pod_port)).await else { return };
            if up.write_all(out.as_bytes()).await.is_err() || up.write_all(&buf[end + 4..]).await.is_err() {
                return;
            }
            let _ = tokio::io::copy_bidirectional(&mut s, &mut up).await;
        });
    }
}

fn basic(user: &str, password: &str) -> String {
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = format!("{user}:{password}").into_bytes();
    let mut out = String::new();
    for c in b.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    format!("Basic {out}")
}

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let pod = Arc::new(Pod {
        start: Instant::now(),
        queue: Mutex::new(events(args.events, args.streams)),
        inflight: Mutex::new(None),
        next_ack: AtomicU64::new(1),
        replies: AtomicU64::new(0),
        events: args.events,
        first_read_ms: AtomicU64::new(0),
        last_reply_ms: AtomicU64::new(0),
    });
    let pod_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let pod_port = pod_listener.local_addr()?.port();
    let proxy_listener = TcpListener::bind("127.0.0.1:0").await?;
    let proxy_port = proxy_listener.local_addr()?.port();
    tokio::spawn(proxy(proxy_listener, pod_port, basic(&args.proxy_user, &args.proxy_password), args.proxy_open));
    println!("sympod pod 127.0.0.1:{pod_port} proxy 127.0.0.1:{proxy_port}");
    let data = web::Data::new(pod);
    HttpServer::new(move || App::new().app_data(data.clone()).app_data(web::PayloadConfig::new(1 << 20)).default_service(web::to(handle)))
        .workers(1)
        .listen(pod_listener)?
        .run()
        .await
}
