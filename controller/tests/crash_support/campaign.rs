//! The campaign driver: for each run, draw a scenario from the run's seed, play its phases,
//! kill the agent or the controller at points drawn from the same seed while each phase
//! converges, restart them, wait for convergence, and check the invariants; then count.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use virtkube_testapi::TestApi;

use super::check::{Checker, Kind, Violation};
use super::rng::Rng;
use super::scenario::Scenario;

/// Who is killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Victim {
    /// The agent of node `nodes[i]`.
    Agent(usize),
    /// The cluster controller.
    Controller,
}

/// The processes (or in-process instances) a campaign kills and restarts.
pub trait Fleet: Send + Sync {
    /// Work done so far by everything running (writes the API server stored, mutating
    /// libvirt calls where they can be counted): kill points are drawn on this scale.
    fn progress(&self, api: &TestApi) -> u64;
    /// Kills `victim` (SIGKILL, or its runtime dropped).
    fn kill(&self, victim: Victim);
    /// Starts `victim` again, fresh.
    fn restart(&self, victim: Victim);
    /// How many agents (nodes).
    fn agents(&self) -> usize;
    /// Something that went wrong with the harness itself (an instance that could not start).
    fn harness_error(&self) -> Option<String> {
        None
    }
}

/// One kill as it happened.
#[derive(Debug, Clone)]
pub struct KillPoint {
    /// Phase.
    pub phase: &'static str,
    /// Who.
    pub victim: Victim,
    /// The progress drawn.
    pub planned: u64,
    /// Milliseconds into the phase when it happened (`None`: the phase converged first).
    pub at_ms: Option<u128>,
}

