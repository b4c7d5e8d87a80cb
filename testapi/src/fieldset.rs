//! Field sets as server-side apply sees them: which paths of an object a manager owns, how
//! an object turns into such paths under its schema, and the `fieldsV1` form stored in
//! `metadata.managedFields`.
//!
//! Mirrors sigs.k8s.io/structured-merge-diff `typed/tofieldset.go`: a scalar or an atomic
//! list/map is one leaf; an item of an associative list (`x-kubernetes-list-type: map`, path
//! element `k:{"key":…}`) or of a set list (`v:…`) is itself a member and so is every map
//! entry that is not a declared field (labels, annotations, `additionalProperties`); a
//! declared field is a member only as a leaf, or when null or an empty map. Lists with no
//! `x-kubernetes-list-type` are atomic, as in structural schemas.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde_json::{Map, Value, json};

/// One step of a path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PathElement {
    /// A field or map key: `f:name`.
    Field(String),
    /// An associative-list item by its keys, canonical JSON: `k:{"name":"eth0"}`.
    Key(String),
    /// A set-list item by its value, canonical JSON: `v:"foo"`.
    Value(String),
    /// A list index (only for lists of unknown shape; unused by structural schemas).
    Index(usize),
}

/// A path from the object's root.
pub type Path = Vec<PathElement>;

/// A set of paths.
pub type FieldSet = BTreeSet<Path>;

/// Paths of an object, each with its value when it is a leaf (scalar or atomic).
pub type Leaves = BTreeMap<Path, Option<Value>>;

/// Prints a path as structured-merge-diff's `Path.String()` does, e.g.
/// `.status.nodes[nodeName="a"].active`.
pub struct Display<'a>(pub &'a Path);

impl fmt::Display for Display<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for element in self.0 {
            match element {
                PathElement::Field(name) => write!(f, ".{name}")?,
                PathElement::Key(canon) => {
                    let keys: Map<String, Value> = serde_json::from_str(canon).unwrap_or_default();
                    let parts: Vec<String> = keys.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    write!(f, "[{}]", parts.join(","))?
                }
                PathElement::Value(canon) => write!(f, "[={canon}]")?,
                PathElement::Index(i) => write!(f, "[{i}]")?,
            }
        }
        Ok(())
    }
}

/// JSON with object keys sorted, so equal values have equal text.
pub fn canonical(value: &Value) -> String {
    match value {
        Value::Object(map) => {
            let sorted: BTreeMap<&String, String> =
                map.iter().map(|(k, v)| (k, canonical(v))).collect();
            let parts: Vec<String> = sorted
                .iter()
                .map(|(k, v)| format!("{}:{v}", Value::String((*k).clone())))
                .collect();
            format!("{{{}}}", parts.join(","))
        }
        Value::Array(items) => {
            let parts: Vec<String> = items.iter().map(canonical).collect();
            format!("[{}]", parts.join(","))
        }
        other => other.to_string(),
    }
}

/// A node of a structural schema, or none (shape deduced from the value, as
/// structured-merge-diff's deduced type does: maps granular, lists atomic).
#[derive(Debug, Clone, Copy)]
pub struct Node<'a>(pub Option<&'a Value>);

/// How a value is tracked.
pub enum Shape<'a> {
    /// A scalar, or an atomic list or map: one leaf.
    Leaf,
    /// A granular map: declared fields and/or free keys.
    Map,
    /// `x-kubernetes-list-type: map` with these keys; items by the item schema.
    ListMap(Vec<String>, Node<'a>),
    /// `x-kubernetes-list-type: set`.
    ListSet,
}

impl<'a> Node<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.0.and_then(|s| s.get(key))
    }

    /// The shape of `value` under this node.
    pub fn shape(&self, value: &Value) -> Shape<'a> {
        if self.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
            return Shape::Leaf;
        }
        match value {
            Value::Array(_) => match self.get("x-kubernetes-list-type").and_then(Value::as_str) {
                Some("map") => {
                    let keys = self
                        .get("x-kubernetes-list-map-keys")
                        .and_then(Value::as_array)
                        .map(|ks| {
                            ks.iter()
                                .filter_map(|k| k.as_str().map(str::to_string))
                                .collect()
                        })
                        .unwrap_or_default();
                    Shape::ListMap(keys, Node(self.get("items")))
                }
                Some("set") => Shape::ListSet,
                _ => Shape::Leaf,
            },
            Value::Object(_) => {
                if self.get("x-kubernetes-map-type").and_then(Value::as_str) == Some("atomic") {
                    Shape::Leaf
                } else {
                    Shape::Map
                }
            }
            _ => Shape::Leaf,
        }
    }

    /// The schema of `key` in a map, and whether it is a declared field.
    pub fn child(&self, key: &str) -> (Node<'a>, bool) {
        if let Some(p) = self.get("properties").and_then(|p| p.get(key)) {
            return (Node(Some(p)), true);
        }
        match self.get("additionalProperties") {
            Some(extra) if extra.is_object() => (Node(Some(extra)), false),
            _ => (Node(None), false),
        }
    }
}

