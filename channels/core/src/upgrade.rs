//! Taking a connection out of the HTTP server once it said `101 Switching Protocols`.
//!
//! actix-web keeps an upgraded connection inside its HTTP/1 dispatcher, with the dispatcher's
//! read and write buffers and state, for as long as the socket is open: about 13 KB per idle
//! WebSocket before any protocol state. patchbay's server (`src/server.rs`) instead hands the
//! bare TCP stream to the hook that accepted the upgrade, which then holds only what its
//! protocol needs while the socket is idle.
//!
//! How a hook takes a connection:
//! - the server puts [`HandOver`] into the extensions of every request whose connection it
//!   can hand over (requests with `Upgrade: websocket`);
//! - the hook answers `101` with a [`TakeOver`] in the response's extensions;
//! - the server writes the response, then runs the `TakeOver` with the [`Upgraded`]
//!   connection, on the worker thread that accepted it. Any other answer is written as usual.

use futures_util::future::LocalBoxFuture;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// In a request's extensions: this server can hand the connection over after a `101`.
#[derive(Clone, Copy, Debug)]
pub struct HandOver;

/// A connection taken out of the HTTP server.
pub struct Upgraded {
    pub io: TcpStream,
    /// What the client sent after its request, already read by the server (usually nothing).
    pub buffered: Vec<u8>,
    /// Cancelled when the service shuts down: the connection should say goodbye and end.
    pub stop: CancellationToken,
}

/// In a `101` response's extensions: what runs the connection once the response is written.
pub struct TakeOver(Box<dyn FnOnce(Upgraded) -> LocalBoxFuture<'static, ()>>);

impl TakeOver {
    pub fn new(run: impl FnOnce(Upgraded) -> LocalBoxFuture<'static, ()> + 'static) -> Self {
        TakeOver(Box::new(run))
    }

    pub fn run(self, conn: Upgraded) -> LocalBoxFuture<'static, ()> {
        (self.0)(conn)
    }
}
