//! Every error [`virtkube_engine::explain`] explains, triggered for real: on libvirt's test
//! driver and unreachable URIs (always run), and on the private libvirtd daemons
//! (`scripts/libvirt-nodes.sh up`, then source its env; `--ignored`) for what only QEMU
//! refuses. Each test checks that libvirt's own text is still there and that virtkube's
//! explanation and next step follow it.

use std::sync::atomic::{AtomicU32, Ordering};

use virtkube_engine::domain::Apply;
use virtkube_engine::explain::explain;
use virtkube_engine::migrate::MigrateOptions;
use virtkube_engine::model::{DomainDef, InterfaceDef, PoolDef, PoolType, VolumeDef, VolumeFormat};
use virtkube_engine::{CpuSet, Engine, EngineConfig, EngineError, Owner};

fn owner(name: &str) -> Owner {
    Owner::new("Domain", format!("uid-{name}"), Some("x"), name)
}

fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}x{}",
        std::process::id() % 100_000,
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// The error's message carries libvirt's words (`libvirt`), then virtkube's explanation
/// `id` with its next step.
fn assert_explained(error: &EngineError, id: &str, libvirt: &str) {
    let text = error.to_string();
    assert!(text.contains(libvirt), "libvirt's text missing: {text}");
    let found = explain(error).unwrap_or_else(|| panic!("no explanation for: {text}"));
    assert_eq!(found.id, id, "{text}");
    let beside = text.find(" — virtkube: ").expect("the explanation follows");
    assert!(beside > text.find(libvirt).unwrap(), "{text}");
    assert!(text.contains(" Next: "), "{text}");
}

async fn test_driver() -> Engine {
    Engine::connect("test:///default", EngineConfig::default())
        .await
        .unwrap()
}

#[tokio::test]
async fn a_socket_without_a_daemon_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    let uri = format!(
        "qemu:///system?socket={}/libvirt-sock",
        dir.path().display()
    );
    let error = Engine::connect(&uri, EngineConfig::default())
        .await
        .expect_err("nothing listens there");
    assert_explained(&error, "LibvirtNotRunning", "No such file or directory");
    assert!(error.to_string().contains("systemctl start libvirtd"));
}

#[tokio::test]
async fn an_unreachable_remote_uri_is_explained() {
    // A loopback port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let uri = format!("qemu+tcp://127.0.0.1:{port}/system");
    let error = Engine::connect(&uri, EngineConfig::default())
        .await
        .expect_err("nothing listens there");
    assert_explained(&error, "LibvirtUnreachable", "unable to connect to server");
}

#[tokio::test]
async fn a_missing_pool_is_explained() {
    let e = test_driver().await;
    let def = VolumeDef {
        name: unique("x.vol"),
        capacity_bytes: 1 << 20,
        format: VolumeFormat::Raw,
        backing_volume: None,
    };
    let error = e.volume_create("no-such-pool", &def).await.unwrap_err();
    assert_explained(&error, "PoolMissing", "no-such-pool");
    e.close().await.unwrap();
}

#[tokio::test]
async fn a_pinned_cpu_the_host_lacks_is_explained() {
    let e = test_driver().await;
    let name = unique("x.pin");
    let o = owner(&name);
    let mut def = DomainDef::new(&name, o.clone());
    def.virt_type = "test".into();
    e.domain_define(&def).await.unwrap();
    e.domain_start(&name, &o).await.unwrap();
    let error = e
        .domain_pin_vcpu(
            &name,
            &o,
            0,
            &"64".parse::<CpuSet>().unwrap(),
            Apply::Current,
        )
        .await
        .unwrap_err();
    assert_explained(&error, "PinnedCpuMissing", "names CPU 64");
    e.domain_destroy(&name, &o).await.unwrap();
    e.domain_undefine(&name, &o).await.unwrap();
    e.close().await.unwrap();
}

#[tokio::test]
async fn a_name_clash_with_a_foreign_object_is_explained() {
    let e = test_driver().await;
    let name = unique("x.clash");
    let theirs = Owner::new("Domain", "someone-else", Some("x"), "other");
    let mut def = DomainDef::new(&name, theirs.clone());
    def.virt_type = "test".into();
    e.domain_define(&def).await.unwrap();
    let mut mine = def.clone();
    mine.owner = owner(&name);
    let error = e.domain_define(&mine).await.unwrap_err();
    assert_explained(&error, "NameClash", "is not owned by");
    e.domain_undefine(&name, &theirs).await.unwrap();
    e.close().await.unwrap();
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run scripts/libvirt-nodes.sh up and source its env file")
    })
}

