//! An agent and a controller running inside the test process, each on its own tokio
//! runtime, so that a "kill" stops every one of their tasks at once.
//!
//! Why in-process: on `test:///default` libvirt's state lives inside the process that opened
//! it, so a real SIGKILL would lose libvirt too. Here the harness keeps its own connection
//! open (libvirt's state stands in for the node's libvirtd), and an instance is killed with
//! [`tokio::runtime::Runtime::shutdown_background`]: every task of that runtime (reconcile
//! loops, watch caches, migration tasks, the heartbeat, the engine's watchdog) is dropped at
//! its next await point, and nothing it would have done afterwards happens. A libvirt call
//! already handed to the blocking pool completes, as it would in libvirtd; its answer is
//! lost. A restart builds everything anew: a new runtime, engine connection, kube client,
//! watch caches, context, failure counts.
//!
//! What it does not model: a kill in the middle of a synchronous stretch (a task is dropped
//! only where it awaits), lost TCP writes (an HTTP request is either sent whole or not), and
//! process-wide state that survives here (libvirt's event-loop thread, the test driver's
//! own state, which is the point).
//!
//! The agent's wiring mirrors `virtkube agent` (`controller/src/agent/mod.rs`): the same
//! four controllers over the same watches, triggers and reconcilers, the drift forwarder, the
//! sweep and the HypervisorNode publisher; only the HTTP endpoints and signal handling are
//! left out.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::Client;
use kube::api::Api;
use kube::runtime::controller::{self, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use prometheus_client::registry::Registry;
use virtkube::agent::backoff::Failures;
use virtkube::agent::context::{Context, Settings};
use virtkube::agent::metrics::Metrics;
use virtkube::agent::{domain, drift, drive, network, node, pool};
use virtkube::agent::{sweep, volume};
use virtkube::host::{HostSpec, Hosts};
use virtkube::placement;
use virtkube_crds::{Domain, Network, StoragePool, Volume};
use virtkube_engine::{Engine, EngineConfig};

/// How one agent instance runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The API server's URL.
    pub api_url: String,
    /// The bearer token (identity) it uses.
    pub identity: String,
    /// Its node.
    pub node: String,
    /// Its libvirt URI.
    pub uri: String,
    /// How other nodes reach this node's libvirt (published on the HypervisorNode).
    pub client_uri: Option<String>,
    /// The URI the source's libvirtd uses for a peer-to-peer migration here.
    pub peer_uri: Option<String>,
    /// The migration data URI of this node.
    pub migration_uri: Option<String>,
    /// A stopped or deleted guest's grace before it is destroyed.
    pub shutdown_timeout: Duration,
    /// Resync period (the sweep's, too).
    pub resync: Duration,
    /// Heartbeat period.
    pub heartbeat: Duration,
}

impl AgentConfig {
    /// An agent for `node` on `uri`, against `api_url`, with short test timings.
    pub fn new(api_url: &str, node: &str, uri: &str) -> Self {
        AgentConfig {
            api_url: api_url.to_string(),
            identity: format!("agent-{node}"),
            node: node.to_string(),
            uri: uri.to_string(),
            client_uri: None,
            peer_uri: None,
            migration_uri: None,
            shutdown_timeout: Duration::from_millis(300),
            resync: resync(),
            heartbeat: Duration::from_secs(2),
        }
    }
}

