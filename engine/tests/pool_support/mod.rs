//! What the real-libvirt pool tests share: the engine's (`engine/tests/pools_real.rs`) and
//! the agent's (`controller/tests/agent_pools_real.rs`, which includes this module with
//! `#[path]`). The whole disks the `disk_real_*` tests partition, a guard that removes a
//! pool a failed test left on node A, a `disk` pool defined, built and started through the
//! engine, and raw reads and writes of a partition's first bytes.
#![allow(dead_code)] // each test binary uses its own part

use virtkube_engine::model::{BuildMode, PoolDef, PoolSource, PoolType};
use virtkube_engine::{Engine, Owner};

/// Which of the disks each `disk_real_*` test takes for itself: each needs a disk with no
/// partition table when it starts, and the test binaries run one after another in the same
/// VM.
#[derive(Debug, Clone, Copy)]
pub enum DiskFor {
    /// The engine's GPT test (`engine/tests/pools_real.rs`).
    EngineGpt = 0,
    /// The engine's dos test.
    EngineDos = 1,
    /// The agent's Volume test (`controller/tests/agent_pools_real.rs`).
    Agent = 2,
    /// The agent's test of a Domain on a partition.
    AgentDomain = 3,
}

/// A blank whole disk for `role`: scripts/kernel-vm-tests loads `scsi_debug` in its VM
/// with one RAM disk per role (this machine's kernel has neither partition tables nor SCSI)
/// and lists them in `VIRTKUBE_TEST_DISKS`. libvirt's disk backend is broken on loop devices
/// (it deletes `loop0p1` as `parted rm p1`), so these tests take nothing else. The host's
/// runners leave them out by name; run anyway, they fail rather than pass untested.
pub fn test_disk(role: DiskFor) -> String {
    let disks = std::env::var("VIRTKUBE_TEST_DISKS").unwrap_or_else(|_| {
        panic!(
            "VIRTKUBE_TEST_DISKS is not set: this test needs blank whole disks (SCSI, not \
             loop devices); scripts/kernel-vm-tests makes them with scsi_debug in its VM \
             and runs it there"
        )
    });
    disks
        .split_whitespace()
        .nth(role as usize)
        .unwrap_or_else(|| panic!("VIRTKUBE_TEST_DISKS ({disks}) has no disk for {role:?}"))
        .to_string()
}

/// Stops and undefines a pool on node A when dropped (on failure; on success the test
/// removes it itself and checks how). The pool's storage is never touched.
pub struct PoolLeftover(pub String);

impl Drop for PoolLeftover {
    fn drop(&mut self) {
        let Ok(uri) = std::env::var("VIRTKUBE_TEST_NODE_A_URI") else {
            return;
        };
        for verb in ["pool-destroy", "pool-undefine"] {
            let _ = std::process::Command::new("virsh")
                .args(["-c", &uri, verb, &self.0])
                .output();
        }
    }
}

/// The definition of a `disk` pool `name` on whole disk `device` labelled `format`.
pub fn disk_def(name: &str, device: &str, format: &str, owner: &Owner) -> PoolDef {
    PoolDef {
        name: name.to_string(),
        pool_type: PoolType::Disk,
        target_path: "/dev".into(),
        source: PoolSource {
            devices: vec![device.to_string()],
            format: Some(format.to_string()),
            ..PoolSource::default()
        },
        owner: owner.clone(),
    }
}

/// A `disk` pool `name` on the blank disk `device`, labelled `format`, defined, built (the
/// label written) and started through the engine; the guard removes it if the test fails.
pub async fn disk_pool_started(
    e: &Engine,
    name: &str,
    device: &str,
    format: &str,
    owner: &Owner,
) -> PoolLeftover {
    let leftover = PoolLeftover(name.to_string());
    e.pool_define(&disk_def(name, device, format, owner))
        .await
        .unwrap();
    e.pool_build(name, owner, BuildMode::MakeStorage)
        .await
        .unwrap();
    e.pool_start(name, owner).await.unwrap();
    leftover
}

/// Writes `marker` at the start of the block device (a partition) at `path`, synced.
pub fn write_marker(path: &str, marker: &[u8]) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all(marker).unwrap();
    f.sync_all().unwrap();
}

/// The first `len` bytes of the block device at `path`.
pub fn read_start(path: &str, len: usize) -> Vec<u8> {
    use std::io::Read;
    let mut buf = vec![0; len];
    std::fs::File::open(path)
        .unwrap()
        .read_exact(&mut buf)
        .unwrap();
    buf
}
