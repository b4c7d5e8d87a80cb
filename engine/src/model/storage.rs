//! Storage pools and volumes.

use super::owner::{Owner, POOL_MARK_VENDOR};
use super::xml::{self, Element, XmlError};
pub use virtkube_crds::volume::PartitionExtent;

/// Pool types the engine models.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolType {
    /// A host directory.
    Dir,
    /// An NFS export mounted by libvirt.
    Netfs,
    /// A block device holding a filesystem, mounted by libvirt.
    Fs,
    /// An LVM volume group.
    Logical,
    /// One whole disk; its partitions are the volumes.
    Disk,
    /// Any other type, by libvirt's name (read-only support).
    Other(String),
}

impl PoolType {
    /// libvirt's name.
    pub fn as_str(&self) -> &str {
        match self {
            PoolType::Dir => "dir",
            PoolType::Netfs => "netfs",
            PoolType::Fs => "fs",
            PoolType::Logical => "logical",
            PoolType::Disk => "disk",
            PoolType::Other(s) => s,
        }
    }

    /// Parses libvirt's name.
    pub fn parse(s: &str) -> Self {
        match s {
            "dir" => PoolType::Dir,
            "netfs" => PoolType::Netfs,
            "fs" => PoolType::Fs,
            "logical" => PoolType::Logical,
            "disk" => PoolType::Disk,
            o => PoolType::Other(o.to_string()),
        }
    }
}

/// A pool's `<source>` (unused for `dir`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PoolSource {
    /// Remote host (netfs).
    pub host: Option<String>,
    /// Remote directory (netfs).
    pub dir: Option<String>,
    /// Block devices (logical: the physical volumes; fs: the one device; disk: the whole
    /// disk).
    pub devices: Vec<String>,
    /// Source name (logical: the volume group).
    pub name: Option<String>,
    /// Filesystem (`fs`: ext4, xfs, …; `netfs`: nfs; `logical`: lvm2, which libvirt adds);
    /// for `disk`, the partition table (`gpt`, `dos`).
    pub format: Option<String>,
}

/// The desired definition of a storage pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolDef {
    /// libvirt name.
    pub name: String,
    /// Type.
    pub pool_type: PoolType,
    /// Target path on the host.
    pub target_path: String,
    /// Source.
    pub source: PoolSource,
    /// Ownership mark (written as `<source><vendor>`/`<product>`).
    pub owner: Owner,
}

impl PoolDef {
    /// A dir pool.
    pub fn dir(name: impl Into<String>, path: impl Into<String>, owner: Owner) -> Self {
        Self {
            name: name.into(),
            pool_type: PoolType::Dir,
            target_path: path.into(),
            source: PoolSource::default(),
            owner,
        }
    }

