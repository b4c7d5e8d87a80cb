//! Status samples for the GitOps health checks, taken from the agent's own output: each
//! scenario runs the real reconciler (the real engine on `test:///default` underneath)
//! against kube's mock API server, and the status it patches is recorded with the object it
//! belongs to. The Argo CD health checks (Lua) and the kstatus rules are tested against these
//! samples by `tests/gitops/check.py`, so they judge what the agent really writes.
//!
//! The samples are committed under `tests/gitops/samples/` and compared here after
//! normalization (timestamps, UUIDs, libvirt ids and paths that change per run); a change in
//! what the agent writes fails this test until the samples are regenerated:
//!
//! ```sh
//! VIRTKUBE_UPDATE_SAMPLES=1 cargo nextest run -p virtkube --test status_samples
//! ```

mod agent_support;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use http::{Method, Response, StatusCode};
use http_body_util::BodyExt;
use kube::client::Body;
use kube::runtime::controller::Action;
use serde_json::{Value, json};
use virtkube::agent::context::{Context, FINALIZER};
use virtkube::agent::{domain, network, node, pool, volume};

use agent_support::{ApiServerVerifier, NODE, context, ok};

/// The finalizer of this test's node on pools and networks (`Settings::node_finalizer`). The
/// objects start with their finalizer: kube's finalizer helper only adds it in a first
/// reconcile and applies in the next.
const NODE_FINALIZER: &str = "node.virtkube.io/node-a";

/// Where the samples live (repository root relative).
fn samples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/gitops/samples")
}

/// A 404 answer in the API server's `Status` shape.
fn not_found(what: &str) -> Response<Body> {
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
/// return the object with the finalizer, events are echoed, status patches are recorded and
/// answered with the object carrying that status, reads of other objects answer 404. Returns
/// every status the agent applied, in order.
async fn record<F, T>(mut api: ApiServerVerifier, object: Value, work: F) -> Vec<Value>
where
    F: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let task = tokio::spawn(work);
    let mut current = object;
    let mut statuses = Vec::new();
    tokio::pin!(task);
    loop {
        let request = tokio::select! {
            biased;
            _ = &mut task => return statuses,
            request = api.0.next_request() => request,
        };
        // The client went away with the work: the task is finishing.
        let Some((request, send)) = request else {
            let _ = task.await;
            return statuses;
        };
        let method = request.method().clone();
        let uri = request.uri().to_string();
        let path = uri
            .split_once('?')
            .map_or(uri.as_str(), |(p, _)| p)
            .to_string();
        let bytes = request.into_body().collect().await.unwrap().to_bytes();
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if path.starts_with("/apis/events.k8s.io/") {
            send.send_response(ok(&body));
        } else if method == Method::GET {
            send.send_response(not_found(&path));
        } else if method == Method::PATCH && path.ends_with("/status") {
            current["status"] = body["status"].clone();
            statuses.push(body["status"].clone());
            send.send_response(ok(&current));
        } else if method == Method::PATCH {
            // The finalizer (a JSON patch) or the node object (server-side apply).
            send.send_response(ok(&current));
        } else {
            panic!("unexpected call {method} {uri}");
        }
    }
}

/// Replaces what changes from run to run with fixed words, so a sample compares equal
/// across runs while every field the health checks read stays as the agent wrote it.
fn normalize(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                match key.as_str() {
                    "lastTransitionTime" | "heartbeatTime" | "startTime" | "endTime" => {
                        *v = json!("2026-01-01T00:00:00Z")
                    }
                    "uuid" => *v = json!("00000000-0000-4000-8000-000000000000"),
                    "id" if v.is_number() => *v = json!(1),
                    _ => normalize(v),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(normalize),
        Value::String(text) => *text = without_uuids(text),
        _ => {}
    }
}

/// `text` with every UUID (8-4-4-4-12 hex digits) in it replaced by a fixed one: libvirt
/// picks a new one per run and condition messages quote it.
fn without_uuids(text: &str) -> String {
    const SHAPE: [usize; 5] = [8, 4, 4, 4, 12];
    let is_uuid = |s: &str| {
        let parts: Vec<&str> = s.split('-').collect();
        parts.len() == 5
            && parts
                .iter()
                .zip(SHAPE)
                .all(|(p, n)| p.len() == n && p.chars().all(|c| c.is_ascii_hexdigit()))
    };
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(candidate) = rest.get(..36) {
        if is_uuid(candidate) {
            out.push_str("00000000-0000-4000-8000-000000000000");
            rest = &rest[36..];
        } else {
            let next = rest.chars().next().map_or(1, char::len_utf8);
            out.push_str(&rest[..next]);
            rest = &rest[next..];
        }
    }
    out.push_str(rest);
    out
}

/// The object as a GitOps tool would read it: apiVersion, kind, metadata and the status
/// the agent wrote last.
fn sample(object: &Value, status: &Value) -> Value {
    let mut s = json!({
        "apiVersion": object["apiVersion"],
        "kind": object["kind"],
        "metadata": object["metadata"],
        "status": status,
    });
    normalize(&mut s);
    s
}

