//! What is never deleted, checked on the planner alone (the decision `virtkube delete` and
//! `apply --prune` make, and the agent's deletions go through): an image that anything on
//! the node uses through any copy-on-write chain stays — used by a domain whose disk is it or
//! an overlay built on it (however deep, whoever made the domain, running or only defined),
//! or by another volume built on it (retained, foreign, or in another pool). Deletions that
//! may go run top-down: overlays before the images under them.

use virtkube::plan::desired::{DesiredState, Nodes};
use virtkube::plan::observed::{DiskRef, ObservedState, ObservedVolume, PowerObserved};
use virtkube::plan::{self, NoticeKind, ObjectKind, Op, Plan, PlanOptions, simulate};
use virtkube_crds::manifest;

const POOL: &str = r#"
apiVersion: virtkube.io/v1alpha1
kind: StoragePool
metadata: {name: images}
spec: {type: dir, target: {path: /pools/images}}
"#;

fn volume(name: &str, policy: &str, backing: Option<&str>) -> String {
    let source = backing
        .map(|b| format!(", source: {{backingVolume: {b}}}"))
        .unwrap_or_default();
    format!(
        "---\napiVersion: virtkube.io/v1alpha1\nkind: Volume\nmetadata: {{name: {name}, namespace: team}}\nspec: {{pool: images, capacity: 1Gi, reclaimPolicy: {policy}{source}}}\n"
    )
}

const VM_ON_TOP: &str = r#"---
apiVersion: virtkube.io/v1alpha1
kind: Domain
metadata: {name: vm, namespace: team}
spec:
  memory: {size: 128Mi}
  disks: [{name: root, volume: top}]
"#;

fn load(text: &str) -> DesiredState {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.yaml");
    std::fs::write(&path, text).unwrap();
    let manifests = manifest::load(&[path]).unwrap();
    let (d, notices) = DesiredState::from_manifests(&manifests, &Nodes::single("a"));
    assert!(notices.is_empty(), "{notices:?}");
    d
}

/// Host `a` after applying `text` to an empty host.
fn converged(text: &str) -> ObservedState {
    let mut o = ObservedState::default();
    o.host_mut("a");
    let p = plan::plan(&load(text), &o, &PlanOptions::default());
    simulate::apply(&mut o, &p).unwrap();
    assert!(plan::plan(&load(text), &o, &PlanOptions::default()).is_empty());
    o
}

fn deleted_volumes(p: &Plan) -> Vec<&str> {
    p.actions
        .iter()
        .filter(|a| matches!(a.op, Op::DeleteVolume { .. }))
        .map(|a| a.object.name.as_str())
        .collect()
}

fn blocked_message<'a>(p: &'a Plan, name: &str) -> &'a str {
    p.notices
        .iter()
        .find(|n| n.kind == NoticeKind::Blocked && n.object.name == name)
        .map(|n| n.message.as_str())
        .unwrap_or_else(|| panic!("no blocked notice for {name}:\n{}", p.render(false)))
}

#[test]
fn a_base_under_an_overlay_that_stays_is_kept_however_deep_the_chain() {
    // base <- mid <- top; `virtkube delete` names base and mid, top stays.
    let all = format!(
        "{POOL}{}{}{}",
        volume("base", "Delete", None),
        volume("mid", "Delete", Some("base")),
        volume("top", "Delete", Some("mid"))
    );
    let observed = converged(&all);
    let doomed = load(&format!(
        "{}{}",
        volume("base", "Delete", None),
        volume("mid", "Delete", Some("base"))
    ));
    let p = plan::plan_delete(&doomed, &observed);
    assert!(deleted_volumes(&p).is_empty(), "{}", p.render(false));
    assert!(blocked_message(&p, "team.base").contains("team/top"));
    assert!(blocked_message(&p, "team.mid").contains("team/top"));
}

#[test]
fn a_retained_overlay_keeps_the_image_it_is_built_on() {
    let all = format!(
        "{POOL}{}{}",
        volume("base", "Delete", None),
        volume("ov", "Retain", Some("base"))
    );
    let observed = converged(&all);
    let p = plan::plan_delete(&load(&all), &observed);
    assert!(deleted_volumes(&p).is_empty(), "{}", p.render(false));
    assert!(
        p.notices
            .iter()
            .any(|n| n.kind == NoticeKind::Retained && n.object.name == "team.ov")
    );
    assert!(blocked_message(&p, "team.base").contains("team/ov"));
}

