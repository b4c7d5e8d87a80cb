//! The server's strictness, proven through kube's own client: every behaviour a virtkube
//! guarantee rests on answers as the real API server does.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
    WatchEvent, WatchParams,
};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::{Value, json};
use virtkube_testapi::{ADMIN, Answer, Authorizer, Config, TestApi};

fn resource(plural: &str) -> ApiResource {
    let kind = match plural {
        "domains" => "Domain",
        "networks" => "Network",
        "hypervisornodes" => "HypervisorNode",
        _ => unreachable!("only domains, networks and hypervisornodes are used here"),
    };
    ApiResource {
        group: "virtkube.io".into(),
        version: "v1alpha1".into(),
        api_version: "virtkube.io/v1alpha1".into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

async fn setup() -> (TestApi, Api<DynamicObject>, Api<DynamicObject>) {
    let api = TestApi::start().await.unwrap();
    api.create_namespace("ns").unwrap();
    let client = api.client(ADMIN).await.unwrap();
    let domains = Api::namespaced_with(client.clone(), "ns", &resource("domains"));
    let networks = Api::all_with(client, &resource("networks"));
    (api, domains, networks)
}

fn domain(name: &str) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "virtkube.io/v1alpha1", "kind": "Domain",
        "metadata": {"name": name, "namespace": "ns"},
        "spec": {"nodeName": "node-a", "memory": {"size": "64Mi"}}
    }))
    .unwrap()
}

fn network(name: &str) -> Value {
    json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Network",
           "metadata": {"name": name},
           "spec": {"mode": "isolated", "ip": {"address": "10.152.0.1", "prefix": 24}}})
}

fn code(e: kube::Error) -> (u16, String) {
    match e {
        kube::Error::Api(s) => (s.code, s.message),
        other => panic!("not an API error: {other}"),
    }
}

fn rv(o: &DynamicObject) -> String {
    o.metadata.resource_version.clone().unwrap()
}

#[tokio::test]
async fn create_assigns_identity_and_refuses_duplicates_and_missing_namespaces() {
    let (api, domains, _) = setup().await;
    let mut with_status = domain("vm");
    with_status.data["status"] = json!({"phase": "Running"});
    let created = domains
        .create(&PostParams::default(), &with_status)
        .await
        .unwrap();
    assert!(created.metadata.uid.is_some());
    assert!(created.metadata.creation_timestamp.is_some());
    assert_eq!(created.metadata.generation, Some(1));
    assert!(
        created.data.get("status").is_none(),
        "status is dropped on create"
    );
    let again = domains
        .create(&PostParams::default(), &domain("vm"))
        .await
        .unwrap_err();
    assert_eq!(code(again).0, 409);
    let mut generated = domain("");
    generated.metadata.name = None;
    generated.metadata.generate_name = Some("vm-".into());
    let named = domains
        .create(&PostParams::default(), &generated)
        .await
        .unwrap();
    assert!(named.metadata.name.unwrap().starts_with("vm-"));
    let elsewhere: Api<DynamicObject> = Api::namespaced_with(
        api.client(ADMIN).await.unwrap(),
        "nowhere",
        &resource("domains"),
    );
    let mut lost = domain("x");
    lost.metadata.namespace = Some("nowhere".into());
    let (status, message) = code(
        elsewhere
            .create(&PostParams::default(), &lost)
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (status, message.as_str()),
        (404, "namespaces \"nowhere\" not found")
    );
}

#[tokio::test]
async fn schema_and_cel_violations_are_422_with_field_paths() {
    let (_api, domains, _) = setup().await;
    let mut bad = domain("bad");
    bad.data["spec"]["runStrategy"] = json!("Sometimes");
    let (status, message) = code(
        domains
            .create(&PostParams::default(), &bad)
            .await
            .unwrap_err(),
    );
    assert_eq!(status, 422);
    assert!(message.contains("spec.runStrategy"), "{message}");
}

