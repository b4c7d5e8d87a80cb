//! The whole disks the `disk_real_*` tests partition, shared by the engine's and the agent's
//! pool tests (the controller's include it with `#[path]`).

/// Which of the disks each `disk_real_*` test takes for itself: each needs a disk with no
/// partition table when it starts, and the test binaries run one after another in the same
/// VM.
#[derive(Debug, Clone, Copy)]
#[allow(dead_code)] // each test binary takes its own
pub enum DiskFor {
    /// The engine's GPT test (`engine/tests/pools_real.rs`).
    EngineGpt = 0,
    /// The engine's dos test.
    EngineDos = 1,
    /// The agent's test (`controller/tests/agent_pools_real.rs`).
    Agent = 2,
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
