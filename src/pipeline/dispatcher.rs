//! The dispatcher: claims inbox rows, asks the channel's assistant, sends the replies at once
//! where it can, and queues the rest to the outbox in the same transaction that removes the
//! message.

use super::sender::Attempt;
use super::{claim_loop, conversation_id, message_id, reply_id, Pipeline};
use crate::assistants::{AssistantError, AssistantEvent, AssistantRequest, ChannelRef, ConversationRef};
use crate::store::{ConversationRecord, InboxItem, NewLogEntry, NewOutbox, StoreError};
use futures_util::StreamExt;
use patchbay_channel_core::{ChannelId, Inbound, OutboundReply, Reply, WaitOutcome};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long the assistant may work before a typing indicator is shown.
const TYPING_DELAY: Duration = Duration::from_millis(300);

pub async fn run(p: Arc<Pipeline>) {
    let slots = p.dispatch_slots.clone();
    claim_loop(
        p,
        slots,
        |p| &p.inbox_wake,
        |p, c| async move { p.store.inbox_claim(c).await },
        |p, item, owner| process(p, item, owner),
    )
    .await
}

pub(crate) enum Failure {
    Retry { message: String, retry_after: Option<Duration> },
    Dead(String),
}

/// Processes a claimed message and then, holding the same slot, each next message of its
/// conversation that the completion claimed along (see `Store::inbox_complete`).
pub(crate) async fn process(p: Arc<Pipeline>, item: InboxItem, owner: String) {
    let mut current = Some(item);
    while let Some(item) = current.take() {
        current = process_one(&p, item, &owner).await;
    }
    // Other conversations' messages, or a next message that was not due yet, may be
    // claimable now.
    p.inbox_wake.notify_one();
}

async fn process_one(p: &Arc<Pipeline>, item: InboxItem, owner: &str) -> Option<InboxItem> {
    let claimed_at = Instant::now();
    let owner = owner.to_owned();
    let outcome = match serde_json::from_str::<Inbound>(&item.payload) {
        Ok(inbound) => answer(p, &item, inbound).await,
        Err(e) => Err(Failure::Dead(format!("the stored message cannot be read: {e}"))),
    };
    let m = p.metrics.channel(&item.channel_id);
    let result = match outcome {
        Ok((inbound, replies, draft)) => complete(p, &item, &owner, claimed_at, inbound, replies, draft).await,
        Err(Failure::Retry { message, retry_after }) if item.attempts < p.settings.max_attempts => {
            m.retried.fetch_add(1, Ordering::Relaxed);
            let delay = p.settings.backoff.delay_honouring(item.attempts, retry_after);
            tracing::warn!(channel = %item.channel_id, event = %item.event_id, attempt = item.attempts,
                retry_in_ms = delay.as_millis() as u64, error = %message, "assistant attempt failed; will retry");
            p.store
                .inbox_release(item.id, &owner, patchbay_channel_core::now_ms() + delay.as_millis() as i64, &message)
                .await
                .map(|_| None)
        }
        Err(Failure::Retry { message, .. }) => {
            m.failed.fetch_add(1, Ordering::Relaxed);
            let reason = format!("gave up after {} attempts: {message}", item.attempts);
            tracing::error!(channel = %item.channel_id, event = %item.event_id, %reason, "message dead-lettered");
            p.store.inbox_dead(item.id, &owner, &reason).await.map(|_| None)
        }
        Err(Failure::Dead(reason)) => {
            m.failed.fetch_add(1, Ordering::Relaxed);
            tracing::error!(channel = %item.channel_id, event = %item.event_id, %reason, "message dead-lettered");
            p.store.inbox_dead(item.id, &owner, &reason).await.map(|_| None)
        }
    };
    match result {
        Ok(next) => next,
        Err(StoreError::LeaseLost) => {
            tracing::warn!(channel = %item.channel_id, event = %item.event_id, "lease lost: another worker has this message");
            None
        }
        Err(e) => {
            tracing::error!(channel = %item.channel_id, event = %item.event_id, error = %e,
                "cannot record the outcome; the message will be tried again when its lease expires");
            None
        }
    }
}

