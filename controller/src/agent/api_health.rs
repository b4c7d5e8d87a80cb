//! The Kubernetes API health monitor: a cheap probe (`GET /version`) every few seconds,
//! with a short timeout, decides whether the API server answers.
//!
//! Its verdict drives three things:
//! - `/readyz` and the readiness metrics, within one probe period and timeout of a change
//!   (4 s at the defaults, against a 5 s target), with the reason: refused, no answer, or
//!   server errors;
//! - `virtkube_agent_api_up`, `virtkube_agent_api_outages_total` and the outage lengths;
//! - the recovery signal: when the server answers again after an outage, a [`Recovery`] is
//!   published in a `tokio::sync::watch` channel. Every API watch waiting out a backoff
//!   retries at once, every watch that may hang on a connection that died (the server hung
//!   and the watch has received nothing since) starts afresh, and every object waiting
//!   out a failure backoff is reconciled at once: backoffs grown during the outage say
//!   nothing about the objects or the watches.
//!
//! Why a probe rather than the watches' own errors: a hung server produces no error at all
//! (a watch on it is just quiet), and a refused connection is only seen when a watch next
//! tries, which its backoff may put far after the server's return.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::Client;
use tokio::sync::watch;

use super::metrics::Metrics;
use super::readiness::{ApiProblem, Health};

/// How the API is probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeSettings {
    /// Between two probes while the API answers.
    pub period: Duration,
    /// Between two probes during an outage (the return is noticed this soon).
    pub period_while_down: Duration,
    /// A probe not answered within this is a failure (a hung server).
    pub timeout: Duration,
}

impl Default for ProbeSettings {
    /// 2 s, 1 s, 2 s: an outage shows in `/readyz` within 4 s (a period plus a timeout);
    /// the return within 1 s. `GET /version` is among the cheapest requests a server
    /// answers (no storage, no authorization beyond discovery), so one every 2 s per node
    /// is negligible next to the watches.
    fn default() -> Self {
        Self {
            period: Duration::from_secs(2),
            period_while_down: Duration::from_secs(1),
            timeout: Duration::from_secs(2),
        }
    }
}

/// Why a probe failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cause {
    /// Nothing answers: connection refused or reset, DNS, TLS.
    Unreachable(String),
    /// Connected (or connecting), but no answer within the timeout: a hung server or a
    /// dead network path.
    NoAnswer(Duration),
    /// The server answers with a server error (5xx) or sheds load (429).
    Failing(u16),
}

impl Cause {
    /// The stable label of `/readyz` and the metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Cause::Unreachable(_) => "api_unreachable",
            Cause::NoAnswer(_) => "api_not_answering",
            Cause::Failing(_) => "api_failing",
        }
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cause::Unreachable(why) => write!(f, "unreachable: {why}"),
            Cause::NoAnswer(after) => write!(f, "no answer within {after:?}"),
            Cause::Failing(code) => write!(f, "answers with HTTP {code}"),
        }
    }
}

/// What the monitor believes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiState {
    /// The API answers.
    Up,
    /// The API has not answered since `since`; the last failure was `cause`.
    Down {
        /// When the first failed probe was sent.
        since: Instant,
        /// The last probe's failure.
        cause: Cause,
        /// Whether some probe of this outage got no answer at all (rather than a refusal
        /// or an error): connections may then hang instead of failing.
        hung: bool,
    },
}

/// A change of state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// No change.
    Same,
    /// An outage began.
    Lost(Cause),
    /// The API answers again after an outage.
    Recovered(Recovery),
}

/// The end of an outage, as the watches and the retry of failed objects are told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recovery {
    /// Counts the recoveries since the start (0: none yet).
    pub epoch: u64,
    /// When the outage began (its first failed probe was sent).
    pub since: Instant,
    /// How long it lasted (to its first answered probe).
    pub outage: Duration,
    /// Whether the server hung at some point (some probe got no answer).
    pub hung: bool,
}

impl Recovery {
    /// The value before any outage.
    pub fn none() -> Self {
        Self {
            epoch: 0,
            since: Instant::now(),
            outage: Duration::ZERO,
            hung: false,
        }
    }
}

