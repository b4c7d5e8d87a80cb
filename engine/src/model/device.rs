//! Devices plugged into or out of a running domain (hotplug): which device a key names, how
//! to find its element in libvirt's domain XML, and virtkube's note of unplugs a guest has
//! not acknowledged. Pure.
//!
//! An unplug on a running guest needs the guest's cooperation (ACPI for PCI devices): libvirt
//! removes the device from the definition at once, and from the running domain only when
//! the guest lets go. A guest that never does (no OS, no driver, a hung kernel) keeps the
//! device until it stops. virtkube records such devices in the **live** domain's
//! `<metadata>` under [`PENDING_NS`], so the note lives exactly as long as the running guest:
//! the planner then knows the change waits for a restart instead of asking again.

use super::domain::{DiskDef, InterfaceDef, disk_element, interface_element};
use super::hostdev::{HostdevDef, PciAddress, hostdev_element};
use super::xml::Element;

/// XML namespace of virtkube's note of unacknowledged unplugs in a live domain's metadata.
pub const PENDING_NS: &str = "https://virtkube.io/xmlns/pending-unplug/v1";

/// The prefix libvirt writes for [`PENDING_NS`].
pub const PENDING_PREFIX: &str = "vkunplug";

/// A device to plug into a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Device {
    /// A disk.
    Disk(DiskDef),
    /// A NIC on a libvirt network.
    Interface(InterfaceDef),
    /// A host PCI device passed through.
    HostDevice(HostdevDef),
}

impl Device {
    /// libvirt's device XML.
    pub fn to_xml(&self) -> String {
        match self {
            Device::Disk(d) => disk_element(d).to_xml(),
            Device::Interface(i) => interface_element(i).to_xml(),
            Device::HostDevice(h) => hostdev_element(h).to_xml(),
        }
    }

    /// The key of this device, when it has one before libvirt fills in defaults (a NIC
    /// without a MAC gets one from libvirt).
    pub fn key(&self) -> Option<DeviceKey> {
        match self {
            Device::Disk(d) => Some(DeviceKey::Disk {
                target: d.target_dev.clone(),
            }),
            Device::Interface(i) => i
                .mac
                .as_ref()
                .map(|mac| DeviceKey::Interface { mac: mac.clone() }),
            Device::HostDevice(h) => Some(DeviceKey::HostDevice { address: h.address }),
        }
    }
}

/// Which device of a domain: a disk by its guest device name, a NIC by its MAC (the keys
/// libvirt itself matches a detach by).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeviceKey {
    /// A disk by target (`vdb`).
    Disk {
        /// Guest device name.
        target: String,
    },
    /// A NIC by MAC address.
    Interface {
        /// MAC, any case.
        mac: String,
    },
    /// A host PCI device by its address on the host.
    HostDevice {
        /// The host address.
        address: PciAddress,
    },
}

impl DeviceKey {
    /// `disk/vdb`, `interface/52:54:00:…` (MAC in lower case).
    pub fn as_key(&self) -> String {
        match self {
            DeviceKey::Disk { target } => format!("disk/{target}"),
            DeviceKey::Interface { mac } => format!("interface/{}", mac.to_ascii_lowercase()),
            DeviceKey::HostDevice { address } => format!("hostdev/{address}"),
        }
    }

    /// This device's element in a domain's XML (`<domain>` root), if present.
    pub fn find<'a>(&self, domain: &'a Element) -> Option<&'a Element> {
        let devices = domain.find("devices")?;
        match self {
            DeviceKey::Disk { target } => devices.find_all("disk").find(|d| {
                d.find("target")
                    .and_then(|t| t.get("dev"))
                    .is_some_and(|dev| dev == target)
            }),
            DeviceKey::Interface { mac } => devices.find_all("interface").find(|i| {
                i.find("mac")
                    .and_then(|m| m.get("address"))
                    .is_some_and(|a| a.eq_ignore_ascii_case(mac))
            }),
            DeviceKey::HostDevice { address } => devices.find_all("hostdev").find(|h| {
                h.get("type") == Some("pci")
                    && h.find("source")
                        .and_then(|s| s.find("address"))
                        .and_then(PciAddress::from_element)
                        == Some(*address)
            }),
        }
    }
}

