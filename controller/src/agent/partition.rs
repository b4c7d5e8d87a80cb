//! Which partition of a `disk` pool is a Volume's.
//!
//! libvirt names a disk pool's volumes itself, after the disk and the partition number
//! (`sdb2`: any other name is refused), and partitions carry no owner mark. So the record is
//! the Volume's: `status.key` (the partition's key, its path) and `status.partition` (where
//! it lies on the disk, its extent) once the agent made it, `status.volumeName` beside it.
//! A key is a path, which a partition made later under the same number has too: the extent
//! tells them apart. Guarantees:
//! - A Volume only ever takes the partition whose key and extent it recorded, or the one
//!   the annotation `virtkube.io/adopt-image` names. A partition no Volume recorded is never
//!   deleted, resized or handed to a guest.
//! - A partition under a recorded key at another extent than recorded (the recorded one
//!   removed outside virtkube, another made since under its number) is someone else's: it
//!   is reported (`PartitionReplaced`), and never attached, cloned from or deleted for the
//!   Volume ([`recorded`]). A record without an extent (made before extents were recorded)
//!   takes the key alone, and the agent completes it at the next reconcile that finds the
//!   partition.
//! - A Volume with no key recorded gets the next partition libvirt will make (the lowest free
//!   number), chosen again at every attempt from what the disk holds then; the `Creating`
//!   phase recorded before the attempt names nothing here. So a crash between making a
//!   partition and recording its key leaves that partition unrecorded (safe: it is nobody's,
//!   and the next attempt takes the next number), never taken by the wrong Volume. Two
//!   Volumes made at once that both expect the same number: libvirt makes one partition,
//!   refuses the other ("exists already", or "invalid partition name" when parted took
//!   another number), which is retried with the next number; the executor never adopts an
//!   existing partition ([`crate::host`]).
//! - A recorded partition that is gone (removed outside virtkube) is reported, never replaced
//!   by a new, empty one under the Volume's name; while such a record stands, its number is
//!   never made again for another Volume, and a partition two Volumes record is touched for
//!   neither ([`conflict`]).
//! - A clone copies the partition its source Volume recorded, and waits while it has none.
//! - A Domain's disk on such a Volume is the partition the Volume recorded, found by its key
//!   on the node that holds the Volume ([`for_domain`]); never a partition found by name
//!   alone, and never one another Volume records too.

use virtkube_crds::Volume;
use virtkube_crds::storage_pool::{UNRECORDED_PARTITIONS_SHOWN, UnrecordedPartitions};
use virtkube_crds::volume::{ADOPT_IMAGE_ANNOTATION, PartitionExtent, VolumePhase};
use virtkube_engine::model::{VolumeObserved, max_partitions, next_partition_name};

/// The partition a Volume's reconcile works on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Partition {
    /// The one whose key the Volume recorded.
    Recorded(String),
    /// The one the adopt annotation names (by key or path), not recorded yet.
    Adopt(String),
    /// None yet: the name libvirt will give the next partition it makes.
    Next(String),
}

impl Partition {
    /// The libvirt volume name.
    pub fn name(&self) -> &str {
        match self {
            Partition::Recorded(n) | Partition::Adopt(n) | Partition::Next(n) => n,
        }
    }
}

/// Why there is no partition to work on: the Volume condition's reason and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// `PartitionMissing`, `PartitionReplaced`, `AdoptMissing`, `PartitionTableFull`,
    /// `PartitionRecordedTwice`, `PartitionNumberRecorded`, `SourceNotReady`; for a Domain's
    /// disk also `VolumeNotReady`.
    pub reason: &'static str,
    /// What happened and what to do.
    pub message: String,
}

fn refusal(reason: &'static str) -> impl FnOnce(String) -> Refusal {
    move |message| Refusal { reason, message }
}

/// A partition record: a Volume's `status.key` and `status.partition`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    /// The partition's key (its path).
    pub key: &'a str,
    /// Where it lay on the disk; `None` for a record made before extents were recorded.
    pub extent: Option<&'a PartitionExtent>,
}

impl Record<'_> {
    /// Whether `p` is the recorded partition: its key, at the recorded extent (any extent
    /// for a record without one).
    pub fn names(&self, p: &VolumeObserved) -> bool {
        p.key == self.key && self.extent.is_none_or(|e| p.extent.as_ref() == Some(e))
    }
}

