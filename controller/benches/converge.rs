//! Converge N domains (default 1,000) on `test:///default` and compare with the floor: the
//! same libvirt calls (define, start) made directly in a loop through `virt`, with the same
//! domain XML. Then re-apply the converged set and count mutating libvirt calls.
//!
//! ```sh
//! cargo bench -p virtkube --bench converge            # 1000 domains, release build
//! cargo bench -p virtkube --bench converge -- 200     # another count
//! ```
//!
//! Prints the ratio virtkube / floor (target ≤ 1.2) and the mutating calls of the second
//! apply (target 0). Not a test: numbers are printed, never asserted.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use virt::connect::Connect;
use virtkube::cli::apply::{ConvergeOptions, converge};
use virtkube::execute::{self, ExecOptions};
use virtkube::host::{HostSpec, Hosts, domain_def};
use virtkube::plan::desired::{DesiredDomain, DesiredMigration, DesiredState};
use virtkube::plan::observed::OwnerMark;
use virtkube::plan::{self, PlanOptions, Preserve};
use virtkube_crds::domain::{PowerState, RunStrategy};
use virtkube_engine::EngineConfig;

fn domain(ns: &str, i: usize) -> DesiredDomain {
    let short = format!("vm{i:04}");
    DesiredDomain {
        name: format!("{ns}.{short}"),
        display: format!("{ns}/{short}"),
        owner: OwnerMark::for_resource("Domain", Some(ns), &short, None),
        origin: "bench".into(),
        node: "local".into(),
        run_strategy: RunStrategy::Always,
        state: PowerState::Running,
        explicit_state: false,
        autostart: false,
        vcpus: 1,
        max_vcpus: 1,
        cpu_mode: None,
        cpu_model: None,
        topology: None,
        pinning: BTreeMap::new(),
        emulator_cpuset: None,
        cpu_tune: Default::default(),
        memory_kib: 128 * 1024,
        max_memory_kib: 128 * 1024,
        hugepage_kib: None,
        machine: None,
        arch: None,
        firmware: None,
        boot: vec![],
        kernel: None,
        initrd: None,
        cmdline: None,
        disks: vec![],
        interfaces: vec![],
        host_devices: vec![],
        restart_now: false,
        migration: DesiredMigration::default(),
    }
}

fn floor(xmls: &[String]) -> Result<Duration, virt::error::Error> {
    let conn = Connect::open(Some("test:///default"))?;
    let started = Instant::now();
    for xml in xmls {
        let dom = conn.define_domain_xml(xml)?;
        dom.create()?;
    }
    let elapsed = started.elapsed();
    remove(&conn, "floor.")?;
    // `Connect`'s drop closes it (and panics if libvirt fails to: fine in a benchmark).
    drop(conn);
    Ok(elapsed)
}

/// Destroys and undefines the domains whose name starts with `prefix` (not timed), so every
/// repetition starts from the same empty host.
fn remove(conn: &Connect, prefix: &str) -> Result<(), virt::error::Error> {
    for dom in conn.list_all_domains(0)? {
        if dom.name()?.starts_with(prefix) {
            if dom.is_active()? {
                dom.destroy()?;
            }
            dom.undefine()?;
        }
    }
    Ok(())
}

