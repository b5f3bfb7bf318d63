//! Benchmarks of the video-call service: a load generator that drives real
//! SDK clients through full calls against the real services, started as
//! separate processes.
//!
//! Layout:
//! - [`calls`]: the open-loop call generator (rate, concurrency, plan of
//!   answered / rejected / cancelled / timed-out calls, checked event by
//!   event) and its latency figures.
//! - [`ramp`]: a run at one rate with the servers' CPU and memory, and the
//!   ramp that finds the highest clean rate.
//! - [`conns`]: N idle connected devices from several source addresses;
//!   memory per device and per call.
//! - [`echo`]: a minimal tonic echo service and its closed-loop load, the
//!   transport baseline.
//! - [`floor`]: a relay serving the call protocol with no call state, the
//!   floor under the call rate with the same clients.
//! - [`procs`]: the services as child processes, `/proc` sampling, metrics
//!   scraping.
//! - [`soak`]: a long run with memory over time and the call records
//!   counted at the end.
//! - [`report`]: the markdown summary.
//! - [`stats`]: latency histograms.
//!
//! `scripts/bench.sh` runs everything side by side with Kamailio and SIPp.

pub mod calls;
pub mod conns;
pub mod echo;
pub mod floor;
pub mod procs;
pub mod ramp;
pub mod report;
pub mod soak;
pub mod stats;
