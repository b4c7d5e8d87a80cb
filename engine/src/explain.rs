//! virtkube's explanation of errors a user can cause through virtkube and that libvirt words
//! obscurely: what the error means in virtkube's terms and what to do next, printed beside
//! libvirt's own text (never instead of it) wherever an [`EngineError`] is shown: the
//! command line, and the conditions and events the agent writes.
//!
//! Each explanation is recognised from libvirt's error code and the stable part of its
//! message (libvirt's messages are part of its user interface and rarely change; a message
//! that changes only loses the explanation, never libvirt's text). Every one of them is
//! triggered for real in `engine/tests/explain.rs` or `controller/tests/explain_cli.rs`.

use std::fmt;

use virt::sys;

use crate::error::{EngineError, LibvirtError, ObjectKind};

/// What an error means and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// A stable name for the situation (`SameHostMigration`), for documentation and tests.
    pub id: &'static str,
    /// What happened, in virtkube's terms.
    pub meaning: String,
    /// The next step.
    pub next: String,
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "virtkube: {} Next: {}", self.meaning, self.next)
    }
}

fn explanation(
    id: &'static str,
    meaning: impl Into<String>,
    next: impl Into<String>,
) -> Explanation {
    Explanation {
        id,
        meaning: meaning.into(),
        next: next.into(),
    }
}

/// The first `'…'`-quoted part of a libvirt message (a socket path, an object name).
fn quoted(message: &str) -> Option<&str> {
    let start = message.find('\'')? + 1;
    let len = message[start..].find('\'')?;
    Some(&message[start..start + len])
}

/// The peer-to-peer URI a *libvirtd* must be given to reach the daemon behind `uri`, when it
/// differs from `uri` and can be derived safely: a `qemu:///…?socket=PATH` URI (no
/// transport) names, inside a daemon, that daemon itself whatever its socket, so the source
/// daemon of a migration needs the explicit UNIX transport, `qemu+unix:///…?socket=PATH`, to
/// reach the other daemon's socket. `None` for every other URI (remote transports already
/// name their host; a local URI without a socket cannot be told apart from the source).
pub fn peer_uri_for(uri: &str) -> Option<String> {
    let rest = uri.strip_prefix("qemu:///")?;
    let (_, query) = rest.split_once('?')?;
    query
        .split('&')
        .any(|p| p.starts_with("socket="))
        .then(|| format!("qemu+unix:///{rest}"))
}

fn connect_failure(uri: Option<&str>, message: &str) -> Option<Explanation> {
    let at = uri.map(|u| format!(" ({u})")).unwrap_or_default();
    if message.contains("Failed to connect socket to") {
        let path = quoted(message).unwrap_or("the socket");
        if message.contains("Permission denied") {
            return Some(explanation(
                "SocketPermissionDenied",
                format!("libvirt's socket {path}{at} exists but refuses this user."),
                format!(
                    "run virtkube as a user the socket lets in: root, or a member of the socket's group (`ls -l {path}`; libvirtd.conf unix_sock_group and unix_sock_rw_perms); in a pod, mount the host's /run/libvirt and run as UID 0, as the chart's agent does."
                ),
            ));
        }
        if message.contains("No such file or directory") || message.contains("Connection refused") {
            return Some(explanation(
                "LibvirtNotRunning",
                format!("no libvirt daemon listens on {path}{at}."),
                "start it (`systemctl start libvirtd`, or virtqemud where libvirt runs modular daemons), or fix the socket path in the URI; `virsh -c URI list` checks a URI by hand.",
            ));
        }
    }
    let remote = [
        "unable to connect to server",
        "No route to host",
        "Name or service not known",
        "Connection timed out",
        "Temporary failure in name resolution",
    ];
    if remote.iter().any(|m| message.contains(m)) {
        return Some(explanation(
            "LibvirtUnreachable",
            format!("the libvirt URI{at} names a host or port where nothing answers."),
            "check the host name and port in the URI, that the remote libvirtd listens there (listen_tcp or listen_tls in libvirtd.conf, or virtproxyd's sockets), and that no firewall drops the connection; `virsh -c URI list` checks a URI by hand.",
        ));
    }
    None
}

