//! The chart's node policy (`charts/virtkube/policy/agent-node.yaml`, rendered as a
//! ValidatingAdmissionPolicy for Kubernetes 1.30+) against writes a compromised node's agent
//! could try: each is made with the agent's real RBAC, as the agent of node-b (its token
//! bound to node-b, as a pod's token is on such a cluster), on objects of node-a, and must be
//! refused with the policy's message; the same kinds of writes as node-a's own agent, within
//! the placement protocol, must pass. A token without the node binding (Kubernetes
//! 1.24-1.29) is not matched: what that leaves open is asserted too, so the README's
//! "what is not protected" stays true.
//!
//! That the honest agent is never refused is checked by `agent_rbac.rs`, which runs the real
//! agent process through all its writes under the same policy.

mod agent_support;

use agent_support::rbac::{self, Role};
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};
use virtkube_testapi::admission::token_on_node;
use virtkube_testapi::{ADMIN, Config, TestApi};

const NS: &str = "tenant";

fn resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("virtkube.io", "v1alpha1", kind),
        plural,
    )
}

/// The API of `plural` for `client` (namespaced kinds in [`NS`]).
fn api(client: &kube::Client, kind: &str, plural: &str) -> Api<DynamicObject> {
    let ar = resource(kind, plural);
    if matches!(plural, "domains" | "volumes") {
        Api::namespaced_with(client.clone(), NS, &ar)
    } else {
        Api::all_with(client.clone(), &ar)
    }
}

/// A merge patch of `plural/name` (its status with `status`), as `client`; the server's
/// message on a refusal.
async fn patch(
    client: &kube::Client,
    kind: &str,
    plural: &str,
    name: &str,
    status: bool,
    body: Value,
) -> Result<(), String> {
    let api = api(client, kind, plural);
    let params = PatchParams::default();
    let result = if status {
        api.patch_status(name, &params, &Patch::Merge(&body)).await
    } else {
        api.patch(name, &params, &Patch::Merge(&body)).await
    };
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) => Err(format!("{} {}", s.code, s.message)),
        Err(e) => panic!("{plural}/{name}: {e}"),
    }
}

/// node-a's objects: its HypervisorNode, a Domain and a Volume it holds, a Network with its
/// status entry and finalizer (and node-b's, for the network present on both).
async fn cluster() -> (TestApi, kube::Client) {
    let api = TestApi::start_with(Config {
        authorizer: Some(rbac::enforcing()),
        admission: rbac::node_policy(),
        ..Config::default()
    })
    .await
    .unwrap();
    api.create_namespace(NS).unwrap();
    let admin = api.client(ADMIN).await.unwrap();
    for node in ["node-a", "node-b"] {
        agent_support::hypervisor_node(&admin, node, &format!("qemu+tls://{node}/system")).await;
    }
    api.create(
        "domains",
        json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Domain",
               "metadata": {"name": "vm", "namespace": NS},
               "spec": {"memory": {"size": "64Mi"}, "cpu": {"vcpus": 1}}}),
    )
    .unwrap();
    agent_support::bind_domain(&admin, NS, "vm", "node-a").await;
    api.create(
        "storagepools",
        json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "StoragePool",
               "metadata": {"name": "pool"},
               "spec": {"type": "dir", "target": {"path": "/var/lib/virtkube/pools/pool"}}}),
    )
    .unwrap();
    api.create(
        "volumes",
        json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Volume",
               "metadata": {"name": "disk", "namespace": NS},
               "spec": {"pool": "pool", "capacity": "1Gi", "nodeName": "node-a"}}),
    )
    .unwrap();
    agent_support::bind_volume(&api, NS, "disk", "node-a").await;
    api.create(
        "networks",
        json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Network",
               "metadata": {"name": "net", "finalizers":
                   ["node.virtkube.io/node-a", "node.virtkube.io/node-b"]},
               "spec": {"mode": "isolated", "ip": {"address": "10.157.0.1", "prefix": 24}}}),
    )
    .unwrap();
    patch(
        &admin,
        "Network",
        "networks",
        "net",
        true,
        json!({"status": {"nodes": [
            {"nodeName": "node-a", "active": true, "bridge": "vk-a"},
            {"nodeName": "node-b", "active": true, "bridge": "vk-b"}]}}),
    )
    .await
    .unwrap();
    (api, admin)
}

fn refused(result: Result<(), String>, needle: &str, what: &str) {
    match result {
        Ok(()) => panic!("{what}: accepted, but the node policy must refuse it"),
        Err(message) => {
            assert!(
                message.starts_with("403 ")
                    && message.contains("ValidatingAdmissionPolicy 'virtkube-agent-node'")
                    && message.contains(needle),
                "{what}: refused, but not by the node policy saying {needle:?}: {message}"
            );
            println!("refused: {what}: {message}");
        }
    }
}

