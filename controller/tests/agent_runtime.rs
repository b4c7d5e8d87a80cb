//! The agent's runtime pieces: the CRD check's message, the HypervisorNode publisher, the
//! libvirt-event drift trigger, and the metrics and health endpoints.

mod agent_support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::StreamExt;
use http::{Method, Response};
use kube::client::Body;
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use virtkube::agent::http::{Health, router, serve};
use virtkube::agent::metrics::Metrics;
use virtkube::agent::{check_crds, drift, node};
use virtkube_crds::Domain;
use virtkube_engine::Owner;
use virtkube_engine::model::DomainDef;

use agent_support::{NODE, ok};

#[tokio::test]
async fn missing_crds_are_reported_with_the_exact_install_command() {
    let (ctx, mut api, _engine) = agent_support::context().await;
    let server = tokio::spawn(async move {
        let (seen, send) = api.next().await;
        assert_eq!(seen.method, Method::GET);
        assert!(
            seen.uri.starts_with("/apis/virtkube.io/v1alpha1/domains?"),
            "{}",
            seen.uri
        );
        assert!(seen.uri.contains("limit=1"));
        let status = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "the server could not find the requested resource",
            "reason": "NotFound", "code": 404
        });
        send.send_response(
            Response::builder()
                .status(404)
                .body(Body::from(serde_json::to_vec(&status).unwrap()))
                .unwrap(),
        );
        // The other four kinds are installed.
        for _ in 0..4 {
            let (seen, send) = api.next().await;
            assert_eq!(seen.method, Method::GET);
            send.send_response(ok(&json!({
                "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList",
                "metadata": {}, "items": []
            })));
        }
    });
    let error = check_crds(&ctx.client).await.unwrap_err();
    server.await.unwrap();
    let message = error.to_string();
    assert!(
        message.contains("missing: domains.virtkube.io"),
        "{message}"
    );
    assert!(
        message.contains("virtkube crd | kubectl apply --server-side -f -"),
        "{message}"
    );
}

#[tokio::test]
async fn hypervisor_node_is_created_and_its_status_published_with_a_heartbeat() {
    let (ctx, mut api, _engine) = agent_support::context().await;
    let server = tokio::spawn(async move {
        let (seen, send) = api.next().await;
        assert_eq!(seen.method, Method::PATCH);
        assert_eq!(
            seen.path(),
            "/apis/virtkube.io/v1alpha1/hypervisornodes/node-a"
        );
        assert!(seen.uri.contains("fieldManager=virtkube-agent"));
        assert_eq!(seen.body["kind"], "HypervisorNode");
        send.send_response(ok(&json!({
            "apiVersion": "virtkube.io/v1alpha1", "kind": "HypervisorNode",
            "metadata": { "name": NODE, "labels": { "zone": "a" } }, "spec": {}
        })));
        let (seen, send) = api.next().await;
        assert_eq!(seen.method, Method::PATCH);
        assert_eq!(
            seen.path(),
            "/apis/virtkube.io/v1alpha1/hypervisornodes/node-a/status"
        );
        assert!(seen.uri.contains("fieldManager=virtkube-agent"));
        assert!(seen.uri.contains("force=true"));
        let status = seen.body["status"].clone();
        send.send_response(ok(&json!({
            "apiVersion": "virtkube.io/v1alpha1", "kind": "HypervisorNode",
            "metadata": { "name": NODE }, "spec": {}, "status": status
        })));
        status
    });
    let labels = node::ensure_node_object(&ctx).await.unwrap();
    assert_eq!(labels.get("zone").map(String::as_str), Some("a"));
    let published = node::publish_once(&ctx, None, Some("tcp://10.0.0.1".into()), None)
        .await
        .unwrap();
    let body = server.await.unwrap();
    assert_eq!(body["hypervisorType"], "TEST");
    assert!(body["libvirtVersion"].as_str().unwrap().contains('.'));
    assert!(body["cpu"]["count"].as_u64().unwrap() > 0);
    assert!(body["memory"]["total"].is_string());
    assert!(body["heartbeatTime"].is_string());
    assert_eq!(body["migrationUri"], "tcp://10.0.0.1");
    // Host facts: the test driver's interface, security driver and volume groups.
    assert_eq!(body["host"]["interfaces"][0]["name"], "eth1");
    assert_eq!(body["host"]["securityModel"]["model"], "testSecurity");
    assert_eq!(body["host"]["storagePoolSources"][0]["name"], "testvg1");
    assert_eq!(body["conditions"][0]["type"], "Ready");
    assert_eq!(body["conditions"][0]["status"], "True");
    assert!(
        published.domains.unwrap().total >= 1,
        "the test driver's own domain"
    );
}

