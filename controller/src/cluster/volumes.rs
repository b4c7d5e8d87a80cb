//! Volume binding: a Volume's `status.nodeName` is its holder, the one node that creates,
//! grows and deletes its image. Pure.
//!
//! Rules, first match wins, for a Volume not bound yet:
//! 1. `spec.nodeName` set: that node (once it has a HypervisorNode).
//! 2. cloned from or layered on a volume of a node-local pool: the source's node (waiting,
//!    `WaitingForSource`, until the source is tied to one).
//! 3. in a `shared: true` pool: the node of the first Domain using it (directly, or through
//!    a volume cloned from it) when the pool runs there, else the first Ready node (by name)
//!    where the pool runs.
//! 4. in a node-local pool: wait for the first consumer (`WaitingForConsumer`), then the
//!    node of the first Domain using it once that domain is bound. The scheduler in turn
//!    keeps every domain using a tied node-local volume on that node.
//!
//! A bound volume keeps its node, except in a shared pool whose holder was declared fenced:
//! any other node running the pool takes it over.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use virtkube_crds::conditions::status;
use virtkube_crds::domain::MigrationState;
use virtkube_crds::volume::{TransferState, VolumeStatus, VolumeTransfer};
use virtkube_crds::{Domain, Volume};

use super::conditions::{SCHEDULED, set};
use super::decide::Note;
use super::usage::domain_key;
use super::view::{Cluster, NodeView};

type Key = (String, String);

/// One domain's use of a volume: (domain key, its holder, the target of its move under way).
type Use = (String, Option<String>, Option<String>);

/// Who uses which volume.
#[derive(Debug, Clone, Default)]
pub struct Consumers {
    /// (namespace, volume) → the domains using it: (domain key, holder, target of a move
    /// under way), in domain-key order.
    by_volume: BTreeMap<Key, Vec<Use>>,
    /// (namespace, source volume) → volumes cloned from it or layered on it.
    derived: BTreeMap<Key, Vec<String>>,
    /// (namespace, volume) → its holder.
    holders: BTreeMap<Key, Option<String>>,
    /// (namespace, domain) → its move record, for the moves that copy volumes.
    copying_moves: BTreeMap<Key, CopyingMove>,
}

/// A move record that copies volumes, as the volumes' handover needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyingMove {
    /// The record's state.
    pub state: MigrationState,
    /// Where the domain leaves from.
    pub source: String,
    /// Where it goes.
    pub target: String,
    /// The volumes copied.
    pub copied: Vec<String>,
    /// The domain's holder now.
    pub holder: Option<String>,
}

impl Consumers {
    /// The consumers among `domains` and `volumes`.
    pub fn of<'a>(
        domains: impl IntoIterator<Item = &'a Domain>,
        volumes: impl IntoIterator<Item = &'a Volume>,
    ) -> Consumers {
        let mut c = Consumers::default();
        for dom in domains {
            let ns = dom.namespace().unwrap_or_default();
            let facts = crate::placement::write::facts_of(dom);
            let target = facts.claim.active_move().map(|m| m.target.clone());
            if let Some(m) = dom.status.as_ref().and_then(|s| s.migration.as_ref())
                && !m.copied_volumes.is_empty()
                && let (Some(state), Some(source), Some(target)) =
                    (m.state, m.source_node.clone(), m.target_node.clone())
            {
                c.copying_moves.insert(
                    (ns.clone(), dom.name_any()),
                    CopyingMove {
                        state,
                        source,
                        target,
                        copied: m.copied_volumes.clone(),
                        holder: facts.claim.holder.clone(),
                    },
                );
            }
            for vol in dom.spec.disks.iter().filter_map(|d| d.volume.as_ref()) {
                c.by_volume
                    .entry((ns.clone(), vol.clone()))
                    .or_default()
                    .push((domain_key(dom), facts.claim.holder.clone(), target.clone()));
            }
        }
        for list in c.by_volume.values_mut() {
            list.sort();
        }
        for vol in volumes {
            let ns = vol.namespace().unwrap_or_default();
            c.holders.insert(
                (ns.clone(), vol.name_any()),
                vol.status.as_ref().and_then(|s| s.node_name.clone()),
            );
            if let Some(source) = vol.spec.source.as_ref().and_then(|s| s.referenced_volume()) {
                c.derived
                    .entry((ns, source.to_string()))
                    .or_default()
                    .push(vol.name_any());
            }
        }
        for list in c.derived.values_mut() {
            list.sort();
        }
        c
    }

    /// The volume and every volume cloned from or layered on it, transitively (bounded, so
    /// a cycle ends).
    fn family(&self, ns: &str, name: &str) -> Vec<String> {
        let mut out = vec![name.to_string()];
        let mut i = 0;
        while i < out.len() && out.len() < 64 {
            if let Some(children) = self.derived.get(&(ns.to_string(), out[i].clone())) {
                for child in children {
                    if !out.contains(child) {
                        out.push(child.clone());
                    }
                }
            }
            i += 1;
        }
        out
    }

    /// The node of the first bound Domain using the volume, directly or through a volume
    /// derived from it.
    pub fn first_node(&self, ns: &str, name: &str) -> Option<String> {
        self.family(ns, name).iter().find_map(|v| {
            self.by_volume
                .get(&(ns.to_string(), v.clone()))?
                .iter()
                .find_map(|(_, holder, _)| holder.clone())
        })
    }

    /// The move record of Domain `ns/domain`, when it copies volumes.
    pub fn copying_move(&self, ns: &str, domain: &str) -> Option<&CopyingMove> {
        self.copying_moves
            .get(&(ns.to_string(), domain.to_string()))
    }

    /// The Domains using volume `ns/name` whose move copies it away from `holder`.
    fn moves_copying(&self, ns: &str, name: &str, holder: &str) -> Vec<(String, &CopyingMove)> {
        self.copying_moves
            .iter()
            .filter(|((dns, _), m)| {
                dns == ns && m.source == holder && m.copied.iter().any(|v| v == name)
            })
            .map(|((_, d), m)| (d.clone(), m))
            .collect()
    }

    /// Every node whose agent needs to see the volume: the nodes holding (or receiving in a
    /// move) a Domain that uses it or a volume derived from it, and the holders of volumes
    /// derived from it (which read it to create theirs).
    pub fn users(&self, ns: &str, name: &str) -> BTreeSet<String> {
        let mut nodes = BTreeSet::new();
        for (i, v) in self.family(ns, name).iter().enumerate() {
            let key = (ns.to_string(), v.clone());
            if i > 0
                && let Some(Some(h)) = self.holders.get(&key)
            {
                nodes.insert(h.clone());
            }
            for (_, holder, target) in self.by_volume.get(&key).into_iter().flatten() {
                nodes.extend(holder.clone());
                nodes.extend(target.clone());
            }
        }
        nodes
    }
}

