//! The report's "Real QEMU" section, rendered from `qemu-results.json` in the plots
//! directory (written by `scripts/bench --qemu`), with its plot. Kept apart from the scale
//! sections: the two are measured by different runs and regenerated independently.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;

use super::qemu::{CreationRun, MigrationRun, QemuResults, Way, last};
use super::report::{fmt_spread, spread};

/// The results file's name, in the plots directory beside the report.
pub const RESULTS: &str = "qemu-results.json";

/// Appends the section to `s` (and draws its plot in `plots`), or says that no real-QEMU
/// run is recorded.
pub fn section(s: &mut String, plots: &Path, plot_rel: &Path) -> anyhow::Result<()> {
    writeln!(s, "\n## Real QEMU\n")?;
    let path = plots.join(RESULTS);
    if !path.exists() {
        writeln!(
            s,
            "No real-QEMU run is recorded (`{}` is missing): run `scripts/bench --qemu` with \
             the private daemons up.\n",
            path.display()
        )?;
        return Ok(());
    }
    let r: QemuResults = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let mc = &r.machine;
    writeln!(
        s,
        "Generated from `docs/performance/{RESULTS}` (`scripts/bench --qemu`, \
         `controller/benches/scale/qemu.rs`), measured {}.\n",
        mc.date
    )?;
    writeln!(
        s,
        "**Machine**: {} ({} CPUs, {} MiB), Linux {}; load average before {}, after {}. The \
         machine is shared by five engineers' builds and tests, so absolute times are noisy; \
         what counts is the ratio of virtkube to virsh measured side by side in the same run, \
         alternating which goes first.\n",
        mc.cpu, mc.cpus, mc.memory_mib, mc.kernel, mc.load_before, mc.load_after
    )?;
    writeln!(
        s,
        "**Set-up**: two private `libvirtd` daemons (A and B, `scripts/libvirt-nodes.sh`, \
         QEMU under TCG, each in its own network and mount namespace); the in-memory API \
         server in the bench process; `virtkube controller` and one `virtkube agent` per \
         daemon (release builds, child processes, as `controller/tests/placement_real.rs` \
         runs them). Guests: 1 vCPU, {} MiB, no disk and no OS (SeaBIOS finds nothing to \
         boot and idles): `running` is libvirt's state, read every 10 ms on a connection of \
         the bench's own. virsh and the API loop define the XML virtkube defined for a \
         warm-up guest, under another name, without virtkube's metadata. The agents ran \
         with {}.\n",
        r.memory_mib,
        if r.agent_args.is_empty() {
            "`--concurrency 4` (that build's default)".to_string()
        } else {
            format!("`{}`", r.agent_args)
        }
    )?;
    creation(s, &r.creation)?;
    if !r.creation.is_empty() {
        plot_creation(&r.creation, &plots.join("qemu-creation.svg"))?;
        writeln!(
            s,
            "![guests running against time, QEMU]({}/qemu-creation.svg)\n",
            plot_rel.display()
        )?;
    }
    migration(s, &r.migration)?;
    drift(s, &r.drift_seconds)?;
    Ok(())
}

fn creation(s: &mut String, runs: &[CreationRun]) -> anyhow::Result<()> {
    let Some(n) = runs.first().map(|r| r.n) else {
        return Ok(());
    };
    writeln!(s, "### Creation: {n} guests from apply to running\n")?;
    writeln!(
        s,
        "virtkube: from the first server-side apply (one after another, through kube's \
         client) until libvirt shows all {n} running on A. virsh: `virsh define FILE` and \
         `virsh start NAME` per guest in a loop (two processes per guest, as a shell loop \
         runs them) on the same daemon. API: the same define+start through libvirt's API on \
         one open connection (the floor). \"Running\" is what the bench's watcher saw for all \
         three (the same 10 ms poll runs during each), so the ratio compares like with like.\n"
    )?;
    writeln!(
        s,
        "| run | order | load (1 min) | virtkube: applies sent (s) | virtkube: first running (s) | virtkube: all running (s) | virtkube: all Ready (s) | virsh: first running (s) | virsh: all running (s) | virsh: loop returned (s) | API: all running (s) | virtkube / virsh | virtkube / API |"
    )?;
    writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|---|")?;
    for (i, r) in runs.iter().enumerate() {
        let order: Vec<String> = r.order.iter().map(|w| format!("{w:?}")).collect();
        writeln!(
            s,
            "| {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            i + 1,
            order.join(" → "),
            r.load.split_whitespace().next().unwrap_or("-"),
            r.virtkube_applied,
            r.virtkube_running.first().copied().unwrap_or(0.0),
            last(&r.virtkube_running),
            r.virtkube_ready,
            r.virsh_running.first().copied().unwrap_or(0.0),
            last(&r.virsh_running),
            r.virsh_loop,
            last(&r.api_running),
            r.ratio(),
            last(&r.virtkube_running) / last(&r.api_running).max(1e-6),
        )?;
    }
    let col =
        |f: &dyn Fn(&CreationRun) -> f64, d: usize| fmt_spread(runs.iter().map(f).collect(), d);
    writeln!(
        s,
        "| median (min–max) | | | {} | {} | {} | {} | {} | {} | {} | {} | **{}** | {} |\n",
        col(&|r| r.virtkube_applied, 2),
        col(&|r| r.virtkube_running.first().copied().unwrap_or(0.0), 2),
        col(&|r| last(&r.virtkube_running), 2),
        col(&|r| r.virtkube_ready, 2),
        col(&|r| r.virsh_running.first().copied().unwrap_or(0.0), 2),
        col(&|r| last(&r.virsh_running), 2),
        col(&|r| r.virsh_loop, 2),
        col(&|r| last(&r.api_running), 2),
        col(&|r| r.ratio(), 2),
        col(
            &|r| last(&r.virtkube_running) / last(&r.api_running).max(1e-6),
            2
        ),
    )?;
    agent_time(s, runs)?;
    Ok(())
}

