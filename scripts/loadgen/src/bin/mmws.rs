//! `mmws`: a minimal Mattermost server for one bot, for scripts/bench's WebSocket-mode phase
//! (issue 4): patchbay's `mattermost` channel in `mode = "websocket"` connects to it like to
//! a real server, and mmws pushes `posted` events at it and times the replies.
//!
//! What it serves (everything `Authorization: Bearer <--token>`, else 401 with an AppError):
//! - `GET /api/v4/users/me` (and `/users/{bot id}`): the bot user (`is_bot`).
//! - `GET /api/v4/users/{id}/teams`, `/users/{id}/channels`: the bench's team (mention runs)
//!   and the channels of the latest run (the bot is a member of each).
//! - `GET /api/v4/channels/{id}/posts`: an empty `PostList` — events missed while patchbay
//!   was disconnected are not replayed over REST; they count as missing in the result.
//! - `POST /api/v4/users/{id}/typing`: 200 (counted).
//! - `POST /api/v4/posts`: 201 with the new post (a new id); a reply is matched to its event
//!   by `root_id` (the event's post id, as patchbay answers a top-level post in its thread)
//!   and checked: the event's `channel_id`, the text `echo: hello <n>` (the echo assistant).
//! - `PUT /api/v4/posts/{id}/patch` 200, `DELETE /api/v4/posts/{id}` 200 (streaming; unused
//!   by the echo assistant).
//! - `GET /api/v4/websocket`: the upgrade. With the token in `Authorization` the connection is
//!   authenticated at once and `hello` (seq 0, a new `connection_id`) follows the upgrade; an
//!   `authentication_challenge` on such a connection is ignored, as the server ignores it.
//!   Without the header, `hello` and then `{"status":"OK","seq_reply":N}` answer a good
//!   challenge (a bad one closes the socket). `?connection_id=&sequence_number=` resumes when
//!   the id is the live session's and nothing was sent since (no `hello`); otherwise a new
//!   connection id. Events carry `seq`; the `ping` action is answered with `pong`.
//!
//! The bench drives it over the same listener (not Mattermost paths):
//! - `POST /bench/run?mode=open&rate=2000&duration=10&channels=1000` — events at a fixed
//!   rate (open loop: event n is sent at start + n / rate whatever the replies do);
//! - `POST /bench/run?mode=window&window=256&duration=10&channels=1000` — as fast as replies
//!   come back, with at most `window` events unanswered (closed loop);
//!   common: `kind=dm|mention` (a direct message, or `@bot` in an open channel), `max_events`,
//!   `drain_timeout` (s to wait for the last replies), `server_pid` (CPU and RSS of patchbay);
//!   answers the run's JSON once every reply came back (or the drain timed out);
//! - `GET /bench/status` — `{"connected", "connections", "resumes", "next_seq"}`;
//! - `POST /bench/stop` — exits.
//!
//! Event n goes to channel n mod `channels` (each its own conversation in patchbay, whose
//! replies within one conversation go one at a time) from that channel's user. Latency runs
//! from writing the event's frame to the reply's `POST /api/v4/posts` being read.
//!
//! Bounded: a run sends at most 2,000,000 events over at most 120 s and drains at most 300 s;
//! the process exits after `--lifetime` seconds (≤ 3600) whatever happens; it listens on
//! 127.0.0.1 only.

#[path = "../http1.rs"]
#[allow(dead_code)] // the client half is for the other bins
mod http1;

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use http1::{dechunk, find, header_value};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const MAX_DURATION_SECS: f64 = 120.0;
const MAX_DRAIN_SECS: f64 = 300.0;
const MAX_EVENTS: u64 = 2_000_000;
const MAX_RATE: f64 = 100_000.0;
const MAX_WINDOW: usize = 10_000;
const MAX_CHANNELS: u64 = 100_000;
const MAX_LIFETIME_SECS: u64 = 3600;
const MAX_HEAD_BYTES: usize = 64 << 10;
const MAX_BODY_BYTES: usize = 4 << 20;
/// How long an unauthenticated socket may wait before its `authentication_challenge`.
const AUTH_WAIT: Duration = Duration::from_secs(5);
/// How long a run waits for patchbay's socket before giving up.
const CONNECT_WAIT: Duration = Duration::from_secs(30);
/// Frames written before a flush when several are queued.
const WRITE_BATCH: usize = 64;
/// Seconds covered by a run's timeline.
const TIMELINE_SECS: usize = MAX_DURATION_SECS as usize + MAX_DRAIN_SECS as usize + 2;

