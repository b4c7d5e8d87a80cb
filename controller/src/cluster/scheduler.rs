//! The scheduler: which nodes can take a domain, which one is best, and, when none can, why
//! each was refused (in the words `kubectl describe pod` uses). Pure.
//!
//! **Filters** (a node is a candidate only when it passes every one):
//! 1. its HypervisorNode is `Ready`, its heartbeat fresh, and it is not fenced;
//! 2. its Kubernetes Node (same name, when there is one) is not cordoned, and carries no
//!    `NoSchedule`/`NoExecute` taint the domain does not tolerate (`virtkube.io/drain` is
//!    never tolerated);
//! 3. `spec.nodeSelector` matches the HypervisorNode's labels;
//! 4. every Network of its interfaces is active there, every pool of its volumes runs
//!    there, and every volume of a node-local pool that is tied to a node is tied to this
//!    one;
//! 5. memory: what the domains held by or moving to the node reserve (`memory.max`, else
//!    `memory.size`), plus this domain's, fits in the node's total memory minus the reserve;
//! 6. pinned vCPUs: every host CPU named by `cpu.pinning` exists there and is not pinned by
//!    another domain on the node; `cpu.maxVcpus` is within the node's maximum;
//! 7. host devices: the HypervisorNode lists every PCI address of `hostDevices`, and no
//!    other domain held by or moving to the node has one of them.
//!
//! **Score**: among candidates, the fewest untolerated `PreferNoSchedule` taints, then the
//! most memory left after placing the domain, then the node name (so equal nodes fill in a
//! stable order).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use kube::ResourceExt;
use virtkube_crds::Domain;
use virtkube_crds::domain::{TaintEffect, Toleration, TolerationOperator};

use super::settings::Settings;
use super::usage::{Usage, domain_key, host_device_addresses, memory_need, pinned_cpus};
use super::view::{Cluster, DRAIN_TAINT, NodeTaint, NodeView};

/// What a domain asks of a node, read once from its spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Demand {
    /// `namespace/name`.
    pub key: String,
    /// Memory reserved, bytes.
    pub memory: u64,
    /// Host CPUs its vCPU pinning names.
    pub cpus: BTreeSet<u32>,
    /// `cpu.maxVcpus` (or `vcpus`).
    pub max_vcpus: u32,
    /// `spec.nodeSelector`.
    pub selector: BTreeMap<String, String>,
    /// `spec.tolerations`.
    pub tolerations: Vec<Toleration>,
    /// Networks of its interfaces.
    pub networks: BTreeSet<String>,
    /// Pools of its volume disks.
    pub pools: BTreeSet<String>,
    /// Volumes of node-local pools already tied to a node: (volume, node).
    pub volume_nodes: Vec<(String, String)>,
    /// PCI addresses of its host devices.
    pub host_devices: BTreeSet<String>,
}

/// Something wrong with the domain itself, whatever the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// A disk names a Volume that does not exist.
    VolumeMissing(String),
    /// A volume's pool does not exist.
    PoolMissing {
        /// The volume.
        volume: String,
        /// Its pool.
        pool: String,
    },
    /// An interface names a Network that does not exist.
    NetworkMissing(String),
    /// The spec cannot be read (a size or cpuset that does not parse).
    Spec(String),
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::VolumeMissing(v) => write!(f, "volume {v} does not exist"),
            Problem::PoolMissing { volume, pool } => {
                write!(f, "pool {pool} of volume {volume} does not exist")
            }
            Problem::NetworkMissing(n) => write!(f, "network {n} does not exist"),
            Problem::Spec(why) => f.write_str(why),
        }
    }
}

impl Problem {
    /// A stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Problem::VolumeMissing(_) => "volume_missing",
            Problem::PoolMissing { .. } => "pool_missing",
            Problem::NetworkMissing(_) => "network_missing",
            Problem::Spec(_) => "invalid_spec",
        }
    }
}

