//! The agent's adapter to the reconcile core: observe one object through the engine, bring
//! libvirt to what its spec asks, and say what was done.
//!
//! The controllers only see [`Converged`]: the list of changes made (each becomes an event)
//! and what libvirt reports afterwards (which becomes the status). This keeps the Kubernetes
//! side independent of how the changes are computed.
//!
//! Interim: the shared planner and executors (`crate::plan`, `crate::execute`) were not
//! available when the agent was written, so this module drives the engine directly for the
//! subset the agent needs (define from the spec, redefine on a new generation, live vCPU
//! pinning, power state per run strategy, autostart). It is meant to be replaced by
//! "plan one object, execute the plan" without changing its signature.

use kube::ResourceExt;
use virtkube_crds::Domain;
use virtkube_crds::domain::{
    CpuMode as SpecCpuMode, DomainSpec, Firmware as SpecFirmware, PowerState, RunStrategy,
};
use virtkube_crds::names::host_name;
use virtkube_engine::domain::{Apply, ShutdownOutcome};
use virtkube_engine::model::{
    CpuDef, CpuMode, DiskDef, DiskSource, DomainDef, DomainObserved, DomainState, Firmware,
    InterfaceDef, Topology, VcpuPin,
};
use virtkube_engine::{CpuSet, EngineError, Owner};

use super::context::Context;
use super::error::{Error, Result};

/// One change made on the host: an event reason (`Defined`, `Started`, …) and a note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// CamelCase reason, as the event shows it.
    pub reason: &'static str,
    /// The event's action. Kubernetes' event recorder folds events with the same reason and
    /// action into one series that keeps the first note, so a repair (a restart after an
    /// out-of-band stop) gets its own action to keep libvirt's reason visible.
    pub action: &'static str,
    /// What was done, with libvirt's words where it gave any.
    pub note: String,
}

impl Change {
    fn new(reason: &'static str, note: impl Into<String>) -> Self {
        Self {
            reason,
            action: reason,
            note: note.into(),
        }
    }

    fn repair(reason: &'static str, note: impl Into<String>) -> Self {
        Self {
            reason,
            action: "Repair",
            note: note.into(),
        }
    }
}

/// The result of converging one object.
#[derive(Debug, Clone)]
pub struct Converged<O> {
    /// What was changed, in order; empty in steady state.
    pub changes: Vec<Change>,
    /// What libvirt reports after the changes (`None`: the object does not exist).
    pub observed: Option<O>,
    /// Spec changes that wait for the guest to stop.
    pub pending: Vec<String>,
}

/// The ownership mark of a resource, as the engine compares it (kind and UID).
pub fn owner_of<K: kube::Resource<DynamicType = ()>>(obj: &K) -> Result<Owner> {
    let meta = obj.meta();
    let uid = meta
        .uid
        .as_deref()
        .ok_or(Error::MissingField("metadata.uid"))?;
    let name = meta
        .name
        .as_deref()
        .ok_or(Error::MissingField("metadata.name"))?;
    let mut owner = Owner::new(K::kind(&()), uid, meta.namespace.as_deref(), name);
    owner.generation = meta.generation;
    Ok(owner)
}

/// The libvirt name of a domain resource.
pub fn domain_host_name(dom: &Domain) -> String {
    host_name(dom.namespace().as_deref(), &dom.name_any())
}