#[derive(Parser)]
#[command(about = "A minimal Mattermost server for one bot: posted events over the WebSocket API, replies timed (127.0.0.1 only)")]
struct Cli {
    /// 127.0.0.1:PORT to listen on (port 0: any free port; the address is printed).
    #[arg(long)]
    bind: String,
    /// The bot's personal access token (26 letters and digits), as patchbay presents it.
    #[arg(long)]
    token: String,
    /// The bot's username.
    #[arg(long, default_value = "benchbot")]
    username: String,
    /// Kernel clock ticks per second (`getconf CLK_TCK`), for /proc/PID/stat.
    #[arg(long, default_value_t = 100)]
    clk_tck: u64,
    /// Exit after this many seconds, whatever happens.
    #[arg(long, default_value_t = 900)]
    lifetime: u64,
    /// Threads of the runtime (1: everything on one thread, the least CPU taken from patchbay).
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

fn main() {
    let cli = Cli::parse();
    let threads = cli.threads.clamp(1, 16);
    let rt = if threads == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()
    }
    .expect("tokio runtime");
    if let Err(e) = rt.block_on(serve(cli)) {
        eprintln!("mmws: {e}");
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------------------------
// State.

/// Ids: 26 lowercase letters and digits, like Mattermost's, all starting with the process's tag.
struct Ids {
    tag: String,
}

impl Ids {
    fn bot(&self) -> String {
        format!("{}botbotbotbotbotbotbo", self.tag)
    }
    fn team(&self) -> String {
        format!("{}tm{:018}", self.tag, 1)
    }
    fn channel(&self, c: u64) -> String {
        format!("{}ch{:018}", self.tag, c)
    }
    fn user(&self, c: u64) -> String {
        format!("{}us{:018}", self.tag, c)
    }
    /// An event's post id: the run (mod 100) and the event's number.
    fn event_post(&self, run: u64, n: u64) -> String {
        format!("{}{:02}{:018}", self.tag, run % 100, n)
    }
    fn parse_event_post(&self, id: &str) -> Option<(u64, u64)> {
        let rest = id.strip_prefix(self.tag.as_str())?;
        if rest.len() != 20 || !rest.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some((rest[..2].parse().ok()?, rest[2..].parse().ok()?))
    }
    fn reply_post(&self, n: u64) -> String {
        format!("{}re{:018}", self.tag, n)
    }
    fn connection(&self, n: u64) -> String {
        format!("{}cn{:018}", self.tag, n)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// A direct message (channel type `D`): always answered.
    Dm,
    /// `@bot hello n` in an open channel (type `O`) of one team, `mentions` naming the bot.
    Mention,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Dm => "dm",
            Kind::Mention => "mention",
        }
    }
}

/// Frames for the live socket's writer.
enum Out {
    Event { run: Arc<Run>, n: u64, body: String },
    Text(String),
}

struct Live {
    generation: u64,
    tx: mpsc::Sender<Out>,
}

#[derive(Default)]
struct Counters {
    me: AtomicU64,
    teams: AtomicU64,
    channels: AtomicU64,
    channel_posts: AtomicU64,
    typing: AtomicU64,
    posts_created: AtomicU64,
    patches: AtomicU64,
    deletes: AtomicU64,
    unauthorized: AtomicU64,
    not_found: AtomicU64,
    pings: AtomicU64,
    /// Replies whose root_id is no event of the current run (a finished run's late replies).
    unmatched_replies: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        BTreeMap::from([
            ("users_me", self.me.load(Relaxed)),
            ("users_teams", self.teams.load(Relaxed)),
            ("users_channels", self.channels.load(Relaxed)),
            ("channel_posts", self.channel_posts.load(Relaxed)),
            ("typing", self.typing.load(Relaxed)),
            ("posts_created", self.posts_created.load(Relaxed)),
            ("post_patches", self.patches.load(Relaxed)),
            ("post_deletes", self.deletes.load(Relaxed)),
            ("unauthorized", self.unauthorized.load(Relaxed)),
            ("not_found", self.not_found.load(Relaxed)),
            ("ws_pings", self.pings.load(Relaxed)),
            ("unmatched_replies", self.unmatched_replies.load(Relaxed)),
        ])
    }
}

struct Shared {
    token: String,
    username: String,
    ids: Ids,
    clk_tck: u64,
    live: Mutex<Option<Live>>,
    /// The session patchbay may resume: its connection id and the seq the next event gets.
    connection_id: Mutex<String>,
    next_seq: AtomicI64,
    connections: AtomicU64,
    resumes: AtomicU64,
    counters: Counters,
    run: Mutex<Option<Arc<Run>>>,
    runs: AtomicU64,
    running: AtomicBool,
    /// The channels the bot is a member of (those of the latest run).
    channels: Mutex<(Kind, u64)>,
}

/// One measured run.
struct Run {
    id: u64,
    channels: u64,
    start: Instant,
    rate: Option<f64>,
    /// When event n's frame was written, ns since `start` plus one (0: not written).
    sent_at: Vec<AtomicU64>,
    /// How many replies event n got.
    seen: Vec<AtomicU8>,
    sent: AtomicU64,
    replied: AtomicU64,
    repeats: AtomicU64,
    wrong_channel: AtomicU64,
    wrong_text: AtomicU64,
    outstanding: AtomicUsize,
    progress: Notify,
    last_reply_ns: AtomicU64,
    latency: Mutex<Histogram<u64>>,
    latency_from_schedule: Mutex<Histogram<u64>>,
    timeline_sent: Vec<AtomicU64>,
    timeline_replied: Vec<AtomicU64>,
}

impl Run {
    fn elapsed_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn mark_sent(&self, n: u64) {
        let ns = self.elapsed_ns();
        if let Some(s) = self.sent_at.get(n as usize) {
            s.store(ns + 1, Relaxed);
        }
        self.sent.fetch_add(1, Relaxed);
        if let Some(b) = self.timeline_sent.get((ns / 1_000_000_000) as usize) {
            b.fetch_add(1, Relaxed);
        }
    }

    /// A reply to event n arrived (at `ns` since start).
    fn reply(&self, ids: &Ids, n: u64, ns: u64, channel_id: &str, message: &str) {
        let Some(seen) = self.seen.get(n as usize) else { return };
        if channel_id != ids.channel(n % self.channels) {
            self.wrong_channel.fetch_add(1, Relaxed);
        }
        if message.strip_prefix("echo: hello ").and_then(|x| x.parse::<u64>().ok()) != Some(n) {
            self.wrong_text.fetch_add(1, Relaxed);
        }
        if seen.fetch_add(1, Relaxed) > 0 {
            self.repeats.fetch_add(1, Relaxed);
            return;
        }
        let sent = self.sent_at[n as usize].load(Relaxed);
        if sent > 0 {
            self.latency.lock().unwrap().saturating_record(((ns.saturating_sub(sent - 1)) / 1000).max(1));
        }
        if let Some(rate) = self.rate {
            let sched = (n as f64 / rate * 1e9) as u64;
            self.latency_from_schedule.lock().unwrap().saturating_record((ns.saturating_sub(sched) / 1000).max(1));
        }
        self.replied.fetch_add(1, Relaxed);
        self.last_reply_ns.fetch_max(ns, Relaxed);
        if let Some(b) = self.timeline_replied.get((ns / 1_000_000_000) as usize) {
            b.fetch_add(1, Relaxed);
        }
        let _ = self.outstanding.fetch_update(Relaxed, Relaxed, |o| Some(o.saturating_sub(1)));
        self.progress.notify_one();
    }
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds")
}

