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
    {"rule": "self.type != 'netfs' || (has(self.source) && has(self.source.host) && has(self.source.dir))", "message": "a netfs pool needs source.host and source.dir"},
    {"rule": "self.type != 'fs' || (has(self.target) && has(self.source) && has(self.source.devices) && size(self.source.devices) == 1)", "message": "an fs pool needs target.path and exactly one source.devices entry"},
    {"rule": "self.type != 'logical' || (has(self.source) && has(self.source.name))", "message": "a logical pool needs source.name (the LVM volume group)"},
    {"rule": "self.type != 'disk' || (has(self.source) && has(self.source.devices) && size(self.source.devices) == 1)", "message": "a disk pool needs exactly one source.devices entry (the whole disk)"},
    {"rule": "self.type != 'disk' || !has(self.source) || !has(self.source.format) || self.source.format == 'gpt' || self.source.format == 'dos'", "message": "a disk pool's source.format is its partition table: gpt (the default) or dos"},
    {"rule": "self.type == 'disk' || !has(self.source) || !has(self.source.format) || (self.source.format != 'gpt' && self.source.format != 'dos')", "message": "gpt and dos are partition tables: only a disk pool has one"},
    {"rule": "!has(self.source) || !has(self.source.build) || !self.source.build || self.type == 'logical' || self.type == 'fs' || self.type == 'disk'", "message": "source.build applies to logical, fs and disk pools only"},
    {"rule": "self.type != 'logical' || !has(self.source) || !has(self.source.build) || !self.source.build || has(self.source.devices)", "message": "building a logical pool (source.build) needs source.devices"}
]))]
pub struct StoragePoolSpec {
    /// The pool's backend (libvirt `<pool type=…>`): `dir` (a directory of image files),
    /// `fs` (a block device holding a filesystem, mounted by libvirt at `target.path`),
    /// `netfs` (an NFS export mounted at `target.path`), `logical` (an LVM volume group;
    /// volumes are raw logical volumes) and `disk` (one whole disk; volumes are its
    /// partitions) are carried out; `iscsi` and `rbd` are accepted and reported as not
    /// supported. Immutable.
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
    /// A network filesystem (NFS) mounted at the target path.
    Netfs,
    /// A block device holding a filesystem, mounted at the target path.
    Fs,
    /// An LVM volume group.
    Logical,
    /// A whole disk whose partitions are the volumes.
    Disk,
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
            PoolType::Fs => "fs",
            PoolType::Logical => "logical",
            PoolType::Disk => "disk",
            PoolType::Iscsi => "iscsi",
            PoolType::Rbd => "rbd",
        }
    }
}

/// Where a pool lives on a node (libvirt `<target>`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolTarget {
    /// An absolute directory path (`/var/lib/virtkube/pools/default`), created when missing;
    /// for `fs` and `netfs` the mount point. A `logical` pool's is always `/dev/<source.name>`
    /// (libvirt sets it): leave it out, or write exactly that. A `disk` pool's is the
    /// directory its partitions' paths are given in: `/dev` (the default) or a directory of
    /// stable names such as `/dev/disk/by-path`.
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
    /// Block devices, absolute paths: the physical volumes of a `logical` pool (needed to
    /// build it), the one device of an `fs` pool, the one whole disk of a `disk` pool.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 64),
        inner(
            length(min = 1, max = 4096),
            pattern(crate::names::ABSOLUTE_PATH_PATTERN)
        )
    )]
    pub devices: Vec<String>,
    /// The LVM volume group (`logical`; required), iSCSI IQN or RBD pool name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub name: Option<String>,
    /// The filesystem: for `fs`, `ext2`, `ext3`, `ext4`, `xfs` or `vfat` (`auto`, the
    /// default, lets `mount` probe it, and cannot be built); for `netfs`, `nfs` (the default).
    /// For `disk`, the partition table: `gpt` (the default) or `dos`. Not used by `logical`
    /// (always LVM2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<SourceFormat>,
    /// Make the storage when the pool is created on a node: `logical` runs `pvcreate` and
    /// `vgcreate` on `devices`, `fs` runs `mkfs` of `format` on its device, `disk` writes a
    /// new partition table of `format` (`parted mklabel`). libvirt refuses a device that
    /// already holds a filesystem, a partition table or an LVM label, so nothing is ever
    /// overwritten. Without it the volume group, filesystem or partition table must already
    /// exist. Only for `logical`, `fs` and `disk`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub build: bool,
}