/// The record `vol`'s status holds, if any.
pub fn record_of(vol: &Volume) -> Option<Record<'_>> {
    let status = vol.status.as_ref()?;
    Some(Record {
        key: status.key.as_deref()?,
        extent: status.partition.as_ref(),
    })
}

/// What is under a recorded key in a disk pool now.
enum Under<'a> {
    /// The recorded partition.
    Recorded(&'a VolumeObserved),
    /// Another partition with the same key (path), at another extent.
    Replaced(&'a VolumeObserved),
    /// Nothing.
    Gone,
}

fn under<'a>(partitions: &'a [VolumeObserved], record: Record<'_>) -> Under<'a> {
    match partitions.iter().find(|p| p.key == record.key) {
        None => Under::Gone,
        Some(p) if record.names(p) => Under::Recorded(p),
        Some(p) => Under::Replaced(p),
    }
}

fn extent_text(extent: Option<&PartitionExtent>) -> String {
    extent.map_or_else(
        || "no extent libvirt reports".to_string(),
        ToString::to_string,
    )
}

/// `PartitionReplaced`: what `whose` (`this Volume`, `Volume ns/name`) recorded is gone and
/// `found` lies under its key now.
fn replaced(whose: &str, record: Record<'_>, found: &VolumeObserved, pool: &str) -> Refusal {
    Refusal {
        reason: "PartitionReplaced",
        message: format!(
            "the partition {whose} recorded (key {}, {} of the disk) is gone from disk pool {pool}: {} there now lies at {}, another partition made since under the same number: not the recorded data. virtkube does not attach, clone from or delete it. Delete the Volume (its partition is gone; the one under its name stays, whatever the reclaimPolicy), or restore the recorded partition at its extent",
            record.key,
            extent_text(record.extent),
            found.name,
            extent_text(found.extent.as_ref()),
        ),
    }
}

/// Whether `found`, the partition under `vol`'s recorded name in disk pool `pool`, is the
/// one it recorded (a deletion with `reclaimPolicy: Delete` removes only that one). `Err`
/// (`PartitionReplaced`): another partition, at another extent, lies under the recorded key.
/// A Volume that recorded no key owns nothing here: that is the caller's to decide.
pub fn check_identity(vol: &Volume, pool: &str, found: &VolumeObserved) -> Result<(), Refusal> {
    match record_of(vol) {
        Some(record) if record.key == found.key && !record.names(found) => {
            Err(replaced("this Volume", record, found, pool))
        }
        _ => Ok(()),
    }
}

/// The partition for `vol` in pool `pool` on `device` labelled `format` (`gpt`, `dos`),
/// among `partitions` (every volume libvirt lists there); `Err`: why there is none to work
/// on, for the Volume's condition.
pub fn choose(
    vol: &Volume,
    pool: &str,
    device: &str,
    format: &str,
    partitions: &[VolumeObserved],
) -> Result<Partition, Refusal> {
    if let Some(record) = record_of(vol) {
        let key = record.key;
        return match under(partitions, record) {
            Under::Recorded(p) => Ok(Partition::Recorded(p.name.clone())),
            Under::Replaced(p) => Err(replaced("this Volume", record, p, pool)),
            Under::Gone => Err(refusal("PartitionMissing")(format!(
                "the partition this Volume recorded (key {key}) is gone from disk pool {pool}: it was removed outside virtkube, and virtkube does not make a new, empty one in its place; delete the Volume and create it again for a new partition"
            ))),
        };
    }
    let adopt = vol
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ADOPT_IMAGE_ANNOTATION));
    if let Some(wanted) = adopt {
        return partitions
            .iter()
            .find(|p| &p.key == wanted || &p.path == wanted)
            .map(|p| Partition::Adopt(p.name.clone()))
            .ok_or_else(|| {
                format!(
                    "annotation {ADOPT_IMAGE_ANNOTATION} asks to adopt {wanted}, but disk pool {pool} holds no partition with that key or path: nothing adopted; remove the annotation to make a new, empty partition"
                )
            })
            .map_err(refusal("AdoptMissing"));
    }
    let names: Vec<String> = partitions.iter().map(|p| p.name.clone()).collect();
    next_partition_name(device, &names, max_partitions(format))
        .map(Partition::Next)
        .ok_or_else(|| {
            format!(
                "disk pool {pool} has no free partition number on its {format} label ({} partitions): virtkube makes primary partitions only on a dos label; delete a Volume there, or use a gpt disk",
                names.len()
            )
        })
        .map_err(refusal("PartitionTableFull"))
}