fn libvirt(call: &str, error: &LibvirtError) -> Option<Explanation> {
    let message = error.message.as_str();
    let code = |c: u32| error.code == c as i32;
    if message.contains("migrate guest to the same host") {
        return Some(explanation(
            "SameHostMigration",
            "the destination of the migration answered as the source's own libvirtd (the same host UUID): from inside a daemon, `qemu:///…` names that daemon itself, whatever its `?socket=`; two daemons on one machine also need their own host_uuid.",
            "give the destination as the source *daemon* reaches it: locally `--p2p-uri NODE=qemu+unix:///system?socket=PATH` (or qemu+tcp/qemu+tls for another machine), in a cluster the target HypervisorNode's libvirtPeerUri (the agent's --libvirt-peer-uri, chart value agent.migration.libvirtPeerUri); virtkube derives `qemu+unix://` itself for a `qemu:///…?socket=` destination. On cloned machines, set a distinct host_uuid in libvirtd.conf.",
        ));
    }
    if let Some(e) = connect_failure(None, message) {
        return Some(e);
    }
    if code(sys::VIR_ERR_NO_NETWORK) || message.contains("Network not found") {
        let name = quoted(message).unwrap_or("it");
        return Some(explanation(
            "NetworkMissing",
            format!(
                "the guest's interface names network {name}, which does not exist on this node."
            ),
            "create a Network of that name selected for this node (its nodeSelector matches the node's HypervisorNode labels), or correct spec.interfaces[].network.",
        ));
    }
    if message.contains("network") && message.contains("is not active") {
        let name = quoted(message).unwrap_or("it");
        return Some(explanation(
            "NetworkInactive",
            format!("network {name} exists on this node but is stopped."),
            format!(
                "start it (`virsh net-start {name}`, and `virsh net-autostart {name}` to keep it), or let virtkube manage it through a Network resource."
            ),
        ));
    }
    if code(sys::VIR_ERR_NO_STORAGE_POOL) || message.contains("Storage pool not found") {
        let name = quoted(message).unwrap_or("it");
        return Some(explanation(
            "PoolMissing",
            format!("storage pool {name} does not exist on this node."),
            "create a StoragePool of that name selected for this node (its nodeSelector matches the node's HypervisorNode labels), or correct the Volume's spec.pool.",
        ));
    }
    if let Some(e) = storage_backend(call, message) {
        return Some(e);
    }
    if message.contains("cannot set CPU affinity")
        || message.contains("exceed the maxcpu")
        || (message.contains("cpuset.cpus") && message.contains("Invalid"))
    {
        return Some(explanation(
            "PinnedCpuMissing",
            "a pin (spec.cpu.pinning or emulatorCpuset) names a host CPU this node does not have online.",
            "pin only to the node's CPUs: HypervisorNode status.cpu.count or `virsh nodeinfo` says how many, `lscpu -e` which are online.",
        ));
    }
    if code(sys::VIR_ERR_DOM_EXIST)
        || code(sys::VIR_ERR_NETWORK_EXIST)
        || code(sys::VIR_ERR_STORAGE_VOL_EXIST)
        || message.contains("already exists")
        || message.contains("exists already")
    {
        return Some(name_clash(quoted(message).unwrap_or("the object")));
    }
    None
}

