//! The `HypervisorNode` publisher: this node's facts from libvirt (versions, CPU topology,
//! NUMA cells with free memory, memory, domain counts) and a heartbeat with a `Ready`
//! condition, written every heartbeat interval under the agent's field manager.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::Store;
use serde_json::json;
use virtkube_crds::conditions::{self, status as cs};
use virtkube_crds::hypervisor_node::{
    DomainCounts, HypervisorNodeStatus, NodeCpu, NodeMemory, NumaCell,
};
use virtkube_crds::quantity::ByteQuantity;
use virtkube_crds::{API_VERSION, Domain, HypervisorNode};
use virtkube_engine::model::NodeObserved;

use super::context::{Context, FIELD_MANAGER};
use super::error::Result;

/// The status describing `info`, keeping the Ready condition's transition time from
/// `previous`.
pub fn node_status(
    info: &NodeObserved,
    counts: DomainCounts,
    migration_uri: Option<String>,
    previous: Option<&HypervisorNodeStatus>,
    now: Time,
) -> HypervisorNodeStatus {
    let mut conds = previous.map(|p| p.conditions.clone()).unwrap_or_default();
    conditions::set_condition(
        &mut conds,
        conditions::condition(
            conditions::READY,
            cs::TRUE,
            "AgentReady",
            format!(
                "virtkube agent connected to {} {}",
                info.hypervisor, info.hypervisor_version
            ),
            None,
            now.clone(),
        ),
    );
    HypervisorNodeStatus {
        hostname: Some(info.hostname.clone()),
        hypervisor_type: Some(info.hypervisor.clone()),
        hypervisor_version: Some(info.hypervisor_version.clone()),
        libvirt_version: Some(info.libvirt_version.clone()),
        cpu: Some(NodeCpu {
            model: Some(info.cpu_model.clone()),
            count: info.cpus,
            sockets: info.sockets,
            cores: info.cores,
            threads: info.threads,
            mhz: Some(info.mhz),
        }),
        memory: Some(NodeMemory {
            total: ByteQuantity::from_bytes(info.memory_kib * 1024),
            free: ByteQuantity::from_bytes(info.free_memory_bytes),
        }),
        numa_cells: info
            .capabilities
            .cells
            .iter()
            .map(|c| NumaCell {
                id: c.id,
                cpus: c.cpus.as_ref().map(ToString::to_string),
                memory: Some(ByteQuantity::from_bytes(c.memory_kib * 1024)),
                free_memory: Some(ByteQuantity::from_bytes(c.free_bytes)),
            })
            .collect(),
        max_vcpus: info.max_vcpus,
        domains: Some(counts),
        migration_uri,
        // Filled in by `publish_once`, which knows the agent's settings.
        libvirt_uri: None,
        libvirt_peer_uri: None,
        heartbeat_time: Some(now),
        observed_generation: None,
        conditions: conds,
    }
}

/// Creates this node's `HypervisorNode` when missing (server-side apply of an empty spec) and
/// returns its labels.
pub async fn ensure_node_object(ctx: &Context) -> Result<BTreeMap<String, String>> {
    let api: Api<HypervisorNode> = Api::all(ctx.client.clone());
    let body = json!({
        "apiVersion": API_VERSION,
        "kind": "HypervisorNode",
        "metadata": { "name": ctx.settings.node },
        "spec": {},
    });
    let node = api
        .patch(
            &ctx.settings.node,
            &PatchParams::apply(FIELD_MANAGER),
            &Patch::Apply(&body),
        )
        .await?;
    Ok(node.metadata.labels.unwrap_or_default())
}

/// Counts libvirt's domains on this node, and the managed ones by their recorded phase.
async fn domain_counts(ctx: &Context, domains: Option<&Store<Domain>>) -> Result<DomainCounts> {
    let total = ctx.engine.domain_list().await?.len();
    let mut managed = 0u32;
    let mut active = 0u32;
    let mut by_state: BTreeMap<String, i64> = BTreeMap::new();
    if let Some(store) = domains {
        for dom in store.state() {
            let Some(status) = &dom.status else { continue };
            if status.node_name.as_deref() != Some(ctx.settings.node.as_str()) {
                continue;
            }
            managed += 1;
            let state = status
                .phase
                .map(|p| format!("{p:?}").to_ascii_lowercase())
                .unwrap_or_else(|| "unknown".into());
            if matches!(state.as_str(), "running" | "paused" | "migrating") {
                active += 1;
            }
            *by_state.entry(state).or_default() += 1;
        }
    }
    ctx.metrics
        .set_domain_states(&by_state.into_iter().collect::<Vec<_>>());
    Ok(DomainCounts {
        total: u32::try_from(total).unwrap_or(u32::MAX),
        active,
        managed,
    })
}

