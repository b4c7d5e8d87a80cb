//! The hosts a command works on: one engine per node, the adapter from the engine's observed
//! types to the planner's model ([`crate::plan::observed`]), and carrying out one action.

use std::collections::BTreeMap;
use std::time::Duration;

use virtkube_engine::domain::{Apply, ShutdownOutcome};
use virtkube_engine::hotplug::DetachOutcome;
use virtkube_engine::migrate::MigrateOptions;
use virtkube_engine::model::{
    BuildMode, CpuDef, CpuMode, CpuTune, Device, DeviceKey, DhcpHost, DhcpRange, DiskDef,
    DiskSource, DnsHost, DomainDef, DomainObserved, DomainState, Firmware, HostdevDef,
    InterfaceDef, IpDef, NetworkDef, NetworkEdit, NetworkMode, NetworkObserved, OsDef, PciAddress,
    PoolDef, PoolObserved, PoolSource, PoolType, Topology, VcpuPin, VolumeDef, VolumeFormat,
    VolumeObserved,
};
use virtkube_engine::{CpuSet, Engine, EngineConfig, EngineError, EngineStats, Owner};

use crate::plan::desired::Nodes;
use crate::plan::desired::{
    DesiredDisk, DesiredDiskSource, DesiredDomain, DesiredHostDevice, DesiredNetwork, DesiredNic,
    DesiredPool, VolumeOrigin,
};
use crate::plan::observed::{
    DhcpLease, DiskRef, DnsEntry, ObservedDisk, ObservedDomain, ObservedHost, ObservedHostDevice,
    ObservedNetwork, ObservedNic, ObservedPool, ObservedState, ObservedVolume, OwnerMark,
    PoolSourceView, PowerObserved,
};
use crate::plan::{Action, NetworkUpdate, Op, Preserve};
use crate::progress::{POLL_EVERY, Progress, ProgressEvent};
use tokio::sync::watch;

/// How long a guest gets to shut down after an ACPI request before it is destroyed.
pub const DEFAULT_SHUTDOWN_DEADLINE: Duration = Duration::from_secs(30);

/// How long a running guest gets to release a device being unplugged (libvirt's own 5 s
/// wait included) before the unplug is reported as refused and left for the next restart.
pub const UNPLUG_DEADLINE: Duration = Duration::from_secs(10);

/// Whether `uri` names libvirt's test driver, in this process (`test:///default`) or held by
/// a daemon (`test+unix:///default?socket=…`, as the scale bench runs it to keep the
/// driver's domains out of the agent's memory): the URI scheme's driver part is `test`.
pub fn is_test_driver(uri: &str) -> bool {
    uri.split_once(':')
        .is_some_and(|(scheme, _)| scheme.split('+').next() == Some("test"))
}

/// Whether the driver behind `uri` changes CPU weight and bandwidth of running domains
/// (`virDomainSetSchedulerParameters`; the test driver has only a `weight`). On QEMU it also
/// needs the cgroup `cpu` controller, which only the attempt tells: without it libvirt
/// refuses with "cgroup CPU controller is not mounted".
pub fn supports_live_cpu_tune(uri: &str) -> bool {
    !is_test_driver(uri)
}

/// Whether the driver behind `uri` plugs devices into running domains (the test driver
/// does not: `virDomainAttachDeviceFlags` is unsupported there).
pub fn supports_device_hotplug(uri: &str) -> bool {
    !is_test_driver(uri)
}

/// What can go wrong talking to the hosts.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// libvirt (through the engine) refused or failed.
    #[error("node {node}: {source}")]
    Engine {
        /// The node.
        node: String,
        /// The engine's error, with libvirt's reason.
        #[source]
        source: Box<EngineError>,
    },
    /// An action names a node that is not connected.
    #[error("node {0} is not connected (map it with --host {0}=URI)")]
    UnknownNode(String),
    /// Something in the action cannot be expressed for libvirt.
    #[error("{0}")]
    Invalid(String),
}

impl HostError {
    /// Whether running the action again may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            HostError::Engine { source, .. } => source.is_retryable(),
            _ => false,
        }
    }
}

/// How to reach one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSpec {
    /// Node name.
    pub node: String,
    /// Client URI.
    pub uri: String,
    /// The URI the *source* libvirtd uses to reach this node in a peer-to-peer migration
    /// (defaults to `uri`).
    pub p2p_uri: Option<String>,
    /// Explicit migration data URI (`tcp://10.99.0.2`), when libvirt's default does not work.
    pub migration_uri: Option<String>,
}

/// One connected node.
#[derive(Clone)]
pub struct Host {
    /// How it is reached.
    pub spec: HostSpec,
    /// Its engine.
    pub engine: Engine,
    /// Where live changes apply: the test driver takes only flags 0 (current), real
    /// daemons get live and config so a change survives the next boot.
    pub apply: Apply,
    /// Domain type for new definitions (`test`, `kvm` or `qemu`).
    pub virt_type: String,
}

/// Every connected node.
#[derive(Clone)]
pub struct Hosts {
    hosts: BTreeMap<String, Host>,
    default: String,
    /// Graceful shutdown deadline for stops, restarts and deletions.
    pub shutdown_deadline: Duration,
    /// Where long actions report their progress (migrations, volume copies, shutdowns);
    /// `None`: nowhere.
    pub progress: Option<crate::progress::Sink>,
    /// Encrypt live migrations with TLS (`VIR_MIGRATE_TLS`).
    pub migration_tls: bool,
}

fn engine_err(node: &str) -> impl Fn(EngineError) -> HostError + '_ {
    move |source| HostError::Engine {
        node: node.to_string(),
        source: Box::new(source),
    }
}

