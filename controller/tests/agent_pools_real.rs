//! The agent's StoragePool and Volume reconcilers for pool types beyond `dir`, against a real
//! private libvirtd (node A) and the in-memory API server: an `fs` pool and a `logical` pool,
//! each built on a loop device the test makes and removes, reach `Running` with their
//! capacity in `status.nodes` and `Defined`/`Built`/`Started` events; a Volume asking for
//! qcow2 in the logical pool is `SpecValid=False` (`Unsupported`, phase `Failed`) without
//! libvirt being asked; deleting the pools leaves their storage. The `netfs_real_*` test
//! does the same for a `netfs` pool on the NFS export scripts/kernel-vm-tests serves in its
//! VM (`VIRTKUBE_TEST_NFS_EXPORT`), with a raw Volume made and deleted on the share; it
//! fails anywhere that variable is unset. The `disk_real_*` test partitions a whole SCSI
//! disk of the VM's (`VIRTKUBE_TEST_DISKS`) through a `disk` pool: Volumes made at once, an
//! interrupted creation, a clone of a recorded partition, a partition removed outside
//! virtkube (its number not reused while recorded), growth refused, deletion by recorded
//! partition only. The second `disk_real_*` test runs a Domain (no OS, QEMU/TCG in the VM)
//! on a disk-pool Volume: it waits while the Volume has no partition recorded, is defined
//! on exactly the recorded partition, is the Volume's `usedBy`, holds the Volume's deletion
//! until it is gone; a Domain on a Volume whose partition was removed outside virtkube is
//! refused, and so is it once another partition is made by hand under the same number at
//! other bytes (`PartitionReplaced`), which the Volume's deletion leaves with its data; and
//! partitions made by hand are listed in the pool's status.
//!
//! ```sh
//! scripts/libvirt-nodes.sh up /tmp/nodes; set -a; . /tmp/nodes/env; set +a
//! cargo nextest run -p virtkube --test agent_pools_real --run-ignored all
//! ```

mod agent_support;
#[path = "../../engine/tests/loop_device/mod.rs"]
mod loop_device;
#[path = "../../engine/tests/nfs_export/mod.rs"]
mod nfs_export;
#[path = "../../engine/tests/pool_support/mod.rs"]
mod pool_support;
use nfs_export::nfs_export;
use pool_support::{DiskFor, PoolLeftover, read_start, test_disk, write_marker};

use std::sync::Arc;
use std::time::Duration;

use kube::api::Api;
use serde_json::{Value, json};
use virtkube::agent::{domain, pool, volume};
use virtkube_crds::volume::PartitionExtent;
use virtkube_crds::{Domain, StoragePool, Volume};
use virtkube_testapi::{ADMIN, TestApi};

use agent_support::{NODE, bind_domain, bind_volume};
use loop_device::{LoopDevice, run};

fn node_a_uri() -> String {
    std::env::var("VIRTKUBE_TEST_NODE_A_URI").unwrap_or_else(|_| {
        panic!("VIRTKUBE_TEST_NODE_A_URI is not set: run scripts/libvirt-nodes.sh up and source its env")
    })
}

/// Reconciles the stored pool until this node's entry is `Running` (the first pass adds
/// the node's finalizer); returns the stored object.
async fn pool_running(
    api: &TestApi,
    pools: &Api<StoragePool>,
    ctx: &Arc<virtkube::agent::context::Context>,
    name: &str,
) -> Value {
    for _ in 0..3 {
        let p = pools.get(name).await.unwrap();
        let _ = tokio::time::timeout(
            Duration::from_secs(60),
            pool::reconcile(Arc::new(p), ctx.clone()),
        )
        .await
        .expect("the reconcile finished within a minute");
        let stored = api.get("storagepools", "", name).unwrap();
        if stored["status"]["nodes"][0]["state"] == "Running" {
            return stored;
        }
    }
    panic!(
        "{name} is not Running: {}",
        api.get("storagepools", "", name).unwrap()["status"]
    );
}

