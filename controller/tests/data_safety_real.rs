//! What is never deleted, on a real libvirtd with real qcow2 backing chains (the private
//! daemons of `scripts/libvirt-nodes.sh`), through the agent's Volume controller against the
//! in-memory API server: deleting a Volume whose image a running guest reads through a
//! copy-on-write overlay waits, naming every user, until they are all gone — a Domain
//! resource and its guest, the overlay Volume, a foreign overlay volume and a foreign domain
//! defined on it, a foreign guest running on an overlay file outside any pool — and then
//! completes.
//!
//! Start the daemons first, then run the ignored tests (as root):
//!
//! ```sh
//! scripts/libvirt-nodes.sh up
//! set -a; . /tmp/virtkube-libvirt-nodes/env; set +a
//! cargo nextest run -p virtkube --test data_safety_real --run-ignored all
//! ```
//!
//! Without the environment the script writes, these tests fail: they never pass silently.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use virtkube::agent::context::{Context, Settings};
use virtkube::agent::error::Error;
use virtkube::agent::metrics::Metrics;
use virtkube::agent::{pool, volume};
use virtkube::host::{HostSpec, Hosts};
use virtkube_crds::{StoragePool, Volume};
use virtkube_engine::model::{DiskDef, DiskSource, DomainDef};
use virtkube_engine::{Engine, EngineConfig, Owner};
use virtkube_testapi::{ADMIN, TestApi};

const NODE: &str = "node-a";

fn node_a_uri() -> String {
    std::env::var("VIRTKUBE_TEST_NODE_A_URI").unwrap_or_else(|_| {
        panic!(
            "VIRTKUBE_TEST_NODE_A_URI is not set: run `scripts/libvirt-nodes.sh up` then \
             `set -a; . /tmp/virtkube-libvirt-nodes/env; set +a` before these tests"
        )
    })
}

fn virsh(uri: &str, args: &[&str]) -> String {
    let out = Command::new("virsh")
        .args(["-q", "-c", uri])
        .args(args)
        .output()
        .expect("virsh runs");
    assert!(
        out.status.success(),
        "virsh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Removes what a failed run left on the shared daemon (domains, volumes, the pool).
struct Leftovers {
    uri: String,
    domains: Vec<String>,
    pool: String,
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        let run = |args: &[&str]| {
            let _ = Command::new("virsh")
                .args(["-q", "-c", &self.uri])
                .args(args)
                .output();
        };
        for d in &self.domains {
            run(&["destroy", d]);
            run(&["undefine", d]);
        }
        if let Ok(out) = Command::new("virsh")
            .args(["-q", "-c", &self.uri, "vol-list", "--pool", &self.pool])
            .output()
        {
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            // Overlays first: the deepest names were made last.
            for line in text.lines().rev() {
                if let Some(name) = line.split_whitespace().next() {
                    run(&["vol-delete", "--pool", &self.pool, name]);
                }
            }
        }
        run(&["pool-destroy", &self.pool]);
        run(&["pool-undefine", &self.pool]);
    }
}

/// An agent for `NODE` on the real daemon, talking to `api`.
async fn agent(api: &TestApi, uri: &str) -> (Arc<Context>, Engine) {
    let client = api.client(ADMIN).await.unwrap();
    let mut hosts = Hosts::connect(
        &[HostSpec {
            node: NODE.into(),
            uri: uri.into(),
            p2p_uri: None,
            migration_uri: None,
        }],
        EngineConfig::default(),
    )
    .await
    .unwrap();
    hosts.shutdown_deadline = Duration::from_secs(1);
    let engine = hosts.get(NODE).unwrap().engine.clone();
    let mut settings = Settings::for_node(NODE);
    settings.host_cpus = Some(engine.node_info().await.unwrap().cpus);
    settings.shutdown_timeout = Duration::from_secs(1);
    let metrics = Metrics::register(&mut Registry::default(), None);
    let ctx = Context::new(client, hosts, metrics, settings).unwrap();
    (Arc::new(ctx), engine)
}

/// Binds a Volume to `NODE` the way the cluster controller does: `status.nodeName` by a
/// status write, and the node's routing label.
async fn bind(api: &TestApi, client: &kube::Client, ns: &str, name: &str) {
    api.patch_labels(
        "volumes",
        ns,
        name,
        &[("node.virtkube.io/node-a", Some("holder"))],
    )
    .unwrap();
    Api::<Volume>::namespaced(client.clone(), ns)
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": { "nodeName": NODE } })),
        )
        .await
        .unwrap();
}