/// Compares `sample` with the committed `NAME.json`, or writes it when
/// `VIRTKUBE_UPDATE_SAMPLES=1`.
fn check_sample(name: &str, sample: &Value) {
    let path = samples_dir().join(format!("{name}.json"));
    let text = serde_json::to_string_pretty(sample).unwrap() + "\n";
    if std::env::var("VIRTKUBE_UPDATE_SAMPLES").as_deref() == Ok("1") {
        std::fs::create_dir_all(samples_dir()).unwrap();
        std::fs::write(&path, text).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; generate it with VIRTKUBE_UPDATE_SAMPLES=1 cargo nextest run -p virtkube --test status_samples",
            path.display()
        )
    });
    assert_eq!(
        committed, text,
        "the agent's status for sample {name} changed; if that is intended, regenerate with \
         VIRTKUBE_UPDATE_SAMPLES=1 cargo nextest run -p virtkube --test status_samples and check \
         tests/gitops/check.py still passes"
    );
}

fn domain_object(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "virtkube.io/v1alpha1", "kind": "Domain",
        "metadata": { "name": name, "namespace": "default", "uid": format!("uid-{name}"), "generation": 1,
                      "finalizers": [FINALIZER] },
        "spec": spec,
    })
}

async fn reconcile_domain(object: Value) -> Vec<Value> {
    let (ctx, api, _engine) = context().await;
    let dom = Arc::new(serde_json::from_value(object.clone()).unwrap());
    record(api, object, async move {
        let _: Result<Action, _> = domain::reconcile(dom, ctx).await;
    })
    .await
}

#[tokio::test]
async fn domain_samples() {
    // Running and Ready.
    let ready = domain_object(
        "web",
        json!({ "nodeName": NODE, "runStrategy": "Always", "cpu": { "vcpus": 1 }, "memory": { "size": "64Mi" } }),
    );
    let statuses = reconcile_domain(ready.clone()).await;
    let last = statuses.last().expect("a status was written");
    check_sample("domain-ready", &sample(&ready, last));
    // The same object after a spec edit the agent has not seen yet (generation 2).
    let mut edited = ready.clone();
    edited["metadata"]["generation"] = json!(2);
    check_sample("domain-generation-not-observed", &sample(&edited, last));

    // An invalid spec (more vCPUs than the maximum): only a new spec fixes it.
    let invalid = domain_object(
        "invalid",
        json!({ "nodeName": NODE, "cpu": { "vcpus": 4, "maxVcpus": 2 }, "memory": { "size": "64Mi" } }),
    );
    let statuses = reconcile_domain(invalid.clone()).await;
    check_sample(
        "domain-invalid-spec",
        &sample(&invalid, statuses.last().unwrap()),
    );

    // A host path the agent does not allow.
    let host_path = domain_object(
        "hostpath",
        json!({ "nodeName": NODE, "cpu": { "vcpus": 1 }, "memory": { "size": "64Mi" },
                "disks": [{ "name": "root", "hostPath": "/var/lib/images/root.qcow2" }] }),
    );
    let statuses = reconcile_domain(host_path.clone()).await;
    check_sample(
        "domain-host-path-refused",
        &sample(&host_path, statuses.last().unwrap()),
    );

    // Waiting for a Volume that does not exist yet: transient.
    let waiting = domain_object(
        "waiting",
        json!({ "nodeName": NODE, "cpu": { "vcpus": 1 }, "memory": { "size": "64Mi" },
                "disks": [{ "name": "root", "volume": "not-yet" }] }),
    );
    let statuses = reconcile_domain(waiting.clone()).await;
    check_sample(
        "domain-volume-missing",
        &sample(&waiting, statuses.last().unwrap()),
    );

    // A move to another node: the agent records the migration as running first, then (the
    // target has published nothing) fails it.
    let mut moving = ready.clone();
    moving["metadata"]["name"] = json!("moving");
    let (ctx, api, _engine) = context().await;
    let first: virtkube_crds::Domain = serde_json::from_value(moving.clone()).unwrap();
    // Converge it on this node first, then ask for node-b.
    let placed = record(api, moving.clone(), {
        let (ctx, first) = (ctx.clone(), Arc::new(first));
        async move {
            let _ = domain::reconcile(first, ctx).await;
        }
    })
    .await;
    let mut asked = moving.clone();
    asked["metadata"]["generation"] = json!(2);
    asked["spec"]["nodeName"] = json!("node-b");
    asked["status"] = placed.last().unwrap().clone();
    let dom = Arc::new(serde_json::from_value(asked.clone()).unwrap());
    let (ctx2, api2) = swap_api(&ctx).await;
    let statuses = record(api2, asked.clone(), {
        let ctx = ctx2;
        async move {
            let _ = domain::reconcile(dom, ctx).await;
        }
    })
    .await;
    assert!(
        statuses.len() >= 2,
        "expected migration start and failure: {statuses:?}"
    );
    check_sample("domain-migrating", &sample(&asked, &statuses[0]));
    check_sample(
        "domain-migration-target-unknown",
        &sample(&asked, statuses.last().unwrap()),
    );
}

