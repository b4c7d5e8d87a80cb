//! Validates a JSON value against a CRD's structural schema the way the API server does:
//! unknown fields, types, enums, patterns, ranges, lengths, required fields, then the CEL
//! rules. Lets `virtkube apply -f` refuse a bad manifest with no cluster in front of it, with
//! the same words `kubectl apply` would print.

use std::collections::HashMap;

use regex::Regex;
use serde_json::Value;

/// One refusal: where (`spec.cpu.vcpus`) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaError {
    /// A dotted path from the object's root; list items as `[index]`.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

/// Checks values against one schema; caches compiled patterns.
#[derive(Default)]
pub struct SchemaValidator {
    patterns: HashMap<String, Option<Regex>>,
}

impl SchemaValidator {
    /// A validator with an empty pattern cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every structural problem of `value` against `schema`. `metadata` is skipped: the API
    /// server validates it separately (see `manifest`).
    pub fn validate(&mut self, schema: &Value, value: &Value) -> Vec<SchemaError> {
        let mut out = Vec::new();
        self.walk(schema, value, "", &mut out);
        out
    }

    fn walk(&mut self, schema: &Value, value: &Value, path: &str, out: &mut Vec<SchemaError>) {
        let mut fail = |message: String| {
            out.push(SchemaError {
                path: display_path(path),
                message,
            })
        };
        // The API server drops the nulls of non-nullable fields, and typed parsing reads a null
        // as unset: there is nothing to refuse.
        if value.is_null() {
            return;
        }
        let int_or_string = schema.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true));
        if int_or_string {
            if !(value.is_string() || value.is_i64() || value.is_u64()) {
                fail(format!(
                    "must be an integer or a string, found {}",
                    kind_of(value)
                ));
                return;
            }
        } else if let Some(expected) = schema.get("type").and_then(Value::as_str) {
            let ok = match expected {
                "object" => value.is_object(),
                "array" => value.is_array(),
                "string" => value.is_string(),
                "integer" => value.is_i64() || value.is_u64(),
                "number" => value.is_number(),
                "boolean" => value.is_boolean(),
                _ => true,
            };
            if !ok {
                fail(format!(
                    "must be {} {expected}, found {}",
                    article(expected),
                    kind_of(value)
                ));
                return;
            }
        }
        let outside_enum = schema
            .get("enum")
            .and_then(Value::as_array)
            .is_some_and(|allowed| !allowed.contains(value));
        if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
            && outside_enum
        {
            let names: Vec<String> = allowed
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| v.to_string())
                })
                .collect();
            fail(format!(
                "unsupported value {value}: must be one of {}",
                names.join(", ")
            ));
        }
        if let Some(text) = value.as_str() {
            let chars = text.chars().count() as u64;
            if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
                && chars < min
            {
                fail(format!("must be at least {min} characters long"));
            }
            // A string enum's maxLength is its longest value (crate::crd): the enum message
            // already says what fits.
            if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
                && chars > max
                && !outside_enum
            {
                fail(format!("must be at most {max} characters long"));
            }
            if let Some(pattern) = schema.get("pattern").and_then(Value::as_str) {
                let compiled = self
                    .patterns
                    .entry(pattern.to_string())
                    .or_insert_with(|| Regex::new(pattern).ok());
                if let Some(re) = compiled
                    && !re.is_match(text)
                {
                    out.push(SchemaError {
                        path: display_path(path),
                        message: format!(
                            "`{}` does not match the expected form {pattern}",
                            crate::names::shown(text, 80)
                        ),
                    });
                }
            }
        }
        if let Some(number) = value.as_f64() {
            let mut fail = |message: String| {
                out.push(SchemaError {
                    path: display_path(path),
                    message,
                })
            };
            if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
                && number < min
            {
                fail(format!("must be at least {min}"));
            }
            if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
                && number > max
            {
                fail(format!("must be at most {max}"));
            }
        }
        if let Some(items) = value.as_array() {
            if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
                && items.len() as u64 > max
            {
                out.push(SchemaError {
                    path: display_path(path),
                    message: format!("must have at most {max} items"),
                });
            }
            if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
                && (items.len() as u64) < min
            {
                out.push(SchemaError {
                    path: display_path(path),
                    message: format!("must have at least {min} items"),
                });
            }
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    self.walk(item_schema, item, &format!("{path}[{i}]"), out);
                }
            }
        }
        if let Some(fields) = value.as_object() {
            self.walk_object(schema, fields, path, out);
        }
    }

    fn walk_object(
        &mut self,
        schema: &Value,
        fields: &serde_json::Map<String, Value>,
        path: &str,
        out: &mut Vec<SchemaError>,
    ) {
        let properties = schema.get("properties").and_then(Value::as_object);
        let additional = schema.get("additionalProperties");
        let preserve =
            schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
        for required in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            let has_default = properties
                .and_then(|p| p.get(required))
                .is_some_and(|p| p.get("default").is_some());
            if !fields.contains_key(required) && !has_default {
                out.push(SchemaError {
                    path: display_path(&join(path, required)),
                    message: "required field is missing".into(),
                });
            }
        }
        for (name, child) in fields {
            let child_path = join(path, name);
            if path.is_empty() && (name == "metadata" || name == "apiVersion" || name == "kind") {
                continue;
            }
            match (properties.and_then(|p| p.get(name)), additional) {
                (Some(child_schema), _) => self.walk(child_schema, child, &child_path, out),
                (None, Some(extra)) if extra.is_object() => {
                    self.walk(extra, child, &child_path, out)
                }
                (None, Some(Value::Bool(true))) => {}
                (None, _) if preserve => {}
                (None, _) => {
                    let known: Vec<&str> = properties
                        .map(|p| p.keys().map(String::as_str).collect())
                        .unwrap_or_default();
                    let hint = closest(name, &known)
                        .map(|k| format!(" (did you mean `{k}`?)"))
                        .unwrap_or_default();
                    out.push(SchemaError {
                        path: display_path(&child_path),
                        message: format!("unknown field `{name}`{hint}"),
                    });
                }
            }
        }
    }
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

