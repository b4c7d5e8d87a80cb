//! The write verbs and the strategy every write goes through, as the generic registry
//! (`registry/generic/registry/store.go`, `registry/rest/{create,update,delete}.go`) and
//! apiextensions-apiserver's `customresource/strategy.go` apply them:
//!
//! - create: `AlreadyExists` (409); uid, creationTimestamp, generation 1; `generateName`;
//!   status dropped when the kind has a status subresource; the namespace must exist
//!   (`NamespaceLifecycle` admission).
//! - update: `resourceVersion` required for custom resources (`AllowUnconditionalUpdate`
//!   false) and compared (409 on mismatch); a status write changes only status, a main write
//!   never status; generation + 1 when anything outside metadata and status changed; no new
//!   finalizers once deletion started (`ValidateNoNewFinalizers`, 422); an update that leaves
//!   a deleted object with no finalizer removes it; an update that changes nothing writes
//!   nothing (no new resourceVersion, no watch event), as `GuaranteedUpdate` skips equal bytes.
//! - patch: JSON patch (evanphx/json-patch semantics; a failed `test` is 422), merge patch
//!   (whose `metadata.resourceVersion` is then a precondition), strategic merge patch refused
//!   for custom resources (415), server-side apply (see `ssa`).
//! - delete: preconditions (uid, resourceVersion) → 409; with finalizers, `deletionTimestamp`
//!   is set (generation + 1, `markAsDeleting`) and the object stays (202); without, it goes.

use serde_json::{Value, json};

use crate::resources::ResourceType;
use crate::schema;
use crate::ssa::{self, ApplyOutcome, Scope, Writer};
use crate::status::{ApiError, Cause};
use crate::store::{Key, Store};

/// `fieldValidation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FieldValidation {
    /// Unknown fields are dropped silently.
    Ignore,
    /// Unknown fields are dropped (the server's default).
    #[default]
    Warn,
    /// Unknown fields are refused.
    Strict,
}

/// The request a write serves.
#[derive(Debug, Clone)]
pub struct WriteRequest<'a> {
    /// The type.
    pub rt: &'a ResourceType,
    /// Namespace from the URL ("" for cluster-scoped).
    pub namespace: &'a str,
    /// `status` or none.
    pub subresource: Option<&'a str>,
    /// The field manager (explicit, or derived from the user agent).
    pub manager: String,
    /// Unknown-field handling.
    pub field_validation: FieldValidation,
    /// Who writes (`None`: the test harness writing behind the server, which no admission
    /// policy sees).
    pub user: Option<&'a crate::admission::UserInfo>,
}

impl WriteRequest<'_> {
    fn scope(&self) -> Scope {
        if self.subresource == Some("status") {
            Scope::Status
        } else {
            Scope::Main(self.rt.status_subresource)
        }
    }

    fn key(&self, name: &str) -> Key {
        Key {
            group: self.rt.group.clone(),
            plural: self.rt.plural.clone(),
            namespace: self.namespace.to_string(),
            name: name.to_string(),
        }
    }
}

/// The patch formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    /// `application/json-patch+json`.
    Json,
    /// `application/merge-patch+json`.
    Merge,
    /// `application/strategic-merge-patch+json`.
    Strategic,
    /// `application/apply-patch+yaml`.
    Apply,
}

impl PatchType {
    /// From a Content-Type header (parameters ignored).
    pub fn from_content_type(content_type: &str) -> Option<PatchType> {
        match content_type.split(';').next().unwrap_or_default().trim() {
            "application/json-patch+json" => Some(PatchType::Json),
            "application/merge-patch+json" => Some(PatchType::Merge),
            "application/strategic-merge-patch+json" => Some(PatchType::Strategic),
            "application/apply-patch+yaml" => Some(PatchType::Apply),
            _ => None,
        }
    }
}

/// Now, as the server stamps it.
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn meta_str<'v>(object: &'v Value, field: &str) -> Option<&'v str> {
    object.get("metadata")?.get(field)?.as_str()
}

