//! OpenAPI v3 discovery: `/openapi/v3` (the index of group-versions) and
//! `/openapi/v3/api/v1`, `/openapi/v3/apis/GROUP/VERSION` (one document per group-version).
//!
//! What kubectl reads there: before it creates or applies an object with validation on (the
//! default, `--validate=strict`), it looks up the object's group-version document and checks
//! that the PATCH operation tagged with the object's `x-kubernetes-group-version-kind` takes
//! the `fieldValidation` query parameter (`resource.NewQueryParamVerifierV3`). When it does,
//! kubectl leaves validation to the server (`fieldValidation=Strict`); when the document is
//! missing, kubectl fails with "failed to download openapi". The real server's documents
//! carry every path, operation and schema (`kube-openapi` `builder3`); these carry the paths
//! and operations of the served kinds with their query parameters, and no schemas (the
//! server validates custom resources itself, `fieldValidation` included).

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::resources::{Registry, ResourceType};

/// The `/openapi/v3` path of a group-version (`api/v1`, `apis/virtkube.io/v1alpha1`).
fn gv_path(t: &ResourceType) -> String {
    if t.group.is_empty() {
        format!("api/{}", t.version)
    } else {
        format!("apis/{}/{}", t.group, t.version)
    }
}

/// The index: every group-version and the URL of its document. The real server appends a
/// content hash (`?hash=…`) so that clients may cache the documents; the registry never
/// changes while the server runs, so a fixed one keeps that promise.
fn index(registry: &Registry) -> Value {
    let mut paths = serde_json::Map::new();
    for t in registry.all() {
        let p = gv_path(t);
        paths.insert(
            p.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{p}?hash=virtkube-testapi")}),
        );
    }
    json!({"paths": paths})
}

fn query(name: &str) -> Value {
    json!({"name": name, "in": "query", "schema": {"type": "string", "uniqueItems": true}})
}

/// One operation on `t` (`x-kubernetes-action` as the real server names it).
fn operation(t: &ResourceType, action: &str, params: &[&str]) -> Value {
    json!({
        "operationId": format!("{action}{}", t.kind),
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": {"group": t.group, "version": t.version, "kind": t.kind},
        "parameters": params.iter().map(|p| query(p)).collect::<Vec<_>>(),
        "responses": {"200": {"description": "OK"}},
    })
}

/// The document of one group-version: the collection and item paths of each kind (and its
/// `/status`), with the verbs the server serves and their query parameters.
fn group_version(registry: &Registry, path: &str) -> Option<Value> {
    let types: Vec<&ResourceType> = registry
        .all()
        .iter()
        .filter(|t| gv_path(t) == path)
        .collect();
    if types.is_empty() {
        return None;
    }
    const WRITE: [&str; 3] = ["dryRun", "fieldManager", "fieldValidation"];
    const PATCH: [&str; 4] = ["dryRun", "fieldManager", "fieldValidation", "force"];
    const LIST: [&str; 8] = [
        "allowWatchBookmarks",
        "continue",
        "fieldSelector",
        "labelSelector",
        "limit",
        "resourceVersion",
        "timeoutSeconds",
        "watch",
    ];
    let mut paths = BTreeMap::new();
    for t in types {
        let base = if t.namespaced {
            format!("/{path}/namespaces/{{namespace}}/{}", t.plural)
        } else {
            format!("/{path}/{}", t.plural)
        };
        paths.insert(
            base.clone(),
            json!({
                "get": operation(t, "list", &LIST),
                "post": operation(t, "post", &WRITE),
                "delete": operation(t, "deletecollection", &["dryRun"]),
            }),
        );
        let item = format!("{base}/{{name}}");
        paths.insert(
            item.clone(),
            json!({
                "get": operation(t, "get", &[]),
                "put": operation(t, "put", &WRITE),
                "patch": operation(t, "patch", &PATCH),
                "delete": operation(t, "delete", &["dryRun"]),
            }),
        );
        if t.status_subresource {
            paths.insert(
                format!("{item}/status"),
                json!({
                    "get": operation(t, "get", &[]),
                    "put": operation(t, "put", &WRITE),
                    "patch": operation(t, "patch", &PATCH),
                }),
            );
        }
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": crate::discovery::version()["gitVersion"]},
        "paths": paths,
        "components": {},
    }))
}

/// The document at `path` (without its query), if it is an OpenAPI v3 path.
pub fn document(registry: &Registry, path: &str) -> Option<Value> {
    let rest = path.trim_end_matches('/').strip_prefix("/openapi/v3")?;
    match rest.strip_prefix('/') {
        None if rest.is_empty() => Some(index(registry)),
        Some(gv) => group_version(registry, gv),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_index_names_every_group_version_and_its_document() {
        let registry = Registry::new(true);
        let doc = document(&registry, "/openapi/v3").unwrap();
        let url = doc["paths"]["apis/virtkube.io/v1alpha1"]["serverRelativeURL"]
            .as_str()
            .unwrap();
        assert!(url.starts_with("/openapi/v3/apis/virtkube.io/v1alpha1?hash="));
        assert!(doc["paths"]["api/v1"].is_object());
        assert!(doc["paths"]["apis/events.k8s.io/v1"].is_object());
        assert!(document(&registry, "/openapi/v3/apis/nothing.io/v1").is_none());
        assert!(document(&registry, "/openapi/v2").is_none());
    }

    /// What kubectl's `supportsQueryParamV3` looks for: a PATCH operation tagged with the
    /// kind that takes `fieldValidation` in the query.
    #[test]
    fn each_kind_has_a_patch_taking_field_validation() {
        let registry = Registry::new(true);
        for (gv, kind) in [
            ("apis/virtkube.io/v1alpha1", "Domain"),
            ("apis/virtkube.io/v1alpha1", "StoragePool"),
            ("api/v1", "Node"),
        ] {
            let doc = document(&registry, &format!("/openapi/v3/{gv}")).unwrap();
            let found = doc["paths"].as_object().unwrap().values().any(|p| {
                let op = &p["patch"];
                op["x-kubernetes-group-version-kind"]["kind"] == kind
                    && op["parameters"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|q| q["name"] == "fieldValidation" && q["in"] == "query")
            });
            assert!(found, "{gv} {kind}");
        }
    }
}
