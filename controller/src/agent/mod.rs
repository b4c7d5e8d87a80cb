//! `virtkube agent`: the per-node operator process (one per hypervisor node, a DaemonSet).
//!
//! It watches virtkube's resources, reconciles those that concern its node against the
//! node's libvirt through the engine, and writes back status and events:
//!
//! | Module | Job |
//! |---|---|
//! | [`domain`], [`volume`], [`network`], [`pool`] | one controller per kind |
//! | [`converge`] | the adapter to the reconcile core (observe, change, report) |
//! | [`ownership`] | which image in a pool is a Volume's own |
//! | [`partition`] | which partition of a `disk` pool is a Volume's |
//! | [`node`] | the `HypervisorNode` publisher (facts and heartbeat) |
//! | [`drift`] | libvirt events -> reconcile requests |
//! | [`echoes`] | the agent's own writes and libvirt calls coming back, recognised so they trigger nothing |
//! | [`metrics`], [`http`], [`readiness`] | Prometheus metrics, `/healthz`, `/readyz` and why not ready |
//! | [`api_health`], [`api_client`], [`watches`], [`backoff`] | surviving API server outages: the probe, client timeouts, watches that restart, retry backoffs |
//! | [`guest_metrics`] | per-guest statistics on `/metrics`, one libvirt call per scrape |
//! | [`pernode`] | per-node status entries of pools and networks |
//! | [`reconcile`] | the skeleton every controller shares (finalizer, failure count, events) |
//! | [`context`], [`error`] | what reconcilers share; the one error type |
//!
//! When the API server goes away (stopped, hung, failing), the agent keeps its guests and
//! its libvirt state as they are, says so in `/readyz` within seconds, and, once the server
//! answers again, restarts every watch and retries every object whose reconcile failed
//! meanwhile at once (see [`api_health`]).
//!
//! Stopping the agent (SIGTERM, SIGINT) stops taking new work, lets reconciles in flight
//! finish (up to `--shutdown-deadline`), and exits. It never stops a guest: the next agent
//! adopts what it finds.

pub mod api_client;
pub mod api_health;
pub mod backoff;
pub mod context;
pub mod converge;
pub mod domain;
pub mod drift;
pub mod echoes;
pub mod error;
pub mod guest_metrics;
pub mod http;
pub mod local;
pub mod metrics;
pub mod moves;
pub mod network;
pub mod node;
pub mod ownership;
pub mod partition;
pub mod pernode;
pub mod pool;
pub mod readiness;
pub mod reconcile;
pub mod sweep;
pub mod volume;
pub mod watches;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::channel::mpsc::UnboundedSender;
use futures::{FutureExt, StreamExt};
use kube::api::{Api, ListParams};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, predicates, reflector, watcher};
use kube::{Client, Resource};
use prometheus_client::registry::Registry;
use virtkube_crds::{Domain, HypervisorNode, Network, StoragePool, Volume};
use virtkube_engine::EngineConfig;

use crate::host::{HostSpec, Hosts};
use crate::placement;

use self::context::{Context, Settings};
use self::error::Error;
use self::http::Health;
use self::metrics::Metrics;

pub use crate::service::LogFormat;

