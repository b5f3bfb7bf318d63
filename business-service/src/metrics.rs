//! Prometheus metrics of the business service (`/metrics` on
//! `--metrics-addr`).
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `business_decisions_total` | counter | `code` (0 allowed, else the refusal code) |
//! | `business_notices_total` | counter | `event` |
//! | `business_records_healthy` | gauge | 1 while records are written, 0 after a failed write |
//! | `business_approval_record_seconds` | histogram | what storing an approved REQUEST adds to its answer (the journal append) |
//! | `business_forced_finishes_total` | counter | `result` |
//! | `business_policy_reloads_total` | counter | `outcome` (ok, refused) |
//! | `business_connections_refused_total` | counter | `reason` (per_peer, handshake_timeout, accept_failed, aux_streams) |

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabel {
    pub event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

/// Every metric of the business service. Cheap to clone (handles).
#[derive(Clone, Debug)]
pub struct Metrics {
    pub registry: Arc<Registry>,
    pub decisions: Family<CodeLabel, Counter>,
    pub notices: Family<EventLabel, Counter>,
    pub records_healthy: Gauge,
    /// What storing an approval's REQUEST adds to the answer: 5 µs to
    /// about 80 ms.
    pub approval_record_seconds: Histogram,
    pub forced_finishes: Family<ResultLabel, Counter>,
    pub policy_reloads: Family<OutcomeLabel, Counter>,
    pub connections_refused: videocall_telemetry::accept::Refused,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut r = Registry::with_prefix("business");
        let m = Self {
            registry: Arc::new(Registry::default()),
            decisions: Family::default(),
            notices: Family::default(),
            records_healthy: Gauge::default(),
            approval_record_seconds: Histogram::new(exponential_buckets(0.000005, 2.0, 15)),
            forced_finishes: Family::default(),
            policy_reloads: Family::default(),
            connections_refused: Family::default(),
        };
        r.register(
            "decisions",
            "Approval decisions by result code",
            m.decisions.clone(),
        );
        r.register(
            "notices",
            "Call events received, by event type",
            m.notices.clone(),
        );
        r.register(
            "records_healthy",
            "1 while call records are being written",
            m.records_healthy.clone(),
        );
        r.register(
            "approval_record_seconds",
            "What storing an approved REQUEST adds to its answer (the journal append), seconds",
            m.approval_record_seconds.clone(),
        );
        r.register(
            "forced_finishes",
            "Forced FINISH at the maximum duration, by result",
            m.forced_finishes.clone(),
        );
        r.register(
            "policy_reloads",
            "Policy reloads by outcome",
            m.policy_reloads.clone(),
        );
        r.register(
            "connections_refused",
            "Connections and health/reflection streams refused, by reason",
            m.connections_refused.clone(),
        );
        Self {
            registry: Arc::new(r),
            ..m
        }
    }
}
