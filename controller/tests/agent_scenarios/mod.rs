//! The agent's outputs, recorded: scenarios that run the real reconcilers (the real engine on
//! `test:///default` underneath) against the strict in-memory API server (`virtkube-testapi`),
//! with every Domain bound, and every move approved, the way the cluster controller does it
//! (the claim written by compare-and-swap, the routing label). Each sample is the object as
//! the server stores it afterwards, so it is what a GitOps tool reads. `status_samples.rs`
//! compares them with `tests/gitops/samples/`.
//!
//! Where a state needs the cluster controller (`virtkube controller` is not in this tree),
//! the test writes the controller's part itself, in the shapes the controller writes (its
//! `Scheduled`, `NodeUnreachable` and HypervisorNode `Ready=Unknown` conditions, an approved
//! move): such samples say so in their [`SOURCE_ANNOTATION`].

#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use virtkube::agent::context::Context;
use virtkube::agent::moves::{self, TaskState};
use virtkube::agent::{domain, network, node, pool, volume};
use virtkube::placement::write::write_status;
use virtkube_crds::conditions::{self, status as cs};
use virtkube_crds::{Domain, HypervisorNode, Network, StoragePool, Volume};
use virtkube_testapi::TestApi;

use crate::agent_support::{
    NODE, approve_move, bind_domain, hypervisor_node, testapi_context, testapi_context_for,
};

/// The annotation each sample carries to say who wrote its status.
pub const SOURCE_ANNOTATION: &str = "samples.virtkube.io/source";

/// Written by the agent's code, recorded from the server.
pub const BY_AGENT: &str = "recorded: written by the agent's reconcilers";

/// Claim or conditions written by the test in the cluster controller's place.
pub const BY_TEST_AS_CONTROLLER: &str = "recorded from the agent's reconcilers, with the claim or conditions written by the test in the cluster controller's place (virtkube controller is not in this tree)";

/// The second node of the scenarios (a second agent context on the same test driver).
pub const NODE_B: &str = "node-b";

/// The namespace of every namespaced sample.
pub const NS: &str = "samples";

/// A status sample: the object as the server stores it.
pub struct Sample {
    /// The sample's file name (without `.json`).
    pub name: &'static str,
    /// Who wrote the status ([`BY_AGENT`] or [`BY_TEST_AS_CONTROLLER`]).
    pub source: &'static str,
    /// The stored object.
    pub object: Value,
}

/// The world every scenario shares: one server, an agent context for `NODE` and one for
/// `NODE_B` (both on the process's shared `test:///default`), and the admin's client (acting
/// as user and as cluster controller).
pub struct World {
    /// The in-memory API server.
    pub api: TestApi,
    /// The user's and the cluster controller's client.
    pub admin: Client,
    /// `NODE`'s agent.
    pub a: Arc<Context>,
    /// `NODE_B`'s agent.
    pub b: Arc<Context>,
    /// What was recorded.
    pub samples: Vec<Sample>,
}

const TIMEOUT: Duration = Duration::from_secs(30);

impl World {
    async fn new() -> World {
        let api = TestApi::start().await.unwrap();
        api.create_namespace(NS).unwrap();
        let (a, _, _) = testapi_context(&api).await;
        let (b, _, _) = testapi_context_for(&api, NODE_B).await;
        let admin = api.client("admin").await.unwrap();
        World {
            api,
            admin,
            a,
            b,
            samples: Vec::new(),
        }
    }

    fn domains(&self) -> Api<Domain> {
        Api::namespaced(self.admin.clone(), NS)
    }

    /// Creates Domain `name` (1 vCPU, 64Mi, runStrategy Always) with `spec` merged over it.
    fn create_domain(&self, name: &str, spec: Value) {
        let mut body = json!({
            "apiVersion": "virtkube.io/v1alpha1", "kind": "Domain",
            "metadata": { "name": name, "namespace": NS },
            "spec": { "runStrategy": "Always", "cpu": { "vcpus": 1 }, "memory": { "size": "64Mi" } },
        });
        if let (Some(base), Some(extra)) = (body["spec"].as_object_mut(), spec.as_object()) {
            for (k, v) in extra {
                base.insert(k.clone(), v.clone());
            }
        }
        self.api.create("domains", body).unwrap();
    }

