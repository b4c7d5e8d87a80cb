//! Typed desired and observed models of libvirt objects, with XML out and in. Pure: no
//! libvirt calls here.

pub mod device;
pub mod domain;
pub mod host_facts;
pub mod hostdev;
pub mod network;
pub mod node;
pub mod owner;
pub mod stats;
pub mod storage;
pub mod xml;

pub use device::{Device, DeviceKey, PENDING_NS};
pub use domain::{
    CpuDef, CpuMode, CpuTune, DiskDef, DiskObserved, DiskSource, DomainDef, DomainObserved,
    DomainSizes, DomainState, Firmware, InterfaceDef, InterfaceObserved, OsDef, START_NS, Topology,
    VcpuPin, state_reason_name,
};
pub use host_facts::{
    HostInterface, MediatedDevice, PciDevice, PoolSourceFound, SecurityLabel, SecurityModel,
};
pub use hostdev::{HostdevDef, HostdevObserved, PciAddress};
pub use network::{
    DhcpHost, DhcpRange, DnsHost, IpDef, NetworkDef, NetworkEdit, NetworkMode, NetworkObserved,
    UpdateCommand, UpdateSection,
};
pub use node::{Capabilities, NodeCpuMap, NodeObserved, NumaCell};
pub use owner::{OWNER_NS, Owner};
pub use stats::{BlockStats, DomainStatsRecord, NetStats};
pub use storage::{
    BackingStore, BuildMode, PartitionExtent, PoolDef, PoolObserved, PoolSource, PoolState,
    PoolType, VolumeDef, VolumeFormat, VolumeObserved, max_partitions, next_partition_name,
};
pub use xml::XmlError;
