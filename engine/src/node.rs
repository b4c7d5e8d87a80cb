//! Node verbs: host facts for scheduling and the `HypervisorNode` status.

use std::collections::{BTreeMap, BTreeSet};
use std::os::raw::{c_uchar, c_uint};

use virt::connect::Connect;
use virt::sys;
use virtkube_crds::cpuset::CpuSet;

use crate::engine::{CallClass, Engine};
use crate::error::{EngineError, Result, lv};
use crate::model::host_facts::{
    HostInterface, MediatedDevice, PciDevice, PoolSourceFound, SecurityModel,
};
use crate::model::hostdev::{HostdevObserved, PciAddress};
use crate::model::node::version_string;
use crate::model::{Capabilities, NodeCpuMap, NodeObserved};

/// Bounds on the host facts one read returns (each list is cut there; its total is kept).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FactsLimits {
    /// Host network interfaces.
    pub interfaces: usize,
    /// PCI devices.
    pub pci_devices: usize,
    /// Mediated devices.
    pub mediated_devices: usize,
    /// Storage pool sources.
    pub pool_sources: usize,
    /// Devices listed per pool source.
    pub devices_per_source: usize,
}

impl Default for FactsLimits {
    fn default() -> Self {
        Self {
            interfaces: 32,
            pci_devices: 128,
            mediated_devices: 32,
            pool_sources: 16,
            devices_per_source: 8,
        }
    }
}

/// One list of facts: what was read (cut at its limit) and how many there were, or why it
/// could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Facts<T> {
    /// Read.
    Read {
        /// The first ones, up to the limit.
        items: Vec<T>,
        /// How many libvirt reported.
        total: usize,
    },
    /// libvirt could not say, in its words (a driver without the API, a tool missing on the
    /// host).
    Unavailable(String),
}

impl<T> Facts<T> {
    fn cut(mut items: Vec<T>, limit: usize) -> Self {
        let total = items.len();
        items.truncate(limit);
        Facts::Read { items, total }
    }

    /// The items read (none when unavailable).
    pub fn items(&self) -> &[T] {
        match self {
            Facts::Read { items, .. } => items,
            Facts::Unavailable(_) => &[],
        }
    }
}

/// A host's interfaces, devices, security driver and storage sources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    /// Network interfaces (`virConnectListAllInterfaces`, read-only).
    pub interfaces: Facts<HostInterface>,
    /// PCI devices (`virConnectListAllNodeDevices`, `pci` capability).
    pub pci_devices: Facts<PciDevice>,
    /// Mediated devices (`mdev` capability).
    pub mediated_devices: Facts<MediatedDevice>,
    /// The security driver (`virNodeGetSecurityModel`); `None` when unavailable.
    pub security_model: Result<SecurityModel, String>,
    /// LVM volume groups a `logical` pool could use (`virConnectFindStoragePoolSources`).
    pub logical_sources: Facts<PoolSourceFound>,
}

