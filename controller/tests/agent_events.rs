//! The event queue of the agent and the controller (`event_queue`) against the in-memory API server: events
//! leave the reconcile without waiting, the events of one object keep their order and their
//! aggregation into series, a full queue drops and counts, and a refused event is counted.

use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use virtkube::event_queue::{EventQueue, QueueMetrics};
use virtkube::events::{Event, EventType, Recorder, Reporter};
use virtkube_testapi::{Answer, TestApi};

const NS: &str = "events";

fn regarding(name: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("virtkube.io/v1alpha1".into()),
        kind: Some("Domain".into()),
        namespace: Some(NS.into()),
        name: Some(name.into()),
        uid: Some(format!("uid-{name}")),
        ..ObjectReference::default()
    }
}

fn event(reason: &str) -> Event {
    Event {
        type_: EventType::Normal,
        reason: reason.into(),
        note: Some(format!("{reason} note")),
        action: reason.into(),
        secondary: None,
    }
}

async fn server() -> (TestApi, Recorder) {
    let api = TestApi::start().await.unwrap();
    api.create_namespace(NS).unwrap();
    let client = api.client("agent").await.unwrap();
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: "virtkube-agent".into(),
            instance: Some("virtkube-agent-test".into()),
        },
    );
    (api, recorder)
}

/// (regarding name, reason, series count) of every stored event, in creation order.
fn stored(api: &TestApi) -> Vec<(String, String, u64)> {
    let mut events = api.events();
    events.sort_by_key(|e| {
        e["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|rv| rv.parse::<u64>().ok())
            .unwrap_or(0)
    });
    events
        .iter()
        .map(|e| {
            (
                e["regarding"]["name"].as_str().unwrap_or_default().into(),
                e["reason"].as_str().unwrap_or_default().into(),
                e["series"]["count"].as_u64().unwrap_or(1),
            )
        })
        .collect()
}

#[tokio::test]
async fn events_keep_their_order_per_object_and_their_aggregation() {
    let (api, recorder) = server().await;
    let metrics = QueueMetrics::default();
    let queue = EventQueue::spawn(recorder, 100, 4, metrics.clone());
    for name in ["a", "b", "c"] {
        queue.send(event("Defined"), regarding(name));
        queue.send(event("Started"), regarding(name));
    }
    // The same event again: the Recorder folds it into a series on the first one.
    queue.send(event("Started"), regarding("b"));
    queue.flush().await;
    let seen = stored(&api);
    for name in ["a", "b", "c"] {
        let of: Vec<(String, u64)> = seen
            .iter()
            .filter(|(n, ..)| n == name)
            .map(|(_, reason, count)| (reason.clone(), *count))
            .collect();
        let started = if name == "b" { 2 } else { 1 };
        assert_eq!(
            of,
            vec![("Defined".into(), 1), ("Started".into(), started)],
            "{name}: {seen:?}"
        );
    }
    assert_eq!(metrics.dropped.get(), 0);
    assert_eq!(metrics.failed.get(), 0);
}

#[tokio::test]
async fn a_full_queue_drops_and_counts_instead_of_waiting() {
    let (api, recorder) = server().await;
    let metrics = QueueMetrics::default();
    // One lane of 4: while the server does not answer, the lane's task holds one event in
    // flight (or none yet) and 4 wait; the rest are dropped.
    let queue = EventQueue::spawn(recorder, 4, 1, metrics.clone());
    api.hang(true);
    tokio::time::timeout(Duration::from_secs(5), async {
        for i in 0..10 {
            queue.send(event(&format!("Reason{i}")), regarding("a"));
            // Let the lane's task take the first one.
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("sending never waits for the API server");
    let dropped = metrics.dropped.get();
    assert!((5..=6).contains(&dropped), "dropped {dropped}");
    api.hang(false);
    tokio::time::timeout(Duration::from_secs(30), queue.flush())
        .await
        .expect("the queue drains once the server answers");
    assert_eq!(
        stored(&api).len() as u64,
        10 - dropped,
        "{:?}",
        stored(&api)
    );
}

#[tokio::test]
async fn a_refused_event_is_counted_and_the_next_ones_go_out() {
    let (api, recorder) = server().await;
    let metrics = QueueMetrics::default();
    let queue = EventQueue::spawn(recorder, 10, 1, metrics.clone());
    api.inject(1, Answer::InternalError, |r| r.resource == "events");
    queue.send(event("Defined"), regarding("a"));
    queue.send(event("Started"), regarding("a"));
    queue.flush().await;
    assert_eq!(metrics.failed.get(), 1);
    let reasons: Vec<String> = stored(&api).into_iter().map(|(_, r, _)| r).collect();
    assert_eq!(reasons, vec!["Started".to_string()]);
}