#[tokio::test]
async fn put_requires_and_checks_the_resource_version() {
    let (_api, domains, _) = setup().await;
    let created = domains
        .create(&PostParams::default(), &domain("vm"))
        .await
        .unwrap();
    let mut first = created.clone();
    first.data["spec"]["autostart"] = json!(true);
    let updated = domains
        .replace("vm", &PostParams::default(), &first)
        .await
        .unwrap();
    assert_ne!(rv(&updated), rv(&created));
    // The same stale copy again: someone else wrote in between.
    let (status, message) = code(
        domains
            .replace("vm", &PostParams::default(), &first)
            .await
            .unwrap_err(),
    );
    assert_eq!(status, 409);
    assert!(
        message.contains("the object has been modified"),
        "{message}"
    );
    let mut unconditional = updated.clone();
    unconditional.metadata.resource_version = None;
    let (status, message) = code(
        domains
            .replace("vm", &PostParams::default(), &unconditional)
            .await
            .unwrap_err(),
    );
    assert_eq!(status, 422, "{message}");
    assert!(message.contains("metadata.resourceVersion"), "{message}");
}

#[tokio::test]
async fn a_resource_version_in_a_merge_patch_is_a_precondition() {
    let (_api, domains, _) = setup().await;
    let created = domains
        .create(&PostParams::default(), &domain("vm"))
        .await
        .unwrap();
    let stale = rv(&created);
    let patch = json!({"metadata": {"resourceVersion": stale, "labels": {"a": "1"}}});
    domains
        .patch("vm", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let (status, _) = code(
        domains
            .patch("vm", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap_err(),
    );
    assert_eq!(status, 409);
}

#[tokio::test]
async fn a_failed_json_patch_test_is_422_and_changes_nothing() {
    let (_api, domains, _) = setup().await;
    domains
        .create(&PostParams::default(), &domain("vm"))
        .await
        .unwrap();
    let add: json_patch_ops::Ops = json_patch_ops::finalizer_add("a.io/f");
    domains
        .patch(
            "vm",
            &PatchParams::default(),
            &Patch::Json::<()>(add.clone()),
        )
        .await
        .unwrap();
    // The same test-then-add again: the list is no longer absent.
    let (status, message) = code(
        domains
            .patch("vm", &PatchParams::default(), &Patch::Json::<()>(add))
            .await
            .unwrap_err(),
    );
    assert_eq!(status, 422, "{message}");
    let now = domains.get("vm").await.unwrap();
    assert_eq!(now.metadata.finalizers, Some(vec!["a.io/f".to_string()]));
}

/// JSON patches as kube's finalizer helper builds them.
mod json_patch_ops {
    pub type Ops = json_patch::Patch;
    pub fn finalizer_add(name: &str) -> Ops {
        serde_json::from_value(serde_json::json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": [name]}
        ]))
        .unwrap()
    }
}