    /// Checks the definition.
    pub fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() || self.name.contains('/') {
            return Err(format!(
                "pool name `{}` is empty or contains `/`",
                self.name
            ));
        }
        if !self.target_path.starts_with('/') {
            return Err(format!(
                "pool target `{}` is not an absolute path",
                self.target_path
            ));
        }
        let s = &self.source;
        match &self.pool_type {
            PoolType::Other(t) => return Err(format!("pool type {t} is not supported yet")),
            PoolType::Dir => {}
            PoolType::Netfs if s.host.is_none() || s.dir.is_none() => {
                return Err("a netfs pool needs a source host and directory".into());
            }
            PoolType::Netfs => {}
            PoolType::Fs if s.devices.len() != 1 => {
                return Err(format!(
                    "an fs pool needs exactly one source device, {} given",
                    s.devices.len()
                ));
            }
            PoolType::Fs => {}
            PoolType::Disk if s.devices.len() != 1 => {
                return Err(format!(
                    "a disk pool needs exactly one source device (the whole disk), {} given",
                    s.devices.len()
                ));
            }
            // libvirt's default label for a disk pool is dos: always say which.
            PoolType::Disk if s.format.is_none() => {
                return Err("a disk pool needs its partition table format (gpt, dos)".into());
            }
            PoolType::Disk => {}
            PoolType::Logical => match &s.name {
                None => return Err("a logical pool needs a volume group name".into()),
                Some(vg) if self.target_path != format!("/dev/{vg}") => {
                    return Err(format!(
                        "a logical pool's target is /dev/{vg}, not {}",
                        self.target_path
                    ));
                }
                Some(_) => {}
            },
        }
        Ok(())
    }

    /// Whether building the pool with [`BuildMode::MakeStorage`] makes something on its
    /// source devices (a volume group, a filesystem, a partition table); for the others
    /// building only creates the target directory.
    pub fn builds_on_devices(&self) -> bool {
        matches!(
            self.pool_type,
            PoolType::Logical | PoolType::Fs | PoolType::Disk
        )
    }

    /// libvirt pool XML.
    pub fn to_xml(&self) -> String {
        let s = &self.source;
        let source = s.devices.iter().fold(
            Element::new("source")
                .child_opt(
                    s.host
                        .as_ref()
                        .map(|h| Element::new("host").attr("name", h)),
                )
                .child_opt(s.dir.as_ref().map(|d| Element::new("dir").attr("path", d))),
            |el, d| el.child(Element::new("device").attr("path", d)),
        );
        let source = source
            .child_opt(s.name.as_ref().map(|n| Element::new("name").text(n)))
            .child_opt(
                s.format
                    .as_ref()
                    .map(|f| Element::new("format").attr("type", f)),
            )
            .child(Element::new("vendor").attr("name", POOL_MARK_VENDOR))
            .child(Element::new("product").attr("name", self.owner.to_pool_product()));
        Element::new("pool")
            .attr("type", self.pool_type.as_str())
            .child(Element::new("name").text(&self.name))
            .child(source)
            .child(Element::new("target").child(Element::new("path").text(&self.target_path)))
            .to_xml()
    }
}

/// How a pool is built (`virStoragePoolBuild`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildMode {
    /// Only what needs no data on a device: the target directory (`dir`, `fs`, `netfs`).
    TargetOnly,
    /// Also the storage on the source devices (`logical`: pvcreate and vgcreate; `fs`:
    /// mkfs), with `VIR_STORAGE_POOL_BUILD_NO_OVERWRITE`: libvirt refuses a device that
    /// already holds a filesystem, a partition table or an LVM label.
    MakeStorage,
}

/// `virStoragePoolState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolState {
    /// Not running.
    Inactive,
    /// Being built.
    Building,
    /// Running.
    Running,
    /// Running but degraded.
    Degraded,
    /// Running but inaccessible.
    Inaccessible,
    /// Unknown.
    Unknown,
}

impl PoolState {
    /// From libvirt's raw state.
    pub fn from_raw(v: u32) -> Self {
        match v {
            0 => PoolState::Inactive,
            1 => PoolState::Building,
            2 => PoolState::Running,
            3 => PoolState::Degraded,
            4 => PoolState::Inaccessible,
            _ => PoolState::Unknown,
        }
    }
}

/// A pool as libvirt reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolObserved {
    /// Name.
    pub name: String,
    /// UUID.
    pub uuid: String,
    /// Type.
    pub pool_type: PoolType,
    /// Target path.
    pub target_path: Option<String>,
    /// Source.
    pub source: PoolSource,
    /// virtkube's mark.
    pub owner: Option<Owner>,
    /// State (filled by the engine).
    pub state: PoolState,
    /// Capacity, bytes.
    pub capacity: u64,
    /// Allocation, bytes.
    pub allocation: u64,
    /// Available, bytes.
    pub available: u64,
    /// Autostart (filled by the engine).
    pub autostart: bool,
    /// Persistent (filled by the engine).
    pub persistent: bool,
}

fn bytes(el: Option<&Element>) -> u64 {
    let Some(el) = el else { return 0 };
    let v: u64 = el.text.trim().parse().unwrap_or(0);
    match el.get("unit").unwrap_or("bytes") {
        "KiB" | "K" | "k" => v << 10,
        "MiB" | "M" => v << 20,
        "GiB" | "G" => v << 30,
        "TiB" | "T" => v << 40,
        _ => v,
    }
}