impl Hosts {
    /// Connects to every node; the first is the default for objects without `nodeName`.
    pub async fn connect(specs: &[HostSpec], config: EngineConfig) -> Result<Hosts, HostError> {
        let mut hosts = BTreeMap::new();
        let default = specs
            .first()
            .map(|s| s.node.clone())
            .ok_or_else(|| HostError::Invalid("no host to connect to".into()))?;
        for spec in specs {
            let engine = Engine::connect(&spec.uri, config.clone())
                .await
                .map_err(engine_err(&spec.node))?;
            let test_driver = is_test_driver(&spec.uri);
            let virt_type = if test_driver {
                "test".to_string()
            } else {
                let caps = engine
                    .node_capabilities()
                    .await
                    .map_err(engine_err(&spec.node))?;
                if caps.domain_types.iter().any(|t| t == "kvm") {
                    "kvm".to_string()
                } else {
                    "qemu".to_string()
                }
            };
            hosts.insert(
                spec.node.clone(),
                Host {
                    spec: spec.clone(),
                    engine,
                    apply: if test_driver {
                        Apply::Current
                    } else {
                        Apply::LiveAndConfig
                    },
                    virt_type,
                },
            );
        }
        Ok(Hosts {
            hosts,
            default,
            shutdown_deadline: DEFAULT_SHUTDOWN_DEADLINE,
            migration_tls: false,
            progress: None,
        })
    }

    /// The node names, for placing objects.
    pub fn nodes(&self) -> Nodes {
        let mut all: Vec<String> = vec![self.default.clone()];
        all.extend(self.hosts.keys().filter(|k| **k != self.default).cloned());
        Nodes {
            default: self.default.clone(),
            all,
        }
    }

    /// One node.
    pub fn get(&self, node: &str) -> Result<&Host, HostError> {
        self.hosts
            .get(node)
            .ok_or_else(|| HostError::UnknownNode(node.to_string()))
    }

    /// Every node.
    pub fn iter(&self) -> impl Iterator<Item = &Host> {
        self.hosts.values()
    }

    /// Call counters summed over every node.
    pub fn stats(&self) -> EngineStats {
        let mut merged: BTreeMap<&'static str, virtkube_engine::CallStat> = BTreeMap::new();
        let mut reconnects = 0;
        for h in self.hosts.values() {
            let s = h.engine.stats();
            reconnects += s.reconnects;
            for c in s.calls {
                merged
                    .entry(c.name)
                    .and_modify(|m| {
                        m.count += c.count;
                        m.errors += c.errors;
                        m.total += c.total;
                        m.max = m.max.max(c.max);
                    })
                    .or_insert(c);
            }
        }
        EngineStats {
            calls: merged.into_values().collect(),
            reconnects,
        }
    }

    /// Zeroes every node's counters.
    pub fn reset_stats(&self) {
        for h in self.hosts.values() {
            h.engine.reset_stats();
        }
    }

    /// Closes every connection.
    pub async fn close(&self) -> Result<(), HostError> {
        for (node, h) in &self.hosts {
            h.engine.close().await.map_err(engine_err(node))?;
        }
        Ok(())
    }

    /// Reads every node.
    pub async fn observe(&self) -> Result<ObservedState, HostError> {
        let mut state = ObservedState::default();
        for (node, h) in &self.hosts {
            state.hosts.insert(node.clone(), observe_host(h).await?);
        }
        Ok(state)
    }

    /// Carries out one action; returns a short note of what happened (e.g. how a shutdown
    /// ended).
    pub async fn run(&self, action: &Action) -> Result<String, HostError> {
        let host = self.get(&action.node)?;
        run_action(self, host, action).await
    }

    /// Sends one progress report about `a`, when someone listens.
    fn report(&self, a: &Action, progress: Progress) {
        if let Some(sink) = &self.progress {
            let node = if self.hosts.len() > 1 {
                format!(" [{}]", a.node)
            } else {
                String::new()
            };
            let label = format!("{} {}{node}: {}", a.symbol.mark(), a.object, a.op.verb());
            let _ = sink.send(ProgressEvent {
                action: a.id,
                label,
                progress,
            });
        }
    }

    /// Runs `work` with a watch channel whose readings are reported as progress of `a`
    /// (through `wrap`) while it runs.
    async fn reporting<T, R, Fut>(
        &self,
        a: &Action,
        wrap: fn(T) -> Progress,
        work: impl FnOnce(watch::Sender<Option<T>>) -> Fut,
    ) -> R
    where
        T: Clone,
        Fut: std::future::Future<Output = R>,
    {
        let (tx, mut rx) = watch::channel(None);
        let forward = async {
            while rx.changed().await.is_ok() {
                let reading = rx.borrow_and_update().clone();
                if let Some(reading) = reading {
                    self.report(a, wrap(reading));
                }
            }
        };
        let (result, ()) = futures::join!(work(tx), forward);
        result
    }
}

/// The ownership mark as the engine writes it.
pub fn to_owner(mark: &OwnerMark) -> Owner {
    Owner::new(&mark.kind, &mark.uid, mark.namespace.as_deref(), &mark.name)
}

/// The ownership mark as the planner reads it.
pub fn from_owner(owner: &Owner) -> OwnerMark {
    OwnerMark {
        kind: owner.kind.clone(),
        uid: owner.uid.clone(),
        namespace: owner.namespace.clone(),
        name: owner.name.clone(),
    }
}