/// Arguments of `virtkube agent`.
#[derive(clap::Args, Debug, Clone)]
pub struct AgentArgs {
    /// This node's name (in a cluster, from the downward API: `spec.nodeName`).
    #[arg(long, env = "VIRTKUBE_NODE_NAME")]
    pub node_name: String,
    /// The libvirt URI of this node.
    #[arg(long, env = "VIRTKUBE_CONNECT", default_value = "qemu:///system")]
    pub connect: String,
    /// Where `/metrics`, `/healthz` and `/readyz` listen.
    #[arg(long, env = "VIRTKUBE_METRICS_ADDR", default_value = "0.0.0.0:9090")]
    pub metrics_addr: SocketAddr,
    /// Per-guest metrics on `/metrics` for at most this many virtkube-owned domains (the
    /// first by namespace and name; 0 turns them off). Bounds their cardinality.
    #[arg(
        long,
        env = "VIRTKUBE_GUEST_METRICS_MAX_DOMAINS",
        default_value_t = 1000
    )]
    pub guest_metrics_max_domains: usize,
    /// Log format.
    #[arg(long, env = "VIRTKUBE_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Seconds between two looks at a converged object (libvirt events catch changes
    /// sooner; this is the safety net).
    #[arg(long, default_value_t = 300)]
    pub resync_seconds: u64,
    /// Reconciles in flight at once, per kind. A reconcile mostly waits on API round trips
    /// (libvirt calls are bounded by the engine's own pool), so 16 overlap well: with 1,000
    /// new Domains the agent kept up with the controller's claims at 16 and fell 20-30 s
    /// behind at 4, for 0.3 MiB more peak RSS (controller/benches/scale/notes.md).
    #[arg(long, default_value_t = 16)]
    pub concurrency: u16,
    /// Seconds a deleted or stopped domain's guest gets to shut down before it is powered off.
    #[arg(long, default_value_t = 30)]
    pub shutdown_timeout_seconds: u64,
    /// Seconds between two HypervisorNode heartbeats.
    #[arg(long, default_value_t = 30)]
    pub heartbeat_seconds: u64,
    /// Seconds the agent waits for reconciles in flight when told to stop.
    #[arg(long, default_value_t = 25)]
    pub shutdown_deadline_seconds: u64,
    /// The migration data URI of this node, e.g. `tcp://10.0.0.2` (published in the
    /// HypervisorNode's `status.migrationUri`).
    #[arg(long, env = "VIRTKUBE_MIGRATION_URI")]
    pub migration_uri: Option<String>,
    /// The libvirt URI other agents open to reach this node, e.g.
    /// `qemu+tls://node-a/system` (published as an annotation; a domain can be migrated
    /// here only when it is set).
    #[arg(long, env = "VIRTKUBE_LIBVIRT_CLIENT_URI")]
    pub libvirt_client_uri: Option<String>,
    /// The URI a source libvirtd uses to reach this node in a peer-to-peer migration
    /// (defaults to the client URI).
    #[arg(long, env = "VIRTKUBE_LIBVIRT_PEER_URI")]
    pub libvirt_peer_uri: Option<String>,
    /// Encrypt live migrations from this node with TLS (libvirt's `VIR_MIGRATE_TLS`): QEMU
    /// streams guest memory (and copied disks) over TLS instead of plain TCP. Every node's
    /// libvirtd needs QEMU's x509 certificates (`migrate_tls_x509_cert_dir` or
    /// `default_tls_x509_cert_dir` in qemu.conf); without them the migration fails and the
    /// guest stays on the source.
    #[arg(long, env = "VIRTKUBE_MIGRATION_TLS")]
    pub migration_tls: bool,
    /// Allow disks from host paths (administrators only).
    #[arg(long)]
    pub allow_host_paths: bool,
    /// Seconds between two probes of the Kubernetes API (`GET /version`) while it answers;
    /// an outage shows in `/readyz` within this plus the probe timeout.
    #[arg(long, default_value_t = 2.0)]
    pub api_probe_seconds: f64,
    /// Seconds a probe of the Kubernetes API may wait for its answer.
    #[arg(long, default_value_t = 2.0)]
    pub api_probe_timeout_seconds: f64,
}

impl AgentArgs {
    /// The API health monitor's settings from the flags (out-of-range values fall back to
    /// the defaults).
    pub fn probe_settings(&self) -> api_health::ProbeSettings {
        let defaults = api_health::ProbeSettings::default();
        let secs = |value: f64, default: Duration| {
            Duration::try_from_secs_f64(value)
                .ok()
                .filter(|d| !d.is_zero())
                .unwrap_or(default)
        };
        let period = secs(self.api_probe_seconds, defaults.period);
        api_health::ProbeSettings {
            period,
            period_while_down: defaults.period_while_down.min(period),
            timeout: secs(self.api_probe_timeout_seconds, defaults.timeout),
        }
    }
}

