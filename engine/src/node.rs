//! Node verbs: host facts for scheduling and the `HypervisorNode` status.

use crate::engine::{CallClass, Engine};
use crate::error::{EngineError, Result};
use crate::model::node::version_string;
use crate::model::{Capabilities, NodeObserved};

fn lv(call: &'static str) -> impl Fn(virt::error::Error) -> EngineError {
    move |e| EngineError::libvirt(call, e)
}

impl Engine {
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
