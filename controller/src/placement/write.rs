//! The protocol's contact with the API server: reading the claim out of a Domain, the
//! per-node label agents select on, and the one way a Domain's status is written — a
//! compare-and-swap on the `resourceVersion` the writer decided on.

use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use virtkube_crds::Domain;
use virtkube_crds::domain::DomainStatus;

use super::{Claim, Facts, Move};

/// The prefix of the per-node labels (`node.virtkube.io/<node>`) that route objects to the
/// agents: the controller sets one on a Domain for its holder (value `holder`) and, while a
/// move is under way, one for the target (value `target`). Each agent watches only objects
/// carrying its own key.
pub const NODE_LABEL_PREFIX: &str = "node.virtkube.io/";

/// The label value for the holder.
pub const HOLDER: &str = "holder";

/// The label value for the target of a move under way.
pub const TARGET: &str = "target";

/// The per-node label key of `node`. A label name is at most 63 characters of
/// `[-A-Za-z0-9_.]`; a node name (a DNS subdomain of up to 253) is shortened with a hash
/// when longer.
pub fn node_label(node: &str) -> String {
    format!("{NODE_LABEL_PREFIX}{}", short_node_name(node))
}

/// `node`, or its first 46 characters and a 16-digit hash when it is longer than 63.
pub fn short_node_name(node: &str) -> String {
    if node.len() <= 63 {
        return node.to_string();
    }
    let hash = node.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let mut head = node.to_string();
    let mut end = 46;
    while !head.is_char_boundary(end) {
        end -= 1;
    }
    head.truncate(end);
    format!("{head}-{hash:016x}")
}

/// The claim recorded in a Domain's status.
pub fn claim_of(status: Option<&DomainStatus>) -> Claim {
    let Some(status) = status else {
        return Claim::default();
    };
    Claim {
        holder: status.node_name.clone(),
        migration: status.migration.as_ref().and_then(|m| {
            Some(Move {
                source: m.source_node.clone()?,
                target: m.target_node.clone()?,
                state: m.state?,
            })
        }),
    }
}

/// The `status.migration.reason` of a move the controller approved to drain a node.
pub const DRAIN: &str = "Drain";

/// What the protocol decides on, read from `dom`.
///
/// The request is `spec.nodeName`; when that is empty, a drain's move under way is wanted
/// too (its target is the request), so the agent does not abort a move that only the
/// controller asked for. A drain never writes `spec.nodeName`: that would be drift for the
/// GitOps tool that owns the spec.
pub fn facts_of(dom: &Domain) -> Facts {
    let claim = claim_of(dom.status.as_ref());
    let drained_to = || {
        let reason = dom.status.as_ref()?.migration.as_ref()?.reason.as_deref();
        let target = claim.active_move()?.target.clone();
        (reason == Some(DRAIN)).then_some(target)
    };
    let requested = dom.spec.node_name.clone().or_else(drained_to);
    Facts {
        deleting: dom.metadata.deletion_timestamp.is_some(),
        requested,
        claim,
    }
}

