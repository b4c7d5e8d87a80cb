//! An in-memory Kubernetes API server for virtkube's tests, benchmarks and CI scripts.
//!
//! No Kubernetes API server can run on the machines virtkube is built on, yet several of
//! virtkube's guarantees rest on how the real server behaves: a placement claim written with
//! a resourceVersion precondition so two agents cannot both win, per-node status entries
//! owned by per-node server-side-apply field managers, finalizers changed with JSON-patch
//! `test`, watches that restart after 410, recovery after an outage. Wherever such a
//! guarantee rests on the server, this one is as strict as the real one, and its tests
//! (`tests/strictness.rs`) test that strictness itself through kube's own client.
//!
//! ```no_run
//! # async fn demo() -> Result<(), virtkube_testapi::Error> {
//! let api = virtkube_testapi::TestApi::start().await?;
//! let client = api.client("admin").await?;          // a kube::Client, bearer token "admin"
//! api.write_kubeconfig(std::path::Path::new("/tmp/kc"), &["admin"])?; // for a child process
//! api.create_namespace("demo")?;
//! api.stop().await;                                  // connection refused, store kept
//! api.restart().await?;                              // same port, same objects
//! # Ok(()) }
//! ```
//!
//! See README.md for what is modelled and, as important, what is not.

pub mod admission;
pub mod discovery;
pub mod faults;
pub mod fieldset;
pub mod kubeconfig;
pub mod openapi;
pub mod rbac;
pub mod reads;
pub mod record;
pub mod request;
pub mod resources;
pub mod schema;
pub mod selector;
pub mod server;
pub mod ssa;
pub mod status;
pub mod store;
pub mod watch;
pub mod writes;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

pub use faults::Answer;
pub use rbac::{Authorizer, PolicyRule};
pub use record::Recorded;
pub use request::RequestInfo;
pub use status::ApiError;
pub use store::{Change, ChangeType};

use resources::ResourceType;
use server::{Running, Settings, Shared};
use store::{Key, Store};
use writes::{FieldValidation, PatchOptions, PatchType, WriteRequest};

/// The identity (bearer token) allowed everything when RBAC is on.
pub const ADMIN: &str = "admin";

/// The field manager of the user-like helpers ([`TestApi::create`], [`TestApi::edit_spec`], …).
pub const USER_MANAGER: &str = "testapi-user";

/// Why the server could not start or serve a helper call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A kubeconfig could not be written or used.
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    /// kube refused the configuration.
    #[error("building a kube client: {0}")]
    Client(#[from] kube::Error),
    /// A helper named a resource the server does not serve.
    #[error(
        "no resource {0:?} is served (use a plural such as `domains`, or `events.events.k8s.io`)"
    )]
    UnknownResource(String),
    /// The server refused a helper's write.
    #[error("the server refused: {0}")]
    Api(#[from] ApiError),
    /// RBAC YAML could not be read.
    #[error(transparent)]
    Rbac(#[from] rbac::RbacError),
}

/// How to start a server.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to listen (`127.0.0.1:0`: any free port).
    pub addr: SocketAddr,
    /// Serve virtkube's CRDs (off: test the agent's "CRDs are not installed" message).
    pub with_crds: bool,
    /// Changes kept for watches to resume from.
    pub history_window: usize,
    /// Bookmark period for watches that allow bookmarks (the real server: about a minute).
    pub bookmark_interval: Duration,
    /// Watch length when the client sets no `timeoutSeconds` (the real server: 30–60 min).
    pub default_watch_timeout: Duration,
    /// RBAC; `None` lets every identity do everything.
    pub authorizer: Option<Authorizer>,
    /// ValidatingAdmissionPolicies in force (none by default).
    pub admission: std::sync::Arc<admission::Policies>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            with_crds: true,
            history_window: store::DEFAULT_HISTORY,
            bookmark_interval: Duration::from_secs(5),
            default_watch_timeout: Duration::from_secs(1800),
            authorizer: None,
            admission: Default::default(),
        }
    }
}

/// A running (or stopped) server and its store.
pub struct TestApi {
    shared: Arc<Shared>,
    addr: SocketAddr,
    running: tokio::sync::Mutex<Option<Running>>,
}

impl TestApi {
    /// Starts a server on a free loopback port with the default [`Config`].
    pub async fn start() -> Result<TestApi, Error> {
        Self::start_with(Config::default()).await
    }