/// The agent's and the controller's resync period (and the agent's sweep): 300 s as in
/// production, or `VIRTKUBE_CRASH_RESYNC_SECONDS`. Longer than a phase's 20 s to converge, so
/// recovery from a kill must not rest on the periodic resync.
pub fn resync() -> Duration {
    let seconds = std::env::var("VIRTKUBE_CRASH_RESYNC_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    Duration::from_secs(seconds)
}

/// One running instance: its own runtime and, once connected, its engine (for counting the
/// libvirt calls it made).
pub struct Instance {
    runtime: Option<tokio::runtime::Runtime>,
    engine: Arc<Mutex<Option<Engine>>>,
    /// Whether its start-up failed (the error, for the report).
    pub failed: Arc<Mutex<Option<String>>>,
}

impl Instance {
    fn runtime(name: &str) -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(name.to_string())
            .enable_all()
            .build()
            .expect("a runtime for an in-process instance")
    }

    /// Mutating libvirt calls this instance's engine made so far (0 before it connected).
    pub fn mutations(&self) -> u64 {
        self.engine
            .lock()
            .ok()
            .and_then(|e| e.as_ref().map(|e| e.stats().mutating_calls()))
            .unwrap_or(0)
    }

    /// Kills the instance: every task is dropped at its next await point; libvirt calls
    /// already running finish on their own.
    pub fn kill(mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Starts an agent.
pub fn start_agent(config: AgentConfig) -> Instance {
    let runtime = Instance::runtime(&format!("agent-{}", config.node));
    let engine = Arc::new(Mutex::new(None));
    let failed = Arc::new(Mutex::new(None));
    let (e, f) = (engine.clone(), failed.clone());
    runtime.spawn(async move {
        if let Err(error) = run_agent(config, e).await
            && let Ok(mut f) = f.lock()
        {
            *f = Some(error);
        }
    });
    Instance {
        runtime: Some(runtime),
        engine,
        failed,
    }
}

async fn run_agent(
    config: AgentConfig,
    engine_out: Arc<Mutex<Option<Engine>>>,
) -> Result<(), String> {
    let client = kube_client(&config.api_url, &config.identity).await?;
    let spec = HostSpec {
        node: config.node.clone(),
        uri: config.uri.clone(),
        p2p_uri: None,
        migration_uri: config.migration_uri.clone(),
    };
    // libvirt may be restarting: wait for it as the agent does.
    let mut hosts = loop {
        match Hosts::connect(std::slice::from_ref(&spec), EngineConfig::default()).await {
            Ok(h) => break h,
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    hosts.shutdown_deadline = config.shutdown_timeout;
    let engine = hosts
        .get(&config.node)
        .map_err(|e| e.to_string())?
        .engine
        .clone();
    if let Ok(mut out) = engine_out.lock() {
        *out = Some(engine.clone());
    }
    let mut settings = Settings::for_node(&config.node);
    settings.resync = config.resync;
    settings.shutdown_timeout = config.shutdown_timeout;
    settings.client_uri = config.client_uri.clone();
    settings.peer_uri = config.peer_uri.clone();
    settings.migration_uri = config.migration_uri.clone();
    let info = engine.node_info().await.map_err(|e| e.to_string())?;
    settings.host_cpus = Some(info.cpus);
    settings.online_cpus = info.cpu_map.map(|m| m.online.to_string());
    let metrics = Metrics::register(&mut Registry::default(), Some(engine.clone()));
    // No API outage is modelled here: the recovery signal never fires.
    let (_recovered_tx, recovered_rx) =
        tokio::sync::watch::channel(virtkube::agent::api_health::Recovery::none());
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);

    let config_c = controller::Config::default().concurrency(4);
    let watch = || watcher::Config::default().any_semantic();
    let (domain_store, domain_writer) = reflector::store();
    let domain_stream = watcher(
        Api::<Domain>::all(client.clone()),
        watch().labels(&placement::write::node_label(&config.node)),
    )
    .default_backoff()
    .reflect(domain_writer)
    .applied_objects()
    .predicate_filter(domain::trigger_hash, Default::default());
    let domain_controller =
        Controller::for_stream(domain_stream, domain_store).with_config(config_c.clone());
    let volume_controller =
        Controller::new(Api::<Volume>::all(client.clone()), watch()).with_config(config_c.clone());
    let network_controller =
        Controller::new(Api::<Network>::all(client.clone()), watch()).with_config(config_c.clone());
    let pool_controller = Controller::new(Api::<StoragePool>::all(client.clone()), watch())
        .with_config(config_c.clone());
    let domain_store = domain_controller.store();
    let domain_controller = {
        let (by_volume, by_network) = (domain_store.clone(), domain_store.clone());
        domain_controller
            .watches(
                Api::<Volume>::all(client.clone()),
                watch(),
                move |v: Volume| domain::users_of(&by_volume, &v),
            )
            .watches(
                Api::<Network>::all(client.clone()),
                watch(),
                move |n: Network| domain::users_of_network(&by_network, &n),
            )
    };
    let volume_store = volume_controller.store();
    let volume_controller = {
        let (by_pool, by_source) = (volume_store.clone(), volume_store.clone());
        volume_controller
            .watches(
                Api::<StoragePool>::all(client.clone()),
                watch(),
                move |p: StoragePool| volume::in_pool(&by_pool, &p),
            )
            .watches(
                Api::<Volume>::all(client.clone()),
                watch(),
                move |s: Volume| volume::copies_of(&by_source, &s),
            )
            .watches(Api::<Domain>::all(client.clone()), watch(), |d: Domain| {
                volume::used_by_domain(&d)
            })
    };
    let network_store = network_controller.store();
    let pool_store = pool_controller.store();
    let mut ctx = Context::new(client.clone(), hosts, metrics.clone(), settings)
        .map_err(|e| e.to_string())?;
    ctx.volumes = Some(volume_store.clone());
    ctx.domains = Some(domain_store.clone());
    let (requeue_tx, requeue_rx) = futures::channel::mpsc::unbounded();
    ctx.requeue = Some(requeue_tx);
    let ctx = Arc::new(ctx);
    if let Ok(labels) = node::ensure_node_object(&ctx).await {
        ctx.set_labels(labels);
    }
    let failures = Arc::new(Failures::default());
    let (drift_tx, drift_rx) = futures::channel::mpsc::unbounded();
    let drift = drift::forward(
        engine.events(),
        domain_store.clone(),
        metrics.clone(),
        drift_tx,
    );
    let (net_tx, net_rx) = futures::channel::mpsc::unbounded();
    let (pool_tx, pool_rx) = futures::channel::mpsc::unbounded();
    let on_labels = {
        let (network_store, pool_store) = (network_store.clone(), pool_store.clone());
        move || {
            for n in network_store.state() {
                let _ = net_tx.unbounded_send(ObjectRef::from_obj(&*n));
            }
            for p in pool_store.state() {
                let _ = pool_tx.unbounded_send(ObjectRef::from_obj(&*p));
            }
        }
    };
    let domains = drive(
        domain_controller.reconcile_on(futures::stream::select(drift_rx, requeue_rx)),
        domain::reconcile,
        domain::KIND,
        ctx.clone(),
        failures.clone(),
    );
    let volumes = drive(
        volume_controller,
        volume::reconcile,
        volume::KIND,
        ctx.clone(),
        failures.clone(),
    );
    let networks = drive(
        network_controller.reconcile_on(net_rx),
        network::reconcile,
        network::KIND,
        ctx.clone(),
        failures.clone(),
    );
    let pools = drive(
        pool_controller.reconcile_on(pool_rx),
        pool::reconcile,
        pool::KIND,
        ctx.clone(),
        failures.clone(),
    );
    let sweeper = {
        let (ctx, store) = (ctx.clone(), domain_store.clone());
        let every = ctx.settings.resync;
        async move {
            if store.wait_until_ready().await.is_err() {
                return;
            }
            loop {
                let _ = sweep::sweep(&ctx, &store).await;
                tokio::time::sleep(every).await;
            }
        }
    };
    let publisher = node::run(
        ctx.clone(),
        domain_store,
        config.migration_uri.clone(),
        config.heartbeat,
        recovered_rx,
        on_labels,
        stop_rx,
    );
    let work = async {
        tokio::join!(domains, volumes, networks, pools, publisher, sweeper);
    };
    tokio::select! {
        _ = work => {}
        _ = drift => {}
    }
    Ok(())
}

/// A kube client for `identity` made inside the calling runtime (its connections belong to
/// that runtime and die with it).
async fn kube_client(url: &str, identity: &str) -> Result<Client, String> {
    virtkube_testapi::kubeconfig::client(url, identity)
        .await
        .map_err(|e| e.to_string())
}

/// Starts a controller replica (identity `identity`) with short lease timings.
pub fn start_controller(api_url: &str, identity: &str) -> Instance {
    use virtkube::cluster::leader::LeaseConfig;
    use virtkube::cluster::settings::Settings as CtlSettings;
    let runtime = Instance::runtime(&format!("ctl-{identity}"));
    let failed = Arc::new(Mutex::new(None));
    let (url, identity, f) = (api_url.to_string(), identity.to_string(), failed.clone());
    runtime.spawn(async move {
        let client = match kube_client(&url, &identity).await {
            Ok(c) => c,
            Err(e) => {
                if let Ok(mut f) = f.lock() {
                    *f = Some(e);
                }
                return;
            }
        };
        let config = virtkube::cluster::Config {
            settings: CtlSettings {
                memory_reserve: 64 << 20,
                move_backoff: Duration::from_secs(1),
                move_backoff_max: Duration::from_secs(4),
                ..CtlSettings::default()
            },
            lease: LeaseConfig {
                namespace: "default".into(),
                name: "virtkube-controller".into(),
                identity,
                duration: Duration::from_secs(2),
                renew_deadline: Duration::from_millis(1500),
                retry_period: Duration::from_millis(200),
            },
            resync: resync(),
        };
        let metrics = virtkube::cluster::metrics::Metrics::register(&mut Registry::default());
        let instance = virtkube::cluster::spawn(client, config, metrics);
        // Runs until the runtime is shut down.
        futures::future::pending::<()>().await;
        drop(instance);
    });
    Instance {
        runtime: Some(runtime),
        engine: Arc::new(Mutex::new(None)),
        failed,
    }
}

/// The agents of `nodes` and one controller, in this process (see the module's words on what
/// a kill models).
pub struct InProcessFleet {
    api_url: String,
    configs: Vec<AgentConfig>,
    agents: Mutex<Vec<Option<Instance>>>,
    controller: Mutex<Option<Instance>>,
    /// Mutating libvirt calls of agents killed so far.
    dead_mutations: std::sync::atomic::AtomicU64,
}

impl InProcessFleet {
    /// Starts every agent and the controller.
    pub fn start(api_url: &str, agents: Vec<AgentConfig>) -> Self {
        quiet_killed_runtimes();
        InProcessFleet {
            api_url: api_url.to_string(),
            agents: Mutex::new(
                agents
                    .iter()
                    .map(|c| Some(start_agent(c.clone())))
                    .collect(),
            ),
            configs: agents,
            controller: Mutex::new(Some(start_controller(api_url, "ctl"))),
            dead_mutations: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Kills everything (the end of a campaign).
    pub fn stop(self) {
        let agents = self.agents.into_inner().unwrap_or_default();
        for i in agents.into_iter().flatten() {
            i.kill();
        }
        if let Some(c) = self.controller.into_inner().ok().flatten() {
            c.kill();
        }
    }
}

/// A killed runtime cancels the reconciles it spawned while kube-runtime's applier may still
/// poll their join handles, which it unwraps: that panic, on a thread of a runtime being
/// shut down, is the kill itself, not a finding. Other panics are reported as usual.
fn quiet_killed_runtimes() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current();
            let name = thread.name().unwrap_or_default();
            let message = info
                .payload()
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            let killed = (name.starts_with("agent-") || name.starts_with("ctl-"))
                && message.contains("JoinError::Cancelled");
            if !killed {
                previous(info);
            }
        }));
    });
}

