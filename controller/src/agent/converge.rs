//! The agent's adapter to the reconcile core: the shared planner ([`crate::plan`]) and the
//! engine adapter that carries out one action ([`crate::host`]).
//!
//! Per reconcile, for one resource:
//! 1. observe through the engine only what that resource touches (its libvirt object and
//!    what it references), into the planner's observed model;
//! 2. plan with the resource alone as the desired state (plus the Volumes a Domain's disks
//!    name, so the planner knows their pools);
//! 3. carry out, in order, the actions on that resource (the other resources have their own
//!    reconciles); the planner's notices about it become conditions.
//!
//! The controllers only see [`Converged`]: the changes made (each becomes an event) and
//! what libvirt reports afterwards (which becomes the status).

use std::path::PathBuf;

use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef as StoreRef;
use virtkube_crds::manifest::{Manifest, Object, Source};
use virtkube_crds::names::host_name;
use virtkube_crds::volume::ReclaimPolicy;
use virtkube_crds::{Domain, Network, StoragePool, Volume};
use virtkube_engine::model::{
    DomainObserved, NetworkObserved, PoolObserved, PoolState, VolumeObserved,
};
use virtkube_engine::{Engine, Owner};

use super::context::Context;
use super::error::{Error, Result};
use super::ownership::{self, ImageClaim};
use super::partition;
use crate::host::{
    HostError, HostSpec, Hosts, domain_from, network_from, observe_node, pool_from, volume_from,
};
use crate::plan::desired::{DesiredState, Nodes};
use crate::plan::observed::{ObservedHost, ObservedState, ObservedVolume};
use crate::plan::{self, NoticeKind, ObjectKind, Op, Plan, PlanOptions};

/// One change made on the host: an event reason (`Defined`, `Started`, …) and a note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// CamelCase reason, as the event shows it.
    pub reason: &'static str,
    /// The event's action: the change in CamelCase (`Start`, `AutostartOff`, `PinVcpu0To1`),
    /// prefixed `Repair` when it undoes drift. Kubernetes' event recorder folds events with
    /// the same reason and action into one series that keeps the first note, so only the
    /// same change repeated is aggregated, never two different ones.
    pub action: String,
    /// What was done and why, with libvirt's words where it gave any.
    pub note: String,
}

/// The result of converging one object.
#[derive(Debug, Clone)]
pub struct Converged<O> {
    /// What was changed, in order; empty in steady state.
    pub changes: Vec<Change>,
    /// What libvirt reports after the changes (`None`: the object does not exist).
    pub observed: Option<O>,
    /// Spec changes that wait for the guest to stop (field paths).
    pub pending: Vec<String>,
    /// Where the object is now, when it moved to another node (a migration).
    pub moved_to: Option<String>,
}

/// The ownership mark of a resource, as the engine compares it (kind and UID).
pub fn owner_of<K: kube::Resource<DynamicType = ()>>(obj: &K) -> Result<Owner> {
    let meta = obj.meta();
    let uid = meta
        .uid
        .as_deref()
        .ok_or(Error::MissingField("metadata.uid"))?;
    let name = meta
        .name
        .as_deref()
        .ok_or(Error::MissingField("metadata.name"))?;
    let mut owner = Owner::new(K::kind(&()), uid, meta.namespace.as_deref(), name);
    owner.generation = meta.generation;
    Ok(owner)
}

/// The libvirt name of a domain resource.
pub fn domain_host_name(dom: &Domain) -> String {
    host_name(dom.namespace().as_deref(), &dom.name_any())
}

/// The libvirt name of a volume resource (inside its pool).
pub fn volume_host_name(vol: &Volume) -> String {
    host_name(vol.namespace().as_deref(), &vol.name_any())
}

fn manifest(object: Object) -> Manifest {
    let origin = format!("{} {}", object.kind(), object.display_name());
    Manifest {
        source: Source {
            file: PathBuf::from(origin),
            document: 1,
        },
        object,
    }
}

/// The event action for a planned operation's verb (see [`Change::action`]).
pub fn action_of(verb: &str, drift: bool) -> String {
    let camel: String = verb
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| {
            let mut cs = w.chars();
            cs.next()
                .map(|f| f.to_ascii_uppercase().to_string() + cs.as_str())
                .unwrap_or_default()
        })
        .collect();
    let mut action = if drift {
        format!("Repair{camel}")
    } else {
        camel
    };
    // The API server refuses actions over 128 characters.
    action.truncate(128);
    action
}

/// The event reason of a planned operation.
fn reason_of(op: &Op) -> &'static str {
    match op {
        Op::DefinePool(_) | Op::DefineNetwork(_) | Op::DefineDomain { .. } => "Defined",
        Op::BuildPool { .. } => "Built",
        Op::StartPool | Op::StartNetwork | Op::StartDomain { .. } => "Started",
        Op::SetPoolAutostart(_) | Op::SetNetworkAutostart(_) | Op::SetDomainAutostart(_) => {
            "AutostartSet"
        }
        Op::DeletePool | Op::DeleteNetwork | Op::DeleteDomain => "Deleted",
        Op::CreateVolume { .. } => "VolumeCreated",
        Op::ResizeVolume { .. } => "VolumeResized",
        Op::DeleteVolume { .. } => "VolumeDeleted",
        Op::StopDomain => "Stopped",
        Op::SuspendDomain => "Paused",
        Op::ResumeDomain => "Resumed",
        Op::SetVcpus(_) => "VcpusSet",
        Op::UpdateNetwork(_) => "NetworkUpdated",
        Op::SetMemory(_) => "MemorySet",
        Op::PinVcpu { .. } | Op::PinEmulator(_) => "Pinned",
        Op::SetCpuTune(_) => "CpuSchedulingSet",
        Op::AttachDisk(_) | Op::AttachInterface(_) | Op::AttachHostDevice(_) => "DevicePlugged",
        Op::DetachDisk { .. } | Op::DetachInterface { .. } | Op::DetachHostDevice { .. } => {
            "DeviceUnplugged"
        }
        Op::RestartDomain { .. } => "Restarted",
        Op::MigrateDomain { .. } => "Migrated",
    }
}

