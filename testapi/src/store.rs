//! The object store: every object by (group, resource, namespace, name), one global
//! resourceVersion counter (etcd's revision), and a bounded history of changes that watches
//! replay from. History older than the window, or compacted on demand, is gone: a watch from
//! before it gets 410 Expired, as from the watch cache (`cacher/watch_cache.go`).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::schema::Checker;

/// Where an object lives.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    /// API group ("" for core).
    pub group: String,
    /// Resource (plural).
    pub plural: String,
    /// Namespace ("" for cluster-scoped).
    pub namespace: String,
    /// Name.
    pub name: String,
}

/// `ADDED`, `MODIFIED` or `DELETED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeType {
    /// Created.
    Added,
    /// Changed.
    Modified,
    /// Gone.
    Deleted,
}

impl ChangeType {
    /// The watch event type.
    pub fn as_str(&self) -> &'static str {
        match self {
            ChangeType::Added => "ADDED",
            ChangeType::Modified => "MODIFIED",
            ChangeType::Deleted => "DELETED",
        }
    }
}

/// One committed change.
#[derive(Debug, Clone)]
pub struct Change {
    /// Its resourceVersion.
    pub rv: u64,
    /// What happened.
    pub kind: ChangeType,
    /// Which object.
    pub key: Key,
    /// The object after the change (for a deletion: as it was, with the deletion's RV).
    pub object: Value,
    /// The object before the change, if any (watch filters compare both).
    pub previous: Option<Value>,
}

/// How many changes the history keeps by default.
pub const DEFAULT_HISTORY: usize = 10_000;

/// The store's state, behind one lock: every write checks its preconditions and commits
/// under it, as etcd's transactions do.
pub struct Store {
    /// Objects.
    pub objects: BTreeMap<Key, Value>,
    /// The last resourceVersion handed out.
    pub rv: u64,
    history: VecDeque<Arc<Change>>,
    window: usize,
    /// Every change at or below this RV is no longer in the history.
    dropped_through: u64,
    tx: broadcast::Sender<Arc<Change>>,
    uids: u64,
    /// Schema and CEL checks, with compiled patterns cached.
    pub checker: Checker,
    /// The ValidatingAdmissionPolicies every write by a client goes through.
    pub admission: std::sync::Arc<crate::admission::Policies>,
    /// Every write they denied: (user, `resource[/subresource] namespace/name`, message).
    pub admission_denials: Vec<(String, String, String)>,
}

impl Store {
    /// An empty store keeping `window` changes of history.
    pub fn new(window: usize) -> Self {
        let (tx, _) = broadcast::channel(65_536);
        Store {
            objects: BTreeMap::new(),
            rv: 0,
            history: VecDeque::new(),
            window: window.max(1),
            dropped_through: 0,
            tx,
            uids: 0,
            checker: Checker::default(),
            admission: Default::default(),
            admission_denials: Vec::new(),
        }
    }

    /// A fresh UID (RFC 4122 layout; unique within the process).
    pub fn next_uid(&mut self) -> String {
        self.uids += 1;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default();
        let a = nanos ^ (u64::from(std::process::id()) << 32);
        format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            (a >> 32) as u32,
            (a >> 16) as u16,
            (a & 0xfff) as u16,
            (self.uids >> 48) as u16 & 0xfff,
            self.uids & 0xffff_ffff_ffff
        )
    }

    /// Stores `object` at `key` (or removes it when `object` is `None`), with the next
    /// resourceVersion, records the change and tells the watchers. Returns the stored (or
    /// last) object.
    pub fn commit(&mut self, key: Key, object: Option<Value>) -> Value {
        self.rv += 1;
        let rv = self.rv;
        let previous = self.objects.get(&key).cloned();
        let (kind, mut stored) = match (object, &previous) {
            (Some(o), None) => (ChangeType::Added, o),
            (Some(o), Some(_)) => (ChangeType::Modified, o),
            (None, Some(p)) => (ChangeType::Deleted, p.clone()),
            (None, None) => return Value::Null,
        };
        if let Some(meta) = stored.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("resourceVersion".into(), json!(rv.to_string()));
        }
        if kind == ChangeType::Deleted {
            self.objects.remove(&key);
        } else {
            self.objects.insert(key.clone(), stored.clone());
        }
        let change = Arc::new(Change {
            rv,
            kind,
            key,
            object: stored.clone(),
            previous,
        });
        self.history.push_back(change.clone());
        while self.history.len() > self.window {
            if let Some(old) = self.history.pop_front() {
                self.dropped_through = old.rv;
            }
        }
        let _ = self.tx.send(change);
        stored
    }

    /// Drops every change from the history, as an etcd compaction followed by a watch-cache
    /// restart would: any watch from an older resourceVersion now gets 410.
    pub fn compact(&mut self) {
        self.history.clear();
        self.dropped_through = self.rv;
    }

    /// The changes after `rv`, and a receiver for the live ones after them; `Err` with the
    /// oldest servable RV when `rv` is older than the history.
    #[allow(clippy::type_complexity)]
    pub fn since(
        &self,
        rv: u64,
    ) -> Result<(Vec<Arc<Change>>, broadcast::Receiver<Arc<Change>>), u64> {
        if rv < self.dropped_through {
            return Err(self.dropped_through);
        }
        let backlog = self.history.iter().filter(|c| c.rv > rv).cloned().collect();
        Ok((backlog, self.tx.subscribe()))
    }

    /// A receiver for the live changes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        self.tx.subscribe()
    }
}
