//! The placement protocol with the real processes on real libvirt: the in-memory API server,
//! `virtkube controller` and two `virtkube agent`s on two private libvirtd daemons (QEMU under
//! TCG). Each scenario disturbs a move the way the field does — an edit right after the
//! creation, the source's agent down, the source's agent killed mid-migration, the
//! controller restarted mid-migration, two controllers at once, a deletion right after a
//! migration — while a sampler reads both daemons' `running` state every 100 ms. Each test
//! asserts that no sample saw the guest running on both nodes and that it settles running on
//! exactly one (or gone, once deleted), and prints the samples taken, the time to settle and
//! the migration's downtime.
//!
//! ```sh
//! VIRTKUBE_NODES_NETNS=vk VIRTKUBE_NODES_SUBNET=10.99.0 scripts/libvirt-nodes.sh up /tmp/nodes
//! set -a; . /tmp/nodes/env; set +a
//! cargo nextest run -p virtkube --test placement_real --run-ignored only --no-capture
//! ```
//!
//! Without the daemons these tests fail (they never pass silently).

mod process_support;

use std::time::{Duration, Instant};

use process_support::*;
use serde_json::{Value, json};

/// One line per scenario: what the sampler saw, how long it took to settle, the downtime.
fn report(scenario: &str, samples: &Samples, settle: Duration, dom: Option<&Value>) {
    let migration = dom
        .map(|d| d["status"]["migration"].clone())
        .unwrap_or(Value::Null);
    println!(
        "scenario {scenario}: {} samples, {} on both nodes, settled in {:.1}s, migration {} downtime {} ms, {} bytes; timeline: {}",
        samples.samples.len(),
        samples.on_both().len(),
        settle.as_secs_f64(),
        migration["state"].as_str().unwrap_or("-"),
        migration["downtimeMillis"]
            .as_u64()
            .map_or("-".to_string(), |d| d.to_string()),
        migration["dataTransferredBytes"]
            .as_u64()
            .map_or("-".to_string(), |d| d.to_string()),
        samples.timeline()
    );
}

/// The controller and both agents, ready.
async fn cluster() -> Cluster {
    let mut c = Cluster::new().await;
    c.start_agent("node-a");
    c.start_agent("node-b");
    c.start_controller("c1", "virtkube-controller");
    c.wait_ready().await;
    c
}

/// Creates `ns/name` asking for `node` and waits until it runs there; `slow` makes its
/// live migration last several seconds ([`make_slow`]).
async fn running_on_node(c: &Cluster, ns: &str, name: &str, node: &str, slow: bool) {
    let mut dom = small_domain(ns, name, Some(node));
    if slow {
        make_slow(&mut dom);
    }
    c.api.create("domains", dom).unwrap();
    c.until(120, &format!("{ns}/{name} running on {node}"), || {
        c.domain(ns, name).is_some_and(|d| settled_on(&d, node))
    })
    .await;
}

/// Asks for `ns/name` on `node` (`kubectl edit`).
fn request(c: &Cluster, ns: &str, name: &str, node: &str) {
    c.api
        .edit_spec("domains", ns, name, |s| s["nodeName"] = json!(node))
        .unwrap();
}

/// Makes a domain's live migration slow enough to be interrupted: QEMU sends an untouched
/// (zero) page in about 22 bytes, so the 128 MiB guest moves in under a second whatever the
/// bandwidth; 2 GiB of them at 1 MiB/s (the smallest cap libvirt takes) keep the data phase
/// going for about 7 s. The memory is never touched, so the host does not spend it.
fn make_slow(dom: &mut Value) {
    dom["spec"]["memory"]["size"] = json!("2Gi");
    dom["spec"]["migration"] = json!({"bandwidth": "1Mi"});
}

/// Fails unless the guest runs on `node` only, and the Domain says so.
fn assert_only_on(c: &Cluster, ns: &str, name: &str, node: &str) {
    let guest = format!("{ns}.{name}");
    for n in &c.nodes {
        let runs = running_on(&n.uri).expect("virsh list").contains(&guest);
        assert_eq!(
            runs,
            n.name == node,
            "{guest} running on {}: {runs}",
            n.name
        );
        if n.name != node {
            assert!(
                !defined_on(&n.uri, &guest),
                "{guest} left defined on {}",
                n.name
            );
        }
    }
    let dom = c.domain(ns, name).unwrap();
    assert!(settled_on(&dom, node), "{}", dom["status"]);
}