/// Runs the agent until SIGTERM or SIGINT.
pub fn run(args: &AgentArgs) -> anyhow::Result<ExitCode> {
    crate::service::run(args.log_format, run_async(args.clone()))
}

/// The exact words printed when the CRDs are missing.
pub fn crds_missing_message(missing: &[String]) -> String {
    format!(
        "virtkube's CustomResourceDefinitions are not installed in this cluster (missing: {}).\n\
         Install them, then start the agent again:\n  \
         virtkube crd | kubectl apply --server-side -f -\n\
         or, from a checkout:\n  \
         kubectl apply --server-side -f charts/virtkube/crds/",
        missing.join(", ")
    )
}

/// Checks that every virtkube CRD is served (a list of one object answers 404 otherwise).
pub async fn check_crds(client: &Client) -> Result<(), Error> {
    async fn served<K>(client: &Client) -> Result<Option<String>, Error>
    where
        K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        let api: Api<K> = Api::all(client.clone());
        match api.list_metadata(&ListParams::default().limit(1)).await {
            Ok(_) => Ok(None),
            Err(kube::Error::Api(status)) if status.code == 404 => {
                Ok(Some(format!("{}.{}", K::plural(&()), K::group(&()))))
            }
            Err(e) => Err(Error::Kube(e)),
        }
    }
    let mut missing = Vec::new();
    missing.extend(served::<Domain>(client).await?);
    missing.extend(served::<Volume>(client).await?);
    missing.extend(served::<Network>(client).await?);
    missing.extend(served::<StoragePool>(client).await?);
    missing.extend(served::<HypervisorNode>(client).await?);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::CrdsMissing(crds_missing_message(&missing)))
    }
}

/// Clears an object's `managedFields` before it enters a watch cache: the agent never reads
/// them, and they are a large part of a small object (with 1,000 Domains the agent's peak RSS
/// fell from 98.5 to 79.7 MiB without them; docs/performance.md).
fn drop_managed_fields<K: kube::Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
}

/// The objects of a trigger watch (one that reconciles another kind) that changed: a
/// relist of unchanged objects (after an outage, or a 410) triggers nothing, while every
/// change and observed deletion (each has a new resourceVersion) still does.
fn only_changes<K, S>(objects: S) -> impl futures::Stream<Item = Result<K, watcher::Error>> + Send
where
    K: Resource + Send + 'static,
    S: futures::Stream<Item = Result<K, watcher::Error>> + Send,
{
    objects.predicate_filter(predicates::resource_version, Default::default())
}

/// How long to wait for libvirt at start-up after `attempt` failed tries: 1 s, 2 s, 4 s …
/// up to 30 s, jittered.
fn libvirt_wait(attempt: u32) -> Duration {
    backoff::Policy {
        initial: Duration::from_secs(1),
        max: Duration::from_secs(30),
    }
    .next(attempt.saturating_add(1))
}

