//! The agent's API calls against the chart's RBAC (`charts/virtkube/rbac/agent.yaml`, the one
//! place the agent's rules are written): every call the reconcilers make in the scenarios of
//! `agent_scenarios` must be allowed (no missing verb), and every allowed verb must be used by
//! those calls or by one of the process-level calls listed in [`PROCESS_LEVEL`] (no extra
//! verb). A call is mapped to the verb the API server authorizes, as Kubernetes does: GET of
//! one object `get`, of a collection `list` (`watch` with `watch=true`), POST `create`, PUT
//! `update`, PATCH `patch`, DELETE `delete`; a server-side apply to an object itself may
//! create it, so it needs `create` as well.
//!
//! The process-level reads (the start-up CRD check, the reflectors' lists and watches) are
//! checked against the real `virtkube agent` process running against the fake API server of
//! `agent_support`. The in-memory API server that records every request by identity will let
//! one test cover everything, events' series patches and a deselected node included.

mod agent_scenarios;
mod agent_support;

use std::collections::BTreeSet;

use agent_scenarios::Call;
use http::Method;
use serde::Deserialize;

/// (API group, resource or resource/subresource, verb).
type Grant = (String, String, String);

/// Calls the reconciler scenarios do not make but the agent process does, with where.
const PROCESS_LEVEL: &[(&str, &str, &str, &str)] = &[
    (
        "virtkube.io",
        "domains",
        "list",
        "mod.rs check_crds and the Domain reflector",
    ),
    (
        "virtkube.io",
        "volumes",
        "list",
        "mod.rs check_crds and the Volume reflector",
    ),
    (
        "virtkube.io",
        "networks",
        "list",
        "mod.rs check_crds and the Network reflector",
    ),
    (
        "virtkube.io",
        "storagepools",
        "list",
        "mod.rs check_crds and the StoragePool reflector",
    ),
    (
        "virtkube.io",
        "hypervisornodes",
        "list",
        "mod.rs check_crds",
    ),
    ("virtkube.io", "domains", "watch", "the Domain reflector"),
    ("virtkube.io", "volumes", "watch", "the Volume reflector"),
    ("virtkube.io", "networks", "watch", "the Network reflector"),
    (
        "virtkube.io",
        "storagepools",
        "watch",
        "the StoragePool reflector",
    ),
    (
        "virtkube.io",
        "networks",
        "patch",
        "pernode.rs release: a deselected node drops its finalizer",
    ),
    (
        "virtkube.io",
        "storagepools",
        "patch",
        "pernode.rs release: a deselected node drops its finalizer",
    ),
    (
        "events.k8s.io",
        "events",
        "patch",
        "the Recorder: a repeated event is a patch of its series",
    ),
];

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

