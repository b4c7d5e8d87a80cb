//! The planner's observed model built from what a cluster reports, instead of from libvirt:
//! every virtkube object as stored, with the status its node agents wrote, and the
//! `HypervisorNode`s. `virtkube plan --kubeconfig` plans against it, so a reviewer sees what
//! the cluster would do with a change without anyone reaching a libvirt host.
//!
//! # What status tells, and what it cannot
//!
//! Read from status, as the agents wrote it:
//! - a Domain's holder (`status.nodeName`), whether it is defined there (the `Defined`
//!   condition, else its `phase`), its power state (`phase`, libvirt's `stateReason`, the
//!   runtime `id`), `vcpus`, `maxVcpus`, `memory`, `maxMemory`, `autostart`, `uuid`, the
//!   interfaces' MACs, and the affinity (`vcpuAffinity`, `emulatorCpuset`) of the vCPUs and
//!   emulator threads the stored spec pins (a floating vCPU's affinity is every CPU the
//!   driver offers, present or online, which status cannot tell from a pin);
//! - a Volume's node, `path`, `key`, `capacity` and `allocation`;
//! - a Network's and a StoragePool's state on each node (`status.nodes[]`: active or
//!   running, autostart, bridge, pool capacity and free space);
//! - each node's CPU count, and its CPUs from the NUMA cells (what a vCPU whose pin is
//!   removed floats over again).
//!
//! Not in status, so taken from the **stored spec** (what the agent converges to, which it
//! reports as done through `observedGeneration` and `Ready`): a Domain's CPU mode, model and
//! topology, hugepages, machine, arch, firmware, boot order, direct kernel boot, disks and the
//! interfaces' networks and models; a Volume's format, pool and source; a Network's mode,
//! addresses and DHCP ranges; a StoragePool's type and path. A change that waits for a
//! restart (`status.pendingChanges`) is therefore compared as if already made; the plan
//! reports the waiting changes beside.
//!
//! What nobody can tell from status: drift the agents have not reported yet (a `virsh`
//! change since their last write; an agent that is down or behind its object's generation,
//! which [`observe`] reports as a note), libvirt details no status carries (the expanded
//! machine type, PCI addresses, disk buses libvirt chose, a CPU that is present but offline
//! counts as online), and libvirt objects virtkube does not own (a name clash shows only
//! when an agent reports it as a condition).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::ResourceExt;
use virtkube_crds::conditions;
use virtkube_crds::cpuset::CpuSet;
use virtkube_crds::domain::{DomainPhase, DomainStatus, MigrationState};
use virtkube_crds::manifest::{Manifest, Object, Source};
use virtkube_crds::names::host_name;
use virtkube_crds::volume::VolumePhase;
use virtkube_crds::{Domain, HypervisorNode, Network, StoragePool, Volume};

use super::desired::{
    DesiredDiskSource, DesiredDomain, DesiredNetwork, DesiredPool, DesiredState, Nodes,
};
use super::observed::{
    DiskRef, ObservedDisk, ObservedDomain, ObservedHost, ObservedNetwork, ObservedNic,
    ObservedPool, ObservedState, ObservedVolume, PowerObserved,
};
use super::{Notice, NoticeKind, ObjectKind, ObjectRef};

/// The node name under which objects that no node holds yet are planned: the cluster
/// controller will choose their node.
pub const UNSCHEDULED: &str = "(unscheduled)";

/// What a cluster reports: virtkube's objects as stored (spec and status) and its nodes.
#[derive(Debug, Clone, Default)]
pub struct ClusterState {
    /// Domains, every namespace.
    pub domains: Vec<Domain>,
    /// Volumes, every namespace.
    pub volumes: Vec<Volume>,
    /// Networks.
    pub networks: Vec<Network>,
    /// Storage pools.
    pub pools: Vec<StoragePool>,
    /// The nodes' agents' reports.
    pub nodes: Vec<HypervisorNode>,
}

impl ClusterState {
    /// The names of the nodes that have a `HypervisorNode`.
    pub fn node_names(&self) -> BTreeSet<String> {
        self.nodes.iter().map(ResourceExt::name_any).collect()
    }