/// Asks the assistant. Answers the inbound, the replies and the platform id of the draft a
/// streamed answer was shown in (to be finished by the first reply), or why not.
pub(crate) async fn answer(p: &Pipeline, item: &InboxItem, inbound: Inbound) -> Result<(Inbound, Vec<Reply>, Option<String>), Failure> {
    let snap = p.registry.snapshot();
    let Some(channel) = snap.channels.get(&item.channel_id) else {
        return Err(Failure::Dead("the channel was deleted".into()));
    };
    let assistant = snap
        .assistants
        .get(&channel.record.assistant)
        .ok_or_else(|| Failure::Retry {
            message: format!("assistant `{}` does not exist", channel.record.assistant),
            retry_after: None,
        })?;
    let backend = assistant.backend.clone().ok_or_else(|| Failure::Retry {
        message: format!(
            "assistant `{}` cannot be built: {}",
            assistant.record.id,
            assistant.build_error.clone().unwrap_or_default()
        ),
        retry_after: None,
    })?;
    let request = AssistantRequest {
        id: message_id(&item.channel_id, &item.event_id),
        channel: ChannelRef {
            id: item.channel_id.clone(),
            kind: channel.record.kind.clone(),
        },
        conversation: ConversationRef {
            id: item.conversation_id.clone(),
            thread_id: inbound.thread.clone(),
        },
        user: inbound.user.clone(),
        text: inbound.text.clone(),
        addressed: inbound.addressed,
        received_at: humantime::format_rfc3339_millis(
            std::time::UNIX_EPOCH + Duration::from_millis(inbound.received_at.max(0) as u64),
        )
        .to_string(),
    };
    // Aborted however `answer` ends, also when it is dropped (a request that went away).
    let typing = channel.instance.clone().and_then(|instance| {
        let every = instance.typing_interval()?;
        let inbound = inbound.clone();
        Some(tokio::spawn(async move {
            // An answer that comes sooner needs no indicator: no frame, no platform call.
            tokio::time::sleep(TYPING_DELAY).await;
            loop {
                instance.typing(&inbound).await;
                tokio::time::sleep(every).await;
            }
        }))
    })
    .map(AbortOnDrop);
    let started = Instant::now();
    let drafts = channel
        .instance
        .clone()
        .and_then(|instance| Some(Drafts::start(instance.clone(), instance.stream_interval()?, outbound(item, &inbound, 0, Reply::default()))));
    // A stream that never ends must not hold the lease forever.
    let budget = p.settings.lease.mul_f64(0.8);
    let collected = tokio::time::timeout(budget, async {
        let mut stream = backend.respond(request).await;
        let mut replies = Vec::new();
        while let Some(event) = stream.next().await {
            match event? {
                AssistantEvent::Reply(r) => replies.push(r),
                AssistantEvent::Partial(text) => {
                    if let Some(d) = &drafts {
                        d.grow(text);
                    }
                }
            }
        }
        Ok::<_, AssistantError>(replies)
    })
    .await;
    drop(typing);
    p.metrics
        .channel(&item.channel_id)
        .assistant_latency
        .observe(started.elapsed());
    let draft = match drafts {
        Some(d) => d.finish().await,
        None => None,
    };
    let failure = match collected {
        Err(_) => Failure::Retry {
            message: format!("the assistant did not finish within {} s", budget.as_secs()),
            retry_after: None,
        },
        Ok(Err(AssistantError::Retryable { message, retry_after })) => Failure::Retry { message, retry_after },
        Ok(Err(AssistantError::Permanent(message))) => Failure::Dead(message),
        Ok(Ok(replies)) if !replies.is_empty() || draft.is_none() => return Ok((inbound, replies, draft)),
        Ok(Ok(_)) => {
            // Streamed text but no finished reply: the draft must not stay as if it were one.
            discard_draft(channel.instance.as_deref(), item, &inbound, draft.as_deref()).await;
            return Ok((inbound, Vec::new(), None));
        }
    };
    // The answer is tried again from the start, with a new draft.
    discard_draft(channel.instance.as_deref(), item, &inbound, draft.as_deref()).await;
    Err(failure)
}

async fn discard_draft(instance: Option<&dyn patchbay_channel_core::Channel>, item: &InboxItem, inbound: &Inbound, draft: Option<&str>) {
    if let (Some(instance), Some(id)) = (instance, draft) {
        instance.stream_discard(&outbound(item, inbound, 0, Reply::default()), id).await;
    }
}

