//! What the commands show after reading the hosts: a status table (kind, name, node, phase,
//! details), and each object's `status` as the operator would write it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use virtkube_crds::conditions::{self, set_condition, status as cstatus};
use virtkube_crds::domain::{
    CpuSchedulingStatus, CpuSpec, DomainPhase, DomainStatus, HostDeviceStatus, InterfaceStatus,
    MemorySpec, VcpuAffinity, VcpuPin,
};
use virtkube_crds::network::{NetworkNodeStatus, NetworkStatus};
use virtkube_crds::quantity::ByteQuantity;
use virtkube_crds::storage_pool::{PoolNodeStatus, StoragePoolStatus};
use virtkube_crds::volume::{VolumePhase, VolumeStatus};
use virtkube_crds::{Domain, DomainSpec, Network, StoragePool, Volume};

use crate::plan::desired::{DesiredDomain, DesiredState};
use crate::plan::observed::{
    ObservedDomain, ObservedNetwork, ObservedPool, ObservedState, ObservedVolume, OwnerMark,
    PowerObserved,
};
use crate::plan::render::{bytes, kib};
use crate::plan::{NoticeKind, Plan};

/// One line of the status table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// Kind.
    pub kind: String,
    /// `namespace/name` or `name`.
    pub name: String,
    /// Node.
    pub node: String,
    /// Phase.
    pub phase: String,
    /// Details.
    pub details: String,
}

/// The phase word of a domain's power state.
pub fn domain_phase(d: &ObservedDomain) -> DomainPhase {
    match d.power {
        PowerObserved::Running => DomainPhase::Running,
        PowerObserved::Paused => DomainPhase::Paused,
        PowerObserved::Crashed => DomainPhase::Crashed,
        PowerObserved::Shutoff if d.reason == "crashed" => DomainPhase::Crashed,
        PowerObserved::Shutoff => DomainPhase::Stopped,
    }
}

fn domain_details(d: &ObservedDomain) -> String {
    let mut parts = vec![
        format!("{}/{} vCPUs", d.vcpus, d.max_vcpus),
        format!("{}/{}", kib(d.memory_kib), kib(d.max_memory_kib)),
    ];
    if let Some(p) = pins_text(d) {
        parts.push(p);
    }
    if let Some(e) = &d.emulator_cpuset {
        parts.push(format!("emulator {e}"));
    }
    if let Some(c) = cpu_scheduling(&d.cpu_tune) {
        if let Some(s) = c.shares.filter(|s| *s != 1024) {
            parts.push(format!("shares {s}"));
        }
        if let Some(l) = c.limit {
            parts.push(format!("limit {l} CPUs"));
        }
        if let (Some(q), Some(p)) = (c.quota, c.period) {
            parts.push(format!("vCPU quota {q}/{p} µs"));
        }
    }
    if d.autostart {
        parts.push("autostart".into());
    }
    parts.push(format!("state {} ({})", d.power.as_str(), d.reason));
    parts.join(", ")
}

fn pins_text(d: &ObservedDomain) -> Option<String> {
    if d.pinning.is_empty() {
        return None;
    }
    Some(format!(
        "pins {}",
        d.pinning
            .iter()
            .map(|(v, c)| format!("{v}→{c}"))
            .collect::<Vec<_>>()
            .join(" ")
    ))
}

fn volume_details(pool: &str, v: &ObservedVolume) -> String {
    let mut s = format!(
        "{} {} in pool {pool}",
        bytes(v.capacity),
        v.format.as_deref().unwrap_or("?")
    );
    if v.backing_path.is_some() {
        s.push_str(", copy-on-write");
    }
    s
}

fn network_details(n: &ObservedNetwork) -> String {
    let mut parts = vec![n.mode.clone()];
    if let Some(b) = &n.bridge {
        parts.push(format!("bridge {b}"));
    }
    if let Some((a, p)) = &n.ip {
        parts.push(format!("{a}/{p}"));
    }
    if n.autostart {
        parts.push("autostart".into());
    }
    parts.join(", ")
}

fn pool_details(p: &ObservedPool) -> String {
    let mut parts = vec![p.pool_type.clone()];
    if let Some(t) = &p.target_path {
        parts.push(t.clone());
    }
    if p.autostart {
        parts.push("autostart".into());
    }
    parts.join(", ")
}

