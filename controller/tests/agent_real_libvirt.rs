//! The agent against a real private libvirtd (QEMU under TCG): a guest destroyed with
//! `virsh` behind the agent's back is seen through libvirt's event within a second, restarted
//! (runStrategy Always), and an event says so with libvirt's reason; SIGTERM stops the agent
//! process and never the guest, and a new agent adopts the guest without touching it; the
//! examples (renamed so they cannot clash with other suites on the shared daemon) converge on
//! real QEMU through the agent process.
//!
//! Start the daemons first, then run the ignored tests (as root):
//!
//! ```sh
//! scripts/libvirt-nodes.sh up
//! set -a; . /tmp/virtkube-libvirt-nodes/env; set +a
//! cargo test -p virtkube --test agent_real_libvirt -- --ignored
//! ```
//!
//! Without the environment the script writes, these tests fail: they never pass silently.

mod agent_support;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use http::{Request, Response};
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::{Client, Resource};
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use virtkube::agent::context::{Context, FINALIZER, Settings};
use virtkube::agent::metrics::Metrics;
use virtkube::agent::{domain, drift};
use virtkube::host::{HostSpec, Hosts};
use virtkube_crds::Domain;
use virtkube_engine::EngineConfig;

use agent_support::{ApiServerVerifier, NODE, ok};

const NEEDS: &str = "needs private libvirtd: scripts/libvirt-nodes.sh up, then --run-ignored";

fn node_a_uri() -> String {
    std::env::var("VIRTKUBE_TEST_NODE_A_URI").unwrap_or_else(|_| {
        panic!(
            "VIRTKUBE_TEST_NODE_A_URI is not set: run `scripts/libvirt-nodes.sh up` then \
             `set -a; . /tmp/virtkube-libvirt-nodes/env; set +a` before these tests"
        )
    })
}