    /// The stored objects as manifests (source `cluster`), for the planner's normalization.
    pub fn as_manifests(&self) -> Vec<Manifest> {
        let stored = |document: usize, object: Object| Manifest {
            source: Source {
                file: PathBuf::from("cluster"),
                document,
            },
            object,
        };
        let objects = self
            .pools
            .iter()
            .map(|p| Object::StoragePool(Box::new(p.clone())))
            .chain(
                self.networks
                    .iter()
                    .map(|n| Object::Network(Box::new(n.clone()))),
            )
            .chain(
                self.volumes
                    .iter()
                    .map(|v| Object::Volume(Box::new(v.clone()))),
            )
            .chain(
                self.domains
                    .iter()
                    .map(|d| Object::Domain(Box::new(d.clone()))),
            );
        objects.enumerate().map(|(i, o)| stored(i + 1, o)).collect()
    }

    /// Node names for normalizing stored objects: every node any object or node names,
    /// with [`UNSCHEDULED`] for objects that name none.
    pub fn all_nodes(&self) -> Nodes {
        let mut all: BTreeSet<String> = self.node_names();
        for d in &self.domains {
            all.extend(d.spec.node_name.clone());
            all.extend(d.status.as_ref().and_then(|s| s.node_name.clone()));
        }
        for v in &self.volumes {
            all.extend(v.spec.node_name.clone());
            all.extend(v.status.as_ref().and_then(|s| s.node_name.clone()));
        }
        let mut nodes = vec![UNSCHEDULED.to_string()];
        nodes.extend(all);
        Nodes {
            default: UNSCHEDULED.to_string(),
            all: nodes,
        }
    }
}

/// The observed model of a cluster, with notes on what it could not know.
#[derive(Debug, Clone, Default)]
pub struct Reported {
    /// Per node, what the agents reported (stored specs filling what status lacks).
    pub state: ObservedState,
    /// What the plan's reader should know about objects: status behind the spec, not
    /// Ready, a move under way.
    pub notes: Vec<Notice>,
    /// What the plan's reader should know about nodes: not Ready, or named by objects but
    /// without a `HypervisorNode`.
    pub node_notes: Vec<String>,
}

fn condition<'a>(conds: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conds.iter().find(|c| c.type_ == type_)
}

fn is_true(conds: &[Condition], type_: &str) -> Option<bool> {
    condition(conds, type_).map(|c| c.status == conditions::status::TRUE)
}

/// The union of a node's NUMA cells' CPUs (canonical), when every cell lists them.
fn node_cpus(node: &HypervisorNode) -> Option<String> {
    let status = node.status.as_ref()?;
    if status.numa_cells.is_empty() {
        return None;
    }
    let mut cpus = BTreeSet::new();
    for cell in &status.numa_cells {
        let set: CpuSet = cell.cpus.as_deref()?.parse().ok()?;
        cpus.extend(set.iter());
    }
    CpuSet::from_cpus(cpus).map(|s| s.to_string())
}

fn canonical(cpuset: &str) -> String {
    cpuset
        .parse::<CpuSet>()
        .map(|c| c.to_string())
        .unwrap_or_else(|_| cpuset.to_string())
}

/// Where a Domain is and how it runs, from its phase and conditions; `None` when it is not
/// defined on any node.
fn domain_power(status: &DomainStatus) -> Option<PowerObserved> {
    let defined = is_true(&status.conditions, conditions::DEFINED);
    let running = is_true(&status.conditions, conditions::RUNNING);
    let from_running = || {
        if running == Some(true) {
            PowerObserved::Running
        } else {
            PowerObserved::Shutoff
        }
    };
    match status.phase? {
        DomainPhase::Running | DomainPhase::Migrating => Some(PowerObserved::Running),
        DomainPhase::Paused => Some(PowerObserved::Paused),
        DomainPhase::Stopped => Some(PowerObserved::Shutoff),
        // A crashed guest keeps a process (and a runtime id) until destroyed.
        DomainPhase::Crashed if status.id.is_some() => Some(PowerObserved::Crashed),
        DomainPhase::Crashed => Some(PowerObserved::Shutoff),
        DomainPhase::Pending => None,
        DomainPhase::Provisioning
        | DomainPhase::Failed
        | DomainPhase::Terminating
        | DomainPhase::Unknown => (defined == Some(true)).then(from_running),
    }
}

