//! Field ownership: server-side apply (merge, prune, conflicts, force) and the ownership every
//! other write records, kept in `metadata.managedFields` as the real server keeps it.
//!
//! Follows sigs.k8s.io/structured-merge-diff `merge/update.go`:
//! - `Apply`: the applied configuration is merged into the live object; the manager's set
//!   becomes exactly the configuration's field set; fields it applied last time and omits
//!   now are removed when no other manager owns them (`prune`); a field another manager owns
//!   whose value the apply adds or changes is a conflict (409) unless `force`, which takes it
//!   over; fields the write removes leave every manager's set.
//! - `Update` (create, PUT, JSON/merge patch): the manager takes every added or changed
//!   field from whoever owned it (no conflicts), removed fields leave every set.
//!
//! And k8s.io/apiserver `endpoints/handlers/fieldmanager`: managers are keyed by name,
//! operation and subresource; `apiVersion`, `kind` and the system fields of `metadata` are
//! never owned (`stripmeta.go`); with a status subresource, writes to the main resource do
//! not own `status` and writes to `/status` own only `status` (the strategies'
//! `GetResetFields`).

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::fieldset::{self, Display, FieldSet, Leaves, Node, PathElement, Shape};
use crate::status::Cause;

/// The schema of `metadata` the field manager uses (ObjectMeta's list and map types).
pub fn metadata_schema() -> Value {
    json!({"type": "object", "properties": {
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "finalizers": {"type": "array", "items": {"type": "string"}, "x-kubernetes-list-type": "set"},
        "ownerReferences": {"type": "array", "x-kubernetes-list-type": "map",
                            "x-kubernetes-list-map-keys": ["uid"], "items": {"type": "object"}},
        "managedFields": {"type": "array"}
    }})
}

/// The root schema ownership is tracked under: the kind's schema with ObjectMeta's.
pub fn tracking_schema(schema: Option<&Value>) -> Value {
    let mut root = schema
        .cloned()
        .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
    if let Some(props) = root.as_object_mut().and_then(|r| {
        r.entry("properties")
            .or_insert_with(|| json!({}))
            .as_object_mut()
    }) {
        props.insert("metadata".into(), metadata_schema());
    }
    root
}

/// Which part of the object a write may own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The main resource; `true` when the kind has a status subresource (status not owned).
    Main(bool),
    /// The `/status` subresource: only status.
    Status,
}

const STRIPPED_META: [&str; 8] = [
    "name",
    "namespace",
    "creationTimestamp",
    "selfLink",
    "uid",
    "generation",
    "managedFields",
    "resourceVersion",
];

impl Scope {
    fn keeps(&self, path: &[PathElement]) -> bool {
        let field = |i: usize| match path.get(i) {
            Some(PathElement::Field(f)) => Some(f.as_str()),
            _ => None,
        };
        match field(0) {
            Some("apiVersion") | Some("kind") => return false,
            Some("metadata") if path.len() == 1 => return false,
            Some("metadata")
                if path.len() == 2 && field(1).is_some_and(|f| STRIPPED_META.contains(&f)) =>
            {
                return false;
            }
            _ => {}
        }
        let status = field(0) == Some("status");
        match self {
            Scope::Main(true) => !status,
            Scope::Main(false) => true,
            Scope::Status => status,
        }
    }

    fn filter(&self, leaves: Leaves) -> Leaves {
        leaves.into_iter().filter(|(p, _)| self.keeps(p)).collect()
    }

    /// The subresource name recorded in managedFields.
    pub fn subresource(&self) -> Option<&'static str> {
        match self {
            Scope::Status => Some("status"),
            Scope::Main(_) => None,
        }
    }
}

/// One `managedFields` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// `manager`.
    pub manager: String,
    /// `Apply` or `Update`.
    pub operation: String,
    /// `apiVersion` the fields were set through.
    pub api_version: String,
    /// `time`.
    pub time: String,
    /// `subresource` (`status`), if any.
    pub subresource: Option<String>,
    /// The owned fields.
    pub set: FieldSet,
}

impl Entry {
    fn same_key(&self, other: &Entry) -> bool {
        self.manager == other.manager
            && self.operation == other.operation
            && self.subresource == other.subresource
    }

    /// How a conflict names this manager (`internal/conflict.go`'s `printManager`).
    fn describe(&self) -> String {
        let mut s = format!("\"{}\"", self.manager);
        if let Some(sub) = &self.subresource {
            s.push_str(&format!(" with subresource \"{sub}\""));
        }
        if self.operation == "Update" {
            s.push_str(&format!(" using {} at {}", self.api_version, self.time));
        }
        s
    }