    /// The stored object of `plural` `ns/name`, typed.
    fn typed<K: DeserializeOwned>(&self, plural: &str, ns: &str, name: &str) -> K {
        let value = self
            .api
            .get(plural, ns, name)
            .unwrap_or_else(|| panic!("{plural} {ns}/{name} is not stored"));
        serde_json::from_value(value).unwrap()
    }

    /// One reconcile of Domain `name` by `ctx`'s agent, on the object as stored.
    async fn reconcile_domain(
        &self,
        ctx: &Arc<Context>,
        name: &str,
    ) -> Result<Action, virtkube::agent::error::Error> {
        let dom: Domain = self.typed("domains", NS, name);
        tokio::time::timeout(TIMEOUT, domain::reconcile(Arc::new(dom), ctx.clone()))
            .await
            .expect("the reconcile finished")
    }

    /// Creates, binds to `NODE` and reconciles Domain `name` once.
    async fn bound_domain(&self, name: &str, spec: Value) -> Result<Action, String> {
        self.create_domain(name, spec);
        bind_domain(&self.admin, NS, name, NODE).await;
        self.reconcile_domain(&self.a, name)
            .await
            .map_err(|e| e.to_string())
    }

    /// Reconciles a Volume, StoragePool or Network `rounds` times on the object as stored
    /// (kube's finalizer helper adds the finalizer in a first round and acts in the next).
    async fn reconcile_kind<K, F, Fut>(
        &self,
        plural: &str,
        ns: &str,
        name: &str,
        rounds: usize,
        f: F,
    ) where
        K: DeserializeOwned,
        F: Fn(Arc<K>, Arc<Context>) -> Fut,
        Fut: std::future::Future<Output = Result<Action, virtkube::agent::error::Error>>,
    {
        for _ in 0..rounds {
            let obj: K = self.typed(plural, ns, name);
            let _ = tokio::time::timeout(TIMEOUT, f(Arc::new(obj), self.a.clone()))
                .await
                .expect("the reconcile finished");
        }
    }

    /// Keeps `plural` `ns/name` as stored now, under `sample`.
    fn keep(
        &mut self,
        sample: &'static str,
        source: &'static str,
        plural: &str,
        ns: &str,
        name: &str,
    ) {
        let object = self
            .api
            .get(plural, ns, name)
            .unwrap_or_else(|| panic!("{sample}: {plural} {ns}/{name} is not stored"));
        assert!(
            !object["status"].is_null(),
            "{sample}: nobody wrote a status: {object}"
        );
        self.samples.push(Sample {
            name: sample,
            source,
            object,
        });
    }

    /// Writes Domain `name`'s status through `edit`, by compare-and-swap, as the cluster
    /// controller writes it.
    async fn controller_writes(
        &self,
        name: &str,
        edit: impl FnOnce(&mut virtkube_crds::domain::DomainStatus),
    ) {
        let api = self.domains();
        let dom = api.get(name).await.unwrap();
        let mut status = dom.status.clone().unwrap_or_default();
        edit(&mut status);
        write_status(&api, &dom, &status, "virtkube-controller")
            .await
            .unwrap();
    }

