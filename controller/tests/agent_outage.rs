//! The `virtkube agent` process through API server outages (issue 15), on `test:///default`
//! against the strict in-memory API server: stopped (connections refused, open watches
//! dropped) or hung (connections accepted, nothing answered, watches stalled), then back.
//!
//! Each test prints what it measured; the assertions are generous bounds. The targets
//! (a change acted on within 10 s of the server's return, `/readyz` following within 5 s)
//! are measured by the ignored `recovery_table` benchmark and reported in the README.

mod agent_support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use virtkube_testapi::TestApi;

use agent_support::fake_api::{KillOnDrop, agent_with, free_port, http_get, kubeconfig, sigterm};

const NS: &str = "outage";
const NODE: &str = "proc-node";

/// How the API server goes away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outage {
    /// Listener and connections closed: connection refused.
    Stop,
    /// Connections accepted, nothing answered.
    Hang,
}

impl Outage {
    async fn begin(self, api: &TestApi) {
        match self {
            Outage::Stop => api.stop().await,
            Outage::Hang => api.hang(true),
        }
    }

    async fn end(self, api: &TestApi) {
        match self {
            Outage::Stop => api.restart().await.unwrap(),
            Outage::Hang => api.hang(false),
        }
    }
}

/// A running agent process and the server it talks to.
struct Agent {
    api: TestApi,
    port: u16,
    child: std::process::Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
    _kill: KillOnDrop,
}

