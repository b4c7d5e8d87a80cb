//! Real QEMU/TCG measurements (issue 12): virtkube's processes against the two private
//! libvirtd daemons of `scripts/libvirt-nodes.sh`, side by side in one run with `virsh`
//! doing the same on the same daemons.
//!
//! - **Creation**: N small guests from apply (server-side apply through kube's client, one
//!   after another, as `kubectl apply --server-side` sends them) to `running` in libvirt on
//!   node A, against `virsh define` + `virsh start` of the same guests in a shell-like loop
//!   (two `virsh` processes per guest) and against the same two calls through libvirt's API
//!   on one connection (the floor). The order of the three alternates between repetitions.
//! - **Live migration** by changing `spec.nodeName` (controller and both agents), against
//!   `virsh migrate --live --p2p --persistent --undefinesource` of an identical guest
//!   between the same daemons, alternating, with libvirt's reported downtime for both.
//! - **Drift**: a virtkube guest destroyed through libvirt's API (what `virsh destroy` calls)
//!   until libvirt shows it running again.
//!
//! The processes and the API server come from the tests' `process_support` (the same
//! `Cluster` the placement tests use). Nothing here is random: no seeds to fix.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use kube::api::{Api, Patch, PatchParams};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use virt::connect::Connect;
use virtkube_crds::Domain;

use super::Machine;
use super::process_support::{Cluster, Node, settled_on};
use super::scale_support::{Scrape, scrape};

/// What to measure.
#[derive(Debug, Clone)]
pub struct Options {
    /// Guests per creation run.
    pub n: usize,
    /// Creation repetitions (each: virtkube, virsh and the API loop once).
    pub reps: usize,
    /// Migrations per tool (alternating A → B and B → A).
    pub migrations: usize,
    /// Drift trials.
    pub drift_trials: usize,
    /// Guest memory, MiB.
    pub memory_mib: u64,
    /// Where the results go (rewritten after every phase).
    pub out: PathBuf,
}

/// Everything the "Real QEMU" section of the report is made from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QemuResults {
    /// Where it ran, and how busy the machine was.
    pub machine: Machine,
    /// The guests: memory in MiB (1 vCPU, no disk, no OS).
    pub memory_mib: u64,
    /// The virtkube agents' settings that bear on speed, as the binary reported them (e.g.
    /// `--concurrency 16`); empty in results measured before it was recorded, when the
    /// agents ran with that build's default `--concurrency`, 4.
    pub agent_args: String,
    /// The creation runs.
    pub creation: Vec<CreationRun>,
    /// The migrations, both tools, in the order they ran.
    pub migration: Vec<MigrationRun>,
    /// The drift trials: seconds from the destroy's return to `running` again.
    pub drift_seconds: Vec<f64>,
}

/// One creation repetition: the same N guests through the three ways.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreationRun {
    /// Guests.
    pub n: usize,
    /// The order the three ran in.
    pub order: Vec<Way>,
    /// virtkube: seconds from the first apply until guest i was seen running (sorted).
    pub virtkube_running: Vec<f64>,
    /// virtkube: seconds from the first apply until the last apply returned.
    pub virtkube_applied: f64,
    /// virtkube: seconds from the first apply until every Domain was Ready.
    pub virtkube_ready: f64,
    /// virsh: seconds from the start of the loop until guest i was seen running (sorted).
    pub virsh_running: Vec<f64>,
    /// virsh: the loop's wall time (until the last `virsh start` returned).
    pub virsh_loop: f64,
    /// libvirt's API on one connection: seconds until guest i was seen running (sorted).
    pub api_running: Vec<f64>,
    /// The API loop's wall time.
    pub api_loop: f64,
    /// Load average when the repetition started.
    pub load: String,
    /// What node A's agent spent its time on during the virtkube run (its metrics).
    #[serde(default)]
    pub agent: Option<AgentTime>,
}

/// Node A's agent's time during a virtkube creation run, from the first apply until all are
/// Ready (the deletion after it not included): differences of its metrics.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AgentTime {
    /// Domain reconciles.
    pub reconciles: u64,
    /// Their summed duration, seconds.
    pub reconcile_seconds: f64,
    /// libvirt calls by engine call: (calls, summed seconds, the engine's pool wait
    /// included).
    pub libvirt: BTreeMap<String, (u64, f64)>,
}

