//! Node drain: a Kubernetes Node that is cordoned (`kubectl cordon`, `kubectl drain`) or
//! carries the `virtkube.io/drain` taint has its domains moved away according to their
//! `evictionStrategy`, within the migration limits. Pure: what the drain asks of each
//! domain, and the progress shown on the HypervisorNode.
//!
//! | evictionStrategy | `spec.nodeName` | what happens |
//! |---|---|---|
//! | `LiveMigrate`, `LiveMigrateIfPossible` | unset | the scheduler picks a target (not this node) and a move is approved with reason `Drain` |
//! | any | another node | the requested move, as always |
//! | any but `None` | this node | nothing: `EvictionBlocked` (`PinnedToNode`) asks to change or clear `spec.nodeName` |
//! | `None` | unset | left where it is |
//! | `Shutdown` | unset | not done yet: `EvictionBlocked` (`ShutdownNotSupported`) |

use virtkube_crds::Domain;
use virtkube_crds::domain::{EvictionStrategy, MigrationState};

use super::moves::DRAIN;

/// What the drain of its node asks of a domain held there with no move under way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// Move it to a node the scheduler picks.
    Move,
    /// The user's `spec.nodeName` pins it to the drained node.
    Pinned,
    /// `evictionStrategy: None`: leave it.
    Leave,
    /// `evictionStrategy: Shutdown`: not supported yet.
    Shutdown,
    /// `spec.nodeName` names another node: the requested move does it.
    Requested,
}

/// What draining `node` asks of `dom`, which `node` holds.
pub fn ask(dom: &Domain, node: &str) -> Ask {
    match (dom.spec.node_name.as_deref(), dom.spec.eviction_strategy) {
        (Some(n), EvictionStrategy::None) if n == node => Ask::Leave,
        (Some(n), _) if n == node => Ask::Pinned,
        (Some(_), _) => Ask::Requested,
        (None, EvictionStrategy::None) => Ask::Leave,
        (None, EvictionStrategy::Shutdown) => Ask::Shutdown,
        (None, EvictionStrategy::LiveMigrate | EvictionStrategy::LiveMigrateIfPossible) => {
            Ask::Move
        }
    }
}

/// Where a domain held by a drained node stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// A move out of the node is under way (or was approved just now).
    Moving,
    /// A move is wanted and waits (a limit, a backoff, a target not ready).
    Waiting,
    /// It cannot leave without someone acting: `EvictionBlocked` says why.
    Blocked {
        /// The condition reason.
        reason: &'static str,
        /// The condition message.
        message: String,
    },
    /// `evictionStrategy: None`: the drain leaves it.
    Left,
}

/// The node a domain was moved off by a drain (its last move: `Succeeded`, reason `Drain`).
pub fn moved_from(dom: &Domain) -> Option<&str> {
    let m = dom.status.as_ref()?.migration.as_ref()?;
    (m.state == Some(MigrationState::Succeeded) && m.reason.as_deref() == Some(DRAIN))
        .then_some(m.source_node.as_deref())
        .flatten()
}

/// A drained node's progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    /// Domains whose last move took them off this node for the drain.
    pub moved: usize,
    /// Moves under way out of the node.
    pub moving: usize,
    /// Moves wanted and waiting.
    pub waiting: usize,
    /// Domains that cannot leave without someone acting.
    pub blocked: usize,
    /// Domains the drain leaves alone.
    pub left: usize,
}

impl Progress {
    /// Counts one domain's role.
    pub fn count(&mut self, role: &Role) {
        match role {
            Role::Moving => self.moving += 1,
            Role::Waiting => self.waiting += 1,
            Role::Blocked { .. } => self.blocked += 1,
            Role::Left => self.left += 1,
        }
    }

    /// The `Draining` condition's reason: `Draining` while moves are under way or waiting,
    /// `DrainBlocked` when only blocked domains keep it from completing, `Drained` when
    /// nothing that should leave is left.
    pub fn reason(&self) -> &'static str {
        if self.moving + self.waiting > 0 {
            "Draining"
        } else if self.blocked > 0 {
            "DrainBlocked"
        } else {
            "Drained"
        }
    }

    /// The condition message: the counts.
    pub fn message(&self) -> String {
        format!(
            "{} moved, {} moving, {} waiting, {} blocked (see their EvictionBlocked condition), {} left in place (evictionStrategy None)",
            self.moved, self.moving, self.waiting, self.blocked, self.left
        )
    }
}