/// A host error as the agent reports it: libvirt refusing a change is a spec that cannot be
/// realized here (`Ready=False` with libvirt's words, retried with backoff); connection
/// trouble and timeouts stay engine errors.
fn host_error(e: HostError) -> Error {
    match e {
        HostError::Engine { source, .. }
            if source.is_connection_error() || source.is_retryable() =>
        {
            Error::Engine(*source)
        }
        HostError::Engine { source, .. } if source.is_not_owned() => Error::Unrealizable {
            reason: "NotOwned",
            message: source.to_string(),
        },
        // Something of the same name appeared between the look and the creation: a clash,
        // never taken over.
        HostError::Engine { source, .. } if source.is_already_exists() => Error::Unrealizable {
            reason: "NameConflict",
            message: source.to_string(),
        },
        HostError::Engine { source, .. } => Error::Unrealizable {
            reason: "LibvirtRefused",
            message: source.to_string(),
        },
        other => Error::Unrealizable {
            reason: "Invalid",
            message: other.to_string(),
        },
    }
}

/// Runs the plan's actions on (`kind`, `name`) in order. Error notices about it stop before
/// any action; restart-pending notices come back as field paths. `drift`: the spec has not
/// changed since the last reconcile that succeeded, so whatever must be done repairs a change
/// made behind virtkube's back (a `virsh destroy`, a crash, a `virsh vcpupin`); those changes
/// get the event action `Repair`.
async fn execute(
    hosts: &Hosts,
    plan: &Plan,
    kind: ObjectKind,
    name: &str,
    drift: bool,
) -> Result<(Vec<Change>, Vec<String>)> {
    let mine = |k: ObjectKind, n: &str| k == kind && n == name;
    if let Some(n) = plan
        .notices
        .iter()
        .find(|n| mine(n.object.kind, &n.object.name) && n.kind.is_error())
    {
        let reason = match n.kind {
            NoticeKind::Conflict => "NameConflict",
            NoticeKind::Forbidden => "Forbidden",
            NoticeKind::Unsupported => "Unsupported",
            _ => "InvalidReference",
        };
        return Err(Error::Unrealizable {
            reason,
            message: n.message.clone(),
        });
    }
    let pending = plan
        .notices
        .iter()
        .filter(|n| mine(n.object.kind, &n.object.name) && n.kind == NoticeKind::RestartPending)
        .flat_map(|n| n.changes.iter().map(|c| format!("spec.{}", c.field)))
        .collect();
    let mut changes = Vec::new();
    for action in plan
        .actions
        .iter()
        .filter(|a| mine(a.object.kind, &a.object.name))
    {
        let outcome = hosts.run(action).await.map_err(host_error)?;
        let reason = reason_of(&action.op);
        // The planner words deletions for the command line; here the resource was deleted.
        let why = match action.op {
            Op::DeleteDomain | Op::DeleteVolume { .. } | Op::DeleteNetwork | Op::DeletePool => {
                "the resource is being deleted"
            }
            _ => action.reason.as_str(),
        };
        changes.push(Change {
            reason,
            action: action_of(&action.op.verb(), drift),
            note: format!(
                "{} libvirt {} {}: {} ({outcome})",
                action.op.verb(),
                kind.as_str(),
                action.object.name,
                why
            ),
        });
    }
    Ok((changes, pending))
}

/// Adds pool `pool` and, when it runs, its volumes named in `volumes` to `host`.
async fn observe_pool(
    ctx: &Context,
    host: &mut ObservedHost,
    pool: &str,
    volumes: &[String],
) -> Result<Option<PoolObserved>> {
    observe_pool_on(&ctx.engine, host, pool, volumes).await
}

/// [`observe_pool`] through any node's engine.
async fn observe_pool_on(
    engine: &Engine,
    host: &mut ObservedHost,
    pool: &str,
    volumes: &[String],
) -> Result<Option<PoolObserved>> {
    let Some(p) = engine.pool_observe(pool).await? else {
        return Ok(None);
    };
    host.pools.insert(pool.to_string(), pool_from(&p));
    if p.state == PoolState::Running {
        for v in volumes {
            if let Some(o) = engine.volume_observe(pool, v).await? {
                host.volumes
                    .insert((pool.to_string(), v.clone()), volume_from(&o, &p));
            }
        }
    }
    Ok(Some(p))
}

fn observed_state(ctx: &Context, host: ObservedHost) -> ObservedState {
    let mut state = ObservedState::default();
    state.hosts.insert(ctx.settings.node.clone(), host);
    state
}

fn empty_host(ctx: &Context) -> ObservedHost {
    ObservedHost {
        host_cpus: ctx.settings.host_cpus,
        online_cpus: ctx.settings.online_cpus.clone(),
        device_hotplug: crate::host::supports_device_hotplug(ctx.engine.uri()),
        cpu_tune_live: crate::host::supports_live_cpu_tune(ctx.engine.uri()),
        ..ObservedHost::default()
    }
}

/// The Volume `name` in `namespace`, from the reflector (or the API without one).
async fn find_volume(ctx: &Context, namespace: &str, name: &str) -> Result<Option<Volume>> {
    Ok(match &ctx.volumes {
        Some(store) => store
            .get(&StoreRef::new(name).within(namespace))
            .map(|v| (*v).clone()),
        None => {
            kube::Api::<Volume>::namespaced(ctx.client.clone(), namespace)
                .get_opt(name)
                .await?
        }
    })
}

/// The plan for a domain on this node, with what it was planned against.
#[derive(Debug)]
pub struct PlannedDomain {
    /// The planner's actions and notices.
    pub plan: Plan,
    /// The libvirt domain as observed before planning (`None`: absent).
    pub observed: Option<DomainObserved>,
    /// Spec changes that wait for the guest to stop (field paths).
    pub pending: Vec<String>,
    /// The libvirt name.
    pub name: String,
}

impl PlannedDomain {
    /// Whether carrying the plan out would change nothing and report no problem.
    pub fn is_quiet(&self) -> bool {
        let mine =
            |n: &plan::Notice| n.object.kind == ObjectKind::Domain && n.object.name == self.name;
        !self
            .plan
            .actions
            .iter()
            .any(|a| a.object.kind == ObjectKind::Domain && a.object.name == self.name)
            && !self
                .plan
                .notices
                .iter()
                .any(|n| mine(n) && n.kind.is_error())
    }
}

