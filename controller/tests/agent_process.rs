//! The `virtkube agent` process end to end against a fake API server (an HTTP server that
//! answers what the agent asks: CRD lists, watches, HypervisorNode patches) on
//! `test:///default`: it starts, becomes ready, publishes its node, and stops cleanly on
//! SIGTERM; without the CRDs it refuses to start and prints how to install them.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod agent_support;

use agent_support::fake_api::{agent, fake_api, free_port, http_get, kubeconfig, sigterm};

#[tokio::test]
async fn agent_starts_gets_ready_publishes_its_node_and_stops_on_sigterm() {
    let (api, fake) = fake_api(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = kubeconfig(dir.path(), api);
    let port = free_port();
    let mut child = agent(&config, port, "test:///default");
    let _kill_child = agent_support::fake_api::KillOnDrop(child.id());

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some((200, _)) = http_get(port, "/readyz").await {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let out = child.wait_with_output().unwrap();
            panic!(
                "agent exited early ({status}): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(Instant::now() < deadline, "the agent never became ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (code, metrics) = http_get(port, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.contains("virtkube_agent_libvirt_calls_total"),
        "{metrics}"
    );

    // The heartbeat reached the API with libvirt's facts.
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = fake.lock().unwrap().node_status.clone() {
            break s;
        }
        assert!(Instant::now() < deadline, "no HypervisorNode status");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status["conditions"][0]["reason"], "AgentReady");
    assert_eq!(status["hypervisorType"], "TEST");

    // Every kind is watched.
    let calls = fake.lock().unwrap().calls.clone();
    let mut watched: BTreeMap<&str, bool> = BTreeMap::new();
    for kind in ["domains", "volumes", "networks", "storagepools"] {
        watched.insert(
            kind,
            calls
                .iter()
                .any(|c| c.starts_with("GET") && c.ends_with(&format!("/{kind}"))),
        );
    }
    assert!(watched.values().all(|w| *w), "{watched:?} from {calls:?}");

    // SIGTERM: a clean, prompt exit.
    let stopped = Instant::now();
    sigterm(child.id());
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let logs =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}: {logs}", out.status);
    assert!(
        stopped.elapsed() < Duration::from_secs(10),
        "took {:?}",
        stopped.elapsed()
    );
    assert!(logs.contains("SIGTERM"), "{logs}");
    assert!(logs.contains("virtkube agent stopped"), "{logs}");
    // JSON logs: one object per line.
    assert!(
        logs.lines()
            .filter(|l| !l.trim().is_empty())
            .all(|l| serde_json::from_str::<Value>(l).is_ok()),
        "{logs}"
    );
}

#[tokio::test]
async fn agent_without_crds_refuses_to_start_and_says_how_to_install_them() {
    let (api, _fake) = fake_api(&["domains", "hypervisornodes"]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = kubeconfig(dir.path(), api);
    let child = agent(&config, free_port(), "test:///default");
    let _kill_child = agent_support::fake_api::KillOnDrop(child.id());
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("missing: domains.virtkube.io, hypervisornodes.virtkube.io"),
        "{stderr}"
    );
    assert!(
        stderr.contains("virtkube crd | kubectl apply --server-side -f -"),
        "{stderr}"
    );
}

#[tokio::test]
async fn running_controllers_converge_listed_objects_in_dependency_order_then_go_quiet() {
    let api = virtkube_testapi::TestApi::start().await.unwrap();
    api.create_namespace("proc").unwrap();
    let admin = api.client("admin").await.unwrap();
    let objects = vec![
        (
            "storagepools",
            json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "StoragePool",
            "metadata": {"name": "procpool"},
            "spec": {"type": "dir", "target": {"path": "/var/lib/virtkube/pools/procpool"}}}),
        ),
        (
            "networks",
            json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Network",
            "metadata": {"name": "procnet"},
            "spec": {"mode": "isolated", "ip": {"address": "10.152.0.1", "prefix": 24}}}),
        ),
        (
            "volumes",
            // Bound to this node the way the cluster controller binds it.
            json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Volume",
            "metadata": {"name": "root", "namespace": "proc"},
            "spec": {"pool": "procpool", "capacity": "1Gi", "nodeName": "proc-node"}}),
        ),
        (
            "domains",
            json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Domain",
            "metadata": {"name": "vm", "namespace": "proc"},
            "spec": {"nodeName": "proc-node", "memory": {"size": "64Mi"},
                     "cpu": {"vcpus": 1, "pinning": [{"vcpu": 0, "cpuset": "0"}]},
                     "disks": [{"name": "root", "volume": "root"}],
                     "interfaces": [{"name": "eth0", "network": "procnet"}]}}),
        ),
        // Another node's domain: never touched.
        (
            "domains",
            json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Domain",
            "metadata": {"name": "other", "namespace": "proc"},
            "spec": {"nodeName": "node-z", "memory": {"size": "64Mi"}}}),
        ),
    ];
    // Listed in the reverse of their dependencies: the domain first.
    for (plural, obj) in objects.into_iter().rev() {
        api.create(plural, obj).unwrap();
    }
    // Bound as the cluster controller binds them.
    agent_support::bind_domain(&admin, "proc", "vm", "proc-node").await;
    agent_support::bind_domain(&admin, "proc", "other", "node-z").await;
    agent_support::bind_volume(&api, "proc", "root", "proc-node").await;
    let dir = tempfile::tempdir().unwrap();
    let config = kubeconfig(dir.path(), api.addr());
    let log = dir.path().join("agent.log");
    let mut child = agent_support::fake_api::agent_with(
        &config,
        free_port(),
        "test:///default",
        &[],
        Some(&log),
    );
    let _kill_child = agent_support::fake_api::KillOnDrop(child.id());
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();

    // Converged when the domain reports Ready=True (the pool, volume and network first:
    // until they are, the domain is retried with backoff).
    eventually(60, "the domain Ready", || {
        ready(&api.get("domains", "proc", "vm"))
    })
    .await;
    let vm = api.get("domains", "proc", "vm").unwrap();
    assert_eq!(vm["status"]["phase"], "Running", "{}", logs());
    assert_eq!(vm["status"]["nodeName"], "proc-node");
    assert_eq!(vm["status"]["vcpuAffinity"][0]["cpuset"], "0");
    assert_eq!(
        api.get("volumes", "proc", "root").unwrap()["status"]["phase"],
        "Available"
    );
    assert_eq!(
        api.get("storagepools", "", "procpool").unwrap()["status"]["nodes"][0]["state"],
        "Running"
    );
    assert_eq!(
        api.get("networks", "", "procnet").unwrap()["status"]["nodes"][0]["active"],
        true
    );
    let other = api.get("domains", "proc", "other").unwrap();
    assert!(
        other["metadata"]["finalizers"].is_null()
            && other["status"]["phase"].is_null()
            && !api
                .requests()
                .iter()
                .any(|r| r.identity != "admin" && r.resource == "domains" && r.name == "other"),
        "another node's domain is never touched: {other}"
    );
    let reasons: Vec<String> = agent_support::events(&api)
        .iter()
        .map(|e| e.1.clone())
        .collect();
    for reason in ["Defined", "Started", "VolumeCreated"] {
        assert!(
            reasons.iter().any(|e| e == reason),
            "{reason} missing from {reasons:?}"
        );
    }

    // Quiet once converged: no more writes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rv = api.resource_version();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let changes = agent_support::writes_since(&api, rv);
    assert!(changes.is_empty(), "writes in steady state: {changes:?}");

    sigterm(child.id());
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{}", logs());
}

