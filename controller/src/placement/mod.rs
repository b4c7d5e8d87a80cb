//! The placement protocol: which node may run a domain, and how a domain moves between
//! nodes. The agents and the cluster controller both act through the pure decisions here;
//! `tests/placement_model.rs` explores every interleaving of them (two agents, the
//! controller, user edits, deletions, crashes, stale reads, libvirt finishing or failing a
//! migration on its own, a node lost and fenced) and checks the guarantees below in every
//! reachable state.
//!
//! # The claim
//!
//! A Domain's `status.nodeName` is its **holder**: the one node allowed to define, start or
//! resume it. `spec.nodeName` is only a request. `status.migration` (its `state`,
//! `sourceNode` and `targetNode`) records a move the controller approved. Together these
//! fields are the **claim** ([`Claim`]). Every write of the claim is a compare-and-swap: it
//! carries the `resourceVersion` of the read it was decided on, and the API server refuses
//! it (409) when anything changed since; the writer then reads again and decides again.
//!
//! # Guarantees (as kube-runtime writes down its finalizer's)
//!
//! 1. **Never on two nodes.** At most one node runs the guest at any moment.
//! 2. **Only the holder gives the claim away** (completing a move it made), with one
//!    exception: the controller resets the claim of a node an administrator declared
//!    fenced (its guests are dead by that declaration). So a live agent's read that names
//!    it the holder stays true until that agent acts: nothing it decides as the holder is
//!    undone behind its back. The target of a move never writes the claim, even once the
//!    guest runs there; it waits for the source (or the fencing).
//! 3. **A move is a handover.** A stopped domain is undefined on the source before the
//!    claim names the target (which then defines it from the spec); a running one is
//!    live-migrated by libvirt and the claim moves after libvirt reports it complete. A
//!    failed migration leaves the guest running on the source.
//! 4. **Observe libvirt, then read the API, then act.** An agent decides from a read of the
//!    API taken *after* it looked at its libvirt: a copy that appeared through a migration
//!    is then always explained by the claim it reads. Removing a copy this node does not
//!    hold never touches a copy with a migration job, and only undefines (never destroys)
//!    a copy that was stopped when observed.
//! 5. **Never lost.** Once users stop editing and nodes stop failing, the domain ends up
//!    running on exactly one node (the requested one when it can), or, when deleted, gone
//!    from every node before its finalizer is removed.
//!
//! The controller never talks to libvirt: it binds unplaced domains, approves moves within
//! the migration limits, cancels moves nobody wants any more, and resets the claims of
//! fenced nodes. The agents carry everything out.

pub mod write;

use virtkube_crds::domain::MigrationState;

/// A node's name (the `HypervisorNode` name).
pub type NodeName = String;

/// The protocol's part of a Domain's status: who holds it and which move is under way.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Claim {
    /// `status.nodeName`: the node allowed to run the domain, once bound.
    pub holder: Option<NodeName>,
    /// The move recorded in `status.migration`, if any (finished ones too).
    pub migration: Option<Move>,
}

impl Claim {
    /// The move under way (`Pending` or `Running`), if any.
    pub fn active_move(&self) -> Option<&Move> {
        self.migration.as_ref().filter(|m| m.is_active())
    }
}

/// A move of a domain from one node to another, as `status.migration` records it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Move {
    /// The node the domain leaves (the holder when the move was approved).
    pub source: NodeName,
    /// The node it goes to.
    pub target: NodeName,
    /// Where the move is.
    pub state: MigrationState,
}

impl Move {
    /// Whether the move is under way (`Pending` or `Running`).
    pub fn is_active(&self) -> bool {
        matches!(
            self.state,
            MigrationState::Pending | MigrationState::Running
        )
    }
}

/// One read of a Domain, reduced to what the protocol decides on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Facts {
    /// `metadata.deletionTimestamp` is set.
    pub deleting: bool,
    /// `spec.nodeName`: where the user wants it (`None`: anywhere).
    pub requested: Option<NodeName>,
    /// The claim.
    pub claim: Claim,
}

/// What one node's libvirt has of the domain (a libvirt domain carrying virtkube's mark for
/// this very resource).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Local {
    /// No such libvirt domain.
    Absent,
    /// Defined, shut off.
    Stopped,
    /// Running or paused by the user: the guest holds its memory and can execute.
    Running,
    /// Running, with an outbound migration job.
    Outgoing,
    /// Waiting for an inbound migration's switch-over (a migration job on this side).
    Incoming,
}

