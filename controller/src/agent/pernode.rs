//! Status of cluster-scoped kinds that exist on many nodes (Network, StoragePool): each
//! agent writes only its own entry of `status.nodes` (keyed by `nodeName`) under its own
//! field manager, so agents never remove each other's entries; the `Ready` condition
//! summarizes every entry the agent can see.

use std::future::Future;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use virtkube_crds::API_VERSION;
use virtkube_crds::conditions::{self, status as cs};

use kube::runtime::controller::Action;
use tracing::{Instrument, Span};

use super::context::Context;
use super::converge::Change;
use super::error::Result;

/// One node's entry, whatever the kind.
pub trait NodeEntry: Clone + PartialEq + Serialize {
    /// The node it describes.
    fn node(&self) -> &str;
    /// Whether the object is up on that node; the reason when it is not.
    fn problem(&self) -> Option<String>;
}

/// The `Ready` condition over `entries` (with this node's `mine` replacing its old one).
pub fn ready_over<E: NodeEntry>(
    entries: &[E],
    mine: &E,
    previous: &[Condition],
    generation: Option<i64>,
) -> Vec<Condition> {
    let mut all: Vec<&E> = entries.iter().filter(|e| e.node() != mine.node()).collect();
    all.push(mine);
    all.sort_by(|a, b| a.node().cmp(b.node()));
    let problems: Vec<String> = all
        .iter()
        .filter_map(|e| e.problem().map(|p| format!("{}: {p}", e.node())))
        .collect();
    let mut conds: Vec<Condition> = previous
        .iter()
        .filter(|c| c.type_ == conditions::READY)
        .cloned()
        .collect();
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let nodes: Vec<&str> = all.iter().map(|e| e.node()).collect();
    let condition = if problems.is_empty() {
        conditions::condition(
            conditions::READY,
            cs::TRUE,
            "ActiveOnSelectedNodes",
            format!("active on {}", nodes.join(", ")),
            generation,
            now,
        )
    } else {
        conditions::condition(
            conditions::READY,
            cs::FALSE,
            "NotActiveEverywhere",
            problems.join("; "),
            generation,
            now,
        )
    };
    conditions::set_condition(&mut conds, condition);
    conds
}

/// What a per-node kind's status holds now, as the writer read it.
pub struct Current<'a, E> {
    /// `status.nodes`.
    pub entries: &'a [E],
    /// `status.observedGeneration`.
    pub observed_generation: Option<i64>,
    /// `status.conditions`.
    pub conditions: &'a [Condition],
}

/// Applies this node's entry, the summary condition and `status.observedGeneration` when any
/// of them changed. Returns whether a patch was sent.
///
/// `observedGeneration` is the generation this node acted on. Every node applies it under
/// its own field manager: while all agree the field is shared, and an agent that acts on a
/// newer generation takes it over (`force`), so kstatus and `kubectl wait` see a spec edit
/// as in progress until an agent has acted on it.
pub async fn write<K, E>(
    ctx: &Context,
    api: &Api<K>,
    obj: &K,
    current: Current<'_, E>,
    mine: E,
) -> Result<bool>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
    E: NodeEntry,
{
    let generation = obj.meta().generation;
    let conds = ready_over(current.entries, &mine, current.conditions, generation);
    let unchanged = current.entries.contains(&mine)
        && current.observed_generation == generation
        && conditions::find(current.conditions, conditions::READY)
            == conditions::find(&conds, conditions::READY);
    if unchanged {
        return Ok(false);
    }
    let patch = json!({
        "apiVersion": API_VERSION,
        "kind": K::kind(&()),
        "status": {
            "nodes": [mine],
            "observedGeneration": generation,
            "conditions": conds,
        },
    });
    api.patch_status(
        &obj.name_any(),
        &PatchParams::apply(&ctx.settings.node_field_manager()).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    ctx.metrics
        .status_patches
        .get_or_create(&super::metrics::KindLabels {
            kind: K::kind(&()).to_string(),
        })
        .inc();
    Ok(true)
}

/// This node no longer holds the object (its labels or the object's `nodeSelector`
/// changed) but still carries its finalizer: after the caller removed the libvirt object
/// here, drop this node's status entry (an apply with nothing under this node's field
/// manager releases what it owned) and this node's finalizer. The finalizer goes with a
/// merge patch that carries the object's `resourceVersion`, so a concurrent edit makes it
/// fail (and retry) instead of being overwritten.
pub async fn release<K>(ctx: &Context, api: &Api<K>, obj: &K) -> Result<()>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    let name = obj.name_any();
    let release = json!({
        "apiVersion": API_VERSION,
        "kind": K::kind(&()),
        "status": {},
    });
    // The finalizer patch is guarded by the resourceVersion this release produced: the
    // status write above changed it when it removed anything.
    let released = api
        .patch_status(
            &name,
            &PatchParams::apply(&ctx.settings.node_field_manager()).force(),
            &Patch::Apply(&release),
        )
        .await?;
    let mine = ctx.settings.node_finalizer();
    let remaining: Vec<String> = released
        .finalizers()
        .iter()
        .filter(|f| **f != mine)
        .cloned()
        .collect();
    let patch = json!({
        "metadata": {
            "resourceVersion": released.resource_version(),
            "finalizers": remaining,
        }
    });
    api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// Whether this node was deselected while still holding the object: selected no more, its
/// finalizer still there, and the object not being deleted (deletion has its own path).
pub fn deselected<K: Resource>(obj: &K, selected: bool, finalizer: &str) -> bool {
    !selected
        && obj.meta().deletion_timestamp.is_none()
        && obj.finalizers().iter().any(|f| f == finalizer)
}

/// The deselected path of [`deselected`]: `remove` (the kind's removal of its libvirt
/// object here) runs, each change becomes an event with action `Deselect`, then
/// [`release`] lets go of the object; all in `span`, a failure counted under `kind`.
pub async fn deselect<K>(
    ctx: &Context,
    kind: &str,
    api: &Api<K>,
    obj: &K,
    remove: impl Future<Output = Result<Vec<Change>>>,
    span: Span,
) -> Result<Action>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    let result = async {
        for change in remove.await? {
            ctx.event(obj, false, change.reason, "Deselect", change.note)
                .await;
        }
        release(ctx, api, obj).await
    }
    .instrument(span)
    .await;
    super::reconcile::counted(ctx, kind, result).map(|()| Action::await_change())
}