/// Waits until `check` holds, up to `secs`.
async fn eventually(secs: u64, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn ready(obj: &Option<Value>) -> bool {
    obj.as_ref().is_some_and(|o| {
        o["status"]["conditions"].as_array().is_some_and(|cs| {
            cs.iter().any(|c| {
                c["type"] == "Ready"
                    && c["status"] == "True"
                    && c["observedGeneration"] == o["metadata"]["generation"]
            })
        })
    })
}

#[tokio::test]
async fn whole_lifecycle_through_watches_finalizers_spec_changes_and_deletes() {
    let api = virtkube_testapi::TestApi::start().await.unwrap();
    api.create_namespace("life").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = kubeconfig(dir.path(), api.addr());
    let log = dir.path().join("agent.log");
    let mut child = agent_support::fake_api::agent_with(
        &config,
        free_port(),
        "test:///default",
        &["--shutdown-timeout-seconds", "1"],
        Some(&log),
    );
    let _kill_child = agent_support::fake_api::KillOnDrop(child.id());
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();

    // Applied in any order, as `kubectl apply -f dir/` would.
    api.create(
        "domains",
        json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Domain",
        "metadata": {"name": "vm", "namespace": "life"},
        "spec": {"nodeName": "proc-node", "runStrategy": "Manual", "state": "Running",
                 "memory": {"size": "64Mi"},
                 "cpu": {"vcpus": 2, "pinning": [{"vcpu": 0, "cpuset": "0"}]},
                 "disks": [{"name": "root", "volume": "root"}],
                 "interfaces": [{"name": "eth0", "network": "lifenet"}]}}),
    )
    .unwrap();
    api.create("volumes", json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Volume",
        "metadata": {"name": "root", "namespace": "life"},
        "spec": {"pool": "lifepool", "capacity": "1Gi", "nodeName": "proc-node", "reclaimPolicy": "Delete"}})).unwrap();
    agent_support::bind_volume(&api, "life", "root", "proc-node").await;
    api.create(
        "networks",
        json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Network",
        "metadata": {"name": "lifenet"},
        "spec": {"mode": "isolated", "ip": {"address": "10.154.0.1", "prefix": 24}}}),
    )
    .unwrap();
    api.create(
        "storagepools",
        json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "StoragePool",
        "metadata": {"name": "lifepool"},
        "spec": {"type": "dir", "target": {"path": "/var/lib/virtkube/pools/lifepool"}}}),
    )
    .unwrap();
    // Bound as the cluster controller binds it.
    let admin = api.client("admin").await.unwrap();
    agent_support::bind_domain(&admin, "life", "vm", "proc-node").await;

    eventually(60, "everything Ready", || {
        ready(&api.get("domains", "life", "vm"))
            && ready(&api.get("volumes", "life", "root"))
            && ready(&api.get("networks", "", "lifenet"))
            && ready(&api.get("storagepools", "", "lifepool"))
    })
    .await;
    let vm = api.get("domains", "life", "vm").unwrap();
    assert_eq!(vm["metadata"]["finalizers"], json!(["virtkube.io/cleanup"]));
    eventually(10, "the volume's usedBy", || {
        api.get("volumes", "life", "root")
            .is_some_and(|v| v["status"]["usedBy"] == json!(["vm"]))
    })
    .await;
    assert_eq!(vm["status"]["phase"], "Running");
    assert_eq!(
        api.get("storagepools", "", "lifepool").unwrap()["metadata"]["finalizers"],
        json!(["node.virtkube.io/proc-node"])
    );

    // Spec changes, each seen through the watch: pinning, then pause.
    api.edit_spec("domains", "life", "vm", |spec| {
        spec["cpu"]["pinning"] = json!([{"vcpu": 0, "cpuset": "1"}, {"vcpu": 1, "cpuset": "0"}]);
    })
    .unwrap();
    eventually(30, "the new pinning in status", || {
        let vm = api.get("domains", "life", "vm");
        ready(&vm)
            && vm.as_ref().is_some_and(|v| {
                v["status"]["vcpuAffinity"]
                    == json!([{"vcpu": 0, "cpuset": "1"}, {"vcpu": 1, "cpuset": "0"}])
            })
    })
    .await;
    // Removing vCPU 1's pin lets it float again over the host's online CPUs.
    api.edit_spec("domains", "life", "vm", |spec| {
        spec["cpu"]["pinning"] = json!([{"vcpu": 0, "cpuset": "1"}]);
    })
    .unwrap();
    eventually(30, "vCPU 1 floating again", || {
        let vm = api.get("domains", "life", "vm");
        ready(&vm)
            && vm.as_ref().is_some_and(|v| {
                let affinity = &v["status"]["vcpuAffinity"];
                affinity[0]["cpuset"] == "1"
                    && affinity[1]["cpuset"].as_str().is_some_and(|c| {
                        c.parse::<virtkube_crds::cpuset::CpuSet>()
                            .is_ok_and(|set| set.len() > 1)
                    })
            })
    })
    .await;
    api.edit_spec("domains", "life", "vm", |spec| {
        spec["state"] = json!("Paused")
    })
    .unwrap();
    eventually(30, "Paused", || {
        let vm = api.get("domains", "life", "vm");
        ready(&vm) && vm.is_some_and(|v| v["status"]["phase"] == "Paused")
    })
    .await;
    let reasons: Vec<String> = agent_support::events(&api)
        .iter()
        .filter(|e| e.0 == "vm")
        .map(|e| e.1.clone())
        .collect();
    for r in ["Defined", "Started", "Pinned", "Paused"] {
        assert!(
            reasons.iter().any(|x| x == r),
            "{r} missing from {reasons:?}"
        );
    }

    // Quiet in steady state: no change to any object for a while.
    let rv = api.resource_version();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let changes = agent_support::writes_since(&api, rv);
    assert!(changes.is_empty(), "writes in steady state: {changes:?}");

    // Deleting everything: finalizers run, objects go away.
    api.delete("domains", "life", "vm").unwrap();
    api.delete("volumes", "life", "root").unwrap();
    api.delete("networks", "", "lifenet").unwrap();
    api.delete("storagepools", "", "lifepool").unwrap();
    eventually(60, "every object gone", || {
        ["domains", "volumes", "networks", "storagepools"]
            .iter()
            .all(|p| api.count(p) == 0)
    })
    .await;
    let deleted: Vec<String> = agent_support::events(&api)
        .iter()
        .filter(|e| e.1 == "Deleted" || e.1 == "VolumeDeleted")
        .map(|e| e.0.clone())
        .collect();
    for name in ["vm", "root", "lifenet", "lifepool"] {
        assert!(
            deleted.iter().any(|d| d == name),
            "{name} not deleted: {deleted:?}\n{}",
            logs()
        );
    }
    sigterm(child.id());
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{}", logs());
}

