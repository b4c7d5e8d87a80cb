//! `virtkube controller`: the cluster-wide process (a Deployment; one active replica by
//! Lease). It never talks to libvirt: it writes decisions into resources, through the
//! placement protocol ([`crate::placement`]), and the agents carry them out.
//!
//! | Module | Job |
//! |---|---|
//! | [`view`], [`usage`] | the cluster as one read; what placed domains take from each node |
//! | [`scheduler`] | filters, score and the unschedulable message (pure) |
//! | [`decide`] | one domain's decision through `controller_step` (pure) |
//! | [`binding`], [`moves`], [`drain`], [`liveness`] | what each decision writes, and why (pure) |
//! | [`volumes`], [`labels`] | volume binding and the per-node routing labels (pure) |
//! | [`orphans`] | per-node finalizers and status entries of nodes that left the cluster |
//! | [`pass`] | one pass over the cluster: decide, write (compare-and-swap), label, report |
//! | [`work`] | the leader's watch caches and the loop of passes |
//! | [`leader`] | Lease election: one replica works, a lost lease stops it at once |
//! | [`metrics`], [`http`] | OpenMetrics, `/healthz`, `/readyz` |
//! | [`settings`], [`conditions`], [`error`] | the knobs; the conditions it writes; the one error type |
//!
//! Stopping (SIGTERM, SIGINT) stops the work, releases the Lease so a standby takes over at
//! once, and exits.

pub mod binding;
pub mod conditions;
pub mod decide;
pub mod drain;
pub mod error;
pub mod http;
pub mod labels;
pub mod leader;
pub mod liveness;
pub mod metrics;
pub mod moves;
pub mod orphans;
pub mod pass;
pub mod scheduler;
pub mod settings;
pub mod usage;
pub mod view;
pub mod volumes;
pub mod work;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::events::{Recorder, Reporter};
use anyhow::Context as _;
use futures::FutureExt;
use kube::Client;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use virtkube_crds::quantity::parse_bytes;

use crate::service::LogFormat;

use self::error::Error;
use self::http::Health;
use self::leader::{Elector, LeaseConfig};
use self::metrics::Metrics;
use self::pass::Ctx;
use self::settings::{REPORTER, Settings};

/// Arguments of `virtkube controller`.
#[derive(clap::Args, Debug, Clone)]
pub struct ControllerArgs {
    /// Where `/metrics`, `/healthz` and `/readyz` listen.
    #[arg(long, env = "VIRTKUBE_METRICS_ADDR", default_value = "0.0.0.0:9090")]
    pub metrics_addr: SocketAddr,
    /// Log format.
    #[arg(long, env = "VIRTKUBE_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// The namespace of the leader-election Lease (in a cluster: the pod's namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// The name of the leader-election Lease.
    #[arg(long, default_value = "virtkube-controller")]
    pub lease_name: String,
    /// This replica's identity in the Lease (in a cluster: the pod's name). Defaults to
    /// the host name and process id.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Seconds a Lease stays valid after its last renewal: a dead leader is replaced within
    /// this (plus one retry period).
    #[arg(long, default_value_t = 15)]
    pub lease_duration_seconds: u64,
    /// Seconds the leader keeps working without a successful renewal (less than the lease
    /// duration).
    #[arg(long, default_value_t = 10)]
    pub renew_deadline_seconds: u64,
    /// Seconds between two renewals (and between two looks of a standby).
    #[arg(long, default_value_t = 2)]
    pub retry_period_seconds: u64,
    /// A HypervisorNode whose heartbeat is older than this is unreachable.
    #[arg(long, default_value_t = 90)]
    pub heartbeat_grace_seconds: u64,
    /// Moves under way in the whole cluster at most.
    #[arg(long, default_value_t = 5)]
    pub max_migrations: usize,
    /// Moves under way out of one node at most.
    #[arg(long, default_value_t = 2)]
    pub max_migrations_per_node: usize,
    /// Memory kept free on every node for the host (a quantity: `1Gi`, `512Mi`).
    #[arg(long, default_value = "1Gi")]
    pub memory_reserve: String,
    /// Seconds an approved move may stay `Pending` (the source's agent not starting it)
    /// before it is aborted.
    #[arg(long, default_value_t = 300)]
    pub pending_move_timeout_seconds: u64,
    /// Seconds to wait before approving a move again after it failed or was aborted
    /// (doubling with each further failure of the same move).
    #[arg(long, default_value_t = 30)]
    pub move_backoff_seconds: u64,
    /// The longest such wait, in seconds.
    #[arg(long, default_value_t = 600)]
    pub move_backoff_max_seconds: u64,
    /// Seconds between two passes when nothing changes (the safety net behind the watches).
    #[arg(long, default_value_t = 180)]
    pub resync_seconds: u64,
}

/// Everything an in-process controller needs besides its client.
#[derive(Debug, Clone)]
pub struct Config {
    /// The decisions' knobs.
    pub settings: Settings,
    /// The election.
    pub lease: LeaseConfig,
    /// The longest time between two passes.
    pub resync: Duration,
}

