//! The sender: claims outbox rows and delivers them through the channel's kind, retrying
//! what is worth retrying and dead-lettering the rest with the platform's own words.

use super::{claim_loop, Pipeline};
use crate::store::{OutboxItem, StoreError};
use patchbay_channel_core::{ChannelState, OutboundReply, SendError};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// After the platform rejected our credentials, retry no sooner than this: an admin has to
/// act first.
const UNAUTHORIZED_RETRY: Duration = Duration::from_secs(60);

pub async fn run(p: Arc<Pipeline>) {
    let slots = p.send_slots.clone();
    claim_loop(
        p,
        slots,
        |p| &p.outbox_wake,
        |p, c| async move { p.store.outbox_claim(c).await },
        |p, item, owner| deliver(p, item, owner),
    )
    .await
}

/// Delivers a claimed reply and then, holding the same slot, each next reply of its
/// conversation that the completion claimed along (see `Store::outbox_done`).
pub(crate) async fn deliver(p: Arc<Pipeline>, item: OutboxItem, owner: String) {
    let mut current = Some(item);
    while let Some(item) = current.take() {
        current = deliver_one(&p, item, &owner).await;
    }
    p.outbox_wake.notify_one();
}

/// What one attempt to send a reply came to.
pub(crate) enum Attempt {
    Delivered,
    /// Worth trying again after the delay (the platform's Retry-After where it gave one).
    Retry { delay: Duration, message: String },
    Permanent(String),
}

/// Sends one reply through its channel's kind and says what came of it, keeping the
/// channel's metrics and status; the caller records the outcome in the store. `attempts`
/// counts this one.
pub(crate) async fn attempt(p: &Pipeline, reply: &OutboundReply, attempts: u32, received_at: i64) -> Attempt {
    let m = p.metrics.channel(reply.channel_id.as_str());
    let snap = p.registry.snapshot();
    let entry = snap.channels.get(reply.channel_id.as_str());
    let result = match entry.map(|e| (e, e.instance.as_ref())) {
        None => Err(SendError::Permanent("the channel was deleted".into())),
        Some((e, None)) => Err(SendError::retryable(format!(
            "the channel cannot be built: {}",
            e.build_error.clone().unwrap_or_default()
        ))),
        Some((_, Some(instance))) => instance.send(reply).await,
    };
    let status = entry.map(|e| &e.status);
    match result {
        Ok(_) => {
            m.delivered.fetch_add(1, Ordering::Relaxed);
            m.end_to_end_latency
                .observe(Duration::from_millis((patchbay_channel_core::now_ms() - received_at).max(0) as u64));
            if let Some(s) = status {
                if s.snapshot().state == ChannelState::Failed {
                    s.set_state(ChannelState::Ready);
                }
            }
            Attempt::Delivered
        }
        Err(e) => {
            let outcome = match e {
                SendError::Permanent(message) => Attempt::Permanent(message),
                SendError::Retryable { message, retry_after } => Attempt::Retry {
                    delay: p.settings.backoff.delay_honouring(attempts, retry_after),
                    message,
                },
                SendError::Unauthorized(message) => {
                    if let Some(s) = status {
                        s.failed(format!("{message} — the platform rejected the channel's credentials; update them and the queued replies will go out"));
                    }
                    Attempt::Retry {
                        delay: p.settings.backoff.delay(attempts).max(UNAUTHORIZED_RETRY),
                        message,
                    }
                }
            };
            if let (Some(s), Attempt::Retry { message, .. } | Attempt::Permanent(message)) = (status, &outcome) {
                s.error(format!("delivery failed: {message}"));
            }
            outcome
        }
    }
}

async fn deliver_one(p: &Arc<Pipeline>, item: OutboxItem, owner: &str) -> Option<OutboxItem> {
    let owner = owner.to_owned();
    let m = p.metrics.channel(&item.channel_id);
    let now = patchbay_channel_core::now_ms;
    let mut reply: OutboundReply = match serde_json::from_str(&item.payload) {
        Ok(r) => r,
        Err(e) => {
            let _ = p.store.outbox_dead(item.id, &owner, &format!("the stored reply cannot be read: {e}")).await;
            return None;
        }
    };
    reply.attempt = item.attempts;
    let outcome = match attempt(p, &reply, item.attempts, item.received_at).await {
        Attempt::Delivered => p.store.outbox_done(item.id, &owner, p.chain_claim(&item.channel_id)).await,
        Attempt::Retry { delay, message } if item.attempts < p.settings.max_attempts => {
            m.retried.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(channel = %item.channel_id, reply = %item.reply_id, attempt = item.attempts,
                retry_in_ms = delay.as_millis() as u64, error = %message, "delivery failed; will retry");
            p.store
                .outbox_release(item.id, &owner, now() + delay.as_millis() as i64, &message)
                .await
                .map(|_| None)
        }
        Attempt::Retry { message, .. } => {
            dead(p, &item, &owner, format!("gave up after {} attempts: {message}", item.attempts)).await
        }
        Attempt::Permanent(reason) => dead(p, &item, &owner, reason).await,
    };
    match outcome {
        Ok(next) => next,
        Err(StoreError::LeaseLost) => {
            tracing::warn!(channel = %item.channel_id, reply = %item.reply_id, "lease lost: another worker has this reply");
            None
        }
        Err(e) => {
            tracing::error!(channel = %item.channel_id, reply = %item.reply_id, error = %e,
                "cannot record the delivery outcome; it will be tried again when its lease expires");
            None
        }
    }
}

async fn dead(p: &Pipeline, item: &OutboxItem, owner: &str, reason: String) -> Result<Option<OutboxItem>, StoreError> {
    p.metrics.channel(&item.channel_id).failed.fetch_add(1, Ordering::Relaxed);
    tracing::error!(channel = %item.channel_id, reply = %item.reply_id, %reason, "reply dead-lettered");
    p.store.outbox_dead(item.id, owner, &reason).await.map(|_| None)
}
