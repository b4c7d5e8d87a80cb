//! `Volume`: a disk image in a storage pool (libvirt's `virStorageVol`), namespaced.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::quantity::ByteQuantity;
use crate::validation::{FieldErrors, Validate};

/// The annotation that asks the agent to adopt an image already in the pool under this
/// Volume's libvirt name (`<namespace>.<name>`): one retained when an earlier Volume was
/// deleted, or made outside virtkube. Its value is the image's libvirt key or its path, as
/// the refusal to adopt it silently quotes them; any other value, or no image at all, is
/// refused with `Ready=False` (reason `NameConflict`). Without it, an existing image is
/// never taken over: a new Volume of the same namespace and name (a re-created namespace,
/// another tenant) does not inherit an old one's data.
pub const ADOPT_IMAGE_ANNOTATION: &str = "virtkube.io/adopt-image";

/// The desired state of a disk image: its pool, size and format, and where its data comes from.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "virtkube.io",
    version = "v1alpha1",
    kind = "Volume",
    namespaced,
    status = "VolumeStatus",
    shortname = "vol",
    category = "virtkube",
    derive = "PartialEq",
    doc = "A disk image in a StoragePool, realized as a libvirt storage volume.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Pool", type_ = "string", json_path = ".spec.pool"),
    printcolumn(name = "Capacity", type_ = "string", json_path = ".status.capacity"),
    printcolumn(name = "Format", type_ = "string", json_path = ".spec.format"),
    printcolumn(name = "Node", type_ = "string", json_path = ".status.nodeName"),
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
    {"rule": "has(self.capacity) || (has(self.source) && has(self.source.volume))", "message": "capacity is required unless the volume is a clone (source.volume), which defaults to the source's size"},
    {"rule": "!has(self.source) || !has(self.source.backingVolume) || self.format == 'qcow2'", "message": "a backing volume (copy-on-write) needs format qcow2"}
]))]
pub struct VolumeSpec {
    /// The StoragePool that holds this volume. Immutable.
    #[schemars(length(min = 1, max = 253), pattern(crate::names::OBJECT_NAME_PATTERN), extend("x-kubernetes-validations" = [{"rule": "self == oldSelf", "message": "pool is immutable"}]))]
    pub pool: String,
    /// Size (`10Gi`). May grow (resized online by libvirt) but never shrink: a shrink is
    /// refused with a `SpecValid=False` condition, because it would cut the guest's data.
    /// Defaults to the source's size for a clone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<ByteQuantity>,
    /// On-disk format: `qcow2` (default; thin, supports copy-on-write) or `raw`. Immutable.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self == oldSelf", "message": "format is immutable"}]))]
    pub format: VolumeFormat,
    /// Where the initial data comes from; unset means an empty volume. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    // The exactly-one rule lives here rather than on VolumeSource: a field's extension replaces
    // its type's list of rules instead of adding to it. It is a conditional, not
    // `has(self.volume) != has(self.backingVolume)`: Kubernetes 1.24's cost estimator prices
    // `==`/`!=` between has() results as unbounded and refuses the whole CRD.
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "has(self.volume) ? !has(self.backingVolume) : has(self.backingVolume)", "message": "set exactly one of volume (a full clone) and backingVolume (copy-on-write)"},
        {"rule": "self == oldSelf", "message": "source is immutable"}
    ]))]
    pub source: Option<VolumeSource>,
    /// What happens to the data when this Volume is deleted: `Retain` (default: the image
    /// stays on disk; a later Volume takes it over only when asked to, with the annotation
    /// `virtkube.io/adopt-image`) or `Delete`. An image a Domain or another volume still uses,
    /// through any copy-on-write chain, is never deleted, and neither is an image in a pool
    /// virtkube did not make.
    #[serde(default)]
    pub reclaim_policy: ReclaimPolicy,
    /// For pools that are not `shared`: the node whose pool holds this volume. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), pattern(crate::names::OBJECT_NAME_PATTERN), extend("x-kubernetes-validations" = [{"rule": "self == oldSelf", "message": "nodeName is immutable"}]))]
    pub node_name: Option<String>,
}

/// An on-disk image format.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum VolumeFormat {
    /// QEMU copy-on-write: thin, snapshots, backing files.
    #[default]
    Qcow2,
    /// A plain image: fastest, fully allocated on write.
    Raw,
}

impl VolumeFormat {
    /// libvirt's name of the format.
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeFormat::Qcow2 => "qcow2",
            VolumeFormat::Raw => "raw",
        }
    }
}

/// Where a volume's initial data comes from. Set exactly one field.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSource {
    /// A full copy of another Volume in this namespace (`virsh vol-clone`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), pattern(crate::names::OBJECT_NAME_PATTERN))]
    pub volume: Option<String>,
    /// A thin qcow2 overlay on another Volume in this namespace, which becomes read-only
    /// shared data (`<backingStore>`). The backing volume must stay as long as this one does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), pattern(crate::names::OBJECT_NAME_PATTERN))]
    pub backing_volume: Option<String>,
}