impl ControllerArgs {
    /// The configuration these flags describe.
    pub fn config(&self) -> Result<Config, Error> {
        let memory_reserve = parse_bytes(&self.memory_reserve)
            .map_err(|e| Error::Flag(format!("--memory-reserve: {e}")))?;
        if self.renew_deadline_seconds >= self.lease_duration_seconds {
            return Err(Error::Flag(format!(
                "--renew-deadline-seconds ({}) must be less than --lease-duration-seconds ({}): the leader must stop before anyone may take its lease",
                self.renew_deadline_seconds, self.lease_duration_seconds
            )));
        }
        let identity = self.identity.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "virtkube-controller".into());
            format!("{host}-{}", std::process::id())
        });
        Ok(Config {
            settings: Settings {
                heartbeat_grace: Duration::from_secs(self.heartbeat_grace_seconds),
                max_migrations: self.max_migrations,
                max_migrations_per_node: self.max_migrations_per_node,
                memory_reserve,
                pending_timeout: Duration::from_secs(self.pending_move_timeout_seconds),
                move_backoff: Duration::from_secs(self.move_backoff_seconds),
                move_backoff_max: Duration::from_secs(self.move_backoff_max_seconds),
            },
            lease: LeaseConfig {
                namespace: self.lease_namespace.clone(),
                name: self.lease_name.clone(),
                identity,
                duration: Duration::from_secs(self.lease_duration_seconds),
                renew_deadline: Duration::from_secs(self.renew_deadline_seconds),
                retry_period: Duration::from_secs(self.retry_period_seconds.max(1)),
            },
            resync: Duration::from_secs(self.resync_seconds.max(1)),
        })
    }
}

/// A controller running in this process.
pub struct Instance {
    /// `true` while this replica leads (and works).
    pub leading: watch::Receiver<bool>,
    /// Its metrics.
    pub metrics: Arc<Metrics>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Instance {
    /// Stops as on SIGTERM: the work stops, the Lease is released, and this returns when
    /// both are done.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }

    /// Stops as a crash would: nothing is released (the Lease expires on its own).
    pub async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// Aborts a task when dropped, so that stopping the supervisor stops its work too.
struct AbortOnDrop(tokio::task::JoinHandle<Result<(), Error>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts a controller replica on `client`: it runs for the Lease, and works while it
/// holds it.
pub fn spawn(client: Client, config: Config, metrics: Arc<Metrics>) -> Instance {
    let (stop, stop_rx) = watch::channel(false);
    let (leading_tx, leading) = watch::channel(false);
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: REPORTER.into(),
            instance: Some(config.lease.identity.clone()),
        },
    );
    let events = crate::event_queue::EventQueue::spawn(
        recorder.clone(),
        crate::event_queue::CAPACITY,
        crate::event_queue::LANES,
        metrics.events.clone(),
    );
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        settings: config.settings.clone(),
        metrics: metrics.clone(),
        recorder,
        events: Some(events),
    });
    let elector = Elector::new(client, config.lease.clone());
    let election = leader::run(elector, leading_tx, stop_rx.clone());
    let supervisor = supervise(ctx, leading.clone(), stop_rx, config.resync);
    let task = tokio::spawn(async move {
        tokio::join!(election, supervisor);
    });
    Instance {
        leading,
        metrics,
        stop,
        task,
    }
}

/// Runs the leader's work exactly while `leading` is true; stops it the moment it turns
/// false or `stop` is set.
async fn supervise(
    ctx: Arc<Ctx>,
    mut leading: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
    resync: Duration,
) {
    loop {
        let go = tokio::select! {
            r = leading.wait_for(|l| *l) => r.is_ok(),
            _ = stop.wait_for(|s| *s) => false,
        };
        if !go {
            return;
        }
        ctx.metrics.leader.set(1);
        let mut work = AbortOnDrop(tokio::spawn(work::lead(ctx.clone(), resync)));
        let ended = tokio::select! {
            _ = leading.wait_for(|l| !*l) => None,
            _ = stop.wait_for(|s| *s) => None,
            result = &mut work.0 => Some(result),
        };
        if let Some(result) = ended {
            match result {
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "the leader's work stopped; starting it again")
                }
                Ok(Ok(())) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "the leader's work panicked; starting it again")
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        work.0.abort();
        let _ = (&mut work.0).await;
        ctx.metrics.leader.set(0);
        if *stop.borrow() {
            return;
        }
    }
}

/// Runs `virtkube controller` until SIGTERM or SIGINT.
pub fn run(args: &ControllerArgs) -> anyhow::Result<ExitCode> {
    crate::service::run(args.log_format, run_async(args.clone()))
}

async fn run_async(args: ControllerArgs) -> anyhow::Result<()> {
    let config = args.config()?;
    let client = Client::try_default()
        .await
        .context("no Kubernetes configuration: run inside a cluster or set KUBECONFIG")?;
    crate::agent::check_crds(&client)
        .await
        .map_err(Error::from)?;
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let health = Arc::new(Health::default());
    let (stop_http, stop_http_rx) = watch::channel(false);
    let shutdown = {
        let mut rx = stop_http_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
        .boxed()
    };
    let (addr, http_task) = http::serve(
        args.metrics_addr,
        http::router(Arc::new(registry), health.clone()),
        shutdown,
    )
    .await?;
    tracing::info!(%addr, identity = %config.lease.identity, lease = %format!("{}/{}", config.lease.namespace, config.lease.name), "virtkube controller starting");
    let instance = spawn(client, config, metrics);
    health.started.store(true, Ordering::SeqCst);
    let mut leading = instance.leading.clone();
    let mirror = {
        let health = health.clone();
        async move {
            loop {
                health.leading.store(*leading.borrow(), Ordering::SeqCst);
                if leading.changed().await.is_err() {
                    return;
                }
            }
        }
    };
    tokio::select! {
        () = mirror => {}
        signal = wait_for_signal() => {
            tracing::info!(signal, "stopping: work stops, the lease is released");
        }
    }
    instance.stop().await;
    let _ = stop_http.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(2), http_task).await;
    tracing::info!("virtkube controller stopped");
    Ok(())
}

/// SIGTERM or SIGINT (the agent has the same private helper).
async fn wait_for_signal() -> &'static str {
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
