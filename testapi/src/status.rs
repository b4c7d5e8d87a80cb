//! Refusals as the API server words them: a `metav1.Status` with the code, reason, message
//! and causes that `k8s.io/apimachinery/pkg/api/errors` builds for the same case, so a client
//! (kube's `Error::Api`, kube-runtime's watcher) sees exactly what a real server would send.

use http::StatusCode;
use serde_json::{Value, json};

use crate::resources::ResourceType;

/// One field-level cause of an `Invalid` (422) or a field-manager conflict (409).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cause {
    /// `FieldValueInvalid`, `FieldValueRequired`, `FieldValueForbidden`,
    /// `FieldValueDuplicate`, `FieldManagerConflict`, …
    pub kind: String,
    /// What is wrong.
    pub message: String,
    /// The field, as the server prints it (`spec.cpu.vcpus`, `.spec.state`).
    pub field: String,
}

/// A refusal, ready to be sent as a `Status` object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status code.
    pub code: u16,
    /// `NotFound`, `AlreadyExists`, `Conflict`, `Invalid`, `Expired`, `Forbidden`, …
    pub reason: String,
    /// The sentence a client shows.
    pub message: String,
    /// `details`: the object's name, group and kind, when known.
    pub details: Option<Box<Details>>,
    /// `details.causes`.
    pub causes: Vec<Cause>,
    /// `details.retryAfterSeconds`, sent also as a `Retry-After` header.
    pub retry_after: Option<u64>,
}

/// The object an error is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Details {
    /// `metadata.name`, possibly empty.
    pub name: String,
    /// API group (empty for the core group).
    pub group: String,
    /// The resource (plural) for most errors, the kind for `Invalid`.
    pub kind: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.code, self.reason, self.message)
    }
}

impl std::error::Error for ApiError {}

/// `group/resource` as `GroupResource.String()` prints it: `domains.virtkube.io`, `nodes`.
pub fn group_resource(rt: &ResourceType) -> String {
    if rt.group.is_empty() {
        rt.plural.clone()
    } else {
        format!("{}.{}", rt.plural, rt.group)
    }
}

impl ApiError {
    fn new(code: StatusCode, reason: &str, message: String) -> Self {
        ApiError {
            code: code.as_u16(),
            reason: reason.to_string(),
            message,
            details: None,
            causes: Vec::new(),
            retry_after: None,
        }
    }

    fn about(mut self, rt: &ResourceType, name: &str) -> Self {
        self.details = Some(Box::new(Details {
            name: name.to_string(),
            group: rt.group.clone(),
            kind: rt.plural.clone(),
        }));
        self
    }

