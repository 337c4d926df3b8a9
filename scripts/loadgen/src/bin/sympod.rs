//! The Symphony benchmark's pod (scripts/bench-symphony): a minimal fake pod + agent + key
//! manager on plain HTTP, and in the same process a forwarding proxy with Basic proxy
//! authentication (absolute-form requests over persistent connections to the client and to the
//! pod, as Squid keeps them; `--proxy-close` closes both after every request, `--proxy-open`
//! lets unauthenticated requests through too), so that the
//! bot under test — patchbay or symphony-bdk-python — does exactly the same wire work.
//!
//! The datafeed v2 holds `--events` MESSAGESENT events (IMs from one user across
//! `--streams` streams), handed out in batches of up to 100 per read; a batch is dropped once
//! a read carries its ackId, delivered again otherwise. Every `message/create` whose stream
//! is one of the event streams counts as a reply. `GET /bench/stats` answers
//! `{"replies", "events", "first_read_ms", "last_reply_ms", "proxy_connections",
//! "proxy_requests"}` (times in milliseconds since start; the stats request itself goes to
//! the pod directly, not through the proxy).
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
    /// One request per connection: the proxy closes the client and the upstream connection
    /// after every answer (the first version of this benchmark).
    #[arg(long)]
    proxy_close: bool,
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
    /// Client connections the proxy accepted, and requests it forwarded.
    proxy_connections: AtomicU64,
    proxy_requests: AtomicU64,
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
            "first_read_ms": pod.first_read_ms.load(Ordering::SeqCst), "last_reply_ms": pod.last_reply_ms.load(Ordering::SeqCst),
            "proxy_connections": pod.proxy_connections.load(Ordering::SeqCst), "proxy_requests": pod.proxy_requests.load(Ordering::SeqCst)})),
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

/// The proxy: Basic auth, absolute form only (the bench pod is plain HTTP). Persistent
/// connections on both sides, as a corporate proxy such as Squid keeps them by default
/// (`client_persistent_connections` / `server_persistent_connections`): each client
/// connection is served request after request over one upstream connection to the pod, until
/// either side asks to close. `--proxy-close` restores one request per connection.
async fn proxy(listener: TcpListener, pod: Arc<Pod>, pod_port: u16, expected: String, open: bool, close: bool) {
    loop {
        let Ok((s, _)) = listener.accept().await else { continue };
        let _ = s.set_nodelay(true);
        pod.proxy_connections.fetch_add(1, Ordering::Relaxed);
        let expected = expected.clone();
        let pod = pod.clone();
        tokio::spawn(async move {
            let _ = relay(Side::new(s), &pod, pod_port, &expected, open, close).await;
        });
    }
}

/// A socket with what was read from it but not consumed yet.
struct Side {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Side {
    fn new(s: TcpStream) -> Side {
        Side { s, buf: Vec::with_capacity(8192) }
    }

    /// Reads more; false at the end of the stream.
    async fn fill(&mut self) -> std::io::Result<bool> {
        let mut chunk = [0u8; 16384];
        let n = self.s.read(&mut chunk).await?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n > 0)
    }

