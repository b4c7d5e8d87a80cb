//! Moves: whether a requested move may be approved now (the target fits, the storage is
//! shared, the migration limits and the backoff allow it), what the approval, cancellation
//! and fencing write into `status.migration`, and the backoff after failed moves. Pure.
//!
//! The controller only approves (`Pending`), cancels (`Aborted`) and, for a fenced source,
//! ends moves; the source's agent starts them (`Running`), carries them out and records how
//! they ended (`Succeeded`, `Failed`, `Aborted`).

use std::collections::HashMap;
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use virtkube_crds::Domain;
use virtkube_crds::domain::{
    DomainPhase, DomainStatus, MigrationMode, MigrationState, MigrationStatus,
};

use super::scheduler::{self, Demand, Problem, Refusal};
use super::settings::Settings;
use super::usage::Usage;
use super::view::{Cluster, after};

/// `status.migration.reason` of a move the user asked for by changing `spec.nodeName`.
pub const REQUESTED: &str = "Requested";

/// `status.migration.reason` of a move a node drain asked for.
pub const DRAIN: &str = crate::placement::write::DRAIN;

/// Where a domain is wanted: `spec.nodeName`, or, while that is unset, the target of the
/// move under way that a drain started (a drain asks for a move without touching the
/// user's spec).
///
/// The source's agent must derive the request the same way, or it would see the drain's
/// move as unwanted and abort it.
pub fn requested_of(dom: &Domain) -> Option<String> {
    // One rule for the controller and the agents.
    crate::placement::write::facts_of(dom).requested
}

/// Whether the move recorded in `record` has been `Pending` (approved, not started by the
/// source's agent) for longer than `settings.pending_timeout`.
pub fn pending_expired(record: &MigrationStatus, settings: &Settings, now: Timestamp) -> bool {
    record.state == Some(MigrationState::Pending)
        && record
            .start_time
            .as_ref()
            .is_some_and(|t| after(t.0, settings.pending_timeout) <= now)
}

/// The moment a `Pending` move runs out of time, if it is one.
pub fn pending_deadline(record: &MigrationStatus, settings: &Settings) -> Option<Timestamp> {
    (record.state == Some(MigrationState::Pending))
        .then(|| {
            record
                .start_time
                .as_ref()
                .map(|t| after(t.0, settings.pending_timeout))
        })
        .flatten()
}

/// Why a requested move is not approved now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MoveWait {
    /// The target has no HypervisorNode.
    TargetNotFound(String),
    /// The target is not Ready, silent or fenced.
    TargetNotReady(String, Vec<Refusal>),
    /// The target does not fit the domain.
    TargetUnfit(String, Vec<Refusal>),
    /// Disks are in node-local pools and the domain does not allow copying them.
    StorageNotShared(Vec<String>),
    /// Disks are in node-local pools and copying them is allowed, but some cannot be
    /// copied: (volume, why).
    StorageNotCopyable(Vec<(String, String)>),
    /// The domain's spec cannot be read, or it names what does not exist.
    InvalidSpec(Vec<Problem>),
    /// The source's agent is silent: it could not carry the move out.
    SourceUnreachable(String),
    /// The same move failed or was aborted recently.
    Backoff(Timestamp),
    /// `--max-migrations` moves are under way.
    ClusterLimit(usize),
    /// `--max-migrations-per-node` moves are under way out of the source.
    NodeLimit(String, usize),
    /// The domain runs with host PCI devices (named): libvirt cannot live-migrate it.
    HostDevices(Vec<String>),
}

impl MoveWait {
    /// The condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            MoveWait::TargetNotFound(_) => "TargetNotFound",
            MoveWait::TargetNotReady(..) => "TargetNotReady",
            MoveWait::TargetUnfit(..) => "TargetUnfit",
            MoveWait::StorageNotShared(_) => "StorageNotShared",
            MoveWait::StorageNotCopyable(_) => "StorageNotCopyable",
            MoveWait::InvalidSpec(_) => "InvalidSpec",
            MoveWait::SourceUnreachable(_) => "SourceUnreachable",
            MoveWait::Backoff(_) => "Backoff",
            MoveWait::ClusterLimit(_) => "MigrationLimit",
            MoveWait::NodeLimit(..) => "NodeMigrationLimit",
            MoveWait::HostDevices(_) => "HostDevicesAttached",
        }
    }

    /// Whether waiting can end on its own without anyone changing a spec (a slot frees, a
    /// backoff passes, a node returns); a drain counts the others as blocked.
    pub fn transient(&self) -> bool {
        matches!(
            self,
            MoveWait::TargetNotReady(..)
                | MoveWait::SourceUnreachable(_)
                | MoveWait::Backoff(_)
                | MoveWait::ClusterLimit(_)
                | MoveWait::NodeLimit(..)
                | MoveWait::TargetUnfit(..)
        )
    }
}