fn volume_object(ns: &str, name: &str, pool: &str, backing: Option<&str>) -> Value {
    let mut spec = json!({ "pool": pool, "capacity": "16Mi", "format": "qcow2",
                           "reclaimPolicy": "Delete", "nodeName": NODE });
    if let Some(b) = backing {
        spec["source"] = json!({ "backingVolume": b });
    }
    json!({ "apiVersion": "virtkube.io/v1alpha1", "kind": "Volume",
            "metadata": { "name": name, "namespace": ns }, "spec": spec })
}

async fn get(client: &kube::Client, ns: &str, name: &str) -> Option<Volume> {
    Api::<Volume>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .unwrap()
}

/// Reconciles the Volume until it is Available (the first pass adds the finalizer).
async fn until_available(ctx: &Arc<Context>, client: &kube::Client, ns: &str, name: &str) {
    for _ in 0..6 {
        let vol = get(client, ns, name).await.expect("the Volume exists");
        if vol
            .status
            .as_ref()
            .is_some_and(|s| virtkube_crds::conditions::is_true(&s.conditions, "Ready"))
        {
            return;
        }
        let _ = volume::reconcile(Arc::new(vol), ctx.clone()).await;
    }
    panic!(
        "Volume {ns}/{name} never became Ready: {:?}",
        get(client, ns, name).await.and_then(|v| v.status)
    );
}

/// Reconciles the deleted Volume once, from a fresh read.
async fn reconcile_deletion(
    ctx: &Arc<Context>,
    client: &kube::Client,
    ns: &str,
    name: &str,
) -> Option<Result<Action, Error>> {
    let vol = get(client, ns, name).await?;
    assert!(vol.metadata.deletion_timestamp.is_some());
    Some(volume::reconcile(Arc::new(vol), ctx.clone()).await)
}

