//! The cluster as one read: every fact the controller's decisions use, taken out of the
//! objects once per pass (HypervisorNodes, Kubernetes Nodes, Networks, StoragePools and
//! Volumes). Pure: built from slices of objects and the time of the pass.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use virtkube_crds::conditions::{self, READY};
use virtkube_crds::volume::VolumeTransfer;
use virtkube_crds::{Domain, HypervisorNode, Network, StoragePool, Volume};

use super::settings::Settings;

/// The annotation an administrator sets on a HypervisorNode (value `"true"`) to declare the
/// node fenced: powered off or cut off, every guest on it dead, and its libvirt state not
/// coming back. Only then does the controller give its domains to other nodes.
pub const FENCED_ANNOTATION: &str = "virtkube.io/fenced";

/// The taint (on the Kubernetes Node, any effect) that drains a node. No toleration matches
/// it.
pub const DRAIN_TAINT: &str = "virtkube.io/drain";

/// A taint of a Kubernetes Node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeTaint {
    /// The key.
    pub key: String,
    /// The value, if any.
    pub value: Option<String>,
    /// `NoSchedule`, `PreferNoSchedule` or `NoExecute`.
    pub effect: String,
}

/// One hypervisor node as the decisions see it: its HypervisorNode and the Kubernetes Node
/// of the same name (when there is one: agents run as local processes in some setups, and
/// a missing Node is neither cordoned nor tainted).
#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    /// The node's name.
    pub name: String,
    /// The HypervisorNode's labels (what `spec.nodeSelector` matches).
    pub labels: BTreeMap<String, String>,
    /// The `Ready` condition's status as last written (`True`, `False`, `Unknown`), and its
    /// reason.
    pub ready: Option<(String, String)>,
    /// The last heartbeat (or, before the first, when the object was created).
    pub heartbeat: Option<Timestamp>,
    /// Whether the heartbeat is within the grace period.
    pub fresh: bool,
    /// Whether an administrator set [`FENCED_ANNOTATION`] to `"true"`.
    pub fenced_annotation: bool,
    /// The Kubernetes Node's `spec.unschedulable` (`kubectl cordon`, `kubectl drain`).
    pub cordoned: bool,
    /// The Kubernetes Node's taints.
    pub taints: Vec<NodeTaint>,
    /// Total memory, bytes.
    pub memory_total: Option<u64>,
    /// Logical CPUs.
    pub cpus: Option<u32>,
    /// The most vCPUs one guest can have there.
    pub max_vcpus: Option<u32>,
    /// The addresses of the PCI devices its HypervisorNode lists (`status.host.pciDevices`,
    /// lower case).
    pub pci_devices: BTreeSet<String>,
}

impl NodeView {
    /// Whether the agent says the node is Ready (and the controller has not marked it
    /// stale since).
    pub fn ready(&self) -> bool {
        self.ready
            .as_ref()
            .is_some_and(|(s, _)| s == conditions::status::TRUE)
    }

    /// Whether the node counts as fenced: the annotation is set *and* its agent is silent.
    /// A node that still beats contradicts the annotation, and its guests may well run:
    /// it is not treated as fenced (the controller warns instead).
    pub fn fenced(&self) -> bool {
        self.fenced_annotation && !self.fresh
    }

    /// Whether domains can be placed or started there at all: Ready, fresh, not fenced.
    pub fn available(&self) -> bool {
        self.ready() && self.fresh && !self.fenced()
    }

    /// Whether the node is being drained: cordoned, or carrying the drain taint.
    pub fn draining(&self) -> bool {
        self.cordoned || self.taints.iter().any(|t| t.key == DRAIN_TAINT)
    }
}

/// A StoragePool: shared or not, and the nodes where it runs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PoolView {
    /// `spec.shared`: every node sees the same storage. Never for a `disk` pool: which
    /// partition is a Volume's is recorded by its holder's agent as that node names it
    /// (`/dev/sdb2`), so its Volumes stay on their node whatever `shared` says.
    pub shared: bool,
    /// A `disk` pool: its Volumes are partitions, which no move can take along.
    pub partitions: bool,
    /// Nodes whose `status.nodes[]` entry says `running`.
    pub running_on: BTreeSet<String>,
}

/// A Network: the nodes where it is active.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NetworkView {
    /// Nodes whose `status.nodes[]` entry says `active`.
    pub active_on: BTreeSet<String>,
}

/// A Volume, as placement needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeView {
    /// Its pool.
    pub pool: String,
    /// `spec.nodeName`.
    pub requested: Option<String>,
    /// `status.nodeName`: the node that creates, grows and deletes it.
    pub holder: Option<String>,
    /// The volume it is cloned from or layered on, if any.
    pub source: Option<String>,
    /// Whether it is a copy-on-write overlay on `source` (rather than a full clone).
    pub overlay: bool,
    /// Its handover to another node, while one is under way.
    pub transfer: Option<VolumeTransfer>,
    /// The Domains (of its namespace) whose disks name it.
    pub users: Vec<String>,
    /// The Volumes (of its namespace) cloned from it or layered on it.
    pub derived: Vec<String>,
}

