//! The desired state: manifests turned into the normalized form the planner compares
//! (libvirt names, KiB, canonical cpusets, disk targets chosen, defaults applied), each
//! object placed on the node it belongs to.

use std::collections::{BTreeMap, BTreeSet};

use virtkube_crds::cpuset::CpuSet;
use virtkube_crds::domain::{DiskBus, DiskDevice, Firmware, NicModel, PowerState, RunStrategy};
use virtkube_crds::manifest::{Manifest, Object};
use virtkube_crds::names::host_name;
use virtkube_crds::network::NetworkMode;
use virtkube_crds::volume::ReclaimPolicy;

use super::observed::{DhcpLease, DnsEntry, OwnerMark, PoolSourceView};
use super::{Notice, NoticeKind, ObjectKind, ObjectRef};

/// The hosts a plan covers: node names, and the one that takes objects without `nodeName`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nodes {
    /// The node of objects that name none.
    pub default: String,
    /// Every node, the default included.
    pub all: Vec<String>,
}

impl Nodes {
    /// One host, named `name`.
    pub fn single(name: &str) -> Self {
        Self {
            default: name.to_string(),
            all: vec![name.to_string()],
        }
    }
}

/// Everything the manifests ask for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DesiredState {
    /// Storage pools (each on every node).
    pub pools: Vec<DesiredPool>,
    /// Networks (each on every node).
    pub networks: Vec<DesiredNetwork>,
    /// Volumes (each on one node).
    pub volumes: Vec<DesiredVolume>,
    /// Domains (each on one node).
    pub domains: Vec<DesiredDomain>,
}

/// A storage pool.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredPool {
    /// libvirt name.
    pub name: String,
    /// Ownership mark.
    pub owner: OwnerMark,
    /// Where the manifest came from (`file (document n)`).
    pub origin: String,
    /// libvirt pool type.
    pub pool_type: String,
    /// Target path (a `logical` pool's: `/dev/<volume group>`, as libvirt sets it).
    pub target_path: Option<String>,
    /// Source, as the manifest sets it.
    pub source: PoolSourceView,
    /// Make the volume group or filesystem on the source devices when the pool is created
    /// (`spec.source.build`).
    pub build: bool,
    /// Autostart flag.
    pub autostart: bool,
    /// The nodes it belongs on (its `nodeSelector` matched against the cluster's nodes);
    /// `None`: every node planned (the local CLI's hosts).
    pub only_on: Option<BTreeSet<String>>,
}

impl DesiredPool {
    /// The build step a new pool needs, if any: `Some(true)` also makes the storage on its
    /// devices (a logical pool's volume group, an fs pool's filesystem, a disk pool's
    /// partition table); `Some(false)` only its target directory (`dir`, `fs`, `netfs`). A
    /// logical or disk pool that is not built uses a volume group or partition table that
    /// exists already: nothing to build.
    pub fn build_step(&self) -> Option<bool> {
        match self.pool_type.as_str() {
            // libvirt builds a disk pool by writing a partition table (refusing a disk that
            // has one): never without source.build.
            "logical" | "disk" => self.build.then_some(true),
            "fs" => Some(self.build),
            _ => Some(false),
        }
    }

    /// Whether the pool belongs on `node`.
    pub fn placed_on(&self, node: &str) -> bool {
        self.only_on.as_ref().is_none_or(|n| n.contains(node))
    }
}

/// The source fields a StoragePool's manifest sets, as the planner compares them with
/// libvirt's. A `disk` pool's partition table is always written (`gpt` when left out):
/// libvirt's own default for a disk pool is `dos`.
pub fn pool_source_view(spec: &virtkube_crds::storage_pool::StoragePoolSpec) -> PoolSourceView {
    let disk = spec.type_ == virtkube_crds::storage_pool::PoolType::Disk;
    let default_format = disk.then(|| "gpt".to_string());
    let Some(s) = spec.source.as_ref() else {
        return PoolSourceView {
            format: default_format,
            ..PoolSourceView::default()
        };
    };
    PoolSourceView {
        host: s.host.clone(),
        dir: s.dir.clone(),
        devices: s.devices.clone(),
        name: s.name.clone(),
        format: s.format.map(|f| f.as_str().to_string()).or(default_format),
    }
}

