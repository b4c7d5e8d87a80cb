//! The Volume controller: reconciles the volumes this node holds.
//!
//! Guarantees:
//! - Only a Volume whose holder is this node is touched: its `status.nodeName`, which the
//!   cluster controller writes when it binds the Volume (with the label
//!   `node.virtkube.io/<node>: holder`). The holder's agent is the only one that creates,
//!   grows or deletes the image; an unbound Volume waits for the controller.
//! - The status is written by compare-and-swap ([`crate::placement::write::write_status`]):
//!   read, compute the whole status keeping the fields others own (`nodeName`, the
//!   controller's `Scheduled` condition), write; on a conflict, read again and recompute.
//! - An image is this Volume's only when its key is the one recorded in the status (or the
//!   status says the agent was making it): an image retained by an earlier Volume of the
//!   same name, or made outside virtkube, is taken over only when the annotation
//!   `virtkube.io/adopt-image` names it ([`super::ownership`]); otherwise `Ready=False`,
//!   reason `NameConflict`, with how to adopt it.
//! - Deleting a Volume follows its `reclaimPolicy`: `Retain` (the default) keeps the image;
//!   `Delete` removes it, but never while anything uses it — a domain on this node whose disk
//!   reads it through any copy-on-write chain (virtkube's or not, running or defined), a
//!   volume built on it, or a Domain or Volume resource that names it or builds on it. The
//!   deletion waits, says who (a `DeletionBlocked` event and `Ready=False`, reason
//!   `VolumeInUse`), and retries. An image in a pool without virtkube's mark, or that is not
//!   this Volume's, is never deleted: the deletion completes and a `Retained` event says so.
//! - A pool that is missing or not running, a shrink, a clone of a missing source: the
//!   volume stays `Ready=False` with the reason, and nothing half-made is left behind.

use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, ListParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::Event as Finalizer;
use kube::{Resource, ResourceExt};
use virtkube_crds::conditions::{self, status as cs};
use virtkube_crds::quantity::ByteQuantity;
use virtkube_crds::validation::Validate;
use virtkube_crds::volume::{TransferState, VolumePhase, VolumeStatus};
use virtkube_crds::{Domain, Volume};
use virtkube_engine::model::VolumeObserved;

use super::context::{Context, FIELD_MANAGER, FINALIZER};
use super::converge::{self, Converged};
use super::error::{Error, Result};
use super::ownership::{self, ImageClaim};
use super::reconcile;
use crate::cluster::volumes::{SourceStep, source_step};
use crate::placement::write::{WriteError, write_status};
use crate::plan::dependents::{self, DomainRefs, ResourceUser, VolumeRefs};

/// The kind label of this controller's metrics.
pub const KIND: &str = "Volume";

/// How often a status write is decided again after losing a compare-and-swap before the
/// reconcile gives up (and is retried with backoff).
const WRITE_ATTEMPTS: usize = 5;

/// The node that holds `vol`: its `status.nodeName`, written by the cluster controller.
pub fn holder(vol: &Volume) -> Option<&str> {
    vol.status.as_ref().and_then(|s| s.node_name.as_deref())
}

/// Whether this node's agent is responsible for `vol`: it holds it.
pub fn concerns(vol: &Volume, ctx: &Context) -> bool {
    holder(vol) == Some(ctx.settings.node.as_str())
}

/// The Volumes in `pool` (to reconcile them when it changes).
pub fn in_pool(
    store: &kube::runtime::reflector::Store<Volume>,
    pool: &virtkube_crds::StoragePool,
) -> Vec<kube::runtime::reflector::ObjectRef<Volume>> {
    let name = pool.name_any();
    store
        .state()
        .into_iter()
        .filter(|v| v.spec.pool == name)
        .map(|v| kube::runtime::reflector::ObjectRef::from_obj(&*v))
        .collect()
}

/// The Volumes made from `source` (clones and overlays), to reconcile them when it changes.
pub fn copies_of(
    store: &kube::runtime::reflector::Store<Volume>,
    source: &Volume,
) -> Vec<kube::runtime::reflector::ObjectRef<Volume>> {
    let (ns, name) = (source.namespace(), source.name_any());
    store
        .state()
        .into_iter()
        .filter(|v| v.namespace() == ns)
        .filter(|v| {
            v.spec.source.as_ref().and_then(|s| s.referenced_volume()) == Some(name.as_str())
        })
        .map(|v| kube::runtime::reflector::ObjectRef::from_obj(&*v))
        .collect()
}

