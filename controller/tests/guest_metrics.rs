//! Per-guest metrics on the agent's `/metrics`: one libvirt call per scrape, only
//! virtkube-owned domains, labelled by namespace and name, capped.
//!
//! The first test runs on `test:///default` (which reports only the state group); the second
//! needs the private libvirtd daemons (`scripts/libvirt-nodes.sh up`) and fails without them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use virtkube::agent::guest_metrics::GuestMetricsConfig;
use virtkube::agent::http::{Health, router_with_guest_metrics, serve};
use virtkube_engine::model::DomainDef;
use virtkube_engine::{Engine, EngineConfig, Owner};

async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).await.unwrap();
    assert!(text.starts_with("HTTP/1.0 200"), "{text}");
    text
}

async fn endpoint(engine: &Engine, max_domains: usize) -> std::net::SocketAddr {
    let (addr, _task) = serve(
        "127.0.0.1:0".parse().unwrap(),
        router_with_guest_metrics(
            Arc::new(Registry::default()),
            Arc::new(Health::default()),
            Some(engine.clone()),
            GuestMetricsConfig {
                max_domains,
                ..Default::default()
            },
        ),
        futures::future::pending(),
    )
    .await
    .unwrap();
    addr
}

/// The value of the one sample whose line starts with `prefix`.
fn sample(body: &str, prefix: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn test_driver_guests_are_exported_once_per_scrape_and_capped() {
    let engine = Engine::connect("test:///default", EngineConfig::default())
        .await
        .unwrap();
    let mut owners = Vec::new();
    for name in ["alpha", "beta"] {
        let o = Owner::new("Domain", format!("uid-{name}"), Some("gm"), name);
        let mut def = DomainDef::new(format!("gm.{name}"), o.clone());
        def.virt_type = "test".into();
        engine.domain_define(&def).await.unwrap();
        owners.push(o);
    }
    engine.domain_start("gm.alpha", &owners[0]).await.unwrap();
    let addr = endpoint(&engine, 1000).await;
    engine.reset_stats();

    let body = get(addr, "/metrics").await;
    assert!(body.trim_end().ends_with("# EOF"), "{body}");
    assert_eq!(body.matches("# EOF").count(), 1, "{body}");
    assert_eq!(sample(&body, "virtkube_guest_stats_up"), Some(1.0));
    assert_eq!(
        sample(
            &body,
            r#"virtkube_guest_running{namespace="gm",name="alpha"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &body,
            r#"virtkube_guest_running{namespace="gm",name="beta"}"#
        ),
        Some(0.0)
    );
    // libvirt's own `test` domain carries no virtkube mark.
    assert!(!body.contains(r#"name="test""#), "{body}");
    // The test driver reports no CPU, memory, disk or NIC counters: none are invented.
    assert!(
        !body.contains("virtkube_guest_cpu_seconds_total{"),
        "{body}"
    );
    get(addr, "/metrics").await;
    let stats = engine.stats();
    assert_eq!(stats.get("domain_stats").map(|c| c.count), Some(2));
    assert_eq!(
        stats.total_calls(),
        2,
        "one libvirt call per scrape: {stats:?}"
    );

    let capped = get(endpoint(&engine, 1).await, "/metrics").await;
    assert!(capped.contains(r#"name="alpha""#) && !capped.contains(r#"name="beta""#));
    assert_eq!(sample(&capped, "virtkube_guest_stats_dropped"), Some(1.0));

    let off = get(endpoint(&engine, 0).await, "/metrics").await;
    assert!(!off.contains("virtkube_guest_"), "{off}");
    engine.domain_destroy("gm.alpha", &owners[0]).await.unwrap();
    for (name, o) in ["gm.alpha", "gm.beta"].iter().zip(&owners) {
        engine.domain_undefine(name, o).await.unwrap();
    }
    engine.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs private libvirtd: scripts/libvirt-nodes.sh up, then --run-ignored"]
async fn a_running_qemu_guest_cpu_time_grows_between_scrapes() {
    let uri = std::env::var("VIRTKUBE_TEST_NODE_A_URI").unwrap_or_else(|_| {
        panic!(
            "VIRTKUBE_TEST_NODE_A_URI is not set: run `scripts/libvirt-nodes.sh up` and source \
             its env file before this test"
        )
    });
    let engine = Engine::connect(&uri, EngineConfig::default())
        .await
        .unwrap();
    let name = format!("gmreal{}", std::process::id() % 100_000);
    let o = Owner::new("Domain", format!("uid-{name}"), Some("gm"), &name);
    let libvirt_name = format!("gm.{name}");
    let mut def = DomainDef::new(&libvirt_name, o.clone());
    def.virt_type = "qemu".into();
    def.os.machine = Some("pc".into());
    def.emulator = Some("/usr/bin/qemu-system-x86_64".into());
    engine.domain_define(&def).await.unwrap();
    engine.domain_start(&libvirt_name, &o).await.unwrap();
    let addr = endpoint(&engine, 1000).await;
    let cpu = format!(r#"virtkube_guest_cpu_seconds_total{{namespace="gm",name="{name}"}}"#);
    let first = get(addr, "/metrics").await;
    let before = sample(&first, &cpu).unwrap_or_else(|| panic!("no `{cpu}` in:\n{first}"));
    let until = Instant::now() + Duration::from_secs(20);
    let mut after = before;
    while after <= before && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(300)).await;
        after = sample(&get(addr, "/metrics").await, &cpu).unwrap();
    }
    let memory = sample(
        &first,
        &format!(r#"virtkube_guest_memory_bytes{{namespace="gm",name="{name}"}}"#),
    );
    engine.domain_destroy(&libvirt_name, &o).await.unwrap();
    engine.domain_undefine(&libvirt_name, &o).await.unwrap();
    engine.close().await.unwrap();
    assert!(after > before, "CPU time {before} then {after}");
    assert_eq!(memory, Some(128.0 * 1024.0 * 1024.0));
}
