//! A network a guest is attached to is never removed from under it: the agent's Network
//! controller against the in-memory API server, on `test:///default`.
//!
//! - A Network deleted, or no longer selecting this node, stays on the node while any domain
//!   there has an interface on it — the agent's or another's, running or only defined —
//!   with a `DeletionBlocked` event naming them and the node's status entry saying why; it
//!   goes once they are gone.
//! - An agent that has not read its node's labels yet never concludes that a Network with a
//!   `nodeSelector` no longer selects it.

use std::collections::BTreeMap;
use std::sync::Arc;

use kube::api::Api;
use prometheus_client::registry::Registry;
use serde_json::json;
use virtkube::agent::context::{Context, Settings};
use virtkube::agent::metrics::Metrics;
use virtkube::agent::network;
use virtkube::host::{HostSpec, Hosts};
use virtkube_crds::Network;
use virtkube_engine::model::{DomainDef, InterfaceDef};
use virtkube_engine::{Engine, EngineConfig, Owner};
use virtkube_testapi::{ADMIN, TestApi};

const NODE: &str = "node-a";
const NODE_FINALIZER: &str = "node.virtkube.io/node-a";

async fn agent(api: &TestApi) -> (Arc<Context>, Engine, kube::Client) {
    let client = api.client(ADMIN).await.unwrap();
    let hosts = Hosts::connect(
        &[HostSpec {
            node: NODE.into(),
            uri: "test:///default".into(),
            p2p_uri: None,
            migration_uri: None,
        }],
        EngineConfig::default(),
    )
    .await
    .unwrap();
    let engine = hosts.get(NODE).unwrap().engine.clone();
    let metrics = Metrics::register(&mut Registry::default(), None);
    let ctx = Context::new(client.clone(), hosts, metrics, Settings::for_node(NODE)).unwrap();
    (Arc::new(ctx), engine, client)
}

/// What the agent read of its node's labels.
fn node_labels(ctx: &Context, labels: &[(&str, &str)]) {
    ctx.set_labels(
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
    );
}

async fn reconcile(ctx: &Arc<Context>, client: &kube::Client, name: &str) -> Option<String> {
    let net = Api::<Network>::all(client.clone())
        .get_opt(name)
        .await
        .unwrap()?;
    match network::reconcile(Arc::new(net), ctx.clone()).await {
        Ok(_) => None,
        Err(e) => Some(e.to_string()),
    }
}

/// A Network `name` (with `selector`) made on this node through the controller.
async fn network_up(
    api: &TestApi,
    ctx: &Arc<Context>,
    client: &kube::Client,
    engine: &Engine,
    name: &str,
    selector: serde_json::Value,
) {
    api.create(
        "networks",
        json!({ "apiVersion": "virtkube.io/v1alpha1", "kind": "Network",
                "metadata": { "name": name },
                "spec": { "mode": "isolated", "ip": { "address": "10.161.0.1", "prefix": 24 },
                          "nodeSelector": selector } }),
    )
    .unwrap();
    for _ in 0..2 {
        assert_eq!(reconcile(ctx, client, name).await, None);
    }
    assert!(engine.network_observe(name).await.unwrap().is_some());
}

/// A guest on this node with an interface on `network`, made by someone else (another
/// resource's mark: no Domain resource here knows it).
async fn guest_on(engine: &Engine, name: &str, network: &str, start: bool) -> Owner {
    let owner = Owner::new("Domain", format!("uid-{name}"), Some("elsewhere"), name);
    let mut def = DomainDef::new(name, owner.clone());
    def.virt_type = "test".into();
    def.interfaces.push(InterfaceDef {
        name: None,
        network: network.into(),
        model: None,
        mac: None,
    });
    engine.domain_define(&def).await.unwrap();
    if start {
        engine.domain_start(name, &owner).await.unwrap();
    }
    owner
}

