//! Domains: the desired definition (`DomainDef` → libvirt XML) and what libvirt reports
//! (`DomainObserved` ← libvirt XML, plus state, autostart and live pinning filled by the
//! engine).

use virtkube_crds::cpuset::CpuSet;

use super::device::pending_from_metadata;
use super::hostdev::{HostdevDef, HostdevObserved, hostdev_element};
use super::owner::Owner;
use super::xml::{self, Element, XmlError};

/// `<cpu mode=…>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CpuMode {
    /// `host-model`.
    HostModel,
    /// `host-passthrough` (needs KVM).
    HostPassthrough,
    /// `maximum`.
    Maximum,
    /// `custom` with a named model.
    Custom,
}

impl CpuMode {
    /// libvirt's spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            CpuMode::HostModel => "host-model",
            CpuMode::HostPassthrough => "host-passthrough",
            CpuMode::Maximum => "maximum",
            CpuMode::Custom => "custom",
        }
    }

    /// Parses libvirt's spelling.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "host-model" => CpuMode::HostModel,
            "host-passthrough" => CpuMode::HostPassthrough,
            "maximum" => CpuMode::Maximum,
            "custom" => CpuMode::Custom,
            _ => return None,
        })
    }
}

/// Guest CPU topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology {
    /// Sockets.
    pub sockets: u32,
    /// Cores per socket.
    pub cores: u32,
    /// Threads per core.
    pub threads: u32,
}

/// `<cpu>`: mode, model and topology.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuDef {
    /// CPU mode.
    pub mode: CpuMode,
    /// Model name (for `custom`, e.g. `qemu64`).
    pub model: Option<String>,
    /// Topology; sockets × cores × threads must equal `max_vcpus`.
    pub topology: Option<Topology>,
}

/// One vCPU pinned to a host cpuset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuPin {
    /// vCPU index.
    pub vcpu: u32,
    /// Host CPUs it may run on.
    pub cpuset: CpuSet,
}

/// CPU bandwidth and weight (`<cputune>`: `<shares>`, `<period>`/`<quota>` per vCPU,
/// `<global_period>`/`<global_quota>` for the whole guest, `<emulator_period>`/
/// `<emulator_quota>`); unset fields are left to libvirt (weight 1024, no limit). QEMU needs
/// the cgroup `cpu` controller for any of them (libvirt refuses to start the guest
/// otherwise: "cgroup cpu is required for scheduler tuning").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuTune {
    /// Relative weight (cgroup `cpu.shares`).
    pub shares: Option<u64>,
    /// Bandwidth period of each vCPU, µs.
    pub period: Option<u64>,
    /// Run time of each vCPU per period, µs (`-1`: unlimited).
    pub quota: Option<i64>,
    /// Bandwidth period of the whole guest, µs.
    pub global_period: Option<u64>,
    /// Run time of the whole guest per period, µs (`-1`: unlimited).
    pub global_quota: Option<i64>,
    /// Bandwidth period of the emulator threads, µs.
    pub emulator_period: Option<u64>,
    /// Run time of the emulator threads per period, µs (`-1`: unlimited).
    pub emulator_quota: Option<i64>,
}

impl CpuTune {
    /// Whether nothing is set.
    pub fn is_empty(&self) -> bool {
        *self == CpuTune::default()
    }

    /// The `<cputune>` children for the set fields, in libvirt's order.
    fn elements(&self) -> Vec<Element> {
        let fields: [(&str, Option<String>); 7] = [
            ("shares", self.shares.map(|v| v.to_string())),
            ("period", self.period.map(|v| v.to_string())),
            ("quota", self.quota.map(|v| v.to_string())),
            ("global_period", self.global_period.map(|v| v.to_string())),
            ("global_quota", self.global_quota.map(|v| v.to_string())),
            (
                "emulator_period",
                self.emulator_period.map(|v| v.to_string()),
            ),
            ("emulator_quota", self.emulator_quota.map(|v| v.to_string())),
        ];
        fields
            .into_iter()
            .filter_map(|(name, v)| v.map(|v| Element::new(name).text(v)))
            .collect()
    }

    /// Reads `<cputune>`.
    fn from_element(tune: &Element) -> Self {
        let u = |n: &str| tune.path_text(n).and_then(|t| t.parse().ok());
        let i = |n: &str| tune.path_text(n).and_then(|t| t.parse().ok());
        CpuTune {
            shares: u("shares"),
            period: u("period"),
            quota: i("quota"),
            global_period: u("global_period"),
            global_quota: i("global_quota"),
            emulator_period: u("emulator_period"),
            emulator_quota: i("emulator_quota"),
        }
    }
}

/// `<os firmware=…>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    /// SeaBIOS.
    Bios,
    /// UEFI.
    Efi,
}

/// `<os>`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OsDef {
    /// Machine type (`pc`, `q35`); libvirt picks its default when `None`.
    pub machine: Option<String>,
    /// Architecture; `x86_64` when `None`.
    pub arch: Option<String>,
    /// Firmware; BIOS when `None`.
    pub firmware: Option<Firmware>,
    /// Boot devices in order (`hd`, `network`, `cdrom`, `fd`). Must be empty when a disk has
    /// a `boot_order`.
    pub boot: Vec<String>,
    /// Direct kernel boot: kernel path on the host.
    pub kernel: Option<String>,
    /// Initrd path on the host.
    pub initrd: Option<String>,
    /// Kernel command line.
    pub cmdline: Option<String>,
}

/// Where a disk's data comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSource {
    /// A volume in a libvirt storage pool (`<disk type='volume'>`).
    Volume {
        /// Pool name.
        pool: String,
        /// Volume name.
        volume: String,
    },
    /// A host file (`<disk type='file'>`).
    File {
        /// Path.
        path: String,
    },
    /// A host block device (`<disk type='block'>`).
    Block {
        /// Device path.
        dev: String,
    },
    /// No source (an empty CD-ROM) or one the engine does not model.
    None,
}