fn finalizers(object: &Value) -> Vec<String> {
    object
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map(|f| {
            f.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn meta_mut(object: &mut Value) -> &mut serde_json::Map<String, Value> {
    if !object.get("metadata").is_some_and(Value::is_object) {
        object["metadata"] = json!({});
    }
    // Just ensured to be an object.
    match object.get_mut("metadata") {
        Some(Value::Object(m)) => m,
        _ => unreachable!("metadata was just made an object"),
    }
}

/// Everything but `metadata` (and `status` when it has its own endpoint): what the
/// generation counts.
fn generation_relevant(object: &Value) -> Value {
    let mut copy = object.clone();
    if let Some(map) = copy.as_object_mut() {
        map.remove("metadata");
    }
    copy
}

/// The object without `managedFields` times, for "did anything change".
fn comparable(object: &Value) -> Value {
    let mut copy = object.clone();
    if let Some(entries) = copy
        .pointer_mut("/metadata/managedFields")
        .and_then(Value::as_array_mut)
    {
        for e in entries {
            if let Some(e) = e.as_object_mut() {
                e.remove("time");
            }
        }
    }
    copy
}

fn check_type(req: &WriteRequest, body: &Value) -> Result<(), ApiError> {
    let expected = req.rt.api_version();
    if let Some(v) = body.get("apiVersion").and_then(Value::as_str)
        && v != expected
    {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({v}) does not match the expected API version ({expected})"
        )));
    }
    if let Some(k) = body.get("kind").and_then(Value::as_str)
        && k != req.rt.kind
    {
        return Err(ApiError::bad_request(format!(
            "the kind in the data ({k}) does not match the expected kind ({})",
            req.rt.kind
        )));
    }
    if let Some(ns) = meta_str(body, "namespace")
        && req.rt.namespaced
        && ns != req.namespace
    {
        return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    Ok(())
}

/// Defaults, prunes and validates a custom resource; nothing for built-in kinds.
fn admit(
    store: &mut Store,
    req: &WriteRequest,
    object: &mut Value,
    old: Option<&Value>,
) -> Result<(), ApiError> {
    let Some(schema) = req.rt.schema.as_ref() else {
        return Ok(());
    };
    let (checked, schema) = (schema, &**schema);
    schema::apply_defaults(schema, object);
    let dropped = schema::prune(schema, object);
    let name = meta_str(object, "name").unwrap_or_default().to_string();
    let mut causes: Vec<Cause> = Vec::new();
    if req.field_validation == FieldValidation::Strict {
        causes.extend(dropped.into_iter().map(|field| Cause {
            kind: "FieldValueInvalid".into(),
            message: format!("unknown field \"{field}\""),
            field,
        }));
    }
    causes.extend(store.checker.check(checked, object, old));
    if !causes.is_empty() {
        return Err(ApiError::invalid(
            &req.rt.kind,
            &req.rt.group,
            &name,
            causes,
        ));
    }
    // Validating admission runs after the object is defaulted and validated, as in the
    // real server's handler chain.
    let Some(user) = req.user else {
        return Ok(());
    };
    let attributes = crate::admission::Attributes {
        operation: if old.is_some() { "UPDATE" } else { "CREATE" },
        group: &req.rt.group,
        version: &req.rt.version,
        resource: &req.rt.plural,
        subresource: req.subresource.unwrap_or_default(),
        namespace: req.namespace,
        name: &name,
        user,
        object: Some(object),
        old_object: old,
    };
    let verdict = store.admission.check(&attributes);
    if let Err(denial) = &verdict {
        let what = format!(
            "{}{} {}/{name}",
            req.rt.plural,
            req.subresource.map(|s| format!("/{s}")).unwrap_or_default(),
            req.namespace
        );
        store
            .admission_denials
            .push((user.username.clone(), what, denial.to_string()));
    }
    verdict.map_err(|denial| {
        ApiError::forbidden(
            &crate::status::group_resource(req.rt),
            &name,
            &denial.to_string(),
        )
    })
}

fn owned_root(rt: &ResourceType) -> &Value {
    &rt.tracking
}

fn writer<'a>(req: &'a WriteRequest, now: &'a str, api_version: &'a str) -> Writer<'a> {
    Writer {
        manager: &req.manager,
        api_version,
        scope: req.scope(),
        now,
    }
}

