//! The call service: owns call state, streams call events to clients over
//! gRPC, asks the business service to approve calls and reports every event
//! to it.
//!
//! Layout:
//! - [`machine`]: the call rules; pure (no I/O, no clock), each input one
//!   transition over the records; tested rule by rule, with a property test
//!   of random interleavings against the contract and one of transitions
//!   racing for the same records (see `machine/tests.rs`), and fuzzed
//!   (`fuzz/`).
//! - [`store`]: the records (users, devices, calls), the [`store::Store`]
//!   contract (atomic commit with version checks, effects routed in the
//!   same step) and the in-memory store; [`clock`]: wall-clock times for
//!   records, advanced by the monotonic clock. [`shared`]: the records in
//!   Redis for several nodes (one commit script with the version checks;
//!   the rules run over loaded snapshots), with the races between nodes
//!   tested against a real redis-server.
//! - [`switchboard`]: the single owner of the machine (an actor) behind the
//!   [`switchboard::Switchboard`] trait; per-device queues and their
//!   slow-consumer policy; its observer task logs and counts what it did.
//! - [`device`]: what a device's queue carries (domain values, encoded by
//!   the device's own stream).
//! - [`hook`]: what the switchboard needs of the business service, as a
//!   trait; [`business`] implements it over gRPC: approvals (deadline,
//!   failure policy) and ordered, non-blocking notices, drained on shutdown;
//!   [`unary`]: its requests end with their message (one write fewer each).
//! - [`api`]: the gRPC edge, client API and admin API; controls refused for
//!   their rate or form are answered here, never queued for the
//!   switchboard; [`convert`] validates protobuf into domain types and
//!   encodes domain types; [`auth`] says who a client is. [`web`]: the
//!   browser edge, the same session over a WebSocket in the contract's JSON
//!   mapping, and the web phone's page (`call-service/web/`).
//!
//! Dependencies point one way, from the edge down to the rules: `server` →
//! `api` → `switchboard` → `machine` → `store` → `device` → `domain`, and
//! `business` → `convert` → `domain`, `hook` → `domain` (with `clock`,
//! `codes` and `metrics` beside them all). [`domain`]: the values every
//! layer shares (ids, events, notices, effects, the call record).
//! - [`config`]: flags and environment variables, their defaults defined
//!   once in [`defaults`]; [`server`]: wiring, health, reflection and
//!   [`serve`], over the serving plumbing both services share in
//!   `videocall_telemetry` (accepting connections: per-peer limits,
//!   handshake timeout, accept back-off, Nagle off; bounded health and
//!   reflection streams; the close grace); [`metrics`]: Prometheus
//!   metrics; [`codes`]: result codes from the proto.

pub mod api;
pub mod auth;
pub mod business;
pub mod clock;
pub mod cluster;
pub mod codes;
pub mod config;
pub mod convert;
pub mod defaults;
pub mod device;
pub mod domain;
pub mod hook;
pub mod machine;
pub mod metrics;
pub mod server;
pub mod shared;
pub mod store;
pub mod switchboard;
pub mod unary;
pub mod web;

pub use config::Config;
pub use server::{Listeners, ServeError, serve};
