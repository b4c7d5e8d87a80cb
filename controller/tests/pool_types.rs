//! The planner for pool types beyond `dir`: what each type's creation builds, a pool's
//! source being immutable, and what a logical (LVM) pool can hold. No libvirt: the observed
//! side is the planner's own model (`simulate`); the real pools are in
//! engine/tests/pools_real.rs.

use virtkube::plan::desired::{DesiredState, Nodes};
use virtkube::plan::observed::ObservedState;
use virtkube::plan::{self, NoticeKind, ObjectKind, Op, Plan, PlanOptions, simulate};
use virtkube_crds::manifest;

const POOLS: &str = r#"
apiVersion: virtkube.io/v1alpha1
kind: StoragePool
metadata: {name: vg}
spec: {type: logical, source: {name: vg0, devices: [/dev/sdb, /dev/sdc], build: true}}
---
apiVersion: virtkube.io/v1alpha1
kind: StoragePool
metadata: {name: existing}
spec: {type: logical, source: {name: vg1}}
---
apiVersion: virtkube.io/v1alpha1
kind: StoragePool
metadata: {name: fsp}
spec: {type: fs, target: {path: /srv/fsp}, source: {devices: [/dev/sdd], format: ext4, build: true}}
---
apiVersion: virtkube.io/v1alpha1
kind: StoragePool
metadata: {name: fsq}
spec: {type: fs, target: {path: /srv/fsq}, source: {devices: [/dev/sde]}}
---
apiVersion: virtkube.io/v1alpha1
kind: StoragePool
metadata: {name: nas}
spec: {type: netfs, target: {path: /mnt/nas}, source: {host: nas.example, dir: /export}}
"#;

fn load(text: &str) -> Vec<manifest::Manifest> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.yaml");
    std::fs::write(&path, text).unwrap();
    manifest::load(&[path]).unwrap()
}

fn desired(text: &str) -> DesiredState {
    let (d, notices) = DesiredState::from_manifests(&load(text), &Nodes::single("a"));
    assert!(notices.is_empty(), "{notices:?}");
    d
}

fn empty() -> ObservedState {
    let mut o = ObservedState::default();
    o.host_mut("a");
    o
}

fn ops_of(p: &Plan, name: &str) -> Vec<Op> {
    p.actions
        .iter()
        .filter(|a| a.object.name == name)
        .map(|a| a.op.clone())
        .collect()
}

/// What the plan does to `name`, one word per step (`define` for a definition).
fn verbs(p: &Plan, name: &str) -> Vec<String> {
    ops_of(p, name)
        .iter()
        .map(|op| match op {
            Op::DefinePool(_) => "define".to_string(),
            other => other.verb(),
        })
        .collect()
}

fn notice<'a>(p: &'a Plan, name: &str) -> Option<&'a plan::Notice> {
    p.notices.iter().find(|n| n.object.name == name)
}

#[test]
fn each_pool_type_is_built_as_its_source_says_and_the_plan_settles() {
    let d = desired(POOLS);
    let mut o = empty();
    let p = plan::plan(&d, &o, &PlanOptions::default());
    let built = |make_storage| Op::BuildPool { make_storage };
    let kinds = |name| verbs(&p, name);
    // Built on its devices (vgcreate), then started.
    assert!(ops_of(&p, "vg").contains(&built(true)));
    assert_eq!(
        kinds("vg"),
        ["define", "build storage", "start", "autostart on"]
    );
    // An existing volume group: nothing to build.
    assert_eq!(kinds("existing"), ["define", "start", "autostart on"]);
    // mkfs on the device; without build only the mount point is made.
    assert!(ops_of(&p, "fsp").contains(&built(true)));
    assert!(ops_of(&p, "fsq").contains(&built(false)));
    assert!(ops_of(&p, "nas").contains(&built(false)));
    // A logical pool's target is /dev/<volume group>, as libvirt sets it.
    let Some(Op::DefinePool(vg)) = ops_of(&p, "vg").into_iter().next() else {
        panic!("vg is defined first");
    };
    assert_eq!(vg.target_path.as_deref(), Some("/dev/vg0"));
    assert_eq!(vg.source.devices, ["/dev/sdb", "/dev/sdc"]);
    let define = p
        .actions
        .iter()
        .find(|a| a.object.name == "fsp" && matches!(a.op, Op::DefinePool(_)))
        .unwrap();
    assert!(
        define
            .changes
            .iter()
            .any(|c| c.field == "source.format" && c.after == "ext4"),
        "{:?}",
        define.changes
    );
    assert!(p.notices.is_empty(), "{:?}", p.notices);

    simulate::apply(&mut o, &p).unwrap();
    let again = plan::plan(&d, &o, &PlanOptions::default());
    assert!(again.actions.is_empty(), "{:?}", again.actions);
    assert!(again.notices.is_empty(), "{:?}", again.notices);
}