#[tokio::test]
async fn a_libvirt_event_requests_a_reconcile_of_the_owning_domain_within_a_second() {
    let (ctx, _api, engine) = agent_support::context().await;
    let (tx, mut rx) = futures::channel::mpsc::unbounded();
    let (store, _writer) = kube::runtime::reflector::store::<Domain>();
    let metrics = ctx.metrics.clone();
    tokio::spawn(drift::forward(engine.events(), store, metrics, tx));
    let owner = Owner::new("Domain", "uid-ev", Some("events"), "vm");
    let def = DomainDef {
        virt_type: "test".into(),
        ..DomainDef::new("events.vm", owner.clone())
    };
    engine.domain_define(&def).await.unwrap();
    engine.domain_start("events.vm", &owner).await.unwrap();
    // Drain what the define and start produced, then act behind the agent's back.
    tokio::time::sleep(Duration::from_millis(200)).await;
    while rx.try_recv().is_ok() {}
    let started = Instant::now();
    engine.domain_destroy("events.vm", &owner).await.unwrap();
    let request = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            let r = rx.next().await.unwrap();
            if r.name == "vm" {
                return r;
            }
        }
    })
    .await
    .expect("no reconcile request within a second of `virsh destroy`");
    assert_eq!(request.namespace.as_deref(), Some("events"));
    assert!(started.elapsed() < Duration::from_secs(1));
    engine.domain_undefine("events.vm", &owner).await.unwrap();
}

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).await.unwrap();
    let code = text[9..12].parse().unwrap();
    (code, text)
}

#[tokio::test]
async fn metrics_and_health_endpoints_answer() {
    let (_ctx, _api, engine) = agent_support::context().await;
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry, Some(engine.clone()));
    let timer = metrics.reconcile_started("Domain");
    drop(timer);
    metrics.reconcile_failed("Domain", "libvirt_timeout");
    engine.ping().await.unwrap();
    let health = Arc::new(Health::default());
    let (addr, _task) = serve(
        "127.0.0.1:0".parse().unwrap(),
        router(Arc::new(registry), health.clone(), Some(engine.clone())),
        futures::future::pending(),
    )
    .await
    .unwrap();
    assert_eq!(get(addr, "/healthz").await.0, 200);
    let (code, body) = get(addr, "/readyz").await;
    assert_eq!(code, 503, "not ready before the API answered: {body}");
    health.set_api(true);
    health.controllers_running.store(true, Ordering::SeqCst);
    let (code, body) = get(addr, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = get(addr, "/metrics").await;
    assert_eq!(code, 200);
    for needle in [
        "virtkube_agent_reconciles_total{kind=\"Domain\"} 1",
        "virtkube_agent_reconcile_failures_total{kind=\"Domain\",error=\"libvirt_timeout\"} 1",
        "virtkube_agent_reconcile_duration_seconds_count{kind=\"Domain\"} 1",
        "virtkube_agent_libvirt_calls_total{call=\"connect_is_alive\",class=\"query\"}",
        "virtkube_agent_libvirt_call_seconds_total{call=\"connect_is_alive\"",
        "virtkube_agent_libvirt_event_stream_reconnects_total 0",
        "# EOF",
    ] {
        assert!(body.contains(needle), "missing `{needle}` in:\n{body}");
    }
}

#[tokio::test]
async fn an_unreachable_libvirt_is_published_as_ready_false_with_a_heartbeat() {
    let (ctx, mut api, _engine) = agent_support::context().await;
    let server = tokio::spawn(async move {
        let (seen, send) = api.next().await;
        assert!(seen.path().ends_with("/hypervisornodes/node-a/status"));
        let status = seen.body["status"].clone();
        send.send_response(ok(&json!({
            "apiVersion": "virtkube.io/v1alpha1", "kind": "HypervisorNode",
            "metadata": { "name": NODE }, "spec": {}, "status": status
        })));
        status
    });
    node::publish_unreachable(&ctx, None, "connection refused")
        .await
        .unwrap();
    let status = server.await.unwrap();
    assert_eq!(status["conditions"][0]["status"], "False");
    assert_eq!(status["conditions"][0]["reason"], "LibvirtUnreachable");
    assert!(
        status["conditions"][0]["message"]
            .as_str()
            .unwrap()
            .contains("connection refused")
    );
    assert!(status["heartbeatTime"].is_string());
}
