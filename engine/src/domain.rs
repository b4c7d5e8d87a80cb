//! Domain verbs: define, undefine, start, shutdown (with deadline), destroy, reboot, suspend,
//! resume, managed save, vCPUs, memory, pinning, autostart, state, lookup, list, observe.
//!
//! Every verb that changes a domain takes the expected [`Owner`] and fails with
//! [`EngineError::NotOwned`] when the domain does not carry that owner's mark.

use std::os::raw::{c_int, c_uchar, c_uint};
use std::time::{Duration, Instant};

use virt::connect::Connect;
use virt::domain::{Domain, SchedBandwidth, SchedulerInfo};
use virt::sys;
use virtkube_crds::cpuset::CpuSet;

use crate::engine::{CallClass, Engine, OwnedCache};
use crate::error::{EngineError, ObjectKind, Result, growth, lv};
use crate::model::xml;
use crate::model::{
    CpuTune, DomainDef, DomainObserved, DomainSizes, DomainState, OWNER_NS, Owner, VcpuPin,
    state_reason_name,
};
use crate::object;

/// Where a change applies (libvirt's `VIR_DOMAIN_AFFECT_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Apply {
    /// The running domain if active, otherwise its config (flags 0; the only choice the test
    /// driver accepts for pinning).
    Current,
    /// Only the running domain.
    Live,
    /// Only the persistent config (next boot).
    Config,
    /// Both the running domain and its config.
    LiveAndConfig,
}

impl Apply {
    /// libvirt flags.
    pub fn flags(self) -> u32 {
        match self {
            Apply::Current => sys::VIR_DOMAIN_AFFECT_CURRENT,
            Apply::Live => sys::VIR_DOMAIN_AFFECT_LIVE,
            Apply::Config => sys::VIR_DOMAIN_AFFECT_CONFIG,
            Apply::LiveAndConfig => sys::VIR_DOMAIN_AFFECT_LIVE | sys::VIR_DOMAIN_AFFECT_CONFIG,
        }
    }
}

/// Name and UUID of a domain.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DomainId {
    /// libvirt name.
    pub name: String,
    /// libvirt UUID.
    pub uuid: String,
}

/// State and counters from `virDomainGetInfo` + `virDomainGetState`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainInfo {
    /// State.
    pub state: DomainState,
    /// State reason word.
    pub reason: &'static str,
    /// Max memory, KiB.
    pub max_memory_kib: u64,
    /// Memory, KiB.
    pub memory_kib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// CPU time used, ns.
    pub cpu_time_ns: u64,
}

/// How a graceful shutdown ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownOutcome {
    /// The domain was not running.
    AlreadyOff,
    /// The guest shut down within the deadline.
    Graceful,
    /// The domain was destroyed: the deadline passed (a guest with no OS ignores ACPI), or
    /// the guest could not act on the request (crashed, could not be resumed, or libvirt
    /// refused the request).
    Destroyed,
}

pub(crate) fn lookup(c: &Connect, call: &'static str, name: &str) -> Result<Domain> {
    object::lookup(c, call, name)
}

/// The owner recorded in the domain's `<metadata>`, if any.
pub(crate) fn read_owner(dom: &Domain, call: &'static str) -> Result<Option<Owner>> {
    match dom.metadata(sys::VIR_DOMAIN_METADATA_ELEMENT as i32, Some(OWNER_NS), 0) {
        Ok(text) => {
            let el = xml::parse(&text)?;
            // Asked by namespace URI: whatever prefix libvirt prints, the element is ours.
            Ok(Some(Owner {
                kind: el.get("kind").unwrap_or_default().to_string(),
                uid: el.get("uid").unwrap_or_default().to_string(),
                namespace: el.get("namespace").map(str::to_string),
                name: el.get("name").unwrap_or_default().to_string(),
                generation: el.get_parsed("generation"),
            }))
        }
        Err(e) if e.code().to_raw() == sys::VIR_ERR_NO_DOMAIN_METADATA => Ok(None),
        Err(e) => Err(EngineError::libvirt(call, e)),
    }
}

