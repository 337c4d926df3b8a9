//! The Slack benchmark's tools (scripts/bench-slack), one binary, three roles:
//!
//! - `slackload api --bind ADDR`: a minimal Slack Web API for the bots under test:
//!   `auth.test`, and `chat.postMessage` (JSON or form, as Bolt's WebClient sends it), which
//!   counts replies and times each from the `t=<unix ns>` the event carried to its arrival.
//!   `GET /stats` answers the counts and percentiles, `POST /reset` clears them.
//! - `slackload ceiling --bind ADDR --secret S`: the bare actix-web ceiling for this path:
//!   read the raw body, check Slack's `v0` signature, parse the JSON, answer 200. Nothing
//!   durable, no assistant: what any Events API endpoint must do at the least.
//! - `slackload events --target URL --secret S …`: signs `event_callback` / `app_mention`
//!   bodies as Slack does and POSTs them over keep-alive connections, closed loop (or at a
//!   fixed total rate with `--rate`), for a bounded time; prints the acknowledged events per
//!   second and the ack latency percentiles as JSON.
//!
//! Every event has its own `ts` and `event_id` (nothing is deduped) and goes to one of
//! `--channels` channel ids, so a bot's per-channel pacing is not what is measured. Load goes
//! to 127.0.0.1 only and every loop is bounded by `--duration`.
//!
//! HMAC-SHA256 is implemented here (FIPS 180-4, RFC 2104) to keep the crate's dependencies
//! as they are; it is checked against Slack's documented signature at start.

#[path = "../http1.rs"]
mod http1;

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    role: Role,
}

#[derive(Subcommand)]
enum Role {
    /// A minimal Slack Web API (auth.test, chat.postMessage) that times replies.
    Api {
        #[arg(long, default_value = "127.0.0.1:0")]
        bind: String,
    },
    /// The bare ceiling: verify the signature, parse, answer 200.
    Ceiling {
        #[arg(long, default_value = "127.0.0.1:0")]
        bind: String,
        #[arg(long)]
        secret: String,
        #[arg(long, default_value_t = 2)]
        workers: usize,
    },
    /// Signed app_mention events at a target, bounded in time.
    Events {
        /// The Request URL (http://127.0.0.1:PORT/…).
        #[arg(long)]
        target: String,
        #[arg(long)]
        secret: String,
        /// Measured seconds (after the warm-up).
        #[arg(long, default_value_t = 10)]
        duration: u64,
        #[arg(long, default_value_t = 2)]
        warmup: u64,
        #[arg(long, default_value_t = 64)]
        connections: usize,
        /// Distinct channel ids the events are spread over.
        #[arg(long, default_value_t = 20_000)]
        channels: u64,
        /// Events per second in total (0: closed loop, as fast as acks come back).
        #[arg(long, default_value_t = 0)]
        rate: u64,
        /// The bot user the events mention.
        #[arg(long, default_value = "U0BOT")]
        bot_user: String,
    },
}

// ---- HMAC-SHA256 ----

const K: [u32; 64] = [
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5, 0xd807aa98, 0x12835b01,
    0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc,
    0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147,
    0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08,
    0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208,
    0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
];

fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut h: [u32; 8] = [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19];
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut msg = Vec::with_capacity(total + 72);
    for p in parts {
        msg.extend_from_slice(p);
    }
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((total as u64) * 8).to_be_bytes());
    for block in msg.chunks(64) {
        let mut w = [0u32; 64];
        for i in 0..16 {
            w[i] = u32::from_be_bytes([block[4 * i], block[4 * i + 1], block[4 * i + 2], block[4 * i + 3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16].wrapping_add(s0).wrapping_add(w[i - 7]).wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh.wrapping_add(s1).wrapping_add(ch).wrapping_add(K[i]).wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 32];
    for (i, v) in h.iter().enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&v.to_be_bytes());
    }
    out
}

fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&sha256(&[key]));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let ipad: Vec<u8> = k.iter().map(|b| b ^ 0x36).collect();
    let opad: Vec<u8> = k.iter().map(|b| b ^ 0x5c).collect();
    let mut inner_parts: Vec<&[u8]> = vec![&ipad];
    inner_parts.extend_from_slice(parts);
    let inner = sha256(&inner_parts);
    sha256(&[&opad, &inner])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Slack's `v0=<hex>` signature.
fn sign(secret: &str, ts: &str, body: &[u8]) -> String {
    format!("v0={}", hex(&hmac_sha256(secret.as_bytes(), &[b"v0:", ts.as_bytes(), b":", body])))
}

fn self_check() {
    // docs.slack.dev/authentication/verifying-requests-from-slack
    let body = b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
    let got = sign("8f742231b10e8888abcd99yyyzzz85a5", "1531420618", body);
    assert_eq!(got, "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503", "HMAC-SHA256 self-check failed");
}

fn now_ns() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

// ---- api ----