fn joined<T: fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for MoveWait {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MoveWait::TargetNotFound(t) => {
                write!(
                    f,
                    "node {t} has no HypervisorNode (no agent registered under that name)"
                )
            }
            MoveWait::TargetNotReady(t, why) => write!(f, "node {t} is {}", joined(why)),
            MoveWait::TargetUnfit(t, why) => write!(f, "node {t} cannot take it: {}", joined(why)),
            MoveWait::StorageNotShared(volumes) => write!(
                f,
                "volumes {} are in node-local pools: a move needs every volume in a StoragePool with shared: true, or spec.migration.allowCopyStorage: true to copy them to the target during a live migration",
                volumes.join(", ")
            ),
            MoveWait::StorageNotCopyable(volumes) => write!(
                f,
                "node-local volumes cannot be copied to the target: {}",
                volumes
                    .iter()
                    .map(|(v, why)| format!("{v} {why}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
            MoveWait::InvalidSpec(problems) => write!(f, "{}", joined(problems)),
            MoveWait::SourceUnreachable(s) => write!(
                f,
                "node {s}'s agent is not heard from, so it cannot hand the domain over; it moves when the agent returns, or is scheduled again once an administrator declares {s} fenced"
            ),
            MoveWait::Backoff(until) => write!(
                f,
                "the same move failed or was aborted recently; trying again after {until}"
            ),
            MoveWait::ClusterLimit(n) => write!(
                f,
                "{n} moves are under way in the cluster (--max-migrations)"
            ),
            MoveWait::NodeLimit(s, n) => write!(
                f,
                "{n} moves are under way out of node {s} (--max-migrations-per-node)"
            ),
            MoveWait::HostDevices(names) => write!(
                f,
                "it runs with host devices {} passed through, and libvirt cannot live-migrate a domain with PCI passthrough: stop it (it then moves cold) or remove spec.hostDevices",
                names.join(", ")
            ),
        }
    }
}

/// What deciding a move needs besides the domain.
pub struct MoveInputs<'a> {
    /// The cluster.
    pub cluster: &'a Cluster,
    /// Placed domains and moves under way.
    pub usage: &'a Usage,
    /// Limits.
    pub settings: &'a Settings,
    /// Failed moves.
    pub backoff: &'a Backoff,
    /// Now.
    pub now: Timestamp,
}

/// Whether the move of `dom` from `source` to `target` may be approved now (`None`), or why
/// it waits. `drain`: the target was chosen by the scheduler for a drain, so the domain's
/// node selector applies (a node the user names ignores it, as binding does).
pub fn check(
    dom: &Domain,
    demand: &Result<Demand, Vec<Problem>>,
    source: &str,
    target: &str,
    drain: bool,
    cx: &MoveInputs<'_>,
) -> Option<MoveWait> {
    let Some(node) = cx.cluster.node(target) else {
        return Some(MoveWait::TargetNotFound(target.to_string()));
    };
    let unavailable = scheduler::availability(node);
    if !unavailable.is_empty() {
        return Some(MoveWait::TargetNotReady(target.to_string(), unavailable));
    }
    let demand = match demand {
        Ok(d) => d,
        Err(problems) => return Some(MoveWait::InvalidSpec(problems.clone())),
    };
    if let Some(wait) = scheduler::live_move_blocked_by_host_devices(dom) {
        return Some(wait);
    }
    let copied = match volumes_to_copy(dom, cx.cluster, source) {
        Ok(copied) => copied,
        Err(wait) => return Some(wait),
    };
    let mut unfit = scheduler::refusals(node, demand, cx.cluster, cx.usage, cx.settings, drain);
    // The volumes copied go with the domain: their node is no reason to stay.
    unfit.retain(
        |r| !matches!(r, Refusal::VolumeElsewhere { volume, .. } if copied.contains(volume)),
    );
    if !unfit.is_empty() {
        return Some(MoveWait::TargetUnfit(target.to_string(), unfit));
    }
    if !cx.cluster.fresh(source) {
        return Some(MoveWait::SourceUnreachable(source.to_string()));
    }
    if let Some(until) = cx.backoff.blocks(&backoff_key(dom), source, target, cx.now) {
        return Some(MoveWait::Backoff(until));
    }
    if cx.usage.active_moves() >= cx.settings.max_migrations {
        return Some(MoveWait::ClusterLimit(cx.usage.active_moves()));
    }
    let out = cx.usage.outbound(source);
    if out >= cx.settings.max_migrations_per_node {
        return Some(MoveWait::NodeLimit(source.to_string(), out));
    }
    None
}

