//! What every reconciler shares: the API client, the node's engine, the event recorder,
//! metrics and settings.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::events::{Event, EventType, Recorder, Reporter};
use futures::channel::mpsc::UnboundedSender;
use kube::Client;
use kube::runtime::reflector::{ObjectRef, Store};
use virtkube_crds::{Domain, Volume};
use virtkube_engine::Engine;

use super::error::Error;
use crate::event_queue::{self, EventQueue};
use crate::host::Hosts;

use super::metrics::Metrics;

/// The field manager of every status write by an agent. Per-node entries of pools and
/// networks use [`Settings::node_field_manager`] instead (see there why).
pub const FIELD_MANAGER: &str = "virtkube-agent";

/// The finalizer on domains and volumes (one node each): the libvirt object is removed
/// before the resource goes away.
pub const FINALIZER: &str = "virtkube.io/cleanup";

/// The `reportingController` of the agent's events.
pub const REPORTER: &str = "virtkube-agent";

/// Knobs of one agent.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This node's name (the `HypervisorNode` name and what `spec.nodeName` is compared with).
    pub node: String,
    /// How often a converged object is looked at again (the safety net behind libvirt events).
    pub resync: Duration,
    /// How long a deleted domain's guest gets to shut down (ACPI) before it is destroyed.
    pub shutdown_timeout: Duration,
    /// Whether disks may name host paths (an administrator's choice).
    pub allow_host_paths: bool,
    /// The host's CPU count (the planner checks pinning against it); `None` when unknown.
    pub host_cpus: Option<u32>,
    /// The host's online CPUs as a cpuset (`0-7`): a vCPU whose pin was removed floats over
    /// them again; `None` when unknown (a removed pin is then left as it is).
    pub online_cpus: Option<String>,
    /// The libvirt URI other agents open to reach this node (published on the
    /// HypervisorNode; needed to migrate domains here).
    pub client_uri: Option<String>,
    /// The URI a source libvirtd uses to reach this node in a peer-to-peer migration.
    pub peer_uri: Option<String>,
    /// The migration data URI of this node (`tcp://ADDRESS`).
    pub migration_uri: Option<String>,
    /// Encrypt migrations from this node with TLS (`VIR_MIGRATE_TLS`).
    pub migration_tls: bool,
    /// When a live migration from this node is aborted (the guest stays here).
    pub migration_limits: super::moves::Limits,
}

impl Settings {
    /// Settings for `node` with defaults suited to tests.
    pub fn for_node(node: &str) -> Self {
        Self {
            node: node.to_string(),
            resync: Duration::from_secs(300),
            shutdown_timeout: Duration::from_secs(30),
            allow_host_paths: false,
            host_cpus: None,
            online_cpus: None,
            client_uri: None,
            peer_uri: None,
            migration_uri: None,
            migration_tls: false,
            migration_limits: super::moves::Limits::default(),
        }
    }

    /// The field manager for this node's entry in a pool's or network's `status.nodes`.
    /// Server-side apply removes fields a manager owned and no longer sends: if every agent
    /// used one manager, each would delete the other nodes' entries. One manager per node
    /// makes each agent own only its entry.
    pub fn node_field_manager(&self) -> String {
        let mut manager = format!("{FIELD_MANAGER}.{}", self.node);
        // The API server refuses managers over 128 characters.
        manager.truncate(128);
        manager
    }

    /// The finalizer of this node on pools and networks (which exist on many nodes: each
    /// node must remove its own libvirt object before the resource goes away).
    pub fn node_finalizer(&self) -> String {
        // The name part of a qualified name is at most 63 characters of [-A-Za-z0-9_.],
        // which a node name (a DNS subdomain) satisfies except for its length.
        let mut name = self.node.clone();
        if name.len() > 63 {
            let hash = fnv1a(&self.node);
            name.truncate(46);
            name = format!("{name}-{hash:016x}");
        }
        format!("node.virtkube.io/{name}")
    }
}

/// A small stable hash for shortening long node names (FNV-1a, 64 bits).
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Everything a reconcile needs.
pub struct Context {
    /// The Kubernetes client.
    pub client: Client,
    /// This node's libvirt.
    pub engine: Engine,
    /// The same node as the planner's executor sees it (one host, this node).
    pub hosts: Hosts,
    /// Publishes events (and aggregates repeats into series).
    pub recorder: Recorder,
    /// When set, events go through this queue instead of being published by the reconcile
    /// itself ([`Context::queue_events`]).
    pub event_queue: Option<EventQueue>,
    /// The agent's metrics.
    pub metrics: Arc<Metrics>,
    /// Knobs.
    pub settings: Settings,
    /// This node's `HypervisorNode` labels, which pool and network node selectors match;
    /// `None` until they have been read (see [`Context::labels`]).
    pub node_labels: RwLock<Option<BTreeMap<String, String>>>,
    /// Volumes as last seen (domains resolve their disks through it); `None` in tests that
    /// have no reflector, where volumes are read from the API.
    pub volumes: Option<Store<Volume>>,
    /// Domains as last seen (a network is not removed while a domain here uses it); `None`
    /// in tests without a reflector.
    pub domains: Option<Store<Domain>>,
    /// The live migrations this node runs as the source.
    pub migrations: super::moves::Migrations,
    /// Asks the Domain controller for a reconcile (a migration task that ended); `None` in
    /// tests without a controller.
    pub requeue: Option<UnboundedSender<ObjectRef<Domain>>>,
    /// What the agent expects back from its own writes and libvirt calls (shared with the
    /// Domain watch and the libvirt event forwarder, which skip those echoes).
    pub echoes: Arc<super::echoes::Echoes>,
}

