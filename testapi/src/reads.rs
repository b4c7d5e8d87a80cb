//! get and list: selectors, `limit`/`continue` pages, and the metadata-only forms
//! (`PartialObjectMetadata[List]`) that kube's `list_metadata` and metadata watchers ask for.

use base64::Engine;
use serde_json::{Value, json};

use crate::resources::ResourceType;
use crate::selector::Selector;
use crate::status::ApiError;
use crate::store::{Key, Store};

/// One object.
pub fn get(
    store: &Store,
    rt: &ResourceType,
    namespace: &str,
    name: &str,
) -> Result<Value, ApiError> {
    let key = Key {
        group: rt.group.clone(),
        plural: rt.plural.clone(),
        namespace: namespace.to_string(),
        name: name.to_string(),
    };
    store
        .objects
        .get(&key)
        .cloned()
        .ok_or_else(|| ApiError::not_found(rt, name))
}

/// A list request.
#[derive(Debug, Clone, Default)]
pub struct ListRequest {
    /// Namespace ("" for all).
    pub namespace: String,
    /// Selectors.
    pub selector: Selector,
    /// `limit` (0: none).
    pub limit: usize,
    /// `continue`.
    pub continue_token: Option<String>,
}

/// The objects of `rt` that the request selects, in key order, and the list's metadata.
pub fn list(store: &Store, rt: &ResourceType, request: &ListRequest) -> Result<Value, ApiError> {
    let start = match &request.continue_token {
        Some(token) => Some(decode_continue(token)?),
        None => None,
    };
    let mut items = Vec::new();
    let mut next = None;
    for (key, object) in &store.objects {
        if key.group != rt.group || key.plural != rt.plural {
            continue;
        }
        if !request.namespace.is_empty() && key.namespace != request.namespace {
            continue;
        }
        let position = format!("{}/{}", key.namespace, key.name);
        if start.as_ref().is_some_and(|s| position <= *s) {
            continue;
        }
        if !request.selector.matches(object) {
            continue;
        }
        if request.limit > 0 && items.len() == request.limit {
            next = items.last().map(|o: &Value| {
                format!(
                    "{}/{}",
                    o["metadata"]["namespace"].as_str().unwrap_or_default(),
                    o["metadata"]["name"].as_str().unwrap_or_default()
                )
            });
            break;
        }
        items.push(object.clone());
    }
    let mut metadata = json!({"resourceVersion": store.rv.to_string()});
    if let Some(position) = next {
        metadata["continue"] = json!(encode_continue(store.rv, &position));
    }
    Ok(json!({
        "apiVersion": rt.api_version(),
        "kind": format!("{}List", rt.kind),
        "metadata": metadata,
        "items": items,
    }))
}

fn encode_continue(rv: u64, position: &str) -> String {
    let token = json!({"v": "meta.k8s.io/v1", "rv": rv, "start": format!("{position}\u{0}")});
    base64::engine::general_purpose::URL_SAFE.encode(token.to_string())
}

fn decode_continue(token: &str) -> Result<String, ApiError> {
    let bad = || {
        ApiError::bad_request(
            "continue key is not valid: incorrect encoded start resourceVersion (version meta.k8s.io/v1)",
        )
    };
    let bytes = base64::engine::general_purpose::URL_SAFE
        .decode(token)
        .map_err(|_| bad())?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    value["start"]
        .as_str()
        .map(|s| s.trim_end_matches('\u{0}').to_string())
        .ok_or_else(bad)
}

/// Whether an `Accept` header asks for metadata only.
pub fn wants_metadata(accept: &str) -> bool {
    accept.contains("as=PartialObjectMetadata")
}

/// An object as `PartialObjectMetadata`.
pub fn partial(object: &Value) -> Value {
    json!({
        "apiVersion": "meta.k8s.io/v1",
        "kind": "PartialObjectMetadata",
        "metadata": object.get("metadata").cloned().unwrap_or_else(|| json!({})),
    })
}

/// A list as `PartialObjectMetadataList`.
pub fn partial_list(list: &Value) -> Value {
    let items: Vec<Value> = list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(partial)
        .collect();
    json!({
        "apiVersion": "meta.k8s.io/v1",
        "kind": "PartialObjectMetadataList",
        "metadata": list["metadata"],
        "items": items,
    })
}