/// A network.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredNetwork {
    /// libvirt name.
    pub name: String,
    /// Ownership mark.
    pub owner: OwnerMark,
    /// Where the manifest came from.
    pub origin: String,
    /// Mode word (`nat`, `isolated`, …).
    pub mode: String,
    /// Bridge name, when the user set one.
    pub bridge: Option<String>,
    /// Host address and prefix.
    pub ip: Option<(String, u8)>,
    /// DHCP ranges as (start, end).
    pub dhcp: Vec<(String, String)>,
    /// Fixed DHCP leases (MAC addresses in lower case).
    pub dhcp_hosts: Vec<DhcpLease>,
    /// Static DNS entries.
    pub dns_hosts: Vec<DnsEntry>,
    /// Autostart flag.
    pub autostart: bool,
    /// The nodes it belongs on (its `nodeSelector` matched against the cluster's nodes);
    /// `None`: every node planned (the local CLI's hosts).
    pub only_on: Option<BTreeSet<String>>,
}

impl DesiredNetwork {
    /// Whether the network belongs on `node`.
    pub fn placed_on(&self, node: &str) -> bool {
        self.only_on.as_ref().is_none_or(|n| n.contains(node))
    }
}

/// Where a volume's initial data comes from (libvirt names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeOrigin {
    /// Empty.
    Empty,
    /// A full copy of this volume (same pool).
    Clone(String),
    /// A copy-on-write overlay on this volume (same pool).
    Backing(String),
}

/// A volume.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredVolume {
    /// libvirt name (`<namespace>.<name>`).
    pub name: String,
    /// `namespace/name`.
    pub display: String,
    /// Ownership mark.
    pub owner: OwnerMark,
    /// Where the manifest came from.
    pub origin: String,
    /// Node that holds it.
    pub node: String,
    /// Pool (libvirt name).
    pub pool: String,
    /// Capacity in bytes; `None` for a clone that takes the source's size.
    pub capacity: Option<u64>,
    /// Format word.
    pub format: String,
    /// Initial data.
    pub source: VolumeOrigin,
    /// Keep the image when the Volume goes away.
    pub retain: bool,
}

/// Where a desired disk's data comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DesiredDiskSource {
    /// A Volume, by libvirt name, with its pool when the manifests say it.
    Volume {
        /// Volume libvirt name.
        volume: String,
        /// Pool, when known from the manifests.
        pool: Option<String>,
        /// The volume's format, when known.
        format: Option<String>,
    },
    /// A host path.
    Path(String),
}

/// A disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredDisk {
    /// Name in the spec.
    pub name: String,
    /// Guest device, chosen from the bus and list position when unset.
    pub target: String,
    /// Bus word.
    pub bus: String,
    /// `disk` or `cdrom`.
    pub device: String,
    /// Source.
    pub source: DesiredDiskSource,
    /// Read-only.
    pub read_only: bool,
    /// Boot order.
    pub boot_order: Option<u32>,
}

/// A NIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredNic {
    /// Name in the spec.
    pub name: String,
    /// libvirt network.
    pub network: String,
    /// Model word.
    pub model: String,
    /// MAC, when the user set one.
    pub mac: Option<String>,
}

/// A host PCI device passed through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredHostDevice {
    /// Name in the spec.
    pub name: String,
    /// PCI address on the node, `0000:06:00.0` (lower case, as libvirt reports it).
    pub address: String,
    /// libvirt detaches it from the host driver and reattaches it.
    pub managed: bool,
}

/// Live-migration settings.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DesiredMigration {
    /// Live (otherwise paused during the copy).
    pub live: bool,
    /// Max downtime, ms.
    pub max_downtime_ms: Option<u64>,
    /// Bandwidth, MiB/s.
    pub bandwidth_mib_s: Option<u64>,
    /// Auto-converge.
    pub auto_converge: bool,
    /// Copy non-shared disks.
    pub copy_storage: bool,
}