async fn run_async(args: AgentArgs) -> anyhow::Result<()> {
    let kube_config = kube::Config::infer()
        .await
        .context("no Kubernetes configuration: run inside a cluster or set KUBECONFIG")?;
    let client = api_client::requests(&kube_config).context("building the Kubernetes client")?;
    let watch_client =
        api_client::watches(&kube_config).context("building the Kubernetes watch client")?;
    check_crds(&client).await?;
    // libvirtd may start after the agent (a node booting, a daemon upgrade): wait for it
    // with backoff rather than exiting into a crash loop; SIGTERM still stops the wait.
    let spec = HostSpec {
        node: args.node_name.clone(),
        uri: args.connect.clone(),
        p2p_uri: None,
        migration_uri: args.migration_uri.clone(),
    };
    let mut attempt = 0u32;
    let mut hosts = loop {
        match Hosts::connect(std::slice::from_ref(&spec), EngineConfig::default()).await {
            Ok(hosts) => break hosts,
            Err(e) => {
                let wait = libvirt_wait(attempt);
                attempt += 1;
                tracing::warn!(uri = %args.connect, error = %e, retry_in = ?wait, "libvirt is not reachable yet");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    signal = wait_for_signal() => {
                        tracing::info!(signal, "stopping before libvirt was reached");
                        return Ok(());
                    }
                }
            }
        }
    };
    hosts.shutdown_deadline = Duration::from_secs(args.shutdown_timeout_seconds);
    let engine = hosts.get(&args.node_name)?.engine.clone();
    let mut settings = Settings::for_node(&args.node_name);
    settings.resync = Duration::from_secs(args.resync_seconds.max(1));
    settings.shutdown_timeout = Duration::from_secs(args.shutdown_timeout_seconds);
    settings.allow_host_paths = args.allow_host_paths;
    settings.client_uri = args.libvirt_client_uri.clone();
    settings.peer_uri = args.libvirt_peer_uri.clone();
    settings.migration_uri = args.migration_uri.clone();
    settings.migration_tls = args.migration_tls;
    let node_info = engine.node_info().await?;
    settings.host_cpus = Some(node_info.cpus);
    settings.online_cpus = node_info.cpu_map.map(|m| m.online.to_string());
    tracing::info!(node = %settings.node, uri = %args.connect, "virtkube agent starting");

    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry, Some(engine.clone()));
    let health = Arc::new(Health::default());
    // The CRD check has just been answered.
    health.api_up();
    Metrics::register_readiness(&mut registry, health.clone(), Some(engine.clone()));

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let shutdown = {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
        .boxed()
        .shared()
    };
    let (addr, http_task) = http::serve(
        args.metrics_addr,
        http::router_with_guest_metrics(
            Arc::new(registry),
            health.clone(),
            Some(engine.clone()),
            guest_metrics::GuestMetricsConfig {
                max_domains: args.guest_metrics_max_domains,
                ..Default::default()
            },
        ),
        shutdown.clone(),
    )
    .await?;
    tracing::info!(%addr, "metrics and health endpoints listening");

    // The API health monitor: `/readyz`, and the signal that restarts every watch and
    // retries what failed when the API server is back after an outage.
    let (recovered_tx, recovered_rx) = tokio::sync::watch::channel(api_health::Recovery::none());
    let monitor = api_health::run(
        client.clone(),
        args.probe_settings(),
        health.clone(),
        metrics.clone(),
        recovered_tx,
        stop_rx.clone(),
    );

    let config = controller::Config::default().concurrency(args.concurrency.max(1));
    let watch = watches::config;
    let watches = watches::Watches::new(watch_client, recovered_rx.clone(), metrics.clone())
        .reporting_to(health.clone());
    // Domains: only those the controller routed here (this node holds them, or a move
    // targets it), and only changes that matter to the protocol or the spec: the agent's
    // own status writes do not come back as reconciles.
    let (domain_store, domain_writer) = reflector::store();
    let domain_stream = watches
        .all::<Domain>(watch().labels(&placement::write::node_label(&args.node_name)))
        .modify(drop_managed_fields)
        .reflect(domain_writer)
        .applied_objects()
        .predicate_filter(domain::trigger_hash, Default::default());
    // After the trigger filter, which must see every version (a finalizer someone else
    // removes after the agent's echo is a change to that echo, and a trigger).
    let echoes = Arc::new(echoes::Echoes::default());
    let domain_stream = echoes::without_own_writes(domain_stream, echoes.clone());
    let domain_controller =
        Controller::for_stream(domain_stream, domain_store).with_config(config.clone());
    let (volume_store, volume_writer) = reflector::store();
    let volume_controller = Controller::for_stream(
        watches
            .all::<Volume>(watch())
            .modify(drop_managed_fields)
            .reflect(volume_writer)
            .applied_objects(),
        volume_store,
    )
    .with_config(config.clone());
    let (network_store, network_writer) = reflector::store();
    let network_controller = Controller::for_stream(
        watches
            .all::<Network>(watch())
            .modify(drop_managed_fields)
            .reflect(network_writer)
            .applied_objects(),
        network_store,
    )
    .with_config(config.clone());
    let (pool_store, pool_writer) = reflector::store();
    let pool_controller = Controller::for_stream(
        watches
            .all::<StoragePool>(watch())
            .modify(drop_managed_fields)
            .reflect(pool_writer)
            .applied_objects(),
        pool_store,
    )
    .with_config(config.clone());
    let domain_store = domain_controller.store();
    // A domain waiting for its Volume (VolumeNotReady) is reconciled again as soon as the
    // Volume changes, instead of at its next backoff.
    let domain_controller = {
        let (by_volume, by_network) = (domain_store.clone(), domain_store.clone());
        domain_controller
            .watches_stream(
                only_changes(watches.all::<Volume>(watch()).touched_objects()),
                move |vol: Volume| domain::users_of(&by_volume, &vol),
            )
            .watches_stream(
                only_changes(watches.all::<Network>(watch()).touched_objects()),
                move |net: Network| domain::users_of_network(&by_network, &net),
            )
    };
    // Likewise a Volume waiting for its pool (PoolMissing) or for the volume it copies.
    let volume_store = volume_controller.store();
    let volume_controller = {
        let (by_pool, by_source) = (volume_store.clone(), volume_store.clone());
        volume_controller
            .watches_stream(
                only_changes(watches.all::<StoragePool>(watch()).touched_objects()),
                move |pool: StoragePool| volume::in_pool(&by_pool, &pool),
            )
            .watches_stream(
                only_changes(watches.all::<Volume>(watch()).touched_objects()),
                move |source: Volume| volume::copies_of(&by_source, &source),
            )
            // `usedBy` follows the Domains that name a volume.
            .watches_stream(
                only_changes(watches.all::<Domain>(watch()).touched_objects()),
                |dom: Domain| volume::used_by_domain(&dom),
            )
    };
    let network_store = network_controller.store();
    let pool_store = pool_controller.store();

    let mut ctx = Context::new(client.clone(), hosts, metrics.clone(), settings)?;
    ctx.queue_events();
    // Domains resolve their disks through the Volume controller's cache.
    ctx.volumes = Some(volume_store.clone());
    ctx.domains = Some(domain_store.clone());
    ctx.echoes = echoes.clone();
    // Migration tasks ask for a reconcile of their domain when libvirt returns.
    let (requeue_tx, requeue_rx) = futures::channel::mpsc::unbounded();
    ctx.requeue = Some(requeue_tx.clone());
    let ctx = Arc::new(ctx);
    // Pools and networks are selected by this node's labels: read them before the first
    // reconcile (the publisher keeps them current afterwards).
    match node::ensure_node_object(&ctx).await {
        Ok(labels) => {
            ctx.set_labels(labels);
        }
        Err(e) => {
            tracing::warn!(error = %e, "reading this node's HypervisorNode failed; pools and networks with a nodeSelector wait for the next heartbeat")
        }
    }
    let failures = Arc::new(backoff::Failures::default());

    // Domains, with libvirt events as an extra trigger.
    let (drift_tx, drift_rx) = futures::channel::mpsc::unbounded();
    let drift = drift::forward_unexpected(
        engine.events(),
        echoes,
        domain_store.clone(),
        metrics.clone(),
        drift_tx,
    );
    // Pools and networks again when the node's labels change.
    let (net_tx, net_rx) = futures::channel::mpsc::unbounded();
    let (pool_tx, pool_rx) = futures::channel::mpsc::unbounded();
    let (volume_tx, volume_rx) = futures::channel::mpsc::unbounded();
    // What failed during an API outage is retried as soon as the server is back.
    let retry_after_outage = retry_failed_on_recovery(
        failures.clone(),
        Requeues {
            domains: requeue_tx,
            volumes: volume_tx,
            networks: net_tx.clone(),
            pools: pool_tx.clone(),
        },
        metrics.clone(),
        recovered_rx.clone(),
        stop_rx.clone(),
    );
    let on_labels = {
        let (network_store, pool_store) = (network_store.clone(), pool_store.clone());
        move || {
            for n in network_store.state() {
                let _ = net_tx.unbounded_send(kube::runtime::reflector::ObjectRef::from_obj(&*n));
            }
            for p in pool_store.state() {
                let _ = pool_tx.unbounded_send(kube::runtime::reflector::ObjectRef::from_obj(&*p));
            }
        }
    };
    let domains = drive(
        domain_controller
            .reconcile_on(futures::stream::select(drift_rx, requeue_rx))
            .graceful_shutdown_on(shutdown.clone()),
        domain::reconcile,
        domain::KIND,
        ctx.clone(),
        failures.clone(),
    );
    let volumes = drive(
        volume_controller
            .reconcile_on(volume_rx)
            .graceful_shutdown_on(shutdown.clone()),
        volume::reconcile,
        volume::KIND,
        ctx.clone(),
        failures.clone(),
    );
    let networks = drive(
        network_controller
            .reconcile_on(net_rx)
            .graceful_shutdown_on(shutdown.clone()),
        network::reconcile,
        network::KIND,
        ctx.clone(),
        failures.clone(),
    );
    let pools = drive(
        pool_controller
            .reconcile_on(pool_rx)
            .graceful_shutdown_on(shutdown.clone()),
        pool::reconcile,
        pool::KIND,
        ctx.clone(),
        failures.clone(),
    );
    let sweeper = {
        let (ctx, store, mut stop) = (ctx.clone(), domain_store.clone(), stop_rx.clone());
        let every = ctx.settings.resync;
        async move {
            // Only once the watch cache is filled: before, every Domain looks unrouted.
            if store.wait_until_ready().await.is_err() {
                return;
            }
            loop {
                match sweep::sweep(&ctx, &store).await {
                    Ok(swept) => tracing::debug!(?swept, "sweep of copies not routed here"),
                    Err(e) => tracing::warn!(error = %e, "sweep of copies not routed here failed"),
                }
                let routed: std::collections::HashSet<String> = store
                    .state()
                    .iter()
                    .filter_map(|d| d.metadata.uid.clone())
                    .collect();
                ctx.echoes
                    .prune(|uid| routed.contains(uid), std::time::Instant::now());
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        }
    };
    let publisher = node::run(
        ctx.clone(),
        domain_store,
        args.migration_uri.clone(),
        Duration::from_secs(args.heartbeat_seconds.max(1)),
        recovered_rx,
        on_labels,
        stop_rx.clone(),
    );

    health
        .controllers_running
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let work = async {
        tokio::join!(
            domains,
            volumes,
            networks,
            pools,
            publisher,
            sweeper,
            monitor,
            retry_after_outage
        );
    };
    let signals = wait_for_signal();
    tokio::pin!(work);
    tokio::select! {
        _ = &mut work => {
            tracing::warn!("controllers stopped on their own");
        }
        _ = drift => {}
        signal = signals => {
            tracing::info!(signal, "stopping: no new work; reconciles in flight may finish; guests keep running");
            health.controllers_running.store(false, std::sync::atomic::Ordering::SeqCst);
            let _ = stop_tx.send(true);
            let deadline = Duration::from_secs(args.shutdown_deadline_seconds);
            if tokio::time::timeout(deadline, &mut work).await.is_err() {
                tracing::warn!(?deadline, "reconciles still in flight at the deadline: abandoned (each libvirt call is atomic; the next agent picks up where this one stopped)");
            }
        }
    }
    let _ = stop_tx.send(true);
    // The events of the last reconciles, while the API server still answers.
    if let Some(queue) = &ctx.event_queue
        && tokio::time::timeout(Duration::from_secs(2), queue.flush())
            .await
            .is_err()
    {
        tracing::info!("events still queued at the deadline: not published");
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), http_task).await;
    if let Err(e) = engine.close().await {
        tracing::warn!(error = %e, "closing the libvirt connection failed");
    }
    tracing::info!("virtkube agent stopped");
    Ok(())
}

