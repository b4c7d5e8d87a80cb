//! Publishing Kubernetes Events (`events.k8s.io/v1`), with a repeat of the same event folded
//! into its series (a patch of the first one's `series.count`) as kube-runtime's `Recorder`
//! does, but remembering only what a repeat needs.
//!
//! kube-runtime's `Recorder` keeps, for six minutes after each event, a key and the whole
//! Event it sent (two object references, the note, the reporter's names): with 1,000 Domains
//! created, the agent held 5.9 MB of them at its peak (heaptrack, the scale bench), more
//! than its cache of the Domains themselves. It also scans all of them on every publish.
//! This recorder keeps a small record per key (the event's name and namespace, its count and
//! last time), forgets records past the same six minutes at most every [`FORGET_EVERY`],
//! and publishes the same Events (same names, reasons, notes, series).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event as K8sEvent, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
pub use kube::runtime::events::{Event, EventType, Reporter};
use serde_json::json;

/// How long after its last occurrence an event's repeat still joins its series (kube-runtime's
/// and client-go's six minutes).
pub const SERIES_FOR: Duration = Duration::from_secs(6 * 60);

/// The least time between two sweeps of expired records.
pub const FORGET_EVERY: Duration = Duration::from_secs(30);

/// What makes two events the same (kube-runtime's key: the note is not part of it).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    /// The object's UID, or `kind/namespace/name` when it has none.
    regarding: String,
    reason: String,
    action: String,
    warning: bool,
}

/// What a repeat needs of the event already published.
#[derive(Debug, Clone)]
struct Published {
    name: String,
    namespace: String,
    count: i32,
    last: Instant,
}

/// What to send for an event.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Publish {
    /// A new Event object.
    Create,
    /// A patch of the series of the Event `name` in `namespace`, now seen `count` times.
    Repeat {
        name: String,
        namespace: String,
        count: i32,
    },
}

/// The records of published events.
#[derive(Debug)]
struct Seen {
    by_key: HashMap<Key, Published>,
    swept: Instant,
}

impl Seen {
    fn new(now: Instant) -> Self {
        Self {
            by_key: HashMap::new(),
            swept: now,
        }
    }

    /// What to send for `key` at `now` (pure); forgets expired records at most every
    /// [`FORGET_EVERY`].
    fn decide(&mut self, key: &Key, now: Instant) -> Publish {
        if now.duration_since(self.swept) >= FORGET_EVERY {
            self.by_key
                .retain(|_, p| now.duration_since(p.last) < SERIES_FOR);
            self.by_key.shrink_to_fit();
            self.swept = now;
        }
        match self.by_key.get(key) {
            Some(p) if now.duration_since(p.last) < SERIES_FOR => Publish::Repeat {
                name: p.name.clone(),
                namespace: p.namespace.clone(),
                count: p.count.saturating_add(1),
            },
            _ => Publish::Create,
        }
    }

    /// Records that the event `key` was sent at `now` as `name` in `namespace`, `count`
    /// times so far.
    fn record(&mut self, key: Key, name: String, namespace: String, count: i32, now: Instant) {
        self.by_key.insert(
            key,
            Published {
                name,
                namespace,
                count,
                last: now,
            },
        );
    }

    fn forget(&mut self, key: &Key) {
        self.by_key.remove(key);
    }
}

/// Publishes Events for one reporter (a controller and its instance). Clones share their
/// records, so a series is folded the same whichever clone publishes its repeats.
#[derive(Clone)]
pub struct Recorder {
    client: Client,
    reporter: Reporter,
    seen: Arc<Mutex<Seen>>,
}

impl Recorder {
    /// A recorder publishing through `client` as `reporter`.
    pub fn new(client: Client, reporter: Reporter) -> Self {
        Self {
            client,
            reporter,
            seen: Arc::new(Mutex::new(Seen::new(Instant::now()))),
        }
    }

