//! A message acknowledged to a platform is never lost when patchbay is killed with SIGKILL.
//!
//! Load runs against a loopback channel (echo assistant, replies POSTed to a receiver);
//! patchbay is killed mid-load, started again on the same database, and every message that
//! was acknowledged must be answered. Replies carry stable ids, so repeats (a reply delivered
//! just before the kill, whose delivery was not yet recorded) are recognisable; the test
//! reports how many it saw.

mod common;
#[path = "common/recorder.rs"]
mod recorder;

use common::*;
use recorder::*;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SENDERS: usize = 24;
const MAX_PER_SENDER: usize = 400;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_sigkill() {
    let receiver = Fake::start().await;
    // A short lease: the messages the killed process had claimed are taken up again when
    // their lease expires (another replica would do the same).
    let config = format!("[pipeline]\nlease_secs = 5\n{}", loopback_config("crash", &receiver.url));
    let mut pb = Patchbay::start(&config);
    let hook = pb.callback_url("crash").await;

    // Each sender is one conversation and sends its messages one after another, so the
    // order of its replies is defined. Acknowledged = 200 with "accepted": true.
    let acked: Arc<Mutex<Vec<(usize, usize)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for s in 0..SENDERS {
        let (acked, stop, hook) = (acked.clone(), stop.clone(), hook.clone());
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
            for n in 0..MAX_PER_SENDER {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let body = serde_json::json!({"id": format!("s{s}-m{n}"), "conversation": format!("conv-{s}"), "text": format!("s{s}-m{n}")});
                match client.post(&hook).json(&body).send().await {
                    Ok(r) if r.status() == 200 => {
                        let v: serde_json::Value = r.json().await.unwrap_or_default();
                        if v["accepted"] == true {
                            acked.lock().unwrap().push((s, n));
                        }
                    }
                    // The process is gone: this one was not acknowledged; stop sending.
                    _ => break,
                }
            }
        }));
    }

    // Kill once a good part of the load is acknowledged and replies are flowing.
    eventually(Duration::from_secs(60), "load under way", || async {
        (acked.lock().unwrap().len() >= 1500 && receiver.ok().len() >= 100).then_some(())
    })
    .await;
    pb.kill();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let acked: Vec<(usize, usize)> = acked.lock().unwrap().clone();
    let delivered_before_restart = receiver.ok().len();

    pb.start_again();

    // Every acknowledged message is answered.
    let want: HashSet<String> = acked.iter().map(|(s, n)| format!("echo: s{s}-m{n}")).collect();
    eventually(Duration::from_secs(120), "every acknowledged message answered after the restart", || async {
        let got: HashSet<String> = receiver
            .ok()
            .iter()
            .filter_map(|r| r["reply"]["text"].as_str().map(str::to_owned))
            .collect();
        want.is_subset(&got).then_some(())
    })
    .await;

    let received = receiver.ok();
    let mut by_id: HashMap<String, usize> = HashMap::new();
    let mut text_of_id: HashMap<String, String> = HashMap::new();
    for r in &received {
        let id = r["reply_id"].as_str().unwrap().to_owned();
        let text = r["reply"]["text"].as_str().unwrap().to_owned();
        *by_id.entry(id.clone()).or_default() += 1;
        // A repeat is recognisable: the same id always carries the same reply.
        if let Some(prev) = text_of_id.insert(id.clone(), text.clone()) {
            assert_eq!(prev, text, "reply id {id} carried two different replies");
        }
    }
    let repeats: usize = by_id.values().map(|n| n - 1).sum();
    let distinct_texts: HashSet<&String> = text_of_id.values().collect();
    assert_eq!(distinct_texts.len(), by_id.len(), "two reply ids for one message");

    // Order within each conversation, by first delivery.
    let mut seen: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut first = HashSet::new();
    for r in &received {
        let id = r["reply_id"].as_str().unwrap();
        if !first.insert(id.to_owned()) {
            continue;
        }
        let text = r["reply"]["text"].as_str().unwrap();
        let (conv, n) = text.trim_start_matches("echo: ").split_once("-m").unwrap();
        seen.entry(conv.to_owned()).or_default().push(n.parse().unwrap());
    }
    for (conv, ns) in &seen {
        assert!(ns.windows(2).all(|w| w[0] < w[1]), "conversation {conv} answered out of order: {ns:?}");
    }

    println!(
        "sigkill: acknowledged={} delivered_before_kill={} delivered_total={} distinct_replies={} repeats={}",
        acked.len(),
        delivered_before_restart,
        received.len(),
        by_id.len(),
        repeats
    );
    receiver.stop().await;
}