/// Why a compare-and-swap write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The object changed since it was read (409, or a failed `test` answered 422): read it
    /// again and decide again.
    #[error("{kind} {name} changed since it was read (resourceVersion {rv}): deciding again")]
    Conflict {
        /// The kind.
        kind: String,
        /// The object's name.
        name: String,
        /// The resourceVersion the write was decided on.
        rv: String,
    },
    /// The object is gone.
    #[error("{kind} {name} no longer exists")]
    Gone {
        /// The kind.
        kind: String,
        /// The object's name.
        name: String,
    },
    /// The object as read had no resourceVersion (not a stored object).
    #[error("{kind} {name} has no resourceVersion: only stored objects can be written")]
    NoVersion {
        /// The kind.
        kind: String,
        /// The object's name.
        name: String,
    },
    /// The patch could not be built.
    #[error("building the status patch failed: {0}")]
    Encode(#[source] serde_json::Error),
    /// Any other API failure.
    #[error("writing the status failed: {0}")]
    Kube(#[source] kube::Error),
}

impl WriteError {
    /// Whether reading again and deciding again is the answer.
    pub fn is_conflict(&self) -> bool {
        matches!(self, WriteError::Conflict { .. })
    }
}

/// Writes `status` as the whole status of `read` (as it was read), only if the object has
/// not changed since: a JSON patch to the status subresource that tests
/// `metadata.resourceVersion` and then replaces `/status`. Because nothing can have changed
/// in between, replacing the whole status keeps every field another writer set before the
/// read, and a writer that decided on an old read loses instead of overwriting.
///
/// The API server answers a failed `test` with 422 (and a stale resourceVersion elsewhere
/// with 409); both come back as [`WriteError::Conflict`].
pub async fn write_status<K, S>(
    api: &Api<K>,
    read: &K,
    status: &S,
    field_manager: &str,
) -> Result<K, WriteError>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
    S: Serialize,
{
    let kind = K::kind(&()).to_string();
    let name = read.name_any();
    let rv = read
        .resource_version()
        .ok_or_else(|| WriteError::NoVersion {
            kind: kind.clone(),
            name: name.clone(),
        })?;
    let value = serde_json::to_value(status).map_err(WriteError::Encode)?;
    let ops = json!([
        {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
        {"op": "add", "path": "/status", "value": value},
    ]);
    let patch: json_patch::Patch = serde_json::from_value(ops).map_err(WriteError::Encode)?;
    let params = PatchParams {
        field_manager: Some(field_manager.to_string()),
        ..PatchParams::default()
    };
    match api
        .patch_status(&name, &params, &Patch::Json::<()>(patch))
        .await
    {
        Ok(obj) => Ok(obj),
        Err(kube::Error::Api(e)) if e.code == 409 || e.code == 422 => {
            Err(WriteError::Conflict { kind, name, rv })
        }
        Err(kube::Error::Api(e)) if e.code == 404 => Err(WriteError::Gone { kind, name }),
        Err(e) => Err(WriteError::Kube(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtkube_crds::domain::{MigrationState, MigrationStatus};

    #[test]
    fn a_drain_move_is_wanted_without_spec_node_name_a_requested_one_is_not() {
        let mut dom = Domain::new(
            "vm",
            serde_json::from_value(serde_json::json!({
                "memory": {"size": "64Mi"}
            }))
            .expect("spec"),
        );
        dom.status = Some(DomainStatus {
            node_name: Some("a".into()),
            migration: Some(MigrationStatus {
                state: Some(MigrationState::Running),
                source_node: Some("a".into()),
                target_node: Some("b".into()),
                reason: Some(DRAIN.into()),
                ..MigrationStatus::default()
            }),
            ..DomainStatus::default()
        });
        assert_eq!(facts_of(&dom).requested.as_deref(), Some("b"));
        if let Some(m) = dom.status.as_mut().and_then(|s| s.migration.as_mut()) {
            m.reason = Some("Requested".into());
        }
        assert_eq!(
            facts_of(&dom).requested,
            None,
            "the user withdrew the request"
        );
        dom.spec.node_name = Some("c".into());
        assert_eq!(facts_of(&dom).requested.as_deref(), Some("c"));
    }

    #[test]
    fn node_labels_stay_within_label_limits() {
        assert_eq!(node_label("node-a"), "node.virtkube.io/node-a");
        let long = "n".repeat(200);
        let key = node_label(&long);
        let name = key.trim_start_matches(NODE_LABEL_PREFIX);
        assert!(name.len() <= 63, "{name}");
        assert_ne!(key, node_label(&format!("{}x", "n".repeat(199))));
    }

    #[test]
    fn a_migration_record_without_its_nodes_is_no_move() {
        let mut status = DomainStatus {
            node_name: Some("a".into()),
            migration: Some(MigrationStatus {
                state: Some(MigrationState::Running),
                source_node: Some("a".into()),
                ..MigrationStatus::default()
            }),
            ..DomainStatus::default()
        };
        assert_eq!(claim_of(Some(&status)).migration, None);
        if let Some(m) = status.migration.as_mut() {
            m.target_node = Some("b".into());
        }
        assert_eq!(
            claim_of(Some(&status)).migration,
            Some(Move {
                source: "a".into(),
                target: "b".into(),
                state: MigrationState::Running
            })
        );
    }
}