/// The reconciler the Controller runs for each Volume.
pub async fn reconcile(vol: Arc<Volume>, ctx: Arc<Context>) -> Result<Action> {
    if !concerns(&vol, &ctx) {
        return Ok(Action::await_change());
    }
    let _timer = ctx.metrics.reconcile_started(KIND);
    let ns = vol
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let api: Api<Volume> = Api::namespaced(ctx.client.clone(), &ns);
    let span =
        tracing::info_span!("reconcile", kind = KIND, namespace = %ns, name = %vol.name_any());
    let (ctx_ref, api_ref) = (&*ctx, &api);
    reconcile::finalized(&ctx, KIND, &api, FINALIZER, vol, span, |event| async move {
        match event {
            Finalizer::Apply(vol) => apply(&vol, ctx_ref, api_ref).await,
            Finalizer::Cleanup(vol) => cleanup(&vol, ctx_ref, api_ref).await,
        }
    })
    .await
}

/// Why a reconcile did not reach `Available`: the condition's reason and message, and
/// whether the spec itself is at fault.
struct Problem {
    reason: &'static str,
    message: String,
    spec_valid: bool,
}

impl Problem {
    fn of(error: &Error) -> Self {
        let (reason, message) = error.reason_and_message();
        Problem {
            reason,
            message,
            // What the pool's type cannot hold (a qcow2 image in an LVM pool): only a
            // change of the spec helps.
            spec_valid: reason != "Unsupported",
        }
    }
}

async fn apply(vol: &Volume, ctx: &Context, api: &Api<Volume>) -> Result<Action> {
    let invalid = vol.spec.validate();
    if !invalid.is_empty() {
        let problem = Problem {
            reason: "InvalidSpec",
            message: invalid.to_string(),
            spec_valid: false,
        };
        if write(ctx, api, vol, |v| status_for(v, ctx, None, Some(&problem))).await? {
            reconcile::report_failure(ctx, vol, problem.reason, &problem.message).await;
        }
        return Ok(Action::await_change());
    }
    if let Some(action) = hand_over(vol, ctx, api).await? {
        return Ok(action);
    }
    match converge_here(vol, ctx, api).await {
        Ok((
            read,
            Converged {
                changes, observed, ..
            },
        )) => {
            reconcile::report_changes(ctx, &read, &changes).await;
            write(ctx, api, &read, |v| {
                status_for(v, ctx, observed.as_ref(), None)
            })
            .await?;
            Ok(Action::requeue(ctx.settings.resync))
        }
        Err((read, error)) => {
            let problem = Problem::of(&error);
            if write(ctx, api, &read, |v| {
                status_for(v, ctx, None, Some(&problem))
            })
            .await?
            {
                reconcile::report_failure(ctx, &read, problem.reason, &problem.message).await;
            }
            Err(error)
        }
    }
}

