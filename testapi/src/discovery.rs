//! Discovery documents: `/version`, `/api`, `/api/v1`, `/apis`, `/apis/GROUP` and
//! `/apis/GROUP/VERSION`, enough for kube's `discovery` and `Discovery::run()`.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use crate::resources::{Registry, ResourceType};

/// The Kubernetes version the server claims (what k8s-openapi's `v1_37` speaks).
pub fn version() -> Value {
    json!({
        "major": "1", "minor": "37", "gitVersion": "v1.37.0+virtkube-testapi",
        "gitCommit": "", "gitTreeState": "clean", "buildDate": "1970-01-01T00:00:00Z",
        "goVersion": "none", "compiler": "rustc", "platform": "linux/amd64"
    })
}

const VERBS: [&str; 8] = [
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

fn resource_list(registry: &Registry, group: &str, version: &str) -> Option<Value> {
    let types: Vec<&ResourceType> = registry
        .all()
        .iter()
        .filter(|t| t.group == group && t.version == version)
        .collect();
    if types.is_empty() {
        return None;
    }
    let mut resources = Vec::new();
    for t in types {
        let mut r = json!({
            "name": t.plural, "singularName": t.singular, "namespaced": t.namespaced,
            "kind": t.kind, "verbs": VERBS,
        });
        if !t.short_names.is_empty() {
            r["shortNames"] = json!(t.short_names);
        }
        if !t.categories.is_empty() {
            r["categories"] = json!(t.categories);
        }
        resources.push(r);
        if t.status_subresource {
            resources.push(json!({
                "name": format!("{}/status", t.plural), "singularName": "", "namespaced": t.namespaced,
                "kind": t.kind, "verbs": ["get", "patch", "update"],
            }));
        }
    }
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources}),
    )
}

fn group_doc(registry: &Registry, group: &str) -> Option<Value> {
    let versions: BTreeSet<&str> = registry
        .all()
        .iter()
        .filter(|t| t.group == group)
        .map(|t| t.version.as_str())
        .collect();
    let first = versions.iter().next()?;
    let list: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
        .collect();
    Some(json!({
        "kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": list,
        "preferredVersion": {"groupVersion": format!("{group}/{first}"), "version": first},
    }))
}

/// The document at `path`, if it is a discovery path.
pub fn document(registry: &Registry, path: &str, server: &str) -> Option<Value> {
    let parts: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|p| !p.is_empty())
        .collect();
    match parts.as_slice() {
        ["version"] => Some(version()),
        ["api"] => Some(json!({
            "kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server}],
        })),
        ["api", version] => resource_list(registry, "", version),
        ["apis"] => {
            let groups: BTreeSet<&str> = registry
                .all()
                .iter()
                .filter(|t| !t.group.is_empty())
                .map(|t| t.group.as_str())
                .collect();
            let docs: Vec<Value> = groups
                .into_iter()
                .filter_map(|g| group_doc(registry, g))
                .map(|mut d| {
                    if let Some(m) = d.as_object_mut() {
                        m.remove("kind");
                        m.remove("apiVersion");
                    }
                    d
                })
                .collect();
            Some(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": docs}))
        }
        ["apis", group] => group_doc(registry, group),
        ["apis", group, version] => resource_list(registry, group, version),
        ["healthz"] | ["readyz"] | ["livez"] => Some(Value::String("ok".into())),
        _ => None,
    }
}
