//! Against a real private libvirtd with QEMU (`scripts/libvirt-nodes.sh up`, then source its
//! env file), node A only: the live changes that need the host's facts.
//!
//! * a clone is made at its manifest's capacity, larger than its source;
//! * a ballooned guest's memory converges (the configured target, not the balloon's size);
//! * removing a vCPU pin and the emulator pin lets them float over every online CPU again,
//!   and the next plan is empty;
//! * growing a volume a running guest holds open is done live through the guest's disk;
//! * deleting a paused guest shuts it down (the engine resumes it first) and undefines it.
//!
//! ```sh
//! scripts/libvirt-nodes.sh up
//! set -a; . /tmp/virtkube-libvirt-nodes/env; set +a
//! cargo test -p virtkube --test live_changes_real -- --ignored
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

const MIB: u64 = 1 << 20;

/// Pool, a base volume and its clone, and a running guest on the clone.
fn manifests(pool_path: &str, clone_mib: u64, pinned: bool, state: &str) -> String {
    let pins = if pinned {
        "    pinning:\n      - vcpu: 0\n        cpuset: \"0\"\n      - vcpu: 1\n        cpuset: \"0\"\n    emulatorCpuset: \"0\"\n"
    } else {
        "    pinning:\n      - vcpu: 0\n        cpuset: \"0\"\n"
    };
    format!(
        r#"apiVersion: virtkube.io/v1alpha1
kind: StoragePool
metadata: {{name: vk-live-pool}}
spec: {{type: dir, target: {{path: {pool_path}}}}}
---
apiVersion: virtkube.io/v1alpha1
kind: Volume
metadata: {{name: base, namespace: vk-live}}
spec: {{pool: vk-live-pool, capacity: 16Mi, format: qcow2, reclaimPolicy: Delete}}
---
apiVersion: virtkube.io/v1alpha1
kind: Volume
metadata: {{name: root, namespace: vk-live}}
spec:
  pool: vk-live-pool
  capacity: {clone_mib}Mi
  format: qcow2
  source: {{volume: base}}
  reclaimPolicy: Delete
---
apiVersion: virtkube.io/v1alpha1
kind: Domain
metadata: {{name: guest, namespace: vk-live}}
spec:
  runStrategy: Manual
  state: {state}
  cpu:
    vcpus: 2
{pins}  memory: {{size: 64Mi, max: 128Mi}}
  disks: [{{name: root, volume: root}}]
"#
    )
}

fn load(text: &str) -> Vec<manifest::Manifest> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("live.yaml");
    std::fs::write(&path, text).unwrap();
    manifest::load(&[path]).unwrap()
}