/// What the node lacks (or refuses) for a pool type beyond `dir`: LVM's tools, the kernel's
/// device-mapper, the NFS client, a device free of data to build on, a libvirt backend.
fn storage_backend(call: &str, message: &str) -> Option<Explanation> {
    let pool_call = call.starts_with("pool_");
    let lvm_tool = [
        "/sbin/vgcreate",
        "/sbin/pvs",
        "/sbin/pvcreate",
        "/sbin/vgchange",
        "/sbin/lvs",
        "/sbin/lvcreate",
        "/sbin/vgs",
    ];
    if message.contains("cannot execute binary") && lvm_tool.iter().any(|b| message.contains(b)) {
        return Some(explanation(
            "LvmMissing",
            "a logical pool needs LVM's tools (pvcreate, vgcreate, lvcreate, …) on the node, and they are not installed.",
            "install them on every node the StoragePool selects (Debian and Ubuntu: `apt-get install lvm2`); the agent's image needs them too when libvirtd runs in it.",
        ));
    }
    if message.contains("device-mapper") || message.contains("/dev/mapper/control") {
        return Some(explanation(
            "DeviceMapperMissing",
            "the node's kernel has no device-mapper (CONFIG_BLK_DEV_DM), so LVM can make and start the volume group but cannot create or activate any logical volume: no volume can live in a logical pool on this node.",
            "load it (`modprobe dm_mod`) or boot a kernel with device-mapper; until then keep volumes in a dir or fs pool on this node.",
        ));
    }
    if message.contains("lvcreate") && message.contains("insufficient free space") {
        return Some(explanation(
            "VolumeGroupFull",
            "the logical pool's volume group has not enough free extents for the volume (LVM allocates a logical volume whole, whatever is written to it).",
            "make the Volume smaller, free space in the pool (delete a Volume), or add a device to the volume group on the node (`vgextend`); the volume is made at the next reconcile once it fits.",
        ));
    }
    // Only a kernel without the NFS client, as `mount` says it without nfs-common and
    // `mount.nfs` with it. Any other `mount.nfs:` failure (a server that refuses the export
    // or does not answer) is not this, and must stay retryable.
    let nfs_client_missing = message.contains("unknown filesystem type 'nfs")
        || (message.contains("mount.nfs") && message.contains("No such device"));
    if nfs_client_missing {
        return Some(explanation(
            "NfsClientMissing",
            "the node cannot mount NFS: its kernel has no NFS client (`nfs` is not in /proc/filesystems) or the mount.nfs helper is missing.",
            "on every node the StoragePool selects, install the NFS client (`apt-get install nfs-common`) and load the kernel module (`modprobe nfs`); then the pool starts at the next reconcile.",
        ));
    }
    if pool_call && message.contains("unknown filesystem type") {
        return Some(explanation(
            "FilesystemUnsupported",
            format!(
                "the node's kernel cannot mount the fs pool's filesystem ({}): it is not in /proc/filesystems and no module provides it.",
                quoted(message).unwrap_or("spec.source.format")
            ),
            "use a filesystem the node's kernel has (`cat /proc/filesystems`; ext4 and xfs almost everywhere), or load its module on every node the StoragePool selects.",
        ));
    }
    if pool_call && message.contains("wrong fs type, bad option, bad superblock") {
        return Some(explanation(
            "FilesystemMismatch",
            "libvirt could not mount the fs pool's device: it holds no filesystem of spec.source.format (or none at all).",
            "set spec.source.format to the filesystem on the device (`blkid DEVICE` says which), or auto; for an empty device, spec.source.build true makes one.",
        ));
    }
    if message.contains("cannot execute binary") && message.contains("/parted") {
        return Some(explanation(
            "PartedMissing",
            "a disk pool needs GNU parted on the node (libvirt writes the partition table and each partition with it), and it is not installed.",
            "install it on every node the StoragePool selects (Debian and Ubuntu: `apt-get install parted`); the agent's image needs it too when libvirtd runs in it.",
        ));
    }
    if message.contains("does not match the expected format") && !message.contains("already built")
    {
        return Some(explanation(
            "DiskLabelMismatch",
            "the disk pool's device has another partition table than spec.source.format, or none: libvirt starts a disk pool only on the label it was told.",
            "set spec.source.format to the disk's label (`parted DEVICE print` says which: `gpt`, or `msdos` for dos); for an empty disk, spec.source.build true writes one.",
        ));
    }
    if message.contains("no large enough free extent") {
        return Some(explanation(
            "DiskFull",
            "the disk pool's disk has no free stretch large enough for the volume: a partition is one contiguous extent, so space freed between partitions counts only when it is that large.",
            "make the Volume smaller, or delete Volumes in the pool (their partitions' space is free again); the volume is made at the next reconcile once it fits.",
        ));
    }
    if message.contains("Storage source conflict with pool") {
        return Some(explanation(
            "PoolSourceInUse",
            "another libvirt pool on the node already uses this source (the same device, volume group or export); libvirt allows one pool per source.",
            "use the existing pool, or point this StoragePool at another device (`virsh pool-list --all` and `pool-dumpxml` show which pool has it).",
        ));
    }
    if message.contains("already formatted")
        || (message.contains("Storage pool already built") && pool_call)
    {
        return Some(explanation(
            "DeviceNotEmpty",
            "source.build makes a volume group or filesystem only on an empty device, and this one already holds data (a filesystem, a partition table or an LVM label); virtkube never overwrites a device.",
            "if what is on the device is the volume group or filesystem the pool should use, set source.build false (the pool then uses it as it is); otherwise clear the device yourself (`wipefs`) after making sure its data is not needed.",
        ));
    }
    if message.contains("missing backend for pool type")
        || (pool_call && message.contains("missing storage pool source"))
    {
        return Some(explanation(
            "PoolTypeUnsupported",
            "virtkube carries out `dir`, `fs`, `netfs`, `logical` and `disk` pools; `iscsi` and `rbd` are accepted by the API but not carried out (a missing backend means libvirt's storage driver for that type is not installed on the node).",
            "use one of the supported types; for a network share, a netfs pool or a dir pool on a mount present on every node (with spec.shared true).",
        ));
    }
    None
}