/// A move asked for within a second of the creation (the reported bug: the guest ended up
/// running on both nodes, and stayed so).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs private libvirtd: scripts/libvirt-nodes.sh up, then --run-ignored"]
async fn a_move_right_after_creation_runs_the_guest_on_one_node() {
    let mut c = cluster().await;
    let ns = c.namespace("plcreate");
    let guest = format!("{ns}.vm");
    let sampler = Sampler::start(&guest, c.node("node-b"), c.node("node-a"));
    let started = Instant::now();
    c.api
        .create("domains", small_domain(&ns, "vm", Some("node-a")))
        .unwrap();
    // Give the controller and agent a: time to bind and, maybe, start the guest.
    tokio::time::sleep(Duration::from_millis(700)).await;
    c.api
        .edit_spec("domains", &ns, "vm", |s| s["nodeName"] = json!("node-b"))
        .unwrap();
    c.until(120, "settled on node-b", || {
        c.domain(&ns, "vm")
            .is_some_and(|d| settled_on(&d, "node-b"))
    })
    .await;
    let settle = started.elapsed();
    // Stay a little: a copy left on node-a would show now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let samples = sampler.finish();
    let dom = c.domain(&ns, "vm");
    report("move-right-after-creation", &samples, settle, dom.as_ref());
    samples.assert_never_on_both("move right after creation");
    assert_eq!(samples.last_running(), vec!["node-b".to_string()]);
    assert_only_on(&c, &ns, "vm", "node-b");
    // The request made before the controller approved it is no fault of the holder's.
    assert_eq!(warnings(&c.api, "vm"), Vec::<(String, String)>::new());
    c.shutdown().await;
}

/// The source's agent is down when the move is asked for, and stays down past the
/// controller's heartbeat grace (its node turns unreachable); nothing may start the guest on
/// the target meanwhile. Once the agent is back, it carries the move out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs private libvirtd: scripts/libvirt-nodes.sh up, then --run-ignored"]
async fn a_move_while_the_source_agent_is_down_waits_for_it() {
    let mut c = cluster().await;
    let ns = c.namespace("pldown");
    let guest = format!("{ns}.vm");
    running_on_node(&c, &ns, "vm", "node-a", false).await;
    let domid = virsh(&c.node("node-a").uri, &["domid", &guest]);
    let sampler = Sampler::start(&guest, c.node("node-b"), c.node("node-a"));

    c.take_agent("node-a").kill().await;
    request(&c, &ns, "vm", "node-b");
    // Past the heartbeat grace: the node is unreachable, the domain says so.
    let grace = c.controller_flags.heartbeat_grace;
    c.until(grace + 10, "node-a unreachable", || {
        c.api.get("hypervisornodes", "", "node-a").is_some_and(|n| {
            n["status"]["conditions"].as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "Unknown")
            })
        })
    })
    .await;
    c.until(10, "NodeUnreachable on the domain", || {
        c.domain(&ns, "vm")
            .is_some_and(|d| condition_true(&d, "NodeUnreachable"))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let while_down = c.domain(&ns, "vm").unwrap();
    println!(
        "while node-a's agent was down: holder {}, migration {}, MoveWaiting {}",
        while_down["status"]["nodeName"],
        while_down["status"]["migration"]["state"],
        while_down["status"]["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == "MoveWaiting"))
            .map_or(Value::Null, |c| c["reason"].clone())
    );
    assert_eq!(while_down["status"]["nodeName"], "node-a");
    assert_eq!(
        virsh(&c.node("node-a").uri, &["domid", &guest]),
        domid,
        "the guest ran on, untouched, while its agent was away"
    );
    assert!(!defined_on(&c.node("node-b").uri, &guest));

    let back = Instant::now();
    c.start_agent("node-a");
    c.until(120, "settled on node-b", || {
        c.domain(&ns, "vm")
            .is_some_and(|d| settled_on(&d, "node-b"))
    })
    .await;
    let settle = back.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let samples = sampler.finish();
    let dom = c.domain(&ns, "vm");
    report(
        "move-while-source-agent-down",
        &samples,
        settle,
        dom.as_ref(),
    );
    samples.assert_never_on_both("move while the source agent is down");
    assert_eq!(samples.last_running(), vec!["node-b".to_string()]);
    assert_only_on(&c, &ns, "vm", "node-b");
    c.shutdown().await;
}

/// The source's agent is SIGKILLed while libvirt migrates: libvirt carries on (or fails the
/// job), and the restarted agent completes or ends the move from what libvirt shows; the
/// request stands, so the guest ends on the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs private libvirtd: scripts/libvirt-nodes.sh up, then --run-ignored"]
async fn the_source_agent_killed_mid_migration_is_picked_up_from_libvirt() {
    let mut c = cluster().await;
    let ns = c.namespace("plkill");
    let guest = format!("{ns}.vm");
    running_on_node(&c, &ns, "vm", "node-a", true).await;
    let sampler = Sampler::start(&guest, c.node("node-b"), c.node("node-a"));
    let asked = Instant::now();
    request(&c, &ns, "vm", "node-b");
    let job = wait_for_job(c.node("node-a"), &guest, 60).await;
    assert!(job.is_some(), "no migration job on node-a\n{}", c.logs());
    c.take_agent("node-a").kill().await;
    let killed = Instant::now();
    // What libvirt does without the agent.
    let (uri_a, g) = (c.node("node-a").uri.clone(), guest.clone());
    let job_ran_for = tokio::task::spawn_blocking(move || {
        let conn = virt::connect::Connect::open_read_only(Some(&uri_a)).unwrap();
        let t = Instant::now();
        while has_job(&conn, &g) && t.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(20));
        }
        t.elapsed()
    })
    .await
    .unwrap();
    let on_a = running_on(&c.node("node-a").uri).unwrap().contains(&guest);
    let on_b = running_on(&c.node("node-b").uri).unwrap().contains(&guest);
    println!(
        "agent killed {:.1}s after the request; libvirt's job went on for {:.1}s after; then running on a: {on_a}, on b: {on_b}",
        (killed - asked).as_secs_f64(),
        job_ran_for.as_secs_f64()
    );
    let restarted = Instant::now();
    c.start_agent("node-a");
    c.until(180, "settled on node-b", || {
        c.domain(&ns, "vm")
            .is_some_and(|d| settled_on(&d, "node-b"))
    })
    .await;
    let settle = restarted.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let samples = sampler.finish();
    let dom = c.domain(&ns, "vm");
    report(
        "source-agent-killed-mid-migration",
        &samples,
        settle,
        dom.as_ref(),
    );
    samples.assert_never_on_both("source agent killed mid-migration");
    assert_eq!(samples.last_running(), vec!["node-b".to_string()]);
    assert_only_on(&c, &ns, "vm", "node-b");
    c.shutdown().await;
}

