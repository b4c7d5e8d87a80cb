//! What a volume can be in each pool type, as libvirt's storage backends carry it out. Pure:
//! the planner asks before it plans a volume's creation or growth.
//!
//! - `dir`, `fs`, `netfs`: image files (qcow2 or raw) on a filesystem; overlays, clones and
//!   growth as libvirt's filesystem backend does them (qemu-img).
//! - `logical`: each volume is an LVM logical volume, always raw: libvirt's logical backend
//!   ignores a volume's format (asked for qcow2, it makes a raw LV without a word), turns a
//!   backing store into an LVM snapshot (`lvcreate -s`, a copy-on-write area of fixed size
//!   that becomes invalid once full, unlike a qcow2 overlay) and has no resize at all
//!   ("storage pool does not support changing of volume capacity"). LVM sizes a volume in
//!   whole extents (4 MiB in a volume group libvirt builds), so it can come out larger than
//!   asked.
//! - `disk`: each volume is a partition of the pool's one disk, raw data (libvirt's disk
//!   backend takes a partition type where others take an image format, and refuses `raw`),
//!   made by `parted mkpart` in whole sectors on a gpt label (10 MB asked: 10,000,384
//!   bytes) and whole cylinders on a dos one (5 MiB asked: 5,483,520 bytes), never resized
//!   ("storage pool does not support changing of volume capacity"), cloned by copying into
//!   a new partition as large as asked. libvirt names each partition itself (`sdb2`), so
//!   only the node agent, which records the partition in the Volume's status, can keep a
//!   Volume there.

use super::desired::VolumeOrigin;

/// Why a volume cannot be made as the manifest asks in a pool of `pool_type`; `None`: it can.
pub fn refuse_volume(pool_type: &str, format: &str, source: &VolumeOrigin) -> Option<String> {
    if pool_type == "disk" {
        return refuse_partition(format, source);
    }
    if pool_type != "logical" {
        return None;
    }
    if matches!(source, VolumeOrigin::Backing(_)) {
        return Some("a logical (LVM) pool cannot hold a copy-on-write overlay: libvirt would make an LVM snapshot of fixed size, which becomes unreadable once its copy-on-write area fills; use a full clone (spec.source.volume), or a dir or fs pool for qcow2 overlays".into());
    }
    if format != "raw" {
        return Some(format!(
            "a logical (LVM) pool holds raw logical volumes only (libvirt's LVM backend would silently make a raw volume for format {format}): set spec.format: raw, or use a dir or fs pool for qcow2"
        ));
    }
    None
}

fn refuse_partition(format: &str, source: &VolumeOrigin) -> Option<String> {
    if matches!(source, VolumeOrigin::Backing(_)) {
        return Some("a disk pool's volumes are partitions, which cannot be copy-on-write overlays: use a full clone (spec.source.volume), or a dir or fs pool for qcow2 overlays".into());
    }
    (format != "raw").then(|| {
        format!(
            "a disk pool holds partitions, raw data only (libvirt's disk backend makes no {format} image): set spec.format: raw, or use a dir or fs pool for qcow2"
        )
    })
}

/// Why a volume named `libvirt_name` cannot be made in a pool of `pool_type`; `None`: it
/// can. In a `disk` pool libvirt names each partition after the disk (`sdb2`) and refuses
/// any other name, and partitions carry no owner mark: a Volume's `<namespace>.<name>` is
/// not a partition's name. The node agent gives the planner the partition's name (the one
/// its Volume recorded, or the next one libvirt will make); the local CLI, which keeps no
/// record, cannot.
pub fn refuse_volume_name(pool_type: &str, libvirt_name: &str) -> Option<&'static str> {
    (pool_type == "disk" && libvirt_name.contains('.')).then_some(
        "a disk pool's volumes are partitions named by libvirt (sdb2) that carry no owner mark, so only the node agent, which records each Volume's partition in its status, keeps Volumes there; `virtkube apply` without a cluster does not",
    )
}

/// Why a volume in a pool of `pool_type` cannot grow; `None`: it can.
pub fn refuse_growth(pool_type: &str) -> Option<&'static str> {
    match pool_type {
        "logical" => Some(
            "libvirt cannot grow a logical volume (its LVM backend has no resize: \"storage pool does not support changing of volume capacity\"): grow it on the node with `lvextend`, and the Volume's status follows",
        ),
        "disk" => Some(
            "libvirt cannot resize a partition (its disk backend has no resize: \"storage pool does not support changing of volume capacity\"): make a larger clone (a new Volume with spec.source.volume and the new capacity) and move the guest to it",
        ),
        _ => None,
    }
}

/// Why a clone larger than its source cannot be made in a pool of `pool_type`; `None`: it
/// can. libvirt copies a file or logical volume at its source's size whatever was asked,
/// so a larger clone is grown afterwards, which needs a resize; a disk pool's clone is a new
/// partition made as large as asked before the copy.
pub fn refuse_larger_clone(pool_type: &str) -> Option<&'static str> {
    if pool_type == "disk" {
        return None;
    }
    refuse_growth(pool_type)
}

/// How much larger than asked a partition may come out and still be the size asked: two
/// cylinders of the usual dos geometry (libvirt aligns a dos partition's start and end to
/// them), more than any gpt rounding.
const DISK_SLACK: u64 = 16 << 20;

