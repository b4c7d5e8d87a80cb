//! The Network controller: this node's copy of every Network whose `nodeSelector` selects
//! this node's `HypervisorNode` labels.
//!
//! Guarantees:
//! - Each node holds its own finalizer (`node.virtkube.io/<node>`): a Network goes away only
//!   when every node that made it has removed its libvirt network.
//! - Only this node's entry of `status.nodes` is written (see [`super::pernode`]).
//! - A libvirt network of the same name that is not virtkube's is never touched.
//! - A network a guest is attached to is never removed from under it: while any domain on
//!   this node has an interface on it — virtkube's or not, running or only defined — or a
//!   Domain placed here names it, removing it (the Network deleted, or no longer selecting
//!   this node) waits: a `DeletionBlocked` event and this node's status entry
//!   (`NetworkInUse: …`) name them, and the removal is retried until they are gone.
//! - Not knowing this node's labels is not "not selected": until the agent has read them,
//!   a Network with a `nodeSelector` is neither made nor removed here on that ground (only a
//!   deletion proceeds).

use std::sync::Arc;

use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::Event as Finalizer;
use virtkube_crds::Network;
use virtkube_crds::network::{NetworkNodeStatus, NetworkStatus};
use virtkube_crds::validation::Validate;

use super::context::{Context, selection};
use super::converge::{self, Converged};
use super::error::{Error, Result};
use super::pernode::{self, NodeEntry};
use super::reconcile;

/// The kind label of this controller's metrics.
pub const KIND: &str = "Network";

impl NodeEntry for NetworkNodeStatus {
    fn node(&self) -> &str {
        &self.node_name
    }
    fn problem(&self) -> Option<String> {
        match (&self.message, self.active) {
            (Some(m), _) => Some(m.clone()),
            (None, false) => Some("not active".into()),
            (None, true) => None,
        }
    }
}

/// How long a Network with a `nodeSelector` waits for this node's labels to be read (the
/// publisher also reconciles every Network again once it has read them).
const LABELS_UNKNOWN_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether this node should hold the network: selected by labels, or holding the node's
/// finalizer (so a deletion is finished here).
pub fn concerns(net: &Network, ctx: &Context) -> bool {
    selected(net, ctx) == Some(true) || net.finalizers().contains(&ctx.settings.node_finalizer())
}

/// Whether the network's `nodeSelector` selects this node; `None` while that cannot be told
/// (a selector, and this node's labels not read yet).
fn selected(net: &Network, ctx: &Context) -> Option<bool> {
    selection(&net.spec.node_selector, ctx.labels().as_ref())
}

/// The reconciler the Controller runs for each Network.
pub async fn reconcile(net: Arc<Network>, ctx: Arc<Context>) -> Result<Action> {
    if !concerns(&net, &ctx) {
        return Ok(Action::await_change());
    }
    let _timer = ctx.metrics.reconcile_started(KIND);
    let api: Api<Network> = Api::all(ctx.client.clone());
    let span = tracing::info_span!("reconcile", kind = KIND, name = %net.name_any());
    let (ctx_ref, api_ref) = (&*ctx, &api);
    let finalizer_name = ctx.settings.node_finalizer();
    let deleting = net.metadata.deletion_timestamp.is_some();
    let Some(selected) = selected(&net, &ctx).or(deleting.then_some(true)) else {
        tracing::debug!(network = %net.name_any(), "this node's labels are not read yet: waiting before deciding whether it is selected");
        return Ok(Action::requeue(LABELS_UNKNOWN_RETRY));
    };
    if pernode::deselected(&*net, selected, &finalizer_name) {
        // No longer this node's: remove it here (once no guest uses it), then let go of it.
        let remove = remove_here(&ctx, &api, &net, "Deselect");
        return pernode::deselect(&ctx, KIND, &api, &*net, remove, span).await;
    }
    reconcile::finalized(
        &ctx,
        KIND,
        &api,
        &finalizer_name,
        net,
        span,
        |event| async move {
            match event {
                Finalizer::Apply(net) => apply(&net, ctx_ref, api_ref).await,
                Finalizer::Cleanup(net) => cleanup(&net, ctx_ref, api_ref).await,
            }
        },
    )
    .await
}