/// One disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskDef {
    /// User name of the disk, written as libvirt user alias `ua-<name>` when it is made of
    /// `[A-Za-z0-9_-]`.
    pub name: Option<String>,
    /// Guest device (`vda`, `sda`).
    pub target_dev: String,
    /// Bus (`virtio`, `sata`, `scsi`, `ide`).
    pub bus: Option<String>,
    /// Source.
    pub source: DiskSource,
    /// Read-only.
    pub read_only: bool,
    /// Per-device boot order (1 = first).
    pub boot_order: Option<u32>,
    /// Image format for QEMU's driver (`qcow2`, `raw`).
    pub format: Option<String>,
    /// `disk` (default) or `cdrom`.
    pub device: Option<String>,
}

/// One network interface on a libvirt network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceDef {
    /// User name of the NIC, written as libvirt user alias `ua-<name>` when it is made of
    /// `[A-Za-z0-9_-]` (how the planner tells NICs apart once one is plugged in or out).
    pub name: Option<String>,
    /// libvirt network name.
    pub network: String,
    /// NIC model (`virtio`, `e1000`).
    pub model: Option<String>,
    /// MAC address; libvirt generates one when `None`.
    pub mac: Option<String>,
}

/// The desired definition of a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainDef {
    /// libvirt name (`<namespace>.<name>` for namespaced resources).
    pub name: String,
    /// UUID to define with (keep `None` and let libvirt choose, except to redefine).
    pub uuid: Option<String>,
    /// Domain type: `kvm`, or `qemu` for TCG (no KVM), `test` for the test driver.
    pub virt_type: String,
    /// vCPUs online now.
    pub vcpus: u32,
    /// Maximum vCPUs (hotplug ceiling).
    pub max_vcpus: u32,
    /// Guest CPU model; hypervisor default when `None`.
    pub cpu: Option<CpuDef>,
    /// Per-vCPU pinning.
    pub pinning: Vec<VcpuPin>,
    /// Emulator thread pinning.
    pub emulator_cpuset: Option<CpuSet>,
    /// CPU weight and bandwidth.
    pub cpu_tune: CpuTune,
    /// Memory now (`<currentMemory>`), KiB.
    pub memory_kib: u64,
    /// Memory at boot / ceiling (`<memory>`), KiB.
    pub max_memory_kib: u64,
    /// Back memory with hugepages of this size in KiB (2048, 1048576).
    pub hugepage_kib: Option<u64>,
    /// OS and boot.
    pub os: OsDef,
    /// Emulator binary; libvirt's default when `None`.
    pub emulator: Option<String>,
    /// Disks.
    pub disks: Vec<DiskDef>,
    /// NICs.
    pub interfaces: Vec<InterfaceDef>,
    /// Host PCI devices passed through.
    pub hostdevs: Vec<HostdevDef>,
    /// Keep a virtio memory balloon (off by default: `<memballoon model='none'/>`).
    pub memballoon: bool,
    /// The ownership mark.
    pub owner: Owner,
    /// Whether the definition carries the "first start owed" note ([`START_NS`]): set when a
    /// domain is defined to be started right after; the engine removes it when it starts
    /// the domain. A domain found shut off with the note was never started (the start was
    /// lost to a crash between the definition and the start), which is not the same as a
    /// guest that stopped on its own.
    pub start_owed: bool,
}

/// XML namespace of the "first start owed" note in a domain's `<metadata>`.
pub const START_NS: &str = "https://virtkube.io/xmlns/first-start/v1";
/// The prefix virtkube writes for [`START_NS`].
pub const START_PREFIX: &str = "vkstart";

/// Whether a domain's `<metadata>` holds the "first start owed" note.
pub fn start_owed_in(metadata: &Element) -> bool {
    metadata
        .children
        .iter()
        .any(|c| c.local_name() == "owed" && c.declared_namespace() == Some(START_NS))
}

impl DomainDef {
    /// A minimal definition: 1 vCPU, 128 MiB, no devices, BIOS, `virt_type` `kvm`.
    pub fn new(name: impl Into<String>, owner: Owner) -> Self {
        Self {
            name: name.into(),
            uuid: None,
            virt_type: "kvm".into(),
            vcpus: 1,
            max_vcpus: 1,
            cpu: None,
            pinning: Vec::new(),
            emulator_cpuset: None,
            cpu_tune: CpuTune::default(),
            memory_kib: 128 * 1024,
            max_memory_kib: 128 * 1024,
            hugepage_kib: None,
            os: OsDef::default(),
            emulator: None,
            disks: Vec::new(),
            interfaces: Vec::new(),
            hostdevs: Vec::new(),
            memballoon: false,
            owner,
            start_owed: false,
        }
    }

