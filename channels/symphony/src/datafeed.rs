//! The connector: reads the datafeed into the inbox.
//!
//! **v2** (`/agent/v5/datafeeds`): reuse the first listed fanout feed (so replicas and
//! restarts share one queue) or create one; read with the last `ackId`, which is advanced only
//! once the inbox has stored the batch — a batch that could not be stored is not
//! acknowledged, and the agent delivers it again. `400` (the feed expired, 30 min TTL, or a
//! bad ackId) deletes and recreates the feed.
//!
//! **v1** (`/agent/v4/datafeed`): a feed created per run, read until it answers `400`; `204`
//! and `[]` mean "nothing yet". v1 has no acknowledgement, so a batch the inbox refused is
//! kept and stored before the next read.
//!
//! Both: `401` signs in again (in [`crate::api`]); 429, 5xx and network errors back off
//! (`initial_interval_ms` × `multiplier` up to `max_interval_ms`). After `max_attempts`
//! failures in a row the channel shows `failed` — and keeps trying every `max_interval_ms`,
//! so a pod that comes back is read again without anyone restarting anything. Problems only
//! an admin can fix (a refused key, a proxy refusing the credentials) mark it `failed` at once
//! and are retried on that slow schedule too.

use crate::api::{ApiError, Body};
use crate::channel::Symphony;
use crate::event::{decide, BotInfo, Decision};
use crate::settings::{DatafeedVersion, Which};
use async_trait::async_trait;
use patchbay_channel_core::{Connector, ConnectorCtx, Inbound};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub struct Datafeed(pub Arc<Symphony>);

/// Why serving the feed stopped.
#[derive(Debug)]
enum Trouble {
    Stopped,
    /// Only an admin can fix it: `failed` at once, retried on the slow schedule.
    Admin(String),
    /// Worth retrying with backoff.
    Retry { message: String, retry_after: Option<Duration> },
}

impl Trouble {
    fn retry(message: impl Into<String>) -> Trouble {
        Trouble::Retry { message: message.into(), retry_after: None }
    }
}

impl From<ApiError> for Trouble {
    fn from(e: ApiError) -> Trouble {
        match e {
            ApiError::Auth(a) if a.is_retryable() => Trouble::retry(a.message()),
            ApiError::Network(m) => Trouble::retry(m),
            e => Trouble::Admin(e.message().to_owned()),
        }
    }
}

/// What survives errors within one run of the connector.
#[derive(Default)]
struct Feed {
    id: Option<String>,
    ack: String,
    /// v1: a batch read but not yet stored.
    pending: Vec<Inbound>,
    /// 400s in a row (a feed that expires as soon as it is made is backed off).
    stale_in_a_row: u32,
}

async fn or_stop<T>(stop: &CancellationToken, fut: impl Future<Output = T>) -> Result<T, Trouble> {
    tokio::select! {
        _ = stop.cancelled() => Err(Trouble::Stopped),
        v = fut => Ok(v),
    }
}

/// The array at `v` (a read's `events`, or a v1 read itself), moved out; anything else is no
/// events.
fn take_array(v: Option<&mut serde_json::Value>) -> Vec<serde_json::Value> {
    match v.map(serde_json::Value::take) {
        Some(serde_json::Value::Array(events)) => events,
        _ => Vec::new(),
    }
}

/// v2 fanout feeds: `^[^\s_]+_f(_[^\s_]+)?$` (the BDKs' filter; `_p_` feeds are datahose).
pub fn is_fanout_feed(id: &str) -> bool {
    let plain = |s: &str| !s.is_empty() && !s.contains(|c: char| c.is_whitespace() || c == '_');
    let mut parts = id.splitn(3, '_');
    let (Some(head), Some(f)) = (parts.next(), parts.next()) else { return false };
    plain(head) && f == "f" && parts.next().is_none_or(plain)
}