async fn node(which: &str) -> Engine {
    Engine::connect(
        &env(&format!("VIRTKUBE_TEST_NODE_{which}_URI")),
        EngineConfig::default(),
    )
    .await
    .unwrap()
}

fn qemu_guest(name: &str, o: &Owner) -> DomainDef {
    let mut d = DomainDef::new(name, o.clone());
    d.virt_type = "qemu".into();
    d.os.machine = Some("pc".into());
    d.emulator = Some("/usr/bin/qemu-system-x86_64".into());
    d
}

#[tokio::test]
#[ignore = "needs the private libvirtd daemons"]
async fn a_migration_to_the_source_itself_is_explained() {
    let a = node("A").await;
    let name = unique("x.same");
    let o = owner(&name);
    a.domain_define(&qemu_guest(&name, &o)).await.unwrap();
    a.domain_start(&name, &o).await.unwrap();
    // Node A's own peer URI: the destination is the source daemon.
    let mut opts = MigrateOptions::live_to(env("VIRTKUBE_TEST_NODE_A_P2P_URI"));
    opts.migrate_uri = Some(env("VIRTKUBE_TEST_NODE_A_MIGRATION_URI"));
    opts.dest_client_uri = Some(env("VIRTKUBE_TEST_NODE_A_URI"));
    let error = a.domain_migrate(&name, &o, &opts).await.unwrap_err();
    assert_explained(
        &error,
        "SameHostMigration",
        "Attempt to migrate guest to the same host",
    );
    assert!(error.to_string().contains("--p2p-uri"), "{error}");
    assert!(!error.is_retryable(), "retrying cannot help: {error}");
    assert!(
        error.to_string().starts_with(&format!(
            "migrating to {}",
            env("VIRTKUBE_TEST_NODE_A_P2P_URI")
        )),
        "{error}"
    );
    a.domain_destroy(&name, &o).await.unwrap();
    a.domain_undefine(&name, &o).await.unwrap();
    a.close().await.unwrap();
}

#[tokio::test]
#[ignore = "needs the private libvirtd daemons"]
async fn a_missing_network_and_a_pinned_cpu_qemu_refuses_are_explained() {
    let a = node("A").await;
    let name = unique("x.refused");
    let o = owner(&name);
    let mut def = qemu_guest(&name, &o);
    def.interfaces.push(InterfaceDef {
        name: None,
        network: "no-such-network".into(),
        model: Some("virtio".into()),
        mac: None,
    });
    a.domain_define(&def).await.unwrap();
    let error = a.domain_start(&name, &o).await.unwrap_err();
    assert_explained(&error, "NetworkMissing", "no-such-network");

    // A CPU the host does not have, in the definition: QEMU refuses at start.
    let mut def = qemu_guest(&name, &o);
    def.pinning.push(virtkube_engine::model::VcpuPin {
        vcpu: 0,
        cpuset: "64".parse().unwrap(),
    });
    a.domain_define(&def).await.unwrap();
    let error = a.domain_start(&name, &o).await.unwrap_err();
    assert_explained(&error, "PinnedCpuMissing", "cannot set CPU affinity");
    a.domain_undefine(&name, &o).await.unwrap();
    a.close().await.unwrap();
}

#[tokio::test]
#[ignore = "needs the private libvirtd daemons"]
async fn pool_types_virtkube_does_not_carry_out_are_explained() {
    let a = node("A").await;
    let pool_owner = Owner::new("StoragePool", "uid-rbd", None, "rbd");
    let name = unique("xrbd");
    let mut rbd = PoolDef::dir(&name, format!("/tmp/{name}"), pool_owner.clone());
    rbd.pool_type = PoolType::Other("rbd".into());
    let error = a.pool_define(&rbd).await.unwrap_err();
    assert_explained(&error, "PoolTypeUnsupported", "pool type rbd");
    assert!(!error.is_retryable(), "retrying cannot help: {error}");
    assert!(
        a.pool_observe(&name).await.unwrap().is_none(),
        "nothing defined"
    );
    a.close().await.unwrap();
}
