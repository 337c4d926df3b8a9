//! Exponential backoff with jitter, shared by retries and reconnects.

use rand::Rng;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    pub factor: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(300),
            factor: 2.0,
        }
    }
}

impl Backoff {
    /// The nominal delay before attempt `attempt + 1` (attempt counts from 1), without jitter.
    pub fn nominal(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(40) as i32;
        let secs = self.initial.as_secs_f64() * self.factor.powi(exp);
        Duration::from_secs_f64(secs.min(self.max.as_secs_f64()))
    }

    /// The delay with "equal jitter": half fixed, half random, so retries of many messages
    /// that failed together spread out but never come back sooner than half the nominal delay.
    pub fn delay(&self, attempt: u32) -> Duration {
        let nominal = self.nominal(attempt).as_secs_f64();
        let half = nominal / 2.0;
        let jitter = rand::thread_rng().gen_range(0.0..=half.max(f64::MIN_POSITIVE));
        Duration::from_secs_f64(half + jitter)
    }

    /// The delay to use when the other side said how long to wait (Retry-After): never
    /// sooner than it asked.
    pub fn delay_honouring(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let own = self.delay(attempt);
        match retry_after {
            Some(ra) => ra.max(own.min(ra + Duration::from_secs(1))),
            None => own,
        }
    }
}

/// Parses an HTTP `Retry-After` value given in seconds (the form chat platforms use).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs.min(3600)));
    }
    v.parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(|s| Duration::from_secs_f64(s.min(3600.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_caps() {
        let b = Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(10),
            factor: 2.0,
        };
        assert_eq!(b.nominal(1), Duration::from_secs(1));
        assert_eq!(b.nominal(2), Duration::from_secs(2));
        assert_eq!(b.nominal(4), Duration::from_secs(8));
        assert_eq!(b.nominal(9), Duration::from_secs(10));
        for attempt in 1..10 {
            let d = b.delay(attempt);
            assert!(d >= b.nominal(attempt) / 2 && d <= b.nominal(attempt), "{d:?}");
        }
    }

    #[test]
    fn retry_after_is_a_floor() {
        let b = Backoff::default();
        let d = b.delay_honouring(1, Some(Duration::from_secs(30)));
        assert!(d >= Duration::from_secs(30) && d <= Duration::from_secs(31));
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("soon"), None);
    }
}
