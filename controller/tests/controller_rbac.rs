//! The controller's API calls against the chart's RBAC (`charts/virtkube/rbac/controller.yaml`,
//! the one place its rules are written), both ways: the whole controller (start-up CRD check,
//! Lease election, watch caches, passes) runs against the in-memory API server enforcing
//! exactly those rules, through binding, volume binding, a drain, a silent node, finalizers of
//! unbound objects and lost compare-and-swaps; no request it made may be refused, and every
//! grant must be used by a request (or be listed in [`PROCESS_LEVEL`] with where it is used).

mod controller_support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use controller_support::*;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, Patch, PatchParams};
use serde::Deserialize;
use serde_json::json;
use virtkube::cluster::leader::LeaseConfig;
use virtkube::cluster::metrics::Metrics;
use virtkube::cluster::settings::Settings;
use virtkube::cluster::{Config, spawn};
use virtkube_testapi::{Answer, Authorizer, PolicyRule, RequestInfo, TestApi};

/// The controller's ServiceAccount in a release installed in namespace `virtkube`.
const USER: &str = "system:serviceaccount:virtkube:virtkube-controller";
const LEASE_NAMESPACE: &str = "virtkube";

/// Grants no scenario here exercises, with where the controller uses them.
const PROCESS_LEVEL: &[(&str, &str, &str, &str)] = &[(
    "events.k8s.io",
    "events",
    "patch",
    "the Recorder: the same event again within its series is a patch",
)];

/// (API group, resource[/subresource], verb).
type Grant = (String, String, String);

#[derive(Deserialize)]
struct Rules {
    #[serde(rename = "clusterRules")]
    cluster_rules: Vec<Rule>,
    #[serde(rename = "namespaceRules")]
    namespace_rules: Vec<Rule>,
}

#[derive(Deserialize)]
struct Rule {
    #[serde(rename = "apiGroups")]
    api_groups: Vec<String>,
    resources: Vec<String>,
    verbs: Vec<String>,
}

impl Rule {
    fn policy(&self) -> PolicyRule {
        PolicyRule {
            verbs: self.verbs.clone(),
            api_groups: self.api_groups.clone(),
            resources: self.resources.clone(),
            resource_names: Vec::new(),
        }
    }

    fn grants(&self) -> Vec<Grant> {
        let mut out = Vec::new();
        for g in &self.api_groups {
            for r in &self.resources {
                for v in &self.verbs {
                    assert!(
                        ![g, r, v].iter().any(|s| s.as_str() == "*"),
                        "wildcard in {g}/{r}/{v}"
                    );
                    out.push((g.clone(), r.clone(), v.clone()));
                }
            }
        }
        out
    }
}

fn chart_rules() -> Rules {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../charts/virtkube/rbac/controller.yaml"
    );
    serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn authorizer(rules: &Rules) -> Authorizer {
    let mut a = Authorizer::new(&["admin"]);
    a.grant(
        USER,
        None,
        rules.cluster_rules.iter().map(Rule::policy).collect(),
    );
    a.grant(
        USER,
        Some(LEASE_NAMESPACE),
        rules.namespace_rules.iter().map(Rule::policy).collect(),
    );
    a
}

