//! virtkube's explanations where users read them: the command line (a libvirt socket that
//! refuses the user, triggered for real by running `virtkube` as `nobody` against a socket
//! only root may use) and the conditions the agent writes (a pin to a CPU the node lacks,
//! on a real agent against the in-memory API server).

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

mod agent_support;

use agent_support::fake_api::{KillOnDrop, agent_with, free_port, sigterm};

#[test]
fn a_socket_that_refuses_the_user_is_explained_on_the_command_line() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = dir.path().join("libvirt-sock");
    // Root's socket, as libvirtd's read-write socket is on most distributions.
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600)).unwrap();
    let manifest = dir.path().join("pool.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: virtkube.io/v1alpha1\nkind: StoragePool\nmetadata: {name: p}\nspec: {type: dir, target: {path: /var/lib/virtkube/pools/p}}\n",
    )
    .unwrap();
    std::fs::set_permissions(&manifest, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_virtkube"))
        .args(["plan", "-f"])
        .arg(&manifest)
        .arg("--connect")
        .arg(format!("qemu:///system?socket={}", socket.display()))
        .output()
        .expect("setpriv runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("Permission denied"),
        "libvirt's words: {stderr}"
    );
    assert!(
        stderr.contains("virtkube: libvirt's socket") && stderr.contains("refuses this user"),
        "{stderr}"
    );
    assert!(
        stderr.contains("Next: run virtkube as a user the socket lets in"),
        "{stderr}"
    );
}

async fn eventually<T>(secs: u64, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_writes_the_explanation_into_the_condition() {
    let api = virtkube_testapi::TestApi::start().await.unwrap();
    api.create_namespace("explain").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kubeconfig");
    api.write_kubeconfig(&config, &[virtkube_testapi::ADMIN])
        .unwrap();
    let log = dir.path().join("agent.log");
    let mut child = agent_with(
        &config,
        free_port(),
        "test:///default",
        &["--node-name", "node-x"],
        Some(&log),
    );
    let _kill = KillOnDrop(child.id());
    api.create(
        "domains",
        json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Domain",
               "metadata": {"name": "pinned", "namespace": "explain",
                            "labels": {"node.virtkube.io/node-x": "holder"}},
               "spec": {"nodeName": "node-x", "runStrategy": "Always",
                        "memory": {"size": "64Mi"},
                        "cpu": {"vcpus": 1, "pinning": [{"vcpu": 0, "cpuset": "0"}]}}}),
    )
    .unwrap();
    // Bound to node-x, as the cluster controller binds it.
    let client = api.client(virtkube_testapi::ADMIN).await.unwrap();
    let domains: kube::Api<virtkube_crds::Domain> = kube::Api::namespaced(client, "explain");
    domains
        .patch_status(
            "pinned",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"status": {"nodeName": "node-x"}})),
        )
        .await
        .unwrap();
    let ready = |want: &str| {
        let obj = api.get("domains", "explain", "pinned")?;
        obj["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == "Ready" && c["status"] == want)
            .filter(|c| c["observedGeneration"] == obj["metadata"]["generation"])
            .map(|c| c["message"].as_str().unwrap_or_default().to_string())
    };
    eventually(60, "Ready", || ready("True")).await;
    // The test driver's host has 8 CPUs: CPU 64 is not there.
    api.edit_spec("domains", "explain", "pinned", |spec| {
        spec["cpu"]["pinning"] = json!([{"vcpu": 0, "cpuset": "64"}]);
    })
    .unwrap();
    let message = eventually(60, "Ready=False with the explanation", || ready("False")).await;
    assert!(
        message.contains("names CPU 64"),
        "libvirt-side words: {message}"
    );
    assert!(
        message.contains("virtkube: a pin (spec.cpu.pinning or emulatorCpuset) names a host CPU this node does not have")
            && message.contains("Next: pin only to the node's CPUs"),
        "{message}"
    );
    sigterm(child.id());
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
}
