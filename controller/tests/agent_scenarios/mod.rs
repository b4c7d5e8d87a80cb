//! The agent's outputs, recorded: scenarios that run the real reconcilers (the real engine on
//! `test:///default` underneath) against kube's mock API server, answering like a permissive
//! API server and recording every API call and every status written. `status_samples.rs`
//! turns the statuses into the GitOps health-check samples; `agent_rbac.rs` compares the calls
//! with the chart's RBAC.

#![allow(dead_code)]

use std::future::Future;
use std::sync::Arc;

use http::{Method, Response, StatusCode};
use http_body_util::BodyExt;
use kube::client::Body;
use kube::runtime::controller::Action;
use serde_json::{Value, json};
use virtkube::agent::context::{Context, FINALIZER};
use virtkube::agent::{domain, network, node, pool, volume};

use crate::agent_support::{ApiServerVerifier, NODE, ok};

/// The finalizer of this test's node on pools and networks (`Settings::node_finalizer`). The
/// objects start with their finalizer: kube's finalizer helper only adds it in a first
/// reconcile and applies in the next.
pub const NODE_FINALIZER: &str = "node.virtkube.io/node-a";

/// One API call as the agent made it.
#[derive(Debug, Clone)]
pub struct Call {
    /// HTTP method.
    pub method: Method,
    /// Path without the query.
    pub path: String,
    /// The query string.
    pub query: String,
    /// The request's content type (`application/apply-patch+yaml` for server-side apply).
    pub content_type: String,
}

/// What one piece of agent work did: the statuses it applied, in order, and every call.
#[derive(Default)]
pub struct Recorded {
    /// Every `status` the agent applied, in order.
    pub statuses: Vec<Value>,
    /// Every API call.
    pub calls: Vec<Call>,
}

/// A status sample: the object as a GitOps tool reads it after the agent wrote `status`.
pub struct Sample {
    /// The sample's file name (without `.json`).
    pub name: &'static str,
    /// apiVersion, kind, metadata (and spec) of the object.
    pub object: Value,
    /// The status the agent wrote.
    pub status: Value,
}

/// A 404 answer in the API server's `Status` shape.
pub fn not_found(what: &str) -> Response<Body> {
    let status = json!({
        "kind": "Status", "apiVersion": "v1", "status": "Failure",
        "message": format!("{what} not found"), "reason": "NotFound", "code": 404
    });
    Response::builder()
        .status(StatusCode::NOT_FOUND)
        .body(Body::from(serde_json::to_vec(&status).unwrap()))
        .unwrap()
}

/// Runs `work` while answering its API calls like a permissive API server: finalizer patches
/// return the object with the finalizer, events are echoed, status patches (server-side
/// apply, or a compare-and-swap JSON patch replacing `/status`) are recorded and answered
/// with the object carrying that status and a new resourceVersion, a read of the object
/// returns it, lists answer empty, reads of other objects answer 404. Returns every status
/// the agent applied, in order, and every call.
pub async fn record<F, T>(api: ApiServerVerifier, object: Value, work: F) -> Recorded
where
    F: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    record_losing(api, object, work, 0).await
}