async fn observe_host(h: &Host) -> Result<ObservedHost, HostError> {
    let node = h.spec.node.as_str();
    let e = &h.engine;
    let err = engine_err(node);
    let info = e.node_info().await.map_err(&err)?;
    let mut host = ObservedHost {
        host_cpus: Some(info.cpus),
        online_cpus: info.cpu_map.map(|m| m.online.to_string()),
        device_hotplug: supports_device_hotplug(&h.spec.uri),
        cpu_tune_live: supports_live_cpu_tune(&h.spec.uri),
        // A driver without node devices leaves host devices unchecked (libvirt then says
        // what it thinks of them when the guest starts).
        pci_devices: e
            .node_pci_addresses()
            .await
            .ok()
            .map(|all| all.iter().map(ToString::to_string).collect()),
        ..ObservedHost::default()
    };
    for name in e.pool_list().await.map_err(&err)? {
        let Some(p) = e.pool_observe(&name).await.map_err(&err)? else {
            continue;
        };
        let active = p.state == virtkube_engine::model::PoolState::Running;
        host.pools.insert(name.clone(), pool_from(&p));
        if !active {
            continue;
        }
        // A pool undefined since it was listed has no volumes to show.
        let volumes = match e.volume_observe_all(&name).await {
            Ok(volumes) => volumes,
            Err(gone) if gone.is_not_found() => continue,
            Err(other) => return Err(err(other)),
        };
        for v in volumes {
            host.volumes
                .insert((name.clone(), v.name.clone()), volume_from(&v, &p));
        }
    }
    for name in e.network_list().await.map_err(&err)? {
        if let Some(n) = e.network_observe(&name).await.map_err(&err)? {
            host.networks.insert(name, network_from(&n));
        }
    }
    // One pass over every domain (one pool slot instead of one per domain).
    let domains = e.domain_observe_all().await.map_err(&err)?;
    for d in domains {
        host.domains.insert(d.name.clone(), domain_from(&d));
    }
    Ok(host)
}

/// The planner's view of a volume libvirt reports, in `pool` (which carries virtkube's mark
/// or not). libvirt keeps no mark on volumes: in a virtkube pool, a volume named
/// `<namespace>.<name>` counts as one virtkube made — the rule of local manifests, which
/// have no other record; the agent decides from the Volume's recorded key instead
/// (`agent::ownership`). A partition of a `disk` pool is never counted so (libvirt names it
/// after the disk), and its format there is its partition type, not an image format: a
/// partition holds raw data.
pub fn volume_from(
    v: &VolumeObserved,
    pool: &virtkube_engine::model::PoolObserved,
) -> ObservedVolume {
    let partition = pool.pool_type == PoolType::Disk;
    ObservedVolume {
        owned: pool.owner.is_some() && !partition && v.name.contains('.'),
        key: v.key.clone(),
        path: v.path.clone(),
        capacity: v.capacity,
        allocation: v.allocation,
        format: if partition {
            Some("raw".to_string())
        } else {
            v.format.as_ref().map(|f| f.as_str().to_string())
        },
        backing_path: v.backing.as_ref().map(|b| b.path.clone()),
    }
}

/// Everything one node's libvirt holds, as the planner models it: every pool, every volume
/// of every running pool, every network and every domain (the whole-node view removals are
/// decided against).
pub async fn observe_node(h: &Host) -> Result<ObservedHost, HostError> {
    observe_host(h).await
}

/// The planner's view of a storage pool libvirt reports (shared with the agent).
pub fn pool_from(p: &PoolObserved) -> ObservedPool {
    ObservedPool {
        owner: p.owner.as_ref().map(from_owner),
        pool_type: p.pool_type.as_str().to_string(),
        target_path: p.target_path.clone(),
        source: PoolSourceView {
            host: p.source.host.clone(),
            dir: p.source.dir.clone(),
            devices: p.source.devices.clone(),
            name: p.source.name.clone(),
            format: p.source.format.clone(),
        },
        active: p.state == virtkube_engine::model::PoolState::Running,
        autostart: p.autostart,
        capacity: p.capacity,
        available: p.available,
    }
}