/// Observes the pool and the image, decides whose the image is, records `Creating` before
/// asking libvirt for a new image, and converges. Returns the Volume as last read (a status
/// write in between changes it) with the outcome.
async fn converge_here(
    vol: &Volume,
    ctx: &Context,
    api: &Api<Volume>,
) -> std::result::Result<(Volume, Converged<VolumeObserved>), (Volume, Error)> {
    let here = match converge::observe_volume(ctx, vol).await {
        Ok(here) => here,
        Err(e) => return Err((vol.clone(), e)),
    };
    let mut read = vol.clone();
    let ours = match ownership::claim(vol, here.image.as_ref()) {
        ImageClaim::Ours => true,
        ImageClaim::Adopt => {
            if let Some(image) = &here.image {
                let note = format!(
                    "adopted the existing image {} ({}) as annotation {} asks",
                    here.name,
                    image.path,
                    virtkube_crds::volume::ADOPT_IMAGE_ANNOTATION
                );
                ctx.event(vol, false, "Adopted", "Adopt", note).await;
            }
            true
        }
        ImageClaim::MovedHere => {
            // Said once: a reconcile on a cache that does not show the last one's write yet
            // would take the copy over again and say so twice; the API server knows.
            let fresh = match api.get_opt(&vol.name_any()).await {
                Ok(fresh) => fresh,
                Err(e) => return Err((vol.clone(), e.into())),
            };
            let still = fresh.as_ref().is_some_and(|f| {
                matches!(
                    ownership::claim(f, here.image.as_ref()),
                    ImageClaim::MovedHere
                )
            });
            if still && let Some(image) = &here.image {
                let note = format!(
                    "took over the copy {} ({}) made on this node by its Domain's live migration",
                    here.name, image.path
                );
                ctx.event(vol, false, "MovedHere", "Move", note).await;
            }
            true
        }
        ImageClaim::Absent if vol.status.as_ref().is_some_and(|s| s.transfer.is_some()) => {
            return Err((
                read,
                Error::Unrealizable {
                    reason: "ImageMissing",
                    message: format!(
                        "the image {} is missing from pool {} while the volume is handed over to another node: nothing is made in its place",
                        converge::volume_host_name(vol),
                        vol.spec.pool
                    ),
                },
            ));
        }
        ImageClaim::Absent => {
            // Recorded before libvirt is asked: an image found under this name after a crash
            // is then known to be the one this Volume made.
            let creating = vol.status.as_ref().and_then(|s| s.phase) == Some(VolumePhase::Creating);
            if !creating {
                match write_creating(ctx, api, vol, &here.name).await {
                    Ok(Some(written)) => read = written,
                    // Not ours any more, or gone: nothing to make.
                    Ok(None) => {
                        return Err((
                            vol.clone(),
                            Error::Unrealizable {
                                reason: "Converging",
                                message:
                                    "the Volume changed while it was being created: deciding again"
                                        .into(),
                            },
                        ));
                    }
                    Err(e) => return Err((vol.clone(), e)),
                }
            }
            false
        }
        ImageClaim::Refused(message) => {
            return Err((
                read,
                Error::Unrealizable {
                    reason: "NameConflict",
                    message,
                },
            ));
        }
    };
    match converge::volume(ctx, &read, here, ours).await {
        Ok(done) => Ok((read, done)),
        Err(e) => Err((read, e)),
    }
}

/// Records `phase: Creating` and the libvirt name `name` about to be made (keeping everything
/// else) and returns the Volume as written; `None` when this node no longer holds it.
async fn write_creating(
    ctx: &Context,
    api: &Api<Volume>,
    vol: &Volume,
    name: &str,
) -> Result<Option<Volume>> {
    let mut read = vol.clone();
    for _ in 0..WRITE_ATTEMPTS {
        if !concerns(&read, ctx) || read.meta().deletion_timestamp.is_some() {
            return Ok(None);
        }
        let mut status = read.status.clone().unwrap_or_default();
        status.phase = Some(VolumePhase::Creating);
        status.volume_name = Some(name.to_string());
        match write_status(api, &read, &status, FIELD_MANAGER).await {
            Ok(written) => {
                count_write(ctx);
                return Ok(Some(written));
            }
            Err(e) if e.is_conflict() => match api.get_opt(&read.name_any()).await? {
                Some(fresh) => read = fresh,
                None => return Ok(None),
            },
            Err(WriteError::Gone { .. }) => return Ok(None),
            Err(e) => return Err(write_error(e)),
        }
    }
    Err(exhausted(&read))
}

