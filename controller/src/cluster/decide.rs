//! One domain's decision: the protocol's [`controller_step`] decides, through a
//! [`NodeOracle`] backed by the scheduler, the migration limits, the backoff and fencing;
//! this module prepares what it decides on and turns its step into the status to write.
//! Pure.
//!
//! What goes into the protocol's `Facts` besides the read itself:
//! - the request is `spec.nodeName`, or, while that is unset, the target of a move a drain
//!   started ([`moves::requested_of`]);
//! - a move still `Pending` past `--pending-move-timeout-seconds` is no longer wanted (the
//!   request becomes the holder), so the protocol cancels it;
//! - a domain held by a drained node with `evictionStrategy: LiveMigrate` and no
//!   `spec.nodeName` is requested on the node the scheduler picks for it.
//!
//! And what the controller does not carry out of the protocol's steps: `Unfence` only for
//! the domains [`liveness::may_unfence`] allows (the others stay with the fenced node).

use std::cell::RefCell;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use virtkube_crds::Domain;
use virtkube_crds::conditions::{find, status};
use virtkube_crds::domain::{DomainStatus, MigrationState};

use crate::placement::write::facts_of;
use crate::placement::{ControllerStep, NodeName, NodeOracle, controller_step};

use super::binding::{self, Placement};
use super::conditions::{EVICTION_BLOCKED, MOVE_WAITING, NODE_UNREACHABLE, SCHEDULED, remove, set};
use super::drain::{self, Ask, Role};
use super::liveness;
use super::moves::{self, Backoff, MoveInputs, MoveWait};
use super::scheduler::{self, Demand, Problem, Refused};
use super::settings::Settings;
use super::usage::Usage;
use super::view::{Cluster, NodeView};

/// What one decision reads besides the domain.
pub struct Inputs<'a> {
    /// The cluster's nodes, pools, networks and volumes.
    pub cluster: &'a Cluster,
    /// Placed domains and moves under way.
    pub usage: &'a Usage,
    /// The knobs.
    pub settings: &'a Settings,
    /// Failed moves.
    pub backoff: &'a Backoff,
    /// The time of the pass.
    pub now: Timestamp,
}

/// An event to publish once the decision is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// A warning (or a normal event).
    pub warning: bool,
    /// The reason (CamelCase).
    pub reason: String,
    /// The action taken.
    pub action: &'static str,
    /// For a human.
    pub message: String,
}

/// What the controller does about one domain.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The protocol's step, as carried out (`Unfence` becomes `Idle` where the controller
    /// keeps the domain with its fenced node).
    pub step: ControllerStep,
    /// The status the domain should have (write it when it differs).
    pub status: DomainStatus,
    /// The drained node holding the domain, and where the domain stands in its drain.
    pub drain: Option<(String, Role)>,
    /// Events to publish after the write.
    pub notes: Vec<Note>,
    /// Why binding failed, for the metrics.
    pub refused: Option<Refused>,
    /// Why a requested move waits.
    pub wait: Option<MoveWait>,
    /// Why a move was approved (`Requested` or `Drain`).
    pub approved: Option<&'static str>,
    /// Why a move was cancelled (`Unwanted`, `Deleted`, `PendingTimeout`).
    pub cancelled: Option<&'static str>,
}

/// Why the request is what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Intent {
    /// The user's `spec.nodeName` (or a drain's move under way).
    User,
    /// A drain picked the target now.
    Drain,
    /// The pending move ran out of time.
    Expired,
}

/// The protocol's view of the nodes, for one domain.
struct Oracle<'a> {
    dom: &'a Domain,
    demand: &'a Result<Demand, Vec<Problem>>,
    cx: &'a Inputs<'a>,
    drain: bool,
    placement: RefCell<Option<Placement>>,
    wait: RefCell<Option<MoveWait>>,
}

impl NodeOracle for Oracle<'_> {
    fn fenced(&self, node: &str) -> bool {
        self.cx.cluster.fenced(node)
    }

    fn may_move(&self, source: &str, target: &str) -> bool {
        let inputs = MoveInputs {
            cluster: self.cx.cluster,
            usage: self.cx.usage,
            settings: self.cx.settings,
            backoff: self.cx.backoff,
            now: self.cx.now,
        };
        let wait = moves::check(self.dom, self.demand, source, target, self.drain, &inputs);
        let ok = wait.is_none();
        *self.wait.borrow_mut() = wait;
        ok
    }

    fn bind_to(&self, requested: Option<&str>) -> Option<NodeName> {
        let placement = binding::place(
            requested,
            self.demand,
            self.cx.cluster,
            self.cx.usage,
            self.cx.settings,
        );
        let node = match &placement {
            Placement::Bind { node, .. } => Some(node.clone()),
            Placement::Wait { .. } => None,
        };
        *self.placement.borrow_mut() = Some(placement);
        node
    }
}