/// The next state after a probe sent at `sent` ended with `outcome` at `now` (pure).
/// `epoch` numbers the recoveries so far.
pub fn observe(
    state: &ApiState,
    outcome: Result<(), Cause>,
    sent: Instant,
    now: Instant,
    epoch: u64,
) -> (ApiState, Transition) {
    match (state, outcome) {
        (ApiState::Up, Ok(())) => (ApiState::Up, Transition::Same),
        (ApiState::Up, Err(cause)) => (
            ApiState::Down {
                since: sent,
                hung: matches!(cause, Cause::NoAnswer(_)),
                cause: cause.clone(),
            },
            Transition::Lost(cause),
        ),
        (ApiState::Down { since, hung, .. }, Ok(())) => (
            ApiState::Up,
            Transition::Recovered(Recovery {
                epoch: epoch.wrapping_add(1),
                since: *since,
                outage: now.saturating_duration_since(*since),
                hung: *hung,
            }),
        ),
        (ApiState::Down { since, hung, .. }, Err(cause)) => (
            ApiState::Down {
                since: *since,
                hung: *hung || matches!(cause, Cause::NoAnswer(_)),
                cause,
            },
            Transition::Same,
        ),
    }
}

/// What a probe's answer means. Any answer below 500 (other than 429) is a server that
/// works: a 403 is a configuration problem, not an outage.
pub fn classify(answer: Result<Result<(), kube::Error>, Duration>) -> Result<(), Cause> {
    match answer {
        Ok(Ok(())) => Ok(()),
        Ok(Err(kube::Error::Api(status))) if status.code >= 500 || status.code == 429 => {
            Err(Cause::Failing(status.code))
        }
        Ok(Err(kube::Error::Api(_))) => Ok(()),
        Ok(Err(e)) => Err(Cause::Unreachable(e.to_string())),
        Err(timeout) => Err(Cause::NoAnswer(timeout)),
    }
}

/// One probe: `GET /version` within `timeout`.
pub async fn probe(client: &Client, timeout: Duration) -> Result<(), Cause> {
    let answer = match tokio::time::timeout(timeout, client.apiserver_version()).await {
        Ok(result) => Ok(result.map(|_| ())),
        Err(_) => Err(timeout),
    };
    classify(answer)
}

