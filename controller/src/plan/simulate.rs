//! A model of what hosts look like after a plan runs, without libvirt. The property tests
//! check the planner against it (apply a plan, re-plan: nothing left to do), and the
//! executor tests use it as a fake host.

use std::collections::BTreeMap;

use super::desired::{
    DesiredDisk, DesiredDiskSource, DesiredDomain, DesiredHostDevice, VolumeOrigin,
};
use super::observed::{
    DiskRef, ObservedDisk, ObservedDomain, ObservedHost, ObservedHostDevice, ObservedNetwork,
    ObservedNic, ObservedPool, ObservedState, ObservedVolume, PowerObserved,
};
use super::{Action, NetworkUpdate, Op, Preserve};

/// Why the model refused an action (what libvirt would say).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SimError(pub String);

fn domain_from(
    d: &DesiredDomain,
    preserve: &Preserve,
    host: &ObservedHost,
    previous: Option<&ObservedDomain>,
) -> ObservedDomain {
    let disks = d
        .disks
        .iter()
        .map(|disk| observed_disk(disk, host))
        .collect();
    let interfaces = d
        .interfaces
        .iter()
        .enumerate()
        .map(|(i, nic)| ObservedNic {
            network: Some(nic.network.clone()),
            model: Some(nic.model.clone()),
            mac: nic
                .mac
                .clone()
                .or_else(|| preserve.macs.get(i).cloned().flatten())
                .or_else(|| Some(format!("52:54:00:00:00:{i:02x}"))),
            alias: Some(nic.name.clone()),
        })
        .collect();
    let disk_boot = d.disks.iter().any(|x| x.boot_order.is_some());
    ObservedDomain {
        owner: Some(d.owner.clone()),
        uuid: preserve
            .uuid
            .clone()
            .unwrap_or_else(|| format!("uuid-{}", d.name)),
        id: None,
        power: previous.map(|p| p.power).unwrap_or(PowerObserved::Shutoff),
        reason: previous
            .map(|p| p.reason.clone())
            .unwrap_or_else(|| "unknown".into()),
        vcpus: d.vcpus,
        max_vcpus: d.max_vcpus,
        cpu_mode: d.cpu_mode.clone(),
        cpu_model: d.cpu_model.clone(),
        topology: d.topology,
        // vCPUs the user did not pin float over every host CPU.
        pinning: (0..d.max_vcpus)
            .map(|v| {
                (
                    v,
                    d.pinning.get(&v).cloned().unwrap_or_else(|| "0-63".into()),
                )
            })
            .collect::<BTreeMap<_, _>>(),
        emulator_cpuset: d.emulator_cpuset.clone().or_else(|| Some("0-63".into())),
        cpu_tune: d.cpu_tune,
        security_labels: Vec::new(),
        memory_kib: d.memory_kib,
        max_memory_kib: d.max_memory_kib,
        hugepage_kib: d.hugepage_kib,
        machine: d
            .machine
            .as_ref()
            .map(|m| match m.as_str() {
                "pc" => "pc-i440fx-7.2".to_string(),
                "q35" => "pc-q35-7.2".to_string(),
                other => other.to_string(),
            })
            .or_else(|| Some("pc-i440fx-7.2".into())),
        arch: d.arch.clone().or_else(|| Some("x86_64".into())),
        firmware: d.firmware.clone(),
        boot: if disk_boot || d.boot.is_empty() {
            vec!["hd".into()]
        } else {
            d.boot.clone()
        },
        kernel: d.kernel.clone(),
        initrd: d.initrd.clone(),
        cmdline: d.cmdline.clone(),
        disks,
        interfaces,
        host_devices: d.host_devices.iter().map(observed_host_device).collect(),
        autostart: previous.is_some_and(|p| p.autostart),
        persistent: true,
        pending_unplug: Vec::new(),
        start_owed: false,
    }
}

/// A host device as libvirt reports it once defined or plugged in.
fn observed_host_device(dev: &DesiredHostDevice) -> ObservedHostDevice {
    ObservedHostDevice {
        address: dev.address.clone(),
        managed: dev.managed,
        alias: Some(dev.name.clone()),
    }
}