fn display_path(path: &str) -> String {
    if path.is_empty() {
        "(root)".into()
    } else {
        path.to_string()
    }
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a number",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

/// The known name closest to a misspelt one, when it is close enough to be a typo.
fn closest<'a>(name: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (edit_distance(&name.to_lowercase(), &k.to_lowercase()), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min()
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let current = row[j + 1];
            row[j + 1] = if ca == *cb {
                previous
            } else {
                1 + previous.min(row[j]).min(row[j + 1])
            };
            previous = current;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reports_each_violation_with_its_path() {
        let schema = json!({
            "type": "object",
            "required": ["spec"],
            "properties": {"spec": {
                "type": "object",
                "required": ["size"],
                "properties": {
                    "size": {"x-kubernetes-int-or-string": true, "pattern": "^[0-9]+Gi$"},
                    "count": {"type": "integer", "minimum": 1, "maximum": 4},
                    "mode": {"type": "string", "enum": ["nat", "bridge"], "maxLength": 6},
                    "items": {"type": "array", "maxItems": 1, "items": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 3}}}}
                }
            }}
        });
        let value = json!({"spec": {"size": "lots", "count": 9, "mode": "natural", "items": [{"name": "long"}, {"nmae": "x"}], "extra": true}});
        let errors = SchemaValidator::new().validate(&schema, &value);
        let text: Vec<String> = errors
            .iter()
            .map(|e| format!("{}: {}", e.path, e.message))
            .collect();
        let joined = text.join("\n");
        for expected in [
            "spec.size: `lots` does not match",
            "spec.count: must be at most 4",
            "spec.mode: unsupported value \"natural\": must be one of nat, bridge",
            "spec.items: must have at most 1 items",
            "spec.items[0].name: must be at most 3 characters long",
            "spec.items[1].nmae: unknown field `nmae` (did you mean `name`?)",
            "spec.extra: unknown field `extra`",
        ] {
            assert!(
                joined.contains(expected),
                "missing `{expected}` in:\n{joined}"
            );
        }
        assert!(
            !joined.contains("spec.mode: must be at most"),
            "one message for a value outside the enum:\n{joined}"
        );
        let missing = SchemaValidator::new().validate(&schema, &json!({"spec": {"count": "two"}}));
        assert!(
            missing
                .iter()
                .any(|e| e.path == "spec.size" && e.message == "required field is missing")
        );
        assert!(
            missing.iter().any(
                |e| e.path == "spec.count" && e.message == "must be an integer, found a string"
            )
        );
    }
}
