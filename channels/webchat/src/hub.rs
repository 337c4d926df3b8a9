//! The live sockets of one web chat channel: at most one per conversation (per user). A
//! second socket takes over and the first is told why (Direct Line's `collision`).

use serde_json::Value;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::future::Future;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

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
///
/// The queue is a `VecDeque` that is empty, holding no allocation, while the socket idles
/// (a bounded tokio channel would allocate a block of 32 slots up front for every socket).
#[derive(Clone)]
pub struct SocketTx(Arc<Queue>);

/// The socket's side of its queue.
pub struct SocketRx(Arc<Queue>);

#[derive(Default)]
struct Queue {
    state: Mutex<QueueState>,
}

#[derive(Default)]
struct QueueState {
    items: VecDeque<Push>,
    /// Why the socket must close, when its queue had no room to say so.
    kick: Option<(&'static str, &'static str)>,
    /// The socket is gone.
    closed: bool,
    /// The socket's task, when it waits for a push. (A waker slot rather than a `Notify`:
    /// waiting on a `Notify` puts a waiter node in every idle socket's task.)
    waiter: Option<Waker>,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl SocketTx {
    pub fn new() -> (SocketTx, SocketRx) {
        let q = Arc::new(Queue::default());
        (SocketTx(q.clone()), SocketRx(q))
    }

    /// Queues `push`; false when the socket is gone. A full queue drops a typing
    /// indicator, and for anything else tells the socket to close.
    fn push(&self, push: Push) -> bool {
        let mut s = self.0.lock();
        if s.closed {
            return false;
        }
        if s.items.len() < SOCKET_QUEUE {
            s.items.push_back(push);
        } else {
            let (reason, message) = match push {
                Push::Typing => return true,
                Push::Close { reason, message } => (reason, message),
                Push::Logged(..) => {
                    ("too_slow", "replies came faster than this client read them; reconnect to receive the rest")
                }
            };
            // A collision says more than "too slow": keep it.
            if s.kick.is_none() || reason != "too_slow" {
                s.kick = Some((reason, message));
            }
        }
        let waiter = s.waiter.take();
        drop(s);
        if let Some(w) = waiter {
            w.wake();
        }
        true
    }
}

impl SocketRx {
    /// The next push; a kick comes before what is queued. Only the socket's own task waits.
    pub fn recv(&self) -> impl Future<Output = Push> + '_ {
        std::future::poll_fn(move |cx| {
            let mut s = self.0.lock();
            match Self::pop(&mut s) {
                Some(p) => Poll::Ready(p),
                None => {
                    // Registered under the lock a push takes: a push cannot slip in between.
                    if !s.waiter.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                        s.waiter = Some(cx.waker().clone());
                    }
                    Poll::Pending
                }
            }
        })
    }

    #[cfg(test)]
    fn try_recv(&self) -> Option<Push> {
        Self::pop(&mut self.0.lock())
    }

    fn pop(s: &mut QueueState) -> Option<Push> {
        if let Some((reason, message)) = s.kick.take() {
            return Some(Push::Close { reason, message });
        }
        let p = s.items.pop_front();
        if s.items.is_empty() && s.items.capacity() > 8 {
            // A burst's memory is not kept by an idle socket.
            s.items = VecDeque::new();
        }
        p
    }
}

impl Drop for SocketRx {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.closed = true;
        s.items = VecDeque::new();
        s.waiter = None;
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
        let (tx, rx) = SocketTx::new();
        hub.attach("u", tx, Duration::from_secs(60));
        for seq in 1..=SOCKET_QUEUE as i64 {
            assert!(hub.push("u", Push::Logged(seq, Value::Null)));
        }
        assert!(rx.0.lock().kick.is_none(), "room for a full queue");
        // No room: a typing indicator is dropped, a reply tells the socket to close (the
        // reply is in the log and is replayed on reconnect).
        assert!(hub.push("u", Push::Typing));
        assert!(rx.0.lock().kick.is_none());
        assert!(hub.push("u", Push::Logged(999, Value::Null)));
        assert_eq!(rx.0.lock().kick.map(|k| k.0), Some("too_slow"));
        // A collision is said even through a full queue, and wins over "too slow".
        hub.push("u", Push::Logged(1000, Value::Null));
        let (tx2, _rx2) = SocketTx::new();
        hub.attach("u", tx2, Duration::from_secs(60));
        // The socket hears the kick first; what was queued is still there, in order.
        assert!(matches!(rx.try_recv(), Some(Push::Close { reason: "collision", .. })));
        assert!(matches!(rx.try_recv(), Some(Push::Logged(1, _))));
    }

    #[test]
    fn an_idle_queue_holds_no_allocation() {
        let (tx, rx) = SocketTx::new();
        assert_eq!(rx.0.lock().items.capacity(), 0);
        for seq in 0..100 {
            tx.push(Push::Logged(seq, Value::Null));
        }
        while rx.try_recv().is_some() {}
        assert_eq!(rx.0.lock().items.capacity(), 0, "a burst's memory is given back");
    }

    #[test]
    fn a_gone_socket_is_not_live() {
        let hub = Hub::default();
        let (tx, rx) = SocketTx::new();
        hub.attach("u", tx, Duration::from_secs(60));
        drop(rx);
        assert!(!hub.push("u", Push::Typing));
        assert!(!hub.push("nobody", Push::Typing));
    }
}
