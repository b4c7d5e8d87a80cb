//! How long to wait before trying again after failures: exponential, capped, jittered,
//! and forgotten on success.
//!
//! Two users: each object's reconciles ([`Failures`], a table keyed by object) and each
//! watch of the API ([`Streak`], one per watch). Both are reset as soon as a try succeeds,
//! and both are cleared at once when the API server returns after an outage (see
//! `api_health`): failures caused by the outage say nothing about the object or the
//! watch, so they must not keep anyone waiting once the server answers again.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// An exponential backoff: `initial`, doubling per consecutive failure, up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// The delay after the first failure.
    pub initial: Duration,
    /// The longest delay (a sick server is still retried this often).
    pub max: Duration,
}

impl Policy {
    /// Reconciles of one object: 1 s, 2 s, 4 s … up to 5 minutes (kube-runtime's and
    /// controller-runtime's order of magnitude: bad input is retried, never hammered).
    pub const RECONCILE: Policy = Policy {
        initial: Duration::from_secs(1),
        max: Duration::from_secs(300),
    };

    /// One watch (list, then watch) of the API: 0.5 s … up to 30 s (client-go's
    /// reflector caps at 30 s too). An outage does not make the watch wait out this
    /// backoff: the return of the server restarts every watch at once.
    pub const WATCH: Policy = Policy {
        initial: Duration::from_millis(500),
        max: Duration::from_secs(30),
    };

    /// The delay after `failures` consecutive failures (1 for the first), before jitter.
    pub fn delay(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(31);
        self.initial
            .checked_mul(1u32 << doublings)
            .unwrap_or(self.max)
            .min(self.max)
    }

    /// [`Policy::delay`] with "equal jitter": somewhere in its upper half, `unit` (in
    /// `[0, 1)`) saying where. Many objects or agents failing together (an outage ends,
    /// a sick server sheds load) then do not retry in lockstep, and no retry comes
    /// sooner than half the delay.
    pub fn jittered(&self, failures: u32, unit: f64) -> Duration {
        let delay = self.delay(failures);
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.0
        };
        delay / 2 + (delay / 2).mul_f64(unit)
    }

    /// [`Policy::jittered`] with a random position.
    pub fn next(&self, failures: u32) -> Duration {
        self.jittered(failures, fastrand::f64())
    }
}

/// Consecutive failures of one repeated task (a watch): the delay before the next try.
#[derive(Debug, Clone)]
pub struct Streak {
    policy: Policy,
    failures: u32,
}

impl Streak {
    /// A streak with no failure yet.
    pub fn new(policy: Policy) -> Self {
        Self {
            policy,
            failures: 0,
        }
    }

    /// Records a failure and returns how long to wait before the next try.
    pub fn failed(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.policy.next(self.failures)
    }

    /// Forgets the failures (after a success, or when the API server is back).
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

/// Which object failed: its kind (the controller's `KIND`), namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    /// `Domain`, `Volume`, `Network`, `StoragePool`.
    pub kind: &'static str,
    /// `None` for cluster-scoped kinds.
    pub namespace: Option<String>,
    /// The object's name.
    pub name: String,
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{}/{ns}/{}", self.kind, self.name),
            None => write!(f, "{}/{}", self.kind, self.name),
        }
    }
}

/// Consecutive reconcile failures per object, for the error policy.
#[derive(Debug)]
pub struct Failures {
    policy: Policy,
    table: Mutex<HashMap<ObjectKey, u32>>,
}

impl Default for Failures {
    fn default() -> Self {
        Self::new(Policy::RECONCILE)
    }
}

impl Failures {
    /// An empty table under `policy`.
    pub fn new(policy: Policy) -> Self {
        Self {
            policy,
            table: Mutex::new(HashMap::new()),
        }
    }

    /// Records a failure of `key` and returns how long to wait before the next attempt.
    pub fn failed(&self, key: &ObjectKey) -> Duration {
        let failures = {
            let mut table = self.lock();
            let n = table.entry(key.clone()).or_insert(0);
            *n = n.saturating_add(1);
            *n
        };
        self.policy.next(failures)
    }

