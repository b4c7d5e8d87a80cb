//! The chart's RBAC against what each role's process really asks the API server.
//!
//! The real `virtkube agent` process runs against the in-memory API server enforcing the
//! chart's rendered RBAC (`agent_support::rbac`), as its ServiceAccount, through scenarios
//! that make it use every permission it has: a bound Domain converged, paused, moved (the
//! migration target looked up, the move failing on the test driver), deleted; a Volume
//! created and deleted; a StoragePool and a Network applied; a Network deleted while a Domain
//! uses it (the agent's `DeletionBlocked` event repeats: a series patch); a label change on
//! its HypervisorNode that deselects the pool (the agent drops its per-node status entry and
//! finalizer); the HypervisorNode created and published. Then:
//! (a) no request was refused (no missing verb), and
//! (b) the (group, resource[/subresource], verb) the agent used equal the rules of
//!     `charts/virtkube/rbac/agent.yaml` (no extra verb). Both sets are printed.
//!
//! The controller's role is compared with its calls by `tests/controller_rbac.rs`, which runs
//! the whole controller against the in-memory API server enforcing `rbac/controller.yaml`.

mod agent_support;

use std::time::{Duration, Instant};

use agent_support::fake_api::{KillOnDrop, agent_with, free_port, sigterm};
use agent_support::rbac::{self, Role};
use serde_json::{Value, json};
use virtkube_testapi::admission::token_on_node;
use virtkube_testapi::{Config, TestApi};

/// The node the agent process runs as (`agent_with` sets it).
const NODE: &str = "proc-node";
const NS: &str = "rbac";