/// Runs the monitor until `shutdown`: probes, keeps `health` and the metrics current, and
/// publishes a [`Recovery`] in `recovered` each time the API answers again after an
/// outage. The API is assumed up at the start (the agent has just talked to it).
pub async fn run(
    client: Client,
    settings: ProbeSettings,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    recovered: watch::Sender<Recovery>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut state = ApiState::Up;
    let mut epoch = recovered.borrow().epoch;
    health.api_up();
    metrics.api_up.set(1);
    loop {
        let sent = Instant::now();
        let outcome = tokio::select! {
            outcome = probe(&client, settings.timeout) => outcome,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let (next, transition) = observe(&state, outcome, sent, Instant::now(), epoch);
        match &transition {
            Transition::Same => {}
            Transition::Lost(cause) => {
                tracing::warn!(%cause, "the Kubernetes API server does not answer: not ready; reconciles needing it fail and are retried when it is back");
                metrics.api_outages.inc();
                metrics.api_up.set(0);
            }
            Transition::Recovered(recovery) => {
                tracing::info!(outage = ?recovery.outage, hung = recovery.hung, "the Kubernetes API server answers again: watches resume at once and what failed meanwhile is retried");
                metrics.api_up.set(1);
                metrics
                    .api_outage_seconds
                    .observe(recovery.outage.as_secs_f64());
                epoch = recovery.epoch;
                recovered.send_replace(*recovery);
            }
        }
        match &next {
            ApiState::Up => health.api_up(),
            ApiState::Down { since, cause, .. } => health.api_down(ApiProblem {
                label: cause.label(),
                detail: cause.to_string(),
                since: *since,
            }),
        }
        let period = match next {
            ApiState::Up => settings.period,
            ApiState::Down { .. } => settings.period_while_down,
        };
        state = next;
        tokio::select! {
            _ = tokio::time::sleep(period.saturating_sub(sent.elapsed())) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16) -> kube::Error {
        kube::Error::Api(Box::new(
            kube::core::Status::failure("x", "y").with_code(code),
        ))
    }

    #[test]
    fn an_outage_begins_at_the_first_failed_probe_and_ends_at_the_first_answer() {
        let t0 = Instant::now();
        let t = |s: u64| t0 + Duration::from_secs(s);
        let refused = Cause::Unreachable("connection refused".into());
        let (down, lost) = observe(&ApiState::Up, Err(refused.clone()), t(1), t(1), 0);
        assert_eq!(lost, Transition::Lost(refused.clone()));
        assert_eq!(
            down,
            ApiState::Down {
                since: t(1),
                cause: refused.clone(),
                hung: false,
            }
        );
        let (still, same) = observe(&down, Err(refused.clone()), t(2), t(2), 0);
        assert_eq!(same, Transition::Same);
        let (up, back) = observe(&still, Ok(()), t(41), t(41), 0);
        assert_eq!(up, ApiState::Up);
        assert_eq!(
            back,
            Transition::Recovered(Recovery {
                epoch: 1,
                since: t(1),
                outage: Duration::from_secs(40),
                hung: false,
            })
        );
        assert_eq!(
            observe(&up, Ok(()), t(42), t(42), 1),
            (ApiState::Up, Transition::Same)
        );
    }

    #[test]
    fn an_outage_during_which_the_server_hung_is_remembered_as_such() {
        let t0 = Instant::now();
        let t = |s: u64| t0 + Duration::from_secs(s);
        let no_answer = Cause::NoAnswer(Duration::from_secs(2));
        let (down, _) = observe(&ApiState::Up, Err(no_answer.clone()), t(1), t(3), 4);
        // Refused later on (the hung server was killed): still down since the start, and
        // still an outage in which connections may hang.
        let refused = Cause::Unreachable("connection refused".into());
        let (still, same) = observe(&down, Err(refused.clone()), t(4), t(4), 4);
        assert_eq!(same, Transition::Same);
        assert_eq!(
            still,
            ApiState::Down {
                since: t(1),
                cause: refused,
                hung: true,
            }
        );
        let (_, back) = observe(&still, Ok(()), t(9), t(9), 4);
        assert_eq!(
            back,
            Transition::Recovered(Recovery {
                epoch: 5,
                since: t(1),
                outage: Duration::from_secs(8),
                hung: true,
            })
        );
    }

    #[test]
    fn server_errors_and_throttling_are_outages_other_answers_are_not() {
        assert_eq!(classify(Ok(Ok(()))), Ok(()));
        assert_eq!(classify(Ok(Err(status(503)))), Err(Cause::Failing(503)));
        assert_eq!(classify(Ok(Err(status(500)))), Err(Cause::Failing(500)));
        assert_eq!(classify(Ok(Err(status(429)))), Err(Cause::Failing(429)));
        assert_eq!(classify(Ok(Err(status(403)))), Ok(()));
        assert_eq!(classify(Ok(Err(status(404)))), Ok(()));
        let timeout = Duration::from_secs(2);
        assert_eq!(classify(Err(timeout)), Err(Cause::NoAnswer(timeout)));
        let refused = classify(Ok(Err(kube::Error::LinesCodecMaxLineLengthExceeded)));
        assert!(matches!(refused, Err(Cause::Unreachable(_))), "{refused:?}");
        assert_eq!(Cause::Failing(503).label(), "api_failing");
        assert_eq!(Cause::NoAnswer(timeout).label(), "api_not_answering");
        assert_eq!(Cause::Unreachable(String::new()).label(), "api_unreachable");
    }

    #[test]
    fn the_defaults_meet_the_five_second_readiness_target() {
        let s = ProbeSettings::default();
        assert!(s.period + s.timeout < Duration::from_secs(5));
        assert!(s.period_while_down < s.period + s.timeout);
    }
}