impl std::fmt::Display for DeviceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceKey::Disk { target } => write!(f, "disk {target}"),
            DeviceKey::Interface { mac } => write!(f, "NIC {mac}"),
            DeviceKey::HostDevice { address } => write!(f, "host device {address}"),
        }
    }
}

/// The keys in virtkube's unplug note, read from a domain's `<metadata>`.
pub fn pending_from_metadata(metadata: &Element) -> Vec<String> {
    metadata
        .children
        .iter()
        .filter(|c| c.local_name() == "unplug" && c.declared_namespace() == Some(PENDING_NS))
        .flat_map(|c| {
            c.children
                .iter()
                .filter(|d| d.local_name() == "device")
                .filter_map(|d| d.get("key"))
        })
        .map(str::to_string)
        .collect()
}

/// The note's element (without namespace declaration: libvirt adds it from the URI given to
/// `virDomainSetMetadata`); `None` when no key is left (the note is removed).
pub fn pending_element(keys: &[String]) -> Option<String> {
    if keys.is_empty() {
        return None;
    }
    let mut el = Element::new("unplug");
    for k in keys {
        el = el.child(Element::new("device").attr("key", k));
    }
    Some(el.to_xml())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::xml;

    #[test]
    fn finds_devices_by_target_and_mac() {
        let dom = xml::parse(
            "<domain><devices>\
             <disk type='file'><target dev='vda'/></disk>\
             <disk type='file'><target dev='vdb' bus='virtio'/></disk>\
             <interface type='network'><mac address='52:54:00:AA:00:01'/></interface>\
             </devices></domain>",
        )
        .unwrap();
        let vdb = DeviceKey::Disk {
            target: "vdb".into(),
        };
        assert_eq!(
            vdb.find(&dom)
                .and_then(|d| d.find("target"))
                .and_then(|t| t.get("bus")),
            Some("virtio")
        );
        let nic = DeviceKey::Interface {
            mac: "52:54:00:aa:00:01".into(),
        };
        assert!(nic.find(&dom).is_some(), "MACs compare in any case");
        assert_eq!(nic.as_key(), "interface/52:54:00:aa:00:01");
        assert!(
            DeviceKey::Disk {
                target: "vdz".into()
            }
            .find(&dom)
            .is_none()
        );
    }

    #[test]
    fn finds_host_devices_by_address_whatever_the_case() {
        let dom = xml::parse(
            "<domain><devices><hostdev mode='subsystem' type='pci' managed='yes'>\
             <source><address domain='0x0000' bus='0x0A' slot='0x00' function='0x1'/></source>\
             </hostdev></devices></domain>",
        )
        .unwrap();
        let key = DeviceKey::HostDevice {
            address: PciAddress::parse("0000:0a:00.1").unwrap(),
        };
        assert!(key.find(&dom).is_some());
        assert_eq!(key.as_key(), "hostdev/0000:0a:00.1");
        let other = DeviceKey::HostDevice {
            address: PciAddress::parse("0000:0a:00.0").unwrap(),
        };
        assert!(other.find(&dom).is_none());
    }

    #[test]
    fn the_note_round_trips_through_metadata_as_libvirt_prints_it() {
        let keys = vec![
            "disk/vdb".to_string(),
            "interface/52:54:00:00:00:01".to_string(),
        ];
        let note = pending_element(&keys).unwrap();
        assert!(note.contains("disk/vdb"), "{note}");
        // libvirt prints the element with the prefix and namespace it was given.
        let md = xml::parse(&format!(
            "<metadata><vkunplug:unplug xmlns:vkunplug='{PENDING_NS}'>\
             <vkunplug:device key='disk/vdb'/><vkunplug:device key='interface/52:54:00:00:00:01'/>\
             </vkunplug:unplug><other:x xmlns:other='urn:x'><device key='no'/></other:x></metadata>"
        ))
        .unwrap();
        assert_eq!(pending_from_metadata(&md), keys);
        assert!(pending_element(&[]).is_none());
    }
}
