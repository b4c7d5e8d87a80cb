//! The engine against real private libvirtd daemons running QEMU under TCG.
//!
//! Start them first, then run the ignored tests (as root):
//!
//! ```sh
//! scripts/libvirt-nodes.sh up
//! set -a; . /tmp/virtkube-libvirt-nodes/env; set +a
//! cargo test -p virtkube-engine --test real_libvirt -- --ignored --test-threads=2
//! scripts/libvirt-nodes.sh down
//! ```
//!
//! When run without the environment the script writes, these tests fail: they never pass
//! silently.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use virtkube_engine::domain::{Apply, ShutdownOutcome};
use virtkube_engine::migrate::MigrateOptions;
use virtkube_engine::model::{
    BuildMode, DhcpRange, DiskDef, DiskSource, DomainDef, DomainState, InterfaceDef, IpDef,
    NetworkDef, NetworkMode, PoolDef, PoolState, VcpuPin, VolumeDef, VolumeFormat,
};
use virtkube_engine::{
    CpuSet, DomainEvent, DomainEventKind, Engine, EngineConfig, EngineError, EngineEvent, Owner,
};

const NEEDS: &str = "needs private libvirtd: scripts/libvirt-nodes.sh up, then --run-ignored";

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: run `scripts/libvirt-nodes.sh up` then \
             `set -a; . /tmp/virtkube-libvirt-nodes/env; set +a` before these tests"
        )
    })
}

async fn node(which: &str) -> Engine {
    let uri = env(&format!("VIRTKUBE_TEST_NODE_{which}_URI"));
    Engine::connect(&uri, EngineConfig::default())
        .await
        .unwrap_or_else(|e| panic!("cannot connect to node {which} at {uri}: {e}"))
}

fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}x{}",
        std::process::id() % 100_000,
        N.fetch_add(1, Ordering::SeqCst)
    )
}

fn owner(name: &str) -> Owner {
    Owner::new("Domain", format!("uid-{name}"), Some("it"), name)
}

/// A tiny guest: no OS, 128 MiB, up to 2 vCPUs, no balloon.
fn tiny(name: &str, o: &Owner) -> DomainDef {
    let mut d = DomainDef::new(name, o.clone());
    d.virt_type = "qemu".into();
    d.vcpus = 1;
    d.max_vcpus = 2;
    d.os.machine = Some("pc".into());
    d.emulator = Some("/usr/bin/qemu-system-x86_64".into());
    d
}

/// The virtual size `qemu-img info` reads from an image's header (`-U`: the guest may hold
/// the image's lock).
fn qemu_img_virtual_size(path: &str) -> u64 {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json", path])
        .output()
        .expect("qemu-img runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let rest = &text[text.find("\"virtual-size\":").expect("virtual-size") + 15..];
    rest.trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .expect("a number")
}

fn qemu_pid(name: &str) -> Option<u32> {
    let needle = format!("guest={name},");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        String::from_utf8_lossy(&cmd)
            .contains(&needle)
            .then_some(pid)
    })
}

/// comm → Cpus_allowed_list of every thread of a process.
fn thread_affinities(pid: u32) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        if let Some(l) = status.lines().find(|l| l.starts_with("Cpus_allowed_list:")) {
            out.insert(
                comm.trim().to_string(),
                l.split(':').nth(1).unwrap().trim().to_string(),
            );
        }
    }
    out
}

fn vcpu0_affinity(name: &str) -> CpuSet {
    let pid = qemu_pid(name).expect("QEMU process of the guest");
    let aff = thread_affinities(pid);
    aff.get("CPU 0/TCG")
        .unwrap_or_else(|| panic!("no `CPU 0/TCG` thread in {aff:?}"))
        .parse()
        .unwrap()
}

fn virsh(uri: &str, args: &[&str]) {
    let out = Command::new("virsh")
        .arg("-c")
        .arg(uri)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "virsh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn next_event_for(
    events: &mut (impl Stream<Item = EngineEvent> + Unpin),
    name: &str,
    within: Duration,
) -> DomainEvent {
    let until = Instant::now() + within;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.next()).await {
            Ok(Some(EngineEvent::Domain(d))) if d.name == name => return d,
            Ok(Some(_)) => continue,
            Ok(None) => panic!("event stream ended"),
            Err(_) => panic!("no event for {name} within {within:?}"),
        }
    }
}

/// Waits for a specific event of `name`, skipping others (QEMU also emits e.g.
/// Resumed/unpaused around a start).
async fn expect_event(
    events: &mut (impl Stream<Item = EngineEvent> + Unpin),
    name: &str,
    kind: DomainEventKind,
    detail: &str,
) {
    let mut seen = Vec::new();
    let until = Instant::now() + Duration::from_secs(15);
    while Instant::now() < until {
        let ev = next_event_for(
            events,
            name,
            until.saturating_duration_since(Instant::now()),
        )
        .await;
        if ev.kind == kind && ev.detail == detail {
            return;
        }
        seen.push((ev.kind, ev.detail));
    }
    panic!("no {kind:?}/{detail} event for {name}; saw {seen:?}");
}

/// Removes what a test created when it panics, on both nodes, with virsh (so a failed run
/// leaves no TCG guest burning CPU until `scripts/libvirt-nodes.sh down`).
struct Leftovers(Vec<Vec<String>>);

impl Leftovers {
    fn domain(name: &str) -> Self {
        Self(vec![
            vec!["destroy".into(), name.into()],
            vec!["undefine".into(), "--managed-save".into(), name.into()],
        ])
    }

    fn network(mut self, name: &str) -> Self {
        self.0.push(vec!["net-destroy".into(), name.into()]);
        self.0.push(vec!["net-undefine".into(), name.into()]);
        self
    }

    fn pool(mut self, name: &str) -> Self {
        self.0.push(vec!["pool-destroy".into(), name.into()]);
        self.0.push(vec!["pool-undefine".into(), name.into()]);
        self
    }
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for node in ["A", "B"] {
            let Ok(uri) = std::env::var(format!("VIRTKUBE_TEST_NODE_{node}_URI")) else {
                continue;
            };
            for args in &self.0 {
                let _ = Command::new("virsh")
                    .arg("-c")
                    .arg(&uri)
                    .args(args)
                    .output();
            }
        }
    }
}

