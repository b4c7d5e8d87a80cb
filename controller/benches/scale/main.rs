//! The scale bench: `virtkube controller` and `virtkube agent` (release processes) on
//! `test:///default` through the in-memory API server, for N Domains, repeated; then the
//! report (`docs/performance.md` and its SVG plots). `scripts/bench` runs both:
//!
//! ```sh
//! cargo bench -p virtkube --bench scale -- measure --n 10,100,1000 --reps 3 --out results.json
//! cargo bench -p virtkube --bench scale -- report --results results.json
//! ```
//!
//! `measure --libvirt daemon` runs the test driver in a private libvirtd instead of inside the
//! agent (as libvirtd holds the domains on a real node), so the agent's RSS is its own;
//! `VIRTKUBE_BENCH_AGENT_WRAPPER` runs the agent under a command that execs it (a heap
//! profiler's preload, see `notes.md`).
//!
//! `qemu` measures the real-QEMU parts (creation, live migration and drift against `virsh`
//! on the private libvirtd daemons of `scripts/libvirt-nodes.sh`, see `qemu.rs`); `report`
//! renders them as the report's "Real QEMU" section from `docs/performance/qemu-results.json`.

#[path = "../../tests/scale_support/mod.rs"]
mod scale_support;

#[path = "../../tests/process_support/mod.rs"]
mod process_support;

mod qemu;
mod qemu_report;
mod report;

use std::path::PathBuf;

use clap::Parser;
use scale_support::{Libvirt, Measurement, Options, UserClient};
use serde::{Deserialize, Serialize};

#[derive(Parser)]
enum Cmd {
    /// Measures and writes the results as JSON.
    Measure {
        /// Domain counts.
        #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
        n: Vec<usize>,
        /// Repetitions per N (N ≥ 10,000: one, said so in the report).
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Also create and delete this many with kubectl (0: not).
        #[arg(long, default_value_t = 0)]
        kubectl_n: usize,
        /// The results file.
        #[arg(long)]
        out: PathBuf,
        /// Add to the runs already in the results file instead of starting afresh.
        #[arg(long)]
        append: bool,
        /// Where libvirt's test driver runs: `in-process` (in the agent, the report's
        /// numbers), `daemon` (a private libvirtd, as on a real node), or both, each N
        /// measured in both.
        #[arg(long, value_enum, value_delimiter = ',', default_value = "in-process")]
        libvirt: Vec<Libvirt>,
        /// The agent's resync interval (default: longer than creation takes at each N, see
        /// `scale_support::default_resync_seconds`).
        #[arg(long)]
        resync_seconds: Option<u64>,
    },
    /// Measures the real-QEMU parts on the private daemons (their environment from
    /// `scripts/libvirt-nodes.sh up DIR`: `set -a; . DIR/env; set +a`) and writes them as JSON.
    Qemu {
        /// Guests per creation run.
        #[arg(long, default_value_t = 20)]
        n: usize,
        /// Creation repetitions.
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Live migrations per tool (virtkube, virsh), alternating directions.
        #[arg(long, default_value_t = 6)]
        migrations: usize,
        /// `virsh destroy` → running again trials.
        #[arg(long, default_value_t = 50)]
        drift_trials: usize,
        /// Guest memory, MiB.
        #[arg(long, default_value_t = 64)]
        memory_mib: u64,
        /// The results file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Writes the report and plots from a results file.
    Report {
        /// The results file.
        #[arg(long)]
        results: PathBuf,
        /// The Markdown report.
        #[arg(long, default_value = "docs/performance.md")]
        md: PathBuf,
        /// The directory of the plots (linked relative to the report).
        #[arg(long, default_value = "docs/performance")]
        plots: PathBuf,
    },
}

/// Everything a report is made from.
#[derive(Serialize, Deserialize)]
pub struct Results {
    /// Where it ran.
    pub machine: Machine,
    /// Every run, in order.
    pub runs: Vec<Measurement>,
}

/// The machine, and how busy it was.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    /// CPU model.
    pub cpu: String,
    /// Online CPUs.
    pub cpus: usize,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// Load averages (1, 5, 15 min) before and after.
    pub load_before: String,
    /// See `load_before`.
    pub load_after: String,
    /// Kernel.
    pub kernel: String,
    /// When.
    pub date: String,
}

fn machine(load_before: String) -> Machine {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    Machine {
        cpu: cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
            .unwrap_or_default(),
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        memory_mib: read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
            / 1024,
        load_before,
        load_after: loadavg(),
        kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
        date: std::process::Command::new("date")
            .args(["-u", "+%Y-%m-%d %H:%M UTC"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default(),
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; the commands do not take it.
    let args = std::env::args().filter(|a| a != "--bench");
    match Cmd::parse_from(args) {
        Cmd::Measure {
            n,
            reps,
            kubectl_n,
            out,
            append,
            libvirt,
            resync_seconds,
        } => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let load_before = loadavg();
            let bin = env!("CARGO_BIN_EXE_virtkube");
            let mut runs = if append && out.exists() {
                serde_json::from_str::<Results>(&std::fs::read_to_string(&out)?)?.runs
            } else {
                Vec::new()
            };
            let mut plan: Vec<(usize, UserClient, Libvirt)> = Vec::new();
            for &count in &n {
                let reps = if count >= 10_000 { 1 } else { reps };
                for &driver in &libvirt {
                    plan.extend(std::iter::repeat_n((count, UserClient::Kube, driver), reps));
                }
                // Beside the runs of the same N, before any longer one.
                if count == kubectl_n {
                    plan.push((kubectl_n, UserClient::Kubectl, Libvirt::InProcess));
                }
            }
            for (count, client, driver) in plan {
                let mut opts = Options::new(count, bin);
                opts.client = client;
                opts.libvirt = driver;
                if let Some(r) = resync_seconds {
                    opts.resync_seconds = r;
                }
                eprintln!("measuring N={count} through {client:?}, libvirt {driver:?}…");
                let m = rt.block_on(scale_support::measure(&opts))?;
                eprintln!("{}", report::summary_line(&m));
                eprintln!("{}", report::timeline_lines(&m));
                runs.push(m);
                // Written after every run: a long series cut short keeps what it measured.
                let results = Results {
                    machine: machine(load_before.clone()),
                    runs: runs.clone(),
                };
                std::fs::write(&out, serde_json::to_string_pretty(&results)?)?;
            }
            Ok(())
        }
        Cmd::Qemu {
            n,
            reps,
            migrations,
            drift_trials,
            memory_mib,
            out,
        } => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let opts = qemu::Options {
                n,
                reps,
                migrations,
                drift_trials,
                memory_mib,
                out,
            };
            rt.block_on(qemu::run(&opts))?;
            Ok(())
        }
        Cmd::Report { results, md, plots } => {
            let results: Results = serde_json::from_str(&std::fs::read_to_string(&results)?)?;
            report::write(&results, &md, &plots)
        }
    }
}