fn chart_grants() -> BTreeSet<Grant> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../charts/virtkube/rbac/agent.yaml"
    );
    let text = std::fs::read_to_string(path).unwrap();
    let rules: Rules = serde_saphyr::from_str(&text).unwrap();
    assert!(
        rules.namespace_rules.is_empty(),
        "the agent has no namespaced rules"
    );
    let mut grants = BTreeSet::new();
    for rule in rules.cluster_rules {
        for group in &rule.api_groups {
            for resource in &rule.resources {
                for verb in &rule.verbs {
                    assert!(
                        ![group, resource, verb].iter().any(|s| s.as_str() == "*"),
                        "wildcard in {group}/{resource}/{verb}"
                    );
                    grants.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    grants
}

/// The grants one call needs.
fn needed(call: &Call) -> Vec<Grant> {
    let parts: Vec<&str> = call.path.trim_start_matches('/').split('/').collect();
    // /api/v1/... (core) or /apis/GROUP/VERSION/...
    let (group, rest) = match parts.as_slice() {
        ["api", _version, rest @ ..] => (String::new(), rest.to_vec()),
        ["apis", group, _version, rest @ ..] => (group.to_string(), rest.to_vec()),
        _ => panic!("not an API path: {}", call.path),
    };
    let rest = match rest.as_slice() {
        ["namespaces", _ns, rest @ ..] if !rest.is_empty() => rest.to_vec(),
        _ => rest,
    };
    let (resource, named) = match rest.as_slice() {
        [plural] => (plural.to_string(), false),
        [plural, _name] => (plural.to_string(), true),
        [plural, _name, sub] => (format!("{plural}/{sub}"), true),
        _ => panic!("unexpected path {}", call.path),
    };
    let watch = call.query.split('&').any(|kv| kv == "watch=true");
    let verbs: Vec<&str> = match (&call.method, named) {
        (&Method::GET, true) => vec!["get"],
        (&Method::GET, false) if watch => vec!["watch"],
        (&Method::GET, false) => vec!["list"],
        (&Method::POST, _) => vec!["create"],
        (&Method::PUT, _) => vec!["update"],
        (&Method::DELETE, true) => vec!["delete"],
        (&Method::DELETE, false) => vec!["deletecollection"],
        // Server-side apply may create the object it names (not a subresource).
        (&Method::PATCH, _)
            if call.content_type.starts_with("application/apply-patch")
                && !resource.contains('/') =>
        {
            vec!["patch", "create"]
        }
        (&Method::PATCH, _) => vec!["patch"],
        (m, _) => panic!("unexpected method {m} {}", call.path),
    };
    verbs
        .into_iter()
        .map(|v| (group.clone(), resource.clone(), v.to_string()))
        .collect()
}

#[tokio::test]
async fn the_chart_grants_the_agent_exactly_what_it_calls() {
    let grants = chart_grants();
    let outputs = agent_scenarios::run().await;
    assert!(!outputs.calls.is_empty());
    let used: BTreeSet<Grant> = outputs.calls.iter().flat_map(needed).collect();

    let missing: Vec<&Grant> = used.difference(&grants).collect();
    assert!(
        missing.is_empty(),
        "the agent calls what charts/virtkube/rbac/agent.yaml does not grant: {missing:?}"
    );

    let process: BTreeSet<Grant> = PROCESS_LEVEL
        .iter()
        .map(|(g, r, v, _)| (g.to_string(), r.to_string(), v.to_string()))
        .collect();
    let covered: BTreeSet<Grant> = used.union(&process).cloned().collect();
    let extra: Vec<&Grant> = grants.difference(&covered).collect();
    assert!(
        extra.is_empty(),
        "charts/virtkube/rbac/agent.yaml grants what no agent call needs: {extra:?}"
    );
    let stale: Vec<&Grant> = process.difference(&grants).collect();
    assert!(
        stale.is_empty(),
        "PROCESS_LEVEL lists calls the chart does not grant: {stale:?}"
    );
}

#[test]
fn calls_map_to_the_verbs_the_api_server_authorizes() {
    let call = |method: Method, path: &str, query: &str, content_type: &str| Call {
        method,
        path: path.into(),
        query: query.into(),
        content_type: content_type.into(),
    };
    let g = |r: &str, v: &str| ("virtkube.io".to_string(), r.to_string(), v.to_string());
    assert_eq!(
        needed(&call(
            Method::GET,
            "/apis/virtkube.io/v1alpha1/domains",
            "watch=true&timeoutSeconds=290",
            ""
        )),
        vec![g("domains", "watch")]
    );
    assert_eq!(
        needed(&call(
            Method::GET,
            "/apis/virtkube.io/v1alpha1/domains",
            "limit=1",
            ""
        )),
        vec![g("domains", "list")]
    );
    assert_eq!(
        needed(&call(
            Method::PATCH,
            "/apis/virtkube.io/v1alpha1/hypervisornodes/n",
            "",
            "application/apply-patch+yaml"
        )),
        vec![
            g("hypervisornodes", "patch"),
            g("hypervisornodes", "create")
        ]
    );
    assert_eq!(
        needed(&call(
            Method::PATCH,
            "/apis/virtkube.io/v1alpha1/namespaces/a/domains/b/status",
            "",
            "application/apply-patch+yaml"
        )),
        vec![g("domains/status", "patch")]
    );
    assert_eq!(
        needed(&call(
            Method::POST,
            "/apis/events.k8s.io/v1/namespaces/a/events",
            "",
            "application/json"
        )),
        vec![(
            "events.k8s.io".to_string(),
            "events".to_string(),
            "create".to_string()
        )]
    );
}

/// The process-level calls of [`PROCESS_LEVEL`] that a running agent makes at start-up (the
/// CRD check's lists, the reflectors' lists and watches) are really made by the `virtkube
/// agent` process, and every read it makes is granted.
#[tokio::test]
async fn the_agent_process_makes_the_listed_reads_and_only_granted_ones() {
    use agent_support::fake_api::{KillOnDrop, agent, fake_api, free_port, http_get, kubeconfig};
    use std::time::{Duration, Instant};

    let (api, fake) = fake_api(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = kubeconfig(dir.path(), api);
    let port = free_port();
    let mut child = agent(&config, port, "test:///default");
    let _kill = KillOnDrop(child.id());
    let deadline = Instant::now() + Duration::from_secs(30);
    let watched = |fake: &agent_support::fake_api::Shared| {
        let f = fake.lock().unwrap();
        ["domains", "volumes", "networks", "storagepools"]
            .iter()
            .all(|p| {
                f.requests.iter().any(|(m, path, q)| {
                    m == "GET" && path.ends_with(&format!("/{p}")) && q.contains("watch=true")
                })
            })
    };
    loop {
        let ready = matches!(http_get(port, "/readyz").await, Some((200, _)));
        if ready && watched(&fake) {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("agent exited early: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "the agent never became ready with every reflector watching"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let requests = fake.lock().unwrap().requests.clone();
    let reads: BTreeSet<Grant> = requests
        .iter()
        .filter(|(m, _, _)| m == "GET")
        .flat_map(|(_, path, query)| {
            needed(&Call {
                method: Method::GET,
                path: path.clone(),
                query: query.clone(),
                content_type: String::new(),
            })
        })
        .collect();
    let grants = chart_grants();
    let missing: Vec<&Grant> = reads.difference(&grants).collect();
    assert!(missing.is_empty(), "ungranted reads: {missing:?}");
    for (group, resource, verb, _) in PROCESS_LEVEL
        .iter()
        .filter(|(_, _, v, _)| *v == "list" || *v == "watch")
    {
        let grant = (group.to_string(), resource.to_string(), verb.to_string());
        assert!(
            reads.contains(&grant),
            "PROCESS_LEVEL says the process makes {grant:?}, it did not: {reads:?}"
        );
    }
}