fn summary(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return Value::Null;
    }
    json!({
        "count": h.len(),
        "p50_us": h.value_at_quantile(0.50),
        "p90_us": h.value_at_quantile(0.90),
        "p99_us": h.value_at_quantile(0.99),
        "p999_us": h.value_at_quantile(0.999),
        "max_us": h.max(),
        "mean_us": h.mean(),
    })
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as i64
}

// ---------------------------------------------------------------------------------------
// /proc: CPU of patchbay, of mmws and of the machine.

fn cpu_seconds(pid: &str, clk_tck: u64) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / clk_tck.max(1) as f64)
}

fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn machine_busy_seconds(clk_tck: u64) -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system (idle iowait) irq softirq steal
    let busy: u64 = v.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, x)| x).sum();
    Some(busy as f64 / clk_tck.max(1) as f64)
}

struct CpuMark {
    at: Instant,
    server: Option<f64>,
    me: Option<f64>,
    machine: Option<f64>,
}

impl CpuMark {
    fn now(server_pid: Option<u32>, clk_tck: u64) -> CpuMark {
        CpuMark {
            at: Instant::now(),
            server: server_pid.and_then(|p| cpu_seconds(&p.to_string(), clk_tck)),
            me: cpu_seconds("self", clk_tck),
            machine: machine_busy_seconds(clk_tck),
        }
    }

    fn since(&self, earlier: &CpuMark) -> Value {
        let wall = self.at.duration_since(earlier.at).as_secs_f64().max(1e-9);
        let d = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a - b);
        let server = d(self.server, earlier.server);
        let me = d(self.me, earlier.me);
        let machine = d(self.machine, earlier.machine);
        let others = machine.map(|m| m - server.unwrap_or(0.0) - me.unwrap_or(0.0));
        json!({
            "wall_s": wall,
            "machine_busy_cores": machine.map(|s| s / wall),
            "other_processes_cores": others.map(|s| (s / wall).max(0.0)),
            "server_cpu_s": server,
            "server_cores": server.map(|s| s / wall),
            "loadgen_cpu_s": me,
            "loadgen_cores": me.map(|s| s / wall),
        })
    }
}

// ---------------------------------------------------------------------------------------
// The listener and HTTP/1.1.

async fn serve(cli: Cli) -> Result<(), String> {
    let addr: SocketAddr = cli.bind.parse().map_err(|_| format!("--bind {}: expected 127.0.0.1:PORT", cli.bind))?;
    if !addr.ip().is_loopback() || !addr.is_ipv4() {
        return Err(format!("--bind {}: only 127.0.0.1 may be used", cli.bind));
    }
    let t = &cli.token;
    if t.len() != 26 || !t.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err("--token must be 26 letters and digits, like a Mattermost personal access token".into());
    }
    if cli.lifetime == 0 || cli.lifetime > MAX_LIFETIME_SECS {
        return Err(format!("--lifetime must be in 1..={MAX_LIFETIME_SECS}"));
    }
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    let tag: String = (0..6).map(|i| (b'a' + ((nanos >> (5 * i)) % 26) as u8) as char).collect();
    let shared = Arc::new(Shared {
        token: cli.token.clone(),
        username: cli.username.clone(),
        ids: Ids { tag },
        clk_tck: cli.clk_tck,
        live: Mutex::new(None),
        connection_id: Mutex::new(String::new()),
        next_seq: AtomicI64::new(0),
        connections: AtomicU64::new(0),
        resumes: AtomicU64::new(0),
        counters: Counters::default(),
        run: Mutex::new(None),
        runs: AtomicU64::new(0),
        running: AtomicBool::new(false),
        channels: Mutex::new((Kind::Dm, 1)),
    });
    let listener = TcpListener::bind(addr).await.map_err(|e| format!("bind {addr}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    println!("mmws listening on http://{local}");
    eprintln!("mmws: bot @{} ({}), exits after {} s", shared.username, shared.ids.bot(), cli.lifetime);
    let lifetime = tokio::time::sleep(Duration::from_secs(cli.lifetime));
    tokio::pin!(lifetime);
    loop {
        tokio::select! {
            _ = &mut lifetime => {
                eprintln!("mmws: lifetime over, exiting");
                return Ok(());
            }
            accepted = listener.accept() => {
                let Ok((stream, peer)) = accepted else { continue };
                if !peer.ip().is_loopback() {
                    continue;
                }
                let _ = stream.set_nodelay(true);
                tokio::spawn(connection(stream, shared.clone()));
            }
        }
    }
}

struct Request {
    method: String,
    path: String,
    query: String,
    head: String,
    body: Vec<u8>,
    /// When the whole request had been read.
    at: Instant,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        header_value(&self.head, name)
    }
    fn param(&self, name: &str) -> Option<&str> {
        self.query.split('&').find_map(|kv| kv.split_once('=').filter(|(k, _)| *k == name).map(|(_, v)| v))
    }
}

struct Response {
    status: u16,
    body: String,
}

fn reply(status: u16, body: impl Into<String>) -> Response {
    Response { status, body: body.into() }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        409 => "Conflict",
        _ => "Error",
    }
}