/// Publishes once: reads the node through the engine and applies the status.
pub async fn publish_once(
    ctx: &Context,
    domains: Option<&Store<Domain>>,
    migration_uri: Option<String>,
    previous: Option<&HypervisorNodeStatus>,
) -> Result<HypervisorNodeStatus> {
    let info = ctx.engine.node_info().await?;
    let counts = domain_counts(ctx, domains).await?;
    let mut status = node_status(
        &info,
        counts,
        migration_uri,
        previous,
        Time(k8s_openapi::jiff::Timestamp::now()),
    );
    status.libvirt_uri = ctx.settings.client_uri.clone();
    status.libvirt_peer_uri = ctx.settings.peer_uri.clone();
    let api: Api<HypervisorNode> = Api::all(ctx.client.clone());
    let patch = json!({
        "apiVersion": API_VERSION,
        "kind": "HypervisorNode",
        "status": status,
    });
    api.patch_status(
        &ctx.settings.node,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(status)
}

/// Runs the publisher until `shutdown` fires: the object is created, then the status is
/// written every `interval`, and at once when the API server is back after an outage
/// (`recovered` changes: the heartbeats missed meanwhile must not leave the node looking
/// dead longer than needed). Failures are logged and retried at the next beat. `on_labels`
/// is told when the node's labels change (pool and network selection depends on them).
pub async fn run(
    ctx: Arc<Context>,
    domains: Store<Domain>,
    migration_uri: Option<String>,
    interval: Duration,
    mut recovered: tokio::sync::watch::Receiver<super::api_health::Recovery>,
    on_labels: impl Fn() + Send + 'static,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut previous: Option<HypervisorNodeStatus> = None;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut recoveries = true;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            changed = recovered.changed(), if recoveries => {
                // Without a monitor, only the ticks are left.
                recoveries = changed.is_ok();
                tick.reset();
            }
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        match ensure_node_object(&ctx).await {
            Ok(labels) => {
                if ctx.set_labels(labels) {
                    on_labels();
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "creating the HypervisorNode failed; retrying at the next heartbeat");
                continue;
            }
        }
        match publish_once(
            &ctx,
            Some(&domains),
            migration_uri.clone(),
            previous.as_ref(),
        )
        .await
        {
            Ok(status) => previous = Some(status),
            Err(super::error::Error::Engine(e)) => {
                // libvirt is unreachable: say so (the scheduler must stop placing domains
                // here), keeping the last known facts.
                tracing::warn!(error = %e, "reading the node through libvirt failed; publishing Ready=False");
                match publish_unreachable(&ctx, previous.as_ref(), &e.to_string()).await {
                    Ok(status) => previous = Some(status),
                    Err(e) => {
                        tracing::warn!(error = %e, "publishing the HypervisorNode failed; retrying at the next heartbeat");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "publishing the HypervisorNode failed; retrying at the next heartbeat");
            }
        }
    }
}

/// Publishes `Ready=False` (reason `LibvirtUnreachable`) with a fresh heartbeat, keeping the
/// last known facts: the agent runs but cannot reach libvirt.
pub async fn publish_unreachable(
    ctx: &Context,
    previous: Option<&HypervisorNodeStatus>,
    why: &str,
) -> Result<HypervisorNodeStatus> {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let mut status = previous.cloned().unwrap_or_default();
    conditions::set_condition(
        &mut status.conditions,
        conditions::condition(
            conditions::READY,
            cs::FALSE,
            "LibvirtUnreachable",
            format!(
                "the agent cannot reach libvirt at {}: {why}",
                ctx.engine.uri()
            ),
            None,
            now.clone(),
        ),
    );
    status.heartbeat_time = Some(now);
    let api: Api<HypervisorNode> = Api::all(ctx.client.clone());
    let patch = json!({
        "apiVersion": API_VERSION,
        "kind": "HypervisorNode",
        "status": status,
    });
    api.patch_status(
        &ctx.settings.node,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(status)
}
