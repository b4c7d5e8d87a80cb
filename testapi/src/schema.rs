//! What apiextensions-apiserver does to a custom resource before storing it: structural
//! defaulting (`default` of every absent property whose parent exists), pruning of unknown
//! fields and of nulls in non-nullable fields, then validation (OpenAPI checks and CEL
//! rules, with `oldSelf` on updates). The checks themselves are the crds crate's
//! (`SchemaValidator`, the same walk `virtkube apply -f` uses, and kube's CEL validator), so the
//! server and the offline CLI refuse the same objects with the same words.

use std::collections::HashMap;
use std::sync::Arc;

use kube::core::cel::{CompiledSchema, compile_schema};
use serde_json::Value;
use virtkube_crds::schema_validate::SchemaValidator;

use crate::status::Cause;

/// Fills in the schema's defaults (`structuraldefaulting`): a property that is absent gets
/// its `default` when its parent object exists; items of lists are defaulted one by one.
pub fn apply_defaults(schema: &Value, value: &mut Value) {
    match value {
        Value::Object(map) => {
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (name, prop) in props {
                    if !map.contains_key(name)
                        && let Some(default) = prop.get("default")
                    {
                        map.insert(name.clone(), default.clone());
                    }
                }
                for (name, child) in map.iter_mut() {
                    if let Some(prop) = props.get(name) {
                        apply_defaults(prop, child);
                    }
                }
            } else if let Some(extra) = schema.get("additionalProperties").filter(|e| e.is_object())
            {
                for child in map.values_mut() {
                    apply_defaults(extra, child);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item) = schema.get("items") {
                for child in items {
                    apply_defaults(item, child);
                }
            }
        }
        _ => {}
    }
}

/// Drops unknown fields (unless `x-kubernetes-preserve-unknown-fields`) and nulls of
/// non-nullable fields, returning the paths of the unknown fields dropped (what a
/// `fieldValidation=Strict` request is refused for, and `Warn` warns about).
pub fn prune(schema: &Value, value: &mut Value) -> Vec<String> {
    let mut dropped = Vec::new();
    prune_at(schema, value, "", true, &mut dropped);
    dropped
}

fn prune_at(schema: &Value, value: &mut Value, path: &str, root: bool, dropped: &mut Vec<String>) {
    let join = |name: &str| {
        if path.is_empty() {
            name.to_string()
        } else {
            format!("{path}.{name}")
        }
    };
    match value {
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let extra = schema.get("additionalProperties");
            let preserve =
                schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
            let mut unknown = Vec::new();
            for (name, child) in map.iter_mut() {
                if root && (name == "apiVersion" || name == "kind" || name == "metadata") {
                    continue;
                }
                let child_schema = props
                    .and_then(|p| p.get(name))
                    .or(extra.filter(|e| e.is_object()));
                match child_schema {
                    Some(s) => {
                        if child.is_null() && s.get("nullable") != Some(&Value::Bool(true)) {
                            unknown.push((name.clone(), false));
                        } else {
                            prune_at(s, child, &join(name), false, dropped);
                        }
                    }
                    None if preserve || extra == Some(&Value::Bool(true)) => {}
                    None => unknown.push((name.clone(), true)),
                }
            }
            for (name, report) in unknown {
                map.remove(&name);
                if report {
                    dropped.push(join(&name));
                }
            }
        }
        Value::Array(items) => {
            if let Some(item) = schema.get("items") {
                for (i, child) in items.iter_mut().enumerate() {
                    prune_at(item, child, &format!("{path}[{i}]"), false, dropped);
                }
            }
        }
        _ => {}
    }
}

/// Checks a custom resource against its schema and CEL rules; `old` enables transition
/// rules. Each problem becomes a 422 cause with its field path.
///
/// The CEL rules of a schema are compiled once, the first time an object of its type is
/// checked (as the API server compiles a CRD's rules when the CRD is stored), and kept for
/// that very schema: compiling them at every write was most of the server's time.
pub struct Checker {
    openapi: SchemaValidator,
    cel: kube::core::cel::Validator,
    /// Compiled rules by schema identity; the `Arc` kept here keeps the address unique.
    compiled: HashMap<usize, (Arc<Value>, CompiledSchema)>,
}

impl Default for Checker {
    fn default() -> Self {
        Checker {
            openapi: SchemaValidator::new(),
            cel: kube::core::cel::Validator::new(),
            compiled: HashMap::new(),
        }
    }
}

/// Schemas whose compiled rules are kept at most (a type per CRD version; a test that
/// makes more only compiles again).
const COMPILED_KEPT: usize = 64;

impl Checker {
    /// Every problem of `object` (already defaulted and pruned).
    pub fn check(
        &mut self,
        schema: &Arc<Value>,
        object: &Value,
        old: Option<&Value>,
    ) -> Vec<Cause> {
        let mut causes: Vec<Cause> = self
            .openapi
            .validate(schema, object)
            .into_iter()
            .map(|e| Cause {
                kind: "FieldValueInvalid".into(),
                message: e.message,
                field: e.path,
            })
            .collect();
        let key = Arc::as_ptr(schema) as usize;
        if !self.compiled.contains_key(&key) && self.compiled.len() >= COMPILED_KEPT {
            self.compiled.clear();
        }
        let (_, compiled) = self
            .compiled
            .entry(key)
            .or_insert_with(|| (schema.clone(), compile_schema(schema)));
        if causes.is_empty()
            && let Err(errors) = self.cel.validate_compiled(compiled, object, old)
        {
            causes.extend(errors.iter().map(|e| Cause {
                kind: "FieldValueInvalid".into(),
                message: e.message.clone(),
                field: if e.field_path.is_empty() {
                    "<nil>".into()
                } else {
                    e.field_path.clone()
                },
            }));
        }
        causes
    }
}

/// The name checks of `ValidateObjectMeta` for custom resources: a DNS subdomain.
pub fn name_problems(name: &str) -> Vec<Cause> {
    if virtkube_crds::names::is_object_name(name) {
        Vec::new()
    } else {
        vec![Cause {
            kind: "FieldValueInvalid".into(),
            message: format!(
                "Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
            ),
            field: "metadata.name".into(),
        }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_fill_absent_fields_under_existing_parents() {
        let schema = json!({"type": "object", "properties": {
            "spec": {"type": "object", "properties": {
                "mode": {"type": "string", "default": "nat"},
                "items": {"type": "array", "items": {"type": "object", "properties": {
                    "bus": {"type": "string", "default": "virtio"}}}},
                "absent": {"type": "object", "properties": {"x": {"type": "integer", "default": 1}}}}}}});
        let mut v = json!({"spec": {"items": [{}, {"bus": "sata"}]}});
        apply_defaults(&schema, &mut v);
        assert_eq!(
            v,
            json!({"spec": {"mode": "nat", "items": [{"bus": "virtio"}, {"bus": "sata"}]}})
        );
    }

    #[test]
    fn pruning_drops_unknown_fields_and_nulls() {
        let schema = json!({"type": "object", "properties": {
            "spec": {"type": "object", "properties": {"a": {"type": "string"}}}}});
        let mut v = json!({"apiVersion": "x", "kind": "K", "metadata": {"name": "n"},
                           "spec": {"a": null, "b": 1}, "extra": true});
        let dropped = prune(&schema, &mut v);
        assert_eq!(dropped, vec!["spec.b".to_string(), "extra".to_string()]);
        assert_eq!(v["spec"], json!({}));
    }
}
