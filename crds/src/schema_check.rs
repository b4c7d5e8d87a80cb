//! Checks a generated CRD schema for what a Kubernetes API server would refuse.
//!
//! kube's derive builds schemas from Rust types, and a type shape it handles badly (an enum
//! mixing unit and struct variants, a map without a value type) yields a schema the API
//! server refuses as non-structural, only when someone installs it. These checks run in the
//! test suite over every CRD so such a schema never reaches a cluster. What the CEL rules
//! cost, the other reason an API server refuses a CRD, is `crate::cel_cost`'s job.

use serde_json::Value;

/// Keys inside `x-kubernetes-validations` rules that Kubernetes 1.24 does not know: a CRD
/// using them fails server-side apply there with HTTP 500.
pub const RULE_KEYS_NEWER_THAN_1_24: [&str; 4] = [
    "messageExpression",
    "reason",
    "fieldPath",
    "optionalOldSelf",
];

/// Every problem found in `schema` (an `openAPIV3Schema`), each with its JSON path.
pub fn problems(schema: &Value) -> Vec<String> {
    let mut out = Vec::new();
    walk(schema, "$", true, &mut out);
    out
}

fn walk(node: &Value, path: &str, structural: bool, out: &mut Vec<String>) {
    let Some(map) = node.as_object() else {
        out.push(format!("{path}: schema node is not an object"));
        return;
    };
    let escape = map.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true))
        || map.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    if structural && !map.contains_key("type") && !escape {
        out.push(format!("{path}: no type (only x-kubernetes-int-or-string or x-kubernetes-preserve-unknown-fields may omit it)"));
    }
    if let Some(t) = map.get("type")
        && !t.is_string()
    {
        out.push(format!("{path}: type must be a single string, found {t}"));
    }
    for forbidden in ["$ref", "definitions", "$defs", "not"] {
        if map.contains_key(forbidden) {
            out.push(format!(
                "{path}: `{forbidden}` is not allowed in a structural schema"
            ));
        }
    }
    if map.contains_key("properties") && map.contains_key("additionalProperties") {
        out.push(format!("{path}: additionalProperties beside properties"));
    }
    if map.get("type").and_then(Value::as_str) == Some("array") && !map.contains_key("items") {
        out.push(format!("{path}: array without an items schema"));
    }
    for junction in ["anyOf", "oneOf", "allOf"] {
        if let Some(branches) = map.get(junction).and_then(Value::as_array) {
            for (i, branch) in branches.iter().enumerate() {
                let branch_path = format!("{path}.{junction}[{i}]");
                for key in [
                    "type",
                    "properties",
                    "items",
                    "additionalProperties",
                    "default",
                    "nullable",
                    "description",
                ] {
                    if branch.get(key).is_some() {
                        out.push(format!("{branch_path}: `{key}` inside {junction} (only value validations may appear there)"));
                    }
                }
            }
        }
    }
    check_list_type(map, path, out);
    check_rules(map, path, out);
    if let Some(properties) = map.get("properties").and_then(Value::as_object) {
        for (name, child) in properties {
            walk(child, &format!("{path}.{name}"), structural, out);
        }
    }
    if let Some(items) = map.get("items") {
        walk(items, &format!("{path}[]"), structural, out);
    }
    if let Some(additional) = map.get("additionalProperties")
        && additional.is_object()
    {
        walk(additional, &format!("{path}{{}}"), structural, out);
    }
}

fn check_list_type(map: &serde_json::Map<String, Value>, path: &str, out: &mut Vec<String>) {
    let Some(list_type) = map.get("x-kubernetes-list-type").and_then(Value::as_str) else {
        if map.contains_key("x-kubernetes-list-map-keys") {
            out.push(format!(
                "{path}: x-kubernetes-list-map-keys without x-kubernetes-list-type map"
            ));
        }
        return;
    };
    if map.get("type").and_then(Value::as_str) != Some("array") {
        out.push(format!("{path}: x-kubernetes-list-type on a non-array"));
    }
    if list_type != "map" {
        return;
    }
    let keys: Vec<&str> = map
        .get("x-kubernetes-list-map-keys")
        .and_then(Value::as_array)
        .map(|k| k.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if keys.is_empty() {
        out.push(format!(
            "{path}: list-type map without x-kubernetes-list-map-keys"
        ));
    }
    let items = map.get("items");
    let required: Vec<&str> = items
        .and_then(|i| i.get("required"))
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    for key in keys {
        let property = items
            .and_then(|i| i.get("properties"))
            .and_then(|p| p.get(key));
        match property {
            None => out.push(format!(
                "{path}: map key `{key}` is not a property of the items"
            )),
            Some(p) if !required.contains(&key) && p.get("default").is_none() => out.push(format!(
                "{path}: map key `{key}` must be required or have a default"
            )),
            Some(p) if p.get("nullable") == Some(&Value::Bool(true)) => {
                out.push(format!("{path}: map key `{key}` must not be nullable"))
            }
            Some(_) => {}
        }
    }
}

fn check_rules(map: &serde_json::Map<String, Value>, path: &str, out: &mut Vec<String>) {
    let Some(rules) = map.get("x-kubernetes-validations") else {
        return;
    };
    let Some(rules) = rules.as_array() else {
        out.push(format!("{path}: x-kubernetes-validations is not a list"));
        return;
    };
    for (i, rule) in rules.iter().enumerate() {
        let rule_path = format!("{path}.x-kubernetes-validations[{i}]");
        if rule.get("rule").and_then(Value::as_str).is_none() {
            out.push(format!("{rule_path}: no rule"));
            continue;
        }
        if rule
            .get("message")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            out.push(format!(
                "{rule_path}: no message (users would see the raw CEL)"
            ));
        }
        for key in RULE_KEYS_NEWER_THAN_1_24 {
            if rule.get(key).is_some() {
                out.push(format!(
                    "{rule_path}: `{key}` is refused by Kubernetes 1.24"
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn finds_each_kind_of_non_structural_node() {
        let schema = json!({
            "type": "object",
            "properties": {
                "untyped": {"description": "no type"},
                "quantity": {"x-kubernetes-int-or-string": true},
                "both": {"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": {"type": "string"}},
                "list": {"type": "array"},
                "typedBranch": {"type": "string", "anyOf": [{"type": "string"}]},
                "badMap": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"], "items": {"type": "object", "properties": {"name": {"type": "string"}}}},
                "newRule": {"type": "string", "x-kubernetes-validations": [{"rule": "self != ''", "message": "m", "messageExpression": "'x'"}]}
            }
        });
        let found = problems(&schema).join("\n");
        for expected in [
            "$.untyped: no type",
            "$.both: additionalProperties beside properties",
            "$.list: array without an items schema",
            "$.typedBranch.anyOf[0]: `type` inside anyOf",
            "$.badMap: map key `name` must be required",
            "`messageExpression` is refused by Kubernetes 1.24",
        ] {
            assert!(
                found.contains(expected),
                "missing `{expected}` in:\n{found}"
            );
        }
        assert!(
            !found.contains("$.quantity"),
            "int-or-string may omit type:\n{found}"
        );
    }
}