impl Agent {
    /// Starts the server and an agent for `NODE`.
    async fn start() -> Agent {
        let api = TestApi::start().await.unwrap();
        api.create_namespace(NS).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let config = kubeconfig(dir.path(), api.addr());
        let log = dir.path().join("agent.log");
        let port = free_port();
        let child = agent_with(
            &config,
            port,
            "test:///default",
            &["--shutdown-timeout-seconds", "1"],
            Some(&log),
        );
        let kill = KillOnDrop(child.id());
        Agent {
            api,
            port,
            child,
            log,
            _dir: dir,
            _kill: kill,
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` log lines (for failure messages).
    fn tail(&self, n: usize) -> String {
        let logs = self.logs();
        let lines: Vec<&str> = logs.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Creates a running Domain `name`, binds it here and waits until it is Ready.
    async fn running_domain(&self, name: &str) {
        self.api
            .create(
                "domains",
                json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Domain",
                "metadata": {"name": name, "namespace": NS},
                "spec": {"nodeName": NODE, "runStrategy": "Manual", "state": "Running",
                         "memory": {"size": "64Mi"}, "cpu": {"vcpus": 1}}}),
            )
            .unwrap();
        let admin = self.api.client("admin").await.unwrap();
        agent_support::bind_domain(&admin, NS, name, NODE).await;
        self.wait_phase(name, "Running", Duration::from_secs(60))
            .await;
    }

    /// Waits until the Domain's status says `phase` for its current generation.
    async fn wait_phase(&self, name: &str, phase: &str, within: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let dom = self.api.get("domains", NS, name);
            if ready(&dom) && dom.is_some_and(|d| d["status"]["phase"] == phase) {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < within,
                "{name} not {phase} within {within:?}:\n{}",
                self.tail(40)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The agent's count of libvirt calls named `call` (from `/metrics`), read through
    /// the engine's own counters: what libvirt was actually asked to do.
    async fn libvirt_calls(&self, call: &str) -> u64 {
        let Some((200, text)) = http_get(self.port, "/metrics").await else {
            return 0;
        };
        text.lines()
            .filter(|l| l.starts_with("virtkube_agent_libvirt_calls_total{"))
            .filter(|l| l.contains(&format!("call=\"{call}\"")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// Waits until libvirt was asked `call` more than `before` times; returns when.
    async fn wait_call(&self, call: &str, before: u64, within: Duration) -> Duration {
        let started = Instant::now();
        loop {
            if self.libvirt_calls(call).await > before {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < within,
                "no {call} within {within:?}:\n{}",
                self.tail(40)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `/readyz`'s status code and body.
    async fn readyz(&self) -> (u16, String) {
        http_get(self.port, "/readyz")
            .await
            .unwrap_or((0, String::new()))
    }

    /// Waits until `/readyz` answers `code`; returns how long that took and the body.
    async fn wait_readyz(&self, code: u16, within: Duration) -> (Duration, String) {
        let started = Instant::now();
        loop {
            let (got, body) = self.readyz().await;
            if got == code {
                return (started.elapsed(), body);
            }
            assert!(
                started.elapsed() < within,
                "/readyz not {code} within {within:?} (last {got}: {body})\n{}",
                self.tail(20)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM: the agent exits cleanly.
    async fn stop(self) {
        sigterm(self.child.id());
        let Agent { mut child, .. } = self;
        let status = tokio::task::spawn_blocking(move || child.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success(), "exit {status:?}");
    }
}

fn ready(obj: &Option<Value>) -> bool {
    obj.as_ref().is_some_and(|o| {
        o["status"]["conditions"].as_array().is_some_and(|cs| {
            cs.iter().any(|c| {
                c["type"] == "Ready"
                    && c["status"] == "True"
                    && c["observedGeneration"] == o["metadata"]["generation"]
            })
        })
    })
}

/// The desired power state after `n` toggles, and the libvirt call that reaches it.
fn toggle(n: usize) -> (&'static str, &'static str, &'static str) {
    if n.is_multiple_of(2) {
        ("Paused", "Paused", "domain_suspend")
    } else {
        ("Running", "Running", "domain_resume")
    }
}

/// One outage of `length` of kind `outage`; the Domain's state is toggled (the `n`th
/// toggle) `during` the outage or right after the server's return. Returns the time from
/// the return to libvirt being asked for the change, and to the status saying so.
async fn outage_then_change(
    agent: &Agent,
    name: &str,
    outage: Outage,
    length: Duration,
    n: usize,
    during: bool,
) -> (Duration, Duration) {
    let (state, phase, call) = toggle(n);
    let before = agent.libvirt_calls(call).await;
    outage.begin(&agent.api).await;
    tokio::time::sleep(length).await;
    let edit = || {
        agent
            .api
            .edit_spec("domains", NS, name, |spec| spec["state"] = json!(state))
            .unwrap();
    };
    if during {
        edit();
    }
    outage.end(&agent.api).await;
    let back = Instant::now();
    if !during {
        edit();
    }
    let bound = Duration::from_secs(300);
    agent.wait_call(call, before, bound).await;
    let acted = back.elapsed();
    agent.wait_phase(name, phase, bound).await;
    (acted, back.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_made_during_a_stop_reaches_libvirt_soon_after_the_restart() {
    let agent = Agent::start().await;
    agent.running_domain("vm").await;
    let (acted, written) =
        outage_then_change(&agent, "vm", Outage::Stop, Duration::from_secs(15), 0, true).await;
    println!(
        "stopped 15 s, edited during: libvirt acted {acted:?} after the restart, status {written:?}"
    );
    assert!(
        acted < Duration::from_secs(30),
        "acted {acted:?} after the restart:\n{}",
        agent.tail(40)
    );
    agent.stop().await;
}

/// The recovery table of the README's reliability section: for each outage kind and
/// length (5 s, 40 s, 5 min; `VIRTKUBE_OUTAGE_SECONDS=5,40` for others), the time from the
/// server's return to libvirt acting on a change made right after it (as the issue
/// measured), and `/readyz`'s delays. A measurement, not a check:
///
/// ```sh
/// cargo test -p virtkube --test agent_outage -- --ignored --nocapture recovery_table
/// ```
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement (about 12 minutes): run with --ignored --nocapture"]
async fn recovery_table() {
    let lengths: Vec<u64> = std::env::var("VIRTKUBE_OUTAGE_SECONDS")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![5, 40, 300]);
    let kinds = match std::env::var("VIRTKUBE_OUTAGE_KINDS").ok().as_deref() {
        Some("stop") => vec![Outage::Stop],
        Some("hang") => vec![Outage::Hang],
        _ => vec![Outage::Stop, Outage::Hang],
    };
    let agent = Agent::start().await;
    agent.running_domain("vm").await;
    let mut rows = Vec::new();
    let mut n = 0;
    for outage in kinds {
        for &secs in &lengths {
            let length = Duration::from_secs(secs);
            let started = Instant::now();
            let (state, phase, call) = toggle(n);
            n += 1;
            let before = agent.libvirt_calls(call).await;
            outage.begin(&agent.api).await;
            // `/readyz` is watched for the whole outage: a probe that never says 503 is
            // a result too.
            let mut to_503 = None;
            while started.elapsed() < length {
                if to_503.is_none() && agent.readyz().await.0 == 503 {
                    to_503 = Some(started.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            outage.end(&agent.api).await;
            let back = Instant::now();
            agent
                .api
                .edit_spec("domains", NS, "vm", |spec| spec["state"] = json!(state))
                .unwrap();
            let bound = Duration::from_secs(600);
            let acted = agent.wait_call(call, before, bound).await;
            let (to_200, _) = agent.wait_readyz(200, bound).await;
            agent.wait_phase("vm", phase, bound).await;
            let written = back.elapsed();
            let row = format!(
                "| {outage:?} | {secs} s | {:.1} s | {:.1} s | {} | {:.1} s |",
                acted.as_secs_f64(),
                written.as_secs_f64(),
                to_503.map_or("never".to_string(), |d| format!("{:.1} s", d.as_secs_f64())),
                to_200.as_secs_f64(),
            );
            println!("{row}");
            rows.push(row);
        }
    }
    println!(
        "\n| Outage | Length | Change reaches libvirt | Status written | /readyz 503 after | /readyz 200 after |\n|---|---|---|---|---|---|"
    );
    for row in rows {
        println!("{row}");
    }
    // `VIRTKUBE_OUTAGE_LOG=FILE` keeps the agent's log (with `VIRTKUBE_AGENT_RUST_LOG`,
    // e.g. `info,kube_runtime=debug`, it shows where the time went).
    if let Ok(path) = std::env::var("VIRTKUBE_OUTAGE_LOG") {
        std::fs::write(path, agent.logs()).unwrap();
    }
    agent.stop().await;
}