fn invalid_ownership(req: &WriteRequest, name: &str, why: String) -> ApiError {
    ApiError::invalid(
        &req.rt.kind,
        &req.rt.group,
        name,
        vec![Cause {
            kind: "FieldValueInvalid".into(),
            message: why,
            field: String::new(),
        }],
    )
}

fn generate_name(store: &mut Store, prefix: &str) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let seed = store.next_uid();
    let mut n: u64 = seed.bytes().fold(1469598103934665603, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(1099511628211)
    });
    let mut suffix = String::new();
    for _ in 0..5 {
        suffix.push(ALPHABET[(n % ALPHABET.len() as u64) as usize] as char);
        n /= ALPHABET.len() as u64;
    }
    format!("{prefix}{suffix}")
}

/// Creates an object (POST).
pub fn create(store: &mut Store, req: &WriteRequest, body: Value) -> Result<Value, ApiError> {
    create_with(store, req, body, None)
}

/// Creates `body`; `applied` carries managedFields an apply already computed.
fn create_with(
    store: &mut Store,
    req: &WriteRequest,
    mut body: Value,
    applied: Option<Value>,
) -> Result<Value, ApiError> {
    check_type(req, &body)?;
    if !body.is_object() {
        return Err(ApiError::bad_request("the body must be an object"));
    }
    if meta_str(&body, "resourceVersion").is_some_and(|rv| !rv.is_empty()) {
        return Err(ApiError::bad_request(
            "resourceVersion should not be set on objects to be created",
        ));
    }
    if req.rt.namespaced {
        if req.namespace.is_empty() {
            return Err(ApiError::bad_request(
                "the namespace of the object must be set for a namespaced resource",
            ));
        }
        let ns_key = Key {
            group: String::new(),
            plural: "namespaces".into(),
            namespace: String::new(),
            name: req.namespace.to_string(),
        };
        if !store.objects.contains_key(&ns_key) {
            return Err(ApiError::namespace_not_found(req.namespace));
        }
    }
    let mut name = meta_str(&body, "name").unwrap_or_default().to_string();
    if name.is_empty() {
        match meta_str(&body, "generateName") {
            Some(prefix) if !prefix.is_empty() => {
                let prefix = prefix.to_string();
                name = generate_name(store, &prefix);
            }
            _ => {
                return Err(ApiError::invalid(
                    &req.rt.kind,
                    &req.rt.group,
                    "",
                    vec![Cause {
                        kind: "FieldValueRequired".into(),
                        message: "Required value: name or generateName is required".into(),
                        field: "metadata.name".into(),
                    }],
                ));
            }
        }
    }
    let problems = schema::name_problems(&name);
    if !problems.is_empty() {
        return Err(ApiError::invalid(
            &req.rt.kind,
            &req.rt.group,
            &name,
            problems,
        ));
    }
    let key = req.key(&name);
    if store.objects.contains_key(&key) {
        return Err(ApiError::already_exists(req.rt, &name));
    }
    body["apiVersion"] = json!(req.rt.api_version());
    body["kind"] = json!(req.rt.kind);
    let stamp = now();
    let uid = store.next_uid();
    {
        let meta = meta_mut(&mut body);
        meta.insert("name".into(), json!(name));
        if req.rt.namespaced {
            meta.insert("namespace".into(), json!(req.namespace));
        } else {
            meta.remove("namespace");
        }
        meta.insert("uid".into(), json!(uid));
        meta.insert("creationTimestamp".into(), json!(stamp));
        for system in [
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "managedFields",
            "selfLink",
        ] {
            meta.remove(system);
        }
        if req.rt.tracks_generation() {
            meta.insert("generation".into(), json!(1));
        } else {
            meta.remove("generation");
        }
    }
    if req.rt.status_subresource
        && let Some(map) = body.as_object_mut()
    {
        map.remove("status");
    }
    admit(store, req, &mut body, None)?;
    match applied {
        Some(managed) => {
            meta_mut(&mut body).insert("managedFields".into(), managed);
        }
        None => {
            let api_version = req.rt.api_version();
            let w = writer(req, &stamp, &api_version);
            ssa::record_update(&json!({}), &mut body, owned_root(req.rt), &w)
                .map_err(|e| invalid_ownership(req, &name, e))?;
        }
    }
    Ok(store.commit(key, Some(body)))
}

