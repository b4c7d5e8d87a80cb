//! The engine against libvirt's in-process test driver (`test:///default`): no daemon, instant.
//! The driver's state is shared by every connection of this process, so each test uses its
//! own object names. Limits of the driver: no migration, no hotplug, pinning only with
//! flags 0 ([`Apply::Current`]).

use std::time::Duration;

use futures::StreamExt;
use virtkube_engine::domain::{Apply, ShutdownOutcome};
use virtkube_engine::model::{
    BuildMode, DhcpHost, DhcpRange, DiskDef, DiskSource, DnsHost, DomainDef, DomainState, IpDef,
    NetworkDef, NetworkEdit, NetworkMode, PoolDef, PoolState, VcpuPin, VolumeDef, VolumeFormat,
};
use virtkube_engine::{
    CpuSet, DomainEventKind, Engine, EngineConfig, EngineError, EngineEvent, ObjectKind, Owner,
};

const URI: &str = "test:///default";

async fn engine() -> Engine {
    Engine::connect(URI, EngineConfig::default())
        .await
        .expect("connect test:///default")
}

fn owner(kind: &str, name: &str) -> Owner {
    Owner::new(kind, format!("uid-{name}"), Some("t"), name)
}

fn tiny(name: &str, o: &Owner) -> DomainDef {
    let mut d = DomainDef::new(name, o.clone());
    d.virt_type = "test".into();
    d.vcpus = 1;
    d.max_vcpus = 2;
    d
}

#[tokio::test]
async fn node_info_and_capabilities() {
    let e = engine().await;
    let n = e.node_info().await.unwrap();
    assert_eq!(n.hypervisor, "TEST");
    assert!(n.cpus >= 1);
    assert!(n.memory_kib > 0);
    assert!(!n.libvirt_version.is_empty());
    assert!(n.capabilities.host_cpus.is_some(), "{n:?}");
    // The test driver's host: 8 CPUs present, 0, 2 and 4 online.
    let map = e.node_cpu_map().await.unwrap();
    assert_eq!(map.present, 8);
    assert_eq!(map.online.to_string(), "0,2,4");
    assert_eq!(n.cpu_map, Some(map));
    assert_eq!(e.stats().mutating_calls(), 0);
    e.close().await.unwrap();
}