    /// Starts a server.
    pub async fn start_with(config: Config) -> Result<TestApi, Error> {
        let listener = tokio::net::TcpListener::bind(config.addr)
            .await
            .map_err(|source| Error::Bind {
                addr: config.addr,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| Error::Bind {
            addr: config.addr,
            source,
        })?;
        let registry = resources::Registry::new(config.with_crds);
        let mut store = Store::new(config.history_window);
        store.admission = config.admission.clone();
        seed(&mut store, &registry, config.with_crds);
        let settings = Settings {
            bookmark_interval: config.bookmark_interval,
            default_watch_timeout: config.default_watch_timeout,
        };
        let shared = Arc::new(Shared::new(
            store,
            registry,
            config.authorizer,
            settings,
            addr,
        ));
        let running = Running::start(shared.clone(), listener);
        Ok(TestApi {
            shared,
            addr,
            running: tokio::sync::Mutex::new(Some(running)),
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube client that authenticates as `identity` (its bearer token).
    pub async fn client(&self, identity: &str) -> Result<kube::Client, Error> {
        kubeconfig::client(&self.url(), identity).await
    }

    /// Writes a kubeconfig with one user (bearer token) per identity; the first is current.
    pub fn write_kubeconfig(&self, path: &Path, identities: &[&str]) -> Result<(), Error> {
        kubeconfig::write(path, &self.url(), identities)
    }

    /// Closes the listener and drops every open connection, watches included: clients see
    /// connection refused until [`TestApi::restart`]. The store is kept.
    pub async fn stop(&self) {
        if let Some(running) = self.running.lock().await.take() {
            running.stop().await;
        }
    }

    /// Serves again on the same address, with the same store.
    pub async fn restart(&self) -> Result<(), Error> {
        let mut running = self.running.lock().await;
        if running.is_some() {
            return Ok(());
        }
        let listener = tokio::net::TcpListener::bind(self.addr)
            .await
            .map_err(|source| Error::Bind {
                addr: self.addr,
                source,
            })?;
        *running = Some(Running::start(self.shared.clone(), listener));
        Ok(())
    }

    /// Hangs the server (connections are accepted, nothing is answered, watches stall) or
    /// lets it go on.
    pub fn hang(&self, hung: bool) {
        self.shared.faults.set_hung(hung);
    }

    /// Answers the next `count` requests that `matches` selects with `answer`.
    pub fn inject(
        &self,
        count: usize,
        answer: Answer,
        matches: impl Fn(&RequestInfo) -> bool + Send + Sync + 'static,
    ) {
        self.shared.faults.inject(count, answer, Box::new(matches));
    }

    /// Drops the watch history: a watch from any earlier resourceVersion gets 410.
    pub fn compact(&self) {
        self.shared.lock_store().compact();
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.recorder.all()
    }

    /// Request counts by (verb, resource[/subresource]).
    pub fn request_counts(&self) -> std::collections::BTreeMap<(String, String), u64> {
        self.shared.recorder.counts()
    }

    /// Forgets the requests (and authorization checks) recorded so far.
    pub fn clear_requests(&self) {
        self.shared.recorder.clear();
        self.shared.authorizations.clear();
    }

    /// Every authorization check so far, as (identity, verb, group, resource, subresource,
    /// …): one per resource request, plus a `create` for each server-side apply that created
    /// its object (the real server authorizes that as `create` as well as `patch`). Recorded
    /// whether or not RBAC is enforced, so a test can compare the verbs a client needs with a
    /// role's rules.
    pub fn authorizations(&self) -> Vec<Recorded> {
        self.shared.authorizations.all()
    }

    /// Every write a ValidatingAdmissionPolicy denied: (user, `resource[/subresource]
    /// namespace/name`, the server's message).
    pub fn admission_denials(&self) -> Vec<(String, String, String)> {
        self.shared.lock_store().admission_denials.clone()
    }

    /// The last resourceVersion handed out.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock_store().rv
    }

    /// The changes after `rv` still in the history.
    pub fn changes_since(&self, rv: u64) -> Vec<Change> {
        let store = self.shared.lock_store();
        match store.since(rv) {
            Ok((changes, _)) => changes.iter().map(|c| (**c).clone()).collect(),
            Err(_) => Vec::new(),
        }
    }

    fn resource(&self, resource: &str) -> Result<ResourceType, Error> {
        let found = match resource.split_once('.') {
            Some((plural, group)) => self
                .shared
                .registry
                .all()
                .iter()
                .find(|t| t.plural == plural && t.group == group),
            None => self.shared.registry.by_plural(resource),
        };
        found
            .cloned()
            .ok_or_else(|| Error::UnknownResource(resource.to_string()))
    }

    fn user_write<'a>(rt: &'a ResourceType, namespace: &'a str) -> WriteRequest<'a> {
        WriteRequest {
            rt,
            namespace,
            subresource: None,
            manager: USER_MANAGER.to_string(),
            field_validation: FieldValidation::Strict,
            user: None,
        }
    }

    /// Creates an object as a user would (`kubectl create`); its namespace must exist.
    pub fn create(&self, resource: &str, object: Value) -> Result<Value, Error> {
        let rt = self.resource(resource)?;
        let namespace = if rt.namespaced {
            object["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string()
        } else {
            String::new()
        };
        let mut store = self.shared.lock_store();
        Ok(writes::create(
            &mut store,
            &Self::user_write(&rt, &namespace),
            object,
        )?)
    }

    /// Creates a namespace unless it exists.
    pub fn create_namespace(&self, name: &str) -> Result<(), Error> {
        if self.get("namespaces", "", name).is_some() {
            return Ok(());
        }
        self.create(
            "namespaces",
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}),
        )?;
        Ok(())
    }

    /// Changes an object's spec through `edit`, as `kubectl edit` would (an update with the
    /// resourceVersion read, so generation and ownership follow).
    pub fn edit_spec(
        &self,
        resource: &str,
        namespace: &str,
        name: &str,
        edit: impl FnOnce(&mut Value),
    ) -> Result<Value, Error> {
        let rt = self.resource(resource)?;
        let mut store = self.shared.lock_store();
        let mut object = reads::get(&store, &rt, namespace, name)?;
        if !object.get("spec").is_some_and(Value::is_object) {
            object["spec"] = json!({});
        }
        edit(&mut object["spec"]);
        Ok(writes::update(
            &mut store,
            &Self::user_write(&rt, namespace),
            name,
            object,
        )?)
    }

    /// Sets (`Some`) or removes (`None`) labels with a merge patch, as `kubectl label` does.
    pub fn patch_labels(
        &self,
        resource: &str,
        namespace: &str,
        name: &str,
        labels: &[(&str, Option<&str>)],
    ) -> Result<Value, Error> {
        let rt = self.resource(resource)?;
        let map: serde_json::Map<String, Value> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.map_or(Value::Null, |v| json!(v))))
            .collect();
        let body = json!({"metadata": {"labels": map}}).to_string();
        let mut store = self.shared.lock_store();
        let (_, object) = writes::patch(
            &mut store,
            &Self::user_write(&rt, namespace),
            name,
            PatchType::Merge,
            body.as_bytes(),
            &PatchOptions::default(),
        )?;
        Ok(object)
    }