fn display(owner: &Option<OwnerMark>, name: &str) -> String {
    match owner {
        Some(o) => match &o.namespace {
            Some(ns) => format!("{ns}/{}", o.name),
            None => o.name.clone(),
        },
        None => name.to_string(),
    }
}

/// Rows for every observed object; `all` includes objects virtkube does not own.
pub fn observed_rows(observed: &ObservedState, all: bool) -> Vec<Row> {
    let mut rows = Vec::new();
    for (node, host) in &observed.hosts {
        for (name, p) in &host.pools {
            if all || p.owner.is_some() {
                rows.push(Row {
                    kind: "StoragePool".into(),
                    name: display(&p.owner, name),
                    node: node.clone(),
                    phase: if p.active { "Running" } else { "Inactive" }.into(),
                    details: pool_details(p),
                });
            }
        }
        for ((pool, name), v) in &host.volumes {
            if all || v.owned {
                rows.push(Row {
                    kind: "Volume".into(),
                    name: match virtkube_crds::names::split_host_name(name) {
                        Some((ns, n)) if v.owned => format!("{ns}/{n}"),
                        _ => name.clone(),
                    },
                    node: node.clone(),
                    phase: "Available".into(),
                    details: volume_details(pool, v),
                });
            }
        }
        for (name, n) in &host.networks {
            if all || n.owner.is_some() {
                rows.push(Row {
                    kind: "Network".into(),
                    name: display(&n.owner, name),
                    node: node.clone(),
                    phase: if n.active { "Active" } else { "Inactive" }.into(),
                    details: network_details(n),
                });
            }
        }
        for (name, d) in &host.domains {
            if all || d.owner.is_some() {
                rows.push(Row {
                    kind: "Domain".into(),
                    name: display(&d.owner, name),
                    node: node.clone(),
                    phase: format!("{:?}", domain_phase(d)),
                    details: domain_details(d),
                });
            }
        }
    }
    rows
}

/// Rows for what the manifests describe, as observed, with failures and notices from the
/// last plan.
pub fn desired_rows(desired: &DesiredState, observed: &ObservedState, last: &Plan) -> Vec<Row> {
    let problem = |kind: &str, name: &str| {
        last.notices
            .iter()
            .find(|n| n.object.kind.as_str() == kind && n.object.name == name)
            .map(|n| {
                let fields: Vec<&str> = n.changes.iter().map(|c| c.field.as_str()).collect();
                if fields.is_empty() {
                    format!("{}: {}", n.kind.label(), n.message)
                } else {
                    format!("{} ({}): {}", n.kind.label(), fields.join(", "), n.message)
                }
            })
    };
    let pending = |kind: &str, name: &str| -> Option<String> {
        let n = last
            .actions
            .iter()
            .filter(|a| a.object.kind.as_str() == kind && a.object.name == name)
            .count();
        (n > 0).then(|| format!("{n} change(s) not applied"))
    };
    // One row: the object's observed phase and details, then the last plan's problem with
    // it or, failing that, its changes not applied.
    let row = |kind: &str, name: &str, display: &str, node: &str, phase: String, details| Row {
        kind: kind.into(),
        name: display.to_string(),
        node: node.to_string(),
        phase,
        details: join(details, problem(kind, name).or_else(|| pending(kind, name))),
    };
    let absent = || ("Pending".to_string(), String::new());
    let mut rows = Vec::new();
    for p in &desired.pools {
        for (node, host) in &observed.hosts {
            let (phase, details) = match host.pools.get(&p.name) {
                Some(o) => (
                    if o.active { "Running" } else { "Inactive" }.to_string(),
                    pool_details(o),
                ),
                None => absent(),
            };
            rows.push(row("StoragePool", &p.name, &p.name, node, phase, details));
        }
    }
    for v in &desired.volumes {
        let o = observed
            .hosts
            .get(&v.node)
            .and_then(|h| h.volumes.get(&(v.pool.clone(), v.name.clone())));
        let (phase, details) = match o {
            Some(o) => ("Available".to_string(), volume_details(&v.pool, o)),
            None => absent(),
        };
        rows.push(row("Volume", &v.name, &v.display, &v.node, phase, details));
    }
    for n in &desired.networks {
        for (node, host) in &observed.hosts {
            let (phase, details) = match host.networks.get(&n.name) {
                Some(o) => (
                    if o.active { "Active" } else { "Inactive" }.to_string(),
                    network_details(o),
                ),
                None => absent(),
            };
            rows.push(row("Network", &n.name, &n.name, node, phase, details));
        }
    }
    for d in &desired.domains {
        let found = observed
            .hosts
            .iter()
            .find_map(|(node, h)| h.domains.get(&d.name).map(|o| (node, o)));
        let (node, (phase, details)) = match found {
            Some((node, o)) => (node, (format!("{:?}", domain_phase(o)), domain_details(o))),
            None => (&d.node, absent()),
        };
        rows.push(row("Domain", &d.name, &d.display, node, phase, details));
    }
    rows
}