/// The reply `index` of the answer to `item`, addressed like the inbound.
fn outbound(item: &InboxItem, inbound: &Inbound, index: usize, reply: Reply) -> OutboundReply {
    OutboundReply {
        reply_id: reply_id(&item.channel_id, &item.event_id, index),
        channel_id: ChannelId::from_trusted(item.channel_id.clone()),
        conversation_id: conversation_id(&item.channel_id, &inbound.platform_conversation, inbound.thread.as_deref()),
        platform_conversation: inbound.platform_conversation.clone(),
        thread: reply.thread.clone().or_else(|| inbound.thread.clone()),
        route: inbound.route.clone(),
        reply,
        attempt: 0,
        draft: None,
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A streamed answer shown growing in place: a task that posts the draft once the assistant
/// has been writing for [`TYPING_DELAY`] (a quicker answer is simply sent) and then edits it
/// at most once per interval with the newest text (intermediate texts are skipped).
struct Drafts {
    text: tokio::sync::watch::Sender<String>,
    done: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<Option<String>>,
}

impl Drafts {
    fn start(instance: Arc<dyn patchbay_channel_core::Channel>, every: Duration, template: OutboundReply) -> Drafts {
        let (text, mut rx) = tokio::sync::watch::channel(String::new());
        let done = tokio_util::sync::CancellationToken::new();
        let stop = done.clone();
        let task = tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(TYPING_DELAY) => {}
                _ = stop.cancelled() => return None,
            }
            let mut draft = template;
            let mut posted: Option<String> = None;
            loop {
                tokio::select! {
                    changed = rx.changed() => if changed.is_err() { break },
                    _ = stop.cancelled() => break,
                }
                draft.reply.text = rx.borrow_and_update().clone();
                if draft.reply.text.trim().is_empty() {
                    continue;
                }
                match &posted {
                    None => match instance.stream_start(&draft).await {
                        Ok(d) if d.platform_message_id.is_some() => posted = d.platform_message_id,
                        Ok(_) => break,
                        Err(e) => {
                            tracing::warn!(channel = %draft.channel_id, error = %e, "could not post the streamed draft; the reply will be sent when finished");
                            break;
                        }
                    },
                    Some(id) => {
                        if let Err(e) = instance.stream_update(&draft, id).await {
                            tracing::debug!(channel = %draft.channel_id, error = %e, "draft not updated");
                        }
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stop.cancelled() => break,
                }
            }
            posted
        });
        Drafts { text, done, task }
    }

    fn grow(&self, text: String) {
        self.text.send_replace(text);
    }

    /// Stops editing; answers the draft's platform id, if one was posted.
    async fn finish(self) -> Option<String> {
        self.done.cancel();
        self.task.await.ok().flatten()
    }
}

/// Whether the channel's assistant has an API key, with which it may push replies later.
fn can_push(p: &Pipeline, channel_id: &str) -> bool {
    let snap = p.registry.snapshot();
    snap.channels
        .get(channel_id)
        .and_then(|c| snap.assistants.get(&c.record.assistant))
        .is_none_or(|a| a.record.api_key_hash.is_some())
}

/// What becomes of the first reply that was not sent at once.
enum SendAtOnce {
    /// Not tried: queued for the sender.
    Queue,
    /// Tried and worth trying again: queued for the sender, not before this time (Unix ms).
    Retry { not_before: i64, error: String },
    /// Tried and failed for good: recorded as a dead letter with this reason.
    Dead(String),
}