pub(crate) fn ensure_owned(
    kind: ObjectKind,
    name: &str,
    expected: &Owner,
    found: Option<Owner>,
) -> Result<()> {
    match found {
        Some(f) if f.same_resource(expected) => Ok(()),
        found => Err(EngineError::NotOwned {
            kind,
            name: name.to_string(),
            expected: Box::new(expected.clone()),
            found: found.map(Box::new),
        }),
    }
}

pub(crate) fn lookup_owned(
    c: &Connect,
    call: &'static str,
    name: &str,
    owner: &Owner,
    cache: &OwnedCache,
) -> Result<Domain> {
    object::lookup_owned(c, call, name, owner, cache)
}

pub(crate) fn raw_state(dom: &Domain, call: &'static str) -> Result<(DomainState, i32)> {
    let mut state: c_int = -1;
    let mut reason: c_int = -1;
    // SAFETY: valid domain pointer and out-parameters.
    let r = unsafe { sys::virDomainGetState(dom.as_ptr(), &mut state, &mut reason, 0) };
    if r < 0 {
        return Err(EngineError::libvirt(call, virt::error::Error::last_error()));
    }
    Ok((DomainState::from_raw(state as u32), reason))
}

/// Number of host CPUs as libvirt counts them for cpumaps (`virNodeGetCPUMap`).
pub(crate) fn host_cpu_count(c: &Connect, call: &'static str) -> Result<u32> {
    // SAFETY: valid connection; NULL out-pointers ask only for the count.
    let n =
        unsafe { sys::virNodeGetCPUMap(c.as_ptr(), std::ptr::null_mut(), std::ptr::null_mut(), 0) };
    if n < 0 {
        return Err(EngineError::libvirt(call, virt::error::Error::last_error()));
    }
    Ok(n as u32)
}

fn checked_cpumap(cpuset: &CpuSet, host_cpus: u32) -> Result<Vec<u8>> {
    if cpuset.max() >= host_cpus {
        return Err(EngineError::InvalidSpec(format!(
            "cpuset {cpuset} names CPU {} but the host has {host_cpus} CPUs",
            cpuset.max()
        )));
    }
    Ok(cpuset.to_cpumap(host_cpus))
}

/// Per-vCPU affinity through `virDomainGetVcpuPinInfo` (the `virt` crate has no wrapper).
pub(crate) fn vcpu_pin_info(
    host: u32,
    dom: &Domain,
    call: &'static str,
    flags: u32,
) -> Result<Vec<VcpuPin>> {
    let maplen = host.div_ceil(8).max(1) as usize;
    let max = dom
        .vcpus_flags(sys::VIR_DOMAIN_VCPU_MAXIMUM | flags)
        .or_else(|_| dom.max_vcpus().map(|m| m as u32))
        .map_err(lv(call))?;
    let mut maps = vec![0 as c_uchar; maplen * max as usize];
    // SAFETY: the buffer holds `max` maps of `maplen` bytes.
    let n = unsafe {
        sys::virDomainGetVcpuPinInfo(
            dom.as_ptr(),
            max as c_int,
            maps.as_mut_ptr(),
            maplen as c_int,
            flags as c_uint,
        )
    };
    if n < 0 {
        return Err(EngineError::libvirt(call, virt::error::Error::last_error()));
    }
    Ok((0..n as usize)
        .filter_map(|v| {
            CpuSet::from_cpumap(&maps[v * maplen..(v + 1) * maplen]).map(|cpuset| VcpuPin {
                vcpu: v as u32,
                cpuset,
            })
        })
        .collect())
}

fn emulator_pin_info(c: &Connect, dom: &Domain, call: &'static str, flags: u32) -> Result<CpuSet> {
    let host = host_cpu_count(c, call)?;
    let maplen = host.div_ceil(8).max(1) as usize;
    let mut map = vec![0 as c_uchar; maplen];
    // SAFETY: the buffer holds one map of `maplen` bytes.
    let n = unsafe {
        sys::virDomainGetEmulatorPinInfo(
            dom.as_ptr(),
            map.as_mut_ptr(),
            maplen as c_int,
            flags as c_uint,
        )
    };
    if n < 0 {
        return Err(EngineError::libvirt(call, virt::error::Error::last_error()));
    }
    CpuSet::from_cpumap(&map)
        .ok_or_else(|| EngineError::Internal("libvirt reported an empty emulator cpumap".into()))
}