/// A pool source's filesystem (libvirt `<source><format type=…>`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SourceFormat {
    /// Let `mount` probe the filesystem (`fs`; cannot be built).
    Auto,
    /// ext2 (`fs`).
    Ext2,
    /// ext3 (`fs`).
    Ext3,
    /// ext4 (`fs`).
    Ext4,
    /// XFS (`fs`; `mkfs.xfs` needs a device of at least 300 MiB).
    Xfs,
    /// FAT (`fs`).
    Vfat,
    /// NFS (`netfs`).
    Nfs,
    /// A GUID partition table (`disk`; the default).
    Gpt,
    /// An MS-DOS (MBR) partition table (`disk`): at most four partitions here.
    Dos,
}

impl SourceFormat {
    /// libvirt's name of the format.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceFormat::Auto => "auto",
            SourceFormat::Ext2 => "ext2",
            SourceFormat::Ext3 => "ext3",
            SourceFormat::Ext4 => "ext4",
            SourceFormat::Xfs => "xfs",
            SourceFormat::Vfat => "vfat",
            SourceFormat::Nfs => "nfs",
            SourceFormat::Gpt => "gpt",
            SourceFormat::Dos => "dos",
        }
    }

    /// Whether it is a local filesystem (`fs`), as opposed to a network one (`netfs`) or a
    /// partition table (`disk`).
    pub fn is_local(self) -> bool {
        !matches!(
            self,
            SourceFormat::Nfs | SourceFormat::Gpt | SourceFormat::Dos
        )
    }

    /// Whether it is a partition table (`disk`).
    pub fn is_partition_table(self) -> bool {
        matches!(self, SourceFormat::Gpt | SourceFormat::Dos)
    }
}

/// Whether `name` is a volume group name LVM accepts: letters, digits, `+ _ . -`, not
/// starting with `-`, not `.` or `..`, at most 127 characters.
pub fn is_volume_group_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 127
        && !name.starts_with('-')
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'_' | b'.' | b'-'))
}

impl StoragePoolSpec {
    /// The target path libvirt gives the pool: a `logical` pool's is `/dev/<volume group>`
    /// whatever the definition says; a `disk` pool's `target.path`, `/dev` when left out;
    /// the others' is `target.path`.
    pub fn effective_target_path(&self) -> Option<String> {
        match self.type_ {
            PoolType::Logical => self
                .source
                .as_ref()
                .and_then(|s| s.name.as_ref())
                .map(|vg| format!("/dev/{vg}")),
            PoolType::Disk => Some(
                self.target
                    .as_ref()
                    .map_or_else(|| "/dev".to_string(), |t| t.path.clone()),
            ),
            _ => self.target.as_ref().map(|t| t.path.clone()),
        }
    }
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
    /// A `disk` pool's partitions there that no Volume recorded (left by a crash between
    /// making a partition and recording it, or made by hand): never touched by virtkube,
    /// listed so that someone looks. Absent when there are none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unrecorded_partitions: Option<UnrecordedPartitions>,
}

/// How many names [`UnrecordedPartitions::names`] shows at most: the status stays small
/// however many partitions a disk holds.
pub const UNRECORDED_PARTITIONS_SHOWN: usize = 8;

/// The partitions of a `disk` pool on one node that no Volume recorded.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UnrecordedPartitions {
    /// How many there are.
    pub count: u32,
    /// The first of them by name (libvirt's, such as `sdb3`), at most 8.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub names: Vec<String>,
}

