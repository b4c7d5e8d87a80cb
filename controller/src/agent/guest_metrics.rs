//! Per-guest Prometheus metrics: CPU time, vCPUs, memory, and per-disk and per-NIC bytes and
//! operations of every virtkube-owned domain on this node, labelled by the Domain's
//! `namespace` and `name` (from virtkube's ownership mark).
//!
//! Gathered at scrape time in **one** libvirt call ([`Engine::domain_stats`], a single
//! `virConnectGetAllDomainStats`), never one call per domain or per metric. Counters stay
//! out of the Domain's status on purpose: status changes only when its meaning does.
//!
//! **Cardinality.** Only domains carrying virtkube's mark are exported (a foreign guest on
//! the host adds nothing), at most [`GuestMetricsConfig::max_domains`] of them (the first by
//! namespace and name; `virtkube_guest_stats_dropped` counts the rest). Each exported domain
//! adds at most [`DOMAIN_SERIES`] series, plus [`DISK_SERIES`] per disk and [`NIC_SERIES`]
//! per NIC (at most 64 disks and 32 NICs, the Domain API's limits). Disks are labelled by
//! their guest device (`vda`), stable across restarts; NICs by their host device (`vnet3`),
//! which libvirt renames at each start of the guest, so a restarted guest's NIC series
//! start afresh (the old ones go stale, as with any exporter of tap devices).

use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use virtkube_engine::Engine;
use virtkube_engine::model::{BlockStats, DomainState, DomainStatsRecord, NetStats};
use virtkube_engine::stats::{OwnedDomainStats, StatsBatch, StatsLimits};

/// Series per exported domain (one per domain-level family).
pub const DOMAIN_SERIES: usize = DOMAIN_FAMILIES.len();
/// Series per disk of an exported domain.
pub const DISK_SERIES: usize = DISK_FAMILIES.len();
/// Series per NIC of an exported domain.
pub const NIC_SERIES: usize = NIC_FAMILIES.len();

/// What the agent exports about its guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestMetricsConfig {
    /// virtkube-owned domains exported at most; 0 turns per-guest metrics off.
    pub max_domains: usize,
    /// How long one scrape waits for libvirt before reporting `virtkube_guest_stats_up 0`.
    pub timeout: Duration,
}

impl Default for GuestMetricsConfig {
    fn default() -> Self {
        Self {
            max_domains: 1000,
            timeout: Duration::from_secs(5),
        }
    }
}

/// The outcome of one gather: the batch, or why there is none, and how long it took.
#[derive(Debug, Clone)]
pub struct Scrape {
    /// The statistics (`None`: libvirt failed or timed out).
    pub batch: Option<StatsBatch>,
    /// Wall time of the gather.
    pub took: Duration,
}

/// Gathers the statistics of this node's virtkube domains in one libvirt call.
pub async fn scrape(engine: &Engine, config: GuestMetricsConfig) -> Scrape {
    let start = Instant::now();
    let limits = StatsLimits {
        max_domains: config.max_domains,
        // The Domain API's own limits: 64 disks, 32 NICs (the larger bounds both).
        max_devices: 64,
    };
    let batch = match tokio::time::timeout(config.timeout, engine.domain_stats(limits)).await {
        Ok(Ok(batch)) => Some(batch),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "gathering guest statistics failed");
            None
        }
        Err(_) => {
            tracing::warn!(timeout = ?config.timeout, "gathering guest statistics timed out");
            None
        }
    };
    Scrape {
        batch,
        took: start.elapsed(),
    }
}