impl CreationRun {
    /// virtkube apply → all running over the virsh loop.
    pub fn ratio(&self) -> f64 {
        last(&self.virtkube_running) / last(&self.virsh_running).max(1e-6)
    }
}

/// The last (largest) of sorted offsets, 0 when empty.
pub fn last(v: &[f64]) -> f64 {
    v.last().copied().unwrap_or(0.0)
}

/// A way of creating guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Way {
    /// Domains applied to the API server, the agent starts them.
    Virtkube,
    /// `virsh define` and `virsh start` in a loop.
    Virsh,
    /// `virDomainDefineXML` and `virDomainCreate` on one connection.
    Api,
}

/// One live migration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationRun {
    /// virtkube or virsh.
    pub tool: Way,
    /// Source node.
    pub from: String,
    /// Target node.
    pub to: String,
    /// From the `spec.nodeName` edit (virtkube) or the `virsh migrate` process's start
    /// (virsh) until libvirt shows the guest running on the target and not on the source.
    pub seconds: f64,
    /// Until the tool says it is done: the Domain settled (Ready, held by the target, no
    /// move open) for virtkube, the `virsh migrate` process's exit for virsh.
    pub settled_seconds: f64,
    /// libvirt's downtime at switch-over, ms (virtkube: `status.migration.downtimeMillis`;
    /// virsh: `domjobinfo --completed` on the target).
    pub downtime_ms: Option<u64>,
    /// virsh: the completed job's total time as libvirt measured it, ms.
    pub job_ms: Option<u64>,
}

