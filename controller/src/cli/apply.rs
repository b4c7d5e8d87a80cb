//! `virtkube apply -f PATH`: plan, apply with progress, re-plan to confirm convergence, print
//! a status table.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::execute::{ExecOptions, Outcome};
use crate::host::{HostError, Hosts};
use crate::plan::desired::DesiredState;
use crate::plan::observed::ObservedState;
use crate::plan::{self, Notice, Plan, PlanOptions};
use crate::progress::run::execute_showing;
use crate::progress::{Display, Plain, live::Live};

use super::common::{FileArgs, HostArgs, runtime};
use super::status;

/// Arguments of `virtkube apply`.
#[derive(clap::Args, Debug)]
pub struct ApplyArgs {
    #[command(flatten)]
    files: FileArgs,
    #[command(flatten)]
    hosts: HostArgs,
    /// Also delete objects virtkube created from local manifests that the manifests no
    /// longer describe (volumes are kept: their reclaim policy is unknown once gone).
    #[arg(long)]
    prune: bool,
    /// Actions run at once (independent objects only; dependents wait).
    #[arg(long, default_value_t = 8, value_name = "N")]
    concurrency: usize,
    /// Plan-and-apply rounds before giving up on convergence (a live migration, for one,
    /// is followed by the changes it could not carry).
    #[arg(long, default_value_t = 3, value_name = "N")]
    max_rounds: usize,
    /// Print only the final table.
    #[arg(long, short = 'q')]
    quiet: bool,
    /// How to show long actions (migrations, copies, shutdowns): `auto` draws progress bars
    /// on a terminal and prints a line every few seconds otherwise.
    #[arg(long, value_enum, default_value_t = ProgressStyle::Auto)]
    progress: ProgressStyle,
}

/// How `apply` shows long actions.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressStyle {
    /// Bars on a terminal, lines otherwise.
    Auto,
    /// Progress bars.
    Bars,
    /// A line per long action every few seconds.
    Lines,
    /// Nothing until each action ends.
    None,
}

/// The least time between two progress lines of one action (plain output).
pub const LINE_EVERY: Duration = Duration::from_secs(2);

impl ProgressStyle {
    /// `Auto` resolved: bars when standard output is a terminal, lines otherwise.
    pub fn resolved(self) -> ProgressStyle {
        match self {
            ProgressStyle::Auto if std::io::stdout().is_terminal() => ProgressStyle::Bars,
            ProgressStyle::Auto => ProgressStyle::Lines,
            other => other,
        }
    }
}

/// How a convergence ran.
#[derive(Debug, Clone)]
pub struct ConvergeOptions {
    /// Prune owned objects absent from the manifests.
    pub prune: bool,
    /// Executor settings.
    pub exec: ExecOptions,
    /// Rounds before giving up.
    pub max_rounds: usize,
    /// Print the plan and each action's progress.
    pub verbose: bool,
}

impl Default for ConvergeOptions {
    fn default() -> Self {
        Self {
            prune: false,
            exec: ExecOptions::default(),
            max_rounds: 3,
            verbose: true,
        }
    }
}

/// What a convergence did.
#[derive(Debug, Clone)]
pub struct Converged {
    /// The first plan (what the user was shown).
    pub first_plan: Plan,
    /// The plan computed after the last round (empty when converged).
    pub last_plan: Plan,
    /// What the hosts hold at the end.
    pub observed: ObservedState,
    /// Rounds run.
    pub rounds: usize,
    /// Actions run, over every round.
    pub actions_run: usize,
    /// Failed actions, as `object: verb: reason`.
    pub failures: Vec<String>,
}

impl Converged {
    /// Nothing left to do and nothing refused.
    pub fn is_clean(&self) -> bool {
        self.last_plan.is_empty() && !self.last_plan.has_errors() && self.failures.is_empty()
    }
}

fn plan_with(
    desired: &DesiredState,
    observed: &ObservedState,
    notices: &[Notice],
    options: &ConvergeOptions,
) -> Plan {
    let mut p = plan::plan(
        desired,
        observed,
        &PlanOptions {
            prune: options.prune,
        },
    );
    p.notices.extend(notices.iter().cloned());
    p
}

fn same_steps(a: &Plan, b: &Plan) -> bool {
    a.actions.len() == b.actions.len()
        && a.actions
            .iter()
            .zip(&b.actions)
            .all(|(x, y)| x.node == y.node && x.object == y.object && x.op == y.op)
}

/// Observes, plans and applies until nothing is left to do (or `max_rounds` ran).
pub async fn converge(
    hosts: &Hosts,
    desired: &DesiredState,
    notices: &[Notice],
    options: &ConvergeOptions,
    out: &mut dyn Write,
) -> Result<Converged, HostError> {
    converge_showing(hosts, desired, notices, options, out, None).await
}

