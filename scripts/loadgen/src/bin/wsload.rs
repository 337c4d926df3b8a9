//! The web chat load generator of scripts/bench-webchat: the same work against patchbay's
//! `webchat` channel and against Botkit 4's web adapter (`botbuilder-adapter-web`), each with
//! an echo bot.
//!
//! - `wsload webhook`: N keep-alive HTTP/1.1 connections, each POSTing its next message as
//!   soon as the previous one is answered (closed loop). An answer counts when it is 200 and
//!   carries the echo of that very message (`"echo: hello <n>"`) inline — Botkit 4's
//!   `/api/messages` semantics (an array of replies); an empty answer is an error.
//! - `wsload echo`: N WebSockets, each saying `hello`, then (all together) sending a message
//!   and waiting for its echo before sending the next (closed loop per socket); messages/s
//!   and the latency from sending a message to receiving its echo.
//! - `wsload idle`: opens idle WebSockets in steps (e.g. 1,000 then 10,000), each having said
//!   `hello` and been answered, and samples the server's RSS after each step.
//!
//! `--flavor patchbay` takes a user token (from `POST …/session`, or from the `hello`
//! answer on a socket) and sends it as `user`, as Botkit's client does when booted with it;
//! `--flavor botkit` sends a plain user id, as Botkit's client does.
//!
//! Everything is bounded: durations (≤ 120 s), counts (≤ 10 M messages, ≤ 60,000 sockets),
//! each request and each wait (10 s), and only 127.0.0.1 may be targeted.
//!
//! The last line of output is `RESULT {json}`.

#[path = "../http1.rs"]
mod http1;

use clap::{Args, Parser, Subcommand, ValueEnum};
use http1::{find, Conn};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::{watch, Semaphore};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const MAX_DURATION_SECS: f64 = 120.0;
const MAX_MESSAGES: u64 = 10_000_000;
const MAX_CONNECTIONS: usize = 1024;
const MAX_SOCKETS: usize = 60_000;
const WAIT: Duration = Duration::from_secs(10);

#[derive(Parser)]
#[command(about = "Web chat load generator for scripts/bench-webchat (127.0.0.1 only)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
enum Flavor {
    Patchbay,
    Botkit,
}

#[derive(Args, Clone)]
struct Common {
    /// Whose wire conventions to use (identity: a patchbay token or a plain Botkit user id).
    #[arg(long, value_enum)]
    flavor: Flavor,
    /// The server's pid, to report its CPU time and memory.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Kernel clock ticks per second (`getconf CLK_TCK`), for /proc/PID/stat.
    #[arg(long, default_value_t = 100)]
    clk_tck: u64,
    /// Threads of the generator's runtime.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

#[derive(Subcommand)]
enum Cmd {
    /// Closed-loop webhook echo: N connections POSTing messages and reading the echoes inline.
    Webhook {
        #[command(flatten)]
        common: Common,
        /// http://127.0.0.1:PORT/path of the webhook that answers an array of replies.
        #[arg(long)]
        url: String,
        /// patchbay: http://127.0.0.1:PORT/…/session, for one user token per connection.
        #[arg(long)]
        session_url: Option<String>,
        #[arg(long, default_value_t = 64)]
        connections: usize,
        /// Seconds of load before the measurement (not counted).
        #[arg(long, default_value_t = 2.0)]
        warmup: f64,
        /// Seconds measured.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        #[arg(long, default_value_t = 2_000_000)]
        max_messages: u64,
    },
    /// Closed-loop WebSocket echo: N sockets, each with one message in flight.
    Echo {
        #[command(flatten)]
        common: Common,
        /// ws://127.0.0.1:PORT/path
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 1000)]
        sockets: usize,
        /// Handshakes in flight at once while connecting.
        #[arg(long, default_value_t = 100)]
        connect_concurrency: usize,
        #[arg(long, default_value_t = 2.0)]
        warmup: f64,
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        #[arg(long, default_value_t = 5_000_000)]
        max_messages: u64,
    },
    /// Idle WebSockets in steps, with the server's RSS after each step.
    Idle {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        url: String,
        /// Total sockets after each step, ascending: 1000,10000.
        #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
        steps: Vec<usize>,
        /// Sockets opened (with hello) and closed again before the baseline, so that the
        /// server's one-time allocations of a first connection are not counted per socket.
        #[arg(long, default_value_t = 100)]
        warmup_sockets: usize,
        /// Seconds to wait after a step before sampling RSS.
        #[arg(long, default_value_t = 3.0)]
        settle: f64,
        #[arg(long, default_value_t = 100)]
        connect_concurrency: usize,
    },
}