/// The planner's view of a network libvirt reports: its address as (address, prefix) and
/// its DHCP ranges as `start-end` (shared with the agent).
pub fn network_from(n: &NetworkObserved) -> ObservedNetwork {
    ObservedNetwork {
        owner: n.owner.as_ref().map(from_owner),
        mode: n.mode.as_str().to_string(),
        bridge: n.bridge.clone(),
        ip: n.ip.as_ref().map(|ip| (ip.address.clone(), ip.prefix)),
        dhcp_hosts: n
            .ip
            .as_ref()
            .map(|ip| {
                ip.hosts
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
            .dns_hosts
            .iter()
            .map(|h| DnsEntry {
                ip: h.ip.clone(),
                hostnames: h.hostnames.clone(),
            })
            .collect(),
        dhcp: n
            .ip
            .as_ref()
            .map(|ip| {
                ip.dhcp
                    .iter()
                    .map(|r| format!("{}-{}", r.start, r.end))
                    .collect()
            })
            .unwrap_or_default(),
        active: n.active,
        autostart: n.autostart,
    }
}

/// The planner's view of a domain libvirt reports.
pub fn domain_from(d: &DomainObserved) -> ObservedDomain {
    let power = match d.state {
        DomainState::Running
        | DomainState::Blocked
        | DomainState::Shutdown
        | DomainState::PmSuspended => PowerObserved::Running,
        DomainState::Paused => PowerObserved::Paused,
        DomainState::Crashed => PowerObserved::Crashed,
        DomainState::Shutoff | DomainState::NoState | DomainState::Unknown => {
            PowerObserved::Shutoff
        }
    };
    // libvirt's per-vCPU affinity (live while running, config otherwise); the XML's
    // `<vcpupin>` when the engine could not read it.
    let source = if d.live_pinning.is_empty() {
        &d.pinning
    } else {
        &d.live_pinning
    };
    let pinning = source
        .iter()
        .map(|p| (p.vcpu, p.cpuset.to_string()))
        .collect();
    ObservedDomain {
        owner: d.owner.as_ref().map(from_owner),
        uuid: d.uuid.clone(),
        id: d.id,
        power,
        reason: d.reason.clone(),
        vcpus: d.vcpus,
        max_vcpus: d.max_vcpus,
        cpu_mode: d.cpu.as_ref().map(|c| c.mode.as_str().to_string()),
        cpu_model: d.cpu.as_ref().and_then(|c| c.model.clone()),
        topology: d
            .cpu
            .as_ref()
            .and_then(|c| c.topology.as_ref())
            .map(|t| (t.sockets, t.cores, t.threads)),
        pinning,
        emulator_cpuset: d.emulator_cpuset.as_ref().map(|c| c.to_string()),
        // On QEMU the live `currentMemory` is the balloon's actual size, which stays at the
        // maximum until a guest driver gives memory back: virtkube's target is what it set in
        // the persistent definition (it sets memory live and in the config). The test driver
        // has no balloon and takes changes only live (flags 0): its live value is the target.
        memory_kib: match &d.config {
            Some(config) if d.virt_type != "test" => config.memory_kib,
            _ => d.memory_kib,
        },
        max_memory_kib: d.max_memory_kib,
        hugepage_kib: d.hugepage_kib,
        machine: d.os.machine.clone(),
        arch: d.os.arch.clone(),
        firmware: d.os.firmware.as_ref().map(|f| match f {
            Firmware::Bios => "bios".to_string(),
            Firmware::Efi => "efi".to_string(),
        }),
        boot: d.os.boot.clone(),
        kernel: d.os.kernel.clone(),
        initrd: d.os.initrd.clone(),
        cmdline: d.os.cmdline.clone(),
        disks: d
            .disks
            .iter()
            .map(|x| ObservedDisk {
                target: x.target_dev.clone(),
                bus: x.bus.clone(),
                device: x.device.clone(),
                source: match &x.source {
                    DiskSource::Volume { pool, volume } => DiskRef::Volume {
                        pool: pool.clone(),
                        volume: volume.clone(),
                    },
                    DiskSource::File { path } => DiskRef::Path(path.clone()),
                    DiskSource::Block { dev } => DiskRef::Path(dev.clone()),
                    DiskSource::None => DiskRef::Other,
                },
                read_only: x.read_only,
                boot_order: x.boot_order,
                chain: x.backing_chain.clone(),
            })
            .collect(),
        interfaces: d
            .interfaces
            .iter()
            .map(|i| ObservedNic {
                network: i.network.clone(),
                model: i.model.clone(),
                mac: i.mac.clone(),
                alias: i.alias.clone(),
            })
            .collect(),
        host_devices: d
            .hostdevs
            .iter()
            .map(|h| ObservedHostDevice {
                address: h.address.to_string(),
                managed: h.managed,
                alias: h.alias.clone(),
            })
            .collect(),
        autostart: d.autostart,
        persistent: d.persistent,
        pending_unplug: d.pending_unplug.clone(),
        start_owed: d.start_owed,
        cpu_tune: cpu_tune_from(&d.cpu_tune),
        security_labels: security_labels(&d.security_labels),
    }
}

/// `status.securityLabels` from what libvirt reports (shared with the agent).
pub fn security_labels(
    labels: &[virtkube_engine::model::SecurityLabel],
) -> Vec<virtkube_crds::domain::SecurityLabelStatus> {
    labels
        .iter()
        .take(8)
        .map(|l| virtkube_crds::domain::SecurityLabelStatus {
            model: l.model.clone(),
            type_: l.label_type.clone(),
            label: l.label.clone(),
            image_label: l.image_label.clone(),
        })
        .collect()
}

/// The planner's view of the CPU weight and bandwidth libvirt reports.
pub fn cpu_tune_from(t: &CpuTune) -> crate::plan::observed::CpuTune {
    crate::plan::observed::CpuTune {
        shares: t.shares,
        period: t.period,
        quota: t.quota,
        global_period: t.global_period,
        global_quota: t.global_quota,
        emulator_period: t.emulator_period,
        emulator_quota: t.emulator_quota,
    }
}

fn cpu_tune_def(t: &crate::plan::observed::CpuTune) -> CpuTune {
    CpuTune {
        shares: t.shares,
        period: t.period,
        quota: t.quota,
        global_period: t.global_period,
        global_quota: t.global_quota,
        emulator_period: t.emulator_period,
        emulator_quota: t.emulator_quota,
    }
}

fn cpuset(text: &str) -> Result<CpuSet, HostError> {
    text.parse::<CpuSet>()
        .map_err(|e| HostError::Invalid(format!("cpuset `{text}`: {e}")))
}

/// What a domain's definition takes from the host it is made for.
#[derive(Debug, Clone, Copy)]
pub struct DefTarget<'a> {
    /// The node's name (in messages).
    pub node: &'a str,
    /// The domain type (`test`, `kvm`, `qemu`).
    pub virt_type: &'a str,
    /// Whether the host is libvirt's test driver (which needs no balloon).
    pub test_driver: bool,
}

impl Host {
    /// What definitions made for this host take from it.
    pub fn def_target(&self) -> DefTarget<'_> {
        DefTarget {
            node: &self.spec.node,
            virt_type: &self.virt_type,
            test_driver: is_test_driver(&self.spec.uri),
        }
    }
}

