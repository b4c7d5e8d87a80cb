//! Table-driven planner tests: one converged host, one difference per case, the plan the
//! planner must make. No libvirt: the observed side is the planner's own model.

use virtkube::plan::desired::{DesiredState, Nodes};
use virtkube::plan::observed::{ObservedState, OwnerMark, PowerObserved};
use virtkube::plan::{
    self, LiveDisk, NoticeKind, ObjectKind, Op, Plan, PlanOptions, Symbol, simulate,
};
use virtkube_crds::manifest;

const MANIFESTS: &str = r#"
apiVersion: virtkube.io/v1alpha1
kind: StoragePool
metadata: {name: images}
spec: {type: dir, target: {path: /pools/images}}
---
apiVersion: virtkube.io/v1alpha1
kind: Network
metadata: {name: lan}
spec: {mode: isolated, ip: {address: 10.1.0.1, prefix: 24}}
---
apiVersion: virtkube.io/v1alpha1
kind: Volume
metadata: {name: root, namespace: team}
spec: {pool: images, capacity: 4Gi, reclaimPolicy: Delete}
---
apiVersion: virtkube.io/v1alpha1
kind: Volume
metadata: {name: data, namespace: team}
spec: {pool: images, capacity: 1Gi, reclaimPolicy: Retain}
---
apiVersion: virtkube.io/v1alpha1
kind: Domain
metadata: {name: web, namespace: team}
spec:
  autostart: true
  cpu: {vcpus: 2, maxVcpus: 4, pinning: [{vcpu: 0, cpuset: "0"}], emulatorCpuset: "1"}
  memory: {size: 512Mi, max: 1Gi}
  os: {machine: pc, boot: [hd]}
  disks: [{name: root, volume: root}]
  interfaces: [{name: eth0, network: lan}]
"#;

fn load(text: &str) -> Vec<manifest::Manifest> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.yaml");
    std::fs::write(&path, text).unwrap();
    manifest::load(&[path]).unwrap()
}

fn nodes() -> Nodes {
    Nodes {
        default: "a".into(),
        all: vec!["a".into(), "b".into()],
    }
}

fn desired() -> DesiredState {
    let (d, notices) = DesiredState::from_manifests(&load(MANIFESTS), &nodes());
    assert!(notices.is_empty(), "{notices:?}");
    d
}

fn empty() -> ObservedState {
    let mut o = ObservedState::default();
    o.host_mut("a");
    o.host_mut("b");
    o
}

/// The hosts after applying `desired` to empty hosts.
fn converged(desired: &DesiredState) -> ObservedState {
    let mut o = empty();
    let p = plan::plan(desired, &o, &PlanOptions::default());
    simulate::apply(&mut o, &p).unwrap();
    o
}

fn ops(p: &Plan) -> Vec<Op> {
    p.actions.iter().map(|a| a.op.clone()).collect()
}

fn web(o: &mut ObservedState) -> &mut virtkube::plan::observed::ObservedDomain {
    o.hosts
        .get_mut("a")
        .unwrap()
        .domains
        .get_mut("team.web")
        .unwrap()
}

fn dweb(d: &mut DesiredState) -> &mut virtkube::plan::desired::DesiredDomain {
    d.domains.iter_mut().find(|x| x.name == "team.web").unwrap()
}

type Case = (
    &'static str,
    fn(&mut DesiredState),
    fn(&mut ObservedState),
    Expect,
);

