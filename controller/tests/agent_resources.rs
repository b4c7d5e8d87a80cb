//! The Volume, StoragePool and Network controllers against kube's mock API server (and, where
//! a bound Domain or a stored object's history matters, the in-memory API server), with the
//! real engine on `test:///default` underneath: per-node finalizers and status entries for
//! pools and networks, reclaim policies for volumes, and silence in steady state.

mod agent_support;

use std::sync::Arc;
use std::time::Duration;

use http::Method;
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde_json::json;
use virtkube::agent::context::FINALIZER;
use virtkube::agent::{network, pool, volume};
use virtkube_crds::{Network, StoragePool, Volume};

use agent_support::{NODE, ok};

const NODE_FINALIZER: &str = "node.virtkube.io/node-a";

fn with_finalizer<K: Resource>(mut obj: K, finalizer: &str) -> K {
    obj.meta_mut()
        .finalizers
        .get_or_insert_with(Vec::new)
        .push(finalizer.to_string());
    obj
}

fn test_pool(name: &str) -> StoragePool {
    serde_json::from_value(json!({
        "apiVersion": "virtkube.io/v1alpha1",
        "kind": "StoragePool",
        "metadata": { "name": name, "uid": format!("uid-{name}"), "generation": 1, "resourceVersion": "1" },
        "spec": { "type": "dir", "target": { "path": format!("/var/lib/virtkube/pools/{name}") }, "autostart": true }
    }))
    .unwrap()
}

/// A Volume bound to this node the way the cluster controller binds it: `status.nodeName`
/// (written by a status write) and the node's routing label.
fn test_volume(ns: &str, pool: &str, policy: &str) -> Volume {
    serde_json::from_value(json!({
        "apiVersion": "virtkube.io/v1alpha1",
        "kind": "Volume",
        "metadata": { "name": "disk", "namespace": ns, "uid": format!("uid-vol-{ns}"), "generation": 1,
                      "resourceVersion": "1", "labels": { "node.virtkube.io/node-a": "holder" } },
        "spec": { "pool": pool, "capacity": "1Gi", "format": "qcow2", "reclaimPolicy": policy },
        "status": { "nodeName": NODE }
    }))
    .unwrap()
}

/// The status a compare-and-swap status write sets: a JSON patch that tests the
/// resourceVersion it was decided on, then replaces `/status`.
fn written_status(seen: &agent_support::Seen, rv: &str) -> serde_json::Value {
    assert_eq!(
        seen.body[0],
        json!({ "op": "test", "path": "/metadata/resourceVersion", "value": rv }),
        "{}",
        seen.body
    );
    assert_eq!(seen.body[1]["path"], "/status", "{}", seen.body);
    seen.body[1]["value"].clone()
}

/// `obj` as the API server stores it after a status write of `status`: a new resourceVersion.
fn after_status_write<K: Resource + serde::Serialize + serde::de::DeserializeOwned>(
    obj: &K,
    status: &serde_json::Value,
) -> K {
    let mut v = serde_json::to_value(obj).unwrap();
    let rv: u64 = v["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    v["metadata"]["resourceVersion"] = json!((rv + 1).to_string());
    v["status"] = status.clone();
    serde_json::from_value(v).unwrap()
}

/// An empty list of `kind` (what the cluster view of a deletion reads first).
fn empty_list(kind: &str) -> serde_json::Value {
    json!({ "apiVersion": "virtkube.io/v1alpha1", "kind": format!("{kind}List"),
            "metadata": { "resourceVersion": "1" }, "items": [] })
}

/// Answers the deletion's reads of the namespace's Domains and Volumes with `domains` and
/// `volumes`.
async fn answer_cluster_reads(
    api: &mut agent_support::ApiServerVerifier,
    ns: &str,
    domains: serde_json::Value,
    volumes: serde_json::Value,
) {
    for (plural, answer) in [("domains", domains), ("volumes", volumes)] {
        let (seen, send) = api.next().await;
        assert_eq!(seen.method, Method::GET);
        assert_eq!(
            seen.path(),
            format!("/apis/virtkube.io/v1alpha1/namespaces/{ns}/{plural}")
        );
        send.send_response(ok(&answer));
    }
}

fn test_network(name: &str) -> Network {
    serde_json::from_value(json!({
        "apiVersion": "virtkube.io/v1alpha1",
        "kind": "Network",
        "metadata": { "name": name, "uid": format!("uid-{name}"), "generation": 1, "resourceVersion": "1" },
        "spec": { "mode": "isolated", "ip": { "address": "10.151.0.1", "prefix": 24 } }
    }))
    .unwrap()
}

fn deleting<K: Resource>(mut obj: K) -> K {
    obj.meta_mut().deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::now(),
    ));
    obj
}

