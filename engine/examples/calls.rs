//! Measures the cost of the engine's basic calls (define, start, pin, destroy, undefine, and
//! live migration when a second node is given), next to the same libvirt calls made directly
//! through the `virt` crate in a loop (the floor), and `virsh` for migration.
//!
//! ```sh
//! cargo run -p virtkube-engine --example calls -- test:///default 200
//! # real daemons (scripts/libvirt-nodes.sh up; set -a; . /tmp/virtkube-libvirt-nodes/env; set +a):
//! cargo run -p virtkube-engine --example calls -- "$VIRTKUBE_TEST_NODE_A_URI" 5 \
//!     --migrate "$VIRTKUBE_TEST_NODE_B_URI" "$VIRTKUBE_TEST_NODE_B_P2P_URI" \
//!     "$VIRTKUBE_TEST_NODE_B_MIGRATION_URI" "$VIRTKUBE_TEST_NODE_A_P2P_URI" "$VIRTKUBE_TEST_NODE_A_MIGRATION_URI"
//! ```

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use virtkube_engine::domain::Apply;
use virtkube_engine::migrate::MigrateOptions;
use virtkube_engine::model::DomainDef;
use virtkube_engine::{CpuSet, Engine, EngineConfig, Owner};

#[derive(Default)]
struct Timings(BTreeMap<&'static str, Vec<Duration>>);

impl Timings {
    fn add(&mut self, k: &'static str, d: Duration) {
        self.0.entry(k).or_default().push(d);
    }
    fn print(&self, title: &str) {
        println!("{title}");
        for (k, v) in &self.0 {
            let mut v = v.clone();
            v.sort();
            let mean = v.iter().sum::<Duration>() / v.len() as u32;
            println!(
                "  {k:<10} n={:<4} mean {:>8.3} ms  median {:>8.3} ms  max {:>8.3} ms",
                v.len(),
                mean.as_secs_f64() * 1e3,
                v[v.len() / 2].as_secs_f64() * 1e3,
                v[v.len() - 1].as_secs_f64() * 1e3
            );
        }
    }
}

fn def(name: &str, owner: &Owner, test: bool) -> DomainDef {
    let mut d = DomainDef::new(name, owner.clone());
    d.max_vcpus = 2;
    if test {
        d.virt_type = "test".into();
    } else {
        d.virt_type = "qemu".into();
        d.os.machine = Some("pc".into());
        d.emulator = Some("/usr/bin/qemu-system-x86_64".into());
    }
    d
}

macro_rules! timed {
    ($t:expr, $k:expr, $e:expr) => {{
        let t0 = Instant::now();
        let r = $e;
        $t.add($k, t0.elapsed());
        r
    }};
}

/// The same calls straight through `virt`, no engine: the floor.
fn direct(uri: &str, n: usize, test: bool) -> Timings {
    let mut t = Timings::default();
    let conn = virt::connect::Connect::open(Some(uri)).unwrap();
    let o = Owner::new("Domain", "bench", Some("bench"), "direct");
    let pin = if test {
        0
    } else {
        virt::sys::VIR_DOMAIN_AFFECT_LIVE
    };
    for _ in 0..n {
        timed!(t, "ping", conn.is_alive().unwrap());
    }
    for i in 0..n {
        let xml = def(&format!("bench.direct{i}"), &o, test).to_xml();
        let dom = timed!(t, "define", conn.define_domain_xml(&xml).unwrap());
        timed!(t, "start", dom.create().unwrap());
        timed!(t, "pin", dom.pin_vcpu_flags(0, &[0b1], pin).unwrap());
        timed!(t, "destroy", dom.destroy().unwrap());
        timed!(t, "undefine", dom.undefine().unwrap());
    }
    let conn = std::mem::ManuallyDrop::new(conn);
    // SAFETY: closing our own reference once.
    unsafe { virt::sys::virConnectClose(conn.as_ptr()) };
    t
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let uri = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "test:///default".into());
    let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(100);
    let test = uri.starts_with("test:");
    let migrate = args
        .iter()
        .position(|a| a == "--migrate")
        .map(|i| &args[i + 1..]);

    let t0 = Instant::now();
    let e = Engine::connect(&uri, EngineConfig::default())
        .await
        .unwrap();
    println!("connect {uri}: {:.1} ms", t0.elapsed().as_secs_f64() * 1e3);
    let apply = if test {
        Apply::Current
    } else {
        Apply::LiveAndConfig
    };
    let cpu0: CpuSet = "0".parse().unwrap();
    let mut t = Timings::default();
    for i in 0..n {
        let name = format!("bench.engine{i}");
        let o = Owner::new(
            "Domain",
            format!("bench-{i}"),
            Some("bench"),
            format!("engine{i}"),
        );
        timed!(
            t,
            "define",
            e.domain_define(&def(&name, &o, test)).await.unwrap()
        );
        timed!(t, "start", e.domain_start(&name, &o).await.unwrap());
        timed!(
            t,
            "pin",
            e.domain_pin_vcpu(&name, &o, 0, &cpu0, apply).await.unwrap()
        );
        timed!(t, "observe", e.domain_observe(&name).await.unwrap());
        timed!(t, "destroy", e.domain_destroy(&name, &o).await.unwrap());
        timed!(t, "undefine", e.domain_undefine(&name, &o).await.unwrap());
    }
    for _ in 0..n {
        timed!(t, "ping", e.ping().await.unwrap());
    }
    t.print(&format!("engine, {n} rounds on {uri}"));
    direct(&uri, n, test).print(&format!("direct virt calls (floor), {n} rounds"));

    if let Some([b_uri, b_p2p, b_mig, a_p2p, a_mig, ..]) = migrate {
        let b = Engine::connect(b_uri, EngineConfig::default())
            .await
            .unwrap();
        let mut t = Timings::default();
        for i in 0..n {
            let name = format!("bench.mig{i}");
            let o = Owner::new(
                "Domain",
                format!("mig-{i}"),
                Some("bench"),
                format!("mig{i}"),
            );
            e.domain_define(&def(&name, &o, false)).await.unwrap();
            e.domain_start(&name, &o).await.unwrap();
            let mut to_b = MigrateOptions::live_to(b_p2p.clone());
            to_b.migrate_uri = Some(b_mig.clone());
            to_b.dest_client_uri = Some(b_uri.clone());
            timed!(
                t,
                "migrate",
                e.domain_migrate(&name, &o, &to_b).await.unwrap()
            );
            // Back with virsh, the comparison.
            let t0 = Instant::now();
            let st = std::process::Command::new("virsh")
                .args([
                    "-c",
                    b_uri,
                    "migrate",
                    "--live",
                    "--p2p",
                    "--persistent",
                    "--undefinesource",
                ])
                .args(["--migrateuri", a_mig, &name, a_p2p])
                .status()
                .unwrap();
            assert!(st.success());
            t.add("virsh-migr", t0.elapsed());
            e.domain_destroy(&name, &o).await.unwrap();
            e.domain_undefine(&name, &o).await.unwrap();
        }
        t.print("live migration A<->B (engine A->B, virsh B->A)");
        b.close().await.unwrap();
    }
    if test {
        // A resync of n converged domains: one observe_all pass vs n observes.
        let mut owners = Vec::new();
        for i in 0..n {
            let name = format!("bench.resync{i}");
            let o = Owner::new(
                "Domain",
                format!("rs-{i}"),
                Some("bench"),
                format!("resync{i}"),
            );
            e.domain_define(&def(&name, &o, test)).await.unwrap();
            e.domain_start(&name, &o).await.unwrap();
            owners.push((name, o));
        }
        e.reset_stats();
        let t0 = Instant::now();
        let all = e.domain_observe_all().await.unwrap();
        let t_all = t0.elapsed();
        let t0 = Instant::now();
        for (name, _) in &owners {
            e.domain_observe(name).await.unwrap();
        }
        let t_each = t0.elapsed();
        println!(
            "resync of {} domains: observe_all {:.1} ms, {} x observe {:.1} ms, mutating calls {}",
            all.len(),
            t_all.as_secs_f64() * 1e3,
            owners.len(),
            t_each.as_secs_f64() * 1e3,
            e.stats().mutating_calls()
        );
        for (name, o) in &owners {
            e.domain_destroy(name, o).await.unwrap();
            e.domain_undefine(name, o).await.unwrap();
        }
    }
    let s = e.stats();
    println!(
        "engine stats: {} calls, {} mutating, {} reconnects",
        s.total_calls(),
        s.mutating_calls(),
        s.reconnects
    );
    e.close().await.unwrap();
}