/// Sends an answer's replies at once, before its completion is committed, when that keeps
/// every promise the outbox makes: the conversation has no earlier replies waiting (order),
/// the channel is enabled, and the message's lease has time left (the message is still in
/// the inbox meanwhile, so a crash before the commit has it answered again, as a crash
/// between sending and recording a queued reply has that reply sent again). These sends are
/// bounded by the dispatcher's slots, not the sender's: the sender's claim loop holds free
/// slots while it waits for work, and taking one here failed for a third of the replies
/// under load, each then queued (and the conversation's next ones behind it). Answers how
/// many went out, in order, and what becomes of the next one: worth retrying, it and the
/// rest are queued for the sender like any reply (this attempt counting as its first);
/// failed for good, it is dead-lettered and the rest are queued.
async fn send_at_once(p: &Pipeline, item: &InboxItem, outs: &mut [OutboundReply], claimed_at: Instant) -> (usize, SendAtOnce) {
    let queue = SendAtOnce::Queue;
    if outs.is_empty() || item.replies_queued || claimed_at.elapsed() > p.settings.lease / 2 || p.chain_claim(&item.channel_id).is_none() {
        return (0, queue);
    }
    let m = p.metrics.channel(&item.channel_id);
    for (sent, out) in outs.iter_mut().enumerate() {
        out.attempt = 1;
        match super::sender::attempt(p, out, 1, item.received_at).await {
            Attempt::Delivered => {}
            Attempt::Retry { message, .. } if p.settings.max_attempts <= 1 => {
                m.failed.fetch_add(1, Ordering::Relaxed);
                let reason = format!("gave up after 1 attempts: {message}");
                tracing::error!(channel = %item.channel_id, reply = %out.reply_id, %reason, "reply dead-lettered");
                return (sent, SendAtOnce::Dead(reason));
            }
            Attempt::Retry { delay, message } => {
                m.retried.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(channel = %item.channel_id, reply = %out.reply_id, attempt = 1,
                    retry_in_ms = delay.as_millis() as u64, error = %message, "delivery failed; will retry");
                let not_before = patchbay_channel_core::now_ms() + delay.as_millis() as i64;
                return (sent, SendAtOnce::Retry { not_before, error: message });
            }
            Attempt::Permanent(reason) => {
                m.failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(channel = %item.channel_id, reply = %out.reply_id, %reason, "reply dead-lettered");
                return (sent, SendAtOnce::Dead(reason));
            }
        }
    }
    (outs.len(), queue)
}

