//! Whether the agent is ready, and if not why: the Kubernetes API answers (judged by the
//! API health monitor, `api_health`), libvirt is connected (the engine's own view), and
//! the controllers run. `/readyz` and the `virtkube_agent_ready` metrics both read it here.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Why the Kubernetes API is considered down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiProblem {
    /// A stable label (`api_unreachable`, `api_not_answering`, `api_failing`): the metric's
    /// `reason`.
    pub label: &'static str,
    /// What the last probe saw, for a human.
    pub detail: String,
    /// Since when the API has been down.
    pub since: Instant,
}

/// What the readiness probe looks at.
#[derive(Debug, Default)]
pub struct Health {
    /// Set while the Kubernetes API answers (the API health monitor keeps it current).
    pub api_ok: AtomicBool,
    /// Set once the controllers run (cleared when they stop, at shutdown).
    pub controllers_running: AtomicBool,
    api_problem: Mutex<Option<ApiProblem>>,
    /// Watches the API server refuses (403), by kind: the server's message.
    forbidden: Mutex<BTreeMap<String, String>>,
}

impl Health {
    /// Records whether the Kubernetes API answers, without saying why not.
    pub fn set_api(&self, ok: bool) {
        if ok {
            self.api_up();
        } else {
            self.api_down(ApiProblem {
                label: "api_failing",
                detail: "a call to the Kubernetes API failed".into(),
                since: Instant::now(),
            });
        }
    }

    /// The Kubernetes API answers.
    pub fn api_up(&self) {
        *self.problem() = None;
        self.api_ok.store(true, Ordering::SeqCst);
    }

    /// The Kubernetes API does not answer, for `problem`'s reason.
    pub fn api_down(&self, problem: ApiProblem) {
        *self.problem() = Some(problem);
        self.api_ok.store(false, Ordering::SeqCst);
    }

    /// Why the API is down, if it is.
    pub fn api_problem(&self) -> Option<ApiProblem> {
        self.problem().clone()
    }

    /// The API server refuses the watch of `kind` (RBAC): `message` is its answer.
    pub fn watch_forbidden(&self, kind: &str, message: String) {
        self.forbidden_watches().insert(kind.to_string(), message);
    }

    /// The watch of `kind` works (again).
    pub fn watch_allowed(&self, kind: &str) {
        self.forbidden_watches().remove(kind);
    }

    /// Readiness now, given whether libvirt is connected.
    pub fn readiness(&self, libvirt: bool) -> Readiness {
        let api = self.api_ok.load(Ordering::SeqCst);
        let controllers = self.controllers_running.load(Ordering::SeqCst);
        let problem = if api { None } else { self.api_problem() };
        let mut r = readiness(api, problem.as_ref(), libvirt, controllers);
        for (kind, message) in self.forbidden_watches().iter() {
            r.reasons.push(Reason {
                label: "watch_forbidden",
                message: format!(
                    "the API server refuses the agent's watch of {kind} ({message}): give the agent's ServiceAccount the chart's rules (charts/virtkube/rbac/agent.yaml)"
                ),
            });
        }
        r
    }

    fn forbidden_watches(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        self.forbidden.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn problem(&self) -> std::sync::MutexGuard<'_, Option<ApiProblem>> {
        self.api_problem.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One reason the agent is not ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reason {
    /// A stable label (the metric's `reason`).
    pub label: &'static str,
    /// For a human.
    pub message: String,
}

/// Readiness and its reasons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    /// Whether the Kubernetes API answers.
    pub api: bool,
    /// Whether libvirt is connected.
    pub libvirt: bool,
    /// Whether the controllers run.
    pub controllers: bool,
    /// Why not ready (empty when ready).
    pub reasons: Vec<Reason>,
}

impl Readiness {
    /// Whether everything is ready.
    pub fn ready(&self) -> bool {
        self.reasons.is_empty()
    }