/// What other Volumes on this node recorded in the same disk pool: `namespace/name`, the
/// partition's key, extent and name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtherRecord {
    /// `namespace/name` of the Volume.
    pub volume: String,
    /// Its `status.key`.
    pub key: String,
    /// Its `status.partition`.
    pub extent: Option<PartitionExtent>,
    /// Its `status.volumeName`.
    pub name: Option<String>,
}

impl OtherRecord {
    /// Its partition record.
    pub fn record(&self) -> Record<'_> {
        Record {
            key: &self.key,
            extent: self.extent.as_ref(),
        }
    }
}

/// The partition `chosen` names among `partitions` (none for [`Partition::Next`]).
pub fn chosen_partition<'a>(
    chosen: &Partition,
    partitions: &'a [VolumeObserved],
) -> Option<&'a VolumeObserved> {
    match chosen {
        Partition::Recorded(name) | Partition::Adopt(name) => {
            partitions.iter().find(|p| &p.name == name)
        }
        Partition::Next(_) => None,
    }
}

/// Checks `chosen` (`found`: the partition it names) against the other Volumes' records: a
/// partition two Volumes record (the path of one removed outside virtkube, reused by a new
/// partition) is touched for neither, and the next partition is never made while another
/// Volume records its name (its own partition gone), so that no Volume could take a
/// partition made for another. A record at another extent than `found`'s is not `found`'s
/// (another Volume's partition replaced). `None`: no conflict.
pub fn conflict(
    chosen: &Partition,
    found: Option<&VolumeObserved>,
    others: &[OtherRecord],
) -> Option<Refusal> {
    match chosen {
        Partition::Recorded(_) | Partition::Adopt(_) => {
            let found = found?;
            let key = &found.key;
            let other = others.iter().find(|o| o.record().names(found))?;
            Some(Refusal {
                reason: "PartitionRecordedTwice",
                message: format!(
                    "the partition with key {key} is recorded by Volume {} too (a partition removed outside virtkube and its number reused): virtkube touches it for neither; remove the Volume whose data it is not",
                    other.volume
                ),
            })
        }
        Partition::Next(name) => {
            let other = others.iter().find(|o| o.name.as_deref() == Some(name))?;
            Some(Refusal {
                reason: "PartitionNumberRecorded",
                message: format!(
                    "the next partition libvirt would make, {name}, is recorded by Volume {}, whose partition is gone: virtkube makes no partition that another Volume's record names; delete that Volume (its data is already gone)",
                    other.volume
                ),
            })
        }
    }
}

/// The partitions no Volume recorded (`recorded`: every record in the pool on this node;
/// a partition under a recorded key at another extent is no Volume's): left alone, listed
/// so that someone can look.
pub fn unrecorded(partitions: &[VolumeObserved], recorded: &[Record<'_>]) -> Vec<String> {
    partitions
        .iter()
        .filter(|p| !recorded.iter().any(|r| r.names(p)))
        .map(|p| p.name.clone())
        .collect()
}

/// What disk pool `pool`'s status on node `node` says of its partitions (`partitions`, as
/// libvirt lists them) that no Volume recorded, given every Volume known (`volumes`; those
/// held by `node` in `pool` count). A partition a Volume is making right now (`Creating`,
/// its name recorded, no key yet) is not listed: it is recorded a moment later, or, if the
/// agent stopped in between, listed once that Volume has another. `None`: there are none.
/// At most [`UNRECORDED_PARTITIONS_SHOWN`] names, in partition-number order; `count` says
/// how many there are.
pub fn unrecorded_summary<'a>(
    partitions: &[VolumeObserved],
    volumes: impl IntoIterator<Item = &'a Volume>,
    pool: &str,
    node: &str,
) -> Option<UnrecordedPartitions> {
    let mut recorded = Vec::new();
    let mut making = Vec::new();
    for v in volumes {
        let Some(status) = v.status.as_ref() else {
            continue;
        };
        if v.spec.pool != pool || status.node_name.as_deref() != Some(node) {
            continue;
        }
        match (&status.key, &status.volume_name) {
            (Some(key), _) => recorded.push(Record {
                key,
                extent: status.partition.as_ref(),
            }),
            (None, Some(name)) if status.phase == Some(VolumePhase::Creating) => {
                making.push(name.as_str())
            }
            _ => {}
        }
    }
    let mut left: Vec<String> = unrecorded(partitions, &recorded)
        .into_iter()
        .filter(|n| !making.contains(&n.as_str()))
        .collect();
    if left.is_empty() {
        return None;
    }
    // `sdb2` before `sdb10`.
    left.sort_by(|a, b| (a.len(), a).cmp(&(b.len(), b)));
    let count = u32::try_from(left.len()).unwrap_or(u32::MAX);
    left.truncate(UNRECORDED_PARTITIONS_SHOWN);
    Some(UnrecordedPartitions { count, names: left })
}

