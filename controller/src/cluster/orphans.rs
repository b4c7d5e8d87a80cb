//! Per-node finalizers of nodes that left the cluster.
//!
//! Networks and StoragePools exist on many nodes: each node's agent puts its own finalizer
//! on them (`node.virtkube.io/<node>`) and its own entry in `status.nodes`, and removes both
//! once its libvirt object is gone. A node removed from the cluster has no agent left to do
//! that, so without help every Network and StoragePool it held could never be deleted. The
//! cluster controller lets go of them on the gone node's behalf — it is the only writer that
//! outlives any one node; the agents cannot, since an agent removing another node's finalizer
//! could not know whether that node's libvirt object is still there.
//!
//! **When a node has left** ([`Membership::has_left`]): its Kubernetes `Node` no longer
//! exists, and its `HypervisorNode` either no longer exists or has not had a heartbeat for
//! [`DEFAULT_GRACE`]. Both conditions, because each alone happens to live nodes: a kubelet
//! re-registers a deleted `Node`, and an agent recreates a deleted `HypervisorNode` at its
//! next heartbeat (and a node whose agent is merely down keeps its `Node`). What letting go
//! costs is bounded: the libvirt network or pool on the gone machine stays there (nothing is
//! ever deleted by this), and no image is touched — Volumes have a single holder and their
//! own finalizer, which this module never removes.
//!
//! **What is released** ([`orphans`], pure): for an object, the per-node finalizers and the
//! `status.nodes` entries of nodes that have left. [`release`] carries it out against the API
//! server: each gone node's status entry is released the way that node's agent would
//! release it (a server-side apply of an empty status under the node's own field manager),
//! then the finalizers are removed with a JSON patch whose `test` operation guards the list
//! it was decided on.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::json;
use virtkube_crds::API_VERSION;

use crate::agent::context::Settings;

/// The prefix of the per-node finalizers.
pub const NODE_FINALIZER_PREFIX: &str = "node.virtkube.io/";

/// How long a node whose Kubernetes `Node` is gone may go without a heartbeat before it
/// counts as having left (a node rebooting or being reinstalled comes back well within it).
pub const DEFAULT_GRACE: Duration = Duration::from_secs(15 * 60);

/// The finalizer `node`'s agent puts on Networks and StoragePools (the agent's own rule,
/// [`Settings::node_finalizer`], so the two can never disagree).
pub fn node_finalizer(node: &str) -> String {
    Settings::for_node(node).node_finalizer()
}

/// What the cluster knows of its nodes, as of one fresh read of each list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Membership {
    /// The names of the Kubernetes `Node`s.
    pub kube_nodes: BTreeSet<String>,
    /// The `HypervisorNode`s by name, with their last heartbeat (`None`: none published).
    pub hypervisor_nodes: BTreeMap<String, Option<Timestamp>>,
    /// When the lists were read.
    pub now: Timestamp,
    /// How long without a heartbeat a node without its `Node` may stay.
    pub grace: Duration,
}

impl Membership {
    /// The membership the `Node` names and the `HypervisorNode`s describe (with their last
    /// heartbeats), as of `now`.
    pub fn of<'a>(
        kube_nodes: impl IntoIterator<Item = String>,
        hypervisors: impl IntoIterator<Item = &'a virtkube_crds::HypervisorNode>,
        now: Timestamp,
        grace: Duration,
    ) -> Membership {
        Membership {
            kube_nodes: kube_nodes.into_iter().collect(),
            hypervisor_nodes: hypervisors
                .into_iter()
                .map(|h| {
                    let beat = h
                        .status
                        .as_ref()
                        .and_then(|s| s.heartbeat_time.as_ref())
                        .map(|t| t.0);
                    (h.name_any(), beat)
                })
                .collect(),
            now,
            grace,
        }
    }

    /// Whether `node` has left the cluster: no Kubernetes `Node` of that name, and no
    /// `HypervisorNode` either or one whose last heartbeat is older than the grace. A
    /// `HypervisorNode` that never published a heartbeat counts as present (its agent may be
    /// starting).
    pub fn has_left(&self, node: &str) -> bool {
        if self.kube_nodes.contains(node) {
            return false;
        }
        match self.hypervisor_nodes.get(node) {
            None => true,
            Some(None) => false,
            Some(Some(beat)) => {
                let silent = self.now.duration_since(*beat);
                silent.as_secs() > 0 && silent.unsigned_abs() > self.grace
            }
        }
    }

    /// The nodes known to the cluster (either list), by their per-node finalizer.
    fn by_finalizer(&self) -> BTreeMap<String, &str> {
        self.kube_nodes
            .iter()
            .chain(self.hypervisor_nodes.keys())
            .map(|n| (node_finalizer(n), n.as_str()))
            .collect()
    }
}