/// What the controller does about one Volume.
#[derive(Debug, Clone, PartialEq)]
pub struct VolumeDecision {
    /// The status it should have (write it when it differs).
    pub status: VolumeStatus,
    /// Events to publish after the write.
    pub notes: Vec<Note>,
}

/// The controller's decision about `vol`.
pub fn decide_volume(
    vol: &Volume,
    cluster: &Cluster,
    consumers: &Consumers,
    now: Timestamp,
) -> VolumeDecision {
    let old = vol.status.clone().unwrap_or_default();
    let mut st = old.clone();
    let generation = vol.metadata.generation;
    let mut notes = Vec::new();
    // A handover goes on even while the Volume is being deleted: its data is wherever the
    // handover says, and the deletion waits for the domain using it anyway.
    if let Some(step) = handover(vol, consumers) {
        apply_handover(&mut st, step, generation, now, &mut notes);
        return VolumeDecision { status: st, notes };
    }
    if vol.metadata.deletion_timestamp.is_some() {
        return VolumeDecision { status: st, notes };
    }
    let outcome = match old.node_name.as_deref() {
        Some(h) if !cluster.pool_is_local(&vol.spec.pool) && cluster.fenced(h) => {
            Some(match shared_pick(vol, cluster, consumers, Some(h)) {
                Some((node, _, _)) => Ok((
                    node.clone(),
                    "NodeFenced",
                    format!(
                        "node {h} was declared fenced: {node}, where the shared pool {} runs too, holds the volume now",
                        vol.spec.pool
                    ),
                )),
                None => Err((
                    "PoolNotRunning",
                    format!(
                        "node {h} was declared fenced and the shared pool {} runs on no other Ready node",
                        vol.spec.pool
                    ),
                )),
            })
        }
        Some(_) => None,
        None => Some(placement(vol, cluster, consumers)),
    };
    match outcome {
        Some(Ok((node, reason, message))) => {
            st.node_name = Some(node);
            set(
                &mut st.conditions,
                SCHEDULED,
                status::TRUE,
                reason,
                message.clone(),
                generation,
                now,
            );
            notes.push(Note {
                warning: false,
                reason: "Scheduled".into(),
                action: "Schedule",
                message,
            });
        }
        Some(Err((reason, message))) => {
            st.node_name = None;
            if set(
                &mut st.conditions,
                SCHEDULED,
                status::FALSE,
                reason,
                message.clone(),
                generation,
                now,
            ) {
                notes.push(Note {
                    warning: false,
                    reason: reason.to_string(),
                    action: "Schedule",
                    message,
                });
            }
        }
        None => {}
    }
    VolumeDecision { status: st, notes }
}