    /// `errors.NewNotFound`: `domains.virtkube.io "vm" not found`.
    pub fn not_found(rt: &ResourceType, name: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("{} \"{name}\" not found", group_resource(rt)),
        )
        .about(rt, name)
    }

    /// A path the server does not serve (no such group, version or resource).
    pub fn no_route() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource".into(),
        )
    }

    /// The `NamespaceLifecycle` admission plugin's refusal to create in a missing namespace.
    pub fn namespace_not_found(namespace: &str) -> Self {
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("namespaces \"{namespace}\" not found"),
        );
        e.details = Some(Box::new(Details {
            name: namespace.to_string(),
            group: String::new(),
            kind: "namespaces".into(),
        }));
        e
    }

    /// `errors.NewAlreadyExists`.
    pub fn already_exists(rt: &ResourceType, name: &str) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", group_resource(rt)),
        )
        .about(rt, name)
    }

    /// `errors.NewConflict`: `Operation cannot be fulfilled on …: <why>`.
    pub fn conflict(rt: &ResourceType, name: &str, why: &str) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": {why}",
                group_resource(rt)
            ),
        )
        .about(rt, name)
    }

    /// The optimistic-concurrency refusal (`storage.NewResourceVersionConflictsError` as the
    /// registry rewrites it).
    pub fn stale(rt: &ResourceType, name: &str) -> Self {
        Self::conflict(
            rt,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    /// `errors.NewApplyConflict`, from the field manager's conflict list.
    pub fn apply_conflict(rt: &ResourceType, name: &str, causes: Vec<Cause>) -> Self {
        let count = causes.len();
        let lines: Vec<String> = causes
            .iter()
            .map(|c| format!("{}: {}", c.message, c.field))
            .collect();
        let message = if count == 1 {
            format!("Apply failed with 1 conflict: {}", lines.join(""))
        } else {
            format!("Apply failed with {count} conflicts: {}", lines.join("\n"))
        };
        let mut e = Self::new(StatusCode::CONFLICT, "Conflict", message).about(rt, name);
        e.causes = causes;
        e
    }

    /// `errors.NewInvalid`: `Domain.virtkube.io "vm" is invalid: [spec.x: …, …]`.
    pub fn invalid(kind: &str, group: &str, name: &str, causes: Vec<Cause>) -> Self {
        let qualified = if group.is_empty() {
            kind.to_string()
        } else {
            format!("{kind}.{group}")
        };
        let parts: Vec<String> = causes
            .iter()
            .map(|c| {
                if c.field.is_empty() {
                    c.message.clone()
                } else {
                    format!("{}: {}", c.field, c.message)
                }
            })
            .collect();
        let joined = if parts.len() == 1 {
            parts[0].clone()
        } else {
            format!("[{}]", parts.join(", "))
        };
        let mut e = Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            format!("{qualified} \"{name}\" is invalid: {joined}"),
        );
        e.details = Some(Box::new(Details {
            name: name.to_string(),
            group: group.to_string(),
            kind: kind.to_string(),
        }));
        e.causes = causes;
        e
    }

    /// A 422 with no reason, as `errors.NewGenericServerResponse(422, …)` builds for a failed
    /// JSON patch (`handlers/patch.go`).
    pub fn unprocessable(message: String) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "", message)
    }

    /// `errors.NewBadRequest`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BadRequest", message.into())
    }

    /// `negotiation.NewUnsupportedMediaTypeError`.
    pub fn unsupported_media_type(accepted: &[&str]) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: {}",
                accepted.join(", ")
            ),
        )
    }

    /// `errors.NewMethodNotSupported`.
    pub fn method_not_supported(rt: &ResourceType, verb: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!(
                "{verb} is not supported on resources of kind \"{}\"",
                rt.plural
            ),
        )
        .about(rt, "")
    }

    /// `errors.NewResourceExpired` (410), what the watch cache sends for a too-old
    /// resourceVersion and what an expired continue token gets.
    pub fn expired(message: String) -> Self {
        Self::new(StatusCode::GONE, "Expired", message)
    }

    /// `errors.NewForbidden`, with the authorizer's sentence.
    pub fn forbidden(resource: &str, name: &str, why: &str) -> Self {
        let message = if resource.is_empty() {
            format!("forbidden: {why}")
        } else if name.is_empty() {
            format!("{resource} is forbidden: {why}")
        } else {
            format!("{resource} \"{name}\" is forbidden: {why}")
        };
        Self::new(StatusCode::FORBIDDEN, "Forbidden", message)
    }

    /// 401 for a bearer token nobody issued.
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "Unauthorized".into(),
        )
    }

    /// An injected or internal failure with any code (429, 500, 503, …).
    pub fn with_code(code: u16, message: &str) -> Self {
        let reason = match code {
            429 => "TooManyRequests",
            500 => "InternalError",
            503 => "ServiceUnavailable",
            504 => "Timeout",
            409 => "Conflict",
            _ => "",
        };
        ApiError {
            code,
            reason: reason.to_string(),
            message: message.to_string(),
            details: None,
            causes: Vec::new(),
            retry_after: None,
        }
    }

    /// The `Status` object.
    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "code": self.code,
        });
        if !self.reason.is_empty() {
            status["reason"] = json!(self.reason);
        }
        let mut details = serde_json::Map::new();
        if let Some(d) = &self.details {
            if !d.name.is_empty() {
                details.insert("name".into(), json!(d.name));
            }
            if !d.group.is_empty() {
                details.insert("group".into(), json!(d.group));
            }
            details.insert("kind".into(), json!(d.kind));
        }
        if !self.causes.is_empty() {
            let causes: Vec<Value> = self
                .causes
                .iter()
                .map(|c| json!({"reason": c.kind, "message": c.message, "field": c.field}))
                .collect();
            details.insert("causes".into(), Value::Array(causes));
        }
        if let Some(secs) = self.retry_after {
            details.insert("retryAfterSeconds".into(), json!(secs));
        }
        if !details.is_empty() {
            status["details"] = Value::Object(details);
        }
        status
    }
}
