//! The agent against a real private libvirtd (QEMU under TCG), each Domain and Volume bound
//! to the agent's node the way the cluster controller binds it (the placement protocol:
//! `status.nodeName` written by compare-and-swap, then the routing label
//! `node.virtkube.io/<node>: holder`; see README "Placement: one node at a time"): a guest
//! destroyed with `virsh` behind the agent's back is seen through libvirt's event within a
//! second, restarted (runStrategy Always), and an event says so with libvirt's reason;
//! SIGTERM stops the agent process and never the guest, and a new agent adopts the guest
//! without touching it; the examples (renamed so they cannot clash with other suites on the
//! shared daemon) converge on real QEMU through the agent process; and the e2e suite's
//! scenarios run against the agent process with the in-memory API server.
//!
//! Moves between nodes (a `spec.nodeName` edit, live migration through two agents and the
//! controller) are covered by `placement_real.rs`.
//!
//! Start the daemons first, then run the ignored tests (as root):
//!
//! ```sh
//! scripts/libvirt-nodes.sh up /tmp/nodes
//! set -a; . /tmp/nodes/env; set +a
//! VIRTKUBE_REQUIRE_LIBVIRTD=1 cargo nextest run -p virtkube --test agent_real_libvirt --run-ignored only
//! ```
//!
//! Without the environment the script writes, these tests fail: they never pass silently.

mod agent_support;
mod process_support;

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use serde_json::{Value, json};
use virtkube::agent::context::Context;
use virtkube::agent::{domain, drift};
use virtkube_crds::Domain;
use virtkube_testapi::{ADMIN, TestApi};

use agent_support::{NODE, bind_domain, bind_volume};
use process_support::{
    Cluster, NEEDS, Node, clean_guests, http_get, is_ready, settled_on, small_domain, virsh,
};

/// Node A's URI, failing (never skipping) when the daemons' environment is missing or the
/// daemon does not answer.
fn node_a_uri() -> String {
    let uri = std::env::var("VIRTKUBE_TEST_NODE_A_URI")
        .unwrap_or_else(|_| panic!("VIRTKUBE_TEST_NODE_A_URI is not set: {NEEDS}"));
    let out = Command::new("virsh")
        .args(["-q", "-c", &uri, "version"])
        .output()
        .expect("virsh runs");
    assert!(
        out.status.success(),
        "node A's daemon ({uri}) does not answer: {}; {NEEDS}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    uri
}

/// Removes the guests of namespace `ns` from node A now and when dropped (a failed test
/// leaves nothing running on the shared daemon).
struct CleanGuests(Vec<Node>, String);

impl CleanGuests {
    fn on_a(uri: &str, ns: &str) -> CleanGuests {
        let node = Node {
            name: NODE.into(),
            uri: uri.into(),
            p2p: String::new(),
            migration: String::new(),
        };
        clean_guests(std::slice::from_ref(&node), ns);
        CleanGuests(vec![node], ns.into())
    }
}

impl Drop for CleanGuests {
    fn drop(&mut self) {
        clean_guests(&self.0, &self.1);
    }
}

/// One reconcile of the Domain as the API server stores it.
async fn reconcile_stored(
    domains: &Api<Domain>,
    name: &str,
    ctx: &Arc<Context>,
) -> Result<Action, virtkube::agent::error::Error> {
    let dom = domains.get(name).await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(60),
        domain::reconcile(Arc::new(dom), ctx.clone()),
    )
    .await
    .expect("the reconcile finished within a minute")
}