#[test]
fn a_domain_on_an_overlay_keeps_every_image_under_it() {
    let all = format!(
        "{POOL}{}{}{}{VM_ON_TOP}",
        volume("base", "Delete", None),
        volume("mid", "Delete", Some("base")),
        volume("top", "Delete", Some("mid"))
    );
    let observed = converged(&all);
    // Delete only the volumes: the domain stays, so none of its chain may go.
    let p = plan::plan_delete(
        &load(&format!(
            "{}{}{}",
            volume("base", "Delete", None),
            volume("mid", "Delete", Some("base")),
            volume("top", "Delete", Some("mid"))
        )),
        &observed,
    );
    assert!(deleted_volumes(&p).is_empty(), "{}", p.render(false));
    assert!(blocked_message(&p, "team.base").contains("Domain team/vm"));
}

#[test]
fn a_foreign_domain_on_a_file_overlay_keeps_the_base_running_or_not() {
    let all = format!("{POOL}{}", volume("base", "Delete", None));
    for power in [PowerObserved::Running, PowerObserved::Shutoff] {
        let mut observed = converged(&format!("{all}{VM_ON_TOP}").replace("top", "base"));
        let host = observed.hosts.get_mut("a").unwrap();
        let mut legacy = host.domains.remove("team.vm").unwrap();
        legacy.owner = None;
        legacy.power = power;
        // Its disk is a file outside any pool, an overlay whose backing file is base's image
        // (written relative to the overlay, as qemu-img allows).
        legacy.disks[0].source = DiskRef::Path("/pools/images/sub/legacy.qcow2".into());
        legacy.disks[0].chain = vec!["../team.base".into()];
        host.domains.insert("legacy".into(), legacy);
        let p = plan::plan_delete(&load(&all), &observed);
        assert!(
            deleted_volumes(&p).is_empty(),
            "{power:?}: {}",
            p.render(false)
        );
        let why = blocked_message(&p, "team.base");
        assert!(why.contains("legacy"), "{why}");
        assert!(why.contains("not virtkube's"), "{why}");
    }
}

#[test]
fn a_foreign_overlay_in_another_pool_keeps_the_base() {
    let all = format!("{POOL}{}", volume("base", "Delete", None));
    let mut observed = converged(&all);
    let host = observed.hosts.get_mut("a").unwrap();
    let base = host.volumes[&("images".to_string(), "team.base".to_string())].clone();
    let mut other_pool = host.pools["images"].clone();
    other_pool.owner = None;
    host.pools.insert("default".into(), other_pool);
    host.volumes.insert(
        ("default".into(), "scratch.qcow2".into()),
        ObservedVolume {
            owned: false,
            key: "/var/lib/libvirt/images/scratch.qcow2".into(),
            path: "/var/lib/libvirt/images/scratch.qcow2".into(),
            backing_path: Some(base.path.clone()),
            ..base
        },
    );
    let p = plan::plan_delete(&load(&all), &observed);
    assert!(deleted_volumes(&p).is_empty(), "{}", p.render(false));
    assert!(blocked_message(&p, "team.base").contains("default/scratch.qcow2"));
}

#[test]
fn a_whole_chain_deleted_together_goes_top_down() {
    // Listed bottom-up in the manifest on purpose.
    let all = format!(
        "{POOL}{}{}{}{VM_ON_TOP}",
        volume("base", "Delete", None),
        volume("mid", "Delete", Some("base")),
        volume("top", "Delete", Some("mid"))
    );
    let observed = converged(&all);
    let p = plan::plan_delete(&load(&all), &observed);
    let id = |name: &str, kind: ObjectKind| {
        p.actions
            .iter()
            .find(|a| a.object.name == name && a.object.kind == kind)
            .unwrap_or_else(|| panic!("{name} not deleted:\n{}", p.render(false)))
            .id
    };
    let (vm, top, mid, base) = (
        id("team.vm", ObjectKind::Domain),
        id("team.top", ObjectKind::Volume),
        id("team.mid", ObjectKind::Volume),
        id("team.base", ObjectKind::Volume),
    );
    let deps = |id: usize| p.actions[id].depends_on.clone();
    assert!(deps(top).contains(&vm), "{:?}", deps(top));
    assert!(deps(mid).contains(&top), "{:?}", deps(mid));
    assert!(deps(base).contains(&mid), "{:?}", deps(base));
    // And the model agrees the result is clean.
    let mut after = observed.clone();
    simulate::apply(&mut after, &p).unwrap();
    assert!(after.hosts["a"].volumes.is_empty());
}

#[test]
fn a_volume_in_a_pool_without_virtkubes_mark_is_kept_and_its_deletion_completes() {
    let all = format!("{POOL}{}", volume("base", "Delete", None));
    let mut observed = converged(&all);
    let host = observed.hosts.get_mut("a").unwrap();
    host.pools.get_mut("images").unwrap().owner = None;
    for v in host.volumes.values_mut() {
        v.owned = false;
    }
    let only_volume = load(&volume("base", "Delete", None));
    let p = plan::plan_delete(&only_volume, &observed);
    assert!(p.actions.is_empty(), "{}", p.render(false));
    assert!(!p.has_errors(), "not a conflict: {}", p.render(false));
    let kept = p
        .notices
        .iter()
        .find(|n| n.kind == NoticeKind::Retained && n.object.name == "team.base")
        .unwrap_or_else(|| panic!("{}", p.render(false)));
    assert!(kept.message.contains("not virtkube's"), "{}", kept.message);
}

