//! The durable pipeline: inbox → dispatcher → assistant → outbox → channel send.
//!
//! - A kind hands a message to [`Pipeline`] (its [`Inbox`]); it is committed (deduped on the
//!   platform's event id) before the kind acknowledges it to the platform.
//! - The [`dispatcher`] claims inbox rows with a lease, asks the assistant, and in one commit
//!   removes the message and queues its replies in the outbox.
//! - The [`sender`] claims outbox rows and delivers them through the channel's kind.
//! - Failures are retried with exponential backoff and jitter (honouring Retry-After) until
//!   `max_attempts`, then dead-lettered with the reason.
//!
//! Order within a conversation comes from the store's claim rule (no row is claimed while an
//! earlier row of its conversation is queued); conversations run concurrently.

pub mod dispatcher;
pub mod sender;

use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::store::{ChainClaim, Claim, InboxItem, NewInbox, PutClaim, Store};
use async_trait::async_trait;
use patchbay_channel_core::{
    backoff::Backoff, Accepted, ChannelId, ConversationId, Inbound, Inbox, InboxError, WaitOutcome,
};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, Notify, Semaphore};
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug)]
pub struct PipelineSettings {
    pub dedupe_window: Duration,
    pub lease: Duration,
    pub concurrency: usize,
    pub claim_batch: usize,
    pub max_attempts: u32,
    pub backoff: Backoff,
    pub poll_interval: Duration,
}

impl PipelineSettings {
    pub fn from_config(p: &crate::config::PipelineConfig) -> Self {
        PipelineSettings {
            dedupe_window: Duration::from_secs(p.dedupe_window_secs),
            lease: Duration::from_secs(p.lease_secs),
            concurrency: p.concurrency,
            claim_batch: p.claim_batch,
            max_attempts: p.max_attempts,
            backoff: Backoff {
                initial: Duration::from_millis(p.retry_initial_ms),
                max: Duration::from_millis(p.retry_max_ms),
                factor: 2.0,
            },
            poll_interval: Duration::from_millis(p.poll_interval_ms),
        }
    }
}

type WaiterKey = (String, String);

pub struct Pipeline {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) settings: PipelineSettings,
    /// This process's name in leases.
    replica: String,
    claims: AtomicU64,
    pub(crate) inbox_wake: Notify,
    pub(crate) outbox_wake: Notify,
    waiters: Mutex<HashMap<WaiterKey, oneshot::Sender<WaitOutcome>>>,
    pub(crate) stop: CancellationToken,
    pub(crate) dispatch_slots: Arc<Semaphore>,
    pub(crate) send_slots: Arc<Semaphore>,
    /// Itself, for the tasks an inline request starts.
    me: std::sync::Weak<Pipeline>,
    /// Messages answered in their request lately, to recognise a repeat.
    recent: Mutex<Recent>,
    /// The service's runtime. Work started from a request must run here, not on the HTTP
    /// worker's own runtime, which stops with the worker before the pipeline's graceful
    /// shutdown has waited for that work.
    pub(crate) rt: tokio::runtime::Handle,
}

/// The most recent messages answered in their request (a bounded FIFO of key hashes).
#[derive(Default)]
struct Recent {
    seen: std::collections::HashSet<u64>,
    order: std::collections::VecDeque<u64>,
}

/// How many recent in-request messages are remembered for dedupe.
const RECENT_CAP: usize = 65_536;

impl Recent {
    /// Remembers `key`; false when it was already there.
    fn insert(&mut self, key: u64) -> bool {
        if !self.seen.insert(key) {
            return false;
        }
        self.order.push_back(key);
        if self.order.len() > RECENT_CAP {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        true
    }
}

/// The stable id of (channel, platform conversation, thread).
pub fn conversation_id(channel: &str, platform_conversation: &str, thread: Option<&str>) -> ConversationId {
    let mut h = Sha256::new();
    for part in [channel, platform_conversation, thread.unwrap_or("")] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    ConversationId::from_trusted(format!("c_{}", hex::encode(&h.finalize()[..16])))
}

pub use patchbay_channel_core::ids::{message_id, reply_id};

impl Pipeline {
    pub fn new(
        store: Arc<dyn Store>,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        settings: PipelineSettings,
    ) -> Arc<Pipeline> {
        let replica = patchbay_channel_core::ids::random_token(10);
        Arc::new_cyclic(|me| Pipeline {
            me: me.clone(),
            recent: Mutex::new(Recent::default()),
            rt: tokio::runtime::Handle::current(),
            dispatch_slots: Arc::new(Semaphore::new(settings.concurrency)),
            send_slots: Arc::new(Semaphore::new(settings.concurrency)),
            store,
            registry,
            metrics,
            settings,
            replica,
            claims: AtomicU64::new(0),
            inbox_wake: Notify::new(),
            outbox_wake: Notify::new(),
            waiters: Mutex::new(HashMap::new()),
            stop: CancellationToken::new(),
        })
    }

