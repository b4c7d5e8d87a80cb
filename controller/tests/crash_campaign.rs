//! Crash anywhere, in-process, on libvirt's test driver (issue 10). Three tests:
//! - the agent and the controller killed at points drawn from a printed seed while 100 runs
//!   of a mixed set of objects (a pool, volumes with clones and overlays under both reclaim
//!   policies, a network, domains with pins, autostart and power states) go through creates,
//!   spec updates, some deletes and the deletion of everything; ten runs play at once on one
//!   agent and one controller, so a kill lands amid other runs' work too. After each kill the
//!   victim restarts; each phase must converge (libvirt and the status match the spec, no
//!   lost, leaked or duplicate object, no stuck deletion) within 20 s of the last kill, and
//!   samples taken meanwhile must never see a retained or in-use image deleted;
//! - `virtkube apply --prune` killed during the same kind of phases, then run again;
//! - the checks themselves, shown to catch a lost, a leaked and a deleted retained object.
//!
//! What a kill models and what it does not: see `crash_support/inprocess.rs`. Not covered
//! here: moves between nodes (migration). Two nodes cannot share `test:///default` (it is one
//! state per process) and the test driver cannot migrate, so with one node the "guest on two
//! hosts" row is vacuous; moves are covered on the real daemons by `crash_real.rs` (a
//! shorter series on `process_support`'s libvirtd pair, with the real processes).
//!
//! Run (the tables are printed; nextest shows them with `--no-capture`):
//! `cargo nextest run -p virtkube --test crash_campaign --no-capture`. About 2 minutes in a
//! debug build on a loaded 2-core machine. Knobs: `VIRTKUBE_CRASH_SEED=0x…` replays a
//! campaign (the seed is printed; a failed run prints its own seed too);
//! `VIRTKUBE_CRASH_RUNS=N` and `VIRTKUBE_CRASH_APPLY_RUNS=N` set the number of runs (time
//! grows linearly: about 0.9 s per agent run and 0.4 s per apply run here);
//! nextest ends a test after 5 minutes, so run long series with
//! `cargo test -p virtkube --test crash_campaign -- --nocapture --test-threads 1`);
//! `VIRTKUBE_CRASH_ONLY=K` with the campaign's seed plays its run K alone;
//! `VIRTKUBE_CRASH_RESYNC_SECONDS` (the agent's and controller's resync, 300);
//! `VIRTKUBE_CRASH_LANES` (runs at once, 10), `VIRTKUBE_CRASH_MAX_KILLS` (per phase, 1),
//! `VIRTKUBE_CRASH_POLL_MS` (50), `VIRTKUBE_CRASH_VERBOSE=1` (every run's phases and kills),
//! `VIRTKUBE_CRASH_LOG=virtkube=info` (the agent's and controller's logs).

mod crash_support;

use std::time::Duration;

use crash_support::campaign::{Counts, Timing, describe, failed, play};
use crash_support::check::Checker;
use crash_support::inprocess::{AgentConfig, InProcessFleet};
use crash_support::rng::{Rng, seed_from_env};
use crash_support::scenario::{Options, generate};
use virtkube::cli::apply::{ConvergeOptions, converge};
use virtkube::execute::ExecOptions;
use virtkube::host::{HostSpec, Hosts};
use virtkube::plan::desired::DesiredState;
use virtkube::plan::{self, PlanOptions};
use virtkube_engine::EngineConfig;
use virtkube_testapi::TestApi;