/// What a domain needs, or what makes it unplaceable anywhere.
pub fn demand(dom: &Domain, cluster: &Cluster) -> Result<Demand, Vec<Problem>> {
    let namespace = dom.namespace().unwrap_or_default();
    let mut problems = Vec::new();
    let memory = memory_need(&dom.spec).unwrap_or_else(|e| {
        problems.push(Problem::Spec(e));
        0
    });
    let cpus = pinned_cpus(&dom.spec).unwrap_or_else(|e| {
        problems.push(Problem::Spec(e));
        BTreeSet::new()
    });
    let mut networks = BTreeSet::new();
    for iface in &dom.spec.interfaces {
        if !cluster.networks.contains_key(&iface.network) {
            problems.push(Problem::NetworkMissing(iface.network.clone()));
        }
        networks.insert(iface.network.clone());
    }
    let mut pools = BTreeSet::new();
    let mut volume_nodes = Vec::new();
    for name in dom.spec.disks.iter().filter_map(|d| d.volume.as_ref()) {
        let Some(vol) = cluster.volumes.get(&(namespace.clone(), name.clone())) else {
            problems.push(Problem::VolumeMissing(name.clone()));
            continue;
        };
        if !cluster.pools.contains_key(&vol.pool) {
            problems.push(Problem::PoolMissing {
                volume: name.clone(),
                pool: vol.pool.clone(),
            });
        }
        pools.insert(vol.pool.clone());
        if let Some(node) = cluster.volume_node(&namespace, name) {
            volume_nodes.push((name.clone(), node));
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Demand {
        key: domain_key(dom),
        memory,
        cpus,
        max_vcpus: dom.spec.cpu.effective_max_vcpus(),
        selector: dom.spec.node_selector.clone(),
        tolerations: dom.spec.tolerations.clone(),
        networks,
        pools,
        volume_nodes,
        host_devices: host_device_addresses(&dom.spec),
    })
}

/// Why one node cannot take a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The HypervisorNode's `Ready` is not `True`.
    NotReady {
        /// The condition's status and reason, as written.
        why: String,
    },
    /// The agent's heartbeat is older than the grace period.
    HeartbeatStale,
    /// Declared fenced by an administrator.
    Fenced,
    /// The Kubernetes Node is cordoned.
    Cordoned,
    /// The Kubernetes Node carries the drain taint.
    Draining,
    /// A `NoSchedule`/`NoExecute` taint the domain does not tolerate.
    Taint(NodeTaint),
    /// `spec.nodeSelector` asks for a label value the node lacks.
    Selector {
        /// The label key.
        key: String,
        /// The value asked for.
        want: String,
    },
    /// A Network of the domain is not active there.
    NetworkInactive(String),
    /// A pool of the domain's volumes does not run there.
    PoolNotRunning(String),
    /// A volume of a node-local pool is tied to another node.
    VolumeElsewhere {
        /// The volume.
        volume: String,
        /// Where it is.
        node: String,
    },
    /// Not enough memory left.
    Memory {
        /// What the domain reserves.
        need: u64,
        /// What is left after the reserve and the domains there.
        left: u64,
    },
    /// The agent has not published the node's memory.
    MemoryUnknown,
    /// A pinned host CPU does not exist there.
    CpuMissing {
        /// The CPU.
        cpu: u32,
        /// How many CPUs the node has.
        count: u32,
    },
    /// A pinned host CPU is pinned by another domain there.
    CpuTaken {
        /// The CPU.
        cpu: u32,
        /// The domain holding it (`namespace/name`).
        by: String,
    },
    /// The HypervisorNode does not list a PCI device of `hostDevices`.
    HostDeviceMissing(String),
    /// A PCI device of `hostDevices` is another domain's there.
    HostDeviceTaken {
        /// Its address.
        address: String,
        /// The domain that has it (`namespace/name`).
        by: String,
    },
    /// More vCPUs than a guest may have there.
    TooManyVcpus {
        /// What the domain has at most.
        need: u32,
        /// What the node allows.
        max: u32,
    },
    /// The node the domain is leaving (a drain).
    Leaving,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NotReady { why } => write!(f, "not Ready ({why})"),
            Refusal::HeartbeatStale => f.write_str("heartbeat stale"),
            Refusal::Fenced => f.write_str("fenced"),
            Refusal::Cordoned => f.write_str("cordoned"),
            Refusal::Draining => write!(f, "draining ({DRAIN_TAINT})"),
            Refusal::Taint(t) => match &t.value {
                Some(v) => write!(f, "taint {}={v}:{} not tolerated", t.key, t.effect),
                None => write!(f, "taint {}:{} not tolerated", t.key, t.effect),
            },
            Refusal::Selector { key, want } => {
                write!(f, "node selector {key}={want} not matched")
            }
            Refusal::NetworkInactive(n) => write!(f, "network {n} not active"),
            Refusal::PoolNotRunning(p) => write!(f, "pool {p} not running"),
            Refusal::VolumeElsewhere { volume, node } => {
                write!(f, "volume {volume} is on node {node}")
            }
            Refusal::Memory { need, left } => write!(
                f,
                "insufficient memory (needs {}, {} left)",
                human_bytes(*need),
                human_bytes(*left)
            ),
            Refusal::MemoryUnknown => f.write_str("memory not reported yet"),
            Refusal::CpuMissing { cpu, count } => {
                write!(f, "pinned CPU {cpu} missing ({count} CPUs)")
            }
            Refusal::CpuTaken { cpu, by } => write!(f, "pinned CPU {cpu} taken by {by}"),
            Refusal::HostDeviceMissing(address) => write!(f, "no PCI device {address}"),
            Refusal::HostDeviceTaken { address, by } => {
                write!(f, "PCI device {address} taken by {by}")
            }
            Refusal::TooManyVcpus { need, max } => {
                write!(f, "too many vCPUs (needs {need}, at most {max})")
            }
            Refusal::Leaving => f.write_str("the node it leaves"),
        }
    }
}

