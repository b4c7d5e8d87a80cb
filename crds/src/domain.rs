//! `Domain`: a virtual machine (libvirt's `virDomain`), namespaced, owned by application teams.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::cpuset::CpuSet;
use crate::quantity::ByteQuantity;
use crate::validation::{FieldErrors, Validate, check_unique};

/// The desired state of a virtual machine: its hardware, where it runs, and its power state.
///
/// Example: a 2-vCPU, 2 GiB guest with its root disk on a Volume and one NIC on a Network,
/// vCPU 0 pinned to host CPU 2, started at host boot.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "virtkube.io",
    version = "v1alpha1",
    kind = "Domain",
    namespaced,
    status = "DomainStatus",
    shortname = "dom",
    category = "virtkube",
    derive = "PartialEq",
    doc = "A virtual machine, realized as a libvirt domain on one hypervisor node.",
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Where the domain is in its life"
    ),
    printcolumn(
        name = "Node",
        type_ = "string",
        json_path = ".status.nodeName",
        description = "The node the domain runs on"
    ),
    printcolumn(
        name = "vCPUs",
        type_ = "integer",
        json_path = ".spec.cpu.vcpus",
        description = "Desired vCPU count"
    ),
    printcolumn(
        name = "Memory",
        type_ = "string",
        json_path = ".spec.memory.size",
        description = "Desired memory size"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the domain is as its spec asks"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.state) || self.runStrategy != 'Halted' || self.state == 'Stopped'", "message": "runStrategy Halted keeps the domain stopped: set state to Stopped or leave it unset"},
    {"rule": "!has(self.state) || self.runStrategy == 'Halted' || self.runStrategy == 'Manual' || self.state != 'Stopped'", "message": "state Stopped needs runStrategy Halted or Manual: Always and RerunOnFailure restart a stopped domain"},
    {"rule": "!has(self.os) || !has(self.os.boot) || size(self.os.boot) == 0 || !has(self.disks) || self.disks.all(d, !has(d.bootOrder))", "message": "os.boot and a disk's bootOrder cannot be combined (libvirt refuses both): use one of them"}
]))]
pub struct DomainSpec {
    /// The node this domain runs on. Leave empty to let the virtkube controller choose one.
    /// Changing it on a running domain requests a live migration to the new node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), pattern(crate::names::OBJECT_NAME_PATTERN))]
    pub node_name: Option<String>,

    /// Labels a node's `HypervisorNode` must carry for the controller to place this domain
    /// there (as a Pod's `nodeSelector`). Ignored when `nodeName` is set.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    pub node_selector: std::collections::BTreeMap<String, String>,

    /// Taints of nodes (the Kubernetes Node's `NoSchedule` and `NoExecute` taints) this
    /// domain may be placed on anyway, as a Pod's tolerations. The drain taint
    /// `virtkube.io/drain` cannot be tolerated.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub tolerations: Vec<Toleration>,

    /// What virtkube does about the domain's power: `Always` keeps it running (restarts it
    /// after a shutdown or a crash); `RerunOnFailure` restarts it after a crash only;
    /// `Manual` sets the power state at creation and when `state` changes, and otherwise
    /// leaves it alone; `Halted` keeps it stopped.
    #[serde(default)]
    pub run_strategy: RunStrategy,

    /// The desired power state: `Running`, `Paused` (suspended in memory, as
    /// `virsh suspend`) or `Stopped` (needs runStrategy `Halted` or `Manual`). Unset means
    /// `Stopped` for runStrategy `Halted` and `Running` otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<PowerState>,

    /// libvirt's host autostart flag (`virsh autostart`): start this domain when the node's
    /// libvirt daemon starts, even before virtkube's agent runs.
    #[serde(default)]
    pub autostart: bool,

    /// Virtual CPUs: count, maximum for hotplug, model, topology and pinning.
    #[serde(default)]
    pub cpu: CpuSpec,

    /// Guest memory: size, maximum and hugepages.
    pub memory: MemorySpec,

    /// Firmware, machine type, boot order and optional direct kernel boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<OsSpec>,

    /// Disks, each from a Volume in this namespace or, for admins, a host path. Keyed by
    /// `name` so GitOps merges edit one disk without replacing the list.
    ///
    /// On a running domain, adding or removing a `virtio`, `scsi` or `usb` hard disk
    /// (without `bootOrder`) is applied live (hotplug); a removal waits up to 10 s for the
    /// guest to release the disk, and one the guest does not release (no OS, no driver)
    /// leaves at the next restart (`updatePolicy`). Other disks, and any change to an
    /// existing disk, need a restart.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub disks: Vec<Disk>,

    /// Network interfaces, each on a cluster Network. Keyed by `name`.
    ///
    /// On a running domain, adding or removing an interface is applied live (hotplug); a
    /// removal the guest does not acknowledge within 10 s leaves at the next restart
    /// (`updatePolicy`). Changing an existing interface needs a restart.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub interfaces: Vec<Interface>,