async fn timed<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .expect("the reconcile waited for an API call nobody answered")
}

/// Brings a pool up through the pool controller and returns it with its status.
async fn pool_up(
    name: &str,
    ctx: &Arc<virtkube::agent::context::Context>,
    api: agent_support::ApiServerVerifier,
) -> (StoragePool, agent_support::ApiServerVerifier) {
    let p = with_finalizer(test_pool(name), NODE_FINALIZER);
    let name = name.to_string();
    let server = {
        let p = p.clone();
        tokio::spawn(async move {
            let mut api = api;
            let (events, seen, send) = api.events_then().await;
            let reasons: Vec<&str> = events.iter().map(|(r, _)| r.as_str()).collect();
            assert!(reasons.starts_with(&["Defined"]), "{reasons:?}");
            assert!(reasons.contains(&"Started"), "{reasons:?}");
            assert_eq!(seen.method, Method::PATCH);
            assert_eq!(
                seen.path(),
                format!("/apis/virtkube.io/v1alpha1/storagepools/{name}/status")
            );
            assert!(
                seen.uri.contains("fieldManager=virtkube-agent.node-a"),
                "{}",
                seen.uri
            );
            assert!(seen.uri.contains("force=true"));
            let nodes = seen.body["status"]["nodes"].as_array().unwrap().clone();
            assert_eq!(nodes.len(), 1, "only this node's entry: {nodes:?}");
            assert_eq!(nodes[0]["nodeName"], NODE);
            assert_eq!(nodes[0]["state"], "Running");
            let ready = &seen.body["status"]["conditions"][0];
            assert_eq!(
                (ready["type"].as_str(), ready["status"].as_str()),
                (Some("Ready"), Some("True"))
            );
            let mut updated = p.clone();
            updated.status = Some(serde_json::from_value(seen.body["status"].clone()).unwrap());
            send.send_response(ok(&updated));
            (updated, api)
        })
    };
    let action = timed(pool::reconcile(Arc::new(p), ctx.clone()))
        .await
        .unwrap();
    assert_eq!(action, Action::requeue(ctx.settings.resync));
    server.await.unwrap()
}