#[tokio::test]
async fn another_nodes_agent_cannot_touch_node_a_objects() {
    let (api, _admin) = cluster().await;
    let b = api
        .client(&token_on_node(&Role::Agent.identity(), "node-b"))
        .await
        .unwrap();

    refused(
        patch(
            &b,
            "Domain",
            "domains",
            "vm",
            true,
            json!({"status": {"nodeName": "node-b"}}),
        )
        .await,
        "only the domains and volumes its node holds",
        "node-b takes node-a's domain claim",
    );
    refused(
        patch(
            &b,
            "Domain",
            "domains",
            "vm",
            true,
            json!({"status": {"phase": "Failed"}}),
        )
        .await,
        "only the domains and volumes its node holds",
        "node-b rewrites node-a's domain status",
    );
    refused(
        patch(
            &b,
            "Domain",
            "domains",
            "vm",
            false,
            json!({"metadata": {"finalizers": null}}),
        )
        .await,
        "only the domains and volumes its node holds",
        "node-b drops the finalizer of node-a's domain",
    );
    refused(
        patch(
            &b,
            "Volume",
            "volumes",
            "disk",
            true,
            json!({"status": {"phase": "Failed"}}),
        )
        .await,
        "only the domains and volumes its node holds",
        "node-b rewrites node-a's volume status",
    );
    refused(
        patch(
            &b,
            "HypervisorNode",
            "hypervisornodes",
            "node-a",
            true,
            json!({"status": {"libvirtUri": "qemu+tls://attacker/system"}}),
        )
        .await,
        "only its own node's HypervisorNode",
        "node-b redirects node-a's published libvirt URI",
    );
    refused(
        patch(
            &b,
            "Network",
            "networks",
            "net",
            true,
            json!({"status": {"nodes": [{"nodeName": "node-b", "active": true, "bridge": "vk-b"}]}}),
        )
        .await,
        "only its own node's entry of status.nodes",
        "node-b removes node-a's network status entry",
    );
    refused(
        patch(
            &b,
            "Network",
            "networks",
            "net",
            false,
            json!({"metadata": {"finalizers": ["node.virtkube.io/node-b"]}}),
        )
        .await,
        "only its own node's finalizer",
        "node-b removes node-a's network finalizer",
    );

    // Its own objects and entries it may write.
    patch(
        &b,
        "HypervisorNode",
        "hypervisornodes",
        "node-b",
        true,
        json!({"status": {"libvirtUri": "qemu+tls://node-b.example/system"}}),
    )
    .await
    .expect("node-b writes its own HypervisorNode");
    patch(
        &b,
        "Network",
        "networks",
        "net",
        true,
        json!({"status": {"nodes": [
            {"nodeName": "node-a", "active": true, "bridge": "vk-a"},
            {"nodeName": "node-b", "active": false, "bridge": "vk-b"}]}}),
    )
    .await
    .expect("node-b writes its own network status entry");
    patch(
        &b,
        "Network",
        "networks",
        "net",
        false,
        json!({"metadata": {"finalizers": ["node.virtkube.io/node-a"]}}),
    )
    .await
    .expect("node-b removes its own network finalizer");
    let vm = api.get("domains", NS, "vm").unwrap();
    assert_eq!(vm["status"]["nodeName"], "node-a", "the claim is unchanged");
    let node_a = api.get("hypervisornodes", "", "node-a").unwrap();
    assert_eq!(node_a["status"]["libvirtUri"], "qemu+tls://node-a/system");
}

