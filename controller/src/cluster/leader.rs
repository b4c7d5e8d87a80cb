//! Leader election with a `coordination.k8s.io/v1` Lease, as client-go's `leaderelection`
//! does it: one replica holds the Lease and renews it every retry period with an update
//! that carries the resourceVersion it read (so two replicas can never both take it); the
//! others watch the record and take it only when it has not changed for a whole lease
//! duration, as measured by their own clocks (never by comparing clocks across machines).
//!
//! Guarantees:
//! - **A lost lease stops all work at once.** The holder that cannot renew within
//!   `renew_deadline` (shorter than the lease duration) publishes `false` before anyone else
//!   may take the Lease; an API server that hangs counts as a failed renewal (every call
//!   has a timeout).
//! - **Handover within the lease duration** (plus one retry period) when the leader dies,
//!   and within one retry period when it stops cleanly: on SIGTERM it releases the Lease
//!   (empty holder), which a standby takes at once.
//!
//! Why not `kube-lease-manager` (named in DESIGN.md; 0.13.1 builds with kube 5 and uses
//! `get`, `create` and `patch` on leases): its leader keeps reporting itself leader while
//! its renewals fail (errors are logged and retried; the state channel is never told), so a
//! partitioned or hung leader would keep working past its lease's expiry.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::sync::watch;

use super::settings::FIELD_MANAGER;

/// How the election runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    /// The Lease's namespace.
    pub namespace: String,
    /// The Lease's name.
    pub name: String,
    /// This replica's identity (the pod name).
    pub identity: String,
    /// How long a Lease stays valid after its last renewal.
    pub duration: Duration,
    /// The holder stops working when it could not renew for this long (less than
    /// `duration`).
    pub renew_deadline: Duration,
    /// How often the holder renews and the others look.
    pub retry_period: Duration,
}

/// What one attempt found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// This replica holds the Lease (taken or renewed now).
    Held,
    /// Another replica holds a Lease that has not expired.
    HeldByOther,
    /// The write lost a race (409): look again at the next retry.
    Conflict,
}

/// What identifies one renewal of a Lease: its holder and renew time.
type Record = (Option<String>, Option<MicroTime>);

/// One replica's side of the election.
pub struct Elector {
    api: Api<Lease>,
    config: LeaseConfig,
    /// The last record seen (holder, renew time) and when this replica first saw it.
    observed: Option<(Record, Instant)>,
}

impl Elector {
    /// An elector for `config` through `client`.
    pub fn new(client: Client, config: LeaseConfig) -> Self {
        Elector {
            api: Api::namespaced(client, &config.namespace),
            config,
            observed: None,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &LeaseConfig {
        &self.config
    }

    fn seconds(d: Duration) -> i32 {
        i32::try_from(d.as_secs().max(1)).unwrap_or(i32::MAX)
    }

    /// Takes the Lease when it is free, expired or already this replica's, renewing it.
    pub async fn try_acquire_or_renew(&mut self) -> Result<Attempt, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let me = self.config.identity.clone();
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me),
                    lease_duration_seconds: Some(Self::seconds(self.config.duration)),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            let params = PostParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..PostParams::default()
            };
            return match self.api.create(&params, &lease).await {
                Ok(_) => Ok(Attempt::Held),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::Conflict),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let record = (holder.clone(), spec.renew_time.clone());
        let seen_at = match &self.observed {
            Some((r, at)) if *r == record => *at,
            _ => {
                let at = Instant::now();
                self.observed = Some((record, at));
                at
            }
        };
        let valid_for = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(self.config.duration, Duration::from_secs);
        let mine = holder.as_deref() == Some(me.as_str());
        if let Some(_other) = holder.as_ref().filter(|_| !mine)
            && seen_at.elapsed() < valid_for
        {
            return Ok(Attempt::HeldByOther);
        }
        let mut new = spec;
        if !mine {
            new.acquire_time = Some(now.clone());
            new.lease_transitions = Some(new.lease_transitions.unwrap_or(0) + 1);
        }
        new.holder_identity = Some(me);
        new.lease_duration_seconds = Some(Self::seconds(self.config.duration));
        new.renew_time = Some(now);
        lease.spec = Some(new);
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PostParams::default()
        };
        // The update carries the resourceVersion read above: a replica that decided on an
        // older record loses with 409.
        match self.api.replace(&self.config.name, &params, &lease).await {
            Ok(_) => Ok(Attempt::Held),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::Conflict),
            Err(e) => Err(e),
        }
    }

    /// Gives the Lease up if this replica holds it: the holder is cleared, so a standby
    /// takes it at its next look instead of waiting for it to expire.
    pub async fn release(&mut self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            return Ok(());
        };
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        lease.spec = Some(spec);
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PostParams::default()
        };
        self.api
            .replace(&self.config.name, &params, &lease)
            .await
            .map(|_| ())
    }
}

/// Runs the election until `stop` turns true: `leading` is `true` exactly while this
/// replica holds a Lease it renewed less than `renew_deadline` ago. On stop, `leading`
/// turns `false` first, then the Lease is released.
pub async fn run(
    mut elector: Elector,
    leading: watch::Sender<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let config = elector.config().clone();
    let mut renewed: Option<Instant> = None;
    loop {
        if *stop.borrow() {
            break;
        }
        // A hung API server must not hold the leader past its deadline.
        let budget = match renewed {
            Some(at) => config.renew_deadline.saturating_sub(at.elapsed()),
            None => config.renew_deadline,
        }
        .max(Duration::from_millis(50));
        let attempt = tokio::time::timeout(budget, elector.try_acquire_or_renew()).await;
        match attempt {
            Ok(Ok(Attempt::Held)) => {
                if renewed.is_none() {
                    tracing::info!(identity = %config.identity, lease = %config.name, "leading");
                }
                renewed = Some(Instant::now());
                leading.send_replace(true);
            }
            Ok(Ok(Attempt::HeldByOther)) => {
                if renewed.take().is_some() {
                    tracing::warn!(identity = %config.identity, "another replica holds the lease: stopping work");
                }
                leading.send_replace(false);
            }
            Ok(Ok(Attempt::Conflict)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "lease call failed"),
            Err(_) => tracing::warn!(?budget, "lease call timed out"),
        }
        if let Some(at) = renewed
            && at.elapsed() >= config.renew_deadline
        {
            tracing::warn!(identity = %config.identity, deadline = ?config.renew_deadline, "lease not renewed in time: stopping work");
            renewed = None;
            leading.send_replace(false);
        }
        tokio::select! {
            _ = tokio::time::sleep(config.retry_period) => {}
            _ = stop.changed() => {}
        }
    }
    let was_leading = *leading.borrow();
    leading.send_replace(false);
    if was_leading || renewed.is_some() {
        match tokio::time::timeout(config.renew_deadline, elector.release()).await {
            Ok(Ok(())) => tracing::info!(identity = %config.identity, "lease released"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "releasing the lease failed; it expires on its own")
            }
            Err(_) => tracing::warn!("releasing the lease timed out; it expires on its own"),
        }
    }
}
