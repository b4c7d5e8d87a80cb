//! Host PCI devices of a domain (`spec.hostDevices`): planned like disks and NICs (plugged
//! in or out live where the host hotplugs, otherwise at the next restart; a changed device
//! waits for a restart), and checked against the node: the device must exist there, and no
//! other domain of the node may list it (libvirt gives a device to one guest at a time, and
//! only refuses the second guest when it starts). Pure.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use super::desired::DesiredDomain;
use super::domain::{Diff, UNPLUG_PENDING};
use super::observed::{ObservedDomain, ObservedHost};
use super::{Change, Op};

/// Why a domain cannot have one of its host devices on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostDeviceProblem {
    /// The node has no PCI device at the address.
    Missing {
        /// The device's name in the spec.
        name: String,
        /// Its address.
        address: String,
        /// The node.
        node: String,
    },
    /// Another domain of the node lists the device.
    InUse {
        /// The device's name in the spec.
        name: String,
        /// Its address.
        address: String,
        /// The node.
        node: String,
        /// The libvirt name of the domain that has it.
        by: String,
    },
}

impl HostDeviceProblem {
    /// The condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            HostDeviceProblem::Missing { .. } => "HostDeviceMissing",
            HostDeviceProblem::InUse { .. } => "HostDeviceInUse",
        }
    }
}

impl fmt::Display for HostDeviceProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostDeviceProblem::Missing {
                name,
                address,
                node,
            } => write!(
                f,
                "spec.hostDevices[name={name}].address: node {node} has no PCI device {address} (its HypervisorNode lists them under status.host.pciDevices)"
            ),
            HostDeviceProblem::InUse {
                name,
                address,
                node,
                by,
            } => write!(
                f,
                "spec.hostDevices[name={name}].address: PCI device {address} is already given to domain {by} on node {node}: a device is passed through to one guest at a time"
            ),
        }
    }
}

/// The problems of `d`'s host devices on `node`, whose PCI devices are `present` (`None`:
/// unknown, not checked) and whose domains list the devices in `used` (address → libvirt
/// domain name; `d`'s own entries do not count).
pub fn check(
    d: &DesiredDomain,
    node: &str,
    present: Option<&BTreeSet<String>>,
    used: &BTreeMap<String, String>,
) -> Vec<HostDeviceProblem> {
    let mut problems = Vec::new();
    for dev in &d.host_devices {
        if present.is_some_and(|p| !p.contains(&dev.address)) {
            problems.push(HostDeviceProblem::Missing {
                name: dev.name.clone(),
                address: dev.address.clone(),
                node: node.to_string(),
            });
        } else if let Some(by) = used.get(&dev.address).filter(|by| **by != d.name) {
            problems.push(HostDeviceProblem::InUse {
                name: dev.name.clone(),
                address: dev.address.clone(),
                node: node.to_string(),
                by: by.clone(),
            });
        }
    }
    problems
}

/// Which domain of `host` lists each PCI address (the first in name order, when several).
pub fn in_use(host: &ObservedHost) -> BTreeMap<String, String> {
    let mut used = BTreeMap::new();
    for (name, dom) in &host.domains {
        for dev in &dom.host_devices {
            used.entry(dev.address.clone())
                .or_insert_with(|| name.clone());
        }
    }
    used
}

/// The key of a host device in the live unplug note (as the engine writes it).
fn pending_key(address: &str) -> String {
    format!("hostdev/{address}")
}

fn describe(address: &str, managed: bool) -> String {
    format!(
        "{address} ({})",
        if managed { "managed" } else { "not managed" }
    )
}

/// Host devices: plugged in or out live where the host allows (libvirt attaches and
/// detaches PCI host devices of running QEMU guests), otherwise at the next restart; a
/// device whose `managed` changed waits for a restart.
pub(crate) fn diff_host_devices(
    d: &DesiredDomain,
    o: &ObservedDomain,
    host: &ObservedHost,
    diff: &mut Diff,
) {
    let live = host.device_hotplug && o.power.is_active();
    let pending = |address: &str| o.pending_unplug.contains(&pending_key(address));
    for dev in &d.host_devices {
        let field = format!("hostDevices[name={}]", dev.name);
        let want = describe(&dev.address, dev.managed);
        match o.host_devices.iter().find(|x| x.address == dev.address) {
            None if live => diff.live.push((
                Op::AttachHostDevice(Box::new(dev.clone())),
                vec![Change::new(&field, "(none)", want)],
            )),
            None => diff.restart.push(Change::new(&field, "(none)", want)),
            Some(od) if pending(&od.address) => diff.restart.push(Change::new(
                &field,
                format!("{} ({UNPLUG_PENDING})", describe(&od.address, od.managed)),
                want,
            )),
            Some(od) if od.managed != dev.managed => {
                diff.restart
                    .push(Change::new(&field, describe(&od.address, od.managed), want))
            }
            Some(_) => {}
        }
    }
    for od in &o.host_devices {
        if d.host_devices.iter().any(|x| x.address == od.address) {
            continue;
        }
        let field = match &od.alias {
            Some(name) => format!("hostDevices[name={name}]"),
            None => format!("hostDevices[address={}]", od.address),
        };
        let have = describe(&od.address, od.managed);
        if pending(&od.address) {
            diff.restart.push(Change::new(
                &field,
                format!("{have} ({UNPLUG_PENDING})"),
                "(none)",
            ));
        } else if live {
            diff.live.push((
                Op::DetachHostDevice {
                    address: od.address.clone(),
                },
                vec![Change::new(&field, have, "(none)")],
            ));
        } else {
            diff.restart.push(Change::new(&field, have, "(none)"));
        }
    }
}