/// The Events regarding `name`: (event object name, reason, action, note).
fn events_of(api: &TestApi, name: &str) -> Vec<(String, String, String, String)> {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    api.events()
        .iter()
        .filter(|e| e["regarding"]["name"] == name || e["involvedObject"]["name"] == name)
        .map(|e| {
            let note = if e["note"].is_string() {
                &e["note"]
            } else {
                &e["message"]
            };
            (
                text(&e["metadata"]["name"]),
                text(&e["reason"]),
                text(&e["action"]),
                text(note),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs private libvirtd: scripts/libvirt-nodes.sh up, then --run-ignored"]
async fn virsh_destroy_behind_the_agents_back_is_repaired_with_an_event() {
    let uri = node_a_uri();
    let ns = format!("realdrift{}", std::process::id() % 100_000);
    let _clean = CleanGuests::on_a(&uri, &ns);
    let libvirt_name = format!("{ns}.vm");
    let api = TestApi::start().await.unwrap();
    api.create_namespace(&ns).unwrap();
    let admin = api.client(ADMIN).await.unwrap();
    let (ctx, _, engine) = agent_support::testapi_context_on(&api, NODE, &uri).await;
    let domains: Api<Domain> = Api::namespaced(admin.clone(), &ns);

    api.create("domains", small_domain(&ns, "vm", Some(NODE)))
        .unwrap();
    bind_domain(&admin, &ns, "vm", NODE).await;

    // Converge: defined and running on the real daemon.
    let action = reconcile_stored(&domains, "vm", &ctx).await.unwrap();
    assert_eq!(action, Action::requeue(ctx.settings.resync));
    let events = events_of(&api, "vm");
    assert!(events.iter().any(|e| e.1 == "Started"), "{events:?}");
    assert_eq!(virsh(&uri, &["domstate", &libvirt_name]), "running");
    let stored = api.get("domains", &ns, "vm").unwrap();
    assert!(settled_on(&stored, NODE), "{}", stored["status"]);

    let (tx, mut requests) = futures::channel::mpsc::unbounded();
    let (store, _writer) = kube::runtime::reflector::store::<Domain>();
    let forward = tokio::spawn(drift::forward(
        engine.events(),
        store,
        ctx.metrics.clone(),
        tx,
    ));

    // Behind the agent's back.
    tokio::time::sleep(Duration::from_millis(300)).await;
    while requests.try_recv().is_ok() {}
    let events_before: BTreeSet<String> = events_of(&api, "vm").into_iter().map(|e| e.0).collect();
    let before_virsh = Instant::now();
    virsh(&uri, &["destroy", &libvirt_name]);
    let virsh_took = before_virsh.elapsed();
    let destroyed = Instant::now();
    let request = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            let r = requests.next().await.expect("the forwarder runs");
            if r.namespace.as_deref() == Some(ns.as_str()) {
                return r;
            }
        }
    })
    .await
    .expect("libvirt's event did not request a reconcile within a second");
    assert_eq!(request.name, "vm");
    let seen_after = destroyed.elapsed();

    // The reconcile the event asked for repairs it, and says why with libvirt's reason.
    let action = reconcile_stored(&domains, "vm", &ctx).await.unwrap();
    assert_eq!(action, Action::requeue(ctx.settings.resync));
    assert_eq!(virsh(&uri, &["domstate", &libvirt_name]), "running");
    let new: Vec<_> = events_of(&api, "vm")
        .into_iter()
        .filter(|e| !events_before.contains(&e.0))
        .collect();
    let repair = new
        .iter()
        .find(|e| e.1 == "Started" && e.2.starts_with("Repair"))
        .unwrap_or_else(|| panic!("no Repair Started event: {new:#?}"));
    assert!(
        repair.3.contains("destroyed"),
        "libvirt's reason in the note: {}",
        repair.3
    );
    println!(
        "virsh destroy took {virsh_took:?}; reconcile requested {seen_after:?} after it returned; repaired with event: {}",
        repair.3
    );
    forward.abort();

    // Clean up through the finalizer path: deleted by the user, removed by the agent.
    api.delete("domains", &ns, "vm").unwrap();
    reconcile_stored(&domains, "vm", &ctx).await.unwrap();
    assert!(
        api.get("domains", &ns, "vm").is_none(),
        "the finalizer is removed"
    );
    let events = events_of(&api, "vm");
    assert!(events.iter().any(|e| e.1 == "Deleted"), "{events:#?}");
    assert!(engine.domain_lookup(&libvirt_name).await.unwrap().is_none());
}

/// Whether the agent on `port` has finished at least one Domain reconcile (its metrics).
async fn domain_reconciled(port: u16) -> bool {
    let Some((200, text)) = http_get(port, "/metrics").await else {
        return false;
    };
    text.lines().any(|l| {
        l.starts_with("virtkube_agent_reconcile_duration_seconds_count")
            && l.contains("omain")
            && l.rsplit(' ')
                .next()
                .and_then(|n| n.trim().parse::<f64>().ok())
                .is_some_and(|n| n >= 1.0)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs private libvirtd: scripts/libvirt-nodes.sh up, then --run-ignored"]
async fn sigterm_stops_the_agent_never_the_guest_and_a_new_agent_adopts_it() {
    let mut c = Cluster::new().await;
    let ns = c.namespace("realterm");
    let guest = format!("{ns}.vm");
    let uri = c.node("node-a").uri.clone();
    c.start_agent("node-a");
    c.wait_ready().await;
    c.api
        .create("domains", small_domain(&ns, "vm", Some("node-a")))
        .unwrap();
    bind_domain(&c.client, &ns, "vm", "node-a").await;
    c.until(90, "the guest running on node-a", || {
        c.domain(&ns, "vm")
            .is_some_and(|d| settled_on(&d, "node-a"))
    })
    .await;
    assert_eq!(virsh(&uri, &["domstate", &guest]), "running");
    let id_before = virsh(&uri, &["domid", &guest]);

    let first = c.take_agent("node-a");
    let log = first.log.clone();
    assert!(
        first.terminate(15).await,
        "the agent exits with success on SIGTERM:\n{}",
        process_support::tail(&log, 30)
    );
    assert_eq!(
        virsh(&uri, &["domstate", &guest]),
        "running",
        "stopping the agent never stops a guest"
    );

    // A new agent adopts the running guest: no event, no write, no restart.
    c.api.clear_requests();
    c.start_agent("node-a");
    c.wait_ready().await;
    let port = c.agent("node-a").port;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !domain_reconciled(port).await {
        assert!(
            Instant::now() < deadline,
            "the new agent never reconciled the Domain\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(virsh(&uri, &["domid", &guest]), id_before, "same run");
    let requests: Vec<_> = c
        .api
        .requests()
        .into_iter()
        .filter(|r| r.identity == process_support::AGENT_USER)
        .collect();
    assert!(
        requests
            .iter()
            .any(|r| r.resource == "domains" && r.verb == "watch"),
        "the new agent watches Domains under this identity: {} requests",
        requests.len()
    );
    let writes: Vec<String> = requests
        .into_iter()
        .filter(|r| !["get", "list", "watch"].contains(&r.verb.as_str()))
        .filter(|r| ["domains", "events"].contains(&r.resource.as_str()))
        .map(|r| format!("{} {} {}/{}", r.verb, r.resource, r.subresource, r.name))
        .collect();
    assert!(
        writes.is_empty(),
        "adopting changes nothing: {writes:?}\n{}",
        c.logs()
    );
    c.shutdown().await;
}

/// The examples renamed by `tag` (1 or 2) so they clash neither with other suites on the
/// shared daemon (or other checkouts' daemons sharing this host's disk) nor with each other:
/// pool `agimg<tag>x<pid>`, networks `ag<tag>-nat` and `ag<tag>-isolated`, namespace `ns`.
struct Examples {
    tag: u8,
    ns: String,
    pool: String,
}

impl Examples {
    fn new(tag: u8, ns: &str) -> Examples {
        Examples {
            tag,
            ns: ns.into(),
            pool: format!("agimg{tag}x{}", std::process::id() % 100_000),
        }
    }

    fn pool_dir(&self) -> std::path::PathBuf {
        std::path::Path::new("/var/lib/virtkube/pools").join(&self.pool)
    }

    /// (plural, object) in the files' order, as a user would create them.
    fn objects(&self) -> Vec<(String, Value)> {
        let tag = self.tag;
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
                .replace("name: images", &format!("name: {}", self.pool))
                .replace("pool: images", &format!("pool: {}", self.pool))
                .replace("/pools/images", &format!("/pools/{}", self.pool))
                .replace("vk-nat", &format!("ag{tag}-nat"))
                .replace("vk-isolated", &format!("ag{tag}-isolated"))
                .replace("virbr-vk0", &format!("virbr-ag{tag}"))
                .replace("192.168.150.", &format!("192.168.{}.", 160 + tag))
                .replace("10.150.0.", &format!("10.{}.0.", 160 + tag))
                .replace("namespace: default", &format!("namespace: {}", self.ns));
            let manifests = virtkube_crds::manifest::Reader::new()
                .parse(&file, &text)
                .unwrap_or_else(|e| panic!("{}: {e:?}", file.display()));
            for m in manifests {
                use virtkube_crds::manifest::Object;
                let (plural, value) = match &m.object {
                    Object::StoragePool(o) => ("storagepools", serde_json::to_value(o).unwrap()),
                    Object::Network(o) => ("networks", serde_json::to_value(o).unwrap()),
                    Object::Volume(o) => ("volumes", serde_json::to_value(o).unwrap()),
                    Object::Domain(o) => ("domains", serde_json::to_value(o).unwrap()),
                };
                objects.push((plural.to_string(), value));
            }
        }
        objects
    }

    /// Creates every example as a user would and binds every Domain and Volume to `node` as
    /// the cluster controller would (the examples name no node); returns (plural, ns, name).
    async fn create_bound(&self, c: &Cluster, node: &str) -> Vec<(String, String, String)> {
        let mut names = Vec::new();
        for (plural, mut obj) in self.objects() {
            // The API server assigns these.
            for field in ["uid", "generation", "resourceVersion", "finalizers"] {
                obj["metadata"].as_object_mut().map(|m| m.remove(field));
            }
            let ns = obj["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let name = obj["metadata"]["name"].as_str().unwrap().to_string();
            c.api.create(&plural, obj).unwrap();
            match plural.as_str() {
                "domains" => bind_domain(&c.client, &ns, &name, node).await,
                "volumes" => bind_volume(&c.api, &ns, &name, node).await,
                _ => {}
            }
            names.push((plural, ns, name));
        }
        names
    }

    /// Removes from `uri` whatever the examples made (leftovers of an earlier run, too).
    fn clean(&self, uri: &str) {
        let run = |args: &[&str]| {
            let _ = Command::new("virsh")
                .args(["-q", "-c", uri])
                .args(args)
                .output();
        };
        for d in ["web", "worker", "spare"] {
            let d = format!("{}.{d}", self.ns);
            run(&["destroy", &d]);
            run(&["undefine", &d, "--nvram"]);
        }
        for v in ["scratch", "web-root", "base"] {
            run(&[
                "vol-delete",
                &format!("{}.{v}", self.ns),
                "--pool",
                &self.pool,
            ]);
        }
        let nat = format!("ag{}-nat", self.tag);
        let isolated = format!("ag{}-isolated", self.tag);
        for (what, name) in [("pool", &self.pool), ("net", &nat), ("net", &isolated)] {
            run(&[&format!("{what}-destroy"), name]);
            run(&[&format!("{what}-undefine"), name]);
        }
        let _ = std::fs::remove_dir_all(self.pool_dir());
    }
}

/// Cleans the examples off node A when dropped (declare it before the Cluster, so that the
/// agent is stopped first).
struct CleanExamples<'a>(&'a Examples, String);

impl Drop for CleanExamples<'_> {
    fn drop(&mut self) {
        self.0.clean(&self.1);
    }
}

fn all_ready(c: &Cluster, names: &[(String, String, String)]) -> bool {
    names
        .iter()
        .all(|(p, ns, n)| c.api.get(p, ns, n).is_some_and(|o| is_ready(&o)))
}

fn not_ready(c: &Cluster, names: &[(String, String, String)]) -> String {
    names
        .iter()
        .filter_map(|(p, ns, n)| {
            let o = c.api.get(p, ns, n).unwrap_or(Value::Null);
            (!is_ready(&o)).then(|| format!("{p}/{n}: {}", o["status"]["conditions"]))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs private libvirtd: scripts/libvirt-nodes.sh up, then --run-ignored"]
async fn the_examples_converge_on_real_qemu_through_the_agent_process() {
    // The clean-up guard first, so that it runs after the Cluster has stopped the agent.
    let ns = format!("agentexa{}", std::process::id() % 100_000);
    let uri = node_a_uri();
    let examples = Examples::new(1, &ns);
    examples.clean(&uri);
    let _clean = CleanExamples(&examples, uri.clone());
    let mut c = Cluster::new().await;
    assert_eq!(c.namespace("agentexa"), ns);
    c.start_agent("node-a");
    c.wait_ready().await;
    let names = examples.create_bound(&c, "node-a").await;
    assert!(names.len() >= 9, "{names:?}");

    let started = Instant::now();
    let deadline = started + Duration::from_secs(150);
    while !all_ready(&c, &names) {
        assert!(
            Instant::now() < deadline,
            "not Ready after {:?}:\n{}\n{}",
            started.elapsed(),
            not_ready(&c, &names),
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!(
        "examples converged through the agent in {:?}",
        started.elapsed()
    );
    let guest = |n: &str| format!("{ns}.{n}");
    assert_eq!(virsh(&uri, &["domstate", &guest("web")]), "running");
    assert_eq!(virsh(&uri, &["domstate", &guest("worker")]), "paused");
    assert_eq!(virsh(&uri, &["domstate", &guest("spare")]), "shut off");
    let pin = virsh(&uri, &["vcpupin", &guest("web"), "--vcpu", "1"]);
    assert!(
        pin.trim_end().ends_with('1'),
        "vcpu 1 pinned to host CPU 1: {pin}"
    );
    assert!(virsh(&uri, &["dominfo", &guest("web")]).contains("Autostart:      enable"));
    let reasons: Vec<String> = agent_support::events(&c.api)
        .into_iter()
        .map(|e| e.1)
        .collect();
    for reason in [
        "Defined",
        "Started",
        "Paused",
        "VolumeCreated",
        "AutostartSet",
    ] {
        assert!(
            reasons.iter().any(|e| e == reason),
            "{reason} missing: {reasons:?}"
        );
    }
    c.shutdown().await;
}

/// The e2e suite's scenarios, with an in-memory API server in place of a cluster: the
/// examples applied (and bound to the agent's node as the controller would), Ready, spec
/// changes (pinning, resume/pause, autostart), a guest destroyed with virsh and repaired,
/// everything deleted through the finalizers, libvirt clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs private libvirtd: scripts/libvirt-nodes.sh up, then --run-ignored"]
async fn e2e_scenarios_on_real_qemu_with_an_in_memory_api_server() {
    // The clean-up guard first, so that it runs after the Cluster has stopped the agent.
    let ns = format!("agentexb{}", std::process::id() % 100_000);
    let uri = node_a_uri();
    let examples = Examples::new(2, &ns);
    examples.clean(&uri);
    let _clean = CleanExamples(&examples, uri.clone());
    let mut c = Cluster::new().await;
    assert_eq!(c.namespace("agentexb"), ns);
    c.start_agent("node-a");
    c.wait_ready().await;
    let names = examples.create_bound(&c, "node-a").await;
    let guest = |n: &str| format!("{ns}.{n}");

    let started = Instant::now();
    let deadline = started + Duration::from_secs(150);
    while !all_ready(&c, &names) {
        assert!(
            Instant::now() < deadline,
            "not all Ready:\n{}\n{}",
            not_ready(&c, &names),
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("examples Ready in {:?}", started.elapsed());
    let get = |n: &str| c.api.get("domains", &ns, n).unwrap();
    assert_eq!(get("web")["status"]["phase"], "Running");
    assert_eq!(get("worker")["status"]["phase"], "Paused");
    assert_eq!(get("spare")["status"]["phase"], "Stopped");
    assert_eq!(virsh(&uri, &["domstate", &guest("web")]), "running");

    // Pinning.
    c.api
        .edit_spec("domains", &ns, "web", |s| {
            s["cpu"]["pinning"] = json!([{"vcpu": 0, "cpuset": "1"}, {"vcpu": 1, "cpuset": "0"}]);
        })
        .unwrap();
    c.until(60, "pinning in status", || {
        let web = get("web");
        is_ready(&web)
            && web["status"]["vcpuAffinity"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x["vcpu"] == 0 && x["cpuset"] == "1"))
    })
    .await;
    let pin = virsh(&uri, &["vcpupin", &guest("web"), "--vcpu", "0"]);
    assert!(pin.trim_end().ends_with('1'), "{pin}");
    // Resume, then pause again.
    c.api
        .edit_spec("domains", &ns, "worker", |s| s["state"] = json!("Running"))
        .unwrap();
    c.until(60, "worker running", || {
        virsh(&uri, &["domstate", &guest("worker")]) == "running"
    })
    .await;
    c.api
        .edit_spec("domains", &ns, "worker", |s| s["state"] = json!("Paused"))
        .unwrap();
    c.until(60, "worker paused", || {
        virsh(&uri, &["domstate", &guest("worker")]) == "paused"
    })
    .await;
    // Autostart off.
    c.api
        .edit_spec("domains", &ns, "web", |s| s["autostart"] = json!(false))
        .unwrap();
    c.until(60, "autostart off", || {
        let web = get("web");
        is_ready(&web)
            && web["status"]["autostart"] == false
            && virsh(&uri, &["dominfo", &guest("web")]).contains("Autostart:      disable")
    })
    .await;
    // Drift: destroyed behind the agent's back, repaired within seconds, with an event.
    virsh(&uri, &["destroy", &guest("web")]);
    let destroyed = Instant::now();
    c.until(10, "web running again", || {
        virsh(&uri, &["domstate", &guest("web")]) == "running"
    })
    .await;
    println!("virsh destroy repaired in {:?}", destroyed.elapsed());
    let repaired = || {
        agent_support::events(&c.api).iter().any(|e| {
            e.0 == "web"
                && e.1 == "Started"
                && e.2.starts_with("Repair")
                && e.3.contains("destroyed")
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !repaired() {
        assert!(
            Instant::now() < deadline,
            "no Repair event: {:#?}",
            agent_support::events(&c.api)
                .iter()
                .filter(|e| e.0 == "web")
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Delete everything, in any order; the finalizers order the work.
    for (p, ns, n) in names.iter().rev() {
        c.api.delete(p, ns, n).unwrap();
    }
    c.until(120, "every object gone", || {
        ["domains", "volumes", "networks", "storagepools"]
            .iter()
            .all(|p| c.api.count(p) == 0)
    })
    .await;
    let list = |what: &str| virsh(&uri, &[what, "--all", "--name"]);
    assert!(
        !list("list").contains(&format!("{ns}.")),
        "{}",
        list("list")
    );
    assert!(!list("net-list").contains("ag2-"), "{}", list("net-list"));
    assert!(
        !list("pool-list").contains(&examples.pool),
        "{}",
        list("pool-list")
    );
    let agent = c.take_agent("node-a");
    let log = agent.log.clone();
    assert!(
        agent.terminate(15).await,
        "the agent exits with success on SIGTERM:\n{}",
        process_support::tail(&log, 30)
    );
    // The Retain'ed base image stays on disk, as its policy says.
    let base = examples.pool_dir().join(format!("{ns}.base"));
    assert!(
        base.exists(),
        "reclaimPolicy Retain keeps the image: {}",
        base.display()
    );
    c.shutdown().await;
}