fn main() {
    let cli = Cli::parse();
    let threads = match &cli.cmd {
        Cmd::Webhook { common, .. } | Cmd::Echo { common, .. } | Cmd::Idle { common, .. } => common.threads.clamp(1, 16),
    };
    let rt = if threads == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()
    }
    .expect("tokio runtime");
    let result = rt.block_on(async move {
        match cli.cmd {
            Cmd::Webhook { common, url, session_url, connections, warmup, duration, max_messages } => {
                webhook(common, url, session_url, connections, warmup, duration, max_messages).await
            }
            Cmd::Echo { common, url, sockets, connect_concurrency, warmup, duration, max_messages } => {
                echo(common, url, sockets, connect_concurrency, warmup, duration, max_messages).await
            }
            Cmd::Idle { common, url, steps, warmup_sockets, settle, connect_concurrency } => {
                idle(common, url, steps, warmup_sockets, settle, connect_concurrency).await
            }
        }
    });
    match result {
        Ok(v) => println!("RESULT {v}"),
        Err(e) => {
            eprintln!("wsload: {e}");
            std::process::exit(1);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Targets, /proc, histograms.

#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    host: String,
    path: String,
}

fn parse_url(url: &str, scheme: &str) -> Result<Target, String> {
    let rest = url
        .strip_prefix(scheme)
        .ok_or_else(|| format!("{url}: expected a {scheme} URL"))?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = hostport.rsplit_once(':').ok_or_else(|| format!("{url}: give an explicit port"))?;
    let ip = match host {
        "localhost" | "127.0.0.1" => std::net::Ipv4Addr::LOCALHOST,
        _ => return Err(format!("{url}: only 127.0.0.1 may be targeted")),
    };
    let port: u16 = port.parse().map_err(|_| format!("{url}: bad port"))?;
    Ok(Target { addr: SocketAddr::from((ip, port)), host: hostport.to_owned(), path: path.to_owned() })
}

fn check_duration(name: &str, v: f64) -> Result<(), String> {
    if !(0.0..=MAX_DURATION_SECS).contains(&v) {
        return Err(format!("--{name} must be in [0, {MAX_DURATION_SECS}]"));
    }
    Ok(())
}

fn cpu_seconds(pid: &str, clk_tck: u64) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / clk_tck.max(1) as f64)
}

fn status_kib(pid: &str, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(&pid.to_string(), "VmRSS:")
}

fn machine_busy_seconds(clk_tck: u64) -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let busy: u64 = v.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, x)| x).sum();
    Some(busy as f64 / clk_tck.max(1) as f64)
}

#[derive(Clone)]
struct CpuMark {
    at: Instant,
    server: Option<f64>,
    me: Option<f64>,
    machine: Option<f64>,
    /// The server's bytes read and written through syscalls (rchar, wchar of /proc/PID/io).
    io: Option<(u64, u64)>,
    /// The server's CPU seconds per thread name (threads of one name summed).
    threads: std::collections::BTreeMap<String, f64>,
}

fn proc_io(pid: u32) -> Option<(u64, u64)> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    let get = |k: &str| io.lines().find_map(|l| l.strip_prefix(k)).and_then(|v| v.trim().parse::<u64>().ok());
    Some((get("rchar:")?, get("wchar:")?))
}