/// The notes of the events with `reason` about `name`.
fn notes(api: &TestApi, name: &str, reason: &str) -> Vec<String> {
    api.events()
        .iter()
        .filter(|e| e["regarding"]["name"] == name && e["reason"] == reason)
        .map(|e| e["note"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// The deletion of `base` waits: an error (retried), the image still there, `Ready=False`
/// naming every one of `users`, and a `DeletionBlocked` event (kube's recorder folds repeats
/// of one reason and action into a series that keeps the first note: the first one names
/// the first users, the condition always the current ones).
async fn assert_blocked(
    ctx: &Arc<Context>,
    api: &TestApi,
    client: &kube::Client,
    engine: &Engine,
    (ns, pool): (&str, &str),
    users: &[&str],
) {
    let result = reconcile_deletion(ctx, client, ns, "base")
        .await
        .expect("the Volume waits for its users");
    assert!(
        matches!(&result, Err(Error::Finalizer(_))),
        "the deletion is retried: {result:?}"
    );
    let image = format!("{ns}.base");
    assert!(
        engine.volume_observe(pool, &image).await.unwrap().is_some(),
        "the image of {ns}/base was deleted while {users:?} use it"
    );
    let vol = get(client, ns, "base").await.unwrap();
    let status = vol.status.unwrap();
    let ready = virtkube_crds::conditions::find(&status.conditions, "Ready")
        .unwrap()
        .clone();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "VolumeInUse")
    );
    for user in users {
        assert!(ready.message.contains(user), "{user} in {}", ready.message);
    }
    let blocked = notes(api, "base", "DeletionBlocked");
    assert_eq!(blocked.len(), 1, "one series: {blocked:?}");
    assert!(blocked[0].contains("is in use by"), "{}", blocked[0]);
}

#[tokio::test]
#[ignore = "needs private libvirtd: scripts/libvirt-nodes.sh up, then --run-ignored"]
async fn an_image_under_a_running_guests_overlay_is_kept_until_every_user_is_gone() {
    let uri = node_a_uri();
    let api = TestApi::start().await.unwrap();
    let client = api.client(ADMIN).await.unwrap();
    let (ctx, engine) = agent(&api, &uri).await;
    let id = std::process::id() % 100_000;
    let ns = format!("safety{id}");
    let pool_name = format!("vksafety{id}");
    let dir = tempfile::tempdir().unwrap();
    let pool_path = dir.path().join("pool");
    let vm = format!("{ns}.vm");
    let (legacy, ghost) = (format!("vklegacy{id}"), format!("vkghost{id}"));
    let _leftovers = Leftovers {
        uri: uri.clone(),
        domains: vec![vm.clone(), legacy.clone(), ghost.clone()],
        pool: pool_name.clone(),
    };
    api.create_namespace(&ns).unwrap();

    // The pool, through the pool controller.
    api.create(
        "storagepools",
        json!({ "apiVersion": "virtkube.io/v1alpha1", "kind": "StoragePool",
                "metadata": { "name": pool_name },
                "spec": { "type": "dir", "target": { "path": pool_path.to_str().unwrap() } } }),
    )
    .unwrap();
    let pools: Api<StoragePool> = Api::all(client.clone());
    for _ in 0..3 {
        let p = pools.get(&pool_name).await.unwrap();
        let _ = pool::reconcile(Arc::new(p), ctx.clone()).await;
    }
    assert!(engine.pool_observe(&pool_name).await.unwrap().is_some());

    // base, and ov: a copy-on-write overlay on it, both reclaimPolicy Delete.
    for (name, backing) in [("base", None), ("ov", Some("base"))] {
        api.create("volumes", volume_object(&ns, name, &pool_name, backing))
            .unwrap();
        bind(&api, &client, &ns, name).await;
        until_available(&ctx, &client, &ns, name).await;
    }
    let base_path = engine
        .volume_observe(&pool_name, &format!("{ns}.base"))
        .await
        .unwrap()
        .unwrap()
        .path;

    // A running Domain whose disk is ov (its guest as the agent defines it: virtkube's mark
    // for the Domain resource).
    let dom = api
        .create(
            "domains",
            json!({ "apiVersion": "virtkube.io/v1alpha1", "kind": "Domain",
                    "metadata": { "name": "vm", "namespace": ns },
                    "spec": { "nodeName": NODE, "memory": { "size": "64Mi" },
                              "disks": [{ "name": "root", "volume": "ov" }] } }),
        )
        .unwrap();
    let owner = Owner::new(
        "Domain",
        dom["metadata"]["uid"].as_str().unwrap(),
        Some(&ns),
        "vm",
    );
    let mut def = DomainDef::new(&vm, owner.clone());
    def.virt_type = "qemu".into();
    def.memory_kib = 64 * 1024;
    def.max_memory_kib = 64 * 1024;
    def.os.machine = Some("pc".into());
    def.emulator = Some("/usr/bin/qemu-system-x86_64".into());
    def.disks.push(DiskDef {
        name: Some("root".into()),
        target_dev: "vda".into(),
        bus: Some("virtio".into()),
        source: DiskSource::Volume {
            pool: pool_name.clone(),
            volume: format!("{ns}.ov"),
        },
        read_only: false,
        boot_order: Some(1),
        format: Some("qcow2".into()),
        device: None,
    });
    engine.domain_define(&def).await.unwrap();
    engine.domain_start(&vm, &owner).await.unwrap();

    // Deleting base: it waits for the Domain (its guest reads base through ov) and for ov.
    api.delete("volumes", &ns, "base").unwrap();
    assert_blocked(
        &ctx,
        &api,
        &client,
        &engine,
        (&ns, &pool_name),
        &[&format!("Domain {ns}/vm"), &format!("Volume {ns}/ov")],
    )
    .await;
    assert!(notes(&api, "base", "VolumeDeleted").is_empty());
    let first = &notes(&api, "base", "DeletionBlocked")[0];
    assert!(first.contains(&format!("Domain {ns}/vm")), "{first}");

    // The Domain goes (resource and guest): base still waits for ov.
    api.delete("domains", &ns, "vm").unwrap();
    engine.domain_destroy(&vm, &owner).await.unwrap();
    engine.domain_undefine(&vm, &owner).await.unwrap();
    assert_blocked(
        &ctx,
        &api,
        &client,
        &engine,
        (&ns, &pool_name),
        &[&format!("Volume {ns}/ov")],
    )
    .await;

    // ov goes (nothing uses it): deleted, finalizer removed, resource gone.
    api.delete("volumes", &ns, "ov").unwrap();
    reconcile_deletion(&ctx, &client, &ns, "ov")
        .await
        .unwrap()
        .unwrap();
    assert!(get(&client, &ns, "ov").await.is_none());
    assert_eq!(notes(&api, "ov", "VolumeDeleted").len(), 1);

    // Foreign users, which virtkube never made: an overlay volume on base in the same pool,
    // and a domain defined (not running) on it.
    let foreign = "foreign.qcow2";
    virsh(
        &uri,
        &[
            "vol-create-as",
            &pool_name,
            foreign,
            "16M",
            "--format",
            "qcow2",
            "--backing-vol",
            &base_path,
            "--backing-vol-format",
            "qcow2",
        ],
    );
    let foreign_path = engine
        .volume_observe(&pool_name, foreign)
        .await
        .unwrap()
        .unwrap()
        .path;
    let xml = |name: &str, file: &str| {
        format!(
            "<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64' machine='pc'>hvm</type></os><devices>\
             <emulator>/usr/bin/qemu-system-x86_64</emulator>\
             <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
             <source file='{file}'/><target dev='vda' bus='virtio'/></disk></devices></domain>"
        )
    };
    let xml_path = dir.path().join("legacy.xml");
    std::fs::write(&xml_path, xml(&legacy, &foreign_path)).unwrap();
    virsh(&uri, &["define", xml_path.to_str().unwrap()]);
    assert_blocked(
        &ctx,
        &api,
        &client,
        &engine,
        (&ns, &pool_name),
        &[
            &format!("libvirt domain {legacy} (not virtkube's)"),
            &format!("libvirt volume {pool_name}/{foreign} (not virtkube's)"),
        ],
    )
    .await;
    virsh(&uri, &["undefine", &legacy]);
    assert_blocked(
        &ctx,
        &api,
        &client,
        &engine,
        (&ns, &pool_name),
        &[&format!(
            "libvirt volume {pool_name}/{foreign} (not virtkube's)"
        )],
    )
    .await;
    virsh(&uri, &["vol-delete", "--pool", &pool_name, foreign]);

    // A foreign guest running on an overlay file outside any pool: only the chain libvirt
    // reports for the running guest says it reads base.
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let ghost_disk = outside.join("ghost.qcow2");
    let made = Command::new("qemu-img")
        .args([
            "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", &base_path,
        ])
        .arg(&ghost_disk)
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let xml_path = dir.path().join("ghost.xml");
    std::fs::write(&xml_path, xml(&ghost, ghost_disk.to_str().unwrap())).unwrap();
    virsh(&uri, &["create", xml_path.to_str().unwrap()]);
    assert_blocked(
        &ctx,
        &api,
        &client,
        &engine,
        (&ns, &pool_name),
        &[&format!("libvirt domain {ghost} (not virtkube's)")],
    )
    .await;
    virsh(&uri, &["destroy", &ghost]);

    // Every user gone: base is deleted and its deletion completes.
    reconcile_deletion(&ctx, &client, &ns, "base")
        .await
        .unwrap()
        .unwrap();
    assert!(get(&client, &ns, "base").await.is_none());
    assert!(
        engine
            .volume_observe(&pool_name, &format!("{ns}.base"))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(notes(&api, "base", "VolumeDeleted").len(), 1);

    // The pool goes too.
    api.delete("storagepools", "", &pool_name).unwrap();
    let p = pools.get(&pool_name).await.unwrap();
    pool::reconcile(Arc::new(p), ctx.clone()).await.unwrap();
    assert!(engine.pool_observe(&pool_name).await.unwrap().is_none());
}