const NODE: &str = "node-a";
const URI: &str = "test:///default";

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_anywhere_in_process_on_the_test_driver() {
    if std::env::var("VIRTKUBE_CRASH_LOG").is_ok() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                std::env::var("VIRTKUBE_CRASH_LOG").unwrap_or_default(),
            ))
            .try_init();
    }
    let seed = seed_from_env();
    let runs = env_u64("VIRTKUBE_CRASH_RUNS", 100);
    let only = std::env::var("VIRTKUBE_CRASH_ONLY")
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    println!("crash campaign (in-process, {URI}): seed {seed:#x}, {runs} runs");
    // The harness's own connection: it keeps the test driver's state alive while agents
    // come and go, and it is what the checks look through.
    let spec = HostSpec {
        node: NODE.into(),
        uri: URI.into(),
        p2p_uri: None,
        migration_uri: None,
    };
    let observer = Hosts::connect(&[spec], EngineConfig::default())
        .await
        .unwrap();
    let cpus = observer
        .get(NODE)
        .unwrap()
        .engine
        .node_info()
        .await
        .unwrap()
        .cpus
        .min(4);
    let options = Options {
        nodes: vec![NODE.into()],
        pool_root: "/var/lib/virtkube/crash".into(),
        moves: false,
        live_moves: false,
        cpus,
        subnet: 201,
    };
    let timing = Timing {
        converge: Duration::from_secs(20),
        max_kills: env_u64("VIRTKUBE_CRASH_MAX_KILLS", 1),
        max_point: 40,
        max_downtime_ms: 30,
        poll: Duration::from_millis(env_u64("VIRTKUBE_CRASH_POLL_MS", 50)),
    };
    // One API server and one fleet for the whole campaign, as a cluster lives on; each run
    // has its own namespace and libvirt names. Several runs play at once (lanes), so the
    // agent works on several runs' objects when it is killed.
    let lanes = env_u64("VIRTKUBE_CRASH_LANES", 10).max(1);
    let api = TestApi::start().await.unwrap();
    let fleet = InProcessFleet::start(&api.url(), vec![AgentConfig::new(&api.url(), NODE, URI)]);
    let lane = |lane: u64| {
        let (api, fleet, observer, options, timing) = (&api, &fleet, &observer, &options, &timing);
        async move {
            let mut reports = Vec::new();
            for run in (lane..runs).step_by(lanes as usize) {
                if only.is_some_and(|k| k != run) {
                    continue;
                }
                let run_seed = Rng::run_seed(seed, run);
                let mut rng = Rng::new(run_seed);
                let scenario = generate(&mut rng, run, options);
                api.create_namespace(&scenario.names.ns).unwrap();
                let mut checker = Checker::new(observer.clone(), scenario.names.clone());
                let report = play(
                    api,
                    fleet,
                    &mut checker,
                    &scenario,
                    &mut rng,
                    timing,
                    (run, run_seed),
                )
                .await;
                crash_support::cleanup::remove_run(URI, &scenario.names);
                reports.push((report, scenario.phases.len()));
            }
            reports
        }
    };
    let started = std::time::Instant::now();
    let reports: Vec<_> = futures::future::join_all((0..lanes).map(lane))
        .await
        .into_iter()
        .flatten()
        .collect();
    fleet.stop();
    api.stop().await;
    let mut counts = Counts {
        wall: started.elapsed().as_secs_f64(),
        lanes,
        nodes: options.nodes.len() as u64,
        ..Counts::default()
    };
    let mut failures = Vec::new();
    let mut known = Vec::new();
    for (report, phases) in reports {
        counts.add(&report, phases);
        if failed(&report) {
            println!("{}", describe(&report));
            failures.push(report);
        } else if !report.violations.is_empty() {
            known.push(report);
        } else if std::env::var("VIRTKUBE_CRASH_VERBOSE").is_ok() {
            println!("{}", describe(&report));
        }
    }
    println!(
        "{}",
        counts.table("in-process agent and controller on test:///default", seed)
    );
    for report in &known {
        println!(
            "not counted as a failure: replay: VIRTKUBE_CRASH_SEED={seed:#x} \
             VIRTKUBE_CRASH_ONLY={}\n{}",
            report.run,
            describe(report)
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {} runs broke an invariant (seed {seed:#x}):\n{}",
        failures.len(),
        counts.runs,
        failures.iter().map(describe).collect::<String>()
    );
}

/// The checks themselves can fail: a Domain, Volume and pool the API asks for and libvirt
/// lacks are lost, a guest nobody asked for is leaked, and a `Retain` image deleted behind
/// virtkube's back is reported both by the convergence check and by the sampler. No agent
/// runs here, so nothing repairs what the test breaks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checks_catch_lost_leaked_and_deleted_retained_objects() {
    use crash_support::check::{Kind, Names};
    use serde_json::json;
    let names = Names {
        ns: "crash-self".into(),
        pool: "crash-self".into(),
        network: "crash-self-net".into(),
    };
    let api = TestApi::start().await.unwrap();
    api.create_namespace(&names.ns).unwrap();
    let spec = HostSpec {
        node: NODE.into(),
        uri: URI.into(),
        p2p_uri: None,
        migration_uri: None,
    };
    let observer = Hosts::connect(&[spec], EngineConfig::default())
        .await
        .unwrap();
    api.create(
        "storagepools",
        json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "StoragePool",
            "metadata": {"name": names.pool},
            "spec": {"type": "dir", "target": {"path": "/var/lib/virtkube/crash/crash-self"}}}),
    )
    .unwrap();
    api.create(
        "volumes",
        json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Volume",
            "metadata": {"name": "base", "namespace": names.ns},
            "spec": {"pool": names.pool, "capacity": "64Mi", "format": "qcow2",
                     "reclaimPolicy": "Retain", "nodeName": NODE}}),
    )
    .unwrap();
    api.create(
        "domains",
        json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Domain",
            "metadata": {"name": "vm0", "namespace": names.ns},
            "spec": {"nodeName": NODE, "runStrategy": "Always",
                     "cpu": {"vcpus": 1}, "memory": {"size": "64Mi"}}}),
    )
    .unwrap();
    let mut checker = Checker::new(observer, names.clone());
    let found = |all: &[crash_support::check::Violation], kind: Kind, text: &str| {
        all.iter()
            .any(|v| v.kind == kind && v.detail.contains(text))
    };

    let seen = checker.discrepancies(&api).await;
    for what in ["Domain vm0", "Volume base", "StoragePool crash-self"] {
        assert!(
            found(&seen, Kind::Lost, what),
            "{what} not reported lost: {seen:?}"
        );
    }

    // libvirt gets the pool and the retained image (as the agent would make them) and a
    // guest of this run's namespace that no Domain asks for.
    let conn = virt::connect::Connect::open(Some(URI)).unwrap();
    let pool = conn
        .define_storage_pool_xml(
            "<pool type='dir'><name>crash-self</name><target><path>/var/lib/virtkube/crash/crash-self</path></target></pool>",
            0,
        )
        .unwrap();
    pool.create(0).unwrap();
    let image = virt::storage_vol::StorageVol::create_xml(
        &pool,
        "<volume><name>crash-self.base</name><capacity>67108864</capacity><target><format type='qcow2'/></target></volume>",
        0,
    )
    .unwrap();
    let ghost = conn
        .define_domain_xml(
            "<domain type='test'><name>crash-self.ghost</name><memory>65536</memory><os><type>hvm</type></os></domain>",
        )
        .unwrap();
    let seen = checker.discrepancies(&api).await;
    assert!(
        found(&seen, Kind::Leaked, "crash-self.ghost"),
        "ghost not reported leaked: {seen:?}"
    );
    assert!(
        !found(&seen, Kind::Lost, "Volume base"),
        "the image is there: {seen:?}"
    );
    assert!(
        !found(&seen, Kind::RetainedImageDeleted, ""),
        "nothing deleted yet: {seen:?}"
    );

    // The retained image is deleted behind virtkube's back.
    image.delete(0).unwrap();
    let seen = checker.discrepancies(&api).await;
    assert!(
        found(&seen, Kind::RetainedImageDeleted, "crash-self.base"),
        "deleted retained image not reported: {seen:?}"
    );
    checker.sample(&api).await;
    assert!(
        checker
            .sampled
            .iter()
            .any(|v| v.kind == Kind::RetainedImageDeleted),
        "the sampler missed the deleted retained image: {:?}",
        checker.sampled
    );
    let _ = ghost.undefine();
    drop(conn);
    crash_support::cleanup::remove_run(URI, &names);
    api.stop().await;
}