/// [`record`], where the first `lost` compare-and-swap status writes lose to another writer
/// (409 Conflict), as when the cluster controller wrote the status in between.
pub async fn record_losing<F, T>(
    mut api: ApiServerVerifier,
    object: Value,
    work: F,
    mut lost: usize,
) -> Recorded
where
    F: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let task = tokio::spawn(work);
    let mut current = object;
    let mut out = Recorded::default();
    tokio::pin!(task);
    loop {
        let request = tokio::select! {
            biased;
            _ = &mut task => return out,
            request = api.0.next_request() => request,
        };
        // The client went away with the work: the task is finishing.
        let Some((request, send)) = request else {
            let _ = task.await;
            return out;
        };
        let method = request.method().clone();
        let uri = request.uri().to_string();
        let path = uri
            .split_once('?')
            .map_or(uri.as_str(), |(p, _)| p)
            .to_string();
        out.calls.push(Call {
            method: method.clone(),
            path: path.clone(),
            query: request.uri().query().unwrap_or_default().to_string(),
            content_type: request
                .headers()
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string(),
        });
        let bytes = request.into_body().collect().await.unwrap().to_bytes();
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if path.starts_with("/apis/events.k8s.io/") {
            send.send_response(ok(&body));
        } else if method == Method::GET && path == self_path(&current) {
            send.send_response(ok(&current));
        } else if method == Method::GET && is_collection(&path) {
            send.send_response(ok(&json!({
                "apiVersion": "v1", "kind": "List",
                "metadata": { "resourceVersion": "1" }, "items": []
            })));
        } else if method == Method::GET {
            send.send_response(not_found(&path));
        } else if method == Method::PATCH
            && path.ends_with("/status")
            && body.is_array()
            && lost > 0
        {
            lost -= 1;
            let rv: u64 = current["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or(1);
            current["metadata"]["resourceVersion"] = json!((rv + 1).to_string());
            send.send_response(conflict(&path));
        } else if method == Method::PATCH && path.ends_with("/status") {
            let status = match &body {
                // A compare-and-swap write: `test` the resourceVersion, then `/status`.
                Value::Array(ops) => ops
                    .iter()
                    .find(|op| op["path"] == "/status")
                    .map(|op| op["value"].clone())
                    .unwrap_or(Value::Null),
                _ => body["status"].clone(),
            };
            current["status"] = status.clone();
            let rv: u64 = current["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or(1);
            current["metadata"]["resourceVersion"] = json!((rv + 1).to_string());
            out.statuses.push(status);
            send.send_response(ok(&current));
        } else if method == Method::PATCH {
            // The finalizer (a JSON patch) or the node object (server-side apply).
            send.send_response(ok(&current));
        } else {
            panic!("unexpected call {method} {uri}");
        }
    }
}

/// A 409 answer in the API server's `Status` shape.
pub fn conflict(what: &str) -> Response<Body> {
    let status = json!({
        "kind": "Status", "apiVersion": "v1", "status": "Failure",
        "message": format!("Operation cannot be fulfilled on {what}: the object has been modified; please apply your changes to the latest version and try again"),
        "reason": "Conflict", "code": 409
    });
    Response::builder()
        .status(StatusCode::CONFLICT)
        .body(Body::from(serde_json::to_vec(&status).unwrap()))
        .unwrap()
}

/// The API path of `object` itself.
fn self_path(object: &Value) -> String {
    let kind = object["kind"]
        .as_str()
        .unwrap_or_default()
        .to_ascii_lowercase();
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    match object["metadata"]["namespace"].as_str() {
        Some(ns) => format!("/apis/virtkube.io/v1alpha1/namespaces/{ns}/{kind}s/{name}"),
        None => format!("/apis/virtkube.io/v1alpha1/{kind}s/{name}"),
    }
}

/// Whether `path` names a collection of virtkube's kinds (`…/volumes`).
fn is_collection(path: &str) -> bool {
    ["domains", "volumes", "networks", "storagepools"]
        .iter()
        .any(|plural| path.ends_with(&format!("/{plural}")))
}

/// A context for `NODE` on `test:///default` with a mocked API server, as `virtkube agent`
/// builds it: with (empty) reflector caches of Volumes and Domains, so a Domain resolves its
/// disks and a Volume its users from the caches, never by reading the API.
async fn context() -> (Arc<Context>, ApiServerVerifier, virtkube_engine::Engine) {
    let (ctx, api, engine) = crate::agent_support::context().await;
    let ctx = Arc::try_unwrap(ctx).unwrap_or_else(|_| panic!("a fresh context has one owner"));
    let (volumes, _) = kube::runtime::reflector::store::<virtkube_crds::Volume>();
    let (domains, _) = kube::runtime::reflector::store::<virtkube_crds::Domain>();
    let ctx = Context {
        volumes: Some(volumes),
        domains: Some(domains),
        ..ctx
    };
    (Arc::new(ctx), api, engine)
}

fn domain_object(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "virtkube.io/v1alpha1", "kind": "Domain",
        "metadata": { "name": name, "namespace": "default", "uid": format!("uid-{name}"), "generation": 1,
                      "finalizers": [FINALIZER] },
        "spec": spec,
    })
}

/// A Volume bound to `NODE` the way the cluster controller binds it (`status.nodeName`, the
/// node's routing label).
fn volume_object(name: &str, pool: &str) -> Value {
    json!({
        "apiVersion": "virtkube.io/v1alpha1", "kind": "Volume",
        "metadata": { "name": name, "namespace": "default", "uid": format!("uid-{name}"), "generation": 1,
                      "resourceVersion": "1", "labels": { "node.virtkube.io/node-a": "holder" },
                      "finalizers": [FINALIZER] },
        "spec": { "pool": pool, "capacity": "1Mi", "format": "raw" },
        "status": { "nodeName": NODE },
    })
}