/// Plans the domain on this node against `observed` (what its libvirt has of the domain, as
/// the caller looked at it; `None`: absent), reading the domain's volumes, pools and
/// networks on this node.
pub async fn plan_domain(
    ctx: &Context,
    dom: &Domain,
    observed: Option<DomainObserved>,
) -> Result<PlannedDomain> {
    let name = domain_host_name(dom);
    let ns = dom.namespace().unwrap_or_default();
    let mut host = empty_host(ctx);
    let mut manifests = vec![manifest(Object::Domain(Box::new(placed_here(dom))))];
    // `<namespace>.<name>` → the partition it recorded, for Volumes of `disk` pools.
    let mut partitions = std::collections::BTreeMap::new();
    for disk in &dom.spec.disks {
        if disk.host_path.is_some() && !ctx.settings.allow_host_paths {
            return Err(Error::Unrealizable {
                reason: "HostPathRefused",
                message: format!(
                    "spec.disks[name={}].hostPath: this agent does not allow host paths (an administrator starts it with --allow-host-paths)",
                    disk.name
                ),
            });
        }
        let Some(volume) = &disk.volume else { continue };
        let Some(vol) = find_volume(ctx, &ns, volume).await? else {
            return Err(Error::Unrealizable {
                reason: "VolumeMissing",
                message: format!(
                    "spec.disks[name={}].volume: Volume {ns}/{volume} does not exist",
                    disk.name
                ),
            });
        };
        let pool = observe_pool(ctx, &mut host, &vol.spec.pool, &[]).await?;
        let libvirt_name = match pool.as_ref().filter(|p| p.state == PoolState::Running) {
            Some(p) if p.pool_type == virtkube_engine::model::PoolType::Disk => {
                let partition = recorded_partition(ctx, &vol, &disk.name, p).await?;
                partitions.insert(volume_host_name(&vol), partition.clone());
                partition
            }
            _ => volume_host_name(&vol),
        };
        if let Some(p) = pool.as_ref().filter(|p| p.state == PoolState::Running)
            && let Some(o) = ctx
                .engine
                .volume_observe(&vol.spec.pool, &libvirt_name)
                .await?
        {
            host.volumes.insert(
                (vol.spec.pool.clone(), libvirt_name.clone()),
                volume_from(&o, p),
            );
        }
        if !host
            .volumes
            .contains_key(&(vol.spec.pool.clone(), libvirt_name.clone()))
        {
            return Err(Error::Unrealizable {
                reason: "VolumeNotReady",
                message: format!(
                    "spec.disks[name={}].volume: Volume {ns}/{volume} is not in pool {} on node {} yet",
                    disk.name, vol.spec.pool, ctx.settings.node
                ),
            });
        }
        manifests.push(manifest(Object::Volume(Box::new(vol))));
    }
    for nic in &dom.spec.interfaces {
        if let Some(n) = ctx.engine.network_observe(&nic.network).await? {
            host.networks.insert(nic.network.clone(), network_from(&n));
        }
    }
    if let Some(o) = &observed {
        host.domains.insert(name.clone(), domain_from(o));
    }
    let (mut desired, notices) =
        DesiredState::from_manifests(&manifests, &Nodes::single(&ctx.settings.node));
    if let Some(n) = notices.iter().find(|n| n.object.name == name) {
        return Err(Error::Unrealizable {
            reason: "InvalidSpec",
            message: n.message.clone(),
        });
    }
    name_partitions(&mut desired, &partitions);
    if let Some(want) = desired.domains.iter().find(|d| d.name == name) {
        check_host_devices(ctx, want).await?;
    }
    let plan = plan::plan(
        &desired,
        &observed_state(ctx, host),
        &PlanOptions::default(),
    );
    let pending = plan
        .notices
        .iter()
        .filter(|n| {
            n.object.kind == ObjectKind::Domain
                && n.object.name == name
                && n.kind == NoticeKind::RestartPending
        })
        .flat_map(|n| n.changes.iter().map(|c| format!("spec.{}", c.field)))
        .collect();
    Ok(PlannedDomain {
        plan,
        observed,
        pending,
        name,
    })
}

/// The partition a Domain's disk `disk` on `vol`, a Volume of the `disk` pool `pool`, is:
/// the one the Volume recorded, found on this node by its key ([`partition::for_domain`]).
async fn recorded_partition(
    ctx: &Context,
    vol: &Volume,
    disk: &str,
    pool: &PoolObserved,
) -> Result<String> {
    let display = format!("{}/{}", vol.namespace().unwrap_or_default(), vol.name_any());
    let partitions = ctx.engine.volume_observe_all(&vol.spec.pool).await?;
    let others = other_records(ctx, vol).await?;
    partition::for_domain(
        vol,
        &display,
        &ctx.settings.node,
        &pool.name,
        &partitions,
        &others,
    )
    .map_err(|r| Error::Unrealizable {
        reason: r.reason,
        message: format!("spec.disks[name={disk}].volume: {}", r.message),
    })
}

/// Gives the Volumes of `disk` pools in `desired`, and the Domain disks on them, the libvirt
/// names of their recorded partitions (`partitions`: `<namespace>.<name>` → partition), so
/// that the definition names the partition (`<source pool='…' volume='sdb2'/>`) and the
/// planner compares it with what libvirt reports (pure).
fn name_partitions(
    desired: &mut DesiredState,
    partitions: &std::collections::BTreeMap<String, String>,
) {
    for v in &mut desired.volumes {
        if let Some(p) = partitions.get(&v.name) {
            v.name = p.clone();
        }
    }
    for d in &mut desired.domains {
        for disk in &mut d.disks {
            if let plan::desired::DesiredDiskSource::Volume { volume, .. } = &mut disk.source
                && let Some(p) = partitions.get(volume.as_str())
            {
                *volume = p.clone();
            }
        }
    }
}