impl Local {
    /// Whether the guest can execute here (the copy that "never on two nodes" counts).
    pub fn is_running(self) -> bool {
        matches!(self, Local::Running | Local::Outgoing)
    }

    /// Whether a migration job holds this copy.
    pub fn in_migration(self) -> bool {
        matches!(self, Local::Outgoing | Local::Incoming)
    }
}

/// Why a move ends without the domain reaching its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MoveEnd {
    /// libvirt's migration failed; the guest stays on the source.
    Failed,
    /// Nobody wants the move any more (the request changed, or the domain is deleted).
    Aborted,
}

impl MoveEnd {
    /// The `status.migration.state` it is recorded as.
    pub fn state(self) -> MigrationState {
        match self {
            MoveEnd::Failed => MigrationState::Failed,
            MoveEnd::Aborted => MigrationState::Aborted,
        }
    }
}

/// What an agent does next about one domain.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AgentStep {
    /// Nothing of this domain is this node's business.
    Idle,
    /// This node holds the domain and no move is under way: bring it to its spec here.
    Converge,
    /// Record that the approved move starts (claim write: `Pending` → `Running`).
    BeginMove {
        /// Where it goes.
        target: NodeName,
    },
    /// Start the live migration in libvirt (the claim already says `Running`).
    Migrate {
        /// Where it goes.
        target: NodeName,
    },
    /// A migration job is under way here: watch it (and enforce its time limits).
    WatchMigration {
        /// Where it goes.
        target: NodeName,
    },
    /// The move is no longer wanted while libvirt migrates: abort the job (the guest
    /// stays here).
    AbortMigration,
    /// A cold move: undefine the stopped domain here; the claim is handed over next.
    Undefine,
    /// Hand the claim to the target (claim write: holder := target, `Succeeded`).
    CompleteMove {
        /// The new holder.
        target: NodeName,
    },
    /// End the move without reaching the target (claim write: `Failed` or `Aborted`).
    EndMove {
        /// How it ended.
        end: MoveEnd,
    },
    /// Look at this node's libvirt again (the look before the read may predate a migration
    /// that moved the guest here), then decide again.
    LookAgain,
    /// Look at the move's target's libvirt after this read, then decide again: the copy on
    /// the source is gone, and the move may have completed.
    LookAtTarget {
        /// The node to look at.
        target: NodeName,
    },
    /// Deleting: shut down and undefine the copy here.
    RemoveCopy,
    /// Deleting, nothing left here: remove the finalizer.
    Finalize,
    /// A copy here that this node does not hold: remove it, but only the very copy that
    /// was observed (same libvirt runtime id when running; still shut off when stopped) and
    /// never one a migration job holds.
    RemoveStaleCopy,
    /// Another actor has to act first.
    Wait {
        /// Why, for logs and conditions.
        why: &'static str,
    },
}

impl AgentStep {
    /// Whether this step can make a guest run on this node (it must then be decided on a
    /// read of the API taken after libvirt was observed; see the module's rule 4).
    pub fn may_start_guest(&self) -> bool {
        matches!(self, AgentStep::Converge)
    }
}

/// What an agent saw of libvirt around one read of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Look {
    /// This node's copy, observed *before* the read.
    pub before: Local,
    /// This node's copy, observed again *after* the read (after an [`AgentStep::LookAgain`]).
    pub after: Option<Local>,
    /// The move's target's copy, observed after the read (after an
    /// [`AgentStep::LookAtTarget`]).
    pub target: Option<Local>,
}

impl Look {
    /// Only the look before the read.
    pub fn before(before: Local) -> Look {
        Look {
            before,
            after: None,
            target: None,
        }
    }
}

