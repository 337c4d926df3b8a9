//! A real forwarding HTTP proxy for the tests, the way a corporate proxy works: `CONNECT
//! host:port` tunnels (HTTPS) and absolute-form requests (`GET http://host/path`, plain HTTP),
//! both behind Basic proxy authentication (`Proxy-Authorization`), answering `407` with
//! `Proxy-Authenticate` to wrong or missing credentials.
//!
//! It resolves host names from its own table only: the tests give patchbay host names that
//! exist nowhere else (`pod.symphony.test`, a reserved TLD), so a request that bypassed the
//! proxy could not reach anything. Every request that reached it is recorded ([`Passed`]).
//! Absolute-form requests are forwarded with `Via: 1.1 patchbay-test-proxy` and
//! `Connection: close` (one request per upstream connection keeps the relay a plain copy).
#![allow(dead_code)]

use base64::Engine;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const VIA: &str = "1.1 patchbay-test-proxy";

/// One request that reached the proxy.
#[derive(Clone, Debug, PartialEq)]
pub struct Passed {
    /// `CONNECT`, `GET`, `POST`, …
    pub method: String,
    /// `host:port` for CONNECT, the absolute URL otherwise.
    pub target: String,
    /// The credentials were right.
    pub authorized: bool,
    /// What the proxy answered itself (407, 502), or 0 when it forwarded.
    pub refused_with: u16,
}

pub struct Proxy {
    pub port: u16,
    log: Arc<Mutex<Vec<Passed>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Config {
    routes: HashMap<String, u16>,
    credentials: Option<String>,
}

impl Proxy {
    /// Starts on 127.0.0.1. `routes`: host name → local port it is served on. `credentials`:
    /// (user, password) the proxy demands.
    pub async fn start(routes: &[(&str, u16)], credentials: Option<(&str, &str)>) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().unwrap().port();
        let config = Arc::new(Config {
            routes: routes.iter().map(|(h, p)| (h.to_ascii_lowercase(), *p)).collect(),
            credentials: credentials
                .map(|(u, p)| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}")))),
        });
        let log: Arc<Mutex<Vec<Passed>>> = Arc::default();
        let log2 = log.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else { continue };
                let (config, log) = (config.clone(), log2.clone());
                tokio::spawn(async move {
                    let _ = serve(socket, &config, &log).await;
                });
            }
        });
        Proxy { port, log, task }
    }

    pub fn passed(&self) -> Vec<Passed> {
        self.log.lock().unwrap().clone()
    }

    pub fn clear(&self) {
        self.log.lock().unwrap().clear();
    }
}

/// Reads up to the end of a request head; answers (head, bytes read past it).
async fn read_head(socket: &mut TcpStream) -> std::io::Result<Option<(String, Vec<u8>)>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
            return Ok(Some((head, buf[end + 4..].to_vec())));
        }
        if buf.len() > 64 * 1024 {
            return Ok(None);
        }
        let n = socket.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

async fn refuse(socket: &mut TcpStream, status: &str, extra: &str) -> std::io::Result<()> {
    let resp = format!("HTTP/1.1 {status}\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n");
    socket.write_all(resp.as_bytes()).await?;
    socket.shutdown().await
}

async fn serve(mut socket: TcpStream, config: &Config, log: &Mutex<Vec<Passed>>) -> std::io::Result<()> {
    let Some((head, rest)) = read_head(&mut socket).await? else { return Ok(()) };
    let mut words = head.lines().next().unwrap_or_default().split_whitespace();
    let (method, target) = (words.next().unwrap_or_default().to_owned(), words.next().unwrap_or_default().to_owned());
    let authorized = match &config.credentials {
        None => true,
        Some(want) => header(&head, "proxy-authorization").is_some_and(|got| got == want),
    };
    let record = |refused_with: u16| {
        log.lock().unwrap().push(Passed { method: method.clone(), target: target.clone(), authorized, refused_with });
    };
    if !authorized {
        record(407);
        return refuse(&mut socket, "407 Proxy Authentication Required", "Proxy-Authenticate: Basic realm=\"corp\"\r\n").await;
    }
    if method == "CONNECT" {
        let host = target.rsplit_once(':').map(|(h, _)| h).unwrap_or(&target).to_ascii_lowercase();
        let Some(port) = config.routes.get(&host) else {
            record(502);
            return refuse(&mut socket, "502 Bad Gateway", "").await;
        };
        let mut upstream = TcpStream::connect(("127.0.0.1", *port)).await?;
        record(0);
        socket.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").await?;
        if !rest.is_empty() {
            upstream.write_all(&rest).await?;
        }
        let _ = tokio::io::copy_bidirectional(&mut socket, &mut upstream).await;
        return Ok(());
    }
    // Absolute form: http://host[:port]/path?query
    let Some(after) = target.strip_prefix("http://") else {
        record(400);
        return refuse(&mut socket, "400 Bad Request", "").await;
    };
    let (authority, path) = after.find('/').map(|i| (&after[..i], &after[i..])).unwrap_or((after, "/"));
    let host = authority.rsplit_once(':').map(|(h, _)| h).unwrap_or(authority).to_ascii_lowercase();
    let Some(port) = config.routes.get(&host) else {
        record(502);
        return refuse(&mut socket, "502 Bad Gateway", "").await;
    };
    let mut upstream = TcpStream::connect(("127.0.0.1", *port)).await?;
    record(0);
    let version = head.lines().next().and_then(|l| l.split_whitespace().nth(2)).unwrap_or("HTTP/1.1");
    let mut out = format!("{method} {path} {version}\r\n");
    for line in head.lines().skip(1).filter(|l| !l.is_empty()) {
        let name = line.split(':').next().unwrap_or_default().trim().to_ascii_lowercase();
        if matches!(name.as_str(), "proxy-authorization" | "proxy-connection" | "connection" | "keep-alive") {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str(&format!("Via: {VIA}\r\nConnection: close\r\n\r\n"));
    upstream.write_all(out.as_bytes()).await?;
    upstream.write_all(&rest).await?;
    let _ = tokio::io::copy_bidirectional(&mut socket, &mut upstream).await;
    Ok(())
}