impl Refusal {
    /// A stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Refusal::NotReady { .. } => "not_ready",
            Refusal::HeartbeatStale => "heartbeat_stale",
            Refusal::Fenced => "fenced",
            Refusal::Cordoned => "cordoned",
            Refusal::Draining => "draining",
            Refusal::Taint(_) => "taint",
            Refusal::Selector { .. } => "node_selector",
            Refusal::NetworkInactive(_) => "network_inactive",
            Refusal::PoolNotRunning(_) => "pool_not_running",
            Refusal::VolumeElsewhere { .. } => "volume_elsewhere",
            Refusal::Memory { .. } => "insufficient_memory",
            Refusal::MemoryUnknown => "memory_unknown",
            Refusal::CpuMissing { .. } => "cpu_missing",
            Refusal::CpuTaken { .. } => "cpu_taken",
            Refusal::HostDeviceMissing(_) => "host_device_missing",
            Refusal::HostDeviceTaken { .. } => "host_device_taken",
            Refusal::TooManyVcpus { .. } => "too_many_vcpus",
            Refusal::Leaving => "leaving",
        }
    }
}

/// Whether the node can run anything at all: Ready, heartbeat fresh, not fenced. Empty
/// when it can.
pub fn availability(node: &NodeView) -> Vec<Refusal> {
    if node.fenced() {
        return vec![Refusal::Fenced];
    }
    if !node.fresh {
        return vec![Refusal::HeartbeatStale];
    }
    if !node.ready() {
        let why = node
            .ready
            .as_ref()
            .map(|(s, r)| format!("{s}, {r}"))
            .unwrap_or_else(|| "no condition yet".into());
        return vec![Refusal::NotReady { why }];
    }
    Vec::new()
}

