//! The load generator of scripts/bench.
//!
//! - `loadgen closed`: N keep-alive connections, each sending its next request as soon as the
//!   previous one is answered, for D seconds (maximum throughput). With `--metrics-url` it
//!   then waits until patchbay has delivered a reply to every acknowledged message and its
//!   queues are empty, and reports durable end-to-end messages/s. With `--receiver ADDR` it
//!   also serves patchbay's `deliver_url` there and counts the replies itself.
//! - `loadgen open`: a fixed offered rate R/s for D seconds, whatever the answers do
//!   (requests are scheduled at start + i/R; a late answer does not delay the schedule), and
//!   per-request latency in a histogram.
//!
//! Every request carries a unique event id (`--id-prefix` + a sequence number), a
//! conversation out of `--conversations`, and the text `hello <n>` (which the echo assistant
//! answers `echo: hello <n>`, so the receiver knows which message a reply answers).
//!
//! `--scenario` picks the request and what counts as a good answer:
//! - `loopback` (default): `{"id","conversation","text"}`, answered 200 `"accepted":true`;
//! - `mattermost-inline`: a Mattermost outgoing webhook (JSON, the twelve fields, Mattermost's
//!   headers; `post_id` unique, `channel_id` the conversation, text `@bot hello <n>`), answered
//!   200 with `"text":"echo: hello <n>"` in the body (patchbay's inline reply mode);
//! - `mattermost-incoming`: the same request, answered 200 with an empty body (incoming-webhook
//!   reply mode); with `--receiver` the replies arrive as Mattermost incoming-webhook posts
//!   (`{"text","channel"}`), answered `200 text/plain ok` as Mattermost does, and each is checked
//!   to go to the channel its message came from.
//!
//! Everything is bounded: the duration (≤ 120 s), the request count (≤ 10 M), the drain wait
//! (≤ 600 s), each request (10 s timeout); and only loopback addresses are accepted.
//!
//! The last line of output is `RESULT {json}` for scripts/bench.

#[path = "../http1.rs"]
mod http1;

use clap::{Args, Parser, Subcommand};
use http1::{find, header_value, Conn, MAX_RESPONSE_BYTES, REQUEST_TIMEOUT};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MAX_DURATION_SECS: f64 = 120.0;
const MAX_REQUESTS: u64 = 10_000_000;
const MAX_CONNECTIONS: usize = 1024;
const MAX_DRAIN_SECS: f64 = 600.0;

#[derive(Parser)]
#[command(about = "HTTP load generator for scripts/bench (127.0.0.1 only)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Closed loop: maximum throughput with N connections for D seconds.
    Closed {
        #[command(flatten)]
        common: Common,
        /// patchbay's /metrics: after the load, wait until every acknowledged message has a
        /// delivered reply and the queues are empty, and report end-to-end messages/s.
        #[arg(long)]
        metrics_url: Option<String>,
    },
    /// Open loop: a fixed offered rate R/s for D seconds, with per-request latency.
    Open {
        #[command(flatten)]
        common: Common,
        /// Requests per second offered.
        #[arg(long)]
        rate: f64,
        /// patchbay's /metrics, to report the queue depths after the run (and, with
        /// --receiver, to wait for the queues to drain).
        #[arg(long)]
        metrics_url: Option<String>,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
enum Scenario {
    Loopback,
    MattermostInline,
    MattermostIncoming,
}

#[derive(Args, Clone)]
struct Common {
    /// The URL to POST to: http://127.0.0.1:PORT/path.
    #[arg(long)]
    url: String,
    /// Keep-alive connections.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Seconds of load.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// At most this many requests.
    #[arg(long, default_value_t = 2_000_000)]
    max_requests: u64,
    /// Messages are spread round-robin over this many conversations.
    #[arg(long, default_value_t = 1000)]
    conversations: u64,
    /// Event ids are `<prefix>-<n>`; the default is unique per run.
    #[arg(long)]
    id_prefix: Option<String>,
    /// Threads of the generator's runtime.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// The server's pid, to report its CPU time and memory during the run.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Kernel clock ticks per second (`getconf CLK_TCK`), for /proc/PID/stat.
    #[arg(long, default_value_t = 100)]
    clk_tck: u64,
    /// The request's shape and the answer expected (see the top of this file).
    #[arg(long, value_enum, default_value = "loopback")]
    scenario: Scenario,
    /// The Mattermost outgoing webhook token sent in the body.
    #[arg(long, default_value = "rgfe9bc9j3gste59mbyrmzk33w")]
    token: String,
    /// The channel whose `patchbay_replies_delivered_total` counts the replies.
    #[arg(long, default_value = "bench")]
    channel: String,
    /// Serve patchbay's deliver_url (or a Mattermost incoming webhook) on this address
    /// (127.0.0.1:PORT) and count the replies. In open mode, also wait for them all.
    #[arg(long)]
    receiver: Option<String>,
    /// With --receiver: the path replies must be POSTed to (others are counted as wrong).
    #[arg(long)]
    receiver_path: Option<String>,
    /// The longest wait for the queues to drain, in seconds.
    #[arg(long, default_value_t = 300.0)]
    drain_timeout: f64,
}

fn main() {
    let cli = Cli::parse();
    let threads = match &cli.cmd {
        Cmd::Closed { common, .. } | Cmd::Open { common, .. } => common.threads.clamp(1, 16),
    };
    let rt = if threads == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()
    }
    .expect("tokio runtime");
    let result = rt.block_on(async move {
        match cli.cmd {
            Cmd::Closed { common, metrics_url } => closed(common, metrics_url).await,
            Cmd::Open { common, rate, metrics_url } => open(common, rate, metrics_url).await,
        }
    });
    match result {
        Ok(v) => println!("RESULT {v}"),
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::exit(1);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Targets and the HTTP/1.1 client.

#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    host: String,
    path: String,
}

fn parse_url(url: &str) -> Result<Target, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// URLs are supported"))?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = hostport
        .rsplit_once(':')
        .ok_or_else(|| format!("{url}: give an explicit port"))?;
    let ip = match host {
        "localhost" | "127.0.0.1" => std::net::Ipv4Addr::LOCALHOST,
        _ => return Err(format!("{url}: only 127.0.0.1 may be targeted")),
    };
    let port: u16 = port.parse().map_err(|_| format!("{url}: bad port"))?;
    Ok(Target {
        addr: SocketAddr::from((ip, port)),
        host: hostport.to_owned(),
        path: path.to_owned(),
    })
}