fn cluster_object(kind: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "virtkube.io/v1alpha1", "kind": kind,
        "metadata": { "name": name, "uid": format!("uid-{name}"), "generation": 1, "finalizers": [NODE_FINALIZER] },
        "spec": spec,
    })
}

/// A second mocked API for a context on the same libvirt connection (test:///default keeps
/// its state per connection): a scenario's second step sees what the first made.
async fn swap_api(ctx: &Arc<Context>) -> (Arc<Context>, ApiServerVerifier) {
    let (service, handle) = tower_test::mock::pair();
    let client = kube::Client::new(service, "default");
    let metrics = virtkube::agent::metrics::Metrics::register(
        &mut prometheus_client::registry::Registry::default(),
        None,
    );
    let new = Context::new(client, ctx.hosts.clone(), metrics, ctx.settings.clone()).unwrap();
    let new = Context {
        volumes: ctx.volumes.clone(),
        domains: ctx.domains.clone(),
        ..new
    };
    (Arc::new(new), ApiServerVerifier(handle))
}

/// Collects samples and calls.
#[derive(Default)]
pub struct Outputs {
    /// Status samples, by name.
    pub samples: Vec<Sample>,
    /// Every API call of every scenario.
    pub calls: Vec<Call>,
}

impl Outputs {
    /// Keeps `recorded`'s calls and, under `name`, the last status it wrote for `object`.
    fn keep(&mut self, name: &'static str, object: &Value, recorded: Recorded) -> Value {
        let status = recorded
            .statuses
            .last()
            .unwrap_or_else(|| panic!("scenario {name}: the agent wrote no status"))
            .clone();
        self.samples.push(Sample {
            name,
            object: object.clone(),
            status: status.clone(),
        });
        self.calls.extend(recorded.calls);
        status
    }
}

async fn reconcile_domain(object: &Value) -> Recorded {
    let (ctx, api, _engine) = context().await;
    let dom = Arc::new(serde_json::from_value(object.clone()).unwrap());
    record(api, object.clone(), async move {
        let _: Result<Action, _> = domain::reconcile(dom, ctx).await;
    })
    .await
}

/// Domains: Ready, not observed, invalid spec, refused host path, missing volume, a move that
/// starts and then fails (the target published nothing).
async fn domains(out: &mut Outputs) {
    let ready = domain_object(
        "web",
        json!({ "nodeName": NODE, "runStrategy": "Always", "cpu": { "vcpus": 1 }, "memory": { "size": "64Mi" } }),
    );
    let status = out.keep("domain-ready", &ready, reconcile_domain(&ready).await);
    // The same object after a spec edit the agent has not seen yet (generation 2).
    let mut edited = ready.clone();
    edited["metadata"]["generation"] = json!(2);
    out.samples.push(Sample {
        name: "domain-generation-not-observed",
        object: edited,
        status,
    });

    // An invalid spec (more vCPUs than the maximum): only a new spec fixes it.
    let invalid = domain_object(
        "invalid",
        json!({ "nodeName": NODE, "cpu": { "vcpus": 4, "maxVcpus": 2 }, "memory": { "size": "64Mi" } }),
    );
    out.keep(
        "domain-invalid-spec",
        &invalid,
        reconcile_domain(&invalid).await,
    );

    // A host path the agent does not allow.
    let host_path = domain_object(
        "hostpath",
        json!({ "nodeName": NODE, "cpu": { "vcpus": 1 }, "memory": { "size": "64Mi" },
                "disks": [{ "name": "root", "hostPath": "/var/lib/images/root.qcow2" }] }),
    );
    out.keep(
        "domain-host-path-refused",
        &host_path,
        reconcile_domain(&host_path).await,
    );

    // Waiting for a Volume that does not exist yet: transient.
    let waiting = domain_object(
        "waiting",
        json!({ "nodeName": NODE, "cpu": { "vcpus": 1 }, "memory": { "size": "64Mi" },
                "disks": [{ "name": "root", "volume": "not-yet" }] }),
    );
    out.keep(
        "domain-volume-missing",
        &waiting,
        reconcile_domain(&waiting).await,
    );

    // A move to another node: converge here first, then ask for node-b.
    let mut moving = ready.clone();
    moving["metadata"]["name"] = json!("moving");
    let (ctx, api, _engine) = context().await;
    let first = Arc::new(serde_json::from_value(moving.clone()).unwrap());
    let placed = record(api, moving.clone(), {
        let ctx = ctx.clone();
        async move {
            let _ = domain::reconcile(first, ctx).await;
        }
    })
    .await;
    let mut asked = moving.clone();
    asked["metadata"]["generation"] = json!(2);
    asked["spec"]["nodeName"] = json!("node-b");
    asked["status"] = placed.statuses.last().expect("placed").clone();
    out.calls.extend(placed.calls);
    let dom = Arc::new(serde_json::from_value(asked.clone()).unwrap());
    let (ctx2, api2) = swap_api(&ctx).await;
    let moved = record(api2, asked.clone(), async move {
        let _ = domain::reconcile(dom, ctx2).await;
    })
    .await;
    assert!(
        moved.statuses.len() >= 2,
        "expected migration start and failure: {:?}",
        moved.statuses
    );
    out.samples.push(Sample {
        name: "domain-migrating",
        object: asked.clone(),
        status: moved.statuses[0].clone(),
    });
    out.keep("domain-migration-target-unknown", &asked, moved);
}

