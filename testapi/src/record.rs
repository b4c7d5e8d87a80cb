//! Every request as (identity, verb, group, resource, subresource, namespace, name, field
//! manager), for benchmarks ("how many status writes per object") and RBAC tests ("which
//! verbs does the agent use").

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use crate::request::RequestInfo;

/// One request, as the authorizer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// The user the bearer token names (`system:anonymous` without one).
    pub identity: String,
    /// get, list, watch, create, update, patch, delete, deletecollection (or the HTTP
    /// method, lower-case, for non-resource paths).
    pub verb: String,
    /// API group.
    pub group: String,
    /// Resource (plural); empty for non-resource paths.
    pub resource: String,
    /// Subresource (`status`), if any.
    pub subresource: String,
    /// Namespace, if any.
    pub namespace: String,
    /// Name, if any.
    pub name: String,
    /// `fieldManager`, if given.
    pub field_manager: String,
    /// The path, for non-resource requests.
    pub path: String,
    /// When it arrived (its body read, before it was answered): benchmarks put the requests
    /// about one object on a timeline.
    pub at: Instant,
}

impl Recorded {
    /// Built from a parsed request.
    pub fn from_info(info: &RequestInfo) -> Self {
        Recorded {
            identity: info.identity.clone(),
            verb: info.verb.clone(),
            group: info.group.clone(),
            resource: info.resource.clone(),
            subresource: info.subresource.clone(),
            namespace: info.namespace.clone(),
            name: info.name.clone(),
            field_manager: info.field_manager.clone().unwrap_or_default(),
            path: info.path.clone(),
            at: Instant::now(),
        }
    }
}

/// The log of requests.
#[derive(Default)]
pub struct Recorder {
    log: Mutex<Vec<Recorded>>,
}

impl Recorder {
    /// Adds one request.
    pub fn record(&self, r: Recorded) {
        if let Ok(mut log) = self.log.lock() {
            log.push(r);
        }
    }

    /// Every request so far.
    pub fn all(&self) -> Vec<Recorded> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Forgets the requests so far (e.g. after a set-up phase).
    pub fn clear(&self) {
        if let Ok(mut log) = self.log.lock() {
            log.clear();
        }
    }

    /// Counts by (verb, resource[/subresource]).
    pub fn counts(&self) -> BTreeMap<(String, String), u64> {
        let mut out = BTreeMap::new();
        for r in self.all() {
            let resource = if r.subresource.is_empty() {
                r.resource.clone()
            } else {
                format!("{}/{}", r.resource, r.subresource)
            };
            *out.entry((r.verb.clone(), resource)).or_insert(0) += 1;
        }
        out
    }
}