fn loopback_addr(s: &str) -> Result<SocketAddr, String> {
    let a: SocketAddr = s.parse().map_err(|e| format!("{s}: {e}"))?;
    if !a.ip().is_loopback() {
        return Err(format!("{s}: only loopback addresses are allowed"));
    }
    Ok(a)
}


fn get_request(t: &Target) -> Vec<u8> {
    format!("GET {} HTTP/1.1\r\nHost: {}\r\nAccept: */*\r\n\r\n", t.path, t.host).into_bytes()
}

struct Gen {
    target: Target,
    prefix: String,
    conversations: u64,
    scenario: Scenario,
    token: String,
    /// Ten lowercase letters/digits derived from the prefix: the run's part of a post_id.
    tag: String,
}

/// Lowercase base-36 digits of `v`, left-padded with zeros to `width`.
fn base36(mut v: u64, width: usize) -> String {
    let digits = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    while v > 0 {
        out.push(digits[(v % 36) as usize]);
        v /= 36;
    }
    while out.len() < width {
        out.push(b'0');
    }
    out.reverse();
    String::from_utf8(out).expect("ascii")
}

/// The Mattermost channel (id, name) of conversation k: 26-character ids, like Mattermost's.
fn mm_channel(k: u64) -> (String, String) {
    (format!("benchchannel{k:014}"), format!("channel-{k}"))
}

impl Gen {
    fn new(c: &Common) -> Result<Gen, String> {
        let prefix = prefix(c);
        // FNV-1a of the prefix: post ids differ between runs with different prefixes.
        let mut h: u64 = 0xcbf29ce484222325;
        for b in prefix.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x100000001b3);
        }
        let tag: String = base36(h, 13).chars().rev().take(10).collect();
        Ok(Gen {
            target: parse_url(&c.url)?,
            prefix,
            conversations: c.conversations,
            scenario: c.scenario,
            token: c.token.clone(),
            tag,
        })
    }

    fn request(&self, idx: u64, out: &mut Vec<u8>) {
        use std::io::Write;
        let k = idx % self.conversations.max(1);
        out.clear();
        if self.scenario == Scenario::Loopback {
            let body = format!(r#"{{"id":"{}-{idx}","conversation":"conv-{k}","text":"hello {idx}"}}"#, self.prefix);
            let _ = write!(
                out,
                "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                self.target.path,
                self.target.host,
                body.len()
            );
            return;
        }
        // A Mattermost outgoing webhook, JSON encoding, as Mattermost sends it.
        let (channel_id, channel_name) = mm_channel(k);
        let ts = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis();
        let body = format!(
            concat!(
                r#"{{"token":"{}","team_id":"en76g45etjn98c6eyubfptn16o","team_domain":"acme","#,
                r#""channel_id":"{}","channel_name":"{}","timestamp":{},"user_id":"a6khpd5m77d3de46xw599mp8by","#,
                r#""user_name":"alice","post_id":"{}{}","text":"@bot hello {}","trigger_word":"@bot","file_ids":""}}"#
            ),
            self.token,
            channel_id,
            channel_name,
            ts,
            self.tag,
            base36(idx, 16),
            idx
        );
        let _ = write!(
            out,
            "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: Mattermost-Bot/1.1\r\nContent-Type: application/json\r\nAccept: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.target.path,
            self.target.host,
            body.len()
        );
    }

    /// Checks one answer; Ok(true) when the server called it a duplicate.
    fn check(&self, idx: u64, status: u16, body: &[u8]) -> Result<bool, String> {
        let ok = status == 200
            && match self.scenario {
                Scenario::Loopback => find(body, b"\"accepted\":true").is_some(),
                Scenario::MattermostInline => find(body, format!("\"text\":\"echo: hello {idx}\"").as_bytes()).is_some(),
                Scenario::MattermostIncoming => body.is_empty(),
            };
        if ok {
            Ok(self.scenario == Scenario::Loopback && find(body, b"\"duplicate\":true").is_some())
        } else {
            Err(format!("answered {status}: {:?}", String::from_utf8_lossy(&body[..body.len().min(200)])))
        }
    }
}