    /// Starts the dispatcher, the sender and housekeeping.
    pub fn start(self: &Arc<Self>) -> Vec<tokio::task::JoinHandle<()>> {
        vec![
            tokio::spawn(dispatcher::run(self.clone())),
            tokio::spawn(sender::run(self.clone())),
            tokio::spawn(housekeeping(self.clone())),
        ]
    }

    /// A fresh claim, owned by this replica under a new lease token.
    pub(crate) fn claim(&self, limit: usize) -> Claim {
        let now = patchbay_channel_core::now_ms();
        let n = self.claims.fetch_add(1, Ordering::Relaxed);
        Claim {
            owner: format!("{}/{n}", self.replica),
            now,
            lease_until: now + self.settings.lease.as_millis() as i64,
            limit,
            paused_channels: self.registry.snapshot().paused_channels(),
        }
    }

    /// A claim of the next row of a conversation, made when one is finished — unless the
    /// pipeline is stopping or the channel is paused (disabled).
    pub(crate) fn chain_claim(&self, channel_id: &str) -> Option<ChainClaim> {
        if self.stop.is_cancelled() {
            return None;
        }
        let paused = self
            .registry
            .snapshot()
            .channels
            .get(channel_id)
            .is_none_or(|c| !c.record.enabled);
        if paused {
            return None;
        }
        let now = patchbay_channel_core::now_ms();
        Some(ChainClaim {
            now,
            lease_until: now + self.settings.lease.as_millis() as i64,
        })
    }

    pub(crate) fn take_waiter(&self, channel: &str, event_id: &str) -> Option<oneshot::Sender<WaitOutcome>> {
        let mut w = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        w.remove(&(channel.to_owned(), event_id.to_owned())).filter(|tx| !tx.is_closed())
    }

    /// Removes a waiter; answers whether it was still there (not yet taken by the answer).
    fn forget_waiter(&self, key: &WaiterKey) -> bool {
        self.waiters.lock().unwrap_or_else(|p| p.into_inner()).remove(key).is_some()
    }

    /// Stops claiming new work and waits up to `grace` for in-flight work; what is not done
    /// stays leased in the store and is taken up again when the lease expires. `tasks` are
    /// the handles [`Pipeline::start`] answered.
    pub async fn shutdown(&self, grace: Duration, tasks: Vec<tokio::task::JoinHandle<()>>) {
        self.stop.cancel();
        let total = self.settings.concurrency as u32;
        let aborts: Vec<_> = tasks.iter().map(|t| t.abort_handle()).collect();
        let wait_all = async {
            // First the claim loops: each hands every row it has claimed to a worker before
            // it returns. Waiting for the slots alone would race with them: a row claimed
            // just before the stop would start after the store is closed, its outcome never
            // recorded (a repeat, and a wait for its lease, at the next start).
            for t in tasks {
                let _ = t.await;
            }
            let _a = self.dispatch_slots.acquire_many(total).await;
            let _b = self.send_slots.acquire_many(total).await;
        };
        if tokio::time::timeout(grace, wait_all).await.is_err() {
            // No new work may start once the store closes.
            for a in aborts {
                a.abort();
            }
            tracing::warn!("shutdown grace elapsed with work in flight; it resumes at the next start");
        }
    }

    fn new_inbox(channel: &ChannelId, i: &Inbound, log: Option<&serde_json::Value>) -> Result<NewInbox, InboxError> {
        Ok(NewInbox {
            channel_id: channel.as_str().to_owned(),
            event_id: i.event_id.clone(),
            conversation_id: conversation_id(channel.as_str(), &i.platform_conversation, i.thread.as_deref()).to_string(),
            payload: serde_json::to_string(i).map_err(|e| InboxError::Unavailable(e.to_string()))?,
            received_at: i.received_at,
            log: log.map(|entry| (i.platform_conversation.clone(), entry.to_string())),
        })
    }

