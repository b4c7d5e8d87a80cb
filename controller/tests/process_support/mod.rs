//! Shared by the tests that run virtkube's real processes together on the two private
//! libvirtd daemons of `scripts/libvirt-nodes.sh` (QEMU under TCG): the in-memory API server
//! (`virtkube-testapi`, in the test process), `virtkube controller` and one `virtkube agent`
//! per node, each a child process with its own log; a sampler of the daemons' `running`
//! state; and the clean-up of the guests a test made, even when it fails.
//!
//! Without the daemons' environment (`scripts/libvirt-nodes.sh up DIR`, then
//! `set -a; . DIR/env; set +a`) every test using this fails: it never passes silently.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use virtkube_testapi::TestApi;

// A test binary may include this support module and another that loads the same file.
#[allow(clippy::duplicate_mod)]
#[path = "../local_http/mod.rs"]
mod local_http;
#[allow(unused_imports)] // each test binary uses some of the shared helpers
pub use local_http::{free_port, http_get};

/// Says how to get the daemons.
pub const NEEDS: &str = "needs the private libvirtd daemons: `scripts/libvirt-nodes.sh up DIR`, \
     then `set -a; . DIR/env; set +a` (scripts/test does both)";

/// One private libvirtd "node" as the agents and the tests reach it.
#[derive(Debug, Clone)]
pub struct Node {
    /// The node's name (its HypervisorNode, its agent's `--node-name`).
    pub name: String,
    /// The URI this process and the node's agent open.
    pub uri: String,
    /// The URI the other daemon opens in a peer-to-peer migration.
    pub p2p: String,
    /// The migration data URI (`tcp://ADDRESS` in the node's network namespace).
    pub migration: String,
}

fn env_of(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        let required = std::env::var("VIRTKUBE_REQUIRE_LIBVIRTD").is_ok_and(|v| v == "1");
        panic!(
            "{var} is not set{}: {NEEDS}",
            if required {
                " although VIRTKUBE_REQUIRE_LIBVIRTD=1"
            } else {
                ""
            }
        )
    })
}