#[test]
fn a_pool_source_is_immutable() {
    let d = desired(POOLS);
    let mut o = empty();
    let first = plan::plan(&d, &o, &PlanOptions::default());
    simulate::apply(&mut o, &first).unwrap();
    let host = o.hosts.get_mut("a").unwrap();
    host.pools.get_mut("vg").unwrap().source.devices = vec!["/dev/sdb".into()];
    host.pools.get_mut("nas").unwrap().source.dir = Some("/other".into());
    let p = plan::plan(&d, &o, &PlanOptions::default());
    for (pool, field, before, after) in [
        ("vg", "source.devices", "/dev/sdb", "/dev/sdb, /dev/sdc"),
        ("nas", "source.dir", "/other", "/export"),
    ] {
        let n = notice(&p, pool).unwrap_or_else(|| panic!("no notice for {pool}"));
        assert_eq!(n.kind, NoticeKind::Forbidden);
        assert!(n.message.contains("source are immutable"), "{}", n.message);
        let c = n.changes.iter().find(|c| c.field == field).unwrap();
        assert_eq!((c.before.as_str(), c.after.as_str()), (before, after));
    }
    // What libvirt fills in and the manifest leaves out is not compared (a logical pool's
    // format, an existing volume group's devices).
    assert!(notice(&p, "existing").is_none());
}

const LOGICAL: &str = r#"
apiVersion: virtkube.io/v1alpha1
kind: StoragePool
metadata: {name: vg}
spec: {type: logical, source: {name: vg0, devices: [/dev/sdb], build: true}}
---
apiVersion: virtkube.io/v1alpha1
kind: Volume
metadata: {name: disk, namespace: t}
spec: {pool: vg, capacity: "10M", format: raw}
"#;

fn with_volume(extra: &str) -> String {
    format!("{LOGICAL}---\n{extra}")
}