/// The agent's decision for domain `facts` on node `me`, from what it saw of libvirt
/// around the read of `facts`.
///
/// Which look a decision rests on matters, because reads and looks are minutes apart in
/// the worst case and migrations happen in between:
/// - removing a copy this node does not hold rests on the look *before* the read (every
///   copy seen then is explained by the claim read afterwards), and the removal touches only
///   that very copy;
/// - concluding that the guest left this node rests on a look *after* the read (a look
///   before it may predate the guest's arrival here), and leads only to claim writes, which
///   fail if anything changed since the read;
/// - converging as the holder needs neither: nobody else can take the claim away.
pub fn agent_step(me: &str, facts: &Facts, look: &Look) -> AgentStep {
    let here = look.before;
    let holder = facts.claim.holder.as_deref();
    let active = facts.claim.active_move();
    match holder {
        Some(h) if h == me => match active {
            Some(m) if m.source == me => match look.after {
                None => AgentStep::LookAgain,
                Some(after) => holder_moving(facts, m, after, look.target),
            },
            // A recorded move that does not start here cannot be under way while this node
            // holds the domain; wait for whoever recorded it to end it.
            Some(_) => AgentStep::Wait {
                why: "a move recorded from another node is still open",
            },
            None if here == Local::Incoming => AgentStep::Wait {
                why: "an inbound migration job is still open here",
            },
            None if facts.deleting => match here {
                Local::Absent => AgentStep::Finalize,
                Local::Outgoing => AgentStep::AbortMigration,
                _ => AgentStep::RemoveCopy,
            },
            None if here == Local::Outgoing => AgentStep::AbortMigration,
            None => AgentStep::Converge,
        },
        Some(other) => match active {
            // The target of a move never writes the claim: the source completes the move
            // once it sees its copy gone (or the controller, if the source is fenced). So
            // only the holder ever gives its own claim away, and a holder's read stays true
            // until it acts.
            Some(m) if m.target == me && m.source == other => match here {
                Local::Absent => AgentStep::Idle,
                _ => AgentStep::Wait {
                    why: "the guest is moving here: the source completes the move",
                },
            },
            _ if here.in_migration() => AgentStep::Wait {
                why: "a migration job holds the copy here",
            },
            _ if here == Local::Absent => AgentStep::Idle,
            _ => AgentStep::RemoveStaleCopy,
        },
        None => match here {
            Local::Absent => AgentStep::Idle,
            l if l.in_migration() => AgentStep::Wait {
                why: "a migration job holds the copy here",
            },
            _ => AgentStep::RemoveStaleCopy,
        },
    }
}

/// The holder's decision while a move from it is recorded; `here` was looked at after the
/// read.
fn holder_moving(facts: &Facts, m: &Move, here: Local, target: Option<Local>) -> AgentStep {
    let unwanted = facts.deleting || facts.requested.as_deref() != Some(m.target.as_str());
    let target_node = m.target.clone();
    match (m.state, here) {
        (_, Local::Incoming) => AgentStep::Wait {
            why: "an inbound migration job is still open here",
        },
        // The copy here is gone: either libvirt completed the migration, or a cold move
        // undefined it already. Which one only the target can say.
        (_, Local::Absent) => match target {
            None => AgentStep::LookAtTarget {
                target: target_node,
            },
            Some(Local::Incoming | Local::Outgoing) => AgentStep::Wait {
                why: "the target still has an open migration job",
            },
            // Running there (completed), or nothing anywhere (a cold move half done): either
            // way the target may hold it now; nothing runs here.
            Some(_) => AgentStep::CompleteMove {
                target: target_node,
            },
        },
        (MigrationState::Pending, _) if unwanted => AgentStep::EndMove {
            end: MoveEnd::Aborted,
        },
        (MigrationState::Pending, Local::Running | Local::Stopped) => AgentStep::BeginMove {
            target: target_node,
        },
        (_, Local::Outgoing) if unwanted => AgentStep::AbortMigration,
        (_, Local::Outgoing) => AgentStep::WatchMigration {
            target: target_node,
        },
        // `Running` with a stopped copy here: a cold move.
        (_, Local::Stopped) if unwanted => AgentStep::EndMove {
            end: MoveEnd::Aborted,
        },
        (_, Local::Stopped) => AgentStep::Undefine,
        // `Running` and the guest runs here without a job: the migration has not started
        // yet (an agent restart between the claim write and libvirt's call) or libvirt
        // failed it (the guest stayed here).
        (_, Local::Running) if unwanted => AgentStep::EndMove {
            end: MoveEnd::Aborted,
        },
        (_, Local::Running) => AgentStep::Migrate {
            target: target_node,
        },
    }
}