    /// Host PCI devices passed through to the guest (libvirt `<hostdev mode='subsystem'
    /// type='pci'>`), each named by its address on the node, as the node's
    /// `HypervisorNode.status.host.pciDevices` lists them. Keyed by `name`.
    ///
    /// The controller places the domain only on a node that lists every address, never
    /// beside another domain holding one of them; the agent refuses a device its node does
    /// not have or another domain there uses. On a running domain, adding or removing a
    /// device is applied live (hotplug); changing one needs a restart. A domain with host
    /// devices cannot live-migrate (libvirt refuses): stopped, it moves cold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 16),
        extend(
            "x-kubernetes-list-type" = "map",
            "x-kubernetes-list-map-keys" = ["name"],
            "x-kubernetes-validations" = [
                {"rule": "self.all(a, self.exists_one(b, b.address == a.address))", "message": "each host device needs its own address: a PCI device can be passed through once"}
            ]
        )
    )]
    pub host_devices: Vec<HostDevice>,

    /// How this domain live-migrates when its `nodeName` changes or its node is drained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationSpec>,

    /// What happens to this domain when its node is drained: `LiveMigrate` (the drain waits
    /// for a live migration), `LiveMigrateIfPossible` (migrate, or shut down when the domain
    /// cannot migrate), `Shutdown`, or `None` (the drain does not touch it).
    #[serde(default)]
    pub eviction_strategy: EvictionStrategy,

    /// When changes that need a guest restart (machine type, firmware, boot order, changed
    /// disks and NICs, devices the guest refused to release) take effect: `Deferred`
    /// (default: at the next stop, reported by the `RestartRequired` condition) or `Restart`
    /// (virtkube restarts the guest now).
    #[serde(default)]
    pub update_policy: UpdatePolicy,
}

impl DomainSpec {
    /// The power state virtkube drives towards: `state`, or what `runStrategy` implies.
    pub fn effective_state(&self) -> PowerState {
        match (self.state, self.run_strategy) {
            (Some(state), _) => state,
            (None, RunStrategy::Halted) => PowerState::Stopped,
            (None, _) => PowerState::Running,
        }
    }
}

/// A toleration of node taints, as a Pod's.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Toleration {
    /// The taint key this toleration matches; empty with operator `Exists` matches every
    /// taint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 317))]
    pub key: Option<String>,
    /// `Equal` (the default: key and value must match) or `Exists` (any value).
    #[serde(default)]
    pub operator: TolerationOperator,
    /// The taint value to match with operator `Equal`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub value: Option<String>,
    /// The taint effect to match (`NoSchedule`, `PreferNoSchedule`, `NoExecute`); empty
    /// matches every effect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effect: Option<TaintEffect>,
}

/// How a toleration compares a taint's value.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum TolerationOperator {
    /// Key and value must match.
    #[default]
    Equal,
    /// The key must match; any value.
    Exists,
}

/// A taint's effect, as on a Kubernetes Node.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum TaintEffect {
    /// New domains are not placed on the node.
    NoSchedule,
    /// The scheduler avoids the node when another fits.
    PreferNoSchedule,
    /// New domains are not placed on the node (virtkube does not evict for it; drains do).
    NoExecute,
}

/// What virtkube does about a domain's power over time (KubeVirt's `runStrategy`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum RunStrategy {
    /// Keep the domain running: restart it after any shutdown or crash.
    #[default]
    Always,
    /// Restart the domain only after a crash; a clean guest shutdown stays stopped.
    RerunOnFailure,
    /// Apply `state` at creation and whenever it changes; never restart on its own.
    Manual,
    /// Keep the domain stopped.
    Halted,
}

/// A desired power state.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum PowerState {
    /// The guest runs.
    #[default]
    Running,
    /// The guest is suspended in memory (`virsh suspend`).
    Paused,
    /// The guest is shut off; its definition and disks stay.
    Stopped,
}

/// What a node drain does to a domain.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum EvictionStrategy {
    /// Live-migrate; the drain waits until the domain has left.
    #[default]
    LiveMigrate,
    /// Live-migrate when possible, otherwise shut the domain down.
    LiveMigrateIfPossible,
    /// Shut the domain down gracefully.
    Shutdown,
    /// Leave the domain alone; the drain does not wait for it.
    None,
}

/// When restart-requiring changes take effect.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum UpdatePolicy {
    /// At the guest's next stop; the `RestartRequired` condition lists what waits.
    #[default]
    Deferred,
    /// Now: virtkube shuts the guest down gracefully, applies the change, and starts it.
    Restart,
}

/// Virtual CPUs (libvirt `<vcpu>`, `<cpu>` and `<cputune>`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.maxVcpus) || self.maxVcpus >= self.vcpus", "message": "maxVcpus must be at least vcpus"},
    {"rule": "!has(self.pinning) || self.pinning.all(p, p.vcpu < (has(self.maxVcpus) ? self.maxVcpus : self.vcpus))", "message": "every pinned vcpu index must be below maxVcpus (or vcpus when maxVcpus is unset)"},
    {"rule": "!has(self.topology) || self.topology.sockets * self.topology.cores * self.topology.threads == (has(self.maxVcpus) ? self.maxVcpus : self.vcpus)", "message": "topology sockets x cores x threads must equal maxVcpus (or vcpus when maxVcpus is unset)"},
    {"rule": "!has(self.model) || (has(self.mode) && self.mode == 'custom')", "message": "model needs mode custom"}
]))]
pub struct CpuSpec {
    /// vCPUs online now (libvirt `<vcpu current=…>`). Can change live up to `maxVcpus`.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 4096))]
    pub vcpus: u32,

    /// The most vCPUs this domain can have without a restart (libvirt's `<vcpu>` value).
    /// Defaults to `vcpus`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4096))]
    pub max_vcpus: Option<u32>,

    /// libvirt's CPU mode: `host-model`, `host-passthrough`, `maximum` or `custom` (with
    /// `model`). Unset leaves libvirt's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<CpuMode>,

    /// The CPU model for mode `custom`, as `virsh cpu-models x86_64` lists (e.g. `Skylake-Server`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64), pattern(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$"))]
    pub model: Option<String>,

    /// Guest CPU topology; sockets x cores x threads must equal `maxVcpus`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<CpuTopology>,

