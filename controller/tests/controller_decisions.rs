//! The controller's pure decisions, table-tested: the scheduler's filters, score and
//! messages; binding; moves (storage, cancel, pending timeout, backoff); drain; liveness
//! and fencing; volume binding; routing labels.

mod controller_support;

use std::collections::BTreeSet;

use controller_support::*;
use serde_json::json;
use virtkube::cluster::decide::{Decision, Inputs, decide};
use virtkube::cluster::drain::Role;
use virtkube::cluster::labels::{domain_labels, label_patch, volume_labels};
use virtkube::cluster::moves::{Backoff, MoveWait, backoff_key};
use virtkube::cluster::scheduler::{self, Refusal, Refused, choose, demand};
use virtkube::cluster::settings::Settings;
use virtkube::cluster::usage::Usage;
use virtkube::cluster::volumes::{Consumers, decide_volume};
use virtkube::placement::ControllerStep;
use virtkube_crds::conditions::find;
use virtkube_crds::domain::MigrationState;
use virtkube_crds::{Domain, Volume};

fn settings() -> Settings {
    Settings::default()
}

/// Decides `dom` in `world` (whose domains count as placed) at `t`.
fn decide_at(
    world: &World,
    dom: &Domain,
    backoff: &Backoff,
    t: k8s_openapi::jiff::Timestamp,
) -> Decision {
    let s = settings();
    let cluster = world.cluster_at(&s, t);
    let domains = world.domains();
    let usage = Usage::of(&domains);
    decide(
        dom,
        &Inputs {
            cluster: &cluster,
            usage: &usage,
            settings: &s,
            backoff,
            now: t,
        },
    )
}

fn decide_now(world: &World, dom: &Domain) -> Decision {
    decide_at(world, dom, &Backoff::default(), now())
}

fn three_nodes() -> World {
    World {
        hvns: vec![
            hvn("node-a", "2Gi", 8, 10),
            hvn("node-b", "16Gi", 8, 10),
            hvn("node-c", "16Gi", 8, 10),
        ],
        nodes: vec![
            k8s_node("node-a", false, json!([])),
            k8s_node("node-b", true, json!([])),
            k8s_node("node-c", false, json!([])),
        ],
        networks: vec![network("vk-nat", &["node-a", "node-b"])],
        ..World::default()
    }
}

#[test]
fn the_unschedulable_message_names_each_node_and_why_as_kubectl_does() {
    let world = three_nodes();
    let dom: Domain = obj(with(
        domain("default", "web", "2Gi"),
        json!({"spec": {"interfaces": [{"name": "nic0", "network": "vk-nat"}]}}),
    ));
    let s = settings();
    let cluster = world.cluster(&s);
    let d = demand(&dom, &cluster).unwrap();
    let refused = choose(&d, &cluster, &Usage::default(), &s, None).unwrap_err();
    assert_eq!(
        refused.message(),
        "0/3 nodes are available: node-a: insufficient memory (needs 2Gi, 1Gi left); node-b: cordoned; node-c: network vk-nat not active"
    );
    assert_eq!(
        refused.reasons(),
        BTreeSet::from(["cordoned", "insufficient_memory", "network_inactive"])
    );
}

#[test]
fn each_filter_refuses_in_its_own_words() {
    // (what the node or the domain has, the refusal expected on node-a)
    let base = || World {
        hvns: vec![hvn("node-a", "8Gi", 4, 10)],
        ..World::default()
    };
    let plain = domain("default", "vm", "1Gi");
    let cases: Vec<(&str, World, serde_json::Value, &str)> = vec![
        (
            "drain taint, even with a toleration of everything",
            World {
                nodes: vec![k8s_node(
                    "node-a",
                    false,
                    json!([{"key": "virtkube.io/drain", "effect": "NoSchedule"}]),
                )],
                ..base()
            },
            with(
                plain.clone(),
                json!({"spec": {"tolerations": [{"operator": "Exists"}]}}),
            ),
            "draining (virtkube.io/drain)",
        ),
        (
            "a NoSchedule taint not tolerated",
            World {
                nodes: vec![k8s_node(
                    "node-a",
                    false,
                    json!([{"key": "gpu", "value": "yes", "effect": "NoSchedule"}]),
                )],
                ..base()
            },
            plain.clone(),
            "taint gpu=yes:NoSchedule not tolerated",
        ),
        (
            "a node selector",
            base(),
            with(
                plain.clone(),
                json!({"spec": {"nodeSelector": {"zone": "b"}}}),
            ),
            "node selector zone=b not matched",
        ),
        (
            "a pool not running there",
            World {
                pools: vec![pool("images", true, &["node-z"])],
                volumes: vec![volume("default", "root", "images")],
                ..base()
            },
            with(
                plain.clone(),
                json!({"spec": {"disks": [{"name": "root", "volume": "root"}]}}),
            ),
            "pool images not running",
        ),
        (
            "a node-local volume on another node",
            World {
                pools: vec![pool("local", false, &["node-a", "node-z"])],
                volumes: vec![with(
                    volume("default", "data", "local"),
                    json!({"status": {"nodeName": "node-z"}}),
                )],
                ..base()
            },
            with(
                plain.clone(),
                json!({"spec": {"disks": [{"name": "data", "volume": "data"}]}}),
            ),
            "volume data is on node node-z",
        ),
        (
            "a pinned CPU the node lacks",
            base(),
            with(
                plain.clone(),
                json!({"spec": {"cpu": {"vcpus": 1, "pinning": [{"vcpu": 0, "cpuset": "6"}]}}}),
            ),
            "pinned CPU 6 missing (4 CPUs)",
        ),
        (
            "a pinned CPU another domain holds",
            World {
                domains: vec![with(
                    domain("default", "other", "1Gi"),
                    json!({"spec": {"cpu": {"vcpus": 1, "pinning": [{"vcpu": 0, "cpuset": "2-3"}]}},
                           "status": {"nodeName": "node-a"}}),
                )],
                ..base()
            },
            with(
                plain.clone(),
                json!({"spec": {"cpu": {"vcpus": 1, "pinning": [{"vcpu": 0, "cpuset": "3"}]}}}),
            ),
            "pinned CPU 3 taken by default/other",
        ),
        (
            "a PCI device the node does not list",
            base(),
            with(
                plain.clone(),
                json!({"spec": {"hostDevices": [{"name": "gpu", "address": "0000:07:00.0"}]}}),
            ),
            "no PCI device 0000:07:00.0",
        ),
        (
            "a PCI device another domain of the node has",
            World {
                hvns: vec![with_pci(hvn("node-a", "8Gi", 4, 10), &["0000:07:00.0"])],
                domains: vec![with(
                    domain("default", "other", "1Gi"),
                    json!({"spec": {"hostDevices": [{"name": "t4", "address": "0000:07:00.0"}]},
                           "status": {"nodeName": "node-a"}}),
                )],
                ..base()
            },
            with(
                plain.clone(),
                json!({"spec": {"hostDevices": [{"name": "gpu", "address": "0000:07:00.0"}]}}),
            ),
            "PCI device 0000:07:00.0 taken by default/other",
        ),
        (
            "more vCPUs than the node allows a guest",
            base(),
            with(plain.clone(), json!({"spec": {"cpu": {"vcpus": 80}}})),
            "too many vCPUs (needs 80, at most 64)",
        ),
        (
            "a stale heartbeat",
            World {
                hvns: vec![hvn("node-a", "8Gi", 4, 600)],
                ..World::default()
            },
            plain.clone(),
            "heartbeat stale",
        ),
        (
            "fenced (annotated and silent)",
            World {
                hvns: vec![with(
                    hvn("node-a", "8Gi", 4, 600),
                    json!({"metadata": {"annotations": {"virtkube.io/fenced": "true"}}}),
                )],
                ..World::default()
            },
            plain.clone(),
            "fenced",
        ),
        (
            "not Ready",
            World {
                hvns: vec![with(
                    hvn("node-a", "8Gi", 4, 10),
                    json!({"status": {"conditions": [{"type": "Ready", "status": "False", "reason": "LibvirtUnreachable", "message": "", "lastTransitionTime": NOW}]}}),
                )],
                ..World::default()
            },
            plain.clone(),
            "not Ready (False, LibvirtUnreachable)",
        ),
    ];
    let s = settings();
    for (what, world, dom, expected) in cases {
        let dom: Domain = obj(dom);
        let cluster = world.cluster(&s);
        let usage = Usage::of(&world.domains());
        let d = demand(&dom, &cluster).unwrap_or_else(|p| panic!("{what}: {p:?}"));
        let refused = choose(&d, &cluster, &usage, &s, None).unwrap_err();
        let why: Vec<String> = refused.nodes[0].1.iter().map(ToString::to_string).collect();
        assert_eq!(why, vec![expected.to_string()], "{what}");
    }
}

