//! Property tests of the planner against the host model ([`virtkube::plan::simulate`]):
//! generated manifests and generated (drifted, partly foreign) host states.
//!
//! - applying a plan and re-planning converges (within the rounds a live migration needs)
//!   and then plans nothing;
//! - every plan is ordered by dependencies;
//! - no plan touches an object without virtkube's mark (or with another resource's mark),
//!   and no plan deletes a retained volume.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use virtkube::plan::desired::{
    DesiredDisk, DesiredDiskSource, DesiredDomain, DesiredMigration, DesiredNetwork, DesiredNic,
    DesiredPool, DesiredState, DesiredVolume, VolumeOrigin,
};
use virtkube::plan::observed::{ObservedState, OwnerMark, PowerObserved};
use virtkube::plan::{self, Action, ObjectKind, Op, Plan, PlanOptions, simulate};
use virtkube_crds::domain::{PowerState, RunStrategy};

const NODES: [&str; 2] = ["a", "b"];

#[derive(Debug, Clone)]
struct DomainParams {
    node: usize,
    strategy: u8,
    paused: bool,
    autostart: bool,
    vcpus: u32,
    extra_vcpus: u32,
    memory_mib: u64,
    extra_memory_mib: u64,
    pins: Vec<(u32, u8)>,
    emulator: Option<u8>,
    disks: Vec<usize>,
    nics: Vec<usize>,
    machine: Option<bool>,
    restart_now: bool,
}

fn domain_params() -> impl Strategy<Value = DomainParams> {
    (
        (
            0..2usize,
            0..4u8,
            any::<bool>(),
            any::<bool>(),
            1..4u32,
            0..3u32,
        ),
        (
            1..8u64,
            0..4u64,
            proptest::collection::vec((0..6u32, 0..4u8), 0..3),
            proptest::option::of(0..4u8),
        ),
        (
            proptest::collection::vec(0..4usize, 0..3),
            proptest::collection::vec(0..2usize, 0..3),
            proptest::option::of(any::<bool>()),
            any::<bool>(),
        ),
    )
        .prop_map(
            |(
                (node, strategy, paused, autostart, vcpus, extra_vcpus),
                (memory_mib, extra_memory_mib, pins, emulator),
                (disks, nics, machine, restart_now),
            )| DomainParams {
                node,
                strategy,
                paused,
                autostart,
                vcpus,
                extra_vcpus,
                memory_mib,
                extra_memory_mib,
                pins,
                emulator,
                disks,
                nics,
                machine,
                restart_now,
            },
        )
}

#[derive(Debug, Clone)]
struct World {
    volumes: Vec<(u8, u64, bool, usize)>,
    networks: Vec<bool>,
    domains: Vec<DomainParams>,
}

fn world() -> impl Strategy<Value = World> {
    (
        proptest::collection::vec((0..3u8, 1..8u64, any::<bool>(), 0..2usize), 0..4),
        proptest::collection::vec(any::<bool>(), 0..3),
        proptest::collection::vec(domain_params(), 0..4),
    )
        .prop_map(|(volumes, networks, domains)| World {
            volumes,
            networks,
            domains,
        })
}

fn owner(kind: &str, ns: Option<&str>, name: &str) -> OwnerMark {
    OwnerMark::for_resource(kind, ns, name, None)
}