/// The finalizer's life on `object` (of `kind`, reconciled by `reconcile`): a first
/// reconcile adds it; after the resource is deleted, cleanup removes the libvirt object and
/// then the finalizer. Only the calls are kept.
async fn finalizer_lifecycle<K, R, Fut>(
    out: &mut Outputs,
    object: &Value,
    finalizer: &str,
    reconcile: R,
) where
    K: serde::de::DeserializeOwned + Send + Sync + 'static,
    R: Fn(Arc<K>, Arc<Context>) -> Fut,
    Fut: Future<Output = Result<Action, virtkube::agent::error::Error>> + Send + 'static,
{
    let (ctx, api, _engine) = context().await;
    let mut fresh = object.clone();
    fresh["metadata"]["finalizers"] = json!([]);
    let recorded = record(
        api,
        fresh.clone(),
        reconcile(
            Arc::new(serde_json::from_value(fresh).unwrap()),
            ctx.clone(),
        ),
    )
    .await;
    out.calls.extend(recorded.calls);
    let mut with_finalizer = object.clone();
    with_finalizer["metadata"]["finalizers"] = json!([finalizer]);
    let (ctx2, api2) = swap_api(&ctx).await;
    let recorded = record(
        api2,
        with_finalizer.clone(),
        reconcile(
            Arc::new(serde_json::from_value(with_finalizer.clone()).unwrap()),
            ctx2,
        ),
    )
    .await;
    out.calls.extend(recorded.calls);
    let mut deleting = with_finalizer;
    deleting["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    let (ctx3, api3) = swap_api(&ctx).await;
    let recorded = record(
        api3,
        deleting.clone(),
        reconcile(Arc::new(serde_json::from_value(deleting).unwrap()), ctx3),
    )
    .await;
    out.calls.extend(recorded.calls);
}

/// Add, use and remove the finalizer of each kind.
async fn finalizers(out: &mut Outputs) {
    let dom = domain_object(
        "lifecycle",
        json!({ "nodeName": NODE, "cpu": { "vcpus": 1 }, "memory": { "size": "64Mi" } }),
    );
    finalizer_lifecycle(out, &dom, FINALIZER, domain::reconcile).await;
    let vol = volume_object("lifecycle", "default-pool");
    finalizer_lifecycle(out, &vol, FINALIZER, volume::reconcile).await;
    let p = cluster_object(
        "StoragePool",
        "lifecycle",
        json!({ "type": "dir", "target": { "path": "/var/lib/virtkube/pools/lifecycle" } }),
    );
    finalizer_lifecycle(out, &p, NODE_FINALIZER, pool::reconcile).await;
    let n = cluster_object(
        "Network",
        "lifecycle",
        json!({ "mode": "isolated", "ip": { "address": "10.152.0.1", "prefix": 24 } }),
    );
    finalizer_lifecycle(out, &n, NODE_FINALIZER, network::reconcile).await;
}

/// Volumes: created in the test driver's pool; a pool that does not exist.
async fn volumes(out: &mut Outputs) {
    for (name, pool, sample) in [
        ("data", "default-pool", "volume-ready"),
        ("orphan", "no-such-pool", "volume-pool-missing"),
    ] {
        let (ctx, api, _engine) = context().await;
        let obj = volume_object(name, pool);
        let vol = Arc::new(serde_json::from_value(obj.clone()).unwrap());
        let recorded = record(api, obj.clone(), async move {
            let _ = volume::reconcile(vol, ctx).await;
        })
        .await;
        out.keep(sample, &obj, recorded);
    }
    // A status write that loses to another writer: the Volume is read again and the status
    // decided again (only the calls are kept).
    let (ctx, api, _engine) = context().await;
    let obj = volume_object("contended", "no-such-pool");
    let vol = Arc::new(serde_json::from_value(obj.clone()).unwrap());
    let recorded = record_losing(
        api,
        obj,
        async move {
            let _ = volume::reconcile(vol, ctx).await;
        },
        1,
    )
    .await;
    assert_eq!(
        recorded.statuses.len(),
        1,
        "written once, after the re-read"
    );
    assert!(
        recorded
            .calls
            .iter()
            .any(|c| c.method == Method::GET && c.path.ends_with("/volumes/contended")),
        "the Volume is read again after the conflict"
    );
    out.calls.extend(recorded.calls);
}

/// A dir pool; an isolated network; a network whose DHCP range covers its own address.
async fn pools_and_networks(out: &mut Outputs) {
    let pool_obj = cluster_object(
        "StoragePool",
        "images",
        json!({ "type": "dir", "target": { "path": "/var/lib/virtkube/pools/images" } }),
    );
    let (ctx, api, _engine) = context().await;
    let p = Arc::new(serde_json::from_value(pool_obj.clone()).unwrap());
    let recorded = record(api, pool_obj.clone(), async move {
        let _ = pool::reconcile(p, ctx).await;
    })
    .await;
    out.keep("storagepool-ready", &pool_obj, recorded);

    for (obj, sample) in [
        (
            cluster_object(
                "Network",
                "vk-isolated",
                json!({ "mode": "isolated", "ip": { "address": "10.150.0.1", "prefix": 24 } }),
            ),
            "network-ready",
        ),
        (
            // The host's own address inside the DHCP range: refused by virtkube's checks.
            cluster_object(
                "Network",
                "vk-bad",
                json!({ "mode": "nat", "ip": { "address": "10.151.0.1", "prefix": 24,
                        "dhcp": { "ranges": [{ "start": "10.151.0.1", "end": "10.151.0.9" }] } } }),
            ),
            "network-invalid-spec",
        ),
    ] {
        let (ctx, api, _engine) = context().await;
        let n = Arc::new(serde_json::from_value(obj.clone()).unwrap());
        let recorded = record(api, obj.clone(), async move {
            let _ = network::reconcile(n, ctx).await;
        })
        .await;
        out.keep(sample, &obj, recorded);
    }
}

/// The node's HypervisorNode: created, published; then libvirt unreachable.
async fn hypervisor_node(out: &mut Outputs) {
    let obj = json!({
        "apiVersion": "virtkube.io/v1alpha1", "kind": "HypervisorNode",
        "metadata": { "name": NODE, "uid": "uid-node", "generation": 1 },
        "spec": {},
    });
    let (ctx, api, _engine) = context().await;
    let c = ctx.clone();
    let recorded = record(api, obj.clone(), async move {
        node::ensure_node_object(&c).await.unwrap();
        node::publish_once(&c, None, None, None).await.unwrap();
    })
    .await;
    let status = out.keep("hypervisornode-ready", &obj, recorded);
    let (ctx2, api2) = swap_api(&ctx).await;
    let previous: virtkube_crds::hypervisor_node::HypervisorNodeStatus =
        serde_json::from_value(status).unwrap();
    let recorded = record(api2, obj.clone(), async move {
        node::publish_unreachable(&ctx2, Some(&previous), "connection refused")
            .await
            .unwrap();
    })
    .await;
    out.keep("hypervisornode-libvirt-unreachable", &obj, recorded);
}

/// Runs every scenario.
pub async fn run() -> Outputs {
    let mut out = Outputs::default();
    domains(&mut out).await;
    volumes(&mut out).await;
    pools_and_networks(&mut out).await;
    hypervisor_node(&mut out).await;
    finalizers(&mut out).await;
    out
}