    /// Deletes an object as `kubectl delete --wait=false` does: marked while finalizers
    /// remain, gone otherwise.
    pub fn delete(&self, resource: &str, namespace: &str, name: &str) -> Result<Value, Error> {
        let rt = self.resource(resource)?;
        let mut store = self.shared.lock_store();
        Ok(writes::delete(&mut store, &rt, namespace, name, &json!({}))?.1)
    }

    /// The object, if it exists.
    pub fn get(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        let rt = self.resource(resource).ok()?;
        reads::get(&self.shared.lock_store(), &rt, namespace, name).ok()
    }

    /// Every object of a resource, in key order.
    pub fn list(&self, resource: &str) -> Vec<Value> {
        let Ok(rt) = self.resource(resource) else {
            return Vec::new();
        };
        let store = self.shared.lock_store();
        store
            .objects
            .iter()
            .filter(|(k, _)| k.group == rt.group && k.plural == rt.plural)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// How many objects of a resource exist.
    pub fn count(&self, resource: &str) -> usize {
        self.list(resource).len()
    }

    /// Every Event (events.k8s.io and core), in key order.
    pub fn events(&self) -> Vec<Value> {
        let mut all = self.list("events.events.k8s.io");
        all.extend(self.list("events"));
        all
    }
}

/// What a fresh cluster has: its namespaces and, when served, virtkube's CRDs.
fn seed(store: &mut Store, registry: &resources::Registry, with_crds: bool) {
    let stamp = writes::now();
    let put = |store: &mut Store, key: Key, object: Value| {
        let mut object = object;
        object["metadata"]["uid"] = json!(store.next_uid());
        object["metadata"]["creationTimestamp"] = json!(stamp);
        store.commit(key, Some(object));
    };
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        put(
            store,
            Key {
                group: String::new(),
                plural: "namespaces".into(),
                namespace: String::new(),
                name: ns.into(),
            },
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns},
                   "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}),
        );
    }
    if with_crds && registry.by_plural("domains").is_some() {
        for mut crd in resources::virtkube_crd_objects() {
            let name = crd["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            crd["metadata"]["generation"] = json!(1);
            crd["status"] = json!({"conditions": [
                {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": stamp},
                {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": stamp}],
                "acceptedNames": crd["spec"]["names"].clone(), "storedVersions": ["v1alpha1"]});
            put(
                store,
                Key {
                    group: "apiextensions.k8s.io".into(),
                    plural: "customresourcedefinitions".into(),
                    namespace: String::new(),
                    name,
                },
                crd,
            );
        }
    }
}