/// Preconditions a write carries.
#[derive(Debug, Clone, Default)]
pub struct Preconditions {
    /// `metadata.resourceVersion` the writer saw.
    pub resource_version: Option<String>,
    /// `metadata.uid` the writer saw.
    pub uid: Option<String>,
}

/// Replaces an object (PUT).
pub fn update(
    store: &mut Store,
    req: &WriteRequest,
    name: &str,
    body: Value,
) -> Result<Value, ApiError> {
    check_type(req, &body)?;
    if meta_str(&body, "name") != Some(name) {
        return Err(ApiError::bad_request(
            "the name of the object does not match the name on the URL",
        ));
    }
    let key = req.key(name);
    let Some(old) = store.objects.get(&key).cloned() else {
        return Err(ApiError::not_found(req.rt, name));
    };
    let rv = meta_str(&body, "resourceVersion")
        .unwrap_or_default()
        .to_string();
    if rv.is_empty() && req.rt.custom {
        return Err(ApiError::invalid(
            &req.rt.kind,
            &req.rt.group,
            name,
            vec![Cause {
                kind: "FieldValueInvalid".into(),
                message: "Invalid value: 0x0: must be specified for an update".into(),
                field: "metadata.resourceVersion".into(),
            }],
        ));
    }
    let pre = Preconditions {
        resource_version: (!rv.is_empty()).then_some(rv),
        uid: meta_str(&body, "uid").map(str::to_string),
    };
    finish_update(store, req, key, &old, body, &pre, None)
}

/// The shared tail of every update: preconditions, the strategy, admission, ownership,
/// commit (or deletion when the last finalizer went).
fn finish_update(
    store: &mut Store,
    req: &WriteRequest,
    key: Key,
    old: &Value,
    mut new: Value,
    pre: &Preconditions,
    applied: Option<Value>,
) -> Result<Value, ApiError> {
    let name = key.name.clone();
    if let Some(rv) = &pre.resource_version
        && meta_str(old, "resourceVersion") != Some(rv.as_str())
    {
        return Err(ApiError::stale(req.rt, &name));
    }
    if let Some(uid) = &pre.uid
        && !uid.is_empty()
        && meta_str(old, "uid") != Some(uid.as_str())
    {
        return Err(ApiError::conflict(
            req.rt,
            &name,
            &format!(
                "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                meta_str(old, "uid").unwrap_or_default()
            ),
        ));
    }
    // Strategy: what this endpoint may change.
    if req.scope() == Scope::Status {
        let managed = new.pointer("/metadata/managedFields").cloned();
        let status = new.get("status").cloned();
        new = old.clone();
        match status {
            Some(s) => new["status"] = s,
            None => {
                if let Some(m) = new.as_object_mut() {
                    m.remove("status");
                }
            }
        }
        let meta = meta_mut(&mut new);
        match managed {
            Some(m) => meta.insert("managedFields".into(), m),
            None => meta.remove("managedFields"),
        };
    } else if req.rt.status_subresource {
        match old.get("status") {
            Some(s) => new["status"] = s.clone(),
            None => {
                if let Some(m) = new.as_object_mut() {
                    m.remove("status");
                }
            }
        }
    }
    new["apiVersion"] = json!(req.rt.api_version());
    new["kind"] = json!(req.rt.kind);
    // System fields are the server's.
    {
        let old_meta = old.get("metadata").cloned().unwrap_or_else(|| json!({}));
        let meta = meta_mut(&mut new);
        for system in [
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
            "resourceVersion",
        ] {
            match old_meta.get(system) {
                Some(v) => meta.insert(system.into(), v.clone()),
                None => meta.remove(system),
            };
        }
    }
    if meta_str(old, "deletionTimestamp").is_some() {
        let before = finalizers(old);
        let mut added: Vec<String> = finalizers(&new)
            .into_iter()
            .filter(|f| !before.contains(f))
            .collect();
        added.sort();
        if !added.is_empty() {
            let quoted: Vec<String> = added.iter().map(|f| format!("\"{f}\"")).collect();
            return Err(ApiError::invalid(
                &req.rt.kind,
                &req.rt.group,
                &name,
                vec![Cause {
                    kind: "FieldValueForbidden".into(),
                    message: format!(
                        "Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers []string{{{}}}",
                        quoted.join(", ")
                    ),
                    field: "metadata.finalizers".into(),
                }],
            ));
        }
    }
    admit(store, req, &mut new, Some(old))?;
    // The status strategy never bumps the generation; the main one does when anything
    // outside metadata changed (status is already the old one there when it has its own
    // endpoint).
    if req.rt.tracks_generation()
        && req.scope() != Scope::Status
        && generation_relevant(&new) != generation_relevant(old)
    {
        let generation = old
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(0)
            + 1;
        meta_mut(&mut new).insert("generation".into(), json!(generation));
    }
    let stamp = now();
    match applied {
        Some(managed) => {
            meta_mut(&mut new).insert("managedFields".into(), managed);
        }
        None => {
            let api_version = req.rt.api_version();
            let w = writer(req, &stamp, &api_version);
            ssa::record_update(old, &mut new, owned_root(req.rt), &w)
                .map_err(|e| invalid_ownership(req, &name, e))?;
        }
    }
    if comparable(&new) == comparable(old) {
        return Ok(old.clone());
    }
    let gone = meta_str(&new, "deletionTimestamp").is_some() && finalizers(&new).is_empty();
    if gone {
        store.objects.insert(key.clone(), new);
        return Ok(store.commit(key, None));
    }
    Ok(store.commit(key, Some(new)))
}