    fn to_json(&self) -> Value {
        let mut v = json!({
            "manager": self.manager,
            "operation": self.operation,
            "apiVersion": self.api_version,
            "time": self.time,
            "fieldsType": "FieldsV1",
            "fieldsV1": fieldset::to_fields_v1(&self.set),
        });
        if let Some(sub) = &self.subresource {
            v["subresource"] = json!(sub);
        }
        v
    }
}

/// The entries of an object's `metadata.managedFields`.
pub fn entries_of(object: &Value) -> Vec<Entry> {
    object
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|e| Entry {
            manager: e["manager"].as_str().unwrap_or_default().to_string(),
            operation: e["operation"].as_str().unwrap_or_default().to_string(),
            api_version: e["apiVersion"].as_str().unwrap_or_default().to_string(),
            time: e["time"].as_str().unwrap_or_default().to_string(),
            subresource: e["subresource"].as_str().map(str::to_string),
            set: fieldset::from_fields_v1(&e["fieldsV1"]),
        })
        .collect()
}

/// Writes `entries` into the object's `metadata.managedFields`.
pub fn store_entries(object: &mut Value, entries: &[Entry]) {
    let list: Vec<Value> = entries.iter().map(Entry::to_json).collect();
    if !object.get("metadata").is_some_and(Value::is_object) && !list.is_empty() {
        object["metadata"] = json!({});
    }
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        if list.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(list));
        }
    }
}

/// Who writes, how.
#[derive(Debug, Clone)]
pub struct Writer<'a> {
    /// The field manager.
    pub manager: &'a str,
    /// `apiVersion` of the request.
    pub api_version: &'a str,
    /// Main resource or status.
    pub scope: Scope,
    /// Now, RFC 3339.
    pub now: &'a str,
}

/// Fields added, changed and removed between two objects.
struct Comparison {
    changed: FieldSet,
    removed: FieldSet,
}

fn compare(old: &Leaves, new: &Leaves) -> Comparison {
    let mut changed = FieldSet::new();
    for (path, value) in new {
        match old.get(path) {
            None => {
                changed.insert(path.clone());
            }
            Some(before) if before != value => {
                changed.insert(path.clone());
            }
            _ => {}
        }
    }
    let removed = old
        .keys()
        .filter(|p| !new.contains_key(*p))
        .cloned()
        .collect();
    Comparison { changed, removed }
}

fn leaves_of(object: &Value, root: &Value, scope: Scope) -> Result<Leaves, String> {
    let mut object = object.clone();
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("managedFields");
    }
    Ok(scope.filter(fieldset::leaves(&object, Node(Some(root)))?))
}

/// Records an update (`Update` operation) of `live` into `new` by `writer`: sets `new`'s
/// managedFields. `live` is `{}` for a create.
pub fn record_update(
    live: &Value,
    new: &mut Value,
    root: &Value,
    writer: &Writer,
) -> Result<(), String> {
    let mut entries = entries_of(live);
    let comparison = compare(
        &leaves_of(live, root, writer.scope)?,
        &leaves_of(new, root, writer.scope)?,
    );
    let me = Entry {
        manager: writer.manager.to_string(),
        operation: "Update".into(),
        api_version: writer.api_version.to_string(),
        time: writer.now.to_string(),
        subresource: writer.scope.subresource().map(str::to_string),
        set: FieldSet::new(),
    };
    for entry in entries.iter_mut().filter(|e| !e.same_key(&me)) {
        entry.set = diff(&diff(&entry.set, &comparison.changed), &comparison.removed);
    }
    let mine = match entries.iter().position(|e| e.same_key(&me)) {
        Some(i) => entries.remove(i),
        None => me,
    };
    let mut set: FieldSet = mine.set.union(&comparison.changed).cloned().collect();
    set = diff(&set, &comparison.removed);
    let changed_mine = set != mine.set;
    entries.retain(|e| !e.set.is_empty());
    if !set.is_empty() {
        entries.push(Entry {
            set,
            time: if changed_mine {
                writer.now.to_string()
            } else {
                mine.time
            },
            api_version: writer.api_version.to_string(),
            ..mine
        });
    }
    store_entries(new, &entries);
    Ok(())
}

fn diff(a: &FieldSet, b: &FieldSet) -> FieldSet {
    a.difference(b).cloned().collect()
}

/// What an apply decided.
pub enum ApplyOutcome {
    /// The merged object, with its managedFields.
    Merged(Value),
    /// Fields owned by other managers that the apply would change.
    Conflicts(Vec<Cause>),
}

