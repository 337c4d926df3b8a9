//! One WebSocket connection on a bare TCP stream (RFC 6455, server side), held as lean as an
//! idle socket can be: no read or write buffer is kept between frames.
//!
//! The connection comes out of the HTTP server after the `101` (see
//! `patchbay_channel_core::upgrade`). Reading waits for the socket to be readable and then
//! reads what is there into a buffer that exists only while a frame is incomplete; writing
//! encodes one frame and writes it out directly. Frames are parsed and encoded by actix-http's
//! WebSocket codec (the one actix-ws used; its state is a few flags and the size limit);
//! fragmented messages are assembled here, up to the same limit.

use actix_http::ws::{CloseCode, CloseReason, Codec, Frame, Item, OpCode, Parser, ProtocolError};
use bytes::{Bytes, BytesMut};
use std::future::Future;
use std::io;
use std::task::Poll;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::Decoder;

/// How much is read at once. Most client frames are far smaller; a larger frame grows the
/// buffer to its size while it arrives.
const READ_CHUNK: usize = 4096;
/// How long a closing connection waits for the client's side of the close handshake.
const LINGER: Duration = Duration::from_secs(2);

/// A complete message (or control frame) from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    Text(Bytes),
    Binary,
    Ping(Bytes),
    Pong,
    Close,
}

#[derive(Debug)]
pub enum ReadError {
    /// The client went away without a close frame.
    Gone,
    /// Not WebSocket, or past the size limit: the connection must end with this code.
    Protocol(CloseCode, String),
}

pub struct Conn {
    io: TcpStream,
    codec: Codec,
    limit: usize,
    /// The bytes of a frame not complete yet. Empty, and then holding no allocation, between
    /// frames.
    pending: BytesMut,
    /// A fragmented message being assembled (rare, so kept out of line): whether it is text,
    /// and its bytes so far.
    partial: Option<Box<(bool, BytesMut)>>,
    /// A write failed or was given up (timed out) part way: the stream may end inside a
    /// frame, so nothing more may be written to it, not even a close frame.
    broken: bool,
}

impl Conn {
    /// `buffered`: what the client sent after its upgrade request and the server already read.
    /// Frames (and fragmented messages) larger than `limit` end the connection (1009).
    pub fn new(io: TcpStream, buffered: Vec<u8>, limit: usize) -> Conn {
        Conn {
            io,
            codec: Codec::new().max_size(limit),
            limit,
            pending: BytesMut::from(&buffered[..]),
            partial: None,
            broken: false,
        }
    }

    /// The next message. Cancel-safe: what was read stays in `self` until a message is
    /// complete, so this can be one branch of a `select!`.
    pub fn next(&mut self) -> impl Future<Output = Result<Incoming, ReadError>> + '_ {
        // Waits through the stream's own read-readiness slot (this task is its only reader),
        // not a `readable()` future: that one carries a waiter node, 150 bytes more in every
        // idle socket's task.
        std::future::poll_fn(move |cx| loop {
            match self.try_next() {
                Ok(Some(m)) => return Poll::Ready(Ok(m)),
                Ok(None) => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
            match self.io.poll_read_ready(cx) {
                Poll::Ready(Ok(())) => continue,
                Poll::Ready(Err(_)) => return Poll::Ready(Err(ReadError::Gone)),
                Poll::Pending => return Poll::Pending,
            }
        })
    }