#[tokio::test]
async fn domain_lifecycle_pinning_and_stats() {
    let e = engine().await;
    let o = owner("Domain", "life");
    let mut def = tiny("t.life", &o);
    def.pinning = vec![VcpuPin {
        vcpu: 0,
        cpuset: "1".parse().unwrap(),
    }];
    def.emulator_cpuset = Some("0-1".parse().unwrap());
    def.disks.push(DiskDef {
        name: Some("root".into()),
        target_dev: "vda".into(),
        bus: Some("virtio".into()),
        source: DiskSource::File {
            path: "/var/lib/x/t.life.qcow2".into(),
        },
        read_only: false,
        boot_order: None,
        format: Some("qcow2".into()),
        device: None,
    });
    let id = e.domain_define(&def).await.unwrap();
    assert_eq!(id.name, "t.life");
    assert_eq!(
        e.domain_lookup_uuid(&id.uuid).await.unwrap(),
        Some(id.clone())
    );

    let obs = e.domain_observe("t.life").await.unwrap().unwrap();
    assert_eq!(obs.owner.as_ref(), Some(&o));
    assert_eq!(obs.state, DomainState::Shutoff);
    assert!(obs.persistent);
    assert_eq!(obs.vcpus, 1);
    assert_eq!(obs.max_vcpus, 2);
    assert_eq!(obs.pinning, def.pinning);
    assert_eq!(obs.affinity(0).unwrap().to_string(), "1");
    assert_eq!(obs.disks[0].target_dev, "vda");
    // Stopped: the XML read is the definition itself.
    assert_eq!(obs.config, None);

    e.domain_start("t.life", &o).await.unwrap();
    assert_eq!(
        e.domain_state("t.life").await.unwrap(),
        (DomainState::Running, "booted")
    );

    let set: CpuSet = "0-1".parse().unwrap();
    e.domain_pin_vcpu("t.life", &o, 0, &set, Apply::Current)
        .await
        .unwrap();
    let pins = e
        .domain_vcpu_pin_info("t.life", Apply::Current)
        .await
        .unwrap();
    assert_eq!(pins[0].cpuset, set);
    assert!(matches!(
        e.domain_pin_vcpu("t.life", &o, 0, &"9999".parse().unwrap(), Apply::Current)
            .await,
        Err(EngineError::InvalidSpec(_))
    ));

    e.domain_set_autostart("t.life", &o, true).await.unwrap();
    assert!(e.domain_autostart("t.life").await.unwrap());

    e.domain_suspend("t.life", &o).await.unwrap();
    assert_eq!(
        e.domain_state("t.life").await.unwrap(),
        (DomainState::Paused, "user")
    );
    e.domain_resume("t.life", &o).await.unwrap();
    assert_eq!(
        e.domain_state("t.life").await.unwrap().0,
        DomainState::Running
    );

    let info = e.domain_info("t.life").await.unwrap();
    assert_eq!(info.memory_kib, 131072);
    // Running, but the test driver has no balloon: the live memory is the target, so the
    // persistent definition is not read again (real QEMU: real_libvirt's hotplug test).
    e.domain_set_memory("t.life", &o, 65536, Apply::Current)
        .await
        .unwrap();
    let obs = e.domain_observe("t.life").await.unwrap().unwrap();
    assert_eq!((obs.memory_kib, obs.config), (65536, None));

    // A converged read-only pass makes no mutating call.
    e.reset_stats();
    let _ = e.domain_observe("t.life").await.unwrap();
    let _ = e.domain_list().await.unwrap();
    let all = e.domain_observe_all().await.unwrap();
    let me = all.iter().find(|d| d.name == "t.life").expect("listed");
    assert_eq!(me.affinity(0), Some(&set));
    assert_eq!(me.owner.as_ref(), Some(&o));
    let stats = e.stats();
    assert_eq!(stats.get("domain_observe_all").unwrap().count, 1);
    assert_eq!(stats.mutating_calls(), 0);
    assert_eq!(stats.get("domain_observe").unwrap().count, 1);

    e.domain_destroy("t.life", &o).await.unwrap();
    assert_eq!(
        e.domain_state("t.life").await.unwrap(),
        (DomainState::Shutoff, "destroyed")
    );
    assert_eq!(e.stats().mutating_calls(), 1);
    assert!(e.stats().get("domain_destroy").unwrap().mutating);

    e.domain_undefine("t.life", &o).await.unwrap();
    assert_eq!(e.domain_lookup("t.life").await.unwrap(), None);
    assert!(e.domain_observe("t.life").await.unwrap().is_none());
    e.close().await.unwrap();
}

#[tokio::test]
async fn shutdown_with_deadline_and_managed_save() {
    let e = engine().await;
    let o = owner("Domain", "shut");
    e.domain_define(&tiny("t.shut", &o)).await.unwrap();
    let d = Duration::from_secs(2);
    assert_eq!(
        e.domain_shutdown("t.shut", &o, d).await.unwrap(),
        ShutdownOutcome::AlreadyOff
    );
    e.domain_start("t.shut", &o).await.unwrap();
    // The test driver shuts down at once.
    assert_eq!(
        e.domain_shutdown("t.shut", &o, d).await.unwrap(),
        ShutdownOutcome::Graceful
    );
    // A paused guest is resumed first, so the request reaches it.
    e.domain_start("t.shut", &o).await.unwrap();
    e.domain_suspend("t.shut", &o).await.unwrap();
    assert_eq!(
        e.domain_shutdown("t.shut", &o, d).await.unwrap(),
        ShutdownOutcome::Graceful
    );
    assert_eq!(
        e.domain_state("t.shut").await.unwrap().0,
        DomainState::Shutoff
    );
    e.domain_start("t.shut", &o).await.unwrap();
    e.domain_managed_save("t.shut", &o).await.unwrap();
    let obs = e.domain_observe("t.shut").await.unwrap().unwrap();
    assert_eq!(obs.state, DomainState::Shutoff);
    assert!(obs.has_managed_save);
    // Undefine removes the managed-save image too.
    e.domain_undefine("t.shut", &o).await.unwrap();
    e.close().await.unwrap();
}

