//! Device hotplug through the planner and executor, against a real private libvirtd with
//! QEMU (`scripts/libvirt-nodes.sh up`, then source its env file), node A only:
//!
//! * disks (virtio and USB) and a NIC added to a running guest are plugged in live (`~`),
//!   without a restart;
//! * removed again: the USB disk leaves at once; the virtio disk and the NIC need the
//!   guest's ACPI acknowledgement, which a guest with no OS never gives: the unplug is
//!   reported as refused, the change waits for a restart (`updatePolicy: Deferred`) and is
//!   not asked again;
//! * `updatePolicy: Restart` then restarts the guest, which completes the unplug.
//!
//! Without the environment the test fails (it never passes silently).

use std::time::Duration;

use virtkube::cli::apply::{ConvergeOptions, converge};
use virtkube::execute::{self, ExecOptions};
use virtkube::host::{HostSpec, Hosts};
use virtkube::plan::desired::DesiredState;
use virtkube::plan::observed::PowerObserved;
use virtkube::plan::{self, NoticeKind, Op, PlanOptions, Symbol};
use virtkube_crds::manifest;
use virtkube_engine::EngineConfig;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run scripts/libvirt-nodes.sh up and source its env file")
    })
}

/// A pool with three volumes, an isolated network, and a running guest with the disks and
/// NICs listed.
fn manifests(pool_path: &str, disks: &str, nics: &str, policy: &str) -> String {
    let octet = 150 + std::process::id() % 50;
    format!(
        r#"apiVersion: virtkube.io/v1alpha1
kind: StoragePool
metadata: {{name: vk-hot-pool}}
spec: {{type: dir, target: {{path: {pool_path}}}}}
---
apiVersion: virtkube.io/v1alpha1
kind: Network
metadata: {{name: vk-hot-net}}
spec: {{mode: isolated, bridge: vkhot{octet}, ip: {{address: 10.{octet}.3.1, prefix: 24}}}}
---
apiVersion: virtkube.io/v1alpha1
kind: Volume
metadata: {{name: root, namespace: vk-hot}}
spec: {{pool: vk-hot-pool, capacity: 16Mi, reclaimPolicy: Delete}}
---
apiVersion: virtkube.io/v1alpha1
kind: Volume
metadata: {{name: data, namespace: vk-hot}}
spec: {{pool: vk-hot-pool, capacity: 8Mi, reclaimPolicy: Delete}}
---
apiVersion: virtkube.io/v1alpha1
kind: Volume
metadata: {{name: stick, namespace: vk-hot}}
spec: {{pool: vk-hot-pool, capacity: 8Mi, reclaimPolicy: Delete}}
---
apiVersion: virtkube.io/v1alpha1
kind: Domain
metadata: {{name: guest, namespace: vk-hot}}
spec:
  updatePolicy: {policy}
  memory: {{size: 64Mi}}
  disks: [{{name: root, volume: root}}{disks}]
  interfaces: [{nics}]
"#
    )
}

const EXTRA_DISKS: &str = ", {name: data, volume: data, target: vdb}, {name: stick, volume: stick, bus: usb, target: sda}";
const NIC: &str = "{name: eth0, network: vk-hot-net, macAddress: \"52:54:00:0b:07:01\"}";

fn load(text: &str) -> Vec<manifest::Manifest> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hot.yaml");
    std::fs::write(&path, text).unwrap();
    manifest::load(&[path]).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs private libvirtd: scripts/libvirt-nodes.sh up, then --run-ignored"]
