//! The `virtkube-testapi` binary: it prints its address, writes a kubeconfig naming the RBAC
//! file's subjects, and enforces their rules.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use kube::api::{Api, ApiResource, DynamicObject, ListParams};

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn the_binary_serves_with_a_kubeconfig_and_rbac() {
    let dir = tempfile::tempdir().unwrap();
    let rbac = dir.path().join("rbac.yaml");
    std::fs::write(
        &rbac,
        "kind: ClusterRole\napiVersion: rbac.authorization.k8s.io/v1\nmetadata: {name: r}\nrules: [{apiGroups: [virtkube.io], resources: [networks], verbs: [list]}]\n---\nkind: ClusterRoleBinding\napiVersion: rbac.authorization.k8s.io/v1\nmetadata: {name: r}\nroleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: r}\nsubjects: [{kind: ServiceAccount, name: agent, namespace: vk}]\n",
    )
    .unwrap();
    let kubeconfig = dir.path().join("kc.yaml");
    let mut child = Command::new(env!("CARGO_BIN_EXE_virtkube-testapi"))
        .args(["--addr", "127.0.0.1:0", "--kubeconfig-out"])
        .arg(&kubeconfig)
        .arg("--rbac")
        .arg(&rbac)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let _guard = KillOnDrop(child);
    let mut first = String::new();
    BufReader::new(stdout).read_line(&mut first).unwrap();
    assert!(
        first.starts_with("virtkube-testapi listening on http://127.0.0.1:"),
        "{first}"
    );
    let text = std::fs::read_to_string(&kubeconfig).unwrap();
    assert!(
        text.contains("current-context: \"system:serviceaccount:vk:agent\""),
        "{text}"
    );
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::from_yaml(&text).unwrap(),
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    let client = kube::Client::try_from(config).unwrap();
    let resource = |plural: &str, kind: &str| ApiResource {
        group: "virtkube.io".into(),
        version: "v1alpha1".into(),
        api_version: "virtkube.io/v1alpha1".into(),
        kind: kind.into(),
        plural: plural.into(),
    };
    let networks: Api<DynamicObject> =
        Api::all_with(client.clone(), &resource("networks", "Network"));
    assert!(networks.list(&ListParams::default()).await.is_ok());
    let pools: Api<DynamicObject> = Api::all_with(client, &resource("storagepools", "StoragePool"));
    match pools.list(&ListParams::default()).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403),
        other => panic!("expected 403, got {other:?}"),
    }
}