    /// The body `/readyz` answers: the verdict and its reasons first, then each check.
    pub fn body(&self) -> String {
        let mut body = if self.ready() {
            "ready\n".to_string()
        } else {
            let reasons: Vec<String> = self
                .reasons
                .iter()
                .map(|r| format!("{} ({})", r.message, r.label))
                .collect();
            format!("not ready: {}\n", reasons.join("; "))
        };
        body.push_str(&format!(
            "kubernetes-api: {}\nlibvirt: {}\ncontrollers: {}\n",
            self.api, self.libvirt, self.controllers
        ));
        body
    }
}

/// Every label a [`Reason`] can carry (the metric exports each, 0 or 1).
pub const REASON_LABELS: [&str; 6] = [
    "api_unreachable",
    "api_not_answering",
    "api_failing",
    "libvirt_unreachable",
    "controllers_stopped",
    "watch_forbidden",
];

/// Readiness from its three inputs (pure).
pub fn readiness(
    api: bool,
    problem: Option<&ApiProblem>,
    libvirt: bool,
    controllers: bool,
) -> Readiness {
    let mut reasons = Vec::new();
    if !api {
        reasons.push(match problem {
            Some(p) => Reason {
                label: p.label,
                message: format!(
                    "the Kubernetes API has not answered for {:.1} s: {}",
                    p.since.elapsed().as_secs_f64(),
                    p.detail
                ),
            },
            None => Reason {
                label: "api_failing",
                message: "the Kubernetes API has not answered yet".into(),
            },
        });
    }
    if !libvirt {
        reasons.push(Reason {
            label: "libvirt_unreachable",
            message: "libvirt is not connected".into(),
        });
    }
    if !controllers {
        reasons.push(Reason {
            label: "controllers_stopped",
            message: "the controllers are not running".into(),
        });
    }
    Readiness {
        api,
        libvirt,
        controllers,
        reasons,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_all_three_hold_and_every_failure_is_named() {
        assert!(readiness(true, None, true, true).ready());
        assert_eq!(
            readiness(true, None, true, true).body().lines().next(),
            Some("ready")
        );
        let problem = ApiProblem {
            label: "api_unreachable",
            detail: "connection refused".into(),
            since: Instant::now(),
        };
        let r = readiness(false, Some(&problem), false, true);
        assert!(!r.ready());
        let labels: Vec<&str> = r.reasons.iter().map(|r| r.label).collect();
        assert_eq!(labels, ["api_unreachable", "libvirt_unreachable"]);
        let body = r.body();
        assert!(
            body.starts_with("not ready: the Kubernetes API has not answered for"),
            "{body}"
        );
        assert!(
            body.contains("connection refused (api_unreachable)"),
            "{body}"
        );
        assert!(
            body.contains("libvirt is not connected (libvirt_unreachable)"),
            "{body}"
        );
        assert!(body.contains("kubernetes-api: false\nlibvirt: false\ncontrollers: true\n"));
        for label in labels {
            assert!(REASON_LABELS.contains(&label));
        }
        let stopped = readiness(true, None, true, false);
        assert_eq!(stopped.reasons[0].label, "controllers_stopped");
    }

    #[test]
    fn health_keeps_the_reason_until_the_api_is_back() {
        let health = Health::default();
        health.controllers_running.store(true, Ordering::SeqCst);
        assert!(
            !health.readiness(true).ready(),
            "not ready before any answer"
        );
        health.api_up();
        assert!(health.readiness(true).ready());
        health.api_down(ApiProblem {
            label: "api_not_answering",
            detail: "no answer within 2s".into(),
            since: Instant::now(),
        });
        let r = health.readiness(true);
        assert_eq!(r.reasons[0].label, "api_not_answering");
        assert!(r.body().contains("no answer within 2s"));
        health.set_api(true);
        assert!(health.readiness(true).ready());
        assert!(health.api_problem().is_none());
    }

    #[test]
    fn a_forbidden_watch_makes_the_agent_unready_until_it_works() {
        let health = Health::default();
        health.controllers_running.store(true, Ordering::SeqCst);
        health.api_up();
        health.watch_forbidden("Network", "networks is forbidden: no rule".into());
        let r = health.readiness(true);
        assert!(!r.ready());
        assert_eq!(r.reasons[0].label, "watch_forbidden");
        assert!(REASON_LABELS.contains(&r.reasons[0].label));
        assert!(
            r.body()
                .contains("refuses the agent's watch of Network (networks is forbidden: no rule)"),
            "{}",
            r.body()
        );
        health.watch_allowed("Network");
        assert!(health.readiness(true).ready());
    }
}