// ---------------------------------------------------------------------------------------
// Measurements.

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("histogram bounds")
}

/// Microsecond histogram as JSON.
fn summary(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!({"count": 0});
    }
    json!({
        "count": h.len(),
        "mean_us": h.mean().round(),
        "p50_us": h.value_at_quantile(0.50),
        "p90_us": h.value_at_quantile(0.90),
        "p99_us": h.value_at_quantile(0.99),
        "p999_us": h.value_at_quantile(0.999),
        "max_us": h.max(),
    })
}

fn fmt_summary(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return "no samples".into();
    }
    let ms = |v: u64| v as f64 / 1000.0;
    format!(
        "p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms (n={})",
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.9)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.999)),
        ms(h.max()),
        h.len()
    )
}

fn us(d: Duration) -> u64 {
    (d.as_micros() as u64).clamp(1, 120_000_000)
}

/// CPU seconds (user + system) of a process, from /proc/PID/stat.
fn cpu_seconds(pid: &str, clk_tck: u64) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // Fields 14 and 15 of proc(5); `rest` starts at field 3.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / clk_tck.max(1) as f64)
}

fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// CPU of the server and of this generator between two points in time.
#[derive(Clone, Copy)]
struct CpuMark {
    at: Instant,
    server: Option<f64>,
    me: Option<f64>,
    /// Busy CPU seconds of the whole machine (every process), from /proc/stat.
    machine: Option<f64>,
}

/// Busy (non-idle, non-iowait) CPU seconds of the whole machine since boot.
fn machine_busy_seconds(clk_tck: u64) -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal ...
    let busy: u64 = v.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, x)| x).sum();
    Some(busy as f64 / clk_tck.max(1) as f64)
}

impl CpuMark {
    fn now(c: &Common) -> CpuMark {
        CpuMark {
            at: Instant::now(),
            server: c.server_pid.and_then(|p| cpu_seconds(&p.to_string(), c.clk_tck)),
            me: cpu_seconds("self", c.clk_tck),
            machine: machine_busy_seconds(c.clk_tck),
        }
    }
    fn since(&self, earlier: &CpuMark) -> Value {
        let wall = self.at.duration_since(earlier.at).as_secs_f64();
        let d = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a - b);
        let server = d(self.server, earlier.server);
        let me = d(self.me, earlier.me);
        let machine = d(self.machine, earlier.machine);
        // What other processes (builds, tests) took meanwhile: noise in the figures.
        let others = machine.map(|m| m - server.unwrap_or(0.0) - me.unwrap_or(0.0));
        json!({
            "machine_busy_cores": machine.map(|s| s / wall.max(1e-9)),
            "other_processes_cores": others.map(|s| (s / wall.max(1e-9)).max(0.0)),
            "wall_s": wall,
            "server_cpu_s": server,
            "server_cores": server.map(|s| s / wall.max(1e-9)),
            "loadgen_cpu_s": me,
            "loadgen_cores": me.map(|s| s / wall.max(1e-9)),
        })
    }
}

// ---------------------------------------------------------------------------------------
// patchbay's /metrics.

#[derive(Default, Debug, Clone, Copy)]
struct Sample {
    delivered: u64,
    acknowledged: u64,
    inbox: u64,
    outbox: u64,
    dead: u64,
}

struct MetricsClient {
    target: Target,
    channel: String,
    conn: Option<Conn>,
}

impl MetricsClient {
    async fn sample(&mut self) -> Result<Sample, String> {
        if self.conn.is_none() {
            self.conn = Some(Conn::connect(self.target.addr).await.map_err(|e| format!("metrics: {e}"))?);
        }
        let conn = self.conn.as_mut().expect("connected");
        let status = match conn.exchange(&get_request(&self.target)).await {
            Ok(s) => s,
            Err(e) => {
                self.conn = None;
                return Err(format!("metrics: {e}"));
            }
        };
        if status != 200 {
            return Err(format!("metrics answered {status}"));
        }
        let text = String::from_utf8_lossy(&conn.body);
        let mut s = Sample::default();
        let delivered = format!("patchbay_replies_delivered_total{{channel=\"{}\"}} ", self.channel);
        let acked = format!("patchbay_messages_acknowledged_total{{channel=\"{}\"}} ", self.channel);
        for line in text.lines() {
            let val = |p: &str| line.strip_prefix(p).and_then(|v| v.trim().parse::<f64>().ok()).map(|v| v as u64);
            if let Some(v) = val(&delivered) {
                s.delivered = v;
            } else if let Some(v) = val(&acked) {
                s.acknowledged = v;
            } else if let Some(v) = val("patchbay_queue_depth{queue=\"inbox\"} ") {
                s.inbox = v;
            } else if let Some(v) = val("patchbay_queue_depth{queue=\"outbox\"} ") {
                s.outbox = v;
            } else if let Some(v) = val("patchbay_queue_depth{queue=\"dead_letters\"} ") {
                s.dead = v;
            }
        }
        Ok(s)
    }
}