    /// Per-vCPU pinning to host CPUs (libvirt `<vcpupin>`), keyed by `vcpu`. A vCPU not
    /// listed floats over the host's CPUs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4096), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["vcpu"]))]
    pub pinning: Vec<VcpuPin>,

    /// Host CPUs for QEMU's emulator threads (libvirt `<emulatorpin>`), as a cpuset like `0-1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256), pattern(crate::cpuset::CPUSET_PATTERN))]
    pub emulator_cpuset: Option<String>,
    /// This guest's CPU weight against the other guests of the node when the host's CPUs
    /// are busy (libvirt `<cputune><shares>`, the cgroup's `cpu.shares`; 1024 when unset),
    /// 2 to 10000 (the range both cgroup v1 and v2 accept). Changes live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2, max = 10000))]
    pub shares: Option<u32>,

    /// The most CPU time the whole guest (vCPUs and emulator threads) may use, in CPUs as
    /// Kubernetes writes a CPU limit (`1500m`, `2`, `0.5`), at least `10m`: libvirt
    /// `<global_quota>` over a 100 ms `<global_period>`. Changes live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 16), pattern(CPU_LIMIT_PATTERN))]
    pub limit: Option<String>,

    /// The bandwidth period of each vCPU in microseconds (libvirt `<cputune><period>`),
    /// 1000 to 1000000; libvirt's default is 100000. Changes live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1000, max = 1000000))]
    pub period: Option<u32>,

    /// The run time each vCPU may use per period, in microseconds (libvirt `<quota>`), 1000
    /// to 17592186044415; unset means unlimited. Changes live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1000, max = 17592186044415u64))]
    pub quota: Option<u64>,

    /// The bandwidth period of QEMU's emulator threads in microseconds (libvirt
    /// `<emulator_period>`), 1000 to 1000000. Changes live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1000, max = 1000000))]
    pub emulator_period: Option<u32>,

    /// The run time QEMU's emulator threads may use per period, in microseconds (libvirt
    /// `<emulator_quota>`), 1000 to 17592186044415; unset means unlimited. Changes live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1000, max = 17592186044415u64))]
    pub emulator_quota: Option<u64>,
}

/// A CPU limit as Kubernetes writes one: whole or decimal CPUs (`2`, `0.5`) or millicores
/// (`1500m`).
pub const CPU_LIMIT_PATTERN: &str = r"^([0-9]{1,7}m|[0-9]{1,5}(\.[0-9]{1,3})?)$";

/// libvirt's range of a bandwidth quota, in microseconds (`QEMU_SCHED_MIN_QUOTA`,
/// `QEMU_SCHED_MAX_QUOTA`).
pub const QUOTA_RANGE: std::ops::RangeInclusive<u64> = 1000..=17_592_186_044_415;

/// libvirt's range of a bandwidth period, in microseconds.
pub const PERIOD_RANGE: std::ops::RangeInclusive<u32> = 1000..=1_000_000;

/// The period virtkube uses for `cpu.limit` (libvirt's default).
pub const LIMIT_PERIOD_MICROS: u64 = 100_000;

/// A `cpu.limit` in millicores (`1500m` → 1500, `2` → 2000, `0.25` → 250).
pub fn parse_cpu_limit(text: &str) -> Result<u64, String> {
    let bad =
        || format!("`{text}` is not a CPU limit: write CPUs (`2`, `0.5`) or millicores (`1500m`)");
    if let Some(m) = text.strip_suffix('m') {
        return m.parse().map_err(|_| bad());
    }
    let (whole, frac) = match text.split_once('.') {
        Some((_, "")) => return Err(bad()),
        Some(parts) => parts,
        None => (text, ""),
    };
    if whole.is_empty() || frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let whole: u64 = whole.parse().map_err(|_| bad())?;
    let frac: u64 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<3}").parse().map_err(|_| bad())?
    };
    Ok(whole * 1000 + frac)
}

/// Millicores written back as Kubernetes would (`1500m`, `2`).
pub fn format_cpu_limit(millis: u64) -> String {
    if millis.is_multiple_of(1000) {
        (millis / 1000).to_string()
    } else {
        format!("{millis}m")
    }
}

fn one() -> u32 {
    1
}

impl Default for CpuSpec {
    fn default() -> Self {
        Self {
            vcpus: 1,
            max_vcpus: None,
            mode: None,
            model: None,
            topology: None,
            pinning: Vec::new(),
            emulator_cpuset: None,
            shares: None,
            limit: None,
            period: None,
            quota: None,
            emulator_period: None,
            emulator_quota: None,
        }
    }
}

impl CpuSpec {
    /// The maximum vCPU count: `maxVcpus`, or `vcpus` when unset.
    pub fn effective_max_vcpus(&self) -> u32 {
        self.max_vcpus.unwrap_or(self.vcpus)
    }
}

/// libvirt's `<cpu mode=…>`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum CpuMode {
    /// A model close to the host CPU, migratable between similar hosts.
    HostModel,
    /// The host CPU exactly; fastest, migrates only between identical hosts.
    HostPassthrough,
    /// Every feature the hypervisor can offer (useful under TCG).
    Maximum,
    /// A named model from `model`.
    Custom,
}

/// Guest CPU topology (libvirt `<topology>`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CpuTopology {
    /// CPU sockets.
    #[schemars(range(min = 1, max = 4096))]
    pub sockets: u32,
    /// Cores per socket.
    #[schemars(range(min = 1, max = 4096))]
    pub cores: u32,
    /// Threads per core.
    #[schemars(range(min = 1, max = 4096))]
    pub threads: u32,
}

