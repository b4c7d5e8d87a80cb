//! Binding unplaced domains: where (`spec.nodeName`, or the scheduler's choice), what the
//! `Scheduled` condition says, and the finalizer removal of an unbound domain being
//! deleted. Pure.
//!
//! A domain whose `spec.nodeName` names a node is bound to that node when its
//! HypervisorNode exists, is Ready with a fresh heartbeat and is not fenced — whether or
//! not the scheduler's other filters pass, as Kubernetes binds a Pod that names its node
//! (the `Scheduled` message then says what the scheduler would have refused, and the agent
//! reports what it cannot realize). Otherwise it stays unbound with `Scheduled=False`
//! saying why. A domain naming no node goes where the scheduler picks.

use json_patch::Patch as JsonPatch;
use k8s_openapi::jiff::Timestamp;
use serde_json::json;
use virtkube_crds::Domain;
use virtkube_crds::conditions::status;
use virtkube_crds::domain::DomainStatus;

use super::conditions::{SCHEDULED, set};
use super::scheduler::{self, Demand, Problem, Refused};
use super::settings::Settings;
use super::usage::Usage;
use super::view::Cluster;

/// The finalizer agents put on Domains and Volumes (kept in sync with the agent's own
/// constant, `agent::context::FINALIZER`).
pub const FINALIZER: &str = "virtkube.io/cleanup";

/// Where an unplaced domain goes, or why it cannot go anywhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// Bind to `node`.
    Bind {
        /// The node.
        node: String,
        /// `Requested` (its `spec.nodeName`) or `NodeAssigned` (the scheduler).
        reason: &'static str,
        /// For the `Scheduled` condition.
        message: String,
    },
    /// Stay unbound.
    Wait {
        /// `Unschedulable` (no node fits) or `RequestedNodeUnavailable`.
        reason: &'static str,
        /// For the `Scheduled` condition.
        message: String,
        /// The refusals behind an `Unschedulable`, for the metrics.
        refused: Option<Refused>,
    },
}

/// Where a domain with `demand` (or its problems) goes: to `requested` when that node can
/// run domains at all, else where the scheduler picks when nothing is requested.
pub fn place(
    requested: Option<&str>,
    demand: &Result<Demand, Vec<Problem>>,
    cluster: &Cluster,
    usage: &Usage,
    settings: &Settings,
) -> Placement {
    match requested {
        Some(node) => requested_node(node, demand, cluster, usage, settings),
        None => match demand {
            Err(problems) => Placement::Wait {
                reason: "Unschedulable",
                message: Refused::problems(cluster.nodes.len(), problems.clone()).message(),
                refused: Some(Refused::problems(cluster.nodes.len(), problems.clone())),
            },
            Ok(demand) => match scheduler::choose(demand, cluster, usage, settings, None) {
                Ok(choice) => Placement::Bind {
                    message: format!(
                        "bound to {} by the scheduler ({} of memory left there)",
                        choice.node,
                        scheduler::human_bytes(choice.free_after)
                    ),
                    node: choice.node,
                    reason: "NodeAssigned",
                },
                Err(refused) => Placement::Wait {
                    reason: "Unschedulable",
                    message: refused.message(),
                    refused: Some(refused),
                },
            },
        },
    }
}

fn requested_node(
    node: &str,
    demand: &Result<Demand, Vec<Problem>>,
    cluster: &Cluster,
    usage: &Usage,
    settings: &Settings,
) -> Placement {
    let Some(view) = cluster.node(node) else {
        return Placement::Wait {
            reason: "RequestedNodeUnavailable",
            message: format!(
                "spec.nodeName is {node}, which has no HypervisorNode (no agent registered under that name)"
            ),
            refused: None,
        };
    };
    let unavailable = scheduler::availability(view);
    if !unavailable.is_empty() {
        let why: Vec<String> = unavailable.iter().map(ToString::to_string).collect();
        return Placement::Wait {
            reason: "RequestedNodeUnavailable",
            message: format!("spec.nodeName is {node}, which is {}", why.join(", ")),
            refused: None,
        };
    }
    let warnings: Vec<String> = match demand {
        Ok(d) => scheduler::refusals(view, d, cluster, usage, settings, false)
            .iter()
            .map(ToString::to_string)
            .collect(),
        Err(problems) => problems.iter().map(ToString::to_string).collect(),
    };
    let message = if warnings.is_empty() {
        format!("bound to {node} as spec.nodeName requests")
    } else {
        format!(
            "bound to {node} as spec.nodeName requests, although the scheduler would refuse it: {}",
            warnings.join(", ")
        )
    };
    Placement::Bind {
        node: node.to_string(),
        reason: "Requested",
        message,
    }
}

/// `status` bound to `node`, with `Scheduled=True`.
pub fn bound(
    status: &mut DomainStatus,
    node: &str,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) {
    status.node_name = Some(node.to_string());
    set(
        &mut status.conditions,
        SCHEDULED,
        status::TRUE,
        reason,
        message,
        generation,
        now,
    );
}

/// `status` with `Scheduled=False` saying why the domain waits.
pub fn waiting(
    status: &mut DomainStatus,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) {
    set(
        &mut status.conditions,
        SCHEDULED,
        status::FALSE,
        reason,
        message,
        generation,
        now,
    );
}

/// The JSON patch that removes [`FINALIZER`] from `obj`, testing the resourceVersion it was
/// decided on (and the finalizer's place), so a concurrent change makes it fail instead of
/// being overwritten. `None` when the finalizer is not there.
pub fn finalizer_removal<K: kube::Resource>(obj: &K) -> Option<JsonPatch> {
    let meta = obj.meta();
    let index = meta
        .finalizers
        .as_ref()?
        .iter()
        .position(|f| f == FINALIZER)?;
    let rv = meta.resource_version.as_ref()?;
    let path = format!("/metadata/finalizers/{index}");
    serde_json::from_value(json!([
        {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
        {"op": "test", "path": path, "value": FINALIZER},
        {"op": "remove", "path": path},
    ]))
    .ok()
}

/// Whether `dom` is being deleted and still carries [`FINALIZER`].
pub fn finalizer_pending(dom: &Domain) -> bool {
    dom.metadata.deletion_timestamp.is_some()
        && dom
            .metadata
            .finalizers
            .as_ref()
            .is_some_and(|f| f.iter().any(|f| f == FINALIZER))
}
