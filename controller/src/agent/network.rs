//! The Network controller: this node's copy of every Network whose `nodeSelector` selects
//! this node's `HypervisorNode` labels.
//!
//! Guarantees:
//! - Each node holds its own finalizer (`node.virtkube.io/<node>`): a Network goes away only
//!   when every node that made it has removed its libvirt network.
//! - Only this node's entry of `status.nodes` is written (see [`super::pernode`]).
//! - A libvirt network of the same name that is not virtkube's is never touched.

use std::sync::Arc;

use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::Event as Finalizer;
use virtkube_crds::Network;
use virtkube_crds::network::{NetworkNodeStatus, NetworkStatus};
use virtkube_crds::validation::Validate;

use super::context::{Context, selects};
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

/// Whether this node should hold the network: selected by labels, or holding the node's
/// finalizer (so a deletion is finished here).
pub fn concerns(net: &Network, ctx: &Context) -> bool {
    selected(net, ctx) || net.finalizers().contains(&ctx.settings.node_finalizer())
}

fn selected(net: &Network, ctx: &Context) -> bool {
    selects(&net.spec.node_selector, &ctx.labels())
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
    if pernode::deselected(&*net, selected(&net, &ctx), &finalizer_name) {
        // No longer this node's: remove it here, then let go of it.
        let remove = converge::remove_network(&ctx, &net);
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
                Finalizer::Cleanup(net) => cleanup(&net, ctx_ref).await,
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

async fn cleanup(net: &Network, ctx: &Context) -> Result<Action> {
    // Domains first: their NICs would lose the network under them.
    let name = net.name_any();
    if let Some(store) = &ctx.domains {
        let users: Vec<String> = store
            .state()
            .iter()
            .filter(|d| {
                d.spec.interfaces.iter().any(|i| i.network == name)
                    && super::domain::concerns(d, ctx)
            })
            .map(|d| super::key_of(&**d))
            .collect();
        if !users.is_empty() {
            let message = format!(
                "Domains {} still use network {name} on node {}: the network is removed after them",
                users.join(", "),
                ctx.settings.node
            );
            ctx.event(net, true, "DeletionBlocked", "Delete", message.clone())
                .await;
            return Err(Error::Unrealizable {
                reason: "NetworkInUse",
                message,
            });
        }
    }
    for change in converge::remove_network(ctx, net).await? {
        ctx.event(net, false, change.reason, "Delete", change.note)
            .await;
    }
    Ok(Action::await_change())
}

/// The status as read, for [`pernode::write`].
fn current(status: &NetworkStatus) -> pernode::Current<'_, NetworkNodeStatus> {
    pernode::Current {
        entries: &status.nodes,
        observed_generation: status.observed_generation,
        conditions: &status.conditions,
    }
}