    /// Forgets the failures of `key` (after a success).
    pub fn succeeded(&self, key: &ObjectKey) {
        self.lock().remove(key);
    }

    /// Consecutive failures of `key` so far.
    pub fn failures(&self, key: &ObjectKey) -> u32 {
        self.lock().get(key).copied().unwrap_or(0)
    }

    /// Every object waiting out a backoff, sorted, with their failures forgotten: the API
    /// server is back after an outage, and they are to be retried now.
    pub fn drain(&self) -> Vec<ObjectKey> {
        let mut keys: Vec<ObjectKey> = self.lock().drain().map(|(k, _)| k).collect();
        keys.sort();
        keys
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectKey, u32>> {
        // A panic while the table was held leaves counts that are still meaningful.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> ObjectKey {
        ObjectKey {
            kind: "Domain",
            namespace: Some("ns".into()),
            name: name.into(),
        }
    }

    #[test]
    fn delays_double_from_the_initial_one_up_to_the_cap() {
        let p = Policy::RECONCILE;
        let secs: Vec<u64> = (1..=11).map(|n| p.delay(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(p.delay(u32::MAX), Duration::from_secs(300));
        assert_eq!(p.delay(0), Duration::from_secs(1));
        assert_eq!(Policy::WATCH.delay(1), Duration::from_millis(500));
        assert_eq!(Policy::WATCH.delay(20), Duration::from_secs(30));
    }

    #[test]
    fn jitter_stays_in_the_upper_half_of_the_delay() {
        let p = Policy::RECONCILE;
        assert_eq!(p.jittered(3, 0.0), Duration::from_secs(2));
        assert_eq!(p.jittered(3, 0.5), Duration::from_secs(3));
        assert!(p.jittered(3, 0.999_999) <= Duration::from_secs(4));
        assert_eq!(p.jittered(3, f64::NAN), Duration::from_secs(2));
        assert_eq!(p.jittered(3, 7.0), Duration::from_secs(4));
        for _ in 0..1000 {
            let d = p.next(30);
            assert!(
                d >= Duration::from_secs(150) && d <= Duration::from_secs(300),
                "{d:?}"
            );
        }
        // Not all the same: the point of jitter.
        let spread: std::collections::BTreeSet<Duration> = (0..50).map(|_| p.next(5)).collect();
        assert!(spread.len() > 1);
    }

    #[test]
    fn a_success_resets_an_objects_backoff() {
        let failures = Failures::default();
        let vm = key("vm");
        for _ in 0..6 {
            failures.failed(&vm);
        }
        assert_eq!(failures.failures(&vm), 6);
        assert!(failures.failed(&vm) >= Duration::from_secs(32));
        failures.succeeded(&vm);
        assert_eq!(failures.failures(&vm), 0);
        assert!(failures.failed(&vm) <= Duration::from_secs(1));
    }

    #[test]
    fn draining_returns_every_failing_object_once_and_forgets_them() {
        let failures = Failures::default();
        failures.failed(&key("b"));
        failures.failed(&key("a"));
        failures.failed(&key("a"));
        let net = ObjectKey {
            kind: "Network",
            namespace: None,
            name: "n".into(),
        };
        failures.failed(&net);
        let drained = failures.drain();
        assert_eq!(drained, vec![key("a"), key("b"), net.clone()]);
        assert_eq!(net.to_string(), "Network/n");
        assert_eq!(key("a").to_string(), "Domain/ns/a");
        assert!(failures.drain().is_empty());
        assert_eq!(failures.failures(&key("a")), 0);
    }

    #[test]
    fn a_streak_grows_and_resets() {
        let mut s = Streak::new(Policy::WATCH);
        let first = s.failed();
        assert!(first <= Duration::from_millis(500));
        for _ in 0..10 {
            s.failed();
        }
        assert_eq!(s.failures(), 11);
        assert!(s.failed() >= Duration::from_secs(15));
        s.reset();
        assert_eq!(s.failures(), 0);
        assert!(s.failed() <= Duration::from_millis(500));
    }
}
