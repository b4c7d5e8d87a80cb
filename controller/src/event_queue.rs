//! Kubernetes Events off the reconcile's path, for the agent and the controller: a
//! reconcile (or a controller pass) hands its event to a bounded queue and goes on;
//! background tasks publish them through virtkube's [`Recorder`], which folds repeats into
//! series as before.
//!
//! Guarantees:
//! - Handing an event over never waits: when the queue is full the event is dropped and
//!   counted (`virtkube_agent_events_dropped_total`, `virtkube_controller_…`), as client-go's
//!   event broadcaster drops when its queue of 1,000 is full. Events are a courtesy; the
//!   status is the record.
//! - The events of one object are published in the order they were handed over, by one
//!   task: the queue has a few lanes, and an object always goes to the same one. So the
//!   Recorder sees the repeats of one event (same object, reason, action) one after the
//!   other, exactly as when the reconcile published them itself, and aggregates them the
//!   same way.
//! - A failure to publish is logged and counted (`…_events_failed_total`),
//!   never retried.

use std::hash::{Hash, Hasher};

use crate::events::{Event, Recorder};
use k8s_openapi::api::core::v1::ObjectReference;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{mpsc, oneshot};

/// Events waiting at most, over all lanes (client-go's `maxQueuedEvents`).
pub const CAPACITY: usize = 1000;

/// Lanes, each published by its own task: enough that a slow answer for one object does not
/// hold up the others, few enough that the API server sees a handful of event writes at once.
pub const LANES: usize = 4;

/// What a lane carries.
enum Item {
    /// An event to publish about an object.
    Publish(Box<(Event, ObjectReference)>),
    /// Answered once everything handed over before it was published.
    Flush(oneshot::Sender<()>),
}

/// The counters of the queue.
#[derive(Debug, Clone, Default)]
pub struct QueueMetrics {
    /// Events dropped because the queue was full.
    pub dropped: Counter,
    /// Events the API server refused or did not answer.
    pub failed: Counter,
}

impl QueueMetrics {
    /// Registers `events_dropped` and `events_failed` in `registry` (the agent's and the
    /// controller's prefixed sub-registries).
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "events_dropped",
            "Kubernetes Events dropped because the event queue was full",
            self.dropped.clone(),
        );
        registry.register(
            "events_failed",
            "Kubernetes Events the API server refused or did not answer",
            self.failed.clone(),
        );
    }
}

/// The reconciles' end of the queue (cheap to clone).
#[derive(Clone)]
pub struct EventQueue {
    lanes: Vec<mpsc::Sender<Item>>,
    metrics: QueueMetrics,
}

impl EventQueue {
    /// A queue of `capacity` events over `lanes` lanes, published through `recorder` by one
    /// task per lane (spawned on the current tokio runtime; they end when every
    /// [`EventQueue`] clone is dropped).
    pub fn spawn(
        recorder: Recorder,
        capacity: usize,
        lanes: usize,
        metrics: QueueMetrics,
    ) -> EventQueue {
        let lanes = lanes.max(1);
        let per_lane = capacity.div_ceil(lanes).max(1);
        let senders = (0..lanes)
            .map(|_| {
                let (tx, rx) = mpsc::channel(per_lane);
                tokio::spawn(drain(rx, recorder.clone(), metrics.failed.clone()));
                tx
            })
            .collect();
        EventQueue {
            lanes: senders,
            metrics,
        }
    }

    /// Hands `event` about `regarding` over without waiting; drops it (counted) when its
    /// lane is full.
    pub fn send(&self, event: Event, regarding: ObjectReference) {
        let lane = &self.lanes[lane_of(&regarding, self.lanes.len())];
        if let Err(e) = lane.try_send(Item::Publish(Box::new((event, regarding)))) {
            self.metrics.dropped.inc();
            let reason = match &e {
                mpsc::error::TrySendError::Full(Item::Publish(p))
                | mpsc::error::TrySendError::Closed(Item::Publish(p)) => p.0.reason.clone(),
                _ => String::new(),
            };
            tracing::debug!(reason, "event dropped: the event queue is full");
        }
    }

    /// Waits until every event handed over before this call was published (or failed);
    /// for shutdown and tests.
    pub async fn flush(&self) {
        let mut answers = Vec::with_capacity(self.lanes.len());
        for lane in &self.lanes {
            let (tx, rx) = oneshot::channel();
            if lane.send(Item::Flush(tx)).await.is_ok() {
                answers.push(rx);
            }
        }
        for rx in answers {
            let _ = rx.await;
        }
    }
}

/// The lane of the object `regarding` (by UID, else kind, namespace and name): always the
/// same for one object (pure).
pub fn lane_of(regarding: &ObjectReference, lanes: usize) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match &regarding.uid {
        Some(uid) => uid.hash(&mut h),
        None => (&regarding.kind, &regarding.namespace, &regarding.name).hash(&mut h),
    }
    (h.finish() % lanes.max(1) as u64) as usize
}

async fn drain(mut rx: mpsc::Receiver<Item>, recorder: Recorder, failed: Counter) {
    while let Some(item) = rx.recv().await {
        match item {
            Item::Publish(p) => {
                let (event, regarding) = *p;
                if let Err(e) = recorder.publish(&event, &regarding).await {
                    failed.inc();
                    tracing::warn!(error = %e, reason = %event.reason, "publishing an event failed");
                }
            }
            Item::Flush(done) => {
                let _ = done.send(());
            }
        }
    }
}