/// The agents' default `--concurrency`, from the binary's own help (the agents run with
/// their defaults), so the results say what they were measured with.
fn agent_settings() -> String {
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_virtkube"))
        .args(["agent", "--help"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    concurrency_default(&help).map_or_else(
        || "unknown (`virtkube agent --help` gave no default)".to_string(),
        |c| format!("--concurrency {c}"),
    )
}

/// The `[default: N]` under `--concurrency` in clap's long help (pure).
fn concurrency_default(help: &str) -> Option<u32> {
    let after = &help[help.find("--concurrency")?..];
    let start = after.find("[default: ")? + "[default: ".len();
    after[start..].split(']').next()?.trim().parse().ok()
}

/// Runs every measurement and writes the results after each phase.
pub async fn run(opts: &Options) -> anyhow::Result<QemuResults> {
    let load_before = super::loadavg();
    let mut results = QemuResults {
        machine: super::machine(load_before.clone()),
        memory_mib: opts.memory_mib,
        agent_args: agent_settings(),
        creation: Vec::new(),
        migration: Vec::new(),
        drift_seconds: Vec::new(),
    };
    let save = |r: &mut QemuResults| -> anyhow::Result<()> {
        r.machine = super::machine(load_before.clone());
        std::fs::write(&opts.out, serde_json::to_string_pretty(r)?)?;
        Ok(())
    };
    let mut c = Cluster::new().await;
    c.start_agent("node-a");
    c.start_agent("node-b");
    c.start_controller("c1", "virtkube-controller");
    c.wait_ready().await;
    let ports: BTreeMap<String, u16> = ["node-a", "node-b"]
        .into_iter()
        .map(|n| (n.to_string(), c.agent(n).port))
        .collect();
    let a = c.node("node-a").clone();
    // Guests of the loops that an interrupted run left (the Domains' guests are removed by
    // the cluster itself).
    for node in &c.nodes {
        remove_loop_guests(&node.uri)?;
    }
    let work = tempfile::tempdir()?;
    let memory = format!("{}Mi", opts.memory_mib);

    // A warm-up guest: QEMU's binary and firmware in the page cache, and the XML virtkube
    // defines, which the virsh and API loops then define (same devices, same machine).
    let ns = c.namespace("qwarm");
    apply_all(&c, &ns, &["vm".to_string()], &memory, "node-a").await?;
    wait_running(&a, &[format!("{ns}.vm")], Instant::now(), 120)?;
    let template = inactive_xml(&a.uri, &format!("{ns}.vm"))?;
    delete_all(&c, &ns, &["vm".to_string()], &a).await?;

    for rep in 0..opts.reps {
        let order = if rep % 2 == 0 {
            vec![Way::Virtkube, Way::Virsh, Way::Api]
        } else {
            vec![Way::Api, Way::Virsh, Way::Virtkube]
        };
        eprintln!("creation {}/{}: {order:?}", rep + 1, opts.reps);
        let load = super::loadavg();
        let (mut vk, mut virsh_times, mut api_times) = (None, None, None);
        for way in &order {
            match way {
                Way::Virtkube => {
                    let ns = c.namespace(&format!("qc{rep}-"));
                    let before = scrape(ports["node-a"]).await?;
                    let mut run = create_through_virtkube(&c, &ns, opts.n, &memory, &a).await?;
                    let after = scrape(ports["node-a"]).await?;
                    run.agent = Some(agent_time(&before, &after));
                    vk = Some(run);
                    delete_all(&c, &ns, &guest_names(opts.n), &a).await?;
                }
                Way::Virsh => {
                    let names = loop_names("virsh", rep, opts.n);
                    let (node, xml, dir) = (a.clone(), template.clone(), work.path().to_owned());
                    virsh_times = Some(
                        tokio::task::spawn_blocking(move || {
                            let t = virsh_loop(&node, &xml, &names, &dir);
                            remove_guests(&node.uri, &names)?;
                            t
                        })
                        .await??,
                    );
                }
                Way::Api => {
                    let names = loop_names("api", rep, opts.n);
                    let (node, xml) = (a.clone(), template.clone());
                    api_times = Some(
                        tokio::task::spawn_blocking(move || {
                            let t = api_loop(&node, &xml, &names);
                            remove_guests(&node.uri, &names)?;
                            t
                        })
                        .await??,
                    );
                }
            }
        }
        let vk = vk.context("the virtkube run")?;
        let (virsh_running, virsh_loop) = virsh_times.context("the virsh run")?;
        let (api_running, api_loop) = api_times.context("the API run")?;
        let run = CreationRun {
            n: opts.n,
            order,
            virtkube_running: vk.running,
            virtkube_applied: vk.applied,
            virtkube_ready: vk.ready,
            virsh_running,
            virsh_loop,
            api_running,
            api_loop,
            load,
            agent: vk.agent,
        };
        eprintln!(
            "  virtkube {:.2}s (Ready {:.2}s), virsh {:.2}s, API {:.2}s: ratio {:.2}",
            last(&run.virtkube_running),
            run.virtkube_ready,
            last(&run.virsh_running),
            last(&run.api_running),
            run.ratio()
        );
        results.creation.push(run);
        save(&mut results)?;
    }

    if opts.migrations > 0 {
        migrations(&mut c, opts, &template, &memory, &mut results.migration).await?;
        save(&mut results)?;
    }
    if opts.drift_trials > 0 {
        results.drift_seconds = drift(&mut c, opts.drift_trials, &memory).await?;
        save(&mut results)?;
    }
    c.shutdown().await;
    save(&mut results)?;
    Ok(results)
}

/// Guest names of a virsh or API loop: no dot, so the agents never take them for a Domain's.
fn loop_names(way: &str, rep: usize, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("qb-{way}{rep}-vm{i:02}")).collect()
}

/// The Domain manifest: 1 vCPU, `memory`, no disk (SeaBIOS finds nothing to boot and
/// idles), running on `node`.
fn manifest(ns: &str, name: &str, memory: &str, node: &str) -> Value {
    json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Domain",
           "metadata": {"name": name, "namespace": ns},
           "spec": {"runStrategy": "Always", "nodeName": node, "cpu": {"vcpus": 1},
                    "memory": {"size": memory}, "os": {"machine": "pc"}}})
}

/// Server-side applies the Domains one after another, as `kubectl apply --server-side`
/// sends a file's objects.
async fn apply_all(
    c: &Cluster,
    ns: &str,
    names: &[String],
    memory: &str,
    node: &str,
) -> anyhow::Result<()> {
    let domains: Api<Domain> = Api::namespaced(c.client.clone(), ns);
    let params = PatchParams::apply("kubectl").force();
    for name in names {
        domains
            .patch(
                name,
                &params,
                &Patch::Apply(manifest(ns, name, memory, node)),
            )
            .await
            .with_context(|| format!("applying {ns}/{name}"))?;
    }
    Ok(())
}