#[tokio::test]
async fn pool_gets_this_nodes_finalizer_then_only_this_nodes_status_entry() {
    let (ctx, mut api, engine) = agent_support::context().await;
    // First pass: the node's own finalizer, with a `test` op, and nothing else.
    let p = test_pool("agentpool");
    let server = tokio::spawn(async move {
        let (seen, send) = api.next().await;
        assert_eq!(seen.method, Method::PATCH);
        assert_eq!(
            seen.body,
            json!([
                { "op": "test", "path": "/metadata/finalizers", "value": null },
                { "op": "add", "path": "/metadata/finalizers", "value": [NODE_FINALIZER] }
            ])
        );
        send.send_response(ok(&with_finalizer(test_pool("agentpool"), NODE_FINALIZER)));
        api
    });
    timed(pool::reconcile(Arc::new(p), ctx.clone()))
        .await
        .unwrap();
    let api = server.await.unwrap();

    let (updated, mut api) = pool_up("agentpool", &ctx, api).await;
    assert!(engine.pool_observe("agentpool").await.unwrap().is_some());

    // Steady state: nothing written, nothing changed on the host.
    engine.reset_stats();
    timed(pool::reconcile(Arc::new(updated.clone()), ctx.clone()))
        .await
        .unwrap();
    api.assert_silent(Duration::from_millis(300)).await;
    assert_eq!(engine.stats().mutating_calls(), 0, "{:?}", engine.stats());

    // Another node's entry appears: the summary changes, and this node still applies only
    // its own entry (server-side apply keeps node-b's, owned by node-b's manager).
    let mut shared = updated.clone();
    let mut other = shared.status.as_ref().unwrap().nodes[0].clone();
    other.node_name = "node-b".into();
    shared.status.as_mut().unwrap().nodes.push(other);
    let answer = shared.clone();
    let server = tokio::spawn(async move {
        let (events, seen, send) = api.events_then().await;
        assert!(events.is_empty(), "{events:?}");
        let nodes = seen.body["status"]["nodes"].as_array().unwrap().clone();
        assert_eq!(nodes.len(), 1, "{nodes:?}");
        assert_eq!(nodes[0]["nodeName"], NODE);
        let message = seen.body["status"]["conditions"][0]["message"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(message, "active on node-a, node-b");
        send.send_response(ok(&answer));
        api
    });
    timed(pool::reconcile(Arc::new(shared), ctx.clone()))
        .await
        .unwrap();
    let mut api = server.await.unwrap();

    // Deletion: this node stops and undefines its pool and removes only its finalizer.
    let gone = deleting(updated);
    let server = tokio::spawn(async move {
        let (events, seen, send) = api.events_then().await;
        assert_eq!(
            events.iter().map(|(r, _)| r.as_str()).collect::<Vec<_>>(),
            ["Deleted"]
        );
        assert_eq!(
            seen.body,
            json!([
                { "op": "test", "path": "/metadata/finalizers/0", "value": NODE_FINALIZER },
                { "op": "remove", "path": "/metadata/finalizers/0" }
            ])
        );
        send.send_response(ok(&test_pool("agentpool")));
    });
    timed(pool::reconcile(Arc::new(gone), ctx.clone()))
        .await
        .unwrap();
    server.await.unwrap();
    assert!(engine.pool_observe("agentpool").await.unwrap().is_none());
}

#[tokio::test]
async fn a_pool_for_other_nodes_is_not_touched() {
    let (ctx, mut api, engine) = agent_support::context().await;
    let mut p = test_pool("elsewhere");
    p.spec.node_selector.insert("zone".into(), "b".into());
    let action = timed(pool::reconcile(Arc::new(p), ctx.clone()))
        .await
        .unwrap();
    assert_eq!(action, Action::await_change());
    api.assert_silent(Duration::from_millis(200)).await;
    assert!(engine.pool_observe("elsewhere").await.unwrap().is_none());
}

#[tokio::test]
async fn volume_is_created_reported_and_deleted_per_reclaim_policy() {
    let (ctx, api, engine) = agent_support::context().await;
    let (_, mut api) = pool_up("volpool", &ctx, api).await;

    for (ns, policy) in [("vdel", "Delete"), ("vret", "Retain")] {
        let v = with_finalizer(test_volume(ns, "volpool", policy), FINALIZER);
        let server = {
            let v = v.clone();
            tokio::spawn(async move {
                // `Creating` is recorded before libvirt is asked for the image.
                let (seen, send) = api.next().await;
                assert_eq!(
                    seen.path(),
                    format!("/apis/virtkube.io/v1alpha1/namespaces/{ns}/volumes/disk/status")
                );
                assert!(
                    seen.uri.contains("fieldManager=virtkube-agent"),
                    "{}",
                    seen.uri
                );
                let creating = written_status(&seen, "1");
                assert_eq!(creating["phase"], "Creating");
                assert_eq!(creating["nodeName"], NODE, "the holder is kept");
                let v = after_status_write(&v, &creating);
                send.send_response(ok(&v));
                let (events, seen, send) = api.events_then().await;
                assert_eq!(
                    events.iter().map(|(r, _)| r.as_str()).collect::<Vec<_>>(),
                    ["VolumeCreated"]
                );
                assert_eq!(
                    seen.path(),
                    format!("/apis/virtkube.io/v1alpha1/namespaces/{ns}/volumes/disk/status")
                );
                let status = written_status(&seen, "2");
                let updated = after_status_write(&v, &status);
                send.send_response(ok(&updated));
                (updated, api)
            })
        };
        timed(volume::reconcile(Arc::new(v), ctx.clone()))
            .await
            .unwrap();
        let (updated, a) = server.await.unwrap();
        api = a;
        let status = updated.status.clone().unwrap();
        assert_eq!(status.node_name.as_deref(), Some(NODE));
        assert_eq!(
            status.volume_name.as_deref(),
            Some(format!("{ns}.disk").as_str())
        );
        assert!(status.key.is_some() && status.path.is_some());
        assert_eq!(
            status.capacity.as_ref().map(|c| c.bytes().unwrap()),
            Some(1 << 30)
        );
        assert!(virtkube_crds::conditions::is_true(
            &status.conditions,
            "Ready"
        ));

        // Steady state is silent.
        timed(volume::reconcile(Arc::new(updated.clone()), ctx.clone()))
            .await
            .unwrap();
        api.assert_silent(Duration::from_millis(200)).await;

        let gone = deleting(updated);
        let server = {
            let mut answer = gone.clone();
            answer.metadata.finalizers = None;
            tokio::spawn(async move {
                answer_cluster_reads(&mut api, ns, empty_list("Domain"), empty_list("Volume"))
                    .await;
                let (events, seen, send) = api.events_then().await;
                assert_eq!(seen.body[1]["op"], "remove", "{}", seen.body);
                send.send_response(ok(&answer));
                (events, api)
            })
        };
        timed(volume::reconcile(Arc::new(gone), ctx.clone()))
            .await
            .unwrap();
        let (events, a) = server.await.unwrap();
        api = a;
        let still_there = engine
            .volume_observe("volpool", &format!("{ns}.disk"))
            .await
            .unwrap()
            .is_some();
        if policy == "Delete" {
            assert_eq!(events[0].0, "VolumeDeleted", "{events:?}");
            assert!(!still_there);
        } else {
            assert_eq!(events[0].0, "Retained", "{events:?}");
            assert!(still_there, "Retain keeps the image");
        }
    }
}

#[tokio::test]
async fn a_volume_not_bound_to_this_node_is_not_touched() {
    let (ctx, mut api, engine) = agent_support::context().await;
    let (_, a) = pool_up("unbound", &ctx, api).await;
    api = a;
    // spec.nodeName names this node, but no holder is bound yet: binding is the
    // controller's job, and an agent never claims a Volume itself.
    let mut v = test_volume("unbound", "unbound", "Delete");
    v.spec.node_name = Some(NODE.into());
    v.status = None;
    let action = timed(volume::reconcile(Arc::new(v.clone()), ctx.clone()))
        .await
        .unwrap();
    assert_eq!(action, Action::await_change());
    // Bound to another node: not this agent's either.
    v.status = Some(virtkube_crds::volume::VolumeStatus {
        node_name: Some("node-b".into()),
        ..Default::default()
    });
    timed(volume::reconcile(Arc::new(v), ctx.clone()))
        .await
        .unwrap();
    api.assert_silent(Duration::from_millis(200)).await;
    assert!(
        engine
            .volume_observe("unbound", "unbound.disk")
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn volume_without_its_pool_is_not_ready_and_says_why_once() {
    let (ctx, mut api, _engine) = agent_support::context().await;
    let v = with_finalizer(test_volume("nopool", "missing-pool", "Delete"), FINALIZER);
    let server = {
        let v = v.clone();
        tokio::spawn(async move {
            let (seen, send) = api.next().await;
            assert!(seen.path().ends_with("/status"));
            let updated = after_status_write(&v, &written_status(&seen, "1"));
            send.send_response(ok(&updated));
            let (events, _, _) = (api.next().await, (), ());
            assert_eq!(events.0.body["reason"], "Failed");
            assert!(
                events.0.body["note"]
                    .as_str()
                    .unwrap()
                    .starts_with("PoolMissing")
            );
            events.1.send_response(ok(&events.0.body));
            (updated, api)
        })
    };
    let result = timed(volume::reconcile(Arc::new(v), ctx.clone())).await;
    assert!(result.is_err(), "retried with backoff");
    let (updated, mut api) = server.await.unwrap();
    let ready =
        virtkube_crds::conditions::find(&updated.status.as_ref().unwrap().conditions, "Ready")
            .unwrap()
            .clone();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "PoolMissing")
    );
    // The same failure again writes nothing and publishes nothing (no event storm).
    let again = timed(volume::reconcile(Arc::new(updated), ctx.clone())).await;
    assert!(again.is_err());
    api.assert_silent(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn network_is_defined_started_and_reported_per_node() {
    let (ctx, mut api, engine) = agent_support::context().await;
    let n = with_finalizer(test_network("agentnet"), NODE_FINALIZER);
    let server = {
        let n = n.clone();
        tokio::spawn(async move {
            let (events, seen, send) = api.events_then().await;
            let reasons: Vec<&str> = events.iter().map(|(r, _)| r.as_str()).collect();
            assert!(
                reasons.contains(&"Defined") && reasons.contains(&"Started"),
                "{reasons:?}"
            );
            assert_eq!(
                seen.path(),
                "/apis/virtkube.io/v1alpha1/networks/agentnet/status"
            );
            assert!(seen.uri.contains("fieldManager=virtkube-agent.node-a"));
            let nodes = seen.body["status"]["nodes"].as_array().unwrap().clone();
            assert_eq!(nodes.len(), 1);
            assert_eq!(nodes[0]["active"], true);
            let mut updated = n.clone();
            updated.status = Some(serde_json::from_value(seen.body["status"].clone()).unwrap());
            send.send_response(ok(&updated));
            (updated, api)
        })
    };
    timed(network::reconcile(Arc::new(n), ctx.clone()))
        .await
        .unwrap();
    let (updated, mut api) = server.await.unwrap();
    assert!(
        engine
            .network_observe("agentnet")
            .await
            .unwrap()
            .unwrap()
            .active
    );
    timed(network::reconcile(Arc::new(updated.clone()), ctx.clone()))
        .await
        .unwrap();
    api.assert_silent(Duration::from_millis(200)).await;
    assert_eq!(updated.name_any(), "agentnet");
}

/// On the in-memory API server, with the Domain bound as the cluster controller binds it.
#[tokio::test]
async fn a_volume_in_use_is_not_deleted_and_says_why() {
    let api = virtkube_testapi::TestApi::start().await.unwrap();
    api.create_namespace("inuse").unwrap();
    let (ctx, _, engine) = agent_support::testapi_context(&api).await;
    let admin = api.client("admin").await.unwrap();
    fn stored<K: serde::de::DeserializeOwned>(
        api: &virtkube_testapi::TestApi,
        plural: &str,
        ns: &str,
        name: &str,
    ) -> Arc<K> {
        Arc::new(serde_json::from_value(api.get(plural, ns, name).unwrap()).unwrap())
    }
    api.create(
        "storagepools",
        json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "StoragePool",
               "metadata": {"name": "usepool"},
               "spec": {"type": "dir", "target": {"path": "/var/lib/virtkube/pools/usepool"}}}),
    )
    .unwrap();
    api.create(
        "volumes",
        json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Volume",
               "metadata": {"name": "disk", "namespace": "inuse"},
               "spec": {"pool": "usepool", "capacity": "1Gi", "format": "qcow2",
                        "reclaimPolicy": "Delete", "nodeName": NODE}}),
    )
    .unwrap();
    agent_support::bind_volume(&api, "inuse", "disk", NODE).await;
    // The finalizer first, then the object itself.
    for _ in 0..2 {
        timed(pool::reconcile(
            stored(&api, "storagepools", "", "usepool"),
            ctx.clone(),
        ))
        .await
        .unwrap();
    }
    for _ in 0..2 {
        timed(volume::reconcile(
            stored(&api, "volumes", "inuse", "disk"),
            ctx.clone(),
        ))
        .await
        .unwrap();
    }
    // A domain that uses it (the agent reads the Volume from the API: no reflector here).
    api.create(
        "domains",
        json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Domain",
               "metadata": {"name": "user", "namespace": "inuse"},
               "spec": {"runStrategy": "Halted", "memory": {"size": "64Mi"},
                        "disks": [{"name": "root", "volume": "disk"}]}}),
    )
    .unwrap();
    agent_support::bind_domain(&admin, "inuse", "user", NODE).await;
    timed(virtkube::agent::domain::reconcile(
        stored(&api, "domains", "inuse", "user"),
        ctx.clone(),
    ))
    .await
    .unwrap();
    assert!(engine.domain_lookup("inuse.user").await.unwrap().is_some());

    // Deleting the volume waits while the domain uses it, and says why.
    api.delete("volumes", "inuse", "disk").unwrap();
    let result = timed(volume::reconcile(
        stored(&api, "volumes", "inuse", "disk"),
        ctx.clone(),
    ))
    .await;
    assert!(result.is_err(), "the deletion is retried with backoff");
    let vol: Arc<Volume> = stored(&api, "volumes", "inuse", "disk");
    let ready = virtkube_crds::conditions::find(&vol.status.as_ref().unwrap().conditions, "Ready")
        .unwrap()
        .clone();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "VolumeInUse")
    );
    assert!(
        agent_support::events(&api)
            .iter()
            .any(|(name, reason, ..)| name == "disk" && reason == "DeletionBlocked"),
        "{:?}",
        agent_support::events(&api)
    );
    assert!(
        engine
            .volume_observe("usepool", "inuse.disk")
            .await
            .unwrap()
            .is_some(),
        "a volume in use is never deleted"
    );
}