#[async_trait]
impl Connector for Datafeed {
    async fn run(&self, ctx: ConnectorCtx, stop: CancellationToken) {
        let s = &self.0.api.settings;
        ctx.status.connecting();
        let version = match s.datafeed_version {
            DatafeedVersion::V2 => "v2",
            DatafeedVersion::V1 => "v1",
        };
        ctx.status.set_detail("datafeed_version", version.into());
        let slow = s.retry.max;
        let mut feed = Feed::default();
        let mut failures = 0u32;
        // Bounded by `stop`: every wait selects on it.
        loop {
            let trouble = self.serve(&ctx, &stop, &mut feed, &mut failures).await;
            failures = failures.saturating_add(1);
            let delay = match trouble {
                Trouble::Stopped => return,
                Trouble::Admin(message) => {
                    tracing::error!(channel = %ctx.channel_id, error = %message, "Symphony: needs an admin");
                    ctx.status.failed(format!("{message} (retrying every {} s)", slow.as_secs_f64()));
                    slow
                }
                Trouble::Retry { message, retry_after } => {
                    if s.max_attempts.is_some_and(|max| failures >= max) {
                        let m = format!(
                            "{message} — {failures} attempts in a row failed (max_attempts = {}); still retrying every {} s",
                            s.max_attempts.unwrap_or_default(),
                            slow.as_secs_f64()
                        );
                        tracing::error!(channel = %ctx.channel_id, error = %m, "Symphony datafeed failing");
                        if s.max_attempts == Some(failures) {
                            self.tell_error_room(&m).await;
                        }
                        ctx.status.failed(m);
                        slow.max(retry_after.unwrap_or_default())
                    } else {
                        tracing::warn!(channel = %ctx.channel_id, error = %message, attempt = failures, "Symphony datafeed: retrying");
                        ctx.status.reconnecting(message);
                        s.retry.delay_honouring(failures, retry_after)
                    }
                }
            };
            if or_stop(&stop, tokio::time::sleep(delay)).await.is_err() {
                return;
            }
        }
    }
}

impl Datafeed {
    async fn tell_error_room(&self, message: &str) {
        if let Ok(Some(room)) = self.0.error_stream().await {
            let text = format!("patchbay ({}): the Symphony datafeed is failing: {message}", self.0.channel_id);
            let ml = format!("<messageML>{}</messageML>", crate::messageml::escape(&text));
            if let Err(e) = self.0.post_message(&room, &ml).await {
                tracing::warn!(channel = %self.0.channel_id, error = %e, "could not tell the error room");
            }
        }
    }

    /// Signs in, learns who the bot is, opens the feed and reads it until something goes wrong.
    async fn serve(&self, ctx: &ConnectorCtx, stop: &CancellationToken, feed: &mut Feed, failures: &mut u32) -> Trouble {
        match self.serve_inner(ctx, stop, feed, failures).await {
            Ok(never) => match never {},
            Err(t) => t,
        }
    }

