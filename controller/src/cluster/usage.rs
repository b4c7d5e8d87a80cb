//! What the domains already placed take from each node (memory, pinned host CPUs) and which
//! moves are under way: the scheduler's and the migration limits' bookkeeping. Pure, and
//! kept current within a pass as the controller's own writes succeed.

use std::collections::{BTreeMap, BTreeSet};

use kube::ResourceExt;
use virtkube_crds::cpuset::CpuSet;
use virtkube_crds::{Domain, DomainSpec};

use crate::placement::write::facts_of;

/// `namespace/name` of a domain.
pub fn domain_key(dom: &Domain) -> String {
    format!("{}/{}", dom.namespace().unwrap_or_default(), dom.name_any())
}

/// The memory a domain reserves on its node: `memory.max` when set (it can grow there
/// without a restart), else `memory.size`.
pub fn memory_need(spec: &DomainSpec) -> Result<u64, String> {
    let quantity = spec.memory.max.as_ref().unwrap_or(&spec.memory.size);
    quantity
        .bytes()
        .map_err(|e| format!("spec.memory is not a size: {e}"))
}

/// The host CPUs a domain's vCPU pinning names.
pub fn pinned_cpus(spec: &DomainSpec) -> Result<BTreeSet<u32>, String> {
    let mut cpus = BTreeSet::new();
    for pin in &spec.cpu.pinning {
        let set: CpuSet = pin
            .cpuset
            .parse()
            .map_err(|e| format!("spec.cpu.pinning[vcpu={}]: {e}", pin.vcpu))?;
        cpus.extend(set.iter());
    }
    Ok(cpus)
}

/// The PCI addresses of a domain's host devices, lower case.
pub fn host_device_addresses(spec: &DomainSpec) -> BTreeSet<String> {
    spec.host_devices
        .iter()
        .map(|h| h.address.to_ascii_lowercase())
        .collect()
}

/// One domain's share of one node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Share {
    memory: u64,
    cpus: BTreeSet<u32>,
    host_devices: BTreeSet<String>,
}

/// Placed domains' shares of the nodes, and the moves under way.
#[derive(Debug, Clone, Default)]
pub struct Usage {
    /// node → domain key → share.
    nodes: BTreeMap<String, BTreeMap<String, Share>>,
    /// domain key → (source, target) of its move under way.
    moves: BTreeMap<String, (String, String)>,
}

impl Usage {
    /// The usage of `domains`.
    pub fn of<'a>(domains: impl IntoIterator<Item = &'a Domain>) -> Usage {
        let mut usage = Usage::default();
        for dom in domains {
            usage.add(dom);
        }
        usage
    }

    /// Counts `dom` on its holder and on the target of its move under way (a moving domain
    /// takes its memory on both until the move ends). A spec that cannot be read counts
    /// nothing: the agent reports it, and it runs nowhere.
    pub fn add(&mut self, dom: &Domain) {
        let key = domain_key(dom);
        let facts = facts_of(dom);
        let share = Share {
            memory: memory_need(&dom.spec).unwrap_or(0),
            cpus: pinned_cpus(&dom.spec).unwrap_or_default(),
            host_devices: host_device_addresses(&dom.spec),
        };
        if let Some(holder) = &facts.claim.holder {
            self.nodes
                .entry(holder.clone())
                .or_default()
                .insert(key.clone(), share.clone());
        }
        if let Some(m) = facts.claim.active_move() {
            self.nodes
                .entry(m.target.clone())
                .or_default()
                .insert(key.clone(), share);
            self.moves.insert(key, (m.source.clone(), m.target.clone()));
        }
    }

    /// Forgets the domain `key` everywhere.
    pub fn remove(&mut self, key: &str) {
        for shares in self.nodes.values_mut() {
            shares.remove(key);
        }
        self.moves.remove(key);
    }

    /// Replaces what `dom` counted with what it counts now (after a write of its claim).
    pub fn replace(&mut self, dom: &Domain) {
        self.remove(&domain_key(dom));
        self.add(dom);
    }

    /// Memory the domains on `node` take, other than `except`'s.
    pub fn memory_used(&self, node: &str, except: &str) -> u64 {
        self.nodes.get(node).map_or(0, |shares| {
            shares
                .iter()
                .filter(|(k, _)| k.as_str() != except)
                .map(|(_, s)| s.memory)
                .sum()
        })
    }

    /// The domain (other than `except`) that pins host CPU `cpu` on `node`, if any.
    pub fn cpu_taken(&self, node: &str, cpu: u32, except: &str) -> Option<&str> {
        self.nodes.get(node).and_then(|shares| {
            shares
                .iter()
                .find(|(k, s)| k.as_str() != except && s.cpus.contains(&cpu))
                .map(|(k, _)| k.as_str())
        })
    }

    /// The domain (other than `except`) that has the host PCI device `address` on `node`,
    /// if any.
    pub fn host_device_taken(&self, node: &str, address: &str, except: &str) -> Option<&str> {
        self.nodes.get(node).and_then(|shares| {
            shares
                .iter()
                .find(|(k, s)| k.as_str() != except && s.host_devices.contains(address))
                .map(|(k, _)| k.as_str())
        })
    }

    /// How many domains count on `node`.
    pub fn domains_on(&self, node: &str) -> usize {
        self.nodes.get(node).map_or(0, BTreeMap::len)
    }

    /// Moves under way in the cluster.
    pub fn active_moves(&self) -> usize {
        self.moves.len()
    }

    /// Moves under way out of `node`.
    pub fn outbound(&self, node: &str) -> usize {
        self.moves.values().filter(|(s, _)| s == node).count()
    }
}
