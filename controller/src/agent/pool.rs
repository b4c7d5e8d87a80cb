//! The StoragePool controller: this node's copy of every StoragePool whose `nodeSelector`
//! selects this node's `HypervisorNode` labels.
//!
//! Guarantees:
//! - Each node holds its own finalizer (`node.virtkube.io/<node>`): a StoragePool goes away
//!   only when every node that made it has stopped and undefined its libvirt pool (the
//!   files in the pool's directory stay).
//! - Only this node's entry of `status.nodes` is written (see [`super::pernode`]).
//! - A libvirt pool of the same name that is not virtkube's is never touched.
//! - A pool is not removed from under what uses it: while a Volume held by this node is in
//!   it, or a domain on this node has a disk on one of its volumes (libvirt's view, whoever
//!   made it), removing it (deleted, or no longer selecting this node) waits, says why (a
//!   `DeletionBlocked` event and this node's status entry, `PoolInUse: …`) and retries.
//! - Not knowing this node's labels is not "not selected" (see the Network controller).

use std::sync::Arc;

use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::Event as Finalizer;
use virtkube_crds::StoragePool;
use virtkube_crds::quantity::ByteQuantity;
use virtkube_crds::storage_pool::{PoolNodeStatus, StoragePoolStatus, UnrecordedPartitions};
use virtkube_crds::validation::Validate;
use virtkube_engine::model::PoolState;

use super::context::{Context, selection};
use super::converge::{self, Converged};
use super::error::{Error, Result};
use super::pernode::{self, NodeEntry};
use super::reconcile;

/// The kind label of this controller's metrics.
pub const KIND: &str = "StoragePool";

impl NodeEntry for PoolNodeStatus {
    fn node(&self) -> &str {
        &self.node_name
    }
    fn problem(&self) -> Option<String> {
        match &self.message {
            Some(m) => Some(m.clone()),
            None if self.state != "Running" => Some(format!("state {}", self.state)),
            None => None,
        }
    }
}

/// How long a StoragePool with a `nodeSelector` waits for this node's labels to be read.
const LABELS_UNKNOWN_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether this node should hold the pool: selected by labels, or holding the node's
/// finalizer (so a deletion is finished here).
pub fn concerns(pool: &StoragePool, ctx: &Context) -> bool {
    selected(pool, ctx) == Some(true) || pool.finalizers().contains(&ctx.settings.node_finalizer())
}

/// Whether the pool's `nodeSelector` selects this node; `None` while that cannot be told.
fn selected(pool: &StoragePool, ctx: &Context) -> Option<bool> {
    selection(&pool.spec.node_selector, ctx.labels().as_ref())
}

/// The reconciler the Controller runs for each StoragePool.
pub async fn reconcile(pool: Arc<StoragePool>, ctx: Arc<Context>) -> Result<Action> {
    if !concerns(&pool, &ctx) {
        return Ok(Action::await_change());
    }
    let _timer = ctx.metrics.reconcile_started(KIND);
    let api: Api<StoragePool> = Api::all(ctx.client.clone());
    let span = tracing::info_span!("reconcile", kind = KIND, name = %pool.name_any());
    let (ctx_ref, api_ref) = (&*ctx, &api);
    let finalizer_name = ctx.settings.node_finalizer();
    let deleting = pool.metadata.deletion_timestamp.is_some();
    let Some(selected) = selected(&pool, &ctx).or(deleting.then_some(true)) else {
        tracing::debug!(pool = %pool.name_any(), "this node's labels are not read yet: waiting before deciding whether it is selected");
        return Ok(Action::requeue(LABELS_UNKNOWN_RETRY));
    };
    if pernode::deselected(&*pool, selected, &finalizer_name) {
        // No longer this node's: remove it here (once nothing here uses it), then let go.
        let remove = remove_here(&ctx, &api, &pool, "Deselect");
        return pernode::deselect(&ctx, KIND, &api, &*pool, remove, span).await;
    }
    reconcile::finalized(
        &ctx,
        KIND,
        &api,
        &finalizer_name,
        pool,
        span,
        |event| async move {
            match event {
                Finalizer::Apply(pool) => apply(&pool, ctx_ref, api_ref).await,
                Finalizer::Cleanup(pool) => cleanup(&pool, ctx_ref, api_ref).await,
            }
        },
    )
    .await
}

fn state_word(state: PoolState) -> String {
    format!("{state:?}")
}