/// What one run found.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// Run index.
    pub run: u64,
    /// Its seed (replays it alone).
    pub seed: u64,
    /// Kills, done or not reached.
    pub kills: Vec<KillPoint>,
    /// Violations, with the phase they were seen in.
    pub violations: Vec<(&'static str, Violation)>,
    /// Seconds the run took.
    pub seconds: f64,
    /// Invariant checks made (convergence checks and samples).
    pub checks: u64,
    /// Each phase: its name, edits and milliseconds to converge (`None`: it did not).
    pub phases: Vec<(&'static str, Vec<String>, Option<u128>)>,
}

/// How a phase is played.
#[derive(Debug, Clone)]
pub struct Timing {
    /// Longest wait for convergence after the last kill.
    pub converge: Duration,
    /// Kills per phase: 0 ..= this.
    pub max_kills: u64,
    /// Kill points are drawn in `0..this` units of progress.
    pub max_point: u64,
    /// Longest downtime between a kill and the restart.
    pub max_downtime_ms: u64,
    /// Pause between two looks (sampling and convergence checks).
    pub poll: Duration,
}

/// Plays one scenario on a running fleet: run number `run`, drawn from `seed`.
pub async fn play(
    api: &TestApi,
    fleet: &dyn Fleet,
    checker: &mut Checker,
    scenario: &Scenario,
    rng: &mut Rng,
    timing: &Timing,
    (run, seed): (u64, u64),
) -> RunReport {
    let started = Instant::now();
    let mut report = RunReport {
        run,
        seed,
        kills: Vec::new(),
        violations: Vec::new(),
        seconds: 0.0,
        checks: 0,
        phases: Vec::new(),
    };
    for phase in &scenario.phases {
        for edit in &phase.edits {
            // An edit of an object already being deleted is refused: the user's loss.
            let _ = edit.apply(api);
        }
        let base = fleet.progress(api);
        let mut plan: Vec<(u64, Victim)> = (0..rng.below(timing.max_kills + 1))
            .map(|_| {
                let victim = if fleet.agents() > 0 && rng.chance(70) {
                    Victim::Agent(rng.below(fleet.agents() as u64) as usize)
                } else {
                    Victim::Controller
                };
                (rng.below(timing.max_point), victim)
            })
            .collect();
        plan.sort();
        let downtimes: Vec<u64> = plan
            .iter()
            .map(|_| rng.below(timing.max_downtime_ms + 1))
            .collect();
        let phase_start = Instant::now();
        let mut next = 0;
        let mut last_converge_check = Instant::now() - Duration::from_secs(1);
        let mut deadline = Instant::now() + timing.converge;
        let mut converged = false;
        loop {
            checker.sample(api).await;
            report.checks += 1;
            if next < plan.len() {
                let (point, victim) = plan[next];
                if fleet.progress(api).saturating_sub(base) >= point {
                    fleet.kill(victim);
                    report.kills.push(KillPoint {
                        phase: phase.name,
                        victim,
                        planned: point,
                        at_ms: Some(phase_start.elapsed().as_millis()),
                    });
                    tokio::time::sleep(Duration::from_millis(downtimes[next])).await;
                    fleet.restart(victim);
                    next += 1;
                    deadline = Instant::now() + timing.converge;
                    continue;
                }
            }
            if last_converge_check.elapsed() >= Duration::from_millis(100) {
                last_converge_check = Instant::now();
                report.checks += 1;
                if checker.discrepancies(api).await.is_empty() {
                    converged = true;
                    break;
                }
            }
            if Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(timing.poll).await;
        }
        for (point, victim) in plan.iter().skip(next) {
            report.kills.push(KillPoint {
                phase: phase.name,
                victim: *victim,
                planned: *point,
                at_ms: None,
            });
        }
        report.phases.push((
            phase.name,
            phase.edits.iter().map(|e| e.label()).collect(),
            converged.then(|| phase_start.elapsed().as_millis()),
        ));
        if !converged {
            report.checks += 1;
            for violation in checker.discrepancies(api).await {
                report.violations.push((phase.name, violation));
            }
        }
        if let Some(error) = fleet.harness_error() {
            panic!("run {run} (seed {seed:#x}), phase {}: {error}", phase.name);
        }
    }
    for violation in std::mem::take(&mut checker.sampled) {
        report.violations.push(("any", violation));
    }
    report.seconds = started.elapsed().as_secs_f64();
    report
}

/// The counts over a campaign.
#[derive(Debug, Default)]
pub struct Counts {
    /// Runs played.
    pub runs: u64,
    /// Phases played.
    pub phases: u64,
    /// Kills done, by victim kind and phase.
    pub kills: BTreeMap<(&'static str, &'static str), u64>,
    /// Kill points drawn that the phase converged before reaching.
    pub not_reached: u64,
    /// Violations by kind.
    pub violations: BTreeMap<Kind, u64>,
    /// Invariant checks made (each convergence check and each sample).
    pub checks: u64,
    /// Runs with at least one violation.
    pub failed_runs: u64,
    /// Seconds, all runs added up (lanes overlap).
    pub seconds: f64,
    /// Seconds the whole campaign took.
    pub wall: f64,
    /// Runs played at once.
    pub lanes: u64,
    /// Nodes (with one, a guest cannot run on two hosts: that row is then vacuous).
    pub nodes: u64,
}

impl Counts {
    /// Adds one run.
    pub fn add(&mut self, report: &RunReport, phases: usize) {
        self.runs += 1;
        self.phases += phases as u64;
        self.seconds += report.seconds;
        for k in &report.kills {
            let who = match k.victim {
                Victim::Agent(_) => "agent",
                Victim::Controller => "controller",
            };
            if k.at_ms.is_some() {
                *self.kills.entry((who, k.phase)).or_default() += 1;
            } else {
                self.not_reached += 1;
            }
        }
        self.checks += report.checks;
        if failed(report) {
            self.failed_runs += 1;
        }
        for (_, violation) in &report.violations {
            *self.violations.entry(violation.kind).or_default() += 1;
        }
    }

    /// Total kills done.
    pub fn total_kills(&self) -> u64 {
        self.kills.values().sum()
    }

    /// Total violations.
    pub fn total_violations(&self) -> u64 {
        self.violations.values().sum()
    }

    /// The table the README quotes.
    pub fn table(&self, title: &str, seed: u64) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "{title}; seed {seed:#x} (replay: VIRTKUBE_CRASH_SEED={seed:#x})"
        );
        let _ = writeln!(t, "| Measure | Count |");
        let _ = writeln!(t, "|---|---|");
        let _ = writeln!(t, "| runs | {} |", self.runs);
        let _ = writeln!(
            t,
            "| phases (create, update, delete some, delete all) | {} |",
            self.phases
        );
        let _ = writeln!(t, "| kill points reached | {} |", self.total_kills());
        for ((who, phase), n) in &self.kills {
            let _ = writeln!(t, "| … {who} killed during {phase} | {n} |");
        }
        let _ = writeln!(
            t,
            "| kill points not reached (the phase converged first) | {} |",
            self.not_reached
        );
        for kind in Kind::ALL {
            let note = if kind == Kind::TwoHosts && self.nodes < 2 {
                " (one node: not exercised here)"
            } else {
                ""
            };
            let _ = writeln!(
                t,
                "| violations: {}{note} | {} |",
                kind.as_str(),
                self.violations.get(&kind).copied().unwrap_or(0)
            );
        }
        let _ = writeln!(
            t,
            "| invariant checks (convergence checks and samples) | {} |",
            self.checks
        );
        let _ = writeln!(t, "| runs that broke an invariant | {} |", self.failed_runs);
        let _ = writeln!(
            t,
            "| wall time | {:.1} s ({} runs at once; {:.1} s per run) |",
            self.wall,
            self.lanes,
            self.seconds / self.runs.max(1) as f64
        );
        t
    }
}

/// Whether a run broke an invariant (every kind counts, the Manual first start included
/// since it was fixed).
pub fn failed(report: &RunReport) -> bool {
    !report.violations.is_empty()
}

/// A failed run, for the report: seed, kills and violations.
pub fn describe(report: &RunReport) -> String {
    let mut t = String::new();
    let _ = writeln!(t, "run {} (seed {:#x}):", report.run, report.seed);
    for (phase, edits, ms) in &report.phases {
        let took = ms.map_or("did not converge".to_string(), |ms| {
            format!("converged in {ms} ms")
        });
        let _ = writeln!(t, "  phase {phase} ({took}): {}", edits.join("; "));
    }
    for k in &report.kills {
        let _ = writeln!(
            t,
            "  kill {:?} in {} at progress {} ({})",
            k.victim,
            k.phase,
            k.planned,
            k.at_ms
                .map_or("not reached".to_string(), |ms| format!("{ms} ms in"))
        );
    }
    for (phase, violation) in &report.violations {
        let _ = writeln!(t, "  [{phase}] {violation}");
    }
    t
}