#[tokio::test]
async fn strategic_merge_patch_is_refused_for_custom_resources_and_apply_needs_a_manager() {
    let (_api, domains, _) = setup().await;
    domains
        .create(&PostParams::default(), &domain("vm"))
        .await
        .unwrap();
    let (status, _) = code(
        domains
            .patch(
                "vm",
                &PatchParams::default(),
                &Patch::Strategic(json!({"metadata": {"labels": {"a": "b"}}})),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!(status, 415);
    let (status, message) = code(
        domains
            .patch("vm", &PatchParams::default(), &Patch::Apply(json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Domain", "metadata": {"name": "vm"}})))
            .await
            .unwrap_err(),
    );
    assert_eq!(status, 422);
    assert!(message.contains("fieldManager"), "{message}");
}

fn apply_spec(spec: Value) -> Value {
    json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Domain",
           "metadata": {"name": "vm", "namespace": "ns"}, "spec": spec})
}

#[tokio::test]
async fn apply_conflicts_with_another_manager_unless_forced() {
    let (_api, domains, _) = setup().await;
    let alice = PatchParams::apply("alice");
    let created = domains
        .patch(
            "vm",
            &alice,
            &Patch::Apply(apply_spec(
                json!({"nodeName": "node-a", "memory": {"size": "64Mi"}, "autostart": true}),
            )),
        )
        .await
        .unwrap();
    assert_eq!(created.metadata.generation, Some(1), "apply creates");
    let bob = PatchParams::apply("bob");
    let change = Patch::Apply(apply_spec(json!({"autostart": false})));
    let err = domains.patch("vm", &bob, &change).await.unwrap_err();
    let kube::Error::Api(status) = err else {
        panic!("not an API error")
    };
    assert_eq!(status.code, 409);
    assert!(
        status.message.contains("conflict with \"alice\""),
        "{}",
        status.message
    );
    assert!(
        status.message.contains(".spec.autostart"),
        "{}",
        status.message
    );
    // The same value is shared ownership, not a conflict.
    domains
        .patch(
            "vm",
            &bob,
            &Patch::Apply(apply_spec(json!({"autostart": true}))),
        )
        .await
        .unwrap();
    let forced = domains
        .patch("vm", &bob.clone().force(), &change)
        .await
        .unwrap();
    assert_eq!(forced.data["spec"]["autostart"], false);
    let managers: Vec<String> = forced
        .metadata
        .managed_fields
        .unwrap()
        .iter()
        .filter(|m| {
            m.fields_v1
                .as_ref()
                .is_some_and(|f| f.0.pointer("/f:spec/f:autostart").is_some())
        })
        .filter_map(|m| m.manager.clone())
        .collect();
    assert_eq!(
        managers,
        vec!["bob".to_string()],
        "force took autostart from alice"
    );
}

#[tokio::test]
async fn apply_removes_the_fields_a_manager_dropped_unless_another_owns_them() {
    let (_api, domains, _) = setup().await;
    let alice = PatchParams::apply("alice");
    domains
        .patch("vm", &alice, &Patch::Apply(apply_spec(json!({"nodeName": "node-a", "memory": {"size": "64Mi"}, "autostart": true, "state": "Running"}))))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let bob = PatchParams::apply("bob");
    domains
        .patch(
            "vm",
            &bob,
            &Patch::Apply(apply_spec(json!({"autostart": true}))),
        )
        .await
        .unwrap();
    let after = domains
        .patch(
            "vm",
            &alice,
            &Patch::Apply(apply_spec(
                json!({"nodeName": "node-a", "memory": {"size": "64Mi"}}),
            )),
        )
        .await
        .unwrap();
    assert!(
        after.data["spec"].get("state").is_none(),
        "alice's dropped field went"
    );
    assert_eq!(
        after.data["spec"]["autostart"], true,
        "bob still owns autostart"
    );
    assert_eq!(after.metadata.generation, Some(2));
}

fn node_status(node: &str, active: bool) -> Value {
    json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Network",
           "status": {"nodes": [{"nodeName": node, "active": active}]}})
}

