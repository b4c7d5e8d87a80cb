//! The executor: runs a [`Plan`] through an [`ActionRunner`] (the engine-backed
//! [`Hosts`](crate::host::Hosts), or a model in tests).
//!
//! Guarantees:
//! - an action starts only after every action it depends on succeeded;
//! - independent actions run concurrently, at most `concurrency` at once;
//! - a failed action stops only what depends on it (transitively): those are reported as
//!   skipped, naming the failure; everything else still runs;
//! - nothing is retried here: the caller re-observes and re-plans, and because the planner
//!   compares with what the host has, running again converges.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;

use crate::plan::{Action, Plan};

/// Something that can carry out one action.
pub trait ActionRunner {
    /// Why an action failed.
    type Error: std::fmt::Display;
    /// Runs one action; returns a short note of what happened.
    fn run(&self, action: &Action) -> impl Future<Output = Result<String, Self::Error>>;
}

impl ActionRunner for crate::host::Hosts {
    type Error = crate::host::HostError;
    fn run(&self, action: &Action) -> impl Future<Output = Result<String, Self::Error>> {
        crate::host::Hosts::run(self, action)
    }
}

/// How one action ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It succeeded, with a note.
    Done(String),
    /// It failed; the message carries libvirt's reason.
    Failed(String),
    /// It did not run because an action it depends on failed.
    Skipped {
        /// The failed action it waited for.
        because: usize,
    },
}

/// The result of one action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionResult {
    /// The action's id in the plan.
    pub id: usize,
    /// How it ended.
    pub outcome: Outcome,
    /// Wall time (zero when skipped).
    pub elapsed: Duration,
}

/// What running a plan did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// One result per action, in completion order.
    pub results: Vec<ActionResult>,
}

impl Report {
    /// Actions that failed.
    pub fn failed(&self) -> impl Iterator<Item = &ActionResult> {
        self.results
            .iter()
            .filter(|r| matches!(r.outcome, Outcome::Failed(_)))
    }

    /// Actions skipped because something they depend on failed.
    pub fn skipped(&self) -> impl Iterator<Item = &ActionResult> {
        self.results
            .iter()
            .filter(|r| matches!(r.outcome, Outcome::Skipped { .. }))
    }

    /// Whether every action succeeded.
    pub fn is_success(&self) -> bool {
        self.results
            .iter()
            .all(|r| matches!(r.outcome, Outcome::Done(_)))
    }
}

/// Executor settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecOptions {
    /// Actions in flight at once.
    pub concurrency: usize,
}

impl Default for ExecOptions {
    /// As many as the engine runs at once per connection (its default
    /// `max_concurrent_calls`): more only queue inside the engine, where their waiting counts
    /// against their timeout, and on the test driver's single lock they cost ~25% (measured
    /// with `benches/converge.rs`: 1.09× the direct loop at 8, 1.35× at 16, 1.43× at 1).
    fn default() -> Self {
        Self { concurrency: 8 }
    }
}

/// Runs `plan`; `progress` sees each action as it ends.
pub async fn execute<R: ActionRunner>(
    plan: &Plan,
    runner: &R,
    options: ExecOptions,
    mut progress: impl FnMut(&Action, &ActionResult),
) -> Report {
    let n = plan.actions.len();
    let mut waiting: Vec<usize> = plan.actions.iter().map(|a| a.depends_on.len()).collect();
    let mut dependents: HashMap<usize, Vec<usize>> = HashMap::new();
    for a in &plan.actions {
        for d in &a.depends_on {
            dependents.entry(*d).or_default().push(a.id);
        }
    }
    let mut ready: BTreeSet<usize> = (0..n).filter(|i| waiting[*i] == 0).collect();
    let mut finished = vec![false; n];
    let mut report = Report::default();
    let mut in_flight = FuturesUnordered::new();
    let limit = options.concurrency.max(1);
    loop {
        while in_flight.len() < limit {
            let Some(id) = ready.pop_first() else { break };
            let action = &plan.actions[id];
            in_flight.push(async move {
                let started = Instant::now();
                let result = runner.run(action).await;
                (id, result.map_err(|e| e.to_string()), started.elapsed())
            });
        }
        let Some((id, result, elapsed)) = in_flight.next().await else {
            break;
        };
        finished[id] = true;
        let outcome = match result {
            Ok(note) => {
                for dep in dependents.get(&id).into_iter().flatten() {
                    waiting[*dep] -= 1;
                    if waiting[*dep] == 0 && !finished[*dep] {
                        ready.insert(*dep);
                    }
                }
                Outcome::Done(note)
            }
            Err(message) => Outcome::Failed(message),
        };
        let failed = matches!(outcome, Outcome::Failed(_));
        let result = ActionResult {
            id,
            outcome,
            elapsed,
        };
        progress(&plan.actions[id], &result);
        report.results.push(result);
        if failed {
            // Everything downstream is skipped, naming this failure.
            let mut stack = vec![id];
            while let Some(f) = stack.pop() {
                for dep in dependents.get(&f).into_iter().flatten() {
                    if !finished[*dep] {
                        finished[*dep] = true;
                        ready.remove(dep);
                        let skipped = ActionResult {
                            id: *dep,
                            outcome: Outcome::Skipped { because: id },
                            elapsed: Duration::ZERO,
                        };
                        progress(&plan.actions[*dep], &skipped);
                        report.results.push(skipped);
                        stack.push(*dep);
                    }
                }
            }
        }
    }
    report
}