/// [`converge`], showing the progress of long actions on `display` (its lines printed to
/// `out` among the others).
pub async fn converge_showing(
    hosts: &Hosts,
    desired: &DesiredState,
    notices: &[Notice],
    options: &ConvergeOptions,
    out: &mut dyn Write,
    mut display: Option<&mut dyn Display>,
) -> Result<Converged, HostError> {
    let multi = hosts.iter().count() > 1;
    let mut observed = hosts.observe().await?;
    let first_plan = plan_with(desired, &observed, notices, options);
    if options.verbose {
        let _ = write!(out, "{}", first_plan.render(multi));
    }
    let mut current = first_plan.clone();
    let mut rounds = 0;
    let mut actions_run = 0;
    let mut failures = Vec::new();
    while !current.is_empty() && rounds < options.max_rounds {
        rounds += 1;
        if options.verbose {
            let _ = writeln!(
                out,
                "\nApplying {} action(s){}:",
                current.actions.len(),
                if rounds > 1 {
                    format!(" (round {rounds})")
                } else {
                    String::new()
                }
            );
        }
        let report = execute_showing(
            &current,
            hosts,
            options.exec,
            if options.verbose {
                display.as_deref_mut()
            } else {
                None
            },
            out,
            |action, result| {
                if !options.verbose {
                    return None;
                }
                let node = if multi {
                    format!(" [{}]", action.node)
                } else {
                    String::new()
                };
                Some(match &result.outcome {
                    Outcome::Done(note) => format!(
                        "  ok   {} {}{node}: {} — {note} ({} ms)",
                        action.symbol.mark(),
                        action.object,
                        action.op.verb(),
                        result.elapsed.as_millis()
                    ),
                    Outcome::Failed(e) => format!(
                        "  FAIL {} {}{node}: {}: {e}",
                        action.symbol.mark(),
                        action.object,
                        action.op.verb()
                    ),
                    Outcome::Skipped { because } => format!(
                        "  skip {} {}{node}: {}: waits for failed step #{because}",
                        action.symbol.mark(),
                        action.object,
                        action.op.verb()
                    ),
                })
            },
        )
        .await;
        actions_run += report.results.len();
        for r in report.failed() {
            if let Outcome::Failed(e) = &r.outcome {
                let a = &current.actions[r.id];
                failures.push(format!(
                    "{} on node {}: {}: {e}",
                    a.object,
                    a.node,
                    a.op.verb()
                ));
            }
        }
        observed = hosts.observe().await?;
        let previous = std::mem::replace(
            &mut current,
            plan_with(desired, &observed, notices, options),
        );
        if !report.is_success() && same_steps(&previous, &current) {
            // Nothing moved: running the same refused steps again cannot help.
            break;
        }
    }
    Ok(Converged {
        first_plan,
        last_plan: current,
        observed,
        rounds,
        actions_run,
        failures,
    })
}

/// Runs `virtkube apply`.
pub fn run(args: &ApplyArgs) -> anyhow::Result<ExitCode> {
    let manifests = args.files.load()?;
    runtime()?.block_on(async {
        let hosts = args.hosts.connect().await?;
        let (desired, notices) = DesiredState::from_manifests(&manifests, &hosts.nodes());
        let options = ConvergeOptions {
            prune: args.prune,
            exec: ExecOptions {
                concurrency: args.concurrency,
            },
            max_rounds: args.max_rounds,
            verbose: !args.quiet,
        };
        let started = Instant::now();
        let style = args.progress.resolved();
        let result = match style {
            _ if args.quiet => {
                let mut stdout = std::io::stdout();
                converge(&hosts, &desired, &notices, &options, &mut stdout).await
            }
            ProgressStyle::Bars => {
                let mut bars = Live::new();
                let mut above = bars.lines();
                let done = converge_showing(
                    &hosts,
                    &desired,
                    &notices,
                    &options,
                    &mut above,
                    Some(&mut bars),
                )
                .await;
                let _ = above.flush();
                done
            }
            ProgressStyle::Lines => {
                let mut lines = Plain::new(LINE_EVERY);
                let mut stdout = std::io::stdout();
                converge_showing(
                    &hosts,
                    &desired,
                    &notices,
                    &options,
                    &mut stdout,
                    Some(&mut lines),
                )
                .await
            }
            _ => {
                let mut stdout = std::io::stdout();
                converge(&hosts, &desired, &notices, &options, &mut stdout).await
            }
        };
        let code = match result {
            Ok(done) => {
                let elapsed = started.elapsed();
                println!();
                if done.last_plan.is_empty() {
                    println!(
                        "Converged: {} action(s) in {} round(s), {:.2}s; a new plan is empty.",
                        done.actions_run,
                        done.rounds,
                        elapsed.as_secs_f64()
                    );
                } else {
                    println!("Not converged after {} round(s); still to do:", done.rounds);
                    print!("{}", done.last_plan.render(hosts.iter().count() > 1));
                }
                for f in &done.failures {
                    println!("failed: {f}");
                }
                for n in done.last_plan.notices.iter().filter(|n| n.kind.is_error()) {
                    println!("error: {}: {}", n.object, n.message);
                }
                println!();
                print!(
                    "{}",
                    status::table(&status::desired_rows(
                        &desired,
                        &done.observed,
                        &done.last_plan
                    ))
                );
                if done.is_clean() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                }
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(1)
            }
        };
        hosts.close().await?;
        Ok(code)
    })
}