#[tokio::test]
async fn the_chart_grants_the_controller_exactly_what_it_calls() {
    let rules = chart_rules();
    let api = TestApi::start_with(virtkube_testapi::Config {
        authorizer: Some(authorizer(&rules)),
        ..virtkube_testapi::Config::default()
    })
    .await
    .unwrap();
    let admin = api.client("admin").await.unwrap();
    api.create_namespace(LEASE_NAMESPACE).unwrap();
    let now = Timestamp::now();
    let beat = now.to_string();
    let silent = now
        .checked_sub(SignedDuration::from_secs(600))
        .unwrap()
        .to_string();
    for (name, heartbeat) in [("node-a", &beat), ("node-b", &beat), ("node-c", &silent)] {
        api.create("hypervisornodes", hvn_meta(name)).unwrap();
        agent_publishes(&admin, name, hvn_status("32Gi", 8, heartbeat)).await;
    }
    api.create("nodes", k8s_node("node-b", true, json!([])))
        .unwrap();
    // node-gone left the cluster (no Node, no HypervisorNode) with its finalizer and status
    // entry on a Network and a StoragePool: the controller releases them on its behalf.
    api.create("networks", json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Network", "metadata": {"name": "vk-nat", "finalizers": ["node.virtkube.io/node-gone"]}, "spec": {"mode": "isolated"}})).unwrap();
    Api::<virtkube_crds::Network>::all(admin.clone())
        .patch_status(
            "vk-nat",
            &PatchParams::apply("virtkube-agent.node-gone").force(),
            &Patch::Apply(
                &json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Network",
                "status": {"nodes": [{"nodeName": "node-gone", "active": true}]}}),
            ),
        )
        .await
        .unwrap();
    for (name, shared) in [("local", false), ("shared", true)] {
        api.create("storagepools", json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "StoragePool", "metadata": {"name": name, "finalizers": ["node.virtkube.io/node-gone", "node.virtkube.io/node-a"]}, "spec": {"type": "dir", "target": {"path": "/p"}, "shared": shared}})).unwrap();
        let status = pool(name, shared, &["node-a", "node-b"])["status"].clone();
        Api::<virtkube_crds::StoragePool>::all(admin.clone())
            .patch_status(
                name,
                &PatchParams::apply("virtkube-agent.x").force(),
                &Patch::Apply(&json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "StoragePool", "status": status})),
            )
            .await
            .unwrap();
    }
    Api::<virtkube_crds::StoragePool>::all(admin.clone())
        .patch_status(
            "local",
            &PatchParams::apply("virtkube-agent.node-gone").force(),
            &Patch::Apply(
                &json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "StoragePool",
                "status": {"nodes": [{"nodeName": "node-gone", "state": "Running"}]}}),
            ),
        )
        .await
        .unwrap();
    api.create("volumes", volume("default", "data", "local"))
        .unwrap();
    api.create("volumes", volume("default", "root", "shared"))
        .unwrap();
    api.create(
        "volumes",
        with(
            volume("default", "old", "local"),
            json!({"metadata": {"finalizers": ["virtkube.io/cleanup"]}}),
        ),
    )
    .unwrap();
    api.delete("volumes", "default", "old").unwrap();
    let create = |v: serde_json::Value| {
        let mut v = v;
        for k in ["uid", "resourceVersion", "generation"] {
            v["metadata"].as_object_mut().unwrap().remove(k);
        }
        api.create("domains", v).unwrap();
    };
    create(with(
        domain("default", "new", "1Gi"),
        json!({"spec": {"disks": [{"name": "d", "volume": "data"}]}}),
    ));
    create(with(
        domain("default", "drained", "1Gi"),
        json!({"spec": {"disks": [{"name": "r", "volume": "root"}]}}),
    ));
    create(domain("default", "lost", "1Gi"));
    create(with(
        domain("default", "gone", "1Gi"),
        json!({"metadata": {"finalizers": ["virtkube.io/cleanup"]}}),
    ));
    api.delete("domains", "default", "gone").unwrap();
    agent_writes_domain(
        &admin,
        "default",
        "drained",
        json!({"nodeName": "node-b", "phase": "Running"}),
    )
    .await;
    agent_writes_domain(
        &admin,
        "default",
        "lost",
        json!({"nodeName": "node-c", "phase": "Running"}),
    )
    .await;
    // One lost compare-and-swap of each kind: the controller reads the object again.
    api.inject(1, Answer::Conflict, |r: &RequestInfo| {
        r.identity == USER
            && r.resource == "domains"
            && r.subresource == "status"
            && r.name == "new"
    });
    api.inject(1, Answer::Conflict, |r: &RequestInfo| {
        r.identity == USER && r.resource == "volumes" && r.subresource == "status"
    });

    let client = api.client(USER).await.unwrap();
    virtkube::agent::check_crds(&client).await.unwrap();
    let config = Config {
        settings: Settings::default(),
        lease: LeaseConfig {
            namespace: LEASE_NAMESPACE.into(),
            name: "virtkube-controller".into(),
            identity: "virtkube-controller-0".into(),
            duration: Duration::from_secs(3),
            renew_deadline: Duration::from_secs(2),
            retry_period: Duration::from_millis(200),
        },
        resync: Duration::from_secs(1),
    };
    let controller = spawn(client, config, Arc::new(Metrics::default()));
    let get = |r: &str, name: &str| api.get(r, "default", name);
    eventually(20, "everything decided", || {
        get("domains", "new").is_some_and(|d| d["status"]["nodeName"] == "node-a")
            && get("volumes", "data")
                .is_some_and(|v| v["metadata"]["labels"]["node.virtkube.io/node-a"] == "holder")
            && get("domains", "drained")
                .is_some_and(|d| d["status"]["migration"]["state"] == "Pending")
            && get("domains", "lost").is_some_and(|d| condition(&d, "NodeUnreachable").is_some())
            && get("domains", "gone").is_none()
            && get("volumes", "old").is_none()
            && api
                .get("hypervisornodes", "", "node-c")
                .is_some_and(|n| condition(&n, "Ready").is_some_and(|c| c["status"] == "Unknown"))
            && api
                .get("hypervisornodes", "", "node-b")
                .is_some_and(|n| condition(&n, "Draining").is_some())
            && api.get("networks", "", "vk-nat").is_some_and(|n| {
                n["metadata"]["finalizers"]
                    .as_array()
                    .is_none_or(|f| f.is_empty())
                    && n["status"]["nodes"]
                        .as_array()
                        .is_none_or(|e| e.iter().all(|e| e["nodeName"] != "node-gone"))
            })
            && api.get("storagepools", "", "local").is_some_and(|p| {
                p["metadata"]["finalizers"] == json!(["node.virtkube.io/node-a"])
                    && p["status"]["nodes"]
                        .as_array()
                        .is_some_and(|e| e.iter().all(|e| e["nodeName"] != "node-gone"))
            })
    })
    .await;
    controller.stop().await;

    let mine: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.identity == USER && !r.resource.is_empty())
        .collect();
    let check = authorizer(&rules);
    let refused: Vec<String> = mine
        .iter()
        .filter(|r| {
            let info = RequestInfo {
                is_resource: true,
                verb: r.verb.clone(),
                group: r.group.clone(),
                version: String::new(),
                resource: r.resource.clone(),
                subresource: r.subresource.clone(),
                namespace: r.namespace.clone(),
                name: r.name.clone(),
                identity: r.identity.clone(),
                field_manager: None,
                path: r.path.clone(),
                query: Default::default(),
            };
            check.check(&info).is_some()
        })
        .map(|r| {
            format!(
                "{} {}/{} {} in {:?}",
                r.verb, r.group, r.resource, r.subresource, r.namespace
            )
        })
        .collect();
    assert!(
        refused.is_empty(),
        "requests rbac/controller.yaml does not allow: {refused:?}"
    );

    let used: BTreeSet<Grant> = mine
        .iter()
        .map(|r| {
            let resource = if r.subresource.is_empty() {
                r.resource.clone()
            } else {
                format!("{}/{}", r.resource, r.subresource)
            };
            (r.group.clone(), resource, r.verb.clone())
        })
        .collect();
    let granted: BTreeSet<Grant> = rules
        .cluster_rules
        .iter()
        .chain(&rules.namespace_rules)
        .flat_map(Rule::grants)
        .collect();
    let process: BTreeSet<Grant> = PROCESS_LEVEL
        .iter()
        .map(|(g, r, v, _)| (g.to_string(), r.to_string(), v.to_string()))
        .collect();
    let extra: Vec<&Grant> = granted
        .difference(&used)
        .filter(|g| !process.contains(*g))
        .collect();
    assert!(
        extra.is_empty(),
        "rbac/controller.yaml grants what no controller call needs: {extra:?}"
    );
    let stale: Vec<&Grant> = process.difference(&granted).collect();
    assert!(
        stale.is_empty(),
        "PROCESS_LEVEL lists what the chart no longer grants: {stale:?}"
    );
    // The lease's namespace is the only namespaced grant used outside the cluster rules.
    assert!(
        mine.iter()
            .filter(|r| r.resource == "leases")
            .all(|r| r.namespace == LEASE_NAMESPACE)
    );
}
