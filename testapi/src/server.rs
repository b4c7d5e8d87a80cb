//! The HTTP side: an accept loop serving HTTP/1.1 on one address, whose every connection
//! (watch streams included) is dropped on stop, and the handler that turns a request into
//! a verb on the store.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::faults::Faults;
use crate::rbac::Authorizer;
use crate::reads::{self, ListRequest};
use crate::record::{Recorded, Recorder};
use crate::request::{self, RequestInfo};
use crate::resources::{Registry, ResourceType};
use crate::selector::{FieldSelector, LabelSelector, Selector};
use crate::status::ApiError;
use crate::store::Store;
use crate::watch::{self, WatchRequest};
use crate::writes::{self, FieldValidation, PatchOptions, PatchType, WriteRequest};

/// Settings fixed at start.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How often a watch that allows bookmarks gets one.
    pub bookmark_interval: Duration,
    /// The watch length when the client sets no `timeoutSeconds`.
    pub default_watch_timeout: Duration,
}

/// State shared by every connection; survives stop and restart.
pub struct Shared {
    store: Mutex<Store>,
    /// Served types.
    pub registry: Registry,
    /// Faults in force.
    pub faults: Faults,
    /// Requests seen.
    pub recorder: Recorder,
    /// Authorization checks made: one per resource request, plus the `create` that an apply
    /// creating its object needs (recorded whether or not RBAC is enforced).
    pub authorizations: Recorder,
    /// RBAC, when enabled.
    pub authorizer: Option<Authorizer>,
    /// Settings.
    pub config: Settings,
    /// The address served (for `/api`'s serverAddressByClientCIDRs).
    pub addr: SocketAddr,
}

impl Shared {
    /// Builds the shared state.
    pub fn new(
        store: Store,
        registry: Registry,
        authorizer: Option<Authorizer>,
        config: Settings,
        addr: SocketAddr,
    ) -> Self {
        Shared {
            store: Mutex::new(store),
            registry,
            faults: Faults::default(),
            recorder: Recorder::default(),
            authorizations: Recorder::default(),
            authorizer,
            config,
            addr,
        }
    }

    /// The store, locked (a panic while it was held does not poison it for later tests).
    pub fn lock_store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }
}

type Body = BoxBody<Bytes, Infallible>;

/// A running accept loop.
pub struct Running {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Serves `listener` until stopped.
    pub fn start(shared: Arc<Shared>, listener: TcpListener) -> Running {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(accept_loop(shared, listener, stopped));
        Running { stop, task }
    }

    /// Closes the listener and drops every open connection; returns when they are gone.
    pub async fn stop(self) {
        self.stop.send_replace(true);
        let _ = self.task.await;
    }
}

async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = stopped.wait_for(|s| *s) => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let shared = shared.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req| handle(shared.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    connections.shutdown().await;
}

fn full(code: u16, value: &Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())).boxed());
    *response.status_mut() =
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn error(e: &ApiError) -> Response<Body> {
    let mut response = full(e.code, &e.to_status());
    if let Some(secs) = e.retry_after
        && let Ok(v) = http::HeaderValue::from_str(&secs.to_string())
    {
        response.headers_mut().insert(http::header::RETRY_AFTER, v);
    }
    response
}

fn identity_of(req: &Request<Incoming>) -> String {
    req.headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| "system:anonymous".to_string())
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let user = crate::admission::UserInfo::from_token(&identity_of(&req));
    let identity = user.username.clone();
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    let header = |name: http::header::HeaderName| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let content_type = header(http::header::CONTENT_TYPE);
    let accept = header(http::header::ACCEPT);
    let user_agent = header(http::header::USER_AGENT);
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return Ok(error(&ApiError::bad_request(
                "could not read the request body",
            )));
        }
    };
    shared.faults.wait_while_hung().await;
    let info = request::parse(&method, &path, &query, &identity);
    shared.recorder.record(Recorded::from_info(&info));
    if let Some(answer) = shared.faults.take(&info) {
        return Ok(error(&answer.error()));
    }
    if let Err(e) = authorize(&shared, &info) {
        return Ok(error(&e));
    }
    if !info.is_resource {
        return Ok(
            match crate::discovery::document(&shared.registry, &path, &shared.addr.to_string())
                .or_else(|| crate::openapi::document(&shared.registry, &path))
            {
                Some(doc) => full(200, &doc),
                None => error(&ApiError::no_route()),
            },
        );
    }
    let incoming = Parsed {
        info,
        user,
        body,
        content_type,
        accept,
        user_agent,
    };
    Ok(match serve(shared, incoming) {
        Ok(Served::Object(code, value)) => full(code, &value),
        Ok(Served::Stream(rx)) => {
            let stream = futures::stream::unfold(rx, |mut rx| async move {
                rx.recv()
                    .await
                    .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
            });
            let mut response = Response::new(StreamBody::new(stream).boxed());
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            response
        }
        Err(e) => error(&e),
    })
}

