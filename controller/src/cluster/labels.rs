//! The per-node labels that route Domains and Volumes to the agents that must see them
//! (each agent watches only objects carrying its own `node.virtkube.io/<node>` key). Pure.
//!
//! - Domain: its holder's key (`holder`) and, while a move is under way, the target's key
//!   (`target`).
//! - Volume: its holder's key (`holder`) and `user` for every other node holding (or
//!   receiving in a move) a Domain that uses it, directly or through a volume cloned from it
//!   or layered on it, and for the holders of such derived volumes.
//!
//! Every other `node.virtkube.io/*` key is removed. The labels only route: agents decide
//! from the claim in status, never from a label's value.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};
use virtkube_crds::Domain;

use crate::placement::write::{HOLDER, NODE_LABEL_PREFIX, TARGET, facts_of, node_label};

/// The value of a volume's label for a node that uses it without holding it.
pub const USER: &str = "user";

/// The node labels `dom` should carry.
pub fn domain_labels(dom: &Domain) -> BTreeMap<String, String> {
    let facts = facts_of(dom);
    let mut labels = BTreeMap::new();
    if let Some(m) = facts.claim.active_move() {
        labels.insert(node_label(&m.target), TARGET.to_string());
    }
    if let Some(holder) = &facts.claim.holder {
        labels.insert(node_label(holder), HOLDER.to_string());
    }
    labels
}

/// The node labels a volume held by `holder` and used on `users` should carry.
pub fn volume_labels(holder: Option<&str>, users: &BTreeSet<String>) -> BTreeMap<String, String> {
    let mut labels: BTreeMap<String, String> = users
        .iter()
        .map(|n| (node_label(n), USER.to_string()))
        .collect();
    if let Some(holder) = holder {
        labels.insert(node_label(holder), HOLDER.to_string());
    }
    labels
}

/// The merge patch that turns the node labels among `current` into `desired` (other labels
/// untouched), or `None` when they already match.
pub fn label_patch(
    current: &BTreeMap<String, String>,
    desired: &BTreeMap<String, String>,
) -> Option<Value> {
    let mut changes = Map::new();
    for key in current.keys() {
        if key.starts_with(NODE_LABEL_PREFIX) && !desired.contains_key(key) {
            changes.insert(key.clone(), Value::Null);
        }
    }
    for (key, value) in desired {
        if current.get(key) != Some(value) {
            changes.insert(key.clone(), Value::String(value.clone()));
        }
    }
    (!changes.is_empty()).then(|| json!({"metadata": {"labels": changes}}))
}