/// One vCPU pinned to a set of host CPUs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VcpuPin {
    /// The vCPU index, from 0; must be below `maxVcpus`.
    #[schemars(range(max = 4095))]
    pub vcpu: u32,
    /// Host CPUs this vCPU may run on, written like libvirt and taskset (`2`, `0-3,8`, `0-7,^4`).
    #[schemars(length(min = 1, max = 256), pattern(crate::cpuset::CPUSET_PATTERN))]
    pub cpuset: String,
}

/// Guest memory (libvirt `<memory>`, `<currentMemory>`, `<memoryBacking>`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemorySpec {
    /// Memory the guest has now (`512Mi`, `2Gi`). Can change live up to `max` (needs a
    /// balloon driver in the guest to take effect inside it).
    pub size: ByteQuantity,
    /// The most memory the guest can have without a restart. Defaults to `size`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<ByteQuantity>,
    /// Back guest memory with host hugepages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugepages: Option<Hugepages>,
}

/// Hugepage backing (libvirt `<memoryBacking><hugepages><page size=…>`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Hugepages {
    /// The host page size to use: `2Mi` or `1Gi` on x86_64.
    pub page_size: ByteQuantity,
}

/// Firmware, machine and boot (libvirt `<os>`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.kernel) || (!has(self.initrd) && !has(self.cmdline))", "message": "initrd and cmdline need kernel (direct kernel boot)"}
]))]
pub struct OsSpec {
    /// Guest architecture; defaults to the host's (`x86_64`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 32), pattern(r"^[a-z0-9_]+$"))]
    pub arch: Option<String>,
    /// Machine type (`pc`, `q35`, `pc-q35-7.2`); defaults to libvirt's choice. Changing it
    /// needs a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64), pattern(r"^[a-z0-9][a-z0-9._-]*$"))]
    pub machine: Option<String>,
    /// `bios` (default) or `efi` (libvirt's firmware autoselection). Needs a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<Firmware>,
    /// Boot device order (`hd`, `cdrom`, `network`, `fd`), first tried first. Cannot be
    /// combined with a disk's `bootOrder` (libvirt refuses both). Needs a restart.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4))]
    pub boot: Vec<BootDevice>,
    /// Direct kernel boot: a kernel image path on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 4096),
        pattern(crate::names::ABSOLUTE_PATH_PATTERN)
    )]
    pub kernel: Option<String>,
    /// Direct kernel boot: an initrd path on the node (needs `kernel`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 4096),
        pattern(crate::names::ABSOLUTE_PATH_PATTERN)
    )]
    pub initrd: Option<String>,
    /// Direct kernel boot: the kernel command line (needs `kernel`), without control
    /// characters or leading or trailing whitespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096), pattern(crate::names::CMDLINE_PATTERN))]
    pub cmdline: Option<String>,
}

/// Guest firmware.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    /// Legacy BIOS (SeaBIOS).
    Bios,
    /// UEFI (OVMF), chosen by libvirt's firmware autoselection.
    Efi,
}

/// A boot device class (libvirt `<boot dev=…>`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BootDevice {
    /// Hard disks.
    Hd,
    /// CD-ROM drives.
    Cdrom,
    /// PXE from a network interface.
    Network,
    /// Floppy drives.
    Fd,
}

/// One guest disk (libvirt `<disk>`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
// "Exactly one" as a conditional, not `has(self.volume) != has(self.hostPath)`: Kubernetes 1.24's
// cost estimator prices `==`/`!=` between has() results as unbounded and refuses the whole CRD.
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.volume) ? !has(self.hostPath) : has(self.hostPath)", "message": "set exactly one of volume and hostPath"}
]))]
pub struct Disk {
    /// The disk's name in this list (a DNS label); the key for GitOps merges.
    #[schemars(length(min = 1, max = 63), pattern(crate::names::DNS_LABEL_PATTERN))]
    pub name: String,
    /// A Volume in this domain's namespace (libvirt `<disk type='volume'>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), pattern(crate::names::OBJECT_NAME_PATTERN))]
    pub volume: Option<String>,
    /// An image or device path on the node (libvirt `<disk type='file'>`). Reserved for
    /// administrators: the agent refuses host paths unless it runs with `--allow-host-paths`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 4096),
        pattern(crate::names::ABSOLUTE_PATH_PATTERN)
    )]
    pub host_path: Option<String>,
    /// The guest bus: `virtio` (default), `sata`, `scsi`, `ide` or `usb`.
    #[serde(default)]
    pub bus: DiskBus,
    /// `disk` (default) or `cdrom`.
    #[serde(default)]
    pub device: DiskDevice,
    /// The guest device name (`vda`, `sdb`); chosen from the bus and list position when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(crate::names::DISK_TARGET_PATTERN))]
    pub target: Option<String>,
    /// Attach read-only.
    #[serde(default)]
    pub read_only: bool,
    /// This disk's place in the boot order (1 first). Cannot be combined with `os.boot`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 64))]
    pub boot_order: Option<u32>,
}

/// A disk's guest bus.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DiskBus {
    /// Paravirtual block device (`vdX`).
    #[default]
    Virtio,
    /// AHCI SATA (`sdX`).
    Sata,
    /// SCSI (`sdX`), through a virtio-scsi controller.
    Scsi,
    /// IDE (`hdX`), `pc` machines only.
    Ide,
    /// USB mass storage (`sdX`).
    Usb,
}

impl DiskBus {
    /// The device-name prefix libvirt uses for this bus.
    pub fn target_prefix(self) -> &'static str {
        match self {
            DiskBus::Virtio => "vd",
            DiskBus::Sata | DiskBus::Scsi | DiskBus::Usb => "sd",
            DiskBus::Ide => "hd",
        }
    }
}