/// The two nodes, `node-a` and `node-b`, from the daemons' environment; fails when it is
/// missing or a daemon does not answer.
pub fn nodes() -> [Node; 2] {
    let node = |name: &str, which: &str| Node {
        name: name.to_string(),
        uri: env_of(&format!("VIRTKUBE_TEST_NODE_{which}_URI")),
        p2p: env_of(&format!("VIRTKUBE_TEST_NODE_{which}_P2P_URI")),
        migration: env_of(&format!("VIRTKUBE_TEST_NODE_{which}_MIGRATION_URI")),
    };
    let nodes = [node("node-a", "A"), node("node-b", "B")];
    for n in &nodes {
        let out = Command::new("virsh")
            .args(["-q", "-c", &n.uri, "version"])
            .output()
            .expect("virsh runs");
        assert!(
            out.status.success(),
            "the daemon of {} ({}) does not answer: {}; {NEEDS}",
            n.name,
            n.uri,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    nodes
}

/// `virsh -q -c URI ARGS…`, which must succeed; its trimmed output.
pub fn virsh(uri: &str, args: &[&str]) -> String {
    let out = Command::new("virsh")
        .args(["-q", "-c", uri])
        .args(args)
        .output()
        .expect("virsh runs");
    assert!(
        out.status.success(),
        "virsh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The names of the domains running on `uri` (one `virsh list` call), `None` when virsh
/// failed.
pub fn running_on(uri: &str) -> Option<Vec<String>> {
    let out = Command::new("virsh")
        .args(["-q", "-c", uri, "list", "--name", "--state-running"])
        .output()
        .ok()?;
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    })
}

/// Whether libvirt domain `name` exists on `uri` (defined or running).
pub fn defined_on(uri: &str, name: &str) -> bool {
    virsh(uri, &["list", "--all", "--name"])
        .lines()
        .any(|l| l.trim() == name)
}

/// A child process with its log file; killed (SIGKILL) when dropped, so nothing outlives
/// its test and acts on the shared daemons.
pub struct Proc {
    child: Child,
    /// stdout and stderr.
    pub log: PathBuf,
    /// Its metrics and health port.
    pub port: u16,
}

impl Proc {
    fn spawn(mut cmd: Command, log: PathBuf, port: u16) -> Proc {
        let file = std::fs::File::create(&log).expect("a log file");
        let copy = file.try_clone().expect("a second handle");
        let child = cmd
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(copy))
            .spawn()
            .expect("the virtkube binary runs");
        Proc { child, log, port }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .stderr(Stdio::null())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {sig} {}", self.child.id());
    }

    /// SIGTERM, then waits (at most `secs`) for it to exit; whether it exited with success.
    pub async fn terminate(mut self, secs: u64) -> bool {
        self.signal("-TERM");
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL, and reaps it.
    pub async fn kill(mut self) {
        self.signal("-KILL");
        while !matches!(self.child.try_wait(), Ok(Some(_))) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The last `n` lines of its log.
    pub fn tail(&self, n: usize) -> String {
        tail(&self.log, n)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The processes' `RUST_LOG`: `VIRTKUBE_TEST_RUST_LOG`, else virtkube's debug lines.
fn log_filter() -> String {
    std::env::var("VIRTKUBE_TEST_RUST_LOG").unwrap_or_else(|_| "info,virtkube=debug".into())
}

/// How the controllers of a [`Cluster`] are started.
#[derive(Debug, Clone)]
pub struct ControllerFlags {
    /// `--heartbeat-grace-seconds`.
    pub heartbeat_grace: u64,
    /// `--pending-move-timeout-seconds`.
    pub pending_timeout: u64,
    /// `--move-backoff-seconds`.
    pub move_backoff: u64,
}

impl Default for ControllerFlags {
    fn default() -> Self {
        ControllerFlags {
            heartbeat_grace: 8,
            pending_timeout: 300,
            move_backoff: 5,
        }
    }
}

/// The in-memory API server, the processes around it, and the guests to clean up.
pub struct Cluster {
    /// The API server (in this process: keep the test's runtime multi-threaded, since the
    /// tests block on `virsh`).
    pub api: TestApi,
    /// An admin client.
    pub client: kube::Client,
    /// node-a and node-b.
    pub nodes: [Node; 2],
    /// Controller flags for every controller started.
    pub controller_flags: ControllerFlags,
    dir: tempfile::TempDir,
    agents: BTreeMap<String, Proc>,
    controllers: BTreeMap<String, Proc>,
    /// Logs of processes that were stopped, for failure reports.
    old_logs: Vec<PathBuf>,
    starts: usize,
    namespaces: Vec<String>,
}

/// The agent's ServiceAccount as the chart renders it (release `virtkube` in
/// `virtkube-system`): the user the node policy matches.
pub const AGENT_USER: &str = "system:serviceaccount:virtkube-system:virtkube-agent";

/// The chart's node policy as rendered for a 1.30+ cluster (`ci/snapshots/node-policy.yaml`,
/// kept equal to `helm template` by `scripts/check-chart`).
fn node_policy() -> std::sync::Arc<virtkube_testapi::admission::Policies> {
    let path = format!(
        "{}/../charts/virtkube/ci/snapshots/node-policy.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let docs: Vec<serde_json::Value> = serde_saphyr::from_str_multiple(&text).unwrap();
    let policies = virtkube_testapi::admission::Policies::from_documents(&docs)
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    assert!(!policies.names().is_empty(), "{path} has no bound policy");
    std::sync::Arc::new(policies)
}

impl Cluster {
    /// The API server and nothing else yet; fails when the daemons are not there. The server
    /// enforces the chart's node policy (as a 1.30+ cluster does), and each agent's token is
    /// bound to its node: every write of the agents must pass it.
    pub async fn new() -> Cluster {
        let nodes = nodes();
        let api = TestApi::start_with(virtkube_testapi::Config {
            admission: node_policy(),
            ..virtkube_testapi::Config::default()
        })
        .await
        .unwrap();
        let client = api.client("admin").await.unwrap();
        Cluster {
            api,
            client,
            nodes,
            controller_flags: ControllerFlags::default(),
            dir: tempfile::tempdir().unwrap(),
            agents: BTreeMap::new(),
            controllers: BTreeMap::new(),
            old_logs: Vec::new(),
            starts: 0,
            namespaces: Vec::new(),
        }
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// A fresh namespace `PREFIX<pid>` in the API server; the guests of that namespace are
    /// removed from both daemons when the cluster is dropped.
    pub fn namespace(&mut self, prefix: &str) -> String {
        let ns = format!("{prefix}{}", std::process::id() % 100_000);
        self.api.create_namespace(&ns).unwrap();
        clean_guests(&self.nodes, &ns);
        self.namespaces.push(ns.clone());
        ns
    }

    fn kubeconfig(&self, file: &str, token: &str) -> PathBuf {
        let path = self.dir.path().join(format!("{file}.kubeconfig"));
        if !path.exists() {
            self.api.write_kubeconfig(&path, &[token]).unwrap();
        }
        path
    }

    /// Writes the node policy refused so far (none, when every agent kept to its node).
    pub fn admission_denials(&self) -> Vec<(String, String, String)> {
        self.api.admission_denials()
    }

    fn log_path(&mut self, what: &str) -> PathBuf {
        self.starts += 1;
        self.dir
            .path()
            .join(format!("{:02}-{what}.log", self.starts))
    }

    /// Starts `virtkube agent` for node `name` (heartbeat every second, ACPI grace 2 s),
    /// publishing the URIs the other node's agent migrates to.
    pub fn start_agent(&mut self, name: &str) {
        self.start_agent_with(name, &[]);
    }

    /// [`Cluster::start_agent`] with extra flags.
    pub fn start_agent_with(&mut self, name: &str, extra: &[&str]) {
        assert!(!self.agents.contains_key(name), "agent {name} runs already");
        let node = self.node(name).clone();
        let port = free_port();
        let log = self.log_path(&format!("agent-{name}"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_virtkube"));
        cmd.args(["agent", "--node-name", &node.name, "--connect", &node.uri])
            .args(["--libvirt-client-uri", &node.uri])
            .args(["--libvirt-peer-uri", &node.p2p])
            .args(["--migration-uri", &node.migration])
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
            .args(["--heartbeat-seconds", "1"])
            .args(["--shutdown-timeout-seconds", "2"])
            .args(["--shutdown-deadline-seconds", "5"])
            .args(["--log-format", "json"])
            .args(extra)
            .env(
                "KUBECONFIG",
                self.kubeconfig(
                    &format!("agent-{name}"),
                    &virtkube_testapi::admission::token_on_node(AGENT_USER, name),
                ),
            )
            .env("RUST_LOG", log_filter())
            .env_remove("VIRTKUBE_NODE_NAME")
            .env_remove("VIRTKUBE_CONNECT");
        self.agents
            .insert(name.to_string(), Proc::spawn(cmd, log, port));
    }

    /// Starts `virtkube controller` as `identity`, electing with Lease `lease` (3 s lease,
    /// 1 s retry).
    pub fn start_controller(&mut self, identity: &str, lease: &str) {
        assert!(
            !self.controllers.contains_key(identity),
            "controller {identity} runs already"
        );
        let port = free_port();
        let log = self.log_path(&format!("controller-{identity}"));
        let f = self.controller_flags.clone();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_virtkube"));
        cmd.args(["controller", "--log-format", "json"])
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
            .args(["--lease-namespace", "default", "--lease-name", lease])
            .args(["--identity", identity])
            .args(["--lease-duration-seconds", "3"])
            .args(["--renew-deadline-seconds", "2"])
            .args(["--retry-period-seconds", "1"])
            .args(["--heartbeat-grace-seconds", &f.heartbeat_grace.to_string()])
            .args([
                "--pending-move-timeout-seconds",
                &f.pending_timeout.to_string(),
            ])
            .args(["--move-backoff-seconds", &f.move_backoff.to_string()])
            .args(["--resync-seconds", "30"])
            .env(
                "KUBECONFIG",
                self.kubeconfig(
                    &format!("controller-{identity}"),
                    &format!("controller-{identity}"),
                ),
            )
            .env("RUST_LOG", log_filter());
        self.controllers
            .insert(identity.to_string(), Proc::spawn(cmd, log, port));
    }

    /// The agent of node `name`, taken out of the cluster (to stop or kill it).
    pub fn take_agent(&mut self, name: &str) -> Proc {
        let p = self
            .agents
            .remove(name)
            .unwrap_or_else(|| panic!("no agent {name}"));
        self.old_logs.push(p.log.clone());
        p
    }

    /// The controller `identity`, taken out of the cluster (to stop or kill it).
    pub fn take_controller(&mut self, identity: &str) -> Proc {
        let p = self
            .controllers
            .remove(identity)
            .unwrap_or_else(|| panic!("no controller {identity}"));
        self.old_logs.push(p.log.clone());
        p
    }

    /// The agent of node `name`.
    pub fn agent(&mut self, name: &str) -> &mut Proc {
        self.agents.get_mut(name).expect("the agent runs")
    }

    /// Waits until every agent and controller answers `/readyz` with 200 and every agent's
    /// HypervisorNode is Ready.
    pub async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let ports: Vec<(String, u16)> = self
            .agents
            .iter()
            .map(|(n, p)| (format!("agent {n}"), p.port))
            .chain(
                self.controllers
                    .iter()
                    .map(|(n, p)| (format!("controller {n}"), p.port)),
            )
            .collect();
        for (what, port) in ports {
            while http_get(port, "/readyz").await.map(|(c, _)| c) != Some(200) {
                assert!(
                    Instant::now() < deadline,
                    "{what} never became ready\n{}",
                    self.logs()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let agents: Vec<String> = self.agents.keys().cloned().collect();
        for node in agents {
            while !self
                .api
                .get("hypervisornodes", "", &node)
                .is_some_and(|n| condition_true(&n, "Ready"))
            {
                assert!(
                    Instant::now() < deadline,
                    "HypervisorNode {node} never Ready\n{}",
                    self.logs()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// The last lines of every process's log (running ones and stopped ones), for failure
    /// messages.
    pub fn logs(&self) -> String {
        let mut paths: Vec<&PathBuf> = self
            .old_logs
            .iter()
            .chain(self.agents.values().map(|p| &p.log))
            .chain(self.controllers.values().map(|p| &p.log))
            .collect();
        paths.sort();
        paths.dedup();
        paths
            .iter()
            .map(|p| {
                format!(
                    "---- {}\n{}",
                    p.file_name().unwrap_or_default().to_string_lossy(),
                    tail(p, 25)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The Domain `ns/name` as the API server holds it.
    pub fn domain(&self, ns: &str, name: &str) -> Option<Value> {
        self.api.get("domains", ns, name)
    }

    /// Waits (polling every 100 ms, at most `secs`) until `check` holds; fails with the
    /// processes' logs otherwise. Returns how long it took.
    pub async fn until(&self, secs: u64, what: &str, mut check: impl FnMut() -> bool) -> Duration {
        let started = Instant::now();
        while !check() {
            assert!(
                started.elapsed() < Duration::from_secs(secs),
                "timed out after {secs}s waiting for {what}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        started.elapsed()
    }

    /// Stops every process (agents with SIGTERM, so they leave guests alone; controllers
    /// too), then removes the test's guests from both daemons.
    pub async fn shutdown(mut self) {
        let agents: Vec<String> = self.agents.keys().cloned().collect();
        for a in agents {
            let p = self.take_agent(&a);
            p.terminate(15).await;
        }
        let controllers: Vec<String> = self.controllers.keys().cloned().collect();
        for c in controllers {
            let p = self.take_controller(&c);
            p.terminate(15).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Processes first (their Drop kills them), so none acts while guests are removed.
        self.agents.clear();
        self.controllers.clear();
        for ns in &self.namespaces {
            clean_guests(&self.nodes, ns);
        }
        // Every scenario is also a check of the node policy: no agent write was refused.
        let denials = self.api.admission_denials();
        if !std::thread::panicking() {
            assert!(
                denials.is_empty(),
                "the chart's node policy refused agent writes: {denials:#?}"
            );
        }
        if std::env::var("VIRTKUBE_TEST_KEEP_LOGS").is_ok_and(|v| v == "1") {
            let kept = self.dir.path().to_path_buf();
            eprintln!("logs kept in {}", kept.display());
            std::mem::forget(std::mem::replace(
                &mut self.dir,
                tempfile::tempdir().unwrap(),
            ));
        }
    }
}

/// Destroys and undefines every libvirt domain of namespace `ns` on both nodes.
pub fn clean_guests(nodes: &[Node], ns: &str) {
    let prefix = format!("{ns}.");
    for n in nodes {
        let Ok(out) = Command::new("virsh")
            .args(["-q", "-c", &n.uri, "list", "--all", "--name"])
            .output()
        else {
            continue;
        };
        for name in String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with(&prefix))
        {
            for args in [vec!["destroy", name], vec!["undefine", name, "--nvram"]] {
                let _ = Command::new("virsh")
                    .args(["-q", "-c", &n.uri])
                    .args(&args)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

/// Whether condition `type_` of an object (as JSON) is `True`.
pub fn condition_true(obj: &Value, type_: &str) -> bool {
    obj["status"]["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| c["type"] == type_ && c["status"] == "True")
    })
}

/// Whether the object's `Ready` is `True` for its current generation.
pub fn is_ready(obj: &Value) -> bool {
    obj["status"]["conditions"].as_array().is_some_and(|cs| {
        cs.iter().any(|c| {
            c["type"] == "Ready"
                && c["status"] == "True"
                && c["observedGeneration"] == obj["metadata"]["generation"]
        })
    })
}

/// A small Domain (1 vCPU, 128 MiB, no disk: SeaBIOS finds nothing to boot and idles),
/// `runStrategy: Always`, asking for `node` when given.
pub fn small_domain(ns: &str, name: &str, node: Option<&str>) -> Value {
    let mut spec = json!({"runStrategy": "Always", "cpu": {"vcpus": 1},
                          "memory": {"size": "128Mi"}, "os": {"machine": "pc"}});
    if let Some(n) = node {
        spec["nodeName"] = json!(n);
    }
    json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Domain",
           "metadata": {"name": name, "namespace": ns}, "spec": spec})
}

/// Whether the Domain has settled on `node`: held there, Ready, running, no move open.
pub fn settled_on(dom: &Value, node: &str) -> bool {
    let s = &dom["status"];
    s["nodeName"] == node
        && is_ready(dom)
        && s["phase"] == "Running"
        && !matches!(
            s["migration"]["state"].as_str(),
            Some("Pending") | Some("Running")
        )
}

/// One sample of both daemons.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Since the sampler started.
    pub at: Duration,
    /// Whether the guest ran on each node, in the order the sampler was given (`None`:
    /// virsh failed).
    pub running: [Option<bool>; 2],
}

/// Samples whether one guest runs on each of two daemons every 100 ms, on its own thread.
///
/// Each sample is one list of the running domains per daemon (what `virsh list --name
/// --state-running` asks: `virConnectListAllDomains` with the `RUNNING` filter, made here on
/// a connection kept open, since a `virsh` process per call takes 40-100 ms on a loaded
/// machine and two of them would not fit in 100 ms). One call per node — a `list` then a
/// `domstate` races a move ("Domain not found") — and the target of the move first: the
/// guest resumes on the target only after the source paused it for good, so "running on the
/// target, then running on the source" can only mean both at once, whereas the other order
/// would count a switch-over that happened between the two calls.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Vec<Sample>>,
    /// The nodes, in sampling order.
    pub order: [String; 2],
    started: Instant,
}

impl Sampler {
    /// Starts sampling libvirt domain `guest` on `first` (the move's target), then `second`.
    pub fn start(guest: &str, first: &Node, second: &Node) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let (uris, guest) = ([first.uri.clone(), second.uri.clone()], guest.to_string());
        let flag = stop.clone();
        let started = Instant::now();
        let handle = std::thread::spawn(move || {
            let mut conns: Vec<Option<virt::connect::Connect>> = uris
                .iter()
                .map(|u| {
                    Some(
                        virt::connect::Connect::open_read_only(Some(u))
                            .unwrap_or_else(|e| panic!("the sampler cannot open {u}: {e}")),
                    )
                })
                .collect();
            let mut samples = Vec::new();
            let mut next = Instant::now();
            while !flag.load(Ordering::SeqCst) {
                let at = started.elapsed();
                let mut running = [None, None];
                for (i, conn) in conns.iter_mut().enumerate() {
                    // A daemon restarted under a test: open it again (the sample is unknown
                    // until then).
                    if conn.is_none() {
                        *conn = virt::connect::Connect::open_read_only(Some(&uris[i])).ok();
                    }
                    running[i] = conn
                        .as_ref()
                        .and_then(|c| {
                            c.list_all_domains(virt::sys::VIR_CONNECT_LIST_DOMAINS_RUNNING)
                                .ok()
                        })
                        .map(|doms| doms.iter().any(|d| d.name().is_ok_and(|n| n == guest)));
                    if running[i].is_none() {
                        // Closing a connection whose daemon went away can fail, and `virt`
                        // panics on that in `Drop`: let it go instead.
                        std::mem::forget(conn.take());
                    }
                }
                samples.push(Sample { at, running });
                next += Duration::from_millis(100);
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                } else {
                    next = now;
                }
            }
            samples
        });
        Sampler {
            stop,
            handle,
            order: [first.name.clone(), second.name.clone()],
            started,
        }
    }

    /// Since the sampler started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Stops sampling; every sample taken.
    pub fn finish(self) -> Samples {
        self.stop.store(true, Ordering::SeqCst);
        Samples {
            samples: self.handle.join().expect("the sampler thread"),
            order: self.order,
        }
    }
}

/// What a [`Sampler`] saw.
#[derive(Debug)]
pub struct Samples {
    /// Every sample, in time order.
    pub samples: Vec<Sample>,
    /// The nodes, in sampling order.
    pub order: [String; 2],
}

impl Samples {
    /// Samples in which the guest ran on both nodes.
    pub fn on_both(&self) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| s.running == [Some(true), Some(true)])
            .collect()
    }

    /// Samples in which a virsh call failed.
    pub fn failed(&self) -> usize {
        self.samples
            .iter()
            .filter(|s| s.running.contains(&None))
            .count()
    }

    /// The nodes the guest ran on in the last sample.
    pub fn last_running(&self) -> Vec<String> {
        self.samples
            .last()
            .map(|s| {
                (0..2)
                    .filter(|&i| s.running[i] == Some(true))
                    .map(|i| self.order[i].clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The guest's runs as (node, from, to), merged over consecutive samples.
    pub fn timeline(&self) -> String {
        let mut out = Vec::new();
        let mut last: Option<(String, Duration)> = None;
        for s in &self.samples {
            let now: Vec<&str> = (0..2)
                .filter(|&i| s.running[i] == Some(true))
                .map(|i| self.order[i].as_str())
                .collect();
            let label = if now.is_empty() {
                "-".to_string()
            } else {
                now.join("+")
            };
            match &last {
                Some((l, _)) if *l == label => {}
                _ => {
                    if let Some((l, from)) = last.take() {
                        out.push(format!(
                            "{l} {:.1}-{:.1}s",
                            from.as_secs_f64(),
                            s.at.as_secs_f64()
                        ));
                    }
                    last = Some((label, s.at));
                }
            }
        }
        if let (Some((l, from)), Some(end)) = (last, self.samples.last()) {
            out.push(format!(
                "{l} {:.1}-{:.1}s",
                from.as_secs_f64(),
                end.at.as_secs_f64()
            ));
        }
        out.join(", ")
    }

    /// Fails unless the guest never ran on both nodes and no sample failed.
    pub fn assert_never_on_both(&self, scenario: &str) {
        let both = self.on_both();
        assert!(
            both.is_empty(),
            "{scenario}: the guest ran on both nodes in {} of {} samples (first at {:?}); timeline: {}",
            both.len(),
            self.samples.len(),
            both.first().map(|s| s.at),
            self.timeline()
        );
        assert_eq!(
            self.failed(),
            0,
            "{scenario}: virsh failed in some samples; timeline: {}",
            self.timeline()
        );
    }

    /// [`Samples::assert_never_on_both`] for a scenario that restarts a daemon: at most
    /// `unknown` samples may have failed (the daemon away), and no known pair ran both.
    pub fn assert_never_on_both_with_a_restart(&self, scenario: &str, unknown: usize) {
        let both = self.on_both();
        assert!(
            both.is_empty(),
            "{scenario}: the guest ran on both nodes in {} of {} samples; timeline: {}",
            both.len(),
            self.samples.len(),
            self.timeline()
        );
        assert!(
            self.failed() <= unknown,
            "{scenario}: {} samples failed (at most {unknown} while the daemon restarts); timeline: {}",
            self.failed(),
            self.timeline()
        );
    }
}

/// Whether libvirt domain `guest` on `uri` has a job (a migration, for the tests here).
pub fn has_job(conn: &virt::connect::Connect, guest: &str) -> bool {
    conn.lookup_domain_by_name(guest)
        .and_then(|d| d.job_info())
        .is_ok_and(|j| j.r#type != virt::sys::VIR_DOMAIN_JOB_NONE as i32)
}

/// Waits (polling every 10 ms, at most `secs`) until libvirt domain `guest` on `node` has a
/// job; how long it took, `None` on timeout.
pub async fn wait_for_job(node: &Node, guest: &str, secs: u64) -> Option<Duration> {
    let (uri, guest) = (node.uri.clone(), guest.to_string());
    tokio::task::spawn_blocking(move || {
        let conn = virt::connect::Connect::open_read_only(Some(&uri)).expect("a connection");
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(secs) {
            if has_job(&conn, &guest) {
                return Some(started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    })
    .await
    .expect("the poller")
}

/// The Warning events about object `name`, as (reason, note).
pub fn warnings(api: &TestApi, name: &str) -> Vec<(String, String)> {
    api.events()
        .iter()
        .filter(|e| e["regarding"]["name"] == name && e["type"] == "Warning")
        .map(|e| {
            (
                e["reason"].as_str().unwrap_or_default().to_string(),
                e["note"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// How many times an event with `reason` about `name` was reported (series counted).
pub fn event_count(api: &TestApi, name: &str, reason: &str) -> u64 {
    api.events()
        .iter()
        .filter(|e| e["regarding"]["name"] == name && e["reason"] == reason)
        .map(|e| e["series"]["count"].as_u64().unwrap_or(1))
        .sum()
}