/// One `virtkube apply` killed at a point drawn from `point` (mutating libvirt calls made so
/// far), on a thread and runtime of its own, as SIGKILL would stop the process: its future is
/// dropped at its next await point (a libvirt call already running completes, its answer is
/// lost), and its connection is never closed. True when it was killed before it finished.
async fn apply_killed_at(desired: DesiredState, point: u64) -> bool {
    use std::sync::{Arc, Mutex};
    let engine: Arc<Mutex<Option<virtkube_engine::Engine>>> = Arc::new(Mutex::new(None));
    let (kill, killed_rx) = tokio::sync::oneshot::channel::<()>();
    let out = engine.clone();
    // `virtkube apply` runs on a current-thread runtime (its converge is not Send).
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let killed = runtime.block_on(async move {
            let hosts = Hosts::connect(&[host_spec()], EngineConfig::default())
                .await
                .unwrap();
            if let Ok(mut e) = out.lock() {
                *e = Some(hosts.get(NODE).unwrap().engine.clone());
            }
            let options = ConvergeOptions {
                prune: true,
                verbose: false,
                ..ConvergeOptions::default()
            };
            let mut sink = Vec::new();
            let killed = tokio::select! {
                _ = converge(&hosts, &desired, &[], &options, &mut sink) => false,
                _ = killed_rx => true,
            };
            std::mem::forget(hosts);
            killed
        });
        runtime.shutdown_background();
        killed
    });
    let mut kill = Some(kill);
    while !thread.is_finished() {
        let made = engine
            .lock()
            .ok()
            .and_then(|e| e.as_ref().map(|e| e.stats().mutating_calls()))
            .unwrap_or(0);
        if made >= point
            && let Some(k) = kill.take()
        {
            let _ = k.send(());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    thread.join().unwrap()
}

fn host_spec() -> HostSpec {
    HostSpec {
        node: NODE.into(),
        uri: URI.into(),
        p2p_uri: None,
        migration_uri: None,
    }
}

/// `virtkube apply --prune` killed at a point drawn from a printed seed during the create,
/// update and delete phases of a mixed set (the same generator as the agent's campaign), then
/// run again to the end: libvirt must then match the manifests (a fresh plan is empty), no
/// guest or network the manifests no longer name may remain, and no image may go (`apply`
/// never deletes a volume: once a manifest is gone its reclaim policy is unknown, so Volume
/// deletions are not played here, nor pool deletions, which would need the pool empty).
/// Replay: `VIRTKUBE_CRASH_SEED=…`; `VIRTKUBE_CRASH_APPLY_RUNS=N` changes the number of runs.
/// Runs are played one after another: `--prune` sees every object apply owns on the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virtkube_apply_killed_anywhere_on_the_test_driver() {
    use crash_support::scenario::Edit;
    use std::collections::{BTreeMap, BTreeSet};
    let seed = seed_from_env();
    let runs = env_u64("VIRTKUBE_CRASH_APPLY_RUNS", 100);
    println!("virtkube apply crash series ({URI}): seed {seed:#x}, {runs} runs");
    let observer = Hosts::connect(&[host_spec()], EngineConfig::default())
        .await
        .unwrap();
    let cpus = observer
        .get(NODE)
        .unwrap()
        .engine
        .node_info()
        .await
        .unwrap()
        .cpus
        .min(4);
    let options = Options {
        nodes: vec![NODE.into()],
        pool_root: "/var/lib/virtkube/crash-apply".into(),
        moves: false,
        live_moves: false,
        cpus,
        subnet: 202,
    };
    let started = std::time::Instant::now();
    let (mut kills, mut not_reached, mut checks) = (BTreeMap::<&str, u64>::new(), 0u64, 0u64);
    let mut failures: Vec<String> = Vec::new();
    for run in 0..runs {
        let run_seed = Rng::run_seed(seed ^ 0xA991_u64, run);
        let mut rng = Rng::new(run_seed);
        // Names of their own (crash-r1000…): apply's runs never meet the agent's.
        let scenario = generate(&mut rng, 1000 + run, &options);
        let names = scenario.names.clone();
        let mut model: BTreeMap<(&'static str, String), serde_json::Value> = BTreeMap::new();
        let mut images: BTreeSet<(String, String)> = BTreeSet::new();
        for phase in &scenario.phases {
            for edit in &phase.edits {
                match edit {
                    Edit::Create { resource, body } => {
                        let name = body["metadata"]["name"].as_str().unwrap().to_string();
                        model.insert((resource, name), body.clone());
                    }
                    Edit::Update {
                        resource,
                        name,
                        patch,
                        ..
                    } => {
                        if let Some(body) = model.get_mut(&(*resource, name.clone())) {
                            crash_support::scenario::merge(&mut body["spec"], patch);
                        }
                    }
                    Edit::Delete { resource, name, .. } => {
                        if !matches!(*resource, "volumes" | "storagepools") {
                            model.remove(&(*resource, name.clone()));
                        }
                    }
                }
            }
            let text = model
                .values()
                .map(|b| serde_json::to_string(b).unwrap())
                .collect::<Vec<_>>()
                .join("\n---\n");
            let manifests = virtkube_crds::manifest::Reader::new()
                .parse(std::path::Path::new("crash.yaml"), &text)
                .unwrap_or_else(|e| panic!("run {run}: manifests refused: {e:?}\n{text}"));
            let (desired, _) = DesiredState::from_manifests(&manifests, &observer.nodes());
            // Creating makes a dozen libvirt calls or so, the other phases a few.
            let point = rng.below(if phase.name == "create" { 12 } else { 4 });
            if apply_killed_at(desired.clone(), point).await {
                *kills.entry(phase.name).or_default() += 1;
            } else {
                not_reached += 1;
            }
            // The next `virtkube apply`, to the end.
            let hosts = Hosts::connect(&[host_spec()], EngineConfig::default())
                .await
                .unwrap();
            let quiet = ConvergeOptions {
                prune: true,
                verbose: false,
                ..ConvergeOptions::default()
            };
            let done = converge(&hosts, &desired, &[], &quiet, &mut Vec::new()).await;
            let _ = hosts.close().await;
            let mut broke = Vec::new();
            match &done {
                Ok(d) if d.is_clean() => {}
                Ok(d) => broke.push(format!(
                    "apply after the kill did not converge: {:?}\n{}",
                    d.failures,
                    d.last_plan.render(false)
                )),
                Err(e) => broke.push(format!("apply after the kill failed: {e}")),
            }
            checks += 1;
            let observed = observer.observe().await.unwrap();
            let again = plan::plan(&desired, &observed, &PlanOptions { prune: true });
            if !again.is_empty() {
                broke.push(format!(
                    "libvirt differs from the manifests:\n{}",
                    again.render(false)
                ));
            }
            let host = &observed.hosts[NODE];
            let prefix = format!("{}.", names.ns);
            for name in host.domains.keys().filter(|n| n.starts_with(&prefix)) {
                let short = name[prefix.len()..].to_string();
                if !model.contains_key(&("domains", short)) {
                    broke.push(format!("leaked: domain {name} no manifest names"));
                }
            }
            // A network a remaining guest uses is kept (apply reports it blocked).
            let used = model.iter().any(|((kind, _), body)| {
                *kind == "domains"
                    && body["spec"]["interfaces"]
                        .as_array()
                        .is_some_and(|i| i.iter().any(|n| n["network"] == names.network.as_str()))
            });
            if host.networks.contains_key(&names.network)
                && !used
                && !model.contains_key(&("networks", names.network.clone()))
            {
                broke.push(format!("leaked: network {}", names.network));
            }
            let now: BTreeSet<(String, String)> = host
                .volumes
                .keys()
                .filter(|(p, n)| *p == names.pool && n.starts_with(&prefix))
                .cloned()
                .collect();
            for gone in images.difference(&now) {
                broke.push(format!("image deleted: {gone:?}"));
            }
            images.extend(now);
            for b in broke {
                failures.push(format!(
                    "run {run} (seed {run_seed:#x}), phase {} (kill at {point}): {b}",
                    phase.name
                ));
            }
        }
        crash_support::cleanup::remove_run(URI, &names);
    }
    let killed: u64 = kills.values().sum();
    let mut t = String::new();
    t.push_str(&format!("virtkube apply --prune killed in-process on {URI}; seed {seed:#x} (replay: VIRTKUBE_CRASH_SEED={seed:#x})\n"));
    t.push_str("| Measure | Count |\n|---|---|\n");
    t.push_str(&format!(
        "| runs | {runs} |\n| kill points reached | {killed} |\n"
    ));
    for (phase, n) in &kills {
        t.push_str(&format!("| … apply killed during {phase} | {n} |\n"));
    }
    t.push_str(&format!(
        "| kill points not reached (apply finished first) | {not_reached} |\n"
    ));
    t.push_str(&format!(
        "| invariant checks (after each rerun) | {checks} |\n"
    ));
    t.push_str(&format!("| failures | {} |\n", failures.len()));
    t.push_str(&format!(
        "| wall time | {:.1} s |\n",
        started.elapsed().as_secs_f64()
    ));
    println!("{t}");
    assert!(
        killed > 0,
        "no apply was ever killed: the series tested nothing"
    );
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// A bug the agent campaign found (1 run in 300), made deterministic with `virtkube apply`
/// (the agent plans a Domain the same way, `plan/domain.rs`): killed after it defined a
/// `Manual` guest with `state: Paused` and before it started it. The next apply found a
/// stopped guest and, as `Manual` never starts a stopped guest after creation, left it
/// stopped for good. Fixed by a "first start owed" note the definition carries until the
/// start (engine `START_NS`): the next run sees the start is still owed and makes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_guests_first_start_lost_to_a_kill_is_made_by_the_next_run() {
    let text = r#"{"apiVersion": "virtkube.io/v1alpha1", "kind": "Domain",
        "metadata": {"name": "vm", "namespace": "crash-known"},
        "spec": {"nodeName": "node-a", "runStrategy": "Manual", "state": "Paused",
                 "cpu": {"vcpus": 1}, "memory": {"size": "64Mi"}}}"#;
    let manifests = virtkube_crds::manifest::Reader::new()
        .parse(std::path::Path::new("known.yaml"), text)
        .unwrap();
    let hosts = Hosts::connect(&[host_spec()], EngineConfig::default())
        .await
        .unwrap();
    let (desired, _) = DesiredState::from_manifests(&manifests, &hosts.nodes());
    // The first apply, killed right after the definition.
    let mut first = plan::plan(
        &desired,
        &hosts.observe().await.unwrap(),
        &PlanOptions::default(),
    );
    let define = first
        .actions
        .iter()
        .position(|a| matches!(a.op, plan::Op::DefineDomain { .. }))
        .expect("a definition");
    assert!(
        first.actions[define + 1..]
            .iter()
            .any(|a| matches!(a.op, plan::Op::StartDomain { .. })),
        "{}",
        first.render(false)
    );
    first.actions.truncate(define + 1);
    let report =
        virtkube::execute::execute(&first, &hosts, ExecOptions::default(), |_, _| {}).await;
    assert!(report.is_success(), "{report:?}");
    // The next apply, to the end.
    let quiet = ConvergeOptions {
        verbose: false,
        ..ConvergeOptions::default()
    };
    let done = converge(&hosts, &desired, &[], &quiet, &mut Vec::new())
        .await
        .unwrap();
    let power = done.observed.hosts[NODE].domains["crash-known.vm"].power;
    let still_owed = done.observed.hosts[NODE].domains["crash-known.vm"].start_owed;
    crash_support::cleanup::remove_run(
        URI,
        &crash_support::check::Names {
            ns: "crash-known".into(),
            pool: "crash-known".into(),
            network: "crash-known-net".into(),
        },
    );
    assert_eq!(
        power,
        virtkube::plan::observed::PowerObserved::Paused,
        "the guest was never started: {}",
        done.last_plan.render(false)
    );
    assert!(
        !still_owed,
        "the start happened: the note must be gone, or a later stop would look like a start still owed"
    );
}
