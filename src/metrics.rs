//! Prometheus metrics: per-channel counters and latency histograms, kept in atomics on the
//! hot path and rendered in the text exposition format on `/metrics`.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Bucket upper bounds, in seconds: from 250 µs to 60 s.
const BUCKETS: &[f64] = &[
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; 18],
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let idx = BUCKETS.iter().position(|b| secs <= *b).unwrap_or(BUCKETS.len());
        self.counts[idx].fetch_add(1, Relaxed);
        self.sum_micros.fetch_add(d.as_micros() as u64, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cumulative += self.counts[i].load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b}\"}} {cumulative}");
        }
        cumulative += self.counts[BUCKETS.len()].load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum_micros.load(Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
    }
}

/// One channel's numbers.
#[derive(Default)]
pub struct ChannelMetrics {
    /// Messages handed to the inbox (new and duplicates).
    pub received: AtomicU64,
    /// Messages stored and acknowledged to the platform.
    pub acknowledged: AtomicU64,
    /// Redeliveries dropped by the dedupe.
    pub duplicates: AtomicU64,
    /// Hook requests answered without the inbox because the channel was disabled.
    pub dropped_disabled: AtomicU64,
    /// Replies delivered to the platform.
    pub delivered: AtomicU64,
    /// Failed attempts (assistant or delivery) that will be retried.
    pub retried: AtomicU64,
    /// Messages or replies given up on (dead letters).
    pub failed: AtomicU64,
    /// Time to store and acknowledge a message.
    pub ack_latency: Histogram,
    /// Time the assistant took.
    pub assistant_latency: Histogram,
    /// From receipt to the reply delivered.
    pub end_to_end_latency: Histogram,
}

#[derive(Default)]
pub struct Metrics {
    channels: RwLock<HashMap<String, Arc<ChannelMetrics>>>,
}

impl Metrics {
    pub fn channel(&self, id: &str) -> Arc<ChannelMetrics> {
        if let Some(m) = self.channels.read().unwrap_or_else(|p| p.into_inner()).get(id) {
            return m.clone();
        }
        self.channels
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.to_owned())
            .or_default()
            .clone()
    }

    pub fn render(&self, depths: Option<crate::store::QueueDepths>) -> String {
        let mut out = String::with_capacity(8192);
        let channels = self.channels.read().unwrap_or_else(|p| p.into_inner());
        let mut ids: Vec<&String> = channels.keys().collect();
        ids.sort();
        let counters: &[(&str, &str, fn(&ChannelMetrics) -> &AtomicU64)] = &[
            ("patchbay_messages_received_total", "Messages handed to the inbox, duplicates included.", |m| &m.received),
            ("patchbay_messages_acknowledged_total", "Messages stored and acknowledged to the platform.", |m| &m.acknowledged),
            ("patchbay_messages_duplicate_total", "Redeliveries dropped by the dedupe.", |m| &m.duplicates),
            ("patchbay_messages_dropped_disabled_total", "Hook requests answered without processing because the channel was disabled.", |m| &m.dropped_disabled),
            ("patchbay_replies_delivered_total", "Replies delivered to the platform.", |m| &m.delivered),
            ("patchbay_attempts_retried_total", "Failed attempts that will be retried.", |m| &m.retried),
            ("patchbay_failed_total", "Messages and replies moved to the dead letters.", |m| &m.failed),
        ];
        for (name, help, get) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for id in &ids {
                let _ = writeln!(out, "{name}{{channel=\"{id}\"}} {}", get(&channels[*id]).load(Relaxed));
            }
        }
        let histograms: &[(&str, &str, fn(&ChannelMetrics) -> &Histogram)] = &[
            ("patchbay_ack_latency_seconds", "Time to store and acknowledge a message.", |m| &m.ack_latency),
            ("patchbay_assistant_latency_seconds", "Time the assistant took to answer.", |m| &m.assistant_latency),
            ("patchbay_end_to_end_latency_seconds", "From receipt to the reply delivered.", |m| &m.end_to_end_latency),
        ];
        for (name, help, get) in histograms {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
            for id in &ids {
                get(&channels[*id]).render(&mut out, name, &format!("channel=\"{id}\""));
            }
        }
        if let Some(d) = depths {
            let _ = writeln!(out, "# HELP patchbay_queue_depth Rows waiting in each queue.\n# TYPE patchbay_queue_depth gauge");
            let _ = writeln!(out, "patchbay_queue_depth{{queue=\"inbox\"}} {}", d.inbox);
            let _ = writeln!(out, "patchbay_queue_depth{{queue=\"outbox\"}} {}", d.outbox);
            let _ = writeln!(out, "patchbay_queue_depth{{queue=\"dead_letters\"}} {}", d.dead_letters);
        }
        out
    }
}