struct ApiStats {
    replies: AtomicU64,
    e2e: Mutex<Histogram<u64>>,
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The `text` of a chat.postMessage body, JSON or form.
fn text_of(req: &HttpRequest, body: &[u8]) -> String {
    let json = req.headers().get("content-type").and_then(|v| v.to_str().ok()).is_some_and(|c| c.starts_with("application/json"));
    if json {
        serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v.get("text").and_then(|t| t.as_str()).map(str::to_owned))
            .unwrap_or_default()
    } else {
        std::str::from_utf8(body)
            .unwrap_or("")
            .split('&')
            .find_map(|kv| kv.strip_prefix("text="))
            .map(percent_decode)
            .unwrap_or_default()
    }
}

async fn api(req: HttpRequest, path: web::Path<String>, body: web::Bytes, stats: web::Data<Arc<ApiStats>>) -> HttpResponse {
    let ok = |v: serde_json::Value| HttpResponse::Ok().content_type("application/json; charset=utf-8").body(v.to_string());
    match path.as_str() {
        "auth.test" => ok(serde_json::json!({"ok": true, "url": "https://bench.slack.com/", "team": "Bench", "user": "bench",
                                             "team_id": "T0BENCH", "user_id": "U0BOT", "bot_id": "B0BOT"})),
        "chat.postMessage" => {
            let text = text_of(&req, &body);
            if let Some(t) = text.split("t=").nth(1).and_then(|r| r.split_whitespace().next()).and_then(|n| n.parse::<u128>().ok()) {
                let micros = now_ns().saturating_sub(t) / 1000;
                let _ = stats.e2e.lock().unwrap().record(micros.min(600_000_000) as u64);
            }
            stats.replies.fetch_add(1, Ordering::Relaxed);
            ok(serde_json::json!({"ok": true, "channel": "C0", "ts": "1700000000.000001"}))
        }
        _ => ok(serde_json::json!({"ok": false, "error": "unknown_method"})),
    }
}

async fn api_stats(stats: web::Data<Arc<ApiStats>>) -> HttpResponse {
    let h = stats.e2e.lock().unwrap();
    let ms = |q: f64| if h.is_empty() { 0.0 } else { h.value_at_quantile(q) as f64 / 1000.0 };
    HttpResponse::Ok().json(serde_json::json!({
        "replies": stats.replies.load(Ordering::Relaxed), "e2e_p50_ms": ms(0.5), "e2e_p99_ms": ms(0.99),
    }))
}

async fn api_reset(stats: web::Data<Arc<ApiStats>>) -> HttpResponse {
    stats.replies.store(0, Ordering::Relaxed);
    stats.e2e.lock().unwrap().reset();
    HttpResponse::Ok().finish()
}

// ---- ceiling ----

async fn ceiling(req: HttpRequest, body: web::Bytes, secret: web::Data<String>) -> HttpResponse {
    let h = |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok()).unwrap_or("");
    let (ts, sig) = (h("x-slack-request-timestamp"), h("x-slack-signature"));
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let fresh = ts.parse::<i64>().is_ok_and(|t| (now - t).abs() <= 300);
    // Not constant time: the ceiling's job is to cost what verification costs, not more.
    if !fresh || sign(&secret, ts, &body) != sig {
        return HttpResponse::Unauthorized().finish();
    }
    match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(v) if v.get("type").is_some() => HttpResponse::Ok().finish(),
        _ => HttpResponse::BadRequest().finish(),
    }
}

// ---- events ----

struct Target {
    addr: SocketAddr,
    host: String,
    path: String,
}

fn parse_target(url: &str) -> Target {
    let rest = url.strip_prefix("http://").expect("--target must be http://127.0.0.1:PORT/…");
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}"))).unwrap_or((rest, "/".into()));
    let addr: SocketAddr = host.parse().expect("--target must name 127.0.0.1:PORT");
    assert!(addr.ip().is_loopback(), "load goes to 127.0.0.1 only");
    Target { addr, host: host.to_owned(), path }
}

fn request(t: &Target, secret: &str, seq: u64, conn: usize, channels: u64, bot_user: &str, base_secs: u64) -> Vec<u8> {
    let now_s = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let ts = format!("{}.{:06}", base_secs + seq / 1_000_000, seq % 1_000_000);
    let body = format!(
        r#"{{"token":"benchverificationtoken","team_id":"T0BENCH","api_app_id":"A0BENCH","event":{{"type":"app_mention","user":"U0ALICE","text":"<@{bot_user}> t={}","ts":"{ts}","channel":"C{:07}","event_ts":"{ts}"}},"type":"event_callback","event_id":"Ev{conn:03}X{seq:010}","event_time":{now_s},"authorizations":[{{"enterprise_id":null,"team_id":"T0BENCH","user_id":"{bot_user}","is_bot":true,"is_enterprise_install":false}}],"is_ext_shared_channel":false}}"#,
        now_ns(),
        seq % channels
    );
    let stamp = now_s.to_string();
    let sig = sign(secret, &stamp, body.as_bytes());
    format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nUser-Agent: Slackbot 1.0 (+https://api.slack.com/robots)\r\nX-Slack-Request-Timestamp: {stamp}\r\nX-Slack-Signature: {sig}\r\nContent-Length: {}\r\n\r\n{body}",
        t.path,
        t.host,
        body.len()
    )
    .into_bytes()
}

