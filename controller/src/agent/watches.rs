//! API watches that come back with the API server: kube-runtime's `watcher` (list, then
//! watch from the listed resourceVersion, relist on 410), with two changes.
//!
//! - Errors do not leave the stream. Each is counted and logged, and the watch is retried
//!   after a capped, jittered backoff ([`Policy::WATCH`]) that a success resets. Given to a
//!   `Controller`, an error would instead put the controller's whole trigger stream (every
//!   watch of the controller, libvirt events, requeues) to sleep under one shared backoff
//!   that grows to 30 s, doubled by jitter, during an outage: that is where most of the
//!   minute after an API server's return went.
//! - When the API server is back after an outage (the health monitor publishes a
//!   [`Recovery`]), a watch waiting out its backoff retries at once, resuming where it was
//!   (a watch from its last resourceVersion; a list only if it had none or the server
//!   answers 410). A watch that may hang on a connection that died with the server (the
//!   server hung, and the watch has received nothing since) is dropped and started afresh,
//!   which relists. A watch that kept receiving is left alone: a probe that timed out on a
//!   busy but working server must not make every agent relist everything.
//!
//! The predicate filters and reflectors that follow a watch keep their state across a
//! restart, so relisted objects that did not change trigger nothing.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use kube::api::Api;
use kube::runtime::watcher::{self, watcher};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use super::api_health::Recovery;
use super::backoff::{Policy, Streak};
use super::metrics::Metrics;
use super::readiness::Health;

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

/// Where the recovery signal comes from: the API health monitor.
pub type Restarts = watch::Receiver<Recovery>;

/// What a watch does when the API server is back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnRecovery {
    /// Nothing: it works.
    Nothing,
    /// Stop waiting out the backoff and try again now, from where it was.
    RetryNow,
    /// Drop it and start a fresh one (a relist): it may hang on a dead connection.
    Restart,
}

/// What a watch does at `recovery` (pure): `backing_off` while it waits out a backoff,
/// `last_item` when it last yielded something.
pub fn on_recovery(
    recovery: &Recovery,
    backing_off: bool,
    last_item: Option<Instant>,
) -> OnRecovery {
    if backing_off {
        OnRecovery::RetryNow
    } else if recovery.hung && last_item.is_none_or(|t| t < recovery.since) {
        OnRecovery::Restart
    } else {
        OnRecovery::Nothing
    }
}

/// Makes the agent's watches: one client, one restart signal, one set of metrics.
#[derive(Clone)]
pub struct Watches {
    client: Client,
    restarts: Restarts,
    metrics: Arc<Metrics>,
    health: Option<Arc<Health>>,
}

impl Watches {
    /// Watches through `client` (the watch client: see `api_client`), restarted when
    /// `restarts` changes.
    pub fn new(client: Client, restarts: Restarts, metrics: Arc<Metrics>) -> Self {
        Self {
            client,
            restarts,
            metrics,
            health: None,
        }
    }

    /// Reports watches the API server refuses (403) in `health` (readiness).
    pub fn reporting_to(mut self, health: Arc<Health>) -> Self {
        self.health = Some(health);
        self
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
            self.health.clone(),
        )
    }
}

/// The API server's refusal (403) in a watch error: its message.
pub fn forbidden(error: &watcher::Error) -> Option<String> {
    let status = match error {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.as_ref(),
        watcher::Error::WatchError(s) => s.as_ref(),
        _ => return None,
    };
    (status.code == 403).then(|| status.message.clone())
}

struct State<K: Resource + Clone + 'static> {
    api: Api<K>,
    config: watcher::Config,
    inner: BoxStream<'static, watcher::Result<watcher::Event<K>>>,
    streak: Streak,
    last_item: Option<Instant>,
    restarts: Option<Restarts>,
    kind: String,
    metrics: Arc<Metrics>,
    health: Option<Arc<Health>>,
    /// The API server refuses this watch (403) at the moment.
    forbidden: bool,
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

    /// Acts on `recovery`; returns whether the watch is to be polled now (rather than
    /// left to finish its backoff).
    fn recover(&mut self, recovery: &Recovery, backing_off: bool) -> bool {
        match on_recovery(recovery, backing_off, self.last_item) {
            OnRecovery::Nothing => false,
            OnRecovery::RetryNow => {
                tracing::debug!(kind = %self.kind, "the API server is back: retrying the watch now");
                self.streak.reset();
                true
            }
            OnRecovery::Restart => {
                tracing::debug!(kind = %self.kind, "the API server is back after hanging: restarting the watch");
                self.inner = Self::fresh(&self.api, &self.config);
                self.streak.reset();
                self.metrics.watch_restarted(&self.kind);
                true
            }
        }
    }
}

/// Waits for the next recovery; `None` once none can come (the monitor stopped), and from
/// then on never returns.
async fn next_recovery(restarts: &mut Option<Restarts>) -> Option<Recovery> {
    match restarts {
        Some(rx) => {
            if rx.changed().await.is_ok() {
                return Some(*rx.borrow_and_update());
            }
            *restarts = None;
            None
        }
        None => std::future::pending().await,
    }
}

