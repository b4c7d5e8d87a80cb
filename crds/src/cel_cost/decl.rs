//! A schema node as the API server declares it to CEL, with the worst-case size its cost
//! estimator assumes for it (apiextensions-apiserver `pkg/apiserver/schema/cel/model/schemas.go`,
//! `SchemaDeclType`, and apiserver `pkg/cel/types.go` for the minimum serialized sizes).

use std::collections::BTreeMap;
use std::rc::Rc;

use serde_json::Value;

use super::limits::MAX_REQUEST_SIZE_BYTES;

/// The size the estimator gives a string with no `maxLength` (the request size less `""`).
pub(crate) const UNBOUNDED_STRING: u64 = MAX_REQUEST_SIZE_BYTES - 2;

// Minimum serialized sizes in JSON (apiserver `pkg/cel/types.go`): they bound how many
// items of an unbounded list fit into one request.
const MIN_STRING_SIZE: u64 = 2;
const MIN_BOOL_SIZE: u64 = 4;
const MIN_NUMBER_SIZE: u64 = 1;
const MIN_DURATION_SIZE: u64 = 3;
const DATE_SIZE: u64 = 12;
const MIN_DATETIME_SIZE: u64 = 21;
const MAX_DURATION_SIZE: u64 = 32;
const MAX_DATETIME_SIZE: u64 = 32;
const MIN_CONTAINER_SIZE: u64 = 2;

/// What a schema node holds, as CEL sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Bool,
    Int,
    Double,
    String,
    Bytes,
    Duration,
    Timestamp,
    /// `x-kubernetes-int-or-string`: an int or a string, known only at run time.
    Dyn,
    List,
    Map,
    Object,
}

/// One schema node's declaration.
#[derive(Debug)]
pub(crate) struct Decl {
    pub kind: Kind,
    /// The API server's `MaxElements`: bytes of a string (`maxLength` × 4, a code point taking
    /// up to 4 bytes), items of a list, entries of a map; 0 for numbers, booleans and objects.
    pub max_elements: u64,
    /// Whether `max_elements` comes from the schema (`maxLength`, `maxItems`,
    /// `maxProperties`, a date format) rather than from the request-size fallback.
    pub bounded: bool,
    /// The smallest this value can be in JSON.
    pub min_serialized_size: u64,
    /// An object's properties.
    pub fields: BTreeMap<String, Rc<Decl>>,
    /// A list's items or a map's values.
    pub elem: Option<Rc<Decl>>,
    /// Where the node is (`spec.disks[].volume`), for messages.
    pub path: String,
}