#[tokio::test]
async fn a_pool_no_longer_selected_is_removed_here_and_let_go() {
    let (ctx, api, engine) = agent_support::context().await;
    let (mut p, mut api) = pool_up("deselpool", &ctx, api).await;
    // The agent has read its node's labels (none): a selector for zone b leaves it out.
    ctx.set_labels(Default::default());
    p.spec.node_selector.insert("zone".into(), "b".into());
    let answer = p.clone();
    let server = tokio::spawn(async move {
        let (events, seen, send) = api.events_then().await;
        assert_eq!(
            events.iter().map(|(r, _)| r.as_str()).collect::<Vec<_>>(),
            ["Deleted"]
        );
        // This node's status entry released: an apply with nothing under its manager.
        assert!(seen.path().ends_with("/storagepools/deselpool/status"));
        assert!(seen.uri.contains("fieldManager=virtkube-agent.node-a"));
        assert_eq!(seen.body["status"], json!({}));
        send.send_response(ok(&answer));
        // Its finalizer removed, guarded by the resourceVersion.
        let (seen, send) = api.next().await;
        assert_eq!(seen.method, Method::PATCH);
        assert_eq!(
            seen.body,
            json!({ "metadata": { "resourceVersion": "1", "finalizers": [] } })
        );
        send.send_response(ok(&answer));
    });
    let action = timed(pool::reconcile(Arc::new(p), ctx.clone()))
        .await
        .unwrap();
    assert_eq!(action, Action::await_change());
    server.await.unwrap();
    assert!(engine.pool_observe("deselpool").await.unwrap().is_none());
}

