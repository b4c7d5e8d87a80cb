//! Removes what a run left in libvirt (retained images, objects of a failed run) straight
//! through libvirt, so the next run starts clean. Used only after a run's checks.

use virt::connect::Connect;

use super::check::Names;

/// Destroys and undefines the run's domains, deletes its pool's volumes, and removes its
/// pool and network on the libvirt at `uri`. Errors are ignored: what is gone is gone.
pub fn remove_run(uri: &str, names: &Names) {
    let Ok(conn) = Connect::open(Some(uri)) else {
        return;
    };
    let prefix = format!("{}.", names.ns);
    if let Ok(domains) = conn.list_all_domains(0) {
        for d in domains {
            if d.name().is_ok_and(|n| n.starts_with(&prefix)) {
                let _ = d.destroy();
                let _ = d.undefine();
            }
        }
    }
    let pools = conn.list_all_storage_pools(0).unwrap_or_default();
    for pool in pools
        .into_iter()
        .filter(|p| p.name().is_ok_and(|n| n == names.pool))
    {
        if let Ok(vols) = pool.list_all_volumes(0) {
            for vol in vols {
                let _ = vol.delete(0);
            }
        }
        let _ = pool.destroy();
        let _ = pool.delete(0);
        let _ = pool.undefine();
    }
    let nets = conn.list_all_networks(0).unwrap_or_default();
    for net in nets
        .into_iter()
        .filter(|n| n.name().is_ok_and(|n| n == names.network))
    {
        let _ = net.destroy();
        let _ = net.undefine();
    }
    // Dropping the connection closes it (virt panics if that fails, which a test may).
    drop(conn);
}
