//! A minimal HTTP/1.1 keep-alive client (content-length or chunked answers), shared by the
//! `loadgen` and `wsload` binaries (each includes it with `#[path]`).

use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The longest one connect or one request/answer may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest answer read before giving up on the connection.
pub const MAX_RESPONSE_BYTES: usize = 16 << 20;

pub struct Conn {
    pub stream: TcpStream,
    pub buf: Vec<u8>,
    pub body: Vec<u8>,
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

pub fn header_value<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").skip(1).find_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Decodes a complete chunked body from `data`; None while incomplete.
pub fn dechunk(data: &[u8], out: &mut Vec<u8>) -> Result<Option<usize>, String> {
    out.clear();
    let mut pos = 0;
    loop {
        let Some(eol) = find(&data[pos..], b"\r\n") else { return Ok(None) };
        let line = std::str::from_utf8(&data[pos..pos + eol]).map_err(|_| "bad chunk size")?;
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("bad chunk size {line:?}"))?;
        pos += eol + 2;
        if size == 0 {
            // Trailers end with an empty line.
            let Some(end) = find(&data[pos..], b"\r\n") else { return Ok(None) };
            return Ok(Some(pos + end + 2));
        }
        if data.len() < pos + size + 2 {
            return Ok(None);
        }
        out.extend_from_slice(&data[pos..pos + size]);
        pos += size + 2;
    }
}

impl Conn {
    pub async fn connect(addr: SocketAddr) -> std::io::Result<Conn> {
        let stream = tokio::time::timeout(REQUEST_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| std::io::Error::other("connect timed out"))??;
        stream.set_nodelay(true)?;
        Ok(Conn { stream, buf: Vec::with_capacity(16 * 1024), body: Vec::with_capacity(1024) })
    }

    /// Writes one request and reads its response: the status; the body is in `self.body`.
    pub async fn exchange(&mut self, request: &[u8]) -> std::io::Result<u16> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.exchange_inner(request))
            .await
            .map_err(|_| std::io::Error::other("request timed out"))?
    }

    async fn exchange_inner(&mut self, request: &[u8]) -> std::io::Result<u16> {
        let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
        self.stream.write_all(request).await?;
        loop {
            if let Some(hend) = find(&self.buf, b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buf[..hend]).map_err(|_| bad("non-UTF-8 header".into()))?;
                let status: u16 = head
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| bad(format!("bad status line in {head:?}")))?;
                let start = hend + 4;
                if let Some(cl) = header_value(head, "content-length") {
                    let cl: usize = cl.parse().map_err(|_| bad("bad content-length".into()))?;
                    if self.buf.len() >= start + cl {
                        self.body.clear();
                        self.body.extend_from_slice(&self.buf[start..start + cl]);
                        self.buf.drain(..start + cl);
                        return Ok(status);
                    }
                } else if header_value(head, "transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
                    if let Some(used) = dechunk(&self.buf[start..], &mut self.body).map_err(bad)? {
                        self.buf.drain(..start + used);
                        return Ok(status);
                    }
                } else {
                    // No body (e.g. 204).
                    self.body.clear();
                    self.buf.drain(..start);
                    return Ok(status);
                }
            }
            if self.buf.len() > MAX_RESPONSE_BYTES {
                return Err(bad("response too large".into()));
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed"));
            }
        }
    }
}
