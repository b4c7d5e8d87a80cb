//! One scale measurement of virtkube as users run it, shared by the `scale` bench (release,
//! N up to 10,000, writes the report) and the `scale_baseline` CI guard (debug, small N,
//! compares the counts with `docs/performance-baseline.json`).
//!
//! The in-memory API server (`virtkube-testapi`) runs in this process and records every
//! request; `virtkube controller` and one `virtkube agent` on `test:///default` run as child
//! processes (so the agent's RSS is a real process's, watch caches included). Phases:
//! 1. create N Domains with server-side apply through kube's client (as
//!    `kubectl apply --server-side` would), wait until all are Ready;
//! 2. a converged resync (the agent's `--resync-seconds` timer firing for all N): what it
//!    writes, to the API and to libvirt;
//! 3. delete all N (parallel deletes through kube's client, or `kubectl delete --all
//!    --wait`) and wait until they are gone.
//!
//! The floor beside it: the same define+start (and destroy+undefine) straight through
//! libvirt's API on `test:///default`, in one loop.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::StreamExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use virtkube_crds::Domain;
use virtkube_testapi::{Recorded, TestApi};

#[path = "../local_http/mod.rs"]
mod local_http;
use local_http::{free_port, http_get};

/// The namespace the Domains live in.
pub const NS: &str = "bench";
/// The agent's node.
pub const NODE: &str = "bench-node";
/// The identity (bearer token) of the agent, the controller and the user.
pub const AGENT: &str = "agent";
/// See [`AGENT`].
pub const CONTROLLER: &str = "controller";
/// See [`AGENT`].
pub const USER: &str = "admin";

/// How the user's side talks to the API server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UserClient {
    /// kube's client, `parallel` requests in flight.
    Kube,
    /// `kubectl apply --server-side -f` and `kubectl delete dom --all --wait`.
    Kubectl,
}

/// Where libvirt's test driver keeps the Domains' guests during a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Libvirt {
    /// `test:///default` inside the agent's own process: the driver's domains count in the
    /// agent's RSS.
    #[default]
    InProcess,
    /// `test+unix:///default` served by a private libvirtd started for the run, as on a real
    /// node where libvirtd holds the domains: the agent's RSS is its own, the daemon's is
    /// measured beside it.
    Daemon,
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct Options {
    /// Domains.
    pub n: usize,
    /// The `virtkube` binary.
    pub bin: PathBuf,
    /// The agent's `--resync-seconds`. It must be longer than the whole creation phase:
    /// each Domain's timer starts at its last reconcile, so a shorter one fires for the
    /// Domains made first while the last are still being made, and those resyncs are counted
    /// as creation (the measurement says so, [`Measurement::resync_during_creation`]).
    pub resync_seconds: u64,
    /// Requests of the user in flight at once.
    pub parallel: usize,
    /// Kube's client or kubectl.
    pub client: UserClient,
    /// Longest wait for a phase.
    pub timeout: Duration,
    /// Where the test driver runs.
    pub libvirt: Libvirt,
}

impl Options {
    /// Defaults for `n` Domains.
    pub fn new(n: usize, bin: impl Into<PathBuf>) -> Options {
        Options {
            n,
            bin: bin.into(),
            resync_seconds: default_resync_seconds(n),
            parallel: 32,
            client: UserClient::Kube,
            timeout: Duration::from_secs(
                std::env::var("VIRTKUBE_BENCH_TIMEOUT")
                    .ok()
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(120 + n as u64 / 10),
            ),
            libvirt: Libvirt::InProcess,
        }
    }
}

/// The agent's resync interval for a run of `n` Domains: longer than creation takes here
/// (about 8 s at 1,000, and 240 s with the test driver in the agent or 330 s with a private
/// libvirtd at 10,000), and no longer than needed, since the resync phase waits for it.
pub fn default_resync_seconds(n: usize) -> u64 {
    let n = n as u64;
    if n <= 1000 { 20 + n / 200 } else { 20 + n / 20 }
}

/// API requests by (who, verb, resource[/subresource]).
pub type Calls = BTreeMap<String, u64>;