/// What the controller knows about the nodes when it decides for one domain.
pub trait NodeOracle {
    /// Whether an administrator declared `node` fenced (its guests are dead).
    fn fenced(&self, node: &str) -> bool;
    /// Whether a move of this domain from `source` to `target` may be approved now: the
    /// target is ready and fits, and the migration limits allow one more.
    fn may_move(&self, source: &str, target: &str) -> bool;
    /// Where to bind an unplaced domain: `requested` when it fits, otherwise the
    /// scheduler's choice; `None` when no node fits.
    fn bind_to(&self, requested: Option<&str>) -> Option<NodeName>;
}

/// What the controller does next about one domain.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ControllerStep {
    /// Nothing.
    Idle,
    /// Bind the unplaced domain (claim write: holder := node).
    Bind {
        /// The node chosen.
        node: NodeName,
    },
    /// Nothing fits: record why (no claim write).
    Unschedulable,
    /// Approve the requested move (claim write: `status.migration` := `Pending`).
    ApproveMove {
        /// The holder.
        source: NodeName,
        /// The requested node.
        target: NodeName,
    },
    /// A pending move nobody wants any more (claim write: `Aborted`).
    CancelMove,
    /// The holder is fenced: give the claim to whoever may have the guest (the target of
    /// a running migration) or to nobody, so it is bound again; an open move is recorded
    /// as `Aborted`.
    Unfence {
        /// The new holder (`None`: unbound).
        holder: Option<NodeName>,
    },
    /// Deleting an unbound domain: remove the finalizer.
    Finalize,
    /// The requested move waits (a limit, or the target is not ready).
    MoveWaits,
}