/// The engine's definition of a desired domain for the host `on` (`pools`: the pool of each
/// volume a disk names without one).
pub fn domain_def(
    d: &DesiredDomain,
    preserve: &Preserve,
    on: DefTarget<'_>,
    pools: &BTreeMap<String, String>,
) -> Result<DomainDef, HostError> {
    let mut def = DomainDef::new(&d.name, to_owner(&d.owner));
    def.uuid = preserve.uuid.clone();
    def.start_owed = preserve.start_owed;
    def.virt_type = on.virt_type.to_string();
    def.vcpus = d.vcpus;
    def.max_vcpus = d.max_vcpus;
    def.cpu = match &d.cpu_mode {
        Some(mode) => Some(CpuDef {
            mode: CpuMode::parse(mode)
                .ok_or_else(|| HostError::Invalid(format!("cpu mode {mode}")))?,
            model: d.cpu_model.clone(),
            topology: d.topology.map(|(sockets, cores, threads)| Topology {
                sockets,
                cores,
                threads,
            }),
        }),
        None => None,
    };
    def.pinning = d
        .pinning
        .iter()
        .map(|(vcpu, c)| {
            Ok(VcpuPin {
                vcpu: *vcpu,
                cpuset: cpuset(c)?,
            })
        })
        .collect::<Result<_, HostError>>()?;
    def.emulator_cpuset = d.emulator_cpuset.as_deref().map(cpuset).transpose()?;
    def.cpu_tune = cpu_tune_def(&d.cpu_tune);
    def.memory_kib = d.memory_kib;
    def.max_memory_kib = d.max_memory_kib;
    def.hugepage_kib = d.hugepage_kib;
    let disk_boot = d.disks.iter().any(|x| x.boot_order.is_some());
    def.os = OsDef {
        machine: d.machine.clone(),
        arch: d.arch.clone(),
        firmware: d.firmware.as_deref().map(|f| {
            if f == "efi" {
                Firmware::Efi
            } else {
                Firmware::Bios
            }
        }),
        // libvirt refuses `<os><boot>` beside per-disk boot order.
        boot: if disk_boot {
            Vec::new()
        } else {
            d.boot.clone()
        },
        kernel: d.kernel.clone(),
        initrd: d.initrd.clone(),
        cmdline: d.cmdline.clone(),
    };
    def.disks = d
        .disks
        .iter()
        .map(|disk| disk_def(disk, on, pools))
        .collect::<Result<_, HostError>>()?;
    def.interfaces = d
        .interfaces
        .iter()
        .enumerate()
        .map(|(i, nic)| interface_def(nic, preserve.macs.get(i).cloned().flatten()))
        .collect();
    def.hostdevs = d
        .host_devices
        .iter()
        .map(hostdev_def)
        .collect::<Result<_, HostError>>()?;
    // A balloon lets memory change live up to the maximum.
    def.memballoon = d.max_memory_kib > d.memory_kib || !on.test_driver;
    Ok(def)
}

/// The engine's definition of one desired disk for the host `on` (`pools`: the pool of each volume,
/// for disks whose pool the manifests do not say).
fn disk_def(
    disk: &DesiredDisk,
    on: DefTarget<'_>,
    pools: &BTreeMap<String, String>,
) -> Result<DiskDef, HostError> {
    let (source, format) = match &disk.source {
        DesiredDiskSource::Volume {
            volume,
            pool,
            format,
        } => {
            let pool = pool
                .clone()
                .or_else(|| pools.get(volume).cloned())
                .ok_or_else(|| {
                    HostError::Invalid(format!(
                        "disk {}: volume {volume} is in no pool on node {}",
                        disk.name, on.node
                    ))
                })?;
            (
                DiskSource::Volume {
                    pool,
                    volume: volume.clone(),
                },
                format.clone(),
            )
        }
        DesiredDiskSource::Path(p) => (DiskSource::File { path: p.clone() }, None),
    };
    Ok(DiskDef {
        name: Some(disk.name.clone()),
        target_dev: disk.target.clone(),
        bus: Some(disk.bus.clone()),
        source,
        read_only: disk.read_only,
        boot_order: disk.boot_order,
        format,
        device: Some(disk.device.clone()),
    })
}

/// The engine's definition of one desired NIC (`generated`: the MAC libvirt generated for
/// it before, kept when the user set none).
fn interface_def(nic: &DesiredNic, generated: Option<String>) -> InterfaceDef {
    InterfaceDef {
        name: Some(nic.name.clone()),
        network: nic.network.clone(),
        model: Some(nic.model.clone()),
        mac: nic.mac.clone().or(generated),
    }
}

/// The engine's definition of one desired host device.
fn hostdev_def(dev: &DesiredHostDevice) -> Result<HostdevDef, HostError> {
    Ok(HostdevDef {
        name: Some(dev.name.clone()),
        address: PciAddress::parse(&dev.address).ok_or_else(|| {
            HostError::Invalid(format!(
                "host device {}: `{}` is not a PCI address",
                dev.name, dev.address
            ))
        })?,
        managed: dev.managed,
    })
}

/// The engine's definition of a desired storage pool.
pub fn pool_def(p: &DesiredPool) -> Result<PoolDef, HostError> {
    let path = p
        .target_path
        .clone()
        .ok_or_else(|| HostError::Invalid(format!("pool {} has no target.path", p.name)))?;
    let s = &p.source;
    Ok(PoolDef {
        name: p.name.clone(),
        pool_type: PoolType::parse(&p.pool_type),
        target_path: path,
        source: PoolSource {
            host: s.host.clone(),
            dir: s.dir.clone(),
            devices: s.devices.clone(),
            name: s.name.clone(),
            format: s.format.clone(),
        },
        owner: to_owner(&p.owner),
    })
}

fn dhcp_host_def(h: &DhcpLease) -> DhcpHost {
    DhcpHost {
        mac: h.mac.clone(),
        ip: h.ip.clone(),
        name: h.name.clone(),
    }
}

fn dns_host_def(h: &DnsEntry) -> DnsHost {
    DnsHost {
        ip: h.ip.clone(),
        hostnames: h.hostnames.clone(),
    }
}

/// The engine's edit for a planned live network update.
pub fn network_edit(u: &NetworkUpdate) -> NetworkEdit {
    match u {
        NetworkUpdate::AddDhcpHost(h) => NetworkEdit::AddDhcpHost(dhcp_host_def(h)),
        NetworkUpdate::ModifyDhcpHost(h) => NetworkEdit::ModifyDhcpHost(dhcp_host_def(h)),
        NetworkUpdate::DeleteDhcpHost(h) => NetworkEdit::DeleteDhcpHost(dhcp_host_def(h)),
        NetworkUpdate::AddDnsHost(h) => NetworkEdit::AddDnsHost(dns_host_def(h)),
        NetworkUpdate::DeleteDnsHost(h) => NetworkEdit::DeleteDnsHost(dns_host_def(h)),
        NetworkUpdate::AddDhcpRange(r) => NetworkEdit::AddDhcpRange(DhcpRange {
            start: r.start.clone(),
            end: r.end.clone(),
        }),
        NetworkUpdate::DeleteDhcpRange(r) => NetworkEdit::DeleteDhcpRange(DhcpRange {
            start: r.start.clone(),
            end: r.end.clone(),
        }),
    }
}

