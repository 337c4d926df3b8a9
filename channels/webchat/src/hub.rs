//! The live sockets of one web chat channel: at most one per conversation (per user). A
//! second socket takes over and the first is told why (Direct Line's `collision`).

use serde_json::Value;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
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

struct Live {
    conn: u64,
    tx: mpsc::UnboundedSender<Push>,
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
    pub fn attach(&self, user: &str, tx: mpsc::UnboundedSender<Push>, window: Duration) -> Attached {
        let conn = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let previous = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(user.to_owned(), Live { conn, tx });
        let closed = self.closed.lock().unwrap_or_else(|p| p.into_inner()).remove(user);
        let recently = closed.is_some_and(|(at, _)| at.elapsed() <= window);
        if let Some(prev) = &previous {
            let _ = prev.tx.send(Push::Close {
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
        live.get(user).is_some_and(|l| l.tx.send(push).is_ok())
    }

    /// Tells every socket to close; each detaches itself (and is remembered as recently
    /// closed, so it comes back as `reconnect`).
    pub fn close_all(&self, reason: &'static str, message: &'static str) {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        for l in live.values() {
            let _ = l.tx.send(Push::Close { reason, message });
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