/// Turns generated parameters into a desired state (always valid, as the manifest loader
/// would accept it).
fn build(w: &World) -> DesiredState {
    let mut d = DesiredState {
        pools: vec![DesiredPool {
            name: "images".into(),
            owner: owner("StoragePool", None, "images"),
            origin: "gen".into(),
            pool_type: "dir".into(),
            target_path: Some("/pools/images".into()),
            source: Default::default(),
            build: false,
            autostart: true,
            only_on: None,
        }],
        ..DesiredState::default()
    };
    for (i, autostart) in w.networks.iter().enumerate() {
        let name = format!("net{i}");
        d.networks.push(DesiredNetwork {
            owner: owner("Network", None, &name),
            name,
            origin: "gen".into(),
            mode: "isolated".into(),
            bridge: None,
            ip: Some((format!("10.{i}.0.1"), 24)),
            dhcp: vec![],
            dhcp_hosts: vec![],
            dns_hosts: vec![],
            autostart: *autostart,
            only_on: None,
        });
    }
    for (i, (source, gib, retain, node)) in w.volumes.iter().enumerate() {
        let short = format!("v{i}");
        let node = NODES[*node].to_string();
        // A source must be an earlier volume on the same node.
        let earlier = (0..i).rev().find(|j| NODES[w.volumes[*j].3] == node);
        let origin = match (source, earlier) {
            (1, Some(j)) => VolumeOrigin::Clone(format!("ns.v{j}")),
            (2, Some(j)) => VolumeOrigin::Backing(format!("ns.v{j}")),
            _ => VolumeOrigin::Empty,
        };
        d.volumes.push(DesiredVolume {
            name: format!("ns.{short}"),
            display: format!("ns/{short}"),
            owner: owner("Volume", Some("ns"), &short),
            origin: "gen".into(),
            node,
            pool: "images".into(),
            capacity: Some(gib << 30),
            format: "qcow2".into(),
            source: origin,
            retain: *retain,
        });
    }
    for (i, p) in w.domains.iter().enumerate() {
        let short = format!("d{i}");
        let node = NODES[p.node].to_string();
        let max_vcpus = p.vcpus + p.extra_vcpus;
        let strategy = match p.strategy {
            0 => RunStrategy::Always,
            1 => RunStrategy::RerunOnFailure,
            2 => RunStrategy::Manual,
            _ => RunStrategy::Halted,
        };
        let state = match (strategy, p.paused) {
            (RunStrategy::Halted, _) => PowerState::Stopped,
            (_, true) => PowerState::Paused,
            _ => PowerState::Running,
        };
        let mut disks = Vec::new();
        let mut seen = BTreeSet::new();
        for v in &p.disks {
            if *v < d.volumes.len() && d.volumes[*v].node == node && seen.insert(*v) {
                disks.push(DesiredDisk {
                    name: format!("disk{v}"),
                    target: format!("vd{}", (b'a' + disks.len() as u8) as char),
                    bus: "virtio".into(),
                    device: "disk".into(),
                    source: DesiredDiskSource::Volume {
                        volume: d.volumes[*v].name.clone(),
                        pool: Some("images".into()),
                        format: Some("qcow2".into()),
                    },
                    read_only: false,
                    boot_order: None,
                });
            }
        }
        let nics = p
            .nics
            .iter()
            .filter(|n| **n < d.networks.len())
            .enumerate()
            .map(|(k, n)| DesiredNic {
                name: format!("nic{k}"),
                network: d.networks[*n].name.clone(),
                model: "virtio".into(),
                mac: None,
            })
            .collect();
        d.domains.push(DesiredDomain {
            name: format!("ns.{short}"),
            display: format!("ns/{short}"),
            owner: owner("Domain", Some("ns"), &short),
            origin: "gen".into(),
            node,
            run_strategy: strategy,
            state,
            explicit_state: p.paused,
            autostart: p.autostart,
            vcpus: p.vcpus,
            max_vcpus,
            cpu_mode: None,
            cpu_model: None,
            topology: None,
            pinning: p
                .pins
                .iter()
                .filter(|(v, _)| *v < max_vcpus)
                .map(|(v, c)| (*v, c.to_string()))
                .collect::<BTreeMap<_, _>>(),
            emulator_cpuset: p.emulator.map(|c| format!("0-{c}")),
            cpu_tune: virtkube::plan::observed::CpuTune {
                shares: (p.vcpus % 2 == 0).then_some(512),
                ..Default::default()
            },
            memory_kib: p.memory_mib * 256 * 1024,
            max_memory_kib: (p.memory_mib + p.extra_memory_mib) * 256 * 1024,
            hugepage_kib: None,
            machine: p
                .machine
                .map(|q| if q { "q35".into() } else { "pc".into() }),
            arch: None,
            firmware: None,
            boot: vec![],
            kernel: None,
            initrd: None,
            cmdline: None,
            disks,
            interfaces: nics,
            host_devices: vec![],
            restart_now: p.restart_now,
            migration: DesiredMigration {
                live: true,
                ..DesiredMigration::default()
            },
        });
    }
    d
}

fn empty_hosts() -> ObservedState {
    let mut o = ObservedState::default();
    for n in NODES {
        o.host_mut(n);
    }
    // Node a knows its online CPUs (a removed pin floats again); node b does not (a removed
    // pin is left as it is): both must converge.
    o.host_mut("a").online_cpus = Some("0-63".into());
    o
}