/// Reads everything the engine observes about one domain.
fn observe(dom: &Domain, host_cpus: u32, call: &'static str) -> Result<DomainObserved> {
    let mut o = DomainObserved::from_xml(&dom.xml_desc(0).map_err(lv(call))?)?;
    let (s, r) = raw_state(dom, call)?;
    o.state = s;
    o.reason = state_reason_name(s, r).to_string();
    o.persistent = dom.is_persistent().map_err(lv(call))?;
    o.autostart = if o.persistent {
        dom.autostart().map_err(lv(call))?
    } else {
        false
    };
    o.has_managed_save = o.persistent && dom.has_managed_save(0).unwrap_or(false);
    o.live_pinning = vcpu_pin_info(host_cpus, dom, call, 0)?;
    // The live XML repeats the definition's `<cputune>` even where QEMU could not apply it
    // (no cgroup `cpu` controller: shares are then silently ignored): what is in force is
    // what the scheduler reports, nothing when it cannot report.
    if s.is_active() && !o.cpu_tune.is_empty() {
        match live_cpu_tune(dom) {
            LiveCpuTune::InForce(tune) => o.cpu_tune = tune,
            LiveCpuTune::Unavailable => o.cpu_tune = CpuTune::default(),
            // Another scheduler (the test driver's `fair`): the XML is all there is.
            LiveCpuTune::OtherScheduler => {}
        }
    }
    // Only a balloon makes the live memory differ from the target (see `config`); reading
    // the definition of every running domain would cost a third more per resync.
    if o.persistent && s.is_active() && o.memballoon {
        o.config = Some(DomainSizes::from_xml(
            &dom.xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)
                .map_err(lv(call))?,
        )?);
    }
    Ok(o)
}

/// What a running domain's scheduler says about its CPU weight and bandwidth.
enum LiveCpuTune {
    /// QEMU's `posix` scheduler: the values in force.
    InForce(CpuTune),
    /// The hypervisor cannot report them (QEMU without the cgroup `cpu` controller): none
    /// is in force.
    Unavailable,
    /// A scheduler without these parameters (the test driver's `fair`).
    OtherScheduler,
}

/// The CPU weight and bandwidth in force for a running domain
/// (`virDomainGetSchedulerParametersFlags`, live).
fn live_cpu_tune(dom: &Domain) -> LiveCpuTune {
    let mut n: c_int = 0;
    // SAFETY: valid domain; libvirt returns an allocated string, freed here.
    let kind = unsafe { sys::virDomainGetSchedulerType(dom.as_ptr(), &mut n) };
    if kind.is_null() {
        return LiveCpuTune::Unavailable;
    }
    // SAFETY: NUL-terminated, allocated by libvirt with malloc and freed once.
    let posix = unsafe { std::ffi::CStr::from_ptr(kind) }.to_bytes() == b"posix";
    unsafe { libc::free(kind.cast()) };
    if !posix {
        return LiveCpuTune::OtherScheduler;
    }
    let mut params: Vec<sys::virTypedParameter> = Vec::with_capacity(n.max(0) as usize);
    // SAFETY: the buffer holds `n` parameters; libvirt sets `n` to how many it filled.
    let r = unsafe {
        sys::virDomainGetSchedulerParametersFlags(
            dom.as_ptr(),
            params.as_mut_ptr(),
            &mut n,
            sys::VIR_DOMAIN_AFFECT_LIVE,
        )
    };
    if r < 0 {
        return LiveCpuTune::Unavailable;
    }
    // SAFETY: libvirt initialised `n` parameters.
    let read = unsafe {
        params.set_len(n.max(0) as usize);
        crate::typed_params::read(params.as_ptr(), params.len())
    };
    // SAFETY: frees the strings libvirt may have put in the parameters (none for these).
    unsafe { sys::virTypedParamsClear(params.as_mut_ptr(), n) };
    let get = |name: &str| crate::typed_params::get(&read, name);
    let u = |name: &str| get(name).and_then(crate::typed_params::ParamValue::as_u64);
    let i = |name: &str| get(name).and_then(crate::typed_params::ParamValue::as_i64);
    LiveCpuTune::InForce(CpuTune {
        shares: u("cpu_shares"),
        period: u("vcpu_period"),
        quota: i("vcpu_quota"),
        global_period: u("global_period"),
        global_quota: i("global_quota"),
        emulator_period: u("emulator_period"),
        emulator_quota: i("emulator_quota"),
    })
}