#[test]
fn tolerations_match_as_kubernetes_matches_them() {
    let taint = scheduler::tolerated;
    let t = |key: &str, value: Option<&str>, effect: &str| virtkube::cluster::view::NodeTaint {
        key: key.into(),
        value: value.map(str::to_string),
        effect: effect.into(),
    };
    let tol = |v: serde_json::Value| -> Vec<virtkube_crds::domain::Toleration> { obj(v) };
    let gpu = t("gpu", Some("yes"), "NoSchedule");
    // (tolerations, tolerated?)
    let cases = [
        (json!([{"key": "gpu", "value": "yes"}]), true),
        (json!([{"key": "gpu", "value": "no"}]), false),
        (json!([{"key": "gpu", "operator": "Exists"}]), true),
        (json!([{"operator": "Exists"}]), true),
        (
            json!([{"key": "gpu", "operator": "Exists", "effect": "NoExecute"}]),
            false,
        ),
        (
            json!([{"key": "gpu", "value": "yes", "effect": "NoSchedule"}]),
            true,
        ),
        (json!([]), false),
    ];
    for (tolerations, expected) in cases {
        assert_eq!(
            taint(&tol(tolerations.clone()), &gpu),
            expected,
            "{tolerations}"
        );
    }
    assert!(!taint(
        &tol(json!([{"operator": "Exists"}])),
        &t("virtkube.io/drain", None, "NoSchedule")
    ));
}

#[test]
fn the_score_prefers_most_memory_left_then_the_name_and_avoids_prefer_no_schedule() {
    let s = settings();
    let dom: Domain = obj(domain("default", "vm", "1Gi"));
    let pick = |world: &World| {
        let cluster = world.cluster(&s);
        let usage = Usage::of(&world.domains());
        choose(&demand(&dom, &cluster).unwrap(), &cluster, &usage, &s, None)
            .unwrap()
            .node
    };
    let mut world = World {
        hvns: vec![
            hvn("node-b", "8Gi", 4, 1),
            hvn("node-a", "8Gi", 4, 1),
            hvn("node-c", "4Gi", 4, 1),
        ],
        ..World::default()
    };
    assert_eq!(pick(&world), "node-a", "equal memory: by name");
    world.domains.push(with(
        domain("default", "big", "2Gi"),
        json!({"status": {"nodeName": "node-a"}}),
    ));
    assert_eq!(pick(&world), "node-b", "node-a has less left now");
    // A domain moving to node-b counts there too.
    world.domains.push(with(
        domain("default", "moving", "3Gi"),
        json!({"status": {"nodeName": "node-c", "migration": {"state": "Running", "sourceNode": "node-c", "targetNode": "node-b"}}}),
    ));
    assert_eq!(pick(&world), "node-a");
    world.nodes.push(k8s_node(
        "node-a",
        false,
        json!([{"key": "slow", "effect": "PreferNoSchedule"}]),
    ));
    assert_eq!(
        pick(&world),
        "node-b",
        "PreferNoSchedule avoided while another fits"
    );
}

#[test]
fn a_message_names_sixteen_nodes_and_sums_up_the_rest() {
    let s = settings();
    let world = World {
        hvns: (0..20)
            .map(|i| hvn(&format!("n{i:02}"), "1Gi", 4, 1))
            .collect(),
        ..World::default()
    };
    let dom: Domain = obj(domain("default", "vm", "1Gi"));
    let cluster = world.cluster(&s);
    let refused = choose(
        &demand(&dom, &cluster).unwrap(),
        &cluster,
        &Usage::default(),
        &s,
        None,
    )
    .unwrap_err();
    let message = refused.message();
    assert!(
        message
            .starts_with("0/20 nodes are available: n00: insufficient memory (needs 1Gi, 0 left)"),
        "{message}"
    );
    assert!(message.contains("n15: insufficient memory"), "{message}");
    assert!(!message.contains("n16:"), "{message}");
    assert!(
        message.ends_with("and 4 more nodes (4 insufficient memory)"),
        "{message}"
    );
    let none = Refused {
        total: 0,
        ..Refused::default()
    };
    assert_eq!(
        none.message(),
        "0/0 nodes are available: no HypervisorNode exists yet (no node agent has registered)"
    );
}

#[test]
fn the_scheduler_binds_where_it_fits_and_says_why_when_nothing_does() {
    let mut world = three_nodes();
    let dom: Domain = obj(domain("default", "web", "2Gi"));
    let d = decide_now(&world, &dom);
    assert_eq!(
        d.step,
        ControllerStep::Bind {
            node: "node-c".into()
        }
    );
    assert_eq!(d.status.node_name.as_deref(), Some("node-c"));
    let scheduled = find(&d.status.conditions, "Scheduled").unwrap();
    assert_eq!(
        (scheduled.status.as_str(), scheduled.reason.as_str()),
        ("True", "NodeAssigned")
    );
    assert!(d.notes.iter().any(|n| n.reason == "Scheduled"));

    world.hvns.truncate(1);
    let d = decide_now(&world, &dom);
    assert_eq!(d.step, ControllerStep::Unschedulable);
    assert_eq!(d.status.node_name, None);
    let scheduled = find(&d.status.conditions, "Scheduled").unwrap();
    assert_eq!(scheduled.reason, "Unschedulable");
    assert_eq!(
        scheduled.message,
        "0/1 nodes are available: node-a: insufficient memory (needs 2Gi, 1Gi left)"
    );
    assert!(
        d.notes
            .iter()
            .any(|n| n.reason == "FailedScheduling" && n.warning)
    );

    let missing: Domain = obj(with(
        domain("default", "db", "1Gi"),
        json!({"spec": {"disks": [{"name": "d", "volume": "data"}]}}),
    ));
    let d = decide_now(&world, &missing);
    assert_eq!(
        find(&d.status.conditions, "Scheduled").unwrap().message,
        "0/1 nodes are available: volume data does not exist"
    );
}