// ---------------------------------------------------------------------------------------
// The receiver for patchbay's deliver_url.

struct Receiver {
    start: Instant,
    /// Send time of message n, in ns since `start`, plus one (0: not sent).
    sent_at: Vec<AtomicU64>,
    /// How many replies message n got.
    seen: Vec<AtomicU8>,
    replies: AtomicU64,
    unique: AtomicU64,
    repeats: AtomicU64,
    unparsed: AtomicU64,
    /// Mattermost: replies whose `channel` is not the channel their message came from.
    misrouted: AtomicU64,
    /// Requests to another path than --receiver-path.
    wrong_path: AtomicU64,
    latency: Mutex<Histogram<u64>>,
    scenario: Scenario,
    conversations: u64,
    path: Option<String>,
}

impl Receiver {
    fn new(start: Instant, capacity: u64, c: &Common) -> Receiver {
        Receiver {
            start,
            sent_at: (0..capacity).map(|_| AtomicU64::new(0)).collect(),
            seen: (0..capacity).map(|_| AtomicU8::new(0)).collect(),
            replies: AtomicU64::new(0),
            unique: AtomicU64::new(0),
            repeats: AtomicU64::new(0),
            unparsed: AtomicU64::new(0),
            misrouted: AtomicU64::new(0),
            wrong_path: AtomicU64::new(0),
            latency: Mutex::new(hist()),
            scenario: c.scenario,
            conversations: c.conversations.max(1),
            path: c.receiver_path.clone(),
        }
    }

    fn summary(&self) -> Value {
        json!({
            "replies": self.replies.load(Relaxed),
            "unique": self.unique.load(Relaxed),
            "repeats": self.repeats.load(Relaxed),
            "unparsed": self.unparsed.load(Relaxed),
            "misrouted": self.misrouted.load(Relaxed),
            "wrong_path": self.wrong_path.load(Relaxed),
            "latency": summary(&self.latency.lock().unwrap()),
        })
    }

    fn log(&self) {
        eprintln!(
            "receiver: {} replies, {} repeats, {} unparsed, {} misrouted, {} to a wrong path; message sent → reply received {}",
            self.replies.load(Relaxed),
            self.repeats.load(Relaxed),
            self.unparsed.load(Relaxed),
            self.misrouted.load(Relaxed),
            self.wrong_path.load(Relaxed),
            fmt_summary(&self.latency.lock().unwrap())
        );
    }

    fn record_send(&self, idx: u64) {
        if let Some(slot) = self.sent_at.get(idx as usize) {
            slot.store(self.start.elapsed().as_nanos() as u64 + 1, Relaxed);
        }
    }

    fn record_reply(&self, body: &[u8]) {
        self.replies.fetch_add(1, Relaxed);
        let marker = b"echo: hello ";
        let Some(at) = find(body, marker) else {
            self.unparsed.fetch_add(1, Relaxed);
            return;
        };
        let digits: String = body[at + marker.len()..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .map(|&b| b as char)
            .collect();
        let Some(idx) = digits.parse::<usize>().ok().filter(|&i| i < self.seen.len()) else {
            self.unparsed.fetch_add(1, Relaxed);
            return;
        };
        if self.scenario != Scenario::Loopback {
            let (_, name) = mm_channel(idx as u64 % self.conversations);
            if find(body, format!("\"channel\":\"{name}\"").as_bytes()).is_none() {
                self.misrouted.fetch_add(1, Relaxed);
            }
        }
        if self.seen[idx].fetch_add(1, Relaxed) == 0 {
            self.unique.fetch_add(1, Relaxed);
            let sent = self.sent_at[idx].load(Relaxed);
            if sent > 0 {
                let now = self.start.elapsed().as_nanos() as u64 + 1;
                let lat = Duration::from_nanos(now.saturating_sub(sent));
                let _ = self.latency.lock().unwrap().record(us(lat));
            }
        } else {
            self.repeats.fetch_add(1, Relaxed);
        }
    }
}

async fn serve_receiver(listener: TcpListener, r: Arc<Receiver>, stop: Arc<AtomicBool>) {
    while !stop.load(Relaxed) {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
        };
        let Ok((stream, _)) = accepted else { continue };
        let _ = stream.set_nodelay(true);
        let r = r.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let _ = receiver_conn(stream, r, stop).await;
        });
    }
}

