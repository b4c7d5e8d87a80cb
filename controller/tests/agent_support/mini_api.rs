//! A small in-memory Kubernetes API server for the virtkube kinds, good enough to run the
//! real `virtkube agent` process through whole lifecycles without a cluster: lists, watches
//! (replayed from a change log, then live), JSON patches for finalizers (`test`, `add`,
//! `remove`), merge patches, status patches, deletions that wait for finalizers, and events.
//! Status patches replace the status (one agent, one field manager: what server-side apply
//! would keep).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::response::Response;
use serde_json::{Value, json};
use tokio::sync::broadcast;

/// (plural, namespace or "", name).
pub type Key = (String, String, String);

/// The server's state.
#[derive(Default)]
pub struct Store {
    /// Objects by key.
    pub objects: BTreeMap<Key, Value>,
    /// Last resourceVersion handed out.
    pub rv: u64,
    /// Every change: (rv, plural, type, object).
    pub log: Vec<(u64, String, &'static str, Value)>,
    /// Events received: (regarding name, reason, action, note).
    pub events: Vec<(String, String, String, String)>,
}

/// A running server.
#[derive(Clone)]
pub struct MiniApi {
    /// Its state.
    pub store: Arc<Mutex<Store>>,
    tx: broadcast::Sender<(u64, String, &'static str, Value)>,
    /// Where it listens.
    pub addr: SocketAddr,
}

fn key_of(plural: &str, obj: &Value) -> Key {
    (
        plural.to_string(),
        obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

impl MiniApi {
    /// Starts a server on 127.0.0.1.
    pub async fn start() -> MiniApi {
        let (tx, _) = broadcast::channel(4096);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api = MiniApi {
            store: Arc::default(),
            tx,
            addr: listener.local_addr().unwrap(),
        };
        let app = Router::new().fallback(handle).with_state(api.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        api
    }

    fn record(&self, store: &mut Store, plural: &str, kind: &'static str, obj: Value) {
        store
            .log
            .push((store.rv, plural.to_string(), kind, obj.clone()));
        let _ = self.tx.send((store.rv, plural.to_string(), kind, obj));
    }

    /// Creates `obj` (with uid, generation 1, a resourceVersion), like `kubectl create`.
    pub fn create(&self, plural: &str, mut obj: Value) {
        let mut s = self.store.lock().unwrap();
        s.rv += 1;
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        obj["metadata"]["uid"] = json!(format!("uid-{plural}-{name}"));
        obj["metadata"]["generation"] = json!(1);
        obj["metadata"]["resourceVersion"] = json!(s.rv.to_string());
        s.objects.insert(key_of(plural, &obj), obj.clone());
        self.record(&mut s, plural, "ADDED", obj);
    }

    /// Changes an object's spec through `edit`, bumping its generation, like `kubectl patch`.
    pub fn edit_spec(&self, plural: &str, ns: &str, name: &str, edit: impl FnOnce(&mut Value)) {
        let mut s = self.store.lock().unwrap();
        s.rv += 1;
        let rv = s.rv;
        let key = (plural.to_string(), ns.to_string(), name.to_string());
        let obj = s.objects.get_mut(&key).expect("object exists");
        edit(&mut obj["spec"]);
        let generation = obj["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
        obj["metadata"]["generation"] = json!(generation);
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let obj = obj.clone();
        self.record(&mut s, plural, "MODIFIED", obj);
    }

    /// Deletes an object like `kubectl delete`: marked while finalizers remain.
    pub fn delete(&self, plural: &str, ns: &str, name: &str) {
        let mut s = self.store.lock().unwrap();
        let key = (plural.to_string(), ns.to_string(), name.to_string());
        let Some(mut obj) = s.objects.get(&key).cloned() else {
            return;
        };
        obj["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        self.store_change(&mut s, plural, obj);
    }

    /// Stores a changed object (or removes it when deleted and unfinalized) and logs it.
    fn store_change(&self, s: &mut Store, plural: &str, mut obj: Value) -> Value {
        s.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(s.rv.to_string());
        let key = key_of(plural, &obj);
        let finalizers_left = obj["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if obj["metadata"]["deletionTimestamp"].is_string() && !finalizers_left {
            s.objects.remove(&key);
            self.record(s, plural, "DELETED", obj.clone());
        } else {
            s.objects.insert(key, obj.clone());
            self.record(s, plural, "MODIFIED", obj.clone());
        }
        obj
    }

    /// The object, if it exists.
    pub fn get(&self, plural: &str, ns: &str, name: &str) -> Option<Value> {
        self.store
            .lock()
            .unwrap()
            .objects
            .get(&(plural.to_string(), ns.to_string(), name.to_string()))
            .cloned()
    }

    /// How many objects of `plural` exist.
    pub fn count(&self, plural: &str) -> usize {
        self.store
            .lock()
            .unwrap()
            .objects
            .keys()
            .filter(|k| k.0 == plural)
            .count()
    }
}

fn respond(code: StatusCode, v: &Value) -> Response {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(v.to_string()))
        .unwrap()
}

fn not_found() -> Response {
    respond(
        StatusCode::NOT_FOUND,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "reason": "NotFound", "code": 404, "message": "not found"}),
    )
}

/// Applies a JSON patch limited to what kube's finalizer helper sends.
fn json_patch(obj: &mut Value, ops: &[Value]) -> Result<(), String> {
    for op in ops {
        let path = op["path"].as_str().unwrap_or_default();
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        if parts.first() != Some(&"metadata") || parts.get(1) != Some(&"finalizers") {
            return Err(format!("unsupported path {path}"));
        }
        let current = obj["metadata"]["finalizers"].clone();
        match (op["op"].as_str(), parts.get(2)) {
            (Some("test"), None) => {
                let want = &op["value"];
                let have = if current.is_null() {
                    Value::Null
                } else {
                    current.clone()
                };
                if *want != have {
                    return Err(format!("test failed: {have} != {want}"));
                }
            }
            (Some("test"), Some(i)) => {
                let i: usize = i.parse().map_err(|_| "index")?;
                if current.get(i) != Some(&op["value"]) {
                    return Err("test failed".into());
                }
            }
            (Some("add"), None) => obj["metadata"]["finalizers"] = op["value"].clone(),
            (Some("add"), Some(&"-")) => {
                let mut list = current.as_array().cloned().unwrap_or_default();
                list.push(op["value"].clone());
                obj["metadata"]["finalizers"] = json!(list);
            }
            (Some("remove"), Some(i)) => {
                let i: usize = i.parse().map_err(|_| "index")?;
                let mut list = current.as_array().cloned().unwrap_or_default();
                if i >= list.len() {
                    return Err("no such index".into());
                }
                list.remove(i);
                obj["metadata"]["finalizers"] = json!(list);
            }
            other => return Err(format!("unsupported op {other:?}")),
        }
    }
    Ok(())
}

async fn handle(
    State(api): State<MiniApi>,
    method: Method,
    uri: Uri,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let query = uri.query().unwrap_or_default().to_string();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if path.starts_with("/apis/events.k8s.io/") {
        let mut s = api.store.lock().unwrap();
        s.events.push((
            body["regarding"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            body["reason"].as_str().unwrap_or_default().to_string(),
            body["action"].as_str().unwrap_or_default().to_string(),
            body["note"].as_str().unwrap_or_default().to_string(),
        ));
        return respond(StatusCode::OK, &body);
    }
    // /apis/virtkube.io/v1alpha1[/namespaces/NS]/PLURAL[/NAME[/status]]
    let Some(rest) = path.strip_prefix("/apis/virtkube.io/v1alpha1/") else {
        return not_found();
    };
    let mut parts: Vec<&str> = rest.split('/').collect();
    let mut ns = String::new();
    if parts.first() == Some(&"namespaces") && parts.len() >= 3 {
        ns = parts[1].to_string();
        parts.drain(..2);
    }
    let plural = parts.first().copied().unwrap_or_default().to_string();
    let name = parts.get(1).map(|s| s.to_string());
    let status = parts.get(2) == Some(&"status");

    match (method.clone(), name) {
        (Method::GET, None) if query.contains("watch=true") => {
            let from: u64 = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("resourceVersion="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            // Subscribe first, then read the log and its end under one lock: every change is
            // either in the backlog or arrives live after `last`, never both or neither.
            let rx = api.tx.subscribe();
            let (backlog, last) = {
                let s = api.store.lock().unwrap();
                let backlog: Vec<Value> = s
                    .log
                    .iter()
                    .filter(|(rv, p, _, _)| *rv > from && *p == plural)
                    .map(|(_, _, t, o)| json!({"type": t, "object": o}))
                    .collect();
                (backlog, s.rv.max(from))
            };
            let plural2 = plural.clone();
            let live = futures::stream::unfold(rx, move |mut rx| {
                let plural = plural2.clone();
                async move {
                    loop {
                        match rx.recv().await {
                            Ok((rv, p, t, o)) if p == plural && rv > last => {
                                let line = format!("{}\n", json!({"type": t, "object": o}));
                                return Some((Ok::<Bytes, Infallible>(Bytes::from(line)), rx));
                            }
                            Ok(_) => continue,
                            Err(broadcast::error::RecvError::Lagged(_)) => continue,
                            Err(_) => return None,
                        }
                    }
                }
            });
            let head = futures::stream::iter(
                backlog
                    .into_iter()
                    .map(|v| Ok::<Bytes, Infallible>(Bytes::from(format!("{v}\n")))),
            );
            use futures::StreamExt;
            Response::builder()
                .status(StatusCode::OK)
                .header("content-type", "application/json")
                .body(Body::from_stream(head.chain(live)))
                .unwrap()
        }
        (Method::GET, None) => {
            let s = api.store.lock().unwrap();
            let items: Vec<Value> = s
                .objects
                .iter()
                .filter(|(k, _)| k.0 == plural && (ns.is_empty() || k.1 == ns))
                .map(|(_, v)| v.clone())
                .collect();
            respond(
                StatusCode::OK,
                &json!({"apiVersion": "v1", "kind": "List",
                        "metadata": {"resourceVersion": s.rv.to_string()}, "items": items}),
            )
        }
        (Method::GET, Some(name)) => match api.get(&plural, &ns, &name) {
            Some(obj) => respond(StatusCode::OK, &obj),
            None => not_found(),
        },
        (Method::PATCH, Some(name)) => {
            let mut s = api.store.lock().unwrap();
            let key = (plural.clone(), ns.clone(), name.clone());
            let content_type = headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let existing = s.objects.get(&key).cloned();
            let mut obj = match existing {
                Some(o) => o,
                // Server-side apply creates (the HypervisorNode).
                None if content_type.contains("apply-patch") && !status => {
                    let mut o = body.clone();
                    o["metadata"]["uid"] = json!(format!("uid-{plural}-{name}"));
                    o["metadata"]["generation"] = json!(1);
                    o
                }
                None => return not_found(),
            };
            if status {
                obj["status"] = body["status"].clone();
            } else if content_type.contains("json-patch") {
                let ops = body.as_array().cloned().unwrap_or_default();
                if let Err(e) = json_patch(&mut obj, &ops) {
                    return respond(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                                "status": "Failure", "reason": "Invalid", "code": 422,
                                "message": e}),
                    );
                }
            } else if content_type.contains("merge-patch") {
                if let Some(rv) = body["metadata"]["resourceVersion"].as_str()
                    && Some(rv) != obj["metadata"]["resourceVersion"].as_str()
                {
                    return respond(
                        StatusCode::CONFLICT,
                        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                                "status": "Failure", "reason": "Conflict", "code": 409,
                                "message": "the object has been modified"}),
                    );
                }
                if let Some(f) = body["metadata"].get("finalizers") {
                    obj["metadata"]["finalizers"] = f.clone();
                }
            } else if content_type.contains("apply-patch")
                && let Some(labels) = body["metadata"].get("labels")
            {
                obj["metadata"]["labels"] = labels.clone();
            }
            let stored = api.store_change(&mut s, &plural, obj);
            respond(StatusCode::OK, &stored)
        }
        _ => not_found(),
    }
}
