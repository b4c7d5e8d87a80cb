//! Live migration (peer-to-peer), its progress, and cancelling it.

use std::os::raw::{c_int, c_uint};
use std::time::{Duration, Instant};

use virt::connect::Connect;
use virt::domain::{Domain, MigrateParameters};
use virt::sys;

use crate::domain::{lookup, lookup_owned};
use crate::engine::{CallClass, Engine};
use crate::error::{EngineError, Result, lv};
use crate::model::Owner;

/// How to migrate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateOptions {
    /// The destination libvirtd as the *source libvirtd* reaches it (peer-to-peer), e.g.
    /// `qemu+tcp://node-b/system` or `qemu+unix:///system?socket=/path/B/libvirt-sock`.
    pub dest_uri: String,
    /// Explicit migration data URI (`tcp://10.99.0.2:49152`); libvirt derives one from the
    /// destination's `migration_host` when `None`.
    pub migrate_uri: Option<String>,
    /// Keep the guest running during the copy.
    pub live: bool,
    /// Define the domain persistently on the destination.
    pub persistent: bool,
    /// Undefine it on the source afterwards.
    pub undefine_source: bool,
    /// Throttle vCPUs if memory is dirtied faster than it is copied.
    pub auto_converge: bool,
    /// Copy disks too (storage not shared between the hosts): libvirt creates a volume of
    /// the same name in the destination's pool of the same name and QEMU mirrors the disk
    /// into it during the migration.
    pub copy_storage: bool,
    /// With `copy_storage`: the guest devices (`vda`, …) to copy, libvirt's `migrate_disks`.
    /// Empty copies every writable disk libvirt does not consider shared, including a file
    /// that both hosts see at the same path (a network mount): name the disks.
    pub copy_disks: Vec<String>,
    /// Max downtime in ms at switch-over.
    pub max_downtime_ms: Option<u64>,
    /// Bandwidth cap in MiB/s.
    pub bandwidth_mib_s: Option<u64>,
    /// Restore the source's autostart flag on the destination (libvirt drops it). Needs
    /// `dest_client_uri` or a `dest_uri` this process can open itself.
    pub restore_autostart: bool,
    /// The URI *this process* uses to reach the destination (to restore autostart and read
    /// the completed job's statistics); `dest_uri` when `None`.
    pub dest_client_uri: Option<String>,
    /// Encrypt the migration stream (memory and, with `copy_storage`, disks) with TLS
    /// (`VIR_MIGRATE_TLS`). Both daemons need x509 certificates for QEMU
    /// (`migrate_tls_x509_cert_dir`, else `default_tls_x509_cert_dir`, in qemu.conf); libvirt
    /// refuses the migration otherwise, and the guest stays on the source.
    pub tls: bool,
}

impl MigrateOptions {
    /// Live, persistent on the destination, undefined on the source, autostart restored.
    pub fn live_to(dest_uri: impl Into<String>) -> Self {
        Self {
            dest_uri: dest_uri.into(),
            migrate_uri: None,
            live: true,
            persistent: true,
            undefine_source: true,
            auto_converge: false,
            copy_storage: false,
            copy_disks: Vec::new(),
            max_downtime_ms: None,
            bandwidth_mib_s: None,
            restore_autostart: true,
            dest_client_uri: None,
            tls: false,
        }
    }

    /// libvirt migrate flags (always peer-to-peer).
    pub fn flags(&self) -> u32 {
        let mut f = sys::VIR_MIGRATE_PEER2PEER;
        if self.live {
            f |= sys::VIR_MIGRATE_LIVE;
        }
        if self.persistent {
            f |= sys::VIR_MIGRATE_PERSIST_DEST;
        }
        if self.undefine_source {
            f |= sys::VIR_MIGRATE_UNDEFINE_SOURCE;
        }
        if self.auto_converge {
            f |= sys::VIR_MIGRATE_AUTO_CONVERGE;
        }
        if self.copy_storage {
            f |= sys::VIR_MIGRATE_NON_SHARED_DISK;
        }
        if self.tls {
            f |= sys::VIR_MIGRATE_TLS;
        }
        f
    }
}