    async fn serve_inner(&self, ctx: &ConnectorCtx, stop: &CancellationToken, feed: &mut Feed, failures: &mut u32) -> Result<std::convert::Infallible, Trouble> {
        let sym = &self.0;
        let s = &sym.api.settings;
        or_stop(stop, sym.api.session()).await?.map_err(|e| Trouble::from(ApiError::Auth(e)))?;
        let bot = or_stop(stop, sym.sessioninfo()).await??;
        ctx.status.set_detail("bot", format!("{} (@{})", bot.display_name, bot.username).into());
        let read_timeout = s.timeout + Duration::from_secs(35);
        loop {
            if !feed.pending.is_empty() {
                let batch = feed.pending.clone();
                or_stop(stop, ctx.inbox.accept_batch(&ctx.channel_id, batch))
                    .await?
                    .map_err(|e| Trouble::retry(format!("{} messages read from the datafeed could not be stored: {e}", feed.pending.len())))?;
                feed.pending.clear();
            }
            let id = match &feed.id {
                Some(id) => id.clone(),
                None => {
                    let id = or_stop(stop, self.open(s.datafeed_version)).await??;
                    ctx.status.set_detail("datafeed", id.clone().into());
                    feed.id = Some(id.clone());
                    feed.ack.clear();
                    id
                }
            };
            ctx.status.connected();
            let events = match s.datafeed_version {
                DatafeedVersion::V2 => {
                    let body = Body::Json(serde_json::json!({"ackId": feed.ack}));
                    let path = format!("/agent/v5/datafeeds/{id}/read");
                    let a = or_stop(stop, sym.api.call(Which::Agent, reqwest::Method::POST, &path, &body, read_timeout)).await??;
                    match a.status {
                        200 => {
                            let mut v: serde_json::Value = a.json().map_err(|e| Trouble::retry(format!("datafeed read: {e}")))?;
                            let ack = v["ackId"].as_str().unwrap_or_default().to_owned();
                            // Taken, not copied: each event becomes its inbound's `raw`.
                            Some((take_array(v.get_mut("events")), Some(ack)))
                        }
                        _ => {
                            self.read_failed(feed, &id, a.status, &a.error_text(), a.retry_after, stop).await?;
                            None
                        }
                    }
                }
                DatafeedVersion::V1 => {
                    let path = format!("/agent/v4/datafeed/{id}/read");
                    let a = or_stop(stop, sym.api.call(Which::Agent, reqwest::Method::GET, &path, &Body::None, read_timeout)).await??;
                    match a.status {
                        204 => Some((Vec::new(), None)),
                        200 => {
                            let mut v: serde_json::Value = a.json().map_err(|e| Trouble::retry(format!("datafeed read: {e}")))?;
                            Some((take_array(Some(&mut v)), None))
                        }
                        _ => {
                            self.read_failed(feed, &id, a.status, &a.error_text(), a.retry_after, stop).await?;
                            None
                        }
                    }
                }
            };
            let Some((events, ack)) = events else { continue };
            *failures = 0;
            feed.stale_in_a_row = 0;
            if !events.is_empty() {
                ctx.status.event_seen();
            }
            let inbound = self.to_inbound(ctx, &bot, events);
            if !inbound.is_empty() {
                let n = inbound.len();
                match s.datafeed_version {
                    DatafeedVersion::V1 => feed.pending = inbound,
                    DatafeedVersion::V2 => {
                        // Not acknowledged unless stored: the agent delivers the batch again.
                        or_stop(stop, ctx.inbox.accept_batch(&ctx.channel_id, inbound))
                            .await?
                            .map_err(|e| Trouble::retry(format!("{n} messages read from the datafeed could not be stored (not acknowledged; the pod will deliver them again): {e}")))?;
                    }
                }
            }
            if let Some(ack) = ack {
                feed.ack = ack;
            }
        }
    }

    fn to_inbound(&self, ctx: &ConnectorCtx, bot: &BotInfo, events: Vec<serde_json::Value>) -> Vec<Inbound> {
        events
            .into_iter()
            .filter_map(|ev| {
                let id = tracing::enabled!(tracing::Level::DEBUG).then(|| ev["id"].as_str().unwrap_or_default().to_owned());
                match decide(ev, bot) {
                    Decision::Answer(i) => Some(*i),
                    Decision::Ignore(why) => {
                        tracing::debug!(channel = %ctx.channel_id, event = id.as_deref().unwrap_or_default(), why, "not answered");
                        None
                    }
                }
            })
            .collect()
    }

    /// A read answered something other than events: a stale feed is replaced; the rest is
    /// trouble.
    async fn read_failed(&self, feed: &mut Feed, id: &str, status: u16, text: &str, retry_after: Option<Duration>, stop: &CancellationToken) -> Result<(), Trouble> {
        match status {
            400 => {
                tracing::info!(feed = id, "the datafeed is gone or the ackId was refused (400); creating a new one");
                if self.0.api.settings.datafeed_version == DatafeedVersion::V2 {
                    // The old feed may still exist (a refused ackId): remove it so feeds do not pile up.
                    let path = format!("/agent/v5/datafeeds/{id}");
                    let _ = or_stop(stop, self.0.api.call(Which::Agent, reqwest::Method::DELETE, &path, &Body::None, self.0.api.settings.timeout)).await?;
                }
                feed.id = None;
                feed.ack.clear();
                feed.stale_in_a_row += 1;
                if feed.stale_in_a_row > 1 {
                    return Err(Trouble::retry(format!("the datafeed answered 400 again right after it was created: {text}")));
                }
                Ok(())
            }
            403 => Err(Trouble::Admin(format!(
                "the agent refused to read the datafeed (403: {text}): the service account may have reached 20 active feeds; delete unused ones"
            ))),
            429 | 500..=599 => Err(Trouble::Retry { message: format!("datafeed read answered {status}: {text}"), retry_after }),
            404 if self.0.api.settings.datafeed_version == DatafeedVersion::V1 => {
                feed.id = None;
                Err(Trouble::retry(format!("datafeed read answered 404: {text}")))
            }
            _ => Err(Trouble::Admin(format!(
                "datafeed read answered {status} ({text}): check agent_host, agent_port and context (now {})",
                self.0.api.settings.agent.base
            ))),
        }
    }