impl PoolObserved {
    /// Reads libvirt's pool XML.
    pub fn from_xml(text: &str) -> Result<Self, XmlError> {
        let root = xml::parse(text)?;
        if root.name != "pool" {
            return Err(XmlError(format!("expected <pool>, found <{}>", root.name)));
        }
        let src = root.find("source");
        let attr = |child: &str, a: &str| {
            src.and_then(|s| s.find(child))
                .and_then(|c| c.get(a))
                .map(str::to_string)
        };
        let owner = Owner::from_pool_mark(
            attr("vendor", "name").as_deref(),
            attr("product", "name").as_deref(),
        );
        Ok(PoolObserved {
            name: root
                .path_text("name")
                .ok_or_else(|| XmlError("pool XML without <name>".into()))?,
            uuid: root.path_text("uuid").unwrap_or_default(),
            pool_type: PoolType::parse(root.get("type").unwrap_or_default()),
            target_path: root.path_text("target/path"),
            source: PoolSource {
                host: attr("host", "name"),
                dir: attr("dir", "path"),
                devices: src
                    .map(|s| {
                        s.children
                            .iter()
                            .filter(|c| c.name == "device")
                            .filter_map(|c| c.get("path").map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default(),
                name: src.and_then(|s| s.path_text("name")),
                format: attr("format", "type"),
            },
            owner,
            state: PoolState::Unknown,
            capacity: bytes(root.find("capacity")),
            allocation: bytes(root.find("allocation")),
            available: bytes(root.find("available")),
            autostart: false,
            persistent: false,
        })
    }
}

/// Volume image formats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeFormat {
    /// QEMU copy-on-write v2.
    Qcow2,
    /// Raw.
    Raw,
    /// Anything else, by libvirt's name.
    Other(String),
}

impl VolumeFormat {
    /// libvirt's name.
    pub fn as_str(&self) -> &str {
        match self {
            VolumeFormat::Qcow2 => "qcow2",
            VolumeFormat::Raw => "raw",
            VolumeFormat::Other(s) => s,
        }
    }

    /// Parses libvirt's name.
    pub fn parse(s: &str) -> Self {
        match s {
            "qcow2" => VolumeFormat::Qcow2,
            "raw" => VolumeFormat::Raw,
            o => VolumeFormat::Other(o.to_string()),
        }
    }
}

/// A volume's backing store (copy-on-write parent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingStore {
    /// Path of the parent image.
    pub path: String,
    /// Its format.
    pub format: VolumeFormat,
}

/// The desired definition of a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeDef {
    /// Volume name inside its pool (`<namespace>.<name>` for namespaced resources).
    pub name: String,
    /// Capacity in bytes.
    pub capacity_bytes: u64,
    /// Format.
    pub format: VolumeFormat,
    /// Copy-on-write parent: a volume name in the same pool (resolved to a path by the
    /// engine), only for `qcow2`.
    pub backing_volume: Option<String>,
}

impl VolumeDef {
    /// Checks the definition.
    pub fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() || self.name.contains('/') || self.name.starts_with('.') {
            return Err(format!(
                "volume name `{}` is empty, hidden or contains `/`",
                self.name
            ));
        }
        if self.capacity_bytes == 0 {
            return Err("volume capacity must be above zero".into());
        }
        if self.backing_volume.is_some() && self.format != VolumeFormat::Qcow2 {
            return Err("a backing volume needs format qcow2".into());
        }
        Ok(())
    }

    /// libvirt volume XML for a partition of a `disk` pool: no `<format>` (libvirt's disk
    /// backend takes a partition type there, `none` by default, and refuses `raw`: "unknown
    /// volume format type raw"); a partition holds raw data.
    pub fn to_partition_xml(&self) -> String {
        Element::new("volume")
            .child(Element::new("name").text(&self.name))
            .child(
                Element::new("capacity")
                    .attr("unit", "bytes")
                    .text(self.capacity_bytes),
            )
            .to_xml()
    }

    /// libvirt volume XML, with the backing store already resolved to a path.
    pub fn to_xml(&self, backing: Option<&BackingStore>) -> String {
        let mut root = Element::new("volume")
            .child(Element::new("name").text(&self.name))
            .child(
                Element::new("capacity")
                    .attr("unit", "bytes")
                    .text(self.capacity_bytes),
            )
            .child(
                Element::new("target")
                    .child(Element::new("format").attr("type", self.format.as_str())),
            );
        if let Some(b) = backing {
            root = root.child(
                Element::new("backingStore")
                    .child(Element::new("path").text(&b.path))
                    .child(Element::new("format").attr("type", b.format.as_str())),
            );
        }
        root.to_xml()
    }
}