impl VolumeSource {
    /// The Volume this one depends on, whichever way.
    pub fn referenced_volume(&self) -> Option<&str> {
        self.volume.as_deref().or(self.backing_volume.as_deref())
    }
}

/// What happens to a volume's data when its Volume is deleted.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum ReclaimPolicy {
    /// Keep the image on disk.
    #[default]
    Retain,
    /// Delete the image.
    Delete,
}

/// What virtkube observed of a volume.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeStatus {
    /// `Pending`, `Creating`, `Available`, `Failed` or `Released`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<VolumePhase>,
    /// The node whose pool holds the volume (any node, for a shared pool).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// The libvirt volume name (`<namespace>.<name>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_name: Option<String>,
    /// The image's path on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// libvirt's unique key of the image this Volume made (or adopted): the record that the
    /// image is this Volume's. Only an image with this key is ever grown or deleted for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// In a `disk` pool, where the recorded partition lies on its disk: with `key` (a path,
    /// which a partition made later under the same number has too), the record of which
    /// partition is this Volume's. A partition under the recorded key at another extent is
    /// someone else's and is never attached, cloned from or deleted for this Volume. A
    /// record made without it (an older agent) is completed at the next reconcile that finds
    /// the partition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<PartitionExtent>,
    /// Logical size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<ByteQuantity>,
    /// Space used on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation: Option<ByteQuantity>,
    /// Domains that use this volume, as `<namespace>/<name>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub used_by: Vec<String>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `SpecValid`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The handover of this volume to another node, under way: its Domain is live-migrated
    /// with its disks copied (`migration.allowCopyStorage`). Written by the controller
    /// (`Copying`, `Copied`) and by the holder's agent (`SourceRemoved`); removed by the new
    /// holder once it has taken the copy over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer: Option<VolumeTransfer>,
}

/// Where a partition lies on its disk, as libvirt's disk backend reports it
/// (`<source><device><extent start end/></device></source>`): byte offsets from the start of
/// the disk.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub struct PartitionExtent {
    /// The partition's first byte.
    pub start: u64,
    /// The byte after its last one (libvirt's `end`: `end - start` is its size).
    pub end: u64,
}

impl std::fmt::Display for PartitionExtent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "bytes {}-{}", self.start, self.end)
    }
}

/// A node-local volume moving to another node with the Domain that uses it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeTransfer {
    /// The Domain (same namespace) whose live migration copies the volume's disk.
    #[schemars(length(max = 253))]
    pub domain: String,
    /// The node the volume leaves (its holder until the handover).
    #[schemars(length(max = 253))]
    pub source_node: String,
    /// The node the volume goes to.
    #[schemars(length(max = 253))]
    pub target_node: String,
    /// How far the handover is.
    pub state: TransferState,
}

/// How far a volume's handover is.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum TransferState {
    /// The Domain's migration is approved or running; libvirt copies the disk to a volume of
    /// the same name in the target's pool of the same name. The source's image is the data.
    Copying,
    /// libvirt completed the migration: the guest runs on the target, on the copy; the
    /// source's image is stale and its agent removes it.
    Copied,
    /// The source's agent removed its stale image; the controller binds the volume to the
    /// target, whose agent records the copy as the volume's image.
    SourceRemoved,
}

/// Where a volume is in its life.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum VolumePhase {
    /// Not created yet (waiting for its pool or source).
    Pending,
    /// The agent is making the image: recorded before libvirt is asked, so that an image
    /// found under this Volume's name after a crash is known to be the one it made.
    Creating,
    /// Created and usable.
    Available,
    /// virtkube cannot realize the spec; the `Ready` condition says why.
    Failed,
    /// Being deleted; retained or waiting for domains to let go.
    Released,
}

impl Validate for VolumeSpec {
    fn validate(&self) -> FieldErrors {
        let mut errors = FieldErrors::default();
        match &self.capacity {
            Some(capacity) => match capacity.bytes() {
                Ok(0) => errors.push("spec.capacity", "must be more than 0"),
                Ok(_) => {}
                Err(e) => errors.push("spec.capacity", e.to_string()),
            },
            None if self.source.as_ref().is_some_and(|s| s.volume.is_some()) => {}
            None => errors.push(
                "spec.capacity",
                "is required unless the volume is a clone (source.volume)",
            ),
        }
        if let Some(source) = &self.source {
            match (&source.volume, &source.backing_volume) {
                (Some(_), Some(_)) | (None, None) => errors.push(
                    "spec.source",
                    "set exactly one of volume (a full clone) and backingVolume (copy-on-write)",
                ),
                (None, Some(_)) if self.format != VolumeFormat::Qcow2 => errors.push(
                    "spec.format",
                    "a backing volume (copy-on-write) needs format qcow2",
                ),
                _ => {}
            }
        }
        errors
    }
}