/// Refuses a domain whose host devices this node does not have, or another domain of the
/// node lists (the agent plans one domain at a time, so the node's devices and the other
/// domains' are read here, and only for domains with host devices).
async fn check_host_devices(ctx: &Context, want: &plan::desired::DesiredDomain) -> Result<()> {
    if want.host_devices.is_empty() {
        return Ok(());
    }
    // A driver without node devices cannot say: libvirt judges at the start.
    let present = ctx.engine.node_pci_addresses().await.ok().map(|all| {
        all.iter()
            .map(ToString::to_string)
            .collect::<std::collections::BTreeSet<_>>()
    });
    let used = ctx
        .engine
        .node_host_devices_in_use()
        .await?
        .into_iter()
        .map(|(address, domain)| (address.to_string(), domain))
        .collect();
    match plan::host_devices::check(want, &ctx.settings.node, present.as_ref(), &used)
        .into_iter()
        .next()
    {
        Some(problem) => Err(Error::Unrealizable {
            reason: problem.reason(),
            message: problem.to_string(),
        }),
        None => Ok(()),
    }
}

/// `dom` as the planner must see it on this node: placed here. The agent acts on a domain
/// only as the placement protocol allows (as its holder), and there `spec.nodeName` is a
/// request the controller handles, not where the domain is: a request for another node
/// (a move waiting for approval, or one that cannot be approved) must neither fail the
/// holder's converge nor hide the domain from its removal. The planner, written for the
/// CLI where `spec.nodeName` picks the host, refuses a node it does not know and leaves
/// such a domain out of the desired state.
fn placed_here(dom: &Domain) -> Domain {
    let mut here = dom.clone();
    here.spec.node_name = None;
    here
}

/// Brings the domain held by this node to what `dom.spec` asks (moves between nodes are the
/// placement protocol's business, not the planner's: this only ever touches this node).
pub async fn domain(ctx: &Context, dom: &Domain) -> Result<Converged<DomainObserved>> {
    let name = domain_host_name(dom);
    let before = ctx.engine.domain_observe(&name).await?;
    let planned = plan_domain(ctx, dom, before).await?;
    let drift = dom
        .status
        .as_ref()
        .is_some_and(|s| converged_here(&s.conditions, dom.metadata.generation));
    // The libvirt events of the agent's own define and start are expected, not drift.
    let ops = planned
        .plan
        .actions
        .iter()
        .filter(|a| a.object.kind == ObjectKind::Domain && a.object.name == name)
        .map(|a| &a.op);
    ctx.echoes.expect(&name, ops, std::time::Instant::now());
    let executed = execute(&ctx.hosts, &planned.plan, ObjectKind::Domain, &name, drift).await;
    if executed.is_err() {
        // Which of the expected events will come is unknown: take every one as news.
        ctx.echoes.forget(&name);
    }
    let (changes, pending) = executed?;
    // Nothing changed: what was read before planning is still what libvirt has (one call
    // per domain per resync).
    let observed = if changes.is_empty() {
        planned.observed
    } else {
        ctx.engine.domain_observe(&name).await?
    };
    Ok(Converged {
        changes,
        observed,
        pending,
        moved_to: None,
    })
}

/// Removes the domain from this node (graceful shutdown, destroy, undefine, through the
/// planner's delete plan). A domain that is already gone, or that is not virtkube's for this
/// resource, is left alone and counts as done.
pub async fn remove_domain(ctx: &Context, dom: &Domain) -> Result<Vec<Change>> {
    let name = domain_host_name(dom);
    let mut host = empty_host(ctx);
    let Some(o) = ctx.engine.domain_observe(&name).await? else {
        return Ok(Vec::new());
    };
    let active = o.state.is_active();
    host.domains.insert(name.clone(), domain_from(&o));
    let plan = plan_removal(ctx, Object::Domain(Box::new(placed_here(dom))), host);
    // The removal ends inside this reconcile, which goes on to the next step itself: the
    // guest's stop and undefine coming back from libvirt are not news. (Only when virtkube
    // removes it: a domain that is not this resource's is refused before any call.)
    let removes = plan.actions.iter().any(|a| {
        a.object.kind == ObjectKind::Domain
            && a.object.name == name
            && matches!(a.op, Op::DeleteDomain)
    });
    if removes {
        ctx.echoes.expect_events(
            &name,
            super::echoes::removal_events(active),
            std::time::Instant::now(),
        );
    }
    let executed = execute(&ctx.hosts, &plan, ObjectKind::Domain, &name, false).await;
    if executed.is_err() && removes {
        // Which of the expected events will come is unknown: take every one as news.
        ctx.echoes.forget(&name);
    }
    match executed {
        Ok((changes, _)) => Ok(changes),
        // Not ours: never touched, and nothing of ours is left.
        Err(Error::Unrealizable {
            reason: "NameConflict",
            message,
        }) => {
            tracing::info!(domain = %name, %message, "libvirt domain is not this resource's: left alone");
            Ok(Vec::new())
        }
        Err(e) => Err(e),
    }
}

/// What this node's libvirt has for a Volume: its pool (running), the volume it is made
/// from (when it has a source) and its own image, if any.
pub struct VolumeHere {
    host: ObservedHost,
    /// The libvirt name of the Volume's image: `<namespace>.<name>`, or in a `disk` pool the
    /// partition [`partition::choose`] gives.
    pub name: String,
    /// In a `disk` pool, the partition a clone copies (its source Volume's recorded one).
    pub source_name: Option<String>,
    /// The image under that name in its pool.
    pub image: Option<ObservedVolume>,
}