/// Where node A's agent spent its time in each virtkube run (its metrics), beside the
/// virsh loop's time per guest.
fn agent_time(s: &mut String, runs: &[CreationRun]) -> anyhow::Result<()> {
    if runs.iter().all(|r| r.agent.is_none()) {
        return Ok(());
    }
    writeln!(
        s,
        "Node A's agent during the virtkube runs (differences of its metrics; libvirt call \
         times include the wait for the engine's thread pool), beside the virsh loop's time \
         per guest:\n"
    )?;
    writeln!(
        s,
        "| run | `domain_define` mean (s) | `domain_start` calls | `domain_start` mean (s) | virsh loop / guest (s) |\n|---|---|---|---|---|"
    )?;
    for (i, r) in runs.iter().enumerate() {
        let Some(t) = &r.agent else { continue };
        let mean = |call: &str| {
            t.libvirt.get(call).map_or("-".to_string(), |(n, secs)| {
                format!("{:.3}", secs / (*n).max(1) as f64)
            })
        };
        writeln!(
            s,
            "| {} | {} | {} | {} | {:.2} |",
            i + 1,
            mean("domain_define"),
            t.libvirt.get("domain_start").map_or(0, |(n, _)| *n),
            mean("domain_start"),
            r.virsh_loop / r.n.max(1) as f64,
        )?;
    }
    writeln!(s)?;
    Ok(())
}

fn migration(s: &mut String, runs: &[MigrationRun]) -> anyhow::Result<()> {
    if runs.is_empty() {
        return Ok(());
    }
    writeln!(
        s,
        "### Live migration: `spec.nodeName` against `virsh migrate`\n"
    )?;
    writeln!(
        s,
        "\"Moved\": from the `spec.nodeName` edit (virtkube) or the start of `virsh migrate \
         --live --p2p --persistent --undefinesource` (the agent's flags, to the same peer and \
         data URIs) until the bench's watcher (10 ms poll of both daemons, running during \
         both) sees the guest running on the target and not on the source. \"Done\": until \
         the tool says so — the Domain settled on the target (Ready, held there, no move \
         open) for virtkube, the `virsh migrate` process's exit for virsh. Downtime: libvirt's, from the completed job (the Domain's \
         `status.migration.downtimeMillis`; `virsh domjobinfo --completed` on the target). \
         The two tools take turns, each guest going A → B, then B → A.\n"
    )?;
    writeln!(
        s,
        "| # | tool | from → to | moved (s) | done (s) | downtime (ms) | libvirt job, virsh (ms) |"
    )?;
    writeln!(s, "|---|---|---|---|---|---|---|")?;
    for (i, m) in runs.iter().enumerate() {
        writeln!(
            s,
            "| {} | {:?} | {} → {} | {:.2} | {:.2} | {} | {} |",
            i + 1,
            m.tool,
            m.from,
            m.to,
            m.seconds,
            m.settled_seconds,
            m.downtime_ms.map_or("-".into(), |d| d.to_string()),
            m.job_ms.map_or("-".into(), |d| d.to_string()),
        )?;
    }
    let of = |tool: Way| -> Vec<&MigrationRun> { runs.iter().filter(|m| m.tool == tool).collect() };
    let (vk, vs) = (of(Way::Virtkube), of(Way::Virsh));
    // Pairs as they ran: trials 2k and 2k+1 are one of each tool.
    let ratios: Vec<f64> = runs
        .chunks(2)
        .filter_map(|p| {
            let v = p.iter().find(|m| m.tool == Way::Virtkube)?;
            let h = p.iter().find(|m| m.tool == Way::Virsh)?;
            Some(v.seconds / h.seconds.max(1e-6))
        })
        .collect();
    let downtime = |v: &[&MigrationRun]| {
        fmt_spread(
            v.iter()
                .filter_map(|m| m.downtime_ms)
                .map(|d| d as f64)
                .collect(),
            0,
        )
    };
    writeln!(
        s,
        "\n| tool | runs | moved (s) | done (s) | downtime (ms) |\n|---|---|---|---|---|"
    )?;
    for (name, v) in [("virtkube", &vk), ("virsh", &vs)] {
        writeln!(
            s,
            "| {name} | {} | {} | {} | {} |",
            v.len(),
            fmt_spread(v.iter().map(|m| m.seconds).collect(), 2),
            fmt_spread(v.iter().map(|m| m.settled_seconds).collect(), 2),
            downtime(v),
        )?;
    }
    writeln!(
        s,
        "\nvirtkube / virsh per pair of consecutive trials: moved **{}**; done {}.\n",
        fmt_spread(ratios, 2),
        fmt_spread(
            runs.chunks(2)
                .filter_map(|p| {
                    let v = p.iter().find(|m| m.tool == Way::Virtkube)?;
                    let h = p.iter().find(|m| m.tool == Way::Virsh)?;
                    Some(v.settled_seconds / h.settled_seconds.max(1e-6))
                })
                .collect(),
            2
        ),
    )?;
    Ok(())
}