/// What the guest sees a disk as.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DiskDevice {
    /// A hard disk.
    #[default]
    Disk,
    /// A CD-ROM drive (always read-only).
    Cdrom,
}

/// One network interface (libvirt `<interface type='network'>`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Interface {
    /// The interface's name in this list (a DNS label); the key for GitOps merges.
    #[schemars(length(min = 1, max = 63), pattern(crate::names::DNS_LABEL_PATTERN))]
    pub name: String,
    /// The cluster Network this interface attaches to.
    #[schemars(length(min = 1, max = 253), pattern(crate::names::OBJECT_NAME_PATTERN))]
    pub network: String,
    /// The NIC model: `virtio` (default), `e1000e`, `e1000` or `rtl8139`.
    #[serde(default)]
    pub model: NicModel,
    /// A fixed unicast MAC address; when unset libvirt generates one and virtkube keeps it
    /// in status, never in your manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(crate::names::MAC_PATTERN))]
    pub mac_address: Option<String>,
}

/// A NIC model (libvirt `<model type=…>`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum NicModel {
    /// Paravirtual, fastest.
    #[default]
    Virtio,
    /// Intel 82574 (PCIe).
    E1000e,
    /// Intel 82540EM.
    E1000,
    /// Realtek 8139.
    Rtl8139,
}

/// A host PCI device passed through to the guest (libvirt `<hostdev mode='subsystem'
/// type='pci'>`, KubeVirt's `hostDevices`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostDevice {
    /// The device's name in this list (a DNS label); the key for GitOps merges.
    #[schemars(length(min = 1, max = 63), pattern(crate::names::DNS_LABEL_PATTERN))]
    pub name: String,
    /// The device's PCI address on the node, `domain:bus:slot.function` in lower-case hex
    /// as `lspci -D` prints it (`0000:06:00.0`).
    #[schemars(length(min = 12, max = 12), pattern(PCI_ADDRESS_PATTERN))]
    pub address: String,
    /// Whether libvirt detaches the device from its host driver when the guest starts (or
    /// the device is plugged in) and gives it back when the guest stops (libvirt's
    /// `managed='yes'`, the default). With `false` an administrator binds it to `vfio-pci`
    /// beforehand.
    #[serde(default = "yes")]
    pub managed: bool,
}

/// A PCI address as libvirt and `lspci -D` write it: `dddd:bb:ss.f`, lower-case hex, slot
/// below `0x20`, function below 8.
pub const PCI_ADDRESS_PATTERN: &str = r"^[0-9a-f]{4}:[0-9a-f]{2}:[01][0-9a-f]\.[0-7]$";

/// Whether `text` is a PCI address as [`PCI_ADDRESS_PATTERN`] says.
pub fn is_pci_address(text: &str) -> bool {
    let b = text.as_bytes();
    let hex = |c: &u8| c.is_ascii_digit() || (b'a'..=b'f').contains(c);
    b.len() == 12
        && b[..4].iter().all(hex)
        && b[4] == b':'
        && b[5..7].iter().all(hex)
        && b[7] == b':'
        && matches!(b[8], b'0' | b'1')
        && hex(&b[9])
        && b[10] == b'.'
        && (b'0'..=b'7').contains(&b[11])
}

/// Live-migration settings (libvirt `virDomainMigrate` flags and parameters).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationSpec {
    /// Migrate live (default). When false, the domain is paused for the whole transfer.
    #[serde(default = "yes")]
    pub live: bool,
    /// The longest pause tolerated at switch-over, in milliseconds (libvirt's max downtime).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 600000))]
    pub max_downtime_millis: Option<u32>,
    /// Bandwidth cap per second (`64Mi` = 64 MiB/s); unset means unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<ByteQuantity>,
    /// Throttle the guest's vCPUs when memory is dirtied faster than it can be sent.
    #[serde(default)]
    pub auto_converge: bool,
    /// Copy disks to the target when their storage is not shared (slow; off by default).
    #[serde(default)]
    pub allow_copy_storage: bool,
}

fn yes() -> bool {
    true
}

impl Default for MigrationSpec {
    fn default() -> Self {
        Self {
            live: true,
            max_downtime_millis: None,
            bandwidth: None,
            auto_converge: false,
            allow_copy_storage: false,
        }
    }
}