#[test]
fn a_logical_pool_refuses_qcow2_overlays_and_growth_and_takes_extents_as_asked() {
    // The Volume's default format, qcow2: libvirt would make a raw LV without a word.
    let d = desired(&with_volume(
        "apiVersion: virtkube.io/v1alpha1\nkind: Volume\nmetadata: {name: q, namespace: t}\nspec: {pool: vg, capacity: 1Gi}\n",
    ));
    let o = empty();
    let p = plan::plan(&d, &o, &PlanOptions::default());
    let n = notice(&p, "t.q").unwrap();
    assert_eq!(n.kind, NoticeKind::Unsupported);
    assert!(n.kind.is_error());
    assert!(n.message.contains("set spec.format: raw"), "{}", n.message);
    assert!(ops_of(&p, "t.q").is_empty());
    // The raw one is created.
    assert!(matches!(
        ops_of(&p, "t.disk").as_slice(),
        [Op::CreateVolume { format, capacity: Some(10_000_000), .. }] if format == "raw"
    ));

    // An overlay: an LVM snapshot is not a qcow2 overlay.
    let d = desired(&with_volume(
        "apiVersion: virtkube.io/v1alpha1\nkind: Volume\nmetadata: {name: cow, namespace: t}\nspec: {pool: vg, format: qcow2, capacity: 16Mi, source: {backingVolume: disk}}\n",
    ));
    let p = plan::plan(&d, &o, &PlanOptions::default());
    let n = notice(&p, "t.cow").unwrap();
    assert_eq!(n.kind, NoticeKind::Unsupported);
    assert!(n.message.contains("copy-on-write overlay"), "{}", n.message);

    // Made: LVM rounds 10 MB up to three 4 MiB extents. That is the size asked.
    let d = desired(LOGICAL);
    let mut o = empty();
    let first = plan::plan(&d, &o, &PlanOptions::default());
    simulate::apply(&mut o, &first).unwrap();
    let lv = o
        .hosts
        .get_mut("a")
        .unwrap()
        .volumes
        .get_mut(&("vg".to_string(), "t.disk".to_string()))
        .unwrap();
    lv.capacity = 12 << 20;
    let p = plan::plan(&d, &o, &PlanOptions::default());
    assert!(p.actions.is_empty() && p.notices.is_empty(), "{p:?}");

    // Growth: libvirt's LVM backend has no resize.
    let mut grown = d.clone();
    grown.volumes[0].capacity = Some(20_000_000);
    let p = plan::plan(&grown, &o, &PlanOptions::default());
    let n = notice(&p, "t.disk").unwrap();
    assert_eq!(n.kind, NoticeKind::Unsupported);
    assert!(n.message.contains("lvextend"), "{}", n.message);
    assert!(p.actions.is_empty());

    // A real shrink is still one.
    let mut shrunk = d.clone();
    shrunk.volumes[0].capacity = Some(4 << 20);
    let p = plan::plan(&shrunk, &o, &PlanOptions::default());
    assert_eq!(notice(&p, "t.disk").unwrap().kind, NoticeKind::Forbidden);

    // A clone larger than its source would need a resize after the copy.
    let d = desired(&with_volume(
        "apiVersion: virtkube.io/v1alpha1\nkind: Volume\nmetadata: {name: big, namespace: t}\nspec: {pool: vg, format: raw, capacity: 1Gi, source: {volume: disk}}\n",
    ));
    let p = plan::plan(&d, &o, &PlanOptions::default());
    let n = notice(&p, "t.big").unwrap();
    assert_eq!(n.kind, NoticeKind::Unsupported);
    assert!(
        n.message.contains("leave spec.capacity out"),
        "{}",
        n.message
    );
    // Without a capacity it has the source's size.
    let d = desired(&with_volume(
        "apiVersion: virtkube.io/v1alpha1\nkind: Volume\nmetadata: {name: copy, namespace: t}\nspec: {pool: vg, format: raw, source: {volume: disk}}\n",
    ));
    let p = plan::plan(&d, &o, &PlanOptions::default());
    assert!(
        p.actions
            .iter()
            .any(|a| a.object.kind == ObjectKind::Volume && a.object.name == "t.copy"),
        "{p:?}"
    );
}

const DISKS: &str = r#"
apiVersion: virtkube.io/v1alpha1
kind: StoragePool
metadata: {name: blank}
spec: {type: disk, source: {devices: [/dev/sdb], build: true}}
---
apiVersion: virtkube.io/v1alpha1
kind: StoragePool
metadata: {name: labelled}
spec: {type: disk, source: {devices: [/dev/sdc], format: dos}}
"#;