async fn receiver_conn(mut stream: TcpStream, r: Arc<Receiver>, stop: Arc<AtomicBool>) -> std::io::Result<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
    // A Mattermost incoming webhook answers 200 `text/plain` `ok`.
    let ok: &[u8] = if r.scenario == Scenario::Loopback {
        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
    } else {
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"
    };
    loop {
        // Parse every complete request in the buffer.
        while let Some(hend) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..hend]).into_owned();
            let cl: usize = header_value(&head, "content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
            if buf.len() < hend + 4 + cl {
                break;
            }
            if head.starts_with("POST ") {
                r.record_reply(&buf[hend + 4..hend + 4 + cl]);
            }
            if let Some(p) = &r.path {
                if head.split(' ').nth(1) != Some(p.as_str()) {
                    r.wrong_path.fetch_add(1, Relaxed);
                }
            }
            buf.drain(..hend + 4 + cl);
            stream.write_all(ok).await?;
        }
        if buf.len() > MAX_RESPONSE_BYTES {
            return Ok(());
        }
        let n = tokio::select! {
            n = stream.read_buf(&mut buf) => n?,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                if stop.load(Relaxed) { return Ok(()) }
                continue;
            }
        };
        if n == 0 {
            return Ok(());
        }
    }
}

// ---------------------------------------------------------------------------------------
// The load loops.

fn validate(c: &Common) -> Result<(), String> {
    if !(c.duration > 0.0 && c.duration <= MAX_DURATION_SECS) {
        return Err(format!("--duration must be in (0, {MAX_DURATION_SECS}]"));
    }
    if c.connections == 0 || c.connections > MAX_CONNECTIONS {
        return Err(format!("--connections must be in [1, {MAX_CONNECTIONS}]"));
    }
    if c.max_requests == 0 || c.max_requests > MAX_REQUESTS {
        return Err(format!("--max-requests must be in [1, {MAX_REQUESTS}]"));
    }
    if !(c.drain_timeout > 0.0 && c.drain_timeout <= MAX_DRAIN_SECS) {
        return Err(format!("--drain-timeout must be in (0, {MAX_DRAIN_SECS}]"));
    }
    if c.conversations == 0 {
        return Err("--conversations must be at least 1".into());
    }
    Ok(())
}

fn prefix(c: &Common) -> String {
    c.id_prefix.clone().unwrap_or_else(|| {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        format!("lg{}", t.as_nanos())
    })
}