type Placed = Result<(String, &'static str, String), (&'static str, String)>;

fn placement(vol: &Volume, cluster: &Cluster, consumers: &Consumers) -> Placed {
    let ns = vol.namespace().unwrap_or_default();
    let name = vol.name_any();
    let pool = &vol.spec.pool;
    if let Some(node) = &vol.spec.node_name {
        return if cluster.node(node).is_some() {
            Ok((
                node.clone(),
                "Requested",
                format!("on {node} as spec.nodeName requests"),
            ))
        } else {
            Err((
                "NodeNotFound",
                format!(
                    "spec.nodeName is {node}, which has no HypervisorNode (no agent registered under that name)"
                ),
            ))
        };
    }
    let Some(pool_view) = cluster.pools.get(pool) else {
        return Err(("PoolNotFound", format!("pool {pool} does not exist")));
    };
    if let Some(source) = vol.spec.source.as_ref().and_then(|s| s.referenced_volume()) {
        match cluster.volumes.get(&(ns.clone(), source.to_string())) {
            None => {
                return Err((
                    "WaitingForSource",
                    format!("source volume {source} does not exist"),
                ));
            }
            Some(src) if cluster.pool_is_local(&src.pool) => {
                return match cluster.volume_node(&ns, source) {
                    Some(node) => Ok((
                        node.clone(),
                        "FollowsSource",
                        format!(
                            "on {node} with its source volume {source} (node-local pool {})",
                            src.pool
                        ),
                    )),
                    None => Err((
                        "WaitingForSource",
                        format!(
                            "waiting for its source volume {source} (node-local pool {}) to be placed on a node",
                            src.pool
                        ),
                    )),
                };
            }
            Some(_) => {}
        }
    }
    if pool_view.shared {
        return shared_pick(vol, cluster, consumers, None).ok_or_else(|| {
            (
                "PoolNotRunning",
                format!("the shared pool {pool} runs on no Ready node yet"),
            )
        });
    }
    match consumers.first_node(&ns, &name) {
        Some(node) => Ok((
            node.clone(),
            "FollowsConsumer",
            format!("on {node}, the node of the first Domain using it (node-local pool {pool})"),
        )),
        None => Err((
            "WaitingForConsumer",
            format!(
                "the node-local pool {pool} keeps a volume on one node: it is placed on the node of the first Domain using it, once that domain is scheduled"
            ),
        )),
    }
}

/// A node for a volume of a shared pool: the first consumer's node when the pool runs there,
/// else the first Ready node (by name) where it runs; never `exclude`.
fn shared_pick(
    vol: &Volume,
    cluster: &Cluster,
    consumers: &Consumers,
    exclude: Option<&str>,
) -> Option<(String, &'static str, String)> {
    let pool = cluster.pools.get(&vol.spec.pool)?;
    let candidates: Vec<&String> = pool
        .running_on
        .iter()
        .filter(|n| cluster.node(n).is_some_and(NodeView::available))
        .filter(|n| Some(n.as_str()) != exclude)
        .collect();
    let ns = vol.namespace().unwrap_or_default();
    if let Some(node) = consumers.first_node(&ns, &vol.name_any())
        && candidates.contains(&&node)
    {
        let message = format!(
            "on {node}, the node of the first Domain using it (shared pool {})",
            vol.spec.pool
        );
        return Some((node, "FollowsConsumer", message));
    }
    candidates.first().map(|node| {
        (
            (*node).clone(),
            "NodeAssigned",
            format!(
                "on {node}, a Ready node where the shared pool {} runs",
                vol.spec.pool
            ),
        )
    })
}

/// What the controller does next in a volume's handover to another node (a live migration of
/// its Domain that copies its disk). The handover's steps, each written by one party with a
/// compare-and-swap:
///
/// 1. controller: the Domain's move that copies the volume is approved or running (a record
///    naming it in `copiedVolumes`, from the volume's holder) → `transfer: Copying`;
/// 2. controller: the move `Succeeded` and the Domain's claim names the target → `Copied`
///    (the guest runs on the target's copy; the source's image is stale); `Failed` or
///    `Aborted` → the transfer is dropped (the guest runs on the source's image, which stays
///    the volume's);
/// 3. the source's agent (still the holder) removes its stale image and its key →
///    `SourceRemoved`;
/// 4. controller: binds the volume to the target (`status.nodeName`);
/// 5. the target's agent, now the holder, records the copy's key and drops the transfer.
///
/// The volume always has exactly one holder, and its data is never deleted: the source's
/// image goes only after libvirt completed the migration onto the copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handover {
    /// Step 1: record the transfer.
    Begin {
        /// The Domain.
        domain: String,
        /// The volume's holder.
        source: String,
        /// Where it goes.
        target: String,
    },
    /// Step 2: the copy is the data now.
    Copied,
    /// Step 2: the move failed; the source keeps the volume.
    Drop {
        /// How the move ended.
        ended: MigrationState,
    },
    /// Step 4: bind the volume to the target.
    Bind {
        /// The target.
        target: String,
    },
}