/// A domain.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredDomain {
    /// libvirt name (`<namespace>.<name>`).
    pub name: String,
    /// `namespace/name`.
    pub display: String,
    /// Ownership mark.
    pub owner: OwnerMark,
    /// Where the manifest came from.
    pub origin: String,
    /// Node it runs on.
    pub node: String,
    /// Run strategy.
    pub run_strategy: RunStrategy,
    /// The power state driven towards.
    pub state: PowerState,
    /// Whether `state` was written in the manifest (Manual enforces only an explicit state).
    pub explicit_state: bool,
    /// Autostart flag.
    pub autostart: bool,
    /// vCPUs now.
    pub vcpus: u32,
    /// Max vCPUs.
    pub max_vcpus: u32,
    /// CPU mode word, when set.
    pub cpu_mode: Option<String>,
    /// CPU model, when set.
    pub cpu_model: Option<String>,
    /// Topology, when set.
    pub topology: Option<(u32, u32, u32)>,
    /// Pinning, canonical cpusets.
    pub pinning: BTreeMap<u32, String>,
    /// Emulator pinning, canonical.
    pub emulator_cpuset: Option<String>,
    /// CPU weight and bandwidth the manifest sets (`cpu.limit` as a whole-guest quota over
    /// a 100 ms period).
    pub cpu_tune: super::observed::CpuTune,
    /// Memory now, KiB.
    pub memory_kib: u64,
    /// Max memory, KiB.
    pub max_memory_kib: u64,
    /// Hugepage size, KiB.
    pub hugepage_kib: Option<u64>,
    /// Machine type, when set.
    pub machine: Option<String>,
    /// Architecture, when set.
    pub arch: Option<String>,
    /// Firmware word, when set.
    pub firmware: Option<String>,
    /// Boot device order.
    pub boot: Vec<String>,
    /// Kernel.
    pub kernel: Option<String>,
    /// Initrd.
    pub initrd: Option<String>,
    /// Kernel command line.
    pub cmdline: Option<String>,
    /// Disks.
    pub disks: Vec<DesiredDisk>,
    /// NICs.
    pub interfaces: Vec<DesiredNic>,
    /// Host PCI devices.
    pub host_devices: Vec<DesiredHostDevice>,
    /// `updatePolicy: Restart`.
    pub restart_now: bool,
    /// Migration settings.
    pub migration: DesiredMigration,
}

fn origin_of(m: &Manifest) -> String {
    format!(
        "{} (document {})",
        m.source.file.display(),
        m.source.document
    )
}

fn canonical_cpuset(text: &str) -> Result<String, String> {
    text.parse::<CpuSet>()
        .map(|c| c.to_string())
        .map_err(|e| e.to_string())
}

fn bus_word(bus: DiskBus) -> &'static str {
    match bus {
        DiskBus::Virtio => "virtio",
        DiskBus::Sata => "sata",
        DiskBus::Scsi => "scsi",
        DiskBus::Ide => "ide",
        DiskBus::Usb => "usb",
    }
}

fn nic_word(model: NicModel) -> &'static str {
    match model {
        NicModel::Virtio => "virtio",
        NicModel::E1000e => "e1000e",
        NicModel::E1000 => "e1000",
        NicModel::Rtl8139 => "rtl8139",
    }
}

/// The mode word of a network mode.
pub fn network_mode_word(mode: NetworkMode) -> &'static str {
    match mode {
        NetworkMode::Nat => "nat",
        NetworkMode::Route => "route",
        NetworkMode::Open => "open",
        NetworkMode::Bridge => "bridge",
        NetworkMode::Isolated => "isolated",
    }
}

/// Device names `<prefix>a`, `<prefix>b`, … `<prefix>z`, `<prefix>aa`, … as libvirt counts.
fn nth_target(prefix: &str, mut n: usize) -> String {
    let mut letters = Vec::new();
    loop {
        letters.push((b'a' + (n % 26) as u8) as char);
        if n < 26 {
            break;
        }
        n = n / 26 - 1;
    }
    letters.reverse();
    format!("{prefix}{}", letters.into_iter().collect::<String>())
}

