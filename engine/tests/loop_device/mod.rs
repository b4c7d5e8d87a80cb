//! Loop devices for the real-daemon pool tests (engine/tests/pools_real.rs, and, through
//! `#[path]`, controller/tests/pools_real.rs and agent_pools_real.rs): a sparse file behind a
//! loop device, with whatever a test made on it removed when dropped, failure or not.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

const MIB: u64 = 1 << 20;

/// Runs `program` with `args`: whether it succeeded, and its stdout and stderr together.
pub fn run(program: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("{program} does not run ({e}): install it (scripts/install-deps)")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Whether LVM knows volume group `vg`.
pub fn volume_group_exists(vg: &str) -> bool {
    run("vgs", &["--noheadings", "-o", "vg_name", vg]).0
}

/// A loop device over a sparse file. Dropped: the pool named in `pool` goes from node A
/// (stopped and undefined), then each of `volume_groups`, the LVM label, the device and
/// the file.
pub struct LoopDevice {
    /// `/dev/loopN`.
    pub device: String,
    image: PathBuf,
    /// Volume groups made on it, removed when dropped.
    pub volume_groups: Vec<String>,
    /// A pool on node A to stop and undefine first, when dropped.
    pub pool: Option<String>,
}

impl LoopDevice {
    /// `mib` MiB under a unique name; `None` (said loudly) only when the host has no loop
    /// devices at all.
    pub fn new(mib: u64) -> Option<Self> {
        if !Path::new("/dev/loop-control").exists() {
            eprintln!(
                "SKIPPED: this host has no loop devices (/dev/loop-control is missing): \
                 the logical and fs pool tests need one"
            );
            return None;
        }
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "vkloop{}x{}",
            std::process::id() % 100_000,
            N.fetch_add(1, Ordering::SeqCst)
        );
        Some(Self::make(mib, &name, None))
    }

    /// `mib` MiB named after `pool`, which is removed from node A when dropped.
    pub fn for_pool(mib: u64, pool: &str) -> Self {
        Self::make(mib, pool, Some(pool.to_string()))
    }

    fn make(mib: u64, name: &str, pool: Option<String>) -> Self {
        let image = std::env::temp_dir().join(format!("{name}.img"));
        let file = std::fs::File::create(&image).unwrap();
        file.set_len(mib * MIB).unwrap();
        let (ok, out) = run("losetup", &["--find", "--show", image.to_str().unwrap()]);
        assert!(ok, "losetup: {out}");
        Self {
            device: out.trim().to_string(),
            image,
            volume_groups: Vec::new(),
            pool,
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if let (Some(pool), Ok(uri)) = (&self.pool, std::env::var("VIRTKUBE_TEST_NODE_A_URI")) {
            for verb in ["pool-destroy", "pool-undefine"] {
                let _ = run("virsh", &["-c", &uri, verb, pool]);
            }
        }
        for vg in &self.volume_groups {
            let _ = run("vgremove", &["--force", "--yes", vg]);
        }
        let _ = run("pvremove", &["--force", "--force", "--yes", &self.device]);
        let _ = run("losetup", &["--detach", &self.device]);
        let _ = std::fs::remove_file(&self.image);
    }
}
