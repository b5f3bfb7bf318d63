//! The node's clock: wall-clock time, advanced by the monotonic clock.
//!
//! Call records carry wall-clock times ([`crate::domain::Time`]): a ring
//! deadline written by one node must mean the same on the node whose timer
//! fires it. Reading the system clock for each input would let a step of
//! NTP move deadlines and durations on this node, so the wall time is read
//! once, at start, and advanced by [`tokio::time::Instant`] (which tests
//! pause and advance). Nodes then agree up to their clocks' skew at start.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use crate::domain::Time;

#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// The instant `wall` was read.
    pub start: Instant,
    /// The wall-clock time at `start`, since the Unix epoch.
    pub wall: Duration,
}

impl Clock {
    pub fn now() -> Self {
        Self {
            start: Instant::now(),
            wall: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default(),
        }
    }

    /// The current time.
    pub fn time(&self) -> Time {
        self.wall + self.start.elapsed()
    }

    /// The instant of `at` on this node's monotonic clock (for timers); a
    /// time before the start maps to the start.
    pub fn instant(&self, at: Time) -> Instant {
        self.start + at.saturating_sub(self.wall)
    }

    /// `at` as a system time, for the wire.
    pub fn wall_time(&self, at: Time) -> SystemTime {
        UNIX_EPOCH + at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn time_advances_with_the_monotonic_clock() {
        let clock = Clock::now();
        let t0 = clock.time();
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(clock.time() - t0, Duration::from_secs(5));
        assert_eq!(
            clock.instant(t0 + Duration::from_secs(7)),
            clock.start + Duration::from_secs(7)
        );
        assert_eq!(clock.instant(Duration::ZERO), clock.start);
    }
}
