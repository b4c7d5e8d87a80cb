//! What the planner knows of the hosts: a small, libvirt-free model of the objects it
//! compares against. The engine adapter ([`crate::host`]) fills it from libvirt; tests build
//! it by hand, so the planner needs no libvirt to be tested.

use std::collections::BTreeMap;

/// virtkube's ownership mark as found on a host object.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OwnerMark {
    /// Resource kind (`Domain`, `Network`, `StoragePool`, `Volume`).
    pub kind: String,
    /// Resource UID (for local manifests `local:<namespace>/<name>`).
    pub uid: String,
    /// Namespace of namespaced kinds.
    pub namespace: Option<String>,
    /// Resource name.
    pub name: String,
}

/// The UID prefix of objects applied from local manifests (no Kubernetes UID exists there).
pub const LOCAL_UID_PREFIX: &str = "local:";

impl OwnerMark {
    /// The mark of a resource applied from a local manifest (or with its Kubernetes `uid`).
    pub fn for_resource(
        kind: &str,
        namespace: Option<&str>,
        name: &str,
        uid: Option<&str>,
    ) -> Self {
        let uid = match uid {
            Some(uid) => uid.to_string(),
            None => match namespace {
                Some(ns) => format!("{LOCAL_UID_PREFIX}{ns}/{name}"),
                None => format!("{LOCAL_UID_PREFIX}{name}"),
            },
        };
        Self {
            kind: kind.to_string(),
            uid,
            namespace: namespace.map(str::to_string),
            name: name.to_string(),
        }
    }

    /// Whether both marks name the same resource (kind and UID, as the engine compares them).
    pub fn same_resource(&self, other: &OwnerMark) -> bool {
        self.kind == other.kind && self.uid == other.uid
    }

    /// Whether the object came from local manifests (only those are pruned by the CLI: a
    /// cluster-owned object on the same host is never the CLI's to remove).
    pub fn is_local(&self) -> bool {
        self.uid.starts_with(LOCAL_UID_PREFIX)
    }

    /// `Kind namespace/name` as messages write it.
    pub fn label(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{} {ns}/{}", self.kind, self.name),
            None => format!("{} {}", self.kind, self.name),
        }
    }
}

/// Everything observed, per node name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ObservedState {
    /// One entry per host, keyed by node name.
    pub hosts: BTreeMap<String, ObservedHost>,
}

impl ObservedState {
    /// The host of `node`, created empty when missing (for tests and simulation).
    pub fn host_mut(&mut self, node: &str) -> &mut ObservedHost {
        self.hosts.entry(node.to_string()).or_default()
    }
}

/// One libvirt host.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ObservedHost {
    /// Host CPUs (for pinning checks); `None` when unknown.
    pub host_cpus: Option<u32>,
    /// The host's online CPUs, canonical cpuset (`0-7`): what a vCPU whose pin was removed
    /// floats over again. `None` when unknown: a removed pin is then left as it is.
    pub online_cpus: Option<String>,
    /// Whether the driver plugs disks and NICs into running domains and out of them (QEMU:
    /// yes; the test driver: no, so such changes wait for a restart there).
    pub device_hotplug: bool,
    /// Whether the driver changes CPU weight and bandwidth of a running domain
    /// (`virDomainSetSchedulerParameters`: QEMU with the cgroup `cpu` controller; the test
    /// driver does not, so such changes wait for a restart there).
    pub cpu_tune_live: bool,
    /// Storage pools by libvirt name.
    pub pools: BTreeMap<String, ObservedPool>,
    /// Networks by libvirt name.
    pub networks: BTreeMap<String, ObservedNetwork>,
    /// Volumes by (pool, volume name).
    pub volumes: BTreeMap<(String, String), ObservedVolume>,
    /// Domains by libvirt name.
    pub domains: BTreeMap<String, ObservedDomain>,
    /// The addresses of the host's PCI devices (`0000:06:00.0`); `None` when not read (the
    /// host devices of domains are then not checked against them).
    pub pci_devices: Option<std::collections::BTreeSet<String>>,
}

/// Where a pool's storage comes from (libvirt `<source>`), as the planner compares it: the
/// manifest's fields (what is not set is `None` or empty) or what libvirt reports.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PoolSourceView {
    /// NFS server (`netfs`).
    pub host: Option<String>,
    /// Exported directory (`netfs`).
    pub dir: Option<String>,
    /// Block devices (`logical`, `fs`).
    pub devices: Vec<String>,
    /// Volume group (`logical`).
    pub name: Option<String>,
    /// Filesystem (`fs`, `netfs`).
    pub format: Option<String>,
}