#[tokio::test]
async fn ownership_is_enforced() {
    let e = engine().await;
    let mine = owner("Domain", "own");
    let other = owner("Domain", "someone-else");
    e.domain_define(&tiny("t.own", &mine)).await.unwrap();

    // Redefining by the same owner is an update; by another owner it is refused.
    e.domain_define(&tiny("t.own", &mine)).await.unwrap();
    match e.domain_define(&tiny("t.own", &other)).await {
        Err(EngineError::NotOwned {
            kind,
            name,
            expected,
            found,
        }) => {
            assert_eq!(kind, ObjectKind::Domain);
            assert_eq!(name, "t.own");
            assert_eq!(*expected, other);
            assert_eq!(found.as_deref(), Some(&mine));
        }
        r => panic!("expected NotOwned, got {r:?}"),
    }
    let err = e.domain_start("t.own", &other).await.unwrap_err();
    assert!(err.is_not_owned() && !err.is_retryable(), "{err}");
    assert!(
        e.domain_undefine("t.own", &other)
            .await
            .unwrap_err()
            .is_not_owned()
    );

    // The driver's own domain `test` carries no mark at all.
    match e.domain_destroy("test", &mine).await {
        Err(EngineError::NotOwned { found: None, .. }) => {}
        r => panic!("expected NotOwned without mark, got {r:?}"),
    }
    assert_eq!(e.domain_owner("test").await.unwrap(), None);

    // Missing objects are NotFound, permanent.
    let err = e.domain_start("t.missing", &mine).await.unwrap_err();
    assert!(err.is_not_found() && !err.is_retryable(), "{err}");
    assert!(matches!(
        err,
        EngineError::NotFound {
            kind: ObjectKind::Domain,
            ..
        }
    ));

    // Invalid specs never reach libvirt.
    let mut bad = tiny("t.bad", &mine);
    bad.vcpus = 5;
    assert!(matches!(
        e.domain_define(&bad).await,
        Err(EngineError::InvalidSpec(_))
    ));

    e.domain_undefine("t.own", &mine).await.unwrap();
    e.close().await.unwrap();
}

#[tokio::test]
async fn escaping_user_strings() {
    let e = engine().await;
    let o = Owner::new("Domain", "u\"<&>'", Some("t"), "we<ird>&\"name'");
    let mut d = tiny("t.esc<&>'\"", &o);
    d.os.cmdline = Some("a=\"<b>\" & c='d'".into());
    e.domain_define(&d).await.unwrap();
    let obs = e.domain_observe("t.esc<&>'\"").await.unwrap().unwrap();
    assert_eq!(obs.owner, Some(o.clone()));
    assert_eq!(obs.os.cmdline, d.os.cmdline);
    e.domain_undefine("t.esc<&>'\"", &o).await.unwrap();
    e.close().await.unwrap();
}

#[tokio::test]
async fn events_for_lifecycle_changes() {
    let e = engine().await;
    let mut events = Box::pin(e.events());
    let o = owner("Domain", "ev");
    e.domain_define(&tiny("t.ev", &o)).await.unwrap();
    e.domain_start("t.ev", &o).await.unwrap();
    e.domain_suspend("t.ev", &o).await.unwrap();
    e.domain_destroy("t.ev", &o).await.unwrap();
    e.domain_undefine("t.ev", &o).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 5 {
        let ev = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .expect("events arrive")
            .expect("stream open");
        if let EngineEvent::Domain(d) = ev
            && d.name == "t.ev"
        {
            seen.push((d.kind, d.detail));
        }
    }
    assert_eq!(
        seen,
        vec![
            (DomainEventKind::Defined, "added"),
            (DomainEventKind::Started, "booted"),
            (DomainEventKind::Suspended, "paused"),
            (DomainEventKind::Stopped, "destroyed"),
            (DomainEventKind::Undefined, "removed"),
        ]
    );
    e.close().await.unwrap();
}

