//! Which image in a pool is a Volume's own.
//!
//! libvirt keeps no metadata on volumes, so the record lives with the resource: the Volume's
//! `status.key` is the key of the image the agent made (or adopted) for it, and its status is
//! written only by the agent, for this one object (a new Volume of the same namespace and
//! name, with a new UID, starts with an empty status). Between asking libvirt for the image
//! and recording its key the agent may crash: the status says `phase: Creating` before the
//! image is asked for, so an image found under the Volume's name while that phase is recorded
//! (and no key yet) is the one it made.
//!
//! Anything else under the Volume's libvirt name — an image retained when an earlier Volume
//! was deleted, one made outside virtkube — is never taken over silently: adopting it is an
//! explicit act, the annotation [`ADOPT_IMAGE_ANNOTATION`] naming the image's key or path.

use virtkube_crds::Volume;
use virtkube_crds::volume::{ADOPT_IMAGE_ANNOTATION, TransferState, VolumePhase};

use crate::plan::observed::ObservedVolume;

/// What a Volume may do with the image found under its libvirt name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageClaim {
    /// No image there: the agent makes one (recording `Creating` first).
    Absent,
    /// The Volume's own image: its key is recorded, or the agent was making it.
    Ours,
    /// Not its own yet, but the annotation names exactly this image: adopt it (record its key).
    Adopt,
    /// The copy libvirt made on this node when the Volume's Domain live-migrated here with
    /// its disk copied, now that the Volume was handed over to this node: record its key.
    MovedHere,
    /// Not the Volume's, and not to be taken: the reason, with how to proceed.
    Refused(String),
}

/// The decision for `vol` and the image under its name in its pool (`None`: no image).
pub fn claim(vol: &Volume, image: Option<&ObservedVolume>) -> ImageClaim {
    let status = vol.status.as_ref();
    let recorded = status.and_then(|s| s.key.as_deref());
    let creating = status.and_then(|s| s.phase) == Some(VolumePhase::Creating);
    let adopt = vol
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ADOPT_IMAGE_ANNOTATION))
        .map(String::as_str);
    // A handover to this node: the source removed its image and its key, and the controller
    // bound the Volume here. The image under the Volume's name is the one libvirt created and
    // QEMU mirrored during the migration (libvirt reuses an existing one and overwrites it).
    let moved_here = status
        .and_then(|s| s.transfer.as_ref().map(|t| (t, s.node_name.as_deref())))
        .is_some_and(|(t, holder)| {
            t.state == TransferState::SourceRemoved && holder == Some(t.target_node.as_str())
        });
    if moved_here && recorded.is_none() {
        return match image {
            Some(_) => ImageClaim::MovedHere,
            None => ImageClaim::Refused(format!(
                "the volume was handed over to this node with its Domain's live migration, but pool {} holds no image named {}: the copy is missing, and virtkube does not make an empty one in its place",
                vol.spec.pool,
                image_name(vol)
            )),
        };
    }
    let Some(image) = image else {
        return match (adopt, recorded) {
            (Some(wanted), None) => ImageClaim::Refused(format!(
                "annotation {ADOPT_IMAGE_ANNOTATION} asks to adopt {wanted}, but pool {} holds no image named {}: nothing to adopt; remove the annotation to make a new, empty image",
                vol.spec.pool,
                image_name(vol)
            )),
            _ => ImageClaim::Absent,
        };
    };
    match recorded {
        Some(key) if key == image.key => return ImageClaim::Ours,
        Some(key) => {
            return ImageClaim::Refused(format!(
                "the image {} in pool {} has key {}, not the key {key} of the image this Volume made: it was replaced outside virtkube, and virtkube leaves it alone",
                image_name(vol),
                vol.spec.pool,
                image.key
            ));
        }
        None if creating => return ImageClaim::Ours,
        None => {}
    }
    match adopt {
        Some(wanted) if wanted == image.key || wanted == image.path => ImageClaim::Adopt,
        Some(wanted) => ImageClaim::Refused(format!(
            "annotation {ADOPT_IMAGE_ANNOTATION} names {wanted}, but the image {} in pool {} has key {} and path {}: nothing adopted; set the annotation to one of them",
            image_name(vol),
            vol.spec.pool,
            image.key,
            image.path
        )),
        None => ImageClaim::Refused(format!(
            "an image named {} already exists in pool {} (key {}): retained from an earlier Volume or made outside virtkube, it is not this Volume's, and virtkube does not take it over silently. To use its data, annotate this Volume {ADOPT_IMAGE_ANNOTATION}={}; otherwise delete that image or choose another name",
            image_name(vol),
            vol.spec.pool,
            image.key,
            image.key
        )),
    }
}