/// A storage pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedPool {
    /// virtkube's mark, if any.
    pub owner: Option<OwnerMark>,
    /// libvirt's pool type (`dir`, …).
    pub pool_type: String,
    /// Target path.
    pub target_path: Option<String>,
    /// Source.
    pub source: PoolSourceView,
    /// Whether the pool is active.
    pub active: bool,
    /// Autostart flag.
    pub autostart: bool,
    /// Capacity in bytes.
    pub capacity: u64,
    /// Available bytes.
    pub available: u64,
}

/// A fixed DHCP lease as the planner compares it (libvirt `<dhcp><host>`); the MAC address
/// in lower case, as libvirt reports it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DhcpLease {
    /// MAC address, lower case.
    pub mac: String,
    /// The address it always gets.
    pub ip: String,
    /// The host name handed out with it.
    pub name: Option<String>,
}

impl std::fmt::Display for DhcpLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} -> {}", self.mac, self.ip)?;
        match &self.name {
            Some(n) => write!(f, " ({n})"),
            None => Ok(()),
        }
    }
}

/// Static DNS names of one address (libvirt `<dns><host>`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DnsEntry {
    /// The address.
    pub ip: String,
    /// Its names, in the manifest's order.
    pub hostnames: Vec<String>,
}

impl std::fmt::Display for DnsEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} = {}", self.ip, self.hostnames.join(" "))
    }
}

/// A network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedNetwork {
    /// virtkube's mark, if any.
    pub owner: Option<OwnerMark>,
    /// virtkube's word for the mode (`nat`, `isolated`, …).
    pub mode: String,
    /// Bridge name.
    pub bridge: Option<String>,
    /// Host address and prefix.
    pub ip: Option<(String, u8)>,
    /// DHCP ranges as `start-end`.
    pub dhcp: Vec<String>,
    /// Fixed DHCP leases.
    pub dhcp_hosts: Vec<DhcpLease>,
    /// Static DNS entries.
    pub dns_hosts: Vec<DnsEntry>,
    /// Whether the network is active.
    pub active: bool,
    /// Autostart flag.
    pub autostart: bool,
}

/// A storage volume. libvirt keeps no mark on volumes: `owned` is decided by the adapter
/// (a volume in a virtkube-owned pool named `<namespace>.<name>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedVolume {
    /// Whether virtkube owns it.
    pub owned: bool,
    /// libvirt's key (the proof of ownership the engine asks for).
    pub key: String,
    /// Path on the host.
    pub path: String,
    /// Capacity in bytes.
    pub capacity: u64,
    /// Allocation in bytes.
    pub allocation: u64,
    /// Format (`qcow2`, `raw`).
    pub format: Option<String>,
    /// Path of the backing store, for copy-on-write overlays.
    pub backing_path: Option<String>,
}

/// CPU weight and bandwidth (libvirt `<cputune>`): what a manifest asks (unset fields are
/// not compared) and what libvirt has in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuTune {
    /// Weight (`cpu.shares`).
    pub shares: Option<u64>,
    /// vCPU period, µs.
    pub period: Option<u64>,
    /// vCPU quota, µs (`-1`: unlimited).
    pub quota: Option<i64>,
    /// Whole-guest period, µs.
    pub global_period: Option<u64>,
    /// Whole-guest quota, µs (`-1`: unlimited).
    pub global_quota: Option<i64>,
    /// Emulator threads' period, µs.
    pub emulator_period: Option<u64>,
    /// Emulator threads' quota, µs (`-1`: unlimited).
    pub emulator_quota: Option<i64>,
}

impl CpuTune {
    /// libvirt's weight when none is set.
    pub const DEFAULT_SHARES: u64 = 1024;

    /// Whether nothing is set.
    pub fn is_empty(&self) -> bool {
        *self == CpuTune::default()
    }
}

/// A domain's power state as the planner distinguishes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerObserved {
    /// Running (or blocked, or shutting down: a process exists and runs).
    Running,
    /// Paused.
    Paused,
    /// Shut off.
    Shutoff,
    /// Crashed (a process may remain).
    Crashed,
}

impl PowerObserved {
    /// Whether a QEMU process exists.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            PowerObserved::Running | PowerObserved::Paused | PowerObserved::Crashed
        )
    }

    /// virsh's word.
    pub fn as_str(self) -> &'static str {
        match self {
            PowerObserved::Running => "running",
            PowerObserved::Paused => "paused",
            PowerObserved::Shutoff => "shutoff",
            PowerObserved::Crashed => "crashed",
        }
    }
}