fn name_clash(name: &str) -> Explanation {
    explanation(
        "NameClash",
        format!(
            "libvirt already has {name}, and it is not this resource's: virtkube never adopts or overwrites what it did not create (namespaced resources are named <namespace>.<name> in libvirt)."
        ),
        "rename the resource, or remove the other libvirt object if it is left over (`virsh undefine`, `net-undefine`, `pool-undefine` or `vol-delete` with its name).",
    )
}

/// virtkube's explanation of `error`, when it is one a user causes and libvirt words
/// obscurely (or virtkube's own refusal needs a next step).
pub fn explain(error: &EngineError) -> Option<Explanation> {
    match error {
        EngineError::Libvirt { call, error } => libvirt(call, error),
        EngineError::Migration { cause, .. } => explain(cause),
        EngineError::ConnectionLost { uri, message } => connect_failure(Some(uri), message),
        EngineError::NotFound {
            kind: ObjectKind::Pool,
            name,
            ..
        } => libvirt(
            "",
            &LibvirtError {
                code: sys::VIR_ERR_NO_STORAGE_POOL as i32,
                domain: 0,
                message: format!("Storage pool not found: '{name}'"),
                code_name: String::new(),
                domain_name: String::new(),
            },
        ),
        EngineError::NotFound {
            kind: ObjectKind::Network,
            name,
            ..
        } => libvirt(
            "",
            &LibvirtError {
                code: sys::VIR_ERR_NO_NETWORK as i32,
                domain: 0,
                message: format!("Network not found: '{name}'"),
                code_name: String::new(),
                domain_name: String::new(),
            },
        ),
        EngineError::NotOwned { name, .. } => Some(name_clash(name)),
        EngineError::InvalidSpec(text) if text.contains("but the host has") => Some(explanation(
            "PinnedCpuMissing",
            "a pin (spec.cpu.pinning or emulatorCpuset) names a host CPU this node does not have.",
            "pin only to the node's CPUs: HypervisorNode status.cpu.count or `virsh nodeinfo` says how many, `lscpu -e` which are online.",
        )),
        EngineError::InvalidSpec(text) if text.contains("pool type") => Some(explanation(
            "PoolTypeUnsupported",
            "virtkube carries out `dir`, `fs`, `netfs`, `logical` and `disk` pools; `iscsi` and `rbd` are accepted by the API but not carried out.",
            "use one of the supported types; for a network share, a netfs pool or a dir pool on a mount present on every node (with spec.shared true).",
        )),
        _ => None,
    }
}

