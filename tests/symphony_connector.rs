//! The Symphony connector against the fake pod with an inbox that fails on purpose: the
//! datafeed is acknowledged only once the inbox has stored what was read (v2), and a v1
//! batch (which cannot be read twice) is kept until it is stored.

#[path = "common/fake_symphony.rs"]
mod fake_symphony;
#[path = "common/tls.rs"]
mod tls;

use async_trait::async_trait;
use fake_symphony::FakeSymphony;
use patchbay_channel_core::{Accepted, Channel, ChannelId, ConnectorCtx, Inbound, Inbox, InboxError, StatusHandle, WaitOutcome};
use patchbay_channel_symphony::{api::Api, channel::SymphonyChannel, http::Clients, Settings};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Refuses the first `fail` batches, then stores.
#[derive(Default)]
struct FlakyInbox {
    fail: AtomicUsize,
    refused: AtomicUsize,
    stored: Mutex<Vec<Inbound>>,
}

#[async_trait]
impl Inbox for FlakyInbox {
    async fn accept(&self, channel: &ChannelId, inbound: Inbound) -> Result<Accepted, InboxError> {
        self.accept_batch(channel, vec![inbound]).await.map(|mut v| v.remove(0))
    }

    async fn accept_batch(&self, _: &ChannelId, inbound: Vec<Inbound>) -> Result<Vec<Accepted>, InboxError> {
        if self.fail.load(Ordering::SeqCst) > 0 {
            self.fail.fetch_sub(1, Ordering::SeqCst);
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(InboxError::Unavailable("disk full (test)".into()));
        }
        let n = inbound.len();
        self.stored.lock().unwrap().extend(inbound);
        Ok(vec![Accepted::New; n])
    }

    async fn accept_and_wait(&self, _: &ChannelId, _: Inbound, _: Duration) -> Result<WaitOutcome, InboxError> {
        unreachable!("the datafeed never waits for answers")
    }
}

async fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Running {
    pod: FakeSymphony,
    inbox: Arc<FlakyInbox>,
    status: StatusHandle,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    alice: i64,
}

async fn run(version: &str, fail: usize) -> Running {
    let pod = FakeSymphony::start().await;
    let public = std::fs::read_to_string(format!("{}/tests/fixtures/symphony/bot_public.pem", env!("CARGO_MANIFEST_DIR"))).unwrap();
    pod.add_bot("patchbay-bot", "Patchbay Bot", &public);
    let alice = pod.add_user("alice", "Alice");
    pod.set_long_poll(Duration::from_millis(300));
    let settings = Settings::parse(&serde_json::json!({
        "host": "127.0.0.1", "port": pod.port, "scheme": "http", "bot_username": "patchbay-bot",
        "bot_private_key_path": format!("{}/tests/fixtures/symphony/bot_pkcs1.pem", env!("CARGO_MANIFEST_DIR")),
        "datafeed_version": version, "initial_interval_ms": 50, "max_interval_ms": 200,
    }))
    .unwrap();
    let clients = Clients::new(&settings).unwrap();
    let channel = SymphonyChannel::new(ChannelId::parse("sym").unwrap(), Api::new(settings, clients));
    let connector = channel.connector().expect("a connector");
    let inbox = Arc::new(FlakyInbox { fail: AtomicUsize::new(fail), ..Default::default() });
    let status = StatusHandle::new();
    let stop = CancellationToken::new();
    let ctx = ConnectorCtx { channel_id: ChannelId::parse("sym").unwrap(), inbox: inbox.clone(), status: status.clone() };
    let s = stop.clone();
    let task = tokio::spawn(async move { connector.run(ctx, s).await });
    eventually("the first read", || (!pod.reads().is_empty()).then_some(())).await;
    Running { pod, inbox, status, stop, task, alice }
}

impl Running {
    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(1), self.task).await.expect("the connector stops within a second of stop").unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_acknowledges_a_batch_only_after_the_inbox_stored_it() {
    let r = run("v2", 2).await;
    let im = r.pod.im(r.alice);
    let id = r.pod.say(r.alice, &im, "keep me");
    let stored = eventually("the message stored", || {
        let s = r.inbox.stored.lock().unwrap().clone();
        (!s.is_empty()).then_some(s)
    })
    .await;
    assert_eq!(stored.len(), 1);
    assert_eq!((stored[0].event_id.as_str(), stored[0].text.as_str()), (id.as_str(), "keep me"));
    assert_eq!(r.inbox.refused.load(Ordering::SeqCst), 2);

    let reads = r.pod.reads();
    let carrying: Vec<usize> = (0..reads.len()).filter(|&i| reads[i].delivered.contains(&id)).collect();
    assert_eq!(carrying.len(), 3, "read, refused, read again, refused, read again, stored: {reads:?}");
    for w in carrying.windows(2) {
        let (first, again) = (&reads[w[0]], &reads[w[1]]);
        assert_eq!(again.ack_in, first.ack_in, "a refused batch is not acknowledged");
        assert_ne!(again.ack_in, first.ack_out);
        assert_eq!(again.redelivered, 1, "the agent delivered it again");
    }
    let last = carrying[2];
    eventually("the stored batch is acknowledged", || (r.pod.reads().len() > last + 1).then_some(())).await;
    assert_eq!(r.pod.reads()[last + 1].ack_in, reads[last].ack_out, "acknowledged once stored");
    assert!(r.status.snapshot().last_error.unwrap().message.contains("not acknowledged"));
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_keeps_a_batch_until_the_inbox_stored_it() {
    let r = run("v1", 3).await;
    let im = r.pod.im(r.alice);
    let id = r.pod.say(r.alice, &im, "v1 cannot read twice");
    let stored = eventually("the message stored", || {
        let s = r.inbox.stored.lock().unwrap().clone();
        (!s.is_empty()).then_some(s)
    })
    .await;
    assert_eq!(stored[0].event_id, id);
    assert_eq!(r.inbox.refused.load(Ordering::SeqCst), 3);
    // Read from the feed once: the batch was kept, not read again.
    assert_eq!(r.pod.reads().iter().filter(|x| x.delivered.contains(&id)).count(), 1);
    r.stop().await;
}