/// The controller is SIGKILLed while libvirt migrates, and a new one takes the Lease over:
/// the move completes, and the new controller routes the domain to its new holder.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs private libvirtd: scripts/libvirt-nodes.sh up, then --run-ignored"]
async fn the_controller_restarted_mid_migration_leaves_the_move_to_complete() {
    let mut c = cluster().await;
    let ns = c.namespace("plctl");
    let guest = format!("{ns}.vm");
    running_on_node(&c, &ns, "vm", "node-a", true).await;
    let sampler = Sampler::start(&guest, c.node("node-b"), c.node("node-a"));
    let asked = Instant::now();
    request(&c, &ns, "vm", "node-b");
    assert!(
        wait_for_job(c.node("node-a"), &guest, 60).await.is_some(),
        "no migration job on node-a\n{}",
        c.logs()
    );
    c.take_controller("c1").kill().await;
    c.start_controller("c2", "virtkube-controller");
    c.until(180, "settled on node-b", || {
        c.domain(&ns, "vm")
            .is_some_and(|d| settled_on(&d, "node-b"))
    })
    .await;
    let settle = asked.elapsed();
    // The new controller routes it: node-b holds, node-a's label is gone.
    let label = |node: &str| format!("node.virtkube.io/{node}");
    c.until(30, "routing labels follow the holder", || {
        c.domain(&ns, "vm").is_some_and(|d| {
            d["metadata"]["labels"][label("node-b")] == "holder"
                && d["metadata"]["labels"][label("node-a")].is_null()
        })
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let samples = sampler.finish();
    let dom = c.domain(&ns, "vm");
    report(
        "controller-restarted-mid-migration",
        &samples,
        settle,
        dom.as_ref(),
    );
    samples.assert_never_on_both("controller restarted mid-migration");
    assert_eq!(samples.last_running(), vec!["node-b".to_string()]);
    assert_only_on(&c, &ns, "vm", "node-b");
    c.shutdown().await;
}

/// Two controllers at once, both leading (each its own Lease: a misconfigured second
/// install, or a leader that does not know it lost): every claim write is a compare-and-swap,
/// so they bind once and approve each move once. The domain names no node, then moves to
/// the other node and back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs private libvirtd: scripts/libvirt-nodes.sh up, then --run-ignored"]
async fn two_controllers_at_once_bind_and_move_a_domain_once() {
    let mut c = Cluster::new().await;
    c.start_agent("node-a");
    c.start_agent("node-b");
    c.start_controller("c1", "lease-one");
    c.start_controller("c2", "lease-two");
    c.wait_ready().await;
    let ns = c.namespace("pltwo");
    let guest = format!("{ns}.vm");
    let started = Instant::now();
    c.api
        .create("domains", small_domain(&ns, "vm", None))
        .unwrap();
    let mut first = String::new();
    c.until(120, "bound and running", || {
        c.domain(&ns, "vm").is_some_and(|d| {
            let node = d["status"]["nodeName"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let ok = !node.is_empty() && settled_on(&d, &node);
            if ok {
                first = node;
            }
            ok
        })
    })
    .await;
    let bound = started.elapsed();
    let other = if first == "node-a" {
        "node-b"
    } else {
        "node-a"
    }
    .to_string();
    let mut settles = vec![bound];
    for target in [other.clone(), first.clone()] {
        let source = if target == "node-a" {
            "node-b"
        } else {
            "node-a"
        };
        let sampler = Sampler::start(&guest, c.node(&target), c.node(source));
        let asked = Instant::now();
        request(&c, &ns, "vm", &target);
        c.until(120, &format!("settled on {target}"), || {
            c.domain(&ns, "vm").is_some_and(|d| settled_on(&d, &target))
        })
        .await;
        let settle = asked.elapsed();
        settles.push(settle);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let samples = sampler.finish();
        let dom = c.domain(&ns, "vm");
        report(
            &format!("two-controllers-move-to-{target}"),
            &samples,
            settle,
            dom.as_ref(),
        );
        samples.assert_never_on_both("two controllers at once");
        assert_eq!(samples.last_running(), vec![target.clone()]);
        assert_only_on(&c, &ns, "vm", &target);
    }
    // Bound once, each move approved once: the events say so.
    let events = |reason: &str| event_count(&c.api, "vm", reason);
    println!(
        "two controllers: bound in {:.1}s, moves settled in {:.1}s and {:.1}s; events Scheduled {}, MoveApproved {}, Migrated {}",
        settles[0].as_secs_f64(),
        settles[1].as_secs_f64(),
        settles[2].as_secs_f64(),
        events("Scheduled"),
        events("MoveApproved"),
        events("Migrated")
    );
    assert_eq!(events("Scheduled"), 1, "bound once");
    assert_eq!(events("Migrated"), 2, "two moves, each carried out once");
    c.shutdown().await;
}

/// A running domain deleted right after a migration completed: the new holder removes the
/// guest, nothing is left on either node, and the Domain goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs private libvirtd: scripts/libvirt-nodes.sh up, then --run-ignored"]
async fn deleting_right_after_a_migration_leaves_nothing_on_either_node() {
    let mut c = cluster().await;
    let ns = c.namespace("pldel");
    let guest = format!("{ns}.vm");
    running_on_node(&c, &ns, "vm", "node-a", false).await;
    let sampler = Sampler::start(&guest, c.node("node-b"), c.node("node-a"));
    request(&c, &ns, "vm", "node-b");
    c.until(120, "the migration recorded Succeeded", || {
        c.domain(&ns, "vm")
            .is_some_and(|d| d["status"]["migration"]["state"] == "Succeeded")
    })
    .await;
    let migrated = c.domain(&ns, "vm").unwrap();
    c.api.delete("domains", &ns, "vm").unwrap();
    let deleted = Instant::now();
    c.until(120, "the Domain gone", || c.domain(&ns, "vm").is_none())
        .await;
    let settle = deleted.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let samples = sampler.finish();
    report(
        "delete-right-after-migration",
        &samples,
        settle,
        Some(&migrated),
    );
    samples.assert_never_on_both("delete right after a migration");
    assert!(samples.last_running().is_empty(), "{}", samples.timeline());
    for n in &c.nodes {
        assert!(!defined_on(&n.uri, &guest), "{guest} left on {}", n.name);
    }
    c.shutdown().await;
}

/// A Domain deleted while libvirt migrates it: the move is no longer wanted, so the source
/// aborts the job (the guest stays on the source), then removes the guest; nothing is left
/// on either node and the Domain goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs private libvirtd: scripts/libvirt-nodes.sh up, then --run-ignored"]
async fn deleting_mid_migration_aborts_the_move_and_removes_the_guest() {
    let mut c = cluster().await;
    let ns = c.namespace("pldelmig");
    let guest = format!("{ns}.vm");
    running_on_node(&c, &ns, "vm", "node-a", true).await;
    let sampler = Sampler::start(&guest, c.node("node-b"), c.node("node-a"));
    request(&c, &ns, "vm", "node-b");
    assert!(
        wait_for_job(c.node("node-a"), &guest, 60).await.is_some(),
        "no migration job on node-a\n{}",
        c.logs()
    );
    c.api.delete("domains", &ns, "vm").unwrap();
    let deleted = Instant::now();
    let mut last = Value::Null;
    c.until(120, "the Domain gone", || match c.domain(&ns, "vm") {
        Some(d) => {
            last = d;
            false
        }
        None => true,
    })
    .await;
    let settle = deleted.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let samples = sampler.finish();
    report("delete-mid-migration", &samples, settle, Some(&last));
    samples.assert_never_on_both("delete mid-migration");
    assert!(samples.last_running().is_empty(), "{}", samples.timeline());
    for n in &c.nodes {
        assert!(!defined_on(&n.uri, &guest), "{guest} left on {}", n.name);
    }
    c.shutdown().await;
}

/// A move that cannot be approved (its target has no HypervisorNode) waits with a
/// `MoveWaiting` condition; meanwhile the holder keeps the guest converged where it is — a
/// guest destroyed behind the agent's back is started again there — and a deletion still
/// completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs private libvirtd: scripts/libvirt-nodes.sh up, then --run-ignored"]
async fn a_move_that_waits_leaves_the_guest_converged_where_it_is() {
    let mut c = cluster().await;
    let ns = c.namespace("plwait");
    let guest = format!("{ns}.vm");
    running_on_node(&c, &ns, "vm", "node-a", false).await;
    let uri_a = c.node("node-a").uri.clone();
    request(&c, &ns, "vm", "node-z");
    c.until(30, "MoveWaiting TargetNotFound", || {
        c.domain(&ns, "vm").is_some_and(|d| {
            d["status"]["conditions"].as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "MoveWaiting" && c["reason"] == "TargetNotFound")
            })
        })
    })
    .await;
    c.until(30, "Ready for the new generation", || {
        c.domain(&ns, "vm").is_some_and(|d| is_ready(&d))
    })
    .await;
    virsh(&uri_a, &["destroy", &guest]);
    let destroyed = Instant::now();
    c.until(30, "the guest running again on node-a", || {
        running_on(&uri_a).is_some_and(|r| r.contains(&guest))
    })
    .await;
    println!(
        "a move waiting: virsh destroy repaired on the holder in {:.1}s",
        destroyed.elapsed().as_secs_f64()
    );
    assert_eq!(warnings(&c.api, "vm"), Vec::<(String, String)>::new());
    c.api.delete("domains", &ns, "vm").unwrap();
    let deleted = Instant::now();
    c.until(60, "the Domain gone", || c.domain(&ns, "vm").is_none())
        .await;
    println!(
        "a move waiting: deleted in {:.1}s",
        deleted.elapsed().as_secs_f64()
    );
    assert!(!defined_on(&uri_a, &guest));
    c.shutdown().await;
}

