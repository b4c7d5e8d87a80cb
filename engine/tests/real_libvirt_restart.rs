//! The engine across a libvirtd restart (run after `real_libvirt`; cargo runs test binaries
//! one at a time, so restarting node A here never disturbs the other suite):
//!
//! ```sh
//! scripts/libvirt-nodes.sh up
//! set -a; . /tmp/virtkube-libvirt-nodes/env; set +a
//! cargo test -p virtkube-engine --test real_libvirt_restart -- --ignored
//! ```

use std::process::Command;
use std::time::{Duration, Instant};

use futures::StreamExt;
use virtkube_engine::model::{DomainDef, DomainState, NetworkDef, NetworkMode, PoolDef};
use virtkube_engine::{DomainEventKind, Engine, EngineConfig, EngineEvent, Owner};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: run `scripts/libvirt-nodes.sh up` then \
             `set -a; . /tmp/virtkube-libvirt-nodes/env; set +a` before these tests"
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs private libvirtd: scripts/libvirt-nodes.sh up, then --run-ignored"]
async fn survives_a_libvirtd_restart() {
    let uri = env("VIRTKUBE_TEST_NODE_A_URI");
    let dir = env("VIRTKUBE_TEST_NODES_DIR");
    let e = Engine::connect(&uri, EngineConfig::default())
        .await
        .unwrap();
    let mut events = Box::pin(e.events());
    let tag = std::process::id() % 100_000;

    let name = format!("vkrst{tag}");
    let o = Owner::new("Domain", format!("uid-{name}"), Some("it"), &name);
    let mut d = DomainDef::new(&name, o.clone());
    d.virt_type = "qemu".into();
    d.os.machine = Some("pc".into());
    e.domain_define(&d).await.unwrap();
    e.domain_start(&name, &o).await.unwrap();

    let net = format!("vkrn{tag}");
    let no = Owner::new("Network", format!("uid-{net}"), None, &net);
    e.network_define(&NetworkDef {
        name: net.clone(),
        mode: NetworkMode::Isolated,
        bridge: None,
        ip: None,
        dns_hosts: vec![],
        owner: no.clone(),
    })
    .await
    .unwrap();
    let pool = format!("vkrp{tag}");
    let po = Owner::new("StoragePool", format!("uid-{pool}"), None, &pool);
    e.pool_define(&PoolDef::dir(&pool, format!("/tmp/{pool}"), po.clone()))
        .await
        .unwrap();

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/libvirt-nodes.sh");
    let st = Command::new(script)
        .args(["restart-daemon", "A", &dir])
        .status()
        .unwrap();
    assert!(st.success(), "restart-daemon failed");

    // The watchdog notices the closed connection and reconnects; the stream says so.
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.next()).await {
            Ok(Some(EngineEvent::Reconnected)) => break,
            Ok(Some(_)) => continue,
            _ => panic!("no Reconnected event after the restart"),
        }
    }
    assert!(e.stats().reconnects >= 1);

    // The guest kept running; marks survived the daemon's reload of its configs.
    assert_eq!(e.domain_state(&name).await.unwrap().0, DomainState::Running);
    assert_eq!(e.domain_owner(&name).await.unwrap(), Some(o.clone()));
    assert_eq!(
        e.network_observe(&net).await.unwrap().unwrap().owner,
        Some(no.clone())
    );
    assert_eq!(
        e.pool_observe(&pool).await.unwrap().unwrap().owner,
        Some(po.clone())
    );

    // Events still flow on the same stream after the reconnect.
    let out = Command::new("virsh")
        .args(["-c", &uri, "destroy", &name])
        .output()
        .unwrap();
    assert!(out.status.success());
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.next()).await {
            Ok(Some(EngineEvent::Domain(ev)))
                if ev.name == name && ev.kind == DomainEventKind::Stopped =>
            {
                assert_eq!(ev.detail, "destroyed");
                break;
            }
            Ok(Some(_)) => continue,
            _ => panic!("no Stopped event after the reconnect"),
        }
    }

    e.domain_undefine(&name, &o).await.unwrap();
    e.network_undefine(&net, &no).await.unwrap();
    e.pool_undefine(&pool, &po).await.unwrap();
    e.close().await.unwrap();
}