    fn unavailable(channel: &ChannelId, e: crate::store::StoreError) -> InboxError {
        tracing::error!(channel = %channel, error = %e, "inbox write failed");
        InboxError::Unavailable(e.to_string())
    }

    fn counted(&self, channel: &ChannelId, received: usize, new: usize, started: Instant) {
        let m = self.metrics.channel(channel.as_str());
        m.received.fetch_add(received as u64, Ordering::Relaxed);
        m.acknowledged.fetch_add(new as u64, Ordering::Relaxed);
        m.duplicates.fetch_add((received - new) as u64, Ordering::Relaxed);
        m.ack_latency.observe(started.elapsed());
    }

    /// Stores messages in one commit and, as far as dispatcher slots are free, claims them in
    /// it too and has each answered at once by a task of its own: no claim write and no
    /// hand-over to the claim loop before the assistant is asked. The rest (no free slot, or
    /// their conversation has a message before them) wait for the dispatcher's claims, so a
    /// burst never holds leases while waiting.
    async fn put(&self, channel: &ChannelId, inbound: Vec<Inbound>) -> Result<Vec<Accepted>, InboxError> {
        self.put_logged(channel, inbound, None).await.map(|(accepted, _)| accepted)
    }

    /// `put`, with a log entry for a single message (see `Inbox::accept_logged`).
    async fn put_logged(
        &self,
        channel: &ChannelId,
        inbound: Vec<Inbound>,
        entry: Option<serde_json::Value>,
    ) -> Result<(Vec<Accepted>, Vec<Option<i64>>), InboxError> {
        let started = Instant::now();
        let items = inbound
            .iter()
            .map(|i| Self::new_inbox(channel, i, entry.as_ref()))
            .collect::<Result<Vec<_>, InboxError>>()?;
        let received = items.len();
        // A paused (disabled) channel's work is held, not answered: it queues.
        let enabled = self.registry.snapshot().channels.get(channel.as_str()).is_some_and(|c| c.record.enabled);
        let mut slots = Vec::new();
        let me = self.me.upgrade().filter(|_| enabled && !self.stop.is_cancelled());
        if let Some(p) = &me {
            while slots.len() < received {
                let Ok(slot) = p.dispatch_slots.clone().try_acquire_owned() else { break };
                slots.push(slot);
            }
        }
        let claim = self.claim(slots.len());
        let dedupe_until = claim.now + self.settings.dedupe_window.as_millis() as i64;
        let put_claim = (!slots.is_empty()).then(|| PutClaim {
            owner: claim.owner.clone(),
            lease_until: claim.lease_until,
            limit: slots.len(),
        });
        let (accepted, claimed, logged) = self
            .store
            .inbox_put(items, dedupe_until, put_claim)
            .await
            .map_err(|e| Self::unavailable(channel, e))?;
        let new = accepted.iter().filter(|a| **a == Accepted::New).count();
        self.counted(channel, received, new, started);
        if new > claimed.len() {
            self.inbox_wake.notify_one();
        }
        if let Some(p) = me {
            // Slots not used are released here, when `slots` goes.
            for (item, slot) in claimed.into_iter().zip(slots) {
                let (p, owner) = (p.clone(), claim.owner.clone());
                self.rt.spawn(async move {
                    // The slot counts against the dispatcher's concurrency, and a graceful
                    // shutdown waits for it like for the dispatcher's own work.
                    let _slot = slot;
                    dispatcher::process(p, item, owner).await;
                });
            }
        }
        Ok((accepted, logged))
    }
}

#[async_trait]
impl Inbox for Pipeline {
    async fn accept(&self, channel: &ChannelId, inbound: Inbound) -> Result<Accepted, InboxError> {
        let mut out = self.put(channel, vec![inbound]).await?;
        Ok(out.pop().unwrap_or(Accepted::Duplicate))
    }

    async fn accept_logged(
        &self,
        channel: &ChannelId,
        inbound: Inbound,
        entry: serde_json::Value,
    ) -> Result<(Accepted, Option<i64>), InboxError> {
        let (mut accepted, mut logged) = self.put_logged(channel, vec![inbound], Some(entry)).await?;
        Ok((accepted.pop().unwrap_or(Accepted::Duplicate), logged.pop().flatten()))
    }

    async fn accept_batch(&self, channel: &ChannelId, inbound: Vec<Inbound>) -> Result<Vec<Accepted>, InboxError> {
        if inbound.is_empty() {
            return Ok(Vec::new());
        }
        self.put(channel, inbound).await
    }

