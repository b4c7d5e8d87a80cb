//! The `HypervisorNode` publisher: this node's facts from libvirt (versions, CPU topology,
//! NUMA cells with free memory, memory, domain counts; host interfaces, PCI and mediated
//! devices, the security driver and LVM volume groups, refreshed every
//! [`HOST_FACTS_INTERVAL`]) and a heartbeat with a `Ready` condition, written every
//! heartbeat interval under the agent's field manager.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::Store;
use serde_json::json;
use virtkube_crds::conditions::{self, status as cs};
use virtkube_crds::hypervisor_node::{
    DomainCounts, HostFacts, HostInterface, HypervisorNodeStatus, MediatedDevice, NodeCpu,
    NodeMemory, NumaCell, PciDevice, SecurityModel, StoragePoolSource,
};
use virtkube_crds::quantity::ByteQuantity;
use virtkube_crds::{API_VERSION, Domain, HypervisorNode};
use virtkube_engine::model::NodeObserved;
use virtkube_engine::node::{Facts, FactsLimits};

use super::context::{Context, FIELD_MANAGER};
use super::error::Result;

/// How often the host facts (interfaces, devices, security driver, volume groups) are read
/// again: they change rarely, and reading them costs one libvirt call per device.
pub const HOST_FACTS_INTERVAL: Duration = Duration::from_secs(300);

/// `status.host` from the engine's facts: each list as read (already bounded by
/// [`FactsLimits`]), what was cut in `truncated`, what libvirt could not give in
/// `unavailable`.
pub fn host_facts(f: &virtkube_engine::node::HostFacts) -> HostFacts {
    let mut out = HostFacts::default();
    fn note<T>(out: &mut HostFacts, field: &str, facts: &Facts<T>) {
        match facts {
            Facts::Read { items, total } if *total > items.len() => out
                .truncated
                .push(format!("{field}: {total} found, {} listed", items.len())),
            Facts::Read { .. } => {}
            Facts::Unavailable(why) => {
                let mut why = why.clone();
                why.truncate(256);
                out.unavailable.push(format!("{field}: {why}"));
            }
        }
    }
    note(&mut out, "interfaces", &f.interfaces);
    note(&mut out, "pciDevices", &f.pci_devices);
    note(&mut out, "mediatedDevices", &f.mediated_devices);
    note(&mut out, "storagePoolSources", &f.logical_sources);
    out.interfaces = f
        .interfaces
        .items()
        .iter()
        .map(|i| HostInterface {
            name: i.name.clone(),
            mac_address: i.mac.clone(),
            active: i.active,
        })
        .collect();
    out.pci_devices = f
        .pci_devices
        .items()
        .iter()
        .map(|d| PciDevice {
            address: d.address.clone(),
            name: d.name.clone(),
            vendor_id: d.vendor_id.clone(),
            vendor: d.vendor.clone(),
            product_id: d.product_id.clone(),
            product: d.product.clone(),
            class: d.class.clone(),
            driver: d.driver.clone(),
            iommu_group: d.iommu_group,
        })
        .collect();
    out.mediated_devices = f
        .mediated_devices
        .items()
        .iter()
        .map(|m| MediatedDevice {
            name: m.name.clone(),
            mdev_type: m.mdev_type.clone(),
            parent: m.parent.clone(),
            uuid: m.uuid.clone(),
            iommu_group: m.iommu_group,
        })
        .collect();
    match &f.security_model {
        Ok(m) => {
            out.security_model = Some(SecurityModel {
                model: m.model.clone(),
                doi: Some(m.doi.clone()).filter(|d| !d.is_empty()),
            })
        }
        Err(why) => out.unavailable.push(format!("securityModel: {why}")),
    }
    out.storage_pool_sources = f
        .logical_sources
        .items()
        .iter()
        .map(|s| StoragePoolSource {
            type_: s.pool_type.clone(),
            name: s.name.clone(),
            devices: s.devices.clone(),
            format: s.format.clone(),
        })
        .collect();
    out
}

/// Reads the host facts; `None` (logged) when libvirt cannot be read at all.
pub async fn read_host_facts(ctx: &Context) -> Option<HostFacts> {
    match ctx.engine.node_facts(FactsLimits::default()).await {
        Ok(f) => Some(host_facts(&f)),
        Err(e) => {
            tracing::warn!(error = %e, "reading the host's devices and interfaces failed");
            None
        }
    }
}

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
        // Filled in by `publish_once`, which keeps them between refreshes.
        host: None,
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

/// Publishes once: reads the node (host facts included) through the engine and applies the
/// status.
pub async fn publish_once(
    ctx: &Context,
    domains: Option<&Store<Domain>>,
    migration_uri: Option<String>,
    previous: Option<&HypervisorNodeStatus>,
) -> Result<HypervisorNodeStatus> {
    let facts = read_host_facts(ctx).await;
    publish_with_facts(ctx, domains, migration_uri, previous, facts).await
}