/// Drift the hosts the way the world does: guests stop, crash, get paused, re-pinned or
/// unpinned by hand, autostart flips; plus foreign objects that clash by name.
fn drift(o: &mut ObservedState, seed: &[u8]) {
    let mut it = seed.iter().copied().cycle();
    for host in o.hosts.values_mut() {
        for d in host.domains.values_mut() {
            match it.next().unwrap_or(0) % 8 {
                0 => {
                    d.power = PowerObserved::Shutoff;
                    d.reason = "shutdown".into()
                }
                1 => {
                    d.power = PowerObserved::Shutoff;
                    d.reason = "crashed".into()
                }
                2 => d.power = PowerObserved::Crashed,
                3 if d.power == PowerObserved::Running => {
                    d.power = PowerObserved::Paused;
                    d.reason = "user".into()
                }
                4 => d.autostart = !d.autostart,
                5 => {
                    d.pinning.insert(0, "0-63".into());
                }
                6 => {
                    d.pinning.insert(1, "5".into());
                    d.emulator_cpuset = Some("7".into());
                }
                _ => {}
            }
        }
        for n in host.networks.values_mut() {
            if it.next().unwrap_or(0) % 4 == 0 {
                n.active = false;
            }
        }
    }
    if let Some(b) = seed.first()
        && b % 3 == 0
    {
        // A hand-made domain whose name clashes with a generated one.
        let host = o.host_mut("a");
        if let Some(mut twin) = host.domains.values().next().cloned() {
            twin.owner = None;
            host.domains.insert("ns.d1".into(), twin);
        }
    }
}

/// Observed owner check: every action on an object that exists must find virtkube's mark for
/// the same resource (volumes: virtkube made it).
fn check_ownership(
    p: &Plan,
    observed: &ObservedState,
    desired: &DesiredState,
) -> Result<(), TestCaseError> {
    for a in &p.actions {
        let Some(host) = observed.hosts.get(&a.node) else {
            continue;
        };
        match a.object.kind {
            ObjectKind::Domain => {
                if let Some(d) = host.domains.get(&a.object.name) {
                    prop_assert!(
                        d.owner.as_ref().is_some_and(|m| m.same_resource(&a.owner)),
                        "acted on foreign domain: {a:?}"
                    );
                }
            }
            ObjectKind::Network => {
                if let Some(n) = host.networks.get(&a.object.name) {
                    prop_assert!(
                        n.owner.as_ref().is_some_and(|m| m.same_resource(&a.owner)),
                        "acted on foreign network: {a:?}"
                    );
                }
            }
            ObjectKind::StoragePool => {
                if let Some(x) = host.pools.get(&a.object.name) {
                    prop_assert!(
                        x.owner.as_ref().is_some_and(|m| m.same_resource(&a.owner)),
                        "acted on foreign pool: {a:?}"
                    );
                }
            }
            ObjectKind::Volume => {
                if let Some(v) = host
                    .volumes
                    .iter()
                    .find(|((_, n), _)| n == &a.object.name)
                    .map(|(_, v)| v)
                {
                    prop_assert!(v.owned, "acted on a volume virtkube did not create: {a:?}");
                }
                if let Op::DeleteVolume { .. } = a.op {
                    let d = desired.volumes.iter().find(|v| v.name == a.object.name);
                    prop_assert!(
                        d.is_some_and(|d| !d.retain),
                        "deleted a retained (or unknown-policy) volume: {a:?}"
                    );
                }
            }
        }
    }
    Ok(())
}

/// A deletion of the teardown phase (a network recreated in place is a restart, not this).
fn is_teardown(a: &Action) -> bool {
    a.symbol == plan::Symbol::Delete
        && matches!(
            a.op,
            Op::DeletePool | Op::DeleteNetwork | Op::DeleteVolume { .. }
        )
}

