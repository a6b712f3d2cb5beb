//! Fail points for crash tests: `KIROKU_FAILPOINT=name:n` makes the process abort (as if SIGKILLed: no
//! destructor, no flush, no graceful anything) the n-th time it passes the point called `name`.
//!
//! Crash tests must kill a process at an exact step, not by luck of timing. Unset, a fail point costs one
//! relaxed atomic load.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

struct Armed {
    name: String,
    remaining: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let spec = std::env::var("KIROKU_FAILPOINT").ok()?;
            let (name, count) = spec.split_once(':').unwrap_or((spec.as_str(), "1"));
            Some(Armed { name: name.to_owned(), remaining: AtomicU64::new(count.parse().unwrap_or(1)) })
        })
        .as_ref()
}

/// Aborts the process when the fail point `name` is armed and reached for the configured time.
pub fn failpoint(name: &str) {
    if let Some(armed) = armed()
        && armed.name == name
        && armed.remaining.fetch_sub(1, Ordering::Relaxed) == 1
    {
        eprintln!("fail point {name} reached: aborting");
        std::process::abort();
    }
}