    /// Checks what libvirt would refuse, or silently get wrong, before any call.
    pub fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() || self.name.contains('/') {
            return Err(format!(
                "domain name `{}` is empty or contains `/`",
                self.name
            ));
        }
        if self.vcpus == 0 || self.vcpus > self.max_vcpus {
            return Err(format!(
                "vcpus {} must be between 1 and maxVcpus {}",
                self.vcpus, self.max_vcpus
            ));
        }
        if self.memory_kib == 0 || self.memory_kib > self.max_memory_kib {
            return Err(format!(
                "memory {} KiB must be between 1 and max memory {} KiB",
                self.memory_kib, self.max_memory_kib
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for p in &self.pinning {
            if p.vcpu >= self.max_vcpus {
                return Err(format!(
                    "pinning for vCPU {} but maxVcpus is {}",
                    p.vcpu, self.max_vcpus
                ));
            }
            if !seen.insert(p.vcpu) {
                return Err(format!("vCPU {} is pinned twice", p.vcpu));
            }
        }
        if let Some(t) = self.cpu.as_ref().and_then(|c| c.topology)
            && t.sockets * t.cores * t.threads != self.max_vcpus
        {
            return Err(format!(
                "topology {}×{}×{} does not equal maxVcpus {}",
                t.sockets, t.cores, t.threads, self.max_vcpus
            ));
        }
        if !self.os.boot.is_empty() && self.disks.iter().any(|d| d.boot_order.is_some()) {
            return Err("use either os boot devices or per-disk boot order, not both".into());
        }
        let mut devs = std::collections::BTreeSet::new();
        for d in &self.disks {
            if !devs.insert(&d.target_dev) {
                return Err(format!("two disks use target device {}", d.target_dev));
            }
        }
        Ok(())
    }

    /// The libvirt domain XML; every user string is escaped.
    pub fn to_xml(&self) -> String {
        let kib = |name: &str, v: u64| Element::new(name).attr("unit", "KiB").text(v);
        let mut root = Element::new("domain")
            .attr("type", &self.virt_type)
            .child(Element::new("name").text(&self.name))
            .child_opt(self.uuid.as_ref().map(|u| Element::new("uuid").text(u)))
            .child(
                Element::new("metadata")
                    .child(self.owner.to_element())
                    .child_opt(self.start_owed.then(|| {
                        Element::new(format!("{START_PREFIX}:owed"))
                            .attr(&format!("xmlns:{START_PREFIX}"), START_NS)
                    })),
            )
            .child(kib("memory", self.max_memory_kib))
            .child(kib("currentMemory", self.memory_kib));
        if let Some(size) = self.hugepage_kib {
            root = root.child(
                Element::new("memoryBacking").child(
                    Element::new("hugepages")
                        .child(Element::new("page").attr("size", size).attr("unit", "KiB")),
                ),
            );
        }
        root = root.child(
            Element::new("vcpu")
                .attr("placement", "static")
                .attr("current", self.vcpus)
                .text(self.max_vcpus),
        );
        if !self.pinning.is_empty() || self.emulator_cpuset.is_some() || !self.cpu_tune.is_empty() {
            let mut tune = Element::new("cputune");
            for el in self.cpu_tune.elements() {
                tune = tune.child(el);
            }
            let mut pins = self.pinning.clone();
            pins.sort_by_key(|p| p.vcpu);
            for p in pins {
                tune = tune.child(
                    Element::new("vcpupin")
                        .attr("vcpu", p.vcpu)
                        .attr("cpuset", &p.cpuset),
                );
            }
            if let Some(e) = &self.emulator_cpuset {
                tune = tune.child(Element::new("emulatorpin").attr("cpuset", e));
            }
            root = root.child(tune);
        }
        let mut os = Element::new("os").attr_opt(
            "firmware",
            self.os.firmware.map(|f| match f {
                Firmware::Bios => "bios",
                Firmware::Efi => "efi",
            }),
        );
        os = os.child(
            Element::new("type")
                .attr("arch", self.os.arch.as_deref().unwrap_or("x86_64"))
                .attr_opt("machine", self.os.machine.as_ref())
                .text("hvm"),
        );
        os = os
            .child_opt(
                self.os
                    .kernel
                    .as_ref()
                    .map(|k| Element::new("kernel").text(k)),
            )
            .child_opt(
                self.os
                    .initrd
                    .as_ref()
                    .map(|k| Element::new("initrd").text(k)),
            )
            .child_opt(
                self.os
                    .cmdline
                    .as_ref()
                    .map(|k| Element::new("cmdline").text(k)),
            );
        for b in &self.os.boot {
            os = os.child(Element::new("boot").attr("dev", b));
        }
        root = root.child(os).child(
            Element::new("features")
                .child(Element::new("acpi"))
                .child(Element::new("apic")),
        );
        if let Some(cpu) = &self.cpu {
            let mut el = Element::new("cpu").attr("mode", cpu.mode.as_str());
            if let Some(m) = &cpu.model {
                el = el.child(Element::new("model").attr("fallback", "allow").text(m));
            }
            if let Some(t) = cpu.topology {
                el = el.child(
                    Element::new("topology")
                        .attr("sockets", t.sockets)
                        .attr("dies", 1)
                        .attr("cores", t.cores)
                        .attr("threads", t.threads),
                );
            }
            root = root.child(el);
        }
        let mut devices = Element::new("devices").child_opt(
            self.emulator
                .as_ref()
                .map(|e| Element::new("emulator").text(e)),
        );
        for d in &self.disks {
            devices = devices.child(disk_element(d));
        }
        for i in &self.interfaces {
            devices = devices.child(interface_element(i));
        }
        for h in &self.hostdevs {
            devices = devices.child(hostdev_element(h));
        }
        if !self.memballoon {
            devices = devices.child(Element::new("memballoon").attr("model", "none"));
        }
        root.child(devices).to_xml()
    }
}

/// Whether libvirt accepts `ua-<name>` as a user alias.
pub(crate) fn valid_alias(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// The `<interface>` element of one NIC (also the device XML of a hotplug).
pub fn interface_element(i: &InterfaceDef) -> Element {
    Element::new("interface")
        .attr("type", "network")
        .child_opt(
            i.mac
                .as_ref()
                .map(|m| Element::new("mac").attr("address", m)),
        )
        .child(Element::new("source").attr("network", &i.network))
        .child_opt(
            i.model
                .as_ref()
                .map(|m| Element::new("model").attr("type", m)),
        )
        .child_opt(
            i.name
                .as_ref()
                .filter(|n| valid_alias(n))
                .map(|n| Element::new("alias").attr("name", format!("ua-{n}"))),
        )
}

/// The `<disk>` element of one disk (also the device XML of a hotplug).
pub fn disk_element(d: &DiskDef) -> Element {
    let (ty, source) = match &d.source {
        DiskSource::Volume { pool, volume } => (
            "volume",
            Some(
                Element::new("source")
                    .attr("pool", pool)
                    .attr("volume", volume),
            ),
        ),
        DiskSource::File { path } => ("file", Some(Element::new("source").attr("file", path))),
        DiskSource::Block { dev } => ("block", Some(Element::new("source").attr("dev", dev))),
        DiskSource::None => ("file", None),
    };
    Element::new("disk")
        .attr("type", ty)
        .attr("device", d.device.as_deref().unwrap_or("disk"))
        .child(
            Element::new("driver")
                .attr("name", "qemu")
                .attr_opt("type", d.format.as_ref()),
        )
        .child_opt(source)
        .child(
            Element::new("target")
                .attr("dev", &d.target_dev)
                .attr_opt("bus", d.bus.as_ref()),
        )
        .child_opt(d.read_only.then(|| Element::new("readonly")))
        .child_opt(d.boot_order.map(|o| Element::new("boot").attr("order", o)))
        .child_opt(
            d.name
                .as_ref()
                .filter(|n| valid_alias(n))
                .map(|n| Element::new("alias").attr("name", format!("ua-{n}"))),
        )
}

/// `virDomainState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DomainState {
    /// No state.
    NoState,
    /// Running.
    Running,
    /// Blocked on a resource.
    Blocked,
    /// Paused.
    Paused,
    /// Being shut down.
    Shutdown,
    /// Shut off.
    Shutoff,
    /// Crashed.
    Crashed,
    /// Suspended by guest power management.
    PmSuspended,
    /// A state this engine does not know.
    Unknown,
}

impl DomainState {
    /// From libvirt's raw `virDomainState`.
    pub fn from_raw(v: u32) -> Self {
        match v {
            0 => DomainState::NoState,
            1 => DomainState::Running,
            2 => DomainState::Blocked,
            3 => DomainState::Paused,
            4 => DomainState::Shutdown,
            5 => DomainState::Shutoff,
            6 => DomainState::Crashed,
            7 => DomainState::PmSuspended,
            _ => DomainState::Unknown,
        }
    }

    /// Whether a QEMU process exists for the domain.
    pub fn is_active(self) -> bool {
        !matches!(
            self,
            DomainState::Shutoff | DomainState::NoState | DomainState::Unknown
        )
    }

    /// virsh's word for the state.
    pub fn as_str(self) -> &'static str {
        match self {
            DomainState::NoState => "nostate",
            DomainState::Running => "running",
            DomainState::Blocked => "blocked",
            DomainState::Paused => "paused",
            DomainState::Shutdown => "shutdown",
            DomainState::Shutoff => "shutoff",
            DomainState::Crashed => "crashed",
            DomainState::PmSuspended => "pmsuspended",
            DomainState::Unknown => "unknown",
        }
    }
}

/// libvirt's state reason, as the word virsh prints (`booted`, `migrated`, `user`,
/// `destroyed`, …), for a raw state and reason.
pub fn state_reason_name(state: DomainState, reason: i32) -> &'static str {
    const RUNNING: &[&str] = &[
        "unknown",
        "booted",
        "migrated",
        "restored",
        "from snapshot",
        "unpaused",
        "migration canceled",
        "save canceled",
        "event wakeup",
        "crashed",
        "post-copy",
        "post-copy failed",
    ];
    const PAUSED: &[&str] = &[
        "unknown",
        "user",
        "migrating",
        "saving",
        "dumping",
        "I/O error",
        "watchdog",
        "from snapshot",
        "shutting down",
        "creating snapshot",
        "crashed",
        "starting up",
        "post-copy",
        "post-copy failed",
        "api error",
    ];
    const SHUTOFF: &[&str] = &[
        "unknown",
        "shutdown",
        "destroyed",
        "crashed",
        "migrated",
        "saved",
        "failed",
        "from snapshot",
        "daemon",
    ];
    const CRASHED: &[&str] = &["unknown", "panicked"];
    const SHUTDOWN: &[&str] = &["unknown", "user"];
    let table: &[&str] = match state {
        DomainState::Running => RUNNING,
        DomainState::Paused => PAUSED,
        DomainState::Shutoff => SHUTOFF,
        DomainState::Crashed => CRASHED,
        DomainState::Shutdown => SHUTDOWN,
        _ => &["unknown"],
    };
    usize::try_from(reason)
        .ok()
        .and_then(|r| table.get(r))
        .copied()
        .unwrap_or("unknown")
}