/// Everything placement needs to know that is not a Domain.
#[derive(Debug, Clone, Default)]
pub struct Cluster {
    /// Nodes by name (one per HypervisorNode).
    pub nodes: BTreeMap<String, NodeView>,
    /// Pools by name.
    pub pools: BTreeMap<String, PoolView>,
    /// Networks by name.
    pub networks: BTreeMap<String, NetworkView>,
    /// Volumes by (namespace, name).
    pub volumes: BTreeMap<(String, String), VolumeView>,
}

impl Cluster {
    /// The view of the given objects at `now`.
    pub fn build<'a>(
        hypervisors: impl IntoIterator<Item = &'a HypervisorNode>,
        nodes: impl IntoIterator<Item = &'a Node>,
        networks: impl IntoIterator<Item = &'a Network>,
        pools: impl IntoIterator<Item = &'a StoragePool>,
        volumes: impl IntoIterator<Item = &'a Volume>,
        settings: &Settings,
        now: Timestamp,
    ) -> Cluster {
        let k8s: BTreeMap<String, &Node> = nodes.into_iter().map(|n| (n.name_any(), n)).collect();
        let nodes = hypervisors
            .into_iter()
            .map(|h| {
                let view = node_view(h, k8s.get(&h.name_any()).copied(), settings, now);
                (view.name.clone(), view)
            })
            .collect();
        let pools = pools
            .into_iter()
            .map(|p| {
                let running_on = p
                    .status
                    .iter()
                    .flat_map(|s| &s.nodes)
                    .filter(|n| pool_running(&n.state))
                    .map(|n| n.node_name.clone())
                    .collect();
                (
                    p.name_any(),
                    PoolView {
                        shared: p.spec.shared && !partitioned(p),
                        partitions: partitioned(p),
                        running_on,
                    },
                )
            })
            .collect();
        let networks = networks
            .into_iter()
            .map(|n| {
                let active_on = n
                    .status
                    .iter()
                    .flat_map(|s| &s.nodes)
                    .filter(|e| e.active)
                    .map(|e| e.node_name.clone())
                    .collect();
                (n.name_any(), NetworkView { active_on })
            })
            .collect();
        let volumes = volumes
            .into_iter()
            .map(|v| {
                (
                    (v.namespace().unwrap_or_default(), v.name_any()),
                    VolumeView {
                        pool: v.spec.pool.clone(),
                        requested: v.spec.node_name.clone(),
                        holder: v.status.as_ref().and_then(|s| s.node_name.clone()),
                        source: v
                            .spec
                            .source
                            .as_ref()
                            .and_then(|s| s.referenced_volume())
                            .map(str::to_string),
                        overlay: v
                            .spec
                            .source
                            .as_ref()
                            .is_some_and(|s| s.backing_volume.is_some()),
                        transfer: v.status.as_ref().and_then(|s| s.transfer.clone()),
                        users: Vec::new(),
                        derived: Vec::new(),
                    },
                )
            })
            .collect::<BTreeMap<_, _>>();
        let mut volumes = volumes;
        let derived: Vec<((String, String), String)> = volumes
            .iter()
            .filter_map(|((ns, name), v)| Some(((ns.clone(), v.source.clone()?), name.clone())))
            .collect();
        for (source, name) in derived {
            if let Some(v) = volumes.get_mut(&source) {
                v.derived.push(name);
            }
        }
        Cluster {
            nodes,
            pools,
            networks,
            volumes,
        }
    }

    /// Records which of `domains` use which volume (a disk naming it), for the moves that
    /// copy volumes ([`super::moves::copy_refusals`]).
    pub fn note_users<'a>(&mut self, domains: impl IntoIterator<Item = &'a Domain>) {
        for dom in domains {
            let ns = dom.namespace().unwrap_or_default();
            for vol in dom.spec.disks.iter().filter_map(|d| d.volume.as_ref()) {
                if let Some(v) = self.volumes.get_mut(&(ns.clone(), vol.clone()))
                    && !v.users.contains(&dom.name_any())
                {
                    v.users.push(dom.name_any());
                }
            }
        }
    }

    /// The node, if it has a HypervisorNode.
    pub fn node(&self, name: &str) -> Option<&NodeView> {
        self.nodes.get(name)
    }

    /// Whether `name` counts as fenced (see [`NodeView::fenced`]).
    pub fn fenced(&self, name: &str) -> bool {
        self.node(name).is_some_and(NodeView::fenced)
    }

    /// Whether the node's agent is heard from (a node without a HypervisorNode is not).
    pub fn fresh(&self, name: &str) -> bool {
        self.node(name).is_some_and(|n| n.fresh)
    }

    /// Whether `pool` is a `disk` pool (its Volumes are partitions).
    pub fn pool_is_partitioned(&self, pool: &str) -> bool {
        self.pools.get(pool).is_some_and(|p| p.partitions)
    }

    /// Whether `pool` keeps its data on one node only (a missing pool counts as local).
    pub fn pool_is_local(&self, pool: &str) -> bool {
        !self.pools.get(pool).is_some_and(|p| p.shared)
    }

    /// The node a volume's data is tied to, for a volume in a node-local pool: its holder,
    /// else its `spec.nodeName`, else (for a clone or overlay) its source's node. `None` for
    /// a shared pool or a volume not tied yet.
    pub fn volume_node(&self, namespace: &str, name: &str) -> Option<String> {
        let mut key = (namespace.to_string(), name.to_string());
        // A chain of sources is short; the bound also stops a cycle.
        for _ in 0..16 {
            let vol = self.volumes.get(&key)?;
            if !self.pool_is_local(&vol.pool) {
                return None;
            }
            if let Some(node) = vol.holder.clone().or_else(|| vol.requested.clone()) {
                return Some(node);
            }
            key = (namespace.to_string(), vol.source.clone()?);
        }
        None
    }
}

