//! Label and field selectors, parsed and matched as `k8s.io/apimachinery/pkg/labels`
//! (`selector.go`: `=`, `==`, `!=`, `in`, `notin`, `key`, `!key`, comma meaning AND) and
//! `pkg/fields` (`metadata.name`, `metadata.namespace` with `=`, `==`, `!=`) do.

use std::collections::BTreeMap;

use serde_json::Value;

/// One requirement of a label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    /// `key=value` or `key==value`.
    Equals(String, String),
    /// `key!=value`: also true when the key is absent.
    NotEquals(String, String),
    /// `key in (a,b)`.
    In(String, Vec<String>),
    /// `key notin (a,b)`: also true when the key is absent.
    NotIn(String, Vec<String>),
    /// `key`.
    Exists(String),
    /// `!key`.
    DoesNotExist(String),
}

/// A parsed label selector: every requirement must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(pub Vec<Requirement>);

impl LabelSelector {
    /// Parses the `labelSelector` query value.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut out = Vec::new();
        for term in split_terms(text) {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            out.push(parse_term(term)?);
        }
        Ok(LabelSelector(out))
    }

    /// Whether an object with `labels` is selected.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|l| vs.contains(l)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|l| !vs.contains(l)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }
}

/// Splits on commas outside parentheses (`a in (x,y),b` is two terms).
fn split_terms(text: &str) -> Vec<String> {
    let mut terms = Vec::new();
    let mut depth = 0;
    let mut current = String::new();
    for c in text.chars() {
        match c {
            '(' => {
                depth += 1;
                current.push(c)
            }
            ')' => {
                depth -= 1;
                current.push(c)
            }
            ',' if depth == 0 => terms.push(std::mem::take(&mut current)),
            _ => current.push(c),
        }
    }
    terms.push(current);
    terms
}

fn parse_term(term: &str) -> Result<Requirement, String> {
    let valid_key = |k: &str| {
        !k.is_empty()
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
    };
    if let Some(key) = term.strip_prefix('!') {
        let key = key.trim();
        return if valid_key(key) {
            Ok(Requirement::DoesNotExist(key.to_string()))
        } else {
            Err(format!("invalid label key {key:?}"))
        };
    }
    for (op, make) in [
        (
            "!=",
            Requirement::NotEquals as fn(String, String) -> Requirement,
        ),
        ("==", Requirement::Equals),
        ("=", Requirement::Equals),
    ] {
        if let Some((k, v)) = term.split_once(op) {
            let (k, v) = (k.trim(), v.trim());
            if !valid_key(k) {
                return Err(format!("invalid label key {k:?}"));
            }
            return Ok(make(k.to_string(), v.to_string()));
        }
    }
    let words: Vec<&str> = term.splitn(2, char::is_whitespace).collect();
    if words.len() == 2 {
        let (key, rest) = (words[0].trim(), words[1].trim());
        let set = |rest: &str, op: &str| -> Result<Vec<String>, String> {
            let inner = rest
                .strip_prefix(op)
                .map(str::trim)
                .and_then(|r| r.strip_prefix('('))
                .and_then(|r| r.strip_suffix(')'))
                .ok_or_else(|| format!("expected `{op} (…)` in {term:?}"))?;
            Ok(inner
                .split(',')
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
                .collect())
        };
        if !valid_key(key) {
            return Err(format!("invalid label key {key:?}"));
        }
        if rest.starts_with("notin") {
            return Ok(Requirement::NotIn(key.into(), set(rest, "notin")?));
        }
        if rest.starts_with("in") {
            return Ok(Requirement::In(key.into(), set(rest, "in")?));
        }
        return Err(format!("unable to parse requirement {term:?}"));
    }
    if valid_key(term) {
        Ok(Requirement::Exists(term.to_string()))
    } else {
        Err(format!("unable to parse requirement {term:?}"))
    }
}

/// A field selector: `metadata.name` and `metadata.namespace` (what every resource
/// supports) and the field labels the kind declares ([`field_labels`]). Each term is the
/// field's JSON pointer, whether it must equal (`=`, `==`) or differ (`!=`), and the value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(pub Vec<(String, bool, String)>);

/// The field labels a kind supports beyond `metadata.name` and `metadata.namespace`, with
/// the JSON pointer each selects on. As in the real server: core Events
/// (`pkg/registry/core/event/strategy.go` `ToSelectableFields`), events.k8s.io Events (the
/// same fields under their events.k8s.io names, `pkg/apis/events/v1/conversion.go`
/// `AddFieldLabelConversionsForEvent`) and Nodes (`spec.unschedulable`,
/// `pkg/registry/core/node/strategy.go`). Custom resources have none (no
/// `selectableFields` in virtkube's CRDs).
pub fn field_labels(api_version: &str, kind: &str) -> &'static [(&'static str, &'static str)] {
    match (api_version, kind) {
        ("v1", "Event") => &[
            ("involvedObject.kind", "/involvedObject/kind"),
            ("involvedObject.namespace", "/involvedObject/namespace"),
            ("involvedObject.name", "/involvedObject/name"),
            ("involvedObject.uid", "/involvedObject/uid"),
            ("involvedObject.apiVersion", "/involvedObject/apiVersion"),
            (
                "involvedObject.resourceVersion",
                "/involvedObject/resourceVersion",
            ),
            ("involvedObject.fieldPath", "/involvedObject/fieldPath"),
            ("reason", "/reason"),
            ("reportingComponent", "/reportingComponent"),
            ("source", "/source/component"),
            ("type", "/type"),
        ],
        ("events.k8s.io/v1", "Event") => &[
            ("regarding.kind", "/regarding/kind"),
            ("regarding.namespace", "/regarding/namespace"),
            ("regarding.name", "/regarding/name"),
            ("regarding.uid", "/regarding/uid"),
            ("regarding.apiVersion", "/regarding/apiVersion"),
            ("regarding.resourceVersion", "/regarding/resourceVersion"),
            ("regarding.fieldPath", "/regarding/fieldPath"),
            ("reason", "/reason"),
            ("reportingController", "/reportingController"),
            ("type", "/type"),
        ],
        ("v1", "Node") => &[("spec.unschedulable", "/spec/unschedulable")],
        _ => &[],
    }
}