#[tokio::test]
async fn agent_waits_for_libvirt_instead_of_crash_looping_and_still_stops_on_sigterm() {
    let (api, _fake) = fake_api(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = kubeconfig(dir.path(), api);
    let log = dir.path().join("agent.log");
    let child = agent_support::fake_api::agent_with(
        &config,
        free_port(),
        "qemu:///system?socket=/nonexistent/virtkube-test/libvirt-sock",
        &[],
        Some(&log),
    );
    let _kill_child = agent_support::fake_api::KillOnDrop(child.id());
    let mut child = child;
    eventually(20, "a retry logged", || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("libvirt is not reachable yet")
    })
    .await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "still running, not crash-looping"
    );
    sigterm(child.id());
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
}

fn proc_status(pid: u32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The whole agent process's memory with 1,000 domains on `test:///default` (the agent's
/// reflectors, watches, controllers, engine and HTTP server, plus libvirt's in-process test
/// driver holding the 1,000 domains). A measurement, not a check:
///
/// ```sh
/// cargo test --release -p virtkube --test agent_process -- --ignored --nocapture rss
/// ```
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run with --release --ignored --nocapture"]
async fn rss_of_the_agent_process_with_1000_domains() {
    let count: usize = std::env::var("VIRTKUBE_RSS_DOMAINS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let api = virtkube_testapi::TestApi::start().await.unwrap();
    api.create_namespace("rss").unwrap();
    for i in 0..count {
        api.create(
            "domains",
            json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Domain",
                   "metadata": {"name": format!("vm{i:04}"), "namespace": "rss"},
                   "spec": {"nodeName": "proc-node", "runStrategy": "Always", "autostart": i % 2 == 0,
                            "cpu": {"vcpus": 2, "pinning": [{"vcpu": 0, "cpuset": "1"}]},
                            "memory": {"size": "64Mi"}}}),
        ).unwrap();
    }
    // Bound as the cluster controller binds them.
    let admin = api.client("admin").await.unwrap();
    for i in 0..count {
        agent_support::bind_domain(&admin, "rss", &format!("vm{i:04}"), "proc-node").await;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = kubeconfig(dir.path(), api.addr());
    let log = dir.path().join("agent.log");
    let child = agent_support::fake_api::agent_with(
        &config,
        free_port(),
        "test:///default",
        &[],
        Some(&log),
    );
    let _kill = agent_support::fake_api::KillOnDrop(child.id());
    let pid = child.id();
    let mut child = child;
    let started = Instant::now();
    let all_ready = || {
        api.list("domains")
            .into_iter()
            .filter(|o| ready(&Some(o.clone())))
            .count()
            == count
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    while !all_ready() {
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            panic!(
                "not converged; agent log tail:\n{}",
                std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .lines()
                    .rev()
                    .take(20)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let converged = started.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    println!(
        "agent process, {count} domains converged in {converged:?}: VmRSS {}, VmHWM {}",
        proc_status(pid, "VmRSS:"),
        proc_status(pid, "VmHWM:")
    );
    sigterm(pid);
    let _ = tokio::task::spawn_blocking(move || child.wait()).await;
}

#[tokio::test]
async fn against_a_server_without_the_crds_the_agent_names_every_missing_one() {
    let api = virtkube_testapi::TestApi::start_with(virtkube_testapi::Config {
        with_crds: false,
        ..virtkube_testapi::Config::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = kubeconfig(dir.path(), api.addr());
    let child = agent(&config, free_port(), "test:///default");
    let _kill_child = agent_support::fake_api::KillOnDrop(child.id());
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("missing: domains.virtkube.io, volumes.virtkube.io, networks.virtkube.io, storagepools.virtkube.io, hypervisornodes.virtkube.io"),
        "{stderr}"
    );
}