/// What virtkube observed of a domain, written by the node agent.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DomainStatus {
    /// Where the domain is in its life.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<DomainPhase>,
    /// libvirt's reason for the current state (`booted`, `user`, `destroyed`, `crashed`,
    /// `migrated`, …), as `virsh domstate --reason` prints it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_reason: Option<String>,
    /// The node holding the domain: the only node allowed to define, start or resume it
    /// (the placement claim; `spec.nodeName` is only a request). Written by the controller
    /// when it binds the domain and by the agents when a move completes, always with a
    /// resourceVersion precondition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// The libvirt domain name on that node (`<namespace>.<name>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain_name: Option<String>,
    /// libvirt's UUID of the domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// libvirt's runtime id while the domain runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u32>,
    /// vCPUs online now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    /// Maximum vCPUs of the running definition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_vcpus: Option<u32>,
    /// Each vCPU's host-CPU affinity as libvirt reports it (`virsh vcpupin`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["vcpu"]))]
    pub vcpu_affinity: Vec<VcpuAffinity>,
    /// The emulator threads' host-CPU affinity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emulator_cpuset: Option<String>,
    /// CPU weight and bandwidth in force (what the host's scheduler reports for a running
    /// guest; the definition's for a stopped one), when any is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_scheduling: Option<CpuSchedulingStatus>,
    /// Memory the guest has now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<ByteQuantity>,
    /// Maximum memory of the running definition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory: Option<ByteQuantity>,
    /// libvirt's host autostart flag as set now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autostart: Option<bool>,
    /// The guest's security labels (libvirt `<seclabel>`: the label a running guest got
    /// from the node's security driver, when dynamic).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub security_labels: Vec<SecurityLabelStatus>,
    /// MAC addresses of the interfaces, including those libvirt generated. Keyed by `name`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub interfaces: Vec<InterfaceStatus>,
    /// The host devices the domain has (its running guest's, or its definition's while
    /// stopped). Keyed by `name`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub host_devices: Vec<HostDeviceStatus>,
    /// Spec changes waiting for a restart (`os.machine`, `os.firmware`, …).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending_changes: Vec<String>,
    /// The last (or current) live migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationStatus>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Scheduled`, `Running`, `Migrating`, `RestartRequired`, `SpecValid`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// Where a domain is in its life.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum DomainPhase {
    /// Accepted, not yet on a node.
    Pending,
    /// Defined on its node, being brought to the desired state.
    Provisioning,
    /// Running.
    Running,
    /// Suspended in memory.
    Paused,
    /// Defined and shut off.
    Stopped,
    /// Live-migrating between nodes.
    Migrating,
    /// The guest crashed (libvirt state `crashed` or shutoff with reason `crashed`).
    Crashed,
    /// virtkube cannot realize the spec; the `Ready` condition says why.
    Failed,
    /// Being deleted.
    Terminating,
    /// The node's libvirt cannot be reached.
    Unknown,
}

/// One vCPU's affinity as libvirt reports it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VcpuAffinity {
    /// The vCPU index.
    pub vcpu: u32,
    /// Host CPUs it may run on.
    pub cpuset: String,
}

/// A guest's security label.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecurityLabelStatus {
    /// The security driver (`selinux`, `apparmor`, `dac`, `none`).
    pub model: String,
    /// `dynamic`, `static` or `none`.
    #[serde(rename = "type")]
    pub type_: String,
    /// The guest process's label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// The label of the guest's images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_label: Option<String>,
}

/// CPU weight and bandwidth as libvirt reports them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CpuSchedulingStatus {
    /// The CPU weight (`cpu.shares`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shares: Option<u64>,
    /// The whole guest's CPU limit, in CPUs (`1500m`); unset when unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<String>,
    /// Each vCPU's bandwidth period, microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period: Option<u64>,
    /// Each vCPU's quota per period, microseconds; unset when unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<u64>,
    /// The emulator threads' bandwidth period, microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emulator_period: Option<u64>,
    /// The emulator threads' quota per period, microseconds; unset when unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emulator_quota: Option<u64>,
}

/// An interface's observed addresses.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InterfaceStatus {
    /// The interface's name from the spec.
    pub name: String,
    /// Its MAC address.
    pub mac_address: String,
}

/// A host device as the domain has it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostDeviceStatus {
    /// The device's name from the spec.
    pub name: String,
    /// Its PCI address on the node.
    pub address: String,
}

/// The record of a move between nodes: a live migration of a running domain, or the
/// handover of a stopped one.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationStatus {
    /// `Pending` (approved by the controller), `Running`, `Succeeded`, `Failed` or
    /// `Aborted`. With `sourceNode` and `targetNode` it is part of the placement claim,
    /// written only with a resourceVersion precondition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<MigrationState>,
    /// The node the domain left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_node: Option<String>,
    /// The node the domain went to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_node: Option<String>,
    /// When the migration started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<Time>,
    /// The guest's pause at switch-over, in milliseconds, as libvirt measured it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_millis: Option<u64>,
    /// Bytes transferred.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_transferred_bytes: Option<u64>,
    /// Why it failed, in libvirt's words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// `Live` (libvirt migrates the running guest) or `Cold` (a stopped domain is
    /// undefined on the source and defined on the target).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<MigrationMode>,
    /// Why the move was approved: `Requested` (spec.nodeName changed) or `Drain` (its node
    /// is drained).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub reason: Option<String>,
    /// Progress of a running live migration, updated every few seconds at most.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<MigrationProgress>,
    /// The Volumes of node-local pools whose disks libvirt copies to the target during this
    /// live migration (`migration.allowCopyStorage`): they move to the target with the
    /// domain. Chosen by the controller when it approves the move; empty when every disk is
    /// on shared storage.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub copied_volumes: Vec<String>,
}

/// How a domain moves.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum MigrationMode {
    /// libvirt migrates the running guest (peer to peer).
    Live,
    /// The stopped domain is undefined on the source, then defined on the target.
    Cold,
}

/// A live migration's progress as libvirt's job statistics report it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationProgress {
    /// Bytes to move in all (memory and, with copy-storage, disks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_bytes: Option<u64>,
    /// Bytes moved so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processed_bytes: Option<u64>,
    /// Bytes left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining_bytes: Option<u64>,
    /// Percent done (0-100), from processed and total.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 100))]
    pub percent: Option<u32>,
    /// Memory transfer rate, bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_per_second: Option<u64>,
    /// Memory copy iteration (libvirt's `memory_iteration`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iteration: Option<u64>,
    /// When these figures were read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_time: Option<Time>,
}

/// A move's state.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum MigrationState {
    /// Requested, not started.
    Pending,
    /// Memory is being transferred.
    Running,
    /// The domain runs on the target.
    Succeeded,
    /// The domain stayed on the source; `message` says why.
    Failed,
    /// Ended before reaching the target because nobody wants it any more (the request
    /// changed, the domain is deleted, a time limit passed, or the source node was fenced);
    /// the domain stayed on the source.
    Aborted,
}