impl Decl {
    /// The declaration of `schema` (an `openAPIV3Schema` node) found at `path`, or `None` when
    /// the API server does not expose it to CEL (no type, an array without items).
    /// `resource_root` adds what every resource root has (`apiVersion`, `kind`,
    /// `metadata.name`, `metadata.generateName`).
    pub fn of(schema: &Value, path: &str, resource_root: bool) -> Option<Rc<Decl>> {
        let int_or_string = schema.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true));
        if int_or_string {
            return Some(Rc::new(Decl::leaf(
                Kind::Dyn,
                UNBOUNDED_STRING,
                false,
                MIN_NUMBER_SIZE,
                path,
            )));
        }
        let decl = match schema.get("type").and_then(Value::as_str)? {
            "boolean" => Decl::leaf(Kind::Bool, 0, true, MIN_BOOL_SIZE, path),
            "integer" => Decl::leaf(Kind::Int, 0, true, MIN_NUMBER_SIZE, path),
            "number" => Decl::leaf(Kind::Double, 0, true, MIN_NUMBER_SIZE, path),
            "string" => Decl::string(schema, path),
            "array" => {
                let items = Decl::of(schema.get("items")?, &format!("{path}[]"), false)?;
                let (max, bounded) = match uint(schema, "maxItems") {
                    Some(max) => (max, true),
                    None => (UNBOUNDED_STRING / (items.min_serialized_size + 1), false),
                };
                Decl {
                    elem: Some(items),
                    ..Decl::leaf(Kind::List, max, bounded, MIN_CONTAINER_SIZE, path)
                }
            }
            "object" => match schema.get("additionalProperties").filter(|a| a.is_object()) {
                Some(values) => {
                    let values = Decl::of(values, &format!("{path}{{}}"), false)?;
                    let (max, bounded) = match uint(schema, "maxProperties") {
                        Some(max) => (max, true),
                        // Key, quotes, colon, comma and the smallest value.
                        None => (UNBOUNDED_STRING / (values.min_serialized_size + 6), false),
                    };
                    Decl {
                        elem: Some(values),
                        ..Decl::leaf(Kind::Map, max, bounded, MIN_CONTAINER_SIZE, path)
                    }
                }
                None => Decl::object(schema, path, resource_root),
            },
            _ => return None,
        };
        Some(Rc::new(decl))
    }

    /// The key of a map: the API server declares it as a plain string with no size.
    pub fn map_key(&self) -> Rc<Decl> {
        Rc::new(Decl::leaf(
            Kind::String,
            0,
            true,
            MIN_STRING_SIZE,
            &format!("{}{{key}}", self.path),
        ))
    }

    /// The first string, list or map at or below this node whose size the schema leaves
    /// unbounded, if any.
    pub fn first_unbounded(&self) -> Option<&Decl> {
        if !self.bounded {
            return Some(self);
        }
        self.elem
            .iter()
            .chain(self.fields.values())
            .find_map(|child| child.first_unbounded())
    }

    /// What this node is, in a message (`a string without maxLength`).
    pub fn unbounded_what(&self) -> &'static str {
        match self.kind {
            Kind::String | Kind::Bytes => "a string without maxLength",
            Kind::List => "a list without maxItems",
            Kind::Map => "a map without maxProperties",
            Kind::Dyn => "an int-or-string (a string of any length)",
            _ => "a value without a size limit",
        }
    }

    /// What `max_elements` counts, in a message.
    pub fn unit(&self) -> &'static str {
        match self.kind {
            Kind::List => "items",
            Kind::Map => "entries",
            _ => "bytes",
        }
    }

    /// The schema keyword that bounds this node, in a message.
    pub fn limit_keyword(&self) -> &'static str {
        match self.kind {
            Kind::List => "maxItems",
            Kind::Map => "maxProperties",
            Kind::Dyn => "a pattern and maxLength, or no rule on it",
            _ => "maxLength",
        }
    }

    fn leaf(kind: Kind, max_elements: u64, bounded: bool, min_size: u64, path: &str) -> Decl {
        Decl {
            kind,
            max_elements,
            bounded,
            min_serialized_size: min_size,
            fields: BTreeMap::new(),
            elem: None,
            path: path.to_string(),
        }
    }

    fn string(schema: &Value, path: &str) -> Decl {
        let max_length = uint(schema, "maxLength");
        match schema.get("format").and_then(Value::as_str) {
            Some("byte") => Decl::leaf(
                Kind::Bytes,
                max_length.unwrap_or(UNBOUNDED_STRING),
                max_length.is_some(),
                MIN_STRING_SIZE,
                path,
            ),
            Some("duration") => Decl::leaf(
                Kind::Duration,
                MAX_DURATION_SIZE,
                true,
                MIN_DURATION_SIZE,
                path,
            ),
            Some("date") => Decl::leaf(Kind::Timestamp, DATE_SIZE, true, DATE_SIZE, path),
            Some("date-time") => Decl::leaf(
                Kind::Timestamp,
                MAX_DATETIME_SIZE,
                true,
                MIN_DATETIME_SIZE,
                path,
            ),
            // An `enum` does not bound the size: Kubernetes 1.24 ignores it here.
            _ => match max_length {
                Some(max) => Decl::leaf(
                    Kind::String,
                    max.saturating_mul(4),
                    true,
                    MIN_STRING_SIZE,
                    path,
                ),
                None => Decl::leaf(Kind::String, UNBOUNDED_STRING, false, MIN_STRING_SIZE, path),
            },
        }
    }

    fn object(schema: &Value, path: &str, resource_root: bool) -> Decl {
        let required: Vec<&str> = schema
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let mut fields = BTreeMap::new();
        let mut min_size = MIN_CONTAINER_SIZE;
        for (name, property) in schema
            .get("properties")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            let child_path = if path.is_empty() {
                name.clone()
            } else {
                format!("{path}.{name}")
            };
            let Some(field) = Decl::of(property, &child_path, false) else {
                continue;
            };
            // Only required fields without a default are always in the JSON.
            if required.contains(&name.as_str()) && property.get("default").is_none() {
                min_size += name.len() as u64 + field.min_serialized_size + 4;
            }
            fields.insert(name.clone(), field);
        }
        if resource_root {
            let unbounded_string = |name: &str| {
                Rc::new(Decl::leaf(
                    Kind::String,
                    UNBOUNDED_STRING,
                    false,
                    MIN_STRING_SIZE,
                    name,
                ))
            };
            for name in ["apiVersion", "kind"] {
                fields
                    .entry(name.to_string())
                    .or_insert_with(|| unbounded_string(name));
            }
            fields.entry("metadata".to_string()).or_insert_with(|| {
                let mut metadata =
                    Decl::leaf(Kind::Object, 0, true, MIN_CONTAINER_SIZE, "metadata");
                for name in ["name", "generateName"] {
                    metadata.fields.insert(
                        name.to_string(),
                        unbounded_string(&format!("metadata.{name}")),
                    );
                }
                Rc::new(metadata)
            });
        }
        Decl {
            fields,
            ..Decl::leaf(Kind::Object, 0, true, min_size, path)
        }
    }
}

