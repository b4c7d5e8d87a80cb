//! Shared by the agent's mock-API tests: kube's mock service with a verifier that answers
//! each call in order, and a context on the real engine over `test:///default`.

#![allow(dead_code)]

pub mod fake_api;
pub mod rbac;

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response};
use http_body_util::BodyExt;
use kube::Client;
use kube::client::Body;
use prometheus_client::registry::Registry;
use serde_json::Value;
use tower_test::mock::{self, Handle, SendResponse};
use virtkube::agent::context::{Context, Settings};
use virtkube::agent::metrics::Metrics;
use virtkube::host::{HostSpec, Hosts};
use virtkube_engine::{Engine, EngineConfig};

/// The node every test agent runs as.
pub const NODE: &str = "node-a";

/// One API call as the verifier saw it.
pub struct Seen {
    /// HTTP method.
    pub method: Method,
    /// Path and query.
    pub uri: String,
    /// JSON body (`Null` when empty).
    pub body: Value,
}

impl Seen {
    /// The path without the query.
    pub fn path(&self) -> &str {
        self.uri
            .split_once('?')
            .map_or(self.uri.as_str(), |(p, _)| p)
    }
    /// Whether this is an events.k8s.io event (created, or a series update).
    pub fn is_event(&self) -> bool {
        self.uri.starts_with("/apis/events.k8s.io/")
    }
}

/// Answers the agent's API calls in order.
pub struct ApiServerVerifier(pub Handle<Request<Body>, Response<Body>>);

/// A 200 answer with `body` as JSON.
pub fn ok<T: serde::Serialize>(body: &T) -> Response<Body> {
    Response::builder()
        .body(Body::from(serde_json::to_vec(body).unwrap()))
        .unwrap()
}

impl ApiServerVerifier {
    /// The next call, failing after 10 s without one.
    pub async fn next(&mut self) -> (Seen, SendResponse<Response<Body>>) {
        let (request, send) = tokio::time::timeout(Duration::from_secs(10), self.0.next_request())
            .await
            .expect("the agent made no further API call")
            .expect("service closed");
        let method = request.method().clone();
        let uri = request.uri().to_string();
        let bytes = request.into_body().collect().await.unwrap().to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        (Seen { method, uri, body }, send)
    }

    /// Answers events (echoing them) until a non-event call comes; returns the event
    /// reasons and notes, and that call.
    pub async fn events_then(
        &mut self,
    ) -> (Vec<(String, String)>, Seen, SendResponse<Response<Body>>) {
        let mut events = Vec::new();
        loop {
            let (seen, send) = self.next().await;
            if seen.is_event() {
                assert_eq!(seen.body["reportingController"], "virtkube-agent");
                events.push((
                    seen.body["reason"].as_str().unwrap_or_default().to_string(),
                    seen.body["note"].as_str().unwrap_or_default().to_string(),
                ));
                send.send_response(ok(&seen.body));
            } else {
                return (events, seen, send);
            }
        }
    }

    /// Asserts that no call comes within `wait`.
    pub async fn assert_silent(&mut self, wait: Duration) {
        if let Ok(Some((request, _))) = tokio::time::timeout(wait, self.0.next_request()).await {
            panic!("unexpected API call {} {}", request.method(), request.uri());
        }
    }
}

/// A context for `NODE` on `test:///default` with a mocked API server.
pub async fn context() -> (Arc<Context>, ApiServerVerifier, Engine) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let mut hosts = Hosts::connect(
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
    hosts.shutdown_deadline = Duration::from_millis(200);
    let engine = hosts.get(NODE).unwrap().engine.clone();
    let mut settings = Settings::for_node(NODE);
    settings.shutdown_timeout = Duration::from_millis(200);
    settings.host_cpus = Some(engine.node_info().await.unwrap().cpus);
    let metrics = Metrics::register(&mut Registry::default(), None);
    let ctx = Context::new(client, hosts, metrics, settings).unwrap();
    (Arc::new(ctx), ApiServerVerifier(handle), engine)
}