impl DesiredState {
    /// Normalizes loaded manifests. Problems (a node that is not among the hosts, a bad
    /// quantity) come back as notices naming the file, document, object and field; the
    /// objects they concern are left out.
    pub fn from_manifests(manifests: &[Manifest], nodes: &Nodes) -> (DesiredState, Vec<Notice>) {
        let mut state = DesiredState::default();
        let mut notices = Vec::new();
        let mut volume_info: BTreeMap<String, (String, String)> = BTreeMap::new();
        for m in manifests {
            if let Object::Volume(v) = &m.object {
                let ns = v.metadata.namespace.as_deref().unwrap_or("default");
                let name = v.metadata.name.clone().unwrap_or_default();
                volume_info.insert(
                    host_name(Some(ns), &name),
                    (
                        host_name(None, &v.spec.pool),
                        v.spec.format.as_str().to_string(),
                    ),
                );
            }
        }
        let mut problem = |m: &Manifest, kind: ObjectKind, name: &str, node: &str, msg: String| {
            notices.push(Notice {
                kind: NoticeKind::Invalid,
                object: ObjectRef::new(kind, name, name),
                node: node.to_string(),
                message: format!("{}: {msg}", origin_of(m)),
                changes: Vec::new(),
                users: Vec::new(),
            })
        };
        let check_node = |node: Option<&String>| -> Result<String, String> {
            match node {
                None => Ok(nodes.default.clone()),
                Some(n) if nodes.all.contains(n) => Ok(n.clone()),
                Some(n) => Err(format!(
                    "spec.nodeName: node `{n}` is not one of the hosts ({}); map it with --host {n}=URI",
                    nodes.all.join(", ")
                )),
            }
        };
        for m in manifests {
            match &m.object {
                Object::StoragePool(p) => {
                    let name = p.metadata.name.clone().unwrap_or_default();
                    state.pools.push(DesiredPool {
                        owner: OwnerMark::for_resource(
                            "StoragePool",
                            None,
                            &name,
                            p.metadata.uid.as_deref(),
                        ),
                        name,
                        origin: origin_of(m),
                        pool_type: p.spec.type_.as_str().to_string(),
                        target_path: p.spec.effective_target_path(),
                        source: pool_source_view(&p.spec),
                        build: p.spec.source.as_ref().is_some_and(|s| s.build),
                        autostart: p.spec.autostart,
                        only_on: None,
                    });
                }
                Object::Network(n) => {
                    let name = n.metadata.name.clone().unwrap_or_default();
                    let ip = n.spec.ip.as_ref();
                    state.networks.push(DesiredNetwork {
                        owner: OwnerMark::for_resource(
                            "Network",
                            None,
                            &name,
                            n.metadata.uid.as_deref(),
                        ),
                        name,
                        origin: origin_of(m),
                        mode: network_mode_word(n.spec.mode).to_string(),
                        bridge: n.spec.bridge.clone(),
                        ip: ip.map(|ip| (ip.address.clone(), ip.prefix)),
                        dhcp: ip
                            .and_then(|ip| ip.dhcp.as_ref())
                            .map(|d| {
                                d.ranges
                                    .iter()
                                    .map(|r| (r.start.clone(), r.end.clone()))
                                    .collect()
                            })
                            .unwrap_or_default(),
                        dhcp_hosts: ip
                            .and_then(|ip| ip.dhcp.as_ref())
                            .map(|d| {
                                d.hosts
                                    .iter()
                                    .map(|h| DhcpLease {
                                        mac: h.mac.to_ascii_lowercase(),
                                        ip: h.ip.clone(),
                                        name: h.name.clone(),
                                    })
                                    .collect()
                            })
                            .unwrap_or_default(),
                        dns_hosts: n
                            .spec
                            .dns
                            .as_ref()
                            .map(|d| {
                                d.hosts
                                    .iter()
                                    .map(|h| DnsEntry {
                                        ip: h.ip.clone(),
                                        hostnames: h
                                            .hostnames
                                            .iter()
                                            .map(|n| n.0.clone())
                                            .collect(),
                                    })
                                    .collect()
                            })
                            .unwrap_or_default(),
                        autostart: n.spec.autostart,
                        only_on: None,
                    });
                }
                Object::Volume(v) => {
                    let ns = v.metadata.namespace.as_deref().unwrap_or("default");
                    let short = v.metadata.name.clone().unwrap_or_default();
                    let name = host_name(Some(ns), &short);
                    let node = match check_node(v.spec.node_name.as_ref()) {
                        Ok(n) => n,
                        Err(e) => {
                            problem(m, ObjectKind::Volume, &name, "", e);
                            continue;
                        }
                    };
                    let capacity = match v.spec.capacity.as_ref().map(|c| c.bytes()) {
                        Some(Ok(b)) => Some(b),
                        Some(Err(e)) => {
                            problem(
                                m,
                                ObjectKind::Volume,
                                &name,
                                &node,
                                format!("spec.capacity: {e}"),
                            );
                            continue;
                        }
                        None => None,
                    };
                    let source = match &v.spec.source {
                        Some(s) => match (&s.volume, &s.backing_volume) {
                            (Some(c), _) => VolumeOrigin::Clone(host_name(Some(ns), c)),
                            (None, Some(b)) => VolumeOrigin::Backing(host_name(Some(ns), b)),
                            (None, None) => VolumeOrigin::Empty,
                        },
                        None => VolumeOrigin::Empty,
                    };
                    state.volumes.push(DesiredVolume {
                        owner: OwnerMark::for_resource(
                            "Volume",
                            Some(ns),
                            &short,
                            v.metadata.uid.as_deref(),
                        ),
                        display: format!("{ns}/{short}"),
                        name,
                        origin: origin_of(m),
                        node,
                        pool: v.spec.pool.clone(),
                        capacity,
                        format: v.spec.format.as_str().to_string(),
                        source,
                        retain: v.spec.reclaim_policy == ReclaimPolicy::Retain,
                    });
                }
                Object::Domain(d) => {
                    let ns = d.metadata.namespace.as_deref().unwrap_or("default");
                    let short = d.metadata.name.clone().unwrap_or_default();
                    let name = host_name(Some(ns), &short);
                    let node = match check_node(d.spec.node_name.as_ref()) {
                        Ok(n) => n,
                        Err(e) => {
                            problem(m, ObjectKind::Domain, &name, "", e);
                            continue;
                        }
                    };
                    match domain_from_spec(d, ns, &short, &node, &volume_info) {
                        Ok(mut dom) => {
                            dom.origin = origin_of(m);
                            state.domains.push(dom);
                        }
                        Err(e) => problem(m, ObjectKind::Domain, &name, &node, e),
                    }
                }
            }
        }
        (state, notices)
    }
}