/// Waits until `check` holds, up to `secs`; on a timeout, fails with `what` and the agent's
/// log tail.
async fn eventually(secs: u64, what: &str, log: &std::path::Path, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !check() {
        if Instant::now() > deadline {
            let tail: Vec<String> = std::fs::read_to_string(log)
                .unwrap_or_default()
                .lines()
                .rev()
                .take(25)
                .map(str::to_string)
                .collect();
            panic!(
                "timed out waiting for {what}; agent log (newest first):\n{}",
                tail.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn condition(obj: &Option<Value>, type_: &str) -> Option<(String, String)> {
    let obj = obj.as_ref()?;
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .map(|c| {
            (
                c["status"].as_str().unwrap_or_default().to_string(),
                c["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
}

fn ready(obj: &Option<Value>) -> bool {
    obj.as_ref().is_some_and(|o| {
        condition(&Some(o.clone()), "Ready").is_some_and(|(s, _)| s == "True")
            && o["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| {
                    c["type"] == "Ready" && c["observedGeneration"] == o["metadata"]["generation"]
                })
    })
}

#[tokio::test]
async fn the_agent_process_uses_exactly_the_charts_agent_rules() {
    // The chart's RBAC and, as on a 1.30+ cluster, its node policy; the agent's token is
    // bound to its node, as a pod's is there.
    let api = TestApi::start_with(Config {
        authorizer: Some(rbac::enforcing()),
        admission: rbac::node_policy(),
        ..Config::default()
    })
    .await
    .unwrap();
    api.create_namespace(NS).unwrap();
    let admin = api.client("admin").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kubeconfig");
    api.write_kubeconfig(&config, &[&token_on_node(&Role::Agent.identity(), NODE)])
        .unwrap();
    let log = dir.path().join("agent.log");
    let mut child = agent_with(
        &config,
        free_port(),
        "test:///default",
        &["--shutdown-timeout-seconds", "1"],
        Some(&log),
    );
    let _kill = KillOnDrop(child.id());

    // The agent creates and publishes its HypervisorNode (an apply that creates: create and
    // patch; then status patches).
    eventually(30, "the HypervisorNode published", &log, || {
        condition(&api.get("hypervisornodes", "", NODE), "Ready").is_some()
    })
    .await;
    // The administrator labels the node: pools and networks select it by label.
    api.patch_labels("hypervisornodes", "", NODE, &[("zone", Some("a"))])
        .unwrap();

    api.create(
        "storagepools",
        json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "StoragePool",
               "metadata": {"name": "rbacpool"},
               "spec": {"type": "dir", "target": {"path": "/var/lib/virtkube/pools/rbacpool"},
                        "nodeSelector": {"zone": "a"}}}),
    )
    .unwrap();
    api.create(
        "networks",
        json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Network",
               "metadata": {"name": "rbacnet"},
               "spec": {"mode": "isolated", "ip": {"address": "10.156.0.1", "prefix": 24},
                        "nodeSelector": {"zone": "a"}}}),
    )
    .unwrap();
    // The Volume's first status write loses its compare-and-swap (a 409, as when another
    // write came first): the agent reads the Volume again (`get volumes`). Without this the
    // grant's use would depend on a race (it did: a run without a lost write failed here).
    let agent_user = Role::Agent.identity();
    api.inject(1, virtkube_testapi::Answer::Conflict, move |r| {
        r.identity == agent_user
            && r.resource == "volumes"
            && r.subresource == "status"
            && r.verb == "patch"
    });
    api.create(
        "volumes",
        json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Volume",
               "metadata": {"name": "root", "namespace": NS},
               "spec": {"pool": "rbacpool", "capacity": "1Gi", "nodeName": NODE,
                        "reclaimPolicy": "Delete"}}),
    )
    .unwrap();
    api.create(
        "domains",
        json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Domain",
               "metadata": {"name": "vm", "namespace": NS},
               "spec": {"runStrategy": "Manual", "state": "Running",
                        "memory": {"size": "64Mi"}, "cpu": {"vcpus": 1},
                        "disks": [{"name": "root", "volume": "root"}],
                        "interfaces": [{"name": "eth0", "network": "rbacnet"}]}}),
    )
    .unwrap();
    // Bound as the cluster controller binds them.
    agent_support::bind_domain(&admin, NS, "vm", NODE).await;
    agent_support::bind_volume(&api, NS, "root", NODE).await;

    eventually(90, "pool, network, volume and domain Ready", &log, || {
        ready(&api.get("storagepools", "", "rbacpool"))
            && ready(&api.get("networks", "", "rbacnet"))
            && ready(&api.get("volumes", NS, "root"))
            && ready(&api.get("domains", NS, "vm"))
    })
    .await;

    // Paused, resumed and paused again: the second `Paused` event repeats the first, so
    // the Recorder patches its series.
    let agent = Role::Agent.identity();
    for state in ["Paused", "Running", "Paused"] {
        api.edit_spec("domains", NS, "vm", |s| s["state"] = json!(state))
            .unwrap();
        eventually(30, &format!("the domain {state}"), &log, || {
            let vm = api.get("domains", NS, "vm");
            ready(&vm) && vm.is_some_and(|v| v["status"]["phase"] == state)
        })
        .await;
    }
    eventually(30, "a repeated event (series patch)", &log, || {
        api.authorizations()
            .iter()
            .any(|r| r.identity == agent && r.resource == "events" && r.verb == "patch")
    })
    .await;

    // A move to node-b, approved as the controller approves it: the holder reads the
    // target's HypervisorNode for its URIs; the test driver cannot migrate, so the move
    // fails and the guest stays. Then the user takes the request back.
    agent_support::hypervisor_node(&admin, "node-b", "test:///default").await;
    api.edit_spec("domains", NS, "vm", |s| s["nodeName"] = json!("node-b"))
        .unwrap();
    agent_support::approve_move(&admin, NS, "vm", "node-b").await;
    eventually(60, "the move failed", &log, || {
        api.get("domains", NS, "vm")
            .is_some_and(|v| v["status"]["migration"]["state"] == "Failed")
    })
    .await;
    api.edit_spec("domains", NS, "vm", |s| s["nodeName"] = json!(NODE))
        .unwrap();
    eventually(30, "the domain Ready on its node again", &log, || {
        ready(&api.get("domains", NS, "vm"))
    })
    .await;

    // The network deleted while the domain uses it: the deletion waits, and says so.
    api.delete("networks", "", "rbacnet").unwrap();
    eventually(60, "the network's deletion blocked", &log, || {
        agent_support::events(&api)
            .iter()
            .any(|e| e.1 == "DeletionBlocked")
    })
    .await;

    // Deleting the domain lets the network go; the volume (reclaimPolicy Delete) goes too.
    api.delete("domains", NS, "vm").unwrap();
    api.delete("volumes", NS, "root").unwrap();
    eventually(60, "domain, network and volume gone", &log, || {
        api.count("domains") == 0 && api.count("networks") == 0 && api.count("volumes") == 0
    })
    .await;

    // The node's label goes: the pool no longer selects it, and the agent lets go of it.
    api.patch_labels("hypervisornodes", "", NODE, &[("zone", None)])
        .unwrap();
    eventually(30, "the pool released by the deselected node", &log, || {
        api.get("storagepools", "", "rbacpool").is_some_and(|p| {
            p["metadata"]["finalizers"]
                .as_array()
                .is_none_or(|f| f.is_empty())
        })
    })
    .await;

    sigterm(child.id());
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "the agent stopped cleanly");

    let report = rbac::check_role(&api, Role::Agent);
    report.assert_exact();
    // Every write of the honest agent passed the node policy, which was in force for its
    // credentials: the same token cannot write another node's HypervisorNode.
    assert_eq!(
        api.admission_denials(),
        vec![],
        "the node policy refused the agent"
    );
    let as_agent = api
        .client(&token_on_node(&Role::Agent.identity(), NODE))
        .await
        .unwrap();
    let other = kube::Api::<virtkube_crds::HypervisorNode>::all(as_agent)
        .patch_status(
            "node-b",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"status": {"libvirtUri": "qemu:///elsewhere"}})),
        )
        .await;
    assert!(
        matches!(&other, Err(kube::Error::Api(s)) if s.code == 403 && s.message.contains("ValidatingAdmissionPolicy")),
        "the policy applies to the agent's token: {other:?}"
    );
}

