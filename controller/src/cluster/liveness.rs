//! Node liveness and fencing. Pure.
//!
//! A HypervisorNode whose heartbeat is older than `--heartbeat-grace-seconds` gets
//! `Ready=Unknown` (reason `HeartbeatStale`, written by server-side apply under the
//! controller's field manager; the agent takes `Ready` back when it beats again), and every
//! Domain it holds gets `NodeUnreachable=True`. Nothing is started elsewhere: the guests may
//! well run on, cut off from the API. Only when an administrator annotates the HypervisorNode
//! `virtkube.io/fenced: "true"` — asserting the node is powered off or isolated, its guests
//! dead, and that it will not come back with its old libvirt state — does the controller
//! release the claims of its domains with `runStrategy: Always` (and of those whose
//! `spec.nodeName` names another node, or that are being deleted), so they are scheduled
//! again elsewhere.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use virtkube_crds::Domain;
use virtkube_crds::HypervisorNode;
use virtkube_crds::conditions::{self as crd_conditions, READY, status};
use virtkube_crds::domain::RunStrategy;

use super::conditions::DRAINING;
use super::drain::Progress;
use super::settings::Settings;
use super::view::{FENCED_ANNOTATION, NodeView};

/// The `Ready` reason the controller writes on a silent node.
pub const HEARTBEAT_STALE: &str = "HeartbeatStale";

/// Whether the controller releases the claim of `dom`, held by a fenced node: a domain that
/// should always run, one the user asks to be elsewhere, or one being deleted (whose
/// finalizer can then be removed). Others stay held by the fenced node until it returns or
/// the user changes `spec.nodeName` or `runStrategy`.
pub fn may_unfence(dom: &Domain, holder: &str) -> bool {
    dom.metadata.deletion_timestamp.is_some()
        || dom.spec.run_strategy == RunStrategy::Always
        || dom.spec.node_name.as_deref().is_some_and(|n| n != holder)
}

/// Why a domain's holder counts as unreachable (`NodeUnreachable`'s reason and message),
/// or `None` when it is heard from. `node` is `None` when the holder has no HypervisorNode.
pub fn unreachable(
    holder: &str,
    node: Option<&NodeView>,
    held_on_fence: bool,
) -> Option<(&'static str, String)> {
    match node {
        None => Some((
            "NodeNotFound",
            format!(
                "node {holder} has no HypervisorNode: nothing is started elsewhere until it returns or the domain's spec.nodeName names another node"
            ),
        )),
        Some(n) if n.fresh => None,
        Some(n) => {
            let since = n
                .heartbeat
                .map_or_else(|| "ever".to_string(), |t| t.to_string());
            let next = if held_on_fence {
                format!(
                    "node {holder} is declared fenced, but runStrategy is not Always: set spec.nodeName to another node (or runStrategy Always) to run it elsewhere"
                )
            } else {
                format!(
                    "nothing is started elsewhere until the node returns or an administrator declares it fenced (kubectl annotate hypervisornode {holder} {FENCED_ANNOTATION}=true)"
                )
            };
            Some((
                HEARTBEAT_STALE,
                format!("node {holder} has sent no heartbeat since {since}; {next}"),
            ))
        }
    }
}

/// The conditions the controller asserts on a HypervisorNode: `Ready=Unknown` when its
/// heartbeat is stale, `Draining` while its Kubernetes Node is drained. Transition times
/// are kept from the current conditions when the status is unchanged.
pub fn node_conditions(
    hvn: &HypervisorNode,
    node: &NodeView,
    drain: Option<&Progress>,
    settings: &Settings,
    now: Timestamp,
) -> Vec<Condition> {
    let mut current = hvn
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let generation = hvn.metadata.generation;
    let mut asserted = Vec::new();
    if !node.fresh {
        let since = node
            .heartbeat
            .map_or_else(|| "ever".to_string(), |t| t.to_string());
        crd_conditions::set_condition(
            &mut current,
            crd_conditions::condition(
                READY,
                status::UNKNOWN,
                HEARTBEAT_STALE,
                format!(
                    "no heartbeat since {since} (grace {}s): the agent or its node is down or cut off; its domains keep their node until it returns or an administrator annotates this HypervisorNode {FENCED_ANNOTATION}=true",
                    settings.heartbeat_grace.as_secs()
                ),
                generation,
                Time(now),
            ),
        );
        asserted.push(READY);
    }
    if let Some(progress) = drain {
        crd_conditions::set_condition(
            &mut current,
            crd_conditions::condition(
                DRAINING,
                status::TRUE,
                progress.reason(),
                progress.message(),
                generation,
                Time(now),
            ),
        );
        asserted.push(DRAINING);
    }
    current
        .into_iter()
        .filter(|c| asserted.contains(&c.type_.as_str()))
        .collect()
}

/// Whether applying `desired` would change anything: a condition differs from what is
/// there, or the controller still owns status fields it no longer asserts (which the apply
/// then removes).
pub fn needs_apply(hvn: &HypervisorNode, desired: &[Condition], manager: &str) -> bool {
    let current = hvn
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let differs = desired
        .iter()
        .any(|d| crd_conditions::find(current, &d.type_) != Some(d));
    let owns_more = hvn
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| m.manager.as_deref() == Some(manager))
        .filter(|m| m.subresource.as_deref() == Some("status"))
        .any(|m| {
            let owned = m
                .fields_v1
                .as_ref()
                .and_then(|f| {
                    f.0.get("f:status")?
                        .get("f:conditions")?
                        .as_object()
                        .cloned()
                })
                .unwrap_or_default();
            [READY, DRAINING].iter().any(|t| {
                owned.contains_key(&format!("k:{{\"type\":\"{t}\"}}"))
                    && !desired.iter().any(|d| d.type_ == *t)
            })
        });
    differs || owns_more
}