/// Looks at the Volume's pool, source and image on this node. A pool that is missing or not
/// running is `Ready=False` (`PoolMissing`, `PoolNotRunning`); in a `disk` pool so is a
/// Volume with no partition to work on ([`partition::Refusal`]: `PartitionMissing`,
/// `PartitionReplaced`, `PartitionTableFull`, `PartitionRecordedTwice`,
/// `PartitionNumberRecorded`, …).
pub async fn observe_volume(ctx: &Context, vol: &Volume) -> Result<VolumeHere> {
    let ns = vol.namespace().unwrap_or_default();
    let mut host = empty_host(ctx);
    let pool = observe_pool(ctx, &mut host, &vol.spec.pool, &[]).await?;
    let pool = match pool {
        None => {
            return Err(Error::Unrealizable {
                reason: "PoolMissing",
                message: format!(
                    "spec.pool: StoragePool {} does not exist on node {}",
                    vol.spec.pool, ctx.settings.node
                ),
            });
        }
        Some(p) if p.state != PoolState::Running => {
            return Err(Error::Unrealizable {
                reason: "PoolNotRunning",
                message: format!(
                    "spec.pool: StoragePool {} is {:?} on node {}",
                    vol.spec.pool, p.state, ctx.settings.node
                ),
            });
        }
        Some(p) => p,
    };
    let (name, source_name) = image_names(ctx, vol, &pool).await?;
    let mut names = vec![name.clone()];
    if let Some(src) = vol.spec.source.as_ref().and_then(|s| s.referenced_volume()) {
        names.push(
            source_name
                .clone()
                .unwrap_or_else(|| host_name(Some(&ns), src)),
        );
    }
    for v in &names {
        if let Some(o) = ctx.engine.volume_observe(&vol.spec.pool, v).await? {
            host.volumes
                .insert((vol.spec.pool.clone(), v.clone()), volume_from(&o, &pool));
        }
    }
    let image = host
        .volumes
        .get(&(vol.spec.pool.clone(), name.clone()))
        .cloned();
    Ok(VolumeHere {
        host,
        name,
        source_name,
        image,
    })
}

/// The libvirt names of `vol`'s image in `pool` and, for a clone in a `disk` pool, of the
/// partition it copies: `<namespace>.<name>` (and no source name: the manifest's), except
/// in a `disk` pool, where libvirt names partitions itself ([`partition`]).
async fn image_names(
    ctx: &Context,
    vol: &Volume,
    pool: &PoolObserved,
) -> Result<(String, Option<String>)> {
    if pool.pool_type != virtkube_engine::model::PoolType::Disk {
        return Ok((volume_host_name(vol), None));
    }
    let refused = |r: partition::Refusal| Error::Unrealizable {
        reason: r.reason,
        message: r.message,
    };
    let partitions = ctx.engine.volume_observe_all(&vol.spec.pool).await?;
    let device = pool.source.devices.first().map_or("", String::as_str);
    let format = pool.source.format.as_deref().unwrap_or("gpt");
    let chosen =
        partition::choose(vol, &vol.spec.pool, device, format, &partitions).map_err(refused)?;
    let others = other_records(ctx, vol).await?;
    let found = partition::chosen_partition(&chosen, &partitions);
    if let Some(r) = partition::conflict(&chosen, found, &others) {
        return Err(refused(r));
    }
    if let partition::Partition::Next(next) = &chosen {
        let mut recorded: Vec<partition::Record> =
            others.iter().map(partition::OtherRecord::record).collect();
        recorded.extend(partition::record_of(vol));
        let left = partition::unrecorded(&partitions, &recorded);
        if !left.is_empty() {
            tracing::warn!(pool = %vol.spec.pool, partitions = %left.join(", "), next = %next, "disk pool holds partitions no Volume recorded: left alone");
        }
    }
    let name = chosen.name().to_string();
    let ns = vol.namespace().unwrap_or_default();
    let source = match vol.spec.source.as_ref().and_then(|s| s.volume.as_deref()) {
        None => None,
        Some(src) => {
            let display = format!("{ns}/{src}");
            let Some(source) = find_volume(ctx, &ns, src).await? else {
                return Err(Error::Unrealizable {
                    reason: "SourceNotReady",
                    message: format!("spec.source.volume: Volume {display} does not exist"),
                });
            };
            Some(
                partition::source_of(&source, &display, &vol.spec.pool, &partitions)
                    .map_err(refused)?,
            )
        }
    };
    Ok((name, source))
}

/// What the other Volumes held by this node recorded in `vol`'s pool (from the reflector,
/// or the API without one).
async fn other_records(ctx: &Context, vol: &Volume) -> Result<Vec<partition::OtherRecord>> {
    let all = every_volume(ctx).await?;
    let node = ctx.settings.node.as_str();
    Ok(all
        .into_iter()
        .filter(|v| v.spec.pool == vol.spec.pool && v.metadata.uid != vol.metadata.uid)
        .filter_map(|v| {
            let status = v.status.as_ref()?;
            (status.node_name.as_deref() == Some(node)).then_some(())?;
            Some(partition::OtherRecord {
                volume: format!("{}/{}", v.namespace().unwrap_or_default(), v.name_any()),
                key: status.key.clone()?,
                extent: status.partition,
                name: status.volume_name.clone(),
            })
        })
        .collect())
}

/// Every Volume, from the reflector (or the API without one).
async fn every_volume(ctx: &Context) -> Result<Vec<Volume>> {
    Ok(match &ctx.volumes {
        Some(store) => store.state().iter().map(|v| (**v).clone()).collect(),
        None => {
            kube::Api::<Volume>::all(ctx.client.clone())
                .list(&kube::api::ListParams::default())
                .await?
                .items
        }
    })
}

/// The partitions of `pool` (a running `disk` pool on this node) that no Volume held by
/// this node recorded ([`partition::unrecorded_summary`]); `None` for any other pool.
pub async fn unrecorded_partitions(
    ctx: &Context,
    pool: &PoolObserved,
) -> Result<Option<virtkube_crds::storage_pool::UnrecordedPartitions>> {
    if pool.pool_type != virtkube_engine::model::PoolType::Disk || pool.state != PoolState::Running
    {
        return Ok(None);
    }
    let partitions = ctx.engine.volume_observe_all(&pool.name).await?;
    let volumes = every_volume(ctx).await?;
    Ok(partition::unrecorded_summary(
        &partitions,
        &volumes,
        &pool.name,
        &ctx.settings.node,
    ))
}

/// The libvirt name a deletion of `vol` works on: the partition it recorded in a `disk`
/// pool (`None`: it recorded none, so none is its), else `<namespace>.<name>`.
fn recorded_image_name(vol: &Volume, pool_type: &str) -> Option<String> {
    if pool_type != "disk" {
        return Some(volume_host_name(vol));
    }
    let status = vol.status.as_ref()?;
    status.key.as_ref()?;
    status.volume_name.clone()
}