fn reasons_for(api: &TestApi, name: &str) -> Vec<String> {
    api.events()
        .iter()
        .filter(|e| e["regarding"]["name"] == name || e["involvedObject"]["name"] == name)
        .map(|e| e["reason"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs private libvirtd: scripts/libvirt-nodes.sh up, then --run-ignored"]
async fn fs_and_logical_pools_through_the_agent_with_status_events_and_refusals() {
    let uri = node_a_uri();
    let tag = std::process::id() % 100_000;
    let (fs, lvm) = (format!("vkafs{tag}"), format!("vkalv{tag}"));
    let fs_disk = LoopDevice::for_pool(64, &fs);
    let mut lvm_disk = LoopDevice::for_pool(64, &lvm);
    lvm_disk.volume_groups.push(lvm.clone());
    let mnt = tempfile::Builder::new()
        .prefix("vkafs")
        .tempdir_in("/tmp")
        .unwrap();
    let api = TestApi::start().await.unwrap();
    let admin = api.client(ADMIN).await.unwrap();
    let (ctx, _, engine) = agent_support::testapi_context_on(&api, NODE, &uri).await;
    let pools: Api<StoragePool> = Api::all(admin.clone());

    api.create(
        "storagepools",
        json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "StoragePool",
               "metadata": {"name": fs},
               "spec": {"type": "fs", "autostart": false,
                        "target": {"path": mnt.path().join("m").to_str().unwrap()},
                        "source": {"devices": [fs_disk.device], "format": "ext4", "build": true}}}),
    )
    .unwrap();
    api.create(
        "storagepools",
        json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "StoragePool",
               "metadata": {"name": lvm},
               "spec": {"type": "logical", "autostart": false,
                        "source": {"name": lvm, "devices": [lvm_disk.device], "build": true}}}),
    )
    .unwrap();

    for name in [&fs, &lvm] {
        let stored = pool_running(&api, &pools, &ctx, name).await;
        let entry = &stored["status"]["nodes"][0];
        assert_eq!(entry["nodeName"], NODE);
        let capacity = entry["capacity"].as_str().unwrap_or_default();
        assert!(!capacity.is_empty() && capacity != "0", "{entry}");
        let ready = stored["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Ready")
            .unwrap();
        assert_eq!(ready["status"], "True", "{ready}");
        let reasons = reasons_for(&api, name);
        for reason in ["Defined", "Built", "Started"] {
            assert!(reasons.iter().any(|r| r == reason), "{name}: {reasons:?}");
        }
        println!("{name}: {entry}");
    }

    // A qcow2 Volume (the default format) in the LVM pool: refused by the plan.
    let ns = format!("pools{tag}");
    api.create_namespace(&ns).unwrap();
    api.create(
        "volumes",
        json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Volume",
               "metadata": {"name": "disk", "namespace": ns},
               "spec": {"pool": lvm, "capacity": "8Mi", "nodeName": NODE}}),
    )
    .unwrap();
    bind_volume(&api, &ns, "disk", NODE).await;
    let volumes: Api<Volume> = Api::namespaced(admin.clone(), &ns);
    for _ in 0..2 {
        let v = volumes.get("disk").await.unwrap();
        let _ = tokio::time::timeout(
            Duration::from_secs(60),
            volume::reconcile(Arc::new(v), ctx.clone()),
        )
        .await
        .expect("the reconcile finished within a minute");
    }
    let stored = api.get("volumes", &ns, "disk").unwrap();
    let spec_valid = stored["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "SpecValid")
        .unwrap()
        .clone();
    assert_eq!(spec_valid["status"], "False", "{}", stored["status"]);
    assert_eq!(spec_valid["reason"], "Unsupported");
    assert!(
        spec_valid["message"]
            .as_str()
            .unwrap()
            .contains("set spec.format: raw"),
        "{spec_valid}"
    );
    assert_eq!(stored["status"]["phase"], "Failed");
    assert!(
        engine.volume_list(&lvm).await.unwrap().is_empty(),
        "libvirt was not asked"
    );
    api.delete("volumes", &ns, "disk").unwrap();
    let v = volumes.get("disk").await.unwrap();
    let _ = volume::reconcile(Arc::new(v), ctx.clone()).await;

    // A raw Volume in the LVM pool, where the kernel has device-mapper (scripts/kernel-vm-tests
    // runs this test in a VM that has it): made, reported in whole extents, growth refused
    // by the plan (libvirt's LVM backend cannot), deleted with the Volume.
    if std::fs::read_to_string("/proc/misc").is_ok_and(|m| m.contains("device-mapper")) {
        logical_volume_through_the_agent(&api, &volumes, &ctx, &engine, &ns, &lvm).await;
    } else {
        eprintln!(
            "NOT TESTED HERE: a logical volume through the agent (this kernel has no \
             device-mapper; scripts/kernel-vm-tests runs this test where it has)"
        );
    }

    // Deleted: each node stops and undefines its pool; the storage stays.
    for name in [&fs, &lvm] {
        api.delete("storagepools", "", name).unwrap();
        let p = pools.get(name).await.unwrap();
        pool::reconcile(Arc::new(p), ctx.clone()).await.unwrap();
        assert!(
            api.get("storagepools", "", name).is_none(),
            "finalizer removed"
        );
        assert!(engine.pool_observe(name).await.unwrap().is_none());
        assert!(reasons_for(&api, name).iter().any(|r| r == "Deleted"));
    }
    assert!(
        run("vgs", &["--noheadings", "-o", "vg_name", &lvm]).0,
        "the volume group stays"
    );
    let (_, kind) = run("blkid", &["-o", "value", "-s", "TYPE", &fs_disk.device]);
    assert_eq!(kind.trim(), "ext4", "the filesystem stays");
}

/// Reconciles Volume `name` `times` times; returns the stored object.
async fn reconcile_volume(
    api: &TestApi,
    volumes: &Api<Volume>,
    ctx: &Arc<virtkube::agent::context::Context>,
    ns: &str,
    name: &str,
    times: usize,
) -> Option<Value> {
    for _ in 0..times {
        let Ok(v) = volumes.get(name).await else {
            break;
        };
        let _ = tokio::time::timeout(
            Duration::from_secs(60),
            volume::reconcile(Arc::new(v), ctx.clone()),
        )
        .await
        .expect("the reconcile finished within a minute");
    }
    api.get("volumes", ns, name)
}