/// A disk as libvirt reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskObserved {
    /// The user alias without `ua-` (or libvirt's own alias on a running domain).
    pub alias: Option<String>,
    /// Guest device.
    pub target_dev: String,
    /// Bus.
    pub bus: Option<String>,
    /// `disk`, `cdrom`, …
    pub device: String,
    /// Source.
    pub source: DiskSource,
    /// Read-only.
    pub read_only: bool,
    /// Boot order.
    pub boot_order: Option<u32>,
    /// Driver format.
    pub format: Option<String>,
    /// The images under the disk's own, nearest first: the paths of libvirt's nested
    /// `<backingStore>` elements (a qcow2 overlay's backing file, its backing file, …). libvirt
    /// fills the chain in when it starts the guest, so a stopped domain usually reports none;
    /// the images of pool volumes are followed through the volumes' own XML instead.
    pub backing_chain: Vec<String>,
}

/// The deepest `<backingStore>` nesting read: deeper chains are cut there (QEMU itself
/// refuses chains far shorter).
pub const MAX_BACKING_DEPTH: usize = 64;

/// The paths of a disk's nested `<backingStore>` elements, nearest first (entries without a
/// local file or device, such as network images, are skipped but followed).
fn backing_chain(disk: &Element) -> Vec<String> {
    let mut chain = Vec::new();
    let mut next = disk.find("backingStore");
    let mut depth = 0;
    while let Some(store) = next {
        depth += 1;
        if depth > MAX_BACKING_DEPTH {
            break;
        }
        if let Some(path) = store
            .find("source")
            .and_then(|s| s.get("file").or_else(|| s.get("dev")))
        {
            chain.push(path.to_string());
        }
        next = store.find("backingStore");
    }
    chain
}

