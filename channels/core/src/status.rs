//! A channel's health as its kind reports it, read by the admin API and the CLI.

use serde::Serialize;
use std::sync::{Arc, Mutex};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelState {
    /// Enabled and nothing has gone wrong (webhook kinds stay here).
    Ready,
    /// A connector is (re)connecting.
    Connecting,
    /// A connector holds a live connection.
    Connected,
    /// Something needs an admin: revoked credentials, a permanent delivery error.
    Failed,
    /// The channel is disabled.
    Disabled,
}

#[derive(Clone, Debug, Serialize)]
pub struct LastError {
    pub at: i64,
    pub message: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct ChannelStatus {
    pub state: ChannelState,
    /// When the state last changed (Unix ms).
    pub since: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_event_at: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<LastError>,
    pub reconnects: u64,
    /// Kind-specific facts worth showing (the bot's name, a connection id).
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    pub details: serde_json::Map<String, serde_json::Value>,
}

/// A shared, cheaply cloned handle to one channel's status. It outlives rebuilds of the
/// channel (a settings change) so that counters and the last error are kept.
#[derive(Clone, Debug)]
pub struct StatusHandle(Arc<Mutex<ChannelStatus>>);

impl Default for StatusHandle {
    fn default() -> Self {
        Self::new()
    }
}

impl StatusHandle {
    pub fn new() -> Self {
        StatusHandle(Arc::new(Mutex::new(ChannelStatus {
            state: ChannelState::Ready,
            since: crate::now_ms(),
            last_event_at: None,
            last_error: None,
            reconnects: 0,
            details: Default::default(),
        })))
    }

    pub fn snapshot(&self) -> ChannelStatus {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ChannelStatus> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_state(&self, state: ChannelState) {
        let mut s = self.lock();
        if s.state != state {
            s.state = state;
            s.since = crate::now_ms();
        }
    }

    pub fn connecting(&self) {
        self.set_state(ChannelState::Connecting)
    }

    pub fn connected(&self) {
        self.set_state(ChannelState::Connected)
    }

    pub fn reconnecting(&self, error: impl Into<String>) {
        let mut s = self.lock();
        s.reconnects += 1;
        s.last_error = Some(LastError {
            at: crate::now_ms(),
            message: error.into(),
        });
        drop(s);
        self.set_state(ChannelState::Connecting);
    }

    /// Something an admin must fix; the message must say what to do.
    pub fn failed(&self, message: impl Into<String>) {
        self.error(message);
        self.set_state(ChannelState::Failed);
    }

    /// Records an error without changing the state (a delivery that will be retried).
    pub fn error(&self, message: impl Into<String>) {
        self.lock().last_error = Some(LastError {
            at: crate::now_ms(),
            message: message.into(),
        });
    }

    pub fn event_seen(&self) {
        self.lock().last_event_at = Some(crate::now_ms());
    }

    pub fn set_detail(&self, key: &str, value: serde_json::Value) {
        self.lock().details.insert(key.to_owned(), value);
    }
}
