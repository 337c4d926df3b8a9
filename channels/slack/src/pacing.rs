//! Per-channel pacing of `chat.postMessage`: Slack "generally allows posting one message per
//! second per channel", with short bursts. A generic cell rate algorithm per (workspace,
//! channel): one message per `interval`, up to `burst` at once after a quiet spell.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

pub struct Pacer {
    interval: Duration,
    burst: u32,
    /// Keys are kept as 64-bit hashes: a bot posting in thousands of channels a second keeps
    /// an entry per channel for a second, and a hash needs no allocation of its own. (Two
    /// channels whose hashes collide would share one pace: with a random 64-bit hash, not
    /// in practice.)
    hasher: RandomState,
    /// key hash → theoretical arrival time of the next message; when expired keys were last
    /// removed.
    tat: Mutex<(HashMap<u64, Instant>, Instant)>,
}

impl Pacer {
    pub fn new(interval: Duration, burst: u32) -> Pacer {
        Pacer { interval, burst: burst.max(1), hasher: RandomState::new(), tat: Mutex::new((HashMap::new(), Instant::now())) }
    }

    /// Reserves the next slot of `key` (any hashable, such as `(workspace, channel)`):
    /// `Ok(wait)` — post after `wait` (zero within a burst); `Err(wait)` — the slot is
    /// further away than `max_wait`, nothing reserved (the caller gives the reply back to
    /// the queue instead of holding a sender for that long).
    pub fn reserve(&self, key: impl Hash, max_wait: Duration) -> Result<Duration, Duration> {
        let key = self.hasher.hash_one(key);
        let now = Instant::now();
        let tolerance = self.interval * (self.burst - 1);
        let mut guard = self.tat.lock().unwrap();
        let (map, pruned) = &mut *guard;
        // Keys whose slot has passed carry no state: drop them, at most once a second (a scan
        // per message would cost more than the pacing), and give back the room a burst of
        // channels left behind.
        if now.duration_since(*pruned) >= Duration::from_secs(1) && map.len() > 1024 {
            map.retain(|_, t| *t > now);
            if map.capacity() > 4 * map.len().max(1024) {
                map.shrink_to(2 * map.len());
            }
            *pruned = now;
        }
        let tat = map.get(&key).copied().filter(|t| *t > now).unwrap_or(now);
        let earliest = tat.checked_sub(tolerance).unwrap_or(now);
        let wait = earliest.saturating_duration_since(now);
        if wait > max_wait {
            return Err(wait);
        }
        map.insert(key, tat + self.interval);
        Ok(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bursts_then_one_per_interval_per_key() {
        let p = Pacer::new(Duration::from_secs(1), 3);
        let max = Duration::from_secs(5);
        assert_eq!(p.reserve("C1", max), Ok(Duration::ZERO));
        assert_eq!(p.reserve("C1", max), Ok(Duration::ZERO));
        assert_eq!(p.reserve("C1", max), Ok(Duration::ZERO));
        assert_eq!(p.reserve("C1", max), Ok(Duration::from_secs(1)));
        assert_eq!(p.reserve("C1", max), Ok(Duration::from_secs(2)));
        assert_eq!(p.reserve("C2", max), Ok(Duration::ZERO), "another channel has its own pace");
        assert_eq!(p.reserve("C1", Duration::from_millis(500)), Err(Duration::from_secs(3)), "too far: nothing reserved");
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(p.reserve("C1", max), Ok(Duration::ZERO), "a quiet spell refills the burst");
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_channels_is_forgotten_and_its_room_given_back() {
        let p = Pacer::new(Duration::from_secs(1), 3);
        for c in 0..20_000 {
            assert_eq!(p.reserve(("T1", format!("C{c}").as_str()), Duration::ZERO), Ok(Duration::ZERO));
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(p.reserve(("T1", "C1"), Duration::ZERO), Ok(Duration::ZERO));
        let guard = p.tat.lock().unwrap();
        assert_eq!(guard.0.len(), 1, "only the key reserved since");
        assert!(guard.0.capacity() < 20_000, "capacity {}", guard.0.capacity());
    }
}