/// Why `node` cannot take the domain (empty: it can). `check_selector` is false for a node
/// the user named (`spec.nodeName` ignores the selector). An unavailable node is refused
/// for that alone.
pub fn refusals(
    node: &NodeView,
    demand: &Demand,
    cluster: &Cluster,
    usage: &Usage,
    settings: &Settings,
    check_selector: bool,
) -> Vec<Refusal> {
    let mut out = availability(node);
    if !out.is_empty() {
        return out;
    }
    if node.cordoned {
        out.push(Refusal::Cordoned);
    }
    for taint in &node.taints {
        if taint.key == DRAIN_TAINT {
            out.push(Refusal::Draining);
        } else if matches!(taint.effect.as_str(), "NoSchedule" | "NoExecute")
            && !tolerated(&demand.tolerations, taint)
        {
            out.push(Refusal::Taint(taint.clone()));
        }
    }
    if check_selector {
        for (key, want) in &demand.selector {
            if node.labels.get(key) != Some(want) {
                out.push(Refusal::Selector {
                    key: key.clone(),
                    want: want.clone(),
                });
            }
        }
    }
    for net in &demand.networks {
        if !cluster
            .networks
            .get(net)
            .is_some_and(|n| n.active_on.contains(&node.name))
        {
            out.push(Refusal::NetworkInactive(net.clone()));
        }
    }
    for pool in &demand.pools {
        if !cluster
            .pools
            .get(pool)
            .is_some_and(|p| p.running_on.contains(&node.name))
        {
            out.push(Refusal::PoolNotRunning(pool.clone()));
        }
    }
    for (volume, on) in &demand.volume_nodes {
        if *on != node.name {
            out.push(Refusal::VolumeElsewhere {
                volume: volume.clone(),
                node: on.clone(),
            });
        }
    }
    match memory_left(node, demand, usage, settings) {
        None => out.push(Refusal::MemoryUnknown),
        Some(left) if demand.memory > left => out.push(Refusal::Memory {
            need: demand.memory,
            left,
        }),
        Some(_) => {}
    }
    if let Some(count) = node.cpus {
        for &cpu in &demand.cpus {
            if cpu >= count {
                out.push(Refusal::CpuMissing { cpu, count });
            } else if let Some(by) = usage.cpu_taken(&node.name, cpu, &demand.key) {
                out.push(Refusal::CpuTaken {
                    cpu,
                    by: by.to_string(),
                });
            }
        }
    }
    for address in &demand.host_devices {
        if !node.pci_devices.contains(address) {
            out.push(Refusal::HostDeviceMissing(address.clone()));
        } else if let Some(by) = usage.host_device_taken(&node.name, address, &demand.key) {
            out.push(Refusal::HostDeviceTaken {
                address: address.clone(),
                by: by.to_string(),
            });
        }
    }
    if let Some(max) = node.max_vcpus
        && demand.max_vcpus > max
    {
        out.push(Refusal::TooManyVcpus {
            need: demand.max_vcpus,
            max,
        });
    }
    out
}

/// Memory left on `node` for this domain: total − reserve − the other domains there.
fn memory_left(
    node: &NodeView,
    demand: &Demand,
    usage: &Usage,
    settings: &Settings,
) -> Option<u64> {
    let total = node.memory_total?;
    Some(
        total
            .saturating_sub(settings.memory_reserve)
            .saturating_sub(usage.memory_used(&node.name, &demand.key)),
    )
}

/// Whether `tolerations` tolerate `taint`, as Kubernetes matches them.
pub fn tolerated(tolerations: &[Toleration], taint: &NodeTaint) -> bool {
    if taint.key == DRAIN_TAINT {
        return false;
    }
    tolerations.iter().any(|t| {
        let effect = t.effect.is_none_or(|e| effect_name(e) == taint.effect);
        let key = match t.operator {
            TolerationOperator::Exists => t.key.as_deref().is_none_or(|k| k == taint.key),
            TolerationOperator::Equal => {
                t.key.as_deref() == Some(taint.key.as_str())
                    && t.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or("")
            }
        };
        effect && key
    })
}

fn effect_name(effect: TaintEffect) -> &'static str {
    match effect {
        TaintEffect::NoSchedule => "NoSchedule",
        TaintEffect::PreferNoSchedule => "PreferNoSchedule",
        TaintEffect::NoExecute => "NoExecute",
    }
}

/// The node chosen for a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// The node.
    pub node: String,
    /// Memory left there once the domain is placed, bytes.
    pub free_after: u64,
}

/// Why no node can take a domain.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Refused {
    /// How many nodes there are.
    pub total: usize,
    /// What is wrong with the domain itself (then no node is looked at).
    pub problems: Vec<Problem>,
    /// Each node and why it was refused, by name.
    pub nodes: Vec<(String, Vec<Refusal>)>,
}

/// Nodes named one by one in a message; the rest are summed up by reason.
const NODES_NAMED: usize = 16;

impl Refused {
    /// The domain's own problems as a refusal.
    pub fn problems(total: usize, problems: Vec<Problem>) -> Refused {
        Refused {
            total,
            problems,
            nodes: Vec::new(),
        }
    }