/// Records the authorization check of `info` (resource requests only) and, with RBAC
/// enforced, refuses it with the real server's 403 when no rule allows it.
fn authorize(shared: &Shared, info: &RequestInfo) -> Result<(), ApiError> {
    if info.is_resource {
        shared.authorizations.record(Recorded::from_info(info));
    }
    let Some(why) = shared.authorizer.as_ref().and_then(|a| a.check(info)) else {
        return Ok(());
    };
    let resource = match shared
        .registry
        .find(&info.group, &info.version, &info.resource)
    {
        Some(rt) => crate::status::group_resource(rt),
        None => info.resource.clone(),
    };
    Err(ApiError::forbidden(&resource, &info.name, &why))
}

struct Parsed {
    info: RequestInfo,
    user: crate::admission::UserInfo,
    body: Bytes,
    content_type: String,
    accept: String,
    user_agent: String,
}

enum Served {
    Object(u16, Value),
    Stream(tokio::sync::mpsc::Receiver<Bytes>),
}

fn selector_of(info: &RequestInfo, rt: &ResourceType) -> Result<Selector, ApiError> {
    let labels = LabelSelector::parse(
        info.query
            .get("labelSelector")
            .map(String::as_str)
            .unwrap_or_default(),
    )
    .map_err(|e| ApiError::bad_request(format!("unable to parse requirement: {e}")))?;
    let fields = FieldSelector::parse(
        info.query
            .get("fieldSelector")
            .map(String::as_str)
            .unwrap_or_default(),
        crate::selector::field_labels(&rt.api_version(), &rt.kind),
    )
    .map_err(ApiError::bad_request)?;
    Ok(Selector { labels, fields })
}

/// A watch's `sendInitialEvents` (a "watch-list", what client-go's reflector asks for with
/// its `WatchListClient` feature, e.g. `kubectl wait` from 1.35 on), checked as the real
/// server checks it (`apimachinery/pkg/apis/meta/internalversion/validation`
/// `ValidateListOptions`): it needs `resourceVersionMatch=NotOlderThan` and
/// `allowWatchBookmarks=true`, and `resourceVersionMatch` on a watch needs it. A list with
/// `sendInitialEvents` or `resourceVersionMatch` is not checked here (lists ignore them).
fn watch_list_options(info: &RequestInfo) -> Result<bool, ApiError> {
    let send = match info.query.get("sendInitialEvents").map(String::as_str) {
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "sendInitialEvents: invalid boolean value {other:?}"
            )));
        }
    };
    let matching = info
        .query
        .get("resourceVersionMatch")
        .filter(|m| !m.is_empty());
    let bookmarks = info
        .query
        .get("allowWatchBookmarks")
        .is_some_and(|b| b == "true");
    let forbidden = |field: &str, message: &str| {
        ApiError::invalid(
            "ListOptions",
            "meta.k8s.io",
            "",
            vec![crate::status::Cause {
                kind: "FieldValueForbidden".into(),
                message: format!("Forbidden: {message}"),
                field: field.into(),
            }],
        )
    };
    match send {
        None if matching.is_some() => Err(forbidden(
            "resourceVersionMatch",
            "resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
        )),
        None => Ok(false),
        Some(send) => {
            if matching.map(String::as_str) != Some("NotOlderThan") {
                return Err(forbidden(
                    "resourceVersionMatch",
                    "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
                ));
            }
            if send && !bookmarks {
                return Err(forbidden(
                    "allowWatchBookmarks",
                    "sendInitialEvents requires setting allowWatchBookmarks to true",
                ));
            }
            Ok(send)
        }
    }
}

fn resolve<'r>(registry: &'r Registry, info: &RequestInfo) -> Result<&'r ResourceType, ApiError> {
    let rt = registry
        .find(&info.group, &info.version, &info.resource)
        .ok_or_else(ApiError::no_route)?;
    let sub_ok =
        info.subresource.is_empty() || (info.subresource == "status" && rt.status_subresource);
    if !sub_ok {
        return Err(ApiError::no_route());
    }
    if !rt.namespaced && !info.namespace.is_empty() && info.resource != "namespaces" {
        return Err(ApiError::no_route());
    }
    Ok(rt)
}

fn manager_of(info: &RequestInfo, user_agent: &str) -> String {
    // `managerOrUserAgent`: the explicit manager, else the user agent up to its first `/`.
    match &info.field_manager {
        Some(m) if !m.is_empty() => m.clone(),
        _ => {
            let prefix = user_agent.split('/').next().unwrap_or_default();
            if prefix.is_empty() {
                "unknown".to_string()
            } else {
                prefix.chars().take(128).collect()
            }
        }
    }
}