impl Validate for DomainSpec {
    fn validate(&self) -> FieldErrors {
        let mut errors = FieldErrors::default();
        if self.run_strategy == RunStrategy::Halted && self.effective_state() != PowerState::Stopped
        {
            errors.push("spec.state", "runStrategy Halted keeps the domain stopped: set state to Stopped or leave it unset");
        }
        if matches!(
            self.run_strategy,
            RunStrategy::Always | RunStrategy::RerunOnFailure
        ) && self.state == Some(PowerState::Stopped)
        {
            errors.push("spec.state", "state Stopped needs runStrategy Halted or Manual: Always and RerunOnFailure restart a stopped domain");
        }
        validate_cpu(&self.cpu, &mut errors);
        validate_memory(&self.memory, &mut errors);
        if let Some(os) = &self.os {
            validate_os(os, &mut errors);
        }
        if self.os.as_ref().is_some_and(|os| !os.boot.is_empty())
            && self.disks.iter().any(|d| d.boot_order.is_some())
        {
            errors.push("spec.os.boot", "os.boot and a disk's bootOrder cannot be combined (libvirt refuses both): use one of them");
        }
        check_unique(
            &mut errors,
            "spec.disks",
            "name",
            self.disks.iter().map(|d| d.name.as_str()),
        );
        for disk in &self.disks {
            let path = format!("spec.disks[name={}]", disk.name);
            match (&disk.volume, &disk.host_path) {
                (Some(_), Some(_)) | (None, None) => {
                    errors.push(&path, "set exactly one of volume and hostPath")
                }
                (None, Some(p)) if !crate::names::is_clean_absolute_path(p) => errors.push(
                    format!("{path}.hostPath"),
                    crate::names::CLEAN_ABSOLUTE_PATH,
                ),
                _ => {}
            }
            if let Some(target) = &disk.target
                && !target.starts_with(disk.bus.target_prefix())
            {
                errors.push(
                    format!("{path}.target"),
                    format!(
                        "`{target}` does not match bus {:?}: use a name starting with `{}`",
                        disk.bus,
                        disk.bus.target_prefix()
                    ),
                );
            }
        }
        check_unique(
            &mut errors,
            "spec.disks",
            "target",
            self.disks.iter().filter_map(|d| d.target.as_deref()),
        );
        check_unique(
            &mut errors,
            "spec.interfaces",
            "name",
            self.interfaces.iter().map(|i| i.name.as_str()),
        );
        check_unique(
            &mut errors,
            "spec.interfaces",
            "macAddress",
            self.interfaces
                .iter()
                .filter_map(|i| i.mac_address.as_deref()),
        );
        check_unique(
            &mut errors,
            "spec.hostDevices",
            "name",
            self.host_devices.iter().map(|h| h.name.as_str()),
        );
        check_unique(
            &mut errors,
            "spec.hostDevices",
            "address",
            self.host_devices.iter().map(|h| h.address.as_str()),
        );
        for dev in &self.host_devices {
            if !is_pci_address(&dev.address) {
                errors.push(
                    format!("spec.hostDevices[name={}].address", dev.name),
                    format!(
                        "`{}` is not a PCI address: write `domain:bus:slot.function` in lower-case hex, as `lspci -D` prints it (`0000:06:00.0`)",
                        dev.address
                    ),
                );
            }
        }
        if let Some(bandwidth) = self.migration.as_ref().and_then(|m| m.bandwidth.as_ref())
            && let Err(e) = bandwidth.bytes()
        {
            errors.push("spec.migration.bandwidth", e.to_string());
        }
        errors
    }
}

