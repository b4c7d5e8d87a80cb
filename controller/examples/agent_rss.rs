//! Agent memory with 1,000 domains on `test:///default`, no cluster needed.
//!
//! Runs the agent's Domain reconciler (finalizer, planner, executor, status, events) over
//! 1,000 in-memory Domain objects against the real engine on libvirt's in-process test
//! driver, with kube's mock service answering the API calls, then a second (steady-state)
//! pass; prints VmRSS/VmHWM from /proc/self/status after each pass, and what the steady pass
//! cost (status patches, events, mutating libvirt calls — all should be 0).
//!
//! ```sh
//! cargo run --release -p virtkube --example agent_rss            # 1000 domains
//! cargo run --release -p virtkube --example agent_rss -- 200     # another count
//! ```
//!
//! The test driver keeps every domain inside this process, so the figure includes libvirt's
//! own copy of 1,000 domain definitions (an agent on `qemu:///system` does not hold those).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use http::{Method, Request, Response};
use http_body_util::BodyExt;
use kube::Client;
use kube::client::Body;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use virtkube::agent::context::{Context, FINALIZER, Settings};
use virtkube::agent::domain;
use virtkube::agent::metrics::Metrics;
use virtkube::host::{HostSpec, Hosts};
use virtkube_crds::Domain;
use virtkube_crds::domain::DomainStatus;
use virtkube_engine::EngineConfig;

const NODE: &str = "bench-node";

fn status_line(key: &str) -> String {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "?".into())
}

fn rss() -> String {
    format!(
        "VmRSS {}, VmHWM {}",
        status_line("VmRSS:"),
        status_line("VmHWM:")
    )
}

fn domain(i: usize) -> Domain {
    let mut d: Domain = serde_json::from_value(json!({
        "apiVersion": "virtkube.io/v1alpha1",
        "kind": "Domain",
        "metadata": {
            "name": format!("vm{i:04}"), "namespace": "bench", "uid": format!("uid-{i}"),
            "generation": 1, "resourceVersion": "1", "finalizers": [FINALIZER]
        },
        "spec": {
            "nodeName": NODE, "runStrategy": "Always", "autostart": i.is_multiple_of(2),
            "cpu": { "vcpus": 2, "pinning": [ { "vcpu": 0, "cpuset": "1" } ] },
            "memory": { "size": "64Mi" }
        }
    }))
    .expect("a valid Domain");
    d.metadata.labels = None;
    d
}

