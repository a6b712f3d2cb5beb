//! The projector's metrics: its status as gauges (sampled every second, the same figures as
//! `kiroku projector status`), and counters moved by the consumer as it works.

use crate::projection::{PROJECTION, Status, Step};

/// The help text of the projector's metrics.
pub fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge};
    describe_gauge!("kiroku_projector_checkpoint_position", "the active generation's checkpoint, by projection");
    describe_gauge!("kiroku_projector_generation", "the projection's active generation (a rebuild moves it)");
    describe_gauge!("kiroku_projector_lag_events", "final events after the checkpoint, not yet applied");
    describe_gauge!(
        "kiroku_projector_lag_seconds",
        "how long the oldest final event not yet applied has been committed"
    );
    describe_gauge!("kiroku_event_store_head_position", "the highest position committed in the log");
    describe_gauge!(
        "kiroku_horizon_undeliverable_events",
        "events committed above the horizon: no reader can deliver them until an older transaction ends"
    );
    describe_gauge!(
        "kiroku_horizon_oldest_transaction_seconds",
        "age of the oldest open transaction holding the horizon back (a lower bound when it is not visible)"
    );
    describe_gauge!("kiroku_projector_dead_letters", "events of the active generation that failed every attempt");
    describe_gauge!(
        "kiroku_projector_parked_events",
        "events set aside behind a dead-lettered event of their aggregate"
    );
    describe_gauge!(
        "kiroku_projector_parked_aggregates",
        "aggregates (users) held back by a dead letter: their later events wait until it is replayed"
    );
    describe_counter!("kiroku_projector_events_applied_total", "events applied, by source (stream, store)");
    describe_counter!(
        "kiroku_projector_events_batched_total",
        "of the events applied, those that went in by one multi-row insert of their run (the rest one by one)"
    );
    describe_counter!(
        "kiroku_projector_events_parked_total",
        "events set aside behind a dead letter of their aggregate"
    );
    describe_counter!("kiroku_projector_dead_lettered_total", "events dead-lettered");
    describe_counter!(
        "kiroku_vault_unopenable_events_total",
        "events whose data key did not unwrap (a corrupt key, a master key not given): set aside, the rest flowed"
    );
    describe_counter!(
        "kiroku_projector_autoclaim_takeovers_total",
        "stream entries taken over (XAUTOCLAIM) from a consumer that left them pending"
    );
    // Present from the start (at zero), so that rates and alerts work before the first occurrence.
    for source in ["stream", "store"] {
        metrics::counter!("kiroku_projector_events_applied_total", "source" => source).increment(0);
    }
    for counter in [
        "kiroku_vault_unopenable_events_total",
        "kiroku_projector_events_batched_total",
        "kiroku_projector_events_parked_total",
        "kiroku_projector_dead_lettered_total",
        "kiroku_projector_autoclaim_takeovers_total",
    ] {
        metrics::counter!(counter).increment(0);
    }
}

/// Sets the status gauges; `stall_seconds` is the horizon stall's age as the sampler measured it.
pub(crate) fn record_status(status: &Status, stall_seconds: f64) {
    // The generation is a value, not a label: a label would leave the last generation's series behind, frozen,
    // after every rebuild.
    metrics::gauge!("kiroku_projector_checkpoint_position", "projection" => PROJECTION)
        .set(status.checkpoint.get() as f64);
    metrics::gauge!("kiroku_projector_generation", "projection" => PROJECTION).set(f64::from(status.generation));
    metrics::gauge!("kiroku_projector_lag_events").set(status.lag.events as f64);
    metrics::gauge!("kiroku_projector_lag_seconds").set(status.lag_seconds.unwrap_or(0.0));
    metrics::gauge!("kiroku_event_store_head_position").set(status.head.get() as f64);
    metrics::gauge!("kiroku_horizon_undeliverable_events").set(status.lag.undeliverable_events as f64);
    metrics::gauge!("kiroku_horizon_oldest_transaction_seconds").set(stall_seconds);
    metrics::gauge!("kiroku_projector_dead_letters").set(status.dead_letters as f64);
    metrics::gauge!("kiroku_projector_parked_events").set(status.parked_events as f64);
    metrics::gauge!("kiroku_projector_parked_aggregates").set(status.parked_aggregates as f64);
}

/// Counts what one step did.
pub(crate) fn record_step(step: &Step) {
    let source = match step.source {
        crate::projection::Source::Nothing => return,
        crate::projection::Source::Stream => "stream",
        crate::projection::Source::Store => "store",
    };
    metrics::counter!("kiroku_projector_events_applied_total", "source" => source).increment(step.applied as u64);
    metrics::counter!("kiroku_projector_events_batched_total").increment(step.batched as u64);
    metrics::counter!("kiroku_projector_events_parked_total").increment(step.parked as u64);
    metrics::counter!("kiroku_projector_dead_lettered_total").increment(step.dead_lettered.len() as u64);
}