#[tokio::test]
async fn the_holders_agent_moves_a_claim_only_as_the_protocol_allows() {
    let (api, admin) = cluster().await;
    let a = api
        .client(&token_on_node(&Role::Agent.identity(), "node-a"))
        .await
        .unwrap();

    patch(
        &a,
        "Domain",
        "domains",
        "vm",
        true,
        json!({"status": {"phase": "Running"}}),
    )
    .await
    .expect("the holder writes its domain's status");
    refused(
        patch(
            &a,
            "Domain",
            "domains",
            "vm",
            true,
            json!({"status": {"nodeName": "node-b"}}),
        )
        .await,
        "only to the target of a move from its node",
        "the holder gives its claim away without an approved move",
    );
    refused(
        patch(
            &a,
            "Domain",
            "domains",
            "vm",
            true,
            json!({"status": {"migration": {"state": "Pending", "sourceNode": "node-a", "targetNode": "node-b"}}}),
        )
        .await,
        "only the controller records a move's source and target",
        "the holder approves its own move",
    );
    refused(
        patch(
            &a,
            "Domain",
            "domains",
            "vm",
            false,
            json!({"spec": {"nodeName": "node-b"}}),
        )
        .await,
        "never changes a spec",
        "the holder edits the spec",
    );
    refused(
        patch(
            &a,
            "Volume",
            "volumes",
            "disk",
            true,
            json!({"status": {"nodeName": "node-b"}}),
        )
        .await,
        "only the controller binds a volume to a node",
        "the holder rebinds its volume",
    );

    // The controller approves a move to node-b: the holder runs it and hands the claim over
    // (BeginMove, then CompleteMove, as the agent writes them).
    agent_support::approve_move(&admin, NS, "vm", "node-b").await;
    patch(
        &a,
        "Domain",
        "domains",
        "vm",
        true,
        json!({"status": {"migration": {"state": "Running"}}}),
    )
    .await
    .expect("the source starts the approved move");
    refused(
        patch(
            &a,
            "Domain",
            "domains",
            "vm",
            true,
            json!({"status": {"nodeName": "node-c"}}),
        )
        .await,
        "only to the target of a move from its node",
        "the source hands the claim to a node the move does not name",
    );
    patch(
        &a,
        "Domain",
        "domains",
        "vm",
        true,
        json!({"status": {"nodeName": "node-b", "migration": {"state": "Succeeded"}}}),
    )
    .await
    .expect("the source hands the claim to the move's target");
    // node-a holds it no more: its credentials cannot touch it now.
    refused(
        patch(
            &a,
            "Domain",
            "domains",
            "vm",
            true,
            json!({"status": {"nodeName": "node-a"}}),
        )
        .await,
        "only the domains and volumes its node holds",
        "the former holder takes the claim back",
    );
}

#[tokio::test]
async fn a_token_without_the_node_binding_is_not_matched() {
    // On Kubernetes 1.24-1.29 the token names no node: the policy cannot apply, and the
    // agent's RBAC alone lets it rewrite another node's claim (the README says so).
    let (api, _admin) = cluster().await;
    let unbound = api.client(&Role::Agent.identity()).await.unwrap();
    patch(
        &unbound,
        "Domain",
        "domains",
        "vm",
        true,
        json!({"status": {"nodeName": "node-b"}}),
    )
    .await
    .expect("without the node binding the policy does not apply");
    assert_eq!(
        api.get("domains", NS, "vm").unwrap()["status"]["nodeName"],
        "node-b"
    );
    assert_eq!(api.admission_denials(), vec![]);
}

#[tokio::test]
async fn a_volume_handover_advances_only_as_the_protocol_allows() {
    let (api, admin) = cluster().await;
    let agent = |node: &'static str| {
        let api = &api;
        async move {
            api.client(&token_on_node(&Role::Agent.identity(), node))
                .await
                .unwrap()
        }
    };
    let (a, b) = (agent("node-a").await, agent("node-b").await);
    let transfer = |state: &str| json!({"status": {"transfer": {"domain": "vm", "sourceNode": "node-a", "targetNode": "node-b", "state": state}}});
    let vol = |client, body| patch(client, "Volume", "volumes", "disk", true, body);
    refused(
        vol(&a, transfer("Copying")).await,
        "only the controller starts a volume's handover",
        "the holder starts a handover",
    );
    refused(
        patch(
            &a,
            "Domain",
            "domains",
            "vm",
            true,
            json!({"status": {"migration": {"copiedVolumes": ["disk"]}}}),
        )
        .await,
        "only the controller chooses the volumes a move copies",
        "the holder chooses volumes to copy",
    );
    vol(&admin, transfer("Copying"))
        .await
        .expect("the controller starts it");
    refused(
        vol(&a, transfer("SourceRemoved")).await,
        "only from Copied to SourceRemoved",
        "the source skips the copy's completion",
    );
    refused(
        vol(&a, json!({"status": {"transfer": null}})).await,
        "its new holder ends it",
        "the source drops a handover under way",
    );
    vol(&admin, transfer("Copied"))
        .await
        .expect("the controller records the copy");
    vol(&a, transfer("SourceRemoved"))
        .await
        .expect("the source removed its stale image");
    refused(
        vol(&a, json!({"status": {"nodeName": "node-b"}})).await,
        "only the controller binds a volume to a node",
        "the source binds the volume to the target",
    );
    vol(&admin, json!({"status": {"nodeName": "node-b"}}))
        .await
        .expect("the controller binds it to the target");
    vol(
        &b,
        json!({"status": {"transfer": null, "key": "/pools/pool/ns.disk"}}),
    )
    .await
    .expect("the new holder takes the copy over and ends the handover");
    assert_eq!(
        api.get("volumes", NS, "disk").unwrap()["status"]["transfer"],
        serde_json::Value::Null
    );
}
