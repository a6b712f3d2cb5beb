//! Limits that keep one caller from costing everyone: costly attempts per subject (refused registrations, calls to
//! GitHub), and log lines about refused tokens (a flood of bad tokens must not become a flood of log lines).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// At most `max` costly attempts per subject per `window`, in this process: refused registrations, and every call
/// that asks GitHub (a sync, a registration whose GitHub call failed). An attempt takes its place before it starts
/// ([`SubjectLimit::take`]), so that concurrent calls of one subject cannot all pass a check made before any of
/// them was counted; an attempt that turns out to cost nothing gives its place back ([`Attempt::free`]).
pub(crate) struct SubjectLimit {
    max: u32,
    window: Duration,
    /// Subject → (start of its window, attempts in it).
    seen: Mutex<HashMap<String, (Instant, u32)>>,
}

/// How many subjects are remembered before old windows are swept (memory stays bounded under a flood).
const SWEEP_AT: usize = 10_000;

/// A subject's place in its window, taken by [`SubjectLimit::take`]: it counts unless [`Attempt::free`]d.
pub(crate) struct Attempt<'a> {
    limit: &'a SubjectLimit,
    subject: String,
}

impl Attempt<'_> {
    /// The attempt cost nothing (a registration that went through): its place is given back.
    pub(crate) fn free(self) {
        let Ok(mut seen) = self.limit.seen.lock() else { return };
        if let Some((_, count)) = seen.get_mut(&self.subject) {
            *count = count.saturating_sub(1);
        }
    }
}

impl SubjectLimit {
    pub(crate) fn new(max: u32, window: Duration) -> Self {
        SubjectLimit { max, window, seen: Mutex::default() }
    }

    /// A place for one more attempt of `subject`, counted at once; `Err(wait)` when its window is full: it may
    /// try again after `wait`.
    pub(crate) fn take(&self, subject: &str) -> Result<Attempt<'_>, Duration> {
        let Ok(mut seen) = self.seen.lock() else { return Ok(Attempt { limit: self, subject: subject.to_owned() }) };
        if seen.len() >= SWEEP_AT {
            let window = self.window;
            seen.retain(|_, (start, _)| start.elapsed() < window);
        }
        let entry = seen.entry(subject.to_owned()).or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= self.window {
            *entry = (Instant::now(), 0);
        }
        if entry.1 >= self.max {
            return Err(self.window.saturating_sub(entry.0.elapsed()));
        }
        entry.1 += 1;
        Ok(Attempt { limit: self, subject: subject.to_owned() })
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
    fn a_subject_is_limited_after_its_attempts_and_others_are_not() {
        let limit = SubjectLimit::new(3, Duration::from_secs(60));
        let taken: Vec<_> = (0..3).map(|_| limit.take("github|1").unwrap()).collect();
        let wait = limit.take("github|1").err().unwrap();
        assert!(wait > Duration::from_secs(50) && wait <= Duration::from_secs(60));
        assert!(limit.take("github|2").is_ok());
        // An attempt that cost nothing gives its place back.
        taken.into_iter().next().unwrap().free();
        assert!(limit.take("github|1").is_ok());
        assert!(limit.take("github|1").is_err());
        let short = SubjectLimit::new(1, Duration::ZERO);
        let _ = short.take("x").unwrap();
        assert!(short.take("x").is_ok(), "a window that has passed limits nothing");
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
