//! Prometheus metrics of the call service, served on `--metrics-addr` at
//! `/metrics`.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `videocall_connected_devices` | gauge | |
//! | `videocall_calls` | gauge | `phase` (approving, ringing, talking) |
//! | `videocall_call_outcomes_total` | counter | `event` (REPLY, FINISH), `code` (a `ResultCode`, or `other`) |
//! | `videocall_call_setup_seconds` | histogram | REQUEST to START |
//! | `videocall_approval_seconds` | histogram | approval round trip |
//! | `videocall_approval_failures_total` | counter | `kind` (timeout, error) |
//! | `videocall_controls_total` | counter | `result` (0 or the refusal code) |
//! | `videocall_notice_backlog` | gauge | notices waiting for the business service |
//! | `videocall_notices_dropped_total` | counter | lane full |
//! | `videocall_notices_rejected_total` | counter | refused as malformed |
//! | `videocall_notice_retries_total` | counter | failed attempts, retried |
//! | `videocall_forced_finishes_total` | counter | `result` |
//! | `videocall_token_refreshes_total` | counter | `result` (0, or 100209 refused, 100204 rate limited) |
//! | `videocall_token_expiries_total` | counter | streams ended because their token expired unrefreshed |
//! | `videocall_slow_consumers_total` | counter | devices disconnected for not reading |
//! | `videocall_observations_dropped_total` | counter | events and control results neither logged nor counted: the observer fell behind |
//! | `videocall_connections_refused_total` | counter | `reason` (per_peer, handshake_timeout, accept_failed, aux_streams) |
//! | `videocall_store_errors_total` | counter | a node of a cluster: inputs and reads the shared store failed or timed out |
//! | `videocall_store_conflicts_total` | counter | a node of a cluster: commits that lost a race and ran again |
//! | `videocall_store_round_trips_total` | counter | a node of a cluster: round trips to Redis |
//! | `videocall_store_commit_seconds` | histogram | a node of a cluster: a commit's round trip (the script sent, its reply in) |
//! | `videocall_store_load_seconds` | histogram | a node of a cluster: a load's round trip (records an input missed) |
//! | `videocall_reaped_devices_total` | counter | a node of a cluster: devices of dead nodes it detached |
//! | `videocall_notice_lanes_owned` | gauge | a node of a cluster: notice lanes it delivers |
//! | `videocall_notice_lane_changes_total` | counter | a node of a cluster: lanes it gained or lost (a node died, joined or left) |
//! | `videocall_inbox_lag_seconds` | histogram | a node of a cluster: from an event's commit (Redis's clock) to its delivery to the device's stream (this node's), per batch, its oldest |
//!
//! The gauges of calls and devices are read from the switchboard at scrape
//! time, so keeping them costs nothing on the call path.

use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub event: &'static str,
    pub code: CodeLabel,
}

/// A result code as a label value: a code of `ResultCode` (the proto's),
/// or `other`. Clients choose the codes of their rejections and the
/// business service those of its refusals; were each its own label value,
/// anyone could grow the metrics without bound.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct CodeLabel(Option<u32>);

impl From<u32> for CodeLabel {
    fn from(code: u32) -> Self {
        let known = i32::try_from(code)
            .ok()
            .is_some_and(|c| videocall_proto::v1::ResultCode::try_from(c).is_ok());
        Self(known.then_some(code))
    }
}

impl EncodeLabelValue for CodeLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        match self.0 {
            Some(code) => write!(encoder, "{code}"),
            None => encoder.write_str("other"),
        }
    }
}

pub use videocall_telemetry::accept::ReasonLabel;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: CodeLabel,
}

/// Every metric of the call service. Cheap to clone (handles).
#[derive(Clone, Debug)]
pub struct Metrics {
    pub registry: Arc<Registry>,
    pub connected: Gauge,
    pub calls: Family<PhaseLabel, Gauge>,
    pub outcomes: Family<OutcomeLabels, Counter>,
    pub setup_seconds: Histogram,
    pub approval_seconds: Histogram,
    pub approval_failures: Family<KindLabel, Counter>,
    pub controls: Family<ResultLabel, Counter>,
    pub notice_backlog: Gauge,
    pub notices_dropped: Counter,
    pub notices_rejected: Counter,
    pub notice_retries: Counter,
    pub forced_finishes: Family<ResultLabel, Counter>,
    pub refreshes: Family<ResultLabel, Counter>,
    pub token_expiries: Counter,
    pub slow_consumers: Counter,
    pub observations_dropped: Counter,
    pub connections_refused: Family<ReasonLabel, Counter>,
    pub store_errors: Counter,
    pub store_conflicts: Counter,
    pub store_round_trips: Counter,
    pub store_commit_seconds: Histogram,
    pub store_load_seconds: Histogram,
    pub reaped_devices: Counter,
    pub lanes_owned: Gauge,
    pub lane_changes: Counter,
    pub inbox_lag_seconds: Histogram,
}

/// Latency buckets from 100 µs to about 6.5 s.
fn latency() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0001, 2.0, 17,
    ))
}