fn join(details: String, extra: Option<String>) -> String {
    match extra {
        Some(e) if details.is_empty() => e,
        Some(e) => format!("{details}; {e}"),
        None => details,
    }
}

/// The rows as an aligned table.
pub fn table(rows: &[Row]) -> String {
    let headers = ["KIND", "NAME", "NODE", "PHASE", "DETAILS"];
    let cols = |r: &Row| {
        [
            r.kind.clone(),
            r.name.clone(),
            r.node.clone(),
            r.phase.clone(),
            r.details.clone(),
        ]
    };
    let mut widths = headers.map(str::len);
    for r in rows {
        for (i, c) in cols(r).iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: [String; 5]| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i == 4 {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}   ", w = widths[i]));
            }
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(headers.map(str::to_string));
    for r in rows {
        line(cols(r));
    }
    out
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

fn ready(
    conds: &mut Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
) {
    set_condition(
        conds,
        conditions::condition(
            conditions::READY,
            if ok { cstatus::TRUE } else { cstatus::FALSE },
            reason,
            message,
            generation,
            now(),
        ),
    );
}

/// A domain's status as the agent writes it.
pub fn domain_status(
    node: &str,
    o: &ObservedDomain,
    desired: Option<&DesiredDomain>,
    pending: &[String],
    generation: Option<i64>,
) -> DomainStatus {
    let phase = domain_phase(o);
    let mut conds = Vec::new();
    let wanted = desired.map(|d| d.state);
    let ok = match wanted {
        Some(virtkube_crds::domain::PowerState::Running) => phase == DomainPhase::Running,
        Some(virtkube_crds::domain::PowerState::Paused) => phase == DomainPhase::Paused,
        Some(virtkube_crds::domain::PowerState::Stopped) => phase == DomainPhase::Stopped,
        None => true,
    };
    ready(
        &mut conds,
        ok,
        if ok { "Converged" } else { "NotConverged" },
        format!("libvirt state {} ({})", o.power.as_str(), o.reason),
        generation,
    );
    set_condition(
        &mut conds,
        conditions::condition(
            conditions::RESTART_REQUIRED,
            if pending.is_empty() {
                cstatus::FALSE
            } else {
                cstatus::TRUE
            },
            if pending.is_empty() {
                "UpToDate"
            } else {
                "ChangesPending"
            },
            if pending.is_empty() {
                String::new()
            } else {
                format!("waiting for the next stop: {}", pending.join(", "))
            },
            generation,
            now(),
        ),
    );
    DomainStatus {
        phase: Some(phase),
        state_reason: Some(o.reason.clone()),
        node_name: Some(node.to_string()),
        domain_name: desired.map(|d| d.name.clone()),
        uuid: Some(o.uuid.clone()),
        id: o.id,
        vcpus: Some(o.vcpus),
        max_vcpus: Some(o.max_vcpus),
        vcpu_affinity: o
            .pinning
            .iter()
            .map(|(v, c)| VcpuAffinity {
                vcpu: *v,
                cpuset: c.clone(),
            })
            .collect(),
        emulator_cpuset: o.emulator_cpuset.clone(),
        cpu_scheduling: cpu_scheduling(&o.cpu_tune),
        security_labels: o.security_labels.clone(),
        memory: Some(ByteQuantity::new(kib(o.memory_kib))),
        max_memory: Some(ByteQuantity::new(kib(o.max_memory_kib))),
        autostart: Some(o.autostart),
        interfaces: desired
            .map(|d| {
                d.interfaces
                    .iter()
                    .zip(&o.interfaces)
                    .filter_map(|(want, have)| {
                        have.mac.clone().map(|mac| InterfaceStatus {
                            name: want.name.clone(),
                            mac_address: mac,
                        })
                    })
                    .collect()
            })
            .unwrap_or_default(),
        host_devices: host_device_status(
            &desired
                .map(|d| {
                    d.host_devices
                        .iter()
                        .map(|h| (h.name.as_str(), h.address.as_str()))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default(),
            &o.host_devices
                .iter()
                .map(|h| (h.address.clone(), h.alias.clone()))
                .collect::<Vec<_>>(),
        ),
        pending_changes: pending.to_vec(),
        migration: None,
        observed_generation: generation,
        conditions: conds,
    }
}

/// `status.hostDevices`: each host device the domain has (`have`: address and libvirt user
/// alias), named as the spec names its address (`spec`: name and address), else by its
/// alias, else by the address itself. Shared by the CLI and the agent.
pub fn host_device_status(
    spec: &[(&str, &str)],
    have: &[(String, Option<String>)],
) -> Vec<HostDeviceStatus> {
    have.iter()
        .map(|(address, alias)| HostDeviceStatus {
            name: spec
                .iter()
                .find(|(_, a)| a.eq_ignore_ascii_case(address))
                .map(|(n, _)| (*n).to_string())
                .or_else(|| alias.clone())
                .unwrap_or_else(|| address.clone()),
            address: address.clone(),
        })
        .collect()
}

/// `status.cpuScheduling` from the CPU weight and bandwidth in force (`None` when libvirt
/// reports none); unlimited quotas are left out, the whole-guest quota is written as a
/// limit in CPUs. Shared by the CLI and the agent.
pub fn cpu_scheduling(t: &crate::plan::observed::CpuTune) -> Option<CpuSchedulingStatus> {
    if t.is_empty() {
        return None;
    }
    let positive = |q: Option<i64>| q.and_then(|q| u64::try_from(q).ok()).filter(|q| *q > 0);
    Some(CpuSchedulingStatus {
        shares: t.shares,
        limit: match (positive(t.global_quota), t.global_period) {
            (Some(q), Some(p)) if p > 0 => {
                Some(virtkube_crds::domain::format_cpu_limit(q * 1000 / p))
            }
            _ => None,
        },
        period: t.period,
        quota: positive(t.quota),
        emulator_period: t.emulator_period,
        emulator_quota: positive(t.emulator_quota),
    })
}

/// A volume's status.
pub fn volume_status(
    node: &str,
    name: &str,
    o: &ObservedVolume,
    used_by: Vec<String>,
    generation: Option<i64>,
) -> VolumeStatus {
    let mut conds = Vec::new();
    ready(
        &mut conds,
        true,
        "Available",
        format!("at {}", o.path),
        generation,
    );
    VolumeStatus {
        phase: Some(VolumePhase::Available),
        node_name: Some(node.to_string()),
        volume_name: Some(name.to_string()),
        path: Some(o.path.clone()),
        key: Some(o.key.clone()),
        partition: None,
        capacity: Some(ByteQuantity::new(bytes(o.capacity))),
        allocation: Some(ByteQuantity::new(bytes(o.allocation))),
        used_by,
        observed_generation: generation,
        conditions: conds,
        transfer: None,
    }
}

/// A network's status over every node.
pub fn network_status(
    name: &str,
    observed: &ObservedState,
    generation: Option<i64>,
) -> NetworkStatus {
    let nodes: Vec<NetworkNodeStatus> = observed
        .hosts
        .iter()
        .filter_map(|(node, h)| {
            h.networks.get(name).map(|n| NetworkNodeStatus {
                node_name: node.clone(),
                active: n.active,
                bridge: n.bridge.clone(),
                autostart: Some(n.autostart),
                message: None,
            })
        })
        .collect();
    let ok = !nodes.is_empty() && nodes.iter().all(|n| n.active);
    let mut conds = Vec::new();
    ready(
        &mut conds,
        ok,
        if ok { "Active" } else { "NotActive" },
        format!(
            "active on {} of {} node(s)",
            nodes.iter().filter(|n| n.active).count(),
            observed.hosts.len()
        ),
        generation,
    );
    NetworkStatus {
        nodes,
        observed_generation: generation,
        conditions: conds,
    }
}

/// A pool's status over every node.
pub fn pool_status(
    name: &str,
    observed: &ObservedState,
    generation: Option<i64>,
) -> StoragePoolStatus {
    let nodes: Vec<PoolNodeStatus> = observed
        .hosts
        .iter()
        .filter_map(|(node, h)| {
            h.pools.get(name).map(|p| PoolNodeStatus {
                node_name: node.clone(),
                // The agent's words (libvirt's states), so both writers agree.
                state: if p.active { "Running" } else { "Inactive" }.into(),
                capacity: Some(ByteQuantity::new(bytes(p.capacity))),
                allocation: Some(ByteQuantity::new(bytes(
                    p.capacity.saturating_sub(p.available),
                ))),
                available: Some(ByteQuantity::new(bytes(p.available))),
                autostart: Some(p.autostart),
                message: None,
                // Whose a partition is, is the agent's record (Volume statuses in a
                // cluster); the local CLI keeps none.
                unrecorded_partitions: None,
            })
        })
        .collect();
    let ok = !nodes.is_empty() && nodes.iter().all(|n| n.state == "Running");
    let mut conds = Vec::new();
    ready(
        &mut conds,
        ok,
        if ok { "Running" } else { "NotRunning" },
        format!(
            "running on {} of {} node(s)",
            nodes.iter().filter(|n| n.state == "running").count(),
            observed.hosts.len()
        ),
        generation,
    );
    StoragePoolStatus {
        nodes,
        observed_generation: generation,
        conditions: conds,
    }
}

/// The restart-pending fields of a domain from a plan.
pub fn pending_of(plan: &Plan, name: &str) -> Vec<String> {
    plan.notices
        .iter()
        .filter(|n| n.kind == NoticeKind::RestartPending && n.object.name == name)
        .flat_map(|n| n.changes.iter().map(|c| format!("spec.{}", c.field)))
        .collect()
}

/// Domains using a volume, as `namespace/name`.
pub fn volume_users(observed: &ObservedState, node: &str, pool: &str, volume: &str) -> Vec<String> {
    observed
        .hosts
        .get(node)
        .map(|h| {
            h.domains
                .iter()
                .filter(|(_, d)| d.disks.iter().any(|x| matches!(&x.source, crate::plan::observed::DiskRef::Volume { pool: p, volume: v } if p == pool && v == volume)))
                .map(|(n, d)| display(&d.owner, n))
                .collect()
        })
        .unwrap_or_default()
}

fn meta_of(owner: &OwnerMark) -> ObjectMeta {
    ObjectMeta {
        name: Some(owner.name.clone()),
        namespace: owner.namespace.clone(),
        uid: (!owner.is_local()).then(|| owner.uid.clone()),
        ..ObjectMeta::default()
    }
}

/// Objects reconstructed from what the hosts hold (no manifests given): metadata from the
/// ownership mark, the spec fields libvirt reports, and the status.
pub fn reconstructed(observed: &ObservedState) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for (node, host) in &observed.hosts {
        for (name, p) in &host.pools {
            let Some(owner) = &p.owner else { continue };
            if !seen.insert(("StoragePool", name.clone())) {
                continue;
            }
            let mut obj = StoragePool::new(&owner.name, serde_json::from_value(serde_json::json!({
                "type": p.pool_type, "target": p.target_path.as_ref().map(|t| serde_json::json!({"path": t})), "autostart": p.autostart
            })).unwrap_or_else(|_| default_pool_spec()));
            obj.metadata = meta_of(owner);
            obj.status = Some(pool_status(name, observed, None));
            out.push(serde_json::to_value(&obj).unwrap_or_default());
        }
        for (name, n) in &host.networks {
            let Some(owner) = &n.owner else { continue };
            if !seen.insert(("Network", name.clone())) {
                continue;
            }
            let spec = serde_json::from_value(serde_json::json!({
                "mode": n.mode, "bridge": n.bridge, "autostart": n.autostart,
                "ip": n.ip.as_ref().map(|(a, p)| serde_json::json!({"address": a, "prefix": p})),
            }));
            let Ok(spec) = spec else { continue };
            let mut obj = Network::new(&owner.name, spec);
            obj.metadata = meta_of(owner);
            obj.status = Some(network_status(name, observed, None));
            out.push(serde_json::to_value(&obj).unwrap_or_default());
        }
        for ((pool, name), v) in &host.volumes {
            if !v.owned {
                continue;
            }
            let (ns, short) =
                virtkube_crds::names::split_host_name(name).unwrap_or(("default", name));
            let spec = serde_json::from_value(serde_json::json!({
                "pool": pool, "capacity": bytes(v.capacity), "format": v.format.clone().unwrap_or_else(|| "qcow2".into()),
            }));
            let Ok(spec) = spec else { continue };
            let mut obj = Volume::new(short, spec);
            obj.metadata.namespace = Some(ns.to_string());
            obj.status = Some(volume_status(
                node,
                name,
                v,
                volume_users(observed, node, pool, name),
                None,
            ));
            out.push(serde_json::to_value(&obj).unwrap_or_default());
        }
        for (name, d) in &host.domains {
            let Some(owner) = &d.owner else { continue };
            let spec = DomainSpec {
                node_name: Some(node.clone()),
                autostart: d.autostart,
                cpu: CpuSpec {
                    vcpus: d.vcpus,
                    max_vcpus: (d.max_vcpus != d.vcpus).then_some(d.max_vcpus),
                    pinning: Vec::<VcpuPin>::new(),
                    ..CpuSpec::default()
                },
                memory: MemorySpec {
                    size: ByteQuantity::new(kib(d.memory_kib)),
                    max: (d.max_memory_kib != d.memory_kib)
                        .then(|| ByteQuantity::new(kib(d.max_memory_kib))),
                    hugepages: None,
                },
                ..serde_json::from_value(serde_json::json!({"memory": {"size": "1Mi"}}))
                    .unwrap_or_else(|_| fallback_domain_spec())
            };
            let mut obj = Domain::new(&owner.name, spec);
            obj.metadata = meta_of(owner);
            obj.status = Some(domain_status(node, d, None, &[], None));
            if let Some(s) = obj.status.as_mut() {
                s.domain_name = Some(name.clone());
            }
            out.push(serde_json::to_value(&obj).unwrap_or_default());
        }
    }
    out
}

fn default_pool_spec() -> virtkube_crds::StoragePoolSpec {
    virtkube_crds::StoragePoolSpec {
        type_: Default::default(),
        target: None,
        source: None,
        autostart: true,
        shared: false,
        node_selector: Default::default(),
    }
}

fn fallback_domain_spec() -> DomainSpec {
    DomainSpec {
        node_name: None,
        node_selector: Default::default(),
        tolerations: Vec::new(),
        run_strategy: Default::default(),
        state: None,
        autostart: false,
        cpu: CpuSpec::default(),
        memory: MemorySpec {
            size: ByteQuantity::new("1Mi"),
            max: None,
            hugepages: None,
        },
        os: None,
        disks: Vec::new(),
        interfaces: Vec::new(),
        host_devices: Vec::new(),
        migration: None,
        eviction_strategy: Default::default(),
        update_policy: Default::default(),
    }
}

/// Reflects the plan's refusals in an object's conditions: a name clash, a forbidden change
/// or an invalid reference makes `Ready` false with the planner's message, and
/// `SpecValid` says whether the spec itself can be realized.
fn notice_conditions(
    conds: &mut Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
    kind: &str,
    name: &str,
    last: &Plan,
    generation: Option<i64>,
) {
    let mine: Vec<&crate::plan::Notice> = last
        .notices
        .iter()
        .filter(|n| n.object.kind.as_str() == kind && n.object.name == name && n.kind.is_error())
        .collect();
    let spec_problem = mine.iter().find(|n| {
        matches!(
            n.kind,
            NoticeKind::Forbidden | NoticeKind::Invalid | NoticeKind::Unsupported
        )
    });
    set_condition(
        conds,
        conditions::condition(
            conditions::SPEC_VALID,
            if spec_problem.is_some() {
                cstatus::FALSE
            } else {
                cstatus::TRUE
            },
            match spec_problem.map(|n| n.kind) {
                Some(NoticeKind::Forbidden) => "ChangeForbidden",
                Some(NoticeKind::Unsupported) => "Unsupported",
                Some(_) => "InvalidReference",
                None => "Valid",
            },
            spec_problem.map(|n| n.message.clone()).unwrap_or_default(),
            generation,
            now(),
        ),
    );
    if let Some(n) = mine.first() {
        let reason = match n.kind {
            NoticeKind::Conflict => "NameConflict",
            NoticeKind::Forbidden => "ChangeForbidden",
            NoticeKind::Unsupported => "Unsupported",
            _ => "InvalidSpec",
        };
        ready(conds, false, reason, n.message.clone(), generation);
    }
}

/// The manifests' objects with their status filled from the hosts.
pub fn with_status(
    manifests: &[virtkube_crds::manifest::Manifest],
    desired: &DesiredState,
    observed: &ObservedState,
    last: &Plan,
) -> Vec<serde_json::Value> {
    use virtkube_crds::manifest::Object;
    let mut out = Vec::new();
    for m in manifests {
        let value = match &m.object {
            Object::StoragePool(p) => {
                let mut p = (**p).clone();
                let name = p.metadata.name.clone().unwrap_or_default();
                p.status = Some(pool_status(&name, observed, p.metadata.generation));
                if let Some(st) = p.status.as_mut() {
                    notice_conditions(
                        &mut st.conditions,
                        "StoragePool",
                        &name,
                        last,
                        p.metadata.generation,
                    );
                }
                serde_json::to_value(&p)
            }
            Object::Network(n) => {
                let mut n = (**n).clone();
                let name = n.metadata.name.clone().unwrap_or_default();
                n.status = Some(network_status(&name, observed, n.metadata.generation));
                if let Some(st) = n.status.as_mut() {
                    notice_conditions(
                        &mut st.conditions,
                        "Network",
                        &name,
                        last,
                        n.metadata.generation,
                    );
                }
                serde_json::to_value(&n)
            }
            Object::Volume(v) => {
                let mut v = (**v).clone();
                let name = namespaced_host_name(&v.metadata);
                if let Some(d) = desired.volumes.iter().find(|d| d.name == name)
                    && let Some(o) = observed
                        .hosts
                        .get(&d.node)
                        .and_then(|h| h.volumes.get(&(d.pool.clone(), name.clone())))
                {
                    v.status = Some(volume_status(
                        &d.node,
                        &name,
                        o,
                        volume_users(observed, &d.node, &d.pool, &name),
                        v.metadata.generation,
                    ));
                } else {
                    let mut conds = Vec::new();
                    ready(
                        &mut conds,
                        false,
                        "NotCreated",
                        "not on the host".into(),
                        v.metadata.generation,
                    );
                    v.status = Some(VolumeStatus {
                        phase: Some(VolumePhase::Pending),
                        conditions: conds,
                        ..VolumeStatus::default()
                    });
                }
                if let Some(st) = v.status.as_mut() {
                    notice_conditions(
                        &mut st.conditions,
                        "Volume",
                        &name,
                        last,
                        v.metadata.generation,
                    );
                }
                serde_json::to_value(&v)
            }
            Object::Domain(d) => {
                let mut d = (**d).clone();
                let name = namespaced_host_name(&d.metadata);
                let want = desired.domains.iter().find(|x| x.name == name);
                let found = observed
                    .hosts
                    .iter()
                    .find_map(|(node, h)| h.domains.get(&name).map(|o| (node, o)));
                d.status = Some(match found {
                    Some((node, o)) => {
                        let mut s = domain_status(
                            node,
                            o,
                            want,
                            &pending_of(last, &name),
                            d.metadata.generation,
                        );
                        s.domain_name = Some(name.clone());
                        s
                    }
                    None => {
                        let mut conds = Vec::new();
                        ready(
                            &mut conds,
                            false,
                            "NotDefined",
                            "not on the host".into(),
                            d.metadata.generation,
                        );
                        DomainStatus {
                            phase: Some(DomainPhase::Pending),
                            conditions: conds,
                            ..DomainStatus::default()
                        }
                    }
                });
                if let Some(st) = d.status.as_mut() {
                    notice_conditions(
                        &mut st.conditions,
                        "Domain",
                        &name,
                        last,
                        d.metadata.generation,
                    );
                }
                serde_json::to_value(&d)
            }
        };
        if let Ok(v) = value {
            out.push(v);
        }
    }
    out
}

/// The libvirt name of a namespaced object (`<namespace>.<name>`, namespace `default` when
/// the manifest named none).
fn namespaced_host_name(meta: &kube::api::ObjectMeta) -> String {
    virtkube_crds::names::host_name(
        Some(meta.namespace.as_deref().unwrap_or("default")),
        meta.name.as_deref().unwrap_or_default(),
    )
}