#[tokio::test]
async fn per_node_managers_own_their_own_entries_of_a_map_list() {
    let (api, _, networks) = setup().await;
    api.create("networks", network("net")).unwrap();
    let a = PatchParams::apply("agent.node-a").force();
    let b = PatchParams::apply("agent.node-b").force();
    networks
        .patch_status("net", &a, &Patch::Apply(node_status("node-a", true)))
        .await
        .unwrap();
    let both = networks
        .patch_status("net", &b, &Patch::Apply(node_status("node-b", false)))
        .await
        .unwrap();
    assert_eq!(both.data["status"]["nodes"].as_array().unwrap().len(), 2);
    // node-a changes its own entry: node-b's stays.
    let changed = networks
        .patch_status("net", &a, &Patch::Apply(node_status("node-a", false)))
        .await
        .unwrap();
    assert_eq!(
        changed.data["status"]["nodes"],
        json!([{"nodeName": "node-a", "active": false}, {"nodeName": "node-b", "active": false}])
    );
    // node-a releases: only its entry goes.
    let released = networks
        .patch_status(
            "net",
            &a,
            &Patch::Apply(
                json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Network", "status": {}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(
        released.data["status"]["nodes"],
        json!([{"nodeName": "node-b", "active": false}])
    );
    // Without force, node-a writing node-b's entry conflicts with node-b.
    let err = networks
        .patch_status(
            "net",
            &PatchParams::apply("agent.node-a"),
            &Patch::Apply(node_status("node-b", true)),
        )
        .await
        .unwrap_err();
    assert_eq!(code(err).0, 409);
}

#[tokio::test]
async fn the_status_subresource_isolates_status_and_generation_counts_spec_only() {
    let (_api, domains, _) = setup().await;
    domains
        .create(&PostParams::default(), &domain("vm"))
        .await
        .unwrap();
    let status = json!({"status": {"phase": "Running"}, "spec": {"autostart": true}, "metadata": {"labels": {"x": "y"}}});
    let after = domains
        .patch_status("vm", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    assert_eq!(after.data["status"]["phase"], "Running");
    assert_eq!(
        after.data["spec"]["autostart"], false,
        "a status write ignores spec (false is the default)"
    );
    assert!(
        after.metadata.labels.is_none(),
        "a status write ignores metadata"
    );
    assert_eq!(after.metadata.generation, Some(1), "status does not count");
    let main = json!({"status": {"phase": "Stopped"}, "metadata": {"labels": {"x": "y"}}});
    let after = domains
        .patch("vm", &PatchParams::default(), &Patch::Merge(&main))
        .await
        .unwrap();
    assert_eq!(
        after.data["status"]["phase"], "Running",
        "a main write ignores status"
    );
    assert_eq!(after.metadata.generation, Some(1), "labels do not count");
    let spec = json!({"spec": {"autostart": true}});
    let after = domains
        .patch("vm", &PatchParams::default(), &Patch::Merge(&spec))
        .await
        .unwrap();
    assert_eq!(after.metadata.generation, Some(2), "spec counts");
    let again = domains
        .patch("vm", &PatchParams::default(), &Patch::Merge(&spec))
        .await
        .unwrap();
    assert_eq!(
        rv(&again),
        rv(&after),
        "a write that changes nothing stores nothing"
    );
}

#[tokio::test]
async fn finalizers_hold_a_deleted_object_and_none_may_be_added() {
    let (api, domains, _) = setup().await;
    let mut d = domain("vm");
    d.metadata.finalizers = Some(vec!["a.io/f".into()]);
    domains.create(&PostParams::default(), &d).await.unwrap();
    let wrong = DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            uid: Some("nope".into()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    assert_eq!(code(domains.delete("vm", &wrong).await.unwrap_err()).0, 409);
    let deleting = domains
        .delete("vm", &DeleteParams::default())
        .await
        .unwrap();
    let marked = deleting.left().expect("still there");
    assert!(marked.metadata.deletion_timestamp.is_some());
    assert_eq!(
        marked.metadata.generation,
        Some(2),
        "marking bumps the generation"
    );
    let add = json!({"metadata": {"finalizers": ["a.io/f", "b.io/g"]}});
    let (status, message) = code(
        domains
            .patch("vm", &PatchParams::default(), &Patch::Merge(&add))
            .await
            .unwrap_err(),
    );
    assert_eq!(status, 422);
    assert!(
        message.contains("no new finalizers can be added"),
        "{message}"
    );
    let rv_before = api.resource_version();
    let remove = json!({"metadata": {"finalizers": null}});
    domains
        .patch("vm", &PatchParams::default(), &Patch::Merge(&remove))
        .await
        .unwrap();
    assert!(
        api.get("domains", "ns", "vm").is_none(),
        "gone with its last finalizer"
    );
    let changes = api.changes_since(rv_before);
    assert_eq!(
        changes.last().unwrap().kind,
        virtkube_testapi::ChangeType::Deleted
    );
}

#[tokio::test]
async fn a_watch_from_compacted_history_is_410_and_the_watcher_relists() {
    let (api, domains, _) = setup().await;
    let first = domains
        .create(&PostParams::default(), &domain("one"))
        .await
        .unwrap();
    domains
        .create(&PostParams::default(), &domain("two"))
        .await
        .unwrap();
    api.compact();
    let mut stream = domains
        .watch(&WatchParams::default().timeout(5), &rv(&first))
        .await
        .unwrap()
        .boxed();
    match stream.try_next().await.unwrap() {
        Some(WatchEvent::Error(e)) => assert_eq!((e.code, e.reason.as_str()), (410, "Expired")),
        other => panic!("expected a 410 error event, got {other:?}"),
    }
    // kube-runtime's watcher lists, then watches from the list's version. The server goes
    // away; meanwhile an object is created and the history compacted: the watcher's next
    // watch is from a gone version, it gets 410, relists, and still sees every object.
    let seen = watcher(domains.clone(), watcher::Config::default().timeout(1))
        .default_backoff()
        .applied_objects()
        .boxed();
    let names = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
    let collect = {
        let names = names.clone();
        tokio::spawn(async move {
            let mut seen = seen;
            while let Some(item) = seen.next().await {
                if let Ok(o) = item {
                    names.lock().unwrap().insert(o.metadata.name.unwrap());
                }
            }
        })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while names.lock().unwrap().len() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "watcher saw {:?}",
            names.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    api.stop().await;
    api.create("domains", serde_json::to_value(domain("three")).unwrap())
        .unwrap();
    api.compact();
    api.clear_requests();
    api.restart().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while names.lock().unwrap().len() < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "watcher saw {:?}",
            names.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    collect.abort();
    let relists = api
        .requests()
        .iter()
        .filter(|r| r.verb == "list" && r.resource == "domains")
        .count();
    assert!(relists >= 1, "the watcher relisted after the 410");
}

#[tokio::test]
async fn a_label_selector_watch_sees_objects_leave_as_deletions() {
    let (api, domains, _) = setup().await;
    let mut d = domain("vm");
    d.metadata.labels = Some([("tier".to_string(), "front".to_string())].into());
    let created = domains.create(&PostParams::default(), &d).await.unwrap();
    let mut stream = domains
        .watch(
            &WatchParams::default().labels("tier=front").timeout(5),
            &rv(&created),
        )
        .await
        .unwrap()
        .boxed();
    api.patch_labels("domains", "ns", "vm", &[("tier", Some("back"))])
        .unwrap();
    api.patch_labels("domains", "ns", "vm", &[("tier", Some("front"))])
        .unwrap();
    let mut kinds = Vec::new();
    while kinds.len() < 2 {
        match stream.try_next().await.unwrap() {
            Some(WatchEvent::Deleted(o)) => {
                kinds.push(("DELETED", o.metadata.labels.unwrap()["tier"].clone()))
            }
            Some(WatchEvent::Added(o)) => {
                kinds.push(("ADDED", o.metadata.labels.unwrap()["tier"].clone()))
            }
            Some(WatchEvent::Bookmark(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        kinds,
        vec![
            ("DELETED", "front".to_string()),
            ("ADDED", "front".to_string())
        ]
    );
}

#[tokio::test]
async fn bookmarks_come_when_asked_and_the_server_ends_a_watch_at_its_timeout() {
    let api = TestApi::start_with(Config {
        bookmark_interval: Duration::from_millis(200),
        ..Config::default()
    })
    .await
    .unwrap();
    api.create_namespace("ns").unwrap();
    let domains: Api<DynamicObject> =
        Api::namespaced_with(api.client(ADMIN).await.unwrap(), "ns", &resource("domains"));
    let rv = api.resource_version().to_string();
    let started = tokio::time::Instant::now();
    let events: Vec<_> = domains
        .watch(&WatchParams::default().timeout(1), &rv)
        .await
        .unwrap()
        .collect()
        .await;
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "ended by the server's timeout"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Ok(WatchEvent::Bookmark(_)))),
        "{events:?}"
    );
}

#[tokio::test]
async fn stop_refuses_connections_restart_keeps_the_store_and_hang_never_answers() {
    let (api, domains, _) = setup().await;
    domains
        .create(&PostParams::default(), &domain("vm"))
        .await
        .unwrap();
    let mut stream = domains
        .watch(
            &WatchParams::default().timeout(60),
            &api.resource_version().to_string(),
        )
        .await
        .unwrap()
        .boxed();
    api.stop().await;
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(_)) = stream.next().await {}
    })
    .await;
    assert!(ended.is_ok(), "the open watch was dropped");
    let err = domains.get("vm").await.unwrap_err();
    assert!(
        !matches!(err, kube::Error::Api(_)),
        "connection refused, not an answer: {err}"
    );
    api.restart().await.unwrap();
    assert!(domains.get("vm").await.is_ok(), "the store survived");
    api.hang(true);
    let hung = tokio::time::timeout(Duration::from_millis(700), domains.get("vm")).await;
    assert!(hung.is_err(), "a hung server never answers");
    api.hang(false);
    assert!(domains.get("vm").await.is_ok());
}

#[tokio::test]
async fn injected_answers_come_for_the_matching_requests_only() {
    let (api, domains, _) = setup().await;
    domains
        .create(&PostParams::default(), &domain("vm"))
        .await
        .unwrap();
    api.inject(1, Answer::InternalError, |r| r.verb == "list");
    assert!(domains.get("vm").await.is_ok(), "a get is not matched");
    let err = domains.list(&ListParams::default()).await.unwrap_err();
    assert_eq!(code(err).0, 500);
    assert!(
        domains.list(&ListParams::default()).await.is_ok(),
        "only the next one"
    );
    // kube's client retries a 429 after its Retry-After: the caller sees success, the
    // server saw two requests.
    api.clear_requests();
    api.inject(1, Answer::TooManyRequests { retry_after: 1 }, |r| {
        r.verb == "list"
    });
    assert!(domains.list(&ListParams::default()).await.is_ok());
    let lists = api.requests().iter().filter(|r| r.verb == "list").count();
    assert_eq!(lists, 2, "one 429, one retry");
}

#[tokio::test]
async fn apply_refuses_undeclared_fields_as_the_typed_converter_does() {
    let (_api, domains, _) = setup().await;
    let err = domains
        .patch(
            "vm",
            &PatchParams::apply("alice"),
            &Patch::Apply(apply_spec(
                json!({"nodeName": "a", "memory": {"size": "64Mi"}, "colour": "red"}),
            )),
        )
        .await
        .unwrap_err();
    let (status, message) = code(err);
    assert_eq!(status, 500);
    assert!(
        message.ends_with(".spec.colour: field not declared in schema"),
        "{message}"
    );
}

#[tokio::test]
async fn rbac_refuses_what_the_role_does_not_grant_with_the_servers_words() {
    let mut authorizer = Authorizer::new(&[ADMIN]);
    authorizer
        .load_yaml(&[r#"
kind: ClusterRole
apiVersion: rbac.authorization.k8s.io/v1
metadata: {name: reader}
rules: [{apiGroups: ["virtkube.io"], resources: ["domains"], verbs: ["get", "list"]}]
---
kind: ClusterRoleBinding
apiVersion: rbac.authorization.k8s.io/v1
metadata: {name: reader}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: reader}
subjects: [{kind: User, name: reader}]
"#
        .to_string()])
        .unwrap();
    let api = TestApi::start_with(Config {
        authorizer: Some(authorizer),
        ..Config::default()
    })
    .await
    .unwrap();
    api.create_namespace("ns").unwrap();
    let reader: Api<DynamicObject> = Api::namespaced_with(
        api.client("reader").await.unwrap(),
        "ns",
        &resource("domains"),
    );
    assert!(reader.list(&ListParams::default()).await.is_ok());
    let (status, message) = code(
        reader
            .create(&PostParams::default(), &domain("vm"))
            .await
            .unwrap_err(),
    );
    assert_eq!(status, 403);
    assert_eq!(
        message,
        "domains.virtkube.io is forbidden: User \"reader\" cannot create resource \"domains\" in API group \"virtkube.io\" in the namespace \"ns\""
    );
    let recorded = api.requests();
    assert!(
        recorded
            .iter()
            .any(|r| r.identity == "reader" && r.verb == "create" && r.resource == "domains")
    );
}