#[derive(Debug)]
enum Expect {
    Nothing,
    Ops(Vec<Op>, Symbol),
    Notice(NoticeKind, &'static str),
}

fn cases() -> Vec<Case> {
    vec![
        ("converged", |_| {}, |_| {}, Expect::Nothing),
        (
            "libvirt-filled values are not differences",
            |_| {},
            |o| {
                let w = web(o);
                w.uuid = "0b7c…-libvirt".into();
                w.interfaces[0].mac = Some("52:54:00:aa:bb:cc".into());
                w.machine = Some("pc-i440fx-9.1".into());
                w.pinning.insert(3, "0-127".into());
                w.cpu_mode = Some("custom".into());
                w.arch = Some("x86_64".into());
                w.id = Some(7);
            },
            Expect::Nothing,
        ),
        (
            "vCPUs up within max: live",
            |d| dweb(d).vcpus = 3,
            |_| {},
            Expect::Ops(vec![Op::SetVcpus(3)], Symbol::Live),
        ),
        (
            "vCPUs above max: restart pending",
            |d| {
                dweb(d).vcpus = 6;
                dweb(d).max_vcpus = 6
            },
            |_| {},
            Expect::Notice(NoticeKind::RestartPending, "cpu.maxVcpus"),
        ),
        (
            "memory within max: live",
            |d| dweb(d).memory_kib = 768 * 1024,
            |_| {},
            Expect::Ops(vec![Op::SetMemory(768 * 1024)], Symbol::Live),
        ),
        (
            "max memory: restart pending",
            |d| dweb(d).max_memory_kib = 2048 * 1024,
            |_| {},
            Expect::Notice(NoticeKind::RestartPending, "memory.max"),
        ),
        (
            "pinning: live",
            |d| {
                dweb(d).pinning.insert(0, "2-3".into());
            },
            |_| {},
            Expect::Ops(
                vec![Op::PinVcpu {
                    vcpu: 0,
                    cpuset: "2-3".into(),
                }],
                Symbol::Live,
            ),
        ),
        (
            "pinning drifted out of band: live",
            |_| {},
            |o| {
                web(o).pinning.insert(0, "0-7".into());
            },
            Expect::Ops(
                vec![Op::PinVcpu {
                    vcpu: 0,
                    cpuset: "0".into(),
                }],
                Symbol::Live,
            ),
        ),
        (
            "removed vCPU pin, host CPU map unknown: left as it is",
            |d| {
                dweb(d).pinning.remove(&0);
            },
            |_| {},
            Expect::Nothing,
        ),
        (
            "removed vCPU pin floats again over every online CPU: live",
            |d| {
                dweb(d).pinning.remove(&0);
            },
            |o| o.host_mut("a").online_cpus = Some("0-63".into()),
            Expect::Ops(
                vec![Op::PinVcpu {
                    vcpu: 0,
                    cpuset: "0-63".into(),
                }],
                Symbol::Live,
            ),
        ),
        (
            "removed emulator pin floats again over every online CPU: live",
            |d| dweb(d).emulator_cpuset = None,
            |o| o.host_mut("a").online_cpus = Some("0-63".into()),
            Expect::Ops(vec![Op::PinEmulator("0-63".into())], Symbol::Live),
        ),
        (
            "unpinned vCPUs covering every online CPU are no difference",
            |_| {},
            |o| {
                // The test driver reports every present CPU (0-7) with only some online.
                o.host_mut("a").online_cpus = Some("0,2,4".into());
                web(o).pinning.insert(1, "0-7".into());
                web(o).pinning.insert(2, "0,2,4".into());
            },
            Expect::Nothing,
        ),
        (
            "emulator pinning: live",
            |d| dweb(d).emulator_cpuset = Some("0-1".into()),
            |_| {},
            Expect::Ops(vec![Op::PinEmulator("0-1".into())], Symbol::Live),
        ),
        (
            "autostart: live",
            |d| dweb(d).autostart = false,
            |_| {},
            Expect::Ops(vec![Op::SetDomainAutostart(false)], Symbol::Live),
        ),
        (
            "machine type: restart pending",
            |d| dweb(d).machine = Some("q35".into()),
            |_| {},
            Expect::Notice(NoticeKind::RestartPending, "os.machine"),
        ),
        (
            "firmware: restart pending",
            |d| dweb(d).firmware = Some("efi".into()),
            |_| {},
            Expect::Notice(NoticeKind::RestartPending, "os.firmware"),
        ),
        (
            "boot order: restart pending",
            |d| dweb(d).boot = vec!["network".into(), "hd".into()],
            |_| {},
            Expect::Notice(NoticeKind::RestartPending, "os.boot"),
        ),
        (
            "cpu mode: restart pending",
            |d| dweb(d).cpu_mode = Some("host-passthrough".into()),
            |_| {},
            Expect::Notice(NoticeKind::RestartPending, "cpu.mode"),
        ),
        (
            "NIC removed: restart pending",
            |d| dweb(d).interfaces.clear(),
            |_| {},
            Expect::Notice(NoticeKind::RestartPending, "interfaces"),
        ),
        (
            "restart-required with updatePolicy Restart: restart now",
            |d| {
                dweb(d).machine = Some("q35".into());
                dweb(d).restart_now = true
            },
            |_| {},
            Expect::Ops(
                vec![Op::RestartDomain {
                    domain: Box::new(restart_target()),
                    preserve: Default::default(),
                }],
                Symbol::Restart,
            ),
        ),
        (
            "Always restarts a stopped domain",
            |_| {},
            |o| {
                web(o).power = PowerObserved::Shutoff;
                web(o).reason = "shutdown".into()
            },
            Expect::Ops(vec![Op::StartDomain { recover: false }], Symbol::Live),
        ),
        (
            "Always recovers a crashed domain",
            |_| {},
            |o| web(o).power = PowerObserved::Crashed,
            Expect::Ops(vec![Op::StartDomain { recover: true }], Symbol::Live),
        ),
        (
            "RerunOnFailure leaves a clean shutdown",
            |d| dweb(d).run_strategy = virtkube_crds::domain::RunStrategy::RerunOnFailure,
            |o| {
                web(o).power = PowerObserved::Shutoff;
                web(o).reason = "shutdown".into()
            },
            Expect::Nothing,
        ),
        (
            "RerunOnFailure restarts after a crash",
            |d| dweb(d).run_strategy = virtkube_crds::domain::RunStrategy::RerunOnFailure,
            |o| {
                web(o).power = PowerObserved::Shutoff;
                web(o).reason = "crashed".into()
            },
            Expect::Ops(vec![Op::StartDomain { recover: false }], Symbol::Live),
        ),
        (
            "Manual leaves a stopped domain alone",
            |d| dweb(d).run_strategy = virtkube_crds::domain::RunStrategy::Manual,
            |o| {
                web(o).power = PowerObserved::Shutoff;
                web(o).reason = "shutdown".into()
            },
            Expect::Nothing,
        ),
        (
            "Manual starts a domain whose first start was lost (the definition still owes it)",
            |d| dweb(d).run_strategy = virtkube_crds::domain::RunStrategy::Manual,
            |o| {
                web(o).power = PowerObserved::Shutoff;
                web(o).reason = "unknown".into();
                web(o).start_owed = true
            },
            Expect::Ops(vec![Op::StartDomain { recover: false }], Symbol::Live),
        ),
        (
            "Halted never starts, even a domain whose first start is owed",
            |d| {
                dweb(d).run_strategy = virtkube_crds::domain::RunStrategy::Halted;
                dweb(d).state = virtkube_crds::domain::PowerState::Stopped
            },
            |o| {
                web(o).power = PowerObserved::Shutoff;
                web(o).start_owed = true
            },
            Expect::Nothing,
        ),
        (
            "Halted stops a running domain",
            |d| {
                dweb(d).run_strategy = virtkube_crds::domain::RunStrategy::Halted;
                dweb(d).state = virtkube_crds::domain::PowerState::Stopped
            },
            |_| {},
            Expect::Ops(vec![Op::StopDomain], Symbol::Live),
        ),
        (
            "state Paused suspends",
            |d| dweb(d).state = virtkube_crds::domain::PowerState::Paused,
            |_| {},
            Expect::Ops(vec![Op::SuspendDomain], Symbol::Live),
        ),
        (
            "state Running resumes",
            |_| {},
            |o| {
                web(o).power = PowerObserved::Paused;
                web(o).reason = "user".into()
            },
            Expect::Ops(vec![Op::ResumeDomain], Symbol::Live),
        ),
        (
            "unused volume grows: live",
            |d| d.volumes[1].capacity = Some(8 << 30),
            |_| {},
            Expect::Ops(
                vec![Op::ResizeVolume {
                    pool: "images".into(),
                    key: "/pools/images/team.data".into(),
                    capacity: 8 << 30,
                    live: None,
                }],
                Symbol::Live,
            ),
        ),
        (
            "volume in use by a running guest grows live through its disk",
            |d| d.volumes[0].capacity = Some(8 << 30),
            |_| {},
            Expect::Ops(
                vec![Op::ResizeVolume {
                    pool: "images".into(),
                    key: "/pools/images/team.root".into(),
                    capacity: 8 << 30,
                    live: Some(LiveDisk {
                        domain: "team.web".into(),
                        owner: OwnerMark::for_resource("Domain", Some("team"), "web", None),
                        target: "vda".into(),
                    }),
                }],
                Symbol::Live,
            ),
        ),
        (
            "volume in use by a crashed guest grows later",
            |d| {
                d.volumes[0].capacity = Some(8 << 30);
                // Manual: the crashed guest stays as it is (no restart in this plan).
                dweb(d).run_strategy = virtkube_crds::domain::RunStrategy::Manual;
            },
            |o| web(o).power = PowerObserved::Crashed,
            Expect::Notice(NoticeKind::Blocked, "capacity"),
        ),
        (
            "volume in use by a stopped guest grows through the pool",
            |d| d.volumes[0].capacity = Some(8 << 30),
            |o| web(o).power = PowerObserved::Shutoff,
            Expect::Ops(
                vec![
                    Op::ResizeVolume {
                        pool: "images".into(),
                        key: "/pools/images/team.root".into(),
                        capacity: 8 << 30,
                        live: None,
                    },
                    Op::StartDomain { recover: false },
                ],
                Symbol::Live,
            ),
        ),
        (
            "a clone smaller than its source: forbidden",
            |d| {
                let mut c = d.volumes[1].clone();
                c.name = "team.copy".into();
                c.source = virtkube::plan::desired::VolumeOrigin::Clone("team.root".into());
                c.capacity = Some(1 << 30);
                d.volumes.push(c);
            },
            |_| {},
            Expect::Notice(NoticeKind::Forbidden, "capacity"),
        ),
        (
            "a clone of a forbidden clone waits instead of failing",
            |d| {
                let mut c = d.volumes[1].clone();
                c.name = "team.copy".into();
                c.source = virtkube::plan::desired::VolumeOrigin::Clone("team.root".into());
                c.capacity = Some(1 << 30);
                let mut c2 = c.clone();
                c2.name = "team.copy2".into();
                c2.source = virtkube::plan::desired::VolumeOrigin::Clone("team.copy".into());
                c2.capacity = None;
                d.volumes.push(c);
                d.volumes.push(c2);
            },
            |_| {},
            Expect::Notice(NoticeKind::Blocked, ""),
        ),
        (
            "volume moved to another pool: forbidden",
            |d| {
                let mut other = d.pools[0].clone();
                other.name = "fast".into();
                other.owner = OwnerMark::for_resource("StoragePool", None, "fast", None);
                other.target_path = Some("/pools/fast".into());
                d.pools.push(other);
                d.volumes[0].pool = "fast".into();
            },
            |_| {},
            Expect::Notice(NoticeKind::Forbidden, "pool"),
        ),
        (
            "volume source changed: forbidden",
            |d| {
                d.volumes[1].source =
                    virtkube::plan::desired::VolumeOrigin::Backing("team.root".into())
            },
            |_| {},
            Expect::Notice(NoticeKind::Forbidden, "source"),
        ),
        (
            "volume shrink: forbidden",
            |d| d.volumes[0].capacity = Some(1 << 30),
            |_| {},
            Expect::Notice(NoticeKind::Forbidden, "capacity"),
        ),
        (
            "volume format: forbidden",
            |d| d.volumes[0].format = "raw".into(),
            |_| {},
            Expect::Notice(NoticeKind::Forbidden, "format"),
        ),
        (
            "pool type: forbidden",
            |d| d.pools[0].pool_type = "netfs".into(),
            |_| {},
            Expect::Notice(NoticeKind::Forbidden, "type"),
        ),
        (
            "pool inactive: started",
            |_| {},
            |o| {
                o.hosts
                    .get_mut("a")
                    .unwrap()
                    .pools
                    .get_mut("images")
                    .unwrap()
                    .active = false
            },
            Expect::Ops(vec![Op::StartPool], Symbol::Live),
        ),
        (
            "network autostart off",
            |d| d.networks[0].autostart = false,
            |_| {},
            Expect::Ops(
                vec![
                    Op::SetNetworkAutostart(false),
                    Op::SetNetworkAutostart(false),
                ],
                Symbol::Live,
            ),
        ),
        (
            "network mode: forbidden",
            |d| d.networks[0].mode = "nat".into(),
            |_| {},
            Expect::Notice(NoticeKind::Forbidden, "mode"),
        ),
        (
            "foreign domain of the same name: conflict",
            |_| {},
            |o| web(o).owner = None,
            Expect::Notice(NoticeKind::Conflict, ""),
        ),
        (
            "another resource's domain: conflict",
            |_| {},
            |o| {
                web(o).owner = Some(OwnerMark::for_resource(
                    "Domain",
                    Some("team"),
                    "web",
                    Some("uid-of-a-cluster-object"),
                ))
            },
            Expect::Notice(NoticeKind::Conflict, ""),
        ),
        (
            "unowned volume: conflict",
            |_| {},
            |o| {
                o.hosts
                    .get_mut("a")
                    .unwrap()
                    .volumes
                    .get_mut(&("images".to_string(), "team.root".to_string()))
                    .unwrap()
                    .owned = false
            },
            Expect::Notice(NoticeKind::Conflict, ""),
        ),
    ]
}

fn restart_target() -> virtkube::plan::desired::DesiredDomain {
    let mut d = desired();
    dweb(&mut d).machine = Some("q35".into());
    dweb(&mut d).restart_now = true;
    dweb(&mut d).origin.clear();
    dweb(&mut d).clone()
}

#[test]
fn every_kind_of_difference_is_planned_as_it_should() {
    for (name, change_desired, change_observed, expect) in cases() {
        let base = desired();
        let mut observed = converged(&base);
        let mut d = base.clone();
        change_desired(&mut d);
        change_observed(&mut observed);
        let p = plan::plan(&d, &observed, &PlanOptions::default());
        let shown = p.render(true);
        match &expect {
            Expect::Nothing => {
                assert!(
                    p.is_empty() && p.notices.is_empty(),
                    "{name}: expected nothing, got\n{shown}"
                );
            }
            Expect::Ops(want, symbol) => {
                let got: Vec<Op> = ops(&p)
                    .into_iter()
                    .map(|op| match op {
                        // The preserved UUID/MACs are checked elsewhere.
                        Op::RestartDomain { mut domain, .. } => {
                            domain.origin.clear();
                            Op::RestartDomain {
                                domain,
                                preserve: Default::default(),
                            }
                        }
                        other => other,
                    })
                    .collect();
                assert_eq!(&got, want, "{name}:\n{shown}");
                assert!(
                    p.actions.iter().all(|a| a.symbol == *symbol),
                    "{name}: symbols\n{shown}"
                );
                assert!(
                    p.actions.iter().all(|a| !a.reason.is_empty()),
                    "{name}: every action says why"
                );
                assert!(!p.has_errors(), "{name}:\n{shown}");
            }
            Expect::Notice(kind, field) => {
                let n = p
                    .notices
                    .iter()
                    .find(|n| n.kind == *kind)
                    .unwrap_or_else(|| panic!("{name}: no {kind:?} notice in\n{shown}"));
                if !field.is_empty() {
                    assert!(
                        n.changes.iter().any(|c| c.field.starts_with(field)),
                        "{name}: {field} not in {:?}",
                        n.changes
                    );
                }
                if *kind == NoticeKind::Conflict {
                    assert!(
                        p.actions
                            .iter()
                            .all(|a| a.object.kind != n.object.kind
                                || a.object.name != n.object.name),
                        "{name}: acted on a foreign object\n{shown}"
                    );
                    assert!(
                        n.message.contains("m.yaml"),
                        "{name}: names the manifest: {}",
                        n.message
                    );
                }
                if *kind == NoticeKind::RestartPending || *kind == NoticeKind::Forbidden {
                    assert!(
                        p.actions.iter().all(|a| !matches!(
                            a.op,
                            Op::DefineDomain { .. } | Op::RestartDomain { .. }
                        )),
                        "{name}:\n{shown}"
                    );
                }
            }
        }
        // Whatever the plan, running it on the model leaves nothing to do.
        let mut after = observed.clone();
        simulate::apply(&mut after, &p).unwrap_or_else(|e| panic!("{name}: {e}\n{shown}"));
        let again = plan::plan(&d, &after, &PlanOptions::default());
        assert!(
            again.is_empty(),
            "{name}: re-plan not empty:\n{}",
            again.render(true)
        );
    }
}

#[test]
fn a_stopped_domain_is_redefined_keeping_its_uuid_and_generated_macs() {
    let base = desired();
    let mut observed = converged(&base);
    web(&mut observed).power = PowerObserved::Shutoff;
    web(&mut observed).interfaces[0].mac = Some("52:54:00:12:34:56".into());
    let mut d = base.clone();
    d.domains[0].run_strategy = virtkube_crds::domain::RunStrategy::Manual;
    d.domains[0].machine = Some("q35".into());
    d.domains[0].vcpus = 3;
    let p = plan::plan(&d, &observed, &PlanOptions::default());
    assert_eq!(p.actions.len(), 1, "{}", p.render(false));
    match &p.actions[0].op {
        Op::DefineDomain { preserve, .. } => {
            assert_eq!(preserve.uuid.as_deref(), Some("uuid-team.web"));
            assert_eq!(preserve.macs, vec![Some("52:54:00:12:34:56".to_string())]);
        }
        other => panic!("{other:?}"),
    }
    let fields: Vec<&str> = p.actions[0]
        .changes
        .iter()
        .map(|c| c.field.as_str())
        .collect();
    assert!(
        fields.contains(&"cpu.vcpus") && fields.contains(&"os.machine"),
        "{fields:?}"
    );
}

#[test]
fn creation_is_ordered_pools_volumes_networks_domains_with_dependencies() {
    let p = plan::plan(&desired(), &empty(), &PlanOptions::default());
    let kinds: Vec<ObjectKind> = p.actions.iter().map(|a| a.object.kind).collect();
    let mut sorted = kinds.clone();
    sorted.sort();
    assert_eq!(kinds, sorted, "{}", p.render(true));
    let define = p
        .actions
        .iter()
        .find(|a| matches!(a.op, Op::DefineDomain { .. }))
        .unwrap();
    let dep_kinds: Vec<ObjectKind> = define
        .depends_on
        .iter()
        .map(|i| p.actions[*i].object.kind)
        .collect();
    assert!(
        dep_kinds.contains(&ObjectKind::Volume) && dep_kinds.contains(&ObjectKind::Network),
        "{dep_kinds:?}"
    );
    for a in &p.actions {
        assert!(a.depends_on.iter().all(|d| *d < a.id));
    }
    // Objects without nodeName go to the default node; pools and networks to every node.
    assert!(
        p.actions
            .iter()
            .filter(|a| a.object.kind == ObjectKind::Domain)
            .all(|a| a.node == "a")
    );
    assert!(
        p.actions
            .iter()
            .any(|a| a.object.kind == ObjectKind::StoragePool && a.node == "b")
    );
}

#[test]
fn a_new_node_name_live_migrates_a_running_domain_and_moves_a_stopped_one() {
    let base = desired();
    let mut observed = converged(&base);
    // The volume and network exist on b too (shared storage in this model).
    let a = observed.hosts["a"].clone();
    let b = observed.hosts.get_mut("b").unwrap();
    b.volumes = a.volumes.clone();
    let mut d = base.clone();
    d.domains[0].node = "b".into();
    let p = plan::plan(&d, &observed, &PlanOptions::default());
    let mig: Vec<&plan::Action> = p
        .actions
        .iter()
        .filter(|x| matches!(x.op, Op::MigrateDomain { .. }))
        .collect();
    assert_eq!(mig.len(), 1, "{}", p.render(true));
    assert_eq!(mig[0].node, "a");
    assert!(matches!(&mig[0].op, Op::MigrateDomain { to, .. } if to == "b"));
    assert!(
        !p.actions
            .iter()
            .any(|x| matches!(x.op, Op::DefineDomain { .. } | Op::DeleteDomain)),
        "no recreation:\n{}",
        p.render(true)
    );
    let mut after = observed.clone();
    simulate::apply(&mut after, &p).unwrap();
    assert!(plan::plan(&d, &after, &PlanOptions::default()).is_empty());

    web(&mut observed).power = PowerObserved::Shutoff;
    d.domains[0].run_strategy = virtkube_crds::domain::RunStrategy::Manual;
    let p = plan::plan(&d, &observed, &PlanOptions::default());
    let ops = ops(&p);
    assert!(
        matches!(ops[..], [Op::DefineDomain { .. }, Op::DeleteDomain, ..]),
        "{}",
        p.render(true)
    );
    assert_eq!(p.actions[0].node, "b");
    assert_eq!(p.actions[1].node, "a");
    assert_eq!(
        p.actions[1].depends_on,
        vec![0],
        "the old copy goes only once the new one exists"
    );
}

#[test]
fn an_unknown_node_name_is_an_error_naming_file_object_and_field() {
    let text = MANIFESTS.replace(
        "  autostart: true\n  cpu:",
        "  nodeName: nowhere\n  autostart: true\n  cpu:",
    );
    let (d, notices) = DesiredState::from_manifests(&load(&text), &nodes());
    assert!(d.domains.is_empty());
    assert_eq!(notices.len(), 1);
    assert!(notices[0].kind.is_error());
    assert!(
        notices[0].message.contains("m.yaml (document 5)")
            && notices[0].message.contains("spec.nodeName")
            && notices[0].message.contains("nowhere"),
        "{}",
        notices[0].message
    );
    assert_eq!(notices[0].object.name, "team.web");
}

#[test]
fn prune_deletes_only_local_owned_objects_and_keeps_volumes_of_unknown_policy() {
    let base = desired();
    let mut observed = converged(&base);
    // A foreign domain and a cluster-owned one on the same host.
    let mut foreign = web(&mut observed).clone();
    foreign.owner = None;
    let mut cluster = foreign.clone();
    cluster.owner = Some(OwnerMark::for_resource(
        "Domain",
        Some("x"),
        "y",
        Some("a-kubernetes-uid"),
    ));
    observed
        .hosts
        .get_mut("a")
        .unwrap()
        .domains
        .insert("vm-by-hand".into(), foreign);
    observed
        .hosts
        .get_mut("a")
        .unwrap()
        .domains
        .insert("x.y".into(), cluster);
    let empty_desired = DesiredState::default();
    let p = plan::plan(&empty_desired, &observed, &PlanOptions { prune: true });
    let deleted: Vec<(&str, ObjectKind)> = p
        .actions
        .iter()
        .map(|a| (a.object.name.as_str(), a.object.kind))
        .collect();
    assert!(deleted.contains(&("team.web", ObjectKind::Domain)));
    assert!(
        !deleted
            .iter()
            .any(|(n, _)| *n == "vm-by-hand" || *n == "x.y"),
        "{}",
        p.render(true)
    );
    assert!(
        !deleted.iter().any(|(_, k)| *k == ObjectKind::Volume),
        "volumes of unknown policy are kept"
    );
    assert!(
        p.notices
            .iter()
            .filter(|n| n.kind == NoticeKind::Retained)
            .count()
            >= 2
    );
    // Deletions run domains first, pools last.
    let kinds: Vec<ObjectKind> = p.actions.iter().map(|a| a.object.kind).collect();
    let mut reversed = kinds.clone();
    reversed.sort_by(|a, b| b.cmp(a));
    assert_eq!(kinds, reversed, "{}", p.render(true));
    assert!(p.actions.iter().all(|a| a.symbol == Symbol::Delete));
}

#[test]
fn delete_keeps_retained_volumes_and_waits_for_users() {
    let base = desired();
    let observed = converged(&base);
    let p = plan::plan_delete(&base, &observed);
    let names: Vec<&str> = p.actions.iter().map(|a| a.object.name.as_str()).collect();
    assert!(names.contains(&"team.root"), "Delete policy: deleted");
    assert!(!names.contains(&"team.data"), "Retain policy: kept");
    let root = p
        .actions
        .iter()
        .find(|a| a.object.name == "team.root")
        .unwrap();
    let web_delete = p
        .actions
        .iter()
        .find(|a| a.object.name == "team.web")
        .unwrap();
    assert!(
        root.depends_on.contains(&web_delete.id),
        "the volume goes after the domain using it"
    );
    // Deleting only the volume while the domain stays: blocked, not deleted.
    let only_volume = DesiredState {
        volumes: base.volumes.clone(),
        ..DesiredState::default()
    };
    let p = plan::plan_delete(&only_volume, &observed);
    assert!(
        !p.actions.iter().any(|a| a.object.name == "team.root"),
        "{}",
        p.render(false)
    );
    let blocked = p
        .notices
        .iter()
        .find(|n| n.kind == NoticeKind::Blocked)
        .unwrap();
    assert!(
        blocked.message.contains("Domain team/web"),
        "{}",
        blocked.message
    );
}

#[test]
fn the_plan_reads_like_a_review_with_marks_and_before_after() {
    let base = desired();
    let mut observed = converged(&base);
    let mut d = base.clone();
    dweb(&mut d).vcpus = 3;
    dweb(&mut d).machine = Some("q35".into());
    d.volumes[0].capacity = Some(1 << 30);
    // A local-owned domain the manifests dropped.
    let mut gone = web(&mut observed).clone();
    gone.owner = Some(OwnerMark::for_resource("Domain", Some("team"), "old", None));
    observed
        .hosts
        .get_mut("a")
        .unwrap()
        .domains
        .insert("team.old".into(), gone);
    let p = plan::plan(&d, &observed, &PlanOptions { prune: true });
    let text = p.render(false);
    for expected in [
        "~ Domain team/web",
        "    ~ set vCPUs to 3: applied live",
        "        cpu.vcpus: 2 → 3",
        "- Domain team/old",
        "! Domain team/web: needs restart:",
        "        os.machine: pc-i440fx-7.2 → q35",
        "x Volume team/root: forbidden: shrinking a volume would cut the guest's data",
        "        capacity: 4Gi → 1Gi",
        "Plan: 0 to create, 1 to change live, 0 to restart, 1 to delete; 1 waiting for a restart; 1 error.",
    ] {
        assert!(text.contains(expected), "missing `{expected}` in\n{text}");
    }
}

#[test]
fn a_network_change_recreates_it_unless_a_running_guest_uses_it() {
    let base = desired();
    let mut observed = converged(&base);
    let mut d = base.clone();
    d.networks[0].ip = Some(("10.2.0.1".into(), 24));
    // On node a, web runs on `lan`: waits. On node b nobody uses it: recreated now.
    let p = plan::plan(&d, &observed, &PlanOptions::default());
    let pending = p
        .notices
        .iter()
        .find(|n| n.kind == NoticeKind::RestartPending)
        .expect("pending on a");
    assert_eq!(pending.node, "a");
    assert!(pending.message.contains("team.web"), "{}", pending.message);
    let on_b: Vec<&str> = p
        .actions
        .iter()
        .filter(|a| a.node == "b")
        .map(|a| verb_of(&a.op))
        .collect();
    assert_eq!(
        on_b,
        ["delete", "define", "start", "autostart"],
        "{}",
        p.render(true)
    );
    assert!(
        p.actions
            .iter()
            .all(|a| a.node == "b" && a.symbol == Symbol::Restart)
    );
    assert_eq!(p.actions[0].changes[0].field, "ip");
    // Once web stopped, node a is recreated too, and everything converges.
    web(&mut observed).power = PowerObserved::Shutoff;
    d.domains[0].run_strategy = virtkube_crds::domain::RunStrategy::Manual;
    let p = plan::plan(&d, &observed, &PlanOptions::default());
    assert_eq!(
        p.actions.iter().filter(|a| a.node == "a").count(),
        4,
        "{}",
        p.render(true)
    );
    simulate::apply(&mut observed, &p).unwrap();
    assert!(plan::plan(&d, &observed, &PlanOptions::default()).is_empty());
}

/// DHCP leases and DNS entries change live (`~`, `virNetworkUpdate`) even while a running
/// guest uses the network: removals first, a changed lease modified in place, a changed DNS
/// entry removed and added (libvirt cannot modify one); the model re-plans to nothing.
#[test]
fn dhcp_and_dns_hosts_change_live_under_running_guests() {
    use virtkube::plan::NetworkUpdate;
    use virtkube::plan::observed::{DhcpLease, DnsEntry};
    let lease = |mac: &str, ip: &str, name: Option<&str>| DhcpLease {
        mac: mac.into(),
        ip: ip.into(),
        name: name.map(str::to_string),
    };
    let entry = |ip: &str, names: &[&str]| DnsEntry {
        ip: ip.into(),
        hostnames: names.iter().map(|n| n.to_string()).collect(),
    };
    let mut base = desired();
    base.networks[0].dhcp_hosts = vec![
        lease("52:54:00:00:00:01", "10.1.0.5", Some("db")),
        lease("52:54:00:00:00:02", "10.1.0.6", None),
    ];
    base.networks[0].dns_hosts = vec![entry("10.1.0.7", &["web"]), entry("10.1.0.8", &["old"])];
    let mut observed = converged(&base);
    assert!(plan::plan(&base, &observed, &PlanOptions::default()).is_empty());
    let mut d = base.clone();
    d.networks[0].dhcp_hosts = vec![
        lease("52:54:00:00:00:01", "10.1.0.9", Some("db")),
        lease("52:54:00:00:00:03", "10.1.0.6", None),
    ];
    d.networks[0].dns_hosts = vec![
        entry("10.1.0.7", &["web", "www"]),
        entry("10.1.0.10", &["new"]),
    ];
    let p = plan::plan(&d, &observed, &PlanOptions::default());
    assert!(p.notices.is_empty(), "{}", p.render(true));
    let on_a: Vec<NetworkUpdate> = p
        .actions
        .iter()
        .filter(|a| a.node == "a")
        .map(|a| match &a.op {
            Op::UpdateNetwork(u) => u.clone(),
            other => panic!("not a live update: {other:?}\n{}", p.render(true)),
        })
        .collect();
    assert_eq!(
        on_a,
        [
            NetworkUpdate::DeleteDhcpHost(lease("52:54:00:00:00:02", "10.1.0.6", None)),
            NetworkUpdate::DeleteDnsHost(entry("10.1.0.7", &["web"])),
            NetworkUpdate::DeleteDnsHost(entry("10.1.0.8", &["old"])),
            NetworkUpdate::ModifyDhcpHost(lease("52:54:00:00:00:01", "10.1.0.9", Some("db"))),
            NetworkUpdate::AddDhcpHost(lease("52:54:00:00:00:03", "10.1.0.6", None)),
            NetworkUpdate::AddDnsHost(entry("10.1.0.7", &["web", "www"])),
            NetworkUpdate::AddDnsHost(entry("10.1.0.10", &["new"])),
        ],
        "{}",
        p.render(true)
    );
    assert!(p.actions.iter().all(|a| a.symbol == Symbol::Live));
    let text = p.render(true);
    assert!(
        text.contains("add DHCP host 52:54:00:00:00:03 -> 10.1.0.6"),
        "{text}"
    );
    assert!(
        text.contains("ip.dhcp.hosts[mac=52:54:00:00:00:01]"),
        "{text}"
    );
    simulate::apply(&mut observed, &p).unwrap();
    assert!(plan::plan(&d, &observed, &PlanOptions::default()).is_empty());
}

/// DHCP ranges change live (`virNetworkUpdate`: libvirt restarts the network's dnsmasq, the
/// bridge and the guests' links stay): removals, then additions, after the lease and DNS
/// changes; their order is no difference; the last range removed or the first added (DHCP
/// off or on) is live too.
#[test]
fn dhcp_ranges_change_live_even_turning_dhcp_on_or_off() {
    use virtkube::plan::{DhcpRangeUpdate, NetworkUpdate};
    let range = |s: &str, e: &str| (s.to_string(), e.to_string());
    let update = |s: &str, e: &str| DhcpRangeUpdate {
        start: s.into(),
        end: e.into(),
    };
    let mut base = desired();
    base.networks[0].dhcp = vec![range("10.1.0.100", "10.1.0.150")];
    let mut observed = converged(&base);
    assert!(plan::plan(&base, &observed, &PlanOptions::default()).is_empty());
    let mut d = base.clone();
    d.networks[0].dhcp = vec![
        range("10.1.0.160", "10.1.0.200"),
        range("10.1.0.100", "10.1.0.120"),
    ];
    let p = plan::plan(&d, &observed, &PlanOptions::default());
    assert!(p.notices.is_empty(), "{}", p.render(true));
    let on_a: Vec<NetworkUpdate> = p
        .actions
        .iter()
        .filter(|a| a.node == "a")
        .map(|a| match &a.op {
            Op::UpdateNetwork(u) => u.clone(),
            other => panic!("not a live update: {other:?}\n{}", p.render(true)),
        })
        .collect();
    assert_eq!(
        on_a,
        [
            NetworkUpdate::DeleteDhcpRange(update("10.1.0.100", "10.1.0.150")),
            NetworkUpdate::AddDhcpRange(update("10.1.0.100", "10.1.0.120")),
            NetworkUpdate::AddDhcpRange(update("10.1.0.160", "10.1.0.200")),
        ],
        "{}",
        p.render(true)
    );
    assert!(p.actions.iter().all(|a| a.symbol == Symbol::Live));
    assert!(
        p.render(true)
            .contains("add DHCP range 10.1.0.160-10.1.0.200"),
        "{}",
        p.render(true)
    );
    simulate::apply(&mut observed, &p).unwrap();
    assert!(plan::plan(&d, &observed, &PlanOptions::default()).is_empty());
    // The same ranges in another order: nothing to do.
    let mut reordered = d.clone();
    reordered.networks[0].dhcp.reverse();
    assert!(plan::plan(&reordered, &observed, &PlanOptions::default()).is_empty());
    // No range left: DHCP off, live too (libvirt restarts dnsmasq without DHCP); the range
    // changes come after the lease changes, so that restart sees the leases too.
    let mut off = d.clone();
    off.networks[0].dhcp.clear();
    off.networks[0].dhcp_hosts = vec![virtkube::plan::observed::DhcpLease {
        mac: "52:54:00:00:00:01".into(),
        ip: "10.1.0.5".into(),
        name: None,
    }];
    let p = plan::plan(&off, &observed, &PlanOptions::default());
    assert!(p.notices.is_empty(), "{}", p.render(true));
    let on_a: Vec<&Op> = p
        .actions
        .iter()
        .filter(|a| a.node == "a")
        .map(|a| &a.op)
        .collect();
    assert!(
        matches!(
            on_a[..],
            [
                Op::UpdateNetwork(NetworkUpdate::AddDhcpHost(_)),
                Op::UpdateNetwork(NetworkUpdate::DeleteDhcpRange(_)),
                Op::UpdateNetwork(NetworkUpdate::DeleteDhcpRange(_)),
            ]
        ),
        "{}",
        p.render(true)
    );
    simulate::apply(&mut observed, &p).unwrap();
    assert!(plan::plan(&off, &observed, &PlanOptions::default()).is_empty());
    // And back on: live.
    let p = plan::plan(&base, &observed, &PlanOptions::default());
    assert!(p.notices.is_empty(), "{}", p.render(true));
    assert!(
        p.actions
            .iter()
            .all(|a| a.symbol == Symbol::Live && matches!(a.op, Op::UpdateNetwork(_)))
    );
}

/// Without DHCP ranges, the first lease turns DHCP on: dnsmasq reads that only at start, so
/// the network is recreated (and waits for its running guests), never updated live.
#[test]
fn the_first_lease_without_ranges_recreates_the_network() {
    let mut base = desired();
    base.networks[0].dhcp = vec![];
    let observed = converged(&base);
    let mut d = base.clone();
    d.networks[0].dhcp_hosts = vec![virtkube::plan::observed::DhcpLease {
        mac: "52:54:00:00:00:01".into(),
        ip: "10.1.0.5".into(),
        name: None,
    }];
    let p = plan::plan(&d, &observed, &PlanOptions::default());
    let on_b: Vec<&str> = p
        .actions
        .iter()
        .filter(|a| a.node == "b")
        .map(|a| verb_of(&a.op))
        .collect();
    assert_eq!(
        on_b,
        ["delete", "define", "start", "autostart"],
        "{}",
        p.render(true)
    );
    assert!(
        p.notices
            .iter()
            .any(|n| n.kind == NoticeKind::RestartPending && n.node == "a"),
        "{}",
        p.render(true)
    );
}

fn verb_of(op: &Op) -> &'static str {
    match op {
        Op::DeleteNetwork => "delete",
        Op::DefineNetwork(_) => "define",
        Op::StartNetwork => "start",
        Op::SetNetworkAutostart(_) => "autostart",
        _ => "other",
    }
}

