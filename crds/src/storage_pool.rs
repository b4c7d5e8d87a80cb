//! `StoragePool`: where volumes live (libvirt's `virStoragePool`), cluster-scoped, owned by admins.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::quantity::ByteQuantity;
use crate::validation::{FieldErrors, Validate};

/// The desired state of a storage pool on every node it selects.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "virtkube.io",
    version = "v1alpha1",
    kind = "StoragePool",
    status = "StoragePoolStatus",
    shortname = "pool",
    category = "virtkube",
    derive = "PartialEq",
    doc = "A storage pool, realized as a libvirt storage pool on every node it selects.",
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.type"),
    printcolumn(name = "Path", type_ = "string", json_path = ".spec.target.path"),
    printcolumn(name = "Shared", type_ = "boolean", json_path = ".spec.shared"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.type != 'dir' || has(self.target)", "message": "a dir pool needs target.path"},
    {"rule": "self.type != 'netfs' || (has(self.source) && has(self.source.host) && has(self.source.dir))", "message": "a netfs pool needs source.host and source.dir"}
]))]
pub struct StoragePoolSpec {
    /// The pool's backend (libvirt `<pool type=…>`): `dir` (a directory of image files) is
    /// supported now; `netfs`, `logical`, `iscsi` and `rbd` are accepted and reported as not
    /// yet supported. Immutable.
    #[serde(rename = "type", default)]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self == oldSelf", "message": "type is immutable: create a new StoragePool"}]))]
    pub type_: PoolType,
    /// Where the pool is mounted or kept on each node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<PoolTarget>,
    /// Where the pool's storage comes from, for backends that have a source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<PoolSource>,
    /// Start the pool when the node's libvirt daemon starts (default true).
    #[serde(default = "yes")]
    pub autostart: bool,
    /// Every selected node sees the same storage (NFS, Ceph, a shared LUN): volumes need no
    /// `nodeName` and domains can live-migrate without copying disks.
    #[serde(default)]
    pub shared: bool,
    /// Labels of the nodes (their `HypervisorNode`s) that get this pool; empty means every node.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
}

fn yes() -> bool {
    true
}

/// A storage pool backend.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PoolType {
    /// A directory of image files.
    #[default]
    Dir,
    /// A network filesystem mounted at the target path.
    Netfs,
    /// An LVM volume group.
    Logical,
    /// An iSCSI target.
    Iscsi,
    /// A Ceph RBD pool.
    Rbd,
}

impl PoolType {
    /// libvirt's name of the backend.
    pub fn as_str(self) -> &'static str {
        match self {
            PoolType::Dir => "dir",
            PoolType::Netfs => "netfs",
            PoolType::Logical => "logical",
            PoolType::Iscsi => "iscsi",
            PoolType::Rbd => "rbd",
        }
    }
}

/// Where a pool lives on a node (libvirt `<target>`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolTarget {
    /// An absolute directory path (`/var/lib/virtkube/pools/default`), created when missing.
    #[schemars(
        length(min = 1, max = 4096),
        pattern(crate::names::ABSOLUTE_PATH_PATTERN)
    )]
    pub path: String,
}

/// Where a pool's storage comes from (libvirt `<source>`); which fields apply depends on `type`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolSource {
    /// The storage server (`netfs`, `iscsi`, `rbd`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub host: Option<String>,
    /// The exported directory (`netfs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub dir: Option<String>,
    /// Block devices (`logical`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub devices: Vec<String>,
    /// The volume group, iSCSI IQN or RBD pool name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub name: Option<String>,
}

/// What virtkube observed of a pool, per node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StoragePoolStatus {
    /// One entry per selected node, keyed by `nodeName`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["nodeName"]))]
    pub nodes: Vec<PoolNodeStatus>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` (every selected node has the pool running).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// A pool on one node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolNodeStatus {
    /// The node.
    pub node_name: String,
    /// libvirt's pool state there: `Running`, `Inactive`, `Building`, `Degraded`,
    /// `Inaccessible` or `Unknown`; `Absent` when the node has no such pool yet, `Failed` when
    /// the agent could not make it.
    pub state: String,
    /// Total size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<ByteQuantity>,
    /// Space used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation: Option<ByteQuantity>,
    /// Space free.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available: Option<ByteQuantity>,
    /// libvirt's autostart flag there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autostart: Option<bool>,
    /// Why it is not running, in libvirt's words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl Validate for StoragePoolSpec {
    fn validate(&self) -> FieldErrors {
        let mut errors = FieldErrors::default();
        match (&self.type_, &self.target) {
            (PoolType::Dir | PoolType::Netfs | PoolType::Logical, None) => errors.push(
                "spec.target.path",
                format!("a {} pool needs target.path", self.type_.as_str()),
            ),
            (_, Some(target)) if !crate::names::is_clean_absolute_path(&target.path) => {
                errors.push("spec.target.path", crate::names::CLEAN_ABSOLUTE_PATH)
            }
            _ => {}
        }
        if self.type_ == PoolType::Netfs
            && !self
                .source
                .as_ref()
                .is_some_and(|s| s.host.is_some() && s.dir.is_some())
        {
            errors.push(
                "spec.source",
                "a netfs pool needs source.host and source.dir",
            );
        }
        errors
    }
}
