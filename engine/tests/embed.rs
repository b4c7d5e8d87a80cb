//! `qemu:///embed?root=DIR`: libvirt's QEMU driver inside the test process, no daemon.
//!
//! In its own test binary on purpose: once a process has opened an embedded QEMU driver,
//! libvirt routes every `qemu:///…` URI of that process to it ("Missing URI parameter
//! 'root'"), so `qemu:///system?socket=…` stops working there (`qemu+unix://` still does).
//!
//! ```sh
//! scripts/libvirt-nodes.sh up      # installs the packages, seeds the QEMU capabilities cache
//! set -a; . /tmp/virtkube-libvirt-nodes/env; set +a
//! cargo test -p virtkube-engine --test embed -- --ignored
//! ```

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use virtkube_engine::model::{DomainDef, DomainState};
use virtkube_engine::{Engine, EngineConfig, Owner};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: run `scripts/libvirt-nodes.sh up` then \
             `set -a; . /tmp/virtkube-libvirt-nodes/env; set +a` before these tests"
        )
    })
}

fn unique(prefix: &str) -> String {
    format!("{prefix}{}", std::process::id() % 100_000)
}

fn owner(name: &str) -> Owner {
    Owner::new("Domain", format!("uid-{name}"), Some("it"), name)
}

fn tiny(name: &str, o: &Owner) -> DomainDef {
    let mut d = DomainDef::new(name, o.clone());
    d.virt_type = "qemu".into();
    d.max_vcpus = 2;
    d.os.machine = Some("pc".into());
    d.emulator = Some("/usr/bin/qemu-system-x86_64".into());
    d
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `qemu:///embed?root=DIR`: libvirt's QEMU driver inside this process, no daemon. Only
/// needs the packages `scripts/libvirt-nodes.sh up` installs; its capabilities cache is
/// copied in when present so the first connect skips the QEMU probe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs private libvirtd: scripts/libvirt-nodes.sh up, then --run-ignored"]
async fn embedded_qemu_driver() {
    let nodes = env("VIRTKUBE_TEST_NODES_DIR");
    let root = tempfile::Builder::new()
        .prefix("vkembed")
        .tempdir_in("/tmp")
        .unwrap();
    let caps = Path::new(&nodes).join("capscache");
    if caps.is_dir() {
        let dest = root.path().join("cache");
        std::fs::create_dir_all(&dest).unwrap();
        let st = Command::new("cp")
            .arg("-a")
            .arg(&caps)
            .arg(dest.join("qemu"))
            .status()
            .unwrap();
        assert!(st.success());
    }
    // No virtlogd, no cgroups, no security driver in these sandboxes: the same settings as
    // the private daemons.
    std::fs::create_dir_all(root.path().join("etc")).unwrap();
    std::fs::write(
        root.path().join("etc/qemu.conf"),
        "user = \"root\"\ngroup = \"root\"\nsecurity_driver = \"none\"\n\
         dynamic_ownership = 0\nremember_owner = 0\nnamespaces = [ ]\n\
         cgroup_controllers = [ ]\nstdio_handler = \"file\"\n",
    )
    .unwrap();
    let uri = format!("qemu:///embed?root={}", root.path().display());
    let t = Instant::now();
    let e = Engine::connect(&uri, EngineConfig::default())
        .await
        .unwrap();
    let name = unique("vkemb");
    let o = owner(&name);
    e.domain_define(&tiny(&name, &o)).await.unwrap();
    e.domain_start(&name, &o).await.unwrap();
    assert_eq!(
        e.domain_state(&name).await.unwrap(),
        (DomainState::Running, "booted")
    );
    assert_eq!(e.domain_owner(&name).await.unwrap(), Some(o.clone()));
    eprintln!("embed: connect+define+start {:.1} ms", ms(t.elapsed()));
    e.domain_destroy(&name, &o).await.unwrap();
    e.domain_undefine(&name, &o).await.unwrap();
    e.close().await.unwrap();
}
