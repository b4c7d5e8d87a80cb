//! `virtkube delete -f PATH`: remove what the manifests describe (keeping retained and
//! still-used volumes).

use std::process::ExitCode;

use crate::execute::{self, ExecOptions, Outcome};
use crate::plan::desired::DesiredState;
use crate::plan::{self};

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
        let report = execute::execute(&p, &hosts, ExecOptions::default(), |a, r| {
            match &r.outcome {
                Outcome::Done(note) => println!("  ok   - {}: {} — {note}", a.object, a.op.verb()),
                Outcome::Failed(e) => println!("  FAIL - {}: {}: {e}", a.object, a.op.verb()),
                Outcome::Skipped { because } => {
                    println!("  skip - {}: waits for failed step #{because}", a.object)
                }
            }
        })
        .await;
        hosts.close().await?;
        Ok(if report.is_success() && !p.has_errors() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        })
    })
}