fn security_model(c: &Connect) -> std::result::Result<SecurityModel, String> {
    let mut m = sys::virSecurityModel {
        model: [0; 257],
        doi: [0; 257],
    };
    // SAFETY: valid connection; libvirt fills the fixed-size, NUL-terminated fields.
    if unsafe { sys::virNodeGetSecurityModel(c.as_ptr(), &mut m) } < 0 {
        return Err(virt::error::Error::last_error().message().to_string());
    }
    // SAFETY: NUL-terminated within their buffers.
    let text = |f: &[std::os::raw::c_char]| {
        unsafe { std::ffi::CStr::from_ptr(f.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    };
    let model = text(&m.model);
    Ok(SecurityModel {
        // libvirt leaves the model empty when no security driver is loaded.
        model: if model.is_empty() {
            "none".into()
        } else {
            model
        },
        doi: text(&m.doi),
    })
}

fn read_interfaces(c: &Connect, limit: usize) -> Facts<HostInterface> {
    match c.list_all_interfaces(0) {
        Ok(list) => {
            let mut all: Vec<HostInterface> = list
                .iter()
                .filter_map(|i| {
                    Some(HostInterface {
                        name: i.name().ok()?,
                        mac: i.mac_string().ok().filter(|m| !m.is_empty()),
                        active: i.is_active().unwrap_or(false),
                    })
                })
                .collect();
            all.sort_by(|a, b| a.name.cmp(&b.name));
            Facts::cut(all, limit)
        }
        Err(e) => Facts::Unavailable(e.message().to_string()),
    }
}

/// Reads the XML of every node device with `cap`, keeping what `parse` makes of it, in
/// name order (so the same devices are listed, and the status stays the same, whatever
/// order libvirt answers in), cut at `limit`.
fn read_devices<T>(
    c: &Connect,
    cap: u32,
    limit: usize,
    parse: fn(&str) -> std::result::Result<Option<T>, crate::model::XmlError>,
) -> Facts<T> {
    match c.list_all_node_devices(cap) {
        Ok(list) => {
            let mut named: Vec<(String, &virt::nodedev::NodeDevice)> = list
                .iter()
                .filter_map(|d| Some((d.name().ok()?, d)))
                .collect();
            named.sort_by(|a, b| a.0.cmp(&b.0));
            let items: Vec<T> = named
                .into_iter()
                .filter_map(|(_, d)| parse(&d.xml_desc(0).ok()?).ok().flatten())
                .collect();
            Facts::cut(items, limit)
        }
        Err(e) => Facts::Unavailable(e.message().to_string()),
    }
}

fn read_logical_sources(c: &Connect, limits: &FactsLimits) -> Facts<PoolSourceFound> {
    match c.find_storage_pool_sources("logical", None, 0) {
        Ok(text) => match PoolSourceFound::list_from_xml("logical", &text) {
            Ok(mut list) => {
                for s in &mut list {
                    s.devices.truncate(limits.devices_per_source);
                }
                Facts::cut(list, limits.pool_sources)
            }
            Err(e) => Facts::Unavailable(e.to_string()),
        },
        // libvirt says "Failed to find any logical pool sources" when LVM has none.
        Err(e) if e.message().contains("Failed to find any") => Facts::cut(Vec::new(), 0),
        Err(e) => Facts::Unavailable(e.message().to_string()),
    }
}

/// The host's present and online CPUs through `virNodeGetCPUMap` (the `virt` crate has no
/// wrapper).
pub(crate) fn cpu_map(c: &Connect, call: &'static str) -> Result<NodeCpuMap> {
    let mut map: *mut c_uchar = std::ptr::null_mut();
    let mut online: c_uint = 0;
    // SAFETY: valid connection and out-pointers; libvirt allocates `map` with malloc.
    let n = unsafe { sys::virNodeGetCPUMap(c.as_ptr(), &mut map, &mut online, 0) };
    if n < 0 {
        return Err(EngineError::libvirt(call, virt::error::Error::last_error()));
    }
    let present = n as u32;
    let bytes = if map.is_null() {
        Vec::new()
    } else {
        // SAFETY: libvirt returned a map of `ceil(n / 8)` bytes, which we copy and then free
        // with the allocator that made it.
        unsafe {
            let v = std::slice::from_raw_parts(map, present.div_ceil(8) as usize).to_vec();
            libc::free(map.cast());
            v
        }
    };
    let online = CpuSet::from_cpumap(&bytes).ok_or_else(|| {
        EngineError::Internal(format!("libvirt reports no online CPU among {present}"))
    })?;
    Ok(NodeCpuMap { present, online })
}

impl Engine {
    /// The host's CPUs as libvirt counts them for cpumaps: how many are present, and which
    /// are online (pinning a vCPU to exactly the online set lets it float again).
    pub async fn node_cpu_map(&self) -> Result<NodeCpuMap> {
        self.call(CallClass::Query, "node_cpu_map", |c| {
            cpu_map(c, "node_cpu_map")
        })
        .await
    }

    /// Hostname, CPU topology, memory, NUMA cells with free memory, max vCPUs, hypervisor and
    /// libvirt versions, and the parsed capabilities.
    pub async fn node_info(&self) -> Result<NodeObserved> {
        self.call(CallClass::Query, "node_info", |c| {
            const CALL: &str = "node_info";
            let info = c.node_info().map_err(lv(CALL))?;
            let mut caps = Capabilities::from_xml(&c.capabilities().map_err(lv(CALL))?)?;
            if !caps.cells.is_empty()
                && let Ok(free) = c.cells_free_memory(0, caps.cells.len() as i32)
            {
                for (cell, f) in caps.cells.iter_mut().zip(free) {
                    cell.free_bytes = f;
                }
            }
            Ok(NodeObserved {
                hostname: c.hostname().map_err(lv(CALL))?,
                cpu_model: caps.cpu_model.clone().unwrap_or_else(|| info.model.clone()),
                cpus: info.cpus,
                // Some drivers do not implement the map; the rest of the facts still stand.
                cpu_map: cpu_map(c, CALL).ok(),
                mhz: info.mhz,
                numa_nodes: info.nodes,
                sockets: info.sockets,
                cores: info.cores,
                threads: info.threads,
                memory_kib: info.memory,
                free_memory_bytes: c.free_memory().unwrap_or(0),
                max_vcpus: c.max_vcpus(None).ok(),
                hypervisor: c.driver_type().map_err(lv(CALL))?,
                hypervisor_version: version_string(c.hyp_version().map_err(lv(CALL))?),
                libvirt_version: version_string(c.lib_version().map_err(lv(CALL))?),
                capabilities: caps,
            })
        })
        .await
    }

    /// The host's interfaces, PCI and mediated devices, security driver and LVM volume
    /// groups, each list bounded by `limits`, in one pass on one blocking thread (one
    /// libvirt call per list, plus one XML read per device). A list libvirt cannot give
    /// (the driver lacks the API, LVM's tools are missing) is [`Facts::Unavailable`] with
    /// libvirt's reason; the others still stand.
    pub async fn node_facts(&self, limits: FactsLimits) -> Result<HostFacts> {
        self.call(CallClass::Query, "node_facts", move |c| {
            Ok(HostFacts {
                interfaces: read_interfaces(c, limits.interfaces),
                pci_devices: read_devices(
                    c,
                    sys::VIR_CONNECT_LIST_NODE_DEVICES_CAP_PCI_DEV,
                    limits.pci_devices,
                    PciDevice::from_xml,
                ),
                mediated_devices: read_devices(
                    c,
                    sys::VIR_CONNECT_LIST_NODE_DEVICES_CAP_MDEV,
                    limits.mediated_devices,
                    MediatedDevice::from_xml,
                ),
                security_model: security_model(c),
                logical_sources: read_logical_sources(c, &limits),
            })
        })
        .await
    }

    /// The addresses of the host's PCI devices, from their node device names (one libvirt
    /// call, no XML read): what a domain's host devices are checked against. Unlike
    /// [`Engine::node_facts`] the list is not cut.
    pub async fn node_pci_addresses(&self) -> Result<BTreeSet<PciAddress>> {
        self.call(CallClass::Query, "node_pci_addresses", |c| {
            let devices = c
                .list_all_node_devices(sys::VIR_CONNECT_LIST_NODE_DEVICES_CAP_PCI_DEV)
                .map_err(lv("node_pci_addresses"))?;
            Ok(devices
                .iter()
                .filter_map(|d| PciAddress::from_node_device_name(&d.name().ok()?))
                .collect())
        })
        .await
    }

    /// Which domain of the host (any domain, virtkube's or not, running or only defined)
    /// lists each host PCI device, by address: a device is passed through to one guest at
    /// a time. One XML read per domain.
    pub async fn node_host_devices_in_use(&self) -> Result<BTreeMap<PciAddress, String>> {
        self.call(CallClass::Query, "node_host_devices_in_use", |c| {
            const CALL: &str = "node_host_devices_in_use";
            let mut used = BTreeMap::new();
            for dom in c.list_all_domains(0).map_err(lv(CALL))? {
                // A domain undefined since the listing holds nothing.
                let (Ok(name), Ok(text)) = (dom.name(), dom.xml_desc(0)) else {
                    continue;
                };
                let root = crate::model::xml::parse(&text)?;
                if let Some(devices) = root.find("devices") {
                    for h in HostdevObserved::all_from(devices) {
                        used.entry(h.address).or_insert_with(|| name.clone());
                    }
                }
            }
            Ok(used)
        })
        .await
    }

    /// The host's capabilities XML, parsed.
    pub async fn node_capabilities(&self) -> Result<Capabilities> {
        self.call(CallClass::Query, "node_capabilities", |c| {
            Ok(Capabilities::from_xml(
                &c.capabilities().map_err(lv("node_capabilities"))?,
            )?)
        })
        .await
    }
}