fn uint(schema: &Value, key: &str) -> Option<u64> {
    let value = schema.get(key)?;
    // Negative limits count as zero, as in the API server.
    value
        .as_u64()
        .or_else(|| value.as_i64().map(|_| 0))
        .or_else(|| value.as_f64().map(|f| f.max(0.0) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sizes_follow_the_api_server() {
        let schema = json!({
            "type": "object",
            "required": ["name", "count"],
            "properties": {
                "name": {"type": "string", "maxLength": 63},
                "free": {"type": "string"},
                "count": {"type": "integer"},
                "when": {"type": "string", "format": "date-time"},
                "tags": {"type": "array", "maxItems": 8, "items": {"type": "string", "maxLength": 10}},
                "any": {"type": "array", "items": {"type": "integer"}},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "size": {"x-kubernetes-int-or-string": true}
            }
        });
        let decl = Decl::of(&schema, "spec", false).unwrap();
        let field = |name: &str| decl.fields[name].clone();
        assert_eq!(field("name").max_elements, 252);
        assert!(field("name").bounded);
        assert_eq!(field("free").max_elements, 3_145_726);
        assert!(!field("free").bounded);
        assert_eq!(field("count").max_elements, 0);
        assert_eq!(field("when").max_elements, 32);
        assert_eq!(field("tags").max_elements, 8);
        // (3 MiB - 2) / (1 + 1): an integer is at least one byte, plus a comma.
        assert_eq!(field("any").max_elements, 1_572_863);
        // (3 MiB - 2) / (2 + 6): the smallest string value plus key, quotes, colon, comma.
        assert_eq!(field("labels").max_elements, 393_215);
        assert_eq!(field("size").kind, Kind::Dyn);
        // {} plus "name":"" and "count":0, each with quotes, colon and comma.
        assert_eq!(decl.min_serialized_size, 2 + (4 + 2 + 4) + (5 + 1 + 4));
        assert_eq!(decl.first_unbounded().unwrap().path, "spec.any");
        assert_eq!(
            field("tags").first_unbounded().map(|d| d.path.clone()),
            None
        );
    }

    #[test]
    fn a_resource_root_has_type_and_object_meta() {
        let decl = Decl::of(&json!({"type": "object"}), "", true).unwrap();
        assert!(decl.fields.contains_key("kind"));
        assert!(decl.fields["metadata"].fields.contains_key("generateName"));
    }
}
