//! Shared by the agent's mock-API tests: kube's mock service with a verifier that answers
//! each call in order, and a context on the real engine over `test:///default`.

#![allow(dead_code)]

pub mod fake_api;

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
