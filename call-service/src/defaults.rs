//! Every default of the call service, defined once: the flags' defaults
//! (`config`) and the `Default`s that tests and embedders use read these.
//! Durations are text, as on the command line; [`duration`] reads them.

use std::time::Duration;

pub const MAX_MESSAGE_BYTES: usize = 16 * 1024;
pub const MAX_DEVICES_PER_USER: usize = 8;
pub const MAX_CONNECTIONS: usize = 100_000;
pub const CONTROLS_PER_SECOND: u32 = 20;
pub const CONTROL_BURST: u32 = 40;
pub const MAX_PENDING_APPROVALS: usize = 10_000;
pub const KEEPALIVE_INTERVAL: &str = "30s";
pub const RESUME_GRACE: &str = "10s";
pub const KEEPALIVE_TIMEOUT: &str = "10s";
/// Notices of one caller's calls waiting for the business service.
pub const MAX_NOTICES_PER_CALLER: usize = 64;
/// Notice lanes to the business service.
pub const LANES: usize = 8;
/// Notices one lane holds.
pub const LANE_QUEUE: usize = 4096;
pub const NOTICE_QUEUE: usize = LANES * LANE_QUEUE;
pub const MAX_CONNECTIONS_PER_PEER: usize = 1_000;
pub const HANDSHAKE_TIMEOUT: &str = "10s";
pub const MAX_STREAMS_PER_CONNECTION: u32 = 2_048;
pub const MAX_AUX_STREAMS: usize = 4_096;
pub const MAX_AUX_STREAMS_PER_PEER: usize = 32;
pub const APPROVAL_DEADLINE: &str = "2s";
pub const NOTICE_LINGER: &str = "5ms";
pub const RING_TIMEOUT: &str = "30s";
pub const JWT_LEEWAY: &str = "5s";
pub const REFRESH_AHEAD: &str = "60s";
pub const DRAIN_TIME: &str = "0s";
pub const NOTICE_DRAIN: &str = "5s";
pub const REDIS_PREFIX: &str = "vc:";
pub const NODE_LEASE: &str = "3s";

/// A duration default as a value (every one is checked by a test).
pub fn duration(text: &str) -> Duration {
    humantime::parse_duration(text).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_duration_default_parses() {
        for d in [
            KEEPALIVE_INTERVAL,
            RESUME_GRACE,
            KEEPALIVE_TIMEOUT,
            HANDSHAKE_TIMEOUT,
            APPROVAL_DEADLINE,
            NOTICE_LINGER,
            RING_TIMEOUT,
            JWT_LEEWAY,
            REFRESH_AHEAD,
            DRAIN_TIME,
            NOTICE_DRAIN,
            NODE_LEASE,
        ] {
            assert!(humantime::parse_duration(d).is_ok(), "{d}");
        }
        assert_eq!(duration(NOTICE_LINGER), Duration::from_millis(5));
    }
}
