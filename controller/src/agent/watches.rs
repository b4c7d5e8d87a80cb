//! API watches that come back with the API server: kube-runtime's `watcher` (list, then
//! watch from the listed resourceVersion, relist on 410), with two changes.
//!
//! - Errors do not leave the stream. Each is counted and logged, and the watch is retried
//!   after a capped, jittered backoff ([`Policy::WATCH`]) that a success resets. Given to a
//!   `Controller`, an error would instead put the controller's whole trigger stream (every
//!   watch of the controller, libvirt events, requeues) to sleep under one shared backoff
//!   that grows to 30 s, doubled by jitter, during an outage: that is where most of the
//!   minute after an API server's return went.
//! - When the API server is back after an outage (the health monitor's epoch goes up), the
//!   watch is dropped and started afresh at once, whatever backoff it was waiting out: a
//!   fresh list catches every change and deletion made meanwhile, and no connection that
//!   died with the old server is waited on.
//!
//! The predicate filters and reflectors that follow a watch keep their state across a
//! restart, so relisted objects that did not change trigger nothing.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use kube::api::Api;
use kube::runtime::watcher::{self, watcher};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use super::backoff::{Policy, Streak};
use super::metrics::Metrics;

/// The server-side length of one watch request (`timeoutSeconds`), after which the watch
/// resumes from the last resourceVersion (no relist). kube-runtime gives up on a watch
/// that stays silent 5 s beyond this, so a connection that died without the health monitor
/// noticing (a dropped NAT entry, a load balancer failover without a reset) is replaced
/// within a minute instead of kube's default 295 s. One extra request per watch per
/// minute is the price.
pub const WATCH_TIMEOUT_SECONDS: u32 = 55;

/// The watcher settings every agent watch starts from.
pub fn config() -> watcher::Config {
    watcher::Config::default()
        .any_semantic()
        .timeout(WATCH_TIMEOUT_SECONDS)
}

/// Where the restart signal comes from: the API health monitor's recovery epoch.
pub type Restarts = watch::Receiver<u64>;

/// Makes the agent's watches: one client, one restart signal, one set of metrics.
#[derive(Clone)]
pub struct Watches {
    client: Client,
    restarts: Restarts,
    metrics: Arc<Metrics>,
}

impl Watches {
    /// Watches through `client` (the watch client: see `api_client`), restarted when
    /// `restarts` changes.
    pub fn new(client: Client, restarts: Restarts, metrics: Arc<Metrics>) -> Self {
        Self {
            client,
            restarts,
            metrics,
        }
    }

    /// A [`resilient`] watch of every `K` (all namespaces) selected by `config`.
    pub fn all<K>(
        &self,
        config: watcher::Config,
    ) -> impl Stream<Item = watcher::Result<watcher::Event<K>>> + Send + 'static
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    {
        resilient(
            Api::<K>::all(self.client.clone()),
            config,
            K::kind(&()).to_string(),
            self.restarts.clone(),
            self.metrics.clone(),
        )
    }
}

struct State<K: Resource + Clone + 'static> {
    api: Api<K>,
    config: watcher::Config,
    inner: BoxStream<'static, watcher::Result<watcher::Event<K>>>,
    streak: Streak,
    restarts: Option<Restarts>,
    kind: String,
    metrics: Arc<Metrics>,
}

impl<K> State<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    fn fresh(
        api: &Api<K>,
        config: &watcher::Config,
    ) -> BoxStream<'static, watcher::Result<watcher::Event<K>>> {
        watcher(api.clone(), config.clone()).boxed()
    }

    fn restart(&mut self) {
        tracing::debug!(kind = %self.kind, "restarting the watch: the API server is back");
        self.inner = Self::fresh(&self.api, &self.config);
        self.streak.reset();
        self.metrics.watch_restarted(&self.kind);
    }

    /// Waits for the restart signal; `false` once it can no longer come (the monitor
    /// stopped), and from then on never again.
    async fn restart_signal(restarts: &mut Option<Restarts>) -> bool {
        match restarts {
            Some(rx) => {
                if rx.changed().await.is_ok() {
                    return true;
                }
                *restarts = None;
                false
            }
            None => std::future::pending().await,
        }
    }
}

/// What woke the stream.
enum Woken<T> {
    Item(Option<T>),
    Restart(bool),
}

/// A watch of `api` that never yields an error, backs off on its own and restarts when
/// `restarts` changes. `kind` names it in logs and metrics.
pub fn resilient<K>(
    api: Api<K>,
    config: watcher::Config,
    kind: String,
    restarts: Restarts,
    metrics: Arc<Metrics>,
) -> impl Stream<Item = watcher::Result<watcher::Event<K>>> + Send + 'static
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let mut restarts = restarts;
    // Only changes after this point restart the watch.
    restarts.mark_unchanged();
    let state = State {
        inner: State::fresh(&api, &config),
        api,
        config,
        streak: Streak::new(Policy::WATCH),
        restarts: Some(restarts),
        kind,
        metrics,
    };
    futures::stream::unfold(state, |mut s| async move {
        loop {
            let woken = tokio::select! {
                restarted = State::<K>::restart_signal(&mut s.restarts) => Woken::Restart(restarted),
                item = s.inner.next() => Woken::Item(item),
            };
            match woken {
                Woken::Restart(true) => s.restart(),
                Woken::Restart(false) => {}
                Woken::Item(Some(Ok(event))) => {
                    if s.streak.failures() > 0 {
                        tracing::info!(kind = %s.kind, failures = s.streak.failures(), "watch works again");
                    }
                    s.streak.reset();
                    return Some((Ok(event), s));
                }
                Woken::Item(Some(Err(error))) => {
                    s.metrics.watch_failed(&s.kind);
                    let wait = s.streak.failed();
                    if s.streak.failures() == 1 {
                        tracing::warn!(kind = %s.kind, %error, retry_in = ?wait, "watch failed; retrying with backoff");
                    } else {
                        tracing::debug!(kind = %s.kind, %error, retry_in = ?wait, failures = s.streak.failures(), "watch failed again");
                    }
                    // The server's return cuts the wait short.
                    let restarted = tokio::select! {
                        _ = tokio::time::sleep(wait) => false,
                        restarted = State::<K>::restart_signal(&mut s.restarts) => restarted,
                    };
                    if restarted {
                        s.restart();
                    }
                }
                Woken::Item(None) => {
                    // kube's watcher never ends; should one, a fresh one takes its place.
                    tracing::debug!(kind = %s.kind, "watch stream ended; starting a fresh one");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    s.inner = State::fresh(&s.api, &s.config);
                }
            }
        }
    })
}
