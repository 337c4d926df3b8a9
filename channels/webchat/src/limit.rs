//! Per-user message rates: the web chat is open to the public, so one user (or a script
//! holding one token) must not be able to flood the assistant. A token bucket per user:
//! `burst` messages at once, refilled at `per_minute`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct Limiter {
    per_sec: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl Limiter {
    /// `per_minute == 0`: no limit.
    pub fn new(per_minute: u32, burst: u32) -> Limiter {
        Limiter { per_sec: per_minute as f64 / 60.0, burst: burst.max(1) as f64, buckets: Mutex::new(HashMap::new()) }
    }

    /// Takes one message of `user`'s allowance; when there is none, answers how long until
    /// there is.
    pub fn take(&self, user: &str, now: Instant) -> Result<(), Duration> {
        if self.per_sec <= 0.0 {
            return Ok(());
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        // Full buckets carry no information: drop them now and then so memory stays bounded
        // by the users active within a refill period.
        if buckets.len() > 10_000 {
            let (per_sec, burst) = (self.per_sec, self.burst);
            buckets.retain(|_, (tokens, at)| *tokens + now.saturating_duration_since(*at).as_secs_f64() * per_sec < burst);
        }
        let (tokens, at) = buckets.entry(user.to_owned()).or_insert((self.burst, now));
        *tokens = (*tokens + now.saturating_duration_since(*at).as_secs_f64() * self.per_sec).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / self.per_sec))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let l = Limiter::new(60, 3); // one a second, three at once
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.take("u", t0).is_ok());
        }
        let wait = l.take("u", t0).unwrap_err();
        assert!(wait > Duration::from_millis(900) && wait <= Duration::from_secs(1), "{wait:?}");
        assert!(l.take("other", t0).is_ok(), "users have their own allowance");
        assert!(l.take("u", t0 + Duration::from_millis(1000)).is_ok(), "refilled");
        assert!(l.take("u", t0 + Duration::from_millis(1100)).is_err());
        assert!(l.take("u", t0 + Duration::from_secs(100)).is_ok());
    }

    #[test]
    fn zero_means_no_limit() {
        let l = Limiter::new(0, 1);
        let t0 = Instant::now();
        assert!((0..1000).all(|_| l.take("u", t0).is_ok()));
    }
}