/// A pool's `status.observedGeneration` follows the generation the agent acted on (the
/// in-memory API server underneath), so kstatus and `kubectl wait` see a spec edit as in
/// progress until an agent has acted on it; another node's entry written for an older
/// generation does not hold it back.
#[tokio::test]
async fn a_pools_observed_generation_follows_the_spec_the_agent_acted_on() {
    let api = virtkube_testapi::TestApi::start().await.unwrap();
    let (ctx, _, _engine) = agent_support::testapi_context(&api).await;
    api.create(
        "storagepools",
        json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "StoragePool",
               "metadata": {"name": "obsgen"},
               "spec": {"type": "dir", "target": {"path": "/var/lib/virtkube/pools/obsgen"}}}),
    )
    .unwrap();
    let stored = || -> StoragePool {
        serde_json::from_value(api.get("storagepools", "", "obsgen").unwrap()).unwrap()
    };
    let observed = |p: &StoragePool| p.status.as_ref().and_then(|s| s.observed_generation);
    // The finalizer first, then the pool and its status.
    for _ in 0..2 {
        timed(pool::reconcile(Arc::new(stored()), ctx.clone()))
            .await
            .unwrap();
    }
    assert_eq!(observed(&stored()), Some(1));

    // node-b reports too, for generation 1, under its own manager.
    let admin = api.client("admin").await.unwrap();
    let pools: kube::Api<StoragePool> = kube::Api::all(admin);
    pools
        .patch_status(
            "obsgen",
            &kube::api::PatchParams::apply("virtkube-agent.node-b").force(),
            &kube::api::Patch::Apply(json!({
                "apiVersion": "virtkube.io/v1alpha1", "kind": "StoragePool",
                "status": {"observedGeneration": 1,
                           "nodes": [{"nodeName": "node-b", "state": "Running"}]}})),
        )
        .await
        .unwrap();

    api.edit_spec("storagepools", "", "obsgen", |s| {
        s["autostart"] = json!(false)
    })
    .unwrap();
    let edited = stored();
    assert_eq!(edited.metadata.generation, Some(2));
    assert_eq!(observed(&edited), Some(1), "not acted on yet");
    timed(pool::reconcile(Arc::new(edited), ctx.clone()))
        .await
        .unwrap();
    let acted = stored();
    assert_eq!(observed(&acted), Some(2));
    let status = acted.status.unwrap();
    assert_eq!(
        status.nodes.len(),
        2,
        "node-b's entry stays: {:?}",
        status.nodes
    );
    let ready = virtkube_crds::conditions::find(&status.conditions, "Ready").unwrap();
    assert_eq!(ready.observed_generation, Some(2));

    // Steady state: nothing to write.
    let rv = api.resource_version();
    timed(pool::reconcile(Arc::new(stored()), ctx.clone()))
        .await
        .unwrap();
    assert_eq!(api.resource_version(), rv, "no write in steady state");
}
