//! `virtkube delete -f PATH`: remove what the manifests describe (keeping retained and
//! still-used volumes).

use std::io::Write;
use std::process::ExitCode;

use crate::execute::{ExecOptions, Outcome};
use crate::plan::desired::DesiredState;
use crate::plan::{self};
use crate::progress::run::execute_showing;
use crate::progress::{Display, Plain, live::Live};

use super::apply::{LINE_EVERY, ProgressStyle};
use super::common::{FileArgs, HostArgs, runtime};

/// Arguments of `virtkube delete`.
#[derive(clap::Args, Debug)]
pub struct DeleteArgs {
    #[command(flatten)]
    files: FileArgs,
    #[command(flatten)]
    hosts: HostArgs,
    /// Show what would be deleted, delete nothing.
    #[arg(long)]
    dry_run: bool,
    /// How to show long actions (a guest's graceful shutdown): `auto` draws a countdown bar
    /// on a terminal and prints a line every few seconds otherwise.
    #[arg(long, value_enum, default_value_t = ProgressStyle::Auto)]
    progress: ProgressStyle,
}

/// Runs `virtkube delete`.
pub fn run(args: &DeleteArgs) -> anyhow::Result<ExitCode> {
    let manifests = args.files.load()?;
    runtime()?.block_on(async {
        let hosts = args.hosts.connect().await?;
        let multi = hosts.iter().count() > 1;
        let (desired, _) = DesiredState::from_manifests(&manifests, &hosts.nodes());
        let observed = hosts.observe().await?;
        let p = plan::plan_delete(&desired, &observed);
        print!("{}", p.render(multi));
        if args.dry_run || p.is_empty() {
            hosts.close().await?;
            return Ok(if p.has_errors() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            });
        }
        println!("\nDeleting:");
        let line = |a: &crate::plan::Action, r: &crate::execute::ActionResult| {
            Some(match &r.outcome {
                Outcome::Done(note) => format!("  ok   - {}: {} — {note}", a.object, a.op.verb()),
                Outcome::Failed(e) => format!("  FAIL - {}: {}: {e}", a.object, a.op.verb()),
                Outcome::Skipped { because } => {
                    format!("  skip - {}: waits for failed step #{because}", a.object)
                }
            })
        };
        let exec = ExecOptions::default();
        let report = match args.progress.resolved() {
            ProgressStyle::Bars => {
                let mut bars = Live::new();
                let mut above = bars.lines();
                let shown: &mut dyn Display = &mut bars;
                let report = execute_showing(&p, &hosts, exec, Some(shown), &mut above, line).await;
                let _ = above.flush();
                report
            }
            ProgressStyle::Lines => {
                let mut lines = Plain::new(LINE_EVERY);
                let shown: &mut dyn Display = &mut lines;
                execute_showing(&p, &hosts, exec, Some(shown), &mut std::io::stdout(), line).await
            }
            _ => execute_showing(&p, &hosts, exec, None, &mut std::io::stdout(), line).await,
        };
        hosts.close().await?;
        Ok(if report.is_success() && !p.has_errors() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        })
    })
}
