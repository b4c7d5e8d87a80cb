//! The Domain controller against kube's mock API server (the `ApiServerVerifier` pattern of
//! kube-rs's controller-rs), with the real engine on libvirt's `test:///default` underneath.
//!
//! Each scenario scripts exactly the API calls it expects; an unexpected call leaves the
//! reconcile waiting for an answer that never comes, and the scenario fails on its timeout.

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response};
use http_body_util::BodyExt;
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::{Client, Resource, ResourceExt};
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tower_test::mock::{self, Handle};
use virtkube::agent::context::{Context, FINALIZER, Settings};
use virtkube::agent::domain;
use virtkube::agent::metrics::Metrics;
use virtkube::host::{HostSpec, Hosts};
use virtkube_crds::Domain;
use virtkube_crds::domain::DomainStatus;
use virtkube_engine::{Engine, EngineConfig};

const NODE: &str = "node-a";

/// Answers the agent's API calls in order, checking each.
struct ApiServerVerifier(Handle<Request<Body>, Response<Body>>);

/// One API call as the verifier saw it.
struct Seen {
    method: Method,
    uri: String,
    body: Value,
}

impl ApiServerVerifier {
    async fn next(&mut self) -> (Seen, mock::SendResponse<Response<Body>>) {
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

    /// Expects the JSON patch that adds the finalizer (with its `test` op) and answers with
    /// `dom` carrying the finalizer.
    async fn handle_finalizer_creation(&mut self, dom: &Domain) {
        let (seen, send) = self.next().await;
        assert_eq!(seen.method, Method::PATCH);
        assert_eq!(
            seen.uri,
            format!(
                "/apis/virtkube.io/v1alpha1/namespaces/{}/domains/{}?",
                dom.namespace().unwrap(),
                dom.name_any()
            )
        );
        assert_eq!(
            seen.body,
            json!([
                { "op": "test", "path": "/metadata/finalizers", "value": null },
                { "op": "add", "path": "/metadata/finalizers", "value": [FINALIZER] }
            ])
        );
        send.send_response(ok(&finalized(dom.clone())));
    }

    /// Expects an events.k8s.io event with `reason`; returns its note.
    async fn handle_event(&mut self, ns: &str, reason: &str) -> String {
        let (seen, send) = self.next().await;
        assert_eq!(
            seen.method,
            Method::POST,
            "expected event {reason}, got {} {}",
            seen.uri,
            seen.body
        );
        assert_eq!(
            seen.uri,
            format!("/apis/events.k8s.io/v1/namespaces/{ns}/events?")
        );
        assert_eq!(seen.body["reason"], reason, "event body: {}", seen.body);
        assert_eq!(seen.body["reportingController"], "virtkube-agent");
        send.send_response(ok(&seen.body));
        format!(
            "{} [action {}]",
            seen.body["note"].as_str().unwrap_or_default(),
            seen.body["action"].as_str().unwrap_or_default()
        )
    }

    /// Expects a server-side-apply status patch under the agent's field manager; answers
    /// with `dom` carrying that status and returns it.
    async fn handle_status_patch(&mut self, dom: &Domain) -> Domain {
        let (seen, send) = self.next().await;
        assert_eq!(
            seen.method,
            Method::PATCH,
            "expected a status patch, got {}",
            seen.uri
        );
        let (path, query) = seen.uri.split_once('?').unwrap();
        assert_eq!(
            path,
            format!(
                "/apis/virtkube.io/v1alpha1/namespaces/{}/domains/{}/status",
                dom.namespace().unwrap(),
                dom.name_any()
            )
        );
        assert!(query.contains("fieldManager=virtkube-agent"), "{query}");
        assert!(query.contains("force=true"), "{query}");
        assert_eq!(seen.body["apiVersion"], "virtkube.io/v1alpha1");
        assert_eq!(seen.body["kind"], "Domain");
        let status: DomainStatus = serde_json::from_value(seen.body["status"].clone()).unwrap();
        let mut updated = dom.clone();
        updated.status = Some(status);
        send.send_response(ok(&updated));
        updated
    }

    /// Expects the JSON patch that removes the finalizer (with its `test` op).
    async fn handle_finalizer_removal(&mut self, dom: &Domain) {
        let (seen, send) = self.next().await;
        assert_eq!(seen.method, Method::PATCH);
        assert_eq!(
            seen.body,
            json!([
                { "op": "test", "path": "/metadata/finalizers/0", "value": FINALIZER },
                { "op": "remove", "path": "/metadata/finalizers/0" }
            ])
        );
        let mut gone = dom.clone();
        gone.metadata.finalizers = None;
        send.send_response(ok(&gone));
    }
}

fn ok<T: serde::Serialize>(body: &T) -> Response<Body> {
    Response::builder()
        .body(Body::from(serde_json::to_vec(body).unwrap()))
        .unwrap()
}

fn finalized(mut dom: Domain) -> Domain {
    dom.finalizers_mut().push(FINALIZER.to_string());
    dom
}

/// A small running domain on `NODE` with one pinned vCPU, in its own namespace (the test
/// driver's state is shared by every test in this process).
fn test_domain(ns: &str) -> Domain {
    let mut dom: Domain = serde_json::from_value(json!({
        "apiVersion": "virtkube.io/v1alpha1",
        "kind": "Domain",
        "metadata": { "name": "web", "namespace": ns, "uid": format!("uid-{ns}"), "generation": 1 },
        "spec": {
            "nodeName": NODE,
            "runStrategy": "Always",
            "autostart": true,
            "cpu": { "vcpus": 2, "pinning": [ { "vcpu": 0, "cpuset": "1" } ] },
            "memory": { "size": "128Mi" }
        }
    }))
    .unwrap();
    dom.meta_mut().resource_version = Some("1".into());
    dom
}

async fn context() -> (Arc<Context>, ApiServerVerifier, Engine) {
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

async fn reconcile(dom: &Domain, ctx: &Arc<Context>) -> Action {
    tokio::time::timeout(
        Duration::from_secs(20),
        domain::reconcile(Arc::new(dom.clone()), ctx.clone()),
    )
    .await
    .expect("reconcile waited for an API call nobody expected")
    .expect("reconcile failed")
}

#[tokio::test]
async fn new_domain_gets_the_finalizer_and_nothing_else() {
    let (ctx, mut api, engine) = context().await;
    let dom = test_domain("fin");
    let server = tokio::spawn(async move {
        api.handle_finalizer_creation(&dom).await;
        api
    });
    let action = reconcile(&test_domain("fin"), &ctx).await;
    assert_eq!(action, Action::await_change());
    server.await.unwrap();
    assert!(
        engine.domain_lookup("fin.web").await.unwrap().is_none(),
        "nothing is defined before the finalizer is in place"
    );
}

#[tokio::test]
async fn apply_defines_starts_pins_and_reports_then_steady_state_is_silent() {
    let (ctx, mut api, engine) = context().await;
    let dom = finalized(test_domain("apply"));
    let server = {
        let dom = dom.clone();
        tokio::spawn(async move {
            assert!(
                api.handle_event("apply", "Defined")
                    .await
                    .contains("apply.web")
            );
            api.handle_event("apply", "AutostartSet").await;
            api.handle_event("apply", "Started").await;
            let updated = api.handle_status_patch(&dom).await;
            (api, updated)
        })
    };
    let action = reconcile(&dom, &ctx).await;
    assert_eq!(action, Action::requeue(ctx.settings.resync));
    let (mut api, updated) = server.await.unwrap();

    let status = updated.status.clone().unwrap();
    assert_eq!(status.node_name.as_deref(), Some(NODE));
    assert_eq!(status.domain_name.as_deref(), Some("apply.web"));
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(status.autostart, Some(true));
    assert_eq!(status.vcpus, Some(2));
    assert!(status.uuid.is_some() && status.id.is_some());
    assert_eq!(
        status
            .vcpu_affinity
            .iter()
            .find(|a| a.vcpu == 0)
            .map(|a| a.cpuset.as_str()),
        Some("1"),
        "affinity as libvirt reports it: {:?}",
        status.vcpu_affinity
    );
    let ready = virtkube_crds::conditions::find(&status.conditions, "Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("True", "Reconciled")
    );
    assert!(virtkube_crds::conditions::is_true(
        &status.conditions,
        "Running"
    ));
    let (state, _) = engine.domain_state("apply.web").await.unwrap();
    assert_eq!(state.as_str(), "running");

    // Steady state: the same object again makes no API call at all (the reconcile would
    // hang on an unanswered call) and no mutating libvirt call.
    engine.reset_stats();
    let action = reconcile(&updated, &ctx).await;
    assert_eq!(action, Action::requeue(ctx.settings.resync));
    assert_eq!(engine.stats().mutating_calls(), 0, "{:?}", engine.stats());
    assert!(
        tokio::time::timeout(Duration::from_millis(300), api.0.next_request())
            .await
            .is_err(),
        "no API call in steady state"
    );
}

#[tokio::test]
async fn out_of_band_destroy_is_repaired_with_an_event() {
    let (ctx, mut api, engine) = context().await;
    let dom = finalized(test_domain("drift"));
    let server = {
        let dom = dom.clone();
        tokio::spawn(async move {
            api.handle_event("drift", "Defined").await;
            api.handle_event("drift", "AutostartSet").await;
            api.handle_event("drift", "Started").await;
            let updated = api.handle_status_patch(&dom).await;
            (api, updated)
        })
    };
    reconcile(&dom, &ctx).await;
    let (mut api, updated) = server.await.unwrap();
    // Someone runs `virsh destroy` behind the agent's back.
    let owner = virtkube::agent::converge::owner_of(&updated).unwrap();
    engine.domain_destroy("drift.web", &owner).await.unwrap();
    let server = {
        let updated = updated.clone();
        tokio::spawn(async move {
            let note = api.handle_event("drift", "Started").await;
            assert!(
                note.contains("destroyed"),
                "libvirt's reason in the note: {note}"
            );
            assert!(note.contains("[action Repair"), "a repair of drift: {note}");
            api.handle_status_patch(&updated).await
        })
    };
    reconcile(&updated, &ctx).await;
    let repaired = server.await.unwrap();
    assert_eq!(
        engine.domain_state("drift.web").await.unwrap().0.as_str(),
        "running"
    );
    assert_ne!(
        repaired.status.unwrap().id,
        updated.status.unwrap().id,
        "a new run"
    );
}

#[tokio::test]
async fn delete_shuts_down_undefines_and_removes_the_finalizer() {
    let (ctx, mut api, engine) = context().await;
    let dom = finalized(test_domain("del"));
    let server = {
        let dom = dom.clone();
        tokio::spawn(async move {
            api.handle_event("del", "Defined").await;
            api.handle_event("del", "AutostartSet").await;
            api.handle_event("del", "Started").await;
            let updated = api.handle_status_patch(&dom).await;
            (api, updated)
        })
    };
    reconcile(&dom, &ctx).await;
    let (mut api, updated) = server.await.unwrap();
    let mut deleting = updated.clone();
    deleting.meta_mut().deletion_timestamp = Some(
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()),
    );
    let server = {
        let deleting = deleting.clone();
        tokio::spawn(async move {
            let note = api.handle_event("del", "Deleted").await;
            assert!(note.contains("undefined"), "{note}");
            api.handle_finalizer_removal(&deleting).await;
        })
    };
    reconcile(&deleting, &ctx).await;
    server.await.unwrap();
    assert!(engine.domain_lookup("del.web").await.unwrap().is_none());

    // Deleting again when libvirt has nothing left completes at once (no event).
    let (ctx2, mut api2, _) = context().await;
    let server = {
        let deleting = deleting.clone();
        tokio::spawn(async move { api2.handle_finalizer_removal(&deleting).await })
    };
    reconcile(&deleting, &ctx2).await;
    server.await.unwrap();
}

#[tokio::test]
async fn a_domain_of_another_node_is_not_touched() {
    let (ctx, mut api, engine) = context().await;
    let mut dom = test_domain("other");
    dom.spec.node_name = Some("node-b".into());
    let action = reconcile(&dom, &ctx).await;
    assert_eq!(action, Action::await_change());
    assert!(
        tokio::time::timeout(Duration::from_millis(200), api.0.next_request())
            .await
            .is_err()
    );
    assert!(engine.domain_lookup("other.web").await.unwrap().is_none());
}

#[tokio::test]
async fn a_foreign_domain_of_the_same_name_is_reported_never_overwritten() {
    let (ctx, mut api, engine) = context().await;
    // The test driver's own `test` domain, claimed by a resource named `test` in namespace…
    // there is no dot in `test`, so make a foreign one with a namespaced name instead.
    let foreign = virtkube_engine::model::DomainDef {
        virt_type: "test".into(),
        ..virtkube_engine::model::DomainDef::new(
            "clash.web",
            virtkube_engine::Owner::new("Domain", "someone-else", Some("clash"), "web"),
        )
    };
    engine.domain_define(&foreign).await.unwrap();
    let dom = finalized(test_domain("clash"));
    let server = {
        let dom = dom.clone();
        tokio::spawn(async move {
            let updated = api.handle_status_patch(&dom).await;
            let note = api.handle_event("clash", "Failed").await;
            (updated, note)
        })
    };
    let result = tokio::time::timeout(
        Duration::from_secs(20),
        domain::reconcile(Arc::new(dom.clone()), ctx.clone()),
    )
    .await
    .unwrap();
    assert!(
        result.is_err(),
        "a conflict is an error (retried with backoff)"
    );
    let (updated, note) = server.await.unwrap();
    assert!(note.starts_with("NameConflict"), "{note}");
    let ready =
        virtkube_crds::conditions::find(&updated.status.as_ref().unwrap().conditions, "Ready")
            .unwrap()
            .clone();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "NameConflict")
    );
    let still = engine.domain_owner("clash.web").await.unwrap().unwrap();
    assert_eq!(still.uid, "someone-else", "the foreign domain is untouched");
}