fn domain_observed(
    d: &DesiredDomain,
    status: &DomainStatus,
    power: PowerObserved,
) -> ObservedDomain {
    let kib = |q: &Option<virtkube_crds::quantity::ByteQuantity>, fallback: u64| {
        q.as_ref()
            .and_then(|q| q.bytes().ok())
            .map_or(fallback, |b| b / 1024)
    };
    let macs: BTreeMap<&str, &str> = status
        .interfaces
        .iter()
        .map(|i| (i.name.as_str(), i.mac_address.as_str()))
        .collect();
    ObservedDomain {
        owner: Some(d.owner.clone()),
        uuid: status.uuid.clone().unwrap_or_default(),
        id: status.id,
        power,
        reason: status.state_reason.clone().unwrap_or_default(),
        vcpus: status.vcpus.unwrap_or(d.vcpus),
        max_vcpus: status.max_vcpus.unwrap_or(d.max_vcpus),
        cpu_mode: d.cpu_mode.clone(),
        cpu_model: d.cpu_model.clone(),
        topology: d.topology,
        // Only the vCPUs the stored spec pins: libvirt reports a floating vCPU's affinity
        // as every CPU it may use, which differs by driver (present or online CPUs) and
        // cannot be told apart from a pin without the host's own CPU map.
        pinning: d
            .pinning
            .iter()
            .map(|(vcpu, pin)| {
                let reported = status
                    .vcpu_affinity
                    .iter()
                    .find(|a| a.vcpu == *vcpu)
                    .map(|a| canonical(&a.cpuset));
                (*vcpu, reported.unwrap_or_else(|| pin.clone()))
            })
            .collect(),
        emulator_cpuset: d.emulator_cpuset.as_ref().map(|pin| {
            status
                .emulator_cpuset
                .as_deref()
                .map_or_else(|| pin.clone(), canonical)
        }),
        memory_kib: kib(&status.memory, d.memory_kib),
        max_memory_kib: kib(&status.max_memory, d.max_memory_kib),
        hugepage_kib: d.hugepage_kib,
        machine: d.machine.clone(),
        arch: d.arch.clone(),
        firmware: d.firmware.clone(),
        boot: d.boot.clone(),
        kernel: d.kernel.clone(),
        initrd: d.initrd.clone(),
        cmdline: d.cmdline.clone(),
        disks: d
            .disks
            .iter()
            .map(|disk| ObservedDisk {
                target: disk.target.clone(),
                bus: Some(disk.bus.clone()),
                device: disk.device.clone(),
                source: match &disk.source {
                    DesiredDiskSource::Volume { volume, pool, .. } => DiskRef::Volume {
                        pool: pool.clone().unwrap_or_default(),
                        volume: volume.clone(),
                    },
                    DesiredDiskSource::Path(p) => DiskRef::Path(p.clone()),
                },
                read_only: disk.read_only,
                boot_order: disk.boot_order,
                chain: Vec::new(),
            })
            .collect(),
        interfaces: d
            .interfaces
            .iter()
            .map(|nic| ObservedNic {
                network: Some(nic.network.clone()),
                model: Some(nic.model.clone()),
                mac: macs
                    .get(nic.name.as_str())
                    .map(|m| m.to_ascii_lowercase())
                    .or_else(|| nic.mac.clone()),
                alias: Some(nic.name.clone()),
            })
            .collect(),
        host_devices: d
            .host_devices
            .iter()
            .map(|dev| super::observed::ObservedHostDevice {
                address: dev.address.clone(),
                managed: dev.managed,
                alias: Some(dev.name.clone()),
            })
            .collect(),
        autostart: status.autostart.unwrap_or(d.autostart),
        persistent: true,
        // What the status does not report is taken as the spec asks: the plan of a cluster
        // shows what the agents would do from what they reported, not guesses.
        cpu_tune: d.cpu_tune,
        security_labels: Vec::new(),
        pending_unplug: Vec::new(),
        start_owed: false,
    }
}

/// The observed view of a network the agents report on a node.
pub fn network_observed(
    n: &DesiredNetwork,
    bridge: Option<String>,
    active: bool,
    autostart: bool,
) -> ObservedNetwork {
    ObservedNetwork {
        owner: Some(n.owner.clone()),
        mode: n.mode.clone(),
        bridge: bridge.or_else(|| n.bridge.clone()),
        ip: n.ip.clone(),
        dhcp: n.dhcp.iter().map(|(s, e)| format!("{s}-{e}")).collect(),
        dhcp_hosts: n.dhcp_hosts.clone(),
        dns_hosts: n.dns_hosts.clone(),
        active,
        autostart,
    }
}

/// The observed view of a pool the agents report on a node.
pub fn pool_observed(p: &DesiredPool, active: bool, autostart: bool) -> ObservedPool {
    ObservedPool {
        owner: Some(p.owner.clone()),
        pool_type: p.pool_type.clone(),
        target_path: p.target_path.clone(),
        source: p.source.clone(),
        active,
        autostart,
        capacity: 0,
        available: 0,
    }
}

struct Notes(Vec<Notice>);

