//! PCI passthrough (`spec.hostDevices`) through the CLI's planner and executors against
//! libvirt's test driver, with a host file describing two PCI devices
//! (`engine/tests/fixtures/pci-host.xml`). The driver keeps and reports host devices but
//! passes nothing through and has no hotplug, so what is tested here is the definition, the
//! checks against the node, the status and the restart path; live plugging needs QEMU and a
//! host with an IOMMU (see the README).

use virtkube::cli::apply::{ConvergeOptions, converge};
use virtkube::cli::status::domain_status;
use virtkube::host::{HostSpec, Hosts};
use virtkube::plan::desired::DesiredState;
use virtkube::plan::observed::PowerObserved;
use virtkube::plan::{self, NoticeKind, Op, PlanOptions};
use virtkube_crds::manifest::{self, Manifest};
use virtkube_engine::EngineConfig;

const PCI_HOST: &str = include_str!("../../engine/tests/fixtures/pci-host.xml");

fn manifests(dir: &std::path::Path, text: &str) -> Vec<Manifest> {
    let path = dir.join("m.yaml");
    std::fs::write(&path, text).unwrap();
    manifest::load(&[path]).unwrap()
}

fn domain(name: &str, devices: &str, extra: &str) -> String {
    format!(
        "apiVersion: virtkube.io/v1alpha1\nkind: Domain\nmetadata: {{name: {name}, namespace: lab}}\n\
         spec:\n  memory: {{size: 64Mi}}\n  hostDevices: {devices}\n{extra}---\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_devices_are_defined_checked_against_the_node_and_removed_at_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let host_file = dir.path().join("host.xml");
    std::fs::write(&host_file, PCI_HOST).unwrap();
    let hosts = Hosts::connect(
        &[HostSpec {
            node: "local".into(),
            uri: format!("test://{}", host_file.display()),
            p2p_uri: None,
            migration_uri: None,
        }],
        EngineConfig::default(),
    )
    .await
    .unwrap();
    let quiet = ConvergeOptions {
        verbose: false,
        ..ConvergeOptions::default()
    };
    let mut out = Vec::new();

    // 1. A domain with the GPU: defined with it, started, reported; a second apply is a no-op.
    let gpu = "[{name: gpu, address: \"0000:07:00.0\"}]";
    let m = manifests(dir.path(), &domain("ml", gpu, ""));
    let (desired, notices) = DesiredState::from_manifests(&m, &hosts.nodes());
    assert!(notices.is_empty(), "{notices:?}");
    let done = converge(&hosts, &desired, &[], &quiet, &mut out)
        .await
        .unwrap();
    assert!(done.is_clean(), "{:?}", done.failures);
    let ml = &done.observed.hosts["local"].domains["lab.ml"];
    assert_eq!(ml.power, PowerObserved::Running);
    assert_eq!(ml.host_devices.len(), 1);
    assert_eq!(ml.host_devices[0].address, "0000:07:00.0");
    assert!(ml.host_devices[0].managed);
    let status = domain_status("local", ml, desired.domains.first(), &[], Some(1));
    assert_eq!(status.host_devices.len(), 1);
    assert_eq!(
        (
            status.host_devices[0].name.as_str(),
            status.host_devices[0].address.as_str()
        ),
        ("gpu", "0000:07:00.0")
    );
    hosts.reset_stats();
    let again = converge(&hosts, &desired, &[], &quiet, &mut out)
        .await
        .unwrap();
    assert!(
        again.first_plan.is_empty(),
        "{}",
        again.first_plan.render(false)
    );
    assert_eq!(hosts.stats().mutating_calls(), 0);

    // 2. A second domain asking for the same device: a conflict, nothing done for it; one
    //    asking for a device the node lacks: invalid.
    let text = domain("ml", gpu, "")
        + &domain("ml2", "[{name: gpu, address: \"0000:07:00.0\"}]", "")
        + &domain("ml3", "[{name: fpga, address: \"0000:09:00.0\"}]", "");
    let m = manifests(dir.path(), &text);
    let (desired, _) = DesiredState::from_manifests(&m, &hosts.nodes());
    let observed = hosts.observe().await.unwrap();
    let p = plan::plan(&desired, &observed, &PlanOptions::default());
    assert!(p.actions.is_empty(), "{}", p.render(false));
    let of = |name: &str| {
        p.notices
            .iter()
            .find(|n| n.object.name == name)
            .unwrap_or_else(|| panic!("no notice for {name}: {}", p.render(false)))
    };
    assert_eq!(of("lab.ml2").kind, NoticeKind::Conflict);
    assert!(
        of("lab.ml2")
            .message
            .contains("0000:07:00.0 is already given to domain lab.ml on node local"),
        "{}",
        of("lab.ml2").message
    );
    assert_eq!(of("lab.ml3").kind, NoticeKind::Invalid);
    assert!(
        of("lab.ml3")
            .message
            .contains("node local has no PCI device 0000:09:00.0"),
        "{}",
        of("lab.ml3").message
    );

    // 3. The device removed from the running domain: the test driver cannot unplug, so it
    //    waits for a restart; with updatePolicy Restart the guest restarts without it.
    let m = manifests(dir.path(), &domain("ml", "[]", ""));
    let (desired, _) = DesiredState::from_manifests(&m, &hosts.nodes());
    let observed = hosts.observe().await.unwrap();
    let p = plan::plan(&desired, &observed, &PlanOptions::default());
    assert!(p.actions.is_empty(), "{}", p.render(false));
    assert_eq!(p.notices[0].kind, NoticeKind::RestartPending);
    assert_eq!(p.notices[0].changes[0].field, "hostDevices[name=gpu]");
    let m = manifests(dir.path(), &domain("ml", "[]", "  updatePolicy: Restart\n"));
    let (desired, _) = DesiredState::from_manifests(&m, &hosts.nodes());
    let done = converge(&hosts, &desired, &[], &quiet, &mut out)
        .await
        .unwrap();
    assert!(
        matches!(done.first_plan.actions[0].op, Op::RestartDomain { .. }),
        "{}",
        done.first_plan.render(false)
    );
    assert!(done.is_clean(), "{:?}", done.failures);
    let ml = &done.observed.hosts["local"].domains["lab.ml"];
    assert!(ml.host_devices.is_empty());
    assert_eq!(ml.power, PowerObserved::Running);

    // 4. Freed, the device can go to the other domain.
    let text = domain("ml", "[]", "") + &domain("ml2", gpu, "");
    let m = manifests(dir.path(), &text);
    let (desired, _) = DesiredState::from_manifests(&m, &hosts.nodes());
    let done = converge(&hosts, &desired, &[], &quiet, &mut out)
        .await
        .unwrap();
    assert!(done.is_clean(), "{:?}", done.failures);
    assert_eq!(
        done.observed.hosts["local"].domains["lab.ml2"].host_devices[0].address,
        "0000:07:00.0"
    );
    hosts.close().await.unwrap();
}
