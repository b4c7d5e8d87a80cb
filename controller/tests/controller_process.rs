//! The `virtkube controller` process against the in-memory API server: two replicas, one
//! leads and binds, the standby is ready and idle, `/metrics` says who leads, logs are JSON,
//! SIGTERM releases the Lease so the standby takes over at once; bad flags and missing CRDs
//! stop it with a message saying what to do.

mod controller_support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use controller_support::*;
use k8s_openapi::jiff::Timestamp;
use serde_json::Value;
use virtkube_testapi::TestApi;

#[path = "local_http/mod.rs"]
mod local_http;
use local_http::{free_port, http_get};

/// Kills the process when a test ends early.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.0.to_string()])
            .stderr(Stdio::null())
            .status();
    }
}

fn controller(kubeconfig: &Path, port: u16, identity: &str, log: &Path, extra: &[&str]) -> Child {
    let file = std::fs::File::create(log).unwrap();
    Command::new(env!("CARGO_BIN_EXE_virtkube"))
        .args([
            "controller",
            &format!("--metrics-addr=127.0.0.1:{port}"),
            "--log-format=json",
            "--lease-namespace=default",
            "--lease-name=virtkube-controller",
            &format!("--identity={identity}"),
            "--lease-duration-seconds=3",
            "--renew-deadline-seconds=2",
            "--retry-period-seconds=1",
        ])
        .args(extra)
        .env("KUBECONFIG", kubeconfig)
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap()
}

async fn role(port: u16) -> Option<String> {
    let (code, body) = http_get(port, "/readyz").await?;
    (code == 200).then(|| {
        body.lines()
            .find_map(|l| l.strip_prefix("role: "))
            .unwrap_or_default()
            .to_string()
    })
}

async fn wait_role(port: u16, want: &str, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while role(port).await.as_deref() != Some(want) {
        assert!(Instant::now() < deadline, "port {port} never became {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn two_replicas_one_leads_and_sigterm_hands_over_at_once() {
    let api = TestApi::start().await.unwrap();
    let admin = api.client("admin").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kc = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kc, &["admin"]).unwrap();
    api.create("hypervisornodes", hvn_meta("node-a")).unwrap();
    agent_publishes(
        &admin,
        "node-a",
        hvn_status("16Gi", 8, &Timestamp::now().to_string()),
    )
    .await;

    let (p1, p2) = (free_port(), free_port());
    let (log1, log2) = (dir.path().join("c1.log"), dir.path().join("c2.log"));
    let mut c1 = controller(&kc, p1, "c1", &log1, &[]);
    let _k1 = KillOnDrop(c1.id());
    wait_role(p1, "leader", 15).await;
    let mut c2 = controller(&kc, p2, "c2", &log2, &[]);
    let _k2 = KillOnDrop(c2.id());
    wait_role(p2, "standby", 15).await;

    let mut vm = domain("default", "vm", "1Gi");
    for k in ["uid", "resourceVersion", "generation"] {
        vm["metadata"].as_object_mut().unwrap().remove(k);
    }
    api.create("domains", vm).unwrap();
    eventually(10, "vm bound", || {
        api.get("domains", "default", "vm")
            .is_some_and(|d| d["status"]["nodeName"] == "node-a")
    })
    .await;
    let (_, m1) = http_get(p1, "/metrics").await.unwrap();
    let (_, m2) = http_get(p2, "/metrics").await.unwrap();
    assert!(m1.contains("virtkube_controller_leader 1"), "{m1}");
    assert!(m2.contains("virtkube_controller_leader 0"), "{m2}");
    assert!(
        m1.contains("virtkube_controller_scheduling_decisions_total{decision=\"bound\",reason=\"NodeAssigned\"} 1"),
        "{m1}"
    );
    assert!(m1.contains("application/openmetrics-text"), "{m1}");
    assert_eq!(http_get(p2, "/healthz").await.map(|(c, _)| c), Some(200));

    // SIGTERM: the leader releases the lease and the standby takes it within a retry.
    let stopped = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &c1.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || c1.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(
        exit.success(),
        "{}",
        std::fs::read_to_string(&log1).unwrap()
    );
    wait_role(p2, "leader", 5).await;
    println!("standby took over {:?} after SIGTERM", stopped.elapsed());
    assert!(stopped.elapsed() < Duration::from_secs(3));
    let lease = api.get("leases", "default", "virtkube-controller").unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "c2");

    for line in std::fs::read_to_string(&log1).unwrap().lines() {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string(), "{line}");
    }
    let logs = std::fs::read_to_string(&log1).unwrap();
    assert!(logs.contains("lease released"), "{logs}");

    let status = Command::new("kill")
        .args(["-TERM", &c2.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || c2.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(
        exit.success(),
        "{}",
        std::fs::read_to_string(&log2).unwrap()
    );
    let lease = api.get("leases", "default", "virtkube-controller").unwrap();
    assert_eq!(
        lease["spec"]["holderIdentity"],
        Value::Null,
        "released on the way out"
    );
}

#[tokio::test]
async fn without_crds_or_with_contradictory_flags_it_says_what_to_do() {
    let api = TestApi::start_with(virtkube_testapi::Config {
        with_crds: false,
        ..virtkube_testapi::Config::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kc = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kc, &["admin"]).unwrap();
    let config = kc.clone();
    // Waited for off the runtime's thread: the API server answers on it.
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_virtkube"))
            .args(["controller", "--metrics-addr=127.0.0.1:0"])
            .env("KUBECONFIG", &config)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("virtkube crd | kubectl apply --server-side -f -"),
        "{stderr}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_virtkube"))
        .args([
            "controller",
            "--lease-duration-seconds=10",
            "--renew-deadline-seconds=10",
        ])
        .env("KUBECONFIG", &kc)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "--renew-deadline-seconds (10) must be less than --lease-duration-seconds (10)"
        ),
        "{stderr}"
    );
}