/// The engine's definition of a desired network.
pub fn network_def(n: &DesiredNetwork) -> NetworkDef {
    NetworkDef {
        name: n.name.clone(),
        mode: match n.mode.as_str() {
            "isolated" => NetworkMode::Isolated,
            "bridge" => NetworkMode::Bridge,
            "route" => NetworkMode::Route,
            "open" => NetworkMode::Open,
            _ => NetworkMode::Nat,
        },
        bridge: n.bridge.clone(),
        ip: n.ip.as_ref().map(|(address, prefix)| IpDef {
            address: address.clone(),
            prefix: *prefix,
            dhcp: n
                .dhcp
                .iter()
                .map(|(start, end)| DhcpRange {
                    start: start.clone(),
                    end: end.clone(),
                })
                .collect(),
            hosts: n.dhcp_hosts.iter().map(dhcp_host_def).collect(),
        }),
        dns_hosts: n.dns_hosts.iter().map(dns_host_def).collect(),
        owner: to_owner(&n.owner),
    }
}

fn volume_format(word: &str) -> VolumeFormat {
    VolumeFormat::parse(word)
}

/// The engine's definition of a volume `name` the plan creates (`capacity`: the manifest's,
/// or a clone's source size; `backing`: the volume a copy-on-write overlay is built on).
pub fn volume_def(name: &str, capacity: u64, format: &str, backing: Option<&str>) -> VolumeDef {
    VolumeDef {
        name: name.to_string(),
        capacity_bytes: capacity,
        format: volume_format(format),
        backing_volume: backing.map(str::to_string),
    }
}

/// The pools holding each volume on a host, for disks whose pool the manifests do not say.
async fn volume_pools(host: &Host) -> Result<BTreeMap<String, String>, HostError> {
    let err = engine_err(&host.spec.node);
    let mut map = BTreeMap::new();
    for pool in host.engine.pool_list().await.map_err(&err)? {
        if let Ok(vols) = host.engine.volume_list(&pool).await {
            for v in vols {
                map.entry(v).or_insert_with(|| pool.clone());
            }
        }
    }
    Ok(map)
}