#[tokio::test]
async fn an_apply_that_creates_needs_create_as_well_as_patch() {
    // `handlers/patch.go`: an apply patch that finds no object is authorized a second time,
    // as `create` (createAuthorizerAttributes); an apply to an existing object only as
    // `patch`.
    let mut authorizer = Authorizer::new(&[ADMIN]);
    authorizer
        .load_yaml(&[r#"
kind: ClusterRole
apiVersion: rbac.authorization.k8s.io/v1
metadata: {name: patcher}
rules: [{apiGroups: ["virtkube.io"], resources: ["hypervisornodes"], verbs: ["patch"]}]
---
kind: ClusterRoleBinding
apiVersion: rbac.authorization.k8s.io/v1
metadata: {name: patcher}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: patcher}
subjects: [{kind: User, name: patcher}]
"#
        .to_string()])
        .unwrap();
    let api = TestApi::start_with(Config {
        authorizer: Some(authorizer),
        ..Config::default()
    })
    .await
    .unwrap();
    let nodes: Api<DynamicObject> = Api::all_with(
        api.client("patcher").await.unwrap(),
        &resource("hypervisornodes"),
    );
    let body = json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "HypervisorNode",
                      "metadata": {"name": "n1"}, "spec": {}});
    let (status, message) = code(
        nodes
            .patch("n1", &PatchParams::apply("agent"), &Patch::Apply(&body))
            .await
            .unwrap_err(),
    );
    assert_eq!(status, 403);
    assert!(
        message.contains("cannot create resource \"hypervisornodes\""),
        "{message}"
    );
    assert_eq!(api.count("hypervisornodes"), 0, "nothing created");
    let checks: Vec<String> = api
        .authorizations()
        .iter()
        .filter(|r| r.identity == "patcher")
        .map(|r| r.verb.clone())
        .collect();
    assert_eq!(checks, ["patch", "create"]);
    let requests: Vec<String> = api.requests().iter().map(|r| r.verb.clone()).collect();
    assert_eq!(requests, ["patch"], "one request, two checks");

    // Once the object exists, the same apply is only a patch.
    api.create("hypervisornodes", body.clone()).unwrap();
    api.clear_requests();
    nodes
        .patch("n1", &PatchParams::apply("agent"), &Patch::Apply(&body))
        .await
        .unwrap();
    let checks: Vec<String> = api
        .authorizations()
        .iter()
        .map(|r| r.verb.clone())
        .collect();
    assert_eq!(checks, ["patch"]);
}