#[tokio::test]
async fn networks() {
    let e = engine().await;
    let o = Owner::new("Network", "uid-net", None, "t-iso");
    let def = NetworkDef {
        name: "t-iso".into(),
        mode: NetworkMode::Isolated,
        bridge: Some("vktiso0".into()),
        ip: Some(IpDef {
            address: "10.97.0.1".into(),
            prefix: 24,
            dhcp: vec![],
            hosts: vec![],
        }),
        dns_hosts: vec![],
        owner: o.clone(),
    };
    e.network_define(&def).await.unwrap();
    let obs = e.network_observe("t-iso").await.unwrap().unwrap();
    assert_eq!(obs.owner.as_ref(), Some(&o), "network <metadata> is kept");
    assert!(!obs.active);
    e.network_start("t-iso", &o).await.unwrap();
    e.network_set_autostart("t-iso", &o, true).await.unwrap();
    let obs = e.network_observe("t-iso").await.unwrap().unwrap();
    assert!(obs.active && obs.autostart);
    assert_eq!(obs.bridge.as_deref(), Some("vktiso0"));
    assert_eq!(obs.mode, NetworkMode::Isolated);
    assert_eq!(e.network_owner("t-iso").await.unwrap(), Some(o.clone()));
    assert_eq!(e.network_owner("default").await.unwrap(), None);
    // The driver's own `default` network is not ours.
    assert!(
        e.network_stop("default", &o)
            .await
            .unwrap_err()
            .is_not_owned()
    );
    e.network_stop("t-iso", &o).await.unwrap();
    e.network_undefine("t-iso", &o).await.unwrap();
    assert!(e.network_observe("t-iso").await.unwrap().is_none());
    e.close().await.unwrap();
}