/// Brings the domain on this node to what `dom.spec` asks.
pub async fn domain(ctx: &Context, dom: &Domain) -> Result<Converged<DomainObserved>> {
    let engine = &ctx.engine;
    let name = domain_host_name(dom);
    let owner = owner_of(dom)?;
    let mut changes = Vec::new();
    let mut observed = engine.domain_observe(&name).await?;
    if let Some(o) = &observed {
        match &o.owner {
            Some(mark) if mark.same_resource(&owner) => {}
            Some(mark) => {
                return Err(Error::Unrealizable {
                    reason: "NameConflict",
                    message: format!(
                        "libvirt domain `{name}` belongs to another resource ({} uid {}); virtkube never takes over another owner's domain",
                        mark.kind, mark.uid
                    ),
                });
            }
            None => {
                return Err(Error::Unrealizable {
                    reason: "NameConflict",
                    message: format!(
                        "libvirt domain `{name}` exists and was not created by virtkube; rename the resource or remove the domain by hand"
                    ),
                });
            }
        }
    }
    let recorded_generation = observed
        .as_ref()
        .and_then(|o| o.owner.as_ref())
        .and_then(|o| o.generation);
    let mut pending = Vec::new();
    if observed.is_none() || recorded_generation != owner.generation {
        let mut def = domain_def(ctx, dom, &name, &owner).await?;
        if let Some(o) = &observed {
            def.uuid = Some(o.uuid.clone());
            if o.state.is_active() {
                pending = restart_needed(o, &def);
            }
        }
        engine.domain_define(&def).await.map_err(refusal)?;
        changes.push(Change::new(
            "Defined",
            match (&observed, owner.generation) {
                (None, _) => format!("defined libvirt domain {name}"),
                (Some(_), Some(g)) => {
                    format!("redefined libvirt domain {name} for generation {g}")
                }
                (Some(_), None) => format!("redefined libvirt domain {name}"),
            },
        ));
        observed = engine.domain_observe(&name).await?;
    }
    let Some(mut obs) = observed else {
        return Err(Error::Engine(EngineError::Internal(format!(
            "domain {name} vanished right after it was defined"
        ))));
    };
    // Power.
    let desired = dom.spec.effective_state();
    let power_changed = power(ctx, dom, &name, &owner, &obs, desired, &mut changes).await?;
    if power_changed {
        obs = reobserve(ctx, &name).await?;
    }
    // Live pinning (the definition carries it for the next boot; a running guest needs it
    // applied live).
    if obs.state.is_active() {
        let mut pinned = Vec::new();
        for pin in &dom.spec.cpu.pinning {
            let Ok(want) = pin.cpuset.parse::<CpuSet>() else {
                continue;
            };
            if obs.affinity(pin.vcpu) != Some(&want) && pin.vcpu < obs.vcpus {
                engine
                    .domain_pin_vcpu(&name, &owner, pin.vcpu, &want, Apply::Current)
                    .await
                    .map_err(refusal)?;
                pinned.push(format!("vcpu {} -> {want}", pin.vcpu));
            }
        }
        if !pinned.is_empty() {
            changes.push(Change::new("Pinned", pinned.join(", ")));
            obs = reobserve(ctx, &name).await?;
        }
    }
    if obs.persistent && obs.autostart != dom.spec.autostart {
        engine
            .domain_set_autostart(&name, &owner, dom.spec.autostart)
            .await
            .map_err(refusal)?;
        changes.push(Change::new(
            "AutostartSet",
            format!(
                "autostart {}",
                if dom.spec.autostart { "on" } else { "off" }
            ),
        ));
        obs.autostart = dom.spec.autostart;
    }
    Ok(Converged {
        changes,
        observed: Some(obs),
        pending,
    })
}

async fn reobserve(ctx: &Context, name: &str) -> Result<DomainObserved> {
    ctx.engine.domain_observe(name).await?.ok_or_else(|| {
        Error::Engine(EngineError::Internal(format!(
            "domain {name} disappeared while being reconciled"
        )))
    })
}

/// A libvirt refusal of a change is a spec that cannot be realized here (reported as
/// `Ready=False` with libvirt's words); connection trouble stays an engine error (retried).
fn refusal(e: EngineError) -> Error {
    if e.is_connection_error() || e.is_retryable() {
        Error::Engine(e)
    } else if e.is_not_owned() {
        Error::Unrealizable {
            reason: "NotOwned",
            message: e.to_string(),
        }
    } else {
        Error::Unrealizable {
            reason: "LibvirtRefused",
            message: e.to_string(),
        }
    }
}

/// Changes the power state when the run strategy asks for it. Returns whether anything was
/// done.
async fn power(
    ctx: &Context,
    dom: &Domain,
    name: &str,
    owner: &Owner,
    obs: &DomainObserved,
    desired: PowerState,
    changes: &mut Vec<Change>,
) -> Result<bool> {
    let engine = &ctx.engine;
    let reason = obs.reason.as_str();
    let first_time = dom
        .status
        .as_ref()
        .and_then(|s| s.observed_generation)
        .is_none();
    // Manual acts only when the spec changed (or at creation); the others always.
    let spec_changed =
        dom.status.as_ref().and_then(|s| s.observed_generation) != dom.metadata.generation;
    let act = match dom.spec.run_strategy {
        RunStrategy::Always | RunStrategy::Halted => true,
        RunStrategy::Manual => first_time || spec_changed,
        RunStrategy::RerunOnFailure => {
            first_time
                || spec_changed
                || matches!(obs.state, DomainState::Crashed)
                || reason == "crashed"
                || obs.state.is_active()
        }
    };
    if !act {
        return Ok(false);
    }
    let state = obs.state;
    match desired {
        PowerState::Running => match state {
            DomainState::Running | DomainState::Blocked => Ok(false),
            DomainState::Paused => {
                engine.domain_resume(name, owner).await.map_err(refusal)?;
                changes.push(Change::new("Resumed", "resumed the guest"));
                Ok(true)
            }
            DomainState::Crashed => {
                engine.domain_destroy(name, owner).await.map_err(refusal)?;
                engine.domain_start(name, owner).await.map_err(refusal)?;
                changes.push(Change::repair(
                    "Started",
                    "restarted the guest after a crash (libvirt state crashed)",
                ));
                Ok(true)
            }
            _ if !state.is_active() => {
                engine.domain_start(name, owner).await.map_err(refusal)?;
                changes.push(if first_time {
                    Change::new("Started", "started the guest")
                } else {
                    Change::repair(
                        "Started",
                        format!("started the guest (it was shut off, libvirt reason: {reason})"),
                    )
                });
                Ok(true)
            }
            _ => Ok(false),
        },
        PowerState::Paused => {
            let mut did = false;
            if !state.is_active() {
                engine.domain_start(name, owner).await.map_err(refusal)?;
                changes.push(Change::new("Started", "started the guest"));
                did = true;
            }
            if state != DomainState::Paused {
                engine.domain_suspend(name, owner).await.map_err(refusal)?;
                changes.push(Change::new("Paused", "suspended the guest in memory"));
                did = true;
            }
            Ok(did)
        }
        PowerState::Stopped => {
            if !state.is_active() {
                return Ok(false);
            }
            let outcome = engine
                .domain_shutdown(name, owner, ctx.settings.shutdown_timeout)
                .await
                .map_err(refusal)?;
            let note = match outcome {
                ShutdownOutcome::Destroyed => format!(
                    "the guest ignored ACPI shutdown for {}s and was powered off",
                    ctx.settings.shutdown_timeout.as_secs()
                ),
                _ => "the guest shut down".to_string(),
            };
            changes.push(Change::new("Stopped", note));
            Ok(true)
        }
    }
}