fn check_order(p: &Plan) -> Result<(), TestCaseError> {
    for a in &p.actions {
        prop_assert!(
            a.depends_on.iter().all(|d| *d < a.id),
            "dependency after its dependent: {a:?}"
        );
    }
    // Creations and changes: pools, volumes, networks, domains; teardown after, reversed.
    let build: Vec<ObjectKind> = p
        .actions
        .iter()
        .filter(|a| !is_teardown(a) && a.op != Op::DeleteDomain)
        .map(|a| a.object.kind)
        .collect();
    prop_assert!(
        build.windows(2).all(|w| w[0] <= w[1]),
        "creation order {build:?}"
    );
    let first_teardown = p
        .actions
        .iter()
        .position(is_teardown)
        .unwrap_or(p.actions.len());
    prop_assert!(
        p.actions[first_teardown..]
            .iter()
            .all(|a| is_teardown(a) || a.op == Op::DeleteDomain)
    );
    let teardown: Vec<ObjectKind> = p.actions[first_teardown..]
        .iter()
        .map(|a| a.object.kind)
        .collect();
    prop_assert!(
        teardown.windows(2).all(|w| w[0] >= w[1]),
        "teardown order {teardown:?}"
    );
    // What a domain definition uses and the same plan creates comes first (transitively).
    let reach = |from: usize| {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from];
        while let Some(x) = stack.pop() {
            for d in &p.actions[x].depends_on {
                if seen.insert(*d) {
                    stack.push(*d);
                }
            }
        }
        seen
    };
    for a in &p.actions {
        if let Op::DefineDomain { domain, .. } = &a.op {
            let before = reach(a.id);
            for b in &p.actions {
                let used = match (&b.op, b.node == a.node) {
                    (Op::CreateVolume { .. }, true) => domain.disks.iter().any(|d| matches!(&d.source, DesiredDiskSource::Volume { volume, .. } if *volume == b.object.name)),
                    (Op::StartNetwork, true) => domain.interfaces.iter().any(|n| n.network == b.object.name),
                    _ => false,
                };
                if used {
                    prop_assert!(
                        before.contains(&b.id),
                        "{:?} does not wait for {:?}",
                        a.object,
                        b.object
                    );
                }
            }
        }
    }
    Ok(())
}

fn converge(
    desired: &DesiredState,
    observed: &mut ObservedState,
    options: &PlanOptions,
) -> Result<Plan, TestCaseError> {
    let mut last = Plan::default();
    for _round in 0..3 {
        last = plan::plan(desired, observed, options);
        check_order(&last)?;
        check_ownership(&last, observed, desired)?;
        if last.is_empty() {
            return Ok(last);
        }
        simulate::apply(observed, &last)
            .map_err(|e| TestCaseError::fail(format!("{e}\n{}", last.render(true))))?;
    }
    let again = plan::plan(desired, observed, options);
    prop_assert!(
        again.is_empty(),
        "not converged after 3 rounds:\n{}\nlast applied:\n{}",
        again.render(true),
        last.render(true)
    );
    Ok(again)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn apply_then_replan_converges_in_order_and_respects_ownership(before in world(), after in world(), seed in proptest::collection::vec(any::<u8>(), 1..16), prune in any::<bool>()) {
        // Hosts as an earlier apply left them, then drift.
        let mut observed = empty_hosts();
        converge(&build(&before), &mut observed, &PlanOptions::default())?;
        drift(&mut observed, &seed);
        // Now the manifests changed.
        let desired = build(&after);
        let options = PlanOptions { prune };
        let done = converge(&desired, &mut observed, &options)?;
        prop_assert!(done.is_empty());
        if prune {
            // Nothing local-owned survives that the manifests do not name, except volumes.
            for host in observed.hosts.values() {
                for (name, d) in &host.domains {
                    if d.owner.as_ref().is_some_and(OwnerMark::is_local) {
                        prop_assert!(desired.domains.iter().any(|x| &x.name == name), "{name} survived prune");
                    }
                }
            }
        }
    }

    #[test]
    fn delete_never_removes_retained_or_foreign_objects(w in world(), seed in proptest::collection::vec(any::<u8>(), 1..16)) {
        let desired = build(&w);
        let mut observed = empty_hosts();
        converge(&desired, &mut observed, &PlanOptions::default())?;
        drift(&mut observed, &seed);
        let p = plan::plan_delete(&desired, &observed);
        check_order(&p)?;
        check_ownership(&p, &observed, &desired)?;
        simulate::apply(&mut observed, &p).map_err(|e| TestCaseError::fail(e.to_string()))?;
        for v in desired.volumes.iter().filter(|v| v.retain) {
            // Retained volumes stay on disk; undefining their pool hides them from libvirt only.
            prop_assert!(!p.actions.iter().any(|a| a.object.name == v.name), "retained {} touched", v.name);
        }
    }
}