/// A long live migration does not stall the source's agent: while libvirt migrates one
/// domain, the agent publishes the migration's progress, repairs another domain destroyed
/// behind its back (the repair's event is the end of that reconcile), and its node's
/// heartbeat goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs private libvirtd: scripts/libvirt-nodes.sh up, then --run-ignored"]
async fn a_long_migration_does_not_stall_the_source_agent() {
    let mut c = cluster().await;
    let ns = c.namespace("plstall");
    let (mover, other) = (format!("{ns}.mover"), format!("{ns}.other"));
    running_on_node(&c, &ns, "mover", "node-a", true).await;
    running_on_node(&c, &ns, "other", "node-a", false).await;
    let node_a = c.node("node-a").clone();
    let sampler = Sampler::start(&mover, c.node("node-b"), &node_a);
    let heartbeat = || {
        c.api.get("hypervisornodes", "", "node-a").unwrap()["status"]["heartbeatTime"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    request(&c, &ns, "mover", "node-b");
    assert!(
        wait_for_job(&node_a, &mover, 60).await.is_some(),
        "no migration job on node-a\n{}",
        c.logs()
    );
    let beat_before = heartbeat();
    virsh(&node_a.uri, &["destroy", &other]);
    let destroyed = Instant::now();
    let (uri, m) = (node_a.uri.clone(), mover.clone());
    let migrating = move || {
        virt::connect::Connect::open_read_only(Some(&uri))
            .map(|conn| has_job(&conn, &m))
            .unwrap_or(false)
    };
    let repair_event = || {
        c.api.events().iter().any(|e| {
            e["regarding"]["name"] == "other"
                && e["action"]
                    .as_str()
                    .is_some_and(|a| a.starts_with("Repair"))
        })
    };
    let (mut repaired, mut progress, mut beats) = (None, None, Vec::new());
    while migrating() && destroyed.elapsed() < Duration::from_secs(60) {
        let beat = heartbeat();
        if beat != beat_before && !beats.contains(&beat) {
            beats.push(beat);
        }
        if repaired.is_none() && repair_event() {
            repaired = Some(destroyed.elapsed());
        }
        if progress.is_none()
            && c.domain(&ns, "mover")
                .is_some_and(|d| d["status"]["migration"]["progress"].is_object())
        {
            progress = Some(destroyed.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let migration_ran = destroyed.elapsed();
    let port = c.agent("node-a").port;
    let slowest: Vec<String> = http_get(port, "/metrics")
        .await
        .map(|(_, m)| m)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("virtkube_agent_libvirt_call_max_seconds"))
        .filter(|l| {
            l.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .is_some_and(|v| v > 0.5)
        })
        .map(str::to_string)
        .collect();
    println!("libvirt calls of node-a's agent slower than 0.5 s: {slowest:#?}");
    println!(
        "during a {:.1}s migration: the other domain repaired (event) after {repaired:?}, progress published after {progress:?}, {} heartbeats",
        migration_ran.as_secs_f64(),
        beats.len()
    );
    c.until(120, "mover settled on node-b", || {
        c.domain(&ns, "mover")
            .is_some_and(|d| settled_on(&d, "node-b"))
    })
    .await;
    let samples = sampler.finish();
    report(
        "long-migration-and-drift",
        &samples,
        destroyed.elapsed(),
        c.domain(&ns, "mover").as_ref(),
    );
    samples.assert_never_on_both("a long migration");
    assert!(
        repaired.is_some(),
        "the repair of another domain waited for the migration to end\n{}",
        c.logs()
    );
    assert!(
        progress.is_some(),
        "no progress published during the migration"
    );
    assert!(
        beats.len() >= 2,
        "the heartbeat stopped during the migration: {beats:?}"
    );
    assert_only_on(&c, &ns, "other", "node-a");
    c.shutdown().await;
}

/// Agents started with `--migration-tls`: a move is a live migration over TLS. Without the
/// target's server certificate libvirt refuses it (the flag reaches libvirt), the move is
/// `Failed` and the guest stays on the source; with the certificate back, the controller's
/// retry carries it out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs private libvirtd: scripts/libvirt-nodes.sh up, then --run-ignored"]
async fn a_move_over_tls_needs_the_certificates_and_keeps_the_guest_without_them() {
    let tls_dir = std::path::PathBuf::from(
        std::env::var("VIRTKUBE_TEST_TLS_DIR")
            .expect("VIRTKUBE_TEST_TLS_DIR (libvirt-nodes.sh env)"),
    );
    /// Puts the certificate back when dropped, also when the test fails.
    struct Hidden(std::path::PathBuf);
    impl Drop for Hidden {
        fn drop(&mut self) {
            let _ = std::fs::rename(self.0.with_extension("hidden"), &self.0);
        }
    }
    let server_cert = tls_dir.join("server-cert.pem");
    let mut c = Cluster::new().await;
    c.start_agent_with("node-a", &["--migration-tls"]);
    c.start_agent_with("node-b", &["--migration-tls"]);
    c.start_controller("c1", "virtkube-controller");
    c.wait_ready().await;
    let ns = c.namespace("pltls");
    running_on_node(&c, &ns, "vm", "node-a", false).await;
    let guest = format!("{ns}.vm");
    let sampler = Sampler::start(&guest, c.node("node-b"), c.node("node-a"));

    std::fs::rename(&server_cert, server_cert.with_extension("hidden")).unwrap();
    let hidden = Hidden(server_cert);
    c.api
        .edit_spec("domains", &ns, "vm", |s| s["nodeName"] = json!("node-b"))
        .unwrap();
    c.until(60, "the move failed for want of the certificate", || {
        c.domain(&ns, "vm").is_some_and(|d| {
            d["status"]["migration"]["state"] == "Failed"
                && d["status"]["migration"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("credentials"))
        })
    })
    .await;
    // The guest runs on, on node-a only, and says so (before the controller's retry, 5 s
    // after the failure).
    c.until(4, "running on node-a again after the failed move", || {
        c.domain(&ns, "vm").is_some_and(|d| {
            d["status"]["phase"] == "Running" && d["status"]["nodeName"] == "node-a"
        })
    })
    .await;
    for n in &c.nodes {
        let runs = running_on(&n.uri).expect("virsh list").contains(&guest);
        assert_eq!(
            runs,
            n.name == "node-a",
            "{guest} running on {}: {runs}",
            n.name
        );
    }
    drop(hidden);

    c.until(120, "settled on node-b after the retry", || {
        c.domain(&ns, "vm")
            .is_some_and(|d| settled_on(&d, "node-b"))
    })
    .await;
    let samples = sampler.finish();
    let dom = c.domain(&ns, "vm");
    report("move-over-tls", &samples, Duration::ZERO, dom.as_ref());
    samples.assert_never_on_both("move over TLS");
    let dom = dom.unwrap();
    assert_eq!(dom["status"]["migration"]["state"], "Succeeded");
    assert_eq!(dom["status"]["migration"]["mode"], "Live");
    assert_only_on(&c, &ns, "vm", "node-b");
    c.shutdown().await;
}

/// The source's libvirtd is restarted while it migrates the guest (a libvirt upgrade, a
/// crash): libvirt cancels the outgoing migration when it comes back, the guest stays on
/// the source, the agent reconnects, records the failed move, and the controller's retry
/// moves the guest; at no sample did it run on both nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs private libvirtd: scripts/libvirt-nodes.sh up, then --run-ignored"]
async fn libvirtd_restarted_mid_migration_leaves_the_guest_on_one_node() {
    let dir = std::env::var("VIRTKUBE_TEST_NODES_DIR").expect("VIRTKUBE_TEST_NODES_DIR");
    let mut c = cluster().await;
    let ns = c.namespace("plrestart");
    let guest = format!("{ns}.vm");
    running_on_node(&c, &ns, "vm", "node-a", true).await;
    let sampler = Sampler::start(&guest, c.node("node-b"), c.node("node-a"));
    request(&c, &ns, "vm", "node-b");
    let job = wait_for_job(c.node("node-a"), &guest, 60).await;
    assert!(job.is_some(), "no migration job on node-a\n{}", c.logs());

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/libvirt-nodes.sh");
    let restart = tokio::task::spawn_blocking(move || {
        std::process::Command::new(script)
            .args(["restart-daemon", "A", &dir])
            .status()
    })
    .await
    .unwrap()
    .unwrap();
    assert!(restart.success(), "restart-daemon A failed");
    let restarted = Instant::now();
    let after_restart = (
        running_on(&c.node("node-a").uri).unwrap().contains(&guest),
        running_on(&c.node("node-b").uri).unwrap().contains(&guest),
    );
    println!("right after libvirtd A restarted: running on a, b = {after_restart:?}");
    assert_eq!(
        after_restart,
        (true, false),
        "the interrupted migration leaves the guest on the source"
    );

    c.until(180, "settled on node-b", || {
        c.domain(&ns, "vm")
            .is_some_and(|d| settled_on(&d, "node-b"))
    })
    .await;
    let settle = restarted.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let samples = sampler.finish();
    let dom = c.domain(&ns, "vm");
    report(
        "libvirtd-restarted-mid-migration",
        &samples,
        settle,
        dom.as_ref(),
    );
    // The daemon is away while it stops and starts again: about 5 s here (stopping waits
    // for the migration job to end); 15 s (150 samples) bounds it on a loaded machine.
    samples.assert_never_on_both_with_a_restart("libvirtd restarted mid-migration", 150);
    assert_eq!(samples.last_running(), vec!["node-b".to_string()]);
    let failed: Vec<_> = warnings(&c.api, "vm")
        .into_iter()
        .filter(|(reason, _)| reason == "MigrationFailed")
        .collect();
    println!("warnings: {failed:?}");
    assert!(
        !failed.is_empty(),
        "the interrupted move was recorded as failed"
    );
    assert_only_on(&c, &ns, "vm", "node-b");
    c.shutdown().await;
}

/// A running domain whose disk is a volume of a node-local pool moves with
/// `allowCopyStorage`: libvirt copies the disk during the live migration, the volume is
/// handed over to the target (its copy recorded there, the stale image on the source
/// removed), the data written before the move is on the target, and at no sample did the
/// guest run on both nodes.
/// A namespace with a node-local dir pool (`<ns>-local`, on both nodes), a raw Volume `disk`
/// in it (reclaimPolicy Delete), and Domain `vm` using it with `allowCopyStorage`, running
/// on node-a; returns the namespace, the pool and the image's libvirt name.
async fn running_with_a_local_volume(c: &mut Cluster, prefix: &str) -> (String, String, String) {
    let ns = c.namespace(prefix);
    let pool = format!("{ns}-local");
    let image = format!("{ns}.disk");
    // Each daemon has its own /var/lib/libvirt (a mount namespace per node): the pool is
    // node-local for real.
    c.api
        .create(
            "storagepools",
            json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "StoragePool",
                   "metadata": {"name": pool},
                   "spec": {"type": "dir", "target": {"path": format!("/var/lib/libvirt/{pool}")}}}),
        )
        .unwrap();
    c.api
        .create(
            "volumes",
            json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Volume",
                   "metadata": {"name": "disk", "namespace": ns},
                   "spec": {"pool": pool, "capacity": "8Mi", "format": "raw", "reclaimPolicy": "Delete"}}),
        )
        .unwrap();
    let mut dom = small_domain(&ns, "vm", Some("node-a"));
    dom["spec"]["disks"] = json!([{"name": "data", "volume": "disk"}]);
    dom["spec"]["migration"] = json!({"allowCopyStorage": true});
    c.api.create("domains", dom).unwrap();
    c.until(120, "running on node-a with its volume", || {
        c.domain(&ns, "vm")
            .is_some_and(|d| settled_on(&d, "node-a"))
    })
    .await;
    (ns, pool, image)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs private libvirtd: scripts/libvirt-nodes.sh up, then --run-ignored"]
async fn a_move_copies_a_node_local_volume_with_the_guest() {
    let mut c = cluster().await;
    let (ns, pool, image) = running_with_a_local_volume(&mut c, "plcopy").await;
    let uri_a = c.node("node-a").uri.clone();
    let uri_b = c.node("node-b").uri.clone();

    // Data the guest's disk holds before the move.
    let dir = tempfile::tempdir().unwrap();
    let marker: Vec<u8> = (0..1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let upload = dir.path().join("marker");
    std::fs::write(&upload, &marker).unwrap();
    virsh(
        &uri_a,
        &[
            "vol-upload",
            "--pool",
            &pool,
            &image,
            upload.to_str().unwrap(),
        ],
    );

    let guest = format!("{ns}.vm");
    let sampler = Sampler::start(&guest, c.node("node-b"), c.node("node-a"));
    let started = Instant::now();
    request(&c, &ns, "vm", "node-b");
    c.until(120, "settled on node-b", || {
        c.domain(&ns, "vm")
            .is_some_and(|d| settled_on(&d, "node-b"))
    })
    .await;
    let settle = started.elapsed();
    let volume = || c.api.get("volumes", &ns, "disk").unwrap();
    c.until(60, "the volume handed over to node-b", || {
        let v = volume();
        v["status"]["nodeName"] == "node-b"
            && v["status"]["transfer"].is_null()
            && v["status"]["key"].is_string()
            && v["status"]["phase"] == "Available"
    })
    .await;
    let handed = started.elapsed();
    let samples = sampler.finish();
    let dom = c.domain(&ns, "vm").unwrap();
    report("move-copying-storage", &samples, settle, Some(&dom));
    println!(
        "move-copying-storage: volume handed over {:.1}s after the request",
        handed.as_secs_f64()
    );
    samples.assert_never_on_both("move copying storage");
    assert_only_on(&c, &ns, "vm", "node-b");
    assert_eq!(dom["status"]["migration"]["state"], "Succeeded");
    assert_eq!(dom["status"]["migration"]["copiedVolumes"], json!(["disk"]));
    // The stale image left node-a; the copy on node-b holds the data.
    let listed_on = |uri: &str| virsh(uri, &["vol-list", "--pool", &pool]);
    assert!(!listed_on(&uri_a).contains(&image), "{}", listed_on(&uri_a));
    assert!(listed_on(&uri_b).contains(&image), "{}", listed_on(&uri_b));
    let download = dir.path().join("copy");
    virsh(
        &uri_b,
        &[
            "vol-download",
            "--pool",
            &pool,
            &image,
            download.to_str().unwrap(),
        ],
    );
    let copy = std::fs::read(&download).unwrap();
    assert_eq!(copy.len(), 8 << 20);
    assert!(
        copy[..marker.len()] == marker[..],
        "the data moved with the disk"
    );
    assert_eq!(event_count(&c.api, "disk", "SourceRemoved"), 1);
    assert_eq!(event_count(&c.api, "disk", "MovedHere"), 1);
    assert_eq!(warnings(&c.api, "disk"), Vec::<(String, String)>::new());

    // Everything goes: the guest, the volume (reclaimPolicy Delete) on node-b, the pool.
    c.api.delete("domains", &ns, "vm").unwrap();
    c.until(60, "the Domain gone", || c.domain(&ns, "vm").is_none())
        .await;
    c.api.delete("volumes", &ns, "disk").unwrap();
    c.until(60, "the Volume gone", || {
        c.api.get("volumes", &ns, "disk").is_none()
    })
    .await;
    assert!(!listed_on(&uri_b).contains(&image));
    c.api.delete("storagepools", "", &pool).unwrap();
    c.until(60, "the pool gone", || {
        c.api.get("storagepools", "", &pool).is_none()
    })
    .await;
    c.shutdown().await;
}

/// The Domain and its copied Volume deleted as soon as the copying move succeeded: the
/// Domain's deletion waits for the volume's handover, the Volume's for the Domain, and then
/// both go, with the image gone from both nodes (reclaimPolicy Delete): nothing stuck,
/// nothing left.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs private libvirtd: scripts/libvirt-nodes.sh up, then --run-ignored"]
async fn deleting_right_after_a_copying_move_waits_for_the_handover_and_leaves_nothing() {
    let mut c = cluster().await;
    let (ns, pool, image) = running_with_a_local_volume(&mut c, "plcopydel").await;
    request(&c, &ns, "vm", "node-b");
    c.until(120, "the copying move succeeded", || {
        c.domain(&ns, "vm")
            .is_some_and(|d| d["status"]["migration"]["state"] == "Succeeded")
    })
    .await;
    let transfer = c.api.get("volumes", &ns, "disk").unwrap()["status"]["transfer"].clone();
    c.api.delete("domains", &ns, "vm").unwrap();
    c.api.delete("volumes", &ns, "disk").unwrap();
    let started = Instant::now();
    c.until(90, "the Domain and the Volume gone", || {
        c.domain(&ns, "vm").is_none() && c.api.get("volumes", &ns, "disk").is_none()
    })
    .await;
    println!(
        "deleted right after a copying move (handover then {}): both gone in {:.1}s",
        transfer["state"].as_str().unwrap_or("not begun"),
        started.elapsed().as_secs_f64()
    );
    for n in &c.nodes {
        let listed = virsh(&n.uri, &["vol-list", "--pool", &pool]);
        assert!(
            !listed.contains(&image),
            "{image} left on {}: {listed}",
            n.name
        );
        assert!(
            !defined_on(&n.uri, &format!("{ns}.vm")),
            "guest left on {}",
            n.name
        );
    }
    c.api.delete("storagepools", "", &pool).unwrap();
    c.until(60, "the pool gone", || {
        c.api.get("storagepools", "", &pool).is_none()
    })
    .await;
    c.shutdown().await;
}