/// One phase's counts.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Phase {
    /// Wall time of the phase (for creation: first request to all Ready).
    pub seconds: f64,
    /// Agent reconciles of Domains (its metric).
    pub agent_reconciles: u64,
    /// Agent status patches of Domains (its metric).
    pub agent_status_writes: u64,
    /// Writes (create, update, patch, delete) to Domains (any subresource) by the agent.
    pub agent_domain_writes: u64,
    /// Writes to `domains/status` by the controller.
    pub controller_status_writes: u64,
    /// Writes to Domains (any subresource) by the controller.
    pub controller_domain_writes: u64,
    /// Events created or updated (anyone).
    pub events: u64,
    /// Mutating libvirt calls (define, start, destroy, undefine, pin, …) by the agent.
    pub libvirt_mutating: u64,
    /// Every libvirt call by the agent.
    pub libvirt_calls: u64,
    /// libvirt calls by name.
    pub libvirt_by_call: BTreeMap<String, u64>,
    /// Every API request, by `who verb resource`.
    pub api: Calls,
}

/// One run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measurement {
    /// Domains.
    pub n: usize,
    /// How the user talked to the API server.
    pub client: UserClient,
    /// Where the test driver ran (results written before this field existed: in the agent).
    #[serde(default)]
    pub libvirt: Libvirt,
    /// Seconds from the first create to the last create accepted.
    pub create_accept_seconds: f64,
    /// Seconds from the last create accepted to all Ready.
    pub ready_after_accept_seconds: f64,
    /// Creation to all Ready.
    pub create: Phase,
    /// The agent's resync interval in this run, seconds (0: not recorded, in results
    /// measured before it was).
    #[serde(default)]
    pub resync_seconds: u64,
    /// A converged resync of all N.
    pub resync: Phase,
    /// Seconds from the first delete to the last delete accepted.
    pub delete_accept_seconds: f64,
    /// Deleting all N until they are gone.
    pub delete: Phase,
    /// Peak RSS (VmHWM) of the agent, KiB.
    pub agent_peak_rss_kib: u64,
    /// RSS of the agent once converged, KiB.
    pub agent_rss_kib: u64,
    /// Peak RSS of the controller, KiB.
    pub controller_peak_rss_kib: u64,
    /// Peak RSS of the libvirtd holding the test driver ([`Libvirt::Daemon`]; 0 otherwise),
    /// KiB.
    #[serde(default)]
    pub libvirtd_peak_rss_kib: u64,
    /// define+start of N straight through libvirt, seconds.
    pub floor_create_seconds: f64,
    /// destroy+undefine of N straight through libvirt, seconds.
    pub floor_delete_seconds: f64,
    /// Where creation's time went, per Domain (absent in results measured before it was
    /// recorded).
    #[serde(default)]
    pub timeline: Option<Timeline>,
}

impl Measurement {
    /// Whether the agent's resync timer could fire during creation (creation took longer
    /// than the interval), so that the creation's reconciles and libvirt reads include
    /// resyncs. `None` when the interval was not recorded.
    pub fn resync_during_creation(&self) -> Option<bool> {
        (self.resync_seconds > 0).then_some(self.create.seconds > self.resync_seconds as f64)
    }
}

/// Where the time from creation to Ready goes, from the API server's request log: per
/// Domain, the time between the requests that move it along (seconds).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Timeline {
    /// The user's create → the controller's claim (`status.nodeName` written).
    pub create_to_claim: Spread,
    /// The claim → the controller's routing label (the agent's watch selects on it).
    pub claim_to_label: Spread,
    /// The label → the agent's first request about the Domain: its watch delivering the
    /// Domain, and the wait for a reconcile slot.
    pub label_to_agent: Spread,
    /// The agent's first request → its first status write (the reconcile that makes it
    /// Ready).
    pub agent_to_status: Spread,
    /// After the last create was accepted: when the last claim, label, agent's first request
    /// and agent's first status write came.
    pub last_after_accept: LastAfterAccept,
}

/// min, median, 90th percentile and max of one gap over the Domains (seconds).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Spread {
    /// Smallest.
    pub min: f64,
    /// Median.
    pub median: f64,
    /// 90th percentile (nearest rank).
    pub p90: f64,
    /// Largest.
    pub max: f64,
}

impl Spread {
    fn of(mut v: Vec<f64>) -> Spread {
        v.sort_by(f64::total_cmp);
        let at = |q: f64| {
            v.get(((v.len() as f64 * q).ceil() as usize).saturating_sub(1))
                .copied()
                .unwrap_or(0.0)
        };
        Spread {
            min: v.first().copied().unwrap_or(0.0),
            median: at(0.5),
            p90: at(0.9),
            max: v.last().copied().unwrap_or(0.0),
        }
    }
}