/// What a finished migration reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationOutcome {
    /// Wall time of the migration call.
    pub elapsed: Duration,
    /// Downtime at switch-over, ms (from the destination's completed job stats).
    pub downtime_ms: Option<u64>,
    /// Bytes transferred.
    pub data_total: Option<u64>,
    /// The source's autostart flag before migrating.
    pub autostart: bool,
    /// Whether the engine set autostart on the destination.
    pub autostart_restored: bool,
    /// The destination URI the source libvirtd was given.
    pub peer_uri: String,
    /// Whether the engine derived `peer_uri` from a `qemu:///…?socket=` destination
    /// ([`crate::explain::peer_uri_for`]), which inside a daemon would name the source itself.
    pub peer_uri_derived: bool,
}

/// A running (or just completed) job's progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobProgress {
    /// `virDomainJobType` (1 bounded, 2 unbounded, 3 completed, 4 failed, 5 cancelled).
    pub job_type: i32,
    /// `virDomainJobOperation` (migration out = 3…).
    pub operation: Option<i32>,
    /// Elapsed, ms.
    pub elapsed_ms: Option<u64>,
    /// Total bytes to move.
    pub data_total: Option<u64>,
    /// Bytes moved.
    pub data_processed: Option<u64>,
    /// Bytes left.
    pub data_remaining: Option<u64>,
    /// Memory transfer rate, bytes/s.
    pub mem_bps: Option<u64>,
    /// Downtime (completed job), ms.
    pub downtime_ms: Option<u64>,
    /// Memory copy iteration (pre-copy passes so far).
    pub iteration: Option<u64>,
}

impl JobProgress {
    /// Whether this is an outbound migration (this host is the source).
    pub fn is_migration_out(&self) -> bool {
        self.operation == Some(sys::VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT as i32)
    }

    /// Whether this is an inbound migration (this host is the destination).
    pub fn is_migration_in(&self) -> bool {
        self.operation == Some(sys::VIR_DOMAIN_JOB_OPERATION_MIGRATION_IN as i32)
    }

    /// Percent of the data moved (0-100), when libvirt reports both totals.
    pub fn percent(&self) -> Option<u32> {
        let (done, total) = (self.data_processed?, self.data_total?);
        if total == 0 {
            return None;
        }
        Some(((done.min(total) as u128 * 100) / total as u128) as u32)
    }
}

/// `virDomainGetJobStats` read directly: `virt`'s wrapper builds a `Vec` from libvirt's
/// allocation (a null pointer when there is no job, and a buffer Rust must not free).
pub(crate) fn job_stats(
    dom: &Domain,
    call: &'static str,
    flags: u32,
) -> Result<Option<JobProgress>> {
    let mut job_type: c_int = 0;
    let mut params: sys::virTypedParameterPtr = std::ptr::null_mut();
    let mut n: c_int = 0;
    // SAFETY: out-parameters are valid; libvirt allocates `params`, freed below.
    let r = unsafe {
        sys::virDomainGetJobStats(
            dom.as_ptr(),
            &mut job_type,
            &mut params,
            &mut n,
            flags as c_uint,
        )
    };
    if r < 0 {
        return Err(EngineError::libvirt(call, virt::error::Error::last_error()));
    }
    let ull = |name: &std::ffi::CStr| -> Option<u64> {
        let mut v: u64 = 0;
        // SAFETY: params/n come from libvirt; a null params with n == 0 finds nothing.
        let found = unsafe { sys::virTypedParamsGetULLong(params, n, name.as_ptr(), &mut v) };
        (found == 1).then_some(v)
    };
    let int = |name: &std::ffi::CStr| -> Option<i32> {
        let mut v: c_int = 0;
        // SAFETY: as above.
        let found = unsafe { sys::virTypedParamsGetInt(params, n, name.as_ptr(), &mut v) };
        (found == 1).then_some(v)
    };
    let out = (job_type != 0).then(|| JobProgress {
        job_type,
        operation: int(sys::VIR_DOMAIN_JOB_OPERATION),
        elapsed_ms: ull(sys::VIR_DOMAIN_JOB_TIME_ELAPSED),
        data_total: ull(sys::VIR_DOMAIN_JOB_DATA_TOTAL),
        data_processed: ull(sys::VIR_DOMAIN_JOB_DATA_PROCESSED),
        data_remaining: ull(sys::VIR_DOMAIN_JOB_DATA_REMAINING),
        mem_bps: ull(sys::VIR_DOMAIN_JOB_MEMORY_BPS),
        iteration: ull(sys::VIR_DOMAIN_JOB_MEMORY_ITERATION),
        downtime_ms: ull(sys::VIR_DOMAIN_JOB_DOWNTIME),
    });
    if !params.is_null() {
        // SAFETY: frees libvirt's allocation exactly once.
        unsafe { sys::virTypedParamsFree(params, n) };
    }
    Ok(out)
}