/// The name libvirt's disk backend gives the next partition it makes on `device` (a
/// `disk` pool's one device), given the names of the partitions there: the device's name,
/// `p` when that ends in a digit (`nvme0n1p1`), and the lowest partition number not in use,
/// which is the one `parted mkpart` takes (checked on libvirt 9.0 with a GPT label: after
/// `sda2` is deleted, the next partition is `sda2` again). libvirt refuses a volume of any
/// other name ("invalid partition name 'x', expected 'sda2'") and removes what it made.
/// `max_partitions`: 4 for a `dos` label (virtkube makes primary partitions only), 128 for
/// `gpt`. `None`: the label has no free partition number.
pub fn next_partition_name(
    device: &str,
    existing: &[String],
    max_partitions: u32,
) -> Option<String> {
    let base = device.rsplit('/').next().unwrap_or(device);
    let separator = if base.ends_with(|c: char| c.is_ascii_digit()) {
        "p"
    } else {
        ""
    };
    (1..=max_partitions)
        .map(|n| format!("{base}{separator}{n}"))
        .find(|name| !existing.iter().any(|e| e == name))
}

/// How many partitions virtkube makes on a `disk` pool's label of `format`: primary
/// partitions only on `dos` (libvirt would make logical ones after the fourth, whose
/// numbers shift when one before them is deleted: a recorded partition would then name
/// another's data), 128 on `gpt` (numbers never shift).
pub fn max_partitions(format: &str) -> u32 {
    if format == "dos" { 4 } else { 128 }
}

/// A volume as libvirt reports it. Volumes carry no ownership mark in libvirt: the caller
/// proves ownership with the key it recorded when it created the volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeObserved {
    /// Name.
    pub name: String,
    /// Pool name (filled by the engine).
    pub pool: String,
    /// libvirt key (for dir pools: the path).
    pub key: String,
    /// Path on the host.
    pub path: String,
    /// Capacity, bytes.
    pub capacity: u64,
    /// Allocation, bytes.
    pub allocation: u64,
    /// Format.
    pub format: Option<VolumeFormat>,
    /// Backing store.
    pub backing: Option<BackingStore>,
    /// Where the volume lies on its device, when libvirt reports exactly one extent there:
    /// a `disk` pool's partition (`<source><device path='/dev/sdb'><extent start='…'
    /// end='…'/></device></source>`). A file has none; a logical volume may have several
    /// (none is given then).
    pub extent: Option<PartitionExtent>,
}

impl VolumeObserved {
    /// Reads libvirt's volume XML.
    pub fn from_xml(text: &str) -> Result<Self, XmlError> {
        let root = xml::parse(text)?;
        if root.name != "volume" {
            return Err(XmlError(format!(
                "expected <volume>, found <{}>",
                root.name
            )));
        }
        let backing = root.find("backingStore").and_then(|b| {
            Some(BackingStore {
                path: b.path_text("path")?,
                format: VolumeFormat::parse(
                    b.find("format")
                        .and_then(|f| f.get("type"))
                        .unwrap_or("raw"),
                ),
            })
        });
        Ok(VolumeObserved {
            name: root
                .path_text("name")
                .ok_or_else(|| XmlError("volume XML without <name>".into()))?,
            pool: String::new(),
            key: root.path_text("key").unwrap_or_default(),
            path: root.path_text("target/path").unwrap_or_default(),
            capacity: bytes(root.find("capacity")),
            allocation: bytes(root.find("allocation")),
            format: root
                .path("target/format")
                .and_then(|f| f.get("type"))
                .map(VolumeFormat::parse),
            backing,
            extent: single_extent(&root),
        })
    }
}