/// What to release on one object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Orphans {
    /// Per-node finalizers of nodes that have left, in the order they appear.
    pub finalizers: Vec<String>,
    /// The `status.nodes` entries (node names) of nodes that have left.
    pub entries: Vec<String>,
}

impl Orphans {
    /// Nothing to release.
    pub fn is_empty(&self) -> bool {
        self.finalizers.is_empty() && self.entries.is_empty()
    }
}

/// The per-node finalizers among `finalizers` and the status entries among `entries` (node
/// names) that belong to nodes that have left. A per-node finalizer whose node the cluster
/// does not know at all belongs to a node that has left (its `Node` and `HypervisorNode`
/// are both gone); other finalizers are never touched.
pub fn orphans(finalizers: &[String], entries: &[String], members: &Membership) -> Orphans {
    let known = members.by_finalizer();
    Orphans {
        finalizers: finalizers
            .iter()
            .filter(|f| f.starts_with(NODE_FINALIZER_PREFIX))
            .filter(|f| known.get(*f).is_none_or(|node| members.has_left(node)))
            .cloned()
            .collect(),
        entries: entries
            .iter()
            .filter(|n| members.has_left(n))
            .cloned()
            .collect(),
    }
}

/// Why releasing failed.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    /// An API call failed (a conflict means the object changed since it was read: read it
    /// again and decide again).
    #[error("releasing the per-node finalizers of {object}: {source}")]
    Kube {
        /// The object.
        object: String,
        /// What failed.
        #[source]
        source: kube::Error,
    },
    /// The membership could not be read: nothing is released on a partial view.
    #[error("reading the cluster's nodes: {0}")]
    Membership(#[source] kube::Error),
}

/// Reads the membership fresh from the API server (every `Node` and `HypervisorNode`).
/// Fails rather than returning a partial view: releasing on one could let go of a live
/// node's finalizers.
pub async fn read_membership(
    client: &kube::Client,
    grace: Duration,
) -> Result<Membership, ReleaseError> {
    use kube::api::ListParams;
    let nodes = Api::<k8s_openapi::api::core::v1::Node>::all(client.clone())
        .list_metadata(&ListParams::default())
        .await
        .map_err(ReleaseError::Membership)?;
    let hypervisors = Api::<virtkube_crds::HypervisorNode>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(ReleaseError::Membership)?;
    Ok(Membership::of(
        nodes.items.iter().map(|n| n.name_any()),
        &hypervisors.items,
        Timestamp::now(),
        grace,
    ))
}

