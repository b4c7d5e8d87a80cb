//! The controller's Prometheus metrics (OpenMetrics text), under the `virtkube_controller`
//! prefix.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// A decision and why.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// `bound` or `unschedulable`.
    pub decision: String,
    /// The condition reason (`NodeAssigned`, `Requested`, `Unschedulable`, …).
    pub reason: String,
}

/// One reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// A stable, low-cardinality reason.
    pub reason: String,
}

/// A move's outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `Succeeded`, `Failed` or `Aborted`.
    pub outcome: String,
}

/// A kind of object.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// `Domain`, `Volume`, `HypervisorNode`.
    pub kind: String,
}

/// Every metric the controller exports.
#[derive(Debug)]
pub struct Metrics {
    /// Scheduling decisions recorded in status, by decision and reason.
    pub scheduling: Family<DecisionLabels, Counter>,
    /// Why nodes were refused, once per recorded `Unschedulable` decision and reason.
    pub scheduling_failures: Family<ReasonLabels, Counter>,
    /// Moves approved, by reason (`Requested`, `Drain`).
    pub migrations_approved: Family<ReasonLabels, Counter>,
    /// Moves cancelled by the controller, by reason.
    pub migrations_cancelled: Family<ReasonLabels, Counter>,
    /// Moves that ended, by outcome as the agents recorded it.
    pub migrations_finished: Family<OutcomeLabels, Counter>,
    /// Move durations (start to end), by outcome.
    pub migration_duration: Family<OutcomeLabels, Histogram>,
    /// Claims released because their node was declared fenced.
    pub unfenced: Counter,
    /// Finalizers removed from unbound domains being deleted.
    pub finalized: Counter,
    /// Domains waiting to be bound.
    pub pending_binds: Gauge,
    /// Moves under way (`Pending` or `Running`).
    pub active_moves: Gauge,
    /// Moves wanted and waiting.
    pub waiting_moves: Gauge,
    /// Nodes whose heartbeat is stale.
    pub unreachable_nodes: Gauge,
    /// Nodes being drained.
    pub draining_nodes: Gauge,
    /// 1 while this replica holds the lease.
    pub leader: Gauge,
    /// Passes over the cluster.
    pub passes: Counter,
    /// Pass durations.
    pub pass_duration: Histogram,
    /// Writes made, by kind.
    pub writes: Family<KindLabels, Counter>,
    /// Writes refused because the object changed since it was read (then read again and
    /// decided again), by kind.
    pub conflicts: Family<KindLabels, Counter>,
    /// API calls that failed otherwise, by kind.
    pub errors: Family<KindLabels, Counter>,
    /// Kubernetes Events dropped because the event queue was full, and events the API
    /// server refused (see [`crate::event_queue`]).
    pub events: crate::event_queue::QueueMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            scheduling: Family::default(),
            scheduling_failures: Family::default(),
            migrations_approved: Family::default(),
            migrations_cancelled: Family::default(),
            migrations_finished: Family::default(),
            migration_duration: Family::new_with_constructor(|| {
                Histogram::new([1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0])
            }),
            unfenced: Counter::default(),
            finalized: Counter::default(),
            pending_binds: Gauge::default(),
            active_moves: Gauge::default(),
            waiting_moves: Gauge::default(),
            unreachable_nodes: Gauge::default(),
            draining_nodes: Gauge::default(),
            leader: Gauge::default(),
            passes: Counter::default(),
            pass_duration: Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0]),
            writes: Family::default(),
            conflicts: Family::default(),
            errors: Family::default(),
            events: Default::default(),
        }
    }
}

impl Metrics {
    /// Registers every metric in `registry`.
    pub fn register(registry: &mut Registry) -> Arc<Metrics> {
        let m = Metrics::default();
        let r = registry.sub_registry_with_prefix("virtkube_controller");
        r.register(
            "scheduling_decisions",
            "Scheduling decisions recorded in status, by decision and reason",
            m.scheduling.clone(),
        );
        r.register(
            "scheduling_failures",
            "Reasons nodes were refused, per recorded Unschedulable decision",
            m.scheduling_failures.clone(),
        );
        r.register(
            "migrations_approved",
            "Moves approved, by reason",
            m.migrations_approved.clone(),
        );
        r.register(
            "migrations_cancelled",
            "Moves cancelled by the controller, by reason",
            m.migrations_cancelled.clone(),
        );
        r.register(
            "migrations_finished",
            "Moves that ended, by outcome as recorded in status",
            m.migrations_finished.clone(),
        );
        r.register(
            "migration_duration_seconds",
            "Move durations from start to end, by outcome",
            m.migration_duration.clone(),
        );
        r.register(
            "unfenced",
            "Claims released because their node was declared fenced",
            m.unfenced.clone(),
        );
        r.register(
            "finalized",
            "Finalizers removed from unbound domains being deleted",
            m.finalized.clone(),
        );
        r.register(
            "pending_binds",
            "Domains waiting to be bound to a node",
            m.pending_binds.clone(),
        );
        r.register(
            "active_moves",
            "Moves under way (Pending or Running)",
            m.active_moves.clone(),
        );
        r.register(
            "waiting_moves",
            "Moves wanted and waiting (limits, backoff, target)",
            m.waiting_moves.clone(),
        );
        r.register(
            "unreachable_nodes",
            "HypervisorNodes whose heartbeat is stale",
            m.unreachable_nodes.clone(),
        );
        r.register(
            "draining_nodes",
            "Nodes being drained",
            m.draining_nodes.clone(),
        );
        r.register(
            "leader",
            "1 while this replica holds the lease and works",
            m.leader.clone(),
        );
        r.register("passes", "Passes over the cluster", m.passes.clone());
        r.register(
            "pass_duration_seconds",
            "Durations of passes over the cluster",
            m.pass_duration.clone(),
        );
        r.register("writes", "Writes made, by kind", m.writes.clone());
        r.register(
            "write_conflicts",
            "Writes refused because the object changed since it was read, by kind",
            m.conflicts.clone(),
        );
        r.register(
            "api_errors",
            "API calls that failed otherwise, by kind",
            m.errors.clone(),
        );
        m.events.register(r);
        Arc::new(m)
    }

    /// Counts one write of `kind`.
    pub fn wrote(&self, kind: &str) {
        self.writes
            .get_or_create(&KindLabels { kind: kind.into() })
            .inc();
    }

    /// Counts one conflict on `kind`.
    pub fn conflict(&self, kind: &str) {
        self.conflicts
            .get_or_create(&KindLabels { kind: kind.into() })
            .inc();
    }

    /// Counts one failed call on `kind`.
    pub fn error(&self, kind: &str) {
        self.errors
            .get_or_create(&KindLabels { kind: kind.into() })
            .inc();
    }
}
