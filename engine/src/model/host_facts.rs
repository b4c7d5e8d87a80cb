//! Facts about a host beyond its CPUs and memory: network interfaces, PCI and mediated
//! devices (for passthrough), the security driver, and storage that could back a pool.
//! Pure: read from libvirt's XML; the engine's [`crate::node`] gathers them.

use super::xml::{self, Element, XmlError};

/// A host network interface (`virConnectListAllInterfaces`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostInterface {
    /// Name (`eth0`).
    pub name: String,
    /// MAC address.
    pub mac: Option<String>,
    /// Whether it is up.
    pub active: bool,
}

/// A PCI device of the host (a node device with the `pci` capability).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PciDevice {
    /// libvirt's node device name (`pci_0000_00_04_0`).
    pub name: String,
    /// PCI address `domain:bus:slot.function` (`0000:00:04.0`).
    pub address: String,
    /// Vendor id (`0x1af4`).
    pub vendor_id: String,
    /// Vendor name, when the host's PCI database knows it.
    pub vendor: Option<String>,
    /// Product id (`0x1053`).
    pub product_id: String,
    /// Product name, when known.
    pub product: Option<String>,
    /// PCI class (`0x020000`).
    pub class: Option<String>,
    /// The host driver bound to it (`virtio-pci`, `vfio-pci`), if any.
    pub driver: Option<String>,
    /// Its IOMMU group (devices of one group are passed through together); `None` on hosts
    /// without an IOMMU, where passthrough is impossible.
    pub iommu_group: Option<u32>,
}

impl PciDevice {
    /// Reads a node device's XML; `None` when it is not a PCI device, or is a host or PCI
    /// bridge (PCI class `0x0600xx`/`0x0604xx`), which can never be passed through.
    pub fn from_xml(text: &str) -> Result<Option<Self>, XmlError> {
        let root = xml::parse(text)?;
        let Some(cap) = root
            .find_all("capability")
            .find(|c| c.get("type") == Some("pci"))
        else {
            return Ok(None);
        };
        let num = |name: &str| {
            cap.path_text(name)
                .and_then(|t| parse_int(&t))
                .unwrap_or_default()
        };
        let class = cap.path_text("class");
        if class
            .as_deref()
            .and_then(parse_int)
            .is_some_and(|c| matches!(c >> 8, 0x0600 | 0x0604))
        {
            return Ok(None);
        }
        let (vendor_id, vendor) = id_and_name(cap.find("vendor"));
        let (product_id, product) = id_and_name(cap.find("product"));
        Ok(Some(PciDevice {
            name: root.path_text("name").unwrap_or_default(),
            address: format!(
                "{:04x}:{:02x}:{:02x}.{:x}",
                num("domain"),
                num("bus"),
                num("slot"),
                num("function")
            ),
            vendor_id,
            vendor,
            product_id,
            product,
            class,
            driver: root.path_text("driver/name"),
            iommu_group: cap.find("iommuGroup").and_then(|g| g.get_parsed("number")),
        }))
    }
}

/// A mediated device (vGPU and the like; a node device with the `mdev` capability).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MediatedDevice {
    /// libvirt's node device name.
    pub name: String,
    /// The mdev type (`nvidia-63`).
    pub mdev_type: Option<String>,
    /// The parent device.
    pub parent: Option<String>,
    /// Its UUID (what a domain's `<hostdev type='mdev'>` names).
    pub uuid: Option<String>,
    /// Its IOMMU group.
    pub iommu_group: Option<u32>,
}

impl MediatedDevice {
    /// Reads a node device's XML; `None` when it is not a mediated device.
    pub fn from_xml(text: &str) -> Result<Option<Self>, XmlError> {
        let root = xml::parse(text)?;
        let Some(cap) = root
            .find_all("capability")
            .find(|c| c.get("type") == Some("mdev"))
        else {
            return Ok(None);
        };
        Ok(Some(MediatedDevice {
            name: root.path_text("name").unwrap_or_default(),
            mdev_type: cap
                .find("type")
                .and_then(|t| t.get("id"))
                .map(str::to_string),
            parent: root.path_text("parent"),
            uuid: cap.path_text("uuid"),
            iommu_group: cap.find("iommuGroup").and_then(|g| g.get_parsed("number")),
        }))
    }
}

/// The host's security driver (`virNodeGetSecurityModel`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecurityModel {
    /// `selinux`, `apparmor`, `dac`, or `none`.
    pub model: String,
    /// Its domain of interpretation.
    pub doi: String,
}

/// Storage libvirt found that a pool could use (`virConnectFindStoragePoolSources`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSourceFound {
    /// The pool type it was asked for (`logical`).
    pub pool_type: String,
    /// The source's name (an LVM volume group).
    pub name: Option<String>,
    /// Its devices (physical volumes).
    pub devices: Vec<String>,
    /// Its format (`lvm2`).
    pub format: Option<String>,
}