/// What a redefinition changes that a running guest only picks up at its next boot.
fn restart_needed(obs: &DomainObserved, def: &DomainDef) -> Vec<String> {
    let mut pending = Vec::new();
    if obs.max_vcpus != def.max_vcpus {
        pending.push("spec.cpu.maxVcpus".to_string());
    }
    if obs.max_memory_kib != def.max_memory_kib {
        pending.push("spec.memory.max".to_string());
    }
    if def.os.firmware.is_some() && obs.os.firmware != def.os.firmware {
        pending.push("spec.os.firmware".to_string());
    }
    if obs.disks.len() != def.disks.len() {
        pending.push("spec.disks".to_string());
    }
    if obs.interfaces.len() != def.interfaces.len() {
        pending.push("spec.interfaces".to_string());
    }
    pending
}

/// The libvirt definition for a domain resource.
async fn domain_def(ctx: &Context, dom: &Domain, name: &str, owner: &Owner) -> Result<DomainDef> {
    let spec: &DomainSpec = &dom.spec;
    let mut def = DomainDef::new(name, owner.clone());
    def.virt_type = ctx.settings.virt_type.clone();
    def.vcpus = spec.cpu.vcpus;
    def.max_vcpus = spec.cpu.effective_max_vcpus();
    def.cpu = spec.cpu.mode.map(|mode| CpuDef {
        mode: match mode {
            SpecCpuMode::HostModel => CpuMode::HostModel,
            SpecCpuMode::HostPassthrough => CpuMode::HostPassthrough,
            SpecCpuMode::Maximum => CpuMode::Maximum,
            SpecCpuMode::Custom => CpuMode::Custom,
        },
        model: spec.cpu.model.clone(),
        topology: spec.cpu.topology.map(|t| Topology {
            sockets: t.sockets,
            cores: t.cores,
            threads: t.threads,
        }),
    });
    for pin in &spec.cpu.pinning {
        let cpuset = pin
            .cpuset
            .parse::<CpuSet>()
            .map_err(|e| Error::Unrealizable {
                reason: "InvalidSpec",
                message: format!("spec.cpu.pinning[vcpu={}].cpuset: {e}", pin.vcpu),
            })?;
        def.pinning.push(VcpuPin {
            vcpu: pin.vcpu,
            cpuset,
        });
    }
    if let Some(cpuset) = &spec.cpu.emulator_cpuset {
        def.emulator_cpuset = cpuset.parse().ok();
    }
    let kib = |q: &virtkube_crds::quantity::ByteQuantity, field: &str| {
        q.bytes()
            .map(|b| b / 1024)
            .map_err(|e| Error::Unrealizable {
                reason: "InvalidSpec",
                message: format!("{field}: {e}"),
            })
    };
    def.memory_kib = kib(&spec.memory.size, "spec.memory.size")?;
    def.max_memory_kib = match &spec.memory.max {
        Some(max) => kib(max, "spec.memory.max")?,
        None => def.memory_kib,
    };
    if let Some(h) = &spec.memory.hugepages {
        def.hugepage_kib = Some(kib(&h.page_size, "spec.memory.hugepages.pageSize")?);
    }
    if let Some(os) = &spec.os {
        def.os.arch = os.arch.clone();
        def.os.machine = os.machine.clone();
        def.os.firmware = os.firmware.map(|f| match f {
            SpecFirmware::Bios => Firmware::Bios,
            SpecFirmware::Efi => Firmware::Efi,
        });
        def.os.boot = os
            .boot
            .iter()
            .map(|b| {
                serde_json::to_value(b)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default()
            })
            .collect();
        def.os.kernel = os.kernel.clone();
        def.os.initrd = os.initrd.clone();
        def.os.cmdline = os.cmdline.clone();
    }
    let ns = dom.namespace().unwrap_or_default();
    let mut used: std::collections::BTreeSet<String> =
        spec.disks.iter().filter_map(|d| d.target.clone()).collect();
    for disk in &spec.disks {
        let prefix = disk.bus.target_prefix();
        let target = match &disk.target {
            Some(t) => t.clone(),
            None => {
                let mut letter = b'a';
                loop {
                    let t = format!("{prefix}{}", letter as char);
                    if !used.contains(&t) || letter == b'z' {
                        used.insert(t.clone());
                        break t;
                    }
                    letter += 1;
                }
            }
        };
        let (source, format) = match (&disk.volume, &disk.host_path) {
            (Some(volume), _) => {
                let (pool, format) = volume_of(ctx, &ns, volume).await?;
                (
                    DiskSource::Volume {
                        pool,
                        volume: host_name(Some(&ns), volume),
                    },
                    Some(format),
                )
            }
            (None, Some(path)) => {
                if !ctx.settings.allow_host_paths {
                    return Err(Error::Unrealizable {
                        reason: "HostPathRefused",
                        message: format!(
                            "spec.disks[name={}].hostPath: this agent does not allow host paths (start it with --allow-host-paths)",
                            disk.name
                        ),
                    });
                }
                (DiskSource::File { path: path.clone() }, None)
            }
            (None, None) => (DiskSource::None, None),
        };
        def.disks.push(DiskDef {
            name: Some(disk.name.clone()),
            target_dev: target,
            bus: Some(
                serde_json::to_value(disk.bus)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_else(|| "virtio".into()),
            ),
            source,
            read_only: disk.read_only,
            boot_order: disk.boot_order,
            format,
            device: Some(
                serde_json::to_value(disk.device)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_else(|| "disk".into()),
            ),
        });
    }
    for nic in &spec.interfaces {
        def.interfaces.push(InterfaceDef {
            network: nic.network.clone(),
            model: serde_json::to_value(nic.model)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string)),
            mac: nic.mac_address.clone(),
        });
    }
    Ok(def)
}