/// A NIC as libvirt reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceObserved {
    /// Interface type (`network`, `bridge`, `user`, …).
    pub kind: String,
    /// Network name for `type='network'`.
    pub network: Option<String>,
    /// Host bridge (for `bridge`, or the network's bridge on a running domain).
    pub bridge: Option<String>,
    /// MAC.
    pub mac: Option<String>,
    /// Model.
    pub model: Option<String>,
    /// Host-side device (`vnet0`) on a running domain.
    pub target_dev: Option<String>,
    /// The user alias without its `ua-` prefix (the spec's NIC name), when set.
    pub alias: Option<String>,
}

/// The vCPU and memory sizes of one domain definition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DomainSizes {
    /// vCPUs online (`current`, or max when absent).
    pub vcpus: u32,
    /// Maximum vCPUs.
    pub max_vcpus: u32,
    /// Current memory (`<currentMemory>`, or `<memory>` when absent), KiB.
    pub memory_kib: u64,
    /// Max memory, KiB.
    pub max_memory_kib: u64,
}

impl DomainSizes {
    fn from_root(root: &Element) -> Self {
        let vcpu = root.find("vcpu");
        let max_vcpus: u32 = vcpu.and_then(|v| v.text.trim().parse().ok()).unwrap_or(1);
        Self {
            vcpus: vcpu
                .and_then(|v| v.get_parsed("current"))
                .unwrap_or(max_vcpus),
            max_vcpus,
            memory_kib: match root.find("currentMemory") {
                Some(c) => parse_kib(Some(c)),
                None => parse_kib(root.find("memory")),
            },
            max_memory_kib: parse_kib(root.find("memory")),
        }
    }

    /// Reads the sizes from libvirt's domain XML (only its head: libvirt writes them before
    /// `<devices>`, so the rest is not parsed).
    pub fn from_xml(text: &str) -> Result<Self, XmlError> {
        Ok(Self::from_root(&xml::parse_head(text, "devices")?))
    }
}

/// What libvirt holds for a domain: its XML read back, plus the runtime facts the engine
/// adds (state, autostart, live pinning).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainObserved {
    /// Name.
    pub name: String,
    /// UUID.
    pub uuid: String,
    /// Domain ID while running.
    pub id: Option<u32>,
    /// Domain type.
    pub virt_type: String,
    /// vCPUs online (`current`, or max when absent).
    pub vcpus: u32,
    /// Maximum vCPUs.
    pub max_vcpus: u32,
    /// CPU model.
    pub cpu: Option<CpuDef>,
    /// Pinning from the XML's `<cputune>` (the definition, live or config as asked).
    pub pinning: Vec<VcpuPin>,
    /// Emulator pinning from `<cputune>`.
    pub emulator_cpuset: Option<CpuSet>,
    /// CPU weight and bandwidth from `<cputune>` (live values on a running domain).
    pub cpu_tune: CpuTune,
    /// Current memory, KiB.
    pub memory_kib: u64,
    /// Max memory, KiB.
    pub max_memory_kib: u64,
    /// Hugepage size, KiB.
    pub hugepage_kib: Option<u64>,
    /// OS section.
    pub os: OsDef,
    /// Emulator path.
    pub emulator: Option<String>,
    /// Disks.
    pub disks: Vec<DiskObserved>,
    /// NICs.
    pub interfaces: Vec<InterfaceObserved>,
    /// Host PCI devices passed through.
    pub hostdevs: Vec<HostdevObserved>,
    /// Whether a memballoon other than `none` is present.
    pub memballoon: bool,
    /// virtkube's mark, if present.
    pub owner: Option<Owner>,
    /// State (filled by the engine; `Unknown` from XML alone).
    pub state: DomainState,
    /// State reason (`booted`, `migrated`, …; filled by the engine).
    pub reason: String,
    /// Host autostart flag (filled by the engine).
    pub autostart: bool,
    /// Whether the domain is persistent (filled by the engine).
    pub persistent: bool,
    /// Whether a managed-save image exists (filled by the engine).
    pub has_managed_save: bool,
    /// Affinity of every vCPU as libvirt reports it through `virDomainGetVcpuPinInfo` (filled
    /// by the engine; for a running domain these are the live affinities, one per max vCPU).
    pub live_pinning: Vec<VcpuPin>,
    /// Devices whose unplug virtkube requested and the guest did not acknowledge in time
    /// ([`crate::model::PENDING_NS`] in the live `<metadata>`): gone from the definition,
    /// still plugged in until the guest lets go or restarts. Keys as
    /// [`crate::model::DeviceKey::as_key`] writes them.
    pub pending_unplug: Vec<String>,
    /// Whether the "first start owed" note ([`START_NS`]) is in the `<metadata>`: defined to
    /// be started, and never started yet.
    pub start_owed: bool,
    /// Security labels (`<seclabel>`; the label a running guest got, when dynamic).
    pub security_labels: Vec<super::host_facts::SecurityLabel>,
    /// For an active persistent domain with a memory balloon, the sizes in its persistent
    /// definition (filled by the engine; `None` otherwise: for an inactive domain the XML read
    /// is the definition itself, and without a balloon the live memory is the target). On
    /// QEMU the live `memory_kib` is the balloon's actual size, which stays at the maximum
    /// until a guest driver gives memory back, so the target set with
    /// [`crate::domain::Apply::LiveAndConfig`] is only found here.
    pub config: Option<DomainSizes>,
}