/// Finer buckets for one round trip to Redis (tens of microseconds on a
/// local network): 25 µs to about 0.8 s.
fn round_trip() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.000025, 2.0, 16,
    ))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut r = Registry::with_prefix("videocall");
        let m = Self {
            registry: Arc::new(Registry::default()),
            connected: Gauge::default(),
            calls: Family::default(),
            outcomes: Family::default(),
            setup_seconds: latency(),
            approval_seconds: latency(),
            approval_failures: Family::default(),
            controls: Family::default(),
            notice_backlog: Gauge::default(),
            notices_dropped: Counter::default(),
            notices_rejected: Counter::default(),
            notice_retries: Counter::default(),
            forced_finishes: Family::default(),
            refreshes: Family::default(),
            token_expiries: Counter::default(),
            slow_consumers: Counter::default(),
            observations_dropped: Counter::default(),
            connections_refused: Family::default(),
            store_errors: Counter::default(),
            store_conflicts: Counter::default(),
            store_round_trips: Counter::default(),
            store_commit_seconds: round_trip(),
            store_load_seconds: round_trip(),
            reaped_devices: Counter::default(),
            lanes_owned: Gauge::default(),
            lane_changes: Counter::default(),
            inbox_lag_seconds: latency(),
        };
        r.register(
            "connected_devices",
            "Connected client streams",
            m.connected.clone(),
        );
        r.register("calls", "Live calls by phase", m.calls.clone());
        r.register(
            "call_outcomes",
            "Ended calls by final event and code",
            m.outcomes.clone(),
        );
        r.register(
            "call_setup_seconds",
            "Time from REQUEST to START",
            m.setup_seconds.clone(),
        );
        r.register(
            "approval_seconds",
            "Business service approval round trip",
            m.approval_seconds.clone(),
        );
        r.register(
            "approval_failures",
            "Approvals that timed out or failed",
            m.approval_failures.clone(),
        );
        r.register(
            "controls",
            "Controls from clients by result code",
            m.controls.clone(),
        );
        r.register(
            "notice_backlog",
            "Notices waiting for the business service",
            m.notice_backlog.clone(),
        );
        r.register(
            "notices_dropped",
            "Notices dropped because a lane was full",
            m.notices_dropped.clone(),
        );
        r.register(
            "notices_rejected",
            "Notices the business service refused as malformed",
            m.notices_rejected.clone(),
        );
        r.register(
            "notice_retries",
            "Failed notice deliveries that were retried",
            m.notice_retries.clone(),
        );
        r.register(
            "forced_finishes",
            "Forced FINISH commands by result code",
            m.forced_finishes.clone(),
        );
        r.register(
            "token_refreshes",
            "Token refreshes on live streams by result code",
            m.refreshes.clone(),
        );
        r.register(
            "token_expiries",
            "Streams ended because their token expired without a refresh",
            m.token_expiries.clone(),
        );
        r.register(
            "slow_consumers",
            "Devices disconnected for not reading their stream",
            m.slow_consumers.clone(),
        );
        r.register(
            "observations_dropped",
            "Call events and control results not logged nor counted because the observer fell behind",
            m.observations_dropped.clone(),
        );
        r.register(
            "connections_refused",
            "Connections and auxiliary streams refused or closed by a limit",
            m.connections_refused.clone(),
        );
        r.register(
            "store_errors",
            "Inputs and reads the shared store failed or timed out (a node of a cluster)",
            m.store_errors.clone(),
        );
        r.register(
            "store_conflicts",
            "Commits to the shared store that lost a race and ran again",
            m.store_conflicts.clone(),
        );
        r.register(
            "store_round_trips",
            "Round trips to the shared store (a pipeline or a script is one; the readers' blocking reads included)",
            m.store_round_trips.clone(),
        );
        r.register(
            "store_commit_seconds",
            "A commit's round trip to the shared store",
            m.store_commit_seconds.clone(),
        );
        r.register(
            "store_load_seconds",
            "A load's round trip to the shared store (records an input missed)",
            m.store_load_seconds.clone(),
        );
        r.register(
            "reaped_devices",
            "Devices of nodes whose lease ran out, detached by this node",
            m.reaped_devices.clone(),
        );
        r.register(
            "notice_lanes_owned",
            "Notice lanes of the cluster this node hands to the business service",
            m.lanes_owned.clone(),
        );
        r.register(
            "notice_lane_changes",
            "Notice lanes this node gained or lost",
            m.lane_changes.clone(),
        );
        r.register(
            "inbox_lag_seconds",
            "From an event's commit to its delivery by this node (oldest of each inbox batch)",
            m.inbox_lag_seconds.clone(),
        );
        Self {
            registry: Arc::new(r),
            ..m
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_outside_the_contract_share_one_label_value() {
        let m = Metrics::default();
        for code in [100104, 1_000_000, 1_000_001, 4_000_000_000] {
            m.outcomes
                .get_or_create(&OutcomeLabels {
                    event: "REPLY",
                    code: code.into(),
                })
                .inc();
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &m.registry).unwrap();
        assert!(text.contains(r#"code="100104"} 1"#), "{text}");
        assert!(text.contains(r#"code="other"} 3"#), "{text}");
        assert_eq!(text.matches("videocall_call_outcomes_total{").count(), 2);
    }
}
