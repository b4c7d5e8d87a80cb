//! A domain's run-time statistics as libvirt's bulk call `virConnectGetAllDomainStats`
//! reports them (typed parameters such as `cpu.time`, `block.0.rd.bytes`), read into a
//! typed record. Pure: the engine's [`crate::stats`] makes the call.

use crate::typed_params::{ParamValue, get};

use super::domain::DomainState;

/// One disk's counters (`block.<n>.*`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BlockStats {
    /// The guest's device name (`vda`).
    pub name: String,
    /// Read requests.
    pub read_requests: Option<u64>,
    /// Bytes read.
    pub read_bytes: Option<u64>,
    /// Write requests.
    pub write_requests: Option<u64>,
    /// Bytes written.
    pub write_bytes: Option<u64>,
    /// Flush requests.
    pub flush_requests: Option<u64>,
    /// Guest-visible size, bytes.
    pub capacity_bytes: Option<u64>,
    /// Host storage the image occupies, bytes.
    pub allocation_bytes: Option<u64>,
}

/// One NIC's counters (`net.<n>.*`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NetStats {
    /// The host-side device name (`vnet3`; a new one at each start of the guest).
    pub name: String,
    /// Bytes received by the guest.
    pub rx_bytes: Option<u64>,
    /// Packets received.
    pub rx_packets: Option<u64>,
    /// Receive errors.
    pub rx_errors: Option<u64>,
    /// Received packets dropped.
    pub rx_drops: Option<u64>,
    /// Bytes sent by the guest.
    pub tx_bytes: Option<u64>,
    /// Packets sent.
    pub tx_packets: Option<u64>,
    /// Transmit errors.
    pub tx_errors: Option<u64>,
    /// Sent packets dropped.
    pub tx_drops: Option<u64>,
}

/// What one record of `virConnectGetAllDomainStats` says about a domain. Every counter is
/// optional: drivers report different groups (the test driver only the state; QEMU all).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DomainStatsRecord {
    /// State (`state.state`).
    pub state: Option<DomainState>,
    /// CPU time of the whole guest, ns (`cpu.time`).
    pub cpu_time_ns: Option<u64>,
    /// User-mode CPU time, ns (`cpu.user`).
    pub cpu_user_ns: Option<u64>,
    /// Kernel-mode CPU time, ns (`cpu.system`).
    pub cpu_system_ns: Option<u64>,
    /// vCPUs online (`vcpu.current`).
    pub vcpus: Option<u64>,
    /// vCPU ceiling (`vcpu.maximum`).
    pub max_vcpus: Option<u64>,
    /// Memory the guest has now, KiB (`balloon.current`).
    pub memory_kib: Option<u64>,
    /// Memory ceiling, KiB (`balloon.maximum`).
    pub max_memory_kib: Option<u64>,
    /// Host memory the guest's process occupies, KiB (`balloon.rss`).
    pub rss_kib: Option<u64>,
    /// Memory the guest reports usable, KiB (`balloon.usable`; needs a balloon driver).
    pub usable_kib: Option<u64>,
    /// Memory the guest reports unused, KiB (`balloon.unused`; needs a balloon driver).
    pub unused_kib: Option<u64>,
    /// Disks, in libvirt's order.
    pub blocks: Vec<BlockStats>,
    /// NICs, in libvirt's order.
    pub nets: Vec<NetStats>,
}

