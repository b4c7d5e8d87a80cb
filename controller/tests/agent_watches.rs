//! The agent's resilient watches against the strict in-memory API server: errors stay
//! inside the stream, and the API server's return (a `Recovery` from the health monitor)
//! cuts a grown backoff short by resuming the watch (no relist), or restarts a watch that
//! stalled while the server hung (a relist).

use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::runtime::watcher::Event;
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::sync::watch;
use virtkube::agent::api_health::Recovery;
use virtkube::agent::backoff::Policy;
use virtkube::agent::metrics::Metrics;
use virtkube::agent::watches::{self, Watches};
use virtkube_crds::Domain;
use virtkube_testapi::TestApi;

fn domain(name: &str) -> serde_json::Value {
    json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Domain",
           "metadata": {"name": name, "namespace": "w"},
           "spec": {"memory": {"size": "64Mi"}}})
}

/// A short name for each event.
fn describe(event: &Event<Domain>) -> String {
    use kube::ResourceExt;
    match event {
        Event::Init => "Init".into(),
        Event::InitApply(d) => format!("InitApply({})", d.name_any()),
        Event::InitDone => "InitDone".into(),
        Event::Apply(d) => format!("Apply({})", d.name_any()),
        Event::Delete(d) => format!("Delete({})", d.name_any()),
    }
}

async fn next<S>(stream: &mut S, within: Duration) -> String
where
    S: futures::Stream<Item = kube::runtime::watcher::Result<Event<Domain>>> + Unpin,
{
    match tokio::time::timeout(within, stream.next()).await {
        Ok(Some(Ok(event))) => describe(&event),
        Ok(Some(Err(e))) => panic!("an error left the stream: {e}"),
        Ok(None) => panic!("the stream ended"),
        Err(_) => panic!("no event within {within:?}"),
    }
}

fn counter(metrics: &Metrics, which: &str) -> u64 {
    let family = if which == "errors" {
        &metrics.watch_errors
    } else {
        &metrics.watch_restarts
    };
    family
        .get_or_create(&virtkube::agent::metrics::KindLabels {
            kind: "Domain".into(),
        })
        .get()
}

/// Stops the server until the watch has failed `failures` times (its backoff then well
/// past `Policy::WATCH.delay(failures) / 2`).
async fn stop_until_failed(api: &TestApi, metrics: &Metrics, failures: u64) {
    api.stop().await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while counter(metrics, "errors") < failures {
        assert!(
            Instant::now() < deadline,
            "the watch did not fail {failures} times"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_servers_return_resumes_a_backing_off_watch_at_once_without_a_relist() {
    let api = TestApi::start().await.unwrap();
    api.create_namespace("w").unwrap();
    api.create("domains", domain("a")).unwrap();
    let metrics = Metrics::register(&mut Registry::default(), None);
    let (recovered, restarts) = watch::channel(Recovery::none());
    let client = api.client("admin").await.unwrap();
    let watches = Watches::new(client, restarts, metrics.clone());
    let mut stream = Box::pin(watches.all::<Domain>(watches::config()));
    let within = Duration::from_secs(10);
    for expected in ["Init", "InitApply(a)", "InitDone"] {
        assert_eq!(next(&mut stream, within).await, expected);
    }
    // Keep polling in the background: the watch fails while the server is away.
    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(event) = stream.next().await {
            let _ = events_tx.send(event.map(|e| describe(&e)).map_err(|e| e.to_string()));
        }
    });
    let failures = 6;
    stop_until_failed(&api, &metrics, failures).await;
    let at_least = Policy::WATCH.delay(failures as u32) / 2;
    assert!(at_least >= Duration::from_secs(8));
    api.restart().await.unwrap();
    api.create("domains", domain("b")).unwrap();
    let back = Instant::now();
    recovered.send_replace(Recovery {
        epoch: 1,
        since: back - Duration::from_secs(5),
        outage: Duration::from_secs(5),
        hung: false,
    });
    let event = tokio::time::timeout(within, events.recv())
        .await
        .expect("an event")
        .expect("the stream runs");
    let took = back.elapsed();
    println!("resumed {took:?} after the recovery (its backoff had at least {at_least:?} left)");
    // Resumed from its resourceVersion: the change, no Init (no relist), no error.
    assert_eq!(event, Ok("Apply(b)".to_string()));
    assert!(took < at_least / 2, "resumed only after {took:?}");
    assert_eq!(counter(&metrics, "restarts"), 0);
}

#[tokio::test]
async fn a_watch_that_stalled_while_the_server_hung_is_restarted_with_a_relist() {
    let api = TestApi::start().await.unwrap();
    api.create_namespace("w").unwrap();
    api.create("domains", domain("a")).unwrap();
    let metrics = Metrics::register(&mut Registry::default(), None);
    let (recovered, restarts) = watch::channel(Recovery::none());
    let client = api.client("admin").await.unwrap();
    let watches = Watches::new(client, restarts, metrics.clone());
    let mut stream = Box::pin(watches.all::<Domain>(watches::config()));
    let within = Duration::from_secs(10);
    for expected in ["Init", "InitApply(a)", "InitDone"] {
        assert_eq!(next(&mut stream, within).await, expected);
    }
    let since = Instant::now();
    api.hang(true);
    tokio::time::sleep(Duration::from_millis(500)).await;
    recovered.send_replace(Recovery {
        epoch: 1,
        since,
        outage: Duration::from_millis(500),
        hung: true,
    });
    // A fresh watch begins (kube's watcher says Init before it lists), and its list waits
    // while the server still hangs.
    assert_eq!(next(&mut stream, within).await, "Init");
    let quiet = tokio::time::timeout(Duration::from_millis(500), stream.next()).await;
    assert!(quiet.is_err(), "nothing while hung");
    api.create("domains", domain("b")).unwrap();
    api.hang(false);
    let mut seen = Vec::new();
    while !seen.iter().any(|e| e == "InitDone") {
        seen.push(next(&mut stream, within).await);
    }
    assert_eq!(seen, ["InitApply(a)", "InitApply(b)", "InitDone"]);
    assert_eq!(counter(&metrics, "restarts"), 1);
    assert_eq!(counter(&metrics, "errors"), 0);
    // A watch that kept receiving during an outage is left alone.
    let since = Instant::now();
    api.create("domains", domain("c")).unwrap();
    assert_eq!(next(&mut stream, within).await, "Apply(c)");
    recovered.send_replace(Recovery {
        epoch: 2,
        since,
        outage: Duration::from_secs(1),
        hung: true,
    });
    api.create("domains", domain("d")).unwrap();
    assert_eq!(next(&mut stream, within).await, "Apply(d)");
    assert_eq!(counter(&metrics, "restarts"), 1);
}