/// Brings the volume on this node to what `vol.spec` asks, from what [`observe_volume`]
/// found. `ours`: the image found there is this Volume's (see [`ownership`]); an image that is
/// not is never grown or otherwise changed.
pub async fn volume(
    ctx: &Context,
    vol: &Volume,
    here: VolumeHere,
    ours: bool,
) -> Result<Converged<VolumeObserved>> {
    let name = here.name;
    let mut host = here.host;
    if let Some(image) = host.volumes.get_mut(&(vol.spec.pool.clone(), name.clone())) {
        image.owned = ours;
    }
    let partitioned = host
        .pools
        .get(&vol.spec.pool)
        .is_some_and(|p| p.pool_type == virtkube_engine::model::PoolType::Disk.as_str());
    let named = VolumeNames {
        image: &name,
        clone_source: here.source_name.as_deref(),
    };
    let plan = plan_with(
        ctx,
        Object::Volume(Box::new(vol.clone())),
        host,
        Some(named),
    )?;
    let drift = vol
        .status
        .as_ref()
        .is_some_and(|s| converged_here(&s.conditions, vol.metadata.generation));
    let (changes, pending) = execute(&ctx.hosts, &plan, ObjectKind::Volume, &name, drift).await?;
    let mut observed = ctx.engine.volume_observe(&vol.spec.pool, &name).await?;
    if !partitioned && let Some(o) = observed.as_mut() {
        // Only a partition is known by its extent (`status.partition`): a logical volume's
        // segments change as it grows or is moved (`pvmove`), and a file has none.
        o.extent = None;
    }
    Ok(Converged {
        changes,
        observed,
        pending,
        moved_to: None,
    })
}

/// What the cluster says about a Volume being deleted: the resources that use it (already
/// described for people), and the keys of the images the Volumes of its namespace recorded
/// (the other images on the node are not virtkube's, whatever their names).
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    /// `Domain ns/name`, `Volume ns/name`.
    pub users: Vec<String>,
    /// `status.key` of every Volume of the namespace.
    pub recorded_keys: std::collections::BTreeSet<String>,
}

/// Removes the volume per its reclaim policy, decided against this node's whole observed
/// state (every pool's volumes, every domain: [`crate::plan::dependents`]) through the
/// planner's delete plan, and against `cluster` (the resources that use it). The image is deleted only if it is this Volume's ([`ownership`]), its policy
/// is `Delete`, its pool is virtkube's, and nothing uses it — no domain whose disk reads it
/// through any chain, no volume built on it, no resource in `cluster.users`; otherwise the
/// deletion waits ([`Error::VolumeInUse`], naming every user) or keeps the image. Returns the
/// changes and, when the image is kept, why.
pub async fn remove_volume(
    ctx: &Context,
    vol: &Volume,
    cluster: &ClusterView,
) -> Result<(Vec<Change>, Option<String>)> {
    let mut observed = observe_this_node(ctx).await?;
    let Some(host) = observed.hosts.get_mut(&ctx.settings.node) else {
        return Ok((Vec::new(), None));
    };
    let pool_type = host
        .pools
        .get(&vol.spec.pool)
        .map(|p| p.pool_type.clone())
        .unwrap_or_default();
    // A Volume that recorded no partition of a disk pool has none there.
    let Some(name) = recorded_image_name(vol, &pool_type) else {
        return Ok((Vec::new(), None));
    };
    match host.pools.get(&vol.spec.pool) {
        // No pool here: nothing of the volume can be left on this node.
        None => return Ok((Vec::new(), None)),
        // A stopped pool hides its volumes: deciding now could leak an image that
        // `reclaimPolicy: Delete` says to remove. Wait for the pool (unless it is not
        // virtkube's: nothing is ever deleted from such a pool).
        Some(p)
            if !p.active
                && p.owner.is_some()
                && vol.spec.reclaim_policy == ReclaimPolicy::Delete =>
        {
            return Err(Error::Unrealizable {
                reason: "PoolNotRunning",
                message: format!(
                    "pool {} is not running on node {}: the volume is deleted once the pool runs",
                    vol.spec.pool, ctx.settings.node
                ),
            });
        }
        Some(_) => {}
    }
    // Which images are virtkube's: those a Volume recorded (this only names the users).
    for v in host.volumes.values_mut() {
        v.owned = cluster.recorded_keys.contains(&v.key);
    }
    let key = (vol.spec.pool.clone(), name.clone());
    let Some(image) = host.volumes.get_mut(&key) else {
        return Ok((Vec::new(), None));
    };
    if pool_type == virtkube_engine::model::PoolType::Disk.as_str()
        && let Some(found) = ctx.engine.volume_observe(&vol.spec.pool, &name).await?
        && let Err(replaced) = partition::check_identity(vol, &vol.spec.pool, &found)
    {
        // Someone else's partition under the recorded number: never deleted for this one.
        return Ok((Vec::new(), Some(replaced.message)));
    }
    match ownership::claim(vol, Some(image)) {
        ImageClaim::Ours | ImageClaim::MovedHere => image.owned = true,
        _ => {
            return Ok((
                Vec::new(),
                Some(format!(
                    "the image {} in pool {} ({}) was not made for this Volume (no key of it recorded): left alone",
                    name, vol.spec.pool, image.path
                )),
            ));
        }
    }
    let plan = plan_removal_named(
        ctx,
        Object::Volume(Box::new(vol.clone())),
        &observed,
        Some(&name),
    );
    let about_me = |n: &&plan::Notice| n.object.kind == ObjectKind::Volume && n.object.name == name;
    let kept = plan
        .notices
        .iter()
        .filter(about_me)
        .find(|n| n.kind == NoticeKind::Retained)
        .map(|n| n.message.clone());
    if kept.is_some() {
        return Ok((Vec::new(), kept));
    }
    let mut users: Vec<String> = cluster.users.clone();
    if let Some(n) = plan
        .notices
        .iter()
        .filter(about_me)
        .find(|n| n.kind == NoticeKind::Blocked)
    {
        users.extend(n.users.iter().cloned());
    }
    if !users.is_empty() {
        let mut seen = std::collections::BTreeSet::new();
        users.retain(|u| seen.insert(u.clone()));
        return Err(Error::VolumeInUse {
            users: users.join(", "),
        });
    }
    let (changes, _) = execute(&ctx.hosts, &plan, ObjectKind::Volume, &name, false).await?;
    Ok((changes, None))
}

