//! Watches, as the watch cache serves them (`storage/cacher/cacher.go`,
//! `cache_watcher.go`, `watch_cache.go`):
//! - no resourceVersion or `0`: synthetic `ADDED` events for the current objects, then
//!   changes; `resourceVersion=N`: the changes after N from the history;
//! - N older than the history: one `ERROR` event carrying a 410 `Expired` Status ("too old
//!   resource version: N (M)"), then the stream ends, so kube-runtime's watcher relists;
//! - selectors are applied to the object before and after each change: an object entering
//!   the selection is `ADDED`, leaving it is `DELETED` (the previous state, with the new
//!   resourceVersion);
//! - `allowWatchBookmarks=true`: periodic `BOOKMARK` events with the progress made;
//! - `sendInitialEvents=true` (a watch-list; `resourceVersionMatch=NotOlderThan` and bookmarks
//!   required, checked by the server): synthetic `ADDED` events for the current objects
//!   (whatever `resourceVersion` says: the store is always at least that new), then one
//!   `BOOKMARK` annotated `k8s.io/initial-events-end: "true"` carrying the version they
//!   reflect, then changes;
//! - `timeoutSeconds`: the server ends the stream after it; a watcher that falls too far
//!   behind is ended as well (the cacher drops slow watchers).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

use crate::reads::partial;
use crate::resources::ResourceType;
use crate::selector::Selector;
use crate::server::Shared;
use crate::status::ApiError;
use crate::store::{Change, ChangeType};

/// A watch request.
#[derive(Debug, Clone)]
pub struct WatchRequest {
    /// The type.
    pub rt: ResourceType,
    /// Namespace ("" for all).
    pub namespace: String,
    /// Selectors.
    pub selector: Selector,
    /// `resourceVersion`, if given.
    pub resource_version: Option<String>,
    /// `allowWatchBookmarks`.
    pub bookmarks: bool,
    /// `timeoutSeconds`, or the server's default.
    pub timeout: Duration,
    /// Only `PartialObjectMetadata`.
    pub metadata_only: bool,
    /// `sendInitialEvents=true`: the current objects, then the bookmark that ends them.
    pub send_initial_events: bool,
}

/// The annotation of the bookmark that ends a watch-list's initial events.
pub const INITIAL_EVENTS_END: &str = "k8s.io/initial-events-end";

fn line(kind: &str, object: &Value) -> Bytes {
    Bytes::from(format!("{}\n", json!({"type": kind, "object": object})))
}

/// What a change looks like to one watcher (`cacheWatcher.convertToWatchEvent`).
fn event_for(request: &WatchRequest, change: &Change) -> Option<(&'static str, Value)> {
    if change.key.group != request.rt.group || change.key.plural != request.rt.plural {
        return None;
    }
    if !request.namespace.is_empty() && change.key.namespace != request.namespace {
        return None;
    }
    let now_passes = change.kind != ChangeType::Deleted && request.selector.matches(&change.object);
    let before_passes = change
        .previous
        .as_ref()
        .is_some_and(|p| request.selector.matches(p));
    match (now_passes, before_passes) {
        (true, false) => Some(("ADDED", change.object.clone())),
        (true, true) => Some(("MODIFIED", change.object.clone())),
        (false, true) => {
            let mut old = if change.kind == ChangeType::Deleted {
                change.object.clone()
            } else {
                change.previous.clone().unwrap_or_default()
            };
            old["metadata"]["resourceVersion"] = json!(change.rv.to_string());
            Some(("DELETED", old))
        }
        (false, false) => None,
    }
}