impl FieldSelector {
    /// Parses the `fieldSelector` query value for a kind with the extra field labels
    /// `labels` ([`field_labels`]); other fields are refused as the real server refuses a
    /// field label it does not support.
    pub fn parse(text: &str, labels: &[(&str, &str)]) -> Result<Self, String> {
        let mut out = Vec::new();
        for term in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (field, equal, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, true, v)
            } else {
                return Err(format!("invalid selector: '{term}'"));
            };
            let field = field.trim();
            let pointer = match field {
                "metadata.name" => "/metadata/name",
                "metadata.namespace" => "/metadata/namespace",
                other => labels
                    .iter()
                    .find(|(label, _)| *label == other)
                    .map(|(_, pointer)| *pointer)
                    .ok_or_else(|| format!("field label not supported: {field}"))?,
            };
            out.push((pointer.to_string(), equal, value.trim().to_string()));
        }
        Ok(FieldSelector(out))
    }

    /// Whether `object` is selected. A missing field reads as the empty string, and
    /// booleans as `true`/`false`, as the real server's `fields.Set` holds them.
    pub fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(pointer, equal, value)| {
            let actual = match object.pointer(pointer) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Bool(b)) => b.to_string(),
                Some(Value::Null) | None if pointer == "/spec/unschedulable" => "false".into(),
                Some(Value::Null) | None => String::new(),
                Some(other) => other.to_string(),
            };
            (actual == *value) == *equal
        })
    }
}

/// The labels of an object.
pub fn labels_of(object: &Value) -> BTreeMap<String, String> {
    object
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

/// A label selector and a field selector together.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    /// `labelSelector`.
    pub labels: LabelSelector,
    /// `fieldSelector`.
    pub fields: FieldSelector,
}

impl Selector {
    /// Whether `object` is selected by both.
    pub fn matches(&self, object: &Value) -> bool {
        self.labels.matches(&labels_of(object)) && self.fields.matches(object)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn every_operator_matches_as_apimachinery_does() {
        let l = labels(&[("app", "web"), ("tier", "front")]);
        let cases = [
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("missing!=x", true),
            ("app in (web,db)", true),
            ("app notin (web)", false),
            ("missing notin (web)", true),
            ("tier", true),
            ("!tier", false),
            ("!missing", true),
            ("app=web,tier in (front)", true),
            ("app=web,tier=back", false),
            ("", true),
        ];
        for (text, expected) in cases {
            let s = LabelSelector::parse(text).unwrap();
            assert_eq!(s.matches(&l), expected, "{text}");
        }
    }

    #[test]
    fn malformed_selectors_are_refused() {
        assert!(LabelSelector::parse("app in web").is_err());
        assert!(LabelSelector::parse("a b c").is_err());
        assert!(FieldSelector::parse("spec.nodeName=x", &[]).is_err());
        assert!(FieldSelector::parse("regarding.name=x", field_labels("v1", "Event")).is_err());
    }

    #[test]
    fn field_selectors_on_name_and_namespace() {
        let obj = serde_json::json!({"metadata": {"name": "a", "namespace": "n"}});
        assert!(
            FieldSelector::parse("metadata.name=a", &[])
                .unwrap()
                .matches(&obj)
        );
        assert!(
            !FieldSelector::parse("metadata.name!=a", &[])
                .unwrap()
                .matches(&obj)
        );
        assert!(
            FieldSelector::parse("metadata.namespace==n,metadata.name=a", &[])
                .unwrap()
                .matches(&obj)
        );
    }

    #[test]
    fn field_selectors_on_the_kinds_own_fields() {
        let event = serde_json::json!({"metadata": {"name": "e", "namespace": "n"},
            "regarding": {"kind": "Domain", "name": "web"}, "reason": "Started"});
        let labels = field_labels("events.k8s.io/v1", "Event");
        let sel = |t: &str| FieldSelector::parse(t, labels).unwrap().matches(&event);
        assert!(sel("regarding.name=web"));
        assert!(sel(
            "regarding.name=web,regarding.kind=Domain,reason=Started"
        ));
        assert!(!sel("regarding.name=db"));
        assert!(sel("regarding.name!=db"));
        assert!(sel("regarding.namespace="));
        let node = serde_json::json!({"metadata": {"name": "a"}});
        let nodes = field_labels("v1", "Node");
        assert!(
            FieldSelector::parse("spec.unschedulable=false", nodes)
                .unwrap()
                .matches(&node)
        );
        let cordoned =
            serde_json::json!({"metadata": {"name": "a"}, "spec": {"unschedulable": true}});
        assert!(
            FieldSelector::parse("spec.unschedulable=true", nodes)
                .unwrap()
                .matches(&cordoned)
        );
    }
}