/// Publishes once with host facts read earlier (`None`: keep the previous status's).
pub async fn publish_with_facts(
    ctx: &Context,
    domains: Option<&Store<Domain>>,
    migration_uri: Option<String>,
    previous: Option<&HypervisorNodeStatus>,
    facts: Option<HostFacts>,
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
    status.host = facts.or_else(|| previous.and_then(|p| p.host.clone()));
    apply_status(ctx, &status).await?;
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
    let mut facts_read: Option<std::time::Instant> = None;
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
        let facts = if facts_read.is_none_or(|t| t.elapsed() >= HOST_FACTS_INTERVAL) {
            let facts = read_host_facts(&ctx).await;
            if facts.is_some() {
                facts_read = Some(std::time::Instant::now());
            }
            facts
        } else {
            None
        };
        match publish_with_facts(
            &ctx,
            Some(&domains),
            migration_uri.clone(),
            previous.as_ref(),
            facts,
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
    apply_status(ctx, &status).await?;
    Ok(status)
}

/// Writes this node's `HypervisorNode` status by server-side apply: the agent owns every
/// status field it writes, so a conflict is forced rather than reported.
async fn apply_status(ctx: &Context, status: &HypervisorNodeStatus) -> Result<()> {
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtkube_engine::model::{
        HostInterface as If, MediatedDevice as Mdev, PciDevice as Pci, PoolSourceFound,
        SecurityModel as Sec,
    };
    use virtkube_engine::node::HostFacts as EngineFacts;

    /// The documented bound: with every list at its limit and realistic long values, the
    /// host facts stay under 64 KiB of JSON.
    #[test]
    fn host_facts_at_their_limits_stay_under_64_kib() {
        let limits = FactsLimits::default();
        let pci = (0..limits.pci_devices)
            .map(|i| Pci {
                name: format!("pci_0000_{:02x}_1f_7", i % 256),
                address: format!("0000:{:02x}:1f.7", i % 256),
                vendor_id: "0x8086".into(),
                vendor: Some("Intel Corporation".into()),
                product_id: "0x10c9".into(),
                product: Some("Ethernet Controller XXV710 for 25GbE SFP28 (rev 02)".into()),
                class: Some("0x020000".into()),
                driver: Some("vfio-pci".into()),
                iommu_group: Some(i as u32),
            })
            .collect();
        let facts = EngineFacts {
            interfaces: Facts::Read {
                items: (0..limits.interfaces)
                    .map(|i| If {
                        name: format!("enp{i}s0f1np1"),
                        mac: Some("3c:ec:ef:12:34:56".into()),
                        active: true,
                    })
                    .collect(),
                total: 80,
            },
            pci_devices: Facts::Read {
                items: pci,
                total: 300,
            },
            mediated_devices: Facts::Read {
                items: (0..limits.mediated_devices)
                    .map(|i| Mdev {
                        name: format!("mdev_4b20d080_1b54_4048_85b3_a6a62d16{i:04x}"),
                        mdev_type: Some("nvidia-63".into()),
                        parent: Some("pci_0000_06_00_0".into()),
                        uuid: Some(format!("4b20d080-1b54-4048-85b3-a6a62d16{i:04x}")),
                        iommu_group: Some(12),
                    })
                    .collect(),
                total: 32,
            },
            security_model: Ok(Sec {
                model: "selinux".into(),
                doi: "0".into(),
            }),
            logical_sources: Facts::Read {
                items: (0..limits.pool_sources)
                    .map(|i| PoolSourceFound {
                        pool_type: "logical".into(),
                        name: Some(format!("vg-data-{i:02}")),
                        devices: (0..limits.devices_per_source)
                            .map(|d| format!("/dev/disk/by-id/nvme-SAMSUNG_MZQL23T8-{i:02}{d:02}"))
                            .collect(),
                        format: Some("lvm2".into()),
                    })
                    .collect(),
                total: 16,
            },
        };
        let status = host_facts(&facts);
        assert_eq!(
            status.truncated,
            [
                "interfaces: 80 found, 32 listed",
                "pciDevices: 300 found, 128 listed"
            ]
        );
        let bytes = serde_json::to_vec(&status).unwrap().len();
        eprintln!("host facts at their limits: {bytes} bytes");
        assert!(bytes < 64 * 1024, "{bytes} bytes");
    }

    #[test]
    fn what_libvirt_cannot_say_is_reported_with_its_reason() {
        let facts = EngineFacts {
            interfaces: Facts::Unavailable("this function is not supported".into()),
            pci_devices: Facts::Read {
                items: vec![],
                total: 0,
            },
            mediated_devices: Facts::Read {
                items: vec![],
                total: 0,
            },
            security_model: Err("no security driver".into()),
            logical_sources: Facts::Unavailable("cannot execute binary /sbin/pvs".into()),
        };
        let status = host_facts(&facts);
        assert_eq!(
            status.unavailable,
            [
                "interfaces: this function is not supported",
                "storagePoolSources: cannot execute binary /sbin/pvs",
                "securityModel: no security driver"
            ]
        );
        assert!(status.security_model.is_none() && status.interfaces.is_empty());
    }
}