async fn run_action(hosts: &Hosts, host: &Host, a: &Action) -> Result<String, HostError> {
    let e = &host.engine;
    let err = engine_err(&host.spec.node);
    let name = a.object.name.as_str();
    let owner = to_owner(&a.owner);
    let deadline = hosts.shutdown_deadline;
    let done = |s: &str| Ok(s.to_string());
    match &a.op {
        Op::DefinePool(p) => {
            e.pool_define(&pool_def(p)?).await.map_err(&err)?;
            done("defined")
        }
        Op::BuildPool { make_storage } => {
            let mode = if *make_storage {
                BuildMode::MakeStorage
            } else {
                BuildMode::TargetOnly
            };
            e.pool_build(name, &owner, mode).await.map_err(&err)?;
            done(if *make_storage {
                "built (storage made on its devices)"
            } else {
                "built"
            })
        }
        Op::StartPool => {
            e.pool_start(name, &owner).await.map_err(&err)?;
            done("started")
        }
        Op::SetPoolAutostart(on) => {
            e.pool_set_autostart(name, &owner, *on)
                .await
                .map_err(&err)?;
            done("autostart set")
        }
        Op::DeletePool => {
            if let Err(stop) = e.pool_stop(name, &owner).await
                && !is_inactive_error(&stop)
            {
                return Err(err(stop));
            }
            e.pool_undefine(name, &owner).await.map_err(&err)?;
            done("stopped and undefined (files kept)")
        }
        Op::DefineNetwork(n) => {
            e.network_define(&network_def(n)).await.map_err(&err)?;
            done("defined")
        }
        Op::StartNetwork => {
            e.network_start(name, &owner).await.map_err(&err)?;
            done("started")
        }
        Op::UpdateNetwork(u) => {
            e.network_update(name, &owner, &network_edit(u))
                .await
                .map_err(&err)?;
            done("updated live")
        }
        Op::SetNetworkAutostart(on) => {
            e.network_set_autostart(name, &owner, *on)
                .await
                .map_err(&err)?;
            done("autostart set")
        }
        Op::DeleteNetwork => {
            if let Err(stop) = e.network_stop(name, &owner).await
                && !is_inactive_error(&stop)
            {
                return Err(err(stop));
            }
            e.network_undefine(name, &owner).await.map_err(&err)?;
            done("stopped and undefined")
        }
        Op::CreateVolume {
            pool,
            capacity,
            format,
            source,
        } => {
            match source {
                VolumeOrigin::Empty | VolumeOrigin::Backing(_) => {
                    let capacity = capacity.ok_or_else(|| {
                        HostError::Invalid(format!("volume {name} needs a capacity"))
                    })?;
                    let backing = match source {
                        VolumeOrigin::Backing(b) => Some(b.as_str()),
                        _ => None,
                    };
                    let def = volume_def(name, capacity, format, backing);
                    match e.volume_create(pool, &def).await {
                        Ok(v) => Ok(format!("created at {}", v.path)),
                        Err(exists) if exists.is_already_exists() => {
                            adopt(e, pool, name, exists).await.map_err(&err)
                        }
                        Err(other) => Err(err(other)),
                    }
                }
                VolumeOrigin::Clone(src) => {
                    // No capacity in the manifest: the source's size.
                    let capacity = match capacity {
                        Some(c) => *c,
                        None => e
                            .volume_observe(pool, src)
                            .await
                            .map_err(&err)?
                            .map(|v| v.capacity)
                            .ok_or_else(|| {
                                HostError::Invalid(format!("source volume {pool}/{src} is gone"))
                            })?,
                    };
                    let def = volume_def(name, capacity, format, None);
                    let cloned = hosts
                        .reporting(a, Progress::Copy, |tx| async move {
                            e.volume_clone_with_progress(pool, &def, src, POLL_EVERY, &tx)
                                .await
                        })
                        .await;
                    match cloned {
                        Ok(v) => Ok(format!(
                            "cloned to {} ({})",
                            v.path,
                            crate::plan::render::bytes(v.capacity)
                        )),
                        Err(exists) if exists.is_already_exists() => {
                            adopt(e, pool, name, exists).await.map_err(&err)
                        }
                        Err(other) => Err(err(other)),
                    }
                }
            }
        }
        Op::ResizeVolume {
            pool,
            key,
            capacity,
            live: None,
        } => {
            e.volume_resize(pool, name, key, *capacity)
                .await
                .map_err(&err)?;
            done("grown")
        }
        Op::ResizeVolume {
            pool,
            key,
            capacity,
            live: Some(disk),
        } => {
            // The domain's mark is checked by the engine; the volume's recorded key here,
            // since the resize goes through the domain and not the pool.
            let v = e
                .volume_observe(pool, name)
                .await
                .map_err(&err)?
                .ok_or_else(|| HostError::Invalid(format!("volume {pool}/{name} is gone")))?;
            if &v.key != key {
                return Err(err(EngineError::VolumeKeyMismatch {
                    pool: pool.clone(),
                    name: name.to_string(),
                    recorded: key.clone(),
                    found: v.key,
                }));
            }
            let owner = to_owner(&disk.owner);
            // By the image's path rather than the disk target: libvirt then resizes exactly
            // the disk backed by the image whose key was just checked.
            match e
                .domain_block_resize(&disk.domain, &owner, &v.path, *capacity)
                .await
            {
                Ok(()) => Ok(format!("grown live through domain {}", disk.domain)),
                // The guest stopped since it was observed: QEMU let go of the image.
                Err(live)
                    if !e
                        .domain_state(&disk.domain)
                        .await
                        .is_ok_and(|(s, _)| s.is_active()) =>
                {
                    e.volume_resize(pool, name, key, *capacity)
                        .await
                        .map_err(|_| err(live))?;
                    done("grown (the guest had stopped)")
                }
                Err(live) => Err(err(live)),
            }
        }
        Op::DeleteVolume { pool, key } => {
            e.volume_delete(pool, name, key).await.map_err(&err)?;
            done("deleted")
        }
        Op::DefineDomain { domain, preserve } => {
            let pools = if domain
                .disks
                .iter()
                .any(|d| matches!(d.source, DesiredDiskSource::Volume { pool: None, .. }))
            {
                volume_pools(host).await?
            } else {
                BTreeMap::new()
            };
            e.domain_define(&domain_def(domain, preserve, host.def_target(), &pools)?)
                .await
                .map_err(&err)?;
            done("defined")
        }
        Op::StartDomain { recover } => {
            if *recover {
                // A crashed guest keeps its process until destroyed.
                let _ = e.domain_destroy(name, &owner).await;
            }
            e.domain_start(name, &owner).await.map_err(&err)?;
            done("started")
        }
        Op::StopDomain => {
            hosts.report(a, Progress::Shutdown { deadline });
            let outcome = graceful_stop(e, name, &owner, deadline)
                .await
                .map_err(&err)?;
            Ok(outcome)
        }
        Op::SuspendDomain => {
            e.domain_suspend(name, &owner).await.map_err(&err)?;
            done("suspended")
        }
        Op::ResumeDomain => {
            e.domain_resume(name, &owner).await.map_err(&err)?;
            done("resumed")
        }
        Op::SetVcpus(n) => {
            e.domain_set_vcpus(name, &owner, *n, host.apply)
                .await
                .map_err(&err)?;
            done("vCPUs set")
        }
        Op::SetMemory(kib) => {
            e.domain_set_memory(name, &owner, *kib, host.apply)
                .await
                .map_err(&err)?;
            done("memory set")
        }
        Op::PinVcpu { vcpu, cpuset: c } => {
            e.domain_pin_vcpu(name, &owner, *vcpu, &cpuset(c)?, host.apply)
                .await
                .map_err(&err)?;
            done("pinned")
        }
        Op::PinEmulator(c) => {
            e.domain_pin_emulator(name, &owner, &cpuset(c)?, host.apply)
                .await
                .map_err(&err)?;
            done("pinned")
        }
        Op::SetCpuTune(tune) => {
            e.domain_set_cpu_tune(name, &owner, &cpu_tune_def(tune), host.apply)
                .await
                .map_err(&err)?;
            done("CPU weight and bandwidth set")
        }
        Op::SetDomainAutostart(on) => {
            e.domain_set_autostart(name, &owner, *on)
                .await
                .map_err(&err)?;
            done("autostart set")
        }
        Op::AttachDisk(disk) => {
            let pools = match disk.source {
                DesiredDiskSource::Volume { pool: None, .. } => volume_pools(host).await?,
                _ => BTreeMap::new(),
            };
            let def = disk_def(disk, host.def_target(), &pools)?;
            e.domain_attach_device(name, &owner, &Device::Disk(def))
                .await
                .map_err(&err)?;
            done("plugged in")
        }
        Op::AttachInterface(nic) => {
            e.domain_attach_device(name, &owner, &Device::Interface(interface_def(nic, None)))
                .await
                .map_err(&err)?;
            done("plugged in")
        }
        Op::DetachDisk { target } => {
            let key = DeviceKey::Disk {
                target: target.clone(),
            };
            unplug(e, name, &owner, &key).await.map_err(&err)
        }
        Op::DetachInterface { mac } => {
            let key = DeviceKey::Interface { mac: mac.clone() };
            unplug(e, name, &owner, &key).await.map_err(&err)
        }
        Op::AttachHostDevice(dev) => {
            e.domain_attach_device(name, &owner, &Device::HostDevice(hostdev_def(dev)?))
                .await
                .map_err(&err)?;
            done("plugged in")
        }
        Op::DetachHostDevice { address } => {
            let key = DeviceKey::HostDevice {
                address: PciAddress::parse(address).ok_or_else(|| {
                    HostError::Invalid(format!("`{address}` is not a PCI address"))
                })?,
            };
            unplug(e, name, &owner, &key).await.map_err(&err)
        }
        Op::RestartDomain { domain, preserve } => {
            hosts.report(a, Progress::Shutdown { deadline });
            let outcome = graceful_stop(e, name, &owner, deadline)
                .await
                .map_err(&err)?;
            let pools = volume_pools(host).await?;
            e.domain_define(&domain_def(domain, preserve, host.def_target(), &pools)?)
                .await
                .map_err(&err)?;
            e.domain_start(name, &owner).await.map_err(&err)?;
            Ok(format!("shut down ({outcome}), redefined, started"))
        }
        Op::DeleteDomain => {
            hosts.report(a, Progress::Shutdown { deadline });
            let outcome = graceful_stop(e, name, &owner, deadline)
                .await
                .map_err(&err)?;
            e.domain_undefine(name, &owner).await.map_err(&err)?;
            Ok(format!("shut down ({outcome}), undefined"))
        }
        Op::MigrateDomain { to, migration } => {
            let dest = hosts.get(to)?;
            let mut opts = MigrateOptions::live_to(
                dest.spec
                    .p2p_uri
                    .clone()
                    .unwrap_or_else(|| dest.spec.uri.clone()),
            );
            opts.migrate_uri = dest.spec.migration_uri.clone();
            opts.dest_client_uri = Some(dest.spec.uri.clone());
            opts.live = migration.live;
            opts.auto_converge = migration.auto_converge;
            opts.copy_storage = migration.copy_storage;
            opts.max_downtime_ms = migration.max_downtime_ms;
            opts.bandwidth_mib_s = migration.bandwidth_mib_s;
            opts.tls = hosts.migration_tls;
            let outcome = hosts
                .reporting(a, Progress::Migration, |tx| {
                    let (owner, opts) = (&owner, &opts);
                    async move {
                        e.domain_migrate_with_progress(name, owner, opts, POLL_EVERY, &tx)
                            .await
                    }
                })
                .await
                .map_err(&err)?;
            Ok(format!(
                "migrated in {:.1}s{}{}",
                outcome.elapsed.as_secs_f64(),
                outcome
                    .downtime_ms
                    .map(|d| format!(", downtime {d} ms"))
                    .unwrap_or_default(),
                if outcome.peer_uri_derived {
                    format!(
                        "; the source libvirtd reached node {to} through {} (derived: inside a daemon, a qemu:/// URI names that daemon itself)",
                        outcome.peer_uri
                    )
                } else {
                    String::new()
                }
            ))
        }
    }
}