/// The next step of `vol`'s handover that is the controller's to take, if any (pure).
pub fn handover(vol: &Volume, consumers: &Consumers) -> Option<Handover> {
    let ns = vol.namespace().unwrap_or_default();
    let name = vol.name_any();
    let status = vol.status.as_ref()?;
    let holder = status.node_name.as_deref()?;
    match &status.transfer {
        None => {
            let (domain, m) = consumers
                .moves_copying(&ns, &name, holder)
                .into_iter()
                .find(|(_, m)| {
                    matches!(
                        m.state,
                        MigrationState::Pending
                            | MigrationState::Running
                            | MigrationState::Succeeded
                    )
                })?;
            // A record that succeeded before the controller saw it running: the copy is
            // the data already (step 2 follows on the next decision).
            if m.state == MigrationState::Succeeded && m.holder.as_deref() != Some(&m.target) {
                return None;
            }
            Some(Handover::Begin {
                domain,
                source: holder.to_string(),
                target: m.target.clone(),
            })
        }
        Some(t) if t.state == TransferState::Copying => {
            let m = consumers.copying_move(&ns, &t.domain)?;
            if m.source != t.source_node || m.target != t.target_node || !m.copied.contains(&name) {
                return None;
            }
            match m.state {
                MigrationState::Succeeded if m.holder.as_deref() == Some(&t.target_node) => {
                    Some(Handover::Copied)
                }
                MigrationState::Failed | MigrationState::Aborted => {
                    Some(Handover::Drop { ended: m.state })
                }
                _ => None,
            }
        }
        Some(t) if t.state == TransferState::SourceRemoved && holder == t.source_node => {
            Some(Handover::Bind {
                target: t.target_node.clone(),
            })
        }
        Some(_) => None,
    }
}

fn apply_handover(
    st: &mut VolumeStatus,
    step: Handover,
    generation: Option<i64>,
    now: Timestamp,
    notes: &mut Vec<Note>,
) {
    match step {
        Handover::Begin {
            domain,
            source,
            target,
        } => {
            notes.push(Note {
                warning: false,
                reason: "HandoverStarted".into(),
                action: "Move",
                message: format!(
                    "Domain {domain} moves from {source} to {target} with this volume's disk copied: the volume goes with it"
                ),
            });
            st.transfer = Some(VolumeTransfer {
                domain,
                source_node: source,
                target_node: target,
                state: TransferState::Copying,
            });
        }
        Handover::Copied => {
            if let Some(t) = st.transfer.as_mut() {
                t.state = TransferState::Copied;
            }
        }
        Handover::Drop { ended } => {
            if let Some(t) = st.transfer.take() {
                notes.push(Note {
                    warning: false,
                    reason: "HandoverCancelled".into(),
                    action: "Move",
                    message: format!(
                        "the move of Domain {} ended {ended:?}: the volume stays on {}",
                        t.domain, t.source_node
                    ),
                });
            }
        }
        Handover::Bind { target } => {
            let message =
                format!("on {target}: its disk was copied there with its Domain's live migration");
            st.node_name = Some(target);
            set(
                &mut st.conditions,
                SCHEDULED,
                status::TRUE,
                "MovedWithDomain",
                message.clone(),
                generation,
                now,
            );
            notes.push(Note {
                warning: false,
                reason: "MovedWithDomain".into(),
                action: "Schedule",
                message,
            });
        }
    }
}

/// What the agent of `node` does in a handover it is the source of (step 3 of [`Handover`]),
/// decided on a fresh read of the Volume it holds. Pure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceStep {
    /// No handover from this node: reconcile as usual.
    None,
    /// The disk is being copied: the image here is the data; change nothing that would make,
    /// grow or delete it, and never make one in its place.
    Keep,
    /// The copy is the data: delete the stale image here (if it is the volume's own and
    /// nothing here reads it), then record `SourceRemoved` without its key.
    RemoveStale,
    /// Done here; the controller has the next step.
    Wait,
}

/// The source's step for a Volume with `transfer`, on `node` (see [`SourceStep`]).
pub fn source_step(transfer: Option<&VolumeTransfer>, node: &str) -> SourceStep {
    match transfer {
        Some(t) if t.source_node == node => match t.state {
            TransferState::Copying => SourceStep::Keep,
            TransferState::Copied => SourceStep::RemoveStale,
            TransferState::SourceRemoved => SourceStep::Wait,
        },
        _ => SourceStep::None,
    }
}