#[test]
fn spec_node_name_binds_to_a_ready_node_even_when_it_does_not_fit() {
    let world = three_nodes();
    let cases = [
        (
            "node-a",
            Some("node-a"),
            "Requested",
            "bound to node-a as spec.nodeName requests, although the scheduler would refuse it: insufficient memory (needs 2Gi, 1Gi left)",
        ),
        (
            "node-b",
            Some("node-b"),
            "Requested",
            "bound to node-b as spec.nodeName requests, although the scheduler would refuse it: cordoned",
        ),
        (
            "node-x",
            None,
            "RequestedNodeUnavailable",
            "spec.nodeName is node-x, which has no HypervisorNode (no agent registered under that name)",
        ),
    ];
    for (requested, bound, reason, message) in cases {
        let dom: Domain = obj(with(
            domain("default", "web", "2Gi"),
            json!({"spec": {"nodeName": requested}}),
        ));
        let d = decide_now(&world, &dom);
        assert_eq!(d.status.node_name.as_deref(), bound, "{requested}");
        let c = find(&d.status.conditions, "Scheduled").unwrap();
        assert_eq!((c.reason.as_str(), c.message.as_str()), (reason, message));
    }
    let mut stale = three_nodes();
    stale.hvns[2] = hvn("node-c", "16Gi", 8, 600);
    let dom: Domain = obj(with(
        domain("default", "web", "2Gi"),
        json!({"spec": {"nodeName": "node-c"}}),
    ));
    let d = decide_now(&stale, &dom);
    assert_eq!(d.step, ControllerStep::Unschedulable);
    assert_eq!(
        find(&d.status.conditions, "Scheduled").unwrap().message,
        "spec.nodeName is node-c, which is heartbeat stale"
    );
}

/// `hvn` with PCI devices at `addresses` in its host facts.
fn with_pci(hvn: serde_json::Value, addresses: &[&str]) -> serde_json::Value {
    let devices: Vec<serde_json::Value> = addresses
        .iter()
        .map(|a| json!({"address": a, "name": format!("pci_{}", a.replace([':', '.'], "_")), "vendorId": "0x10de", "productId": "0x1eb8"}))
        .collect();
    with(hvn, json!({"status": {"host": {"pciDevices": devices}}}))
}

#[test]
fn host_devices_place_a_domain_only_where_listed_and_it_moves_only_cold() {
    let gpu = json!({"spec": {"hostDevices": [{"name": "gpu", "address": "0000:07:00.0"}]}});
    // node-b has the device but less memory: without it node-a would win on the score.
    let world = World {
        hvns: vec![
            hvn("node-a", "16Gi", 8, 1),
            with_pci(
                hvn("node-b", "4Gi", 8, 1),
                &["0000:07:00.0", "0000:08:00.0"],
            ),
        ],
        ..World::default()
    };
    let s = settings();
    let cluster = world.cluster(&s);
    let dom: Domain = obj(with(domain("default", "ml", "1Gi"), gpu.clone()));
    let d = demand(&dom, &cluster).unwrap();
    let choice = choose(&d, &cluster, &Usage::default(), &s, None).unwrap();
    assert_eq!(choice.node, "node-b");

    // A second domain with the same device finds no node: node-b's is taken.
    let placed: Domain = obj(with(
        domain("default", "ml", "1Gi"),
        with(gpu.clone(), json!({"status": {"nodeName": "node-b"}})),
    ));
    let usage = Usage::of([&placed]);
    let second: Domain = obj(with(domain("default", "ml2", "1Gi"), gpu.clone()));
    let refused = choose(
        &demand(&second, &cluster).unwrap(),
        &cluster,
        &usage,
        &s,
        None,
    )
    .unwrap_err();
    assert_eq!(
        refused.message(),
        "0/2 nodes are available: node-a: no PCI device 0000:07:00.0; node-b: PCI device 0000:07:00.0 taken by default/ml"
    );
    assert_eq!(
        refused.reasons(),
        BTreeSet::from(["host_device_missing", "host_device_taken"])
    );
    let taken = World {
        domains: vec![with(
            domain("default", "ml", "1Gi"),
            with(gpu.clone(), json!({"status": {"nodeName": "node-b"}})),
        )],
        ..world.clone()
    };
    let d = decide_now(&taken, &second);
    assert_eq!(d.step, ControllerStep::Unschedulable);
    let c = find(&d.status.conditions, "Scheduled").unwrap();
    assert_eq!(c.status, "False");
    assert!(
        c.message.contains("no PCI device 0000:07:00.0"),
        "{}",
        c.message
    );

    // Running on node-a with the device, asked to node-b: libvirt cannot live-migrate it.
    let both = World {
        hvns: vec![
            with_pci(hvn("node-a", "16Gi", 8, 1), &["0000:07:00.0"]),
            with_pci(hvn("node-b", "16Gi", 8, 1), &["0000:07:00.0"]),
        ],
        ..World::default()
    };
    let running: Domain = obj(held("ml", "node-a", Some("node-b"), gpu.clone()));
    let d = decide_now(&both, &running);
    assert_eq!(d.step, ControllerStep::MoveWaits);
    assert!(
        matches!(d.wait, Some(MoveWait::HostDevices(ref names)) if names == &vec!["gpu".to_string()]),
        "{:?}",
        d.wait
    );
    let c = find(&d.status.conditions, "MoveWaiting").unwrap();
    assert_eq!(c.reason, "HostDevicesAttached");
    assert!(c.message.contains("cannot live-migrate"), "{}", c.message);

    // Stopped, it moves cold to a node that has the device.
    let stopped: Domain = obj(held(
        "ml",
        "node-a",
        Some("node-b"),
        with(gpu.clone(), json!({"status": {"phase": "Stopped"}})),
    ));
    let d = decide_now(&both, &stopped);
    assert_eq!(
        d.step,
        ControllerStep::ApproveMove {
            source: "node-a".into(),
            target: "node-b".into()
        }
    );
    assert_eq!(
        d.status.migration.unwrap().mode,
        Some(virtkube_crds::domain::MigrationMode::Cold)
    );

    // A drain of node-a cannot take the running one away: blocked, saying why.
    let mut drained = both.clone();
    drained.nodes.push(k8s_node("node-a", true, json!([])));
    let d = decide_now(&drained, &obj(held("ml", "node-a", None, gpu)));
    assert!(
        matches!(
            d.drain,
            Some((
                _,
                Role::Blocked {
                    reason: "HostDevicesAttached",
                    ..
                }
            ))
        ),
        "{:?}",
        d.drain
    );
}