/// The canonical key element of an associative-list item.
pub fn item_key(item: &Value, keys: &[String]) -> Result<String, String> {
    let mut sorted: Vec<&String> = keys.iter().collect();
    sorted.sort();
    let mut parts = Vec::new();
    for k in sorted {
        let v = item.get(k).ok_or_else(|| {
            format!("associative list with keys has an element that omits key field \"{k}\"")
        })?;
        parts.push(format!("{}:{}", Value::String(k.clone()), canonical(v)));
    }
    Ok(format!("{{{}}}", parts.join(",")))
}

/// Every tracked path of `value` (see the module's rules), leaves with their values.
pub fn leaves(value: &Value, node: Node) -> Result<Leaves, String> {
    let mut out = Leaves::new();
    walk(value, node, &mut Vec::new(), &mut out)?;
    Ok(out)
}

fn walk(value: &Value, node: Node, path: &mut Path, out: &mut Leaves) -> Result<(), String> {
    match node.shape(value) {
        Shape::Leaf => {
            out.insert(path.clone(), Some(value.clone()));
        }
        Shape::Map => {
            if let Some(map) = value.as_object() {
                for (k, v) in map {
                    let (child, declared) = node.child(k);
                    path.push(PathElement::Field(k.clone()));
                    walk(v, child, path, out)?;
                    let empty = v.as_object().is_some_and(|m| m.is_empty());
                    if !out.contains_key(path) && (!declared || empty) {
                        out.insert(path.clone(), None);
                    }
                    path.pop();
                }
            }
        }
        Shape::ListMap(keys, item) => {
            let mut seen = BTreeSet::new();
            for element in value.as_array().into_iter().flatten() {
                let key = item_key(element, &keys)?;
                if !seen.insert(key.clone()) {
                    return Err(format!("duplicate entries for key {key}"));
                }
                path.push(PathElement::Key(key));
                walk(element, item, path, out)?;
                out.entry(path.clone()).or_insert(None);
                path.pop();
            }
        }
        Shape::ListSet => {
            for element in value.as_array().into_iter().flatten() {
                path.push(PathElement::Value(canonical(element)));
                out.insert(path.clone(), Some(element.clone()));
                path.pop();
            }
        }
    }
    Ok(())
}

/// Removes every path in `paths` from `value` (a field's key, or a list item). A path under
/// another removed path goes with it (removing an item's key field first would leave an
/// item that can no longer be found).
pub fn remove(value: &mut Value, node: Node, paths: &FieldSet) {
    let outermost = paths
        .iter()
        .filter(|p| !(1..p.len()).any(|n| paths.contains(&p[..n].to_vec())));
    let outermost: Vec<&Path> = outermost.collect();
    for path in outermost.into_iter().rev() {
        remove_one(value, node, path);
    }
}

fn remove_one(value: &mut Value, node: Node, path: &[PathElement]) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    match (first, value) {
        (PathElement::Field(k), Value::Object(map)) => {
            if rest.is_empty() {
                map.remove(k);
            } else if let Some(child) = map.get_mut(k) {
                remove_one(child, node.child(k).0, rest);
            }
        }
        (PathElement::Key(key), list @ Value::Array(_)) => {
            let Shape::ListMap(keys, item) = node.shape(list) else {
                return;
            };
            let Value::Array(items) = list else { return };
            let position = items
                .iter()
                .position(|i| item_key(i, &keys).as_deref() == Ok(key.as_str()));
            if let Some(i) = position {
                if rest.is_empty() {
                    items.remove(i);
                } else {
                    remove_one(&mut items[i], item, rest);
                }
            }
        }
        (PathElement::Value(canon), Value::Array(items)) if rest.is_empty() => {
            items.retain(|i| canonical(i) != *canon);
        }
        _ => {}
    }
}

fn element_text(element: &PathElement) -> String {
    match element {
        PathElement::Field(name) => format!("f:{name}"),
        PathElement::Key(canon) => format!("k:{canon}"),
        PathElement::Value(canon) => format!("v:{canon}"),
        PathElement::Index(i) => format!("i:{i}"),
    }
}

fn parse_element(text: &str) -> Option<PathElement> {
    let (prefix, rest) = text.split_at_checked(2)?;
    let recanon = |s: &str| serde_json::from_str::<Value>(s).ok().map(|v| canonical(&v));
    match prefix {
        "f:" => Some(PathElement::Field(rest.to_string())),
        "k:" => recanon(rest).map(PathElement::Key),
        "v:" => recanon(rest).map(PathElement::Value),
        "i:" => rest.parse().ok().map(PathElement::Index),
        _ => None,
    }
}

