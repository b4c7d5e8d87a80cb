//! The conditions the controller writes, and the two ways it changes a condition list.
//!
//! The controller's conditions on a Domain say something is wrong or under way (unplaced, a
//! move waiting, an eviction blocked, the node silent): each is present while it holds and
//! removed afterwards, so a healthy domain carries none of them except `Scheduled`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use virtkube_crds::conditions::{condition, set_condition};

pub use virtkube_crds::conditions::SCHEDULED;

/// Domain: its holder's agent has not sent a heartbeat within the grace period.
pub const NODE_UNREACHABLE: &str = "NodeUnreachable";

/// Domain: its node is drained and the domain cannot leave it (pinned there, no node fits,
/// storage not shared, or an eviction strategy not supported yet).
pub const EVICTION_BLOCKED: &str = "EvictionBlocked";

/// Domain: a move was asked for (`spec.nodeName` changed, or a drain) and waits (a limit, a
/// backoff, the target unfit, storage not shared).
pub const MOVE_WAITING: &str = "MoveWaiting";

/// HypervisorNode: the node is drained; the message counts the domains moved, moving,
/// waiting, blocked and left alone.
pub const DRAINING: &str = "Draining";

/// Sets the condition `type_` (keeping its transition time when the status is unchanged).
/// Returns whether anything changed.
pub fn set(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: &str,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: Timestamp,
) -> bool {
    set_condition(
        conditions,
        condition(type_, status, reason, message, generation, Time(now)),
    )
}

/// Removes the condition `type_`. Returns whether it was there.
pub fn remove(conditions: &mut Vec<Condition>, type_: &str) -> bool {
    let before = conditions.len();
    conditions.retain(|c| c.type_ != type_);
    conditions.len() != before
}
