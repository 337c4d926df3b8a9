//! The supervisor: runs each enabled channel's connector, and only while it is enabled. It
//! follows the registry's change feed and reconciles, vector-style: a channel whose instance
//! changed (new settings) is restarted, a disabled or deleted one is stopped, the others are
//! left alone.

use crate::registry::{Registry, Snapshot};
use patchbay_channel_core::{backoff::Backoff, Channel, ChannelId, Connector, ConnectorCtx, Inbox};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

struct Running {
    instance: Arc<dyn Channel>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

pub async fn run(registry: Arc<Registry>, inbox: Arc<dyn Inbox>, stop: CancellationToken) {
    let mut feed = registry.subscribe();
    let mut running: HashMap<String, Running> = HashMap::new();
    loop {
        let snap = feed.borrow_and_update().clone();
        reconcile(&snap, &mut running, &inbox);
        tokio::select! {
            _ = stop.cancelled() => break,
            changed = feed.changed() => if changed.is_err() { break },
        }
    }
    for (_, r) in running.iter() {
        r.stop.cancel();
    }
    for (id, r) in running {
        if tokio::time::timeout(Duration::from_secs(5), r.task).await.is_err() {
            tracing::warn!(channel = %id, "connector did not stop within 5 s");
        }
    }
}

fn reconcile(snap: &Snapshot, running: &mut HashMap<String, Running>, inbox: &Arc<dyn Inbox>) {
    // Stop what should no longer run, or runs an outdated instance.
    running.retain(|id, r| {
        let keep = snap.channels.get(id).is_some_and(|c| {
            c.record.enabled && c.instance.as_ref().is_some_and(|i| Arc::ptr_eq(i, &r.instance))
        });
        if !keep {
            tracing::info!(channel = %id, "stopping connector");
            r.stop.cancel();
        }
        keep
    });
    for (id, entry) in &snap.channels {
        if !entry.record.enabled || running.contains_key(id) {
            continue;
        }
        let Some(instance) = entry.instance.clone() else { continue };
        let Some(connector) = instance.connector() else { continue };
        tracing::info!(channel = %id, "starting connector");
        // Until the new connector reports otherwise, the channel is connecting: the status a
        // previous connector left (say `connected`, before the channel was disabled) is stale.
        entry.status.connecting();
        let stop = CancellationToken::new();
        let ctx = ConnectorCtx {
            channel_id: ChannelId::from_trusted(id.clone()),
            inbox: inbox.clone(),
            status: entry.status.clone(),
        };
        let task = tokio::spawn(keep_running(connector, ctx, stop.clone()));
        running.insert(id.clone(), Running { instance, stop, task });
    }
}

/// Runs a connector until stopped; if it returns on its own (it gave up), starts it again
/// after a backoff, so a channel that is enabled keeps trying.
async fn keep_running(connector: Arc<dyn Connector>, ctx: ConnectorCtx, stop: CancellationToken) {
    let backoff = Backoff {
        initial: Duration::from_secs(1),
        max: Duration::from_secs(60),
        factor: 2.0,
    };
    let mut attempt = 0;
    loop {
        connector.run(ctx.clone(), stop.clone()).await;
        if stop.is_cancelled() {
            return;
        }
        attempt += 1;
        let delay = backoff.delay(attempt);
        tracing::warn!(channel = %ctx.channel_id, retry_in_ms = delay.as_millis() as u64, "connector returned; restarting");
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}