/// Releases, on `obj` (a Network or StoragePool as just read), what nodes that have left
/// still hold: their `status.nodes` entries (`entries`: the node names in its status), then
/// their finalizers. Returns what was released (empty: nothing to do, no call made).
pub async fn release<K>(
    api: &Api<K>,
    obj: &K,
    entries: &[String],
    members: &Membership,
) -> Result<Orphans, ReleaseError>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    let found = orphans(obj.finalizers(), entries, members);
    if found.is_empty() {
        return Ok(found);
    }
    let name = obj.name_any();
    let failed = |source| ReleaseError::Kube {
        object: format!("{} {name}", K::kind(&())),
        source,
    };
    for node in &found.entries {
        // What the node's own agent applies when it lets go (`agent::pernode::release`):
        // an apply under its field manager with nothing in it drops what it owned.
        let body = json!({ "apiVersion": API_VERSION, "kind": K::kind(&()), "status": {} });
        api.patch_status(
            &name,
            &PatchParams::apply(&Settings::for_node(node).node_field_manager()).force(),
            &Patch::Apply(&body),
        )
        .await
        .map_err(failed)?;
    }
    if !found.finalizers.is_empty() {
        let current: Vec<String> = obj.finalizers().to_vec();
        let remaining: Vec<String> = current
            .iter()
            .filter(|f| !found.finalizers.contains(f))
            .cloned()
            .collect();
        let ops = json!([
            { "op": "test", "path": "/metadata/finalizers", "value": current },
            { "op": "replace", "path": "/metadata/finalizers", "value": remaining },
        ]);
        let patch: json_patch::Patch =
            serde_json::from_value(ops).map_err(|e| failed(kube::Error::SerdeError(e)))?;
        api.patch(&name, &PatchParams::default(), &Patch::Json::<()>(patch))
            .await
            .map_err(failed)?;
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(kube: &[&str], hv: &[(&str, Option<i64>)]) -> Membership {
        let now = Timestamp::from_second(1_000_000).unwrap_or(Timestamp::UNIX_EPOCH);
        Membership {
            kube_nodes: kube.iter().map(|n| n.to_string()).collect(),
            hypervisor_nodes: hv
                .iter()
                .map(|(n, ago)| {
                    let beat = ago.map(|s| {
                        Timestamp::from_second(now.as_second() - s).unwrap_or(Timestamp::UNIX_EPOCH)
                    });
                    (n.to_string(), beat)
                })
                .collect(),
            now,
            grace: Duration::from_secs(600),
        }
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_node_has_left_only_when_both_its_node_and_its_agent_are_gone() {
        let m = members(
            &["alive", "no-agent"],
            &[
                ("alive", Some(5)),
                ("silent", Some(3600)),
                ("recent", Some(60)),
                ("starting", None),
            ],
        );
        assert!(!m.has_left("alive"));
        assert!(
            !m.has_left("no-agent"),
            "its Node is there: its agent may come back"
        );
        assert!(!m.has_left("recent"), "heard from within the grace");
        assert!(!m.has_left("starting"), "an agent that never published yet");
        assert!(m.has_left("silent"), "no Node, no heartbeat for an hour");
        assert!(m.has_left("gone"), "neither Node nor HypervisorNode");
    }

    #[test]
    fn only_the_per_node_finalizers_and_entries_of_nodes_that_left_are_released() {
        let m = members(&["a"], &[("a", Some(1)), ("b", Some(7200))]);
        let long = "n".repeat(80);
        let found = orphans(
            &strings(&[
                "node.virtkube.io/a",
                "node.virtkube.io/b",
                "node.virtkube.io/c",
                &node_finalizer(&long),
                "virtkube.io/cleanup",
                "example.com/other",
            ]),
            &strings(&["a", "b", "c"]),
            &m,
        );
        assert_eq!(
            found.finalizers,
            strings(&[
                "node.virtkube.io/b",
                "node.virtkube.io/c",
                &node_finalizer(&long)
            ])
        );
        assert_eq!(found.entries, strings(&["b", "c"]));
        // A long node name is matched through the agent's shortened finalizer.
        let known = members(&[&long], &[]);
        assert!(orphans(&[node_finalizer(&long)], &[], &known).is_empty());
    }

    #[test]
    fn node_finalizers_are_the_agents_own() {
        for node in ["node-a", &"x".repeat(200)] {
            assert_eq!(
                node_finalizer(node),
                Settings::for_node(node).node_finalizer()
            );
            assert!(node_finalizer(node).starts_with(NODE_FINALIZER_PREFIX));
        }
    }
}