impl Notes {
    fn add(&mut self, kind: ObjectKind, name: &str, display: &str, node: &str, message: String) {
        self.0.push(Notice {
            kind: NoticeKind::Note,
            object: ObjectRef::new(kind, name, display),
            node: node.to_string(),
            message,
            changes: Vec::new(),
            users: Vec::new(),
        });
    }

    /// Says when an object's status describes an older generation than its spec, or when it
    /// is not Ready (its agent's reason, which the plan's reader should see).
    fn freshness(
        &mut self,
        object: (ObjectKind, &str, &str),
        generation: Option<i64>,
        observed: Option<i64>,
        conds: &[Condition],
    ) {
        let (kind, name, display) = object;
        // Pools and networks record the generation per condition (each node writes its own
        // entry), Domains and Volumes in status too.
        let observed =
            observed.or_else(|| condition(conds, conditions::READY)?.observed_generation);
        match (generation, observed) {
            (Some(g), Some(o)) if o < g => self.add(
                kind,
                name,
                display,
                "",
                format!(
                    "its status describes generation {o}, its spec is generation {g}: the agent has not reported the last change yet, so this plan compares with an older state"
                ),
            ),
            (Some(_), None) => self.add(
                kind,
                name,
                display,
                "",
                "no agent has reported its status yet: the plan assumes nothing of it exists".into(),
            ),
            _ => {}
        }
        if let Some(c) = condition(conds, conditions::READY)
            && c.status != conditions::status::TRUE
        {
            self.add(
                kind,
                name,
                display,
                "",
                format!("not Ready now ({}): {}", c.reason, c.message),
            );
        }
    }
}