    /// The message of the `Scheduled=False` condition, as `kubectl describe pod` words it:
    /// `0/3 nodes are available: node-a: insufficient memory (needs 2Gi, 1Gi left); node-b:
    /// cordoned`.
    pub fn message(&self) -> String {
        let head = format!("0/{} nodes are available", self.total);
        if !self.problems.is_empty() {
            let what: Vec<String> = self.problems.iter().map(ToString::to_string).collect();
            return format!("{head}: {}", what.join("; "));
        }
        if self.total == 0 {
            return format!("{head}: no HypervisorNode exists yet (no node agent has registered)");
        }
        let mut parts: Vec<String> = self
            .nodes
            .iter()
            .take(NODES_NAMED)
            .map(|(node, why)| {
                let why: Vec<String> = why.iter().map(ToString::to_string).collect();
                format!("{node}: {}", why.join(", "))
            })
            .collect();
        let rest = &self.nodes[self.nodes.len().min(NODES_NAMED)..];
        if !rest.is_empty() {
            let mut by_reason: BTreeMap<&'static str, usize> = BTreeMap::new();
            for (_, why) in rest {
                for r in why {
                    *by_reason.entry(r.metric_label()).or_default() += 1;
                }
            }
            let summary: Vec<String> = by_reason
                .iter()
                .map(|(label, n)| format!("{n} {}", label.replace('_', " ")))
                .collect();
            parts.push(format!(
                "and {} more nodes ({})",
                rest.len(),
                summary.join(", ")
            ));
        }
        format!("{head}: {}", parts.join("; "))
    }

    /// The distinct reasons, as metric labels.
    pub fn reasons(&self) -> BTreeSet<&'static str> {
        if !self.problems.is_empty() {
            return self.problems.iter().map(Problem::metric_label).collect();
        }
        if self.total == 0 {
            return BTreeSet::from(["no_nodes"]);
        }
        self.nodes
            .iter()
            .flat_map(|(_, why)| why.iter().map(Refusal::metric_label))
            .collect()
    }
}

/// The best node for `demand`, other than `leaving` (the node a drain moves it off).
pub fn choose(
    demand: &Demand,
    cluster: &Cluster,
    usage: &Usage,
    settings: &Settings,
    leaving: Option<&str>,
) -> Result<Choice, Refused> {
    let mut candidates = Vec::new();
    let mut refused = Vec::new();
    for node in cluster.nodes.values() {
        if leaving == Some(node.name.as_str()) {
            refused.push((node.name.clone(), vec![Refusal::Leaving]));
            continue;
        }
        let why = refusals(node, demand, cluster, usage, settings, true);
        if !why.is_empty() {
            refused.push((node.name.clone(), why));
            continue;
        }
        let avoided = node
            .taints
            .iter()
            .filter(|t| t.effect == "PreferNoSchedule" && !tolerated(&demand.tolerations, t))
            .count();
        let free_after = memory_left(node, demand, usage, settings)
            .unwrap_or(0)
            .saturating_sub(demand.memory);
        candidates.push((avoided, std::cmp::Reverse(free_after), node.name.clone()));
    }
    candidates.sort();
    match candidates.into_iter().next() {
        Some((_, std::cmp::Reverse(free_after), node)) => Ok(Choice { node, free_after }),
        None => Err(Refused {
            total: cluster.nodes.len(),
            problems: Vec::new(),
            nodes: refused,
        }),
    }
}

/// Why a domain cannot move now because of its host devices: it runs (a move would be a
/// live migration) with PCI devices passed through, which libvirt refuses to migrate. A
/// stopped domain moves cold, to a node that has the devices.
pub fn live_move_blocked_by_host_devices(dom: &Domain) -> Option<super::moves::MoveWait> {
    let live =
        super::moves::mode_of(dom.status.as_ref()) == virtkube_crds::domain::MigrationMode::Live;
    (live && !dom.spec.host_devices.is_empty()).then(|| {
        super::moves::MoveWait::HostDevices(
            dom.spec
                .host_devices
                .iter()
                .map(|h| h.name.clone())
                .collect(),
        )
    })
}

/// A byte count in binary units, as users write them (`2Gi`, `1.5Gi`, `512Mi`).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [(&str, u64); 5] = [
        ("Ti", 1 << 40),
        ("Gi", 1 << 30),
        ("Mi", 1 << 20),
        ("Ki", 1 << 10),
        ("", 1),
    ];
    for (suffix, unit) in UNITS {
        if bytes >= unit && unit > 1 {
            return if bytes.is_multiple_of(unit) {
                format!("{}{suffix}", bytes / unit)
            } else {
                // One decimal is enough to tell sizes apart in a message.
                #[allow(clippy::cast_precision_loss)]
                let value = bytes as f64 / unit as f64;
                format!("{value:.1}{suffix}")
            };
        }
    }
    format!("{bytes}")
}
