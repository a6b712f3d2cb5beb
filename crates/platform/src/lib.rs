//! What every kiroku process shares: reading settings (with the one-line, exit-64 errors of the contract),
//! connecting to PostgreSQL and Redis with start-up retries, tracing, shutdown signals, health, fail points.
//!
//! It knows no business rule and no SQL of the log.

pub mod access;
pub mod auth;
pub mod caller;
pub mod config;
mod connect;
pub mod echo;
mod failpoint;
pub mod grpc;
pub mod health;
pub mod metrics;
pub mod shed;
mod shutdown;
pub mod status;
mod telemetry;
pub mod tls;
pub mod trace;

pub use connect::{connect_postgres, connect_redis, open_database};
pub use failpoint::failpoint;
pub use shutdown::{Shutdown, ShutdownTrigger, run_until_signal, shutdown_signal};
pub use telemetry::{Telemetry, init_tracing};