/// Repetitions; the best time of each side is compared (the least disturbed by the other
/// builds sharing the machine).
const REPETITIONS: usize = 5;

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let hosts = Hosts::connect(
            &[HostSpec { node: "local".into(), uri: "test:///default".into(), p2p_uri: None, migration_uri: None }],
            EngineConfig::default(),
        )
        .await?;
        let host = hosts.get("local")?.clone();

        let concurrency: usize = std::env::var("VIRTKUBE_BENCH_CONCURRENCY").ok().and_then(|c| c.parse().ok()).unwrap_or(ExecOptions::default().concurrency);
        // The floor: identical XML, one define and one start per domain, nothing else.
        let floor_xmls: Vec<String> = (0..n)
            .map(|i| domain_def(&domain("floor", i), &Preserve::default(), host.def_target(), &BTreeMap::new()).map(|d| d.to_xml()))
            .collect::<Result<_, _>>()?;
        let desired = DesiredState { domains: (0..n).map(|i| domain("bench", i)).collect(), ..DesiredState::default() };
        let quiet = ConvergeOptions { verbose: false, exec: ExecOptions { concurrency }, ..ConvergeOptions::default() };
        let mut sink = Vec::new();
        let mut floor_best = Duration::MAX;
        let mut apply_best = Duration::MAX;
        let mut stats = hosts.stats();
        let mut confirm = false;
        for rep in 0..REPETITIONS {
            let xmls = floor_xmls.clone();
            floor_best = floor_best.min(tokio::task::spawn_blocking(move || floor(&xmls)).await??);
            hosts.reset_stats();
            let started = Instant::now();
            let first = converge(&hosts, &desired, &[], &ConvergeOptions { max_rounds: 1, ..quiet.clone() }, &mut sink).await?;
            let elapsed = started.elapsed();
            confirm = first.last_plan.is_empty() && first.failures.is_empty();
            if elapsed < apply_best {
                apply_best = elapsed;
                stats = hosts.stats();
            }
            if rep + 1 < REPETITIONS {
                tokio::task::spawn_blocking(|| -> Result<(), virt::error::Error> {
                    let conn = Connect::open(Some("test:///default"))?;
                    remove(&conn, "bench.")
                })
                .await??;
            }
        }
        let (floor_time, apply_time) = (floor_best, apply_best);

        // One more run, phase by phase, to show where virtkube's time goes.
        tokio::task::spawn_blocking(|| -> Result<(), virt::error::Error> {
            let conn = Connect::open(Some("test:///default"))?;
            remove(&conn, "bench.")
        })
        .await??;
        let t = Instant::now();
        let observed = hosts.observe().await?;
        let t_observe = t.elapsed();
        let t = Instant::now();
        let p = plan::plan(&desired, &observed, &PlanOptions::default());
        let t_plan = t.elapsed();
        let t = Instant::now();
        let report = execute::execute(&p, &hosts, quiet.exec, |_, _| {}).await;
        let t_execute = t.elapsed();
        let t = Instant::now();
        let observed = hosts.observe().await?;
        let again = plan::plan(&desired, &observed, &PlanOptions::default());
        let t_confirm = t.elapsed();
        let phases_ok = report.is_success() && again.is_empty();

        hosts.reset_stats();
        let started = Instant::now();
        let second = converge(&hosts, &desired, &[], &quiet, &mut sink).await?;
        let resync_time = started.elapsed();
        let resync = hosts.stats();

        println!("domains                         {n}   (best of {REPETITIONS}; executor concurrency {concurrency})");
        println!("floor (virt define+start loop)  {:>9.3} s", floor_time.as_secs_f64());
        println!("virtkube apply                  {:>9.3} s  (observe, plan, execute, re-observe and re-plan to confirm)", apply_time.as_secs_f64());
        println!("ratio virtkube / floor          {:>9.2}   (target <= 1.2)", apply_time.as_secs_f64() / floor_time.as_secs_f64());
        println!("  engine calls in apply         {} ({} mutating)", stats.total_calls(), stats.mutating_calls());
        for c in stats.calls.iter().filter(|c| c.count > 0) {
            println!("    {:<24} {:>6} calls {:>9.3} s", c.name, c.count, c.total.as_secs_f64());
        }
        println!("  converged, re-plan empty      {confirm}");
        println!(
            "  phases (one run)              observe {:.3} s, plan {:.3} s, execute {:.3} s ({} actions), confirm {:.3} s, converged {phases_ok}",
            t_observe.as_secs_f64(),
            t_plan.as_secs_f64(),
            t_execute.as_secs_f64(),
            p.actions.len(),
            t_confirm.as_secs_f64()
        );
        println!("second apply (resync)           {:>9.3} s, plan empty: {}, actions run: {}", resync_time.as_secs_f64(), second.first_plan.is_empty(), second.actions_run);
        // The confirming re-observe + re-plan inside the first apply costs what a resync costs.
        println!(
            "ratio without the confirmation  {:>9.2}   (first apply minus one resync)",
            apply_time.saturating_sub(resync_time).as_secs_f64() / floor_time.as_secs_f64()
        );
        println!("mutating calls in second apply  {}   (target 0)", resync.mutating_calls());
        println!("  engine calls in second apply  {}", resync.total_calls());
        hosts.close().await?;
        anyhow::Ok(())
    })
}