/// The partition a Domain's disk on Volume `vol` (`display` as `namespace/name`) is, on node
/// `node`, among the partitions of its disk pool `pool` (`others`: what the other Volumes
/// held by this node recorded there). Only the partition whose key (and extent) the Volume
/// recorded, and only on the node that holds the Volume (a key is a path such as
/// `/dev/sdb2`: the same path on another node is another partition). `Err`: why the disk is
/// not attached: `VolumeNotReady` while there is no record here yet (the Domain waits for
/// the Volume), `PartitionMissing` when the recorded partition is gone, `PartitionReplaced`
/// when another partition lies under its key, `PartitionRecordedTwice` when another Volume
/// records it too.
pub fn for_domain(
    vol: &Volume,
    display: &str,
    node: &str,
    pool: &str,
    partitions: &[VolumeObserved],
    others: &[OtherRecord],
) -> Result<String, Refusal> {
    let status = vol.status.as_ref();
    let not_ready = refusal("VolumeNotReady");
    match status.and_then(|s| s.node_name.as_deref()) {
        Some(holder) if holder == node => {}
        Some(holder) => {
            return Err(not_ready(format!(
                "Volume {display} is held by node {holder}, not {node}: a partition of disk pool {pool} is attached only on the node that recorded it"
            )));
        }
        None => {
            return Err(not_ready(format!(
                "Volume {display} is not bound to a node yet: its partition in disk pool {pool} is made once it is"
            )));
        }
    }
    let Some(record) = record_of(vol) else {
        return Err(not_ready(format!(
            "Volume {display} has no partition recorded in disk pool {pool} on node {node} yet: the Domain waits for it"
        )));
    };
    let key = record.key;
    let found = match under(partitions, record) {
        Under::Recorded(found) => found,
        Under::Replaced(found) => {
            let whose = format!("Volume {display}");
            return Err(replaced(&whose, record, found, pool));
        }
        Under::Gone => {
            return Err(refusal("PartitionMissing")(format!(
                "the partition Volume {display} recorded (key {key}) is gone from disk pool {pool} on node {node}: it was removed outside virtkube, and no other partition is attached in its place; delete the Volume and create it again for a new, empty one"
            )));
        }
    };
    if let Some(r) = conflict(
        &Partition::Recorded(found.name.clone()),
        Some(found),
        others,
    ) {
        return Err(r);
    }
    Ok(found.name.clone())
}

