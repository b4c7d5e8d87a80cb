//! `virtkube plan --kubeconfig` against the in-memory API server, with every status written
//! by real `virtkube agent` processes (two nodes, each on its own `test:///default`): each
//! kind of change (create, live change, restart pending, live and cold moves, forbidden by
//! the planner, by the agent's validation and by the API server's transition rules, delete
//! with `--prune`), the JSON schema, the exit codes, the kubectl plugin, and the read-only
//! role in `gitops/ci/plan-reader.yaml` (enough, and nothing more than needed).
//!
//! The placement claim (`status.nodeName` and the routing label) is written by the test, as
//! the cluster controller would bind each Domain; everything else in status is the agents'.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};
use virtkube_crds::Domain;

mod agent_support;

use agent_support::fake_api::{KillOnDrop, agent_with, free_port, sigterm};

const NS: &str = "gitops";
const CI_USER: &str = "system:serviceaccount:virtkube-ci:virtkube-plan";
const NOBODY: &str = "system:serviceaccount:virtkube-ci:nobody";

async fn eventually(secs: u64, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
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

fn pool(path: &str) -> Value {
    json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "StoragePool",
           "metadata": {"name": "planpool"},
           "spec": {"type": "dir", "target": {"path": path}}})
}

fn network(mode: &str) -> Value {
    json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Network",
           "metadata": {"name": "plannet"},
           "spec": {"mode": mode, "ip": {"address": "10.155.0.1", "prefix": 24}}})
}

fn volume(name: &str, capacity: &str, node: &str) -> Value {
    json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Volume",
           "metadata": {"name": name, "namespace": NS},
           "spec": {"pool": "planpool", "capacity": capacity, "nodeName": node,
                    "reclaimPolicy": "Delete"}})
}

fn domain(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Domain",
           "metadata": {"name": name, "namespace": NS}, "spec": spec})
}

fn web(vcpus: u32, pin: &str, machine: Option<&str>) -> Value {
    let mut spec = json!({"nodeName": "node-a", "runStrategy": "Always",
        "cpu": {"vcpus": vcpus, "maxVcpus": 4, "pinning": [{"vcpu": 0, "cpuset": pin}]},
        "memory": {"size": "64Mi", "max": "128Mi"},
        "disks": [{"name": "data", "volume": "data"}],
        "interfaces": [{"name": "eth0", "network": "plannet"}]});
    if let Some(m) = machine {
        spec["os"] = json!({"machine": m});
    }
    domain("web", spec)
}

fn simple(name: &str, node: Option<&str>, strategy: &str) -> Value {
    let mut spec = json!({"runStrategy": strategy, "memory": {"size": "64Mi"}});
    if let Some(n) = node {
        spec["nodeName"] = json!(n);
    }
    domain(name, spec)
}

/// `db` with a change that needs a restart, and `updatePolicy: Restart`: restarted now.
fn restart_now() -> Value {
    let mut db = simple("db", Some("node-a"), "Always");
    db["spec"]["updatePolicy"] = json!("Restart");
    db["spec"]["os"] = json!({"machine": "pc"});
    db
}

fn write_manifests(dir: &Path, objects: &[Value]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let text = objects
        .iter()
        .map(|o| serde_json::to_string(o).unwrap())
        .collect::<Vec<_>>()
        .join("\n---\n");
    let file = dir.join("manifests.yaml");
    std::fs::write(&file, text).unwrap();
    dir.to_path_buf()
}

fn run(program: &Path, args: &[&str], kubeconfig: Option<&Path>) -> Output {
    let mut cmd = Command::new(program);
    cmd.args(args).env_remove("KUBECONFIG");
    if let Some(k) = kubeconfig {
        cmd.env("KUBECONFIG", k);
    }
    cmd.output().expect("virtkube runs")
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
}

fn change<'a>(report: &'a Value, kind: &str, name: &str) -> &'a Value {
    report["changes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["kind"] == kind && c["name"] == name)
        .unwrap_or_else(|| panic!("no change for {kind} {name} in {report:#}"))
}

fn notices<'a>(report: &'a Value, kind: &str, name: &str) -> Vec<&'a Value> {
    report["notices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["kind"] == kind && n["name"] == name)
        .collect()
}

