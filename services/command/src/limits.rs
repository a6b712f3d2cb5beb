//! Limits that keep one caller from costing everyone: refused registrations per subject, and log lines about
//! refused tokens (a flood of bad tokens must not become a flood of log lines).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// At most `max` refused registrations per subject per `window`, in this process.
pub(crate) struct RefusalLimit {
    max: u32,
    window: Duration,
    /// Subject → (start of its window, refusals in it).
    seen: Mutex<HashMap<String, (Instant, u32)>>,
}

/// How many subjects are remembered before old windows are swept (memory stays bounded under a flood).
const SWEEP_AT: usize = 10_000;

impl RefusalLimit {
    pub(crate) fn new(max: u32, window: Duration) -> Self {
        RefusalLimit { max, window, seen: Mutex::default() }
    }

    /// `Err(wait)` when `subject` has used up its refusals: it may try again after `wait`.
    pub(crate) fn check(&self, subject: &str) -> Result<(), Duration> {
        let Ok(seen) = self.seen.lock() else { return Ok(()) };
        match seen.get(subject) {
            Some((start, count)) if *count >= self.max && start.elapsed() < self.window => {
                Err(self.window.saturating_sub(start.elapsed()))
            }
            _ => Ok(()),
        }
    }

    /// Counts one refusal of `subject`.
    pub(crate) fn refused(&self, subject: &str) {
        let Ok(mut seen) = self.seen.lock() else { return };
        if seen.len() >= SWEEP_AT {
            let window = self.window;
            seen.retain(|_, (start, _)| start.elapsed() < window);
        }
        let entry = seen.entry(subject.to_owned()).or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= self.window {
            *entry = (Instant::now(), 0);
        }
        entry.1 += 1;
    }
}

/// Lets one event through per interval and counts the rest, so that the line that is written says how many it
/// stands for.
pub(crate) struct Sampler {
    interval_ms: u64,
    started: Instant,
    /// Milliseconds since `started` of the last event let through (plus one, so that 0 means never).
    last: AtomicU64,
    suppressed: AtomicU64,
}

impl Sampler {
    pub(crate) fn new(interval: Duration) -> Self {
        Sampler {
            interval_ms: u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
            started: Instant::now(),
            last: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when this event should be logged, `n` being how many were left out since the last one.
    pub(crate) fn sample(&self) -> Option<u64> {
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX).saturating_add(1);
        let last = self.last.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < self.interval_ms {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        if self.last.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_err() {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subject_is_limited_after_its_refusals_and_others_are_not() {
        let limit = RefusalLimit::new(3, Duration::from_secs(60));
        for _ in 0..3 {
            assert!(limit.check("github|1").is_ok());
            limit.refused("github|1");
        }
        let wait = limit.check("github|1").unwrap_err();
        assert!(wait > Duration::from_secs(50) && wait <= Duration::from_secs(60));
        assert!(limit.check("github|2").is_ok());
        let short = RefusalLimit::new(1, Duration::ZERO);
        short.refused("x");
        assert!(short.check("x").is_ok(), "a window that has passed limits nothing");
    }

    #[test]
    fn a_sampler_lets_one_through_per_interval_and_counts_the_rest() {
        let sampler = Sampler::new(Duration::from_secs(3600));
        assert_eq!(sampler.sample(), Some(0));
        assert_eq!(sampler.sample(), None);
        assert_eq!(sampler.sample(), None);
        let often = Sampler::new(Duration::ZERO);
        assert_eq!(often.sample(), Some(0));
        assert_eq!(often.sample(), Some(0));
    }
}
