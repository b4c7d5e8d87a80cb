//! `virtkube`: declarative libvirt. One binary, one subcommand per role.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use virtkube::{agent, cli};

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
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.command {
        Command::Crd(crd) => cli::crd::run(&crd),
        Command::Agent(agent) => agent::run(&agent),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(1)
        }
    }
}