impl PoolSourceFound {
    /// Reads libvirt's `<sources>` answer for `pool_type`.
    pub fn list_from_xml(pool_type: &str, text: &str) -> Result<Vec<Self>, XmlError> {
        let root = xml::parse(text)?;
        Ok(root
            .find_all("source")
            .map(|s| PoolSourceFound {
                pool_type: pool_type.to_string(),
                name: s.path_text("name"),
                devices: s
                    .find_all("device")
                    .filter_map(|d| d.get("path").map(str::to_string))
                    .collect(),
                format: s
                    .find("format")
                    .and_then(|f| f.get("type"))
                    .map(str::to_string),
            })
            .collect())
    }
}

/// A domain's security label (`<seclabel>` in its XML; for a running domain with a dynamic
/// label, the label it got).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecurityLabel {
    /// The security driver (`selinux`, `apparmor`, `dac`, `none`).
    pub model: String,
    /// `dynamic`, `static` or `none`.
    pub label_type: String,
    /// The process label.
    pub label: Option<String>,
    /// The label of the guest's images.
    pub image_label: Option<String>,
}

impl SecurityLabel {
    /// The `<seclabel>` children of a `<domain>`.
    pub fn all_from_domain(root: &Element) -> Vec<Self> {
        root.find_all("seclabel")
            .map(|s| SecurityLabel {
                model: s.get("model").unwrap_or("none").to_string(),
                label_type: s.get("type").unwrap_or("dynamic").to_string(),
                label: s.path_text("label"),
                image_label: s.path_text("imagelabel"),
            })
            .collect()
    }
}

fn parse_int(text: &str) -> Option<u32> {
    match text.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

/// `<vendor id='0x1af4'>Red Hat, Inc.</vendor>` → (id, name).
fn id_and_name(el: Option<&Element>) -> (String, Option<String>) {
    match el {
        Some(e) => (
            e.get("id").unwrap_or_default().to_string(),
            Some(e.text.trim().to_string()).filter(|t| !t.is_empty()),
        ),
        None => (String::new(), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_pci_device_as_libvirt_9_prints_it() {
        let xml = "<device><name>pci_0000_00_04_0</name>\
            <path>/sys/devices/pci0000:00/0000:00:04.0</path><parent>computer</parent>\
            <driver><name>virtio-pci</name></driver>\
            <capability type='pci'><class>0xffff00</class><domain>0</domain><bus>0</bus>\
            <slot>4</slot><function>0</function><product id='0x1053'/>\
            <vendor id='0x1af4'>Red Hat, Inc.</vendor>\
            <iommuGroup number='7'><address domain='0x0000' bus='0x00' slot='0x04' function='0x0'/></iommuGroup>\
            </capability></device>";
        let d = PciDevice::from_xml(xml).unwrap().unwrap();
        assert_eq!(d.address, "0000:00:04.0");
        assert_eq!(
            (d.vendor_id.as_str(), d.vendor.as_deref()),
            ("0x1af4", Some("Red Hat, Inc."))
        );
        assert_eq!(
            (d.product_id.as_str(), d.product.as_deref()),
            ("0x1053", None)
        );
        assert_eq!(d.driver.as_deref(), Some("virtio-pci"));
        assert_eq!(d.iommu_group, Some(7));
        assert!(
            PciDevice::from_xml(
                "<device><name>computer</name><capability type='system'/></device>"
            )
            .unwrap()
            .is_none()
        );
    }

    #[test]
    fn reads_mdevs_pool_sources_and_security_labels() {
        let m = MediatedDevice::from_xml(
            "<device><name>mdev_4b20d080</name><parent>pci_0000_06_00_0</parent>\
             <capability type='mdev'><type id='nvidia-63'/><uuid>4b20d080-1b54-4048-85b3-a6a62d165c01</uuid>\
             <iommuGroup number='12'/></capability></device>",
        )
        .unwrap()
        .unwrap();
        assert_eq!(m.mdev_type.as_deref(), Some("nvidia-63"));
        assert_eq!(m.iommu_group, Some(12));
        let sources = PoolSourceFound::list_from_xml(
            "logical",
            "<sources><source><device path='/dev/loop3'/><name>vg0</name><format type='lvm2'/></source></sources>",
        )
        .unwrap();
        assert_eq!(sources[0].name.as_deref(), Some("vg0"));
        assert_eq!(sources[0].devices, ["/dev/loop3"]);
        let dom = xml::parse(
            "<domain><seclabel type='dynamic' model='dac' relabel='yes'><label>+0:+0</label>\
             <imagelabel>+0:+0</imagelabel></seclabel><seclabel type='none' model='none'/></domain>",
        )
        .unwrap();
        let labels = SecurityLabel::all_from_domain(&dom);
        assert_eq!(labels.len(), 2);
        assert_eq!(labels[0].label.as_deref(), Some("+0:+0"));
        assert_eq!(labels[1].label_type, "none");
    }
}