/// The source's part of a handover ([`crate::cluster::volumes::Handover`]): once the
/// controller says the copy on the target is the data (`Copied`), remove this node's stale
/// image — only if it is this Volume's (its recorded key) and nothing on this node reads it —
/// then record `SourceRemoved` without the key. While the disk is being copied, or the
/// controller has the next step, nothing here changes. `None`: no handover concerns this
/// node now, reconcile as usual.
async fn hand_over(vol: &Volume, ctx: &Context, api: &Api<Volume>) -> Result<Option<Action>> {
    let transfer = vol.status.as_ref().and_then(|s| s.transfer.clone());
    match source_step(transfer.as_ref(), &ctx.settings.node) {
        // The image here is the data until libvirt completes the migration: reconcile as
        // usual (an image missing meanwhile is never made again: see `converge_here`).
        SourceStep::None | SourceStep::Keep => Ok(None),
        SourceStep::Wait => Ok(Some(Action::await_change())),
        SourceStep::RemoveStale => {
            let Some(t) = transfer else {
                return Ok(None);
            };
            // Deleting data never rests on the watch cache: decide on a fresh read.
            let Some(vol) = api.get_opt(&vol.name_any()).await? else {
                return Ok(Some(Action::await_change()));
            };
            let vol = &vol;
            let fresh = vol.status.as_ref().and_then(|s| s.transfer.as_ref());
            if !concerns(vol, ctx) || fresh != Some(&t) {
                return Ok(Some(Action::requeue(std::time::Duration::from_secs(1))));
            }
            // The Domain runs on the target, on the copy: no resource uses this image.
            let mut stale = vol.clone();
            stale.spec.reclaim_policy = virtkube_crds::volume::ReclaimPolicy::Delete;
            let mut cluster = cluster_view(vol, ctx).await?;
            cluster.users.clear();
            match converge::remove_volume(ctx, &stale, &cluster).await {
                Ok((changes, kept)) => {
                    let note = match kept {
                        Some(why) => format!(
                            "the disk was copied to node {} with Domain {}; the image here is kept: {why}",
                            t.target_node, t.domain
                        ),
                        None if changes.is_empty() => format!(
                            "the disk was copied to node {} with Domain {}; no image was left here",
                            t.target_node, t.domain
                        ),
                        None => format!(
                            "the disk was copied to node {} with Domain {}: the stale image here was removed",
                            t.target_node, t.domain
                        ),
                    };
                    let moved = |v: &Volume| {
                        let mut status = v.status.clone().unwrap_or_default();
                        if let Some(now) = status.transfer.as_mut()
                            && *now == t
                        {
                            now.state = TransferState::SourceRemoved;
                            status.key = None;
                            status.partition = None;
                            status.path = None;
                        }
                        status
                    };
                    if write(ctx, api, vol, moved).await? {
                        ctx.event(vol, false, "SourceRemoved", "Move", note).await;
                    }
                    Ok(Some(Action::await_change()))
                }
                // Something here still reads it (libvirt has not undefined the source copy
                // yet, or another domain uses it): try again shortly.
                Err(Error::VolumeInUse { users }) => {
                    tracing::info!(%users, "stale image of a moved volume still in use here: waiting");
                    Ok(Some(Action::requeue(std::time::Duration::from_secs(2))))
                }
                Err(e) => Err(e),
            }
        }
    }
}

async fn cleanup(vol: &Volume, ctx: &Context, api: &Api<Volume>) -> Result<Action> {
    // A handover under way goes on, and the finalizer stays meanwhile (an `Ok` here would
    // let the Volume go): the Domain it moved with waits for the handover before it may go,
    // and this deletion waits for that Domain.
    if hand_over(vol, ctx, api).await?.is_some() {
        return Err(Error::Unrealizable {
            reason: "HandoverUnderway",
            message: "the volume is being handed over to another node with its Domain: deleted once that is done".into(),
        });
    }
    let cluster = cluster_view(vol, ctx).await?;
    match converge::remove_volume(ctx, vol, &cluster).await {
        Ok((changes, kept)) => {
            for change in changes {
                ctx.event(vol, false, change.reason, "Delete", change.note)
                    .await;
            }
            if let Some(why) = kept {
                ctx.event(vol, false, "Retained", "Delete", why).await;
            }
            Ok(Action::await_change())
        }
        Err(error @ Error::VolumeInUse { .. }) => {
            let problem = Problem::of(&error);
            let blocked = |v: &Volume| {
                let mut status = status_for(v, ctx, None, Some(&problem));
                status.phase = Some(VolumePhase::Released);
                status
            };
            if write(ctx, api, vol, blocked).await? {
                ctx.event(vol, true, "DeletionBlocked", "Delete", problem.message)
                    .await;
            }
            Err(error)
        }
        Err(e) => Err(e),
    }
}