/// See [`Timeline::last_after_accept`] (seconds; negative: before the last create).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LastAfterAccept {
    /// The last claim.
    pub claim: f64,
    /// The last routing label.
    pub label: f64,
    /// The last agent's first request.
    pub agent: f64,
    /// The last agent's first status write.
    pub status: f64,
}

/// The creation timeline of the Domains in `requests`; `accepted` is when the last create
/// was accepted.
pub fn timeline(requests: &[Recorded], accepted: Instant) -> Timeline {
    #[derive(Default)]
    struct Seen {
        create: Option<Instant>,
        claim: Option<Instant>,
        label: Option<Instant>,
        agent: Option<Instant>,
        status: Option<Instant>,
    }
    let mut by_name: BTreeMap<&str, Seen> = BTreeMap::new();
    for r in requests
        .iter()
        .filter(|r| r.resource == "domains" && !r.name.is_empty())
    {
        let seen = by_name.entry(r.name.as_str()).or_default();
        let slot = match (r.identity.as_str(), r.verb.as_str(), r.subresource.as_str()) {
            (AGENT, "patch", "status") => {
                seen.agent.get_or_insert(r.at);
                &mut seen.status
            }
            (AGENT, _, _) => &mut seen.agent,
            (CONTROLLER, "patch", "status") => &mut seen.claim,
            (CONTROLLER, "patch", "") => &mut seen.label,
            (USER, "patch", "") => &mut seen.create,
            _ => continue,
        };
        slot.get_or_insert(r.at);
    }
    let gap = |from: fn(&Seen) -> Option<Instant>, to: fn(&Seen) -> Option<Instant>| {
        Spread::of(
            by_name
                .values()
                .filter_map(|s| Some(to(s)?.saturating_duration_since(from(s)?).as_secs_f64()))
                .collect(),
        )
    };
    let last = |at: fn(&Seen) -> Option<Instant>| {
        by_name.values().filter_map(at).max().map_or(0.0, |t| {
            if t >= accepted {
                (t - accepted).as_secs_f64()
            } else {
                -(accepted - t).as_secs_f64()
            }
        })
    };
    Timeline {
        create_to_claim: gap(|s| s.create, |s| s.claim),
        claim_to_label: gap(|s| s.claim, |s| s.label),
        label_to_agent: gap(|s| s.label, |s| s.agent),
        agent_to_status: gap(|s| s.agent, |s| s.status),
        last_after_accept: LastAfterAccept {
            claim: last(|s| s.claim),
            label: last(|s| s.label),
            agent: last(|s| s.agent),
            status: last(|s| s.status),
        },
    }
}

/// A child process killed when dropped.
struct Proc {
    child: Child,
    log: PathBuf,
    port: u16,
}