/// The domain's volume disks whose pool is not shared (host-path disks are the
/// administrator's business: they must exist on the target).
pub fn local_volumes(dom: &Domain, cluster: &Cluster) -> Vec<String> {
    let namespace = dom.namespace().unwrap_or_default();
    dom.spec
        .disks
        .iter()
        .filter_map(|d| d.volume.as_ref())
        .filter(|v| {
            cluster
                .volumes
                .get(&(namespace.clone(), (*v).clone()))
                .is_none_or(|vol| cluster.pool_is_local(&vol.pool))
        })
        .cloned()
        .collect()
}

/// The node-local volumes a move of `dom` away from `source` copies to its target (empty
/// when all its volumes are on shared storage), or why the move cannot go.
///
/// Copying is libvirt's: during a live migration with `VIR_MIGRATE_NON_SHARED_DISK` and the
/// disks listed in `migrate_disks`, the target's libvirt creates a volume of the same name in
/// its pool of the same name and QEMU mirrors the disk into it. So only a running (or
/// paused) domain's disks can be copied, only when `migration.allowCopyStorage` says so, and
/// only a volume that can travel alone: not a partition of a `disk` pool (never copied,
/// [`partition_refusals`]), in a node-local pool, held by the source, not pinned
/// by `spec.nodeName`, not a copy-on-write overlay (its base would have to travel too, and
/// libvirt would flatten it), no volume built on it, no other Domain using it, and no
/// earlier handover still under way.
pub fn volumes_to_copy(
    dom: &Domain,
    cluster: &Cluster,
    source: &str,
) -> Result<Vec<String>, MoveWait> {
    let local = local_volumes(dom, cluster);
    if local.is_empty() {
        return Ok(local);
    }
    let partitions = partition_refusals(dom, cluster, &local);
    if !partitions.is_empty() {
        return Err(MoveWait::StorageNotCopyable(partitions));
    }
    let allowed = dom
        .spec
        .migration
        .as_ref()
        .is_some_and(|m| m.allow_copy_storage);
    if !allowed {
        return Err(MoveWait::StorageNotShared(local));
    }
    let refusals = copy_refusals(dom, cluster, source, &local);
    if refusals.is_empty() {
        Ok(local)
    } else {
        Err(MoveWait::StorageNotCopyable(refusals))
    }
}

/// `demand` for choosing where `dom` goes when it leaves `source`: the volumes it would
/// copy there no longer tie it to `source`.
pub fn demand_leaving(dom: &Domain, demand: &Demand, cluster: &Cluster, source: &str) -> Demand {
    let mut out = demand.clone();
    if let Ok(copied) = volumes_to_copy(dom, cluster, source) {
        out.volume_nodes.retain(|(v, _)| !copied.contains(v));
    }
    out
}

/// The volumes of `local` that are partitions of a `disk` pool, each with why it cannot
/// travel and what to do. libvirt's copy would make the target's partition under the
/// source's name (`sdb2`), which on the target disk is another number's or another
/// Volume's, and no agent could record it safely: such a move is refused before it starts,
/// copy allowed or not, running or stopped.
fn partition_refusals(dom: &Domain, cluster: &Cluster, local: &[String]) -> Vec<(String, String)> {
    let namespace = dom.namespace().unwrap_or_default();
    local
        .iter()
        .filter_map(|name| {
            let vol = cluster.volumes.get(&(namespace.clone(), name.clone()))?;
            cluster.pool_is_partitioned(&vol.pool).then(|| {
                (
                    name.clone(),
                    format!(
                        "is a partition of disk pool {}, which a move cannot take along: keep the domain on its node (set spec.nodeName back), or copy the data into a Volume of a dir, fs, netfs or logical pool and use that",
                        vol.pool
                    ),
                )
            })
        })
        .collect()
}