/// `fieldsV1`: a tree of path elements; `".": {}` marks a member that also has children.
pub fn to_fields_v1(set: &FieldSet) -> Value {
    #[derive(Default)]
    struct Tree {
        member: bool,
        children: BTreeMap<String, Tree>,
    }
    let mut root = Tree::default();
    for path in set {
        let mut node = &mut root;
        for element in path {
            node = node.children.entry(element_text(element)).or_default();
        }
        node.member = true;
    }
    fn render(tree: &Tree) -> Value {
        let mut map = Map::new();
        if tree.member && !tree.children.is_empty() {
            map.insert(".".into(), json!({}));
        }
        for (k, child) in &tree.children {
            map.insert(k.clone(), render(child));
        }
        Value::Object(map)
    }
    render(&root)
}

/// Reads `fieldsV1` back into a set.
pub fn from_fields_v1(tree: &Value) -> FieldSet {
    let mut out = FieldSet::new();
    fn walk(tree: &Value, path: &mut Path, out: &mut FieldSet) {
        let Some(map) = tree.as_object() else { return };
        for (k, child) in map {
            if k == "." {
                out.insert(path.clone());
                continue;
            }
            let Some(element) = parse_element(k) else {
                continue;
            };
            path.push(element);
            if child.as_object().is_some_and(|m| m.is_empty()) {
                out.insert(path.clone());
            } else {
                walk(child, path, out);
            }
            path.pop();
        }
    }
    walk(tree, &mut Vec::new(), &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> Value {
        json!({"type": "object", "properties": {
            "metadata": {"type": "object", "properties": {
                "labels": {"type": "object", "additionalProperties": {"type": "string"}}}},
            "spec": {"type": "object", "properties": {
                "a": {"type": "integer"},
                "tags": {"type": "array", "items": {"type": "string"}},
                "set": {"type": "array", "items": {"type": "string"}, "x-kubernetes-list-type": "set"}}},
            "status": {"type": "object", "properties": {
                "nodes": {"type": "array", "x-kubernetes-list-type": "map",
                          "x-kubernetes-list-map-keys": ["node"],
                          "items": {"type": "object", "properties": {
                              "node": {"type": "string"}, "up": {"type": "boolean"}}}}}}}})
    }

    #[test]
    fn members_follow_structured_merge_diff() {
        let s = schema();
        let obj = json!({"metadata": {"labels": {"x": "1"}},
                         "spec": {"a": 1, "tags": ["p", "q"], "set": ["u"]},
                         "status": {"nodes": [{"node": "n1", "up": true}]}});
        let set: FieldSet = leaves(&obj, Node(Some(&s))).unwrap().into_keys().collect();
        let printed: Vec<String> = set.iter().map(|p| Display(p).to_string()).collect();
        assert_eq!(
            printed,
            vec![
                ".metadata.labels.x",
                ".spec.a",
                ".spec.set[=\"u\"]",
                ".spec.tags",
                ".status.nodes[node=\"n1\"]",
                ".status.nodes[node=\"n1\"].node",
                ".status.nodes[node=\"n1\"].up",
            ]
        );
        let v1 = to_fields_v1(&set);
        assert_eq!(
            v1["f:status"]["f:nodes"]["k:{\"node\":\"n1\"}"],
            json!({".": {}, "f:node": {}, "f:up": {}})
        );
        assert_eq!(from_fields_v1(&v1), set);
    }

    #[test]
    fn duplicate_or_keyless_items_are_errors() {
        let s = schema();
        let dup = json!({"status": {"nodes": [{"node": "a"}, {"node": "a"}]}});
        assert!(leaves(&dup, Node(Some(&s))).is_err());
        let keyless = json!({"status": {"nodes": [{"up": true}]}});
        assert!(leaves(&keyless, Node(Some(&s))).is_err());
    }

    #[test]
    fn removal_takes_an_item_or_a_field() {
        let s = schema();
        let mut obj =
            json!({"spec": {"a": 1}, "status": {"nodes": [{"node": "a"}, {"node": "b"}]}});
        let set: FieldSet = [
            vec![
                PathElement::Field("status".into()),
                PathElement::Field("nodes".into()),
                PathElement::Key("{\"node\":\"a\"}".into()),
            ],
            vec![
                PathElement::Field("spec".into()),
                PathElement::Field("a".into()),
            ],
        ]
        .into_iter()
        .collect();
        remove(&mut obj, Node(Some(&s)), &set);
        assert_eq!(
            obj,
            json!({"spec": {}, "status": {"nodes": [{"node": "b"}]}})
        );
    }
}