fn qemu_img_virtual_size(path: &str) -> u64 {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json", path])
        .output()
        .expect("qemu-img runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let at = text.find("\"virtual-size\":").expect("virtual-size") + 15;
    text[at..]
        .trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .expect("a number")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs private libvirtd"]
async fn clone_size_memory_unpinning_live_grow_and_deleting_a_paused_guest() {
    let specs = [HostSpec {
        node: "node-a".into(),
        uri: env("VIRTKUBE_TEST_NODE_A_URI"),
        p2p_uri: None,
        migration_uri: None,
    }];
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
    let dir = tempfile::Builder::new()
        .prefix("vklive")
        .tempdir_in("/tmp")
        .unwrap();
    let pool_path = dir.path().join("images");
    let pool_path = pool_path.to_str().unwrap();
    let desired = |clone_mib, pinned, state| {
        DesiredState::from_manifests(
            &load(&manifests(pool_path, clone_mib, pinned, state)),
            &hosts.nodes(),
        )
        .0
    };

    // Leftovers of an interrupted earlier run.
    let old = desired(32, true, "Running");
    let cleanup = plan::plan_delete(&old, &hosts.observe().await.unwrap());
    execute::execute(&cleanup, &hosts, ExecOptions::default(), |_, _| {}).await;

    // 1. Created: the clone at its own capacity (twice its source's), the guest running and
    //    pinned; one round, and the ballooned memory is no difference afterwards.
    let first = desired(32, true, "Running");
    let done = converge(&hosts, &first, &[], &options, &mut out)
        .await
        .unwrap();
    assert!(
        done.is_clean(),
        "{}\n{:?}",
        String::from_utf8_lossy(&out),
        done.failures
    );
    assert_eq!(done.rounds, 1, "{}", String::from_utf8_lossy(&out));
    let host = &done.observed.hosts["node-a"];
    let root = &host.volumes[&("vk-live-pool".to_string(), "vk-live.root".to_string())];
    assert_eq!(root.capacity, 32 * MIB);
    assert_eq!(qemu_img_virtual_size(&root.path), 32 * MIB);
    let guest = &host.domains["vk-live.guest"];
    assert_eq!(guest.power, PowerObserved::Running);
    assert_eq!(guest.memory_kib, 64 * 1024, "the configured target");
    assert_eq!(guest.pinning.get(&1).map(String::as_str), Some("0"));
    let online = host.online_cpus.clone().expect("online CPUs observed");

    // 2. Pins removed and the volume grown while the guest runs: all live, in one plan.
    let second = desired(48, false, "Running");
    let p = plan::plan(
        &second,
        &hosts.observe().await.unwrap(),
        &PlanOptions::default(),
    );
    let ops: Vec<&Op> = p.actions.iter().map(|a| &a.op).collect();
    assert!(
        ops.contains(&&Op::PinVcpu {
            vcpu: 1,
            cpuset: online.clone()
        }) && ops.contains(&&Op::PinEmulator(online.clone()))
            && ops.iter().any(|op| matches!(
                op,
                Op::ResizeVolume { capacity, live: Some(disk), .. }
                    if *capacity == 48 * MIB && disk.domain == "vk-live.guest"
            ))
            && ops.len() == 3,
        "{}",
        p.render(false)
    );
    let done = converge(&hosts, &second, &[], &options, &mut out)
        .await
        .unwrap();
    assert!(
        done.is_clean(),
        "{}\n{:?}",
        String::from_utf8_lossy(&out),
        done.failures
    );
    assert!(
        done.last_plan.is_empty(),
        "{}",
        done.last_plan.render(false)
    );
    let host = &done.observed.hosts["node-a"];
    let root = &host.volumes[&("vk-live-pool".to_string(), "vk-live.root".to_string())];
    assert_eq!(root.capacity, 48 * MIB);
    assert_eq!(qemu_img_virtual_size(&root.path), 48 * MIB);
    let guest = &host.domains["vk-live.guest"];
    assert_eq!(guest.power, PowerObserved::Running, "grown without a stop");
    assert_eq!(guest.pinning.get(&1), Some(&online));
    assert_eq!(guest.pinning.get(&0).map(String::as_str), Some("0"));

    // 3. Paused, then deleted: the engine resumes it to shut it down, then it is undefined.
    let paused = desired(48, false, "Paused");
    let done = converge(&hosts, &paused, &[], &options, &mut out)
        .await
        .unwrap();
    assert!(
        done.is_clean(),
        "{}\n{:?}",
        String::from_utf8_lossy(&out),
        done.failures
    );
    assert_eq!(
        done.observed.hosts["node-a"].domains["vk-live.guest"].power,
        PowerObserved::Paused
    );
    let gone = plan::plan_delete(&paused, &hosts.observe().await.unwrap());
    let report = execute::execute(&gone, &hosts, ExecOptions::default(), |_, _| {}).await;
    assert!(report.is_success(), "{:?}", report.results);
    let after = hosts.observe().await.unwrap();
    let host = &after.hosts["node-a"];
    assert!(!host.domains.contains_key("vk-live.guest"));
    assert!(!host.pools.contains_key("vk-live-pool"));
    hosts.close().await.unwrap();
}