fn parse_kib(el: Option<&Element>) -> u64 {
    let Some(el) = el else { return 0 };
    let v: u64 = el.text.trim().parse().unwrap_or(0);
    let mult: u64 = match el.get("unit").unwrap_or("KiB") {
        "b" | "bytes" => return v / 1024,
        "KiB" | "k" | "KB" => 1,
        "MiB" | "M" | "MB" => 1024,
        "GiB" | "G" | "GB" => 1024 * 1024,
        "TiB" | "T" | "TB" => 1024 * 1024 * 1024,
        _ => 1,
    };
    v * mult
}

impl DomainObserved {
    /// Reads libvirt's domain XML (live or inactive; libvirt's own defaults included).
    pub fn from_xml(text: &str) -> Result<Self, XmlError> {
        let root = xml::parse(text)?;
        if root.name != "domain" {
            return Err(XmlError(format!(
                "expected <domain>, found <{}>",
                root.name
            )));
        }
        let name = root
            .path_text("name")
            .ok_or_else(|| XmlError("domain XML without <name>".into()))?;
        let sizes = DomainSizes::from_root(&root);
        let mut pinning = Vec::new();
        let mut emulator_cpuset = None;
        let mut cpu_tune = CpuTune::default();
        if let Some(tune) = root.find("cputune") {
            cpu_tune = CpuTune::from_element(tune);
            for p in tune.find_all("vcpupin") {
                if let (Some(vcpu), Some(cpuset)) = (
                    p.get_parsed::<u32>("vcpu"),
                    p.get("cpuset").and_then(|c| c.parse::<CpuSet>().ok()),
                ) {
                    pinning.push(VcpuPin { vcpu, cpuset });
                }
            }
            emulator_cpuset = tune
                .find("emulatorpin")
                .and_then(|e| e.get("cpuset"))
                .and_then(|c| c.parse().ok());
        }
        let cpu = root.find("cpu").and_then(|c| {
            let mode = CpuMode::parse(c.get("mode").unwrap_or("custom"))?;
            Some(CpuDef {
                mode,
                model: c.path_text("model"),
                topology: c.find("topology").map(|t| Topology {
                    sockets: t.get_parsed("sockets").unwrap_or(1),
                    cores: t.get_parsed("cores").unwrap_or(1),
                    threads: t.get_parsed("threads").unwrap_or(1),
                }),
            })
        });
        let os_el = root.find("os");
        let os = match os_el {
            Some(o) => OsDef {
                machine: o
                    .find("type")
                    .and_then(|t| t.get("machine"))
                    .map(str::to_string),
                arch: o
                    .find("type")
                    .and_then(|t| t.get("arch"))
                    .map(str::to_string),
                firmware: match o.get("firmware") {
                    Some("efi") => Some(Firmware::Efi),
                    Some("bios") => Some(Firmware::Bios),
                    _ => None,
                },
                boot: o
                    .find_all("boot")
                    .filter_map(|b| b.get("dev").map(str::to_string))
                    .collect(),
                kernel: o.path_text("kernel"),
                initrd: o.path_text("initrd"),
                cmdline: o.path_text("cmdline"),
            },
            None => OsDef::default(),
        };
        let devices = root.find("devices");
        let mut disks = Vec::new();
        let mut interfaces = Vec::new();
        let mut hostdevs = Vec::new();
        let mut memballoon = false;
        let mut emulator = None;
        if let Some(devs) = devices {
            emulator = devs.path_text("emulator");
            hostdevs = HostdevObserved::all_from(devs);
            memballoon = devs
                .find("memballoon")
                .is_some_and(|m| m.get("model") != Some("none"));
            for d in devs.find_all("disk") {
                let src = d.find("source");
                let source = match (d.get("type"), src) {
                    (Some("volume"), Some(s)) => DiskSource::Volume {
                        pool: s.get("pool").unwrap_or_default().to_string(),
                        volume: s.get("volume").unwrap_or_default().to_string(),
                    },
                    (Some("file"), Some(s)) if s.get("file").is_some() => DiskSource::File {
                        path: s.get("file").unwrap_or_default().to_string(),
                    },
                    (Some("block"), Some(s)) if s.get("dev").is_some() => DiskSource::Block {
                        dev: s.get("dev").unwrap_or_default().to_string(),
                    },
                    _ => DiskSource::None,
                };
                let alias = d
                    .find("alias")
                    .and_then(|a| a.get("name"))
                    .map(|a| a.strip_prefix("ua-").unwrap_or(a).to_string());
                disks.push(DiskObserved {
                    alias,
                    target_dev: d
                        .find("target")
                        .and_then(|t| t.get("dev"))
                        .unwrap_or_default()
                        .to_string(),
                    bus: d
                        .find("target")
                        .and_then(|t| t.get("bus"))
                        .map(str::to_string),
                    device: d.get("device").unwrap_or("disk").to_string(),
                    source,
                    read_only: d.find("readonly").is_some(),
                    boot_order: d.find("boot").and_then(|b| b.get_parsed("order")),
                    format: d
                        .find("driver")
                        .and_then(|b| b.get("type"))
                        .map(str::to_string),
                    backing_chain: backing_chain(d),
                });
            }
            for i in devs.find_all("interface") {
                let src = i.find("source");
                interfaces.push(InterfaceObserved {
                    kind: i.get("type").unwrap_or_default().to_string(),
                    network: src.and_then(|s| s.get("network")).map(str::to_string),
                    bridge: src.and_then(|s| s.get("bridge")).map(str::to_string),
                    mac: i
                        .find("mac")
                        .and_then(|m| m.get("address"))
                        .map(str::to_string),
                    model: i
                        .find("model")
                        .and_then(|m| m.get("type"))
                        .map(str::to_string),
                    target_dev: i
                        .find("target")
                        .and_then(|m| m.get("dev"))
                        .map(str::to_string),
                    alias: i
                        .find("alias")
                        .and_then(|a| a.get("name"))
                        .and_then(|a| a.strip_prefix("ua-"))
                        .map(str::to_string),
                });
            }
        }
        Ok(DomainObserved {
            uuid: root.path_text("uuid").unwrap_or_default(),
            id: root
                .get_parsed::<i64>("id")
                .and_then(|i| u32::try_from(i).ok()),
            virt_type: root.get("type").unwrap_or_default().to_string(),
            vcpus: sizes.vcpus,
            max_vcpus: sizes.max_vcpus,
            cpu,
            pinning,
            emulator_cpuset,
            cpu_tune,
            memory_kib: sizes.memory_kib,
            max_memory_kib: sizes.max_memory_kib,
            hugepage_kib: root
                .path("memoryBacking/hugepages")
                .map(|h| h.find("page").map(parse_page_kib).unwrap_or(0)),
            os,
            emulator,
            disks,
            interfaces,
            hostdevs,
            memballoon,
            owner: root.find("metadata").and_then(Owner::from_metadata),
            pending_unplug: root
                .find("metadata")
                .map(pending_from_metadata)
                .unwrap_or_default(),
            start_owed: root.find("metadata").is_some_and(start_owed_in),
            security_labels: super::host_facts::SecurityLabel::all_from_domain(&root),
            state: DomainState::Unknown,
            reason: String::new(),
            autostart: false,
            persistent: false,
            has_managed_save: false,
            live_pinning: Vec::new(),
            config: None,
            name,
        })
    }

