//! The call service: owns call state, streams call events to clients over
//! gRPC, asks the business service to approve calls and reports every event
//! to it.
//!
//! Layout:
//! - [`machine`]: the call state machine; pure (no I/O, no clock), tested
//!   exhaustively with property tests.
//! - [`switchboard`]: the single owner of the machine (an actor) behind the
//!   [`switchboard::Switchboard`] trait; per-device queues and their
//!   slow-consumer policy.
//! - [`business`]: approvals (deadline, failure policy) and ordered,
//!   non-blocking notices to the business hook; [`unary`]: its requests
//!   end with their message (one write fewer each).
//! - [`api`]: the gRPC edge, client API and admin API; [`convert`]
//!   validates protobuf into domain types; [`auth`] says who a client is.
//! - [`config`]: flags and environment variables; [`server`]: wiring,
//!   health, reflection and [`serve`]; [`accept`]: connections per peer,
//!   handshake timeout, accept back-off, bounded health and reflection
//!   streams; [`metrics`]: Prometheus metrics;
//!   [`codes`]: result codes from the proto.

pub mod accept;
pub mod api;
pub mod auth;
pub mod business;
pub mod codes;
pub mod config;
pub mod convert;
pub mod machine;
pub mod metrics;
pub mod server;
pub mod switchboard;
pub mod unary;

pub use config::Config;
pub use server::{Listeners, ServeError, serve};