fn serve(shared: Arc<Shared>, incoming: Parsed) -> Result<Served, ApiError> {
    let info = &incoming.info;
    let rt = resolve(&shared.registry, info)?.clone();
    if info.query.contains_key("dryRun") {
        // Refused rather than ignored: a dry run that wrote would be worse than none.
        return Err(ApiError::bad_request(
            "dryRun is not supported by virtkube-testapi",
        ));
    }
    let namespace = if rt.namespaced {
        info.namespace.clone()
    } else {
        String::new()
    };
    let metadata_only = reads::wants_metadata(&incoming.accept);
    let render = |v: Value| if metadata_only { reads::partial(&v) } else { v };
    let parse_body = || -> Result<Value, ApiError> {
        if incoming.body.is_empty() {
            return Ok(json!({}));
        }
        serde_json::from_slice(&incoming.body)
            .map_err(|e| ApiError::bad_request(format!("the request body is not JSON: {e}")))
    };
    let field_validation = match info.query.get("fieldValidation").map(String::as_str) {
        Some("Strict") => FieldValidation::Strict,
        Some("Ignore") => FieldValidation::Ignore,
        _ => FieldValidation::Warn,
    };
    let write = WriteRequest {
        rt: &rt,
        namespace: &namespace,
        subresource: (!info.subresource.is_empty()).then_some(info.subresource.as_str()),
        manager: manager_of(info, &incoming.user_agent),
        field_validation,
        user: Some(&incoming.user),
    };
    match info.verb.as_str() {
        "get" => {
            let store = shared.lock_store();
            Ok(Served::Object(
                200,
                render(reads::get(&store, &rt, &namespace, &info.name)?),
            ))
        }
        "list" => {
            let request = ListRequest {
                namespace: namespace.clone(),
                selector: selector_of(info, &rt)?,
                limit: info
                    .query
                    .get("limit")
                    .and_then(|l| l.parse().ok())
                    .unwrap_or(0),
                continue_token: info
                    .query
                    .get("continue")
                    .filter(|c| !c.is_empty())
                    .cloned(),
            };
            let store = shared.lock_store();
            let list = reads::list(&store, &rt, &request)?;
            Ok(Served::Object(
                200,
                if metadata_only {
                    reads::partial_list(&list)
                } else {
                    list
                },
            ))
        }
        "watch" => {
            let send_initial_events = watch_list_options(info)?;
            let timeout = info
                .query
                .get("timeoutSeconds")
                .and_then(|t| t.parse::<u64>().ok())
                .map(Duration::from_secs)
                .unwrap_or(shared.config.default_watch_timeout);
            let request = WatchRequest {
                rt: rt.clone(),
                namespace: namespace.clone(),
                selector: selector_of(info, &rt)?,
                resource_version: info.query.get("resourceVersion").cloned(),
                bookmarks: info
                    .query
                    .get("allowWatchBookmarks")
                    .is_some_and(|b| b == "true"),
                timeout,
                metadata_only,
                send_initial_events,
            };
            Ok(Served::Stream(watch::start(shared.clone(), request)?))
        }
        "create" => {
            let body = parse_body()?;
            let mut store = shared.lock_store();
            Ok(Served::Object(
                201,
                render(writes::create(&mut store, &write, body)?),
            ))
        }
        "update" => {
            let body = parse_body()?;
            let mut store = shared.lock_store();
            Ok(Served::Object(
                200,
                render(writes::update(&mut store, &write, &info.name, body)?),
            ))
        }
        "patch" => {
            let patch_type =
                PatchType::from_content_type(&incoming.content_type).ok_or_else(|| {
                    ApiError::unsupported_media_type(&[
                        "application/json-patch+json",
                        "application/merge-patch+json",
                        "application/apply-patch+yaml",
                    ])
                })?;
            let options = PatchOptions {
                field_manager: info.field_manager.clone(),
                force: info.query.get("force").map(|f| f == "true"),
            };
            let mut store = shared.lock_store();
            // An apply that creates its object is authorized as `create` too
            // (`handlers/patch.go`: `createAuthorizerAttributes`).
            if patch_type == PatchType::Apply
                && info.subresource.is_empty()
                && reads::get(&store, &rt, &namespace, &info.name).is_err()
            {
                let create = RequestInfo {
                    verb: "create".into(),
                    ..info.clone()
                };
                authorize(&shared, &create)?;
            }
            let (code, object) = writes::patch(
                &mut store,
                &write,
                &info.name,
                patch_type,
                &incoming.body,
                &options,
            )?;
            Ok(Served::Object(code, render(object)))
        }
        "delete" => {
            let options = parse_body()?;
            let mut store = shared.lock_store();
            let (code, object) = writes::delete(&mut store, &rt, &namespace, &info.name, &options)?;
            Ok(Served::Object(code, render(object)))
        }
        "deletecollection" => {
            let request = ListRequest {
                namespace: namespace.clone(),
                selector: selector_of(info, &rt)?,
                ..ListRequest::default()
            };
            let mut store = shared.lock_store();
            let list = reads::list(&store, &rt, &request)?;
            let mut deleted = Vec::new();
            for item in list["items"].as_array().into_iter().flatten() {
                let ns = item["metadata"]["namespace"].as_str().unwrap_or_default();
                let name = item["metadata"]["name"].as_str().unwrap_or_default();
                let (_, object) = writes::delete(&mut store, &rt, ns, name, &json!({}))?;
                deleted.push(object);
            }
            Ok(Served::Object(
                200,
                json!({
                    "apiVersion": rt.api_version(), "kind": format!("{}List", rt.kind),
                    "metadata": {"resourceVersion": store.rv.to_string()}, "items": deleted,
                }),
            ))
        }
        other => Err(ApiError::method_not_supported(&rt, other)),
    }
}