    /// v2: the first listed fanout feed, else a new one. v1: a new feed.
    async fn open(&self, version: DatafeedVersion) -> Result<String, Trouble> {
        let api = &self.0.api;
        let t = api.settings.timeout;
        let created = |a: crate::api::Answer, what: &str| -> Result<String, Trouble> {
            match a.status {
                200 | 201 => {
                    let v: serde_json::Value = a.json().map_err(Trouble::retry)?;
                    v["id"].as_str().map(str::to_owned).ok_or_else(|| Trouble::retry(format!("{what} answered without a feed id")))
                }
                403 | 503 if a.status == 403 || what.contains("/v4/") => Err(Trouble::Admin(format!(
                    "{what} answered {}: {} — the service account has too many active datafeeds (20); delete unused ones",
                    a.status,
                    a.error_text()
                ))),
                429 | 500..=599 => Err(Trouble::Retry { message: format!("{what} answered {}: {}", a.status, a.error_text()), retry_after: a.retry_after }),
                s => Err(Trouble::Admin(format!(
                    "{what} answered {s} ({}): check agent_host, agent_port and context (now {})",
                    a.error_text(),
                    api.settings.agent.base
                ))),
            }
        };
        match version {
            DatafeedVersion::V2 => {
                let a = api.call(Which::Agent, reqwest::Method::GET, "/agent/v5/datafeeds", &Body::None, t).await?;
                if a.ok() {
                    let feeds: Vec<serde_json::Value> = a.json().unwrap_or_default();
                    if let Some(id) = feeds.iter().filter_map(|f| f["id"].as_str()).find(|id| is_fanout_feed(id)) {
                        tracing::info!(feed = id, "reading the existing datafeed");
                        return Ok(id.to_owned());
                    }
                } else if a.status != 404 {
                    created(a, "GET /agent/v5/datafeeds")?;
                }
                let a = api.call(Which::Agent, reqwest::Method::POST, "/agent/v5/datafeeds", &Body::Json(serde_json::json!({})), t).await?;
                created(a, "POST /agent/v5/datafeeds")
            }
            DatafeedVersion::V1 => {
                let a = api.call(Which::Agent, reqwest::Method::POST, "/agent/v4/datafeed/create", &Body::None, t).await?;
                created(a, "POST /agent/v4/datafeed/create")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fanout_feeds_only() {
        assert!(is_fanout_feed("371f465fb97b5d1027d20a5e7085863a_f"));
        assert!(is_fanout_feed("e766c498eece0d113f035270ad6c3c63_f_f8001"));
        assert!(!is_fanout_feed("e766c498eece0d113f035270ad6c3c63_p_f8001"));
        assert!(!is_fanout_feed("abc"));
        assert!(!is_fanout_feed("_f"));
        assert!(!is_fanout_feed("abc_f_x_y"));
    }

    #[test]
    fn events_are_moved_out_of_the_answer() {
        let mut v = serde_json::json!({"ackId": "a1", "events": [{"id": "e1"}, {"id": "e2"}]});
        let events = take_array(v.get_mut("events"));
        assert_eq!(events.iter().map(|e| e["id"].as_str().unwrap()).collect::<Vec<_>>(), ["e1", "e2"]);
        assert_eq!(v["ackId"], "a1");
        // No events, null events, or not an array: nothing to store (v1 answers a bare array).
        assert!(take_array(serde_json::json!({"ackId": "a2"}).get_mut("events")).is_empty());
        assert!(take_array(serde_json::json!({"events": null}).get_mut("events")).is_empty());
        assert!(take_array(Some(&mut serde_json::json!({"id": "e1"}))).is_empty());
        assert_eq!(take_array(Some(&mut serde_json::json!([{"id": "e1"}]))).len(), 1);
    }
}