fn virsh(uri: &str, args: &[&str]) -> String {
    let out = Command::new("virsh")
        .args(["-q", "-c", uri])
        .args(args)
        .output()
        .expect("virsh runs");
    assert!(
        out.status.success(),
        "virsh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test]
#[ignore = "needs private libvirtd: scripts/libvirt-nodes.sh up, then --run-ignored"]
async fn virsh_destroy_behind_the_agents_back_is_repaired_with_an_event() {
    let _ = NEEDS;
    let uri = node_a_uri();
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let mut hosts = Hosts::connect(
        &[HostSpec {
            node: NODE.into(),
            uri: uri.clone(),
            p2p_uri: None,
            migration_uri: None,
        }],
        EngineConfig::default(),
    )
    .await
    .unwrap();
    hosts.shutdown_deadline = Duration::from_secs(1);
    let engine = hosts.get(NODE).unwrap().engine.clone();
    let mut settings = Settings::for_node(NODE);
    settings.host_cpus = Some(engine.node_info().await.unwrap().cpus);
    settings.shutdown_timeout = Duration::from_secs(1);
    let metrics = Metrics::register(&mut Registry::default(), None);
    let ctx = Arc::new(
        Context::new(
            Client::new(service, "default"),
            hosts,
            metrics.clone(),
            settings,
        )
        .unwrap(),
    );
    let mut api = ApiServerVerifier(handle);

    let ns = format!("realdrift{}", std::process::id() % 100_000);
    let libvirt_name = format!("{ns}.vm");
    let mut dom: Domain = serde_json::from_value(json!({
        "apiVersion": "virtkube.io/v1alpha1", "kind": "Domain",
        "metadata": { "name": "vm", "namespace": ns, "uid": format!("uid-{ns}"), "generation": 1,
                      "resourceVersion": "1", "finalizers": [FINALIZER] },
        "spec": { "nodeName": NODE, "runStrategy": "Always",
                  "cpu": { "vcpus": 1 }, "memory": { "size": "128Mi" }, "os": { "machine": "pc" } }
    }))
    .unwrap();

    let (tx, mut requests) = futures::channel::mpsc::unbounded();
    let (store, _writer) = kube::runtime::reflector::store::<Domain>();
    tokio::spawn(drift::forward(engine.events(), store, metrics, tx));

    // Converge: defined and running on the real daemon.
    let server = {
        let dom = dom.clone();
        tokio::spawn(async move {
            let (events, seen, send) = api.events_then().await;
            let mut updated = dom.clone();
            updated.status = Some(serde_json::from_value(seen.body["status"].clone()).unwrap());
            send.send_response(ok(&updated));
            (events, updated, api)
        })
    };
    let action = tokio::time::timeout(
        Duration::from_secs(60),
        domain::reconcile(Arc::new(dom.clone()), ctx.clone()),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(action, Action::requeue(ctx.settings.resync));
    let (events, updated, mut api) = server.await.unwrap();
    assert!(events.iter().any(|(r, _)| r == "Started"), "{events:?}");
    assert_eq!(virsh(&uri, &["domstate", &libvirt_name]), "running");
    dom = updated;

    // Behind the agent's back.
    tokio::time::sleep(Duration::from_millis(300)).await;
    while requests.try_recv().is_ok() {}
    let before_virsh = Instant::now();
    virsh(&uri, &["destroy", &libvirt_name]);
    let virsh_took = before_virsh.elapsed();
    let destroyed = Instant::now();
    let request = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            let r = requests.next().await.unwrap();
            if r.namespace.as_deref() == Some(ns.as_str()) {
                return r;
            }
        }
    })
    .await
    .expect("libvirt's event did not request a reconcile within a second");
    assert_eq!(request.name, "vm");
    let seen_after = destroyed.elapsed();

    let server = {
        let dom = dom.clone();
        tokio::spawn(async move {
            let (events, seen, send) = api.events_then().await;
            let mut updated = dom.clone();
            updated.status = Some(serde_json::from_value(seen.body["status"].clone()).unwrap());
            send.send_response(ok(&updated));
            (events, updated, api)
        })
    };
    tokio::time::timeout(
        Duration::from_secs(60),
        domain::reconcile(Arc::new(dom.clone()), ctx.clone()),
    )
    .await
    .unwrap()
    .unwrap();
    let (events, updated, mut api) = server.await.unwrap();
    let (reason, note) = events.first().cloned().expect("an event");
    assert_eq!(reason, "Started");
    assert!(
        note.contains("destroyed"),
        "libvirt's reason in the note: {note}"
    );
    assert_eq!(virsh(&uri, &["domstate", &libvirt_name]), "running");
    println!(
        "virsh destroy took {virsh_took:?}; reconcile requested {seen_after:?} after it returned; repaired with event: {note}"
    );

    // Clean up through the finalizer path.
    let mut deleting = updated;
    deleting.meta_mut().deletion_timestamp = Some(
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()),
    );
    let server = {
        let mut answer = deleting.clone();
        answer.metadata.finalizers = None;
        tokio::spawn(async move {
            let (events, _seen, send) = api.events_then().await;
            send.send_response(ok(&answer));
            events
        })
    };
    tokio::time::timeout(
        Duration::from_secs(60),
        domain::reconcile(Arc::new(deleting), ctx.clone()),
    )
    .await
    .unwrap()
    .unwrap();
    let events = server.await.unwrap();
    assert_eq!(
        events.first().map(|e| e.0.as_str()),
        Some("Deleted"),
        "{events:?}"
    );
    assert!(engine.domain_lookup(&libvirt_name).await.unwrap().is_none());
}