fn two_ready() -> World {
    World {
        hvns: vec![hvn("node-a", "16Gi", 8, 1), hvn("node-b", "16Gi", 8, 1)],
        pools: vec![
            pool("shared", true, &["node-a", "node-b"]),
            pool("local", false, &["node-a", "node-b"]),
        ],
        volumes: vec![
            with(
                volume("default", "root", "shared"),
                json!({"status": {"nodeName": "node-a"}}),
            ),
            with(
                volume("default", "scratch", "local"),
                json!({"status": {"nodeName": "node-a"}}),
            ),
        ],
        ..World::default()
    }
}

fn held(
    name: &str,
    holder: &str,
    requested: Option<&str>,
    extra: serde_json::Value,
) -> serde_json::Value {
    let mut v = with(
        domain("default", name, "1Gi"),
        json!({"status": {"nodeName": holder, "phase": "Running"}}),
    );
    if let Some(r) = requested {
        v = with(v, json!({"spec": {"nodeName": r}}));
    }
    with(v, extra)
}

#[test]
fn a_requested_move_is_approved_live_on_shared_storage_and_waits_on_local_storage() {
    let world = two_ready();
    let dom: Domain = obj(held(
        "web",
        "node-a",
        Some("node-b"),
        json!({"spec": {"disks": [{"name": "root", "volume": "root"}]}}),
    ));
    let d = decide_now(&world, &dom);
    assert_eq!(
        d.step,
        ControllerStep::ApproveMove {
            source: "node-a".into(),
            target: "node-b".into()
        }
    );
    let m = d.status.migration.as_ref().unwrap();
    assert_eq!(m.state, Some(MigrationState::Pending));
    assert_eq!(m.mode, Some(virtkube_crds::domain::MigrationMode::Live));
    assert_eq!(m.reason.as_deref(), Some("Requested"));
    assert_eq!(m.start_time.as_ref().map(|t| t.0), Some(now()));
    assert_eq!(d.approved, Some("Requested"));

    let stopped: Domain = obj(held(
        "cold",
        "node-a",
        Some("node-b"),
        json!({"status": {"phase": "Stopped"}}),
    ));
    let d = decide_now(&world, &stopped);
    assert_eq!(
        d.status.migration.unwrap().mode,
        Some(virtkube_crds::domain::MigrationMode::Cold)
    );

    let local: Domain = obj(held(
        "db",
        "node-a",
        Some("node-b"),
        json!({"spec": {"disks": [{"name": "s", "volume": "scratch"}, {"name": "h", "hostPath": "/srv/img"}]}}),
    ));
    let d = decide_now(&world, &local);
    assert_eq!(d.step, ControllerStep::MoveWaits);
    assert!(
        matches!(d.wait, Some(MoveWait::StorageNotShared(ref v)) if v == &vec!["scratch".to_string()])
    );
    let c = find(&d.status.conditions, "MoveWaiting").unwrap();
    assert_eq!(c.reason, "StorageNotShared");
    assert!(
        c.message
            .starts_with("volumes scratch are in node-local pools"),
        "{}",
        c.message
    );
    assert_eq!(d.status.migration, None);
}

/// A domain that allows copying its disks, using the node-local volume `scratch` (held by
/// node-a in [`two_ready`]).
fn copying(name: &str, extra: serde_json::Value) -> serde_json::Value {
    with(
        held(
            name,
            "node-a",
            Some("node-b"),
            json!({"spec": {"migration": {"allowCopyStorage": true},
                            "disks": [{"name": "s", "volume": "scratch"}, {"name": "h", "hostPath": "/srv/img"}]}}),
        ),
        extra,
    )
}

#[test]
fn a_move_copies_a_node_local_volume_only_when_allowed_live_and_alone() {
    let world = two_ready();
    // Allowed, running, the volume used by this domain alone: approved, the volume listed
    // as copied, and its node no reason to stay.
    let d = decide_now(&world, &obj(copying("db", json!({}))));
    assert_eq!(
        d.step,
        ControllerStep::ApproveMove {
            source: "node-a".into(),
            target: "node-b".into()
        },
        "{:?}",
        d.wait
    );
    let m = d.status.migration.as_ref().unwrap();
    assert_eq!(m.copied_volumes, vec!["scratch".to_string()]);
    assert_eq!(m.mode, Some(virtkube_crds::domain::MigrationMode::Live));

    // Each reason a volume cannot travel, as the MoveWaiting condition says it.
    let refused = |world: &World, dom: serde_json::Value, why: &str| {
        let d = decide_now(world, &obj(dom));
        assert_eq!(d.step, ControllerStep::MoveWaits, "{why}");
        let c = find(&d.status.conditions, "MoveWaiting").unwrap();
        assert_eq!(c.reason, "StorageNotCopyable", "{why}");
        assert!(c.message.contains(why), "{why}: {}", c.message);
        assert_eq!(d.status.migration, None);
    };
    refused(
        &world,
        copying("db", json!({"status": {"phase": "Stopped"}})),
        "scratch belongs to a stopped domain: libvirt copies disks only while it live-migrates",
    );
    let pinned = |w: &mut World| {
        w.volumes[1] = with(
            w.volumes[1].clone(),
            json!({"spec": {"nodeName": "node-a"}}),
        )
    };
    let mut w = two_ready();
    pinned(&mut w);
    refused(
        &w,
        copying("db", json!({})),
        "scratch is pinned to node node-a by its spec.nodeName",
    );
    let mut w = two_ready();
    w.volumes.push(with(
        volume("default", "base", "local"),
        json!({"status": {"nodeName": "node-a"}}),
    ));
    w.volumes[1] = with(
        w.volumes[1].clone(),
        json!({"spec": {"source": {"backingVolume": "base"}}}),
    );
    refused(
        &w,
        copying("db", json!({})),
        "scratch is a copy-on-write overlay on volume base",
    );
    let mut w = two_ready();
    w.volumes.push(with(
        volume("default", "snap", "local"),
        json!({"spec": {"source": {"backingVolume": "scratch"}}, "status": {"nodeName": "node-a"}}),
    ));
    refused(
        &w,
        copying("db", json!({})),
        "scratch has volumes built on it: snap",
    );
    let mut w = two_ready();
    w.domains.push(held(
        "other",
        "node-a",
        None,
        json!({"spec": {"disks": [{"name": "s", "volume": "scratch"}]}}),
    ));
    refused(
        &w,
        copying("db", json!({})),
        "scratch is also used by Domain other",
    );
    let mut w = two_ready();
    w.volumes[1] = with(
        w.volumes[1].clone(),
        json!({"status": {"transfer": {"domain": "db", "sourceNode": "node-b", "targetNode": "node-a", "state": "Copied"}}}),
    );
    refused(
        &w,
        copying("db", json!({})),
        "scratch is still being handed over from node node-b to node node-a",
    );
}

