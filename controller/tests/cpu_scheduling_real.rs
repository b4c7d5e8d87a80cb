//! CPU weight and bandwidth (`spec.cpu.shares`, `limit`, `period`, `quota`) through the
//! planner and executor against node C of `scripts/libvirt-nodes.sh`, the private libvirtd
//! running with the cgroup v1 `cpu` controller:
//!
//! * created with them, the guest's cgroups hold them;
//! * changed while the guest runs: one live change (`~`), no restart, the cgroups follow;
//! * removed from the manifest: back to weight 1024 and no limit;
//! * `status.cpuScheduling` reports what is in force.
//!
//! Without the environment the test fails (it never passes silently).

use std::path::{Path, PathBuf};
use std::time::Duration;

use virtkube::cli::apply::{ConvergeOptions, converge};
use virtkube::cli::status::domain_status;
use virtkube::execute::{self, ExecOptions};
use virtkube::host::{HostSpec, Hosts};
use virtkube::plan::desired::DesiredState;
use virtkube::plan::{self, Op, PlanOptions, Symbol};
use virtkube_crds::manifest;
use virtkube_engine::EngineConfig;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run scripts/libvirt-nodes.sh up and source its env file")
    })
}

fn manifest(cpu: &str) -> String {
    format!(
        r#"apiVersion: virtkube.io/v1alpha1
kind: Domain
metadata: {{name: sched{pid}, namespace: vk-cpu}}
spec:
  cpu: {{vcpus: 2{cpu}}}
  memory: {{size: 64Mi}}
"#,
        pid = std::process::id() % 100_000
    )
}

fn load(text: &str) -> Vec<manifest::Manifest> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cpu.yaml");
    std::fs::write(&path, text).unwrap();
    manifest::load(&[path]).unwrap()
}

/// The guest's cgroup under the host's cgroup v1 `cpu` hierarchy.
fn cgroup(domain: &str) -> PathBuf {
    let root = Path::new("/sys/fs/cgroup/cpu/machine");
    std::fs::read_dir(root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|f| f.to_str())
                .is_some_and(|f| f.ends_with(&format!("-{domain}.libvirt-qemu")))
        })
        .unwrap_or_else(|| panic!("no cgroup for {domain}"))
}

fn number(path: PathBuf) -> i64 {
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs private libvirtd: scripts/libvirt-nodes.sh up, then --run-ignored"]
async fn shares_limit_and_quota_reach_the_cgroups_and_change_live() {
    let specs = [HostSpec {
        node: "node-c".into(),
        uri: env("VIRTKUBE_TEST_NODE_C_URI"),
        p2p_uri: None,
        migration_uri: None,
    }];
    let mut hosts = Hosts::connect(&specs, EngineConfig::default())
        .await
        .unwrap();
    hosts.shutdown_deadline = Duration::from_secs(2);
    let options = ConvergeOptions::default();
    let mut out = Vec::new();
    let desired = |cpu: &str| DesiredState::from_manifests(&load(&manifest(cpu)), &hosts.nodes()).0;
    let name = format!("vk-cpu.sched{}", std::process::id() % 100_000);

    let first = desired(", shares: 512, limit: 1500m, period: 100000, quota: 50000");
    let done = converge(&hosts, &first, &[], &options, &mut out)
        .await
        .unwrap();
    assert!(
        done.is_clean(),
        "{}\n{:?}",
        String::from_utf8_lossy(&out),
        done.failures
    );
    let cg = cgroup(&name);
    assert_eq!(number(cg.join("cpu.shares")), 512);
    assert_eq!(
        number(cg.join("cpu.cfs_quota_us")),
        150_000,
        "1500m of the whole guest"
    );
    assert_eq!(number(cg.join("vcpu1/cpu.cfs_quota_us")), 50_000);
    let guest = &done.observed.hosts["node-c"].domains[&name];
    let id = guest.id;
    let status = domain_status("node-c", guest, first.domains.first(), &[], None);
    let sched = status.cpu_scheduling.expect("reported");
    assert_eq!(sched.shares, Some(512));
    assert_eq!(sched.limit.as_deref(), Some("1500m"));
    assert_eq!((sched.period, sched.quota), (Some(100_000), Some(50_000)));
    assert_eq!(sched.emulator_quota, None, "unlimited");

    // Changed while it runs: one live change.
    let second = desired(", shares: 2048, limit: \"2\", period: 100000, quota: 50000");
    let p = plan::plan(
        &second,
        &hosts.observe().await.unwrap(),
        &PlanOptions::default(),
    );
    assert!(
        matches!(&p.actions[..], [a] if a.symbol == Symbol::Live && matches!(a.op, Op::SetCpuTune(_))),
        "{}",
        p.render(true)
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
    assert_eq!(
        done.observed.hosts["node-c"].domains[&name].id, id,
        "not restarted"
    );
    assert_eq!(number(cg.join("cpu.shares")), 2048);
    assert_eq!(number(cg.join("cpu.cfs_quota_us")), 200_000);

    // Removed: libvirt's defaults again, and nothing left to do.
    let plain = desired("");
    let done = converge(&hosts, &plain, &[], &options, &mut out)
        .await
        .unwrap();
    assert!(
        done.is_clean(),
        "{}\n{:?}",
        String::from_utf8_lossy(&out),
        done.failures
    );
    assert_eq!(number(cg.join("cpu.shares")), 1024);
    assert_eq!(number(cg.join("cpu.cfs_quota_us")), -1);
    assert_eq!(number(cg.join("vcpu0/cpu.cfs_quota_us")), -1);

    let gone = plan::plan_delete(&plain, &hosts.observe().await.unwrap());
    let report = execute::execute(&gone, &hosts, ExecOptions::default(), |_, _| {}).await;
    assert!(report.is_success(), "{:?}", report.results);
    hosts.close().await.unwrap();
}
