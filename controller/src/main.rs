//! `virtkube`: declarative libvirt. One binary, one subcommand per role.

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

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
    /// Show what `apply` would change on the hosts, or what a cluster would do with the
    /// manifests (`--kubeconfig`): `+` create, `~` change live, `!` needs a restart, `-`
    /// delete, `x` forbidden, with field-level before → after. Exit code 0: nothing to do,
    /// 2: changes pending, 1: error.
    #[command(
        after_help = "Examples:\n  virtkube plan -f examples/\n  virtkube plan -f vm.yaml --connect qemu:///system\n  virtkube plan -f examples/ --prune\n  virtkube plan -f manifests/ --kubeconfig ~/.kube/prod --context prod -o json\n  kubectl virtkube plan -f manifests/      # as a kubectl plugin: kubectl-virtkube on PATH"
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

/// The executable name under which kubectl finds virtkube as a plugin (`kubectl virtkube …`
/// runs `kubectl-virtkube …` from PATH): a symlink to, or copy of, `virtkube`.
const KUBECTL_PLUGIN: &str = "kubectl-virtkube";

/// Whether this process runs as the kubectl plugin (`argv[0]` is `kubectl-virtkube`).
fn invoked_as_kubectl_plugin() -> bool {
    std::env::args_os()
        .next()
        .map(std::path::PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .is_some_and(|name| name == KUBECTL_PLUGIN || name.starts_with("kubectl-virtkube."))
}

fn main() -> ExitCode {
    let kubectl = invoked_as_kubectl_plugin();
    let command = if kubectl {
        // Help and errors then read `kubectl virtkube plan …`, as the user typed it.
        Args::command().bin_name("kubectl virtkube")
    } else {
        Args::command()
    };
    let args = match Args::from_arg_matches(&command.get_matches()) {
        Ok(args) => args,
        Err(e) => e.exit(),
    };
    if matches!(args.command, Command::Agent(_) | Command::Controller(_)) {
        limit_malloc_arenas();
    }
    let result = match args.command {
        Command::Crd(crd) => cli::crd::run(&crd),
        Command::Agent(agent) => agent::run(&agent),
        Command::Controller(controller) => cluster::run(&controller),
        Command::Plan(plan) => cli::plan::run(&plan, kubectl),
        Command::Apply(apply) => cli::apply::run(&apply),
        Command::Get(get) => cli::get::run(&get),
        Command::Delete(delete) => cli::delete::run(&delete),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {}", chain(&error));
            ExitCode::from(1)
        }
    }
}

/// Caps glibc's malloc arenas at two for the long-running processes, before any thread is
/// started. glibc gives each thread that meets contention an arena of its own (up to eight
/// per CPU), and memory freed in one arena is not reused by another: with 1,000 Domains the
/// agent's peak RSS was 13 MiB higher without the cap (docs/performance.md). Two arenas
/// still let the runtime's worker threads allocate without waiting on one lock.
/// `MALLOC_ARENA_MAX` in the environment, when set, wins.
fn limit_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    // SAFETY: mallopt only sets an allocator parameter; it is called before any other thread
    // exists, and a refusal (return 0) merely leaves glibc's default in place.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// The error and its causes, each once: a cause whose text the message already carries (an
/// error that prints its source, as `HostError` does) is not repeated.
fn chain(error: &anyhow::Error) -> String {
    let mut out = error.to_string();
    for cause in error.chain().skip(1) {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}