#[test]
fn a_move_of_a_domain_on_a_disk_pool_partition_is_refused_before_it_starts() {
    // `parts` is a disk pool, even shared: its Volume `data` (a partition node-a recorded)
    // never travels, and the move is never approved, copy allowed or not, running or not.
    let mut world = two_ready();
    let mut parts = pool("parts", true, &["node-a", "node-b"]);
    parts["spec"] = json!({"type": "disk", "shared": true,
                           "source": {"devices": ["/dev/sdb"]}});
    world.pools.push(parts);
    world.volumes.push(with(
        volume("default", "data", "parts"),
        json!({"spec": {"format": "raw"}, "status": {"nodeName": "node-a"}}),
    ));
    let on_partition = |copy: bool, phase: &str| {
        obj::<Domain>(held(
            "db",
            "node-a",
            Some("node-b"),
            json!({"spec": {"migration": {"allowCopyStorage": copy},
                            "disks": [{"name": "d", "volume": "data"}, {"name": "r", "volume": "root"}]},
                   "status": {"phase": phase}}),
        ))
    };
    for (copy, phase) in [(true, "Running"), (false, "Running"), (true, "Stopped")] {
        let d = decide_now(&world, &on_partition(copy, phase));
        assert_eq!(d.step, ControllerStep::MoveWaits, "{copy} {phase}");
        assert_eq!(d.status.migration, None, "never started");
        let c = find(&d.status.conditions, "MoveWaiting").unwrap();
        assert_eq!(c.reason, "StorageNotCopyable", "{copy} {phase}");
        assert!(
            c.message.contains(
                "data is a partition of disk pool parts, which a move cannot take along: keep the domain on its node"
            ) && !c.message.contains("root"),
            "{}",
            c.message
        );
    }
    // Node-local for binding too, `shared` or not: an unbound Volume there waits for its
    // first consumer (a shared dir pool's would be given a node at once).
    let mut unbound = world.clone();
    unbound.volumes.push(with(
        volume("default", "fresh", "parts"),
        json!({"spec": {"format": "raw"}}),
    ));
    let cluster = unbound.cluster(&settings());
    let volumes: Vec<Volume> = unbound.volumes.iter().cloned().map(obj).collect();
    let consumers = Consumers::of(&unbound.domains(), &volumes);
    let fresh = volumes.last().unwrap();
    let d = decide_volume(fresh, &cluster, &consumers, now());
    assert_eq!(d.status.node_name, None);
    assert_eq!(
        find(&d.status.conditions, "Scheduled").unwrap().reason,
        "WaitingForConsumer"
    );
    // The domain's other volume, on shared storage, is no reason: without the partition
    // the same move is approved.
    let d = decide_now(
        &world,
        &obj(held(
            "web",
            "node-a",
            Some("node-b"),
            json!({"spec": {"disks": [{"name": "r", "volume": "root"}]}}),
        )),
    );
    assert!(
        matches!(d.step, ControllerStep::ApproveMove { .. }),
        "{:?}",
        d.status.conditions
    );
}

#[test]
fn a_drain_picks_another_node_for_a_domain_whose_local_volume_it_may_copy() {
    let mut world = two_ready();
    world.nodes = vec![
        k8s_node("node-a", true, json!([])),
        k8s_node("node-b", false, json!([])),
    ];
    let drained = |copy: bool| {
        obj::<Domain>(held(
            "db",
            "node-a",
            None,
            json!({"spec": {"migration": {"allowCopyStorage": copy},
                            "disks": [{"name": "s", "volume": "scratch"}]}}),
        ))
    };
    let d = decide_now(&world, &drained(true));
    assert_eq!(
        d.step,
        ControllerStep::ApproveMove {
            source: "node-a".into(),
            target: "node-b".into()
        },
        "{:?}",
        d.status.conditions
    );
    assert_eq!(
        d.status.migration.unwrap().copied_volumes,
        vec!["scratch".to_string()]
    );
    // Without the permission its volume keeps it: no target.
    let d = decide_now(&world, &drained(false));
    assert_ne!(
        d.step,
        ControllerStep::ApproveMove {
            source: "node-a".into(),
            target: "node-b".into()
        }
    );
}

#[test]
fn a_pending_move_nobody_wants_or_nobody_starts_is_cancelled() {
    let world = two_ready();
    let pending = json!({"status": {"migration": {"state": "Pending", "sourceNode": "node-a", "targetNode": "node-b", "startTime": ts(-10), "reason": "Requested"}}});
    // The user changed their mind.
    let dom: Domain = obj(held("web", "node-a", Some("node-a"), pending.clone()));
    let d = decide_now(&world, &dom);
    assert_eq!(d.step, ControllerStep::CancelMove);
    let m = d.status.migration.as_ref().unwrap();
    assert_eq!(m.state, Some(MigrationState::Aborted));
    assert_eq!(
        m.message.as_deref(),
        Some("cancelled: spec.nodeName is now node-a")
    );
    assert_eq!(m.end_time.as_ref().map(|t| t.0), Some(now()));
    assert_eq!(d.cancelled, Some("Unwanted"));
    // Still wanted and fresh: left to the source's agent.
    let dom: Domain = obj(held("web", "node-a", Some("node-b"), pending.clone()));
    assert_eq!(decide_now(&world, &dom).step, ControllerStep::Idle);
    // Still wanted, but the source's agent did not start it within 5 minutes.
    assert_eq!(
        decide_at(&world, &dom, &Backoff::default(), at(289)).step,
        ControllerStep::Idle
    );
    let mut fresh = world.clone();
    fresh.hvns = vec![
        hvn("node-a", "16Gi", 8, -299),
        hvn("node-b", "16Gi", 8, -299),
    ];
    let d = decide_at(&fresh, &dom, &Backoff::default(), at(300));
    assert_eq!(d.step, ControllerStep::CancelMove);
    assert_eq!(d.cancelled, Some("PendingTimeout"));
    assert_eq!(
        d.status.migration.unwrap().message.as_deref(),
        Some("cancelled: the source node's agent did not start the move within 300s")
    );
}

#[test]
fn after_a_failed_move_the_same_move_waits_doubling_up_to_the_maximum() {
    let mut world = two_ready();
    world.hvns = vec![
        hvn("node-a", "16Gi", 8, -10_000),
        hvn("node-b", "16Gi", 8, -10_000),
    ];
    let s = settings();
    let mut backoff = Backoff::default();
    let failed_at = |end: i64| {
        obj::<Domain>(held(
            "web",
            "node-a",
            Some("node-b"),
            json!({"status": {"migration": {"state": "Failed", "sourceNode": "node-a", "targetNode": "node-b", "startTime": ts(end - 5), "endTime": ts(end), "message": "libvirt: connection refused"}}}),
        ))
    };
    // (failure ends at, decided at, approved?)
    let steps: [(i64, i64, bool); 6] = [
        (0, 29, false),
        (0, 30, true),
        (100, 159, false), // the second failure of the same move waits 60 s
        (100, 160, true),
        (200, 319, false), // the third 120 s
        (200, 320, true),
    ];
    for (end, at_secs, approved) in steps {
        let dom = failed_at(end);
        let outcome = backoff.observe(
            &backoff_key(&dom),
            dom.status.as_ref().and_then(|s| s.migration.as_ref()),
            &s,
        );
        let d = decide_at(&world, &dom, &backoff, at(at_secs));
        if approved {
            assert!(
                matches!(d.step, ControllerStep::ApproveMove { .. }),
                "end {end} at {at_secs}: {:?}",
                d.step
            );
        } else {
            assert_eq!(d.step, ControllerStep::MoveWaits, "end {end} at {at_secs}");
            assert_eq!(
                find(&d.status.conditions, "MoveWaiting").unwrap().reason,
                "Backoff"
            );
        }
        let _ = outcome;
    }
    // Each record is counted once.
    let dom = failed_at(200);
    assert!(
        backoff
            .observe(
                &backoff_key(&dom),
                dom.status.as_ref().and_then(|s| s.migration.as_ref()),
                &s
            )
            .is_none()
    );
    // Another move of the same domain is not held back.
    let other: Domain = obj(held("web", "node-a", Some("node-c"), json!({})));
    let mut three = world.clone();
    three.hvns.push(hvn("node-c", "16Gi", 8, -10_000));
    let d = decide_at(&three, &other, &backoff, at(201));
    assert!(
        matches!(d.step, ControllerStep::ApproveMove { .. }),
        "{:?}",
        d.step
    );
}