impl Proc {
    fn spawn(mut cmd: Command, log: PathBuf, port: u16) -> anyhow::Result<Proc> {
        let file = std::fs::File::create(&log)?;
        let copy = file.try_clone()?;
        let child = cmd
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(copy))
            .spawn()
            .context("running virtkube")?;
        Ok(Proc { child, log, port })
    }

    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn alive(&mut self) -> anyhow::Result<()> {
        if let Ok(Some(status)) = self.child.try_wait() {
            bail!("{:?} exited ({status}):\n{}", self.log, self.tail());
        }
        Ok(())
    }

    fn status_kib(&self, key: &str) -> u64 {
        proc_status_kib(self.child.id(), key)
    }

    async fn terminate(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `kB` line of `/proc/PID/status` (VmRSS, VmHWM), 0 when unreadable.
pub fn proc_status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// A private libvirtd serving the test driver for one run, in session mode (libvirtd runs
/// privileged as root, with the system's sockets and state: as root it runs as `nobody`),
/// its sockets, configuration and state in a directory of its own.
struct TestDaemon {
    proc: Proc,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl TestDaemon {
    fn start() -> anyhow::Result<TestDaemon> {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::Builder::new()
            .prefix("virtkube-bench-libvirtd")
            .tempdir()?;
        for sub in ["run", "config", "cache", "data"] {
            std::fs::create_dir(dir.path().join(sub))?;
        }
        let as_root = std::fs::metadata("/proc/self")?.uid() == 0;
        let mut cmd = if as_root {
            let chown = Command::new("chown")
                .args(["-R", "nobody:nogroup"])
                .arg(dir.path())
                .status()
                .context("running chown")?;
            if !chown.success() {
                bail!("chown -R nobody:nogroup {:?}: {chown}", dir.path());
            }
            let mut cmd = Command::new("setpriv");
            cmd.args([
                "--reuid=nobody",
                "--regid=nogroup",
                "--clear-groups",
                "libvirtd",
            ]);
            cmd
        } else {
            Command::new("libvirtd")
        };
        let path = |sub: &str| dir.path().join(sub);
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", dir.path())
            .env("XDG_RUNTIME_DIR", path("run"))
            .env("XDG_CONFIG_HOME", path("config"))
            .env("XDG_CACHE_HOME", path("cache"))
            .env("XDG_DATA_HOME", path("data"));
        let proc = Proc::spawn(cmd, path("libvirtd.log"), 0)?;
        let socket = path("run/libvirt/libvirt-sock");
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut daemon = TestDaemon {
            proc,
            socket,
            _dir: dir,
        };
        while !daemon.socket.exists() {
            daemon.proc.alive()?;
            if Instant::now() > deadline {
                bail!("libvirtd made no socket in 30 s:\n{}", daemon.proc.tail());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(daemon)
    }

    /// The agent's URI of the daemon's test driver.
    fn uri(&self) -> String {
        format!("test+unix:///default?socket={}", self.socket.display())
    }
}

/// The agent's counters: `name{labels}` → value.
pub type Scrape = BTreeMap<String, f64>;

/// The agent's `/metrics` on `port`, as counters.
pub async fn scrape(port: u16) -> anyhow::Result<Scrape> {
    let (code, text) = http_get(port, "/metrics")
        .await
        .context("scraping the agent")?;
    if code != 200 {
        bail!("/metrics answered {code}");
    }
    let body = text.split_once("\r\n\r\n").map_or(text.as_str(), |s| s.1);
    Ok(body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((key.to_string(), value.parse().ok()?))
        })
        .collect())
}

fn delta(after: &Scrape, before: &Scrape, key: &str) -> u64 {
    let get = |s: &Scrape| s.get(key).copied().unwrap_or(0.0);
    (get(after) - get(before)).max(0.0) as u64
}

/// `(call, class)` of a `virtkube_agent_libvirt_calls_total{call="…",class="…"}` key.
fn libvirt_call(key: &str) -> Option<(&str, &str)> {
    let labels = key.strip_prefix("virtkube_agent_libvirt_calls_total{")?;
    let call = labels.split("call=\"").nth(1)?.split('"').next()?;
    let class = labels.split("class=\"").nth(1)?.split('"').next()?;
    Some((call, class))
}

fn phase(seconds: f64, before: &Scrape, after: &Scrape, requests: &[Recorded]) -> Phase {
    let mut p = Phase {
        seconds,
        agent_reconciles: delta(
            after,
            before,
            "virtkube_agent_reconciles_total{kind=\"Domain\"}",
        ),
        agent_status_writes: delta(
            after,
            before,
            "virtkube_agent_status_patches_total{kind=\"Domain\"}",
        ),
        ..Phase::default()
    };
    for key in after.keys() {
        if let Some((call, class)) = libvirt_call(key) {
            let d = delta(after, before, key);
            if d == 0 {
                continue;
            }
            p.libvirt_calls += d;
            if class != "query" {
                p.libvirt_mutating += d;
            }
            p.libvirt_by_call.insert(call.to_string(), d);
        }
    }
    for r in requests {
        let write = matches!(r.verb.as_str(), "create" | "update" | "patch" | "delete");
        let resource = if r.subresource.is_empty() {
            r.resource.clone()
        } else {
            format!("{}/{}", r.resource, r.subresource)
        };
        let who = match r.identity.as_str() {
            AGENT | CONTROLLER => r.identity.clone(),
            _ => "user".to_string(),
        };
        *p.api
            .entry(format!("{who} {} {resource}", r.verb))
            .or_insert(0) += 1;
        if write && r.resource == "events" {
            p.events += 1;
        }
        if write && r.resource == "domains" {
            match r.identity.as_str() {
                AGENT => p.agent_domain_writes += 1,
                CONTROLLER => {
                    p.controller_domain_writes += 1;
                    if r.subresource == "status" {
                        p.controller_status_writes += 1;
                    }
                }
                _ => {}
            }
        }
    }
    p
}

/// Whether `o` is Ready for its current generation.
pub fn ready(o: &Value) -> bool {
    o["status"]["conditions"].as_array().is_some_and(|cs| {
        cs.iter().any(|c| {
            c["type"] == "Ready"
                && c["status"] == "True"
                && c["observedGeneration"] == o["metadata"]["generation"]
        })
    })
}

/// The manifest of Domain `i`: unpinned, running, placed by the controller. 128 KiB of memory:
/// `test:///default` reports a 3 GiB host with about 2 GiB free, and the controller places
/// by memory, so 10,000 Domains must fit in it.
pub fn manifest(i: usize) -> Value {
    json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Domain",
           "metadata": {"name": format!("vm{i:05}"), "namespace": NS},
           "spec": {"runStrategy": "Always", "cpu": {"vcpus": 1}, "memory": {"size": "128Ki"}}})
}

