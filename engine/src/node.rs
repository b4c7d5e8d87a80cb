//! Node verbs: host facts for scheduling and the `HypervisorNode` status.

use std::os::raw::{c_uchar, c_uint};

use virt::connect::Connect;
use virt::sys;
use virtkube_crds::cpuset::CpuSet;

use crate::engine::{CallClass, Engine};
use crate::error::{EngineError, Result, lv};
use crate::model::node::version_string;
use crate::model::{Capabilities, NodeCpuMap, NodeObserved};

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