/// The controller's rules as rendered by the chart are the rules of `rbac/controller.yaml`
/// (its calls are compared with them by `tests/controller_rbac.rs`).
#[test]
fn the_controllers_role_renders_as_written() {
    rbac::assert_rendered_as_written(Role::Controller);
}

/// The agent's RBAC without `watch` on networks (a hand-edited role, an old chart): the
/// refusal is an error in the log and a reason on `/readyz`, not a debug line while the
/// agent claims to be ready.
#[tokio::test]
async fn a_watch_the_rbac_refuses_is_an_error_and_fails_readyz() {
    let mut docs = rbac::rendered_rbac();
    for doc in &mut docs {
        let Some(rules) = doc["rules"].as_array_mut() else {
            continue;
        };
        for rule in rules.iter_mut() {
            let names_networks = rule["resources"]
                .as_array()
                .is_some_and(|r| r.iter().any(|x| x == "networks"));
            if names_networks
                && rule["verbs"]
                    .as_array()
                    .is_some_and(|v| v.iter().any(|x| x == "watch"))
            {
                rule["resources"] = json!(["networks"]);
                rule["verbs"] = json!(["list", "patch"]);
            }
        }
        // The rule above also granted volumes and storagepools: keep their verbs.
        if doc["kind"] == "ClusterRole" && doc["metadata"]["name"] == "virtkube-agent" {
            rules_push(
                doc,
                json!({"apiGroups": ["virtkube.io"],
                                   "resources": ["volumes", "storagepools"],
                                   "verbs": ["list", "watch", "patch"]}),
            );
        }
    }
    let texts: Vec<String> = docs
        .iter()
        .map(|d| serde_json::to_string(d).unwrap())
        .collect();
    let mut authorizer = virtkube_testapi::Authorizer::new(&[virtkube_testapi::ADMIN]);
    authorizer.load_yaml(&texts).unwrap();
    let api = TestApi::start_with(Config {
        authorizer: Some(authorizer),
        ..Config::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kubeconfig");
    api.write_kubeconfig(&config, &[&Role::Agent.identity()])
        .unwrap();
    let log = dir.path().join("agent.log");
    let port = free_port();
    let mut child = agent_with(
        &config,
        port,
        "test:///default",
        &["--shutdown-timeout-seconds", "1"],
        Some(&log),
    );
    let _kill = KillOnDrop(child.id());

    let deadline = Instant::now() + Duration::from_secs(30);
    let body = loop {
        if let Some((503, body)) = agent_support::fake_api::http_get(port, "/readyz").await
            && body.contains("watch_forbidden")
        {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never named the forbidden watch; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!("{body}");
    assert!(body.contains("watch of Network"), "{body}");
    assert!(body.contains("charts/virtkube/rbac/agent.yaml"), "{body}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.lines().any(|l| l.contains("ERROR")
            && l.contains("refuses this watch")
            && l.contains("Network")),
        "no error line for the refused watch:\n{text}"
    );
    let metrics = agent_support::fake_api::http_get(port, "/metrics")
        .await
        .unwrap()
        .1;
    assert!(
        metrics
            .lines()
            .any(|l| l.contains("reason=\"watch_forbidden\"") && l.ends_with(" 1")),
        "the unready reason is in the metrics"
    );
    sigterm(child.id());
    let stopped = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(stopped.success(), "the agent stopped cleanly");
}

fn rules_push(doc: &mut Value, rule: Value) {
    if let Some(rules) = doc["rules"].as_array_mut() {
        rules.push(rule);
    }
}