/// Mattermost's `AppError` body.
fn app_error(status: u16, id: &str, message: &str) -> Response {
    reply(
        status,
        json!({"id": id, "message": message, "detailed_error": "", "request_id": "", "status_code": status}).to_string(),
    )
}

/// One TCP connection: keep-alive HTTP/1.1 requests, or a WebSocket upgrade.
async fn connection(mut stream: TcpStream, shared: Arc<Shared>) {
    let mut buf: Vec<u8> = Vec::with_capacity(8 * 1024);
    let mut out: Vec<u8> = Vec::with_capacity(1024);
    loop {
        let hend = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i;
            }
            if buf.len() > MAX_HEAD_BYTES {
                return;
            }
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        };
        let Ok(head) = std::str::from_utf8(&buf[..hend]).map(str::to_owned) else { return };
        let mut line = head.split("\r\n").next().unwrap_or("").split(' ');
        let (method, target) = (line.next().unwrap_or("").to_owned(), line.next().unwrap_or("").to_owned());
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p.to_owned(), q.to_owned()),
            None => (target.clone(), String::new()),
        };
        let start = hend + 4;
        let upgrade = header_value(&head, "upgrade").is_some_and(|u| u.eq_ignore_ascii_case("websocket"));
        if upgrade && method == "GET" {
            buf.drain(..start);
            websocket(stream, buf, Request { method, path, query, head, body: Vec::new(), at: Instant::now() }, shared).await;
            return;
        }
        // The body: content-length or chunked.
        let (body, used) = if let Some(cl) = header_value(&head, "content-length") {
            let Ok(cl) = cl.parse::<usize>() else { return };
            if cl > MAX_BODY_BYTES {
                return;
            }
            while buf.len() < start + cl {
                match stream.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
            (buf[start..start + cl].to_vec(), start + cl)
        } else if header_value(&head, "transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            let mut body = Vec::new();
            loop {
                match dechunk(&buf[start..], &mut body) {
                    Ok(Some(n)) => break (body, start + n),
                    Ok(None) => {}
                    Err(_) => return,
                }
                if buf.len() > MAX_BODY_BYTES + MAX_HEAD_BYTES {
                    return;
                }
                match stream.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        } else {
            (Vec::new(), start)
        };
        buf.drain(..used);
        let close = header_value(&head, "connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let req = Request { method, path, query, head, body, at: Instant::now() };
        let resp = route(&req, &shared).await;
        out.clear();
        out.extend_from_slice(
            format!(
                "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{}\r\n",
                resp.status,
                reason(resp.status),
                resp.body.len(),
                if close { "Connection: close\r\n" } else { "" }
            )
            .as_bytes(),
        );
        out.extend_from_slice(resp.body.as_bytes());
        if stream.write_all(&out).await.is_err() || close {
            return;
        }
        if req.path == "/bench/stop" {
            eprintln!("mmws: stopped by /bench/stop");
            std::process::exit(0);
        }
    }
}

fn bearer_ok(req: &Request, shared: &Shared) -> bool {
    req.header("authorization")
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")).or_else(|| v.strip_prefix("Token ")))
        .is_some_and(|t| t.trim() == shared.token)
}

fn user_json(shared: &Shared) -> String {
    json!({
        "id": shared.ids.bot(), "create_at": 0, "update_at": 0, "delete_at": 0, "username": shared.username,
        "auth_service": "", "email": format!("{}@localhost", shared.username), "nickname": "", "first_name": "",
        "last_name": "", "position": "", "roles": "system_user", "locale": "en", "is_bot": true,
    })
    .to_string()
}

fn channel_json(shared: &Shared, kind: Kind, c: u64) -> Value {
    let ids = &shared.ids;
    let (kind_s, team, name) = match kind {
        Kind::Dm => ("D", String::new(), dm_name(&ids.bot(), &ids.user(c))),
        Kind::Mention => ("O", ids.team(), format!("bench-{c}")),
    };
    json!({"id": ids.channel(c), "create_at": 0, "update_at": 0, "delete_at": 0, "team_id": team,
           "type": kind_s, "display_name": "", "name": name, "header": "", "purpose": ""})
}

/// A direct channel's name: the two user ids, sorted, joined by `__`.
fn dm_name(a: &str, b: &str) -> String {
    if a < b {
        format!("{a}__{b}")
    } else {
        format!("{b}__{a}")
    }
}

fn post_json(id: &str, user_id: &str, channel_id: &str, root_id: &str, message: &str, at: i64) -> Value {
    json!({
        "id": id, "create_at": at, "update_at": at, "edit_at": 0, "delete_at": 0, "is_pinned": false,
        "user_id": user_id, "channel_id": channel_id, "root_id": root_id, "original_id": "",
        "message": message, "type": "", "props": {}, "hashtags": "", "pending_post_id": "",
        "reply_count": 0, "metadata": {},
    })
}

async fn route(req: &Request, shared: &Arc<Shared>) -> Response {
    let c = &shared.counters;
    if let Some(bench) = req.path.strip_prefix("/bench/") {
        return match (req.method.as_str(), bench) {
            ("POST", "run") => match bench_run(req, shared).await {
                Ok(v) => reply(200, v.to_string()),
                Err(e) => reply(400, json!({"error": e}).to_string()),
            },
            ("GET", "status") => reply(200, status_json(shared).to_string()),
            ("POST", "stop") => reply(200, "{}"),
            _ => app_error(404, "api.context.404.app_error", "Sorry, we could not find the page."),
        };
    }
    let Some(api) = req.path.strip_prefix("/api/v4/") else {
        c.not_found.fetch_add(1, Relaxed);
        return app_error(404, "api.context.404.app_error", "Sorry, we could not find the page.");
    };
    if !bearer_ok(req, shared) {
        c.unauthorized.fetch_add(1, Relaxed);
        return app_error(401, "api.context.session_expired.app_error", "Invalid or expired session, please login again.");
    }
    let parts: Vec<&str> = api.split('/').collect();
    let bot = shared.ids.bot();
    let is_me = |u: &str| u == "me" || u == bot;
    match (req.method.as_str(), parts.as_slice()) {
        ("GET", ["users", u]) if is_me(u) => {
            c.me.fetch_add(1, Relaxed);
            reply(200, user_json(shared))
        }
        ("GET", ["users", u, "teams"]) if is_me(u) => {
            c.teams.fetch_add(1, Relaxed);
            let (kind, _) = *shared.channels.lock().unwrap();
            let teams = match kind {
                Kind::Dm => json!([]),
                Kind::Mention => json!([{"id": shared.ids.team(), "name": "bench", "display_name": "Bench", "type": "O"}]),
            };
            reply(200, teams.to_string())
        }
        ("GET", ["users", u, "channels"]) if is_me(u) => {
            c.channels.fetch_add(1, Relaxed);
            let (kind, n) = *shared.channels.lock().unwrap();
            let list: Vec<Value> = (0..n).map(|i| channel_json(shared, kind, i)).collect();
            reply(200, Value::Array(list).to_string())
        }
        ("GET", ["channels", _, "posts"]) => {
            c.channel_posts.fetch_add(1, Relaxed);
            reply(200, r#"{"order":[],"posts":{},"next_post_id":"","prev_post_id":"","has_next":false}"#)
        }
        ("POST", ["users", u, "typing"]) if is_me(u) => {
            c.typing.fetch_add(1, Relaxed);
            reply(200, r#"{"status":"OK"}"#)
        }
        ("POST", ["posts"]) => create_post(req, shared),
        ("PUT", ["posts", id, "patch"]) => {
            c.patches.fetch_add(1, Relaxed);
            let v: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
            let msg = v["message"].as_str().unwrap_or_default();
            reply(200, post_json(id, &bot, "", "", msg, now_ms()).to_string())
        }
        ("DELETE", ["posts", _]) => {
            c.deletes.fetch_add(1, Relaxed);
            reply(200, r#"{"status":"OK"}"#)
        }
        _ => {
            c.not_found.fetch_add(1, Relaxed);
            app_error(404, "api.context.404.app_error", "Sorry, we could not find the page.")
        }
    }
}

/// `POST /api/v4/posts`: a reply. Matched to its event by `root_id`.
fn create_post(req: &Request, shared: &Arc<Shared>) -> Response {
    #[derive(serde::Deserialize)]
    struct NewPost {
        #[serde(default)]
        channel_id: String,
        #[serde(default)]
        message: String,
        #[serde(default)]
        root_id: String,
    }
    let Ok(p) = serde_json::from_slice::<NewPost>(&req.body) else {
        return app_error(400, "api.context.invalid_body_param.app_error", "Invalid or missing post in request body.");
    };
    if p.channel_id.len() != 26 {
        return app_error(400, "api.context.invalid_body_param.app_error", "Invalid or missing channel_id in request body.");
    }
    let c = &shared.counters;
    let n = c.posts_created.fetch_add(1, Relaxed);
    let run = shared.run.lock().unwrap().clone();
    match (run, shared.ids.parse_event_post(&p.root_id)) {
        (Some(run), Some((r, idx))) if r == run.id % 100 && (idx as usize) < run.seen.len() => {
            let ns = req.at.duration_since(run.start).as_nanos() as u64;
            run.reply(&shared.ids, idx, ns, &p.channel_id, &p.message);
        }
        _ => {
            c.unmatched_replies.fetch_add(1, Relaxed);
        }
    }
    let post = post_json(&shared.ids.reply_post(n), &shared.ids.bot(), &p.channel_id, &p.root_id, &p.message, now_ms());
    reply(201, post.to_string())
}

fn status_json(shared: &Shared) -> Value {
    json!({
        "connected": shared.live.lock().unwrap().is_some(),
        "connections": shared.connections.load(Relaxed),
        "resumes": shared.resumes.load(Relaxed),
        "connection_id": shared.connection_id.lock().unwrap().clone(),
        "next_seq": shared.next_seq.load(Relaxed),
        "rest": shared.counters.snapshot(),
    })
}

// ---------------------------------------------------------------------------------------
// The WebSocket.

fn action_reply(status: &str, seq_reply: i64, data: Option<Value>) -> String {
    let mut o = serde_json::Map::new();
    o.insert("status".into(), status.into());
    if seq_reply > 0 {
        o.insert("seq_reply".into(), seq_reply.into());
    }
    if let Some(d) = data {
        o.insert("data".into(), d);
    }
    // json.Encoder: compact, newline.
    format!("{}\n", Value::Object(o))
}

async fn websocket(mut stream: TcpStream, rest: Vec<u8>, req: Request, shared: Arc<Shared>) {
    let c = &shared.counters;
    if req.path != "/api/v4/websocket" {
        c.not_found.fetch_add(1, Relaxed);
        let _ = stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
        return;
    }
    let header_auth = req.header("authorization").is_some();
    if header_auth && !bearer_ok(&req, &shared) {
        c.unauthorized.fetch_add(1, Relaxed);
        let body = r#"{"id":"api.context.session_expired.app_error","message":"Invalid or expired session, please login again.","detailed_error":"","request_id":"","status_code":401}"#;
        let _ = stream
            .write_all(format!("HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).as_bytes())
            .await;
        return;
    }
    let Some(key) = req.header("sec-websocket-key") else {
        let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
        return;
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let head = format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n");
    if stream.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let config = WebSocketConfig::default().max_message_size(Some(1 << 20)).max_frame_size(Some(1 << 20));
    let ws: WebSocketStream<TcpStream> = WebSocketStream::from_partially_read(stream, rest, Role::Server, Some(config)).await;
    let (mut sink, mut frames) = ws.split();
    let generation = shared.connections.fetch_add(1, Relaxed) + 1;
    let resume = req.param("connection_id").zip(req.param("sequence_number").and_then(|s| s.parse::<i64>().ok()));
    eprintln!(
        "mmws: WebSocket connection {generation} ({}{})",
        if header_auth { "Authorization header" } else { "awaiting authentication_challenge" },
        resume.map(|(id, s)| format!(", resume {id} at {s}")).unwrap_or_default()
    );

    // Unauthenticated: wait for the challenge first.
    let mut challenge_reply = None;
    if !header_auth {
        let deadline = tokio::time::sleep(AUTH_WAIT);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => return,
                f = frames.next() => {
                    let Some(Ok(Message::Text(t))) = f else {
                        if matches!(f, Some(Ok(_))) { continue; }
                        return;
                    };
                    let v: Value = serde_json::from_str(t.as_str()).unwrap_or(Value::Null);
                    if v["action"] != "authentication_challenge" {
                        continue;
                    }
                    if v["data"]["token"].as_str() != Some(shared.token.as_str()) {
                        c.unauthorized.fetch_add(1, Relaxed);
                        return;
                    }
                    challenge_reply = Some(action_reply("OK", v["seq"].as_i64().unwrap_or(0), None));
                    break;
                }
            }
        }
    }

    // The session: resumed, or a new connection id with `hello`. The live socket is replaced.
    let (tx, mut rx) = mpsc::channel::<Out>(4096);
    let hello = {
        let mut cid = shared.connection_id.lock().unwrap();
        let mut live = shared.live.lock().unwrap();
        let resumed = header_auth
            && resume.as_ref().is_some_and(|(id, seq)| !cid.is_empty() && id == &*cid && *seq == shared.next_seq.load(Relaxed));
        *live = Some(Live { generation, tx: tx.clone() });
        if resumed {
            shared.resumes.fetch_add(1, Relaxed);
            None
        } else {
            *cid = shared.ids.connection(generation);
            shared.next_seq.store(1, Relaxed);
            Some(format!(
                "{{\"event\":\"hello\",\"data\":{{\"connection_id\":\"{}\",\"server_version\":\"10.5.0.mmws\"}},\"broadcast\":{{\"omit_users\":null,\"user_id\":\"{}\",\"channel_id\":\"\",\"team_id\":\"\",\"connection_id\":\"\",\"omit_connection_id\":\"\"}},\"seq\":0}}\n",
                cid,
                shared.ids.bot()
            ))
        }
    };
    if let Some(h) = hello {
        if sink.send(Message::text(h)).await.is_err() {
            return;
        }
    }
    if let Some(r) = challenge_reply {
        if sink.send(Message::text(r)).await.is_err() {
            return;
        }
    }

    // The writer: events (stamped as they are written, `seq` given here) and action replies.
    let writer_shared = shared.clone();
    let writer = tokio::spawn(async move {
        let shared = writer_shared;
        let mut batch = Vec::with_capacity(WRITE_BATCH);
        while rx.recv_many(&mut batch, WRITE_BATCH).await > 0 {
            for o in batch.drain(..) {
                let frame = match o {
                    Out::Event { run, n, body } => {
                        let seq = shared.next_seq.fetch_add(1, Relaxed);
                        run.mark_sent(n);
                        format!("{{\"event\": \"posted\", {body}, \"seq\": {seq}}}")
                    }
                    Out::Text(t) => t,
                };
                if sink.feed(Message::text(frame)).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    });

    // The reader: actions.
    while let Some(f) = frames.next().await {
        let t = match f {
            Ok(Message::Text(t)) => t,
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => continue,
        };
        let v: Value = serde_json::from_str(t.as_str()).unwrap_or(Value::Null);
        let seq = v["seq"].as_i64().unwrap_or(0);
        let answer = match v["action"].as_str().unwrap_or("") {
            // Already authenticated: the server ignores it.
            "authentication_challenge" => continue,
            _ if seq <= 0 => action_reply("FAIL", seq, None),
            "ping" => {
                c.pings.fetch_add(1, Relaxed);
                action_reply("OK", seq, Some(json!({"text": "pong", "version": "10.5.0.mmws", "server_time": now_ms(), "node_id": ""})))
            }
            "user_typing" => action_reply("OK", seq, None),
            _ => action_reply("FAIL", seq, None),
        };
        if tx.send(Out::Text(answer)).await.is_err() {
            break;
        }
    }
    {
        let mut live = shared.live.lock().unwrap();
        if live.as_ref().is_some_and(|l| l.generation == generation) {
            *live = None;
        }
    }
    drop(tx);
    writer.abort();
    eprintln!("mmws: WebSocket connection {generation} ended");
}

// ---------------------------------------------------------------------------------------
// A run.

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Open,
    Window,
}

fn param<T: std::str::FromStr>(req: &Request, name: &str, default: T) -> Result<T, String> {
    match req.param(name) {
        None | Some("") => Ok(default),
        Some(v) => v.parse().map_err(|_| format!("{name}={v}: not a valid value")),
    }
}

/// The event's `"data": …, "broadcast": …` (the writer adds `event` and `seq`).
fn event_body(shared: &Shared, kind: Kind, run: u64, n: u64, channels: u64) -> String {
    let ids = &shared.ids;
    let c = n % channels;
    let (channel, user, bot) = (ids.channel(c), ids.user(c), ids.bot());
    let message = match kind {
        Kind::Dm => format!("hello {n}"),
        Kind::Mention => format!("@{} hello {n}", shared.username),
    };
    let at = now_ms();
    let post = format!(
        "{{\"id\":\"{}\",\"create_at\":{at},\"update_at\":{at},\"edit_at\":0,\"delete_at\":0,\"is_pinned\":false,\"user_id\":\"{user}\",\"channel_id\":\"{channel}\",\"root_id\":\"\",\"original_id\":\"\",\"message\":{},\"type\":\"\",\"props\":{{}},\"hashtags\":\"\",\"pending_post_id\":\"\",\"reply_count\":0,\"metadata\":{{}}}}",
        ids.event_post(run, n),
        Value::String(message)
    );
    let post = Value::String(post).to_string();
    let sender = format!("user-{c}");
    let (display, name, ctype, team) = match kind {
        Kind::Dm => (format!("@{sender}"), dm_name(&bot, &user), "D", String::new()),
        Kind::Mention => (format!("bench-{c}"), format!("bench-{c}"), "O", ids.team()),
    };
    format!(
        "\"data\": {{\"channel_display_name\":\"{display}\",\"channel_name\":\"{name}\",\"channel_type\":\"{ctype}\",\"mentions\":\"[\\\"{bot}\\\"]\",\"post\":{post},\"sender_name\":\"@{sender}\",\"set_online\":true,\"team_id\":\"{team}\"}}, \"broadcast\": {{\"omit_users\":null,\"user_id\":\"\",\"channel_id\":\"{channel}\",\"team_id\":\"\",\"connection_id\":\"\",\"omit_connection_id\":\"\"}}"
    )
}

struct RunGuard<'a>(&'a Shared);

impl Drop for RunGuard<'_> {
    fn drop(&mut self) {
        *self.0.run.lock().unwrap() = None;
        self.0.running.store(false, Relaxed);
    }
}

async fn bench_run(req: &Request, shared: &Arc<Shared>) -> Result<Value, String> {
    let mode = match req.param("mode").unwrap_or("window") {
        "open" => Mode::Open,
        "window" => Mode::Window,
        m => return Err(format!("mode={m}: expected open or window")),
    };
    let kind = match req.param("kind").unwrap_or("dm") {
        "dm" => Kind::Dm,
        "mention" => Kind::Mention,
        k => return Err(format!("kind={k}: expected dm or mention")),
    };
    let duration: f64 = param(req, "duration", 10.0)?;
    let drain_timeout: f64 = param(req, "drain_timeout", 60.0)?;
    let rate: f64 = param(req, "rate", 2000.0)?;
    let window: usize = param(req, "window", 256)?;
    let channels: u64 = param(req, "channels", 1000)?;
    let max_events: u64 = param(req, "max_events", 1_000_000)?;
    let server_pid: Option<u32> = req.param("server_pid").map(|p| p.parse().map_err(|_| format!("server_pid={p}: not a pid"))).transpose()?;
    if !(duration > 0.0 && duration <= MAX_DURATION_SECS) {
        return Err(format!("duration must be in (0, {MAX_DURATION_SECS}]"));
    }
    if !(0.0..=MAX_DRAIN_SECS).contains(&drain_timeout) {
        return Err(format!("drain_timeout must be in [0, {MAX_DRAIN_SECS}]"));
    }
    if mode == Mode::Open && !(rate > 0.0 && rate <= MAX_RATE) {
        return Err(format!("rate must be in (0, {MAX_RATE}]"));
    }
    if window == 0 || window > MAX_WINDOW {
        return Err(format!("window must be in 1..={MAX_WINDOW}"));
    }
    if channels == 0 || channels > MAX_CHANNELS {
        return Err(format!("channels must be in 1..={MAX_CHANNELS}"));
    }
    if max_events == 0 || max_events > MAX_EVENTS {
        return Err(format!("max_events must be in 1..={MAX_EVENTS}"));
    }
    let max_events = match mode {
        // No more than the schedule holds.
        Mode::Open => max_events.min((rate * duration).ceil() as u64).max(1),
        Mode::Window => max_events,
    };
    if shared.running.swap(true, Relaxed) {
        return Err("a run is already going on".into());
    }
    let _guard = RunGuard(shared);

    // patchbay's socket must be there.
    let waited = Instant::now();
    let tx = loop {
        if let Some(l) = shared.live.lock().unwrap().as_ref() {
            break l.tx.clone();
        }
        if waited.elapsed() > CONNECT_WAIT {
            return Err("patchbay has no WebSocket connection open".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let generation = shared.live.lock().unwrap().as_ref().map(|l| l.generation);
    *shared.channels.lock().unwrap() = (kind, channels);
    let id = shared.runs.fetch_add(1, Relaxed) + 1;
    let rest_before = shared.counters.snapshot();
    let connections_before = shared.connections.load(Relaxed);
    let cap = max_events as usize;
    let run = Arc::new(Run {
        id,
        channels,
        start: Instant::now(),
        rate: (mode == Mode::Open).then_some(rate),
        sent_at: (0..cap).map(|_| AtomicU64::new(0)).collect(),
        seen: (0..cap).map(|_| AtomicU8::new(0)).collect(),
        sent: AtomicU64::new(0),
        replied: AtomicU64::new(0),
        repeats: AtomicU64::new(0),
        wrong_channel: AtomicU64::new(0),
        wrong_text: AtomicU64::new(0),
        outstanding: AtomicUsize::new(0),
        progress: Notify::new(),
        last_reply_ns: AtomicU64::new(0),
        latency: Mutex::new(hist()),
        latency_from_schedule: Mutex::new(hist()),
        timeline_sent: (0..TIMELINE_SECS).map(|_| AtomicU64::new(0)).collect(),
        timeline_replied: (0..TIMELINE_SECS).map(|_| AtomicU64::new(0)).collect(),
    });
    *shared.run.lock().unwrap() = Some(run.clone());
    let cpu0 = CpuMark::now(server_pid, shared.clk_tck);
    let start = tokio::time::Instant::from_std(run.start);
    let send_end = start + Duration::from_secs_f64(duration);
    let mut n: u64 = 0;
    let mut lost = None;
    match mode {
        Mode::Open => 'load: loop {
            let now = tokio::time::Instant::now();
            if n >= max_events || now >= send_end {
                break;
            }
            let due = (((now - start).as_secs_f64() * rate) as u64 + 1).min(max_events);
            while n < due {
                let body = event_body(shared, kind, id, n, channels);
                if tx.send(Out::Event { run: run.clone(), n, body }).await.is_err() {
                    lost = Some(n);
                    break 'load;
                }
                n += 1;
            }
            tokio::time::sleep_until(start + Duration::from_secs_f64(n as f64 / rate)).await;
        },
        Mode::Window => 'load: loop {
            if n >= max_events || tokio::time::Instant::now() >= send_end {
                break;
            }
            while run.outstanding.load(Relaxed) >= window {
                tokio::select! {
                    _ = run.progress.notified() => {}
                    _ = tokio::time::sleep_until(send_end) => break 'load,
                }
            }
            run.outstanding.fetch_add(1, Relaxed);
            let body = event_body(shared, kind, id, n, channels);
            if tx.send(Out::Event { run: run.clone(), n, body }).await.is_err() {
                lost = Some(n);
                break 'load;
            }
            n += 1;
        },
    }
    let queued = n;
    let load_s = run.start.elapsed().as_secs_f64();
    let replied_in_load = run.replied.load(Relaxed);
    // The drain: until every event written got its reply, or the timeout.
    let drain_end = tokio::time::Instant::now() + Duration::from_secs_f64(drain_timeout);
    loop {
        let sent = run.sent.load(Relaxed);
        if run.replied.load(Relaxed) >= queued || (sent < queued && lost.is_some() && run.replied.load(Relaxed) >= sent) {
            break;
        }
        if tokio::time::Instant::now() >= drain_end {
            break;
        }
        tokio::select! {
            _ = run.progress.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    // A moment for repeats to show up.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cpu1 = CpuMark::now(server_pid, shared.clk_tck);
    let total_s = run.start.elapsed().as_secs_f64();
    let sent = run.sent.load(Relaxed);
    let replied = run.replied.load(Relaxed);
    let last_reply_s = run.last_reply_ns.load(Relaxed) as f64 / 1e9;
    let rest_after = shared.counters.snapshot();
    let rest: BTreeMap<&str, u64> = rest_after.iter().map(|(k, v)| (*k, v - rest_before.get(k).copied().unwrap_or(0))).collect();
    let still_live = shared.live.lock().unwrap().as_ref().map(|l| l.generation) == generation;
    let timeline: Vec<Value> = (0..TIMELINE_SECS)
        .map(|s| (s, run.timeline_sent[s].load(Relaxed), run.timeline_replied[s].load(Relaxed)))
        .filter(|(s, a, b)| (*a > 0 || *b > 0) && (*s as f64) < total_s + 1.0)
        .map(|(s, a, b)| json!({"second": s + 1, "sent": a, "replied": b}))
        .collect();
    let latency = summary(&run.latency.lock().unwrap());
    let result = json!({
        "mode": if mode == Mode::Open { "open" } else { "window" },
        "kind": kind.name(),
        "channels": channels,
        "rate": run.rate,
        "window": (mode == Mode::Window).then_some(window),
        "duration_s": duration,
        "sent": sent,
        "replied": replied,
        "missing": sent.saturating_sub(replied),
        "repeated": run.repeats.load(Relaxed),
        "wrong_channel": run.wrong_channel.load(Relaxed),
        "wrong_text": run.wrong_text.load(Relaxed),
        "load_s": load_s,
        "achieved_send_rate": sent as f64 / load_s.max(1e-9),
        "replies_in_load_per_s": replied_in_load as f64 / load_s.max(1e-9),
        "last_reply_s": last_reply_s,
        // Unique replies over the time from the first event to the last reply.
        "replies_per_s": if last_reply_s > 0.0 { replied as f64 / last_reply_s } else { 0.0 },
        "total_s": total_s,
        "drained": replied >= sent,
        "latency": latency,
        "latency_from_schedule": if mode == Mode::Open { summary(&run.latency_from_schedule.lock().unwrap()) } else { Value::Null },
        "connection_lost_at_event": lost,
        "ws": {
            "same_connection_throughout": still_live && shared.connections.load(Relaxed) == connections_before,
            "connections_total": shared.connections.load(Relaxed),
            "resumes_total": shared.resumes.load(Relaxed),
        },
        "rest": rest,
        "timeline": timeline,
        "cpu": cpu1.since(&cpu0),
        "server_rss_mib": server_pid.and_then(rss_mib),
    });
    let l = |k: &str| result["latency"][k].as_u64().map(|v| format!("{:.2}", v as f64 / 1000.0)).unwrap_or_else(|| "n/a".into());
    eprintln!(
        "mmws: run {id} ({}, {} channels): {sent} events, {replied} replies ({:.0}/s), {} repeated, {} missing; event → reply p50 {} ms, p99 {} ms, max {} ms",
        result["mode"].as_str().unwrap_or(""),
        channels,
        result["replies_per_s"].as_f64().unwrap_or(0.0),
        result["repeated"],
        result["missing"],
        l("p50_us"),
        l("p99_us"),
        l("max_us"),
    );
    Ok(result)
}