fn blocked_notes(api: &TestApi, name: &str) -> Vec<String> {
    api.events()
        .iter()
        .filter(|e| e["regarding"]["name"] == name && e["reason"] == "DeletionBlocked")
        .map(|e| e["note"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn node_message(api: &TestApi, name: &str) -> String {
    api.get("networks", "", name).unwrap()["status"]["nodes"][0]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn a_deleted_network_stays_while_a_guest_on_the_node_uses_it() {
    let api = TestApi::start().await.unwrap();
    let (ctx, engine, client) = agent(&api).await;
    network_up(&api, &ctx, &client, &engine, "vknet", json!({})).await;
    // Defined only, not running: it would start on the network.
    let owner = guest_on(&engine, "guest", "vknet", false).await;

    api.delete("networks", "", "vknet").unwrap();
    let error = reconcile(&ctx, &client, "vknet").await.expect("it waits");
    assert!(error.contains("Domain elsewhere/guest"), "{error}");
    assert!(engine.network_observe("vknet").await.unwrap().is_some());
    let notes = blocked_notes(&api, "vknet");
    assert!(
        notes.iter().any(|n| n.contains("Domain elsewhere/guest")),
        "{notes:?}"
    );
    assert!(
        node_message(&api, "vknet").starts_with("NetworkInUse"),
        "{}",
        node_message(&api, "vknet")
    );

    // Once the guest is gone, the network goes and so does the resource.
    engine.domain_undefine("guest", &owner).await.unwrap();
    assert_eq!(reconcile(&ctx, &client, "vknet").await, None);
    assert!(engine.network_observe("vknet").await.unwrap().is_none());
    assert!(api.get("networks", "", "vknet").is_none());
}

#[tokio::test]
async fn a_network_no_longer_selecting_the_node_stays_while_a_running_guest_uses_it() {
    let api = TestApi::start().await.unwrap();
    let (ctx, engine, client) = agent(&api).await;
    node_labels(&ctx, &[("zone", "a")]);
    network_up(
        &api,
        &ctx,
        &client,
        &engine,
        "zonenet",
        json!({ "zone": "a" }),
    )
    .await;
    let owner = guest_on(&engine, "runner", "zonenet", true).await;

    // The node leaves the zone: the network is not this node's any more, but a guest runs
    // on it.
    node_labels(&ctx, &[("zone", "b")]);
    let error = reconcile(&ctx, &client, "zonenet").await.expect("it waits");
    assert!(error.contains("Domain elsewhere/runner"), "{error}");
    assert!(engine.network_observe("zonenet").await.unwrap().is_some());
    let stored = api.get("networks", "", "zonenet").unwrap();
    assert_eq!(stored["metadata"]["finalizers"], json!([NODE_FINALIZER]));
    assert!(!blocked_notes(&api, "zonenet").is_empty());

    engine.domain_destroy("runner", &owner).await.unwrap();
    engine.domain_undefine("runner", &owner).await.unwrap();
    assert_eq!(reconcile(&ctx, &client, "zonenet").await, None);
    assert!(engine.network_observe("zonenet").await.unwrap().is_none());
    let stored = api.get("networks", "", "zonenet").unwrap();
    assert_eq!(stored["metadata"]["finalizers"], json!([]));
}

#[tokio::test]
async fn an_agent_that_has_not_read_its_labels_never_deselects_a_network() {
    let api = TestApi::start().await.unwrap();
    // A network this node made earlier (its finalizer is there), selected by a label.
    let (first, engine, client) = agent(&api).await;
    node_labels(&first, &[("zone", "a")]);
    network_up(
        &api,
        &first,
        &client,
        &engine,
        "keep",
        json!({ "zone": "a" }),
    )
    .await;

    // A new agent on the same libvirt (a restart), before it read the node's labels.
    let metrics = Metrics::register(&mut Registry::default(), None);
    let restarted = Arc::new(
        Context::new(
            client.clone(),
            first.hosts.clone(),
            metrics,
            Settings::for_node(NODE),
        )
        .unwrap(),
    );
    let before = api.resource_version();
    assert_eq!(reconcile(&restarted, &client, "keep").await, None);
    assert!(
        engine.network_observe("keep").await.unwrap().is_some(),
        "unknown labels are not `not selected`"
    );
    let stored = api.get("networks", "", "keep").unwrap();
    assert_eq!(stored["metadata"]["finalizers"], json!([NODE_FINALIZER]));
    assert!(
        api.changes_since(before).is_empty(),
        "nothing written before the labels are known"
    );
}