/// The controller's decision about `dom`.
pub fn decide(dom: &Domain, cx: &Inputs<'_>) -> Decision {
    let mut facts = facts_of(dom);
    facts.requested = moves::requested_of(dom);
    let holder = facts.claim.holder.clone();
    let active = facts.claim.active_move().cloned();
    let record = dom.status.as_ref().and_then(|s| s.migration.as_ref());
    let demand = scheduler::demand(dom, cx.cluster);
    let mut intent = Intent::User;
    if record.is_some_and(|r| moves::pending_expired(r, cx.settings, cx.now))
        && active
            .as_ref()
            .is_some_and(|m| m.state == MigrationState::Pending)
    {
        facts.requested = holder.clone();
        intent = Intent::Expired;
    }

    // A drained holder: what the drain asks of this domain.
    let drained = holder
        .clone()
        .filter(|h| cx.cluster.node(h).is_some_and(NodeView::draining));
    let mut role = None;
    if let Some(h) = drained.as_deref()
        && !facts.deleting
    {
        match &active {
            Some(m) if m.source == h => role = Some(Role::Moving),
            Some(_) => {}
            None => match drain::ask(dom, h) {
                Ask::Move => match &demand {
                    Ok(d) => match scheduler::choose(
                        &moves::demand_leaving(dom, d, cx.cluster, h),
                        cx.cluster,
                        cx.usage,
                        cx.settings,
                        Some(h),
                    ) {
                        Ok(choice) => {
                            facts.requested = Some(choice.node);
                            intent = Intent::Drain;
                        }
                        Err(refused) => {
                            role = Some(Role::Blocked {
                                reason: "NoTarget",
                                message: format!(
                                    "node {h} is drained, but no other node can take this domain: {}",
                                    refused.message()
                                ),
                            })
                        }
                    },
                    Err(problems) => {
                        role = Some(Role::Blocked {
                            reason: "InvalidSpec",
                            message: format!(
                                "node {h} is drained, but this domain cannot be placed anywhere: {}",
                                problems
                                    .iter()
                                    .map(ToString::to_string)
                                    .collect::<Vec<_>>()
                                    .join("; ")
                            ),
                        })
                    }
                },
                Ask::Pinned => {
                    role = Some(Role::Blocked {
                        reason: "PinnedToNode",
                        message: format!(
                            "node {h} is drained, but spec.nodeName pins this domain to it: change spec.nodeName to another node, or clear it to let the scheduler pick one"
                        ),
                    })
                }
                Ask::Leave => role = Some(Role::Left),
                Ask::Shutdown => {
                    role = Some(Role::Blocked {
                        reason: "ShutdownNotSupported",
                        message: format!(
                            "node {h} is drained; evictionStrategy Shutdown is not carried out yet: stop the domain (runStrategy Halted) or use LiveMigrate"
                        ),
                    })
                }
                Ask::Requested => {}
            },
        }
    }

    let oracle = Oracle {
        dom,
        demand: &demand,
        cx,
        drain: intent == Intent::Drain,
        placement: RefCell::new(None),
        wait: RefCell::new(None),
    };
    let mut step = controller_step(&facts, &oracle);
    let mut held_on_fence = false;
    if let (ControllerStep::Unfence { .. }, Some(h)) = (&step, holder.as_deref())
        && !liveness::may_unfence(dom, h)
    {
        step = ControllerStep::Idle;
        held_on_fence = true;
    }
    let wait = oracle.wait.borrow().clone();
    let placement = oracle.placement.borrow().clone();

    let old = dom.status.clone().unwrap_or_default();
    let mut status = old.clone();
    let generation = dom.metadata.generation;
    let now = cx.now;
    let mut notes = Vec::new();
    let mut refused = None;
    let mut approved = None;
    let mut cancelled = None;
    match &step {
        ControllerStep::Bind { .. } | ControllerStep::Unschedulable => match placement {
            Some(Placement::Bind {
                node,
                reason,
                message,
            }) => {
                binding::bound(&mut status, &node, reason, &message, generation, now);
            }
            Some(Placement::Wait {
                reason,
                message,
                refused: r,
            }) => {
                binding::waiting(&mut status, reason, &message, generation, now);
                refused = r;
            }
            None => {}
        },
        ControllerStep::ApproveMove { source, target } => {
            let reason = if intent == Intent::Drain {
                moves::DRAIN
            } else {
                moves::REQUESTED
            };
            let copied = moves::volumes_to_copy(dom, cx.cluster, source).unwrap_or_default();
            moves::approved(&mut status, source, target, reason, copied, now);
            approved = Some(reason);
            notes.push(Note {
                warning: false,
                reason: "MoveApproved".into(),
                action: "Move",
                message: format!("move from {source} to {target} approved ({reason})"),
            });
        }
        ControllerStep::CancelMove => {
            let (label, why) = if facts.deleting {
                (
                    "Deleted",
                    "cancelled: the domain is being deleted".to_string(),
                )
            } else if intent == Intent::Expired {
                (
                    "PendingTimeout",
                    format!(
                        "cancelled: the source node's agent did not start the move within {}s",
                        cx.settings.pending_timeout.as_secs()
                    ),
                )
            } else {
                let now_wanted = match &facts.requested {
                    Some(n) => format!("spec.nodeName is now {n}"),
                    None => "spec.nodeName was cleared".to_string(),
                };
                ("Unwanted", format!("cancelled: {now_wanted}"))
            };
            moves::cancelled(&mut status, &why, now);
            cancelled = Some(label);
            notes.push(Note {
                warning: false,
                reason: "MoveCancelled".into(),
                action: "Move",
                message: why,
            });
        }
        ControllerStep::Unfence { holder: new } => {
            let fenced = holder.clone().unwrap_or_default();
            moves::unfenced(&mut status, &fenced, new.as_deref(), now);
            let message = match new {
                Some(n) => format!(
                    "node {fenced} was declared fenced during a migration to {n}: {n} holds the domain now"
                ),
                None => format!(
                    "node {fenced} was declared fenced: the domain is scheduled again on another node"
                ),
            };
            if new.is_none() {
                binding::waiting(&mut status, "NodeFenced", &message, generation, now);
            }
            notes.push(Note {
                warning: true,
                reason: "Unfenced".into(),
                action: "Unfence",
                message,
            });
        }
        ControllerStep::Idle | ControllerStep::Finalize | ControllerStep::MoveWaits => {}
    }

    // Where the domain stands in its node's drain, once the step is known.
    if drained.is_some() && role.is_none() && !facts.deleting {
        role = match (&step, &wait) {
            (ControllerStep::ApproveMove { .. }, _) => Some(Role::Moving),
            (ControllerStep::MoveWaits, Some(w)) if w.transient() => Some(Role::Waiting),
            (ControllerStep::MoveWaits, Some(w)) => Some(Role::Blocked {
                reason: w.reason(),
                message: format!("the node is drained, but this domain cannot leave: {w}"),
            }),
            _ => None,
        };
    }

    // The controller's own conditions.
    let blocked = matches!(role, Some(Role::Blocked { .. }));
    match (&step, &wait) {
        (ControllerStep::MoveWaits, Some(w)) if !blocked => {
            set(
                &mut status.conditions,
                MOVE_WAITING,
                status::TRUE,
                w.reason(),
                w.to_string(),
                generation,
                now,
            );
        }
        _ => {
            remove(&mut status.conditions, MOVE_WAITING);
        }
    }
    match &role {
        Some(Role::Blocked { reason, message }) => {
            set(
                &mut status.conditions,
                EVICTION_BLOCKED,
                status::TRUE,
                reason,
                message.clone(),
                generation,
                now,
            );
        }
        _ => {
            remove(&mut status.conditions, EVICTION_BLOCKED);
        }
    }
    let unreachable = status
        .node_name
        .as_deref()
        .and_then(|h| liveness::unreachable(h, cx.cluster.node(h), held_on_fence));
    match unreachable {
        Some((reason, message)) => {
            set(
                &mut status.conditions,
                NODE_UNREACHABLE,
                status::TRUE,
                reason,
                message,
                generation,
                now,
            );
        }
        None => {
            remove(&mut status.conditions, NODE_UNREACHABLE);
        }
    }
    notes.extend(condition_notes(&old.conditions, &status.conditions));

    Decision {
        step,
        status,
        drain: drained.zip(role),
        notes,
        refused,
        wait,
        approved,
        cancelled,
    }
}

/// Events for the controller's conditions that appeared or changed.
fn condition_notes(old: &[Condition], new: &[Condition]) -> Vec<Note> {
    let mut notes = Vec::new();
    for type_ in [SCHEDULED, MOVE_WAITING, EVICTION_BLOCKED, NODE_UNREACHABLE] {
        let Some(c) = find(new, type_) else { continue };
        let before = find(old, type_);
        if before
            .is_some_and(|b| b.status == c.status && b.reason == c.reason && b.message == c.message)
        {
            continue;
        }
        let (warning, reason, action) = match (type_, c.status.as_str()) {
            (SCHEDULED, status::TRUE) => (false, "Scheduled".to_string(), "Schedule"),
            (SCHEDULED, _) => (true, "FailedScheduling".to_string(), "Schedule"),
            (MOVE_WAITING, _) => (false, c.reason.clone(), "Move"),
            (EVICTION_BLOCKED, _) => (true, "EvictionBlocked".to_string(), "Evict"),
            _ => (true, "NodeUnreachable".to_string(), "Watch"),
        };
        notes.push(Note {
            warning,
            reason,
            action,
            message: c.message.clone(),
        });
    }
    notes
}