    /// Waits until `ctx`'s migration task of Domain `name` has ended.
    async fn migration_task_ended(&self, ctx: &Arc<Context>, name: &str) {
        let key = moves::key(&self.typed::<Domain>("domains", NS, name));
        let deadline = Instant::now() + TIMEOUT;
        while ctx.migrations.state(&key) == TaskState::Running {
            assert!(
                Instant::now() < deadline,
                "the migration task of {name} never ended"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A condition as the cluster controller writes it (`cluster/conditions.rs` there: the same
/// `conditions::condition` builder, the object's generation).
fn controller_condition(
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    conditions::condition(
        type_,
        status,
        reason,
        message,
        generation,
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()),
    )
}

/// The HypervisorNode published; then libvirt unreachable; then (written by the test as the
/// controller) its heartbeat stale.
async fn hypervisor_nodes(w: &mut World) {
    node::ensure_node_object(&w.a).await.unwrap();
    let published = node::publish_once(&w.a, None, None, None).await.unwrap();
    w.keep(
        "hypervisornode-ready",
        BY_AGENT,
        "hypervisornodes",
        "",
        NODE,
    );
    node::publish_unreachable(&w.a, Some(&published), "connection refused")
        .await
        .unwrap();
    w.keep(
        "hypervisornode-libvirt-unreachable",
        BY_AGENT,
        "hypervisornodes",
        "",
        NODE,
    );
    // node-b's agent published once, then went silent: the controller's liveness check says
    // so with `Ready=Unknown` (server-side apply under its own manager).
    node::ensure_node_object(&w.b).await.unwrap();
    node::publish_once(&w.b, None, None, None).await.unwrap();
    let hvn: HypervisorNode = w.typed("hypervisornodes", "", NODE_B);
    let mut conds = hvn.status.clone().unwrap_or_default().conditions;
    conditions::set_condition(
        &mut conds,
        controller_condition(
            conditions::READY,
            cs::UNKNOWN,
            "HeartbeatStale",
            "no heartbeat since 2026-01-01T00:00:00Z (grace 60s): the agent or its node is down or cut off; its domains keep their node until it returns or an administrator annotates this HypervisorNode virtkube.io/fenced=true",
            hvn.metadata.generation,
        ),
    );
    Api::<HypervisorNode>::all(w.admin.clone())
        .patch_status(
            NODE_B,
            &PatchParams::apply("virtkube-controller").force(),
            &Patch::Apply(json!({
                "apiVersion": "virtkube.io/v1alpha1", "kind": "HypervisorNode",
                "status": { "conditions": conds },
            })),
        )
        .await
        .unwrap();
    w.keep(
        "hypervisornode-heartbeat-stale",
        BY_TEST_AS_CONTROLLER,
        "hypervisornodes",
        "",
        NODE_B,
    );
}

/// Domains held by `NODE`: Ready; a spec edit not acted on yet; an invalid spec; a refused
/// host path; a missing Volume; a foreign libvirt domain of the same name.
async fn domains(w: &mut World) {
    w.bound_domain("web", json!({})).await.unwrap();
    w.keep("domain-ready", BY_AGENT, "domains", NS, "web");
    w.api
        .edit_spec("domains", NS, "web", |s| s["autostart"] = json!(true))
        .unwrap();
    w.keep(
        "domain-generation-not-observed",
        BY_AGENT,
        "domains",
        NS,
        "web",
    );

    // Valid for the API server's schema, refused by the agent's checks: only a new spec
    // fixes it.
    let _ = w
        .bound_domain(
            "invalid",
            json!({ "memory": { "size": "64Mi", "max": "32Mi" } }),
        )
        .await;
    w.keep("domain-invalid-spec", BY_AGENT, "domains", NS, "invalid");

    let _ = w
        .bound_domain(
            "hostpath",
            json!({ "disks": [{ "name": "root", "hostPath": "/var/lib/images/root.qcow2" }] }),
        )
        .await;
    w.keep(
        "domain-host-path-refused",
        BY_AGENT,
        "domains",
        NS,
        "hostpath",
    );

    let _ = w
        .bound_domain(
            "waiting",
            json!({ "disks": [{ "name": "root", "volume": "not-yet" }] }),
        )
        .await;
    w.keep("domain-volume-missing", BY_AGENT, "domains", NS, "waiting");

    let foreign = virtkube_engine::model::DomainDef {
        virt_type: "test".into(),
        ..virtkube_engine::model::DomainDef::new(
            format!("{NS}.clash"),
            virtkube_engine::Owner::new("Domain", "someone-else", Some(NS), "clash"),
        )
    };
    w.a.engine.domain_define(&foreign).await.unwrap();
    let _ = w.bound_domain("clash", json!({})).await;
    w.keep("domain-name-conflict", BY_AGENT, "domains", NS, "clash");
}

/// Moves, on the test driver (which cannot live-migrate): a move the controller approved
/// (`Pending`), started (`Running`), failed in libvirt (`Failed`), no longer wanted
/// (`Aborted`), a cold move handed over to its target and then converged there (`Succeeded`).
async fn moves(w: &mut World) {
    // node-b's agent publishes how to reach its libvirt (the test driver, shared).
    hypervisor_node(&w.admin, NODE_B, "test:///default").await;

    // A live move: the user asks for node-b and the controller approves before the holder
    // acts. (Had the holder reconciled the new spec first, its converge would refuse
    // `spec.nodeName` as a host it does not know, Ready=False InvalidSpec: reported, not
    // recorded as a sample.)
    w.bound_domain("live", json!({})).await.unwrap();
    w.api
        .edit_spec("domains", NS, "live", |s| s["nodeName"] = json!(NODE_B))
        .unwrap();
    approve_move(&w.admin, NS, "live", NODE_B).await;
    w.keep(
        "domain-move-pending",
        BY_TEST_AS_CONTROLLER,
        "domains",
        NS,
        "live",
    );
    // The holder records that the move starts, then hands the guest to libvirt.
    w.reconcile_domain(&w.a, "live").await.unwrap();
    w.keep("domain-migrating", BY_AGENT, "domains", NS, "live");
    // libvirt's test driver refuses to migrate: the move fails, the guest stays.
    w.migration_task_ended(&w.a, "live").await;
    // The reconcile records the failure, then converges again: today that converge refuses
    // spec.nodeName as a host the planner does not know (an error, Ready=False InvalidSpec;
    // see tests/gitops/check.py), so its result is not asserted here, the stored status is.
    let _ = w.reconcile_domain(&w.a, "live").await;
    let status = w.typed::<Domain>("domains", NS, "live").status.unwrap();
    assert_eq!(
        status.migration.as_ref().and_then(|m| m.state),
        Some(virtkube_crds::domain::MigrationState::Failed),
        "{status:?}"
    );
    w.keep("domain-migration-failed", BY_AGENT, "domains", NS, "live");

    // A move the user takes back while it is pending: aborted, the guest stays.
    w.bound_domain("back", json!({})).await.unwrap();
    w.api
        .edit_spec("domains", NS, "back", |s| s["nodeName"] = json!(NODE_B))
        .unwrap();
    approve_move(&w.admin, NS, "back", NODE_B).await;
    w.api
        .edit_spec("domains", NS, "back", |s| s["nodeName"] = json!(NODE))
        .unwrap();
    w.reconcile_domain(&w.a, "back").await.unwrap();
    let status = w.typed::<Domain>("domains", NS, "back").status.unwrap();
    assert_eq!(
        status.migration.as_ref().and_then(|m| m.state),
        Some(virtkube_crds::domain::MigrationState::Aborted),
        "{status:?}"
    );
    w.keep("domain-migration-aborted", BY_AGENT, "domains", NS, "back");

    // A cold move: stopped on node-a, undefined there and handed over; then node-b's agent
    // converges it.
    w.bound_domain("cold", json!({ "runStrategy": "Halted" }))
        .await
        .unwrap();
    w.api
        .edit_spec("domains", NS, "cold", |s| s["nodeName"] = json!(NODE_B))
        .unwrap();
    approve_move(&w.admin, NS, "cold", NODE_B).await;
    w.reconcile_domain(&w.a, "cold").await.unwrap();
    w.keep("domain-handed-over", BY_AGENT, "domains", NS, "cold");
    // The controller routes it to its new holder (label), whose agent converges it.
    crate::agent_support::label_domain(
        &w.admin,
        NS,
        "cold",
        &[
            (&virtkube::placement::write::node_label(NODE), None),
            (
                &virtkube::placement::write::node_label(NODE_B),
                Some(virtkube::placement::write::HOLDER),
            ),
        ],
    )
    .await;
    w.reconcile_domain(&w.b, "cold").await.unwrap();
    w.keep("domain-migrated", BY_AGENT, "domains", NS, "cold");
}

/// What only the cluster controller writes: a domain no node fits (`Scheduled=False`), and a
/// domain whose holder went silent (`NodeUnreachable=True`).
async fn controller_conditions(w: &mut World) {
    w.create_domain("nowhere", json!({ "memory": { "size": "64Gi" } }));
    let generation = w
        .typed::<Domain>("domains", NS, "nowhere")
        .metadata
        .generation;
    w.controller_writes("nowhere", |s| {
        conditions::set_condition(
            &mut s.conditions,
            controller_condition(
                conditions::SCHEDULED,
                cs::FALSE,
                "Unschedulable",
                "0/2 nodes are available: node-a: insufficient memory, node-b: insufficient memory",
                generation,
            ),
        );
    })
    .await;
    w.keep(
        "domain-unschedulable",
        BY_TEST_AS_CONTROLLER,
        "domains",
        NS,
        "nowhere",
    );

    w.bound_domain("silent", json!({})).await.unwrap();
    let generation = w
        .typed::<Domain>("domains", NS, "silent")
        .metadata
        .generation;
    w.controller_writes("silent", |s| {
        conditions::set_condition(
            &mut s.conditions,
            controller_condition(
                "NodeUnreachable",
                cs::TRUE,
                "HeartbeatStale",
                "node node-a has sent no heartbeat since 2026-01-01T00:00:00Z; nothing is started elsewhere until the node returns or an administrator declares it fenced (kubectl annotate hypervisornode node-a virtkube.io/fenced=true)",
                generation,
            ),
        );
    })
    .await;
    w.keep(
        "domain-node-unreachable",
        BY_TEST_AS_CONTROLLER,
        "domains",
        NS,
        "silent",
    );
}

/// Volumes: created in the test driver's pool; a pool that does not exist.
async fn volumes(w: &mut World) {
    for (name, pool, sample) in [
        ("data", "default-pool", "volume-ready"),
        ("orphan", "no-such-pool", "volume-pool-missing"),
    ] {
        w.api
            .create(
                "volumes",
                json!({
                    "apiVersion": "virtkube.io/v1alpha1", "kind": "Volume",
                    "metadata": { "name": name, "namespace": NS },
                    "spec": { "pool": pool, "nodeName": NODE, "capacity": "1Mi", "format": "raw" },
                }),
            )
            .unwrap();
        // Bound as the cluster controller binds it.
        crate::agent_support::bind_volume(&w.api, NS, name, NODE).await;
        w.reconcile_kind::<Volume, _, _>("volumes", NS, name, 2, volume::reconcile)
            .await;
        w.keep(sample, BY_AGENT, "volumes", NS, name);
    }
}

/// A dir pool; an isolated network; a network whose DHCP range covers its own address.
async fn pools_and_networks(w: &mut World) {
    w.api
        .create(
            "storagepools",
            json!({
                "apiVersion": "virtkube.io/v1alpha1", "kind": "StoragePool",
                "metadata": { "name": "images" },
                "spec": { "type": "dir", "target": { "path": "/var/lib/virtkube/pools/images" } },
            }),
        )
        .unwrap();
    w.reconcile_kind::<StoragePool, _, _>("storagepools", "", "images", 2, pool::reconcile)
        .await;
    w.keep("storagepool-ready", BY_AGENT, "storagepools", "", "images");

    for (name, spec, sample) in [
        (
            "vk-isolated",
            json!({ "mode": "isolated", "ip": { "address": "10.150.0.1", "prefix": 24 } }),
            "network-ready",
        ),
        (
            // The host's own address inside the DHCP range: refused by virtkube's checks.
            "vk-bad",
            json!({ "mode": "nat", "ip": { "address": "10.151.0.1", "prefix": 24,
                    "dhcp": { "ranges": [{ "start": "10.151.0.1", "end": "10.151.0.9" }] } } }),
            "network-invalid-spec",
        ),
    ] {
        w.api
            .create(
                "networks",
                json!({
                    "apiVersion": "virtkube.io/v1alpha1", "kind": "Network",
                    "metadata": { "name": name }, "spec": spec,
                }),
            )
            .unwrap();
        w.reconcile_kind::<Network, _, _>("networks", "", name, 2, network::reconcile)
            .await;
        w.keep(sample, BY_AGENT, "networks", "", name);
    }
}

/// A domain whose node's libvirt went away (its own connection, closed): phase Unknown.
async fn libvirt_gone(w: &mut World) {
    let (ctx, _, engine) = testapi_context(&w.api).await;
    w.create_domain("lost", json!({}));
    bind_domain(&w.admin, NS, "lost", NODE).await;
    w.reconcile_domain(&ctx, "lost").await.unwrap();
    engine.close().await.unwrap();
    assert!(w.reconcile_domain(&ctx, "lost").await.is_err());
    w.keep(
        "domain-libvirt-unreachable",
        BY_AGENT,
        "domains",
        NS,
        "lost",
    );
}

/// Runs every scenario, in one order (the test driver's state is shared by them all).
pub async fn run() -> Vec<Sample> {
    let mut w = World::new().await;
    hypervisor_nodes(&mut w).await;
    domains(&mut w).await;
    moves(&mut w).await;
    controller_conditions(&mut w).await;
    volumes(&mut w).await;
    pools_and_networks(&mut w).await;
    libvirt_gone(&mut w).await;
    w.samples
}