fn kib(q: &virtkube_crds::quantity::ByteQuantity, field: &str) -> Result<u64, String> {
    q.bytes()
        .map(|b| b / 1024)
        .map_err(|e| format!("{field}: {e}"))
}

/// The `<cputune>` a Domain's `cpu` section asks for.
fn cpu_tune_of(cpu: &virtkube_crds::domain::CpuSpec) -> Result<super::observed::CpuTune, String> {
    use virtkube_crds::domain::{LIMIT_PERIOD_MICROS, parse_cpu_limit};
    let global_quota = cpu
        .limit
        .as_deref()
        .map(|l| parse_cpu_limit(l).map_err(|e| format!("spec.cpu.limit: {e}")))
        .transpose()?
        .map(|millis| i64::try_from(millis * LIMIT_PERIOD_MICROS / 1000).unwrap_or(i64::MAX));
    Ok(super::observed::CpuTune {
        shares: cpu.shares.map(u64::from),
        period: cpu.period.map(u64::from),
        quota: cpu.quota.map(|q| i64::try_from(q).unwrap_or(i64::MAX)),
        global_period: global_quota.map(|_| LIMIT_PERIOD_MICROS),
        global_quota,
        emulator_period: cpu.emulator_period.map(u64::from),
        emulator_quota: cpu
            .emulator_quota
            .map(|q| i64::try_from(q).unwrap_or(i64::MAX)),
    })
}