/// Builds the observed model of `cluster`, and the notes a reviewer needs beside it.
pub fn observe(cluster: &ClusterState) -> Reported {
    let mut notes = Notes(Vec::new());
    let mut node_notes = Vec::new();
    let mut state = ObservedState::default();
    for node in &cluster.nodes {
        let name = node.name_any();
        let status = node.status.clone().unwrap_or_default();
        state.hosts.insert(
            name.clone(),
            ObservedHost {
                host_cpus: status.cpu.as_ref().map(|c| c.count),
                online_cpus: node_cpus(node),
                ..ObservedHost::default()
            },
        );
        match condition(&status.conditions, conditions::READY) {
            Some(c) if c.status == conditions::status::TRUE => {}
            Some(c) => node_notes.push(format!(
                "HypervisorNode {name} is not Ready ({}): {}; what it reports may be out of date",
                c.reason, c.message
            )),
            None => node_notes.push(format!(
                "HypervisorNode {name} has no Ready condition: its agent has not reported yet"
            )),
        }
    }
    let (stored, _) = DesiredState::from_manifests(&cluster.as_manifests(), &cluster.all_nodes());
    let mut host = |state: &mut ObservedState, node: &str| {
        if !state.hosts.contains_key(node) {
            node_notes.push(format!(
                "objects report node {node}, which has no HypervisorNode: its agent is gone or has not started"
            ));
        }
        state.hosts.entry(node.to_string()).or_default();
    };

    for pool in &cluster.pools {
        let name = pool.name_any();
        let Some(p) = stored.pools.iter().find(|p| p.name == name) else {
            continue;
        };
        let status = pool.status.clone().unwrap_or_default();
        notes.freshness(
            (ObjectKind::StoragePool, &name, &name),
            pool.metadata.generation,
            status.observed_generation,
            &status.conditions,
        );
        for entry in &status.nodes {
            if matches!(entry.state.as_str(), "Absent" | "Failed") {
                continue;
            }
            host(&mut state, &entry.node_name);
            let mut observed = pool_observed(
                p,
                entry.state == "Running",
                entry.autostart.unwrap_or(false),
            );
            observed.capacity = entry
                .capacity
                .as_ref()
                .and_then(|q| q.bytes().ok())
                .unwrap_or(0);
            observed.available = entry
                .available
                .as_ref()
                .and_then(|q| q.bytes().ok())
                .unwrap_or(0);
            state
                .host_mut(&entry.node_name)
                .pools
                .insert(name.clone(), observed);
        }
    }

    for net in &cluster.networks {
        let name = net.name_any();
        let Some(n) = stored.networks.iter().find(|n| n.name == name) else {
            continue;
        };
        let status = net.status.clone().unwrap_or_default();
        notes.freshness(
            (ObjectKind::Network, &name, &name),
            net.metadata.generation,
            status.observed_generation,
            &status.conditions,
        );
        for entry in &status.nodes {
            // The agent reports autostart only for a network that exists on its node.
            let Some(autostart) = entry.autostart else {
                continue;
            };
            host(&mut state, &entry.node_name);
            state.host_mut(&entry.node_name).networks.insert(
                name.clone(),
                network_observed(n, entry.bridge.clone(), entry.active, autostart),
            );
        }
    }

    // Volumes first (domains' disks and backing stores refer to their paths).
    let mut volume_paths: BTreeMap<String, (String, String)> = BTreeMap::new();
    for vol in &cluster.volumes {
        let ns = vol.namespace().unwrap_or_else(|| "default".into());
        let short = vol.name_any();
        let name = host_name(Some(&ns), &short);
        let display = format!("{ns}/{short}");
        let status = vol.status.clone().unwrap_or_default();
        notes.freshness(
            (ObjectKind::Volume, &name, &display),
            vol.metadata.generation,
            status.observed_generation,
            &status.conditions,
        );
        let exists = matches!(
            status.phase,
            Some(VolumePhase::Available | VolumePhase::Released)
        );
        let (Some(node), true) = (status.node_name.clone(), exists) else {
            continue;
        };
        let Some(v) = stored.volumes.iter().find(|v| v.name == name) else {
            continue;
        };
        host(&mut state, &node);
        let path = status
            .path
            .clone()
            .unwrap_or_else(|| format!("(path not reported: {}/{})", v.pool, v.name));
        volume_paths.insert(name.clone(), (node.clone(), path.clone()));
        state.host_mut(&node).volumes.insert(
            (v.pool.clone(), name.clone()),
            ObservedVolume {
                owned: true,
                key: status.key.clone().unwrap_or_default(),
                path,
                capacity: status
                    .capacity
                    .as_ref()
                    .and_then(|q| q.bytes().ok())
                    .or(v.capacity)
                    .unwrap_or(0),
                allocation: status
                    .allocation
                    .as_ref()
                    .and_then(|q| q.bytes().ok())
                    .unwrap_or(0),
                format: Some(v.format.clone()),
                backing_path: None,
            },
        );
    }
    // Copy-on-write ancestry, from the stored spec (status does not carry it).
    for v in &stored.volumes {
        if let super::desired::VolumeOrigin::Backing(src) = &v.source
            && let (Some((node, _)), Some((_, src_path))) =
                (volume_paths.get(&v.name), volume_paths.get(src))
            && let Some(o) = state
                .hosts
                .get_mut(node)
                .and_then(|h| h.volumes.get_mut(&(v.pool.clone(), v.name.clone())))
        {
            o.backing_path = Some(src_path.clone());
        }
    }

    for dom in &cluster.domains {
        let ns = dom.namespace().unwrap_or_else(|| "default".into());
        let short = dom.name_any();
        let name = host_name(Some(&ns), &short);
        let display = format!("{ns}/{short}");
        let status = dom.status.clone().unwrap_or_default();
        notes.freshness(
            (ObjectKind::Domain, &name, &display),
            dom.metadata.generation,
            status.observed_generation,
            &status.conditions,
        );
        if let Some(m) = &status.migration
            && matches!(
                m.state,
                Some(MigrationState::Pending | MigrationState::Running)
            )
        {
            let progress = m
                .progress
                .as_ref()
                .and_then(|p| p.percent)
                .map(|p| format!(", {p}% done"))
                .unwrap_or_default();
            notes.add(
                ObjectKind::Domain,
                &name,
                &display,
                status.node_name.as_deref().unwrap_or(""),
                format!(
                    "a move from {} to {} is under way ({:?}{progress}): the plan compares with the source until it completes",
                    m.source_node.as_deref().unwrap_or("?"),
                    m.target_node.as_deref().unwrap_or("?"),
                    m.state.unwrap_or(MigrationState::Pending)
                ),
            );
        }
        let (Some(node), Some(power)) = (status.node_name.clone(), domain_power(&status)) else {
            continue;
        };
        let Some(d) = stored.domains.iter().find(|d| d.name == name) else {
            continue;
        };
        host(&mut state, &node);
        let mut observed = domain_observed(d, &status, power);
        for disk in &mut observed.disks {
            if let DiskRef::Volume { pool, volume } = &mut disk.source
                && pool.is_empty()
                && let Some(v) = stored.volumes.iter().find(|v| &v.name == volume)
            {
                *pool = v.pool.clone();
            }
        }
        state.host_mut(&node).domains.insert(name, observed);
    }
    Reported {
        state,
        notes: notes.0,
        node_notes,
    }
}
