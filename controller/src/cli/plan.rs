//! `virtkube plan -f PATH`: what `apply` would do, and nothing else; against libvirt hosts
//! (`--connect`, `--host`) or against a cluster (`--kubeconfig`, `--context`, `--cluster`,
//! or as `kubectl virtkube plan`), where it reads what the agents report.

use std::process::ExitCode;

use anyhow::bail;
use virtkube_crds::manifest::{self, Reader};

use crate::plan::cluster::{ClusterPlanOptions, plan_cluster};
use crate::plan::desired::DesiredState;
use crate::plan::json::Target;
use crate::plan::{self, Plan, PlanOptions};

use super::cluster::{self, ClusterArgs};
use super::common::{FileArgs, HostArgs, runtime};

/// How the plan is printed.
#[derive(clap::ValueEnum, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Output {
    /// For people: one block per object, `+ ~ ! - x` marks, field-level before → after.
    #[default]
    Text,
    /// For machines (pull-request bots): the `PlanReport` schema (see the README).
    Json,
}

/// Arguments of `virtkube plan`.
#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    #[command(flatten)]
    files: FileArgs,
    #[command(flatten)]
    hosts: HostArgs,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Include deleting objects absent from the manifests (locally: owned objects created
    /// from local manifests; in a cluster: every object of virtkube's kinds).
    #[arg(long)]
    prune: bool,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    output: Output,
}

/// Exit code when the plan has changes (0: nothing to do; 1: error).
pub const EXIT_CHANGES: u8 = 2;

/// Runs `virtkube plan`; `kubectl_plugin` when run as `kubectl-virtkube` (a cluster is then
/// the default target).
pub fn run(args: &PlanArgs, kubectl_plugin: bool) -> anyhow::Result<ExitCode> {
    if args.cluster.enabled(kubectl_plugin) {
        if !args.hosts.hosts.is_empty() {
            bail!(
                "--host plans against libvirt hosts; it cannot be combined with a cluster plan (--kubeconfig, --context, --cluster)"
            );
        }
        return run_cluster(args);
    }
    let manifests = args.files.load()?;
    runtime()?.block_on(async {
        let hosts = args.hosts.connect().await?;
        let (desired, notices) = DesiredState::from_manifests(&manifests, &hosts.nodes());
        let observed = hosts.observe().await?;
        let mut p = plan::plan(&desired, &observed, &PlanOptions { prune: args.prune });
        p.notices.extend(notices);
        let nodes: Vec<String> = hosts.iter().map(|h| h.spec.node.clone()).collect();
        let name = match hosts.iter().collect::<Vec<_>>().as_slice() {
            [one] => one.spec.uri.clone(),
            _ => "hosts".to_string(),
        };
        let multi = nodes.len() > 1;
        hosts.close().await?;
        print(
            &p,
            args.output,
            Target {
                type_: "hosts",
                name,
                nodes,
            },
            &[],
            |p| p.render(multi),
        )
    })
}

fn print(
    p: &Plan,
    output: Output,
    target: Target,
    node_notes: &[String],
    text: impl FnOnce(&Plan) -> String,
) -> anyhow::Result<ExitCode> {
    match output {
        Output::Text => print!("{}", text(p)),
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&p.report(target, node_notes))?
        ),
    }
    Ok(ExitCode::from(p.exit_code()))
}

fn run_cluster(args: &PlanArgs) -> anyhow::Result<ExitCode> {
    // The API server's gates (schema, CEL) refuse a manifest at `kubectl apply`; the agent's
    // own rules are reported by the plan, at the object, as the agent would.
    let (manifests, refused) =
        manifest::read_all(&args.files.files, Reader::new().without_spec_rules());
    let unplaceable: Vec<String> = refused
        .iter()
        .filter(|e| e.object.is_none())
        .map(ToString::to_string)
        .collect();
    if !unplaceable.is_empty() {
        bail!("the manifests cannot be read:\n{}", unplaceable.join("\n"));
    }
    runtime()?.block_on(async {
        let (client, context) = args.cluster.client().await?;
        let state = cluster::read(&client).await?;
        let planned = plan_cluster(
            &manifests,
            &refused,
            &state,
            &ClusterPlanOptions { prune: args.prune },
        );
        let nodes: Vec<String> = state.node_names().into_iter().collect();
        let target = Target {
            type_: "cluster",
            name: context.clone(),
            nodes: nodes.clone(),
        };
        print(
            &planned.plan,
            args.output,
            target,
            &planned.node_notes,
            |p| {
                let mut out = format!(
                    "Cluster plan against context `{context}` ({} node{}: {}), from what the agents report in status.\n",
                    nodes.len(),
                    if nodes.len() == 1 { "" } else { "s" },
                    nodes.join(", ")
                );
                for note in &planned.node_notes {
                    out.push_str(&format!("= {note}\n"));
                }
                out.push('\n');
                out.push_str(&p.render(true));
                out.push_str("(Not visible from here: drift the agents have not reported yet, and libvirt details no status carries.)\n");
                out
            },
        )
    })
}