#[tokio::test]
async fn libvirt_out_of_reach_makes_the_phase_unknown_not_failed() {
    let (ctx, mut api, engine) = context().await;
    let dom = finalized(test_domain("gone"));
    let server = {
        let dom = dom.clone();
        tokio::spawn(async move {
            api.handle_event("gone", "Defined").await;
            api.handle_event("gone", "AutostartSet").await;
            api.handle_event("gone", "Started").await;
            let updated = api.handle_status_patch(&dom).await;
            (api, updated)
        })
    };
    reconcile(&dom, &ctx).await;
    let (mut api, updated) = server.await.unwrap();
    engine.close().await.unwrap();
    let server = {
        let updated = updated.clone();
        tokio::spawn(async move {
            let patched = api.handle_status_patch(&updated).await;
            let note = api.handle_event("gone", "Failed").await;
            (patched, note)
        })
    };
    let result = tokio::time::timeout(
        Duration::from_secs(20),
        domain::reconcile(Arc::new(updated.clone()), ctx.clone()),
    )
    .await
    .unwrap();
    assert!(result.is_err(), "retried with backoff");
    let (patched, note) = server.await.unwrap();
    let status = patched.status.unwrap();
    assert_eq!(
        status.phase,
        Some(virtkube_crds::domain::DomainPhase::Unknown)
    );
    assert_eq!(status.uuid, updated.status.unwrap().uuid, "last facts kept");
    let ready = virtkube_crds::conditions::find(&status.conditions, "Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "LibvirtError")
    );
    assert!(note.starts_with("LibvirtError"), "{note}");
}