fn condition(stored: &Value, kind: &str) -> Value {
    stored["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == kind))
        .cloned()
        .unwrap_or_else(|| panic!("no {kind} condition: {}", stored["status"]))
}

async fn logical_volume_through_the_agent(
    api: &TestApi,
    volumes: &Api<Volume>,
    ctx: &Arc<virtkube::agent::context::Context>,
    engine: &virtkube_engine::Engine,
    ns: &str,
    lvm: &str,
) {
    const MIB: u64 = 1 << 20;
    api.create(
        "volumes",
        json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Volume",
               "metadata": {"name": "lv", "namespace": ns},
               "spec": {"pool": lvm, "capacity": "10M", "format": "raw",
                        "reclaimPolicy": "Delete", "nodeName": NODE}}),
    )
    .unwrap();
    bind_volume(api, ns, "lv", NODE).await;
    let stored = reconcile_volume(api, volumes, ctx, ns, "lv", 3)
        .await
        .unwrap();
    assert_eq!(
        stored["status"]["phase"], "Available",
        "{}",
        stored["status"]
    );
    let libvirt_name = stored["status"]["volumeName"].as_str().unwrap().to_string();
    let lv = engine
        .volume_observe(lvm, &libvirt_name)
        .await
        .unwrap()
        .expect("the logical volume exists");
    assert_eq!(lv.capacity, 12 * MIB, "10 MB in whole 4 MiB extents");
    assert_eq!(lv.allocation, lv.capacity);
    assert_eq!(lv.path, format!("/dev/{lvm}/{libvirt_name}"));
    assert_eq!(stored["status"]["path"], lv.path.as_str());
    assert_eq!(stored["status"]["capacity"], "12Mi", "{}", stored["status"]);

    // Growth: refused by the plan, pointing at lvextend; the volume is left as it is.
    volumes
        .patch(
            "lv",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"capacity": "20Mi"}})),
        )
        .await
        .unwrap();
    let stored = reconcile_volume(api, volumes, ctx, ns, "lv", 2)
        .await
        .unwrap();
    let spec_valid = condition(&stored, "SpecValid");
    assert_eq!(spec_valid["status"], "False", "{}", stored["status"]);
    assert_eq!(spec_valid["reason"], "Unsupported");
    assert!(
        spec_valid["message"].as_str().unwrap().contains("lvextend"),
        "{spec_valid}"
    );
    let lv = engine
        .volume_observe(lvm, &libvirt_name)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lv.capacity, 12 * MIB, "not resized");

    // Deleted with reclaimPolicy Delete: the logical volume goes, the finalizer too.
    api.delete("volumes", ns, "lv").unwrap();
    let gone = reconcile_volume(api, volumes, ctx, ns, "lv", 3).await;
    assert!(gone.is_none(), "finalizer removed: {gone:?}");
    assert!(
        engine
            .volume_observe(lvm, &libvirt_name)
            .await
            .unwrap()
            .is_none(),
        "lvremove ran"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an NFS server on 127.0.0.1: run by scripts/kernel-vm-tests in its VM"]
async fn netfs_real_pool_and_raw_volume_through_the_agent_leave_the_share_data() {
    const MIB: u64 = 1 << 20;
    let export = nfs_export();
    let uri = node_a_uri();
    let tag = std::process::id() % 100_000;
    let name = format!("vkanfs{tag}");
    let mnt = tempfile::Builder::new()
        .prefix("vkanfs")
        .tempdir_in("/tmp")
        .unwrap();
    // Someone else's file on the share: the pool's deletion leaves it.
    let foreign = export.join(format!("{name}.foreign"));
    std::fs::write(&foreign, b"not virtkube's").unwrap();
    let api = TestApi::start().await.unwrap();
    let admin = api.client(ADMIN).await.unwrap();
    let (ctx, _, engine) = agent_support::testapi_context_on(&api, NODE, &uri).await;
    let pools: Api<StoragePool> = Api::all(admin.clone());

    api.create(
        "storagepools",
        json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "StoragePool",
               "metadata": {"name": name},
               "spec": {"type": "netfs", "autostart": false,
                        "target": {"path": mnt.path().join("m").to_str().unwrap()},
                        "source": {"host": "127.0.0.1", "dir": export.to_str().unwrap(),
                                   "format": "nfs"}}}),
    )
    .unwrap();
    let stored = pool_running(&api, &pools, &ctx, &name).await;
    let entry = &stored["status"]["nodes"][0];
    assert_eq!(entry["nodeName"], NODE);
    // The export is a 64 MiB tmpfs: the pool reports the server's filesystem.
    let observed = engine.pool_observe(&name).await.unwrap().unwrap();
    assert!(
        observed.capacity > 32 * MIB && observed.capacity <= 64 * MIB,
        "capacity {}",
        observed.capacity
    );
    let capacity = entry["capacity"].as_str().unwrap_or_default();
    assert!(!capacity.is_empty() && capacity != "0", "{entry}");
    assert_eq!(condition(&stored, "Ready")["status"], "True");
    let reasons = reasons_for(&api, &name);
    for reason in ["Defined", "Started"] {
        assert!(reasons.iter().any(|r| r == reason), "{reasons:?}");
    }
    println!("{name}: {entry}");

    // A raw Volume on the share: made by the agent, its file on the server's directory.
    let ns = format!("nfs{tag}");
    api.create_namespace(&ns).unwrap();
    api.create(
        "volumes",
        json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Volume",
               "metadata": {"name": "disk", "namespace": ns},
               "spec": {"pool": name, "capacity": "4Mi", "format": "raw",
                        "reclaimPolicy": "Delete", "nodeName": NODE}}),
    )
    .unwrap();
    bind_volume(&api, &ns, "disk", NODE).await;
    let volumes: Api<Volume> = Api::namespaced(admin.clone(), &ns);
    let stored = reconcile_volume(&api, &volumes, &ctx, &ns, "disk", 3)
        .await
        .unwrap();
    assert_eq!(
        stored["status"]["phase"], "Available",
        "{}",
        stored["status"]
    );
    assert_eq!(stored["status"]["capacity"], "4Mi", "{}", stored["status"]);
    let file = stored["status"]["volumeName"].as_str().unwrap().to_string();
    let path = stored["status"]["path"].as_str().unwrap().to_string();
    assert!(path.starts_with(mnt.path().to_str().unwrap()), "{path}");
    let on_server = export.join(&file);
    assert_eq!(std::fs::metadata(&on_server).unwrap().len(), 4 * MIB);
    // Written through the pool's mount, read on the server's directory.
    let block: Vec<u8> = (0..=255u8).cycle().take(64 * 1024).collect();
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.seek(SeekFrom::Start(MIB)).unwrap();
        f.write_all(&block).unwrap();
        f.sync_all().unwrap();
    }
    let data = std::fs::read(&on_server).unwrap();
    assert_eq!(&data[MIB as usize..MIB as usize + block.len()], &block[..]);

    // Deleted with reclaimPolicy Delete: the file goes from the server, the finalizer too.
    api.delete("volumes", &ns, "disk").unwrap();
    let gone = reconcile_volume(&api, &volumes, &ctx, &ns, "disk", 3).await;
    assert!(gone.is_none(), "finalizer removed: {gone:?}");
    assert!(!on_server.exists(), "{} removed", on_server.display());

    // The pool deleted: stopped (unmounted) and undefined; the share's other data stays.
    api.delete("storagepools", "", &name).unwrap();
    let p = pools.get(&name).await.unwrap();
    pool::reconcile(Arc::new(p), ctx.clone()).await.unwrap();
    assert!(
        api.get("storagepools", "", &name).is_none(),
        "finalizer removed"
    );
    assert!(engine.pool_observe(&name).await.unwrap().is_none());
    assert!(reasons_for(&api, &name).iter().any(|r| r == "Deleted"));
    assert_eq!(std::fs::read(&foreign).unwrap(), b"not virtkube's");
    std::fs::remove_file(&foreign).unwrap();
}