impl Validate for StoragePoolSpec {
    fn validate(&self) -> FieldErrors {
        let mut errors = FieldErrors::default();
        let kind = self.type_.as_str();
        match (&self.type_, &self.target) {
            (PoolType::Dir | PoolType::Netfs | PoolType::Fs, None) => errors.push(
                "spec.target.path",
                format!("{} {kind} pool needs target.path", article(kind)),
            ),
            (_, Some(target)) if !crate::names::is_clean_absolute_path(&target.path) => {
                errors.push("spec.target.path", crate::names::CLEAN_ABSOLUTE_PATH)
            }
            _ => {}
        }
        let empty = PoolSource::default();
        let source = self.source.as_ref().unwrap_or(&empty);
        for (i, device) in source.devices.iter().enumerate() {
            if !crate::names::is_clean_absolute_path(device) {
                errors.push(
                    format!("spec.source.devices[{i}]"),
                    crate::names::CLEAN_ABSOLUTE_PATH,
                );
            }
        }
        if source.build
            && !matches!(
                self.type_,
                PoolType::Logical | PoolType::Fs | PoolType::Disk
            )
        {
            errors.push(
                "spec.source.build",
                format!("source.build applies to logical, fs and disk pools only, not {kind}"),
            );
        }
        if source.format.is_some_and(SourceFormat::is_partition_table)
            && self.type_ != PoolType::Disk
        {
            errors.push(
                "spec.source.format",
                "gpt and dos are partition tables: only a disk pool has one",
            );
        }
        match self.type_ {
            PoolType::Dir => {
                if source.format.is_some() {
                    errors.push("spec.source.format", "a dir pool has no source format");
                }
            }
            PoolType::Netfs => {
                if source.host.is_none() || source.dir.is_none() {
                    errors.push(
                        "spec.source",
                        "a netfs pool needs source.host and source.dir",
                    );
                }
                if source.format.is_some_and(SourceFormat::is_local) {
                    errors.push(
                        "spec.source.format",
                        "a netfs pool's format is nfs (the default)",
                    );
                }
            }
            PoolType::Fs => self.validate_fs(source, &mut errors),
            PoolType::Logical => self.validate_logical(source, &mut errors),
            PoolType::Disk => validate_disk(source, &mut errors),
            PoolType::Iscsi | PoolType::Rbd => {}
        }
        errors
    }
}

/// "an fs pool", "a dir pool".
fn article(kind: &str) -> &'static str {
    if kind == "fs" { "an" } else { "a" }
}

impl StoragePoolSpec {
    fn validate_fs(&self, source: &PoolSource, errors: &mut FieldErrors) {
        if source.devices.len() != 1 {
            errors.push(
                "spec.source.devices",
                format!(
                    "an fs pool needs exactly one device (libvirt mounts one), {} given",
                    source.devices.len()
                ),
            );
        }
        match source.format {
            Some(SourceFormat::Nfs) => errors.push(
                "spec.source.format",
                "nfs is a netfs pool's format: use type netfs",
            ),
            // Refused for every type but disk above.
            Some(SourceFormat::Gpt | SourceFormat::Dos) => {}
            Some(SourceFormat::Auto) | None if source.build => errors.push(
                "spec.source.format",
                "building an fs pool (source.build) needs the filesystem to make: ext2, ext3, ext4, xfs or vfat",
            ),
            _ => {}
        }
    }

    fn validate_logical(&self, source: &PoolSource, errors: &mut FieldErrors) {
        match &source.name {
            None => errors.push(
                "spec.source.name",
                "a logical pool needs source.name (the LVM volume group)",
            ),
            Some(vg) if !is_volume_group_name(vg) => errors.push(
                "spec.source.name",
                format!("`{vg}` is not an LVM volume group name: letters, digits, `+ _ . -`, not starting with `-`, at most 127 characters"),
            ),
            Some(_) => {}
        }
        if let (Some(target), Some(wanted)) = (&self.target, self.effective_target_path())
            && target.path != wanted
        {
            errors.push(
                "spec.target.path",
                format!("a logical pool's target is always {wanted} (libvirt sets it from source.name): leave target out or write {wanted}"),
            );
        }
        if source.build && source.devices.is_empty() {
            errors.push(
                "spec.source.devices",
                "building a logical pool (source.build) needs the devices to make physical volumes of",
            );
        }
        if source.format.is_some() {
            errors.push(
                "spec.source.format",
                "a logical pool's format is always LVM2: leave source.format out",
            );
        }
    }
}

/// A `disk` pool: one whole disk, its partition table `gpt` or `dos` (libvirt's disk backend
/// also knows `dvh`, `mac`, `bsd`, `pc98`, `sun` and `lvm2` labels, which virtkube does not
/// carry out).
fn validate_disk(source: &PoolSource, errors: &mut FieldErrors) {
    if source.devices.len() != 1 {
        errors.push(
            "spec.source.devices",
            format!(
                "a disk pool needs exactly one device, the whole disk whose partitions are its volumes ({} given)",
                source.devices.len()
            ),
        );
    }
    if let Some(device) = source.devices.first()
        && device
            .rsplit('/')
            .next()
            .is_some_and(|name| name.contains('.'))
    {
        errors.push(
            "spec.source.devices[0]",
            "a disk pool's device name must not contain `.`: libvirt names each partition after it (sdb2), and names with a dot are virtkube's Volumes' (namespace.name)",
        );
    }
    if let Some(format) = source.format
        && !format.is_partition_table()
    {
        errors.push(
            "spec.source.format",
            format!(
                "a disk pool's format is its partition table, gpt (the default) or dos, not {}",
                format.as_str()
            ),
        );
    }
}
