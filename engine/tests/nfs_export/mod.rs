//! The NFS export the `netfs_real_*` tests use, shared by the engine's and the agent's pool
//! tests (the controller's include it with `#[path]`).

/// The server-side directory of the NFS export that scripts/kernel-vm-tests serves on
/// 127.0.0.1 inside the kernel VM. No host of these tests serves NFS (this machine's kernel
/// has neither client nor server), so the runners leave the netfs_real_* tests out there, by
/// name and loudly; run anyway, they fail rather than pass untested.
pub fn nfs_export() -> std::path::PathBuf {
    std::env::var_os("VIRTKUBE_TEST_NFS_EXPORT")
        .map(Into::into)
        .unwrap_or_else(|| {
            panic!(
                "VIRTKUBE_TEST_NFS_EXPORT is not set: this test needs an NFS server exporting \
                 that directory to 127.0.0.1; scripts/kernel-vm-tests serves one in its VM \
                 and runs it there"
            )
        })
}
