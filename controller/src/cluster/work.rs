//! The leader's work: watch caches of every kind the decisions read, and passes over the
//! cluster whenever something changes, when something time-based is due, and at least every
//! resync period. Runs only while this replica leads; dropping the future stops it at once.

use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, stream::BoxStream};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource};
use tokio::sync::Notify;
use virtkube_crds::{Domain, HypervisorNode, Network, StoragePool, Volume};

use super::error::Error;
use super::pass::{Ctx, PassState, Snapshot, pass};

/// How long the loop waits after a change for more changes before it runs a pass (a burst
/// of edits is decided together).
const DEBOUNCE: Duration = Duration::from_millis(50);

/// Whether a kind's watch cache keeps `managedFields`. Only HypervisorNodes' are read (the
/// liveness pass checks which status conditions this controller still owns); the other
/// kinds' are never read, and they were the larger part of each cached object (with 10,000
/// Domains the controller peaked at 892 MiB with them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ManagedFields {
    Keep,
    Drop,
}

fn watch_into<K>(
    api: Api<K>,
    writer: reflector::store::Writer<K>,
    managed_fields: ManagedFields,
) -> BoxStream<'static, ()>
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    watcher(api, watcher::Config::default().any_semantic())
        .default_backoff()
        .modify(move |obj: &mut K| {
            if managed_fields == ManagedFields::Drop {
                obj.meta_mut().managed_fields = None;
            }
        })
        .reflect(writer)
        .map(|event| {
            if let Err(e) = event {
                tracing::warn!(kind = %K::kind(&()), error = %e, "watch failed; retrying with backoff");
            }
        })
        .boxed()
}

/// What the cache holds, shared with it: a pass reads the objects without copying them.
fn cached<K>(store: &Store<K>) -> Vec<Arc<K>>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    store.state()
}

/// Watches everything and runs passes until dropped (or until a watch ends, which does not
/// happen while the client lives).
pub async fn lead(ctx: Arc<Ctx>, resync: Duration) -> Result<(), Error> {
    let client: &Client = &ctx.client;
    let (domains, dw) = reflector::store::<Domain>();
    let (volumes, vw) = reflector::store::<Volume>();
    let (hypervisors, hw) = reflector::store::<HypervisorNode>();
    let (nodes, nw) = reflector::store::<Node>();
    let (networks, netw) = reflector::store::<Network>();
    let (pools, pw) = reflector::store::<StoragePool>();
    let streams: Vec<BoxStream<'static, ()>> = vec![
        watch_into(Api::<Domain>::all(client.clone()), dw, ManagedFields::Drop),
        watch_into(Api::<Volume>::all(client.clone()), vw, ManagedFields::Drop),
        watch_into(
            Api::<HypervisorNode>::all(client.clone()),
            hw,
            ManagedFields::Keep,
        ),
        watch_into(Api::<Node>::all(client.clone()), nw, ManagedFields::Drop),
        watch_into(
            Api::<Network>::all(client.clone()),
            netw,
            ManagedFields::Drop,
        ),
        watch_into(
            Api::<StoragePool>::all(client.clone()),
            pw,
            ManagedFields::Drop,
        ),
    ];
    let notify = Arc::new(Notify::new());
    let watchers = {
        let notify = notify.clone();
        futures::stream::select_all(streams).for_each(move |()| {
            notify.notify_one();
            futures::future::ready(())
        })
    };
    let passes = async {
        // Deciding on a partial picture would call every domain unschedulable.
        let ready = tokio::try_join!(
            domains.wait_until_ready(),
            volumes.wait_until_ready(),
            hypervisors.wait_until_ready(),
            nodes.wait_until_ready(),
            networks.wait_until_ready(),
            pools.wait_until_ready(),
        );
        if ready.is_err() {
            return Err(Error::WatchEnded("a cache"));
        }
        tracing::info!("caches ready: deciding");
        let mut state = PassState::default();
        loop {
            let read = std::time::Instant::now();
            let snap = Snapshot {
                domains: cached(&domains),
                volumes: cached(&volumes),
                hypervisors: cached(&hypervisors),
                nodes: cached(&nodes),
                networks: cached(&networks),
                pools: cached(&pools),
            };
            tracing::debug!(
                ms = read.elapsed().as_secs_f64() * 1e3,
                "pass snapshot taken"
            );
            let now = Timestamp::now();
            let report = pass(&ctx, &mut state, snap, now).await;
            if report.writes > 0 || report.conflicts > 0 {
                tracing::debug!(writes = report.writes, conflicts = report.conflicts, "pass");
            }
            let wait = report
                .next_wake
                .map(|t| t.duration_since(now).unsigned_abs())
                .unwrap_or(resync)
                .min(resync);
            tokio::select! {
                () = notify.notified() => tokio::time::sleep(DEBOUNCE).await,
                () = tokio::time::sleep(wait) => {}
            }
        }
    };
    tokio::select! {
        () = watchers => Err(Error::WatchEnded("every kind")),
        result = passes => result,
    }
}