async fn wait_for_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = tokio::signal::ctrl_c() => "SIGINT",
            },
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                "SIGINT"
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "SIGINT"
    }
}

/// Runs one controller to its end: per-object exponential backoff on failures, reset on
/// success. Public so test harnesses that assemble an agent in-process drive its
/// controllers exactly as the process does.
pub async fn drive<K, R, Fut>(
    controller: Controller<K>,
    reconcile: R,
    kind: &'static str,
    ctx: Arc<Context>,
    failures: Arc<backoff::Failures>,
) where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    R: FnMut(Arc<K>, Arc<Context>) -> Fut,
    Fut: std::future::Future<Output = Result<Action, Error>> + Send + 'static,
{
    let f = failures.clone();
    controller
        .run(
            reconcile,
            move |obj: Arc<K>, err: &Error, _ctx: Arc<Context>| {
                let meta = obj.meta();
                let key = backoff::ObjectKey {
                    kind,
                    namespace: meta.namespace.clone(),
                    name: meta.name.clone().unwrap_or_default(),
                };
                error_policy(&f, &key, err)
            },
            ctx,
        )
        .for_each(|result| {
            note_result(&failures, kind, result);
            futures::future::ready(())
        })
        .await;
}

/// `namespace/name` (or `name`) of an object, for logs.
pub fn key_of<K: Resource>(obj: &K) -> String {
    let meta = obj.meta();
    match (&meta.namespace, &meta.name) {
        (Some(ns), Some(n)) => format!("{ns}/{n}"),
        (None, Some(n)) => n.clone(),
        _ => String::new(),
    }
}