/// Options of a PATCH.
#[derive(Debug, Clone, Default)]
pub struct PatchOptions {
    /// `fieldManager` as given.
    pub field_manager: Option<String>,
    /// `force`.
    pub force: Option<bool>,
}

/// Patches an object; returns the HTTP code (201 when an apply created it) and the object.
pub fn patch(
    store: &mut Store,
    req: &WriteRequest,
    name: &str,
    patch_type: PatchType,
    body: &[u8],
    options: &PatchOptions,
) -> Result<(u16, Value), ApiError> {
    if patch_type == PatchType::Strategic && req.rt.custom {
        return Err(ApiError::unsupported_media_type(&[
            "application/json-patch+json",
            "application/merge-patch+json",
            "application/apply-patch+yaml",
        ]));
    }
    // `ValidatePatchOptions`.
    let mut option_causes = Vec::new();
    if patch_type == PatchType::Apply {
        if options
            .field_manager
            .as_deref()
            .unwrap_or_default()
            .is_empty()
        {
            option_causes.push(Cause {
                kind: "FieldValueRequired".into(),
                message: "Required value: is required for apply patch".into(),
                field: "fieldManager".into(),
            });
        }
    } else if options.force.is_some() {
        option_causes.push(Cause {
            kind: "FieldValueForbidden".into(),
            message: "Forbidden: may not be specified for non-apply patch".into(),
            field: "force".into(),
        });
    }
    if !option_causes.is_empty() {
        return Err(ApiError::invalid(
            "PatchOptions",
            "meta.k8s.io",
            "",
            option_causes,
        ));
    }
    let key = req.key(name);
    let current = store.objects.get(&key).cloned();
    if patch_type == PatchType::Apply {
        return apply(
            store,
            req,
            key,
            current,
            body,
            options.force.unwrap_or(false),
        );
    }
    let Some(current) = current else {
        return Err(ApiError::not_found(req.rt, name));
    };
    let patched = match patch_type {
        PatchType::Json => json_patch_of(&current, body)?,
        // Strategic merge patch on a built-in kind: treated as a merge patch (see README).
        _ => {
            let patch: Value =
                serde_json::from_slice(body).map_err(|e| ApiError::bad_request(e.to_string()))?;
            if !patch.is_object() {
                return Err(ApiError::bad_request("a merge patch must be a JSON object"));
            }
            let mut doc = current.clone();
            json_patch::merge(&mut doc, &patch);
            doc
        }
    };
    if meta_str(&patched, "name") != Some(name) {
        return Err(ApiError::bad_request(
            "the name of the object does not match the name on the URL",
        ));
    }
    // The patched object's resourceVersion is the update's precondition: unchanged unless
    // the patch set it (`rest.DefaultUpdatedObjectInfo` then `GuaranteedUpdate`).
    let pre = Preconditions {
        resource_version: meta_str(&patched, "resourceVersion").map(str::to_string),
        uid: meta_str(&patched, "uid").map(str::to_string),
    };
    let object = finish_update(store, req, key, &current, patched, &pre, None)?;
    Ok((200, object))
}