async fn complete(
    p: &Pipeline,
    item: &InboxItem,
    owner: &str,
    claimed_at: Instant,
    inbound: Inbound,
    replies: Vec<Reply>,
    draft: Option<String>,
) -> Result<Option<InboxItem>, StoreError> {
    // A request still waiting for this answer (Mattermost's inline reply, web chat's
    // webhook) takes the replies in its response. The waiter is taken here, so the request
    // no longer gives up on its own: it waits for them. They are committed held by the
    // request (leased to it), not queued: removed once handed over, delivered by the sender
    // if the process dies first or the request went away.
    let waiter = p.take_waiter(&item.channel_id, &item.event_id);
    let now = patchbay_channel_core::now_ms();
    let hold = waiter.as_ref().map(|_| (p.claim(1).owner, now + p.settings.lease.as_millis() as i64));
    let mut outs: Vec<OutboundReply> = replies
        .iter()
        .enumerate()
        .map(|(i, reply)| {
            let mut out = outbound(item, &inbound, i, reply.clone());
            if i == 0 {
                out.draft = draft.clone();
            }
            out
        })
        .collect();
    // A kind whose delivery is a log entry (web chat) has its replies appended in the commit
    // that completes the message: nothing is queued, held or sent. Not when replies of the
    // conversation are still queued (these must come after them) nor for a streamed draft.
    let instance = p.registry.snapshot().channels.get(&item.channel_id).and_then(|c| c.instance.clone());
    let mut logged: Vec<(OutboundReply, serde_json::Value)> = Vec::new();
    if let Some(instance) = instance.as_ref().filter(|_| !item.replies_queued && outs.iter().all(|o| o.draft.is_none())) {
        let entries: Option<Vec<serde_json::Value>> = outs.iter().map(|o| instance.log_entry(o)).collect();
        if let Some(entries) = entries {
            logged = outs.drain(..).zip(entries).collect();
        }
    }
    let logs: Vec<NewLogEntry> = logged
        .iter()
        .map(|(out, entry)| NewLogEntry {
            channel_id: item.channel_id.clone(),
            conversation: out.platform_conversation.clone(),
            key: out.reply_id.clone(),
            body: entry.to_string(),
            at: now,
        })
        .collect();
    let mut first = SendAtOnce::Queue;
    if hold.is_none() {
        let sent;
        (sent, first) = send_at_once(p, item, &mut outs, claimed_at).await;
        outs.drain(..sent);
    }
    let mut rows: Vec<NewOutbox> = outs
        .iter()
        .map(|out| NewOutbox {
            reply_id: out.reply_id.clone(),
            channel_id: item.channel_id.clone(),
            conversation_id: item.conversation_id.clone(),
            payload: serde_json::to_string(out).unwrap_or_default(),
            received_at: item.received_at,
            not_before: 0,
            held_by: hold.clone(),
            attempts: 0,
            last_error: None,
            dead_letter: None,
        })
        .collect();
    // The first reply not sent at once may have been tried.
    if let Some(row) = rows.first_mut() {
        match first {
            SendAtOnce::Queue => {}
            SendAtOnce::Retry { not_before, error } => {
                row.attempts = 1;
                row.not_before = not_before;
                row.last_error = Some(error);
            }
            SendAtOnce::Dead(reason) => {
                row.attempts = 1;
                row.dead_letter = Some(reason);
            }
        }
    }
    let any_queued = rows.iter().any(|r| r.dead_letter.is_none()) && hold.is_none();
    // Only an assistant with an API key can push replies later
    // (`POST /api/v1/conversations/{id}/replies`), and only then is the conversation's address
    // needed afterwards: for the others, writing it would be one more random b-tree page per
    // message.
    let remember = can_push(p, &item.channel_id).then(|| ConversationRecord {
        id: item.conversation_id.clone(),
        channel_id: item.channel_id.clone(),
        platform_conversation: inbound.platform_conversation,
        thread: inbound.thread,
        route: inbound.route,
        updated_at: now,
    });
    let next = p.chain_claim(&item.channel_id);
    // With a sender slot free, the first reply is claimed in the same commit and sent at
    // once, without waiting for the sender's next claim round.
    let sender = match (any_queued, p.chain_claim(&item.channel_id), p.me.upgrade()) {
        (true, Some(at), Some(arc)) => arc.send_slots.clone().try_acquire_owned().ok().map(|slot| (arc, slot, p.claim(1).owner, at)),
        _ => None,
    };
    let send = sender.as_ref().map(|(_, _, send_owner, at)| (send_owner.clone(), at.clone()));
    let n = rows.len();
    let done = p.store.inbox_complete(item.id, owner, rows, logs, item.conversation_id.clone(), remember, next, send).await?;
    let (next, sending) = (done.next, done.sending);
    // A waiting request answers with the logged entries and their numbers, so it has
    // nothing more to write.
    let mut for_waiter = Vec::new();
    if let Some(instance) = instance.filter(|_| !logged.is_empty()) {
        let m = p.metrics.channel(&item.channel_id);
        for ((out, entry), seq) in logged.into_iter().zip(done.logged) {
            if waiter.is_some() {
                for_waiter.push((entry.clone(), seq));
            }
            instance.logged(&out, entry, seq);
            m.delivered.fetch_add(1, Ordering::Relaxed);
            m.end_to_end_latency
                .observe(Duration::from_millis((patchbay_channel_core::now_ms() - item.received_at).max(0) as u64));
        }
    }
    let any_queued = match (sending, sender) {
        (Some(reply), Some((arc, slot, send_owner, _))) => {
            p.rt.spawn(async move {
                let _slot = slot;
                super::sender::deliver(arc, reply, send_owner).await;
            });
            false
        }
        _ => any_queued,
    };
    if let (Some(tx), Some((holder, _))) = (waiter, hold) {
        let answer = if for_waiter.is_empty() { WaitOutcome::Replies(replies) } else { WaitOutcome::Logged(for_waiter) };
        let handed = tx.send(answer).is_ok();
        // (Logged replies were counted above.)
        if handed && n > 0 {
            let m = p.metrics.channel(&item.channel_id);
            m.delivered.fetch_add(n as u64, Ordering::Relaxed);
            m.end_to_end_latency
                .observe(Duration::from_millis((patchbay_channel_core::now_ms() - item.received_at).max(0) as u64));
        }
        if n > 0 {
            // Handed over: the held copies go. Not handed (the client hung up): the sender
            // delivers them.
            if let Err(e) = p.store.outbox_unhold(holder, !handed).await {
                tracing::warn!(channel = %item.channel_id, event = %item.event_id, error = %e,
                    "held replies stay until their lease ends; the sender then delivers them (again, with the same reply ids)");
            }
            p.outbox_wake.notify_one();
        }
        return Ok(next);
    }
    if any_queued {
        p.outbox_wake.notify_one();
    }
    Ok(next)
}