fn image_name(vol: &Volume) -> String {
    virtkube_crds::names::host_name(
        vol.metadata.namespace.as_deref(),
        vol.metadata.name.as_deref().unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use virtkube_crds::volume::VolumeStatus;

    fn volume(status: Option<VolumeStatus>, adopt: Option<&str>) -> Volume {
        let mut v: Volume = serde_json::from_value(json!({
            "apiVersion": "virtkube.io/v1alpha1", "kind": "Volume",
            "metadata": { "name": "disk", "namespace": "team", "uid": "uid-2" },
            "spec": { "pool": "images", "capacity": "1Gi" }
        }))
        .unwrap();
        v.status = status;
        if let Some(a) = adopt {
            v.metadata.annotations =
                Some([(ADOPT_IMAGE_ANNOTATION.to_string(), a.to_string())].into());
        }
        v
    }

    fn image() -> ObservedVolume {
        ObservedVolume {
            owned: true,
            key: "/pools/images/team.disk".into(),
            path: "/pools/images/team.disk".into(),
            capacity: 1 << 30,
            allocation: 0,
            format: None,
            backing_path: None,
        }
    }

    fn recorded(key: Option<&str>, phase: Option<VolumePhase>) -> Option<VolumeStatus> {
        Some(VolumeStatus {
            key: key.map(Into::into),
            phase,
            ..VolumeStatus::default()
        })
    }

    #[test]
    fn a_volume_handed_over_takes_the_copy_and_never_makes_an_empty_one() {
        use virtkube_crds::volume::{TransferState, VolumeTransfer};
        let handed = |state, holder: &str| {
            Some(VolumeStatus {
                node_name: Some(holder.into()),
                transfer: Some(VolumeTransfer {
                    domain: "vm".into(),
                    source_node: "a".into(),
                    target_node: "b".into(),
                    state,
                }),
                ..VolumeStatus::default()
            })
        };
        let v = volume(handed(TransferState::SourceRemoved, "b"), None);
        assert_eq!(claim(&v, Some(&image())), ImageClaim::MovedHere);
        assert!(
            matches!(claim(&v, None), ImageClaim::Refused(m) if m.contains("the copy is missing"))
        );
        // Not bound here yet, or not that far: an image of the name is not taken.
        for (state, holder) in [
            (TransferState::SourceRemoved, "a"),
            (TransferState::Copying, "a"),
            (TransferState::Copied, "a"),
        ] {
            let v = volume(handed(state, holder), None);
            assert!(
                matches!(claim(&v, Some(&image())), ImageClaim::Refused(_)),
                "{state:?}"
            );
        }
    }

    #[test]
    fn a_new_volume_never_inherits_an_image_of_the_same_name() {
        let claim = claim(&volume(None, None), Some(&image()));
        let ImageClaim::Refused(why) = claim else {
            panic!("{claim:?}")
        };
        assert!(
            why.contains("virtkube.io/adopt-image=/pools/images/team.disk"),
            "{why}"
        );
        // A status recording nothing, still Pending, is no claim either.
        assert!(matches!(
            super::claim(
                &volume(recorded(None, Some(VolumePhase::Pending)), None),
                Some(&image())
            ),
            ImageClaim::Refused(_)
        ));
    }

    #[test]
    fn the_recorded_key_or_the_creating_phase_make_it_ours() {
        let key = "/pools/images/team.disk";
        assert_eq!(
            claim(
                &volume(recorded(Some(key), Some(VolumePhase::Available)), None),
                Some(&image())
            ),
            ImageClaim::Ours
        );
        assert_eq!(
            claim(
                &volume(recorded(None, Some(VolumePhase::Creating)), None),
                Some(&image())
            ),
            ImageClaim::Ours
        );
        assert!(matches!(
            claim(
                &volume(recorded(Some("/elsewhere"), None), None),
                Some(&image())
            ),
            ImageClaim::Refused(_)
        ));
        assert_eq!(
            claim(&volume(recorded(Some(key), None), None), None),
            ImageClaim::Absent
        );
    }

    #[test]
    fn adopting_is_explicit_and_exact() {
        assert_eq!(
            claim(
                &volume(None, Some("/pools/images/team.disk")),
                Some(&image())
            ),
            ImageClaim::Adopt
        );
        let ImageClaim::Refused(why) =
            claim(&volume(None, Some("/pools/images/other")), Some(&image()))
        else {
            panic!("a wrong key adopts nothing")
        };
        assert!(why.contains("nothing adopted"), "{why}");
        let ImageClaim::Refused(why) = claim(&volume(None, Some("/pools/images/team.disk")), None)
        else {
            panic!("nothing to adopt is refused, not silently made empty")
        };
        assert!(why.contains("nothing to adopt"), "{why}");
    }
}