/// Applies an RFC 6902 patch with evanphx/json-patch's semantics (what the API server
/// runs): all or nothing, and a `test` of `null` passes on an absent member, which kube's
/// finalizer helper relies on ("test /metadata/finalizers null, then add").
fn json_patch_of(current: &Value, body: &[u8]) -> Result<Value, ApiError> {
    let ops: json_patch::Patch =
        serde_json::from_slice(body).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let mut doc = current.clone();
    for op in &ops.0 {
        if let json_patch::PatchOperation::Test(test) = op
            && test.value.is_null()
            && doc.pointer(test.path.as_str()).is_none()
        {
            continue;
        }
        json_patch::patch(&mut doc, std::slice::from_ref(op)).map_err(|e| {
            let message = match e.kind {
                json_patch::PatchErrorKind::TestFailed => {
                    format!("testing value {} failed: test failed", op.path())
                }
                _ => format!(
                    "{} operation does not apply: {}: {}",
                    op_name(op),
                    op.path(),
                    e.kind
                ),
            };
            ApiError::unprocessable(message)
        })?;
    }
    Ok(doc)
}

fn op_name(op: &json_patch::PatchOperation) -> &'static str {
    match op {
        json_patch::PatchOperation::Add(_) => "add",
        json_patch::PatchOperation::Remove(_) => "remove",
        json_patch::PatchOperation::Replace(_) => "replace",
        json_patch::PatchOperation::Move(_) => "move",
        json_patch::PatchOperation::Copy(_) => "copy",
        json_patch::PatchOperation::Test(_) => "test",
    }
}