/// A registry holding one scrape's families, to encode beside the agent's own registry.
pub fn registry(scrape: Scrape) -> Registry {
    let mut registry = Registry::default();
    registry
        .sub_registry_with_prefix("virtkube_guest")
        .register_collector(Box::new(GuestCollector(scrape)));
    registry
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DomainLabels {
    namespace: String,
    name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DiskLabels {
    namespace: String,
    name: String,
    disk: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NicLabels {
    namespace: String,
    name: String,
    interface: String,
}

/// A sample's value: counts stay integers, seconds are fractional.
#[derive(Clone, Copy)]
enum Value {
    Int(u64),
    Float(f64),
}

/// One metric family: its name (under `virtkube_guest_`), help, type and how to read it.
struct Family<T> {
    name: &'static str,
    help: &'static str,
    counter: bool,
    read: fn(&T) -> Option<Value>,
}

const fn counter<T>(
    name: &'static str,
    help: &'static str,
    read: fn(&T) -> Option<Value>,
) -> Family<T> {
    Family {
        name,
        help,
        counter: true,
        read,
    }
}

const fn gauge<T>(
    name: &'static str,
    help: &'static str,
    read: fn(&T) -> Option<Value>,
) -> Family<T> {
    Family {
        name,
        help,
        counter: false,
        read,
    }
}

fn seconds(ns: Option<u64>) -> Option<Value> {
    ns.map(|ns| Value::Float(ns as f64 / 1e9))
}

fn kib_bytes(kib: Option<u64>) -> Option<Value> {
    kib.map(|k| Value::Int(k.saturating_mul(1024)))
}

fn int(v: Option<u64>) -> Option<Value> {
    v.map(Value::Int)
}

const DOMAIN_FAMILIES: [Family<DomainStatsRecord>; 10] = [
    gauge(
        "running",
        "1 when the guest runs (libvirt state running), 0 otherwise",
        |s| {
            s.state
                .map(|st| Value::Int(u64::from(st == DomainState::Running)))
        },
    ),
    counter(
        "cpu_seconds",
        "CPU time the guest used (libvirt cpu.time)",
        |s| seconds(s.cpu_time_ns),
    ),
    counter(
        "cpu_user_seconds",
        "User-mode CPU time of the guest's process (cpu.user)",
        |s| seconds(s.cpu_user_ns),
    ),
    counter(
        "cpu_system_seconds",
        "Kernel-mode CPU time of the guest's process (cpu.system)",
        |s| seconds(s.cpu_system_ns),
    ),
    gauge("vcpus", "vCPUs online (vcpu.current)", |s| int(s.vcpus)),
    gauge("max_vcpus", "vCPU ceiling (vcpu.maximum)", |s| {
        int(s.max_vcpus)
    }),
    gauge(
        "memory_bytes",
        "Memory the guest has now (balloon.current)",
        |s| kib_bytes(s.memory_kib),
    ),
    gauge(
        "max_memory_bytes",
        "Memory ceiling (balloon.maximum)",
        |s| kib_bytes(s.max_memory_kib),
    ),
    gauge(
        "rss_bytes",
        "Host memory the guest's process occupies (balloon.rss)",
        |s| kib_bytes(s.rss_kib),
    ),
    gauge(
        "memory_usable_bytes",
        "Memory the guest reports usable (balloon.usable; needs a balloon driver in the guest)",
        |s| kib_bytes(s.usable_kib),
    ),
];

const DISK_FAMILIES: [Family<BlockStats>; 7] = [
    counter(
        "disk_read_bytes",
        "Bytes the guest read from the disk",
        |b| int(b.read_bytes),
    ),
    counter("disk_read_requests", "Read requests", |b| {
        int(b.read_requests)
    }),
    counter(
        "disk_write_bytes",
        "Bytes the guest wrote to the disk",
        |b| int(b.write_bytes),
    ),
    counter("disk_write_requests", "Write requests", |b| {
        int(b.write_requests)
    }),
    counter("disk_flush_requests", "Flush requests", |b| {
        int(b.flush_requests)
    }),
    gauge(
        "disk_capacity_bytes",
        "Guest-visible size of the disk",
        |b| int(b.capacity_bytes),
    ),
    gauge(
        "disk_allocation_bytes",
        "Host storage the disk's image occupies",
        |b| int(b.allocation_bytes),
    ),
];

const NIC_FAMILIES: [Family<NetStats>; 8] = [
    counter(
        "network_receive_bytes",
        "Bytes the guest received on the NIC",
        |n| int(n.rx_bytes),
    ),
    counter("network_receive_packets", "Packets received", |n| {
        int(n.rx_packets)
    }),
    counter("network_receive_errors", "Receive errors", |n| {
        int(n.rx_errors)
    }),
    counter("network_receive_drops", "Received packets dropped", |n| {
        int(n.rx_drops)
    }),
    counter(
        "network_transmit_bytes",
        "Bytes the guest sent on the NIC",
        |n| int(n.tx_bytes),
    ),
    counter("network_transmit_packets", "Packets sent", |n| {
        int(n.tx_packets)
    }),
    counter("network_transmit_errors", "Transmit errors", |n| {
        int(n.tx_errors)
    }),
    counter("network_transmit_drops", "Sent packets dropped", |n| {
        int(n.tx_drops)
    }),
];

/// Encodes one family over every (labels, item) pair that has a value.
fn encode_family<'a, T: 'a, L: EncodeLabelSet + 'a>(
    encoder: &mut DescriptorEncoder,
    family: &Family<T>,
    items: impl Iterator<Item = (L, &'a T)>,
) -> Result<(), std::fmt::Error> {
    let metric_type = if family.counter {
        ConstCounter::new(0u64).metric_type()
    } else {
        ConstGauge::new(0i64).metric_type()
    };
    let mut out = encoder.encode_descriptor(family.name, family.help, None, metric_type)?;
    for (labels, item) in items {
        let Some(value) = (family.read)(item) else {
            continue;
        };
        let m = out.encode_family(&labels)?;
        match (family.counter, value) {
            (true, Value::Int(v)) => ConstCounter::new(v).encode(m)?,
            (true, Value::Float(v)) => ConstCounter::new(v).encode(m)?,
            (false, Value::Int(v)) => {
                ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX)).encode(m)?
            }
            (false, Value::Float(v)) => ConstGauge::new(v).encode(m)?,
        }
    }
    Ok(())
}

fn domain_labels(d: &OwnedDomainStats) -> DomainLabels {
    DomainLabels {
        namespace: d.owner.namespace.clone().unwrap_or_default(),
        name: d.owner.name.clone(),
    }
}

/// Exposes one scrape's batch.
#[derive(Debug)]
struct GuestCollector(Scrape);

impl Collector for GuestCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let scrape = &self.0;
        let up = encoder.encode_descriptor(
            "stats_up",
            "1 when the last gather of guest statistics from libvirt succeeded",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        ConstGauge::new(i64::from(scrape.batch.is_some())).encode(up)?;
        let took = encoder.encode_descriptor(
            "stats_seconds",
            "Wall time of the gather (one libvirt call)",
            None,
            ConstGauge::new(0.0f64).metric_type(),
        )?;
        ConstGauge::new(scrape.took.as_secs_f64()).encode(took)?;
        let Some(batch) = &scrape.batch else {
            return Ok(());
        };
        let dropped = encoder.encode_descriptor(
            "stats_dropped",
            "virtkube-owned domains left out by the agent's --guest-metrics-max-domains",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        ConstGauge::new(i64::try_from(batch.dropped).unwrap_or(i64::MAX)).encode(dropped)?;
        for family in &DOMAIN_FAMILIES {
            let items = batch.domains.iter().map(|d| (domain_labels(d), &d.stats));
            encode_family(&mut encoder, family, items)?;
        }
        for family in &DISK_FAMILIES {
            let items = batch.domains.iter().flat_map(|d| {
                d.stats.blocks.iter().map(move |b| {
                    let l = domain_labels(d);
                    let labels = DiskLabels {
                        namespace: l.namespace,
                        name: l.name,
                        disk: b.name.clone(),
                    };
                    (labels, b)
                })
            });
            encode_family(&mut encoder, family, items)?;
        }
        for family in &NIC_FAMILIES {
            let items = batch.domains.iter().flat_map(|d| {
                d.stats.nets.iter().map(move |n| {
                    let l = domain_labels(d);
                    let labels = NicLabels {
                        namespace: l.namespace,
                        name: l.name,
                        interface: n.name.clone(),
                    };
                    (labels, n)
                })
            });
            encode_family(&mut encoder, family, items)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtkube_engine::Owner;

    fn domain(ns: &str, name: &str, stats: DomainStatsRecord) -> OwnedDomainStats {
        OwnedDomainStats {
            name: format!("{ns}.{name}"),
            uuid: format!("uuid-{name}"),
            owner: Owner::new("Domain", format!("uid-{name}"), Some(ns), name),
            stats,
        }
    }

    fn text(scrape: Scrape) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry(scrape)).unwrap();
        out
    }

    #[test]
    fn encodes_domain_disk_and_nic_series_with_their_labels() {
        let stats = DomainStatsRecord {
            state: Some(DomainState::Running),
            cpu_time_ns: Some(2_500_000_000),
            memory_kib: Some(131072),
            blocks: vec![BlockStats {
                name: "vda".into(),
                read_bytes: Some(512),
                ..Default::default()
            }],
            nets: vec![NetStats {
                name: "vnet0".into(),
                tx_packets: Some(2),
                ..Default::default()
            }],
            ..Default::default()
        };
        let out = text(Scrape {
            batch: Some(StatsBatch {
                domains: vec![domain("team", "web", stats)],
                dropped: 3,
                ..Default::default()
            }),
            took: Duration::from_millis(2),
        });
        for line in [
            "virtkube_guest_stats_up 1",
            "virtkube_guest_stats_dropped 3",
            r#"virtkube_guest_running{namespace="team",name="web"} 1"#,
            r#"virtkube_guest_cpu_seconds_total{namespace="team",name="web"} 2.5"#,
            r#"virtkube_guest_memory_bytes{namespace="team",name="web"} 134217728"#,
            r#"virtkube_guest_disk_read_bytes_total{namespace="team",name="web",disk="vda"} 512"#,
            r#"virtkube_guest_network_transmit_packets_total{namespace="team",name="web",interface="vnet0"} 2"#,
        ] {
            assert!(out.contains(line), "missing `{line}` in:\n{out}");
        }
        // What libvirt did not report is not invented.
        assert!(
            !out.contains("virtkube_guest_cpu_user_seconds_total{"),
            "{out}"
        );
        assert!(!out.contains("disk_write_bytes_total{"), "{out}");
    }

    #[test]
    fn a_failed_gather_says_so_and_exports_no_guest() {
        let out = text(Scrape {
            batch: None,
            took: Duration::from_secs(5),
        });
        assert!(out.contains("virtkube_guest_stats_up 0"), "{out}");
        assert!(!out.contains("namespace="), "{out}");
    }

    #[test]
    fn series_per_domain_are_bounded_as_documented() {
        let stats = DomainStatsRecord {
            state: Some(DomainState::Running),
            cpu_time_ns: Some(1),
            cpu_user_ns: Some(1),
            cpu_system_ns: Some(1),
            vcpus: Some(1),
            max_vcpus: Some(1),
            memory_kib: Some(1),
            max_memory_kib: Some(1),
            rss_kib: Some(1),
            usable_kib: Some(1),
            unused_kib: Some(1),
            blocks: vec![
                BlockStats {
                    name: "vda".into(),
                    read_requests: Some(1),
                    read_bytes: Some(1),
                    write_requests: Some(1),
                    write_bytes: Some(1),
                    flush_requests: Some(1),
                    capacity_bytes: Some(1),
                    allocation_bytes: Some(1),
                };
                2
            ],
            nets: vec![
                NetStats {
                    name: "vnet0".into(),
                    rx_bytes: Some(1),
                    rx_packets: Some(1),
                    rx_errors: Some(1),
                    rx_drops: Some(1),
                    tx_bytes: Some(1),
                    tx_packets: Some(1),
                    tx_errors: Some(1),
                    tx_drops: Some(1),
                };
                3
            ],
        };
        let out = text(Scrape {
            batch: Some(StatsBatch {
                domains: vec![domain("a", "x", stats)],
                ..Default::default()
            }),
            took: Duration::ZERO,
        });
        let series = out
            .lines()
            .filter(|l| l.starts_with("virtkube_guest_") && l.contains("name=\"x\""))
            .count();
        assert_eq!(series, DOMAIN_SERIES + 2 * DISK_SERIES + 3 * NIC_SERIES);
    }
}