/// `virNetworkUpdate` on the test driver: DHCP leases and DNS entries added, modified and
/// removed on a running network (live and persistent), then on a stopped one (persistent
/// only); the network stays active throughout and only its owner may change it.
#[tokio::test]
async fn network_dhcp_and_dns_hosts_are_updated_in_place() {
    let e = engine().await;
    let o = Owner::new("Network", "uid-upd", None, "t-upd");
    let lease = |mac: &str, ip: &str, name: Option<&str>| DhcpHost {
        mac: mac.into(),
        ip: ip.into(),
        name: name.map(str::to_string),
    };
    let dns = |ip: &str, names: &[&str]| DnsHost {
        ip: ip.into(),
        hostnames: names.iter().map(|n| n.to_string()).collect(),
    };
    let def = NetworkDef {
        name: "t-upd".into(),
        mode: NetworkMode::Nat,
        bridge: Some("vktupd0".into()),
        ip: Some(IpDef {
            address: "10.96.0.1".into(),
            prefix: 24,
            dhcp: vec![DhcpRange {
                start: "10.96.0.100".into(),
                end: "10.96.0.199".into(),
            }],
            hosts: vec![lease("52:54:00:00:00:01", "10.96.0.5", None)],
        }),
        dns_hosts: vec![],
        owner: o.clone(),
    };
    e.network_define(&def).await.unwrap();
    e.network_start("t-upd", &o).await.unwrap();
    let uuid = e.network_observe("t-upd").await.unwrap().unwrap().uuid;
    for edit in [
        NetworkEdit::AddDhcpHost(lease("52:54:00:00:00:02", "10.96.0.6", Some("db"))),
        NetworkEdit::ModifyDhcpHost(lease("52:54:00:00:00:01", "10.96.0.7", Some("web"))),
        NetworkEdit::AddDnsHost(dns("10.96.0.8", &["files", "files.lab.example"])),
    ] {
        e.network_update("t-upd", &o, &edit).await.unwrap();
    }
    let obs = e.network_observe("t-upd").await.unwrap().unwrap();
    assert!(obs.active, "updated in place, never stopped");
    assert_eq!(obs.uuid, uuid);
    assert_eq!(
        obs.ip.as_ref().unwrap().hosts,
        [
            lease("52:54:00:00:00:01", "10.96.0.7", Some("web")),
            lease("52:54:00:00:00:02", "10.96.0.6", Some("db")),
        ]
    );
    assert_eq!(
        obs.dns_hosts,
        [dns("10.96.0.8", &["files", "files.lab.example"])]
    );
    // Not ours: refused before any call.
    let stranger = Owner::new("Network", "uid-other", None, "t-upd");
    assert!(
        e.network_update(
            "t-upd",
            &stranger,
            &NetworkEdit::AddDhcpHost(lease("52:54:00:00:00:09", "10.96.0.9", None))
        )
        .await
        .unwrap_err()
        .is_not_owned()
    );
    // Stopped: the persistent definition kept the live edits, and an edit changes it alone.
    // (libvirt 9.0's test driver drops a DHCP host DELETE on an inactive network without an
    // error; the real daemon applies it: real_libvirt.rs covers that.)
    e.network_stop("t-upd", &o).await.unwrap();
    let obs = e.network_observe("t-upd").await.unwrap().unwrap();
    assert!(!obs.active);
    assert_eq!(obs.ip.as_ref().unwrap().hosts.len(), 2);
    e.network_update(
        "t-upd",
        &o,
        &NetworkEdit::DeleteDnsHost(dns("10.96.0.8", &["files", "files.lab.example"])),
    )
    .await
    .unwrap();
    let obs = e.network_observe("t-upd").await.unwrap().unwrap();
    assert!(!obs.active);
    assert!(obs.dns_hosts.is_empty());
    e.network_undefine("t-upd", &o).await.unwrap();
    e.close().await.unwrap();
}