async fn disks_and_nics_plugged_in_and_out_of_a_running_guest() {
    let specs = [HostSpec {
        node: "node-a".into(),
        uri: env("VIRTKUBE_TEST_NODE_A_URI"),
        p2p_uri: None,
        migration_uri: None,
    }];
    let mut hosts = Hosts::connect(&specs, EngineConfig::default())
        .await
        .unwrap();
    // A guest with no OS ignores ACPI: do not wait 30 s for it at a restart or deletion.
    hosts.shutdown_deadline = Duration::from_secs(2);
    let options = ConvergeOptions::default();
    let mut out = Vec::new();
    let dir = tempfile::Builder::new()
        .prefix("vkhot")
        .tempdir_in("/tmp")
        .unwrap();
    let pool_path = dir.path().join("images");
    let pool_path = pool_path.to_str().unwrap().to_string();
    let desired = |disks: &str, nics: &str, policy: &str| {
        DesiredState::from_manifests(
            &load(&manifests(&pool_path, disks, nics, policy)),
            &hosts.nodes(),
        )
        .0
    };
    let guest =
        |o: &plan::observed::ObservedState| o.hosts["node-a"].domains["vk-hot.guest"].clone();
    let text = |out: &Vec<u8>| String::from_utf8_lossy(out).into_owned();

    // Leftovers of an interrupted earlier run.
    let old = desired(EXTRA_DISKS, NIC, "Deferred");
    let cleanup = plan::plan_delete(&old, &hosts.observe().await.unwrap());
    execute::execute(&cleanup, &hosts, ExecOptions::default(), |_, _| {}).await;

    // 1. A running guest with its root disk only.
    let bare = desired("", "", "Deferred");
    let done = converge(&hosts, &bare, &[], &options, &mut out)
        .await
        .unwrap();
    assert!(done.is_clean(), "{}\n{:?}", text(&out), done.failures);
    let id = guest(&done.observed).id.expect("running");

    // 2. Two disks and a NIC added: plugged in live, the guest keeps running (same id).
    let full = desired(EXTRA_DISKS, NIC, "Deferred");
    let p = plan::plan(
        &full,
        &hosts.observe().await.unwrap(),
        &PlanOptions::default(),
    );
    assert!(
        p.actions.len() == 3
            && p.actions.iter().all(|a| a.symbol == Symbol::Live
                && matches!(a.op, Op::AttachDisk(_) | Op::AttachInterface(_))),
        "{}",
        p.render(true)
    );
    let done = converge(&hosts, &full, &[], &options, &mut out)
        .await
        .unwrap();
    assert!(done.is_clean(), "{}\n{:?}", text(&out), done.failures);
    let g = guest(&done.observed);
    assert_eq!(g.id, Some(id), "not restarted");
    let targets: Vec<&str> = g.disks.iter().map(|d| d.target.as_str()).collect();
    assert_eq!(targets, ["vda", "vdb", "sda"]);
    assert_eq!(g.interfaces[0].alias.as_deref(), Some("eth0"));

    // 3. Removed again: the USB disk leaves; the guest (no OS) does not release the virtio
    //    disk nor the NIC: reported, then waiting for a restart, and not asked again.
    out.clear();
    let done = converge(&hosts, &bare, &[], &options, &mut out)
        .await
        .unwrap();
    let log = text(&out);
    assert!(done.failures.is_empty(), "{log}\n{:?}", done.failures);
    assert!(log.contains("did not release the disk vdb"), "{log}");
    assert!(
        log.contains("did not release the NIC 52:54:00:0b:07:01"),
        "{log}"
    );
    assert!(done.last_plan.is_empty(), "{}", done.last_plan.render(true));
    let pending = done
        .last_plan
        .notices
        .iter()
        .find(|n| n.kind == NoticeKind::RestartPending)
        .unwrap_or_else(|| {
            panic!(
                "no restart-pending notice:\n{}",
                done.last_plan.render(true)
            )
        });
    let fields: Vec<&str> = pending.changes.iter().map(|c| c.field.as_str()).collect();
    assert_eq!(
        fields,
        ["disks[target=vdb]", "interfaces[name=eth0]"],
        "{pending:?}"
    );
    let g = guest(&done.observed);
    assert_eq!(g.id, Some(id), "still the same guest");
    assert_eq!(g.disks.len(), 2, "sda left, vdb stays until the restart");
    assert_eq!(g.pending_unplug.len(), 2);
    let again = plan::plan(
        &bare,
        &hosts.observe().await.unwrap(),
        &PlanOptions::default(),
    );
    assert!(again.is_empty(), "not asked again:\n{}", again.render(true));

    // 4. updatePolicy Restart: the guest is restarted, which completes the unplug.
    let restart = desired("", "", "Restart");
    let done = converge(&hosts, &restart, &[], &options, &mut out)
        .await
        .unwrap();
    assert!(done.is_clean(), "{}\n{:?}", text(&out), done.failures);
    assert!(
        done.last_plan.notices.is_empty(),
        "{}",
        done.last_plan.render(true)
    );
    let g = guest(&done.observed);
    assert_eq!(g.power, PowerObserved::Running);
    assert_ne!(g.id, Some(id), "restarted");
    assert_eq!(g.disks.len(), 1);
    assert!(g.interfaces.is_empty() && g.pending_unplug.is_empty());

    let gone = plan::plan_delete(&full, &hosts.observe().await.unwrap());
    let report = execute::execute(&gone, &hosts, ExecOptions::default(), |_, _| {}).await;
    assert!(report.is_success(), "{:?}", report.results);
    hosts.close().await.unwrap();
}