/// Brings this node's copy of the network to what `net.spec` asks.
pub async fn network(ctx: &Context, net: &Network) -> Result<Converged<NetworkObserved>> {
    let name = net.name_any();
    let mut host = empty_host(ctx);
    if let Some(n) = ctx.engine.network_observe(&name).await? {
        host.networks.insert(name.clone(), network_from(&n));
    }
    let plan = plan_alone(ctx, Object::Network(Box::new(net.clone())), host)?;
    let drift = net.status.as_ref().is_some_and(|s| {
        converged_here(&s.conditions, net.metadata.generation)
            && s.nodes
                .iter()
                .any(|n| n.node_name == ctx.settings.node && n.message.is_none())
    });
    let (changes, pending) = execute(&ctx.hosts, &plan, ObjectKind::Network, &name, drift).await?;
    let observed = ctx.engine.network_observe(&name).await?;
    Ok(Converged {
        changes,
        observed,
        pending,
        moved_to: None,
    })
}

/// Removes this node's copy of the network (stop, undefine), if it is virtkube's for this
/// resource, unless a domain on this node has an interface on it — virtkube's or not,
/// running or only defined (the whole node is observed: [`crate::plan::dependents`]); then
/// nothing is touched and the error (`NetworkInUse`) names them.
pub async fn remove_network(ctx: &Context, net: &Network) -> Result<Vec<Change>> {
    let name = net.name_any();
    if ctx.engine.network_observe(&name).await?.is_none() {
        return Ok(Vec::new());
    }
    let observed = observe_this_node(ctx).await?;
    let plan = plan_removal_in(ctx, Object::Network(Box::new(net.clone())), &observed);
    if let Some(users) = blocked(&plan, ObjectKind::Network, &name) {
        return Err(Error::Unrealizable {
            reason: "NetworkInUse",
            message: format!(
                "network {name} is still used on node {} by {users}: it is removed once they are gone",
                ctx.settings.node
            ),
        });
    }
    not_mine_is_done(execute(&ctx.hosts, &plan, ObjectKind::Network, &name, false).await)
}

/// Everything this node's libvirt holds (every pool and its volumes, every network and
/// domain): the view removals are decided against.
async fn observe_this_node(ctx: &Context) -> Result<ObservedState> {
    let host = observe_node(ctx.hosts.get(&ctx.settings.node).map_err(host_error)?)
        .await
        .map_err(host_error)?;
    Ok(observed_state(ctx, host))
}

/// The users a blocked deletion of (`kind`, `name`) waits for, as one phrase.
fn blocked(plan: &Plan, kind: ObjectKind, name: &str) -> Option<String> {
    plan.notices
        .iter()
        .find(|n| n.kind == NoticeKind::Blocked && n.object.kind == kind && n.object.name == name)
        .map(|n| n.users.join(", "))
}

/// Brings this node's copy of the pool to what `pool.spec` asks.
pub async fn pool(ctx: &Context, pool: &StoragePool) -> Result<Converged<PoolObserved>> {
    let name = pool.name_any();
    let mut host = empty_host(ctx);
    observe_pool(ctx, &mut host, &name, &[]).await?;
    let plan = plan_alone(ctx, Object::StoragePool(Box::new(pool.clone())), host)?;
    let drift = pool.status.as_ref().is_some_and(|s| {
        converged_here(&s.conditions, pool.metadata.generation)
            && s.nodes
                .iter()
                .any(|n| n.node_name == ctx.settings.node && n.message.is_none())
    });
    let (changes, pending) =
        execute(&ctx.hosts, &plan, ObjectKind::StoragePool, &name, drift).await?;
    let observed = ctx.engine.pool_observe(&name).await?;
    Ok(Converged {
        changes,
        observed,
        pending,
        moved_to: None,
    })
}

/// Removes this node's copy of the pool (stop, undefine; files stay), if it is virtkube's
/// for this resource, unless a domain on this node has a disk on one of its volumes (libvirt
/// needs the pool to start it); then nothing is touched and the error (`PoolInUse`) names
/// them.
pub async fn remove_pool(ctx: &Context, pool: &StoragePool) -> Result<Vec<Change>> {
    let name = pool.name_any();
    if ctx.engine.pool_observe(&name).await?.is_none() {
        return Ok(Vec::new());
    }
    let observed = observe_this_node(ctx).await?;
    let plan = plan_removal_in(ctx, Object::StoragePool(Box::new(pool.clone())), &observed);
    if let Some(users) = blocked(&plan, ObjectKind::StoragePool, &name) {
        return Err(Error::Unrealizable {
            reason: "PoolInUse",
            message: format!(
                "pool {name} is still used on node {} by {users}: it is removed once they are gone",
                ctx.settings.node
            ),
        });
    }
    not_mine_is_done(execute(&ctx.hosts, &plan, ObjectKind::StoragePool, &name, false).await)
}

/// The plan for `object` alone on this node, against `host`; a manifest the planner
/// cannot take is `InvalidSpec`.
fn plan_alone(ctx: &Context, object: Object, host: ObservedHost) -> Result<Plan> {
    plan_with(ctx, object, host, None)
}

/// The libvirt names a Volume's plan works on when they are not the manifest's (a `disk`
/// pool's partitions).
#[derive(Debug, Clone, Copy)]
struct VolumeNames<'a> {
    /// The Volume's own image.
    image: &'a str,
    /// The partition a clone copies.
    clone_source: Option<&'a str>,
}

/// [`plan_alone`], for a Volume whose images libvirt names as `volume_names` says when given
/// (a `disk` pool's partitions; otherwise the manifest's `<namespace>.<name>` anyway).
fn plan_with(
    ctx: &Context,
    object: Object,
    host: ObservedHost,
    volume_names: Option<VolumeNames>,
) -> Result<Plan> {
    let manifests = vec![manifest(object)];
    let (mut desired, notices) =
        DesiredState::from_manifests(&manifests, &Nodes::single(&ctx.settings.node));
    if let Some(n) = notices.first() {
        return Err(Error::Unrealizable {
            reason: "InvalidSpec",
            message: n.message.clone(),
        });
    }
    if let Some(names) = volume_names {
        for v in &mut desired.volumes {
            v.name = names.image.to_string();
            if let (Some(src), plan::desired::VolumeOrigin::Clone(_)) =
                (names.clone_source, &v.source)
            {
                v.source = plan::desired::VolumeOrigin::Clone(src.to_string());
            }
        }
    }
    Ok(plan::plan(
        &desired,
        &observed_state(ctx, host),
        &PlanOptions::default(),
    ))
}

