//! Kubernetes-convention conditions (`metav1.Condition`), shared by every kind.
//!
//! Every kind carries `Ready`; kind-specific types are listed beside it. Reasons are
//! CamelCase words a human can grep for; libvirt's own state reasons are carried in them
//! (`Crashed`, `Destroyed`, …) so the status tells what libvirt said.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// The summary condition on every kind: the object is what its spec asks for.
pub const READY: &str = "Ready";
/// Domain: a node has been chosen (`spec.nodeName` or the scheduler).
pub const SCHEDULED: &str = "Scheduled";
/// Domain: the guest is running on its node.
pub const RUNNING: &str = "Running";
/// Domain: a live migration is in progress.
pub const MIGRATING: &str = "Migrating";
/// Domain: a change in the spec waits for the guest to stop (machine type, firmware, …).
pub const RESTART_REQUIRED: &str = "RestartRequired";
/// Domain, Volume: the spec cannot be realized as written (a missing pool, a shrink, …).
pub const SPEC_VALID: &str = "SpecValid";
/// Every kind: the libvirt object exists and carries virtkube's ownership mark.
pub const DEFINED: &str = "Defined";

/// `status` values of a condition.
pub mod status {
    /// The condition holds.
    pub const TRUE: &str = "True";
    /// The condition does not hold.
    pub const FALSE: &str = "False";
    /// Not known yet.
    pub const UNKNOWN: &str = "Unknown";
}

/// Builds a condition; `last_transition_time` is `now` and is kept by [`set_condition`] when
/// the status did not change.
pub fn condition(
    type_: &str,
    status: &str,
    reason: &str,
    message: impl Into<String>,
    observed_generation: Option<i64>,
    now: Time,
) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message: message.into(),
        observed_generation,
        last_transition_time: now,
    }
}

/// Inserts or replaces the condition of the same type. The transition time moves only when the
/// status changes, as the API conventions require (so GitOps tools and `kubectl wait` see a
/// stable object in steady state). Returns whether anything changed.
pub fn set_condition(conditions: &mut Vec<Condition>, mut new: Condition) -> bool {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(existing) => {
            if existing.status == new.status {
                new.last_transition_time = existing.last_transition_time.clone();
            }
            let changed = *existing != new;
            *existing = new;
            changed
        }
        None => {
            conditions.push(new);
            true
        }
    }
}

/// The condition of `type_`, if present.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether the condition of `type_` is present with status `True`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    find(conditions, type_).is_some_and(|c| c.status == status::TRUE)
}

#[cfg(test)]
mod tests {
    use super::*;
    fn at(second: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(1_767_225_600 + second).unwrap())
    }

    #[test]
    fn transition_time_moves_only_when_status_changes() {
        let mut conditions = Vec::new();
        assert!(set_condition(
            &mut conditions,
            condition(READY, status::FALSE, "Defining", "", Some(1), at(1))
        ));
        assert!(!set_condition(
            &mut conditions,
            condition(READY, status::FALSE, "Defining", "", Some(1), at(2))
        ));
        assert_eq!(conditions[0].last_transition_time, at(1));
        assert!(set_condition(
            &mut conditions,
            condition(READY, status::FALSE, "Starting", "", Some(1), at(3))
        ));
        assert_eq!(
            conditions[0].last_transition_time,
            at(1),
            "same status keeps the time"
        );
        assert!(set_condition(
            &mut conditions,
            condition(READY, status::TRUE, "Running", "", Some(1), at(4))
        ));
        assert_eq!(conditions[0].last_transition_time, at(4));
        assert_eq!(conditions.len(), 1);
        assert!(is_true(&conditions, READY));
        assert!(!is_true(&conditions, RUNNING));
    }
}
