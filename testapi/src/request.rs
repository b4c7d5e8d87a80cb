//! What a request asks for, parsed as `endpoints/request/requestinfo.go` does: the API
//! prefix, group and version, an optional namespace, the resource, name and subresource, and
//! the verb (a GET without a name is `list`, or `watch` with `watch=true`; a DELETE without a
//! name is `deletecollection`).

use std::collections::BTreeMap;

/// A parsed request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestInfo {
    /// Whether the path names a resource (as opposed to `/version`, `/apis`, …).
    pub is_resource: bool,
    /// The Kubernetes verb.
    pub verb: String,
    /// API group ("" for core).
    pub group: String,
    /// API version.
    pub version: String,
    /// Resource (plural).
    pub resource: String,
    /// Subresource, if any.
    pub subresource: String,
    /// Namespace, if any.
    pub namespace: String,
    /// Name, if any.
    pub name: String,
    /// The user the bearer token names.
    pub identity: String,
    /// `fieldManager` query parameter.
    pub field_manager: Option<String>,
    /// The path.
    pub path: String,
    /// Decoded query parameters.
    pub query: BTreeMap<String, String>,
}

/// Decodes `a=b&c=d` with percent-escapes and `+` as space.
pub fn parse_query(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match u8::from_str_radix(&text[i + 1..i + 3], 16) {
                Ok(b) => {
                    out.push(b);
                    i += 2;
                }
                Err(_) => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses `method path?query`; `identity` comes from the bearer token.
pub fn parse(method: &str, path: &str, query: &str, identity: &str) -> RequestInfo {
    let query = parse_query(query);
    let mut info = RequestInfo {
        identity: identity.to_string(),
        path: path.to_string(),
        field_manager: query.get("fieldManager").cloned(),
        verb: method.to_lowercase(),
        ..RequestInfo::default()
    };
    let parts: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|p| !p.is_empty())
        .collect();
    let rest: &[&str] = match parts.as_slice() {
        ["api", version, rest @ ..] if !rest.is_empty() => {
            info.version = version.to_string();
            rest
        }
        ["apis", group, version, rest @ ..] if !rest.is_empty() => {
            info.group = group.to_string();
            info.version = version.to_string();
            rest
        }
        _ => {
            info.query = query;
            return info;
        }
    };
    info.is_resource = true;
    let mut rest = rest;
    if rest.first() == Some(&"namespaces") && rest.len() > 1 {
        info.namespace = rest[1].to_string();
        if rest.len() > 2 && rest[2] != "status" && rest[2] != "finalize" {
            rest = &rest[2..];
        }
    }
    info.resource = rest.first().map(|s| s.to_string()).unwrap_or_default();
    info.name = rest.get(1).map(|s| s.to_string()).unwrap_or_default();
    info.subresource = rest.get(2..).map(|s| s.join("/")).unwrap_or_default();
    let watch = query.get("watch").is_some_and(|w| w == "true" || w == "1");
    info.verb = match (method, info.name.is_empty()) {
        ("GET", true) if watch => "watch",
        ("GET", true) => "list",
        ("GET", false) => "get",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "deletecollection",
        ("DELETE", false) => "delete",
        _ => "unknown",
    }
    .to_string();
    info.query = query;
    info
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_parse_as_the_request_info_factory_does() {
        let i = parse(
            "GET",
            "/apis/virtkube.io/v1alpha1/namespaces/ns/domains",
            "watch=true&labelSelector=a%3Db",
            "u",
        );
        assert_eq!(
            (
                i.verb.as_str(),
                i.group.as_str(),
                i.resource.as_str(),
                i.namespace.as_str()
            ),
            ("watch", "virtkube.io", "domains", "ns")
        );
        assert_eq!(i.query["labelSelector"], "a=b");
        let i = parse(
            "PATCH",
            "/apis/virtkube.io/v1alpha1/networks/n/status",
            "",
            "u",
        );
        assert_eq!(
            (i.verb.as_str(), i.name.as_str(), i.subresource.as_str()),
            ("patch", "n", "status")
        );
        let i = parse("GET", "/api/v1/namespaces/default", "", "u");
        assert_eq!(
            (i.resource.as_str(), i.name.as_str(), i.namespace.as_str()),
            ("namespaces", "default", "default")
        );
        let i = parse("DELETE", "/api/v1/namespaces/x/events", "", "u");
        assert_eq!(i.verb, "deletecollection");
        assert!(!parse("GET", "/apis", "", "u").is_resource);
    }
}