/// On a host that plugs devices into running guests (QEMU), adding or removing a disk or a
/// NIC of a running domain is planned live (`~`); what cannot change live (a SATA disk, a
/// changed disk, a disk the guest has not released yet) waits for a restart (`!`), and the
/// model re-plans to nothing after each plan.
#[test]
fn disks_and_nics_are_plugged_in_and_out_live_where_the_host_allows() {
    let hotplug = |o: &mut ObservedState| {
        for h in o.hosts.values_mut() {
            h.device_hotplug = true;
        }
    };
    let base = desired();
    let mut converged_hot = converged(&base);
    hotplug(&mut converged_hot);
    let mac = web(&mut converged_hot).interfaces[0].mac.clone().unwrap();
    let data_disk = |d: &mut DesiredState, bus: &str| {
        let mut disk = dweb(d).disks[0].clone();
        disk.name = "data".into();
        disk.bus = bus.into();
        disk.target = if bus == "sata" { "sda" } else { "vdb" }.into();
        if let virtkube::plan::desired::DesiredDiskSource::Volume { volume, .. } = &mut disk.source
        {
            *volume = "team.data".into();
        }
        dweb(d).disks.push(disk);
    };
    type Check = (
        &'static str,
        Box<dyn Fn(&mut DesiredState, &mut ObservedState)>,
        Box<dyn Fn(&Plan)>,
    );
    let cases: Vec<Check> = vec![
        (
            "a virtio disk added: plugged in live",
            Box::new(move |d, _| data_disk(d, "virtio")),
            Box::new(|p| {
                assert!(matches!(&ops(p)[..], [Op::AttachDisk(disk)] if disk.target == "vdb"));
                assert_eq!(p.actions[0].symbol, Symbol::Live);
                assert!(p.notices.is_empty());
            }),
        ),
        (
            "a disk removed: unplugged live",
            Box::new(|d, _| dweb(d).disks.clear()),
            Box::new(|p| {
                assert_eq!(
                    ops(p),
                    vec![Op::DetachDisk {
                        target: "vda".into()
                    }]
                );
            }),
        ),
        (
            "a NIC added and the old one removed: plugged in and out",
            Box::new(|d, _| dweb(d).interfaces[0].name = "eth1".into()),
            Box::new(move |p| {
                let got = ops(p);
                assert!(
                    matches!(&got[0], Op::AttachInterface(n) if n.name == "eth1"),
                    "{got:?}"
                );
                assert_eq!(got[1], Op::DetachInterface { mac: mac.clone() });
            }),
        ),
        (
            "a SATA disk cannot be hotplugged: restart pending",
            Box::new(move |d, _| data_disk(d, "sata")),
            Box::new(|p| {
                assert!(p.is_empty());
                assert_eq!(p.notices[0].kind, NoticeKind::RestartPending);
                assert_eq!(p.notices[0].changes[0].field, "disks[name=data]");
            }),
        ),
        (
            "a disk's properties cannot change live: restart pending",
            Box::new(|d, _| dweb(d).disks[0].read_only = true),
            Box::new(|p| {
                assert!(p.is_empty());
                assert_eq!(p.notices[0].kind, NoticeKind::RestartPending);
            }),
        ),
        (
            "an unplug the guest did not acknowledge waits for the restart, not asked again",
            Box::new(|d, o| {
                dweb(d).disks.clear();
                web(o).pending_unplug = vec!["disk/vda".into()];
            }),
            Box::new(|p| {
                assert!(p.is_empty(), "{}", p.render(true));
                assert_eq!(p.notices[0].kind, NoticeKind::RestartPending);
                assert!(
                    p.notices[0].changes[0]
                        .before
                        .contains("has not released it")
                );
            }),
        ),
        (
            "... and updatePolicy Restart restarts the guest for it",
            Box::new(|d, o| {
                dweb(d).disks.clear();
                dweb(d).restart_now = true;
                web(o).pending_unplug = vec!["disk/vda".into()];
            }),
            Box::new(|p| {
                assert!(matches!(&ops(p)[..], [Op::RestartDomain { .. }]));
                assert_eq!(p.actions[0].symbol, Symbol::Restart);
            }),
        ),
        (
            "NICs defined before aliases are matched by position: no difference",
            Box::new(|_, o| web(o).interfaces[0].alias = None),
            Box::new(|p| assert!(p.is_empty() && p.notices.is_empty())),
        ),
        (
            "a stopped domain gets its definition rewritten instead",
            Box::new(move |d, o| {
                data_disk(d, "virtio");
                dweb(d).run_strategy = virtkube_crds::domain::RunStrategy::Manual;
                web(o).power = PowerObserved::Shutoff;
            }),
            Box::new(|p| assert!(matches!(&ops(p)[..], [Op::DefineDomain { .. }]))),
        ),
    ];
    for (name, change, check) in cases {
        let mut d = base.clone();
        let mut observed = converged_hot.clone();
        change(&mut d, &mut observed);
        let p = plan::plan(&d, &observed, &PlanOptions::default());
        eprintln!("{name}:\n{}", p.render(true));
        check(&p);
        let mut after = observed.clone();
        simulate::apply(&mut after, &p).unwrap_or_else(|e| panic!("{name}: {e}"));
        if !p
            .notices
            .iter()
            .any(|n| n.kind == NoticeKind::RestartPending)
        {
            let again = plan::plan(&d, &after, &PlanOptions::default());
            assert!(again.is_empty(), "{name}: re-plan\n{}", again.render(true));
        }
    }
    // Without hotplug (the test driver) the same removal waits for a restart.
    let mut d = base.clone();
    dweb(&mut d).disks.clear();
    let p = plan::plan(&d, &converged(&base), &PlanOptions::default());
    assert!(p.is_empty());
    assert_eq!(p.notices[0].kind, NoticeKind::RestartPending);
}

