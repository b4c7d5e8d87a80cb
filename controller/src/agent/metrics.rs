//! Prometheus metrics (OpenMetrics text): reconciles, failures and durations per kind,
//! libvirt call latency per call (read from the engine's own counters at scrape time),
//! domains by state, event-stream reconnects, the Kubernetes API's availability (outages,
//! watch errors and restarts), and readiness with its reasons.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use virtkube_engine::Engine;

use super::readiness::{Health, REASON_LABELS};

/// Labels of the per-kind families.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// `Domain`, `Volume`, `Network`, `StoragePool`, `HypervisorNode`.
    pub kind: String,
}

/// Labels of the failure counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// The resource kind.
    pub kind: String,
    /// [`crate::agent::error::Error::metric_label`].
    pub error: String,
}

/// Labels of the domains-by-state gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    /// libvirt's state word (`running`, `paused`, `shutoff`, …).
    pub state: String,
}

/// Every metric the agent exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Reconciles started, per kind.
    pub reconciles: Family<KindLabels, Counter>,
    /// Reconciles that failed, per kind and error label.
    pub failures: Family<FailureLabels, Counter>,
    /// Reconcile durations in seconds, per kind.
    pub durations: Family<KindLabels, Histogram>,
    /// virtkube-owned domains on this node by libvirt state (refreshed by the node publisher).
    pub domains: Family<StateLabels, Gauge>,
    /// Times the libvirt event stream was re-established or lagged (events may have been lost).
    pub event_stream_reconnects: Counter,
    /// Status patches written, per kind (zero in steady state).
    pub status_patches: Family<KindLabels, Counter>,
    /// 1 while the Kubernetes API answers the health monitor's probe, 0 during an outage.
    pub api_up: Gauge,
    /// Outages of the Kubernetes API seen by the health monitor.
    pub api_outages: Counter,
    /// How long each outage lasted, in seconds (observed when the API is back).
    pub api_outage_seconds: Histogram,
    /// Errors of the API watches (list or watch failed), per watched kind.
    pub watch_errors: Family<KindLabels, Counter>,
    /// Watches restarted because the API server came back, per watched kind.
    pub watch_restarts: Family<KindLabels, Counter>,
    /// Objects reconciled again at once because the API server came back while they were
    /// waiting out a failure backoff.
    pub outage_requeues: Counter,
    /// Kubernetes Events dropped because the event queue was full, and events the API
    /// server refused (see [`crate::event_queue`]).
    pub events: crate::event_queue::QueueMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            reconciles: Family::default(),
            failures: Family::default(),
            durations: Family::new_with_constructor(|| {
                Histogram::new([0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0])
            }),
            domains: Family::default(),
            event_stream_reconnects: Counter::default(),
            status_patches: Family::default(),
            api_up: Gauge::default(),
            api_outages: Counter::default(),
            api_outage_seconds: Histogram::new([
                1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
            ]),
            watch_errors: Family::default(),
            watch_restarts: Family::default(),
            outage_requeues: Counter::default(),
            events: Default::default(),
        }
    }
}

impl Metrics {
    /// Registers every family under the `virtkube_agent` prefix, and the engine's call
    /// counters as a collector.
    pub fn register(registry: &mut Registry, engine: Option<Engine>) -> Arc<Metrics> {
        let m = Metrics::default();
        let sub = registry.sub_registry_with_prefix("virtkube_agent");
        sub.register(
            "reconciles",
            "Reconciles started, per kind",
            m.reconciles.clone(),
        );
        sub.register(
            "reconcile_failures",
            "Reconciles that failed, per kind and error",
            m.failures.clone(),
        );
        sub.register(
            "reconcile_duration_seconds",
            "Reconcile durations, per kind",
            m.durations.clone(),
        );
        sub.register(
            "domains",
            "virtkube-owned domains on this node, by libvirt state",
            m.domains.clone(),
        );
        sub.register(
            "libvirt_event_stream_reconnects",
            "Times the libvirt event stream was re-established or fell behind",
            m.event_stream_reconnects.clone(),
        );
        m.events.register(sub);
        sub.register(
            "status_patches",
            "Status patches written, per kind",
            m.status_patches.clone(),
        );
        sub.register(
            "api_up",
            "1 while the Kubernetes API answers the agent's probe, 0 during an outage",
            m.api_up.clone(),
        );
        sub.register(
            "api_outages",
            "Outages of the Kubernetes API seen by the agent",
            m.api_outages.clone(),
        );
        sub.register(
            "api_outage_seconds",
            "How long each Kubernetes API outage lasted",
            m.api_outage_seconds.clone(),
        );
        sub.register(
            "watch_errors",
            "Errors of the agent's API watches, per watched kind",
            m.watch_errors.clone(),
        );
        sub.register(
            "watch_restarts",
            "API watches restarted because the API server came back, per watched kind",
            m.watch_restarts.clone(),
        );
        sub.register(
            "outage_requeues",
            "Objects reconciled again at once when the API server came back",
            m.outage_requeues.clone(),
        );
        if let Some(engine) = engine {
            sub.register_collector(Box::new(EngineCollector { engine }));
        }
        Arc::new(m)
    }