/// Retry with exponential backoff per object; bad input never crash-loops the agent.
pub fn error_policy(
    failures: &backoff::Failures,
    key: &backoff::ObjectKey,
    error: &Error,
) -> Action {
    let wait = failures.failed(key);
    tracing::warn!(object = %key, error = %error, retry_in = ?wait, "reconcile failed");
    Action::requeue(wait)
}

/// Logs one reconcile outcome and resets the backoff of an object that succeeded.
fn note_result<K, E1, E2>(
    failures: &backoff::Failures,
    kind: &'static str,
    result: Result<(kube::runtime::reflector::ObjectRef<K>, Action), controller::Error<E1, E2>>,
) where
    K: Resource,
    E1: std::error::Error,
    E2: std::error::Error,
{
    match result {
        Ok((obj, _)) => failures.succeeded(&backoff::ObjectKey {
            kind,
            namespace: obj.namespace.clone(),
            name: obj.name.clone(),
        }),
        // Already logged by the error policy.
        Err(controller::Error::ReconcilerFailed(_, _)) => {}
        Err(e) => tracing::debug!(kind, error = %e, "controller"),
    }
}

/// Where each controller takes extra reconcile requests.
struct Requeues {
    domains: UnboundedSender<ObjectRef<Domain>>,
    volumes: UnboundedSender<ObjectRef<Volume>>,
    networks: UnboundedSender<ObjectRef<Network>>,
    pools: UnboundedSender<ObjectRef<StoragePool>>,
}