#[test]
fn a_disk_pool_is_labelled_only_when_asked_and_keeps_no_volume_of_the_cli() {
    let d = desired(DISKS);
    let mut o = empty();
    let p = plan::plan(&d, &o, &PlanOptions::default());
    let verbs = |name| verbs(&p, name);
    // build: a new partition table (parted mklabel, refused by libvirt over any label).
    assert_eq!(
        verbs("blank"),
        ["define", "build storage", "start", "autostart on"]
    );
    // Without build, libvirt's build would still write a label: no build step at all.
    assert_eq!(verbs("labelled"), ["define", "start", "autostart on"]);
    let Some(Op::DefinePool(blank)) = ops_of(&p, "blank").into_iter().next() else {
        panic!("blank is defined first");
    };
    // The label is always said (libvirt's own default would be dos), the target is /dev.
    assert_eq!(blank.source.format.as_deref(), Some("gpt"));
    assert_eq!(blank.target_path.as_deref(), Some("/dev"));
    simulate::apply(&mut o, &p).unwrap();
    let again = plan::plan(&d, &o, &PlanOptions::default());
    assert!(
        again.actions.is_empty() && again.notices.is_empty(),
        "{again:?}"
    );

    // A Volume there through the CLI: libvirt would name its partition, which nothing
    // records here. qcow2 and overlays are refused for what partitions are.
    let volumes = format!(
        "{DISKS}---\n{}---\n{}---\n{}",
        "apiVersion: virtkube.io/v1alpha1\nkind: Volume\nmetadata: {name: data, namespace: t}\nspec: {pool: blank, capacity: 10M, format: raw}\n",
        "apiVersion: virtkube.io/v1alpha1\nkind: Volume\nmetadata: {name: q, namespace: t}\nspec: {pool: blank, capacity: 10M}\n",
        "apiVersion: virtkube.io/v1alpha1\nkind: Volume\nmetadata: {name: cow, namespace: t}\nspec: {pool: blank, capacity: 10M, format: qcow2, source: {backingVolume: data}}\n",
    );
    let p = plan::plan(&desired(&volumes), &o, &PlanOptions::default());
    for (name, words) in [
        ("t.data", "only the node agent"),
        ("t.q", "set spec.format: raw"),
        ("t.cow", "copy-on-write"),
    ] {
        let n = notice(&p, name).unwrap_or_else(|| panic!("no notice for {name}"));
        assert_eq!(n.kind, NoticeKind::Unsupported, "{name}");
        assert!(n.message.contains(words), "{name}: {}", n.message);
        assert!(ops_of(&p, name).is_empty(), "{name}");
    }
}

#[test]
fn a_partition_named_by_the_agent_is_made_and_never_resized() {
    let mut d = desired(&format!(
        "{DISKS}---\napiVersion: virtkube.io/v1alpha1\nkind: Volume\nmetadata: {{name: data, namespace: t}}\nspec: {{pool: blank, capacity: 10M, format: raw}}\n"
    ));
    // What the agent does: the partition's name, recorded or the next one libvirt makes.
    d.volumes[0].name = "sdb1".into();
    let mut o = empty();
    let first = plan::plan(&d, &o, &PlanOptions::default());
    assert!(matches!(
        ops_of(&first, "sdb1").as_slice(),
        [Op::CreateVolume { format, capacity: Some(10_000_000), .. }] if format == "raw"
    ));
    simulate::apply(&mut o, &first).unwrap();
    // parted made whole sectors: 10,000,384 bytes is the size asked.
    let part = o
        .hosts
        .get_mut("a")
        .unwrap()
        .volumes
        .get_mut(&("blank".to_string(), "sdb1".to_string()))
        .unwrap();
    part.capacity = 10_000_384;
    let p = plan::plan(&d, &o, &PlanOptions::default());
    assert!(p.actions.is_empty() && p.notices.is_empty(), "{p:?}");
    let mut grown = d.clone();
    grown.volumes[0].capacity = Some(20_000_000);
    let p = plan::plan(&grown, &o, &PlanOptions::default());
    let n = notice(&p, "sdb1").unwrap();
    assert_eq!(n.kind, NoticeKind::Unsupported);
    assert!(
        n.message.contains("cannot resize a partition"),
        "{}",
        n.message
    );
    assert!(p.actions.is_empty());
}