/// A second mocked API for a context on the same libvirt connection (test:///default keeps
/// its state per connection): the scenario's second reconcile sees what the first made.
async fn swap_api(ctx: &Arc<Context>) -> (Arc<Context>, ApiServerVerifier) {
    let (service, handle) = tower_test::mock::pair();
    let client = kube::Client::new(service, "default");
    let metrics = virtkube::agent::metrics::Metrics::register(
        &mut prometheus_client::registry::Registry::default(),
        None,
    );
    let new = Context::new(client, ctx.hosts.clone(), metrics, ctx.settings.clone()).unwrap();
    (Arc::new(new), ApiServerVerifier(handle))
}

#[tokio::test]
async fn volume_samples() {
    let object = |name: &str, pool: &str| {
        json!({
            "apiVersion": "virtkube.io/v1alpha1", "kind": "Volume",
            "metadata": { "name": name, "namespace": "default", "uid": format!("uid-{name}"), "generation": 1,
                          "finalizers": [FINALIZER] },
            "spec": { "pool": pool, "nodeName": NODE, "capacity": "1Mi", "format": "raw" },
        })
    };
    for (name, pool, sample_name) in [
        ("data", "default-pool", "volume-ready"),
        ("orphan", "no-such-pool", "volume-pool-missing"),
    ] {
        let (ctx, api, _engine) = context().await;
        let obj = object(name, pool);
        let vol = Arc::new(serde_json::from_value(obj.clone()).unwrap());
        let statuses = record(api, obj.clone(), async move {
            let _ = volume::reconcile(vol, ctx).await;
        })
        .await;
        check_sample(
            sample_name,
            &sample(&obj, statuses.last().expect("a status")),
        );
    }
}

#[tokio::test]
async fn pool_and_network_samples() {
    let pool_obj = json!({
        "apiVersion": "virtkube.io/v1alpha1", "kind": "StoragePool",
        "metadata": { "name": "images", "uid": "uid-images", "generation": 1, "finalizers": [NODE_FINALIZER] },
        "spec": { "type": "dir", "target": { "path": "/var/lib/virtkube/pools/images" } },
    });
    let (ctx, api, _engine) = context().await;
    let p = Arc::new(serde_json::from_value(pool_obj.clone()).unwrap());
    let statuses = record(api, pool_obj.clone(), async move {
        let _ = pool::reconcile(p, ctx).await;
    })
    .await;
    check_sample(
        "storagepool-ready",
        &sample(&pool_obj, statuses.last().expect("a status")),
    );

    let net_obj = |name: &str, spec: Value| {
        json!({
            "apiVersion": "virtkube.io/v1alpha1", "kind": "Network",
            "metadata": { "name": name, "uid": format!("uid-{name}"), "generation": 1, "finalizers": [NODE_FINALIZER] },
            "spec": spec,
        })
    };
    for (obj, sample_name) in [
        (
            net_obj(
                "vk-isolated",
                json!({ "mode": "isolated", "ip": { "address": "10.150.0.1", "prefix": 24 } }),
            ),
            "network-ready",
        ),
        (
            // The host's own address inside the DHCP range: refused by virtkube's checks.
            net_obj(
                "vk-bad",
                json!({ "mode": "nat", "ip": { "address": "10.151.0.1", "prefix": 24,
                        "dhcp": { "ranges": [{ "start": "10.151.0.1", "end": "10.151.0.9" }] } } }),
            ),
            "network-invalid-spec",
        ),
    ] {
        let (ctx, api, _engine) = context().await;
        let n = Arc::new(serde_json::from_value(obj.clone()).unwrap());
        let statuses = record(api, obj.clone(), async move {
            let _ = network::reconcile(n, ctx).await;
        })
        .await;
        check_sample(
            sample_name,
            &sample(&obj, statuses.last().expect("a status")),
        );
    }
}

#[tokio::test]
async fn hypervisor_node_samples() {
    let obj = json!({
        "apiVersion": "virtkube.io/v1alpha1", "kind": "HypervisorNode",
        "metadata": { "name": NODE, "uid": "uid-node", "generation": 1 },
        "spec": {},
    });
    let (ctx, api, _engine) = context().await;
    let c = ctx.clone();
    let statuses = record(api, obj.clone(), async move {
        node::publish_once(&c, None, None, None).await.unwrap();
    })
    .await;
    check_sample(
        "hypervisornode-ready",
        &sample(&obj, statuses.last().unwrap()),
    );
    let (ctx2, api2) = swap_api(&ctx).await;
    let previous: virtkube_crds::hypervisor_node::HypervisorNodeStatus =
        serde_json::from_value(statuses.last().unwrap().clone()).unwrap();
    let statuses = record(api2, obj.clone(), async move {
        node::publish_unreachable(&ctx2, Some(&previous), "connection refused")
            .await
            .unwrap();
    })
    .await;
    check_sample(
        "hypervisornode-libvirt-unreachable",
        &sample(&obj, statuses.last().unwrap()),
    );
}