/// The one `<source><device><extent>` of a volume's XML; `None` when there is none, several,
/// or one libvirt wrote with unreadable or inverted offsets.
fn single_extent(volume: &Element) -> Option<PartitionExtent> {
    let source = volume.find("source")?;
    let mut extents = source
        .children
        .iter()
        .filter(|d| d.name == "device")
        .flat_map(|d| d.children.iter().filter(|e| e.name == "extent"));
    let only = extents.next()?;
    if extents.next().is_some() {
        return None;
    }
    let offset = |a: &str| only.get(a)?.trim().parse::<u64>().ok();
    let (start, end) = (offset("start")?, offset("end")?);
    (end > start).then_some(PartitionExtent { start, end })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_named_as_libvirt_expects() {
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            next_partition_name("/dev/sda", &[], 128).as_deref(),
            Some("sda1")
        );
        assert_eq!(
            next_partition_name("/dev/sda", &names(&["sda1", "sda3"]), 128).as_deref(),
            Some("sda2")
        );
        assert_eq!(
            next_partition_name("/dev/nvme0n1", &names(&["nvme0n1p1"]), 128).as_deref(),
            Some("nvme0n1p2")
        );
        let four = names(&["sdb1", "sdb2", "sdb3", "sdb4"]);
        assert_eq!(
            next_partition_name("/dev/sdb", &four, max_partitions("dos")),
            None
        );
        assert_eq!(
            next_partition_name("/dev/sdb", &four, max_partitions("gpt")).as_deref(),
            Some("sdb5")
        );
    }

    /// `virsh vol-dumpxml` of a partition of a `disk` pool, as libvirt 9.0 wrote it in the
    /// kernel VM (controller/tests/agent_pools_real.rs: one made by hand with `parted unit B
    /// mkpart` and read by `pool-refresh`). libvirt_parthelper's end is the byte after the
    /// partition.
    const PARTITION_XML: &str = "<volume type='block'>
  <name>sdd3</name>
  <key>/dev/sdd3</key>
  <source>
    <device path='/dev/sdd'>
      <extent start='19922944' end='24117248'/>
    </device>
  </source>
  <capacity unit='bytes'>4194304</capacity>
  <allocation unit='bytes'>4194304</allocation>
  <physical unit='bytes'>4194304</physical>
  <target>
    <path>/dev/sdd3</path>
    <format type='none'/>
    <permissions>
      <mode>0600</mode>
      <owner>0</owner>
      <group>0</group>
    </permissions>
    <timestamps>
      <atime>1796145486.440000000</atime>
      <mtime>1796145486.440000000</mtime>
      <ctime>1796145486.440000000</ctime>
      <btime>0</btime>
    </timestamps>
  </target>
