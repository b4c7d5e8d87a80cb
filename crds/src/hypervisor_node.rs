//! `HypervisorNode`: one per node, written by that node's agent (libvirt's node info,
//! capabilities and free memory). Cluster-scoped; its spec is empty.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::quantity::ByteQuantity;

/// Intentionally empty: a HypervisorNode is written by the node's agent, not by users. Label
/// it to steer Networks and StoragePools (`nodeSelector`).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[kube(
    group = "virtkube.io",
    version = "v1alpha1",
    kind = "HypervisorNode",
    status = "HypervisorNodeStatus",
    shortname = "hvn",
    category = "virtkube",
    derive = "PartialEq",
    doc = "A hypervisor node as its virtkube agent sees it: libvirt and hypervisor versions, CPU topology, NUMA memory, capacity and heartbeat.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "CPUs", type_ = "integer", json_path = ".status.cpu.count"),
    printcolumn(name = "Memory", type_ = "string", json_path = ".status.memory.total"),
    printcolumn(name = "Free", type_ = "string", json_path = ".status.memory.free"),
    printcolumn(
        name = "Domains",
        type_ = "integer",
        json_path = ".status.domains.total"
    ),
    printcolumn(
        name = "Libvirt",
        type_ = "string",
        json_path = ".status.libvirtVersion",
        priority = 1
    ),
    printcolumn(
        name = "Heartbeat",
        type_ = "date",
        json_path = ".status.heartbeatTime"
    )
)]
pub struct HypervisorNodeSpec {}

/// What the node's agent reports.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HypervisorNodeStatus {
    /// The host's name as libvirt reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The hypervisor driver (`QEMU`, `Test`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hypervisor_type: Option<String>,
    /// The hypervisor's version (`7.2.0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hypervisor_version: Option<String>,
    /// The libvirt daemon's version (`9.0.0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libvirt_version: Option<String>,
    /// Host CPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<NodeCpu>,
    /// Host memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<NodeMemory>,
    /// NUMA cells with their memory, keyed by `id`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["id"]))]
    pub numa_cells: Vec<NumaCell>,
    /// The most vCPUs one guest can have here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_vcpus: Option<u32>,
    /// How many domains libvirt holds here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domains: Option<DomainCounts>,
    /// Where other nodes send live migrations (`tcp://10.0.0.5:49152`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_uri: Option<String>,
    /// The libvirt URI other nodes' agents open to reach this node's libvirt
    /// (`qemu+tls://10.0.0.5/system`); without it, domains cannot be migrated here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libvirt_uri: Option<String>,
    /// The URI a source node's libvirtd uses to reach this node in a peer-to-peer migration,
    /// when it differs from `libvirtUri`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libvirt_peer_uri: Option<String>,
    /// What else the host offers: network interfaces, PCI and mediated devices, the
    /// security driver, LVM volume groups. Bounded so the object stays small (at most 32
    /// interfaces, 128 PCI devices other than bridges, 32 mediated devices, 16 volume
    /// groups of 8 devices: under 64 KiB of JSON); `truncated` says what was cut. Refreshed
    /// every 5 minutes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<HostFacts>,
    /// The last time the agent refreshed this status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_time: Option<Time>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`: the agent runs and reaches libvirt.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// Host CPU model and topology.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeCpu {
    /// The CPU model (`x86_64`, `Skylake-Client-IBRS`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Logical CPUs online.
    pub count: u32,
    /// Sockets.
    pub sockets: u32,
    /// Cores per socket.
    pub cores: u32,
    /// Threads per core.
    pub threads: u32,
    /// Clock in MHz.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mhz: Option<u32>,
}

/// Host memory.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeMemory {
    /// Total memory.
    pub total: ByteQuantity,
    /// Free memory now.
    pub free: ByteQuantity,
}

/// One NUMA cell.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NumaCell {
    /// The cell id.
    pub id: u32,
    /// Host CPUs in the cell, as a cpuset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<String>,
    /// Memory in the cell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<ByteQuantity>,
    /// Free memory in the cell now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_memory: Option<ByteQuantity>,
}

/// Domain counts on a node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DomainCounts {
    /// All domains libvirt holds, virtkube's or not.
    pub total: u32,
    /// Running or paused.
    pub active: u32,
    /// Owned by virtkube.
    pub managed: u32,
}

/// Host facts beyond CPUs and memory (see `HypervisorNodeStatus.host`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostFacts {
    /// Host network interfaces (libvirt's `virConnectListAllInterfaces`, read-only: virtkube
    /// never changes them). Keyed by `name`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub interfaces: Vec<HostInterface>,
    /// PCI devices other than bridges (libvirt node devices): what
    /// `Domain.spec.hostDevices` can pass through. Keyed by `address`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 128), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["address"]))]
    pub pci_devices: Vec<PciDevice>,
    /// Mediated devices (vGPUs and the like). Keyed by `name`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub mediated_devices: Vec<MediatedDevice>,
    /// The security driver confining guests (`virNodeGetSecurityModel`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_model: Option<SecurityModel>,
    /// LVM volume groups a `logical` StoragePool could use (`virConnectFindStoragePoolSources`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub storage_pool_sources: Vec<StoragePoolSource>,
    /// Lists cut at their bound, as `pciDevices: 300 found, 256 listed`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub truncated: Vec<String>,
    /// Facts libvirt could not give, with its reason (`storagePoolSources: cannot execute
    /// binary /sbin/pvs`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub unavailable: Vec<String>,
}

/// A host network interface.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostInterface {
    /// Its name (`eth0`).
    pub name: String,
    /// Its MAC address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac_address: Option<String>,
    /// Whether it is up.
    pub active: bool,
}

/// A PCI device of the host.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PciDevice {
    /// Its PCI address, `domain:bus:slot.function` (`0000:06:00.0`): what
    /// `Domain.spec.hostDevices[].address` names.
    pub address: String,
    /// libvirt's node device name (`pci_0000_06_00_0`).
    pub name: String,
    /// Vendor id (`0x8086`).
    pub vendor_id: String,
    /// Vendor name, when the host knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vendor: Option<String>,
    /// Product id (`0x10c9`).
    pub product_id: String,
    /// Product name, when the host knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product: Option<String>,
    /// PCI class (`0x020000`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    /// The host driver bound to it (`vfio-pci` while passed through).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// Its IOMMU group; absent on hosts without an IOMMU, where no device can be passed
    /// through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iommu_group: Option<u32>,
}

/// A mediated device.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MediatedDevice {
    /// libvirt's node device name.
    pub name: String,
    /// The mdev type (`nvidia-63`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mdev_type: Option<String>,
    /// The parent device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Its UUID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// Its IOMMU group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iommu_group: Option<u32>,
}

/// The host's security driver.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecurityModel {
    /// `selinux`, `apparmor`, `dac` or `none`.
    pub model: String,
    /// Its domain of interpretation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub doi: Option<String>,
}

/// Storage libvirt found on the node that a pool could use.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StoragePoolSource {
    /// The pool type it suits (`logical`).
    #[serde(rename = "type")]
    pub type_: String,
    /// Its name (the LVM volume group), what `StoragePool.spec.source.name` names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Its devices (physical volumes), at most 8.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub devices: Vec<String>,
    /// Its format (`lvm2`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
}