/// Events are selected by the fields of the object they regard, as kubectl asks
/// (`kubectl get events.events.k8s.io --field-selector regarding.name=web`); a field label
/// the kind does not have is refused with 400, as the real server refuses it.
#[tokio::test]
async fn events_are_selected_by_their_regarding_fields() {
    let api = TestApi::start().await.unwrap();
    api.create_namespace("ns").unwrap();
    let client = api.client(ADMIN).await.unwrap();
    let events: Api<DynamicObject> = Api::namespaced_with(
        client,
        "ns",
        &ApiResource {
            group: "events.k8s.io".into(),
            version: "v1".into(),
            api_version: "events.k8s.io/v1".into(),
            kind: "Event".into(),
            plural: "events".into(),
        },
    );
    for (name, regarding, reason) in [
        ("e1", "web", "Started"),
        ("e2", "db", "Started"),
        ("e3", "web", "Defined"),
    ] {
        let event: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": {"name": name, "namespace": "ns"},
            "eventTime": "2026-01-01T00:00:00.000000Z", "reportingController": "virtkube",
            "reportingInstance": "x", "action": "Start", "reason": reason, "type": "Normal",
            "regarding": {"apiVersion": "virtkube.io/v1alpha1", "kind": "Domain", "namespace": "ns", "name": regarding},
        }))
        .unwrap();
        events.create(&PostParams::default(), &event).await.unwrap();
    }
    let names = |list: kube::core::ObjectList<DynamicObject>| -> Vec<String> {
        list.items
            .into_iter()
            .filter_map(|e| e.metadata.name)
            .collect()
    };
    let web = events
        .list(&ListParams::default().fields("regarding.name=web"))
        .await
        .unwrap();
    assert_eq!(names(web), ["e1", "e3"]);
    let started = events
        .list(
            &ListParams::default()
                .fields("regarding.kind=Domain,reason=Started,regarding.name!=db"),
        )
        .await
        .unwrap();
    assert_eq!(names(started), ["e1"]);
    let (status, message) = code(
        events
            .list(&ListParams::default().fields("involvedObject.name=web"))
            .await
            .unwrap_err(),
    );
    assert_eq!(status, 400, "{message}");
    assert!(
        message.contains("field label not supported: involvedObject.name"),
        "{message}"
    );
}