impl Context {
    /// A context for `client`, the connected `hosts` (which must hold this node) and
    /// `settings`.
    pub fn new(
        client: Client,
        hosts: Hosts,
        metrics: Arc<Metrics>,
        settings: Settings,
    ) -> Result<Self, Error> {
        let engine = hosts
            .get(&settings.node)
            .map_err(|e| Error::Unrealizable {
                reason: "NodeNotConnected",
                message: e.to_string(),
            })?
            .engine
            .clone();
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: REPORTER.into(),
                instance: Some(format!("{REPORTER}-{}", settings.node)),
            },
        );
        Ok(Self {
            client,
            engine,
            hosts,
            recorder,
            event_queue: None,
            metrics,
            settings,
            node_labels: RwLock::new(None),
            volumes: None,
            domains: None,
            migrations: super::moves::Migrations::default(),
            requeue: None,
            echoes: Arc::default(),
        })
    }

    /// Sends events from now on through a bounded queue that background tasks publish
    /// (spawned on the current runtime), so no reconcile waits on an event's round trip;
    /// without it (tests that script the API server's calls in order), each event is
    /// published before [`Context::event`] returns.
    pub fn queue_events(&mut self) {
        self.event_queue = Some(EventQueue::spawn(
            self.recorder.clone(),
            event_queue::CAPACITY,
            event_queue::LANES,
            self.metrics.events.clone(),
        ));
    }

    /// This node's labels; `None` until they have been read from its `HypervisorNode`. Not
    /// knowing them is never the same as having none: an agent that has not read them cannot
    /// tell whether a `nodeSelector` still selects its node, so it removes nothing on that
    /// ground (see [`selection`]).
    pub fn labels(&self) -> Option<BTreeMap<String, String>> {
        self.node_labels.read().ok().and_then(|l| l.clone())
    }

    /// Records the labels just read from the node's `HypervisorNode`; returns whether they
    /// changed (the first read always does).
    pub fn set_labels(&self, labels: BTreeMap<String, String>) -> bool {
        self.node_labels
            .write()
            .map(|mut l| {
                let changed = l.as_ref() != Some(&labels);
                *l = Some(labels);
                changed
            })
            .unwrap_or(false)
    }

    /// Publishes an event about `obj`, or hands it to the event queue when there is one
    /// (then it returns at once). A failure to publish is logged, never fatal: events are a
    /// courtesy, the status is the record.
    pub async fn event<K>(&self, obj: &K, warning: bool, reason: &str, action: &str, note: String)
    where
        K: kube::Resource<DynamicType = ()>,
    {
        let mut note = note;
        // The API server refuses notes over 1 kB.
        if note.len() > 1000 {
            let mut end = 1000;
            while !note.is_char_boundary(end) {
                end -= 1;
            }
            note.truncate(end);
        }
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        let regarding = obj.object_ref(&());
        if let Some(queue) = &self.event_queue {
            queue.send(event, regarding);
        } else if let Err(e) = self.recorder.publish(&event, &regarding).await {
            tracing::warn!(error = %e, reason, "publishing an event failed");
        }
    }
}

/// Whether `selector` (a pool's or network's `nodeSelector`) selects a node with `labels`.
/// An empty selector selects every node.
pub fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Whether `selector` selects a node whose labels are `labels`, when that can be told: an
/// empty selector selects every node, known or not; any other needs the labels (`None`
/// while they are unknown).
pub fn selection(
    selector: &BTreeMap<String, String>,
    labels: Option<&BTreeMap<String, String>>,
) -> Option<bool> {
    if selector.is_empty() {
        return Some(true);
    }
    labels.map(|l| selects(selector, l))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_finalizer_and_manager_stay_within_api_limits() {
        let s = Settings::for_node("node-a");
        assert_eq!(s.node_finalizer(), "node.virtkube.io/node-a");
        assert_eq!(s.node_field_manager(), "virtkube-agent.node-a");
        let long = Settings::for_node(&"n".repeat(200));
        let fin = long.node_finalizer();
        let name = fin.split_once('/').map(|(_, n)| n).unwrap_or_default();
        assert!(name.len() <= 63, "{name}");
        assert_ne!(
            fin,
            Settings::for_node(&format!("{}x", "n".repeat(199))).node_finalizer()
        );
        assert!(long.node_field_manager().len() <= 128);
    }

    #[test]
    fn unknown_labels_select_only_with_an_empty_selector() {
        let zone = BTreeMap::from([("zone".to_string(), "a".to_string())]);
        assert_eq!(selection(&BTreeMap::new(), None), Some(true));
        assert_eq!(selection(&zone, None), None);
        assert_eq!(selection(&zone, Some(&zone)), Some(true));
        assert_eq!(selection(&zone, Some(&BTreeMap::new())), Some(false));
    }

    #[test]
    fn empty_selector_selects_every_node() {
        let labels = BTreeMap::from([("zone".to_string(), "a".to_string())]);
        assert!(selects(&BTreeMap::new(), &labels));
        assert!(selects(&labels.clone(), &labels));
        let other = BTreeMap::from([("zone".to_string(), "b".to_string())]);
        assert!(!selects(&other, &labels));
    }
}