impl Requeues {
    /// Asks `key`'s controller to reconcile it now; `false` for a kind without one.
    fn send(&self, key: &backoff::ObjectKey) -> bool {
        fn reference<K: Resource<DynamicType = ()>>(key: &backoff::ObjectKey) -> ObjectRef<K> {
            let reference = ObjectRef::new(&key.name);
            match &key.namespace {
                Some(ns) => reference.within(ns),
                None => reference,
            }
        }
        // A closed channel means that controller has stopped: nothing left to retry.
        match key.kind {
            domain::KIND => {
                let _ = self.domains.unbounded_send(reference(key));
            }
            volume::KIND => {
                let _ = self.volumes.unbounded_send(reference(key));
            }
            network::KIND => {
                let _ = self.networks.unbounded_send(reference(key));
            }
            pool::KIND => {
                let _ = self.pools.unbounded_send(reference(key));
            }
            _ => return false,
        }
        true
    }
}

/// Each time the API server is back after an outage (`recovered` changes), forgets every
/// object's failure backoff and reconciles those objects now: their failures came from the
/// outage (a status write, a finalizer, a read that could not reach the server), and their
/// backoff, grown meanwhile, could otherwise keep them waiting for minutes. Runs until
/// `stop`.
async fn retry_failed_on_recovery(
    failures: Arc<backoff::Failures>,
    requeues: Requeues,
    metrics: Arc<Metrics>,
    mut recovered: tokio::sync::watch::Receiver<api_health::Recovery>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            changed = recovered.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = stop.wait_for(|s| *s) => return,
        }
        let failed = failures.drain();
        for key in &failed {
            if requeues.send(key) {
                metrics.outage_requeues.inc();
            }
        }
        if !failed.is_empty() {
            tracing::info!(
                objects = failed.len(),
                "retrying now what failed during the API outage"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::channel::mpsc;

    fn key(kind: &'static str, name: &str) -> backoff::ObjectKey {
        backoff::ObjectKey {
            kind,
            namespace: (kind != network::KIND && kind != pool::KIND).then(|| "ns".to_string()),
            name: name.to_string(),
        }
    }

    #[tokio::test]
    async fn a_recovery_requeues_every_failed_object_once_and_forgets_its_backoff() {
        let failures = Arc::new(backoff::Failures::default());
        let (domains, mut domain_requests) = mpsc::unbounded();
        let (volumes, mut volume_requests) = mpsc::unbounded();
        let (networks, _network_requests) = mpsc::unbounded();
        let (pools, _pool_requests) = mpsc::unbounded();
        let metrics = Arc::new(Metrics::default());
        let (recovered, recovered_rx) = tokio::sync::watch::channel(api_health::Recovery::none());
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let retrier = tokio::spawn(retry_failed_on_recovery(
            failures.clone(),
            Requeues {
                domains,
                volumes,
                networks,
                pools,
            },
            metrics.clone(),
            recovered_rx,
            stop_rx,
        ));
        failures.failed(&key(domain::KIND, "vm"));
        failures.failed(&key(domain::KIND, "vm"));
        failures.failed(&key(volume::KIND, "disk"));
        let mut recovery = api_health::Recovery::none();
        recovery.epoch = 1;
        recovered.send_replace(recovery);

        let vm = domain_requests.next().await.expect("a domain request");
        assert_eq!(
            (vm.name.as_str(), vm.namespace.as_deref()),
            ("vm", Some("ns"))
        );
        let disk = volume_requests.next().await.expect("a volume request");
        assert_eq!(disk.name, "disk");
        assert_eq!(metrics.outage_requeues.get(), 2);
        assert_eq!(failures.failures(&key(domain::KIND, "vm")), 0);

        // Nothing failed since: the next recovery requeues nothing.
        recovery.epoch = 2;
        recovered.send_replace(recovery);
        stop.send_replace(true);
        retrier.await.expect("the retrier ends at stop");
        // The retrier has ended: the channel holds no second request.
        assert!(domain_requests.try_recv().is_err(), "no second request");
        assert_eq!(metrics.outage_requeues.get(), 2);
    }
}