#[tokio::test]
async fn pools_and_volumes() {
    let e = engine().await;
    let o = Owner::new("StoragePool", "uid-pool", None, "t-pool");
    let dir = tempfile::tempdir().unwrap();
    let def = PoolDef::dir("t-pool", dir.path().join("p").to_str().unwrap(), o.clone());
    e.pool_define(&def).await.unwrap();
    assert_eq!(
        e.pool_observe("t-pool")
            .await
            .unwrap()
            .unwrap()
            .owner
            .as_ref(),
        Some(&o)
    );
    e.pool_build("t-pool", &o, BuildMode::TargetOnly)
        .await
        .unwrap();
    e.pool_start("t-pool", &o).await.unwrap();
    e.pool_set_autostart("t-pool", &o, true).await.unwrap();
    let p = e.pool_observe("t-pool").await.unwrap().unwrap();
    assert_eq!(p.state, PoolState::Running);
    assert!(p.autostart && p.capacity > 0);
    assert!(
        e.pool_stop("default-pool", &o)
            .await
            .unwrap_err()
            .is_not_owned()
    );

    let base = e
        .volume_create(
            "t-pool",
            &VolumeDef {
                name: "t.base".into(),
                capacity_bytes: 64 << 20,
                format: VolumeFormat::Qcow2,
                backing_volume: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(base.capacity, 64 << 20);
    assert!(!base.key.is_empty());
    let clone = e
        .volume_clone(
            "t-pool",
            &VolumeDef {
                name: "t.clone".into(),
                capacity_bytes: 96 << 20,
                format: VolumeFormat::Qcow2,
                backing_volume: None,
            },
            "t.base",
        )
        .await
        .unwrap();
    // libvirt copies the source's size; the engine grows the copy to the asked capacity.
    assert_eq!(clone.capacity, 96 << 20);
    // A clone smaller than its source is refused before anything is copied.
    let small = VolumeDef {
        name: "t.small".into(),
        capacity_bytes: 32 << 20,
        format: VolumeFormat::Qcow2,
        backing_volume: None,
    };
    assert!(matches!(
        e.volume_clone("t-pool", &small, "t.base").await,
        Err(EngineError::ShrinkRefused {
            current,
            requested,
            ..
        }) if current == 64 << 20 && requested == 32 << 20
    ));
    assert!(matches!(
        e.volume_resize("t-pool", "t.clone", &clone.key, 32 << 20)
            .await,
        Err(EngineError::ShrinkRefused { .. })
    ));
    assert_eq!(
        e.volume_lookup_key(&clone.key).await.unwrap().unwrap().name,
        "t.clone"
    );
    assert_eq!(
        e.volume_lookup_path(&clone.path)
            .await
            .unwrap()
            .unwrap()
            .name,
        "t.clone"
    );
    let mut names = e.volume_list("t-pool").await.unwrap();
    names.sort();
    assert_eq!(names, vec!["t.base", "t.clone"]);

    assert!(matches!(
        e.volume_delete("t-pool", "t.clone", "/some/other/key")
            .await,
        Err(EngineError::VolumeKeyMismatch { .. })
    ));
    e.volume_delete("t-pool", "t.clone", &clone.key)
        .await
        .unwrap();
    e.volume_delete("t-pool", "t.base", &base.key)
        .await
        .unwrap();
    assert!(
        e.volume_observe("t-pool", "t.base")
            .await
            .unwrap()
            .is_none()
    );

    e.pool_stop("t-pool", &o).await.unwrap();
    e.pool_undefine("t-pool", &o).await.unwrap();
    assert!(e.pool_observe("t-pool").await.unwrap().is_none());
    e.close().await.unwrap();
}

#[tokio::test]
async fn closed_engine_refuses_calls() {
    let e = engine().await;
    let e2 = e.clone();
    assert!(e.ping().await.unwrap());
    e.close().await.unwrap();
    assert!(matches!(
        e2.domain_list().await,
        Err(EngineError::Closed { .. })
    ));
    // Closing twice is fine.
    e.close().await.unwrap();
}

#[tokio::test]
async fn bad_uri_fails_fast() {
    let err = Engine::connect("nonexistent:///nowhere", EngineConfig::default())
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::ConnectionLost { .. }), "{err}");
}