/// Closes a short-lived connection without `Connect`'s panicking `Drop`.
fn close_quietly(conn: Connect) {
    let conn = std::mem::ManuallyDrop::new(conn);
    // SAFETY: we own this reference and never use `conn` again.
    if unsafe { sys::virConnectClose(conn.as_ptr()) } < 0 {
        tracing::warn!("closing the destination connection failed");
    }
}

impl Engine {
    /// Live-migrates a domain peer-to-peer to `opts.dest_uri`, then (optionally) restores its
    /// autostart flag on the destination. Pinning travels with the domain XML.
    pub async fn domain_migrate(
        &self,
        name: &str,
        owner: &Owner,
        opts: &MigrateOptions,
    ) -> Result<MigrationOutcome> {
        let (name, owner, opts) = (name.to_string(), owner.clone(), opts.clone());
        let cache = self.owned_cache();
        self.call(CallClass::Migrate, "domain_migrate", move |c| {
            const CALL: &str = "domain_migrate";
            let dom = lookup_owned(c, CALL, &name, &owner, &cache)?;
            let autostart = dom.is_persistent().unwrap_or(false) && dom.autostart().unwrap_or(false);
            if let Some(ms) = opts.max_downtime_ms {
                dom.migrate_set_max_downtime(ms, 0).map_err(lv(CALL))?;
            }
            let params = MigrateParameters {
                uri: opts.migrate_uri.clone(),
                bandwidth: opts.bandwidth_mib_s,
                migrate_disks: if opts.copy_storage {
                    opts.copy_disks.clone()
                } else {
                    Vec::new()
                },
                ..Default::default()
            };
            // Inside the source daemon, `qemu:///…?socket=` names that daemon itself.
            let derived = crate::explain::peer_uri_for(&opts.dest_uri);
            let peer_uri = derived.clone().unwrap_or_else(|| opts.dest_uri.clone());
            if derived.is_some() {
                tracing::info!(given = %opts.dest_uri, used = %peer_uri, "peer URI derived for the source libvirtd");
            }
            let t0 = Instant::now();
            dom.migrate_to_uri3(Some(&peer_uri), params, opts.flags())
                .map_err(|e| EngineError::Migration {
                    dest_uri: peer_uri.clone(),
                    cause: Box::new(EngineError::libvirt(CALL, e)),
                })?;
            let elapsed = t0.elapsed();
            let mut outcome = MigrationOutcome {
                elapsed,
                downtime_ms: None,
                data_total: None,
                autostart,
                autostart_restored: false,
                peer_uri,
                peer_uri_derived: derived.is_some(),
            };
            let client_uri = opts.dest_client_uri.as_deref().unwrap_or(&opts.dest_uri);
            match Connect::open(Some(client_uri)) {
                Ok(dest) => {
                    if let Ok(ddom) = dest.lookup_domain_by_name(&name) {
                        if let Ok(Some(s)) =
                            job_stats(&ddom, CALL, sys::VIR_DOMAIN_JOB_STATS_COMPLETED)
                        {
                            outcome.downtime_ms = s.downtime_ms;
                            outcome.data_total = s.data_total;
                        }
                        if opts.restore_autostart && autostart && opts.persistent {
                            match ddom.set_autostart(true) {
                                Ok(_) => outcome.autostart_restored = true,
                                Err(e) => tracing::warn!(error = %e, domain = %name, "could not restore autostart on the destination"),
                            }
                        }
                    }
                    close_quietly(dest);
                }
                Err(e) => {
                    tracing::warn!(error = %e, uri = client_uri, "destination not reachable from this process: autostart not restored");
                }
            }
            Ok(outcome)
        })
        .await
    }