fn validate_cpu(cpu: &CpuSpec, errors: &mut FieldErrors) {
    let max = cpu.effective_max_vcpus();
    if !(1..=4096).contains(&cpu.vcpus) {
        errors.push("spec.cpu.vcpus", "must be between 1 and 4096");
    }
    if max < cpu.vcpus {
        errors.push(
            "spec.cpu.maxVcpus",
            format!("maxVcpus {max} is below vcpus {}", cpu.vcpus),
        );
    }
    if cpu.model.is_some() && cpu.mode != Some(CpuMode::Custom) {
        errors.push("spec.cpu.model", "model needs mode custom");
    }
    if let Some(t) = cpu.topology {
        let product = u64::from(t.sockets) * u64::from(t.cores) * u64::from(t.threads);
        if product != u64::from(max) {
            errors.push("spec.cpu.topology", format!("sockets x cores x threads is {product}, but maxVcpus is {max}: they must be equal"));
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    for pin in &cpu.pinning {
        let path = format!("spec.cpu.pinning[vcpu={}]", pin.vcpu);
        if !seen.insert(pin.vcpu) {
            errors.push(&path, format!("vcpu {} is pinned twice", pin.vcpu));
        }
        if pin.vcpu >= max {
            errors.push(
                &path,
                format!(
                    "vcpu {} does not exist: indices run from 0 to {}",
                    pin.vcpu,
                    max - 1
                ),
            );
        }
        if let Err(e) = pin.cpuset.parse::<CpuSet>() {
            errors.push(format!("{path}.cpuset"), e.to_string());
        }
    }
    if let Some(cpuset) = &cpu.emulator_cpuset
        && let Err(e) = cpuset.parse::<CpuSet>()
    {
        errors.push("spec.cpu.emulatorCpuset", e.to_string());
    }
    validate_cpu_scheduling(cpu, errors);
}

/// libvirt's ranges for `<cputune>` (`virDomainSetSchedulerParameters` refuses anything
/// outside them, and QEMU's cgroups would too).
fn validate_cpu_scheduling(cpu: &CpuSpec, errors: &mut FieldErrors) {
    if let Some(shares) = cpu.shares
        && !(2..=10_000).contains(&shares)
    {
        errors.push(
            "spec.cpu.shares",
            format!("{shares} is outside 2-10000 (the weights cgroup v1 and v2 both accept)"),
        );
    }
    for (field, period) in [
        ("spec.cpu.period", cpu.period),
        ("spec.cpu.emulatorPeriod", cpu.emulator_period),
    ] {
        if let Some(p) = period
            && !PERIOD_RANGE.contains(&p)
        {
            errors.push(field, format!("{p} µs is outside libvirt's 1000-1000000"));
        }
    }
    for (field, quota) in [
        ("spec.cpu.quota", cpu.quota),
        ("spec.cpu.emulatorQuota", cpu.emulator_quota),
    ] {
        if let Some(q) = quota
            && !QUOTA_RANGE.contains(&q)
        {
            errors.push(
                field,
                format!("{q} µs is outside libvirt's 1000-17592186044415"),
            );
        }
    }
    if let Some(limit) = &cpu.limit {
        match parse_cpu_limit(limit) {
            // The quota is limit × 100 ms: libvirt's smallest quota, 1 ms, is 10m.
            Ok(m) if m < 10 => errors.push(
                "spec.cpu.limit",
                format!("`{limit}` is below 10m (libvirt's smallest quota is 1 ms per 100 ms)"),
            ),
            Ok(m) if !QUOTA_RANGE.contains(&(m * LIMIT_PERIOD_MICROS / 1000)) => errors.push(
                "spec.cpu.limit",
                format!("`{limit}` is beyond libvirt's largest quota"),
            ),
            Ok(_) => {}
            Err(e) => errors.push("spec.cpu.limit", e),
        }
    }
}

fn validate_memory(memory: &MemorySpec, errors: &mut FieldErrors) {
    let size = match memory.size.bytes() {
        Ok(0) => {
            errors.push("spec.memory.size", "must be more than 0");
            None
        }
        Ok(bytes) if !bytes.is_multiple_of(1024) => {
            errors.push(
                "spec.memory.size",
                "must be a whole number of KiB (libvirt counts memory in KiB)",
            );
            None
        }
        Ok(bytes) => Some(bytes),
        Err(e) => {
            errors.push("spec.memory.size", e.to_string());
            None
        }
    };
    if let Some(max) = &memory.max {
        match max.bytes() {
            Ok(max_bytes) => {
                if let Some(size) = size
                    && max_bytes < size
                {
                    errors.push(
                        "spec.memory.max",
                        format!("max {max} is below size {}", memory.size),
                    );
                }
                if !max_bytes.is_multiple_of(1024) {
                    errors.push(
                        "spec.memory.max",
                        "must be a whole number of KiB (libvirt counts memory in KiB)",
                    );
                }
            }
            Err(e) => errors.push("spec.memory.max", e.to_string()),
        }
    }
    if let Some(hugepages) = &memory.hugepages {
        match hugepages.page_size.bytes() {
            Ok(page) if page.is_power_of_two() && page >= 4096 => {
                if let Some(size) = size
                    && !size.is_multiple_of(page)
                {
                    errors.push(
                        "spec.memory.size",
                        format!(
                            "must be a multiple of the hugepage size {}",
                            hugepages.page_size
                        ),
                    );
                }
            }
            Ok(_) => errors.push(
                "spec.memory.hugepages.pageSize",
                "must be a power of two of at least 4Ki (2Mi or 1Gi on x86_64)",
            ),
            Err(e) => errors.push("spec.memory.hugepages.pageSize", e.to_string()),
        }
    }
}

fn validate_os(os: &OsSpec, errors: &mut FieldErrors) {
    if os.kernel.is_none() && (os.initrd.is_some() || os.cmdline.is_some()) {
        errors.push(
            "spec.os.kernel",
            "initrd and cmdline need kernel (direct kernel boot)",
        );
    }
    for (field, value) in [("kernel", &os.kernel), ("initrd", &os.initrd)] {
        if let Some(path) = value
            && !crate::names::is_clean_absolute_path(path)
        {
            errors.push(
                format!("spec.os.{field}"),
                crate::names::CLEAN_ABSOLUTE_PATH,
            );
        }
    }
    if let Some(cmdline) = &os.cmdline {
        if !crate::names::is_plain_text(cmdline) {
            errors.push("spec.os.cmdline", "must hold no control characters");
        } else if cmdline.is_empty() {
            errors.push("spec.os.cmdline", "must not be empty: leave it out");
        } else if cmdline.trim() != cmdline {
            // libvirt's XML is read back trimmed: the definition would never match.
            errors.push("spec.os.cmdline", "must not begin or end with whitespace");
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    for device in &os.boot {
        if !seen.insert(format!("{device:?}")) {
            errors.push("spec.os.boot", format!("{device:?} is listed twice"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The planner's check and the CRD's pattern must say the same (the API server enforces
    /// the pattern; the agent and the CLI the function).
    #[test]
    fn the_pci_address_check_agrees_with_the_crd_pattern() {
        let pattern = regex::Regex::new(PCI_ADDRESS_PATTERN).unwrap();
        for text in [
            "0000:06:00.0",
            "ffff:ff:1f.7",
            "0000:06:20.0",
            "0000:06:00.8",
            "0000:0A:00.0",
            "06:00.0",
            "0000:06:00.0\n",
            "0000-06-00.0",
            "",
        ] {
            assert_eq!(is_pci_address(text), pattern.is_match(text), "{text:?}");
        }
        assert!(is_pci_address("0000:06:00.0"));
        assert!(!is_pci_address("0000:06:20.0"));
    }
}