/// What woke the stream.
enum Woken<T> {
    Item(Option<T>),
    Recovered(Option<Recovery>),
}

/// A watch of `api` that never yields an error, backs off on its own and resumes when the
/// API server is back (`restarts`). `kind` names it in logs and metrics. A watch the API
/// server refuses (403: the agent's RBAC lacks it) is an error in the log, each time, and a
/// reason in `health` (so `/readyz` fails) until it works.
pub fn resilient<K>(
    api: Api<K>,
    config: watcher::Config,
    kind: String,
    restarts: Restarts,
    metrics: Arc<Metrics>,
    health: Option<Arc<Health>>,
) -> impl Stream<Item = watcher::Result<watcher::Event<K>>> + Send + 'static
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let mut restarts = restarts;
    // Only recoveries after this point concern this watch.
    restarts.mark_unchanged();
    let state = State {
        inner: State::fresh(&api, &config),
        api,
        config,
        streak: Streak::new(Policy::WATCH),
        last_item: None,
        restarts: Some(restarts),
        kind,
        metrics,
        health,
        forbidden: false,
    };
    futures::stream::unfold(state, |mut s| async move {
        loop {
            let woken = tokio::select! {
                recovery = next_recovery(&mut s.restarts) => Woken::Recovered(recovery),
                item = s.inner.next() => Woken::Item(item),
            };
            match woken {
                Woken::Recovered(Some(recovery)) => {
                    s.recover(&recovery, false);
                }
                Woken::Recovered(None) => {}
                Woken::Item(Some(Ok(event))) => {
                    if s.streak.failures() > 0 {
                        tracing::info!(kind = %s.kind, failures = s.streak.failures(), "watch works again");
                    }
                    s.streak.reset();
                    s.last_item = Some(Instant::now());
                    if std::mem::take(&mut s.forbidden) {
                        tracing::info!(kind = %s.kind, "the API server allows the watch again");
                        if let Some(h) = &s.health {
                            h.watch_allowed(&s.kind);
                        }
                    }
                    return Some((Ok(event), s));
                }
                Woken::Item(Some(Err(error))) => {
                    s.metrics.watch_failed(&s.kind);
                    let wait = s.streak.failed();
                    if let Some(message) = forbidden(&error) {
                        // Not an outage: nothing gets better until someone fixes the RBAC.
                        tracing::error!(kind = %s.kind, %message, retry_in = ?wait, "the API server refuses this watch: the agent's ServiceAccount lacks the chart's rules (charts/virtkube/rbac/agent.yaml); not ready until it may watch");
                        s.forbidden = true;
                        if let Some(h) = &s.health {
                            h.watch_forbidden(&s.kind, message);
                        }
                    } else if s.streak.failures() == 1 {
                        tracing::warn!(kind = %s.kind, %error, retry_in = ?wait, "watch failed; retrying with backoff");
                    } else {
                        tracing::debug!(kind = %s.kind, %error, retry_in = ?wait, failures = s.streak.failures(), "watch failed again");
                    }
                    // The server's return cuts the wait short.
                    let sleep = tokio::time::sleep(wait);
                    tokio::pin!(sleep);
                    loop {
                        tokio::select! {
                            _ = &mut sleep => break,
                            recovery = next_recovery(&mut s.restarts) => {
                                if let Some(recovery) = recovery
                                    && s.recover(&recovery, true)
                                {
                                    break;
                                }
                            }
                        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_recovery_a_waiting_watch_retries_a_stalled_one_restarts_a_live_one_is_left() {
        let t0 = Instant::now();
        let t = |s: u64| t0 + Duration::from_secs(s);
        let refused = Recovery {
            epoch: 1,
            since: t(10),
            outage: Duration::from_secs(40),
            hung: false,
        };
        let hung = Recovery {
            hung: true,
            ..refused
        };
        // Backing off: whatever the outage, try again now (from where it was).
        assert_eq!(
            on_recovery(&refused, true, Some(t(1))),
            OnRecovery::RetryNow
        );
        assert_eq!(on_recovery(&hung, true, None), OnRecovery::RetryNow);
        // Refused connections fail, they do not hang: a watch not backing off works.
        assert_eq!(
            on_recovery(&refused, false, Some(t(1))),
            OnRecovery::Nothing
        );
        assert_eq!(on_recovery(&refused, false, None), OnRecovery::Nothing);
        // The server hung: silent since the outage began means possibly dead.
        assert_eq!(on_recovery(&hung, false, Some(t(9))), OnRecovery::Restart);
        assert_eq!(on_recovery(&hung, false, None), OnRecovery::Restart);
        // It received something during the outage: its connection lives (a slow probe
        // on a busy server is no reason to relist).
        assert_eq!(on_recovery(&hung, false, Some(t(12))), OnRecovery::Nothing);
    }
}