fn field<'a>(entry: &'a Value, name: &str) -> Option<&'a Value> {
    entry["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(std::iter::once(entry))
        .flat_map(|s| s["fields"].as_array().into_iter().flatten())
        .find(|f| f["field"] == name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_plan_from_real_agent_status_covers_every_kind_of_change() {
    let rbac = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../gitops/ci/plan-reader.yaml"),
    )
    .unwrap();
    let mut authorizer = virtkube_testapi::Authorizer::new(&[virtkube_testapi::ADMIN]);
    assert_eq!(
        authorizer.load_yaml(&[rbac]).unwrap(),
        vec![CI_USER.to_string()]
    );
    let api = virtkube_testapi::TestApi::start_with(virtkube_testapi::Config {
        authorizer: Some(authorizer),
        ..virtkube_testapi::Config::default()
    })
    .await
    .unwrap();
    api.create_namespace(NS).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig, &[virtkube_testapi::ADMIN, CI_USER, NOBODY])
        .unwrap();
    let admin_config = dir.path().join("admin-kubeconfig");
    api.write_kubeconfig(&admin_config, &[virtkube_testapi::ADMIN])
        .unwrap();

    // Two nodes, each a real agent on its own in-process libvirt.
    let mut agents = Vec::new();
    for node in ["node-a", "node-b"] {
        let log = dir.path().join(format!("{node}.log"));
        let child = agent_with(
            &admin_config,
            free_port(),
            "test:///default",
            &["--node-name", node, "--shutdown-timeout-seconds", "1"],
            Some(&log),
        );
        agents.push((KillOnDrop(child.id()), child, log));
    }
    let logs = || {
        agents
            .iter()
            .map(|(_, _, l)| std::fs::read_to_string(l).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    };

    // The cluster as `kubectl apply` left it, each Domain bound as the controller binds it.
    let pool_path = "/var/lib/virtkube/pools/planpool";
    api.create("storagepools", pool(pool_path)).unwrap();
    api.create("networks", network("isolated")).unwrap();
    api.create("volumes", volume("data", "1Gi", "node-a"))
        .unwrap();
    api.create("domains", web(1, "0", None)).unwrap();
    api.create("domains", simple("api", Some("node-a"), "Always"))
        .unwrap();
    api.create("domains", simple("cold", Some("node-a"), "Halted"))
        .unwrap();
    api.create("domains", simple("old", Some("node-a"), "Always"))
        .unwrap();
    api.create("domains", simple("db", Some("node-a"), "Always"))
        .unwrap();
    let client = api.client(virtkube_testapi::ADMIN).await.unwrap();
    let domains: Api<Domain> = Api::namespaced(client, NS);
    api.patch_labels(
        "volumes",
        NS,
        "data",
        &[("node.virtkube.io/node-a", Some("holder"))],
    )
    .unwrap();
    Api::<virtkube_crds::Volume>::namespaced(domains.clone().into_client(), NS)
        .patch_status(
            "data",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"nodeName": "node-a"}})),
        )
        .await
        .unwrap();
    for name in ["web", "api", "cold", "old", "db"] {
        api.patch_labels(
            "domains",
            NS,
            name,
            &[("node.virtkube.io/node-a", Some("holder"))],
        )
        .unwrap();
        domains
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"nodeName": "node-a"}})),
            )
            .await
            .unwrap();
    }
    eventually(90, "every object Ready, as the agents report it", || {
        ["web", "api", "cold", "old", "db"]
            .iter()
            .all(|d| ready(&api.get("domains", NS, d)))
            && ready(&api.get("volumes", NS, "data"))
            && ready(&api.get("networks", "", "plannet"))
            && ready(&api.get("storagepools", "", "planpool"))
    })
    .await;
    let web_status = api.get("domains", NS, "web").unwrap()["status"].clone();
    assert_eq!(web_status["phase"], "Running", "{web_status:#}");
    assert_eq!(
        web_status["vcpuAffinity"][0]["cpuset"], "0",
        "{web_status:#}"
    );
    assert_eq!(
        api.get("domains", NS, "cold").unwrap()["status"]["phase"],
        "Stopped"
    );

    let bin = PathBuf::from(env!("CARGO_BIN_EXE_virtkube"));
    let plan = |files: &Path, extra: &[&str]| {
        let mut args = vec![
            "plan",
            "-f",
            files.to_str().unwrap(),
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--context",
            CI_USER,
        ];
        args.extend_from_slice(extra);
        run(&bin, &args, None)
    };
    let cluster_as_is = [
        pool(pool_path),
        network("isolated"),
        volume("data", "1Gi", "node-a"),
        web(1, "0", None),
        simple("api", Some("node-a"), "Always"),
        simple("cold", Some("node-a"), "Halted"),
        simple("old", Some("node-a"), "Always"),
        simple("db", Some("node-a"), "Always"),
    ];

    // The manifests as applied: nothing to do, exit 0.
    let same = write_manifests(&dir.path().join("same"), &cluster_as_is);
    let out = plan(&same, &[]);
    assert_eq!(out.status.code(), Some(0), "{}\n{}", text(&out), logs());
    assert!(text(&out).contains("No changes"), "{}", text(&out));
    assert!(
        text(&out).contains("Cluster plan against context `system:serviceaccount:virtkube-ci:virtkube-plan` (2 nodes: node-a, node-b)"),
        "{}",
        text(&out)
    );

    // Every kind of change at once.
    let changed = write_manifests(
        &dir.path().join("changed"),
        &[
            pool(pool_path),
            network("nat"),                     // forbidden: the mode is immutable
            volume("data", "512Mi", "node-a"),  // forbidden: shrinking
            volume("scratch", "1Gi", "node-b"), // create on node-b
            web(2, "1", Some("pc")),            // live: vCPUs, pin; restart: machine
            simple("api", Some("node-b"), "Always"), // live migration
            simple("cold", Some("node-b"), "Halted"), // cold move
            simple("fresh", None, "Always"),    // create, the controller places it
            restart_now(),
            // refused by the agent's validation (memory.max below memory.size), which
            // neither the schema nor CEL can say
            domain("bad", json!({"memory": {"size": "128Mi", "max": "64Mi"}})),
        ],
    );
    let out = plan(&changed, &["-o", "json"]);
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(&out)));
    assert_eq!(out.status.code(), Some(1), "{report:#}");
    assert_eq!(report["apiVersion"], "virtkube.io/v1alpha1");
    assert_eq!(report["kind"], "PlanReport");
    assert_eq!(report["exitCode"], 1);
    assert_eq!(
        report["target"],
        json!({"type": "cluster", "name": CI_USER, "nodes": ["node-a", "node-b"]})
    );

    let web_change = change(&report, "Domain", "web");
    assert_eq!(web_change["effect"], "changeLive", "{web_change:#}");
    assert_eq!(web_change["namespace"], NS);
    assert_eq!(web_change["node"], "node-a");
    let vcpus = field(web_change, "cpu.vcpus").unwrap();
    assert_eq!(
        (vcpus["before"].as_str(), vcpus["after"].as_str()),
        (Some("1"), Some("2"))
    );
    let pin = field(web_change, "cpu.pinning[vcpu=0].cpuset").unwrap();
    assert_eq!(
        (pin["before"].as_str(), pin["after"].as_str()),
        (Some("0"), Some("1"))
    );
    let pending = notices(&report, "Domain", "web");
    let machine = pending
        .iter()
        .find(|n| n["type"] == "restartPending")
        .unwrap_or_else(|| panic!("no restart notice: {report:#}"));
    assert_eq!(field(machine, "os.machine").unwrap()["after"], "pc");

    let api_move = change(&report, "Domain", "api");
    assert_eq!(api_move["effect"], "move");
    assert_eq!(
        api_move["move"],
        json!({"from": "node-a", "to": "node-b", "mode": "Live"})
    );
    assert_eq!(api_move["steps"][0]["action"], "live-migrate to node-b");
    let cold = change(&report, "Domain", "cold");
    assert_eq!(
        cold["move"],
        json!({"from": "node-a", "to": "node-b", "mode": "Cold"}),
        "{cold:#}"
    );

    let scratch = change(&report, "Volume", "scratch");
    assert_eq!(
        (scratch["effect"].as_str(), scratch["node"].as_str()),
        (Some("create"), Some("node-b"))
    );
    let fresh = change(&report, "Domain", "fresh");
    assert_eq!(fresh["effect"], "create");
    assert_eq!(fresh["node"], "(unscheduled)");

    let shrink = notices(&report, "Volume", "data");
    assert!(
        shrink.iter().any(|n| n["type"] == "forbidden"
            && n["error"] == true
            && field(n, "capacity").is_some_and(|f| f["before"] == "1Gi" && f["after"] == "512Mi")),
        "{report:#}"
    );
    let mode = notices(&report, "Network", "plannet");
    assert!(
        mode.iter().any(|n| n["type"] == "forbidden"
            && n["message"]
                .as_str()
                .is_some_and(|m| m.contains("transition rule") && m.contains("spec"))),
        "{report:#}"
    );
    let bad = notices(&report, "Domain", "bad");
    assert!(
        bad.iter().any(|n| n["type"] == "forbidden"
            && n["message"]
                .as_str()
                .is_some_and(|m| m.contains("SpecValid=False") && m.contains("spec.memory.max"))),
        "{report:#}"
    );
    // Without --prune, what the manifests leave out stays.
    assert!(
        report["changes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["name"] != "old")
    );
    assert_eq!(report["summary"]["move"], 2);
    assert_eq!(report["summary"]["create"], 2);
    assert_eq!(report["summary"]["changeLive"], 1);
    let db = change(&report, "Domain", "db");
    assert_eq!(db["effect"], "restart", "{db:#}");
    assert_eq!(db["steps"][0]["mark"], "!");
    assert_eq!(field(db, "os.machine").unwrap()["after"], "pc");
    assert_eq!(report["summary"]["restart"], 1);
    assert_eq!(report["summary"]["errors"], 3);

    // The same plan for people: marks, nodes, field-level before → after.
    let out = plan(&changed, &[]);
    let human = text(&out);
    assert_eq!(out.status.code(), Some(1), "{human}");
    for line in [
        "~ Domain gitops/web  (node node-a)",
        "        cpu.vcpus: 1 → 2",
        "~ Domain gitops/api  (node node-a)",
        "    ~ live-migrate to node-b: spec.nodeName changed while it runs: live migration",
        "+ Domain gitops/fresh  (node (unscheduled))",
        "! Domain gitops/web  (node node-a): needs restart:",
        "x Volume gitops/data  (node node-a): forbidden: shrinking a volume",
    ] {
        assert!(human.contains(line), "{line:?} missing from:\n{human}");
    }

    // Only changes allowed: exit 2; --prune adds the deletion of what the manifests left out.
    let mut allowed = cluster_as_is.to_vec();
    allowed[3] = web(2, "0", None);
    allowed.retain(|o| o["metadata"]["name"] != "old");
    let live = write_manifests(&dir.path().join("live"), &allowed);
    let out = plan(&live, &["-o", "json"]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(2), "{report:#}");
    assert_eq!(report["summary"]["delete"], 0);
    let out = plan(&live, &["-o", "json", "--prune"]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(2), "{report:#}");
    let old = change(&report, "Domain", "old");
    assert_eq!(
        (old["effect"].as_str(), old["node"].as_str()),
        (Some("delete"), Some("node-a"))
    );
    assert_eq!(report["summary"]["delete"], 1, "{report:#}");

    // A PR bot consumes the JSON: the example step in gitops/ci/ turns it into a comment.
    let comment_script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../gitops/ci/plan-comment");
    let json_file = dir.path().join("plan.json");
    std::fs::write(&json_file, &out.stdout).unwrap();
    let comment = Command::new(&comment_script)
        .arg(&json_file)
        .output()
        .unwrap();
    let md = String::from_utf8_lossy(&comment.stdout);
    assert!(
        comment.status.success(),
        "{md}{}",
        String::from_utf8_lossy(&comment.stderr)
    );
    assert!(
        md.contains("| Domain | gitops/old | node-a | delete |"),
        "{md}"
    );
    assert!(
        md.contains("| Domain | gitops/web | node-a | change live |"),
        "{md}"
    );

    // As a kubectl plugin: `kubectl virtkube plan` runs `kubectl-virtkube plan`, which plans
    // against the current context of KUBECONFIG by default.
    let plugin = dir.path().join("bin/kubectl-virtkube");
    std::fs::create_dir_all(plugin.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(&bin, &plugin).unwrap();
    let ci_config = dir.path().join("ci-kubeconfig");
    api.write_kubeconfig(&ci_config, &[CI_USER]).unwrap();
    let out = run(
        &plugin,
        &["plan", "-f", same.to_str().unwrap()],
        Some(&ci_config),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("No changes"), "{}", text(&out));
    let out = run(&plugin, &["plan", "--help"], None);
    assert!(
        text(&out).contains("kubectl virtkube plan"),
        "{}",
        text(&out)
    );

    // The read-only role is exactly what the plan needs: one list per kind, nothing else.
    let requests: std::collections::BTreeSet<(String, String)> = api
        .requests()
        .into_iter()
        .filter(|r| r.identity == CI_USER && !r.resource.is_empty())
        .map(|r| (r.verb, r.resource))
        .collect();
    let expected: std::collections::BTreeSet<(String, String)> = [
        "domains",
        "volumes",
        "networks",
        "storagepools",
        "hypervisornodes",
    ]
    .iter()
    .map(|r| ("list".to_string(), r.to_string()))
    .collect();
    assert_eq!(requests, expected);
    // Without it, the plan says which role to bind.
    let out = plan_as(&bin, &same, &kubeconfig, NOBODY);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("gitops/ci/plan-reader.yaml"),
        "{}",
        text(&out)
    );

    for (_, child, _) in &agents {
        sigterm(child.id());
    }
    for (_, mut child, _) in agents {
        let status = tokio::task::spawn_blocking(move || child.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success());
    }
}

fn plan_as(bin: &Path, files: &Path, kubeconfig: &Path, context: &str) -> Output {
    run(
        bin,
        &[
            "plan",
            "-f",
            files.to_str().unwrap(),
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--context",
            context,
        ],
        None,
    )
}