async fn apply(net: &Network, ctx: &Context, api: &Api<Network>) -> Result<Action> {
    let invalid = net.spec.validate();
    let outcome = if invalid.is_empty() {
        converge::network(ctx, net).await
    } else {
        Err(Error::Unrealizable {
            reason: "InvalidSpec",
            message: invalid.to_string(),
        })
    };
    let status = net.status.clone().unwrap_or_default();
    match outcome {
        Ok(Converged {
            changes, observed, ..
        }) => {
            reconcile::report_changes(ctx, net, &changes).await;
            let mine = NetworkNodeStatus {
                node_name: ctx.settings.node.clone(),
                active: observed.as_ref().is_some_and(|o| o.active),
                bridge: observed.as_ref().and_then(|o| o.bridge.clone()),
                autostart: observed.as_ref().map(|o| o.autostart),
                message: None,
            };
            pernode::write(ctx, api, net, current(&status), mine).await?;
            Ok(Action::requeue(ctx.settings.resync))
        }
        Err(error) => {
            let (reason, message) = error.reason_and_message();
            let mine = NetworkNodeStatus {
                node_name: ctx.settings.node.clone(),
                active: false,
                bridge: None,
                autostart: None,
                message: Some(format!("{reason}: {message}")),
            };
            if pernode::write(ctx, api, net, current(&status), mine).await? {
                reconcile::report_failure(ctx, net, reason, &message).await;
            }
            if invalid.is_empty() {
                Err(error)
            } else {
                Ok(Action::await_change())
            }
        }
    }
}

async fn cleanup(net: &Network, ctx: &Context, api: &Api<Network>) -> Result<Action> {
    for change in remove_here(ctx, api, net, "Delete").await? {
        ctx.event(net, false, change.reason, "Delete", change.note)
            .await;
    }
    Ok(Action::await_change())
}

/// Removes this node's copy of the network unless something here uses it: a domain on this
/// node with an interface on it (libvirt's view, whoever made it), or a Domain placed on this
/// node that names it. Then nothing is touched; this node's status entry says why
/// (`NetworkInUse`), a `DeletionBlocked` event (with `action`) names them when that changed,
/// and the error makes the removal retried.
async fn remove_here(
    ctx: &Context,
    api: &Api<Network>,
    net: &Network,
    action: &str,
) -> Result<Vec<super::converge::Change>> {
    let name = net.name_any();
    let resources: Vec<String> = ctx
        .domains
        .as_ref()
        .map(|store| {
            store
                .state()
                .iter()
                .filter(|d| {
                    d.spec.interfaces.iter().any(|i| i.network == name)
                        && super::domain::concerns(d, ctx)
                })
                .map(|d| format!("Domain {}", super::key_of(&**d)))
                .collect()
        })
        .unwrap_or_default();
    let outcome = if resources.is_empty() {
        converge::remove_network(ctx, net).await
    } else {
        Err(Error::Unrealizable {
            reason: "NetworkInUse",
            message: format!(
                "network {name} is still used on node {} by {}: it is removed once they are gone",
                ctx.settings.node,
                resources.join(", ")
            ),
        })
    };
    let Err(Error::Unrealizable {
        reason: "NetworkInUse",
        message,
    }) = outcome
    else {
        return outcome;
    };
    let status = net.status.clone().unwrap_or_default();
    let mine = NetworkNodeStatus {
        node_name: ctx.settings.node.clone(),
        active: true,
        bridge: status
            .nodes
            .iter()
            .find(|n| n.node_name == ctx.settings.node)
            .and_then(|n| n.bridge.clone()),
        autostart: None,
        message: Some(format!("NetworkInUse: {message}")),
    };
    if pernode::write(ctx, api, net, current(&status), mine).await? {
        ctx.event(net, true, "DeletionBlocked", action, message.clone())
            .await;
    }
    Err(Error::Unrealizable {
        reason: "NetworkInUse",
        message,
    })
}

/// The status as read, for [`pernode::write`].
fn current(status: &NetworkStatus) -> pernode::Current<'_, NetworkNodeStatus> {
    pernode::Current {
        entries: &status.nodes,
        observed_generation: status.observed_generation,
        conditions: &status.conditions,
    }
}