    /// Live-migrates like [`Engine::domain_migrate`], and meanwhile reads the job's
    /// statistics every `every` and sends each reading to `progress` (a watch channel: a slow
    /// reader sees the latest only). The readings go through a second engine on the same URI:
    /// on the connection that carries the migration, libvirt answers them only when the
    /// migration ends (measured on the private daemons: 4.3 s for the first reading of a
    /// 6.3 s migration, against 0.03–0.17 s on another connection). Readings that fail (the
    /// job not started yet, or just ended) are skipped; without a second connection the
    /// migration runs unobserved.
    pub async fn domain_migrate_with_progress(
        &self,
        name: &str,
        owner: &Owner,
        opts: &MigrateOptions,
        every: Duration,
        progress: &tokio::sync::watch::Sender<Option<JobProgress>>,
    ) -> Result<MigrationOutcome> {
        let monitor = Engine::connect(self.uri(), self.config().clone()).await;
        if let Err(e) = &monitor {
            tracing::warn!(error = %e, "no second connection for migration progress");
        }
        let migration = self.domain_migrate(name, owner, opts);
        let poll = async {
            let Ok(monitor) = &monitor else {
                return std::future::pending().await;
            };
            loop {
                tokio::time::sleep(every).await;
                if let Ok(Some(p)) = monitor.domain_job_progress(name).await
                    && p.is_migration_out()
                {
                    progress.send_replace(Some(p));
                }
            }
        };
        let outcome = tokio::select! {
            outcome = migration => outcome,
            never = poll => never,
        };
        if let Ok(monitor) = monitor
            && let Err(e) = monitor.close().await
        {
            tracing::debug!(error = %e, "closing the progress connection failed");
        }
        outcome
    }

    /// The progress of the domain's current job (`None` when there is none).
    pub async fn domain_job_progress(&self, name: &str) -> Result<Option<JobProgress>> {
        let name = name.to_string();
        self.call(CallClass::Query, "domain_job_progress", move |c| {
            let dom = lookup(c, "domain_job_progress", &name)?;
            job_stats(&dom, "domain_job_progress", 0)
        })
        .await
    }

    /// The statistics of the domain's last completed job (e.g. a migration into this host).
    pub async fn domain_completed_job(&self, name: &str) -> Result<Option<JobProgress>> {
        let name = name.to_string();
        self.call(CallClass::Query, "domain_completed_job", move |c| {
            let dom = lookup(c, "domain_completed_job", &name)?;
            job_stats(
                &dom,
                "domain_completed_job",
                sys::VIR_DOMAIN_JOB_STATS_COMPLETED,
            )
        })
        .await
    }

    /// Cancels the domain's current job (a migration in progress).
    pub async fn domain_abort_job(&self, name: &str, owner: &Owner) -> Result<()> {
        self.owned::<Domain, _, _>(
            CallClass::Lifecycle,
            "domain_abort_job",
            name,
            owner,
            |dom| {
                // SAFETY: valid domain pointer.
                if unsafe { sys::virDomainAbortJob(dom.as_ptr()) } < 0 {
                    return Err(EngineError::libvirt(
                        "domain_abort_job",
                        virt::error::Error::last_error(),
                    ));
                }
                Ok(())
            },
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_adds_libvirts_tls_flag_and_nothing_else() {
        let plain = MigrateOptions::live_to("qemu+tls://b/system");
        assert_eq!(plain.flags() & sys::VIR_MIGRATE_TLS, 0, "off by default");
        let tls = MigrateOptions {
            tls: true,
            ..plain.clone()
        };
        assert_eq!(tls.flags(), plain.flags() | sys::VIR_MIGRATE_TLS);
    }
}