impl super::campaign::Fleet for InProcessFleet {
    fn progress(&self, api: &virtkube_testapi::TestApi) -> u64 {
        let live: u64 = self
            .agents
            .lock()
            .map(|a| a.iter().flatten().map(Instance::mutations).sum())
            .unwrap_or(0);
        self.dead_mutations
            .load(std::sync::atomic::Ordering::SeqCst)
            + live
            + api.resource_version()
    }

    fn kill(&self, victim: super::campaign::Victim) {
        match victim {
            super::campaign::Victim::Agent(n) => {
                let taken = self.agents.lock().ok().and_then(|mut a| a[n].take());
                if let Some(i) = taken {
                    self.dead_mutations
                        .fetch_add(i.mutations(), std::sync::atomic::Ordering::SeqCst);
                    i.kill();
                }
            }
            super::campaign::Victim::Controller => {
                let taken = self.controller.lock().ok().and_then(|mut c| c.take());
                if let Some(c) = taken {
                    c.kill();
                }
            }
        }
    }

    fn restart(&self, victim: super::campaign::Victim) {
        match victim {
            super::campaign::Victim::Agent(n) => {
                if let Ok(mut a) = self.agents.lock()
                    && a[n].is_none()
                {
                    a[n] = Some(start_agent(self.configs[n].clone()));
                }
            }
            // A crashed container restarts in the same pod, under the same name: it takes
            // its own Lease back at once.
            super::campaign::Victim::Controller => {
                if let Ok(mut c) = self.controller.lock()
                    && c.is_none()
                {
                    *c = Some(start_controller(&self.api_url, "ctl"));
                }
            }
        }
    }

    fn agents(&self) -> usize {
        self.configs.len()
    }

    fn harness_error(&self) -> Option<String> {
        let agents = self.agents.lock().ok()?;
        for (c, i) in self.configs.iter().zip(agents.iter()) {
            if let Some(e) = i.as_ref().and_then(|i| i.failed.lock().ok()?.clone()) {
                return Some(format!("agent {} failed: {e}", c.node));
            }
        }
        let ctl = self.controller.lock().ok()?;
        let e = ctl.as_ref()?.failed.lock().ok()?.clone()?;
        Some(format!("controller failed: {e}"))
    }
}