    /// Records held (for tests and diagnostics).
    pub fn held(&self) -> usize {
        self.lock().by_key.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Seen> {
        // A panic while the records were held leaves records that are still meaningful.
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes `ev` about the object `regarding`: a new Event, or, when the same event
    /// (reason, action, type, object) was published less than [`SERIES_FOR`] ago, a patch
    /// of that Event's series. The Event lives in the object's namespace (`default` for
    /// cluster-scoped objects).
    ///
    /// # Errors
    /// The API server's refusal (the caller logs it: events are a courtesy).
    pub async fn publish(
        &self,
        ev: &Event,
        regarding: &ObjectReference,
    ) -> Result<(), kube::Error> {
        let key = Key {
            regarding: regarding.uid.clone().unwrap_or_else(|| {
                format!(
                    "{}/{}/{}",
                    regarding.kind.as_deref().unwrap_or_default(),
                    regarding.namespace.as_deref().unwrap_or_default(),
                    regarding.name.as_deref().unwrap_or_default()
                )
            }),
            reason: ev.reason.clone(),
            action: ev.action.clone(),
            warning: ev.type_ == EventType::Warning,
        };
        let send = self.lock().decide(&key, Instant::now());
        let now = Timestamp::now();
        match send {
            Publish::Repeat {
                name,
                namespace,
                count,
            } => {
                let series = EventSeries {
                    count,
                    last_observed_time: MicroTime(now),
                };
                let patch = json!({ "series": series });
                let events: Api<K8sEvent> = Api::namespaced(self.client.clone(), &namespace);
                match events
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    Ok(_) => {
                        self.lock()
                            .record(key, name, namespace, count, Instant::now());
                        Ok(())
                    }
                    Err(e) => {
                        // Gone (expired on the server) or refused: the next repeat starts a
                        // new Event rather than failing the same way.
                        self.lock().forget(&key);
                        Err(e)
                    }
                }
            }
            Publish::Create => {
                let event = self.event(ev, regarding, now);
                let namespace = event.metadata.namespace.clone().unwrap_or_default();
                let name = event.metadata.name.clone().unwrap_or_default();
                let events: Api<K8sEvent> = Api::namespaced(self.client.clone(), &namespace);
                events.create(&PostParams::default(), &event).await?;
                self.lock().record(key, name, namespace, 1, Instant::now());
                Ok(())
            }
        }
    }

    /// The Event object for `ev` about `regarding` at `now` (kube-runtime's naming:
    /// `<object name>.<nanoseconds in hex>`).
    fn event(&self, ev: &Event, regarding: &ObjectReference, now: Timestamp) -> K8sEvent {
        let controller = &self.reporter.controller;
        K8sEvent {
            action: Some(ev.action.clone()),
            reason: Some(ev.reason.clone()),
            event_time: Some(MicroTime(now)),
            regarding: Some(regarding.clone()),
            note: ev.note.clone(),
            metadata: ObjectMeta {
                namespace: Some(
                    regarding
                        .namespace
                        .clone()
                        .unwrap_or_else(|| "default".into()),
                ),
                name: Some(format!(
                    "{}.{:x}",
                    regarding.name.as_ref().unwrap_or(controller),
                    now.as_nanosecond()
                )),
                ..ObjectMeta::default()
            },
            reporting_controller: Some(controller.clone()),
            reporting_instance: Some(
                self.reporter
                    .instance
                    .clone()
                    .unwrap_or_else(|| controller.clone()),
            ),
            type_: Some(
                match ev.type_ {
                    EventType::Normal => "Normal",
                    EventType::Warning => "Warning",
                }
                .into(),
            ),
            related: ev.secondary.clone(),
            ..K8sEvent::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(uid: &str, reason: &str) -> Key {
        Key {
            regarding: uid.into(),
            reason: reason.into(),
            action: "Converge".into(),
            warning: false,
        }
    }

    #[test]
    fn a_repeat_within_six_minutes_joins_the_series_later_it_starts_a_new_event() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut seen = Seen::new(t0);
        let started = key("uid-1", "Started");
        assert_eq!(seen.decide(&started, t0), Publish::Create);
        seen.record(started.clone(), "vm.1".into(), "ns".into(), 1, t0);
        // The same again: the first Event's series, counted.
        let repeat = Publish::Repeat {
            name: "vm.1".into(),
            namespace: "ns".into(),
            count: 2,
        };
        assert_eq!(seen.decide(&started, at(60)), repeat);
        seen.record(started.clone(), "vm.1".into(), "ns".into(), 2, at(60));
        // Another reason, another object: events of their own.
        assert_eq!(
            seen.decide(&key("uid-1", "Defined"), at(61)),
            Publish::Create
        );
        assert_eq!(
            seen.decide(&key("uid-2", "Started"), at(61)),
            Publish::Create
        );
        // Six minutes after its last occurrence the series is over.
        assert_eq!(
            seen.decide(&started, at(60) + SERIES_FOR),
            Publish::Create,
            "expired"
        );
    }

    #[test]
    fn records_are_forgotten_six_minutes_after_their_last_occurrence() {
        let t0 = Instant::now();
        let mut seen = Seen::new(t0);
        for i in 0..1000 {
            seen.record(
                key(&format!("uid-{i}"), "Started"),
                format!("vm{i}.1"),
                "ns".into(),
                1,
                t0,
            );
        }
        let kept = key("uid-kept", "Started");
        seen.record(
            kept.clone(),
            "kept.1".into(),
            "ns".into(),
            1,
            t0 + SERIES_FOR / 2,
        );
        assert_eq!(seen.by_key.len(), 1001);
        // Not yet swept: the sweep waits for FORGET_EVERY.
        seen.decide(&kept, t0 + FORGET_EVERY / 2);
        assert_eq!(seen.by_key.len(), 1001);
        // Swept once the records are past SERIES_FOR; the newer one stays.
        seen.decide(&kept, t0 + SERIES_FOR);
        assert_eq!(seen.by_key.len(), 1);
        assert!(seen.by_key.contains_key(&kept));
    }

    #[test]
    fn a_failed_patch_forgets_the_series() {
        let t0 = Instant::now();
        let mut seen = Seen::new(t0);
        let k = key("uid-1", "Started");
        seen.record(k.clone(), "vm.1".into(), "ns".into(), 1, t0);
        seen.forget(&k);
        assert_eq!(seen.decide(&k, t0), Publish::Create);
    }
}