    /// Registers `virtkube_agent_ready` (1 or 0) and `virtkube_agent_unready{reason}` (1 for
    /// each reason the agent is not ready now), read from `health` and the engine at scrape
    /// time: the same verdict `/readyz` gives.
    pub fn register_readiness(
        registry: &mut Registry,
        health: Arc<Health>,
        engine: Option<Engine>,
    ) {
        registry
            .sub_registry_with_prefix("virtkube_agent")
            .register_collector(Box::new(ReadinessCollector { health, engine }));
    }

    /// Counts an error of a watch of `kind`.
    pub fn watch_failed(&self, kind: &str) {
        self.watch_errors
            .get_or_create(&KindLabels { kind: kind.into() })
            .inc();
    }

    /// Counts a restart of a watch of `kind`.
    pub fn watch_restarted(&self, kind: &str) {
        self.watch_restarts
            .get_or_create(&KindLabels { kind: kind.into() })
            .inc();
    }

    /// Starts timing one reconcile of `kind`; the returned guard records the duration and
    /// counts a failure when [`ReconcileTimer::failed`] was called.
    pub fn reconcile_started(self: &Arc<Self>, kind: &str) -> ReconcileTimer {
        self.reconciles
            .get_or_create(&KindLabels { kind: kind.into() })
            .inc();
        ReconcileTimer {
            metrics: self.clone(),
            kind: kind.to_string(),
            start: std::time::Instant::now(),
        }
    }

    /// Counts a failed reconcile of `kind`.
    pub fn reconcile_failed(&self, kind: &str, error: &str) {
        self.failures
            .get_or_create(&FailureLabels {
                kind: kind.into(),
                error: error.into(),
            })
            .inc();
    }

    /// Replaces the domains-by-state gauge with `counts`.
    pub fn set_domain_states(&self, counts: &[(String, i64)]) {
        self.domains.clear();
        for (state, n) in counts {
            self.domains
                .get_or_create(&StateLabels {
                    state: state.clone(),
                })
                .set(*n);
        }
    }
}

/// Records a reconcile's duration when dropped.
pub struct ReconcileTimer {
    metrics: Arc<Metrics>,
    kind: String,
    start: std::time::Instant,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.metrics
            .durations
            .get_or_create(&KindLabels {
                kind: self.kind.clone(),
            })
            .observe(self.start.elapsed().as_secs_f64());
    }
}

/// Labels of the unready family.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

/// Readiness as `/readyz` judges it, at scrape time.
#[derive(Debug)]
struct ReadinessCollector {
    health: Arc<Health>,
    engine: Option<Engine>,
}

impl Collector for ReadinessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let libvirt = self.engine.as_ref().is_some_and(Engine::is_connected);
        let readiness = self.health.readiness(libvirt);
        let gauge = ConstGauge::new(0i64).metric_type();
        let ready = encoder.encode_descriptor(
            "ready",
            "1 when the agent is ready (as /readyz says), 0 otherwise",
            None,
            gauge,
        )?;
        ConstGauge::new(i64::from(readiness.ready())).encode(ready)?;
        let mut unready = encoder.encode_descriptor(
            "unready",
            "1 for each reason the agent is not ready now",
            None,
            gauge,
        )?;
        for label in REASON_LABELS {
            let on = readiness.reasons.iter().any(|r| r.label == label);
            let labels = ReasonLabels {
                reason: label.to_string(),
            };
            ConstGauge::new(i64::from(on)).encode(unready.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Labels of the libvirt call families.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    call: String,
    class: String,
}

/// Exposes the engine's per-call counters at scrape time, so the engine stays free of any
/// metrics library and no counter is kept twice.
#[derive(Debug)]
struct EngineCollector {
    engine: Engine,
}

impl Collector for EngineCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = self.engine.stats();
        let families: [(&str, &str, bool); 4] = [
            ("libvirt_calls", "libvirt calls made, per engine call", true),
            (
                "libvirt_call_errors",
                "libvirt calls that failed, per engine call",
                true,
            ),
            (
                "libvirt_call_seconds",
                "Total time spent in libvirt calls (pool wait included), per engine call",
                true,
            ),
            (
                "libvirt_call_max_seconds",
                "Slowest libvirt call, per engine call",
                false,
            ),
        ];
        for (index, (name, help, counter)) in families.into_iter().enumerate() {
            let metric_type = if counter {
                ConstCounter::new(0u64).metric_type()
            } else {
                ConstGauge::new(0.0f64).metric_type()
            };
            let mut family = encoder.encode_descriptor(name, help, None, metric_type)?;
            for call in &stats.calls {
                let labels = CallLabels {
                    call: call.name.to_string(),
                    class: call.class.as_str().to_string(),
                };
                let m = family.encode_family(&labels)?;
                match index {
                    0 => ConstCounter::new(call.count).encode(m)?,
                    1 => ConstCounter::new(call.errors).encode(m)?,
                    2 => ConstCounter::new(call.total.as_secs_f64()).encode(m)?,
                    _ => ConstGauge::new(call.max.as_secs_f64()).encode(m)?,
                }
            }
        }
        let reconnects = encoder.encode_descriptor(
            "libvirt_reconnects",
            "libvirt connections re-opened after the first",
            None,
            ConstCounter::new(0u64).metric_type(),
        )?;
        ConstCounter::new(stats.reconnects).encode(reconnects)?;
        Ok(())
    }
}