/// What the test driver returns from the bulk statistics call: the state group only (no
/// CPU, memory, block or network counters). virtkube's domains come back with their owner;
/// the driver's own `test` domain, which carries no mark, is left out; marks are read once
/// per domain and the cap on domains holds.
#[tokio::test]
async fn domain_stats_in_one_bulk_call() {
    use virtkube_engine::stats::StatsLimits;
    let e = engine().await;
    let (oa, ob) = (owner("Domain", "stats-a"), owner("Domain", "stats-b"));
    e.domain_define(&tiny("t.stats-a", &oa)).await.unwrap();
    e.domain_define(&tiny("t.stats-b", &ob)).await.unwrap();
    e.domain_start("t.stats-a", &oa).await.unwrap();
    e.reset_stats();

    let first = e.domain_stats(StatsLimits::default()).await.unwrap();
    let names: Vec<&str> = first
        .domains
        .iter()
        .map(|d| d.owner.name.as_str())
        .collect();
    assert!(
        names.contains(&"stats-a") && names.contains(&"stats-b"),
        "{names:?}"
    );
    assert!(
        first.unowned >= 1,
        "the driver's `test` domain has no mark: {first:?}"
    );
    assert!(first.owner_reads >= 3, "{first:?}");
    let a = first
        .domains
        .iter()
        .find(|d| d.owner.name == "stats-a")
        .unwrap();
    assert_eq!(a.name, "t.stats-a");
    assert_eq!(a.owner.namespace.as_deref(), Some("t"));
    assert_eq!(a.stats.state, Some(DomainState::Running));
    // The test driver has no CPU, balloon, block or interface groups.
    assert_eq!(a.stats.cpu_time_ns, None);
    assert!(a.stats.blocks.is_empty() && a.stats.nets.is_empty());
    let b = first
        .domains
        .iter()
        .find(|d| d.owner.name == "stats-b")
        .unwrap();
    assert_eq!(b.stats.state, Some(DomainState::Shutoff));

    // Again: the same domains, no mark read, one libvirt call per gather.
    let second = e.domain_stats(StatsLimits::default()).await.unwrap();
    assert_eq!(second.owner_reads, 0);
    assert_eq!(second.domains, first.domains);
    let capped = e
        .domain_stats(StatsLimits {
            max_domains: 1,
            max_devices: 64,
        })
        .await
        .unwrap();
    assert_eq!(capped.domains.len(), 1);
    assert_eq!(capped.dropped, first.domains.len() - 1);
    // Sorted by namespace and name: the cap keeps the first.
    assert_eq!(capped.domains[0], first.domains[0]);
    let stats = e.stats();
    assert_eq!(stats.get("domain_stats").unwrap().count, 3);
    assert_eq!(stats.total_calls(), 3, "{stats:?}");

    // A domain that is gone is forgotten; a new one is read once.
    e.domain_destroy("t.stats-a", &oa).await.unwrap();
    e.domain_undefine("t.stats-a", &oa).await.unwrap();
    let after = e.domain_stats(StatsLimits::default()).await.unwrap();
    assert!(after.domains.iter().all(|d| d.owner.name != "stats-a"));
    assert_eq!(after.owner_reads, 0);
    e.domain_undefine("t.stats-b", &ob).await.unwrap();
    e.close().await.unwrap();
}

/// The test driver keeps `<cputune>` in the definition and reports it back (its own
/// scheduler, `fair`, has none of these parameters, so a live change is refused).
#[tokio::test]
async fn cpu_tune_round_trips_through_the_definition() {
    use virtkube_engine::model::CpuTune;
    let e = engine().await;
    let o = owner("Domain", "tune");
    let mut def = tiny("t.tune", &o);
    def.cpu_tune = CpuTune {
        shares: Some(512),
        global_period: Some(100_000),
        global_quota: Some(150_000),
        ..CpuTune::default()
    };
    e.domain_define(&def).await.unwrap();
    e.domain_start("t.tune", &o).await.unwrap();
    let seen = e.domain_observe("t.tune").await.unwrap().unwrap();
    assert_eq!(seen.cpu_tune, def.cpu_tune);
    let refused = e
        .domain_set_cpu_tune("t.tune", &o, &def.cpu_tune, Apply::Current)
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("cpu_shares"), "{refused}");
    e.domain_destroy("t.tune", &o).await.unwrap();
    e.domain_undefine("t.tune", &o).await.unwrap();
    e.close().await.unwrap();
}