/// The controller's decision for domain `facts`, given what it knows of the nodes.
pub fn controller_step(facts: &Facts, nodes: &dyn NodeOracle) -> ControllerStep {
    let holder = facts.claim.holder.as_deref();
    let active = facts.claim.active_move();
    if let Some(h) = holder
        && nodes.fenced(h)
    {
        return ControllerStep::Unfence {
            holder: active
                .filter(|m| m.state == MigrationState::Running && m.source == h)
                .map(|m| m.target.clone())
                .filter(|t| !nodes.fenced(t)),
        };
    }
    match (holder, active) {
        (None, _) if facts.deleting => ControllerStep::Finalize,
        (None, _) => match nodes.bind_to(facts.requested.as_deref()) {
            Some(node) => ControllerStep::Bind { node },
            None => ControllerStep::Unschedulable,
        },
        (Some(_), Some(m)) if m.state == MigrationState::Pending => {
            if facts.deleting || facts.requested.as_deref() != Some(m.target.as_str()) {
                ControllerStep::CancelMove
            } else {
                ControllerStep::Idle
            }
        }
        (Some(_), Some(_)) => ControllerStep::Idle,
        (Some(_), None) if facts.deleting => ControllerStep::Idle,
        (Some(h), None) => match facts.requested.as_deref() {
            Some(t) if t != h => {
                if nodes.may_move(h, t) {
                    ControllerStep::ApproveMove {
                        source: h.to_string(),
                        target: t.to_string(),
                    }
                } else {
                    ControllerStep::MoveWaits
                }
            }
            _ => ControllerStep::Idle,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(holder: Option<&str>, requested: Option<&str>, mv: Option<Move>) -> Facts {
        Facts {
            deleting: false,
            requested: requested.map(str::to_string),
            claim: Claim {
                holder: holder.map(str::to_string),
                migration: mv,
            },
        }
    }

    fn mv(source: &str, target: &str, state: MigrationState) -> Option<Move> {
        Some(Move {
            source: source.into(),
            target: target.into(),
            state,
        })
    }

    fn look(before: Local, after: Option<Local>, target: Option<Local>) -> Look {
        Look {
            before,
            after,
            target,
        }
    }

    #[test]
    fn only_the_holder_converges() {
        let f = facts(Some("a"), Some("a"), None);
        let absent = Look::before(Local::Absent);
        assert_eq!(agent_step("a", &f, &absent), AgentStep::Converge);
        assert_eq!(agent_step("b", &f, &absent), AgentStep::Idle);
        // spec.nodeName alone never makes a node start the guest.
        let unbound = facts(None, Some("b"), None);
        assert_eq!(agent_step("b", &unbound, &absent), AgentStep::Idle);
    }

    #[test]
    fn a_copy_the_node_does_not_hold_is_removed_unless_a_migration_holds_it() {
        let f = facts(Some("a"), Some("a"), None);
        assert_eq!(
            agent_step("b", &f, &Look::before(Local::Running)),
            AgentStep::RemoveStaleCopy
        );
        assert!(matches!(
            agent_step("b", &f, &Look::before(Local::Incoming)),
            AgentStep::Wait { .. }
        ));
    }

    #[test]
    fn the_target_waits_for_the_source_even_when_the_guest_runs_there() {
        let f = facts(Some("a"), Some("b"), mv("a", "b", MigrationState::Running));
        assert!(matches!(
            agent_step("b", &f, &Look::before(Local::Running)),
            AgentStep::Wait { .. }
        ));
        assert!(matches!(
            agent_step("b", &f, &Look::before(Local::Incoming)),
            AgentStep::Wait { .. }
        ));
        assert_eq!(
            agent_step("b", &f, &Look::before(Local::Absent)),
            AgentStep::Idle
        );
    }

    #[test]
    fn the_source_looks_at_the_target_before_concluding_anything_from_an_empty_node() {
        let f = facts(Some("a"), Some("b"), mv("a", "b", MigrationState::Running));
        // The look before the read may predate the guest's arrival here: look again.
        assert_eq!(
            agent_step("a", &f, &Look::before(Local::Absent)),
            AgentStep::LookAgain
        );
        assert_eq!(
            agent_step("a", &f, &look(Local::Absent, Some(Local::Absent), None)),
            AgentStep::LookAtTarget { target: "b".into() }
        );
        assert_eq!(
            agent_step(
                "a",
                &f,
                &look(Local::Absent, Some(Local::Absent), Some(Local::Running))
            ),
            AgentStep::CompleteMove { target: "b".into() }
        );
        // Deleting does not change that: the guest may be running on the target.
        let mut deleting = f.clone();
        deleting.deleting = true;
        assert_eq!(
            agent_step(
                "a",
                &deleting,
                &look(Local::Absent, Some(Local::Absent), None)
            ),
            AgentStep::LookAtTarget { target: "b".into() }
        );
    }

    #[test]
    fn a_move_nobody_wants_is_ended_and_the_guest_stays() {
        let f = facts(Some("a"), Some("a"), mv("a", "b", MigrationState::Running));
        assert_eq!(
            agent_step("a", &f, &look(Local::Outgoing, Some(Local::Outgoing), None)),
            AgentStep::AbortMigration
        );
        assert_eq!(
            agent_step("a", &f, &look(Local::Running, Some(Local::Running), None)),
            AgentStep::EndMove {
                end: MoveEnd::Aborted
            }
        );
    }

    struct Nodes {
        fenced: Vec<&'static str>,
        room: bool,
    }

    impl NodeOracle for Nodes {
        fn fenced(&self, node: &str) -> bool {
            self.fenced.contains(&node)
        }
        fn may_move(&self, _: &str, _: &str) -> bool {
            self.room
        }
        fn bind_to(&self, requested: Option<&str>) -> Option<NodeName> {
            Some(requested.unwrap_or("a").to_string())
        }
    }

    #[test]
    fn the_controller_binds_approves_and_unfences() {
        let nodes = Nodes {
            fenced: vec![],
            room: true,
        };
        assert_eq!(
            controller_step(&facts(None, Some("b"), None), &nodes),
            ControllerStep::Bind { node: "b".into() }
        );
        assert_eq!(
            controller_step(&facts(Some("a"), Some("b"), None), &nodes),
            ControllerStep::ApproveMove {
                source: "a".into(),
                target: "b".into()
            }
        );
        let full = Nodes {
            fenced: vec![],
            room: false,
        };
        assert_eq!(
            controller_step(&facts(Some("a"), Some("b"), None), &full),
            ControllerStep::MoveWaits
        );
        let fenced = Nodes {
            fenced: vec!["a"],
            room: true,
        };
        // A running migration's target may have the guest: it becomes the holder.
        assert_eq!(
            controller_step(
                &facts(Some("a"), Some("b"), mv("a", "b", MigrationState::Running)),
                &fenced
            ),
            ControllerStep::Unfence {
                holder: Some("b".into())
            }
        );
        assert_eq!(
            controller_step(&facts(Some("a"), None, None), &fenced),
            ControllerStep::Unfence { holder: None }
        );
    }
}