/// Whether `error` is one of the explained situations no retry can fix (libvirt reports some
/// of them as internal errors, which would otherwise count as retryable): a migration to the
/// source itself, a pool type virtkube does not carry out, what the node lacks for a pool
/// type (LVM, device-mapper, the NFS client), a device holding data that a build would
/// overwrite.
pub(crate) fn is_permanent(error: &EngineError) -> bool {
    explain(error).is_some_and(|e| {
        matches!(
            e.id,
            "SameHostMigration"
                | "PoolTypeUnsupported"
                | "LvmMissing"
                | "DeviceMapperMissing"
                | "NfsClientMissing"
                | "FilesystemUnsupported"
                | "FilesystemMismatch"
                | "DeviceNotEmpty"
                | "PartedMissing"
                | "DiskLabelMismatch"
                | "PoolSourceInUse"
        )
    })
}

/// ` — virtkube: … Next: …` when `error` has an explanation, else nothing: what the
/// engine's error messages end with.
pub(crate) fn beside(error: &EngineError) -> String {
    explain(error)
        .map(|e| format!(" — {e}"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peer_uri_is_derived_only_for_local_socket_uris() {
        assert_eq!(
            peer_uri_for("qemu:///system?socket=/tmp/B/sock/libvirt-sock").as_deref(),
            Some("qemu+unix:///system?socket=/tmp/B/sock/libvirt-sock")
        );
        assert_eq!(
            peer_uri_for("qemu:///session?mode=legacy&socket=/s").as_deref(),
            Some("qemu+unix:///session?mode=legacy&socket=/s")
        );
        for uri in [
            "qemu:///system",
            "qemu+unix:///system?socket=/s",
            "qemu+tcp://node-b/system",
            "qemu:///embed?root=/tmp/x",
            "test:///default",
        ] {
            assert_eq!(peer_uri_for(uri), None, "{uri}");
        }
    }

    fn libvirt_said(call: &'static str, message: &str) -> EngineError {
        EngineError::Libvirt {
            call,
            error: LibvirtError {
                code: 1,
                domain: 18,
                message: message.into(),
                code_name: String::new(),
                domain_name: String::new(),
            },
        }
    }

    #[test]
    fn disk_pool_failures_seen_on_libvirt_9_are_explained() {
        // libvirt 9.0's words, seen in the kernel VM on a scsi_debug disk.
        for (call, message, id) in [
            (
                "pool_start",
                "Requested operation is not valid: Format of device '/dev/sdb' does not match the expected format 'dos'",
                "DiskLabelMismatch",
            ),
            (
                "pool_build",
                "Storage pool already built: Format of device '/dev/sdb' does not match the expected format 'dos', forced overwrite is necessary",
                "DeviceNotEmpty",
            ),
            (
                "pool_build",
                "Storage pool already built: Device '/dev/sda' already formatted using 'gpt'",
                "DeviceNotEmpty",
            ),
            (
                "volume_create",
                "internal error: no large enough free extent",
                "DiskFull",
            ),
            (
                "pool_define",
                "operation failed: Storage source conflict with pool: 'dq'",
                "PoolSourceInUse",
            ),
        ] {
            let error = libvirt_said(call, message);
            assert_eq!(explain(&error).map(|e| e.id), Some(id), "{message}");
        }
        assert!(!is_permanent(&libvirt_said(
            "volume_create",
            "internal error: no large enough free extent"
        )));
        assert!(is_permanent(&libvirt_said(
            "pool_start",
            "Requested operation is not valid: Format of device '/dev/sdb' does not match the expected format 'dos'"
        )));
    }

    #[test]
    fn quoted_parts_are_read_from_libvirt_messages() {
        assert_eq!(
            quoted("Failed to connect socket to '/x/sock': Permission denied"),
            Some("/x/sock")
        );
        assert_eq!(quoted("no quotes"), None);
    }
}
