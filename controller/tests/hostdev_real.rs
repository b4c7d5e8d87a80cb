//! PCI passthrough through the planner and executors against a real private libvirtd with
//! QEMU (`scripts/libvirt-nodes.sh up`, then source its env file), node A only.
//!
//! These machines have no IOMMU (`/sys/kernel/iommu_groups` is empty, no `vfio-pci`), so
//! libvirt passes no device through here: what is tested is that virtkube gets as far as
//! libvirt and reports its refusal, never that a guest sees a device.
//!
//! * the node's PCI devices are read from libvirt, and one of them is asked for with
//!   `managed: false` (libvirt then never touches the host's own driver of a device this
//!   machine needs);
//! * added to a running guest, it is planned as a live plug-in (`~`) and libvirt refuses it
//!   ("host doesn't support passthrough of host PCI devices"); the guest keeps running;
//! * a domain created with it is defined with the device, and its start is refused for the
//!   same reason.
//!
//! Without the environment the test fails (it never passes silently).

use std::time::Duration;

use virtkube::cli::apply::{ConvergeOptions, converge};
use virtkube::execute::{self, ExecOptions};
use virtkube::host::{HostSpec, Hosts};
use virtkube::plan::desired::DesiredState;
use virtkube::plan::observed::PowerObserved;
use virtkube::plan::{self, Op, PlanOptions, Symbol};
use virtkube_crds::manifest;
use virtkube_engine::{Engine, EngineConfig};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run scripts/libvirt-nodes.sh up and source its env file")
    })
}

fn desired(hosts: &Hosts, devices: &str) -> DesiredState {
    let text = format!(
        "apiVersion: virtkube.io/v1alpha1\nkind: Domain\nmetadata: {{name: guest, namespace: vk-pci}}\n\
         spec:\n  memory: {{size: 64Mi}}\n  hostDevices: {devices}\n"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pci.yaml");
    std::fs::write(&path, text).unwrap();
    let (d, notices) =
        DesiredState::from_manifests(&manifest::load(&[path]).unwrap(), &hosts.nodes());
    assert!(notices.is_empty(), "{notices:?}");
    d
}

const REFUSAL: &str = "host doesn't support passthrough of host PCI devices";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs private libvirtd: scripts/libvirt-nodes.sh up, then --run-ignored"]
async fn passthrough_reaches_libvirt_which_refuses_it_without_an_iommu() {
    let uri = env("VIRTKUBE_TEST_NODE_A_URI");
    let engine = Engine::connect(&uri, EngineConfig::default())
        .await
        .unwrap();
    let address = engine
        .node_pci_addresses()
        .await
        .unwrap()
        .into_iter()
        .next_back()
        .expect("the node has PCI devices")
        .to_string();
    engine.close().await.unwrap();
    let specs = [HostSpec {
        node: "node-a".into(),
        uri,
        p2p_uri: None,
        migration_uri: None,
    }];
    let mut hosts = Hosts::connect(&specs, EngineConfig::default())
        .await
        .unwrap();
    hosts.shutdown_deadline = Duration::from_secs(2);
    let options = ConvergeOptions::default();
    let mut out = Vec::new();
    let device = format!("[{{name: dev, address: \"{address}\", managed: false}}]");
    let bare = desired(&hosts, "[]");
    let with_device = desired(&hosts, &device);
    let guest =
        |o: &plan::observed::ObservedState| o.hosts["node-a"].domains.get("vk-pci.guest").cloned();
    let cleanup = || async {
        let gone = plan::plan_delete(&with_device, &hosts.observe().await.unwrap());
        let report = execute::execute(&gone, &hosts, ExecOptions::default(), |_, _| {}).await;
        assert!(report.is_success(), "{:?}", report.results);
    };
    cleanup().await;

    // 1. A running guest without devices.
    let done = converge(&hosts, &bare, &[], &options, &mut out)
        .await
        .unwrap();
    assert!(done.is_clean(), "{:?}", done.failures);
    let id = guest(&done.observed).and_then(|g| g.id).expect("running");

    // 2. The device added: a live plug-in, refused by libvirt; the guest runs on.
    let observed = hosts.observe().await.unwrap();
    let p = plan::plan(&with_device, &observed, &PlanOptions::default());
    assert!(
        matches!(&p.actions[..], [a] if a.symbol == Symbol::Live
            && matches!(&a.op, Op::AttachHostDevice(h) if h.address == address && !h.managed)),
        "{}",
        p.render(false)
    );
    let done = converge(&hosts, &with_device, &[], &options, &mut out)
        .await
        .unwrap();
    assert!(
        done.failures.iter().any(|f| f.contains(REFUSAL)),
        "{:?}",
        done.failures
    );
    let g = guest(&done.observed).unwrap();
    assert_eq!((g.power, g.id), (PowerObserved::Running, Some(id)));
    assert!(g.host_devices.is_empty());

    // 3. Created with the device: defined with it, the start refused.
    cleanup().await;
    let done = converge(&hosts, &with_device, &[], &options, &mut out)
        .await
        .unwrap();
    assert!(
        done.failures.iter().any(|f| f.contains(REFUSAL)),
        "{:?}",
        done.failures
    );
    let g = guest(&done.observed).expect("defined");
    assert_eq!(g.power, PowerObserved::Shutoff);
    assert_eq!(g.host_devices.len(), 1);
    assert_eq!(g.host_devices[0].address, address);
    assert!(!g.host_devices[0].managed);
    cleanup().await;
    hosts.close().await.unwrap();
}