/// Starts a watch; the returned receiver yields the stream's lines until it ends.
pub fn start(
    shared: Arc<Shared>,
    request: WatchRequest,
) -> Result<mpsc::Receiver<Bytes>, ApiError> {
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let render = {
        let metadata_only = request.metadata_only;
        move |object: &Value| {
            if metadata_only {
                partial(object)
            } else {
                object.clone()
            }
        }
    };
    // Read the starting state and subscribe under one lock: nothing is missed or doubled.
    let (initial, live, start_rv) = {
        let store = shared.lock_store();
        let from = request
            .resource_version
            .as_deref()
            .filter(|rv| !rv.is_empty() && *rv != "0" && !request.send_initial_events);
        match from {
            None => {
                let mut items: Vec<Bytes> = store
                    .objects
                    .iter()
                    .filter(|(k, _)| {
                        k.group == request.rt.group
                            && k.plural == request.rt.plural
                            && (request.namespace.is_empty() || k.namespace == request.namespace)
                    })
                    .filter(|(_, o)| request.selector.matches(o))
                    .map(|(_, o)| line("ADDED", &render(o)))
                    .collect();
                if request.send_initial_events {
                    let mark = json!({"kind": request.rt.kind, "apiVersion": request.rt.api_version(),
                                      "metadata": {"resourceVersion": store.rv.to_string(),
                                                   "annotations": {INITIAL_EVENTS_END: "true"}}});
                    items.push(line("BOOKMARK", &mark));
                }
                (items, Ok(store.subscribe()), store.rv)
            }
            Some(text) => {
                let rv: u64 = text.parse().map_err(|_| {
                    ApiError::bad_request(format!("invalid resource version: {text}"))
                })?;
                match store.since(rv) {
                    Ok((backlog, receiver)) => {
                        let items = backlog
                            .iter()
                            .filter_map(|c| event_for(&request, c))
                            .map(|(t, o)| line(t, &render(&o)))
                            .collect();
                        (items, Ok(receiver), store.rv.max(rv))
                    }
                    Err(oldest) => {
                        let status =
                            ApiError::expired(format!("too old resource version: {rv} ({oldest})"))
                                .to_status();
                        (vec![line("ERROR", &status)], Err(()), store.rv)
                    }
                }
            }
        }
    };
    tokio::spawn(async move {
        for item in initial {
            shared.faults.wait_while_hung().await;
            if tx.send(item).await.is_err() {
                return;
            }
        }
        let Ok(mut live) = live else { return };
        let deadline = tokio::time::sleep(request.timeout);
        tokio::pin!(deadline);
        let interval = shared.config.bookmark_interval;
        let mut bookmarks =
            tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        let mut progress = start_rv;
        loop {
            tokio::select! {
                _ = &mut deadline => return,
                _ = tx.closed() => return,
                _ = bookmarks.tick(), if request.bookmarks => {
                    shared.faults.wait_while_hung().await;
                    let mark = json!({"kind": request.rt.kind, "apiVersion": request.rt.api_version(),
                                      "metadata": {"resourceVersion": progress.to_string()}});
                    if tx.send(line("BOOKMARK", &mark)).await.is_err() {
                        return;
                    }
                }
                change = live.recv() => match change {
                    Ok(change) => {
                        if change.rv <= progress {
                            continue;
                        }
                        progress = change.rv;
                        if let Some((kind, object)) = event_for(&request, &change) {
                            shared.faults.wait_while_hung().await;
                            if tx.send(line(kind, &render(&object))).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) | Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        }
    });
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::selector::LabelSelector;
    use crate::store::Key;

    fn request(selector: &str) -> WatchRequest {
        WatchRequest {
            rt: crate::resources::Registry::new(true)
                .by_plural("domains")
                .cloned()
                .unwrap(),
            namespace: String::new(),
            selector: Selector {
                labels: LabelSelector::parse(selector).unwrap(),
                ..Selector::default()
            },
            resource_version: None,
            bookmarks: false,
            timeout: Duration::from_secs(1),
            metadata_only: false,
            send_initial_events: false,
        }
    }

    fn change(before: Option<&str>, after: &str) -> Change {
        let obj = |tier: &str| json!({"metadata": {"name": "a", "labels": {"tier": tier}, "resourceVersion": "1"}});
        Change {
            rv: 7,
            kind: if before.is_some() {
                ChangeType::Modified
            } else {
                ChangeType::Added
            },
            key: Key {
                group: "virtkube.io".into(),
                plural: "domains".into(),
                namespace: "n".into(),
                name: "a".into(),
            },
            object: obj(after),
            previous: before.map(obj),
        }
    }

    #[test]
    fn leaving_the_selection_is_a_deletion_with_the_new_resource_version() {
        let r = request("tier=front");
        let (kind, obj) = event_for(&r, &change(Some("front"), "back")).unwrap();
        assert_eq!(kind, "DELETED");
        assert_eq!(obj["metadata"]["labels"]["tier"], "front");
        assert_eq!(obj["metadata"]["resourceVersion"], "7");
        assert_eq!(
            event_for(&r, &change(Some("back"), "front")).unwrap().0,
            "ADDED"
        );
        assert_eq!(
            event_for(&r, &change(Some("front"), "front")).unwrap().0,
            "MODIFIED"
        );
        assert!(event_for(&r, &change(Some("back"), "back")).is_none());
    }
}