    async fn answer_in_request(
        &self,
        channel: &ChannelId,
        inbound: Inbound,
        timeout: Duration,
    ) -> Result<WaitOutcome, InboxError> {
        let started = Instant::now();
        let key = {
            let mut h = Sha256::new();
            h.update(channel.as_str().as_bytes());
            h.update([0]);
            h.update(inbound.event_id.as_bytes());
            u64::from_le_bytes(h.finalize()[..8].try_into().unwrap_or_default())
        };
        let fresh = self.recent.lock().unwrap_or_else(|p| p.into_inner()).insert(key);
        self.counted(channel, 1, usize::from(fresh), started);
        if !fresh {
            return Ok(WaitOutcome::Duplicate);
        }
        let item = InboxItem {
            id: 0,
            channel_id: channel.as_str().to_owned(),
            event_id: inbound.event_id.clone(),
            conversation_id: conversation_id(channel.as_str(), &inbound.platform_conversation, inbound.thread.as_deref())
                .to_string(),
            payload: String::new(),
            attempts: 0,
            received_at: inbound.received_at,
            replies_queued: false,
        };
        let deadline = tokio::time::Instant::now() + timeout;
        // Answers in requests count against the dispatcher's concurrency like queued ones.
        let _slot = match tokio::time::timeout_at(deadline, self.dispatch_slots.acquire()).await {
            Ok(Ok(slot)) => Some(slot),
            Ok(Err(_)) => None,
            Err(_) => {
                let why = format!("no capacity to answer within {} ms (pipeline.concurrency is busy)", timeout.as_millis());
                let record = Self::new_inbox(channel, &inbound, None)?;
                if let Err(e) = self.store.dead_letter_put(record, 0, why).await {
                    tracing::error!(channel = %channel, error = %e, "the dead letter could not be recorded");
                }
                return Ok(WaitOutcome::Pending);
            }
        };
        let mut item = item;
        let why = loop {
            item.attempts += 1;
            let attempt = tokio::time::timeout_at(deadline, dispatcher::answer(self, &item, inbound.clone())).await;
            match attempt {
                Ok(Ok((_, replies, _))) => {
                    let m = self.metrics.channel(channel.as_str());
                    m.delivered.fetch_add(replies.len() as u64, Ordering::Relaxed);
                    m.end_to_end_latency.observe(started.elapsed());
                    return Ok(WaitOutcome::Replies(replies));
                }
                Ok(Err(dispatcher::Failure::Dead(reason))) => break reason,
                Ok(Err(dispatcher::Failure::Retry { message, retry_after })) => {
                    let delay = self.settings.backoff.delay_honouring(item.attempts, retry_after);
                    if item.attempts >= self.settings.max_attempts || tokio::time::Instant::now() + delay >= deadline {
                        break format!("gave up after {} attempts within the request: {message}", item.attempts);
                    }
                    tracing::warn!(channel = %channel, event = %item.event_id, attempt = item.attempts, error = %message,
                        "assistant attempt failed; trying again within the request");
                    tokio::time::sleep(delay).await;
                }
                Err(_) => {
                    break format!(
                        "the assistant did not answer within {} ms, and this channel can only answer in the request (set an incoming webhook to deliver later replies)",
                        timeout.as_millis()
                    )
                }
            }
        };
        self.metrics.channel(channel.as_str()).failed.fetch_add(1, Ordering::Relaxed);
        tracing::error!(channel = %channel, event = %item.event_id, reason = %why, "message dead-lettered");
        let record = Self::new_inbox(channel, &inbound, None)?;
        if let Err(e) = self.store.dead_letter_put(record, item.attempts, why).await {
            tracing::error!(channel = %channel, error = %e, "the dead letter could not be recorded");
        }
        Ok(WaitOutcome::Pending)
    }

    async fn accept_and_wait(
        &self,
        channel: &ChannelId,
        inbound: Inbound,
        timeout: Duration,
    ) -> Result<WaitOutcome, InboxError> {
        self.wait_for_answer(channel, inbound, None, timeout).await
    }

