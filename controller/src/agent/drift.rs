//! Drift: libvirt's domain lifecycle events (a `virsh destroy`, a crash, an undefine by
//! hand) become reconcile requests for the Domain that owns the libvirt domain, within
//! moments instead of at the next resync.

use std::sync::Arc;
use std::time::Instant;

use futures::channel::mpsc::UnboundedSender;
use futures::{Stream, StreamExt};
use kube::runtime::reflector::{ObjectRef, Store};
use virtkube_crds::Domain;
use virtkube_crds::names::split_host_name;
use virtkube_engine::{DomainEvent, EngineEvent};

use super::echoes::Echoes;
use super::metrics::Metrics;

/// The Domain a libvirt domain name belongs to (`<namespace>.<name>`); `None` for names
/// virtkube never gives (no dot).
pub fn owner_ref(event: &DomainEvent) -> Option<ObjectRef<Domain>> {
    let (ns, name) = split_host_name(&event.name)?;
    Some(ObjectRef::new(name).within(ns))
}

/// Forwards engine events as reconcile requests until the engine's stream ends. After a
/// reconnect or when events were lost, every Domain this node knows is requeued, since any
/// of them may have changed unseen.
pub async fn forward(
    events: impl Stream<Item = EngineEvent>,
    domains: Store<Domain>,
    metrics: Arc<Metrics>,
    tx: UnboundedSender<ObjectRef<Domain>>,
) {
    forward_unexpected(events, Arc::default(), domains, metrics, tx).await;
}

/// [`forward`], except the events `echoes` recognises as the agent's own define and start
/// (those reconciles would find everything as the agent just left it).
pub async fn forward_unexpected(
    events: impl Stream<Item = EngineEvent>,
    echoes: Arc<Echoes>,
    domains: Store<Domain>,
    metrics: Arc<Metrics>,
    tx: UnboundedSender<ObjectRef<Domain>>,
) {
    futures::pin_mut!(events);
    while let Some(event) = events.next().await {
        match event {
            EngineEvent::Domain(e) => {
                if echoes.is_own_event(&e.name, e.kind, e.detail, Instant::now()) {
                    tracing::debug!(domain = %e.name, kind = ?e.kind, detail = e.detail, "libvirt event of the agent's own call: nothing to reconcile");
                    continue;
                }
                if let Some(r) = owner_ref(&e) {
                    tracing::debug!(domain = %e.name, kind = ?e.kind, detail = e.detail, "libvirt event: reconciling the owner");
                    if tx.unbounded_send(r).is_err() {
                        return;
                    }
                }
            }
            EngineEvent::Reconnected | EngineEvent::Lagged(_) => {
                metrics.event_stream_reconnects.inc();
                // The echoes the tokens wait for may be among the lost events.
                echoes.forget_all();
                tracing::info!(
                    ?event,
                    "libvirt events may have been missed: requeueing every domain of this node"
                );
                // The cache holds only the Domains routed to this node.
                for dom in domains.state() {
                    if tx.unbounded_send(ObjectRef::from_obj(&*dom)).is_err() {
                        return;
                    }
                }
            }
        }
    }
}