/// A disk as libvirt reports it once defined or plugged in.
fn observed_disk(disk: &DesiredDisk, host: &ObservedHost) -> ObservedDisk {
    ObservedDisk {
        target: disk.target.clone(),
        bus: Some(disk.bus.clone()),
        device: disk.device.clone(),
        source: match &disk.source {
            DesiredDiskSource::Volume { volume, pool, .. } => DiskRef::Volume {
                pool: pool
                    .clone()
                    .or_else(|| {
                        host.volumes
                            .keys()
                            .find(|(_, v)| v == volume)
                            .map(|(p, _)| p.clone())
                    })
                    .unwrap_or_default(),
                volume: volume.clone(),
            },
            DesiredDiskSource::Path(p) => DiskRef::Path(p.clone()),
        },
        read_only: disk.read_only,
        boot_order: disk.boot_order,
        chain: Vec::new(),
    }
}

fn domain_mut<'a>(
    state: &'a mut ObservedState,
    a: &Action,
) -> Result<&'a mut ObservedDomain, SimError> {
    state
        .host_mut(&a.node)
        .domains
        .get_mut(&a.object.name)
        .ok_or_else(|| SimError(format!("no domain {} on {}", a.object.name, a.node)))
}

/// Applies one action to the model.
pub fn apply_action(state: &mut ObservedState, a: &Action) -> Result<(), SimError> {
    let name = a.object.name.clone();
    match &a.op {
        Op::DefinePool(p) => {
            state.host_mut(&a.node).pools.insert(
                name,
                ObservedPool {
                    owner: Some(p.owner.clone()),
                    pool_type: p.pool_type.clone(),
                    target_path: p.target_path.clone(),
                    source: p.source.clone(),
                    active: false,
                    autostart: false,
                    capacity: 0,
                    available: 0,
                },
            );
        }
        Op::BuildPool { .. } => {}
        Op::StartPool => pool_mut(state, a)?.active = true,
        Op::SetPoolAutostart(on) => pool_mut(state, a)?.autostart = *on,
        Op::DeletePool => {
            let host = state.host_mut(&a.node);
            host.pools.remove(&name);
            // Undefining a pool hides its volumes from libvirt; the files stay.
            host.volumes.retain(|(p, _), _| p != &name);
        }
        Op::DefineNetwork(n) => {
            state.host_mut(&a.node).networks.insert(
                name,
                ObservedNetwork {
                    owner: Some(n.owner.clone()),
                    mode: n.mode.clone(),
                    bridge: n.bridge.clone().or_else(|| Some("virbr9".into())),
                    ip: n.ip.clone(),
                    dhcp: n.dhcp.iter().map(|(s, e)| format!("{s}-{e}")).collect(),
                    dhcp_hosts: n.dhcp_hosts.clone(),
                    dns_hosts: n.dns_hosts.clone(),
                    active: false,
                    autostart: false,
                },
            );
        }
        Op::StartNetwork => net_mut(state, a)?.active = true,
        Op::UpdateNetwork(edit) => {
            let n = net_mut(state, a)?;
            match edit {
                NetworkUpdate::AddDhcpHost(h) => n.dhcp_hosts.push(h.clone()),
                NetworkUpdate::ModifyDhcpHost(h) => {
                    for have in n.dhcp_hosts.iter_mut().filter(|o| o.mac == h.mac) {
                        *have = h.clone();
                    }
                }
                NetworkUpdate::DeleteDhcpHost(h) => n.dhcp_hosts.retain(|o| o != h),
                NetworkUpdate::AddDnsHost(h) => n.dns_hosts.push(h.clone()),
                NetworkUpdate::DeleteDnsHost(h) => n.dns_hosts.retain(|o| o != h),
                NetworkUpdate::AddDhcpRange(r) => n.dhcp.push(r.to_string()),
                NetworkUpdate::DeleteDhcpRange(r) => {
                    let text = r.to_string();
                    let before = n.dhcp.len();
                    n.dhcp.retain(|o| *o != text);
                    if n.dhcp.len() == before {
                        return Err(SimError(format!("no DHCP range {text}")));
                    }
                }
            }
        }
        Op::SetNetworkAutostart(on) => net_mut(state, a)?.autostart = *on,
        Op::DeleteNetwork => {
            state.host_mut(&a.node).networks.remove(&name);
        }
        Op::CreateVolume {
            pool,
            capacity,
            format,
            source,
        } => {
            let host = state.host_mut(&a.node);
            if !host.pools.get(pool).is_some_and(|p| p.active) {
                return Err(SimError(format!("pool {pool} is not active")));
            }
            let (capacity, backing_path) = match source {
                VolumeOrigin::Empty => (capacity.unwrap_or(0), None),
                VolumeOrigin::Clone(src) | VolumeOrigin::Backing(src) => {
                    let s = host
                        .volumes
                        .get(&(pool.clone(), src.clone()))
                        .ok_or_else(|| SimError(format!("no source volume {src}")))?;
                    let backing =
                        matches!(source, VolumeOrigin::Backing(_)).then(|| s.path.clone());
                    let wanted = capacity.unwrap_or(s.capacity);
                    // The engine refuses a clone smaller than its source (nothing copied).
                    if backing.is_none() && wanted < s.capacity {
                        return Err(SimError(format!(
                            "clone {name} of {src}: shrinking {} to {wanted} bytes is refused",
                            s.capacity
                        )));
                    }
                    (wanted.max(s.capacity), backing)
                }
            };
            host.volumes.insert(
                (pool.clone(), name.clone()),
                ObservedVolume {
                    owned: true,
                    key: format!("/pools/{pool}/{name}"),
                    path: format!("/pools/{pool}/{name}"),
                    capacity,
                    allocation: 0,
                    format: Some(format.clone()),
                    backing_path,
                },
            );
        }
        Op::ResizeVolume { pool, capacity, .. } => {
            let v = state
                .host_mut(&a.node)
                .volumes
                .get_mut(&(pool.clone(), name.clone()))
                .ok_or_else(|| SimError(format!("no volume {name}")))?;
            if *capacity < v.capacity {
                return Err(SimError(format!("volume {name}: shrinking is refused")));
            }
            v.capacity = *capacity;
        }
        Op::DeleteVolume { pool, .. } => {
            state
                .host_mut(&a.node)
                .volumes
                .remove(&(pool.clone(), name));
        }
        Op::DefineDomain { domain, preserve } => {
            let host = state.host_mut(&a.node);
            let previous = host.domains.get(&name).cloned();
            let mut new = domain_from(domain, preserve, host, previous.as_ref());
            if let Some(p) = &previous
                && p.power.is_active()
            {
                return Err(SimError(format!(
                    "domain {name} runs: redefinition would only stage the change"
                )));
            }
            new.power = previous
                .as_ref()
                .map(|p| p.power)
                .unwrap_or(PowerObserved::Shutoff);
            host.domains.insert(name, new);
        }
        Op::StartDomain { .. } => {
            let d = domain_mut(state, a)?;
            d.power = PowerObserved::Running;
            d.reason = "booted".into();
        }
        Op::StopDomain => {
            let d = domain_mut(state, a)?;
            d.power = PowerObserved::Shutoff;
            d.reason = "shutdown".into();
        }
        Op::SuspendDomain => {
            let d = domain_mut(state, a)?;
            if d.power != PowerObserved::Running {
                return Err(SimError("domain is not running".into()));
            }
            d.power = PowerObserved::Paused;
            d.reason = "user".into();
        }
        Op::ResumeDomain => {
            let d = domain_mut(state, a)?;
            d.power = PowerObserved::Running;
            d.reason = "unpaused".into();
        }
        Op::SetVcpus(n) => {
            let d = domain_mut(state, a)?;
            if *n > d.max_vcpus {
                return Err(SimError("above max vcpus".into()));
            }
            d.vcpus = *n;
        }
        Op::SetMemory(k) => {
            let d = domain_mut(state, a)?;
            if *k > d.max_memory_kib {
                return Err(SimError("above max memory".into()));
            }
            d.memory_kib = *k;
        }
        Op::PinVcpu { vcpu, cpuset } => {
            domain_mut(state, a)?.pinning.insert(*vcpu, cpuset.clone());
        }
        Op::PinEmulator(c) => domain_mut(state, a)?.emulator_cpuset = Some(c.clone()),
        Op::SetCpuTune(set) => {
            let t = &mut domain_mut(state, a)?.cpu_tune;
            let keep = |new: Option<i64>, old: Option<i64>| new.or(old);
            t.shares = set.shares.or(t.shares);
            t.period = set.period.or(t.period);
            t.quota = keep(set.quota, t.quota);
            t.global_period = set.global_period.or(t.global_period);
            t.global_quota = keep(set.global_quota, t.global_quota);
            t.emulator_period = set.emulator_period.or(t.emulator_period);
            t.emulator_quota = keep(set.emulator_quota, t.emulator_quota);
        }
        Op::SetDomainAutostart(on) => domain_mut(state, a)?.autostart = *on,
        // The model's guests acknowledge every unplug.
        Op::AttachDisk(disk) => {
            let host = state.host_mut(&a.node);
            let new = observed_disk(disk, host);
            let d = domain_mut(state, a)?;
            if d.disks.iter().any(|x| x.target == new.target) {
                return Err(SimError(format!("target {} already exists", new.target)));
            }
            d.disks.push(new);
        }
        Op::DetachDisk { target } => {
            let d = domain_mut(state, a)?;
            let before = d.disks.len();
            d.disks.retain(|x| &x.target != target);
            if d.disks.len() == before {
                return Err(SimError(format!("no disk {target}")));
            }
        }
        Op::AttachInterface(nic) => {
            let d = domain_mut(state, a)?;
            let i = d.interfaces.len();
            d.interfaces.push(ObservedNic {
                network: Some(nic.network.clone()),
                model: Some(nic.model.clone()),
                mac: nic
                    .mac
                    .clone()
                    .or_else(|| Some(format!("52:54:00:00:01:{i:02x}"))),
                alias: Some(nic.name.clone()),
            });
        }
        Op::DetachInterface { mac } => {
            let d = domain_mut(state, a)?;
            let before = d.interfaces.len();
            d.interfaces
                .retain(|x| !x.mac.as_ref().is_some_and(|m| m.eq_ignore_ascii_case(mac)));
            if d.interfaces.len() == before {
                return Err(SimError(format!("no NIC {mac}")));
            }
        }
        Op::AttachHostDevice(dev) => {
            let d = domain_mut(state, a)?;
            if d.host_devices.iter().any(|x| x.address == dev.address) {
                return Err(SimError(format!(
                    "host device {} already plugged in",
                    dev.address
                )));
            }
            d.host_devices.push(observed_host_device(dev));
        }
        Op::DetachHostDevice { address } => {
            let d = domain_mut(state, a)?;
            let before = d.host_devices.len();
            d.host_devices.retain(|x| &x.address != address);
            if d.host_devices.len() == before {
                return Err(SimError(format!("no host device {address}")));
            }
        }
        Op::RestartDomain { domain, preserve } => {
            let host = state.host_mut(&a.node);
            let previous = host.domains.get(&name).cloned();
            let mut new = domain_from(domain, preserve, host, previous.as_ref());
            new.autostart = previous.as_ref().is_some_and(|p| p.autostart);
            new.power = PowerObserved::Running;
            new.reason = "booted".into();
            host.domains.insert(name, new);
        }
        Op::DeleteDomain => {
            state.host_mut(&a.node).domains.remove(&name);
        }
        Op::MigrateDomain { to, .. } => {
            let mut d = state
                .host_mut(&a.node)
                .domains
                .remove(&name)
                .ok_or_else(|| SimError(format!("no domain {name} on {}", a.node)))?;
            d.reason = "migrated".into();
            state.host_mut(to).domains.insert(name, d);
        }
    }
    Ok(())
}

fn pool_mut<'a>(
    state: &'a mut ObservedState,
    a: &Action,
) -> Result<&'a mut ObservedPool, SimError> {
    state
        .host_mut(&a.node)
        .pools
        .get_mut(&a.object.name)
        .ok_or_else(|| SimError(format!("no pool {}", a.object.name)))
}

fn net_mut<'a>(
    state: &'a mut ObservedState,
    a: &Action,
) -> Result<&'a mut ObservedNetwork, SimError> {
    state
        .host_mut(&a.node)
        .networks
        .get_mut(&a.object.name)
        .ok_or_else(|| SimError(format!("no network {}", a.object.name)))
}

/// Applies a whole plan in order.
pub fn apply(state: &mut ObservedState, plan: &super::Plan) -> Result<(), SimError> {
    for a in &plan.actions {
        apply_action(state, a)?;
    }
    Ok(())
}
