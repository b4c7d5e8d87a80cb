//! The Volume controller: reconciles the volumes placed on this node.
//!
//! Guarantees:
//! - Only volumes whose `spec.nodeName` or `status.nodeName` is this node are touched (and,
//!   with `--claim-unscheduled`, volumes not placed anywhere yet).
//! - Deleting a Volume follows its `reclaimPolicy`: `Retain` (the default) keeps the image;
//!   `Delete` removes it, but never while a domain on this node still uses it — the deletion
//!   waits, says why (a `DeletionBlocked` event and the `Ready` condition), and retries.
//! - A pool that is missing or not running, a shrink, a clone of a missing source: the
//!   volume stays `Ready=False` with the reason, and nothing half-made is left behind.

use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::Event as Finalizer;
use kube::{Resource, ResourceExt};
use serde_json::json;
use virtkube_crds::conditions::{self, status as cs};
use virtkube_crds::quantity::ByteQuantity;
use virtkube_crds::validation::Validate;
use virtkube_crds::volume::{VolumePhase, VolumeStatus};
use virtkube_crds::{API_VERSION, Volume};
use virtkube_engine::model::VolumeObserved;

use super::context::{Context, FIELD_MANAGER, FINALIZER};
use super::converge::{self, Converged};
use super::error::{Error, Result};
use super::reconcile;

/// The kind label of this controller's metrics.
pub const KIND: &str = "Volume";

/// Whether this node's agent is responsible for `vol`.
pub fn concerns(vol: &Volume, ctx: &Context) -> bool {
    let node = ctx.settings.node.as_str();
    let status_node = vol.status.as_ref().and_then(|s| s.node_name.as_deref());
    match (vol.spec.node_name.as_deref(), status_node) {
        // Placed: the node the status names owns it (spec.nodeName is immutable).
        (_, Some(n)) => n == node,
        (Some(n), None) => n == node,
        (None, None) => ctx.settings.claim_unscheduled,
    }
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

async fn apply(vol: &Volume, ctx: &Context, api: &Api<Volume>) -> Result<Action> {
    let invalid = vol.spec.validate();
    if !invalid.is_empty() {
        let status = status_for(
            vol,
            ctx,
            None,
            Some(("InvalidSpec", invalid.to_string())),
            false,
        );
        if write_status(vol, ctx, api, status).await? {
            reconcile::report_failure(ctx, vol, "InvalidSpec", &invalid.to_string()).await;
        }
        return Ok(Action::await_change());
    }
    match converge::volume(ctx, vol).await {
        Ok(Converged {
            changes, observed, ..
        }) => {
            reconcile::report_changes(ctx, vol, &changes).await;
            let status = status_for(vol, ctx, observed.as_ref(), None, true);
            write_status(vol, ctx, api, status).await?;
            Ok(Action::requeue(ctx.settings.resync))
        }
        Err(error) => {
            let (reason, message) = error.reason_and_message();
            let status = status_for(vol, ctx, None, Some((reason, message.clone())), true);
            if write_status(vol, ctx, api, status).await? {
                reconcile::report_failure(ctx, vol, reason, &message).await;
            }
            Err(error)
        }
    }
}

async fn cleanup(vol: &Volume, ctx: &Context, api: &Api<Volume>) -> Result<Action> {
    match converge::remove_volume(ctx, vol).await {
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
            let (reason, message) = error.reason_and_message();
            let mut status = status_for(vol, ctx, None, Some((reason, message.clone())), true);
            status.phase = vol.status.as_ref().and_then(|s| s.phase);
            if write_status(vol, ctx, api, status).await? {
                ctx.event(vol, true, "DeletionBlocked", "Delete", message)
                    .await;
            }
            Err(error)
        }
        Err(e) => Err(e),
    }
}

/// Writes `status` with server-side apply when it differs from the current one.
async fn write_status(
    vol: &Volume,
    ctx: &Context,
    api: &Api<Volume>,
    status: VolumeStatus,
) -> Result<bool> {
    if vol.status.as_ref() == Some(&status) {
        return Ok(false);
    }
    let patch = json!({ "apiVersion": API_VERSION, "kind": KIND, "status": status });
    api.patch_status(
        &vol.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    ctx.metrics
        .status_patches
        .get_or_create(&super::metrics::KindLabels { kind: KIND.into() })
        .inc();
    Ok(true)
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

/// The status describing `observed` (or a failure), keeping transition times.
fn status_for(
    vol: &Volume,
    ctx: &Context,
    observed: Option<&VolumeObserved>,
    problem: Option<(&str, String)>,
    spec_valid: bool,
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
        node_name: Some(ctx.settings.node.clone()),
        volume_name: Some(converge::volume_host_name(vol)),
        observed_generation: generation,
        // Keep what the last successful reconcile recorded while a problem lasts: the key
        // is the proof of ownership the engine asks for.
        path: current.path.clone(),
        key: current.key.clone(),
        capacity: current.capacity.clone(),
        allocation: current.allocation.clone(),
        used_by: users(vol, ctx).unwrap_or_else(|| current.used_by.clone()),
        ..VolumeStatus::default()
    };
    match &problem {
        Some((reason, msg)) if !spec_valid => {
            set(conditions::SPEC_VALID, false, reason, msg.clone())
        }
        _ => set(conditions::SPEC_VALID, true, "Valid", String::new()),
    }
    match (observed, problem) {
        (Some(o), None) => {
            status.phase = Some(VolumePhase::Available);
            status.path = Some(o.path.clone());
            status.key = Some(o.key.clone());
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
        (_, Some((reason, msg))) => {
            status.phase = Some(if spec_valid {
                VolumePhase::Pending
            } else {
                VolumePhase::Failed
            });
            set(conditions::READY, false, reason, msg);
        }
    }
    status.conditions = conds;
    status
}