async fn set_volume_status(api: &TestApi, ns: &str, name: &str, status: Value) {
    let client = api.client(ADMIN).await.unwrap();
    Api::<Volume>::namespaced(client, ns)
        .patch_status(
            name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({ "status": status })),
        )
        .await
        .unwrap();
}

fn raw_volume(ns: &str, name: &str, pool: &str, capacity: &str, policy: &str) -> Value {
    json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Volume",
           "metadata": {"name": name, "namespace": ns},
           "spec": {"pool": pool, "capacity": capacity, "format": "raw",
                    "reclaimPolicy": policy, "nodeName": NODE}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a blank SCSI disk: run by scripts/kernel-vm-tests in its VM"]
async fn disk_real_partitions_are_volumes_recorded_by_the_agent() {
    const MIB: u64 = 1 << 20;
    let device = test_disk(DiskFor::Agent);
    let base = device.rsplit('/').next().unwrap().to_string();
    let uri = node_a_uri();
    let name = format!("vkadisk{}", std::process::id() % 100_000);
    let _leftover = PoolLeftover(name.clone());
    let api = TestApi::start().await.unwrap();
    let admin = api.client(ADMIN).await.unwrap();
    let (ctx, _, engine) = agent_support::testapi_context_on(&api, NODE, &uri).await;
    let pools: Api<StoragePool> = Api::all(admin.clone());
    let ns = "team";
    api.create_namespace(ns).unwrap();
    let volumes: Api<Volume> = Api::namespaced(admin.clone(), ns);
    api.create(
        "storagepools",
        json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "StoragePool",
               "metadata": {"name": name},
               "spec": {"type": "disk", "autostart": false,
                        "source": {"devices": [device], "build": true}}}),
    )
    .unwrap();
    let stored = pool_running(&api, &pools, &ctx, &name).await;
    let entry = &stored["status"]["nodes"][0];
    assert!(
        entry["capacity"].as_str().is_some_and(|c| c != "0"),
        "{entry}"
    );
    assert!(reasons_for(&api, &name).iter().any(|r| r == "Built"));
    let (_, label) = run("parted", &["-s", &device, "print"]);
    assert!(label.contains("Partition Table: gpt"), "{label}");

    // Two Volumes made at once in the same pool: each gets its own partition, never the
    // other's (one of them may be refused by libvirt first and take the next number).
    for (v, policy) in [("a", "Delete"), ("b", "Retain")] {
        api.create("volumes", raw_volume(ns, v, &name, "10M", policy))
            .unwrap();
        bind_volume(&api, ns, v, NODE).await;
    }
    let (a, b) = tokio::join!(
        reconcile_volume(&api, &volumes, &ctx, ns, "a", 4),
        reconcile_volume(&api, &volumes, &ctx, ns, "b", 4)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    for v in [&a, &b] {
        assert_eq!(v["status"]["phase"], "Available", "{}", v["status"]);
        assert_eq!(v["status"]["key"], v["status"]["path"], "{}", v["status"]);
    }
    let (a_part, b_part) = (
        a["status"]["volumeName"].as_str().unwrap().to_string(),
        b["status"]["volumeName"].as_str().unwrap().to_string(),
    );
    assert_ne!(a_part, b_part);
    let mut both = [a_part.clone(), b_part.clone()];
    both.sort();
    assert_eq!(both, [format!("{base}1"), format!("{base}2")]);
    let a_vol = engine
        .volume_observe(&name, &a_part)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a["status"]["key"], a_vol.key.as_str());
    assert_eq!(a_vol.capacity, 10_000_384, "whole sectors");
    assert_eq!(
        a["status"]["capacity"], "9766Ki",
        "10,000,384 bytes: {}",
        a["status"]
    );
    // Its extent recorded beside its key; a record an older agent made (the key alone) is
    // completed at the next reconcile.
    let extent = a_vol.extent.expect("libvirt reports a partition's extent");
    let recorded = json!({"start": extent.start, "end": extent.end});
    assert_eq!(a["status"]["partition"], recorded, "{}", a["status"]);
    set_volume_status(&api, ns, "a", json!({"partition": null})).await;
    let old = api.get("volumes", ns, "a").unwrap();
    assert!(
        old["status"].get("partition").is_none(),
        "{}",
        old["status"]
    );
    let a = reconcile_volume(&api, &volumes, &ctx, ns, "a", 1)
        .await
        .unwrap();
    assert_eq!(a["status"]["partition"], recorded, "{}", a["status"]);
    assert_eq!(a["status"]["phase"], "Available", "{}", a["status"]);

    // An interrupted creation: the agent recorded `Creating` for the next partition, libvirt
    // made it, and the agent stopped before recording its key. That partition is left alone
    // (nobody's); the Volume gets the one after it.
    let orphan = format!("{base}3");
    let made = engine
        .volume_create(
            &name,
            &virtkube_engine::model::VolumeDef {
                name: orphan.clone(),
                capacity_bytes: 4 * MIB,
                format: virtkube_engine::model::VolumeFormat::Raw,
                backing_volume: None,
            },
        )
        .await
        .unwrap();
    api.create("volumes", raw_volume(ns, "c", &name, "6Mi", "Delete"))
        .unwrap();
    bind_volume(&api, ns, "c", NODE).await;
    set_volume_status(
        &api,
        ns,
        "c",
        json!({"phase": "Creating", "volumeName": orphan}),
    )
    .await;
    let c = reconcile_volume(&api, &volumes, &ctx, ns, "c", 3)
        .await
        .unwrap();
    assert_eq!(c["status"]["phase"], "Available", "{}", c["status"]);
    assert_eq!(
        c["status"]["volumeName"],
        format!("{base}4"),
        "{}",
        c["status"]
    );
    assert_eq!(c["status"]["capacity"], "6Mi");

    // A clone copies the partition its source recorded into a new one, as large as asked.
    write_marker(&format!("/dev/{b_part}"), b"b's data");
    let mut d = raw_volume(ns, "d", &name, "12Mi", "Delete");
    d["spec"]["source"] = json!({"volume": "b"});
    api.create("volumes", d).unwrap();
    bind_volume(&api, ns, "d", NODE).await;
    let d = reconcile_volume(&api, &volumes, &ctx, ns, "d", 3)
        .await
        .unwrap();
    assert_eq!(d["status"]["phase"], "Available", "{}", d["status"]);
    assert_eq!(
        d["status"]["volumeName"],
        format!("{base}5"),
        "{}",
        d["status"]
    );
    assert_eq!(d["status"]["capacity"], "12Mi");
    assert_eq!(read_start(&format!("/dev/{base}5"), 8), b"b's data");

    // c's partition removed outside virtkube: c says so and nothing is made in its place;
    // a new Volume is not given that number while c's record names it (libvirt would make
    // exactly that one next); once c is deleted, it is.
    let c_key = c["status"]["key"].as_str().unwrap().to_string();
    engine
        .volume_delete(&name, &format!("{base}4"), &c_key)
        .await
        .unwrap();
    let c = reconcile_volume(&api, &volumes, &ctx, ns, "c", 1)
        .await
        .unwrap();
    assert_eq!(
        condition(&c, "Ready")["reason"],
        "PartitionMissing",
        "{}",
        c["status"]
    );
    api.create("volumes", raw_volume(ns, "e", &name, "4Mi", "Delete"))
        .unwrap();
    bind_volume(&api, ns, "e", NODE).await;
    // Two passes: the first adds the finalizer.
    let e = reconcile_volume(&api, &volumes, &ctx, ns, "e", 2)
        .await
        .unwrap();
    assert_eq!(
        condition(&e, "Ready")["reason"],
        "PartitionNumberRecorded",
        "{}",
        e["status"]
    );
    assert!(
        engine
            .volume_observe(&name, &format!("{base}4"))
            .await
            .unwrap()
            .is_none()
    );
    api.delete("volumes", ns, "c").unwrap();
    let gone = reconcile_volume(&api, &volumes, &ctx, ns, "c", 2).await;
    assert!(gone.is_none(), "c: finalizer removed: {gone:?}");
    let e = reconcile_volume(&api, &volumes, &ctx, ns, "e", 2)
        .await
        .unwrap();
    assert_eq!(
        e["status"]["volumeName"],
        format!("{base}4"),
        "{}",
        e["status"]
    );

    // Growth: libvirt's disk backend has no resize; refused before libvirt is asked.
    volumes
        .patch(
            "a",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"capacity": "20Mi"}})),
        )
        .await
        .unwrap();
    let grown = reconcile_volume(&api, &volumes, &ctx, ns, "a", 2)
        .await
        .unwrap();
    let spec_valid = condition(&grown, "SpecValid");
    assert_eq!(spec_valid["status"], "False", "{}", grown["status"]);
    assert_eq!(spec_valid["reason"], "Unsupported");
    assert!(
        spec_valid["message"]
            .as_str()
            .unwrap()
            .contains("cannot resize a partition"),
        "{spec_valid}"
    );
    // qcow2 cannot be a partition.
    let mut q = raw_volume(ns, "q", &name, "4Mi", "Delete");
    q["spec"]["format"] = json!("qcow2");
    api.create("volumes", q).unwrap();
    bind_volume(&api, ns, "q", NODE).await;
    let q = reconcile_volume(&api, &volumes, &ctx, ns, "q", 2)
        .await
        .unwrap();
    assert_eq!(
        condition(&q, "SpecValid")["reason"],
        "Unsupported",
        "{}",
        q["status"]
    );

    // Deleted: a's, d's and e's partitions (Delete) go, b's (Retain) stays; the unrecorded
    // one stays: no Volume recorded it.
    for v in ["a", "b", "d", "e", "q"] {
        api.delete("volumes", ns, v).unwrap();
        let gone = reconcile_volume(&api, &volumes, &ctx, ns, v, 3).await;
        assert!(gone.is_none(), "{v}: finalizer removed: {gone:?}");
    }
    let mut left: Vec<String> = engine
        .volume_observe_all(&name)
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.name)
        .collect();
    left.sort();
    let mut kept = [b_part.clone(), orphan.clone()];
    kept.sort();
    assert_eq!(left, kept, "libvirt lists partitions in its own order");
    assert_eq!(made.key, format!("/dev/{orphan}"));

    // The pool deleted: undefined, its partitions stay on the disk.
    api.delete("storagepools", "", &name).unwrap();
    let p = pools.get(&name).await.unwrap();
    pool::reconcile(Arc::new(p), ctx.clone()).await.unwrap();
    assert!(engine.pool_observe(&name).await.unwrap().is_none());
    let (_, table) = run("parted", &["-s", &device, "print"]);
    assert_eq!(
        table
            .lines()
            .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
            .count(),
        2,
        "{table}"
    );
}