#[test]
fn a_drained_node_moves_live_migratable_domains_and_reports_the_others() {
    let mut world = two_ready();
    world.hvns.push(hvn("node-c", "16Gi", 8, 1));
    world.nodes.push(k8s_node("node-a", true, json!([])));
    let shared = json!({"spec": {"disks": [{"name": "root", "volume": "root"}]}});
    let cases: Vec<(&str, serde_json::Value, ControllerStep, Option<Role>)> = vec![
        (
            "LiveMigrate without nodeName: a move to the scheduler's choice",
            held("a1", "node-a", None, shared.clone()),
            ControllerStep::ApproveMove { source: "node-a".into(), target: "node-b".into() },
            Some(Role::Moving),
        ),
        (
            "pinned by spec.nodeName",
            held("a2", "node-a", Some("node-a"), shared.clone()),
            ControllerStep::Idle,
            Some(Role::Blocked { reason: "PinnedToNode", message: "node node-a is drained, but spec.nodeName pins this domain to it: change spec.nodeName to another node, or clear it to let the scheduler pick one".into() }),
        ),
        (
            "evictionStrategy None",
            held("a3", "node-a", None, with(shared.clone(), json!({"spec": {"evictionStrategy": "None"}}))),
            ControllerStep::Idle,
            Some(Role::Left),
        ),
        (
            "node-local storage",
            held("a4", "node-a", None, json!({"spec": {"disks": [{"name": "s", "volume": "scratch"}]}})),
            ControllerStep::Idle,
            None,
        ),
        (
            "Shutdown is not done yet",
            held("a5", "node-a", None, with(shared.clone(), json!({"spec": {"evictionStrategy": "Shutdown"}}))),
            ControllerStep::Idle,
            Some(Role::Blocked { reason: "ShutdownNotSupported", message: "node node-a is drained; evictionStrategy Shutdown is not carried out yet: stop the domain (runStrategy Halted) or use LiveMigrate".into() }),
        ),
    ];
    for (what, dom, step, role) in cases {
        let dom: Domain = obj(dom);
        let d = decide_now(&world, &dom);
        if what == "node-local storage" {
            // The scheduler cannot place it elsewhere (its volume is on node-a): blocked.
            assert_eq!(d.step, ControllerStep::Idle, "{what}");
            assert!(
                matches!(
                    d.drain,
                    Some((
                        _,
                        Role::Blocked {
                            reason: "NoTarget",
                            ..
                        }
                    ))
                ),
                "{what}: {:?}",
                d.drain
            );
            continue;
        }
        assert_eq!(d.step, step, "{what}");
        assert_eq!(d.drain.clone().map(|(_, r)| r), role, "{what}");
        match d.drain {
            Some((_, Role::Blocked { reason, .. })) => {
                assert_eq!(
                    find(&d.status.conditions, "EvictionBlocked")
                        .unwrap()
                        .reason,
                    reason
                )
            }
            _ => assert!(
                find(&d.status.conditions, "EvictionBlocked").is_none(),
                "{what}"
            ),
        }
    }
    let dom: Domain = obj(held("a1", "node-a", None, shared.clone()));
    let d = decide_now(&world, &dom);
    assert_eq!(
        d.status.migration.as_ref().unwrap().reason.as_deref(),
        Some("Drain")
    );
    assert_eq!(d.approved, Some("Drain"));
    // The drain's move stays wanted while spec.nodeName is unset (no cancel), even once the
    // node is uncordoned.
    let moving: Domain = obj(held(
        "a1",
        "node-a",
        None,
        with(
            shared,
            json!({"status": {"migration": {"state": "Pending", "sourceNode": "node-a", "targetNode": "node-b", "startTime": NOW, "reason": "Drain"}}}),
        ),
    ));
    assert_eq!(decide_now(&world, &moving).step, ControllerStep::Idle);
    world.nodes.clear();
    assert_eq!(decide_now(&world, &moving).step, ControllerStep::Idle);
}

#[test]
fn a_silent_node_marks_its_domains_and_only_fencing_releases_them() {
    let mut world = two_ready();
    world.hvns[0] = hvn("node-a", "16Gi", 8, 600);
    let dom: Domain = obj(held("web", "node-a", None, json!({})));
    let d = decide_now(&world, &dom);
    assert_eq!(d.step, ControllerStep::Idle);
    let c = find(&d.status.conditions, "NodeUnreachable").unwrap();
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("True", "HeartbeatStale")
    );
    assert!(
        c.message
            .contains("kubectl annotate hypervisornode node-a virtkube.io/fenced=true"),
        "{}",
        c.message
    );
    assert!(
        d.notes
            .iter()
            .any(|n| n.reason == "NodeUnreachable" && n.warning)
    );

    // Fenced: runStrategy Always is released and scheduled again.
    world.hvns[0] = with(
        world.hvns[0].clone(),
        json!({"metadata": {"annotations": {"virtkube.io/fenced": "true"}}}),
    );
    let d = decide_now(&world, &dom);
    assert_eq!(d.step, ControllerStep::Unfence { holder: None });
    assert_eq!(d.status.node_name, None);
    assert_eq!(
        find(&d.status.conditions, "Scheduled").unwrap().reason,
        "NodeFenced"
    );
    assert!(find(&d.status.conditions, "NodeUnreachable").is_none());
    let mut rebound = dom.clone();
    rebound.status = Some(d.status.clone());
    assert_eq!(
        decide_now(&world, &rebound).step,
        ControllerStep::Bind {
            node: "node-b".into()
        }
    );

    // Manual stays with the fenced node (the message says how to move it).
    let manual: Domain = obj(held(
        "man",
        "node-a",
        None,
        json!({"spec": {"runStrategy": "Manual"}}),
    ));
    let d = decide_now(&world, &manual);
    assert_eq!(d.step, ControllerStep::Idle);
    assert!(
        find(&d.status.conditions, "NodeUnreachable")
            .unwrap()
            .message
            .contains("runStrategy is not Always")
    );
    // ... unless its spec.nodeName names another node.
    let moved: Domain = obj(held(
        "man",
        "node-a",
        Some("node-b"),
        json!({"spec": {"runStrategy": "Manual"}}),
    ));
    assert_eq!(
        decide_now(&world, &moved).step,
        ControllerStep::Unfence { holder: None }
    );

    // A running migration's target may have the guest: it becomes the holder.
    let migrating: Domain = obj(held(
        "mig",
        "node-a",
        Some("node-b"),
        json!({"status": {"migration": {"state": "Running", "sourceNode": "node-a", "targetNode": "node-b", "startTime": NOW}}}),
    ));
    let d = decide_now(&world, &migrating);
    assert_eq!(
        d.step,
        ControllerStep::Unfence {
            holder: Some("node-b".into())
        }
    );
    assert_eq!(d.status.node_name.as_deref(), Some("node-b"));
    assert_eq!(
        d.status.migration.unwrap().state,
        Some(MigrationState::Aborted)
    );

    // An annotation on a node that still beats is not believed.
    let mut alive = two_ready();
    alive.hvns[0] = with(
        alive.hvns[0].clone(),
        json!({"metadata": {"annotations": {"virtkube.io/fenced": "true"}}}),
    );
    assert_eq!(decide_now(&alive, &dom).step, ControllerStep::Idle);
}