/// The partition a clone in a disk pool copies: the one its source Volume (`source`,
/// `display` as `namespace/name`) recorded, among `partitions`. A source that recorded none
/// yet is waited for; a partition nobody recorded, or another under the source's recorded
/// key (`PartitionReplaced`), is never copied.
pub fn source_of(
    source: &Volume,
    display: &str,
    pool: &str,
    partitions: &[VolumeObserved],
) -> Result<String, Refusal> {
    let Some(record) = record_of(source) else {
        return Err(Refusal {
            reason: "SourceNotReady",
            message: format!(
                "spec.source.volume: Volume {display} has no partition recorded in disk pool {pool} yet: the clone is made once it has"
            ),
        });
    };
    let key = record.key;
    match under(partitions, record) {
        Under::Recorded(p) => Ok(p.name.clone()),
        Under::Replaced(p) => {
            let whose = format!("Volume {display}");
            let why = replaced(&whose, record, p, pool);
            Err(Refusal {
                message: format!("spec.source.volume: {}", why.message),
                ..why
            })
        }
        Under::Gone => Err(Refusal {
            reason: "SourceNotReady",
            message: format!(
                "spec.source.volume: the partition Volume {display} recorded (key {key}) is not in disk pool {pool}"
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use virtkube_crds::volume::{VolumePhase, VolumeStatus};

    fn volume(status: Option<VolumeStatus>, adopt: Option<&str>) -> Volume {
        let mut v: Volume = serde_json::from_value(json!({
            "apiVersion": "virtkube.io/v1alpha1", "kind": "Volume",
            "metadata": { "name": "data", "namespace": "team", "uid": "uid-1" },
            "spec": { "pool": "disk", "capacity": "10M", "format": "raw" }
        }))
        .unwrap();
        v.status = status;
        if let Some(a) = adopt {
            v.metadata.annotations =
                Some([(ADOPT_IMAGE_ANNOTATION.to_string(), a.to_string())].into());
        }
        v
    }

    /// Partition `sdb{n}`: 10 MiB at MiB `n * 10 + 1`.
    fn part(n: u32) -> VolumeObserved {
        VolumeObserved {
            name: format!("sdb{n}"),
            pool: "disk".into(),
            key: format!("/dev/sdb{n}"),
            path: format!("/dev/sdb{n}"),
            capacity: 10 << 20,
            allocation: 10 << 20,
            format: None,
            backing: None,
            extent: Some(extent(n)),
        }
    }

    fn extent(n: u32) -> PartitionExtent {
        let start = (u64::from(n) * 10 + 1) << 20;
        PartitionExtent {
            start,
            end: start + (10 << 20),
        }
    }

    /// `sdb{n}` removed by hand and another made under its number, at `start_mib`.
    fn remade(n: u32, start_mib: u64) -> VolumeObserved {
        VolumeObserved {
            extent: Some(PartitionExtent {
                start: start_mib << 20,
                end: (start_mib + 4) << 20,
            }),
            capacity: 4 << 20,
            allocation: 4 << 20,
            ..part(n)
        }
    }

    /// The status of a Volume that recorded `sdb{n}` (with its extent when `extent`).
    fn recorded_at(n: u32, extent_recorded: bool) -> Option<VolumeStatus> {
        Some(VolumeStatus {
            partition: extent_recorded.then(|| extent(n)),
            node_name: Some("node-a".into()),
            ..recorded(
                Some(&format!("/dev/sdb{n}")),
                Some(&format!("sdb{n}")),
                VolumePhase::Available,
            )
            .unwrap_or_default()
        })
    }

    fn recorded(key: Option<&str>, name: Option<&str>, phase: VolumePhase) -> Option<VolumeStatus> {
        Some(VolumeStatus {
            key: key.map(Into::into),
            volume_name: name.map(Into::into),
            phase: Some(phase),
            ..VolumeStatus::default()
        })
    }

    #[test]
    fn a_volume_takes_only_the_partition_it_recorded() {
        let parts = [part(1), part(2), part(3)];
        let v = volume(
            recorded(Some("/dev/sdb2"), Some("sdb2"), VolumePhase::Available),
            None,
        );
        assert_eq!(
            choose(&v, "disk", "/dev/sdb", "gpt", &parts),
            Ok(Partition::Recorded("sdb2".into()))
        );
        // Gone outside virtkube: reported, nothing new made under its record.
        let gone = choose(&v, "disk", "/dev/sdb", "gpt", &[part(1), part(3)]).unwrap_err();
        assert_eq!(gone.reason, "PartitionMissing");
        assert!(
            gone.message.contains("key /dev/sdb2") && gone.message.contains("removed outside"),
            "{gone:?}"
        );
    }

    #[test]
    fn an_interrupted_creation_names_nothing_and_the_next_number_is_taken() {
        // `Creating` recorded with sdb2, which was made but never recorded (the agent
        // crashed): sdb2 is left alone, unrecorded; the Volume gets sdb3.
        let v = volume(recorded(None, Some("sdb2"), VolumePhase::Creating), None);
        assert_eq!(
            choose(&v, "disk", "/dev/sdb", "gpt", &[part(1), part(2)]),
            Ok(Partition::Next("sdb3".into()))
        );
        // Freed numbers are taken again, as parted does.
        assert_eq!(
            choose(&v, "disk", "/dev/sdb", "gpt", &[part(1), part(3)]),
            Ok(Partition::Next("sdb2".into()))
        );
        let four = [part(1), part(2), part(3), part(4)];
        let full = choose(&v, "disk", "/dev/sdb", "dos", &four).unwrap_err();
        assert_eq!(full.reason, "PartitionTableFull");
        assert!(
            full.message.contains("no free partition number"),
            "{full:?}"
        );
        assert_eq!(
            choose(&v, "disk", "/dev/sdb", "gpt", &four),
            Ok(Partition::Next("sdb5".into()))
        );
    }

    #[test]
    fn adopting_names_a_partition_by_key_or_path() {
        let parts = [part(1), part(2)];
        let by_key = volume(None, Some("/dev/sdb2"));
        assert_eq!(
            choose(&by_key, "disk", "/dev/sdb", "gpt", &parts),
            Ok(Partition::Adopt("sdb2".into()))
        );
        let missing = volume(None, Some("/dev/sdb9"));
        let why = choose(&missing, "disk", "/dev/sdb", "gpt", &parts).unwrap_err();
        assert_eq!(why.reason, "AdoptMissing");
        assert!(why.message.contains("nothing adopted"), "{why:?}");
    }

    #[test]
    fn a_partition_is_never_taken_for_two_volumes() {
        let other = |key: &str, name: &str| OtherRecord {
            volume: "team/other".into(),
            key: key.into(),
            extent: None,
            name: Some(name.into()),
        };
        // sdb2 removed outside virtkube, a new sdb2 made for team/other: this Volume's
        // record names the same key, and neither touches it.
        let twice = conflict(
            &Partition::Recorded("sdb2".into()),
            Some(&part(2)),
            &[other("/dev/sdb2", "sdb2")],
        )
        .unwrap();
        assert_eq!(twice.reason, "PartitionRecordedTwice");
        assert!(twice.message.contains("team/other"), "{twice:?}");
        // The next number is one another Volume still records: nothing is made.
        let next = conflict(
            &Partition::Next("sdb3".into()),
            None,
            &[other("/dev/sdb3", "sdb3")],
        )
        .unwrap();
        assert_eq!(next.reason, "PartitionNumberRecorded");
        assert_eq!(
            conflict(
                &Partition::Next("sdb4".into()),
                None,
                &[other("/dev/sdb3", "sdb3")]
            ),
            None
        );
        let parts = [part(1), part(2), part(3)];
        let keys = |keys: &[&'static str]| -> Vec<Record<'static>> {
            keys.iter()
                .map(|&key| Record { key, extent: None })
                .collect()
        };
        assert_eq!(
            unrecorded(&parts, &keys(&["/dev/sdb1", "/dev/sdb3"])),
            ["sdb2".to_string()]
        );
    }

    #[test]
    fn a_clone_copies_only_the_partition_its_source_recorded() {
        let parts = [part(1), part(2)];
        let source = volume(
            recorded(Some("/dev/sdb2"), Some("sdb2"), VolumePhase::Available),
            None,
        );
        assert_eq!(
            source_of(&source, "team/data", "disk", &parts),
            Ok("sdb2".to_string())
        );
        // Still being made (a name, no key): nothing to copy yet.
        let making = volume(recorded(None, Some("sdb1"), VolumePhase::Creating), None);
        let wait = source_of(&making, "team/data", "disk", &parts).unwrap_err();
        assert_eq!(wait.reason, "SourceNotReady");
        let gone = volume(
            recorded(Some("/dev/sdb7"), Some("sdb7"), VolumePhase::Available),
            None,
        );
        assert_eq!(
            source_of(&gone, "team/data", "disk", &parts)
                .unwrap_err()
                .reason,
            "SourceNotReady"
        );
    }

    #[test]
    fn a_domain_disk_is_the_partition_its_volume_recorded_on_the_holding_node() {
        let parts = [part(1), part(2), part(3)];
        let held = |key: Option<&str>, node: Option<&str>| {
            let mut status = recorded(key, key.map(|_| "sdb2"), VolumePhase::Available);
            if let Some(s) = status.as_mut() {
                s.node_name = node.map(Into::into);
            }
            volume(status, None)
        };
        let attach = |v: &Volume, parts: &[VolumeObserved], others: &[OtherRecord]| {
            for_domain(v, "team/data", "node-a", "disk", parts, others)
        };
        // Found by its recorded key, whatever name the record keeps.
        let v = held(Some("/dev/sdb2"), Some("node-a"));
        assert_eq!(attach(&v, &parts, &[]), Ok("sdb2".to_string()));
        // No record yet, or not bound, or held by another node (the same path there is
        // another partition): the Domain waits.
        for (waiting, says) in [
            (held(None, Some("node-a")), "no partition recorded"),
            (held(Some("/dev/sdb2"), None), "not bound to a node yet"),
            (
                held(Some("/dev/sdb2"), Some("node-b")),
                "held by node node-b",
            ),
        ] {
            let why = attach(&waiting, &parts, &[]).unwrap_err();
            assert_eq!(why.reason, "VolumeNotReady", "{why:?}");
            assert!(why.message.contains(says), "{why:?}");
        }
        // The recorded partition gone: reported, and not even a partition of the same name
        // made since (another key) is taken.
        let renamed = [
            part(1),
            VolumeObserved {
                key: "/dev/disk/by-id/x-part2".into(),
                ..part(2)
            },
        ];
        let gone = attach(&v, &renamed, &[]).unwrap_err();
        assert_eq!(gone.reason, "PartitionMissing");
        assert!(
            gone.message.contains("key /dev/sdb2") && gone.message.contains("no other partition"),
            "{gone:?}"
        );
        // Another Volume records the same partition: attached for neither.
        let other = OtherRecord {
            volume: "team/other".into(),
            key: "/dev/sdb2".into(),
            extent: None,
            name: Some("sdb2".into()),
        };
        let twice = attach(&v, &parts, &[other]).unwrap_err();
        assert_eq!(twice.reason, "PartitionRecordedTwice");
        assert!(twice.message.contains("team/other"), "{twice:?}");
    }

    #[test]
    fn a_partition_remade_under_a_recorded_key_is_nobody_s() {
        // sdb2 recorded at its extent, removed by hand, another sdb2 made at MiB 40: the
        // same key (path), other bytes. Whatever asks, it is not the Volume's.
        let parts = [part(1), remade(2, 40), part(3)];
        let v = volume(recorded_at(2, true), None);
        let says_replaced = |r: Refusal| {
            assert_eq!(r.reason, "PartitionReplaced", "{r:?}");
            for words in [
                "key /dev/sdb2",
                "bytes 22020096-32505856",
                "now lies at bytes 41943040-46137344",
                "does not attach, clone from or delete it",
            ] {
                assert!(r.message.contains(words), "{words}: {r:?}");
            }
        };
        says_replaced(choose(&v, "disk", "/dev/sdb", "gpt", &parts).unwrap_err());
        says_replaced(for_domain(&v, "team/data", "node-a", "disk", &parts, &[]).unwrap_err());
        let clone = source_of(&v, "team/data", "disk", &parts).unwrap_err();
        assert!(
            clone.message.starts_with("spec.source.volume: "),
            "{clone:?}"
        );
        says_replaced(clone);
        says_replaced(check_identity(&v, "disk", &parts[1]).unwrap_err());
        // Neither is it listed as recorded: it shows among the pool's unrecorded ones.
        let volumes = [v.clone()];
        assert_eq!(
            unrecorded_summary(&parts, &volumes, "disk", "node-a").map(|u| u.names),
            Some(vec![
                "sdb1".to_string(),
                "sdb2".to_string(),
                "sdb3".to_string()
            ])
        );
        // Without extent libvirt reports, a recorded extent is not proven: refused too.
        let blind = [VolumeObserved {
            extent: None,
            ..part(2)
        }];
        let r = choose(&v, "disk", "/dev/sdb", "gpt", &blind).unwrap_err();
        assert_eq!(r.reason, "PartitionReplaced");
        assert!(
            r.message.contains("now lies at no extent libvirt reports"),
            "{r:?}"
        );

        // At its recorded extent it is the Volume's, by every path.
        let intact = [part(1), part(2), part(3)];
        assert_eq!(
            choose(&v, "disk", "/dev/sdb", "gpt", &intact),
            Ok(Partition::Recorded("sdb2".into()))
        );
        assert_eq!(
            for_domain(&v, "team/data", "node-a", "disk", &intact, &[]),
            Ok("sdb2".to_string())
        );
        assert_eq!(
            source_of(&v, "team/data", "disk", &intact),
            Ok("sdb2".to_string())
        );
        assert_eq!(check_identity(&v, "disk", &intact[1]), Ok(()));
        assert_eq!(
            unrecorded_summary(&intact, &volumes, "disk", "node-a").map(|u| u.names),
            Some(vec!["sdb1".to_string(), "sdb3".to_string()])
        );
    }

    #[test]
    fn a_record_without_an_extent_keeps_taking_its_key_alone() {
        // Recorded by an older agent: the key decides, as before (the agent records the
        // extent at the next reconcile that finds the partition).
        let v = volume(recorded_at(2, false), None);
        let parts = [part(1), remade(2, 40)];
        assert_eq!(
            choose(&v, "disk", "/dev/sdb", "gpt", &parts),
            Ok(Partition::Recorded("sdb2".into()))
        );
        assert_eq!(
            for_domain(&v, "team/data", "node-a", "disk", &parts, &[]),
            Ok("sdb2".to_string())
        );
        assert_eq!(check_identity(&v, "disk", &parts[1]), Ok(()));
        // A partition of another key is never its, and no record at all claims nothing.
        assert_eq!(check_identity(&v, "disk", &parts[0]), Ok(()));
        assert_eq!(record_of(&volume(None, None)), None);
        let gone = choose(&v, "disk", "/dev/sdb", "gpt", &[part(1)]).unwrap_err();
        assert_eq!(gone.reason, "PartitionMissing");
    }

    #[test]
    fn another_volume_s_record_claims_only_a_partition_at_its_extent() {
        let other = |extent: Option<PartitionExtent>| OtherRecord {
            volume: "team/other".into(),
            key: "/dev/sdb2".into(),
            extent,
            name: Some("sdb2".into()),
        };
        let new = remade(2, 40);
        let adopt = Partition::Adopt("sdb2".into());
        // team/other recorded sdb2 at its old extent: the sdb2 made since is not its, so it
        // can be adopted; a record without an extent, or at this extent, claims it.
        assert_eq!(
            conflict(&adopt, Some(&new), &[other(Some(extent(2)))]),
            None
        );
        for claiming in [None, new.extent] {
            let twice = conflict(&adopt, Some(&new), &[other(claiming)]).unwrap();
            assert_eq!(twice.reason, "PartitionRecordedTwice", "{claiming:?}");
        }
        // The partition a choice names, for the check above.
        let parts = [part(1), new.clone()];
        assert_eq!(chosen_partition(&adopt, &parts), Some(&new));
        assert_eq!(
            chosen_partition(&Partition::Next("sdb3".into()), &parts),
            None
        );
        // A replaced record among the others hides nothing: the new partition is listed.
        let recorded = [other(Some(extent(2)))];
        let records: Vec<Record> = recorded.iter().map(OtherRecord::record).collect();
        assert_eq!(unrecorded(&parts, &records), ["sdb1", "sdb2"]);
    }

    #[test]
    fn unrecorded_partitions_are_summed_up_bounded_and_without_those_being_made() {
        let on = |name: &str, pool: &str, node: &str, status: Option<VolumeStatus>| {
            let mut v = volume(
                status.map(|s| VolumeStatus {
                    node_name: Some(node.into()),
                    ..s
                }),
                None,
            );
            v.metadata.name = Some(name.into());
            v.spec.pool = pool.into();
            v
        };
        let parts: Vec<VolumeObserved> = (1..=12).map(part).collect();
        let volumes = [
            // sdb1 recorded here; sdb2 is being made; sdb3's record is another node's or
            // another pool's (the same path there is not this partition).
            on(
                "a",
                "disk",
                "node-a",
                recorded(Some("/dev/sdb1"), Some("sdb1"), VolumePhase::Available),
            ),
            on(
                "b",
                "disk",
                "node-a",
                recorded(None, Some("sdb2"), VolumePhase::Creating),
            ),
            on(
                "c",
                "disk",
                "node-b",
                recorded(Some("/dev/sdb3"), Some("sdb3"), VolumePhase::Available),
            ),
            on(
                "d",
                "other",
                "node-a",
                recorded(Some("/dev/sdb3"), Some("sdb3"), VolumePhase::Available),
            ),
            // A name kept after a failure that is not `Creating` hides nothing.
            on(
                "e",
                "disk",
                "node-a",
                recorded(None, Some("sdb4"), VolumePhase::Pending),
            ),
        ];
        let summary = unrecorded_summary(&parts, &volumes, "disk", "node-a").unwrap();
        assert_eq!(summary.count, 10, "sdb3..sdb12: {summary:?}");
        assert_eq!(
            summary.names,
            [
                "sdb3", "sdb4", "sdb5", "sdb6", "sdb7", "sdb8", "sdb9", "sdb10"
            ],
            "the first {UNRECORDED_PARTITIONS_SHOWN} by number"
        );
        // Every partition recorded or being made: nothing to say.
        assert_eq!(
            unrecorded_summary(&parts[..2], &volumes, "disk", "node-a"),
            None
        );
    }
}