async fn cleanup(e: &Engine, name: &str, o: &Owner) {
    let _ = e.domain_destroy(name, o).await;
    let _ = e.domain_undefine(name, o).await;
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs private libvirtd: scripts/libvirt-nodes.sh up, then --run-ignored"]
async fn define_start_pin_checks_real_thread_affinity() {
    let _ = NEEDS;
    let e = node("A").await;
    let name = unique("vkpin");
    let o = owner(&name);
    let _leftovers = Leftovers::domain(&name);
    let mut def = tiny(&name, &o);
    def.pinning = vec![VcpuPin {
        vcpu: 0,
        cpuset: "1".parse().unwrap(),
    }];

    let t = Instant::now();
    e.domain_define(&def).await.unwrap();
    let t_define = t.elapsed();
    let t = Instant::now();
    e.domain_start(&name, &o).await.unwrap();
    let t_start = t.elapsed();
    assert_eq!(
        e.domain_state(&name).await.unwrap(),
        (DomainState::Running, "booted")
    );
    assert_eq!(
        vcpu0_affinity(&name).to_string(),
        "1",
        "pin from the XML applied at start"
    );

    let zero: CpuSet = "0".parse().unwrap();
    let t = Instant::now();
    e.domain_pin_vcpu(&name, &o, 0, &zero, Apply::LiveAndConfig)
        .await
        .unwrap();
    let t_pin = t.elapsed();
    assert_eq!(
        vcpu0_affinity(&name),
        zero,
        "live pin reaches the vCPU thread"
    );
    let live = e.domain_vcpu_pin_info(&name, Apply::Live).await.unwrap();
    assert_eq!(live[0].cpuset, zero);
    let config = e.domain_vcpu_pin_info(&name, Apply::Config).await.unwrap();
    assert_eq!(config[0].cpuset, zero);

    let both: CpuSet = "0-1".parse().unwrap();
    e.domain_pin_emulator(&name, &o, &both, Apply::LiveAndConfig)
        .await
        .unwrap();
    assert_eq!(
        e.domain_emulator_pin_info(&name, Apply::Live)
            .await
            .unwrap(),
        both
    );

    let obs = e.domain_observe(&name).await.unwrap().unwrap();
    assert_eq!(obs.owner.as_ref(), Some(&o));
    assert_eq!(obs.affinity(0), Some(&zero));
    assert!(obs.id.is_some());
    assert_eq!(obs.emulator_cpuset.as_ref(), Some(&both));

    // Unpinning: pinned to every online CPU, live and config, the vCPU floats again, on its
    // thread and as libvirt reports it (what it reports for a vCPU never pinned).
    let online = e.node_cpu_map().await.unwrap().online;
    e.domain_pin_vcpu(&name, &o, 0, &online, Apply::LiveAndConfig)
        .await
        .unwrap();
    assert_eq!(vcpu0_affinity(&name), online, "the thread floats again");
    for apply in [Apply::Live, Apply::Config] {
        let pins = e.domain_vcpu_pin_info(&name, apply).await.unwrap();
        assert_eq!(pins[0].cpuset, online, "{apply:?}");
    }

    let t = Instant::now();
    e.domain_destroy(&name, &o).await.unwrap();
    let t_destroy = t.elapsed();
    e.domain_undefine(&name, &o).await.unwrap();
    eprintln!(
        "real daemon: define {:.1} ms, start {:.1} ms, pin {:.1} ms, destroy {:.1} ms",
        ms(t_define),
        ms(t_start),
        ms(t_pin),
        ms(t_destroy)
    );
    e.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs private libvirtd: scripts/libvirt-nodes.sh up, then --run-ignored"]
async fn vcpu_hotplug_suspend_resume_and_shutdown_deadline() {
    let e = node("A").await;
    let name = unique("vkhot");
    let o = owner(&name);
    let _leftovers = Leftovers::domain(&name);
    let mut def = tiny(&name, &o);
    // With a balloon, whose live size may differ from the target, the observation carries
    // the persistent definition's sizes.
    def.memballoon = true;
    e.domain_define(&def).await.unwrap();
    e.domain_start(&name, &o).await.unwrap();

    e.domain_set_vcpus(&name, &o, 2, Apply::Live).await.unwrap();
    assert_eq!(e.domain_info(&name).await.unwrap().vcpus, 2);
    let pid = qemu_pid(&name).unwrap();
    assert!(
        thread_affinities(pid).contains_key("CPU 1/TCG"),
        "second vCPU thread exists"
    );
    // Config untouched: the next boot has one vCPU again.
    let inactive = e.domain_xml(&name, true).await.unwrap();
    assert!(
        inactive.contains("current='1'") || inactive.contains("current=\"1\""),
        "{inactive}"
    );

    e.domain_set_memory(&name, &o, 128 * 1024, Apply::Config)
        .await
        .unwrap();
    // The persistent definition's sizes come with the observation of the running guest.
    let obs = e.domain_observe(&name).await.unwrap().unwrap();
    let config = obs.config.expect("running and persistent");
    assert_eq!(config.memory_kib, 128 * 1024);
    assert_eq!((obs.vcpus, config.vcpus), (2, 1));

    e.domain_suspend(&name, &o).await.unwrap();
    assert_eq!(
        e.domain_state(&name).await.unwrap(),
        (DomainState::Paused, "user")
    );
    e.domain_resume(&name, &o).await.unwrap();
    assert_eq!(
        e.domain_state(&name).await.unwrap(),
        (DomainState::Running, "unpaused")
    );

    // Managed save: memory to disk, stopped; the next start restores it (2 vCPUs still).
    e.domain_managed_save(&name, &o).await.unwrap();
    let obs = e.domain_observe(&name).await.unwrap().unwrap();
    assert_eq!(
        (obs.state, obs.reason.as_str()),
        (DomainState::Shutoff, "saved")
    );
    assert!(obs.has_managed_save);
    e.domain_start(&name, &o).await.unwrap();
    assert_eq!(
        e.domain_state(&name).await.unwrap(),
        (DomainState::Running, "restored")
    );
    assert_eq!(e.domain_info(&name).await.unwrap().vcpus, 2);

    // No OS answers ACPI: the deadline passes and the engine destroys the guest.
    let t = Instant::now();
    let out = e
        .domain_shutdown(&name, &o, Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(out, ShutdownOutcome::Destroyed);
    assert!(t.elapsed() >= Duration::from_secs(2));
    assert_eq!(e.domain_state(&name).await.unwrap().0, DomainState::Shutoff);
    cleanup(&e, &name, &o).await;
    e.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs private libvirtd: scripts/libvirt-nodes.sh up, then --run-ignored"]
async fn dir_pool_with_qcow2_volumes_attached_to_a_domain() {
    let e = node("A").await;
    let pool = unique("vkpool");
    let po = Owner::new("StoragePool", format!("uid-{pool}"), None, &pool);
    let _pool_leftovers = Leftovers(vec![]).pool(&pool);
    let dir = tempfile::Builder::new()
        .prefix("vkpool")
        .tempdir_in("/tmp")
        .unwrap();
    let target = dir.path().join("images");
    e.pool_define(&PoolDef::dir(&pool, target.to_str().unwrap(), po.clone()))
        .await
        .unwrap();
    e.pool_build(&pool, &po, BuildMode::TargetOnly)
        .await
        .unwrap();
    assert!(target.is_dir(), "build creates the directory");
    e.pool_start(&pool, &po).await.unwrap();
    let p = e.pool_observe(&pool).await.unwrap().unwrap();
    assert_eq!(p.state, PoolState::Running);
    assert_eq!(
        p.owner.as_ref(),
        Some(&po),
        "vendor/product mark kept by the dir backend"
    );
    assert!(p.capacity > 0 && p.available > 0);

    let vol = |name: &str, mib: u64, backing: Option<&str>| VolumeDef {
        name: name.into(),
        capacity_bytes: mib << 20,
        format: VolumeFormat::Qcow2,
        backing_volume: backing.map(str::to_string),
    };
    let base = e
        .volume_create(&pool, &vol("it.base", 16, None))
        .await
        .unwrap();
    assert_eq!(base.format, Some(VolumeFormat::Qcow2));
    assert!(Path::new(&base.path).exists());
    // A clone honours its capacity (libvirt alone copies the source's size) and is never
    // smaller than its source.
    let clone = e
        .volume_clone(&pool, &vol("it.clone", 24, None), "it.base")
        .await
        .unwrap();
    assert_eq!(clone.capacity, 24 << 20);
    assert_eq!(qemu_img_virtual_size(&clone.path), 24 << 20);
    assert!(matches!(
        e.volume_clone(&pool, &vol("it.small", 8, None), "it.base")
            .await,
        Err(EngineError::ShrinkRefused { .. })
    ));
    assert!(
        e.volume_observe(&pool, "it.small").await.unwrap().is_none(),
        "nothing copied"
    );
    let cow = e
        .volume_create(&pool, &vol("it.cow", 16, Some("it.base")))
        .await
        .unwrap();
    assert_eq!(
        cow.backing.as_ref().map(|b| b.path.as_str()),
        Some(base.path.as_str())
    );

    e.volume_resize(&pool, "it.clone", &clone.key, 32 << 20)
        .await
        .unwrap();
    assert_eq!(
        e.volume_observe(&pool, "it.clone")
            .await
            .unwrap()
            .unwrap()
            .capacity,
        32 << 20
    );
    assert!(matches!(
        e.volume_resize(&pool, "it.clone", &clone.key, 8 << 20)
            .await,
        Err(EngineError::ShrinkRefused { .. })
    ));
    assert_eq!(
        e.volume_lookup_key(&cow.key).await.unwrap().unwrap().name,
        "it.cow"
    );

    let name = unique("vkdisk");
    let o = owner(&name);
    let _leftovers = Leftovers::domain(&name);
    let mut def = tiny(&name, &o);
    for (i, v) in ["it.clone", "it.cow"].iter().enumerate() {
        def.disks.push(DiskDef {
            name: Some(format!("d{i}")),
            target_dev: format!("vd{}", (b'a' + i as u8) as char),
            bus: Some("virtio".into()),
            source: DiskSource::Volume {
                pool: pool.clone(),
                volume: v.to_string(),
            },
            read_only: false,
            boot_order: Some(i as u32 + 1),
            format: Some("qcow2".into()),
            device: None,
        });
    }
    e.domain_define(&def).await.unwrap();
    e.domain_start(&name, &o).await.unwrap();
    let obs = e.domain_observe(&name).await.unwrap().unwrap();
    assert_eq!(obs.disks.len(), 2);
    assert_eq!(obs.disks[1].alias.as_deref(), Some("d1"));
    assert_eq!(
        obs.disks[0].source,
        DiskSource::Volume {
            pool: pool.clone(),
            volume: "it.clone".into()
        }
    );

    // Growing an image the running guest holds open: through the domain (QEMU's
    // block_resize), seen by libvirt's pool and in the qcow2 header.
    e.domain_block_resize(&name, &o, "vda", 48 << 20)
        .await
        .unwrap();
    let grown = e.volume_observe(&pool, "it.clone").await.unwrap().unwrap();
    assert_eq!(grown.capacity, 48 << 20);
    assert_eq!(qemu_img_virtual_size(&grown.path), 48 << 20);
    // By path as well; the current size is a no-op, a smaller one refused.
    e.domain_block_resize(&name, &o, &grown.path, 48 << 20)
        .await
        .unwrap();
    assert!(matches!(
        e.domain_block_resize(&name, &o, "vda", 16 << 20).await,
        Err(EngineError::ShrinkRefused { current, .. }) if current == 48 << 20
    ));
    assert!(
        e.domain_block_resize(&name, &owner("someone-else"), "vda", 64 << 20)
            .await
            .unwrap_err()
            .is_not_owned()
    );
    cleanup(&e, &name, &o).await;

    for (n, v) in [("it.cow", &cow), ("it.clone", &clone), ("it.base", &base)] {
        e.volume_delete(&pool, n, &v.key).await.unwrap();
    }
    e.pool_stop(&pool, &po).await.unwrap();
    e.pool_delete(&pool, &po).await.unwrap();
    assert!(!target.exists(), "pool delete removes the directory");
    e.pool_undefine(&pool, &po).await.unwrap();
    e.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs private libvirtd: scripts/libvirt-nodes.sh up, then --run-ignored"]
async fn isolated_network_with_a_guest() {
    let e = node("A").await;
    let net = unique("vkn");
    let no = Owner::new("Network", format!("uid-{net}"), None, &net);
    let _net_leftovers = Leftovers(vec![]).network(&net);
    let octet = 100 + (std::process::id() % 100);
    let def = NetworkDef {
        name: net.clone(),
        mode: NetworkMode::Isolated,
        bridge: Some(format!("vkb{}", std::process::id() % 100_000)),
        ip: Some(IpDef {
            address: format!("10.{octet}.7.1"),
            prefix: 24,
            dhcp: vec![DhcpRange {
                start: format!("10.{octet}.7.10"),
                end: format!("10.{octet}.7.50"),
            }],
            hosts: vec![],
        }),
        dns_hosts: vec![],
        owner: no.clone(),
    };
    e.network_define(&def).await.unwrap();
    e.network_start(&net, &no).await.unwrap();
    e.network_set_autostart(&net, &no, true).await.unwrap();
    let obs = e.network_observe(&net).await.unwrap().unwrap();
    assert!(obs.active && obs.autostart && obs.persistent);
    assert_eq!(
        obs.owner.as_ref(),
        Some(&no),
        "network <metadata> kept by libvirt 9.0"
    );
    assert_eq!(obs.bridge, def.bridge);
    assert_eq!(obs.mode, NetworkMode::Isolated);

    let name = unique("vknic");
    let o = owner(&name);
    let _leftovers = Leftovers::domain(&name);
    let mut d = tiny(&name, &o);
    d.interfaces.push(InterfaceDef {
        name: None,
        network: net.clone(),
        model: Some("virtio".into()),
        mac: Some("52:54:00:12:34:56".into()),
    });
    e.domain_define(&d).await.unwrap();
    e.domain_start(&name, &o).await.unwrap();
    let dobs = e.domain_observe(&name).await.unwrap().unwrap();
    assert_eq!(dobs.interfaces[0].network.as_deref(), Some(net.as_str()));
    assert_eq!(dobs.interfaces[0].mac.as_deref(), Some("52:54:00:12:34:56"));
    assert!(dobs.interfaces[0].target_dev.is_some());
    cleanup(&e, &name, &o).await;

    e.network_stop(&net, &no).await.unwrap();
    e.network_undefine(&net, &no).await.unwrap();
    assert!(e.network_observe(&net).await.unwrap().is_none());
    e.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs private libvirtd: scripts/libvirt-nodes.sh up, then --run-ignored"]
async fn events_for_out_of_band_virsh_changes() {
    let uri = env("VIRTKUBE_TEST_NODE_A_URI");
    let e = node("A").await;
    let mut events = Box::pin(e.events());
    let name = unique("vkev");
    let o = owner(&name);
    let _leftovers = Leftovers::domain(&name);
    e.domain_define(&tiny(&name, &o)).await.unwrap();
    expect_event(&mut events, &name, DomainEventKind::Defined, "added").await;
    e.domain_start(&name, &o).await.unwrap();
    expect_event(&mut events, &name, DomainEventKind::Started, "booted").await;

    // Changes made behind the engine's back, with virsh.
    virsh(&uri, &["suspend", &name]);
    expect_event(&mut events, &name, DomainEventKind::Suspended, "paused").await;
    virsh(&uri, &["resume", &name]);
    expect_event(&mut events, &name, DomainEventKind::Resumed, "unpaused").await;
    virsh(&uri, &["destroy", &name]);
    expect_event(&mut events, &name, DomainEventKind::Stopped, "destroyed").await;
    assert_eq!(
        e.domain_state(&name).await.unwrap(),
        (DomainState::Shutoff, "destroyed")
    );
    cleanup(&e, &name, &o).await;
    e.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs private libvirtd: scripts/libvirt-nodes.sh up, then --run-ignored"]
async fn live_migration_keeps_the_guest_running_pinned_and_autostarted() {
    let a = node("A").await;
    let b = node("B").await;
    let mut b_events = Box::pin(b.events());
    let name = unique("vkmig");
    let o = owner(&name);
    let _leftovers = Leftovers::domain(&name);
    let mut def = tiny(&name, &o);
    def.pinning = vec![VcpuPin {
        vcpu: 0,
        cpuset: "1".parse().unwrap(),
    }];
    a.domain_define(&def).await.unwrap();
    a.domain_start(&name, &o).await.unwrap();
    a.domain_set_autostart(&name, &o, true).await.unwrap();
    let pid_a = qemu_pid(&name).unwrap();
    assert_eq!(vcpu0_affinity(&name).to_string(), "1");

    let mut opts = MigrateOptions::live_to(env("VIRTKUBE_TEST_NODE_B_P2P_URI"));
    opts.migrate_uri = Some(env("VIRTKUBE_TEST_NODE_B_MIGRATION_URI"));
    opts.dest_client_uri = Some(env("VIRTKUBE_TEST_NODE_B_URI"));
    opts.max_downtime_ms = Some(300);
    opts.auto_converge = true;
    let t = Instant::now();
    let out = a.domain_migrate(&name, &o, &opts).await.unwrap();
    eprintln!(
        "real daemon: migrate A->B {:.1} ms (libvirt call {:.1} ms, downtime {:?} ms, {:?} bytes)",
        ms(t.elapsed()),
        ms(out.elapsed),
        out.downtime_ms,
        out.data_total
    );
    assert!(out.autostart && out.autostart_restored);

    // Running on B, arrived by migration (not booted), the source's copy gone.
    assert_eq!(
        b.domain_state(&name).await.unwrap(),
        (DomainState::Running, "migrated")
    );
    assert_eq!(
        a.domain_lookup(&name).await.unwrap(),
        None,
        "undefined on the source"
    );
    let pid_b = qemu_pid(&name).unwrap();
    assert_ne!(pid_a, pid_b);
    assert!(
        !Path::new(&format!("/proc/{pid_a}")).exists(),
        "source QEMU has exited"
    );
    let mut b_kinds = Vec::new();
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(500), b_events.next()).await
    {
        if let EngineEvent::Domain(d) = ev
            && d.name == name
        {
            b_kinds.push((d.kind, d.detail));
        }
    }
    assert!(
        b_kinds.contains(&(DomainEventKind::Started, "migrated")),
        "B saw the migration arrive: {b_kinds:?}"
    );
    assert!(
        !b_kinds.contains(&(DomainEventKind::Started, "booted")),
        "the guest was not restarted: {b_kinds:?}"
    );

    // Pinning kept (libvirt and the real thread), autostart restored, persistent on B.
    let obs = b.domain_observe(&name).await.unwrap().unwrap();
    assert_eq!(obs.affinity(0).unwrap().to_string(), "1");
    assert_eq!(vcpu0_affinity(&name).to_string(), "1");
    assert!(obs.persistent && obs.autostart, "{obs:?}");
    assert_eq!(obs.owner.as_ref(), Some(&o));
    let done = b.domain_completed_job(&name).await.unwrap();
    eprintln!("completed job on B: {done:?}");

    cleanup(&b, &name, &o).await;
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// Puts a file of the TLS directory back when dropped (also when the test fails).
struct Hidden(std::path::PathBuf);

impl Hidden {
    fn file(path: std::path::PathBuf) -> Hidden {
        std::fs::rename(&path, path.with_extension("hidden")).unwrap();
        Hidden(path)
    }
}

impl Drop for Hidden {
    fn drop(&mut self) {
        let _ = std::fs::rename(self.0.with_extension("hidden"), &self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs private libvirtd: scripts/libvirt-nodes.sh up, then --run-ignored"]
async fn live_migration_over_tls_and_refused_without_certificates() {
    let a = node("A").await;
    let b = node("B").await;
    let name = unique("vktls");
    let o = owner(&name);
    let _leftovers = Leftovers::domain(&name);
    a.domain_define(&tiny(&name, &o)).await.unwrap();
    a.domain_start(&name, &o).await.unwrap();
    let pid_a = qemu_pid(&name).unwrap();
    let mut opts = MigrateOptions::live_to(env("VIRTKUBE_TEST_NODE_B_P2P_URI"));
    opts.migrate_uri = Some(env("VIRTKUBE_TEST_NODE_B_MIGRATION_URI"));
    opts.dest_client_uri = Some(env("VIRTKUBE_TEST_NODE_B_URI"));
    opts.tls = true;

    // The flag reaches libvirt: without the destination's server certificate the migration
    // is refused before anything moves, and the guest keeps running on the source.
    let tls_dir = std::path::PathBuf::from(env("VIRTKUBE_TEST_TLS_DIR"));
    {
        let _hidden = Hidden::file(tls_dir.join("server-cert.pem"));
        let refused = a.domain_migrate(&name, &o, &opts).await;
        let error = refused.expect_err("a TLS migration without certificates must fail");
        eprintln!("TLS migration without the server certificate: {error}");
        assert_eq!(
            a.domain_state(&name).await.unwrap().0,
            DomainState::Running,
            "the guest stays on the source"
        );
        assert_eq!(qemu_pid(&name), Some(pid_a), "the same QEMU still runs it");
        assert_eq!(b.domain_lookup(&name).await.unwrap(), None, "nothing on B");
    }

    // With the certificates, QEMU streams the guest over TLS.
    let t = Instant::now();
    let out = a.domain_migrate(&name, &o, &opts).await.unwrap();
    eprintln!(
        "real daemon: TLS migrate A->B {:.1} ms (downtime {:?} ms, {:?} bytes)",
        ms(t.elapsed()),
        out.downtime_ms,
        out.data_total
    );
    assert_eq!(
        b.domain_state(&name).await.unwrap(),
        (DomainState::Running, "migrated")
    );
    assert_eq!(
        a.domain_lookup(&name).await.unwrap(),
        None,
        "undefined on the source"
    );

    cleanup(&b, &name, &o).await;
    a.close().await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs private libvirtd: scripts/libvirt-nodes.sh up, then --run-ignored"]
async fn migration_progress_and_cancel() {
    let a = node("A").await;
    let b = node("B").await;
    let name = unique("vkabort");
    let o = owner(&name);
    let _leftovers = Leftovers::domain(&name);
    // 2 GiB of guest memory makes the copy last about 10 s (measured with the placement
    // tests): with the 128 MiB default it ended in 2-3 s and the abort often lost the race.
    let mut def = tiny(&name, &o);
    def.memory_kib = 2 * 1024 * 1024;
    def.max_memory_kib = def.memory_kib;
    a.domain_define(&def).await.unwrap();
    a.domain_start(&name, &o).await.unwrap();

    let mut opts = MigrateOptions::live_to(env("VIRTKUBE_TEST_NODE_B_P2P_URI"));
    opts.migrate_uri = Some(env("VIRTKUBE_TEST_NODE_B_MIGRATION_URI"));
    opts.dest_client_uri = Some(env("VIRTKUBE_TEST_NODE_B_URI"));
    opts.bandwidth_mib_s = Some(1);
    let mut back = MigrateOptions::live_to(env("VIRTKUBE_TEST_NODE_A_P2P_URI"));
    back.migrate_uri = Some(env("VIRTKUBE_TEST_NODE_A_MIGRATION_URI"));
    back.dest_client_uri = Some(env("VIRTKUBE_TEST_NODE_A_URI"));

    // A guest with no OS has almost only zero pages: the copy takes ~2 s whatever the
    // bandwidth cap, so the abort can lose the race against completion. Try a few times.
    for attempt in 1..=4 {
        let (a2, n2, o2, opts2) = (a.clone(), name.clone(), o.clone(), opts.clone());
        let migration = tokio::spawn(async move { a2.domain_migrate(&n2, &o2, &opts2).await });
        let until = Instant::now() + Duration::from_secs(20);
        let progress = loop {
            assert!(Instant::now() < until, "no migration job reported");
            if let Some(p) = a.domain_job_progress(&name).await.unwrap() {
                break p;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        eprintln!("attempt {attempt}: progress before cancel: {progress:?}");
        assert!(matches!(progress.job_type, 1 | 2), "{progress:?}");
        assert!(progress.elapsed_ms.is_some(), "{progress:?}");
        let abort = a.domain_abort_job(&name, &o).await;
        let res = tokio::time::timeout(Duration::from_secs(60), migration)
            .await
            .expect("migration returns after abort")
            .unwrap();
        match res {
            Err(err) => {
                eprintln!("aborted migration: {err}");
                abort.unwrap();
                assert_eq!(
                    err.libvirt_code(),
                    Some(78),
                    "VIR_ERR_OPERATION_ABORTED: {err}"
                );
                assert_eq!(a.domain_state(&name).await.unwrap().0, DomainState::Running);
                assert_eq!(
                    b.domain_lookup(&name).await.unwrap(),
                    None,
                    "nothing left on B"
                );
                cleanup(&a, &name, &o).await;
                a.close().await.unwrap();
                b.close().await.unwrap();
                return;
            }
            Ok(done) => {
                // Lost the race: the guest is on B (and only there). Bring it back, retry.
                eprintln!("attempt {attempt}: migration completed before the abort ({done:?})");
                assert_eq!(a.domain_lookup(&name).await.unwrap(), None);
                assert_eq!(b.domain_state(&name).await.unwrap().0, DomainState::Running);
                b.domain_migrate(&name, &o, &back).await.unwrap();
            }
        }
    }
    cleanup(&a, &name, &o).await;
    panic!("every abort lost the race against the migration");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs private libvirtd: scripts/libvirt-nodes.sh up, then --run-ignored"]
async fn node_info_from_a_real_daemon() {
    let a = node("A").await;
    let b = node("B").await;
    let na = a.node_info().await.unwrap();
    let nb = b.node_info().await.unwrap();
    eprintln!("node A: {na:?}");
    assert_eq!(na.hypervisor, "QEMU");
    assert!(
        na.libvirt_version.starts_with("9."),
        "{}",
        na.libvirt_version
    );
    assert!(na.cpus >= 1 && na.memory_kib > 0 && na.free_memory_bytes > 0);
    assert_eq!(
        na.capabilities.host_uuid,
        "5a5a5a5a-0000-4000-8000-0000000000a1"
    );
    assert_ne!(
        na.capabilities.host_uuid, nb.capabilities.host_uuid,
        "migration needs distinct host UUIDs"
    );
    assert!(na.capabilities.live_migration);
    assert!(
        na.capabilities
            .migration_transports
            .iter()
            .any(|t| t == "tcp")
    );
    assert!(na.capabilities.domain_types.iter().any(|t| t == "qemu"));
    assert_eq!(
        na.capabilities.host_cpus.as_ref().map(|c| c.len() as u32),
        Some(na.cpus),
        "pinnable CPUs from the NUMA topology"
    );
    assert!(!na.capabilities.cells.is_empty());
    assert!(
        na.capabilities
            .cells
            .iter()
            .all(|c| c.free_bytes > 0 && c.memory_kib > 0)
    );
    assert!(na.max_vcpus.unwrap_or(0) >= 1);
    let map = a.node_cpu_map().await.unwrap();
    assert!(
        map.present >= na.cpus && map.online.len() as u32 == na.cpus,
        "{map:?}"
    );
    assert_eq!(na.cpu_map.as_ref(), Some(&map));
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// Storage not shared between the nodes: libvirt pre-creates the volume in the destination's
/// pool of the same name and copies the disk (NBD) during the live migration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs private libvirtd: scripts/libvirt-nodes.sh up, then --run-ignored"]
async fn live_migration_with_copy_storage() {
    let a = node("A").await;
    let b = node("B").await;
    let pool = unique("vkmp");
    let po = Owner::new("StoragePool", format!("uid-{pool}"), None, &pool);
    let _pool_leftovers = Leftovers(vec![]).pool(&pool);
    let dir_a = tempfile::Builder::new()
        .prefix("vkmpA")
        .tempdir_in("/tmp")
        .unwrap();
    let dir_b = tempfile::Builder::new()
        .prefix("vkmpB")
        .tempdir_in("/tmp")
        .unwrap();
    for (e, dir) in [(&a, &dir_a), (&b, &dir_b)] {
        let path = dir.path().join("p");
        e.pool_define(&PoolDef::dir(&pool, path.to_str().unwrap(), po.clone()))
            .await
            .unwrap();
        e.pool_build(&pool, &po, BuildMode::TargetOnly)
            .await
            .unwrap();
        e.pool_start(&pool, &po).await.unwrap();
    }
    let vol = a
        .volume_create(
            &pool,
            &VolumeDef {
                name: "it.disk".into(),
                capacity_bytes: 16 << 20,
                format: VolumeFormat::Qcow2,
                backing_volume: None,
            },
        )
        .await
        .unwrap();

    let name = unique("vkcopy");
    let o = owner(&name);
    let _leftovers = Leftovers::domain(&name);
    let mut def = tiny(&name, &o);
    def.disks.push(DiskDef {
        name: Some("root".into()),
        target_dev: "vda".into(),
        bus: Some("virtio".into()),
        source: DiskSource::Volume {
            pool: pool.clone(),
            volume: "it.disk".into(),
        },
        read_only: false,
        boot_order: Some(1),
        format: Some("qcow2".into()),
        device: None,
    });
    a.domain_define(&def).await.unwrap();
    a.domain_start(&name, &o).await.unwrap();

    let mut opts = MigrateOptions::live_to(env("VIRTKUBE_TEST_NODE_B_P2P_URI"));
    opts.migrate_uri = Some(env("VIRTKUBE_TEST_NODE_B_MIGRATION_URI"));
    opts.dest_client_uri = Some(env("VIRTKUBE_TEST_NODE_B_URI"));
    opts.copy_storage = true;
    let out = a.domain_migrate(&name, &o, &opts).await.unwrap();
    eprintln!("migrate with copy storage: {:.1} ms", ms(out.elapsed));

    assert_eq!(
        b.domain_state(&name).await.unwrap(),
        (DomainState::Running, "migrated")
    );
    let obs = b.domain_observe(&name).await.unwrap().unwrap();
    assert_eq!(
        obs.disks[0].source,
        DiskSource::Volume {
            pool: pool.clone(),
            volume: "it.disk".into()
        }
    );
    let on_b = b
        .volume_observe(&pool, "it.disk")
        .await
        .unwrap()
        .expect("pre-created on B");
    assert!(
        on_b.path.starts_with(dir_b.path().to_str().unwrap()),
        "{on_b:?}"
    );
    assert_ne!(on_b.key, vol.key);

    cleanup(&b, &name, &o).await;
    a.volume_delete(&pool, "it.disk", &vol.key).await.unwrap();
    b.volume_delete(&pool, "it.disk", &on_b.key).await.unwrap();
    for e in [&a, &b] {
        e.pool_stop(&pool, &po).await.unwrap();
        e.pool_undefine(&pool, &po).await.unwrap();
    }
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// Statistics of a running QEMU guest from the one bulk call: CPU time grows while it runs;
/// memory and vCPUs as defined; the disk was read (SeaBIOS reads its boot sector); the NIC
/// carried iPXE's DHCP exchange (boot order hd, then network) in both directions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs private libvirtd: scripts/libvirt-nodes.sh up, then --run-ignored"]
async fn domain_stats_grow_with_a_running_guest() {
    use virtkube_engine::stats::StatsLimits;
    let e = node("A").await;
    let net = unique("vksn");
    let no = Owner::new("Network", format!("uid-{net}"), None, &net);
    let _net_leftovers = Leftovers(vec![]).network(&net);
    let octet = 100 + (std::process::id() % 100);
    e.network_define(&NetworkDef {
        name: net.clone(),
        mode: NetworkMode::Isolated,
        bridge: Some(format!("vks{}", std::process::id() % 100_000)),
        ip: Some(IpDef {
            address: format!("10.{octet}.9.1"),
            prefix: 24,
            dhcp: vec![DhcpRange {
                start: format!("10.{octet}.9.10"),
                end: format!("10.{octet}.9.50"),
            }],
            hosts: vec![],
        }),
        dns_hosts: vec![],
        owner: no.clone(),
    })
    .await
    .unwrap();
    e.network_start(&net, &no).await.unwrap();

    let dir = tempfile::Builder::new()
        .prefix("vkstats")
        .tempdir_in("/var/tmp")
        .unwrap();
    let image = dir.path().join("disk.qcow2");
    let made = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&image)
        .arg("16M")
        .status()
        .unwrap();
    assert!(made.success());
    let name = unique("vkstat");
    let o = owner(&name);
    let _leftovers = Leftovers::domain(&name);
    let mut def = tiny(&name, &o);
    def.os.boot = vec!["hd".into(), "network".into()];
    def.disks.push(DiskDef {
        name: Some("root".into()),
        target_dev: "vda".into(),
        bus: Some("virtio".into()),
        source: DiskSource::File {
            path: image.to_string_lossy().into_owned(),
        },
        read_only: false,
        boot_order: None,
        format: Some("qcow2".into()),
        device: None,
    });
    def.interfaces.push(InterfaceDef {
        name: Some("lan".into()),
        network: net.clone(),
        model: Some("virtio".into()),
        mac: None,
    });
    e.domain_define(&def).await.unwrap();
    e.domain_start(&name, &o).await.unwrap();

    let ours = |batch: &virtkube_engine::stats::StatsBatch| {
        batch
            .domains
            .iter()
            .find(|d| d.name == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} missing from {batch:?}"))
    };
    let first = ours(&e.domain_stats(StatsLimits::default()).await.unwrap());
    let mut last = first.clone();
    let until = Instant::now() + Duration::from_secs(40);
    // iPXE runs once SeaBIOS gave up on the disk: wait for its DHCP exchange.
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(500)).await;
        last = ours(&e.domain_stats(StatsLimits::default()).await.unwrap());
        let net = &last.stats.nets[0];
        if net.tx_packets.unwrap_or(0) > 0 && net.rx_packets.unwrap_or(0) > 0 {
            break;
        }
    }
    eprintln!("first: {first:?}\nlast: {last:?}");
    let s = &last.stats;
    assert_eq!(last.owner, o);
    assert_eq!(s.state, Some(DomainState::Running));
    assert!(
        s.cpu_time_ns > first.stats.cpu_time_ns && first.stats.cpu_time_ns.is_some(),
        "CPU time grows: {:?} then {:?}",
        first.stats.cpu_time_ns,
        s.cpu_time_ns
    );
    assert_eq!((s.vcpus, s.max_vcpus), (Some(1), Some(2)));
    assert_eq!(s.memory_kib, Some(128 * 1024));
    assert!(s.rss_kib.unwrap_or(0) > 0, "{s:?}");
    assert_eq!(s.blocks.len(), 1);
    assert_eq!(s.blocks[0].name, "vda");
    assert!(s.blocks[0].read_requests.unwrap_or(0) > 0, "{s:?}");
    assert!(s.blocks[0].read_bytes.unwrap_or(0) >= 512, "{s:?}");
    assert_eq!(s.blocks[0].capacity_bytes, Some(16 << 20));
    assert_eq!(s.nets.len(), 1);
    assert!(s.nets[0].name.starts_with("vnet"), "{s:?}");
    assert!(
        s.nets[0].tx_bytes.unwrap_or(0) > 0,
        "the guest sent DHCP: {s:?}"
    );
    assert!(
        s.nets[0].rx_bytes.unwrap_or(0) > 0,
        "dnsmasq answered: {s:?}"
    );

    cleanup(&e, &name, &o).await;
    let gone = e.domain_stats(StatsLimits::default()).await.unwrap();
    assert!(gone.domains.iter().all(|d| d.name != name));
    e.network_stop(&net, &no).await.unwrap();
    e.network_undefine(&net, &no).await.unwrap();
    e.close().await.unwrap();
}

fn file_disk(dir: &Path, name: &str, target: &str, bus: &str) -> DiskDef {
    let image = dir.join(format!("{name}.qcow2"));
    let made = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&image)
        .arg("8M")
        .status()
        .unwrap();
    assert!(made.success());
    DiskDef {
        name: Some(name.into()),
        target_dev: target.into(),
        bus: Some(bus.into()),
        source: DiskSource::File {
            path: image.to_string_lossy().into_owned(),
        },
        read_only: false,
        boot_order: None,
        format: Some("qcow2".into()),
        device: None,
    }
}

/// Disks and a NIC plugged into a running QEMU guest and out of it. Plugging in is
/// immediate (live and in the definition). A USB disk leaves at once; a virtio disk and a
/// virtio NIC need the guest's ACPI acknowledgement, which a guest with no OS never gives:
/// the unplug is refused at the deadline, the devices leave the definition but stay in the
/// running guest, the refusal is noted in the live metadata (seen by `domain_observe`), a
/// second request finds nothing more to do in the definition, and the note and the devices
/// are gone after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs private libvirtd: scripts/libvirt-nodes.sh up, then --run-ignored"]
async fn hotplug_disks_and_nics_and_a_guest_that_refuses_unplug() {
    use virtkube_engine::hotplug::DetachOutcome;
    use virtkube_engine::model::{Device, DeviceKey};
    let e = node("A").await;
    let net = unique("vkhn");
    let no = Owner::new("Network", format!("uid-{net}"), None, &net);
    let _net_leftovers = Leftovers(vec![]).network(&net);
    e.network_define(&NetworkDef {
        name: net.clone(),
        mode: NetworkMode::Isolated,
        bridge: Some(format!("vkh{}", std::process::id() % 100_000)),
        ip: None,
        dns_hosts: vec![],
        owner: no.clone(),
    })
    .await
    .unwrap();
    e.network_start(&net, &no).await.unwrap();
    let dir = tempfile::Builder::new()
        .prefix("vkhot")
        .tempdir_in("/var/tmp")
        .unwrap();
    let name = unique("vkhot");
    let o = owner(&name);
    let _leftovers = Leftovers::domain(&name);
    e.domain_define(&tiny(&name, &o)).await.unwrap();
    e.domain_start(&name, &o).await.unwrap();

    let virtio = file_disk(dir.path(), "data", "vdb", "virtio");
    let usb = file_disk(dir.path(), "stick", "sda", "usb");
    let nic = InterfaceDef {
        name: Some("lan".into()),
        network: net.clone(),
        model: Some("virtio".into()),
        mac: Some("52:54:00:ab:cd:01".into()),
    };
    for device in [
        Device::Disk(virtio.clone()),
        Device::Disk(usb.clone()),
        Device::Interface(nic.clone()),
    ] {
        e.domain_attach_device(&name, &o, &device).await.unwrap();
    }
    let live = e.domain_observe(&name).await.unwrap().unwrap();
    let targets: Vec<&str> = live.disks.iter().map(|d| d.target_dev.as_str()).collect();
    assert_eq!(targets, ["vdb", "sda"], "plugged into the running guest");
    assert_eq!(live.interfaces[0].alias.as_deref(), Some("lan"));
    let config = e.domain_xml(&name, true).await.unwrap();
    assert!(
        config.contains("dev='vdb'")
            && config.contains("dev='sda'")
            && config.contains("52:54:00:ab:cd:01"),
        "and into the definition: {config}"
    );

    let sda = DeviceKey::Disk {
        target: "sda".into(),
    };
    let t = Instant::now();
    assert_eq!(
        e.domain_detach_device(&name, &o, &sda, Duration::from_secs(10))
            .await
            .unwrap(),
        DetachOutcome::Removed,
        "USB leaves without the guest"
    );
    eprintln!("USB disk unplugged in {:.0} ms", ms(t.elapsed()));

    let vdb = DeviceKey::Disk {
        target: "vdb".into(),
    };
    let mac = DeviceKey::Interface {
        mac: "52:54:00:AB:CD:01".into(),
    };
    for key in [&vdb, &mac] {
        let t = Instant::now();
        let outcome = e
            .domain_detach_device(&name, &o, key, Duration::from_secs(6))
            .await
            .unwrap();
        assert!(
            matches!(outcome, DetachOutcome::Refused { waited } if waited >= Duration::from_secs(6)),
            "{key}: {outcome:?}"
        );
        eprintln!("{key}: refused after {:.1} s", t.elapsed().as_secs_f64());
    }
    let live = e.domain_observe(&name).await.unwrap().unwrap();
    assert_eq!(live.disks.len(), 1, "vdb is still in the guest");
    assert_eq!(live.interfaces.len(), 1, "so is the NIC");
    assert_eq!(
        live.pending_unplug,
        ["disk/vdb", "interface/52:54:00:ab:cd:01"],
        "the refusal is noted on the running domain"
    );
    let config = e.domain_xml(&name, true).await.unwrap();
    assert!(
        !config.contains("dev='vdb'") && !config.contains("52:54:00:ab:cd:01"),
        "{config}"
    );
    // Nothing left to do in the definition; the guest still holds it.
    assert!(matches!(
        e.domain_detach_device(&name, &o, &sda, Duration::from_secs(1))
            .await
            .unwrap(),
        DetachOutcome::NotPresent
    ));
    assert!(
        e.domain_detach_device(&name, &owner("someone-else"), &vdb, Duration::from_secs(1))
            .await
            .unwrap_err()
            .is_not_owned()
    );

    // A restart realises the definition: the devices and the note are gone.
    e.domain_destroy(&name, &o).await.unwrap();
    e.domain_start(&name, &o).await.unwrap();
    let after = e.domain_observe(&name).await.unwrap().unwrap();
    assert!(
        after.disks.is_empty() && after.interfaces.is_empty(),
        "{after:?}"
    );
    assert!(after.pending_unplug.is_empty());

    // Plugging a noted device back in forgets its note.
    e.domain_attach_device(&name, &o, &Device::Disk(virtio.clone()))
        .await
        .unwrap();
    assert!(matches!(
        e.domain_detach_device(&name, &o, &vdb, Duration::from_secs(1))
            .await
            .unwrap(),
        DetachOutcome::Refused { .. }
    ));
    e.domain_attach_device(&name, &o, &Device::Disk(virtio.clone()))
        .await
        .unwrap_err();
    cleanup(&e, &name, &o).await;
    e.network_stop(&net, &no).await.unwrap();
    e.network_undefine(&net, &no).await.unwrap();
    e.close().await.unwrap();
}

/// The cgroup directory libvirt made for a running guest on node C (`machine/qemu-<id>-<name>.libvirt-qemu`
/// under the host's cgroup v1 `cpu` hierarchy).
fn cpu_cgroup(name: &str) -> std::path::PathBuf {
    let root = Path::new("/sys/fs/cgroup/cpu/machine");
    std::fs::read_dir(root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|f| f.to_str())
                .is_some_and(|f| f.ends_with(&format!("-{name}.libvirt-qemu")))
        })
        .unwrap_or_else(|| panic!("no cgroup for {name} under {}", root.display()))
}

fn read_number(path: &Path) -> i64 {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .parse()
        .unwrap()
}

/// CPU weight and bandwidth on node C, whose libvirtd has the cgroup v1 `cpu` controller:
/// the definition's `<cputune>` reaches the guest's cgroups at start, a live change reaches
/// them at once and the definition too, and the live XML reports it. On node A, whose
/// libvirtd runs without cgroup controllers, libvirt refuses to start such a guest, and says
/// why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs private libvirtd: scripts/libvirt-nodes.sh up, then --run-ignored"]
async fn cpu_tune_reaches_the_guests_cgroups_and_changes_live() {
    use virtkube_engine::model::CpuTune;
    let e = node("C").await;
    let name = unique("vkcpu");
    let o = owner(&name);
    let _leftovers = Leftovers::domain(&name);
    let mut def = tiny(&name, &o);
    def.vcpus = 2;
    def.cpu_tune = CpuTune {
        shares: Some(512),
        period: Some(100_000),
        quota: Some(50_000),
        global_period: Some(100_000),
        global_quota: Some(150_000),
        emulator_period: Some(100_000),
        emulator_quota: Some(20_000),
    };
    e.domain_define(&def).await.unwrap();
    e.domain_start(&name, &o).await.unwrap();
    let cg = cpu_cgroup(&name);
    assert_eq!(read_number(&cg.join("cpu.shares")), 512);
    assert_eq!(
        read_number(&cg.join("cpu.cfs_quota_us")),
        150_000,
        "the whole guest"
    );
    assert_eq!(read_number(&cg.join("vcpu0/cpu.cfs_quota_us")), 50_000);
    assert_eq!(read_number(&cg.join("vcpu1/cpu.cfs_quota_us")), 50_000);
    assert_eq!(read_number(&cg.join("emulator/cpu.cfs_quota_us")), 20_000);
    let seen = e.domain_observe(&name).await.unwrap().unwrap();
    assert_eq!(seen.cpu_tune, def.cpu_tune);

    let change = CpuTune {
        shares: Some(300),
        global_quota: Some(250_000),
        ..CpuTune::default()
    };
    e.domain_set_cpu_tune(&name, &o, &change, Apply::LiveAndConfig)
        .await
        .unwrap();
    assert_eq!(read_number(&cg.join("cpu.shares")), 300, "live");
    assert_eq!(read_number(&cg.join("cpu.cfs_quota_us")), 250_000);
    assert_eq!(
        read_number(&cg.join("vcpu0/cpu.cfs_quota_us")),
        50_000,
        "untouched"
    );
    let seen = e.domain_observe(&name).await.unwrap().unwrap();
    assert_eq!(
        (seen.cpu_tune.shares, seen.cpu_tune.global_quota),
        (Some(300), Some(250_000))
    );
    let config = e.domain_xml(&name, true).await.unwrap();
    assert!(
        config.contains("<shares>300</shares>"),
        "and in the definition: {config}"
    );
    // Out of libvirt's range: refused with its reason, nothing changed.
    let err = e
        .domain_set_cpu_tune(
            &name,
            &o,
            &CpuTune {
                period: Some(10),
                ..CpuTune::default()
            },
            Apply::LiveAndConfig,
        )
        .await
        .unwrap_err();
    eprintln!("period 10: {err}");
    assert_eq!(read_number(&cg.join("vcpu0/cpu.cfs_period_us")), 100_000);
    cleanup(&e, &name, &o).await;
    e.close().await.unwrap();

    // Node A runs libvirtd with `cgroup_controllers = [ ]`: a bandwidth limit stops the guest
    // from starting; shares alone are silently not applied at start (the live XML still
    // shows them), so the engine reports what the scheduler has in force (nothing), and a
    // live change is refused with libvirt's reason.
    let a = node("A").await;
    let name = unique("vknocg");
    let o = owner(&name);
    let _leftovers = Leftovers::domain(&name);
    let mut def = tiny(&name, &o);
    def.cpu_tune.quota = Some(50_000);
    a.domain_define(&def).await.unwrap();
    let refused = a.domain_start(&name, &o).await.unwrap_err();
    assert!(
        refused.to_string().contains("cgroup cpu is required"),
        "{refused}"
    );
    def.cpu_tune = CpuTune {
        shares: Some(512),
        ..CpuTune::default()
    };
    a.domain_define(&def).await.unwrap();
    a.domain_start(&name, &o).await.unwrap();
    assert!(
        a.domain_xml(&name, false)
            .await
            .unwrap()
            .contains("<shares>512</shares>")
    );
    let seen = a.domain_observe(&name).await.unwrap().unwrap();
    assert_eq!(seen.cpu_tune, CpuTune::default(), "not in force");
    let refused = a
        .domain_set_cpu_tune(&name, &o, &def.cpu_tune, Apply::LiveAndConfig)
        .await
        .unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("cgroup CPU controller is not mounted"),
        "{refused}"
    );
    cleanup(&a, &name, &o).await;
    a.close().await.unwrap();
}

/// Host facts from a real daemon in its network namespace: the namespace's interfaces (its
/// loopback and veth), the VM's PCI devices with vendor and product ids and the driver bound
/// to them, the security driver the test daemons run with (`none`), and each domain's
/// security label in its XML.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs private libvirtd: scripts/libvirt-nodes.sh up, then --run-ignored"]
async fn host_facts_from_a_real_daemon() {
    use virtkube_engine::node::{Facts, FactsLimits};
    let e = node("A").await;
    let f = e.node_facts(FactsLimits::default()).await.unwrap();
    eprintln!("{f:#?}");
    let names: Vec<&str> = f
        .interfaces
        .items()
        .iter()
        .map(|i| i.name.as_str())
        .collect();
    assert!(names.contains(&"lo"), "{names:?}");
    assert!(
        names.iter().any(|n| n.ends_with("vethA")),
        "the node's veth, from its own network namespace: {names:?}"
    );
    let pci = f.pci_devices.items();
    assert!(!pci.is_empty(), "{f:?}");
    assert!(
        pci.iter()
            .all(|d| d.vendor_id.starts_with("0x") && d.address.len() == 12),
        "{pci:?}"
    );
    assert!(pci.iter().any(|d| d.driver.is_some()), "{pci:?}");
    assert!(matches!(f.mediated_devices, Facts::Read { .. }));
    assert_eq!(
        f.security_model.as_ref().map(|m| m.model.as_str()),
        Ok("none")
    );
    match &f.logical_sources {
        // Without LVM's tools on the host, libvirt says which one it could not run.
        Facts::Unavailable(why) => assert!(why.contains("pvs"), "{why}"),
        Facts::Read { .. } => {}
    }
    let name = unique("vksec");
    let o = owner(&name);
    let _leftovers = Leftovers::domain(&name);
    e.domain_define(&tiny(&name, &o)).await.unwrap();
    e.domain_start(&name, &o).await.unwrap();
    let seen = e.domain_observe(&name).await.unwrap().unwrap();
    // The DAC driver is always stacked: the guest runs as root:root (qemu.conf).
    assert!(
        seen.security_labels
            .iter()
            .any(|l| l.model == "dac" && l.label.as_deref() == Some("+0:+0")),
        "{:?}",
        seen.security_labels
    );
    cleanup(&e, &name, &o).await;
    e.close().await.unwrap();
}