#[test]
fn an_unbound_domain_being_deleted_is_finalized_and_a_held_one_waits() {
    let world = two_ready();
    let deleting =
        json!({"metadata": {"deletionTimestamp": NOW, "finalizers": ["virtkube.io/cleanup"]}});
    let unbound: Domain = obj(with(domain("default", "gone", "1Gi"), deleting.clone()));
    assert_eq!(decide_now(&world, &unbound).step, ControllerStep::Finalize);
    let held_dom: Domain = obj(with(held("gone", "node-a", None, json!({})), deleting));
    assert_eq!(decide_now(&world, &held_dom).step, ControllerStep::Idle);
    let patch = virtkube::cluster::binding::finalizer_removal(&unbound).unwrap();
    assert_eq!(
        serde_json::to_value(&patch).unwrap(),
        json!([
            {"op": "test", "path": "/metadata/resourceVersion", "value": "1"},
            {"op": "test", "path": "/metadata/finalizers/0", "value": "virtkube.io/cleanup"},
            {"op": "remove", "path": "/metadata/finalizers/0"},
        ])
    );
}

#[test]
fn volumes_bind_by_request_source_consumer_or_shared_pool() {
    let world = World {
        hvns: vec![hvn("node-a", "16Gi", 8, 1), hvn("node-b", "16Gi", 8, 1)],
        pools: vec![
            pool("shared", true, &["node-b"]),
            pool("local", false, &["node-a", "node-b"]),
        ],
        volumes: vec![
            volume("default", "base", "local"),
            with(
                volume("default", "clone", "local"),
                json!({"spec": {"source": {"volume": "base"}}}),
            ),
            with(
                volume("default", "pinned", "local"),
                json!({"spec": {"nodeName": "node-a"}}),
            ),
            with(
                volume("default", "child", "local"),
                json!({"spec": {"source": {"backingVolume": "pinned"}}}),
            ),
            volume("default", "nfs", "shared"),
        ],
        domains: vec![],
        ..World::default()
    };
    let s = settings();
    let decide_all = |world: &World| -> Vec<(String, Option<String>, String)> {
        let cluster = world.cluster(&s);
        let volumes: Vec<Volume> = world.volumes.iter().cloned().map(obj).collect();
        let domains = world.domains();
        let consumers = Consumers::of(&domains, &volumes);
        volumes
            .iter()
            .map(|v| {
                let d = decide_volume(v, &cluster, &consumers, now());
                let c = find(&d.status.conditions, "Scheduled").unwrap();
                (
                    v.metadata.name.clone().unwrap(),
                    d.status.node_name.clone(),
                    c.reason.clone(),
                )
            })
            .collect()
    };
    assert_eq!(
        decide_all(&world),
        vec![
            ("base".into(), None, "WaitingForConsumer".into()),
            ("clone".into(), None, "WaitingForSource".into()),
            ("pinned".into(), Some("node-a".into()), "Requested".into()),
            (
                "child".into(),
                Some("node-a".into()),
                "FollowsSource".into()
            ),
            ("nfs".into(), Some("node-b".into()), "NodeAssigned".into()),
        ]
    );
    // A domain using the clone is bound to node-b: base (the clone's source) follows it.
    let mut used = world.clone();
    used.domains.push(with(
        held("vm", "node-b", None, json!({})),
        json!({"spec": {"disks": [{"name": "d", "volume": "clone"}]}}),
    ));
    assert_eq!(
        decide_all(&used)[0],
        (
            "base".into(),
            Some("node-b".into()),
            "FollowsConsumer".into()
        )
    );
}

#[test]
fn a_shared_volume_leaves_a_fenced_holder_and_every_user_node_is_routed() {
    let s = settings();
    let fenced = with(
        hvn("node-a", "16Gi", 8, 600),
        json!({"metadata": {"annotations": {"virtkube.io/fenced": "true"}}}),
    );
    let world = World {
        hvns: vec![
            fenced,
            hvn("node-b", "16Gi", 8, 1),
            hvn("node-c", "16Gi", 8, 1),
            hvn("node-d", "16Gi", 8, 1),
        ],
        pools: vec![
            pool("shared", true, &["node-a", "node-b", "node-c"]),
            pool("local", false, &["node-d"]),
        ],
        volumes: vec![
            with(
                volume("default", "base", "shared"),
                json!({"status": {"nodeName": "node-a"}}),
            ),
            with(
                volume("default", "overlay", "local"),
                json!({"spec": {"source": {"backingVolume": "base"}}, "status": {"nodeName": "node-d"}}),
            ),
        ],
        domains: vec![
            with(
                held(
                    "vm",
                    "node-b",
                    Some("node-c"),
                    json!({"spec": {"disks": [{"name": "b", "volume": "base"}]}}),
                ),
                json!({"status": {"migration": {"state": "Running", "sourceNode": "node-b", "targetNode": "node-c"}}}),
            ),
            held(
                "other",
                "node-d",
                None,
                json!({"spec": {"disks": [{"name": "o", "volume": "overlay"}]}}),
            ),
        ],
        ..World::default()
    };
    let cluster = world.cluster(&s);
    let volumes: Vec<Volume> = world.volumes.iter().cloned().map(obj).collect();
    let consumers = Consumers::of(&world.domains(), &volumes);
    let d = decide_volume(&volumes[0], &cluster, &consumers, now());
    assert_eq!(
        d.status.node_name.as_deref(),
        Some("node-b"),
        "the first consumer's node, where the pool runs"
    );
    assert_eq!(
        find(&d.status.conditions, "Scheduled").unwrap().reason,
        "NodeFenced"
    );
    // Users: the consumer's holder and its move's target, the derived volume's holder and
    // that volume's consumer.
    assert_eq!(
        consumers.users("default", "base"),
        BTreeSet::from([
            "node-b".to_string(),
            "node-c".to_string(),
            "node-d".to_string()
        ])
    );
    // A node-local volume stays on its fenced node (its data is there).
    let local: Volume = obj(with(
        volume("default", "l", "local"),
        json!({"status": {"nodeName": "node-a"}}),
    ));
    let d = decide_volume(&local, &cluster, &consumers, now());
    assert_eq!(d.status.node_name.as_deref(), Some("node-a"));
}