/// Where a disk's data comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskRef {
    /// A pool volume.
    Volume {
        /// Pool.
        pool: String,
        /// Volume name.
        volume: String,
    },
    /// A host path (file or block device).
    Path(String),
    /// Nothing, or a source the planner does not model.
    Other,
}

/// A disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedDisk {
    /// Guest device (`vda`).
    pub target: String,
    /// Bus.
    pub bus: Option<String>,
    /// `disk` or `cdrom`.
    pub device: String,
    /// Source.
    pub source: DiskRef,
    /// Read-only.
    pub read_only: bool,
    /// Boot order.
    pub boot_order: Option<u32>,
    /// The images under the disk's own, nearest first, as libvirt reports them for the
    /// domain (filled in for running guests; the chains of pool volumes come from the
    /// volumes themselves).
    pub chain: Vec<String>,
}

/// A NIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedNic {
    /// libvirt network, for `type='network'`.
    pub network: Option<String>,
    /// Model.
    pub model: Option<String>,
    /// MAC (libvirt generates one when the definition has none).
    pub mac: Option<String>,
    /// The spec's NIC name, from libvirt's user alias (`None` on NICs defined before
    /// virtkube wrote aliases: those are matched by position).
    pub alias: Option<String>,
}

/// A host PCI device passed through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedHostDevice {
    /// PCI address on the host, lower case.
    pub address: String,
    /// `managed='yes'`.
    pub managed: bool,
    /// The spec's name, from libvirt's user alias, when set.
    pub alias: Option<String>,
}

/// A domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedDomain {
    /// virtkube's mark, if any.
    pub owner: Option<OwnerMark>,
    /// UUID.
    pub uuid: String,
    /// Runtime id while active.
    pub id: Option<u32>,
    /// Power state.
    pub power: PowerObserved,
    /// libvirt's state reason (`booted`, `user`, `crashed`, …).
    pub reason: String,
    /// vCPUs online.
    pub vcpus: u32,
    /// Maximum vCPUs.
    pub max_vcpus: u32,
    /// CPU mode (`host-model`, …), when set.
    pub cpu_mode: Option<String>,
    /// CPU model, when set.
    pub cpu_model: Option<String>,
    /// Topology (sockets, cores, threads), when set.
    pub topology: Option<(u32, u32, u32)>,
    /// Per-vCPU affinity in libvirt's canonical cpuset form, as libvirt reports it.
    pub pinning: BTreeMap<u32, String>,
    /// Emulator affinity, canonical, when reported.
    pub emulator_cpuset: Option<String>,
    /// CPU weight and bandwidth in force.
    pub cpu_tune: CpuTune,
    /// Security labels as libvirt reports them (status only, never compared).
    pub security_labels: Vec<virtkube_crds::domain::SecurityLabelStatus>,
    /// Current memory, KiB.
    pub memory_kib: u64,
    /// Maximum memory, KiB.
    pub max_memory_kib: u64,
    /// Hugepage size, KiB.
    pub hugepage_kib: Option<u64>,
    /// Machine type as libvirt expanded it (`pc-i440fx-7.2`).
    pub machine: Option<String>,
    /// Architecture.
    pub arch: Option<String>,
    /// `bios`/`efi`, when set.
    pub firmware: Option<String>,
    /// `<os><boot dev>` order.
    pub boot: Vec<String>,
    /// Direct kernel boot: kernel.
    pub kernel: Option<String>,
    /// Direct kernel boot: initrd.
    pub initrd: Option<String>,
    /// Direct kernel boot: command line.
    pub cmdline: Option<String>,
    /// Disks.
    pub disks: Vec<ObservedDisk>,
    /// NICs.
    pub interfaces: Vec<ObservedNic>,
    /// Host PCI devices.
    pub host_devices: Vec<ObservedHostDevice>,
    /// Autostart flag.
    pub autostart: bool,
    /// Whether the domain is persistent (defined).
    pub persistent: bool,
    /// Devices whose unplug the guest has not acknowledged (`disk/vdb`,
    /// `interface/<mac>`): gone from the definition, still in the running guest until it
    /// restarts.
    pub pending_unplug: Vec<String>,
    /// Defined to be started and never started yet (the engine's "first start owed" note):
    /// a start lost to a crash, owed whatever the run strategy.
    pub start_owed: bool,
}