/// The nearest-rank percentile `p` (0–100) of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn drift(s: &mut String, trials: &[f64]) -> anyhow::Result<()> {
    if trials.is_empty() {
        return Ok(());
    }
    let mut v = trials.to_vec();
    v.sort_by(f64::total_cmp);
    let (lo, _, hi) = spread(v.clone());
    writeln!(s, "### Drift: `virsh destroy` → running again\n")?;
    writeln!(
        s,
        "A virtkube guest on A destroyed through libvirt's API (`virDomainDestroy`, what \
         `virsh destroy` calls), timed from the call's return until libvirt lists it running \
         again; the Domain settles and stays quiet for 0.5 s between trials. Percentiles are \
         nearest-rank: with {} trials, p99 is the {}th smallest.\n",
        v.len(),
        ((v.len() as f64 * 0.99).ceil() as usize).max(1)
    )?;
    writeln!(
        s,
        "| trials | p50 (s) | p90 (s) | p99 (s) | min (s) | max (s) | mean (s) |\n|---|---|---|---|---|---|---|"
    )?;
    writeln!(
        s,
        "| {} | {:.3} | {:.3} | {:.3} | {lo:.3} | {hi:.3} | {:.3} |\n",
        v.len(),
        percentile(&v, 50.0),
        percentile(&v, 90.0),
        percentile(&v, 99.0),
        v.iter().sum::<f64>() / v.len() as f64,
    )?;
    Ok(())
}

/// Guests running against time for the repetition with the median ratio: one step line
/// per way of creating them.
fn plot_creation(runs: &[CreationRun], path: &Path) -> anyhow::Result<()> {
    let mut by_ratio: Vec<&CreationRun> = runs.iter().collect();
    by_ratio.sort_by(|a, b| a.ratio().total_cmp(&b.ratio()));
    let r = by_ratio[by_ratio.len() / 2];
    let series: [(&str, RGBColor, &[f64]); 3] = [
        ("virtkube (apply → running)", RED, &r.virtkube_running),
        ("virsh define + start loop", BLUE, &r.virsh_running),
        ("libvirt API loop", GREEN, &r.api_running),
    ];
    let x_hi = series
        .iter()
        .map(|s| last(s.2))
        .fold(0.0_f64, f64::max)
        .max(0.1)
        * 1.05;
    let root = SVGBackend::new(path, (720, 440)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{} QEMU/TCG guests: running against time (median run)", r.n),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..x_hi, 0.0..(r.n as f64 + 1.0))?;
    chart
        .configure_mesh()
        .x_desc("seconds since the first apply / define")
        .y_desc("guests running")
        .draw()?;
    for (label, color, times) in series {
        let mut steps = vec![(0.0, 0.0)];
        for (i, t) in times.iter().enumerate() {
            steps.push((*t, i as f64));
            steps.push((*t, i as f64 + 1.0));
        }
        chart
            .draw_series(LineSeries::new(steps, color.stroke_width(2)))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;
    root.present()?;
    Ok(())
}
