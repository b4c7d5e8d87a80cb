//! Host PCI devices passed through to a domain (libvirt `<hostdev mode='subsystem'
//! type='pci'>`): their addresses, the element written, and what libvirt reports back. Pure.
//!
//! With `managed='yes'` libvirt detaches the device from its host driver (binding it to
//! `vfio-pci`) when the guest starts or the device is plugged in, and gives it back to the
//! host driver when the guest stops or the device is unplugged.

use super::xml::Element;

/// A PCI address: `domain:bus:slot.function`, written `0000:06:00.0` as `lspci -D` and
/// libvirt's node device names (`pci_0000_06_00_0`) spell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PciAddress {
    /// PCI domain (segment).
    pub domain: u16,
    /// Bus.
    pub bus: u8,
    /// Slot (below 0x20).
    pub slot: u8,
    /// Function (below 8).
    pub function: u8,
}

impl PciAddress {
    /// Reads `dddd:bb:ss.f` (hex, any case).
    pub fn parse(text: &str) -> Option<Self> {
        let (domain, rest) = text.split_once(':')?;
        let (bus, rest) = rest.split_once(':')?;
        let (slot, function) = rest.split_once('.')?;
        Self::from_parts(domain, bus, slot, function)
    }

    /// Reads libvirt's node device name of a PCI device (`pci_0000_06_00_0`).
    pub fn from_node_device_name(name: &str) -> Option<Self> {
        let mut parts = name.strip_prefix("pci_")?.split('_');
        let (domain, bus, slot, function) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        Self::from_parts(domain, bus, slot, function)
    }

    fn from_parts(domain: &str, bus: &str, slot: &str, function: &str) -> Option<Self> {
        let widths = [(domain, 4), (bus, 2), (slot, 2), (function, 1)];
        if widths.iter().any(|(part, w)| part.len() != *w) {
            return None;
        }
        let address = PciAddress {
            domain: u16::from_str_radix(domain, 16).ok()?,
            bus: u8::from_str_radix(bus, 16).ok()?,
            slot: u8::from_str_radix(slot, 16).ok()?,
            function: u8::from_str_radix(function, 16).ok()?,
        };
        (address.slot < 0x20 && address.function < 8).then_some(address)
    }

    /// Reads an `<address domain='0x0000' bus='0x06' slot='0x00' function='0x0'/>`.
    pub fn from_element(el: &Element) -> Option<Self> {
        let hex = |key: &str| {
            let v = el.get(key)?;
            u32::from_str_radix(v.strip_prefix("0x").unwrap_or(v), 16).ok()
        };
        Some(PciAddress {
            domain: u16::try_from(hex("domain")?).ok()?,
            bus: u8::try_from(hex("bus")?).ok()?,
            slot: u8::try_from(hex("slot")?).ok()?,
            function: u8::try_from(hex("function")?).ok()?,
        })
    }

    /// The `<address>` element libvirt reads.
    pub fn to_element(self) -> Element {
        Element::new("address")
            .attr("domain", format!("0x{:04x}", self.domain))
            .attr("bus", format!("0x{:02x}", self.bus))
            .attr("slot", format!("0x{:02x}", self.slot))
            .attr("function", format!("0x{:x}", self.function))
    }
}

impl std::fmt::Display for PciAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.slot, self.function
        )
    }
}

/// A host PCI device to pass through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostdevDef {
    /// The spec's name, written as libvirt user alias `ua-<name>`.
    pub name: Option<String>,
    /// The device's address on the host.
    pub address: PciAddress,
    /// libvirt detaches it from the host driver and reattaches it (`managed='yes'`).
    pub managed: bool,
}

/// The `<hostdev>` element of one device (also the device XML of a hotplug).
pub fn hostdev_element(h: &HostdevDef) -> Element {
    Element::new("hostdev")
        .attr("mode", "subsystem")
        .attr("type", "pci")
        .attr("managed", if h.managed { "yes" } else { "no" })
        .child(Element::new("source").child(h.address.to_element()))
        .child_opt(
            h.name
                .as_ref()
                .filter(|n| super::domain::valid_alias(n))
                .map(|n| Element::new("alias").attr("name", format!("ua-{n}"))),
        )
}

/// A host PCI device as libvirt reports it in a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostdevObserved {
    /// The user alias without `ua-` (the spec's name), when set.
    pub alias: Option<String>,
    /// Its address on the host.
    pub address: PciAddress,
    /// `managed='yes'`.
    pub managed: bool,
}

impl HostdevObserved {
    /// The PCI host devices of a domain's `<devices>` (other kinds of `<hostdev>`, USB or
    /// SCSI, are not virtkube's and are skipped).
    pub fn all_from(devices: &Element) -> Vec<Self> {
        devices
            .find_all("hostdev")
            .filter(|h| h.get("mode") == Some("subsystem") && h.get("type") == Some("pci"))
            .filter_map(|h| {
                Some(HostdevObserved {
                    alias: h
                        .find("alias")
                        .and_then(|a| a.get("name"))
                        .and_then(|a| a.strip_prefix("ua-"))
                        .map(str::to_string),
                    address: PciAddress::from_element(h.find("source")?.find("address")?)?,
                    managed: h.get("managed") == Some("yes"),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::xml;

    #[test]
    fn addresses_read_every_way_libvirt_writes_them() {
        let a = PciAddress::parse("0000:06:1f.7").unwrap();
        assert_eq!(
            a,
            PciAddress {
                domain: 0,
                bus: 6,
                slot: 0x1f,
                function: 7
            }
        );
        assert_eq!(a.to_string(), "0000:06:1f.7");
        assert_eq!(
            PciAddress::from_node_device_name("pci_0000_06_1f_7"),
            Some(a)
        );
        assert_eq!(PciAddress::from_element(&a.to_element()), Some(a));
        for bad in [
            "0000:06:20.0",
            "0000:06:00.8",
            "06:00.0",
            "0000:06:00",
            "zzzz:06:00.0",
        ] {
            assert_eq!(PciAddress::parse(bad), None, "{bad}");
        }
        assert_eq!(PciAddress::from_node_device_name("pci_0000_06_00"), None);
        assert_eq!(PciAddress::from_node_device_name("net_eth0"), None);
    }

    #[test]
    fn the_element_reads_back() {
        let def = HostdevDef {
            name: Some("gpu".into()),
            address: PciAddress::parse("0000:07:00.0").unwrap(),
            managed: true,
        };
        let devices = xml::parse(&format!(
            "<devices>{}<hostdev mode='subsystem' type='usb'><source><vendor id='0x1'/></source></hostdev></devices>",
            hostdev_element(&def).to_xml()
        ))
        .unwrap();
        assert_eq!(
            HostdevObserved::all_from(&devices),
            [HostdevObserved {
                alias: Some("gpu".into()),
                address: def.address,
                managed: true
            }],
            "the USB host device is not read"
        );
    }
}