/// Runs one measurement.
pub async fn measure(opts: &Options) -> anyhow::Result<Measurement> {
    let (floor_create_seconds, floor_delete_seconds) = {
        let n = opts.n;
        tokio::task::spawn_blocking(move || floor(n)).await??
    };
    let api = TestApi::start().await?;
    api.create_namespace(NS)?;
    let tmp = tempfile::tempdir()?;
    // VIRTKUBE_BENCH_KEEP=1 keeps the processes' logs (VIRTKUBE_BENCH_RUST_LOG sets their
    // filter, `warn` by default) to see where time goes.
    let log_filter = std::env::var("VIRTKUBE_BENCH_RUST_LOG").unwrap_or_else(|_| "warn".into());
    let (_cleanup, dir) = if std::env::var("VIRTKUBE_BENCH_KEEP").is_ok_and(|v| v == "1") {
        let kept = tmp.keep();
        eprintln!("logs in {}", kept.display());
        (None, kept)
    } else {
        let path = tmp.path().to_path_buf();
        (Some(tmp), path)
    };
    let kubeconfig = |who: &str| -> anyhow::Result<PathBuf> {
        let path = dir.join(format!("{who}.kubeconfig"));
        api.write_kubeconfig(&path, &[who])?;
        Ok(path)
    };
    let daemon = match opts.libvirt {
        Libvirt::InProcess => None,
        Libvirt::Daemon => Some(TestDaemon::start()?),
    };
    let uri = daemon
        .as_ref()
        .map_or_else(|| "test:///default".to_string(), TestDaemon::uri);
    let agent_port = free_port();
    let mut agent = {
        // VIRTKUBE_BENCH_AGENT_WRAPPER: a command the agent runs under, which must exec it
        // (so that its PID, RSS and signals stay the agent's), e.g. a script that sets
        // LD_PRELOAD for heaptrack's preload library to profile the agent's heap.
        let wrapper = std::env::var("VIRTKUBE_BENCH_AGENT_WRAPPER").unwrap_or_default();
        let mut words = wrapper.split_whitespace();
        let mut cmd = match words.next() {
            Some(program) => {
                let mut cmd = Command::new(program);
                cmd.args(words).arg(&opts.bin);
                cmd
            }
            None => Command::new(&opts.bin),
        };
        cmd.args(["agent", "--node-name", NODE, "--connect", &uri])
            .args(["--metrics-addr", &format!("127.0.0.1:{agent_port}")])
            .args(["--resync-seconds", &opts.resync_seconds.to_string()])
            .args(["--heartbeat-seconds", "10", "--log-format", "json"])
            // VIRTKUBE_BENCH_AGENT_ARGS: extra flags, to try settings (e.g. --concurrency).
            .args(
                std::env::var("VIRTKUBE_BENCH_AGENT_ARGS")
                    .unwrap_or_default()
                    .split_whitespace(),
            )
            .env("KUBECONFIG", kubeconfig(AGENT)?)
            .env("RUST_LOG", &log_filter)
            .env_remove("VIRTKUBE_NODE_NAME")
            .env_remove("VIRTKUBE_CONNECT");
        Proc::spawn(cmd, dir.join("agent.log"), agent_port)?
    };
    let controller_port = free_port();
    let mut controller = {
        let mut cmd = Command::new(&opts.bin);
        cmd.args(["controller", "--log-format", "json"])
            .args(["--metrics-addr", &format!("127.0.0.1:{controller_port}")])
            .args(["--lease-namespace", "default", "--lease-name", "bench"])
            .args(["--identity", CONTROLLER])
            .env("KUBECONFIG", kubeconfig(CONTROLLER)?)
            .env("RUST_LOG", &log_filter);
        Proc::spawn(cmd, dir.join("controller.log"), controller_port)?
    };
    // Both up: the agent ready and its node published, the controller leading.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        agent.alive()?;
        controller.alive()?;
        let agent_ready = matches!(http_get(agent_port, "/readyz").await, Some((200, _)));
        let leading = http_get(controller_port, "/readyz")
            .await
            .is_some_and(|(c, b)| c == 200 && b.contains("role: leader"));
        let node = api.get("hypervisornodes", "", NODE).is_some();
        if agent_ready && leading && node {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "not up (agent {agent_ready}, controller leading {leading}, node {node}):\n{}\n{}",
                agent.tail(),
                controller.tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Heartbeats and elections settle before counting.
    tokio::time::sleep(Duration::from_secs(1)).await;
    api.clear_requests();
    let m0 = scrape(agent_port).await?;

    // (1) Create, wait for all Ready.
    let started = Instant::now();
    match opts.client {
        UserClient::Kube => {
            let client = api.client(USER).await?;
            let domains: Api<Domain> = Api::namespaced(client, NS);
            let params = PatchParams::apply("kubectl").force();
            let results: Vec<kube::Result<Domain>> = futures::stream::iter(0..opts.n)
                .map(|i| {
                    let (domains, params) = (domains.clone(), params.clone());
                    async move {
                        domains
                            .patch(&format!("vm{i:05}"), &params, &Patch::Apply(manifest(i)))
                            .await
                    }
                })
                .buffer_unordered(opts.parallel)
                .collect()
                .await;
            for r in results {
                r.context("creating a Domain")?;
            }
        }
        UserClient::Kubectl => {
            let file = dir.join("domains.yaml");
            // One List: kubectl reads a file starting with `{` as JSON, one document.
            let list = json!({"apiVersion": "v1", "kind": "List",
                              "items": (0..opts.n).map(manifest).collect::<Vec<_>>()});
            std::fs::write(&file, serde_json::to_vec(&list)?)?;
            let config = kubeconfig(USER)?;
            let out = tokio::process::Command::new("kubectl")
                .args(["apply", "--server-side", "--validate=false", "-f"])
                .arg(&file)
                .env("KUBECONFIG", &config)
                .output()
                .await?;
            if !out.status.success() {
                bail!("kubectl apply: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
    }
    let accepted = started.elapsed();
    let deadline = Instant::now() + opts.timeout;
    let poll = Duration::from_millis(if opts.n > 1000 { 250 } else { 50 });
    loop {
        let listed = api.list("domains");
        let ready_count = listed.iter().filter(|o| ready(o)).count();
        if ready_count == opts.n {
            break;
        }
        agent.alive()?;
        controller.alive()?;
        if Instant::now() > deadline {
            let stuck = listed.iter().find(|o| !ready(o));
            bail!(
                "{ready_count} of {} Ready after {:?}; one not Ready: {}\n{}",
                opts.n,
                started.elapsed(),
                stuck.map(Value::to_string).unwrap_or_default(),
                agent.tail()
            );
        }
        tokio::time::sleep(poll).await;
    }
    let all_ready = started.elapsed();
    // Writes that come after Ready (a second status write, an event) belong to creation.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let m1 = scrape(agent_port).await?;
    let requests = api.requests();
    let create = phase(all_ready.as_secs_f64(), &m0, &m1, &requests);
    let timeline = timeline(&requests, started + accepted);
    drop(requests);
    api.clear_requests();
    let agent_rss_kib = agent.status_kib("VmRSS:");

    // (2) The resync: every Domain comes back once, `resync_seconds` after its last
    // reconcile; wait until all N did, then for stragglers.
    let resync_started = Instant::now();
    let deadline = resync_started + Duration::from_secs(opts.resync_seconds) + opts.timeout;
    let key = "virtkube_agent_reconciles_total{kind=\"Domain\"}";
    loop {
        let now = scrape(agent_port).await?;
        if delta(&now, &m1, key) >= opts.n as u64 {
            break;
        }
        agent.alive()?;
        if Instant::now() > deadline {
            bail!(
                "the resync reconciled {} of {}",
                delta(&now, &m1, key),
                opts.n
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let m2 = scrape(agent_port).await?;
    let resync = phase(
        resync_started.elapsed().as_secs_f64(),
        &m1,
        &m2,
        &api.requests(),
    );
    api.clear_requests();

    // (3) Delete all, wait until gone.
    let started = Instant::now();
    match opts.client {
        UserClient::Kube => {
            let client = api.client(USER).await?;
            let domains: Api<Domain> = Api::namespaced(client, NS);
            let results: Vec<kube::Result<_>> = futures::stream::iter(0..opts.n)
                .map(|i| {
                    let domains = domains.clone();
                    async move {
                        domains
                            .delete(&format!("vm{i:05}"), &DeleteParams::default())
                            .await
                    }
                })
                .buffer_unordered(opts.parallel)
                .collect()
                .await;
            for r in results {
                r.context("deleting a Domain")?;
            }
        }
        UserClient::Kubectl => {
            let out = tokio::process::Command::new("kubectl")
                .args(["delete", "domains.virtkube.io", "--all", "--wait", "-n", NS])
                .env("KUBECONFIG", kubeconfig(USER)?)
                .output()
                .await?;
            if !out.status.success() {
                bail!("kubectl delete: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
    }
    let delete_accepted = started.elapsed();
    let deadline = Instant::now() + opts.timeout;
    while api.count("domains") > 0 {
        agent.alive()?;
        if Instant::now() > deadline {
            bail!(
                "{} Domains left after {:?}:\n{}",
                api.count("domains"),
                started.elapsed(),
                agent.tail()
            );
        }
        tokio::time::sleep(poll).await;
    }
    let gone = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let m3 = scrape(agent_port).await?;
    let delete = phase(gone.as_secs_f64(), &m2, &m3, &api.requests());

    let agent_peak_rss_kib = agent.status_kib("VmHWM:");
    let controller_peak_rss_kib = controller.status_kib("VmHWM:");
    let libvirtd_peak_rss_kib = daemon.as_ref().map_or(0, |d| d.proc.status_kib("VmHWM:"));
    agent.terminate().await;
    controller.terminate().await;
    if let Some(d) = daemon {
        d.proc.terminate().await;
    }
    api.stop().await;
    Ok(Measurement {
        n: opts.n,
        client: opts.client,
        libvirt: opts.libvirt,
        create_accept_seconds: accepted.as_secs_f64(),
        ready_after_accept_seconds: (all_ready - accepted).as_secs_f64(),
        create,
        resync_seconds: opts.resync_seconds,
        resync,
        delete_accept_seconds: delete_accepted.as_secs_f64(),
        delete,
        agent_peak_rss_kib,
        agent_rss_kib,
        controller_peak_rss_kib,
        libvirtd_peak_rss_kib,
        floor_create_seconds,
        floor_delete_seconds,
        timeline: Some(timeline),
    })
}

/// define+start, then destroy+undefine, of `n` small domains straight through libvirt on a
/// fresh `test:///default`, one call after another: the least any tool can do.
pub fn floor(n: usize) -> anyhow::Result<(f64, f64)> {
    use virt::connect::Connect;
    let conn = Connect::open(Some("test:///default"))?;
    let xml = |i: usize| {
        format!(
            "<domain type='test'><name>floor.vm{i:05}</name><memory unit='MiB'>64</memory>\
             <vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os></domain>"
        )
    };
    let started = Instant::now();
    for i in 0..n {
        conn.define_domain_xml(&xml(i))?.create()?;
    }
    let create = started.elapsed().as_secs_f64();
    let started = Instant::now();
    for i in 0..n {
        let dom = conn.lookup_domain_by_name(&format!("floor.vm{i:05}"))?;
        dom.destroy()?;
        dom.undefine()?;
    }
    let delete = started.elapsed().as_secs_f64();
    Ok((create, delete))
}

/// The path of a file of the repository.
pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}