/// The resources that use `vol` (see [`dependents::volume_resource_users`]) and the image
/// keys its namespace's Volumes recorded, read fresh from the API — every Domain and Volume
/// of its namespace, since disks and sources name Volumes of their own namespace only.
async fn cluster_view(vol: &Volume, ctx: &Context) -> Result<converge::ClusterView> {
    let ns = vol
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let domains: Vec<DomainRefs> = Api::<Domain>::namespaced(ctx.client.clone(), &ns)
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(DomainRefs::of)
        .collect();
    let listed = Api::<Volume>::namespaced(ctx.client.clone(), &ns)
        .list(&ListParams::default())
        .await?
        .items;
    let volumes: Vec<VolumeRefs> = listed.iter().map(VolumeRefs::of).collect();
    Ok(converge::ClusterView {
        users: dependents::volume_resource_users(&domains, &volumes, &vol.name_any())
            .into_iter()
            .map(|u| match u {
                ResourceUser::Domain(name) => format!("Domain {ns}/{name}"),
                ResourceUser::Volume(name) => format!("Volume {ns}/{name}"),
            })
            .collect(),
        recorded_keys: listed
            .iter()
            .filter_map(|v| v.status.as_ref().and_then(|s| s.key.clone()))
            .collect(),
    })
}

/// Writes the status `build` computes from the Volume as read, by compare-and-swap, when it
/// differs from the current one: on a conflict the Volume is read again and the status
/// computed again from it, so fields others wrote in between (`nodeName`, the controller's
/// `Scheduled` condition) are kept. Returns whether a write happened; nothing is written once
/// this node no longer holds the Volume.
async fn write(
    ctx: &Context,
    api: &Api<Volume>,
    vol: &Volume,
    build: impl Fn(&Volume) -> VolumeStatus,
) -> Result<bool> {
    let mut read = vol.clone();
    for _ in 0..WRITE_ATTEMPTS {
        if !concerns(&read, ctx) {
            return Ok(false);
        }
        let status = build(&read);
        if read.status.as_ref() == Some(&status) {
            return Ok(false);
        }
        match write_status(api, &read, &status, FIELD_MANAGER).await {
            Ok(_) => {
                count_write(ctx);
                return Ok(true);
            }
            Err(e) if e.is_conflict() => match api.get_opt(&read.name_any()).await? {
                Some(fresh) => read = fresh,
                None => return Ok(false),
            },
            Err(WriteError::Gone { .. }) => return Ok(false),
            Err(e) => return Err(write_error(e)),
        }
    }
    Err(exhausted(&read))
}

fn count_write(ctx: &Context) {
    ctx.metrics
        .status_patches
        .get_or_create(&super::metrics::KindLabels { kind: KIND.into() })
        .inc();
}

/// A status write that failed for another reason than a conflict, as the agent's error.
fn write_error(e: WriteError) -> Error {
    match e {
        WriteError::Kube(e) => Error::Kube(e),
        WriteError::Encode(e) => Error::Serialization(e),
        WriteError::NoVersion { .. } => Error::MissingField("metadata.resourceVersion"),
        other => Error::Unrealizable {
            reason: "Converging",
            message: other.to_string(),
        },
    }
}

/// Every attempt lost a compare-and-swap: retried with backoff.
fn exhausted(vol: &Volume) -> Error {
    Error::Unrealizable {
        reason: "Converging",
        message: format!(
            "Volume {} changed under every one of {WRITE_ATTEMPTS} status writes: retried",
            super::key_of(vol)
        ),
    }
}

/// The Domains of the volume's namespace whose disks name it, sorted (from the Domain
/// reflector; `None` without one).
fn users(vol: &Volume, ctx: &Context) -> Option<Vec<String>> {
    let store = ctx.domains.as_ref()?;
    let (ns, name) = (vol.namespace(), vol.name_any());
    let mut users: Vec<String> = store
        .state()
        .iter()
        .filter(|d| d.namespace() == ns)
        .filter(|d| {
            d.spec
                .disks
                .iter()
                .any(|disk| disk.volume.as_deref() == Some(name.as_str()))
        })
        .map(|d| d.name_any())
        .collect();
    users.sort();
    Some(users)
}

