//! The live sockets of one web chat channel: at most one per conversation (per user). A
//! second socket takes over and the first is told why (Direct Line's `collision`).

use serde_json::Value;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// What `send` and friends hand a live socket.
#[derive(Debug)]
pub enum Push {
    /// A logged entry, with its sequence number and the frame to send (`seq` included).
    Logged(i64, Value),
    Typing,
    /// Close the socket, telling the client why.
    Close { reason: &'static str, message: &'static str },
}

/// How many pushes a socket may have waiting. A client that reads slower than its replies
/// come is disconnected (`too_slow`) rather than buffered without bound: every reply is in
/// the conversation's log, so the client's reconnect replays what it missed.
pub const SOCKET_QUEUE: usize = 256;

/// The sending side of one socket's queue.
#[derive(Clone)]
pub struct SocketTx {
    tx: mpsc::Sender<Push>,
    kick: Arc<Kick>,
}

/// Why a socket must close when its queue had no room to say so.
#[derive(Default)]
pub struct Kick {
    why: Mutex<Option<(&'static str, &'static str)>>,
    pub notify: tokio::sync::Notify,
}

impl Kick {
    /// The reason given, if the socket was told to close.
    pub fn take(&self) -> Option<(&'static str, &'static str)> {
        self.why.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    fn set(&self, reason: &'static str, message: &'static str) {
        let mut why = self.why.lock().unwrap_or_else(|p| p.into_inner());
        // A collision says more than "too slow": keep it.
        if why.is_none() || reason != "too_slow" {
            *why = Some((reason, message));
        }
        self.notify.notify_one();
    }
}

impl SocketTx {
    pub fn new() -> (SocketTx, mpsc::Receiver<Push>, Arc<Kick>) {
        let (tx, rx) = mpsc::channel(SOCKET_QUEUE);
        let kick = Arc::new(Kick::default());
        (SocketTx { tx, kick: kick.clone() }, rx, kick)
    }

    /// Queues `push`; false when the socket is gone. A full queue drops a typing
    /// indicator, and for anything else tells the socket to close.
    fn push(&self, push: Push) -> bool {
        match self.tx.try_send(push) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Closed(_)) => false,
            Err(mpsc::error::TrySendError::Full(Push::Typing)) => true,
            Err(mpsc::error::TrySendError::Full(Push::Close { reason, message })) => {
                self.kick.set(reason, message);
                true
            }
            Err(mpsc::error::TrySendError::Full(Push::Logged(..))) => {
                self.kick.set("too_slow", "replies came faster than this client read them; reconnect to receive the rest");
                true
            }
        }
    }
}

struct Live {
    conn: u64,
    tx: SocketTx,
}

/// How a socket attached.
pub struct Attached {
    pub conn: u64,
    /// Another socket of this conversation was live (and has been told to close) or closed
    /// within the reconnect window.
    pub resumed: bool,
    /// The last sequence number written to the conversation's previous socket, when this
    /// process remembers it (for clients that send no watermark).
    pub last_delivered: Option<i64>,
}

#[derive(Default)]
pub struct Hub {
    live: Mutex<HashMap<String, Live>>,
    /// user → (when its last socket closed, the last seq written to it).
    closed: Mutex<HashMap<String, (Instant, i64)>>,
    next: AtomicU64,
}

impl Hub {
    pub fn attach(&self, user: &str, tx: SocketTx, window: Duration) -> Attached {
        let conn = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let previous = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(user.to_owned(), Live { conn, tx });
        let closed = self.closed.lock().unwrap_or_else(|p| p.into_inner()).remove(user);
        let recently = closed.is_some_and(|(at, _)| at.elapsed() <= window);
        if let Some(prev) = &previous {
            prev.tx.push(Push::Close {
                reason: "collision",
                message: "this conversation was opened in another window or tab",
            });
        }
        Attached {
            conn,
            resumed: previous.is_some() || recently,
            last_delivered: closed.map(|(_, seq)| seq),
        }
    }

    /// Forgets the socket, if it is still the conversation's live one.
    pub fn detach(&self, user: &str, conn: u64, last_delivered: i64) {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        if live.get(user).is_some_and(|l| l.conn == conn) {
            live.remove(user);
            drop(live);
            self.closed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(user.to_owned(), (Instant::now(), last_delivered));
        }
    }

    /// Hands `push` to the conversation's live socket; false when there is none.
    pub fn push(&self, user: &str, push: Push) -> bool {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.get(user).is_some_and(|l| l.tx.push(push))
    }

    /// Tells every socket to close; each detaches itself (and is remembered as recently
    /// closed, so it comes back as `reconnect`).
    pub fn close_all(&self, reason: &'static str, message: &'static str) {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        for l in live.values() {
            l.tx.push(Push::Close { reason, message });
        }
    }

    pub fn count(&self) -> usize {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Drops the memory of sockets closed longer ago than `window`.
    pub fn forget_closed(&self, window: Duration) {
        self.closed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, (at, _)| at.elapsed() <= window);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_closes_the_socket_instead_of_growing() {
        let hub = Hub::default();
        let (tx, mut rx, kick) = SocketTx::new();
        hub.attach("u", tx, Duration::from_secs(60));
        for seq in 1..=SOCKET_QUEUE as i64 {
            assert!(hub.push("u", Push::Logged(seq, Value::Null)));
        }
        assert!(kick.take().is_none(), "room for a full queue");
        // No room: a typing indicator is dropped, a reply tells the socket to close (the
        // reply is in the log and is replayed on reconnect).
        assert!(hub.push("u", Push::Typing));
        assert!(kick.take().is_none());
        assert!(hub.push("u", Push::Logged(999, Value::Null)));
        assert_eq!(kick.take().map(|k| k.0), Some("too_slow"));
        // A collision is said even through a full queue, and wins over "too slow".
        hub.push("u", Push::Logged(1000, Value::Null));
        let (tx2, _rx2, _kick2) = SocketTx::new();
        hub.attach("u", tx2, Duration::from_secs(60));
        assert_eq!(kick.take().map(|k| k.0), Some("collision"));
        // What was queued is still there, in order.
        assert!(matches!(rx.try_recv(), Ok(Push::Logged(1, _))));
    }

    #[test]
    fn a_gone_socket_is_not_live() {
        let hub = Hub::default();
        let (tx, rx, _kick) = SocketTx::new();
        hub.attach("u", tx, Duration::from_secs(60));
        drop(rx);
        assert!(!hub.push("u", Push::Typing));
        assert!(!hub.push("nobody", Push::Typing));
    }
}