mod generated {
    //! Generated chains: volumes built on one another, domains on them, and any subset
    //! deleted. Whatever stays on the host must still find every image it reads.

    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[derive(Debug, Clone)]
    struct World {
        /// Per volume: the earlier volume it is built on, and whether it is retained.
        volumes: Vec<(Option<usize>, bool)>,
        /// Per domain: the volume its disk is.
        domains: Vec<usize>,
        /// Which volumes and domains the deletion names.
        delete_volumes: Vec<bool>,
        delete_domains: Vec<bool>,
    }

    fn world() -> impl Strategy<Value = World> {
        (1..7usize).prop_flat_map(|n| {
            (
                proptest::collection::vec((any::<Option<prop::sample::Index>>(), any::<bool>()), n),
                proptest::collection::vec(0..n, 0..4),
                proptest::collection::vec(any::<bool>(), n),
                proptest::collection::vec(any::<bool>(), 4),
            )
                .prop_map(|(vols, domains, delete_volumes, delete_domains)| World {
                    volumes: vols
                        .into_iter()
                        .enumerate()
                        .map(|(i, (b, r))| (b.filter(|_| i > 0).map(|b| b.index(i)), r))
                        .collect(),
                    domains,
                    delete_volumes,
                    delete_domains,
                })
        })
    }

    fn text(w: &World, deleting: bool) -> String {
        let mut t = if deleting {
            String::new()
        } else {
            POOL.to_string()
        };
        for (i, (backing, retain)) in w.volumes.iter().enumerate() {
            if deleting && !w.delete_volumes[i] {
                continue;
            }
            let policy = if *retain { "Retain" } else { "Delete" };
            let backing = backing.map(|b| format!("v{b}"));
            t.push_str(&volume(&format!("v{i}"), policy, backing.as_deref()));
        }
        for (i, v) in w.domains.iter().enumerate() {
            if deleting && !w.delete_domains[i] {
                continue;
            }
            t.push_str(&format!(
                "---\napiVersion: virtkube.io/v1alpha1\nkind: Domain\nmetadata: {{name: d{i}, namespace: team}}\nspec: {{memory: {{size: 128Mi}}, disks: [{{name: root, volume: v{v}}}]}}\n"
            ));
        }
        t
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

        #[test]
        fn whatever_stays_still_finds_every_image_it_reads(w in world()) {
            let mut observed = converged(&text(&w, false));
            let doomed = text(&w, true);
            if doomed.is_empty() {
                return Ok(());
            }
            let p = plan::plan_delete(&load(&doomed), &observed);
            // Each deletion runs after the deletions of everything built on it.
            for a in &p.actions {
                for d in &a.depends_on {
                    prop_assert!(*d < a.id);
                }
            }
            simulate::apply(&mut observed, &p).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let host = &observed.hosts["a"];
            let paths: BTreeSet<&str> = host.volumes.values().map(|v| v.path.as_str()).collect();
            for ((_, name), v) in &host.volumes {
                if let Some(b) = &v.backing_path {
                    prop_assert!(paths.contains(b.as_str()), "{name} lost its backing image {b}:\n{}", p.render(false));
                }
            }
            for (name, d) in &host.domains {
                for disk in &d.disks {
                    if let DiskRef::Volume { pool, volume } = &disk.source {
                        prop_assert!(host.volumes.contains_key(&(pool.clone(), volume.clone())), "{name} lost its disk {volume}:\n{}", p.render(false));
                    }
                }
            }
            for (i, (_, retain)) in w.volumes.iter().enumerate() {
                if *retain {
                    prop_assert!(host.volumes.keys().any(|(_, n)| *n == format!("team.v{i}")), "retained v{i} deleted");
                }
            }
            // Nothing deletable is left behind either: a Delete volume named by the deletion
            // with no user left is gone.
            let remaining_users = |i: usize| {
                w.volumes.iter().enumerate().any(|(j, (b, _))| *b == Some(i) && host.volumes.keys().any(|(_, n)| *n == format!("team.v{j}")))
                    || w.domains.iter().enumerate().any(|(k, v)| *v == i && host.domains.contains_key(&format!("team.d{k}")))
            };
            for (i, (_, retain)) in w.volumes.iter().enumerate() {
                if w.delete_volumes[i] && !retain && !remaining_users(i) {
                    prop_assert!(!host.volumes.keys().any(|(_, n)| *n == format!("team.v{i}")), "v{i} had no user left yet stayed:\n{}", p.render(false));
                }
            }
        }
    }
}