    /// A message head (without its blank line), or None when the stream ends first.
    async fn head(&mut self) -> std::io::Result<Option<String>> {
        loop {
            if let Some(e) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..e]).into_owned();
                self.buf.drain(..e + 4);
                return Ok(Some(head));
            }
            if self.buf.len() > 65536 || !self.fill().await? {
                return Ok(None);
            }
        }
    }

    /// Moves `n` body bytes to `to`.
    async fn copy(&mut self, to: &mut TcpStream, mut n: usize) -> std::io::Result<()> {
        loop {
            let take = n.min(self.buf.len());
            to.write_all(&self.buf[..take]).await?;
            self.buf.drain(..take);
            n -= take;
            if n == 0 {
                return Ok(());
            }
            if !self.fill().await? {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// One CRLF-terminated line, CRLF included.
    async fn line(&mut self) -> std::io::Result<Vec<u8>> {
        loop {
            if let Some(e) = self.buf.windows(2).position(|w| w == b"\r\n") {
                return Ok(self.buf.drain(..e + 2).collect());
            }
            if self.buf.len() > 65536 || !self.fill().await? {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Moves a chunked body (chunks, last chunk, trailers) to `to` as it is.
    async fn copy_chunked(&mut self, to: &mut TcpStream) -> std::io::Result<()> {
        loop {
            let size_line = self.line().await?;
            to.write_all(&size_line).await?;
            let hex = String::from_utf8_lossy(&size_line);
            let size = usize::from_str_radix(hex.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidData))?;
            if size == 0 {
                loop {
                    let trailer = self.line().await?;
                    to.write_all(&trailer).await?;
                    if trailer == b"\r\n" {
                        return Ok(());
                    }
                }
            }
            self.copy(to, size + 2).await?;
        }
    }

    /// Sends `head` and then the body framed as `framing` to `to`: a body of known length
    /// (up to 1 MiB) goes in the same write as the head, as one segment when it fits, as a
    /// buffering proxy sends it.
    async fn message(&mut self, to: &mut TcpStream, head: &str, framing: Framing) -> std::io::Result<()> {
        if let Framing::Length(n) = framing {
            if n <= 1 << 20 {
                while self.buf.len() < n {
                    if !self.fill().await? {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                }
                let mut out = Vec::with_capacity(head.len() + n);
                out.extend_from_slice(head.as_bytes());
                out.extend_from_slice(&self.buf[..n]);
                self.buf.drain(..n);
                return to.write_all(&out).await;
            }
        }
        to.write_all(head.as_bytes()).await?;
        self.body(to, framing).await
    }

    /// Moves a body framed as `framing` to `to`.
    async fn body(&mut self, to: &mut TcpStream, framing: Framing) -> std::io::Result<()> {
        match framing {
            Framing::Length(n) => self.copy(to, n).await,
            Framing::Chunked => self.copy_chunked(to).await,
            Framing::UntilClose => {
                to.write_all(&self.buf).await?;
                self.buf.clear();
                tokio::io::copy(&mut self.s, to).await.map(|_| ())
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| l.split_once(':').filter(|(k, _)| k.trim().eq_ignore_ascii_case(name)).map(|(_, v)| v.trim()))
}

fn framing(head: &str, request: bool) -> Framing {
    if header(head, "transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        Framing::Chunked
    } else if let Some(n) = header(head, "content-length").and_then(|v| v.parse().ok()) {
        Framing::Length(n)
    } else if request {
        Framing::Length(0)
    } else {
        Framing::UntilClose
    }
}

/// Whether the message asks to close the connection after it (HTTP/1.0 without keep-alive).
fn wants_close(head: &str) -> bool {
    let version_10 = head.lines().next().is_some_and(|l| l.contains("HTTP/1.0"));
    let conn = [header(head, "connection"), header(head, "proxy-connection")]
        .into_iter()
        .flatten()
        .map(str::to_ascii_lowercase)
        .collect::<Vec<_>>();
    conn.iter().any(|v| v.contains("close")) || (version_10 && !conn.iter().any(|v| v.contains("keep-alive")))
}

/// The head without hop-by-hop headers, with `first` as its first line and `connection` added.
fn rewrite(head: &str, first: &str, connection: &str) -> String {
    let mut out = format!("{first}\r\n");
    for l in head.lines().skip(1) {
        let name = l.split(':').next().unwrap_or("").trim().to_ascii_lowercase();
        if !matches!(name.as_str(), "proxy-authorization" | "proxy-connection" | "connection" | "keep-alive") {
            out.push_str(l);
            out.push_str("\r\n");
        }
    }
    out.push_str(connection);
    out.push_str("\r\n\r\n");
    out
}

async fn relay(mut client: Side, pod: &Pod, pod_port: u16, expected: &str, open: bool, close: bool) -> std::io::Result<()> {
    let mut up: Option<Side> = None;
    loop {
        let Some(head) = client.head().await? else { return Ok(()) };
        let ok = open || header(&head, "proxy-authorization") == Some(expected);
        if !ok {
            client.s.write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"bench\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await?;
            return Ok(());
        }
        let mut parts = head.lines().next().unwrap_or_default().split_whitespace();
        let (method, target, version) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next().unwrap_or("HTTP/1.1"));
        let head_request = method.eq_ignore_ascii_case("HEAD");
        let path = target.strip_prefix("http://").and_then(|t| t.find('/').map(|i| &t[i..])).unwrap_or("/");
        let client_close = close || wants_close(&head);
        let upstream = rewrite(&head, &format!("{method} {path} {version}"), if close { "Connection: close" } else { "Connection: keep-alive" });
        let req_framing = framing(&head, true);
        pod.proxy_requests.fetch_add(1, Ordering::Relaxed);
        let mut u = match up.take() {
            Some(u) => u,
            None => {
                let s = TcpStream::connect(("127.0.0.1", pod_port)).await?;
                let _ = s.set_nodelay(true);
                Side::new(s)
            }
        };
        client.message(&mut u.s, &upstream, req_framing).await?;
        let Some(resp) = u.head().await? else { return Ok(()) };
        let status: u16 = resp.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(502);
        let resp_framing = if head_request || status == 204 || status == 304 || (100..200).contains(&status) {
            Framing::Length(0)
        } else {
            framing(&resp, false)
        };
        let upstream_close = wants_close(&resp) || resp_framing == Framing::UntilClose;
        let close_after = client_close || resp_framing == Framing::UntilClose;
        let first = resp.lines().next().unwrap_or_default().to_owned();
        let back = rewrite(&resp, &first, if close_after { "Connection: close" } else { "Connection: keep-alive" });
        u.message(&mut client.s, &back, resp_framing).await?;
        if close_after {
            let _ = client.s.shutdown().await;
            return Ok(());
        }
        if !upstream_close {
            up = Some(u);
        }
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
        proxy_connections: AtomicU64::new(0),
        proxy_requests: AtomicU64::new(0),
    });
    let pod_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let pod_port = pod_listener.local_addr()?.port();
    let proxy_listener = TcpListener::bind("127.0.0.1:0").await?;
    let proxy_port = proxy_listener.local_addr()?.port();
    tokio::spawn(proxy(proxy_listener, pod.clone(), pod_port, basic(&args.proxy_user, &args.proxy_password), args.proxy_open, args.proxy_close));
    println!("sympod pod 127.0.0.1:{pod_port} proxy 127.0.0.1:{proxy_port}");
    let data = web::Data::new(pod);
    HttpServer::new(move || App::new().app_data(data.clone()).app_data(web::PayloadConfig::new(1 << 20)).default_service(web::to(handle)))
        .workers(1)
        .listen(pod_listener)?
        .run()
        .await
}