fn id_of(dom: &Domain, call: &'static str) -> Result<DomainId> {
    Ok(DomainId {
        name: dom.name().map_err(lv(call))?,
        uuid: dom.uuid_string().map_err(lv(call))?,
    })
}

impl Engine {
    /// Defines (or, when it is already virtkube's for the same owner, redefines) a persistent
    /// domain. A domain of that name without the owner's mark is refused.
    pub async fn domain_define(&self, def: &DomainDef) -> Result<DomainId> {
        def.validate().map_err(EngineError::InvalidSpec)?;
        let def = def.clone();
        let cache = self.owned_cache();
        self.call(CallClass::Mutate, "domain_define", move |c| {
            const CALL: &str = "domain_define";
            let mut def = def.clone();
            let existing = object::existing_uuid::<Domain>(c, CALL, &def.name, &def.owner, &cache)?;
            // A redefinition must keep the UUID, or libvirt refuses the name clash.
            if def.uuid.is_none() {
                def.uuid = existing;
            }
            let dom = c.define_domain_xml(&def.to_xml()).map_err(lv(CALL))?;
            let id = id_of(&dom, CALL)?;
            cache.insert(ObjectKind::Domain, &id.uuid, &def.owner);
            Ok(id)
        })
        .await
    }

    /// Undefines a domain, removing its managed-save image, snapshot metadata and (EFI) NVRAM
    /// file. A running
    /// domain keeps running as a transient one (destroy it first to remove it entirely).
    pub async fn domain_undefine(&self, name: &str, owner: &Owner) -> Result<()> {
        let cache = self.owned_cache();
        self.owned::<Domain, _, _>(
            CallClass::Mutate,
            "domain_undefine",
            name,
            owner,
            move |dom| {
                let mut flags = sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                    | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA;
                // An EFI domain's NVRAM file blocks the undefine unless removed with it.
                let config = dom
                    .xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)
                    .map_err(lv("domain_undefine"))?;
                if config.contains("<nvram") {
                    flags |= sys::VIR_DOMAIN_UNDEFINE_NVRAM;
                }
                dom.undefine_flags(flags).map_err(lv("domain_undefine"))?;
                if let Ok(uuid) = dom.uuid_string() {
                    cache.forget(ObjectKind::Domain, &uuid);
                }
                Ok(())
            },
        )
        .await
    }

    /// Starts a defined domain (from its managed-save image when one exists), and removes
    /// the "first start owed" note ([`crate::model::START_NS`]) from its definition and
    /// the running guest: from now on, a shut-off domain has stopped, not "never started".
    pub async fn domain_start(&self, name: &str, owner: &Owner) -> Result<()> {
        self.owned::<Domain, _, _>(CallClass::Lifecycle, "domain_start", name, owner, |dom| {
            const CALL: &str = "domain_start";
            dom.create().map_err(lv(CALL))?;
            let noted = dom
                .xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)
                .map(|x| x.contains(crate::model::START_NS))
                .unwrap_or(false);
            if noted {
                // The start happened; a note left behind would only make a later stop of a
                // `Manual` guest look like a start still owed, so a failure is logged, not
                // returned (returning it would have the caller start a running guest).
                let flags = sys::VIR_DOMAIN_AFFECT_LIVE | sys::VIR_DOMAIN_AFFECT_CONFIG;
                if let Err(e) = dom.set_metadata(
                    sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
                    None,
                    None,
                    Some(crate::model::START_NS),
                    flags,
                ) {
                    tracing::warn!(domain = %dom.name().unwrap_or_default(), error = %e, "the first-start note could not be removed");
                }
            }
            Ok(())
        })
        .await
    }

    /// Asks the guest to shut down (ACPI) and waits up to `deadline`; then destroys it.
    ///
    /// A paused guest is resumed first and a suspended-to-RAM one woken up, because a guest
    /// whose vCPUs do not run cannot act on the request (libvirt would accept it and nothing
    /// would happen until the deadline). A crashed guest, one that cannot be resumed, and
    /// one whose shutdown request libvirt refuses are destroyed at once.
    pub async fn domain_shutdown(
        &self,
        name: &str,
        owner: &Owner,
        deadline: Duration,
    ) -> Result<ShutdownOutcome> {
        let first = self
            .owned::<Domain, _, _>(
                CallClass::Lifecycle,
                "domain_shutdown",
                name,
                owner,
                |dom| {
                    const CALL: &str = "domain_shutdown";
                    let (state, _) = raw_state(dom, CALL)?;
                    let ready = match state {
                        s if !s.is_active() => return Ok(Some(ShutdownOutcome::AlreadyOff)),
                        DomainState::Crashed => false,
                        DomainState::Paused => dom.resume().is_ok(),
                        DomainState::PmSuspended => dom.pm_wakeup(0).is_ok(),
                        _ => true,
                    };
                    if ready && dom.shutdown().is_ok() {
                        return Ok(None);
                    }
                    match dom.destroy() {
                        Ok(()) => Ok(Some(ShutdownOutcome::Destroyed)),
                        // It stopped on its own meanwhile.
                        Err(_) if !raw_state(dom, CALL)?.0.is_active() => {
                            Ok(Some(ShutdownOutcome::Graceful))
                        }
                        Err(e) => Err(EngineError::libvirt(CALL, e)),
                    }
                },
            )
            .await?;
        if let Some(outcome) = first {
            return Ok(outcome);
        }
        let until = Instant::now() + deadline;
        let mut poll = Duration::from_millis(50);
        while Instant::now() < until {
            let (state, _) = self.domain_state(name).await?;
            if !state.is_active() {
                return Ok(ShutdownOutcome::Graceful);
            }
            tokio::time::sleep(poll.min(until.saturating_duration_since(Instant::now()))).await;
            poll = (poll * 2).min(Duration::from_millis(500));
        }
        match self.domain_destroy(name, owner).await {
            Ok(()) => Ok(ShutdownOutcome::Destroyed),
            // It stopped between the last poll and the destroy.
            Err(EngineError::Libvirt { error, .. })
                if error.code == sys::VIR_ERR_OPERATION_INVALID as i32 =>
            {
                Ok(ShutdownOutcome::Graceful)
            }
            Err(e) => Err(e),
        }
    }

    /// Stops a domain at once (power off).
    pub async fn domain_destroy(&self, name: &str, owner: &Owner) -> Result<()> {
        self.owned_call::<Domain, _>(CallClass::Lifecycle, "domain_destroy", name, owner, |dom| {
            dom.destroy()
        })
        .await
    }

    /// Reboots (ACPI; ignored by a guest with no OS).
    pub async fn domain_reboot(&self, name: &str, owner: &Owner) -> Result<()> {
        self.owned_call::<Domain, _>(CallClass::Lifecycle, "domain_reboot", name, owner, |dom| {
            dom.reboot(0)
        })
        .await
    }

    /// Pauses the vCPUs.
    pub async fn domain_suspend(&self, name: &str, owner: &Owner) -> Result<()> {
        self.owned_call::<Domain, _>(CallClass::Lifecycle, "domain_suspend", name, owner, |dom| {
            dom.suspend()
        })
        .await
    }

    /// Resumes a paused domain.
    pub async fn domain_resume(&self, name: &str, owner: &Owner) -> Result<()> {
        self.owned_call::<Domain, _>(CallClass::Lifecycle, "domain_resume", name, owner, |dom| {
            dom.resume()
        })
        .await
    }

    /// Saves the running domain's memory to libvirt's managed-save image and stops it; the
    /// next start restores it.
    pub async fn domain_managed_save(&self, name: &str, owner: &Owner) -> Result<()> {
        self.owned_call::<Domain, _>(
            CallClass::Lifecycle,
            "domain_managed_save",
            name,
            owner,
            |dom| dom.managed_save(0),
        )
        .await
    }

    /// Sets the number of online vCPUs (hotplug with [`Apply::Live`]).
    pub async fn domain_set_vcpus(
        &self,
        name: &str,
        owner: &Owner,
        vcpus: u32,
        apply: Apply,
    ) -> Result<()> {
        if vcpus == 0 {
            return Err(EngineError::InvalidSpec(
                "a domain needs at least one vCPU".into(),
            ));
        }
        self.owned_call::<Domain, _>(
            CallClass::Mutate,
            "domain_set_vcpus",
            name,
            owner,
            move |dom| dom.set_vcpus_flags(vcpus, apply.flags()),
        )
        .await
    }

    /// Sets the current memory (balloon target) in KiB.
    pub async fn domain_set_memory(
        &self,
        name: &str,
        owner: &Owner,
        memory_kib: u64,
        apply: Apply,
    ) -> Result<()> {
        self.owned_call::<Domain, _>(
            CallClass::Mutate,
            "domain_set_memory",
            name,
            owner,
            move |dom| dom.set_memory_flags(memory_kib, apply.flags()),
        )
        .await
    }

    /// Grows a disk of an active domain to `capacity_bytes` through the hypervisor
    /// (`virDomainBlockResize` in bytes): the way to grow an image a running guest holds
    /// open, whose lock QEMU keeps. `disk` is the guest's target (`vda`) or the image's path.
    /// Shrinking is refused ([`EngineError::ShrinkRefused`]); the current size is a no-op.
    pub async fn domain_block_resize(
        &self,
        name: &str,
        owner: &Owner,
        disk: &str,
        capacity_bytes: u64,
    ) -> Result<()> {
        let (name_s, disk) = (name.to_string(), disk.to_string());
        self.owned::<Domain, _, _>(
            CallClass::Mutate,
            "domain_block_resize",
            name,
            owner,
            move |dom| {
                const CALL: &str = "domain_block_resize";
                let current = dom.block_info(&disk, 0).map_err(lv(CALL))?.capacity;
                if !growth(
                    || format!("disk {disk} of domain {name_s}"),
                    current,
                    capacity_bytes,
                )? {
                    return Ok(());
                }
                dom.block_resize(&disk, capacity_bytes, sys::VIR_DOMAIN_BLOCK_RESIZE_BYTES)
                    .map_err(lv(CALL))
            },
        )
        .await
    }

    /// Sets the CPU weight and bandwidth fields that are set in `tune`
    /// (`virDomainSetSchedulerParametersFlags`: `cpu_shares`, `vcpu_period`/`vcpu_quota`,
    /// `global_period`/`global_quota`, `emulator_period`/`emulator_quota`); the others keep
    /// their values. On QEMU a live change needs the cgroup `cpu` controller.
    pub async fn domain_set_cpu_tune(
        &self,
        name: &str,
        owner: &Owner,
        tune: &CpuTune,
        apply: Apply,
    ) -> Result<()> {
        if tune.is_empty() {
            return Ok(());
        }
        let info = SchedulerInfo {
            cpu_shares: tune.shares,
            vcpu_bw: SchedBandwidth {
                period: tune.period,
                quota: tune.quota,
            },
            global_bw: SchedBandwidth {
                period: tune.global_period,
                quota: tune.global_quota,
            },
            emulator_bw: SchedBandwidth {
                period: tune.emulator_period,
                quota: tune.emulator_quota,
            },
            ..SchedulerInfo::default()
        };
        self.owned_call::<Domain, _>(
            CallClass::Mutate,
            "domain_set_cpu_tune",
            name,
            owner,
            move |dom| dom.set_scheduler_parameters_flags(&info, apply.flags()),
        )
        .await
    }

    /// Pins one vCPU to a host cpuset.
    pub async fn domain_pin_vcpu(
        &self,
        name: &str,
        owner: &Owner,
        vcpu: u32,
        cpuset: &CpuSet,
        apply: Apply,
    ) -> Result<()> {
        let (name, owner, cpuset) = (name.to_string(), owner.clone(), cpuset.clone());
        let cache = self.owned_cache();
        self.call(CallClass::Mutate, "domain_pin_vcpu", move |c| {
            const CALL: &str = "domain_pin_vcpu";
            let map = checked_cpumap(&cpuset, host_cpu_count(c, CALL)?)?;
            let dom = lookup_owned(c, CALL, &name, &owner, &cache)?;
            dom.pin_vcpu_flags(vcpu, &map, apply.flags())
                .map_err(lv(CALL))
        })
        .await
    }

    /// Pins the emulator threads to a host cpuset.
    pub async fn domain_pin_emulator(
        &self,
        name: &str,
        owner: &Owner,
        cpuset: &CpuSet,
        apply: Apply,
    ) -> Result<()> {
        let (name, owner, cpuset) = (name.to_string(), owner.clone(), cpuset.clone());
        let cache = self.owned_cache();
        self.call(CallClass::Mutate, "domain_pin_emulator", move |c| {
            const CALL: &str = "domain_pin_emulator";
            let map = checked_cpumap(&cpuset, host_cpu_count(c, CALL)?)?;
            let dom = lookup_owned(c, CALL, &name, &owner, &cache)?;
            dom.pin_emulator(&map, apply.flags()).map_err(lv(CALL))
        })
        .await
    }

    /// Every vCPU's affinity as libvirt reports it (`virDomainGetVcpuPinInfo`).
    pub async fn domain_vcpu_pin_info(&self, name: &str, apply: Apply) -> Result<Vec<VcpuPin>> {
        let name = name.to_string();
        self.call(CallClass::Query, "domain_vcpu_pin_info", move |c| {
            let dom = lookup(c, "domain_vcpu_pin_info", &name)?;
            let host = host_cpu_count(c, "domain_vcpu_pin_info")?;
            vcpu_pin_info(host, &dom, "domain_vcpu_pin_info", apply.flags())
        })
        .await
    }

    /// The emulator threads' affinity.
    pub async fn domain_emulator_pin_info(&self, name: &str, apply: Apply) -> Result<CpuSet> {
        let name = name.to_string();
        self.call(CallClass::Query, "domain_emulator_pin_info", move |c| {
            let dom = lookup(c, "domain_emulator_pin_info", &name)?;
            emulator_pin_info(c, &dom, "domain_emulator_pin_info", apply.flags())
        })
        .await
    }

    /// The host autostart flag.
    pub async fn domain_autostart(&self, name: &str) -> Result<bool> {
        let name = name.to_string();
        self.call(CallClass::Query, "domain_autostart", move |c| {
            lookup(c, "domain_autostart", &name)?
                .autostart()
                .map_err(lv("domain_autostart"))
        })
        .await
    }

    /// Sets the host autostart flag.
    pub async fn domain_set_autostart(&self, name: &str, owner: &Owner, on: bool) -> Result<()> {
        self.owned_call::<Domain, _>(
            CallClass::Mutate,
            "domain_set_autostart",
            name,
            owner,
            move |dom| dom.set_autostart(on).map(|_| ()),
        )
        .await
    }

    /// State and reason.
    pub async fn domain_state(&self, name: &str) -> Result<(DomainState, &'static str)> {
        let name = name.to_string();
        self.call(CallClass::Query, "domain_state", move |c| {
            let dom = lookup(c, "domain_state", &name)?;
            let (s, r) = raw_state(&dom, "domain_state")?;
            Ok((s, state_reason_name(s, r)))
        })
        .await
    }

    /// State, memory, vCPUs and CPU time.
    pub async fn domain_info(&self, name: &str) -> Result<DomainInfo> {
        let name = name.to_string();
        self.call(CallClass::Query, "domain_info", move |c| {
            const CALL: &str = "domain_info";
            let dom = lookup(c, CALL, &name)?;
            let (s, r) = raw_state(&dom, CALL)?;
            let info = dom.info().map_err(lv(CALL))?;
            Ok(DomainInfo {
                state: s,
                reason: state_reason_name(s, r),
                max_memory_kib: info.max_mem,
                memory_kib: info.memory,
                vcpus: info.nr_virt_cpu,
                cpu_time_ns: info.cpu_time,
            })
        })
        .await
    }

    /// Looks a domain up by name; `None` when there is none.
    pub async fn domain_lookup(&self, name: &str) -> Result<Option<DomainId>> {
        let name = name.to_string();
        self.call(CallClass::Query, "domain_lookup", move |c| {
            match lookup(c, "domain_lookup", &name) {
                Ok(d) => id_of(&d, "domain_lookup").map(Some),
                Err(e) if e.is_not_found() => Ok(None),
                Err(e) => Err(e),
            }
        })
        .await
    }

    /// Looks a domain up by UUID; `None` when there is none.
    pub async fn domain_lookup_uuid(&self, uuid: &str) -> Result<Option<DomainId>> {
        let uuid = uuid.to_string();
        self.call(CallClass::Query, "domain_lookup_uuid", move |c| {
            match c.lookup_domain_by_uuid_string(&uuid) {
                Ok(d) => id_of(&d, "domain_lookup_uuid").map(Some),
                Err(e) => {
                    let e = EngineError::lookup("domain_lookup_uuid", ObjectKind::Domain, &uuid, e);
                    if e.is_not_found() { Ok(None) } else { Err(e) }
                }
            }
        })
        .await
    }

    /// Every domain (active and inactive, persistent and transient).
    pub async fn domain_list(&self) -> Result<Vec<DomainId>> {
        self.call(CallClass::Query, "domain_list", |c| {
            c.list_all_domains(0)
                .map_err(lv("domain_list"))?
                .iter()
                .map(|d| id_of(d, "domain_list"))
                .collect()
        })
        .await
    }

    /// The domain's XML (`inactive`: the persistent config rather than the running one).
    pub async fn domain_xml(&self, name: &str, inactive: bool) -> Result<String> {
        let name = name.to_string();
        self.call(CallClass::Query, "domain_xml", move |c| {
            let flags = if inactive {
                sys::VIR_DOMAIN_XML_INACTIVE
            } else {
                0
            };
            lookup(c, "domain_xml", &name)?
                .xml_desc(flags)
                .map_err(lv("domain_xml"))
        })
        .await
    }

    /// The owner recorded on a domain (`None`: the domain carries no virtkube mark).
    pub async fn domain_owner(&self, name: &str) -> Result<Option<Owner>> {
        let name = name.to_string();
        self.call(CallClass::Query, "domain_owner", move |c| {
            read_owner(&lookup(c, "domain_owner", &name)?, "domain_owner")
        })
        .await
    }

    /// Everything observed about a domain: its XML read back (live when running), state and
    /// reason, autostart, persistence, managed-save, every vCPU's affinity, and for a running
    /// persistent domain with a memory balloon the sizes in its persistent definition
    /// ([`DomainObserved::config`]).
    /// `None` when there is no such domain.
    pub async fn domain_observe(&self, name: &str) -> Result<Option<DomainObserved>> {
        let name = name.to_string();
        self.call(CallClass::Query, "domain_observe", move |c| {
            const CALL: &str = "domain_observe";
            let dom = match lookup(c, CALL, &name) {
                Ok(d) => d,
                Err(e) if e.is_not_found() => return Ok(None),
                Err(e) => return Err(e),
            };
            let host = host_cpu_count(c, CALL)?;
            match observe(&dom, host, CALL) {
                Ok(o) => Ok(Some(o)),
                // Gone between the lookup and the reads (a migration's switch-over
                // undefining the source, an undefine by hand): what libvirt shows now.
                Err(e) if e.is_not_found() => Ok(None),
                Err(e) => Err(e),
            }
        })
        .await
    }

    /// [`Engine::domain_observe`] for every domain, in one pass on one blocking thread
    /// (the resync path: no per-domain name lookups, one pool slot). Domains that vanish
    /// while being read are skipped.
    pub async fn domain_observe_all(&self) -> Result<Vec<DomainObserved>> {
        self.call(CallClass::Query, "domain_observe_all", |c| {
            const CALL: &str = "domain_observe_all";
            let host = host_cpu_count(c, CALL)?;
            let mut out = Vec::new();
            for dom in c.list_all_domains(0).map_err(lv(CALL))? {
                match observe(&dom, host, CALL) {
                    Ok(o) => out.push(o),
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(out)
        })
        .await
    }
}