/// Applies `config` to `live` (`{}` when creating) for `writer`. `reset` undoes what the
/// scope may not change (the strategy's `PrepareForUpdate`): it gets the merged object and
/// the live one.
pub fn apply(
    live: &Value,
    config: &Value,
    root: &Value,
    writer: &Writer,
    force: bool,
    reset: impl Fn(&mut Value, &Value),
) -> Result<ApplyOutcome, String> {
    let node = Node(Some(root));
    let mut entries = entries_of(live);
    let me_key = Entry {
        manager: writer.manager.to_string(),
        operation: "Apply".into(),
        api_version: writer.api_version.to_string(),
        time: writer.now.to_string(),
        subresource: writer.scope.subresource().map(str::to_string),
        set: FieldSet::new(),
    };
    let last = entries
        .iter()
        .position(|e| e.same_key(&me_key))
        .map(|i| entries.remove(i).set)
        .unwrap_or_default();

    let mut config = config.clone();
    if let Some(meta) = config.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("managedFields");
        meta.remove("resourceVersion");
    }
    let applied: FieldSet = leaves_of(&config, root, writer.scope)?
        .into_keys()
        .collect();

    let mut merged = merge(Some(live), &config, node);
    reset(&mut merged, live);
    // Prune: what this manager applied last time, omits now, and nobody else owns.
    let merged_leaves = leaves_of(&merged, root, writer.scope)?;
    let mut owned_elsewhere: FieldSet = applied.clone();
    for e in &entries {
        owned_elsewhere.extend(e.set.iter().cloned());
    }
    let prune: FieldSet = last
        .iter()
        .filter(|p| merged_leaves.contains_key(*p) && !owned_elsewhere.contains(*p))
        .cloned()
        .collect();
    fieldset::remove(&mut merged, node, &prune);

    let comparison = compare(
        &leaves_of(live, root, writer.scope)?,
        &leaves_of(&merged, root, writer.scope)?,
    );
    let mut causes = Vec::new();
    for entry in &mut entries {
        let conflicting: FieldSet = entry
            .set
            .intersection(&comparison.changed)
            .cloned()
            .collect();
        if conflicting.is_empty() {
            continue;
        }
        if force {
            entry.set = diff(&entry.set, &conflicting);
        } else {
            causes.extend(conflicting.iter().map(|p| Cause {
                kind: "FieldManagerConflict".into(),
                message: format!("conflict with {}", entry.describe()),
                field: Display(p).to_string(),
            }));
        }
    }
    if !causes.is_empty() {
        return Ok(ApplyOutcome::Conflicts(causes));
    }
    for entry in &mut entries {
        entry.set = diff(&entry.set, &comparison.removed);
    }
    entries.retain(|e| !e.set.is_empty());
    if !applied.is_empty() || !last.is_empty() {
        entries.push(Entry {
            set: applied,
            ..me_key
        });
    }
    store_entries(&mut merged, &entries);
    Ok(ApplyOutcome::Merged(merged))
}