/// The plan that removes `object` from this node, against `host`.
fn plan_removal(ctx: &Context, object: Object, host: ObservedHost) -> Plan {
    plan_removal_in(ctx, object, &observed_state(ctx, host))
}

/// The plan that removes `object` from this node, against `observed`.
fn plan_removal_in(ctx: &Context, object: Object, observed: &ObservedState) -> Plan {
    plan_removal_named(ctx, object, observed, None)
}

/// [`plan_removal_in`], for a Volume whose image libvirt names `volume_name` when given.
fn plan_removal_named(
    ctx: &Context,
    object: Object,
    observed: &ObservedState,
    volume_name: Option<&str>,
) -> Plan {
    let manifests = vec![manifest(object)];
    let (mut desired, _) =
        DesiredState::from_manifests(&manifests, &Nodes::single(&ctx.settings.node));
    if let Some(name) = volume_name {
        for v in &mut desired.volumes {
            v.name = name.to_string();
        }
    }
    plan::plan_delete(&desired, observed)
}

/// Whether the last reconcile of this very spec succeeded: `Ready=True` written for the
/// current generation. Only then is a needed change a repair of drift (after a failure, or
/// for a new spec, it is the work itself).
fn converged_here(
    conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    generation: Option<i64>,
) -> bool {
    virtkube_crds::conditions::find(conditions, virtkube_crds::conditions::READY).is_some_and(|c| {
        c.status == virtkube_crds::conditions::status::TRUE
            && c.observed_generation.is_some()
            && c.observed_generation == generation
    })
}

fn not_mine_is_done(result: Result<(Vec<Change>, Vec<String>)>) -> Result<Vec<Change>> {
    match result {
        Ok((changes, _)) => Ok(changes),
        Err(Error::Unrealizable {
            reason: "NameConflict",
            message,
        }) => {
            tracing::info!(%message, "libvirt object is not this resource's: left alone");
            Ok(Vec::new())
        }
        Err(e) => Err(e),
    }
}

/// How to reach `target` for a migration, from its `HypervisorNode` (published by its agent).
pub async fn target_spec(ctx: &Context, target: &str) -> Result<HostSpec> {
    let node = kube::Api::<virtkube_crds::HypervisorNode>::all(ctx.client.clone())
        .get_opt(target)
        .await?;
    let unknown = |what: &str| Error::Unrealizable {
        reason: "MigrationTargetUnknown",
        message: format!(
            "spec.nodeName asks for node {target}, whose {what}; its agent publishes it when started with --libvirt-client-uri (and --libvirt-peer-uri, --migration-uri)"
        ),
    };
    let status = node
        .ok_or_else(|| unknown("HypervisorNode does not exist"))?
        .status
        .unwrap_or_default();
    let uri = status.libvirt_uri.ok_or_else(|| {
        unknown("HypervisorNode does not say how to reach its libvirt (status.libvirtUri)")
    })?;
    Ok(HostSpec {
        node: target.to_string(),
        uri,
        p2p_uri: status.libvirt_peer_uri,
        migration_uri: status.migration_uri,
    })
}

#[cfg(test)]
mod tests {
    use super::{DesiredState, Nodes, Object, action_of, manifest, name_partitions};
    use crate::plan::desired::DesiredDiskSource;
    use serde_json::json;

    #[test]
    fn disks_on_disk_pool_volumes_name_the_recorded_partition_and_others_keep_their_names() {
        let object = |v: serde_json::Value| -> Object {
            match v["kind"].as_str() {
                Some("Domain") => Object::Domain(Box::new(serde_json::from_value(v).unwrap())),
                _ => Object::Volume(Box::new(serde_json::from_value(v).unwrap())),
            }
        };
        let volume = |name: &str, pool: &str| {
            object(
                json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Volume",
                "metadata": {"name": name, "namespace": "team", "uid": name},
                "spec": {"pool": pool, "capacity": "10M", "format": "raw"}}),
            )
        };
        let dom = object(
            json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Domain",
            "metadata": {"name": "web", "namespace": "team", "uid": "d"},
            "spec": {"cpu": {"vcpus": 1}, "memory": {"size": "64Mi"},
                     "disks": [{"name": "data", "volume": "data"},
                               {"name": "root", "volume": "root"}]}}),
        );
        let manifests = [dom, volume("data", "disks"), volume("root", "images")]
            .into_iter()
            .map(manifest)
            .collect::<Vec<_>>();
        let (mut desired, notices) =
            DesiredState::from_manifests(&manifests, &Nodes::single("node-a"));
        assert!(notices.is_empty(), "{notices:?}");
        let partitions = [("team.data".to_string(), "sdb2".to_string())].into();
        name_partitions(&mut desired, &partitions);
        let sources: Vec<_> = desired.domains[0]
            .disks
            .iter()
            .map(|d| d.source.clone())
            .collect();
        assert_eq!(
            sources,
            [
                DesiredDiskSource::Volume {
                    volume: "sdb2".into(),
                    pool: Some("disks".into()),
                    format: Some("raw".into()),
                },
                DesiredDiskSource::Volume {
                    volume: "team.root".into(),
                    pool: Some("images".into()),
                    format: Some("raw".into()),
                },
            ]
        );
        let mut names: Vec<_> = desired.volumes.iter().map(|v| v.name.as_str()).collect();
        names.sort();
        assert_eq!(names, ["sdb2", "team.root"]);
    }

    #[test]
    fn actions_name_the_change_and_mark_repairs() {
        assert_eq!(action_of("start", false), "Start");
        assert_eq!(action_of("autostart off", false), "AutostartOff");
        assert_eq!(action_of("pin vCPU 0 to 1", false), "PinVCPU0To1");
        assert_eq!(
            action_of("shut down, destroy, undefine", false),
            "ShutDownDestroyUndefine"
        );
        assert_eq!(action_of("start", true), "RepairStart");
        assert!(action_of(&"x ".repeat(300), false).len() <= 128);
    }
}