/// Host PCI devices: added or removed live on a running domain where the host hotplugs,
/// otherwise at the next restart; a changed `managed` waits for a restart; a device the
/// node lacks is invalid, one another domain of the node lists is a conflict; a running
/// domain with host devices is never live-migrated. Each plan re-plans to nothing.
#[test]
fn host_devices_are_plugged_in_and_out_and_checked_against_the_node() {
    use virtkube::plan::desired::DesiredHostDevice;
    let gpu = |address: &str| DesiredHostDevice {
        name: "gpu".into(),
        address: address.into(),
        managed: true,
    };
    let devices = |o: &mut ObservedState, hotplug: bool| {
        for h in o.hosts.values_mut() {
            h.device_hotplug = hotplug;
            h.pci_devices = Some(["0000:06:00.0", "0000:07:00.0"].map(String::from).into());
        }
    };
    let mut with_gpu = desired();
    dweb(&mut with_gpu).host_devices.push(gpu("0000:07:00.0"));

    // Created with the device: defined with it, and re-planned to nothing.
    let mut fresh = empty();
    devices(&mut fresh, true);
    let p = plan::plan(&with_gpu, &fresh, &PlanOptions::default());
    let define = p
        .actions
        .iter()
        .find(|a| matches!(a.op, Op::DefineDomain { .. }))
        .unwrap();
    assert!(
        define
            .changes
            .iter()
            .any(|c| c.field == "hostDevices[name=gpu]" && c.after == "0000:07:00.0"),
        "{}",
        p.render(true)
    );
    simulate::apply(&mut fresh, &p).unwrap();
    assert!(plan::plan(&with_gpu, &fresh, &PlanOptions::default()).is_empty());

    let base = desired();
    let mut hot = converged(&base);
    devices(&mut hot, true);
    type Check = (
        &'static str,
        Box<dyn Fn(&mut DesiredState, &mut ObservedState)>,
        Box<dyn Fn(&Plan)>,
    );
    let cases: Vec<Check> = vec![
        (
            "a device added to a running domain: plugged in live",
            Box::new(move |d, _| dweb(d).host_devices.push(gpu("0000:07:00.0"))),
            Box::new(|p| {
                assert!(
                    matches!(&ops(p)[..], [Op::AttachHostDevice(h)] if h.address == "0000:07:00.0"),
                    "{}",
                    p.render(true)
                );
                assert_eq!(p.actions[0].symbol, Symbol::Live);
                assert_eq!(p.actions[0].reason, "plugged in live");
            }),
        ),
        (
            "a device removed: unplugged live",
            Box::new(move |_, o| {
                web(o)
                    .host_devices
                    .push(virtkube::plan::observed::ObservedHostDevice {
                        address: "0000:06:00.0".into(),
                        managed: true,
                        alias: Some("nic".into()),
                    })
            }),
            Box::new(|p| {
                assert_eq!(
                    ops(p),
                    vec![Op::DetachHostDevice {
                        address: "0000:06:00.0".into()
                    }]
                );
                assert_eq!(p.actions[0].changes[0].field, "hostDevices[name=nic]");
            }),
        ),
        (
            "managed changed: restart pending",
            Box::new(move |d, o| {
                dweb(d).host_devices.push(gpu("0000:07:00.0"));
                web(o)
                    .host_devices
                    .push(virtkube::plan::observed::ObservedHostDevice {
                        address: "0000:07:00.0".into(),
                        managed: false,
                        alias: Some("gpu".into()),
                    });
            }),
            Box::new(|p| {
                assert!(p.is_empty());
                assert_eq!(p.notices[0].kind, NoticeKind::RestartPending);
                assert_eq!(p.notices[0].changes[0].before, "0000:07:00.0 (not managed)");
            }),
        ),
        (
            "a device the node lacks: invalid, nothing done",
            Box::new(move |d, _| dweb(d).host_devices.push(gpu("0000:09:00.0"))),
            Box::new(|p| {
                assert!(p.is_empty());
                assert_eq!(p.notices[0].kind, NoticeKind::Invalid);
                assert!(
                    p.notices[0]
                        .message
                        .contains("node a has no PCI device 0000:09:00.0"),
                    "{}",
                    p.notices[0].message
                );
            }),
        ),
        (
            "a device another domain of the node lists: a conflict",
            Box::new(move |d, o| {
                dweb(d).host_devices.push(gpu("0000:07:00.0"));
                let mut other = web(o).clone();
                other.owner = None;
                other
                    .host_devices
                    .push(virtkube::plan::observed::ObservedHostDevice {
                        address: "0000:07:00.0".into(),
                        managed: true,
                        alias: None,
                    });
                o.host_mut("a").domains.insert("foreign".into(), other);
            }),
            Box::new(|p| {
                assert!(p.is_empty());
                assert_eq!(p.notices[0].kind, NoticeKind::Conflict);
                assert!(
                    p.notices[0]
                        .message
                        .contains("already given to domain foreign on node a"),
                    "{}",
                    p.notices[0].message
                );
            }),
        ),
        (
            "a running domain with a device asked to another node: no live migration",
            Box::new(move |d, o| {
                dweb(d).host_devices.push(gpu("0000:07:00.0"));
                web(o)
                    .host_devices
                    .push(virtkube::plan::observed::ObservedHostDevice {
                        address: "0000:07:00.0".into(),
                        managed: true,
                        alias: Some("gpu".into()),
                    });
                dweb(d).node = "b".into();
            }),
            Box::new(|p| {
                assert!(
                    !ops(p)
                        .iter()
                        .any(|op| matches!(op, Op::MigrateDomain { .. })),
                    "{}",
                    p.render(true)
                );
                let n = p
                    .notices
                    .iter()
                    .find(|n| n.kind == NoticeKind::Forbidden)
                    .unwrap();
                assert!(n.message.contains("cannot live-migrate"), "{}", n.message);
            }),
        ),
    ];
    for (name, change, check) in cases {
        let mut d = base.clone();
        let mut observed = hot.clone();
        change(&mut d, &mut observed);
        let p = plan::plan(&d, &observed, &PlanOptions::default());
        eprintln!("{name}:\n{}", p.render(true));
        check(&p);
        if p.notices.is_empty() {
            let mut after = observed.clone();
            simulate::apply(&mut after, &p).unwrap_or_else(|e| panic!("{name}: {e}"));
            let again = plan::plan(&d, &after, &PlanOptions::default());
            assert!(again.is_empty(), "{name}: re-plan\n{}", again.render(true));
        }
    }
    // Without hotplug (the test driver) the same addition waits for a restart.
    let mut cold = converged(&base);
    devices(&mut cold, false);
    let p = plan::plan(&with_gpu, &cold, &PlanOptions::default());
    assert!(p.is_empty());
    assert_eq!(p.notices[0].kind, NoticeKind::RestartPending);
    assert_eq!(p.notices[0].changes[0].field, "hostDevices[name=gpu]");
}