/// Why each of `local` (volumes of `dom` in node-local pools) cannot be copied away from
/// `source` (see [`volumes_to_copy`]).
fn copy_refusals(
    dom: &Domain,
    cluster: &Cluster,
    source: &str,
    local: &[String],
) -> Vec<(String, String)> {
    let namespace = dom.namespace().unwrap_or_default();
    let me = dom.name_any();
    let live = mode_of(dom.status.as_ref()) == MigrationMode::Live;
    let mut out = Vec::new();
    for name in local {
        let why = match cluster.volumes.get(&(namespace.clone(), name.clone())) {
            None => Some("does not exist".to_string()),
            Some(_) if !live => Some(
                "belongs to a stopped domain: libvirt copies disks only while it live-migrates a running guest (start it, or move it while it runs)".to_string(),
            ),
            Some(v) => {
                let others: Vec<&String> = v.users.iter().filter(|u| **u != me).collect();
                if let Some(node) = &v.requested {
                    Some(format!("is pinned to node {node} by its spec.nodeName"))
                } else if v.overlay {
                    Some(format!(
                        "is a copy-on-write overlay on volume {}: its base would have to move too",
                        v.source.as_deref().unwrap_or("?")
                    ))
                } else if !v.derived.is_empty() {
                    Some(format!("has volumes built on it: {}", v.derived.join(", ")))
                } else if !others.is_empty() {
                    Some(format!(
                        "is also used by Domain {}",
                        others
                            .iter()
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                } else if let Some(t) = &v.transfer {
                    Some(format!(
                        "is still being handed over from node {} to node {} ({:?})",
                        t.source_node, t.target_node, t.state
                    ))
                } else if v.holder.as_deref() != Some(source) {
                    Some(format!(
                        "is held by {}, not by the domain's node {source}",
                        v.holder.as_deref().unwrap_or("no node yet")
                    ))
                } else {
                    None
                }
            }
        };
        if let Some(why) = why {
            out.push((name.clone(), why));
        }
    }
    out
}

/// How a move goes: live when the guest runs (or is paused), cold otherwise.
pub fn mode_of(status: Option<&DomainStatus>) -> MigrationMode {
    match status.and_then(|s| s.phase) {
        Some(DomainPhase::Running | DomainPhase::Paused | DomainPhase::Migrating) => {
            MigrationMode::Live
        }
        _ => MigrationMode::Cold,
    }
}

/// `status` with the move approved: a fresh `Pending` record replaces the previous one.
/// `copied`: the node-local volumes the move copies ([`volumes_to_copy`]).
pub fn approved(
    status: &mut DomainStatus,
    source: &str,
    target: &str,
    reason: &str,
    copied: Vec<String>,
    now: Timestamp,
) {
    let mode = mode_of(Some(status));
    status.migration = Some(MigrationStatus {
        state: Some(MigrationState::Pending),
        source_node: Some(source.to_string()),
        target_node: Some(target.to_string()),
        start_time: Some(Time(now)),
        mode: Some(mode),
        reason: Some(reason.to_string()),
        copied_volumes: copied,
        ..MigrationStatus::default()
    });
}

/// `status` with the pending move ended as `Aborted`, saying why.
pub fn cancelled(status: &mut DomainStatus, why: &str, now: Timestamp) {
    if let Some(m) = status.migration.as_mut() {
        m.state = Some(MigrationState::Aborted);
        m.end_time = Some(Time(now));
        m.message = Some(why.to_string());
        m.progress = None;
    }
}

/// `status` with the claim of fenced node `fenced` reset: `holder` is the new holder (the
/// target of a running migration, which may have the guest) or nobody, and a move under way
/// is recorded as `Aborted`.
pub fn unfenced(status: &mut DomainStatus, fenced: &str, holder: Option<&str>, now: Timestamp) {
    status.node_name = holder.map(str::to_string);
    if let Some(m) = status.migration.as_mut()
        && matches!(
            m.state,
            Some(MigrationState::Pending | MigrationState::Running)
        )
    {
        m.state = Some(MigrationState::Aborted);
        m.end_time = Some(Time(now));
        m.message = Some(format!(
            "node {fenced} was declared fenced while the move was under way"
        ));
        m.progress = None;
    }
    if holder.is_none() {
        // Nothing runs anywhere now: what the fenced node's agent last wrote is history.
        status.phase = Some(DomainPhase::Pending);
        status.id = None;
    }
}

/// The key of a domain in the backoff table: its uid (a domain deleted and created again
/// under the same name starts afresh).
pub fn backoff_key(dom: &Domain) -> String {
    dom.uid().unwrap_or_else(|| super::usage::domain_key(dom))
}

/// How a move ended, as seen in status.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// `Succeeded`, `Failed` or `Aborted`.
    pub state: MigrationState,
    /// Seconds from start to end, when both are recorded.
    pub seconds: Option<f64>,
}

/// One move that failed or was aborted, and how long to wait before approving it again.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    source: String,
    target: String,
    failures: u32,
    until: Timestamp,
}