/// How a volume's observed size compares with the size its manifest asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeCheck {
    /// As asked (for `logical`: as LVM rounds what was asked).
    Met,
    /// Smaller than asked.
    Below,
    /// Larger than asked: meeting it would mean shrinking.
    Above,
}

/// Compares `observed` with `wanted` bytes for a volume in a pool of `pool_type`. A logical
/// volume is a whole number of extents: one up to an extent larger than asked is the size
/// asked. The extent size is not reported by libvirt; the largest power of two dividing the
/// observed size bounds it (4 MiB for a volume group libvirt builds, so a 10 MB request seen
/// as 12 MiB is met). A partition is a whole number of sectors (gpt) or cylinders (dos): up
/// to [`DISK_SLACK`] over is met.
pub fn check_size(pool_type: &str, wanted: u64, observed: u64) -> SizeCheck {
    if observed < wanted {
        return SizeCheck::Below;
    }
    let slack = match pool_type {
        "logical" if observed > 0 => 1u64 << observed.trailing_zeros(),
        // A partition is rounded up to whole sectors on a gpt label (10 MB asked: 10,000,384
        // bytes) and to whole cylinders on a dos one (255 KiB on scsi_debug's geometry,
        // 7.8 MiB on the usual 255 heads x 63 sectors). It can neither grow nor shrink, so
        // the slack only decides whether a smaller spec.capacity is reported as a shrink.
        "disk" => DISK_SLACK,
        _ => 1,
    };
    if observed - wanted < slack {
        SizeCheck::Met
    } else {
        SizeCheck::Above
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_logical_pool_holds_raw_volumes_without_overlays() {
        let empty = VolumeOrigin::Empty;
        assert!(refuse_volume("logical", "raw", &empty).is_none());
        assert!(refuse_volume("logical", "raw", &VolumeOrigin::Clone("a".into())).is_none());
        let qcow2 = refuse_volume("logical", "qcow2", &empty).unwrap();
        assert!(qcow2.contains("set spec.format: raw"), "{qcow2}");
        let overlay = refuse_volume("logical", "qcow2", &VolumeOrigin::Backing("a".into()));
        assert!(overlay.unwrap().contains("copy-on-write overlay"));
        for other in ["dir", "fs", "netfs"] {
            assert!(refuse_volume(other, "qcow2", &VolumeOrigin::Backing("a".into())).is_none());
            assert!(refuse_growth(other).is_none());
        }
        assert!(refuse_growth("logical").unwrap().contains("lvextend"));
    }

    #[test]
    fn a_disk_pool_holds_raw_partitions_that_never_resize() {
        let empty = VolumeOrigin::Empty;
        assert!(refuse_volume("disk", "raw", &empty).is_none());
        assert!(refuse_volume("disk", "raw", &VolumeOrigin::Clone("a".into())).is_none());
        let qcow2 = refuse_volume("disk", "qcow2", &empty).unwrap();
        assert!(qcow2.contains("set spec.format: raw"), "{qcow2}");
        let overlay = refuse_volume("disk", "raw", &VolumeOrigin::Backing("a".into())).unwrap();
        assert!(overlay.contains("copy-on-write"), "{overlay}");
        assert!(refuse_growth("disk").unwrap().contains("larger clone"));
        assert!(refuse_larger_clone("disk").is_none());
        assert!(refuse_larger_clone("logical").is_some());
        assert!(refuse_larger_clone("dir").is_none());
        // Only a partition's own name: a Volume's namespace.name is the CLI's, refused.
        assert!(
            refuse_volume_name("disk", "team.data")
                .unwrap()
                .contains("node agent")
        );
        assert!(refuse_volume_name("disk", "sdb2").is_none());
        assert!(refuse_volume_name("dir", "team.data").is_none());
        // 10 MB asked, 10,000,384 bytes made (whole 512-byte sectors), measured.
        assert_eq!(check_size("disk", 10_000_000, 10_000_384), SizeCheck::Met);
        assert_eq!(check_size("disk", 10 * MIB, 10 * MIB), SizeCheck::Met);
        // 5 MiB asked on a dos label, 5,483,520 bytes made (whole cylinders), measured.
        assert_eq!(check_size("disk", 5 * MIB, 5_483_520), SizeCheck::Met);
        assert_eq!(check_size("disk", 11 * MIB, 10 * MIB), SizeCheck::Below);
        assert_eq!(check_size("disk", 4 * MIB, 40 * MIB), SizeCheck::Above);
    }

    #[test]
    fn lvm_extents_round_up_what_was_asked() {
        // 10 MB asked, 12 MiB made (three 4 MiB extents).
        assert_eq!(check_size("logical", 10_000_000, 12 * MIB), SizeCheck::Met);
        assert_eq!(check_size("logical", 12 * MIB, 12 * MIB), SizeCheck::Met);
        assert_eq!(check_size("logical", 13 * MIB, 12 * MIB), SizeCheck::Below);
        assert_eq!(check_size("logical", 4 * MIB, 12 * MIB), SizeCheck::Above);
        // The same sizes in a file pool are exact.
        assert_eq!(check_size("dir", 10_000_000, 12 * MIB), SizeCheck::Above);
        assert_eq!(check_size("dir", 12 * MIB, 12 * MIB), SizeCheck::Met);
        assert_eq!(check_size("fs", 13 * MIB, 12 * MIB), SizeCheck::Below);
    }
}