</volume>
";

    #[test]
    fn a_partition_s_extent_is_read_from_its_volume_xml() {
        let o = VolumeObserved::from_xml(PARTITION_XML).unwrap();
        assert_eq!(
            o.extent,
            Some(PartitionExtent {
                start: 19_922_944,
                end: 24_117_248
            })
        );
        assert_eq!(o.extent.map(|e| e.end - e.start), Some(o.capacity));
        assert_eq!(
            (o.key.as_str(), o.path.as_str()),
            ("/dev/sdd3", "/dev/sdd3")
        );
        // A file has no extent; an LV spread over several is not one partition; offsets
        // libvirt could not have meant are not an identity.
        let file = PARTITION_XML.replace(
            "<device path='/dev/sdd'>\n      <extent start='19922944' end='24117248'/>\n    </device>",
            "",
        );
        assert_eq!(VolumeObserved::from_xml(&file).unwrap().extent, None);
        let two = PARTITION_XML.replace(
            "</device>",
            "</device>\n    <device path='/dev/sde'>\n      <extent start='0' end='512'/>\n    </device>",
        );
        assert_eq!(VolumeObserved::from_xml(&two).unwrap().extent, None);
        for bad in ["end='19922944'", "end='x'", "end='-1'"] {
            let xml = PARTITION_XML.replace("end='24117248'", bad);
            assert_eq!(
                VolumeObserved::from_xml(&xml).unwrap().extent,
                None,
                "{bad}"
            );
        }
    }

    #[test]
    fn a_partition_is_asked_for_without_a_format() {
        let def = VolumeDef {
            name: "sda2".into(),
            capacity_bytes: 10 << 20,
            format: VolumeFormat::Raw,
            backing_volume: None,
        };
        let xml = def.to_partition_xml();
        assert!(!xml.contains("format"), "{xml}");
        assert!(xml.contains("<name>sda2</name>"), "{xml}");
    }

    #[test]
    fn pool_mark_survives_xml() {
        let def = PoolDef::dir(
            "images",
            "/var/lib/vk/images",
            Owner::new("StoragePool", "u-1", None, "images"),
        );
        def.validate().unwrap();
        let o = PoolObserved::from_xml(&def.to_xml()).unwrap();
        assert_eq!(o.owner, Some(def.owner));
        assert_eq!(o.target_path.as_deref(), Some("/var/lib/vk/images"));
        assert_eq!(o.pool_type, PoolType::Dir);
    }

    #[test]
    fn source_of_every_carried_out_type_survives_xml() {
        let owner = Owner::new("StoragePool", "u-2", None, "p");
        let defs = [
            PoolDef {
                pool_type: PoolType::Logical,
                target_path: "/dev/vg0".into(),
                source: PoolSource {
                    devices: vec!["/dev/sdb".into(), "/dev/sdc".into()],
                    name: Some("vg0".into()),
                    ..PoolSource::default()
                },
                ..PoolDef::dir("p", "/unused", owner.clone())
            },
            PoolDef {
                pool_type: PoolType::Fs,
                source: PoolSource {
                    devices: vec!["/dev/loop3".into()],
                    format: Some("ext4".into()),
                    ..PoolSource::default()
                },
                ..PoolDef::dir("p", "/srv/fs", owner.clone())
            },
            PoolDef {
                pool_type: PoolType::Netfs,
                source: PoolSource {
                    host: Some("nas".into()),
                    dir: Some("/export".into()),
                    format: Some("nfs".into()),
                    ..PoolSource::default()
                },
                ..PoolDef::dir("p", "/mnt/nas", owner.clone())
            },
        ];
        for def in defs {
            def.validate().unwrap();
            let o = PoolObserved::from_xml(&def.to_xml()).unwrap();
            assert_eq!(o.pool_type, def.pool_type);
            assert_eq!(o.source, def.source);
            assert_eq!(o.owner.as_ref(), Some(&owner));
            assert_eq!(o.target_path.as_deref(), Some(def.target_path.as_str()));
        }
    }

    #[test]
    fn definitions_libvirt_would_rewrite_or_refuse_are_refused() {
        let owner = Owner::new("StoragePool", "u-3", None, "p");
        let logical = |target: &str, name: Option<&str>| PoolDef {
            pool_type: PoolType::Logical,
            target_path: target.into(),
            source: PoolSource {
                name: name.map(str::to_string),
                ..PoolSource::default()
            },
            ..PoolDef::dir("p", "/x", owner.clone())
        };
        assert!(logical("/dev/vg0", Some("vg0")).validate().is_ok());
        let e = logical("/srv/vg0", Some("vg0")).validate().unwrap_err();
        assert!(e.contains("target is /dev/vg0"), "{e}");
        let e = logical("/dev/vg0", None).validate().unwrap_err();
        assert!(e.contains("volume group name"), "{e}");
        let fs = PoolDef {
            pool_type: PoolType::Fs,
            ..PoolDef::dir("p", "/srv/fs", owner.clone())
        };
        let e = fs.validate().unwrap_err();
        assert!(e.contains("exactly one source device, 0 given"), "{e}");
        let nfs = PoolDef {
            pool_type: PoolType::Netfs,
            ..PoolDef::dir("p", "/mnt/n", owner.clone())
        };
        assert!(nfs.validate().unwrap_err().contains("source host"));
    }

    #[test]
    fn volume_xml_with_backing() {
        let def = VolumeDef {
            name: "ns.disk".into(),
            capacity_bytes: 1 << 30,
            format: VolumeFormat::Qcow2,
            backing_volume: Some("base".into()),
        };
        def.validate().unwrap();
        let xml = def.to_xml(Some(&BackingStore {
            path: "/p/base".into(),
            format: VolumeFormat::Qcow2,
        }));
        let lib = xml.replace("<volume>", "<volume type='file'><key>/p/ns.disk</key>");
        let o = VolumeObserved::from_xml(&lib).unwrap();
        assert_eq!(o.capacity, 1 << 30);
        assert_eq!(o.format, Some(VolumeFormat::Qcow2));
        assert_eq!(o.backing.unwrap().path, "/p/base");
        assert_eq!(o.key, "/p/ns.disk");
    }
}