/// Host facts from the test driver: its one interface, no PCI device in its default host,
/// and a security model (or the driver's reason); with a test-driver host file describing a
/// PCI device, that device with vendor, product, class and IOMMU group.
#[tokio::test]
async fn host_facts_interfaces_devices_and_security() {
    use virtkube_engine::node::{Facts, FactsLimits};
    let e = engine().await;
    let f = e.node_facts(FactsLimits::default()).await.unwrap();
    let eth1 = f.interfaces.items().iter().find(|i| i.name == "eth1");
    assert!(
        eth1.is_some_and(|i| i.active && i.mac.as_deref() == Some("aa:bb:cc:dd:ee:ff")),
        "{f:?}"
    );
    assert!(
        matches!(f.pci_devices, Facts::Read { total: 0, .. }),
        "{f:?}"
    );
    assert_eq!(
        f.security_model.as_ref().map(|m| m.model.as_str()),
        Ok("testSecurity")
    );
    // The driver's canned answer to virConnectFindStoragePoolSources("logical").
    let vgs: Vec<_> = f
        .logical_sources
        .items()
        .iter()
        .map(|s| (s.name.as_deref(), s.devices.clone()))
        .collect();
    assert_eq!(
        vgs,
        [
            (Some("testvg1"), vec!["/dev/sda20".to_string()]),
            (Some("testvg2"), vec!["/dev/sda21".to_string()])
        ]
    );
    e.close().await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("host.xml");
    std::fs::write(&host, PCI_HOST).unwrap();
    let e = Engine::connect(
        &format!("test://{}", host.display()),
        EngineConfig::default(),
    )
    .await
    .unwrap();
    let f = e
        .node_facts(FactsLimits {
            pci_devices: 1,
            ..FactsLimits::default()
        })
        .await
        .unwrap();
    let Facts::Read { items, total } = &f.pci_devices else {
        panic!("{f:?}")
    };
    assert_eq!(*total, 2, "two PCI devices, one listed by the limit");
    let nic = &items[0];
    assert_eq!(nic.address, "0000:06:00.0");
    assert_eq!(nic.vendor_id, "0x8086");
    assert_eq!(nic.vendor.as_deref(), Some("Intel Corporation"));
    assert_eq!(
        nic.product.as_deref(),
        Some("82576 Gigabit Network Connection")
    );
    assert_eq!(nic.class.as_deref(), Some("0x020000"));
    assert_eq!(nic.iommu_group, Some(14));
    e.close().await.unwrap();
}

/// Host PCI devices on the test driver, with a host file describing two: the node's
/// addresses, a domain defined and started with one (the driver passes nothing through but
/// keeps and reports the device), which domain lists which device, and the driver's refusal
/// to plug a device into a running domain (it has no hotplug: virtkube plans such changes
/// for the next restart there).
#[tokio::test]
async fn host_devices_are_defined_reported_and_accounted_on_the_test_driver() {
    use virtkube_engine::model::{Device, HostdevDef, HostdevObserved, PciAddress};
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("host.xml");
    std::fs::write(&host, PCI_HOST).unwrap();
    let e = Engine::connect(
        &format!("test://{}", host.display()),
        EngineConfig::default(),
    )
    .await
    .unwrap();
    let addresses: Vec<String> = e
        .node_pci_addresses()
        .await
        .unwrap()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(addresses, ["0000:06:00.0", "0000:07:00.0"]);
    assert!(e.node_host_devices_in_use().await.unwrap().is_empty());

    let o = owner("Domain", "pt");
    let gpu = PciAddress::parse("0000:07:00.0").unwrap();
    let mut def = tiny("t.pt", &o);
    def.hostdevs.push(HostdevDef {
        name: Some("gpu".into()),
        address: gpu,
        managed: true,
    });
    e.domain_define(&def).await.unwrap();
    e.domain_start("t.pt", &o).await.unwrap();
    let seen = e.domain_observe("t.pt").await.unwrap().unwrap();
    assert!(seen.state.is_active());
    assert_eq!(
        seen.hostdevs,
        [HostdevObserved {
            alias: Some("gpu".into()),
            address: gpu,
            managed: true
        }]
    );
    let used = e.node_host_devices_in_use().await.unwrap();
    assert_eq!(used.len(), 1);
    assert_eq!(used.get(&gpu).map(String::as_str), Some("t.pt"));

    let nic = HostdevDef {
        name: Some("nic".into()),
        address: PciAddress::parse("0000:06:00.0").unwrap(),
        managed: true,
    };
    let refused = e
        .domain_attach_device("t.pt", &o, &Device::HostDevice(nic))
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("not supported"),
        "the test driver has no hotplug: {refused}"
    );
    e.close().await.unwrap();
}

/// A test-driver host with two PCI devices (the driver reads node devices from its host
/// file; its default host has none).
pub const PCI_HOST: &str = include_str!("fixtures/pci-host.xml");