impl DomainStatsRecord {
    /// Reads one record's parameters, keeping at most `max_devices` disks and NICs each (a
    /// bound on what a caller exports per domain).
    pub fn from_params(params: &[(String, ParamValue)], max_devices: usize) -> Self {
        let u = |name: &str| get(params, name).and_then(ParamValue::as_u64);
        let count = |name: &str| {
            usize::try_from(u(name).unwrap_or(0))
                .unwrap_or(usize::MAX)
                .min(max_devices)
        };
        let blocks = (0..count("block.count"))
            .filter_map(|i| {
                let f = |k: &str| u(&format!("block.{i}.{k}"));
                let name = get(params, &format!("block.{i}.name"))?
                    .as_str()?
                    .to_string();
                Some(BlockStats {
                    name,
                    read_requests: f("rd.reqs"),
                    read_bytes: f("rd.bytes"),
                    write_requests: f("wr.reqs"),
                    write_bytes: f("wr.bytes"),
                    flush_requests: f("fl.reqs"),
                    capacity_bytes: f("capacity"),
                    allocation_bytes: f("allocation"),
                })
            })
            .collect();
        let nets = (0..count("net.count"))
            .filter_map(|i| {
                let f = |k: &str| u(&format!("net.{i}.{k}"));
                let name = get(params, &format!("net.{i}.name"))?.as_str()?.to_string();
                Some(NetStats {
                    name,
                    rx_bytes: f("rx.bytes"),
                    rx_packets: f("rx.pkts"),
                    rx_errors: f("rx.errs"),
                    rx_drops: f("rx.drop"),
                    tx_bytes: f("tx.bytes"),
                    tx_packets: f("tx.pkts"),
                    tx_errors: f("tx.errs"),
                    tx_drops: f("tx.drop"),
                })
            })
            .collect();
        DomainStatsRecord {
            state: u("state.state")
                .and_then(|s| u32::try_from(s).ok())
                .map(DomainState::from_raw),
            cpu_time_ns: u("cpu.time"),
            cpu_user_ns: u("cpu.user"),
            cpu_system_ns: u("cpu.system"),
            vcpus: u("vcpu.current"),
            max_vcpus: u("vcpu.maximum"),
            memory_kib: u("balloon.current"),
            max_memory_kib: u("balloon.maximum"),
            rss_kib: u("balloon.rss"),
            usable_kib: u("balloon.usable"),
            unused_kib: u("balloon.unused"),
            blocks,
            nets,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(name: &str, v: ParamValue) -> (String, ParamValue) {
        (name.to_string(), v)
    }

    /// Parameters as QEMU's driver reports them for a running guest with one disk and one
    /// NIC (names and types from libvirt 9.0).
    #[test]
    fn reads_a_qemu_record() {
        use ParamValue::*;
        let params = vec![
            p("state.state", Int(1)),
            p("state.reason", Int(1)),
            p("cpu.time", ULLong(1_500_000_000)),
            p("cpu.user", ULLong(1_000_000_000)),
            p("cpu.system", ULLong(400_000_000)),
            p("balloon.current", ULLong(131072)),
            p("balloon.maximum", ULLong(262144)),
            p("balloon.rss", ULLong(90000)),
            p("vcpu.current", UInt(1)),
            p("vcpu.maximum", UInt(2)),
            p("net.count", UInt(1)),
            p("net.0.name", String("vnet0".into())),
            p("net.0.rx.bytes", ULLong(100)),
            p("net.0.tx.pkts", ULLong(3)),
            p("block.count", UInt(2)),
            p("block.0.name", String("vda".into())),
            p("block.0.rd.reqs", ULLong(7)),
            p("block.0.rd.bytes", ULLong(4096)),
            p("block.0.capacity", ULLong(1 << 20)),
            p("block.1.name", String("vdb".into())),
        ];
        let r = DomainStatsRecord::from_params(&params, 64);
        assert_eq!(r.state, Some(DomainState::Running));
        assert_eq!(r.cpu_time_ns, Some(1_500_000_000));
        assert_eq!((r.vcpus, r.max_vcpus), (Some(1), Some(2)));
        assert_eq!(r.memory_kib, Some(131072));
        assert_eq!(r.rss_kib, Some(90000));
        assert_eq!(r.nets[0].name, "vnet0");
        assert_eq!(r.nets[0].rx_bytes, Some(100));
        assert_eq!(r.nets[0].tx_packets, Some(3));
        assert_eq!(r.nets[0].tx_bytes, None);
        assert_eq!(r.blocks.len(), 2);
        assert_eq!(r.blocks[0].read_bytes, Some(4096));
        assert_eq!(r.blocks[1].read_bytes, None);
        // The device bound holds whatever libvirt reports.
        assert_eq!(DomainStatsRecord::from_params(&params, 1).blocks.len(), 1);
    }

    /// The test driver reports only the state group.
    #[test]
    fn reads_a_state_only_record() {
        let r = DomainStatsRecord::from_params(
            &[
                p("state.state", ParamValue::Int(5)),
                p("state.reason", ParamValue::Int(0)),
            ],
            64,
        );
        assert_eq!(r.state, Some(DomainState::Shutoff));
        assert_eq!(r.cpu_time_ns, None);
        assert!(r.blocks.is_empty() && r.nets.is_empty());
    }
}
