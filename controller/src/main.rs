//! `virtkube`: declarative libvirt. One binary, one subcommand per role.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use virtkube::{agent, cli, cluster};

/// Declarative libvirt: Kubernetes custom resources (or plain manifests) for domains,
/// networks, storage pools and volumes, reconciled against libvirt.
#[derive(Parser, Debug)]
#[command(name = "virtkube", version, about, long_about = None)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print virtkube's CustomResourceDefinitions as YAML.
    #[command(
        after_help = "Examples:\n  virtkube crd | kubectl apply --server-side -f -\n  virtkube crd --output-dir charts/virtkube/crds"
    )]
    Crd(cli::crd::CrdArgs),
    /// Run the per-node agent: reconcile this node's domains, volumes, networks and pools
    /// from the cluster against its libvirt, and publish its HypervisorNode.
    #[command(
        after_help = "Examples:\n  virtkube agent --node-name node-a --connect qemu:///system\n  VIRTKUBE_NODE_NAME=node-a VIRTKUBE_CONNECT=test:///default virtkube agent --metrics-addr 127.0.0.1:9090"
    )]
    Agent(agent::AgentArgs),
    /// Run the cluster controller: bind domains and volumes to nodes, approve moves within
    /// the migration limits, drain cordoned nodes, mark silent nodes, and release the
    /// domains of nodes declared fenced. One replica works at a time (Lease election).
    #[command(
        after_help = "Examples:\n  virtkube controller --lease-namespace virtkube-system --identity \"$(hostname)\"\n  virtkube controller --max-migrations 5 --max-migrations-per-node 2 --memory-reserve 1Gi --log-format json"
    )]
    Controller(cluster::ControllerArgs),
    /// Show what `apply` would change on the hosts: `+` create, `~` change live, `!` needs a
    /// restart, `-` delete, with field-level before → after. Exit code 0: nothing to do,
    /// 2: changes pending, 1: error.
    #[command(
        after_help = "Examples:\n  virtkube plan -f examples/\n  virtkube plan -f vm.yaml --connect qemu:///system\n  virtkube plan -f examples/ --prune"
    )]
    Plan(cli::plan::PlanArgs),
    /// Apply manifests to libvirt hosts without a cluster: plan, apply with progress,
    /// re-plan to confirm convergence, print a status table.
    #[command(
        after_help = "Examples:\n  virtkube apply -f examples/                      # libvirt's test driver, nothing installed\n  virtkube apply -f examples/ --connect qemu:///system\n  virtkube apply -f vms/ --prune                  # also delete what vms/ no longer has\n  virtkube apply -f vm.yaml --host a=qemu+ssh://root@a/system --host b=qemu+ssh://root@b/system\n                                                 # spec.nodeName picks the host; changing it live-migrates"
    )]
    Apply(cli::apply::ApplyArgs),
    /// Show what the hosts hold: a table, or objects with their status (`-o yaml|json`).
    #[command(
        after_help = "Examples:\n  virtkube get --connect qemu:///system\n  virtkube get domain default/web -o yaml --connect qemu:///system\n  virtkube get -f examples/ -o json --connect qemu:///system\n  virtkube get --all            # include libvirt objects virtkube does not own"
    )]
    Get(cli::get::GetArgs),
    /// Delete what the manifests describe: domains are shut down (destroyed after the
    /// deadline) and undefined; volumes with reclaimPolicy Retain, or still used, are kept.
    #[command(
        after_help = "Examples:\n  virtkube delete -f examples/ --connect qemu:///system\n  virtkube delete -f vm.yaml --dry-run --connect qemu:///system"
    )]
    Delete(cli::delete::DeleteArgs),
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.command {
        Command::Crd(crd) => cli::crd::run(&crd),
        Command::Agent(agent) => agent::run(&agent),
        Command::Controller(controller) => cluster::run(&controller),
        Command::Plan(plan) => cli::plan::run(&plan),
        Command::Apply(apply) => cli::apply::run(&apply),
        Command::Get(get) => cli::get::run(&get),
        Command::Delete(delete) => cli::delete::run(&delete),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(1)
        }
    }
}