async fn apply(pool: &StoragePool, ctx: &Context, api: &Api<StoragePool>) -> Result<Action> {
    let invalid = pool.spec.validate();
    let outcome = if invalid.is_empty() {
        converge::pool(ctx, pool).await
    } else {
        Err(Error::Unrealizable {
            reason: "InvalidSpec",
            message: invalid.to_string(),
        })
    };
    let status = pool.status.clone().unwrap_or_default();
    match outcome {
        Ok(Converged {
            changes, observed, ..
        }) => {
            reconcile::report_changes(ctx, pool, &changes).await;
            let unrecorded = match &observed {
                Some(o) => converge::unrecorded_partitions(ctx, o).await?,
                None => None,
            };
            let before = status
                .nodes
                .iter()
                .find(|n| n.node_name == ctx.settings.node)
                .and_then(|n| n.unrecorded_partitions.as_ref());
            let news = unrecorded.as_ref().filter(|u| Some(*u) != before).cloned();
            let mine = PoolNodeStatus {
                node_name: ctx.settings.node.clone(),
                state: observed
                    .as_ref()
                    .map_or_else(|| "Absent".to_string(), |o| state_word(o.state)),
                capacity: observed
                    .as_ref()
                    .map(|o| ByteQuantity::from_bytes(o.capacity)),
                allocation: observed
                    .as_ref()
                    .map(|o| ByteQuantity::from_bytes(o.allocation)),
                available: observed
                    .as_ref()
                    .map(|o| ByteQuantity::from_bytes(o.available)),
                autostart: observed.as_ref().map(|o| o.autostart),
                message: None,
                unrecorded_partitions: unrecorded,
            };
            // Said once per change of the list, with the status that keeps it.
            if pernode::write(ctx, api, pool, current(&status), mine).await?
                && let Some(u) = news
            {
                ctx.event(
                    pool,
                    true,
                    "UnrecordedPartitions",
                    "Observe",
                    unrecorded_note(&pool.name_any(), &ctx.settings.node, &u),
                )
                .await;
            }
            Ok(Action::requeue(ctx.settings.resync))
        }
        Err(error) => {
            let (reason, message) = error.reason_and_message();
            let mine = PoolNodeStatus {
                node_name: ctx.settings.node.clone(),
                state: "Failed".into(),
                message: Some(format!("{reason}: {message}")),
                ..PoolNodeStatus::default()
            };
            if pernode::write(ctx, api, pool, current(&status), mine).await? {
                reconcile::report_failure(ctx, pool, reason, &message).await;
            }
            if invalid.is_empty() {
                Err(error)
            } else {
                Ok(Action::await_change())
            }
        }
    }
}

async fn cleanup(pool: &StoragePool, ctx: &Context, api: &Api<StoragePool>) -> Result<Action> {
    for change in remove_here(ctx, api, pool, "Delete").await? {
        ctx.event(pool, false, change.reason, "Delete", change.note)
            .await;
    }
    Ok(Action::await_change())
}

/// Removes this node's copy of the pool unless something here uses it: a Volume this node
/// holds in it (undefining the pool under it would leave its image unmanaged), or a domain on
/// this node with a disk on one of its volumes. Then nothing is touched; this node's status
/// entry says why (`PoolInUse`), a `DeletionBlocked` event (with `action`) names them when
/// that changed, and the error makes the removal retried.
async fn remove_here(
    ctx: &Context,
    api: &Api<StoragePool>,
    pool: &StoragePool,
    action: &str,
) -> Result<Vec<super::converge::Change>> {
    let name = pool.name_any();
    let volumes: Vec<String> = ctx
        .volumes
        .as_ref()
        .map(|store| {
            store
                .state()
                .iter()
                .filter(|v| v.spec.pool == name && super::volume::concerns(v, ctx))
                .map(|v| format!("Volume {}", super::key_of(&**v)))
                .collect()
        })
        .unwrap_or_default();
    let outcome = if volumes.is_empty() {
        converge::remove_pool(ctx, pool).await
    } else {
        Err(Error::Unrealizable {
            reason: "PoolInUse",
            message: format!(
                "pool {name} still holds {} on node {}: it is removed after them",
                volumes.join(", "),
                ctx.settings.node
            ),
        })
    };
    let Err(Error::Unrealizable {
        reason: "PoolInUse",
        message,
    }) = outcome
    else {
        return outcome;
    };
    let status = pool.status.clone().unwrap_or_default();
    let mine = PoolNodeStatus {
        node_name: ctx.settings.node.clone(),
        state: "Running".into(),
        message: Some(format!("PoolInUse: {message}")),
        ..PoolNodeStatus::default()
    };
    if pernode::write(ctx, api, pool, current(&status), mine).await? {
        ctx.event(pool, true, "DeletionBlocked", action, message.clone())
            .await;
    }
    Err(Error::Unrealizable {
        reason: "PoolInUse",
        message,
    })
}

/// The Warning event's note about partitions no Volume recorded.
fn unrecorded_note(pool: &str, node: &str, u: &UnrecordedPartitions) -> String {
    let more = usize::try_from(u.count)
        .unwrap_or(usize::MAX)
        .saturating_sub(u.names.len());
    let tail = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    format!(
        "disk pool {pool} on node {node} holds {} partition(s) no Volume recorded: {}{tail}. virtkube never touches them (left by an agent stopped between making a partition and recording it, or made by hand); to use one, annotate a new Volume {}=<its key or path>, or remove it by hand once you know whose data it is",
        u.count,
        u.names.join(", "),
        virtkube_crds::volume::ADOPT_IMAGE_ANNOTATION
    )
}

/// The status as read, for [`pernode::write`].
fn current(status: &StoragePoolStatus) -> pernode::Current<'_, PoolNodeStatus> {
    pernode::Current {
        entries: &status.nodes,
        observed_generation: status.observed_generation,
        conditions: &status.conditions,
    }
}