/// A retained image (its Volume was deleted with `reclaimPolicy: Retain`, or its pool
/// undefined) is adopted again by a Volume of the same namespace and name in virtkube's pool,
/// as the Volume API promises, instead of failing on "exists already". Never a partition of
/// a `disk` pool: its name is libvirt's (`sdb2`), not the Volume's, so one that exists
/// already was made for another Volume (two made at once both expect the next number), or
/// outside virtkube.
async fn adopt(
    e: &Engine,
    pool: &str,
    name: &str,
    exists: EngineError,
) -> Result<String, EngineError> {
    let partition = e
        .pool_observe(pool)
        .await?
        .is_some_and(|p| p.pool_type == PoolType::Disk);
    if partition {
        return Err(exists);
    }
    match e.volume_observe(pool, name).await? {
        Some(v) => Ok(format!("adopted the retained image at {}", v.path)),
        None => Err(exists),
    }
}

/// Unplugs a device and says how it went: a guest that does not release it within
/// [`UNPLUG_DEADLINE`] keeps it until it restarts (the planner then reports the change as
/// waiting for a restart, and `updatePolicy: Restart` restarts the guest).
async fn unplug(
    e: &Engine,
    name: &str,
    owner: &Owner,
    key: &DeviceKey,
) -> Result<String, EngineError> {
    Ok(
        match e
            .domain_detach_device(name, owner, key, UNPLUG_DEADLINE)
            .await?
        {
            DetachOutcome::Removed => "unplugged".into(),
            DetachOutcome::NotPresent => "already unplugged".into(),
            DetachOutcome::Refused { waited } => format!(
                "the guest did not release the {key} within {:.0} s (no OS or no driver \
                 answering the unplug request): removed from the definition, it stays in the \
                 running guest until it restarts",
                waited.as_secs_f64()
            ),
        },
    )
}

/// Stops a guest gracefully within `deadline`, then by force (the engine resumes a paused
/// guest first and destroys a crashed one); says how it ended.
async fn graceful_stop(
    e: &Engine,
    name: &str,
    owner: &Owner,
    deadline: Duration,
) -> Result<String, EngineError> {
    Ok(match e.domain_shutdown(name, owner, deadline).await? {
        ShutdownOutcome::AlreadyOff => "already off".into(),
        outcome => format!("{outcome:?}").to_lowercase(),
    })
}

/// libvirt's "not active" refusal when stopping an already stopped object.
fn is_inactive_error(e: &EngineError) -> bool {
    e.to_string().contains("not active") || e.to_string().contains("OPERATION_INVALID")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_test_driver_is_known_in_process_and_through_a_daemon() {
        assert!(is_test_driver("test:///default"));
        assert!(is_test_driver(
            "test+unix:///default?socket=/tmp/x/libvirt-sock"
        ));
        assert!(is_test_driver("test+tcp://host/default"));
        assert!(!is_test_driver("qemu:///system"));
        assert!(!is_test_driver("qemu+ssh://root@a/system"));
        assert!(!is_test_driver("qemu:///system?socket=/tmp/test:/sock"));
        assert!(!is_test_driver("testing:///x"));
        assert!(!is_test_driver(""));
    }
}