fn domain_from_spec(
    d: &virtkube_crds::Domain,
    ns: &str,
    short: &str,
    node: &str,
    volumes: &BTreeMap<String, (String, String)>,
) -> Result<DesiredDomain, String> {
    let spec = &d.spec;
    let mut pinning = BTreeMap::new();
    for pin in &spec.cpu.pinning {
        let canonical = canonical_cpuset(&pin.cpuset)
            .map_err(|e| format!("spec.cpu.pinning[vcpu={}].cpuset: {e}", pin.vcpu))?;
        pinning.insert(pin.vcpu, canonical);
    }
    let emulator_cpuset = spec
        .cpu
        .emulator_cpuset
        .as_deref()
        .map(canonical_cpuset)
        .transpose()
        .map_err(|e| format!("spec.cpu.emulatorCpuset: {e}"))?;
    let memory_kib = kib(&spec.memory.size, "spec.memory.size")?;
    let max_memory_kib = match &spec.memory.max {
        Some(max) => kib(max, "spec.memory.max")?,
        None => memory_kib,
    };
    let hugepage_kib = spec
        .memory
        .hugepages
        .as_ref()
        .map(|h| kib(&h.page_size, "spec.memory.hugepages.pageSize"))
        .transpose()?;
    let os = spec.os.clone().unwrap_or_default();
    // Targets the user chose are taken first, so generated ones never collide with them.
    let mut used: BTreeSet<String> = spec.disks.iter().filter_map(|d| d.target.clone()).collect();
    let mut disks = Vec::new();
    for disk in &spec.disks {
        let target = match &disk.target {
            Some(t) => t.clone(),
            None => {
                let prefix = disk.bus.target_prefix();
                let mut n = 0;
                loop {
                    let candidate = nth_target(prefix, n);
                    if used.insert(candidate.clone()) {
                        break candidate;
                    }
                    n += 1;
                }
            }
        };
        let source = match (&disk.volume, &disk.host_path) {
            (Some(v), _) => {
                let volume = host_name(Some(ns), v);
                let known = volumes.get(&volume);
                DesiredDiskSource::Volume {
                    pool: known.map(|(p, _)| p.clone()),
                    format: known.map(|(_, f)| f.clone()),
                    volume,
                }
            }
            (None, Some(p)) => DesiredDiskSource::Path(p.clone()),
            (None, None) => {
                return Err(format!(
                    "spec.disks[name={}]: set exactly one of volume and hostPath",
                    disk.name
                ));
            }
        };
        disks.push(DesiredDisk {
            name: disk.name.clone(),
            target,
            bus: bus_word(disk.bus).to_string(),
            device: match disk.device {
                DiskDevice::Disk => "disk",
                DiskDevice::Cdrom => "cdrom",
            }
            .to_string(),
            source,
            read_only: disk.read_only || disk.device == DiskDevice::Cdrom,
            boot_order: disk.boot_order,
        });
    }
    let migration = spec.migration.clone().unwrap_or_default();
    Ok(DesiredDomain {
        name: host_name(Some(ns), short),
        display: format!("{ns}/{short}"),
        owner: OwnerMark::for_resource("Domain", Some(ns), short, d.metadata.uid.as_deref()),
        origin: String::new(),
        node: node.to_string(),
        run_strategy: spec.run_strategy,
        state: spec.effective_state(),
        explicit_state: spec.state.is_some(),
        autostart: spec.autostart,
        vcpus: spec.cpu.vcpus,
        max_vcpus: spec.cpu.effective_max_vcpus(),
        cpu_mode: spec.cpu.mode.map(|m| {
            serde_json::to_value(m)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default()
        }),
        cpu_model: spec.cpu.model.clone(),
        topology: spec.cpu.topology.map(|t| (t.sockets, t.cores, t.threads)),
        pinning,
        emulator_cpuset,
        cpu_tune: cpu_tune_of(&spec.cpu)?,
        memory_kib,
        max_memory_kib,
        hugepage_kib,
        machine: os.machine.clone(),
        arch: os.arch.clone(),
        firmware: os.firmware.map(|f| match f {
            Firmware::Bios => "bios".to_string(),
            Firmware::Efi => "efi".to_string(),
        }),
        boot: os
            .boot
            .iter()
            .map(|b| {
                serde_json::to_value(b)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default()
            })
            .collect(),
        kernel: os.kernel.clone(),
        initrd: os.initrd.clone(),
        cmdline: os.cmdline.clone(),
        disks,
        interfaces: spec
            .interfaces
            .iter()
            .map(|i| DesiredNic {
                name: i.name.clone(),
                network: i.network.clone(),
                model: nic_word(i.model).to_string(),
                mac: i.mac_address.as_ref().map(|m| m.to_ascii_lowercase()),
            })
            .collect(),
        host_devices: spec
            .host_devices
            .iter()
            .map(|h| DesiredHostDevice {
                name: h.name.clone(),
                address: h.address.to_ascii_lowercase(),
                managed: h.managed,
            })
            .collect(),
        restart_now: spec.update_policy == virtkube_crds::domain::UpdatePolicy::Restart,
        migration: DesiredMigration {
            live: migration.live,
            max_downtime_ms: migration.max_downtime_millis.map(u64::from),
            bandwidth_mib_s: migration
                .bandwidth
                .as_ref()
                .and_then(|b| b.bytes().ok())
                .map(|b| b.div_ceil(1024 * 1024)),
            auto_converge: migration.auto_converge,
            copy_storage: migration.allow_copy_storage,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::nth_target;

    #[test]
    fn targets_count_like_libvirt() {
        assert_eq!(nth_target("vd", 0), "vda");
        assert_eq!(nth_target("vd", 25), "vdz");
        assert_eq!(nth_target("vd", 26), "vdaa");
        assert_eq!(nth_target("sd", 27), "sdab");
    }
}