/// Every Event the in-memory API server holds, as (regarding name, reason, action, note).
pub fn events(api: &virtkube_testapi::TestApi) -> Vec<(String, String, String, String)> {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    api.events()
        .iter()
        .map(|e| {
            let regarding = if e["regarding"].is_object() {
                &e["regarding"]
            } else {
                &e["involvedObject"]
            };
            let note = if e["note"].is_string() {
                &e["note"]
            } else {
                &e["message"]
            };
            (
                text(&regarding["name"]),
                text(&e["reason"]),
                text(&e["action"]),
                text(note),
            )
        })
        .collect()
}

/// The changes to virtkube's reconciled kinds after `rv`, as `TYPE plural/name`.
pub fn writes_since(api: &virtkube_testapi::TestApi, rv: u64) -> Vec<String> {
    api.changes_since(rv)
        .iter()
        .filter(|c| {
            ["domains", "volumes", "networks", "storagepools"].contains(&c.key.plural.as_str())
        })
        .map(|c| format!("{} {}/{}", c.kind.as_str(), c.key.plural, c.key.name))
        .collect()
}

/// An agent context for `NODE` on `test:///default` whose API is the in-memory server
/// `api`, as identity `agent`.
pub async fn testapi_context(
    api: &virtkube_testapi::TestApi,
) -> (Arc<Context>, kube::Client, Engine) {
    testapi_context_for(api, NODE).await
}

/// An agent context for `node` on `test:///default` (whose default instance every
/// connection of this process shares) whose API is the in-memory server `api`, as identity
/// `agent`.
pub async fn testapi_context_for(
    api: &virtkube_testapi::TestApi,
    node: &str,
) -> (Arc<Context>, kube::Client, Engine) {
    testapi_context_on(api, node, "test:///default").await
}

/// An agent context for `node` on libvirt `uri` whose API is the in-memory server `api`,
/// as identity `agent` (shutdown grace and deadline 200 ms).
pub async fn testapi_context_on(
    api: &virtkube_testapi::TestApi,
    node: &str,
    uri: &str,
) -> (Arc<Context>, kube::Client, Engine) {
    let (ctx, client, engine) = testapi_context_unshared(api, node, uri).await;
    (Arc::new(ctx), client, engine)
}

/// [`testapi_context_on`], with the Domain cache the agent's Volume controller reads
/// (`usedBy`) fed by the returned writer (the test applies the Domains it creates).
pub async fn testapi_context_with_domains(
    api: &virtkube_testapi::TestApi,
    node: &str,
    uri: &str,
) -> (
    Arc<Context>,
    Engine,
    kube::runtime::reflector::store::Writer<virtkube_crds::Domain>,
) {
    let (mut ctx, _, engine) = testapi_context_unshared(api, node, uri).await;
    let (store, writer) = kube::runtime::reflector::store();
    ctx.domains = Some(store);
    (Arc::new(ctx), engine, writer)
}

/// The agent context of [`testapi_context_on`], before it is shared.
async fn testapi_context_unshared(
    api: &virtkube_testapi::TestApi,
    node: &str,
    uri: &str,
) -> (Context, kube::Client, Engine) {
    let client = api.client("agent").await.unwrap();
    let mut hosts = Hosts::connect(
        &[HostSpec {
            node: node.into(),
            uri: uri.into(),
            p2p_uri: None,
            migration_uri: None,
        }],
        EngineConfig::default(),
    )
    .await
    .unwrap();
    hosts.shutdown_deadline = Duration::from_millis(200);
    let engine = hosts.get(node).unwrap().engine.clone();
    let mut settings = Settings::for_node(node);
    settings.shutdown_timeout = Duration::from_millis(200);
    settings.host_cpus = Some(engine.node_info().await.unwrap().cpus);
    let metrics = Metrics::register(&mut Registry::default(), None);
    let ctx = Context::new(client.clone(), hosts, metrics, settings).unwrap();
    (ctx, client, engine)
}

