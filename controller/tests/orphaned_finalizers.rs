//! A node removed from the cluster leaves its per-node finalizers (`node.virtkube.io/<node>`)
//! and `status.nodes` entries on every Network and StoragePool it held; no agent is left to
//! remove them. The cluster controller's piece (`cluster::orphans`) releases them on the gone
//! node's behalf, against the in-memory API server (strict about field managers, JSON-patch
//! `test` operations and finalizers): a deleted Network held by a live node and two gone ones
//! waits only for the live node once they are released, and a live node's finalizer and entry
//! are never touched.

use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use virtkube::cluster::orphans::{self, node_finalizer};
use virtkube_crds::{Network, StoragePool};
use virtkube_testapi::{ADMIN, TestApi};

async fn heartbeat(client: &kube::Client, node: &str, ago: Duration) {
    let at = k8s_openapi::jiff::Timestamp::now()
        .checked_sub(k8s_openapi::jiff::SignedDuration::try_from(ago).unwrap())
        .unwrap();
    Api::<virtkube_crds::HypervisorNode>::all(client.clone())
        .patch_status(
            node,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": { "heartbeatTime": at.to_string() } })),
        )
        .await
        .unwrap();
}

/// This node's entry in the Network's status, applied as its agent does (its own manager).
async fn entry(client: &kube::Client, network: &str, node: &str) {
    Api::<Network>::all(client.clone())
        .patch_status(
            network,
            &PatchParams::apply(&format!("virtkube-agent.{node}")).force(),
            &Patch::Apply(json!({
                "apiVersion": "virtkube.io/v1alpha1", "kind": "Network",
                "status": { "nodes": [{ "nodeName": node, "active": true }] }
            })),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn the_finalizers_and_entries_of_nodes_that_left_are_released_and_only_those() {
    let api = TestApi::start().await.unwrap();
    let client = api.client(ADMIN).await.unwrap();
    // Node a is alive (Node, HypervisorNode, fresh heartbeat); b's machine is gone (no
    // Node) and its agent silent for an hour; c is gone without a trace; d lost its Node a
    // minute ago (a reboot or a re-registration: within the grace).
    api.create(
        "nodes",
        json!({ "apiVersion": "v1", "kind": "Node", "metadata": { "name": "a" } }),
    )
    .unwrap();
    for node in ["a", "b", "d"] {
        api.create(
            "hypervisornodes",
            json!({ "apiVersion": "virtkube.io/v1alpha1", "kind": "HypervisorNode",
                    "metadata": { "name": node }, "spec": {} }),
        )
        .unwrap();
    }
    heartbeat(&client, "a", Duration::from_secs(5)).await;
    heartbeat(&client, "b", Duration::from_secs(3600)).await;
    heartbeat(&client, "d", Duration::from_secs(60)).await;

    let finalizers: Vec<String> = ["a", "b", "c", "d"]
        .iter()
        .map(|n| node_finalizer(n))
        .collect();
    api.create(
        "networks",
        json!({ "apiVersion": "virtkube.io/v1alpha1", "kind": "Network",
                "metadata": { "name": "shared", "finalizers": finalizers },
                "spec": { "mode": "isolated" } }),
    )
    .unwrap();
    for node in ["a", "b", "c", "d"] {
        entry(&client, "shared", node).await;
    }
    api.create(
        "storagepools",
        json!({ "apiVersion": "virtkube.io/v1alpha1", "kind": "StoragePool",
                "metadata": { "name": "local", "finalizers": [node_finalizer("c")] },
                "spec": { "type": "dir", "target": { "path": "/var/lib/virtkube/pools/local" } } }),
    )
    .unwrap();
    api.delete("networks", "", "shared").unwrap();
    api.delete("storagepools", "", "local").unwrap();

    let members = orphans::read_membership(&client, orphans::DEFAULT_GRACE)
        .await
        .unwrap();
    let networks: Api<Network> = Api::all(client.clone());
    let net = networks.get("shared").await.unwrap();
    let entries: Vec<String> = net
        .status
        .as_ref()
        .unwrap()
        .nodes
        .iter()
        .map(|n| n.node_name.clone())
        .collect();
    let released = orphans::release(&networks, &net, &entries, &members)
        .await
        .unwrap();
    assert_eq!(
        released.finalizers,
        vec![node_finalizer("b"), node_finalizer("c")]
    );
    assert_eq!(released.entries, vec!["b".to_string(), "c".to_string()]);
    let net = networks.get("shared").await.unwrap();
    assert_eq!(
        net.metadata.finalizers.clone().unwrap(),
        vec![node_finalizer("a"), node_finalizer("d")],
        "live nodes keep theirs"
    );
    let left: Vec<String> = net
        .status
        .unwrap()
        .nodes
        .iter()
        .map(|n| n.node_name.clone())
        .collect();
    assert_eq!(left, vec!["a".to_string(), "d".to_string()]);

    // Again: nothing more to release, and no call at all.
    let before = api.resource_version();
    let net = networks.get("shared").await.unwrap();
    let again = orphans::release(&networks, &net, &["a".into(), "d".into()], &members)
        .await
        .unwrap();
    assert!(again.is_empty());
    assert_eq!(api.resource_version(), before);

    // A pool only the gone node held: released, and its deletion completes.
    let pools: Api<StoragePool> = Api::all(client.clone());
    let pool = pools.get("local").await.unwrap();
    orphans::release(&pools, &pool, &[], &members)
        .await
        .unwrap();
    assert!(pools.get_opt("local").await.unwrap().is_none());
}

#[tokio::test]
async fn a_stale_read_of_the_finalizers_is_refused_not_overwritten() {
    let api = TestApi::start().await.unwrap();
    let client = api.client(ADMIN).await.unwrap();
    api.create(
        "networks",
        json!({ "apiVersion": "virtkube.io/v1alpha1", "kind": "Network",
                "metadata": { "name": "raced", "finalizers": [node_finalizer("gone")] },
                "spec": { "mode": "isolated" } }),
    )
    .unwrap();
    let networks: Api<Network> = Api::all(client.clone());
    let stale = networks.get("raced").await.unwrap();
    // A node joins and its agent adds its finalizer after the controller read the object.
    networks
        .patch(
            "raced",
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": {
                "finalizers": [node_finalizer("gone"), node_finalizer("new")] } })),
        )
        .await
        .unwrap();
    let members = orphans::read_membership(&client, orphans::DEFAULT_GRACE)
        .await
        .unwrap();
    let result = orphans::release(&networks, &stale, &[], &members).await;
    assert!(result.is_err(), "decided on a stale list: {result:?}");
    let now = networks.get("raced").await.unwrap();
    assert_eq!(
        now.metadata.finalizers.unwrap(),
        vec![node_finalizer("gone"), node_finalizer("new")]
    );
}