/// The controller's steps of a volume's handover (Copying → Copied → the source's agent's
/// SourceRemoved → bound to the target), for each state of the Domain's move record.
#[test]
fn a_volume_copied_with_its_domain_is_handed_over_step_by_step() {
    use virtkube::cluster::volumes::{Handover, handover};
    use virtkube_crds::volume::TransferState;
    let s = settings();
    let transfer = |state: &str| json!({"transfer": {"domain": "db", "sourceNode": "node-a", "targetNode": "node-b", "state": state}});
    let record = |state: &str, holder: &str| {
        held(
            "db",
            holder,
            Some("node-b"),
            json!({"spec": {"disks": [{"name": "s", "volume": "scratch"}]},
                   "status": {"migration": {"state": state, "sourceNode": "node-a", "targetNode": "node-b", "copiedVolumes": ["scratch"]}}}),
        )
    };
    let scratch = |holder: &str, transfer: Option<serde_json::Value>| {
        let mut status = json!({"nodeName": holder, "key": "/k/a"});
        if let Some(t) = transfer {
            json_patch::merge(&mut status, &t);
        }
        with(
            volume("default", "scratch", "local"),
            json!({"status": status}),
        )
    };
    // (volume, domain record, the controller's next step)
    let cases: Vec<(serde_json::Value, serde_json::Value, Option<Handover>)> = vec![
        (
            scratch("node-a", None),
            record("Pending", "node-a"),
            Some(Handover::Begin {
                domain: "db".into(),
                source: "node-a".into(),
                target: "node-b".into(),
            }),
        ),
        (
            scratch("node-a", None),
            record("Running", "node-a"),
            Some(Handover::Begin {
                domain: "db".into(),
                source: "node-a".into(),
                target: "node-b".into(),
            }),
        ),
        // Succeeded before the controller saw it: the transfer is recorded, Copied follows.
        (
            scratch("node-a", None),
            record("Succeeded", "node-b"),
            Some(Handover::Begin {
                domain: "db".into(),
                source: "node-a".into(),
                target: "node-b".into(),
            }),
        ),
        (scratch("node-a", None), record("Failed", "node-a"), None),
        (
            scratch("node-a", Some(transfer("Copying"))),
            record("Running", "node-a"),
            None,
        ),
        // Succeeded but the claim not handed over yet: not the copy's turn.
        (
            scratch("node-a", Some(transfer("Copying"))),
            record("Succeeded", "node-a"),
            None,
        ),
        (
            scratch("node-a", Some(transfer("Copying"))),
            record("Succeeded", "node-b"),
            Some(Handover::Copied),
        ),
        (
            scratch("node-a", Some(transfer("Copying"))),
            record("Failed", "node-a"),
            Some(Handover::Drop {
                ended: MigrationState::Failed,
            }),
        ),
        (
            scratch("node-a", Some(transfer("Copying"))),
            record("Aborted", "node-a"),
            Some(Handover::Drop {
                ended: MigrationState::Aborted,
            }),
        ),
        // Copied: the source's agent acts, not the controller.
        (
            scratch("node-a", Some(transfer("Copied"))),
            record("Succeeded", "node-b"),
            None,
        ),
        (
            scratch("node-a", Some(transfer("SourceRemoved"))),
            record("Succeeded", "node-b"),
            Some(Handover::Bind {
                target: "node-b".into(),
            }),
        ),
        // Bound: the target's agent takes the copy over.
        (
            scratch("node-b", Some(transfer("SourceRemoved"))),
            record("Succeeded", "node-b"),
            None,
        ),
        // Done: the old record does not start a handover away from the new holder.
        (scratch("node-b", None), record("Succeeded", "node-b"), None),
    ];
    for (i, (vol, dom, want)) in cases.into_iter().enumerate() {
        let world = World {
            volumes: vec![vol.clone()],
            domains: vec![dom],
            ..two_ready()
        };
        let volumes: Vec<Volume> = world.volumes.iter().cloned().map(obj).collect();
        let consumers = Consumers::of(&world.domains(), &volumes);
        assert_eq!(handover(&volumes[0], &consumers), want, "case {i}");
        // The decision writes the step.
        let cluster = world.cluster(&s);
        let d = decide_volume(&volumes[0], &cluster, &consumers, now());
        let st = d.status;
        match want {
            Some(Handover::Begin { .. }) => {
                assert_eq!(
                    st.transfer.unwrap().state,
                    TransferState::Copying,
                    "case {i}"
                )
            }
            Some(Handover::Copied) => {
                assert_eq!(
                    st.transfer.unwrap().state,
                    TransferState::Copied,
                    "case {i}"
                )
            }
            Some(Handover::Drop { .. }) => assert_eq!(st.transfer, None, "case {i}"),
            Some(Handover::Bind { .. }) => {
                assert_eq!(st.node_name.as_deref(), Some("node-b"), "case {i}");
                assert_eq!(
                    find(&st.conditions, "Scheduled").unwrap().reason,
                    "MovedWithDomain"
                );
                assert_eq!(
                    st.transfer.unwrap().state,
                    TransferState::SourceRemoved,
                    "the target's agent ends it"
                );
            }
            None => assert_eq!(
                Some(st),
                obj::<Volume>(vol).status,
                "case {i}: nothing changes"
            ),
        }
    }
}

#[test]
fn labels_route_each_object_to_its_holder_and_target_and_drop_stale_keys() {
    let dom: Domain = obj(held(
        "web",
        "node-a",
        Some("node-b"),
        json!({"metadata": {"labels": {"app": "web", "node.virtkube.io/node-z": "holder"}},
               "status": {"migration": {"state": "Running", "sourceNode": "node-a", "targetNode": "node-b"}}}),
    ));
    let desired = domain_labels(&dom);
    assert_eq!(
        desired,
        [
            ("node.virtkube.io/node-a", "holder"),
            ("node.virtkube.io/node-b", "target")
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    );
    assert_eq!(
        label_patch(dom.metadata.labels.as_ref().unwrap(), &desired),
        Some(json!({"metadata": {"labels": {
            "node.virtkube.io/node-z": null,
            "node.virtkube.io/node-a": "holder",
            "node.virtkube.io/node-b": "target"}}}))
    );
    let users = BTreeSet::from(["node-a".to_string(), "node-c".to_string()]);
    let v = volume_labels(Some("node-a"), &users);
    assert_eq!(
        v.get("node.virtkube.io/node-a").map(String::as_str),
        Some("holder")
    );
    assert_eq!(
        v.get("node.virtkube.io/node-c").map(String::as_str),
        Some("user")
    );
    assert_eq!(label_patch(&v, &v), None);
}

#[test]
fn refusal_labels_are_stable_metric_labels() {
    for r in [
        Refusal::Cordoned,
        Refusal::Memory { need: 1, left: 0 },
        Refusal::NetworkInactive("n".into()),
    ] {
        assert!(
            r.metric_label()
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '_')
        );
    }
}