/// Writes a Domain's status as the cluster controller does: `change` applied to the status
/// as read, by compare-and-swap, reading again after a write lost to the agent's own.
async fn write_as_controller(
    client: &kube::Client,
    ns: &str,
    name: &str,
    what: &str,
    change: impl Fn(&mut virtkube_crds::domain::DomainStatus),
) {
    use kube::api::Api;
    use virtkube::placement::write::{WriteError, write_status};
    use virtkube_crds::Domain;
    let api: Api<Domain> = Api::namespaced(client.clone(), ns);
    for _ in 0..20 {
        let dom = api.get(name).await.unwrap();
        let mut status = dom.status.clone().unwrap_or_default();
        change(&mut status);
        match write_status(&api, &dom, &status, "virtkube-controller").await {
            Ok(_) => return,
            Err(WriteError::Conflict { .. }) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{what} {ns}/{name}: {e}"),
        }
    }
    panic!("{what} {ns}/{name}: 20 conflicts in a row");
}

/// Binds a Domain to `node` the way the cluster controller does: the claim
/// (`status.nodeName`) written by compare-and-swap, then the routing label.
pub async fn bind_domain(client: &kube::Client, ns: &str, name: &str, node: &str) {
    use virtkube::placement::write::{HOLDER, node_label};
    write_as_controller(client, ns, name, "binding", |status| {
        status.node_name = Some(node.to_string())
    })
    .await;
    label_domain(client, ns, name, &[(&node_label(node), Some(HOLDER))]).await;
}

/// Sets (or, with `None`, removes) labels of a Domain, as the controller routes it.
pub async fn label_domain(
    client: &kube::Client,
    ns: &str,
    name: &str,
    labels: &[(&str, Option<&str>)],
) {
    use kube::api::{Api, Patch, PatchParams};
    use virtkube_crds::Domain;
    let api: Api<Domain> = Api::namespaced(client.clone(), ns);
    let map: serde_json::Map<String, Value> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.map_or(Value::Null, Value::from)))
        .collect();
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"metadata": {"labels": map}})),
    )
    .await
    .unwrap();
}

/// Records on a Domain what the controller writes when it approves a move: the claim's
/// `status.migration` = Pending from the holder to `target`.
pub async fn approve_move(client: &kube::Client, ns: &str, name: &str, target: &str) {
    use virtkube_crds::domain::{MigrationState, MigrationStatus};
    write_as_controller(client, ns, name, "approving the move of", |status| {
        status.migration = Some(MigrationStatus {
            state: Some(MigrationState::Pending),
            source_node: status.node_name.clone(),
            target_node: Some(target.to_string()),
            reason: Some("Requested".into()),
            ..MigrationStatus::default()
        });
    })
    .await;
}

/// A HypervisorNode `name` whose agent publishes `libvirt_uri` (how other nodes reach it).
pub async fn hypervisor_node(client: &kube::Client, name: &str, libvirt_uri: &str) {
    use kube::api::{Api, Patch, PatchParams};
    use virtkube_crds::HypervisorNode;
    let api: Api<HypervisorNode> = Api::all(client.clone());
    let body = serde_json::json!({
        "apiVersion": "virtkube.io/v1alpha1", "kind": "HypervisorNode",
        "metadata": {"name": name},
        "spec": {},
    });
    api.patch(
        name,
        &PatchParams::apply("test").force(),
        &Patch::Apply(&body),
    )
    .await
    .unwrap();
    let status = serde_json::json!({
        "apiVersion": "virtkube.io/v1alpha1", "kind": "HypervisorNode",
        "status": {"libvirtUri": libvirt_uri},
    });
    api.patch_status(
        name,
        &PatchParams::apply("test").force(),
        &Patch::Apply(&status),
    )
    .await
    .unwrap();
}

/// Binds a Volume to `node` the way the cluster controller does: the node's routing label,
/// and `status.nodeName` by a status write.
pub async fn bind_volume(api: &virtkube_testapi::TestApi, ns: &str, name: &str, node: &str) {
    let label = format!("node.virtkube.io/{node}");
    api.patch_labels("volumes", ns, name, &[(label.as_str(), Some("holder"))])
        .unwrap();
    let client = api.client(virtkube_testapi::ADMIN).await.unwrap();
    kube::Api::<virtkube_crds::Volume>::namespaced(client, ns)
        .patch_status(
            name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({ "status": { "nodeName": node } })),
        )
        .await
        .unwrap();
}
