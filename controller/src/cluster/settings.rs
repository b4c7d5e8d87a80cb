//! The controller's knobs, as the decisions use them (the command line maps onto these).

use std::time::Duration;

/// The field manager of every write the controller makes (status, labels, finalizers,
/// HypervisorNode conditions).
pub const FIELD_MANAGER: &str = "virtkube-controller";

/// The `reportingController` of the controller's events.
pub const REPORTER: &str = "virtkube-controller";

/// What the decisions depend on besides the cluster's objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// A HypervisorNode whose heartbeat is older than this is unreachable.
    pub heartbeat_grace: Duration,
    /// Moves under way (`Pending` or `Running`) in the whole cluster at most.
    pub max_migrations: usize,
    /// Moves under way out of one node at most.
    pub max_migrations_per_node: usize,
    /// Memory kept free on every node for the host itself, in bytes.
    pub memory_reserve: u64,
    /// A move still `Pending` this long after its approval (the source agent did not start
    /// it) is aborted.
    pub pending_timeout: Duration,
    /// The first wait before approving a move again after it failed or was aborted; it
    /// doubles with every further failure of the same move.
    pub move_backoff: Duration,
    /// The longest such wait.
    pub move_backoff_max: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            heartbeat_grace: Duration::from_secs(90),
            max_migrations: 5,
            max_migrations_per_node: 2,
            memory_reserve: 1 << 30,
            pending_timeout: Duration::from_secs(300),
            move_backoff: Duration::from_secs(30),
            move_backoff_max: Duration::from_secs(600),
        }
    }
}