#[derive(Default)]
struct Counters {
    ok: AtomicU64,
    duplicates: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Counters {
    fn error(&self, e: String) {
        self.errors.fetch_add(1, Relaxed);
        let mut f = self.first_error.lock().unwrap();
        if f.is_none() {
            *f = Some(e);
        }
    }

    /// Counts one answer, as `gen` judges it (see `Gen::check`).
    fn answer(&self, gen: &Gen, idx: u64, status: u16, body: &[u8]) -> bool {
        match gen.check(idx, status, body) {
            Ok(dup) => {
                if dup {
                    self.duplicates.fetch_add(1, Relaxed);
                }
                self.ok.fetch_add(1, Relaxed);
                true
            }
            Err(e) => {
                self.error(e);
                false
            }
        }
    }
}

/// Starts the receiver when --receiver is given.
async fn start_receiver(c: &Common, start: Instant, capacity: u64, stop: &Arc<AtomicBool>) -> Result<Option<Arc<Receiver>>, String> {
    match &c.receiver {
        Some(a) => {
            let listener = TcpListener::bind(loopback_addr(a)?).await.map_err(|e| format!("receiver {a}: {e}"))?;
            let r = Arc::new(Receiver::new(start, capacity, c));
            tokio::spawn(serve_receiver(listener, r.clone(), stop.clone()));
            Ok(Some(r))
        }
        None => Ok(None),
    }
}

async fn closed(c: Common, metrics_url: Option<String>) -> Result<Value, String> {
    validate(&c)?;
    let drain_timeout = c.drain_timeout;
    let gen = Arc::new(Gen::new(&c)?);
    let mut metrics = match &metrics_url {
        Some(u) => Some(MetricsClient { target: parse_url(u)?, channel: c.channel.clone(), conn: None }),
        None => None,
    };
    let start = Instant::now();
    let stop_receiver = Arc::new(AtomicBool::new(false));
    let recv = start_receiver(&c, start, c.max_requests, &stop_receiver).await?;
    let base = match metrics.as_mut() {
        Some(m) => Some(m.sample().await?),
        None => None,
    };

    let counters = Arc::new(Counters::default());
    let next = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(c.duration);
    let load_start = CpuMark::now(&c);
    let mut tasks = Vec::new();
    for _ in 0..c.connections {
        let (gen, counters, next, recv) = (gen.clone(), counters.clone(), next.clone(), recv.clone());
        let max = c.max_requests;
        tasks.push(tokio::spawn(async move {
            let mut h = hist();
            let mut conn: Option<Conn> = None;
            let mut req = Vec::with_capacity(512);
            while Instant::now() < deadline {
                if conn.is_none() {
                    match Conn::connect(gen.target.addr).await {
                        Ok(cn) => conn = Some(cn),
                        Err(e) => {
                            counters.error(format!("connect: {e}"));
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    }
                }
                let idx = next.fetch_add(1, Relaxed);
                if idx >= max {
                    break;
                }
                gen.request(idx, &mut req);
                if let Some(r) = &recv {
                    r.record_send(idx);
                }
                let cn = conn.as_mut().expect("connected");
                let t0 = Instant::now();
                match cn.exchange(&req).await {
                    Ok(status) => {
                        if counters.answer(&gen, idx, status, &cn.body) {
                            let _ = h.record(us(t0.elapsed()));
                        }
                    }
                    Err(e) => {
                        counters.error(format!("request: {e}"));
                        conn = None;
                    }
                }
            }
            h
        }));
    }

    // One line a second while the load runs.
    let mut timeline = Vec::new();
    let mut last = (Instant::now(), 0u64, base.map(|b| b.delivered).unwrap_or(0), load_start);
    let mut sampler = tokio::time::interval(Duration::from_secs(1));
    sampler.tick().await;
    while Instant::now() < deadline {
        tokio::select! {
            _ = sampler.tick() => {}
            _ = tokio::time::sleep_until(deadline.into()) => break,
        }
        let line = tick_line(&c, &counters, metrics.as_mut(), start, &mut last).await;
        eprintln!("{}", line.0);
        timeline.push(line.1);
    }
    let mut h = hist();
    for t in tasks {
        let th = t.await.map_err(|e| e.to_string())?;
        h.add(&th).map_err(|e| e.to_string())?;
    }
    let load_end = CpuMark::now(&c);
    let load_s = load_end.at.duration_since(load_start.at).as_secs_f64();
    let ok = counters.ok.load(Relaxed);
    let dups = counters.duplicates.load(Relaxed);
    let errors = counters.errors.load(Relaxed);
    eprintln!(
        "closed loop: {ok} accepted ({dups} duplicates), {errors} errors in {load_s:.2} s = {:.0} req/s; latency {}",
        ok as f64 / load_s,
        fmt_summary(&h)
    );
    let server_rss_after_load = c.server_pid.and_then(rss_mib);
    let mut out = json!({
        "mode": "closed",
        "url": c.url,
        "connections": c.connections,
        "conversations": c.conversations,
        "load_s": load_s,
        "accepted": ok,
        "duplicates": dups,
        "errors": errors,
        "first_error": counters.first_error.lock().unwrap().clone(),
        "rps": ok as f64 / load_s,
        "latency": summary(&h),
        "cpu_load": load_end.since(&load_start),
        "server_rss_mib_after_load": server_rss_after_load,
    });

    // Drain: wait until every acknowledged message has its reply and the queues are empty.
    if metrics.is_some() || recv.is_some() {
        let expect = ok - dups;
        let drain_deadline = Instant::now() + Duration::from_secs_f64(drain_timeout);
        let mut drained = false;
        let mut final_sample = None;
        let mut next_line = Instant::now() + Duration::from_secs(1);
        loop {
            let s = match metrics.as_mut() {
                Some(m) => Some(m.sample().await?),
                None => None,
            };
            let delivered_ok = match (&recv, s, base) {
                (Some(r), _, _) => r.unique.load(Relaxed) >= expect,
                (None, Some(s), Some(b)) => s.delivered.saturating_sub(b.delivered) >= expect,
                _ => true,
            };
            let queues_empty = s.map(|s| s.inbox == 0 && s.outbox == 0).unwrap_or(true);
            final_sample = s.or(final_sample);
            if delivered_ok && queues_empty {
                drained = true;
                break;
            }
            if Instant::now() >= drain_deadline {
                break;
            }
            if Instant::now() >= next_line {
                next_line += Duration::from_secs(1);
                let line = tick_line(&c, &counters, None, start, &mut last).await;
                let s = s.unwrap_or_default();
                let delivered = match &recv {
                    Some(r) => r.unique.load(Relaxed),
                    None => s.delivered.saturating_sub(base.map(|b| b.delivered).unwrap_or(0)),
                };
                eprintln!("{}  draining: delivered {delivered}/{expect}, inbox {}, outbox {}", line.0, s.inbox, s.outbox);
                let mut v = line.1;
                v["delivered"] = json!(delivered);
                v["inbox"] = json!(s.inbox);
                v["outbox"] = json!(s.outbox);
                timeline.push(v);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let drain_end = CpuMark::now(&c);
        let total_s = drain_end.at.duration_since(load_start.at).as_secs_f64();
        let drain_s = drain_end.at.duration_since(load_end.at).as_secs_f64();
        let delivered = match (&recv, final_sample, base) {
            (Some(r), _, _) => r.unique.load(Relaxed),
            (None, Some(s), Some(b)) => s.delivered.saturating_sub(b.delivered),
            _ => 0,
        };
        let mut e2e = json!({
            "drained": drained,
            "expected": expect,
            "delivered": delivered,
            "drain_s": drain_s,
            "total_s": total_s,
            "msgs_per_s": delivered as f64 / total_s,
            "cpu_drain": drain_end.since(&load_end),
            "cpu_total": drain_end.since(&load_start),
            "final_queues": final_sample.map(|s| json!({"inbox": s.inbox, "outbox": s.outbox, "dead_letters": s.dead})),
            "server_rss_mib_after_drain": c.server_pid.and_then(rss_mib),
        });
        if let Some(r) = &recv {
            stop_receiver.store(true, Relaxed);
            e2e["receiver"] = r.summary();
            r.log();
        }
        eprintln!(
            "end to end: {delivered}/{expect} replies delivered {} in {total_s:.2} s ({drain_s:.2} s after the load) = {:.0} msg/s",
            if drained { "and queues empty" } else { "— NOT DRAINED before the timeout" },
            delivered as f64 / total_s
        );
        out["e2e"] = e2e;
    }
    out["timeline"] = json!(timeline);
    Ok(out)
}

/// One progress line: acks/s (and, with metrics, delivered/s and queue depths) since the
/// last line, plus the server's CPU and RSS.
async fn tick_line(
    c: &Common,
    counters: &Counters,
    metrics: Option<&mut MetricsClient>,
    start: Instant,
    last: &mut (Instant, u64, u64, CpuMark),
) -> (String, Value) {
    let now = Instant::now();
    let dt = now.duration_since(last.0).as_secs_f64().max(1e-9);
    let ok = counters.ok.load(Relaxed);
    let ack_rate = (ok - last.1) as f64 / dt;
    let mark = CpuMark::now(c);
    let cpu = mark.since(&last.3);
    let rss = c.server_pid.and_then(rss_mib);
    let mut v = json!({
        "t_s": now.duration_since(start).as_secs_f64(),
        "acks_per_s": ack_rate,
        "server_cores": cpu["server_cores"],
        "loadgen_cores": cpu["loadgen_cores"],
        "other_processes_cores": cpu["other_processes_cores"],
        "server_rss_mib": rss,
    });
    let mut line = format!(
        "t={:6.1}s acks/s {:8.0}",
        now.duration_since(start).as_secs_f64(),
        ack_rate
    );
    if let Some(m) = metrics {
        if let Ok(s) = m.sample().await {
            let rate = (s.delivered.saturating_sub(last.2)) as f64 / dt;
            line += &format!("  delivered/s {rate:8.0}  inbox {:7}  outbox {:7}", s.inbox, s.outbox);
            v["delivered_per_s"] = json!(rate);
            v["inbox"] = json!(s.inbox);
            v["outbox"] = json!(s.outbox);
            last.2 = s.delivered;
        }
    }
    if let Some(sc) = cpu["server_cores"].as_f64() {
        line += &format!("  server CPU {:4.0}%", sc * 100.0);
    }
    if let Some(lc) = cpu["loadgen_cores"].as_f64() {
        line += &format!("  loadgen CPU {:4.0}%", lc * 100.0);
    }
    if let Some(oc) = cpu["other_processes_cores"].as_f64() {
        line += &format!("  others CPU {:4.0}%", oc * 100.0);
    }
    if let Some(r) = rss {
        line += &format!("  server RSS {r:.1} MiB");
    }
    *last = (now, ok, last.2, mark);
    (line, v)
}

async fn open(c: Common, rate: f64, metrics_url: Option<String>) -> Result<Value, String> {
    validate(&c)?;
    if !(rate > 0.0 && rate <= 1_000_000.0) {
        return Err("--rate must be in (0, 1000000]".into());
    }
    let gen = Arc::new(Gen::new(&c)?);
    let total = ((rate * c.duration).round() as u64).min(c.max_requests);
    let mut metrics = match &metrics_url {
        Some(u) => Some(MetricsClient { target: parse_url(u)?, channel: c.channel.clone(), conn: None }),
        None => None,
    };
    let stop_receiver = Arc::new(AtomicBool::new(false));
    let recv = start_receiver(&c, Instant::now(), total, &stop_receiver).await?;
    let base = match (&recv, metrics.as_mut()) {
        (Some(_), Some(m)) => Some(m.sample().await?),
        _ => None,
    };
    let counters = Arc::new(Counters::default());
    let next = Arc::new(AtomicU64::new(0));
    // Connect first, so connection setup is not in the first latencies.
    let mut conns = Vec::new();
    for _ in 0..c.connections {
        conns.push(Conn::connect(gen.target.addr).await.map_err(|e| format!("connect: {e}"))?);
    }
    let start = Instant::now() + Duration::from_millis(50);
    let hard_stop = start + Duration::from_secs_f64(c.duration) + REQUEST_TIMEOUT;
    let load_start = CpuMark::now(&c);
    let mut tasks = Vec::new();
    for cn in conns {
        let (gen, counters, next, recv) = (gen.clone(), counters.clone(), next.clone(), recv.clone());
        tasks.push(tokio::spawn(async move {
            let (mut service, mut corrected, mut lag) = (hist(), hist(), hist());
            let mut conn = Some(cn);
            let mut req = Vec::with_capacity(512);
            loop {
                let idx = next.fetch_add(1, Relaxed);
                if idx >= total || Instant::now() >= hard_stop {
                    break;
                }
                let intended = start + Duration::from_secs_f64(idx as f64 / rate);
                tokio::time::sleep_until(intended.into()).await;
                gen.request(idx, &mut req);
                if conn.is_none() {
                    match Conn::connect(gen.target.addr).await {
                        Ok(cn) => conn = Some(cn),
                        Err(e) => {
                            counters.error(format!("connect: {e}"));
                            continue;
                        }
                    }
                }
                if let Some(r) = &recv {
                    r.record_send(idx);
                }
                let cn = conn.as_mut().expect("connected");
                let t0 = Instant::now();
                let _ = lag.record(us(t0.saturating_duration_since(intended)));
                match cn.exchange(&req).await {
                    Ok(status) => {
                        if counters.answer(&gen, idx, status, &cn.body) {
                            let done = Instant::now();
                            let _ = service.record(us(done - t0));
                            let _ = corrected.record(us(done.saturating_duration_since(intended)));
                        }
                    }
                    Err(e) => {
                        counters.error(format!("request: {e}"));
                        conn = None;
                    }
                }
            }
            (service, corrected, lag)
        }));
    }
    let (mut service, mut corrected, mut lag) = (hist(), hist(), hist());
    for t in tasks {
        let (s, co, l) = t.await.map_err(|e| e.to_string())?;
        service.add(&s).map_err(|e| e.to_string())?;
        corrected.add(&co).map_err(|e| e.to_string())?;
        lag.add(&l).map_err(|e| e.to_string())?;
    }
    let end = CpuMark::now(&c);
    let elapsed = end.at.duration_since(start).as_secs_f64();
    let ok = counters.ok.load(Relaxed);
    eprintln!(
        "open loop at {rate:.0}/s: {ok}/{total} accepted, {} errors in {elapsed:.2} s ({:.0}/s achieved)",
        counters.errors.load(Relaxed),
        ok as f64 / elapsed
    );
    eprintln!("  latency (request written → answer read): {}", fmt_summary(&service));
    eprintln!("  latency from the scheduled send time:    {}", fmt_summary(&corrected));
    eprintln!("  send lag behind schedule:                {}", fmt_summary(&lag));
    let after = match metrics.as_mut() {
        Some(m) => m.sample().await.ok().map(|s| json!({"inbox": s.inbox, "outbox": s.outbox, "dead_letters": s.dead})),
        None => None,
    };
    // With a receiver: wait until every accepted message has its reply (and, with metrics,
    // the queues are empty), and report messages/s from the first send to the last reply.
    let e2e = match &recv {
        Some(r) => {
            let expect = ok - counters.duplicates.load(Relaxed);
            let drain_deadline = Instant::now() + Duration::from_secs_f64(c.drain_timeout);
            let mut next_line = Instant::now() + Duration::from_secs(1);
            let mut drained = false;
            let mut last = None;
            loop {
                let s = match metrics.as_mut() {
                    Some(m) => Some(m.sample().await?),
                    None => None,
                };
                last = s.or(last);
                let queues_empty = s.map(|s| s.inbox == 0 && s.outbox == 0).unwrap_or(true);
                if r.unique.load(Relaxed) >= expect && queues_empty {
                    drained = true;
                    break;
                }
                if Instant::now() >= drain_deadline {
                    break;
                }
                if Instant::now() >= next_line {
                    next_line += Duration::from_secs(1);
                    let s = s.unwrap_or_default();
                    eprintln!("draining: delivered {}/{expect}, inbox {}, outbox {}", r.unique.load(Relaxed), s.inbox, s.outbox);
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            stop_receiver.store(true, Relaxed);
            let drain_end = CpuMark::now(&c);
            let total_s = drain_end.at.duration_since(start).as_secs_f64();
            let delivered = r.unique.load(Relaxed);
            r.log();
            eprintln!(
                "end to end: {delivered}/{expect} replies delivered {} in {total_s:.2} s = {:.0} msg/s",
                if drained { "and queues empty" } else { "— NOT DRAINED before the timeout" },
                delivered as f64 / total_s
            );
            let delivered_metric = match (last, base) {
                (Some(s), Some(b)) => Some(s.delivered.saturating_sub(b.delivered)),
                _ => None,
            };
            Some(json!({
                "drained": drained,
                "expected": expect,
                "delivered": delivered,
                "delivered_metric": delivered_metric,
                "drain_s": drain_end.at.duration_since(end.at).as_secs_f64(),
                "total_s": total_s,
                "msgs_per_s": delivered as f64 / total_s,
                "cpu_total": drain_end.since(&load_start),
                "final_queues": last.map(|s| json!({"inbox": s.inbox, "outbox": s.outbox, "dead_letters": s.dead})),
                "receiver": r.summary(),
            }))
        }
        None => None,
    };
    Ok(json!({
        "e2e": e2e,
        "mode": "open",
        "url": c.url,
        "rate": rate,
        "connections": c.connections,
        "conversations": c.conversations,
        "offered": total,
        "accepted": ok,
        "duplicates": counters.duplicates.load(Relaxed),
        "errors": counters.errors.load(Relaxed),
        "first_error": counters.first_error.lock().unwrap().clone(),
        "elapsed_s": elapsed,
        "achieved_rps": ok as f64 / elapsed,
        "latency": summary(&service),
        "latency_from_schedule": summary(&corrected),
        "send_lag": summary(&lag),
        "cpu": end.since(&load_start),
        "queues_after": after,
        "server_rss_mib_after": c.server_pid.and_then(rss_mib),
    }))
}
