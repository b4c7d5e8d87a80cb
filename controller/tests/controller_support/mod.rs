//! Objects for the controller's tests, as JSON (what `kubectl apply` or an agent would
//! write), usable both as typed objects for the pure decisions and as objects in the
//! in-memory API server.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use virtkube::cluster::settings::Settings;
use virtkube::cluster::view::Cluster;
use virtkube_crds::{Domain, HypervisorNode, Network, StoragePool, Volume};

/// The time every pure test decides at.
pub const NOW: &str = "2026-11-30T12:00:00Z";

/// [`NOW`] as a timestamp.
pub fn now() -> Timestamp {
    NOW.parse().unwrap()
}

/// [`NOW`] + `secs`.
pub fn at(secs: i64) -> Timestamp {
    now().checked_add(SignedDuration::from_secs(secs)).unwrap()
}

/// RFC 3339 text of [`at`].
pub fn ts(secs: i64) -> String {
    at(secs).to_string()
}

/// A typed object from JSON.
pub fn obj<K: DeserializeOwned>(v: Value) -> K {
    serde_json::from_value(v).unwrap()
}

/// A HypervisorNode without status.
pub fn hvn_meta(name: &str) -> Value {
    json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "HypervisorNode",
           "metadata": {"name": name}, "spec": {}})
}

/// What an agent publishes: memory, CPUs, a heartbeat at `heartbeat`, Ready.
pub fn hvn_status(memory: &str, cpus: u32, heartbeat: &str) -> Value {
    json!({
        "memory": {"total": memory, "free": memory},
        "cpu": {"count": cpus, "sockets": 1, "cores": cpus, "threads": 1},
        "maxVcpus": 64,
        "heartbeatTime": heartbeat,
        "conditions": [{"type": "Ready", "status": "True", "reason": "LibvirtReachable",
                        "message": "libvirt answers", "lastTransitionTime": heartbeat}]
    })
}

/// A Ready HypervisorNode that beat `age` seconds before [`NOW`].
pub fn hvn(name: &str, memory: &str, cpus: u32, age: i64) -> Value {
    let mut v = hvn_meta(name);
    v["status"] = hvn_status(memory, cpus, &ts(-age));
    v
}

/// A Kubernetes Node.
pub fn k8s_node(name: &str, unschedulable: bool, taints: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
           "spec": {"unschedulable": unschedulable, "taints": taints}})
}

/// A Network active on `nodes`.
pub fn network(name: &str, nodes: &[&str]) -> Value {
    json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Network",
           "metadata": {"name": name},
           "spec": {"mode": "isolated"},
           "status": {"nodes": nodes.iter().map(|n| json!({"nodeName": n, "active": true})).collect::<Vec<_>>()}})
}

/// A dir StoragePool running on `nodes` (the state as the agent writes it).
pub fn pool(name: &str, shared: bool, nodes: &[&str]) -> Value {
    json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "StoragePool",
           "metadata": {"name": name},
           "spec": {"type": "dir", "target": {"path": format!("/var/lib/virtkube/{name}")}, "shared": shared},
           "status": {"nodes": nodes.iter().map(|n| json!({"nodeName": n, "state": "Running"})).collect::<Vec<_>>()}})
}

/// A 1Gi qcow2 Volume in `pool`.
pub fn volume(ns: &str, name: &str, pool: &str) -> Value {
    json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Volume",
           "metadata": {"name": name, "namespace": ns},
           "spec": {"pool": pool, "capacity": "1Gi"}})
}

/// A Domain of `memory` naming no node.
pub fn domain(ns: &str, name: &str, memory: &str) -> Value {
    json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Domain",
           "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{ns}-{name}"),
                        "resourceVersion": "1", "generation": 1},
           "spec": {"memory": {"size": memory}}})
}

/// Merges `patch` into `v` (JSON merge patch semantics).
pub fn with(mut v: Value, patch: Value) -> Value {
    json_patch::merge(&mut v, &patch);
    v
}

/// The objects of a pure test.
#[derive(Default, Clone)]
pub struct World {
    /// HypervisorNodes.
    pub hvns: Vec<Value>,
    /// Kubernetes Nodes.
    pub nodes: Vec<Value>,
    /// Networks.
    pub networks: Vec<Value>,
    /// StoragePools.
    pub pools: Vec<Value>,
    /// Volumes.
    pub volumes: Vec<Value>,
    /// Domains.
    pub domains: Vec<Value>,
}

impl World {
    /// The cluster view at [`NOW`].
    pub fn cluster(&self, settings: &Settings) -> Cluster {
        self.cluster_at(settings, now())
    }

    /// The cluster view at `t`.
    pub fn cluster_at(&self, settings: &Settings, t: Timestamp) -> Cluster {
        let hvns: Vec<HypervisorNode> = self.hvns.iter().cloned().map(obj).collect();
        let nodes: Vec<k8s_openapi::api::core::v1::Node> =
            self.nodes.iter().cloned().map(obj).collect();
        let networks: Vec<Network> = self.networks.iter().cloned().map(obj).collect();
        let pools: Vec<StoragePool> = self.pools.iter().cloned().map(obj).collect();
        let volumes: Vec<Volume> = self.volumes.iter().cloned().map(obj).collect();
        let mut cluster = Cluster::build(&hvns, &nodes, &networks, &pools, &volumes, settings, t);
        cluster.note_users(&self.domains());
        cluster
    }

    /// The domains, typed.
    pub fn domains(&self) -> Vec<Domain> {
        self.domains.iter().cloned().map(obj).collect()
    }
}

/// Waits (polling every 50 ms) until `check` holds, failing after `secs`.
pub async fn eventually(secs: u64, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Writes a HypervisorNode's status as its agent does (server-side apply, forced, under
/// the agent's field manager).
pub async fn agent_publishes(client: &Client, name: &str, status: Value) {
    let api: Api<HypervisorNode> = Api::all(client.clone());
    let body =
        json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "HypervisorNode", "status": status});
    api.patch_status(
        name,
        &PatchParams::apply("virtkube-agent").force(),
        &Patch::Apply(&body),
    )
    .await
    .unwrap();
}

/// Merges `status` into a Domain's status as an agent would.
pub async fn agent_writes_domain(client: &Client, ns: &str, name: &str, status: Value) {
    let api: Api<Domain> = Api::namespaced(client.clone(), ns);
    api.patch_status(
        name,
        &PatchParams {
            field_manager: Some("virtkube-agent".into()),
            ..PatchParams::default()
        },
        &Patch::Merge(&json!({"status": status})),
    )
    .await
    .unwrap();
}

/// A condition of an object (as JSON) by type.
pub fn condition(obj: &Value, type_: &str) -> Option<Value> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .cloned()
}