/// The Volumes a Domain's disks name (to refresh their `usedBy` when it changes).
pub fn used_by_domain(
    dom: &virtkube_crds::Domain,
) -> Vec<kube::runtime::reflector::ObjectRef<Volume>> {
    let ns = dom.namespace().unwrap_or_default();
    dom.spec
        .disks
        .iter()
        .filter_map(|d| d.volume.as_deref())
        .map(|v| kube::runtime::reflector::ObjectRef::new(v).within(&ns))
        .collect()
}

/// The status describing `observed` (or a failure) for `vol` as read: the agent's fields
/// computed, every other field (`nodeName`, conditions it does not own such as the
/// controller's `Scheduled`) kept, transition times kept.
fn status_for(
    vol: &Volume,
    ctx: &Context,
    observed: Option<&VolumeObserved>,
    problem: Option<&Problem>,
) -> VolumeStatus {
    let generation = vol.meta().generation;
    let current = vol.status.clone().unwrap_or_default();
    let mut conds: Vec<Condition> = current.conditions.clone();
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let mut set = |t: &str, ok: bool, reason: &str, msg: String| {
        conditions::set_condition(
            &mut conds,
            conditions::condition(
                t,
                if ok { cs::TRUE } else { cs::FALSE },
                reason,
                msg,
                generation,
                now.clone(),
            ),
        );
    };
    let mut status = VolumeStatus {
        node_name: current.node_name.clone(),
        // A disk pool's partition is named by libvirt (`sdb2`): what was made, or recorded.
        volume_name: observed
            .map(|o| o.name.clone())
            .or_else(|| current.volume_name.clone())
            .or_else(|| Some(converge::volume_host_name(vol))),
        observed_generation: generation,
        // Keep what the last successful reconcile recorded while a problem lasts: the key
        // is the record that the image is this Volume's.
        path: current.path.clone(),
        key: current.key.clone(),
        partition: current.partition,
        capacity: current.capacity.clone(),
        allocation: current.allocation.clone(),
        used_by: users(vol, ctx).unwrap_or_else(|| current.used_by.clone()),
        transfer: current.transfer.clone(),
        ..VolumeStatus::default()
    };
    // The copy handed over to this node is recorded as the volume's own below: the handover
    // is over.
    if observed.is_some()
        && problem.is_none()
        && current.transfer.as_ref().is_some_and(|t| {
            t.state == TransferState::SourceRemoved && t.target_node == ctx.settings.node
        })
    {
        status.transfer = None;
    }
    match problem {
        Some(p) if !p.spec_valid => set(conditions::SPEC_VALID, false, p.reason, p.message.clone()),
        _ => set(conditions::SPEC_VALID, true, "Valid", String::new()),
    }
    match (observed, problem) {
        (Some(o), None) => {
            status.phase = Some(VolumePhase::Available);
            status.path = Some(o.path.clone());
            status.key = Some(o.key.clone());
            // A disk pool's partition: where it lies, recorded beside its key (and filled in
            // for a record made without it). None elsewhere (`converge::volume`).
            status.partition = o.extent;
            status.capacity = Some(ByteQuantity::from_bytes(o.capacity));
            status.allocation = Some(ByteQuantity::from_bytes(o.allocation));
            set(
                conditions::READY,
                true,
                "Available",
                format!(
                    "{} in pool {} on node {}",
                    o.path, vol.spec.pool, ctx.settings.node
                ),
            );
        }
        (None, None) => {
            status.phase = Some(VolumePhase::Pending);
            set(
                conditions::READY,
                false,
                "NotCreated",
                "the libvirt volume does not exist".into(),
            );
        }
        (_, Some(p)) => {
            // While the image is being made and its key not recorded yet, `Creating` stays:
            // it is what makes the image found after a failure this Volume's. A name clash
            // (an image that appeared meanwhile) clears it: that image is not ours.
            let creating = current.phase == Some(VolumePhase::Creating)
                && current.key.is_none()
                && p.reason != "NameConflict";
            status.phase = Some(if !p.spec_valid {
                VolumePhase::Failed
            } else if creating {
                VolumePhase::Creating
            } else {
                VolumePhase::Pending
            });
            set(conditions::READY, false, p.reason, p.message.clone());
        }
    }
    status.conditions = conds;
    status
}
