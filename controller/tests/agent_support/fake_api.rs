//! A fake Kubernetes API server for running the real `virtkube agent` process: it answers
//! what the agent asks (CRD lists, quiet watches, HypervisorNode and status patches, events)
//! and records it.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::response::Response;
use serde_json::{Value, json};

// A test binary may include this support module and another that loads the same file.
#[allow(clippy::duplicate_mod)]
#[path = "../local_http/mod.rs"]
mod local_http;
#[allow(unused_imports)] // each test binary uses some of the shared helpers
pub use local_http::{free_port, http_get};

#[derive(Default)]
pub struct Fake {
    /// Plurals the server answers 404 for (CRD not installed).
    pub missing: Vec<String>,
    /// Calls seen: `METHOD path`.
    pub calls: Vec<String>,
    /// Calls seen with their query: (method, path, query).
    pub requests: Vec<(String, String, String)>,
    /// The last HypervisorNode status applied.
    pub node_status: Option<Value>,
    /// Objects listed per plural.
    pub objects: BTreeMap<String, Vec<Value>>,
    /// Status patches seen: (path, body).
    pub status_patches: Vec<(String, Value)>,
    /// Event reasons seen.
    pub events: Vec<String>,
}

pub type Shared = Arc<Mutex<Fake>>;

async fn handle(State(fake): State<Shared>, method: Method, uri: Uri, body: Bytes) -> Response {
    let path = uri.path().to_string();
    let query = uri.query().unwrap_or_default().to_string();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let plural = path.rsplit('/').find(|s| {
        [
            "domains",
            "volumes",
            "networks",
            "storagepools",
            "hypervisornodes",
        ]
        .contains(s)
    });
    let missing = {
        let mut f = fake.lock().unwrap();
        f.calls.push(format!("{method} {path}"));
        f.requests
            .push((method.to_string(), path.clone(), query.clone()));
        plural.is_some_and(|p| f.missing.iter().any(|m| m == p))
    };
    let json_response = |code: StatusCode, v: Value| {
        Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(Body::from(v.to_string()))
            .unwrap()
    };
    if missing {
        return json_response(
            StatusCode::NOT_FOUND,
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                   "reason": "NotFound", "code": 404,
                   "message": "the server could not find the requested resource"}),
        );
    }
    if method == Method::GET && query.contains("watch=true") {
        // A watch that stays open and quiet (the agent's steady state).
        tokio::time::sleep(Duration::from_secs(30)).await;
        return json_response(StatusCode::OK, Value::Null);
    }
    if method == Method::GET {
        let items = plural
            .and_then(|p| fake.lock().unwrap().objects.get(p).cloned())
            .unwrap_or_default();
        return json_response(
            StatusCode::OK,
            json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": items}),
        );
    }
    if path.starts_with("/apis/events.k8s.io/") {
        let reason = body["reason"].as_str().unwrap_or_default().to_string();
        fake.lock().unwrap().events.push(reason);
        return json_response(StatusCode::OK, body);
    }
    if method == Method::PATCH && path.ends_with("/status") && !path.contains("/hypervisornodes/") {
        let name = path
            .trim_end_matches("/status")
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_string();
        let status = match &body {
            // A compare-and-swap write (a JSON patch replacing `/status`).
            Value::Array(ops) => ops
                .iter()
                .find(|op| op["path"] == "/status")
                .map(|op| op["value"].clone())
                .unwrap_or(Value::Null),
            _ => body["status"].clone(),
        };
        let mut f = fake.lock().unwrap();
        f.status_patches
            .push((path.clone(), json!({ "status": status.clone() })));
        let stored = plural
            .and_then(|p| f.objects.get(p))
            .and_then(|objs| objs.iter().find(|o| o["metadata"]["name"] == name.as_str()))
            .cloned();
        if let Some(mut obj) = stored {
            obj["status"] = status;
            return json_response(StatusCode::OK, obj);
        }
    }
    if method == Method::PATCH && path.contains("/hypervisornodes/") {
        let name = path
            .trim_end_matches("/status")
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_string();
        if path.ends_with("/status") {
            fake.lock().unwrap().node_status = Some(body["status"].clone());
        }
        return json_response(
            StatusCode::OK,
            json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "HypervisorNode",
                   "metadata": {"name": name, "labels": {"zone": "a"}}, "spec": {},
                   "status": body.get("status").cloned().unwrap_or(Value::Null)}),
        );
    }
    json_response(StatusCode::OK, body)
}

pub async fn fake_api(missing: &[&str]) -> (SocketAddr, Shared) {
    let fake: Shared = Arc::new(Mutex::new(Fake {
        missing: missing.iter().map(|s| s.to_string()).collect(),
        ..Fake::default()
    }));
    let app = Router::new().fallback(handle).with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, fake)
}

pub async fn fake_api_with(objects: Vec<(&str, Value)>) -> (SocketAddr, Shared) {
    let (addr, fake) = fake_api(&[]).await;
    {
        let mut f = fake.lock().unwrap();
        for (plural, obj) in objects {
            f.objects.entry(plural.to_string()).or_default().push(obj);
        }
    }
    (addr, fake)
}

pub fn kubeconfig(dir: &std::path::Path, api: SocketAddr) -> std::path::PathBuf {
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{api}\nusers:\n- name: u\n  user: {{}}\ncontexts:\n- name: c\n  context:\n    cluster: fake\n    user: u\ncurrent-context: c\n"
        ),
    )
    .unwrap();
    path
}

pub fn agent(kubeconfig: &std::path::Path, metrics_port: u16, uri: &str) -> Child {
    agent_with(kubeconfig, metrics_port, uri, &[], None)
}

/// [`agent`] with extra arguments, and its logs (stdout and stderr) in `log` instead of
/// pipes (a long run would fill a pipe nobody reads and block the agent).
pub fn agent_with(
    kubeconfig: &std::path::Path,
    metrics_port: u16,
    uri: &str,
    extra: &[&str],
    log: Option<&std::path::Path>,
) -> Child {
    let (out, err) = match log {
        Some(path) => {
            let file = std::fs::File::create(path).expect("a log file");
            let copy = file.try_clone().expect("a second handle");
            (Stdio::from(file), Stdio::from(copy))
        }
        None => (Stdio::piped(), Stdio::piped()),
    };
    // A 1 s heartbeat unless the test asks for another.
    let heartbeat: &[&str] = if extra.contains(&"--heartbeat-seconds") {
        &[]
    } else {
        &["--heartbeat-seconds", "1"]
    };
    Command::new(env!("CARGO_BIN_EXE_virtkube"))
        .args([
            "agent",
            "--metrics-addr",
            &format!("127.0.0.1:{metrics_port}"),
            "--log-format",
            "json",
        ])
        .args(heartbeat)
        .args(extra)
        .env("KUBECONFIG", kubeconfig)
        .env("VIRTKUBE_NODE_NAME", "proc-node")
        .env("VIRTKUBE_CONNECT", uri)
        // `VIRTKUBE_AGENT_RUST_LOG` turns on more (e.g. `info,kube_runtime=debug`) when
        // a test needs to see where time goes.
        .env(
            "RUST_LOG",
            std::env::var("VIRTKUBE_AGENT_RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("the virtkube binary runs")
}

pub fn sigterm(pid: u32) {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Kills the agent process when a test ends early (a panic), so no agent outlives its test
/// and keeps acting on a shared daemon.
pub struct KillOnDrop(pub u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.0.to_string()])
            .stderr(Stdio::null())
            .status();
    }
}