fn node_view(
    hvn: &HypervisorNode,
    node: Option<&Node>,
    settings: &Settings,
    now: Timestamp,
) -> NodeView {
    let status = hvn.status.as_ref();
    let heartbeat = status
        .and_then(|s| s.heartbeat_time.as_ref())
        .or(hvn.metadata.creation_timestamp.as_ref())
        .map(|t| t.0);
    let fresh = heartbeat.is_some_and(|hb| within(hb, now, settings.heartbeat_grace));
    let ready = status
        .and_then(|s| conditions::find(&s.conditions, READY))
        .map(|c| (c.status.clone(), c.reason.clone()));
    let spec = node.and_then(|n| n.spec.as_ref());
    NodeView {
        name: hvn.name_any(),
        labels: hvn.labels().clone(),
        ready,
        heartbeat,
        fresh,
        fenced_annotation: hvn
            .annotations()
            .get(FENCED_ANNOTATION)
            .is_some_and(|v| v == "true"),
        cordoned: spec.and_then(|s| s.unschedulable).unwrap_or(false),
        taints: spec
            .and_then(|s| s.taints.as_ref())
            .map(|taints| {
                taints
                    .iter()
                    .map(|t| NodeTaint {
                        key: t.key.clone(),
                        value: t.value.clone().filter(|v| !v.is_empty()),
                        effect: t.effect.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        memory_total: status
            .and_then(|s| s.memory.as_ref())
            .and_then(|m| m.total.bytes().ok()),
        cpus: status.and_then(|s| s.cpu.as_ref()).map(|c| c.count),
        max_vcpus: status.and_then(|s| s.max_vcpus),
        pci_devices: status
            .and_then(|s| s.host.as_ref())
            .map(|h| {
                h.pci_devices
                    .iter()
                    .map(|d| d.address.to_ascii_lowercase())
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// Whether `then` is no older than `grace` at `now` (a time in the future counts as fresh:
/// clocks differ between nodes).
pub fn within(then: Timestamp, now: Timestamp, grace: std::time::Duration) -> bool {
    let age = now.duration_since(then);
    age.is_negative() || age.unsigned_abs() <= grace
}

/// `then + d`.
pub fn after(then: Timestamp, d: std::time::Duration) -> Timestamp {
    k8s_openapi::jiff::SignedDuration::try_from(d)
        .ok()
        .and_then(|d| then.checked_add(d).ok())
        .unwrap_or(Timestamp::MAX)
}

/// Whether a pool's per-node `state` says it runs. The agent writes libvirt's state as its
/// `PoolState` variant (`Running`); the CRD's description and `virtkube status` use
/// libvirt's lower-case word (`running`). Both mean the same.
fn pool_running(state: &str) -> bool {
    state.eq_ignore_ascii_case("running")
}

/// Whether the StoragePool is a `disk` pool.
fn partitioned(pool: &StoragePool) -> bool {
    pool.spec.type_ == virtkube_crds::storage_pool::PoolType::Disk
}

#[cfg(test)]
mod pool_state_tests {
    use super::pool_running;

    /// The state as the agent writes it (`Running`, found by the e2e suite: the controller
    /// compared with `running` only and left every domain with a volume unschedulable).
    #[test]
    fn a_pool_runs_whichever_way_the_state_is_spelled() {
        assert!(pool_running("Running"));
        assert!(pool_running("running"));
        assert!(!pool_running("Inactive"));
        assert!(!pool_running("Failed"));
    }
}