    /// A complete message from what has arrived, reading without waiting; None when more
    /// must arrive first.
    fn try_next(&mut self) -> Result<Option<Incoming>, ReadError> {
        loop {
            if !self.pending.is_empty() {
                // The codec would wait for a whole frame before looking at its size: a length
                // past the limit is refused as soon as the frame's head is here, before its
                // payload is buffered.
                let continuation = self.pending[0] & 0x0f == 0;
                let assembled = match &self.partial {
                    Some(p) if continuation => p.1.len() as u64,
                    _ => 0,
                };
                if announced_len(&self.pending).is_some_and(|n| n.saturating_add(assembled) > self.limit as u64) {
                    return Err(protocol(ProtocolError::Overflow));
                }
                let frame = self.codec.decode(&mut self.pending).map_err(protocol)?;
                if self.pending.is_empty() {
                    // Give the buffer back (a decoded frame may still share it until dropped).
                    self.pending = BytesMut::new();
                }
                if let Some(frame) = frame {
                    match self.assemble(frame)? {
                        Some(m) => return Ok(Some(m)),
                        None => continue,
                    }
                }
            }
            self.pending.reserve(READ_CHUNK);
            match self.io.try_read_buf(&mut self.pending) {
                Ok(0) => return Err(ReadError::Gone),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.pending.is_empty() {
                        self.pending = BytesMut::new();
                    }
                    return Ok(None);
                }
                Err(_) => return Err(ReadError::Gone),
            }
        }
    }

    /// Joins fragments into one message, within the same limit as a single frame.
    fn assemble(&mut self, frame: Frame) -> Result<Option<Incoming>, ReadError> {
        let (first, start, last) = match frame {
            Frame::Text(b) => return utf8(b).map(Some),
            Frame::Binary(_) => return Ok(Some(Incoming::Binary)),
            Frame::Ping(b) => return Ok(Some(Incoming::Ping(b))),
            Frame::Pong(_) => return Ok(Some(Incoming::Pong)),
            Frame::Close(_) => return Ok(Some(Incoming::Close)),
            Frame::Continuation(Item::FirstText(b)) => (Some(true), b, false),
            Frame::Continuation(Item::FirstBinary(b)) => (Some(false), b, false),
            Frame::Continuation(Item::Continue(b)) => (None, b, false),
            Frame::Continuation(Item::Last(b)) => (None, b, true),
        };
        // The codec refuses a continuation without a first fragment, and a second first one.
        let part = match first {
            Some(is_text) => self.partial.insert(Box::new((is_text, BytesMut::new()))),
            None => self.partial.as_mut().ok_or_else(|| protocol(ProtocolError::ContinuationNotStarted))?,
        };
        if part.1.len() + start.len() > self.limit {
            self.partial = None;
            return Err(protocol(ProtocolError::Overflow));
        }
        part.1.extend_from_slice(&start);
        if !last {
            return Ok(None);
        }
        let Some(part) = self.partial.take() else { return Ok(None) };
        let (is_text, bytes) = *part;
        if is_text {
            utf8(bytes.freeze()).map(Some)
        } else {
            Ok(Some(Incoming::Binary))
        }
    }

    pub async fn send_text(&mut self, text: &str) -> io::Result<()> {
        self.send(text.as_bytes(), OpCode::Text).await
    }

    pub async fn send_ping(&mut self) -> io::Result<()> {
        self.send(b"", OpCode::Ping).await
    }

    pub async fn send_pong(&mut self, payload: &[u8]) -> io::Result<()> {
        self.send(payload, OpCode::Pong).await
    }

    async fn send(&mut self, payload: &[u8], op: OpCode) -> io::Result<()> {
        if self.broken {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        // One buffer per frame, gone once written: nothing is kept while the socket idles.
        let mut buf = BytesMut::with_capacity(payload.len() + 10);
        Parser::write_message(&mut buf, payload, op, true, false);
        // Cleared only when the whole frame is out; a timeout drops this future part way.
        self.broken = true;
        self.io.write_all(&buf).await?;
        self.broken = false;
        Ok(())
    }

    /// Ends the connection: the close frame (unless the client is gone), the end of our side,
    /// then, for at most [`LINGER`], whatever the client still sends until it closes its side.
    /// Closing with unread input would make the kernel reset the connection, and a reset can
    /// make the client drop frames it had not read yet (the `disconnect` saying why).
    /// `frame`: None when the client is gone (nothing can be sent), else the close frame's
    /// reason, if any.
    pub async fn close(mut self, frame: Option<Option<CloseReason>>, write_timeout: Duration) {
        if let (Some(reason), false) = (frame, self.broken) {
            let mut buf = BytesMut::new();
            Parser::write_close(&mut buf, reason, false);
            if tokio::time::timeout(write_timeout, self.io.write_all(&buf)).await.is_err() {
                return;
            }
        }
        let _ = self.io.shutdown().await;
        let _ = tokio::time::timeout(LINGER, async {
            let mut scratch = vec![0u8; 512];
            while let Ok(n) = self.io.read(&mut scratch).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
    }
}

/// The payload length a frame's head announces (RFC 6455 5.2), once the head has arrived.
fn announced_len(b: &[u8]) -> Option<u64> {
    match *b.get(1)? & 0x7f {
        126 => Some(u16::from_be_bytes(b.get(2..4)?.try_into().ok()?) as u64),
        127 => Some(u64::from_be_bytes(b.get(2..10)?.try_into().ok()?)),
        n => Some(n as u64),
    }
}

fn utf8(bytes: Bytes) -> Result<Incoming, ReadError> {
    match std::str::from_utf8(&bytes) {
        Ok(_) => Ok(Incoming::Text(bytes)),
        Err(_) => Err(ReadError::Protocol(CloseCode::Invalid, "a text frame that is not UTF-8".into())),
    }
}

fn protocol(e: ProtocolError) -> ReadError {
    let code = if matches!(e, ProtocolError::Overflow) { CloseCode::Size } else { CloseCode::Protocol };
    ReadError::Protocol(code, e.to_string())
}