struct Counts {
    acked: u64,
    errors: u64,
    hist: Histogram<u64>,
}

#[allow(clippy::too_many_arguments)]
async fn events(target: String, secret: String, duration: u64, warmup: u64, connections: usize, channels: u64, rate: u64, bot_user: String) {
    let t = Arc::new(parse_target(&target));
    let seq = Arc::new(AtomicU64::new(0));
    let base_secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) - 100_000;
    let start = Instant::now();
    let measure_from = start + Duration::from_secs(warmup);
    let end = measure_from + Duration::from_secs(duration);
    let interval = (rate > 0).then(|| Duration::from_secs_f64(connections as f64 / rate as f64));
    let mut tasks = Vec::new();
    for conn in 0..connections {
        let (t, seq, secret, bot_user) = (t.clone(), seq.clone(), secret.clone(), bot_user.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = Counts { acked: 0, errors: 0, hist: Histogram::new_with_bounds(1, 60_000_000, 3).unwrap() };
            let Ok(mut cx) = http1::Conn::connect(t.addr).await else {
                c.errors += 1;
                return c;
            };
            // Spread the fixed-rate senders over one interval.
            let mut next = Instant::now() + interval.map(|i| i.mul_f64(conn as f64 / connections as f64)).unwrap_or_default();
            // Bounded by `end`.
            while Instant::now() < end {
                if let Some(i) = interval {
                    if next > Instant::now() {
                        tokio::time::sleep_until(next.into()).await;
                    }
                    next += i;
                }
                let n = seq.fetch_add(1, Ordering::Relaxed);
                let req = request(&t, &secret, n, conn, channels, &bot_user, base_secs);
                let sent = Instant::now();
                let status = cx.exchange(&req).await;
                let counted = sent >= measure_from && sent < end;
                match status {
                    Ok(s) if (200..300).contains(&s) => {
                        if counted {
                            c.acked += 1;
                            let _ = c.hist.record(sent.elapsed().as_micros().max(1) as u64);
                        }
                    }
                    Ok(_) => c.errors += 1,
                    Err(_) => {
                        c.errors += 1;
                        match http1::Conn::connect(t.addr).await {
                            Ok(n) => cx = n,
                            Err(_) => return c,
                        }
                    }
                }
            }
            c
        }));
    }
    let mut total = Counts { acked: 0, errors: 0, hist: Histogram::new_with_bounds(1, 60_000_000, 3).unwrap() };
    for task in tasks {
        if let Ok(c) = task.await {
            total.acked += c.acked;
            total.errors += c.errors;
            let _ = total.hist.add(&c.hist);
        }
    }
    let ms = |q: f64| if total.hist.is_empty() { 0.0 } else { total.hist.value_at_quantile(q) as f64 / 1000.0 };
    println!(
        "{}",
        serde_json::json!({
            "connections": connections, "rate": rate, "duration_s": duration, "sent": seq.load(Ordering::Relaxed),
            "acked": total.acked, "errors": total.errors, "events_per_s": total.acked as f64 / duration as f64,
            "ack_p50_ms": ms(0.5), "ack_p99_ms": ms(0.99), "ack_max_ms": total.hist.max() as f64 / 1000.0,
        })
    );
}

fn main() {
    self_check();
    let args = Args::parse();
    match args.role {
        Role::Api { bind } => {
            let stats = Arc::new(ApiStats { replies: AtomicU64::new(0), e2e: Mutex::new(Histogram::new_with_bounds(1, 600_000_000, 3).unwrap()) });
            actix_web::rt::System::new().block_on(async move {
                let data = web::Data::new(stats);
                let server = HttpServer::new(move || {
                    App::new()
                        .app_data(data.clone())
                        .route("/api/{method}", web::post().to(api))
                        .route("/stats", web::get().to(api_stats))
                        .route("/reset", web::post().to(api_reset))
                })
                .workers(1)
                .bind(&bind)
                .expect("bind");
                println!("slackload api listening on http://{}", server.addrs()[0]);
                server.run().await.expect("api server");
            });
        }
        Role::Ceiling { bind, secret, workers } => {
            actix_web::rt::System::new().block_on(async move {
                let data = web::Data::new(secret);
                let server = HttpServer::new(move || App::new().app_data(data.clone()).default_service(web::post().to(ceiling)))
                    .workers(workers)
                    .bind(&bind)
                    .expect("bind");
                println!("slackload ceiling listening on http://{}", server.addrs()[0]);
                server.run().await.expect("ceiling server");
            });
        }
        Role::Events { target, secret, duration, warmup, connections, channels, rate, bot_user } => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(events(target, secret, duration, warmup, connections, channels, rate, bot_user));
        }
    }
}
