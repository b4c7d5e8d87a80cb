//! Crash anywhere on the real daemons (issue 10's shorter series): `virtkube controller` and
//! two `virtkube agent` processes on the private libvirtd pair (`process_support`), and in
//! each run one Domain goes through create, a live migration to the other node, and delete.
//! In each of the three phases one process (either agent or the controller, drawn from a
//! printed seed) is SIGKILLed at a random moment and restarted after a random pause. After
//! each phase: the guest runs on the requested node only (create, move) or on neither and the
//! Domain is gone (delete); a sampler looking at both daemons every 100 ms must never see it
//! running on both. The counts are printed as a table.
//!
//! Run: `cargo nextest run -p virtkube --test crash_real --run-ignored all --no-capture`
//! (daemons up first, as for `placement_real.rs`). Knobs: `VIRTKUBE_CRASH_SEED=0x…` replays a
//! series, `VIRTKUBE_CRASH_REAL_RUNS=N` (default 6, about 20 s each here).
//! What a SIGKILL models: a process that dies at once, whatever it was doing (a node agent
//! OOM-killed, a controller pod evicted); libvirt and QEMU live on, as they do on a node.

mod process_support;

use std::time::{Duration, Instant};

use process_support::{Cluster, Sampler, defined_on, running_on, settled_on, small_domain};

/// xorshift64*: enough to draw kill points reproducibly from a printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn seed() -> u64 {
    match std::env::var("VIRTKUBE_CRASH_SEED") {
        Ok(s) => u64::from_str_radix(s.trim_start_matches("0x"), 16)
            .unwrap_or_else(|e| panic!("VIRTKUBE_CRASH_SEED={s}: {e}")),
        Err(_) => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64);
            nanos | 1
        }
    }
}

/// One process of the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Victim {
    AgentA,
    AgentB,
    Controller,
}

impl Victim {
    fn draw(rng: &mut Rng) -> Victim {
        match rng.below(3) {
            0 => Victim::AgentA,
            1 => Victim::AgentB,
            _ => Victim::Controller,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Victim::AgentA => "agent node-a",
            Victim::AgentB => "agent node-b",
            Victim::Controller => "controller",
        }
    }
}

/// SIGKILLs `victim` after `delay`, then restarts it after `pause`.
async fn kill_and_restart(c: &mut Cluster, victim: Victim, delay: Duration, pause: Duration) {
    tokio::time::sleep(delay).await;
    match victim {
        Victim::AgentA => c.take_agent("node-a").kill().await,
        Victim::AgentB => c.take_agent("node-b").kill().await,
        Victim::Controller => c.take_controller("c1").kill().await,
    }
    tokio::time::sleep(pause).await;
    match victim {
        Victim::AgentA => c.start_agent("node-a"),
        Victim::AgentB => c.start_agent("node-b"),
        Victim::Controller => c.start_controller("c1", "virtkube-controller"),
    }
}

/// One phase's kill, for the table.
struct Kill {
    phase: &'static str,
    victim: Victim,
    after: Duration,
}

/// The kill of `phase`: a victim drawn from `rng`, SIGKILLed within `within_ms` of now and
/// restarted within 1.5 s; recorded in `kills`.
async fn kill_during(
    c: &mut Cluster,
    rng: &mut Rng,
    kills: &mut Vec<Kill>,
    phase: &'static str,
    within_ms: u64,
) {
    let victim = Victim::draw(rng);
    let after = Duration::from_millis(rng.below(within_ms));
    let pause = Duration::from_millis(rng.below(1500));
    kill_and_restart(c, victim, after, pause).await;
    kills.push(Kill {
        phase,
        victim,
        after,
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs private libvirtd: scripts/libvirt-nodes.sh up, then --run-ignored"]
async fn crash_anywhere_on_the_real_daemons() {
    let seed = seed();
    let runs: u64 = std::env::var("VIRTKUBE_CRASH_REAL_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    println!(
        "crash series on the real daemons: seed 0x{seed:x}, {runs} runs (VIRTKUBE_CRASH_SEED replays it)"
    );
    let mut rng = Rng(seed);
    let mut c = Cluster::new().await;
    c.start_agent("node-a");
    c.start_agent("node-b");
    c.start_controller("c1", "virtkube-controller");
    c.wait_ready().await;
    let mut kills: Vec<Kill> = Vec::new();
    let mut samples_total = 0usize;
    let mut both_total = 0usize;
    let started = Instant::now();

    for run in 0..runs {
        let ns = c.namespace(&format!("cr{run}p"));
        let guest = format!("{ns}.vm");
        let (source, target) = if run % 2 == 0 {
            ("node-a", "node-b")
        } else {
            ("node-b", "node-a")
        };
        let context = |what: &str| format!("run {run} (seed 0x{seed:x}): {what}");
        let sampler = Sampler::start(&guest, c.node("node-a"), c.node("node-b"));

        // Create, with a kill.
        c.api
            .create("domains", small_domain(&ns, "vm", Some(source)))
            .unwrap();
        kill_during(&mut c, &mut rng, &mut kills, "create", 1500).await;
        c.until(180, &context(&format!("running on {source}")), || {
            c.domain(&ns, "vm").is_some_and(|d| settled_on(&d, source))
        })
        .await;

        // Move, with a kill.
        c.api
            .edit_spec("domains", &ns, "vm", |s| {
                s["nodeName"] = serde_json::json!(target)
            })
            .unwrap();
        kill_during(&mut c, &mut rng, &mut kills, "move", 2500).await;
        c.until(180, &context(&format!("moved to {target}")), || {
            c.domain(&ns, "vm").is_some_and(|d| settled_on(&d, target))
        })
        .await;

        // Delete, with a kill.
        c.api.delete("domains", &ns, "vm").unwrap();
        kill_during(&mut c, &mut rng, &mut kills, "delete", 1000).await;
        c.until(180, &context("deleted everywhere"), || {
            c.domain(&ns, "vm").is_none() && c.nodes.iter().all(|n| !defined_on(&n.uri, &guest))
        })
        .await;

        let samples = sampler.finish();
        samples_total += samples.samples.len();
        both_total += samples.on_both().len();
        samples.assert_never_on_both(&context("never on both nodes"));
        for n in &c.nodes {
            assert!(
                !running_on(&n.uri).unwrap().contains(&guest),
                "{}",
                context(&format!("still running on {}", n.name))
            );
        }
    }

    println!(
        "\n| phase | kills | of agent node-a | of agent node-b | of the controller | converged |"
    );
    println!("|---|---|---|---|---|---|");
    for phase in ["create", "move", "delete"] {
        let of = |v: Victim| {
            kills
                .iter()
                .filter(|k| k.phase == phase && k.victim == v)
                .count()
        };
        let n = kills.iter().filter(|k| k.phase == phase).count();
        println!(
            "| {phase} | {n} | {} | {} | {} | {n} of {n} |",
            of(Victim::AgentA),
            of(Victim::AgentB),
            of(Victim::Controller)
        );
    }
    println!(
        "\n{runs} runs in {:.0} s; {samples_total} samples of both daemons, {both_total} with the guest on both; \
         lost 0, leaked 0 (each phase converged and each deletion left neither daemon with the guest)",
        started.elapsed().as_secs_f64()
    );
    for k in &kills {
        println!(
            "  {} killed {:.2} s into {}",
            k.victim.name(),
            k.after.as_secs_f64(),
            k.phase
        );
    }
    c.shutdown().await;
}