fn apply(
    store: &mut Store,
    req: &WriteRequest,
    key: Key,
    current: Option<Value>,
    body: &[u8],
    force: bool,
) -> Result<(u16, Value), ApiError> {
    let text = std::str::from_utf8(body).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let config: Value = serde_saphyr::from_str(text)
        .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?;
    if !config.is_object() {
        return Err(ApiError::bad_request("error decoding YAML: not an object"));
    }
    for field in ["apiVersion", "kind"] {
        if config
            .get(field)
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            return Err(ApiError::bad_request(format!("{field} must be set")));
        }
    }
    check_type(req, &config)?;
    let named = meta_str(&config, "name");
    if named.is_some_and(|n| n != key.name) || (named.is_none() && current.is_none()) {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({}) does not match the name on the URL ({})",
            named.unwrap_or_default(),
            key.name
        )));
    }
    // Server-side apply types the configuration against the schema: an undeclared field
    // or a duplicate key fails the whole request (500, `structuredmerge.go`).
    let typed_error = |what: String| {
        ApiError::with_code(
            500,
            &format!(
                "failed to create typed patch object ({}/{}; {}, Kind={}): {what}",
                key.namespace,
                key.name,
                req.rt.api_version(),
                req.rt.kind
            ),
        )
    };
    if let Some(schema) = req.rt.schema.as_ref() {
        let mut copy = config.clone();
        if let Some(field) = schema::prune(schema, &mut copy).into_iter().next() {
            return Err(typed_error(format!(
                ".{field}: field not declared in schema"
            )));
        }
    }
    if let Err(e) =
        crate::fieldset::leaves(&config, crate::fieldset::Node(Some(owned_root(req.rt))))
    {
        return Err(typed_error(e));
    }
    let pre = Preconditions {
        resource_version: meta_str(&config, "resourceVersion").map(str::to_string),
        uid: meta_str(&config, "uid").map(str::to_string),
    };
    let stamp = now();
    let api_version = req.rt.api_version();
    let w = writer(req, &stamp, &api_version);
    let root = owned_root(req.rt);
    let scope = req.scope();
    let live = current.clone().unwrap_or_else(|| json!({}));
    let reset = |merged: &mut Value, live: &Value| match scope {
        Scope::Status => {
            let status = merged.get("status").cloned();
            let mut kept = live.clone();
            match status {
                Some(s) => kept["status"] = s,
                None => {
                    if let Some(m) = kept.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
            *merged = kept;
        }
        Scope::Main(true) => match live.get("status") {
            Some(s) => merged["status"] = s.clone(),
            None => {
                if let Some(m) = merged.as_object_mut() {
                    m.remove("status");
                }
            }
        },
        Scope::Main(false) => {}
    };
    let merged = match ssa::apply(&live, &config, root, &w, force, reset)
        .map_err(|e| invalid_ownership(req, &key.name, e))?
    {
        ApplyOutcome::Merged(m) => m,
        ApplyOutcome::Conflicts(causes) => {
            return Err(ApiError::apply_conflict(req.rt, &key.name, causes));
        }
    };
    let managed = merged
        .pointer("/metadata/managedFields")
        .cloned()
        .unwrap_or_else(|| json!([]));
    match current {
        None => {
            if req.scope() == Scope::Status {
                return Err(ApiError::not_found(req.rt, &key.name));
            }
            if pre
                .resource_version
                .as_deref()
                .is_some_and(|rv| !rv.is_empty())
            {
                return Err(ApiError::not_found(req.rt, &key.name));
            }
            let mut merged = merged;
            if let Some(meta) = merged.get_mut("metadata").and_then(Value::as_object_mut) {
                meta.remove("resourceVersion");
                meta.remove("managedFields");
            }
            Ok((201, create_with(store, req, merged, Some(managed))?))
        }
        Some(current) => {
            let object = finish_update(store, req, key, &current, merged, &pre, Some(managed))?;
            Ok((200, object))
        }
    }
}

/// Deletes an object; returns 200 with the object when it is gone, 202 with it while
/// finalizers keep it.
pub fn delete(
    store: &mut Store,
    rt: &ResourceType,
    namespace: &str,
    name: &str,
    options: &Value,
) -> Result<(u16, Value), ApiError> {
    let key = Key {
        group: rt.group.clone(),
        plural: rt.plural.clone(),
        namespace: namespace.to_string(),
        name: name.to_string(),
    };
    let Some(old) = store.objects.get(&key).cloned() else {
        return Err(ApiError::not_found(rt, name));
    };
    let pre = options.get("preconditions");
    if let Some(uid) = pre.and_then(|p| p.get("uid")).and_then(Value::as_str)
        && meta_str(&old, "uid") != Some(uid)
    {
        return Err(ApiError::conflict(
            rt,
            name,
            &format!(
                "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                meta_str(&old, "uid").unwrap_or_default()
            ),
        ));
    }
    if let Some(rv) = pre
        .and_then(|p| p.get("resourceVersion"))
        .and_then(Value::as_str)
        && meta_str(&old, "resourceVersion") != Some(rv)
    {
        return Err(ApiError::conflict(
            rt,
            name,
            &format!(
                "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                meta_str(&old, "resourceVersion").unwrap_or_default()
            ),
        ));
    }
    if finalizers(&old).is_empty() {
        return Ok((200, store.commit(key, None)));
    }
    if meta_str(&old, "deletionTimestamp").is_some() {
        return Ok((202, old));
    }
    let mut marked = old.clone();
    let generation = old.pointer("/metadata/generation").and_then(Value::as_i64);
    let meta = meta_mut(&mut marked);
    meta.insert("deletionTimestamp".into(), json!(now()));
    meta.insert("deletionGracePeriodSeconds".into(), json!(0));
    if let Some(g) = generation.filter(|g| *g > 0) {
        meta.insert("generation".into(), json!(g + 1));
    }
    Ok((202, store.commit(key, Some(marked))))
}