/// The backoff after failed or aborted moves (in memory: a restarted controller waits
/// `move_backoff` after the last recorded failure, then starts counting again), and the
/// record of which ends were already seen (so each is counted once in the metrics).
#[derive(Debug, Default)]
pub struct Backoff {
    entries: HashMap<String, Entry>,
    /// The last terminal record seen per domain: (state, source, target, end time).
    seen: HashMap<String, (MigrationState, String, String, Option<Timestamp>)>,
}

impl Backoff {
    /// Looks at the domain's move record. A record not seen before that ended `Failed` or
    /// `Aborted` starts (or, for the same move, doubles) the wait; `Succeeded` clears it.
    /// Returns the outcome when the record is new, for the metrics.
    pub fn observe(
        &mut self,
        key: &str,
        record: Option<&MigrationStatus>,
        settings: &Settings,
    ) -> Option<Outcome> {
        let record = record?;
        let state = record.state?;
        if matches!(state, MigrationState::Pending | MigrationState::Running) {
            return None;
        }
        let source = record.source_node.clone().unwrap_or_default();
        let target = record.target_node.clone().unwrap_or_default();
        // Whole seconds: that is what a `Time` keeps once written (a record must not look
        // new because someone wrote it back).
        let end = record
            .end_time
            .as_ref()
            .and_then(|t| Timestamp::from_second(t.0.as_second()).ok());
        let id = (state, source.clone(), target.clone(), end);
        if self.seen.get(key) == Some(&id) {
            return None;
        }
        self.seen.insert(key.to_string(), id);
        let seconds = match (&record.start_time, end) {
            (Some(start), Some(end)) => {
                let d = end.duration_since(start.0);
                (!d.is_negative()).then(|| d.as_secs_f64())
            }
            _ => None,
        };
        if state == MigrationState::Succeeded {
            self.entries.remove(key);
        } else {
            let failures = match self.entries.get(key) {
                Some(e) if e.source == source && e.target == target => e.failures + 1,
                _ => 1,
            };
            let wait = settings
                .move_backoff
                .saturating_mul(1 << (failures - 1).min(16))
                .min(settings.move_backoff_max);
            let from = end.unwrap_or_else(Timestamp::now);
            self.entries.insert(
                key.to_string(),
                Entry {
                    source,
                    target,
                    failures,
                    until: after(from, wait),
                },
            );
        }
        Some(Outcome { state, seconds })
    }

    /// Until when the move `source` → `target` of domain `key` waits, if it does.
    pub fn blocks(
        &self,
        key: &str,
        source: &str,
        target: &str,
        now: Timestamp,
    ) -> Option<Timestamp> {
        self.entries
            .get(key)
            .filter(|e| e.source == source && e.target == target && e.until > now)
            .map(|e| e.until)
    }

    /// The earliest moment a wait ends after `now`.
    pub fn next_expiry(&self, now: Timestamp) -> Option<Timestamp> {
        self.entries
            .values()
            .map(|e| e.until)
            .filter(|u| *u > now)
            .min()
    }

    /// Forgets domains that no longer exist.
    pub fn retain(&mut self, keys: &std::collections::HashSet<String>) {
        self.entries.retain(|k, _| keys.contains(k));
        self.seen.retain(|k, _| keys.contains(k));
    }
}