#[tokio::test]
#[ignore = "needs private libvirtd: scripts/libvirt-nodes.sh up, then --run-ignored"]
async fn sigterm_stops_the_agent_never_the_guest_and_a_new_agent_adopts_it() {
    use agent_support::fake_api::{agent, fake_api_with, free_port, http_get, kubeconfig, sigterm};
    let uri = node_a_uri();
    let ns = format!("realterm{}", std::process::id() % 100_000);
    let libvirt_name = format!("{ns}.vm");
    let domain = json!({
        "apiVersion": "virtkube.io/v1alpha1", "kind": "Domain",
        "metadata": { "name": "vm", "namespace": ns, "uid": format!("uid-{ns}"), "generation": 1,
                      "resourceVersion": "1", "finalizers": [FINALIZER] },
        "spec": { "nodeName": "proc-node", "runStrategy": "Always",
                  "cpu": { "vcpus": 1 }, "memory": { "size": "128Mi" }, "os": { "machine": "pc" } }
    });
    let (api, fake) = fake_api_with(vec![("domains", domain)]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = kubeconfig(dir.path(), api);

    let running_status =
        |fake: &agent_support::fake_api::Shared| {
            fake.lock().unwrap().status_patches.iter().any(|(p, b)| {
                p.ends_with("/domains/vm/status") && b["status"]["phase"] == "Running"
            })
        };
    let port = free_port();
    let mut first = agent(&config, port, &uri);
    let _kill_first = agent_support::fake_api::KillOnDrop(first.id());
    let deadline = Instant::now() + Duration::from_secs(90);
    while !running_status(&fake) {
        assert!(
            first.try_wait().unwrap().is_none(),
            "the agent exited early"
        );
        assert!(Instant::now() < deadline, "the domain never ran");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(virsh(&uri, &["domstate", &libvirt_name]), "running");
    let pid_before = virsh(&uri, &["domid", &libvirt_name]);

    sigterm(first.id());
    let out = tokio::task::spawn_blocking(move || first.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        virsh(&uri, &["domstate", &libvirt_name]),
        "running",
        "stopping the agent never stops a guest"
    );

    // A new agent adopts the running guest: no event, no restart, same run.
    let events_before = fake.lock().unwrap().events.len();
    let port = free_port();
    let mut second = agent(&config, port, &uri);
    let _kill_second = agent_support::fake_api::KillOnDrop(second.id());
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_get(port, "/readyz").await.map(|(c, _)| c) != Some(200) {
        assert!(
            Instant::now() < deadline,
            "the second agent never became ready"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        virsh(&uri, &["domid", &libvirt_name]),
        pid_before,
        "same run"
    );
    assert_eq!(
        fake.lock().unwrap().events.len(),
        events_before,
        "adopting changes nothing"
    );
    sigterm(second.id());
    let _ = tokio::task::spawn_blocking(move || second.wait()).await;

    virsh(&uri, &["destroy", &libvirt_name]);
    virsh(&uri, &["undefine", &libvirt_name]);
}

/// The examples, renamed by `tag` (1 or 2) so they clash neither with other suites on the
/// shared daemon nor with each other (pool `agimages<tag>`, networks `ag<tag>-nat` and
/// `ag<tag>-isolated`, namespace `agentex<tag>`).
fn renamed_examples(tag: u8) -> Vec<(String, Value)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut objects = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    for file in files {
        let text = std::fs::read_to_string(&file)
            .unwrap()
            .replace("name: images", &format!("name: agimages{tag}"))
            .replace("pool: images", &format!("pool: agimages{tag}"))
            .replace("/pools/images", &format!("/pools/agimages{tag}"))
            .replace("vk-nat", &format!("ag{tag}-nat"))
            .replace("vk-isolated", &format!("ag{tag}-isolated"))
            .replace("virbr-vk0", &format!("virbr-ag{tag}"))
            .replace("192.168.150.", &format!("192.168.{}.", 160 + tag))
            .replace("10.150.0.", &format!("10.{}.0.", 160 + tag))
            .replace("namespace: default", &format!("namespace: agentex{tag}"));
        let manifests = virtkube_crds::manifest::Reader::new()
            .parse(&file, &text)
            .unwrap_or_else(|e| panic!("{}: {e:?}", file.display()));
        for m in manifests {
            use virtkube_crds::manifest::Object;
            let (plural, mut value) = match &m.object {
                Object::StoragePool(o) => ("storagepools", serde_json::to_value(o).unwrap()),
                Object::Network(o) => ("networks", serde_json::to_value(o).unwrap()),
                Object::Volume(o) => ("volumes", serde_json::to_value(o).unwrap()),
                Object::Domain(o) => ("domains", serde_json::to_value(o).unwrap()),
            };
            let name = value["metadata"]["name"].as_str().unwrap().to_string();
            let namespaced = matches!(plural, "volumes" | "domains");
            value["metadata"]["uid"] = json!(format!("uid-ex-{plural}-{name}"));
            value["metadata"]["generation"] = json!(1);
            value["metadata"]["resourceVersion"] = json!("1");
            value["metadata"]["finalizers"] = json!([if namespaced {
                FINALIZER
            } else {
                "node.virtkube.io/proc-node"
            }]);
            if plural == "volumes" {
                // Bound to the agent's node the way the cluster controller binds it.
                value["metadata"]["labels"] = json!({ "node.virtkube.io/proc-node": "holder" });
                value["status"] = json!({ "nodeName": "proc-node" });
            }
            objects.push((plural.to_string(), value));
        }
    }
    objects
}

#[tokio::test]
#[ignore = "needs private libvirtd: scripts/libvirt-nodes.sh up, then --run-ignored"]
async fn the_examples_converge_on_real_qemu_through_the_agent_process() {
    use agent_support::fake_api::{agent_with, fake_api_with, free_port, kubeconfig, sigterm};
    let uri = node_a_uri();
    let objects = renamed_examples(1);
    let expected: Vec<(String, String)> = objects
        .iter()
        .map(|(p, v)| {
            (
                p.clone(),
                v["metadata"]["name"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(expected.len() >= 9, "{expected:?}");
    let (api, fake) = fake_api_with(
        objects
            .iter()
            .map(|(p, v)| (p.as_str(), v.clone()))
            .collect(),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = kubeconfig(dir.path(), api);
    let log = dir.path().join("agent.log");
    let mut child = agent_with(
        &config,
        free_port(),
        &uri,
        &["--claim-unscheduled", "--shutdown-timeout-seconds", "2"],
        Some(&log),
    );
    let _kill_child = agent_support::fake_api::KillOnDrop(child.id());

    let ready = |b: &Value| {
        b["status"]["conditions"].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
    };
    let started = Instant::now();
    let deadline = started + Duration::from_secs(150);
    loop {
        let pending: Vec<(String, String)> = {
            let f = fake.lock().unwrap();
            expected
                .iter()
                .filter(|(plural, name)| {
                    let suffix = format!("/{plural}/{name}/status");
                    !f.status_patches
                        .iter()
                        .rev()
                        .find(|(p, _)| p.ends_with(&suffix))
                        .is_some_and(|(_, b)| ready(b))
                })
                .cloned()
                .collect()
        };
        if pending.is_empty() {
            break;
        }
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            let last: Vec<String> = {
                let f = fake.lock().unwrap();
                pending
                    .iter()
                    .map(|(plural, name)| {
                        let suffix = format!("/{plural}/{name}/status");
                        let cond = f
                            .status_patches
                            .iter()
                            .rev()
                            .find(|(p, _)| p.ends_with(&suffix))
                            .map(|(_, b)| b["status"]["conditions"].to_string())
                            .unwrap_or_default();
                        format!("{plural}/{name}: {cond}")
                    })
                    .collect()
            };
            panic!(
                "not Ready after {:?}: {last:#?}\nagent log tail:\n{}",
                started.elapsed(),
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
    println!(
        "examples converged through the agent in {:?}",
        started.elapsed()
    );
    assert_eq!(virsh(&uri, &["domstate", "agentex1.web"]), "running");
    assert_eq!(virsh(&uri, &["domstate", "agentex1.worker"]), "paused");
    assert_eq!(virsh(&uri, &["domstate", "agentex1.spare"]), "shut off");
    let pin = virsh(&uri, &["vcpupin", "agentex1.web", "--vcpu", "1"]);
    assert!(
        pin.trim_end().ends_with('1'),
        "vcpu 1 pinned to host CPU 1: {pin}"
    );
    assert!(virsh(&uri, &["dominfo", "agentex1.web"]).contains("Autostart:      enable"));
    let events = fake.lock().unwrap().events.clone();
    for reason in [
        "Defined",
        "Started",
        "Paused",
        "VolumeCreated",
        "AutostartSet",
    ] {
        assert!(
            events.iter().any(|e| e == reason),
            "{reason} missing: {events:?}"
        );
    }

    sigterm(child.id());
    let _ = tokio::task::spawn_blocking(move || child.wait()).await;
    // Clean the shared daemon by hand (the fake API server delivers no deletions).
    for d in ["agentex1.web", "agentex1.worker", "agentex1.spare"] {
        let _ = Command::new("virsh")
            .args(["-q", "-c", &uri, "destroy", d])
            .output();
        let _ = Command::new("virsh")
            .args(["-q", "-c", &uri, "undefine", d, "--nvram"])
            .output();
    }
    for v in ["agentex1.scratch", "agentex1.web-root", "agentex1.base"] {
        let _ = Command::new("virsh")
            .args(["-q", "-c", &uri, "vol-delete", v, "--pool", "agimages1"])
            .output();
    }
    for (what, name) in [
        ("pool", "agimages1"),
        ("net", "ag1-nat"),
        ("net", "ag1-isolated"),
    ] {
        let _ = Command::new("virsh")
            .args(["-q", "-c", &uri, &format!("{what}-destroy"), name])
            .output();
        let _ = Command::new("virsh")
            .args(["-q", "-c", &uri, &format!("{what}-undefine"), name])
            .output();
    }
    let _ = std::fs::remove_dir("/var/lib/virtkube/pools/agimages1");
}

fn is_ready(obj: &Option<Value>) -> bool {
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

async fn eventually(secs: u64, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The e2e suite's scenarios, with an in-memory API server in place of a cluster: the
/// examples applied, Ready, spec changes (pinning, resume/pause, autostart), a guest destroyed
/// with virsh and repaired, everything deleted through the finalizers, libvirt clean.
#[tokio::test]
#[ignore = "needs private libvirtd: scripts/libvirt-nodes.sh up, then --run-ignored"]
async fn e2e_scenarios_on_real_qemu_with_an_in_memory_api_server() {
    use agent_support::fake_api::{agent_with, free_port, kubeconfig, sigterm};
    let uri = node_a_uri();
    let api = virtkube_testapi::TestApi::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = kubeconfig(dir.path(), api.addr());
    let log = dir.path().join("agent.log");
    let mut child = agent_with(
        &config,
        free_port(),
        &uri,
        &["--claim-unscheduled", "--shutdown-timeout-seconds", "2"],
        Some(&log),
    );
    let _kill_child = agent_support::fake_api::KillOnDrop(child.id());
    let tail = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .rev()
            .take(15)
            .collect::<Vec<_>>()
            .join("\n")
    };
    let mut names = Vec::new();
    for (plural, mut obj) in renamed_examples(2) {
        // The API server assigns these.
        for field in ["uid", "generation", "resourceVersion", "finalizers"] {
            obj["metadata"].as_object_mut().map(|m| m.remove(field));
        }
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if !ns.is_empty() {
            api.create_namespace(&ns).unwrap();
        }
        api.create(&plural, obj).unwrap();
        if plural == "volumes" {
            // Bound as the cluster controller binds it: `status.nodeName` by a status write.
            let client = api.client(virtkube_testapi::ADMIN).await.unwrap();
            kube::Api::<virtkube_crds::Volume>::namespaced(client, &ns)
                .patch_status(
                    &name,
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(json!({ "status": { "nodeName": "proc-node" } })),
                )
                .await
                .unwrap();
        }
        names.push((plural.clone(), ns, name));
    }
    let started = Instant::now();
    let all_ready = || names.iter().all(|(p, ns, n)| is_ready(&api.get(p, ns, n)));
    if tokio::time::timeout(
        Duration::from_secs(150),
        eventually(150, "all Ready", all_ready),
    )
    .await
    .is_err()
        || !all_ready()
    {
        panic!("not all Ready; agent log:\n{}", tail());
    }
    println!("examples Ready in {:?}", started.elapsed());
    let web = || api.get("domains", "agentex2", "web").unwrap();
    assert_eq!(web()["status"]["phase"], "Running");
    assert_eq!(
        api.get("domains", "agentex2", "worker").unwrap()["status"]["phase"],
        "Paused"
    );
    assert_eq!(
        api.get("domains", "agentex2", "spare").unwrap()["status"]["phase"],
        "Stopped"
    );
    assert_eq!(virsh(&uri, &["domstate", "agentex2.web"]), "running");

    // Pinning.
    api.edit_spec("domains", "agentex2", "web", |s| {
        s["cpu"]["pinning"] = json!([{"vcpu": 0, "cpuset": "1"}, {"vcpu": 1, "cpuset": "0"}]);
    })
    .unwrap();
    eventually(60, "pinning in status", || {
        is_ready(&Some(web()))
            && web()["status"]["vcpuAffinity"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x["vcpu"] == 0 && x["cpuset"] == "1"))
    })
    .await;
    let pin = virsh(&uri, &["vcpupin", "agentex2.web", "--vcpu", "0"]);
    assert!(pin.trim_end().ends_with('1'), "{pin}");
    // Resume, then pause again.
    api.edit_spec("domains", "agentex2", "worker", |s| {
        s["state"] = json!("Running")
    })
    .unwrap();
    eventually(60, "worker running", || {
        virsh(&uri, &["domstate", "agentex2.worker"]) == "running"
    })
    .await;
    api.edit_spec("domains", "agentex2", "worker", |s| {
        s["state"] = json!("Paused")
    })
    .unwrap();
    eventually(60, "worker paused", || {
        virsh(&uri, &["domstate", "agentex2.worker"]) == "paused"
    })
    .await;
    // Autostart off.
    api.edit_spec("domains", "agentex2", "web", |s| {
        s["autostart"] = json!(false)
    })
    .unwrap();
    eventually(60, "autostart off", || {
        is_ready(&Some(web()))
            && web()["status"]["autostart"] == false
            && virsh(&uri, &["dominfo", "agentex2.web"]).contains("Autostart:      disable")
    })
    .await;
    // Drift: destroyed behind the agent's back, repaired within seconds, with an event.
    virsh(&uri, &["destroy", "agentex2.web"]);
    let destroyed = Instant::now();
    eventually(10, "web running again", || {
        virsh(&uri, &["domstate", "agentex2.web"]) == "running"
    })
    .await;
    println!("virsh destroy repaired in {:?}", destroyed.elapsed());
    let repaired = || {
        agent_support::events(&api).iter().any(|e| {
            e.0 == "web"
                && e.1 == "Started"
                && e.2.starts_with("Repair")
                && e.3.contains("destroyed")
        })
    };
    if tokio::time::timeout(
        Duration::from_secs(10),
        eventually(10, "a Repair event", repaired),
    )
    .await
    .is_err()
        || !repaired()
    {
        panic!(
            "no Repair event: {:#?}",
            agent_support::events(&api)
                .iter()
                .filter(|e| e.0 == "web")
                .collect::<Vec<_>>()
        );
    }

    // Delete everything, in any order; the finalizers order the work.
    for (p, ns, n) in names.iter().rev() {
        api.delete(p, ns, n).unwrap();
    }
    eventually(120, "every object gone", || {
        ["domains", "volumes", "networks", "storagepools"]
            .iter()
            .all(|p| api.count(p) == 0)
    })
    .await;
    let list = |what: &str| virsh(&uri, &[what, "--all", "--name"]);
    assert!(!list("list").contains("agentex2."), "{}", list("list"));
    assert!(!list("net-list").contains("ag2-"), "{}", list("net-list"));
    assert!(
        !list("pool-list").contains("agimages2"),
        "{}",
        list("pool-list")
    );
    sigterm(child.id());
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    // The Retain'ed base image stays on disk, as its policy says.
    let base = std::path::Path::new("/var/lib/virtkube/pools/agimages2/agentex2.base");
    assert!(base.exists(), "reclaimPolicy Retain keeps the image");
    let _ = std::fs::remove_file(base);
    let _ = std::fs::remove_dir("/var/lib/virtkube/pools/agimages2");
}

fn node_env(which: &str, what: &str) -> String {
    let name = format!("VIRTKUBE_TEST_NODE_{which}_{what}");
    std::env::var(&name).unwrap_or_else(|_| panic!("{name} is not set: {NEEDS}"))
}

/// Two agents (node-a, node-b), one in-memory API server: changing `spec.nodeName` of a
/// running domain live-migrates it (the source agent moves it, then the target's agent takes
/// over); it never runs on both; deleting it afterwards is the target's job.
#[tokio::test]
#[ignore = "needs private libvirtd: scripts/libvirt-nodes.sh up, then --run-ignored"]
async fn changing_node_name_live_migrates_through_two_agents() {
    use agent_support::fake_api::{KillOnDrop, agent_with, free_port, kubeconfig, sigterm};
    let (uri_a, uri_b) = (node_env("A", "URI"), node_env("B", "URI"));
    let api = virtkube_testapi::TestApi::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = kubeconfig(dir.path(), api.addr());
    let mut agents = Vec::new();
    for (node, which) in [("node-a", "A"), ("node-b", "B")] {
        let log = dir.path().join(format!("{node}.log"));
        let (client, peer, data) = (
            node_env(which, "URI"),
            node_env(which, "P2P_URI"),
            node_env(which, "MIGRATION_URI"),
        );
        let child = agent_with(
            &config,
            free_port(),
            &client,
            &[
                "--node-name",
                node,
                "--libvirt-client-uri",
                &client,
                "--libvirt-peer-uri",
                &peer,
                "--migration-uri",
                &data,
                "--shutdown-timeout-seconds",
                "2",
            ],
            Some(&log),
        );
        let guard = KillOnDrop(child.id());
        agents.push((child, guard, log));
    }
    let logs = |agents: &Vec<(std::process::Child, KillOnDrop, std::path::PathBuf)>| {
        agents
            .iter()
            .map(|(_, _, l)| {
                std::fs::read_to_string(l)
                    .unwrap_or_default()
                    .lines()
                    .rev()
                    .take(8)
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .collect::<Vec<_>>()
            .join("\n----\n")
    };
    let ns = format!("realmig{}", std::process::id() % 100_000);
    let name = format!("{ns}.mover");
    api.create_namespace(&ns).unwrap();
    api.create(
        "domains",
        json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Domain",
               "metadata": {"name": "mover", "namespace": ns},
               "spec": {"nodeName": "node-a", "runStrategy": "Always", "autostart": true,
                        "cpu": {"vcpus": 1}, "memory": {"size": "128Mi"},
                        "os": {"machine": "pc"}}}),
    )
    .unwrap();
    let dom = || api.get("domains", &ns, "mover").unwrap();
    let on = |node: &str| {
        let d = dom();
        is_ready(&Some(d.clone())) && d["status"]["nodeName"] == node
    };
    if tokio::time::timeout(
        Duration::from_secs(90),
        eventually(90, "Ready on node-a", || on("node-a")),
    )
    .await
    .is_err()
    {
        panic!("never Ready on node-a:\n{}", logs(&agents));
    }
    assert_eq!(virsh(&uri_a, &["domstate", &name]), "running");

    api.edit_spec("domains", &ns, "mover", |s| s["nodeName"] = json!("node-b"))
        .unwrap();
    let started = Instant::now();
    // Never on both: sample while it moves.
    let mut both = 0;
    loop {
        // One call per node (a `list` then a `domstate` races the move: "Domain not found"),
        // and the target first: the guest resumes on B only after A has paused it for good, so
        // "running on B, then running on A" can only mean both at once, whereas the other
        // order would count a switch-over that happened between the two samples.
        let running = |uri: &str| {
            virsh(uri, &["list", "--name", "--state-running"])
                .lines()
                .any(|l| l == name)
        };
        let running_b = running(&uri_b);
        let running_a = running(&uri_a);
        if running_a && running_b {
            both += 1;
        }
        if on("node-b") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "not moved to node-b; status {}\n{}",
            dom()["status"],
            logs(&agents)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("moved to node-b in {:?}", started.elapsed());
    assert_eq!(both, 0, "running on both nodes at once");
    assert_eq!(virsh(&uri_b, &["domstate", &name]), "running");
    assert!(
        !virsh(&uri_a, &["list", "--all", "--name"])
            .lines()
            .any(|l| l == name),
        "gone from node-a"
    );
    let status = dom()["status"].clone();
    assert_eq!(status["migration"]["state"], "Succeeded");
    assert_eq!(status["migration"]["sourceNode"], "node-a");
    assert_eq!(status["migration"]["targetNode"], "node-b");
    assert!(
        status["migration"]["startTime"].is_string() && status["migration"]["endTime"].is_string()
    );
    let migrating = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Migrating")
        .cloned()
        .unwrap();
    assert_eq!(
        (migrating["status"].as_str(), migrating["reason"].as_str()),
        (Some("False"), Some("Migrated"))
    );
    // While it moved, the status said so.
    let said_migrating = api.changes_since(0).iter().any(|c| {
        c.key.plural == "domains"
            && c.object["status"]["phase"] == "Migrating"
            && c.object["status"]["migration"]["state"] == "Running"
    });
    assert!(said_migrating, "phase Migrating during the move");
    let migrated = agent_support::events(&api)
        .iter()
        .any(|e| e.0 == "mover" && e.1 == "Migrated");
    assert!(migrated, "a Migrated event");

    // The target's agent now owns it: deleting it is done on node-b.
    api.delete("domains", &ns, "mover").unwrap();
    eventually(60, "the Domain gone", || api.count("domains") == 0).await;
    assert!(
        !virsh(&uri_b, &["list", "--all", "--name"])
            .lines()
            .any(|l| l == name)
    );
    for (child, _, _) in &agents {
        sigterm(child.id());
    }
    for (mut child, _, _) in agents {
        let _ = tokio::task::spawn_blocking(move || child.wait()).await;
    }
}