    async fn accept_logged_and_wait(
        &self,
        channel: &ChannelId,
        inbound: Inbound,
        entry: serde_json::Value,
        timeout: Duration,
    ) -> Result<WaitOutcome, InboxError> {
        self.wait_for_answer(channel, inbound, Some(entry), timeout).await
    }
}

impl Pipeline {
    /// Stores the message (with its log entry, if any) and waits up to `timeout` for its
    /// replies (`Inbox::accept_and_wait`).
    async fn wait_for_answer(
        &self,
        channel: &ChannelId,
        inbound: Inbound,
        entry: Option<serde_json::Value>,
        timeout: Duration,
    ) -> Result<WaitOutcome, InboxError> {
        let key = (channel.as_str().to_owned(), inbound.event_id.clone());
        let (tx, rx) = oneshot::channel();
        self.waiters.lock().unwrap_or_else(|p| p.into_inner()).insert(key.clone(), tx);
        let accepted = match self.put_logged(channel, vec![inbound], entry).await {
            Ok((mut a, _)) => a.pop().unwrap_or(Accepted::Duplicate),
            Err(e) => {
                self.forget_waiter(&key);
                return Err(e);
            }
        };
        if accepted == Accepted::Duplicate {
            self.forget_waiter(&key);
            return Ok(WaitOutcome::Duplicate);
        }
        let mut rx = rx;
        match tokio::time::timeout(timeout, &mut rx).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Ok(WaitOutcome::Pending),
            Err(_) if self.forget_waiter(&key) => Ok(WaitOutcome::Pending),
            // The answer took the waiter just now: its replies are being committed for this
            // response and are not queued, so wait for them (a store error drops the sender).
            Err(_) => Ok(rx.await.unwrap_or(WaitOutcome::Pending)),
        }
    }
}

/// Drops expired dedupe entries once a minute.
async fn housekeeping(p: Arc<Pipeline>) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = p.stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match p.store.prune(patchbay_channel_core::now_ms()).await {
            Ok(n) if n > 0 => tracing::debug!(pruned = n, "expired dedupe entries removed"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "pruning the dedupe window failed"),
        }
    }
}

/// The shared claim loop of the dispatcher and the sender: claim as many rows as there are
/// free slots, hand each to `work` holding a slot, sleep until woken or the poll interval.
pub(crate) async fn claim_loop<T, C, CF, W, WF>(
    p: Arc<Pipeline>,
    slots: Arc<Semaphore>,
    wake: impl Fn(&Pipeline) -> &Notify,
    claim: C,
    work: W,
) where
    T: Send + 'static,
    C: Fn(Arc<Pipeline>, Claim) -> CF,
    CF: std::future::Future<Output = crate::store::StoreResult<Vec<T>>>,
    W: Fn(Arc<Pipeline>, T, String) -> WF,
    WF: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        if p.stop.is_cancelled() {
            return;
        }
        // Wait for at least one free slot before claiming.
        let first = tokio::select! {
            _ = p.stop.cancelled() => return,
            permit = slots.clone().acquire_owned() => match permit { Ok(pm) => pm, Err(_) => return },
        };
        // Every row claimed gets a slot at once: the slots are taken before the claim, so a
        // claimed row never waits for one while its lease runs (requests that answer their
        // own message take slots too).
        let mut permits = vec![first];
        while permits.len() < p.settings.claim_batch {
            match slots.clone().try_acquire_owned() {
                Ok(pm) => permits.push(pm),
                Err(_) => break,
            }
        }
        let c = p.claim(permits.len());
        let owner = c.owner.clone();
        let limit = c.limit;
        let started = std::time::Instant::now();
        let rows = match claim(p.clone(), c).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "claiming work failed; retrying");
                drop(permits);
                tokio::select! {
                    _ = p.stop.cancelled() => return,
                    _ = tokio::time::sleep(p.settings.poll_interval) => {}
                }
                continue;
            }
        };
        let got = rows.len();
        for row in rows {
            let Some(permit) = permits.pop() else { break };
            let fut = work(p.clone(), row, owner.clone());
            tokio::spawn(async move {
                fut.await;
                drop(permit);
            });
        }
        drop(permits);
        if got < limit {
            let took = started.elapsed();
            tokio::select! {
                _ = p.stop.cancelled() => return,
                _ = wake(&p).notified() => {}
                _ = tokio::time::sleep(p.settings.poll_interval) => {}
            }
            // A claim that found nothing cost the store's writer about `took` for nothing;
            // under a stream of acknowledgements (each a wake-up) leave the writer as much
            // for them before scanning again.
            if got == 0 {
                tokio::select! {
                    _ = p.stop.cancelled() => return,
                    _ = tokio::time::sleep(took.min(Duration::from_millis(5))) => {}
                }
            }
        }
    }
}