/// The pool and format of the Volume `name` in `namespace`, from the reflector (or the API
/// when the agent runs without one).
async fn volume_of(ctx: &Context, namespace: &str, name: &str) -> Result<(String, String)> {
    let volume = match &ctx.volumes {
        Some(store) => store
            .get(&kube::runtime::reflector::ObjectRef::new(name).within(namespace))
            .map(|v| (*v).clone()),
        None => {
            kube::Api::<virtkube_crds::Volume>::namespaced(ctx.client.clone(), namespace)
                .get_opt(name)
                .await?
        }
    };
    let Some(volume) = volume else {
        return Err(Error::Unrealizable {
            reason: "VolumeMissing",
            message: format!("Volume {namespace}/{name} does not exist"),
        });
    };
    Ok((
        volume.spec.pool.clone(),
        volume.spec.format.as_str().to_string(),
    ))
}

/// Removes the domain from this node: graceful shutdown (up to the configured timeout),
/// then destroy, then undefine. A domain that is already gone, or that is not virtkube's
/// for this resource, is left alone and counts as done.
pub async fn remove_domain(ctx: &Context, dom: &Domain) -> Result<Vec<Change>> {
    let engine = &ctx.engine;
    let name = domain_host_name(dom);
    let owner = owner_of(dom)?;
    let mut changes = Vec::new();
    let Some(obs) = engine.domain_observe(&name).await? else {
        return Ok(changes);
    };
    if !obs.owner.as_ref().is_some_and(|o| o.same_resource(&owner)) {
        tracing::info!(domain = %name, "libvirt domain is not this resource's: left alone");
        return Ok(changes);
    }
    if obs.state.is_active() {
        let outcome = engine
            .domain_shutdown(&name, &owner, ctx.settings.shutdown_timeout)
            .await?;
        changes.push(Change::new(
            "Stopped",
            match outcome {
                ShutdownOutcome::Destroyed => {
                    "the guest ignored ACPI shutdown and was powered off".to_string()
                }
                _ => "the guest shut down".to_string(),
            },
        ));
    }
    if obs.persistent {
        match engine.domain_undefine(&name, &owner).await {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
    }
    changes.push(Change::new(
        "Undefined",
        format!("removed libvirt domain {name}"),
    ));
    Ok(changes)
}