/// The Domains of a creation run.
fn guest_names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("vm{i:02}")).collect()
}

/// What one virtkube creation run measured.
struct VirtkubeCreation {
    running: Vec<f64>,
    applied: f64,
    ready: f64,
    agent: Option<AgentTime>,
}

async fn create_through_virtkube(
    c: &Cluster,
    ns: &str,
    n: usize,
    memory: &str,
    node: &Node,
) -> anyhow::Result<VirtkubeCreation> {
    let names = guest_names(n);
    let guests: Vec<String> = names.iter().map(|m| format!("{ns}.{m}")).collect();
    let started = Instant::now();
    // The watcher reads libvirt on its own thread while the applies go out.
    let watcher = {
        let (node, guests) = (node.clone(), guests.clone());
        std::thread::spawn(move || wait_running(&node, &guests, started, 300))
    };
    apply_all(c, ns, &names, memory, &node.name).await?;
    let applied = started.elapsed().as_secs_f64();
    let running = tokio::task::spawn_blocking(move || watcher.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the libvirt watcher panicked"))??;
    let deadline = started + Duration::from_secs(300);
    while !names
        .iter()
        .all(|m| c.domain(ns, m).is_some_and(|d| settled_on(&d, &node.name)))
    {
        if Instant::now() > deadline {
            bail!("not all Ready after 300 s\n{}", c.logs());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ready = started.elapsed().as_secs_f64();
    Ok(VirtkubeCreation {
        running,
        applied,
        ready,
        agent: None,
    })
}

/// Deletes the Domains and waits until they are gone from the API and from libvirt.
async fn delete_all(c: &Cluster, ns: &str, names: &[String], node: &Node) -> anyhow::Result<()> {
    for m in names {
        c.api
            .delete("domains", ns, m)
            .with_context(|| format!("deleting {ns}/{m}"))?;
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let left_api = names.iter().filter(|m| c.domain(ns, m).is_some()).count();
        let prefix = format!("{ns}.");
        let conn = Connect::open_read_only(Some(&node.uri))?;
        let left_libvirt = conn
            .list_all_domains(0)?
            .iter()
            .filter(|d| d.name().is_ok_and(|n| n.starts_with(&prefix)))
            .count();
        drop(conn);
        if left_api == 0 && left_libvirt == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{left_api} Domains and {left_libvirt} guests of {ns} left after 300 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Polls `node` every 10 ms until every guest runs; seconds since `started` at which each
/// was first seen running, sorted.
fn wait_running(
    node: &Node,
    guests: &[String],
    started: Instant,
    secs: u64,
) -> anyhow::Result<Vec<f64>> {
    let conn = Connect::open_read_only(Some(&node.uri))
        .with_context(|| format!("opening {}", node.uri))?;
    let mut seen: Vec<Option<f64>> = vec![None; guests.len()];
    while seen.iter().any(Option::is_none) {
        if started.elapsed() > Duration::from_secs(secs) {
            bail!(
                "{} of {} guests running on {} after {secs} s",
                seen.iter().flatten().count(),
                guests.len(),
                node.name
            );
        }
        let running: Vec<String> = conn
            .list_all_domains(virt::sys::VIR_CONNECT_LIST_DOMAINS_RUNNING)?
            .iter()
            .filter_map(|d| d.name().ok())
            .collect();
        let at = started.elapsed().as_secs_f64();
        for (g, s) in guests.iter().zip(seen.iter_mut()) {
            if s.is_none() && running.contains(g) {
                *s = Some(at);
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut out: Vec<f64> = seen.into_iter().flatten().collect();
    out.sort_by(f64::total_cmp);
    Ok(out)
}

/// The inactive XML of `guest` (what its owner defined).
fn inactive_xml(uri: &str, guest: &str) -> anyhow::Result<String> {
    let conn = Connect::open(Some(uri))?;
    let xml = conn
        .lookup_domain_by_name(guest)?
        .xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE)?;
    Ok(xml)
}

/// `template` (a guest virtkube defined) as a guest called `name` that belongs to nobody:
/// no UUID (libvirt makes one) and no metadata (virtkube's ownership mark).
pub fn foreign_copy(template: &str, name: &str) -> String {
    let mut xml = cut(template, "<uuid>", "</uuid>");
    xml = cut(&xml, "<metadata>", "</metadata>");
    match (xml.find("<name>"), xml.find("</name>")) {
        (Some(from), Some(to)) if from < to => {
            format!("{}<name>{name}</name>{}", &xml[..from], &xml[to + 7..])
        }
        _ => xml,
    }
}

/// `s` without the first `open … close` span.
fn cut(s: &str, open: &str, close: &str) -> String {
    match (s.find(open), s.find(close)) {
        (Some(from), Some(to)) if from < to => {
            format!("{}{}", &s[..from], &s[to + close.len()..])
        }
        _ => s.to_string(),
    }
}

/// Runs `work` while a watcher reads `node`'s running guests: seconds from the start until
/// each guest was seen running (sorted), and the work's own wall time.
fn watched(
    node: &Node,
    names: &[String],
    work: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<(Vec<f64>, f64)> {
    let started = Instant::now();
    let watcher = {
        let (node, names) = (node.clone(), names.to_vec());
        std::thread::spawn(move || wait_running(&node, &names, started, 300))
    };
    work()?;
    let wall = started.elapsed().as_secs_f64();
    let running = watcher
        .join()
        .map_err(|_| anyhow::anyhow!("the libvirt watcher panicked"))??;
    Ok((running, wall))
}

/// `virsh define FILE` then `virsh start NAME` for each guest, one process per command as a
/// shell loop runs them.
fn virsh_loop(
    node: &Node,
    template: &str,
    names: &[String],
    dir: &Path,
) -> anyhow::Result<(Vec<f64>, f64)> {
    let files: Vec<PathBuf> = names
        .iter()
        .map(|n| {
            let file = dir.join(format!("{n}.xml"));
            std::fs::write(&file, foreign_copy(template, n)).map(|_| file)
        })
        .collect::<Result<_, _>>()?;
    watched(node, names, || {
        for (name, file) in names.iter().zip(&files) {
            virsh(&node.uri, &["define", &file.to_string_lossy()])?;
            virsh(&node.uri, &["start", name])?;
        }
        Ok(())
    })
}

/// define+start through libvirt's API on one connection opened beforehand: the floor.
fn api_loop(node: &Node, template: &str, names: &[String]) -> anyhow::Result<(Vec<f64>, f64)> {
    let conn = Connect::open(Some(&node.uri))?;
    let xmls: Vec<String> = names.iter().map(|n| foreign_copy(template, n)).collect();
    watched(node, names, || {
        for xml in &xmls {
            conn.define_domain_xml(xml)?.create()?;
        }
        Ok(())
    })
}

/// Destroys and undefines the guests of a virsh or API loop.
fn remove_guests(uri: &str, names: &[String]) -> anyhow::Result<()> {
    let conn = Connect::open(Some(uri))?;
    for n in names {
        let dom = conn.lookup_domain_by_name(n)?;
        if dom.is_active()? {
            dom.destroy()?;
        }
        dom.undefine()?;
    }
    Ok(())
}

/// Destroys and undefines every guest of a virsh or API loop (`qb-…`) on `uri`.
fn remove_loop_guests(uri: &str) -> anyhow::Result<()> {
    let conn = Connect::open(Some(uri))?;
    for dom in conn.list_all_domains(0)? {
        if dom.name()?.starts_with("qb-") {
            if dom.is_active()? {
                dom.destroy()?;
            }
            dom.undefine()?;
        }
    }
    Ok(())
}

/// `virsh -q -c URI ARGS…`, which must succeed; its stdout.
fn virsh(uri: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("virsh")
        .args(["-q", "-c", uri])
        .args(args)
        .output()
        .context("running virsh")?;
    if !out.status.success() {
        bail!(
            "virsh {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A `Name:   123 ms` line of `virsh domjobinfo`, in ms.
pub fn jobinfo_ms(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(field))
        .and_then(|rest| rest.trim_start_matches(':').split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Alternating virtkube and virsh migrations of two identical guests between A and B.
async fn migrations(
    c: &mut Cluster,
    opts: &Options,
    template: &str,
    memory: &str,
    out: &mut Vec<MigrationRun>,
) -> anyhow::Result<()> {
    let nodes = c.nodes.clone();
    let ns = c.namespace("qmig");
    let c = &*c;
    apply_all(c, &ns, &["vm".to_string()], memory, "node-a").await?;
    wait_settled(c, &ns, "vm", "node-a", 120).await?;
    let guest = format!("{ns}.vm");
    let vname = "qb-virsh-mig".to_string();
    {
        let conn = Connect::open(Some(&nodes[0].uri))?;
        conn.define_domain_xml(&foreign_copy(template, &vname))?
            .create()?;
    }
    for i in 0..opts.migrations * 2 {
        // virtkube and virsh each move their guest once per pair of trials, taking turns
        // at going first; each guest goes A → B, then B → A.
        let pair = i / 2;
        let (from, to) = if pair % 2 == 0 {
            (&nodes[0], &nodes[1])
        } else {
            (&nodes[1], &nodes[0])
        };
        let virtkube_turn = (i % 2 == 0) == (pair % 4 < 2);
        let run = if virtkube_turn {
            migrate_virtkube(c, &ns, &guest, from, to).await?
        } else {
            migrate_virsh(&vname, from, to)?
        };
        eprintln!(
            "migration {:?} {} → {}: {:.2}s (settled {:.2}s), downtime {:?} ms",
            run.tool, run.from, run.to, run.seconds, run.settled_seconds, run.downtime_ms
        );
        out.push(run);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    for n in &nodes {
        remove_loop_guests(&n.uri)?;
    }
    delete_all(c, &ns, &["vm".to_string()], &nodes[0]).await?;
    delete_all(c, &ns, &[], &nodes[1]).await?;
    Ok(())
}

async fn wait_settled(
    c: &Cluster,
    ns: &str,
    name: &str,
    node: &str,
    secs: u64,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    while !c.domain(ns, name).is_some_and(|d| settled_on(&d, node)) {
        if started.elapsed() > Duration::from_secs(secs) {
            bail!(
                "{ns}/{name} not settled on {node} after {secs} s\n{}",
                c.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(started.elapsed())
}

async fn migrate_virtkube(
    c: &Cluster,
    ns: &str,
    guest: &str,
    from: &Node,
    to: &Node,
) -> anyhow::Result<MigrationRun> {
    let started = Instant::now();
    c.api
        .edit_spec("domains", ns, "vm", |s| s["nodeName"] = json!(to.name))?;
    let moved = {
        let (from, to, guest) = (from.clone(), to.clone(), guest.to_string());
        tokio::task::spawn_blocking(move || wait_moved(&from, &to, &guest, started, 120)).await??
    };
    wait_settled(c, ns, "vm", &to.name, 120).await?;
    let settled = started.elapsed();
    let dom = c.domain(ns, "vm").context("the Domain")?;
    Ok(MigrationRun {
        tool: Way::Virtkube,
        from: from.name.clone(),
        to: to.name.clone(),
        seconds: moved.as_secs_f64(),
        settled_seconds: settled.as_secs_f64(),
        downtime_ms: dom["status"]["migration"]["downtimeMillis"].as_u64(),
        job_ms: None,
    })
}

/// Polls both daemons every 10 ms until `guest` runs on `to` and no longer on `from`.
fn wait_moved(
    from: &Node,
    to: &Node,
    guest: &str,
    started: Instant,
    secs: u64,
) -> anyhow::Result<Duration> {
    let source = Connect::open_read_only(Some(&from.uri))?;
    let target = Connect::open_read_only(Some(&to.uri))?;
    loop {
        // Target first: the guest resumes there only after the source paused it for good.
        if runs_on(&target, guest)? && !runs_on(&source, guest)? {
            return Ok(started.elapsed());
        }
        if started.elapsed() > Duration::from_secs(secs) {
            bail!("{guest} not moved to {} after {secs} s", to.name);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether libvirt lists `guest` as running (the state `virsh list` shows; a lookup of a
/// missing name would print libvirt's error).
fn runs_on(conn: &Connect, guest: &str) -> anyhow::Result<bool> {
    Ok(conn
        .list_all_domains(virt::sys::VIR_CONNECT_LIST_DOMAINS_RUNNING)?
        .iter()
        .any(|d| d.name().is_ok_and(|n| n == guest)))
}

/// `virsh migrate` with the flags the agent uses (live, peer-to-peer, persistent on the
/// target, undefined on the source) to the same peer and data URIs the agents publish.
fn migrate_virsh(name: &str, from: &Node, to: &Node) -> anyhow::Result<MigrationRun> {
    let started = Instant::now();
    let watcher = {
        let (from, to, name) = (from.clone(), to.clone(), name.to_string());
        std::thread::spawn(move || wait_moved(&from, &to, &name, started, 120))
    };
    virsh(
        &from.uri,
        &[
            "migrate",
            "--live",
            "--p2p",
            "--persistent",
            "--undefinesource",
            name,
            &to.p2p,
            &to.migration,
        ],
    )?;
    let done = started.elapsed().as_secs_f64();
    let moved = watcher
        .join()
        .map_err(|_| anyhow::anyhow!("the libvirt watcher panicked"))??;
    let info = virsh(&to.uri, &["domjobinfo", "--completed", name])?;
    Ok(MigrationRun {
        tool: Way::Virsh,
        from: from.name.clone(),
        to: to.name.clone(),
        seconds: moved.as_secs_f64(),
        settled_seconds: done,
        downtime_ms: jobinfo_ms(&info, "Total downtime"),
        job_ms: jobinfo_ms(&info, "Time elapsed"),
    })
}

/// `trials` times: destroy the guest through libvirt's API (what `virsh destroy` calls),
/// then time until libvirt shows it running again; between trials the Domain settles.
async fn drift(c: &mut Cluster, trials: usize, memory: &str) -> anyhow::Result<Vec<f64>> {
    let node = c.node("node-a").clone();
    let ns = c.namespace("qdrift");
    let c = &*c;
    apply_all(c, &ns, &["vm".to_string()], memory, "node-a").await?;
    let guest = format!("{ns}.vm");
    let mut out = Vec::new();
    for t in 0..trials {
        wait_settled(c, &ns, "vm", "node-a", 120).await?;
        // Settled in the API and quiet for a moment: the repair's own events are behind us.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (uri, g) = (node.uri.clone(), guest.clone());
        let took = tokio::task::spawn_blocking(move || -> anyhow::Result<f64> {
            let conn = Connect::open(Some(&uri))?;
            conn.lookup_domain_by_name(&g)?.destroy()?;
            let destroyed = Instant::now();
            loop {
                if runs_on(&conn, &g)? {
                    return Ok(destroyed.elapsed().as_secs_f64());
                }
                if destroyed.elapsed() > Duration::from_secs(60) {
                    bail!("{g} not running again 60 s after a destroy");
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
        .await??;
        if t % 10 == 0 {
            eprintln!("drift {}/{trials}: {took:.3}s", t + 1);
        }
        out.push(took);
    }
    delete_all(c, &ns, &["vm".to_string()], &node).await?;
    Ok(out)
}

/// The `call` label of a metric key.
fn call_label(key: &str) -> Option<&str> {
    key.split("call=\"").nth(1)?.split('"').next()
}

/// What the agent did between two scrapes.
fn agent_time(before: &Scrape, after: &Scrape) -> AgentTime {
    let d = |key: &str| {
        after.get(key).copied().unwrap_or(0.0) - before.get(key).copied().unwrap_or(0.0)
    };
    let mut t = AgentTime {
        reconciles: d("virtkube_agent_reconcile_duration_seconds_count{kind=\"Domain\"}") as u64,
        reconcile_seconds: d("virtkube_agent_reconcile_duration_seconds_sum{kind=\"Domain\"}"),
        libvirt: BTreeMap::new(),
    };
    for key in after.keys() {
        let Some(call) = call_label(key) else {
            continue;
        };
        if key.starts_with("virtkube_agent_libvirt_calls_total{") {
            t.libvirt.entry(call.to_string()).or_default().0 = d(key) as u64;
        } else if key.starts_with("virtkube_agent_libvirt_call_seconds_total{") {
            t.libvirt.entry(call.to_string()).or_default().1 = d(key);
        }
    }
    t.libvirt.retain(|_, (n, _)| *n > 0);
    t
}