/// Merges an applied configuration into a live value: the configuration wins on leaves,
/// maps merge by key, associative lists by item key (live order, new items appended), set
/// lists by value.
pub fn merge(live: Option<&Value>, config: &Value, node: Node) -> Value {
    match node.shape(config) {
        Shape::Leaf => config.clone(),
        Shape::Map => {
            let mut out = live.and_then(Value::as_object).cloned().unwrap_or_default();
            for (k, v) in config.as_object().into_iter().flatten() {
                let merged = merge(out.get(k), v, node.child(k).0);
                out.insert(k.clone(), merged);
            }
            Value::Object(out)
        }
        Shape::ListMap(keys, item) => {
            let live_items = live.and_then(Value::as_array).cloned().unwrap_or_default();
            let config_items = config.as_array().cloned().unwrap_or_default();
            let by_key: BTreeMap<String, &Value> = config_items
                .iter()
                .filter_map(|i| Some((fieldset::item_key(i, &keys).ok()?, i)))
                .collect();
            let mut out = Vec::new();
            let mut used = std::collections::BTreeSet::new();
            for li in &live_items {
                let key = fieldset::item_key(li, &keys).ok();
                match key.as_ref().and_then(|k| by_key.get(k)) {
                    Some(ci) => {
                        out.push(merge(Some(li), ci, item));
                        used.extend(key);
                    }
                    None => out.push(li.clone()),
                }
            }
            for ci in &config_items {
                let key = fieldset::item_key(ci, &keys).ok();
                if key.as_ref().is_none_or(|k| !used.contains(k)) {
                    out.push(ci.clone());
                }
            }
            Value::Array(out)
        }
        Shape::ListSet => {
            let mut out = live.and_then(Value::as_array).cloned().unwrap_or_default();
            for ci in config.as_array().into_iter().flatten() {
                if !out.contains(ci) {
                    out.push(ci.clone());
                }
            }
            Value::Array(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> Value {
        tracking_schema(Some(&json!({"type": "object", "properties": {
            "spec": {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "string"}}},
            "status": {"type": "object", "properties": {
                "nodes": {"type": "array", "x-kubernetes-list-type": "map",
                          "x-kubernetes-list-map-keys": ["node"],
                          "items": {"type": "object", "properties": {
                              "node": {"type": "string"}, "up": {"type": "boolean"}}}}}}}})))
    }

    fn writer(manager: &str) -> Writer<'_> {
        Writer {
            manager,
            api_version: "v1",
            scope: Scope::Main(false),
            now: "2026-01-01T00:00:00Z",
        }
    }

    fn applied(live: &Value, config: Value, w: &Writer, force: bool) -> Result<Value, Vec<Cause>> {
        match apply(live, &config, &root(), w, force, |_, _| {}).unwrap() {
            ApplyOutcome::Merged(v) => Ok(v),
            ApplyOutcome::Conflicts(c) => Err(c),
        }
    }

    #[test]
    fn two_appliers_conflict_on_a_value_and_force_takes_it_over() {
        let a = applied(
            &json!({}),
            json!({"spec": {"a": "1"}}),
            &writer("alice"),
            false,
        )
        .unwrap();
        let same = applied(&a, json!({"spec": {"a": "1"}}), &writer("bob"), false);
        assert!(same.is_ok(), "the same value is shared, not a conflict");
        let err = applied(&a, json!({"spec": {"a": "2"}}), &writer("bob"), false).unwrap_err();
        assert_eq!(err[0].field, ".spec.a");
        assert_eq!(err[0].message, "conflict with \"alice\"");
        let forced = applied(&a, json!({"spec": {"a": "2"}}), &writer("bob"), true).unwrap();
        let entries = entries_of(&forced);
        assert_eq!(entries.len(), 1, "alice lost her only field");
        assert_eq!(entries[0].manager, "bob");
    }

    #[test]
    fn an_omitted_field_is_removed_unless_someone_else_owns_it() {
        let one = applied(
            &json!({}),
            json!({"spec": {"a": "1", "b": "x"}}),
            &writer("alice"),
            false,
        )
        .unwrap();
        let two = applied(&one, json!({"spec": {"a": "1"}}), &writer("alice"), false).unwrap();
        assert_eq!(two["spec"], json!({"a": "1"}));
        let shared = applied(&one, json!({"spec": {"b": "x"}}), &writer("bob"), false).unwrap();
        let three = applied(
            &shared,
            json!({"spec": {"a": "1"}}),
            &writer("alice"),
            false,
        )
        .unwrap();
        assert_eq!(
            three["spec"],
            json!({"a": "1", "b": "x"}),
            "bob still owns b"
        );
    }

    #[test]
    fn managers_own_separate_entries_of_a_map_list() {
        let a = applied(
            &json!({}),
            json!({"status": {"nodes": [{"node": "a", "up": true}]}}),
            &writer("agent-a"),
            false,
        )
        .unwrap();
        let b = applied(
            &a,
            json!({"status": {"nodes": [{"node": "b", "up": false}]}}),
            &writer("agent-b"),
            false,
        )
        .unwrap();
        assert_eq!(b["status"]["nodes"].as_array().unwrap().len(), 2);
        let released = applied(&b, json!({"status": {}}), &writer("agent-a"), false).unwrap();
        assert_eq!(
            released["status"]["nodes"],
            json!([{"node": "b", "up": false}])
        );
    }

    #[test]
    fn updates_take_ownership_without_conflict() {
        let a = applied(
            &json!({}),
            json!({"spec": {"a": "1"}}),
            &writer("alice"),
            false,
        )
        .unwrap();
        let mut edited = a.clone();
        edited["spec"]["a"] = json!("9");
        record_update(&a, &mut edited, &root(), &writer("editor")).unwrap();
        let entries = entries_of(&edited);
        assert_eq!(entries.len(), 1);
        assert_eq!(
            (entries[0].manager.as_str(), entries[0].operation.as_str()),
            ("editor", "Update")
        );
    }
}