/// Destroys and undefines libvirt domain `.1` on node A (`.0`) when dropped.
struct GuestLeftover(String, String);

impl Drop for GuestLeftover {
    fn drop(&mut self) {
        for verb in ["destroy", "undefine"] {
            let _ = run("virsh", &["-c", &self.0, verb, &self.1]);
        }
    }
}

/// Reconciles Domain `name` up to `times` times (stopping once it is gone); returns the
/// stored object and the last reconcile's error, if any.
async fn reconcile_domain(
    api: &TestApi,
    domains: &Api<Domain>,
    ctx: &Arc<virtkube::agent::context::Context>,
    ns: &str,
    name: &str,
    times: usize,
) -> (Option<Value>, Option<String>) {
    let mut error = None;
    for _ in 0..times {
        let Ok(d) = domains.get(name).await else {
            break;
        };
        error = tokio::time::timeout(
            Duration::from_secs(120),
            domain::reconcile(Arc::new(d), ctx.clone()),
        )
        .await
        .expect("the reconcile finished within two minutes")
        .err()
        .map(|e| e.to_string());
    }
    (api.get("domains", ns, name), error)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a blank SCSI disk and QEMU: run by scripts/kernel-vm-tests in its VM"]
async fn disk_real_domain_runs_on_the_partition_its_volume_recorded() {
    let device = test_disk(DiskFor::AgentDomain);
    let base = device.rsplit('/').next().unwrap().to_string();
    let uri = node_a_uri();
    let name = format!("vkadom{}", std::process::id() % 100_000);
    let ns = "team";
    let guest = format!("{ns}.vm");
    let _leftover = PoolLeftover(name.clone());
    let _guest = GuestLeftover(uri.clone(), guest.clone());
    let api = TestApi::start().await.unwrap();
    let admin = api.client(ADMIN).await.unwrap();
    let (ctx, engine, mut domain_cache) =
        agent_support::testapi_context_with_domains(&api, NODE, &uri).await;
    let pools: Api<StoragePool> = Api::all(admin.clone());
    api.create_namespace(ns).unwrap();
    let volumes: Api<Volume> = Api::namespaced(admin.clone(), ns);
    let domains: Api<Domain> = Api::namespaced(admin.clone(), ns);
    api.create(
        "storagepools",
        json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "StoragePool",
               "metadata": {"name": name},
               "spec": {"type": "disk", "autostart": false,
                        "source": {"devices": [device], "build": true}}}),
    )
    .unwrap();
    pool_running(&api, &pools, &ctx, &name).await;

    // The Domain comes first: its Volume is bound but has no partition recorded yet, so it
    // waits (nothing is defined), and no partition is guessed by name.
    api.create("volumes", raw_volume(ns, "data", &name, "8Mi", "Delete"))
        .unwrap();
    bind_volume(&api, ns, "data", NODE).await;
    api.create(
        "domains",
        json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Domain",
               "metadata": {"name": "vm", "namespace": ns},
               "spec": {"runStrategy": "Always", "cpu": {"vcpus": 1},
                        "memory": {"size": "128Mi"}, "os": {"machine": "pc"},
                        "disks": [{"name": "data", "volume": "data"}]}}),
    )
    .unwrap();
    bind_domain(&admin, ns, "vm", NODE).await;
    let (vm, error) = reconcile_domain(&api, &domains, &ctx, ns, "vm", 2).await;
    let vm = vm.unwrap();
    let ready = condition(&vm, "Ready");
    assert_eq!(
        ready["reason"], "VolumeNotReady",
        "{error:?} {}",
        vm["status"]
    );
    assert!(
        ready["message"]
            .as_str()
            .unwrap()
            .contains("has no partition recorded in disk pool"),
        "{ready}"
    );
    assert!(engine.domain_observe(&guest).await.unwrap().is_none());

    // The Volume's partition made and recorded: the Domain is defined on exactly that
    // partition and runs (QEMU/TCG in the VM opens it).
    let data = reconcile_volume(&api, &volumes, &ctx, ns, "data", 3)
        .await
        .unwrap();
    assert_eq!(data["status"]["phase"], "Available", "{}", data["status"]);
    let part = data["status"]["volumeName"].as_str().unwrap().to_string();
    assert_eq!(part, format!("{base}1"));
    assert_eq!(data["status"]["key"], format!("/dev/{part}"));
    write_marker(&format!("/dev/{part}"), b"vm's data");
    let (vm, error) = reconcile_domain(&api, &domains, &ctx, ns, "vm", 2).await;
    let vm = vm.unwrap();
    assert_eq!(error, None, "{}", vm["status"]);
    assert_eq!(
        condition(&vm, "Ready")["status"],
        "True",
        "{}",
        vm["status"]
    );
    assert_eq!(vm["status"]["phase"], "Running", "{}", vm["status"]);
    let (_, state) = run("virsh", &["-c", &uri, "domstate", &guest]);
    assert_eq!(state.trim(), "running");
    let (_, xml) = run("virsh", &["-c", &uri, "dumpxml", &guest]);
    let source = format!("<source pool='{name}' volume='{part}'");
    assert!(
        xml.contains("<disk type='volume' device='disk'>") && xml.contains(&source),
        "the definition names the recorded partition ({source}): {xml}"
    );
    eprintln!(
        "domain {guest} runs on {}",
        xml.lines()
            .find(|l| l.contains("<source pool="))
            .unwrap_or_default()
            .trim()
    );

    // usedBy names the Domain, and the Volume's deletion waits while it is in use: the
    // partition and its data stay.
    let cached = domains.get("vm").await.unwrap();
    domain_cache.apply_watcher_event(&kube::runtime::watcher::Event::Apply(cached.clone()));
    let data = reconcile_volume(&api, &volumes, &ctx, ns, "data", 1)
        .await
        .unwrap();
    assert_eq!(
        data["status"]["usedBy"],
        json!(["vm"]),
        "{}",
        data["status"]
    );
    api.delete("volumes", ns, "data").unwrap();
    let data = reconcile_volume(&api, &volumes, &ctx, ns, "data", 2)
        .await
        .expect("the deletion waits");
    let ready = condition(&data, "Ready");
    assert_eq!(ready["reason"], "VolumeInUse", "{}", data["status"]);
    assert!(
        ready["message"]
            .as_str()
            .unwrap()
            .contains("Domain team/vm"),
        "{ready}"
    );
    assert!(
        reasons_for(&api, "data")
            .iter()
            .any(|r| r == "DeletionBlocked")
    );
    assert!(engine.volume_observe(&name, &part).await.unwrap().is_some());
    assert_eq!(read_start(&format!("/dev/{part}"), 9), b"vm's data");

    // A partition made by hand (no Volume's): listed in the pool's status, said once in a
    // Warning event, never touched.
    let by_hand = format!("{base}2");
    let (made, out) = run(
        "virsh",
        &["-c", &uri, "vol-create-as", &name, &by_hand, "4M"],
    );
    assert!(made, "{out}");
    let stored = pool_running(&api, &pools, &ctx, &name).await;
    assert_eq!(
        stored["status"]["nodes"][0]["unrecordedPartitions"],
        json!({"count": 1, "names": [by_hand]}),
        "{}",
        stored["status"]
    );
    let p = pools.get(&name).await.unwrap();
    pool::reconcile(Arc::new(p), ctx.clone()).await.unwrap();
    let warnings: Vec<Value> = api
        .events()
        .into_iter()
        .filter(|e| e["reason"] == "UnrecordedPartitions")
        .collect();
    assert_eq!(warnings.len(), 1, "said once: {warnings:?}");
    assert_eq!(warnings[0]["type"], "Warning");
    let note = warnings[0]["note"]
        .as_str()
        .or(warnings[0]["message"].as_str())
        .unwrap_or_default();
    assert!(
        note.contains(&by_hand) && note.contains("never touches them"),
        "{note}"
    );

    // A Volume whose recorded partition was removed outside virtkube: a Domain on it is
    // refused (PartitionMissing) and defined on nothing else.
    api.create("volumes", raw_volume(ns, "lost", &name, "4Mi", "Delete"))
        .unwrap();
    bind_volume(&api, ns, "lost", NODE).await;
    let lost = reconcile_volume(&api, &volumes, &ctx, ns, "lost", 3)
        .await
        .unwrap();
    assert_eq!(lost["status"]["phase"], "Available", "{}", lost["status"]);
    let lost_part = lost["status"]["volumeName"].as_str().unwrap().to_string();
    assert_eq!(lost_part, format!("{base}3"));
    // Its extent recorded beside its key: where libvirt says the partition lies.
    let recorded: PartitionExtent = serde_json::from_value(lost["status"]["partition"].clone())
        .unwrap_or_else(|e| panic!("status.partition recorded ({e}): {}", lost["status"]));
    let made = engine
        .volume_observe(&name, &lost_part)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(made.extent, Some(recorded));
    assert_eq!(recorded.end - recorded.start, made.capacity);
    engine
        .volume_delete(&name, &lost_part, lost["status"]["key"].as_str().unwrap())
        .await
        .unwrap();
    api.create(
        "domains",
        json!({"apiVersion": "virtkube.io/v1alpha1", "kind": "Domain",
               "metadata": {"name": "vm2", "namespace": ns},
               "spec": {"runStrategy": "Always", "cpu": {"vcpus": 1},
                        "memory": {"size": "128Mi"}, "os": {"machine": "pc"},
                        "disks": [{"name": "data", "volume": "lost"}]}}),
    )
    .unwrap();
    bind_domain(&admin, ns, "vm2", NODE).await;
    let (vm2, _) = reconcile_domain(&api, &domains, &ctx, ns, "vm2", 2).await;
    let vm2 = vm2.unwrap();
    let ready = condition(&vm2, "Ready");
    assert_eq!(ready["reason"], "PartitionMissing", "{}", vm2["status"]);
    assert!(
        ready["message"]
            .as_str()
            .unwrap()
            .contains("no other partition is attached in its place"),
        "{ready}"
    );
    assert!(
        engine
            .domain_observe(&format!("{ns}.vm2"))
            .await
            .unwrap()
            .is_none()
    );

    // Someone makes a partition by hand under the lost one's number, at other bytes, and
    // writes their data there: the same key (a path), another partition. The Volume
    // reports it replaced, the Domain is defined on nothing, and deleting the Volume
    // (reclaimPolicy Delete) leaves the partition and its data.
    const MIB: u64 = 1 << 20;
    let start = recorded.end.div_ceil(MIB) * MIB + 2 * MIB;
    let end = start + 4 * MIB;
    let (made, out) = run(
        "parted",
        &[
            "-s",
            &device,
            "unit",
            "B",
            "mkpart",
            "someone",
            &start.to_string(),
            &(end - 1).to_string(),
        ],
    );
    assert!(made, "{out}");
    let (refreshed, out) = run("virsh", &["-c", &uri, "pool-refresh", &name]);
    assert!(refreshed, "{out}");
    let other = engine
        .volume_observe(&name, &lost_part)
        .await
        .unwrap()
        .expect("parted took the lowest free number, the lost partition's");
    assert_eq!(Some(other.key.as_str()), lost["status"]["key"].as_str());
    assert_eq!(other.extent, Some(PartitionExtent { start, end }));
    let (_, xml) = run(
        "virsh",
        &["-c", &uri, "vol-dumpxml", &lost_part, "--pool", &name],
    );
    eprintln!("the partition made by hand, as libvirt reports it:\n{xml}");
    write_marker(&format!("/dev/{lost_part}"), b"someone's data");
    let lost = reconcile_volume(&api, &volumes, &ctx, ns, "lost", 2)
        .await
        .unwrap();
    let ready = condition(&lost, "Ready");
    assert_eq!(ready["reason"], "PartitionReplaced", "{}", lost["status"]);
    let message = ready["message"].as_str().unwrap();
    for words in [
        format!("{recorded} of the disk"),
        format!("now lies at bytes {start}-{end}"),
        "does not attach, clone from or delete it".to_string(),
    ] {
        assert!(message.contains(&words), "{words}: {message}");
    }
    assert_eq!(
        lost["status"]["partition"],
        json!({"start": recorded.start, "end": recorded.end}),
        "the record is kept: {}",
        lost["status"]
    );
    let (vm2, _) = reconcile_domain(&api, &domains, &ctx, ns, "vm2", 2).await;
    let vm2 = vm2.unwrap();
    let ready = condition(&vm2, "Ready");
    assert_eq!(ready["reason"], "PartitionReplaced", "{}", vm2["status"]);
    assert!(
        engine
            .domain_observe(&format!("{ns}.vm2"))
            .await
            .unwrap()
            .is_none()
    );
    // No Volume's: listed with the one made by hand before.
    let stored = pool_running(&api, &pools, &ctx, &name).await;
    assert_eq!(
        stored["status"]["nodes"][0]["unrecordedPartitions"],
        json!({"count": 2, "names": [by_hand, lost_part]}),
        "{}",
        stored["status"]
    );
    api.delete("domains", ns, "vm2").unwrap();
    let (gone, _) = reconcile_domain(&api, &domains, &ctx, ns, "vm2", 2).await;
    assert!(gone.is_none(), "vm2: finalizer removed: {gone:?}");
    api.delete("volumes", ns, "lost").unwrap();
    let gone = reconcile_volume(&api, &volumes, &ctx, ns, "lost", 2).await;
    assert!(gone.is_none(), "lost: finalizer removed: {gone:?}");
    assert!(
        reasons_for(&api, "lost").iter().any(|r| r == "Retained"),
        "{:?}",
        reasons_for(&api, "lost")
    );
    let kept = engine.volume_observe(&name, &lost_part).await.unwrap();
    assert_eq!(
        kept.and_then(|k| k.extent),
        Some(PartitionExtent { start, end })
    );
    assert_eq!(
        read_start(&format!("/dev/{lost_part}"), 14),
        b"someone's data"
    );

    // The Domain deleted: the Volume's deletion completes by itself (its partition goes,
    // reclaimPolicy Delete); the partition made by hand stays.
    api.delete("domains", ns, "vm").unwrap();
    let (gone, _) = reconcile_domain(&api, &domains, &ctx, ns, "vm", 3).await;
    assert!(gone.is_none(), "vm: finalizer removed: {gone:?}");
    assert!(engine.domain_observe(&guest).await.unwrap().is_none());
    domain_cache.apply_watcher_event(&kube::runtime::watcher::Event::Delete(cached));
    let gone = reconcile_volume(&api, &volumes, &ctx, ns, "data", 2).await;
    assert!(gone.is_none(), "data: finalizer removed: {gone:?}");
    assert!(engine.volume_observe(&name, &part).await.unwrap().is_none());
    let mut left: Vec<String> = engine
        .volume_observe_all(&name)
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.name)
        .collect();
    left.sort();
    assert_eq!(
        left,
        [by_hand, lost_part],
        "libvirt lists them in no set order"
    );

    api.delete("storagepools", "", &name).unwrap();
    let p = pools.get(&name).await.unwrap();
    pool::reconcile(Arc::new(p), ctx.clone()).await.unwrap();
    assert!(engine.pool_observe(&name).await.unwrap().is_none());
}
