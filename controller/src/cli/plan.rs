//! `virtkube plan -f PATH`: what `apply` would do, and nothing else.

use std::process::ExitCode;

use crate::plan::desired::DesiredState;
use crate::plan::{self, PlanOptions};

use super::common::{FileArgs, HostArgs, runtime};

/// Arguments of `virtkube plan`.
#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    #[command(flatten)]
    files: FileArgs,
    #[command(flatten)]
    hosts: HostArgs,
    /// Include deleting owned objects absent from the manifests.
    #[arg(long)]
    prune: bool,
}

/// Exit code when the plan has changes (0: nothing to do; 1: error).
pub const EXIT_CHANGES: u8 = 2;

/// Runs `virtkube plan`.
pub fn run(args: &PlanArgs) -> anyhow::Result<ExitCode> {
    let manifests = args.files.load()?;
    runtime()?.block_on(async {
        let hosts = args.hosts.connect().await?;
        let (desired, notices) = DesiredState::from_manifests(&manifests, &hosts.nodes());
        let observed = hosts.observe().await?;
        let mut p = plan::plan(&desired, &observed, &PlanOptions { prune: args.prune });
        p.notices.extend(notices);
        print!("{}", p.render(hosts.iter().count() > 1));
        hosts.close().await?;
        let pending = p
            .notices
            .iter()
            .any(|n| n.kind == plan::NoticeKind::RestartPending);
        Ok(if p.has_errors() {
            ExitCode::from(1)
        } else if !p.is_empty() || pending {
            ExitCode::from(EXIT_CHANGES)
        } else {
            ExitCode::SUCCESS
        })
    })
}