    /// The affinity of `vcpu`, live when known, from the XML otherwise.
    pub fn affinity(&self, vcpu: u32) -> Option<&CpuSet> {
        self.live_pinning
            .iter()
            .chain(self.pinning.iter())
            .find(|p| p.vcpu == vcpu)
            .map(|p| &p.cpuset)
    }
}

fn parse_page_kib(p: &Element) -> u64 {
    let size: u64 = p.get_parsed("size").unwrap_or(0);
    match p.get("unit").unwrap_or("KiB") {
        "MiB" | "M" => size * 1024,
        "GiB" | "G" => size * 1024 * 1024,
        _ => size,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner() -> Owner {
        Owner::new("Domain", "uid-1", Some("team"), "vm")
    }

    #[test]
    fn the_first_start_note_is_written_and_read_back_beside_the_owner() {
        let mut d = sample();
        d.start_owed = true;
        let o = DomainObserved::from_xml(&d.to_xml()).unwrap();
        assert!(o.start_owed, "{}", d.to_xml());
        assert_eq!(
            o.owner,
            Some(owner()),
            "the owner mark is unchanged by the note"
        );
        d.start_owed = false;
        assert!(!DomainObserved::from_xml(&d.to_xml()).unwrap().start_owed);
    }

    fn sample() -> DomainDef {
        let mut d = DomainDef::new("team.vm", owner());
        d.virt_type = "qemu".into();
        d.vcpus = 1;
        d.max_vcpus = 2;
        d.pinning = vec![VcpuPin {
            vcpu: 0,
            cpuset: "1".parse().unwrap(),
        }];
        d.emulator_cpuset = Some("0-1".parse().unwrap());
        d.cpu_tune = CpuTune {
            shares: Some(512),
            global_period: Some(100_000),
            global_quota: Some(150_000),
            ..CpuTune::default()
        };
        d.os.machine = Some("pc".into());
        d.os.cmdline = Some("console=ttyS0 x=\"<&>\"".into());
        d.disks.push(DiskDef {
            name: Some("root".into()),
            target_dev: "vda".into(),
            bus: Some("virtio".into()),
            source: DiskSource::Volume {
                pool: "images".into(),
                volume: "team.root".into(),
            },
            read_only: false,
            boot_order: Some(1),
            format: Some("qcow2".into()),
            device: None,
        });
        d.interfaces.push(InterfaceDef {
            name: Some("lan".into()),
            network: "lan".into(),
            model: Some("virtio".into()),
            mac: Some("52:54:00:00:00:01".into()),
        });
        d.hostdevs.push(super::super::hostdev::HostdevDef {
            name: Some("gpu".into()),
            address: super::super::hostdev::PciAddress::parse("0000:07:00.0").unwrap(),
            managed: true,
        });
        d
    }

    #[test]
    fn sizes_come_from_the_head_of_the_xml() {
        let xml = "<domain type='kvm'><name>a</name><memory unit='MiB'>1024</memory>\
            <currentMemory unit='KiB'>524288</currentMemory><vcpu current='2'>4</vcpu>\
            <devices><disk type='file'><source file='/x'/></disk></devices></domain>";
        let sizes = DomainSizes::from_xml(xml).unwrap();
        assert_eq!(
            sizes,
            DomainSizes {
                vcpus: 2,
                max_vcpus: 4,
                memory_kib: 524288,
                max_memory_kib: 1024 * 1024,
            }
        );
        let full = DomainObserved::from_xml(xml).unwrap();
        assert_eq!((full.vcpus, full.memory_kib), (2, 524288));
    }

    #[test]
    fn to_xml_then_back() {
        let d = sample();
        d.validate().unwrap();
        let xml = d.to_xml();
        assert!(xml.contains("x=&quot;&lt;&amp;&gt;&quot;"), "{xml}");
        let o = DomainObserved::from_xml(&xml).unwrap();
        assert_eq!(o.name, "team.vm");
        assert_eq!(o.vcpus, 1);
        assert_eq!(o.max_vcpus, 2);
        assert_eq!(o.pinning, d.pinning);
        assert_eq!(o.emulator_cpuset, d.emulator_cpuset);
        assert_eq!(o.cpu_tune, d.cpu_tune);
        assert_eq!(o.memory_kib, 131072);
        assert_eq!(o.owner, Some(owner()));
        assert_eq!(o.os.cmdline, d.os.cmdline);
        assert_eq!(o.disks[0].alias.as_deref(), Some("root"));
        assert_eq!(o.disks[0].boot_order, Some(1));
        assert_eq!(o.interfaces[0].network.as_deref(), Some("lan"));
        assert_eq!(o.interfaces[0].alias.as_deref(), Some("lan"));
        assert_eq!(o.hostdevs[0].address.to_string(), "0000:07:00.0");
        assert_eq!(o.hostdevs[0].alias.as_deref(), Some("gpu"));
        assert!(o.hostdevs[0].managed);
        assert!(!o.memballoon);
    }

    #[test]
    fn validate_refuses_nonsense() {
        let mut d = sample();
        d.vcpus = 3;
        assert!(d.validate().is_err());
        let mut d = sample();
        d.pinning.push(VcpuPin {
            vcpu: 5,
            cpuset: "0".parse().unwrap(),
        });
        assert!(d.validate().is_err());
        let mut d = sample();
        d.os.boot = vec!["hd".into()];
        assert!(d.validate().is_err());
    }

    #[test]
    fn reasons() {
        assert_eq!(state_reason_name(DomainState::Running, 2), "migrated");
        assert_eq!(state_reason_name(DomainState::Shutoff, 2), "destroyed");
        assert_eq!(state_reason_name(DomainState::Paused, 1), "user");
        assert_eq!(state_reason_name(DomainState::Paused, 99), "unknown");
    }

    /// XML as libvirt 9.0's QEMU driver returns it for a running domain (expanded defaults,
    /// runtime aliases, a prefix chosen by libvirt for the metadata element).
    #[test]
    fn reads_libvirt_expanded_live_xml() {
        let xml = r#"<domain type='qemu' id='1'>
  <name>tiny</name>
  <uuid>8a0b7a7e-2a55-4a34-9a0e-0a4e1c2f2b11</uuid>
  <metadata>
    <virtkube:owner xmlns:virtkube="https://virtkube.io/xmlns/owner/v1" kind="Domain" uid="u1" namespace="ns" name="tiny"/>
  </metadata>
  <memory unit='KiB'>131072</memory>
  <currentMemory unit='KiB'>131072</currentMemory>
  <vcpu placement='static' current='1'>2</vcpu>
  <cputune>
    <vcpupin vcpu='0' cpuset='1'/>
  </cputune>
  <resource><partition>/machine</partition></resource>
  <os>
    <type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>
    <boot dev='hd'/>
  </os>
  <features><acpi/><apic/></features>
  <cpu mode='custom' match='exact' check='full'>
    <model fallback='forbid'>qemu64</model>
    <feature policy='require' name='x2apic'/>
  </cpu>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='volume' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source pool='p' volume='v' index='1'/>
      <backingStore/>
      <target dev='vda' bus='virtio'/>
      <alias name='ua-root'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x04' function='0x0'/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:6b:3c:58'/>
      <source network='iso' portid='2a0f' bridge='virbr9'/>
      <target dev='vnet0'/>
      <model type='virtio'/>
      <alias name='net0'/>
    </interface>
    <controller type='usb' index='0' model='piix3-uhci'/>
    <memballoon model='none'/>
  </devices>
  <seclabel type='none' model='none'/>
</domain>"#;
        let o = DomainObserved::from_xml(xml).unwrap();
        assert_eq!(o.id, Some(1));
        assert_eq!(o.vcpus, 1);
        assert_eq!(o.cpu.as_ref().unwrap().model.as_deref(), Some("qemu64"));
        assert_eq!(o.owner.unwrap().uid, "u1");
        assert_eq!(o.interfaces[0].bridge.as_deref(), Some("virbr9"));
        assert_eq!(o.interfaces[0].target_dev.as_deref(), Some("vnet0"));
        assert_eq!(
            o.disks[0].source,
            DiskSource::Volume {
                pool: "p".into(),
                volume: "v".into()
            }
        );
    }

    /// A running guest's disk on a qcow2 overlay, as libvirt 9.0 reports it (the chain is
    /// nested `<backingStore>` elements ending in an empty one).
    #[test]
    fn reads_a_disks_backing_chain() {
        let xml = r#"<domain type='qemu' id='3'>
  <name>chain</name>
  <uuid>8a0b7a7e-2a55-4a34-9a0e-0a4e1c2f2b12</uuid>
  <memory unit='KiB'>65536</memory>
  <vcpu placement='static'>1</vcpu>
  <os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type></os>
  <devices>
    <disk type='volume' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source pool='probe' volume='ov2' index='1'/>
      <backingStore type='file' index='2'>
        <format type='qcow2'/>
        <source file='/var/lib/libvirt/images/probe/ov'/>
        <backingStore type='network' index='3'>
          <format type='raw'/>
          <source protocol='nbd' name='x'/>
          <backingStore type='block' index='4'>
            <format type='raw'/>
            <source dev='/dev/vg/base'/>
            <backingStore/>
          </backingStore>
        </backingStore>
      </backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <target dev='hdc' bus='ide'/>
    </disk>
  </devices>
</domain>"#;
        let o = DomainObserved::from_xml(xml).unwrap();
        assert_eq!(
            o.disks[0].backing_chain,
            ["/var/lib/libvirt/images/probe/ov", "/dev/vg/base"]
        );
        assert!(o.disks[1].backing_chain.is_empty());
    }

    #[test]
    fn a_backing_chain_deeper_than_the_limit_is_cut() {
        let mut disk = Element::new("disk");
        let mut inner: Option<Element> = None;
        for i in 0..(MAX_BACKING_DEPTH + 10) {
            let mut store = Element::new("backingStore")
                .child(Element::new("source").attr("file", format!("/i/{i}")));
            if let Some(deeper) = inner.take() {
                store = store.child(deeper);
            }
            inner = Some(store);
        }
        disk = disk.child_opt(inner);
        assert_eq!(backing_chain(&disk).len(), MAX_BACKING_DEPTH);
    }
}