#[derive(Default)]
struct Counters {
    events: AtomicU64,
    patches: AtomicU64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let count: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    println!("start: {}", rss());
    if std::env::args().nth(2).as_deref() == Some("--libvirt-only") {
        return libvirt_only(count).await;
    }

    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    // What the fake API server keeps: each object's last status, typed (as a reflector
    // would hold it), not as a JSON tree.
    let statuses: Arc<Mutex<HashMap<String, DomainStatus>>> = Arc::default();
    let counters: Arc<Counters> = Arc::default();
    {
        let (statuses, counters) = (statuses.clone(), counters.clone());
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let method = request.method().clone();
                let uri = request.uri().path().to_string();
                let bytes = request
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let answer = if uri.starts_with("/apis/events.k8s.io/") {
                    counters.events.fetch_add(1, Ordering::Relaxed);
                    body
                } else if method == Method::PATCH && uri.ends_with("/status") {
                    counters.patches.fetch_add(1, Ordering::Relaxed);
                    let name = uri.rsplit('/').nth(1).unwrap_or_default().to_string();
                    if let Ok(status) =
                        serde_json::from_value::<DomainStatus>(body["status"].clone())
                    {
                        statuses
                            .lock()
                            .map(|mut s| s.insert(name.clone(), status))
                            .ok();
                    }
                    json!({
                        "apiVersion": "virtkube.io/v1alpha1", "kind": "Domain",
                        "metadata": { "name": name, "namespace": "bench" },
                        "spec": { "memory": { "size": "64Mi" } }, "status": body["status"]
                    })
                } else {
                    json!({})
                };
                send.send_response(
                    Response::builder()
                        .body(Body::from(serde_json::to_vec(&answer).unwrap_or_default()))
                        .expect("a response"),
                );
            }
        });
    }

    let hosts = Hosts::connect(
        &[HostSpec {
            node: NODE.into(),
            uri: "test:///default".into(),
            p2p_uri: None,
            migration_uri: None,
        }],
        EngineConfig::default(),
    )
    .await?;
    let engine = hosts.get(NODE)?.engine.clone();
    let mut settings = Settings::for_node(NODE);
    settings.host_cpus = Some(engine.node_info().await?.cpus);
    let metrics = Metrics::register(&mut Registry::default(), Some(engine.clone()));
    let ctx = Arc::new(Context::new(client, hosts, metrics, settings)?);
    println!("engine connected: {}", rss());

    let mut objects: Vec<Domain> = (0..count).map(domain).collect();
    println!("{count} Domain objects in memory: {}", rss());

    // Pass 1: everything is new (define, start, autostart, status, events).
    let started = Instant::now();
    let failures = run_pass(&objects, &ctx).await;
    let first = started.elapsed();
    println!(
        "pass 1 (converge {count}): {:.2?}, {} failures, {} events, {} status patches; {}",
        first,
        failures,
        counters.events.load(Ordering::Relaxed),
        counters.patches.load(Ordering::Relaxed),
        rss()
    );

    // Pass 2: the objects as the API server now has them; steady state.
    {
        let mut statuses = statuses
            .lock()
            .map(|mut s| std::mem::take(&mut *s))
            .unwrap_or_default();
        for d in &mut objects {
            let name = d.metadata.name.clone().unwrap_or_default();
            d.status = statuses.remove(&name);
        }
    }
    println!("statuses moved into the objects: {}", rss());
    engine.reset_stats();
    counters.events.store(0, Ordering::Relaxed);
    counters.patches.store(0, Ordering::Relaxed);
    let started = Instant::now();
    let failures = run_pass(&objects, &ctx).await;
    let second = started.elapsed();
    let stats = engine.stats();
    println!(
        "pass 2 (resync {count}): {:.2?}, {} failures, {} events, {} status patches, {} libvirt calls of which {} mutating; {}",
        second,
        failures,
        counters.events.load(Ordering::Relaxed),
        counters.patches.load(Ordering::Relaxed),
        stats.total_calls(),
        stats.mutating_calls(),
        rss()
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    println!("end: {}", rss());
    Ok(())
}

/// The floor: the same domains defined and started through the engine alone, no agent, to
/// tell the test driver's in-process share of the memory from the agent's.
async fn libvirt_only(count: usize) -> Result<(), Box<dyn std::error::Error>> {
    let engine =
        virtkube_engine::Engine::connect("test:///default", EngineConfig::default()).await?;
    println!("engine connected: {}", rss());
    for i in 0..count {
        let owner = virtkube_engine::Owner::new(
            "Domain",
            format!("uid-{i}"),
            Some("bench"),
            format!("vm{i:04}"),
        );
        let mut def =
            virtkube_engine::model::DomainDef::new(format!("bench.vm{i:04}"), owner.clone());
        def.virt_type = "test".into();
        def.vcpus = 2;
        def.max_vcpus = 2;
        def.memory_kib = 65536;
        def.max_memory_kib = 65536;
        engine.domain_define(&def).await?;
        engine.domain_start(&def.name, &owner).await?;
        engine
            .domain_set_autostart(&def.name, &owner, i % 2 == 0)
            .await?;
    }
    println!(
        "{count} domains defined and started by the engine alone: {}",
        rss()
    );
    for i in 0..count {
        engine.domain_observe(&format!("bench.vm{i:04}")).await?;
    }
    println!("and observed once each: {}", rss());
    Ok(())
}

/// Reconciles every object, four at a time (the agent's default concurrency).
async fn run_pass(objects: &[Domain], ctx: &Arc<Context>) -> usize {
    futures::stream::iter(objects.iter().cloned())
        .map(|d| {
            let ctx = ctx.clone();
            async move { domain::reconcile(Arc::new(d), ctx).await.is_err() }
        })
        .buffer_unordered(4)
        .filter(|failed| futures::future::ready(*failed))
        .count()
        .await
}