/// CPU weight and bandwidth: only the fields the manifest sets are compared; a weight or a
/// quota removed from the manifest goes back to libvirt's default; changes are live where
/// the host allows (QEMU), otherwise wait for a restart (the test driver).
#[test]
fn cpu_weight_and_bandwidth_are_compared_as_written_and_changed_live() {
    use virtkube::plan::observed::CpuTune;
    let live = |o: &mut ObservedState| {
        for h in o.hosts.values_mut() {
            h.cpu_tune_live = true;
        }
    };
    let mut base = desired();
    dweb(&mut base).cpu_tune = CpuTune {
        shares: Some(512),
        global_period: Some(100_000),
        global_quota: Some(150_000),
        ..CpuTune::default()
    };
    let mut converged_live = converged(&base);
    live(&mut converged_live);
    // What QEMU reports in force for that guest: every field, defaults included.
    web(&mut converged_live).cpu_tune = CpuTune {
        shares: Some(512),
        period: Some(100_000),
        quota: Some(-1),
        global_period: Some(100_000),
        global_quota: Some(150_000),
        emulator_period: Some(100_000),
        emulator_quota: Some(-1),
    };
    let p = plan::plan(&base, &converged_live, &PlanOptions::default());
    assert!(
        p.is_empty() && p.notices.is_empty(),
        "defaults in force are no difference:\n{}",
        p.render(true)
    );

    // Weight and limit changed: one live call, each field shown.
    let mut d = base.clone();
    dweb(&mut d).cpu_tune.shares = Some(2048);
    dweb(&mut d).cpu_tune.global_quota = Some(250_000);
    let p = plan::plan(&d, &converged_live, &PlanOptions::default());
    let shown = p.render(true);
    assert_eq!(p.actions.len(), 1, "{shown}");
    assert_eq!(p.actions[0].symbol, Symbol::Live);
    match &p.actions[0].op {
        Op::SetCpuTune(t) => {
            assert_eq!(t.shares, Some(2048));
            assert_eq!(
                (t.global_period, t.global_quota),
                (Some(100_000), Some(250_000))
            );
            assert_eq!(t.quota, None, "untouched fields are not sent");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        shown.contains("1500m") && shown.contains("2500m"),
        "{shown}"
    );
    let fields: Vec<&str> = p.actions[0]
        .changes
        .iter()
        .map(|c| c.field.as_str())
        .collect();
    assert_eq!(fields, ["cpu.shares", "cpu.limit"]);
    let mut after = converged_live.clone();
    simulate::apply(&mut after, &p).unwrap();
    assert!(plan::plan(&d, &after, &PlanOptions::default()).is_empty());

    // Removed from the manifest: back to weight 1024 and no limit.
    let mut d = base.clone();
    dweb(&mut d).cpu_tune = CpuTune::default();
    let p = plan::plan(&d, &converged_live, &PlanOptions::default());
    match &ops(&p)[..] {
        [Op::SetCpuTune(t)] => {
            assert_eq!(t.shares, Some(1024));
            assert_eq!(t.global_quota, Some(-1));
        }
        other => panic!("{other:?}\n{}", p.render(true)),
    }

    // A per-vCPU quota with its period.
    let mut d = base.clone();
    dweb(&mut d).cpu_tune.quota = Some(50_000);
    dweb(&mut d).cpu_tune.period = Some(200_000);
    let p = plan::plan(&d, &converged_live, &PlanOptions::default());
    match &ops(&p)[..] {
        [Op::SetCpuTune(t)] => assert_eq!((t.period, t.quota), (Some(200_000), Some(50_000))),
        other => panic!("{other:?}"),
    }

    // The test driver cannot change them live: a restart, or a redefinition when stopped.
    let on_test_driver = converged(&base);
    let mut d = base.clone();
    dweb(&mut d).cpu_tune.shares = Some(2048);
    let p = plan::plan(&d, &on_test_driver, &PlanOptions::default());
    assert!(p.is_empty());
    assert_eq!(p.notices[0].kind, NoticeKind::RestartPending);
    assert_eq!(p.notices[0].changes[0].field, "cpu.shares");
    let mut stopped = on_test_driver.clone();
    web(&mut stopped).power = PowerObserved::Shutoff;
    dweb(&mut d).run_strategy = virtkube_crds::domain::RunStrategy::Manual;
    let p = plan::plan(&d, &stopped, &PlanOptions::default());
    assert!(
        matches!(&ops(&p)[..], [Op::DefineDomain { .. }]),
        "{}",
        p.render(true)
    );
}