fn thread_cpu(pid: u32, clk_tck: u64) -> std::collections::BTreeMap<String, f64> {
    let mut m = std::collections::BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return m };
    for e in dir.flatten() {
        let path = e.path();
        let Ok(stat) = std::fs::read_to_string(path.join("stat")) else { continue };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        let name = stat[open + 1..close].replace(' ', "_");
        let f: Vec<&str> = stat[close + 2..].split(' ').collect();
        let ticks = f.get(11).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0)
            + f.get(12).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
        *m.entry(name).or_insert(0.0) += ticks as f64 / clk_tck.max(1) as f64;
    }
    m
}

impl CpuMark {
    fn now(c: &Common) -> CpuMark {
        CpuMark {
            at: Instant::now(),
            server: c.server_pid.and_then(|p| cpu_seconds(&p.to_string(), c.clk_tck)),
            me: cpu_seconds("self", c.clk_tck),
            machine: machine_busy_seconds(c.clk_tck),
            io: c.server_pid.and_then(proc_io),
            threads: c.server_pid.map(|p| thread_cpu(p, c.clk_tck)).unwrap_or_default(),
        }
    }
    fn since(&self, earlier: &CpuMark) -> Value {
        let wall = self.at.duration_since(earlier.at).as_secs_f64().max(1e-9);
        let d = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a - b);
        let server = d(self.server, earlier.server);
        let me = d(self.me, earlier.me);
        let machine = d(self.machine, earlier.machine);
        let others = machine.map(|m| m - server.unwrap_or(0.0) - me.unwrap_or(0.0));
        let io = self.io.zip(earlier.io).map(|(a, b)| json!({"read_bytes": a.0 - b.0, "written_bytes": a.1 - b.1}));
        let threads: serde_json::Map<String, Value> = self
            .threads
            .iter()
            .map(|(k, v)| (k.clone(), json!(v - earlier.threads.get(k).copied().unwrap_or(0.0))))
            .filter(|(_, v)| v.as_f64().unwrap_or(0.0) > 0.0)
            .collect();
        json!({
            "server_io": io,
            "server_thread_cpu_s": threads,
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

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("histogram bounds")
}

fn us(d: Duration) -> u64 {
    (d.as_micros() as u64).clamp(1, 120_000_000)
}

fn summary(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!(null);
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

fn fmt_summary(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return "no samples".into();
    }
    format!(
        "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} samples)",
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.max() as f64 / 1000.0,
        h.len()
    )
}


#[derive(Default)]
struct Errors {
    count: AtomicU64,
    first: Mutex<Option<String>>,
}

impl Errors {
    fn add(&self, e: String) {
        self.count.fetch_add(1, Relaxed);
        let mut f = self.first.lock().unwrap();
        if f.is_none() {
            *f = Some(e);
        }
    }
    fn first(&self) -> Option<String> {
        self.first.lock().unwrap().clone()
    }
}

/// The run's unique prefix for message texts, so a stale echo of an earlier run never matches.
fn run_tag() -> String {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    format!("{:x}", t.as_nanos() & 0xffff_ffff)
}


fn post(t: &Target, body: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(
        format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            t.path,
            t.host,
            body.len()
        )
        .as_bytes(),
    );
    out.extend_from_slice(body);
}

/// A new patchbay user: `POST …/session {}` → its token.
async fn new_token(session: &Target) -> Result<String, String> {
    let mut conn = Conn::connect(session.addr).await.map_err(|e| format!("session: connect: {e}"))?;
    let mut req = Vec::new();
    post(session, b"{}", &mut req);
    let status = conn.exchange(&req).await.map_err(|e| format!("session: {e}"))?;
    let v: Value = serde_json::from_slice(&conn.body).map_err(|e| format!("session answered {status}: {e}"))?;
    v["token"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("session answered {status} without a token: {v}"))
}

/// A JSON string literal.
fn jstr(s: &str) -> String {
    Value::String(s.to_owned()).to_string()
}

// ---------------------------------------------------------------------------------------
// wsload webhook

#[allow(clippy::too_many_arguments)]
async fn webhook(
    c: Common,
    url: String,
    session_url: Option<String>,
    connections: usize,
    warmup: f64,
    duration: f64,
    max_messages: u64,
) -> Result<Value, String> {
    check_duration("warmup", warmup)?;
    check_duration("duration", duration)?;
    if duration <= 0.0 {
        return Err("--duration must be > 0".into());
    }
    if connections == 0 || connections > MAX_CONNECTIONS {
        return Err(format!("--connections must be in 1..={MAX_CONNECTIONS}"));
    }
    let max_messages = max_messages.min(MAX_MESSAGES);
    let target = Arc::new(parse_url(&url, "http://")?);
    // One user per connection: patchbay's user token, or a plain id for Botkit.
    let mut users = Vec::with_capacity(connections);
    match (c.flavor, &session_url) {
        (Flavor::Patchbay, Some(s)) => {
            let st = parse_url(s, "http://")?;
            for _ in 0..connections {
                users.push(new_token(&st).await?);
            }
        }
        (Flavor::Patchbay, None) => return Err("--flavor patchbay needs --session-url".into()),
        (Flavor::Botkit, _) => {
            for i in 0..connections {
                users.push(format!("bench-user-{i}"));
            }
        }
    }
    let tag = run_tag();
    let errors = Arc::new(Errors::default());
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(warmup);
    let deadline = measure_from + Duration::from_secs_f64(duration);
    let mut tasks = Vec::new();
    for user in users {
        let (target, errors, next, tag) = (target.clone(), errors.clone(), next.clone(), tag.clone());
        let flavor = c.flavor;
        tasks.push(tokio::spawn(async move {
            let mut h = hist();
            let mut counted = 0u64;
            let mut conn: Option<Conn> = None;
            let mut req = Vec::with_capacity(512);
            let user = jstr(&user);
            while Instant::now() < deadline {
                if conn.is_none() {
                    match Conn::connect(target.addr).await {
                        Ok(cn) => conn = Some(cn),
                        Err(e) => {
                            errors.add(format!("connect: {e}"));
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    }
                }
                let n = next.fetch_add(1, Relaxed);
                if n >= max_messages {
                    break;
                }
                let text = format!("hello {tag}-{n}");
                let body = match flavor {
                    Flavor::Patchbay => format!(r#"{{"type":"message","text":"{text}","user":{user}}}"#),
                    Flavor::Botkit => format!(r#"{{"type":"message","text":"{text}","user":{user},"channel":"webhook"}}"#),
                };
                post(&target, body.as_bytes(), &mut req);
                let expect = format!("\"echo: {text}\"");
                let cn = conn.as_mut().expect("connected");
                let t0 = Instant::now();
                match cn.exchange(&req).await {
                    Ok(200) if find(&cn.body, expect.as_bytes()).is_some() => {
                        let t1 = Instant::now();
                        if t0 >= measure_from && t1 <= deadline {
                            counted += 1;
                            let _ = h.record(us(t1 - t0));
                        }
                    }
                    Ok(status) => errors.add(format!(
                        "answered {status} without the echo: {}",
                        String::from_utf8_lossy(&cn.body[..cn.body.len().min(300)])
                    )),
                    Err(e) => {
                        errors.add(format!("request: {e}"));
                        conn = None;
                    }
                }
            }
            (h, counted)
        }));
    }
    // The CPU marks of the measured window.
    tokio::time::sleep_until(measure_from.into()).await;
    let cpu_from = CpuMark::now(&c);
    tokio::time::sleep_until(deadline.into()).await;
    let cpu_to = CpuMark::now(&c);
    let mut h = hist();
    let mut counted = 0;
    for t in tasks {
        let (th, n) = t.await.map_err(|e| e.to_string())?;
        h.add(&th).map_err(|e| e.to_string())?;
        counted += n;
    }
    let rps = counted as f64 / duration;
    let errs = errors.count.load(Relaxed);
    eprintln!(
        "webhook echo, {connections} connections: {counted} echoes in {duration:.1} s = {rps:.0} req/s, {errs} errors; latency {}",
        fmt_summary(&h)
    );
    if let Some(e) = errors.first() {
        eprintln!("first error: {e}");
    }
    Ok(json!({
        "mode": "webhook",
        "url": url,
        "connections": connections,
        "warmup_s": warmup,
        "duration_s": duration,
        "echoes": counted,
        "rps": rps,
        "errors": errs,
        "first_error": errors.first(),
        "latency": summary(&h),
        "cpu": cpu_to.since(&cpu_from),
        "server_rss_kib": c.server_pid.and_then(rss_kib),
    }))
}

// ---------------------------------------------------------------------------------------
// WebSockets

type Ws = WebSocketStream<TcpStream>;

fn ws_config() -> WebSocketConfig {
    // Small buffers: 10,000 client sockets share the machine with the server.
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(Some(1 << 20))
        .max_frame_size(Some(1 << 20))
}

/// Reads the next text frame (answering nothing itself: tungstenite queues pongs and sends
/// them on the next read or write).
async fn next_text(ws: &mut Ws) -> Result<String, String> {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await {
            Err(_) => return Err("no frame within 10 s".into()),
            Ok(None) => return Err("the server closed the socket".into()),
            Ok(Some(Err(e))) => return Err(format!("read: {e}")),
            Ok(Some(Ok(Message::Text(t)))) => return Ok(t.as_str().to_owned()),
            Ok(Some(Ok(Message::Close(f)))) => return Err(format!("the server closed the socket: {f:?}")),
            Ok(Some(Ok(_))) => continue,
        }
    }
}

/// Connects, says hello and waits until the server has read it: patchbay answers `hello`
/// (with the user's token); Botkit answers nothing, so a ping sent after the hello must come
/// back as a pong (the server reads frames in order).
async fn open_socket(target: &Target, flavor: Flavor, id: usize) -> Result<(Ws, String), String> {
    let stream = tokio::time::timeout(WAIT, TcpStream::connect(target.addr))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let url = format!("ws://{}{}", target.host, target.path);
    let (mut ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async_with_config(url, stream, Some(ws_config())))
        .await
        .map_err(|_| "handshake timed out".to_string())?
        .map_err(|e| format!("handshake: {e}"))?;
    match flavor {
        Flavor::Patchbay => {
            ws.send(Message::text(r#"{"type":"hello"}"#)).await.map_err(|e| format!("send: {e}"))?;
            loop {
                let t = next_text(&mut ws).await?;
                let v: Value = serde_json::from_str(&t).map_err(|e| format!("hello answer: {e}"))?;
                if v["type"] == "hello" {
                    let token = v["token"].as_str().ok_or("hello answer without a token")?.to_owned();
                    return Ok((ws, token));
                }
                if v["type"] == "error" || v["type"] == "disconnect" {
                    return Err(format!("hello answered {t}"));
                }
            }
        }
        Flavor::Botkit => {
            let user = format!("bench-ws-{id}");
            let hello = json!({"type": "hello", "user": user, "channel": "socket", "user_profile": null});
            ws.send(Message::text(hello.to_string())).await.map_err(|e| format!("send: {e}"))?;
            ws.send(Message::Ping(b"ready".to_vec().into())).await.map_err(|e| format!("send: {e}"))?;
            loop {
                match tokio::time::timeout(WAIT, ws.next()).await {
                    Err(_) => return Err("no pong within 10 s".into()),
                    Ok(None) => return Err("the server closed the socket".into()),
                    Ok(Some(Err(e))) => return Err(format!("read: {e}")),
                    Ok(Some(Ok(Message::Pong(_)))) => return Ok((ws, user)),
                    Ok(Some(Ok(_))) => continue,
                }
            }
        }
    }
}

/// Opens `n` sockets (ids from `first`), at most `concurrency` handshakes at once; each
/// socket is handed to `then` in its own task.
async fn open_many<F, Fut>(
    target: Arc<Target>,
    flavor: Flavor,
    first: usize,
    n: usize,
    concurrency: usize,
    errors: Arc<Errors>,
    then: F,
) -> Vec<tokio::task::JoinHandle<()>>
where
    F: Fn(usize, Ws, String) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let sem = Arc::new(Semaphore::new(concurrency.max(1)));
    let opened = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::with_capacity(n);
    for i in first..first + n {
        let permit = sem.clone().acquire_owned().await.expect("semaphore");
        let (target, errors, then, opened) = (target.clone(), errors.clone(), then.clone(), opened.clone());
        tasks.push(tokio::spawn(async move {
            let r = open_socket(&target, flavor, i).await;
            drop(permit);
            match r {
                Ok((ws, user)) => {
                    opened.fetch_add(1, Relaxed);
                    then(i, ws, user).await
                }
                Err(e) => errors.add(format!("socket {i}: {e}")),
            }
        }));
    }
    // Every handshake has finished once all permits are back.
    let _ = sem.acquire_many(concurrency.max(1) as u32).await;
    tasks
}

// ---------------------------------------------------------------------------------------
// wsload echo

#[allow(clippy::too_many_arguments)]
async fn echo(
    c: Common,
    url: String,
    sockets: usize,
    concurrency: usize,
    warmup: f64,
    duration: f64,
    max_messages: u64,
) -> Result<Value, String> {
    check_duration("warmup", warmup)?;
    check_duration("duration", duration)?;
    if duration <= 0.0 {
        return Err("--duration must be > 0".into());
    }
    if sockets == 0 || sockets > MAX_SOCKETS {
        return Err(format!("--sockets must be in 1..={MAX_SOCKETS}"));
    }
    let max_messages = max_messages.min(MAX_MESSAGES);
    let target = Arc::new(parse_url(&url, "ws://")?);
    let errors = Arc::new(Errors::default());
    let tag = run_tag();
    let next = Arc::new(AtomicU64::new(0));
    let ready = Arc::new(AtomicUsize::new(0));
    // `go` carries the start of the load; the window is derived from it.
    let (go_tx, go_rx) = watch::channel::<Option<Instant>>(None);
    let results: Arc<Mutex<(Histogram<u64>, u64)>> = Arc::new(Mutex::new((hist(), 0)));
    let rss_before = c.server_pid.and_then(rss_kib);
    let t_connect = Instant::now();
    let flavor = c.flavor;
    let task = {
        let (errors, tag, next, ready, results) = (errors.clone(), tag.clone(), next.clone(), ready.clone(), results.clone());
        move |_i: usize, mut ws: Ws, user: String| {
            let (errors, tag, next, ready, results) = (errors.clone(), tag.clone(), next.clone(), ready.clone(), results.clone());
            let mut go = go_rx.clone();
            async move {
                ready.fetch_add(1, Relaxed);
                let start = loop {
                    if let Some(s) = *go.borrow() {
                        break s;
                    }
                    if go.changed().await.is_err() {
                        return;
                    }
                };
                let measure_from = start + Duration::from_secs_f64(warmup);
                let deadline = measure_from + Duration::from_secs_f64(duration);
                let user = jstr(&user);
                let mut h = hist();
                let mut counted = 0u64;
                while Instant::now() < deadline {
                    let n = next.fetch_add(1, Relaxed);
                    if n >= max_messages {
                        break;
                    }
                    let text = format!("hello {tag}-{n}");
                    let frame = match flavor {
                        Flavor::Patchbay => format!(r#"{{"type":"message","text":"{text}","user":{user}}}"#),
                        Flavor::Botkit => format!(r#"{{"type":"message","text":"{text}","user":{user},"channel":"socket"}}"#),
                    };
                    let expect = format!("\"echo: {text}\"");
                    let t0 = Instant::now();
                    if let Err(e) = ws.send(Message::text(frame)).await {
                        errors.add(format!("send: {e}"));
                        break;
                    }
                    let got = loop {
                        match next_text(&mut ws).await {
                            Ok(t) if find(t.as_bytes(), expect.as_bytes()).is_some() => break Ok(()),
                            Ok(t) if t.contains(r#""type":"error""#) || t.contains(r#""type":"disconnect""#) => {
                                break Err(format!("answered {t}"))
                            }
                            Ok(_) => continue, // received, typing, …
                            Err(e) => break Err(e),
                        }
                    };
                    match got {
                        Ok(()) => {
                            let t1 = Instant::now();
                            if t0 >= measure_from && t1 <= deadline {
                                counted += 1;
                                let _ = h.record(us(t1 - t0));
                            }
                        }
                        Err(e) => {
                            errors.add(e);
                            break;
                        }
                    }
                }
                {
                    let mut r = results.lock().unwrap();
                    let _ = r.0.add(&h);
                    r.1 += counted;
                }
                let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
            }
        }
    };
    let tasks = open_many(target, flavor, 0, sockets, concurrency, errors.clone(), task).await;
    let connect_s = t_connect.elapsed().as_secs_f64();
    let n_ready = ready.load(Relaxed);
    eprintln!("{n_ready}/{sockets} sockets open and greeted in {connect_s:.2} s");
    if n_ready == 0 {
        return Err(format!("no socket could be opened: {}", errors.first().unwrap_or_default()));
    }
    let rss_sockets = c.server_pid.and_then(rss_kib);
    let start = Instant::now();
    let _ = go_tx.send(Some(start));
    let measure_from = start + Duration::from_secs_f64(warmup);
    let deadline = measure_from + Duration::from_secs_f64(duration);
    tokio::time::sleep_until(measure_from.into()).await;
    let cpu_from = CpuMark::now(&c);
    tokio::time::sleep_until(deadline.into()).await;
    let cpu_to = CpuMark::now(&c);
    let rss_load = c.server_pid.and_then(rss_kib);
    // Each task finishes its message in flight (≤ 10 s) and closes.
    let _ = tokio::time::timeout(Duration::from_secs(30), futures_util::future::join_all(tasks)).await;
    let (h, counted) = {
        let r = results.lock().unwrap();
        (r.0.clone(), r.1)
    };
    let mps = counted as f64 / duration;
    let errs = errors.count.load(Relaxed);
    eprintln!(
        "WebSocket echo, {n_ready} sockets: {counted} echoes in {duration:.1} s = {mps:.0} msg/s, {errs} errors; latency {}",
        fmt_summary(&h)
    );
    if let Some(e) = errors.first() {
        eprintln!("first error: {e}");
    }
    Ok(json!({
        "mode": "echo",
        "url": url,
        "sockets": sockets,
        "sockets_ready": n_ready,
        "connect_s": connect_s,
        "warmup_s": warmup,
        "duration_s": duration,
        "echoes": counted,
        "msgs_per_s": mps,
        "errors": errs,
        "first_error": errors.first(),
        "latency": summary(&h),
        "cpu": cpu_to.since(&cpu_from),
        "server_rss_kib_before": rss_before,
        "server_rss_kib_sockets_open": rss_sockets,
        "server_rss_kib_under_load": rss_load,
    }))
}

// ---------------------------------------------------------------------------------------
// wsload idle

/// The server's RSS: the median of 5 samples 200 ms apart.
async fn rss_settled(pid: Option<u32>) -> Option<u64> {
    let pid = pid?;
    let mut v = Vec::new();
    for _ in 0..5 {
        v.push(rss_kib(pid)?);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    v.sort_unstable();
    Some(v[2])
}

async fn idle(
    c: Common,
    url: String,
    steps: Vec<usize>,
    warmup_sockets: usize,
    settle: f64,
    concurrency: usize,
) -> Result<Value, String> {
    check_duration("settle", settle)?;
    if steps.is_empty() || steps.windows(2).any(|w| w[0] >= w[1]) || steps[steps.len() - 1] > MAX_SOCKETS {
        return Err(format!("--steps must ascend, up to {MAX_SOCKETS}"));
    }
    if warmup_sockets > 1000 {
        return Err("--warmup-sockets must be ≤ 1000".into());
    }
    let target = Arc::new(parse_url(&url, "ws://")?);
    let errors = Arc::new(Errors::default());
    let flavor = c.flavor;
    let settle_d = Duration::from_secs_f64(settle);
    let rss_start = rss_settled(c.server_pid).await;

    // Warm-up: open and close some sockets, so first-use allocations are in the baseline.
    let warm = {
        move |_i: usize, mut ws: Ws, _user: String| async move {
            let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
            // Wait for the server's close frame (or the end of the stream).
            let _ = tokio::time::timeout(Duration::from_secs(2), async { while let Some(Ok(_)) = ws.next().await {} }).await;
        }
    };
    let tasks = open_many(target.clone(), flavor, 0, warmup_sockets, concurrency, errors.clone(), warm).await;
    let _ = tokio::time::timeout(Duration::from_secs(30), futures_util::future::join_all(tasks)).await;
    tokio::time::sleep(settle_d).await;
    let rss_base = rss_settled(c.server_pid).await;
    let fds_base = c.server_pid.and_then(count_fds);

    // The idle sockets: each keeps reading (so the server's pings are answered) until `stop`.
    let (stop_tx, stop_rx) = watch::channel(false);
    let alive = Arc::new(AtomicUsize::new(0));
    let keep = {
        let alive = alive.clone();
        move |_i: usize, mut ws: Ws, _user: String| {
            let alive = alive.clone();
            let mut stop = stop_rx.clone();
            async move {
                alive.fetch_add(1, Relaxed);
                loop {
                    tokio::select! {
                        _ = stop.changed() => break,
                        m = ws.next() => match m {
                            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => { alive.fetch_sub(1, Relaxed); return; }
                            Some(Ok(_)) => {}
                        }
                    }
                }
                alive.fetch_sub(1, Relaxed);
                let _ = tokio::time::timeout(Duration::from_secs(5), ws.close(None)).await;
            }
        }
    };
    let mut all_tasks = Vec::new();
    let mut out_steps = Vec::new();
    let mut opened = 0usize;
    let first_id = 1_000_000;
    for &step in &steps {
        let t0 = Instant::now();
        let tasks = open_many(target.clone(), flavor, first_id + opened, step - opened, concurrency, errors.clone(), keep.clone()).await;
        all_tasks.extend(tasks);
        opened = step;
        let connect_s = t0.elapsed().as_secs_f64();
        tokio::time::sleep(settle_d).await;
        let rss = rss_settled(c.server_pid).await;
        let open_now = alive.load(Relaxed);
        let per_socket = rss.zip(rss_base).map(|(r, b)| (r as f64 - b as f64) * 1024.0 / open_now.max(1) as f64);
        eprintln!(
            "{open_now}/{step} idle sockets open (opened in {connect_s:.2} s): server RSS {} KiB (baseline {} KiB) → {} bytes per socket",
            rss.map(|x| x.to_string()).unwrap_or("n/a".into()),
            rss_base.map(|x| x.to_string()).unwrap_or("n/a".into()),
            per_socket.map(|x| format!("{x:.0}")).unwrap_or("n/a".into()),
        );
        out_steps.push(json!({
            "sockets": step,
            "open": open_now,
            "connect_s": connect_s,
            "server_rss_kib": rss,
            "server_fds": c.server_pid.and_then(count_fds),
            "bytes_per_socket": per_socket,
            "loadgen_rss_kib": status_kib("self", "VmRSS:"),
        }));
    }
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(60), futures_util::future::join_all(all_tasks)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after = c.server_pid.and_then(rss_kib);
    let errs = errors.count.load(Relaxed);
    if let Some(e) = errors.first() {
        eprintln!("{errs} errors; first: {e}");
    }
    Ok(json!({
        "mode": "idle",
        "url": url,
        "warmup_sockets": warmup_sockets,
        "server_rss_kib_start": rss_start,
        "server_rss_kib_baseline": rss_base,
        "server_fds_baseline": fds_base,
        "steps": out_steps,
        "server_rss_kib_after_close": rss_after,
        "errors": errs,
        "first_error": errors.first(),
    }))
}

fn count_fds(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}