/// kubectl's validation reads the OpenAPI v3 index and the document of the object's
/// group-version before it creates or applies (otherwise: "failed to download openapi").
#[tokio::test]
async fn openapi_v3_documents_are_served() {
    let api = TestApi::start().await.unwrap();
    let client = api.client(ADMIN).await.unwrap();
    let get = |path: &str| {
        http::Request::get(path.to_string())
            .body(Vec::new())
            .unwrap()
    };
    let index: Value = client.request(get("/openapi/v3")).await.unwrap();
    let url = index["paths"]["apis/virtkube.io/v1alpha1"]["serverRelativeURL"]
        .as_str()
        .unwrap()
        .to_string();
    let doc: Value = client.request(get(&url)).await.unwrap();
    let patch =
        &doc["paths"]["/apis/virtkube.io/v1alpha1/namespaces/{namespace}/domains/{name}"]["patch"];
    assert_eq!(patch["x-kubernetes-group-version-kind"]["kind"], "Domain");
    assert!(
        patch["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "fieldValidation" && p["in"] == "query")
    );
    let missing = client
        .request::<Value>(get("/openapi/v3/apis/nothing.example/v1"))
        .await
        .unwrap_err();
    assert_eq!(code(missing).0, 404);
}

/// A watch-list (`sendInitialEvents=true`, what kube's `streaming_lists()` and client-go's
/// reflector with `WatchListClient` ask, e.g. `kubectl wait` from 1.35 on): the current
/// objects, then the bookmark annotated `k8s.io/initial-events-end`, then changes. The
/// options it needs are checked as the real server checks them (422 on ListOptions).
#[tokio::test]
async fn a_watch_list_sends_the_current_objects_then_the_initial_events_end_bookmark() {
    let (api, domains, _) = setup().await;
    domains
        .create(&PostParams::default(), &domain("one"))
        .await
        .unwrap();
    let mut events = watcher(
        domains.clone(),
        watcher::Config::default().streaming_lists().timeout(5),
    )
    .boxed();
    let mut init_done = false;
    let mut initial = Vec::new();
    while !init_done {
        match tokio::time::timeout(Duration::from_secs(5), events.try_next())
            .await
            .expect("the initial events end within 5 s")
            .unwrap()
        {
            Some(watcher::Event::InitApply(o)) => initial.push(o.metadata.name.unwrap()),
            Some(watcher::Event::InitDone) => init_done = true,
            Some(_) => {}
            None => panic!("the stream ended before InitDone"),
        }
    }
    assert_eq!(initial, ["one"]);
    domains
        .create(&PostParams::default(), &domain("two"))
        .await
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(5), events.try_next())
        .await
        .expect("the change arrives")
        .unwrap()
    {
        Some(watcher::Event::Apply(o)) => assert_eq!(o.metadata.name.as_deref(), Some("two")),
        other => panic!("expected the new object, got {other:?}"),
    }
    let client = api.client(ADMIN).await.unwrap();
    for (query, field) in [
        (
            "watch=true&sendInitialEvents=true&allowWatchBookmarks=true",
            "resourceVersionMatch",
        ),
        (
            "watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan",
            "allowWatchBookmarks",
        ),
        (
            "watch=true&resourceVersionMatch=NotOlderThan",
            "resourceVersionMatch",
        ),
    ] {
        let request = http::Request::get(format!("/apis/virtkube.io/v1alpha1/domains?{query}"))
            .body(Vec::new())
            .unwrap();
        let (status, message) = code(client.request::<Value>(request).await.unwrap_err());
        assert_eq!(status, 422, "{query}: {message}");
        assert!(
            message.starts_with(&format!(
                "ListOptions.meta.k8s.io \"\" is invalid: {field}: Forbidden"
            )),
            "{query}: {message}"
        );
    }
}
