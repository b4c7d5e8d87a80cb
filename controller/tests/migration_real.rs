//! Against two real private libvirtd daemons with QEMU (`scripts/libvirt-nodes.sh up`, then
//! source its env file): apply a domain with pinned vCPUs and autostart on node A, change its
//! `nodeName` to B, apply again: it is live-migrated (not recreated), still running, pins and
//! autostart kept; delete cleans up both hosts.
//!
//! ```sh
//! scripts/libvirt-nodes.sh up
//! set -a; . /tmp/virtkube-libvirt-nodes/env; set +a
//! cargo test -p virtkube --test migration_real -- --ignored
//! ```
//!
//! Without the environment the test fails (it never passes silently).

use std::time::Duration;

use virtkube::cli::apply::{ConvergeOptions, converge};
use virtkube::execute::{self, ExecOptions};
use virtkube::host::{HostSpec, Hosts};
use virtkube::plan::desired::DesiredState;
use virtkube::plan::observed::PowerObserved;
use virtkube::plan::{self, Op, PlanOptions};
use virtkube_crds::manifest;
use virtkube_engine::EngineConfig;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run scripts/libvirt-nodes.sh up and source /tmp/virtkube-libvirt-nodes/env")
    })
}

fn manifest_on(node: &str) -> String {
    format!(
        r#"apiVersion: virtkube.io/v1alpha1
kind: Domain
metadata:
  name: mover
  namespace: vk-ctl-e2e
spec:
  nodeName: {node}
  runStrategy: Always
  autostart: true
  cpu:
    vcpus: 2
    pinning:
      - vcpu: 0
        cpuset: "0"
      - vcpu: 1
        cpuset: "1"
  memory:
    size: 64Mi
"#
    )
}

fn load(text: &str) -> Vec<manifest::Manifest> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mover.yaml");
    std::fs::write(&path, text).unwrap();
    manifest::load(&[path]).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs private libvirtd"]
async fn changing_node_name_live_migrates_a_running_pinned_domain_and_delete_cleans_both_hosts() {
    let specs = [
        HostSpec {
            node: "node-a".into(),
            uri: env("VIRTKUBE_TEST_NODE_A_URI"),
            p2p_uri: Some(env("VIRTKUBE_TEST_NODE_A_P2P_URI")),
            migration_uri: Some(env("VIRTKUBE_TEST_NODE_A_MIGRATION_URI")),
        },
        HostSpec {
            node: "node-b".into(),
            uri: env("VIRTKUBE_TEST_NODE_B_URI"),
            p2p_uri: Some(env("VIRTKUBE_TEST_NODE_B_P2P_URI")),
            migration_uri: Some(env("VIRTKUBE_TEST_NODE_B_MIGRATION_URI")),
        },
    ];
    let mut hosts = Hosts::connect(&specs, EngineConfig::default())
        .await
        .unwrap();
    // A guest with no OS ignores ACPI: do not wait 30 s for it at deletion.
    hosts.shutdown_deadline = Duration::from_secs(2);
    let options = ConvergeOptions {
        verbose: true,
        ..ConvergeOptions::default()
    };
    let mut out = Vec::new();

    // Leftovers of an interrupted earlier run.
    let (old, _) = DesiredState::from_manifests(&load(&manifest_on("node-a")), &hosts.nodes());
    let cleanup = plan::plan_delete(&old, &hosts.observe().await.unwrap());
    execute::execute(&cleanup, &hosts, ExecOptions::default(), |_, _| {}).await;

    // 1. On node A: running, pinned, autostart.
    let (on_a, notices) =
        DesiredState::from_manifests(&load(&manifest_on("node-a")), &hosts.nodes());
    assert!(notices.is_empty(), "{notices:?}");
    let done = converge(&hosts, &on_a, &[], &options, &mut out)
        .await
        .unwrap();
    assert!(
        done.is_clean(),
        "{}\n{:?}",
        String::from_utf8_lossy(&out),
        done.failures
    );
    let a = &done.observed.hosts["node-a"].domains["vk-ctl-e2e.mover"];
    assert_eq!(a.power, PowerObserved::Running);
    assert!(a.autostart);
    assert_eq!(a.pinning.get(&0).map(String::as_str), Some("0"));
    assert_eq!(a.pinning.get(&1).map(String::as_str), Some("1"));
    let uuid = a.uuid.clone();

    // 2. nodeName → B: the plan is one live migration, no recreation.
    let (on_b, _) = DesiredState::from_manifests(&load(&manifest_on("node-b")), &hosts.nodes());
    let p = plan::plan(
        &on_b,
        &hosts.observe().await.unwrap(),
        &PlanOptions::default(),
    );
    assert_eq!(p.actions.len(), 1, "{}", p.render(true));
    assert!(matches!(&p.actions[0].op, Op::MigrateDomain { to, .. } if to == "node-b"));
    assert_eq!(p.actions[0].node, "node-a");
    let done = converge(&hosts, &on_b, &[], &options, &mut out)
        .await
        .unwrap();
    assert!(
        done.is_clean(),
        "{}\n{:?}",
        String::from_utf8_lossy(&out),
        done.failures
    );
    assert!(
        !done.observed.hosts["node-a"]
            .domains
            .contains_key("vk-ctl-e2e.mover"),
        "source undefined"
    );
    let b = &done.observed.hosts["node-b"].domains["vk-ctl-e2e.mover"];
    assert_eq!(
        b.power,
        PowerObserved::Running,
        "still running after the migration"
    );
    assert_eq!(b.reason, "migrated");
    assert_eq!(b.uuid, uuid, "the same guest, not a new one");
    assert_eq!(b.pinning.get(&0).map(String::as_str), Some("0"));
    assert_eq!(b.pinning.get(&1).map(String::as_str), Some("1"));
    assert!(b.autostart, "autostart kept on the destination");

    // 3. Delete cleans up both hosts.
    let p = plan::plan_delete(&on_b, &hosts.observe().await.unwrap());
    let report = execute::execute(&p, &hosts, ExecOptions::default(), |_, _| {}).await;
    assert!(report.is_success(), "{report:?}");
    let after = hosts.observe().await.unwrap();
    for node in ["node-a", "node-b"] {
        assert!(
            !after.hosts[node].domains.contains_key("vk-ctl-e2e.mover"),
            "{node}"
        );
    }
    hosts.close().await.unwrap();
}
