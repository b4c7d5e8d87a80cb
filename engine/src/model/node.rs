//! The host: node info, NUMA cells and what the capabilities XML says.

use virtkube_crds::cpuset::CpuSet;

use super::xml::{self, XmlError};

/// One NUMA cell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumaCell {
    /// Cell id.
    pub id: u32,
    /// Memory in the cell, KiB (from capabilities).
    pub memory_kib: u64,
    /// Free memory, bytes (from `virNodeGetCellsFreeMemory`).
    pub free_bytes: u64,
    /// Host CPUs in the cell.
    pub cpus: Option<CpuSet>,
}

/// What the capabilities XML tells scheduling and migration.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Capabilities {
    /// Host UUID (`host_uuid`; two hosts with the same one cannot migrate to each other).
    pub host_uuid: String,
    /// Host architecture.
    pub arch: String,
    /// Host CPU model name.
    pub cpu_model: Option<String>,
    /// Host CPU vendor.
    pub cpu_vendor: Option<String>,
    /// Host CPUs listed in the NUMA topology (the pinnable CPUs).
    pub host_cpus: Option<CpuSet>,
    /// NUMA cells (ids, memory and CPUs; free memory filled by the engine).
    pub cells: Vec<NumaCell>,
    /// Whether live migration is supported.
    pub live_migration: bool,
    /// Migration URI transports (`tcp`, `rdma`).
    pub migration_transports: Vec<String>,
    /// Guest domain types available (`qemu`, `kvm`, `test`).
    pub domain_types: Vec<String>,
}

impl Capabilities {
    /// Reads `virConnectGetCapabilities` XML.
    pub fn from_xml(text: &str) -> Result<Self, XmlError> {
        let root = xml::parse(text)?;
        let host = root
            .find("host")
            .ok_or_else(|| XmlError("capabilities without <host>".into()))?;
        let cpu = host.find("cpu");
        let mut cells = Vec::new();
        let mut all_cpus = Vec::new();
        if let Some(cs) = host.path("topology/cells") {
            for c in cs.find_all("cell") {
                let ids: Vec<u32> = c
                    .find("cpus")
                    .map(|cpus| {
                        cpus.find_all("cpu")
                            .filter_map(|x| x.get_parsed("id"))
                            .collect()
                    })
                    .unwrap_or_default();
                all_cpus.extend(ids.iter().copied());
                cells.push(NumaCell {
                    id: c.get_parsed("id").unwrap_or(0),
                    memory_kib: c
                        .find("memory")
                        .and_then(|m| m.text.trim().parse().ok())
                        .unwrap_or(0),
                    free_bytes: 0,
                    cpus: CpuSet::from_cpus(ids),
                });
            }
        }
        let mut domain_types: Vec<String> = root
            .find_all("guest")
            .flat_map(|g| g.find("arch").into_iter())
            .flat_map(|a| a.find_all("domain"))
            .filter_map(|d| d.get("type").map(str::to_string))
            .collect();
        domain_types.sort();
        domain_types.dedup();
        let mig = host.find("migration_features");
        Ok(Capabilities {
            host_uuid: host.path_text("uuid").unwrap_or_default(),
            arch: cpu.and_then(|c| c.path_text("arch")).unwrap_or_default(),
            cpu_model: cpu.and_then(|c| c.path_text("model")),
            cpu_vendor: cpu.and_then(|c| c.path_text("vendor")),
            host_cpus: CpuSet::from_cpus(all_cpus),
            cells,
            live_migration: mig.is_some_and(|m| m.find("live").is_some()),
            migration_transports: mig
                .and_then(|m| m.find("uri_transports"))
                .map(|t| {
                    t.find_all("uri_transport")
                        .map(|u| u.text.trim().to_string())
                        .collect()
                })
                .unwrap_or_default(),
            domain_types,
        })
    }
}

/// The host's CPUs as libvirt counts them for cpumaps (`virNodeGetCPUMap`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCpuMap {
    /// CPUs present (the length of every cpumap, in bits); may exceed the online ones.
    pub present: u32,
    /// The CPUs online: what an unpinned vCPU may run on, so pinning to exactly this set
    /// restores the float.
    pub online: CpuSet,
}

/// Everything the engine reports about the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeObserved {
    /// Hostname.
    pub hostname: String,
    /// CPU model (`virNodeInfo.model`, e.g. `x86_64`), or the capabilities' model name.
    pub cpu_model: String,
    /// Active CPUs.
    pub cpus: u32,
    /// The CPUs present and online (`virNodeGetCPUMap`); `None` when the driver cannot say.
    pub cpu_map: Option<NodeCpuMap>,
    /// CPU frequency, MHz.
    pub mhz: u32,
    /// NUMA nodes.
    pub numa_nodes: u32,
    /// Sockets per NUMA node.
    pub sockets: u32,
    /// Cores per socket.
    pub cores: u32,
    /// Threads per core.
    pub threads: u32,
    /// Total memory, KiB.
    pub memory_kib: u64,
    /// Free memory, bytes.
    pub free_memory_bytes: u64,
    /// Max vCPUs for one guest of the default domain type.
    pub max_vcpus: Option<u32>,
    /// Hypervisor driver (`QEMU`, `Test`).
    pub hypervisor: String,
    /// Hypervisor version as `major.minor.micro`.
    pub hypervisor_version: String,
    /// libvirt version of the daemon as `major.minor.micro`.
    pub libvirt_version: String,
    /// Parsed capabilities (NUMA cells carry free memory).
    pub capabilities: Capabilities,
}

/// libvirt's packed version number (`major * 1_000_000 + minor * 1000 + micro`) as text.
pub fn version_string(v: u32) -> String {
    format!("{}.{}.{}", v / 1_000_000, (v / 1000) % 1000, v % 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_capabilities() {
        let xml = r#"<capabilities><host><uuid>5a5a5a5a-0000-4000-8000-00000000000a</uuid>
<cpu><arch>x86_64</arch><model>Skylake-Client-IBRS</model><vendor>Intel</vendor><topology sockets='1' cores='2' threads='1'/></cpu>
<migration_features><live/><uri_transports><uri_transport>tcp</uri_transport><uri_transport>rdma</uri_transport></uri_transports></migration_features>
<topology><cells num='1'><cell id='0'><memory unit='KiB'>8000000</memory><cpus num='2'><cpu id='0' socket_id='0'/><cpu id='1' socket_id='0'/></cpus></cell></cells></topology>
</host><guest><os_type>hvm</os_type><arch name='x86_64'><domain type='qemu'/><domain type='kvm'/></arch></guest></capabilities>"#;
        let c = Capabilities::from_xml(xml).unwrap();
        assert_eq!(c.host_uuid, "5a5a5a5a-0000-4000-8000-00000000000a");
        assert_eq!(c.host_cpus.unwrap().to_string(), "0-1");
        assert!(c.live_migration);
        assert_eq!(c.migration_transports, vec!["tcp", "rdma"]);
        assert_eq!(c.domain_types, vec!["kvm", "qemu"]);
        assert_eq!(c.cells[0].memory_kib, 8000000);
        assert_eq!(version_string(9_000_000), "9.0.0");
    }
}
