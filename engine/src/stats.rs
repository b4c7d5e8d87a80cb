//! Run-time statistics of virtkube's domains in one bulk call (`virConnectGetAllDomainStats`):
//! state, CPU time, vCPUs, memory (balloon), and per-disk and per-NIC bytes and operations.
//!
//! One libvirt call per gather, whatever the number of domains: the ownership mark of each
//! domain (its namespace and name) is read once per domain UUID and remembered (a UUID never
//! moves to another domain), so a steady set of domains costs exactly the bulk call. Only
//! domains carrying virtkube's mark are returned, at most [`StatsLimits::max_domains`] of
//! them and [`StatsLimits::max_devices`] disks and NICs each: that bounds what a metrics
//! exporter built on it can emit.

use std::collections::HashMap;
use std::os::raw::{c_char, c_uint};
use std::sync::{Arc, Mutex};

use virt::domain::Domain;
use virt::sys;

use crate::engine::{CallClass, Engine};
use crate::error::{EngineError, Result};
use crate::model::Owner;
use crate::model::stats::DomainStatsRecord;
use crate::typed_params;

/// Bounds on one gather.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatsLimits {
    /// virtkube-owned domains returned at most (the first ones by namespace and name).
    pub max_domains: usize,
    /// Disks, and NICs, per domain at most.
    pub max_devices: usize,
}

impl Default for StatsLimits {
    /// 1,000 domains, 64 devices of each kind (the Domain API's own limit on disks).
    fn default() -> Self {
        Self {
            max_domains: 1000,
            max_devices: 64,
        }
    }
}

/// One virtkube-owned domain's statistics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedDomainStats {
    /// libvirt name.
    pub name: String,
    /// libvirt UUID.
    pub uuid: String,
    /// The ownership mark (namespace and name of the resource).
    pub owner: Owner,
    /// The counters.
    pub stats: DomainStatsRecord,
}

/// The outcome of one gather.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsBatch {
    /// virtkube's domains, sorted by owner namespace and name.
    pub domains: Vec<OwnedDomainStats>,
    /// Domains libvirt reported that carry no virtkube mark (left out).
    pub unowned: usize,
    /// virtkube's domains left out by [`StatsLimits::max_domains`].
    pub dropped: usize,
    /// Ownership marks read in this gather (domains not seen before); zero when the set of
    /// domains did not change.
    pub owner_reads: usize,
}

/// The ownership mark of each domain UUID seen by earlier gathers (`None`: no mark).
#[derive(Clone, Default)]
pub(crate) struct OwnerMemo(Arc<Mutex<HashMap<String, Option<Owner>>>>);

/// Frees libvirt's record list however the gather ends.
struct RecordList(*mut sys::virDomainStatsRecordPtr);

impl Drop for RecordList {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: the list came from virConnectGetAllDomainStats and is freed once.
            unsafe { sys::virDomainStatsRecordListFree(self.0) };
        }
    }
}

/// The UUID and name of a domain pointer owned by a record.
///
/// # Safety
/// `dom` must be a valid domain pointer.
unsafe fn identity(dom: sys::virDomainPtr) -> Option<(String, String)> {
    let mut buf = [0 as c_char; sys::VIR_UUID_STRING_BUFLEN as usize];
    // SAFETY: the buffer has libvirt's documented length.
    if unsafe { sys::virDomainGetUUIDString(dom, buf.as_mut_ptr()) } < 0 {
        return None;
    }
    // SAFETY: libvirt NUL-terminates the UUID string; the name belongs to `dom`.
    let uuid = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    let name = unsafe { sys::virDomainGetName(dom) };
    if name.is_null() {
        return None;
    }
    // SAFETY: non-null, NUL-terminated, valid while `dom` is.
    let name = unsafe { std::ffi::CStr::from_ptr(name) }
        .to_string_lossy()
        .into_owned();
    Some((uuid, name))
}

/// Reads the mark of a record's domain through a reference of its own.
///
/// # Safety
/// `dom` must be a valid domain pointer.
unsafe fn read_mark(dom: sys::virDomainPtr, call: &'static str) -> Result<Option<Owner>> {
    // SAFETY: the extra reference is released when `domain` drops; the record keeps its own.
    if unsafe { sys::virDomainRef(dom) } < 0 {
        return Err(EngineError::libvirt(call, virt::error::Error::last_error()));
    }
    let domain = unsafe { Domain::from_ptr(dom) };
    crate::domain::read_owner(&domain, call)
}

impl Engine {
    /// Statistics of every virtkube-owned domain in one `virConnectGetAllDomainStats` call
    /// (state, CPU, vCPU, balloon, interface and block groups; `NOWAIT`: a domain busy with
    /// a job reports what it can instead of stalling the gather). Bounded by `limits`.
    pub async fn domain_stats(&self, limits: StatsLimits) -> Result<StatsBatch> {
        let memo = self.owner_memo();
        self.call(CallClass::Query, "domain_stats", move |c| {
            const CALL: &str = "domain_stats";
            let groups = sys::VIR_DOMAIN_STATS_STATE
                | sys::VIR_DOMAIN_STATS_CPU_TOTAL
                | sys::VIR_DOMAIN_STATS_BALLOON
                | sys::VIR_DOMAIN_STATS_VCPU
                | sys::VIR_DOMAIN_STATS_INTERFACE
                | sys::VIR_DOMAIN_STATS_BLOCK;
            let mut raw: *mut sys::virDomainStatsRecordPtr = std::ptr::null_mut();
            // SAFETY: valid connection; libvirt allocates the list, freed by RecordList.
            let n = unsafe {
                sys::virConnectGetAllDomainStats(
                    c.as_ptr(),
                    groups as c_uint,
                    &mut raw,
                    sys::VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT as c_uint,
                )
            };
            let list = RecordList(raw);
            if n < 0 {
                return Err(EngineError::libvirt(CALL, virt::error::Error::last_error()));
            }
            let mut memo = memo
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut seen = HashMap::with_capacity(n as usize);
            let mut batch = StatsBatch::default();
            for i in 0..n as usize {
                // SAFETY: libvirt returned `n` records.
                let rec = unsafe { &**list.0.add(i) };
                let Some((uuid, name)) = (unsafe { identity(rec.dom) }) else {
                    continue;
                };
                let owner = match memo.get(&uuid) {
                    Some(known) => known.clone(),
                    None => {
                        batch.owner_reads += 1;
                        // SAFETY: the record's domain pointer is valid.
                        match unsafe { read_mark(rec.dom, CALL) } {
                            Ok(mark) => mark,
                            // Gone meanwhile, or unreadable: left out, asked again next time.
                            Err(_) => continue,
                        }
                    }
                };
                seen.insert(uuid.clone(), owner.clone());
                let Some(owner) = owner else {
                    batch.unowned += 1;
                    continue;
                };
                // SAFETY: `params` holds `nparams` parameters owned by the record.
                let params = unsafe {
                    typed_params::read(rec.params, usize::try_from(rec.nparams).unwrap_or(0))
                };
                batch.domains.push(OwnedDomainStats {
                    name,
                    uuid,
                    owner,
                    stats: DomainStatsRecord::from_params(&params, limits.max_devices),
                });
            }
            // Forget domains that are gone, so the memo stays as large as the host's set.
            *memo = seen;
            batch.domains.sort_by(|a, b| {
                (&a.owner.namespace, &a.owner.name).cmp(&(&b.owner.namespace, &b.owner.name))
            });
            batch.dropped = batch.domains.len().saturating_sub(limits.max_domains);
            batch.domains.truncate(limits.max_domains);
            Ok(batch)
        })
        .await
    }
}
